"""Hadamard rotation along the last dim: `gemma4::hadamard(x) -> x @ H_D` (orthonormal, D a power
of two; H = H^T = H^-1, so the op is its own inverse).

A quantized KV cache holds K and V rotated (export/gemma4/model.py): the rotation spreads outlier
channels over all of them before rounding, and since q . k = (qH) . (kH) and sum p (vH) =
(sum p v) H, attention rotates q and the output back. Written as aten ops (a fast Walsh-Hadamard
transform, `hadamard_reference`), Inductor splits the log2(D) butterfly stages into several
kernels (each stage doubles the reads per output; on the H200 a decode step of the 31B ran three
kernels per rotation, four rotations per full layer). On CUDA the op is one Triton kernel:
each program loads BLOCK_R rows of D values, runs the butterflies in registers in fp32
(`fwht`, the same adds and subtracts in the same order as the reference, so the results agree
bitwise), scales by D^-1/2 and stores in x's dtype.

`fwht` is a jit function so other kernels can rotate a tile they hold. On sm_90+ the kernel waits
on the grid before it (programmatic dependent launch, export/kernels/pdl.py). The CPU kernel of the
op and the CPU backend's decomposition are `hadamard_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from export.kernels.pdl import op_pdl_mode, pdl_wait

# the kernel waits on the grid before it on sm_90+ (export/kernels/pdl.py); the artifact's launcher
# gives it the programmatic-stream-serialization attribute (export/backends/cuda.py)
PDL_KERNELS = ("_hadamard_kernel",)
ROW_ELEMS = 2048  # values a program holds (BLOCK_R rows of D): 8 KiB of fp32, one conversion buffer in shared memory


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (n a power of two): H = H^T = H^-1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_reference(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(D) along the last dim as a fast Walsh-Hadamard transform in fp32 aten ops (no
    D x D constant), back in x's dtype: stage h pairs element i with i + h inside blocks of 2h."""
    D = x.shape[-1]
    lead = x.shape[:-1]
    y = x.float()
    h = 1
    while h < D:
        y = y.reshape(*lead, D // (2 * h), 2, h)
        a, b = y.select(-2, 0), y.select(-2, 1)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, D) * D**-0.5).to(x.dtype)


@triton.jit
def fwht(y, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """y (R, D) fp32 -> y @ (the unnormalized Sylvester matrix of order D), in registers: the
    stages of `hadamard_reference` (the pair's axis moved last for split / join)."""
    for s in tl.static_range(LOG2D):  # stage s pairs i with i + 2^s
        y = tl.reshape(y, (R, D >> (s + 1), 2, 1 << s))
        a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, D))
    return y


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, n_rows, scale, D: tl.constexpr, LOG2D: tl.constexpr, BLOCK_R: tl.constexpr,
                     PDL: tl.constexpr = 0):
    if PDL:  # sm_90+ (pdl.op_pdl_mode): the read and the write after the wait
        z = pdl_wait(PDL, True)
        x_ptr, y_ptr = x_ptr + z, y_ptr + z
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    ok = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = fwht(x, BLOCK_R, D, LOG2D) * tl.cast(scale, tl.float32)  # fp32 math: AOTInductor passes a float as fp64
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def block_rows(D: int) -> int:
    return max(1, ROW_ELEMS // D)


def _check(x: torch.Tensor) -> int:
    D = x.shape[-1]
    if not isinstance(D, int) or D < 2 or D & (D - 1):
        raise ValueError(f"hadamard: the last dim ({D}) must be a power of two >= 2")
    return D


def launch(x: torch.Tensor, wrap=lambda k: k) -> torch.Tensor:
    """The Triton kernel over x's rows (`wrap`: wrap_triton inside the op, identity for direct calls)."""
    D = _check(x)
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty_like(x2)
    n = x2.shape[0]
    R = block_rows(D)
    wrap(_hadamard_kernel)[(triton.cdiv(n, R),)](x2, out, n, D**-0.5, D=D, LOG2D=D.bit_length() - 1, BLOCK_R=R,
                                                  PDL=op_pdl_mode(x.device), num_warps=4)
    return out.view(x.shape)


@triton_op("gemma4::hadamard", mutates_args={})
def hadamard_op(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":
        return hadamard_reference(x)
    return launch(x, wrap=wrap_triton)


@hadamard_op.register_kernel("cpu")
def _(x):
    return hadamard_reference(x)


@hadamard_op.register_fake
def _(x):
    _check(x)
    return x.new_empty(x.shape)  # contiguous, as both kernels return it (x may be a transposed view)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(D) along the last dim: the op (one kernel on CUDA)."""
    return torch.ops.gemma4.hadamard(x)


def rotate_rows(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`hadamard_rotate` of tensors with the same last dim in one op call (one launch on CUDA): their rows
    joined, rotated, and split back into each one's shape. Row by row the same values as one call each."""
    D = xs[0].shape[-1]
    rows = [x.reshape(-1, D) for x in xs]
    out = hadamard_rotate(torch.cat(rows))
    return tuple(o.view(x.shape) for o, x in zip(out.split([r.shape[0] for r in rows]), xs))
