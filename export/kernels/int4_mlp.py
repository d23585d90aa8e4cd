"""A layer's MLP after its residual add as one op: `gemma4::int4_add_rms_mlp`.

    int4_add_rms_mlp(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales) -> (h, y)
        h = x + rms_norm(r, weight_r, eps)
        gate, up = int4_rms_linear(h, weight, eps, gu_qweight, gu_scales).chunk(2, -1)
        y = int4_glu_linear(gate, up, down_qweight, down_scales)

`gemma4::int4_add_rms_linear` (the attention output into the residual stream, the MLP's norm and its
joined gate / up projection) and `gemma4::int4_glu_linear` (the activation and the down projection) one
after the other, with one launch less at decode: where both M == 1 plans take x as int8 levels
(int4_matmul.gemv1_plan: the 31B's and E4B's MLPs, E2B's wide ones) the gate / up GEMV also writes the down GEMV's x,
gelu_tanh(gate) * up, as its levels (`int4_matmul._int4_gemv1_kernel`'s GLUQ: the last row block of each
unit of rows computes them) and zeroes that GEMV's counters, which is what the activation's quantize kernel
did. Bit for bit the two ops: the activation is rounded to the gate / up output's dtype before it is
quantized, as that kernel read it. Elsewhere (a prefill chunk, a plan with bf16 x, CPU) the two ops' paths.

    int4_add_rms_mlp_close(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales,
                           weight_c, scalar) -> out
        h, y = int4_add_rms_mlp(x, r, weight_r, weight, eps, ...)
        out = (h + rms_norm(y, weight_c, eps)) * scalar

is the layer's whole MLP half with its closing residual add (a layer without per-layer inputs or experts:
the 31B's): where the fused op applies and the down GEMV runs one slice or sums its slices in-kernel, the
down GEMV's last row block writes out (`int4_matmul._int4_gemv1_kernel`'s CLOSE, `_close_row`; its counter
zeroed with the down GEMV's by the gate / up writers), the closing add's kernel gone. The norm's sum in
another order than torch's (within an ulp or two of the factor, as the GEMVs' own norms). Elsewhere the MLP
op's paths, then the add in aten ops.

The CPU kernels and the CPU backend's decompositions are `int4_add_rms_mlp_reference` and
`int4_add_rms_mlp_close_reference`.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from export.kernels.int4_matmul import (_add_rms_linear, _check_residual, _gemv1_kernel, _glu_linear, _m1,
                                        _xq_plan, GEMV1_CONFIGS, GEMV1_RED_XQ, close_reference, gemv1_plan,
                                        int4_add_rms_linear_reference, int4_gemv1, int4_glu_linear_reference,
                                        levels_buffers)
from export.kernels.pdl import op_pdl_mode


def int4_add_rms_mlp_reference(x, r, weight_r, weight, eps: float, gu_qweight, gu_scales, down_qweight, down_scales):
    h, y = int4_add_rms_linear_reference(x, r, weight_r, weight, eps, gu_qweight, gu_scales)
    gate, up = y.chunk(2, dim=-1)
    return h, int4_glu_linear_reference(gate, up, down_qweight, down_scales)


def _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales):
    N, K, _ = _check_residual(x, r, weight_r, weight, gu_qweight, gu_scales)
    if N % 2 or down_qweight.shape[1] * 2 != N // 2 or down_qweight.shape[0] != K or \
            down_scales.shape[0] != K or (N // 2) % down_scales.shape[1]:
        raise ValueError(f"int4_add_rms_mlp: gate / up {tuple(gu_qweight.shape)} (2 I, K / 2) and down "
                         f"{tuple(down_qweight.shape)} / {tuple(down_scales.shape)} (K, I / 2) / (K, I / G) do not "
                         f"make an MLP of x {tuple(x.shape)}")
    return N // 2, K


def _plans(gu_qweight, gu_scales, down_qweight, down_scales):
    """(I, K, G, Gd, the gate / up GEMV's plan, the down GEMV's plan): the MLP's sizes, groups and M == 1 plans.
    Where the gate / up plan's row blocks make units (max(BLOCK_N, Gd) rows) that do not divide I and 64-row
    blocks would (the 26B-A4B: I 2112, 16.5 blocks of 128), the gate / up GEMV runs 64-row blocks
    (GEMV1_CONFIGS[2]: twice the programs, the same slices) so that it can write the down GEMV's levels."""
    I, K = down_qweight.shape[1] * 2, gu_qweight.shape[1] * 2
    G, Gd = K // gu_scales.shape[1], I // down_scales.shape[1]
    gu = gemv1_plan(2 * I, K, G, "res")
    rows = gu.cfg.kwargs["BLOCK_N"]
    if gu.xq and rows > 64 and I % max(rows, Gd) and not I % max(64, Gd) and max(64, Gd) % min(64, Gd) == 0:
        gu = _xq_plan(GEMV1_CONFIGS[2], gu.splits)
    return I, K, G, Gd, gu, gemv1_plan(K, I, Gd, "glu")


def fused_at_decode(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales) -> bool:
    """Whether the op on CUDA at M == 1 has the gate / up GEMV write the down GEMV's x levels."""
    I, K, G, Gd, gu, down = _plans(gu_qweight, gu_scales, down_qweight, down_scales)
    block_n = gu.cfg.kwargs["BLOCK_N"]
    unit = max(block_n, Gd)
    return (_m1(x.reshape(-1, K), G) and gu.xq and down.xq and (gu.splits == 1 or GEMV1_RED_XQ == 2) and I % unit == 0
            and unit % min(block_n, Gd) == 0 and all(t.dtype == x.dtype for t in (r, weight_r, weight)))


@triton_op("gemma4::int4_add_rms_mlp", mutates_args={})
def int4_add_rms_mlp(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, weight: torch.Tensor, eps: float,
                     gu_qweight: torch.Tensor, gu_scales: torch.Tensor, down_qweight: torch.Tensor,
                     down_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, the MLP's output) of the residual add and the MLP after it (module doc)."""
    _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    return _mlp(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales)


def _mlp(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales):
    """`int4_add_rms_mlp`'s body: the fused path where it applies, else the two ops'."""
    if not fused_at_decode(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales):
        h, y = _add_rms_linear(x, r, weight_r, weight, eps, gu_qweight, gu_scales)
        gate, up = y.chunk(2, dim=-1)
        return h, _glu_linear(gate, up, down_qweight, down_scales)
    return _fused(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales)


def _fused(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales, close=None):
    """(h, y) of the fused path (`fused_at_decode`); close (weight_c, scalar, out [1, K]): the down GEMV also
    writes the closing add into out (`int4_gemv1`'s close)."""
    I, K, _, Gd, gu, down = _plans(gu_qweight, gu_scales, down_qweight, down_scales)
    x2 = x.reshape(1, K)
    h = torch.empty_like(x2)
    pdl = op_pdl_mode(x.device)  # the attribute comes from the artifact's launcher, not from here

    def quantize(cnt, ncnt):  # the gate / up GEMV writes the down GEMV's x levels and zeroes its counters
        levels = levels_buffers(I, Gd, down.levels, x.device)
        int4_gemv1(x2, gu_qweight, gu_scales, gu.splits, kernel=_gemv1_kernel(gu.cfg), xq=True, levels=gu.levels,
                   pdl_quant=pdl, pdl_gemv=pdl, pdl_attr=False, norm=(weight.contiguous(), eps),
                   res=(r.reshape(1, K).contiguous(), weight_r.contiguous(), h),
                   glu_out=(levels, Gd, down.levels, cnt, ncnt))
        return levels

    shape = x2.new_empty((1, I))  # the down GEMV's x: its shape and dtype (the levels are its values)
    closing = None if close is None else (h, close[0].contiguous(), eps, close[1].reshape(1), close[2])
    y = int4_gemv1(shape, down_qweight, down_scales, down.splits, kernel=_gemv1_kernel(down.cfg), xq=True,
                   levels=down.levels, pdl_quant=pdl, pdl_gemv=pdl, pdl_attr=False, quantize=quantize,
                   close=closing)
    return h.reshape(x.shape), y.reshape(x.shape)


@int4_add_rms_mlp.register_fake
def _(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales):
    _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    return torch.empty_like(x), torch.empty_like(x)


@int4_add_rms_mlp.register_kernel("cpu")
def _(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales):
    _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    return int4_add_rms_mlp_reference(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales)


def int4_add_rms_mlp_close_reference(x, r, weight_r, weight, eps: float, gu_qweight, gu_scales, down_qweight,
                                     down_scales, weight_c, scalar):
    h, y = int4_add_rms_mlp_reference(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales)
    return close_reference(h, y, weight_c, eps, scalar)


def _check_close(x, weight_c, scalar, K: int) -> None:
    if tuple(weight_c.shape) != (K,) or scalar.numel() != 1:
        raise ValueError(f"int4_add_rms_mlp_close: the closing norm's weight {tuple(weight_c.shape)} and the layer "
                         f"scalar {tuple(scalar.shape)} for x {tuple(x.shape)} ((K,) and one element)")


def fused_close_at_decode(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales, weight_c,
                          scalar) -> bool:
    """Whether the op on CUDA at M == 1 has the down GEMV write the closing add too (`fused_at_decode`, the down
    GEMV runs one slice or sums its slices in-kernel, and the hidden size is a multiple of 8)."""
    down = _plans(gu_qweight, gu_scales, down_qweight, down_scales)[5]
    return (fused_at_decode(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
            and (down.splits == 1 or GEMV1_RED_XQ == 2) and x.shape[-1] % 8 == 0 and weight_c.dtype == x.dtype
            and scalar.dtype == x.dtype)


@triton_op("gemma4::int4_add_rms_mlp_close", mutates_args={})
def int4_add_rms_mlp_close(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, weight: torch.Tensor, eps: float,
                           gu_qweight: torch.Tensor, gu_scales: torch.Tensor, down_qweight: torch.Tensor,
                           down_scales: torch.Tensor, weight_c: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """The layer's output after its MLP: the residual add, the MLP and the closing add (module doc)."""
    _, K = _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    _check_close(x, weight_c, scalar, K)
    if not fused_close_at_decode(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales, weight_c,
                                 scalar):
        h, y = _mlp(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales)
        return close_reference(h, y, weight_c, eps, scalar)
    out = torch.empty((1, K), device=x.device, dtype=x.dtype)
    _fused(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales, (weight_c, scalar, out))
    return out.reshape(x.shape)


@int4_add_rms_mlp_close.register_fake
def _(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales, weight_c, scalar):
    _, K = _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    _check_close(x, weight_c, scalar, K)
    return torch.empty_like(x)


@int4_add_rms_mlp_close.register_kernel("cpu")
def _(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight, down_scales, weight_c, scalar):
    _, K = _check(x, r, weight_r, weight, gu_qweight, gu_scales, down_qweight, down_scales)
    _check_close(x, weight_c, scalar, K)
    return int4_add_rms_mlp_close_reference(x, r, weight_r, weight, eps, gu_qweight, gu_scales, down_qweight,
                                            down_scales, weight_c, scalar)
