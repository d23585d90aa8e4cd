"""Pass (exporter side, before `to_edge`): the exported programs let go of their constants' bytes.

`torch.export` hands back programs whose state dict holds the eager model's own weight
tensors. ExecuTorch 1.2 deep-copies every program while lowering (in
`_gen_edge_manager_for_partitioners` and again in `lower_all_submodules_to_backend`), i.e.
more host copies of every weight and KV buffer, held through the compile: 13 GiB of host
RSS for the 4.3 GiB 31B 2-layer slice on CPU. A low-memory export never needs those bytes
while lowering: the backend's `make_constants_zero_byte` swaps every constant for a
zero-byte device tensor anyway, and the artifact writer reads weights from the eager model
by FQN. So, right after `torch.export`, the same swap runs on the constants' own device
(`release_constant_bytes`), and the deep copies copy no bytes. The eager model is
untouched. Tensor-subclass weights (torchao's CUDA int4, unwrapped only inside to_edge)
keep their bytes for now: ExecuTorch still copies those.

`nn.Parameter.__deepcopy__` clones the data, which for a zero-byte tensor reads bytes that
do not exist (a segfault on the host), and the verifier insists on Parameters, so lowering
runs inside `zero_byte_deepcopy()`: there, a zero-byte Parameter deep-copies into another
zero-byte Parameter with the same registered byte source.

Invariant for what follows: the backend pass receives zero-byte constants and moves them
to the target device as zero-byte tensors (KV -> ZEROS by mutation analysis, weights ->
HOST; the host bytes of a weight are the eager model's, which `host_bytes` does not have:
asking fails loudly instead of serializing garbage).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.export import ExportedProgram

from export.passes.make_constants_zero_byte import make_constants_zero_byte
from export.passes.zero_byte import ByteSource, byte_source, is_zero_byte, zero_byte_like


def release_constant_bytes(program: ExportedProgram) -> ExportedProgram:
    """Swap `program`'s large constants for zero-byte tensors on their own device (in place)."""
    devices = {v.device for v in list(program.state_dict.values()) + list(program.constants.values())
               if isinstance(v, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"release_constant_bytes: expected constants on one device, found {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return make_constants_zero_byte(program, str(device), include_weights=True)


@contextlib.contextmanager
def zero_byte_deepcopy() -> Iterator[None]:
    """Inside the block, deep-copying a zero-byte Parameter copies no bytes."""
    original = torch.nn.Parameter.__deepcopy__

    def __deepcopy__(self, memo):
        if not is_zero_byte(self):
            return original(self, memo)
        if id(self) in memo:
            return memo[id(self)]
        found = byte_source(self)
        copy = zero_byte_like(self, self.device, found[0] if found else ByteSource.HOST)
        memo[id(self)] = copy
        return copy

    torch.nn.Parameter.__deepcopy__ = __deepcopy__
    try:
        yield
    finally:
        torch.nn.Parameter.__deepcopy__ = original
