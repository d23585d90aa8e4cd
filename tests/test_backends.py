"""The AOTI base on a toy with a mutated KV buffer and a chunk (split): the weight-free .so,
the constant table it reports, the low-memory steps, and running the .so standalone."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from export.backends import BackendOptions, TargetDevice, partitioner_for
from export.constants import CompiledMethod, ConstantKind

pytestmark = pytest.mark.slow


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.proj = nn.Linear(16, 32, bias=False)
        self.register_buffer("kv", torch.zeros(1, 16, 16), persistent=False)

    def forward(self, tokens, pos):
        x = self.embed(tokens)  # (1, T, 16)
        a, b = self.proj(x).chunk(2, dim=-1)  # edge IR makes this split_copy
        T = tokens.shape[1]
        self.kv.index_copy_(1, pos + torch.arange(T), a * torch.sigmoid(b))
        return (self.kv.sum(1) @ self.embed.weight.T).float()


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """Both methods lowered with low-memory on and recording stand-ins for the low-memory
    passes and Inductor patches (the pipeline looks them up when it runs)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from export.passes import chunk_int4_matmul, make_constants_zero_byte
    from export.passes.options import LowMemoryOptions

    calls = []

    def chunk(program, options):
        calls.append(("chunk", options))
        calls.append(("pass_ran", sorted(program.state_dict)))

    def zero(program, device, include_weights=True):
        calls.append(("zero", device))
        return program

    @contextlib.contextmanager
    def patches(options):
        calls.append(("enter", options))
        yield
        calls.append(("exit", None))

    mp = pytest.MonkeyPatch()
    mp.setattr(chunk_int4_matmul, "chunk_int4_matmul", chunk)
    mp.setattr(make_constants_zero_byte, "make_constants_zero_byte", zero)
    mp.setattr("export.passes.low_memory_inductor_patches", patches)
    torch.manual_seed(0)
    model = Toy().eval()
    T = torch.export.Dim("T", min=1, max=4)
    with torch.no_grad():
        progs = {"prefill": torch.export.export(model, (torch.zeros(1, 4, dtype=torch.long), torch.tensor([0])),
                                                dynamic_shapes=({1: T}, None)),
                 "decode": torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])))}
    options = LowMemoryOptions(matmul_chunk_mib=4)
    parts = {m: [partitioner_for(TargetDevice.CPU, BackendOptions(m, low_memory=options))] for m in progs}
    try:
        edge = to_edge_transform_and_lower(progs, partitioner=parts,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
    finally:
        mp.undo()
    from export.pipeline import compiled_methods
    return model, edge, compiled_methods(edge), calls, tmp_path_factory.mktemp("toy_so")


def test_low_memory_steps_get_options_run_before_compile_and_patches_wrap_it(lowered):
    calls = lowered[3]
    per_method = [c[0] for c in calls]
    assert per_method == ["chunk", "pass_ran", "zero", "enter", "exit"] * 2
    # the passes learn the device move target (they place stand-ins there), the rest travels as given
    assert calls[0][1].device == "cpu" and calls[0][1].matmul_chunk_mib == 4 and calls[2][1] == "cpu"
    assert calls[3][1].matmul_chunk_mib == 4
    assert calls[1][1] == ["embed.weight", "proj.weight"]  # the pass sees the lifted weights


def test_backend_options_round_trip_through_compile_specs():
    from export.passes.options import LowMemoryOptions

    for options in (BackendOptions("decode"), BackendOptions("prefill", autotune=False, multi_arch=True),
                    BackendOptions("prefill", low_memory=LowMemoryOptions(device="cpu", zero_weights=False))):
        assert BackendOptions.from_specs(options.to_specs()) == options


def test_constant_table_names_fqns_and_kinds(lowered):
    compiled: dict[str, CompiledMethod] = lowered[2]
    for method, cm in compiled.items():
        assert cm.method == method and cm.device is TargetDevice.CPU and cm.so_size > 0
        table = {c.fqn: c for c in cm.constants}
        assert set(table) == {"embed.weight", "proj.weight", "kv"}
        assert table["kv"].kind is ConstantKind.BUFFER and table["proj.weight"].kind is ConstantKind.PARAMETER
        assert table["kv"].shape == (1, 16, 16) and table["proj.weight"].stride == (16, 1)


def test_pte_carries_only_the_so(lowered):
    edge = lowered[1]
    store = edge._named_data_store
    assert set(store.pte_data) == {"prefill_so_blob", "decode_so_blob"} and not store.external_data


@torch.no_grad()
def test_weight_free_so_runs_standalone_with_bound_constants(lowered):
    """No proxy executor (split_copy became split), no weights inside: bind by name and run;
    prefill and decode share one KV tensor."""
    model, edge, compiled, _, tmp = lowered
    blobs = edge._named_data_store
    lib = Path(torch.__file__).parent / "lib"
    ctypes.CDLL(str(lib / "libtorch_cpu.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    kv = torch.zeros(1, 16, 16)
    tensors = {"embed.weight": model.embed.weight, "proj.weight": model.proj.weight, "kv": kv}
    runners = {}
    for method, cm in compiled.items():
        so = tmp / f"{method}.so"
        so.write_bytes(blobs.buffers[blobs.pte_data[f"{method}_so_blob"].buffer_index])
        r = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
        assert r.get_constant_names_to_original_fqns() == {c.name: c.fqn for c in cm.constants}
        r.update_constant_buffer({c.name: tensors[c.fqn] for c in cm.constants}, False, True, True)
        runners[method] = r
    model.kv.zero_()
    tok = torch.tensor([[3, 9, 27]])
    torch.testing.assert_close(runners["prefill"].run([tok, torch.tensor([0])])[0], model(tok, torch.tensor([0])))
    one = torch.tensor([[5]])
    torch.testing.assert_close(runners["decode"].run([one, torch.tensor([3])])[0], model(one, torch.tensor([3])))
    torch.testing.assert_close(kv, model.kv)


def test_kernels_sharing_one_cubin_get_an_object_each(tmp_path):
    """Two kernel names over one cubin (a custom kernel launched from many layers) must link
    as two objects with their own symbols, not one object listed twice."""
    import shutil
    import subprocess

    from torch._inductor import codecache
    from torch._inductor.cpp_builder import get_ld_and_objcopy

    from export.backends.cuda import kernel_binary_patches

    if shutil.which("objcopy") is None:
        pytest.skip("binutils' objcopy is not installed")
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(b"\x7fELF fake kernel binary")
    ld, objcopy = get_ld_and_objcopy(False)
    with kernel_binary_patches():
        objs = [codecache.convert_cubin_to_obj(str(cubin), name, ld, objcopy) for name in ("kern_7", "kern_9")]
    assert len(set(objs)) == 2
    for obj, name in zip(objs, ("kern_7", "kern_9")):
        symbols = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
        assert f"__{name}_start" in symbols and f"__{name}_end" in symbols
    assert codecache.convert_cubin_to_obj.__module__ == "torch._inductor.cpp_builder"  # restored


def test_int_array_declarations_stay_with_the_buffer_that_uses_them():
    """The C++ wrapper's size / stride arrays: Inductor's own cache (keyed by id() of a temporary bound method) hands
    a second buffer the variable it declared in a first one, leaving the second without its declaration (the
    undeclared `int_array_0` of a flaky C++ compile); under the backend's patch each buffer declares what it uses,
    a buffer asking again gets its own variable back, and the method is restored after the block."""
    from itertools import count

    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.utils import IndentedBuffer
    from torch.utils._ordered_set import OrderedSet

    from export.backends.aoti_base import int_arrays_per_buffer

    def declare(patched_in: bool) -> tuple[list[str], list[str]]:
        w = object.__new__(CppWrapperCpu)  # the state codegen_int_array_var reads, no graph
        w.codegen_int_array_var_cache, w.int_array_id, w.declared_int_array_vars = {}, count(), OrderedSet()
        first, second = IndentedBuffer(), IndentedBuffer()
        with int_arrays_per_buffer() if patched_in else contextlib.nullcontext():
            names = [w.codegen_int_array_var("{1L, 2816L}", buf.writeline, known_statically=True)
                     for buf in (first, second, first)]
        return names, [first.getvalue(), second.getvalue()]

    names, (first, second) = declare(False)
    if names[0] == names[1]:  # the temporaries' ids met (CPython reuses the freed one): the bug
        assert names[0] not in second
    names, (first, second) = declare(True)
    assert names[0] != names[1] and names[2] == names[0], names
    assert f"{names[0]}[] = {{1L, 2816L}}" in first and f"{names[1]}[] = {{1L, 2816L}}" in second
    assert names[1] not in first and names[0] not in second
    assert CppWrapperCpu.codegen_int_array_var.__module__ == "torch._inductor.codegen.cpp_wrapper_cpu"  # restored
