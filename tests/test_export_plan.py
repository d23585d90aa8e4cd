"""How compiled constants are matched to the model's tensors for the .ptd (no compile)."""

from __future__ import annotations

import torch
from torch import nn
from torch._functorch._aot_autograd.subclass_parametrization import UnwrapTensorSubclass
from torch.testing._internal.two_tensor import TwoTensor

from export.constants import ConstantInfo, ConstantKind
from export.constants import _flat, _resolve, _with_inner_tensors


def _info(name: str, fqn: str, t: torch.Tensor) -> ConstantInfo:
    return ConstantInfo(name=name, fqn=fqn, dtype=t.dtype, shape=tuple(t.shape), stride=tuple(t.stride()),
                        kind=ConstantKind.PARAMETER)


def test_subclass_parts_follow_torch_unwrap_order():
    """aot_compile names a subclass weight's parts `...parametrizations.weight.original{i}`
    (torch's UnwrapTensorSubclass); each must resolve to the same plain tensor under a
    readable `fqn.<inner>` key. Nested subclasses flatten depth-first."""
    a, b, c = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    lin = nn.Linear(3, 4, bias=False)
    lin.weight = nn.Parameter(TwoTensor(TwoTensor(a, b), c), requires_grad=False)
    torch_order = UnwrapTensorSubclass().right_inverse(lin.weight)
    tensors, aliases = _with_inner_tensors({"blk.proj.weight": lin.weight, "norm.weight": torch.ones(3)})
    flat = {_flat(k): k for k in [*tensors, *aliases]}
    for i, want in enumerate(torch_order):
        fqn = f"blk.proj.parametrizations.weight.original{i}"
        key, got = _resolve(_info(_flat(fqn), fqn, want), tensors, aliases, flat)
        assert got is want or torch.equal(got, want)
        assert key.startswith("blk.proj.weight.")
    assert sorted(k for k in tensors if k.startswith("blk.proj.weight.")) == \
        ["blk.proj.weight.a.a", "blk.proj.weight.a.b", "blk.proj.weight.b"]
    assert _resolve(_info("norm_weight", "norm.weight", torch.ones(3)), tensors, aliases, flat)[0] == "norm.weight"


def test_unknown_constant_does_not_resolve():
    tensors, aliases = _with_inner_tensors({"w": torch.ones(2)})
    assert _resolve(_info("other", "other", torch.ones(2)), tensors, aliases, {_flat("w"): "w"}) is None
