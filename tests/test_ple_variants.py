"""scripts/ple_variants.py (the per-layer projection reading its row in place) without a GPU: its help, a
clear refusal of a preset without per-layer inputs, and of a machine without CUDA (its measurement runs on the
GPU machine: `bash scripts/measure_gpu.sh ple_fold`)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_script


def test_help_and_bad_models():
    r = run_script("scripts.ple_variants", "--help", timeout=120)
    assert r.returncode == 0 and "--models" in r.stdout
    r = run_script("scripts.ple_variants", "--models", "e2b,31b", timeout=120)
    assert r.returncode == 2 and "31b has no per-layer inputs" in r.stderr and "e4b" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU machine runs it for real")
def test_no_gpu_is_refused_with_a_message():
    r = run_script("scripts.ple_variants", timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr
