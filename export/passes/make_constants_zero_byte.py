"""Pass: every constant of the program becomes a zero-byte tensor on the target device.

KV-cache buffers are recognised from the program, not from names: they are the buffers
the program writes in place (`graph_signature.buffers_to_mutate` of a functional program,
or an in-place op's written argument in a not-yet-functionalized one). They get
`ByteSource.ZEROS` (caches start empty, so their bytes are re-synthesized on demand). With
`include_weights`, every other parameter and buffer becomes zero-byte too, with its host
tensor recorded as `ByteSource.HOST`; otherwise weights are left for the backend's
`move_to_device_pass` to copy (upstream ExecuTorch's behaviour). Lifted tensor constants
(small tensors that tracing made, with no module FQN) keep their bytes: the artifact
writer has no other source for them. So does every constant of at most
`SMALL_CONSTANT_BYTES`: Inductor bakes the values of scalar and short 1-D constants into
the generated code (`GraphLowering.get_attr` inlines them) and its graph-repro string prints
small buffers, so their bytes must be real; they weigh nothing.

The exported program is changed in place (like `move_to_device_pass`); the eager module
and its tensors are never touched (dynamo cannot re-trace zero-byte parameters, and the
artifact writer reads the real bytes from the eager state dict).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from export.passes.zero_byte import ByteSource, zero_byte_like

# Constants up to this size keep their bytes (see the module docstring): it covers what
# torch 2.11's Inductor reads at compile time (0-d and 1-D constants of <= 8 elements,
# repro strings of buffers of <= 4 elements) with room for a wider dtype.
SMALL_CONSTANT_BYTES = 4096


def _written_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Arguments an in-place / out= op writes (alias_info.is_write in its schema)."""
    op = node.target if isinstance(node.target, torch._ops.OpOverload) else getattr(node.target, "_op", None)
    schema = getattr(op, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, torch.fx.Node):
            written.append(value)
    return written


def mutated_buffer_fqns(program: ExportedProgram) -> set[str]:
    """FQNs of the buffers `program` mutates in place: its KV caches.

    A functional program lists them in `buffers_to_mutate`; a training-IR program (what
    `torch.export.export` returns before `run_decompositions`) still has the in-place ops,
    so their written placeholders are read from the graph as well.
    """
    sig = program.graph_signature
    fqns = set(sig.buffers_to_mutate.values())
    for node in program.graph.nodes:
        for target in _written_args(node):
            if target.op == "placeholder" and target.name in sig.inputs_to_buffers:
                fqns.add(sig.inputs_to_buffers[target.name])
    return fqns


def make_constants_zero_byte(program: ExportedProgram, device: str,
                             include_weights: bool = True) -> ExportedProgram:
    """Swap the program's KV buffers (and, with `include_weights`, every other constant)
    for zero-byte tensors on `device` (an indexed device such as "cuda:0")."""
    kv = mutated_buffer_fqns(program)
    sig = program.graph_signature
    weights = (set(sig.inputs_to_parameters.values()) | set(sig.inputs_to_buffers.values())) - kv

    def swap(table: dict, fqn: str) -> None:
        value = table[fqn]
        if not isinstance(value, torch.Tensor) or value.numel() * value.element_size() <= SMALL_CONSTANT_BYTES:
            return
        if is_traceable_wrapper_subclass(value):  # e.g. torchao int4 before to_edge unwraps it: left as is
            return
        if fqn in kv:
            table[fqn] = zero_byte_like(value, device, ByteSource.ZEROS)
        elif include_weights and fqn in weights:
            table[fqn] = zero_byte_like(value, device, ByteSource.HOST)

    for table in (program._state_dict, program._constants):  # persistent / non-persistent
        for fqn in list(table):
            swap(table, fqn)
    return program
