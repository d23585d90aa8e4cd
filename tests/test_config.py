"""Config parsing from raw config.json (text-only and multimodal) and the presets."""

import json
from pathlib import Path

import pytest

from export.gemma4.config import FULL, PRESETS, ConfigError, Gemma4Config

REAL = Path(__file__).parent / "data" / "gemma4_text_configs.json"  # the four published text configs
NAMES = {"gemma-4-31B": "31b", "gemma-4-26B-A4B": "26b-a4b", "gemma-4-E4B": "e4b", "gemma-4-E2B": "e2b"}


@pytest.mark.parametrize("hf_name", list(NAMES))
def test_real_configs_parse_to_presets(hf_name):
    raw = json.loads(REAL.read_text())[hf_name]
    assert Gemma4Config.from_hf_dict(raw) == PRESETS[NAMES[hf_name]]
    nested = {"model_type": "gemma4", "text_config": raw, "vision_config": {}}
    assert Gemma4Config.from_hf_dict(nested) == PRESETS[NAMES[hf_name]]


@pytest.mark.parametrize("name", ["31b", "26b-a4b", "e4b", "e2b", "tiny", "tiny-moe"])
def test_per_layer_geometry_matches_transformers(name):
    """Head dims, KV heads and KV sharing as transformers derives them from the same dict."""
    from transformers import Gemma4TextConfig

    cfg = PRESETS[name]
    hf = Gemma4TextConfig(**cfg.to_hf_dict())
    for i in range(cfg.num_hidden_layers):
        lc = hf.per_layer_config[i]
        assert cfg.layer_head_dim(i) == lc.head_dim, i
        assert cfg.layer_kv_heads(i) == lc.num_key_value_heads, i
    assert hf.layer_types == list(cfg.layer_types)


def test_known_shapes_and_sharing():
    e2b = PRESETS["e2b"]
    assert e2b.kv_source_layer(34) == 14 and e2b.kv_source_layer(33) == 13  # last non-shared of each type
    assert e2b.layer_intermediate_size(34) == 2 * 6144 and e2b.layer_intermediate_size(0) == 6144
    b31 = PRESETS["31b"]
    assert (b31.layer_kv_heads(5), b31.layer_head_dim(5)) == (4, 512)
    assert (b31.layer_kv_heads(0), b31.layer_head_dim(0)) == (16, 256)
    assert b31.with_layers(6).layer_types.count(FULL) == 1


def test_errors_are_clear(tmp_path):
    with pytest.raises(KeyError, match="unknown preset 'nope'"):
        Gemma4Config.from_name("nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Gemma4Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Gemma4Config.from_json(tmp_path)
    for other in ("llama", "gemma3", "gemma3_text"):  # another model's config: named as such, not a missing field
        (tmp_path / "config.json").write_text(json.dumps({"model_type": other, "hidden_size": 64}))
        with pytest.raises(ConfigError, match=f"model_type '{other}' is not Gemma 4"):
            Gemma4Config.from_json(tmp_path)


@pytest.mark.parametrize("hf_name", list(NAMES))
def test_real_configs_roundtrip_through_transformers_save(hf_name, tmp_path):
    """transformers' save_pretrained writes per_layer_config instead of global_head_dim /
    num_global_key_value_heads; both forms parse to the same preset."""
    from transformers import Gemma4TextConfig

    raw = json.loads(REAL.read_text())[hf_name]
    Gemma4TextConfig(**raw).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    assert "num_global_key_value_heads" not in saved
    assert Gemma4Config.from_json(tmp_path) == PRESETS[NAMES[hf_name]]


@pytest.mark.parametrize("field", ["hidden_size", "num_key_value_heads", "head_dim", "layer_types",
                                   "intermediate_size", "global_head_dim", "hidden_size_per_layer_input"])
def test_missing_shape_field_is_named_with_the_file(field, tmp_path):
    raw = json.loads(REAL.read_text())["gemma-4-E4B"]
    raw.pop(field)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": raw}))
    with pytest.raises(ConfigError, match=rf"config\.json \(text_config\) lacks {field}\b"):
        Gemma4Config.from_json(tmp_path)


def test_conditional_shape_fields_and_bad_per_layer_config():
    e4b = json.loads(REAL.read_text())["gemma-4-E4B"]
    with pytest.raises(ConfigError, match="lacks vocab_size_per_layer_input"):  # PLE on
        Gemma4Config.from_hf_dict({k: v for k, v in e4b.items() if k != "vocab_size_per_layer_input"})
    moe = json.loads(REAL.read_text())["gemma-4-26B-A4B"]
    with pytest.raises(ConfigError, match="lacks moe_intermediate_size"):
        Gemma4Config.from_hf_dict({k: v for k, v in moe.items() if k != "moe_intermediate_size"})
    tiny = {k: v for k, v in PRESETS["tiny"].to_hf_dict().items() if k != "global_head_dim"}
    with pytest.raises(ConfigError, match="per_layer_config overrides sliding layer 0"):
        Gemma4Config.from_hf_dict({**tiny, "per_layer_config": {"0": {"head_dim": 8}}})
    with pytest.raises(ConfigError, match="different geometry"):
        Gemma4Config.from_hf_dict({**tiny, "per_layer_config": {"1": {"head_dim": 8}, "3": {"head_dim": 16}}})
    with pytest.raises(ConfigError, match="hidden_size must be a non-negative integer"):
        Gemma4Config.from_hf_dict({**tiny, "hidden_size": "64"})
    # an empty per_layer_config: full layers take the global head_dim and KV heads
    cfg = Gemma4Config.from_hf_dict({**tiny, "per_layer_config": {}})
    assert cfg.global_head_dim == cfg.head_dim and cfg.num_global_key_value_heads is None
