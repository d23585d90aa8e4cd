"""AOTInductor backend for CUDA, over ExecuTorch 1.2's CUDA backend settings.

ExecuTorch's `CudaBackend` is final, so this backend borrows its pieces instead of
subclassing it: the Inductor options (max_autotune with Triton GEMMs only, no libtorch
link, embedded kernel binaries), the custom passes (cond predicate to CPU, SDPA ->
`triton::sdpa` when enabled), the conv1d decomposition, the MATH-SDPA compile context and
the one allowed fallback kernel, `aten::_weight_int4pack_mm` (torchao int4; the int4 recipe
now emits `gemma4::int4_linear`, whose Triton kernels compile into the `.so`). What differs
is in the shared base: no weights are serialized by Inductor (the exporter writes each
once into the `.ptd`).

With the compile spec `autotune` = b"0" (exporter flag `--no-autotune`) there is no
max_autotune and GEMMs may call cuBLAS through libtorch's shims: minutes faster for test
artifacts, runnable by the project's Python runner (inside libtorch) but not by ExecuTorch's
C++ CUDA runtime. Nothing is chosen by timing then (Inductor's deterministic mode, one
config per Triton SDPA, int4 and MoE kernel), so exports of one model agree bit for bit.

The model's attention is `gemma4::attention` (export/kernels/attention.py: reads only the
filled cache, int8/int4 KV), compiled into the .so from its Triton kernels; its graphs hold no
aten SDPA, so the SDPA swap below (`--sdpa`) finds nothing to replace there and is kept only for
graphs that still use aten SDPA.
The Triton SDPA kernel (`triton::sdpa`) wants bf16, no GQA and a bool mask; it is used
only when the compile spec `triton_kernel_mode` is b"ON" (ExecuTorch's own key), else SDPA
is decomposed (MATH backend) and any dtype / head layout compiles. ExecuTorch's replacement
pass matches edge-dialect SDPA only; the exporter keeps aten ops (no edge-op wrappers), so
`replace_sdpa_with_triton` below matches the aten op.

Kernels are compiled for the export GPU's architecture only (Triton's cubins), unless the
compile spec `multi_arch` is b"1" (exporter flag `--multi-arch-kernels`, ExecuTorch's
default): then each kernel is also turned into a PTX + SASS fatbin by a serial `nvcc` call.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import typing
from typing import Any, Iterator, final

import torch
from executorch.backends.cuda.cuda_backend import CudaBackend
from executorch.exir.backend.backend_details import BackendDetails
from executorch.exir.backend.compile_spec_schema import CompileSpec

from export.backends.aoti_base import Gemma4AotiBackend, Gemma4AotiPartitioner, TargetDevice, autotune_enabled
from export.kernels import int4_matmul, moe_int4
from export.passes.inductor_patches import _patched

TRITON_KERNEL_MODE = "triton_kernel_mode"
MULTI_ARCH = "multi_arch"  # b"1": fatbin kernels (PTX + SASS) that run on other GPU generations too


def replace_sdpa_with_triton(gm: torch.fx.GraphModule) -> bool:
    """aten SDPA -> `triton::sdpa` (same signature); returns whether the graph changed."""
    import executorch.backends.cuda.triton  # noqa: F401  (registers torch.ops.triton.sdpa)

    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.scaled_dot_product_attention.default:
            node.target = torch.ops.triton.sdpa.default
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def one_object_per_kernel_name(original):
    """Inductor's `convert_cubin_to_obj` for embedded kernel binaries (no fatbins) writes
    `<cubin>.o` and renames its symbols to `__<kernel>_start/_end/_size`. When two kernel
    names share one cubin (a custom Triton kernel launched from several places compiles to the
    same binary: `gemma4::int4_linear` in every layer), the second call overwrote the first
    object under the second name and the link listed that object twice: "multiple definition
    of `___int4_matmul_kernel_7_start'" on the H200. Each name gets a link to the cubin of its
    own, so each gets its own object and symbols."""
    def convert_cubin_to_obj(cubin_file: str, kernel_name: str, ld: str, objcopy: str) -> str:
        own = f"{cubin_file}.{kernel_name}.cubin"
        if not os.path.exists(own):
            try:
                os.link(cubin_file, own)
            except OSError:
                shutil.copyfile(cubin_file, own)
        return original(own, kernel_name, ld, objcopy)
    return convert_cubin_to_obj


@contextlib.contextmanager
def kernel_binary_patches() -> Iterator[None]:
    from torch._inductor import codecache

    with _patched(codecache, "convert_cubin_to_obj", one_object_per_kernel_name):
        yield


def triton_sdpa_spec(on: bool) -> CompileSpec:
    return CompileSpec(TRITON_KERNEL_MODE, b"ON" if on else b"OFF")


@contextlib.contextmanager
def one_config_per_user_kernel(module) -> Iterator[None]:
    """Each `@triton.autotune` kernel of `module` (ExecuTorch's SDPA) keeps one config while
    compiling: the smallest tile (it fits shared memory at any head dim), so no timing run
    picks the tiles and with them the order of the softmax accumulation."""
    from triton.runtime.autotuner import Autotuner

    def tile(c):
        return (c.kwargs.get("BLOCK_M", 0) * c.kwargs.get("BLOCK_N", 0), c.num_stages, c.num_warps)

    saved = {name: k.configs for name, k in vars(module).items() if isinstance(k, Autotuner) and len(k.configs) > 1}
    for name, configs in saved.items():
        getattr(module, name).configs = [min(configs, key=tile)]
    try:
        yield
    finally:
        for name, configs in saved.items():
            getattr(module, name).configs = configs


def multi_arch_spec(on: bool) -> CompileSpec:
    return CompileSpec(MULTI_ARCH, b"1" if on else b"0")


def multi_arch_enabled(compile_specs: list[CompileSpec]) -> bool:
    return any(s.key == MULTI_ARCH and s.value == b"1" for s in compile_specs)


@final
class Gemma4CudaBackend(Gemma4AotiBackend, BackendDetails):
    @classmethod
    def get_device_name(cls) -> str:
        return TargetDevice.CUDA.value

    @classmethod
    def move_target(cls) -> str:
        # An explicit index: constants made on "cuda:0" (low-memory mode) and moved to
        # plain "cuda" trip `_assert_tensor_metadata`.
        return "cuda:0"

    @classmethod
    def get_supported_fallback_kernels(cls) -> dict[str, Any]:
        return CudaBackend.get_supported_fallback_kernels()

    @classmethod
    def is_supported_fallback_kernel(cls, kernel: str, compile_specs: list[CompileSpec]) -> bool:
        # Without autotune, GEMMs go to cuBLAS through libtorch's shims: fine for the
        # project's runner (it runs inside libtorch), not for ExecuTorch's C++ CUDA runtime.
        return not autotune_enabled(compile_specs) or kernel in cls.get_supported_fallback_kernels()

    @classmethod
    def get_decomposition_table(cls) -> dict[Any, Any]:
        return CudaBackend.get_decomposition_table()

    @classmethod
    def get_custom_passes(cls, compile_specs: list[CompileSpec]) -> list[typing.Any]:
        specs = list(compile_specs)
        on = any(s.key == TRITON_KERNEL_MODE and s.value.upper() == b"ON" for s in specs)
        specs = [s for s in specs if s.key != TRITON_KERNEL_MODE] + [triton_sdpa_spec(on)]
        passes = CudaBackend.get_custom_passes(specs)  # edge-dialect SDPA, cond predicate
        return passes + ([replace_sdpa_with_triton] if on else [])

    @classmethod
    def get_aoti_compile_options(cls, compile_specs: list[CompileSpec]) -> dict[str, Any]:
        options = CudaBackend.get_aoti_compile_options(compile_specs)
        if not multi_arch_enabled(compile_specs):
            # ExecuTorch asks for fatbins: one `nvcc -fatbin` per kernel, run serially after
            # Triton compiled it (a third of a tiny export's lowering on the H100). The user
            # exports on the GPU they run on, so the kernels stay Triton's own cubins for that
            # arch; the metadata records it and the runner refuses another arch.
            options["aot_inductor.emit_multi_arch_kernel"] = False
        if not autotune_enabled(compile_specs):  # minutes less per test export
            options.update({"max_autotune": False, "max_autotune_gemm_backends": "ATEN,TRITON",
                            "max_autotune_conv_backends": "ATEN,TRITON",
                            # one config per pointwise kernel: AOTI compiles and benchmarks every
                            # config serially in its compile-time tuning script
                            "triton.autotune_pointwise": False,
                            # no timing run chooses a reduction's tiles: two exports of one model
                            # (stock and low-memory) compute bitwise the same logits
                            "deterministic": True})
        return options

    @classmethod
    def compile_context(cls, compile_specs: list[CompileSpec]):
        stack = contextlib.ExitStack()
        stack.enter_context(cls.get_extra_aoti_compile_context_manager())
        stack.enter_context(kernel_binary_patches())
        if autotune_enabled(compile_specs):
            return stack
        # the module (its package re-exports the op under the same name)
        sdpa_kernels = importlib.import_module("executorch.backends.cuda.triton.kernels.sdpa")
        from export.kernels import attention

        stack.enter_context(one_config_per_user_kernel(sdpa_kernels))
        stack.enter_context(int4_matmul.one_config())
        stack.enter_context(moe_int4.one_config())
        stack.enter_context(attention.use_configs(attention.smallest))  # gemma4::attention too
        return stack

    @classmethod
    def get_extra_aoti_compile_context_manager(cls):
        return CudaBackend.get_extra_aoti_compile_context_manager()


@final
class Gemma4CudaPartitioner(Gemma4AotiPartitioner):
    backend = Gemma4CudaBackend
