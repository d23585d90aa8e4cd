"""Programmatic dependent launch on and off for one artifact: the same `.so`, the same inputs, one
process each (a measuring tool, one GPU call).

    python -m scripts.pdl_ab --model DIR [--fills 1024,32768] [--steps 64] [--only PREFIXES ...] [--json out.json]

Why: on sm_90+ the kernels named by export/backends/cuda.py's `waiting_kernels` (the int4 op's
M == 1 kernels, decode attention, the Hadamard rotation, Inductor's pointwise and reduction kernels)
are compiled to wait on the grid before them and the artifact's launcher gives them the
programmatic-stream-serialization attribute (export/kernels/pdl.py), so each may start while the
kernel before it finishes. The launcher leaves the attribute off in a process started with
GEMMA4_PDL_OFF set, and gives it only to the kernels whose names start with one of the prefixes in
GEMMA4_PDL_ONLY where that is set (`--only`): the kernels are the same, their wait then returns at
once. So the runs differ in the launch alone, and must agree bit for bit: every decode step's
logits and tokens, greedy, after the same prompt.

Each run (a child process): load the artifact (CUDA-graph decode, the runner's default), prefill
to each fill with fixed random ids, then `--steps` greedy decode steps, each step's time by CUDA
events around the replay (median), every step's logits kept. The steps are queued without waiting
for their tokens (each step's argmax feeds the next on the device), so once the host is ahead of the
GPU the events time the GPU's step alone. With a wait for each token (as until 2026-12-03) the GPU
sat idle while the host launched the next step (the token's copy, the position's fill, the replay),
inside the events: a part of a small slice's step (0.28 ms for the E4B 2-layer slice) that varies
from process to process. The parent runs four children
(off, on, off, on: drift shows between a mode's two runs; six with `--only`: off, only, on, twice),
compares every run with the first, and writes one JSON with each mode's two medians per fill
(`off_ms`, `on_ms`, and `only_ms` with one `--only`), `bitwise_equal`, and the worst logits difference.
`--only` given more than once: a mode for each set (two runs each, alternated with the others), their
medians under `only_sets_ms` per fill (the sets under `only_sets`), to find which kernels gain or lose from the attribute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export.backends.cuda import PDL_OFF_ENV, PDL_ONLY_ENV


def run_child(model: str, fills: list[int], steps: int, out: str) -> None:
    """One process's decode: {fill: {ms, tokens}} as JSON at out, the logits beside it (.pt)."""
    import torch

    from runtime.artifact import Artifact
    from runtime.runner import Runner

    vocab = Artifact.open(model).metadata.vocab_size
    runner = Runner.load(model)  # the artifact's device (a CPU artifact: the script's dry run)
    cuda = runner.device.startswith("cuda")
    gen = torch.Generator().manual_seed(0)
    res, logits_all = {}, {}
    for fill in fills:
        runner.reset()
        ids = torch.randint(3, vocab, (fill,), generator=gen).tolist()
        logits = runner.prefill(ids)
        token = torch.argmax(logits.view(-1))
        times, tokens, kept, events = [], [], [], []
        for _ in range(steps):  # CUDA: no wait for a step's token, so the host queues steps ahead of the GPU
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t = time.perf_counter()
            out_logits = runner._decode(token)
            if cuda:
                b.record()
                events.append((a, b))
            kept.append(out_logits.float().clone())
            token = torch.argmax(out_logits)  # the next step's input, on the device
            tokens.append(token)
            if not cuda:
                times.append((time.perf_counter() - t) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in events]
        tokens = torch.stack(tokens).tolist()
        res[str(fill)] = {"median_ms": statistics.median(times), "tokens": tokens}
        logits_all[str(fill)] = torch.stack(kept).cpu()
    torch.save(logits_all, out + ".pt")
    Path(out).write_text(json.dumps(res))


def run_order(n_only: int) -> list[tuple]:
    """The child runs, (mode, round): off, each `--only` set (its index), on, then all again."""
    return [(mode, rnd) for rnd in (1, 2) for mode in ("off", *range(n_only), "on")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an artifact exported for CUDA on an sm_90+ GPU")
    p.add_argument("--fills", default="1024,32768", help="prompt lengths to decode after (comma-separated)")
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps per fill")
    p.add_argument("--only", action="append", default=[],
                   help="a third mode: the attribute for the waiting kernels whose names start with one of these "
                        "comma-separated prefixes alone (e.g. _quant_x_kernel,_int4_gemv1_kernel); more than once: "
                        "a mode for each set")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    fills = [int(f) for f in a.fills.split(",") if f]
    if a.child:
        run_child(a.model, fills, a.steps, a.child)
        return 0
    import torch

    runs = {}  # (mode, round) -> (times and tokens, logits)
    only_names = [f"only{i}" if i else "only" for i in range(len(a.only))]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, rnd in run_order(len(a.only)):  # alternated: drift shows between a mode's two rounds
            env = dict(os.environ)
            env.pop(PDL_OFF_ENV, None)
            env.pop(PDL_ONLY_ENV, None)
            if mode == "off":
                env[PDL_OFF_ENV] = "1"
            elif mode != "on":
                env[PDL_ONLY_ENV] = a.only[mode]
            out = os.path.join(tmp, f"{mode}-{rnd}.json")
            r = subprocess.run([sys.executable, "-m", "scripts.pdl_ab", "--model", a.model, "--fills", a.fills,
                                "--steps", str(a.steps), "--child", out], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{mode} (round {rnd}): the run failed\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[mode, rnd] = (json.loads(Path(out).read_text()), torch.load(out + ".pt"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    doc = {"model": a.model, "steps": a.steps, "device": device, "fills": {}}
    if len(a.only) == 1:
        doc["only"] = a.only[0]
    elif a.only:
        doc["only_sets"] = a.only
    ok = True
    print(f"{'fill':>7} {'off ms':>8}{''.join(f' {n:>8}' for n in only_names)} {'on ms':>8} {'change':>8}  "
          "bitwise (logits and tokens, every step)")
    for f in map(str, fills):
        first = runs["off", 1]
        same = all(torch.equal(run[1][f], first[1][f]) and run[0][f]["tokens"] == first[0][f]["tokens"]
                   for run in runs.values())
        worst = max(float((run[1][f] - first[1][f]).abs().max()) for run in runs.values())
        off = [runs["off", r][0][f]["median_ms"] for r in (1, 2)]
        on = [runs["on", r][0][f]["median_ms"] for r in (1, 2)]
        doc["fills"][f] = {"off_ms": off, "on_ms": on, "bitwise_equal": same, "max_abs_logit_diff": worst}
        only = ""
        sets = [[runs[i, r][0][f]["median_ms"] for r in (1, 2)] for i in range(len(a.only))]
        if len(sets) == 1:
            doc["fills"][f]["only_ms"] = sets[0]
        elif sets:
            doc["fills"][f]["only_sets_ms"] = sets
        only = "".join(f" {min(t):8.3f}" for t in sets)
        ok = ok and same
        print(f"{f:>7} {min(off):8.3f}{only} {min(on):8.3f} {min(on) - min(off):+8.3f}  {same} (max |diff| {worst:.2e})")
    doc["bitwise_equal"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
