"""Decode-attention variant sweep for `gemma4::attention` (export/kernels/attention.py), one GPU
call: every decode config that fits SMEM_LIMIT, then split counts for the best ones, per KV
format, on the 31B full layer (and the sliding one). Each variant is first checked against the
fp32 reference on poisoned (NaN-filled) output and partial buffers with fresh random q, then
timed by CUDA-graph replay (median), as a fraction of the copy bandwidth measured in the same run.

    python -m scripts.attention_variants [--out results.json] [--jobs 12]

Kernels compile first in a process pool (Triton's disk cache then serves the timing process).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import triton
import triton.language as tl

from scripts import needs_cuda

FULL = ("31b-full", 4, 8, 512, 131072, 0)  # name, Hkv, G, D, slots, window
SLIDING = ("31b-sliding", 16, 2, 256, 1024, 1024)  # the ring holds the window
FMTS = ("bf16", "int8", "int4")
TARGETS = (132, 264, 528)
DEV = "cuda"
DTYPE = torch.bfloat16
SCALE = 1  # --smoke: fills and slots / 256 on the CPU through the Triton interpreter (logic check only)


def F(fill):
    return max(1, fill // SCALE)


def kv_bytes(Hkv, D, n, kv):
    per = {"bf16": 2 * D, "int8": D + 2, "int4": D // 2 + 2}[kv]
    return 2 * Hkv * n * per


def cfg_name(c):
    return f"n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


def configs_for(D, kv):
    """Fitting decode configs that pipeline (stages >= 2; one stage leaves no load in flight), 4 warps
    (8 were slower for every format and tile on the H200)."""
    from export.kernels import attention as A

    fmt = A.KV_FORMAT["float" if kv == "bf16" else kv]
    return [c for c in A.fitting(A._DECODE_ALL, D, fmt) if c.num_stages >= 2 and c.num_warps == 4][:2 if SCALE > 1 else None]


def caches(layer, kvs, empty=False):
    from export.kernels import attention as A

    _, Hkv, G, D, S, window = layer
    make = torch.empty if empty else torch.randn
    k = make(1, Hkv, S, D, device=DEV, dtype=DTYPE)
    v = make(1, Hkv, S, D, device=DEV, dtype=DTYPE)
    out = {}
    for kv in kvs:
        if kv == "bf16":
            out[kv] = (k, v, None, None)
        else:
            (kq, ks), (vq, vs) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
            out[kv] = (kq, vq, ks, vs)
    return out


def run(layer, args4, q, pos, cfg, target):
    from export.kernels import attention as A

    A.TARGET_PROGRAMS = target
    with A.use_configs(lambda cs, c=cfg: [c]):
        return A.launch(q, *args4, pos, layer[5], True)


def _warm(jobs):
    """Worker: compile each (layer, kv, config, target) by running it once."""
    torch.cuda.set_device(0)
    done = 0
    by_layer = {}
    for layer, kv, ci, target in jobs:
        by_layer.setdefault(layer, []).append((kv, ci, target))
    for layer, items in by_layer.items():
        cs = caches(layer, sorted({kv for kv, _, _ in items}), empty=True)
        _, Hkv, G, D, S, window = layer
        q = torch.randn(1, 1, Hkv * G, D, device=DEV, dtype=DTYPE)
        pos = torch.tensor([1000], device=DEV)
        for kv, ci, target in items:
            run(layer, cs[kv], q, pos, configs_for(D, kv)[ci], target)
            done += 1
    torch.cuda.synchronize()
    return done


def warm(jobs, n):
    import multiprocessing as mp

    chunks = [jobs[i::n] for i in range(n) if jobs[i::n]]
    with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as ex:
        return sum(ex.map(_warm, chunks))


class _Poisoned:
    """Stands in for `torch` inside the attention module: empty buffers come back NaN-filled."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, *a, **k):
        return self._real.empty(*a, **k).fill_(float("nan"))

    def empty_like(self, *a, **k):
        return self._real.empty_like(*a, **k).fill_(float("nan"))


def check(layer, args4, fill, cfg, target, refs):
    """Relative error vs the fp32 reference on poisoned buffers (fresh q per fill in refs)."""
    from export.kernels import attention as A

    q, pos, ref = refs[fill]
    A.torch = _Poisoned(torch)
    try:
        out = run(layer, args4, q, pos, cfg, target)
    finally:
        A.torch = torch
    if not bool(torch.isfinite(out).all()):
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_us(fn, rep):
    import triton.testing

    if DEV == "cpu":
        fn()
        return 1.0
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


@triton.jit
def _nothing(MP, LP, AP, O, soh, NUM_SPLITS, G: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr,
             CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, EAGER: tl.constexpr = 0, PDL: tl.constexpr = 0,
             PART16: tl.constexpr = 0):
    """Stands in for the combine kernel to time the split kernel alone."""
    pass


def main(argv=None) -> int:
    import triton.testing

    from export.kernels import attention as A
    from scripts.bench_attention import copy_gbps

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_variants.json")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--rep", type=int, default=15, help="do_bench_cudagraph rep (ms)")
    ap.add_argument("--top", type=int, default=2, help="configs per KV format carried into the split sweep")
    ap.add_argument("--choice", default="attention_choice.json",
                    help="where to write the chosen TARGET_PROGRAMS and DECODE_CONFIG (bench_attention.py --choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if not args.smoke and not needs_cuda("attention_variants", "--smoke runs tiny shapes on the CPU"):
        return 2
    global DEV, DTYPE, SCALE, FULL, SLIDING, TARGETS
    if args.smoke:
        DEV, DTYPE, SCALE, TARGETS = "cpu", torch.float32, 256, (132, 2112)
        FULL, SLIDING = ("31b-full", 2, 8, 32, 512, 0), ("31b-sliding", 4, 2, 16, 15, 8)
    t0 = time.time()
    res = {"rows": [], "checks": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    # phase 0: compile every decode config (split kernel + combine) in parallel
    jobs = [(FULL, kv, i, 264) for kv in FMTS for i in range(len(configs_for(FULL[3], kv)))]
    jobs += [(SLIDING, "bf16", i, 528) for i in range(len(configs_for(SLIDING[3], "bf16")))]
    n = warm(jobs, args.jobs) if DEV == "cuda" else 0
    print(f"compiled {n} variants in {time.time() - t0:.0f}s", flush=True)

    bw = copy_gbps() if DEV == "cuda" else 1.0
    res["copy_gbps"] = bw
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    torch.manual_seed(0)

    def measure(*a, **k):
        try:
            return _measure(*a, **k)
        except Exception as e:  # report and go on: one broken variant must not end the sweep
            print(f"FAILED {a[2]} {cfg_name(a[3])} t{a[4]} fill {a[5]}: {e!r}"[:400], flush=True)
            res["rows"].append(dict(phase=a[6], kv=a[2], cfg=cfg_name(a[3]), target=a[4], fill=a[5], error=repr(e)[:400]))
            return None

    def _measure(layer, cs, kv, cfg, target, fill, phase, check_fills=()):
        _, Hkv, G, D, S, window = layer
        errs = {f: check(layer, cs[kv], f, cfg, target, refs[kv]) for f in check_fills}
        pos = torch.tensor([F(fill) - 1], device=DEV)
        q = torch.randn(1, 1, Hkv * G, D, device=DEV, dtype=DTYPE)
        us = time_us(lambda: run(layer, cs[kv], q, pos, cfg, target), args.rep)
        nb = kv_bytes(Hkv, D, min(F(fill), window) if window else F(fill), kv)
        row = dict(phase=phase, layer=layer[0], kv=kv, cfg=cfg_name(cfg), target=target,
                   splits=A.decode_splits(S, Hkv), fill=fill, us=us, frac=nb / (us * 1e-6) / (bw * 1e9))
        if errs:
            row["err"] = max(errs.values())
        res["rows"].append(row)
        return row

    def make_refs(layer, cs, fills):
        _, Hkv, G, D, S, window = layer
        out = {}
        for kv in cs:
            out[kv] = {}
            for f in fills:
                q = torch.randn(1, 1, Hkv * G, D, device=DEV, dtype=DTYPE)
                pos = torch.tensor([F(f) - 1], device=DEV)
                ref = A.attention_reference(q.float(), *cs[kv], pos, window)
                out[kv][f] = (q, pos, ref)
        return out

    # phase 1: every fitting config at 264 programs, fills 32k and 128k (31B full layer)
    cs = caches(FULL, FMTS)
    check_fills = (1000, 33333)
    refs = make_refs(FULL, cs, check_fills)
    best = {}
    for kv in FMTS:
        scored = []
        for cfg in configs_for(FULL[3], kv):
            r32 = measure(FULL, cs, kv, cfg, 264, 32768, "configs", check_fills)
            r128 = measure(FULL, cs, kv, cfg, 264, 131072, "configs")
            if r32 is None or r128 is None or not r32["err"] <= 1e-2:
                continue
            scored.append((r32["us"] + r128["us"], cfg))
            print(f"{kv:5} {cfg_name(cfg):9} 32k {r32['us']:7.1f}us {r32['frac']:.2f}  128k {r128['us']:7.1f}us "
                  f"{r128['frac']:.2f}  err {r32['err']:.1e}", flush=True)
        best[kv] = [c for _, c in sorted(scored, key=lambda x: x[0])[:args.top]]
        save()
    print(f"phase 1 done {time.time() - t0:.0f}s", flush=True)

    # phase 2: split counts for the best configs, all fills
    for kv in FMTS:
        for cfg in best[kv]:
            for target in TARGETS:
                for fill in (1024, 8192, 32768, 131072):
                    measure(FULL, cs, kv, cfg, target, fill, "splits", check_fills if fill == 1024 else ())
        save()
    print(f"phase 2 done {time.time() - t0:.0f}s", flush=True)
    with open(args.choice, "w") as f:  # a first choice now, in case the run is cut short
        json.dump(choose(res["rows"]), f, indent=1)

    # phase 3: combine cost (split kernel alone) for the best config per format at 528 programs
    real = A._combine
    A._combine = _nothing
    try:
        for kv in FMTS:
            for fill in (1024, 32768, 131072) if best[kv] else ():
                measure(FULL, cs, kv, best[kv][0], 264, fill, "no-combine")
    finally:
        A._combine = real
    save()
    del cs, refs
    torch.cuda.empty_cache()

    # phase 4: the sliding layer (bf16 ring), every fitting config x split targets
    cs = caches(SLIDING, ("bf16",))
    refs = make_refs(SLIDING, cs, (1000, 5000))
    for cfg in configs_for(SLIDING[3], "bf16"):
        for target in (528, 1056):
            measure(SLIDING, cs, "bf16", cfg, target, 8192, "sliding", (1000, 5000) if target == 528 else ())
    save()
    print(f"phase 4 done {time.time() - t0:.0f}s", flush=True)

    choice = choose(res["rows"])
    res["choice"] = choice
    with open(args.choice, "w") as f:
        json.dump(choice, f, indent=1)
    print("choice", json.dumps(choice), flush=True)

    # table: best per (layer, kv, fill) over everything measured, and the worst error seen
    print(f"\ncopy {bw:.0f} GB/s; best per layer / kv / fill:")
    keyed = {}
    for r in res["rows"]:
        if r["phase"] == "no-combine" or "us" not in r:
            continue
        k = (r["layer"], r["kv"], r["fill"])
        if k not in keyed or r["us"] < keyed[k]["us"]:
            keyed[k] = r
    for k, r in sorted(keyed.items()):
        print(f"{k[0]:12} {k[1]:5} {k[2]:7} {r['us']:8.1f}us {r['frac']:.2f}  {r['cfg']} t{r['target']}")
    errs = [r["err"] for r in res["rows"] if "err" in r] or [float("nan")]
    print(f"checks: {len(errs)}, worst rel err {max(errs):.2e}, non-finite {sum(1 for e in errs if e != e)}")
    for r in res["rows"]:
        if r["phase"] == "no-combine" and "us" in r:
            print(f"no-combine {r['kv']:5} {r['fill']:7} {r['us']:8.1f}us")
    save()
    return 0


def choose(rows):
    """One TARGET_PROGRAMS for all layers and a decode config per (head dim, KV format): each fill
    weighs the same (time over the best time seen at that fill), fill 1k kept <= 20 us."""
    from export.kernels import attention as A

    split = [r for r in rows if r["phase"] == "splits" and "us" in r]
    bad = {(r["kv"], r["cfg"], r["target"]) for r in split if not r.get("err", 0.0) <= 1e-2}
    split = [r for r in split if (r["kv"], r["cfg"], r["target"]) not in bad]
    best_at = {}
    for r in split:
        k = (r["kv"], r["fill"])
        best_at[k] = min(best_at.get(k, math.inf), r["us"])
    score = {}
    for r in split:
        k = (r["kv"], r["cfg"], r["target"])
        penalty = 10.0 if r["fill"] == 1024 and r["us"] > 20 else 0.0
        score[k] = score.get(k, 0.0) + r["us"] / best_at[r["kv"], r["fill"]] + penalty
    kvs = sorted({k[0] for k in score})
    targets = sorted({k[2] for k in score})

    def best_cfg(kv, t):
        return min((v, c) for (k, c, tt), v in score.items() if k == kv and tt == t)

    target = min(targets, key=lambda t: sum(best_cfg(kv, t)[0] for kv in kvs))
    out = {"target_programs": target, "decode_config": []}
    for kv in kvs:
        fmt = A.KV_FORMAT["float" if kv == "bf16" else kv]
        out["decode_config"].append([FULL[3], fmt, *_parse(best_cfg(kv, target)[1])])
    slide = [r for r in rows if r["phase"] == "sliding" and "us" in r and r.get("err", 0.0) <= 1e-2]
    if slide:
        near = min({r["target"] for r in slide}, key=lambda t: abs(math.log(t / target)))
        r = min((r for r in slide if r["target"] == near), key=lambda r: r["us"])
        out["decode_config"].append([SLIDING[3], 0, *_parse(r["cfg"])])
    return out


def _parse(name):
    """'n32w4s3' -> (32, 4, 3)"""
    n, rest = name[1:].split("w")
    w, st = rest.split("s")
    return int(n), int(w), int(st)


if __name__ == "__main__":
    sys.exit(main())
