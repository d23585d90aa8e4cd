"""The backend's options: one dataclass, converted to and from ExecuTorch compile specs.

A partitioner can hand its backend nothing but compile specs (key -> bytes), so every
option travels there; `BackendOptions.to_specs()` writes them and the backend's preprocess
reads them back with `BackendOptions.from_specs()`. Nothing else is parsed from specs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from export.constants import TargetDevice  # noqa: F401  (re-exported: the backends' target)
from export.passes.options import LowMemoryOptions


METHOD_NAME = "method_name"  # the key ExecuTorch's AotiBackend reads the method from
_LOW_MEMORY_PREFIX = "low_memory."  # low_memory.<LowMemoryOptions field>


@dataclass(frozen=True)
class BackendOptions:
    method: str  # the method this delegate compiles ("prefill", "decode")
    autotune: bool = True  # Inductor max_autotune (cuda); False: one config per kernel, deterministic
    multi_arch: bool = False  # cuda kernels also as PTX+SASS fatbins (other GPU generations)
    low_memory: LowMemoryOptions | None = None  # None: stock compile; else the low-memory passes and patches

    def to_specs(self) -> list:
        from executorch.exir.backend.compile_spec_schema import CompileSpec

        specs = [CompileSpec(METHOD_NAME, self.method.encode())]
        specs += [CompileSpec(f.name, b"1" if getattr(self, f.name) else b"0")
                  for f in fields(self) if f.name in _FLAGS]
        if self.low_memory is not None:
            specs += [CompileSpec(_LOW_MEMORY_PREFIX + k, v.encode()) for k, v in self.low_memory.to_dict().items()]
        return specs

    @classmethod
    def from_specs(cls, specs) -> "BackendOptions":
        values = {s.key: s.value.decode() for s in specs}
        if METHOD_NAME not in values:
            raise ValueError(f"compile specs name no method ({METHOD_NAME!r}): {sorted(values)}")
        low = {k[len(_LOW_MEMORY_PREFIX):]: v for k, v in values.items() if k.startswith(_LOW_MEMORY_PREFIX)}
        return cls(method=values[METHOD_NAME], **{k: values[k] == "1" for k in _FLAGS if k in values},
                   low_memory=LowMemoryOptions.from_dict(low) if low else None)


_FLAGS = ("autotune", "multi_arch")
