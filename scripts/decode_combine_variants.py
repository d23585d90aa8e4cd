"""Decode attention's partials and launches: fp16 partials and the programmatic-dependent-launch
attribute, on the 31B's full and sliding layers, in one GPU call (a measuring tool).

    python -m scripts.decode_combine_variants [--out decode_combine_variants.json] [--rounds 3] [--rep 40]
                                              [--variants op,pdl,...]
    python -m scripts.decode_combine_variants --smoke   # CPU: Triton's interpreter, tiny shapes, no timing
    ncu --profile-from-start off ... python -m scripts.decode_combine_variants --profile-once ...   # counters

Why: the 31B full layer's decode (`gemma4::attention`, export/kernels/attention.py) is the split kernel
and `_combine`; at fill 32k with the int8 cache it reads 134.7 MB in 48 us, 66% of the copy bandwidth,
where the same kernel's extra time from 32k to 128k runs at ~89%: ~12 us a call do not scale with the
fill. Part of it is the combine: the 264 programs write 4.3 MB of fp32 partials (8 rows x 512 columns
each) that the combine, a second launch, reads back. Two changes, each a switch of `attention.launch`:

- `h16`: the partials as each share's output acc / l in fp16 (`DECODE_PARTIALS_FP16`), half the bytes
  both ways; the combine weights them by exp(m_s - m) l_s.
- `pdl`: both kernels launched with the programmatic-stream-serialization attribute, as the artifact's
  launcher launches them (export/backends/cuda.py, `PDL_KERNELS`): the combine's launch and its first
  instructions overlap the split kernel's tail, and the next call's split kernel the combine's. The
  benchmarks so far launched them without it (bench_attention.py: `us` there is without).

A third, `pdl/late` (the split kernel letting the combine start after its main loop, not at its start),
was measured and dropped with the trigger it needed (scripts/measurements/decode_late_variants.json:
int8 at 32k 47.1 -> 46.9 us, int4 at 8k 25.3 -> 23.6, bf16 sliding 8.1 -> 9.3). So was `mN`, no combine
launch: the program finishing a group of N shares last merging their partials, and the one finishing the
last group merging the groups' (decode_merge_variants.json: 101-160 us at fill 1k against the op's 11-16;
one program's merge of the groups' partials runs at its load latency, slower than a second launch).

`kq8` / `kq8+pdl`: the int8 cache's q . k as an int8 dot (`DECODE_KNOBS` KQ8 1 for the call, the default
since; other KV dtypes run the op as is). `s<n>+pdl`: n shares per KV head instead of `decode_splits`' (~264
programs a layer), with the attribute; `s1` launches no combine (the split kernel writes the output): for the
small variants' layers (`--models e2b,e4b,26b-a4b`: one or two KV heads, a 512-slot ring), where the combine
merges up to 264 mostly empty shares. `all+pdl` / `act+pdl`: the combine reading every share's partials
(EAGER) / only those of the shares holding positions (`DECODE_ACTIVE_MIN_SPLITS` picks per layer); shares of
at least 2 or 4 blocks at a small fill (fewer, longer shares) were measured slower and dropped
(decode_active_shares.json). `hfast+pdl` / `sslow+pdl`: the split kernel's grid with the KV heads / the
shares as its slowest axis (`DECODE_SHARES_SLOWEST`). `skip+pdl` / `noskip+pdl`: the combine reading only its
first chunk of shares where the used ones fit it, or not (`DECODE_COMBINE_SKIP`). `nonib16+pdl`: int4 nibbles
1 / 3 shifted down before their conversion (the `NIB16` knob off; on, today's, they are read in place as
16 * code).

Variants `op` (today's launch), `pdl`, `h16`, `h16+pdl`, `kq8`, `kq8+pdl`, `s1+pdl` .. `s64+pdl`, `all+pdl`,
`act+pdl`, `hfast+pdl`, `sslow+pdl`, `skip+pdl`, `noskip+pdl`, `nonib16+pdl`
(`--variants`: a subset; `--models`, `--fills`, `--kv-dtypes`: a subset of the rows): each timed as a CUDA
graph of back-to-back calls (`triton.testing.do_bench_cudagraph`, median), the variants alternated over
`--rounds` rounds (the median of the rounds is the row's figure), at fills 1k, 8k, 32k and 128k for the full layer's bf16, int8 and
int4 caches and 1k / 32k for the sliding layer (bf16; the ring holds the window). Correctness on fresh q
for every row: each variant against an fp32 reference over the same (dequantized) cache, and `h16`'s
output against `op`'s. The copy bandwidth is measured in the same run. Table on stdout, JSON with
`copy_gbps` and `rows` (`layer`, `kv_dtype`, `fill`, `bytes`, and per variant `us`,
`fraction_of_copy_bw`, `rel_err`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

VARIANTS = {"op": dict(part16=False, pdl_attr=False),
            "pdl": dict(part16=False, pdl_attr=True),
            "h16": dict(part16=True, pdl_attr=False),
            "h16+pdl": dict(part16=True, pdl_attr=True),
            "kq8": dict(part16=False, pdl_attr=False, kq8=1),
            "kq8+pdl": dict(part16=False, pdl_attr=True, kq8=1),
            "s1+pdl": dict(part16=False, pdl_attr=True, splits=1),
            "s4+pdl": dict(part16=False, pdl_attr=True, splits=4),
            "s16+pdl": dict(part16=False, pdl_attr=True, splits=16),
            "s64+pdl": dict(part16=False, pdl_attr=True, splits=64),
            "all+pdl": dict(part16=False, pdl_attr=True, active=False),
            "act+pdl": dict(part16=False, pdl_attr=True, active=True),
            "hfast+pdl": dict(part16=False, pdl_attr=True, shares_slowest=False),
            "sslow+pdl": dict(part16=False, pdl_attr=True, shares_slowest=True),
            "skip+pdl": dict(part16=False, pdl_attr=True, combine_skip=True),
            "noskip+pdl": dict(part16=False, pdl_attr=True, combine_skip=False),
            "nonib16+pdl": dict(part16=False, pdl_attr=True, knobs={"NIB16": 0})}
SHARE_KEYS = {"splits", "active", "shares_slowest", "knobs", "combine_skip"}  # what the smoke run checks without PDL
FULL_FILLS = (1024, 8192, 32768, 131072)
SLIDING_FILLS = (1024, 32768)


def layer_cases(smoke: bool, models=("31b",)):
    """(name, Hkv, G, D, slots, window, KV dtypes, fills): each model's full layer (a flat cache of
    131072 slots; quantized caches for the 31B) and sliding layer (its window-sized ring, bf16)."""
    if smoke:
        return [("tiny-full", 2, 4, 64, 256, 0, ("bf16", "int8", "int4"), (40, 256)),
                ("tiny-sliding", 2, 2, 32, 64, 64, ("bf16",), (100,))]
    from export.gemma4.config import PRESETS

    out = []
    for m in models:
        cfg = PRESETS[m]
        for sliding in (False, True):
            i = next(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i) == sliding)
            Hkv, D = cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
            G = cfg.num_attention_heads // Hkv
            if sliding:
                out.append((f"{m}-sliding", Hkv, G, D, cfg.ring_slots(131072), cfg.sliding_window, ("bf16",),
                            SLIDING_FILLS))
            else:
                out.append((f"{m}-full", Hkv, G, D, 131072, 0, ("bf16", "int8", "int4"), FULL_FILLS))
    return out


def launch_with(A, D, q, kk, vv, ks, vs, pos, window, kq8=None, knobs=None, splits=None, **kw):
    """attention.launch (decode) with, for this call only, decode knobs set (`DECODE_KNOBS` of the cache's
    head dim / format; the kernel cache is keyed on the knobs: each setting compiles its own kernel): `kq8`
    the int8 kernel's KQ8, `knobs` any others; and the shares per KV head forced (`decode_splits`; one
    share: no combine launch)."""
    want = dict(knobs or {})
    fmt = A.kv_format(kk, ks)
    if kq8 is not None and fmt == 1:
        want["KQ8"] = kq8
    had = (D, fmt) in A.DECODE_KNOBS
    table = A.DECODE_KNOBS.setdefault((D, fmt), {})
    old = {k: table[k] for k in want if k in table}
    old_splits = A.decode_splits
    table.update(want)
    if splits is not None:
        A.decode_splits = lambda *a: splits
    try:
        return A.launch(q, kk, vv, ks, vs, pos, window, True, **kw)
    finally:
        A.decode_splits = old_splits
        for k in want:
            table.pop(k)
        table.update(old)
        if not had:
            A.DECODE_KNOBS.pop((D, fmt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: none)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated timing rounds per row (default %(default)s)")
    ap.add_argument("--rep", type=int, default=40, help="do_bench_cudagraph rep in ms (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="Triton's interpreter on the CPU, tiny shapes, no timing")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, from " + ", ".join(VARIANTS) + " (default: all)")
    ap.add_argument("--models", default="31b",
                    help="comma-separated presets whose full and sliding layers to run (default: 31b)")
    ap.add_argument("--fills", default=None, help="comma-separated fills (default: every fill of each layer)")
    ap.add_argument("--kv-dtypes", default=None, help="comma-separated, from bf16, int8, int4 (default: all)")
    ap.add_argument("--profile-once", action="store_true",
                    help="no timing: each row's variants run once more between cudaProfilerStart / Stop, for "
                         "`ncu --profile-from-start off` (their kernels in row and --variants order)")
    args = ap.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or not chosen:
        print(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    from export.kernels import attention as A
    from scripts import bench_attention as B

    result = B.variant_setup(args.smoke, "decode_combine_variants")
    if result is None:
        return 2
    dev, dt, bw = B.DEV, B.DT, result["copy_gbps"]
    result.update({"variants": {k: VARIANTS[k] for k in chosen}, "rounds": args.rounds, "rows": []})
    t_start = time.time()
    only_fills = {int(f) for f in args.fills.split(",")} if args.fills else None
    only_kvs = set(args.kv_dtypes.split(",")) if args.kv_dtypes else None
    for name, Hkv, G, D, S, window, kvs, fills in layer_cases(args.smoke, tuple(args.models.split(","))):
        fills = tuple(f for f in fills if only_fills is None or f in only_fills or args.smoke)
        kvs = tuple(kv for kv in kvs if only_kvs is None or kv in only_kvs)
        if not fills or not kvs:
            continue
        H = Hkv * G
        k, v = B.fill_cache(Hkv, S, D, max(fills), window)
        quant = {kv: (A.quantize_kv(k, kv) + A.quantize_kv(v, kv)) for kv in kvs if kv != "bf16"}
        for fill in fills:
            pos = torch.tensor([fill - 1], device=dev)
            n = min(fill, window) if window else fill
            for kv in kvs:
                kk, vv, ks, vs = (k, v, None, None) if kv == "bf16" else (quant[kv][0], quant[kv][2], quant[kv][1],
                                                                          quant[kv][3])
                q = torch.randn(1, 1, H, D, device=dev, dtype=dt)
                ref = B.reference(q, kk, vv, ks, vs, pos, window)
                row = {"layer": name, "kv_dtype": kv, "fill": fill, "bytes": B.kv_bytes(Hkv, D, n, kv)}
                fns, outs = {}, {}
                for var in chosen:
                    kw = VARIANTS[var]
                    if kw["pdl_attr"] and args.smoke and not SHARE_KEYS & set(kw):
                        continue  # no launch attribute in the interpreter (the share variants run without it)
                    fns[var] = (lambda kw=kw, D=D: launch_with(A, D, q, kk, vv, ks, vs, pos, window, **kw))
                    outs[var] = fns[var]()
                    row[f"{var}_rel_err"] = B.rel(outs[var], ref)
                    assert torch.isfinite(outs[var]).all(), (name, kv, fill, var)
                if "h16" in outs and "op" in outs:
                    row["h16_vs_op"] = B.rel(outs["h16"], outs["op"])
                if args.profile_once and not args.smoke:
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                    for fn in fns.values():
                        fn()
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
                elif not args.smoke:
                    times = {var: [] for var in fns}
                    for _ in range(args.rounds):
                        for var, fn in fns.items():
                            times[var].append(B._time(fn, argparse.Namespace(timing="graph", rep=args.rep)) * 1e3)
                    for var, ts in times.items():
                        us = sorted(ts)[len(ts) // 2]
                        row[f"{var}_us"] = us
                        row[f"{var}_fraction_of_copy_bw"] = row["bytes"] / (us * 1e-6) / (bw * 1e9)
                        row[f"{var}_us_rounds"] = ts
                result["rows"].append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if not k.endswith("_rounds")), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    result["seconds"] = round(time.time() - t_start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.smoke and not args.profile_once:
        print(f"\n{'layer':12} {'kv':5} {'fill':>7} " + " ".join(f"{v:>13}" for v in chosen))
        for r in result["rows"]:
            print(f"{r['layer']:12} {r['kv_dtype']:5} {r['fill']:7d} " + " ".join(
                f"{r[v + '_us']:6.1f} ({r[v + '_fraction_of_copy_bw']:.2f})" for v in chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
