"""Pass: split int4 matmuls with a large N into N-slices (dequant + matmul per slice) + cat.

A vocab-sized int4 matmul (the 262144 x 5376 lm_head) dequantizes a 2.7 GiB bf16 weight
at once; autotuning and the compile-time run of the compiled graph need that much scratch.
Split along N, each slice dequantizes at most `LowMemoryOptions.matmul_chunk_bytes`.

Matched by aten ops and tensor properties only: `mm(x, t(W))` / `addmm(b, x, t(W))` /
`linear(x, W[, b])` whose weight `W` [N, K] is computed only from program constants through
row-local ops (pointwise, dtype casts, and views / unsqueeze / cat / stack / permute that
keep N as dim 0): the constants are sliced along dim 0 and the chain is replayed per slice,
so each slice's dequantized weight is bitwise the matching rows of the unsliced one (the
CPU int4 module, and `gemma4::int4_linear` as the CPU backend decomposes it).

Each output column depends only on its weight row, so the concatenated result equals the
unsliced matmul up to the GEMM's accumulation order for a different N (exact in practice
for fp32 on CPU; the tests bound it). Slices are views of the constants and every sliced
computation takes a graph input, so Inductor (no freezing, no runtime constant folding in
AOT mode) keeps them as kernels and adds no constants; the tests check that too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.fx import Graph, Node
from torch.fx.passes.infra.pass_base import PassResult

from export.passes.options import LowMemoryOptions

# ---- op tables: schema names (no namespace, no overload), edge or aten dialect alike ----

_POINTWISE = {
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_right_shift", "bitwise_left_shift",
    "__and__", "__or__", "__rshift__", "__lshift__", "add", "sub", "rsub", "mul", "div", "neg",
    "_to_copy", "_to_dim_order_copy", "to", "clone", "alias", "alias_copy",
    "convert_element_type", "contiguous",
}
_DIM_AT_1 = {"unsqueeze", "unsqueeze_copy", "squeeze", "squeeze_copy", "select", "select_copy",
             "slice", "slice_copy", "transpose", "transpose_copy"}
_LIST_DIM_AT_1 = {"cat", "stack"}  # (tensors, dim)
_SHAPE_AT_1 = {"view", "view_copy", "reshape", "_unsafe_view", "expand", "expand_copy"}
_PERMUTE = {"permute", "permute_copy"}
_TRANSPOSE_2D = {"t", "t_copy", "numpy_T"}


def _aten(target: Any) -> Any:
    """The OpOverload behind an edge op (itself for an OpOverload; edge ops wrap one)."""
    if isinstance(target, torch._ops.OpOverload):
        return target
    return getattr(target, "_op", target)


def op_name(target: Any) -> str:
    """'bitwise_and' for aten.bitwise_and.Scalar and its edge-dialect twin alike."""
    schema = getattr(_aten(target), "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


# In a graph written with view_copy ops (what to_edge produces, edge or aten dialect), new
# slices and transposes use the copy variants too: ExecuTorch's verifier rejects preserved
# view ops, and its ReplaceViewCopyWithViewPass (run after these passes) turns them back into
# views for Inductor. A graph that uses plain views gets plain views.
_COPY_VARIANT = {"slice.Tensor": "slice_copy.Tensor", "permute.default": "permute_copy.default"}


def _uses_view_copy(graph: Graph) -> bool:
    return any(n.op == "call_function" and isinstance(_aten(n.target), torch._ops.OpOverload)
               and torch.Tag.view_copy in _aten(n.target).tags for n in graph.nodes)


def _same_dialect(template: Any, aten_op: torch._ops.OpOverload, copy_variant: bool) -> Any:
    """`aten_op` (or its copy variant) in the dialect of `template` (edge or aten)."""
    key = f"{aten_op._schema.name.split('::')[-1]}.{aten_op._overloadname}"
    name, overload = (_COPY_VARIANT.get(key, key) if copy_variant else key).split(".")
    if _aten(template) is template:
        return getattr(getattr(torch.ops.aten, name), overload)
    from executorch.exir.dialects._ops import ops as exir_ops
    return getattr(getattr(exir_ops.edge.aten, name), overload)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else n


# ---- matching -------------------------------------------------------------------------------

@dataclass
class _Chain:
    """A weight computed from constants, rows = N along dim 0 throughout."""

    n: int
    nodes: list[Node]  # topological order, ending with the weight [N, K]
    constants: set[Node]  # placeholders sliced along dim 0


def _constant_placeholders(program: ExportedProgram) -> set[str]:
    sig = program.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    names = set(sig.inputs_to_parameters) | set(sig.inputs_to_lifted_tensor_constants)
    names |= {k for k, fqn in sig.inputs_to_buffers.items() if fqn not in mutated}
    return names


def _real_users(node: Node) -> list[Node]:
    """Users other than `_assert_tensor_metadata` checks (export leaves those around casts)."""
    return [u for u in node.users if op_name(u.target) != "_assert_tensor_metadata"]


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _row_local(node: Node, n: int, in_chain: Callable[[Node], bool]) -> bool:
    """Whether `node` maps rows of its N-row inputs to the same rows of its output."""
    name, out = op_name(node.target), _val(node)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        return False
    tensors = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
    if name in _POINTWISE:
        for a in tensors:  # an N-row input must line up with the output rows
            v = _val(a)
            if in_chain(a) and not (v.dim() == out.dim() and v.shape[0] == n):
                return False
            if not in_chain(a) and v.dim() == out.dim() and v.shape[0] not in (1,):
                return False  # a non-constant operand with rows: not constant-only
        return True
    src = _val(node.args[0]) if isinstance(node.args[0], Node) else None
    if name in _DIM_AT_1:
        dim = node.args[1] if len(node.args) > 1 else 0
        rank = out.dim() if name.startswith("unsqueeze") else src.dim()
        return src is not None and src.shape[0] == n and _norm_dim(dim, rank) != 0
    if name in _LIST_DIM_AT_1:
        dim = node.args[1] if len(node.args) > 1 else 0
        return _norm_dim(dim, out.dim()) != 0 and all(_val(a).shape[0] == n for a in node.args[0])
    if name in _SHAPE_AT_1:
        shape = list(node.args[1])
        return src is not None and src.shape[0] == n and shape[0] in (n, -1)
    if name in _PERMUTE:
        return list(node.args[1])[0] == 0
    return False


def _weight_chain(w: Node, constants: set[str]) -> _Chain | None:
    """The constant-only, row-local subgraph producing `w` [N, K], or None."""
    wv = _val(w)
    if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return None
    n = wv.shape[0]
    nodes: list[Node] = []
    leaves: set[Node] = set()
    seen: set[Node] = set()

    def visit(node: Node) -> bool:
        if node in seen:
            return True
        seen.add(node)
        if node.op == "placeholder":
            v = _val(node)
            if node.name not in constants or not isinstance(v, torch.Tensor) or v.dim() == 0:
                return False
            if v.shape[0] == n:
                leaves.add(node)
            return True
        if node.op != "call_function" or (node is not w and len(_real_users(node)) != 1):
            return False
        if not all(visit(a) for a in node.all_input_nodes):
            return False
        if not _row_local(node, n, lambda a: a in leaves or a in nodes):
            return False
        nodes.append(node)
        return True

    if not visit(w) or not leaves or not nodes:
        return None
    return _Chain(n=n, nodes=nodes, constants=leaves)


def _transposed(node: Node) -> Node | None:
    """X if `node` is X transposed (2-D), else None."""
    name = op_name(node.target) if node.op == "call_function" else ""
    if name in _PERMUTE and list(node.args[1]) == [1, 0]:
        return node.args[0]
    if name in _TRANSPOSE_2D:
        return node.args[0]
    if name in ("transpose", "transpose_copy") and {_norm_dim(d, 2) for d in node.args[1:3]} == {0, 1}:
        return node.args[0]
    return None


# ---- rewriting --------------------------------------------------------------------------------

class _Builder:
    """Inserts nodes before an anchor, in the anchor's dialect, with fake `val` metadata."""

    def __init__(self, graph: Graph, anchor: Node):
        self.graph, self.anchor = graph, anchor
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes])
        self.copy_variants = _uses_view_copy(graph)

    def call(self, template: Any, aten_op: Any, args: tuple, kwargs: dict | None = None,
             like: Node | None = None) -> Node:
        target = _same_dialect(template, aten_op, self.copy_variants) if aten_op is not None else template
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs or {})
        fake_args = torch.fx.node.map_arg(args, _val)
        fake_kwargs = torch.fx.node.map_arg(kwargs or {}, _val)
        with self.fake_mode:
            op = _aten(target)
            if op is torch.ops.aten.linear.default:
                # aten.linear is CompositeImplicit: run on fake inputs outside a trace, its C++
                # body asks numel() of a symbolic (dynamic-T) input. Its output is just this:
                x, w = fake_args[0], fake_args[1]
                node.meta["val"] = x.new_empty((*x.shape[:-1], w.shape[0]))
            else:
                node.meta["val"] = op(*fake_args, **fake_kwargs)
        src = like or self.anchor
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn"):
            if key in src.meta:
                node.meta[key] = src.meta[key]
        return node

    def slice(self, x: Node, dim: int, start: int, end: int) -> Node:
        return self.call(self.anchor.target, torch.ops.aten.slice.Tensor, (x, dim, start, end), like=x)


def _replay_row_args(node: Node, rows: int, env: dict[Node, Node]) -> tuple:
    """`node`'s args for a slice of `rows` rows: N in a shape argument becomes `rows`."""
    args = torch.fx.node.map_arg(node.args, lambda a: env.get(a, a))
    if op_name(node.target) in _SHAPE_AT_1:
        shape = list(args[1])
        if shape[0] != -1:
            shape[0] = rows
        args = (args[0], shape, *args[2:])
    return args


def _chunk_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def _rewrite_dequant_matmul(graph: Graph, mm: Node, chain: _Chain, rows: int) -> Node:
    """mm/addmm/linear over `chain` -> per-slice chain + matmul, cat along the last dim."""
    b = _Builder(graph, mm)
    name = op_name(mm.target)
    outs = []
    for start, end in _chunk_bounds(chain.n, rows):
        env = {c: b.slice(c, 0, start, end) for c in chain.constants}
        for node in chain.nodes:
            env[node] = b.call(node.target, None, _replay_row_args(node, end - start, env),
                               dict(node.kwargs), like=node)
        w = env[chain.nodes[-1]]
        if name == "linear":
            bias = mm.args[2] if len(mm.args) > 2 else None
            bias = b.slice(bias, 0, start, end) if bias is not None else None
            outs.append(b.call(mm.target, None, (mm.args[0], w, bias)))
            continue
        wt = b.call(mm.target, torch.ops.aten.permute.default, (w, [1, 0]), like=w)
        if name == "mm":
            outs.append(b.call(mm.target, None, (mm.args[0], wt)))
        else:  # addmm(bias, x, wt, beta=, alpha=)
            bias = mm.args[0]
            if _val(bias).dim() >= 1 and _val(bias).shape[-1] == chain.n:
                bias = b.slice(bias, _val(bias).dim() - 1, start, end)
            outs.append(b.call(mm.target, None, (bias, mm.args[1], wt), dict(mm.kwargs)))
    cat = b.call(mm.target, torch.ops.aten.cat.default, (outs, -1))
    mm.replace_all_uses_with(cat)
    return cat


def _erase_unused(graph: Graph, nodes: list[Node]) -> None:
    """Erase `nodes` (users before producers) that nothing but metadata checks uses."""
    for node in nodes:
        if _real_users(node):
            continue
        for check in list(node.users):
            graph.erase_node(check)
        graph.erase_node(node)


def _rename_outputs(program: ExportedProgram, renamed: dict[str, str]) -> None:
    """Point the signature's output specs at the nodes that replaced graph outputs."""
    for spec in program.graph_signature.output_specs:
        arg = getattr(spec, "arg", None)
        if getattr(arg, "name", None) in renamed:
            arg.name = renamed[arg.name]


# ---- the pass ---------------------------------------------------------------------------------

def chunk_int4_matmul(program: ExportedProgram, options: LowMemoryOptions) -> PassResult:
    """Rewrite every int4 matmul over the budget (see the module docstring) in place."""
    graph = program.graph_module.graph
    constants = _constant_placeholders(program)
    renamed: dict[str, str] = {}
    for mm in list(graph.nodes):
        if mm.op != "call_function":
            continue
        name = op_name(mm.target)
        if name == "linear":
            weight = mm.args[1]
        elif name in ("mm", "addmm"):
            weight = _transposed(mm.args[-1] if name == "mm" else mm.args[2])
        else:
            continue
        if weight is None:
            continue
        chain = _weight_chain(weight, constants)
        if chain is None:
            continue
        k = _val(weight).shape[1]
        rows = options.chunk_rows(chain.n, k * _val(weight).element_size())
        if rows is None:
            continue
        transpose = [] if name == "linear" else [mm.args[-1] if name == "mm" else mm.args[2]]
        renamed[mm.name] = _rewrite_dequant_matmul(graph, mm, chain, rows).name
        _erase_unused(graph, [mm, *transpose, *reversed(chain.nodes)])
    if renamed:
        _rename_outputs(program, renamed)
        graph.lint()
        program.graph_module.recompile()
    return PassResult(program.graph_module, bool(renamed))
