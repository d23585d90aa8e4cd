"""How compiled constants are matched to the model's tensors for the .ptd (no compile)."""

from __future__ import annotations

import torch

from export.constants import ConstantInfo, ConstantKind, _flat, _resolve


def _info(name: str, fqn: str, t: torch.Tensor) -> ConstantInfo:
    return ConstantInfo(name=name, fqn=fqn, dtype=t.dtype, shape=tuple(t.shape), stride=tuple(t.stride()),
                        kind=ConstantKind.PARAMETER)


def test_constants_resolve_by_fqn_or_by_mangled_name():
    """A constant resolves by its recorded FQN, else by Inductor's mangled name (dots to
    underscores, export prefixes dropped)."""
    tensors = {"blk.proj.weight": torch.randn(4, 3), "norm.weight": torch.ones(3)}
    flat = {_flat(k): k for k in tensors}
    assert _resolve(_info("norm_weight", "norm.weight", torch.ones(3)), tensors, flat)[0] == "norm.weight"
    key, got = _resolve(_info("L__self___blk_proj_weight", "p_blk_proj_weight", tensors["blk.proj.weight"]),
                        tensors, flat)
    assert key == "blk.proj.weight" and got is tensors["blk.proj.weight"]


def test_unknown_constant_does_not_resolve():
    assert _resolve(_info("other", "other", torch.ones(2)), {"w": torch.ones(2)}, {_flat("w"): "w"}) is None
