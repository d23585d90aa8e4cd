"""scripts/graph_pdl.py without a GPU: which edges of a captured graph become programmatic (kernel ->
kernel, into a kernel that waits), and the op's launch arguments for a PDL mode without the launch
attribute (the graph edit supplies the dependency)."""

from export.kernels import int4_matmul as im
from scripts.graph_pdl import programmatic_plan


def test_only_kernel_edges_into_the_named_kernels_are_picked():
    names = {"n": "triton_poi_fused_mul_0", "q": "_quant_x_kernel", "g": "_int4_gemv1_kernel",
             "m": None, "a": "_attn_body"}  # m: a memset node, not a kernel
    edges = [("n", "q"), ("q", "g"), ("g", "n"), ("m", "q"), ("q", "m"), ("g", "a"), ("a", "q")]
    pick = programmatic_plan(edges, names.get, ("_quant_x_kernel", "_int4_gemv1_kernel"))
    assert [edges[i] for i in pick] == [("n", "q"), ("q", "g"), ("a", "q")]
    assert programmatic_plan(edges, names.get, ()) == []


def test_pdl_modes_without_the_attribute_keep_the_constexpr_only():
    assert im._pdl_args(0) == {"PDL": 0} and im._pdl_args(0, False) == {"PDL": 0}
    assert im._pdl_args(2) == {"PDL": 2, "launch_pdl": True}
    assert im._pdl_args(2, False) == {"PDL": 2}
