"""Zero-byte tensors: full metadata (device, shape, stride, dtype), no storage bytes.

A constant of the exported program becomes `zero_byte_like(t, device)` before AOTInductor
compiles: Inductor only needs its metadata to trace and generate code, so no weight or KV
byte ever reaches the target device. Whatever does need bytes for a moment (a kernel run
during autotuning) goes through `materialized(...)`, which gives the storages zero-filled
bytes for the duration of a `with` block and frees them after a device synchronize.

Each zero-byte storage is registered with where its true bytes come from (`ByteSource`):
`ZEROS` for KV-cache buffers (they start empty, so they are re-synthesized), or a host
tensor for weights. Serialization asks `host_bytes(...)` and so never needs device memory.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from typing import Iterable, Iterator

import torch


class ByteSource(str, enum.Enum):
    """Where a zero-byte constant's true bytes come from when something serializes them."""

    ZEROS = "zeros"  # KV cache: all zeros at export time, synthesized on demand
    HOST = "host"  # a weight: the host tensor it replaced, streamed one at a time


def is_zero_byte(t: object) -> bool:
    """A tensor with elements whose storage holds no bytes (what this package makes)."""
    return (isinstance(t, torch.Tensor) and not t.is_meta and t.layout == torch.strided
            and t.numel() > 0 and t.untyped_storage().nbytes() == 0)


def required_nbytes(t: torch.Tensor) -> int:
    """Bytes a storage needs to back `t`'s view (offset + extent), 0 for an empty view."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


# storage key -> (weak ref to the zero-byte storage, source kind, host tensor or None).
# Keyed by StorageImpl so views, Parameter wrappers and aliases all resolve; the weak ref
# (storages keep one Python object while alive) drops entries whose storage is gone.
_REGISTRY: dict[int, tuple[weakref.ref, ByteSource, torch.Tensor | None]] = {}


def zero_byte_like(t: torch.Tensor, device: torch.device | str, source: ByteSource) -> torch.Tensor:
    """A tensor laid out as `t.to(device)` would be, with its storage resized to 0 bytes.

    `source` records how to get the true bytes back (`byte_source`); for HOST the original
    tensor is kept by reference (no copy), so serializing can stream it.
    """
    z = torch.empty_like(t, device=device)  # same layout rule as Tensor.to (preserve_format)
    z.untyped_storage().resize_(0)
    _prune_registry()
    host = t.detach() if source is ByteSource.HOST else None
    _REGISTRY[_storage_key(z)] = (weakref.ref(z.untyped_storage()), source, host)
    return torch.nn.Parameter(z, requires_grad=False) if isinstance(t, torch.nn.Parameter) else z


def _prune_registry() -> None:
    for key in [k for k, (ref, _, _) in _REGISTRY.items() if ref() is None]:
        del _REGISTRY[key]


def byte_source(t: torch.Tensor) -> tuple[ByteSource, torch.Tensor | None] | None:
    """(kind, host tensor) registered for `t`'s storage, or None if it is not ours."""
    entry = _REGISTRY.get(_storage_key(t))
    if entry is None or entry[0]() is None:
        return None
    return entry[1], entry[2]


def host_bytes(t: torch.Tensor) -> torch.UntypedStorage:
    """The true bytes of zero-byte `t`'s whole storage, on the host, laid out as on device."""
    found = byte_source(t)
    if found is None:
        raise RuntimeError(f"zero-byte constant {tuple(t.shape)} {t.dtype} has no registered byte source")
    kind, host = found
    nbytes = required_nbytes(t)
    if kind is ByteSource.ZEROS:
        return torch.zeros(nbytes, dtype=torch.uint8).untyped_storage()
    laid_out = torch.empty_like(host, device="cpu")  # the device tensor's layout, offset 0
    laid_out.copy_(host)
    return laid_out.untyped_storage()


@contextlib.contextmanager
def materialized(tensors: Iterable[object]) -> Iterator[int]:
    """Give every zero-byte storage among `tensors` zero-filled bytes inside the block.

    Storages are resized in place, so every view and alias of them sees the same bytes;
    on exit the device is synchronized (kernels may still be writing) and the storages go
    back to 0 bytes. Yields the number of bytes lent.
    """
    need: dict[int, tuple[torch.UntypedStorage, int, torch.device]] = {}
    for t in tensors:
        if is_zero_byte(t):
            s = t.untyped_storage()
            prev = need.get(s._cdata, (s, 0, t.device))[1]
            need[s._cdata] = (s, max(prev, required_nbytes(t)), t.device)
    try:
        for s, nbytes, _ in need.values():
            s.resize_(nbytes)
            torch.empty(0, dtype=torch.uint8, device=s.device).set_(s).zero_()
        yield sum(n for _, n, _ in need.values())
    finally:
        for device in {d for _, _, d in need.values() if d.type == "cuda"}:
            torch.cuda.synchronize(device)
        for s, _, _ in need.values():
            s.resize_(0)
