"""Programmatic dependent launch (PDL, sm_90+) for the project's Triton kernels: the pieces every op
family shares.

A kernel launched with the programmatic-stream-serialization attribute may start while the kernel
before it in the stream is still running; its `griddepcontrol.wait` returns once that kernel has
finished and its writes are visible. In a CUDA graph the launch becomes a programmatic edge. What a
kernel does before its wait (index math, loads of constants such as weights) overlaps the kernel
before it, and its launch latency hides behind that kernel's tail.

- `pdl_wait` is the wait (and the trigger that lets the next kernel start) for a kernel of ours.
  A trigger after the main loop instead of at the wait (the GEMV and decode attention letting the
  next kernel start only then) was measured on the H200 and dropped: the 31B 12-layer slice's step
  1.59 / 1.60 -> 1.61 / 1.57 ms at fill 1k, 1.68 / 1.64 -> 1.69 / 1.70 at 32k
  (scripts/measurements/pdl_late_31b.json, decode_late_variants.json).
- `op_pdl_mode` is the mode an op compiles its kernels in on a device: 2 on sm_90+ (the H200, the
  RTX 5090), 0 elsewhere (the RTX 4090, CPU, the interpreter).
- `pdl_args` are a launch's arguments.
- The attribute itself comes from the artifact's launcher (export/backends/cuda.py, `pdl_launcher`),
  for the kernels the op families list in their `PDL_KERNELS`. Inductor's own kernels get the same
  from `torch._inductor.config.triton.enable_pdl` (their waits placed by Inductor).

A kernel compiled with a wait but launched without the attribute runs as before: the wait returns at
once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

OP_PDL = True  # the ops compile their PDL_KERNELS with a wait where the GPU has griddepcontrol (sm_90+)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs no inline PTX


@triton.jit
def pdl_wait(PDL: tl.constexpr, ASM: tl.constexpr):
    """`griddepcontrol.wait`, from which on the kernels before this one have finished and their writes
    are visible, and `griddepcontrol.launch_dependents` (the next kernel's programs may start) before
    the wait (PDL 1) or after it (PDL 2). PDL 0 or ASM off: nothing.

    Returns an int32 0 that every access which must follow the wait adds to its pointer (every read
    of what kernels before wrote, every write). The PTX is one pure inline-asm block: torch's mutation
    analysis reads a pure block as writing nothing. A block with side effects would make it take every
    argument of the kernel as written, and the compiled graph would clone the weights before each
    call. So only these data dependences order the accesses after the wait. Reads of data that
    changes while the kernel runs go through coherent loads. The 0 is written as a multiple of 64 so
    that the pointers keep their alignment. Not in the interpreter (no inline PTX;
    its kernels run one after another anyway): 0 there."""
    zero = 0
    if PDL and ASM:
        if PDL == 1:
            ptx: tl.constexpr = "griddepcontrol.launch_dependents; griddepcontrol.wait; mov.b32 $0, 0;"
        else:
            ptx: tl.constexpr = "griddepcontrol.wait; griddepcontrol.launch_dependents; mov.b32 $0, 0;"
        # times 64: Triton's alignment analysis then reads the offset as a multiple of 64, so a
        # pointer plus it keeps the 16-byte alignment its vector loads need
        zero = tl.inline_asm_elementwise(ptx, "=r", [], dtype=tl.int32, is_pure=True, pack=1) * 64
    return zero


@triton.jit
def pdl_wait_at(dep, PDL: tl.constexpr, ASM: tl.constexpr):
    """`pdl_wait` tied to the int32 `dep` (a loop's step): the same PTX with dep as an operand it ignores,
    so the compiler neither hoists it out of the loop it sits in nor moves it ahead of what comes before it
    there. In a pipelined loop (`tl.range(num_stages=...)`) the copies the pipeliner issues ahead of the
    loop (its prologue: constants such as weights) then go out before the first wait; every later step's
    wait returns at once. Returns an int32 0 (a multiple of 64) as `pdl_wait` does."""
    zero = dep * 0
    if PDL and ASM:
        if PDL == 1:
            ptx: tl.constexpr = "griddepcontrol.launch_dependents; griddepcontrol.wait; mov.b32 $0, 0;"
        else:
            ptx: tl.constexpr = "griddepcontrol.wait; griddepcontrol.launch_dependents; mov.b32 $0, 0;"
        zero = tl.inline_asm_elementwise(ptx, "=r,r", [dep], dtype=tl.int32, is_pure=True, pack=1) * 64
    return zero


def pdl_args(pdl: int, attr: bool = True) -> dict:
    """A launch's PDL arguments (`pdl_wait`): the constexpr, always (torch's analysis of a wrapped
    kernel and AOTInductor take the arguments as passed, not the kernel's defaults: without it every
    argument reads as written), and with a mode other than 0 and attr Triton's `launch_pdl` (a direct
    launch on sm_90+). attr False: the mode alone, as the ops launch it (neither torch's wrap_triton
    nor AOTInductor's stock launcher sets the attribute; the artifact's launcher does, for the
    kernels listed); without the attribute the wait returns at once."""
    return {"PDL": pdl, "launch_pdl": True} if pdl and attr else {"PDL": pdl}


def op_pdl_mode(device: torch.device) -> int:
    """The PDL mode an op compiles its waiting kernels in on `device`: 2 where OP_PDL holds on a CUDA
    GPU of sm_90 or later (griddepcontrol is sm_90+: the H200, the RTX 5090; not the RTX 4090), else 0."""
    if not OP_PDL or _INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return 0
    return 2 if torch.cuda.get_device_capability(device)[0] >= 9 else 0
