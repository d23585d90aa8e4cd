"""int4 weight-only linear: `gemma4::int4_linear(x, qweight, scales) -> x @ dequant(W).T`.

Layout (one weight [N, K], no padding; K a multiple of the group size G):
- `qweight` uint8 [N, K // 2]: row n holds W[n, :] in order, two values per byte, k = 2j in the
  low nibble and k = 2j + 1 in the high nibble, stored as q + 8 (q in [-8, 7]). A row is one
  contiguous run of K / 2 bytes, so a program reading BLOCK_N rows x BLOCK_K columns issues
  BLOCK_N coalesced runs of BLOCK_K / 2 bytes.
- `scales` bf16 [N, K // G]: symmetric, W ~= q * scale (no zero point: see `quantize_int4`).
  Bytes per weight: 0.5 + 2 / G (g128: 4.125 bits).

Kernels (Triton, launched through `wrap_triton` so AOTInductor compiles them into the `.so`).
The row of bytes is also a row of int32 words, 8 nibbles each (k = 8j + i in bits 4i..4i+3 of
word j), which is how the M == 1 kernel and the dequant kernel read it (16-byte loads).
- M == 1 (decode, bf16 x): `_quant_x_kernel` turns x into one int8 level with a factor per 32
  elements (x ~= s h; GEMV1_LEVELS) or two per group (x ~= s (h + l / 254)), then
  `_int4_gemv1_kernel` (GEMV1_XQ) multiplies on the CUDA cores with two masks and two dp4a per
  word of 8 nibbles (four with two levels; `_gemv1_tile_lanes`): exact integer sums
  of each lane's 4 words, converted and scaled per lane, summed across lanes once after the
  loop (scripts/gemv1_tile_variants.py). With bf16 x (GEMV1_XQ off) a nibble
  costs a lop3 and an FMA (`_gemv1_tile`), which bounded the kernel at ~50% of the copy
  bandwidth on the H200 where the same loads without the arithmetic ran ~1.5x faster
  (scripts/measurements/int4_gemv1_variants.json). A config and K split per weight shape
  (`gemv1_plan`): small weights (K up to 2048 and N up to 9216, or N up to 512), where a call is
  latency, one launch with bf16 x and a tile whose step covers K in one or two steps; few rows
  read K in parts inside one program (no split), mid-size weights split K with the slices' fp32
  partials summed by the last program of each row block (its counter zeroed by the quantize
  kernel: two launches an op), the largest one slice. Quantizing x inside the GEMV instead (each
  program the groups it reads) measured slower: gate/up 45 -> 57 us.
  Both kernels take a constexpr PDL for programmatic dependent launch (`pdl_wait`): the op
  compiles them in mode 2 on sm_90+ (`op_pdl_mode`), where the artifact's launcher sets the
  attribute (export/backends/cuda.py): each may start while the kernel before it finishes, the
  GEMV loading its first weight tile then (scripts/gemv1_pdl_variants.py, scripts/pdl_ab.py).
  With GEMV1_TMA (on; GEMMA4_GEMV1_TMA=0 turns it off) mid-size weights on sm_90+ take `_int4_gemv1_tma_kernel`
  instead, its weight tiles copied by TMA through a tensor descriptor (`int4_gemv1_tma`; export/host_tma.py
  carries the descriptor through the export's tracing).
- 2 <= M <= GEMV_MAX_M (and M == 1 in another dtype): the GEMM body with M padded to 16, K
  split over programs, fp32 partials [SPLIT_K, M, N] summed by the caller's graph.
- M that cannot reach DEQUANT_MIN_M (a concrete M below it, or a symbolic M whose value range
  ends below it): BLOCK_M x BLOCK_N tiles, packed weight tiles dequantized in registers and fed
  to `tl.dot` (bf16 operands, fp32 accumulator).
- M that can reach DEQUANT_MIN_M, with 16-bit x: `_int4_dequant_kernel` writes W in bf16 to an
  [N, K] scratch (one bandwidth-bound pass) and torch.mm (cuBLAS) multiplies: ~90% of the bf16
  matmul at M = 2048 where the fused GEMM reaches ~45%. An exported prefill whose chunk is
  DEQUANT_MIN_M or more takes it for every T (its graph holds one [N, K] bf16 scratch at a time;
  a short last chunk pays the dequant pass too: a symbolic M gets one path, without a guard).
`GEMV1_CONFIGS`, `GEMV_CONFIGS` and `GEMM_CONFIGS` sit beside the kernels. Every config fits
101376 bytes of shared memory per block (RTX 4090 sm_89, RTX 5090 sm_120), checked by
`config_smem_bytes`; `CONSUMER_ONLY` (env `GEMMA4_INT4_CONSUMER=1`) restricts autotuning to the
configs marked for those cards even on an H200, which is what the tests force.

`gemma4::int4_glu_linear(gate, up, qweight, scales[, up_index])` is the MLP's down projection with its
activation, (gelu_tanh(gate) * up) @ dequant(W).T: at M == 1 the quantize kernel computes the
activation as it reads x (one launch less a layer), other M take the activation in aten ops and
`int4_linear`'s path. With up_index, up is a table of rows and its row up_index is the up (E2B / E4B's
per-layer projection: the layer's row of the per-layer inputs), read in place by the small weights' GEMV.

`gemma4::int4_rms_linear(x, weight, eps, qweight, scales)` is a layer's input norm with its q / k / v
projection, (rms_norm(x) * weight) @ dequant(W).T: at M == 1 (weight in x's dtype) the kernel that reads
x computes the norm, each program summing the squares of the whole row (`_inv_rms`, from the L2) before
it scales its own part: the quantize kernel's NORM, or with bf16 x the GEMV's own. One launch less a
layer (the norm's kernel). Other M take the norm in aten ops and `int4_linear`'s path.
`gemma4::int4_add_rms_linear(x, r, weight_r, weight, eps, qweight, scales) -> (h, y)` goes one step
further for the MLP's gate / up: h = x + rms_norm(r) * weight_r (the attention output into the residual
stream) and y = (rms_norm(h) * weight) @ dequant(W).T; at M == 1 with x as levels the quantize kernel
computes both norms and the add and writes h (its RES), one more launch less a layer.
`gemma4::int4_add_linear(x, r, weight_r, eps, qweight, scales) -> (h, y)` is the add alone before a small
weight: h = x + rms_norm(r) * weight_r (the MLP's output into the residual stream) and y = h @ dequant(W).T
(the per-layer-input gate of E2B / E4B); at M == 1 the bf16-x GEMV computes the add as it loads x and its
first program writes h (its RES), the add's kernel gone.

Two ops elsewhere feed the M == 1 GEMV x's levels from a kernel that computes x anyway, one launch less:
`gemma4::attention_int4_linear` (export/kernels/attention_linear.py: the decode combine writes the o_proj's)
and `gemma4::int4_add_rms_mlp` (export/kernels/int4_mlp.py: the gate / up GEMV writes the down GEMV's, its
GLUQ epilogue `_glu_levels`, `int4_gemv1`'s glu_out); both write through `_store_levels`, and the GEMV takes
them through `int4_gemv1`'s quantize. Two more end a decoder layer in its last GEMV, whose last row block
writes the closing residual add (h + rms_norm(y) * w) * scalar (the CLOSE epilogue `_close_row`, `int4_gemv1`'s
close; `close_reference`): `gemma4::int4_add_rms_mlp_close` (export/kernels/int4_mlp.py, the down GEMV) and
`gemma4::int4_add_ple_close` (export/kernels/int4_ple.py, E2B / E4B's per-layer projection).

The CPU kernels of the ops are `int4_linear_reference`, `int4_glu_linear_reference`,
`int4_rms_linear_reference`, `int4_add_rms_linear_reference` and `int4_add_linear_reference` (plain aten ops,
any float dtype); the CPU backend decomposes the ops into them.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.library import triton_op, wrap_triton

from export.kernels.pdl import op_pdl_mode
from export.kernels.pdl import pdl_args as _pdl_args
from export.kernels.pdl import pdl_wait, pdl_wait_at

SMEM_LIMIT_BYTES = 101376  # per block on sm_89 / sm_120 (the H200 allows 232448)
GEMV_MAX_M = 8
CONSUMER_ONLY = os.environ.get("GEMMA4_INT4_CONSUMER") == "1"
DEQUANT_MIN_M = 512  # a concrete M from here on: dequantize to bf16 + torch.mm (cuBLAS)
# M == 1 with K split: 0 partials + `_sum_splits_kernel`, 2 the last program of a row block sums
# them (see the kernel). With x as two int8 levels the quantize kernel zeroes the counters, so 2
# saves a launch per mid-size weight: a sliding layer's four GEMVs as one CUDA graph 107.6 ->
# 104.8 us, a full layer's 117.7 -> 115.8 on the H200, 8 kernels instead of 11
# (scripts/measurements/int4_gemv1_launch_variants.json); with `gemv1_plan`'s splits and tiles
# 107.0 -> 100.6 and 117.0 -> 110.6 (int4_gemv1_launch_plan.json); with the lane tile below and its plan
# 116.3 -> 94.3 and 127.1 -> 102.3 against the first plan in one run (int4_gemv1_launch_lane_tile.json).
# With bf16 x its counters take a torch.zeros of their own. No op of the kernel may be inline PTX
# with a side effect: torch's mutation analysis cannot read it, takes every argument as written and the compiled graph
# clones the weights before each call; `test_op_kernels_write_only_their_outputs` holds this.
GEMV1_RED = 0
GEMV1_RED_XQ = 2
GEMV1_XQ = True  # M == 1: x as int8 levels and dp4a (`_gemv1_loop_q`) instead of bf16 and FMAs
# Levels of x where the per-lane loop runs (`gemv1_plan`): 1, x as one int8 level with a factor per 32
# elements (each lane's 4 words: to within max|x| / 254 of those 32, as llama.cpp's q8_1), half the dp4a
# and of x's planes of 2 (two levels, x to within max|x| / 64516 per group). H200, 31B shapes
# (scripts/gemv1_parts_variants.py, gemv1_parts_variants.json): o 12.1 -> 11.2 us, qkv 20.0 -> 19.1, down
# 25.5 -> 24.3, gate/up 38.7 -> 36.6; a sliding layer's four projections as one graph 95.9 -> 90.6 us, a
# full layer's 104.1 -> 98.6. Error against fp32 on Gaussian bf16 x: 5.7e-3 (two levels 1.7e-3, the bf16
# output's rounding); one factor per group of 128 gave 6.7e-3 and twice the error of a factor per 32
# next to an outlier channel. Both are small beside the int4 weight's own rounding (~10% of a row's
# norm): the 1e-2 is against the dequantized weight. End to end they are not small beside bf16: the
# 31B 2-layer slice (random weights, scripts/bench_variants.py --stages slice, H200) with one level
# was 1.20-1.25e-2 from the eager model with the same weights per decode step (0.93e-2 at prefill,
# where only the lm_head's x is quantized), with two levels 0.65-0.72e-2, as close as the eager bf16
# model is to fp32 (0.67-0.73e-2); the E4B slice 1.29e-2 -> 1.00e-2. Two levels, at the price of ~5%
# of the mid shapes' GEMV time.
GEMV1_LEVELS = 2
# bf16-x M == 1 GEMVs (small weights): the first tiles load before the PDL wait (`_int4_gemv1_kernel`'s EARLY),
# as the XQ loop's do. H200, E2B / E4B's four small projections a layer chained in CUDA graphs
# (scripts/gemv1_early_variants.py, gemv1_early_variants.json): 16.9 -> 16.0 us, 19.8 -> 19.0 us, bitwise equal.
GEMV1_EARLY = os.environ.get("GEMMA4_GEMV1_EARLY", "1") != "0"  # "0" in an exporting process: after the wait (A/B)
# bf16-x M == 1 GEMVs (small weights): each step's x (with the norm, the activation or the residual add the model
# puts before the weight) computed once for the program and handed to the tile through shared memory, not once
# for each row of threads (`_gemv1_tile`'s STAGE). sm_90 SASS, instructions in the loop of a thread (offline
# compiles, tests/test_int4_matmul.py's staged tests): E2B q / k / v with the norm 451 -> 171 (4 words), o 117 -> 91
# (2 words), the per-layer projection with its activation 280 -> 127 (1 word). H100, a layer's four small
# projections chained in CUDA graphs with PDL (scripts/gemv1_early_variants.py --switch stage,
# gemv1_stage_variants_h100.json): E2B 15.99 -> 13.25 us, E4B 19.02 -> 18.65; q / k / v 2.4e-3 from fp32 either
# way; the E2B 2-layer slice's artifact with it 1.05e-2 from the eager model (1.11e-2 without). The default;
# "0" in an exporting process: x once a row of threads (an A/B switch, scripts/export_ab.py).
GEMV1_STAGE = os.environ.get("GEMMA4_GEMV1_STAGE", "1") != "0"
# M == 1 on sm_90+: the quantize kernel and the GEMV compiled in PDL mode 2 (`pdl_wait`, export/kernels/pdl.py):
# launched with the programmatic-stream-serialization attribute (the artifact's launcher sets it for the kernels
# named in PDL_KERNELS, export/backends/cuda.py), each may start while the kernel before it finishes,
# the GEMV loading its first weight tile and scales before it waits. H200: direct launches in CUDA
# graphs (scripts/gemv1_pdl_variants.py, gemv1_pdl_variants.json), a layer's four projections 3.2 /
# 3.5 us faster (sliding / full); the 31B 12-layer slice's artifact with and without it
# (scripts/pdl_ab.py, pdl_ab_31b.json), a decode step 1.81 -> 1.67 ms at fill 1k and 1.84 -> 1.76 at
# 32k, bitwise the same logits. Launched without the attribute the wait returns at once.
# every one waits (`pdl_wait`) where pdl.OP_PDL holds
PDL_KERNELS = ("_quant_x_kernel", "_int4_gemv1_kernel", "_int4_gemv1_tma_kernel")
QUANT_X_GROUPS = 8  # groups of x per `_quant_x_kernel` program
HI_NIBBLES = tl.constexpr(-252645136)  # 0xF0F0F0F0 as int32: a word's high nibbles in place
M1_ON_TENSOR_CORES = False  # M == 1 (group 128) through `int4_gemv_mma` too; bench_int4 times both
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs no inline PTX
_PTX = tl.constexpr(not _INTERPRET)  # for kernels without an ASM argument
# compile with each pool's first config only: no timing run picks the tiles (see one_config);
# M == 1 follows `gemv1_plan` either way
ONE_CONFIG = False


# ---- layout: pack, unpack, quantize ---------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> uint8 [N, K // 2] (even k low nibble)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] in [-8, 7]. Dim 0 stays -1 in every view, so rows
    n0..n1 of the constants give rows n0..n1 of the result (N-chunking passes slice it)."""
    lo = torch.bitwise_and(qweight, 15).to(torch.int8) - 8
    hi = torch.bitwise_right_shift(qweight, 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(-1, qweight.shape[1] * 2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4 of a float [N, K] weight -> (qweight uint8 [N, K/2], scales bf16).

    scale = max|w| / 7.5 per group, q = clamp(round(w / scale), -8, 7): the grid -8..7 covers
    [-max, +max] with one rounding step clipped at +max. Zero points (a second bf16 per group)
    are left out: on normal weights they lower the error ~10% for +2 / G bytes per weight,
    see scripts/bench_int4.py's recipe table.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: K={K} is not a multiple of the group size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    amax = g.abs().amax(-1, keepdim=True)
    # a tensor divisor, not the scalar 7.5: CUDA divides by a scalar as a multiply by its
    # reciprocal (an ulp off at times), the host divides; tensor / tensor is IEEE on both, so
    # a weight quantized on the GPU gets the host's codes and scales bit for bit
    scales = (amax / torch.full_like(amax, 7.5)).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / scales.float()), -8, 7).to(torch.int8).reshape(N, K)
    return pack_int4(q), scales.reshape(N, K // group_size)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`: q * scale, rounded to `dtype` like the kernels do."""
    q = unpack_int4(qweight)
    K = q.shape[1]
    G = K // scales.shape[1]
    w = q.to(dtype).view(-1, K // G, G) * scales.to(dtype).unsqueeze(-1)
    return w.view(-1, K)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The op in plain aten ops: x [..., K] @ dequant(W).T -> [..., N] in x.dtype."""
    return torch.nn.functional.linear(x, dequantize_int4(qweight, scales, x.dtype))  # as N-chunking matches


def group_size_for(k: int, group_size: int) -> int:
    """The recipe's group size, halved (down to 32) until it divides K (MoE down_proj K=704)."""
    g = group_size
    while k % g and g > 32:
        g //= 2
    if k % g:
        raise ValueError(f"int4: K={k} is not a multiple of 32")
    return g


def int4_bytes(n: int, k: int, group_size: int) -> int:
    """Stored bytes of one [n, k] weight in this layout (packed nibbles + bf16 scales)."""
    return n * k // 2 + n * (k // group_size) * 2


# ---- configs --------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, consumer=True):
    c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    c.consumer = consumer  # fits and is worth trying on sm_89 / sm_120
    return c


def _cfg1(bn, groups, warps, parts=1, depth=1):
    """An M == 1 config: BLOCK_N rows x PARTS K parts x GROUPS adjacent groups a step, DEPTH
    tiles loaded ahead in registers."""
    c = triton.Config({"BLOCK_N": bn, "GROUPS": groups, "PARTS": parts, "DEPTH": depth}, num_warps=warps,
                      num_stages=1)
    c.consumer = True  # registers only: fits any card
    return c


# M == 1, from H200 sweeps of the 31B decode step's joined shapes (us per call, weights from device
# memory; scripts/gemv1_xq_variants.py, scripts/measurements/int4_gemv1_xq_variants.json):
# `gemv1_plan` takes one of these per weight shape. 64 rows, two adjacent groups a step (128
# contiguous bytes of a row), four warps, one tile ahead, with x as two int8 levels (GEMV1_XQ):
# the lm_head 341 -> 212 us (one slice), gate/up 43008 x 5376 57 -> 43 (one slice), the
# projections between 5376 and 21504 rows 5-12% faster at 8 slices; 8 rows x 8 K parts, 8 warps,
# two tiles ahead, K not split: up to 4096 rows (k/v 4096 x 5376 11.0 -> 9.3 in the bf16-x sweep,
# scripts/measurements/int4_gemv1_variants.json: no partials, no second kernel). With the per-lane
# sums (`_gemv1_loop_q`, scripts/gemv1_tile_variants.py, int4_gemv1_tile_variants.json: the kernel
# alone) 128 rows (8 a thread) x 2 groups, 4 warps: the lm_head 208 -> 184 us, gate/up 40.6 -> 35.5,
# 5376 x 21504 22.8 -> 21.1 and 5376 x 16384 18.7 -> 16.2 at 8 slices; 16384 / 18432 x 5376 take
# 64 rows x 2 slices (16.5 -> 16.3, 19.0 -> 17.8).
GEMV1_CONFIGS = [_cfg1(128, 2, 4), _cfg1(8, 1, 8, parts=8, depth=2), _cfg1(64, 2, 4)]
GEMV_CONFIGS = [_cfg(16, bn, bk, w, s) for bn, bk, w, s in (
    (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (32, 512, 4, 2), (128, 128, 4, 3))]
GEMM_CONFIGS = [  # consumer=False: larger tiles meant for many-SM cards (they still fit)
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 128, 4, 2), _cfg(64, 64, 128, 4, 3),
    _cfg(128, 256, 64, 8, 2, consumer=False), _cfg(64, 256, 64, 8, 3, consumer=False),
]


def config_smem_bytes(cfg: triton.Config, group_size: int = 32) -> int:
    """Estimate of a config's shared memory: each pipeline stage buffers the x tile, the packed
    weight tile and its scales; a dot also stages the dequantized bf16 weight tile once (the
    M == 1 path has no dot). scripts/bench_int4.py checks Triton's own figure for every
    compiled variant against the limit."""
    if "GROUPS" in cfg.kwargs:  # the M == 1 kernel: registers, and the final sums' scratch (at most
        return cfg.kwargs["BLOCK_N"] * cfg.kwargs["PARTS"] * cfg.kwargs["GROUPS"] * 16 * 4  # the fp32 tile)
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    per_stage = bm * bk * 2 + bn * bk // 2 + bn * max(bk // group_size, 1) * 2
    dot = 0 if bm == 1 else bn * bk * 2  # the dequantized bf16 weight tile, once (M == 1: no dot)
    return cfg.num_stages * per_stage + dot


def active_configs(configs: list[triton.Config], consumer_only: bool) -> list[triton.Config]:
    return [c for c in configs if c.consumer] if consumer_only else list(configs)


# ---- kernel ---------------------------------------------------------------------------------


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                        stride_xm, stride_wn, stride_sn, stride_os, stride_om, M_BUCKET,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K step
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_lo + kk
        b_ok = (k0 // 2 + offs_b) < k_hi // 2
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_b)[None, :],
                    mask=n_ok[:, None] & b_ok[None, :], other=0)
        lo = (p & 0xF).to(tl.int8) - 8
        hi = (p >> 4).to(tl.int8) - 8
        q = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K).to(tl.float32)  # k = 2j, 2j + 1 interleaved
        if BLOCK_K >= GROUP:
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                        mask=n_ok[:, None] & (offs_g * GROUP < k_hi)[None, :], other=0.0)
            w = (q.reshape(BLOCK_N, BLOCK_K // GROUP, GROUP) * s.to(tl.float32)[:, :, None]).reshape(BLOCK_N, BLOCK_K)
        else:
            s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok & (k0 < k_hi), other=0.0)
            w = q * s.to(tl.float32)[:, None]
        k_ok = (k0 + offs_k) < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    out = out_ptr + pid_k * stride_os
    tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _nibble_as_float(h, S: tl.constexpr, ASM: tl.constexpr):
    """The nibble at bits S .. S + 3 of each int32 word as the float 2^(23 - S) + v, with no
    conversion instruction: masked into the mantissa of a float whose exponent gives bit S
    the weight 1. S in 8, 12, 16 keeps the float under 2^16, so products with x lose nothing
    that matters once the row-independent 2^(23 - S) + 8 is taken off."""
    if ASM:  # one lop3 ((h & mask) | exponent), where the plain ops compile to two
        if S == 8:
            f = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00000F00, 0x47000000, 0xEA;", "=r,r", [h],
                                          dtype=tl.int32, is_pure=True, pack=1)
        elif S == 12:
            f = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x0000F000, 0x45000000, 0xEA;", "=r,r", [h],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            f = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F0000, 0x43000000, 0xEA;", "=r,r", [h],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        f = (h & (0xF << S)) | ((150 - S) << 23)
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), as fp32: integer arithmetic on the bits
    (finite x), the same compiled and in the Triton interpreter (whose bf16 casts are wrong for
    negative values)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _residual_pair(xp, rp, wp, inv_r):
    """(lo, hi) fp32 of the bf16 pair x + rms_norm(r) * wr, from the pairs' 32-bit words (inv_r r's norm
    factor): each step rounded to bf16 as the model's ops leave it (`_residual`), by bit arithmetic
    (`_round_bf16`: the same in the interpreter)."""
    lo = _round_bf16((xp << 16).to(tl.float32, bitcast=True) + _round_bf16(
        ((rp << 16).to(tl.float32, bitcast=True) * inv_r) * (wp << 16).to(tl.float32, bitcast=True)))
    hi = _round_bf16((xp & -65536).to(tl.float32, bitcast=True) + _round_bf16(
        ((rp & -65536).to(tl.float32, bitcast=True) * inv_r) * (wp & -65536).to(tl.float32, bitcast=True)))
    return lo, hi


@triton.jit
def _x_pair(xw, uw, rw, wrw, idx, ok, GLU: tl.constexpr, NORM: tl.constexpr, inv, RES: tl.constexpr, inv_r):
    """(lo, hi) fp32 of the bf16 pairs of x at word indices idx (any shape) as `_gemv1_tile` takes them: plain,
    or GLU / NORM / RES (see there)."""
    xp = tl.load(xw + idx, mask=ok, other=0)
    lo = (xp << 16).to(tl.float32, bitcast=True)
    hi = (xp & -65536).to(tl.float32, bitcast=True)
    if RES:
        lo, hi = _residual_pair(xp, tl.load(rw + idx, mask=ok, other=0), tl.load(wrw + idx, mask=ok, other=0), inv_r)
    if GLU:
        up = tl.load(uw + idx, mask=ok, other=0)
        lo = _round_bf16(gelu_tanh(lo) * (up << 16).to(tl.float32, bitcast=True))
        hi = _round_bf16(gelu_tanh(hi) * (up & -65536).to(tl.float32, bitcast=True))
    if NORM:
        wp = tl.load(uw + idx, mask=ok, other=0)
        lo = _round_bf16((lo * inv) * (wp << 16).to(tl.float32, bitcast=True))
        hi = _round_bf16((hi * inv) * (wp & -65536).to(tl.float32, bitcast=True))
    return lo, hi


@triton.jit
def _split8(xv):
    """[C, W, 8] -> its 8 columns, each [C, W] (column i: x[8j + i] of word j). Joining the pairs into one
    [C, W, 8] and splitting it here compiles to fewer instructions and barriers than splitting the pairs'
    [1, C, W, 4] tensors as `_split4` does (E2B's q / k / v loop on sm_90: 171 against 253, 4 barriers against 10)."""
    t = tl.reshape(xv, (xv.shape[0], xv.shape[1], 2, 2, 2))  # i = 4a + 2b + e
    a0, a1 = tl.split(tl.permute(t, (0, 1, 3, 4, 2)))
    b00, b01 = tl.split(tl.permute(a0, (0, 1, 3, 2)))
    b10, b11 = tl.split(tl.permute(a1, (0, 1, 3, 2)))
    x0, x1 = tl.split(b00)
    x2, x3 = tl.split(b01)
    x4, x5 = tl.split(b10)
    x6, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _gemv1_tile(w, s, xw, uw, g0, lane, ok, ASM: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr = 0,
                inv=1.0, RES: tl.constexpr = 0, rw=None, wrw=None, inv_r=1.0, wd=None, okc=None,
                STAGE: tl.constexpr = 0):
    """(sum over each word's 8 nibbles of (v - 8) x) * scale for a [BLOCK_N, C, WORDS] tile of
    words `w` whose groups start at words `g0` ([1, C, 1]). GLU: x is gelu_tanh(g) * u of the
    bf16 pairs at xw (g) and uw (u), in fp32 and rounded to bf16 once (as `_quant_x_kernel`'s GLU).
    NORM: x is (x inv) w, uw the norm weight's bf16 pairs, rounded to bf16 once (the model's norm).
    RES: x is x + rms_norm(r) wr, r and wr bf16 pairs at rw / wrw, inv_r r's norm factor, each step
    rounded to bf16 as the model's ops leave it (`_residual`).

    Each nibble v becomes the float 2^E + v with one lop3 (`_nibble_as_float`) and meets its x
    in one FMA; the sum over the word of (2^E + 8) x, the same for every row, is taken off once
    per word, leaving dot(v - 8, x). x comes as bf16 pairs in 32-bit loads, turned into floats
    by a shift or a mask.

    x is computed where the tile's layout puts it: each thread its own words' x, so every thread on
    another row of the same words computes it again (with NORM / GLU / RES that is most of the loop's
    instructions: sm_90 SASS of E2B's q / k / v, 113 a word of which 18 are the weight's). STAGE: x and
    the per-word sum of (2^E + 8) x are computed once for the step on [C, WORDS] (wd: the words' indices,
    okc: their mask), in a layout of their own that Triton hands to the tile's through shared memory
    (43 a word there; the sums in another order: within fp32 roundings of the default)."""
    if STAGE:
        idx = wd[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]  # [C, WORDS, 4]: pair p of word j
        lo, hi = _x_pair(xw, uw, rw, wrw, idx, okc[:, :, None], GLU, NORM, inv, RES, inv_r)
        xv = tl.reshape(tl.join(lo, hi), (wd.shape[0], wd.shape[1], 8))  # x[8j + 2p + e]
        i8 = tl.arange(0, 8)[None, None, :]
        off = tl.where(i8 < 2, (1 << (15 - 4 * i8)) + 8,
                       tl.where(i8 < 5, (1 << (23 - 4 * i8)) + 8, (1 << (35 - 4 * i8)) + 8)).to(tl.float32)
        corr = tl.sum(xv * off, axis=2)[None]  # [1, C, WORDS]
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv)
        xs = [x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None], x7[None]]
    else:
        corr = tl.zeros(g0.shape, dtype=tl.float32)
        xs = []
        for p in tl.static_range(4):  # x[8j + 2p], x[8j + 2p + 1]: one bf16 pair, one 32-bit load
            lo, hi = _x_pair(xw, uw, rw, wrw, (g0 + lane) * 4 + p, ok, GLU, NORM, inv, RES, inv_r)
            xs = xs + [lo, hi]
    part = tl.zeros(w.shape, dtype=tl.float32)
    # nibble i of a word, shifted to bit 8, 12 or 16: 0, 1 from w << 8; 2, 3, 4 from w;
    # 5, 6, 7 from w >> 12 (two shifts per word)
    for i in tl.static_range(8):
        if i < 2:
            f = _nibble_as_float(w << 8, 8 + 4 * i, ASM)
            c = (1 << (15 - 4 * i)) + 8
        elif i < 5:
            f = _nibble_as_float(w, 4 * i, ASM)
            c = (1 << (23 - 4 * i)) + 8
        else:
            f = _nibble_as_float(w >> 12, 4 * i - 12, ASM)
            c = (1 << (35 - 4 * i)) + 8
        part += f * xs[i]
        if not STAGE:  # (staged: the word's sum, once)
            corr += c * xs[i]
    return (part - corr) * s.to(tl.float32)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot of a's four unsigned bytes with b's four signed bytes (int32 lanes)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for t in tl.static_range(4):
            c += ((a >> (8 * t)) & 0xFF) * ((b << (24 - 8 * t)) >> 24)
        return c


@triton.jit
def _gemv1_tile_q(w, s, xq, xf, xc, XP, g0, lane, ok, WORDS: tl.constexpr, ASM: tl.constexpr):
    """`_gemv1_tile` on integer units: x as two int8 levels per element (`_quant_x_kernel`),
    one dp4a per four nibbles and level, a sum across lanes per step (the K-parts configs; one
    part takes `_gemv1_loop_q`). Returns [BLOCK_N, C, 1].

    A word's low nibbles (k = 8j + 0, 2, 4, 6) are `w & 0x0F0F0F0F` and its high ones
    `(w >> 4) & 0x0F0F0F0F`, four unsigned bytes each; x's word j of each level packs the same
    k as signed bytes. Per word 254 h.v + l.v in int32 (exact), summed over the group, less the
    group's 8 (254 H + L) (v is stored as q + 8), then one conversion and the scales."""
    p = xq + g0 + lane  # x's planes (`_quant_x_kernel`), XP words apart
    he = tl.load(p, mask=ok, other=0)
    ho = tl.load(p + XP, mask=ok, other=0)
    le = tl.load(p + 2 * XP, mask=ok, other=0)
    lo_ = tl.load(p + 3 * XP, mask=ok, other=0)
    lo = w & 0x0F0F0F0F
    hi = (w >> 4) & 0x0F0F0F0F
    a = _dp4a(hi, ho, _dp4a(lo, he, tl.zeros_like(w), ASM), ASM)
    i = _dp4a(hi, lo_, _dp4a(lo, le, a * 254, ASM), ASM)
    tot = tl.sum(i, axis=2, keep_dims=True)
    gi = g0 // WORDS
    f = tl.load(xf + gi, mask=ok, other=0.0)
    c = tl.load(xc + gi, mask=ok, other=0)
    return (tot - c).to(tl.float32) * (s.to(tl.float32) * f)


@triton.jit
def _split4(t):
    """The 4 words of each lane of a [R, C, L, 4] tile as 4 [R, C, L] tensors (in registers; the
    same order for every tensor of the shape)."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], 2, 2)))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _ld_b32(ptr):
    """A 32-bit load through PTX: an elementwise op, so its tensor takes the layout of its use
    (a `tl.load` takes its own, and a conversion through shared memory follows; see `_ld_u16`)."""
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _ld_b32_coherent(ptr):
    """`_ld_b32` without the non-coherent cache, which is for data no one writes while the kernel
    runs: not so for a kernel that starts before the one writing it finishes (PDL, `pdl_wait`)."""
    return tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _gemv1_x_planes(xq, xf, xc, XP, g, lane, L: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0,
                    LEVELS: tl.constexpr = 2):
    """x's levels (`_quant_x_kernel`'s planes) for the words g + lane ([1, C, WORDS], the weight
    tile's own pattern: 16-byte loads in its layout) as [1, C, L, 4] each, the group's factor and
    its correction (16x, in the group's first word only, 0 elsewhere) in the same shape (PDL: the
    factor and correction through coherent loads, `_ld_b32_coherent`). LEVELS 1: x as one level
    (`_quant_x_kernel` at LEVELS 1), the low level's planes not read (le / lo return he / ho), a
    factor and correction (16x) per 32 elements, each lane's in all of its words."""
    p = xq + g + lane
    shp: tl.constexpr = (1, g.shape[1], L, 4)
    he = tl.reshape(tl.load(p), shp)
    ho = tl.reshape(tl.load(p + XP), shp)
    if LEVELS == 1:
        le = he
        lo = ho
    else:
        le = tl.reshape(tl.load(p + 2 * XP), shp)
        lo = tl.reshape(tl.load(p + 3 * XP), shp)
    if LEVELS == 1:
        gi = tl.reshape((g + lane) // 4, shp)  # each word's 32 elements (its lane's: 4 words)
    else:
        gi = tl.reshape(g // (4 * L) + lane * 0, shp)  # each word's group
    if ASM and PDL:
        f = _ld_b32_coherent(xf.to(tl.pointer_type(tl.int32)) + gi).to(tl.float32, bitcast=True)
        c = _ld_b32_coherent(xc + gi)
    elif ASM:
        f = _ld_b32(xf.to(tl.pointer_type(tl.int32)) + gi).to(tl.float32, bitcast=True)
        c = _ld_b32(xc + gi)
    else:
        f = tl.load(xf + gi)
        c = tl.load(xc + gi)
    if LEVELS == 1:  # a factor and correction per lane, read from its first word
        return he, ho, le, lo, c * 16, f * 0.0625
    return he, ho, le, lo, tl.where(tl.reshape(lane, (1, 1, L, 4)) == 0, c * 16, 0), f * 0.0625


@triton.jit
def _gemv1_tile_lanes(w, s, he, ho, le, lo, c, f, ASM: tl.constexpr, LEVELS: tl.constexpr = 2):
    """[BN, C, L] fp32: x's two int8 levels (`_quant_x_kernel`) dotted with each lane's 4 words
    of a [BN, C, L, 4] tile, exact in int32, then converted and scaled once per lane (s [BN, C, 1]
    the group's scale, f x's factor / 16): no sum across lanes until the loop ends.

    A word's low nibbles (k = 8j + 0, 2, 4, 6) are `w & 0x0F0F0F0F` (v) and its high ones stay
    in place, `w & 0xF0F0F0F0` (16 v): four dp4a chains over the lane's words (each level with
    each half), then 16 (254 h.lo + l.lo) + 254 h.hi + l.hi, less 16x the group's correction
    8 (254 H + L) in its first lane (v is stored as q + 8): two masks and four dp4a a word.
    LEVELS 1 (x as one int8 level per 32 elements, le / lo unused): 16 h.lo + h.hi less 16 x 8 H
    per lane (its 4 words are the 32 elements of one factor: c and f per lane), two dp4a a word."""
    w0, w1, w2, w3 = _split4(w)
    he0, he1, he2, he3 = _split4(he)
    ho0, ho1, ho2, ho3 = _split4(ho)
    le0, le1, le2, le3 = _split4(le)
    lo0, lo1, lo2, lo3 = _split4(lo)
    c0, c1, c2, c3 = _split4(c)
    f0, _, _, _ = _split4(f)
    z = tl.zeros(w0.shape, dtype=tl.int32)
    hl = _dp4a(w0 & 0x0F0F0F0F, he0, z, ASM)
    hh = _dp4a(w0 & HI_NIBBLES, ho0, z, ASM)
    if LEVELS == 1:
        hl = _dp4a(w1 & 0x0F0F0F0F, he1, hl, ASM)
        hh = _dp4a(w1 & HI_NIBBLES, ho1, hh, ASM)
        hl = _dp4a(w2 & 0x0F0F0F0F, he2, hl, ASM)
        hh = _dp4a(w2 & HI_NIBBLES, ho2, hh, ASM)
        hl = _dp4a(w3 & 0x0F0F0F0F, he3, hl, ASM)
        hh = _dp4a(w3 & HI_NIBBLES, ho3, hh, ASM)
        tot = hl * 16 + hh - c0
        return tot.to(tl.float32) * (s * f0)
    ll = _dp4a(w0 & 0x0F0F0F0F, le0, z, ASM)
    lh = _dp4a(w0 & HI_NIBBLES, lo0, z, ASM)
    hl = _dp4a(w1 & 0x0F0F0F0F, he1, hl, ASM)
    ll = _dp4a(w1 & 0x0F0F0F0F, le1, ll, ASM)
    hh = _dp4a(w1 & HI_NIBBLES, ho1, hh, ASM)
    lh = _dp4a(w1 & HI_NIBBLES, lo1, lh, ASM)
    hl = _dp4a(w2 & 0x0F0F0F0F, he2, hl, ASM)
    ll = _dp4a(w2 & 0x0F0F0F0F, le2, ll, ASM)
    hh = _dp4a(w2 & HI_NIBBLES, ho2, hh, ASM)
    lh = _dp4a(w2 & HI_NIBBLES, lo2, lh, ASM)
    hl = _dp4a(w3 & 0x0F0F0F0F, he3, hl, ASM)
    ll = _dp4a(w3 & 0x0F0F0F0F, le3, ll, ASM)
    hh = _dp4a(w3 & HI_NIBBLES, ho3, hh, ASM)
    lh = _dp4a(w3 & HI_NIBBLES, lo3, lh, ASM)
    tot = (hl * 254 + ll) * 16 + (hh * 254 + lh) - ((c0 + c1) + (c2 + c3))
    return tot.to(tl.float32) * (s * f0)


@triton.jit
def _gemv1_scale(p, ok, ASM: tl.constexpr):
    """The bf16 scales at p (int16 pointers, always inside the tensor) as fp32, 0 where not ok."""
    if ASM:
        b = _ld_u16(p)
    else:
        b = tl.load(p).to(tl.int32) & 0xFFFF
    return tl.where(ok, (b << 16).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _gemv1_loop_q(xq, xf, xc, w_ptr, s_ptr, offs_n, N, KW, start, hi, gpp, stride_ww, stride_sn,
                  WORDS: tl.constexpr, STEP: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0,
                  LEVELS: tl.constexpr = 2):
    """The XQ kernel's sums [BLOCK_N] over its columns (`_int4_gemv1_kernel`: start / hi [1, C, 1]
    the first and end words of each column's run) with `_gemv1_tile_lanes`: each step's words
    and scales load one step ahead, x's levels too; no masked load (rows past N read row N - 1,
    words past a run the row's last group, and the scale of such a group is 0), the scales
    through PTX (`_ld_u16`): nothing in the loop takes another layout than the words'.
    PDL: the first words and scales (constants) load before `pdl_wait`, x's levels after it."""
    L: tl.constexpr = WORDS // 4
    XP = (KW + 15) // 16 * 16  # the planes' stride (`_quant_x_kernel`): 16-byte aligned
    lane = tl.arange(0, WORDS)[None, None, :]
    n_ok = (offs_n < N)[:, None, None]
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None]
    rows = w_ptr + rn * stride_ww
    srows = s_ptr.to(tl.pointer_type(tl.int16)) + rn * stride_sn
    last = KW // WORDS - 1
    gc = tl.minimum(start // WORDS, last) * WORDS  # a multiple of WORDS: 16-byte loads
    w = tl.load(rows + (gc + lane))
    s = _gemv1_scale(srows + gc // WORDS, n_ok & (start < hi), ASM)
    if PDL:
        z = pdl_wait(PDL, ASM)
        xq, xf, xc = xq + z, xf + z, xc + z
    he, ho, le, lo, c, f = _gemv1_x_planes(xq, xf, xc, XP, gc, lane, L, ASM, PDL, LEVELS)
    acc = tl.zeros((offs_n.shape[0], start.shape[1], L), dtype=tl.float32)
    for tg in range(0, gpp, STEP // WORDS):
        g1 = start + tg * WORDS + STEP
        gc = tl.minimum(g1 // WORDS, last) * WORDS
        w1 = tl.load(rows + (gc + lane))
        s1 = _gemv1_scale(srows + gc // WORDS, n_ok & (g1 < hi), ASM)
        he1, ho1, le1, lo1, c1, f1 = _gemv1_x_planes(xq, xf, xc, XP, gc, lane, L, ASM, PDL, LEVELS)
        acc += _gemv1_tile_lanes(tl.reshape(w, (w.shape[0], w.shape[1], L, 4)), s, he, ho, le, lo, c, f, ASM, LEVELS)
        w, s, he, ho, le, lo, c, f = w1, s1, he1, ho1, le1, lo1, c1, f1
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def gelu_tanh(g):
    """GELU, tanh approximation, in fp32 (the MLPs' activation; also export/kernels/moe_int4.py's):
    tanh(z) = 1 - 2 / (1 + exp(2z)), no libdevice (runs in the interpreter); tanh(20) is 1 in fp32."""
    z = tl.minimum(0.7978845608028654 * (g + 0.044715 * g * g * g), 20.0)
    return 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))


NORM_BLOCK = tl.constexpr(1024)  # elements (PAIRS: words) of x per step of `_inv_rms`


def norm_steps(n: int) -> int:
    """`_inv_rms`'s STEPS for n elements (or words): NORM_BLOCK-wide steps covering them."""
    return triton.cdiv(n, NORM_BLOCK.value)


@triton.jit
def _squares(x_ptr, o, n, PAIRS: tl.constexpr):
    """x^2 at offsets o (< n) in fp32; PAIRS: x_ptr points at bf16 pairs as int32 words, each word's two
    squares summed (widened by bit arithmetic, the same in the interpreter)."""
    if PAIRS:
        p = tl.load(x_ptr + o, mask=o < n, other=0)
        lo = (p << 16).to(tl.float32, bitcast=True)
        hi = (p & -65536).to(tl.float32, bitcast=True)
        return lo * lo + hi * hi
    v = tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
    return v * v


@triton.jit
def _inv_rms(x_ptr, K, eps, PAIRS: tl.constexpr = 0, STEPS: tl.constexpr = 0):
    """1 / sqrt(mean(x^2) + eps) over x[0:K] (any float dtype), in fp32: the RMSNorm's factor
    (`rms_norm_reference`; the sum in another order than torch's, so within an ulp or two of it).
    eps is taken as fp32: AOTInductor types a Python float argument as fp64, where Triton's launch
    types it fp32, and `sqrt_rn` takes fp32 only.
    PAIRS: x_ptr points at bf16 pairs as int32 words (K / 2 of them). STEPS (`norm_steps`): the row in
    that many NORM_BLOCK steps, unrolled, so that their loads are in flight together (one trip to the
    L2, not one a step); 0: a loop over K."""
    n = K // 2 if PAIRS else K
    ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    if STEPS:
        for i in tl.static_range(STEPS):
            ss += _squares(x_ptr, i * NORM_BLOCK + tl.arange(0, NORM_BLOCK), n, PAIRS)
    else:
        for i in range(0, n, NORM_BLOCK):
            ss += _squares(x_ptr, i + tl.arange(0, NORM_BLOCK), n, PAIRS)
    return 1.0 / tl.sqrt_rn(tl.sum(ss, 0) / K + tl.cast(eps, tl.float32))


@triton.jit
def _inv_rms_h(xw, rw, wrw, K, eps, inv_r, STEPS: tl.constexpr):
    """`_inv_rms` of h = x + rms_norm(r) * wr over [0:K], x, r and wr bf16 pairs as int32 words at xw / rw / wrw
    (inv_r r's norm factor), h as `_residual_pair` rounds it: the h that the bf16-x GEMV's tiles and its write of h
    compute. STEPS: `norm_steps(K // 2)`."""
    n = K // 2
    ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    for i in tl.static_range(STEPS):
        o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
        m = o < n
        lo, hi = _residual_pair(tl.load(xw + o, mask=m, other=0), tl.load(rw + o, mask=m, other=0),
                                tl.load(wrw + o, mask=m, other=0), inv_r)
        ss += lo * lo + hi * hi
    return 1.0 / tl.sqrt_rn(tl.sum(ss, 0) / K + tl.cast(eps, tl.float32))


@triton.jit
def _residual(x, r, wr, inv_r, DT_R: tl.constexpr, DT: tl.constexpr):
    """x + rms_norm(r) * wr in fp32 (inv_r the norm's factor), each step rounded as the model's ops leave
    it: the norm to r's dtype, the sum to x's."""
    return (x + ((r * inv_r) * wr).to(DT_R).to(tl.float32)).to(DT).to(tl.float32)


@triton.jit
def _inv_rms_pair(x_ptr, r_ptr, wr_ptr, K, eps, STEPS: tl.constexpr):
    """(inv_r, inv_h): `_inv_rms` of r and of h = x + rms_norm(r) * wr (`_residual`) over [0:K] in STEPS
    NORM_BLOCK-wide steps, with x, r and wr loaded once, all in flight together, and kept in registers for h's
    squares: one trip to the L2, not two (bitwise the factors of a second pass over x, r and wr; the 31B's
    residual quantize kernel 3.69 -> 3.11 us, scripts/measurements/res_prologue_variants.json)."""
    xs = []
    rs = []
    ws = []
    ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    for i in tl.static_range(STEPS):
        o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
        m = o < K
        rv = tl.load(r_ptr + o, mask=m, other=0.0)
        rf = rv.to(tl.float32)
        ss += rf * rf
        rs = rs + [rv]
        xs = xs + [tl.load(x_ptr + o, mask=m, other=0.0)]
        ws = ws + [tl.load(wr_ptr + o, mask=m, other=0.0)]
    inv_r = 1.0 / tl.sqrt_rn(tl.sum(ss, 0) / K + tl.cast(eps, tl.float32))
    sh = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    for i in tl.static_range(STEPS):
        h = _residual(xs[i].to(tl.float32), rs[i].to(tl.float32), ws[i].to(tl.float32), inv_r,
                      r_ptr.dtype.element_ty, x_ptr.dtype.element_ty)
        sh += h * h
    return inv_r, 1.0 / tl.sqrt_rn(tl.sum(sh, 0) / K + tl.cast(eps, tl.float32))


@triton.jit
def _store_levels(x, g, xq_ptr, xf_ptr, xc_ptr, NG, GROUP: tl.constexpr, GB: tl.constexpr, LEVELS: tl.constexpr):
    """x [GB, GROUP // 8, 4, 2] (fp32: element 8j + 2t + e of group g[i] at [i, j, t, e]) as `_quant_x_kernel`'s
    levels of the groups g (int32 [GB], those >= NG skipped): the planes' words, the factors and the
    corrections. Any kernel that computes whole groups of a GEMV's x can write them for it this way."""
    W: tl.constexpr = GROUP // 8
    t = tl.arange(0, 4)[None, None, :, None]
    SUB: tl.constexpr = W // 4 if LEVELS == 1 else 1  # factors per group: per 32 elements at LEVELS 1
    amax = tl.max(tl.reshape(tl.max(tl.max(tl.abs(x), axis=3), axis=2), (GB, SUB, W // SUB)), axis=2)  # [GB, SUB]
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    inv_w = tl.reshape(tl.broadcast_to(inv[:, :, None], (GB, SUB, W // SUB)), (GB, W))  # each word's
    tt = x * inv_w[:, :, None, None]
    h = tl.floor(tt + 0.5)
    l = tl.floor((tt - h) * 254.0 + 0.5)
    hi = h.to(tl.int32)
    li = l.to(tl.int32)
    hw = tl.sum((hi & 0xFF) << (t * 8), axis=2)  # [GB, W, 2]: disjoint bytes, so the sum is an or
    lw = tl.sum((li & 0xFF) << (t * 8), axis=2)
    g3 = g[:, None, None]
    j3 = tl.arange(0, W)[None, :, None]
    e3 = tl.arange(0, 2)[None, None, :]
    XP = (NG * W + 15) // 16 * 16  # the planes' stride in words (16-byte aligned planes)
    out = xq_ptr + e3 * XP + g3 * W + j3
    tl.store(out, hw, mask=g3 < NG)
    if LEVELS == 1:
        hs = tl.sum(tl.reshape(tl.sum(tl.sum(hi, axis=3), axis=2), (GB, SUB, W // SUB)), axis=2)  # [GB, SUB]
        b = g[:, None] * SUB + tl.arange(0, SUB)[None, :]
        tl.store(xf_ptr + b, amax / 127.0, mask=g[:, None] < NG)
        tl.store(xc_ptr + b, 8 * hs, mask=g[:, None] < NG)
    else:
        amax = tl.max(amax, axis=1)
        hs = tl.sum(tl.sum(tl.sum(hi, axis=3), axis=2), axis=1)
        tl.store(out + 2 * XP, lw, mask=g3 < NG)
        ls = tl.sum(tl.sum(tl.sum(li, axis=3), axis=2), axis=1)
        tl.store(xf_ptr + g, amax / (127.0 * 254.0), mask=g < NG)
        tl.store(xc_ptr + g, 8 * (254 * hs + ls), mask=g < NG)


@triton.jit
def _quant_groups(x_ptr, u_ptr, xq_ptr, xf_ptr, xc_ptr, r_ptr, wr_ptr, h_ptr, g, NG, eps, GROUP: tl.constexpr,
                  GB: tl.constexpr, LEVELS: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr,
                  NORM_STEPS: tl.constexpr):
    """`_quant_x_kernel`'s work for the GB groups g (int32 [GB], those >= NG skipped): x's levels into the planes
    (and the factors and corrections) of those groups, with the GLU / norm / residual as the kernel's flags say
    (RES: h of those groups written too)."""
    W: tl.constexpr = GROUP // 8
    g4 = g[:, None, None, None]
    j = tl.arange(0, W)[None, :, None, None]
    t = tl.arange(0, 4)[None, None, :, None]
    e = tl.arange(0, 2)[None, None, None, :]
    ok = g4 < NG
    x = tl.load(x_ptr + g4 * GROUP + j * 8 + t * 2 + e, mask=ok, other=0.0).to(tl.float32)
    if RES:
        tl.static_assert(NORM == 1, "the residual's sum goes into the norm")
        tl.static_assert(NORM_STEPS > 0, "the residual's norms in unrolled steps (`norm_steps`)")
        idx = g4 * GROUP + j * 8 + t * 2 + e
        inv_r, inv_h = _inv_rms_pair(x_ptr, r_ptr, wr_ptr, NG * GROUP, eps, NORM_STEPS)  # one trip to the L2
        x = _residual(x, tl.load(r_ptr + idx, mask=ok, other=0.0).to(tl.float32),
                      tl.load(wr_ptr + idx, mask=ok, other=0.0).to(tl.float32), inv_r,
                      r_ptr.dtype.element_ty, x_ptr.dtype.element_ty)
        tl.store(h_ptr + idx, x.to(h_ptr.dtype.element_ty), mask=ok)
    if NORM:
        if RES:
            inv = inv_h
        else:
            inv = _inv_rms(x_ptr, NG * GROUP, eps, 0, NORM_STEPS)
        wn = tl.load(u_ptr + g4 * GROUP + j * 8 + t * 2 + e, mask=ok, other=0.0).to(tl.float32)
        x = ((x * inv) * wn).to(x_ptr.dtype.element_ty).to(tl.float32)
    if GLU:
        u = tl.load(u_ptr + g4 * GROUP + j * 8 + t * 2 + e, mask=ok, other=0.0).to(tl.float32)
        x = (gelu_tanh(x) * u).to(u_ptr.dtype.element_ty).to(tl.float32)
    _store_levels(x, g, xq_ptr, xf_ptr, xc_ptr, NG, GROUP, GB, LEVELS)


@triton.jit
def _quant_x_kernel(x_ptr, u_ptr, xq_ptr, xf_ptr, xc_ptr, cnt_ptr, NG, NCNT, GROUP: tl.constexpr, GB: tl.constexpr,
                    PDL: tl.constexpr = 0, LEVELS: tl.constexpr = 2, GLU: tl.constexpr = 0, NORM: tl.constexpr = 0,
                    eps=0.0, r_ptr=None, wr_ptr=None, h_ptr=None, RES: tl.constexpr = 0,
                    NORM_STEPS: tl.constexpr = 0):
    """x [NG * GROUP] (bf16) -> two int8 levels per element for `_gemv1_tile_lanes`, GB groups a
    program. Per group s = max|x| / 127, t = x / s, h = round(t), l = round(254 (t - h)):
    x ~= s (h + l / 254) to within max|x| / 64516. xq holds 4 planes of int32 words, one word per
    word of 8 elements (word j: k = 8j .. 8j + 7), each plane padded to a multiple of 16 words:
    h of k = 8j + 0, 2, 4, 6, h of 8j + 1, 3, 5, 7 (byte t = element 2t (+ 1)), then l the same
    (a plane loads in the weight tile's own layout, `_gemv1_x_planes`);
    xf the group's s / 254 (fp32), xc its 8 (254 sum h + sum l) (int32). It also zeroes the
    NCNT row-block counters of the GEMV that follows (its in-kernel split sum), which would
    otherwise take a launch of their own. PDL (1 or 2, `pdl_wait`): it waits first thing.
    LEVELS 1: h alone with s per 32 elements (x ~= s h, to within max|x| / 254 of those 32, as
    llama.cpp's q8_1), its two planes, xf = s and xc = 8 sum h per 32 elements (GROUP / 32 a group).
    GLU: x is gelu_tanh(x) * u (x_ptr the gate, u_ptr the up projection, bf16), rounded to bf16 as the
    unfused graph's kernel leaves it, so the MLP's activation takes no launch of its own (u_ptr is
    not read otherwise). NORM: x is rms_norm(x) * w (u_ptr the norm's weight, eps its epsilon; `rms_norm_reference`),
    rounded to x's dtype as the model's norm leaves it: every program sums the squares of the whole row (K
    elements, from the L2) and scales its own groups, so the norm before a linear takes no launch of its own.
    RES (with NORM): x_ptr is the residual stream, and the norm's input is h = x + rms_norm(r) * wr (r_ptr,
    wr_ptr, the same eps), which the kernel also writes to h_ptr (its own groups; `_residual`): the
    residual add and both norms before the MLP take no launch of their own either. NORM_STEPS: `_inv_rms`'s
    STEPS (`norm_steps` of the row; 0 loops)."""
    if PDL:  # every read and write after the wait
        z = pdl_wait(PDL, _PTX)
        x_ptr, u_ptr, xq_ptr, xf_ptr, xc_ptr = x_ptr + z, u_ptr + z, xq_ptr + z, xf_ptr + z, xc_ptr + z
        cnt_ptr = cnt_ptr + z
        if RES:
            r_ptr, wr_ptr, h_ptr = r_ptr + z, wr_ptr + z, h_ptr + z
    for i in range(tl.program_id(0) * 1024, NCNT, tl.num_programs(0) * 1024):
        offs = i + tl.arange(0, 1024)
        tl.store(cnt_ptr + offs, tl.zeros((1024,), dtype=tl.int32), mask=offs < NCNT)
    _quant_groups(x_ptr, u_ptr, xq_ptr, xf_ptr, xc_ptr, r_ptr, wr_ptr, h_ptr, tl.program_id(0) * GB + tl.arange(0, GB),
                  NG, eps, GROUP, GB, LEVELS, GLU, NORM, RES, NORM_STEPS)


@triton.jit
def _gemv1_ahead(w0, s0, w1, s1, w2, s2, wn, sn, DEPTH: tl.constexpr):
    """The queue of DEPTH tiles (words, scales) loaded ahead, one step on: wn / sn join at its end."""
    if DEPTH == 1:
        w0 = wn
        s0 = sn
    elif DEPTH == 2:
        w0 = w1
        s0 = s1
        w1 = wn
        s1 = sn
    else:
        w0 = w1
        s0 = s1
        w1 = w2
        s1 = s2
        w2 = wn
        s2 = sn
    return w0, s0, w1, s1, w2, s2


@triton.jit
def _gemv1_first(rows, srows, start, lane, hi, n_ok, STEP: tl.constexpr, DEPTH: tl.constexpr):
    """The first DEPTH tiles (words, scales) of `_int4_gemv1_kernel`'s bf16-x / tile-sum loop: its queue
    (`_gemv1_ahead`), the unused places holding the first."""
    WORDS: tl.constexpr = lane.shape[2]
    w0 = tl.load(rows + (start + lane), mask=n_ok & (start < hi), other=0)
    s0 = tl.load(srows + start // WORDS, mask=n_ok & (start < hi), other=0.0)
    w1 = w0
    s1 = s0
    w2 = w0
    s2 = s0
    if DEPTH >= 2:
        w1 = tl.load(rows + (start + STEP + lane), mask=n_ok & (start + STEP < hi), other=0)
        s1 = tl.load(srows + (start + STEP) // WORDS, mask=n_ok & (start + STEP < hi), other=0.0)
    if DEPTH >= 3:
        w2 = tl.load(rows + (start + 2 * STEP + lane), mask=n_ok & (start + 2 * STEP < hi), other=0)
        s2 = tl.load(srows + (start + 2 * STEP) // WORDS, mask=n_ok & (start + 2 * STEP < hi), other=0.0)
    return w0, s0, w1, s1, w2, s2


@triton.jit
def _glu_levels(y_ptr, gcnt_ptr, lq_ptr, lf_ptr, lc_ptr, dcnt_ptr, DNCNT, HALF, pid_n, BLOCK_N: tl.constexpr,
                DGROUP: tl.constexpr, DLEVELS: tl.constexpr):
    """`_int4_gemv1_kernel`'s GLUQ epilogue, run by the program that wrote row block pid_n of y (gate rows
    [0, HALF), up rows [HALF, 2 HALF)): the down GEMV's counters zeroed (the row blocks' writers share the
    work), then the counter of the block's unit bumped (UNIT rows of gate and the same rows of up: the
    larger of BLOCK_N and DGROUP), and the last of the unit's row blocks writes the levels of
    gelu_tanh(gate) * up for those rows. (With PDL every pointer here comes offset by the wait's 0.)"""
    for i in range(pid_n * 1024, DNCNT, tl.num_programs(0) * 1024):
        offs = i + tl.arange(0, 1024)
        tl.store(dcnt_ptr + offs, tl.zeros((1024,), dtype=tl.int32), mask=offs < DNCNT)
    UNIT: tl.constexpr = BLOCK_N if BLOCK_N >= DGROUP else DGROUP
    unit = (pid_n * BLOCK_N % HALF) // UNIT
    tl.debug_barrier()  # every thread's rows stored; one thread's gpu-scope acq_rel atomic releases them
    arrived = tl.atomic_add(gcnt_ptr + unit, 1, sem="acq_rel", scope="gpu")
    if arrived == 2 * (UNIT // BLOCK_N) - 1:
        rows = unit * UNIT + tl.arange(0, UNIT)
        gate = tl.load(y_ptr + rows, cache_modifier=".cg").to(tl.float32)
        up = tl.load(y_ptr + HALF + rows, cache_modifier=".cg").to(tl.float32)
        act = (gelu_tanh(gate) * up).to(y_ptr.dtype.element_ty).to(tl.float32)
        GB: tl.constexpr = UNIT // DGROUP
        g = unit * GB + tl.arange(0, GB)
        _store_levels(tl.reshape(act, (GB, DGROUP // 8, 4, 2)), g, lq_ptr, lf_ptr, lc_ptr, HALF // DGROUP, DGROUP,
                      GB, DLEVELS)
        tl.store(gcnt_ptr + unit, 0)


@triton.jit
def _close_row(y_ptr, ccnt_ptr, h_ptr, wc_ptr, sc_ptr, o_ptr, N, eps, CSTEPS: tl.constexpr):
    """`_int4_gemv1_kernel`'s CLOSE epilogue, run by the program that wrote a row block of y: it bumps the
    row's counter (zeroed before the launch; the release as RED 2's) and the last of the grid's row blocks
    writes out = (h + rms_norm(y) * wc) * sc[0], each step rounded as the model's ops leave it (the norm to
    y's dtype, the sum to h's, the product to out's): a layer's closing residual add after its last
    projection (`close_reference`), in CSTEPS NORM_BLOCK-wide steps whose loads are in flight together. The
    counter goes back to 0. (With PDL every pointer here comes offset by the wait's 0.)"""
    tl.debug_barrier()  # every thread's rows stored; one thread's gpu-scope acq_rel atomic releases them
    arrived = tl.atomic_add(ccnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        # N a multiple of 8 (`int4_gemv1` checks): the masks hold for runs of 8, so the loads are 16 bytes wide
        # (with N's factor unknown they were 2-byte loads, and the 31B's down GEMV took 239 registers for 128,
        # two programs an SM for four), and the values stay in their dtype until used (packed pairs): 135, three
        # an SM, as many as its 336 programs put there (sm_90, ptxas, its arguments aligned as launched)
        n8 = N // 8 * 8  # = N; its factor 8 is what the compiler reads
        ys = []
        hs = []
        ws = []
        ss = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
        for i in tl.static_range(CSTEPS):  # y, h and w loaded together: one trip to the L2
            o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
            m = o < n8
            yv = tl.load(y_ptr + o, mask=m, other=0.0, cache_modifier=".cg")
            ss += yv.to(tl.float32) * yv.to(tl.float32)
            ys = ys + [yv]
            hs = hs + [tl.load(h_ptr + o, mask=m, other=0.0)]
            ws = ws + [tl.load(wc_ptr + o, mask=m, other=0.0)]
        inv = 1.0 / tl.sqrt_rn(tl.sum(ss, 0) / N + tl.cast(eps, tl.float32))
        s = tl.load(sc_ptr).to(tl.float32)
        for i in tl.static_range(CSTEPS):
            o = i * NORM_BLOCK + tl.arange(0, NORM_BLOCK)
            hv = _residual(hs[i].to(tl.float32), ys[i].to(tl.float32), ws[i].to(tl.float32), inv,
                           y_ptr.dtype.element_ty, h_ptr.dtype.element_ty)
            tl.store(o_ptr + o, (hv * s).to(o_ptr.dtype.element_ty), mask=o < n8)
        tl.store(ccnt_ptr, 0)


@triton.jit
def _red2_sum(val, part_ptr, y_ptr, cnt_ptr, pid_n, pid_k, offs_n, SPLITS, stride_ps, N):
    """RED 2, the K slices' sum in-kernel: this program's fp32 partials val [BLOCK_N] (rows offs_n, slice pid_k)
    stored, its row block's counter bumped, and the program that arrives last sums the partials in slice order
    (deterministic: RED 0's bits) into y (y's dtype) and puts the counter back to 0. The release is the pattern
    of CUTLASS's semaphore, a barrier (every thread's partials stored) and then one thread's gpu-scope acq_rel
    atomic, with no fence in inline PTX (torch's mutation analysis cannot read such an op). -> whether this
    program was the last (it may go on to the row block's epilogues)."""
    nm = offs_n < N
    tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)
    tl.debug_barrier()  # every thread's partials stored; one thread's gpu-scope acq_rel atomic releases them
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLITS - 1
    if last:
        tot = tl.zeros(val.shape, dtype=tl.float32)
        for i in range(SPLITS):
            tot += tl.load(part_ptr + i * stride_ps + offs_n, mask=nm, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + offs_n, tot.to(y_ptr.dtype.element_ty), mask=nm)
        tl.store(cnt_ptr + pid_n, 0)
    return last


@triton.jit(do_not_specialize=["N", "KW", "GPS", "SPLITS", "stride_sn", "stride_ps"])
def _int4_gemv1_kernel(x_ptr, xf_ptr, xc_ptr, w_ptr, s_ptr, part_ptr, y_ptr, cnt_ptr, N, KW, GPS, SPLITS,
                       stride_ww, stride_sn, stride_ps,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr, GROUPS: tl.constexpr,
                       DEPTH: tl.constexpr, RED: tl.constexpr, XQ: tl.constexpr, ASM: tl.constexpr,
                       PDL: tl.constexpr = 0, LEVELS: tl.constexpr = 2, GLU: tl.constexpr = 0,
                       NORM: tl.constexpr = 0, eps=0.0, NORM_STEPS: tl.constexpr = 0, r_ptr=None, wr_ptr=None,
                       h_ptr=None, RES: tl.constexpr = 0, ui_ptr=None, UI: tl.constexpr = 0,
                       EARLY: tl.constexpr = 0, GLUQ: tl.constexpr = 0, HALF=0, GOFF=0, lq_ptr=None,
                       lf_ptr=None, lc_ptr=None, dcnt_ptr=None, DNCNT=0, DGROUP: tl.constexpr = 128,
                       DLEVELS: tl.constexpr = 2, CLOSE: tl.constexpr = 0, COFF=0, ch_ptr=None, cw_ptr=None,
                       cs_ptr=None, co_ptr=None, ceps=0.0, CSTEPS: tl.constexpr = 0, zc_ptr=None,
                       ZC: tl.constexpr = 0, STAGE: tl.constexpr = 0):
    """M == 1: y[n] = sum over k of x[k] * W[n, k] for BLOCK_N rows, over one slice of GPS
    groups of K (program axis 1; K counted in words of 8 nibbles: KW = K / 8).

    The packed rows are read as int32 words (`w_ptr` points at them, `stride_ww` counts words).
    The slice is cut into PARTS parts, far apart in the row, each streamed in order; a step reads
    GROUPS adjacent whole groups of each part for BLOCK_N rows, a [BLOCK_N, PARTS * GROUPS,
    GROUP / 8] tile (16-byte loads). DEPTH (1 to 3) tiles are loaded ahead in registers (Triton
    pipelines no loads outside a dot by itself; its `tl.range(num_stages=...)` staging through
    shared memory measured slower, scripts/gemv1_variants.py). The accumulator keeps the tile's
    shape until the end (one cross-thread sum).

    One slice (SPLITS == 1) writes y (x's dtype). Several: RED 0 writes fp32 partials
    part[pid_k] for `_sum_splits_kernel`; RED 2 writes them and bumps the row block's counter
    (zeroed before the launch), and the program that arrives last sums the partials in slice
    order (deterministic: RED 0's bits) into y and resets the counter to 0. The release is the
    pattern of CUTLASS's semaphore, a barrier (every thread's partials stored) and then one
    thread's gpu-scope acq_rel atomic, with no fence in inline PTX: torch's mutation analysis
    cannot read such an op (it would take every argument as written and the compiled graph
    would clone the weights). Checked on the H200 bitwise against RED 0 over 1280 calls, eager
    and in CUDA graphs (scripts/gemv1_launch_variants.py).

    XQ: x comes as `_quant_x_kernel`'s integer levels (x_ptr its planes, xf_ptr / xc_ptr its
    per-group factor and correction) and `_gemv1_loop_q` runs the slice: two masks and four dp4a
    a word, per-lane sums (no sum across lanes until the end); with K parts it does so at DEPTH 0
    (each part a column of its own), at DEPTH >= 1 `_gemv1_tile_q` sums each step across lanes;
    else x is bf16 and xf_ptr / xc_ptr are unused, or with GLU xf_ptr is u and x is
    gelu_tanh(x) * u (`_gemv1_tile`: the activation before a small weight takes no launch of its own; with
    UI u is row ui_ptr[0] of a table of such rows, read in place: no gather's launch either), or
    with NORM xf_ptr is the RMSNorm's weight (bf16) and x is rms_norm(x) * w (each program sums the
    squares of the whole row first, `_inv_rms`; the norm before a small weight takes no launch either), or
    with RES (bf16 x, not with GLU) x is h = x + rms_norm(r_ptr) * wr_ptr (eps its norm's; the residual add
    before a small weight), which the first program also writes to h_ptr; with NORM too, x is rms_norm(h) * w
    (one eps for both norms; h's factor from a second pass over x, r and wr, `_inv_rms_h`).
    LEVELS (the per-lane loop): x as two int8 levels (2, the op's) or one (1: half the dp4a and
    x's planes, x to within max|x| / 254 per group).
    GLUQ (one slice, or RED 2): W is the MLP's gate rows then as many up rows (HALF each, a multiple of
    BLOCK_N and of DGROUP), and the kernel also writes the down projection's x, gelu_tanh(gate) * up (rounded
    to y's dtype, as `_quant_x_kernel`'s GLU), as that GEMV's int8 levels (`_store_levels`: lq_ptr / lf_ptr /
    lc_ptr, group DGROUP, DLEVELS): the program that writes a row block of y bumps its unit's counter
    (cnt_ptr's from GOFF on, after RED 2's; zeroed before the launch; the release as RED 2's) and the last of
    the unit reads its gate and
    up rows back and writes their groups (`_glu_levels`); those programs also zero the down GEMV's DNCNT
    counters (dcnt_ptr). The activation's quantize kernel takes no launch.
    CLOSE (one slice, or RED 2; not with GLUQ): the kernel also writes the layer's output after its last
    projection, co = (ch + rms_norm(y) * cw) * cs[0] (eps ceps; `close_reference`): each program that writes a
    row block of y bumps the row's counter (cnt_ptr's at COFF, after RED 2's; zeroed before the launch) and
    the last of them computes it (`_close_row`, CSTEPS `norm_steps(N)`). The closing add's kernel takes no
    launch. ZC (with RES): the first program also zeroes zc_ptr[0] (a counter of the GEMV after this one, for
    a bf16-x GEMV whose counters no quantize kernel zeroes). STAGE (bf16 x, one K part, 4 rows or more): each
    step's x once for the program rather than once a row of threads (`_gemv1_tile`'s STAGE; on 2-row tiles the
    shared-memory hand-over costs what it saves: E2B's per-layer gate 192 -> 196 instructions a word).

    PDL (1 or 2; launched with `launch_pdl=True` after `_quant_x_kernel`, sm_90+, `pdl_wait`): the
    XQ loop loads its first weight tile and scales while the kernel before it finishes, then waits
    and reads x; the other paths wait first thing, or with EARLY after loading their first DEPTH tiles
    (`_gemv1_first`). Every global write comes after the wait."""
    WORDS: tl.constexpr = GROUP // 8
    C: tl.constexpr = PARTS * GROUPS
    STEP: tl.constexpr = GROUPS * WORDS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    gpp = (GPS + PARTS - 1) // PARTS  # groups per part
    col = tl.arange(0, C)
    pcol = col // GROUPS
    w_lo = pid_k * GPS * WORDS  # slices and parts start at whole groups: the loads stay 16 bytes wide
    w_hi = tl.minimum(w_lo + GPS * WORDS, KW)
    start = (w_lo + pcol * (gpp * WORDS) + (col % GROUPS) * WORDS)[None, :, None]  # [1, C, 1]
    hi = tl.minimum(w_lo + (pcol + 1) * (gpp * WORDS), w_hi)[None, :, None]
    if XQ and (PARTS == 1 or DEPTH == 0):  # one step ahead, summed per lane (`_gemv1_loop_q`; DEPTH 0 asks
        # for it with K parts too, where DEPTH >= 1 takes `_gemv1_tile_q`)
        val = _gemv1_loop_q(x_ptr.to(tl.pointer_type(tl.int32)), xf_ptr, xc_ptr, w_ptr, s_ptr, offs_n, N, KW, start,
                            hi, gpp, stride_ww, stride_sn, WORDS, STEP, ASM, PDL, LEVELS)
    else:
        tl.static_assert(LEVELS == 2 or not XQ, "x as one level: the per-lane loop only")
        tl.static_assert(not ((GLU or NORM or RES) and XQ), "with x as levels the quantize kernel computes them")
        tl.static_assert(not (RES and GLU), "RES: the residual add, alone or before the norm")
        lane = tl.arange(0, WORDS)[None, None, :]
        rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_ww
        srows = s_ptr + offs_n.to(tl.int64)[:, None, None] * stride_sn
        if EARLY:  # the first tiles (weights: constants) load before the wait, while the kernel before finishes
            w0, s0, w1, s1, w2, s2 = _gemv1_first(rows, srows, start, lane, hi, n_ok, STEP, DEPTH)
        if PDL:  # x (and x's factors) read after the wait; the weights may load before it
            z = pdl_wait(PDL, ASM)
            x_ptr, xf_ptr, xc_ptr = x_ptr + z, xf_ptr + z, xc_ptr + z
            if RES:
                r_ptr, wr_ptr, h_ptr = r_ptr + z, wr_ptr + z, h_ptr + z
            if ZC:
                zc_ptr = zc_ptr + z
        xw = x_ptr.to(tl.pointer_type(tl.int32))  # bf16 pairs (x[2p], x[2p + 1]) as one word, or XQ's words
        uw = xf_ptr.to(tl.pointer_type(tl.int32))  # GLU: u's bf16 pairs; NORM: the norm weight's
        if UI:  # u: the table's row ui_ptr[0] (K / 2 pairs a row)
            uw = uw + tl.load(ui_ptr) * (KW * 4)
        inv = 1.0
        if NORM and not RES:
            inv = _inv_rms(xw, KW * 8, eps, 1, NORM_STEPS)
        inv_r = 1.0
        rw = xw
        wrw = uw
        if RES:
            rw = r_ptr.to(tl.pointer_type(tl.int32))
            wrw = wr_ptr.to(tl.pointer_type(tl.int32))
            inv_r = _inv_rms(rw, KW * 8, eps, 1, NORM_STEPS)
            if NORM:  # the norm is h's
                inv = _inv_rms_h(xw, rw, wrw, KW * 8, eps, inv_r, NORM_STEPS)
            if (pid_n == 0) & (pid_k == 0):  # h for the model's next ops, once: the pairs the tiles compute
                if ZC:  # the next GEMV's counter (its wait follows this kernel's end)
                    tl.store(zc_ptr, 0)
                for i in range(0, KW * 4, NORM_BLOCK):  # (values bf16 holds exactly: the casts round nothing)
                    o = i + tl.arange(0, NORM_BLOCK)
                    m = o < KW * 4
                    h_lo, h_hi = _residual_pair(tl.load(xw + o, mask=m, other=0), tl.load(rw + o, mask=m, other=0),
                                                tl.load(wrw + o, mask=m, other=0), inv_r)
                    tl.store(h_ptr + 2 * o, h_lo.to(h_ptr.dtype.element_ty), mask=m)
                    tl.store(h_ptr + 2 * o + 1, h_hi.to(h_ptr.dtype.element_ty), mask=m)
        if XQ:
            acc = tl.zeros((BLOCK_N, C, 1), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, C, WORDS), dtype=tl.float32)
        if not EARLY:
            w0, s0, w1, s1, w2, s2 = _gemv1_first(rows, srows, start, lane, hi, n_ok, STEP, DEPTH)
        for tg in range(0, gpp, GROUPS):
            g0 = start + tg * WORDS
            gn = g0 + DEPTH * STEP
            wn = tl.load(rows + (gn + lane), mask=n_ok & (gn < hi), other=0)
            sn = tl.load(srows + gn // WORDS, mask=n_ok & (gn < hi), other=0.0)
            if XQ:
                acc += _gemv1_tile_q(w0, s0, xw, xf_ptr, xc_ptr, (KW + 15) // 16 * 16, g0, lane, g0 < hi, WORDS,
                                     ASM)
            elif STAGE and PARTS == 1 and BLOCK_N >= 4:  # x's step once for the program (g0 + lane as [C, WORDS])
                wd = w_lo + tg * WORDS + tl.arange(0, C)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
                acc += _gemv1_tile(w0, s0, xw, uw, g0, lane, g0 < hi, ASM, GLU, NORM, inv, RES, rw, wrw, inv_r, wd,
                                   wd < w_hi, 1)
            else:
                acc += _gemv1_tile(w0, s0, xw, uw, g0, lane, g0 < hi, ASM, GLU, NORM, inv, RES, rw, wrw, inv_r)
            w0, s0, w1, s1, w2, s2 = _gemv1_ahead(w0, s0, w1, s1, w2, s2, wn, sn, DEPTH)
        val = tl.sum(tl.sum(acc, axis=2), axis=1)
    nm = offs_n < N
    if PDL:  # the writes after the wait (their values follow it already; the counter's address too)
        zw = pdl_wait(PDL, ASM)
        y_ptr, part_ptr, cnt_ptr = y_ptr + zw, part_ptr + zw, cnt_ptr + zw
        if GLUQ:
            lq_ptr, lf_ptr, lc_ptr, dcnt_ptr = lq_ptr + zw, lf_ptr + zw, lc_ptr + zw, dcnt_ptr + zw
        if CLOSE:
            ch_ptr, cw_ptr, cs_ptr, co_ptr = ch_ptr + zw, cw_ptr + zw, cs_ptr + zw, co_ptr + zw
    tl.static_assert(not (CLOSE and GLUQ), "CLOSE: the layer's last GEMV, not the gate / up")
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=nm)
        if GLUQ:
            _glu_levels(y_ptr, cnt_ptr + GOFF, lq_ptr, lf_ptr, lc_ptr, dcnt_ptr, DNCNT, HALF, pid_n, BLOCK_N, DGROUP,
                        DLEVELS)
        if CLOSE:
            _close_row(y_ptr, cnt_ptr + COFF, ch_ptr, cw_ptr, cs_ptr, co_ptr, N, ceps, CSTEPS)
    elif RED == 0:
        tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)
    else:
        if _red2_sum(val, part_ptr, y_ptr, cnt_ptr, pid_n, pid_k, offs_n, SPLITS, stride_ps, N):
            if GLUQ:
                _glu_levels(y_ptr, cnt_ptr + GOFF, lq_ptr, lf_ptr, lc_ptr, dcnt_ptr, DNCNT, HALF, pid_n, BLOCK_N,
                            DGROUP, DLEVELS)
            if CLOSE:
                _close_row(y_ptr, cnt_ptr + COFF, ch_ptr, cw_ptr, cs_ptr, co_ptr, N, ceps, CSTEPS)


@triton.jit(do_not_specialize=["N", "KW", "GPS", "SPLITS", "stride_sn", "stride_ps"])
def _int4_gemv1_tma_kernel(x_ptr, xf_ptr, xc_ptr, w_desc, s_ptr, part_ptr, y_ptr, cnt_ptr, N, KW, GPS, SPLITS,
                           stride_sn, stride_ps, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUPS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0,
                           LEVELS: tl.constexpr = 2):
    """M == 1 with x as `_quant_x_kernel`'s levels, the weight tiles brought in by the tensor memory accelerator:
    y[n] = sum over k of x[k] * W[n, k] for BLOCK_N rows over one slice of GPS groups of K (program axis 1).

    w_desc is a tensor descriptor over the [N, KW] int32 words with a [BLOCK_N, COPY * GROUP / 8] block, COPY
    groups a copy (past N or KW the copy fills zeros; at most 128 bytes of a row, the widest swizzle, which
    AOTInductor's wrapper takes for the descriptor as given: a wider block is an invalid argument there).
    Each step takes GROUPS / COPY copies; its tiles come through a `tl.range(num_stages=STAGES)` loop, which
    Triton pipelines as TMA copies into STAGES shared-memory buffers with mbarriers on sm_90+ (STAGES - 1
    copies in flight, no register held by them; on sm_89, which has no TMA, Triton's own copies), and is
    multiplied with `_int4_gemv1_kernel`'s per-lane arithmetic (`_gemv1_tile_lanes`); a group past the slice
    has its scale masked to 0. The K slices are summed as RED 2 (the last program of a row block sums the fp32
    partials in slice order; cnt_ptr's counter per row block, zeroed by the quantize kernel, left at 0).

    PDL (1 or 2, `pdl_wait_at`): the wait sits in the loop's step, after the step's copies: the first step's
    copies (weights: constants; the pipeliner issues them ahead of the loop, with x's levels after the wait) go
    out before it, x's levels are read after it, as are the writes (a second wait before them)."""
    WORDS: tl.constexpr = GROUP // 8
    L: tl.constexpr = WORDS // 4
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r0 = pid_n * BLOCK_N
    offs_n = r0 + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None]
    srows = s_ptr.to(tl.pointer_type(tl.int16)) + rn * stride_sn
    XP = (KW + 15) // 16 * 16  # the planes' stride (`_quant_x_kernel`)
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    lane = tl.arange(0, WORDS)[None, None, :]
    COPY: tl.constexpr = w_desc.block_shape[1] // WORDS  # groups a copy (128 bytes of a row at most: one swizzle)
    col = tl.arange(0, COPY)[None, :, None]
    ng = KW // WORDS
    g_lo = pid_k * GPS
    g_hi = tl.minimum(g_lo + GPS, ng)
    acc = tl.zeros((BLOCK_N, COPY, L), dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(g_hi - g_lo, GROUPS), num_stages=STAGES):
        ws = []
        for h in tl.static_range(GROUPS // COPY):  # the step's copies first: all of the first step's go out
            ws = ws + [w_desc.load([r0, (g_lo + t * GROUPS + h * COPY) * WORDS])]  # before the PDL wait
        z = pdl_wait_at(t, PDL, ASM)
        for h in tl.static_range(GROUPS // COPY):
            gc = g_lo + t * GROUPS + h * COPY + col
            gl = tl.minimum(gc, ng - 1)
            s = _gemv1_scale(srows + gl, n_ok & (gc < g_hi), ASM)
            he, ho, le, lo, c, f = _gemv1_x_planes(xw + z, xf_ptr + z, xc_ptr + z, XP, gl * WORDS, lane, L, ASM, PDL,
                                                   LEVELS)
            acc += _gemv1_tile_lanes(tl.reshape(ws[h], (BLOCK_N, COPY, L, 4)), s, he, ho, le, lo, c, f, ASM, LEVELS)
    val = tl.sum(tl.sum(acc, axis=2), axis=1)
    nm = offs_n < N
    zw = pdl_wait(PDL, ASM)  # the writes after the wait (the loop's wait returned already)
    y_ptr, part_ptr, cnt_ptr = y_ptr + zw, part_ptr + zw, cnt_ptr + zw
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=nm)
    else:
        _red2_sum(val, part_ptr, y_ptr, cnt_ptr, pid_n, pid_k, offs_n, SPLITS, stride_ps, N)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, SPLITS, stride_ps, BLOCK: tl.constexpr):
    """out[n] = sum_s part[s, n] in out's dtype: the K slices' fp32 partials, one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(SPLITS):
        acc += tl.load(part_ptr + i * stride_ps + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < N)


# ---- small M on the tensor cores: one mma.sync per half word --------------------------------
#
# A warp covers 8 weight rows x one group of 128 (16 words): lane 4g + t holds words 4t .. 4t + 3
# of row g (one 16-byte load), which is the B operand of m16n8k16 as it stands (column g, k rows
# 2t, 2t + 1, 2t + 8, 2t + 9 of each mma: the k order inside a group is free as long as x follows
# it). Each word becomes four bf16 pairs v - 8 for k, k + 4: a shift, a lop3 that puts the nibble
# in the mantissa of 128.0 and a packed fma that takes 136 off; x's rows 0 .. M - 1 are the A
# operand (rows 8 .. 15 zero). The fp32 result of a group is scaled per row once.

_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"


def _gemv_mma_asm() -> str:
    """One group of one lane's 4 words into its accumulator fragment: $0..$3 the new
    accumulator (c0..c3); $4..$7 4 words of one row; $8 + 4p + i x pair p of word i; $24..$27
    the rows' bf16 scales (zero-extended); $28..$31 the accumulator so far; $32..$35 the
    bias's sums (`_gemv_mma_bias_asm`), where both chains start.

    The A fragment is the 4 x pairs of a word as they come, {X0, X1, X2, X3}: rows g take X0,
    X2 (k pairs 0/4 and 2/6), rows g + 8 take X1, X3 (1/5 and 3/7), both x's row g. One mma
    with B = the weight pairs (0/4, 2/6) sums rows g's half into P's c0, c1; one with
    (1/5, 3/7) rows g + 8's into Q's c2, c3; the other halves of P and Q are cross terms, unused.
    B holds 128 + v (one lop3 puts the nibble in the mantissa of 128.0); starting from
    -136 x sum(x) leaves the sums of (v - 8) x. Scaled once: c0 += (P0 + Q2) s, c1 += (P1 + Q3) s."""
    s = ["{", ".reg .b32 q, b0, b1, b2, b3, s0, s1;", ".reg .f32 p0, p1, p2, p3, q0, q1, q2, q3;"]
    s += [f"mov.b32 p{i}, ${32 + i};" for i in range(4)] + [f"mov.b32 q{i}, ${32 + i};" for i in range(4)]
    for i in range(4):
        w = f"${4 + i}"
        s.append(f"lop3.b32 b0, {w}, 0x000f000f, 0x43004300, 0xea;")
        for p in (1, 2, 3):
            s += [f"shr.u32 q, {w}, {4 * p};", f"lop3.b32 b{p}, q, 0x000f000f, 0x43004300, 0xea;"]
        a = ", ".join(f"${8 + 4 * p + i}" for p in range(4))
        s.append(f"{_MMA} {{p0, p1, p2, p3}}, {{{a}}}, {{b0, b2}}, {{p0, p1, p2, p3}};")
        s.append(f"{_MMA} {{q0, q1, q2, q3}}, {{{a}}}, {{b1, b3}}, {{q0, q1, q2, q3}};")
    s += ["add.f32 p0, p0, q2;", "add.f32 p1, p1, q3;", "shl.b32 s0, $24, 16;", "shl.b32 s1, $25, 16;",
          "fma.rn.f32 $0, p0, s0, $28;", "fma.rn.f32 $1, p1, s1, $29;", "mov.b32 $2, $30;", "mov.b32 $3, $31;"]
    return "\n".join(s + ["}"])


def _gemv_mma_bias_asm() -> str:
    """-136 x the group's sums of x as the fragment both chains of `_gemv_mma_asm` start from:
    one mma a word with B = -136 (c0, c1: x0 + x2 of rows g; c2, c3: x1 + x3 of rows g + 8).
    $0..$3 the fragment; $4 + 4p + i x pair p of word i."""
    s = ["{", ".reg .b32 c;", "mov.b32 c, 0xC308C308;"] + [f"mov.b32 ${i}, 0;" for i in range(4)]  # bf16 -136.0 x2
    for i in range(4):
        a = ", ".join(f"${4 + 4 * p + i}" for p in range(4))
        s.append(f"{_MMA} {{$0, $1, $2, $3}}, {{{a}}}, {{c, c}}, {{$0, $1, $2, $3}};")
    return "\n".join(s + ["}"])


GEMV_MMA_BIAS_ASM = tl.constexpr(_gemv_mma_bias_asm())
GEMV_MMA_ASM = tl.constexpr(_gemv_mma_asm())


@triton.jit
def _ld_u16(ptr):
    """A 16-bit load (zero-extended to 32) in the layout of `ptr`'s consumers."""
    return tl.inline_asm_elementwise("ld.global.nc.u16 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _gemv_mma_x(xw, stride_xw, M, j0, g, c, ASM: tl.constexpr):
    """x's pairs for words j0 + c of row g as the A fragments: X_p = (x[8w + p], x[8w + p + 4])
    for p = 0 .. 3 (0 for rows g >= M in the plain-ops path), and the bias's fragment."""
    if ASM:  # loaded through PTX too (see `_ld_u16`), 16 bytes a word; rows g >= M read row
        # M - 1 (their sums are never stored)
        n0, n1, n2, n3 = tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
            [xw + tl.minimum(g, M - 1) * stride_xw + (j0 + c) * 4], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)  # (x[8w], x[8w + 1]), (x[8w + 2], x[8w + 3]), ...
    else:
        base = xw + g * stride_xw + (j0 + c) * 4
        n0 = tl.load(base, mask=g < M, other=0)
        n1 = tl.load(base + 1, mask=g < M, other=0)
        n2 = tl.load(base + 2, mask=g < M, other=0)
        n3 = tl.load(base + 3, mask=g < M, other=0)
    if ASM:
        x0, x1, x2, x3 = tl.inline_asm_elementwise(
            "prmt.b32 $0, $4, $6, 0x5410; prmt.b32 $1, $4, $6, 0x7632;"
            "prmt.b32 $2, $5, $7, 0x5410; prmt.b32 $3, $5, $7, 0x7632;",
            "=r,=r,=r,=r,r,r,r,r", [n0, n1, n2, n3], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
        nb = tl.inline_asm_elementwise(GEMV_MMA_BIAS_ASM, "=f,=f,=f,=f" + ",r" * 16, [x0, x1, x2, x3],
                                       dtype=tl.float32, is_pure=True, pack=4)
    else:
        x0 = (n0 & 0xFFFF) | (n2 << 16)
        x1 = ((n0 >> 16) & 0xFFFF) | (n2 & -65536)
        x2 = (n1 & 0xFFFF) | (n3 << 16)
        x3 = ((n1 >> 16) & 0xFFFF) | (n3 & -65536)
        nb = tl.zeros(x0.shape, dtype=tl.float32)
    return x0, x1, x2, x3, nb


@triton.jit
def _gemv_mma_emulated(w_ptr, stride_ww, xw, stride_xw, M, N, rows_c, j, ok, m, c):
    """What the mma fragments hold, in plain ops (the interpreter runs no inline PTX): at [r, c]
    with c % 4 < 2, the group at words j of x row m with weight row rows_c, v - 8 each (0 where
    not `ok`)."""
    jj = tl.arange(0, 16)[None, None, :]
    w = tl.load(w_ptr + rows_c.to(tl.int64)[:, :, None] * stride_ww + j[:, :, None] + jj,
                mask=((rows_c < N) & ok)[:, :, None], other=0)  # [rows, 16, 16]
    d = tl.zeros(rows_c.shape, dtype=tl.float32)
    for p in tl.static_range(4):
        xp = tl.load(xw + m[:, :, None] * stride_xw + (j[:, :, None] + jj) * 4 + p,
                     mask=((m < M) & ok)[:, :, None], other=0)
        lo = (xp << 16).to(tl.float32, bitcast=True)
        hi = (xp & -65536).to(tl.float32, bitcast=True)
        d += tl.sum((((w >> (8 * p)) & 0xF) - 8).to(tl.float32) * lo, axis=2)
        d += tl.sum((((w >> (8 * p + 4)) & 0xF) - 8).to(tl.float32) * hi, axis=2)
    return d


@triton.jit
def _int4_gemv_mma_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, KW, KW_PER_SPLIT, stride_xm, stride_ww, stride_sn,
                          stride_os, stride_om, BLOCK_N: tl.constexpr, KS: tl.constexpr, ONE_ROW: tl.constexpr,
                          ASM: tl.constexpr):
    """M <= 8, group 128, bf16 x: out[pid_k, m, n] = the K slice's sum of x[m, k] W[n, k] over
    BLOCK_N rows (see the notes above `_gemv_mma_asm`), the slice cut again into KS parts inside
    the program (summed at the end: no second kernel). The tile is [KS * BLOCK_N, 16] words, the
    blocked layout Triton gives a 16-word-wide int32 load (sizePerThread [1, 4], threadsPerWarp
    [8, 4]): lane 4g + t holds tile rows r with r % 8 = g, part r // BLOCK_N. Element [r, 4t + i]
    of a result fragment is c_i of its lane: (m = g, row r - g + 2t + i) for i < 2, x's zero
    rows for i >= 2. ONE_ROW (M == 1, KS == 1): every lane gives x's row 0 (one load of x per
    step, not one per row), so every m holds the same sums and the lanes with g = 0 store them.
    The next group's words, scales and x load before this one's mmas."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_N * KS)[:, None]
    c = tl.arange(0, 16)[None, :]
    g = r % 8
    rows = pid_n * BLOCK_N + r % BLOCK_N  # the row this lane's words come from
    rows_c = rows - g + 2 * (c // 4) + (c % 2)  # the row of result element c
    frag = (c % 4) < 2
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    stride_xw = stride_xm // 2
    w_lo = pid_k * KW_PER_SPLIT
    w_hi = tl.minimum(w_lo + KW_PER_SPLIT, KW)
    per_part = tl.cdiv(tl.cdiv(w_hi - w_lo, 16), KS) * 16
    p_lo = w_lo + (r // BLOCK_N) * per_part  # [rows, 1]: this row's part of the slice
    p_hi = tl.minimum(p_lo + per_part, w_hi)
    acc = tl.zeros((BLOCK_N * KS, 16), dtype=tl.float32)
    if ASM:
        # no masks: rows past N read row N - 1, words past the end the last group (neither is
        # stored, or its scale is 0); the scales and x load through inline PTX, so that no
        # tensor in the loop takes another layout than the words' (a layout conversion per
        # step costs a trip through shared memory)
        wrow = w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_ww
        srow = s_ptr.to(tl.pointer_type(tl.int16)) + tl.minimum(rows_c, N - 1).to(tl.int64) * stride_sn
        jc = tl.minimum(p_lo, KW - 16)
        w = tl.load(wrow + jc + c)
        s = _ld_u16(srow + jc // 16)
        if KS > 1:
            s = tl.where(p_lo < p_hi, s, 0)
        if ONE_ROW:
            x0, x1, x2, x3, nb = _gemv_mma_x(xw, stride_xw, M, w_lo, tl.zeros((1, 1), dtype=tl.int32), c, ASM)
        else:
            x0, x1, x2, x3, nb = _gemv_mma_x(xw, stride_xw, M, jc, g, c, ASM)
        # the next group's words, scales and x load first. (Unrolled by 2 through tl.range it ran
        # as fast and gave NaN on odd group counts on an H200: left rolled.)
        for jj in range(0, per_part, 16):
            nxt = p_lo + jj + 16
            jc = tl.minimum(nxt, KW - 16)
            w_next = tl.load(wrow + jc + c)
            s_next = _ld_u16(srow + jc // 16)
            if KS > 1:
                s_next = tl.where(nxt < p_hi, s_next, 0)
            if ONE_ROW:
                y0, y1, y2, y3, nb_next = _gemv_mma_x(xw, stride_xw, M, tl.minimum(w_lo + jj + 16, KW - 16),
                                                      tl.zeros((1, 1), dtype=tl.int32), c, ASM)
            else:
                y0, y1, y2, y3, nb_next = _gemv_mma_x(xw, stride_xw, M, jc, g, c, ASM)
            acc = tl.inline_asm_elementwise(GEMV_MMA_ASM, "=f,=f,=f,=f" + ",r" * 24 + ",f,f,f,f,f,f,f,f",
                                            [w, x0, x1, x2, x3, s, acc, nb], dtype=tl.float32, is_pure=True, pack=4)
            w, s, x0, x1, x2, x3, nb = w_next, s_next, y0, y1, y2, y3, nb_next
    else:
        for jj in range(0, per_part, 16):
            j = p_lo + jj
            ok = j < p_hi
            s = tl.load(s_ptr + rows_c.to(tl.int64) * stride_sn + j // 16, mask=frag & (rows_c < N) & ok, other=0.0)
            acc += _gemv_mma_emulated(w_ptr, stride_ww, xw, stride_xw, M, N, rows_c, j, ok, g, c) * s.to(tl.float32)
    if KS > 1:
        acc = tl.sum(tl.reshape(acc, (KS, BLOCK_N, 16)), axis=0)
        r = tl.arange(0, BLOCK_N)[:, None]
        g = r % 8
        rows_c = pid_n * BLOCK_N + r - g + 2 * (c // 4) + (c % 2)
    m_ok = (g == 0) if ONE_ROW else (g < M)
    tl.store(out_ptr + pid_k * stride_os + g * stride_om + rows_c, acc.to(out_ptr.dtype.element_ty),
             mask=frag & m_ok & (rows_c < N))

@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, out_ptr, N, KW, stride_ww, stride_sn, stride_on,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """W [N, K] = q * scale in out's dtype (16-bit), BLOCK_N rows x BLOCK_W words per program,
    rounded once like `dequantize_int4`: the large-M path's scratch for a cuBLAS matmul.
    Written as 32-bit pairs of values."""
    pid_n, pid_w = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (offs_n < N)[:, None] & (offs_w < KW)[None, :]
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_ww + offs_w[None, :], mask=ok, other=0)
    s = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + (offs_w // (GROUP // 8))[None, :],
                mask=ok, other=0.0).to(tl.float32)
    pairs = []
    for p in tl.static_range(4):  # k = 8j + 2p, 8j + 2p + 1 as one 32-bit word of two values
        lo = ((((w >> (8 * p)) & 0xF) - 8).to(tl.float32) * s).to(out_ptr.dtype.element_ty)
        hi = ((((w >> (8 * p + 4)) & 0xF) - 8).to(tl.float32) * s).to(out_ptr.dtype.element_ty)
        pairs = pairs + [(lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)]
    # join puts its pair last: [BN, BW, a, b] holds pairs[2a + b]
    q = tl.join(tl.join(pairs[0], pairs[2]), tl.join(pairs[1], pairs[3])).reshape(BLOCK_N, BLOCK_W * 4)
    offs_p = pid_w * BLOCK_W * 4 + tl.arange(0, BLOCK_W * 4)
    tl.store(out_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (stride_on // 2) + offs_p[None, :], q,
             mask=(offs_n < N)[:, None] & (offs_p < KW * 4)[None, :])


def int4_dequant(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 block_n: int = 32, block_w: int = 64, num_warps: int = 4) -> torch.Tensor:
    """dequant(W) [N, K] in `dtype` on the GPU, one bandwidth-bound pass."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]
    words = qweight.view(torch.int32)
    out = torch.empty((N, K), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K // 8, block_w))
    launch = _int4_dequant_kernel if _INTERPRET else wrap_triton(_int4_dequant_kernel)
    launch[grid](words, scales, out, N, K // 8, words.stride(0), scales.stride(0), out.stride(0),
                 GROUP=G, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=num_warps)
    return out


AUTOTUNE_KWARGS: dict = {}  # e.g. a faster `do_bench` for benchmarks sweeping many shapes


def _autotuned(configs, kernel=_int4_matmul_kernel):
    # keyed on M's launch bucket (not M itself) so a dynamic prefill length does not re-tune
    key = ["M_BUCKET", "N", "K", "GROUP"] if kernel is _int4_matmul_kernel else ["N", "KW", "GPS", "RED", "GROUP"]
    key = [a for a in key if a in kernel.arg_names]
    return triton.autotune(configs=configs, key=key, **AUTOTUNE_KWARGS)(kernel)


_KERNELS: dict[tuple[str, bool, bool, int], object] = {}


@contextlib.contextmanager
def one_config():
    """Launches traced inside keep one config per autotuned kernel, the first of its pool (each
    pool lists first the config to run without timing; M == 1 takes `gemv1_plan` anyway):
    exports without autotune compile fast and two of them compute bitwise the same result."""
    global ONE_CONFIG
    saved, ONE_CONFIG = ONE_CONFIG, True
    try:
        yield
    finally:
        ONE_CONFIG = saved


def _kernel(kind: str, group: int):
    """The autotuned kernel for a path: 'gemv1' (M == 1), 'gemv' (2 <= M <= GEMV_MAX_M) or
    'gemm'."""
    key = (kind, CONSUMER_ONLY, ONE_CONFIG, group if kind == "gemv1" else 0)
    if key not in _KERNELS:
        pool = {"gemv1": GEMV1_CONFIGS, "gemv": GEMV_CONFIGS, "gemm": GEMM_CONFIGS}[kind]
        configs = active_configs(pool, CONSUMER_ONLY)
        if ONE_CONFIG:
            configs = configs[:1]
        _KERNELS[key] = _autotuned(configs, _int4_gemv1_kernel if kind == "gemv1" else _int4_matmul_kernel)
    return _KERNELS[key]


# Small weights (the E2B / E4B projections and per-layer gates): one launch with bf16 x (no
# `_quant_x_kernel`) and a tile whose step covers K in one or two steps, one slice
# (`gemv1_step_config`). H200, us per call, the pool's plan -> this tile
# (scripts/gemv1_small_variants.py, scripts/measurements/gemv1_small_variants.json): 2560 x 2048
# 5.31 -> 3.99, 1536 x 2048 4.87 -> 3.17, 2048 / 4096 / 5120 x 1536 4.82 / 5.46 / 7.21 -> 3.53 /
# 4.79 / 5.46, 256 x 2560 5.14 -> 3.17, 256 x 1536 4.47 -> 2.31, 2560 x 256 4.24 -> 2.14,
# 2816 x 704 (group 64) 5.24 -> 2.98; 8960 x 1536 a tie (7.97 / 7.89); an E4B sliding layer's
# projections as one graph 46.0 -> 40.4. The plan stays ahead from 12288 x 1536 (8.49 against
# 9.92) and with K >= 2560 from 2048 rows (3072 x 2560 5.22, 2048 x 2560 5.59, no tile of the
# sweep faster).
GEMV1_STEP_MAX_K = 2048  # M == 1 with K up to this and N up to GEMV1_STEP_MAX_N: `gemv1_step_config`
GEMV1_STEP_MAX_N = 9216
GEMV1_THIN_N = 512  # and with N up to this for K up to GEMV1_THIN_MAX_K (the per-layer gates)
GEMV1_THIN_MAX_K = 4096
# Staged tiles fitted to the row (STEP_FIT, with x staged: GEMV1_STAGE). A step that leaves groups masked still runs
# their arithmetic: E2B's 12 groups in steps of 8 compute 16 (sm_90 SASS of its q / k / v loop, 8 rows: ~57
# instructions a word of the row at 8 groups a step, ~42 at 4 in three steps). So the step is the power of two
# that computes the fewest groups within 4 steps, ties to ~128 words of a row a step (8 groups of 128); 4 rows up
# to 2047, 8 up to 6143, then 16; 8 warps from 128 words a row-step on up to 8 rows, else 4. Since x is computed
# once a program, K up to GEMV1_STAGED_MAX_K takes such a tile too (bf16 x, one launch), from 1024 up to
# GEMV1_STAGED_MAX_N rows, where x is plain or a norm of it (`gemv1_plan`'s prologue "plain" / "norm": the o and
# q / k / v projections). H100, us per call with plain x (scripts/gemv1_small_variants.py,
# gemv1_small_stage_h100.json): E2B q / k / v 2560 x 1536 4.06 -> 3.75, full 5120 x 1536 6.54 -> 4.63, 8960 x
# 1536 8.81 -> 6.62, o 1536 x 4096 6.49 -> 5.07 (the pool's two launches before); E4B q 2048 x 2560 5.82 -> 4.36,
# 6144 x 2560 9.29 -> 8.18, o 2560 x 4096 7.00 -> 6.28; 26B-A4B q / k / v 8192 x 2816 11.30 -> 10.23, o 2816 x 4096
# 7.16 -> 6.45. The pool stays ahead with more rows or K (E4B 10752 x 2560 11.3 against 13.8, 26B-A4B 9216 x 2816
# 11.8 / 12.7, 2560 x 10240 11.7 / 17.4). In the artifact, E2B's 6-layer slice with the fitted step alone
# (step_fit_ab_e2b_h100.json): decode step 0.369 -> 0.363 ms; E4B's 6 layers and the 26B-A4B's 4 with the tiles
# reaching K 6144 (step_fit_ab_e4b_6l_h100.json, step_fit_ab_26b_4l_h100.json): 95 -> 87 and 81 -> 75 launches a
# step, the step 0.487 -> 0.485 and 0.473 -> 0.471 ms. "0" in an exporting process: the step of half the row's
# groups, K up to GEMV1_STEP_MAX_K (an A/B switch, scripts/export_ab.py).
GEMV1_STEP_FIT = os.environ.get("GEMMA4_GEMV1_STEP_FIT", "1") != "0"
GEMV1_STAGED_MAX_K = 6144
GEMV1_STAGED_MAX_N = 8192
# Where x is the residual add with both norms ("res": gate / up) or the activation ("glu": down), every program
# computes that prologue over the whole row of x, so the staged tiles there are narrower in K and wider in rows:
# K up to GEMV1_STAGED_MLP_MAX_K and N up to GEMV1_STAGED_MLP_MAX_N, 16 rows from 2048, 8 warps from 128 words a
# row-step. H100, a dense MLP layer's us with PDL in a graph of 16 (scripts/small_mlp_variants.py,
# small_mlp_variants_h100.json), the op's four launches (two quantize kernels, two dp4a GEMVs) against these:
# 26B-A4B 2816 x 2112, both halves 16 x 8 x 8 / 16 x 16 x 8 (rows x groups a step x warps), 15.81 -> 13.36 (at 8
# rows 15.17); E2B 1536 x 6144, gate / up 16 x 4 x 4 with the op's down 16.91 -> 16.21, its down staged too 17.00.
# E4B's (2560 x 10240) lost every way (28.7 against 37.1 at best) and stays on levels. In the artifact (H100, decode
# step at fill 1k, scripts/export_ab.py): E2B's 6-layer slice 0.358 -> 0.354 ms, the 26B-A4B's 4-layer slice 0.473
# -> 0.460 (ab_staged_mlp_e2b_6l_h100.json, ab_staged_mlp_26b_4l_h100.json). "0" in an exporting process: x as
# levels beyond GEMV1_STEP_MAX_K there (an A/B switch).
GEMV1_STAGED_MLP = os.environ.get("GEMMA4_GEMV1_STAGED_MLP", "1") != "0"
GEMV1_STAGED_MLP_MAX_K = 3072
GEMV1_STAGED_MLP_MAX_N = 12288
GEMV1_SMALL_N = 4096  # M == 1 up to this many rows: K parts inside a program, one slice
GEMV1_LARGE_N = 32768  # and from this many (gate/up, the lm_head): enough programs without a split
GEMV1_MID_SPLITS = 8  # K slices between the two, below GEMV1_WIDE_N rows
GEMV1_WIDE_N = 8192  # from here to GEMV1_LARGE_N: 64-row tiles, 2 slices
# Mid-size weights (more than GEMV1_SMALL_N rows, fewer than GEMV1_LARGE_N, group 128, x as levels) on sm_90+:
# `_int4_gemv1_tma_kernel`, its tiles brought in by TMA, 32 rows x 4 groups a step (256 bytes of a row), 3
# stages (two steps in flight, ~18 KB of shared memory), 4 warps (56 registers a thread for sm_90 where the
# register kernel takes 128), K in slices for ~GEMV1_TMA_PROGRAMS programs. H100, the 31B's sliding layer
# (scripts/gemv1_tma_variants.py, ~300 variants, gemv1_tma_variants.json): qkv 16384 x 5376 24.2 -> 21.6 us,
# down 5376 x 21504 31.8 -> 27.5, o 5376 x 8192 14.1 -> 14.1 (13.9 at 2 slices); gate / up (43008 rows) stays
# on the register kernel (50.5 against 49.9 at best). The four projections as one graph 120.2 -> 112.5 us.
# In the artifact: the 31B's 6-layer slice (ctx 131072) exported both ways (scripts/export_ab.py), decode step at
# fill 1k 1.107 / 1.107 ms -> 1.110 / 1.107 while a step's copies went out one at a time around the PDL wait, and
# 1.106 / 1.107 -> 1.096 / 1.095 (-1.0%, H100, tma_ab_31b_6l.json; logits rel 1.02e-2 apart, the sums' order)
# once all of the first step's copies go out before it. AOTInductor encodes the descriptor with the block as given,
# so a copy is 128 bytes of a row (two copies a step). On the H200 the sliding layer's four as one graph with PDL:
# register kernel 90.1 us, this 87.2 (gemv1_tma_variants.json). Compiles for sm_120 (TMA copies, 18 KB shared).
# "0" in an exporting process: the register kernel for these too (an A/B switch).
GEMV1_TMA = os.environ.get("GEMMA4_GEMV1_TMA", "1") != "0"
GEMV1_TMA_TILE = (32, 4, 3, 4)  # rows, groups a step, stages, warps
GEMV1_TMA_PROGRAMS = 512
GEMV1_TMA_MIN_K = 4096  # the 31B's (K 5376 and up); the small models' mid-size weights (K 1536-2816) see below
# The small models' mid-size weights with K under GEMV1_TMA_MIN_K (E4B's gate / up 20480 x 2560 and per-layer
# projection 10752 x 2560, the 26B-A4B's full q / k 9216 x 2816: the staged tiles leave them on levels): a step
# of 2 groups (one 128-byte copy a row), 3 stages, 4 warps, one slice. H100, each alone without PDL, us, the plan (the
# register kernel) -> this (scripts/gemv1_tma_variants.py --small, gemv1_tma_small_h100.json): 15.68 -> 14.38,
# 11.34 -> 10.36, 11.80 -> 10.39; GEMV1_TMA_TILE there 14.98, 10.48, 11.00, and 2 slices 11.03 / 11.16. In an artifact
# (`measure_gpu.sh ab_small`, H100, decode step at fill 1k, best of 3 rounds): E4B's 6-layer slice 0.478 -> 0.469 ms,
# the 26B-A4B's 4-layer slice 0.453 -> 0.450 (ab_tma_small_*_h100.json). "0" in an exporting process keeps the
# register kernel.
GEMV1_TMA_SMALL = os.environ.get("GEMMA4_GEMV1_TMA_SMALL", "1") != "0"
GEMV1_TMA_SMALL_TILE = (32, 2, 3, 4)  # rows, groups a step, stages, warps
GEMV1_TMA_SMALL_MIN_K = 2048
# Small weights deep in K (N up to GEMV1_SMALL_N, K from GEMV1_TMA_DEEP_RATIO * N, x as levels: E2B's down 1536 x
# 6144 and double-wide down 1536 x 12288, E4B's down 2560 x 10240) at GEMV1_TMA_SMALL_TILE, in K slices (see
# below). H100, each alone, us (gemv1_tma_small_h100.json): E2B's wide down 12.09 (the register
# kernel's K parts) -> 10.04 at 6 slices; E2B's down 7.87 -> 7.98 and E4B's 11.68 -> 11.32 at best. In the layer's
# MLP graph with PDL (scripts/small_mlp_variants.py, 16 layers, us a layer, small_mlp_variants_h100.json): E2B
# 16.09 -> 15.83 (5 slices), its wide MLP 26.73 -> 24.00 (6; 23.95 at 7), E4B 28.27 -> 25.17 (5; 24.96 at 7): the
# slices give at least ~GEMV1_TMA_DEEP_PROGRAMS programs and at most GEMV1_TMA_DEEP_STEPS steps each (5, 6, 5).
# In an artifact (`measure_gpu.sh ab_small GEMMA4_GEMV1_TMA_DEEP e2b 35`, H100, the whole E2B at the ratio 8 then:
# its wide down only): decode step at fill 1k 1.719 -> 1.633 ms (ab_GEMV1_TMA_DEEP_e2b_h100.json). Not taken: the
# 26B-A4B's full o (2816 x 8192) 10.39 -> 10.99 alone. "0" in an exporting process keeps the register kernel there.
GEMV1_TMA_DEEP = os.environ.get("GEMMA4_GEMV1_TMA_DEEP", "1") != "0"
GEMV1_TMA_DEEP_RATIO = 4
GEMV1_TMA_DEEP_STEPS = 8
GEMV1_TMA_DEEP_PROGRAMS = 240


class Gemv1Plan(NamedTuple):
    """How the op runs an M == 1 weight: `_int4_gemv1_kernel`'s config, its K slices, x as int8
    levels (`_quant_x_kernel` first, a second launch) or as bf16, and how many levels (1 or 2)."""

    cfg: triton.Config
    splits: int
    xq: bool
    levels: int = 2


def _xq_plan(cfg: triton.Config, splits: int) -> Gemv1Plan:
    """A plan with x as GEMV1_XQ says: GEMV1_LEVELS where the config runs the per-lane loop (one
    K part, or DEPTH 0), two levels otherwise (the tile sums take two)."""
    lane = cfg.kwargs["PARTS"] == 1 or cfg.kwargs["DEPTH"] == 0
    return Gemv1Plan(cfg, splits, GEMV1_XQ, GEMV1_LEVELS if GEMV1_XQ and lane else 2)


def _staged(n: int) -> bool:
    """Whether a small weight of n rows takes a staged tile (4 rows or more, x staged and fitted)."""
    return GEMV1_STEP_FIT and GEMV1_STAGE and n >= 1024


def gemv1_step_config(n: int, k: int, group_size: int, prologue: str = "plain") -> triton.Config:
    """The small weights' tile. Staged (`_staged`): see the notes above GEMV1_STEP_FIT (prologue "res" / "glu":
    above GEMV1_STAGED_MLP). Else 8 rows from 2048, 4 from 1024, else 2; a step of half the row's groups rounded up
    to a power of two (all of them up to 2: K in one or two steps); 8 warps from 8 groups a step, else 4. Either
    way fewer warps where the tile has under a word a thread (tiny weights)."""
    row_groups = k // group_size
    words = group_size // 8  # a group's words of a row
    if _staged(n):
        fits = [1 << i for i in range(row_groups.bit_length() + 1) if -(-row_groups // (1 << i)) <= 4]
        groups = min(fits, key=lambda g: (-(-row_groups // g) * g, abs((g * words).bit_length() - 8)))
        mlp = GEMV1_STAGED_MLP and prologue in ("res", "glu")
        block_n = 4 if n < 2048 else 16 if mlp or n >= 6144 else 8
        warps = 8 if groups * words >= 128 and (block_n <= 8 or mlp) else 4
    else:
        groups = triton.next_power_of_2(row_groups)
        groups = groups if row_groups <= 2 else groups // 2
        block_n = 8 if n >= 2048 else 4 if n >= 1024 else 2
        warps = 8 if groups >= 8 else 4
    while warps > 1 and block_n * groups * words < 32 * warps:
        warps //= 2
    return _cfg1(block_n, groups, warps)


PROLOGUES = ("plain", "norm", "res", "glu")  # what a GEMV computes its x from (`gemv1_plan`)


def gemv1_plan(n: int, k: int, group_size: int, prologue: str = "plain") -> Gemv1Plan:
    """(config, K slices, x quantized) of the M == 1 kernel for an [n, k] weight (see
    GEMV1_CONFIGS and the notes above GEMV1_STEP_MAX_K).

    Small weights (K <= GEMV1_STEP_MAX_K and N <= GEMV1_STEP_MAX_N, or N <= GEMV1_THIN_N and
    K <= GEMV1_THIN_MAX_K, or staged tiles' K <= GEMV1_STAGED_MAX_K and N <= GEMV1_STAGED_MAX_N where the
    prologue is "plain" or "norm", K <= GEMV1_STAGED_MLP_MAX_K and N <= GEMV1_STAGED_MLP_MAX_N where it is "res" or
    "glu"): `gemv1_step_config`, one slice, bf16 x (one launch). prologue (PROLOGUES):
    what x is computed from, x itself, its norm, the residual add with both norms, the activation. Else x as
    GEMV1_XQ says and the pool's configs: few rows, 8-row programs that read K in 8 parts, one
    slice. Many (gate/up, the lm_head): 128-row programs, one slice (no partials, no second
    kernel). Between: 128-row programs, K in GEMV1_MID_SPLITS slices (each >= 512 of K) summed by
    the last program of each row block (GEMV1_RED_XQ; 5376 rows make only 42 row blocks for the
    H200's 132 SMs); from GEMV1_WIDE_N rows 64-row programs and 2 slices."""
    assert prologue in PROLOGUES, prologue
    if ((k <= GEMV1_STEP_MAX_K and n <= GEMV1_STEP_MAX_N) or (n <= GEMV1_THIN_N and k <= GEMV1_THIN_MAX_K)
            or (_staged(n) and prologue in ("plain", "norm") and k <= GEMV1_STAGED_MAX_K
                and n <= GEMV1_STAGED_MAX_N)
            or (_staged(n) and GEMV1_STAGED_MLP and prologue in ("res", "glu") and k <= GEMV1_STAGED_MLP_MAX_K
                and n <= GEMV1_STAGED_MLP_MAX_N)):
        return Gemv1Plan(gemv1_step_config(n, k, group_size, prologue), 1, False)
    if n <= GEMV1_SMALL_N:
        return _xq_plan(GEMV1_CONFIGS[1], 1)
    if n >= GEMV1_LARGE_N:
        return _xq_plan(GEMV1_CONFIGS[0], 1)
    if n >= GEMV1_WIDE_N:
        return _xq_plan(GEMV1_CONFIGS[2], max(1, min(2, k // max(512, group_size))))
    return _xq_plan(GEMV1_CONFIGS[0], max(1, min(GEMV1_MID_SPLITS, k // max(512, group_size))))


def gemv1_tma_splits(n: int, k: int, group_size: int, tile: tuple = GEMV1_TMA_TILE, prologue: str = "plain") -> int:
    """K slices of `_int4_gemv1_tma_kernel` at `tile` (rows, groups a step, ...) for an [n, k] weight it serves
    with GEMV1_TMA on (mid-size weights: more than GEMV1_SMALL_N rows, fewer than GEMV1_LARGE_N, K at least
    GEMV1_TMA_MIN_K, group 128, at least a step of groups, not a small weight), else 0: ~GEMV1_TMA_PROGRAMS
    programs, a slice at least a step."""
    rows, step = tile[0], tile[1]
    groups = k // group_size
    if not (GEMV1_SMALL_N < n < GEMV1_LARGE_N and group_size == 128 and k >= GEMV1_TMA_MIN_K and groups >= step
            and gemv1_plan(n, k, group_size, prologue).xq):
        return 0
    return max(1, min(groups // step, round(GEMV1_TMA_PROGRAMS / triton.cdiv(n, rows))))


def gemv1_tma_tile(n: int, k: int, group_size: int, prologue: str = "plain") -> tuple[tuple, int] | None:
    """(tile, K slices) of `_int4_gemv1_tma_kernel` for an [n, k] weight the op serves with it (GEMV1_TMA on):
    GEMV1_TMA_TILE and `gemv1_tma_splits` from K GEMV1_TMA_MIN_K; below it, with GEMV1_TMA_SMALL (on), the small
    models' mid-size weights on x levels (GEMV1_SMALL_N < n < GEMV1_LARGE_N, group 128, K from
    GEMV1_TMA_SMALL_MIN_K) at GEMV1_TMA_SMALL_TILE, one slice. With GEMV1_TMA_DEEP, small weights on x levels with
    K from GEMV1_TMA_DEEP_RATIO * n at GEMV1_TMA_SMALL_TILE, in slices for ~GEMV1_TMA_DEEP_PROGRAMS programs or more,
    of at most GEMV1_TMA_DEEP_STEPS steps (at least one). Else None (the register kernel)."""
    rows, step = GEMV1_TMA_SMALL_TILE[:2]
    if (GEMV1_TMA_DEEP and n <= GEMV1_SMALL_N and group_size == 128 and k >= GEMV1_TMA_DEEP_RATIO * n
            and k // group_size >= step and gemv1_plan(n, k, group_size, prologue).xq):
        steps = k // group_size // step
        slices = max(round(GEMV1_TMA_DEEP_PROGRAMS / triton.cdiv(n, rows)), steps // GEMV1_TMA_DEEP_STEPS)
        return GEMV1_TMA_SMALL_TILE, max(1, min(steps, slices))
    if k >= GEMV1_TMA_MIN_K:
        splits = gemv1_tma_splits(n, k, group_size, prologue=prologue)
        return (GEMV1_TMA_TILE, splits) if splits else None
    if (GEMV1_TMA_SMALL and GEMV1_SMALL_N < n < GEMV1_LARGE_N and group_size == 128 and k >= GEMV1_TMA_SMALL_MIN_K
            and gemv1_plan(n, k, group_size, prologue).xq):
        return GEMV1_TMA_SMALL_TILE, 1
    return None


def tma_ok(device: torch.device) -> bool:
    """Whether the op may take `_int4_gemv1_tma_kernel` on `device`: a CUDA GPU with TMA (sm_90+: the H200, the
    RTX 5090; the RTX 4090 keeps the register kernel). The interpreter (CPU) runs it too."""
    if _INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def gemv1_splits(n: int, k: int, group_size: int) -> int:
    """K slices of the M == 1 kernel for an [n, k] weight (`gemv1_plan`)."""
    return gemv1_plan(n, k, group_size).splits


_GEMV1_KERNELS: dict[tuple, object] = {}


def _gemv1_kernel(cfg: triton.Config):
    """The M == 1 kernel with one config (no timing run): what `gemv1_plan` picks."""
    key = (cfg.num_warps, tuple(sorted(cfg.kwargs.items())))
    if key not in _GEMV1_KERNELS:
        _GEMV1_KERNELS[key] = _autotuned([cfg], _int4_gemv1_kernel)
    return _GEMV1_KERNELS[key]


_TMA_KERNELS: dict[tuple, object] = {}


def _gemv1_tma_kernel(block_n: int, groups: int, stages: int, warps: int):
    """`_int4_gemv1_tma_kernel` with one config (no timing run)."""
    key = (block_n, groups, stages, warps)
    if key not in _TMA_KERNELS:
        cfg = triton.Config({"BLOCK_N": block_n, "GROUPS": groups, "STAGES": stages}, num_warps=warps,
                            num_stages=stages)
        _TMA_KERNELS[key] = _autotuned([cfg], _int4_gemv1_tma_kernel)
    return _TMA_KERNELS[key]


def levels_buffers(K: int, G: int, levels: int, device: torch.device):
    """Empty (planes int32, factors fp32, corrections int32) for x [1, K] as `levels` int8 levels, group G
    (`_quant_x_kernel`'s layout)."""
    xin = torch.empty((2 * levels * triton.cdiv(K // 8, 16) * 16,), device=device, dtype=torch.int32)  # planes
    blocks = K // G * (G // 32 if levels == 1 else 1)  # one level: a factor per 32 elements
    xf = torch.empty((blocks,), device=device, dtype=torch.float32)
    xc = torch.empty((blocks,), device=device, dtype=torch.int32)
    return xin, xf, xc


def _quant_x(x2: torch.Tensor, G: int, cnt: torch.Tensor, ncnt: int, pdl: int = 0, levels: int = 2,
             pdl_attr: bool = True, up: torch.Tensor | None = None, norm: tuple | None = None,
             res: tuple | None = None):
    """x2 [1, K] as `_quant_x_kernel`'s planes (int32), factors and corrections (x as `levels` int8
    levels: per group at two, per 32 elements at one); the kernel also zeroes cnt[:ncnt], the
    following GEMV's split-sum counters. up [1, K]: x is gelu_tanh(x2) * up (the kernel's GLU).
    norm (weight [K], eps): x is rms_norm(x2) * weight (the kernel's NORM). res (r [1, K], wr [K], h [1, K]),
    with norm: the norm's input is h = x2 + rms_norm(r) * wr, written to h (the kernel's RES)."""
    assert up is None or norm is None
    assert res is None or norm is not None
    K = x2.shape[1]
    groups = K // G
    xin, xf, xc = levels_buffers(K, G, levels, x2.device)
    launch = _quant_x_kernel if _INTERPRET else wrap_triton(_quant_x_kernel)
    u = up if up is not None else norm[0] if norm is not None else x2
    launch[(triton.cdiv(groups, QUANT_X_GROUPS),)](x2, u, xin, xf, xc, cnt, groups, ncnt,
                                                     GROUP=G, GB=QUANT_X_GROUPS, LEVELS=levels, GLU=int(up is not None),
                                                     NORM=int(norm is not None), eps=float(norm[1]) if norm else 0.0,
                                                     r_ptr=res[0] if res else x2, wr_ptr=res[1] if res else x2,
                                                     h_ptr=res[2] if res else x2, RES=int(res is not None),
                                                     NORM_STEPS=norm_steps(K) if norm else 0,
                                                     num_warps=4, **_pdl_args(pdl, pdl_attr))
    return xin, xf, xc


def int4_gemv1(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, splits: int, kernel=None,
               red: int | None = None, xq: bool | None = None, pdl_quant: int = 0, pdl_gemv: int = 0,
               levels: int = 2, pdl_attr: bool = True, up: torch.Tensor | None = None, norm: tuple | None = None,
               res: tuple | None = None, up_index: torch.Tensor | None = None, early: bool | None = None,
               quantize=None, glu_out: tuple | None = None, close: tuple | None = None,
               cnt: torch.Tensor | None = None, zero: torch.Tensor | None = None, stage: bool | None = None):
    """x2 [1, K] @ dequant(W).T -> [1, N] in x2.dtype through `_int4_gemv1_kernel`: straight
    into the output with one slice of K; with more, fp32 partials summed by `_sum_splits_kernel`
    (red 0) or by the last program of each row block (red 2; its counters zeroed by the quantize
    kernel, or here with bf16 x). xq: x turned into two int8 levels first (`_quant_x_kernel`, one
    more launch) and multiplied with dp4a. pdl_quant / pdl_gemv: the quantize kernel and the GEMV
    launched with programmatic dependent launch (`pdl_wait`'s modes; sm_90+, direct launches only,
    scripts/gemv1_pdl_variants.py); the op passes neither. pdl_attr False: those modes without the
    launch attribute (`_pdl_args`). levels: x as two int8 levels or one (`_gemv1_tile_lanes`; the
    per-lane loop only: one K part or DEPTH 0). up [1, K]: the input is gelu_tanh(x2) * up, computed
    by the quantize kernel (with bf16 x, by the GEMV as it loads x). norm (weight [K] in x2's dtype, eps):
    the input is rms_norm(x2) * weight (`rms_norm_reference`), computed the same way. res (r, wr, h), with
    norm and x as levels: the norm's input is h = x2 + rms_norm(r) * wr, which the quantize kernel also
    writes to h; res (r, wr, h, eps) with bf16 x and no up: the input is h (r's norm with that eps), or with
    norm (the same eps) rms_norm(h) * weight, computed by the GEMV as it loads x, its first program writing h.
    up_index (one int64, bf16 x only): up is a table of rows of K, contiguous, and the input is
    gelu_tanh(x2) * up[up_index] (the GEMV reads that row in place). early (bf16 x; default GEMV1_EARLY): the first tiles load before the PDL wait.
    quantize (x as levels, no up / norm / res): a callable (cnt, ncnt) -> (planes, factors, corrections)
    launching a kernel of its own that computes x, writes its levels as `_quant_x_kernel` does
    (`_store_levels`) and zeroes cnt[:ncnt]; then x2 is not read (only its shape, dtype and device).
    glu_out (a kernel of one config; one slice or red 2; W the gate rows then the up rows): ((planes, factors,
    corrections), group, levels, counters, count): the kernel also writes the levels of gelu_tanh(gate) * up
    for a GEMV of that group and levels, and zeroes that GEMV's counters[:count] (`_int4_gemv1_kernel`'s GLUQ).
    close (one slice or red 2; not with glu_out): (h [1, N], weight [N], eps, scalar [1], out [1, N]): the kernel
    also writes out = (h + rms_norm(y) * weight) * scalar (`close_reference`; its CLOSE), its counter the last
    of the counters. cnt (bf16 x): the counters, zeroed by the caller's kernels before this one (at least
    as many as the launch uses; else a torch.zeros of their own where it uses any). zero (bf16 x with res): an
    int32 counter the GEMV's first program zeroes (`_int4_gemv1_kernel`'s ZC). stage (bf16 x; default
    GEMV1_STAGE): each step's x computed once for the program (the kernel's STAGE; configs of one K part).
    """
    N, K, G = _check(x2, qweight, scales)
    early = GEMV1_EARLY if early is None else early
    stage = GEMV1_STAGE if stage is None else stage
    words = qweight.view(torch.int32)  # [N, K / 8]: 8 nibbles a word
    groups = K // G
    gps = triton.cdiv(groups, splits)  # whole groups per slice
    splits = triton.cdiv(groups, gps)
    xq = GEMV1_XQ if xq is None else xq
    # res: with x as levels the quantize kernel's RES (with the norm after the add); with bf16 x the GEMV's
    # own (the add alone, or with norm the add and the norm of h)
    assert res is None or ((norm is not None) if xq else up is None)
    if res is not None and norm is not None and not xq and float(res[3]) != float(norm[1]):
        raise ValueError(f"int4_gemv1: bf16 x with res and norm takes one eps for both norms (got {res[3]}, "
                         f"{norm[1]})")
    assert up_index is None or (up is not None and not xq)
    red = ((GEMV1_RED_XQ if xq else GEMV1_RED) if red is None else red) if splits > 1 else 0
    y = torch.empty((1, N), device=x2.device, dtype=x2.dtype)
    part = torch.empty((splits, N) if splits > 1 else (1, 1), device=x2.device, dtype=torch.float32)
    # a counter for each row block of >= 4 rows (with glu_out, each gate / up pair of row blocks), zeroed by the
    # quantize kernel where there is one
    ncnt = nsplit = triton.cdiv(N, 4) if red == 2 else 0
    if glu_out is not None:  # a counter for each unit of gate / up rows after the row blocks' (`_glu_levels`)
        configs = getattr(kernel, "configs", ())
        block_n = configs[0].kwargs["BLOCK_N"] if len(configs) == 1 else 0
        unit = max(block_n, glu_out[1])
        if (splits > 1 and red != 2) or not block_n or N % (2 * unit) or unit % min(block_n, glu_out[1]):
            raise ValueError(f"int4_gemv1 glu_out: one slice or red 2 (got {splits}, {red}) and one config whose "
                             f"BLOCK_N and the group {glu_out[1]} divide N / 2 = {N // 2}, one the other")
        ncnt += N // 2 // unit
    coff = ncnt
    if close is not None:  # the row's counter after the others (`_close_row`)
        if (splits > 1 and red != 2) or glu_out is not None or N % 8:
            raise ValueError(f"int4_gemv1 close: one slice or red 2 (got {splits}, {red}), not with glu_out, "
                             f"rows a multiple of 8 (got {N})")
        ncnt += 1
    assert zero is None or (res is not None and not xq)
    if cnt is None:
        cnt = (torch.zeros if ncnt and not xq else torch.empty)((max(ncnt, 1),), device=x2.device, dtype=torch.int32)
    elif xq or cnt.numel() < ncnt or cnt.dtype != torch.int32:
        raise ValueError(f"int4_gemv1 cnt: {ncnt} int32 counters for a bf16-x launch (got {cnt.numel()} "
                         f"{cnt.dtype}{', x as levels' if xq else ''})")
    assert quantize is None or (xq and up is None and norm is None and res is None)
    xin, xf, xc = ((quantize(cnt, ncnt) if quantize is not None
                    else _quant_x(x2, G, cnt, ncnt, pdl_quant, levels, pdl_attr, up, norm, res)) if xq
                   else (x2, up if up is not None else norm[0] if norm is not None else x2, x2))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
    wrap_triton(kernel or _kernel("gemv1", G))[grid](
        xin, xf, xc, words, scales, part, y, cnt, N, K // 8, gps, splits, words.stride(0), scales.stride(0),
        part.stride(0), GROUP=G, RED=red, XQ=xq, ASM=not _INTERPRET, LEVELS=levels,
        GLU=int(up is not None and not xq), NORM=int(norm is not None and not xq),
        eps=float(norm[1]) if norm is not None and not xq else float(res[3]) if res is not None and not xq else 0.0,
        NORM_STEPS=norm_steps(K // 2) if (norm is not None or res is not None) and not xq else 0,
        r_ptr=res[0] if res is not None and not xq else x2, wr_ptr=res[1] if res is not None and not xq else x2,
        h_ptr=res[2] if res is not None and not xq else x2, RES=int(res is not None and not xq),
        ui_ptr=up_index if up_index is not None else x2, UI=int(up_index is not None),
        EARLY=int(early and not xq and pdl_gemv > 0), GLUQ=int(glu_out is not None), HALF=N // 2,
        GOFF=nsplit, lq_ptr=glu_out[0][0] if glu_out else x2, lf_ptr=glu_out[0][1] if glu_out else x2,
        lc_ptr=glu_out[0][2] if glu_out else x2, dcnt_ptr=glu_out[3] if glu_out else x2,
        DNCNT=glu_out[4] if glu_out else 0, DGROUP=glu_out[1] if glu_out else 128,
        DLEVELS=glu_out[2] if glu_out else 2, CLOSE=int(close is not None), COFF=coff,
        ch_ptr=close[0] if close else x2, cw_ptr=close[1] if close else x2, cs_ptr=close[3] if close else x2,
        co_ptr=close[4] if close else x2, ceps=float(close[2]) if close else 0.0,
        CSTEPS=norm_steps(N) if close else 0, zc_ptr=zero if zero is not None else cnt,
        ZC=int(zero is not None), STAGE=int(stage and not xq), **_pdl_args(pdl_gemv, pdl_attr))
    if red == 0 and splits > 1:
        launch = _sum_splits_kernel if _INTERPRET else wrap_triton(_sum_splits_kernel)
        launch[(triton.cdiv(N, 1024),)](part, y, N, splits, part.stride(0), BLOCK=1024, num_warps=4)
    return y


def int4_gemv1_tma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, splits: int,
                   tile: tuple = GEMV1_TMA_TILE, levels: int = 2, pdl: int = 0, pdl_attr: bool = True,
                   up: torch.Tensor | None = None, norm: tuple | None = None, res: tuple | None = None,
                   quantize=None) -> torch.Tensor:
    """x2 [1, K] @ dequant(W).T -> [1, N] in x2.dtype through `_int4_gemv1_tma_kernel` (tile: rows, groups a
    step, stages, warps): x as `levels` int8 levels first (`_quant_x_kernel`, or quantize's kernel, which also
    zero the split sum's counters), K in `splits` slices of whole groups summed in-kernel (RED 2). up, norm, res,
    quantize, pdl, pdl_attr: as `int4_gemv1`'s with x as levels (pdl both kernels' mode)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, K, G = _check(x2, qweight, scales)
    block_n, step, stages, warps = tile
    words = qweight.view(torch.int32)  # [N, K / 8]
    groups = K // G
    gps = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, gps)
    y = torch.empty((1, N), device=x2.device, dtype=x2.dtype)
    part = torch.empty((splits, N) if splits > 1 else (1, 1), device=x2.device, dtype=torch.float32)
    ncnt = triton.cdiv(N, block_n) if splits > 1 else 0  # a counter a row block, zeroed by the quantize kernel
    cnt = torch.empty((max(ncnt, 1),), device=x2.device, dtype=torch.int32)
    xin, xf, xc = (quantize(cnt, ncnt) if quantize is not None
                   else _quant_x(x2, G, cnt, ncnt, pdl, levels, pdl_attr, up, norm, res))
    copy = max(1, min(step, 128 // (G // 2)))  # groups a copy: a row's G / 2 bytes each, 128 bytes at most
    if step % copy:
        raise ValueError(f"int4_gemv1_tma: {step} groups a step in copies of {copy}")
    desc = TensorDescriptor.from_tensor(words, [block_n, copy * (G // 8)])
    kernel = _gemv1_tma_kernel(block_n, step, stages, warps)
    launch = kernel if _INTERPRET else wrap_triton(kernel)
    launch[(triton.cdiv(N, block_n), splits)](xin, xf, xc, desc, scales, part, y, cnt, N, K // 8, gps, splits,
                                              scales.stride(0), part.stride(0), GROUP=G, ASM=not _INTERPRET,
                                              LEVELS=levels, **_pdl_args(pdl, pdl_attr))
    return y


def int4_gemv_mma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, splits: int,
                  block_n: int = 64, num_warps: int = 4, parts: int = 1) -> torch.Tensor:
    """x2 [M <= 8, K] bf16 @ dequant(W).T (group 128) -> [M, N] through `_int4_gemv_mma_kernel`:
    straight into the output with one slice of K, through fp32 partials and a sum with more.
    `parts`: K parts inside each program (block_n * parts rows of tile, >= 8 * num_warps)."""
    N, K, G = _check(x2, qweight, scales)
    M = x2.shape[0]
    if G != 128 or M > 8 or x2.dtype != torch.bfloat16:
        raise ValueError(f"int4_gemv_mma: group 128, M <= 8 and bf16 x only (got G={G}, M={M}, {x2.dtype})")
    if block_n % 8 or block_n * parts < 8 * num_warps:  # else Triton lays the tile out otherwise
        raise ValueError(f"int4_gemv_mma: block_n {block_n} x parts {parts} must be 8 rows for each of {num_warps} warps")
    if guard_or_false(x2.storage_offset() % 8 != 0):  # x loads 16 bytes at a time
        x2 = x2.clone()
    if guard_or_false(qweight.storage_offset() % 16 != 0):  # 16-byte word loads: the lanes' layout
        qweight = qweight.clone()
    words = qweight.view(torch.int32)
    per_split = triton.cdiv(triton.cdiv(K // 8, splits), 16) * 16  # whole groups of 16 words
    splits = triton.cdiv(K // 8, per_split)
    out = torch.empty((splits, M, N), device=x2.device, dtype=x2.dtype if splits == 1 else torch.float32)
    launch = _int4_gemv_mma_kernel if _INTERPRET else wrap_triton(_int4_gemv_mma_kernel)
    launch[(triton.cdiv(N, block_n), splits)](
        x2, words, scales, out, M, N, K // 8, per_split, x2.stride(0), words.stride(0), scales.stride(0),
        out.stride(0), out.stride(1), BLOCK_N=block_n, KS=parts, ONE_ROW=M == 1 and parts == 1, ASM=not _INTERPRET,
        num_warps=num_warps)
    if splits == 1:
        return out.view(M, N)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    launch = _sum_splits_kernel if _INTERPRET else wrap_triton(_sum_splits_kernel)
    launch[(triton.cdiv(M * N, 1024),)](out, y, M * N, splits, out.stride(0), BLOCK=1024, num_warps=4)
    return y


def gemv_mma_plan(n: int, k: int, m: int) -> tuple[int, int, int, int]:
    """(K slices, block_n, num_warps, K parts) of `int4_gemv_mma` for an [n, k] weight at
    2 <= M = m <= 8 (group 128), from the H200 sweep of the 31B shapes
    (scripts/int4_variants.py --parts mma): 16-row tiles in 2 K parts up to 2048 rows, 32-row
    tiles up to 8192, 128-row tiles beyond; K split until the tiles x slices reach ~1024
    programs (~256 for the 128-row tiles), at most 8 slices, each part of a slice >= one group."""
    if n <= 2048:
        block_n, warps, parts, target = 16, 4, 2, 1024
    elif n <= 8192:
        block_n, warps, parts, target = 32, 4, 1, 1024
    else:
        block_n, warps, parts, target = 128, 4, 1, 256
    tiles, groups, splits = triton.cdiv(n, block_n), k // 128, 1
    while tiles * splits < target and groups // (2 * splits) >= parts and splits < 8:
        splits *= 2
    return splits, block_n, warps, parts


def gemv_splits(n: int, k: int, group_size: int, target_programs: int = 512, min_k: int = 1024):
    """(slices, slice length) of K for the GEMV path: enough programs (at BLOCK_N = 32) for
    every SM of a large card, each slice at least `min_k` long and a whole number of groups."""
    n_tiles = triton.cdiv(n, 32)
    splits = max(1, min(triton.cdiv(target_programs, n_tiles), k // max(min_k, group_size)))
    per_split = triton.cdiv(triton.cdiv(k, splits), group_size) * group_size
    return triton.cdiv(k, per_split), per_split


# ---- the op ---------------------------------------------------------------------------------


def _check(x, qweight, scales):
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != K or scales.shape[0] != N or K % scales.shape[1]:
        raise ValueError(f"int4_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)} do not agree")
    return N, K, K // scales.shape[1]


def int4_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ dequant(W).T through the fused GEMM (tiles dequantized in registers)."""
    N, K, G = _check(x2, qweight, scales)
    M = x2.shape[0]
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    bucket = min(triton.next_power_of_2(M), 2048) if isinstance(M, int) else 2048
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), 1)
    wrap_triton(_kernel("gemm", 0))[grid](
        x2, qweight, scales, out, M, N, K, K, x2.stride(0), qweight.stride(0),
        scales.stride(0), 0, out.stride(0), bucket, GROUP=G)
    return out


def can_reach(M, m: int) -> bool:
    """Whether M can be `m` or more: a concrete M is compared; a symbolic M (an exported
    prefill's dynamic chunk length) by the upper end of its value range, the export's
    `Dim(max=prefill_chunk)`. Reading the range adds no guard, so T stays dynamic."""
    if isinstance(M, int):
        return M >= m
    return bool(M.node.shape_env.bound_sympy(M.node.expr).upper >= m)


def glu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation, gelu_tanh(gate) * up, in the inputs' dtype."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _m1(x: torch.Tensor, G: int) -> bool:
    """Whether the op takes the M == 1 kernels (`int4_gemv1`) for x [M, K]."""
    return guard_or_false(x.shape[0] == 1) and x.dtype == torch.bfloat16 and not (M1_ON_TENSOR_CORES and G == 128)


def prologue_of(up=None, norm=None, res=None) -> str:
    """`gemv1_plan`'s prologue for `_gemv1`'s arguments: the activation (up), the residual add (res, with or
    without the norm after it), the norm, or x itself."""
    return "glu" if up is not None else "res" if res is not None else "norm" if norm is not None else "plain"


def _gemv1(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, up: torch.Tensor | None = None,
           norm: tuple | None = None, res: tuple | None = None, up_index: torch.Tensor | None = None,
           quantize=None, pdl_attr: bool = False):
    """The op's M == 1 path: `gemv1_plan`'s config (one per shape, no timing run) and PDL mode. quantize:
    `int4_gemv1`'s (where the plan takes x as levels). pdl_attr: the kernels launched with the PDL attribute too,
    as the artifact's launcher launches them (benchmarks: calls in a CUDA graph overlapping as a decode step's)."""
    N, K, G = _check(x2, qweight, scales)
    pro = prologue_of(up, norm, res)
    plan = gemv1_plan(N, K, G, pro)
    pdl = op_pdl_mode(x2.device)  # the attribute comes from the artifact's launcher, not from here
    tma = gemv1_tma_tile(N, K, G, pro) if GEMV1_TMA else None  # None but for mid-size weights
    if tma and up_index is None and tma_ok(x2.device):
        return int4_gemv1_tma(x2, qweight, scales, tma[1], tile=tma[0], levels=plan.levels, pdl=pdl,
                              pdl_attr=pdl_attr, up=up, norm=norm, res=res, quantize=quantize)
    return int4_gemv1(x2, qweight, scales, plan.splits, kernel=_gemv1_kernel(plan.cfg), xq=plan.xq,
                      levels=plan.levels, pdl_quant=pdl, pdl_gemv=pdl, pdl_attr=pdl_attr, up=up, norm=norm,
                      res=res, up_index=up_index, quantize=quantize)


@triton_op("gemma4::int4_linear", mutates_args={})
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16) @ dequant(qweight, scales).T -> [..., N] bf16 (layout: module doc)."""
    return _linear(x, qweight, scales)


def _linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`int4_linear`'s body: the path for x's M (the ops' shared implementation)."""
    N, K, G = _check(x, qweight, scales)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    # Either path is right for any M; the choice is speed. A symbolic M (the prefill method's
    # dynamic chunk length, traced by AOTInductor) is decided by its value range, without a guard.
    if _m1(x2, G):
        out = _gemv1(x2, qweight, scales)
    elif guard_or_false(M <= GEMV_MAX_M) and x.dtype == torch.bfloat16 and G == 128:  # tensor-core GEMV
        out = int4_gemv_mma(x2, qweight, scales, *gemv_mma_plan(N, K, M))
    elif guard_or_false(M <= GEMV_MAX_M):  # M == 1 in another dtype too
        splits, per_split = gemv_splits(N, K, G)
        part = torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), splits)
        wrap_triton(_kernel("gemv", G))[grid](
            x2, qweight, scales, part, M, N, K, per_split, x2.stride(0), qweight.stride(0),
            scales.stride(0), part.stride(0), part.stride(1), 16, GROUP=G)
        out = part.sum(0).to(x.dtype)
    elif can_reach(M, DEQUANT_MIN_M) and x.element_size() == 2:
        # a large M: the weight in bf16 (one bandwidth-bound pass, an [N, K] scratch) and cuBLAS
        # beat the fused GEMM
        out = x2 @ int4_dequant(qweight, scales, x.dtype).t()
    else:
        out = int4_gemm(x2, qweight, scales)
    return out.reshape(*lead, N)


@int4_linear.register_fake
def _(x, qweight, scales):
    N, _, _ = _check(x, qweight, scales)
    return x.new_empty((*x.shape[:-1], N))


@int4_linear.register_kernel("cpu")
def _(x, qweight, scales):
    _check(x, qweight, scales)
    return int4_linear_reference(x, qweight, scales)


def _check_glu(gate, up, qweight, scales, up_index=None):
    if up_index is None and gate.shape != up.shape:
        raise ValueError(f"int4_glu_linear: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if up_index is not None and (up.dim() < 2 or (*up.shape[:-2], up.shape[-1]) != tuple(gate.shape)
                                 or up_index.numel() != 1):
        raise ValueError(f"int4_glu_linear: up {tuple(up.shape)} is no table of rows for gate {tuple(gate.shape)} "
                         f"([..., rows, K]) or up_index {tuple(up_index.shape)} is not one index")
    return _check(gate, qweight, scales)


def _rows_of(up: torch.Tensor, up_index: torch.Tensor | None) -> torch.Tensor:
    """up itself, or its row up_index of dim -2 (a table of rows)."""
    return up if up_index is None else up.index_select(-2, up_index.reshape(1)).squeeze(-2)


def int4_glu_linear_reference(gate: torch.Tensor, up: torch.Tensor, qweight: torch.Tensor,
                              scales: torch.Tensor, up_index: torch.Tensor | None = None) -> torch.Tensor:
    return int4_linear_reference(glu_reference(gate, _rows_of(up, up_index)), qweight, scales)


@triton_op("gemma4::int4_glu_linear", mutates_args={})
def int4_glu_linear(gate: torch.Tensor, up: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    up_index: torch.Tensor | None = None) -> torch.Tensor:
    """(gelu_tanh(gate) * up) [..., K] @ dequant(qweight, scales).T -> [..., N]: the MLP's down
    projection with its activation. At M == 1 the quantize kernel computes the activation as it
    reads x (`_quant_x_kernel`'s GLU): one launch less a layer than the activation's own kernel
    before `int4_linear`. Other M: the activation in aten ops (Inductor fuses it) and `int4_linear`.
    up_index (int64, one element): up is a table [..., rows, K] and its row up_index is the up (the
    per-layer projection of E2B / E4B: every layer's per-layer inputs, this layer's row); at M == 1 where
    the GEMV takes bf16 x (small weights) it reads that row in place, no gather's kernel before it."""
    return _glu_linear(gate, up, qweight, scales, up_index)


def _glu_linear(gate, up, qweight, scales, up_index=None):
    """`int4_glu_linear`'s body (the ops' shared implementation)."""
    N, K, G = _check_glu(gate, up, qweight, scales, up_index)
    g2 = gate.reshape(-1, K).contiguous()
    if _m1(g2, G) and up_index is not None and not gemv1_plan(N, K, G, "glu").xq and up.dtype == g2.dtype:
        table = up.reshape(-1, K).contiguous()  # M == 1: the rows of the table, one after another
        return _gemv1(g2, qweight, scales, up=table, up_index=up_index.reshape(1)).reshape(*gate.shape[:-1], N)
    up = _rows_of(up, up_index)
    if _m1(g2, G):
        # the kernels read up as gate's dtype (bf16 pairs)
        return _gemv1(g2, qweight, scales, up=up.reshape(-1, K).to(g2.dtype).contiguous()).reshape(*gate.shape[:-1], N)
    return _linear(glu_reference(gate, up), qweight, scales)


@int4_glu_linear.register_fake
def _(gate, up, qweight, scales, up_index=None):
    N, _, _ = _check_glu(gate, up, qweight, scales, up_index)
    return gate.new_empty((*gate.shape[:-1], N))


@int4_glu_linear.register_kernel("cpu")
def _(gate, up, qweight, scales, up_index=None):
    _check_glu(gate, up, qweight, scales, up_index)
    return int4_glu_linear_reference(gate, up, qweight, scales, up_index)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm (export/gemma4/model.py `RMSNorm`): x / rms(x) * weight (None: no scale) in fp32, back in
    x's dtype."""
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (y * weight.float() if weight is not None else y).to(x.dtype)


def close_reference(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                    scalar: torch.Tensor) -> torch.Tensor:
    """A decoder layer's closing residual add after its last projection y: (h + rms_norm(y) * weight) * scalar
    (export/gemma4/model.py, DecoderLayer.forward's end)."""
    return (h + rms_norm_reference(y, weight, eps)) * scalar


def _check_norm(x, weight, qweight, scales):
    N, K, G = _check(x, qweight, scales)
    if tuple(weight.shape) != (K,):
        raise ValueError(f"int4_rms_linear: norm weight {tuple(weight.shape)} for x of width {K}")
    return N, K, G


def int4_rms_linear_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, qweight: torch.Tensor,
                              scales: torch.Tensor) -> torch.Tensor:
    return int4_linear_reference(rms_norm_reference(x, weight, eps), qweight, scales)


@triton_op("gemma4::int4_rms_linear", mutates_args={})
def int4_rms_linear(x: torch.Tensor, weight: torch.Tensor, eps: float, qweight: torch.Tensor,
                    scales: torch.Tensor) -> torch.Tensor:
    """rms_norm(x, weight, eps) [..., K] @ dequant(qweight, scales).T -> [..., N]: a linear with the
    RMSNorm before it (a layer's input norm and its q / k / v projection). At M == 1 with the weight in
    x's dtype the kernel that reads x computes the norm (`_quant_x_kernel`'s NORM, or the GEMV's own
    with bf16 x): one launch less a layer than the norm's kernel before `int4_linear`. Other M (and
    other weight dtypes): the norm in aten ops (Inductor fuses it) and `int4_linear`'s path."""
    return _rms_linear(x, weight, eps, qweight, scales)


def _rms_linear(x: torch.Tensor, weight: torch.Tensor, eps: float, qweight: torch.Tensor,
                scales: torch.Tensor) -> torch.Tensor:
    """`int4_rms_linear`'s body."""
    N, K, G = _check_norm(x, weight, qweight, scales)
    x2 = x.reshape(-1, K).contiguous()
    if _m1(x2, G) and weight.dtype == x.dtype:
        return _gemv1(x2, qweight, scales, norm=(weight.contiguous(), eps)).reshape(*x.shape[:-1], N)
    return _linear(rms_norm_reference(x, weight, eps), qweight, scales)


@int4_rms_linear.register_fake
def _(x, weight, eps, qweight, scales):
    N, _, _ = _check_norm(x, weight, qweight, scales)
    return x.new_empty((*x.shape[:-1], N))


@int4_rms_linear.register_kernel("cpu")
def _(x, weight, eps, qweight, scales):
    _check_norm(x, weight, qweight, scales)
    return int4_rms_linear_reference(x, weight, eps, qweight, scales)


def _check_r(op: str, x, r, weight_r, K: int) -> None:
    """The residual r and its norm weight against x [..., K] (the residual ops' shapes)."""
    if r.shape != x.shape or tuple(weight_r.shape) != (K,):
        raise ValueError(f"{op}: r {tuple(r.shape)} / its norm weight {tuple(weight_r.shape)} for x {tuple(x.shape)}")


def _check_residual(x, r, weight_r, weight, qweight, scales):
    N, K, G = _check_norm(x, weight, qweight, scales)
    _check_r("int4_add_rms_linear", x, r, weight_r, K)
    return N, K, G


def int4_add_rms_linear_reference(x, r, weight_r, weight, eps: float, qweight, scales):
    h = x + rms_norm_reference(r, weight_r, eps)
    return h, int4_rms_linear_reference(h, weight, eps, qweight, scales)


@triton_op("gemma4::int4_add_rms_linear", mutates_args={})
def int4_add_rms_linear(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, weight: torch.Tensor, eps: float,
                        qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + rms_norm(r, weight_r, eps) (a residual add after a norm), y = rms_norm(h, weight,
    eps) @ dequant(qweight, scales).T (the next norm and a linear): a layer's attention output into the
    residual stream and its MLP's gate / up projection. At M == 1 with x as int8 levels and the weights in
    x's dtype, the quantize kernel computes both norms and the add and writes h (`_quant_x_kernel`'s RES):
    no kernel of their own. Otherwise aten ops for h (Inductor fuses them) and `int4_rms_linear`'s path."""
    return _add_rms_linear(x, r, weight_r, weight, eps, qweight, scales)


def _add_rms_linear(x, r, weight_r, weight, eps: float, qweight, scales):
    """`int4_add_rms_linear`'s body (the ops' shared implementation)."""
    N, K, G = _check_residual(x, r, weight_r, weight, qweight, scales)
    x2 = x.reshape(-1, K).contiguous()
    if _m1(x2, G) and weight.dtype == x.dtype and weight_r.dtype == x.dtype and r.dtype == x.dtype:
        # x as levels: the quantize kernel computes the add and both norms; bf16 x: the GEMV itself
        h = torch.empty_like(x2)
        res = (r.reshape(-1, K).contiguous(), weight_r.contiguous(), h)
        y = _gemv1(x2, qweight, scales, norm=(weight.contiguous(), eps),
                   res=res if gemv1_plan(N, K, G, "res").xq else (*res, eps))
        return h.reshape(x.shape), y.reshape(*x.shape[:-1], N)
    h = x + rms_norm_reference(r, weight_r, eps)
    return h, _rms_linear(h, weight, eps, qweight, scales)


@int4_add_rms_linear.register_fake
def _(x, r, weight_r, weight, eps, qweight, scales):
    N, _, _ = _check_residual(x, r, weight_r, weight, qweight, scales)
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], N))


@int4_add_rms_linear.register_kernel("cpu")
def _(x, r, weight_r, weight, eps, qweight, scales):
    _check_residual(x, r, weight_r, weight, qweight, scales)
    return int4_add_rms_linear_reference(x, r, weight_r, weight, eps, qweight, scales)


def _check_add(x, r, weight_r, qweight, scales):
    N, K, G = _check(x, qweight, scales)
    _check_r("int4_add_linear", x, r, weight_r, K)
    return N, K, G


def int4_add_linear_reference(x, r, weight_r, eps: float, qweight, scales):
    h = x + rms_norm_reference(r, weight_r, eps)
    return h, int4_linear_reference(h, qweight, scales)


@triton_op("gemma4::int4_add_linear", mutates_args={})
def int4_add_linear(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, eps: float, qweight: torch.Tensor,
                    scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + rms_norm(r, weight_r, eps), y = h @ dequant(qweight, scales).T (a residual add after a
    norm, then a linear without a norm of its own: the MLP's output into the residual stream and the
    per-layer-input gate after it). At M == 1 where the GEMV takes bf16 x (small weights, `gemv1_plan`) and
    the weights are in x's dtype, the GEMV computes the add as it loads x and its first program writes h:
    no kernel of its own. Otherwise aten ops for h (Inductor fuses them) and `int4_linear`'s path."""
    return _add_linear(x, r, weight_r, eps, qweight, scales)


def _add_linear(x, r, weight_r, eps: float, qweight, scales):
    """`int4_add_linear`'s body (the ops' shared implementation)."""
    N, K, G = _check_add(x, r, weight_r, qweight, scales)
    x2 = x.reshape(-1, K).contiguous()
    if _m1(x2, G) and not gemv1_plan(N, K, G, "res").xq and weight_r.dtype == x.dtype and r.dtype == x.dtype:
        h = torch.empty_like(x2)
        y = _gemv1(x2, qweight, scales, res=(r.reshape(-1, K).contiguous(), weight_r.contiguous(), h, eps))
        return h.reshape(x.shape), y.reshape(*x.shape[:-1], N)
    h = x + rms_norm_reference(r, weight_r, eps)
    return h, _linear(h, qweight, scales)


@int4_add_linear.register_fake
def _(x, r, weight_r, eps, qweight, scales):
    N, _, _ = _check_add(x, r, weight_r, qweight, scales)
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], N))


@int4_add_linear.register_kernel("cpu")
def _(x, r, weight_r, eps, qweight, scales):
    _check_add(x, r, weight_r, qweight, scales)
    return int4_add_linear_reference(x, r, weight_r, eps, qweight, scales)
