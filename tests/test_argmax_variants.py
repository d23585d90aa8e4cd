"""scripts/argmax_variants.py: its arguments checked before it looks for a GPU."""

from __future__ import annotations

import pytest
import torch

from scripts import argmax_variants


@pytest.mark.parametrize("rows", ["3", "0", "a,b"])
def test_bad_rows_are_refused(rows, capsys):
    assert argmax_variants.main(["--rows", rows]) == 2
    assert "--rows" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: no GPU to time")
def test_no_gpu_is_said():
    assert argmax_variants.main(["--rows", "512"]) == 2
