"""L2 prefetch of the next weight for the M == 1 int4 GEMV: whether a fire-and-forget prefetch of
a projection's weight into the L2, issued before the kernels that precede it in a decode step
(attention, norms, the projection before), takes the GEMV's start-up off the critical path (a
measuring tool, one GPU call).

    python -m scripts.gemv1_prefetch_variants [--out gemv1_prefetch_variants.json] [--budget 150]
    python -m scripts.gemv1_prefetch_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter

Why: on the H200 a plain streaming read of a 31B mid-size weight (22-58 MB) as one kernel reaches
only 45-58% of the copy bandwidth (scripts/gemv1_layout_variants.py: the GEMV is within 1-3 us of
that read at every mid shape), and the layer's four GEMVs take ~102 us (sliding) where their bytes
need ~58 us. No layout, depth or PDL variant moved it much: what is lost is each kernel's ramp and
tail, not its steady state. The L2 (50 MB on the H100 / H200) can hold a projection while the
kernels before it run: attention at a small fill reads a few MB in ~10 us, the o projection that
follows is 22-45 MB. `prefetch.global.L2` (every sm) and `cp.async.bulk.prefetch.L2` (sm_90+) are
hints the memory system carries out after the issuing kernel has exited, so one short kernel can
start the weight's transfer while the kernels in between run.

The prefetch kernel (`_prefetch_kernel`): programs over the first P bytes of the packed weight and
its scales' matching rows; MODE line: one `prefetch.global.L2` per 128-byte line; MODE line_el:
the same with `::evict_last`; MODE bulk: one `cp.async.bulk.prefetch.L2.global` per 16 KiB (sm_90+
only, skipped elsewhere). A spin kernel (`_spin_kernel`, one program waiting on %globaltimer) stands
for the attention kernel: it takes SMs and time and reads nothing.

Per 31B shape (the mid shapes and gate/up), as CUDA graphs over rotated weight copies (>= 256 MB:
every weight comes from HBM unless prefetched): `base` (spin, then x = src * gain), `cold` (base then
the op's GEMV), each prefetch mode (prefetch P bytes, spin, x, GEMV), `pf_base` (the prefetch kernel
with spin and x, no GEMV: what the prefetch costs in the stream) and `nospin/bulk` (prefetch right
before x and the GEMV: the transfer overlapping the GEMV's own start), `inspin/<mode>` (the stand-in
prefetching the weight itself, `_spin_prefetch_kernel`: the transfer beside its wait, as a prefetch
issued from inside the attention kernel would run; `inspin_base` without the GEMV). The GEMV's share is
the graph's time less `base`. Then a sliding and a full layer's four projections in order with a spin standing
for attention between qkv and o: today, the o weight prefetched before the attention, and that plus
the gate/up and down weights' heads prefetched one projection ahead; each also with the o weight
prefetched by the stand-in itself (`pf_o_in`, `pf_o_in+heads`). First run (separate prefetch kernels
only): a prefetch kernel holds the stream as long as a read of its bytes, so no overlap. Correctness: every variant's
output bitwise the cold one's (a prefetch moves no data), the cold one within 1e-2 of an fp32
matmul on the dequantized weight, on fresh x. Copy bandwidth measured in the same run. Table on
stdout, one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (bench_graph, finish_sweep, launch_directly, main_in_interpreter, rel,
                                    rotated_weights, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16
GROUP = 128
LINE = 128  # bytes of an L2 line
BULK = 16384  # bytes a bulk prefetch instruction asks for (a multiple of 16)
MODES = {"line": 0, "line_el": 1, "bulk": 2}
SPIN_US = 10.0  # the attention kernel of a 31B layer at fill 1k: ~10 us (runtime_31b.json decode_kernels)
TINY = {"o_proj.sliding": (40, 1024), "mlp.gate_up_proj": (96, 512), "mlp.down_proj": (40, 1280),
        "qkv_proj.sliding": (48, 1024), "o_proj.full": (40, 1536), "qk_proj.full": (56, 1024)}
LAYERS = {"sliding": ["qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"],
          "full": ["qk_proj.full", "o_proj.full", "mlp.gate_up_proj", "mlp.down_proj"]}


@triton.jit
def _prefetch_kernel(ptr, out_ptr, NBYTES, PER_PROG, MODE: tl.constexpr, STRIDE: tl.constexpr,
                     BLOCK: tl.constexpr, ASM: tl.constexpr):
    """Asks the L2 for bytes [pid * PER_PROG, min(NBYTES, (pid + 1) * PER_PROG)) of ptr, STRIDE
    bytes an instruction, BLOCK instructions a step; writes 0 (the asm's results, so that nothing
    is dead code). In the interpreter (no PTX) it only writes the 0."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * PER_PROG
    end = tl.minimum(start + PER_PROG, NBYTES)
    tl.store(out_ptr + pid, _prefetch_range(ptr, start, end, MODE, STRIDE, BLOCK, ASM))


@triton.jit
def _spin_prefetch_kernel(out_ptr, NS, w_ptr, WBYTES, s_ptr, SBYTES, PER_PROG, MODE: tl.constexpr,
                          STRIDE: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr):
    """The attention stand-in that prefetches the next weight itself: program 0 waits NS ns on the
    global timer (`_spin_kernel`), programs 1.. ask the L2 for PER_PROG bytes each of the weight's
    first WBYTES, then of its scales' first SBYTES. The transfer runs while the kernel does, as a
    prefetch issued from inside the attention kernel would."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(out_ptr, _spin_wait(NS, ASM))
    else:
        j = (pid - 1).to(tl.int64)
        wprogs = tl.cdiv(WBYTES, PER_PROG)
        if j < wprogs:
            start = j * PER_PROG
            r = _prefetch_range(w_ptr, start, tl.minimum(start + PER_PROG, WBYTES), MODE, STRIDE, BLOCK, ASM)
        else:
            start = (j - wprogs) * PER_PROG
            r = _prefetch_range(s_ptr, start, tl.minimum(start + PER_PROG, SBYTES), MODE, STRIDE, BLOCK, ASM)
        tl.store(out_ptr + pid, r)


@triton.jit
def _prefetch_range(ptr, start, end, MODE: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                    ASM: tl.constexpr):
    """Asks the L2 for bytes [start, end) of ptr (`_prefetch_kernel`'s modes); returns 0 (the asm's
    results summed)."""
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    if ASM:
        for off in range(start, end, BLOCK * STRIDE):
            o = off + tl.arange(0, BLOCK).to(tl.int64) * STRIDE
            p = ptr + o
            ok = (o < end).to(tl.int32)
            if MODE == 0:
                r = tl.inline_asm_elementwise(
                    "{ .reg .pred q; setp.ne.b32 q, $2, 0; @q prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                    "=r,l,r", [p, ok], dtype=tl.int32, is_pure=False, pack=1)
            elif MODE == 1:
                r = tl.inline_asm_elementwise(
                    "{ .reg .pred q; setp.ne.b32 q, $2, 0; @q prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0; }",
                    "=r,l,r", [p, ok], dtype=tl.int32, is_pure=False, pack=1)
            else:
                size = tl.minimum(end - o, STRIDE).to(tl.int32)
                r = tl.inline_asm_elementwise(
                    "{ .reg .pred q; setp.ne.b32 q, $2, 0; @q cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
                    "=r,l,r,r", [p, ok, size], dtype=tl.int32, is_pure=False, pack=1)
            acc += r
    return tl.sum(acc, axis=0)


@triton.jit
def _spin_kernel(out_ptr, NS, ASM: tl.constexpr):
    """Waits NS nanoseconds on the global timer (one program: a kernel that takes time, reads nothing)."""
    tl.store(out_ptr, _spin_wait(NS, ASM))


@triton.jit
def _spin_wait(NS, ASM: tl.constexpr):
    """Waits NS nanoseconds on the global timer; returns the time waited (0 in the interpreter)."""
    waited = 0
    if ASM:
        t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        t = t0
        while t - t0 < NS:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
        waited = (t - t0).to(tl.int32)
    return waited


_SINK = {}


def _sink(n: int) -> torch.Tensor:
    if n not in _SINK:
        _SINK[n] = torch.empty(n, device=DEVICE, dtype=torch.int32)
    return _SINK[n]


def prefetch(t: torch.Tensor, nbytes: int, mode: str, programs: int = 132) -> None:
    """The first `nbytes` of t (contiguous) asked into the L2 by `_prefetch_kernel` in `mode`."""
    nbytes = min(nbytes, t.numel() * t.element_size()) // 16 * 16
    if nbytes <= 0:
        return
    stride = BULK if mode == "bulk" else LINE
    per_prog = triton.cdiv(triton.cdiv(nbytes, programs), stride) * stride
    grid = triton.cdiv(nbytes, per_prog)
    _prefetch_kernel[(grid,)](t.view(torch.uint8).view(-1), _sink(grid), nbytes, per_prog, MODE=MODES[mode],
                              STRIDE=stride, BLOCK=32 if mode == "bulk" else 128, ASM=not _INTERPRET, num_warps=4)


def head_bytes(q: torch.Tensor, s: torch.Tensor, nbytes: int) -> tuple[int, int]:
    """Bytes of a packed weight's first whole rows (up to `nbytes` of it, at least one row) and of
    the same rows' scales."""
    rows = min(q.shape[0], max(1, nbytes // (q.shape[1] * q.element_size())))
    return rows * q.shape[1] * q.element_size(), rows * s.shape[1] * s.element_size()


def prefetch_weight(q: torch.Tensor, s: torch.Tensor, nbytes: int, mode: str) -> None:
    """The first rows of a packed weight (up to `nbytes` of it) and the same rows' scales."""
    wbytes, sbytes = head_bytes(q, s, nbytes)
    prefetch(q, wbytes, mode)
    prefetch(s, sbytes, mode)


def spin(us: float) -> None:
    if us > 0:
        _spin_kernel[(1,)](_sink(1), int(us * 1000), ASM=not _INTERPRET, num_warps=1)


def spin_prefetch(us: float, q: torch.Tensor, s: torch.Tensor, nbytes: int, mode: str, programs: int = 132) -> None:
    """`spin` whose kernel also prefetches the weight's first rows (up to `nbytes`) and their scales
    (`_spin_prefetch_kernel`): one launch, the transfer beside the wait."""
    wbytes, sbytes = (b // 16 * 16 for b in head_bytes(q, s, nbytes))
    stride = BULK if mode == "bulk" else LINE
    per_prog = triton.cdiv(triton.cdiv(wbytes + sbytes, programs), stride) * stride
    grid = 1 + triton.cdiv(wbytes, per_prog) + triton.cdiv(sbytes, per_prog)
    _spin_prefetch_kernel[(grid,)](_sink(grid), int(us * 1000), q.view(torch.uint8).view(-1), wbytes,
                                   s.view(torch.uint8).view(-1), sbytes, per_prog, MODE=MODES[mode], STRIDE=stride,
                                   BLOCK=32 if mode == "bulk" else 128, ASM=not _INTERPRET, num_warps=4)


class Step:
    """One projection of a decode step: x = src * gain (what a norm or an activation leaves), then
    the op's M == 1 path on the given weight copy."""

    def __init__(self, name: str, n: int, k: int):
        self.name, self.n, self.k = name, n, k
        self.nbytes, self.ws, self.ref_w = rotated_weights(n, k, GROUP)
        self.src = torch.randn(1, k, device=DEVICE, dtype=XDT)
        self.gain = torch.rand(k, device=DEVICE, dtype=XDT) + 0.5

    def x(self):
        return torch.mul(self.src, self.gain)

    def __call__(self, c: int):
        q, s = self.ws[c % len(self.ws)]
        return im.int4_linear(self.x(), q, s)

    def pf(self, c: int, nbytes: int, mode: str):
        q, s = self.ws[c % len(self.ws)]
        prefetch_weight(q, s, nbytes, mode)

    def spin_pf(self, c: int, us: float, nbytes: int, mode: str):
        """The attention stand-in prefetching this weight's head itself."""
        q, s = self.ws[c % len(self.ws)]
        spin_prefetch(us, q, s, nbytes, mode)


def shape_variants(st: Step, pmax: int, spin_us: float, bulk_ok: bool) -> dict:
    """name -> fn(c) for one copy c: the per-shape graphs (module doc)."""
    out = {"base": lambda c: (spin(spin_us), st.x()), "cold": lambda c: (spin(spin_us), st(c))}
    for mode in MODES:
        if mode == "bulk" and not bulk_ok:
            continue
        out[f"pf/{mode}"] = lambda c, m=mode: (st.pf(c, pmax, m), spin(spin_us), st(c))
    mode = "bulk" if bulk_ok else "line"
    out["pf_base"] = lambda c: (st.pf(c, pmax, mode), spin(spin_us), st.x())
    out[f"nospin/{mode}"] = lambda c: (st.pf(c, pmax, mode), st(c))
    for m in ("line", mode):  # prefetched from inside the stand-in: the transfer beside its wait
        out[f"inspin/{m}"] = lambda c, m=m: (st.spin_pf(c, spin_us, pmax, m), st(c))
    out["inspin_base"] = lambda c: (st.spin_pf(c, spin_us, pmax, mode), st.x())
    return out


def layer_variants(steps: list[Step], pmax: int, head: int, spin_us: float, mode: str) -> dict:
    """name -> fn(c): a layer's projections in order, a spin for attention between the first two."""
    qkv, o, gu, dn = steps

    def run(c, pf_o=None, heads=False):
        """pf_o: the o weight prefetched by its own kernel before the stand-in ("kernel"), by the
        stand-in itself ("inside"), or not (None)."""
        ys = [qkv(c)]
        if pf_o == "kernel":
            o.pf(c, pmax, mode)
        if pf_o == "inside":
            o.spin_pf(c, spin_us, pmax, mode)
        else:
            spin(spin_us)
        if heads:
            gu.pf(c, head, mode)  # while o reads from the L2
        ys.append(o(c))
        if heads:
            dn.pf(c, head, mode)
        ys.append(gu(c))
        if heads:
            qkv.pf(c + 1, head, mode)  # the next layer's first projection
        ys.append(dn(c))
        return ys

    return {"off": lambda c: run(c), "pf_o": lambda c: run(c, "kernel"),
            "pf_o+heads": lambda c: run(c, "kernel", True), "pf_o_in": lambda c: run(c, "inside"),
            "pf_o_in+heads": lambda c: run(c, "inside", True), "attn_only": lambda c: spin(spin_us)}


def graph_us(fn, copies: int, reps: int) -> float:
    return bench_graph(lambda: [fn(c) for c in range(copies)], copies, reps)


def alternated(fns: dict, copies: int, rounds: int, reps: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            try:
                times[name].append(graph_us(fn, copies, reps))
            except Exception as e:  # reported, not fatal (its checks fail first)
                print(f"  {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                times[name].append(float("nan"))
    return times


def median(ts):
    ts = sorted(t for t in ts if t == t)
    return ts[len(ts) // 2] if ts else float("nan")


def check(fns: dict, outs_of, ref) -> tuple[float, bool]:
    """(cold's rel err vs fp32, every variant's output bitwise cold's) on the same fresh x."""
    ys = {name: outs_of(fn) for name, fn in fns.items()}
    if not _INTERPRET:
        torch.cuda.synchronize()
    cold = ys.pop("cold")
    same = all(torch.equal(a, b) for y in ys.values() for a, b in zip(y, cold))
    return max(rel(a, r) for a, r in zip(cold, ref)), same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_prefetch_variants.json"))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; what is left when it runs out is skipped")
    ap.add_argument("--spin-us", type=float, default=SPIN_US, help="the attention stand-in's duration")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    a = ap.parse_args(argv)
    if a.interpret and not _INTERPRET:
        return main_in_interpreter("scripts.gemv1_prefetch_variants",
                                   [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--interpret"])
    t0 = time.time()
    if not launch_directly("gemv1_prefetch_variants"):
        return 2
    gbps, dev = sweep_setup(None, 0, 0)
    l2 = 4 << 20 if _INTERPRET else torch.cuda.get_device_properties(0).L2_cache_size
    bulk_ok = not _INTERPRET and torch.cuda.get_device_capability() >= (9, 0)
    pmax = int(0.6 * l2)  # what a prefetch asks for at most: room for x, outputs and the rest
    head = int(0.3 * l2)  # a weight's head prefetched one projection ahead
    print(f"copy {gbps:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB, prefetch <= {pmax / 2**20:.0f} MiB ({dev})", flush=True)
    doc = {"device": dev, "copy_gbps": gbps, "l2_bytes": l2, "prefetch_max_bytes": pmax, "head_bytes": head,
           "spin_us": a.spin_us, "shapes": [], "layers": {}}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    if _INTERPRET:
        shapes = dict(TINY)
    else:
        from export.gemma4.config import PRESETS
        from scripts.bench_int4 import linear_shapes
        shapes = {(nm if isinstance(nm, str) else "+".join(nm)): (n, k)
                  for (n, k), (nm, _) in linear_shapes(PRESETS["31b"]).items()}
    steps = {nm: Step(nm, *shapes[nm]) for nm in dict.fromkeys(LAYERS["sliding"] + LAYERS["full"])}
    ok = True
    rounds, copies_max = (1, 2) if _INTERPRET else (2, 64)
    print(f"{'shape':18} {'N x K':>12} {'MB':>6} {'floor':>6} | {'base':>6} {'cold':>6} "
          + " ".join(f"{m:>8}" for m in ["pf/line", "pf/line_el", "pf/bulk", "pf_base", "nospin", "in/line",
                                         "in/bulk", "in_base"])
          + "   (GEMV us = graph - base)", flush=True)
    order = ["o_proj.sliding", "o_proj.full", "qkv_proj.sliding", "qk_proj.full", "mlp.down_proj", "mlp.gate_up_proj"]
    for nm in order:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {nm} skipped", flush=True)
            continue
        st = steps[nm]
        fns = shape_variants(st, pmax, a.spin_us, bulk_ok)
        last = len(st.ws) - 1
        gemv = {k_: f for k_, f in fns.items() if k_ not in ("base", "pf_base", "inspin_base")}
        x_ref = st.x().float()
        err, same = check(gemv, lambda f: [f(last)[-1]], [x_ref @ st.ref_w.t()])
        good = err <= 1e-2 and same
        ok = ok and good
        copies = min(len(st.ws), copies_max)
        times = alternated(fns, copies, rounds, a.reps)
        med = {k_: median(v) for k_, v in times.items()}
        floor = st.nbytes / gbps / 1e3
        doc["shapes"].append({"shape": nm, "n": st.n, "k": st.k, "bytes": st.nbytes, "floor_us": floor,
                              "copies": copies, "us": times, "rel_err": err, "bitwise_cold": same,
                              "gemv_us": {k_: med[k_] - med["base"] for k_ in gemv}})
        col = lambda k_: f"{med[k_] - med['base']:8.1f}" if k_ in med else f"{'-':>8}"  # noqa: E731
        nospin = next(k_ for k_ in med if k_.startswith("nospin"))
        print(f"{nm:18} {st.n:6}x{st.k:<5} {st.nbytes / 1e6:6.1f} {floor:6.1f} | {med['base']:6.1f} "
              f"{med['cold'] - med['base']:6.1f} " + " ".join(col(k_) for k_ in ("pf/line", "pf/line_el", "pf/bulk"))
              + f" {med['pf_base'] - med['base']:8.1f} {col(nospin)} {col('inspin/line')} {col('inspin/bulk')} "
              f"{med['inspin_base'] - med['base']:8.1f}   "
              + ("bitwise = cold" if good else f"FAIL err {err:.1e} same {same}"), flush=True)
        save()
    mode = "bulk" if bulk_ok else "line"
    for lname, names in LAYERS.items():
        if time.time() - t0 > a.budget:
            print(f"budget spent: layer {lname} skipped", flush=True)
            continue
        ls = [steps[nm] for nm in names]
        fns = layer_variants(ls, pmax, head, a.spin_us, mode)
        last = min(len(s.ws) for s in ls) - 1
        gemv = {"cold" if k_ == "off" else k_: f for k_, f in fns.items() if k_ != "attn_only"}
        refs = [s.x().float() @ s.ref_w.t() for s in ls]
        err, same = check(gemv, lambda f: f(last), refs)
        good = err <= 1e-2 and same
        ok = ok and good
        copies = min(min(len(s.ws) for s in ls), copies_max)
        times = alternated(fns, copies, rounds, a.reps)
        med = {k_: median(v) for k_, v in times.items()}
        floor = sum(s.nbytes for s in ls) / gbps / 1e3
        doc["layers"][lname] = {"projections": names, "floor_us": floor, "copies": copies, "us": times,
                                "rel_err": err, "bitwise_off": same, "mode": mode}
        print(f"layer {lname:8} floor {floor:5.1f} us | attention stand-in {med['attn_only']:5.1f} | off "
              f"{med['off']:6.1f} pf_o {med['pf_o']:6.1f} ({med['pf_o'] - med['off']:+.1f}) pf_o+heads "
              f"{med['pf_o+heads']:6.1f} ({med['pf_o+heads'] - med['off']:+.1f}) pf_o_in {med['pf_o_in']:6.1f} "
              f"({med['pf_o_in'] - med['off']:+.1f}) pf_o_in+heads {med['pf_o_in+heads']:6.1f} "
              f"({med['pf_o_in+heads'] - med['off']:+.1f})   "
              + ("bitwise = off" if good else f"FAIL err {err:.1e} same {same}"), flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
