"""The op's TMA-fed M == 1 int4 GEMV (`int4_matmul.int4_gemv1_tma`) in its tiles against the op's plan (the register
kernel) on the 31B's mid-size weights, alone and as a layer's projections with and without programmatic dependent
launch (a tuning tool, one GPU call).

    python -m scripts.gemv1_tma_variants [--out gemv1_tma_variants.json] [--budget 150] [--prewarm 14]
    python -m scripts.gemv1_tma_variants --layer-only --layer-tiles 32x4x3,32x4x4,32x4x6,32x8x3
    python -m scripts.gemv1_tma_variants --small [--out gemv1_tma_small.json]   # the small models' pool shapes
    python -m scripts.gemv1_tma_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter

Why: Nsight Compute has the register kernel on the o projection (5376 x 8192, 336 programs of 4 warps) waiting on
its loads (long scoreboard the first stall, issue slots 19% busy, 10 warps an SM: gemv1_ncu_31b.json) at 40% of
the DRAM bandwidth, its next tile held in registers (128 a thread). `_int4_gemv1_tma_kernel` streams each
program's [BLOCK_N, GROUPS groups] tiles through STAGES shared-memory buffers as TMA copies (no register held
while in flight; two groups, 128 bytes of a row, a copy: AOTInductor encodes the descriptor with the block as
given). Alone, in graphs without PDL, it beat the plan on the sliding layer's four (H100, 120.2 -> 112.5 us);
in the artifact, where the register kernel runs with PDL (its first tile loaded while the kernel before
finishes), it did not (tma_ab_31b_6l.json). So the layer is timed both ways here: each projection's quantize
kernel and GEMV launched with the PDL attribute (sm_90+; captured into the graph as programmatic edges) as the
artifact's launcher launches them, and without.

Per shape: each variant checked against an fp32 matmul on the dequantized weight on two fresh x (rel err
<= 1e-2), then timed as CUDA-graph replays over rotated weight copies (>= 256 MB: from HBM; median), the
quantize kernel included, no PDL; then a sliding layer's four projections as one graph: the plan, each shape's
best and the op's TMA choice (GEMV1_TMA_TILE, `gemv1_tma_splits`), without PDL and with it. Copy bandwidth
measured in the same run. Table on stdout, one JSON (`--out`) with `copy_gbps`, `rows`, `best`, `layers`.

--layer-tiles ROWSxGROUPSxSTAGES,...: the layer graph also runs the op's choice with each of these tiles in place
of GEMV1_TMA_TILE (its warps, K slices for ~GEMV1_TMA_PROGRAMS programs), keys `tile<R>x<G>x<S>` (`_pdl` with PDL):
the per-shape sweep times its tiles without PDL only. With PDL the stages set the copies in flight inside the loop,
not what goes out before the wait: compiled for sm_90, the pipeliner's prologue puts the wait (x's level loads
follow it, in the loads' stage) after the first step's copies at 3, 4 and 6 stages alike; a step's groups set that
(4 groups, 8 KB of a 32-row program; 8 groups, 16 KB). --layer-only: each shape checked and timed at the op's choice
and these tiles only (no sweep of candidates), then the layer graph (~1 minute).

--small: the same sweep on the small models' weights that keep the pool's plan (x as levels, the register kernel:
K beyond the staged tiles' reach, or many rows), whose fractions of the copy bandwidth are the lowest of the op's
(E4B's down 2560 x 10240 at 38% on the H100, int4_kernels_m1_h100.json); no layer graph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import triton

from export.kernels import int4_matmul as im
from export.kernels.pdl import op_pdl_mode
from scripts.gemv1_variants import (check_and_time, compare_layer, finish_sweep, launch_directly, layer_shapes_31b,
                                    rotated_weights, sweep_args, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16
GROUP = 128
SMEM = im.SMEM_LIMIT_BYTES
LAYER = ["qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"]
TINY = {"qkv_proj.sliding": (48, 1024), "o_proj.sliding": (40, 2048), "mlp.gate_up_proj": (96, 1024),
        "mlp.down_proj": (40, 2048)}


def smem_bytes(block_n: int, groups: int, stages: int) -> int:
    """The TMA buffers' bytes (Triton allocates STAGES - 1 of them for the loads in flight and one more for the
    tile in use: at most STAGES), plus their barriers (one a copy)."""
    return stages * block_n * groups * (GROUP // 8) * 4 + 8 * stages * max(1, groups // 2)


@dataclass(frozen=True)
class Variant:
    block_n: int
    groups: int
    stages: int
    warps: int
    splits: int
    pdl: int = 0  # both kernels launched with PDL in this mode (sm_90+), the attribute set as the artifact sets it

    @property
    def label(self) -> str:
        return f"tma{self.block_n}r{self.groups}g{self.stages}s{self.warps}w/{self.splits}" + ("p" if self.pdl else "")

    def __call__(self, x2, q, s):
        return im.int4_gemv1_tma(x2, q, s, self.splits, tile=(self.block_n, self.groups, self.stages, self.warps),
                                 levels=im.GEMV1_LEVELS, pdl=self.pdl, pdl_attr=True)


class Plan:
    """The op's M == 1 path on the register kernel (`gemv1_plan` for the weight's prologue), PDL as `pdl` (0:
    none). x is plain here whatever the prologue (the quantize kernel's or the staged tile's work on it aside)."""

    def __init__(self, pdl: int = 0, prologue: str = "plain"):
        self.pdl, self.prologue = pdl, prologue
        self.label = "plan" + ("p" if pdl else "")

    def __call__(self, x2, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        p = im.gemv1_plan(n, k, GROUP, self.prologue)
        return im.int4_gemv1(x2, q, s, p.splits, kernel=im._gemv1_kernel(p.cfg), xq=p.xq, levels=p.levels,
                             pdl_quant=self.pdl, pdl_gemv=self.pdl, pdl_attr=True)


def op_choice(n: int, k: int, pdl: int = 0) -> Variant | Plan:
    """What the op runs for an [n, k] weight with GEMV1_TMA on: the TMA kernel at GEMV1_TMA_TILE and
    `gemv1_tma_splits`, or the plan where that takes none (gate / up)."""
    splits = im.gemv1_tma_splits(n, k, GROUP)
    return Variant(*im.GEMV1_TMA_TILE, splits, pdl) if splits else Plan(pdl)


def candidates(n: int, k: int, sms: int) -> list[Variant]:
    """Row blocks of 32-128 rows x 1-8 groups a step (64-512 bytes of each row, in copies of 128 at most), 3-6
    stages within the consumer shared memory, 4 warps (8 with 128 rows), K slices for ~1, 2 or 4 programs an SM;
    each thread at least 4 words a step."""
    out = []
    for bn in (32, 64, 128):
        for groups in (1, 2, 4, 8):
            for stages in (3, 4, 6):
                if smem_bytes(bn, groups, stages) > SMEM or groups > k // GROUP:
                    continue
                for warps in ((4, 8) if bn == 128 else (4,)):
                    if bn * groups * (GROUP // 8) < 4 * 32 * warps:
                        continue
                    seen = set()
                    for per_sm in (1, 2, 4):
                        splits = max(1, min(k // GROUP // groups, round(per_sm * sms / triton.cdiv(n, bn))))
                        if splits not in seen:
                            seen.add(splits)
                            out.append(Variant(bn, groups, stages, warps, splits))
    return out


def _prewarm_worker(idx, count):
    """Compiles every variant (Triton's disk cache) in one of `count` processes."""
    import scripts.gemv1_tma_variants as me
    launch_directly("prewarm")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    todo = [(v, n, k) for nm, (n, k) in me.shapes().items() for v in me.candidates(n, k, sms)]
    for v, n, k in todo[idx::count]:
        try:
            q, s = im.quantize_int4(torch.randn(n, k, device="cuda"), GROUP)
            v(torch.randn(1, k, device="cuda", dtype=XDT), q, s)
        except Exception:
            pass


def shapes() -> dict:
    return dict(TINY) if _INTERPRET else layer_shapes_31b(LAYER)


SMALL = ("e4b.mlp.down_proj", "e4b.mlp.gate_up_proj", "e4b.per_layer_model_projection", "e2b.mlp.down_proj",
         "e2b.mlp.down_proj.wide", "26b-a4b.o_proj.full", "26b-a4b.qk_proj.full")
# (E2B's gate / up and the 26B-A4B's take staged bf16-x tiles since GEMV1_STAGED_MLP; the 26B-A4B's down, K 2112,
# has groups of 64: the TMA kernel takes 128)


def prologue_for(name: str) -> str:
    """The prologue the op plans a weight with (`gemv1_plan`): gate / up's the residual add, down's the activation,
    q / k's the norm, else plain."""
    return "res" if "gate_up" in name else "glu" if "down" in name else "norm" if "qk" in name else "plain"


def small_shapes() -> dict:
    """{name: (N, K)} of SMALL: the small models' M == 1 weights on the pool's plan (E2B's down of its wide MLP,
    K 12288, named `.wide`; the MLPs' as the op plans them, their x the residual add or the activation)."""
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes

    out = {}
    for m in ("e2b", "e4b", "26b-a4b"):
        for (n, k), (nms, _) in linear_shapes(PRESETS[m]).items():
            nm = f"{m}.{nms if isinstance(nms, str) else '+'.join(nms)}"
            if nm == "e2b.mlp.down_proj" and k > 6144:
                nm += ".wide"
            if nm in SMALL and nm not in out:
                out[nm] = (n, k)
    return out


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """'32x4x3,32x4x6' -> [(rows, groups a step, stages), ...]; ValueError naming the bad entry."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{item!r} is not ROWSxGROUPSxSTAGES (e.g. 32x4x6)")
        bn, groups, stages = map(int, parts)
        if stages < 2 or groups & (groups - 1) or bn & (bn - 1) or smem_bytes(bn, groups, stages) > SMEM:
            raise ValueError(f"{item!r}: rows and groups powers of two, stages >= 2, within "
                             f"{SMEM} bytes of shared memory ({smem_bytes(bn, groups, stages)} asked)")
        out.append((bn, groups, stages))
    return out


def tile_variant(bn: int, groups: int, stages: int, n: int, k: int, pdl: int = 0) -> Variant | Plan:
    """The op's choice for an [n, k] weight with the tile (bn rows, groups a step, stages) in place of
    GEMV1_TMA_TILE: the plan where the op takes no TMA kernel, else GEMV1_TMA_TILE's warps and K slices for
    ~GEMV1_TMA_PROGRAMS programs (`gemv1_tma_splits`' rule)."""
    splits = im.gemv1_tma_splits(n, k, GROUP, (bn, groups))
    return Variant(bn, groups, stages, im.GEMV1_TMA_TILE[3], splits, pdl) if splits else Plan(pdl)


def _tiles_arg(text: str) -> list[tuple[int, int, int]]:
    try:
        return parse_tiles(text)
    except ValueError as e:  # argparse prints this one's message after the option's name
        raise argparse.ArgumentTypeError(str(e)) from None


def _options(ap):
    ap.add_argument("--layer-tiles", default=[], type=_tiles_arg, metavar="RxGxS,...",
                    help="tiles (rows x groups a step x stages) the layer graph also runs in place of the op's")
    ap.add_argument("--layer-only", action="store_true",
                    help="no sweep: each shape at the op's choice and the --layer-tiles only, then the layer graph")
    ap.add_argument("--small", action="store_true",
                    help="the small models' weights on the pool's plan instead of the 31B's layer (no layer graph)")


def main(argv=None) -> int:
    a = sweep_args("scripts.gemv1_tma_variants", __doc__, 150.0, argv, shapes_help="the sliding layer's four",
                   extra=_options)
    if isinstance(a, int):
        return a
    tiles = a.layer_tiles
    t0 = time.time()
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 75)
    sms = 4 if _INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "best": {}, "layers": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    ok, weights, best = True, {}, {}
    todo = small_shapes() if a.small and not _INTERPRET else shapes()
    names = list(todo) if a.small else ["o_proj.sliding", "qkv_proj.sliding", "mlp.down_proj", "mlp.gate_up_proj"]
    order = [nm for nm in names if nm in todo and (not a.shapes or nm in a.shapes.split(","))]
    print(f"{'shape':30} {'N x K':>12} {'floor':>6} | {'plan':>6} {'%':>4} | {'best':24} {'us':>6} {'%':>4}", flush=True)
    for nm in order:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {nm} skipped", flush=True)
            continue
        n, k = todo[nm]
        nbytes, ws, ref_w = rotated_weights(n, k, GROUP)
        weights[nm] = ws
        floor = nbytes / gbps / 1e3
        if a.layer_only:
            vs = [Plan(), op_choice(n, k)] + [tile_variant(*t, n, k) for t in tiles]
            vs = [v for i, v in enumerate(vs) if v.label not in {w.label for w in vs[:i]}]
        else:
            vs = [Plan(prologue=prologue_for(nm) if a.small else "plain"), *candidates(n, k, sms)]
        if _INTERPRET and not a.layer_only:
            vs = vs[:1] + [v for v in vs[1:] if v.block_n == 32 and v.stages == 3 and v.warps == 4][:3]
        passed, res = check_and_time(vs, nm, n, k, ws, ref_w, floor, rows, deadline=t0 + a.budget + 30)
        ok = ok and passed
        timed = [(us, v) for us, v in res if us == us]
        if not timed:
            ok = False
            continue
        plan_us = next((u for u, w in timed if w.label == "plan"), float("nan"))
        us, v = min(timed, key=lambda t: t[0])
        best[nm] = v
        doc["best"][nm] = {"variant": v.label, "us": us, "plan_us": plan_us, "floor_us": floor}
        print(f"{nm:30} {n:6}x{k:<5} {floor:6.1f} | {plan_us:6.1f} {floor / plan_us:4.0%} | {v.label:24} {us:6.1f} "
              f"{floor / us:4.0%}", flush=True)
        save()
    if not _INTERPRET and not a.small and all(nm in weights for nm in LAYER):
        xs = {nm: torch.randn(1, todo[nm][1], device=DEVICE, dtype=XDT) for nm in LAYER}
        rec = compare_layer("sliding", LAYER, weights, xs,
                            layer_picks(best, todo, op_pdl_mode(torch.device(DEVICE)), tiles))
        rec["best_variants"] = [best[nm].label for nm in LAYER]
        rec["op_variants"] = [op_choice(*todo[nm]).label for nm in LAYER]
        doc["layers"].append(rec)
        print("sliding layer's four projections as one graph (us):", flush=True)
        for key in ("plan", "best", "op", *(tile_key(t) for t in tiles)):
            line = f"  {key:12} {min(rec[key + '_us']):6.1f} without PDL"
            if key + "_pdl_us" in rec:
                line += f", {min(rec[key + '_pdl_us']):6.1f} with"
            print(line, flush=True)
        print(f"  best: {', '.join(rec['best_variants'])}; op: {', '.join(rec['op_variants'])}", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


def with_pdl(v, pdl: int):
    """The variant v (a Variant or a Plan) launched in PDL mode pdl."""
    return Plan(pdl) if isinstance(v, Plan) else replace(v, pdl=pdl)


def tile_key(tile: tuple[int, int, int]) -> str:
    return "tile{}x{}x{}".format(*tile)


def layer_picks(best: dict, todo: dict, pdl: int, tiles: list = ()) -> dict:
    """The layer graph's picks {key: name -> variant}: the plan, each shape's best, the op's TMA choice
    (`op_choice`) and the op's choice at each of `tiles` (`tile_variant`, key `tile_key`), and with pdl (sm_90+)
    each of them in that PDL mode too (keys + "_pdl")."""
    picks = {"plan": lambda nm: Plan(), "best": lambda nm: best[nm], "op": lambda nm: op_choice(*todo[nm])}
    for t in tiles:
        picks[tile_key(t)] = lambda nm, t=t: tile_variant(*t, *todo[nm])
    if pdl:
        picks.update({key + "_pdl": (lambda nm, f=f: with_pdl(f(nm), pdl)) for key, f in list(picks.items())})
    return picks


if __name__ == "__main__":
    sys.exit(main())
