"""Programmatic dependencies added to a captured CUDA graph after the fact (a measuring tool's helper).

A kernel launched with the programmatic-stream-serialization attribute may start while the kernel
before it finishes; everything it does before `griddepcontrol.wait` overlaps that kernel
(`export.kernels.pdl.pdl_wait`; scripts/gemv1_pdl_variants.py measured a decode layer's
four projections 3 us faster so). AOTInductor's launcher does not set the attribute, but a graph
captured around the compiled program can be edited before it is instantiated: each edge into a
kernel that waits (ours, compiled with a PDL mode) from another kernel becomes a programmatic edge,
as stream capture records for a launch with the attribute. A kernel that does not wait must keep
its plain edges: nothing would order its reads after the kernel before it.

Measured on the H200 (scripts/measurements/gemv1_pdl_graph.json): the edited graph holds the edges
that capture writes for launches with the attribute, yet is no faster than the plain one, where
those launches are; the artifact sets the attribute at launch instead (export/backends/cuda.py,
`pdl_launcher`).

`make_programmatic(graph, targets)` does that for the kernels whose names start with one of
`targets` (CUDA driver API through cuda-bindings, a dependency of torch; torch.cuda.CUDAGraph with
keep_graph=True gives the graph, `instantiate` it afterwards). `edge_kinds` counts a graph's edges
by their data (to see what capture records for a launch with the attribute). `programmatic_plan`
is the choice alone, on plain data (tests).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence


def programmatic_plan(edges: Sequence[tuple[object, object]], kernel_name: Callable[[object], str | None],
                      targets: Sequence[str]) -> list[int]:
    """Indices of the edges (from, to) to make programmatic: both ends kernels (kernel_name not
    None) and the dependent's name starting with one of `targets`."""
    out = []
    for i, (a, b) in enumerate(edges):
        na, nb = kernel_name(a), kernel_name(b)
        if na is not None and nb is not None and nb.startswith(tuple(targets)):
            out.append(i)
    return out


def _check(result):
    """cuda-bindings returns (CUresult, *values): raise on an error, return the values."""
    from cuda.bindings import driver as cu

    err, *vals = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return vals[0] if len(vals) == 1 else vals


def _kernel_names(graph) -> dict:
    """Node -> kernel function name, for the graph's kernel nodes."""
    from cuda.bindings import driver as cu

    n = _check(cu.cuGraphGetNodes(graph, 0))[1]
    nodes = _check(cu.cuGraphGetNodes(graph, n))[0]
    names = {}
    for node in nodes:
        if _check(cu.cuGraphNodeGetType(node)) == cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            try:
                name = _check(cu.cuFuncGetName(_check(cu.cuGraphKernelNodeGetParams(node)).func))
            except RuntimeError:  # a kernel all the same (a predecessor), one no target names
                name = "?"
            names[int(node)] = name.decode() if isinstance(name, bytes) else str(name)
    return names


def _edges(graph):
    from cuda.bindings import driver as cu

    n = _check(cu.cuGraphGetEdges(graph, 0))[-1]
    src, dst, data, n = _check(cu.cuGraphGetEdges(graph, n))
    return list(src[:n]), list(dst[:n]), list(data[:n])


def edge_kinds(graph) -> dict:
    """(from_port, to_port, type) -> count over the graph's edges, and the kernel edges' share."""
    src, dst, data = _edges(graph)
    names = _kernel_names(graph)
    kinds = Counter((int(d.from_port), int(d.to_port), int(d.type)) for d in data)
    kernel_to_kernel = sum(int(a) in names and int(b) in names for a, b in zip(src, dst))
    return {"edges": len(src), "kernel_to_kernel": kernel_to_kernel, "kinds": {str(k): v for k, v in kinds.items()}}


def make_programmatic(graph, targets: Sequence[str]) -> int:
    """Turns every kernel -> kernel edge into a kernel named with one of `targets` into a
    programmatic edge (the dependent may launch before its predecessor finishes; it must
    `griddepcontrol.wait` before reading what that one wrote). graph: a CUgraph / cudaGraph_t
    handle (torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph() after the capture, before
    instantiate). Returns how many edges changed."""
    from cuda.bindings import driver as cu

    src, dst, data = _edges(graph)
    names = _kernel_names(graph)
    plain = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_DEFAULT
    pick = [i for i in programmatic_plan(list(zip(src, dst)), lambda node: names.get(int(node)), targets)
            if int(data[i].type) == int(plain)]
    if not pick:
        return 0
    frm, to = [src[i] for i in pick], [dst[i] for i in pick]
    _check(cu.cuGraphRemoveDependencies(graph, frm, to, [data[i] for i in pick], len(pick)))
    new = []
    for _ in pick:
        d = cu.CUgraphEdgeData()
        d.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
        d.to_port = 0
        d.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
        new.append(d)
    _check(cu.cuGraphAddDependencies(graph, frm, to, new, len(pick)))
    return len(pick)
