"""AOTInductor backend for CUDA, over ExecuTorch 1.2's CUDA backend settings.

ExecuTorch's `CudaBackend` is final, so this backend borrows its pieces instead of
subclassing it: the Inductor options (max_autotune with Triton GEMMs only, no libtorch
link, embedded kernel binaries), its passes (cond predicate to CPU; its SDPA swap stays
off: the model's attention is `gemma4::attention`, export/kernels/attention.py, and its
graphs hold no aten SDPA on any path), the conv1d decomposition, its compile context and
its list of allowed fallback kernels. The project's ops (`gemma4::int4_linear`,
`gemma4::attention`) are Triton kernels that compile into the `.so`. What differs is in the
shared base: no weights are serialized by Inductor (the exporter writes each once into the
`.ptd`).

With `autotune` off (exporter flag `--no-autotune`) there is no max_autotune and GEMMs may
call cuBLAS through libtorch's shims: minutes faster for test artifacts, runnable by the
project's Python runner (inside libtorch) but not by ExecuTorch's C++ CUDA runtime. Nothing
is chosen by timing then (Inductor's deterministic mode, one config per int4, MoE and
attention kernel), so exports of one model agree bit for bit.

Kernels are compiled for the export GPU's architecture only (Triton's cubins), unless
`multi_arch` is on (exporter flag `--multi-arch-kernels`, ExecuTorch's default): then each
kernel is also turned into a PTX + SASS fatbin by a serial `nvcc` call.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Any, Iterator, final

import torch
from executorch.backends.cuda.cuda_backend import CudaBackend
from executorch.exir.backend.backend_details import BackendDetails
from executorch.exir.backend.compile_spec_schema import CompileSpec

from export import stages
from export.backends.aoti_base import Gemma4AotiBackend, Gemma4AotiPartitioner
from export.backends.options import BackendOptions, TargetDevice
from export.chain import Chain
from export.cubins import DEFAULT_STACK_BYTES, deep_stacks
from export.kernels import int4_matmul
from export.kernels.pdl import op_pdl_mode
from export.patches import patched

TRITON_KERNEL_MODE = "triton_kernel_mode"  # ExecuTorch's key for its SDPA swap (off: no aten SDPA here)


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
    with patched("convert_cubin_to_obj", one_object_per_kernel_name):
        yield


_PLAIN_LAUNCH = re.compile(r"CUDA_DRIVER_CHECK\(cuLaunchKernel\(\s*func, gridX, gridY, gridZ, 32\*numWarps, 1, 1, "
                           r"sharedMemBytes, stream, args, nullptr\s*\)\);")


PDL_OFF_ENV = "GEMMA4_PDL_OFF"  # set (to anything) when a process starts: its artifacts launch as stock AOTI does
# set to comma-separated name prefixes when a process starts: only the waiting kernels whose names start
# with one of them get the attribute (an A/B of one artifact by kernel family: scripts/pdl_ab.py --only)
PDL_ONLY_ENV = "GEMMA4_PDL_ONLY"
# Inductor's own kernels compiled to wait on the grid (`torch._inductor.config.triton.enable_pdl`, every
# one before its first access: `inductor_waits_first`) and launched with the attribute. Its templates
# (triton_tem_*, the autotuned GEMMs) compile without waits and are not named here.
INDUCTOR_PDL = True
INDUCTOR_PDL_PREFIXES = ("triton_poi_", "triton_per_", "triton_red_", "triton_for_")
# Inductor's combo kernels: independent pointwise / reduction kernels of a graph launched as one (their
# programs split by range). A decode layer's q, k and v paths (norm, RoPE, cache write) read the same
# projection and nothing of each other: one launch instead of three. H200, the 31B 12-layer slice's
# decode (int4 KV, CUDA graph, PDL): 228 -> 202 launches a step, 1.675 / 1.757 -> 1.618 / 1.705 ms at
# fill 1k / 32k (-3 to -5%), the 2-layer slice's logits as close to the eager model as before (0.72%),
# and the combo artifact bitwise equal with and without PDL (scripts/measurements/combo_kernels_31b.json).
# Foreach combos (pointwise only) are named triton_for_*; reduction combos take triton_per_* / triton_red_*.
# Decode programs only: E2B's prefill program of a KV-writing full layer compiled its combo (triton_red_fused_2,
# the same paths over a chunk of rows) with 64 registers and 3264 bytes of stack a thread, and running it made
# the CUDA context reserve that stack for every thread the GPU holds: +0.56 GiB outside the allocator for the
# rest of the process on the H200 (scripts/measurements/memory_outside_e2b.json; the sliding layers' prefill
# combos 1024-1032 bytes). A prefill chunk's launches are few against its GEMMs' time: nothing to gain there.
COMBO_KERNELS = True
COMBO_KERNEL_METHODS = ("decode",)


def _waits_on_grid_source(prefixes: tuple[str, ...]) -> str:
    """C++: whether a kernel is one that waits on the grid before it (its entry name starts with one
    of `prefixes`), unless PDL_OFF_ENV was set when the process first launched one, or PDL_ONLY_ENV
    names prefixes and none of them starts the name (for an A/B of the same artifact:
    scripts/pdl_ab.py). A kernel outside `prefixes` never gets the attribute, whatever the env says."""
    tests = " || ".join(f'n.rfind("{p}", 0) == 0' for p in prefixes)
    return f"""
            static inline bool gemma4WaitsOnGrid(CUfunction func) {{
                static const bool off = std::getenv("{PDL_OFF_ENV}") != nullptr;
                static const char* only = std::getenv("{PDL_ONLY_ENV}");
                const char* name = nullptr;
                if (off) {{
                    return false;
                }}
                if (cuFuncGetName(&name, func) != CUDA_SUCCESS || name == nullptr) {{
                    return false;
                }}
                const std::string n(name);
                if (!({tests})) {{
                    return false;
                }}
                if (only == nullptr) {{
                    return true;
                }}
                const std::string list(only);
                size_t begin = 0;
                while (begin <= list.size()) {{
                    size_t end = list.find(',', begin);
                    if (end == std::string::npos) {{
                        end = list.size();
                    }}
                    if (end > begin && n.rfind(list.substr(begin, end - begin), 0) == 0) {{
                        return true;
                    }}
                    begin = end + 1;
                }}
                return false;
            }}

"""


def pdl_launcher(prefixes: tuple[str, ...]):
    """AOTInductor's kernel driver (the C++ helpers it writes into every `.so`) with `launchKernel`
    setting the programmatic-stream-serialization attribute (`cuLaunchKernelEx`) for the kernels
    named with `prefixes`, compiled to wait on the grid before them (export/kernels/pdl.py): such a
    kernel may start while the one before it finishes (and a CUDA graph captured around the `.so`
    records a programmatic edge), everything up to its wait overlapping that kernel. Every other
    kernel launches as before. Stock AOTInductor sets no launch attribute; a kernel that does not
    wait must never get this one (it would read its inputs early)."""
    def patch(original):
        def kernel_driver(self) -> str:
            src = original(self)
            found = _PLAIN_LAUNCH.findall(src)
            if len(found) != 1 or "static inline void launchKernel(" not in src:
                raise RuntimeError("AOTInductor's launchKernel is not the one export/backends/cuda.py patches "
                                   "for programmatic dependent launch (torch moved it)")
            plain = found[0]
            pdl = ("""if (gemma4WaitsOnGrid(func)) {
                    CUlaunchAttribute attr[1];
                    attr[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                    attr[0].value.programmaticStreamSerializationAllowed = 1;
                    CUlaunchConfig config = {};
                    config.gridDimX = gridX;
                    config.gridDimY = gridY;
                    config.gridDimZ = gridZ;
                    config.blockDimX = 32 * numWarps;
                    config.blockDimY = 1;
                    config.blockDimZ = 1;
                    config.sharedMemBytes = sharedMemBytes;
                    config.hStream = stream;
                    config.attrs = attr;
                    config.numAttrs = 1;
                    CUDA_DRIVER_CHECK(cuLaunchKernelEx(&config, func, args, nullptr));
                    return;
                }
                """ + plain)
            src = src.replace(plain, pdl)
            return src.replace("static inline void launchKernel(",
                               _waits_on_grid_source(prefixes) + "            static inline void launchKernel(", 1)
        return kernel_driver
    return patch


def inductor_waits_first(original):
    """Inductor's `_handle_pdl_before_access` as if no kernel came before (its `previous_node` None):
    every kernel then waits before its first global access. Stock Inductor skips the wait where the
    kernel just before wrote nothing it reads; such a kernel may finish before that one does, and the
    kernel after it, which may read what the one before wrote, would then start early too. With a wait
    in every kernel (ours wait first thing, or after loading constants) a kernel starts only once the
    one two before has finished."""
    def handle(self, *args, **kwargs):
        from torch._inductor.virtualized import V

        sched = V.graph.scheduler
        if sched is None:
            return original(self, *args, **kwargs)
        before, sched.previous_node = sched.previous_node, None
        try:
            return original(self, *args, **kwargs)
        finally:
            sched.previous_node = before
    return handle


def waiting_kernels() -> tuple[str, ...]:
    """The name prefixes of the kernels compiled to wait on the grid before them: the op families'
    PDL_KERNELS and, with INDUCTOR_PDL, Inductor's pointwise and reduction kernels."""
    from export.kernels import attention, hadamard, moe_int4

    ours = int4_matmul.PDL_KERNELS + attention.PDL_KERNELS + hadamard.PDL_KERNELS + moe_int4.PDL_KERNELS
    return ours + (INDUCTOR_PDL_PREFIXES if INDUCTOR_PDL else ())


@contextlib.contextmanager
def pdl_launches() -> Iterator[None]:
    """Where the export GPU has programmatic dependent launch (pdl.op_pdl_mode: sm_90+), while the
    block compiles: `pdl_launcher` for `waiting_kernels`, and with INDUCTOR_PDL Inductor's kernels
    compiled with their waits (`inductor_waits_first`); nothing elsewhere."""
    if not torch.cuda.is_available() or not op_pdl_mode(torch.device("cuda")):
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched("CUDADeviceOpOverrides.kernel_driver", pdl_launcher(waiting_kernels())))
        if INDUCTOR_PDL:
            from torch._inductor import config

            stack.enter_context(config.patch({"triton.enable_pdl": True}))
            stack.enter_context(patched("TritonKernel._handle_pdl_before_access", inductor_waits_first))
        yield


ROW_PERSISTENT_MAX = 8192  # one row reduced in registers up to this many elements (decode's norms)


def _row_reduction_choices():
    """Inductor's heuristics, except that a reduction with one output row (a decode step's
    RMSNorm over the hidden size, with the residual add fused in) of up to ROW_PERSISTENT_MAX
    elements is a persistent reduction (the row read once into registers) instead of Inductor's
    looped one (the row read twice in RBLOCK steps by one program): Inductor's bound is 1024
    elements, sized for many rows per program; one row of 5376 bf16 spread over a program's
    warps is 21 values a thread at 8 warps."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class RowReductionChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            sizes = V.graph.sizevars
            return (config.triton.persistent_reductions and not cooperative_reduction
                    and sizes.statically_known_equals(features.numel, 1)
                    and sizes.statically_known_leq(features.reduction_numel, ROW_PERSISTENT_MAX))

    return RowReductionChoices()


@contextlib.contextmanager
def row_reductions_in_registers() -> Iterator[None]:
    """`_row_reduction_choices` for the compiles inside the block (this thread)."""
    from torch._inductor.virtualized import V

    with V.set_choices_handler(_row_reduction_choices()):
        yield


def _executorch_specs(options: BackendOptions) -> list[CompileSpec]:
    """The compile specs ExecuTorch's CudaBackend reads, from our options."""
    return [CompileSpec("method_name", options.method.encode()),
            CompileSpec(TRITON_KERNEL_MODE, b"OFF")]


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

    # Inductor calls aten for a view between dtypes of different widths (the int4 ops read
    # uint8 weights as int32 words): an alias, no kernel, and in libtorch's shims.
    VIEW_FALLBACKS = frozenset({"at::_ops::view_dtype::call"})

    @classmethod
    def is_supported_fallback_kernel(cls, kernel: str, options: BackendOptions) -> bool:
        # Without autotune, GEMMs go to cuBLAS through libtorch's shims: fine for the
        # project's runner (it runs inside libtorch), not for ExecuTorch's C++ CUDA runtime.
        return (not options.autotune or kernel in cls.get_supported_fallback_kernels()
                or kernel in cls.VIEW_FALLBACKS)

    @classmethod
    def get_decomposition_table(cls) -> dict[Any, Any]:
        return CudaBackend.get_decomposition_table()

    @classmethod
    def target_passes(cls, options: BackendOptions) -> list:
        return CudaBackend.get_custom_passes(_executorch_specs(options))  # cond predicate to CPU

    @classmethod
    def check_compiled(cls, method: str, so_data: bytes) -> None:
        """A note for each program with a kernel whose stack a thread is over the CUDA context's default:
        running it raises the context's stack size and its reserve for every thread the GPU holds, device
        memory outside the allocator and the plan (export/cubins.py)."""
        deep = deep_stacks(so_data)
        if not deep:
            return
        worst = deep[0]
        cost = ""
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            threads = p.multi_processor_count * p.max_threads_per_multi_processor
            cost = f", {(worst['stack'] - DEFAULT_STACK_BYTES) * threads / 2**30:.2f} GiB on this GPU"
        more = f" (and {len(deep) - 1} more kernels over {DEFAULT_STACK_BYTES})" if len(deep) > 1 else ""
        stages.note(stages.LOWER, f"{method}: kernel {worst['kernel']} needs {worst['stack']} bytes of stack a "
                    f"thread{more}: the CUDA context will reserve the difference from {DEFAULT_STACK_BYTES} for "
                    f"every thread the GPU holds, outside the memory plan{cost}")

    @classmethod
    def compile_options(cls, options: BackendOptions) -> dict[str, Any]:
        inductor = CudaBackend.get_aoti_compile_options(_executorch_specs(options))
        if COMBO_KERNELS and Chain.method_of(options.method) in COMBO_KERNEL_METHODS:
            inductor["combo_kernels"] = True
        if not options.multi_arch:
            # ExecuTorch asks for fatbins: one `nvcc -fatbin` per kernel, run serially after
            # Triton compiled it (a third of a tiny export's lowering on the H100). The user
            # exports on the GPU they run on, so the kernels stay Triton's own cubins for that
            # arch; the metadata records it and the runner refuses another arch.
            inductor["aot_inductor.emit_multi_arch_kernel"] = False
        if not options.autotune:  # minutes less per test export
            inductor.update({"max_autotune": False, "max_autotune_gemm_backends": "ATEN,TRITON",
                            "max_autotune_conv_backends": "ATEN,TRITON",
                            # one config per pointwise kernel: AOTI compiles and benchmarks every
                            # config serially in its compile-time tuning script
                            "triton.autotune_pointwise": False,
                            # no timing run chooses a reduction's tiles: two exports of one model
                            # (stock and low-memory) compute bitwise the same logits
                            "deterministic": True})
        return inductor

    @classmethod
    def compile_context(cls, options: BackendOptions):
        stack = contextlib.ExitStack()
        stack.enter_context(cls.get_extra_aoti_compile_context_manager())
        stack.enter_context(kernel_binary_patches())
        stack.enter_context(pdl_launches())
        if ROW_PERSISTENT_MAX:
            stack.enter_context(row_reductions_in_registers())
        if options.autotune:
            return stack
        from export.kernels import attention

        stack.enter_context(int4_matmul.one_config())  # the MoE kernels follow it too
        stack.enter_context(attention.use_configs(attention.one_config))  # gemma4::attention too
        return stack

    @classmethod
    def get_extra_aoti_compile_context_manager(cls):
        return CudaBackend.get_extra_aoti_compile_context_manager()


@final
class Gemma4CudaPartitioner(Gemma4AotiPartitioner):
    backend = Gemma4CudaBackend
