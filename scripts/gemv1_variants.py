"""Sweep of M == 1 int4 GEMV variants on the 31B shapes, in one GPU call (a tuning tool).

    python -m scripts.gemv1_variants [--out gemv1_variants.json] [--budget 110] [--prewarm 8]

One variant kernel (`_gemv1x_kernel`) with every knob the M == 1 path might want:
BLOCK_N rows x PARTS K parts (far apart in the row, each streamed in order) x GROUPS adjacent
groups per step; DEPTH tiles loaded ahead in registers (0: none, the loop left to
`tl.range(num_stages=STAGES)`); the K split over programs reduced by RED: 0 fp32 partials +
`_sum_splits_kernel` (the op today), 1 fp32 `atomic_add` into a zeroed buffer + a convert,
2 the last program of a row block (atomic counter) sums the partials in-kernel and writes bf16
(counters zeroed each call, or `persist`: one buffer the kernel resets itself). LOADONLY
variants replace the nibble arithmetic by one convert a word: the bound of the access pattern.
Beside them: the op's M == 1 path (`gemv1_plan`), the op's kernel at the best (config, split)
of the sweep before (scripts/measurements/int4_gemv1_sweep.json), and a plain streaming read of
the same bytes. (The first run, scripts/measurements/int4_gemv1_variants.json, timed the kernel
before `gemv1_plan` as "op": (32, 1, 1) at the old `gemv1_splits`.) Every variant is checked
against an fp32 matmul on the dequantized weight (fresh x, NaN-filled outputs) on a ragged
shape and on each shape; timed as CUDA-graph replays over rotated weight copies (>= 256 MB, so
weights come from HBM), median; copy bandwidth measured in the same run. Prints a table per
shape, writes everything as one JSON.

What the first run said (H200): a streaming read of the same bytes takes 0.5-0.7x the best GEMV on
every shape, and the best load-only pattern (8 rows x 4 K parts, 4 warps) ~0.65x; the same
pattern with the nibble arithmetic is the slowest of the good ones on large weights (~2x its
load-only time: each thread holds one row, so x's loads and conversions are not shared between
rows), while 32-row one-warp tiles (4 rows a thread) lose less to arithmetic but their loads
alone are already slower. Deeper register prefetch (2-3 tiles) and Triton's cp.async staging
(`tl.range(num_stages=3..5)`) gained nothing over one tile ahead; an in-kernel split reduction
gains only with counters that need no zeroing launch (`persist`, ~0.5-1 us on mid shapes),
not with a zeroed buffer per call (RED 1/2). Wins: K parts unsplit for <= 4096 rows, one slice
for the lm_head, 8 slices for 21504 x 5376 (`gemv1_plan`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"


@triton.jit
def _tile_dot(w, s, xw, g0, lane, ok, ASM: tl.constexpr, LOADONLY: tl.constexpr):
    """(sum over each word's 8 nibbles of (v - 8) x) * scale for a [BN, C, WORDS] tile."""
    if LOADONLY:
        return w.to(tl.float32) * s.to(tl.float32)
    corr = tl.zeros(g0.shape, dtype=tl.float32)
    xs = []
    for p in tl.static_range(4):
        xp = tl.load(xw + ((g0 + lane) * 4 + p), mask=ok, other=0)
        xs = xs + [(xp << 16).to(tl.float32, bitcast=True), (xp & -65536).to(tl.float32, bitcast=True)]
    part = tl.zeros(w.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        if i < 2:
            f = im._nibble_as_float(w << 8, 8 + 4 * i, ASM)
            c = (1 << (15 - 4 * i)) + 8
        elif i < 5:
            f = im._nibble_as_float(w, 4 * i, ASM)
            c = (1 << (23 - 4 * i)) + 8
        else:
            f = im._nibble_as_float(w >> 12, 4 * i - 12, ASM)
            c = (1 << (35 - 4 * i)) + 8
        part += f * xs[i]
        corr += c * xs[i]
    return (part - corr) * s.to(tl.float32)


@triton.jit(do_not_specialize=["N", "KW", "GPS", "GPP", "SPLITS", "stride_sn", "stride_ps"])
def _gemv1x_kernel(x_ptr, w_ptr, s_ptr, part_ptr, y_ptr, cnt_ptr, N, KW, GPS, GPP, SPLITS,
                   stride_ww, stride_sn, stride_ps,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr, GROUPS: tl.constexpr,
                   DEPTH: tl.constexpr, STAGES: tl.constexpr, RED: tl.constexpr, LOADONLY: tl.constexpr,
                   ASM: tl.constexpr):
    WORDS: tl.constexpr = GROUP // 8
    C: tl.constexpr = PARTS * GROUPS
    STEP: tl.constexpr = GROUPS * WORDS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None, None]
    col = tl.arange(0, C)
    pcol = col // GROUPS
    w_lo = pid_k * GPS * WORDS  # slices and parts start at whole groups: 16-byte loads
    w_hi = tl.minimum(w_lo + GPS * WORDS, KW)
    start = (w_lo + pcol * (GPP * WORDS) + (col % GROUPS) * WORDS)[None, :, None]  # [1, C, 1]
    hi = tl.minimum(w_lo + (pcol + 1) * (GPP * WORDS), w_hi)[None, :, None]
    lane = tl.arange(0, WORDS)[None, None, :]
    rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_ww
    srows = s_ptr + offs_n.to(tl.int64)[:, None, None] * stride_sn
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N, C, WORDS), dtype=tl.float32)
    if DEPTH == 0:
        for tg in tl.range(0, GPP, GROUPS, num_stages=STAGES):
            g0 = start + tg * WORDS
            ok = g0 < hi
            w = tl.load(rows + (g0 + lane), mask=n_ok & ok, other=0)
            s = tl.load(srows + g0 // WORDS, mask=n_ok & ok, other=0.0)
            acc += _tile_dot(w, s, xw, g0, lane, ok, ASM, LOADONLY)
    else:
        w0, s0, w1, s1, w2, s2 = im._gemv1_first(rows, srows, start, lane, hi, n_ok, STEP, DEPTH)
        for tg in range(0, GPP, GROUPS):
            g0 = start + tg * WORDS
            gn = g0 + DEPTH * STEP
            wn = tl.load(rows + (gn + lane), mask=n_ok & (gn < hi), other=0)
            sn = tl.load(srows + gn // WORDS, mask=n_ok & (gn < hi), other=0.0)
            acc += _tile_dot(w0, s0, xw, g0, lane, g0 < hi, ASM, LOADONLY)
            w0, s0, w1, s1, w2, s2 = im._gemv1_ahead(w0, s0, w1, s1, w2, s2, wn, sn, DEPTH)
    val = tl.sum(tl.sum(acc, axis=2), axis=1)
    nm = offs_n < N
    if RED == 0:
        if SPLITS == 1:
            tl.store(y_ptr + offs_n, val.to(y_ptr.dtype.element_ty), mask=nm)
        else:
            tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)
    elif RED == 1:
        tl.atomic_add(part_ptr + offs_n, val, mask=nm, sem="relaxed")
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs_n, val, mask=nm)
        if ASM:  # every thread's partials visible device-wide before the count goes up
            tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [offs_n], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in range(SPLITS):
                tot += tl.load(part_ptr + i * stride_ps + offs_n, mask=nm, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_n, tot.to(y_ptr.dtype.element_ty), mask=nm)
            tl.store(cnt_ptr + pid_n, 0)  # reset: a buffer kept across calls needs no zeroing


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, NW, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Reads CHUNK int32 words per program in BLOCK-word steps, writes one word: a read ceiling."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < NW, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def stream_read_us(words: list[torch.Tensor], chunk: int = 1 << 14, block: int = 1024, warps: int = 4) -> float:
    """`_stream_read_kernel` over each of `words` (flat int32) in turn, as one CUDA-graph replay
    (`bench_graph`): the read ceiling of one launch of this size, us per tensor."""
    sink = torch.empty(max(triton.cdiv(w.numel(), chunk) for w in words), device=words[0].device, dtype=torch.int32)
    read = lambda w: _stream_read_kernel[(triton.cdiv(w.numel(), chunk),)](  # noqa: E731
        w, sink, w.numel(), CHUNK=chunk, BLOCK=block, num_warps=warps)
    return bench_graph(lambda: [read(w) for w in words], len(words))


def rel(y, ref) -> float:
    """||y - ref|| / ||ref||, y in any dtype against an fp32 reference."""
    return ((y.float() - ref).norm() / ref.norm()).item()


def new_out(shape, dtype, device, poison: bool) -> torch.Tensor:
    """An output buffer: NaN-filled when `poison` (whatever a kernel fails to write shows), else empty."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def quant_x(x2: torch.Tensor, group: int, planes: int = 4):
    """x2 [1, K] through the op's `_quant_x_kernel`: its levels' planes (int32 [planes, XP], XP
    = K / 8 padded to 16 words; the kernel writes planes 0 to 3, any beyond are the caller's),
    the per-group factor (fp32) and correction (int32)."""
    K = x2.shape[1]
    ng = K // group
    xq = torch.empty((planes, triton.cdiv(K // 8, 16) * 16), device=x2.device, dtype=torch.int32)
    xf = torch.empty(ng, device=x2.device, dtype=torch.float32)
    xc = torch.empty(ng, device=x2.device, dtype=torch.int32)
    im._quant_x_kernel[(triton.cdiv(ng, im.QUANT_X_GROUPS),)](x2, x2, xq, xf, xc, xc, ng, 0, GROUP=group,
                                                             GB=im.QUANT_X_GROUPS, num_warps=4)
    return xq, xf, xc


def main_in_interpreter(module: str, argv: list[str]) -> int:
    """`module`.main(argv) in a subprocess under Triton's interpreter (scripts.triton_interpreter
    imported first, before any kernel module): a sweep's CPU smoke run."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    code = f"import sys, scripts.triton_interpreter\nfrom {module} import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def sweep_args(module: str, doc: str, budget: float, argv, shapes_help: str | None = None, extra=None):
    """A GEMV sweep's command line (--out, --budget, --prewarm, --interpret and, with shapes_help, --shapes; extra:
    a function adding the sweep's own options to the parser) parsed for `module` (its docstring `doc`), then its
    start: under --interpret the sweep re-run in a subprocess under Triton's interpreter, else launches made direct
    (`launch_directly`). -> the arguments, or the exit code to return (the interpreter run's, or 2 with neither a
    GPU nor the interpreter)."""
    name = module.rsplit(".", 1)[-1]
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(f"{name}.json"))
    ap.add_argument("--budget", type=float, default=budget, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=14, help="processes compiling the variants first (0: none)")
    if shapes_help:
        ap.add_argument("--shapes", default="", help=f"comma-separated shape names (default: {shapes_help})")
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    if extra is not None:
        extra(ap)
    a = ap.parse_args(argv)
    if a.interpret and not _INTERPRET:
        return main_in_interpreter(module, [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--interpret"])
    if not launch_directly(name):
        return 2
    return a


def launch_directly(name: str) -> bool:
    """False (with a message) where there is neither a CUDA GPU nor the interpreter; else True,
    with torch's wrap_triton off from here on (kernels launch directly: no HOP dispatch)."""
    if not torch.cuda.is_available() and not _INTERPRET:
        print(f"{name}: needs a CUDA GPU (or TRITON_INTERPRET=1)", file=sys.stderr)
        return False
    global _NO_WRAP
    # kept: a generator context manager dropped after __enter__ is closed at once, which runs its
    # finally and turns wrap_triton back on
    _NO_WRAP = torch._library.triton.set_wrap_triton_enabled(False)
    _NO_WRAP.__enter__()
    return True


_NO_WRAP = None


def sweep_setup(prewarm_worker, prewarm: int, seconds: float) -> tuple[float, str]:
    """A sweep's start once its launches are direct (`launch_directly`): a fixed seed, the prewarm
    processes (`spawn_prewarm`, none in the interpreter), then (copy bandwidth GB/s, device name)."""
    from scripts.bench_int4 import copy_gbps

    torch.manual_seed(0)
    if prewarm and not _INTERPRET:
        spawn_prewarm(prewarm_worker, prewarm, seconds)
    if _INTERPRET:
        return 1000.0, "cpu (interpreter)"
    return copy_gbps(), torch.cuda.get_device_name()


def spawn_prewarm(worker, count: int, seconds: float, *args) -> None:
    """worker(idx, count, *args) in `count` spawned processes, which fill Triton's disk cache so
    that the sweep finds its variants compiled; those still running after `seconds` are ended
    (what they did not compile, the sweep compiles itself)."""
    import multiprocessing as mp
    t0 = time.time()
    ps = [mp.get_context("spawn").Process(target=worker, args=(i, count, *args)) for i in range(count)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=max(1.0, t0 + seconds - time.time()))
    for p in ps:
        if p.is_alive():
            p.terminate()
    print(f"prewarm: {count} processes in {time.time() - t0:.1f} s", flush=True)


_DUMMY: dict = {}


def _dummy(dtype):
    if dtype not in _DUMMY:
        _DUMMY[dtype] = torch.zeros(16, dtype=dtype, device=DEVICE)
    return _DUMMY[dtype]


class V:
    """A variant of `_gemv1x_kernel`: tile and pipelining knobs (constexpr, one compile each)."""

    def __init__(self, bn, parts, groups, warps, depth, stages=1, red=0, loadonly=False, persist=False):
        self.bn, self.parts, self.groups, self.warps, self.depth, self.stages = bn, parts, groups, warps, depth, stages
        self.red, self.loadonly, self.persist = red, loadonly, persist
        self.cnt = None

    @property
    def label(self):
        s = f"x{self.bn}p{self.parts}g{self.groups}w{self.warps}d{self.depth}"
        s += f"s{self.stages}" if self.depth == 0 else ""
        s += f"r{self.red}" + ("P" if self.persist else "") + ("LO" if self.loadonly else "")
        return s

    def as_dict(self):
        return {k: getattr(self, k) for k in ("bn", "parts", "groups", "warps", "depth", "stages", "red", "loadonly",
                                              "persist")}

    def __call__(self, x2, q, s, splits, poison=False):
        N, K = q.shape[0], q.shape[1] * 2
        G = K // s.shape[1]
        W, KW = G // 8, K // 8
        groups = K // G
        gps = triton.cdiv(groups, splits)
        splits = triton.cdiv(groups, gps)
        gpp = triton.cdiv(gps, self.parts)
        words = q.view(torch.int32)
        tiles = triton.cdiv(N, self.bn)
        new = lambda shape, dt: new_out(shape, dt, x2.device, poison)  # noqa: E731
        y = new((1, N), x2.dtype)
        cnt = _dummy(torch.int32)
        if self.red == 1 and splits > 1:
            part = torch.zeros((1, N), dtype=torch.float32, device=x2.device)
        elif splits > 1:
            part = new((splits, N), torch.float32)
        else:
            part = _dummy(torch.float32)
        red = self.red if splits > 1 else 0
        if red == 2:
            if self.persist:
                if self.cnt is None or self.cnt.numel() < tiles:
                    self.cnt = torch.zeros(tiles, dtype=torch.int32, device=x2.device)
                cnt = self.cnt
            else:
                cnt = torch.zeros(tiles, dtype=torch.int32, device=x2.device)
        _gemv1x_kernel[(tiles, splits)](
            x2, words, s, part, y, cnt, N, KW, gps, gpp, splits, words.stride(0), s.stride(0), part.stride(0),
            GROUP=G, BLOCK_N=self.bn, PARTS=self.parts, GROUPS=self.groups, DEPTH=self.depth, STAGES=self.stages,
            RED=red, LOADONLY=self.loadonly, ASM=not _INTERPRET, num_warps=self.warps, num_stages=1)
        if red == 0 and splits > 1:
            im._sum_splits_kernel[(triton.cdiv(N, 1024),)](part, y, N, splits, part.stride(0), BLOCK=1024,
                                                             num_warps=4)
        elif red == 1:
            y = part.to(x2.dtype)  # the convert a consumer could fuse
        return y


class Cur:
    """The op's current kernel with one config (BLOCK_N, GROUPS, warps)."""

    def __init__(self, bn, groups, warps):
        cfg = im._cfg1(bn, groups, warps)
        self.kern = im._autotuned([cfg], im._int4_gemv1_kernel)
        self.label = f"cur{bn},{groups},{warps}"
        self.cfg = (bn, groups, warps)

    def as_dict(self):
        return {"current": list(self.cfg)}

    def __call__(self, x2, q, s, splits, poison=False):
        return im.int4_gemv1(x2, q, s, splits, kernel=self.kern)


class Op:
    """The op's M == 1 path: `gemv1_plan`'s config and K split for the shape (splits ignored)."""
    label = "op"

    def as_dict(self):
        return {"current": "plan"}

    def __call__(self, x2, q, s, splits, poison=False):
        N, K = q.shape[0], q.shape[1] * 2
        cfg, sp, xq, _ = im.gemv1_plan(N, K, K // s.shape[1])
        return im.int4_gemv1(x2, q, s, sp, kernel=im._gemv1_kernel(cfg), xq=xq)


def variants(quick=False):
    """(name, variant, split counts) of the sweep."""
    vs = [
        # the op today's tile with deeper register prefetch
        V(32, 1, 1, 1, 1), V(32, 1, 1, 1, 2), V(32, 1, 1, 1, 3),
        V(64, 1, 1, 4, 1), V(64, 1, 1, 4, 2), V(64, 1, 1, 4, 3), V(128, 1, 1, 4, 2), V(128, 1, 1, 8, 2),
        V(64, 1, 2, 4, 2), V(16, 1, 4, 4, 2), V(32, 1, 2, 4, 2), V(32, 1, 1, 2, 2),
        # in-program K parts: few rows, many warps, no split needed
        V(8, 4, 1, 4, 2), V(16, 4, 1, 4, 2), V(8, 8, 1, 8, 2), V(4, 8, 1, 4, 2), V(16, 2, 1, 4, 2),
        V(32, 4, 1, 8, 2), V(8, 4, 1, 4, 3), V(16, 8, 1, 8, 2),
        # Triton's own pipelining of the loads
        V(32, 1, 1, 1, 0, 3), V(64, 1, 1, 4, 0, 4), V(8, 4, 1, 4, 0, 3), V(32, 1, 1, 1, 0, 5), V(64, 1, 1, 4, 0, 3),
        V(16, 1, 4, 4, 0, 3), V(32, 1, 2, 4, 0, 4), V(128, 1, 1, 4, 0, 3), V(16, 4, 1, 4, 0, 3),
        # in-kernel split reduction
        V(32, 1, 1, 1, 2, red=1), V(64, 1, 1, 4, 2, red=1), V(16, 4, 1, 4, 2, red=1),
        V(32, 1, 1, 1, 2, red=2), V(64, 1, 1, 4, 2, red=2), V(16, 4, 1, 4, 2, red=2),
        V(32, 1, 1, 1, 2, red=2, persist=True), V(64, 1, 1, 4, 2, red=2, persist=True),
        V(16, 4, 1, 4, 2, red=2, persist=True),
        # the access pattern's own bound (no nibble arithmetic; not a result)
        V(32, 1, 1, 1, 1, loadonly=True), V(32, 1, 1, 1, 2, loadonly=True), V(64, 1, 1, 4, 2, loadonly=True),
        V(8, 4, 1, 4, 2, loadonly=True), V(16, 8, 1, 8, 2, loadonly=True), V(32, 1, 1, 1, 0, 4, loadonly=True),
        V(64, 1, 1, 4, 0, 4, loadonly=True),
    ]
    if quick:
        vs = [v for v in vs if v.bn == 32 and v.parts == 1 and v.groups == 1 and v.warps == 1] + [vs[12]]
    return vs


def current_variants():
    cur = [Cur(*c) for c in ((32, 1, 1), (16, 4, 4), (64, 2, 4), (64, 1, 4), (128, 1, 4))]
    return cur


# the last sweep's best (config, split) per shape of the current kernel
PREV_BEST = {(2048, 5376): ((16, 4, 4), 4), (4096, 5376): ((64, 2, 4), 8), (5376, 8192): ((32, 1, 1), 8),
             (5376, 16384): ((64, 1, 4), 8), (5376, 21504): ((32, 1, 1), 8), (8192, 5376): ((32, 1, 1), 8),
             (16384, 5376): ((128, 1, 4), 4), (21504, 5376): ((32, 1, 1), 8), (262144, 5376): ((64, 1, 4), 1)}


def _splits_for(v, n, k):
    if isinstance(v, V) and v.red in (1, 2):
        return (2, 4, 8)
    if isinstance(v, V) and v.parts >= 4:
        return (1, 2)
    return (1, 2, 4, 8)


def finish_sweep(doc: dict, ok: bool, t0: float, save) -> int:
    """A sweep's last step: record whether every correctness check passed, save, say so."""
    doc["checks_passed"] = ok
    save()
    print(f"checks {'passed' if ok else 'FAILED'}; done in {time.time() - t0:.0f} s", flush=True)
    return 0 if ok else 1


def bench_graph(fn, copies, reps=15, edit=None):
    """Median us per call of fn (which makes `copies` calls) as CUDA-graph replays; edit: a function
    of the captured graph's handle, run before the graph is instantiated."""
    if _INTERPRET:  # a dry run of the sweep's logic on CPU
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6 / copies
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(keep_graph=edit is not None)
    with torch.cuda.graph(g):
        fn()
    if edit is not None:
        edit(g.raw_cuda_graph())
        g.instantiate()
    g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    del g
    return ts[len(ts) // 2] * 1e3 / copies


def check_vs_fp32(v, k: int, ws, ref_w, tries: int = 2) -> float:
    """Worst rel err of a variant v(x, q, s) on the last weight copy of `ws` against x @ ref_w.T in
    fp32, over `tries` fresh bf16 x."""
    q, s = ws[-1]
    worst = 0.0
    for _ in range(tries):
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        worst = max(worst, rel(v(x, q, s), x.float() @ ref_w.t()))
    return worst


def check_and_time(vs: list, shape: str, n: int, k: int, ws, ref_w, floor_us: float, rows: list, timer=None,
                   extra=None, deadline: float | None = None) -> tuple[bool, list]:
    """Each variant v(x, q, s) of an [n, k] weight checked against fp32 (`check_vs_fp32`, rel err <= 1e-2), then
    timed where it passed: `timer(v)` or graph replays over the weight copies `ws` (us a call). A row per variant
    into `rows` (shape, n, k, variant, us, rel_err, fraction_of_copy_bw against `floor_us`, `extra(v)`'s keys and a
    dataclass variant's fields); a variant that fails to compile or run is reported and left out; none is started
    past `deadline` (time.time()). -> (every check passed, [(us, variant)], us nan where it failed)."""
    from dataclasses import asdict, is_dataclass

    ok, res = True, []
    for v in vs:
        if deadline is not None and time.time() > deadline:
            break
        try:
            err = check_vs_fp32(v, k, ws, ref_w)
            if err <= 1e-2 and timer is not None:
                us = timer(v)
            elif err <= 1e-2:
                x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
                us = bench_graph(lambda: [v(x, q, s) for q, s in ws], len(ws))
            else:
                us = float("nan")
        except Exception as e:  # a variant that fails to compile or run is reported, not fatal
            print(f"  {v.label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        if not err <= 1e-2:
            ok = False
            print(f"  {v.label}: rel err {err:.2e} > 1e-2", flush=True)
        rows.append({"shape": shape, "n": n, "k": k, "variant": v.label, **(extra(v) if extra else {}), "us": us,
                     "rel_err": err, "fraction_of_copy_bw": floor_us / us if us == us else None,
                     **(asdict(v) if is_dataclass(v) else {})})
        res.append((us, v))
    return ok, res


def layer_shapes_31b(names) -> dict:
    """{name: (N, K)} of the 31B's M == 1 linears named in `names` (bench_int4's names, joined ones with "+")."""
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes

    out = {}
    for (n, k), (nms, _) in linear_shapes(PRESETS["31b"]).items():
        nm = nms if isinstance(nms, str) else "+".join(nms)
        if nm in names:
            out[nm] = (n, k)
    return out


def compare_layer(layer: str, names: list, weights: dict, xs: dict, picks: dict, rounds: int = 3) -> dict:
    """A layer's projections `names` in order as one graph (`layer_graph` over their weight copies `weights` and
    inputs `xs`), once per pick {key: name -> variant} in each of `rounds` alternated rounds: {layer, projections,
    <key>_us: [us a round]}."""
    copies = min(len(weights[nm]) for nm in names)
    rec = {"layer": layer, "projections": names}
    for _ in range(rounds):
        for key, pick in picks.items():
            rec.setdefault(f"{key}_us", []).append(
                layer_graph([(pick(nm), weights[nm], xs[nm]) for nm in names], copies))
    return rec


def layer_graph(calls: list, copies: int) -> float:
    """us of one pass over a layer's projections as CUDA-graph replays: calls holds (variant,
    weight copies, x) per projection, in the order a decode step runs them."""
    def run():
        for i in range(copies):
            for v, ws, x in calls:
                q, s = ws[i % len(ws)]
                v(x, q, s)
    return bench_graph(run, copies)


def rotated_weights(n: int, k: int, g: int) -> tuple[int, list, torch.Tensor]:
    """(bytes a call reads, weight copies to rotate through, the fp32 dequantized weight) for an
    [n, k] int4 weight: enough copies for >= 256 MB, so a graph of calls over them reads from
    HBM, not the L2 (two in the interpreter); the last copy is the one `ref` dequantizes."""
    nbytes = im.int4_bytes(n, k, g) + 2 * (k + n)  # + x read and y written
    copies = 2 if _INTERPRET else max(1, math.ceil((256 << 20) / nbytes))
    q0, s0 = im.quantize_int4(torch.randn(n, k, device=DEVICE), g)
    ws = [(q0.clone(), s0.clone()) for _ in range(copies - 1)] + [(q0, s0)]
    return nbytes, ws, im.dequantize_int4(q0, s0, torch.float32)


def ragged_checks(vs, rows, n=1000, k=4608):
    """Every variant at each split on a shape no tile divides (N 1000, K 36 groups, split 3 and 5)."""
    q, s = im.quantize_int4(torch.randn(n, k, device=DEVICE), 128)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    bad = []
    for v in vs:
        if getattr(v, "loadonly", False):
            continue
        for splits in (1, 3, 5, 8):
            x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
            try:
                err = rel(v(x, q, s, splits, poison=True), x.float() @ ref_w.t())
            except Exception as e:  # a variant that fails to compile or run is reported, not fatal
                err = float("nan")
                print(f"  {v.label} split {splits}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append({"part": "ragged", "variant": v.label, "n": n, "k": k, "splits": splits, "rel_err": err})
            if not err <= 1e-2:
                bad.append((v.label, splits, err))
    print(f"ragged checks (N {n}, K {k}, splits 1/3/5/8): {'all within 1e-2' if not bad else f'FAIL {bad}'}",
          flush=True)
    return {b[0] for b in bad}


def _prewarm_worker(idx, count):
    """Compiles every variant (Triton's disk cache) in one of `count` processes."""
    torch.manual_seed(idx)
    allv = variants() + current_variants() + [Op()]
    mine = allv[idx::count]
    for k in (5376, 8192):
        q, s = im.quantize_int4(torch.randn(256, k, device=DEVICE), 128)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        for v in mine:
            for splits in (1, 2):
                try:
                    v(x, q, s, splits)
                except Exception:
                    pass
    torch.cuda.synchronize()


def prewarm(count):
    spawn_prewarm(_prewarm_worker, count, 45)


def _device_name():
    return "cpu (interpreter)" if _INTERPRET else torch.cuda.get_device_name()


def copy_gbps():
    """bench_int4's figure (eager copy, do_bench): a copy captured in a CUDA graph becomes a memcpy
    node, which ran at 2771 GB/s on the H200 where the eager copy runs at ~4240."""
    from scripts.bench_int4 import copy_gbps as eager
    return eager()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_variants.json"))
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=8, help="processes compiling the variants first (0: none)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="", help="names of the shapes (default: every 31B shape)")
    a = ap.parse_args(argv)
    t_start = time.time()
    if not launch_directly("gemv1_variants"):
        return 2
    if a.prewarm and not _INTERPRET:
        try:
            prewarm(a.prewarm)
        except Exception as e:  # an optimisation only
            print(f"prewarm: {type(e).__name__}: {e}", flush=True)
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes
    gbps = 1000.0 if _INTERPRET else copy_gbps()
    t = torch.zeros(1, device=DEVICE)
    launch_us = bench_graph(lambda: [t.add_(1) for _ in range(20)], 20)
    print(f"copy {gbps:.0f} GB/s, tiny kernel in a graph {launch_us:.2f} us ({_device_name()})", flush=True)
    vs = variants(a.quick)
    curs = current_variants()
    rows: list[dict] = []
    doc = {"device": _device_name(), "copy_gbps": gbps, "launch_us": launch_us, "rows": rows}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1) + "\n")
    broken = ragged_checks(vs + curs[:1], rows, *((40, 640) if _INTERPRET else ()))
    print(f"checks done at {time.time() - t_start:.1f} s", flush=True)
    shapes = [(names, n, k) for (n, k), (names, _) in sorted(linear_shapes(PRESETS["31b"]).items())]
    if _INTERPRET:  # the logic on two tiny shapes standing in for two 31B ones
        shapes = [(shapes[0][0], 48, 512), (shapes[-1][0], 80, 768)]
        counts_override = {(48, 512): 1, (80, 768): 1}
    if a.shapes:
        shapes = [sh for sh in shapes if sh[0] in a.shapes.split(",")]
    # smaller weights first, the lm_head last (its copies cost the most time)
    shapes.sort(key=lambda sh: sh[1] * sh[2])
    summary = []
    try:
        for name, n, k in shapes:
            if time.time() - t_start > a.budget:
                print(f"budget spent: {name} skipped", flush=True)
                continue
            g = 128
            nbytes, ws, ref_w = rotated_weights(n, k, g)
            C = len(ws)
            q0, s0 = ws[-1]
            x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
            res = []

            def one(v, splits, label_extra=""):
                xc = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
                try:
                    err = rel(v(xc, q0, s0, splits, poison=True), xc.float() @ ref_w.t())
                    us = bench_graph(lambda: [v(x, q, s, splits) for q, s in ws], C)
                except Exception as e:
                    print(f"  {v.label} split {splits}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    return None
                r = {"variant": v.label, **v.as_dict(), "splits": splits, "us": us,
                     "fraction_of_copy_bw": nbytes / us / 1e3 / gbps, "rel_err": err}
                res.append(r)
                return r

            op = one(Op(), 0)  # the op's M == 1 path (`gemv1_plan`)
            prev_cfg, prev_split = PREV_BEST.get((n, k), ((32, 1, 1), 8))
            prev = one(next(c for c in curs if c.cfg == prev_cfg), prev_split)
            # streaming read of the packed bytes (a ceiling for one launch of this size)
            try:
                rd_us = stream_read_us([q.view(torch.int32).view(-1) for q, _ in ws], block=2048, warps=8)
            except Exception as e:
                print(f"  stream read: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rd_us = float("nan")
            rd_frac = q0.numel() / rd_us / 1e3 / gbps
            for v in vs:
                if v.label in broken:
                    continue
                for splits in _splits_for(v, n, k):
                    if splits > 1 and (k // g) // splits < 2:
                        continue
                    one(v, splits)
            good = [r for r in res if not r.get("loadonly") and r["rel_err"] <= 1e-2 and "current" not in r]
            good.sort(key=lambda r: r["us"])
            lo = [r for r in res if r.get("loadonly")]
            lo_best = min(lo, key=lambda r: r["us"]) if lo else None
            worst = max((r["rel_err"] for r in res if not r.get("loadonly")), default=float("nan"))
            nan = [r["variant"] for r in res if not r.get("loadonly") and not r["rel_err"] <= 1e-2]
            print(f"\n{name} [{n} x {k}] {nbytes / 1e6:.1f} MB, floor {nbytes / gbps / 1e3:.1f} us, {C} copies; "
                  f"read-only {rd_us:.1f} us ({rd_frac:.0%}); op {op['us'] if op else float('nan'):.1f} us "
                  f"({op['fraction_of_copy_bw'] if op else float('nan'):.0%}); last sweep's best "
                  f"{prev['us'] if prev else float('nan'):.1f}; worst err {worst:.1e}"
                  + (f"; FAIL {nan}" if nan else ""), flush=True)
            if lo_best:
                print(f"  load-only best {lo_best['variant']} split {lo_best['splits']} {lo_best['us']:.1f} us "
                      f"({lo_best['fraction_of_copy_bw']:.0%})", flush=True)
            for r in good[:8]:
                print(f"  {r['variant']:22} split {r['splits']} {r['us']:7.1f} us {r['fraction_of_copy_bw']:5.0%}"
                      f" err {r['rel_err']:.1e}", flush=True)
            best_by_red = {}
            for r in good:
                best_by_red.setdefault((r["red"], r["depth"]), r)
            print("  best per (red, depth): " + ", ".join(
                f"r{kk[0]}d{kk[1]} {r['us']:.1f} ({r['variant']}/{r['splits']})" for kk, r in sorted(best_by_red.items())),
                flush=True)
            rows.append({"part": "shape", "name": name, "n": n, "k": k, "bytes": nbytes, "copies": C,
                         "read_only_us": rd_us, "read_only_fraction": rd_frac, "op": op, "prev_best": prev,
                         "all": res})
            summary.append((name, n, k, nbytes, op, prev, good[0] if good else None))
            save()
            del ws, q0, s0, ref_w
            if not _INTERPRET:
                torch.cuda.empty_cache()
    finally:
        save()
    print(f"\n{'shape':26} {'floor':>6} {'op us':>7} {'op%':>5} {'prev':>7} {'best us':>7} {'best%':>5}  variant/split")
    for name, n, k, nbytes, op, prev, b in summary:
        f = lambda r: r["us"] if r else float("nan")
        print(f"{name[:26]:26} {nbytes / gbps / 1e3:6.1f} {f(op):7.1f} {nbytes / f(op) / 1e3 / gbps:5.0%} "
              f"{f(prev):7.1f} {f(b):7.1f} {nbytes / f(b) / 1e3 / gbps:5.0%}  "
              f"{b['variant'] if b else '-'}/{b['splits'] if b else '-'}")
    # one pool config across all shapes: the total of a decode step's per-shape times
    from scripts.bench_int4 import linear_shapes as ls
    counts = {nk: cnt for nk, (_, cnt) in ls(PRESETS["31b"]).items()}
    if _INTERPRET:
        counts = counts_override
    tot = {}
    for r in rows:
        if r.get("part") != "shape":
            continue
        per = {}
        for x in r["all"]:
            if x.get("loadonly") or not x["rel_err"] <= 1e-2 or "current" in x:
                continue
            per[x["variant"]] = min(per.get(x["variant"], 1e9), x["us"])
        for lab, us in per.items():
            tot.setdefault(lab, []).append(us * counts[(r["n"], r["k"])])
    nshapes = len([r for r in rows if r.get("part") == "shape"])
    ranked = sorted(((sum(v), lab) for lab, v in tot.items() if len(v) == nshapes))
    op_tot = sum(r["op"]["us"] * counts[(r["n"], r["k"])] for r in rows if r.get("part") == "shape" and r["op"])
    print(f"\ndecode step's linears (31B, {nshapes} shapes, each variant at its best split per shape): "
          f"op {op_tot / 1e3:.2f} ms; " + ", ".join(f"{lab} {t / 1e3:.2f}" for t, lab in ranked[:8]))
    doc["step_totals_ms"] = {lab: t / 1e3 for t, lab in ranked}
    doc["op_step_ms"] = op_tot / 1e3
    try:
        smem = [k.metadata.shared for c in _gemv1x_kernel.device_caches.values() for k in c[0].values()]
        doc["compiled_max_shared_bytes"] = max(smem, default=None)
        print(f"compiled variants {len(smem)}, max shared memory {max(smem, default=0)} B "
              f"(limit {im.SMEM_LIMIT_BYTES})")
    except Exception as e:
        print(f"shared memory report: {type(e).__name__}: {e}")
    save()
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
