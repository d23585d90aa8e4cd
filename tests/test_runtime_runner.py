"""The runner on the real exported tiny artifact (CPU): parity with the eager model, sharing of
weights and KV between methods, sampling reproducibility, stops, and clear errors.

Uses the session-scoped `tiny_artifact` fixture (tests/conftest.py): compiled once per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from runtime.__main__ import main as cli_main
from runtime.artifact import PAIR_ID_KEY, ArtifactError, PtdFile
from runtime.runner import ContextOverflowError, Runner
from runtime.sampling import SamplingConfig

pytestmark = pytest.mark.slow

REL_TOL = 1e-3


@pytest.fixture(scope="module")
def art(tiny_artifact) -> tuple[Path, torch.nn.Module]:
    """(artifact dir, eager model with the same quantized weights)."""
    return Path(tiny_artifact.out_dir), tiny_artifact.model


@pytest.fixture(scope="module")
def runner(art) -> Runner:
    return Runner.load(art[0])


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu().view(-1), want.float().cpu().view(-1)
    return ((got - want).norm() / want.norm()).item()


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def check_parity_with_eager(runner: Runner, model: torch.nn.Module) -> list[float]:
    """Chunked prefill (two full chunks + a lone token) then decode until the sliding rings
    have wrapped; every step's logits against the eager model's. Returns the errors."""
    meta = runner.meta
    chunk, ring = meta.prefill_chunk, meta.raw["ring_size"]
    dev = next(model.parameters()).device
    n_prompt = 2 * chunk + 1  # the lone last token goes through decode
    end = max(n_prompt, ring) + 6  # decode writes wrap the sliding rings
    assert end <= meta.ctx
    ids = _prompt(end, meta.vocab_size)

    def eager(piece, pos):
        return model(torch.tensor([piece], device=dev), torch.tensor([pos], device=dev))

    runner.reset()
    model.reset_cache()
    errors = []
    for s in range(0, n_prompt, chunk):
        piece = ids[s : min(s + chunk, n_prompt)]
        want = eager(piece, s)
        errors.append(_rel_err(runner.prefill(piece), want))
    for p in range(n_prompt, end):
        want = eager([ids[p]], p)
        errors.append(_rel_err(runner.decode(ids[p]), want))
    assert runner.pos == end

    # one prefill call over the whole prompt chunks it the same way
    runner.reset()
    model.reset_cache()
    for s in range(0, n_prompt, chunk):
        want = eager(ids[s : min(s + chunk, n_prompt)], s)
    errors.append(_rel_err(runner.prefill(ids[:n_prompt]), want))
    return errors


def test_logits_match_eager_over_chunked_prefill_and_decode_past_the_window(runner, art):
    errors = check_parity_with_eager(runner, art[1])
    print(f"runner vs eager over {len(errors)} calls: max rel err {max(errors):.2e}")
    assert max(errors) <= REL_TOL, errors


def test_kv_sized_from_metadata_and_shared_by_both_methods(runner):
    meta = runner.meta
    assert runner.graph is None  # CPU: no CUDA graph, decode runs its container
    for buf in meta.kv:
        if buf.kind == "chunk":  # a ring's prefill K/V for later readers: (1, prefill_chunk, Hkv, D)
            assert buf.shape[1] == meta.prefill_chunk, buf
            continue
        seq = buf.shape[2]  # (1, Hkv, S, D)
        assert seq == (meta.raw["ring_size"] if buf.kind == "sliding" else meta.ctx), buf
    bound = {}  # method -> {ptd key or KV fqn: address a step's container holds once bound}
    for m in ("prefill", "decode"):
        bound[m] = {}
        for step, (program, constants, _, _) in zip(meta.method_steps[m], runner.methods[m].steps):
            program.bind(constants)
            held = program.container.extract_constants_map(False)  # keyed by the unit's FQNs
            by_name = {name: held[fqn] for name, fqn in program.constant_fqns().items() if fqn in held}
            bound[m].update({key: by_name[name].data_ptr() for name, key in step.constants.items() if name in by_name})
    for buf in meta.kv:  # the very tensors the runner allocated, in every step naming them: no copy
        mine = runner._bound.kv[buf.fqn].data_ptr()
        users = [m for m in bound if buf.fqn in bound[m]]
        assert users and all(bound[m][buf.fqn] == mine for m in users), buf.fqn
        if buf.kind in ("sliding", "full"):
            assert users == ["prefill", "decode"], buf.fqn
    kv = {buf.fqn for buf in meta.kv}
    # model tensors by key; constants tracing made are each program's own ("{program}::{name}")
    shared = [k for k in bound["prefill"] if k in bound["decode"] and k not in kv and "::" not in k]
    assert len(shared) > 10
    for k in shared:  # one weight copy serves both methods
        assert bound["prefill"][k] == bound["decode"][k], k


def test_cpu_weights_are_views_of_the_mapped_ptd(runner):
    """Zero copy on CPU: every bound weight points into the .ptd's memory map."""
    ptd = runner.artifact.ptd
    key, entry = next((k, e) for k, e in ptd.entries.items() if e.dtype is not None and e.nbytes)
    base = ptd.tensor(key).data_ptr() - entry.offset
    offsets = {e.offset for e in ptd.entries.values()}
    assert runner._bound.weights
    for t in runner._bound.weights.values():
        assert t.data_ptr() - base in offsets
    assert runner.weight_bytes <= ptd.file_size


def test_same_seed_same_text_and_other_seed_differs(runner):
    prompt = _prompt(11, runner.meta.vocab_size, seed=1)

    def gen(seed):
        cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return list(runner.generate(prompt, 24, cfg, stop_ids=()))

    first = gen(7)
    assert len(first) == 24
    assert gen(7) == first
    assert gen(8) != first


def test_greedy_generation_stops_on_eos(runner):
    prompt = _prompt(5, runner.meta.vocab_size, seed=2)
    greedy = list(runner.generate(prompt, 6, stop_ids=()))
    assert len(greedy) == 6
    stop_at = greedy[2]
    cut = list(runner.generate(prompt, 6, stop_ids={stop_at}))
    assert cut == greedy[: greedy.index(stop_at) + 1]
    stats = runner.last_stats
    assert stats.prompt_tokens == 5 and stats.new_tokens == len(cut) and stats.ttft_s > 0


def test_generate_queues_steps_without_changing_tokens_or_the_position(runner):
    """generate() queues step i + 1 before it reads token i: the tokens are a plain decode loop's,
    and however the sequence ends (max tokens, a stop id, the caller leaving early) the position is
    the prompt plus every token fed back, not the step queued past the last."""
    prompt = _prompt(7, runner.meta.vocab_size, seed=5)
    runner.reset()
    token = int(torch.argmax(runner.prefill(prompt)))
    plain = [token]
    for _ in range(5):
        token = int(torch.argmax(runner.decode(token)))
        plain.append(token)
    assert list(runner.generate(prompt, 6, stop_ids=())) == plain
    assert runner.pos == len(prompt) + 5
    stop_at = plain[3]
    cut = list(runner.generate(prompt, 6, stop_ids={stop_at}))
    assert cut == plain[: plain.index(stop_at) + 1] and runner.pos == len(prompt) + len(cut) - 1
    for taken in runner.generate(prompt, 6, stop_ids=()):
        break  # the caller leaves after the first token, a step queued behind it
    assert taken == plain[0] and runner.pos == len(prompt)
    stale = runner.generate(prompt, 6, stop_ids=())
    next(stale)
    assert list(runner.generate(prompt, 3, stop_ids=())) == plain[:3]
    stale.close()  # an earlier sequence's generator, closed late: the current position stays
    assert runner.pos == len(prompt) + 2
    assert runner.last_stats.decode_s > 0 and runner.last_stats.new_tokens == 3


def test_benchmark_decode_steps_feed_n_tokens(runner):
    """scripts/bench_runtime.py's decode timing takes generate's queued steps: n steps, n
    positions, a time for each."""
    from scripts.bench_runtime import decode_steps

    prompt = _prompt(6, runner.meta.vocab_size, seed=6)
    runner.reset()
    row = decode_steps(runner, runner.prefill(prompt), 4)
    assert runner.pos == len(prompt) + 4
    assert row["ms_per_token"] > 0 and row["median_ms"] > 0


def test_over_long_prompt_is_a_clear_error(runner):
    ctx = runner.ctx
    with pytest.raises(ContextOverflowError, match=f"exported context of {ctx} tokens"):
        list(runner.generate(list(range(3, 3 + ctx + 1)), 1))
    with pytest.raises(ContextOverflowError, match=f"{ctx - 4} prompt tokens \\+ 5 new tokens"):
        list(runner.generate(list(range(3, ctx - 1)), 5))
    runner.reset()
    runner.prefill([3] * (ctx - 1))
    runner.decode(4)  # the last slot is usable
    with pytest.raises(ContextOverflowError, match=f"position {ctx} is past"):
        runner.decode(5)


def _copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("model.pte", "model.ptd"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_missing_ptd_is_a_clear_error(art, tmp_path):
    d = _copy_artifact(art[0], tmp_path / "a")
    (d / "model.ptd").unlink()
    with pytest.raises(ArtifactError, match="model.ptd not found"):
        Runner.load(d)


def test_mismatched_pair_is_a_clear_error(art, tmp_path):
    """A .ptd from another export of the same model: same layout, another pair_id."""
    d = _copy_artifact(art[0], tmp_path / "a")
    entry = PtdFile.open(d / "model.ptd").entries[PAIR_ID_KEY]
    with open(d / "model.ptd", "r+b") as f:
        f.seek(entry.offset)
        old = f.read(entry.nbytes)
        f.seek(entry.offset)
        f.write(bytes(b ^ 1 for b in old[:1]) + old[1:])  # same length, different id
    with pytest.raises(ArtifactError, match="does not belong to"):
        Runner.load(d)


def test_truncated_ptd_is_a_clear_error(art, tmp_path):
    d = _copy_artifact(art[0], tmp_path / "a")
    data = (d / "model.ptd").read_bytes()
    (d / "model.ptd").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.ptd is truncated"):
        Runner.load(d)


def runner_vocab(d: Path) -> int:
    from runtime.artifact import Artifact

    return Artifact.open(d).metadata.vocab_size


def test_cli_streams_text_and_ends_with_one_summary(art, tmp_path, capsys):
    from tests.test_runtime_tokenizer import make_tokenizer_json

    d = _copy_artifact(art[0], tmp_path / "a")
    make_tokenizer_json(d, runner_vocab(d))
    rc = cli_main(["--model", str(d), "--prompt", "hello the cat", "--max-new-tokens", "6", "--chat"])
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert rc == 0
    summary = out[-1]
    for part in ("TTFT", "prefill", "tok/s", "decode", "GPU peak"):
        assert part in summary, summary
    assert sum("TTFT" in line for line in out) == 1


def test_cli_reports_errors_without_a_traceback(art, tmp_path, capsys):
    from tests.test_runtime_tokenizer import make_tokenizer_json

    d = _copy_artifact(art[0], tmp_path / "a")
    make_tokenizer_json(d, runner_vocab(d))
    rc = cli_main(["--model", str(d), "--prompt", "hello " * 10_000, "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("python -m runtime: error: ") and "exported context" in err


def test_cli_stops_at_the_end_of_the_context(art, tmp_path, capsys):
    """A prompt that fits with fewer new tokens than asked: the reply runs to the context's end, with a
    note saying so (a prompt that does not fit at all is refused, above)."""
    from runtime.artifact import Artifact

    d = _copy_artifact(art[0], tmp_path / "a")
    ctx = Artifact.open(d).metadata.ctx
    ids = ",".join(["2"] + ["17"] * (ctx - 4))  # ctx - 3 tokens: room for 3
    rc = cli_main(["--model", str(d), "--prompt-ids", ids, "--max-new-tokens", "10"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"at most 3 new tokens (not 10)" in captured.err
    first = captured.out.strip().splitlines()[0]
    assert len([] if first.startswith("[load") else first.split()) <= 3, captured.out  # an EOS may end it sooner


def test_cli_runs_on_token_ids_without_a_tokenizer(art, tmp_path, capsys):
    d = _copy_artifact(art[0], tmp_path / "a")
    (d / "tokenizer.json").unlink(missing_ok=True)
    rc = cli_main(["--model", str(d), "--prompt-ids", "2,17,42", "--max-new-tokens", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out[0].split()) == 3 and all(t.isdigit() for t in out[0].split())
    rc = cli_main(["--model", str(d), "--prompt-ids", f"2,{runner_vocab(d)}", "--max-new-tokens", "3"])
    assert rc == 2 and "outside the model's vocabulary" in capsys.readouterr().err


def test_cuda_kernels_for_another_gpu_generation_are_refused(monkeypatch):
    """Kernels built for one architecture (the exporter's default) name the fix when the GPU differs."""
    from runtime.runner import check_cuda_arch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    with pytest.raises(ArtifactError, match="--multi-arch-kernels"):
        check_cuda_arch({"cuda_arch": "9.0", "multi_arch_kernels": False}, "cuda:0")
    check_cuda_arch({"cuda_arch": "8.9", "multi_arch_kernels": False}, "cuda:0")  # same arch
    check_cuda_arch({"cuda_arch": "9.0", "multi_arch_kernels": True}, "cuda:0")  # fatbins run anywhere
    check_cuda_arch({"cuda_arch": None}, "cpu")  # CPU artifacts carry none
