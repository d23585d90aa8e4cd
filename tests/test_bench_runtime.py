"""The arithmetic of scripts/bench_runtime.py's KV-dtype sweep: which slices extrapolate, the
whole-model extrapolation and floor, the bytes a decode step reads, the prefill-time model that
decides whether a long fill fits the time budget, and the planner figures it reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scripts.bench_runtime import PrefillModel, decode_read_bytes, extrapolate_ms, floor_ms, plan_gib, slice_scale


def test_slices_with_the_models_pattern_extrapolate():
    assert slice_scale("31b", 12) == 5  # 10 sliding + 2 full of 50 + 10
    assert slice_scale("31b", 6) == 10
    assert slice_scale("31b", None) == 1
    assert slice_scale("31b", 4) == 0  # four sliding layers, no full one
    assert slice_scale("31b", 7) == 0


def test_extrapolation_scales_the_layers_not_the_head():
    # slice: 2 ms head + 10 ms of layers; five slices' layers + one head
    assert extrapolate_ms(12.0, 2.0, 5) == pytest.approx(52.0)
    read = {"layer_weights": 300, "kv": 100, "other_weights": 50}
    assert floor_ms(read, 5, 1e6) == pytest.approx(((450) / 1e3, (5 * 400 + 50) / 1e3))


def _fake_runner():
    """Two layers (sliding ring of 8 slots, full cache of 64), an embedding and a head."""
    entries = {"embed_tokens.weight": (0, 100), "layers.0.mlp.w": (100, 10), "layers.1.mlp.w": (200, 20),
               "lm_head.weight": (300, 30)}
    ptd = SimpleNamespace(entries={k: SimpleNamespace(offset=o, dtype=torch.uint8, shape=(n,))
                                   for k, (o, n) in entries.items()})
    weights = {(o, torch.uint8, (n,)): torch.zeros(n, dtype=torch.uint8) for o, n in entries.values()}
    kv = [SimpleNamespace(fqn="layers.0.k", shape=(1, 2, 8, 4), kind="sliding"),
          SimpleNamespace(fqn="layers.1.k", shape=(1, 1, 64, 4), kind="full")]
    bound = SimpleNamespace(weights=weights, kv={b.fqn: torch.zeros(b.shape, dtype=torch.bfloat16) for b in kv})
    return SimpleNamespace(artifact=SimpleNamespace(ptd=ptd), _bound=bound, meta=SimpleNamespace(kv=kv))


def test_decode_reads_the_weights_but_the_embedding_and_the_filled_kv():
    runner = _fake_runner()
    read = decode_read_bytes(runner, pos=20, window=6)
    assert read["layer_weights"] == 30 and read["other_weights"] == 30  # the embedding is gathered
    # sliding: the window (6 slots of 2 heads x 4 x 2 B); full: positions 0..20
    assert read["kv"] == 6 * 2 * 4 * 2 + 21 * 1 * 4 * 2
    assert decode_read_bytes(runner, pos=2, window=6)["kv"] == 3 * 2 * 4 * 2 + 3 * 4 * 2


def test_decode_reads_only_the_chosen_experts_share_of_each_stack():
    runner = _fake_runner()
    entries = runner.artifact.ptd.entries
    entries["layers.1.experts.gate_up_proj.qweight"] = SimpleNamespace(offset=400, dtype=torch.uint8, shape=(128,))
    runner._bound.weights[(400, torch.uint8, (128,))] = torch.zeros(128, dtype=torch.uint8)
    assert decode_read_bytes(runner, pos=2, window=6)["layer_weights"] == 30 + 128
    assert decode_read_bytes(runner, pos=2, window=6, expert_fraction=8 / 128)["layer_weights"] == 30 + 8


def test_prefill_model_recovers_a_linear_per_token_cost():
    a, b = 1e-4, 2e-9  # seconds per token at position p: a + b p

    def total(n):
        return a * n + b * n * n / 2

    m = PrefillModel()
    assert m.estimate(0, 1000) == 0.0  # nothing timed yet: run the first fill
    m.add(2048, total(2048))
    m.add(32768, total(32768))
    assert m.estimate(32768, 131072) == pytest.approx(total(131072) - total(32768), rel=1e-9)


def test_plan_figures_come_from_the_export_cli():
    plan = plan_gib("31b", 12, 131072, "int4", "int8", "cuda")
    assert plan["total_gib"] > plan["allocator_gib"] > 0
    assert {"cuda context", "kernel workspace"} <= set(plan["items"])
    assert "--layers 12" in plan["command"]


def test_sweep_exports_at_the_whole_models_chunk():
    from scripts.bench_runtime import full_model_chunk

    chunk, why = full_model_chunk("31b", 131072, "int8")  # the 24 GB recipe: 21.97 GiB at 2048
    assert chunk == 2048 and "--kv-dtype int4" in why and "of 22.00 GiB" in why
    assert full_model_chunk("31b", 1024, "int8")[0] == 1024  # never above ctx


def _pair(n):
    import torch

    if n < 0:
        raise ValueError("negative")
    return {"ids": [n, n + 1], "logits": torch.arange(n, dtype=torch.bfloat16)}


def test_in_child_returns_tensors_and_reports_errors():
    import torch

    from scripts.bench_runtime import in_child

    out = in_child(_pair, 3)
    assert out["ids"] == [3, 4] and torch.equal(out["logits"], torch.arange(3, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="ValueError: negative"):
        in_child(_pair, -1)


def test_chain_reference_is_cuda_only():
    from scripts.bench_runtime import chain_reference_us

    assert chain_reference_us("cpu") is None


@pytest.mark.cuda
def test_chain_reference_times_a_checked_chain_on_cuda():
    """A replayed chain of 400 dependent kernels, every replay's sums checked: a figure of a few us a kernel."""
    from scripts.bench_runtime import chain_reference_us

    us = chain_reference_us("cuda")
    assert us is not None and 0.2 < us < 50, us
