"""How fast one kernel can read N bytes from HBM, at the sizes of the 31B's M == 1 weights (a
measuring tool, one GPU call): the ceiling the GEMV is held to.

    python -m scripts.read_ceiling [--out read_ceiling.json] [--budget 90]
    python -m scripts.read_ceiling --interpret [--out smoke.json]   # CPU: Triton's interpreter, tiny sizes

Why: the GEMV on the mid shapes (22-58 MB) runs at 43-58% of the copy bandwidth and within 1-3 us
of `gemv1_variants._stream_read_kernel` reading the same bytes; but that read keeps one 4 KiB load
per program in flight (each step's xor waits on its load), so it may be a latency ceiling of its
own making rather than the GPU's. Here the same bytes are read by kernels with more loads in
flight: `_deep_read_kernel` (16 bytes a thread a load, UNROLL independent loads before any is
used, a grid of WAVES x the SM count, each program a contiguous range), beside torch's own
reduction over the words and a device-to-device copy of them (which also writes them: its GB/s
counts read + written bytes, as the copy bandwidth does).

`--rows`: the GEMV's own walk without its arithmetic (`_rows_read_kernel`: [rows, words] tiles
of the row-major weight, K slices, steps issued together, with and without the scales' loads)
beside the deep read of the same words, on four 31B shapes: where the GEMV's access pattern loses
to the contiguous read, and what its scales cost.

Per size (the 31B's M == 1 weights with their scales, and one above the L2, one below): buffers
rotated so that each read comes from HBM (>= 512 MB of copies), as one CUDA graph (median of its
replays, us per read); every kernel's result checked against torch's xor of the words. Table on
stdout; one JSON (`--out`) with `copy_gbps`, `rows` (size, variant, us, gbps, fraction_of_copy_bw).
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

from scripts.gemv1_variants import bench_graph, finish_sweep, launch_directly, main_in_interpreter, sweep_setup

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"


@triton.jit
def _deep_read_kernel(src_ptr, out_ptr, NV, PER_PROG, UNROLL: tl.constexpr, BLOCK: tl.constexpr):
    """Reads vectors [pid * PER_PROG, (pid + 1) * PER_PROG) of NV 16-byte vectors (4 int32 each),
    BLOCK vectors a load (one a thread), UNROLL loads issued before their xor; writes one word."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * PER_PROG
    end = tl.minimum(start + PER_PROG, NV)
    acc = tl.zeros((BLOCK, 4), dtype=tl.int32)
    lane = tl.arange(0, BLOCK)[:, None] * 4 + tl.arange(0, 4)[None, :]
    for v0 in range(start, end, UNROLL * BLOCK):
        for u in tl.static_range(UNROLL):
            vi = v0 + u * BLOCK + tl.arange(0, BLOCK)[:, None]
            acc ^= tl.load(src_ptr + (v0 + u * BLOCK) * 4 + lane, mask=vi < end, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def _rows_read_kernel(w_ptr, s_ptr, out_ptr, N, KW, SPS, stride_ww, stride_sn, BLOCK_N: tl.constexpr,
                      STEP_W: tl.constexpr, UNROLL: tl.constexpr, SCALES: tl.constexpr):
    """The GEMV's access pattern without its arithmetic: program (pid_n, pid_k) reads rows
    pid_n * BLOCK_N .. of a row-major [N, KW] int32 weight, words [pid_k * SPS, +SPS) in steps of
    STEP_W words a row ([BLOCK_N, STEP_W] tiles, 16-byte loads), UNROLL steps issued before their
    xor; SCALES: also each step's bf16 scales [BLOCK_N, STEP_W / 16] of a row-major [N, KW / 16]
    table (read as int16). Writes one word a program."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    lo = pid_k * SPS
    hi = tl.minimum(lo + SPS, KW)
    c = tl.arange(0, STEP_W)[None, :]
    cs = tl.arange(0, STEP_W // 16)[None, :]
    acc = tl.zeros((BLOCK_N, STEP_W), dtype=tl.int32)
    sacc = tl.zeros((BLOCK_N, STEP_W // 16), dtype=tl.int32)
    for t in range(lo, hi, UNROLL * STEP_W):
        for u in tl.static_range(UNROLL):
            w0 = t + u * STEP_W
            acc ^= tl.load(w_ptr + rows[:, None] * stride_ww + (w0 + c), mask=(w0 + c) < hi, other=0)
            if SCALES:
                sv = tl.load(s_ptr + rows[:, None] * stride_sn + (w0 // 16 + cs), mask=(w0 + cs * 16) < hi, other=0)
                sacc ^= sv.to(tl.int32)
    tot = tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0) ^ tl.xor_sum(tl.xor_sum(sacc, axis=1), axis=0)
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tot)


def rows_read(words: torch.Tensor, scales: torch.Tensor, sink: torch.Tensor, block_n: int, step_w: int, unroll: int,
              warps: int, splits: int, with_scales: bool):
    """`_rows_read_kernel` over words [N, KW] (and scales [N, KW / 16]) in `splits` K slices of whole
    steps; its per-program words (xor them all for the check)."""
    n, kw = words.shape
    sps = triton.cdiv(triton.cdiv(kw, splits), step_w) * step_w
    splits = triton.cdiv(kw, sps)
    grid = (triton.cdiv(n, block_n), splits)
    out = sink[:grid[0] * grid[1]]
    _rows_read_kernel[grid](words, scales, out, n, kw, sps, words.stride(0), scales.stride(0), BLOCK_N=block_n,
                            STEP_W=step_w, UNROLL=unroll, SCALES=with_scales, num_warps=warps)
    return out


def deep_read(words: torch.Tensor, sink: torch.Tensor, waves: int, unroll: int, warps: int, sms: int):
    nv = words.numel() // 4
    grid = min(sink.numel(), waves * sms)
    per = triton.cdiv(nv, grid)
    grid = triton.cdiv(nv, per)
    _deep_read_kernel[(grid,)](words, sink, nv, per, UNROLL=unroll, BLOCK=32 * warps, num_warps=warps)
    return sink[:grid]


def xor_all(t: torch.Tensor) -> int:
    """The xor of all of t's 32-bit words (as an unsigned int), halving the tensor until one is left."""
    v = (t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).view(-1)
    while v.numel() > 1:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[: v.numel() // 2] ^ v[v.numel() // 2:]
    return int(v.item()) if v.numel() else 0


def sizes() -> list[tuple[str, int]]:
    """(name, bytes): the 31B's M == 1 weights (packed int4 and bf16 scales at group 128), one
    size well below the L2 and one far above the largest mid shape."""
    if _INTERPRET:
        return [("tiny.a", 1 << 16), ("tiny.b", 3 << 15)]
    from export.gemma4.config import PRESETS
    from export.kernels.int4_matmul import int4_bytes
    from scripts.bench_int4 import linear_shapes
    out = [("8 MB", 8 << 20)]
    for (n, k), (names, _) in sorted(linear_shapes(PRESETS["31b"]).items(), key=lambda t: t[0][0] * t[0][1]):
        out.append((names if isinstance(names, str) else "+".join(names), int4_bytes(n, k, 128)))
    return out


ROWS_SHAPES = {"o_proj.sliding": (5376, 8192), "mlp.down_proj": (5376, 21504), "qkv_proj.sliding": (16384, 5376),
               "mlp.gate_up_proj": (43008, 5376)}


def rows_configs() -> list[tuple[int, int, int, int, int, bool]]:
    """(rows, words a row a step, steps issued together, warps, program waves, scales): 16-byte loads,
    4-64 words a thread a step."""
    out = []
    for bn in (8, 32, 128):
        for sw in (16, 32, 64):
            for u in (1, 4):
                for wp in (4, 8):
                    if not 4 <= bn * sw / (32 * wp) <= 64:
                        continue
                    for waves in (4, 8):
                        for sc in (False, True):
                            out.append((bn, sw, u, wp, waves, sc))
    return out


def rows_sweep(doc: dict, save, t0: float, budget: float, gbps: float, sms: int) -> int:
    """Per shape (ROWS_SHAPES, the GEMV's weights as [N, K / 8] int32 words and [N, K / 128] bf16
    scales): each `rows_configs` variant's xor checked against torch's, then timed as graph replays
    over rotated copies; K slices so that the programs come to `waves` x the SM count. What the
    table asks: does the GEMV's tile walk, without its arithmetic, read as fast as the contiguous
    deep read of the same bytes, and what do its scales cost."""
    rows, ok = doc["rows"], True
    shapes = {"tiny": (64, 4096)} if _INTERPRET else ROWS_SHAPES
    configs = rows_configs()
    if _INTERPRET:
        configs = [(8, 16, 1, 1, 2, False), (8, 32, 4, 1, 1, True)]
    sink = torch.empty(1 << 16, device=DEVICE, dtype=torch.int32)
    print(f"{'shape':18} {'MB':>6} {'floor':>6} | {'best without scales':28} {'us':>6} {'%':>4} | "
          f"{'best with scales':28} {'us':>6} {'%':>4} | deep w8 u4", flush=True)
    for name, (n, k) in shapes.items():
        if time.time() - t0 > budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        kw = k // 8
        nbytes = n * kw * 4 + n * (k // 128) * 2
        copies = 2 if _INTERPRET else max(2, math.ceil((256 << 20) / nbytes))
        ws = [(torch.randint(-2**31, 2**31 - 1, (n, kw), device=DEVICE, dtype=torch.int32),
               torch.randint(-2**15, 2**15 - 1, (n, k // 128), device=DEVICE, dtype=torch.int16)) for _ in range(copies)]
        want_w = xor_all(ws[-1][0])
        want_s = xor_all(ws[-1][1].to(torch.int32))
        floor = nbytes / gbps / 1e3
        best = {False: None, True: None}
        for bn, sw, u, wp, waves, sc in configs:
            splits = max(1, min(kw // sw, round(waves * sms / triton.cdiv(n, bn))))
            label = f"b{bn} s{sw} u{u} {wp}w x{splits}{' +scales' if sc else ''}"
            w, sv = ws[-1]
            got = xor_all(rows_read(w, sv, sink, bn, sw, u, wp, splits, sc))
            if got != (want_w ^ want_s if sc else want_w):
                ok = False
                print(f"  {label}: xor mismatch", flush=True)
                continue
            us = bench_graph(lambda: [rows_read(q, s_, sink, bn, sw, u, wp, splits, sc) for q, s_ in ws], copies)
            read = nbytes if sc else n * kw * 4
            rows.append({"size": name, "bytes": read, "variant": "rows " + label, "block_n": bn, "step_w": sw,
                         "unroll": u, "warps": wp, "splits": splits, "programs": triton.cdiv(n, bn) * splits,
                         "scales": sc, "us": us, "fraction_of_copy_bw": read / us / 1e3 / gbps})
            if best[sc] is None or us < best[sc][1]:
                best[sc] = (label, us, read / us / 1e3 / gbps)
        flat = ws[-1][0].view(-1)
        dsink = torch.empty(8 * sms, device=DEVICE, dtype=torch.int32)
        deep_us = bench_graph(lambda: [deep_read(q.view(-1), dsink, 8, 4, 4, sms) for q, _ in ws], copies)
        assert xor_all(deep_read(flat, dsink, 8, 4, 4, sms)) == want_w
        rows.append({"size": name, "bytes": n * kw * 4, "variant": "deep w8 u4 4w", "us": deep_us,
                     "fraction_of_copy_bw": n * kw * 4 / deep_us / 1e3 / gbps})
        fmt = lambda b: f"{b[0]:28} {b[1]:6.1f} {b[2]:4.0%}" if b else f"{'-':28} {'-':>6} {'-':>4}"  # noqa: E731
        print(f"{name:18} {nbytes / 1e6:6.1f} {floor:6.1f} | {fmt(best[False])} | {fmt(best[True])} | "
              f"{deep_us:6.1f} {n * kw * 4 / deep_us / 1e3 / gbps:4.0%}", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("read_ceiling.json"))
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; sizes left when it runs out are skipped")
    ap.add_argument("--rows", action="store_true",
                    help="the GEMV's access pattern instead: [rows, words] tiles of a row-major weight, with and "
                         "without its scales (`rows_sweep`)")
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    a = ap.parse_args(argv)
    if a.interpret and not _INTERPRET:
        return main_in_interpreter("scripts.read_ceiling",
                                   [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--interpret"])
    t0 = time.time()
    if not launch_directly("read_ceiling"):
        return 2
    gbps, dev = sweep_setup(None, 0, 0)
    sms = 4 if _INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {gbps:.0f} GB/s, {sms} SMs ({dev})", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "sms": sms, "rows": rows}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1) + "\n")  # noqa: E731
    configs = [(w, u, wp) for w in (1, 2, 4, 8) for u in (1, 4, 8) for wp in (4, 8)]
    if _INTERPRET:
        configs = [(1, 1, 4), (2, 4, 4)]
    if a.rows:
        return rows_sweep(doc, save, t0, a.budget, gbps, sms)
    sink = torch.empty(8 * sms, device=DEVICE, dtype=torch.int32)
    ok = True
    for name, nbytes in sizes():
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        nw = triton.cdiv(nbytes, 16) * 4  # whole 16-byte vectors
        copies = 2 if _INTERPRET else max(2, math.ceil((512 << 20) / (nw * 4)))
        bufs = [torch.randint(-2**31, 2**31 - 1, (nw,), device=DEVICE, dtype=torch.int32) for _ in range(copies)]
        want = xor_all(bufs[-1])
        res = {}
        for w, u, wp in configs:
            label = f"deep w{w} u{u} {wp}w"
            got = xor_all(deep_read(bufs[-1], sink, w, u, wp, sms))
            if got != want:
                ok = False
                print(f"  {label}: xor {got:#x} != {want:#x}", flush=True)
                continue
            res[label] = bench_graph(lambda: [deep_read(b, sink, w, u, wp, sms) for b in bufs], copies)
        res["torch sum"] = bench_graph(lambda: [b.sum() for b in bufs], copies)
        dst = torch.empty_like(bufs[0])
        res["torch copy (r+w)"] = bench_graph(lambda: [dst.copy_(b) for b in bufs], copies)
        floor = nbytes / gbps / 1e3
        for label, us in res.items():
            moved = 2 * nw * 4 if label.startswith("torch copy") else nw * 4
            rows.append({"size": name, "bytes": nw * 4, "variant": label, "us": us, "gbps": moved / us / 1e3,
                         "fraction_of_copy_bw": moved / us / 1e3 / gbps})
        deep = {k: v for k, v in res.items() if k.startswith("deep")}
        best = min(deep, key=deep.get) if deep else None
        line = (f"{name:20} {nbytes / 1e6:7.1f} MB floor {floor:7.1f} us | best {best} {deep[best]:7.1f} us "
                f"{floor / deep[best]:4.0%}" if best else f"{name:20} no deep read passed")
        w1 = {k: v for k, v in deep.items() if k.startswith("deep w1 u1")}
        if w1:
            k1 = min(w1, key=w1.get)
            line += f" | {k1} {w1[k1]:7.1f} us {floor / w1[k1]:4.0%}"
        line += (f" | sum {res['torch sum']:7.1f} us {floor / res['torch sum']:4.0%} | copy "
                 f"{res['torch copy (r+w)']:7.1f} us {2 * floor / res['torch copy (r+w)']:4.0%}")
        print(line, flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
