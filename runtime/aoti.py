"""Load one method's AOTInductor `.so` into torch's container runner, from Python.

The .so is compiled with `link_libtorch=False`: its `aoti_torch_*` shim symbols must come
from the libtorch that `import torch` already loaded, but Python loads extension libraries
RTLD_LOCAL, so the dynamic linker cannot see them (`undefined symbol:
aoti_torch_layout_strided`). Re-opening the same libraries with RTLD_NOLOAD | RTLD_GLOBAL
promotes them to global scope without loading a second copy.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.artifact import SCALAR_TYPES


def promote_libtorch(device_type: str) -> None:
    """Make libtorch_cpu (and libtorch_cuda for CUDA) symbols globally visible."""
    lib_dir = Path(torch.__file__).parent / "lib"
    names = ["cpu", "cuda"] if device_type == "cuda" else ["cpu"]
    for name in names:
        ctypes.CDLL(str(lib_dir / f"libtorch_{name}.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


@dataclass
class CompiledMethod:
    """One compiled program (a whole method, or a unit a method's steps run) loaded from its .so."""

    name: str
    container: object  # torch._C._aoti.AOTIModelContainerRunner{Cpu,Cuda}

    def constant_fqns(self) -> dict[str, str]:
        """AOTI constant name -> original FQN recorded at compile time ("" if none)."""
        return dict(self.container.get_constant_names_to_original_fqns())

    def constant_dtypes(self) -> dict[str, torch.dtype | None]:
        return {k: SCALAR_TYPES.get(int(v)) for k, v in self.container.get_constant_names_to_dtypes().items()}

    def bind(self, constants: dict[str, torch.Tensor]) -> None:
        """Bind caller-owned tensors by name, without a copy (the caller keeps them alive).
        validate_full_update makes the container refuse a map that misses a weight."""
        self.container.update_constant_buffer(constants, False, True, True)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.container.run(inputs)


def load_method(name: str, so_blob: bytes, device: str, instances: int = 1) -> CompiledMethod:
    """Write the blob to a private temp file, dlopen it through the container runner, and
    delete the file (the mapping stays valid once loaded).

    `instances`: model instances in the container (they share its constants). A CUDA graph
    may capture one `run` per instance: `run` reuses an instance only after querying the
    event its last run recorded, which fails for an event recorded while capturing."""
    device_type = torch.device(device).type
    promote_libtorch(device_type)
    with tempfile.TemporaryDirectory(prefix=f"gemma4_{name}_") as tmp:
        so_path = os.path.join(tmp, f"{name}.so")
        with open(so_path, "wb") as f:
            f.write(so_blob)
        if device_type == "cuda":
            container = torch._C._aoti.AOTIModelContainerRunnerCuda(so_path, instances, device)
        elif device_type == "cpu":
            container = torch._C._aoti.AOTIModelContainerRunnerCpu(so_path, instances)
        else:
            raise ValueError(f"unsupported device {device!r}: the artifact runs on cuda or cpu")
    return CompiledMethod(name, container)
