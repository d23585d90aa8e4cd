"""A layer's per-layer-input half and its closing residual add as one op: `gemma4::int4_add_ple_close`.

    int4_add_ple_close(x, r, weight_r, eps, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales,
                       weight_c, scalar) -> out
        h, gate = int4_add_linear(x, r, weight_r, eps, gate_qweight, gate_scales)
        p = int4_glu_linear(gate, table, proj_qweight, proj_scales, index)
        out = (h + rms_norm(p, weight_c, eps)) * scalar

E2B / E4B's layer end (export/gemma4/model.py, DecoderLayer.forward): the MLP's output into the residual
stream and the per-layer-input gate (`int4_add_linear`), the gate's activation times the layer's row of the
per-layer inputs and the projection back to the hidden size (`int4_glu_linear` with an index), the projection's
norm into the residual stream and the layer scalar. At M == 1, where both small weights' GEMVs take bf16 x and
the projection's runs one slice (int4_matmul.gemv1_plan), the projection's GEMV also writes out: its last row
block computes the closing add (`int4_matmul._int4_gemv1_kernel`'s CLOSE, `_close_row`), and the gate's GEMV,
which computes h, zeroes the counter that needs (its ZC): the closing add's kernel is gone, nothing launches in
its place. The norm's sum in another order than torch's (within an ulp or two of the factor, as the GEMVs' own
norms). Elsewhere the two ops' paths, then the add in aten ops.

The CPU kernel and the CPU backend's decomposition is `int4_add_ple_close_reference`.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from export.kernels.int4_matmul import (_add_linear, _check_add, _gemv1_kernel, _glu_linear, _m1,
                                        close_reference, gemv1_plan, int4_add_linear_reference, int4_gemv1,
                                        int4_glu_linear_reference)
from export.kernels.pdl import op_pdl_mode


def int4_add_ple_close_reference(x, r, weight_r, eps: float, gate_qweight, gate_scales, table, index, proj_qweight,
                                 proj_scales, weight_c, scalar):
    h, gate = int4_add_linear_reference(x, r, weight_r, eps, gate_qweight, gate_scales)
    p = int4_glu_linear_reference(gate, table, proj_qweight, proj_scales, index)
    return close_reference(h, p, weight_c, eps, scalar)


def _check(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c, scalar):
    """-> (P, K, G, Gp): the per-layer width, the hidden size and the two weights' groups."""
    P, K, G = _check_add(x, r, weight_r, gate_qweight, gate_scales)
    Kp, Pp = proj_qweight.shape[0], proj_qweight.shape[1] * 2
    if (table.dim() < 2 or (*table.shape[:-2], table.shape[-1]) != (*x.shape[:-1], P) or index.numel() != 1
            or proj_scales.shape[0] != Kp or Pp % proj_scales.shape[1]):
        raise ValueError(f"int4_add_ple_close: table {tuple(table.shape)} is no table of rows of the gate's width "
                         f"{P} for x {tuple(x.shape)} ([..., rows, P]), index {tuple(index.shape)} not one index, or "
                         f"the projection's scales {tuple(proj_scales.shape)} do not fit its {tuple(proj_qweight.shape)}")
    Gp = Pp // proj_scales.shape[1]
    if (Kp, Pp) != (K, P) or tuple(weight_c.shape) != (K,) or scalar.numel() != 1:
        raise ValueError(f"int4_add_ple_close: the projection {tuple(proj_qweight.shape)} (K, P / 2), the closing "
                         f"norm's weight {tuple(weight_c.shape)} (K,) or the layer scalar {tuple(scalar.shape)} (one "
                         f"element) do not fit x {tuple(x.shape)} and the gate {tuple(gate_qweight.shape)} (P, K / 2)")
    return P, K, G, Gp


def fused_at_decode(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c,
                    scalar) -> bool:
    """Whether the op on CUDA at M == 1 has the projection's GEMV write the closing add (both GEMVs on bf16 x,
    the projection's in one slice, the hidden size a multiple of 8, every tensor in x's dtype)."""
    P, K, G, Gp = _check(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales,
                         weight_c, scalar)
    gate, proj = gemv1_plan(P, K, G, "res"), gemv1_plan(K, P, Gp, "glu")
    return (_m1(x.reshape(-1, K), G) and not gate.xq and not proj.xq and proj.splits == 1 and K % 8 == 0
            and all(t.dtype == x.dtype for t in (r, weight_r, table, weight_c, scalar)))


@triton_op("gemma4::int4_add_ple_close", mutates_args={})
def int4_add_ple_close(x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, eps: float,
                       gate_qweight: torch.Tensor, gate_scales: torch.Tensor, table: torch.Tensor,
                       index: torch.Tensor, proj_qweight: torch.Tensor, proj_scales: torch.Tensor,
                       weight_c: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """The layer's output after its per-layer-input half (module doc)."""
    P, K, G, Gp = _check(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales,
                         weight_c, scalar)
    if not fused_at_decode(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales,
                           weight_c, scalar):
        h, gate = _add_linear(x, r, weight_r, eps, gate_qweight, gate_scales)
        p = _glu_linear(gate, table, proj_qweight, proj_scales, index)
        return close_reference(h, p, weight_c, eps, scalar)
    gp, pp = gemv1_plan(P, K, G, "res"), gemv1_plan(K, P, Gp, "glu")
    x2 = x.reshape(1, K)
    h = torch.empty_like(x2)
    cnt = torch.empty((1,), device=x.device, dtype=torch.int32)  # the closing add's counter: the gate's GEMV zeroes it
    pdl = op_pdl_mode(x.device)  # the attribute comes from the artifact's launcher, not from here
    gate = int4_gemv1(x2, gate_qweight, gate_scales, gp.splits, kernel=_gemv1_kernel(gp.cfg), xq=False,
                      levels=gp.levels, pdl_quant=pdl, pdl_gemv=pdl, pdl_attr=False,
                      res=(r.reshape(1, K).contiguous(), weight_r.contiguous(), h, eps), zero=cnt)
    out = torch.empty_like(x2)
    int4_gemv1(gate, proj_qweight, proj_scales, 1, kernel=_gemv1_kernel(pp.cfg), xq=False, levels=pp.levels,
               pdl_quant=pdl, pdl_gemv=pdl, pdl_attr=False, up=table.reshape(-1, P).contiguous(),
               up_index=index.reshape(1), close=(h, weight_c.contiguous(), eps, scalar.reshape(1), out), cnt=cnt)
    return out.reshape(x.shape)


@int4_add_ple_close.register_fake
def _(x, r, weight_r, eps, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c, scalar):
    _check(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c, scalar)
    return torch.empty_like(x)


@int4_add_ple_close.register_kernel("cpu")
def _(x, r, weight_r, eps, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c, scalar):
    _check(x, r, weight_r, gate_qweight, gate_scales, table, index, proj_qweight, proj_scales, weight_c, scalar)
    return int4_add_ple_close_reference(x, r, weight_r, eps, gate_qweight, gate_scales, table, index, proj_qweight,
                                        proj_scales, weight_c, scalar)
