"""The M == 1 int4 GEMV on the small models' weights: the op's plan against one-launch tiles that read
K in one or few steps, in one GPU call (a tuning tool).

    python -m scripts.gemv1_small_variants [--out gemv1_small_variants.json] [--budget 150] [--prewarm 12]

Why: the E2B / E4B / 26B-A4B decode layer costs 80-115 us whatever its bytes (E2B reads 27 MB a
layer, 6 us at the copy bandwidth; scripts/measurements/variants.json). Their linears are small:
on the H200 the op took 5.5 us for E4B's 256 x 2560 per-layer gate (0.3 MB), 6.7-9 us for the
2048-8192-row projections, 2-10% of the copy bandwidth, about twice tinygemm's single launch
(scripts/measurements/int4_kernels.json). Such a call is latency: the op launches `_quant_x_kernel`
then the GEMV, whose programs walk K in dependent steps (8 rows x 8 K parts, a tile ahead). The
variants here are `_int4_gemv1_kernel` itself (no new kernel) with bf16 x (`XQ` off: one launch,
the nibble arithmetic on the FMA units, which only binds on large weights) and GROUPS wide enough
that a program reads its rows' whole K in one step (or two), BLOCK_N 1-8 rows, 4 or 8 warps,
beside the same tiles with x quantized (two launches), 4-32-row tiles with x computed once a program
(STAGE: labels `s...`), and the op's plan.

Per shape (the layers' projections below first, then every M == 1 linear of E2B, E4B and 26B-A4B up
to 12288 x 12288 and the experts' two shapes): each variant checked against an fp32 matmul on the dequantized weight on two fresh x
(rel err <= 1e-2), then timed as CUDA-graph replays over rotated weight copies (>= 256 MB, so the
weights come from HBM and the calls follow each other as in a decode step; median), beside a
streaming read of the same words; copy bandwidth measured in the same run. Then one sliding layer of
E4B, E2B and 26B-A4B (its projections in order) as one graph: the op's plan against each shape's
best variant. Table on stdout, one JSON (`--out`) with `copy_gbps`, `rows`, `best`, `layers`.
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

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (bench_graph, check_and_time, finish_sweep, launch_directly, layer_graph,
                                    main_in_interpreter, rotated_weights, stream_read_us, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16  # the bf16-x tiles read x as bf16 pairs, under the interpreter too
MAX_WORDS_A_THREAD = 64  # a step's tile words per thread (int32 registers) a variant may hold

MODELS = ("e2b", "e4b", "26b-a4b")
LAYERS = {  # a sliding layer's M == 1 projections, in the order a decode step runs them
    "e4b": [(3072, 2560), (2560, 2048), (20480, 2560), (2560, 10240), (256, 2560), (2560, 256)],
    "e2b": [(2560, 1536), (1536, 2048), (12288, 1536), (1536, 6144), (256, 1536), (1536, 256)],
    "26b-a4b": [(8192, 2816), (2816, 4096), (4224, 2816), (2816, 2112)],
}


def shapes() -> list[tuple[str, int, int]]:
    """(name, n, k): the LAYERS' projections first (their graphs need them), then every other M == 1
    linear of the small models up to 12288 x 12288, the experts' two shapes included (the MoE op
    reads them per expert)."""
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes

    named = {}
    for m in MODELS:
        for (n, k), (names, _) in linear_shapes(PRESETS[m]).items():
            named.setdefault((n, k), f"{m}.{names}")
    first = [s for m in LAYERS for s in LAYERS[m]]
    rest = [s for s in named if s[0] <= 12288 and s[1] <= 12288]
    order = list(dict.fromkeys(first + rest))
    return [(named[s], *s) for s in order]


@dataclass(frozen=True)
class Variant:
    block_n: int
    groups: int  # adjacent groups a step (a power of two)
    warps: int
    xq: bool  # x as two int8 levels (`_quant_x_kernel` first: two launches)
    stage: bool = False  # bf16 x computed once a program (`_int4_gemv1_kernel`'s STAGE; 4 rows or more)

    @property
    def label(self) -> str:
        return f"{'q' if self.xq else 's' if self.stage else 'b'}{self.block_n}r{self.groups}g{self.warps}w"

    def config(self) -> triton.Config:
        return im._cfg1(self.block_n, self.groups, self.warps, parts=1, depth=1)

    def __call__(self, x2, q, s):
        cfg = self.config()
        return im.int4_gemv1(x2, q, s, 1, kernel=im._gemv1_kernel(cfg), xq=self.xq, stage=self.stage)


class Plan:
    """The op's M == 1 path as `int4_linear` takes it."""

    label = "plan"

    def __call__(self, x2, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        cfg, splits, xq, _ = im.gemv1_plan(n, k, im.group_size_for(k, 128))
        return im.int4_gemv1(x2, q, s, splits, kernel=im._gemv1_kernel(cfg), xq=xq)


def candidates(k: int) -> list[Variant]:
    """Tiles whose step covers K in one or two steps, within the register budget: 1-8 rows, 4 or
    8 warps, bf16 x; the one-step 4-warp tiles with x quantized too; and with x computed once a program
    (STAGE), 4-32 rows (x's cost no longer grows with the rows a program holds), also at a quarter of the
    row's groups a step (3 steps of 4 for E2B's 12 groups, where a step of 8 runs a second step half masked:
    16 groups' arithmetic for 12; compiled for sm_90, E2B's q / k / v loop at 16 rows x 4 groups is ~39 SASS
    instructions a word of the row against the plan's 57)."""
    g = im.group_size_for(k, 128)
    words = g // 8
    full = triton.next_power_of_2(k // g)
    out = []
    for steps in (1, 2, 4):
        groups = max(1, full // steps)
        for block_n in (1, 2, 4, 8, 16, 32):
            for warps in (4, 8):
                per_thread = block_n * groups * words / (32 * warps)
                if per_thread > MAX_WORDS_A_THREAD or per_thread < 1:
                    continue
                if block_n <= 8 and steps < 4:
                    out.append(Variant(block_n, groups, warps, xq=False))
                    if steps == 1 and warps == 4:
                        out.append(Variant(block_n, groups, warps, xq=True))
                if block_n >= 4:
                    out.append(Variant(block_n, groups, warps, xq=False, stage=True))
    return out


def time_calls(v, ws, k: int) -> float:
    x = torch.randn(1, k, device=DEVICE, dtype=XDT)
    return bench_graph(lambda: [v(x, q, s) for q, s in ws], len(ws))


def _prewarm_worker(idx, count):
    """Compiles every variant of every shape (Triton's disk cache) in one of `count` processes."""
    import scripts.gemv1_small_variants as me

    launch_directly("prewarm")
    jobs = [(v, n, k) for _, n, k in me.shapes() for v in [me.Plan(), *me.candidates(k)]][idx::count]
    for v, n, k in jobs:
        try:
            q, s = im.quantize_int4(torch.randn(n, k, device="cuda"), im.group_size_for(k, 128))
            v(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), q, s)
        except Exception:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_small_variants.json"))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=12, help="processes compiling the variants first (0: none)")
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    a = ap.parse_args(argv)
    if a.interpret and not _INTERPRET:
        return main_in_interpreter("scripts.gemv1_small_variants", [x for x in (argv or sys.argv[1:])
                                                                    if x != "--interpret"])
    t0 = time.time()
    if not launch_directly("gemv1_small_variants"):
        return 2
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 60)
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "best": {}, "layers": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    todo = shapes()
    if _INTERPRET:  # the logic on tiny stand-ins
        todo = [("small.a", 24, 512), ("small.b", 40, 256)]
    ok, weights, best = True, {}, {}
    print(f"{'shape':34} {'N x K':>12} {'floor':>6} {'read':>6} | {'best':12} {'us':>6} {'plan us':>7}", flush=True)
    for name, n, k in todo:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        g = im.group_size_for(k, 128)
        nbytes, ws, ref_w = rotated_weights(n, k, g)
        weights[(n, k)] = ws
        floor_us = nbytes / gbps / 1e3
        rd = stream_read_us([q.view(torch.int32).view(-1) for q, _ in ws], block=1024, warps=4)
        vs = [Plan(), *candidates(k)]
        if _INTERPRET:
            vs = (vs[:3] + [v for v in vs if getattr(v, "xq", False)][:1]
                  + [v for v in vs if getattr(v, "stage", False)][:1])
        passed, res = check_and_time(vs, name, n, k, ws, ref_w, floor_us, rows, timer=lambda v: time_calls(v, ws, k),
                                     extra=lambda v: {"stream_read_us": rd})
        ok = ok and passed
        timed = [(us, v) for us, v in res if us == us]
        if timed:
            us, v = min(timed, key=lambda t: t[0])
            plan_us = next((u for u, w in timed if isinstance(w, Plan)), float("nan"))
            best[(n, k)] = v
            doc["best"][name] = {"variant": v.label, "us": us, "plan_us": plan_us}
            print(f"{name:34} {n:>5} x {k:<5} {floor_us:6.2f} {rd:6.2f} | {v.label:12} {us:6.2f} {plan_us:7.2f}",
                  flush=True)
        save()
    for model, layer in LAYERS.items():
        if _INTERPRET or not all(s in weights for s in layer):
            continue
        copies = min(len(weights[s]) for s in layer)
        xs = {s: torch.randn(1, s[1], device=DEVICE, dtype=XDT) for s in layer}
        rec = {"model": model, "shapes": [list(s) for s in layer]}
        for rnd in range(3):  # alternated: the first graph timed on a shape reads slower
            for key, pick in (("plan", lambda s: Plan()), ("best", lambda s: best.get(s, Plan()))):
                us = layer_graph([(pick(s), weights[s], xs[s]) for s in layer], copies)
                rec.setdefault(f"{key}_us", []).append(us)
        rec["best_variants"] = [best[s].label if s in best else "plan" for s in layer]
        doc["layers"].append(rec)
        print(f"{model} sliding layer's projections as one graph: plan {min(rec['plan_us']):.1f} us, "
              f"best per shape {min(rec['best_us']):.1f} us ({', '.join(rec['best_variants'])})", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
