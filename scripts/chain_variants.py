"""A 31B sliding layer's post-attention chain (the o projection, the MLP's norm, gate / up, the activation, down)
as one persistent kernel against separate launches (a design probe, one GPU call).

    python -m scripts.chain_variants [--out chain_variants.json] [--budget 200] [--rounds 3]
    python -m scripts.chain_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter, tiny shapes

Why: the 31B decodes at ~57% of its floor (runtime_31b.json), and the M == 1 GEMVs, 3/4 of its kernel time, run
at 39-73% of the copy bandwidth each, below what one kernel reading the same bytes reaches (read_ceiling.json).
Every kernel pays a ramp (its first loads' latency) and a tail (its last programs), and PDL hides only one tile
of the next kernel's weights behind the kernel before. The weights do not depend on the activations: a kernel
that stays resident over the chain (a program an SM or two, a grid-wide barrier where a projection needs the
whole output of the one before) can keep loading weights across those barriers, so the chain pays one ramp and
one tail instead of one each per projection.

`_chain_kernel` runs phases FIRST..LAST of the chain: 0 the o projection (x -> yo), 1 gate / up on the RMSNorm of
yo (-> ygu, gate rows then up rows), 2 down on gelu_tanh(gate) * up (-> yd); bf16 x through `_gemv1_tile` (the
op's bf16-x arithmetic, nibble floats and FMAs), each program taking units (BLOCK_N rows x all of K) in a
grid-stride loop over a phase, its next tile loaded one step ahead, across units and, before each barrier's
wait, across phases. The barrier: every program's arrival (a CTA barrier, then one gpu-scope acq_rel atomic) and
a spin until all P arrived (bounded: past SPIN polls the kernel flags an error instead of hanging); the last
program out resets the counters, so a graph replays it as is. P must be co-resident (at most what the compiled
kernel's registers and shared memory allow an SM, times the SMs: checked before a variant runs).

Variants, each checked against an fp32 chain on the dequantized weights (fresh x and norm weight, outputs
NaN-filled first) and timed as CUDA-graph replays over weight sets rotated so that they come from HBM:
- `op` / `op_pdl`: the op's M == 1 path per projection (`gemv1_plan`, x as int8 levels; the norm and the
  activation in its quantize kernels), without and with the PDL attribute as the artifact launches them;
- `sep<BN>r<G>g<W>w/<P>`: `_chain_kernel` one phase a launch (three launches, PDL attribute), P programs each;
- `persist<BN>r<G>g<W>w/<P>`: the whole chain in one launch of P programs.
The floor: the three weights' bytes over the copy bandwidth measured in the same run. Table on stdout, one JSON
(`--out`) with `copy_gbps`, `floor_us`, `rows` (variant, us, rel_err, fraction_of_copy_bw).

What the first runs said (H100, scripts/measurements/chain_variants.json): the op 93.2 us with PDL (72% of the
copy bandwidth); load-only, the persistent kernel within +-5% of the same kernel launched once a phase at every
tile (best 84.5 us one launch a phase, 87.1 persistent: 79%). The boundaries cost little under PDL; what a
one-step-ahead register pipeline streams is the bound, and the op is within ~10% of it. No gain to chase here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from export.kernels.pdl import pdl_wait

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
GROUP = 128
EPS = 1e-6
SPIN = 1 << 22  # barrier polls before a program gives up (and flags an error)
# (hidden, the o projection's K, intermediate): the 31B's sliding layer, and tiny ones for the interpreter (the
# intermediate no whole number of steps at 2 groups a step: ragged steps)
SHAPES = {"31b": (5376, 8192, 21504), "tiny": (256, 512, 384)}


@triton.jit
def _tile_at(w_ptr, s_ptr, u, t, N, KW, stride_sn, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Step t of unit u (rows u * BLOCK_N ...; words t * GROUPS * 16 ...): words [BLOCK_N, GROUPS, 16]
    and scales [BLOCK_N, GROUPS, 1]; nothing read past K (the scales 0 there and past N, where rows are clamped:
    no masked word load on the rows)."""
    WD: tl.constexpr = 16  # int32 words of nibbles a group (of 128)
    offs_n = u * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None, None]
    g0 = t * (GROUPS * WD) + tl.arange(0, GROUPS)[None, :, None] * WD
    ok = g0 < KW
    w = tl.load(w_ptr + rn * KW + g0 + tl.arange(0, WD)[None, None, :], mask=ok, other=0)
    s = tl.load(s_ptr + rn * stride_sn + g0 // WD, mask=ok & n_ok, other=0.0)
    return w, s


@triton.jit
def _phase(w_ptr, s_ptr, y_ptr, xw, uw, inv, w0, s0, N, KW, stride_sn, pid, P, GLU: tl.constexpr,
           NORM: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, ASM: tl.constexpr,
           LOADONLY: tl.constexpr):
    """One phase's units u = pid, pid + P, ...: y[rows of u] = the rows' dot with x (bf16 pairs at xw; GLU /
    NORM as `_gemv1_tile`), (w0, s0) the first unit's first step, loaded by the caller. Each step loads the
    next one (the next unit's first after a unit's last), so a program's loads never stop between its units.
    LOADONLY: the same loads (words, scales, x's words), one convert and FMA a word in place of the nibble
    arithmetic (not the product): what the access pattern and the barriers allow."""
    WD: tl.constexpr = 16
    steps = tl.cdiv(KW, GROUPS * WD)
    units = tl.cdiv(N, BLOCK_N)
    lane = tl.arange(0, WD)[None, None, :]
    col = tl.arange(0, GROUPS)[None, :, None] * WD
    for u in range(pid, units, P):
        acc = tl.zeros((BLOCK_N, GROUPS, WD), dtype=tl.float32)
        for t in range(0, steps):
            last = t + 1 == steps  # then the next unit's first step, or none (a step past K: nothing read)
            nu = tl.where(last & (u + P < units), u + P, u)
            nt = tl.where(last, tl.where(u + P < units, 0, steps), t + 1)
            wn, sn = _tile_at(w_ptr, s_ptr, nu, nt, N, KW, stride_sn, BLOCK_N, GROUPS)
            g0 = t * (GROUPS * WD) + col
            if LOADONLY:
                xv = tl.load(xw + g0 + lane, mask=g0 < KW, other=0)
                acc += w0.to(tl.float32) * s0.to(tl.float32) + xv.to(tl.float32) * inv
            else:
                acc += im._gemv1_tile(w0, s0, xw, uw, g0, lane, g0 < KW, ASM, GLU, NORM, inv)
            w0, s0 = wn, sn
        offs_n = u * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + offs_n, tl.sum(tl.sum(acc, axis=2), axis=1).to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _arrive_and_wait(bar_ptr, err_ptr, P, SPIN_: tl.constexpr):
    """A grid-wide barrier on the counter at bar_ptr: this program's stores released (a CTA barrier, then one
    gpu-scope acq_rel atomic), then polls (acquire) until P programs arrived, at most SPIN_ times (then
    err_ptr[0] is set: the grid was not co-resident)."""
    tl.debug_barrier()
    v = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu") + 1
    i = 0
    while (v < P) & (i < SPIN_):
        v = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        i += 1
    if v < P:
        tl.store(err_ptr, 1)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["NO", "KWO", "NGU", "KWGU", "ND", "KWD", "sso", "ssgu", "ssd"])
def _chain_kernel(x_ptr, wo_ptr, so_ptr, yo_ptr, wn_ptr, wgu_ptr, sgu_ptr, ygu_ptr, wd_ptr, sd_ptr, yd_ptr,
                  bar_ptr, err_ptr, NO, KWO, NGU, KWGU, ND, KWD, sso, ssgu, ssd, eps,
                  FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                  NORM_STEPS: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, SPIN_: tl.constexpr,
                  LOADONLY: tl.constexpr = 0):
    """Phases FIRST..LAST of the chain (see the module's docstring): 0 yo = x Wo^T; 1 ygu = (rms_norm(yo) wn)
    Wgu^T; 2 yd = (gelu_tanh(gate) up) Wd^T, gate / up ygu's halves. Between two phases of one launch a
    grid-wide barrier (`_arrive_and_wait`) after which the next phase's first step is already loaded. PDL:
    the first step loads before the wait, every read of x and every write after it."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    if FIRST == 0:
        w0, s0 = _tile_at(wo_ptr, so_ptr, pid, 0, NO, KWO, sso, BLOCK_N, GROUPS)
    elif FIRST == 1:
        w0, s0 = _tile_at(wgu_ptr, sgu_ptr, pid, 0, NGU, KWGU, ssgu, BLOCK_N, GROUPS)
    else:
        w0, s0 = _tile_at(wd_ptr, sd_ptr, pid, 0, ND, KWD, ssd, BLOCK_N, GROUPS)
    z = pdl_wait(PDL, ASM)
    x_ptr, yo_ptr, ygu_ptr, yd_ptr, bar_ptr, err_ptr = x_ptr + z, yo_ptr + z, ygu_ptr + z, yd_ptr + z, \
        bar_ptr + z, err_ptr + z
    if FIRST == 0:
        _phase(wo_ptr, so_ptr, yo_ptr, x_ptr.to(tl.pointer_type(tl.int32)), x_ptr.to(tl.pointer_type(tl.int32)),
               1.0, w0, s0, NO, KWO, sso, pid, P, 0, 0, BLOCK_N, GROUPS, ASM, LOADONLY)
        if LAST >= 1:
            w0, s0 = _tile_at(wgu_ptr, sgu_ptr, pid, 0, NGU, KWGU, ssgu, BLOCK_N, GROUPS)
            _arrive_and_wait(bar_ptr, err_ptr, P, SPIN_)
    if FIRST <= 1 and LAST >= 1:
        yw = yo_ptr.to(tl.pointer_type(tl.int32))
        inv = im._inv_rms(yw, KWGU * 8, eps, 1, NORM_STEPS)
        _phase(wgu_ptr, sgu_ptr, ygu_ptr, yw, wn_ptr.to(tl.pointer_type(tl.int32)), inv, w0, s0, NGU, KWGU, ssgu,
               pid, P, 0, 1, BLOCK_N, GROUPS, ASM, LOADONLY)
        if LAST >= 2:
            w0, s0 = _tile_at(wd_ptr, sd_ptr, pid, 0, ND, KWD, ssd, BLOCK_N, GROUPS)
            _arrive_and_wait(bar_ptr + 1, err_ptr, P, SPIN_)
    if LAST >= 2:
        gw = ygu_ptr.to(tl.pointer_type(tl.int32))
        _phase(wd_ptr, sd_ptr, yd_ptr, gw, gw + KWD * 4, 1.0, w0, s0, ND, KWD, ssd, pid, P, 1, 0, BLOCK_N,
               GROUPS, ASM, LOADONLY)
    if FIRST < LAST:  # the last program out resets the barriers' counters for the next launch
        tl.debug_barrier()
        out = tl.atomic_add(bar_ptr + 2, 1, sem="acq_rel", scope="gpu")
        if out == P - 1:
            tl.store(bar_ptr, 0)
            tl.store(bar_ptr + 1, 0)
            tl.store(bar_ptr + 2, 0)


@dataclass
class Weights:
    wo: tuple
    wgu: tuple
    wd: tuple


def make_weights(shape: tuple, device=DEVICE) -> tuple[Weights, dict]:
    """One set of the chain's int4 weights (group 128) and their fp32 dequantized forms."""
    h, ko, inter = shape
    sets = {}
    for name, (n, k) in (("wo", (h, ko)), ("wgu", (2 * inter, h)), ("wd", (h, inter))):
        sets[name] = im.quantize_int4(torch.randn(n, k, device=device), GROUP)
    ref = {k: im.dequantize_int4(*v, torch.float32) for k, v in sets.items()}
    return Weights(**sets), ref


def chain_bytes(w: Weights) -> int:
    """The chain's weight bytes (packed nibbles and scales), what the floor is taken on."""
    return sum(im.int4_bytes(q.shape[0], q.shape[1] * 2, GROUP) for q, _ in (w.wo, w.wgu, w.wd))


def reference(x: torch.Tensor, wn: torch.Tensor, ref: dict) -> torch.Tensor:
    """The chain in fp32 on the dequantized weights, rounded to bf16 where the model's ops round (each
    projection's output, the norm's, the activation's)."""
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    yo = bf(x.float() @ ref["wo"].t())
    xn = bf(yo * torch.rsqrt(yo.pow(2).mean(-1, keepdim=True) + EPS) * wn.float())
    ygu = bf(xn @ ref["wgu"].t())
    g, u = ygu.chunk(2, dim=-1)
    act = bf(torch.nn.functional.gelu(g, approximate="tanh") * u)
    return act @ ref["wd"].t()


class Op:
    """The op's M == 1 path per projection (`gemv1_plan`), the norm and the activation in the quantize kernels."""

    def __init__(self, pdl: int = 0):
        self.pdl = pdl
        self.label = "op_pdl" if pdl else "op"

    def _lin(self, x2, w, **kw):
        q, s = w
        p = im.gemv1_plan(q.shape[0], q.shape[1] * 2, GROUP)
        return im.int4_gemv1(x2, q, s, p.splits, kernel=im._gemv1_kernel(p.cfg), xq=p.xq, levels=p.levels,
                             pdl_quant=self.pdl, pdl_gemv=self.pdl, pdl_attr=True, **kw)

    def __call__(self, x, wn, w: Weights, poison=False):
        yo = self._lin(x, w.wo)
        ygu = self._lin(yo, w.wgu, norm=(wn, EPS))
        half = ygu.shape[1] // 2
        return self._lin(ygu[:, :half], w.wd, up=ygu[:, half:])


@dataclass(frozen=True)
class Chain:
    """`_chain_kernel` at a tile (BLOCK_N rows x GROUPS groups a step, WARPS warps) on P programs: the whole
    chain in one launch (persist) or a launch a phase (sep, with the PDL attribute on sm_90+)."""

    block_n: int
    groups: int
    warps: int
    programs: int
    persist: bool
    loadonly: bool = False

    @property
    def label(self) -> str:
        return (f"{'persist' if self.persist else 'sep'}{self.block_n}r{self.groups}g{self.warps}w/{self.programs}"
                + ("/load" if self.loadonly else ""))

    def buffers(self, x, w: Weights):
        h, inter = w.wo[0].shape[0], w.wd[0].shape[1] * 2
        key = (h, inter, x.device)
        if key not in _BUFFERS:
            _BUFFERS[key] = (torch.empty((1, h), dtype=x.dtype, device=x.device),
                             torch.empty((1, 2 * inter), dtype=x.dtype, device=x.device),
                             torch.zeros(4, dtype=torch.int32, device=x.device),
                             torch.zeros(1, dtype=torch.int32, device=x.device))
        return _BUFFERS[key]

    def launch(self, x, wn, w: Weights, yd, first: int, last: int, pdl: int, programs: int | None = None):
        yo, ygu, bar, err = self.buffers(x, w)
        (qo, so), (qgu, sgu), (qd, sd) = w.wo, w.wgu, w.wd
        h = qo.shape[0]
        kw = dict(FIRST=first, LAST=last, BLOCK_N=self.block_n, GROUPS=self.groups,
                  NORM_STEPS=im.norm_steps(h // 2), PDL=pdl, ASM=not _INTERPRET, SPIN_=SPIN,
                  LOADONLY=int(self.loadonly), num_warps=self.warps)
        if pdl:
            kw["launch_pdl"] = True
        return _chain_kernel[(programs or self.programs,)](
            x, qo.view(torch.int32), so, yo, wn, qgu.view(torch.int32), sgu, ygu, qd.view(torch.int32), sd, yd,
            bar, err, h, qo.shape[1] // 4, qgu.shape[0], qgu.shape[1] // 4, qd.shape[0], qd.shape[1] // 4,
            so.stride(0), sgu.stride(0), sd.stride(0), EPS, **kw)

    def __call__(self, x, wn, w: Weights, poison=False):
        yd = torch.empty((1, w.wd[0].shape[0]), dtype=x.dtype, device=x.device)
        if poison:
            yd.fill_(float("nan"))
            for b in self.buffers(x, w)[:2]:
                b.fill_(float("nan"))
        pdl = 0 if _INTERPRET or torch.cuda.get_device_capability()[0] < 9 else 2
        if self.persist:
            self.launch(x, wn, w, yd, 0, 2, pdl)
        else:
            for p in range(3):
                self.launch(x, wn, w, yd, p, p, pdl)
        return yd


_BUFFERS: dict = {}


def resident_programs(c: Chain, x, wn, w: Weights) -> int:
    """How many programs of c's compiled kernel (its launch as c runs it, on one program: compiled, and its
    barriers pass at once) an SM holds (registers, shared memory, warps), times the SMs."""
    if _INTERPRET:
        return 1
    k = compile_on_one_program(c, x, wn, w)
    props = torch.cuda.get_device_properties(0)
    regs = max(1, k.n_regs) * 32
    regs = (regs + 255) // 256 * 256 * c.warps  # per warp in units of 256
    by_regs = props.regs_per_multiprocessor // regs
    smem = k.metadata.shared
    by_smem = props.shared_memory_per_multiprocessor // smem if smem else 32
    by_warps = props.max_threads_per_multi_processor // (32 * c.warps)
    return min(by_regs, by_smem, by_warps, 32) * props.multi_processor_count


def compile_on_one_program(c: Chain, x, wn, w: Weights):
    """c's launches (each phase's, or the whole chain's) run once on one program: compiled, and a barrier passes
    at once there (one program is the whole grid), whatever else shares the GPU. -> the last compiled kernel."""
    yd = torch.empty((1, w.wd[0].shape[0]), dtype=x.dtype, device=x.device)
    pdl = 0 if _INTERPRET or torch.cuda.get_device_capability()[0] < 9 else 2
    for first, last in ([(0, 2)] if c.persist else [(0, 0), (1, 1), (2, 2)]):
        k = c.launch(x, wn, w, yd, first, last, pdl, programs=1)
    torch.cuda.synchronize()
    return k


def _prewarm_worker(idx, count):
    """Compiles its share of the chain variants (Triton's disk cache) in one of `count` processes."""
    from scripts.gemv1_variants import launch_directly
    launch_directly("prewarm")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w, _ = make_weights(SHAPES["31b"])
    h = SHAPES["31b"][0]
    x = torch.randn(1, SHAPES["31b"][1], device=DEVICE, dtype=torch.bfloat16)
    wn = torch.ones(h, device=DEVICE, dtype=torch.bfloat16)
    seen = set()
    todo = []
    for v in variants(sms):
        if isinstance(v, Chain) and (v.block_n, v.groups, v.warps, v.persist, v.loadonly) not in seen:
            seen.add((v.block_n, v.groups, v.warps, v.persist, v.loadonly))
            todo.append(v)
    for v in todo[idx::count]:
        try:
            compile_on_one_program(v, x, wn, w)
        except Exception:
            pass


def variants(sms: int) -> list:
    """The op twice (PDL off / on), then the chain kernel one launch a phase and persistent at each tile and
    programs an SM, with the product and load-only. (H100, the first run: with the product every tile ran at
    12-32% of the copy bandwidth, against the op's 72%: `_gemv1_tile`'s bf16-x arithmetic on few rows a tile
    costs more than the loads, so the load-only kernels are what says whether the barriers pay.)"""
    out = [Op(0), Op(2)] if not _INTERPRET else [Op(0)]
    tiles = [(16, 8, 4), (32, 4, 4), (32, 8, 4), (64, 4, 4), (32, 8, 8)] if not _INTERPRET else [(8, 2, 2)]
    for loadonly in ((False, True) if not _INTERPRET else (False,)):
        for bn, g, wp in tiles[:2] if not loadonly else tiles:
            for per_sm in ((1, 2, 3, 4) if not _INTERPRET else (1,)):
                p = per_sm * sms
                out.append(Chain(bn, g, wp, p, False, loadonly))
                out.append(Chain(bn, g, wp, p, True, loadonly))
    return out


def bench(fn, reps: int = 20) -> float:
    from scripts.gemv1_variants import bench_graph
    return bench_graph(fn, 1, reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("chain_variants.json"))
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; variants left when it runs out are skipped")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timing rounds")
    ap.add_argument("--sets", type=int, default=2, help="weight sets the timed graph rotates through")
    ap.add_argument("--prewarm", type=int, default=8, help="processes compiling the variants first (0: none)")
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    a = ap.parse_args(argv)
    from scripts.gemv1_variants import launch_directly, main_in_interpreter, rel
    if a.interpret and not _INTERPRET:
        return main_in_interpreter("scripts.chain_variants",
                                   [v for v in (argv if argv is not None else sys.argv[1:]) if v != "--interpret"])
    if not launch_directly("chain_variants"):
        return 2
    t0 = time.time()
    if a.prewarm and not _INTERPRET:
        from scripts.gemv1_variants import spawn_prewarm
        spawn_prewarm(_prewarm_worker, a.prewarm, 150)
    torch.manual_seed(0)
    shape = SHAPES["tiny" if _INTERPRET else "31b"]
    sms = 1 if _INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    if _INTERPRET:
        gbps, dev = 1000.0, "cpu (interpreter)"
    else:
        from scripts.bench_int4 import copy_gbps
        gbps, dev = copy_gbps(), torch.cuda.get_device_name()
    sets = [make_weights(shape) for _ in range(1 if _INTERPRET else a.sets)]
    ws = [s[0] for s in sets]
    floor = chain_bytes(ws[0]) / gbps / 1e3
    doc = {"device": dev, "copy_gbps": gbps, "shape": shape, "floor_us": floor, "bytes": chain_bytes(ws[0]),
           "rows": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    print(f"copy {gbps:.0f} GB/s ({dev}); chain {doc['bytes'] / 1e6:.1f} MB, floor {floor:.1f} us", flush=True)
    ok = True
    timed = []
    for v in variants(sms):
        if time.time() - t0 > a.budget:
            print(f"budget spent: {v.label} and after skipped", flush=True)
            break
        row = {"variant": v.label}
        try:
            x = torch.randn(1, shape[1], device=DEVICE, dtype=torch.bfloat16)
            if isinstance(v, Chain):
                fit = resident_programs(v, x, torch.ones(shape[0], device=DEVICE, dtype=torch.bfloat16), ws[0])
                row["resident"] = fit
                if v.persist and v.programs > fit:
                    print(f"  {v.label}: {fit} programs resident at most, skipped", flush=True)
                    continue
            err = 0.0
            for _ in range(2):  # fresh x and norm weight each try; outputs poisoned first
                x = torch.randn(1, shape[1], device=DEVICE, dtype=torch.bfloat16)
                wn = (1.0 + 0.5 * torch.rand(shape[0], device=DEVICE)).to(torch.bfloat16)
                if not _INTERPRET:  # the allocator's free blocks NaN: what the op's own outputs reuse
                    torch.full((1 << 24,), float("nan"), device=DEVICE)
                y = v(x, wn, ws[0], poison=True)
                err = max(err, rel(y, reference(x, wn, sets[0][1])))
            stuck = False
            if isinstance(v, Chain):
                _, _, bar, flag = v.buffers(x, ws[0])
                stuck = bool(int(flag.item()))
                if stuck:
                    flag.zero_()
                    bar.zero_()  # the counters a timed-out barrier left
                    print(f"  {v.label}: the barrier timed out (not co-resident)", flush=True)
            if getattr(v, "loadonly", False):  # no product to check: only the barrier
                row["barrier_ok"] = not stuck
                if not stuck:
                    timed.append((v, x, wn))
            else:
                row["rel_err"] = float("nan") if stuck else err
                if stuck or not err <= 2e-2:
                    ok = False
                    print(f"  {v.label}: rel err {err:.2e} > 2e-2", flush=True)
                else:
                    timed.append((v, x, wn))
        except Exception as e:  # a variant that fails to compile or run is reported, not fatal
            print(f"  {v.label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        doc["rows"].append(row)
    rows = {r["variant"]: r for r in doc["rows"]}
    for _ in range(a.rounds):  # alternated rounds: every variant timed once per round
        for v, x, wn in timed:
            us = bench(lambda v=v, x=x, wn=wn: [v(x, wn, w) for w in ws]) / len(ws)
            rows[v.label].setdefault("us_rounds", []).append(us)
    for r in doc["rows"]:
        if r.get("us_rounds"):
            r["us"] = min(r["us_rounds"])
            r["fraction_of_copy_bw"] = floor / r["us"]
    print(f"{'variant':28} {'resident':>8} {'rel err':>8} {'us':>8} {'of copy':>7}", flush=True)
    for r in doc["rows"]:
        us = r.get("us", float("nan"))
        print(f"{r['variant']:28} {r.get('resident', ''):>8} {r.get('rel_err', float('nan')):8.2e} {us:8.1f} "
              f"{floor / us:7.1%}", flush=True)
    doc["checks_passed"] = ok
    save()
    print(f"checks {'passed' if ok else 'FAILED'}; done in {time.time() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
