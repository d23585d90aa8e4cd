"""AOTInductor backends (one module per target) and the partitioner factory the exporter uses.

`partitioner_for(device, method, ...)` returns the whole-graph partitioner for one method;
the CUDA module is imported only when asked for (it pulls in ExecuTorch's CUDA/Triton code).
"""

from __future__ import annotations

from executorch.exir.backend.partitioner import Partitioner

from export.backends.aoti_base import (
    CompiledMethod,
    CompileSpecKey,
    ConstantInfo,
    ConstantKind,
    PREPROCESS_LISTENERS,
    TargetDevice,
    autotune_spec,
    low_memory_specs,
    method_name_spec,
)

__all__ = ["CompiledMethod", "CompileSpecKey", "ConstantInfo", "ConstantKind", "PREPROCESS_LISTENERS",
           "TargetDevice", "partitioner_for"]


def partitioner_for(device: TargetDevice, method: str, *, low_memory: bool = False,
                    low_memory_options: dict[str, str] | None = None,
                    triton_sdpa: bool = False, autotune: bool = True, multi_arch: bool = False) -> Partitioner:
    """The partitioner that lowers `method` whole to `device`'s AOTI backend."""
    specs = [method_name_spec(method), autotune_spec(autotune)]
    if low_memory:
        specs += low_memory_specs(low_memory_options)
    if device is TargetDevice.CPU:
        from export.backends.cpu import Gemma4CpuPartitioner
        return Gemma4CpuPartitioner(specs)
    from export.backends.cuda import Gemma4CudaPartitioner, multi_arch_spec, triton_sdpa_spec
    return Gemma4CudaPartitioner(specs + [triton_sdpa_spec(triton_sdpa), multi_arch_spec(multi_arch)])
