"""A dense MLP at M == 1 as one launch of producers and consumers (a design probe; timed beside the op's MLP by
scripts/small_mlp_variants.py as `pc/...` rows).

Why: E2B's MLP in its layer graph takes ~16 us a layer on the H100 where its bytes need ~5 (its three kernels, the
gate / up GEMV, the activation's quantize kernel and the down GEMV, each waiting for the one before; PDL lets a
kernel load only its first tiles early). Here the down weights load while the gate / up weights stream: one grid,
its first P programs the producers (gate / up rows), the rest the consumers (down rows).

Measured (H100, `python -m scripts.small_mlp_variants --layers 16 --models e2b,e4b --only op,pc/`, 16 layers a CUDA
graph with PDL; scripts/measurements/small_mlp_pc_h100.json): it loses. E2B 16.26 us a layer as the op runs it
(15.95 with the TMA down) against 21.39 at best here (pc/32x4d1p2/4x4/w8s), E4B 28.33 (24.97) against 40.62. The
consumers' preload is worth 0.7 us (E2B 24.20 preloaded, 24.92 loaded after the spin), the ticket costs 0.9
(25.09). Where the time goes is the producers: without STAGE 39.76, with 32-row blocks 21.39, with two tiles ahead
22.93 (16-row blocks, one ahead: 24.20). A few programs an SM looping over row blocks keep fewer bytes in flight
than the op's gate / up GEMV, whose 768 programs each take one block. What one launch could save is bounded by
the down GEMV's own start and tail and the activation's launch; the preload's 0.7 us says the down weights' stream
was mostly hidden already (the op's down GEMV loads its first tiles before its wait). (Those runs also captured
a stray fill kernel a layer in the pc rows' graphs, a counter tensor built and dropped at every call, since built
once: the pc figures are pessimistic by about one small launch, ~1 us, against a gap of 5.4 us on E2B.)

- A producer takes the residual add and both norms (as the bf16-x GEMV's RES with NORM: x + rms_norm(r) w_post,
  then rms_norm(h) w_pre), computes BN / 2 gate rows and the same up rows, stores them (bf16) and the activation
  gelu_tanh(gate) * up (rounded to bf16, as the model's ops leave it), then bumps counter 0 (a barrier, then one
  thread's gpu-scope release atomic). Program 0 also writes h.
- A consumer loads all of its BND down rows (words and scales: registers) before its PDL wait, waits for counter 0
  to reach P (volatile loads, then an acquire atomic, then a barrier), and computes its rows from the activation.
  The last consumer to finish (counter 1) puts the counters back to 0: the next call finds them zeroed.

Roles go by program id. A consumer spins only on producers, whose ids are lower: the GPU dispatches a 1-D grid's
programs in id order, so every producer is resident or done before a consumer can wait, and the grid needs no
co-residency. That order is what GPUs do, not a documented guarantee; with TICKET each program takes its role from
an atomic counter (counter 2) first thing, so a consumer waits only on producers that have started, whatever the
order (one atomic's round trip before its first loads, under the kernel before it with PDL).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from export.kernels.int4_matmul import (_gemv1_tile, _inv_rms, _inv_rms_h,
                                        _residual_pair, _round_bf16, NORM_BLOCK, gelu_tanh, norm_steps)
from export.kernels.pdl import pdl_args, pdl_wait

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _spin_until(cnt_ptr, target, ASM: tl.constexpr):
    """Until the counter at cnt_ptr reaches target: volatile loads, then one acquire atomic (what the producers
    released is visible from here on), then a barrier (for every thread of the program); -> 0 from the atomic's
    value, which the reads after it add to their pointers. A probe's guard: after
    2^24 loads (well over a second) it goes on, and the outputs' checks fail instead of the GPU hanging."""
    seen = tl.load(cnt_ptr, volatile=True)
    n = 0
    while (seen < target) & (n < 16777216):
        seen = tl.load(cnt_ptr, volatile=True)
        n += 1
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    if ASM:  # 0 through an opaque move: the atomic's value stays used (folded to a constant, the atomic was dropped)
        zero = tl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [seen], dtype=tl.int32, is_pure=True, pack=1)
    else:
        zero = seen * 0
    tl.debug_barrier()
    return zero * 64  # a multiple of 64: the reads of what the producers wrote add it (ordered after the atomic)


@triton.jit
def _tile(guw_ptr, gus_ptr, pid, t, nstep, P, HB: tl.constexpr, half, cols, lane, total, stride_gw, stride_gs,
          GROUPS: tl.constexpr, WORDS: tl.constexpr):
    """(words, scales) of a producer's tile t: step t % nstep of its block t // nstep (row block pid + that * P);
    zeros past its last."""
    rows = ((pid + (t // nstep) * P) * HB + half).to(tl.int64)[:, None, None]
    g0 = cols + (t % nstep) * (GROUPS * WORDS)
    ok = t < total
    return (tl.load(guw_ptr + rows * stride_gw + g0 + lane, mask=ok, other=0),
            tl.load(gus_ptr + rows * stride_gs + g0 // WORDS, mask=ok, other=0.0))


@triton.jit
def _produce(pid, x_ptr, r_ptr, wr_ptr, wn_ptr, h_ptr, guw_ptr, gus_ptr, gu_ptr, act_ptr, cnt_ptr, K, I, eps, P,
             stride_gw, stride_gs, GROUP: tl.constexpr, BN: tl.constexpr, GROUPS: tl.constexpr, DEPTH: tl.constexpr,
             NORM_STEPS: tl.constexpr, STAGE: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Row blocks pid, pid + P, ... of BN / 2 gate rows and the same up rows (module doc), as one stream of tiles
    (the tiles loaded ahead run on into the next block)."""
    HB: tl.constexpr = BN // 2
    WORDS: tl.constexpr = GROUP // 8
    KW = K // 8
    nstep = KW // WORDS // GROUPS
    nblk = I // HB
    total = (nblk - pid + P - 1) // P * nstep  # this program's tiles
    i = tl.arange(0, BN)
    half = tl.where(i < HB, i, I + i - HB)  # a block's rows: gate rows, then the same up rows
    lane = tl.arange(0, WORDS)[None, None, :]
    col = tl.arange(0, GROUPS)
    cols = (col * WORDS)[None, :, None]
    w0, s0 = _tile(guw_ptr, gus_ptr, pid, 0, nstep, P, HB, half, cols, lane, total, stride_gw, stride_gs, GROUPS,
                   WORDS)  # the first DEPTH tiles, before the wait
    w1, s1 = w0, s0
    if DEPTH == 2:
        w1, s1 = _tile(guw_ptr, gus_ptr, pid, 1, nstep, P, HB, half, cols, lane, total, stride_gw, stride_gs, GROUPS,
                       WORDS)
    z = pdl_wait(PDL, ASM)
    xw = (x_ptr + z).to(tl.pointer_type(tl.int32))
    rw = (r_ptr + z).to(tl.pointer_type(tl.int32))
    wrw = wr_ptr.to(tl.pointer_type(tl.int32))
    uw = wn_ptr.to(tl.pointer_type(tl.int32))
    inv_r = _inv_rms(rw, K, eps, 1, NORM_STEPS)
    inv = _inv_rms_h(xw, rw, wrw, K, eps, inv_r, NORM_STEPS)
    if pid == 0:  # h, once
        for j in range(0, KW * 4, NORM_BLOCK):
            o = j + tl.arange(0, NORM_BLOCK)
            m = o < KW * 4
            h_lo, h_hi = _residual_pair(tl.load(xw + o, mask=m, other=0), tl.load(rw + o, mask=m, other=0),
                                        tl.load(wrw + o, mask=m, other=0), inv_r)
            tl.store(h_ptr + z + 2 * o, h_lo.to(h_ptr.dtype.element_ty), mask=m)
            tl.store(h_ptr + z + 2 * o + 1, h_hi.to(h_ptr.dtype.element_ty), mask=m)
    acc = tl.zeros((BN, GROUPS, WORDS), dtype=tl.float32)
    for t in range(0, total):
        stp = t % nstep
        g0 = cols + stp * (GROUPS * WORDS)
        wn, sn = _tile(guw_ptr, gus_ptr, pid, t + DEPTH, nstep, P, HB, half, cols, lane, total, stride_gw, stride_gs,
                       GROUPS, WORDS)  # used DEPTH steps on
        if STAGE:
            wd = stp * (GROUPS * WORDS) + col[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
            acc += _gemv1_tile(w0, s0, xw, uw, g0, lane, g0 < KW, ASM, 0, 1, inv, 1, rw, wrw, inv_r, wd, wd < KW, 1)
        else:
            acc += _gemv1_tile(w0, s0, xw, uw, g0, lane, g0 < KW, ASM, 0, 1, inv, 1, rw, wrw, inv_r)
        if DEPTH == 1:
            w0, s0 = wn, sn
        else:
            w0, s0, w1, s1 = w1, s1, wn, sn
        if stp == nstep - 1:  # the block's rows done: stored, the accumulator cleared
            val = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]: the gate rows, then the up rows
            gate, up = tl.split(tl.permute(tl.reshape(val, (2, HB)), (1, 0)))
            gate = _round_bf16(gate)
            up = _round_bf16(up)
            act = _round_bf16(gelu_tanh(gate) * up)
            o = (pid + (t // nstep) * P) * HB + tl.arange(0, HB)
            tl.store(gu_ptr + z + o, gate.to(gu_ptr.dtype.element_ty))
            tl.store(gu_ptr + z + I + o, up.to(gu_ptr.dtype.element_ty))
            tl.store(act_ptr + z + o, act.to(act_ptr.dtype.element_ty))
            acc = tl.zeros((BN, GROUPS, WORDS), dtype=tl.float32)
    tl.debug_barrier()  # every thread's rows stored; one thread's gpu-scope release atomic publishes them
    tl.atomic_add(cnt_ptr + z, 1, sem="release", scope="gpu")


@triton.jit
def _consume(c, act_ptr, dw_ptr, ds_ptr, y_ptr, cnt_ptr, K, I, P, Q, stride_dw, stride_ds,
             DGROUP: tl.constexpr, BND: tl.constexpr, DGROUPS: tl.constexpr, DSTEPS: tl.constexpr,
             PRELOAD: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Down rows c * BND ... (module doc). PRELOAD 0: the rows load after the spin (what preloading them saves)."""
    DW: tl.constexpr = DGROUP // 8
    IW = I // 8
    offs_m = c * BND + tl.arange(0, BND)
    m_ok = (offs_m < K)[:, None, None]
    lane = tl.arange(0, DW)[None, None, :]
    rows = dw_ptr + offs_m.to(tl.int64)[:, None, None] * stride_dw
    srows = ds_ptr + offs_m.to(tl.int64)[:, None, None] * stride_ds
    z = 0
    za = 0
    if not PRELOAD:
        z = pdl_wait(PDL, ASM)
        za = _spin_until(cnt_ptr + z, P, ASM)
    ws = []
    ss = []
    for i in tl.static_range(DSTEPS):  # every tile of the rows, before the wait (weights: constants)
        g = (i * DGROUPS + tl.arange(0, DGROUPS))[None, :, None]
        ok = m_ok & (g * DW < IW)
        ws = ws + [tl.load(rows + za + (g * DW + lane), mask=ok, other=0)]
        ss = ss + [tl.load(srows + za + g, mask=ok, other=0.0)]
    if PRELOAD:
        z = pdl_wait(PDL, ASM)
        za = _spin_until(cnt_ptr + z, P, ASM)
    xw = (act_ptr + z + za).to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BND, DGROUPS, DW), dtype=tl.float32)
    for i in tl.static_range(DSTEPS):
        g0 = (i * DGROUPS + tl.arange(0, DGROUPS))[None, :, None] * DW
        acc += _gemv1_tile(ws[i], ss[i], xw, xw, g0, lane, g0 < IW, ASM, 0)
    val = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + z + offs_m, val.to(y_ptr.dtype.element_ty), mask=offs_m < K)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + z + 1, 1, sem="acq_rel", scope="gpu")
    if done == Q - 1:  # the last consumer: every program has passed its counters; zeroed for the next call
        tl.store(cnt_ptr + z, 0)
        tl.store(cnt_ptr + z + 1, 0)
        tl.store(cnt_ptr + z + 2, 0)  # (the tickets: every program has taken one)


@triton.jit
def _mlp_pc_kernel(x_ptr, r_ptr, wr_ptr, wn_ptr, h_ptr, guw_ptr, gus_ptr, gu_ptr, act_ptr, dw_ptr, ds_ptr, y_ptr,
                   cnt_ptr, K, I, eps, P, Q, stride_gw, stride_gs, stride_dw, stride_ds,
                   GROUP: tl.constexpr, BN: tl.constexpr, GROUPS: tl.constexpr, DEPTH: tl.constexpr,
                   DGROUP: tl.constexpr, BND: tl.constexpr, DGROUPS: tl.constexpr, DSTEPS: tl.constexpr,
                   NORM_STEPS: tl.constexpr, STAGE: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = 0,
                   PRELOAD: tl.constexpr = 1, TICKET: tl.constexpr = 0):
    """The MLP (module doc): programs (or tickets) [0, P) produce, [P, P + Q) consume."""
    if TICKET:  # the role by arrival: a program waits only on programs that took their tickets before it
        pid = tl.atomic_add(cnt_ptr + 2, 1, sem="relaxed", scope="gpu")
    else:
        pid = tl.program_id(0)
    if pid < P:
        _produce(pid, x_ptr, r_ptr, wr_ptr, wn_ptr, h_ptr, guw_ptr, gus_ptr, gu_ptr, act_ptr, cnt_ptr, K, I, eps, P,
                 stride_gw, stride_gs, GROUP, BN, GROUPS, DEPTH, NORM_STEPS, STAGE, ASM, PDL)
    else:
        _consume(pid - P, act_ptr, dw_ptr, ds_ptr, y_ptr, cnt_ptr, K, I, P, Q, stride_dw, stride_ds, DGROUP, BND,
                 DGROUPS, DSTEPS, PRELOAD, ASM, PDL)


class PcConfig(tuple):
    """(BN, GROUPS, DEPTH, BND, DGROUPS, warps, STAGE, PF, PRELOAD): producer rows a block (half gate, half up),
    groups a step and tiles ahead (1 or 2); consumer rows and groups a tile; warps; the producer's x once a program
    (STAGE); PF producers an SM (P = PF x the SMs, at most one a block); the consumers' rows loaded before their wait
    (PRELOAD 1) or after their spin (0); TICKET 1: each program's role by a ticket (an atomic counter) taken first
    thing, not by its id (no reliance on the order programs are dispatched in)."""

    def __new__(cls, bn, groups, depth, bnd, dgroups, warps, stage, pf, preload=1, ticket=0):
        return super().__new__(cls, (bn, groups, depth, bnd, dgroups, warps, stage, pf, preload, ticket))

    @property
    def label(self) -> str:
        bn, groups, depth, bnd, dgroups, warps, stage, pf, preload, ticket = self
        return (f"pc/{bn}x{groups}d{depth}p{pf}/{bnd}x{dgroups}/w{warps}{'s' if stage else ''}"
                f"{'' if preload else '/late'}{'/ticket' if ticket else ''}")


def mlp_pc(x, r, w_post, w_pre, eps, gu, down, cnt, cfg: PcConfig, pdl: int):
    """(h, gate / up [1, 2 I], y) of x, r [1, K] (bf16) through `_mlp_pc_kernel`. gu, down: (qweight, scales) in the
    int4 layout (gate rows then up rows; down [K, I]). cnt: three int32 counters, zero (left zero)."""
    (guq, gus), (dq, ds) = gu, down
    bn, groups, depth, bnd, dgroups, warps, stage, pf, preload, ticket = cfg
    K, I = x.shape[1], dq.shape[1] * 2
    G, Gd = K // gus.shape[1], I // ds.shape[1]
    if I % (bn // 2) or (K // G) % groups or depth not in (1, 2):
        raise ValueError(f"mlp_pc: {bn // 2} gate rows a block must divide I {I}, {groups} groups a step K / G "
                         f"{K // G}, depth 1 or 2 (got {depth})")
    sms = 4 if _INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
    P, Q = min(I // (bn // 2), pf * sms), triton.cdiv(K, bnd)
    h = torch.empty_like(x)
    gu_out = torch.empty((1, 2 * I), device=x.device, dtype=x.dtype)
    act = torch.empty((1, I), device=x.device, dtype=x.dtype)
    y = torch.empty_like(x)
    guw, dw = guq.view(torch.int32), dq.view(torch.int32)
    _mlp_pc_kernel[(P + Q,)](x, r, w_post, w_pre, h, guw, gus, gu_out, act, dw, ds, y, cnt, K, I, eps, P, Q,
                             guw.stride(0), gus.stride(0), dw.stride(0), ds.stride(0), GROUP=G, BN=bn, GROUPS=groups,
                             DEPTH=depth, DGROUP=Gd, BND=bnd, DGROUPS=dgroups, DSTEPS=triton.cdiv(I // Gd, dgroups),
                             NORM_STEPS=norm_steps(K // 2), STAGE=stage, ASM=not _INTERPRET, PRELOAD=preload,
                             TICKET=ticket, num_warps=warps,
                             **pdl_args(pdl))
    return h, gu_out, y


class Persistent:
    """small_mlp_variants' variant: the whole MLP as one `mlp_pc` launch (`mlp` in place of the two `gemv`s), each
    layer's weights with counters of their own."""

    def __init__(self, cfg: PcConfig):
        self.cfg = cfg
        self.label = cfg.label
        self._cnt = {}

    def usable(self, hid: int, inter: int) -> bool:
        bn, groups = self.cfg[0], self.cfg[1]  # (hid's group: 128, as the probe's weights)
        return inter % (bn // 2) == 0 and (hid // 128) % groups == 0

    def counters_zero(self) -> bool:
        """Whether every layer's counters are back at 0 (each launch leaves them as it found them)."""
        return all(not c.any() for c in self._cnt.values())

    def mlp(self, x, r, w, eps):
        cnt = self._cnt.get(id(w))
        if cnt is None:  # once a layer (a default built at every call would put its fill kernel in the timed graph)
            cnt = self._cnt[id(w)] = torch.zeros(3, device=x.device, dtype=torch.int32)
        return mlp_pc(x, r, w["w_post"], w["w_pre"], eps, w["gu"], w["down"], cnt, self.cfg,
                      0 if _INTERPRET else 2)
