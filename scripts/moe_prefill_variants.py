"""The 26B-A4B's MoE prefill kernels with fixed configs (a measuring tool, one GPU call): the routing logits
(`_route_logits_kernel`), the counting sort (`_align_kernel`, one program, and `sort_entries`' three
many-program kernels) and the grouped int4 GEMMs (`_grouped_kernel`, gate / up then down), each config
launched directly, CUDA-graph timed (median), beside the configs the op's pools hold. CUDA only.

    python -m scripts.moe_prefill_variants [--ms 2048,512] [--out moe_prefill_variants.json]
    python -m scripts.moe_prefill_variants --ms 2048,512 --align-only --out moe_align_variants.json

Why: the 26B-A4B prefills a 2048-token prompt at ~8.8k tok/s where the dense 31B, eight times its active
weights, does ~9k (scripts/measurements/variants.json, runtime_31b.json): its MoE block at M = 2048 took 4.5 ms a
layer in scripts/measurements/moe_kernels.json (the grouped GEMMs ~50 TFLOP/s, the routing 464 us against 137 for
the same routing in aten ops), and an export without autotune ran the smallest config of each pool then.
Correctness: each config's routing logits within 1e-5 of an fp32 matmul, each grouped pair's output within 1e-2
of the fp32 reference on the dequantized weights (`moe_experts_reference`); a config Triton cannot fit is listed
as skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from export.kernels import moe_int4 as mi
from scripts import needs_cuda
from scripts.bench_moe import _time_ms, copy_gbps, make_layer

ROUTE = [(16, 16, 128, 4, 2), (16, 32, 128, 4, 2), (32, 32, 64, 4, 3), (64, 32, 64, 4, 3), (64, 64, 64, 4, 3),
         (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (128, 32, 64, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 2),
         (32, 64, 64, 4, 3), (64, 32, 128, 4, 2)]  # BLOCK_T, BLOCK_E, BLOCK_H, warps, stages
GROUPED = [(16, 64, 64, 4, 3, 0), (64, 64, 64, 4, 3, 0), (64, 128, 64, 4, 3, 0), (128, 64, 64, 4, 3, 0),
           (128, 128, 64, 8, 2, 0), (64, 128, 64, 4, 3, 1), (128, 128, 64, 8, 2, 1),
           (128, 128, 64, 8, 3, 0), (128, 128, 128, 8, 2, 0), (128, 64, 128, 4, 3, 0), (64, 128, 128, 4, 2, 0),
           (128, 256, 64, 8, 2, 0), (64, 256, 64, 8, 3, 0), (128, 128, 128, 8, 2, 1), (128, 64, 128, 8, 3, 1),
           (256, 64, 64, 8, 2, 0), (128, 128, 32, 8, 4, 0),
           (64, 128, 128, 4, 3, 1), (64, 64, 128, 4, 3, 1), (128, 64, 64, 4, 3, 1), (64, 128, 64, 8, 3, 1),
           (64, 128, 64, 4, 4, 1), (32, 128, 64, 4, 3, 1)]  # TILE, BLOCK_N, BLOCK_K, warps, stages, JOIN
# (the op's pool, GROUPED_CONFIGS, lists its measured one first; BLOCK_K 128 fits gate / up's groups only)
ALIGN = [(128, 4), (128, 8), (128, 16), (64, 4), (64, 8), (256, 8), (256, 16), (32, 4)]  # BLOCK, warps


def _ms(fn) -> float:
    return _time_ms(fn, "cuda")  # CUDA-graph replays, bench_moe's timing


def route_rows(layer, x, rows):
    N, H = x.shape
    E = layer["E"]
    splits = triton.cdiv(H, mi.ROUTE_H_SLICE)
    want = (x.float() * layer["scale"].float()) @ layer["proj"].float().t()
    for bt, be, bh, w, s in ROUTE:
        part = torch.empty((splits, N, E), device=x.device, dtype=torch.float32)
        ss = torch.empty((splits, N), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, bt), triton.cdiv(E, be), splits)

        def run():
            mi._route_logits_kernel[grid](x, layer["scale"], layer["proj"], part, ss, N, H, E, mi.ROUTE_H_SLICE,
                                          x.stride(0), layer["proj"].stride(0), BLOCK_T=bt, BLOCK_E=be, BLOCK_H=bh,
                                          num_warps=w, num_stages=s)
        tag = f"t{bt}e{be}h{bh}w{w}s{s}"
        try:
            run()
        except Exception as e:  # noqa: BLE001 (out of resources on this GPU: listed, not fatal)
            rows.append({"kernel": "route_logits", "m": N, "config": tag, "skipped": str(e)[:120]})
            continue
        err = ((part.sum(0) - want).norm() / want.norm()).item()
        assert err < 1e-5, (tag, err)
        us = _ms(run) * 1e3
        rows.append({"kernel": "route_logits", "m": N, "config": tag, "us": us, "rel_err": err,
                     "tflops": 2 * N * H * E / us / 1e6})


def sort_rows(idx, E, rows):
    """The counting sort at each BLOCK / warps (`_align_kernel`, one program) and as `sort_entries`' three
    many-program kernels, each bitwise the first's: -> (sorted entries, row offsets)."""
    N, K = idx.shape
    NK, e_p2 = N * K, triton.next_power_of_2(E)
    srt = torch.empty((NK,), device=idx.device, dtype=torch.int32)
    row_off = torch.empty((E + 1,), device=idx.device, dtype=torch.int32)
    mi._align_kernel[(1,)](idx, srt, row_off, NK, E, BLOCK=mi.ALIGN_BLOCK, E_P2=e_p2)
    want_srt, want_off = srt.clone(), row_off.clone()
    runs = {f"block{b}w{w}": (lambda b=b, w=w: mi._align_kernel[(1,)](idx, srt, row_off, NK, E, BLOCK=b, E_P2=e_p2,
                                                                        num_warps=w)) for b, w in ALIGN}
    runs[f"parallel{mi.SORT_BLOCK}"] = lambda: mi.sort_entries(idx, srt, row_off, E, parallel=True)
    for tag, f in runs.items():
        srt.zero_()
        f()
        assert torch.equal(srt, want_srt) and torch.equal(row_off, want_off), tag
        rows.append({"kernel": "align", "m": N, "config": tag, "us": _ms(f) * 1e3})
    return srt, row_off


def grouped_rows(layer, x, weights, idx, srt, row_off, rows):
    N, H = x.shape
    E, I, K = layer["E"], layer["I"], layer["top_k"]
    gu_q, gu_s, d_q, d_s = layer["stacks"]
    g_gu, g_d = mi._groups(gu_s, d_s, H, I)
    NK = N * K
    e_p2 = triton.next_power_of_2(E)
    want = mi.moe_experts_reference(x.float(), weights, idx, gu_q, gu_s, d_q, d_s).float()
    flops_gu, flops_d = 2 * NK * H * 2 * I, 2 * NK * I * H
    for t, bn, bk, w, s, j in GROUPED:
        tag = f"t{t}n{bn}k{bk}w{w}s{s}" + ("j" if j else "")
        if g_gu % bk:
            continue
        act = torch.empty((NK, I), device=x.device, dtype=x.dtype)
        out = torch.empty((NK, H), device=x.device, dtype=torch.float32)
        kw = dict(TOP_K=K, FP32=False, E_P2=e_p2, TILE=t, BLOCK_N=bn, BLOCK_K=bk, JOIN=bool(j), num_warps=w,
                  num_stages=s)
        kw_d = kw  # down's group (64 at 26B-A4B's I = 704) may not take this BLOCK_K: then the op's config
        if g_d % bk:
            c = next(c for c in mi.GROUPED_CONFIGS if g_d % c.kwargs["BLOCK_K"] == 0)
            kw_d = dict(kw, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            tag += "+opdown"

        def gate_up():
            mi._grouped_kernel[(triton.cdiv(NK, t) + E, triton.cdiv(I, bn))](
                x, srt, row_off, gu_q, gu_s, weights, act, I, H, E, x.stride(0), gu_q.stride(0), gu_q.stride(1),
                gu_s.stride(0), gu_s.stride(1), act.stride(0), 16384, GATE_UP=True, GROUP=g_gu, **kw)

        def down():
            mi._grouped_kernel[(triton.cdiv(NK, kw_d["TILE"]) + E, triton.cdiv(H, kw_d["BLOCK_N"]))](
                act, srt, row_off, d_q, d_s, weights, out, H, I, E, act.stride(0), d_q.stride(0), d_q.stride(1),
                d_s.stride(0), d_s.stride(1), out.stride(0), 16384, GATE_UP=False, GROUP=g_d, **kw_d)
        try:
            gate_up()
            down()
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": "grouped", "m": N, "config": tag, "skipped": str(e)[:120]})
            continue
        got = out.view(N, K, H).sum(1)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, (tag, err)
        us_gu, us_d = _ms(gate_up) * 1e3, _ms(down) * 1e3
        rows.append({"kernel": "grouped", "m": N, "config": tag, "us_gate_up": us_gu, "us_down": us_d,
                     "us": us_gu + us_d, "tflops_gate_up": flops_gu / us_gu / 1e6, "tflops_down": flops_d / us_d / 1e6,
                     "rel_err": err})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="2048,512")
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--out", type=Path, default=Path("moe_prefill_variants.json"))
    ap.add_argument("--align-only", action="store_true", help="only the counting sort's variants")
    args = ap.parse_args(argv)
    if not needs_cuda("moe_prefill_variants"):
        return 2
    dev, dt = "cuda", torch.bfloat16
    doc = {"device": torch.cuda.get_device_name(), "preset": args.preset, "copy_gbps": copy_gbps(dev),
           "pools": {"route": [str(c) for c in mi.ROUTE_CONFIGS], "grouped": [str(c) for c in mi.GROUPED_CONFIGS]},
           "rows": []}
    layer = make_layer(args.preset, 128, dev, dt)
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, layer["H"], device=dev, dtype=dt)
        weights, idx = mi.moe_route_reference(x, layer["scale"], layer["proj"], layer["per_expert_scale"],
                                              layer["top_k"], layer["eps"])
        weights, idx = weights.float().contiguous(), idx.contiguous()
        if not args.align_only:
            route_rows(layer, x, doc["rows"])
        srt, row_off = sort_rows(idx, layer["E"], doc["rows"])
        if not args.align_only:
            grouped_rows(layer, x, weights, idx, srt, row_off, doc["rows"])
        for r in doc["rows"]:
            if r["m"] == m:
                print(f"m {m:5d} {r['kernel']:13s} {r['config']:18s} "
                      + (f"{r['us']:9.1f} us" if "us" in r else f"skipped: {r['skipped']}"), flush=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
