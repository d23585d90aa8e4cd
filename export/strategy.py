"""How an export spends memory: stock, or low-memory (`--low-memory`), as one object.

The pipeline asks the strategy at each point where the two differ, and nowhere else:

    spool(directory)      where quantized weights wait while compiling (low-memory: an
                          unlinked file beside the artifact; stock: host memory)
    eager_model_device()  where the eager model lives while exporting (low-memory: the host;
                          constants reach the GPU as zero-byte tensors)
    lowering()            entered around ExecuTorch's lowering (low-memory: its deep copies
                          of the programs alias parked weights instead of copying them)
    backend_options()     the backend's low-memory options (None: stock compile), which turn
                          on the low-memory passes and Inductor patches (export/passes/)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

from export.backends.options import TargetDevice
from export.passes.options import LowMemoryOptions


class ExportStrategy:
    """Stock: every constant real wherever the backend moves it."""

    name = "stock"
    low_memory = False

    def spool(self, directory: Path) -> ContextManager:
        return contextlib.nullcontext()

    def eager_model_device(self, device: TargetDevice) -> str:
        return device.value

    def lowering(self) -> ContextManager:
        return contextlib.nullcontext()

    def backend_options(self) -> LowMemoryOptions | None:
        return None


class LowMemoryStrategy(ExportStrategy):
    """No constant byte reaches the GPU while compiling; weights wait on disk."""

    name = "low-memory"
    low_memory = True

    def spool(self, directory: Path) -> ContextManager:
        from export.spool import WeightSpool

        return WeightSpool(directory)

    def eager_model_device(self, device: TargetDevice) -> str:
        return TargetDevice.CPU.value

    def lowering(self) -> ContextManager:
        from export.spool import shared_deepcopy

        return shared_deepcopy()

    def backend_options(self) -> LowMemoryOptions | None:
        return LowMemoryOptions()


def strategy_for(low_memory: bool) -> ExportStrategy:
    return LowMemoryStrategy() if low_memory else ExportStrategy()
