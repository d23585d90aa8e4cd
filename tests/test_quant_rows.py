"""The row-block form used to pack the vocab-sized lm_head on the GPU a block at a time."""

import torch

from export.gemma4.quant import split_rows


def test_split_rows_is_the_same_linear():
    lin = torch.nn.Linear(32, 100, bias=False)
    parts = split_rows(lin, 24)
    assert [p.out_features for p in parts.parts] == [24, 24, 24, 24, 4]
    assert parts.parts[1].weight.data_ptr() == lin.weight[24:].data_ptr()  # views, no copy
    x = torch.randn(3, 32)
    torch.testing.assert_close(parts(x), lin(x), rtol=0, atol=0)
