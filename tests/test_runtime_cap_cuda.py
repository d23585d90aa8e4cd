"""The runner on a 31B-width slice under a per-process GPU memory cap equal to its planned
runtime budget (skipped without a GPU): decode replayed through the CUDA graph gives the
logits of the decode container's own run.

The slice is the 24 GB recipe (int4 g128 linears, int8 embedding, int4 KV on the full layer,
low-memory export) at 6 layers (5 sliding + 1 full) and ctx 8192. The cap is what a card of
the plan's runtime size leaves torch's caching allocator: the planned device total less the
CUDA context (with the kernel images, the one plan item outside the allocator;
`torch.cuda.set_per_process_memory_fraction` limits the allocator only). The plan's "allocator
reserve" (freed dequantized weights the allocator keeps cached at the prefill peak) and "kernel
workspace" stay inside the cap: the 12-layer slice reserved 6.90 GiB for a 6.40 GiB allocated
peak (scripts/measurements/runtime_31b.json), and a cap without room for that reserve failed a
prefill chunk's 441 MiB dequant scratch with 3.88 GiB allocated and 0.76 GiB reserved unallocated.

    python -m pytest -q -s -m cuda tests/test_runtime_cap_cuda.py     # on the GPU machine
"""

from __future__ import annotations

import sys

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

GiB = 1 << 30
LAYERS, CTX = 6, 8192
RECIPE = ["--kv-dtype", "int4", "--embedding-quant", "int8", "--low-memory"]
OUTSIDE_ALLOCATOR = ("cuda context",)  # plan items a card holds beside the allocator


@pytest.fixture(scope="session")
def slice_31b(tmp_path_factory):
    """(artifact dir, allocator cap in bytes, the plan's items): one export per session."""
    import subprocess
    import sys

    from scripts.bench_runtime import plan_gib

    out = tmp_path_factory.mktemp("slice_31b") / "art"
    cmd = [sys.executable, "-m", "export.gemma4", "--preset", "31b", "--layers", str(LAYERS), "--ctx", str(CTX),
           "--device", "cuda", "--no-autotune", "--out", str(out), *RECIPE]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    plan = plan_gib("31b", LAYERS, CTX, "int4", "int8", "cuda")
    cap = plan["total_gib"] - sum(plan["items"][name] for name in OUTSIDE_ALLOCATOR)
    return out, round(cap * GiB), plan


def _decode_logits(runner, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """Prefill `prompt`, then decode `feed` token by token; the logits of every step, on the CPU."""
    runner.reset()
    logits = [runner.prefill(prompt).float().cpu()]
    for token in feed:
        logits.append(runner.decode(token).float().cpu())
    return logits


@torch.no_grad()
def run_capped(out: str, cap: int, graph: bool, prompt: list[int], feed: list[int]) -> dict:
    """One runner alone in this process under the allocator cap: every step's logits and the
    reserved peak. (A process holds a runner's bound tensors until it exits: torch's AOTI
    container does not give them back, so each runner gets a process of its own.)"""
    from runtime.runner import Runner

    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    runner = Runner.load(out, cuda_graph=graph)
    assert (runner.graph is not None) == graph
    logits = _decode_logits(runner, prompt, feed)
    return {"logits": torch.stack(logits), "peak": torch.cuda.max_memory_reserved()}


def test_graph_decode_under_the_planned_cap_gives_the_container_logits(slice_31b, tmp_path):
    import subprocess

    from runtime.artifact import Artifact

    out, cap, plan = slice_31b
    meta = Artifact.open(out).metadata
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, meta.vocab_size, (2 * meta.prefill_chunk + 5,), generator=g).tolist()
    feed = torch.randint(3, meta.vocab_size, (40,), generator=g).tolist()
    runs, peaks = {}, {}
    for graph in (True, False):
        args = tmp_path / f"args_{graph}.pt"
        torch.save({"out": str(out), "cap": cap, "graph": graph, "prompt": prompt, "feed": feed}, args)
        subprocess.run([sys.executable, "-m", "tests.test_runtime_cap_cuda", str(args)], check=True)
        rec = torch.load(args.with_suffix(".out.pt"))
        runs[graph], peaks[graph] = list(rec["logits"]), rec["peak"]
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(runs[True], runs[False])]
    bitwise = all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
    print(f"cap {cap / GiB:.2f} GiB (plan: device {plan['total_gib']:.2f}, allocator {plan['allocator_gib']:.2f}); "
          f"reserved peak graph {peaks[True] / GiB:.2f}, container {peaks[False] / GiB:.2f} GiB; "
          f"{len(errors)} steps, bitwise {bitwise}, max rel err {max(errors):.2e}")
    assert max(peaks.values()) <= cap
    assert all(torch.isfinite(t).all() for t in runs[True])
    assert max(errors) <= 1e-6, errors


if __name__ == "__main__":  # the child of the test above: python -m tests.test_runtime_cap_cuda ARGS.pt
    from pathlib import Path

    path = Path(sys.argv[1])
    torch.save(run_capped(**torch.load(path)), path.with_suffix(".out.pt"))
