"""Writing the export artifact: `model.pte` + `model.ptd`, atomically, each weight once.

`.ptd` layout (ExecuTorch FlatTensor, the same bytes `FlatTensorSerializer` produces, so
ExecuTorch's own readers accept it):

    [FlatTensor flatbuffer with the 40-byte "FH01" extended header after its magic]
    [padding to SEGMENT_ALIGNMENT]
    [segment 0][padding][segment 1]...          one segment per distinct tensor

ExecuTorch's serializer joins every segment into one in-memory `Cord` before writing; at
31B that is ~17 GiB of host RAM, so this module writes the container itself: the
flatbuffer only describes offsets and layouts, computed from shapes and dtypes up front,
and each tensor is then materialised (`PtdTensor.load`), written in bounded chunks and
dropped; a weight parked in the export's spool file (export/spool.py) is copied file to
file instead. Several keys may name one segment (tied weights are stored once).

Atomicity: `atomic_output_dir` builds the artifact in a hidden temp dir next to `--out`,
fsyncs every file and the dir, then renames it into place; a killed export leaves the
previous artifact (or none) and a stale `.{name}.tmp-*` dir that the next export removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from executorch.exir._serialize._program import _insert_flatbuffer_header
from executorch.exir._serialize.padding import aligned_size, pad_to
from executorch.exir.tensor_layout import TensorLayout
from executorch.extension.flat_tensor.serialize.flat_tensor_schema import DataSegment, FlatTensor, NamedData
from executorch.extension.flat_tensor.serialize.serialize import (
    FlatTensorHeader,
    _deserialize_to_flat_tensor,
    _serialize_to_flatbuffer,
)

from export.spool import FileRange, copy_range, file_range
from runtime.artifact import PAIR_ID_KEY, PTD_NAME, PTE_NAME

SEGMENT_ALIGNMENT = 4096  # page-aligned segments: each tensor can be mmap'ed / pinned alone
CHUNK_BYTES = 64 << 20  # bound on the host copy of a device tensor while writing
_FLATBUFFER_ALIGNMENT = 16
_FLAT_TENSOR_VERSION = 0  # FlatTensor schema version ExecuTorch 1.2 reads


@dataclass(frozen=True)
class PtdTensor:
    """One tensor to store: key, what it will look like, and how to get its bytes.

    `load` is called once, while writing, so a caller can stream weights from disk or
    another device; `identity` (e.g. a data pointer) lets tied tensors share a segment.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    identity: object = None
    parked: FileRange | None = None  # bytes already in a spool file: copied file to file

    @staticmethod
    def of(key: str, tensor: torch.Tensor) -> "PtdTensor":
        ident = None if tensor.device.type == "meta" else (
            tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        return PtdTensor(key, tuple(tensor.shape), tensor.dtype, lambda: tensor, ident, file_range(tensor))

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def layout(self) -> TensorLayout:
        return TensorLayout.from_tensor(torch.empty(self.shape, dtype=self.dtype, device="meta"))


@dataclass(frozen=True)
class PtdEntry:
    """Where one key's bytes are in a written `.ptd` (offset from the file start)."""

    key: str
    offset: int
    size: int
    layout: TensorLayout | None


@dataclass(frozen=True)
class _Segment:
    source: PtdTensor | bytes
    offset: int  # relative to the segment base
    size: int


def _plan_segments(tensors: list[PtdTensor], blobs: dict[str, bytes]) -> tuple[list[_Segment], list[NamedData]]:
    """Assign each distinct tensor (and each raw blob) a segment; tied keys share one."""
    segments: list[_Segment] = []
    named: list[NamedData] = []
    by_identity: dict[object, int] = {}
    end = 0

    def add(source, size: int) -> int:
        nonlocal end
        offset = aligned_size(end, SEGMENT_ALIGNMENT)
        segments.append(_Segment(source, offset, size))
        end = offset + size
        return len(segments) - 1

    for t in tensors:
        idx = by_identity.get(t.identity) if t.identity is not None else None
        if idx is None:
            idx = add(t, t.nbytes)
            if t.identity is not None:
                by_identity[t.identity] = idx
        named.append(NamedData(key=t.key, segment_index=idx, tensor_layout=t.layout()))
    for key, data in blobs.items():
        named.append(NamedData(key=key, segment_index=add(data, len(data)), tensor_layout=None))
    return segments, named


def _header_bytes(segments: list[_Segment], named: list[NamedData]) -> bytes:
    """The flatbuffer with its extended header, padded to where segment data starts."""
    flat = FlatTensor(version=_FLAT_TENSOR_VERSION,
                      segments=[DataSegment(offset=s.offset, size=s.size) for s in segments],
                      named_data=named)
    payload = bytes(_serialize_to_flatbuffer(flat))
    header_len = aligned_size(FlatTensorHeader.EXPECTED_LENGTH, _FLATBUFFER_ALIGNMENT)
    base = aligned_size(len(payload) + header_len, SEGMENT_ALIGNMENT)
    data_size = segments[-1].offset + segments[-1].size if segments else 0
    header = FlatTensorHeader(flatbuffer_offset=header_len, flatbuffer_size=len(payload),
                              segment_base_offset=base, segment_data_size=data_size).to_bytes()
    out = _insert_flatbuffer_header(payload, r"FT[0-9a-zA-Z][0-9a-zA-Z]", pad_to(header, header_len))
    return pad_to(out, base)


def _write_tensor(f, t: torch.Tensor, expect: PtdTensor) -> None:
    """Write a tensor's bytes in row-major order, copying at most CHUNK_BYTES at a time."""
    if tuple(t.shape) != expect.shape or t.dtype != expect.dtype:
        raise ValueError(f"{expect.key}: got {tuple(t.shape)} {t.dtype}, planned {expect.shape} {expect.dtype}")
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    for start in range(0, flat.numel(), CHUNK_BYTES):
        f.write(flat[start:start + CHUNK_BYTES].cpu().numpy().data)


def write_ptd(path: Path, tensors: Iterable[PtdTensor], blobs: dict[str, bytes] | None = None,
              progress: Callable[[int], None] | None = None) -> list[PtdEntry]:
    """Write a FlatTensor `.ptd`: every tensor once (tied ones share a segment) + raw blobs.

    `progress(nbytes)` is called after each segment. Returns the written index.
    """
    tensors = list(tensors)
    keys = [t.key for t in tensors] + list(blobs or {})
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate .ptd keys: " + ", ".join(sorted({k for k in keys if keys.count(k) > 1})))
    segments, named = _plan_segments(tensors, blobs or {})
    head = _header_bytes(segments, named)
    with open(path, "wb") as f:
        f.write(head)
        for seg in segments:
            f.write(b"\0" * (len(head) + seg.offset - f.tell()))
            if isinstance(seg.source, bytes):
                f.write(seg.source)
            elif seg.source.parked is not None:  # never faulted into this process
                f.flush()
                start = f.tell()
                copy_range(seg.source.parked, f.fileno(), start)
                f.seek(start + seg.source.parked.nbytes)
            else:
                _write_tensor(f, seg.source.load(), seg.source)
            if progress:
                progress(seg.size)
        f.flush()
        os.fsync(f.fileno())
    return [PtdEntry(n.key, len(head) + segments[n.segment_index].offset, segments[n.segment_index].size,
                     n.tensor_layout) for n in named]


def read_ptd_index(path: Path) -> dict[str, PtdEntry]:
    """Parse a `.ptd`'s header: key -> absolute offset, size and layout (no data read)."""
    with open(path, "rb") as f:
        head = f.read(64)
        header = FlatTensorHeader.from_bytes(head[8:])
        if not header.is_valid():
            raise ValueError(f"{path}: not a FlatTensor (.ptd) file")
        f.seek(0)
        flat = _deserialize_to_flat_tensor(f.read(header.flatbuffer_offset + header.flatbuffer_size))
    base = header.segment_base_offset
    return {n.key: PtdEntry(n.key, base + flat.segments[n.segment_index].offset,
                            flat.segments[n.segment_index].size, n.tensor_layout) for n in flat.named_data}


def load_ptd_tensor(path: Path, entry: PtdEntry) -> torch.Tensor:
    """Read one tensor of a `.ptd` into CPU memory (tests and checks; the runner mmaps)."""
    dtype = _torch_dtype(entry.layout.scalar_type)
    with open(path, "rb") as f:
        f.seek(entry.offset)
        data = bytearray(f.read(entry.size))
    t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(entry.layout.sizes)


def _torch_dtype(scalar_type) -> torch.dtype:
    from executorch.exir.tensor import scalar_type_enum
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool, torch.float64):
        if scalar_type_enum(dt) == scalar_type:
            return dt
    raise ValueError(f"unsupported scalar type {scalar_type}")


# ---- atomic output directory ----------------------------------------------------------

def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(out: Path) -> None:
    """Drop dirs left by killed exports into the same --out (their pid is gone):
    `.{name}.tmp-{pid}-{random}` (unfinished) and `.{name}.old-{pid}` (replaced)."""
    for p in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = p.name[len(out.name) + 6:].split("-")[0]  # after ".{name}.tmp-" / ".{name}.old-"
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` by rename, else vanishes.

    Files written into the yielded dir need no fsync of their own: all are fsynced before
    the rename. An existing `out` is moved aside first and removed after the swap.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artifact is not
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact(out: Path, et_program, tensors: list[PtdTensor], pair_id: str,
                   add_files: Callable[[Path], None] = lambda directory: None) -> dict[str, int]:
    """model.pte + model.ptd (+ whatever `add_files` writes into the directory), all or
    nothing; returns the file sizes. Progress of the .ptd goes out as stage events."""
    from export import stages

    with atomic_output_dir(out) as tmp:
        with open(tmp / PTE_NAME, "wb") as f:
            et_program.write_to_file(f)
        with stages.stage("writing model.ptd", total=sum(t.nbytes for t in tensors), unit="B") as s:
            write_ptd(tmp / PTD_NAME, tensors, {PAIR_ID_KEY: pair_id.encode()}, progress=s.advance)
        add_files(tmp)
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())}
