"""What one dependent kernel costs in a replayed CUDA graph on this GPU, with and without programmatic
dependent launch (PDL): the floor under a decode step made of many small kernels (a measuring tool,
one GPU call).

    python -m scripts.launch_floor [--out launch_floor.json] [--chain 400] [--programs 1,132,264]
    python -m scripts.launch_floor --interpret [--out smoke.json]   # CPU: Triton's interpreter, a short chain

Why: E2B's decode step is 535 kernels (`profile_e2b_whole.json`), ~15 a layer, and its bytes need 0.28 ms at
the copy bandwidth where the step takes 1.8 ms; 60% of that floor would be 0.47 ms, under 0.9 us a kernel.
Whether any arrangement of today's kernels can get there depends on what a kernel costs when it does
nothing but wait for the one before, which this measures.

A chain of `--chain` launches of one kernel (`_step_kernel`), each reading the value the launch before wrote
(buf[i]) and writing buf[i] + 1 to buf[i + 1] (program 0): a true dependence, as between a decode step's
kernels. Variants, each a CUDA graph of the whole chain, replayed (median us per kernel):
- `programs`: programs per launch (1, or a GEMV's grid: 132, 264 on the H200);
- `pdl`: 0 launched plainly, 2 compiled with the wait (`export.kernels.pdl.pdl_wait`, the next kernel
  allowed to start right after it) and launched with the attribute, as the artifact's kernels are;
- `work`: none, or each program also reads 16 KiB of weights of its own (a small GEMV's share: 2.1 MiB a
  launch at 132 programs, from HBM: every launch reads other bytes) and sums them into its output, after its
  wait (`late`) or before it (`early`, PDL only: the loads overlap the kernel before, as the GEMV's first
  tiles do).
Checks: every chain ends at buf[chain] == chain after each replay, and each `work` output equals its sum
computed by torch. Copy bandwidth measured in the same run. Table on stdout, one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from export.kernels.pdl import pdl_args, pdl_wait
from scripts import needs_cuda

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
WORK_WORDS = 4096  # int32 words a program reads with `work`: 16 KiB


@triton.jit
def _step_kernel(buf_ptr, w_ptr, out_ptr, i, W: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr,
                 ASM: tl.constexpr):
    pid = tl.program_id(0)
    words = tl.arange(0, W if W > 0 else 1)
    wv = tl.zeros([W if W > 0 else 1], tl.int32)
    if W > 0 and EARLY:  # weights: constants, loaded before the wait
        wv = tl.load(w_ptr + pid * W + words)
    z = pdl_wait(PDL, ASM)
    if W > 0 and not EARLY:
        wv = tl.load(w_ptr + pid * W + words + z)
    v = tl.load(buf_ptr + i + z)
    if W > 0:
        tl.store(out_ptr + pid + z, tl.sum(wv, 0) + v)
    if pid == 0:
        tl.store(buf_ptr + i + 1 + z, v + 1)


def run_chain(buf, w, out, chain: int, programs: int, work: str, pdl: int) -> None:
    """`chain` dependent launches; with work, launch i reads its own `programs` x WORK_WORDS words of w."""
    W = WORK_WORDS if work != "none" else 0
    step = programs * WORK_WORDS
    for i in range(chain):
        wi = w[i * step:(i + 1) * step] if W else w
        oi = out[i * programs:(i + 1) * programs] if W else out
        _step_kernel[(programs,)](buf, wi, oi, i, W=W, EARLY=int(work == "early"), ASM=not _INTERPRET,
                                  num_warps=4, **pdl_args(pdl, attr=not _INTERPRET))


def check(buf, w, out, chain: int, programs: int, work: str) -> bool:
    ok = int(buf[chain]) == chain
    if work != "none":
        sums = w[: chain * programs * WORK_WORDS].view(chain * programs, WORK_WORDS).sum(1, dtype=torch.int64)
        want = (sums + torch.arange(chain, device=w.device).repeat_interleave(programs)).to(torch.int32)
        ok = ok and torch.equal(out[: chain * programs], want)  # int32 sums wrap alike
    return ok


def time_chain(chain: int, programs: int, work: str, pdl: int, reps: int) -> tuple[float, bool]:
    """(median us per kernel of the chain as graph replays, every replay's check)."""
    buf = torch.zeros(chain + 1, dtype=torch.int32, device=DEVICE)
    nw = chain * programs * WORK_WORDS if work != "none" else 1
    w = torch.randint(-1000, 1000, (nw,), dtype=torch.int32, device=DEVICE)
    out = torch.zeros(max(chain * programs, 1), dtype=torch.int32, device=DEVICE)
    if _INTERPRET:
        t = time.perf_counter()
        run_chain(buf, w, out, chain, programs, work, pdl)
        return (time.perf_counter() - t) * 1e6 / chain, check(buf, w, out, chain, programs, work)
    run_chain(buf, w, out, chain, programs, work, pdl)  # compile, warm up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_chain(buf, w, out, chain, programs, work, pdl)
    ok, times = True, []
    for _ in range(reps):
        buf.zero_()
        out.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / chain)
        ok = ok and check(buf, w, out, chain, programs, work)
    del g
    return sorted(times)[len(times) // 2], ok


def variants(programs: list[int], pdl_ok: bool) -> list[tuple[int, str, int]]:
    out = []
    for p in programs:
        for work in ("none", "late", "early"):
            for pdl in ((0, 2) if pdl_ok else (0,)):
                if work == "early" and pdl == 0:
                    continue  # before a wait that is not there: the same as late
                out.append((p, work, pdl))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.launch_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON of every row")
    ap.add_argument("--chain", type=int, default=400, help="dependent launches a graph (default 400)")
    ap.add_argument("--programs", default="1,132,264", help="programs a launch, comma-separated")
    ap.add_argument("--reps", type=int, default=15, help="graph replays a variant (median)")
    ap.add_argument("--interpret", action="store_true", help="a short chain under Triton's interpreter (CPU)")
    args = ap.parse_args(argv)
    try:
        programs = [int(p) for p in args.programs.split(",")]
    except ValueError:
        programs = []
    if not programs or min(programs) < 1 or args.chain < 1:
        ap.error(f"--programs {args.programs!r} / --chain {args.chain}: give positive integers, e.g. --programs 1,132")
    if args.interpret and not _INTERPRET:
        from scripts.gemv1_variants import main_in_interpreter

        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--interpret"]
        return main_in_interpreter("scripts.launch_floor", rest + ["--chain", "3", "--programs", "1,2", "--reps", "1"])
    if not _INTERPRET and not needs_cuda("launch_floor", "--interpret runs it on the CPU"):
        return 2
    pdl_ok = _INTERPRET or torch.cuda.get_device_capability()[0] >= 9
    rows = []
    for p, work, pdl in variants(programs, pdl_ok):
        us, ok = time_chain(args.chain, p, work, pdl, args.reps)
        rows.append({"programs": p, "work": work, "pdl": pdl, "us_per_kernel": us, "ok": ok,
                     "work_bytes_per_kernel": p * WORK_WORDS * 4 if work != "none" else 0})
        print(f"programs {p:4d}  work {work:5s}  pdl {pdl}  {us:7.2f} us/kernel  {'ok' if ok else 'WRONG'}")
    from scripts.bench_runtime import copy_bandwidth

    doc = {"device": "interpreter" if _INTERPRET else torch.cuda.get_device_name(), "chain": args.chain,
           "copy_gbps": None if _INTERPRET else copy_bandwidth(DEVICE) / 1e9, "rows": rows}
    if doc["copy_gbps"]:
        print(f"copy bandwidth {doc['copy_gbps']:.0f} GB/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
