"""The model as a chain of compiled units (export/chain.py): each distinct layer compiled once,
run as every layer of its kind with that layer's own tensors.

CPU: the split (which units, which renames), the units run eagerly in chain order against the
whole model's forward (bitwise, fp32; int8 KV too), and a low-memory artifact of a 31B-like
model through the runner against its eager model and against the same model compiled whole."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from export.chain import WHOLE, Chain, Step
from export.gemma4.config import PRESETS, _pattern
from export.gemma4.model import EmbedUnit, Gemma4Model, HeadUnit, LayerUnit
from tests.helpers import randomize_, tiny_31b_like

LAYERS = 8  # 5 sliding, full, sliding, full (the last layer is full): two layer units


def config(layers: int = LAYERS):
    return replace(tiny_31b_like(), num_hidden_layers=layers, layer_types=_pattern(layers, 6))


def test_step_renames_only_its_prefix():
    step = Step("layer5", ("layers.5.", "layers.11."))
    assert step.model_key("layers.5.mlp.down_proj.qweight") == "layers.11.mlp.down_proj.qweight"
    assert step.model_key("inv_freq_full") == "inv_freq_full"
    assert step.model_key("layers.55.x") == "layers.55.x"  # another layer's prefix is not this one
    assert Step("embed").model_key("embed_tokens.weight") == "embed_tokens.weight"


def test_chain_names_its_programs_and_checks_its_units():
    chain = Chain({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}, (Step("a"), Step("b"), Step("b")))
    assert chain.programs("decode") == ["decode_a", "decode_b"]
    assert Chain.whole(torch.nn.Linear(2, 2)).programs("prefill") == ["prefill"]
    assert Chain.program("decode", WHOLE) == "decode"
    with pytest.raises(ValueError, match="lacks"):
        Chain({"a": torch.nn.Linear(2, 2)}, (Step("a"), Step("c")))


def test_31b_like_model_splits_into_one_unit_per_layer_kind():
    model = Gemma4Model(config(14), ctx=64, prefill_chunk=8)
    chain = model.chain()
    assert list(chain.units) == ["embed", "layer0", "layer5", "head"]
    assert isinstance(chain.units["embed"], EmbedUnit) and isinstance(chain.units["head"], HeadUnit)
    kinds = ["layer0" if model.cfg.is_sliding(i) else "layer5" for i in range(14)]
    assert kinds.count("layer5") == 3  # layers 5, 11 and the last
    assert [s.unit for s in chain.steps] == ["embed"] + kinds + ["head"]
    assert chain.steps[12].rename == ("layers.5.", "layers.11.")
    # a unit's tensors are the model's own, under the model's names
    unit = chain.units["layer5"]
    assert unit.get_parameter("layers.5.mlp.down_proj.weight") is model.layers[5].mlp.down_proj.weight


def test_models_that_pass_more_than_the_hidden_state_stay_whole():
    model = Gemma4Model(PRESETS["tiny"], ctx=32, prefill_chunk=4)  # per-layer embeddings, shared KV
    assert list(model.chain().units) == [WHOLE]


def moe_config():
    """The 26B-A4B's structure at toy size: a MoE block beside each dense MLP, no per-layer
    embeddings, no shared KV (so it splits like the 31B)."""
    return replace(PRESETS["tiny-moe"], num_hidden_layers=LAYERS, layer_types=_pattern(LAYERS, 6),
                   num_kv_shared_layers=0, hidden_size_per_layer_input=0, use_double_wide_mlp=False)


@pytest.mark.parametrize("kv_dtype,moe", [(None, False), ("int8", False), (None, True)])
@torch.no_grad()
def test_units_in_chain_order_give_the_models_logits(kv_dtype, moe):
    """Each layer as its own LayerUnit (the code a compiled unit runs), prefill chunks past the
    sliding window and decode steps: bitwise the whole forward's logits."""
    cfg = moe_config() if moe else config()
    assert list(Gemma4Model(cfg, ctx=64, prefill_chunk=12).chain().units) == ["embed", "layer0", "layer5", "head"]
    whole = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12, kv_dtype=kv_dtype), seed=1).eval()
    parts = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12, kv_dtype=kv_dtype), seed=1).eval()
    units = [EmbedUnit(parts)] + [LayerUnit(parts, i) for i in range(LAYERS)] + [HeadUnit(parts)]
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = 0
    for n in (12, 12, 5, 1, 1, 1):  # 3 chunks (the ring wraps: window 8), then decode
        tokens, start = ids[:, pos:pos + n], torch.tensor([pos])
        carry = tokens
        for unit in units:
            carry = unit(carry, start)
        assert torch.equal(carry, whole(tokens, start)), (pos, n)
        pos += n


def _export(tmp_path_factory, layer_units: bool):
    from export.gemma4.export import DeviceChoice, ExportConfig, export_model

    PRESETS["test-chain-31b-like"] = config()
    try:
        out = tmp_path_factory.mktemp("chain") / "art"
        return export_model(ExportConfig(preset="test-chain-31b-like", device=DeviceChoice.CPU, out=out, ctx=64,
                                         prefill_chunk=12, low_memory=True, layer_units=layer_units))
    finally:
        del PRESETS["test-chain-31b-like"]


@pytest.fixture(scope="module")
def chain_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=True)


@pytest.fixture(scope="module")
def whole_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=False)


def _logits(out, ids: list[int]) -> list[torch.Tensor]:
    """Through the runner: 3 prefill chunks (the ring wraps), then 3 decode steps."""
    from runtime.runner import Runner

    runner, pos, out_logits = Runner.load(out), 0, []
    for n in (12, 12, 5, 1, 1, 1):
        out_logits.append(runner.prefill(ids[pos:pos + n]) if n > 1 else runner.decode(ids[pos]))
        pos += n
    return out_logits


def test_artifact_steps_bind_each_layers_own_tensors(chain_artifact):
    meta = chain_artifact.metadata
    for method in ("prefill", "decode"):
        steps = meta["methods"][method]["steps"]
        kinds = [0, 0, 0, 0, 0, 5, 0, 5]
        assert [s["program"] for s in steps] == ([f"{method}_embed"] + [f"{method}_layer{k}" for k in kinds]
                                                 + [f"{method}_head"])
        assert steps[0]["inputs"] == [0] and steps[1]["inputs"] == [0, 1]  # the embedding reads no position
        for i, step in enumerate(steps[1:-1]):
            keys = {k for k in step["constants"].values() if k.startswith("layers.")}
            assert keys and all(k.startswith(f"layers.{i}.") for k in keys), (i, sorted(keys)[:3])
            assert f"layers.{i}.layer_scalar" in keys  # a per-layer scalar is bound, not baked into the code


@torch.no_grad()
def test_artifact_chain_matches_its_eager_model(chain_artifact):
    model = chain_artifact.model
    model.reset_cache()
    ids = torch.randint(0, model.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    pos, errors = 0, []
    for n, got in zip((12, 12, 5, 1, 1, 1), _logits(chain_artifact.out_dir, ids)):
        want = model(torch.tensor([ids[pos:pos + n]]), torch.tensor([pos]))[0]
        errors.append(((got - want).norm() / want.norm()).item())  # a wrong layer's weights: O(1)
        pos += n
    assert max(errors) <= 1e-4, errors


@torch.no_grad()
def test_artifact_chain_gives_the_whole_graphs_logits(chain_artifact, whole_artifact):
    """The same model compiled whole (`--no-layer-units`): bitwise the same logits (fp32, CPU)."""
    assert [s["program"] for s in whole_artifact.metadata["methods"]["decode"]["steps"]] == ["decode"]
    ids = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    for a, b in zip(_logits(chain_artifact.out_dir, ids), _logits(whole_artifact.out_dir, ids)):
        assert torch.equal(a, b)
