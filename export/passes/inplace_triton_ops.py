"""Our Triton ops that write their arguments, called in place again on the module handed to Inductor.

An exported program is functional: a `triton_op` that writes an argument (`gemma4::attention_rows` writes the
step's K / V into the cache) appears as `auto_functionalized_v2(op, ..., _all_bases=[cache, ...])`, its outputs
the new caches, copied back into the buffers at the end (`copy_`). Inductor keeps that node opaque when it traces
the module (the op is never called under its functional mode, where a `triton_op` gives up its Triton kernels),
and its reinplacing turns it back into the op itself: a fallback kernel, which the AOTInductor `.so` can only call
through a proxy executor that our runtime does not have (the backend's fallback check refuses it, naming the op).

This pass calls the op on the bases themselves, in place, where the functional node was; the node's outputs become
the op's output and the bases, and the `copy_(base, base)` left at the end is dropped. Inductor then traces the op
like any other mutation of a buffer: its Triton kernels write the buffers directly (no clone, no copy back), as
the training-IR program does.

It applies only where that is the same program: every base a plain argument (no view metadata), and every other
reader of a base before the node (a later reader would have read the old value). Anything else is left as it is
(and then refused by the fallback check with the op's name). It runs on `program.module()`, right before
`aot_compile` (export/backends/aoti_base.py): the ExportedProgram itself stays functional.
"""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2
from torch._library.triton import triton_ops_to_kernels

_COPY = torch.ops.aten.copy_.default


def _written_args(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def _in_place_kwargs(node: torch.fx.Node) -> dict | None:
    """The op's kwargs with each written argument its base node, or None where the node is not a plain call on
    its bases (an argument that is a view of its base, or one the op may leave out)."""
    kwargs = dict(node.kwargs)
    bases = kwargs.pop("_all_bases")
    for name in _written_args(node.args[0]):
        index = kwargs.pop(f"_{name}_base_index", None)
        if index is None or any(k.startswith(f"_{name}_") for k in kwargs):  # None / a view (size, stride, ...)
            return None
        kwargs[name] = bases[index]
    return kwargs


def _readers_before(node: torch.fx.Node, bases: list[torch.fx.Node]) -> bool:
    """Whether every use of the bases other than the node and the copies back into them comes before the node."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for base in bases:
        for user in base.users:
            if user is node or (user.target is _COPY and user.args[0] is base):
                continue
            if order[user] > order[node]:
                return False
    return True


def inplace_triton_ops(gm: torch.fx.GraphModule) -> int:
    """Rewrite every `auto_functionalized_v2` of a `triton_op` in `gm` into the op's call on its bases, in place
    (see the module docstring), and drop the copies of a buffer onto itself. -> the number of calls rewritten."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.target is not auto_functionalized_v2:
            continue
        op = node.args[0]
        if op._schema.name not in triton_ops_to_kernels:
            continue
        bases = list(node.kwargs["_all_bases"])
        kwargs = _in_place_kwargs(node)
        if kwargs is None or not _readers_before(node, bases):
            continue
        returns = len(op._schema.returns)
        if returns > 1 or any(u.target is not operator.getitem for u in node.users):
            continue
        with graph.inserting_before(node):
            call = graph.call_function(op, kwargs=kwargs)
        call.meta = dict(node.meta)
        if "val" in node.meta:
            call.meta["val"] = node.meta["val"][0] if returns else None
        for user in list(node.users):
            i = user.args[1]
            user.replace_all_uses_with(call if i < returns else bases[i - returns])
            graph.erase_node(user)
        graph.erase_node(node)
        done += 1
    if done:
        for node in list(graph.nodes):
            if node.target is _COPY and node.args[0] is node.args[1]:
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
    return done
