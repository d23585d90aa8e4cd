"""The Hadamard rotation of a quantized-KV full layer: `gemma4::hadamard` (one Triton kernel) beside
the aten butterflies it replaced, as Inductor compiles them, in one GPU call.

    python -m scripts.hadamard_variants [--out hadamard_variants.json] [--reps 200]

Shapes: head_dim 512 (the 31B's, E2B / E4B's and the 26B's full layers), decode (q [1, 1, 32, 512],
k and v [1, 4, 1, 512], the output as q) and a 2048-token prefill chunk (q [1, 2048, 32, 512],
k [1, 4, 2048, 512]); "layer" rows time a decode layer's four rotations (q, k, v, out) replayed as
one CUDA graph. Variants: `op` (torch.ops.gemma4.hadamard), `aten` (export/kernels/hadamard.py's
`hadamard_reference` under torch.compile, as the exported graph held it); each checked bitwise
against the eager reference on fresh inputs, its kernels counted from one profiled replay, timed
as CUDA-graph replays (median of `--reps`), with the bytes it must move (read + write once) over
the copy bandwidth measured in the same run. Table on stdout, JSON with `copy_gbps` and `rows`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from export.kernels import hadamard as Hd
from scripts import needs_cuda

SHAPES = {  # name: shapes rotated together (one graph)
    "decode q": [(1, 1, 32, 512)],
    "decode k": [(1, 4, 1, 512)],
    "decode layer (q, k, v, out)": [(1, 1, 32, 512), (1, 4, 1, 512), (1, 4, 1, 512), (1, 1, 32, 512)],
    "prefill q 2048": [(1, 2048, 32, 512)],
    "prefill k 2048": [(1, 4, 2048, 512)],
}


def copy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / us / 1e3


def graph_us(fn, reps: int) -> float:
    """Median microseconds of one replay of a CUDA graph holding fn (after a warm-up call)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def variants() -> dict:
    compiled = torch.compile(Hd.hadamard_reference, dynamic=False)
    return {"op": torch.ops.gemma4.hadamard, "aten": compiled}


def run(reps: int) -> dict:
    gbps = copy_gbps()
    doc = {"device": torch.cuda.get_device_name(), "copy_gbps": gbps, "rows": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shapes in SHAPES.items():
        xs = [torch.randn(*s, generator=gen, device="cuda").to(torch.bfloat16) for s in shapes]
        nbytes = sum(2 * x.numel() * x.element_size() for x in xs)
        floor_us = nbytes / gbps / 1e3
        for vname, fn in variants().items():
            outs = [fn(x) for x in xs]
            ok = all(torch.equal(o, Hd.hadamard_reference(x)) for o, x in zip(outs, xs))
            call = lambda: [fn(x) for x in xs]  # noqa: E731
            kernels = kernels_per_call(call)
            us = graph_us(call, reps)
            row = {"shape": name, "variant": vname, "us": us, "kernels": kernels, "bytes": nbytes,
                   "fraction_of_copy_bw": floor_us / us, "bitwise": ok}
            doc["rows"].append(row)
            print(f"{name:30} {vname:5} {us:9.2f} us  {kernels:3} kernels  {row['fraction_of_copy_bw']:6.1%} of copy"
                  f"  bitwise {ok}", flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="hadamard_variants.json", help="JSON written here")
    ap.add_argument("--reps", type=int, default=200, help="graph replays per timing (median)")
    args = ap.parse_args(argv)
    if not needs_cuda("hadamard_variants"):
        return 2
    t0 = time.perf_counter()
    doc = run(args.reps)
    doc["elapsed_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({doc['elapsed_s']:.0f} s)")
    return 0 if all(r["bitwise"] for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
