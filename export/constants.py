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

from export.chain import Chain


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
    # For TENSOR_CONSTANT and every small constant: a CPU copy of the value (the exporter's
    # state dict cannot provide a tensor that tracing made, with no module FQN).
    value: torch.Tensor | None = None


@dataclass(frozen=True)
class CompiledMethod:
    """What the backend's preprocess hands the exporter through `_delegate_info_meta`."""

    method: str
    device: TargetDevice
    constants: tuple[ConstantInfo, ...]
    so_size: int
    inputs: tuple[int, ...] = ()  # the .so's inputs: indices into the traced program's user inputs (() = all)


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


def _input_indices(cm: CompiledMethod) -> list[int]:
    """Which of its unit's (*carry, pos) the compiled program takes (() = all of a one-tensor carry)."""
    return list(cm.inputs) if cm.inputs else [0, 1]


def plan_ptd(model: nn.Module, compiled: dict[str, CompiledMethod], kv_fqns: set[str],
             kv_in_ptd: bool, chain: Chain | None = None,
             methods: tuple[str, ...] = ("prefill", "decode")) -> tuple[list, dict[str, list[dict]]]:
    """The .ptd tensors (`PtdTensor`s, each once, first-seen order) and, per method, its steps:
    `{"program": compiled program, "constants": {constant -> .ptd key}}` in run order.

    Each step's constants are the unit's, renamed to the model's FQNs (export/chain.py), so a
    unit compiled once binds every layer it runs as. KV buffers map to their FQN in every
    step (the runner binds its own allocation) and are written only with `kv_in_ptd` (as zeros).
    """
    from export.artifact import PtdTensor

    chain = chain if chain is not None else Chain.whole(model)
    tensors = model_tensors(model)
    unit_names = {u: model_tensors(m) for u, m in chain.units.items()}
    unit_flat = {u: {_flat(k): k for k in t} for u, t in unit_names.items()}
    plan: dict[str, PtdTensor] = {}
    steps: dict[str, list[dict]] = {}
    for method in methods:
        steps[method] = []
        for step in chain.steps:
            program = chain.program(method, step.unit)
            table = {}
            for c in compiled[program].constants:
                found = _resolve(c, unit_names[step.unit], unit_flat[step.unit])
                key = step.model_key(found[0] if found is not None else c.fqn)
                if key in kv_fqns:
                    if kv_in_ptd and key not in plan:
                        plan[key] = PtdTensor(key, c.shape, c.dtype, lambda c=c: torch.zeros(c.shape, dtype=c.dtype))
                elif found is not None and key in tensors:
                    t = tensors[key]
                    _check_matches(key, t, c)
                    plan.setdefault(key, PtdTensor.of(key, t))
                elif c.value is not None:  # made by tracing (no module tensor): its recorded value
                    key = f"{program}::{c.name}"
                    plan.setdefault(key, PtdTensor.of(key, c.value.contiguous()))
                else:
                    raise RuntimeError(f"{program}: AOTI constant {c.name} (FQN {c.fqn}) is not a model "
                                       "tensor; cannot store it in the .ptd")
                table[c.name] = key
            steps[method].append({"program": program, "constants": table,
                                  "inputs": _input_indices(compiled[program])})
    return list(plan.values()), steps
