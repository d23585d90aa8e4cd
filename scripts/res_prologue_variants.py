"""The int4 op's quantize kernel with its residual add and norms (RES + NORM: `int4_add_rms_linear` at M == 1):
both norm factors from one trip to the L2 (ONE_PASS 1: x, r and wr loaded once, kept in registers) or two
(ONE_PASS 0: r's squares, then h's from a second read), with and without a layer's scalar (SCALED), at each
variant's hidden size; 20 launches a CUDA graph (`do_bench_cudagraph`, median), outputs compared bitwise.

    python -m scripts.res_prologue_variants   # JSON to $OUT/res_prologue.json (./out without OUT)
"""
import json, os, sys, torch, triton
from triton.testing import do_bench_cudagraph
from export.kernels import int4_matmul as im
torch.manual_seed(0)
dev = "cuda"
src = torch.empty(256 << 20, dtype=torch.uint8, device=dev); dst = torch.empty_like(src)
copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
print(f"copy {2 * src.numel() / copy_ms / 1e6:.0f} GB/s")
rows = []
for name, K in (("31b", 5376), ("26b", 2816), ("e4b", 2560), ("e2b", 1536)):
    G = 128
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16) * 3
    r = torch.randn(1, K, device=dev, dtype=torch.bfloat16) * 9
    wr, w = (torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5 for _ in range(2))
    sc = torch.tensor([0.7], device=dev, dtype=torch.bfloat16)
    cnt = torch.zeros(1, device=dev, dtype=torch.int32)
    outs = {}
    for scaled in (0, 1):
        for one in (0, 1):
            h = torch.empty_like(x)
            f = lambda: im._quant_x(x, G, cnt, 0, 2, 2, False, None, (w, 1e-6), (r, wr, h), sc if scaled else None, bool(one))
            got = f()
            outs[(scaled, one)] = [t.clone() for t in got] + [h.clone()]
            def many():
                for _ in range(20):
                    f()
            us = do_bench_cudagraph(many, rep=50) * 1e3 / 20
            rows.append({"model": name, "k": K, "scaled": scaled, "one_pass": one, "us": us})
            print(f"{name} K {K} scaled {scaled} one_pass {one}: {us:.2f} us")
        a, b = outs[(scaled, 0)], outs[(scaled, 1)]
        print("  bitwise equal:", all(torch.equal(p, q) for p, q in zip(a, b)))
        rows[-1]["bitwise_equal_to_two_pass"] = all(torch.equal(p, q) for p, q in zip(a, b))
os.makedirs(os.environ.get("OUT", "out"), exist_ok=True)
json.dump({"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "rows": rows}, open(os.path.join(os.environ.get("OUT", "out"), "res_prologue.json"), "w"), indent=1)
