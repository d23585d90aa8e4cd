"""The M == 1 int4 op's kernels on the 31B's (and E2B's) decode shapes, for Nsight Compute's counters.

    ncu --profile-from-start off --set full --clock-control none -o REPORT \\
        python -m scripts.ncu_gemv1 [--shapes o,qkv,down,gate_up,lm_head]
    python -m scripts.ncu_gemv1 --summarize DETAILS.csv DETAILS.txt SASS.csv --out JSON   # no GPU

Each shape's weight is quantized from random normal values and the op (`gemma4::int4_linear`, the
quantize kernel and `_int4_gemv1_kernel` at its `gemv1_plan`) runs twice unprofiled (compile,
warm), then once between `cudaProfilerStart` and `cudaProfilerStop`: the report holds one call's
kernels per shape, each replayed by ncu with the caches flushed (its default), so the GEMV reads
its weight from device memory as decode does. Before the profiled calls the output is checked
against an fp32 matmul with the dequantized weight (rel err <= 1e-2). `bash scripts/measure_gpu.sh
ncu_gemv1` runs it and writes the report's pages (details, per-instruction source counters) as CSV;
`--summarize` turns those into a JSON of each kernel's headline metrics (duration, DRAM throughput,
occupancy, registers, issue and stall cycles) and its SASS lines with the most stall samples.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

METRICS = ("Duration", "DRAM Throughput", "Memory Throughput", "Elapsed Cycles", "SM Active Cycles", "Grid Size",
           "Block Size", "Registers Per Thread", "Theoretical Active Warps per SM", "Achieved Active Warps Per SM",
           "Issue Slots Busy", "Warp Cycles Per Issued Instruction", "Executed Instructions", "No Eligible",
           "L2 Hit Rate")

SHAPES = {  # name: (N, K), the 31B's joined M == 1 linears (scripts/bench_int4.py names them)
    "o": (5376, 8192), "o_full": (5376, 16384), "qkv": (16384, 5376), "qk_full": (18432, 5376),
    "down": (5376, 21504), "gate_up": (43008, 5376), "lm_head": (262144, 5376),
    # E2B's: small weights through the one-launch bf16-x path (q / k / v joined, o), larger through the quantize kernel
    "e2b_qkv": (2560, 1536), "e2b_o": (1536, 2048), "e2b_gate_up": (12288, 1536), "e2b_down": (1536, 6144),
}


def _number(v: str):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return v


def _stall_tables(text: Path) -> list[dict]:
    """The 'Warp State (All Cycles)' table of each kernel in ncu's `--page details --print-details all`
    text, in launch order: {reason: cycles per issued instruction}."""
    tables, cur = [], None
    for line in text.read_text().splitlines():
        if "Table Name : Warp State (All Cycles)" in line:
            cur = {}
            tables.append(cur)
        elif cur is not None:
            f = line.split()
            if f and f[0] == "Stall" and len(f) >= 3:
                cur[" ".join(f[1:-2])] = _number(f[-1])
            elif f and not f[0].startswith("-") and f[0] not in ("Metric", "Selected"):
                cur = None
    return tables


def summarize(details: Path, text: Path, sass: Path, top: int = 12) -> list[dict]:
    """Each profiled kernel (in launch order) from ncu's `--page details --csv`, `--page details
    --print-details all` and `--page source --csv --print-source sass` exports: METRICS, the warp stall
    reasons (cycles per issued instruction) and the `top` SASS lines by stall samples (with their share of
    the kernel's samples)."""
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(details.open()):
        k = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"], "grid": r["Grid Size"], "block": r["Block Size"]})
        if r["Metric Name"] in METRICS:
            k[r["Metric Name"]] = _number(r["Metric Value"])
    for k, stalls in zip(kernels.values(), _stall_tables(text)):
        k["stalls"] = stalls
    blocks, cur = [], None
    for r in csv.reader(sass.open()):
        if r and r[0] == "Kernel Name":
            cur = []
            blocks.append(cur)
        elif cur is not None:
            cur.append(r)
    out = list(kernels.values())
    for k, rows in zip(out, blocks):
        hdr, body = rows[0], rows[1:]
        si, ni = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
        samples = [(int(r[si]) if r[si].isdigit() else 0, i, r) for i, r in enumerate(body)]
        total = sum(x for x, _, _ in samples) or 1
        k["sass_lines"] = len(body)
        k["top_stall_lines"] = [{"line": i, "sass": r[1].strip(), "samples": x, "share": round(x / total, 3),
                                 "executed": _number(r[ni])} for x, i, r in sorted(samples, reverse=True)[:top]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="o,qkv,down,gate_up",
                    help=f"comma-separated, of {','.join(SHAPES)} (with --summarize: those of the profiled run)")
    ap.add_argument("--summarize", nargs=3, metavar=("DETAILS_CSV", "DETAILS_TXT", "SASS_CSV"), type=Path,
                    help="no GPU: ncu's details page (CSV and --print-details all text) and SASS source page (CSV) "
                         "into a JSON summary (--out)")
    ap.add_argument("--out", type=Path, help="the summary's JSON path (with --summarize)")
    ap.add_argument("--labels", default=None,
                    help="with --summarize: comma-separated labels of the profiled calls in order (default: "
                         "--shapes), each --per-label kernels long (another script's report: decode attention's)")
    ap.add_argument("--per-label", type=int, default=2, help="with --labels: kernels per label (default 2)")
    args = ap.parse_args(argv)
    if args.summarize:
        missing = [str(p) for p in args.summarize if not p.is_file()]
        if missing or not args.out:
            ap.error(f"--summarize: no such file {', '.join(missing)}" if missing else "--summarize needs --out")
        kernels = summarize(*args.summarize)
        names = (args.labels or args.shapes).split(",")  # the profiled calls
        per = max(1, args.per_label)
        call = 0
        for i, k in enumerate(kernels):
            if args.labels:  # another script's calls: --per-label kernels each
                call = i // per
            k["shape"] = names[call] if call < len(names) else None
            if not args.labels and "gemv1" in k["kernel"]:  # a call of the op ends with its GEMV (small weights:
                call += 1  # the GEMV alone; others the quantize kernel first)
        source = "ncu --set full --clock-control none" + ("" if args.labels else ", `python -m scripts.ncu_gemv1`")
        doc = {"source": source, "shapes": {n: SHAPES.get(n) for n in names}, "kernels": kernels}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        for k in doc["kernels"]:
            warps = f"{k.get('Achieved Active Warps Per SM')}/{k.get('Theoretical Active Warps per SM')}"
            print(f"{k['shape'] or '?':8} {k['kernel'][:20]:20} grid {k['grid']:>12} {k.get('Duration')} us  "
                  f"DRAM {k.get('DRAM Throughput')}%  warps {warps}  "
                  f"long scoreboard {k.get('stalls', {}).get('Long Scoreboard')} of "
                  f"{k.get('Warp Cycles Per Issued Instruction')} cycles an instruction")
        return 0
    names = args.shapes.split(",")
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {','.join(unknown)}; choose from {','.join(SHAPES)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    from export.kernels.int4_matmul import dequantize_int4, gemv1_plan, int4_linear, quantize_int4

    calls = []
    for name in names:
        n, k = SHAPES[name]
        qweight, scales = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            y = int4_linear(x, qweight, scales)
        ref = x.float() @ dequantize_int4(qweight, scales, torch.float32).t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        plan = gemv1_plan(n, k, 128)
        print(f"{name:8} [{n} x {k}] plan {plan.cfg.kwargs} warps {plan.cfg.num_warps} splits {plan.splits} "
              f"xq {plan.xq} levels {plan.levels}  rel err {err:.2e}", flush=True)
        if not err <= 1e-2:
            raise SystemExit(f"FAIL {name}: rel err {err:.3e} > 1e-2")
        calls.append((x, qweight, scales))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for x, qweight, scales in calls:
        int4_linear(x, qweight, scales)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
