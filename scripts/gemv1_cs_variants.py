"""An x-stationary M == 1 int4 GEMV: each program holds its K slice of x in registers once and
streams rows past it (a prototype and its sweep on the 31B's mid-size weights, one GPU call).

    python -m scripts.gemv1_cs_variants [--out gemv1_cs_variants.json] [--budget 120] [--prewarm 14]
    python -m scripts.gemv1_cs_variants --interpret [--out smoke.json]   # CPU: Triton's interpreter

Why: one kernel reads these weights (22-60 MB) at 75-91% of the copy bandwidth when ~500-1000
programs keep 16-byte loads in flight (scripts/read_ceiling.py), but the op's GEMV runs at 45-57%
whatever its tile, depth, layout or program count (gemv1_layout_variants.py,
gemv1_parts_variants.py): the loads are not what holds it. Its programs load, for every weight
word, the x that word meets (16 bytes of x levels per 4-byte word, from L1) and sum across lanes
or keep per-lane sums per tile. Here a thread keeps the x of its 4 words (32 values, fp32) in
registers for every row it reads: a program is R rows x STEPS steps of rows over one K slice of W
words (one word a lane along K, 4 words a thread: 16-byte loads), x loaded once, the next rows'
words loaded one step ahead; per word 8 nibble-as-float lop3s and 8 FMAs (`_nibble_as_float`,
x as bf16: one launch, no quantize kernel), the row-independent correction and the scale once per
word, one sum across the slice per row. K slices (whole groups) where K is longer than W, their
fp32 partials summed by `_sum_splits_kernel`.

Per shape: each variant checked against an fp32 matmul on the dequantized weight (two fresh x,
NaN-poisoned outputs; rel err <= 1e-2), then timed as CUDA-graph replays over rotated weight copies
(>= 256 MB: from HBM; median) beside the op's plan; a sliding and a full layer's four projections
as one graph (plan vs best). Copy bandwidth measured in the same run. Table, one JSON (`--out`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (check_and_time, compare_layer, finish_sweep, launch_directly, layer_shapes_31b,
                                    rotated_weights, sweep_args, sweep_setup)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
XDT = torch.bfloat16
GROUP = 128
WORDS = GROUP // 8  # words of a group
LAYERS = {"sliding": ["qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj", "mlp.down_proj"],
          "full": ["qk_proj.full", "o_proj.full", "mlp.gate_up_proj", "mlp.down_proj"]}
TINY = {"qkv_proj.sliding": (48, 1024), "o_proj.sliding": (40, 2048), "mlp.gate_up_proj": (96, 1024),
        "mlp.down_proj": (40, 3072), "qk_proj.full": (56, 1024), "o_proj.full": (40, 2048)}


@triton.jit
def _gemv1_cs_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, KW, WPS, stride_ww, stride_sn, stride_os,
                     R: tl.constexpr, STEPS: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr):
    """out[pid_k, rows] (fp32 partials, or y itself with one slice) for R * STEPS rows over K words
    [pid_k * WPS, min((pid_k + 1) * WPS, KW)), WPS <= W, a multiple of the group's words."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    k0 = pid_k * WPS
    kw = k0 + tl.arange(0, W)
    kok = (kw < KW) & (kw < k0 + WPS)
    xw = x_ptr.to(tl.pointer_type(tl.int32))  # bf16 pairs (x[2p], x[2p + 1]) as one word
    xs = []
    corr = tl.zeros((W,), dtype=tl.float32)
    for p in tl.static_range(4):
        xp = tl.load(xw + kw * 4 + p, mask=kok, other=0)
        xs = xs + [(xp << 16).to(tl.float32, bitcast=True), (xp & -65536).to(tl.float32, bitcast=True)]
    for i in tl.static_range(8):  # sum over the word of (2^E + 8) x: row-independent
        if i < 2:
            c = (1 << (15 - 4 * i)) + 8
        elif i < 5:
            c = (1 << (23 - 4 * i)) + 8
        else:
            c = (1 << (35 - 4 * i)) + 8
        corr += c * xs[i]
    r0 = pid_n * (R * STEPS)
    rr = tl.arange(0, R)
    rows = tl.minimum(r0 + rr, N - 1).to(tl.int64)  # rows past N read row N - 1, stored nowhere
    w = tl.load(w_ptr + rows[:, None] * stride_ww + kw[None, :], mask=kok[None, :], other=0)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + (kw // 16)[None, :], mask=kok[None, :], other=0.0)
    for st in range(STEPS):
        nrows = tl.minimum(r0 + (st + 1) * R + rr, N - 1).to(tl.int64)
        wn = tl.load(w_ptr + nrows[:, None] * stride_ww + kw[None, :], mask=kok[None, :] & (st + 1 < STEPS), other=0)
        sn = tl.load(s_ptr + nrows[:, None] * stride_sn + (kw // 16)[None, :], mask=kok[None, :] & (st + 1 < STEPS),
                     other=0.0)
        part = tl.zeros((R, W), dtype=tl.float32)
        for i in tl.static_range(8):
            if i < 2:
                f = im._nibble_as_float(w << 8, 8 + 4 * i, ASM)
            elif i < 5:
                f = im._nibble_as_float(w, 4 * i, ASM)
            else:
                f = im._nibble_as_float(w >> 12, 4 * i - 12, ASM)
            part += f * xs[i][None, :]
        val = tl.sum((part - corr[None, :]) * s.to(tl.float32), axis=1)
        ro = r0 + st * R + rr
        tl.store(out_ptr + pid_k * stride_os + ro, val.to(out_ptr.dtype.element_ty), mask=ro < N)
        w = wn
        s = sn


@dataclass(frozen=True)
class Variant:
    r: int  # rows a step
    steps: int  # steps of rows a program
    warps: int
    wpt: int = 4  # words a thread along K

    @property
    def w(self) -> int:
        return 32 * self.warps * self.wpt

    @property
    def label(self) -> str:
        return f"cs{self.r}r{self.steps}s{self.warps}w{self.wpt}t"

    def splits(self, k: int) -> tuple[int, int]:
        """(slices, words a slice): whole groups, each <= W words."""
        groups = k // GROUP
        per = min(groups, self.w // WORDS)
        splits = triton.cdiv(groups, per)
        per = triton.cdiv(groups, splits)
        return splits, per * WORDS

    def __call__(self, x2, q, s):
        n, k = q.shape[0], q.shape[1] * 2
        splits, wps = self.splits(k)
        words = q.view(torch.int32)
        out = torch.empty((splits, n) if splits > 1 else (1, n), device=x2.device,
                          dtype=torch.float32 if splits > 1 else x2.dtype)
        grid = (triton.cdiv(n, self.r * self.steps), splits)
        _gemv1_cs_kernel[grid](x2, words, s, out, n, k // 8, wps, words.stride(0), s.stride(0), out.stride(0),
                               R=self.r, STEPS=self.steps, W=self.w, ASM=not _INTERPRET, num_warps=self.warps)
        if splits == 1:
            return out
        y = torch.empty((1, n), device=x2.device, dtype=x2.dtype)
        im._sum_splits_kernel[(triton.cdiv(n, 1024),)](out, y, n, splits, out.stride(0), BLOCK=1024, num_warps=4)
        return y


class Plan:
    label = "plan"

    def __call__(self, x2, q, s):
        return im.int4_linear(x2, q, s)


def candidates() -> list[Variant]:
    out = []
    for r in (2, 4, 8):
        for steps in (1, 2, 4, 8):
            for warps in (4, 8):
                for wpt in (4, 8):
                    if r * wpt <= 32:  # words a thread holds a step (registers)
                        out.append(Variant(r, steps, warps, wpt))
    return out


def shapes() -> dict:
    return dict(TINY) if _INTERPRET else layer_shapes_31b(LAYERS["sliding"] + LAYERS["full"])


def _prewarm_worker(idx, count):
    import scripts.gemv1_cs_variants as me
    launch_directly("prewarm")
    jobs = [(v, n, k) for v in me.candidates() for n, k in {(5376, 8192), (16384, 5376)}] + \
           [(me.Plan(), n, k) for n, k in me.shapes().values()]
    for v, n, k in jobs[idx::count]:
        try:
            q, s = im.quantize_int4(torch.randn(n, k, device="cuda"), GROUP)
            v(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), q, s)
        except Exception:
            pass


def main(argv=None) -> int:
    a = sweep_args("scripts.gemv1_cs_variants", __doc__, 120.0, argv)
    if isinstance(a, int):
        return a
    t0 = time.time()
    gbps, dev = sweep_setup(_prewarm_worker, a.prewarm, 60)
    print(f"copy {gbps:.0f} GB/s ({dev}); {time.time() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    doc = {"device": dev, "copy_gbps": gbps, "rows": rows, "best": {}, "layers": []}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # noqa: E731
    ok, weights, best = True, {}, {}
    todo = shapes()
    order = ["o_proj.sliding", "qkv_proj.sliding", "o_proj.full", "qk_proj.full", "mlp.down_proj", "mlp.gate_up_proj"]
    print(f"{'shape':18} {'N x K':>12} {'floor':>6} | {'plan':>6} {'%':>4} | {'best':16} {'us':>6} {'%':>4}", flush=True)
    for nm in order:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {nm} skipped", flush=True)
            continue
        n, k = todo[nm]
        nbytes, ws, ref_w = rotated_weights(n, k, GROUP)
        weights[nm] = ws
        floor = nbytes / gbps / 1e3
        vs = [Plan(), *candidates()]
        if _INTERPRET:
            vs = vs[:1] + [Variant(2, 2, 4, 4), Variant(4, 1, 4, 8), Variant(2, 2, 1, 4)]
        passed, res = check_and_time(vs, nm, n, k, ws, ref_w, floor, rows,
                                     extra=lambda v: {"splits": v.splits(k)[0] if isinstance(v, Variant) else None})
        ok = ok and passed
        timed = [(us, v) for us, v in res if us == us]
        if not timed:
            continue
        plan_us = next((u for u, w in timed if isinstance(w, Plan)), float("nan"))
        us, v = min(timed, key=lambda t: t[0])
        best[nm] = v
        top = sorted(timed, key=lambda t: t[0])[:4]
        doc["best"][nm] = {"variant": v.label, "us": us, "plan_us": plan_us, "floor_us": floor,
                           "top": [(w.label, u) for u, w in top]}
        print(f"{nm:18} {n:6}x{k:<5} {floor:6.1f} | {plan_us:6.1f} {floor / plan_us:4.0%} | {v.label:16} {us:6.1f} "
              f"{floor / us:4.0%} | " + "  ".join(f"{w.label} {u:.1f}" for u, w in top[1:]), flush=True)
        save()
    for lname, names in LAYERS.items():
        if _INTERPRET or not all(nm in weights for nm in names):
            continue
        xs = {nm: torch.randn(1, todo[nm][1], device=DEVICE, dtype=XDT) for nm in names}
        rec = compare_layer(lname, names, weights, xs, {"plan": lambda nm: Plan(), "best": lambda nm: best[nm]})
        rec["best_variants"] = [best[nm].label for nm in names]
        doc["layers"].append(rec)
        print(f"{lname} layer's four projections as one graph: plan {min(rec['plan_us']):.1f} us, best per shape "
              f"{min(rec['best_us']):.1f} us ({', '.join(rec['best_variants'])})", flush=True)
        save()
    return finish_sweep(doc, ok, t0, save)


if __name__ == "__main__":
    sys.exit(main())
