"""Inductor patches that let `torch._inductor.aot_compile` run on zero-byte constants.

torch 2.11's Inductor touches constant bytes in exactly these places; each patch below is
one small function, and `zero_byte_inductor_patches()` applies them all for one `with`
block through export/patches.py (the register of every patch, with the version check) and
restores the originals on exit (also on error):

1. `_unlift_graph` clones every mutated buffer (`compile_fx.clone_preserve_strides`) to keep
   its initial value; a zero-byte buffer is returned as is (its initial value is its
   registered byte source, so there is nothing to protect and nothing to copy).
2. `graph.is_same_tensor` dedups constants by storage pointer; every zero-byte storage has
   pointer 0, so same-shape KV caches would collapse into one constant. Zero-byte tensors
   are the same only when they share the very same storage object.
3. `GraphLowering.get_original_value_of_constant` feeds the `.so`'s constant table and, when
   Inductor serializes constants, the weights blob. A zero-byte constant is handed out as a
   `ConstantStandIn`: the same metadata, a true `data_size`, and bytes produced on the host
   only if serialization asks (zeros for KV, the host tensor for a weight).
4. `CachingAutotuner.run` launches Triton kernels (autotuning and the GPU first pass of the
   cpp-wrapper codegen); zero-byte arguments get zero-filled storage for that call, freed
   after a synchronize.
5. The GPU first pass also runs extern kernels from Python (e.g. a cuBLAS matmul);
   a dispatch mode gives their zero-byte arguments temporary zero storage (a fresh tensor
   the size of the view for a read, the storage itself lent in place for a write).

Patches 4 and 5 matter only when `triton.autotune_at_compile_time` is False (the two-pass
GPU codegen that runs the compiled wrapper on the real constants); torch 2.11's default for
the cpp wrapper is True, where a generated script tunes kernels on example tensors instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from export.patches import patched
from export.passes.zero_byte import host_bytes, is_zero_byte, materialized, required_nbytes


# ---- 1. the unlift clone ------------------------------------------------------------------

def keep_zero_byte_in_unlift_clone(original):
    """`clone_preserve_strides` that leaves zero-byte tensors as they are."""
    def clone_preserve_strides(x: torch.Tensor) -> torch.Tensor:
        return x if is_zero_byte(x) else original(x)
    return clone_preserve_strides


# ---- 2. constant dedup --------------------------------------------------------------------

def exclude_zero_byte_from_dedup(original):
    """`is_same_tensor` that never merges two different zero-byte storages."""
    def is_same_tensor(data: torch.Tensor, value: torch.Tensor) -> bool:
        if is_zero_byte(data) or is_zero_byte(value):
            same_storage = data.untyped_storage()._cdata == value.untyped_storage()._cdata
            return same_storage and original(data, value)
        return original(data, value)
    return is_same_tensor


# ---- 3. constant values for the .so table and the blob ------------------------------------

class _HostBackedStorage:
    """What `ConstantStandIn.untyped_storage()` returns: the true size, host bytes on demand."""

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor  # the zero-byte constant

    def nbytes(self) -> int:
        return required_nbytes(self._tensor)

    def cpu(self) -> torch.UntypedStorage:
        return host_bytes(self._tensor)

    @property
    def device(self) -> torch.device:
        return self._tensor.device


# Tensor methods that only read metadata; anything else on a stand-in first gets its value.
_METADATA_METHODS = {"size", "stride", "storage_offset", "dim", "ndimension", "numel", "nelement",
                     "element_size", "is_contiguous", "data_ptr", "get_device", "__hash__"}


def _is_metadata_query(func: Any) -> bool:
    return getattr(func, "__name__", "") in _METADATA_METHODS or getattr(func, "__name__", "") == "__get__"


class ConstantStandIn(torch.Tensor):
    """A zero-byte constant as Inductor's constant table and blob writer see it.

    Shape, stride, dtype, device and offset are the constant's own; `untyped_storage()`
    reports the size the real constant has (so the `.so` records the same `data_size` as a
    stock compile) and yields its bytes on the host only when `.cpu()` is called. Any other
    tensor operation (say, a caller copying the value to the CPU) runs on the real value,
    rebuilt from its byte source for that call: a zero-byte tensor itself would crash it.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if _is_metadata_query(func):
                return func(*args, **kwargs)
            args, kwargs = tree_map_only(ConstantStandIn, _real_value, (args, kwargs))
            return func(*args, **kwargs)

    def untyped_storage(self) -> _HostBackedStorage:  # type: ignore[override]
        return _HostBackedStorage(self.as_subclass(torch.Tensor))


def _real_value(stand_in: ConstantStandIn) -> torch.Tensor:
    """The constant's true value on its device, rebuilt from its registered byte source."""
    t = stand_in.as_subclass(torch.Tensor)
    host = torch.empty(0, dtype=t.dtype).set_(host_bytes(t), 0, (required_nbytes(t) // t.element_size(),), (1,))
    return torch.as_strided(host, t.shape, t.stride(), t.storage_offset()).to(t.device)


def stand_in_for_zero_byte_constants(original):
    """`get_original_value_of_constant` that wraps zero-byte constants in a stand-in."""
    def get_original_value_of_constant(self, name: str) -> torch.Tensor:
        value = original(self, name)
        return value.as_subclass(ConstantStandIn) if is_zero_byte(value) else value
    return get_original_value_of_constant


# ---- 4. Triton launches -------------------------------------------------------------------

def lend_bytes_to_kernel_args(original):
    """`CachingAutotuner.run` whose zero-byte tensor arguments get temporary storage."""
    def run(self, *args, **kwargs):
        with materialized(tree_leaves((args, kwargs))):
            return original(self, *args, **kwargs)
    return run


# ---- 5. extern kernels in the GPU first pass ----------------------------------------------

def _written_tensor_ids(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> set[int]:
    """ids of the tensors an op writes (in-place self, out=), per its schema."""
    ids = set()
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        ids.update(id(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    return ids


def _zeros_with_layout(t: torch.Tensor) -> torch.Tensor:
    """A fresh zero tensor with `t`'s shape and strides (not its offset: only its extent)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).zero_()


class LendBytesToOps(TorchDispatchMode):
    """Aten ops with zero-byte tensor arguments run on temporary zero storage.

    A zero-byte argument the op only reads is replaced by a fresh zero tensor of its view's
    extent (a slice of a big constant costs the slice); one it writes gets its storage lent
    in place, so aliases see the write. View ops pass through (they need no bytes).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or not any(is_zero_byte(x) for x in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        written = _written_tensor_ids(func, args, kwargs)
        lent = [t for t in tree_leaves((args, kwargs)) if id(t) in written]
        args, kwargs = tree_map_only(
            torch.Tensor, lambda t: _zeros_with_layout(t) if is_zero_byte(t) and id(t) not in written else t,
            (args, kwargs))
        with materialized(lent):
            return func(*args, **kwargs)


def lend_bytes_in_first_pass(original):
    """`GraphLowering.compile_to_module` whose Python module runs under `LendBytesToOps`
    when it is the cpp-wrapper first pass (AOT mode, Python wrapper, GPU)."""
    def compile_to_module(self):
        module = original(self)
        if not (self.aot_mode and not self.cpp_wrapper):
            return module
        return _FirstPassModule(module)
    return compile_to_module


class _FirstPassModule:
    """Proxy of a compiled wrapper module whose `call` runs under `LendBytesToOps`."""

    def __init__(self, module: Any):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def call(self, *args, **kwargs):
        with LendBytesToOps():
            return self._module.call(*args, **kwargs)


# ---- all together -------------------------------------------------------------------------

@contextlib.contextmanager
def zero_byte_inductor_patches() -> Iterator[None]:
    """Apply patches 1-5 (see the module docstring) for the duration of the block."""
    from torch._inductor import config

    if config.freezing or config.aot_inductor.use_runtime_constant_folding:
        raise RuntimeError("low-memory mode cannot freeze or fold constants: their bytes are not there")
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched("clone_preserve_strides", keep_zero_byte_in_unlift_clone))
        stack.enter_context(patched("is_same_tensor", exclude_zero_byte_from_dedup))
        stack.enter_context(patched("GraphLowering.get_original_value_of_constant", stand_in_for_zero_byte_constants))
        stack.enter_context(patched("CachingAutotuner.run", lend_bytes_to_kernel_args))
        stack.enter_context(patched("GraphLowering.compile_to_module", lend_bytes_in_first_pass))
        yield
