"""Our decoder against transformers' Gemma4ForCausalLM on random fp32 weights: chunked
prefill, then decode far enough to wrap every sliding ring several times."""

import pytest
import torch

from export.gemma4.config import PRESETS
from export.gemma4.model import Gemma4Model
from tests.helpers import hf_logits_stream, hf_oracle, randomize_, tiny_31b_like

CONFIGS = {"tiny": PRESETS["tiny"], "tiny-moe": PRESETS["tiny-moe"], "tiny-31b-like": tiny_31b_like()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_matches_transformers(name):
    cfg = CONFIGS[name]
    chunk = 5
    model = randomize_(Gemma4Model(cfg, ctx=96, prefill_chunk=chunk), seed=1).eval()
    hf = hf_oracle(model)
    prompt_chunks = [5, 3, 5, 1]  # several chunks, some shorter than prefill_chunk
    n_decode = 3 * model.ring_size + 4  # wraps each sliding ring more than three times
    steps = prompt_chunks + [1] * n_decode
    tokens = torch.randint(0, cfg.vocab_size, (1, sum(steps)), generator=torch.Generator().manual_seed(2))

    errs, start = [], 0
    for n, ref in zip(steps, hf_logits_stream(hf, tokens, steps)):
        ours = model(tokens[:, start:start + n], torch.tensor([start]))
        start += n
        errs.append(rel_err(ours, ref))
    print(f"{name}: {len(errs)} steps, max rel err {max(errs):.2e}")
    assert max(errs) <= 1e-4, errs
    assert start > cfg.sliding_window * 3


def test_identity_norms_would_hide_bugs():
    """Guard for the randomisation itself: every 1-D weight and layer_scalar moves off 1."""
    model = randomize_(Gemma4Model(PRESETS["tiny"], ctx=32, prefill_chunk=4))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert not torch.allclose(p, torch.ones_like(p)), name
    scalars = [b for n, b in model.named_buffers() if n.endswith("layer_scalar")]
    assert scalars and all(not torch.allclose(s, torch.ones_like(s)) for s in scalars)
