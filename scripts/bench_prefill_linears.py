"""One 31B sliding layer's int4 linears as an exported prefill runs them, per chunk length M.

    python -m scripts.bench_prefill_linears --out $OUT/pf.json

The layer's seven linears (q, k, v, o, gate, up, down; int4 g128, random weights) exported
with a dynamic M in [2, 2048] and compiled by AOTInductor: a chunk that can reach
DEQUANT_MIN_M compiles dequant + mm (cuBLAS). Beside it, in the same run: torch's bf16 mm on
the same shapes (the tensor-core ceiling; the difference is what the int4 path adds, mostly
the dequant pass) and the device-to-device copy bandwidth. (The fused GEMM's figures per
shape are in scripts/measurements/int4_kernels.json: timed eagerly here, Python launch
overhead swamped them.) Checks each compiled output against an
fp32 reference on fresh inputs with the allocator's free memory NaN-poisoned. Prints the
floors (bytes moved, at the copy bandwidth) and a table; writes JSON. Without a GPU (tiny
shapes) it checks the exported graph and the CPU reference only.

H200, 2026-12-01 (before the fused GEMM column was dropped): the exported dequant + mm ran at
63% of bf16 mm at M = 512, 80% at 1024, 86% at 2048; the int4 path adds ~450 us a layer at
M = 16 (the dequant pass, 63% of the copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from export.kernels import int4_matmul as im

H, Q, KV, INTER, G = 5376, 8192, 4096, 21504, 128  # 31B sliding layer: 32 x 256 q, 16 x 256 k / v
MS = (16, 128, 512, 1024, 2048)


def shapes(tiny: bool) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each linear."""
    h, q, kv, inter = (256, 384, 128, 512) if tiny else (H, Q, KV, INTER)
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (inter, h), "up": (inter, h),
            "down": (h, inter)}


class Linears(torch.nn.Module):
    """forward(x [M, H], xo [M, Q], xd [M, INTER]) -> the seven outputs."""

    def __init__(self, packed: dict):
        super().__init__()
        self.names = list(packed)
        for name, (qw, s) in packed.items():
            self.register_buffer(f"{name}_q", qw)
            self.register_buffer(f"{name}_s", s)

    def forward(self, x, xo, xd):
        src = {"o": xo, "down": xd}
        return tuple(torch.ops.gemma4.int4_linear(src.get(n, x), getattr(self, f"{n}_q"), getattr(self, f"{n}_s"))
                     for n in self.names)


def inputs(sh: dict, m: int, device: str) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(m, sh[n][1], device=device, dtype=torch.bfloat16) for n in ("q", "o", "down"))


def rel_errors(outs, xs, sh, w32) -> dict[str, float]:
    src = {"o": xs[1], "down": xs[2]}
    errs = {}
    for n, y in zip(sh, outs):
        ref = src.get(n, xs[0]).float() @ w32[n].t()
        errs[n] = float("nan") if not torch.isfinite(y).all() else ((y.float() - ref).norm() / ref.norm()).item()
    return errs


def poison(device: str) -> None:
    if device == "cuda":  # the allocator's free blocks full of NaN: an unwritten output shows
        torch.full((1 << 28,), float("nan"), device=device, dtype=torch.bfloat16)


def compile_aoti(mod, sh, chunk: int, device: str, workdir: Path):
    """(exported graph's kernel names, runner or None without a GPU)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    M = torch.export.Dim("M", min=2, max=chunk)
    xs = inputs(sh, chunk, device)
    ep = torch.export.export(mod, xs, dynamic_shapes=({0: M}, {0: M}, {0: M}))
    dec = ep.run_decompositions({}, decompose_custom_triton_ops=True)
    kernels = sorted({kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                      for n in dec.graph.nodes if "kernel_idx" in n.kwargs})
    if device != "cuda":
        return kernels, None
    from runtime.aoti import promote_libtorch

    so = torch._inductor.aot_compile(ep.module(), xs, options={"aot_inductor.output_path": str(workdir / "pf.so"),
                                                                "max_autotune": False})
    promote_libtorch("cuda")
    return kernels, torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda:0")


def copy_gbps() -> float:
    import triton.testing

    src = torch.randn(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.nbytes / ms / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (without a GPU: the exported graph and the CPU reference only)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    sh = shapes(tiny)
    torch.manual_seed(0)
    packed, w32, wbf = {}, {}, {}
    for n, (N, K) in sh.items():
        qw, s = im.quantize_int4(torch.randn(N, K, device=device) * K**-0.5, G if not tiny else 32)
        packed[n], w32[n] = (qw, s), im.dequantize_int4(qw, s, torch.float32)
        wbf[n] = w32[n].to(torch.bfloat16)
    mod = Linears(packed)
    chunk = 2048 if not tiny else im.DEQUANT_MIN_M
    rec = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dequant_min_m": im.DEQUANT_MIN_M,
           "shapes": sh, "group_size": G, "rows": [], "checks": []}
    with tempfile.TemporaryDirectory() as tmp:
        kernels, runner = compile_aoti(mod, sh, chunk, device, Path(tmp))
        rec["exported_kernels"] = kernels
        print(f"exported prefill (M in [2, {chunk}]) runs: {kernels}", flush=True)
        assert kernels == ["_int4_dequant_kernel"], kernels
        run = (lambda xs: runner.run(list(xs))) if runner else (lambda xs: mod(*xs))
        for m in (3, 600, chunk) if not tiny else (3, 9):
            xs = inputs(sh, m, device)
            poison(device)
            errs = rel_errors(run(xs), xs, sh, w32)
            rec["checks"].append({"m": m, "rel_err": errs})
            print(f"check M={m}: worst rel err {max(errs.values()):.2e}", flush=True)
            save(rec, args.out)
            assert all(e <= 1e-2 for e in errs.values()), errs  # bf16 operands; NaN fails too
        if device != "cuda":
            print("no GPU: graph and numerics checked, nothing timed")
            return 0
        import triton.testing

        bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731 (us)
        rec["copy_gbps"] = bw = copy_gbps()
        wbytes = sum(packed[n][0].nbytes + packed[n][1].nbytes for n in sh)
        dq_bytes = wbytes + sum(N * K * 2 for N, K in sh.values())  # read int4, write bf16
        rec["weight_bytes"], rec["dequant_pass_bytes"] = wbytes, dq_bytes
        src_of = {"o": 1, "down": 2}
        print(f"copy {bw:.0f} GB/s; int4 weights {wbytes / 1e9:.3f} GB (read floor {wbytes / bw / 1e3:.0f} us); "
              f"the dequant pass moves {dq_bytes / 1e9:.2f} GB (floor {dq_bytes / bw / 1e3:.0f} us)")
        print(f"{'M':>5} {'GFLOP':>7} {'bf16 us':>8} {'TF/s':>5} {'aoti dq+mm us':>13} {'TF/s':>5} {'of bf16':>7} "
              f"{'int4 extra us':>13}")
        for m in MS:
            xs = inputs(sh, m, device)
            flops = 2 * m * sum(N * K for N, K in sh.values())
            bf16_us = bench(lambda: [xs[src_of.get(n, 0)] @ wbf[n].t() for n in sh])
            aoti_us = bench(lambda: runner.run(list(xs)))
            row = {"m": m, "flops": flops, "bf16_us": bf16_us, "aoti_dequant_mm_us": aoti_us,
                   "bf16_tflops": flops / bf16_us / 1e6, "aoti_dequant_mm_tflops": flops / aoti_us / 1e6,
                   "fraction_of_bf16": bf16_us / aoti_us}
            rec["rows"].append(row)
            save(rec, args.out)  # after every row: a run cut short keeps what it measured
            print(f"{m:>5} {flops / 1e9:>7.1f} {bf16_us:>8.0f} {row['bf16_tflops']:>5.0f} {aoti_us:>13.0f} "
                  f"{row['aoti_dequant_mm_tflops']:>5.0f} {row['fraction_of_bf16']:>7.0%} {aoti_us - bf16_us:>13.0f}",
                  flush=True)
    save(rec, args.out)
    return 0


def save(rec: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    sys.exit(main())
