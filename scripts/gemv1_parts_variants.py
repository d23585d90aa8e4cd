"""The M == 1 int4 GEMV on the 31B's mid-size weights with many small programs: few rows, K read in
parts inside each program, one slice (a tuning tool, one GPU call).

    python -m scripts.gemv1_parts_variants [--out gemv1_parts_variants.json] [--budget 170] [--prewarm 14]
    python -m scripts.gemv1_parts_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter

Why: one kernel reading a 22-60 MB weight reaches 75-91% of the copy bandwidth on the H200 when
~1000 programs each keep several 16-byte loads a thread in flight (scripts/read_ceiling.py,
scripts/measurements/read_ceiling.json), and ~45-57% with a few hundred programs and one load in
flight; the op's plan for these shapes (128 or 64 rows, K in 8 or 2 slices: 336-512 programs)
runs at 43-58%. An older sweep of the same kernel family had 8-16 rows x 4-8 K parts at two
tiles ahead reading the o projection at 89-92% without arithmetic, 50% with the bf16-x
arithmetic of then (scripts/measurements/int4_gemv1_variants.json). Here `_int4_gemv1_kernel`
itself runs such tiles with x as int8 levels through the per-lane loop (`lane`: DEPTH 0, one
step ahead, no sum across lanes until the end), through the tile-sum path (`tileq`, DEPTH 2),
and with bf16 x (`bf16`, DEPTH 2, one launch), beside the op's plan (`plan`, x as
int4_matmul.GEMV1_LEVELS int8 levels) and the plan with x as the other count (`plan/x1`: one level
with a factor per 32 elements, half the dp4a and x's planes; `plan/x2`: two levels per group). The
walk alone reads at 70-92% of the copy bandwidth (scripts/read_ceiling.py --rows), so the GEMV's
arithmetic is what is left to cut.

Per shape (the 31B's M == 1 weights but the lm_head, whose plan runs at ~90%): each variant
checked against an fp32 matmul on the dequantized weight on two fresh x (rel err <= 1e-2), then
timed as CUDA-graph replays over rotated weight copies (>= 256 MB: from HBM; median), the
quantize kernel included where x is quantized; then a sliding and a full layer's four
projections as one graph, the plan against each shape's best. Copy bandwidth measured in the
same run. Table on stdout, one JSON (`--out`) with `copy_gbps`, `rows`, `best`, `layers`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import triton

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (check_and_time, compare_layer, finish_sweep, launch_directly, layer_shapes_31b,
                                    rotated_weights, sweep_args, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16
GROUP = 128
MAX_WORDS_A_THREAD = 64
LAYERS = {"sliding": ["qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"],
          "full": ["qk_proj.full", "o_proj.full", "mlp.gate_up_proj", "mlp.down_proj"]}
TINY = {"qkv_proj.sliding": (48, 1024), "o_proj.sliding": (40, 2048), "mlp.gate_up_proj": (96, 1024),
        "mlp.down_proj": (40, 2048), "qk_proj.full": (56, 1024), "o_proj.full": (40, 2048)}
OTHER = 3 - im.GEMV1_LEVELS  # the level count beside the op's (`plan/x1` or `plan/x2`)
PATHS = {"lane": (True, 0), "tileq": (True, 2), "bf16": (False, 2)}  # (x quantized, DEPTH)


@dataclass(frozen=True)
class Variant:
    block_n: int
    parts: int
    groups: int
    warps: int
    path: str
    splits: int = 1

    @property
    def label(self) -> str:
        return f"{self.path}{self.block_n}r{self.parts}p{self.groups}g{self.warps}w/{self.splits}"

    def config(self) -> triton.Config:
        return im._cfg1(self.block_n, self.groups, self.warps, parts=self.parts, depth=PATHS[self.path][1])

    def __call__(self, x2, q, s):
        return im.int4_gemv1(x2, q, s, self.splits, kernel=im._gemv1_kernel(self.config()), xq=PATHS[self.path][0])


class Plan:
    """The op's plan as it stands; levels 1 / 2: the same launches with x as one / two int8 levels
    (one: half the dp4a)."""

    def __init__(self, levels: int | None = None):
        self.levels = levels
        self.label = "plan" if levels is None else f"plan/x{levels}"

    def __call__(self, x2, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        p = im.gemv1_plan(n, k, GROUP)
        return im.int4_gemv1(x2, q, s, p.splits, kernel=im._gemv1_kernel(p.cfg), xq=p.xq,
                             levels=p.levels if self.levels is None else self.levels)


def candidates(n: int, k: int) -> list[Variant]:
    """Few rows (4-16) x K parts (2-8) x 1-2 groups a step, 4 or 8 warps, each path; one slice (two
    where the row blocks are few), within 4-64 words a thread."""
    out = []
    for bn in (4, 8, 16):
        for parts in (2, 4, 8):
            for groups in (1, 2):
                for warps in (4, 8):
                    per_thread = bn * parts * groups * (GROUP // 8) / (32 * warps)
                    if not 4 <= per_thread <= MAX_WORDS_A_THREAD or parts * groups > k // GROUP:
                        continue
                    for path in PATHS:
                        out.append(Variant(bn, parts, groups, warps, path))
                        if triton.cdiv(n, bn) < 1024 and path == "lane":
                            out.append(Variant(bn, parts, groups, warps, path, 2))
    return out


def _prewarm_worker(idx, count):
    """Compiles every variant (Triton's disk cache) in one of `count` processes."""
    import scripts.gemv1_parts_variants as me
    launch_directly("prewarm")
    jobs = []
    for nm, (n, k) in me.shapes().items():
        jobs += [(v, n, k) for v in [me.Plan(), me.Plan(levels=OTHER), *me.candidates(n, k)]]
    seen, todo = set(), []
    for v, n, k in jobs:  # one compile per config, path and K (its specialization)
        key = (v.label if isinstance(v, me.Plan) else v.label.split("/")[0], k, n if isinstance(v, me.Plan) else 0)
        if key not in seen:
            seen.add(key)
            todo.append((v, n, k))
    for v, n, k in todo[idx::count]:
        try:
            q, s = im.quantize_int4(torch.randn(n, k, device="cuda"), GROUP)
            v(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), q, s)
        except Exception:
            pass


def shapes() -> dict:
    return dict(TINY) if _INTERPRET else layer_shapes_31b(LAYERS["sliding"] + LAYERS["full"])


def main(argv=None) -> int:
    a = sweep_args("scripts.gemv1_parts_variants", __doc__, 170.0, argv, shapes_help='all six')
    if isinstance(a, int):
        return a
    t0 = time.time()
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 75)
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "best": {}, "layers": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    ok, weights, best = True, {}, {}
    todo = shapes()
    order = ["o_proj.sliding", "qkv_proj.sliding", "o_proj.full", "qk_proj.full", "mlp.down_proj", "mlp.gate_up_proj"]
    if a.shapes:
        order = [nm for nm in order if nm in a.shapes.split(",")]
    print(f"{'shape':18} {'N x K':>12} {'floor':>6} | {'plan':>6} {'%':>4} | {'best':24} {'us':>6} {'%':>4} | "
          "best per path", flush=True)
    for nm in order:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {nm} skipped", flush=True)
            continue
        n, k = todo[nm]
        nbytes, ws, ref_w = rotated_weights(n, k, GROUP)
        weights[nm] = ws
        floor = nbytes / gbps / 1e3
        vs = [Plan(), Plan(levels=OTHER), *candidates(n, k)]
        if _INTERPRET:
            vs = vs[:2] + [v for v in vs[2:] if v.block_n == 4 and v.parts == 8 and v.groups == 1 and v.warps == 4]
        passed, res = check_and_time(vs, nm, n, k, ws, ref_w, floor, rows, deadline=t0 + a.budget + 30)
        ok = ok and passed
        timed = [(us, v) for us, v in res if us == us]
        if not timed:
            continue
        plan_us = next((u for u, w in timed if getattr(w, "label", "") == "plan"), float("nan"))
        us, v = min(timed, key=lambda t: t[0])
        best[nm] = v
        per_path = {}
        for u, w in timed:
            p = getattr(w, "path", w.label)
            if p not in per_path or u < per_path[p][0]:
                per_path[p] = (u, w.label)
        doc["best"][nm] = {"variant": v.label, "us": us, "plan_us": plan_us, "floor_us": floor,
                           "per_path": {p: {"us": u, "variant": lb} for p, (u, lb) in per_path.items()}}
        print(f"{nm:18} {n:6}x{k:<5} {floor:6.1f} | {plan_us:6.1f} {floor / plan_us:4.0%} | {v.label:24} {us:6.1f} "
              f"{floor / us:4.0%} | " + "  ".join(f"{p} {u:.1f}" for p, (u, _) in per_path.items() if p != "plan"),
              flush=True)
        save()
    for lname, names in LAYERS.items():
        if _INTERPRET or not all(nm in weights for nm in names):
            continue
        xs = {nm: torch.randn(1, todo[nm][1], device=DEVICE, dtype=XDT) for nm in names}
        rec = compare_layer(lname, names, weights, xs, {"plan": lambda nm: Plan(),
                                                        f"plan_x{OTHER}": lambda nm: Plan(levels=OTHER),
                                                        "best": lambda nm: best[nm]})
        rec["best_variants"] = [best[nm].label for nm in names]
        doc["layers"].append(rec)
        print(f"{lname} layer's four projections as one graph: plan {min(rec['plan_us']):.1f} us, x as {OTHER} "
              f"level(s) {min(rec[f'plan_x{OTHER}_us']):.1f} us, best per shape {min(rec['best_us']):.1f} us "
              f"({', '.join(rec['best_variants'])})", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
