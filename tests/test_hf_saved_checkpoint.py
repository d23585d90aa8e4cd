"""A checkpoint exactly as transformers' own `save_pretrained` writes it: a multimodal
Gemma4ForConditionalGeneration (vision and audio towers beside the text decoder), its text
config in the `per_layer_config` form. It loads without reading a tower tensor and matches
transformers' logits at every position through chunked prefill and decode."""

import json

import pytest
import torch

from export.gemma4.checkpoint import ShardReader, load_model
from tests.helpers import hf_logits_stream

SLIDING, FULL = "sliding_attention", "full_attention"


def _randomize_hf_(model: torch.nn.Module, seed: int) -> None:
    """Random weights; 1-D weights (norms) and layer_scalar moved off 1 so a missed multiply shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=g))


def _stream_errors(model, hf, steps: list[int], seed: int) -> list[float]:
    """Random tokens fed to both in chunks of `steps` (prefill chunks, then decode steps): each chunk's
    last-position logits, max abs difference over transformers' max."""
    tokens = torch.randint(0, 384, (1, sum(steps)), generator=torch.Generator().manual_seed(seed))
    errs, start = [], 0
    for n, ref in zip(steps, hf_logits_stream(hf, tokens, steps)):
        ours = model(tokens[:, start:start + n], torch.tensor([start]))
        start += n
        errs.append(((ours - ref).abs().max() / ref.abs().max()).item())
    return errs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=48, num_global_key_value_heads=1, attention_k_eq_v=True,  # full head_dim != 512
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL], sliding_window=8,
        max_position_embeddings=4096, final_logit_softcapping=30.0,
        num_kv_shared_layers=2, use_double_wide_mlp=True,  # KV sharing
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=384)  # PLE
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                 output_proj_dims=32)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)
    cfg.text_config._attn_implementation = "eager"
    hf = Gemma4ForConditionalGeneration(cfg).eval()
    _randomize_hf_(hf, seed=3)
    out = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(out, max_shard_size="200KB")  # several shards
    return out, hf


def test_saved_config_is_the_per_layer_form(saved):
    raw = json.loads((saved[0] / "config.json").read_text())
    assert {"vision_config", "audio_config"} <= raw.keys()
    text = raw["text_config"]
    assert "global_head_dim" not in text and "num_global_key_value_heads" not in text
    assert text["per_layer_config"]["2"] == {"head_dim": 48, "num_key_value_heads": 1}


@torch.no_grad()
def test_loads_without_towers_and_matches_transformers(saved, monkeypatch):
    path, hf = saved
    read = []
    orig = ShardReader.read
    monkeypatch.setattr(ShardReader, "read", lambda self, key: read.append(self.index.prefix + key) or orig(self, key))
    chunk = 5
    model = load_model(path, ctx=96, prefill_chunk=chunk, dtype=torch.float32).eval()
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any("vision_tower" in k for k in index) and any("audio_tower" in k for k in index)
    assert read and all(k.startswith("model.language_model.") for k in read)
    assert model.cfg.layer_head_dim(2) == 48 and model.cfg.layer_kv_heads(2) == 1

    steps = [5, 3, 5, 1] + [1] * (3 * model.ring_size + 4)  # prefill chunks, then decode past each ring
    errs = _stream_errors(model, hf, steps, seed=4)
    assert max(errs) <= 1e-4, errs


@torch.no_grad()
def test_every_prompt_position_as_the_end_of_a_prefill_chunk(saved):
    """The model returns the last position's logits; restart the sequence so that each prompt
    position in turn ends a prefill chunk (chunks of up to 5, the last one shorter)."""
    path, hf = saved
    model = load_model(path, ctx=96, prefill_chunk=5, dtype=torch.float32).eval()
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(5))
    errs = []
    for end in range(1, tokens.shape[1] + 1):
        steps = [5] * ((end - 1) // 5) + [end - 5 * ((end - 1) // 5)]
        model.reset_cache()
        start = 0
        for n, ref in zip(steps, hf_logits_stream(hf, tokens[:, :end], steps)):
            ours = model(tokens[:, start:start + n], torch.tensor([start]))
            start += n
        errs.append(((ours - ref).abs().max() / ref.abs().max()).item())
    assert len(errs) == 16 and max(errs) <= 1e-4, errs


@torch.no_grad()
def test_moe_checkpoint_saved_by_transformers_matches_it(tmp_path):
    """The 26B-A4B's form (a dense MLP beside routed experts, k_eq_v full layers) as transformers' own
    Gemma4ForCausalLM writes it (`model.layers.*`, the experts as stacked `experts.gate_up_proj` /
    `experts.down_proj`, the router's `proj`, `scale` and `per_expert_scale`): loaded, it gives
    transformers' logits through chunked prefill and decode."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, layer_types=[SLIDING, SLIDING, SLIDING, FULL], sliding_window=8,
        max_position_embeddings=4096, final_logit_softcapping=30.0, enable_moe_block=True, num_experts=8,
        top_k_experts=2, moe_intermediate_size=32, hidden_size_per_layer_input=0)
    cfg._attn_implementation = "eager"
    hf = Gemma4ForCausalLM(cfg).eval()
    _randomize_hf_(hf, seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.experts.gate_up_proj" in index and "model.layers.0.router.per_expert_scale" in index
    model = load_model(tmp_path, ctx=96, prefill_chunk=5, dtype=torch.float32).eval()
    assert model.cfg.enable_moe_block and model.cfg.num_experts == 8
    errs = _stream_errors(model, hf, [5, 3] + [1] * 12, seed=6)
    assert max(errs) <= 1e-4, errs


@torch.no_grad()
def test_untied_head_saved_by_transformers_loads(tmp_path):
    """A fine-tune with its own lm_head (tie_word_embeddings false): transformers' Gemma4ForCausalLM writes the head
    at the top level (`lm_head.weight`, beside `model.*`); it loads and gives transformers' logits."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[SLIDING, FULL], sliding_window=8,
        max_position_embeddings=4096, hidden_size_per_layer_input=0, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    hf = Gemma4ForCausalLM(cfg).eval()
    _randomize_hf_(hf, seed=7)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" in _saved_keys(tmp_path)
    model = load_model(tmp_path, ctx=96, prefill_chunk=5, dtype=torch.float32).eval()
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    errs = _stream_errors(model, hf, [5, 1, 1], seed=8)
    assert max(errs) <= 1e-4, errs


def _saved_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())
