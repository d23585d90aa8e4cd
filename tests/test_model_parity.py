"""Our decoder against transformers' Gemma4ForCausalLM on random fp32 weights: chunked
prefill (chunks shorter and longer than the sliding window), then decode far enough to wrap
every sliding ring several times."""

import pytest
import torch

from export.gemma4.config import PRESETS
from export.gemma4.model import Gemma4Model
from tests.helpers import hf_logits_stream, hf_oracle, randomize_, tiny_31b_like

CONFIGS = {"tiny": PRESETS["tiny"], "tiny-moe": PRESETS["tiny-moe"], "tiny-31b-like": tiny_31b_like()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# prefill chunks (the last of each list is prefill_chunk's size): within the window (8), and
# longer than it, so a chunk attends across the ring's wrap and overwrites all of it
PROMPTS = {"short": [5, 3, 5, 1], "long": [19, 3, 19, 1, 11]}


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_matches_transformers(name, prompt):
    cfg = CONFIGS[name]
    prompt_chunks = PROMPTS[prompt]
    chunk = max(prompt_chunks)
    model = randomize_(Gemma4Model(cfg, ctx=128, prefill_chunk=chunk), seed=1).eval()
    hf = hf_oracle(model)
    n_decode = 3 * model.ring_size + 4  # wraps each sliding ring more than three times
    steps = prompt_chunks + [1] * n_decode
    tokens = torch.randint(0, cfg.vocab_size, (1, sum(steps)), generator=torch.Generator().manual_seed(2))

    errs, start = [], 0
    for n, ref in zip(steps, hf_logits_stream(hf, tokens, steps)):
        ours = model(tokens[:, start:start + n], torch.tensor([start]))
        start += n
        errs.append(rel_err(ours, ref))
    print(f"{name} {prompt}: {len(errs)} steps, max rel err {max(errs):.2e}")
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
