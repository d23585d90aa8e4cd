"""Config parsing from raw config.json (text-only and multimodal) and the presets."""

import json
from pathlib import Path

import pytest

from export.gemma4.config import FULL, PRESETS, Gemma4Config

REAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gemma4_text_configs.json"
NAMES = {"gemma-4-31B": "31b", "gemma-4-26B-A4B": "26b-a4b", "gemma-4-E4B": "e4b", "gemma-4-E2B": "e2b"}


@pytest.mark.skipif(not REAL.is_file(), reason="shared/reference is not beside this checkout")
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
    with pytest.raises(ValueError, match="not valid JSON"):
        Gemma4Config.from_json(tmp_path)
