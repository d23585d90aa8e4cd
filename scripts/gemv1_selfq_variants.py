"""The M == 1 int4 GEMV quantizing its own x (no `_quant_x_kernel` launch) against the op's two launches, one GPU
call (a measuring tool).

    python -m scripts.gemv1_selfq_variants [--out gemv1_selfq_variants.json] [--shapes NAME:N:K,...]
        [--tiles BLOCK_N:GROUPS:WARPS,...]
    python -m scripts.gemv1_selfq_variants --smoke   # CPU: Triton's interpreter, tiny shapes, no timing

Why: at M == 1 the op launches `_quant_x_kernel` (x as two int8 levels per group, and the norms / residual / GLU
before them) and then the GEMV; a 31B 12-layer slice's decode step has 49 of each, the quantize kernels ~130 us of
its ~1.6 ms of kernel time, and each is a kernel boundary on the step's critical path. `prefetch_overlap.json`
put ~3-4 us of a mid-size projection's op path in the quantize kernel and its boundary. Here every program of the
GEMV does that work itself in its prologue: it turns all of x into the same planes (the same bits into one
scratch, QB groups a step), a CTA barrier, then the op's per-lane loop (`_gemv1_loop_q`, x read coherently as after
a PDL wait). Programs that share a K slice write identical bits, so the races are benign; the work is redundant
across the row blocks (x is 5376 elements, a weight row block 64 KB or more). Every variant runs one slice of K (the
default shapes are the one-slice plans: gate/up, the lm_heads, N >= GEMV1_LARGE_N): with K split, the quantize
kernel also zeroes the split sum's counters, which a kernel without it would need kept zeroed elsewhere.

Small weights (E2B / E4B's q / k / v, o, the per-layer gate and projection: K 256-2048, 0.1-2 MB) take the op's
other path today, one launch with bf16 x (`plan`), whose nibble arithmetic is ~82 instructions a word against the
dp4a loop's ~18 (scripts/measurements/gemv1_ncu_e2b.json): there the prologue is a few elements a thread and may pay.
`--tiles` runs `op` / `op-kernel` / `selfq` at each given tile (BLOCK_N rows x GROUPS groups a step, WARPS warps; one
slice of K), so that small weights get many programs; `plan` (the op itself, whatever path it takes) is timed beside.

Per shape: `plan` (the op's M == 1 path as it runs today, `int4_matmul._gemv1`; not in the interpreter, whose x is
fp32), and at each tile T: `op@T` (the quantize kernel and the GEMV at T), `op-kernel@T` (the GEMV alone on x already
quantized: the bound), `selfq/QB@T` for QB in --qb (one launch; every program writes all of x's planes, so at many
programs those writes grow); without --tiles the names carry no `@T`. Each a CUDA graph over rotated weight copies
(>= 256 MB, from HBM; `gemv1_variants.bench_graph`, median us per call), the variants alternated over --rounds; correctness: each selfq output bitwise `op@T`'s (same planes, same loop), `op@T` and `plan` against an
fp32 matmul on the dequantized weight. The copy bandwidth is measured in the same run. Table on stdout, JSON with
`copy_gbps` and `rows` (`shape`, `n`, `k`, `bytes`, per variant `us` and `fraction_of_copy_bw`, `bitwise`,
`rel_err`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv[1:]:
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from export.kernels import int4_matmul as im  # noqa: E402
from scripts.gemv1_tile_variants import _shape_list  # noqa: E402
from scripts.gemv1_variants import _INTERPRET, DEVICE, bench_graph, launch_directly, rel, rotated_weights  # noqa: E402
from scripts.gemv1_variants import quant_x as quant_x_op  # noqa: E402

CFG = im.GEMV1_CONFIGS[0]  # `gemv1_plan`'s tile for N >= GEMV1_LARGE_N (one slice): 128 rows x 2 groups, 4 warps
SHAPES = [("31b.gate_up", 43008, 5376), ("31b.lm_head", 262144, 5376), ("26b.lm_head", 262144, 2816),
          ("e4b.lm_head", 262144, 2560)]


@triton.jit
def _selfq_kernel(x_ptr, xq_ptr, xf_ptr, xc_ptr, w_ptr, s_ptr, y_ptr, N, KW, NG, stride_ww, stride_sn,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, QB: tl.constexpr,
                  ASM: tl.constexpr):
    """One slice of K: every program quantizes all of x into the planes (`_quant_groups`, two levels), waits for
    its threads, then runs the op's per-lane loop over its BLOCK_N rows."""
    for g0 in range(0, NG, QB):
        im._quant_groups(x_ptr, x_ptr, xq_ptr, xf_ptr, xc_ptr, None, None, None, g0 + tl.arange(0, QB), NG, 0.0,
                         GROUP, QB, 2, 0, 0, 0, 0)
    tl.debug_barrier()
    WORDS: tl.constexpr = GROUP // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = (tl.arange(0, GROUPS) * WORDS)[None, :, None]
    hi = tl.full((1, GROUPS, 1), 0, tl.int32) + KW
    # PDL 2: x's planes through coherent loads (this kernel wrote them); launched without the attribute the
    # wait returns at once
    val = im._gemv1_loop_q(xq_ptr, xf_ptr, xc_ptr, w_ptr, s_ptr, offs_n, N, KW, start, hi, NG, stride_ww, stride_sn,
                           WORDS, GROUPS * WORDS, ASM, 2, 2)
    tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _tile_name(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_N']}x{k['GROUPS']}w{cfg.num_warps}"


def _tile_list(text: str) -> list:
    """'BLOCK_N:GROUPS:WARPS,...' -> one-K-part configs of `_int4_gemv1_kernel` (powers of two)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 and not int(p) & (int(p) - 1) for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r}: expected BLOCK_N:GROUPS:WARPS, powers of two")
        bn, gr, w = map(int, parts)
        out.append(im._cfg1(bn, gr, w))
    return out


def op_path(x2, q, s, cfg=CFG):
    """The op's M == 1 path for a one-slice weight: the quantize kernel, then the GEMV at cfg."""
    return im.int4_gemv1(x2, q, s, 1, kernel=im._gemv1_kernel(cfg), xq=True)


def selfq(x2, q, s, qb: int, scratch, cfg=CFG):
    """y = x2 @ dequant(W).T in one launch at cfg (one slice)."""
    N, K = q.shape[0], q.shape[1] * 2
    G = K // s.shape[1]
    xq, xf, xc = scratch
    y = torch.empty((1, N), device=x2.device, dtype=x2.dtype)
    words = q.view(torch.int32)
    _selfq_kernel[(triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)](
        x2, xq, xf, xc, words, s, y, N, K // 8, K // G, words.stride(0), s.stride(0), GROUP=G,
        BLOCK_N=cfg.kwargs["BLOCK_N"], GROUPS=cfg.kwargs["GROUPS"], QB=qb, ASM=not _INTERPRET,
        num_warps=cfg.num_warps)
    return y


def op_kernel(xb, q, s, y, cfg=CFG):
    """The op's GEMV alone on x already quantized (xb: the planes, factors, corrections)."""
    N, K = q.shape[0], q.shape[1] * 2
    G = K // s.shape[1]
    words = q.view(torch.int32)
    im._gemv1_kernel(cfg)[(triton.cdiv(N, cfg.kwargs["BLOCK_N"]), 1)](
        xb[0], xb[1], xb[2], words, s, y, y, xb[2], N, K // 8, K // G, 1, words.stride(0), s.stride(0), 0,
        GROUP=G, RED=0, XQ=True, ASM=not _INTERPRET, LEVELS=2)
    return y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: none)")
    ap.add_argument("--shapes", type=_shape_list, default=None, metavar="NAME:N:K[,...]",
                    help="weights, each run in one slice of K; default the 31B gate/up and three lm_heads")
    ap.add_argument("--tiles", type=_tile_list, default=[CFG], metavar="BLOCK_N:GROUPS:WARPS[,...]",
                    help="the GEMV's tiles for op / op-kernel / selfq (default the large weights' 128:2:4)")
    ap.add_argument("--qb", default="8,16", help="groups a prologue step, powers of two (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timing rounds (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="Triton's interpreter on the CPU, tiny shapes, no timing")
    a = ap.parse_args(argv)
    try:
        qbs = [int(v) for v in a.qb.split(",")]
    except ValueError:
        qbs = []
    if not qbs or any(v < 1 or v & (v - 1) for v in qbs):
        ap.error(f"--qb {a.qb!r}: expected comma-separated powers of two")
    shapes = a.shapes or ([("tiny", 96, 640), ("tiny2", 40, 1024)] if a.smoke else SHAPES)
    if not launch_directly("gemv1_selfq_variants"):
        return 2
    from scripts.bench_int4 import copy_gbps
    t0 = time.time()
    gbps = 1.0 if _INTERPRET else copy_gbps()
    doc = {"device": "cpu (interpreter)" if _INTERPRET else torch.cuda.get_device_name(), "copy_gbps": gbps,
           "rounds": a.rounds, "rows": []}
    print(f"copy {gbps:.0f} GB/s", flush=True)
    xdt = torch.float32 if _INTERPRET else torch.bfloat16
    ok_all = True
    for name, n, k in shapes:
        g = 128
        nbytes, ws, ref_w = rotated_weights(n, k, g)
        x = torch.randn(1, k, device=DEVICE, dtype=xdt)
        ng, xp = k // g, triton.cdiv(k // 8, 16) * 16
        scratch = [(torch.empty((4, xp), device=DEVICE, dtype=torch.int32),
                    torch.empty(ng, device=DEVICE, dtype=torch.float32),
                    torch.empty(ng, device=DEVICE, dtype=torch.int32)) for _ in ws]
        want = x.float() @ ref_w.t()
        row = {"shape": name, "n": n, "k": k, "bytes": nbytes, "copies": len(ws), "bitwise": {}, "rel_err": {}}
        xb = quant_x_op(x, g, 4)
        ys = [torch.empty((1, n), device=DEVICE, dtype=xdt) for _ in ws]
        variants = {}
        if not _INTERPRET:  # the op's own path takes bf16 x (the interpreter's x is fp32)
            row["rel_err"]["plan"] = rel(im._gemv1(x, *ws[-1]), want)
            variants["plan"] = lambda: [im._gemv1(x, qq, ss) for qq, ss in ws]
        for cfg in a.tiles:
            t = "" if cfg is CFG else "@" + _tile_name(cfg)
            y_op = op_path(x, *ws[-1], cfg)
            row["rel_err"][f"op{t}"] = rel(y_op, want)
            row["bitwise"][f"op-kernel{t}"] = bool(torch.equal(op_kernel(xb, *ws[-1], ys[-1], cfg), y_op))
            variants[f"op{t}"] = lambda cfg=cfg: [op_path(x, qq, ss, cfg) for qq, ss in ws]
            variants[f"op-kernel{t}"] = lambda cfg=cfg: [op_kernel(xb, qq, ss, ys[i], cfg)
                                                         for i, (qq, ss) in enumerate(ws)]
            for qb in qbs:
                row["bitwise"][f"selfq/{qb}{t}"] = bool(torch.equal(selfq(x, *ws[-1], qb, scratch[-1], cfg), y_op))
                variants[f"selfq/{qb}{t}"] = (lambda qb=qb, cfg=cfg: [selfq(x, qq, ss, qb, scratch[i], cfg)
                                                                      for i, (qq, ss) in enumerate(ws)])
        ok_all &= all(row["bitwise"].values()) and max(row["rel_err"].values()) <= 1e-2
        times = {v: [] for v in variants}
        for _ in range(1 if _INTERPRET else a.rounds):
            for v, fn in variants.items():
                times[v].append(bench_graph(fn, len(ws)))
        for v, ts in times.items():
            us = sorted(ts)[len(ts) // 2]
            row[v] = {"us": us, "fraction_of_copy_bw": nbytes / gbps / 1e3 / us, "rounds": ts}
        doc["rows"].append(row)
        print(f"{name:14} floor {nbytes / gbps / 1e3:7.1f} us | " + " | ".join(
            f"{v} {row[v]['us']:7.1f} ({row[v]['fraction_of_copy_bw']:.0%})" for v in variants)
            + f" | bitwise {row['bitwise']} | err {max(row['rel_err'].values()):.1e}", flush=True)
        if a.out:
            a.out.write_text(json.dumps(doc, indent=1) + "\n")
        del ws, scratch, ys
    doc["checks_passed"], doc["seconds"] = ok_all, round(time.time() - t0, 1)
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"checks {'passed' if ok_all else 'FAILED'}; {doc['seconds']:.0f} s", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
