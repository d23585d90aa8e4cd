"""Low-memory mode end to end: the tiny artifact exported with --low-memory against the stock one.

`tiny_artifact` (stock) and `tiny_artifact_low_memory` (the same config with low_memory and
kv_in_ptd) are session-scoped fixtures in tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from export.passes import LowMemoryOptions

PROMPT = [2, 17, 99, 4, 250, 31, 8, 77, 140, 9, 63, 201, 5, 44, 123, 18, 300, 7, 66, 12]


def _runner(artifact):
    from runtime.runner import Runner

    return Runner.load(artifact.out_dir, device="cpu")


def _kv_fqns(artifact) -> set[str]:
    return {kv["fqn"] for kv in artifact.metadata["kv"]}


def test_low_memory_artifact_gives_the_stock_logits(tiny_artifact, tiny_artifact_low_memory):
    """Bitwise: the same kernels run; only where constant bytes lived during compile differs."""
    stock, low = _runner(tiny_artifact), _runner(tiny_artifact_low_memory)
    steps = [("prefill", lambda r: r.prefill(PROMPT))]  # 20 tokens: 2 chunks, wraps the rings
    steps += [(f"decode {t}", lambda r, t=t: r.decode(t)) for t in (3, 150, 42, 7)]
    for label, step in steps:
        a, b = step(stock), step(low)
        assert torch.equal(a, b), f"{label}: max |diff| {(a - b).abs().max():.3g}"


def test_low_memory_keeps_every_constant_distinct(tiny_artifact, tiny_artifact_low_memory):
    """Same AOTI constant table as stock: no same-shape KV buffers merged by dedup."""
    bound = set()
    for method in ("prefill", "decode"):
        stock = [s["constants"] for s in tiny_artifact.metadata["methods"][method]["steps"]]
        low = [s["constants"] for s in tiny_artifact_low_memory.metadata["methods"][method]["steps"]]
        assert low == stock
        bound |= {v for step in low for v in step.values()}
    assert _kv_fqns(tiny_artifact) <= bound  # (chunk buffers: prefill only)


def test_kv_bytes_are_zeros_in_the_ptd_or_left_out(tiny_artifact, tiny_artifact_low_memory):
    from export.artifact import load_ptd_tensor, read_ptd_index

    kv = _kv_fqns(tiny_artifact)
    assert kv and not kv & set(read_ptd_index(tiny_artifact.out_dir / "model.ptd"))  # default: left out
    index = read_ptd_index(tiny_artifact_low_memory.out_dir / "model.ptd")
    assert kv <= set(index)  # kv_in_ptd: present...
    for fqn in kv:
        t = load_ptd_tensor(tiny_artifact_low_memory.out_dir / "model.ptd", index[fqn])
        assert t.numel() > 0 and torch.count_nonzero(t) == 0  # ...as zeros
