"""The planner against the GPU (skipped without one): export and run the 31B 6-layer slice
under a per-process allocator cap equal to the budget; the measured peaks stay under the cap
and within 5% of the plan.

    python -m pytest -m cuda tests/test_planner_cuda.py        # on the GPU machine
    PLANNER_SNAPSHOT=export.pickle.gz python -m pytest ...     # also dump the export's allocator
                                                               # history (scripts/plot_memory_timeline.py)
"""

from __future__ import annotations

import gzip
import os
import pickle

import pytest
import torch

GiB = 1 << 30
CTX = 32768
BUDGET = 8 * GiB  # a card this size: the plan says the slice's runtime (6.9 GiB) and export (3.3 GiB) fit


@pytest.mark.cuda
@pytest.mark.slow
def test_slice_exports_and_runs_within_budget_and_plan(tmp_path):
    from export.gemma4.export import DeviceChoice, ExportConfig, export_model
    from export.gemma4.planner import CUDA_CONTEXT_BYTES, PlanInputs, plan
    from export.gemma4.config import PRESETS
    from export.gemma4.quant import LinearQuant
    from runtime.runner import Runner

    cfg = ExportConfig(preset="31b", layers=6, ctx=CTX, prefill_chunk=128, quant=LinearQuant.INT4, group_size=32,
                       device=DeviceChoice.CUDA, autotune=False, low_memory=True, out=tmp_path / "art")
    p = plan(PlanInputs(PRESETS["31b"].with_layers(6), ctx=CTX, prefill_chunk=128, linear="int4", group_size=32,
                        embedding="none", dtype="bfloat16", low_memory=True))
    assert p.export_gpu.total_bytes <= BUDGET and p.runtime_gpu.total_bytes <= BUDGET
    cap = BUDGET - CUDA_CONTEXT_BYTES  # the allocator's share of the card
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    snapshot = os.environ.get("PLANNER_SNAPSHOT")
    try:
        torch.cuda.reset_peak_memory_stats()
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000, context=None, stacks="python")
        export_model(cfg)
        export_peak = torch.cuda.max_memory_allocated()
        if snapshot:
            with gzip.open(snapshot, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            torch.cuda.memory._record_memory_history(enabled=None)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runner = Runner.load(cfg.out_dir)
        prompt = list(range(3, 3 + 300))  # three prefill chunks, then decode
        list(runner.generate(prompt, 8, stop_ids=()))
        run_peak = torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"export allocator peak {export_peak / GiB:.3f} GiB (plan {p.export_gpu_low_memory.allocator_bytes / GiB:.3f}), "
          f"runtime {run_peak / GiB:.3f} GiB (plan {p.runtime_gpu.allocator_bytes / GiB:.3f}), cap {cap / GiB:.2f}")
    assert export_peak <= cap and run_peak <= cap
    assert export_peak == pytest.approx(p.export_gpu_low_memory.allocator_bytes, rel=0.05)
    assert run_peak == pytest.approx(p.runtime_gpu.allocator_bytes, rel=0.05)
