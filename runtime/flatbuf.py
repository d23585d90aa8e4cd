"""A minimal, bounds-checked FlatBuffers table reader.

The runner reads `.pte` and `.ptd` headers without flatc or generated code: only a handful of
fields are needed (named data, segments, a string or two), so a ~100-line reader over the
wire format is simpler than shipping generated classes for two schemas. Every offset is
checked against the buffer, so a truncated or corrupt file raises `FlatBufferError` instead
of reading garbage.

Wire format in brief: the buffer starts with a uoffset to the root table. A table starts
with an soffset to its vtable (vtable = table - soffset); the vtable holds uint16 sizes and
then one uint16 offset per field (0 = absent). Reference fields (tables, strings, vectors)
hold a uoffset relative to their own position; vectors and strings start with a uint32
length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class FlatBufferError(ValueError):
    """The bytes do not form a valid flatbuffer of the expected shape."""


def _unpack(fmt: str, buf, pos: int):
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(buf):
        raise FlatBufferError(f"read of {size} bytes at offset {pos} is outside the {len(buf)}-byte buffer")
    return struct.unpack_from(fmt, buf, pos)[0]


@dataclass(frozen=True)
class Table:
    """One flatbuffer table: `buf` is the whole flatbuffer, `pos` the table's start."""

    buf: memoryview | bytes
    pos: int

    @staticmethod
    def root(buf, identifier: bytes | None = None) -> "Table":
        """The root table; `identifier` (4 bytes, e.g. b"ET12") is checked when given."""
        if identifier is not None and bytes(buf[4:8]) != identifier:
            raise FlatBufferError(f"file identifier is {bytes(buf[4:8])!r}, expected {identifier!r}")
        return Table(buf, _unpack("<I", buf, 0))

    def _field_offset(self, index: int) -> int:
        """Offset of field `index` inside the table, or 0 when the field is absent."""
        vtable = self.pos - _unpack("<i", self.buf, self.pos)
        vtable_size = _unpack("<H", self.buf, vtable)
        entry = 4 + 2 * index
        if entry + 2 > vtable_size:
            return 0
        return _unpack("<H", self.buf, vtable + entry)

    def scalar(self, index: int, fmt: str, default=0):
        """A scalar field (`fmt` is a struct code such as "<I", "<Q", "<b")."""
        off = self._field_offset(index)
        return default if off == 0 else _unpack(fmt, self.buf, self.pos + off)

    def _deref(self, index: int) -> int | None:
        off = self._field_offset(index)
        if off == 0:
            return None
        at = self.pos + off
        return at + _unpack("<I", self.buf, at)

    def table(self, index: int) -> "Table | None":
        at = self._deref(index)
        return None if at is None else Table(self.buf, at)

    def string(self, index: int) -> str | None:
        at = self._deref(index)
        return None if at is None else _read_string(self.buf, at)

    def vector_len(self, index: int) -> int:
        at = self._deref(index)
        return 0 if at is None else _unpack("<I", self.buf, at)

    def tables(self, index: int) -> list["Table"]:
        """A vector of tables (each element is a uoffset relative to itself)."""
        at = self._deref(index)
        if at is None:
            return []
        n = _unpack("<I", self.buf, at)
        out = []
        for i in range(n):
            elem = at + 4 + 4 * i
            out.append(Table(self.buf, elem + _unpack("<I", self.buf, elem)))
        return out

    def scalars(self, index: int, fmt: str) -> list:
        """A vector of scalars of struct code `fmt` (e.g. "<i" for [int32])."""
        at = self._deref(index)
        if at is None:
            return []
        n = _unpack("<I", self.buf, at)
        size = struct.calcsize(fmt)
        if at + 4 + n * size > len(self.buf):
            raise FlatBufferError(f"vector of {n} x {size} bytes at {at} runs past the buffer end")
        return [struct.unpack_from(fmt, self.buf, at + 4 + i * size)[0] for i in range(n)]

    def union(self, type_index: int) -> tuple[int, "Table | None"]:
        """A union field: (type tag, table). FlatBuffers stores the tag at `type_index` and
        the value at `type_index + 1`."""
        return self.scalar(type_index, "<B"), self.table(type_index + 1)


def _read_string(buf, at: int) -> str:
    n = _unpack("<I", buf, at)
    if at + 4 + n > len(buf):
        raise FlatBufferError(f"string of {n} bytes at {at} runs past the buffer end")
    return bytes(buf[at + 4 : at + 4 + n]).decode("utf-8")
