"""scripts/argmax_variants.py: its arguments checked before it looks for a GPU; its two-reduction argmax."""

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


@pytest.mark.parametrize("rows", [1, 8, 64, 512])
def test_greedy_token_is_argmax_first_index(rows):
    """The two-reduction argmax gives argmax's token: the first index of the largest, ties across and within
    rows, -inf around it, a vocab the rows do not divide (argmax itself)."""
    g = torch.Generator().manual_seed(rows)
    for n in (4096, 4096 + 8, 262144):
        x = torch.randn(n, generator=g) * 3
        x[: n // 3] = float("-inf")
        i = int(torch.randint(n // 3, n - 10, (1,), generator=g))
        x[i] = x.max() + 1
        for tie in (i + 1, n - 1, (i + n // 2) % n):  # within its row, at the end, maybe an earlier row
            y = x.clone()
            y[tie] = y[i]
            got = argmax_variants.greedy_token(y, rows=rows)
            assert got.dtype == torch.int64 and got.shape == (1,)
            assert int(got) == int(y.argmax()) == min(i, tie)
