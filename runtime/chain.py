"""A method as the runner runs it: a chain of steps over loaded programs (export/ARTIFACT.md).

Each step runs one compiled program on (*carry, pos) and hands its outputs on: they replace
the carry's first entries (an entry the program does not return passes unchanged, e.g. the
per-layer embeddings every layer reads). Token ids go in, the last step's first output (the
logits) comes out. A program that serves several steps (the unit of a layer
kind runs as every layer of that kind) gets each step's constants bound by name just before
it runs: the container keeps pointers only (`user_managed`), so a bind is a host-side table
update, and a CUDA graph captured around the chain records each launch with the pointers of
its own step. A program that serves one step is bound once.
"""

from __future__ import annotations

from collections import Counter

import torch

from runtime.aoti import CompiledMethod


class MethodChain:
    """Steps `(program, constants, inputs)` in run order (`inputs`: which of `carry + [pos]` the
    program takes, the position last); `run` has a CompiledMethod's signature."""

    def __init__(self, name: str, steps: list[tuple[CompiledMethod, dict[str, torch.Tensor], tuple[int, ...]]]):
        if not steps:
            raise ValueError(f"method {name} has no steps")
        self.name = name
        uses = Counter(id(p) for p, _, _ in steps)
        self.steps = [(p, c, tuple(i), uses[id(p)] > 1) for p, c, i in steps]
        for program, constants, _, shared in self.steps:
            if not shared:
                program.bind(constants)

    @property
    def programs(self) -> list[CompiledMethod]:
        return list({id(p): p for p, *_ in self.steps}.values())

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """inputs: [tokens, pos] -> [logits]; each step takes the entries of `carry + [pos]` it names."""
        *carry, pos = inputs
        for program, constants, takes, shared in self.steps:
            if shared:
                program.bind(constants)
            args = [*carry, pos]
            out = list(program.run([args[i] for i in takes]))
            carry = out + carry[len(out):]
        return carry[:1]
