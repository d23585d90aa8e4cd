"""Low-memory mode for the AOTInductor backends: graph passes and Inductor patches.

The backend runs every graph rewrite through one ordered list, export/passes/pipeline.py;
with low-memory options its first two steps are this package's passes, and the compile runs
inside `low_memory_inductor_patches(options)`:

    for p in low_memory_passes(options):      # the pipeline's low-memory steps, in order
        program = p(program)
    with low_memory_inductor_patches(options):
        torch._inductor.aot_compile(program.module(), ...)

`options` is a `LowMemoryOptions` or its `to_dict()` string form (compile specs). The
artifact writer asks `kv_buffer_fqns(program)` which constants are KV caches (to leave them
out of the `.ptd`, or to write zeros for them). Order and invariants: README.md here.
"""

from __future__ import annotations

from typing import Callable, ContextManager

from torch.export import ExportedProgram

# Submodules are imported as modules (a pass function named like its file would otherwise
# shadow the submodule as an attribute of this package).
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


def low_memory_passes(options: LowMemoryOptions | dict[str, str] | None = None) -> list[ProgramPass]:
    """The low-memory steps of the pass pipeline (export/passes/pipeline.py), in its order,
    as program -> program functions; run them before the backend's device move.

    1. chunk_int4_matmul: split vocab-sized int4 matmuls into N-slices (needs only metadata);
    2. make_constants_zero_byte: KV buffers (and weights, with `zero_weights`) become
       zero-byte tensors on `options.device`, so the device move copies nothing.
    """
    from export.passes.pipeline import PIPELINE, PipelineContext

    opts = _options(options)
    ctx = PipelineContext(device=opts.device, low_memory=opts)
    return [_bound(step, ctx) for step in PIPELINE if step.low_memory_only]


def _bound(step, ctx) -> ProgramPass:
    def run(program: ExportedProgram) -> ExportedProgram:
        return step.run(program, ctx)
    run.__name__ = step.name
    return run


def low_memory_inductor_patches(options: LowMemoryOptions | dict[str, str] | None = None) -> ContextManager:
    """Context manager to enter around `torch._inductor.aot_compile` (see inductor_patches)."""
    _options(options)  # validate early: a bad option must fail before a long compile
    return _patches.zero_byte_inductor_patches()

