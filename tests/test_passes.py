"""Low-memory passes (export/passes) on toy programs, through AOTInductor's CPU compile.

One session-scoped compile of a toy (three same-shape KV buffers written in place, a read-only
buffer, a vocab-like int4 head over the chunk budget) serves the compile-time tests; the
rest are graph-level and run in milliseconds. The low-memory vs stock artifact comparison
for the real model is in test_passes_artifact.py.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._dynamo.guards import _reinterpret_tensor
from executorch.backends.aoti.passes.replace_view_copy_with_view import ReplaceViewCopyWithViewPass
from torch.export.passes import move_to_device_pass

from export.passes import LowMemoryOptions, kv_buffer_fqns, low_memory_inductor_patches, low_memory_passes
from export.passes.chunk_int4_matmul import chunk_int4_matmul, op_name
from export.passes.inductor_patches import LendBytesToOps, exclude_zero_byte_from_dedup
from export.passes.make_constants_zero_byte import SMALL_CONSTANT_BYTES
from export.passes.zero_byte import ByteSource, is_zero_byte, materialized, zero_byte_like

K, GROUP, VOCAB = 32, 16, 20480  # head: 20480 x 32 fp32 = 2.5 MiB dequantized
BUDGET = LowMemoryOptions(device="cpu", matmul_chunk_mib=1, matmul_chunk_align=256)  # 8192-row slices


# ---- toy modules --------------------------------------------------------------------------

class PackedHead(nn.Module):
    """y = x @ W.T with W [N, K] dequantized in the graph from uint8 nibbles, N kept as dim 0
    (the same op family as export/gemma4/quant.Int4Linear, written independently)."""

    def __init__(self, n: int, k: int, group: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k, self.group = k, group
        self.register_buffer("packed", torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g))
        self.register_buffer("scale", torch.rand(n, k // group, generator=g) * 0.1)
        self.register_buffer("zero", torch.randn(n, k // group, generator=g) * 0.1)

    def weight(self) -> torch.Tensor:
        codes = torch.cat([(self.packed & 15).unsqueeze(-1), (self.packed >> 4).unsqueeze(-1)], dim=-1)
        w = codes.reshape(-1, self.k).to(torch.float32).view(-1, self.k // self.group, self.group)
        return (w * self.scale.unsqueeze(-1) + self.zero.unsqueeze(-1)).view(-1, self.k)

    def forward(self, x):
        return F.linear(x, self.weight())


class KVToy(nn.Module):
    """Three same-shape buffers written in place (no 'kv' in their names), read-only buffers
    (one named like a cache, one a scalar Inductor inlines), a weight over the small-constant
    size, and a head over the chunk budget."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(K, 2 * K)  # 8 KiB weight, 256 B bias
        for i in range(3):
            self.register_buffer(f"slot{i}", torch.zeros(1, 64, K), persistent=False)  # 8 KiB each
        self.register_buffer("kv_cache_scale", torch.rand(2 * K) + 0.5, persistent=False)  # a name, not KV
        self.register_buffer("gain", torch.tensor([1.25]))  # inlined as a value by Inductor
        self.head = PackedHead(VOCAB, K, GROUP)

    def forward(self, x, pos):
        h = x
        for i in range(3):
            buf = getattr(self, f"slot{i}")
            a, b = (self.proj(h) * self.kv_cache_scale).chunk(2, dim=-1)
            buf.index_copy_(1, pos, a * b * self.gain)
            h = h + buf.sum(1, keepdim=True)
        return self.head(h[:, -1])


def is_big(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() > SMALL_CONSTANT_BYTES


def toy_inputs(pos: int = 2):
    return torch.randn(1, 1, K, generator=torch.Generator().manual_seed(pos)), torch.tensor([pos])


def export_toy(model: nn.Module, functional: bool = True):
    ep = torch.export.export(model, toy_inputs(), strict=False)
    return ep.run_decompositions({}) if functional else ep


# ---- one low-memory CPU compile of the toy, shared ---------------------------------------------

@dataclass
class Compiled:
    so: str
    blob: str
    constants: list = field(default_factory=list)  # (name, fqn, zero_byte, nbytes) at serialization
    host: dict = field(default_factory=dict)  # fqn -> the real tensor the program started with
    eager: nn.Module | None = None
    module_intact: bool = False


@pytest.fixture(scope="session")
def compiled_toy(tmp_path_factory) -> Compiled:
    from torch._inductor.codecache import AotCodeCompiler

    model = KVToy().eval()
    eager = copy.deepcopy(model)
    ep = export_toy(model)
    host = {k: v.detach().clone() for k, v in {**ep.state_dict, **ep.constants}.items()}
    for p in low_memory_passes(BUDGET):
        ep = p(ep)
    ep = move_to_device_pass(ep, "cpu")  # the backend's next steps (export/backends/aoti_base.py)
    ReplaceViewCopyWithViewPass()(ep.graph_module)
    out = Compiled(so="", blob="", host=host, eager=eager)
    original = AotCodeCompiler.compile.__func__

    def record(cls, graph, *args, **kwargs):
        for name in graph.constants:
            value = graph.get_original_value_of_constant(name)
            fqn = graph.allocated_constant_name.get(name, name)
            out.constants.append((name, fqn, is_zero_byte(graph.constants[name]) or not is_big(graph.constants[name]),
                                  value.untyped_storage().nbytes()))
        return original(cls, graph, *args, **kwargs)

    options = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
               "aot_inductor.package_constants_on_disk_format": "binary_blob",
               "aot_inductor.link_libtorch": False,
               "aot_inductor.output_path": str(tmp_path_factory.mktemp("toy") / "toy.so")}
    AotCodeCompiler.compile = classmethod(record)
    try:
        with low_memory_inductor_patches(BUDGET), torch.no_grad():
            paths = torch._inductor.aot_compile(ep.module(), toy_inputs(), options=options)
    finally:
        AotCodeCompiler.compile = classmethod(original)
    out.so = next(p for p in paths if p.endswith(".so"))
    out.blob = next(p for p in paths if p.endswith(".blob"))
    out.module_intact = all(t.untyped_storage().nbytes() > 0 for t in model.state_dict().values())
    return out


def load_runner(so: str):
    from runtime.aoti import promote_libtorch

    promote_libtorch("cpu")
    return torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)


def eager_logits(model: nn.Module, pos: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model)(*toy_inputs(pos))


# ---- options --------------------------------------------------------------------------------

def test_options_round_trip_through_compile_specs():
    opts = LowMemoryOptions(device="cpu", zero_weights=False, matmul_chunk_mib=64)
    assert LowMemoryOptions.from_dict(opts.to_dict()) == opts
    assert LowMemoryOptions.from_dict({}) == LowMemoryOptions()
    with pytest.raises(ValueError, match="unknown"):
        LowMemoryOptions.from_dict({"zero_weigths": "true"})
    with pytest.raises(ValueError, match="index"):
        LowMemoryOptions(device="cuda")


def test_chunk_size_follows_the_budget():
    opts = LowMemoryOptions()  # 256 MiB, rows aligned to 256
    lm_head_row = 5376 * 2  # bf16 dequantized row of the 31B lm_head
    rows = opts.chunk_rows(262144, lm_head_row)
    assert rows is not None and rows % 256 == 0 and rows * lm_head_row <= opts.matmul_chunk_bytes
    assert -(-262144 // rows) == 11
    assert opts.chunk_rows(21504, lm_head_row) is None  # the 31B MLP stays whole


# ---- KV recognition and the zero-byte pass ------------------------------------------------------

@pytest.mark.parametrize("functional", [True, False], ids=["functional", "training-ir"])
def test_kv_buffers_are_the_mutated_ones_not_named_ones(functional):
    ep = export_toy(KVToy().eval(), functional)
    assert kv_buffer_fqns(ep) == {"slot0", "slot1", "slot2"}


def test_zero_byte_pass_changes_the_program_not_the_module():
    model = KVToy().eval()
    ep = export_toy(model)
    sizes = {k: is_big(v) for k, v in {**ep.state_dict, **ep.constants}.items()}
    for p in low_memory_passes(BUDGET):
        ep = p(ep)
    program = {**ep.state_dict, **ep.constants}
    assert {k for k, v in program.items() if is_zero_byte(v)} == {k for k, big in sizes.items() if big}
    assert {"slot0", "proj.weight", "head.packed"} <= {k for k, big in sizes.items() if big}
    assert not is_zero_byte(program["gain"]) and not is_zero_byte(program["proj.bias"])
    assert all(t.untyped_storage().nbytes() > 0 for t in model.state_dict().values())
    assert all(b.untyped_storage().nbytes() > 0 for b in model.buffers())


def test_kv_only_mode_keeps_weight_bytes():
    ep = export_toy(KVToy().eval())
    for p in low_memory_passes(LowMemoryOptions(device="cpu", zero_weights=False)):
        ep = p(ep)
    program = {**ep.state_dict, **ep.constants}
    assert {k for k, v in program.items() if is_zero_byte(v)} == {"slot0", "slot1", "slot2"}


# ---- Inductor patches, unit level ----------------------------------------------------------------

def test_same_shape_zero_byte_tensors_are_not_deduplicated():
    from torch._inductor.utils import is_same_tensor

    a = zero_byte_like(torch.zeros(2, 4), "cpu", ByteSource.ZEROS)
    b = zero_byte_like(torch.zeros(2, 4), "cpu", ByteSource.ZEROS)
    assert is_same_tensor(a, b)  # stock Inductor: data_ptr 0 == 0, the bug this guards against
    patched = exclude_zero_byte_from_dedup(is_same_tensor)
    assert not patched(a, b)
    assert patched(a, a.view(2, 4))  # a real alias is still one constant
    real = torch.zeros(2, 4)
    assert patched(real, real) and not patched(real, torch.zeros(2, 4))


def test_patches_are_restored_after_the_block():
    from torch._inductor import compile_fx, graph
    from torch._inductor.graph import GraphLowering
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    before = (compile_fx.clone_preserve_strides, graph.is_same_tensor,
              GraphLowering.get_original_value_of_constant, CachingAutotuner.run, GraphLowering.compile_to_module)
    with pytest.raises(RuntimeError, match="boom"):
        with low_memory_inductor_patches(BUDGET):
            assert graph.is_same_tensor is not before[1]
            raise RuntimeError("boom")
    after = (compile_fx.clone_preserve_strides, graph.is_same_tensor,
             GraphLowering.get_original_value_of_constant, CachingAutotuner.run, GraphLowering.compile_to_module)
    assert after == before


def test_materialized_lends_zero_bytes_and_takes_them_back():
    z = zero_byte_like(torch.ones(4, 8), "cpu", ByteSource.HOST)
    view = _reinterpret_tensor(z, (2, 8), (8, 1), 16)  # rows 2..3: needs the whole storage
    with materialized([view, z]) as lent:
        assert lent == 4 * 8 * 4
        assert z.untyped_storage().nbytes() == lent and torch.count_nonzero(z) == 0
        view.fill_(1.0)
        assert z[2:].sum() == 16  # the alias saw the write
    assert is_zero_byte(z) and is_zero_byte(view)


def test_extern_ops_run_on_zero_byte_arguments():
    weight = zero_byte_like(torch.randn(64, 8), "cpu", ByteSource.HOST)
    cache = zero_byte_like(torch.zeros(4, 8), "cpu", ByteSource.ZEROS)
    x = torch.randn(3, 8)
    with LendBytesToOps():
        y = torch.mm(x, _reinterpret_tensor(weight, (8, 8), (1, 8), 64))  # a slice, read
        cache.index_copy_(0, torch.tensor([1]), x[:1])  # a write
    assert y.shape == (3, 8) and torch.count_nonzero(y) == 0
    assert is_zero_byte(weight) and is_zero_byte(cache)


# ---- the compile -------------------------------------------------------------------------------

def test_constants_are_zero_byte_while_compiling(compiled_toy):
    """Every constant over the small-constant size is zero-byte when Inductor serializes."""
    assert len(compiled_toy.constants) >= 6, compiled_toy.constants
    assert all(zero_or_small for _, _, zero_or_small, _ in compiled_toy.constants)
    assert compiled_toy.module_intact


def test_same_shape_kv_buffers_stay_distinct_constants(compiled_toy):
    fqns = [fqn for _, fqn, _, _ in compiled_toy.constants]
    assert sorted(f for f in fqns if f.startswith("slot")) == ["slot0", "slot1", "slot2"]
    runner = load_runner(compiled_toy.so)
    assert sorted(v for v in runner.get_constant_names_to_original_fqns().values() if v.startswith("slot")) \
        == ["slot0", "slot1", "slot2"]


def test_chunking_adds_no_constants(compiled_toy):
    fqns = sorted(fqn for _, fqn, _, _ in compiled_toy.constants)
    # one constant per program tensor (the inlined scalar aside), none made by slicing
    assert fqns == sorted(set(compiled_toy.host) - {"gain"})


def test_serialized_kv_bytes_are_zeros_and_weights_streamed(compiled_toy):
    """The blob Inductor wrote from stand-ins: KV re-synthesized as zeros, weights the host bytes."""
    blob = open(compiled_toy.blob, "rb").read()
    offset = 0
    for _, fqn, _, nbytes in compiled_toy.constants:
        chunk = blob[offset:offset + nbytes]
        offset += -(-nbytes // 64) * 64  # CPU constants are 64-byte aligned in the blob
        expected = compiled_toy.host[fqn].contiguous().view(torch.uint8).flatten().numpy().tobytes()
        if fqn.startswith("slot"):
            assert chunk == bytes(nbytes)
        assert chunk == expected, fqn
    assert offset == len(blob)


def test_low_memory_compile_matches_eager(compiled_toy):
    ref = eager_logits(compiled_toy.eager)
    by_blob = load_runner(compiled_toy.so)
    by_blob.update_constant_buffer_from_blob(compiled_toy.blob)
    by_name = load_runner(compiled_toy.so)
    fqns = by_name.get_constant_names_to_original_fqns()
    by_name.update_constant_buffer({n: compiled_toy.host[f].clone() for n, f in fqns.items()}, False, True, True)
    for runner in (by_blob, by_name):
        out = runner.run(list(toy_inputs()))[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- the chunked int4 matmul, graph level -----------------------------------------------------

def _slices_of(ep) -> list[tuple[int, int]]:
    return [(n.args[2], n.args[3]) for n in ep.graph.nodes
            if op_name(n.target) in ("slice", "slice_copy") and n.args[0].name.endswith("packed")]


@pytest.mark.parametrize("dialect", ["aten", "edge"])
def test_chunked_dequant_matmul_equals_unchunked(dialect):
    """Each slice's dequantized weight is bitwise the matching rows; the output equals the
    unsliced matmul (bitwise on CPU fp32; allowed fp rounding of the GEMM's accumulation)."""
    head = PackedHead(VOCAB, K, GROUP).eval()

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head(x[:, -1])

    x = torch.randn(1, 3, K)
    ep = torch.export.export(Head(), (x,), strict=False)
    if dialect == "edge":
        from executorch.exir import EdgeCompileConfig, to_edge
        ep = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()
    else:
        ep = ep.run_decompositions({})
    ref = ep.module()(x)
    assert chunk_int4_matmul(ep, BUDGET).modified
    assert _slices_of(ep) == [(0, 8192), (8192, 16384), (16384, 20480)]
    ep.graph_module.graph.lint()
    for n in ep.graph.nodes:  # every node the pass made carries metadata
        if n.op == "call_function" and "val" in n.meta:
            assert n.meta["val"] is not None
    out = ep.module()(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max()}"
    full = head.weight()
    for a, b in _slices_of(ep):
        sliced = PackedHead(b - a, K, GROUP)
        sliced.packed, sliced.scale, sliced.zero = head.packed[a:b], head.scale[a:b], head.zero[a:b]
        assert torch.equal(sliced.weight(), full[a:b])


def test_quant_int4_linear_is_chunked():
    """The exporter's CPU int4 form (export/gemma4/quant.py) matches the pattern too."""
    quant = pytest.importorskip("export.gemma4.quant")
    lin = quant.Int4Linear.from_float(torch.randn(VOCAB, K), 16)
    x = torch.randn(2, K)
    ep = torch.export.export(lin, (x,), strict=False).run_decompositions({})
    ref = ep.module()(x)
    assert chunk_int4_matmul(ep, BUDGET).modified
    assert torch.equal(ep.module()(x), ref)


def test_small_or_activation_matmuls_are_left_alone():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = PackedHead(256, K, GROUP)  # under the budget
            self.w = nn.Parameter(torch.randn(VOCAB, K))  # float weight: no dequant chain

        def forward(self, x, y):
            return self.small(x), x @ y.t(), F.linear(x, self.w)

    x, y = torch.randn(2, K), torch.randn(VOCAB, K)
    ep = torch.export.export(Mixed(), (x, y), strict=False).run_decompositions({})
    before = str(ep.graph)
    assert not chunk_int4_matmul(ep, BUDGET).modified
    assert str(ep.graph) == before


def test_decomposed_int4_linear_op_is_chunked():
    """The CUDA recipe's op (`gemma4::int4_linear`), decomposed as the CPU backend does, is a
    dequant chain the pass slices too: a low-memory CPU export of that layout stays bounded."""
    from export.backends.cpu import Gemma4CpuBackend
    from export.gemma4.quant import PackedInt4Linear

    lin = PackedInt4Linear.from_float(torch.randn(VOCAB, K), 32)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    ep = torch.export.export(lin, (x,), strict=False).run_decompositions(Gemma4CpuBackend.get_decomposition_table())
    ref = ep.module()(x)
    assert chunk_int4_matmul(ep, BUDGET).modified
    assert torch.equal(ep.module()(x), ref)
