"""Loading HF-layout checkpoints written by scripts/make_checkpoint.py."""

import json

import pytest
import torch

from export.gemma4.checkpoint import CheckpointError, ShardReader, load_model
from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.model import Gemma4Model
from scripts.make_checkpoint import main as make_checkpoint_main
from scripts.make_checkpoint import random_tensors, write_checkpoint
from tests.helpers import randomize_

CFG = PRESETS["tiny-moe"]


def checkpoint_tensors(model):
    sd = model.state_dict()
    sd.pop("lm_head.weight")  # tied
    return list(sd.items())


@pytest.fixture(scope="module")
def source_model():
    return randomize_(Gemma4Model(CFG, ctx=64, prefill_chunk=4), seed=5).eval()


@pytest.mark.parametrize("multimodal", [False, True])
def test_load_reproduces_model_exactly(tmp_path, source_model, multimodal, monkeypatch):
    write_checkpoint(tmp_path, CFG, checkpoint_tensors(source_model), torch.float32,
                     multimodal=multimodal, shard_bytes=200_000)  # several shards
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    read = []
    orig = ShardReader.read
    monkeypatch.setattr(ShardReader, "read", lambda self, key: read.append(key) or orig(self, key))
    loaded = load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32).eval()

    assert not any("vision" in k for k in read)
    want, got = source_model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    tokens = torch.randint(0, CFG.vocab_size, (1, 4))
    with torch.no_grad():
        got, want = loaded(tokens, torch.tensor([0])), source_model(tokens, torch.tensor([0]))
    # weights are bit-identical (above); logits may differ in the last bit because memory-
    # mapped tensors have another alignment, which changes CPU reduction order
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kv_shared_projection_weights_are_skipped(tmp_path, source_model):
    extra = [(f"layers.{i}.self_attn.k_proj.weight", torch.zeros(4, 4))
             for i in range(CFG.num_hidden_layers) if CFG.is_kv_shared(i)]
    assert extra
    write_checkpoint(tmp_path, CFG, checkpoint_tensors(source_model) + extra, torch.float32)
    load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32)


@pytest.mark.parametrize("problem,pattern", [
    ("missing", r"model\.layers\.1\.mlp\.up_proj\.weight is missing"),
    ("extra", r"model-\d+\.safetensors: unexpected tensor model\.layers\.0\.mlp\.bogus"),
    ("shape", r"model-\d+\.safetensors: model\.norm\.weight has shape \(3,\)"),
])
def test_bad_checkpoints_name_key_and_shard(tmp_path, source_model, problem, pattern):
    tensors = dict(checkpoint_tensors(source_model))
    if problem == "missing":
        tensors.pop("layers.1.mlp.up_proj.weight")
    elif problem == "extra":
        tensors["layers.0.mlp.bogus"] = torch.zeros(2)
    else:
        tensors["norm.weight"] = torch.zeros(3)
    write_checkpoint(tmp_path, CFG, tensors.items(), torch.float32)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope", ctx=64, prefill_chunk=4)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path, ctx=64, prefill_chunk=4)


def test_make_checkpoint_cli_slice_roundtrip(tmp_path):
    out = tmp_path / "e4b2"
    make_checkpoint_main(["--preset", "tiny", "--layers", "4", "--dtype", "float32", "--out", str(out)])
    cfg = Gemma4Config.from_json(out)
    assert cfg == PRESETS["tiny"].with_layers(4)
    model = load_model(out, ctx=32, prefill_chunk=4, dtype=torch.float32)
    want = dict(random_tensors(cfg, seed=0))
    assert torch.equal(model.state_dict()["layers.0.self_attn.q_proj.weight"], want["layers.0.self_attn.q_proj.weight"])
    assert (out / "tokenizer.json").is_file()
    # transformers reads the written config the same way (it is the parity oracle)
    from transformers import Gemma4TextConfig
    hf = Gemma4TextConfig(**json.loads((out / "config.json").read_text()))
    assert hf.num_hidden_layers == 4 and hf.layer_types[-1] == "full_attention"


def test_unit_hook_sees_each_unit_once_in_order(tmp_path, source_model):
    write_checkpoint(tmp_path, CFG, checkpoint_tensors(source_model), torch.float32)
    seen = []

    def hook(model, name):
        seen.append(name)
        # everything loaded so far is real, everything after is still on meta
        assert not any(p.is_meta for p in model.get_submodule(name).parameters())
        if name == "embed_tokens":  # a quantizer may replace the embedding: the tied head must still load
            model.embed_tokens = torch.nn.Embedding(CFG.vocab_size, CFG.hidden_size)

    loaded = load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32, on_unit_loaded=hook)
    assert seen[0] == "embed_tokens" and seen[-1] == "lm_head"
    assert seen.count("layers.0") == 1 and len(seen) == len(set(seen))
    assert torch.equal(loaded.lm_head.weight, source_model.embed_tokens.weight)


def test_a_replaced_embedding_table_is_let_go_before_the_layers_load(tmp_path, source_model):
    """A hook that replaces the embedding (int8) leaves no reference to the float table while the
    layers load (on the 31B that reference held 2.6 GiB of host memory to the end); the tied
    head reads the table again."""
    import gc
    import weakref

    write_checkpoint(tmp_path, CFG, checkpoint_tensors(source_model), torch.float32)
    table = []

    def hook(model, name):
        if name == "embed_tokens":
            table.append(weakref.ref(model.embed_tokens.weight))
            model.embed_tokens = torch.nn.Embedding(CFG.vocab_size, CFG.hidden_size)
        elif name == "layers.0":
            gc.collect()
            assert table[0]() is None, "the float embedding table is still held while the layers load"

    loaded = load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32, on_unit_loaded=hook)
    assert torch.equal(loaded.lm_head.weight, source_model.embed_tokens.weight)


def test_untied_head_is_written_and_read_where_transformers_puts_it(tmp_path):
    """make_checkpoint writes an untied head at the top level (`lm_head.weight`, beside `model.*`), as
    transformers' save_pretrained does, and the loader reads it there."""
    import dataclasses

    from safetensors import safe_open

    cfg = dataclasses.replace(CFG, tie_word_embeddings=False)
    write_checkpoint(tmp_path, cfg, random_tensors(cfg, seed=2), torch.float32)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in index and "model.lm_head.weight" not in index
    with safe_open(tmp_path / index["lm_head.weight"], "pt") as f:
        head = f.get_tensor("lm_head.weight")
    loaded = load_model(tmp_path, ctx=64, prefill_chunk=4, dtype=torch.float32)
    assert torch.equal(loaded.lm_head.weight, head)
    assert not torch.equal(loaded.lm_head.weight, loaded.embed_tokens.weight)


@pytest.mark.parametrize("shape", [(1001, 40), (7, 3), (5, 4, 48)])
def test_random_tensor_drawn_in_blocks_gives_one_draws_values(shape, monkeypatch):
    """make_checkpoint draws a large tensor in blocks of rows straight into its dtype: the values
    are those of one float32 draw, cast (blocks of 160 values here; 7 x 3 falls back to one draw)."""
    import zlib

    import scripts.make_checkpoint as mc

    g = torch.Generator().manual_seed(zlib.crc32(b"3:w"))
    whole = torch.randn(shape, generator=g) * 0.02
    monkeypatch.setattr(mc, "DRAW_VALUES", 160)
    assert torch.equal(mc.random_tensor("w", shape, 3), whole)
    assert torch.equal(mc.random_tensor("w", shape, 3, dtype=torch.bfloat16), whole.to(torch.bfloat16))


@pytest.mark.parametrize("head_dim", [16, 256, 512])
def test_random_q_k_norm_weights_carry_the_score_scale(head_dim):
    """Presets' random q_norm / k_norm weights are drawn at head_dim^-1/4 of the other norms' U[0.5, 1.5)
    (Gemma 4's attention scaling is 1.0: at 1 random scores would have std sqrt(head_dim)); every
    other 1-D weight stays in U[0.5, 1.5)."""
    from export.gemma4.checkpoint import RandomWeights

    src, meta = RandomWeights(3), torch.empty(head_dim, device="meta")
    s = head_dim ** -0.25
    for key in ("layers.0.self_attn.q_norm.weight", "layers.4.self_attn.k_norm.weight"):
        w = src.read(key, meta, torch.float32)
        assert 0.5 * s <= w.min() and w.max() < 1.5 * s and w.std() > 0.1 * s, key
    w = src.read("layers.0.input_layernorm.weight", meta, torch.float32)
    assert 0.5 <= w.min() and w.max() < 1.5
    # the scores of random unit-variance q and k through those norms: of order 1, not sqrt(D)
    g = torch.Generator().manual_seed(0)
    qn = src.read("layers.0.self_attn.q_norm.weight", meta, torch.float32)
    kn = src.read("layers.0.self_attn.k_norm.weight", meta, torch.float32)
    scores = (torch.randn(512, head_dim, generator=g) * qn) @ (torch.randn(512, head_dim, generator=g) * kn).T
    assert 0.5 < scores.std() < 2.0
