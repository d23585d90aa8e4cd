"""Read an exported artifact (`model.pte` + `model.ptd`) in pure Python.

Why not ExecuTorch's own loader: the pip build of ExecuTorch cannot run a CUDA delegate and
its Python deserializer needs the flatc binary. The runner only needs a few things, all
reachable with a small flatbuffer reader (runtime/flatbuf.py):

- from the .pte: each program's compiled `.so` (named data `"{program}_so_blob"`) and the
  metadata JSON (named data `"gemma4_metadata"`, or the `metadata` constant method);
- from the .ptd: an index of named tensors (key -> file offset, byte size, dtype, shape) over a
  read-only memory map, so weights are viewed one tensor at a time and host memory never
  holds the whole file.

Layouts (executorch 1.2): both files are a flatbuffer whose bytes 8.. hold an extended
header; segment offsets are relative to the header's segment base offset.
  .pte: "ET12" + header "eh00" {u32 len, u64 program_size, u64 segment_base, u64 segment_size}
  .ptd: "FT01" + header "FH01" {u32 len, u64 fb_offset, u64 fb_size, u64 segment_base, u64 segment_size}
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.flatbuf import FlatBufferError, Table

PTE_NAME = "model.pte"
PTD_NAME = "model.ptd"
METADATA_KEY = "gemma4_metadata"
PAIR_ID_KEY = "gemma4_pair_id"
FORMAT_VERSION = 2  # 2: each method a chain of steps over compiled programs
READABLE_VERSIONS = (1, 2)  # 1: each method one program of its own name
METHODS = ("prefill", "decode")  # what a runner calls; each runs its steps, one AOTInductor delegate each


def so_blob_key(program: str) -> str:
    """The .pte named data holding `program`'s compiled .so."""
    return f"{program}_so_blob"

# executorch_flatbuffer.ScalarType (schema/scalar_type.fbs) -> torch dtype
SCALAR_TYPES: dict[int, torch.dtype] = {
    0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
    5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool,
    15: torch.bfloat16, 23: torch.float8_e5m2, 24: torch.float8_e4m3fn,
    27: torch.uint16, 28: torch.uint32, 29: torch.uint64,
}

# Field indices, in declaration order of schema/program.fbs and flat_tensor.fbs.
_PROGRAM_EXECUTION_PLAN, _PROGRAM_SEGMENTS, _PROGRAM_NAMED_DATA = 1, 4, 7
_PLAN_NAME, _PLAN_VALUES, _PLAN_OUTPUTS = 0, 2, 4
_EVALUE_VAL_TYPE, _KERNEL_TYPE_STRING = 0, 6
_FT_SEGMENTS, _FT_NAMED_DATA = 1, 2
_LAYOUT_SCALAR_TYPE, _LAYOUT_SIZES, _LAYOUT_DIM_ORDER = 0, 1, 2

REEXPORT_HINT = "re-export the model (python -m export.gemma4 ...) or copy model.pte and model.ptd from the same export"


class ArtifactError(RuntimeError):
    """A file of the artifact is missing, truncated, corrupt or from another export."""


@dataclass(frozen=True)
class Segment:
    """A byte range of a file: `offset` is absolute (segment base already added)."""

    offset: int
    size: int


def _check_within(path: Path, what: str, end: int, file_size: int) -> None:
    if end > file_size:
        raise ArtifactError(
            f"{path} is truncated: {what} ends at byte {end} but the file has {file_size} bytes; "
            f"{REEXPORT_HINT}"
        )


def _segments(path: Path, root: Table, index: int, base: int, file_size: int) -> list[Segment]:
    """Segment table of a .pte or .ptd, made absolute and checked against the file size."""
    segs = []
    for i, t in enumerate(root.tables(index)):
        seg = Segment(base + t.scalar(0, "<Q"), t.scalar(1, "<Q"))
        _check_within(path, f"segment {i}", seg.offset + seg.size, file_size)
        segs.append(seg)
    return segs


def _read_header(path: Path, data: bytes, identifier: bytes, magic: bytes) -> bytes:
    """Validate the flatbuffer identifier and the extended header's magic; return the header."""
    if len(data) < 48:
        raise ArtifactError(f"{path} is truncated or empty ({len(data)} bytes); {REEXPORT_HINT}")
    if data[4:6] != identifier[:2] or data[8:12] != magic:
        raise ArtifactError(
            f"{path} is not an ExecuTorch {identifier[:2].decode()}.. file with a {magic.decode()} "
            f"header (found {data[4:8]!r}, {data[8:12]!r}); {REEXPORT_HINT}"
        )
    return data[8:48]


# ---------------------------------------------------------------------------------------------
# .pte
# ---------------------------------------------------------------------------------------------


@dataclass
class PteFile:
    """The program file: named data (so blobs, metadata) and execution-plan names.

    The whole .pte is read into memory: it holds only compiled code and metadata (weights
    live in the .ptd), a few MB even for 31B.
    """

    path: Path
    data: bytes
    named: dict[str, Segment]
    method_names: list[str]

    @staticmethod
    def open(path: str | os.PathLike) -> "PteFile":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path} not found: the program file is missing; {REEXPORT_HINT}")
        data = path.read_bytes()
        header = _read_header(path, data, b"ET12", b"eh00")
        program_size, base, seg_size = struct.unpack_from("<QQQ", header, 8)
        _check_within(path, "the program flatbuffer", program_size, len(data))
        if seg_size:
            _check_within(path, "the segment data", base + seg_size, len(data))
        try:
            root = Table.root(memoryview(data)[:program_size])
            segs = _segments(path, root, _PROGRAM_SEGMENTS, base, len(data))
            named = {}
            for nd in root.tables(_PROGRAM_NAMED_DATA):
                named[nd.string(0)] = segs[nd.scalar(1, "<I")]
            methods = [p.string(_PLAN_NAME) for p in root.tables(_PROGRAM_EXECUTION_PLAN)]
        except (FlatBufferError, IndexError) as e:
            raise ArtifactError(f"{path} is corrupt ({e}); {REEXPORT_HINT}") from e
        return PteFile(path, data, named, methods)

    def named_bytes(self, key: str) -> bytes:
        seg = self.named.get(key)
        if seg is None:
            raise ArtifactError(
                f"{self.path} has no named data {key!r} (it has {sorted(self.named)}); "
                f"was it written by this project's exporter? {REEXPORT_HINT}"
            )
        return self.data[seg.offset : seg.offset + seg.size]

    def constant_method_string(self, name: str) -> str | None:
        """The string returned by a constant method (an execution plan with no instructions
        whose only output is a String EValue), or None if there is no such method."""
        root = Table.root(memoryview(self.data))
        for plan in root.tables(_PROGRAM_EXECUTION_PLAN):
            if plan.string(_PLAN_NAME) != name:
                continue
            outputs = plan.scalars(_PLAN_OUTPUTS, "<i")
            values = plan.tables(_PLAN_VALUES)
            if len(outputs) != 1:
                return None
            tag, val = values[outputs[0]].union(_EVALUE_VAL_TYPE)
            return val.string(0) if tag == _KERNEL_TYPE_STRING and val is not None else None
        return None

    def metadata_json(self) -> str:
        """The metadata JSON: named data first (cheap), the constant method as a fallback."""
        if METADATA_KEY in self.named:
            return self.named_bytes(METADATA_KEY).decode("utf-8")
        text = self.constant_method_string("metadata")
        if text is None:
            raise ArtifactError(
                f"{self.path} has neither named data {METADATA_KEY!r} nor a 'metadata' method; "
                f"it was not written by this project's exporter. {REEXPORT_HINT}"
            )
        return text


# ---------------------------------------------------------------------------------------------
# .ptd
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one named tensor lives in the .ptd."""

    key: str
    offset: int
    nbytes: int
    dtype: torch.dtype | None  # None: raw bytes (no tensor layout)
    shape: tuple[int, ...]


@dataclass
class PtdFile:
    """The weights file: a read-only memory map plus an index of its named tensors.

    `tensor(key)` returns a CPU tensor viewing the map (no copy); pages are read from disk
    when touched, so loading never holds the whole file in host memory. The map is opened
    read-only (a private writable map would be charged in full against the commit limit);
    the runner never writes to weights.
    """

    path: Path
    file_size: int
    entries: dict[str, TensorEntry]
    _mm: mmap.mmap = field(repr=False)

    @staticmethod
    def open(path: str | os.PathLike) -> "PtdFile":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path} not found: the weights file is missing; {REEXPORT_HINT}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(48)
            header = _read_header(path, head, b"FT01", b"FH01")
            fb_offset, fb_size, base, seg_size = struct.unpack_from("<QQQQ", header, 8)
            _check_within(path, "the flatbuffer", fb_offset + fb_size, size)
            _check_within(path, "the segment data", base + seg_size, size)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            entries = _index_ptd(path, mm[: fb_offset + fb_size], base, size)
        except (FlatBufferError, IndexError) as e:
            mm.close()
            raise ArtifactError(f"{path} is corrupt ({e}); {REEXPORT_HINT}") from e
        return PtdFile(path, size, entries, mm)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def raw_bytes(self, key: str) -> bytes:
        e = self._entry(key)
        return self._mm[e.offset : e.offset + e.nbytes]

    def tensor(self, key: str) -> torch.Tensor:
        """A CPU tensor over the memory map (zero copy, read-only memory: never write to it)."""
        e = self._entry(key)
        if e.dtype is None:
            raise ArtifactError(f"{self.path}: {key!r} is raw data, not a tensor")
        numel = 1
        for s in e.shape:
            numel *= s
        if numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        with warnings.catch_warnings():  # "buffer is not writable": intended, see class doc
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=e.dtype, count=numel, offset=e.offset)
        return flat.view(e.shape)

    def release(self, key: str) -> None:
        """Tell the kernel the pages of `key` are no longer needed (after copying the tensor
        to the GPU), so the process's resident set does not grow to the file size."""
        e = self._entry(key)
        page = mmap.PAGESIZE
        start = e.offset - e.offset % page
        if hasattr(self._mm, "madvise") and e.nbytes:
            self._mm.madvise(mmap.MADV_DONTNEED, start, e.offset + e.nbytes - start)

    def _entry(self, key: str) -> TensorEntry:
        e = self.entries.get(key)
        if e is None:
            raise ArtifactError(f"{self.path} has no tensor {key!r}; {REEXPORT_HINT}")
        return e


def _index_ptd(path: Path, fb: bytes, base: int, file_size: int) -> dict[str, TensorEntry]:
    """key -> TensorEntry for every named datum of a FlatTensor flatbuffer."""
    root = Table.root(fb, b"FT01")
    segs = _segments(path, root, _FT_SEGMENTS, base, file_size)
    entries = {}
    for nd in root.tables(_FT_NAMED_DATA):
        key = nd.string(0)
        seg = segs[nd.scalar(1, "<I")]
        layout = nd.table(2)
        dtype, shape = None, ()
        if layout is not None:
            dtype, shape = _layout(path, key, layout)
            need = dtype.itemsize * _numel(shape)
            if need > seg.size:
                raise ArtifactError(f"{path}: tensor {key!r} needs {need} bytes, its segment has {seg.size}")
        entries[key] = TensorEntry(key, seg.offset, seg.size, dtype, shape)
    return entries


def _layout(path: Path, key: str, layout: Table) -> tuple[torch.dtype, tuple[int, ...]]:
    code = layout.scalar(_LAYOUT_SCALAR_TYPE, "<b")
    if code not in SCALAR_TYPES:
        raise ArtifactError(f"{path}: tensor {key!r} has unsupported scalar type {code}")
    sizes = tuple(layout.scalars(_LAYOUT_SIZES, "<i"))
    dim_order = layout.scalars(_LAYOUT_DIM_ORDER, "<B")
    if dim_order and dim_order != list(range(len(sizes))):
        raise ArtifactError(f"{path}: tensor {key!r} has dim_order {dim_order}; only contiguous is supported")
    return SCALAR_TYPES[code], sizes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# metadata + the pair
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVBuffer:
    """One KV-cache buffer the runner allocates (shape already sized: ring or ctx)."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "sliding" | "full" | "chunk" (a ring's prefill K/V for KV-shared readers)


@dataclass(frozen=True)
class MethodStep:
    """One step of a method: run `program` with its constants bound to these .ptd keys (or KV
    fqns); it takes entries of `carry + [pos]` and its outputs replace the carry's first
    entries (tokens in, logits out; export/ARTIFACT.md)."""

    program: str
    constants: dict[str, str]  # aoti constant name -> ptd key
    inputs: tuple[int, ...] = (0, 1)  # which of carry + [pos] the program takes, in order


@dataclass(frozen=True)
class Metadata:
    """The artifact's metadata JSON (export/ARTIFACT.md), typed."""

    pair_id: str
    device: str
    dtype: torch.dtype
    ctx: int
    prefill_chunk: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    kv: tuple[KVBuffer, ...]
    method_steps: dict[str, tuple[MethodStep, ...]]  # method -> its steps, in run order
    raw: dict[str, Any]

    def programs(self) -> list[str]:
        """Every compiled program the methods run, each once."""
        return list(dict.fromkeys(s.program for steps in self.method_steps.values() for s in steps))

    @staticmethod
    def parse(text: str, source: Path) -> "Metadata":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{source}: metadata is not valid JSON ({e}); {REEXPORT_HINT}") from e
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{source}: metadata format_version {version!r}, this runner reads "
                f"{' and '.join(map(str, READABLE_VERSIONS))}; use a runner from the same revision as the exporter"
            )
        try:
            kv = tuple(
                KVBuffer(b["fqn"], tuple(b["shape"]), _dtype(b["dtype"]), b.get("kind", ""))
                for b in d.get("kv", [])
            )
            if version == 1:
                methods = {m: (MethodStep(m, dict(v.get("constants", {}))),) for m, v in d.get("methods", {}).items()}
            else:
                methods = {m: tuple(MethodStep(str(s["program"]), dict(s["constants"]),
                                               tuple(int(i) for i in s.get("inputs", (0, 1)))) for s in v["steps"])
                           for m, v in d.get("methods", {}).items()}
            missing = [m for m in METHODS if not methods.get(m)]
            if missing:
                raise KeyError(f"methods.{missing[0]}")
            eos = d.get("eos_token_ids", [])
            return Metadata(
                pair_id=str(d["pair_id"]),
                device=d["device"],
                dtype=_dtype(d["dtype"]),
                ctx=int(d["ctx"]),
                prefill_chunk=int(d["prefill_chunk"]),
                vocab_size=int(d["vocab_size"]),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                kv=kv,
                method_steps=methods,
                raw=d,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{source}: metadata lacks or mistypes a field ({e!r}); {REEXPORT_HINT}") from e


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass
class Artifact:
    """A checked .pte/.ptd pair and its metadata."""

    directory: Path
    pte: PteFile
    ptd: PtdFile
    metadata: Metadata

    @staticmethod
    def open(directory: str | os.PathLike) -> "Artifact":
        directory = Path(directory)
        if not directory.exists():
            raise ArtifactError(f"{directory} does not exist; pass the export's output directory (its --out)")
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not a directory; pass the export's output directory (its --out)")
        pte = PteFile.open(directory / PTE_NAME)
        meta = Metadata.parse(pte.metadata_json(), pte.path)
        ptd_path = directory / PTD_NAME
        if not ptd_path.is_file():
            raise ArtifactError(
                f"{ptd_path} not found: {pte.path} needs its weights file model.ptd beside it; "
                f"copy it from the same export directory or {REEXPORT_HINT}"
            )
        ptd = PtdFile.open(ptd_path)
        _check_pair(pte, ptd, meta)
        return Artifact(directory, pte, ptd, meta)

    def so_blob(self, program: str) -> bytes:
        return self.pte.named_bytes(so_blob_key(program))


def _check_pair(pte: PteFile, ptd: PtdFile, meta: Metadata) -> None:
    if PAIR_ID_KEY not in ptd:
        raise ArtifactError(f"{ptd.path} carries no {PAIR_ID_KEY!r}: it was not written by this project's exporter; {REEXPORT_HINT}")
    ptd_id = ptd.raw_bytes(PAIR_ID_KEY).decode("utf-8", errors="replace").strip("\x00 \n")
    if ptd_id != meta.pair_id:
        raise ArtifactError(
            f"{ptd.path} (pair_id {ptd_id}) does not belong to {pte.path} (pair_id {meta.pair_id}): "
            f"the two files come from different exports; copy model.pte and model.ptd from the same export"
        )
