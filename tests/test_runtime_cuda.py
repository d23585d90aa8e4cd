"""The runner on CUDA: the tiny preset exported for cuda (fp32, so parity can be tight), run
through AOTIModelContainerRunnerCuda, decode replayed through a CUDA graph (the default) and
without one. Needs a GPU; skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch

from runtime.runner import Runner
from runtime.sampling import SamplingConfig
from tests.test_runtime_runner import REL_TOL, _prompt, check_parity_with_eager

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


@pytest.fixture(scope="session")
def tiny_cuda(tmp_path_factory):
    """(artifact dir, eager model on cuda with the same weights): one CUDA compile per session."""
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model, prepare_model
    from export.gemma4.quant import LinearQuant

    cfg = ExportConfig(preset="tiny", device=DeviceChoice.CUDA, dtype=DTypeChoice.FP32, quant=LinearQuant.NONE,
                       ctx=64, prefill_chunk=12, autotune=False,  # max_autotune: minutes for a test
                       out=tmp_path_factory.mktemp("tiny_cuda") / "tiny")
    export_model(cfg)
    model, _ = prepare_model(cfg)
    return cfg.out, model.eval()


@pytest.fixture(scope="module")
def cuda_runner(tiny_cuda) -> Runner:
    return Runner.load(tiny_cuda[0])  # decode through the CUDA graph


@pytest.fixture(scope="module")
def eager_runner(tiny_cuda) -> Runner:
    return Runner.load(tiny_cuda[0], cuda_graph=False)  # decode through the container's run


def test_cuda_logits_match_eager(cuda_runner, tiny_cuda):
    assert cuda_runner.device == "cuda:0" and cuda_runner.graph is not None
    assert all(t.is_cuda for t in cuda_runner._bound.weights.values())
    errors = check_parity_with_eager(cuda_runner, tiny_cuda[1])
    assert max(errors) <= REL_TOL, errors


def test_cuda_same_seed_same_text(cuda_runner):
    prompt = _prompt(11, cuda_runner.meta.vocab_size, seed=1)
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = list(cuda_runner.generate(prompt, 16, cfg, stop_ids=()))
    assert list(cuda_runner.generate(prompt, 16, cfg, stop_ids=())) == first
    assert torch.cuda.max_memory_allocated() > 0


@torch.no_grad()
def test_graph_decode_gives_the_container_decode_logits(cuda_runner, eager_runner):
    """Same prefill, then decode steps past the sliding ring's wrap fed the same tokens: the
    replayed graph's logits against the container's own run. Run twice: the graph stays valid
    across reset() (KV zeroed in place)."""
    meta = cuda_runner.meta
    n_prompt = 2 * meta.prefill_chunk + 1
    steps = meta.raw["ring_size"] + 4
    prompt = _prompt(n_prompt, meta.vocab_size, seed=3)
    worst, bitwise = 0.0, True
    for _ in range(2):
        cuda_runner.reset()
        eager_runner.reset()
        got, want = cuda_runner.prefill(prompt), eager_runner.prefill(prompt)
        for _ in range(steps):
            token = int(want.argmax())
            bitwise &= torch.equal(got, want)
            worst = max(worst, ((got - want).norm() / want.norm()).item())
            got, want = cuda_runner.decode(token), eager_runner.decode(token)
        assert cuda_runner.pos == eager_runner.pos == n_prompt + steps
    print(f"graph vs container decode over {2 * steps} steps: bitwise {bitwise}, max rel err {worst:.2e}")
    assert worst <= 1e-6


def test_graph_generate_gives_the_container_tokens(cuda_runner, eager_runner):
    """generate() with the graph: the same greedy tokens, and the same seeded samples, as
    without; a second run after the implicit reset() repeats them."""
    prompt = _prompt(9, cuda_runner.meta.vocab_size, seed=4)
    greedy = list(eager_runner.generate(prompt, 24, stop_ids=()))
    assert list(cuda_runner.generate(prompt, 24, stop_ids=())) == greedy
    assert list(cuda_runner.generate(prompt, 24, stop_ids=())) == greedy
    assert cuda_runner.last_stats.new_tokens == 24 and cuda_runner.last_stats.decode_s > 0
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=5)
    sampled = list(eager_runner.generate(prompt, 24, cfg, stop_ids=()))
    assert list(cuda_runner.generate(prompt, 24, cfg, stop_ids=())) == sampled


def test_graph_generate_reuses_a_conversations_turns(cuda_runner, eager_runner):
    """generate(..., reuse=True) with the graph: a reply's tokens (the last never fed back), then the next
    prompt holding them: only the new turn is prefilled, and the greedy tokens are the container's fresh run's;
    the graph's history holds the ids it fed from the device."""
    vocab = cuda_runner.meta.vocab_size
    first = _prompt(20, vocab, seed=6)
    reply = list(cuda_runner.generate(first, 6, stop_ids=(), reuse=True))
    assert cuda_runner.history == first + reply[:-1]
    turn = first + reply + _prompt(9, vocab, seed=7)
    again = list(cuda_runner.generate(turn, 8, stop_ids=(), reuse=True))
    assert cuda_runner.last_stats.reused_tokens == len(first) + 5
    assert again == list(eager_runner.generate(turn, 8, stop_ids=()))


def test_prefill_progress_follows_the_device(cuda_runner):
    """`progress` on CUDA: each chunk reported once the device has run it (an event waited for after the next
    chunk is queued), in order, the last with the whole prompt."""
    chunk = cuda_runner.meta.prefill_chunk
    prompt = _prompt(3 * chunk + 5, cuda_runner.meta.vocab_size, seed=8)
    seen = []
    cuda_runner.reset()
    want = cuda_runner.prefill(prompt).clone()
    cuda_runner.reset()
    got = cuda_runner.prefill(prompt, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(chunk, len(prompt)), (2 * chunk, len(prompt)), (3 * chunk, len(prompt)), (len(prompt), len(prompt))]
    assert torch.equal(got, want)


STACK_AFTER_RUN = r"""
import sys
from runtime.runner import Runner
from scripts.memory_outside import stack_limit
from tests.test_runtime_runner import _prompt
runner = Runner.load(sys.argv[1])
token = int(runner.prefill(_prompt(2 * runner.meta.prefill_chunk + 1, runner.meta.vocab_size, seed=5)).argmax())
for _ in range(4):
    token = int(runner.decode(token).argmax())
print(stack_limit())
"""


def test_no_kernel_raises_the_context_stack(tiny_cuda):
    """Every kernel compiled into the artifact fits the CUDA context's default stack a thread, and a fresh
    process that prefills and decodes still has that default: a deeper kernel would make the context reserve
    the difference for every thread the GPU holds, outside the memory plan (export/cubins.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from export.cubins import DEFAULT_STACK_BYTES, cubins, kernel_resources
    from runtime.artifact import Artifact

    artifact = Artifact.open(tiny_cuda[0])
    kernels = [{"program": p, **r} for p in artifact.metadata.programs() for c in cubins(artifact.so_blob(p))
               for r in kernel_resources(c)]
    assert kernels, "no kernel found in the programs' .so"  # the scan reads what AOTInductor embeds
    assert [r for r in kernels if r["stack"] > DEFAULT_STACK_BYTES] == []
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", STACK_AFTER_RUN, str(tiny_cuda[0])], cwd=repo, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == DEFAULT_STACK_BYTES, r.stdout


@pytest.mark.parametrize("low_memory", [False, True])
def test_raw_rows_attention_artifact_matches_the_eager_model(tmp_path, monkeypatch, low_memory):
    """The tiny preset exported for CUDA with decode attention taking the raw q / k / v rows (GEMMA4_ATTENTION_ROWS=1:
    the split kernel norms, rotates and writes the step's K / V; the KV-shared layers' q-only op) decodes through the
    CUDA graph, and without it, within REL_TOL of the eager model running the model's own ops (the switch off). Both
    runs' errors step by step in the message: the graphed run alone off points at the capture (static inputs, the
    warm-up's writes), both off at the compiled program. Low-memory mode traces a CPU copy of the model: the rows
    are taken for the target all the same."""
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model, prepare_model
    from export.gemma4.quant import LinearQuant
    from export.kernels import attention as A

    traced = []
    launch = A.rows_launch
    monkeypatch.setattr(A, "rows_launch", lambda *a, **kw: traced.append(a[1] is None) or launch(*a, **kw))
    monkeypatch.setenv(A.ATTENTION_ROWS_ENV, "1")
    cfg = ExportConfig(preset="tiny", device=DeviceChoice.CUDA, dtype=DTypeChoice.FP32, quant=LinearQuant.NONE,
                       ctx=64, prefill_chunk=12, autotune=False, out=tmp_path / "tiny", low_memory=low_memory)
    export_model(cfg)
    assert any(traced) and not all(traced), traced  # both ops in the decode units (a KV-shared layer: q only)
    monkeypatch.setenv(A.ATTENTION_ROWS_ENV, "0")  # the eager model on the model's own ops
    model, _ = prepare_model(cfg)
    errors = {graph: check_parity_with_eager(Runner.load(cfg.out, cuda_graph=graph), model.eval())
              for graph in (True, False)}
    steps = {f"graph={g}": " ".join(f"{e:.1e}" for e in errs) for g, errs in errors.items()}
    assert max(max(e) for e in errors.values()) < REL_TOL, steps
