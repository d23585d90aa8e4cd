"""Benchmark `gemma4::attention` (export/kernels/attention.py) on the GPU: decode and prefill
at several cache fills for the full and sliding layers of the 31B, 26B-A4B and E4B presets,
per KV dtype, beside ExecuTorch's `triton::sdpa` over the whole cache (today's path). Prefill
(the 31B layers): chunks of T = 128, 512 and 2048 queries ending at each fill, each row with
its `chunk` and `tflops` (useful FLOPs 4 * T * n * H * D, n = the fill, or the window for a
sliding layer, the causal half not discounted).

    python -m scripts.bench_attention [--out scripts/measurements/attention_kernels.json]
    python -m scripts.bench_attention --decode-only OLD.json --no-baseline --merge-baseline OLD.json
        (decode rows re-timed; prefill and triton::sdpa rows kept from OLD.json with their copy bandwidth)

Each row: median time (CUDA-graph replay; launches over 2 ms: CUDA events; decode's two kernels with
the programmatic-dependent-launch attribute on sm_90+, as the artifact launches them, unless
--no-pdl-attr), the bytes of the filled slots (K, V and scales the step must read), that over the
time as a fraction of the device-to-device copy bandwidth measured in the same run, and the error
against an fp32 reference over the same (dequantized) cache; where the decode kernel rounds q to
int8 levels (the int8 cache's q . k as an int8 dot) that reference takes q so rounded, and
`rel_err_vs_fp32_ref_unrounded_q` the one against q itself. For int8/int4 also the error against
the bf16 cache (the quantization error of the attention output), and for int4 the same with a
Hadamard rotation of q, k, v.
`rows` hold only this project's kernels; ExecuTorch's `triton::sdpa` goes to `baseline_rows`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from export.gemma4.config import PRESETS
from export.kernels import attention as A
from export.kernels.hadamard import hadamard
from scripts import needs_cuda

FILLS = (1024, 8192, 32768, 131072)
CTX = 131072
DEV, DT = "cuda", torch.bfloat16  # --smoke: the CPU (Triton interpreter), fp32
SMOKE_LAYERS = [("31b-full", 2, 8, 32, 256, 0), ("31b-sliding", 2, 2, 16, 8, 8)]
CHUNK = 128  # the prefill chunk of the ExecuTorch baseline rows
PREFILL_CHUNKS = (128, 512, 2048)  # prefill rows: a chunk of T queries ending at each fill
PREFILL_FILLS = (1024, 8192, 32768, 131072)  # those >= T; sliding layers up to 8192 (the ring is full)


def copy_gbps(nbytes: int = 2 << 30) -> float:
    import triton.testing

    if DEV == "cpu":
        return 1.0
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def variant_setup(smoke: bool, tool: str) -> dict | None:
    """What a decode variant script (decode_combine_variants, prefetch_overlap) starts from: this module's
    DEV / DT set for the run (smoke: the CPU in fp32, Triton's interpreter), the seed, the copy bandwidth
    measured now and the device's name; None, with a message, where a GPU run finds no CUDA GPU."""
    global DEV, DT
    if not smoke and not torch.cuda.is_available():
        print(f"{tool}: no CUDA GPU here (run with --smoke on the CPU)", file=sys.stderr)
        return None
    DEV, DT = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    return {"device": "cpu (interpreter)" if smoke else torch.cuda.get_device_name(), "copy_gbps": bw}


def layers():
    """(name, Hkv, G, D, slots, window) of the full and sliding layers of each preset."""
    out = []
    for preset in ("31b", "26b-a4b", "e4b"):
        cfg = PRESETS[preset]
        for sliding in (False, True):
            i = next(i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i) == sliding)
            Hkv, D = cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
            slots = cfg.ring_slots(CTX) if sliding else CTX  # a sliding ring holds the window
            out.append((f"{preset}-{'sliding' if sliding else 'full'}", Hkv, cfg.num_attention_heads // Hkv, D,
                        slots, cfg.sliding_window if sliding else 0))
    return out


def et_sdpa():
    try:
        return importlib.import_module("executorch.backends.cuda.triton.kernels.sdpa").sdpa
    except Exception:
        path = Path(__file__).resolve().parent.parent / "_et_sdpa.py"  # a copy of ExecuTorch's file
        if not path.exists():
            return None
        spec = importlib.util.spec_from_file_location("_et_sdpa", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.sdpa


def fill_cache(Hkv, S, D, fill, window):
    """A bf16 cache as the model leaves it after writing positions 0 .. fill - 1."""
    k = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
    v = torch.randn(1, Hkv, S, D, device=DEV, dtype=DT)
    return k, v


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kv_bytes(Hkv, D, n, kv):
    per = {"bf16": 2 * D, "int8": D + 2, "int4": D // 2 + 2}[kv]
    return 2 * Hkv * n * per


def main(argv=None) -> int:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="scripts/measurements/attention_kernels.json")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ExecuTorch's triton::sdpa (31B layers, fill 32k)")
    ap.add_argument("--merge-baseline", default=None,
                    help="copy the triton::sdpa rows from an earlier JSON of this script instead")
    ap.add_argument("--timing", choices=("graph", "events"), default="graph",
                    help="graph: replay one CUDA graph of the op (launch overhead gone, as in the runner's "
                         "CUDA-graph decode); events: do_bench over eager Python launches")
    ap.add_argument("--pdl-attr", action=argparse.BooleanOptionalAction, default=True,
                    help="decode's two kernels launched with the programmatic-dependent-launch attribute, as the "
                         "artifact's launcher launches them (sm_90+; default: on)")
    ap.add_argument("--choice", default=None,
                    help="TARGET_PROGRAMS and DECODE_CONFIG from scripts/attention_variants.py (default: the module's)")
    ap.add_argument("--jobs", type=int, default=12,
                    help="processes that compile the kernels first (Triton's disk cache then serves this one); 0: none")
    ap.add_argument("--decode-only", default=None, metavar="JSON",
                    help="time decode only and keep the prefill rows (and their copy bandwidth) of this earlier "
                         "JSON of this script")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny 31B-shaped layers on the CPU through the Triton interpreter (TRITON_INTERPRET=1): "
                         "the code path")
    ap.add_argument("--hadamard-only", action="store_true",
                    help="only the 4-bit Hadamard accuracy section (plain torch; runs on CPU too)")
    args = ap.parse_args(argv)
    if not (args.smoke or args.hadamard_only) and not needs_cuda(
            "bench_attention", "--smoke runs tiny shapes on the CPU, --hadamard-only the accuracy section"):
        return 2
    global DEV, DT, FILLS, CTX, CHUNK, PREFILL_CHUNKS, PREFILL_FILLS
    if args.smoke:
        DEV, DT, FILLS, CTX, CHUNK = "cpu", torch.float32, (16, 64), 256, 4
        PREFILL_CHUNKS, PREFILL_FILLS = (4, 16), (16, 64)
        args.baseline = False
    kept_prefill = []
    if args.decode_only:
        old = json.loads(Path(args.decode_only).read_text())
        kept_prefill = [{"chunk": old.get("prefill_chunk", CHUNK), **r,
                         "copy_gbps_of_its_run": r.get("copy_gbps_of_its_run", old["copy_gbps"])}
                        for r in old["rows"] if r["phase"] == "prefill"]
        PREFILL_CHUNKS = ()
    torch.manual_seed(0)
    choice = None
    if args.choice:
        choice = json.loads(Path(args.choice).read_text())
        A.TARGET_PROGRAMS = choice["target_programs"]
        for D, fmt, bn, warps, stages in choice["decode_config"]:
            A.DECODE_CONFIG[D, fmt] = (bn, warps, stages)
    if args.hadamard_only:
        had = hadamard_section("cuda" if torch.cuda.is_available() else "cpu")
        Path(args.out).write_text(json.dumps({"hadamard": had}, indent=1) + "\n")
        return 0
    the_layers = SMOKE_LAYERS if args.smoke else layers()
    if DEV == "cuda" and args.jobs > 0:
        t0 = time.time()
        jobs = [(layer, kv, choice, PREFILL_CHUNKS) for layer in the_layers for kv in layer_kvs(layer)]
        n = warm(jobs, args.jobs)
        print(f"compiled the kernels of {n} layer / KV dtype pairs in {time.time() - t0:.0f}s", flush=True)
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    sdpa = et_sdpa() if args.baseline else None
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    result = {"copy_gbps": bw, "timing": args.timing, "pdl_attr": args.pdl_attr, "device": device, "ctx": CTX,
              "sliding_ring": "the window (cfg.ring_slots); a prefill chunk brings its own K/V",
              "prefill_chunks": list(PREFILL_CHUNKS) if not args.decode_only else old.get("prefill_chunks"),
              "prefill_config": [[D, fmt, *cfg] for (D, fmt), cfg in sorted(A.PREFILL_CONFIG.items())],
              "prefill_target_programs": A.PREFILL_TARGET_PROGRAMS,
              "baseline": "ExecuTorch triton::sdpa over the whole cache" if sdpa else "none",
              "target_programs": A.TARGET_PROGRAMS,
              "decode_target": [[D, fmt, t] for (D, fmt), t in sorted(A.DECODE_TARGET.items())],
              "decode_knobs": [[D, fmt, k] for (D, fmt), k in sorted(A.DECODE_KNOBS.items())],
              "prefill_rows_from": args.decode_only,
              "decode_config": [[D, fmt, *cfg] for (D, fmt), cfg in sorted(A.DECODE_CONFIG.items())],
              "rows": [], "baseline_rows": []}
    out_path = Path(args.out)

    def emit(row, key="rows"):
        result[key].append(row)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    for name, Hkv, G, D, S, window in the_layers:
        H = Hkv * G
        kvs = layer_kvs((name, Hkv, G, D, S, window))
        k, v = fill_cache(Hkv, S, D, CTX, window)
        quant = {kv: (A.quantize_kv(k, kv) + A.quantize_kv(v, kv)) for kv in kvs if kv != "bf16"}

        def measure(phase, T, kk_vv, fill):
            """One row per KV dtype: the op on a chunk of T queries ending at `fill` (a sliding
            layer's prefill chunk brings its own K/V beside the ring, as the model does)."""
            k, v, quant = kk_vv
            pos = torch.tensor([fill - T], device=DEV)
            q = torch.randn(1, T, H, D, device=DEV, dtype=DT)
            n = min(fill, window + T - 1) if window else fill
            fresh = {}
            if window and phase == "prefill":
                fresh = dict(k_new=torch.randn(1, Hkv, T, D, device=DEV, dtype=DT),
                             v_new=torch.randn(1, Hkv, T, D, device=DEV, dtype=DT))
            ref_bf16 = reference(q, k, v, None, None, pos, window, **fresh)
            for kv in kvs:
                if kv == "bf16":
                    kk, vv, ks, vs = k, v, None, None
                else:
                    kk, ks, vv, vs = quant[kv]
                fn = lambda: A.launch(q, kk, vv, ks, vs, pos, window, phase == "decode", pdl_attr=args.pdl_attr,  # noqa: E731
                                      **fresh)
                out = fn()
                ref = reference(q, kk, vv, ks, vs, pos, window, **fresh) if ks is not None else ref_bf16
                levels = A.decode_q_levels(D, A.kv_format(kk, ks)) if phase == "decode" else 0
                extra = {}
                if levels:  # the kernel's q . k takes q in int8 levels: its own arithmetic is the reference
                    # fed those; the error against q itself is the rounding's cost as well
                    extra = dict(q_int8_levels=levels, rel_err_vs_fp32_ref_unrounded_q=rel(out, ref))
                    ref = reference(A.q_int8_levels(q, levels), kk, vv, ks, vs, pos, window)
                err = rel(out, ref)
                ms = _time(fn, args)
                nbytes = kv_bytes(Hkv, D, n, kv)
                row = dict(layer=name, phase=phase, kv_dtype=kv, fill=fill, us=ms * 1e3,
                           fraction_of_copy_bw=nbytes / (ms * 1e-3) / (bw * 1e9), bytes=nbytes,
                           rel_err_vs_fp32_ref=err, finite=bool(torch.isfinite(out).all()), **extra)
                if phase == "prefill":  # useful FLOPs: q . k and p @ v over the positions each query sees
                    seen = min(fill, window) if window else fill
                    row.update(chunk=T, tflops=4 * T * seen * H * D / (ms * 1e-3) / 1e12)
                if ks is not None:
                    row["rel_err_vs_bf16_cache"] = rel(out, ref_bf16)
                emit(row)
            return q, pos, n

        for fill in sorted(FILLS, key=lambda f: f != 32768):
            if window and fill > 8192:
                continue  # a ring's work stops growing once it is full
            q, pos, n = measure("decode", 1, (k, v, quant), fill)
            if sdpa is not None and fill == 32768 and name.startswith("31b"):
                baseline(sdpa, name, fill, q, k, v, pos, window, Hkv, G, S, n, "decode", emit, bw, args)
        if not name.startswith("31b"):
            continue  # prefill: the 31B layers only (time on the GPU machine is scarce)
        for T in PREFILL_CHUNKS:
            for fill in PREFILL_FILLS:
                if fill < T or (window and fill > 8192):
                    continue
                q, pos, n = measure("prefill", T, (k, v, quant), fill)
                if sdpa is not None and fill == 32768 and T == CHUNK:
                    baseline(sdpa, name, fill, q, k, v, pos, window, Hkv, G, S, n, "prefill", emit, bw, args)
        del k, v, quant
        if DEV == "cuda":
            torch.cuda.empty_cache()

    for r in kept_prefill:
        emit(r)
    if args.merge_baseline:
        old = json.loads(Path(args.merge_baseline).read_text())
        for r in old["rows"] + old.get("baseline_rows", []):
            if r.get("impl") == "triton::sdpa":
                if r["phase"] == "prefill" and "chunk" not in r:  # runs before chunk rows: one chunk
                    r["chunk"] = old.get("prefill_chunk", CHUNK)
                emit({**r, "copy_gbps_of_its_run": old.get("copy_gbps_of_its_run", old["copy_gbps"])},
                     "baseline_rows")
    result["compiled_shared_bytes_max"] = compiled_shared_max()
    result["hadamard"] = hadamard_section(DEV)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    table(result)
    return 0


def table(result):
    """The rows as a table (the JSON holds more: bytes, errors against the bf16 cache)."""
    print(f"\n{result['device']}, copy {result['copy_gbps']:.0f} GB/s; shared memory max "
          f"{result['compiled_shared_bytes_max']} (limit {A.SMEM_LIMIT})")
    print(f"{'layer':16} {'phase':8} {'kv':5} {'chunk':>5} {'fill':>7} {'us':>10} {'copy bw':>8} "
          f"{'TFLOP/s':>8} {'err':>8}")
    for r in result["rows"] + result["baseline_rows"]:
        tf = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'':8}"
        err = f"{r['rel_err_vs_fp32_ref']:8.1e}" if "rel_err_vs_fp32_ref" in r else f"{r.get('impl', ''):>8}"
        print(f"{r['layer']:16} {r['phase']:8} {r['kv_dtype']:5} {r.get('chunk', 1):5} {r['fill']:7} {r['us']:10.1f} "
              f"{r['fraction_of_copy_bw']:8.3f} {tf} {err}")


def layer_kvs(layer):
    """KV dtypes benchmarked on a layer: quantized caches for full layers (int4: the 31B's only)."""
    name, window = layer[0], layer[5]
    kvs = ("bf16", "int8", "int4") if window == 0 else ("bf16",)
    return kvs if name.startswith("31b") else kvs[:2]


def _warm(jobs):
    """Worker: compile one layer / KV dtype's kernels (decode; prefill at every chunk) by running
    each once on an unfilled cache of the benchmark's shapes."""
    torch.cuda.set_device(0)
    for layer, kv, choice, chunks in jobs:
        if choice:
            A.TARGET_PROGRAMS = choice["target_programs"]
            for D, fmt, bn, warps, stages in choice["decode_config"]:
                A.DECODE_CONFIG[D, fmt] = (bn, warps, stages)
        name, Hkv, G, D, S, window = layer
        for T in (1,) + (chunks if name.startswith("31b") else ()):
            k = torch.zeros(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
            fresh = {}
            if window and T > 1:  # a sliding prefill chunk's own K/V
                fresh = dict(k_new=torch.zeros(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16),
                             v_new=torch.zeros(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16))
            if kv == "bf16":
                c4 = (k, k, None, None)
            else:
                codes, scale = A.quantize_kv(k, kv)
                c4 = (codes, codes, scale, scale)
            q = torch.randn(1, T, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
            A.launch(q, *c4, torch.tensor([T], device="cuda"), window, T == 1, **fresh)
    torch.cuda.synchronize()
    return len(jobs)


def warm(jobs, n):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [jobs[i::n] for i in range(n) if jobs[i::n]]
    with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as ex:
        return sum(ex.map(_warm, chunks))


def reference(q, k, v, k_scale, v_scale, pos, window, rows=256, k_new=None, v_new=None):
    """fp32 reference; a flat cache's long chunk in pieces of `rows` queries (the scores of a
    2048-query chunk at 128k would not fit)."""
    T = q.shape[1]
    if window or T <= rows:
        return A.attention_reference(q.float(), k, v, k_scale, v_scale, pos, window, k_new, v_new)
    return torch.cat([A.attention_reference(q[:, i:i + rows].float(), k, v, k_scale, v_scale, pos + i, window)
                      for i in range(0, T, rows)], dim=1)


def baseline(sdpa, name, fill, q, k, v, pos, window, Hkv, G, S, n, phase, emit, bw, args):
    """ExecuTorch's triton::sdpa (today's path): G query heads folded into the query axis, a bool
    mask over all S slots."""
    import triton.testing

    T = q.shape[1]
    D = q.shape[3]
    qq = q.transpose(1, 2).reshape(1, Hkv, G * T, D)
    positions = pos + torch.arange(T, device=DEV)
    idx = torch.arange(S, device=DEV)
    last = positions[-1]
    kp = (last - (last - idx) % S)[None, :]
    m = (kp >= 0) & (kp <= positions[:, None])
    if window:
        m = m & (positions[:, None] - kp < window)
    mask = m.repeat(G, 1)[None, None].expand(1, Hkv, G * T, S).contiguous()
    fn = lambda: sdpa(qq, k, v, attn_mask=mask, scale=1.0)  # noqa: E731
    ms = triton.testing.do_bench(fn, rep=args.rep, return_mode="median")
    nbytes = kv_bytes(Hkv, D, n, "bf16")
    row = dict(layer=name, phase=phase, kv_dtype="bf16", fill=fill, us=ms * 1e3,
               impl="triton::sdpa", fraction_of_copy_bw=nbytes / (ms * 1e-3) / (bw * 1e9), bytes=nbytes)
    if phase == "prefill":
        row["chunk"] = T
    emit(row, "baseline_rows")


def _time(fn, args) -> float:
    """Median ms of fn: replayed from a CUDA graph (autotuning already done by a first call), or
    CUDA events around eager calls (includes Python launch overhead when the GPU waits on it)."""
    import triton.testing

    if DEV == "cpu":  # --smoke: the code path, not a time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if args.timing == "events":
        return triton.testing.do_bench(fn, rep=args.rep, return_mode="median")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first > 2.0:  # long prefill launches: launch overhead is noise; a median of a few event timings
        times = []
        for _ in range(max(3, min(20, int(4 * args.rep / first)))):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")


def compiled_shared_max():
    """Largest shared memory any compiled attention kernel uses (must stay <= A.SMEM_LIMIT)."""
    try:
        sizes = []
        for fn in (A._attn_body, A._prefill_body):
            for caches in fn.device_caches.values():
                sizes += [k.metadata.shared for k in caches[0].values()]
        return max(sizes) if sizes else None
    except Exception as e:  # triton internals: report, do not fail the run
        return f"unavailable: {e!r}"


def hadamard_section(device):
    """Attention-output error of int8 / int4 KV against the float cache, with and without an
    orthonormal Hadamard rotation of q, k and v (output rotated back), on Gaussian K/V and on
    K/V with a few outlier channels (as real keys have)."""
    had = []
    D, Hkv, G, fill = 512, 4, 8, 4096
    Hm = hadamard(D, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for outliers in (False, True):
        k = torch.randn(1, Hkv, fill, D, device=device, generator=gen)
        v = torch.randn(1, Hkv, fill, D, device=device, generator=gen)
        if outliers:
            k[..., :8] *= 20
            v[..., :4] *= 10
        q = torch.randn(1, 1, Hkv * G, D, device=device, generator=gen) * 0.1
        pos = torch.tensor([fill - 1], device=device)
        ref = A.attention_reference(q, k, v, None, None, pos, 0)
        for kv in ("int8", "int4"):
            plain = A.attention_reference(q, *_q(k, v, kv), pos, 0)
            rot = A.attention_reference(q @ Hm, *_q(k @ Hm, v @ Hm, kv), pos, 0) @ Hm
            had.append(dict(kv_dtype=kv, outlier_channels=outliers, rel_err=rel(plain, ref),
                            rel_err_hadamard=rel(rot, ref)))
            print(had[-1], flush=True)
    return had


def _q(k, v, kv):
    kq, ks = A.quantize_kv(k, kv)
    vq, vs = A.quantize_kv(v, kv)
    return kq, vq, ks, vs


if __name__ == "__main__":
    sys.exit(main())
