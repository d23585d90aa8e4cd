"""Load-only sweep of the M == 1 int4 GEMV's access pattern: today's row-major words against a
tile-contiguous layout, at several tile widths and depths of loads in flight (a tuning tool).

    python -m scripts.gemv1_layout_variants [--out gemv1_layout_variants.json] [--budget 95] [--prewarm 14]
    python -m scripts.gemv1_layout_variants --smoke [--out smoke.json]   # CPU: Triton's interpreter, tiny shapes
    python -m scripts.gemv1_layout_variants --count [--out counts.json]  # offline: compile for sm_90, registers

Why: the M == 1 GEMVs are ~73% of a 31B decode step, and on the H200 the mid shapes (5376 to 18432
rows) run at 42-58% of the copy bandwidth. The same grid and tile with the loads alone reached only
61-71% (scripts/gemv1_tile_variants.py, gemv1_grid_variants.py) where a plain streaming read of the
same bytes reaches 84-90%: the access pattern, not the arithmetic, holds them back. Today the packed
weight is row-major (uint8 [N, K / 2], read as int32 words [N, KW], KW = K / 8): a step of a program
reads, for each of BLOCK_N rows, STEP_W words (64-256 bytes) ~K / 2 bytes apart from the next row's,
one step loaded ahead. Two hypotheses:
 (a) layout: stored tile-contiguous (`tile_words`: [N / BLOCK_N, KW / STEP_W, BLOCK_N, STEP_W], the
     words of one step for all the block's rows in one run of BLOCK_N * STEP_W * 4 bytes), every step
     is one contiguous block and the loads reach the streaming read's bandwidth;
 (b) depth: what is missing is bytes in flight per SM (more steps loaded ahead, or wider steps),
     whatever the layout.
What each outcome would mean:
- tiled >= ~80% of the copy bandwidth where rows stays ~65%: (a). Re-lay the GEMV's weights (pack
  them tiled at export, one layout per (BLOCK_N, STEP_W) the plan uses) and port the GEMV to it.
- rows and tiled both low at one step ahead and both rising with AHEAD or STEP_W: (b). Keep the
  layout; give the GEMV more loads in flight (deeper register queue, wider steps, fewer rows a
  thread to pay for the registers) or another load path (cp.async / TMA bulk copies).
- both high (near the streaming read) at some (AHEAD, STEP_W) the GEMV does not use: the same as
  (b), that variant is the one to port.
- both low and flat in AHEAD and STEP_W while the streaming read is high: neither; look at the grid
  (programs per SM, the ramp and tail of short programs: the splits column) instead.

The kernel (`_load_only_kernel`): per program BLOCK_N rows x one K slice (whole steps), each step's
words [BLOCK_N, STEP_W] int32 and its scales [BLOCK_N, STEP_W / 16] (one bf16 per row and group of
128, read as int16, in the words' layout: [N, K / 128] for rows, tiled alongside for tiled),
AHEAD steps (1-3) loaded ahead in registers; no dequant, no dot: the words are summed (int32,
wrapping) into a lane accumulator [BLOCK_N, STEP_W / 4] as the GEMV sums its dp4a lanes, the
scales into one of their own, and the program writes one int32 per row (out[slice, row]), so no
load is dead code. A sum, not a xor: a word read twice or not at all changes it. Loads past the
slice's last step are masked by a uniform predicate (no traffic); the rows layout masks rows past
N and words past K only where N or K leaves a partial tile (MASK); the tiled layout is padded
with zeros to whole tiles and never masks.
Offline (`--count`, scripts/measurements/gemv1_layout_counts_sm90.json): every kernel's loop loads its
words 16 bytes a thread (LDG.E.128, rows layout with MASK too); 128 rows x 64 words x 3 ahead at 4 warps
is the only one at the register limit (rows 253 + 80 bytes of stack, tiled 254), so a depth result
there is a spill result too (the JSON rows carry regs and spills).
Knobs: layout {rows, tiled} x BLOCK_N {64, 128} x STEP_W {16, 32, 64} words (1, 2, 4 groups) x
AHEAD {1, 2, 3} x num_warps {4, 8} x K slices {plan / 2, plan, 2 plan} (plan: `gemv1_plan`'s, a
slice is ceil(steps / slices) whole steps, so the slices run counts the ones left non-empty).

Per shape (the 31B's seven M == 1 shapes, `bench_int4.linear_shapes`, group 128; the mid shapes
first, the lm_head last) on fresh random words and scales: every variant checked against torch's
sum of the same words per row and slice (exact integers mod 2^32; output filled with 0xDEADBEEF
first), then timed with triton.testing.do_bench (median; it clears the L2 before each call, so
the weights come from HBM); a streaming read of the same words (`gemv1_variants._stream_read_kernel`,
two configs, the faster) timed the same way; the copy bandwidth (`bench_int4.copy_gbps`) measured
in the same run. Before the shapes every kernel is checked on a ragged shape (N 1000, K 35
groups: no tile divides either) at 1, 3 and 8 slices. Fractions count the unpadded bytes (words +
scales): the tiled layout's padding is a cost it pays (`padding_bytes`; on the 31B shapes only
K 5376 at STEP_W 64 pads: 672 -> 704 words a row, +4.8%). A table (per shape: the load-only
kernel at today's tile and plan, the best rows variant, the best tiled one, the streaming read;
then the best of each layout per AHEAD and per STEP_W), one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (_stream_read_kernel, finish_sweep, launch_directly, main_in_interpreter,
                                    sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
GROUP = 128
POISON = -559038737  # 0xDEADBEEF as int32


# ---- the tiled layout (pure torch) ------------------------------------------------------------


def tile_words(qweight_words: torch.Tensor, block_n: int, step_w: int) -> torch.Tensor:
    """[N, KW] (int32 words, or any 2-D tensor: the scales with step_w / 16 columns a step) ->
    [ceil(N / block_n), ceil(KW / step_w), block_n, step_w], contiguous: tile (b, t) holds rows
    b * block_n .. and columns t * step_w .. as one run. N and KW are padded with zeros to whole
    tiles (`padding_bytes`)."""
    n, kw = qweight_words.shape
    n_pad, kw_pad = triton.cdiv(n, block_n) * block_n, triton.cdiv(kw, step_w) * step_w
    p = F.pad(qweight_words, (0, kw_pad - kw, 0, n_pad - n))
    return p.view(n_pad // block_n, block_n, kw_pad // step_w, step_w).permute(0, 2, 1, 3).contiguous()


def untile_words(tiled: torch.Tensor, n: int, kw: int) -> torch.Tensor:
    """The inverse of `tile_words`: [B, T, block_n, step_w] -> [n, kw] (the padding dropped)."""
    b, t, block_n, step_w = tiled.shape
    return tiled.permute(0, 2, 1, 3).reshape(b * block_n, t * step_w)[:n, :kw].contiguous()


def padding_bytes(n: int, k: int, block_n: int, step_w: int, group: int = GROUP) -> int:
    """Bytes the tiled layout adds to an [n, k] int4 weight (words and bf16 scales padded to whole
    tiles): (rows padded x words padded - n x KW) x 4 + the same for the scales x 2."""
    kw, per = k // 8, group // 8
    n_pad, kw_pad = triton.cdiv(n, block_n) * block_n, triton.cdiv(kw, step_w) * step_w
    return (n_pad * kw_pad - n * kw) * 4 + (n_pad * kw_pad // per - n * (kw // per)) * 2


# ---- the kernel -------------------------------------------------------------------------------


@triton.jit
def _load_step(wbase, sbase, t, hi, offs_n, N, KW, WSTEP: tl.constexpr, SSTEP: tl.constexpr, STEP_W: tl.constexpr,
               SG: tl.constexpr, WORDS: tl.constexpr, MASK: tl.constexpr):
    """Step t's words [BLOCK_N, STEP_W] and scales [BLOCK_N, SG] (0 past the slice: t >= hi, and,
    with MASK, past N or K). K's mask is per group (KW is a multiple of WORDS): constant over a
    group's words, so the loads stay 16 bytes wide."""
    ok = t < hi
    if MASK:
        rows_ok = (offs_n < N)[:, None]
        kg = KW // WORDS
        wm = ok & rows_ok & ((t * SG + tl.arange(0, STEP_W) // WORDS) < kg)[None, :]
        sm = ok & rows_ok & ((t * SG + tl.arange(0, SG)) < kg)[None, :]
    else:
        wm = ok
        sm = ok
    w = tl.load(wbase + t * WSTEP, mask=wm, other=0)
    s = tl.load(sbase + t * SSTEP, mask=sm, other=0)
    return w, s


@triton.jit(do_not_specialize=["N", "KW", "NSTEPS", "SPS", "stride_sn", "stride_on"])
def _load_only_kernel(w_ptr, s_ptr, out_ptr, N, KW, NSTEPS, SPS, stride_ww, stride_sn, stride_on,
                      TILED: tl.constexpr, BLOCK_N: tl.constexpr, STEP_W: tl.constexpr, AHEAD: tl.constexpr,
                      MASK: tl.constexpr, GROUP: tl.constexpr):
    """out[slice, n] = the int32 sum (wrapping) of the words and the scales' 16-bit patterns that
    row n's program reads in its slice: steps SPS * slice .. of STEP_W words, AHEAD loaded ahead.
    TILED: w_ptr / s_ptr are `tile_words`'s [N / BLOCK_N, NSTEPS, BLOCK_N, STEP_W (/ 16)] (a
    step is one contiguous run); else [N, KW] words / [N, KW / 16] scales, row strides stride_ww
    / stride_sn."""
    WORDS: tl.constexpr = GROUP // 8  # words per group
    SG: tl.constexpr = STEP_W // WORDS  # groups (scales) per row a step
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    lo = pid_k * SPS
    hi = tl.minimum(lo + SPS, NSTEPS)
    r = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + r
    c = tl.arange(0, STEP_W)[None, :]
    cs = tl.arange(0, SG)[None, :]
    if TILED:
        tile0 = pid_n.to(tl.int64) * NSTEPS
        wbase = w_ptr + tile0 * (BLOCK_N * STEP_W) + r[:, None] * STEP_W + c
        sbase = s_ptr + tile0 * (BLOCK_N * SG) + r[:, None] * SG + cs
        WSTEP: tl.constexpr = BLOCK_N * STEP_W
        SSTEP: tl.constexpr = BLOCK_N * SG
    else:
        rn = offs_n.to(tl.int64)[:, None]
        wbase = w_ptr + rn * stride_ww + c
        sbase = s_ptr + rn * stride_sn + cs
        WSTEP: tl.constexpr = STEP_W
        SSTEP: tl.constexpr = SG
    w0, s0 = _load_step(wbase, sbase, lo, hi, offs_n, N, KW, WSTEP, SSTEP, STEP_W, SG, WORDS, MASK)
    w1, s1 = w0, s0
    w2, s2 = w0, s0
    if AHEAD >= 2:
        w1, s1 = _load_step(wbase, sbase, lo + 1, hi, offs_n, N, KW, WSTEP, SSTEP, STEP_W, SG, WORDS, MASK)
    if AHEAD >= 3:
        w2, s2 = _load_step(wbase, sbase, lo + 2, hi, offs_n, N, KW, WSTEP, SSTEP, STEP_W, SG, WORDS, MASK)
    acc = tl.zeros((BLOCK_N, STEP_W // 4), dtype=tl.int32)  # a lane's 4 words, as the GEMV's dp4a lanes
    sacc = tl.zeros((BLOCK_N, SG), dtype=tl.int32)
    for t in range(lo, hi):
        wn, sn = _load_step(wbase, sbase, t + AHEAD, hi, offs_n, N, KW, WSTEP, SSTEP, STEP_W, SG, WORDS, MASK)
        acc += tl.sum(tl.reshape(w0, (BLOCK_N, STEP_W // 4, 4)), axis=2)
        sacc += s0.to(tl.int32) & 0xFFFF
        w0, s0, w1, s1, w2, s2 = im._gemv1_ahead(w0, s0, w1, s1, w2, s2, wn, sn, AHEAD)
    val = tl.sum(acc, axis=1) + tl.sum(sacc, axis=1)
    tl.store(out_ptr + pid_k * stride_on + offs_n, val, mask=offs_n < N)


@dataclass(frozen=True)
class Variant:
    """One compile of `_load_only_kernel` (the K slices are a launch argument)."""

    layout: str  # "rows" (today's [N, KW]) or "tiled" (`tile_words`)
    block_n: int
    step_w: int  # words per row a step (16 a group at group 128)
    ahead: int
    warps: int

    @property
    def label(self) -> str:
        return f"{self.layout[0]}{self.block_n}s{self.step_w}a{self.ahead}w{self.warps}"


def variants(smoke: bool = False) -> list[Variant]:
    """The sweep's kernels (smoke: 16-row tiles, one warp: the interpreter's tiny shapes)."""
    bns, warps = ((16,), (1,)) if smoke else ((64, 128), (4, 8))
    return [Variant(lay, bn, sw, a, w) for lay in ("rows", "tiled") for bn in bns for sw in (16, 32, 64)
            for a in (1, 2, 3) for w in warps]


class Weight:
    """One [n, k] int4 weight as fresh random words and scales, in both layouts (tiled copies made
    on demand per (block_n, step_w)), and torch's reference sums per (step_w, slices)."""

    def __init__(self, n: int, k: int, device=DEVICE):
        self.n, self.k, self.kw = n, k, k // 8
        self.words = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device).view(torch.int32)
        self.scales = torch.randint(0, 256, (n, k // GROUP * 2), dtype=torch.uint8, device=device).view(torch.int16)
        self._tiled: dict = {}
        self._refs: dict = {}

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scales.numel() * 2

    def tiled(self, block_n: int, step_w: int):
        key = (block_n, step_w)
        if key not in self._tiled:
            self._tiled[key] = (tile_words(self.words, block_n, step_w),
                                tile_words(self.scales, block_n, step_w // (GROUP // 8)))
        return self._tiled[key]

    def slices(self, step_w: int, splits: int) -> tuple[int, int, int]:
        """(steps a row, steps a slice, slices that are not empty) for `splits` K slices."""
        nsteps = triton.cdiv(self.kw, step_w)
        sps = triton.cdiv(nsteps, splits)
        return nsteps, sps, triton.cdiv(nsteps, sps)

    def ref(self, step_w: int, splits: int) -> torch.Tensor:
        """int32 [slices, n]: each row's sum over a slice's words and scales, mod 2^32, in torch."""
        nsteps, sps, sl = self.slices(step_w, splits)
        if (step_w, sl) not in self._refs:
            span, per = sps * step_w, GROUP // 8
            w = F.pad(self.words.long(), (0, sl * span - self.kw)).view(self.n, sl, span).sum(-1)
            s = F.pad(self.scales.long() & 0xFFFF, (0, sl * span // per - self.kw // per))
            tot = w + s.view(self.n, sl, span // per).sum(-1)
            self._refs[(step_w, sl)] = (torch.remainder(tot + 2**31, 2**32) - 2**31).to(torch.int32).t().contiguous()
        return self._refs[(step_w, sl)]

    def launch(self, v: Variant, splits: int, out: torch.Tensor):
        """`_load_only_kernel` for v over `splits` K slices into out [slices, n]; the compiled kernel."""
        nsteps, sps, sl = self.slices(v.step_w, splits)
        if v.layout == "tiled":
            w, s = self.tiled(v.block_n, v.step_w)
            mask = False
        else:
            w, s = self.words, self.scales
            mask = bool(self.n % v.block_n or self.kw % v.step_w)
        return _load_only_kernel[(triton.cdiv(self.n, v.block_n), sl)](
            w, s, out, self.n, self.kw, nsteps, sps, self.words.stride(0), self.scales.stride(0), out.stride(0),
            TILED=v.layout == "tiled", BLOCK_N=v.block_n, STEP_W=v.step_w, AHEAD=v.ahead, MASK=mask, GROUP=GROUP,
            num_warps=v.warps, num_stages=1)

    def check(self, v: Variant, splits: int) -> bool:
        """v's sums equal torch's, the output poisoned first."""
        sl = self.slices(v.step_w, splits)[2]
        out = torch.full((sl, self.n), POISON, dtype=torch.int32, device=self.words.device)
        self.launch(v, splits, out)
        return torch.equal(out, self.ref(v.step_w, splits))


def bench_us(fn) -> float:
    """Median us of fn (triton.testing.do_bench: the L2 cleared before each call); one timed call
    in the interpreter (a dry run of the logic)."""
    if _INTERPRET:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench
    return do_bench(fn, warmup=2, rep=10, return_mode="median") * 1e3


STREAM_CONFIGS = ((1 << 14, 2048, 8), (1 << 14, 1024, 4))  # (words a program, words a step, warps)


def stream_read_us(words: torch.Tensor) -> tuple[float, tuple]:
    """A plain streaming read of the words (`_stream_read_kernel`), the faster of STREAM_CONFIGS."""
    flat = words.view(-1)
    best = (float("inf"), None)
    for chunk, block, warps in STREAM_CONFIGS:
        if _INTERPRET:
            chunk, block = 1024, 256
        sink = torch.empty(triton.cdiv(flat.numel(), chunk), dtype=torch.int32, device=flat.device)
        us = bench_us(lambda: _stream_read_kernel[(triton.cdiv(flat.numel(), chunk),)](
            flat, sink, flat.numel(), CHUNK=chunk, BLOCK=block, num_warps=warps))
        best = min(best, (us, (chunk, block, warps)), key=lambda b: b[0])
    return best


def split_set(n: int, k: int) -> list[int]:
    """K slices tried: `gemv1_plan`'s, half and twice that."""
    p = im.gemv1_plan(n, k, GROUP)[1]
    return sorted({max(1, p // 2), p, 2 * p})


def shapes_31b() -> list[tuple[str, int, int]]:
    """(name, N, K) of the 31B's M == 1 shapes (bench_int4), the mid shapes first, the largest last."""
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes
    return sorted(((names, n, k) for (n, k), (names, _) in linear_shapes(PRESETS["31b"]).items()),
                  key=lambda s: s[1] * s[2])


def _prewarm_worker(idx, count):
    """Compiles this process's share of the kernels (Triton's disk cache), each specialization the
    sweep meets once: tiled; rows without MASK (K 5376 at STEP_W 16 / 32, K 8192 at 64); rows with
    MASK (the ragged shape: every STEP_W; K 5376 at 64 is the same compile)."""
    ragged = (1000, 35 * GROUP)
    jobs = [((256, 5376) if v.layout == "tiled" or v.step_w < 64 else (256, 8192), v) for v in variants()]
    jobs += [(ragged, v) for v in variants() if v.layout == "rows"]
    mine = jobs[idx::count]
    ws = {}
    for sh, v in mine:
        if sh not in ws:
            ws[sh] = Weight(*sh)
        try:
            ws[sh].launch(v, 2, torch.empty((8, sh[0]), dtype=torch.int32, device=DEVICE))
        except Exception:
            pass
    if idx == 0:
        stream_read_us(Weight(256, 5376).words)
    torch.cuda.synchronize()


def ragged_checks(vs: list[Variant], doc: dict) -> bool:
    """Every kernel on a shape no tile divides (N 1000, K 35 groups; the interpreter N 40, K 5
    groups) at 1, 3 and 8 slices."""
    n, k = (40, 5 * GROUP) if _INTERPRET else (1000, 35 * GROUP)
    wt = Weight(n, k)
    bad = []
    for v in vs:
        for sp in (1, 3, 8):
            try:
                good = wt.check(v, sp)
            except Exception as e:  # a kernel that fails to compile or run is reported, not fatal
                print(f"  {v.label} split {sp}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                good = False
            if not good:
                bad.append((v.label, sp))
    doc["ragged"] = {"n": n, "k": k, "checks": 3 * len(vs), "bad": bad}
    print(f"ragged checks ({3 * len(vs)}, N {n}, K {k}): " + (f"FAIL {bad}" if bad else "all sums exact"), flush=True)
    return not bad


def _best(rows, **want):
    sel = [r for r in rows if r["ok"] and all(r[key] == val for key, val in want.items())]
    return min(sel, key=lambda r: r["us"], default=None)


def summarize(name: str, n: int, k: int, rows: list[dict], stream: dict, floor_us: float, doc: dict) -> None:
    """The shape's line of the table and its summary in doc["summary"]."""
    cfg, plan, *_ = im.gemv1_plan(n, k, GROUP)
    today = _best(rows, layout="rows", block_n=cfg.kwargs["BLOCK_N"], step_w=cfg.kwargs["GROUPS"] * GROUP // 8,
                  ahead=1, warps=cfg.num_warps, splits=plan)
    br, bt = _best(rows, layout="rows"), _best(rows, layout="tiled")
    f = lambda r: f"{r['us']:6.1f} {r['fraction_of_copy_bw']:4.0%}" if r else "   -       "  # noqa: E731
    lab = lambda r: f"{r['variant']}/{r['splits']}" if r else "-"  # noqa: E731
    print(f"{name[:22]:22} {n:6}x{k:<5} {floor_us:6.1f} | {f(today)} | {f(br)} {lab(br):14} | {f(bt)} {lab(bt):14}"
          f" | {f(stream)}", flush=True)
    by = {}
    for key in ("ahead", "step_w"):
        for lay in ("rows", "tiled"):
            vals = sorted({r[key] for r in rows})
            by[f"{lay}_by_{key}"] = {v: (_best(rows, layout=lay, **{key: v}) or {}).get("fraction_of_copy_bw")
                                     for v in vals}
    pct = lambda d: " ".join(f"{kk}:{v:.0%}" if v else f"{kk}:-" for kk, v in d.items())  # noqa: E731
    print(f"{'':22} by ahead rows {pct(by['rows_by_ahead'])}  tiled {pct(by['tiled_by_ahead'])};"
          f" by step_w rows {pct(by['rows_by_step_w'])}  tiled {pct(by['tiled_by_step_w'])}", flush=True)
    doc["summary"].append({"shape": name, "n": n, "k": k, "floor_us": floor_us, "today_tile_load_only": today,
                           "best_rows": br, "best_tiled": bt, "stream_read": stream, **by})


def sweep_shape(name: str, n: int, k: int, vs: list[Variant], gbps: float, doc: dict, t0: float, budget: float):
    """Checks and times every variant on one shape (until the budget runs out); False when a check failed."""
    wt = Weight(n, k)
    floor_us = wt.nbytes / gbps / 1e3
    sus, scfg = stream_read_us(wt.words)
    stream = {"shape": name, "variant": "stream_read", "config": scfg, "us": sus,
              "fraction_of_copy_bw": wt.words.numel() * 4 / sus / 1e3 / gbps}
    rows = []
    for v in vs:
        if time.time() - t0 > budget:
            print(f"budget spent inside {name}: {len(rows)} variant x slices timed", flush=True)
            break
        done = set()
        for sp in split_set(n, k):
            sl = wt.slices(v.step_w, sp)[2]
            if sl in done:
                continue
            done.add(sl)
            out = torch.empty((sl, n), dtype=torch.int32, device=DEVICE)
            try:
                ok = wt.check(v, sp)
                kern = wt.launch(v, sp, out)
                us = bench_us(lambda: wt.launch(v, sp, out))
            except Exception as e:
                print(f"  {name} {v.label}/{sp}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            r = {"shape": name, "n": n, "k": k, **asdict(v), "variant": v.label, "splits": sl, "us": us,
                 "fraction_of_copy_bw": floor_us / us, "ok": ok,
                 "padding_bytes": padding_bytes(n, k, v.block_n, v.step_w) if v.layout == "tiled" else 0,
                 "regs": getattr(kern, "n_regs", None), "spills": getattr(kern, "n_spills", None)}
            rows.append(r)
            if not ok:
                print(f"  {name} {v.label}/{sl}: sums differ from torch's", flush=True)
    doc["rows"] += rows
    doc["stream"].append(stream)
    summarize(name, n, k, rows, stream, floor_us, doc)
    return all(r["ok"] for r in rows)


def count(vs: list[Variant]) -> list[dict]:
    """Offline, no GPU: each kernel compiled for sm_90 (`gemv1_tile_variants._compile_sm90`; the rows
    layout at STEP_W 64 with MASK too, as K 5376 takes it): registers, spills (STACK), the loop's
    global loads by width."""
    from scripts.gemv1_tile_variants import _compile_sm90, _sass_loop
    sig = {"w_ptr": "*i32", "s_ptr": "*i16", "out_ptr": "*i32", "N": "i32", "KW": "i32", "NSTEPS": "i32",
           "SPS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_on": "i32"}
    out = []
    for v in vs:
        for mask in (False, True) if v.layout == "rows" and v.step_w == 64 else (False,):
            const = {"TILED": v.layout == "tiled", "BLOCK_N": v.block_n, "STEP_W": v.step_w, "AHEAD": v.ahead,
                     "MASK": mask, "GROUP": GROUP}
            k = _compile_sm90(_load_only_kernel, sig, const, v.warps, ["w_ptr", "s_ptr", "out_ptr", "stride_ww"])
            ops, res = _sass_loop(k.asm["cubin"])
            ldg = {o: n for o, n in sorted(ops.items()) if o.startswith("LDG")}
            out.append({"variant": v.label, "mask": mask, "resources": res, "loop_ops": sum(ops.values()),
                        "loop_loads": ldg})
            print(f"{v.label:14} mask {int(mask)} {res:38} loop {sum(ops.values()):4} ops, loads {ldg}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_layout_variants.json"))
    ap.add_argument("--budget", type=float, default=95.0, help="seconds from the start; what is left is skipped")
    ap.add_argument("--prewarm", type=int, default=14, help="processes compiling the kernels first (0: none)")
    ap.add_argument("--smoke", action="store_true", help="run on the CPU through Triton's interpreter, tiny shapes")
    ap.add_argument("--count", action="store_true", help="offline: compile each kernel for sm_90, registers and loads")
    a = ap.parse_args(argv)
    if a.count:
        a.out.write_text(json.dumps({"target": "sm_90 (offline)", "kernels": count(variants())}, indent=1) + "\n")
        return 0
    if a.smoke and not _INTERPRET:
        rest = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--smoke"]
        return main_in_interpreter("scripts.gemv1_layout_variants", rest)
    t0 = time.time()
    if not launch_directly("gemv1_layout_variants"):
        return 2
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 40)
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    vs = variants(_INTERPRET)
    doc = {"device": dev, "copy_gbps": gbps, "group": GROUP, "rows": [], "stream": [], "summary": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    ok = ragged_checks(vs, doc)
    save()
    print(f"checks done at {time.time() - t0:.0f} s", flush=True)
    shapes = [("tiny.ragged", 40, 5 * GROUP), ("tiny", 64, 8 * GROUP)] if _INTERPRET else shapes_31b()
    print(f"{'shape':22} {'N x K':>12} {'floor':>6} | {'today tile':>11} | {'best rows':>11} {'variant/sl':14} | "
          f"{'best tiled':>11} {'variant/sl':14} | {'stream read':>11}   (us, % of copy)", flush=True)
    for name, n, k in shapes:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        ok = sweep_shape(name, n, k, vs, gbps, doc, t0, a.budget) and ok
        save()
        if not _INTERPRET:
            torch.cuda.empty_cache()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
