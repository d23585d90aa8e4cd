"""End-to-end logits error of an int8 / int4 KV cache against the bf16-KV model (eager, random
weights, a real-width slice), so the quantized caches' cost is known in logits, not only in the
attention output (scripts/bench_attention.py).

    python -m scripts.kv_logits_error --preset 31b --layers 6 --fill 2048 [--device cuda]

Chunked prefill of `fill` tokens, then `decode` tokens; for each KV dtype the relative L2 error
of every step's logits against the bf16-KV model with the same weights (and of the decode steps
alone, which run the decode kernel), and how often the argmax agrees. The slice keeps the
model's 5:1 sliding:full pattern (6 layers: one full layer).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from export.gemma4.checkpoint import random_model
from export.gemma4.flags import add_export_arguments
from export.gemma4.options import ExportConfig, ExportConfigError, model_config


@torch.no_grad()
def run(model, tokens, chunk, n_prompt):
    model.reset_cache()
    out = []
    for s in range(0, n_prompt, chunk):
        out.append(model(tokens[:, s:min(s + chunk, n_prompt)], torch.tensor([s], device=tokens.device)))
    for p in range(n_prompt, tokens.shape[1]):
        out.append(model(tokens[:, p:p + 1], torch.tensor([p], device=tokens.device)))
    return torch.cat(out).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    add_export_arguments(ap, ("preset", "layers", "prefill_chunk"), preset=dict(default="31b", help="config preset"),
                         layers=dict(default=6),
                         prefill_chunk=dict(default=128))
    ap.add_argument("--fill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--kq8", type=int, choices=(0, 1, 2), default=None,
                    help="the int8 decode kernel's q . k as an int8 dot of q in this many int8 levels "
                         "(DECODE_KNOBS KQ8; default: the module's setting)")
    args = ap.parse_args(argv)
    if args.kq8 is not None:
        from export.kernels import attention as A
        for D in {d for d, _ in A.DECODE_CONFIG} | {d for d, _ in A.DECODE_KNOBS}:
            A.DECODE_KNOBS.setdefault((D, 1), {})["KQ8"] = args.kq8
    try:
        mcfg = model_config(ExportConfig(preset=args.preset, layers=args.layers))
    except ExportConfigError as e:
        ap.error(str(e))
    ctx = args.fill + args.decode
    dtype = torch.bfloat16
    tokens = torch.randint(3, mcfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(1)).to(args.device)
    logits = {}
    for kv in ("bf16", "int8", "int4"):
        model = random_model(mcfg, ctx=ctx, prefill_chunk=args.prefill_chunk, dtype=dtype, seed=0, device=args.device,
                             kv_dtype=kv).to(args.device).eval()
        logits[kv] = run(model, tokens, args.prefill_chunk, args.fill).cpu()
        del model
    ref = logits["bf16"]
    rows = []
    for kv in ("int8", "int4"):
        err = ((logits[kv] - ref).norm(dim=-1) / ref.norm(dim=-1))
        agree = (logits[kv].argmax(-1) == ref.argmax(-1)).float().mean().item()
        dec = err[-args.decode:]  # the decode steps alone (one query at a time: the decode kernel)
        rows.append(dict(kv_dtype=kv, rel_err_mean=err.mean().item(), rel_err_max=err.max().item(), argmax_agree=agree,
                         decode_rel_err_mean=dec.mean().item(), decode_rel_err_max=dec.max().item()))
        print(f"{kv}: logits rel err mean {rows[-1]['rel_err_mean']:.3e} max {rows[-1]['rel_err_max']:.3e}, "
              f"decode steps mean {rows[-1]['decode_rel_err_mean']:.3e} max {rows[-1]['decode_rel_err_max']:.3e}, "
              f"argmax agrees {agree:.1%} ({args.preset} {args.layers} layers, fill {args.fill}, {args.device})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "layers": args.layers, "fill": args.fill, "kq8": args.kq8,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
