"""Where a decode step's time goes: the kernels of an exported artifact's decode, by total time.

    python -m scripts.profile_decode --model ARTIFACT_DIR [--fill 1024] [--steps 32] [--json out.json]

Loads the artifact with the runner (eager container runs, no CUDA graph, so the profiler sees
every launch), prefills --fill tokens, then profiles --steps decode steps with torch.profiler.
Prints per kernel family (the kernel's name up to its first digit run: Triton names carry
the fused ops) the GPU time per step, its launch count per step and its share, plus the sum of
kernel time against the step's wall time (the difference is launch gaps / host work, which a
CUDA graph hides). On sm_90+ the artifact's kernels launch with programmatic dependent launch
(export/kernels/pdl.py): each starts early and waits for the one before it, and its profiled time
includes that wait. Start the process with GEMMA4_PDL_OFF=1 for each kernel's own time. A tuning
tool: its JSON is for reading, not for checks.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch


def family(name: str) -> str:
    name = re.sub(r"_\d+$", "", name)  # triton_poi_fused_add_mul_3 -> triton_poi_fused_add_mul
    return name[:90]


def kernel_profile(runner, token: int, steps: int) -> dict:
    """GPU time per kernel family over `steps` greedy decode steps from `token` of a runner without
    a CUDA graph (so the profiler sees every launch): {"kernel_ms", "launches_per_step", "rows"},
    rows by time per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = int(runner.decode(token).argmax())
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            f = per[family(ev.name)]
            f[0] += ev.device_time / steps  # us per step
            f[1] += 1 / steps
    total = sum(v[0] for v in per.values())
    rows = sorted(({"kernel": k, "us_per_step": v[0], "launches_per_step": v[1], "share": v[0] / total if total else 0.0}
                   for k, v in per.items()), key=lambda r: -r["us_per_step"])
    return {"kernel_ms": total / 1e3, "launches_per_step": sum(r["launches_per_step"] for r in rows), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="artifact directory (the export's --out)")
    ap.add_argument("--fill", type=int, default=1024, help="tokens prefilled before the profiled steps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from runtime.artifact import ArtifactError
    from runtime.runner import Runner

    try:
        runner = Runner.load(args.model, cuda_graph=False)
    except ArtifactError as e:
        print(f"profile_decode: --model {args.model}: {e}", file=sys.stderr)
        return 2
    ids = torch.randint(3, 1000, (args.fill,)).tolist()
    logits = runner.prefill(ids)
    tok = int(logits.argmax())
    for _ in range(4):  # warm-up
        tok = int(runner.decode(tok).argmax())
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        tok = int(runner.decode(tok).argmax())
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) / args.steps * 1e3
    prof = kernel_profile(runner, tok, args.steps)
    rows, total = prof["rows"], prof["kernel_ms"] * 1e3
    print(f"decode step at fill {args.fill}: wall {wall_ms:.3f} ms without a graph, kernels {total / 1e3:.3f} ms, "
          f"{sum(r['launches_per_step'] for r in rows):.0f} launches")
    print(f"{'us/step':>9} {'launch':>6} {'share':>6}  kernel")
    for r in rows[:40]:
        print(f"{r['us_per_step']:>9.1f} {r['launches_per_step']:>6.1f} {r['share']:>6.1%}  {r['kernel']}")
    if args.json:
        args.json.write_text(json.dumps({"fill": args.fill, "wall_ms_no_graph": wall_ms, "kernel_ms": total / 1e3,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
