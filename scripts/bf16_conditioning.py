"""How far the eager bf16 model is from the same model in fp32 on random weights, layer by layer:
what a bf16-vs-bf16 parity figure (the compiled runner against the eager model, both bf16) can be
held to. Plain torch on the CPU, a narrow model of a preset's shape (its layer pattern, head dims,
norms and softcap; a smaller hidden size and vocabulary), seconds to a minute.

    python -m scripts.bf16_conditioning [--preset 31b] [--hidden 512] [--layers 6] [--out J]

Random weights draw the 1-D norm weights from U[0.5, 1.5) (scripts and tests perturb them away
from identity). With scaling 1.0 and q / k RMS-normed, a score q . k then has a spread of
~sqrt(head_dim) (16-23 for head dims 256-512): the softmax is nearly one-hot and small input
changes move it. Each run compares the bf16 model with its copy in fp32 (the same weights)
twice: the q / k norm weights as drawn, and scaled by (3 / head_dim)^(1/4) so that scores spread
~3 as in a trained model. Reported: the
relative L2 error of every step's logits (chunked prefill, then decode), and of each layer's
attention output and layer output at the last step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

from export.gemma4.checkpoint import random_model
from export.gemma4.config import PRESETS


def narrow(preset: str, hidden: int, layers: int, vocab: int):
    base = PRESETS[preset]
    heads = max(2, hidden // 64)
    return dataclasses.replace(
        base, hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab, vocab_size_per_layer_input=vocab,
        num_hidden_layers=layers, layer_types=(), num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        num_global_key_value_heads=max(1, heads // 4) if base.num_global_key_value_heads else None,
        sliding_window=min(base.sliding_window, 64), num_kv_shared_layers=0, hidden_size_per_layer_input=0,
        enable_moe_block=False, num_experts=0, top_k_experts=0, moe_intermediate_size=0)


def build(cfg, ctx: int, chunk: int, scaled: bool):
    """The bf16 model; the fp32 one is its copy in fp32 (the same, bf16-rounded, weights)."""
    m = random_model(cfg, ctx=ctx, prefill_chunk=chunk, dtype=torch.bfloat16, seed=0).eval()
    if scaled:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_((3.0 / p.numel()) ** 0.25)  # q . k ~ head_dim w_q w_k: spread ~3
    return m


@torch.no_grad()
def run(m, tokens, prompt: int, chunk: int):
    """Every step's logits, and each layer's attention / layer output of the last step."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(m.layers):
        for key, mod in ((f"layer{i}", layer), (f"attn{i}", layer.self_attn)):  # output[0] of each
            hooks.append(mod.register_forward_hook(lambda _m, _in, out, key=key: seen.__setitem__(key, out[0].float())))
    m.reset_cache()
    out = [m(tokens[:, s:min(s + chunk, prompt)], torch.tensor([s])) for s in range(0, prompt, chunk)]
    out += [m(tokens[:, p:p + 1], torch.tensor([p])) for p in range(prompt, tokens.shape[1])]
    for h in hooks:
        h.remove()
    return torch.cat(out).float(), seen


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="31b", choices=sorted(PRESETS))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = narrow(a.preset, a.hidden, a.layers, a.vocab)
    ctx = a.prompt + a.decode
    tokens = torch.randint(3, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(1))
    doc = {"preset": a.preset, "hidden": a.hidden, "layers": a.layers, "layer_types": list(cfg.layer_types),
           "prompt": a.prompt, "decode": a.decode, "runs": []}
    for scaled in (False, True):
        m = build(cfg, ctx, a.chunk, scaled)
        hi, hi_seen = run(copy.deepcopy(m).float(), tokens, a.prompt, a.chunk)
        lo, lo_seen = run(m, tokens, a.prompt, a.chunk)
        err = (lo - hi).norm(dim=-1) / hi.norm(dim=-1)
        row = {"qk_norms": "scaled" if scaled else "as drawn", "logits_rel_err_mean": err.mean().item(),
               "logits_rel_err_max": err.max().item(), "last_step": {k: rel(lo_seen[k], hi_seen[k]) for k in hi_seen}}
        doc["runs"].append(row)
        print(f"q/k norms {row['qk_norms']:8}: bf16 vs fp32 logits rel err mean {row['logits_rel_err_mean']:.2e} "
              f"max {row['logits_rel_err_max']:.2e}; last step by layer (attention / layer): "
              + " ".join(f"{row['last_step'][f'attn{i}']:.1e}/{row['last_step'][f'layer{i}']:.1e}"
                         for i in range(a.layers)), flush=True)
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
