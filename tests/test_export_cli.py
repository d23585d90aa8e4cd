"""`python -m export.gemma4`: flags map one-to-one onto ExportConfig, and bad input fails
clearly before anything is compiled."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from export.gemma4.__main__ import build_parser, main, resolve_plan
from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig
from export.gemma4.options import ExportConfigError
from export.gemma4.quant import EmbeddingQuant, LinearQuant


PLANNER_FLAGS = {"plan", "gpu_budget", "debug"}  # act around the export; not part of what is exported


def test_every_config_field_is_a_flag_and_defaults_agree():
    parser = build_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags - PLANNER_FLAGS == {f.name for f in fields(ExportConfig)}
    assert resolve_plan(parser.parse_args(["--device", "cpu"])) == ExportConfig(device=DeviceChoice.CPU)


def test_no_arguments_means_tiny_on_any_device():
    cfg = ExportConfig()
    assert cfg.source_preset == "tiny" and cfg.device is DeviceChoice.AUTO
    assert cfg.out_dir == Path("out/tiny")


def test_flags_parse_into_enums():
    cfg = resolve_plan(build_parser().parse_args(
        ["--preset", "31b", "--layers", "2", "--ctx", "8192", "--quant", "none", "--group-size", "128",
         "--embedding-quant", "int8", "--device", "cpu", "--dtype", "bfloat16", "--low-memory", "--out", "x"]))
    assert cfg == ExportConfig(preset="31b", layers=2, ctx=8192, quant=LinearQuant.NONE, group_size=128,
                               embedding_quant=EmbeddingQuant.INT8, device=DeviceChoice.CPU,
                               dtype=DTypeChoice.BF16, low_memory=True, out=Path("x"))
    assert cfg.name == "31b-2l"


def test_help_explains_the_artifact():
    out = subprocess.run([sys.executable, "-m", "export.gemma4", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0
    assert "--prefill-chunk" in out.stdout and "model.ptd" in out.stdout and "{none,int4}" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--ctx", "5000"], "--ctx 5000 is outside 2..4096 (the model's max_position_embeddings); lower --ctx"),
    (["--ctx", "0"], "--ctx 0 is below 2; give --ctx 2 or more"),
    (["--ctx", "1", "--plan"], "--ctx 1 is below 2; give --ctx 2 or more"),
    (["--preset", "nope"], "--preset 'nope' is unknown"),
    (["--checkpoint", "/no/such/dir"], "--checkpoint /no/such/dir: no such directory"),
    (["--prefill-chunk", "1"], "--prefill-chunk 1 must be in 2..ctx"),
    (["--layers", "99"], "--layers 99 is outside 1..4"),
    (["--preset", "31b"], "builds a"),  # 31B float would not fit in CI's RAM: refused up front
    (["--kv-dtype", "bf16"], "--kv-dtype bf16 with a float32 model (--dtype auto on cpu): pass --dtype bfloat16"),
    (["--kv-dtype", "bf16", "--plan"], "--kv-dtype bf16 with a float32 model"),
])
def test_bad_input_fails_before_compiling(argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(argv + ["--device", "cpu", "--out", str(out)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_checkpoint_given_as_a_file_names_its_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "config.json"), "--device", "cpu"])
    assert f"a file, not a directory (pass the Hugging Face model directory that holds it: --checkpoint {tmp_path})" \
        in capsys.readouterr().err


def test_checkpoint_dir_without_weights_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--device", "cpu"])
    assert "no model.safetensors" in capsys.readouterr().err


def test_checkpoint_with_too_long_ctx(tmp_path, capsys):
    from export.gemma4.config import PRESETS
    import json

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--ctx", "8192", "--device", "cpu"])
    assert "--ctx 8192 is outside 2..4096" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_exports_find_the_packaged_flatc_whatever_path_holds(monkeypatch):
    """ExecuTorch runs `flatc` from PATH unless FLATC_EXECUTABLE is set; an interpreter started
    without its venv's bin/ on PATH must still find the binary shipped in the package."""
    import os

    from export.gemma4.export import use_packaged_flatc

    monkeypatch.delenv("FLATC_EXECUTABLE", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_packaged_flatc()
    flatc = Path(os.environ["FLATC_EXECUTABLE"])
    assert flatc.name == "flatc" and "executorch" in flatc.parts and os.access(flatc, os.X_OK)
    out = subprocess.run([str(flatc), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "flatc" in out.stdout
    monkeypatch.setenv("FLATC_EXECUTABLE", "/opt/my/flatc")  # a user's choice wins
    use_packaged_flatc()
    assert os.environ["FLATC_EXECUTABLE"] == "/opt/my/flatc"


def test_short_ctx_alone_fits_the_default_prefill_chunk():
    for device in ("cpu", "cuda"):  # cuda: the planned chunk, never above ctx
        assert resolve_plan(build_parser().parse_args(["--ctx", "64", "--device", device])).prefill_chunk == 64
    assert resolve_plan(build_parser().parse_args(["--ctx", "4096", "--device", "cpu"])).prefill_chunk == 128
    assert resolve_plan(build_parser().parse_args(["--ctx", "64", "--prefill-chunk", "16"])).prefill_chunk == 16


def test_cuda_prefill_chunk_is_fitted_to_the_budget(capsys):
    recipe = ["--preset", "31b", "--device", "cuda", "--low-memory", "--kv-dtype", "int4", "--embedding-quant", "int8"]
    cfg = resolve_plan(build_parser().parse_args([*recipe, "--ctx", "131072"]))
    assert cfg.prefill_chunk == 2048  # 21.97 GiB against the default 22 GiB
    assert "prefill chunk 2048, fitted to the default budget" in capsys.readouterr().err
    cfg = resolve_plan(build_parser().parse_args([*recipe, "--ctx", "131072", "--gpu-budget", "80GiB"]))
    assert cfg.prefill_chunk == 2048
    # ctx first (at the smallest chunk), then the largest chunk the rest of the budget allows
    cfg = resolve_plan(build_parser().parse_args([*recipe, "--ctx", "auto", "--gpu-budget", "24564MiB"]))
    assert (cfg.ctx, cfg.prefill_chunk) == (262144, 256)
    cfg = resolve_plan(build_parser().parse_args([*recipe, "--ctx", "131072", "--prefill-chunk", "128"]))
    assert cfg.prefill_chunk == 128


def test_cuda_kv_auto_is_the_most_precise_cache_that_fits(capsys):
    """--kv-dtype auto on a GPU: the model dtype's cache where it fits the budget, else int8, else int4; the
    ctx is fitted first (with the most compact cache). An explicit --kv-dtype and a cpu export are kept."""
    from export.gemma4.options import KvDtype

    def resolved(*argv):
        cfg = resolve_plan(build_parser().parse_args(["--device", "cuda", "--low-memory", "--embedding-quant", "int8",
                                                      *argv]))
        return cfg.ctx, cfg.kv_dtype, capsys.readouterr().err

    ctx, kv, err = resolved("--preset", "e2b", "--ctx", "131072")  # 5.3 GiB with a bf16 cache
    assert (ctx, kv) == (131072, KvDtype.AUTO) and "kv cache bfloat16, fitted to the default budget" in err
    ctx, kv, err = resolved("--preset", "31b", "--ctx", "131072")  # bf16 28.0, int8 23.0, int4 20.5 GiB
    assert (ctx, kv) == (131072, KvDtype.INT4)
    assert "kv cache int4" in err and "bfloat16 would need 27.99 GiB, int8 would need 23.01 GiB" in err
    ctx, kv, err = resolved("--preset", "31b", "--ctx", "131072", "--gpu-budget", "32607MiB")
    assert (ctx, kv) == (131072, KvDtype.AUTO) and "fitted to --gpu-budget" in err
    ctx, kv, err = resolved("--preset", "31b", "--ctx", "81920", "--gpu-budget", "24GiB")
    assert (ctx, kv) == (81920, KvDtype.INT8)
    ctx, kv, _ = resolved("--preset", "31b", "--ctx", "auto", "--gpu-budget", "24564MiB")
    assert (ctx, kv) == (262144, KvDtype.INT4)  # the model's limit, reached with the int4 cache only
    ctx, kv, err = resolved("--preset", "31b", "--ctx", "131072", "--kv-dtype", "int8")
    assert (ctx, kv) == (131072, KvDtype.INT8) and "kv cache" not in err
    with pytest.raises(ExportConfigError, match="ctx 131072 does not fit 16.00 GiB"):  # not even with int4
        resolved("--preset", "31b", "--ctx", "131072", "--gpu-budget", "16GiB")
    # without a budget only the runtime is fitted: a stock export's compile-time peak (65 GiB for the 31B)
    # is the exporting machine's, not the card's
    stock = resolve_plan(build_parser().parse_args(["--preset", "31b", "--device", "cuda", "--ctx", "8192"]))
    assert stock.kv_dtype is KvDtype.AUTO and "kv cache bfloat16" in capsys.readouterr().err
    cpu = resolve_plan(build_parser().parse_args(["--device", "cpu", "--ctx", "64"]))
    assert cpu.kv_dtype is KvDtype.AUTO and "kv cache" not in capsys.readouterr().err


@pytest.mark.parametrize("ctx, advice", [(1, "give --ctx 2 or more"), (5000, "lower --ctx")])
def test_resolve_names_which_way_ctx_is_out_of_range(ctx, advice, tmp_path):
    """The API's check (options.resolve) too: a ctx under 2 is not fixed by lowering it."""
    from export.gemma4.options import ExportConfig, ExportConfigError, resolve

    with pytest.raises(ExportConfigError, match=f"--ctx {ctx} is outside 2..4096 .*; {advice}"):
        resolve(ExportConfig(ctx=ctx, out=tmp_path / "never"))
