"""Greedy decoding's last kernel: the token id of the largest of the vocab's logits, one way or another (a
measuring tool, one GPU call, seconds).

    python -m scripts.argmax_variants [--vocab 262144] [--rows 128,256,512,1024] [--iters 200] [--out JSON]

Why: the runner's greedy sampler ran `logits.argmax()` after each decode step's graph: one reduction kernel of
8.3-8.7 us on the H200 (`decode_profile_31b_12l_int4.json`, `profile_e2b_whole.json`) for 1 MiB of fp32
logits, which the copy bandwidth reads in ~0.25 us. Variants, each timed as the runner launches it (eagerly,
on the stream after the step) and as a CUDA graph of the same ops, CUDA events around `--iters` calls, median
of 5 such runs, us a call:
- `argmax`: `logits.argmax()`;
- `rows<R>`: `greedy_token` with the logits viewed as [R, vocab / R]: each row's max and its first index (one
  kernel, R rows in parallel), then the first row holding the largest (a second, small kernel) and the index
  within it (a gather and an add: four launches). The runner's sampler (runtime/sampling.py) takes it if it
  is faster here.
Checks, on fresh random logits per variant (fp32, the maximum planted twice, the second copy at a later index):
every variant's token equals `argmax`'s, the first index of the maximum. The eager figure includes the host's
launches where they are slower than the GPU (the runner queues them ahead of the GPU); the graph's is the GPU's. Copy bandwidth in the
same run. Table on stdout, JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from scripts import needs_cuda


def greedy_token(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """The first index of the largest of `logits` [vocab] as an int64 tensor of shape [1], as `argmax` gives it,
    in two reductions where `rows` divides the vocab: each row's max and its first index (the rows in parallel),
    then the first row holding the largest; all on the device (no host sync)."""
    n = logits.numel()
    if n % rows:
        return logits.argmax().reshape(1)
    best, where = logits.view(rows, n // rows).max(dim=1)  # ties: the first index in the row
    row = best.argmax().reshape(1)  # ties: the first row
    return where.gather(0, row).add_(row, alpha=n // rows)


def copy_gbps(n_bytes: int = 1 << 30) -> float:
    a = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n_bytes / statistics.median(times) / 1e9


def time_us(fn, iters: int, graph: bool) -> float:
    """Median over 5 runs of the time of `iters` calls (or of one replay of a graph of `iters` calls), per call."""
    for _ in range(3):
        fn()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            with torch.cuda.graph(g, stream=s, capture_error_mode="relaxed"):
                for _ in range(iters):
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        if graph:
            run()
        else:
            for _ in range(iters):
                run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def fresh_logits(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(vocab, generator=g, device="cuda") * 4
    hi = int(torch.randint(0, vocab // 2, (1,), generator=g, device="cuda"))
    x[hi] = x.max() + 1
    x[hi + vocab // 3] = x[hi]  # a tie at a later index: the first must win
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--rows", default="128,256,512,1024", help="row counts for the two-kernel variant")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        print(f"argmax_variants: --rows takes comma-separated integers, got {args.rows!r}", file=sys.stderr)
        return 2
    variants = {"argmax": lambda x: x.argmax().reshape(1)}
    for r in rows:
        if r < 1 or args.vocab % r:
            print(f"argmax_variants: --rows {r} does not divide --vocab {args.vocab}", file=sys.stderr)
            return 2
        variants[f"rows{r}"] = lambda x, r=r: greedy_token(x, rows=r)
    if not needs_cuda("argmax_variants"):
        return 2
    gbps = copy_gbps()
    results = []
    for i, (name, fn) in enumerate(variants.items()):
        x = fresh_logits(args.vocab, seed=i)
        want = int(x.argmax())
        got = int(fn(x))
        row = {"variant": name, "token_ok": got == want,
               "eager_us": time_us(lambda: fn(x), args.iters, graph=False), "graph_us": None}
        try:
            row["graph_us"] = time_us(lambda: fn(x), args.iters, graph=True)
        except RuntimeError as e:  # a capture that fails is reported, the eager figure kept
            row["graph_error"] = str(e).splitlines()[0]
            torch.cuda.synchronize()
        results.append(row)
        graph = "   failed" if row["graph_us"] is None else f"{row['graph_us']:7.2f} us"
        print(f"{name:>10}  eager {row['eager_us']:7.2f} us  graph {graph}  "
              f"token {'ok' if row['token_ok'] else f'WRONG {got} != {want}'}")
    floor_us = args.vocab * 4 / (gbps * 1e3)
    print(f"copy {gbps:.0f} GB/s: the logits' bytes at that rate {floor_us:.2f} us")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "vocab": args.vocab,
                                        "copy_gbps": gbps, "read_floor_us": floor_us, "iters": args.iters,
                                        "rows": results, "elapsed_s": round(time.perf_counter() - t0, 1)},
                                       indent=1) + "\n")
    return 0 if all(r["token_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
