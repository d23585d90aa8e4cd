"""Launches around the M == 1 int4 GEMV: the op's plan against the plan before it and variants,
on the 31B's decode shapes, in one GPU call (a tuning tool).

    python -m scripts.gemv1_launch_variants [--out gemv1_launch_variants.json] [--budget 100]

Why: a decode step launched per projection `_quant_x_kernel` (~1.5 us), the GEMV and, on the
mid-size weights (K split in slices), `_sum_splits_kernel` (~2.6 us): 11 launches a layer, each
with its gap in a CUDA graph. The op now sums the slices in the GEMV (red 2: the last program of
a row block, its counter zeroed by the quantize kernel; no inline PTX, so torch's mutation
analysis reads the kernel), takes 11 slices for 5376-row weights (84 row blocks x 11 = 7 waves of
132 SMs) and 32-row tiles for one-slice weights (`gemv1_plan`).

What the first run said (H200, scripts/measurements/int4_gemv1_launch_variants.json, where r3 is
today's red 2 and r2 the same with a `fence.acq_rel.gpu` in inline PTX): the fence-free sum gave
red 0's bits in every check (75 ragged, 1280 repeats eager and in graphs) and ran as fast as the
fenced one; as one graph a sliding layer's four GEMVs took 107.6 us with the old plan, 104.8 with
the in-kernel sum, 100.4 with the splits and tiles above (full layer 117.7, 115.8, 110.5; the
lm_head 212.6 -> 210.3). Quantizing x inside the GEMV (every program the groups it reads, before
its loop) cost more than the launch it saved: gate/up 44.8 -> 57.1 us, the lm_head 234 -> 322,
8-row K-part programs 60-200 us; that variant is gone from the kernel.

The second run (scripts/measurements/int4_gemv1_launch_plan.json, the op as it is now): every
check bitwise again, the op itself within 1.7e-3 of fp32 on every shape; as one graph, the old
plan's sliding layer 107.0 us (three runs alternated with the op's) against 100.6, full 117.0
against 110.6, the lm_head 208.4 against 205.1; per shape o_proj 15.4 -> 13.3 and 23.6 -> 21.1,
down 28.1 -> 25.0, gate/up 43.0 -> 41.3, q/k/v 16384 and 18432 rows unchanged (21.3, 24.0: the
in-kernel sum saves the launch, the last program's sum costs as much).

Correctness first: a ragged shape at several splits for every variant against an fp32 matmul on
the dequantized weight (fresh x, NaN-poisoned outputs) and bitwise against red 0 (the same sums
in the same order); the in-kernel sums repeated many times eagerly and as CUDA-graph replays with
fresh x (bitwise red 0 every time); the op itself (`int4_linear`) on every shape. Timing per
shape: CUDA-graph replays over rotated weight copies (from HBM, median) and do_bench (L2 flushed,
median), the old plan timed first and again last (the first variant timed on a shape has read up
to 10% slow); then one graph of a sliding and of a full layer's four GEMVs in sequence, and the
lm_head, for the old plan and the op's, alternated three times. Copy bandwidth measured in the
same run. Table on stdout, one JSON.
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

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import bench_graph, finish_sweep, launch_directly, rel, rotated_weights, spawn_prewarm

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.float32 if _INTERPRET else torch.bfloat16  # (the interpreter's bf16 casts)
PLAN = "plan"  # a variant's config or slices as `gemv1_plan` gives them for the shape
_KERN: dict = {}


def kern(c):
    if c not in _KERN:
        _KERN[c] = im._autotuned([im._cfg1(*c)], im._int4_gemv1_kernel)
    return _KERN[c]


def plan_cfg(n, k):
    cfg, sp, *_ = im.gemv1_plan(n, k, 128)
    kw = cfg.kwargs
    return (kw["BLOCK_N"], kw["GROUPS"], cfg.num_warps, kw["PARTS"], kw["DEPTH"]), sp


def old_plan(n, k):
    """The plan before this sweep: 64-row tiles, 8 slices (K = 5376: 7) up to 32768 rows, one beyond."""
    return (64, 2, 4, 1, 1), (1 if n >= (96 if _INTERPRET else 32768) else 8)


class Var:
    """One way to run the op on a shape: config, K slices, split sum (red; x as two int8 levels)."""

    def __init__(self, cfg, splits, red, plan=plan_cfg):
        self.cfg, self.splits, self.red, self.plan = cfg, splits, red, plan

    def resolve(self, n, k):
        pc, ps = self.plan(n, k)
        return (pc if self.cfg == PLAN else self.cfg), (ps if self.splits == PLAN else self.splits)

    def _real(self, n, k):
        groups = k // 128
        sp = self.resolve(n, k)[1]
        real = triton.cdiv(groups, triton.cdiv(groups, sp))
        return real, ((im.GEMV1_RED_XQ if self.red == PLAN else self.red) if real > 1 else 0)

    def label(self, n, k):
        cfg = self.resolve(n, k)[0]
        real, red = self._real(n, k)
        return f"{cfg[0]}g{cfg[1]}w{cfg[2]}p{cfg[3]}d{cfg[4]}/s{real}/r{red}"

    def launches(self, n, k):
        real, red = self._real(n, k)
        return 2 + (real > 1 and red == 0)  # the quantize kernel, the GEMV, the sum kernel

    def base(self):
        """The same config and slices with red 0: the bits this variant must give."""
        return Var(self.cfg, self.splits, 0, self.plan)

    def __call__(self, x, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        cfg, sp = self.resolve(n, k)
        return im.int4_gemv1(x, q, s, sp, kernel=kern(cfg), red=None if self.red == PLAN else self.red, xq=True)


OLD = Var(PLAN, PLAN, 0, old_plan)
OP = Var(PLAN, PLAN, PLAN)  # the op as it is: `gemv1_plan`, GEMV1_RED_XQ


def candidates(n, k):
    """(tag, Var) per shape: the old plan, the op's, other splits and tiles."""
    out = [("old", OLD), ("op", OP)]
    if plan_cfg(n, k)[1] == 1:  # one slice (gate/up, the lm_head)
        out += [("t64", Var((64, 2, 4, 1, 1), 1, 0)), ("t32s2", Var((32, 2, 2, 1, 1), 2, 2))]
    else:
        out += [("s8", Var((64, 2, 4, 1, 1), 8, 2)), ("s11", Var((64, 2, 4, 1, 1), 11, 2)),
                ("t32s8", Var((32, 2, 2, 1, 1), 8, 2)), ("t32s11", Var((32, 2, 2, 1, 1), 11, 2)),
                ("s11r0", Var((64, 2, 4, 1, 1), 11, 0))]
    return out + [("old again", OLD)]


def poison(*nbytes):
    if not _INTERPRET:
        from scripts.bench_int4 import _poison
        _poison(*nbytes)


def checked(v, q, s, ref_w, base=None):
    """(rel err vs fp32, bitwise equal to `base`'s variant) on a fresh x with poisoned outputs."""
    n, k = q.shape[0], q.shape[1] * 2
    x = torch.randn(1, k, device=DEVICE, dtype=XDT)
    want = base(x, q, s) if base is not None else None
    poison(2 * n, 4 * n, 48 * n, n)
    y = v(x, q, s)
    if not _INTERPRET:
        torch.cuda.synchronize()
    return rel(y, x.float() @ ref_w.t()), (want is None or torch.equal(y, want))


RAGGED_CFGS = [(64, 2, 4, 1, 1), (32, 2, 2, 1, 1), (8, 1, 8, 8, 2)]


def ragged_checks(doc):
    """Each tile at splits 1..13, red 0 and 2, on N 1000 (no tile divides it), K 36 groups."""
    n, k = (40, 1280) if _INTERPRET else (1000, 4608)
    q, s = im.quantize_int4(torch.randn(n, k, device=DEVICE), 128)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    bad, worst, count = [], 0.0, 0
    for cfg in [(8, 1, 4, 1, 1), (8, 1, 4, 4, 2)] if _INTERPRET else RAGGED_CFGS:
        for sp in ((1, 3) if _INTERPRET else (1, 3, 5, 8, 11, 13)):
            for red in (0, 2):
                err, same = checked(Var(cfg, sp, red), q, s, ref_w, Var(cfg, sp, 0))
                worst, count = max(worst, err), count + 1
                if not (err <= 1e-2 and same):
                    bad.append((cfg, sp, red, err, same))
    doc["ragged"] = {"n": n, "k": k, "checks": count, "worst_rel_err": worst, "bad": bad}
    print(f"ragged checks ({count}, N {n}, K {k}): worst rel err {worst:.1e}; "
          f"{'all bitwise = red 0' if not bad else f'FAIL {bad}'}", flush=True)
    return not bad


def repeat_checks(doc, reps):
    """The in-kernel split sum, `reps` calls eagerly and as graph replays with fresh x: each
    result bitwise the red 0 one (the same partials summed in the same order)."""
    out = {}
    shapes = [(48, 1280, 3), (80, 2048, 4)] if _INTERPRET else [(16384, 5376, 8), (5376, 8192, 11),
                                                                (5376, 21504, 11), (18432, 5376, 14)]
    for n, k, sp in shapes:
        q, s = im.quantize_int4(torch.randn(n, k, device=DEVICE), 128)
        cfg = (8, 1, 4, 1, 1) if _INTERPRET else (64, 2, 4, 1, 1)
        base, v = Var(cfg, sp, 0), Var(cfg, sp, 2)
        x = torch.randn(1, k, device=DEVICE, dtype=XDT)
        want = base(x, q, s)
        eager_bad = sum(not torch.equal(v(x, q, s), want) for _ in range(reps))
        graph_bad = 0
        if not _INTERPRET:  # 16 calls a graph, replayed with fresh x
            xs = x.clone()
            v(xs, q, s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                ys = [v(xs, q, s) for _ in range(16)]
            for _ in range(max(1, reps // 16)):
                xs.copy_(torch.randn(1, k, device=DEVICE, dtype=XDT))
                want = base(xs, q, s)
                g.replay()
                torch.cuda.synchronize()
                graph_bad += sum(not torch.equal(y, want) for y in ys)
            del g
        key = f"{n}x{k}/s{sp}/r2"
        out[key] = {"eager_mismatches": eager_bad, "graph_mismatches": graph_bad, "reps": reps}
        print(f"repeat {key}: {reps} eager, {0 if _INTERPRET else max(1, reps // 16) * 16} in graphs: "
              f"{eager_bad} + {graph_bad} not bitwise red 0", flush=True)
    doc["repeat"] = out
    return all(r["eager_mismatches"] == 0 and r["graph_mismatches"] == 0 for r in out.values())


def op_check(q, s, ref_w):
    """The op itself (`int4_linear`, its M == 1 path as exported) on a fresh x, poisoned outputs
    (0 in the interpreter: its x is fp32, which takes another path)."""
    if _INTERPRET:
        return 0.0
    n, k = q.shape[0], q.shape[1] * 2
    x = torch.randn(1, 1, k, device=DEVICE, dtype=XDT)
    poison(2 * n, 4 * n, 48 * n, n)
    y = im.int4_linear(x, q, s)
    return rel(y.reshape(1, n), x.reshape(1, k).float() @ ref_w.t())


def do_bench_us(fn):
    if _INTERPRET:
        return bench_graph(fn, 1)
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def _prewarm_worker(idx, count):
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes
    jobs = {(v.resolve(n, k)[0], v._real(n, k)[1]) for (n, k) in linear_shapes(PRESETS["31b"])
            for _, v in candidates(n, k)}
    jobs |= {(c, red) for c in RAGGED_CFGS for red in (0, 2)}
    q, s = im.quantize_int4(torch.randn(256, 5376, device=DEVICE), 128)
    x = torch.randn(1, 5376, device=DEVICE, dtype=XDT)
    for cfg, red in sorted(jobs, key=str)[idx::count]:
        try:
            Var(cfg, 2 if red else 1, red)(x, q, s)
        except Exception:
            pass
    torch.cuda.synchronize()


def prewarm(count):
    spawn_prewarm(_prewarm_worker, count, 60)


LAYERS = {"sliding": ("qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"),
          "full": ("qk_proj.full", "o_proj.full", "mlp.gate_up_proj", "mlp.down_proj"), "lm_head": ("lm_head",)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_launch_variants.json"))
    ap.add_argument("--budget", type=float, default=100.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=12)
    ap.add_argument("--reps", type=int, default=160, help="calls per in-kernel-sum repeat check")
    a = ap.parse_args(argv)
    t0 = time.time()
    if not launch_directly("gemv1_launch_variants"):
        return 2
    torch.manual_seed(0)
    if a.prewarm and not _INTERPRET:
        prewarm(a.prewarm)
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import copy_gbps, linear_shapes
    gbps = 1000.0 if _INTERPRET else copy_gbps()
    dev = "cpu (interpreter)" if _INTERPRET else torch.cuda.get_device_name()
    t = torch.zeros(1, device=DEVICE)
    launch_us = bench_graph(lambda: [t.add_(1) for _ in range(20)], 20)
    print(f"copy {gbps:.0f} GB/s, a tiny kernel in a graph {launch_us:.2f} us ({dev})", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "tiny_kernel_graph_us": launch_us, "rows": rows}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    ok = ragged_checks(doc)
    ok = repeat_checks(doc, a.reps) and ok
    doc["checks_passed"] = ok
    print(f"checks done at {time.time() - t0:.0f} s", flush=True)
    save()
    shapes = {(names if isinstance(names, str) else "+".join(names)): (n, k)
              for (n, k), (names, _) in linear_shapes(PRESETS["31b"]).items()}
    if _INTERPRET:  # the logic on tiny stand-ins: one slice from 96 rows, 3 slices below
        im.GEMV1_SMALL_N, im.GEMV1_LARGE_N, im.GEMV1_MID_SPLITS = 8, 96, 3
        im.GEMV1_STEP_MAX_K = im.GEMV1_THIN_N = 0  # the 31B's plan: no small-weight tile
        shapes = {"qkv_proj.sliding": (48, 768), "o_proj.sliding": (40, 1024), "mlp.gate_up_proj": (96, 512),
                  "mlp.down_proj": (40, 1280), "qk_proj.full": (56, 768), "o_proj.full": (40, 1536),
                  "lm_head": (128, 512)}
    weights = {}
    print(f"{'shape':18} {'N x K':>12} {'floor':>6} | {'tag':9} {'variant':20} {'kern':>4} {'graph us':>8}"
          f" {'do_bench':>8} {'err':>7} bits", flush=True)
    for name in sorted(shapes, key=lambda nm: shapes[nm][0] * shapes[nm][1]):
        n, k = shapes[name]
        if time.time() - t0 > a.budget:
            print(f"budget spent: {name} skipped", flush=True)
            continue
        nbytes, ws, ref_w = rotated_weights(n, k, 128)
        weights[name] = ws
        q0, s0 = ws[-1]
        x = torch.randn(1, k, device=DEVICE, dtype=XDT)
        floor_us = nbytes / gbps / 1e3
        op_err = op_check(q0, s0, ref_w)
        ok = ok and op_err <= 1e-2
        cands = candidates(n, k)
        if _INTERPRET:  # the logic, not the sweep
            cands = [c for c in cands if c[0] in ("old", "op", "t64", "s11")]
        for tag, v in cands:
            try:
                err, same = checked(v, q0, s0, ref_w, v.base())
                us = bench_graph(lambda: [v(x, q, s) for q, s in ws], len(ws))
                db = do_bench_us(lambda: v(x, q0, s0))
            except Exception as e:
                print(f"  {tag} {v.label(n, k)}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ok = ok and err <= 1e-2 and same
            r = {"shape": name, "n": n, "k": k, "tag": tag, "variant": v.label(n, k), "launches": v.launches(n, k),
                 "graph_us": us, "do_bench_us": db, "rel_err": err, "bitwise_red0": same, "op_rel_err": op_err,
                 "fraction_of_copy_bw": floor_us / us}
            rows.append(r)
            print(f"{name[:18]:18} {n:6}x{k:<5} {floor_us:6.1f} | {tag:9} {r['variant']:20} {r['launches']:4}"
                  f" {us:8.1f} {db:8.1f} {err:7.1e} {'=' if same else 'DIFF'}", flush=True)
        print(f"{name[:18]:18} the op (int4_linear): rel err {op_err:.1e}", flush=True)
        save()
    # one graph per plan: a layer's GEMVs in sequence over two copies of its weights (HBM), the
    # two plans alternated
    doc["layers"] = {}
    print(f"\n{'layer graph (us)':18} {'old':>22} {'op':>22}  kernels old / op", flush=True)
    for lname, names in LAYERS.items():
        if not all(nm in weights for nm in names):
            print(f"{lname}: shapes missing, skipped", flush=True)
            continue
        copies = min(2, min(len(weights[nm]) for nm in names))
        xs = {nm: torch.randn(1, shapes[nm][1], device=DEVICE, dtype=XDT) for nm in names}
        times = {"old": [], "op": []}
        for _ in range(3):
            for pname, v in (("old", OLD), ("op", OP)):
                times[pname].append(bench_graph(
                    lambda: [v(xs[nm], *weights[nm][c]) for c in range(copies) for nm in names], copies))
        kern_n = {p: sum(v.launches(*shapes[nm]) for nm in names) for p, v in (("old", OLD), ("op", OP))}
        doc["layers"][lname] = {p: {"us": times[p], "kernels": kern_n[p],
                                    "variants": {nm: v.label(*shapes[nm]) for nm in names}}
                                for p, v in (("old", OLD), ("op", OP))}
        fmt = lambda ts: " ".join(f"{t_:6.1f}" for t_ in ts)
        print(f"{lname:18} {fmt(times['old']):>22} {fmt(times['op']):>22}  {kern_n['old']} / {kern_n['op']}",
              flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
