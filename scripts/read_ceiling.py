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


def deep_read(words: torch.Tensor, sink: torch.Tensor, waves: int, unroll: int, warps: int, sms: int):
    nv = words.numel() // 4
    grid = min(sink.numel(), waves * sms)
    per = triton.cdiv(nv, grid)
    grid = triton.cdiv(nv, per)
    _deep_read_kernel[(grid,)](words, sink, nv, per, UNROLL=unroll, BLOCK=32 * warps, num_warps=warps)
    return sink[:grid]


def xor_all(t: torch.Tensor) -> int:
    v = t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = 0
    for x in v.view(-1).tolist() if _INTERPRET else [int(_xor_reduce(v.view(-1)))]:
        out ^= x
    return out


def _xor_reduce(v: torch.Tensor) -> int:
    while v.numel() > 1:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[: v.numel() // 2] ^ v[v.numel() // 2:]
    return int(v.item())


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("read_ceiling.json"))
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; sizes left when it runs out are skipped")
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
