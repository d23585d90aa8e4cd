"""scripts/gemv1_early_variants.py (a GPU measuring tool): the chain it times is E2B / E4B's small
projections, those after q / k / v on the small weights' branch (bf16 x, one launch), which EARLY changes
(E2B's q / k / v too)."""

from __future__ import annotations

import pytest
import torch

from export.gemma4.config import PRESETS
from export.kernels import int4_matmul as im
from scripts.gemv1_early_variants import layer_weights


@pytest.mark.parametrize("name", ["e2b", "e4b"])
def test_the_timed_layer_is_the_models_small_projections(name):
    cfg = PRESETS[name]
    w = layer_weights(cfg, torch.device("cpu"))  # asserts the small branch after q / k / v
    assert im.gemv1_plan(im.unpack_int4(w["qkv"][0]).shape[0], cfg.hidden_size, 128).xq == (name == "e4b")
    H, P = cfg.hidden_size, cfg.hidden_size_per_layer_input
    assert im.unpack_int4(w["gate"][0]).shape == (P, H) and im.unpack_int4(w["proj"][0]).shape == (H, P)
    assert im.unpack_int4(w["o"][0]).shape == (H, cfg.num_attention_heads * cfg.layer_head_dim(0))
    assert w["table"].shape == (1, cfg.num_hidden_layers, P)


def test_the_export_switch_turns_the_early_tiles_off():
    """GEMMA4_GEMV1_EARLY=0 in an exporting process (scripts/export_ab.py's A/B) compiles the small weights' GEMV
    waiting first; unset, the early tiles are the default."""
    import os
    import subprocess
    import sys

    code = "from export.kernels import int4_matmul as im; print(im.GEMV1_EARLY)"
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_GEMV1_EARLY"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   timeout=120).stdout.strip()
    assert run(env) == "True" and run({**env, "GEMMA4_GEMV1_EARLY": "0"}) == "False"
