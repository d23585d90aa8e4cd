"""`LowMemoryOptions`: the plain-data knobs of low-memory mode, with documented defaults.

They travel through ExecuTorch compile specs as strings (`to_dict` / `from_dict`), so the
backend passes them on without knowing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MIB = 1 << 20


@dataclass(frozen=True)
class LowMemoryOptions:
    # Where the zero-byte constants live: the backend's target with an explicit index
    # ("cuda:0", not "cuda": move_to_device_pass would otherwise trip
    # _assert_tensor_metadata), or "cpu".
    device: str = "cuda:0"
    # Weights zero-byte during compile too (beyond upstream, which only empties the KV
    # cache). The artifact writer streams real weight bytes from the eager state dict.
    zero_weights: bool = True
    # Budget for one dequantized int4 weight slice (and one slice of a packed int4 operand).
    # An int4 matmul whose operand exceeds it is split along N into slices that fit: at
    # 256 MiB a 262144 x 5376 bf16 lm_head (2.7 GiB dequantized) becomes 11 slices, while
    # the 31B MLP projections (21504 x 5376, 220 MiB) stay whole.
    matmul_chunk_mib: int = 256
    # Slice sizes are rounded down to a multiple of this many rows (GEMM tile friendly; a
    # multiple of 8).
    matmul_chunk_align: int = 256

    def __post_init__(self):
        if self.matmul_chunk_mib <= 0:
            raise ValueError("matmul_chunk_mib must be positive")
        if self.matmul_chunk_align <= 0 or self.matmul_chunk_align % 8:
            raise ValueError("matmul_chunk_align must be a positive multiple of 8")
        if self.device.startswith("cuda") and ":" not in self.device:
            raise ValueError(f"device {self.device!r}: give an index, e.g. 'cuda:0'")

    @property
    def matmul_chunk_bytes(self) -> int:
        return self.matmul_chunk_mib * MIB

    def chunk_rows(self, n: int, row_bytes: int) -> int | None:
        """Rows per slice for an N x (row_bytes) operand, or None if it fits the budget."""
        if n * row_bytes <= self.matmul_chunk_bytes:
            return None
        rows = self.matmul_chunk_bytes // row_bytes // self.matmul_chunk_align * self.matmul_chunk_align
        return max(rows, self.matmul_chunk_align)

    def to_dict(self) -> dict[str, str]:
        """String form for ExecuTorch compile specs."""
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, str] | None) -> "LowMemoryOptions":
        """Parse `to_dict`'s form; unknown keys are an error (a typo must not be ignored)."""
        d = dict(d or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown low-memory options {sorted(unknown)}; known: {sorted(known)}")
        kw: dict = {}
        for name, value in d.items():
            default = getattr(cls, name)
            if isinstance(default, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"low-memory option {name}={value!r}: expected true/false")
                kw[name] = str(value).lower() in ("true", "1")
            elif isinstance(default, int):
                kw[name] = int(value)
            else:
                kw[name] = str(value)
        return cls(**kw)
