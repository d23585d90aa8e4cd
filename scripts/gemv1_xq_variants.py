"""Sweep of the M == 1 int4 GEMV with x as two int8 levels and dp4a (`_gemv1_tile_q`) against
the bf16-x kernel, on the 31B's joined shapes, in one GPU call (a tuning tool).

    python -m scripts.gemv1_xq_variants [--out gemv1_xq_variants.json] [--budget 120] [--prewarm 8]

Why: the bf16-x kernel spends ~18 integer/float ops per word of 8 nibbles (8 lop3 into float
mantissas, 8 FMAs, shifts); the same loads without that arithmetic ran ~1.5x faster
(scripts/measurements/int4_gemv1_variants.json). With x quantized per group to two int8 levels
(x ~= s (h + l / 254), within max|x| / 64516) a word costs a shift, two masks and four dp4a.

Per shape: the op's path as it is (`gemv1_plan`), the plan's config and split with bf16 x, and
two-level x over a grid of (config, split); the quantize kernel alone; a streaming read of
the same bytes (the access-pattern-free ceiling). Every variant is checked against an fp32
matmul on the dequantized weight (fresh x, NaN-poisoned outputs) on the shape itself and on a
ragged one; timed as CUDA-graph replays over rotated weight copies (>= 256 MB, from HBM),
median; copy bandwidth (eager device copy) measured in the same run. Table on stdout, one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from export.kernels import int4_matmul as im
from scripts.gemv1_variants import (bench_graph, launch_directly, quant_x, rel, rotated_weights, spawn_prewarm,
                                    stream_read_us)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"

# (BLOCK_N, GROUPS, warps, K parts, depth)
# (the first run also had (32, 1, 1|2|4), (64, 1, 4), (128, 1, 4|8) one or two tiles ahead, (16, 1, 4)
# x 4 parts: 64 rows x 2 groups won on every shape)
CONFIGS = [(64, 2, 4, 1, 1), (32, 2, 2, 1, 1), (32, 2, 4, 1, 1), (16, 2, 2, 1, 1), (64, 4, 4, 1, 1),
           (32, 4, 4, 1, 1), (128, 2, 8, 1, 1), (64, 2, 8, 1, 1), (64, 2, 4, 1, 2), (128, 4, 8, 1, 1),
           (64, 2, 4, 2, 1), (8, 1, 8, 8, 2)]
_KERN: dict = {}


def kern(c):
    if c not in _KERN:
        _KERN[c] = im._autotuned([im._cfg1(*c)], im._int4_gemv1_kernel)
    return _KERN[c]


def splits_for(c):
    return (1, 2) if c[3] >= 4 else (1, 2, 4, 8, 12)


def label(c, xq=True):
    return f"{'xq' if xq else 'bf'}{c[0]}g{c[1]}w{c[2]}p{c[3]}d{c[4]}"


def poison(n):
    if not _INTERPRET:
        blocks = [torch.full((b,), 0xFF, dtype=torch.uint8, device=DEVICE) for b in (2 * n, 4 * n, 32 * n)]
        del blocks


def check(c, n, k, splits, xq, ws_ref, red=None):
    q, s, ref_w = ws_ref
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float32 if _INTERPRET else torch.bfloat16)
    poison(n)
    y = im.int4_gemv1(x, q, s, splits, kernel=kern(c), xq=xq, red=red)
    return rel(y, x.float() @ ref_w.t())


def _prewarm_worker(idx, count):
    mine = [(c, xq) for c in CONFIGS for xq in (True, False)][idx::count]
    for k in (5376, 8192):
        q, s = im.quantize_int4(torch.randn(256, k, device=DEVICE), 128)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        for c, xq in mine:
            for splits in (1, 2):
                try:
                    im.int4_gemv1(x, q, s, splits, kernel=kern(c), xq=xq)
                except Exception:
                    pass
    torch.cuda.synchronize()


def prewarm(count):
    spawn_prewarm(_prewarm_worker, count, 50)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gemv1_xq_variants.json"))
    ap.add_argument("--budget", type=float, default=120.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--prewarm", type=int, default=8)
    a = ap.parse_args(argv)
    t0 = time.time()
    if not launch_directly("gemv1_xq_variants"):
        return 2
    if a.prewarm and not _INTERPRET:
        prewarm(a.prewarm)
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import copy_gbps, linear_shapes
    gbps = 1000.0 if _INTERPRET else copy_gbps()
    print(f"copy {gbps:.0f} GB/s ({'interpreter' if _INTERPRET else torch.cuda.get_device_name()})", flush=True)
    rows: list[dict] = []
    doc = {"device": "cpu" if _INTERPRET else torch.cuda.get_device_name(), "copy_gbps": gbps, "rows": rows}
    save = lambda: a.out.write_text(json.dumps(doc, indent=1) + "\n")
    # ragged: N 1000 (no tile divides it), K 36 groups, splits 1 / 3 / 5 / 8
    rn, rk = (40, 640) if _INTERPRET else (1000, 4608)
    q, s = im.quantize_int4(torch.randn(rn, rk, device=DEVICE), 128)
    wr = (q, s, im.dequantize_int4(q, s, torch.float32))
    worst = 0.0
    for c in CONFIGS:
        for sp in (1, 3, 5) if _INTERPRET else (1, 3, 5, 8):
            for red in (0, 2):
                worst = max(worst, check(c, rn, rk, sp, True, wr, red))
    print(f"ragged checks: worst rel err {worst:.2e}", flush=True)
    doc["ragged_worst_rel_err"] = worst
    shapes = sorted(((names if isinstance(names, str) else "+".join(names), n, k)
                     for (n, k), (names, _) in linear_shapes(PRESETS["31b"]).items()),
                    key=lambda sh: sh[1] * sh[2])
    if _INTERPRET:
        shapes = [("tiny", 48, 512), ("tiny2", 80, 768)]
    for names, n, k in shapes:
        if time.time() - t0 > a.budget:
            print(f"budget spent: {names} skipped", flush=True)
            continue
        g = 128
        nbytes, ws, ref_w = rotated_weights(n, k, g)
        wref = (*ws[-1], ref_w)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.float32 if _INTERPRET else torch.bfloat16)
        floor_us = nbytes / gbps / 1e3
        res = []

        def timed(tag, c, splits, xq, red=None):
            try:
                err = check(c, n, k, splits, xq, wref, red)
                us = bench_graph(lambda: [im.int4_gemv1(x, qq, ss, splits, kernel=kern(c), xq=xq, red=red)
                                          for qq, ss in ws], len(ws))
            except Exception as e:
                print(f"  {tag} {label(c, xq)} split {splits}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                return None
            r = {"shape": names, "n": n, "k": k, "tag": tag, "variant": label(c, xq) + ("r0" if red == 0 else ""),
                 "splits": splits,
                 "us": us, "rel_err": err, "fraction_of_copy_bw": floor_us / us}
            res.append(r)
            rows.append(r)
            return r

        cfg, sp, *_ = im.gemv1_plan(n, k, g)
        pc = (cfg.kwargs["BLOCK_N"], cfg.kwargs["GROUPS"], cfg.num_warps, cfg.kwargs["PARTS"], cfg.kwargs["DEPTH"])
        timed("op", pc, sp, im.GEMV1_XQ)  # the op's M == 1 path as it stands
        if not _INTERPRET:  # (the interpreter's bf16 casts)
            timed("bf16x", pc, sp, False)  # the plan's config and split with bf16 x
        for c in CONFIGS:
            for s_ in splits_for(c):
                timed("xq", c, s_, True)  # K slices summed in-kernel (GEMV1_RED_XQ)
        for c in CONFIGS[:2]:
            for s_ in (4, 8, 12):
                timed("xq_red0", c, s_, True, red=0)  # the same with `_sum_splits_kernel`
        # the quantize kernel alone, and the streaming read of the same bytes
        quant_us = bench_graph(lambda: [quant_x(x, g) for _ in range(20)], 20)
        read_us = stream_read_us([qq.view(torch.int32).view(-1) for qq, _ in ws])
        ok = [r for r in res if r["rel_err"] <= 1e-2]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        bad = [(r["variant"], r["splits"], r["rel_err"]) for r in res if not r["rel_err"] <= 1e-2]
        summ = {"shape": names, "n": n, "k": k, "bytes": nbytes, "floor_us": floor_us, "quant_us": quant_us,
                "read_us": read_us, "best": best, "bad": bad}
        doc.setdefault("summary", []).append(summ)
        opus = next((r["us"] for r in res if r["tag"] == "op"), float("nan"))
        bfus = next((r["us"] for r in res if r["tag"] == "bf16x"), float("nan"))
        print(f"{names[:34]:34} {n:6}x{k:<5} floor {floor_us:6.1f} read {read_us:6.1f} quant {quant_us:4.1f}"
              f" | op {opus:6.1f} ({floor_us / opus:4.0%}) bf16 x {bfus:6.1f} | best {best['us'] if best else 0:6.1f}"
              f" ({floor_us / best['us'] if best else 0:4.0%}) {best['variant'] if best else '-'}/"
              f"{best['splits'] if best else '-'}{'  BAD ' + str(bad) if bad else ''}", flush=True)
        for r in sorted(res, key=lambda r: r["us"])[:6]:
            print(f"    {r['variant']:18} split {r['splits']} {r['us']:7.1f} us {r['fraction_of_copy_bw']:5.0%}"
                  f" err {r['rel_err']:.1e}", flush=True)
        save()
        del ws, words
        if not _INTERPRET:
            torch.cuda.empty_cache()
    save()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
