"""Retraces that change nothing are skipped (export/retrace.py): on a toy with an in-place
buffer write and a composite op, ExecuTorch's second decomposition (its core table minus
every op the AOTI partitioner preserves) gives back the very program, and running that
retrace for real yields the same operators in the same order."""

from __future__ import annotations

import torch
from torch import nn

from export.retrace import decomposes_nothing, op_sequence, skip_identity_decompositions


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, x)
        return torch.nn.functional.silu(self.lin(self.cache)).softmax(-1)


def _program():
    return torch.export.export(Toy(), (torch.randn(1, 8), torch.tensor([1])), strict=False)


def _aoti_table(program):
    """ExecuTorch's second table: the core ATen table less every op in the graph."""
    from executorch.exir.program._program import _default_decomposition_table

    table = _default_decomposition_table()
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            table.pop(node.target, None)
    return table


def test_identity_retrace_is_skipped_only_for_programs_decomposed_in_the_block():
    ep = _program()
    with skip_identity_decompositions():
        first = ep.run_decompositions({})  # training IR -> inference IR: runs
        assert first is not ep
        table = _aoti_table(first)
        assert decomposes_nothing(first, table)
        assert first.run_decompositions(table) is first
        assert ep.run_decompositions(table) is not ep  # not produced here: retraced
    assert first.run_decompositions(table) is not first  # outside the block: as torch does it


def test_skipped_retrace_would_have_returned_the_same_ops():
    first = _program().run_decompositions({})
    again = first.run_decompositions(_aoti_table(first))
    assert op_sequence(again) == op_sequence(first)
    torch.testing.assert_close(again.module()(torch.ones(1, 8), torch.tensor([2])),
                               first.module()(torch.ones(1, 8), torch.tensor([2])), rtol=0, atol=0)


def test_a_table_that_matches_an_op_is_run():
    linear = torch.ops.aten.linear.default  # kept by run_decompositions({}) (a preserved composite)
    with skip_identity_decompositions():
        first = _program().run_decompositions({})
        assert "aten.linear.default" in op_sequence(first)
        table = {linear: lambda x, w, b=None: torch.matmul(x, w.t()) + b}
        assert not decomposes_nothing(first, table)
        out = first.run_decompositions(table)
    assert out is not first and "aten.linear.default" not in op_sequence(out)


def test_pipeline_skips_a_target_table_without_a_matching_op():
    from export.passes.pipeline import PipelineContext, _decompose

    first = _program().run_decompositions({})
    conv_only = PipelineContext(device="cpu", decompositions={torch.ops.aten.conv1d.default: lambda *a: None})
    assert _decompose(first, conv_only) is first
    linear = PipelineContext(device="cpu", decompositions={
        torch.ops.aten.linear.default: lambda x, w, b=None: torch.matmul(x, w.t()) + b})
    assert "aten.linear.default" not in op_sequence(_decompose(first, linear))


def test_dropped_provenance_leaves_the_ops_and_values():
    from export.retrace import drop_provenance

    first = _program().run_decompositions({}).run_decompositions({})
    assert any("from_node" in n.meta for n in first.graph.nodes)
    ops, x = op_sequence(first), torch.randn(1, 8)
    want = first.module()(x, torch.tensor([3]))
    assert drop_provenance(first) is first and not any("from_node" in n.meta for n in first.graph.nodes)
    assert op_sequence(first) == ops
    torch.testing.assert_close(first.module()(x, torch.tensor([3])), want, rtol=0, atol=0)
