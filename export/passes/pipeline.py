"""The one ordered list of graph rewrites the backend runs on each method before Inductor.

    program = run_pipeline(program, PipelineContext(...))

Every step is named; a step runs when its `when` holds for the context (the low-memory
steps only with low-memory options). The target's own rewrites (ExecuTorch's CUDA passes)
and decompositions are handed in by the backend through the context, so they run at their
place in this order and nowhere else:

1. chunk_int4_matmul          (low-memory) split vocab-sized int4 matmuls along N
2. make_constants_zero_byte   (low-memory) constants become zero-byte on the target device
3. move_to_device             constants and graph onto the target device
4. replace_view_copy_with_view  ExecuTorch's view_copy -> view
5. target_passes              the target's own rewrites
6. decompose                  the target's decomposition table (skipped when it matches no op)
7. replace_split_copy_with_split  last: split is a preserved view op the verifier rejects

Then, on the module `aot_compile` takes (not a step here: the program stays functional), inplace_triton_ops.py
calls our Triton ops that write their arguments in place again (export/backends/aoti_base.py).

Order and invariants: README.md here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from torch.export import ExportedProgram

from export.passes.options import LowMemoryOptions


@dataclass(frozen=True)
class PipelineContext:
    device: str  # the target device with an index ("cuda:0") or "cpu"
    low_memory: LowMemoryOptions | None = None  # None: stock compile
    target_passes: list = field(default_factory=list)  # graph-module passes (or ones that take the program)
    decompositions: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[ExportedProgram, PipelineContext], ExportedProgram]
    when: Callable[[PipelineContext], bool] = lambda ctx: True

    @property
    def low_memory_only(self) -> bool:
        return self.when is _low_memory


def _low_memory(ctx: PipelineContext) -> bool:
    return ctx.low_memory is not None


def _lm(ctx: PipelineContext) -> LowMemoryOptions:
    # the zero-byte constants are placed where the device move puts everything next
    return replace(ctx.low_memory, device=ctx.device)


def _chunk_int4_matmul(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from export.passes import chunk_int4_matmul as m

    m.chunk_int4_matmul(program, _lm(ctx))
    return program


def _make_constants_zero_byte(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from export.passes import make_constants_zero_byte as m

    opts = _lm(ctx)
    return m.make_constants_zero_byte(program, device=opts.device, include_weights=opts.zero_weights)


def _move_to_device(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, ctx.device)


def _replace_view_copy_with_view(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from executorch.backends.aoti.passes.replace_view_copy_with_view import ReplaceViewCopyWithViewPass

    ReplaceViewCopyWithViewPass()(program.graph_module)
    return program


def _target_passes(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    for p in ctx.target_passes:
        p(program) if getattr(p, "requires_exported_program", False) else p(program.graph_module)
    return program


def _decompose(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from export.retrace import decomposes_nothing

    if decomposes_nothing(program, ctx.decompositions):  # a whole-graph retrace for nothing
        return program
    return program.run_decompositions(ctx.decompositions)


def _replace_split_copy_with_split(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    from export.passes.replace_split_copy_with_split import replace_split_copy_with_split

    replace_split_copy_with_split(program.graph_module)
    return program


PIPELINE: tuple[Step, ...] = (
    Step("chunk_int4_matmul", _chunk_int4_matmul, _low_memory),
    Step("make_constants_zero_byte", _make_constants_zero_byte, _low_memory),
    Step("move_to_device", _move_to_device),
    Step("replace_view_copy_with_view", _replace_view_copy_with_view),
    Step("target_passes", _target_passes, lambda ctx: bool(ctx.target_passes)),
    Step("decompose", _decompose, lambda ctx: bool(ctx.decompositions)),
    Step("replace_split_copy_with_split", _replace_split_copy_with_split),
)


def run_pipeline(program: ExportedProgram, ctx: PipelineContext) -> ExportedProgram:
    """Every step of PIPELINE whose condition holds, in order."""
    for step in PIPELINE:
        if step.when(ctx):
            program = step.run(program, ctx)
    return program
