"""The M == 1 int4 GEMV with its weight tiles brought in by the tensor memory accelerator (TMA), several in
flight per program, against the op's plan on the 31B's mid-size weights (a tuning tool, one GPU call).

    python -m scripts.gemv1_tma_variants [--out gemv1_tma_variants.json] [--budget 150] [--prewarm 14]
    python -m scripts.gemv1_tma_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter

Why: Nsight Compute has the op's GEMV on the o projection (5376 x 8192, 336 programs of 4 warps) waiting on
its loads (long scoreboard the first stall, issue slots 19% busy, 10 warps an SM: gemv1_ncu_31b.json) at 40%
of the DRAM bandwidth; a read of the same bytes with four 16-byte loads a thread in flight and ~1000
programs reaches 75% (read_ceiling.json). The op holds its next tile in registers (128 a thread: three
programs an SM), so its bytes in flight are ~2-4 loads a thread; deeper register staging cost registers and
programs and measured no faster, and Triton's cp.async staging neither (gemv1_variants.py). A TMA copy
holds no register while in flight and takes one instruction a tile: here each program streams its rows'
[BLOCK_N, GROUPS groups] tiles through STAGES shared-memory buffers (a tensor descriptor's loads in a
`tl.range(num_stages=STAGES)` loop, which Triton 3.6 pipelines as TMA copies with mbarriers on sm_90+),
and multiplies each with the op's own arithmetic (`int4_matmul._gemv1_tile_lanes`: x as int8 levels from
`_quant_x_kernel`, two masks and two or four dp4a a word); K slices summed in-kernel by the last program of
a row block, as the op's RED 2 (the counters zeroed by the quantize kernel). Every config fits 101376 bytes
of shared memory (RTX 4090 / 5090); the 4090 (sm_89) has no TMA, where Triton loads the tiles itself.

Per shape: each variant checked against an fp32 matmul on the dequantized weight on two fresh x (rel err
<= 1e-2), then timed as CUDA-graph replays over rotated weight copies (>= 256 MB: from HBM; median), the
quantize kernel included; then a sliding layer's four projections as one graph, the plan against each
shape's best. Copy bandwidth measured in the same run. Table on stdout, one JSON (`--out`) with
`copy_gbps`, `rows`, `best`, `layers`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from export.kernels.int4_matmul import _gemv1_scale, _gemv1_tile_lanes, _gemv1_x_planes
from scripts.gemv1_variants import (check_and_time, compare_layer, finish_sweep, launch_directly, layer_shapes_31b,
                                    rotated_weights, sweep_args, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16
GROUP = 128
SMEM = im.SMEM_LIMIT_BYTES
LAYER = ["qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"]
TINY = {"qkv_proj.sliding": (48, 1024), "o_proj.sliding": (40, 2048), "mlp.gate_up_proj": (96, 1024),
        "mlp.down_proj": (40, 2048)}


@triton.jit
def _gemv1_tma_kernel(xq_ptr, xf_ptr, xc_ptr, w_desc, s_ptr, part_ptr, y_ptr, cnt_ptr, N, KW, GPS, SPLITS,
                      stride_sn, stride_ps, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                      STAGES: tl.constexpr, LEVELS: tl.constexpr, ASM: tl.constexpr):
    """y = x @ dequant(W).T at M == 1 for BLOCK_N rows over one slice of GPS groups of K (program axis 1): the
    words [BLOCK_N, GROUPS * GROUP / 8] a step from the tensor descriptor w_desc over the [N, K / 8] int32 words
    (past N or K it fills zeros; a group past the slice has its scale masked to 0), x as `_quant_x_kernel`'s
    levels. One slice writes y; several write fp32 partials and the last program of a row block sums them in
    slice order into y (cnt_ptr's counter per row block, zeroed before the launch, left at 0)."""
    WORDS: tl.constexpr = GROUP // 8
    L: tl.constexpr = WORDS // 4
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r0 = pid_n * BLOCK_N
    offs_n = r0 + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None]
    srows = s_ptr.to(tl.pointer_type(tl.int16)) + rn * stride_sn
    XP = (KW + 15) // 16 * 16
    lane = tl.arange(0, WORDS)[None, None, :]
    col = tl.arange(0, GROUPS)[None, :, None]
    ng = KW // WORDS
    g_lo = pid_k * GPS
    g_hi = tl.minimum(g_lo + GPS, ng)
    acc = tl.zeros((BLOCK_N, GROUPS, L), dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(g_hi - g_lo, GROUPS), num_stages=STAGES):
        g = g_lo + t * GROUPS
        w = tl.reshape(w_desc.load([r0, g * WORDS]), (BLOCK_N, GROUPS, L, 4))
        gc = g + col
        gl = tl.minimum(gc, ng - 1)
        s = _gemv1_scale(srows + gl, n_ok & (gc < g_hi), ASM)
        he, ho, le, lo, c, f = _gemv1_x_planes(xq_ptr, xf_ptr, xc_ptr, XP, gl * WORDS, lane, L, ASM, 0, LEVELS)
        acc += _gemv1_tile_lanes(w, s, he, ho, le, lo, c, f, ASM, LEVELS)
    val = tl.sum(tl.sum(acc, axis=2), axis=1)
    nm = offs_n < N
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=nm)
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)
        tl.debug_barrier()  # every thread's partials stored; one thread's gpu-scope acq_rel atomic releases them
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in range(SPLITS):
                tot += tl.load(part_ptr + i * stride_ps + offs_n, mask=nm, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_n, tot.to(y_ptr.dtype.element_ty), mask=nm)
            tl.store(cnt_ptr + pid_n, 0)


def smem_bytes(block_n: int, groups: int, stages: int) -> int:
    """The TMA buffers' bytes (Triton allocates STAGES - 1 of them for the loads in flight and one more for the
    tile in use: at most STAGES), plus their barriers."""
    return stages * block_n * groups * (GROUP // 8) * 4 + 8 * stages


def _allocator(size: int, alignment: int, stream):
    """Triton's global scratch, should a kernel ask for one (`triton.set_allocator`; host-side descriptors, as
    here, need none): a byte tensor on the sweep's device."""
    return torch.empty(size, device=DEVICE, dtype=torch.int8)


@dataclass(frozen=True)
class Variant:
    block_n: int
    groups: int
    stages: int
    warps: int
    splits: int

    @property
    def label(self) -> str:
        return f"tma{self.block_n}r{self.groups}g{self.stages}s{self.warps}w/{self.splits}"

    def __call__(self, x2, q, s):
        from triton.tools.tensor_descriptor import TensorDescriptor

        N, K = q.shape[0], q.shape[1] * 2
        words = q.view(torch.int32)
        groups = K // GROUP
        gps = triton.cdiv(groups, self.splits)
        splits = triton.cdiv(groups, gps)
        ncnt = triton.cdiv(N, 4) if splits > 1 else 0
        cnt = torch.empty((max(ncnt, 1),), device=x2.device, dtype=torch.int32)
        xin, xf, xc = im._quant_x(x2, GROUP, cnt, ncnt, 0, im.GEMV1_LEVELS)
        y = torch.empty((1, N), device=x2.device, dtype=x2.dtype)
        part = torch.empty((splits, N) if splits > 1 else (1, 1), device=x2.device, dtype=torch.float32)
        desc = TensorDescriptor.from_tensor(words, [self.block_n, self.groups * GROUP // 8])
        _gemv1_tma_kernel[(triton.cdiv(N, self.block_n), splits)](
            xin, xf, xc, desc, s, part, y, cnt, N, K // 8, gps, splits, s.stride(0), part.stride(0), GROUP=GROUP,
            BLOCK_N=self.block_n, GROUPS=self.groups, STAGES=self.stages, LEVELS=im.GEMV1_LEVELS,
            ASM=not _INTERPRET, num_warps=self.warps, num_stages=self.stages)
        return y


class Plan:
    """The op's M == 1 path as it stands (`gemv1_plan`)."""

    label = "plan"

    def __call__(self, x2, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        p = im.gemv1_plan(n, k, GROUP)
        return im.int4_gemv1(x2, q, s, p.splits, kernel=im._gemv1_kernel(p.cfg), xq=p.xq, levels=p.levels)


def candidates(n: int, k: int, sms: int) -> list[Variant]:
    """Row blocks of 32-128 rows x 1-4 groups a step (64 B-256 B of each row), 3-6 stages within the consumer
    shared memory, 4 warps (8 with 128 rows), K slices for ~1, 2 or 4 programs an SM; each thread at least 4
    words a step."""
    out = []
    for bn in (32, 64, 128):
        for groups in (1, 2, 4):
            for stages in (3, 4, 6):
                if smem_bytes(bn, groups, stages) > SMEM or groups > k // GROUP:
                    continue
                for warps in ((4, 8) if bn == 128 else (4,)):
                    if bn * groups * (GROUP // 8) < 4 * 32 * warps:
                        continue
                    seen = set()
                    for per_sm in (1, 2, 4):
                        splits = max(1, min(k // GROUP // groups, round(per_sm * sms / triton.cdiv(n, bn))))
                        if splits not in seen:
                            seen.add(splits)
                            out.append(Variant(bn, groups, stages, warps, splits))
    return out


def _prewarm_worker(idx, count):
    """Compiles every variant (Triton's disk cache) in one of `count` processes."""
    import scripts.gemv1_tma_variants as me
    launch_directly("prewarm")
    triton.set_allocator(me._allocator)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    todo = [(v, n, k) for nm, (n, k) in me.shapes().items() for v in me.candidates(n, k, sms)]
    for v, n, k in todo[idx::count]:
        try:
            q, s = im.quantize_int4(torch.randn(n, k, device="cuda"), GROUP)
            v(torch.randn(1, k, device="cuda", dtype=XDT), q, s)
        except Exception:
            pass


def shapes() -> dict:
    return dict(TINY) if _INTERPRET else layer_shapes_31b(LAYER)


def main(argv=None) -> int:
    a = sweep_args("scripts.gemv1_tma_variants", __doc__, 150.0, argv, shapes_help="the sliding layer's four")
    if isinstance(a, int):
        return a
    t0 = time.time()
    triton.set_allocator(_allocator)
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 75)
    sms = 4 if _INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "best": {}, "layers": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    ok, weights, best = True, {}, {}
    todo = shapes()
    order = [nm for nm in ["o_proj.sliding", "qkv_proj.sliding", "mlp.down_proj", "mlp.gate_up_proj"]
             if not a.shapes or nm in a.shapes.split(",")]
    print(f"{'shape':18} {'N x K':>12} {'floor':>6} | {'plan':>6} {'%':>4} | {'best':24} {'us':>6} {'%':>4}", flush=True)
    for nm in order:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {nm} skipped", flush=True)
            continue
        n, k = todo[nm]
        nbytes, ws, ref_w = rotated_weights(n, k, GROUP)
        weights[nm] = ws
        floor = nbytes / gbps / 1e3
        vs = [Plan(), *candidates(n, k, sms)]
        if _INTERPRET:
            vs = vs[:1] + [v for v in vs[1:] if v.block_n == 32 and v.stages == 3 and v.warps == 4][:3]
        passed, res = check_and_time(vs, nm, n, k, ws, ref_w, floor, rows, deadline=t0 + a.budget + 30)
        ok = ok and passed
        timed = [(us, v) for us, v in res if us == us]
        if not timed:
            ok = False
            continue
        plan_us = next((u for u, w in timed if w.label == "plan"), float("nan"))
        us, v = min(timed, key=lambda t: t[0])
        best[nm] = v
        doc["best"][nm] = {"variant": v.label, "us": us, "plan_us": plan_us, "floor_us": floor}
        print(f"{nm:18} {n:6}x{k:<5} {floor:6.1f} | {plan_us:6.1f} {floor / plan_us:4.0%} | {v.label:24} {us:6.1f} "
              f"{floor / us:4.0%}", flush=True)
        save()
    if not _INTERPRET and all(nm in weights for nm in LAYER):
        xs = {nm: torch.randn(1, todo[nm][1], device=DEVICE, dtype=XDT) for nm in LAYER}
        rec = compare_layer("sliding", LAYER, weights, xs, {"plan": lambda nm: Plan(), "best": lambda nm: best[nm]})
        rec["best_variants"] = [best[nm].label for nm in LAYER]
        doc["layers"].append(rec)
        print(f"sliding layer's four projections as one graph: plan {min(rec['plan_us']):.1f} us, best per shape "
              f"{min(rec['best_us']):.1f} us ({', '.join(rec['best_variants'])})", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
