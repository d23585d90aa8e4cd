"""MoE block ops (`gemma4::moe_route`, `gemma4::moe_experts_int4`) against the copy bandwidth.

    python -m scripts.bench_moe [--preset 26b-a4b] [--ms 1,128,2048] [--group-size 128]
        [--out scripts/measurements/moe_kernels.json]
    python -m scripts.bench_moe --device cpu --preset tiny-moe --ms 1,8   # the script itself, toy sizes

One layer's MoE block of the preset (random weights and inputs) at each M (tokens: 1 is
decode, more is one prefill chunk): median time, bytes read (the router weight, and the int4
bytes of the experts the tokens actually picked: an expert nobody picked is never read) and
their fraction of the device-to-device copy bandwidth measured in the same run. Beside them,
what the ops replace: the routing in unfused aten ops, and the float experts in bf16 (decode
gathers the top-k experts' bf16 weights; prefill runs every expert on every token). At M = 1 on
CUDA `route_slices` times the routing with a decode token's logits through the slices kernel (env
GEMMA4_ROUTE_GEMV1=0 in an export), `route` as the op runs by default (`_route_gemv1_kernel`).
Every kernel result is checked first against the fp32 reference with the dequantized weights on
fresh inputs, the allocator's free memory poisoned with NaN; a relative error over 1e-2 (or ids
that disagree on more than 2% of the picks) stops the run (exit 1).
A decode time is the mean over ROTATE tokens routed to different experts, run back to back in
one timing (one token's experts, 24 MiB at 26B-A4B, would sit in the L2 between replays).
On CUDA, times are CUDA-graph replays (the compiled artifact has no Python launch cost); on the
CPU the ops run their aten references (a check of the script, not a kernel measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from export.gemma4.config import PRESETS

REL_TOL = 1e-2
ROTATE = 8  # decode tokens per timed call (distinct routings)


def copy_gbps(device: str) -> float:
    n = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, graph=False)
    del src, dst
    return 2 * n / ms / 1e6  # read + written


def _time_ms(fn, device: str, graph: bool = True) -> float:
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph
        return do_bench_cudagraph(fn, rep=20) if graph else do_bench(fn, warmup=5, rep=50)
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _poison(device: str, *nbytes: int) -> None:
    """Free blocks of these sizes filled with 0xFF (NaN in bf16 / fp32): the next allocations of
    those sizes get them, so an output element a kernel never wrote reads NaN."""
    if device == "cuda":
        blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=device) for n in nbytes]
        del blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_layer(preset: str, group_size: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """One MoE block's tensors: router (float) and the int4 stacks, plus the bf16 float stacks."""
    from export.kernels.int4_matmul import group_size_for
    from export.kernels.moe_int4 import quantize_experts
    c = PRESETS[preset]
    E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
    g = torch.Generator(device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device=device, generator=g) * 0.05  # noqa: E731
    gate_up, down = randn(E, 2 * I, H), randn(E, H, I)
    layer = {"preset": preset, "E": E, "H": H, "I": I, "top_k": c.top_k_experts, "eps": c.rms_norm_eps,
             "scale": (torch.rand(H, device=device, generator=g) + 0.5).to(dtype),
             "proj": randn(E, H).to(dtype),
             "per_expert_scale": (torch.rand(E, device=device, generator=g) + 0.5).to(dtype),
             "stacks": (*quantize_experts(gate_up, group_size_for(H, group_size)),
                        *quantize_experts(down, group_size_for(I, group_size))),
             "gate_up": gate_up.to(dtype), "down": down.to(dtype)}
    del gate_up, down
    return layer


def bench_m(preset: str, layer: dict, m: int, device: str, dtype: torch.dtype, gbps: float, rows: list) -> None:
    from export.kernels.int4_matmul import int4_bytes
    from export.kernels.moe_int4 import launch_route, moe_experts_reference, moe_route_reference
    E, H, I, K = layer["E"], layer["H"], layer["I"], layer["top_k"]
    route_args = (layer["scale"], layer["proj"], layer["per_expert_scale"], K, layer["eps"])
    stacks = layer["stacks"]
    x = torch.randn(m, H, device=device).to(dtype)
    torch.ops.gemma4.moe_route(x, *route_args)  # autotune first: trial runs write the outputs
    _poison(device, m * E * 4, m * K * 8)
    w, idx = torch.ops.gemma4.moe_route(x, *route_args)
    w_ref, idx_ref = moe_route_reference(x.float(), *[a.float() for a in route_args[:3]], *route_args[3:])
    same = (idx == idx_ref).float().mean().item()
    route_err = _rel(w[idx == idx_ref], w_ref[idx == idx_ref])
    torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks)
    _poison(device, m * K * I * 4, m * K * I * 2, m * K * H * 4, m * H * 2)
    y = torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks)
    err = _rel(y, moe_experts_reference(x.float(), w, idx, *stacks))
    same_slices = 1.0
    slices = m == 1 and device == "cuda"  # a decode token's logits through the slices kernel too
    if slices:
        launch_route(x, *route_args, gemv1=False)
        w1, idx1 = launch_route(x, *route_args, gemv1=False)
        same_slices = (idx1 == idx_ref).float().mean().item()
        route_err = max(route_err, _rel(w1[idx1 == idx_ref], w_ref[idx1 == idx_ref]))
    if not (math.isfinite(err) and err <= REL_TOL and min(same, same_slices) >= 0.98 and route_err <= 1e-3):
        raise SystemExit(f"FAIL {preset} m={m}: experts rel err {err:.3e}, same ids {same:.3f} / {same_slices:.3f} "
                         f"(the op / slices), routing weights rel err {route_err:.3e}")

    g_gu, g_d = H // stacks[1].shape[-1], I // stacks[3].shape[-1]
    per_expert = int4_bytes(2 * I, H, g_gu) + int4_bytes(H, I, g_d)
    active = idx.unique().numel()
    act_bytes = x.element_size() * m * H * 2  # x read, y written
    route_bytes = E * H * layer["proj"].element_size() + act_bytes // 2 + m * K * 12
    expert_bytes = active * per_expert + act_bytes + m * K * 12
    float_expert = (2 * I * H + H * I) * layer["gate_up"].element_size()
    # decode: ROTATE tokens, each routed to its own experts, one after the other in the timed graph
    # (their experts' bytes are several times the L2, as a decode across layers reads them)
    rot = ROTATE if m == 1 else 1
    sets = [(x, w, idx)]
    for _ in range(rot - 1):
        xr = torch.randn(m, H, device=device).to(dtype)
        sets.append((xr, *torch.ops.gemma4.moe_route(xr, *route_args)))
    each = lambda f: (lambda: [f(*s) for s in sets])  # noqa: E731
    variants = {
        "route": (each(lambda x, w, idx: torch.ops.gemma4.moe_route(x, *route_args)), route_bytes),
        "route_aten": (each(lambda x, w, idx: moe_route_reference(x, *route_args)), route_bytes),
        **({"route_slices": (each(lambda x, w, idx: launch_route(x, *route_args, gemv1=False)), route_bytes)}
           if slices else {}),
        "experts_int4": (each(lambda x, w, idx: torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks)), expert_bytes),
        "experts_float": (each(lambda x, w, idx: _float_experts(layer, x, w, idx)),
                          (K if m == 1 else E) * float_expert + act_bytes),
        "moe_int4": (each(lambda x, w, idx: torch.ops.gemma4.moe_experts_int4(
            x, *torch.ops.gemma4.moe_route(x, *route_args), *stacks)), route_bytes + expert_bytes),
    }
    for name, (fn, nbytes) in variants.items():
        us = _time_ms(fn, device) * 1e3 / rot
        rows.append({"model": preset, "op": name, "m": m, "us": us, "bytes": nbytes, "active_experts": active,
                     "floor_us": nbytes / gbps / 1e3, "fraction_of_copy_bw": nbytes / us / 1e3 / gbps,
                     "rel_err": err if "int4" in name else None, "same_ids": {"route": same, "route_slices": same_slices}.get(name)})
        r = rows[-1]
        print(f"{preset:8} {name:14} {m:5} {active:4} {nbytes / 2**20:9.2f} {r['floor_us']:9.1f} {us:9.1f} "
              f"{r['fraction_of_copy_bw']:7.1%}", flush=True)


def _float_experts(layer: dict, x, w, idx):
    """model.Experts on the bf16 stacks (what --quant none runs)."""
    from export.gemma4.model import Experts
    if "module" not in layer:
        with torch.device("meta"):
            ex = Experts(PRESETS[layer["preset"]])
        ex.gate_up_proj = torch.nn.Parameter(layer["gate_up"], requires_grad=False)
        ex.down_proj = torch.nn.Parameter(layer["down"], requires_grad=False)
        layer["module"] = ex
    return layer["module"](x, w, idx)


def compiled_smem() -> list[dict]:
    """Shared memory of every kernel variant Triton compiled in this run."""
    from export.kernels import moe_int4
    out = []
    for fn in (moe_int4._route_logits_kernel, moe_int4._route_gemv1_kernel, moe_int4._route_topk_kernel,
               moe_int4._gemv_words_gate_up_kernel,
               moe_int4._gemv_words_down_kernel, moe_int4._sum_slices_kernel, moe_int4._align_kernel,
               moe_int4._sort_count_kernel, moe_int4._sort_scan_kernel, moe_int4._sort_scatter_kernel,
               moe_int4._grouped_kernel):
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                out.append({"name": kernel.name, "shared": kernel.metadata.shared,
                            "num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages})
    return out


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="26b-a4b", choices=[p for p, c in PRESETS.items() if c.enable_moe_block])
    ap.add_argument("--ms", default="1,128,2048", help="tokens per call: 1 = decode, more = one prefill chunk")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, default=Path("scripts/measurements/moe_kernels.json"))
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_moe: --device cuda needs a CUDA GPU (or pass --device cpu)", file=sys.stderr)
        return 2
    import export.kernels.moe_int4 as moe_int4  # registers the ops
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    gbps = copy_gbps(a.device)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"copy bandwidth: {gbps:.0f} GB/s ({name})")
    layer = make_layer(a.preset, a.group_size, a.device, dtype)
    print(f"{a.preset}: E {layer['E']} top-k {layer['top_k']} hidden {layer['H']} expert width {layer['I']}, "
          f"int4 g{a.group_size}")
    print(f"{'model':8} {'op':14} {'m':>5} {'exp':>4} {'MiB read':>9} {'floor us':>9} {'us':>9} {'%copy':>7}")
    rows: list[dict] = []
    doc = {"device": name, "preset": a.preset, "group_size": a.group_size, "copy_gbps": gbps, "rows": rows}
    for m in (int(s) for s in a.ms.split(",")):
        bench_m(a.preset, layer, m, a.device, dtype, gbps, rows)
        _write(a.out, doc)  # after each M: a cut-short run keeps what it measured
    if a.device == "cuda":
        smem = compiled_smem()
        doc["compiled_max_shared_bytes"] = max((s["shared"] for s in smem), default=None)
        doc["compiled_kernels"] = len(smem)
        _write(a.out, doc)
        print(f"compiled variants: {len(smem)}, max shared memory {doc['compiled_max_shared_bytes']} B "
              f"(limit {moe_int4.SMEM_LIMIT_BYTES})")
        if any(s["shared"] > moe_int4.SMEM_LIMIT_BYTES for s in smem):
            print(f"FAIL: compiled configs exceed {moe_int4.SMEM_LIMIT_BYTES} B", file=sys.stderr)
            return 1
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
