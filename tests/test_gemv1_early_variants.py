"""scripts/gemv1_early_variants.py (a GPU measuring tool): the chain it times is E2B / E4B's small
projections, those after q / k / v on the small weights' branch (bf16 x, one launch), which its switches (EARLY,
STAGE) change (E2B's q / k / v too)."""

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
    # E4B's q / k / v (3072 x 2560) takes the staged tiles' one bf16-x launch too; without them x as levels
    assert not im.gemv1_plan(im.unpack_int4(w["qkv"][0]).shape[0], cfg.hidden_size, 128).xq
    H, P = cfg.hidden_size, cfg.hidden_size_per_layer_input
    assert im.unpack_int4(w["gate"][0]).shape == (P, H) and im.unpack_int4(w["proj"][0]).shape == (H, P)
    assert im.unpack_int4(w["o"][0]).shape == (H, cfg.num_attention_heads * cfg.layer_head_dim(0))
    assert w["table"].shape == (1, cfg.num_hidden_layers, P)


@pytest.mark.parametrize("name,unset,flipped", [("EARLY", "True", ("0", "False")), ("STAGE", "True", ("0", "False"))])
def test_the_export_switches(name, unset, flipped):
    """GEMMA4_GEMV1_EARLY=0 in an exporting process (scripts/export_ab.py's A/B) compiles the small weights' GEMV
    waiting first (unset, the early tiles are the default); GEMMA4_GEMV1_STAGE=0 has each row of threads compute x
    (unset, x once a program is the default)."""
    import os
    import subprocess
    import sys

    code = f"from export.kernels import int4_matmul as im; print(im.GEMV1_{name})"
    env = {k: v for k, v in os.environ.items() if k != f"GEMMA4_GEMV1_{name}"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   timeout=120).stdout.strip()
    assert run(env) == unset and run({**env, f"GEMMA4_GEMV1_{name}": flipped[0]}) == flipped[1]


def test_the_script_takes_either_switch():
    """--switch names an `int4_gemv1` argument: the layer passes it to every GEMV of the chain."""
    from scripts import gemv1_early_variants as ev

    class Stop(Exception):
        pass

    seen = []

    def spy(*args, **kw):  # records the first GEMV's switches, then stops the layer (no kernel runs)
        seen.append({k: kw[k] for k in ("early", "stage") if k in kw})
        raise Stop

    cfg = PRESETS["e2b"]
    w = ev.layer_weights(cfg, torch.device("cpu"))
    real, im.int4_gemv1 = im.int4_gemv1, spy
    try:
        with pytest.raises(Stop):
            ev.layer(torch.randn(1, cfg.hidden_size).bfloat16(), w, {"stage": True})
    finally:
        im.int4_gemv1 = real
    assert seen == [{"stage": True}], seen
    assert set(ev.KEYS) == {"early", "stage"}
