"""AOTInductor backends (one module per target) and the partitioner factory the pipeline uses.

`partitioner_for(device, options)` returns the whole-graph partitioner for one method; the
target's module (and with it ExecuTorch's backend stack) is imported only when asked for.
"""

from __future__ import annotations

from export.backends.options import BackendOptions, TargetDevice

__all__ = ["BackendOptions", "TargetDevice", "partitioner_for"]


def partitioner_for(device: TargetDevice, options: BackendOptions):
    """The partitioner that lowers `options.method` whole to `device`'s AOTI backend."""
    if device is TargetDevice.CPU:
        from export.backends.cpu import Gemma4CpuPartitioner
        return Gemma4CpuPartitioner(options.to_specs())
    from export.backends.cuda import Gemma4CudaPartitioner
    return Gemma4CudaPartitioner(options.to_specs())
