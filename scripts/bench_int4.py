"""int4 linears (`gemma4::int4_linear`) against the copy bandwidth, bf16 matmul and tinygemm.

    python -m scripts.bench_int4 [--models 31b,26b-a4b,e4b] [--ms 1,2,4,8,128,512,2048]
        [--group-size 128] [--consumer] [--out scripts/measurements/int4_kernels.json] [--merge]

`--merge` keeps the rows of --out for the models and M values not measured in this run (a run
limited to the M values a change touched, e.g. `--ms 1,2,4,8 --merge`); `copy_gbps` becomes
this run's, and each row carries the copy bandwidth its fraction was taken against.

First the floors: the device-to-device copy bandwidth (bytes read + written) measured in this
run, and each recipe option's bytes for the 31B linears + lm_head and its reconstruction error
on random normal weights. Then every distinct linear shape of each model (from the presets) at
each M: median time, bytes read, their fraction of the copy bandwidth,
TFLOP/s beside torch's bf16 matmul of the same shape and tinygemm (`_weight_int4pack_mm`).
Times are CUDA-graph replays (triton.testing.do_bench_cudagraph): the eager op paid ~70 us of
Python dispatch per call on the H200, which the AOTInductor-compiled artifact does not. For
M <= 8 the int4 op cycles through copies of its weight (`weight_copies`, >= 256 MB together)
so that it reads the weight from device memory as decode does, not from L2, and so does tinygemm
(copies of its packed weight); bf16 runs on one copy. The op launches its kernels without the programmatic
dependent launch attribute (as torch and AOTInductor's stock launcher do), so each call starts after the one
before has ended; the artifact's launcher sets it, and a decode step's kernels overlap (the next GEMV's first
weight tiles load while the kernel before it finishes). On sm_90+ the M == 1 rows also time the op's kernels
launched that way (`pdl_us`, `pdl_fraction_of_copy_bw`: the same calls over the same copies, one graph).
Every kernel result is checked first against an fp32 matmul with the dequantized weight on fresh
random inputs, with the allocator's free memory poisoned with NaN; a relative error over 1e-2
stops the run (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from export.gemma4.config import PRESETS, Gemma4Config
from scripts import needs_cuda

REL_TOL = 1e-2


def linear_shapes(c: Gemma4Config) -> dict[tuple[int, int], tuple[str, int]]:
    """{(n_out, k_in): (names, count in the model)} of every linear, lm_head included."""
    shapes: dict[tuple[int, int], list] = {}

    def add(name, n, k, count=1):
        names, total = shapes.get((n, k), ([], 0))
        if name not in names:
            names.append(name)
        shapes[(n, k)] = (names, total + count)

    H = c.hidden_size
    for i in range(c.num_hidden_layers):
        kind = "sliding" if c.is_sliding(i) else "full"
        q = c.num_attention_heads * c.layer_head_dim(i)
        kv = c.layer_kv_heads(i) * c.layer_head_dim(i)
        # the CUDA recipe joins the linears of one input (export/gemma4/quant.py, _join_linears)
        if c.is_kv_shared(i):
            add(f"q_proj.{kind}", q, H)
        elif c.uses_k_eq_v(i):
            add(f"qk_proj.{kind}", q + kv, H)
        else:
            add(f"qkv_proj.{kind}", q + 2 * kv, H)
        add(f"o_proj.{kind}", H, q)
        inter = c.layer_intermediate_size(i)
        add("mlp.gate_up_proj", 2 * inter, H)
        add("mlp.down_proj", H, inter)
        if c.enable_moe_block:
            add("expert.gate_up_proj", 2 * c.moe_intermediate_size, H, c.num_experts)
            add("expert.down_proj", H, c.moe_intermediate_size, c.num_experts)
        if c.has_ple:
            add("per_layer_input_gate", c.hidden_size_per_layer_input, H)
            add("per_layer_projection", H, c.hidden_size_per_layer_input)
    if c.has_ple:
        add("per_layer_model_projection", c.num_hidden_layers * c.hidden_size_per_layer_input, H)
    add("lm_head", c.vocab_size, H)
    return {s: ("+".join(names), count) for s, (names, count) in shapes.items()}


# ---- recipe options: bytes and reconstruction error ------------------------------------------


def _reconstruct(w: torch.Tensor, group: int, zero_point: bool) -> torch.Tensor:
    from export.kernels.int4_matmul import dequantize_int4, quantize_int4
    if not zero_point:
        return dequantize_int4(*quantize_int4(w, group), torch.float32)
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-12).bfloat16().float()
    zero = torch.round(-lo / scale).clamp(0, 15).bfloat16().float()
    q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(w.shape)


def recipe_options(c: Gemma4Config, device: str) -> list[dict]:
    params = sum(n * k * count for (n, k), (_, count) in linear_shapes(c).items())
    torch.manual_seed(0)
    w = torch.randn(4096, 5376, device=device)
    rows = []
    for group in (32, 128):
        for zero_point in (False, True):
            bits = 4 + 16 / group * (2 if zero_point else 1)
            err = ((_reconstruct(w, group, zero_point) - w).norm() / w.norm()).item()
            rows.append({"group_size": group, "zero_point": zero_point, "bits_per_param": bits,
                         "gib": params * bits / 8 / 2**30, "rel_err": err})
    return rows


# ---- measurements ---------------------------------------------------------------------------


def copy_gbps() -> float:
    from triton.testing import do_bench
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    nbytes = 2 * src.numel()  # read + written
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / ms / 1e6


def _poison(*nbytes: int) -> None:
    """Hand the caching allocator blocks of these sizes filled with 0xFF (NaN in bf16 and fp32)
    and free them: the op's next allocations of those sizes get them, so an unwritten output
    element reads NaN."""
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda") for n in nbytes]
    del blocks


def _tinygemm(w: torch.Tensor, group: int, copies: int):
    """[x -> y] with torch core's tinygemm int4 on w, one callable a copy of its packed weight (the same
    rotation the int4 op reads from device memory), or None where its packing refuses."""
    try:
        N, K = w.shape
        g = w.float().reshape(N, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-6)
        q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        zeros = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
        sz = torch.stack([scale.t(), zeros.t()], -1).contiguous().bfloat16()
        rot = [(packed.clone(), sz.clone()) for _ in range(copies - 1)] + [(packed, sz)]
        return [lambda x, p=p, z=z: torch.ops.aten._weight_int4pack_mm(x, p, group, z) for p, z in rot]
    except RuntimeError as e:
        print(f"  tinygemm refuses [{w.shape[0]} x {w.shape[1]}]: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None


def bench_shape(model, name, n, k, ms, group, gbps, rows):
    from triton.testing import do_bench_cudagraph

    from export.kernels.int4_matmul import (GEMV_MAX_M, _gemv1, _m1, dequantize_int4, gemv1_splits, gemv_mma_plan,
                                            gemv_splits, group_size_for, int4_bytes, int4_linear, quantize_int4)
    from export.kernels.pdl import op_pdl_mode
    group = group_size_for(k, group)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qweight, scales = quantize_int4(w, group)
    # decode reads every weight from device memory (15 GB a token): small M cycles through
    # enough copies (>= 256 MB) that no call finds its weight in L2
    copies = max(1, -(-(256 << 20) // int4_bytes(n, k, group)))
    rotation = [(qweight.clone(), scales.clone()) for _ in range(copies - 1)] + [(qweight, scales)]
    ref_w = dequantize_int4(qweight, scales, torch.float32)
    tiny = _tinygemm(w, group, copies)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        int4_linear(x, qweight, scales)  # autotune first: its trial runs write the output
        if m <= GEMV_MAX_M and group == 128:
            splits = gemv_mma_plan(n, k, m)[0]
        else:
            splits = gemv1_splits(n, k, group) if m == 1 else gemv_splits(n, k, group)[0]
        parts = splits * m * n * 4 if m <= GEMV_MAX_M else 0
        _poison(*(b for b in (parts, m * n * 2) if b))
        y = int4_linear(x, qweight, scales)
        ref = x.float() @ ref_w.t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not math.isfinite(err) or err > REL_TOL:
            raise SystemExit(f"FAIL {model} {name} [{n} x {k}] m={m}: rel err {err:.3e} > {REL_TOL}")
        # CUDA graphs: kernel time without Python's launch cost (the compiled .so has none)
        bench = lambda f: do_bench_cudagraph(f, rep=20)
        rot = rotation if m <= GEMV_MAX_M else rotation[-1:]
        us = bench(lambda: [int4_linear(x, q, s) for q, s in rot]) * 1e3 / len(rot)
        bf16_us = bench(lambda: x @ w.t()) * 1e3
        tiny_rot = (tiny if m <= GEMV_MAX_M else tiny[-1:]) if tiny is not None else None
        tiny_us = bench(lambda: [t(x) for t in tiny_rot]) * 1e3 / len(tiny_rot) if tiny is not None else None
        nbytes = int4_bytes(n, k, group) + 2 * m * (k + n)
        flops = 2 * m * n * k
        alt = {}
        if m == 1 and group == 128:  # the other M == 1 kernel (see M1_ON_TENSOR_CORES), same run
            from export.kernels.int4_matmul import M1_ON_TENSOR_CORES, gemv1_splits, int4_gemv1, int4_gemv_mma
            if M1_ON_TENSOR_CORES:
                name_alt, f_alt = "gemv1", lambda x_, q, s: int4_gemv1(x_, q, s, gemv1_splits(n, k, group))
            else:
                name_alt, f_alt = "mma", lambda x_, q, s: int4_gemv_mma(x_, q, s, *gemv_mma_plan(n, k, 1))
            x_alt = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            _poison(16 * n * 4, 2 * n)
            err_alt = ((f_alt(x_alt, qweight, scales).float() - x_alt.float() @ ref_w.t()).norm()
                       / (x_alt.float() @ ref_w.t()).norm()).item()
            alt_us = bench(lambda: [f_alt(x, q, s) for q, s in rot]) * 1e3 / len(rot)
            alt = {f"{name_alt}_us": alt_us, f"{name_alt}_fraction_of_copy_bw": nbytes / alt_us / 1e3 / gbps,
                   f"{name_alt}_rel_err": err_alt}
        if m == 1 and _m1(x, group) and op_pdl_mode(x.device):  # the op's M == 1 path as the artifact launches it
            _poison(*(b for b in (parts, m * n * 2) if b))
            y_pdl = _gemv1(x, qweight, scales, pdl_attr=True)
            err_pdl = ((y_pdl.float() - ref).norm() / ref.norm()).item()
            if not math.isfinite(err_pdl) or err_pdl > REL_TOL:
                raise SystemExit(f"FAIL {model} {name} [{n} x {k}] m=1 with PDL: rel err {err_pdl:.3e} > {REL_TOL}")
            pdl_us = bench(lambda: [_gemv1(x, q, s, pdl_attr=True) for q, s in rot]) * 1e3 / len(rot)
            alt.update({"pdl_us": pdl_us, "pdl_fraction_of_copy_bw": nbytes / pdl_us / 1e3 / gbps,
                        "pdl_rel_err": err_pdl})
        rows.append({"model": model, "name": name, "n": n, "k": k, "m": m, "us": us, "bytes": nbytes,
                     "floor_us": nbytes / gbps / 1e3, "flops": flops,
                     "gbps": nbytes / us / 1e3, "fraction_of_copy_bw": nbytes / us / 1e3 / gbps,
                     "tflops": flops / us / 1e6, "bf16_us": bf16_us, "bf16_tflops": flops / bf16_us / 1e6,
                     "tinygemm_us": tiny_us, "rel_err": err, "group_size": group, "weight_copies": len(rot),
                     "copy_gbps": gbps, **alt})
        r = rows[-1]
        print(f"{model:8} {name[:34]:34} {n:6} {k:6} {m:5} {r['floor_us']:8.1f} {us:9.1f} "
              f"{r['fraction_of_copy_bw']:6.1%} "
              f"{r['tflops']:7.1f} {r['bf16_tflops']:7.1f} {tiny_us or float('nan'):9.1f} {err:.1e}"
              + "".join(f"  {key[:-3]} {v:.1f} us {alt[key[:-3] + '_fraction_of_copy_bw']:.1%} err {alt[key[:-3] + '_rel_err']:.1e}"
                        for key, v in alt.items() if key.endswith("_us")), flush=True)


def compiled_smem() -> list[dict]:
    """Shared memory of every int4 kernel variant Triton compiled in this run (all autotune configs)."""
    from export.kernels import int4_matmul
    out = []
    fns = (int4_matmul._int4_matmul_kernel, int4_matmul._int4_gemv1_kernel, int4_matmul._int4_gemv_mma_kernel,
           int4_matmul._int4_dequant_kernel, int4_matmul._sum_splits_kernel)
    for cache in (c for fn in fns for c in fn.device_caches.values()):
        for kernel in cache[0].values():
            md = kernel.metadata
            out.append({"name": kernel.name, "shared": md.shared, "num_warps": md.num_warps,
                        "num_stages": md.num_stages})
    return out


def _write(path: Path, doc: dict) -> None:
    order = list(PRESETS)
    doc["rows"].sort(key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order), r["n"], r["k"], r["m"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="31b,26b-a4b,e4b")
    ap.add_argument("--ms", default="1,2,4,8,128,512,2048")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--consumer", action="store_true", help="autotune over the sm_89/sm_120 configs only")
    ap.add_argument("--out", type=Path, default=Path("scripts/measurements/int4_kernels.json"))
    ap.add_argument("--merge", action="store_true", help="keep --out's rows for the models and M values not run here")
    a = ap.parse_args(argv)
    if not needs_cuda("bench_int4"):
        return 2
    import triton.testing

    from export.kernels import int4_matmul
    int4_matmul.CONSUMER_ONLY = a.consumer
    int4_matmul.AUTOTUNE_KWARGS["do_bench"] = lambda fn, quantiles: triton.testing.do_bench(
        fn, warmup=5, rep=20, quantiles=quantiles)
    gbps = copy_gbps()
    options = recipe_options(PRESETS["31b"], "cuda")
    print(f"copy bandwidth: {gbps:.0f} GB/s ({torch.cuda.get_device_name()})")
    print("31B linears + lm_head per recipe option (random normal weights):")
    for o in options:
        print(f"  g{o['group_size']:<4} zero point {str(o['zero_point']):5}  {o['bits_per_param']:.3f} bit  "
              f"{o['gib']:6.2f} GiB  rel err {o['rel_err']:.4f}")
    print(f"{'model':8} {'shape':34} {'n':>6} {'k':>6} {'m':>5} {'floor us':>8} {'us':>9} {'%copy':>6} {'TFLOP/s':>7} "
          f"{'bf16':>7} {'tiny us':>9} err")
    rows: list[dict] = []
    models, ms = a.models.split(","), [int(m) for m in a.ms.split(",")]
    if a.merge and a.out.exists():
        old = json.loads(a.out.read_text())
        rows += [{"copy_gbps": old["copy_gbps"], **r} for r in old["rows"]
                 if not (r["model"] in models and r["m"] in ms)]
    doc = {"device": torch.cuda.get_device_name(), "group_size": a.group_size,
           "consumer_configs_only": a.consumer, "copy_gbps": gbps, "recipe_options_31b": options, "rows": rows}
    for model in models:
        for (n, k), (name, _) in sorted(linear_shapes(PRESETS[model]).items()):
            bench_shape(model, name, n, k, ms, a.group_size, gbps, rows)
            _write(a.out, doc)  # after each shape: a cut-short run keeps what it measured
    smem = compiled_smem()
    doc["compiled_max_shared_bytes"] = max((s["shared"] for s in smem), default=None)
    doc["compiled_kernels"] = len(smem)
    _write(a.out, doc)
    print(f"compiled variants: {len(smem)}, max shared memory {doc['compiled_max_shared_bytes']} B "
          f"(limit {int4_matmul.SMEM_LIMIT_BYTES})")
    print(f"wrote {a.out}")
    over = [s for s in smem if s["shared"] > int4_matmul.SMEM_LIMIT_BYTES]
    if over:
        print(f"FAIL: {len(over)} compiled configs exceed {int4_matmul.SMEM_LIMIT_BYTES} B: {over}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
