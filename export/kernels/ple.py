"""The per-layer-input block of E2B / E4B as one op: `gemma4::int4_ple`.

After its MLP, a Gemma 4 layer with per-layer embeddings (PLE) does, on the residual stream x, the
MLP's output r and its slice of the per-layer inputs (export/gemma4/model.py `DecoderLayer`):

    h = x + rms_norm(r) * weight_r                 # the MLP's output into the residual stream
    a = gelu_tanh(h @ Wg.T) * table[..., index, :]   # the per-layer-input gate, H -> P (P = 256)
    p = a @ Wp.T                                     # the per-layer projection, P -> H
    y = (h + rms_norm(p) * weight_p) * scalar        # its norm into the stream, the layer's scalar

with Wg and Wp packed int4 (export/kernels/int4_matmul.py's layout). At decode that was four
dependent kernels a layer (the gate's GEMV with the add, a gather of the table's row, the
projection's GEMV with the activation, Inductor's norm / add / scale), each a launch's latency for
a few hundred KB of weights: on the E2B the step is bound by the number of its kernels
(scripts/measurements/profile_e2b_whole.json: 535 launches, 1.9 ms, against a 0.28 ms floor).

At M == 1 on CUDA (`_ple_kernel`, one launch): NP programs, each owning BLOCK_N rows of the
projection and RB rows of the gate. Each computes h as it loads it (r's norm factor first), its
gate rows, the activation with the table's row (read at `index`, no gather), and stores them to a
[P] scratch; the programs then wait for each other at a counter (all NP are resident: a few dozen
small programs), each computes its projection rows from the whole of a, and the program that
finishes last takes the norm of p and writes y. Roundings follow the model's bf16 ops (the GEMV
outputs, the norms, the adds and the scale each rounded to bf16), the activation as the int4 op's
GLU path rounds it (once). Other M, other dtypes and CPU: the composite (`int4_ple_reference` on CPU;
on CUDA the int4 op's paths), which is what the model computes without the op.

In the Triton interpreter the programs run one after another, so a wait between them would never
end: the interpreter takes one program (`ple_plan`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.library import triton_op, wrap_triton

from export.kernels.int4_matmul import (NORM_BLOCK, _check, _gemv1_tile, _inv_rms, _linear, _residual_pair,
                                        _round_bf16, gelu_tanh, glu_reference, int4_linear_reference, norm_steps,
                                        rms_norm_reference)
from export.kernels.pdl import op_pdl_mode, pdl_wait

PDL_KERNELS = ("_ple_kernel",)  # waits on the grid before it (`pdl_wait`) where pdl.OP_PDL holds
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class PlePlan(NamedTuple):
    """`_ple_kernel`'s launch: NP programs of BLOCK_N projection rows and RB gate rows (NP * RB >= P),
    CG groups of the gate's K a step, num_warps."""

    np: int
    block_n: int
    rb: int
    cg: int
    num_warps: int


def ple_plan(h: int, p: int, gate_group: int, interpret: bool = _INTERPRET) -> PlePlan:
    """32 projection rows a program (a [32, P / G, G / 8] tile of words, 8 a thread at 4 warps), the
    gate's rows spread over the same programs, 4 groups of its K a step; one program in the
    interpreter (its programs run one after another: a wait between them would never end)."""
    block_n = triton.next_power_of_2(h) if interpret else 32
    np_ = triton.cdiv(h, block_n)
    rb = triton.next_power_of_2(triton.cdiv(p, np_))
    cg = min(4, triton.next_power_of_2(h // gate_group))
    return PlePlan(np_, block_n, rb, cg, 4)


@triton.jit
def _ple_kernel(x_ptr, r_ptr, wr_ptr, t_ptr, idx_ptr, wg_ptr, sg_ptr, wp_ptr, sp_ptr, wn_ptr, sc_ptr,
                a_ptr, p_ptr, cnt_ptr, y_ptr, eps,
                H: tl.constexpr, P: tl.constexpr, GG: tl.constexpr, GP: tl.constexpr, NP: tl.constexpr,
                BLOCK_N: tl.constexpr, RB: tl.constexpr, CG: tl.constexpr, NSTEPS: tl.constexpr,
                ASM: tl.constexpr, PDL: tl.constexpr = 0):
    """y [H] = (h + rms_norm(p) wn) s for M == 1 (module doc): x, r, wr, wn, y bf16 [H]; t the per-layer
    table (bf16, rows of P, row idx[0]); wg / sg the gate's int4 words [P, H / 8] and scales [P, H / GG];
    wp / sp the projection's [H, P / 8] and [H, P / GP]; sc the scalar (bf16 [1]); a [P] and p [H] bf16
    scratch; cnt one int32, zero at the launch. Every program: its projection rows' weights first (they
    wait on nothing), r's norm factor, its gate rows (h as the tile loads x, `_gemv1_tile`'s RES), the
    activation, a barrier at cnt (NP arrivals), its projection rows, a second arrival; the last sums
    p's squares and writes y."""
    pid = tl.program_id(0)
    WG: tl.constexpr = GG // 8
    WP: tl.constexpr = GP // 8
    CP: tl.constexpr = P // GP  # the projection's K in one step: all its groups
    # the projection's tile: weights only, before the wait
    prow = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = (prow < H)[:, None, None]
    pcol = tl.arange(0, CP)[None, :, None]
    plane = tl.arange(0, WP)[None, None, :]
    wp32 = wp_ptr.to(tl.pointer_type(tl.int32))
    pw = tl.load(wp32 + prow.to(tl.int64)[:, None, None] * (P // 8) + pcol * WP + plane, mask=p_ok, other=0)
    ps = tl.load(sp_ptr + prow.to(tl.int64)[:, None, None] * CP + pcol, mask=p_ok, other=0.0)
    z = pdl_wait(PDL, ASM)  # from here on, what kernels before this one wrote: x, r (and every write)
    xw = (x_ptr + z).to(tl.pointer_type(tl.int32))  # bf16 pairs as int32 words
    rw = (r_ptr + z).to(tl.pointer_type(tl.int32))
    wrw = wr_ptr.to(tl.pointer_type(tl.int32))
    a_ptr, p_ptr, cnt_ptr, y_ptr = a_ptr + z, p_ptr + z, cnt_ptr + z, y_ptr + z
    t_ptr = t_ptr + z  # the table: the embedding unit's output
    inv_r = _inv_rms(rw, H, eps, 1, NSTEPS)
    # the gate: rows grow, K = H in steps of CG groups
    grow = pid * RB + tl.arange(0, RB)
    g_ok = (grow < P)[:, None, None]
    gcol = tl.arange(0, CG)[None, :, None]
    glane = tl.arange(0, WG)[None, None, :]
    wg32 = wg_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((RB, CG, WG), dtype=tl.float32)
    for g in tl.static_range(0, H // GG, CG):
        c_ok = (g + gcol) < H // GG
        g0 = (g + gcol) * WG
        w = tl.load(wg32 + grow.to(tl.int64)[:, None, None] * (H // 8) + g0 + glane, mask=g_ok & c_ok, other=0)
        s = tl.load(sg_ptr + grow.to(tl.int64)[:, None, None] * (H // GG) + g + gcol, mask=g_ok & c_ok, other=0.0)
        acc += _gemv1_tile(w, s, xw, wrw, g0, glane, c_ok, ASM, 0, 0, 1.0, 1, rw, wrw, inv_r)
    gate = _round_bf16(tl.sum(tl.sum(acc, axis=2), axis=1))  # the gate's GEMV output, bf16
    row = tl.load(idx_ptr)
    up = tl.load(t_ptr + row * P + grow, mask=grow < P, other=0.0).to(tl.float32)
    tl.store(a_ptr + grow, _round_bf16(gelu_tanh(gate) * up).to(a_ptr.dtype.element_ty), mask=grow < P)
    # every program's gate rows stored before any program reads a: one arrival each, then the wait
    tl.debug_barrier()
    seen = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < NP:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    # the projection's rows from the whole of a (loaded only now: no line of it is in this program's L1)
    aw = a_ptr.to(tl.pointer_type(tl.int32))
    part = _gemv1_tile(pw, ps, aw, aw, pcol * WP, plane, pcol < CP, ASM, 0, 0, XCG=1)
    pv = tl.sum(tl.sum(part, axis=2), axis=1)
    tl.store(p_ptr + prow, _round_bf16(pv).to(p_ptr.dtype.element_ty), mask=prow < H)  # (bit arithmetic: the
    # interpreter's own bf16 cast truncates)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == 2 * NP - 1:  # every row of p stored: its norm, the add and the scale
        pw2 = p_ptr.to(tl.pointer_type(tl.int32))  # p's bf16 pairs, from the L2 (`.cg`: other programs wrote them)
        ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        for i in tl.static_range(0, H // 2, NORM_BLOCK):
            o = i + tl.arange(0, NORM_BLOCK)
            pp = tl.load(pw2 + o, mask=o < H // 2, other=0, cache_modifier=".cg")
            lo = (pp << 16).to(tl.float32, bitcast=True)
            hi = (pp & -65536).to(tl.float32, bitcast=True)
            ss += lo * lo + hi * hi
        inv_p = 1.0 / tl.sqrt_rn(tl.sum(ss, 0) / H + tl.cast(eps, tl.float32))
        sc = tl.load(sc_ptr).to(tl.float32)
        wnw = wn_ptr.to(tl.pointer_type(tl.int32))
        for i in tl.static_range(0, H // 2, NORM_BLOCK):
            o = i + tl.arange(0, NORM_BLOCK)
            m = o < H // 2
            h_lo, h_hi = _residual_pair(tl.load(xw + o, mask=m, other=0), tl.load(rw + o, mask=m, other=0),
                                        tl.load(wrw + o, mask=m, other=0), inv_r)
            pp = tl.load(pw2 + o, mask=m, other=0, cache_modifier=".cg")
            wn = tl.load(wnw + o, mask=m, other=0)
            n_lo = _round_bf16(((pp << 16).to(tl.float32, bitcast=True) * inv_p) * (wn << 16).to(tl.float32, bitcast=True))
            n_hi = _round_bf16(((pp & -65536).to(tl.float32, bitcast=True) * inv_p)
                               * (wn & -65536).to(tl.float32, bitcast=True))
            y_lo = _round_bf16(_round_bf16(h_lo + n_lo) * sc)
            y_hi = _round_bf16(_round_bf16(h_hi + n_hi) * sc)
            tl.store(y_ptr + 2 * o, y_lo.to(y_ptr.dtype.element_ty), mask=m)
            tl.store(y_ptr + 2 * o + 1, y_hi.to(y_ptr.dtype.element_ty), mask=m)


def int4_ple_reference(x, r, weight_r, eps: float, table, index, qweight_g, scales_g, qweight_p, scales_p,
                       weight_p, scalar):
    """The block in plain torch ops (module doc), the model's ops in their order and dtypes."""
    h = x + rms_norm_reference(r, weight_r, eps)
    gate = int4_linear_reference(h, qweight_g, scales_g)
    p = int4_linear_reference(glu_reference(gate, table.index_select(-2, index).squeeze(-2)), qweight_p, scales_p)
    return (h + rms_norm_reference(p, weight_p, eps)) * scalar


def _check_ple(x, r, weight_r, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar):
    P, H, _ = _check(x, qweight_g, scales_g)
    n, k = qweight_p.shape[0], qweight_p.shape[1] * 2
    if (n, k) != (H, P):
        raise ValueError(f"int4_ple: projection [{n}, {k}] after a gate [{P}, {H}]: expected [{H}, {P}]")
    for name, t in (("r", r),):
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"int4_ple: {name} {tuple(t.shape)} and x {tuple(x.shape)} differ")
    for name, t in (("weight_r", weight_r), ("weight_p", weight_p)):
        if tuple(t.shape) != (H,):
            raise ValueError(f"int4_ple: {name} {tuple(t.shape)} for a width of {H}")
    if table.shape[-1] != P or tuple(table.shape[:-2]) != tuple(x.shape[:-1]):
        raise ValueError(f"int4_ple: table {tuple(table.shape)} for x {tuple(x.shape)} and P = {P}")
    if index.numel() != 1 or scalar.numel() != 1:
        raise ValueError(f"int4_ple: index {tuple(index.shape)} and scalar {tuple(scalar.shape)}: one element each")
    return H, P


def _m1(x, r, weight_r, table, weight_p, scalar, scales_g, scales_p) -> bool:
    """Whether `_ple_kernel` runs it: one bf16 row on CUDA, every float tensor bf16."""
    floats = (x, r, weight_r, table, weight_p, scalar, scales_g, scales_p)
    return (x.device.type == "cuda" and guard_or_false(x.numel() == x.shape[-1])
            and all(t.dtype == torch.bfloat16 for t in floats))


@triton_op("gemma4::int4_ple", mutates_args={})
def int4_ple(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, eps: float, table: torch.Tensor,
             index: torch.Tensor, qweight_g: torch.Tensor, scales_g: torch.Tensor, qweight_p: torch.Tensor,
             scales_p: torch.Tensor, weight_p: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """(h + rms_norm(p, weight_p)) * scalar, h = x + rms_norm(r, weight_r), p the projection of
    gelu_tanh(h's gate) * table[..., index, :] (module doc): x, r [..., H]; table [..., L, P]; index [1]
    int64; the gate [P, H] and the projection [H, P] in the int4 layout. At M == 1 in bf16 on CUDA one
    kernel; otherwise the int4 op's paths and aten ops."""
    H, P = _check_ple(x, r, weight_r, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar)
    if not _m1(x, r, weight_r, table, weight_p, scalar, scales_g, scales_p):
        h = x + rms_norm_reference(r, weight_r, eps)
        up = table.index_select(-2, index).squeeze(-2)
        p = _linear(glu_reference(_linear(h, qweight_g, scales_g), up), qweight_p, scales_p)
        return (h + rms_norm_reference(p, weight_p, eps)) * scalar
    return int4_ple_m1(x, r, weight_r, eps, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p,
                       scalar)


def int4_ple_m1(x, r, weight_r, eps: float, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar,
                plan: PlePlan | None = None, pdl: int | None = None) -> torch.Tensor:
    """The block for one bf16 row through `_ple_kernel` (`ple_plan`'s launch unless given; PDL: the op's
    mode on x's device unless given; the artifact's launcher sets the attribute)."""
    H, P = _check_ple(x, r, weight_r, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar)
    GG, GP = H // scales_g.shape[1], P // scales_p.shape[1]
    plan = plan or ple_plan(H, P, GG)
    y = torch.empty_like(x)
    a = torch.empty((P,), device=x.device, dtype=x.dtype)
    p = torch.empty((H,), device=x.device, dtype=x.dtype)
    cnt = torch.zeros((1,), device=x.device, dtype=torch.int32)
    launch = _ple_kernel if _INTERPRET else wrap_triton(_ple_kernel)  # the interpreter's function is not wrappable
    launch[(plan.np,)](
        x.contiguous(), r.contiguous(), weight_r.contiguous(), table.contiguous(), index, qweight_g.contiguous(),
        scales_g.contiguous(), qweight_p.contiguous(), scales_p.contiguous(), weight_p.contiguous(), scalar,
        a, p, cnt, y, float(eps), H=H, P=P, GG=GG, GP=GP, NP=plan.np, BLOCK_N=plan.block_n, RB=plan.rb,
        CG=plan.cg, NSTEPS=norm_steps(H // 2), ASM=not _INTERPRET,
        PDL=op_pdl_mode(x.device) if pdl is None else pdl, num_warps=plan.num_warps)
    return y


@int4_ple.register_fake
def _(x, r, weight_r, eps, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar):
    _check_ple(x, r, weight_r, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar)
    return torch.empty_like(x, dtype=torch.result_type(x, scalar))


@int4_ple.register_kernel("cpu")
def _(x, r, weight_r, eps, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar):
    _check_ple(x, r, weight_r, table, index, qweight_g, scales_g, qweight_p, scales_p, weight_p, scalar)
    return int4_ple_reference(x, r, weight_r, eps, table, index, qweight_g, scales_g, qweight_p, scales_p,
                              weight_p, scalar)
