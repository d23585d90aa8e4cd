"""Tile variants of the M == 1 int4 GEMV with x as two int8 levels (`_gemv1_tile_q`), one GPU call.

    python -m scripts.gemv1_tile_variants [--round 2] [--out gemv1_tile_variants.json] [--budget 150]
    python -m scripts.gemv1_tile_variants --count     # offline: compile for sm_90, count the loop

Why: the op's kernel (`_int4_gemv1_kernel`, XQ) with `_gemv1_tile_q` spent 18.4 SASS instructions
per word of 8 nibbles in its loop (sm_90, `--count`): per step it summed each (row, group) across
the four lanes that hold its 16 words (two shuffles), converted and scaled it, loaded x's levels
as four 32-bit loads per word in a layout of their own (a conversion through shared memory, with
barriers, every step), all between one tile's loads and the next. The op now runs the lane tile
below with x a tile ahead and the `xg` loads (`_gemv1_loop_q`): this script reuses its functions
(`_gemv1_tile_lanes`, `_gemv1_x_planes`, `_quant_x_kernel`) and keeps the knobs the op has not.

`_gemv1_tile_kernel` keeps the same weight loads (a lane: 4 words = 16 bytes of one row and
group) and changes the rest (`_gemv1_tile_lanes`, now the op's):
- nibbles as two masks, no shift: lo = w & 0x0F0F0F0F (v), hi = w & 0xF0F0F0F0 (16 v), so the
  high nibbles' dot comes out 16x, which the low ones' match by one multiply per lane and group;
- four dp4a chains per lane across its 4 words (h and l levels, low and high nibbles), then
  16 (254 h.lo + l.lo) + 254 h.hi + l.hi, less 16x the group's correction in the group's first
  lane: exact int32 per lane and group;
- converted and scaled per lane (scale * x's factor / 16) into an fp32 accumulator per lane;
  the sum across lanes and groups once, after the loop;
- x's levels in planes (the op's `_quant_x_kernel`; the variants without `xg` add each word's
  correction and factor as two more planes, `_word_planes_kernel`), loaded with the weights' own pattern and
  layout; the scales (and, `xg`, x's per-group factor and correction) through PTX loads, which
  take the layout of their use: nothing in the loop goes through shared memory.
Same numerics as the op within fp32 rounding (the 4 lanes' partials are rounded apart).
Knobs: BLOCK_N rows x GROUPS adjacent groups a step, DEPTH tiles loaded ahead, XPRE: x's planes
of the next tile loaded with its weights, CLAMP: unmasked loads from clamped addresses (the
scale zeroes what falls outside), SASM / XG: the PTX loads, GPS_C: the slice unrolled,
LOADONLY: the loads alone (a bound, not a result).

Per shape (the 31B's seven M == 1 shapes): the op's path as it is (quantize x, `gemv1_plan`, the
split sum), the op's kernel alone at its configs, and each variant at K splits 4 / 8 / 16 (up
to 8192 rows), 2 / 4 / 8 / 16 (up to 32768), 1 / 2 (more), each as the kernel alone (x already
quantized, partials written); the full path (quantize + kernel + `_sum_splits_kernel`) at the
variant's best split; a streaming read of the same words. Checked against an fp32 matmul on the
dequantized weight (fresh x, NaN-poisoned outputs) on each shape and on a ragged one (N 1000,
K 36 groups, splits 1 / 3 / 5 / 8); timed as CUDA-graph replays over rotated weight copies
(>= 256 MB, from HBM), median (gemv1_variants.bench_graph); the copy bandwidth (eager copy,
do_bench) measured in the same run. A table on stdout, one JSON.

What the H200 said (scripts/measurements/int4_gemv1_tile_variants.json, kernel alone, us): with
x a tile ahead, 128 rows (8 a thread) x 2 groups and 4 warps at the op's splits: the lm_head
208 -> 184 (93% of the copy bandwidth, the streaming read's 179), gate/up 40.6 -> 35.5, down
22.8 -> 21.1, o full 18.7 -> 16.2, o sliding 10.7 -> 9.6; 16384 / 18432 x 5376 16.5 -> 16.3 and
19.0 -> 17.8 with 64 rows x 2 slices. Without x ahead the per-lane tiles lost (x's loads on the
critical path), except at 128 rows. The mid shapes stay at 57-68%: the same grid with the loads
alone reaches only 61-71% there (the streaming read 65-90%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (bench_graph, launch_directly, new_out, rel, rotated_weights, spawn_prewarm,
                                    stream_read_us)
from scripts.gemv1_variants import quant_x as quant_x_op

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"


@triton.jit
def _word_planes_kernel(xq_ptr, xf_ptr, KW, XP, W: tl.constexpr, BLOCK: tl.constexpr):
    """Planes 4 and 5 of x's levels for the per-word variants, from `_quant_x_kernel`'s planes 0
    to 3 (XP words apart) and factor: plane 4 each word's 16x correction 128 (254 sum h + sum l)
    over its 8 elements (int32), plane 5 its group's factor / 16 (fp32 bits): the loop then loads
    them in the weight tile's layout, as it loads the levels."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < KW
    h = tl.zeros((BLOCK,), dtype=tl.int32)
    l = tl.zeros((BLOCK,), dtype=tl.int32)
    for t in tl.static_range(4):  # the words' signed bytes
        h += (tl.load(xq_ptr + offs, mask=ok, other=0) << (24 - 8 * t)) >> 24
        h += (tl.load(xq_ptr + XP + offs, mask=ok, other=0) << (24 - 8 * t)) >> 24
        l += (tl.load(xq_ptr + 2 * XP + offs, mask=ok, other=0) << (24 - 8 * t)) >> 24
        l += (tl.load(xq_ptr + 3 * XP + offs, mask=ok, other=0) << (24 - 8 * t)) >> 24
    tl.store(xq_ptr + 4 * XP + offs, 128 * (254 * h + l), mask=ok)
    f = tl.load(xf_ptr + offs // W, mask=ok, other=0.0) * 0.0625
    tl.store(xq_ptr.to(tl.pointer_type(tl.float32)) + 5 * XP + offs, f, mask=ok)


@triton.jit
def _as_lanes(t, L: tl.constexpr):
    """[R, C, 4 L] (4 contiguous words a thread) -> [R, C, L, 4]."""
    return tl.reshape(t, (t.shape[0], t.shape[1], L, 4))


@triton.jit
def _load_x(xq_ptr, XP, g0, lane, ok, L: tl.constexpr, CLAMP: tl.constexpr, xf_ptr=None, xc_ptr=None,
            XG: tl.constexpr = False, ASM: tl.constexpr = False):
    """x's planes (`quant_x`) at words g0 + lane ([1, C, WORDS] pointers, the
    weight tile's pattern), each [1, C, L, 4]. CLAMP: unmasked (g0 is kept inside the planes by
    the caller; its group's scale is 0)."""
    p = xq_ptr + g0 + lane
    if XG:  # the levels' planes, x's factor and correction per group: the op's loads
        he, ho, le, lo, cw, xf = im._gemv1_x_planes(xq_ptr, xf_ptr, xc_ptr, XP, g0, lane, L, ASM)
    elif CLAMP:
        he = _as_lanes(tl.load(p), L)
        ho = _as_lanes(tl.load(p + XP), L)
        le = _as_lanes(tl.load(p + 2 * XP), L)
        lo = _as_lanes(tl.load(p + 3 * XP), L)
        cw = _as_lanes(tl.load(p + 4 * XP), L)
        xf = _as_lanes(tl.load(p.to(tl.pointer_type(tl.float32)) + 5 * XP), L)
    else:
        he = _as_lanes(tl.load(p, mask=ok, other=0), L)
        ho = _as_lanes(tl.load(p + XP, mask=ok, other=0), L)
        le = _as_lanes(tl.load(p + 2 * XP, mask=ok, other=0), L)
        lo = _as_lanes(tl.load(p + 3 * XP, mask=ok, other=0), L)
        cw = _as_lanes(tl.load(p + 4 * XP, mask=ok, other=0), L)
        xf = _as_lanes(tl.load(p.to(tl.pointer_type(tl.float32)) + 5 * XP, mask=ok, other=0.0), L)
    return he, ho, le, lo, cw, xf


@triton.jit
def _clamp(g, KW, WORDS: tl.constexpr):
    """Word g (a group's first) kept at or before the row's last group, as a multiple of WORDS
    (so that the loads stay 16 bytes wide)."""
    return tl.minimum(g // WORDS, KW // WORDS - 1) * WORDS


@triton.jit
def _load_w(rows, srows, g, lane, n_ok, w_hi, KW, WORDS: tl.constexpr, CLAMP: tl.constexpr,
            SASM: tl.constexpr, ASM: tl.constexpr):
    """The weight tile at words g ([1, C, 1]) and its scales [BN, C, 1] (fp32). CLAMP: the words
    load unmasked from an address kept inside the row (a group past the slice reads the row's
    last group; rows past N read row N - 1, see the caller) and only the scale is masked (0
    there), which zeroes the group's term: no register zeroed before each masked load. SASM (with
    CLAMP): the scales load through PTX (`_ld_u16`: an elementwise op, so its tensor takes the
    layout of its use, where a `tl.load` takes its own and a conversion through shared memory,
    with its barriers, every step); `srows` is then a bf16 pointer from the clamped rows."""
    ok = n_ok & (g < w_hi)
    if CLAMP:
        w = tl.load(rows + (_clamp(g, KW, WORDS) + lane))
    else:
        w = tl.load(rows + (g + lane), mask=ok, other=0)
    if SASM and ASM:
        b = im._ld_u16(srows.to(tl.pointer_type(tl.int16)) + _clamp(g, KW, WORDS) // WORDS)
        s = tl.where(ok, (b << 16).to(tl.float32, bitcast=True), 0.0)
    elif SASM:
        s = tl.load(srows + _clamp(g, KW, WORDS) // WORDS)
        s = tl.where(ok, s.to(tl.float32), 0.0)
    else:
        s = tl.load(srows + g // WORDS, mask=ok, other=0.0).to(tl.float32)
    return w, s


@triton.jit(do_not_specialize=["N", "KW", "GPS", "stride_sn", "stride_ps"])
def _gemv1_tile_kernel(xq_ptr, xf_ptr, xc_ptr, w_ptr, s_ptr, part_ptr, y_ptr, N, KW, GPS, stride_xp, stride_ww,
                       stride_sn, stride_ps, SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUPS: tl.constexpr, DEPTH: tl.constexpr, XPRE: tl.constexpr, CLAMP: tl.constexpr,
                       LOADONLY: tl.constexpr, ASM: tl.constexpr, GPS_C: tl.constexpr = 0, SASM: tl.constexpr = False,
                       XG: tl.constexpr = False):
    """M == 1 over one slice of GPS groups (program axis 1), BLOCK_N rows: y (SPLITS == 1) or
    fp32 partials part[pid_k]. x as `quant_x`'s planes. A step reads GROUPS
    adjacent groups of each row, a [BLOCK_N, GROUPS, GROUP / 8] tile of int32 words (16-byte
    loads), seen as [BLOCK_N, GROUPS, L, 4] (L lanes of 4 words a group); `_gemv1_tile_lanes` turns it
    into per-lane fp32 terms, summed across lanes and groups once after the loop. DEPTH (1 to 3)
    tiles are loaded ahead in registers; or GPS_C (the slice's group count, one compile per
    count) unrolls the slice."""
    WORDS: tl.constexpr = GROUP // 8
    L: tl.constexpr = WORDS // 4
    STEP: tl.constexpr = GROUPS * WORDS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    w_lo = pid_k * GPS * WORDS  # slices start at whole groups: the loads stay 16 bytes wide
    w_hi = tl.minimum(w_lo + GPS * WORDS, KW)
    start = w_lo + tl.arange(0, GROUPS)[None, :, None] * WORDS  # [1, C, 1]
    lane = tl.arange(0, WORDS)[None, None, :]
    rn = tl.minimum(offs_n, N - 1) if CLAMP else offs_n
    rows = w_ptr + rn.to(tl.int64)[:, None, None] * stride_ww
    srows = s_ptr + (rn if SASM else offs_n).to(tl.int64)[:, None, None] * stride_sn
    acc = tl.zeros((BLOCK_N, GROUPS, L), dtype=tl.float32)
    if GPS_C > 0:  # the slice's steps unrolled (GPS == GPS_C): every load is free to be issued early
        for tg in tl.static_range(0, GPS_C, GROUPS):
            g0 = start + tg * WORDS
            w, s = _load_w(rows, srows, g0, lane, n_ok, w_hi, KW, WORDS, CLAMP, SASM, ASM)
            he, ho, le, lo, cw, xf = _load_x(xq_ptr, stride_xp, _clamp(g0, KW, WORDS) if CLAMP else g0, lane,
                                             g0 < w_hi, L, CLAMP, xf_ptr, xc_ptr, XG, ASM)
            acc += im._gemv1_tile_lanes(_as_lanes(w, L), s, he, ho, le, lo, cw, xf, ASM)
    else:
        w0, s0 = _load_w(rows, srows, start, lane, n_ok, w_hi, KW, WORDS, CLAMP, SASM, ASM)
        w1 = w0
        s1 = s0
        w2 = w0
        s2 = s0
        if DEPTH >= 2:
            w1, s1 = _load_w(rows, srows, start + STEP, lane, n_ok, w_hi, KW, WORDS, CLAMP, SASM, ASM)
        if DEPTH >= 3:
            w2, s2 = _load_w(rows, srows, start + 2 * STEP, lane, n_ok, w_hi, KW, WORDS, CLAMP, SASM, ASM)
        xok = start < w_hi
        xs = _clamp(start, KW, WORDS) if CLAMP else start
        if XPRE:
            he, ho, le, lo, cw, xf = _load_x(xq_ptr, stride_xp, xs, lane, xok, L, CLAMP, xf_ptr, xc_ptr, XG, ASM)
        for tg in range(0, GPS, GROUPS):
            g0 = start + tg * WORDS
            wn, sn = _load_w(rows, srows, g0 + DEPTH * STEP, lane, n_ok, w_hi, KW, WORDS, CLAMP, SASM, ASM)
            if LOADONLY:
                acc += tl.sum(_as_lanes(w0, L).to(tl.float32), axis=3) * s0.to(tl.float32)
            elif XPRE:
                g1 = g0 + STEP
                he1, ho1, le1, lo1, cw1, xf1 = _load_x(xq_ptr, stride_xp, _clamp(g1, KW, WORDS) if CLAMP else g1,
                                                       lane, g1 < w_hi, L, CLAMP, xf_ptr, xc_ptr, XG, ASM)
                acc += im._gemv1_tile_lanes(_as_lanes(w0, L), s0, he, ho, le, lo, cw, xf, ASM)
                he, ho, le, lo, cw, xf = he1, ho1, le1, lo1, cw1, xf1
            else:
                he, ho, le, lo, cw, xf = _load_x(xq_ptr, stride_xp, _clamp(g0, KW, WORDS) if CLAMP else g0,
                                                 lane, g0 < w_hi, L, CLAMP, xf_ptr, xc_ptr, XG, ASM)
                acc += im._gemv1_tile_lanes(_as_lanes(w0, L), s0, he, ho, le, lo, cw, xf, ASM)
            w0, s0, w1, s1, w2, s2 = im._gemv1_ahead(w0, s0, w1, s1, w2, s2, wn, sn, DEPTH)
    val = tl.sum(tl.sum(acc, axis=2), axis=1)
    nm = offs_n < N
    if SPLITS == 1:
        tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=nm)
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)


class V:
    """A variant of `_gemv1_tile_kernel` (constexpr knobs: one compile each)."""

    def __init__(self, bn, groups, warps, depth, xpre=False, clamp=False, loadonly=False, unroll=False, sasm=False,
                 xg=False):
        self.bn, self.groups, self.warps, self.depth, self.xpre = bn, groups, warps, depth, xpre
        self.clamp, self.loadonly, self.unroll, self.sasm, self.xg = clamp or sasm or xg, loadonly, unroll, sasm, xg

    @property
    def label(self):
        return (f"t{self.bn}g{self.groups}w{self.warps}d{self.depth}" + ("x" if self.xpre else "")
                + ("c" if self.clamp else "") + ("s" if self.sasm else "") + ("g" if self.xg else "")
                + ("u" if self.unroll else "")
                + ("LO" if self.loadonly else ""))

    def meta(self, splits, group=128, gps=0):
        return dict(GPS_C=gps if self.unroll else 0, SASM=self.sasm, XG=self.xg, SPLITS=1 if splits == 1 else 2,
                    GROUP=group, BLOCK_N=self.bn, GROUPS=self.groups, DEPTH=self.depth, XPRE=self.xpre,
                    CLAMP=self.clamp, LOADONLY=self.loadonly, num_warps=self.warps, num_stages=1)

    @property
    def planar(self):  # the per-word planes 4 and 5 (`quant_x`); xg takes the op's buffers as they are
        return not self.xg

    def launch(self, xb, words, s, part, y, gps, splits):
        N, KW = words.shape
        _gemv1_tile_kernel[(triton.cdiv(N, self.bn), splits)](
            xb[0], xb[1], xb[2], words, s, part, y, N, KW, gps, xb[0].stride(0), words.stride(0), s.stride(0),
            part.stride(0),
            ASM=not _INTERPRET, **self.meta(splits, KW * 8 // s.shape[1], gps))


class Cur:
    """The op's kernel (`_int4_gemv1_kernel`, XQ) with one config, launched alone (x quantized)."""

    def __init__(self, bn, groups, warps, parts=1, depth=1):
        self.cfg = im._cfg1(bn, groups, warps, parts, depth)
        self.kern = im._autotuned([self.cfg], im._int4_gemv1_kernel)
        self.label = f"op{bn}g{groups}w{warps}p{parts}d{depth}"
        self.loadonly = False
        self.planar = False

    def launch(self, xb, words, s, part, y, gps, splits):
        N, KW = words.shape
        self.kern[(triton.cdiv(N, self.cfg.kwargs["BLOCK_N"]), splits)](
            xb[0], xb[1], xb[2], words, s, part, y, xb[2], N, KW, gps, splits, words.stride(0), s.stride(0),
            part.stride(0), GROUP=KW * 8 // s.shape[1], RED=0, XQ=True, ASM=not _INTERPRET)


def variants(quick: bool = False, round_: int = 2) -> list:
    """The sweep: the op's kernel (its configs, a tile deeper) and the lane tiles (c: clamped
    addresses instead of masked loads; s: the scales through PTX; x: x's planes a tile ahead;
    g: x's factor and correction per group through PTX, as the op has them; LO: loads only).
    Round 1 (scripts/measurements/int4_gemv1_tile_variants.json, "round1"): without x ahead only
    128-row tiles (x's loads shared by 8 rows a thread) kept up with the op; round 2 takes x
    ahead everywhere. The op now runs the `xg` tile one step ahead (`_gemv1_loop_q`), so the
    recorded t{BN}g{G}w{W}d1xcsg rows are measured as op{BN}g{G}w{W}p1d1 (the same kernel); the
    `xg` variants kept are the ones the op has no knob for (two tiles ahead)."""
    if quick:
        return [Cur(64, 2, 4), V(64, 2, 4, 1), V(32, 2, 2, 2, clamp=True), V(16, 1, 1, 3, clamp=True),
                V(32, 2, 2, 2, xpre=True, sasm=True), V(32, 2, 2, 2, clamp=True, loadonly=True)]
    if round_ == 1:
        return [Cur(64, 2, 4), Cur(32, 2, 2), Cur(64, 2, 4, depth=2),
                V(64, 2, 4, 1), V(64, 2, 4, 1, clamp=True), V(64, 2, 4, 2, clamp=True), V(64, 2, 4, 3, clamp=True),
                V(128, 2, 4, 1, clamp=True), V(128, 2, 8, 2, clamp=True), V(32, 2, 2, 2, clamp=True),
                V(128, 1, 4, 2, clamp=True), V(128, 1, 4, 3, clamp=True), V(64, 2, 4, 2, xpre=True, clamp=True),
                V(256, 1, 4, 1, clamp=True), V(64, 2, 4, 1, sasm=True), V(128, 2, 4, 1, sasm=True),
                V(128, 1, 4, 2, sasm=True),
                V(64, 2, 4, 2, clamp=True, loadonly=True), V(128, 1, 4, 2, clamp=True, loadonly=True)]
    xs = lambda *a: V(*a, xpre=True, sasm=True)  # noqa: E731
    xg = lambda *a: V(*a, xpre=True, sasm=True, xg=True)  # noqa: E731
    if round_ == 4:  # the op's kernel at more tiles, for shorter rows (E2B / E4B / 26B-A4B lm_heads: K 1536-2816)
        return [Cur(128, 2, 4), Cur(64, 2, 4), Cur(64, 2, 2), Cur(32, 2, 2), Cur(128, 4, 4), Cur(64, 4, 4),
                Cur(256, 2, 8), Cur(128, 2, 8), Cur(128, 1, 4), Cur(64, 1, 2), Cur(256, 1, 4),
                V(128, 2, 4, 1, sasm=True, loadonly=True), V(64, 2, 4, 1, sasm=True, loadonly=True)]
    if round_ == 3:  # the ported tile's configs against the per-word planes
        return [Cur(128, 2, 4), Cur(64, 2, 4), Cur(64, 2, 2), xs(128, 2, 4, 1),
                V(128, 2, 4, 1, sasm=True, loadonly=True)]
    return [Cur(64, 2, 4), Cur(32, 2, 2), Cur(128, 2, 4), Cur(64, 2, 2), V(128, 2, 4, 1, sasm=True),
            xs(128, 2, 4, 1), xs(128, 2, 4, 2), xs(64, 2, 4, 1), xs(64, 2, 4, 2), xs(32, 2, 2, 1), xs(32, 2, 2, 2),
            xs(128, 2, 8, 1), xs(256, 2, 8, 1), xs(64, 1, 2, 2), xs(32, 1, 1, 2), xs(64, 2, 2, 1),
            V(128, 2, 4, 1, xpre=True, clamp=True), V(64, 2, 4, 2, xpre=True, clamp=True),
            xg(64, 2, 4, 2), xg(32, 2, 2, 2),
            V(128, 2, 4, 1, sasm=True, loadonly=True), V(32, 2, 2, 2, sasm=True, loadonly=True)]


def quant_x(x2: torch.Tensor, group: int, planar: bool):
    """x2 [1, K] as `_quant_x_kernel`'s planes, factor and correction (`gemv1_variants.quant_x`);
    planar: with the per-word planes 4 and 5 (`_word_planes_kernel`), int32 [6, K / 8]."""
    xq, xf, xc = quant_x_op(x2, group, 6 if planar else 4)
    if planar:
        kw = x2.shape[1] // 8
        _word_planes_kernel[(triton.cdiv(kw, 1024),)](xq, xf, kw, xq.stride(0), W=group // 8, BLOCK=1024, num_warps=4)
    return xq, xf, xc


def path(v, x2, q, s, splits, poison=False):
    """y = x2 @ dequant(W).T through v: quantize x, v's kernel over `splits` K slices, the split
    sum (what the op launches, with v's kernel in place of its own)."""
    N, K = q.shape[0], q.shape[1] * 2
    G = K // s.shape[1]
    gps = triton.cdiv(K // G, splits)
    splits = triton.cdiv(K // G, gps)
    y = new_out((1, N), x2.dtype, x2.device, poison)
    part = new_out((splits, N) if splits > 1 else (1, 1), torch.float32, x2.device, poison)
    v.launch(quant_x(x2, G, v.planar), q.view(torch.int32), s, part, y, gps, splits)
    if splits > 1:
        im._sum_splits_kernel[(triton.cdiv(N, 1024),)](part, y, N, splits, part.stride(0), BLOCK=1024, num_warps=4)
    return y


def op_path(x2, q, s):
    """The op's M == 1 path as it stands (`gemv1_plan`'s config and split)."""
    N, K = q.shape[0], q.shape[1] * 2
    cfg, sp, *_ = im.gemv1_plan(N, K, K // s.shape[1])
    return im.int4_gemv1(x2, q, s, sp, kernel=im._gemv1_kernel(cfg), xq=True)


# ---- offline counts: compile for sm_90 without a GPU, read the loop's SASS -------------------


def _compile_sm90(fn, sig: dict, const: dict, warps: int, aligned: list[str]):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    full = {**{a: "constexpr" for a in const}, **sig}
    return triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 1})


def _sass_loop(cubin: bytes, whole: bool = False) -> tuple[dict, str]:
    """Opcode counts of the kernel's main loop (the longest backward branch's body; whole: the
    whole kernel) and the resource line (registers, stack) of cuobjdump."""
    import tempfile
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    best = None
    for addr, text in ins:
        b = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr and (best is None or addr - int(b.group(1), 16) > best[1] - best[0]):
            best = (int(b.group(1), 16), addr)
    counts: dict[str, int] = {}
    if whole:
        best = (0, ins[-1][0]) if ins else None
    if best:
        for addr, text in ins:
            if best[0] <= addr <= best[1]:
                op = re.sub(r"^@!?U?P\d\s+", "", text).split()[0]
                counts[op] = counts.get(op, 0) + 1
    reg = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return counts, reg.group(0) if reg else "?"


UNROLL_COUNT_GPS = 6  # an unrolled slice is counted whole at 6 groups (K 5376 in 7 slices)


def count(vs) -> list[dict]:
    """Per variant: registers, spills, the loop body's instructions per word of weights (by kind)."""
    out = []
    for v in vs:
        if isinstance(v, Cur):
            c = v.cfg.kwargs
            sig = {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16",
                   "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
                   "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32"}
            const = {"GROUP": 128, "BLOCK_N": c["BLOCK_N"], "PARTS": c["PARTS"], "GROUPS": c["GROUPS"],
                     "DEPTH": c["DEPTH"], "RED": 0, "XQ": True, "ASM": True}
            k = _compile_sm90(im._int4_gemv1_kernel, sig, const, v.cfg.num_warps,
                              ["x_ptr", "xf_ptr", "xc_ptr", "w_ptr", "s_ptr", "part_ptr", "y_ptr", "cnt_ptr",
                               "stride_ww"])
            warps, words = v.cfg.num_warps, c["BLOCK_N"] * c["PARTS"] * c["GROUPS"] * 16
        else:
            sig = {"xq_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16",
                   "part_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "KW": "i32", "GPS": "i32", "stride_xp": "i32",
                   "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32"}
            meta = v.meta(2, gps=UNROLL_COUNT_GPS)
            warps = meta.pop("num_warps")
            meta.pop("num_stages")
            k = _compile_sm90(_gemv1_tile_kernel, sig, {**meta, "ASM": True}, warps,
                              ["xq_ptr", "xf_ptr", "xc_ptr", "w_ptr", "s_ptr", "part_ptr", "y_ptr", "stride_ww",
                               "stride_xp"])
            words = v.bn * v.groups * 16 * (UNROLL_COUNT_GPS // v.groups if v.unroll else 1)
        ops, res = _sass_loop(k.asm["cubin"], whole=getattr(v, "unroll", False))
        per_thread = words / (32 * warps)  # words of weights a thread reads per step
        ttgir = k.asm["ttgir"]
        kinds = {"dp4a": ops.get("IDP.4A.U8.S8", 0), "ldg": sum(n for o, n in ops.items() if o.startswith("LDG")),
                 "shfl": sum(n for o, n in ops.items() if o.startswith("SHFL")),
                 "shared": sum(n for o, n in ops.items() if o.startswith(("LDS", "STS", "BAR"))),
                 "cvt": sum(n for o, n in ops.items() if o.startswith(("I2F", "F2I"))),
                 "all": sum(ops.values())}
        r = {"variant": v.label, "resources": res, "words_per_thread_step": per_thread,
             "loop_per_word": {kk: round(n / per_thread, 2) for kk, n in kinds.items()},
             "loop_ops": dict(sorted(ops.items(), key=lambda t: -t[1])),
             "convert_layouts": ttgir.count("convert_layout")}
        out.append(r)
        print(f"{v.label:18} {res:38} words/thread/step {per_thread:4.0f} | per word: "
              + " ".join(f"{kk} {n / per_thread:5.2f}" for kk, n in kinds.items())
              + f" | convert_layout {r['convert_layouts']}", flush=True)
    return out


# ---- the GPU sweep -------------------------------------------------------------------------


def _prewarm_worker(idx, count_, round_):
    vs = variants(round_=round_)[idx::count_]  # (Triton's disk cache: the sweep finds them compiled)
    q, s = im.quantize_int4(torch.randn(256, 5376, device=DEVICE), 128)
    x = torch.randn(1, 5376, device=DEVICE, dtype=torch.bfloat16)
    for v in vs:
        for splits in (1, 2):
            try:
                path(v, x, q, s, splits)
            except Exception:
                pass
    op_path(x, q, s)
    torch.cuda.synchronize()


SHAPES = [("o_proj.sliding", 5376, 8192), ("qkv_proj.sliding", 16384, 5376), ("o_proj.full", 5376, 16384),
          ("qk_proj.full", 18432, 5376), ("mlp.down_proj", 5376, 21504), ("mlp.gate_up_proj", 43008, 5376),
          ("lm_head", 262144, 5376)]


def _shape_list(text: str) -> list[tuple[str, int, int]]:
    """'name:n:k,name:n:k' -> [(name, n, k)]; K a multiple of 128 (the sweep's group)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()) or int(parts[2]) % 128:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME:N:K with K a multiple of 128")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_tile_variants.json"))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=12)
    ap.add_argument("--count", action="store_true", help="offline: compile each variant for sm_90 and count its loop")
    ap.add_argument("--quick", action="store_true", help="a few variants (the interpreter's smoke run)")
    ap.add_argument("--round", type=int, default=2, help="the variant set: 1-4 (see `variants`)")
    ap.add_argument("--shapes", type=_shape_list, default=None, metavar="NAME:N:K[,...]",
                    help="weights to sweep instead of the 31B's seven, e.g. e4b.lm_head:262144:2560")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.count:
        doc = {"target": "sm_90 (offline)", "variants": count(variants(a.quick, a.round))}
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    if not launch_directly("gemv1_tile_variants"):
        return 2
    if a.prewarm and not _INTERPRET:
        spawn_prewarm(_prewarm_worker, a.prewarm, 45, a.round)
    from scripts.bench_int4 import copy_gbps
    gbps = 1000.0 if _INTERPRET else copy_gbps()
    dev = "cpu (interpreter)" if _INTERPRET else torch.cuda.get_device_name()
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    xdt = torch.float32 if _INTERPRET else torch.bfloat16  # (the interpreter's bf16 casts)
    vs = variants(a.quick, a.round)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "summary": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1) + "\n")  # noqa: E731
    # ragged: N no tile divides, K 36 groups (the interpreter: 40 x 5 groups)
    rn, rk = (40, 640) if _INTERPRET else (1000, 4608)
    q, s = im.quantize_int4(torch.randn(rn, rk, device=DEVICE), 128)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    bad = []
    worst = 0.0
    for v in vs:
        if v.loadonly:
            continue
        for sp in (1, 3, 5) if _INTERPRET else (1, 3, 5, 8):
            x = torch.randn(1, rk, device=DEVICE, dtype=xdt)
            try:
                err = rel(path(v, x, q, s, sp, poison=True), x.float() @ ref_w.t())
            except Exception as e:
                print(f"  {v.label} split {sp}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                err = float("nan")
            worst = max(worst, err) if err == err else worst
            if not err <= 1e-2:
                bad.append((v.label, sp, err))
    doc["ragged_worst_rel_err"], doc["ragged_bad"] = worst, bad
    print(f"ragged checks (N {rn}, K {rk}): worst rel err {worst:.1e}" + (f"; FAIL {bad}" if bad else ""), flush=True)
    broken = {b[0] for b in bad}
    shapes = a.shapes or ([("tiny", 48, 512), ("tiny2", 80, 768)] if _INTERPRET else SHAPES)
    print(f"{'shape':17} {'floor':>5} | {'op path':>12} | {'op kern':>7} | best kernel alone (us, % copy)"
          f"            | best path (us, % copy)", flush=True)
    for name, n, k in shapes:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        g = 128
        nbytes, ws, ref_w = rotated_weights(n, k, g)
        floor_us = nbytes / gbps / 1e3
        wbytes = im.int4_bytes(n, k, g)
        x = torch.randn(1, k, device=DEVICE, dtype=xdt)
        xbs = {p: quant_x(x, g, p) for p in (False, True)}
        res = []

        def rec(tag, us, err, splits=1):
            r = {"shape": name, "n": n, "k": k, "variant": tag, "splits": splits, "us": us, "rel_err": err,
                 "fraction_of_copy_bw": floor_us / us}
            res.append(r)
            rows.append(r)
            return r

        # the op's path as it stands
        xc_ = torch.randn(1, k, device=DEVICE, dtype=xdt)
        err = rel(op_path(xc_, *ws[-1]), xc_.float() @ ref_w.t())
        op = rec("op_path", bench_graph(lambda: [op_path(x, qq, ss) for qq, ss in ws], len(ws)), err)
        # a streaming read of the same packed words: the ceiling of one launch of this size
        stream = rec("stream_read", stream_read_us([qq.view(torch.int32).view(-1) for qq, _ in ws]), float("nan"))
        # K slices: one from 32768 rows (enough row blocks); more where the row blocks are few
        split_set = (1, 2) if n >= im.GEMV1_LARGE_N else (4, 8, 16) if n <= 8192 else (2, 4, 8, 16)
        for v in vs:
            if v.label in broken:
                continue
            done: dict[int, float] = {}
            for sp in split_set:
                gps = triton.cdiv(k // g, sp)
                spl = triton.cdiv(k // g, gps)
                if spl in done:
                    continue
                try:
                    err = float("nan")
                    if not v.loadonly:
                        xc_ = torch.randn(1, k, device=DEVICE, dtype=xdt)
                        err = rel(path(v, xc_, *ws[-1], spl, poison=True), xc_.float() @ ref_w.t())
                    parts = [torch.empty((spl, n) if spl > 1 else (1, 1), device=DEVICE) for _ in ws]
                    ys = [torch.empty((1, n), device=DEVICE, dtype=xdt) for _ in ws]
                    kus = bench_graph(lambda: [v.launch(xbs[v.planar], qq.view(torch.int32), ss, parts[i], ys[i],
                                                        gps, spl) for i, (qq, ss) in enumerate(ws)], len(ws))
                    rec(v.label + "/kernel", kus, err, spl)
                    done[spl] = kus if (v.loadonly or err <= 1e-2) else float("inf")
                    del parts, ys
                except Exception as e:
                    print(f"  {v.label} split {sp}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if done and not v.loadonly and min(done.values()) < float("inf"):  # the full path at its best split
                spl = min(done, key=done.get)
                try:
                    pus = bench_graph(lambda: [path(v, x, qq, ss, spl) for qq, ss in ws], len(ws))
                    rec(v.label + "/path", pus, next(r["rel_err"] for r in res if r["variant"] == v.label + "/kernel"
                                                     and r["splits"] == spl), spl)
                except Exception as e:
                    print(f"  {v.label} path split {spl}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        ok = lambda tag: [r for r in res if r["variant"].endswith(tag) and r["rel_err"] <= 1e-2]  # noqa: E731
        plan = triton.cdiv(k // g, triton.cdiv(k // g, im.gemv1_plan(n, k, g)[1]))  # the op's slices
        opk = [r for r in ok("/kernel") if r["variant"] == "op64g2w4p1d1/kernel" and r["splits"] == plan]
        bk = min((r for r in ok("/kernel") if not r["variant"].startswith("op")), key=lambda r: r["us"], default=None)
        bko = min((r for r in ok("/kernel") if r["variant"].startswith("op")), key=lambda r: r["us"], default=None)
        bp = min(ok("/path"), key=lambda r: r["us"], default=None)
        lo = [r for r in res if "LO" in r["variant"]]
        lob = min(lo, key=lambda r: r["us"], default=None)
        bad = [(r["variant"], r["splits"], r["rel_err"]) for r in res
               if "LO" not in r["variant"] and r["variant"] != "stream_read" and not r["rel_err"] <= 1e-2]
        summ = {"shape": name, "n": n, "k": k, "bytes": nbytes, "weight_bytes": wbytes, "floor_us": floor_us,
                "op_path": op, "op_kernel_at_plan": opk[0] if opk else None, "best_op_kernel": bko,
                "best_tile_kernel": bk, "best_path": bp, "loadonly_best": lob, "stream_read": stream, "bad": bad}
        doc["summary"].append(summ)
        f = lambda r: f"{r['us']:6.1f} {r['fraction_of_copy_bw']:4.0%}" if r else "   -  "  # noqa: E731
        print(f"{name[:17]:17} {floor_us:5.1f} | {f(op)} | {opk[0]['us'] if opk else float('nan'):7.1f} | "
              f"{f(bk)} {bk['variant'] if bk else '-'}/{bk['splits'] if bk else '-'} (op's best {f(bko)} "
              f"{bko['variant'] if bko else '-'}/{bko['splits'] if bko else '-'}) | {f(bp)} "
              f"{bp['variant'] if bp else '-'}/{bp['splits'] if bp else '-'} | loads {f(lob)} | read {f(stream)}"
              + (f"  BAD {bad}" if bad else ""), flush=True)
        for r in sorted(ok("/kernel"), key=lambda r: r["us"])[:5]:
            print(f"    {r['variant']:24} split {r['splits']} {r['us']:7.1f} us {r['fraction_of_copy_bw']:5.0%}"
                  f" err {r['rel_err']:.1e}", flush=True)
        save()
        del ws
        if not _INTERPRET:
            torch.cuda.empty_cache()
    # one variant for every shape: the sum over the shapes of its best kernel-alone time
    tot: dict[str, list] = {}
    for r in rows:
        if r["variant"].endswith("/kernel") and r["rel_err"] <= 1e-2:
            d = tot.setdefault(r["variant"], {})
            d[r["shape"]] = min(d.get(r["shape"], 1e9), r["us"])
    nsh = len(doc["summary"])
    ranked = sorted((sum(d.values()), lab) for lab, d in tot.items() if len(d) == nsh)
    doc["kernel_sum_us"] = {lab: t for t, lab in ranked}
    print("sum over the shapes of each kernel at its best split (us): "
          + ", ".join(f"{lab[:-7]} {t:.1f}" for t, lab in ranked[:8]), flush=True)
    save()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
