"""The small models' MLP at M == 1 as the op runs it (x as int8 levels: a quantize kernel before each GEMV) against
one launch a projection with bf16 x computed once a program, in one GPU call (a design probe).

    python -m scripts.small_mlp_variants [--out small_mlp_variants.json] [--models e2b,e4b,26b-a4b] [--layers 24]
                                         [--only op,pc/]   # only the variants whose labels start so
    python -m scripts.small_mlp_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter, tiny shapes

Why: E2B / E4B / 26B-A4B decode at 16-24% of their floor, bound by a dependent chain of ~12-17 kernels a layer
(scripts/measurements/variants.json, launch_floor.json). Their MLP is four of them: the quantize kernel (the
residual add, both norms, x's levels), the gate / up dp4a GEMV, the quantize kernel (the activation), the down
dp4a GEMV. The bf16-x GEMV takes the add and the norms (`int4_gemv1`'s res with norm) and the activation (up) in
the kernel that reads x, so the MLP is two launches; its arithmetic per word was ~2.5x dp4a's while each row of
threads computed x again, and with x computed once a program (STAGE) the difference is smaller (sm_90 SASS, E2B's
q / k / v with the norm 113 -> 43 instructions a word against dp4a's ~18). Whether the saved launches pay for the
FMA arithmetic and for every program's prologue (the norms read the whole row of x, r and wr) is this measurement.
H100 (scripts/measurements/small_mlp_variants_h100.json): at 8 rows they did not (E2B 16.91 us a layer on levels
against 22.6 at best as the bf16 pair, E4B 28.7 against 45.1); at 16 rows the 26B-A4B's pair did (15.81 -> 13.36),
and E2B's gate / up alone (16.91 -> 16.21), which `gemv1_plan` now gives them (GEMV1_STAGED_MLP).

Variants per model: `levels` (`gemv1_plan`'s configs with GEMV1_STAGED_MLP off: x as levels beyond K 2048, the op's
quantize kernels), `op` (the plan as it is) and `bf16/<gate_up>/<down>` (the bf16-x kernel with STAGE on, one K
slice, each tile BLOCK_N rows x GROUPS groups a step x warps; `op` on one side: that projection as the op runs it),
the staged tiles `gemv1_step_config` fits to the two weights with their prologues among them (each alone, then both),
and on sm_90+ `op/tma-down[/S]` (the plan with the down projection on the TMA GEMV at GEMV1_TMA_SMALL_TILE, in S K
slices or GEMV1_TMA_DEEP's; where x is levels), and `pc/...` (the whole MLP as one launch of producers and consumers,
scripts/persistent_mlp.py; small_mlp_pc_h100.json: it loses). A layer is h, gu = gate_up(rms_norm(x + rms_norm(r) w_post) w_pre),
d = down(gelu(gate) up); the next layer takes (h, d) as (x, r). The chain of --layers layers (own weights: more bytes
than the L2) is one CUDA graph, every kernel launched with the PDL attribute as the artifact's launcher sets it;
median us a layer over alternated rounds, beside the weights' bytes over the copy bandwidth measured in the same run.
Correctness: each variant's first layer, h and each projection against fp32 on the dequantized weights from its own
input (the model's bf16 roundings), rel err <= 1e-2.
Table on stdout, one JSON (`--out`) with `copy_gbps` and `models` ({model: {floor_us, rows: [variant,
us_per_layer, h_err, gu_err, d_err]}}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from export.kernels import int4_matmul as im
from scripts import needs_cuda
from scripts.persistent_mlp import PcConfig, Persistent

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
EPS = 1e-6
# (hidden, intermediate) a dense MLP; tiny: the interpreter's (K in two steps at 8 groups, ragged down K)
SHAPES = {"e2b": (1536, 6144), "e2b-wide": (1536, 12288), "e4b": (2560, 10240), "26b-a4b": (2816, 2112),
          "tiny": (256, 384)}  # (e2b-wide: the double-wide MLP of E2B's KV-shared layers, 20 of its 35)
# (gate / up tile, down tile), each (BLOCK_N, GROUPS, warps)
TILES = [((8, 8, 8), (8, 16, 8)), ((16, 8, 8), (16, 16, 8)), ((32, 8, 8), (16, 32, 8)), ((16, 16, 8), (8, 32, 8))]
TINY_TILES = [((8, 2, 2), (8, 4, 2))]
# the one-launch MLP's configs (scripts/persistent_mlp.py's PcConfig: BN, GROUPS, DEPTH, BND, DGROUPS, warps, STAGE,
# PF[, PRELOAD, TICKET])
PC_CONFIGS = [(16, 4, 1, 4, 4, 8, 1, 2), (16, 4, 1, 2, 8, 8, 1, 2), (32, 4, 1, 4, 4, 8, 1, 2), (16, 4, 2, 4, 4, 8, 1, 2),
              (16, 4, 1, 4, 8, 8, 1, 1), (16, 4, 1, 2, 8, 8, 1, 4), (16, 4, 1, 4, 4, 8, 0, 2),
              (16, 4, 1, 4, 4, 8, 1, 2, 0), (16, 4, 1, 4, 4, 8, 1, 2, 1, 1)]
# (the last two: the first's down rows loaded after the spin; the first with roles by ticket)
TINY_PC = [(16, 2, 2, 8, 2, 2, 1, 2), (8, 2, 1, 8, 2, 2, 0, 3, 0), (16, 2, 1, 8, 2, 2, 1, 2, 1, 1)]


def weights(h: int, inter: int, dev) -> dict:
    """One layer's MLP: the gate / up rows (gate then up) and down in the int4 layout, the two norm weights."""
    w = {}
    for name, (n, k) in (("gu", (2 * inter, h)), ("down", (h, inter))):
        w[name] = im.quantize_int4(torch.randn(n, k, device=dev) / k ** 0.5, im.group_size_for(k, 128))
    w["w_post"] = (torch.rand(h, device=dev) + 0.5).to(torch.bfloat16)
    w["w_pre"] = (torch.rand(h, device=dev) + 0.5).to(torch.bfloat16)
    return w


def weight_bytes(w: dict) -> int:
    """The layer's MLP weight bytes (the layout's own count), what the floor is taken on."""
    return sum(im.int4_bytes(q.shape[0], q.shape[1] * 2, q.shape[1] * 2 // s.shape[1]) for q, s in (w["gu"], w["down"]))


class Op:
    """The op's M == 1 path (`gemv1_plan`), launched directly with the PDL attribute. levels: the plan with the
    staged MLP tiles off (GEMV1_STAGED_MLP), x as levels beyond K 2048 (label `levels`)."""

    def __init__(self, levels: bool = False):
        self.levels = levels
        self.label = "levels" if levels else "op"

    def plan(self, n: int, k: int, group: int, prologue: str) -> im.Gemv1Plan:
        saved = im.GEMV1_STAGED_MLP
        im.GEMV1_STAGED_MLP = saved and not self.levels
        try:
            return im.gemv1_plan(n, k, group, prologue)
        finally:
            im.GEMV1_STAGED_MLP = saved

    def gemv(self, x, qs, which, **kw):  # (which: the plan picks the config)
        q, s = qs
        plan = self.plan(q.shape[0], x.shape[1], x.shape[1] // s.shape[1],
                         im.prologue_of(kw.get("up"), kw.get("norm"), kw.get("res")))
        pdl = 0 if _INTERPRET else 2
        if not plan.xq and "res" in kw:
            kw["res"] = (*kw["res"], EPS)
        return im.int4_gemv1(x, q, s, plan.splits, kernel=im._gemv1_kernel(plan.cfg), xq=plan.xq, levels=plan.levels,
                             pdl_quant=pdl if plan.xq else 0, pdl_gemv=pdl, pdl_attr=True, **kw)


class TmaDown(Op):
    """The op's plan with the down projection on the TMA GEMV (`int4_gemv1_tma`, x as levels with the activation in
    its quantize kernel) at GEMV1_TMA_SMALL_TILE in `splits` K slices, or where None GEMV1_TMA_DEEP's rule's
    (`gemv1_tma_tile` with the switch on; `usable` False where it takes none)."""

    def __init__(self, splits: int | None = None):
        super().__init__()
        self.splits = splits
        self.label = "op/tma-down" + (f"/{splits}" if splits else "")

    def down_tile(self, n: int, k: int):
        if self.splits is not None:
            return im.GEMV1_TMA_SMALL_TILE, self.splits
        saved = im.GEMV1_TMA_DEEP
        im.GEMV1_TMA_DEEP = True
        try:
            return im.gemv1_tma_tile(n, k, 128, "glu")
        finally:
            im.GEMV1_TMA_DEEP = saved

    def usable(self, hid: int, inter: int) -> bool:
        return self.down_tile(hid, inter) is not None and self.plan(hid, inter, 128, "glu").xq

    def gemv(self, x, qs, which, **kw):
        q, s = qs
        if which != "down":
            return super().gemv(x, qs, which, **kw)
        n, k = q.shape[0], x.shape[1]
        tile, splits = self.down_tile(n, k)
        return im.int4_gemv1_tma(x, q, s, splits, tile=tile, levels=self.plan(n, k, 128, "glu").levels,
                                 pdl=0 if _INTERPRET else 2, pdl_attr=True, **kw)


class Bf16:
    """bf16 x computed once a program (STAGE), one launch a projection: gate / up with the add and both norms,
    down with the activation. A tile of None: that projection as the op runs it (`Op`; label `op`)."""

    def __init__(self, gu_tile, down_tile):
        self.tiles = {"gu": gu_tile, "down": down_tile}
        self.label = "bf16/" + "/".join("x".join(map(str, t)) if t else "op" for t in (gu_tile, down_tile))

    def gemv(self, x, qs, which, **kw):
        if self.tiles[which] is None:
            return Op().gemv(x, qs, which, **kw)
        q, s = qs
        bn, groups, warps = self.tiles[which]
        if "res" in kw:
            kw["res"] = (*kw["res"], EPS)
        pdl = 0 if _INTERPRET else 2
        return im.int4_gemv1(x, q, s, 1, kernel=im._gemv1_kernel(im._cfg1(bn, groups, warps)), xq=False,
                             stage=True, pdl_gemv=pdl, pdl_attr=True, **kw)


def fitted(hid: int, inter: int) -> list[Bf16]:
    """The staged tiles `gemv1_step_config` fits to the MLP's two weights with their prologues (the residual add
    with both norms for gate / up, the activation for down), each alone beside the op's other projection, then
    both: whether the rule's one bf16-x launch pays there, also where `gemv1_plan` keeps x as levels."""
    tile = lambda n, k, pro: (lambda c: (c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps))(  # noqa: E731
        im.gemv1_step_config(n, k, im.group_size_for(k, 128), pro))
    gu, down = tile(2 * inter, hid, "res"), tile(hid, inter, "glu")
    return [Bf16(gu, None), Bf16(None, down), Bf16(gu, down)]


def layer(v, x, r, w):
    """(x, r) -> (h, gu, d): h = x + rms_norm(r) w_post, gu = gate / up of rms_norm(h) w_pre, d = down(gelu(gate)
    up)."""
    if hasattr(v, "mlp"):  # the whole MLP as one launch (scripts/persistent_mlp.py)
        return v.mlp(x, r, w, EPS)
    h = torch.empty_like(x)
    inter = w["down"][0].shape[1] * 2
    gu = v.gemv(x, w["gu"], "gu", norm=(w["w_pre"], EPS), res=(r, w["w_post"], h))
    d = v.gemv(gu[:, :inter], w["down"], "down", up=gu[:, inter:])  # (each half of the row: contiguous views)
    return h, gu, d


def reference(x, r, w, gu) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each projection in fp32 on the dequantized weights from its own input, rounded to bf16 where the model's ops
    round: h and gate / up from (x, r); down from the activation of the variant's own gate / up `gu` (the error of
    one projection is not charged to the next: through the activation it roughly doubles)."""
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    h = bf(x.float() + bf(im.rms_norm_reference(r.float(), w["w_post"].float(), EPS)))
    xn = bf(im.rms_norm_reference(h, w["w_pre"].float(), EPS))
    g, u = gu.float().chunk(2, dim=-1)
    act = bf(torch.nn.functional.gelu(g, approximate="tanh") * u)
    return (h, xn @ im.dequantize_int4(*w["gu"], torch.float32).t(),
            act @ im.dequantize_int4(*w["down"], torch.float32).t())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("small_mlp_variants.json"))
    ap.add_argument("--models", default="e2b,e2b-wide,e4b,26b-a4b",
                    help=f"of {', '.join(m for m in SHAPES if m != 'tiny')}")
    ap.add_argument("--layers", type=int, default=24, help="layers a graph, each on its own weights")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timing rounds (one with --interpret)")
    ap.add_argument("--interpret", action="store_true", help="run under Triton's interpreter on the CPU (a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated label prefixes (e.g. op,pc/): only those variants")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in SHAPES or m == "tiny"]
    if bad:
        ap.error(f"--models: {', '.join(bad)} unknown; choose from {', '.join(m for m in SHAPES if m != 'tiny')}")
    from scripts.gemv1_variants import bench_graph, launch_directly, main_in_interpreter, rel
    if a.interpret and not _INTERPRET:
        return main_in_interpreter("scripts.small_mlp_variants",
                                   [v for v in (argv if argv is not None else sys.argv[1:]) if v != "--interpret"])
    if not _INTERPRET and not needs_cuda("small_mlp_variants", "--interpret runs it on the CPU"):
        return 2
    launch_directly("small_mlp_variants")
    torch.manual_seed(0)
    if _INTERPRET:
        models, layers, gbps, dev_name = ["tiny"], 2, 1000.0, "cpu (interpreter)"
        # (no `Op` rows: the quantize kernel reads bf16 x wrongly in the interpreter)
        variants = [Bf16(*t) for t in TINY_TILES] + [Persistent(PcConfig(*c)) for c in TINY_PC]
    else:
        from scripts.bench_int4 import copy_gbps
        layers, gbps, dev_name = a.layers, copy_gbps(), torch.cuda.get_device_name()
        variants = [Op(levels=True), Op()] + [Bf16(*t) for t in TILES] + [Persistent(PcConfig(*c)) for c in PC_CONFIGS]
    doc = {"device": dev_name, "copy_gbps": gbps, "layers": layers, "models": {}}
    ok = True
    for model in models:
        hid, inter = SHAPES[model]
        model_variants = [v for v in variants if not hasattr(v, "usable") or v.usable(hid, inter)]
        if not _INTERPRET:
            model_variants += [v for v in fitted(hid, inter) if v.label not in {u.label for u in variants}]
        if not _INTERPRET and im.tma_ok(torch.device(DEVICE)):  # the down projection on the TMA GEMV (sm_90+)
            model_variants += [v for v in (TmaDown(), TmaDown(5), TmaDown(7)) if v.usable(hid, inter)]
        prefixes = tuple(p.strip() for p in a.only.split(",") if p.strip())
        if prefixes:
            model_variants = [v for v in model_variants if v.label.startswith(prefixes)]
            if not model_variants:
                ap.error(f"--only {a.only}: no variant of {model} has a label starting so (labels: op, levels, bf16/, "
                         f"pc/, op/tma-down)")
        ws = [weights(hid, inter, DEVICE) for _ in range(layers)]
        floor = weight_bytes(ws[0]) / gbps / 1e3
        rec = {"hidden": hid, "intermediate": inter, "floor_us": floor, "rows": []}
        x0 = torch.randn(1, hid, device=DEVICE).to(torch.bfloat16)
        r0 = (torch.randn(1, hid, device=DEVICE) * 4).to(torch.bfloat16)
        timed = []
        for v in model_variants:
            row = {"variant": v.label}
            try:
                h, gu, d = layer(v, x0, r0, ws[0])
                row["_first"] = (h, gu, d)
                refs = reference(x0, r0, ws[0], gu)
                row["h_err"], row["gu_err"], row["d_err"] = (rel(t, ref) for t, ref in zip((h, gu, d), refs))
            except Exception as e:  # a variant that fails to compile or run is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {model} {v.label}: {row['error']}", flush=True)
                rec["rows"].append(row)
                continue
            if not all(row[k] <= 1e-2 for k in ("h_err", "gu_err", "d_err")):
                ok = False
                print(f"  {model} {v.label}: h {row['h_err']:.2e}, gate / up {row['gu_err']:.2e}, down "
                      f"{row['d_err']:.2e}: over 1e-2", flush=True)
            else:
                timed.append((v, row))
            rec["rows"].append(row)

        def chain(v):
            x, r = x0, r0
            for w in ws:
                x, _, r = layer(v, x, r, w)

        for _ in range(1 if _INTERPRET else a.rounds):  # (the interpreter's times say nothing: one round)
            for v, row in timed:
                row.setdefault("us_rounds", []).append(bench_graph(lambda v=v: chain(v), layers))
        for v, row in timed:
            row["us_per_layer"] = statistics.median(row["us_rounds"])
            row["fraction_of_copy_bw"] = floor / row["us_per_layer"]
            # after the replays: the first layer again, bit for bit its first outputs (a launch whose counters
            # were not left as it found them reads stale values), and the one-launch MLP's counters zero
            row["repeat_equal"] = all(torch.equal(a_, b_) for a_, b_ in zip(layer(v, x0, r0, ws[0]), row["_first"]))
            if hasattr(v, "counters_zero"):
                row["repeat_equal"] = row["repeat_equal"] and v.counters_zero()
            if not row["repeat_equal"]:
                ok = ok and not hasattr(v, "counters_zero")  # (the others: recorded, not judged here)
                print(f"  {model} {v.label}: after the replays its outputs or counters differ", flush=True)
        for row in rec["rows"]:
            row.pop("_first", None)
        doc["models"][model] = rec
        print(f"{model}: MLP {hid} x {inter}, {weight_bytes(ws[0]) / 1e6:.1f} MB a layer, floor {floor:.2f} us "
              f"(copy {gbps:.0f} GB/s)", flush=True)
        for row in rec["rows"]:
            us = row.get("us_per_layer", float("nan"))
            print(f"  {row['variant']:28} {us:8.2f} us  h {row.get('h_err', float('nan')):.1e}  gate / up "
                  f"{row.get('gu_err', float('nan')):.1e}  down {row.get('d_err', float('nan')):.1e}", flush=True)
    doc["checks_passed"] = ok
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"checks {'passed' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
