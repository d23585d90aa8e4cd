"""Low-memory mode for the AOTInductor backends: graph passes and Inductor patches.

The backend's preprocess (export/backends/aoti_base.py) calls, when low-memory is on:

    for p in low_memory_passes(options):      # before move_to_device_pass
        program = p(program)
    with low_memory_inductor_patches(options):
        torch._inductor.aot_compile(program.module(), ...)

`options` is a `LowMemoryOptions` or its `to_dict()` string form (compile specs). The
artifact writer asks `kv_buffer_fqns(program)` which constants are KV caches (to leave them
out of the `.ptd`, or to write zeros for them). Order and invariants: README.md here.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, ContextManager

from torch.export import ExportedProgram

# Submodules are imported as modules (a pass function named like its file would otherwise
# shadow the submodule as an attribute of this package).
from export.passes import chunk_int4_matmul as _chunk
from export.passes import inductor_patches as _patches
from export.passes import make_constants_zero_byte as _zero
from export.passes.options import LowMemoryOptions
from export.passes.zero_byte import is_zero_byte

__all__ = ["LowMemoryOptions", "low_memory_passes", "low_memory_inductor_patches", "kv_buffer_fqns",
           "is_zero_byte"]

ProgramPass = Callable[[ExportedProgram], ExportedProgram]


def _options(options: LowMemoryOptions | dict[str, str] | None) -> LowMemoryOptions:
    return options if isinstance(options, LowMemoryOptions) else LowMemoryOptions.from_dict(options)


def kv_buffer_fqns(program: ExportedProgram) -> set[str]:
    """FQNs of the KV-cache buffers: the buffers `program` mutates in place."""
    return _zero.mutated_buffer_fqns(program)


def _graph_pass(fn, options: LowMemoryOptions) -> ProgramPass:
    """Adapt a `(program, options) -> PassResult` pass to the backend's program -> program."""
    def run(program: ExportedProgram) -> ExportedProgram:
        fn(program, options)
        return program
    run.__name__ = fn.__name__
    return run


def low_memory_passes(options: LowMemoryOptions | dict[str, str] | None = None) -> list[ProgramPass]:
    """The ordered ExportedProgram passes; run them before the backend's device move.

    1. chunk_int4_matmul: split vocab-sized int4 matmuls into N-slices (needs only metadata);
    2. make_constants_zero_byte: KV buffers (and weights, with `zero_weights`) become
       zero-byte tensors on `options.device`, so the device move copies nothing.
    """
    opts = _options(options)
    zero = partial(_zero.make_constants_zero_byte, device=opts.device, include_weights=opts.zero_weights)
    zero.__name__ = "make_constants_zero_byte"  # type: ignore[attr-defined]
    return [_graph_pass(_chunk.chunk_int4_matmul, opts), zero]


def low_memory_inductor_patches(options: LowMemoryOptions | dict[str, str] | None = None) -> ContextManager:
    """Context manager to enter around `torch._inductor.aot_compile` (see inductor_patches)."""
    _options(options)  # validate early: a bad option must fail before a long compile
    return _patches.zero_byte_inductor_patches()

