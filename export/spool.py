"""Host memory of a low-memory export: weights parked on disk, KV caches that cost nothing
until written, and deep copies that share bytes instead of duplicating them.

A bf16 31B checkpoint quantizes to ~20 GiB of int4 weights (bf16 embedding included): more
than the export may hold in RAM (a host peak well under the weights' float size). So:

- `WeightSpool.park_module_` writes each finished unit's tensors (after quantization) to one
  unlinked spool file next to the output directory and swaps them for tensors that map
  that file (private, copy-on-write). None of their pages is resident until something reads
  them, and the kernel may drop those clean pages again under pressure.
- `lazy_zeros` backs a KV cache with anonymous memory: zero by definition, resident only
  where written (the exporter never writes it; 10 full-attention layers at 128k are 10 GiB).
- `shared_deepcopy()`: ExecuTorch deep-copies the exported programs twice while lowering;
  inside this block a deep copy of a parked or lazy-zero tensor is an alias (a new tensor
  object on the same storage), so the copies cost no bytes. Nothing in lowering writes a
  weight; the KV caches are only written by running the model.
- `file_range(t)` tells the artifact writer where a parked tensor's bytes are, so it copies
  them file to file (`os.copy_file_range`) instead of faulting them in through the mapping.

The eager model keeps working on parked tensors (the mappings outlive the spool's file
descriptor); it reads them from disk, through the page cache.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

PAGE = mmap.ALLOCATIONGRANULARITY
MIN_PARK_BYTES = 64 << 10  # smaller tensors (norm weights, scalars) stay in RAM: not worth a mapping
_CHUNK = 64 << 20  # bound on the host staging copy while parking a device tensor


@dataclass(frozen=True)
class FileRange:
    """Where a parked tensor's bytes are: `nbytes` at `offset` of the open file `fd`."""

    fd: int
    offset: int
    nbytes: int


# Storages whose bytes deep copies may share: data pointer -> (where a parked tensor's bytes
# are, or None for lazy zeros; weak ref to the storage). Keyed by address so any tensor,
# Parameter or alias on that storage resolves; the weak ref (a storage keeps one Python
# object while alive) retires entries whose storage is gone and whose address may be reused.
_SHARED: dict[int, tuple[FileRange | None, weakref.ref]] = {}


def _entry(t: torch.Tensor) -> tuple[FileRange | None, weakref.ref] | None:
    key = t.untyped_storage().data_ptr()
    entry = _SHARED.get(key)
    if entry is not None and entry[1]() is None:
        del _SHARED[key]
        return None
    return entry


def _mapped(length: int, fd: int = -1, offset: int = 0) -> mmap.mmap:
    if fd < 0:
        return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)


def _tensor_over(buf: mmap.mmap, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    # frombuffer keeps `buf` alive as long as the tensor (and its views) live
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def lazy_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose pages are allocated only when written."""
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    t = _tensor_over(_mapped(nbytes), nbytes, dtype, tuple(shape))
    _SHARED[t.untyped_storage().data_ptr()] = (None, weakref.ref(t.untyped_storage()))
    return t


def file_range(t: torch.Tensor) -> FileRange | None:
    """The spool file range holding exactly `t`'s bytes, or None (not parked, or a view)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided:
        return None
    entry = _entry(t)
    if entry is None or entry[0] is None or t.storage_offset() != 0 or not t.is_contiguous():
        return None
    rng = entry[0]
    return rng if t.numel() * t.element_size() == rng.nbytes else None


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    return [p for attr in t.__tensor_flatten__()[0] for p in _plain_parts(getattr(t, attr))]


def _bytes_shared(t: torch.Tensor) -> bool:
    """Parked or lazy-zero bytes (every inner tensor of a subclass)."""
    parts = _plain_parts(t)
    return bool(parts) and all(p.device.type == "cpu" and p.layout == torch.strided and p.numel() > 0
                               and _entry(p) is not None for p in parts)


class WeightSpool:
    """One unlinked file next to the export's output; `park(t)` moves a tensor's bytes there."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".gemma4-spool-", dir=directory)
        os.unlink(path)  # nothing is left on disk, whatever happens to this process
        self.fd, self.end, self.parked_bytes = fd, 0, 0

    def close(self) -> None:
        """Close the file; parked tensors keep working (their mappings hold the pages)."""
        if self.fd >= 0:
            for key in [k for k, (rng, _) in _SHARED.items() if rng is not None and rng.fd == self.fd]:
                del _SHARED[key]
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "WeightSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, t: torch.Tensor, offset: int) -> None:
        flat = t.detach().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start:start + _CHUNK].cpu().numpy()
            done = 0
            while done < piece.nbytes:
                done += os.pwrite(self.fd, piece.data[done:], offset + start + done)

    def park(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor equal to `t` whose bytes live in the spool file (subclasses: each
        inner tensor). Small, already parked, or non-contiguous tensors come back as they are."""
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if self.fd < 0:
            raise RuntimeError("WeightSpool is closed")
        if is_traceable_wrapper_subclass(t):
            names, ctx = t.__tensor_flatten__()
            inner = {n: self.park(getattr(t, n)) for n in names}
            return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
        nbytes = t.numel() * t.element_size()
        if (nbytes < MIN_PARK_BYTES or t.is_meta or not t.is_contiguous() or t.storage_offset() != 0
                or file_range(t) is not None):
            return t
        offset = -(-self.end // PAGE) * PAGE
        self._write(t, offset)
        self.end = offset + nbytes
        self.parked_bytes += nbytes
        out = _tensor_over(_mapped(nbytes, self.fd, offset), nbytes, t.dtype, tuple(t.shape))
        _SHARED[out.untyped_storage().data_ptr()] = (FileRange(self.fd, offset, nbytes),
                                                     weakref.ref(out.untyped_storage()))
        return out

    @torch.no_grad()
    def park_module_(self, module: nn.Module) -> None:
        """Park every parameter and persistent buffer of `module` (recursively), in place."""
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or p.is_meta:
                    continue
                plain = p.detach()
                parked = self.park(plain)
                if parked is plain:
                    continue
                if is_traceable_wrapper_subclass(p):
                    mod._parameters[name] = nn.Parameter(parked, requires_grad=False)
                else:  # same Parameter object: ties (`head.weight is emb.weight`) survive
                    p.data = parked
            for name, b in list(mod._buffers.items()):
                if b is not None and not b.is_meta and name not in mod._non_persistent_buffers_set:
                    mod._buffers[name] = self.park(b)


@contextlib.contextmanager
def shared_deepcopy() -> Iterator[None]:
    """Inside the block, deep-copying a parked or lazy-zero tensor (or Parameter) aliases it."""
    def alias_shared(fallback):
        def __deepcopy__(self, memo):
            if id(self) in memo:
                return memo[id(self)]
            if not _bytes_shared(self):
                return fallback(self, memo)
            with torch.no_grad():
                copy = self.detach()
                if isinstance(self, nn.Parameter):
                    copy = nn.Parameter(copy, requires_grad=self.requires_grad)
            memo[id(self)] = copy
            return copy
        return __deepcopy__

    from export.patches import patched

    with patched("Tensor.__deepcopy__", alias_shared), patched("Parameter.__deepcopy__", alias_shared):
        yield


def copy_range(rng: FileRange, dst_fd: int, dst_offset: int) -> None:
    """Copy a parked tensor's bytes into `dst_fd` at `dst_offset`, file to file."""
    done = 0
    while done < rng.nbytes:
        try:
            n = os.copy_file_range(rng.fd, dst_fd, rng.nbytes - done, rng.offset + done, dst_offset + done)
        except OSError:  # another filesystem or an old kernel: bounded reads instead
            n = os.pwrite(dst_fd, os.pread(rng.fd, min(_CHUNK, rng.nbytes - done), rng.offset + done),
                          dst_offset + done)
        if n <= 0:
            raise OSError(f"copying {rng.nbytes} parked bytes stopped after {done}")
        done += n
