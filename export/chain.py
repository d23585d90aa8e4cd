"""A model as a chain of compiled units, so that repeated layers compile once.

A decoder is an embedding, N layers and a head. Compiling the whole graph makes Inductor (and
ExecuTorch's passes before it) lower every layer again although most layers are the same
code on other weights: the lowering grows with depth. A `Chain` instead names each distinct
piece once (a *unit*: an `nn.Module` holding its own weights) and lists the *steps* that run
it: a step is a unit plus the renaming that turns the unit's FQNs into the model's, e.g. the
unit exported from layer 5 runs as layer 11 with `layers.5.` read as `layers.11.`. Each unit
is exported and compiled once per method; the runner binds each step's weights (and KV
buffers) by name before running it.

The carry is a list of tensors, each `[1, T, ...]`: every unit takes `(*carry, pos)` and
returns one tensor or a tuple, which replaces the carry's first entries (the carry grows when a
unit returns more than it holds; an entry a unit does not return passes on unchanged, so no
compiled program has to return an input). The first unit's carry is the token ids `[1, T]`
int64; the method's result is the last unit's first output (the logits). A unit that takes
another carry (hidden states, say; a tuple for several) says so with `example_carry(T)`. A
whole model is the one-step chain `Chain.whole(model)`, compiled as before under the method's
own name.

Model-agnostic: the pipeline exports `units` and maps each step's constants (export/constants.py);
the model decides how it splits (export/gemma4/model.py `Gemma4Model.chain`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

WHOLE = "whole"  # the unit name of a one-step chain: its programs keep the method names


@dataclass(frozen=True)
class Step:
    """One run of `unit`; `rename` maps unit FQN prefixes to the model's, `(unit prefix, model
    prefix)` pairs, the first match wins (a layer's own tensors, and the cache it reads when
    that is another layer's: KV sharing); no match: the same name."""

    unit: str
    rename: tuple[tuple[str, str], ...] = ()

    def model_key(self, unit_key: str) -> str:
        """The model's FQN of a tensor the unit calls `unit_key`."""
        for prefix, to in self.rename:
            if unit_key.startswith(prefix):
                return to + unit_key[len(prefix):]
        return unit_key


@dataclass
class Chain:
    units: dict[str, nn.Module]  # unit name -> module (sharing the model's tensors)
    steps: tuple[Step, ...]

    def __post_init__(self):
        missing = {s.unit for s in self.steps} - set(self.units)
        if missing or not self.steps:
            raise ValueError(f"chain steps name units it lacks: {sorted(missing)}" if missing else "empty chain")

    @staticmethod
    def whole(model: nn.Module) -> "Chain":
        return Chain({WHOLE: model}, (Step(WHOLE),))

    @staticmethod
    def program(method: str, unit: str) -> str:
        """The ExecuTorch method (and `.so`) compiled from `unit` for `method`."""
        return method if unit == WHOLE else f"{method}_{unit}"

    @staticmethod
    def method_of(program: str) -> str:
        """The method a program was compiled for (the inverse of `program`; method names hold no "_")."""
        return program.split("_", 1)[0]

    def programs(self, method: str) -> list[str]:
        """`method`'s programs in step order, each once."""
        return list(dict.fromkeys(self.program(method, s.unit) for s in self.steps))


def example_inputs(unit: nn.Module, T: int) -> tuple[torch.Tensor, ...]:
    """(*carry, pos) to trace `unit` with a chunk of T tokens (dim 1 of each carry tensor is T)."""
    dev = next(unit.buffers(), None)
    dev = dev.device if dev is not None else next(unit.parameters()).device
    make = getattr(unit, "example_carry", None)
    carry = make(T) if make is not None else torch.zeros(1, T, dtype=torch.long, device=dev)
    carry = carry if isinstance(carry, tuple) else (carry,)
    return (*carry, torch.zeros(1, dtype=torch.long, device=dev))


def advance(carry: list[torch.Tensor], out: torch.Tensor | tuple | list) -> list[torch.Tensor]:
    """The carry after a unit returned `out`: its outputs replace the first entries."""
    out = list(out) if isinstance(out, (tuple, list)) else [out]
    return out + list(carry[len(out):])


def run_units(units: list[nn.Module], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Run `units` eagerly in chain order on (tokens, pos): the method's result (for tests)."""
    carry = [tokens]
    for unit in units:
        carry = advance(carry, unit(*carry, pos))
    return carry[0]
