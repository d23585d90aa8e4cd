"""Pass: multi-output `*_copy` ops (split_copy, split_with_sizes_copy, unbind_copy) -> views.

Edge IR turns chunk / split into `split_copy`; Inductor has no lowering for it and would call
it through the proxy executor, which a weight-free `.so` loaded on its own does not have.
The outputs are only read, so aliasing is safe (as ExecuTorch's ReplaceViewCopyWithViewPass
does for slice / select). It runs last in the pipeline: split is a preserved view op, which
ExecuTorch's verifier rejects, and both a target pass and run_decompositions validate the
program.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult


def _split_copy_targets() -> dict:
    from executorch.exir.dialects._ops import ops

    aten = torch.ops.aten
    pairs = [("split_copy", "Tensor", "split", "Tensor"),
             ("split_with_sizes_copy", "default", "split_with_sizes", "default"),
             ("unbind_copy", "int", "unbind", "int")]
    table = {}
    for src, src_ov, dst, dst_ov in pairs:
        table[getattr(getattr(aten, src), src_ov)] = getattr(getattr(aten, dst), dst_ov)
        table[getattr(getattr(ops.edge.aten, src), src_ov)] = getattr(getattr(aten, dst), dst_ov)
    return table


def _mutates(node: torch.fx.Node, arg: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(a is arg and i < len(schema.arguments) and schema.arguments[i].alias_info is not None
               and schema.arguments[i].alias_info.is_write for i, a in enumerate(node.args))


def replace_split_copy_with_split(gm: torch.fx.GraphModule) -> PassResult:
    table = _split_copy_targets()
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in table:
            continue
        outs = list(node.users)
        if any(_mutates(u, o) for o in outs for u in o.users):
            continue
        node.target = table[node.target]
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
