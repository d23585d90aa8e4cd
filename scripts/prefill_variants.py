"""Prefill-attention variant sweep for `gemma4::attention` (export/kernels/attention.py), one GPU
call: the prefill kernel's configs (BLOCK_M, BLOCK_N, warps, stages, DV column split, position
splits) on the 31B full layer (head_dim 512, 4 KV heads x 8) and sliding layer (head_dim 256,
16 x 2, window 1024), chunks T of 128 / 512 / 2048 queries ending at fills 8k / 32k / 128k, bf16
and int8 KV; the previous prefill kernel and torch's SDPA (whichever backend takes the head dim,
else null) beside them. Useful FLOPs: 4 * T * n * H * D with n = the fill (full layer) or the
window (sliding), the causal half not discounted. Each variant is first checked against the fp32
reference with fresh random q on a NaN-poisoned output; every compiled kernel's shared memory
is read back and a variant over SMEM_LIMIT is reported and not chosen. TFLOP/s against torch's
bf16 matmul and the copy bandwidth measured in the same run.

--dk: the head_dim-512 comparison alone: the full layer at T = 2048, fills 8k / 32k (and 128k for
the previous default and the best few at 32k when the budget allows), bf16 / int8 / int4 KV, the
previous default (BLOCK_M 32, q held in registers) beside the variants with q . k over D chunks
(DK columns a step, q re-read from L2, BLOCK_M 64 / 128 on wgmma); registers and spills of each
compiled kernel read back with its shared memory. --dk-defaults --dk-chunks 128,512,2048: the
previous default against PREFILL_CONFIG's at each chunk (short ones split the positions).

    python -m scripts.prefill_variants [--out prefill_variants.json] [--jobs 12] [--smoke]
        [--dk [--dk-chunks 2048] [--dk-defaults]]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from scripts import needs_cuda
from scripts.attention_variants import _Poisoned  # empty buffers come back NaN

FULL = ("31b-full", 4, 8, 512, 131072, 0)  # name, Hkv, G, D, slots, window
SLIDING = ("31b-sliding", 16, 2, 256, 1024, 1024)  # slots: window + T - 1 (set per chunk)
CHUNKS = (512, 2048, 128)  # the target chunks first: a run cut short by its budget still has them
FILLS = (8192, 32768, 131072)
KVS = ("bf16", "int8")
# (BLOCK_M, BLOCK_N, num_warps, num_stages, DV) per head dim; splits follow PREFILL_TARGET_PROGRAMS
VARIANTS = {
    512: [(32, 32, 8, 2, 1), (32, 32, 8, 2, 2), (32, 16, 8, 3, 2), (32, 16, 8, 2, 1), (32, 16, 8, 3, 1),
          (32, 32, 4, 2, 2), (64, 16, 8, 1, 2)],
    256: [(64, 32, 4, 2, 1), (64, 32, 8, 2, 1), (32, 32, 8, 2, 1), (32, 32, 4, 3, 1), (32, 64, 8, 2, 1)],
}
# --dk: (BLOCK_M, BLOCK_N, num_warps, num_stages, DV, DK, DLOOP, VEARLY) for head_dim 512; the first
# is the default before the D-chunked path (q held, DK 0)
DK_VARIANTS = [(32, 32, 4, 2, 2),
               (64, 64, 8, 2, 2, 64, 1, 0), (64, 64, 8, 2, 2, 64, 1, 1), (64, 64, 8, 3, 2, 64, 1, 0),
               (64, 64, 8, 3, 2, 64, 1, 1), (64, 64, 4, 2, 2, 64, 1, 0), (64, 64, 8, 2, 2, 128, 1, 0),
               (64, 32, 8, 2, 2, 128, 1, 0), (64, 64, 8, 1, 2, 64, 0, 0), (64, 64, 8, 1, 2, 128, 0, 1),
               (128, 64, 8, 2, 2, 64, 1, 0), (128, 32, 8, 2, 2, 128, 1, 0), (64, 64, 8, 2, 1, 64, 1, 0),
               (64, 64, 8, 4, 2, 64, 1, 0), (64, 64, 8, 4, 2, 32, 1, 0), (32, 64, 4, 2, 2, 64, 1, 0)]
# --dk-defaults: configs near the measured best, at the largest chunk only
DK_REFINE = [(64, 64, 8, 3, 1, 64, 1, 0), (64, 64, 8, 2, 1, 32, 1, 0), (64, 64, 4, 3, 2, 64, 1, 0),
             (128, 64, 8, 3, 2, 64, 1, 0), (64, 64, 4, 2, 2, 32, 1, 0)]
DK_CHUNK, DK_FILLS, DK_KVS, DK_LONG = 2048, (8192, 32768), ("bf16", "int8", "int4"), 131072
TARGETS = (1, 264)  # PREFILL_TARGET_PROGRAMS: 1 = never split positions
OLD = (32, 32, 4, 1)  # the previous prefill kernel's config (BLOCK_M, BLOCK_N, warps, stages)
DEV, DTYPE, SCALE = "cuda", torch.bfloat16, 1


def slots(layer, T):
    return layer[5] + T - 1 if layer[5] else layer[4]


def cache(layer, T, kv, make=torch.randn):
    from export.kernels import attention as A

    _, Hkv, G, D, _, _ = layer
    S = slots(layer, T)
    k = make(1, Hkv, S, D, device=DEV, dtype=DTYPE)
    v = make(1, Hkv, S, D, device=DEV, dtype=DTYPE)
    if kv == "bf16":
        return k, v, None, None
    (kq, ks), (vq, vs) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
    return kq, vq, ks, vs


REF_ROWS = 128


def reference(A, q, c4, pos, window, rows=None):
    """fp32 reference; a flat cache's chunk in pieces of `rows` queries (each piece's positions
    are its own; a ring needs the whole chunk's last position, and is small)."""
    T = q.shape[1]
    rows = rows or REF_ROWS
    if window or T <= rows:
        return A.attention_reference(q.float(), *c4, pos, window)
    return torch.cat([A.attention_reference(q[:, i:i + rows].float(), *c4, pos + i, window)
                      for i in range(0, T, rows)], dim=1)


def run(layer, c4, q, pos, var):
    """var: ("new", cfg5, target) or ("old", cfg4)."""
    from export.kernels import attention as A

    if var[0] == "new":
        A.PREFILL_TARGET_PROGRAMS = var[2]
        with A.use_prefill_config(var[1]):
            return A.launch(q, *c4, pos, layer[5], False)
    return old_launch(q, *c4, pos, layer[5], var[1])


def old_launch(q, k, v, k_scale, v_scale, pos, window, cfg):
    """The previous prefill: grid (1, cdiv(T * G, BLOCK_M), Hkv) over the shared decode body."""
    import triton

    from export.kernels import attention as A

    _, T, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    fmt = A.kv_format(k, k_scale)
    ks = k_scale if k_scale is not None else q
    vs = v_scale if v_scale is not None else q
    out = torch.empty_like(q)
    strides = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
               ks.stride(1) if k_scale is not None else 0, out.stride(1), out.stride(2))
    bm, bn, w, s = cfg
    A._attn_body[(1, triton.cdiv(T * G, bm), Hkv)](
        q, k, v, ks, vs, pos, out, q, q, q, T, S, H, window, 1, *strides, G=G, D=D, KV_FMT=fmt,
        SPLIT=False, FP32=q.dtype == torch.float32, INTERPRET=A._interpreting(), BLOCK_M=bm, BLOCK_N=bn,
        num_warps=w, num_stages=s)
    return out


def variants(D, T):
    """Position splits only where the chunk gives few row blocks; the previous kernel at T = 128."""
    small = T == min(CHUNKS)
    out = [("new", c, t) for c in VARIANTS[D] for t in (TARGETS if small else TARGETS[:1])]
    return out + ([("old", OLD)] if small else [])


def vname(var):
    """m<BLOCK_M>n<BLOCK_N>w<warps>s<stages> dv<DV>[ k<DK><L loop | U unrolled>[e: V loaded early]] t<target>"""
    if var[0] == "old":
        return "old m%dn%dw%ds%d" % var[1]
    name = "m%dn%dw%ds%d dv%d" % var[1][:5]
    if len(var[1]) > 5 and var[1][5]:
        name += " k%d%s%s" % (var[1][5], "L" if var[1][6] else "U", "e" if var[1][7] else "")
    return name + " t%d" % var[2]


def _warm(jobs):
    """Worker: compile each (layer, T, kv, variant) by running it once at a small fill."""
    torch.cuda.set_device(0)
    done = 0
    for layer, T, kv, var in jobs:
        try:
            c4 = cache(layer, T, kv, make=torch.zeros)
            q = torch.zeros(1, T, layer[1] * layer[2], layer[3], device=DEV, dtype=DTYPE)
            run(layer, c4, q, torch.tensor([T], device=DEV), var)
            done += 1
        except Exception as e:  # the timing process reports it
            print(f"warm failed {layer[0]} T{T} {kv} {vname(var)}: {e!r}"[:300], flush=True)
    torch.cuda.synchronize()
    return done


def time_ms(fn, budget_ms=60.0, least=1):
    """Median of CUDA-event timings, as many as fit the budget (least to 20) after a warm-up call."""
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    n = max(least, min(20, int(budget_ms / max(first, 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_gbps(nbytes=2 << 30):
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 200)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n=8192):
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, 200)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def shared_bytes():
    """Shared memory of every compiled prefill kernel: (constexprs and options as Triton keys its
    cache, bytes, registers, spilled bytes), and the largest."""
    from export.kernels import attention as A

    out = []
    try:
        for caches in A._prefill_body.device_caches.values():
            for key, k in caches[0].items():
                out.append((str(key)[-400:], k.metadata.shared, getattr(k, "n_regs", None),
                            getattr(k, "n_spills", None)))
    except Exception as e:  # Triton internals: report, do not fail the run
        return {"unavailable": repr(e)[:200]}
    return {"max": max((b for _, b, _, _ in out), default=None), "kernels": out}


def sdpa_fn(q, k, v, pos, window):
    """torch SDPA with an explicit mask (the cache's positions), GQA by enable_gqa; the backends
    that take a mask and this head dim (memory-efficient, cuDNN), no math fallback."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, T, H, D = q.shape
    S = k.shape[2]
    qq = q.transpose(1, 2)
    positions = pos + torch.arange(T, device=q.device)
    last = positions[-1]
    idx = torch.arange(S, device=q.device)
    kp = (last - (last - idx) % S)[None, :]
    m = (kp >= 0) & (kp <= positions[:, None])
    if window:
        m = m & (positions[:, None] - kp < window)
    mask = m[None, None]

    def fn():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    return fn


def main(argv=None) -> int:
    global DEV, DTYPE, SCALE, FULL, SLIDING, CHUNKS, FILLS, VARIANTS, REF_ROWS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prefill_variants.json")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--budget", type=float, default=135.0, help="seconds after which no new cell starts")
    ap.add_argument("--dk", action="store_true", help="only the head_dim-512 comparison (DK_VARIANTS)")
    ap.add_argument("--dk-chunks", default=str(DK_CHUNK), help="--dk: chunk lengths T, comma-separated")
    ap.add_argument("--dk-defaults", action="store_true",
                    help="--dk: the previous default and PREFILL_CONFIG's (and DK_REFINE at the largest chunk)")
    args = ap.parse_args(argv)
    if not args.smoke and not needs_cuda("prefill_variants", "--smoke runs tiny shapes on the CPU"):
        return 2
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
        FULL, SLIDING = ("31b-full", 2, 8, 32, 512, 0), ("31b-sliding", 4, 2, 16, 16, 16)
        CHUNKS, FILLS, REF_ROWS = (8, 24), (64,), 16
        VARIANTS = {32: [(16, 16, 4, 1, 2)], 16: [(16, 16, 4, 1, 1)]}
    from export.kernels import attention as A

    t0 = time.time()
    res = {"rows": [], "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if args.dk:
        return dk_main(args, A, res, save, t0)

    # the smallest chunk has every variant; the others specialize alike (T, S: same divisibility)
    jobs = [(layer, min(CHUNKS), kv, var) for layer in (FULL, SLIDING) for kv in KVS
            for var in variants(layer[3], min(CHUNKS))]
    if DEV == "cuda":
        import multiprocessing as mp

        chunks = [jobs[i::args.jobs] for i in range(args.jobs) if jobs[i::args.jobs]]
        with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as ex:
            n = sum(ex.map(_warm, chunks))
        print(f"compiled {n}/{len(jobs)} variants in {time.time() - t0:.0f}s", flush=True)
        res["copy_gbps"] = copy_gbps()
        res["matmul_bf16_tflops"] = matmul_tflops()
    else:
        res["copy_gbps"], res["matmul_bf16_tflops"] = 1.0, 1.0
    bw, mm = res["copy_gbps"], res["matmul_bf16_tflops"]
    print(f"copy {bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    torch.manual_seed(0)
    sdpa_ok = not args.no_sdpa and DEV == "cuda"
    out_of_time = False
    for layer in (SLIDING, FULL):  # the sliding layer first: cheap, and then it is in even if time runs out
        name, Hkv, G, D, _, window = layer
        H = Hkv * G
        for T in CHUNKS:
            caches = {kv: cache(layer, T, kv) for kv in KVS}
            for fill in FILLS:
                if (window and fill > FILLS[0]) or out_of_time:
                    continue  # a ring's work stops growing once the window is full
                pos = torch.tensor([fill - T], device=DEV)
                n = min(fill, window) if window else fill
                flops = 4 * T * n * H * D
                q = torch.randn(1, T, H, D, device=DEV, dtype=DTYPE)
                refs = {kv: reference(A, q, caches[kv], pos, window) for kv in KVS}
                for kv in KVS:
                    best = None
                    for var in variants(D, T):
                        row = dict(layer=name, kv_dtype=kv, chunk=T, fill=fill, variant=vname(var))
                        try:
                            poisoned = _poison(A)
                            try:
                                out = run(layer, caches[kv], q, pos, var)
                            finally:
                                _unpoison(A, poisoned)
                            ok = bool(torch.isfinite(out).all())
                            row["rel_err"] = ((out.float() - refs[kv]).norm() / refs[kv].norm()).item() if ok else None
                            ms = time_ms(lambda: run(layer, caches[kv], q, pos, var))
                            row.update(us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12)
                            row["fraction_of_matmul"] = row["tflops"] / mm
                        except Exception as e:  # one broken variant must not end the sweep
                            row["error"] = repr(e)[:300]
                        res["rows"].append(row)
                        if "us" in row and row["rel_err"] is not None and row["rel_err"] <= 1e-2 and var[0] == "new":
                            if best is None or row["us"] < best["us"]:
                                best = row
                    if best:
                        print(f"{name:12} {kv:5} T{T:5} fill {fill:6} best {best['variant']:22} {best['us']:9.1f}us "
                              f"{best['tflops']:6.1f} TFLOP/s ({best['fraction_of_matmul']:.2f} of matmul)", flush=True)
                if sdpa_ok and fill <= 32768:
                    row = dict(layer=name, kv_dtype="bf16", chunk=T, fill=fill, variant="torch.sdpa")
                    try:
                        fn = sdpa_fn(q, caches["bf16"][0], caches["bf16"][1], pos, window)
                        ms = time_ms(fn)
                        row.update(us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12)
                    except Exception as e:
                        row.update(us=None, tflops=None, error=repr(e)[:200])
                    res["rows"].append(row)
                save()
                if DEV == "cuda" and time.time() - t0 > args.budget:
                    print("time budget reached: stopping early", flush=True)
                    out_of_time = True
            del caches
            if DEV == "cuda":
                torch.cuda.empty_cache()
    res["compiled_shared_bytes"] = shared_bytes()
    res["smem_limit"] = A.SMEM_LIMIT
    save()
    table(res)
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


def dk_main(args, A, res, save, t0):
    """--dk: the full layer's chunk(s) at DK_FILLS for every KV format, then DK_LONG at the largest
    chunk for the first variant and the best three at the last fill (per KV format) while the
    budget lasts. Variants: DK_VARIANTS, or with --dk-defaults the previous default, the module's
    PREFILL_CONFIG for that KV format and (largest chunk only) DK_REFINE."""
    global FULL, DK_VARIANTS, DK_REFINE, DK_FILLS, DK_LONG
    chunks = tuple(int(c) for c in args.dk_chunks.split(","))
    if args.smoke:  # D 32: DK 16 / 32, the tiles the interpreter takes quickly
        FULL, DK_FILLS, DK_LONG = ("31b-full", 2, 8, 32, 512, 0), (40,), 64
        chunks = (8, 24) if args.dk_defaults else (24,)
        DK_VARIANTS = [(16, 16, 4, 1, 2), (32, 16, 8, 2, 2, 16, 1, 0), (16, 32, 4, 1, 1, 32, 0, 1)]
        DK_REFINE = [(16, 16, 8, 2, 2, 32, 1, 0)]
    layer = FULL
    _, Hkv, G, D, _, _ = layer
    H = Hkv * G
    target = A.PREFILL_TARGET_PROGRAMS
    fmt = {"bf16": 0, "int8": 1, "int4": 2}

    def chosen(kv, T):
        if not args.dk_defaults:
            return [("new", c, target) for c in DK_VARIANTS]
        cfgs = [DK_VARIANTS[0], A.PREFILL_CONFIG.get((D, fmt[kv]), DK_VARIANTS[1])]
        cfgs += [c for c in DK_REFINE if c not in cfgs] if T == max(chunks) else []
        return [("new", c, target) for c in cfgs]

    if DEV == "cuda":
        import multiprocessing as mp

        jobs = [(layer, T, kv, var) for T in chunks for kv in DK_KVS for var in chosen(kv, T)]
        parts = [jobs[i::args.jobs] for i in range(args.jobs) if jobs[i::args.jobs]]
        with ProcessPoolExecutor(len(parts), mp_context=mp.get_context("spawn")) as ex:
            n = sum(ex.map(_warm, parts))
        print(f"compiled {n}/{len(jobs)} variants in {time.time() - t0:.0f}s", flush=True)
        res["copy_gbps"], res["matmul_bf16_tflops"] = copy_gbps(), matmul_tflops()
    else:
        res["copy_gbps"], res["matmul_bf16_tflops"] = 1.0, 1.0
    mm = res["matmul_bf16_tflops"]
    print(f"copy {res['copy_gbps']:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    torch.manual_seed(0)
    caches = {kv: cache(layer, max(chunks), kv) for kv in DK_KVS}  # a flat cache: the same for every chunk

    def pos_of(fill, T):
        return torch.tensor([fill - T], device=DEV)

    def cell(T, fill, kv, var, q, ref):
        flops = 4 * T * fill * H * D
        row = dict(layer=layer[0], kv_dtype=kv, chunk=T, fill=fill, variant=vname(var), config=list(var[1]))
        try:
            poisoned = _poison(A)
            try:
                out = run(layer, caches[kv], q, pos_of(fill, T), var)
            finally:
                _unpoison(A, poisoned)
            ok = bool(torch.isfinite(out).all())
            row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item() if ok else None
            ms = time_ms(lambda: run(layer, caches[kv], q, pos_of(fill, T), var), least=3)
            row.update(us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12)
            row["fraction_of_matmul"] = row["tflops"] / mm
        except Exception as e:  # one broken variant must not end the sweep
            row["error"] = repr(e)[:300]
        res["rows"].append(row)
        return row

    def good(r):
        return "us" in r and r["rel_err"] is not None and r["rel_err"] <= 1e-2

    def sweep(T, fill, kv, variants):
        q = torch.randn(1, T, H, D, device=DEV, dtype=DTYPE)
        ref = reference(A, q, caches[kv], pos_of(fill, T), 0)
        rows = [cell(T, fill, kv, var, q, ref) for var in variants]
        base = rows[0] if good(rows[0]) else None
        best = min((r for r in rows if good(r)), key=lambda r: r["us"], default=None)
        if best:
            speed = f" ({base['us'] / best['us']:.2f}x {base['variant']})" if base else ""
            print(f"{layer[0]} {kv:5} T{T:5} fill {fill:6} best {best['variant']:26} {best['us']:9.1f}us "
                  f"{best['tflops']:6.1f} TFLOP/s ({best['fraction_of_matmul']:.2f} of matmul){speed}", flush=True)
        save()
        return rows

    last = {}
    for T in chunks:
        for fill in DK_FILLS:
            for kv in DK_KVS:
                last[kv] = sweep(T, fill, kv, chosen(kv, T))
    for kv in DK_KVS:
        if DEV == "cuda" and time.time() - t0 > args.budget:
            print(f"time budget reached: no fill {DK_LONG} for {kv}", flush=True)
            continue
        variants = chosen(kv, max(chunks))
        ranked = sorted((r for r in last[kv][1:] if good(r)), key=lambda r: r["us"])[:3]
        names = {r["variant"] for r in ranked}
        sweep(max(chunks), DK_LONG, kv, [variants[0]] + [v for v in variants[1:] if vname(v) in names])
    res["compiled_shared_bytes"] = shared_bytes()
    res["smem_limit"] = A.SMEM_LIMIT
    save()
    table(res)
    print(f"total {time.time() - t0:.0f}s", flush=True)
    return 0


def table(res):
    rows = [r for r in res["rows"] if r.get("us")]
    print(f"\ncopy {res['copy_gbps']:.0f} GB/s, bf16 matmul {res['matmul_bf16_tflops']:.0f} TFLOP/s; "
          "TFLOP/s per variant (rows: layer kv T fill)")
    names = sorted({r["variant"] for r in rows})
    for i, n in enumerate(names):
        print(f"  v{i}: {n}")
    keys = sorted({(r["layer"], r["kv_dtype"], r["chunk"], r["fill"]) for r in rows})
    print("layer        kv    T     fill   " + " ".join(f"{'v%d' % i:>6}" for i in range(len(names))))
    for k in keys:
        cells = []
        for n in names:
            r = next((r for r in rows
                      if (r["layer"], r["kv_dtype"], r["chunk"], r["fill"]) == k and r["variant"] == n), None)
            bad = r is not None and r.get("rel_err") is not None and r["rel_err"] > 1e-2
            cells.append(f"{r['tflops']:6.1f}{'!' if bad else ''}" if r else f"{'-':>6}")
        print(f"{k[0]:12} {k[1]:5} {k[2]:5} {k[3]:6} " + " ".join(cells))
    errs = [r["rel_err"] for r in res["rows"] if "rel_err" in r]
    print(f"checks {len(errs)}, worst rel err {max((e for e in errs if e is not None), default=float('nan')):.2e}, "
          f"non-finite {sum(e is None for e in errs)}, errors {sum('error' in r for r in res['rows'])}")
    sh = res.get("compiled_shared_bytes") or {}
    print("compiled prefill kernels' shared bytes: max", sh.get("max"), "limit", res.get("smem_limit"))
    for key, b, regs, spills in sh.get("kernels", []):
        if b > (res.get("smem_limit") or 0):
            print("  OVER", b, key[-200:])
        if spills:
            print(f"  spills {spills} B, {regs} registers:", key[-200:])




def _poison(A):
    A.torch = _Poisoned(torch)
    return torch


def _unpoison(A, real):
    A.torch = real


if __name__ == "__main__":
    sys.exit(main())
