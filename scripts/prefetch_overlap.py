"""Can a decode step hide a linear's weight read behind attention? The 31B's decode attention and the
o projection after it, with the projection's weight asked into the L2 while attention runs (a measuring
tool, one GPU call).

    python -m scripts.prefetch_overlap [--out prefetch_overlap.json] [--rounds 3] [--ctas 16,66]
    python -m scripts.prefetch_overlap --smoke   # CPU: Triton's interpreter, tiny shapes, no timing

Why: a decode step reads each weight once, one kernel after another, and every kernel has a ramp and a
tail where the HBM idles; the M == 1 GEMVs of the 31B's mid-size projections run at 42-58% of the copy
bandwidth alone (the o projection of a sliding layer: 22.7 MB in 12.7 us, its bytes' floor 5.4 us), and a
streaming read of the same bytes in one launch reaches ~70-75% (`read_ceiling_rows.json`). Decode
attention at short fills leaves the HBM idler still (a sliding layer: ~17 MB in ~8.6 us; a full layer at
fill 1k: ~4 MB in ~16 us). The o projection's weight does not depend on attention's output, so its bytes
could be on their way into the L2 (50 MB on the H200; 72 / 96 MB on the RTX 4090 / 5090) while attention
runs, and the GEMV after it read them from there. Before building that into the attention kernel (its
programs issuing the prefetches), this measures what it could give, with the prefetch as a kernel of its
own on a second stream, forked before attention and joined before the GEMV:

- `attn`: decode attention alone (`attention.launch`, as the op launches it);
- `o`: the o projection alone (`gemma4::int4_linear` at M == 1: quantize x, the GEMV);
- `attn+o`: one after the other, as a decode step runs them (the baseline);
- `attn|pf+o` (per --ctas): the same with the weight and its scales asked into the L2
  (`prefetch.global.L2::evict_last`, one request per 128-byte line, `ctas` programs) on a second stream
  beside attention;
- `pf+o`: the prefetch, then the GEMV, on one stream (the GEMV reading from the L2, plus the prefetch);
- `o+o`: the GEMV twice on the same weight (the second from the L2 where it stayed).
Each variant is a CUDA graph over `copies` rotated weights and caches (>= 256 MB of weights, so each
iteration reads its own from HBM), timed with `triton.testing.do_bench_cudagraph` (median) and divided
by the copies; the variants alternate over --rounds rounds (the median of the rounds is the figure).
Cases: a sliding layer (16 KV heads x 2, head_dim 256, bf16 ring of 1024, fill 1024) and a full layer
(4 KV heads x 8, head_dim 512, int4 cache of 131072 slots as the 24 GB recipe has it, fills 1024 and
32768), each with its o projection (5376 x 8192 / 16384, int4 group 128). Correctness: every variant's
output bitwise equal to `attn+o`'s (the prefetch moves no data), and `attn+o` against an fp32 reference
(attention's reference, the dequantized weight). The copy bandwidth is measured in the same run. Table
on stdout, JSON with `copy_gbps` and `rows` (`case`, `fill`, `weight_bytes`, `kv_bytes`, per variant
`us`, `rounds`), `saved_us` (attn+o less the best prefetch variant).

What the H200 said (scripts/measurements/prefetch_overlap.json, us per iteration, the kernels launched without
the PDL attribute): a sliding layer, attn 11.9, o 13.6, attn+o 25.6, with the prefetch beside attention 28.5-31.2
(8 / 32 / 132 programs), o+o 24.7; a full layer at fill 1k 16.7, 20.1, 39.6, 45.1-49.2, o+o 39.5; at 32k 46.5,
20.0, 67.2, 75.1-91.2. The prefetch cost more than it saved everywhere, and the reason is the last column: the
sliding layer's o projection read from the L2 (its second call) still took ~11 us of its 13.6 (quantize kernel
included), ~2 TB/s. At this size the GEMV is bound by its own latency and instruction issue, not by the HBM:
moving its bytes earlier cannot make it much faster (the 45 MB full-layer weight does not stay in the L2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv[1:]:
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)

import triton  # noqa: E402
import triton.testing  # noqa: E402
import triton.language as tl  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LINE = 128  # bytes an L2 request brings


@triton.jit
def _prefetch_kernel(ptr, n_lines, LINES: tl.constexpr, ASM: tl.constexpr):
    """Asks the L2 for n_lines 128-byte lines from ptr (bytes), LINES a program a step, the programs
    striding over the lines; nothing comes back to registers."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * LINES
    for start in range(pid * LINES, n_lines, step):
        idx = start + tl.arange(0, LINES)
        if ASM:
            p = ptr + idx.to(tl.int64) * 128
            tl.inline_asm_elementwise(
                "{ .reg .pred q; setp.lt.s32 q, $2, $3; @q prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0; }",
                "=r,l,r,r", [p, idx, n_lines], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(tensors, ctas: int):
    """The L2 requests for each tensor's bytes (contiguous), `ctas` programs of 128 lines a step."""
    for t in tensors:
        n = triton.cdiv(t.numel() * t.element_size(), LINE)
        _prefetch_kernel[(ctas,)](t.view(torch.uint8).view(-1), n, LINES=128, ASM=not _INTERPRET, num_warps=4)


def cases(smoke: bool):
    """(name, Hkv, G, D, slots, window, kv, fills, o's N)."""
    if smoke:
        return [("tiny-sliding", 2, 2, 64, 64, 64, "bf16", (64,), 96),
                ("tiny-full", 2, 4, 64, 256, 0, "int4", (100,), 96)]
    return [("31b-sliding", 16, 2, 256, 1024, 1024, "bf16", (1024,), 5376),
            ("31b-full", 4, 8, 512, 131072, 0, "int4", (1024, 32768), 5376)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: none)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timing rounds (default %(default)s)")
    ap.add_argument("--rep", type=int, default=30, help="do_bench_cudagraph rep in ms (default %(default)s)")
    ap.add_argument("--ctas", default="16,66", help="prefetch programs, comma-separated (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="Triton's interpreter on the CPU, tiny shapes, no timing")
    args = ap.parse_args(argv)
    try:
        ctas = [int(c) for c in args.ctas.split(",")]
    except ValueError:
        ap.error(f"--ctas {args.ctas!r}: expected comma-separated integers")
    from export.kernels import attention as A
    from export.kernels import int4_matmul as im
    from scripts import bench_attention as B

    result = B.variant_setup(args.smoke, "prefetch_overlap")
    if result is None:
        return 2
    dev, dt, bw = B.DEV, B.DT, result["copy_gbps"]
    result.update({"rounds": args.rounds, "ctas": ctas, "rows": []})
    t0 = time.time()
    side = torch.cuda.Stream() if not args.smoke else None
    for name, Hkv, G, D, S, window, kv, fills, n_out in cases(args.smoke):
        H, K = Hkv * G, Hkv * G * D
        wbytes = im.int4_bytes(n_out, K, 128)
        copies = 1 if args.smoke else max(2, -(-(256 << 20) // wbytes))
        weights = [im.quantize_int4(torch.randn(n_out, K, device=dev) * 0.02, 128) for _ in range(copies)]
        caches = []
        for _ in range(copies):
            k, v = B.fill_cache(Hkv, S, D, max(fills), window)
            if kv == "bf16":
                caches.append((k, v, None, None))
            else:
                (kq, ksc), (vq, vsc) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
                caches.append((kq, vq, ksc, vsc))
            del k, v
        for fill in fills:
            pos = torch.tensor([fill - 1], device=dev)
            n = min(fill, window) if window else fill
            qs = [torch.randn(1, 1, H, D, device=dev, dtype=dt) for _ in range(copies)]
            outs = [None] * copies

            def attn(i):
                kk, vv, ks, vs = caches[i]
                return A.launch(qs[i], kk, vv, ks, vs, pos, window, True)

            def o(i, a):
                return im.int4_linear(a.reshape(1, K), *weights[i])

            def v_attn():
                for i in range(copies):
                    outs[i] = attn(i)

            def v_o():
                for i in range(copies):
                    outs[i] = o(i, qs[i])

            def v_attn_o():
                for i in range(copies):
                    outs[i] = o(i, attn(i))

            def v_par(c):
                def f():
                    for i in range(copies):
                        if side is None:
                            prefetch(weights[i], c)
                            a = attn(i)
                        else:
                            side.wait_stream(torch.cuda.current_stream())
                            with torch.cuda.stream(side):
                                prefetch(weights[i], c)
                            a = attn(i)
                            torch.cuda.current_stream().wait_stream(side)
                        outs[i] = o(i, a)
                return f

            def v_pf_o():
                for i in range(copies):
                    prefetch(weights[i], ctas[-1])
                    outs[i] = o(i, qs[i])

            def v_o_o():
                for i in range(copies):
                    o(i, qs[i])
                    outs[i] = o(i, qs[i])

            variants = {"attn": v_attn, "o": v_o, "attn+o": v_attn_o,
                        **{f"attn|pf{c}+o": v_par(c) for c in ctas}, "pf+o": v_pf_o, "o+o": v_o_o}
            # correctness: the baseline against fp32, then every variant with attention bitwise the baseline
            v_attn_o()
            base = [x.clone() for x in outs]
            kk, vv, ks, vs = caches[-1]
            ref_a = B.reference(qs[-1], kk, vv, ks, vs, pos, window)
            ref = ref_a.float().reshape(1, K) @ im.dequantize_int4(*weights[-1], torch.float32).t()
            row = {"case": name, "fill": fill, "kv_dtype": kv, "copies": copies, "weight_bytes": wbytes,
                   "kv_bytes": B.kv_bytes(Hkv, D, n, kv), "rel_err": B.rel(base[-1], ref), "bitwise": {}}
            for var, fn in variants.items():
                if "|pf" in var:
                    fn()
                    if side is not None:
                        torch.cuda.synchronize()
                    row["bitwise"][var] = all(torch.equal(a, b) for a, b in zip(outs, base))
            times = {var: [] for var in variants}
            if not args.smoke:
                for _ in range(args.rounds):
                    for var, fn in variants.items():
                        fn()  # (compiled, autotuned) before the capture
                        torch.cuda.synchronize()
                        times[var].append(triton.testing.do_bench_cudagraph(fn, rep=args.rep) * 1e3 / copies)
            for var, ts in times.items():
                row[var] = {"us": sorted(ts)[len(ts) // 2] if ts else None, "rounds": ts}
            if not args.smoke:
                best = min(row[f"attn|pf{c}+o"]["us"] for c in ctas)
                row["saved_us"] = row["attn+o"]["us"] - best
            result["rows"].append(row)
            print(json.dumps({k: (v["us"] if isinstance(v, dict) and "us" in v else v) for k, v in row.items()}),
                  flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            del qs, outs, base
        del weights, caches
    result["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.smoke:
        names = list(result["rows"][0]) if result["rows"] else []
        vs = [k for k in names if isinstance(result["rows"][0][k], dict) and "us" in result["rows"][0][k]]
        print(f"\n{'case':12} {'fill':>6} " + " ".join(f"{v:>11}" for v in vs) + "  (us per iteration)")
        for r in result["rows"]:
            print(f"{r['case']:12} {r['fill']:6d} " + " ".join(f"{r[v]['us']:11.1f}" for v in vs)
                  + f"   floor o {r['weight_bytes'] / bw / 1e3:.1f}, kv {r['kv_bytes'] / bw / 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
