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

Preprocess order (one method at a time):
  1. low-memory ExportedProgram passes (only with `low_memory`, see "Low-memory hook")
  2. `move_to_device_pass` to the target device
  3. ExecuTorch's `ReplaceViewCopyWithViewPass`, then the subclass's custom passes
  4. the subclass's decompositions, then `replace_split_copy_with_split` (no op may need
     the proxy executor; last because ExecuTorch's verifier rejects aten.split)
  5. `torch._inductor.aot_compile`, inside: fallback-kernel check, no_grad, the subclass's
     extra context, the low-memory Inductor patches, and the constant-table capture.

Low-memory hook (export.passes plugs in here without editing this file):
  With the compile spec `CompileSpecKey.LOW_MEMORY` set to b"1", preprocess imports
  `export.passes` and calls
    - `low_memory_passes(options: dict[str, str]) -> list[Callable[[ExportedProgram], ExportedProgram]]`
      run in order before the device move; each returns the (possibly new) program;
    - `low_memory_inductor_patches(options: dict[str, str]) -> ContextManager`
      entered around `aot_compile`.
  `options` holds every compile spec whose key starts with "low_memory." (prefix stripped,
  values decoded as UTF-8), so new knobs travel without touching this file; the passes
  also get `options["device"]`, the device string `move_to_device_pass` targets next. If
  `export.passes` lacks these names, preprocess raises a clear error rather than silently
  compiling the memory-hungry way.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
from executorch.backends.aoti.aoti_backend import AotiBackend
from executorch.backends.aoti.aoti_partitioner import AotiPartitioner
from executorch.backends.aoti.passes.replace_view_copy_with_view import ReplaceViewCopyWithViewPass
from executorch.exir._serialize._named_data_store import NamedDataStore
from executorch.exir.backend.backend_details import ExportedProgram, PreprocessResult
from executorch.exir.backend.compile_spec_schema import CompileSpec
from torch.export.passes import move_to_device_pass


class TargetDevice(str, enum.Enum):
    """Where the compiled `.so` runs."""

    CUDA = "cuda"
    CPU = "cpu"


class CompileSpecKey(str, enum.Enum):
    """Compile-spec keys this backend reads (values are UTF-8 bytes)."""

    METHOD_NAME = "method_name"  # same key as ExecuTorch's AotiBackend
    LOW_MEMORY = "low_memory"  # b"1" turns on the export.passes hook
    LOW_MEMORY_OPTION_PREFIX = "low_memory."  # free-form options handed to the hook
    AUTOTUNE = "autotune"  # b"0": no max_autotune (fast compiles of test artifacts)


class ConstantKind(str, enum.Enum):
    """How Inductor classified a constant (same rule as its AOTI codegen)."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    TENSOR_CONSTANT = "tensor_constant"


@dataclass(frozen=True)
class ConstantInfo:
    """One AOTI constant of a compiled method, as the `.so` names and expects it."""

    name: str  # AOTI constant name (what update_constant_buffer takes)
    fqn: str  # original FQN in the eager model, as get_constant_names_to_original_fqns reports
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    kind: ConstantKind
    # For TENSOR_CONSTANT only (small tensors tracing made, with no module FQN): a CPU copy
    # of the value, since the exporter's state dict cannot provide it.
    value: torch.Tensor | None = None


@dataclass(frozen=True)
class CompiledMethod:
    """What preprocess hands the exporter through `_delegate_info_meta`."""

    method: str
    device: TargetDevice
    constants: tuple[ConstantInfo, ...]
    so_size: int


def method_name_spec(method: str) -> CompileSpec:
    return CompileSpec(CompileSpecKey.METHOD_NAME.value, method.encode())


def low_memory_specs(options: dict[str, str] | None = None) -> list[CompileSpec]:
    """Compile specs that turn on the low-memory hook, with its options."""
    specs = [CompileSpec(CompileSpecKey.LOW_MEMORY.value, b"1")]
    prefix = CompileSpecKey.LOW_MEMORY_OPTION_PREFIX.value
    specs += [CompileSpec(prefix + k, str(v).encode()) for k, v in (options or {}).items()]
    return specs


def _spec_value(compile_specs: list[CompileSpec], key: str) -> str | None:
    for spec in compile_specs:
        if spec.key == key:
            return spec.value.decode()
    return None


def autotune_spec(on: bool) -> CompileSpec:
    return CompileSpec(CompileSpecKey.AUTOTUNE.value, b"1" if on else b"0")


def autotune_enabled(compile_specs: list[CompileSpec]) -> bool:
    return _spec_value(compile_specs, CompileSpecKey.AUTOTUNE.value) != "0"


def _low_memory_options(compile_specs: list[CompileSpec]) -> dict[str, str] | None:
    """None when low-memory mode is off, else the options for export.passes."""
    if _spec_value(compile_specs, CompileSpecKey.LOW_MEMORY.value) != "1":
        return None
    prefix = CompileSpecKey.LOW_MEMORY_OPTION_PREFIX.value
    return {s.key[len(prefix):]: s.value.decode() for s in compile_specs if s.key.startswith(prefix)}


def _load_low_memory_hook() -> tuple[Callable[..., list], Callable[..., ContextManager]]:
    """`export.passes.low_memory_passes` / `low_memory_inductor_patches`, or a clear error."""
    try:
        passes = importlib.import_module("export.passes")
        return passes.low_memory_passes, passes.low_memory_inductor_patches
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "--low-memory needs export.passes.low_memory_passes and "
            f"export.passes.low_memory_inductor_patches, which are not available ({e}); "
            "export without --low-memory") from e


@contextlib.contextmanager
def capture_constants(sink: list[ConstantInfo]) -> Iterator[None]:
    """Record the constant table Inductor bakes into the `.so`.

    Wraps `AotCodeCompiler.compile`, which receives the finished `GraphLowering`; the FQN
    rule mirrors `CppWrapperCpu.codegen_model_constructor` (dynamo's flat-name map first,
    then `allocated_constant_name`), and the exporter's test checks it against
    `get_constant_names_to_original_fqns()` of the loaded `.so`.
    """
    from torch._inductor.codecache import AotCodeCompiler
    from torch._inductor.utils import normalize_name

    original = AotCodeCompiler.compile.__func__

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
            copy = original_value.detach().to("cpu", copy=True) if kind is ConstantKind.TENSOR_CONSTANT else None
            sink.append(ConstantInfo(name=name, fqn=fqn, dtype=value.dtype, shape=tuple(value.shape),
                                     stride=tuple(value.stride()), kind=kind, value=copy))
        return original(cls, graph, *args, **kwargs)

    AotCodeCompiler.compile = classmethod(compile_and_record)
    try:
        yield
    finally:
        AotCodeCompiler.compile = classmethod(original)


# Callables told `(method, stage)` as preprocess advances ("start", "compiled"); the
# exporter hangs its progress bar here (to_edge_transform_and_lower offers no callback).
PREPROCESS_LISTENERS: list[Callable[[str, str], None]] = []


def _notify(method: str, stage: str) -> None:
    for listener in list(PREPROCESS_LISTENERS):
        listener(method, stage)


def _split_copy_targets() -> dict:
    """Multi-output `*_copy` ops that Inductor has no lowering for (it would call them through
    the proxy executor, which a weight-free `.so` loaded on its own does not have) -> views."""
    from executorch.exir.dialects._ops import ops

    aten = torch.ops.aten
    pairs = [("split_copy", "Tensor", "split", "Tensor"),
             ("split_with_sizes_copy", "default", "split_with_sizes", "default"),
             ("unbind_copy", "int", "unbind", "int")]
    table = {}
    for src, src_ov, dst, dst_ov in pairs:
        table[getattr(getattr(aten, src), src_ov)] = getattr(getattr(aten, dst), dst_ov)
        table[getattr(getattr(ops.edge.aten, src), src_ov)] = getattr(getattr(aten, dst), dst_ov)
    return table


def _mutates(node: torch.fx.Node, arg: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(a is arg and i < len(schema.arguments) and schema.arguments[i].alias_info is not None
               and schema.arguments[i].alias_info.is_write for i, a in enumerate(node.args))


def replace_split_copy_with_split(gm: torch.fx.GraphModule) -> bool:
    """Edge IR turns chunk/split into `split_copy`; make them views again (outputs are only
    read, so aliasing is safe), as ExecuTorch's ReplaceViewCopyWithViewPass does for
    slice/select. Returns whether the graph changed."""
    table = _split_copy_targets()
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in table:
            continue
        outs = list(node.users)
        if any(_mutates(u, o) for o in outs for u in o.users):
            continue
        node.target = table[node.target]
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


class Gemma4AotiBackend(AotiBackend):
    """Mixin: a concrete backend inherits this and `BackendDetails` and names a device.

    Subclasses provide `get_device_name`, `get_aoti_compile_options`, `get_custom_passes`,
    `get_decomposition_table` and `is_supported_fallback_kernel`.
    """

    # Inductor options that every target needs for the one-weight-copy artifact.
    CONSTANT_OPTIONS: typing.ClassVar[dict[str, Any]] = {
        "aot_inductor.package": True,  # aot_compile returns the list of files it wrote
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": None,  # serialize no weights at all
        "aot_inductor.link_libtorch": False,
    }

    @classmethod
    def move_target(cls) -> str:
        """The device string `move_to_device_pass` moves constants to."""
        return cls.get_device_name()

    @classmethod
    def get_supported_fallback_kernels(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def is_supported_fallback_kernel(cls, kernel: str, compile_specs: list[CompileSpec]) -> bool:
        return kernel in cls.get_supported_fallback_kernels()

    @classmethod
    @contextlib.contextmanager
    def check_fallback_kernels(cls, missing: set[str], compile_specs: list[CompileSpec]) -> Iterator[None]:
        """ExecuTorch's `collect_unsupported_fallback_kernels`, asking
        `is_supported_fallback_kernel` (which may depend on the compile specs)."""
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

        extern = CppWrapperCpu.generate_c_shim_extern_kernel_call
        lookup = CppWrapperCpu.generate_fallback_kernel_with_runtime_lookup_aot

        def check_extern(self, kernel, *args, **kwargs):
            if not cls.is_supported_fallback_kernel(kernel, compile_specs):
                missing.add(kernel)
            return extern(self, kernel, *args, **kwargs)

        def check_lookup(self, op_overload, *args, **kwargs):
            name = getattr(op_overload, "_name", str(op_overload))
            if not cls.is_supported_fallback_kernel(name, compile_specs):
                missing.add(name)
            return lookup(self, op_overload, *args, **kwargs)

        CppWrapperCpu.generate_c_shim_extern_kernel_call = check_extern
        CppWrapperCpu.generate_fallback_kernel_with_runtime_lookup_aot = check_lookup
        try:
            yield
        finally:
            CppWrapperCpu.generate_c_shim_extern_kernel_call = extern
            CppWrapperCpu.generate_fallback_kernel_with_runtime_lookup_aot = lookup

    @classmethod
    def compile_context(cls, compile_specs: list[CompileSpec]) -> ContextManager:
        """Entered around `aot_compile`; by default ExecuTorch's extra context manager."""
        return cls.get_extra_aoti_compile_context_manager()

    @classmethod
    def _prepare(cls, program: ExportedProgram, specs: list[CompileSpec],
                 lm_options: dict[str, str] | None) -> ExportedProgram:
        """Steps 1-4 of the module docstring: the program Inductor will compile."""
        if lm_options is not None:
            make_passes, _ = _load_low_memory_hook()
            # the passes place zero-byte constants where the move below would put them
            for p in make_passes({**lm_options, "device": cls.move_target()}):
                program = p(program)
        program = move_to_device_pass(program, cls.move_target())
        ReplaceViewCopyWithViewPass()(program.graph_module)
        for p in cls.get_custom_passes(specs):
            p(program) if getattr(p, "requires_exported_program", False) else p(program.graph_module)
        table = cls.get_decomposition_table()
        program = program.run_decompositions(table) if table else program
        # Last: split is a preserved view op, which ExecuTorch's verifier rejects, and both a
        # custom pass (MoveCondPredicateToCpuPass) and run_decompositions validate the program.
        replace_split_copy_with_split(program.graph_module)
        return program

    @classmethod
    def _compile(cls, program: ExportedProgram, specs: list[CompileSpec],
                 lm_options: dict[str, str] | None) -> tuple[str, list[ConstantInfo]]:
        """Step 5: aot_compile; returns the `.so` path and the constant table."""
        options = {**cls.get_aoti_compile_options(specs), **cls.CONSTANT_OPTIONS}
        inputs = tuple(n.meta["val"] for n in program.graph.nodes
                       if n.op == "placeholder" and n.name in program.graph_signature.user_inputs)
        missing: set[str] = set()
        constants: list[ConstantInfo] = []
        lm_patches = _load_low_memory_hook()[1](lm_options) if lm_options is not None else contextlib.nullcontext()
        with cls.check_fallback_kernels(missing, specs), torch.no_grad(), \
                cls.compile_context(specs), lm_patches, capture_constants(constants):
            paths = torch._inductor.aot_compile(program.module(), inputs, options=options)
        method = cls.method_name_from_compile_specs(specs)
        if missing:
            raise RuntimeError(f"method {method}: kernels the {cls.get_device_name()} runtime lacks: "
                               + ", ".join(sorted(missing)))
        paths = paths if isinstance(paths, list) else [paths]
        so = [p for p in paths if isinstance(p, str) and p.endswith(".so")]
        if len(so) != 1:
            raise RuntimeError(f"method {method}: expected one .so from aot_compile, got {paths}")
        return so[0], constants

    @classmethod
    def preprocess(cls, edge_program: ExportedProgram, compile_specs: list[CompileSpec]) -> PreprocessResult:
        method = cls.method_name_from_compile_specs(compile_specs)
        _notify(method, "start")
        lm_options = _low_memory_options(compile_specs)
        program = cls._prepare(edge_program, compile_specs, lm_options)
        so_path, constants = cls._compile(program, compile_specs, lm_options)
        with open(so_path, "rb") as f:
            so_data = f.read()
        os.remove(so_path)
        store = NamedDataStore()
        store.add_named_data(f"{method}_so_blob", so_data, 1, None)
        info = CompiledMethod(method=method, device=TargetDevice(cls.get_device_name()),
                              constants=tuple(constants), so_size=len(so_data))
        _notify(method, "compiled")
        return PreprocessResult(processed_bytes=b"", debug_handle_map={},
                                data_store_output=store.get_named_data_store_output(),
                                _delegate_info_meta=info)


class Gemma4AotiPartitioner(AotiPartitioner):
    """ExecuTorch's whole-graph AOTI partitioner, bound to a backend class by name."""

    backend: typing.ClassVar[type]

    def __init__(self, compile_spec: list[CompileSpec]) -> None:
        super().__init__(self.backend.__name__, compile_spec)
