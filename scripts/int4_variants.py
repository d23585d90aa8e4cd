"""Sweep of the int4 kernels' variants on the 31B shapes, in one GPU call (a tuning tool).

    python -m scripts.int4_variants [--out variants.json] [--quick]

M == 1: every `GEMV1_CONFIGS` entry x K-split count on each 31B linear shape, timed as
CUDA-graph replays over enough copies of the weight (>= 256 MB together) that every call
reads its weight from device memory, not from L2 (a decode step streams 15 GB of weights);
the best is checked against an fp32 matmul with the dequantized weight. Large M: the fused
GEMM (autotuned) against dequantize-to-bf16 + torch.mm (cuBLAS) and torch's bf16 matmul.
Prints a table per part; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from scripts import needs_cuda


def _rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def _copies(nbytes: int, floor: int = 256 << 20) -> int:
    return max(1, math.ceil(floor / nbytes))


def gemv1_sweep(shapes, gbps, rows, quick, split_counts=(1, 2, 4, 8)):
    from triton.testing import do_bench_cudagraph

    from export.kernels import int4_matmul as im
    from scripts.bench_int4 import _poison
    configs = im.GEMV1_CONFIGS[:3] if quick else im.GEMV1_CONFIGS
    kernels = {id(c): im._autotuned([c], im._int4_gemv1_kernel) for c in configs}
    print(f"\nM=1 (weights rotated over copies; us per call; % of copy bandwidth {gbps:.0f} GB/s)")
    print(f"{'shape':22} {'n':>6} {'k':>6} {'floor':>6}  best: {'cfg (BN,GR,warps)':18} {'split':>5} {'us':>7} {'%copy':>6}"
          f" {'hot us':>7} {'1-split us':>10} {'rel err':>8}")
    for name, n, k in shapes:
        g = im.group_size_for(k, 128)
        nbytes = im.int4_bytes(n, k, g) + 2 * (k + n)
        C = _copies(nbytes)
        ws = [im.quantize_int4(torch.randn(n, k, device="cuda"), g) for _ in range(min(C, 2))]
        ws = [ws[i % len(ws)] for i in range(C)]
        ws = [(q.clone(), s.clone()) for q, s in ws]  # distinct memory for every copy
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        results = []
        for cfg in configs:
            for splits in split_counts:
                if splits > 1 and (k // 8) // splits < g // 8:  # a slice holds a group at least
                    continue
                kern = kernels[id(cfg)]
                fn = lambda: [im.int4_gemv1(x, q, s, splits, kernel=kern) for q, s in ws]
                fn()
                us = do_bench_cudagraph(fn, rep=10) * 1e3 / C
                results.append((us, cfg, splits))
        us, cfg, splits = min(results, key=lambda r: r[0])
        one = min((r[0] for r in results if r[2] == 1), default=float("nan"))
        kern = kernels[id(cfg)]
        q, s = ws[0]
        hot = do_bench_cudagraph(lambda: im.int4_gemv1(x, q, s, splits, kernel=kern), rep=10) * 1e3
        x2 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)  # fresh input, poisoned output
        _poison(4 * splits * n, 2 * n)
        y = im.int4_gemv1(x2, q, s, splits, kernel=kern)
        err = _rel(y, x2.float() @ im.dequantize_int4(q, s, torch.float32).t())
        c = cfg.kwargs
        label = f"({c['BLOCK_N']},{c['GROUPS']},{cfg.num_warps})"
        print(f"{name[:22]:22} {n:6} {k:6} {nbytes / gbps / 1e3:6.1f}  {label:>24} {splits:5} {us:7.1f} "
              f"{nbytes / us / 1e3 / gbps:6.1%} {hot:7.1f} {one:10.1f} {err:8.1e}", flush=True)
        rows.append({"part": "gemv1", "name": name, "n": n, "k": k, "bytes": nbytes, "copies": C, "us": us,
                     "fraction_of_copy_bw": nbytes / us / 1e3 / gbps, "hot_us": hot, "best_one_split_us": one,
                     "config": {**c, "num_warps": cfg.num_warps}, "splits": splits, "rel_err": err,
                     "all": [{"us": u, "cfg": [cc.kwargs["BLOCK_N"], cc.kwargs["GROUPS"], cc.num_warps], "splits": sp}
                             for u, cc, sp in results]})
        del ws
        torch.cuda.empty_cache()


# (BLOCK_N, warps, K parts in a program): sm_90 registers at M == 1 80, 128, 80, 52, ~100, ~100
MMA_CONFIGS = [(64, 4, 1), (128, 4, 1), (128, 8, 1), (32, 4, 1), (8, 4, 4), (16, 4, 2)]
DEVICE = "cuda"  # a dry run of the sweep's logic on CPU (interpreter) sets "cpu"


def _mma_shape(name, n, k, ms, cands_for, split_counts, gbps, rows):
    """One shape: the op's current path and every candidate of the tensor-core GEMV at each M."""
    from triton.testing import do_bench_cudagraph

    from export.kernels import int4_matmul as im
    from scripts.bench_int4 import _poison
    g = im.group_size_for(k, 128)
    w = torch.randn(n, k, device=DEVICE)
    q0, s0 = im.quantize_int4(w, g)
    del w
    ref_w = im.dequantize_int4(q0, s0, torch.float32)
    C = _copies(im.int4_bytes(n, k, g))
    ws = [(q0.clone(), s0.clone()) for _ in range(C - 1)] + [(q0, s0)]
    bench = lambda fn, rep=5: do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3 / C
    for m in ms:
        nbytes = im.int4_bytes(n, k, g) + 2 * m * (k + n)
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        torch.ops.gemma4.int4_linear(x, q0, s0)  # autotunes the current path first
        _poison(16 * m * n * 4, 2 * m * n)
        err_op = _rel(torch.ops.gemma4.int4_linear(x, q0, s0), x.float() @ ref_w.t())
        op_us = bench(lambda: [torch.ops.gemma4.int4_linear(x, q, s) for q, s in ws], 10)
        results, worst = [], err_op
        for bn, nw, parts in cands_for(m):
            for splits in split_counts:
                if splits > 1 and ((k // 8) // splits < 16 * parts or -(-n // bn) * splits // 2 >= 4 * 132):
                    continue  # a part holds a group at least; the last split count gave 4 programs an SM
                x2 = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)  # fresh input, poisoned output
                _poison(splits * m * n * 4, 2 * m * n)
                err = _rel(im.int4_gemv_mma(x2, q0, s0, splits, bn, nw, parts), x2.float() @ ref_w.t())
                worst = max(worst, err) if err == err and worst == worst else float("nan")
                fn = lambda: [im.int4_gemv_mma(x, q, s, splits, bn, nw, parts) for q, s in ws]
                fn()
                results.append((bench(fn), (bn, nw, parts), splits, err))
        results.sort(key=lambda r: r[0])
        us, cfg, splits, err = results[0]
        second = results[1][0] if len(results) > 1 else float("nan")
        print(f"{name[:22]:22} {n:6} {k:6} {m:2} {nbytes / gbps / 1e3:6.1f} {op_us:7.1f} {nbytes / op_us / 1e3 / gbps:6.1%}"
              f"  {us:7.1f} {nbytes / us / 1e3 / gbps:6.1%} {str(cfg):>14} {splits:5} {second:7.1f} {worst:8.1e}",
              flush=True)
        rows.append({"part": "mma", "name": name, "n": n, "k": k, "m": m, "bytes": nbytes, "copies": C,
                     "op_us": op_us, "op_fraction_of_copy_bw": nbytes / op_us / 1e3 / gbps, "op_rel_err": err_op,
                     "us": us, "fraction_of_copy_bw": nbytes / us / 1e3 / gbps, "config": list(cfg),
                     "splits": splits, "max_rel_err": worst,
                     "all": [{"us": u, "cfg": list(c), "splits": sp, "rel_err": e} for u, c, sp, e in results]})
        if not worst <= 1e-2:
            print(f"  FAIL: rel err {worst:.2e} over 1e-2 ({name}, m={m})", flush=True)
    del ws, q0, s0, ref_w
    torch.cuda.empty_cache()


def mma_sweep(shapes, gbps, rows, ms=(1, 2, 4, 8), split_counts=(1, 2, 4, 8), configs=MMA_CONFIGS, top=1,
              save=lambda: None):
    """The tensor-core GEMV (`int4_gemv_mma`) beside the op's current small-M path, each timed
    as CUDA-graph replays over rotated weight copies (read from device memory), every variant
    checked first against an fp32 matmul with the dequantized weight on a fresh x with poisoned
    outputs. M == 1 first on every shape (every config x split), then M > 1 with the `top` best
    M == 1 configs of the shape x every split."""
    print(f"\nsmall M, tensor-core GEMV vs the current op (us per call over rotated copies; % of copy {gbps:.0f} GB/s)")
    print(f"{'shape':22} {'n':>6} {'k':>6} {'m':>2} {'floor':>6} {'op us':>7} {'op %':>6}  {'mma us':>7} {'mma %':>6}"
          f" {'BN,warps,parts':>14} {'split':>5} {'2nd us':>7} {'max err':>8}")
    from export.kernels import int4_matmul as im
    from scripts.bench_int4 import _poison
    # ragged edges first (N not a multiple of the tile, K slices of unequal length), no timing
    q, s = im.quantize_int4(torch.randn(1000, 4608, device=DEVICE), 128)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    bad = []
    for cfg in configs:
        for m, splits in ((1, 1), (1, 3), (3, 1), (8, 5)) if cfg is configs[0] else ((1, 1), (1, 3)):
            x = torch.randn(m, 4608, device=DEVICE, dtype=torch.bfloat16)
            _poison(splits * m * 1000 * 4, 2 * m * 1000)
            err = _rel(im.int4_gemv_mma(x, q, s, splits, *cfg), x.float() @ ref_w.t())
            rows.append({"part": "mma_check", "n": 1000, "k": 4608, "m": m, "config": list(cfg), "splits": splits,
                         "rel_err": err})
            if not err <= 1e-2:
                bad.append((cfg, m, splits, err))
    print(f"ragged-edge checks (N 1000, K 4608): {'all within 1e-2' if not bad else f'FAIL {bad}'}", flush=True)
    if 1 in ms:
        for name, n, k in shapes:
            _mma_shape(name, n, k, [1], lambda m: configs, split_counts, gbps, rows)
            save()  # after each shape: a run cut short keeps what it measured
    for name, n, k in shapes:
        if [m for m in ms if m > 1]:
            best = [r for r in rows if r.get("part") == "mma" and r.get("name") == name and r["m"] == 1]
            order = []
            for r in (best[0]["all"] if best else []):
                if tuple(r["cfg"]) not in order:
                    order.append(tuple(r["cfg"]))
            cands = order[:top] or configs[:1]
            _mma_shape(name, n, k, [m for m in ms if m > 1], lambda m: cands, split_counts, gbps, rows)
            save()


def gemm_sweep(shapes, ms, rows):
    from triton.testing import do_bench, do_bench_cudagraph

    from export.kernels import int4_matmul as im
    print(f"\nlarge M (TFLOP/s; dequant+mm = dequantize to a bf16 scratch, then torch.mm)")
    print(f"{'shape':22} {'n':>6} {'k':>6} {'m':>5} {'fused':>7} {'deq+mm':>7} {'bf16':>7} {'deq us':>7} "
          f"{'deq %bw':>7} {'fused cfg':>22} {'err fused':>9} {'err deq':>8}")
    for name, n, k in shapes:
        g = im.group_size_for(k, 128)
        w = torch.randn(n, k, device="cuda")
        q, s = im.quantize_int4(w, g)
        wb = w.bfloat16()
        del w
        ref_w = im.dequantize_int4(q, s, torch.float32)
        deq = lambda: im.int4_dequant(q, s)
        deq_us = do_bench(deq, rep=50, return_mode="median") * 1e3
        deq_bytes = im.int4_bytes(n, k, g) + 2 * n * k
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = im.int4_gemm(x, q, s)  # autotunes the fused GEMM
            ref = x.float() @ ref_w.t()
            err_f = _rel(y, ref)
            err_d = _rel(x @ deq().t(), ref)
            fused = do_bench_cudagraph(lambda: im.int4_gemm(x, q, s), rep=30) * 1e3
            dm = do_bench_cudagraph(lambda: x @ deq().t(), rep=30) * 1e3
            bf = do_bench_cudagraph(lambda: x @ wb.t(), rep=30) * 1e3
            fl = 2 * m * n * k
            best = im._KERNELS[("gemm", im.CONSUMER_ONLY, False, 0)].best_config
            print(f"{name[:22]:22} {n:6} {k:6} {m:5} {fl / fused / 1e6:7.1f} {fl / dm / 1e6:7.1f} {fl / bf / 1e6:7.1f} "
                  f"{deq_us:7.1f} {deq_bytes / deq_us / 1e3 / GBPS:7.1%} {str(best)[:22]:>22} {err_f:9.1e} {err_d:8.1e}",
                  flush=True)
            rows.append({"part": "gemm", "name": name, "n": n, "k": k, "m": m, "fused_us": fused, "dequant_mm_us": dm,
                         "bf16_us": bf, "dequant_us": deq_us, "fused_config": str(best), "rel_err_fused": err_f,
                         "rel_err_dequant_mm": err_d})
        del q, s, wb, ref_w
        torch.cuda.empty_cache()


GBPS = 0.0


def main(argv=None) -> int:
    global GBPS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("int4_variants.json"))
    ap.add_argument("--quick", action="store_true", help="three M == 1 configs, one large-M shape")
    ap.add_argument("--ms", default="128,512,2048")
    ap.add_argument("--parts", default="gemv1,gemm",
                    help="gemv1 (M == 1 sweep), mma (tensor-core GEMV, M <= 8, vs the op), gemm (large M)")
    ap.add_argument("--mma-ms", default="1,2,4,8", help="M values of the mma part")
    ap.add_argument("--gemm-shapes", default="", help="names of the large-M shapes (default: the four largest)")
    ap.add_argument("--gemv1-shapes", default="", help="names of the M == 1 shapes (default: every 31B shape)")
    ap.add_argument("--splits", default="1,2,4,8", help="K split counts the M == 1 sweep tries")
    a = ap.parse_args(argv)
    if not needs_cuda("int4_variants"):
        return 2
    import triton.testing

    from export.gemma4.config import PRESETS
    from export.kernels import int4_matmul as im
    from scripts.bench_int4 import copy_gbps, linear_shapes
    im.AUTOTUNE_KWARGS["do_bench"] = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
    GBPS = copy_gbps()
    # a graph of tiny launches: the per-kernel floor every small shape pays
    t = torch.zeros(1, device="cuda")
    launch_us = triton.testing.do_bench_cudagraph(lambda: t.add_(1), rep=10) * 1e3
    print(f"copy {GBPS:.0f} GB/s, one tiny kernel in a graph {launch_us:.2f} us ({torch.cuda.get_device_name()})")
    shapes = [(names, n, k) for (n, k), (names, _) in sorted(linear_shapes(PRESETS["31b"]).items())]
    rows: list[dict] = []
    doc = {"copy_gbps": GBPS, "launch_us": launch_us, "rows": rows}
    try:
        if "gemv1" in a.parts:
            with torch._library.triton.set_wrap_triton_enabled(False):  # launch directly: no HOP dispatch
                gemv1_sweep([sh for sh in shapes if not a.gemv1_shapes or sh[0] in a.gemv1_shapes.split(",")],
                            GBPS, rows, a.quick, [int(v) for v in a.splits.split(",")])
        if "mma" in a.parts:
            with torch._library.triton.set_wrap_triton_enabled(False):
                mma_sweep([sh for sh in shapes if not a.gemv1_shapes or sh[0] in a.gemv1_shapes.split(",")],
                          GBPS, rows, [int(v) for v in a.mma_ms.split(",")], [int(v) for v in a.splits.split(",")],
                          save=lambda: a.out.write_text(json.dumps(doc, indent=1) + "\n"))
        big = [sh for sh in shapes if sh[1] * sh[2] >= 5376 * 16384 and sh[1] < 100000
               and (not a.gemm_shapes or sh[0] in a.gemm_shapes.split(","))]
        with torch._library.triton.set_wrap_triton_enabled(False):
            if "gemm" in a.parts:
                gemm_sweep(big[:1] if a.quick else big, [int(m) for m in a.ms.split(",")], rows)
    finally:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
