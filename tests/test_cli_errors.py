"""Bad input to every command line ends in one short line naming the flag or file and what to do,
exit code 2, no traceback, and nothing left on disk. Each case runs the real entry point in a
subprocess and fails before anything is compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.gemma4.config import PRESETS
from scripts.make_checkpoint import random_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CFG = PRESETS["tiny"]


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def assert_refused(out: subprocess.CompletedProcess, *messages: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for m in messages:
        assert m in out.stderr, (m, out.stderr)


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(d, CFG, random_tensors(CFG, seed=0), torch.float32, shard_bytes=100_000)
    return d


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- python -m export.gemma4 --------------------------------------------------------------

def test_export_truncated_shard(checkpoint, tmp_path):
    ck = copy_checkpoint(checkpoint, tmp_path / "ck")
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = files_under(tmp_path)
    out = cli("export.gemma4", "--checkpoint", str(ck), "--device", "cpu", "--out", str(tmp_path / "art"), cwd=tmp_path)
    assert_refused(out, shard.name, "truncated shard")
    assert files_under(tmp_path) == before


def test_export_tensors_disagree_with_config(checkpoint, tmp_path):
    ck = copy_checkpoint(checkpoint, tmp_path / "ck")
    raw = json.loads((ck / "config.json").read_text())
    raw["intermediate_size"] += 8
    (ck / "config.json").write_text(json.dumps(raw))
    (ck / "tokenizer.json").unlink()
    before = files_under(tmp_path)
    out = cli("export.gemma4", "--checkpoint", str(ck), "--device", "cpu", "--out", str(tmp_path / "art"), cwd=tmp_path)
    assert_refused(out, "mlp.gate_proj.weight has shape", "the config implies")
    # the tokenizer-less checkpoint is named before loading (the runner takes --prompt-ids then)
    assert "has no tokenizer.json" in out.stderr and "--prompt-ids" in out.stderr
    assert files_under(tmp_path) == before


def test_export_config_lacking_a_shape_field(checkpoint, tmp_path):
    ck = copy_checkpoint(checkpoint, tmp_path / "ck")
    raw = json.loads((ck / "config.json").read_text())
    del raw["hidden_size"]
    (ck / "config.json").write_text(json.dumps(raw))
    before = files_under(tmp_path)
    out = cli("export.gemma4", "--checkpoint", str(ck), "--device", "cpu", "--out", str(tmp_path / "art"), cwd=tmp_path)
    assert_refused(out, "config.json lacks hidden_size")
    assert files_under(tmp_path) == before


def test_export_debug_shows_the_traceback(checkpoint, tmp_path):
    ck = copy_checkpoint(checkpoint, tmp_path / "ck")
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    out = cli("export.gemma4", "--checkpoint", str(ck), "--device", "cpu", "--out", str(tmp_path / "art"),
              "--debug", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr and "CheckpointError" in out.stderr


def test_export_short_ctx_fits_the_default_prefill_chunk(tmp_path):
    out = cli("export.gemma4", "--ctx", "64", "--device", "cpu", "--plan", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and files_under(tmp_path) == []


def test_export_plan_refuses_a_ctx_past_the_model_as_the_export_does(tmp_path):
    """--plan on the CPU (no budget to fit) names --ctx and the model's limit, as the export itself does, instead
    of the planner's bare "ctx 5000 exceeds max_position_embeddings 4096"."""
    out = cli("export.gemma4", "--ctx", "5000", "--device", "cpu", "--plan", cwd=tmp_path)
    assert_refused(out, "--ctx 5000 is outside 2..4096 (the model's max_position_embeddings); lower --ctx")
    assert files_under(tmp_path) == []


def test_export_bad_numbers_are_refused_by_flag(tmp_path):
    out = cli("export.gemma4", "--layers", "-1", "--device", "cpu", cwd=tmp_path)
    assert_refused(out, "argument --layers: must be a positive integer")
    out = cli("export.gemma4", "--ctx", "64", "--prefill-chunk", "65", "--device", "cpu", cwd=tmp_path)
    assert_refused(out, "--prefill-chunk 65 must be in 2..ctx (64)")
    out = cli("export.gemma4", "--gpu-budget", "5XB", "--plan", "--device", "cpu", cwd=tmp_path)
    assert_refused(out, "argument --gpu-budget: cannot read size '5XB': use e.g. 24GiB")
    out = cli("export.gemma4", "--kv-dtype", "int2", "--device", "cpu", cwd=tmp_path)
    assert_refused(out, "argument --kv-dtype: invalid choice: 'int2' (choose from auto, bf16, int8, int4)")
    out = cli("export.gemma4.planner", "--preset", "tiny", "--host-budget", "0", cwd=tmp_path)
    assert_refused(out, "argument --host-budget: size '0' must be positive")
    assert files_under(tmp_path) == []


def test_export_out_that_cannot_be_written_is_refused_before_compiling(tmp_path):
    """An --out under a file, or where nothing can be created, is refused at once (not after the compile),
    and the write probe leaves nothing behind."""
    (tmp_path / "f").write_text("x")
    out = cli("export.gemma4", "--device", "cpu", "--out", str(tmp_path / "f" / "art"), cwd=tmp_path)
    assert_refused(out, f"--out {tmp_path / 'f' / 'art'}: {tmp_path / 'f'} is not a directory")
    out = cli("export.gemma4", "--device", "cpu", "--out", "/proc/no/art", cwd=tmp_path)
    assert_refused(out, "--out /proc/no/art: cannot write in /proc")
    assert files_under(tmp_path) == ["f"]


def test_export_out_that_is_not_an_export_is_refused_before_compiling(checkpoint, tmp_path):
    """The artifact replaces its whole --out directory: one holding other files (the checkpoint itself, notes)
    is refused at once and kept; an earlier export's directory (model.pte) or an empty one is taken."""
    from export.gemma4.options import DeviceChoice, ExportConfig, resolve

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    out = cli("export.gemma4", "--device", "cpu", "--out", str(notes), cwd=tmp_path)
    assert_refused(out, f"--out {notes}: {notes} holds files but no export (model.pte)")
    assert (notes / "notes.txt").read_text() == "mine"
    out = cli("export.gemma4", "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(checkpoint), cwd=tmp_path)
    assert_refused(out, "holds files but no export")
    assert (checkpoint / "config.json").is_file()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "model.pte").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for d in ("earlier", "empty"):
        resolve(ExportConfig(ctx=64, device=DeviceChoice.CPU, out=tmp_path / d))


def test_export_that_will_not_fit_its_disk_is_refused_with_the_sizes(tmp_path, monkeypatch):
    """The disk check (before anything is loaded): the weights twice in low-memory mode (spool, then .ptd),
    once in the stock export, the KV buffers too with --kv-in-ptd; against the free bytes where --out goes."""
    import shutil
    from collections import namedtuple

    from export.gemma4.__main__ import build_parser, check_disk, resolve_plan
    from export.gemma4.options import ExportConfigError

    free = {"bytes": 1 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("Usage", "total used free")(0, 0, free["bytes"]))

    def need(*flags: str) -> float:
        cfg = resolve_plan(build_parser().parse_args(["--preset", "31b", "--ctx", "8192", "--out",
                                                      str(tmp_path / "a"), *flags]))
        with pytest.raises(ExportConfigError, match=f"--out {tmp_path / 'a'}: this export writes") as e:
            check_disk(cfg)
        assert f"{tmp_path} has 0.0 GiB free; free space or pass --out on a larger disk" in str(e.value)
        return float(str(e.value).split("~")[1].split(" GiB")[0])

    low, stock, with_kv = need("--low-memory"), need(), need("--low-memory", "--kv-in-ptd")
    assert 14 < stock < 20 and abs(low - 2 * stock) <= 0.2 and with_kv > low  # the 31B: ~17 GiB of weights
    free["bytes"] = 64 << 30
    check_disk(resolve_plan(build_parser().parse_args(["--preset", "31b", "--ctx", "8192", "--low-memory",
                                                       "--out", str(tmp_path / "a")])))
    assert files_under(tmp_path) == []


# ---- python -m runtime ------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be a positive integer, got -3"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1]"),
    (["--top-p", "nan"], "argument --top-p: must be in (0, 1]"),
    (["--top-k", "-2"], "argument --top-k: must be 0 or more"),
    (["--seed", "x"], "argument --seed: invalid int value"),
    (["--seed", str(2**64)], f"argument --seed: must be in -2**63..2**64-1, got {2**64}"),
    (["--device", "banana"], "argument --device: 'banana' is not a device: give e.g. cuda, cuda:1 or cpu"),
])
def test_runtime_sampling_args(argv, message, tmp_path):
    out = cli("runtime", "--model", str(tmp_path), "--prompt", "hi", *argv, cwd=tmp_path)
    assert_refused(out, message)
    assert files_under(tmp_path) == []


def test_runtime_bad_prompt_ids_and_model_dir(tmp_path):
    out = cli("runtime", "--model", str(tmp_path), "--prompt-ids", "2,x", cwd=tmp_path)
    assert_refused(out, "argument --prompt-ids: give comma-separated token ids")
    out = cli("runtime", "--model", str(tmp_path / "nope"), "--prompt", "hi", cwd=tmp_path)
    assert_refused(out, f"{tmp_path / 'nope'} does not exist; pass the export's output directory (its --out)")
    (tmp_path / "f").write_text("x")
    out = cli("runtime", "--model", str(tmp_path / "f"), "--prompt", "hi", cwd=tmp_path)
    assert_refused(out, f"{tmp_path / 'f'} is not a directory; pass the export's output directory")
    (tmp_path / "f").unlink()
    out = cli("runtime", "--model", str(tmp_path), "--prompt", "hi", cwd=tmp_path)  # no model.pte
    assert_refused(out, "model.pte")
    assert files_under(tmp_path) == []


# ---- python -m export.gemma4.planner, scripts.make_checkpoint ------------------------------------

def test_planner_bad_config(checkpoint, tmp_path):
    ck = copy_checkpoint(checkpoint, tmp_path / "ck")
    raw = json.loads((ck / "config.json").read_text())
    del raw["num_key_value_heads"]
    (ck / "config.json").write_text(json.dumps(raw))
    assert_refused(cli("export.gemma4.planner", "--config", str(ck), cwd=tmp_path), "--config", "lacks num_key_value_heads")
    assert_refused(cli("export.gemma4.planner", "--config", str(tmp_path / "nope"), cwd=tmp_path), "--config", "no config.json")
    assert_refused(cli("export.gemma4.planner", "--preset", "tiny", "--layers", "9", cwd=tmp_path), "--layers", "1..4")


def test_make_checkpoint_keeps_a_directory_that_is_not_empty(tmp_path):
    """The checkpoint replaces its whole --out: a directory holding anything (a real checkpoint, notes) is refused."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    out = cli("scripts.make_checkpoint", "--preset", "tiny", "--layers", "1", "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert_refused(out, f"--out {tmp_path / 'c'} is not empty")
    assert files_under(tmp_path) == ["c", "c/notes.txt"]


def test_make_checkpoint_bad_args_leave_nothing(tmp_path):
    out = cli("scripts.make_checkpoint", "--preset", "tiny", "--layers", "0", "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert_refused(out, "argument --layers: must be a positive integer")
    out = cli("scripts.make_checkpoint", "--preset", "tiny", "--shard-gib", "0", "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert_refused(out, "--shard-gib must be > 0")
    (tmp_path / "f").write_text("x")
    out = cli("scripts.make_checkpoint", "--preset", "tiny", "--out", str(tmp_path / "f"), cwd=tmp_path)
    assert_refused(out, "--out", "is a file")
    assert files_under(tmp_path) == ["f"]


@pytest.mark.parametrize("argv, message", [
    (["scripts.bench_runtime", "--ctx", "-1"], "argument --ctx: must be a positive integer"),
    (["scripts.bench_host_memory", "--checkpoint", "nope"], "--checkpoint nope: no such directory"),
    (["scripts.bench_export_memory", "--parallel", "0"], "argument --parallel: must be a positive integer"),
    (["scripts.memory_outside", "--model", "nope"], "--model nope: nope does not exist"),
    (["scripts.stack_sample"], "usage: python -m scripts.stack_sample OUT.txt PERIOD_S -m MODULE"),
    (["scripts.profile_decode", "--model", "nope"], "--model nope: nope does not exist"),
    (["scripts.kv_logits_error", "--preset", "nope"], "--preset 'nope' is unknown"),
    (["scripts.stack_sample", "s.txt", "soon", "-m", "json.tool"], "PERIOD_S: a number of seconds > 0, got 'soon'"),
])
def test_benchmark_arguments(argv, message, tmp_path):
    assert_refused(cli(*argv, cwd=tmp_path), message)
    assert files_under(tmp_path) == []


def test_runtime_device_against_the_artifact():
    """The runner's --device against what the artifact was compiled for: a device type no artifact runs on is
    named as such (not "re-export with --device mps", which the exporter refuses); another type asks for a
    re-export; cuda means the first GPU."""
    from runtime.artifact import ArtifactError
    from runtime.runner import resolve_device

    assert resolve_device("cuda", None) == "cuda:0" and resolve_device("cuda", "cuda") == "cuda:0"
    assert resolve_device("cuda", "cuda:1") == "cuda:1" and resolve_device("cpu", None) == "cpu"
    with pytest.raises(ArtifactError, match="artifacts run on cpu or cuda"):
        resolve_device("cpu", "mps")
    with pytest.raises(ArtifactError, match="re-export with --device cuda"):
        resolve_device("cpu", "cuda:1")


GPU_SCRIPTS = ("argmax_variants", "attention_variants", "bench_attention", "bench_int4", "decode_kv8_variants",
               "gemv1_early_variants", "hadamard_variants", "int4_variants", "launch_floor", "moe_prefill_variants",
               "ple_variants", "prefill_variants", "row_norm_variants", "sliding_prefill", "small_mlp_variants",
               "sweep_moe_decode")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: the scripts would run")
def test_gpu_scripts_without_a_gpu_say_so(capsys):
    """Each GPU measuring script run on a machine without one stops with one line naming itself and what it needs
    (exit status 2), before it touches CUDA."""
    import importlib

    for name in GPU_SCRIPTS:
        mod = importlib.import_module(f"scripts.{name}")
        assert mod.main([]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}: needs a CUDA GPU" in err and "Traceback" not in err, (name, err)
