"""Mixture-of-experts over int4 expert stacks: routing and the expert MLPs as ops.

    gemma4::moe_route(x[N, H], scale[H], proj_weight[E, H], per_expert_scale[E], top_k, eps)
        -> (weights fp32 [N, top_k], idx int64 [N, top_k])
    gemma4::moe_experts_int4(x[N, H], weights, idx, gate_up_qweight, gate_up_scales,
                             down_qweight, down_scales) -> y[N, H] in x.dtype
    gemma4::moe_rms_experts_int4(x, norm_weight[H], eps, weights, idx, ...stacks) -> the same of
                             rms_norm(x) * norm_weight (the experts' input norm, see GATE_UP_Q)
    gemma4::moe_rms_experts_close(x, norm_weight, eps, weights, idx, ...stacks, ym, w1, w2, wc, scalar)
        -> (x + rms_norm(rms_norm(ym) * w1 + rms_norm(y) * w2) * wc) * scalar, y the experts' output above
                             (a MoE layer's end, ym its dense MLP's output; a decode token's written by the
                             experts' down kernel, `_moe_close_row`)

Routing (Gemma 4's router): x / rms(x) * scale * H^-0.5, logits = that @ proj_weight.T,
softmax over the E experts, the top_k largest, renormalized to sum 1, times
per_expert_scale[idx]. Experts: each token's top_k experts run gelu_tanh(gate) * up, then
down, and their outputs are summed with the routing weights.

Expert stacks use the int4 linear's layout per expert (export/kernels/int4_matmul.py):
    gate_up_qweight uint8 [E, 2I, H/2]  gate_up_scales bf16 [E, 2I, H/G]  (rows 0..I-1 gate, I..2I-1 up)
    down_qweight    uint8 [E, H, I/2]   down_scales    bf16 [E, H, I/G']
nibbles along K (even k low), stored q + 8, W ~= q * scale. G' is the group size halved
where I needs it (`group_size_for`: I = 704 takes 64 at g128).

Kernels (Triton, through `wrap_triton`: AOTInductor compiles them into the `.so`):
- routing: `_route_logits_kernel` (token blocks x expert blocks x slices of H, so one decode
  token still spreads over 44-88 programs at 26B-A4B width; the RMS norm is one scale per
  row, applied later) and `_route_topk_kernel` (sums the slices, softmax, top-k by repeated
  argmax, renormalize, per-expert scale), all in fp32. A decode token's logits come from
  `_route_gemv1_kernel` instead (`route_gemv1()`: a few experts a program over all of H, plain
  FMAs: no 16-row dot tile padded from one token, one slice for the top-k kernel).
- decode (N == 1): `_gemv_words_gate_up_kernel`, grid (I blocks, top_k), reads the expert id
  on the device and only that expert's rows of gate and up, and writes gelu(gate) * up (fp32,
  in the down kernel's word order); `_gemv_words_down_kernel`, grid (H blocks, slices), runs
  over the top_k experts' groups as one axis of (slot, group) columns with the routing weight on
  the scale (`DOWN_SLICES` > 1: fp32 partials summed by `_sum_slices_kernel`). Both read the
  packed rows as int32 words (16-byte loads, GROUPS whole groups per step, the next step's
  tiles loaded before this one is used) and turn each nibble into a float with one lop3 and
  meet x in one FMA (`_word_dot`). With `GATE_UP_Q` the gate / up runs from x's two int8 levels instead
  (`_gemv_q_gate_up_kernel`: int4_matmul's quantize kernel first, then its per-lane dp4a loop over the
  expert's gate and up rows as one tile; off until timed). Static shapes, no host sync: CUDA-graph safe. On sm_90+ the
  routing's and the decode's kernels are compiled to wait on the grid before them, but launched
  without programmatic dependent launch (`PDL_KERNELS`: measured slower with it).
- prefill (N dynamic): `sort_entries` counts the N * top_k (token, slot) entries per expert
  and writes them grouped by expert (a stable counting sort) and the per-expert row offsets,
  as count / scan / scatter kernels of many programs (or, with `SORT_PARALLEL_ENV` "0", in one
  program: `_align_kernel`); `_grouped_kernel` runs one TILE-row tile of one expert per program
  (TILE is a config: the program finds its expert from the row offsets), a tensor-core dot
  over dequantized weight tiles: gate_up writes the activations in grouped order, down writes
  each entry's weighted output in place, and a sum over the top_k slots gives each token's
  output (deterministic, no atomics). No expert runs on a token that did not pick it.
Every config fits 101376 bytes of shared memory per block (RTX 4090 sm_89, RTX 5090
sm_120); `config_smem_bytes` estimates it and the tests check every config (and compile each
kernel for sm_89 and sm_120 with Triton + ptxas, no GPU needed).

The CPU kernels of the ops are `moe_route_reference` and `moe_experts_reference` (plain
aten ops; the CPU backend decomposes the ops into them). The experts reference gathers the
top_k experts' weights for one token and runs every expert on every token otherwise (the
float model's math: a reference, not a fast path).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.library import triton_op, wrap_triton

from export.kernels import int4_matmul
from export.kernels.int4_matmul import (NORM_BLOCK, _gemv1_loop_q, _nibble_as_float, _residual, dequantize_int4,
                                        gelu_tanh, int4_bytes, norm_steps, quantize_int4, rms_norm_reference)
from export.kernels.pdl import op_pdl_mode, pdl_wait

SMEM_LIMIT_BYTES = 101376  # per block on sm_89 / sm_120
ALIGN_BLOCK = 128  # entries per step of the counting sort
# The prefill's counting sort as three launches of many programs (`_sort_count_kernel`, `_sort_scan_kernel`,
# `_sort_scatter_kernel`: the same stable order) instead of `_align_kernel`'s one program. H200, the 26B-A4B's
# chunk (moe_align_variants.json, bitwise the one program's order): 775.8 -> 19.6 us at 2048 tokens (the one
# program's best BLOCK / warps 659.7), 194.7 -> 11.0 at 512; the whole model's prefill 18472 -> 23338 tok/s
# (variants.json). Env SORT_PARALLEL_ENV "0" in an exporting process takes the one program (read at each launch,
# an A/B switch for scripts/export_ab.py).
SORT_PARALLEL_ENV = "GEMMA4_MOE_SORT_PARALLEL"
SORT_BLOCK = 64  # entries per program of the count and scatter kernels
SORT_SCAN_ROWS = 32  # blocks per step of the scan
ROUTE_H_SLICE = 256  # hidden dims per routing program (a multiple of every BLOCK_H): 11 slices at 2816
# a decode step's MoE kernels are compiled to wait on the grid before them (export/kernels/pdl.py) on
# sm_90+, first thing (the expert kernels' weight addresses come from the routing's idx), but the
# artifact's launcher gives none of them the programmatic-stream-serialization attribute (export/backends/
# cuda.py), so each wait returns at once. H200, the 26B-A4B 2-layer slice's CUDA-graph decode step at fill
# 1k (scripts/pdl_ab.py, one .so, bitwise the same logits): 0.317 ms with the attribute for every waiting
# kernel but these, 0.319 / 0.318 / 0.317 with it for the down / sum / gate_up kernels too, 0.394 with it
# for the two routing kernels (the whole model 2.74 -> 3.79 ms a token with the attribute for all five);
# scripts/measurements/pdl_ab_26b_sets.json. A name listed here gets the attribute.
PDL_KERNELS: tuple[str, ...] = ()
# A decode token's routing logits through `_route_gemv1_kernel` (the default) or, with ROUTE_GEMV1_ENV "0",
# the slices kernel. On the H200 the GEMV took a 26B-A4B layer's routing logits from 10.3 to 5.3 us and its
# 2-layer slice's decode step from 0.287 to 0.277 ms (scripts/measurements/route_ab_26b_2l.json).
ROUTE_GEMV1_ENV = "GEMMA4_ROUTE_GEMV1"
ROUTE_GEMV1_BLOCK_E, ROUTE_GEMV1_BLOCK_H = 2, 512  # experts a program (64 programs at E = 128), H a step


def sort_parallel() -> bool:
    """Whether the prefill's counting sort takes the three many-program kernels (yes unless env SORT_PARALLEL_ENV
    is "0")."""
    return os.environ.get(SORT_PARALLEL_ENV, "1") != "0"


def route_gemv1() -> bool:
    """Whether a decode token's routing logits take `_route_gemv1_kernel` (yes unless env ROUTE_GEMV1_ENV
    is "0"; read at each launch so that scripts/export_ab.py can switch it per export)."""
    return os.environ.get(ROUTE_GEMV1_ENV, "1") != "0"


# ---- layout helpers -------------------------------------------------------------------------


def quantize_experts(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [E, N, K] -> (uint8 [E, N, K/2], bf16 [E, N, K/G]), expert by expert (int4 layout)."""
    E, N, K = w.shape
    q = torch.empty(E, N, K // 2, dtype=torch.uint8, device=w.device)
    s = torch.empty(E, N, K // group_size, dtype=torch.bfloat16, device=w.device)
    for e in range(E):
        q[e], s[e] = quantize_int4(w[e], group_size)
    return q, s


def dequantize_experts(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., N, K/2] + [..., N, K/G] -> [..., N, K] in `dtype` (any leading dims: E, or gathered top_k)."""
    lead, K = qweight.shape[:-1], qweight.shape[-1] * 2
    w = dequantize_int4(qweight.reshape(-1, qweight.shape[-1]), scales.reshape(-1, scales.shape[-1]), dtype)
    return w.view(*lead, K)


def experts_int4_bytes(experts: int, n: int, k: int, group_size: int) -> int:
    """Stored bytes of one expert stack [experts, n, k] (group size as stored)."""
    return experts * int4_bytes(n, k, group_size)


# ---- references (plain aten: the CPU kernels and the CPU backend's decompositions) -----------


def moe_route_reference(x: torch.Tensor, scale: torch.Tensor, proj_weight: torch.Tensor,
                        per_expert_scale: torch.Tensor, top_k: int, eps: float):
    """Gemma 4's router in aten ops, in fp32 from x's values as the CUDA kernels compute it
    (transformers' math; its bf16 model rounds the normed x and the logits to bf16, where a near
    tie between the k-th and the next expert can then pick another expert than the kernels and
    the fp32 model do; from the same x a CPU artifact and a CUDA one route alike)."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    y = y * scale.float() * x.shape[-1] ** -0.5
    probs = F.softmax(F.linear(y, proj_weight.float()), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[idx], idx


def moe_experts_reference(x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales):
    """The float Experts' math on dequantized stacks (in x.dtype): one token gathers its top_k
    experts; more tokens run every expert and weight them by a dense (N, E) table."""
    dt = x.dtype
    if guard_or_false(x.shape[0] == 1):
        e = idx[0]
        gu = torch.einsum("h,kih->ki", x[0], dequantize_experts(gate_up_qweight[e], gate_up_scales[e], dt))
        gate, up = gu.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") * up
        y = torch.einsum("ki,khi->kh", act, dequantize_experts(down_qweight[e], down_scales[e], dt))
        return (weights[0, :, None] * y.float()).sum(0, keepdim=True).to(dt)
    gu = torch.einsum("nh,eih->nei", x, dequantize_experts(gate_up_qweight, gate_up_scales, dt))
    gate, up = gu.chunk(2, dim=-1)
    y = torch.einsum("nei,ehi->neh", F.gelu(gate, approximate="tanh") * up,
                     dequantize_experts(down_qweight, down_scales, dt))
    dense_w = torch.zeros(x.shape[0], gate_up_qweight.shape[0], dtype=weights.dtype, device=x.device)
    dense_w = dense_w.scatter(1, idx, weights)
    return torch.einsum("ne,neh->nh", dense_w, y.float()).to(dt)


def moe_rms_experts_reference(x, norm_weight, eps, weights, idx, gate_up_qweight, gate_up_scales, down_qweight,
                              down_scales):
    """`moe_experts_reference` of rms_norm(x) * norm_weight (Gemma 4's RMSNorm: `int4_matmul.rms_norm_reference`)."""
    return moe_experts_reference(int4_matmul.rms_norm_reference(x, norm_weight, eps), weights, idx, gate_up_qweight,
                                 gate_up_scales, down_qweight, down_scales)


# ---- configs (every one within SMEM_LIMIT_BYTES; tests assert it) --------------------------


def _cfg(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# Each pool lists first the config an export without autotune runs (`_autotuned`'s one-config mode). The prefill
# chunk's routing logits and grouped GEMMs at 26B-A4B width, H200, us at M = 2048 / 512
# (scripts/moe_prefill_variants.py, scripts/measurements/moe_prefill_variants.json): routing 64 tokens x 128
# experts a program 126.8 / 44.5 against 454.6 / 117.5 for 16 x 16 (the smallest, which the one-config mode ran
# before); the grouped pair (gate / up, then down) with the weight tile interleaved back for one dot (JOIN): 128
# rows x 64 columns 919 / 642, 64 x 128 1107 / 464, against 3719 / 1047 for 16-row tiles (BLOCK_K 64; the
# one-config mode ran 16 rows at BLOCK_K 32 before, not timed there) and 3667 / 1167 for the best without JOIN;
# the first is the fastest at the 2048-token chunk the 24 GB recipe fits (gate / up's BLOCK_K 128, a down config
# of its own: 1055 / 446 at best). The counting sort before them: moe_align_variants.json (SORT_PARALLEL_ENV).
ROUTE_CONFIGS = [_cfg(w, s, BLOCK_T=bt, BLOCK_E=be, BLOCK_H=bh) for bt, be, bh, w, s in (
    (64, 128, 32, 8, 3), (128, 128, 32, 8, 2), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3),
    (16, 16, 128, 4, 2), (16, 32, 128, 4, 2), (16, 16, 256, 4, 2), (16, 32, 64, 4, 3))]
# A thread holds 4 words (16 bytes) of a row; tiles with more rows than the threads lay out give
# each thread several rows of the same words, which share the x loads and offsets (fewer
# instructions per nibble) at the cost of fewer programs.
WORDS_GATE_UP_CONFIGS = [_cfg(w, 1, BLOCK_N=bn, GROUPS=gr, DEPTH=d) for bn, gr, w, d in (  # GROUP / 8 words a group
    (16, 4, 4, 1), (16, 4, 4, 2), (8, 4, 4, 2), (8, 4, 4, 1), (8, 2, 2, 2), (8, 2, 4, 2))]
WORDS_DOWN_CONFIGS = [_cfg(w, 1, BLOCK_N=bn, GROUPS=gr, DEPTH=d) for bn, gr, w, d in (  # BLOCK_N: whole words of act
    (8, 16, 4, 2), (8, 16, 4, 1), (4, 16, 2, 2), (4, 16, 2, 1), (8, 8, 4, 2), (8, 32, 4, 1))]
# the first of each: the fastest on an H200 (scripts/measurements/moe_decode_sweep.json; down with DOWN_XTILE's
# act tiles), one-config mode's pick
DOWN_SLICES = 1  # slices of the down GEMV's (slot, group) columns: > 1 adds fp32 partials and a sum kernel
# The down GEMV's act loads as [BLOCK_N, GROUPS, WORDS] tiles (every row of the tile the same addresses) instead of
# [1, GROUPS, WORDS]: loaded with one row, Triton gives x another layout than the weight tile's and each of a step's
# eight nibble products goes through shared memory on its way into the sum (sm_90, 26B-A4B's (8, 16, 4) config,
# compiled offline: 342 SASS instructions a step with 17 barriers, 16 STS.128 and 16 LDSM; with the row tile 350
# with 2 barriers (the scales' factor), x's loads 16 bytes wide). H200, every down config both ways in CUDA graphs
# (scripts/sweep_moe_decode.py, scripts/measurements/moe_decode_sweep.json): the best, (8, 16, 4) two tiles ahead,
# 11.47 -> 9.80 us against the op's config before ((8, 16, 4) one ahead, row-loaded act), as close to fp32 (1.7e-3);
# with one tile ahead the row tile loses (21.0 us), so the pool leads with the two-ahead config.
DOWN_XTILE = 1
# The decode gate / up with x as two int8 levels and dp4a (`_gemv_q_gate_up_kernel`, the int4 op's per-lane loop)
# instead of bf16 x and an FMA a nibble (37.7 SASS instructions a word in the words kernel's loop, sm_90 offline):
# one launch more (x's quantize kernel), which takes the experts' input norm's place (`moe_rms_experts_int4`).
# Off until timed (scripts/sweep_moe_decode.py times both; GATE_UP_Q_ENV "1" in an exporting process turns it on:
# scripts/export_ab.py --switch); GATE_UP_Q_CONFIG: (BLOCK_N, GROUPS, num_warps).
GATE_UP_Q_ENV = "GEMMA4_MOE_GATE_UP_Q"
GATE_UP_Q = os.environ.get(GATE_UP_Q_ENV, "0") == "1"
GATE_UP_Q_CONFIG = (16, 2, 4)
GROUPED_CONFIGS = [_cfg(w, s, TILE=t, BLOCK_N=bn, BLOCK_K=bk, JOIN=j) for t, bn, bk, w, s, j in (
    (128, 64, 64, 4, 3, True), (64, 128, 64, 4, 3, True), (16, 64, 64, 4, 3, False), (16, 128, 64, 4, 3, False), (16, 64, 32, 4, 4, False),
    (64, 64, 64, 4, 3, False), (64, 128, 64, 4, 3, False), (128, 64, 64, 4, 3, False), (128, 128, 64, 8, 2, False),
    (64, 64, 32, 4, 4, False), (64, 64, 64, 4, 3, True), (128, 128, 64, 8, 2, True))]
# TILE: (token, slot) rows of one expert per program; JOIN: one dot over the interleaved tile


def config_smem_bytes(cfg: triton.Config, kind: str) -> int:
    """Upper estimate of a config's shared memory. Grouped GEMM: each pipeline stage buffers its
    input tiles (activations, packed weights and scales; gate_up reads two weight tiles, gate and
    up); a dot also stages the dequantized bf16 weight tiles once. Routing: fp32 tiles of x and
    the router weight per stage, and the dot's operands once. Word GEMVs: registers, and a
    conversion or reduction scratch."""
    k = cfg.kwargs
    if kind == "route":
        per_stage = (k["BLOCK_T"] + k["BLOCK_E"]) * k["BLOCK_H"] * 4
        return cfg.num_stages * per_stage + (k["BLOCK_T"] + k["BLOCK_E"]) * k["BLOCK_H"] * 4
    if kind.startswith("words"):  # registers; at most the fp32 tiles (16 words per group) once, for a layout
        return 2 * k["BLOCK_N"] * k["GROUPS"] * 16 * 4  # conversion or the final cross-warp sum
    tiles = 2 if kind == "grouped_gate_up" else 1
    bn, bk = k["BLOCK_N"], k["BLOCK_K"]
    weights = tiles * (bn * bk // 2 + bn * 2)
    return cfg.num_stages * (weights + k["TILE"] * bk * 2) + tiles * bn * bk * 2


_KERNELS: dict = {}




def _autotuned(kind: str, group: int = 0):
    """The autotuned kernel of `kind` with the configs that suit `group` (a BLOCK_K that
    divides the group: one scale per row per step)."""
    one = int4_matmul.ONE_CONFIG  # the int4 family's one-config switch holds for these kernels too
    key = (kind, group, one)
    if key not in _KERNELS:
        pool, kernel, keys = {
            "route": (ROUTE_CONFIGS, _route_logits_kernel, ["E", "H"]),
            "words_gate_up": (WORDS_GATE_UP_CONFIGS, _gemv_words_gate_up_kernel,
                              ["I", "NGROUPS", "GROUP", "DOWN_GROUP"]),
            "words_down": (WORDS_DOWN_CONFIGS, _gemv_words_down_kernel, ["N_OUT", "C_PER_SPLIT", "GROUP", "NGROUPS"]),
            "grouped_gate_up": (GROUPED_CONFIGS, _grouped_kernel, ["N_OUT", "K", "GROUP", "NK_BUCKET"]),
            "grouped_down": (GROUPED_CONFIGS, _grouped_kernel, ["N_OUT", "K", "GROUP", "NK_BUCKET"]),
        }[kind]
        configs = [c for c in pool if "BLOCK_K" not in c.kwargs or group % c.kwargs["BLOCK_K"] == 0]
        if one:  # each pool's first config (of those that suit the group) is the measured one
            configs = configs[:1]
        _KERNELS[key] = triton.autotune(configs=configs, key=keys)(kernel)
    return _KERNELS[key]


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _nibbles(p):
    """Packed bytes (int32) -> the even-k and odd-k codes as floats: a nibble OR'ed into the
    mantissa of 2^23 minus (2^23 + 8) is exactly the code q = nibble - 8 (no conversion)."""
    lo = ((p & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((p >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


@triton.jit
def _route_logits_kernel(x_ptr, scale_ptr, w_ptr, part_ptr, ss_ptr, N, H, E, H_SLICE, stride_xn, stride_wn,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = 0):
    """One slice of H for a block of tokens x a block of experts: part[s, n, e] = (x[n] * scale)
    . w[e] over slice s, and (expert block 0) ss[s, n] = sum of x[n]^2 over it. The RMS norm is
    one scale per row, applied when the slices are summed (`_route_topk_kernel`), so x is read
    once and a single token still spreads over H / H_SLICE x E / BLOCK_E programs. PDL: it waits
    first thing (export/kernels/pdl.py)."""
    if PDL:
        z = pdl_wait(PDL, True)
        x_ptr, scale_ptr, w_ptr, part_ptr, ss_ptr = x_ptr + z, scale_ptr + z, w_ptr + z, part_ptr + z, ss_ptr + z
    pid_t, pid_e, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok, e_ok = offs_t < N, offs_e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h in range(0, H_SLICE, BLOCK_H):
        offs_h = pid_s * H_SLICE + h + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        x = tl.load(x_ptr + offs_t[:, None] * stride_xn + offs_h[None, :], mask=t_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        s = tl.load(scale_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * stride_wn + offs_h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(x * s[None, :], tl.trans(w), acc, input_precision="ieee")
    tl.store(part_ptr + (pid_s * N + offs_t[:, None]) * E + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
    tl.store(ss_ptr + pid_s * N + offs_t, ss, mask=t_ok & (pid_e == 0))


@triton.jit
def _route_gemv1_kernel(x_ptr, scale_ptr, w_ptr, part_ptr, ss_ptr, H, E, stride_wn, BLOCK_E: tl.constexpr,
                        BLOCK_H: tl.constexpr, STEPS: tl.constexpr, PDL: tl.constexpr = 0):
    """One token (decode): part[0, 0, e] = (x * scale) . w[e] over all of H for BLOCK_E experts a
    program, and (program 0) ss[0, 0] = the sum of x^2: what `_route_logits_kernel` writes with one
    slice, for `_route_topk_kernel`. H in STEPS steps of BLOCK_H, unrolled (their loads in flight
    together); fp32 FMAs, one sum across the row at the end. PDL: it waits first thing."""
    if PDL:
        z = pdl_wait(PDL, True)
        x_ptr, scale_ptr, w_ptr, part_ptr, ss_ptr = x_ptr + z, scale_ptr + z, w_ptr + z, part_ptr + z, ss_ptr + z
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in tl.static_range(STEPS):
        offs_h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        x = tl.load(x_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * stride_wn + offs_h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        ss += x * x
        acc += w * (x * s)[None, :]
    tl.store(part_ptr + offs_e, tl.sum(acc, axis=1), mask=e_ok)
    tl.store(ss_ptr, tl.sum(ss, axis=0), mask=tl.program_id(0) == 0)


@triton.jit
def _route_topk_kernel(part_ptr, ss_ptr, pes_ptr, w_out_ptr, idx_out_ptr, N, E, SPLITS, eps, inv_h, inv_sqrt_h,
                       TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, K_P2: tl.constexpr, PDL: tl.constexpr = 0):
    """One token: sum the H slices into logits (times rstd * H^-0.5), softmax over E, the TOP_K
    largest by repeated argmax (descending, as topk), renormalized, times per_expert_scale. PDL: it
    waits first thing."""
    if PDL:
        z = pdl_wait(PDL, True)
        part_ptr, ss_ptr, pes_ptr, w_out_ptr, idx_out_ptr = (part_ptr + z, ss_ptr + z, pes_ptr + z, w_out_ptr + z,
                                                             idx_out_ptr + z)
    n = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    ss = tl.zeros((1,), dtype=tl.float32)
    for s in range(0, SPLITS):  # fixed order: deterministic
        acc += tl.load(part_ptr + (s * N + n) * E + offs, mask=offs < E, other=0.0)
        ss += tl.load(ss_ptr + s * N + n + tl.arange(0, 1))
    # fp32 math: AOTInductor passes Python floats as fp64 (Triton's own launch as fp32)
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) * tl.cast(inv_h, tl.float32) + tl.cast(eps, tl.float32))
    logits = tl.where(offs < E, acc * (rstd * tl.cast(inv_sqrt_h, tl.float32)), float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(offs < E, p, -1.0)
    slots = tl.arange(0, K_P2)
    vals = tl.zeros((K_P2,), dtype=tl.float32)
    ids = tl.zeros((K_P2,), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        at = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)  # the lowest index among ties
        vals = tl.where(slots == k, best, vals)
        ids = tl.where(slots == k, at, ids)
        p = tl.where(offs == at, -1.0, p)
    k_ok = slots < TOP_K
    vals = tl.where(k_ok, vals, 0.0)
    pes = tl.load(pes_ptr + ids, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(w_out_ptr + n * TOP_K + slots, vals / tl.sum(vals, axis=0) * pes, mask=k_ok)
    tl.store(idx_out_ptr + n * TOP_K + slots, ids.to(tl.int64), mask=k_ok)


@triton.jit
def _word_part(w, x0, x1, x2, x3, x4, x5, x6, x7, ASM: tl.constexpr):
    """sum_i (2^(23 - S_i) + nibble_i(w)) * x_i per int32 word: the nibble pairs shifted to bits 12 and
    16 (w << 12, w << 4, w >> 4, w >> 12), one lop3 and one FMA per nibble (`_nibble_as_float`), the
    offsets still in (`_word_dot` takes them off; the down kernel reads them precomputed beside act)."""
    a = w << 12
    b = w << 4
    c = w >> 4
    d = w >> 12
    part = _nibble_as_float(a, 12, ASM) * x0
    part += _nibble_as_float(a, 16, ASM) * x1
    part += _nibble_as_float(b, 12, ASM) * x2
    part += _nibble_as_float(b, 16, ASM) * x3
    part += _nibble_as_float(c, 12, ASM) * x4
    part += _nibble_as_float(c, 16, ASM) * x5
    part += _nibble_as_float(d, 12, ASM) * x6
    part += _nibble_as_float(d, 16, ASM) * x7
    return part


@triton.jit
def _word_dot(w, x0, x1, x2, x3, x4, x5, x6, x7, ASM: tl.constexpr):
    """sum_i (nibble_i(w) - 8) * x_i per int32 word (k = 8j + i in bits 4i .. 4i + 3): `_word_part`
    with the offsets (2^(23 - S) + 8: 2056 and 136) taken off once per word against x alone, which
    broadcasts over the rows (no per-row cost)."""
    corr = 2056.0 * (x0 + x2 + x4 + x6) + 136.0 * (x1 + x3 + x5 + x7)
    return _word_part(w, x0, x1, x2, x3, x4, x5, x6, x7, ASM) - corr


@triton.jit
def _bf16_pairs(xw_ptr, word, mask):
    """x[8j .. 8j + 7] of words j (bf16, four 32-bit loads of pairs) as eight fp32 tensors."""
    p0 = tl.load(xw_ptr + word * 4, mask=mask, other=0)
    p1 = tl.load(xw_ptr + word * 4 + 1, mask=mask, other=0)
    p2 = tl.load(xw_ptr + word * 4 + 2, mask=mask, other=0)
    p3 = tl.load(xw_ptr + word * 4 + 3, mask=mask, other=0)
    return ((p0 << 16).to(tl.float32, bitcast=True), (p0 & -65536).to(tl.float32, bitcast=True),
            (p1 << 16).to(tl.float32, bitcast=True), (p1 & -65536).to(tl.float32, bitcast=True),
            (p2 << 16).to(tl.float32, bitcast=True), (p2 & -65536).to(tl.float32, bitcast=True),
            (p3 << 16).to(tl.float32, bitcast=True), (p3 & -65536).to(tl.float32, bitcast=True))


@triton.jit
def _gate_up_tile(grows, urows, gsc, usc, word, offs_g, n_ok, g0, NGROUPS: tl.constexpr, WORDS: tl.constexpr):
    """The gate and up word tiles and scales of groups g0 .. g0 + GROUPS - 1 (masked past the row)."""
    m = n_ok & (g0 + offs_g < NGROUPS)[None, :, None]
    return (tl.load(grows + g0 * WORDS + word, mask=m, other=0), tl.load(urows + g0 * WORDS + word, mask=m, other=0),
            tl.load(gsc + g0, mask=m, other=0.0), tl.load(usc + g0, mask=m, other=0.0))


@triton.jit
def _down_tile(rows, srows, idx_ptr, offs_g, n_ok, c0, c_hi, stride_qe, stride_se, NGROUPS: tl.constexpr,
               WORDS: tl.constexpr):
    """The down word tile and scales of columns c0 .. c0 + GROUPS - 1 ((slot, group) pairs; each
    column's expert read from idx on the device; masked from c_hi on)."""
    c = c0 + offs_g
    c_ok = c < c_hi
    slot = c // NGROUPS
    grp = c - slot * NGROUPS
    e = tl.load(idx_ptr + slot, mask=c_ok, other=0).to(tl.int64)
    m = n_ok & c_ok[None, :, None]
    return (tl.load(rows + (e * (stride_qe * 4) + grp * WORDS)[None, :, None], mask=m, other=0),
            tl.load(srows + (e * stride_se + grp)[None, :, None], mask=m, other=0.0))


@triton.jit
def _gemv_words_gate_up_kernel(x_ptr, idx_ptr, q_ptr, s_ptr, act_ptr, I, ACT_STRIDE, stride_qe, stride_qn,
                               stride_se, stride_sn, NGROUPS: tl.constexpr, GROUP: tl.constexpr,
                               DOWN_GROUP: tl.constexpr,
                               X_BF16: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                               DEPTH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0, zc_ptr=None,
                               ZC: tl.constexpr = 0):
    """act[slot, n] = gelu(gate[n]) * up[n] of expert idx[slot] for one token (fp32), the packed
    rows read as int32 words: a step reads GROUPS whole groups of BLOCK_N gate rows and the
    same of up rows ([BLOCK_N, GROUPS, GROUP / 8] tiles, 16-byte loads); the tiles of a step are
    loaded DEPTH steps ahead (a program's few steps would otherwise each wait out the memory
    latency: Triton pipelines no loads outside a dot). PDL: it waits first thing (the rows it reads
    follow idx). ZC: the first program zeroes zc_ptr[0] (the down kernel's counter, `_moe_close_row`)."""
    if PDL:
        z = pdl_wait(PDL, ASM)
        x_ptr, idx_ptr, q_ptr, s_ptr, act_ptr = x_ptr + z, idx_ptr + z, q_ptr + z, s_ptr + z, act_ptr + z
        if ZC:
            zc_ptr = zc_ptr + z
    WORDS: tl.constexpr = GROUP // 8
    pid_n, slot = tl.program_id(0), tl.program_id(1)
    if ZC:
        if (pid_n == 0) & (slot == 0):
            tl.store(zc_ptr, 0)
    e = tl.load(idx_ptr + slot).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < I)[:, None, None]
    offs_g = tl.arange(0, GROUPS)
    word = (offs_g[:, None] * WORDS + tl.arange(0, WORDS)[None, :])[None, :, :]  # [1, GROUPS, WORDS]
    q = q_ptr.to(tl.pointer_type(tl.int32))  # strides count 16-byte units: rows of whole 16-byte words
    grows = q + e * (stride_qe * 4) + offs_n.to(tl.int64)[:, None, None] * (stride_qn * 4)
    urows = grows + I * (stride_qn * 4)
    gsc = s_ptr + e * stride_se + offs_n.to(tl.int64)[:, None, None] * stride_sn + offs_g[None, :, None]
    usc = gsc + I * stride_sn
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    # tiles of step t (groups t * GROUPS ..) are loaded DEPTH steps before they are used
    wg, wu, sg, su = _gate_up_tile(grows, urows, gsc, usc, word, offs_g, n_ok, 0, NGROUPS, WORDS)
    if DEPTH == 2:
        wg1, wu1, sg1, su1 = _gate_up_tile(grows, urows, gsc, usc, word, offs_g, n_ok, GROUPS, NGROUPS, WORDS)
    else:
        wg1, wu1, sg1, su1 = wg, wu, sg, su
    acc_g = tl.zeros((BLOCK_N, GROUPS, WORDS), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, GROUPS, WORDS), dtype=tl.float32)
    for g0 in range(0, NGROUPS, GROUPS):
        x_ok = (g0 + offs_g < NGROUPS)[None, :, None]
        wg_n, wu_n, sg_n, su_n = _gate_up_tile(grows, urows, gsc, usc, word, offs_g, n_ok, g0 + DEPTH * GROUPS,
                                               NGROUPS, WORDS)
        if X_BF16:
            x0, x1, x2, x3, x4, x5, x6, x7 = _bf16_pairs(xw, g0 * WORDS + word, x_ok)
        else:
            xk = x_ptr + (g0 * WORDS + word) * 8
            x0 = tl.load(xk, mask=x_ok, other=0.0).to(tl.float32)
            x1 = tl.load(xk + 1, mask=x_ok, other=0.0).to(tl.float32)
            x2 = tl.load(xk + 2, mask=x_ok, other=0.0).to(tl.float32)
            x3 = tl.load(xk + 3, mask=x_ok, other=0.0).to(tl.float32)
            x4 = tl.load(xk + 4, mask=x_ok, other=0.0).to(tl.float32)
            x5 = tl.load(xk + 5, mask=x_ok, other=0.0).to(tl.float32)
            x6 = tl.load(xk + 6, mask=x_ok, other=0.0).to(tl.float32)
            x7 = tl.load(xk + 7, mask=x_ok, other=0.0).to(tl.float32)
        acc_g += _word_dot(wg, x0, x1, x2, x3, x4, x5, x6, x7, ASM) * sg.to(tl.float32)
        acc_u += _word_dot(wu, x0, x1, x2, x3, x4, x5, x6, x7, ASM) * su.to(tl.float32)
        if DEPTH == 2:
            wg, wu, sg, su = wg1, wu1, sg1, su1
            wg1, wu1, sg1, su1 = wg_n, wu_n, sg_n, su_n
        else:
            wg, wu, sg, su = wg_n, wu_n, sg_n, su_n
            wg1, wu1, sg1, su1 = wg_n, wu_n, sg_n, su_n
    gate = tl.sum(tl.sum(acc_g, axis=2), axis=1)
    up = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    _store_act(act_ptr + slot * ACT_STRIDE, gelu_tanh(gate) * up, pid_n, I, BLOCK_N, DOWN_GROUP)


@triton.jit
def _store_act(row_ptr, act, pid_n, I, BLOCK_N: tl.constexpr, DOWN_GROUP: tl.constexpr):
    """act [BLOCK_N] (rows pid_n * BLOCK_N .. of I) into its slot's row in the down kernel's word order
    (`decode_act_pack`): group g of DOWN_GROUP k's takes 9 runs of DOWN_GROUP / 8, x_i of its words
    (k = 8j + i) in run i and their offsets in run 8."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    DW: tl.constexpr = DOWN_GROUP // 8
    g = offs_n // DOWN_GROUP
    r = offs_n - g * DOWN_GROUP
    tl.store(row_ptr + g * (9 * DW) + (r % 8) * DW + r // 8, act, mask=offs_n < I)
    a8 = tl.reshape(act, (BLOCK_N // 8, 8))
    i8 = tl.arange(0, 8)
    corr = tl.sum(a8 * tl.where(i8 % 2 == 0, 2056.0, 136.0)[None, :], axis=1)
    kw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # word index along I
    gw = kw // DW
    tl.store(row_ptr + gw * (9 * DW) + 8 * DW + (kw - gw * DW), corr, mask=kw * 8 < I)


@triton.jit
def _gemv_q_gate_up_kernel(xq_ptr, xf_ptr, xc_ptr, idx_ptr, q_ptr, s_ptr, act_ptr, I, KW, ACT_STRIDE, stride_qe,
                           stride_qn, stride_se, stride_sn, GROUP: tl.constexpr, DOWN_GROUP: tl.constexpr,
                           BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0):
    """`_gemv_words_gate_up_kernel`'s act with x as `_quant_x_kernel`'s two int8 levels (xq_ptr its planes,
    xf_ptr / xc_ptr its per-group factor and correction) and dp4a: the int4 op's per-lane loop
    (`int4_matmul._gemv1_loop_q`) over BLOCK_N gate rows and the same up rows of expert idx[slot] as one
    tile of 2 BLOCK_N rows (the stack's rows 0..I-1 gate, I..2I-1 up), GROUPS whole groups a step. Strides
    count int32 words (q) and elements (s). PDL: it waits first thing (the rows follow idx), and the loop's
    own wait then returns at once (x's levels through its coherent loads)."""
    if PDL:
        z = pdl_wait(PDL, ASM)
        xq_ptr, xf_ptr, xc_ptr, idx_ptr, act_ptr = xq_ptr + z, xf_ptr + z, xc_ptr + z, idx_ptr + z, act_ptr + z
    WORDS: tl.constexpr = GROUP // 8
    pid_n, slot = tl.program_id(0), tl.program_id(1)
    e = tl.load(idx_ptr + slot).to(tl.int64)
    j = tl.arange(0, 2 * BLOCK_N)
    n = pid_n * BLOCK_N + j % BLOCK_N
    rows = tl.where(j < BLOCK_N, tl.minimum(n, I - 1), I + n)  # a gate row past I reads the last gate row
    w_ptr = q_ptr.to(tl.pointer_type(tl.int32)) + e * stride_qe
    start = (tl.arange(0, GROUPS) * WORDS)[None, :, None]
    hi = tl.full((1, GROUPS, 1), 0, tl.int32) + KW
    val = _gemv1_loop_q(xq_ptr, xf_ptr, xc_ptr, w_ptr, s_ptr + e * stride_se, rows, 2 * I, KW, start,
                                    hi, KW // WORDS, stride_qn, stride_sn, WORDS, GROUPS * WORDS, ASM, PDL, 2)
    gate, up = tl.split(tl.permute(tl.reshape(val, (2, BLOCK_N)), (1, 0)))
    _store_act(act_ptr + slot * ACT_STRIDE, gelu_tanh(gate) * up, pid_n, I, BLOCK_N, DOWN_GROUP)


@triton.jit
def _gemv_words_down_kernel(act_ptr, w_ptr, idx_ptr, q_ptr, s_ptr, out_ptr, N_OUT, ACT_STRIDE, C_PER_SPLIT, stride_qe,
                            stride_qn, stride_se, stride_sn, stride_os, TOP_K: tl.constexpr,
                            NGROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUPS: tl.constexpr, DEPTH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0,
                            XTILE: tl.constexpr = 0, CLOSE: tl.constexpr = 0, ccnt_ptr=None, ym_ptr=None, ch_ptr=None,
                            w1_ptr=None, w2_ptr=None, wc_ptr=None, cs_ptr=None, co_ptr=None, ceps=0.0,
                            CSTEPS: tl.constexpr = 0):
    """out[pid_s, n] = sum over one slice of the (slot, group) columns of weight[slot] * the
    down rows of expert idx[slot] . act[slot] (one token). The top_k experts' groups form one
    axis of TOP_K * NGROUPS columns, so a step of GROUPS columns can span two experts and one
    program keeps the whole (slot, k) stream in flight (tiles loaded DEPTH steps ahead); the
    routing weight rides on the scale.
    With one slice the sum goes straight to the output (its dtype), else to fp32 partials. PDL: it
    waits first thing. XTILE: act loaded as a tile of BLOCK_N equal rows (`DOWN_XTILE`). CLOSE (one slice):
    the last program also writes the MoE layer's closing add into co_ptr (`_moe_close_row`)."""
    if PDL:
        z = pdl_wait(PDL, ASM)
        act_ptr, w_ptr, idx_ptr, q_ptr, s_ptr, out_ptr = (act_ptr + z, w_ptr + z, idx_ptr + z, q_ptr + z, s_ptr + z,
                                                          out_ptr + z)
        if CLOSE:
            ccnt_ptr, ym_ptr, ch_ptr, co_ptr = ccnt_ptr + z, ym_ptr + z, ch_ptr + z, co_ptr + z
    WORDS: tl.constexpr = GROUP // 8
    C: tl.constexpr = TOP_K * NGROUPS
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N_OUT)[:, None, None]
    offs_g = tl.arange(0, GROUPS)
    wd = tl.arange(0, WORDS)[None, None, :]
    q = q_ptr.to(tl.pointer_type(tl.int32))  # strides count 16-byte units: rows of whole 16-byte words
    rows = q + offs_n.to(tl.int64)[:, None, None] * (stride_qn * 4) + wd
    srows = s_ptr + offs_n.to(tl.int64)[:, None, None] * stride_sn
    c_lo = pid_s * C_PER_SPLIT
    c_hi = tl.minimum(c_lo + C_PER_SPLIT, C)
    # tiles of a step are loaded DEPTH steps before they are used
    w, s = _down_tile(rows, srows, idx_ptr, offs_g, n_ok, c_lo, c_hi, stride_qe, stride_se, NGROUPS, WORDS)
    if DEPTH == 2:
        w1, s1 = _down_tile(rows, srows, idx_ptr, offs_g, n_ok, c_lo + GROUPS, c_hi, stride_qe, stride_se, NGROUPS,
                            WORDS)
    else:
        w1, s1 = w, s
    acc = tl.zeros((BLOCK_N, GROUPS, WORDS), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, GROUPS):
        w_n, s_n = _down_tile(rows, srows, idx_ptr, offs_g, n_ok, c0 + DEPTH * GROUPS, c_hi, stride_qe, stride_se,
                              NGROUPS, WORDS)
        c = c0 + offs_g
        c_ok = c < c_hi
        slot = c // NGROUPS
        grp = c - slot * NGROUPS
        x_ok = c_ok[None, :, None]
        ak = act_ptr + (slot * ACT_STRIDE + grp * (9 * WORDS))[None, :, None] + wd  # run i: x_i of the words
        if XTILE:  # the weight tile's shape, so the weight tile's layout
            ak = ak + (offs_n * 0)[:, None, None]
        rw = tl.load(w_ptr + slot, mask=c_ok, other=0.0)[None, :, None]
        x0 = tl.load(ak, mask=x_ok, other=0.0)
        x1 = tl.load(ak + 1 * WORDS, mask=x_ok, other=0.0)
        x2 = tl.load(ak + 2 * WORDS, mask=x_ok, other=0.0)
        x3 = tl.load(ak + 3 * WORDS, mask=x_ok, other=0.0)
        x4 = tl.load(ak + 4 * WORDS, mask=x_ok, other=0.0)
        x5 = tl.load(ak + 5 * WORDS, mask=x_ok, other=0.0)
        x6 = tl.load(ak + 6 * WORDS, mask=x_ok, other=0.0)
        x7 = tl.load(ak + 7 * WORDS, mask=x_ok, other=0.0)
        corr = tl.load(ak + 8 * WORDS, mask=x_ok, other=0.0)
        acc += (_word_part(w, x0, x1, x2, x3, x4, x5, x6, x7, ASM) - corr) * (s.to(tl.float32) * rw)
        if DEPTH == 2:
            w, s = w1, s1
            w1, s1 = w_n, s_n
        else:
            w, s = w_n, s_n
            w1, s1 = w_n, s_n
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + pid_s * stride_os + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N_OUT)
    if CLOSE:
        _moe_close_row(out_ptr, ccnt_ptr, ym_ptr, ch_ptr, w1_ptr, w2_ptr, wc_ptr, cs_ptr, co_ptr, N_OUT, ceps, CSTEPS)


@triton.jit
def _moe_close_row(y_ptr, ccnt_ptr, ym_ptr, h_ptr, w1_ptr, w2_ptr, wc_ptr, sc_ptr, o_ptr, N, eps,
                   CSTEPS: tl.constexpr):
    """The MoE layer's closing add (`moe_close_reference`), run by each program of the experts' down kernel
    after it wrote its rows of y (the experts' sum): it bumps the row's counter (zeroed by the gate / up kernel
    before; the release as the int4 GEMV's split sum) and the last of them writes, over the row of N,
    o = (h + rms_norm(rms_norm(ym) * w1 + rms_norm(y) * w2) * wc) * sc[0] (ym the dense MLP's output), each
    step rounded as the model's ops leave it, in CSTEPS NORM_BLOCK-wide steps whose loads are in flight
    together (16-byte loads: N a multiple of 8). The counter goes back to 0."""
    tl.debug_barrier()  # every thread's rows stored; one thread's gpu-scope acq_rel atomic releases them
    arrived = tl.atomic_add(ccnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        n8 = N // 8 * 8  # = N; its factor 8 is what the compiler reads (16-byte loads)
        DT: tl.constexpr = y_ptr.dtype.element_ty
        ys = []
        ms = []
        hs = []
        w1s = []
        w2s = []
        wcs = []
        sy = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        sm = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        for i in tl.static_range(CSTEPS):
            o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
            m = o < n8
            yv = tl.load(y_ptr + o, mask=m, other=0.0, cache_modifier=".cg")
            mv = tl.load(ym_ptr + o, mask=m, other=0.0)
            sy += yv.to(tl.float32) * yv.to(tl.float32)
            sm += mv.to(tl.float32) * mv.to(tl.float32)
            ys = ys + [yv]
            ms = ms + [mv]
            hs = hs + [tl.load(h_ptr + o, mask=m, other=0.0)]
            w1s = w1s + [tl.load(w1_ptr + o, mask=m, other=0.0)]
            w2s = w2s + [tl.load(w2_ptr + o, mask=m, other=0.0)]
            wcs = wcs + [tl.load(wc_ptr + o, mask=m, other=0.0)]
        e32 = tl.cast(eps, tl.float32)
        inv_y = 1.0 / tl.sqrt_rn(tl.sum(sy, 0) / N + e32)
        inv_m = 1.0 / tl.sqrt_rn(tl.sum(sm, 0) / N + e32)
        outs = []
        so = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        for i in tl.static_range(CSTEPS):  # the two outputs' norms and their sum, each rounded as the model's
            a = ((ms[i].to(tl.float32) * inv_m) * w1s[i].to(tl.float32)).to(DT).to(tl.float32)
            b = ((ys[i].to(tl.float32) * inv_y) * w2s[i].to(tl.float32)).to(DT).to(tl.float32)
            ov = (a + b).to(DT).to(tl.float32)
            so += ov * ov
            outs = outs + [ov]
        inv_o = 1.0 / tl.sqrt_rn(tl.sum(so, 0) / N + e32)
        s = tl.load(sc_ptr).to(tl.float32)
        for i in tl.static_range(CSTEPS):
            o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
            hv = _residual(hs[i].to(tl.float32), outs[i], wcs[i].to(tl.float32), inv_o, DT, h_ptr.dtype.element_ty)
            tl.store(o_ptr + o, (hv * s).to(o_ptr.dtype.element_ty), mask=o < n8)
        tl.store(ccnt_ptr, 0)


@triton.jit
def _sum_slices_kernel(part_ptr, out_ptr, N, SLICES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    """out[n] = sum over the slices of part[s, n] (fp32, fixed order) in out's dtype. PDL: it waits
    first thing."""
    if PDL:
        z = pdl_wait(PDL, True)
        part_ptr, out_ptr = part_ptr + z, out_ptr + z
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SLICES):
        acc += tl.load(part_ptr + i * N + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _align_kernel(idx_ptr, sorted_ptr, row_off_ptr, NK, E, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    """One program: the NK entries (flat (token, slot) indices) grouped by expert id, stable.
    row_off[e] .. row_off[e + 1] are expert e's rows of `sorted`."""
    ex = tl.arange(0, E_P2)
    e_ok = ex < E
    counts = tl.zeros((E_P2,), dtype=tl.int32)
    for b0 in range(0, NK, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        ids = tl.load(idx_ptr + offs, mask=offs < NK, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == ex[None, :]).to(tl.int32), axis=0)
    row_end = tl.cumsum(counts, axis=0)
    tl.store(row_off_ptr + 1 + ex, row_end, mask=e_ok)
    tl.store(row_off_ptr + ex, tl.zeros((E_P2,), dtype=tl.int32), mask=ex == 0)
    running = row_end - counts  # next free row of each expert
    for b0 in range(0, NK, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        ok = offs < NK
        ids = tl.load(idx_ptr + offs, mask=ok, other=-1).to(tl.int32)
        hit = (ids[:, None] == ex[None, :]).to(tl.int32)  # [BLOCK, E_P2] one-hot
        rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1  # earlier entries of the same expert
        base = tl.sum(hit * running[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, offs, mask=ok & (ids >= 0) & (ids < E))
        running += tl.sum(hit, axis=0)


@triton.jit
def _sort_count_kernel(idx_ptr, counts_ptr, NK, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    """counts[b, e]: the entries of expert e among block b's BLOCK (token, slot) entries."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(idx_ptr + offs, mask=offs < NK, other=-1).to(tl.int32)
    ex = tl.arange(0, E_P2)
    tl.store(counts_ptr + b * E_P2 + ex, tl.sum((ids[:, None] == ex[None, :]).to(tl.int32), axis=0))


@triton.jit
def _sort_scan_kernel(counts_ptr, base_ptr, row_off_ptr, NB, E, ROWS: tl.constexpr, E_P2: tl.constexpr):
    """One program over the NB blocks' counts: base[b, e] = expert e's entries in the blocks before b, and
    row_off[e] .. row_off[e + 1] expert e's rows of the sorted order (as `_align_kernel` writes it)."""
    ex = tl.arange(0, E_P2)
    running = tl.zeros((E_P2,), dtype=tl.int32)
    for b0 in range(0, NB, ROWS):
        rows = b0 + tl.arange(0, ROWS)
        ok = rows < NB
        at = rows[:, None] * E_P2 + ex[None, :]
        c = tl.load(counts_ptr + at, mask=ok[:, None], other=0)
        tl.store(base_ptr + at, tl.cumsum(c, axis=0) - c + running[None, :], mask=ok[:, None])
        running += tl.sum(c, axis=0)
    running = tl.where(ex < E, running, 0)
    tl.store(row_off_ptr + 1 + ex, tl.cumsum(running, axis=0), mask=ex < E)
    tl.store(row_off_ptr + ex, tl.zeros((E_P2,), dtype=tl.int32), mask=ex == 0)


@triton.jit
def _sort_scatter_kernel(idx_ptr, base_ptr, row_off_ptr, sorted_ptr, NK, E, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    """Block b's entries to their places in the sorted order: their expert's first row, the expert's entries
    in the blocks before (base) and the earlier ones of this block (stable, as `_align_kernel`)."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NK
    ids = tl.load(idx_ptr + offs, mask=ok, other=-1).to(tl.int32)
    ex = tl.arange(0, E_P2)
    hit = (ids[:, None] == ex[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1
    start = tl.load(row_off_ptr + ex, mask=ex < E, other=0) + tl.load(base_ptr + b * E_P2 + ex)
    tl.store(sorted_ptr + tl.sum(hit * start[None, :], axis=1) + rank, offs, mask=ok & (ids >= 0) & (ids < E))


@triton.jit
def _grouped_step(acc, a_even, a_odd, w_rows, s_rows, k0, n_ok, offs_b, stride_qn, stride_sn, row0,
                  GROUP: tl.constexpr, FP32: tl.constexpr, JOIN: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """acc += x tile @ the dequantized [BLOCK_N, BLOCK_K] weight tile from row `row0` on (JOIN: a_even
    is the whole x tile and the nibbles are interleaved back; else two half-K dots)."""
    p = tl.load(w_rows + row0 * stride_qn + (k0 // 2 + offs_b)[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
    s = tl.load(s_rows + row0 * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    lo, hi = _nibbles(p)
    lo, hi = (lo * s).to(a_even.dtype), (hi * s).to(a_even.dtype)
    if JOIN:
        w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)
        if FP32:
            acc = tl.dot(a_even, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_even, tl.trans(w), acc)
    else:
        if FP32:
            acc = tl.dot(a_even, tl.trans(lo), acc, input_precision="ieee")
            acc = tl.dot(a_odd, tl.trans(hi), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_even, tl.trans(lo), acc)
            acc = tl.dot(a_odd, tl.trans(hi), acc)
    return acc


@triton.jit
def _grouped_kernel(a_ptr, sorted_ptr, row_off_ptr, q_ptr, s_ptr, w_ptr, out_ptr,
                    N_OUT, K, E, stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_om, NK_BUCKET,
                    GATE_UP: tl.constexpr, TOP_K: tl.constexpr, FP32: tl.constexpr, GROUP: tl.constexpr,
                    E_P2: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    JOIN: tl.constexpr):
    """One TILE-row tile of one expert's grouped rows x BLOCK_N output columns.
    GATE_UP: rows gather x by token, write act[row] = gelu(gate) * up in grouped order (x dtype).
    down: rows read act in grouped order, write out[entry] = weight[entry] * (act @ down.T) (fp32)."""
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    ex = tl.arange(0, E_P2)
    starts = tl.load(row_off_ptr + ex, mask=ex < E, other=0)
    ends = tl.load(row_off_ptr + 1 + ex, mask=ex < E, other=0)
    tiles = (ends - starts + TILE - 1) // TILE  # each expert's TILE-row tiles, in expert order
    tile_end = tl.where(ex < E, tl.cumsum(tiles, axis=0), 2147483647)
    e = tl.sum((tile_end <= pid_t).to(tl.int32), axis=0)  # tiles of experts 0..e-1 end at or before this one
    if e < E:
        here = ex == e
        first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
        row_end = tl.sum(tl.where(here, ends, 0), axis=0)
        rows = tl.sum(tl.where(here, starts, 0), axis=0) + (pid_t - first_tile) * TILE + tl.arange(0, TILE)
        r_ok = rows < row_end
        entry = tl.load(sorted_ptr + rows, mask=r_ok, other=0)
        a_rows = entry // TOP_K if GATE_UP else rows
        a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        offs_b = tl.arange(0, BLOCK_K // 2)
        e64 = e.to(tl.int64)
        w_rows = q_ptr + e64 * stride_qe + offs_n.to(tl.int64)[:, None] * stride_qn
        s_rows = s_ptr + e64 * stride_se + offs_n * stride_sn
        acc = tl.zeros((TILE, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((TILE, BLOCK_N), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            if JOIN:  # one x tile as stored, the weight tile interleaved back to k order (register shuffle)
                a_all = tl.load(a_base + (k0 + offs_k)[None, :], mask=r_ok[:, None], other=0.0)
                a_even, a_odd = a_all, a_all
            else:  # even and odd k meet their own nibble: two dots of BLOCK_K / 2, no interleave
                a_even = tl.load(a_base + (k0 + 2 * offs_b)[None, :], mask=r_ok[:, None], other=0.0)
                a_odd = tl.load(a_base + (k0 + 2 * offs_b + 1)[None, :], mask=r_ok[:, None], other=0.0)
            acc = _grouped_step(acc, a_even, a_odd, w_rows, s_rows, k0, n_ok, offs_b, stride_qn, stride_sn, 0,
                                GROUP, FP32, JOIN, BLOCK_N, BLOCK_K)
            if GATE_UP:
                acc_up = _grouped_step(acc_up, a_even, a_odd, w_rows, s_rows, k0, n_ok, offs_b, stride_qn, stride_sn,
                                       N_OUT, GROUP, FP32, JOIN, BLOCK_N, BLOCK_K)
        mask = r_ok[:, None] & n_ok[None, :]
        if GATE_UP:
            act = gelu_tanh(acc) * acc_up
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                     act.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            wk = tl.load(w_ptr + entry, mask=r_ok, other=0.0)
            tl.store(out_ptr + entry.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc * wk[:, None], mask=mask)


# ---- launch (wrap = wrap_triton inside the ops; identity for the Triton interpreter) ---------


def _identity(f):
    return f


def launch_route(x, scale, proj_weight, per_expert_scale, top_k: int, eps: float, wrap=_identity,
                 gemv1: bool | None = None):
    """The routing's two kernels; gemv1: a decode token's logits through `_route_gemv1_kernel` (None:
    `route_gemv1()`; a token count other than a concrete 1 takes the slices kernel either way)."""
    N, H = x.shape
    E = proj_weight.shape[0]
    pdl = op_pdl_mode(x.device)  # the attribute comes from the artifact's launcher (PDL_KERNELS)
    if isinstance(N, int) and N == 1 and (route_gemv1() if gemv1 is None else gemv1):
        splits = 1
        part = torch.empty((1, 1, E), device=x.device, dtype=torch.float32)
        ss = torch.empty((1, 1), device=x.device, dtype=torch.float32)
        wrap(_route_gemv1_kernel)[(triton.cdiv(E, ROUTE_GEMV1_BLOCK_E),)](
            x, scale, proj_weight, part, ss, H, E, proj_weight.stride(0), BLOCK_E=ROUTE_GEMV1_BLOCK_E,
            BLOCK_H=ROUTE_GEMV1_BLOCK_H, STEPS=triton.cdiv(H, ROUTE_GEMV1_BLOCK_H), PDL=pdl, num_warps=4)
    else:
        splits = triton.cdiv(H, ROUTE_H_SLICE)
        part = torch.empty((splits, N, E), device=x.device, dtype=torch.float32)
        ss = torch.empty((splits, N), device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), triton.cdiv(E, meta["BLOCK_E"]), splits)  # noqa: E731
        wrap(_autotuned("route"))[grid](x, scale, proj_weight, part, ss, N, H, E, ROUTE_H_SLICE, x.stride(0),
                                        proj_weight.stride(0), PDL=pdl)
    weights = torch.empty((N, top_k), device=x.device, dtype=torch.float32)
    idx = torch.empty((N, top_k), device=x.device, dtype=torch.int64)
    # one warp: its 2 * TOP_K + 2 reductions are shuffles, no barriers
    wrap(_route_topk_kernel)[(N,)](part, ss, per_expert_scale, weights, idx, N, E, splits, eps, 1.0 / H, H ** -0.5,
                                   TOP_K=top_k, BLOCK_E=triton.next_power_of_2(E), K_P2=triton.next_power_of_2(top_k),
                                   PDL=pdl, num_warps=1)
    return weights, idx


def _groups(gate_up_scales, down_scales, H: int, I: int) -> tuple[int, int]:
    return H // gate_up_scales.shape[-1], I // down_scales.shape[-1]


def decode_act_pack(act: torch.Tensor, down_group: int) -> torch.Tensor:
    """act [top_k, I] (k order) in the decode's layout for the down kernel, [top_k, act_stride]:
    group g of `down_group` k's at g * 9 * W (W = down_group / 8 words), x[8j + i] at i * W + j,
    and at 8 * W + j word j's offset sum_i (2056 if i even else 136) * x[8j + i] (`_word_dot`)."""
    top_k, I = act.shape
    W, G = down_group // 8, I // down_group
    x = act.view(top_k, G, W, 8)
    corr = (x * torch.tensor([2056.0, 136.0] * 4, device=act.device, dtype=act.dtype)).sum(-1)
    runs = torch.cat([x.permute(0, 1, 3, 2), corr[:, :, None, :]], dim=2).reshape(top_k, G * 9 * W)
    out = torch.zeros((top_k, decode_act_stride(I)), device=act.device, dtype=act.dtype)
    out[:, :G * 9 * W] = runs
    return out


def decode_act_stride(I: int) -> int:
    """Row length of the decode's act buffer: 9 / 8 of I, rounded up to 16 elements (64 bytes)."""
    return triton.cdiv(I * 9 // 8, 16) * 16


def launch_decode_gate_up(x, idx, gu_q, gu_s, down_group, wrap=_identity, cfg=None, zero=None):
    """gelu(gate) * up of each picked expert for one token (x [1, H]), fp32 in the down kernel's
    layout (`decode_act_pack`: words' x in runs, their offsets beside them). BLOCK_N a multiple of 8.
    `cfg` (BLOCK_N, GROUPS, num_warps[, DEPTH]) bypasses autotuning. zero: an int32 counter the kernel
    zeroes (its ZC: the down kernel's close)."""
    H, I, top_k = x.shape[1], gu_q.shape[1] // 2, idx.shape[1]
    G = H // gu_s.shape[-1]
    act = torch.empty((top_k, decode_act_stride(I)), device=x.device, dtype=torch.float32)
    # strides count 16-byte units (a row is a whole number of them: K is a multiple of G >= 32)
    args = (x, idx, gu_q, gu_s, act, I, act.stride(0), gu_q.stride(0) // 16, gu_q.stride(1) // 16, gu_s.stride(0),
            gu_s.stride(1))
    meta = dict(NGROUPS=H // G, GROUP=G, DOWN_GROUP=down_group, X_BF16=x.dtype == torch.bfloat16,
                ASM=x.device.type == "cuda", PDL=op_pdl_mode(x.device), zc_ptr=zero if zero is not None else idx,
                ZC=int(zero is not None))
    if cfg:
        bn, gr, warps, depth = (*cfg, 1)[:4]
        wrap(_gemv_words_gate_up_kernel)[(triton.cdiv(I, bn), top_k)](*args, **meta, BLOCK_N=bn, GROUPS=gr,
                                                                      DEPTH=depth, num_warps=warps, num_stages=1)
    else:
        grid = lambda m: (triton.cdiv(I, m["BLOCK_N"]), top_k)  # noqa: E731
        wrap(_autotuned("words_gate_up", G))[grid](*args, **meta)
    return act


def launch_decode_gate_up_q(x, idx, gu_q, gu_s, down_group, wrap=_identity, cfg=None, norm=None, zero=None):
    """`launch_decode_gate_up`'s act through `_gemv_q_gate_up_kernel`: x quantized first (`_quant_x_kernel`, two
    int8 levels a group; with norm (weight [H] in x's dtype, eps) rms_norm(x) * weight, the norm computed by that
    kernel: the experts' input norm's launch), then dp4a. `cfg` (BLOCK_N, GROUPS, num_warps); default
    GATE_UP_Q_CONFIG. zero: an int32 counter x's quantize kernel zeroes (the down kernel's close)."""
    H, I, top_k = x.shape[1], gu_q.shape[1] // 2, idx.shape[1]
    G = H // gu_s.shape[-1]
    bn, gr, warps = cfg or GATE_UP_Q_CONFIG
    cnt = zero if zero is not None else torch.empty((1,), device=x.device, dtype=torch.int32)  # no split sum
    xq, xf, xc = int4_matmul._quant_x(x.contiguous(), G, cnt, int(zero is not None), norm=norm)
    act = torch.empty((top_k, decode_act_stride(I)), device=x.device, dtype=torch.float32)
    words = gu_q.view(torch.int32)
    wrap(_gemv_q_gate_up_kernel)[(triton.cdiv(I, bn), top_k)](
        xq, xf, xc, idx, words, gu_s, act, I, H // 8, act.stride(0), words.stride(0), words.stride(1),
        gu_s.stride(0), gu_s.stride(1), GROUP=G, DOWN_GROUP=down_group, BLOCK_N=bn, GROUPS=gr,
        ASM=x.device.type == "cuda", PDL=op_pdl_mode(x.device), num_warps=warps, num_stages=1)
    return act


def launch_decode_down(act, weights, idx, d_q, d_s, dtype, wrap=_identity, cfg=None, slices=None, xtile=None,
                       close=None):
    """y [1, H] in `dtype` = sum over slots of weights[slot] * down(idx[slot]) @ act[slot] (act as
    `decode_act_pack` lays it out), the (slot, group) columns in `slices` slices (fp32 partials
    and one sum kernel when > 1). `cfg` (BLOCK_N, GROUPS, num_warps[, DEPTH]) bypasses autotuning.
    xtile: the kernel's XTILE (None: DOWN_XTILE). close (one slice): (counter, ym, h, w1, w2, wc, scalar, eps,
    out [1, H]): the kernel also writes the MoE layer's closing add into out (its CLOSE, `_moe_close_row`; the
    counter zeroed before)."""
    H, I, top_k = d_q.shape[1], d_q.shape[2] * 2, idx.shape[1]
    G = I // d_s.shape[-1]
    slices = DOWN_SLICES if slices is None else slices
    c_per = triton.cdiv(top_k * (I // G), slices)
    out = torch.empty((slices, H), device=act.device, dtype=dtype if slices == 1 else torch.float32)
    args = (act, weights, idx, d_q, d_s, out, H, act.stride(0), c_per, d_q.stride(0) // 16, d_q.stride(1) // 16,
            d_s.stride(0), d_s.stride(1), out.stride(0))
    pdl = op_pdl_mode(act.device)
    meta = dict(TOP_K=top_k, NGROUPS=I // G, GROUP=G, ASM=act.device.type == "cuda", PDL=pdl,
                XTILE=int(DOWN_XTILE if xtile is None else xtile))
    if close is not None:
        if slices != 1 or H % 8:
            raise ValueError(f"launch_decode_down close: one slice (got {slices}) and rows a multiple of 8 (got {H})")
        cnt, ym, h, w1, w2, wc, scalar, eps, o = close
        meta.update(CLOSE=1, ccnt_ptr=cnt, ym_ptr=ym, ch_ptr=h, w1_ptr=w1, w2_ptr=w2, wc_ptr=wc, cs_ptr=scalar,
                    co_ptr=o, ceps=float(eps), CSTEPS=norm_steps(H))
    else:
        meta.update(CLOSE=0, ccnt_ptr=idx, ym_ptr=out, ch_ptr=out, w1_ptr=out, w2_ptr=out, wc_ptr=out, cs_ptr=out,
                    co_ptr=out, ceps=0.0, CSTEPS=0)
    if cfg:
        bn, gr, warps, depth = (*cfg, 1)[:4]
        wrap(_gemv_words_down_kernel)[(triton.cdiv(H, bn), slices)](*args, **meta, BLOCK_N=bn, GROUPS=gr,
                                                                    DEPTH=depth, num_warps=warps, num_stages=1)
    else:
        grid = lambda m: (triton.cdiv(H, m["BLOCK_N"]), slices)  # noqa: E731
        wrap(_autotuned("words_down", G))[grid](*args, **meta)
    if slices == 1:
        return out
    y = torch.empty((1, H), device=act.device, dtype=dtype)
    wrap(_sum_slices_kernel)[(triton.cdiv(H, 1024),)](out, y, H, SLICES=slices, BLOCK=1024, PDL=pdl, num_warps=4)
    return y


def launch_experts_decode(x, weights, idx, gu_q, gu_s, d_q, d_s, wrap=_identity, gate_up_cfg=None, down_cfg=None,
                          slices=None, norm=None):
    """One token (x [1, H]): the word GEMVs over the top_k experts named by idx (on the device):
    static shapes, no host sync, CUDA-graph safe. norm (weight, eps), with GATE_UP_Q only: the experts
    take rms_norm(x) * weight, computed by x's quantize kernel."""
    assert norm is None or GATE_UP_Q, "the norm goes with x's quantize kernel (GATE_UP_Q)"
    x1, w1, idx1 = x.contiguous(), weights.contiguous(), idx.contiguous()
    down_group = d_q.shape[2] * 2 // d_s.shape[2]
    if GATE_UP_Q:
        act = launch_decode_gate_up_q(x1, idx1, gu_q, gu_s, down_group, wrap, gate_up_cfg, norm)
    else:
        act = launch_decode_gate_up(x1, idx1, gu_q, gu_s, down_group, wrap, gate_up_cfg)
    return launch_decode_down(act, w1, idx1, d_q, d_s, x.dtype, wrap, down_cfg, slices)


def sort_entries(idx: torch.Tensor, sorted_entries: torch.Tensor, row_off: torch.Tensor, E: int, wrap=_identity,
                 parallel: bool | None = None) -> None:
    """The (token, slot) entries of idx [N, top_k] grouped by expert, stable, into sorted_entries [N * top_k]
    and each expert's row range into row_off [E + 1]: `_align_kernel` (one program) or, with `parallel`
    (None: `sort_parallel()`), the count / scan / scatter kernels over SORT_BLOCK entries a program."""
    NK = idx.shape[0] * idx.shape[1]
    e_p2 = triton.next_power_of_2(E)
    if not (sort_parallel() if parallel is None else parallel):
        wrap(_align_kernel)[(1,)](idx, sorted_entries, row_off, NK, E, BLOCK=ALIGN_BLOCK, E_P2=e_p2)
        return
    nb = (NK + SORT_BLOCK - 1) // SORT_BLOCK
    counts = torch.empty((nb, e_p2), device=idx.device, dtype=torch.int32)
    base = torch.empty((nb, e_p2), device=idx.device, dtype=torch.int32)
    wrap(_sort_count_kernel)[(nb,)](idx, counts, NK, BLOCK=SORT_BLOCK, E_P2=e_p2)
    wrap(_sort_scan_kernel)[(1,)](counts, base, row_off, nb, E, ROWS=SORT_SCAN_ROWS, E_P2=e_p2)
    wrap(_sort_scatter_kernel)[(nb,)](idx, base, row_off, sorted_entries, NK, E, BLOCK=SORT_BLOCK, E_P2=e_p2)


def launch_experts_grouped(x, weights, idx, gu_q, gu_s, d_q, d_s, wrap=_identity):
    """Any number of tokens: sort the (token, slot) entries by expert, a grouped GEMM per
    projection over the experts' tiles, then each token sums its top_k weighted outputs."""
    N, H = x.shape
    E, I, top_k = gu_q.shape[0], d_q.shape[2] * 2, idx.shape[1]
    g_gu, g_d = _groups(gu_s, d_s, H, I)
    NK = N * top_k
    x1, w1 = x.contiguous(), weights.contiguous()
    sorted_entries = torch.empty((NK,), device=x.device, dtype=torch.int32)
    row_off = torch.empty((E + 1,), device=x.device, dtype=torch.int32)
    e_p2 = triton.next_power_of_2(E)
    sort_entries(idx.contiguous(), sorted_entries, row_off, E, wrap)
    bucket = min(triton.next_power_of_2(NK), 16384) if isinstance(NK, int) else 16384  # the autotuner's key
    fp32 = x.dtype == torch.float32
    act = torch.empty((NK, I), device=x.device, dtype=x.dtype)  # grouped order
    # each expert adds at most one partial tile
    grid = lambda meta: (triton.cdiv(NK, meta["TILE"]) + E, triton.cdiv(I, meta["BLOCK_N"]))  # noqa: E731
    wrap(_autotuned("grouped_gate_up", g_gu))[grid](
        x1, sorted_entries, row_off, gu_q, gu_s, w1, act, I, H, E, x1.stride(0), gu_q.stride(0),
        gu_q.stride(1), gu_s.stride(0), gu_s.stride(1), act.stride(0), bucket, GATE_UP=True, TOP_K=top_k, FP32=fp32,
        GROUP=g_gu, E_P2=e_p2)
    per_entry = torch.empty((NK, H), device=x.device, dtype=torch.float32)  # (token, slot) order
    grid = lambda meta: (triton.cdiv(NK, meta["TILE"]) + E, triton.cdiv(H, meta["BLOCK_N"]))  # noqa: E731
    wrap(_autotuned("grouped_down", g_d))[grid](
        act, sorted_entries, row_off, d_q, d_s, w1, per_entry, H, I, E, act.stride(0), d_q.stride(0),
        d_q.stride(1), d_s.stride(0), d_s.stride(1), per_entry.stride(0), bucket, GATE_UP=False, TOP_K=top_k,
        FP32=fp32, GROUP=g_d, E_P2=e_p2)
    return per_entry.view(N, top_k, H).sum(1).to(x.dtype)


# ---- the ops --------------------------------------------------------------------------------


def _check_experts(x, weights, idx, gu_q, gu_s, d_q, d_s):
    N, H = x.shape
    E, I2, _ = gu_q.shape
    ok = (gu_q.shape[2] * 2 == H and tuple(d_q.shape) == (E, H, I2 // 4) and gu_s.shape[:2] == gu_q.shape[:2]
          and d_s.shape[:2] == d_q.shape[:2] and weights.shape == idx.shape and idx.shape[0] == N
          and H % gu_s.shape[2] == 0 and (I2 // 2) % d_s.shape[2] == 0)
    if not ok:
        raise ValueError(f"moe_experts_int4: x {tuple(x.shape)}, weights {tuple(weights.shape)}, idx "
                         f"{tuple(idx.shape)}, gate_up {tuple(gu_q.shape)}/{tuple(gu_s.shape)}, down "
                         f"{tuple(d_q.shape)}/{tuple(d_s.shape)} do not agree")


@triton_op("gemma4::moe_route", mutates_args={})
def moe_route(x: torch.Tensor, scale: torch.Tensor, proj_weight: torch.Tensor, per_expert_scale: torch.Tensor,
              top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (routing weights fp32 [N, top_k], expert ids int64 [N, top_k])."""
    if x.device.type != "cuda":
        return moe_route_reference(x, scale, proj_weight, per_expert_scale, top_k, eps)
    return launch_route(x.contiguous(), scale, proj_weight, per_expert_scale, top_k, eps, wrap=wrap_triton)


@moe_route.register_fake
def _(x, scale, proj_weight, per_expert_scale, top_k, eps):
    return (x.new_empty((x.shape[0], top_k), dtype=torch.float32), x.new_empty((x.shape[0], top_k), dtype=torch.int64))


@triton_op("gemma4::moe_experts_int4", mutates_args={})
def moe_experts_int4(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up_qweight: torch.Tensor,
                     gate_up_scales: torch.Tensor, down_qweight: torch.Tensor,
                     down_scales: torch.Tensor) -> torch.Tensor:
    """x [N, H] through each token's top_k int4 experts, summed with `weights` -> [N, H] (x.dtype)."""
    args = (x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    _check_experts(*args)
    if x.device.type != "cuda":
        return moe_experts_reference(*args)
    return _experts_cuda(*args)


def _experts_cuda(*args):
    """`moe_experts_int4` on CUDA: decode's static N == 1 takes the GEMVs; a symbolic N (the prefill method)
    the grouped path."""
    if guard_or_false(args[0].shape[0] == 1):
        return launch_experts_decode(*args, wrap=wrap_triton)
    return launch_experts_grouped(*args, wrap=wrap_triton)


@moe_experts_int4.register_fake
def _(x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales):
    _check_experts(x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    return torch.empty_like(x)


@triton_op("gemma4::moe_rms_experts_int4", mutates_args={})
def moe_rms_experts_int4(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: torch.Tensor,
                         idx: torch.Tensor, gate_up_qweight: torch.Tensor, gate_up_scales: torch.Tensor,
                         down_qweight: torch.Tensor, down_scales: torch.Tensor) -> torch.Tensor:
    """`moe_experts_int4` of rms_norm(x) * norm_weight (the experts' input norm). A decode token with GATE_UP_Q
    and the weight in x's dtype: the norm is computed by x's quantize kernel (no launch of its own). Else: the
    norm in aten ops (Inductor fuses them), then `moe_experts_int4`'s path."""
    stacks = (gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    _check_experts(x, weights, idx, *stacks)
    _check_norm_weight(x, norm_weight)
    if x.device.type != "cuda":
        return moe_rms_experts_reference(x, norm_weight, eps, weights, idx, *stacks)
    return _rms_experts_cuda(x, norm_weight, eps, weights, idx, *stacks)


def _rms_experts_cuda(x, norm_weight, eps, weights, idx, *stacks):
    """`moe_rms_experts_int4` on CUDA: a decode token with GATE_UP_Q (the norm in x's quantize kernel), else the
    norm in aten ops and `_experts_cuda`."""
    if GATE_UP_Q and norm_weight.dtype == x.dtype and guard_or_false(x.shape[0] == 1):
        return launch_experts_decode(x, weights, idx, *stacks, wrap=wrap_triton, norm=(norm_weight.contiguous(), eps))
    return _experts_cuda(rms_norm_reference(x, norm_weight, eps), weights, idx, *stacks)


def _check_norm_weight(x, norm_weight):
    if tuple(norm_weight.shape) != (x.shape[1],):
        raise ValueError(f"moe_rms_experts_int4: norm weight {tuple(norm_weight.shape)} for x of width {x.shape[1]}")


@moe_rms_experts_int4.register_fake
def _(x, norm_weight, eps, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales):
    _check_experts(x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    _check_norm_weight(x, norm_weight)
    return torch.empty_like(x)


def moe_close_reference(x, y, ym, w1, w2, wc, eps: float, scalar):
    """The MoE layer's closing add (export/gemma4/model.py, DecoderLayer.forward with experts): the dense MLP's
    output ym and the experts' y each normed, summed, normed again into the residual x, times the layer scalar:
    (x + rms_norm(rms_norm(ym) * w1 + rms_norm(y) * w2) * wc) * scalar (Gemma 4's RMSNorm, one eps)."""
    rms = int4_matmul.rms_norm_reference
    return (x + rms(rms(ym, w1, eps) + rms(y, w2, eps), wc, eps)) * scalar


def moe_rms_experts_close_reference(x, norm_weight, eps, weights, idx, gate_up_qweight, gate_up_scales, down_qweight,
                                    down_scales, ym, w1, w2, wc, scalar):
    y = moe_rms_experts_reference(x, norm_weight, eps, weights, idx, gate_up_qweight, gate_up_scales, down_qweight,
                                  down_scales)
    return moe_close_reference(x, y, ym, w1, w2, wc, eps, scalar)


def _check_close(x, ym, w1, w2, wc, scalar):
    H = x.shape[1]
    if ym.shape != x.shape or any(tuple(w.shape) != (H,) for w in (w1, w2, wc)) or scalar.numel() != 1:
        raise ValueError(f"moe_rms_experts_close: the dense MLP's output {tuple(ym.shape)} (as x {tuple(x.shape)}), "
                         f"the norms' weights {tuple(w1.shape)} / {tuple(w2.shape)} / {tuple(wc.shape)} ({H},) or "
                         f"the layer scalar {tuple(scalar.shape)} (one element) do not fit")


def close_fused_at_decode(x, norm_weight, ym, w1, w2, wc, scalar) -> bool:
    """Whether the op on CUDA has the experts' down kernel write the closing add: one token, the down GEMV in one
    slice (DOWN_SLICES), the width a multiple of 8, every tensor in x's dtype."""
    return (guard_or_false(x.shape[0] == 1) and DOWN_SLICES == 1 and x.shape[1] % 8 == 0
            and all(t.dtype == x.dtype for t in (norm_weight, ym, w1, w2, wc, scalar)))


@triton_op("gemma4::moe_rms_experts_close", mutates_args={})
def moe_rms_experts_close(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: torch.Tensor,
                          idx: torch.Tensor, gate_up_qweight: torch.Tensor, gate_up_scales: torch.Tensor,
                          down_qweight: torch.Tensor, down_scales: torch.Tensor, ym: torch.Tensor, w1: torch.Tensor,
                          w2: torch.Tensor, wc: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """A MoE layer's end: `moe_rms_experts_int4` (the experts of rms_norm(x) * norm_weight), then
    `moe_close_reference`'s add with the dense MLP's output ym. A decode token (`close_fused_at_decode`): the
    experts' down kernel's last program writes it (`_moe_close_row`; its counter zeroed by the gate / up kernel,
    or with GATE_UP_Q by x's quantize kernel), the add's kernel gone. Else the experts' path, then the add in
    aten ops."""
    stacks = (gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    _check_experts(x, weights, idx, *stacks)
    _check_norm_weight(x, norm_weight)
    _check_close(x, ym, w1, w2, wc, scalar)
    if x.device.type != "cuda":
        return moe_rms_experts_close_reference(x, norm_weight, eps, weights, idx, *stacks, ym, w1, w2, wc, scalar)
    if not close_fused_at_decode(x, norm_weight, ym, w1, w2, wc, scalar):
        y = _rms_experts_cuda(x, norm_weight, eps, weights, idx, *stacks)
        return moe_close_reference(x, y, ym, w1, w2, wc, eps, scalar)
    x1, wts, idx1 = x.contiguous(), weights.contiguous(), idx.contiguous()
    down_group = down_qweight.shape[2] * 2 // down_scales.shape[2]
    cnt = torch.empty((1,), device=x.device, dtype=torch.int32)  # the close's counter, zeroed by the gate / up launch
    if GATE_UP_Q:
        act = launch_decode_gate_up_q(x1, idx1, gate_up_qweight, gate_up_scales, down_group, wrap_triton,
                                      norm=(norm_weight.contiguous(), eps), zero=cnt)
    else:
        act = launch_decode_gate_up(rms_norm_reference(x1, norm_weight, eps), idx1, gate_up_qweight, gate_up_scales,
                                    down_group, wrap_triton, zero=cnt)
    out = torch.empty_like(x1)
    launch_decode_down(act, wts, idx1, down_qweight, down_scales, x.dtype, wrap_triton,
                       close=(cnt, ym.contiguous(), x1, w1.contiguous(), w2.contiguous(), wc.contiguous(),
                              scalar.reshape(1), eps, out))
    return out


@moe_rms_experts_close.register_fake
def _(x, norm_weight, eps, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales, ym, w1, w2, wc,
      scalar):
    _check_experts(x, weights, idx, gate_up_qweight, gate_up_scales, down_qweight, down_scales)
    _check_norm_weight(x, norm_weight)
    _check_close(x, ym, w1, w2, wc, scalar)
    return torch.empty_like(x)
