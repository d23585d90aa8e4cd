"""Every patch of torch / Inductor / ExecuTorch internals, in one register.

Each entry names the attribute it replaces, the library (and so the pinned version) it
belongs to, and why. `patched(name, make)` is the only way the project replaces one:
`make(original)` returns the replacement, which holds for the `with` block and is undone on
exit (also on error). Internals move between releases, so a patch refuses to apply on any
stack but the pinned one, with a message that says so, instead of failing somewhere deep
inside a compile.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Iterator

PINNED = {"torch": "2.11.0", "executorch": "1.2.0"}  # as pyproject.toml pins them


@dataclass(frozen=True)
class Patch:
    target: str  # "module:attr" or "module:Class.attr"
    lib: str  # a key of PINNED
    reason: str


PATCHES: dict[str, Patch] = {p.target.split(":")[1]: p for p in (
    # the backend (export/backends/aoti_base.py, cuda.py)
    Patch("torch._inductor.codecache:AotCodeCompiler.compile", "torch",
          "record the constant table Inductor bakes into the .so (names, FQNs, dtypes, shapes)"),
    Patch("torch._inductor.codegen.cpp_wrapper_cpu:CppWrapperCpu.generate_c_shim_extern_kernel_call", "torch",
          "collect fallback kernels the target runtime lacks (ExecuTorch's check, asking the backend)"),
    Patch("torch._inductor.codegen.cpp_wrapper_cpu:CppWrapperCpu.generate_fallback_kernel_with_runtime_lookup_aot",
          "torch", "the same check for kernels looked up at run time"),
    Patch("torch._inductor.codegen.cpp_wrapper_cpu:CppWrapperCpu.codegen_int_array_var", "torch",
          "its cache of size / stride array declarations is keyed by the buffer's writeline, not by id() of a "
          "temporary bound method: two buffers' writelines share that id, so a view in the final code could "
          "name an array declared only in another buffer (a flaky 'int_array_0 was not declared' C++ error)"),
    Patch("torch._inductor.codecache:convert_cubin_to_obj", "torch",
          "one object file per kernel name: two names sharing one cubin were linked twice"),
    Patch("torch._inductor.codegen.cuda.device_op_overrides:CUDADeviceOpOverrides.kernel_driver", "torch",
          "the kernels that wait on the grid before them launched with programmatic dependent launch"),
    Patch("torch._inductor.codegen.triton:TritonKernel._handle_pdl_before_access", "torch",
          "with PDL every Inductor kernel waits before its first access, not only where the kernel just "
          "before wrote what it reads: a kernel that never waits would let the next one start early"),
    # low-memory compiles on zero-byte constants (export/passes/inductor_patches.py)
    Patch("torch._inductor.compile_fx:clone_preserve_strides", "torch",
          "the unlift clone of a mutated buffer keeps a zero-byte buffer as it is"),
    Patch("torch._inductor.graph:is_same_tensor", "torch",
          "constant dedup never merges two zero-byte storages (all have pointer 0)"),
    Patch("torch._inductor.graph:GraphLowering.get_original_value_of_constant", "torch",
          "a zero-byte constant is handed out as a stand-in with its true size"),
    Patch("torch._inductor.runtime.triton_heuristics:CachingAutotuner.run", "torch",
          "Triton launches at compile time get zero-filled storage for zero-byte arguments"),
    Patch("torch._inductor.graph:GraphLowering.compile_to_module", "torch",
          "extern ops of the GPU first pass get temporary storage for zero-byte arguments"),
    # wrapped Triton kernels' host-side TMA descriptors through non-strict export (export/host_tma.py)
    Patch("torch._higher_order_ops.triton_kernel_wrap:TracingTritonHOPifier.call_HOP", "torch",
          "a TensorDescriptor argument reaches the graph as its tensor and block shape, as under dynamo "
          "(torch's non-dynamo tracer drops the metadata and files the descriptor as a constant)"),
    # retraces that change nothing are skipped (export/retrace.py)
    Patch("torch.export.exported_program:ExportedProgram.run_decompositions", "torch",
          "a decomposition matching no op of a program it already produced returns that program"),
    # ExecuTorch's deep copies of the programs alias parked weights (export/spool.py)
    Patch("torch:Tensor.__deepcopy__", "torch", "a parked or lazy-zero tensor is aliased, not copied"),
    Patch("torch.nn:Parameter.__deepcopy__", "torch", "a parked or lazy-zero parameter is aliased, not copied"),
)}


class StackMismatch(RuntimeError):
    """The installed torch / ExecuTorch is not the pinned one the patches were written for."""


def installed_version(lib: str) -> str:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_stack(lib: str) -> None:
    """Raise StackMismatch unless `lib` is at its pinned version (local suffixes such as
    "+cu130" are ignored)."""
    have, want = installed_version(lib).split("+")[0], PINNED[lib]
    if have != want:
        raise StackMismatch(f"{lib} {have} is installed; export/patches.py patches {lib} {want} internals "
                            f"and cannot vouch for another version: install the pinned stack (pip install -e .)")


def _owner(target: str) -> tuple[Any, str]:
    module, path = target.split(":")
    owner: Any = importlib.import_module(module)
    *classes, attr = path.split(".")
    for c in classes:
        owner = getattr(owner, c)
    return owner, attr


@contextlib.contextmanager
def patched(name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace the registered attribute `name` by `make(original)` for the block."""
    entry = PATCHES[name]
    check_stack(entry.lib)
    owner, attr = _owner(entry.target)
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    unwrapped = original.__func__ if isinstance(original, (classmethod, staticmethod)) else original
    replacement = make(unwrapped)
    if isinstance(original, (classmethod, staticmethod)):
        replacement = type(original)(replacement)
    setattr(owner, attr, replacement)
    try:
        yield
    finally:
        setattr(owner, attr, original)
