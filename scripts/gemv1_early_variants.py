"""The small weights' M == 1 GEMV (bf16 x, one launch: `gemv1_plan`'s small branch) with one of
`_int4_gemv1_kernel`'s switches off and on, on E2B / E4B's chain of small projections (E4B's q / k / v as the
op runs it: x as levels), in one GPU call (a measuring tool).

    python -m scripts.gemv1_early_variants [--switch early|stage] [--out gemv1_early_variants.json] [--rounds 5]
                                           [--models e2b,e4b]

Switches (`int4_gemv1`'s arguments of the same names):
- early: the first weight tiles loaded before the PDL wait (EARLY) or after it. Why: E2B's decode step is ~15
  launches a layer, each a few us (scripts/measurements/profile_e2b_whole.json); its small GEMVs (q / k / v with
  the input norm, the attention output, the per-layer-input gate with the residual add, the per-layer projection
  with its activation) waited for the kernel before them first thing, then asked HBM for their weights: a DRAM
  latency after the wait that the XQ loop of the larger weights hides by loading its first tile before the wait.
  Outputs bitwise equal.
- stage: each step's x (with the norm, the activation or the add) computed once for the program and handed to
  the tile through shared memory (STAGE), or once for each row of threads. Why: with one row a warp, most of the
  loop's instructions compute x again (sm_90 SASS: E2B's q / k / v 113 a word, 18 of them the weight's; 43
  staged), and the small GEMVs wait on their instruction chains (scripts/measurements/gemv1_ncu_e2b.json). The
  sums in another order: outputs within fp32 roundings (the bf16 results an ulp apart here and there).

Each variant runs a model's layer of those four projections, each reading the one before's output (the
attention a slice of q / k / v), as a chain of `--layers` layers, each with weights of its own (more bytes than
the L2), in one CUDA graph, launched directly with the PDL attribute (`pdl_args`), as the artifact's launcher
does; replays timed with CUDA events, the variants alternated `--rounds` times (median per round). Correctness:
the first layer's q / k / v within 1e-2 of fp32 on the dequantized weights with the switch on, and the two
variants' outputs bitwise equal (early) or the first layer's four outputs within 1e-2 of each other (stage).
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

G = 128
KEYS = {"early": ("us_per_layer_after_wait", "us_per_layer_early"), "stage": ("us_per_layer_off", "us_per_layer_on")}


def layer_weights(cfg, dev):
    """A layer's four small projections (qweight, scales) and the norm weights / per-layer-input table."""
    H, P, L = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
    D = cfg.layer_head_dim(0)
    qkv_n = cfg.num_attention_heads * D + 2 * cfg.layer_kv_heads(0) * D
    shapes = {"qkv": (qkv_n, H), "o": (H, cfg.num_attention_heads * D), "gate": (P, H), "proj": (H, P)}
    w = {k: im.quantize_int4(torch.randn(n, k_, device=dev) / k_ ** 0.5, G) for k, (n, k_) in shapes.items()}
    assert not any(im.gemv1_plan(n, k_, G).xq for k, (n, k_) in shapes.items() if k != "qkv")  # bf16 x, one launch
    w["w_in"] = torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5
    w["w_post"] = torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5
    w["table"] = torch.randn(1, L, P, device=dev, dtype=torch.bfloat16)
    w["index"] = torch.tensor([3], device=dev)
    return w


def gemv(x, qs, switch, **kw):
    """As the op runs the weight (`gemv1_plan` with the prologue the arguments make: where it takes x as levels, as
    E4B's q / k / v did before the fitted staged tiles, a quantize kernel first, which the switches leave as it is),
    launched directly with the PDL attribute; `switch` ({name: bool}) the `int4_gemv1` switch of the variant."""
    q, s = qs
    plan = im.gemv1_plan(q.shape[0], x.shape[1], G, im.prologue_of(kw.get("up"), kw.get("norm"), kw.get("res")))
    return im.int4_gemv1(x, q, s, plan.splits, kernel=im._gemv1_kernel(plan.cfg), xq=plan.xq, levels=plan.levels,
                         pdl_quant=2 if plan.xq else 0, pdl_gemv=2, pdl_attr=True, **switch, **kw)


def layer(x, w, switch):
    """x [1, H] -> the next layer's x: q / k / v (norm), o of the attention stand-in, the gate (residual
    add), the per-layer projection (activation, its table row read in place)."""
    qkv = gemv(x, w["qkv"], switch, norm=(w["w_in"], 1e-6))
    o = gemv(qkv[:, :w["o"][0].shape[1] * 2], w["o"], switch)
    h = torch.empty_like(x)
    gate = gemv(x, w["gate"], switch, res=(o, w["w_post"], h, 1e-6))
    table = w["table"].reshape(-1, w["table"].shape[-1])
    return gemv(gate, w["proj"], switch, up=table, up_index=w["index"]), (qkv, o, h, gate)


def fp32_qkv(x, w):
    """The layer's first projection in fp32 on the dequantized weight (the norm in fp32 too)."""
    return im.rms_norm_reference(x.float(), w["w_in"].float(), 1e-6) @ im.dequantize_int4(*w["qkv"], torch.float32).t()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switch", choices=("early", "stage"), default="early", help="the int4_gemv1 switch turned "
                    "off and on (the other one stays at its default)")
    ap.add_argument("--out", type=Path, default=Path("gemv1_early_variants.json"))
    ap.add_argument("--models", default="e2b,e4b")
    ap.add_argument("--layers", type=int, default=24, help="layers a graph, each on its own weight copy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args(argv)
    if not needs_cuda("gemv1_early_variants"):
        return 2
    if torch.cuda.get_device_capability()[0] < 9:
        print("gemv1_early_variants: needs sm_90+ (the chain launches with programmatic dependent launch)",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    import triton
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    doc = {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "layers": args.layers, "switch": args.switch,
           "device": torch.cuda.get_device_name(), "models": {}}
    print(f"copy {doc['copy_gbps']:.0f} GB/s")
    for name in args.models.split(","):
        cfg = PRESETS[name]
        ws = [layer_weights(cfg, dev) for _ in range(args.layers)]
        x0 = torch.randn(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        outs, graphs = {}, {}
        for on in (False, True):
            x = x0.clone()
            got = []
            for w in ws:  # eager, then the graph
                x, parts = layer(x, w, {args.switch: on})
                got += [t.clone() for t in parts] + [x.clone()]
            outs[on] = got
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                x = x0
                for w in ws:
                    x, _ = layer(x, w, {args.switch: on})
            graphs[on] = g
        bitwise = all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
        first = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                    for a, b in zip(outs[True][:5], outs[False][:5]))  # the first layer's four outputs and h
        ref = fp32_qkv(x0, ws[0])
        err = ((outs[True][0].float() - ref).norm() / ref.norm()).item()
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for on in (False, True):
                g = graphs[on]
                for _ in range(5):
                    g.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ts = []
                for _ in range(args.replays):
                    start.record()
                    g.replay()
                    end.record()
                    end.synchronize()
                    ts.append(start.elapsed_time(end) * 1e3 / args.layers)
                times[on].append(statistics.median(ts))
        off_key, on_key = KEYS[args.switch]
        row = {off_key: times[False], on_key: times[True], "bitwise_equal": bitwise, "first_layer_rel_diff": first,
               "qkv_rel_err_fp32": err}
        row["ok"] = err <= 1e-2 and (bitwise if args.switch == "early" else first <= 1e-2)
        doc["models"][name] = row
        print(f"{name}: a layer's four small projections {statistics.median(times[False]):.2f} -> "
              f"{statistics.median(times[True]):.2f} us ({args.switch} on); bitwise {bitwise}, first layer "
              f"{first:.1e} apart, q/k/v vs fp32 {err:.1e}")
    args.out.write_text(json.dumps(doc, indent=1))
    bad = [n for n, r in doc["models"].items() if not r["ok"]]
    if bad:
        print(f"FAILED correctness: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
