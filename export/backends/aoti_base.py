"""Shared AOTInductor backend over ExecuTorch 1.2's `AotiBackend`.

ExecuTorch's stock `AotiBackend.preprocess` ships, per method, the compiled `.so` AND a
`{method}_weights_blob` holding every constant; with two methods (prefill, decode) every
weight is stored twice and Inductor first joins all of them into one `bytes` object in host
memory. This base keeps the `.so` (named data `"{method}_so_blob"`) but compiles with
`package_constants_in_so=False` and no on-disk constants format, so Inductor serializes no
weights at all. Instead, preprocess records each AOTI constant's name, original FQN, dtype,
shape and stride (`ConstantInfo`) and hands that table back in `PreprocessResult`'s
`_delegate_info_meta`; the exporter writes each weight once into the `.ptd` from its own
state dict, keyed by FQN (see export/artifact.py and export/ARTIFACT.md).

Preprocess (one method at a time): read `BackendOptions` back from the compile specs, run
the pass pipeline (export/passes/pipeline.py: the low-memory passes when asked, the device
move, the target's passes and decompositions), then `torch._inductor.aot_compile` of the program's
module (our Triton ops that write their arguments called in place again: export/passes/inplace_triton_ops.py) inside
the fallback-kernel check, no_grad, the C++ wrapper's int arrays declared per buffer
(`int_arrays_per_buffer`, an Inductor bug), the target's compile context, the low-memory
Inductor patches when asked, and the constant-table capture. Progress goes out as stage events
(export/stages.py). Every patch of torch internals is registered in export/patches.py.
"""

from __future__ import annotations

import contextlib
import os
import typing
from typing import Any, ContextManager, Iterator

import torch
from executorch.backends.aoti.aoti_backend import AotiBackend
from executorch.backends.aoti.aoti_partitioner import AotiPartitioner
from executorch.exir._serialize._named_data_store import NamedDataStore
from executorch.exir.backend.backend_details import ExportedProgram, PreprocessResult
from executorch.exir.backend.compile_spec_schema import CompileSpec

from export import stages
from export.backends.options import BackendOptions, TargetDevice
from export.constants import CompiledMethod, ConstantInfo, ConstantKind
from export.host_tma import host_tma_descriptors
from export.passes.make_constants_zero_byte import SMALL_CONSTANT_BYTES
from export.passes.pipeline import PipelineContext, run_pipeline
from export.retrace import drop_provenance
from export.patches import patched
from runtime.artifact import so_blob_key


@contextlib.contextmanager
def capture_constants(sink: list[ConstantInfo]) -> Iterator[None]:
    """Record the constant table Inductor bakes into the `.so`.

    Wraps `AotCodeCompiler.compile`, which receives the finished `GraphLowering`; the FQN
    rule mirrors `CppWrapperCpu.codegen_model_constructor` (dynamo's flat-name map first,
    then `allocated_constant_name`), and the exporter's test checks it against
    `get_constant_names_to_original_fqns()` of the loaded `.so`.
    """
    from torch._inductor.utils import normalize_name

    def record_constants(original):
        def compile_and_record(cls, graph, *args, **kwargs):
            params = {normalize_name(p) for p in graph.named_parameters}
            buffers = {normalize_name(b) for b in graph.named_buffers}
            for name, value in graph.constants.items():
                if name in graph.folded_constants:
                    continue
                fqn = graph.dynamo_flat_name_to_original_fqn.get(name) or graph.allocated_constant_name.get(name, name)
                kind = (ConstantKind.PARAMETER if name in params else
                        ConstantKind.BUFFER if name in buffers else ConstantKind.TENSOR_CONSTANT)
                original_value = graph.get_original_value_of_constant(name)
                # tensors tracing made have no module FQN: the .ptd needs their value (all small)
                small = original_value.numel() * original_value.element_size() <= SMALL_CONSTANT_BYTES
                copy = (original_value.detach().to("cpu", copy=True)
                        if kind is ConstantKind.TENSOR_CONSTANT or small else None)
                sink.append(ConstantInfo(name=name, fqn=fqn, dtype=value.dtype, shape=tuple(value.shape),
                                         stride=tuple(value.stride()), kind=kind, value=copy))
            return original(cls, graph, *args, **kwargs)
        return compile_and_record

    with patched("AotCodeCompiler.compile", record_constants):
        yield




@contextlib.contextmanager
def int_arrays_per_buffer() -> Iterator[None]:
    """The C++ wrapper's size / stride arrays declared in the buffer that uses them. Inductor caches each
    array's variable under (array, id(writeline), ...), where writeline is a temporary bound method: the
    next temporary, of another buffer (the first and second codegen passes write to different ones),
    takes the freed one's id and so its variable, declared only in the other buffer. The final code then
    names an undeclared `int_array_N` and the C++ compile fails, depending on allocation order (seen on
    one of seven 26B-A4B slice exports). The bound method itself is the key here: equal only for the
    same buffer, and it keeps that buffer alive, so no id is reused."""
    def per_buffer(original):
        def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
            cache = self.__dict__.setdefault("_int_arrays_per_buffer", {})
            key = (int_array, writeline, known_statically, graph)
            if key not in cache:
                cache[key] = self._codegen_int_array_var_impl(int_array, writeline, known_statically)
            return cache[key]
        return codegen_int_array_var

    with patched("CppWrapperCpu.codegen_int_array_var", per_buffer):
        yield


class Gemma4AotiBackend(AotiBackend):
    """Mixin: a concrete backend inherits this and `BackendDetails` and names a device.

    Subclasses provide `get_device_name`, `compile_options`, `target_passes`,
    `get_decomposition_table` and `is_supported_fallback_kernel`.
    """

    # Inductor options that every target needs for the one-weight-copy artifact.
    CONSTANT_OPTIONS: typing.ClassVar[dict[str, Any]] = {
        "aot_inductor.package": True,  # aot_compile returns the list of files it wrote
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": None,  # serialize no weights at all
        "aot_inductor.link_libtorch": False,
        # every constant stays a bound tensor: Inductor would otherwise bake the values of
        # 0-d and short 1-D ones (a layer's `layer_scalar`) into the code, and a program
        # compiled once for many layers (export/chain.py) must read each layer's own
        "always_keep_tensor_constants": True,
    }

    @classmethod
    def move_target(cls) -> str:
        """The device string `move_to_device_pass` moves constants to."""
        return cls.get_device_name()

    @classmethod
    def get_supported_fallback_kernels(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def is_supported_fallback_kernel(cls, kernel: str, options: BackendOptions) -> bool:
        return kernel in cls.get_supported_fallback_kernels()

    @classmethod
    def target_passes(cls, options: BackendOptions) -> list:
        """The target's own graph rewrites (step 5 of export/passes/pipeline.py)."""
        return []

    @classmethod
    def compile_options(cls, options: BackendOptions) -> dict[str, Any]:
        """Inductor options of the target (CONSTANT_OPTIONS are added on top)."""
        return {}

    @classmethod
    def check_compiled(cls, method: str, so_data: bytes) -> None:
        """Look over a compiled `.so` before it is stored (notes for the user; nothing by default)."""

    @classmethod
    @contextlib.contextmanager
    def check_fallback_kernels(cls, missing: set[str], options: BackendOptions) -> Iterator[None]:
        """ExecuTorch's `collect_unsupported_fallback_kernels`, asking
        `is_supported_fallback_kernel` (which may depend on the options)."""
        def check_extern(extern):
            def generate_c_shim_extern_kernel_call(self, kernel, *args, **kwargs):
                if not cls.is_supported_fallback_kernel(kernel, options):
                    missing.add(kernel)
                return extern(self, kernel, *args, **kwargs)
            return generate_c_shim_extern_kernel_call

        def check_lookup(lookup):
            def generate_fallback_kernel_with_runtime_lookup_aot(self, op_overload, *args, **kwargs):
                name = getattr(op_overload, "_name", str(op_overload))
                if not cls.is_supported_fallback_kernel(name, options):
                    missing.add(name)
                return lookup(self, op_overload, *args, **kwargs)
            return generate_fallback_kernel_with_runtime_lookup_aot

        with patched("CppWrapperCpu.generate_c_shim_extern_kernel_call", check_extern), \
                patched("CppWrapperCpu.generate_fallback_kernel_with_runtime_lookup_aot", check_lookup):
            yield

    @classmethod
    def compile_context(cls, options: BackendOptions) -> ContextManager:
        """Entered around `aot_compile`; by default ExecuTorch's extra context manager."""
        return cls.get_extra_aoti_compile_context_manager()

    @classmethod
    def _prepare(cls, program: ExportedProgram, options: BackendOptions) -> ExportedProgram:
        """The program Inductor will compile: the pass pipeline (export/passes/pipeline.py)."""
        ctx = PipelineContext(device=cls.move_target(), low_memory=options.low_memory,
                              target_passes=cls.target_passes(options),
                              decompositions=cls.get_decomposition_table())
        return run_pipeline(drop_provenance(program), ctx)

    @classmethod
    def _compile(cls, program: ExportedProgram, options: BackendOptions) -> tuple[str, list[ConstantInfo]]:
        """aot_compile; returns the `.so` path and the constant table."""
        inductor_options = {**cls.compile_options(options), **cls.CONSTANT_OPTIONS}
        inputs = tuple(n.meta["val"] for n in program.graph.nodes
                       if n.op == "placeholder" and n.name in program.graph_signature.user_inputs)
        missing: set[str] = set()
        constants: list[ConstantInfo] = []
        if options.low_memory is not None:
            from export.passes import low_memory_inductor_patches
            lm_patches = low_memory_inductor_patches(options.low_memory)
        else:
            lm_patches = contextlib.nullcontext()
        with cls.check_fallback_kernels(missing, options), torch.no_grad(), int_arrays_per_buffer(), \
                cls.compile_context(options), lm_patches, capture_constants(constants):
            paths = torch._inductor.aot_compile(_inductor_module(program), inputs, options=inductor_options)
        if missing:
            raise RuntimeError(f"method {options.method}: kernels the {cls.get_device_name()} runtime lacks: "
                               + ", ".join(sorted(missing)))
        paths = paths if isinstance(paths, list) else [paths]
        so = [p for p in paths if isinstance(p, str) and p.endswith(".so")]
        if len(so) != 1:
            raise RuntimeError(f"method {options.method}: expected one .so from aot_compile, got {paths}")
        return so[0], constants

    @classmethod
    def preprocess(cls, edge_program: ExportedProgram, compile_specs: list[CompileSpec]) -> PreprocessResult:
        options = BackendOptions.from_specs(compile_specs)
        method = options.method
        stages.emit(stages.StageEvent(stages.LOWER, stages.ADVANCE, detail=f"{method}: AOTInductor compile"))
        with host_tma_descriptors():  # the ops' Triton kernels traced here may take TMA descriptors
            program = cls._prepare(edge_program, options)
            so_path, constants = cls._compile(program, options)
        with open(so_path, "rb") as f:
            so_data = f.read()
        os.remove(so_path)
        cls.check_compiled(method, so_data)
        store = NamedDataStore()
        store.add_named_data(so_blob_key(method), so_data, 1, None)
        info = CompiledMethod(method=method, device=TargetDevice(cls.get_device_name()),
                              constants=tuple(constants), so_size=len(so_data))
        stages.emit(stages.StageEvent(stages.LOWER, stages.ADVANCE, detail=f"{method}: compiled", n=1))
        return PreprocessResult(processed_bytes=b"", debug_handle_map={},
                                data_store_output=store.get_named_data_store_output(),
                                _delegate_info_meta=info)


def _inductor_module(program: ExportedProgram) -> torch.fx.GraphModule:
    """The module Inductor compiles: the program unlifted, our Triton ops that write their arguments called in
    place again (export/passes/inplace_triton_ops.py)."""
    from export.passes.inplace_triton_ops import inplace_triton_ops

    module = program.module()
    inplace_triton_ops(module)
    return module


class Gemma4AotiPartitioner(AotiPartitioner):
    """ExecuTorch's whole-graph AOTI partitioner, bound to a backend class by name."""

    backend: typing.ClassVar[type]

    def __init__(self, compile_spec: list[CompileSpec]) -> None:
        super().__init__(self.backend.__name__, compile_spec)
