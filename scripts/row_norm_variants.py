"""A decode step's norms compiled by Inductor with its default reduction heuristics and with
one-row reductions kept in registers (export/backends/cuda.py, `row_reductions_in_registers`),
timed on the GPU (a tuning tool).

    python -m scripts.row_norm_variants [--out row_norm_variants.json]

The decode step of the 31B runs ~2 fused RMSNorm kernels a layer over one row of the hidden
size (5376), each ~5 us on the H200 (scripts/measurements/decode_profile_31b_12l_int4.json):
Inductor loops over the row twice in RBLOCK steps (its persistent bound is 1024 elements).
Here: Gemma's post-attention norm + residual add + pre-feedforward norm, and a lone norm with
a residual add, at hidden 5376 (31B), 2816 (26B-A4B) and 2560 (E4B), checked against fp32
eager and timed as CUDA-graph replays (median of 20, 50 calls each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from scripts import needs_cuda


def rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def post_attn_pre_ffn(attn, res, w1, w2):
    h = res + rms(attn, w1)
    return h, rms(h, w2)


def add_norm(x, res, w):
    h = x + res
    return h, rms(h, w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("row_norm_variants.json"))
    a = ap.parse_args(argv)
    if not needs_cuda("row_norm_variants"):
        return 2
    from torch import _dynamo
    from torch._inductor import config as ic

    from export.backends.cuda import row_reductions_in_registers
    from scripts.gemv1_variants import bench_graph

    ic.fx_graph_cache = False  # the heuristic is not part of the cache key
    rows = []
    for hidden in (5376, 2816, 2560):
        torch.manual_seed(hidden)
        attn, res = (torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16) * 4 for _ in range(2))
        w1, w2 = (torch.rand(hidden, device="cuda") + 0.5 for _ in range(2))
        for name, fn, args in (("post_attn+pre_ffn", post_attn_pre_ffn, (attn, res, w1, w2)),
                               ("add+norm", add_norm, (attn, res, w1))):
            ref = fn(*(t.double() for t in args))
            line = {"hidden": hidden, "fn": name}
            for variant in ("inductor", "row_in_registers"):
                _dynamo.reset()
                ctx = row_reductions_in_registers() if variant == "row_in_registers" else torch.no_grad()
                with ctx:
                    compiled = torch.compile(fn, dynamic=False)
                    out = compiled(*args)
                err = max(((o.double() - r).norm() / r.norm()).item() for o, r in zip(out, ref))
                line[variant] = {"us": bench_graph(lambda: [compiled(*args) for _ in range(50)], 50, reps=20),
                                 "rel_err": err}
            rows.append(line)
            print(f"hidden {hidden:5} {name:18} inductor {line['inductor']['us']:5.2f} us | rows in registers "
                  f"{line['row_in_registers']['us']:5.2f} us (err {line['row_in_registers']['rel_err']:.1e} vs "
                  f"{line['inductor']['rel_err']:.1e})", flush=True)
    a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
