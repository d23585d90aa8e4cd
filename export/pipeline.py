"""The generic export pipeline: an eager token model, as a chain of units (export/chain.py)
-> one ExportedProgram per unit and method -> one AOTI delegate each -> an ExecuTorch
program carrying a metadata string.

Model-agnostic: it knows the artifact's two methods (export/ARTIFACT.md: `prefill` runs a
chunk of T tokens, T dynamic, `decode` one token; both from a start position [1]), each a
chain of steps over the compiled units, and nothing of Gemma 4. Progress goes out as stage
events (export/stages.py).

    programs = export_methods(chain, prefill_chunk)
    edge = lower(programs, device, strategy, autotune=..., multi_arch=...)
    tables = compiled_methods(edge)           # the constant table of each program
    program = to_executorch(edge, metadata)   # metadata: the JSON the runner reads
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from export import stages
from export.backends import BackendOptions, TargetDevice, compile_workers, partitioner_for
from export.chain import Chain, example_inputs
from export.constants import CompiledMethod
from export.host_tma import host_tma_descriptors
from export.retrace import skip_identity_decompositions
from export.strategy import ExportStrategy
from runtime.artifact import METADATA_KEY, METHODS

EXPORT_KW = dict(strict=False, prefer_deferred_runtime_asserts_over_guards=True)
"""Non-strict: strict export (dynamo) caches a real clone of every parameter it meets
(`real_value_cache`), i.e. a second copy of all weights in host memory and seconds of memcpy
per GiB, for both methods. Non-strict traces with fake tensors and touches no weight bytes.
Deferred asserts: stride arithmetic after the GQA reshapes yields guards such as
`T*min(16, 32*T) == 16*T`, true for every T >= 1, that the symbolic solver cannot prove;
they become runtime asserts instead of export errors."""


@torch.no_grad()
def export_methods(chain: Chain | nn.Module, prefill_chunk: int) -> dict[str, torch.export.ExportedProgram]:
    """torch.export each unit for both methods (`Chain.program` names them), every unit from
    the model's own tensors (so both methods name the same KV buffers); in prefill, dim 1 of
    every carry tensor is the dynamic T. A bare module is the one-unit chain."""
    chain = chain if isinstance(chain, Chain) else Chain.whole(chain)
    T = torch.export.Dim("T", min=1, max=prefill_chunk)
    programs = {}
    with stages.stage(stages.TORCH_EXPORT, total=2 * len(chain.units), unit="program") as s:
        for method in METHODS:
            for name, unit in chain.units.items():
                args = example_inputs(unit, prefill_chunk if method == "prefill" else 1)
                dynamic = (*({1: T} for _ in args[:-1]), None) if method == "prefill" else None
                programs[chain.program(method, name)] = torch.export.export(
                    unit, args, dynamic_shapes=dynamic, **EXPORT_KW)
                s.advance()
    return programs


def edge_config():
    """Edge settings for a whole-graph AOTI delegate: the graph stays aten (Inductor compiles
    it; edge-op wrappers and dim-order ops only cost Python time, ~45% of a CPU export),
    and int4 dequant's shift (CPU) is allowed."""
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=False, _use_edge_ops=False, _skip_dim_order=True,
                             _core_aten_ops_exception_list=[torch.ops.aten.bitwise_right_shift.Tensor_Scalar])


def lower(programs: dict, device: TargetDevice, strategy: ExportStrategy, *, autotune: bool = True,
          multi_arch: bool = False):
    """to_edge + to_backend with the target's partitioner; one AOTI delegate per method.
    The strategy's lowering context wraps ExecuTorch's deep copies of the programs; retraces
    that would change nothing are skipped (export/retrace.py)."""
    from executorch.exir import to_edge_transform_and_lower

    partitioners = {m: [partitioner_for(device, BackendOptions(
        method=m, autotune=autotune, multi_arch=multi_arch, low_memory=strategy.backend_options()))]
        for m in programs}
    with stages.stage(stages.LOWER, total=len(programs), unit="program") as s:
        waited = compile_workers.wait_ready()  # else every kernel compiles in-process, one after another
        if waited is not None:  # part of the lowering's time, reported on its own too
            stages.emit(stages.StageEvent("compile_workers_wait", stages.END, seconds=waited))
        waited = compile_workers.wait_isa_probe()
        if waited is not None:
            stages.emit(stages.StageEvent("isa_probe_wait", stages.END, seconds=waited))
        s.detail("to_edge: tracing to the edge dialect")
        # the ops' Triton kernels traced in the retraces may take TMA descriptors (export/host_tma.py)
        with strategy.lowering(), skip_identity_decompositions(), host_tma_descriptors():
            return to_edge_transform_and_lower(programs, partitioner=partitioners, compile_config=edge_config(),
                                               constant_methods={"metadata": "{}"})


# Where a lowering thread is, by the innermost of these functions on its stack (qualified
# names, Python 3.11+), for the export's heartbeat lines (export/stages.py `Heartbeat`).
LOWERING_PHASES = (
    ("_gen_edge_manager_for_partitioners", "ExecuTorch to_edge"),
    ("ExportedProgram.run_decompositions", "whole-graph retrace (decompositions)"),
    ("_generate_edge_program", "ExecuTorch edge passes"),
    ("run_pipeline", "our graph passes"),
    ("aot_compile", "Inductor"),
    ("aot_export_module", "Inductor: tracing"),
    ("_recursive_joint_graph_passes", "Inductor: graph passes"),
    ("_recursive_post_grad_passes", "Inductor: graph passes"),
    ("additional_fake_tensor_prop", "Inductor: shape propagation"),
    ("GraphLowering.run", "Inductor: lowering to IR"),
    ("GraphLowering.codegen_with_cpp_wrapper", "Inductor: code generation"),
    ("Scheduler.__init__", "Inductor: fusion"),
    ("Scheduler.codegen", "Inductor: kernel codegen"),
    ("PythonWrapperCodegen.generate", "Inductor: wrapper codegen"),
    ("AsyncCompile.wait", "Inductor: waiting for kernel compiles"),
    ("AotCodeCompiler.compile", "Inductor: C++ compile and link"),
    ("CppBuilder.build", "Inductor: C++ compile"),
    ("to_executorch", "ExecuTorch program"),
)


def lowering_phase(thread_id: int, phases=LOWERING_PHASES) -> str:
    """The phase the thread `thread_id` is in ("" when none matches)."""
    import sys

    frame = sys._current_frames().get(thread_id)
    names = dict(phases)
    while frame is not None:  # innermost first: the first match is the most specific
        code = frame.f_code
        label = names.get(getattr(code, "co_qualname", code.co_name)) or names.get(code.co_name)
        if label:
            return label
        frame = frame.f_back
    return ""


def compiled_methods(edge_manager) -> dict[str, CompiledMethod]:
    """The constant tables our backend left on each program's lowered module, each with the
    program inputs its delegate takes (`inputs`: lowering drops an input the graph never reads)."""
    out = {}
    for method in edge_manager.methods:
        ep = edge_manager.exported_program(method)
        gm = ep.graph_module
        infos = [getattr(gm, n.target).meta.get("_delegate_info_meta") for n in gm.graph.nodes
                 if n.op == "get_attr" and n.target.startswith("lowered_module")]
        infos = [i for i in infos if isinstance(i, CompiledMethod)]
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
        if len(infos) != 1 or len(calls) != 1:
            raise RuntimeError(f"method {method}: expected one AOTI delegate, found {len(infos)} "
                               "(part of the graph was not lowered)")
        if any(getattr(o, "op", None) == "placeholder" for o in gm.graph.output_node().args[0]):
            raise RuntimeError(f"method {method} returns an input unchanged (its .so would not): a unit returns "
                               "only what it computes, the carry passes the rest on (export/chain.py)")
        user = list(ep.graph_signature.user_inputs)
        taken = tuple(a.name for a in calls[0].args[1:] if isinstance(a, torch.fx.Node) and a.name in user)
        out[method] = dataclasses.replace(infos[0], inputs=tuple(user.index(n) for n in taken))
    return out


def to_executorch(edge_manager, metadata_json: str):
    """The ExecuTorch program, with `metadata_json` as the `metadata` constant method and as
    named data METADATA_KEY (export/ARTIFACT.md)."""
    from executorch.exir import ExecutorchBackendConfig

    # to_edge_transform_and_lower took the constant methods before the constant tables existed;
    # ExecuTorch 1.2 keeps them (and the named data) on these attributes until to_executorch.
    edge_manager._config_methods["metadata"] = metadata_json
    edge_manager._named_data_store.add_named_data(METADATA_KEY, metadata_json.encode(), 1, None)
    return edge_manager.to_executorch(ExecutorchBackendConfig())


def use_packaged_flatc() -> None:
    """ExecuTorch's serializer runs `flatc` from PATH unless FLATC_EXECUTABLE names one; point
    it at the binary shipped inside the executorch package, so an interpreter started without
    its venv's bin/ on PATH still exports. A user's own FLATC_EXECUTABLE wins. Raises
    ValueError when the packaged binary cannot be made executable."""
    if os.environ.get("FLATC_EXECUTABLE"):
        return
    try:
        from importlib.resources import files
        flatc = Path(str(files("executorch.data.bin") / "flatc"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return  # no packaged binary: ExecuTorch looks on PATH as before
    if not flatc.is_file():
        return
    if not os.access(flatc, os.X_OK):
        try:
            flatc.chmod(flatc.stat().st_mode | 0o111)
        except OSError:
            raise ValueError(f"{flatc} is not executable: chmod +x it, or set FLATC_EXECUTABLE to a flatc binary")
    os.environ["FLATC_EXECUTABLE"] = str(flatc)
