"""tiny-moe exported for CPU with int4 experts (session fixture `tiny_moe_artifact`): the expert
stacks are stored once in the .ptd in the int4 layout and the compiled methods match eager logits."""

from __future__ import annotations

import pytest
import torch

from export.artifact import read_ptd_index
from export.gemma4.quant import PackedInt4Experts
from tests.test_export_cpu import MiniRunner, _rel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini(tiny_moe_artifact, tmp_path_factory) -> MiniRunner:
    return MiniRunner(tiny_moe_artifact.out_dir, tmp_path_factory.mktemp("so"))


def test_expert_stacks_are_int4_in_the_ptd(tiny_moe_artifact, mini):
    model = tiny_moe_artifact.model
    layers = model.cfg.num_hidden_layers
    assert all(isinstance(layer.experts, PackedInt4Experts) for layer in model.layers)
    index = read_ptd_index(tiny_moe_artifact.out_dir / "model.ptd")
    for i in range(layers):
        for proj in ("gate_up_proj", "down_proj"):
            for buf in ("qweight", "scales"):
                key = f"layers.{i}.experts.{proj}.{buf}"
                assert key in index, key
                want = getattr(getattr(model.layers[i].experts, proj), buf)
                assert torch.equal(mini.weights[key], want), key
    assert mini.weights["layers.0.experts.gate_up_proj.qweight"].dtype == torch.uint8


@torch.no_grad()
def test_so_logits_match_eager_prefill_and_decode(tiny_moe_artifact, mini):
    """Chunked prefill (grouped experts path) then decode (top-k gather path): each step within
    1e-3 relative of the eager model with the same int4 experts."""
    model = tiny_moe_artifact.fresh_model()
    model.reset_cache()
    for t in mini.kv.values():
        t.zero_()
    ids = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    errors = []
    for start, end in [(0, 12), (12, 21)]:  # chunks longer than the window (8)
        piece = ids[:, start:end]
        errors.append(_rel(mini.prefill(piece, start), model(piece, torch.tensor([start]))))
    for p in range(21, 30):
        tok = ids[:, p:p + 1]
        errors.append(_rel(mini.decode(tok, p), model(tok, torch.tensor([p]))))
    assert max(errors) < 1e-3, errors
