"""The constant table of a compiled method, and its resolution to `.ptd` keys.

Each AOTInductor `.so` names its constants (weights, buffers, tensors tracing made) its own
way; the backend records that table (`ConstantInfo`, one `CompiledMethod` per method) and
`plan_ptd` maps every entry to a tensor of the eager model by FQN, so each weight is written
once and both methods bind it. Model-agnostic: this is the artifact contract of
export/ARTIFACT.md ("Keys", "Binding").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn


class TargetDevice(str, enum.Enum):
    """Where the compiled `.so` runs."""

    CUDA = "cuda"
    CPU = "cpu"


class ConstantKind(str, enum.Enum):
    """How Inductor classified a constant (same rule as its AOTI codegen)."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    TENSOR_CONSTANT = "tensor_constant"


@dataclass(frozen=True)
class ConstantInfo:
    """One AOTI constant of a compiled method, as the `.so` names and expects it."""

    name: str  # AOTI constant name (what update_constant_buffer takes)
    fqn: str  # original FQN in the eager model, as get_constant_names_to_original_fqns reports
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    kind: ConstantKind
    # For TENSOR_CONSTANT only (small tensors tracing made, with no module FQN): a CPU copy
    # of the value, since the exporter's state dict cannot provide it.
    value: torch.Tensor | None = None


@dataclass(frozen=True)
class CompiledMethod:
    """What the backend's preprocess hands the exporter through `_delegate_info_meta`."""

    method: str
    device: TargetDevice
    constants: tuple[ConstantInfo, ...]
    so_size: int


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by FQN, aliases (tied weights) included."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _flat(name: str) -> str:
    """Compare names the way Inductor mangles them: dots to underscores, no export prefixes."""
    name = name.replace(".", "_")
    for prefix in ("L__self___", "p_", "b_"):
        name = name.removeprefix(prefix)
    return name


def _resolve(c: ConstantInfo, tensors: dict[str, torch.Tensor],
             flat: dict[str, str]) -> tuple[str, torch.Tensor] | None:
    """(.ptd key, tensor) for a compiled constant: its recorded FQN, else its mangled name."""
    for key in (c.fqn, flat.get(_flat(c.fqn)), flat.get(_flat(c.name))):
        if key is not None and key in tensors:
            return key, tensors[key]
    return None


def _check_matches(key: str, t: torch.Tensor, info: ConstantInfo) -> None:
    if t.dtype != info.dtype or tuple(t.shape) != info.shape:
        raise RuntimeError(f"{key}: model tensor is {tuple(t.shape)} {t.dtype}, the compiled .so expects "
                           f"{info.shape} {info.dtype}")
    if not t.is_contiguous() or tuple(t.stride()) != info.stride:
        raise RuntimeError(f"{key}: the .so expects strides {info.stride}, the tensor has {tuple(t.stride())}; "
                           "only contiguous constants are supported")


def plan_ptd(model: nn.Module, compiled: dict[str, CompiledMethod], kv_fqns: set[str],
             kv_in_ptd: bool) -> tuple[list, dict[str, dict[str, str]]]:
    """The .ptd tensors (`PtdTensor`s, each once, first-seen order) and, per method,
    constant -> .ptd key.

    KV buffers map to their FQN in every method (the runner binds its own allocation) and
    are written only with `kv_in_ptd` (as zeros).
    """
    from export.artifact import PtdTensor

    tensors = model_tensors(model)
    flat = {_flat(k): k for k in tensors}
    plan: dict[str, PtdTensor] = {}
    mapping: dict[str, dict[str, str]] = {}
    for method, cm in compiled.items():
        mapping[method] = {}
        for c in cm.constants:
            key = c.fqn
            if c.fqn in kv_fqns:
                if kv_in_ptd and key not in plan:
                    plan[key] = PtdTensor(key, c.shape, c.dtype, lambda c=c: torch.zeros(c.shape, dtype=c.dtype))
            elif (found := _resolve(c, tensors, flat)) is not None:
                key, t = found
                _check_matches(key, t, c)
                plan.setdefault(key, PtdTensor.of(key, t))
            elif c.kind is ConstantKind.TENSOR_CONSTANT and c.value is not None:
                key = f"{method}::{c.name}"
                plan[key] = PtdTensor.of(key, c.value.contiguous())
            else:
                raise RuntimeError(f"method {method}: AOTI constant {c.name} (FQN {c.fqn}) is not a model "
                                   "tensor; cannot store it in the .ptd")
            mapping[method][c.name] = key
    return list(plan.values()), mapping
