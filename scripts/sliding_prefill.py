"""Sliding-layer prefill with window-sized rings, at the 31B's width, in one GPU call.

1. `gemma4::attention` on the 31B sliding layer (32 query heads, 16 KV heads of 256, window
   1024): a chunk of T queries (512, 2048) at fills 0 / 2048 / 30720, read as the model now runs
   it (the ring holds the window before the chunk, the chunk's own K/V come beside it) and as it
   ran before (one ring of window + T - 1 slots holding both), the same positions in both. Each
   is checked against the fp32 reference on fresh random inputs with a NaN-poisoned output, and
   timed (median of CUDA events). Useful FLOPs: 4 * H * D per visible (query, key) pair; TFLOP/s
   beside torch's bf16 matmul and the copy bandwidth measured in the same run. The ring writes
   (the model's eager aten ops, before Inductor fuses them) are timed beside: the chunk's last
   window into the window-sized ring, and the old index_copy of the whole chunk.
2. A 2-layer slice at the 31B's width (one sliding, one full layer; random bf16 weights, eager
   model on the GPU through the same op): a 4096-token prompt prefilled in chunks of 2048 and of
   512; the logits after 2048 and 4096 tokens against each other and against the same model in
   fp32 whose attention is the plain-torch reference.

3. (--compile) The tiny preset torch.compile'd (Inductor lowers the op and the ring write as
   the export does) at chunk 12 over a window of 8, against the same model run eagerly.

    python -m scripts.sliding_prefill --out scripts/measurements/sliding_prefill.json [--compile] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from scripts import needs_cuda
from scripts.attention_variants import _Poisoned  # empty buffers come back NaN

H, HKV, D, W = 32, 16, 256, 1024  # the 31B sliding layer
CHUNKS = (2048, 512)
FILLS = (0, 2048, 30720)
SLICE_PROMPT, SLICE_CHUNKS = 4096, (2048, 512)
DEV, DTYPE = "cuda", torch.bfloat16


def time_ms(fn, budget_ms=80.0):
    """Median of CUDA-event timings, as many as fit the budget (3 to 25) after a warm-up call."""
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    while len(times) < 3 or (len(times) < 25 and sum(times) < budget_ms):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_gbps(nbytes=2 << 30):
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), 200) * 1e-3) / 1e9


def matmul_tflops(n=8192):
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b, 200) * 1e-3) / 1e12


def rel(a, b) -> float | None:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return None
    return ((a - b).norm() / b.norm()).item()


def visible_pairs(pos: int, T: int) -> int:
    return sum(min(W, pos + t + 1) for t in range(T))


def layouts(T: int, pos: int, gen):
    """K/V of positions pos - W .. pos + T - 1 (fresh random), laid out both ways: (ring of W
    slots holding those before pos, the chunk's own (1, Hkv, T, D)) and the old ring of
    W + T - 1 slots holding every position a query sees. Slots no position reaches keep noise."""
    n = W + T
    kv = [torch.randn(1, HKV, n, D, device=DEV, generator=gen).to(DTYPE) for _ in range(2)]
    p = torch.arange(pos - W, pos + T, device=DEV)
    ring = [torch.randn(1, HKV, W, D, device=DEV, generator=gen).to(DTYPE) for _ in range(2)]
    old_s = W + T - 1
    old = [torch.randn(1, HKV, old_s, D, device=DEV, generator=gen).to(DTYPE) for _ in range(2)]
    before = (p >= 0) & (p < pos)
    seen = (p >= 0) & (p > pos - W)
    for r, o, x in zip(ring, old, kv):
        r[:, :, p[before] % W] = x[:, :, before]
        o[:, :, p[seen] % old_s] = x[:, :, seen]
    fresh = [x[:, :, W:].contiguous() for x in kv]
    return ring, fresh, old


def attention_rows(A, model_mod, res, bw, mm):
    gen = torch.Generator(device=DEV).manual_seed(0)
    for T in CHUNKS:
        for pos in FILLS:
            ring, fresh, old = layouts(T, pos, gen)
            q = torch.randn(1, T, H, D, device=DEV, generator=gen).to(DTYPE)
            p = torch.tensor([pos], device=DEV)
            ref = A.attention_reference(q.float(), *[x.float() for x in ring], None, None, p, W,
                                        *[x.float() for x in fresh])
            new = lambda: A.launch(q, *ring, None, None, p, W, False, k_new=fresh[0], v_new=fresh[1])  # noqa: E731
            prev = lambda: A.launch(q, *old, None, None, p, W, False)  # noqa: E731
            real = A.torch
            A.torch = _Poisoned(torch)
            try:
                err_new, err_old = rel(new(), ref), rel(prev(), ref)
            finally:
                A.torch = real
            ms_new, ms_old = time_ms(new), time_ms(prev)
            flops = 4 * H * D * visible_pairs(pos, T)
            # bytes each must move at least: q, out, the K/V it reads (ring or its slots, the chunk)
            nbytes = 2 * T * H * D * 2 + 2 * HKV * D * 2 * (min(W - 1, pos) + T)
            floor_ms = nbytes / (bw * 1e6)
            # ring writes, eager aten (the export fuses them): the window-sized ring after the chunk,
            # the old ring's index_copy of the whole chunk before it
            positions = pos + torch.arange(T, device=DEV)
            wr = model_mod.KVCache(HKV, W, D, ring=True, dtype=DTYPE).to(DEV)
            wo = model_mod.KVCache(HKV, W + T - 1, D, ring=True, dtype=DTYPE).to(DEV)
            ms_wnew = time_ms(lambda: wr.write_window(positions, *fresh))
            ms_wold = time_ms(lambda: wo.update(positions, *fresh))
            row = {"T": T, "pos": pos, "flops": flops, "bytes": nbytes, "bytes_floor_ms": floor_ms,
                   "new": {"rel_err": err_new, "ms": ms_new, "tflops": flops / ms_new / 1e9},
                   "old": {"rel_err": err_old, "ms": ms_old, "tflops": flops / ms_old / 1e9, "slots": W + T - 1},
                   "ring_write_ms": {"new": ms_wnew, "old": ms_wold}}
            res["attention"].append(row)
            print(f"T {T:5d} pos {pos:6d}: new {ms_new:7.3f} ms ({flops / ms_new / 1e9:6.1f} TFLOP/s, "
                  f"{flops / ms_new / 1e9 / mm:5.1%} of mm) err {err_new}; old {ms_old:7.3f} ms err {err_old}; "
                  f"ring write {ms_wnew:.3f} vs {ms_wold:.3f} ms; bytes floor {floor_ms:.3f} ms", flush=True)


def slice_model(dtype, layers=2):
    from export.gemma4.config import FULL, PRESETS, SLIDING
    from export.gemma4.model import Gemma4Model

    if DEV == "cpu":  # smoke: the tiny preset's geometry
        cfg = replace(PRESETS["tiny"], num_hidden_layers=layers, layer_types=(SLIDING, FULL), num_kv_shared_layers=0,
                      hidden_size_per_layer_input=0)
    else:
        cfg = replace(PRESETS["31b"], num_hidden_layers=layers, layer_types=(SLIDING, FULL))
    with torch.device(DEV):
        return Gemma4Model(cfg, ctx=SLICE_PROMPT, prefill_chunk=max(SLICE_CHUNKS), dtype=dtype).eval()


@torch.no_grad()
def randomize(model, seed=0, std=0.02):
    """Random weights made on the device (tests/helpers.py's rule): 1-D weights and the layer
    scalars in [0.5, 1.5], so a missing multiply shows; matrices normal(0, std)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:
            p.copy_(torch.rand(p.shape, device=DEV, generator=g) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, device=DEV, generator=g) * std)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(torch.rand(b.shape, device=DEV, generator=g) + 0.5)


@torch.no_grad()
def prefill(model, tokens, chunk):
    """Logits after each 2048 tokens (the positions both chunkings end a chunk at)."""
    model.reset_cache()
    out = {}
    for s in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, s:s + chunk], torch.tensor([s], device=DEV))
        end = s + chunk
        if end % max(SLICE_CHUNKS) == 0:
            out[end] = logits.float()
    return out


def slice_rows(A, res):
    bf = slice_model(DTYPE)
    randomize(bf)
    ref_model = slice_model(torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    tokens = torch.randint(0, bf.cfg.vocab_size, (1, SLICE_PROMPT), device=DEV,
                           generator=torch.Generator(device=DEV).manual_seed(1))
    launch = A.launch

    def reference_launch(q, k, v, ks, vs, pos, window, decode, wrap=None, k_new=None, v_new=None):
        return A.attention_reference(q, k, v, ks, vs, pos, window, k_new, v_new)

    A.launch = reference_launch  # the fp32 oracle: plain-torch attention
    try:
        want = prefill(ref_model, tokens, max(SLICE_CHUNKS))
    finally:
        A.launch = launch
    del ref_model
    got, tok_s = {}, {}
    for chunk in SLICE_CHUNKS:
        got[chunk] = prefill(bf, tokens, chunk)
        if DEV == "cuda":
            torch.cuda.synchronize()
            t = time.perf_counter()
            prefill(bf, tokens, chunk)
            torch.cuda.synchronize()
            tok_s[chunk] = SLICE_PROMPT / (time.perf_counter() - t)
    a, b = SLICE_CHUNKS
    rows = []
    for n in want:
        row = {"tokens": n, f"chunk{a}_vs_chunk{b}": rel(got[a][n], got[b][n]),
               f"chunk{a}_vs_fp32": rel(got[a][n], want[n]), f"chunk{b}_vs_fp32": rel(got[b][n], want[n])}
        rows.append(row)
        print("slice", row, flush=True)
    res["slice"] = {"layers": ["sliding", "full"], "prompt": SLICE_PROMPT, "rows": rows,
                    "eager_bf16_prefill_tok_s": tok_s,
                    "note": "eager model with bf16 nn.Linear weights (no int4): tok/s for orientation only"}
    print("slice eager bf16 prefill tok/s", {k: round(v) for k, v in tok_s.items()}, flush=True)


def compiled_tiny(res):
    """Inductor on the model as the export traces it (dynamic T for prefill, T = 1 for decode):
    the tiny preset (KV sharing included) at chunk 12 over a window of 8, torch.compile'd,
    against the same model run eagerly, over two chunks longer than the window and decode."""
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model

    with torch.device(DEV):
        model = Gemma4Model(PRESETS["tiny"], ctx=64, prefill_chunk=12, dtype=torch.float32).eval()
    randomize(model, seed=3, std=0.05)
    ids = torch.randint(3, 512, (1, 30), device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
    steps = [(0, 12), (12, 21)] + [(p, p + 1) for p in range(21, 30)]

    @torch.no_grad()
    def run(fn):
        model.reset_cache()
        return [fn(ids[:, s:e], torch.tensor([s], device=DEV)).float() for s, e in steps]

    want = run(model)
    t = time.time()
    got = run(torch.compile(model, dynamic=True))
    errs = [rel(g, w) for g, w in zip(got, want)]
    res["compiled_tiny"] = {"steps": steps, "rel_err_vs_eager": errs, "compile_and_run_s": time.time() - t}
    print("compiled tiny vs eager (prefill 12 + 9 over window 8, then decode):", errs, flush=True)


def main(argv=None) -> int:
    global DEV, DTYPE, H, HKV, D, W, CHUNKS, FILLS, SLICE_PROMPT, SLICE_CHUNKS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sliding_prefill.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the tiny model (Inductor) vs eager")
    ap.add_argument("--compile-after-s", type=float, default=80.0, help="skip --compile when later than this")
    args = ap.parse_args(argv)
    if not args.smoke and not needs_cuda("sliding_prefill", "--smoke runs tiny shapes on the CPU"):
        return 2
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
        H, HKV, D, W, CHUNKS, FILLS = 4, 2, 16, 8, (20, 5), (0, 5, 37)
        SLICE_PROMPT, SLICE_CHUNKS = 40, (20, 5)
    from export.gemma4 import model as model_mod
    from export.kernels import attention as A

    t0 = time.time()
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "attention": [],
           "layer": {"heads": H, "kv_heads": HKV, "head_dim": D, "window": W}}
    if DEV == "cuda":
        res["copy_gbps"], res["matmul_bf16_tflops"] = copy_gbps(), matmul_tflops()
    else:
        res["copy_gbps"], res["matmul_bf16_tflops"] = 1.0, 1.0
    bw, mm = res["copy_gbps"], res["matmul_bf16_tflops"]
    print(f"copy {bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    try:
        attention_rows(A, model_mod, res, bw, mm)
    except Exception as e:  # keep what was measured, then the slice
        res["attention_error"] = repr(e)[:500]
        print("attention section failed:", repr(e)[:500], flush=True)
    print(f"attention section done at {time.time() - t0:.0f}s", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    try:
        slice_rows(A, res)
    except Exception as e:
        res["slice_error"] = repr(e)[:500]
        print("slice section failed:", repr(e)[:500], flush=True)
    if DEV == "cuda":
        sh = [k.metadata.shared for caches in A._prefill_body.device_caches.values() for k in caches[0].values()]
        res["prefill_kernels_shared_bytes"] = {"max": max(sh, default=None), "limit": A.SMEM_LIMIT}
    res["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    table(res)
    if args.compile and time.time() - t0 < args.compile_after_s:  # last: the table is out if time runs short
        try:
            compiled_tiny(res)
        except Exception as e:
            res["compiled_tiny_error"] = repr(e)[:800]
            print("compiled tiny failed:", repr(e)[:800], flush=True)
        res["seconds"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"{res['seconds']:.0f} s")
    return 0


def table(res):
    print(f"\n{res['device']}: copy {res['copy_gbps']:.0f} GB/s, bf16 matmul {res['matmul_bf16_tflops']:.0f} TFLOP/s; "
          f"sliding layer H{res['layer']['heads']}/{res['layer']['kv_heads']} D{res['layer']['head_dim']} "
          f"W{res['layer']['window']}")
    print(f"{'T':>5} {'pos':>6} | {'new ms':>8} {'TFLOP/s':>7} {'err':>8} | {'old ms':>8} {'TFLOP/s':>7} {'err':>8} "
          f"| {'new/old':>7} | write new/old ms")
    for r in res["attention"]:
        n, o = r["new"], r["old"]
        fmt = lambda e: "NaN" if e is None else f"{e:.1e}"  # noqa: E731
        print(f"{r['T']:5d} {r['pos']:6d} | {n['ms']:8.3f} {n['tflops']:7.1f} {fmt(n['rel_err']):>8} | "
              f"{o['ms']:8.3f} {o['tflops']:7.1f} {fmt(o['rel_err']):>8} | {n['ms'] / o['ms']:7.2f} | "
              f"{r['ring_write_ms']['new']:.3f} / {r['ring_write_ms']['old']:.3f}")
    for r in res.get("slice", {}).get("rows", []):
        print("slice", r)
    if "slice" in res:
        print("slice eager bf16 prefill tok/s", res["slice"]["eager_bf16_prefill_tok_s"])
    for k in ("attention_error", "slice_error"):
        if k in res:
            print(k, res[k])
    if "prefill_kernels_shared_bytes" in res:
        print("prefill kernels' shared bytes", res["prefill_kernels_shared_bytes"])
    print(f"{res['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
