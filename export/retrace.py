"""Whole-graph retraces that would change nothing are skipped.

`ExportedProgram.run_decompositions(table)` re-traces the whole program with fake tensors
whatever the table holds: seconds per method that grow with the node count (a 12-layer
narrow export on the CPU spends ~17 s per retrace under cProfile). Lowering one method
retraces it up to four times before Inductor traces it once more itself:

1. ExecuTorch's `to_edge`: `run_decompositions({})` (training IR -> inference IR); real.
2. ExecuTorch's `to_edge` again, with the core ATen table minus every op the AOTI
   partitioner preserves, and it preserves every op in the graph: a table that matches no
   node of a program that is already the output of a decomposition, so the retrace gives the
   same graph back. Skipped by `skip_identity_decompositions()` (a registered patch,
   export/patches.py), for programs this block's own decompositions produced.
3. Our pipeline's `decompose` step with the target's table (CUDA: ExecuTorch's conv1d
   rewrite; the model has no conv): skipped by the pipeline when `decomposes_nothing`.
4. Inductor's own `aot_export_module` inside `aot_compile`.

A retrace by a table that matches no op returns the same operators in the same order (the
tests compare the op sequences); Inductor then compiles the same graph, so the artifact's
logits stay bitwise the same.

Every retrace also records each node's provenance (`node.meta["from_node"]`, torch.fx's
`NodeSource` chain, two levels per decomposition) by deep-copying the whole chain of the
node it replays: a cost per node that grows with every pass the graph went through (~10% of
a CPU lowering under cProfile). `drop_provenance` clears it before the backend's passes and
Inductor: it names where a node came from for debugging only; nothing compiled reads it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
from torch.export import ExportedProgram

from export.patches import patched


def _graph_modules(program: ExportedProgram) -> Iterator[torch.fx.GraphModule]:
    """The program's graph and every nested one (cond / while branches)."""
    return (m for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule))


def _targets(node: torch.fx.Node) -> list[Any]:
    """The operators a call node runs: its target, and the op a functionalization wrapper
    (`auto_functionalized(op, ...)`) carries as its first argument."""
    targets = [node.target]
    if isinstance(node.target, torch._ops.HigherOrderOperator) and node.args:
        targets.append(node.args[0])
    return targets


def decomposes_nothing(program: ExportedProgram, table: dict) -> bool:
    """True when no call in `program` (nested graphs included) runs an op of `table`."""
    keys = set(table)
    for gm in _graph_modules(program):
        for node in gm.graph.nodes:
            if node.op == "call_function" and any(t in keys for t in _targets(node)):
                return False
    return True


def op_sequence(program: ExportedProgram) -> list[str]:
    """The operators of the top-level graph in order (what a no-op retrace must preserve)."""
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def drop_provenance(program: ExportedProgram) -> ExportedProgram:
    """Clear `node.meta["from_node"]` on every node (nested graphs included), in place."""
    for gm in _graph_modules(program):
        for node in gm.graph.nodes:
            node.meta.pop("from_node", None)
    return program


def skip_identity_retrace(produced: "weakref.WeakSet[ExportedProgram]"):
    """`run_decompositions` that hands back a program it produced itself in this block when
    the table matches none of its ops (that program is inference IR already, so the
    retrace could only return the same graph)."""
    def make(original):
        def run_decompositions(self, decomp_table=None, decompose_custom_triton_ops=False):
            if decomp_table is not None and self in produced and decomposes_nothing(self, decomp_table):
                return self
            out = original(self, decomp_table, decompose_custom_triton_ops)
            produced.add(out)
            return out
        return run_decompositions
    return make


@contextlib.contextmanager
def skip_identity_decompositions() -> Iterator[None]:
    """Enter around ExecuTorch's lowering (export/pipeline.py `lower`)."""
    produced: weakref.WeakSet[ExportedProgram] = weakref.WeakSet()
    with patched("ExportedProgram.run_decompositions", skip_identity_retrace(produced)):
        yield
