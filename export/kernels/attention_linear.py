"""Attention straight into its int4 output projection: `gemma4::attention_int4_linear`.

    attention_int4_linear(q[1, T, H, D], k, v, k_scale, v_scale, pos[1], window, qweight, scales, rotate)
        -> y[1, T, N] = int4_linear(R(attention(q, k, v, ...)).reshape(1, T, H * D), qweight, scales)

R is `gemma4::hadamard` with rotate (a quantized cache holds V rotated, export/gemma4/model.py), else nothing.

The two ops one after the other (`gemma4::attention` over the static cache, no chunk K/V; then
`gemma4::int4_linear`, with the rotation between), with fewer launches at decode: where the projection's
M == 1 plan takes x as int8 levels (int4_matmul.gemv1_plan: the 31B's and the 26B-A4B's o_proj, E2B's and
E4B's in their full layers) and the decode step has more than one share per KV head
(attention.decode_splits), attention's combine writes its output as those levels (`attention._combine`'s XQ, one group of the weight a program: the group divides D; with rotate a
whole head a program, rotated back first, `_combine`'s ROT) and zeroes the GEMV's split-sum counters, which
is what the quantize kernel before the GEMV did (`int4_matmul._quant_x_kernel`); the GEMV reads them: the
quantize kernel's launch is gone, and the rotation's. Its output is the unfused ops' bit for bit: the
combine rounds its values to the output's dtype before it rotates or quantizes them, as those kernels
read them. Elsewhere (prefill, a small o_proj whose GEMV takes bf16 x, one share per KV head, a head
dim the group does not divide, CPU) the op runs the two ops' paths one after the other.

The CPU kernel and the CPU backend's decomposition is `attention_int4_linear_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from export.kernels import attention as attn
from export.kernels import hadamard
from export.kernels.hadamard import hadamard_reference
from export.kernels.int4_matmul import _gemv1, _linear, _m1, gemv1_plan, int4_linear_reference


def attention_int4_linear_reference(q, k, v, k_scale, v_scale, pos, window: int, qweight, scales,
                                    rotate: bool = False):
    _, T, H, D = q.shape
    out = attn.attention_reference(q, k, v, k_scale, v_scale, pos, window)
    if rotate:
        out = hadamard_reference(out)
    return int4_linear_reference(out.reshape(1, T, H * D), qweight, scales)


def _check_shapes(q, qweight, scales):
    _, _, H, D = q.shape
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if q.shape[0] != 1 or K != H * D or scales.shape[0] != N or K % scales.shape[1]:
        raise ValueError(f"attention_int4_linear: q {tuple(q.shape)} (1, T, H, D) does not feed qweight "
                         f"{tuple(qweight.shape)} (N, H * D / 2) with scales {tuple(scales.shape)} (N, H * D / G)")


def fused_at_decode(q: torch.Tensor, k: torch.Tensor, k_scale: Optional[torch.Tensor],
                    qweight: torch.Tensor, scales: torch.Tensor, rotate: bool = False) -> bool:
    """Whether a decode step (T == 1) of the op on CUDA has the combine write the GEMV's x levels."""
    _, _, H, D = q.shape
    N, K = qweight.shape[0], qweight.shape[1] * 2
    G = K // scales.shape[1]
    splits = attn.decode_splits(k.shape[2], k.shape[1], D, attn.kv_format(k, k_scale))
    return (splits > 1 and D % G == 0 and gemv1_plan(N, K, G).xq and _m1(q[0, :, 0], G)
            and not (rotate and D & (D - 1)))


@triton_op("gemma4::attention_int4_linear", mutates_args={})
def attention_int4_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
                          v_scale: Optional[torch.Tensor], pos: torch.Tensor, window: int, qweight: torch.Tensor,
                          scales: torch.Tensor, rotate: bool = False) -> torch.Tensor:
    """The attention output (rotated back with rotate)'s int4 projection (module doc); bf16 q."""
    _, T, H, D = q.shape
    _check_shapes(q, qweight, scales)
    decode = isinstance(T, int) and T == 1
    if not (decode and fused_at_decode(q, k, k_scale, qweight, scales, rotate)):
        out = attn.launch(q, k, v, k_scale, v_scale, pos, window, decode, wrap=wrap_triton)
        if rotate:
            out = hadamard.launch(out, wrap=wrap_triton)
        return _linear(out.reshape(1, T, H * D), qweight, scales)
    K = H * D
    G = K // scales.shape[1]
    levels = gemv1_plan(qweight.shape[0], K, G).levels

    def quantize(cnt, ncnt):  # the combine writes x's levels and zeroes the GEMV's counters
        return attn.launch(q, k, v, k_scale, v_scale, pos, window, True, wrap=wrap_triton,
                           levels=(G, cnt, ncnt, levels, rotate))

    return _gemv1(q.reshape(1, K), qweight, scales, quantize=quantize).reshape(1, 1, -1)


@attention_int4_linear.register_fake
def _(q, k, v, k_scale, v_scale, pos, window, qweight, scales, rotate=False):
    return q.new_empty((1, q.shape[1], qweight.shape[0]))


@attention_int4_linear.register_kernel("cpu")
def _(q, k, v, k_scale, v_scale, pos, window, qweight, scales, rotate=False):
    _check_shapes(q, qweight, scales)
    return attention_int4_linear_reference(q, k, v, k_scale, v_scale, pos, window, qweight, scales, rotate)
