"""Decode (M = 1) MoE expert kernels: the word GEMVs' configs, one projection at a time, then the pair.

    python -m scripts.sweep_moe_decode [--out sweep.json] [--bench-out moe_kernels.json]
    TRITON_INTERPRET=1 python -m scripts.sweep_moe_decode --device cpu --preset tiny-moe   # the script itself

One MoE layer of the preset (random weights), R routings of one token each (R distinct sets of
top-k experts: R x the active bytes is several times the L2, so a replay reads HBM, as a real
decode across layers does). Each variant runs the R calls in one CUDA graph; the time per call
is the median replay over R. Bytes per call: the picked experts' int4 rows and scales (gate_up
and down), x, act written and read, y. Every variant is checked first against the fp32
reference with dequantized weights on every routing, outputs poisoned with NaN.
Then each gate_up config alone, gate_up from x's int8 levels (`moe_int4.GATE_UP_Q`: the quantize kernel and
the dp4a kernel, GATE_UP_Q_CONFIGS), each down config alone (slices 1, 2, 4; act loaded with one row or as
a tile of equal rows, `moe_int4.DOWN_XTILE`), the best pair end to
end, and (with --bench-out) scripts/bench_moe.py's table with the winners installed as the op's
path (DOWN_SLICES set from the sweep; the autotuner picks the configs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from scripts import needs_cuda


REL_TOL = 1e-2
GATE_UP_Q_CONFIGS = [(16, 2, 4), (32, 2, 4), (16, 2, 2), (8, 2, 2), (32, 2, 8)]  # (BLOCK_N, GROUPS, warps): no
# barrier in the loop, 14-20 SASS instructions a word (sm_90 offline) against the words kernel's 37.7


def _interpreter_index_patch() -> None:
    """numpy >= 2.4 refuses int() of a one-element array, which the interpreter's scalars are."""
    import triton.runtime.interpreter as ti
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = patched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sets", type=int, default=8, help="routings rotated through (R)")
    ap.add_argument("--out", type=Path, default=Path("sweep_moe_decode.json"))
    ap.add_argument("--bench-out", type=Path, default=None, help="then run bench_moe with the winners installed")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="seconds for the word configs: the rest skipped past it")
    ap.add_argument("--bench-ms", default="1,128,2048")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not needs_cuda("sweep_moe_decode",
                                             "TRITON_INTERPRET=1 with --device cpu runs the script itself"):
        return 2
    t_start = time.time()
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_index_patch()
    from export.gemma4.config import PRESETS
    from export.kernels import moe_int4 as mo
    from export.kernels.int4_matmul import int4_bytes
    from scripts import bench_moe

    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gbps = bench_moe.copy_gbps(dev) if dev == "cuda" else 1.0
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    layer = bench_moe.make_layer(a.preset, 128, dev, dtype)
    E, H, I, K = layer["E"], layer["H"], layer["I"], layer["top_k"]
    gu_q, gu_s, d_q, d_s = layer["stacks"]
    g_gu, g_d = H // gu_s.shape[-1], I // d_s.shape[-1]
    print(f"copy {gbps:.0f} GB/s ({name}); {a.preset}: E {E} top-k {K} H {H} I {I} groups {g_gu}/{g_d}", flush=True)
    gen = torch.Generator(dev).manual_seed(1)
    R = a.sets
    xs = [torch.randn(1, H, device=dev, generator=gen).to(dtype) for _ in range(R)]
    idxs = [torch.randperm(E, device=dev, generator=gen)[:K].view(1, K) for _ in range(R)]
    ws = [torch.softmax(torch.randn(1, K, device=dev, generator=gen), -1) for _ in range(R)]
    refs = [mo.moe_experts_reference(x.float(), w, i, *layer["stacks"]) for x, w, i in zip(xs, ws, idxs)]
    gu_bytes = K * int4_bytes(2 * I, H, g_gu) + H * 2 + K * I * 4
    dn_bytes = K * int4_bytes(H, I, g_d) + K * I * 4 + H * 2
    all_bytes = gu_bytes + dn_bytes

    def time_us(fn) -> float:
        if dev != "cuda":
            return float("nan")
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(lambda: [fn(r) for r in range(R)], rep=20, return_mode="median") * 1e3 / R

    def poison():
        if dev == "cuda":
            sizes = (K * mo.decode_act_stride(I) * 4, H * 16, H * 2)  # act, down's partials, y
            blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=dev) for n in sizes]
            del blocks

    def check(run) -> float:
        worst = 0.0
        for r in range(R):
            poison()
            y = run(r)
            err = ((y.float() - refs[r]).norm() / refs[r].norm()).item()
            worst = max(worst, err if err == err else float("inf"))
        return worst

    rows: list[dict] = []
    doc = {"device": name, "preset": a.preset, "copy_gbps": gbps, "sets": R, "gate_up_bytes": gu_bytes,
           "down_bytes": dn_bytes, "rows": rows}

    def record(kind, cfg, slices, run, nbytes, err):
        us = time_us(run)
        row = {"kind": kind, "cfg": cfg, "slices": slices, "us": us, "bytes": nbytes, "rel_err": err,
               "fraction_of_copy_bw": nbytes / us / 1e3 / gbps if dev == "cuda" else None}
        rows.append(row)
        frac = f"{row['fraction_of_copy_bw']:6.1%}" if dev == "cuda" else "   n/a"
        print(f"{kind:10} {str(cfg):16} {slices:3} {us:8.2f} {frac} {err:9.2e}", flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        return row

    print(f"{'kind':10} {'cfg':16} {'sl':>3} {'us':>8} {'%copy':>6} {'rel err':>9}", flush=True)
    stacks = layer["stacks"]
    # the row kernels (the op's decode before the word kernels), autotuned as the op did
    t_words = time.time()

    # gate_up alone: act checked against the reference's act
    act_refs = []
    for r in range(R):
        wgu = mo.dequantize_experts(gu_q[idxs[r][0]], gu_s[idxs[r][0]], torch.float32)
        gu = torch.einsum("h,kih->ki", xs[r][0].float(), wgu)
        gate, up = gu.chunk(2, dim=-1)
        act = torch.nn.functional.gelu(gate, approximate="tanh") * up
        act_refs.append(mo.decode_act_pack(act, g_d))  # the kernels' layout

    def act_err(run) -> float:
        """The worst routing's act error against the reference's (outputs poisoned first)."""
        err, used = 0.0, I * 9 // 8  # the padding after it is never read
        for r in range(R):
            poison()
            act = run(r)
            e = ((act[:, :used] - act_refs[r][:, :used]).norm() / act_refs[r][:, :used].norm()).item()
            err = max(err, e if e == e else float("inf"))
        return err

    best_gu = None
    for c in mo.WORDS_GATE_UP_CONFIGS:
        if time.time() - t_words > a.budget_s * 0.4 and best_gu is not None:
            print(f"gate_up: time budget spent, {c} and later skipped", flush=True)
            break
        cfg = (c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps, c.kwargs["DEPTH"])
        run = lambda r, cfg=cfg: mo.launch_decode_gate_up(xs[r], idxs[r], gu_q, gu_s, g_d, cfg=cfg)  # noqa: E731
        row = record("gate_up", cfg, 1, run, gu_bytes, act_err(run))
        if row["rel_err"] <= REL_TOL and (best_gu is None or row["us"] < best_gu["us"]):
            best_gu = row
    # gate_up from x's int8 levels (`moe_int4.GATE_UP_Q`): the quantize kernel and the dp4a kernel, two launches
    # against the words kernel's one (in the model the quantize kernel takes the experts' input norm kernel's place)
    best_q = None
    for cfg in GATE_UP_Q_CONFIGS:
        run = lambda r, cfg=cfg: mo.launch_decode_gate_up_q(xs[r], idxs[r], gu_q, gu_s, g_d, cfg=cfg)  # noqa: E731
        row = record("gate_up/q", cfg, 1, run, gu_bytes, act_err(run))
        if row["rel_err"] <= REL_TOL and (best_q is None or row["us"] < best_q["us"]):
            best_q = row
    if best_q is not None:
        doc["best_gate_up_q"] = {"cfg": best_q["cfg"], "us": best_q["us"]}
    acts = [act_refs[r].contiguous() for r in range(R)]
    best_dn = None
    for c in mo.WORDS_DOWN_CONFIGS:
        if time.time() - t_words > a.budget_s * 0.8 and best_dn is not None:
            print(f"down: time budget spent, {c} and later skipped", flush=True)
            break
        cfg = (c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps, c.kwargs["DEPTH"])
        for slices in (1, 2, 4):
            for xtile in (0, 1):  # act in the weight tile's layout or not (`moe_int4.DOWN_XTILE`)
                run = lambda r, cfg=cfg, sl=slices, xt=xtile: mo.launch_decode_down(  # noqa: E731
                    acts[r], ws[r], idxs[r], d_q, d_s, dtype, cfg=cfg, slices=sl, xtile=xt)
                row = record("down/xt" if xtile else "down", cfg, slices, run, dn_bytes, check(run))
                row["xtile"] = xtile
                if row["rel_err"] <= REL_TOL and (best_dn is None or row["us"] < best_dn["us"]):
                    best_dn = row
    if best_gu is None or best_dn is None:
        print("FAIL: no word config passed the check", file=sys.stderr)
        return 1
    mo.DOWN_XTILE = best_dn["xtile"]  # the pair and the op's path below with the winner's
    run = lambda r: mo.launch_experts_decode(xs[r], ws[r], idxs[r], *stacks, gate_up_cfg=best_gu["cfg"],  # noqa: E731
                                             down_cfg=best_dn["cfg"], slices=best_dn["slices"])
    best = record("words", [best_gu["cfg"], best_dn["cfg"]], best_dn["slices"], run, all_bytes, check(run))
    doc["best"] = {"gate_up": best_gu["cfg"], "down": best_dn["cfg"], "slices": best_dn["slices"],
                   "down_xtile": best_dn["xtile"], "us": best["us"]}
    mo.DOWN_SLICES = best_dn["slices"]
    if dev == "cuda":  # the op's path: the autotuner picks the configs (the interpreter cannot time them)
        run = lambda r: mo.launch_experts_decode(xs[r], ws[r], idxs[r], *stacks)  # noqa: E731
        run(0)
        record("words_auto", None, mo.DOWN_SLICES, run, all_bytes, check(run))
    doc["sweep_s"] = time.time() - t_start
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"sweep {doc['sweep_s']:.0f} s; best words {best['us']:.2f} us ({best_gu['cfg']}, {best_dn['cfg']}, "
          f"slices {best_dn['slices']})", flush=True)
    del layer, refs
    if a.bench_out and dev == "cuda":
        from triton.testing import do_bench
        n = 8192
        p, q = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        ms = do_bench(lambda: torch.mm(p, q), warmup=25, rep=200, return_mode="median")
        doc["bf16_mm_tflops"] = 2 * n ** 3 / ms / 1e9
        del p, q
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"torch bf16 mm {n}^3: {doc['bf16_mm_tflops']:.0f} TFLOP/s", flush=True)
        rc = bench_moe.main(["--preset", a.preset, "--ms", a.bench_ms, "--out", str(a.bench_out)])
        bench = json.loads(a.bench_out.read_text())
        flop_per_entry = 2 * (2 * I * H + H * I)  # gate_up and down of one (token, expert)
        for r in bench["rows"]:
            if r["op"] == "experts_int4" and r["m"] > 1:
                tf = r["m"] * K * flop_per_entry / r["us"] / 1e6
                print(f"experts_int4 m={r['m']}: {tf:.1f} TFLOP/s = {tf / doc['bf16_mm_tflops']:.1%} of bf16 mm",
                      flush=True)
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
