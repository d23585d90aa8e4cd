"""AOTInductor backend for CPU: the same pipeline as CUDA, so CI runs every stage.

The `.so` it produces is meant to run inside libtorch (the project's Python runner loads it
with `torch._C._aoti.AOTIModelContainerRunnerCpu` after promoting `libtorch_cpu.so` to
RTLD_GLOBAL). Every `aoti_torch_cpu_*` shim exists there, so unlike the CUDA backend no
fallback kernel is rejected: ExecuTorch's check would refuse plain extern calls such as
`aoti_torch_cpu_addmm_out`. No custom passes; the decompositions turn the project's custom ops
(export/kernels/: `gemma4::int4_linear`, `gemma4::int4_glu_linear`, `gemma4::int4_rms_linear`,
`gemma4::int4_add_rms_linear`, `gemma4::int4_add_linear`, `gemma4::int4_add_rms_mlp`,
`gemma4::int4_add_rms_mlp_close`, `gemma4::int4_add_ple_close`, `gemma4::attention`,
`gemma4::attention_int4_linear`, `gemma4::hadamard`, `gemma4::moe_route`, `gemma4::moe_experts_int4`,
`gemma4::moe_rms_experts_int4`, `gemma4::moe_rms_experts_close`) into their plain-torch references, so the .so
needs no Python op.
"""

from __future__ import annotations

from typing import Any, final

import torch
from executorch.exir.backend.backend_details import BackendDetails

from export.backends.aoti_base import Gemma4AotiBackend, Gemma4AotiPartitioner
from export.backends.options import BackendOptions, TargetDevice


@final
class Gemma4CpuBackend(Gemma4AotiBackend, BackendDetails):
    @classmethod
    def get_device_name(cls) -> str:
        return TargetDevice.CPU.value

    @classmethod
    def is_supported_fallback_kernel(cls, kernel: str, options: BackendOptions) -> bool:
        return True  # the runner executes inside libtorch, where every CPU shim exists

    @classmethod
    def get_decomposition_table(cls) -> dict[Any, Any]:
        from export.kernels.attention import attention_reference
        from export.kernels.attention_linear import attention_int4_linear_reference
        from export.kernels.int4_mlp import int4_add_rms_mlp_close_reference, int4_add_rms_mlp_reference
        from export.kernels.int4_ple import int4_add_ple_close_reference
        from export.kernels.hadamard import hadamard_reference
        from export.kernels.int4_matmul import (int4_add_linear_reference, int4_add_rms_linear_reference,
                                                int4_glu_linear_reference, int4_linear_reference,
                                                int4_rms_linear_reference)
        from export.kernels.moe_int4 import (moe_experts_reference, moe_rms_experts_close_reference,
                                             moe_rms_experts_reference, moe_route_reference)

        return {torch.ops.gemma4.int4_linear.default: int4_linear_reference,
                torch.ops.gemma4.int4_glu_linear.default: int4_glu_linear_reference,
                torch.ops.gemma4.int4_rms_linear.default: int4_rms_linear_reference,
                torch.ops.gemma4.int4_add_rms_linear.default: int4_add_rms_linear_reference,
                torch.ops.gemma4.int4_add_linear.default: int4_add_linear_reference,
                torch.ops.gemma4.int4_add_rms_mlp.default: int4_add_rms_mlp_reference,
                torch.ops.gemma4.int4_add_rms_mlp_close.default: int4_add_rms_mlp_close_reference,
                torch.ops.gemma4.int4_add_ple_close.default: int4_add_ple_close_reference,
                torch.ops.gemma4.attention.default: attention_reference,
                torch.ops.gemma4.attention_int4_linear.default: attention_int4_linear_reference,
                torch.ops.gemma4.hadamard.default: hadamard_reference,
                torch.ops.gemma4.moe_route.default: moe_route_reference,
                torch.ops.gemma4.moe_experts_int4.default: moe_experts_reference,
                torch.ops.gemma4.moe_rms_experts_int4.default: moe_rms_experts_reference,
                torch.ops.gemma4.moe_rms_experts_close.default: moe_rms_experts_close_reference}

    @classmethod
    def compile_options(cls, options: BackendOptions) -> dict[str, Any]:
        # No max_autotune: on CPU it only adds compile time (CI has two cores).
        return {"aot_inductor.link_libtorch": False}


@final
class Gemma4CpuPartitioner(Gemma4AotiPartitioner):
    backend = Gemma4CpuBackend
