"""The CUDA kernels compiled into a program's `.so`, read without a GPU: their cubins (AOTInductor embeds
each kernel's image whole) and each kernel's registers, stack and local memory as cuobjdump reports them
(Triton ships cuobjdump beside ptxas); a cubin's SASS for the tests that read a kernel's instructions.

Why the stack matters: the CUDA context reserves `stack size x every thread the GPU can hold` of device
memory, outside any allocator, and raises the stack size for the rest of the process when it launches a
kernel that needs more than the context has (1024 bytes a thread by default). On an H200 (132 SMs x 2048
threads) each KiB a thread over that costs 264 MiB; on an RTX 4090 (128 x 1536) 192 MiB. One kernel of
E2B's prefill with 3264 bytes of stack took 0.56 GiB that way (scripts/memory_outside.py)."""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from pathlib import Path

EM_CUDA = 190
DEFAULT_STACK_BYTES = 1024  # the context's stack size a thread until a kernel needs more


def cubins(blob: bytes) -> list[bytes]:
    """The CUDA ELF images (cubins) stored whole inside `blob` (a `.so` that embeds its kernels):
    each from its ELF magic to the furthest of its section data and header tables."""
    found, at = [], blob.find(b"\x7fELF", 1)
    while at > 0:
        head = blob[at:at + 64]
        if len(head) == 64 and head[4] == 2 and struct.unpack_from("<H", head, 0x12)[0] == EM_CUDA:
            phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
            size = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            for i in range(shnum if at + shoff + shentsize * shnum <= len(blob) else 0):
                kind, = struct.unpack_from("<I", blob, at + shoff + i * shentsize + 4)
                offset, length = struct.unpack_from("<QQ", blob, at + shoff + i * shentsize + 0x18)
                if kind != 8:  # SHT_NOBITS takes no bytes in the file
                    size = max(size, offset + length)
            if shoff and at + size <= len(blob):
                found.append(blob[at:at + size])
        at = blob.find(b"\x7fELF", at + 4)
    return found


def cuobjdump() -> Path | None:
    """Triton's bundled cuobjdump, None where this install has none."""
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.is_file() else None


def _dump(cubin: bytes, flag: str) -> str | None:
    """cuobjdump's `flag` output for one cubin; None without cuobjdump."""
    tool = cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def sass(cubin: bytes) -> str:
    """The SASS of one cubin as cuobjdump prints it; "" without cuobjdump."""
    return _dump(cubin, "-sass") or ""


def kernel_resources(cubin: bytes) -> list[dict]:
    """cuobjdump's resource line of each function in one cubin: kernel, reg, stack, shared, local
    (bytes a thread for stack and local); [] without cuobjdump."""
    text = _dump(cubin, "-res-usage")
    if text is None:
        return []
    rows, name = [], None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        r = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if r and name:
            rows.append({"kernel": name, "reg": int(r.group(1)), "stack": int(r.group(2)),
                         "shared": int(r.group(3)), "local": int(r.group(4))})
            name = None
    return rows


def deep_stacks(so_data: bytes, limit: int = DEFAULT_STACK_BYTES) -> list[dict]:
    """The kernels of a `.so` whose stack a thread is over `limit`, the deepest first."""
    rows = [r for c in cubins(so_data) for r in kernel_resources(c) if r["stack"] > limit]
    return sorted(rows, key=lambda r: -r["stack"])
