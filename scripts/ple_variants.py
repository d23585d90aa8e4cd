"""The per-layer projection of E2B / E4B at decode with its input row read in place: `gemma4::int4_glu_linear`
given the per-layer inputs' table and the layer's index, against a gather of the row first, in one GPU call.

    python -m scripts.ple_variants [--models e2b,e4b] [--reps 50] [--json ple_fold_variants.json]

For each model, its layers' per-layer-input blocks chained as the decode step runs them (each block's output
the next one's residual stream x, every layer with its own gate and projection weights, int4 g128, its own
norm weights and scalar, one row of a [1, 1, layers, 256] table), as one CUDA graph:
`gemma4::int4_add_linear` (the MLP's output into the stream with the gate's GEMV), the projection with its
activation (`gemma4::int4_glu_linear`), then the norm, the add and the scalar (under torch.compile, as Inductor
fuses them in the artifact). Variants:
- `gather`: the layer's row of the table gathered by its own kernel, then the projection (the model before);
- `fold`: the projection's GEMV given the table and the index, reading the row in place (the model now).
Neither launch carries the PDL attribute here (the artifact's launcher adds it). Each block is checked against
an fp64 block on the dequantized weights, `fold` against `gather` over the whole chain (bitwise expected);
timed as CUDA-graph replays (median of `--reps`), microseconds a block, with the kernels of one replay
counted by the profiler and the copy bandwidth measured in the same run. Table on stdout, JSON with
`copy_gbps` and `rows`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from export.gemma4.config import PRESETS
from export.kernels import int4_matmul as im
from scripts import needs_cuda
from scripts.bench_int4 import copy_gbps  # the int4 benchmark's measure (do_bench of a 2 GiB copy), for one figure


def replay_us(g: torch.cuda.CUDAGraph, reps: int) -> float:
    """Median microseconds of one replay of g."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def capture(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding fn, warmed up on a side stream first (its compiles and allocations)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def kernels_per_replay(g: torch.cuda.CUDAGraph) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def layer_weights(H: int, P: int, layers: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        qg, sg = im.quantize_int4(torch.randn(P, H, generator=g) * 0.05, 128)
        qp, sp = im.quantize_int4(torch.randn(H, P, generator=g) * 0.05, 128)
        t = dict(weight_r=torch.rand(H, generator=g) + 0.5, weight_p=torch.rand(H, generator=g) + 0.5,
                 scalar=torch.rand(1, generator=g) + 0.5)
        out.append({**{k: v.bfloat16().cuda() for k, v in t.items()}, "qweight_g": qg.cuda(), "scales_g": sg.cuda(),
                    "qweight_p": qp.cuda(), "scales_p": sp.cuda()})
    return out


def fp64_block(x, r, w, table, index, eps):
    d = lambda t: t.double()
    h = d(x) + im.rms_norm_reference(d(r), d(w["weight_r"]), eps)
    gate = h @ im.dequantize_int4(w["qweight_g"], w["scales_g"], torch.float64).t()
    up = d(table).index_select(-2, index).squeeze(-2)
    p = (torch.nn.functional.gelu(gate, approximate="tanh") * up) @ im.dequantize_int4(
        w["qweight_p"], w["scales_p"], torch.float64).t()
    return (h + im.rms_norm_reference(p, d(w["weight_p"]), eps)) * d(w["scalar"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="e2b,e4b", help="presets with per-layer inputs (default e2b,e4b)")
    ap.add_argument("--reps", type=int, default=50, help="graph replays timed per variant and round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the variants alternating (median of rounds)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    names = args.models.split(",")
    bad = [n for n in names if n not in PRESETS or not PRESETS[n].has_ple]
    if bad:
        ple_presets = ",".join(n for n, c in PRESETS.items() if c.has_ple)
        print(f"ple_variants: --models {args.models!r}: {','.join(bad)} has no per-layer inputs or is no preset "
              f"(these have them: {ple_presets})", file=sys.stderr)
        return 2
    if not needs_cuda("ple_variants"):
        return 2
    eps = 1e-6
    gbps = copy_gbps()
    tail = torch.compile(lambda h, p, wp, s: (h + im.rms_norm_reference(p, wp, eps)) * s, dynamic=False)
    rows = []
    print(f"copy {gbps:.0f} GB/s")
    print(f"{'model':6} {'H':>5} {'layers':>6} {'variant':8} {'us/block':>9} {'kernels/block':>13} "
          f"{'rel err fp64':>12} {'= gather':>8}")
    for name in names:
        cfg = PRESETS[name]
        H, P, L = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        ws = layer_weights(H, P, L, seed=len(name) + H)
        gen = torch.Generator(device="cuda").manual_seed(H)
        x0 = (torch.randn(1, 1, H, device="cuda", generator=gen) * 3).bfloat16()
        rs = [(torch.randn(1, 1, H, device="cuda", generator=gen) * 7).bfloat16() for _ in range(L)]
        table = torch.randn(1, 1, L, P, device="cuda", generator=gen).bfloat16()
        idx = [torch.tensor([i], device="cuda") for i in range(L)]

        def block(x, i, fold):
            w = ws[i]
            h, gate = torch.ops.gemma4.int4_add_linear(x, rs[i], w["weight_r"], eps, w["qweight_g"], w["scales_g"])
            if fold:
                p = torch.ops.gemma4.int4_glu_linear(gate, table, w["qweight_p"], w["scales_p"], idx[i])
            else:
                p = torch.ops.gemma4.int4_glu_linear(gate, table.index_select(2, idx[i]).squeeze(2), w["qweight_p"],
                                                     w["scales_p"])
            return tail(h, p, w["weight_p"], w["scalar"])

        outs, graphs, found = {}, {}, {}
        for variant, fold in (("gather", False), ("fold", True)):
            errs = [((block(x0, i, fold).double() - (ref := fp64_block(x0, rs[i], ws[i], table, idx[i], eps))).norm()
                     / ref.norm()).item() for i in range(L)]
            res = {}

            def chain(fold=fold, res=res):
                x = x0
                for i in range(L):
                    x = block(x, i, fold)
                res["y"] = x

            g = capture(chain)
            g.replay()
            torch.cuda.synchronize()
            outs[variant], graphs[variant] = res["y"].clone(), g
            found[variant] = (kernels_per_replay(g), max(errs), bool(torch.equal(outs[variant], outs["gather"])))
        times = {v: [] for v in graphs}
        for _ in range(args.rounds):
            for v, g in graphs.items():
                times[v].append(replay_us(g, args.reps))
        for v in graphs:
            us = statistics.median(times[v])
            kern, err, same = found[v]
            rows.append(dict(model=name, hidden=H, per_layer=P, layers=L, variant=v, us_per_block=us / L, graph_us=us,
                             graph_us_rounds=times[v], kernels_per_block=kern / L, rel_err_fp64_max=err,
                             bitwise_gather=same, copy_gbps=gbps))
            print(f"{name:6} {H:5d} {L:6d} {v:8} {us / L:9.2f} {kern / L:13.1f} {err:12.2e} {str(same):>8}")
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": gbps, "device": torch.cuda.get_device_name(), "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
