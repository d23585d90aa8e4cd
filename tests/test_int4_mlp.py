"""`gemma4::int4_add_rms_mlp` (export/kernels/int4_mlp.py): the MLP after its residual add as one op, the gate /
up GEMV writing the down GEMV's x as int8 levels (`_int4_gemv1_kernel`'s GLUQ). The kernel against the quantize
kernel's levels (the interpreter, CPU: bit for bit), the op's CPU kernel against the references, where the fusion
applies, and on CUDA the op against the two ops (what torch's mutation analysis reads of the kernel:
tests/test_int4_matmul.py). Then `gemma4::int4_add_rms_mlp_close`, the same with the layer's closing add written
by the down GEMV (its CLOSE): the same four checks."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from export.kernels import int4_matmul as im
from export.kernels import int4_mlp as mlp
from tests.helpers import gemv1_sass_sm90, programs_an_sm, run_code


_INTERPRETED = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im
    torch.manual_seed(0)
    # fp32 x (the interpreter's bf16 casts are wrong for negative values); (I, K, gate / up config, slices, the
    # down group, its levels): row blocks of half a group (two pairs a unit), of a whole one, of a quarter
    # with three slices summed in-kernel (RED 2), and of two groups of 64 with one level
    with torch._library.triton.set_wrap_triton_enabled(False):
        for I, K, cfg, splits, dG, dlev in [(256, 512, (64, 2, 4), 1, 128, 2), (256, 512, (128, 2, 4), 1, 64, 1),
                                            (256, 768, (64, 2, 4), 2, 128, 2), (384, 512, (32, 1, 4), 3, 64, 2)]:
            qweight, scales = im.quantize_int4(torch.randn(2 * I, K), 128)
            x = torch.randn(1, K)
            kern = im._gemv1_kernel(im._cfg1(*cfg))
            levels = im.levels_buffers(I, dG, dlev, x.device)
            dcnt = torch.full((20,), 5, dtype=torch.int32)
            y = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=True, red=2,
                              glu_out=(levels, dG, dlev, dcnt, 13))
            y_first = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=True, red=2)
            first = im._quant_x(y_first[:, :I].contiguous(), dG, torch.zeros(1, dtype=torch.int32), 0, levels=dlev,
                                up=y_first[:, I:].contiguous())
            same = all(torch.equal(a, b) for a, b in zip(levels, first))
            print("case", I, splits, dG, dlev, torch.equal(y, y_first), same, int(dcnt[:13].abs().sum()),
                  int(dcnt[13:].sum()))
""")


def test_gate_up_writes_the_levels_the_quantize_kernel_would_in_the_interpreter():
    """The gate / up GEMV with GLUQ writes its output as before and the down GEMV's x levels bit for bit as the
    activation's quantize kernel writes them from that output, and zeroes the down GEMV's counters (no more):
    row blocks of half a unit, a whole one, a quarter with the K slices summed in-kernel; one and two levels
    (Triton interpreter, ~30 s)."""
    rows = [ln.split()[1:] for ln in run_code(_INTERPRETED).splitlines() if ln.startswith("case")]
    assert len(rows) == 4, rows
    for I, splits, dG, dlev, y_same, same, zeroed, kept in rows:
        assert y_same == "True" and same == "True", (I, splits, dG, dlev)
        assert zeroed == "0" and kept == str(5 * 7), (I, splits, zeroed, kept)


def _weights(H=256, I=512, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    gu = im.quantize_int4(torch.randn(2 * I, H, generator=gen), 128)
    down = im.quantize_int4(torch.randn(H, I, generator=gen), 128)
    return gu, down


def test_cpu_kernel_is_the_add_rms_linear_then_the_glu_linear():
    """On CPU the op is `int4_add_rms_linear`'s reference, its output's halves as gate and up, then
    `int4_glu_linear`'s; weights that do not make an MLP of x are refused with their shapes named."""
    gen = torch.Generator().manual_seed(1)
    (guq, gus), (dq, ds) = _weights(gen=gen)
    x, r = torch.randn(1, 1, 256, generator=gen), torch.randn(1, 1, 256, generator=gen)
    wr, w = torch.rand(256, generator=gen) + 0.5, torch.rand(256, generator=gen) + 0.5
    h, y = torch.ops.gemma4.int4_add_rms_mlp(x, r, wr, w, 1e-6, guq, gus, dq, ds)
    h_ref, gu = im.int4_add_rms_linear_reference(x, r, wr, w, 1e-6, guq, gus)
    want = im.int4_glu_linear_reference(gu[..., :512], gu[..., 512:], dq, ds)
    assert torch.equal(h, h_ref) and torch.equal(y, want)
    with pytest.raises(ValueError, match=r"int4_add_rms_mlp: gate / up \(1024, 128\)"):
        torch.ops.gemma4.int4_add_rms_mlp(x, r, wr, w, 1e-6, guq, gus, dq[:, :128], ds[:, :2])


@pytest.mark.parametrize("H,I,fused", [(5376, 21504, True), (1536, 6144, True), (1536, 12288, True),
                                       (2560, 10240, True), (2816, 2112, True), (256, 512, False)])
def test_where_the_gate_up_writes_the_levels(H, I, fused, monkeypatch):
    """The 31B's, E2B's (both widths), E4B's and the 26B-A4B's dense MLPs at M == 1 in bf16 take the fusion where
    both plans take x as levels (the 26B-A4B's gate / up in 64-row blocks, whose units divide its I of 2112 where
    128 rows do not); a small MLP whose GEMVs take bf16 x does not, nor any M > 1 or fp32 x. With the staged MLP
    tiles (GEMV1_STAGED_MLP, the default) E2B's narrow MLP's gate / up and the 26B-A4B's take bf16 x, so those
    two MLPs do not."""
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    with torch.device("meta"):
        x = torch.empty(1, 1, H, dtype=torch.bfloat16)
        guq, gus = torch.empty(2 * I, H // 2, dtype=torch.uint8), torch.empty(2 * I, H // 128, dtype=torch.bfloat16)
        gd = im.group_size_for(I, 128)
        dq, ds = torch.empty(H, I // 2, dtype=torch.uint8), torch.empty(H, I // gd, dtype=torch.bfloat16)
        w = torch.empty(H, dtype=torch.bfloat16)
        assert mlp.fused_at_decode(x, x, w, w, guq, gus, dq, ds) == fused
        if fused:  # the fused GEMV's row blocks make units that divide I
            gu = mlp._plans(guq, gus, dq, ds)[4]
            assert I % max(gu.cfg.kwargs["BLOCK_N"], gd) == 0
        x3 = torch.empty(1, 3, H, dtype=torch.bfloat16)
        assert not mlp.fused_at_decode(x3, x3, w, w, guq, gus, dq, ds)
        xf, wf = x.float(), w.float()
        assert not mlp.fused_at_decode(xf, xf, wf, wf, guq, gus, dq, ds)
        monkeypatch.setattr(im, "GEMV1_STAGED_MLP", True)
        staged = (H, I) in ((1536, 6144), (2816, 2112))
        assert mlp.fused_at_decode(x, x, w, w, guq, gus, dq, ds) == (fused and not staged)


@pytest.mark.cuda
@torch.no_grad()
def test_op_matches_the_two_ops_on_cuda(monkeypatch):
    """The 31B's MLP (5376 -> 2 x 21504 -> 5376: one slice of 128-row blocks) and E2B's (1536 -> 2 x 6144: two
    slices of 64-row blocks, half a group each), bf16 at M == 1, both GEMVs on x levels (GEMV1_STAGED_MLP off: E2B's
    gate / up takes bf16 x by default): the op (the gate / up GEMV writing the down GEMV's levels) gives
    `int4_add_rms_linear` then `int4_glu_linear` bit for bit, h too. The 26B-A4B's (2816 -> 2 x 2112, the down's
    groups of 64): its fused gate / up runs 64-row blocks where the op alone runs 128 (each row's sum across lanes
    may then round otherwise): h bit for bit, y within 1e-3."""
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for H, I in ((5376, 21504), (1536, 6144), (2816, 2112)):
        guq, gus = im.quantize_int4(torch.randn(2 * I, H, device="cuda", generator=gen), 128)
        dq, ds = im.quantize_int4(torch.randn(H, I, device="cuda", generator=gen), im.group_size_for(I, 128))
        for _ in range(3):
            x, r = (torch.randn(1, 1, H, device="cuda", generator=gen).bfloat16() for _ in range(2))
            wr, w = ((torch.rand(H, device="cuda", generator=gen) + 0.5).bfloat16() for _ in range(2))
            assert mlp.fused_at_decode(x, r, wr, w, guq, gus, dq, ds)
            h, y = torch.ops.gemma4.int4_add_rms_mlp(x, r, wr, w, 1e-6, guq, gus, dq, ds)
            h_two, gu = torch.ops.gemma4.int4_add_rms_linear(x, r, wr, w, 1e-6, guq, gus)
            want = torch.ops.gemma4.int4_glu_linear(gu[..., :I], gu[..., I:], dq, ds)
            if I % 128:
                assert torch.equal(h, h_two), (H, I)
                assert (y.float() - want.float()).norm() <= 1e-3 * want.float().norm(), (H, I)
            else:
                assert torch.equal(h, h_two) and torch.equal(y, want), (H, I, (y.float() - want.float()).abs().max())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
@pytest.mark.parametrize("n,k", [(43008, 5376), (12288, 1536)])
def test_epilogue_leaves_the_main_loop_as_it_was(n, k):
    """The gate / up GEMV with GLUQ compiled for sm_90 (no GPU) at the 31B's and E2B's plans, aligned as launched:
    no more registers (or the GEMV would hold fewer programs an SM) and the same main loop as without it, no
    spills."""
    sig = {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16",
           "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
           "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "HALF": "i32", "GOFF": "i32",
           "lq_ptr": "*i32", "lf_ptr": "*fp32", "lc_ptr": "*i32", "dcnt_ptr": "*i32", "DNCNT": "i32"}
    plan = im.gemv1_plan(n, k, 128)
    got = []
    for gluq in (0, 1):
        const = dict(GROUP=128, RED=2, XQ=True, ASM=True, LEVELS=plan.levels, GLUQ=gluq, DGROUP=128, DLEVELS=2,
                     PDL=2, **plan.cfg.kwargs)
        ops, reg, res = gemv1_sass_sm90(const, sig, plan.cfg.num_warps)
        got.append((ops, reg))
        assert "STACK:0 " in res and "LOCAL:0" in res, res
    (loop0, reg0), (loop1, reg1) = got
    work = lambda ops: {o: c for o, c in ops.items() if o.split(".")[0] in ("LDG", "IDP", "I2F", "FFMA", "LOP3")}  # noqa
    # the same loads, dp4a, conversions and FMAs (ptxas may pick a move's form otherwise), no more instructions
    assert work(loop0) and work(loop0) == work(loop1) and sum(loop1.values()) <= sum(loop0.values()) + 2 and reg1 <= reg0, got


_CLOSE_INTERPRETED = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im
    torch.manual_seed(0)
    # fp32 (the interpreter's bf16 casts truncate): (N, K, config, slices): one slice, three and two summed in-kernel
    with torch._library.triton.set_wrap_triton_enabled(False):
        for N, K, cfg, splits in [(256, 512, (64, 2, 4), 1), (1200, 768, (128, 2, 4), 3), (96, 512, (32, 1, 4), 2)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x = torch.randn(1, K)
            h, w, s = torch.randn(1, N) * 3, torch.rand(N) + 0.5, torch.rand(1) + 0.5
            out = torch.full((1, N), float("nan"))
            kern = im._gemv1_kernel(im._cfg1(*cfg))
            seen = {}

            def quantize(cnt, ncnt):
                seen.update(cnt=cnt, n=ncnt)
                return im._quant_x(x, 128, cnt, ncnt, levels=2)

            y = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=True, red=2, quantize=quantize,
                              close=(h, w, 1e-6, s, out))
            y_first = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=True, red=2)
            want = im.close_reference(h, y, w, 1e-6, s)
            err = ((out - want).abs() / want.abs().clamp(min=1e-3)).max().item()
            print("close", N, splits, torch.equal(y, y_first), err, seen["n"], int(seen["cnt"][:seen["n"]].abs().sum()))
""")


def test_down_gemv_writes_the_closing_add_in_the_interpreter():
    """The GEMV with CLOSE writes y as without it and, from its last row block, (h + rms_norm(y) * w) * s over the
    whole row (written over NaNs) as `close_reference` computes it from that y (fp32: to an ulp of the norm's
    factor), in one slice and with the slices summed in-kernel; its counters, the row's among them, end at 0
    (Triton interpreter, ~15 s)."""
    rows = [ln.split()[1:] for ln in run_code(_CLOSE_INTERPRETED).splitlines() if ln.startswith("close")]
    assert len(rows) == 3, rows
    for n, splits, y_same, err, ncnt, left in rows:
        assert y_same == "True" and float(err) <= 1e-5, (n, splits, err)
        assert int(ncnt) == (1 if splits == "1" else int(n) // 4 + 1) and left == "0", (n, splits, ncnt, left)


def test_cpu_close_kernel_is_the_mlp_then_the_closing_add():
    """On CPU `int4_add_rms_mlp_close` is the MLP op's reference, then (h + rms_norm(y) * w) * s, in bf16 as the model's
    ops round it; a closing weight of another width or a scalar of two elements is refused, both named."""
    gen = torch.Generator().manual_seed(3)
    (guq, gus), (dq, ds) = _weights(gen=gen)
    x, r = (torch.randn(1, 1, 256, generator=gen).bfloat16() for _ in range(2))
    wr, w, wc = ((torch.rand(256, generator=gen) + 0.5).bfloat16() for _ in range(3))
    s = (torch.rand(1, generator=gen) + 0.5).bfloat16()
    out = torch.ops.gemma4.int4_add_rms_mlp_close(x, r, wr, w, 1e-6, guq, gus, dq, ds, wc, s)
    h, y = mlp.int4_add_rms_mlp_reference(x, r, wr, w, 1e-6, guq, gus, dq, ds)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (h + im.rms_norm_reference(y, wc, 1e-6)) * s)
    with pytest.raises(ValueError, match=r"int4_add_rms_mlp_close: the closing norm's weight \(128,\)"):
        torch.ops.gemma4.int4_add_rms_mlp_close(x, r, wr, w, 1e-6, guq, gus, dq, ds, wc[:128], s)
    with pytest.raises(ValueError, match=r"layer scalar \(2,\)"):
        torch.ops.gemma4.int4_add_rms_mlp_close(x, r, wr, w, 1e-6, guq, gus, dq, ds, wc, s.repeat(2))


@pytest.mark.parametrize("H,I,fused", [(5376, 21504, True), (1536, 6144, True), (256, 512, False)])
def test_where_the_down_gemv_writes_the_closing_add(H, I, fused, monkeypatch):
    """The 31B's MLP at M == 1 in bf16 (its down GEMV sums eight slices in-kernel) and E2B's (one slice, with
    GEMV1_STAGED_MLP off: its gate / up on x levels) take it; a small MLP without the MLP fusion does not, nor a
    closing weight or scalar in another dtype."""
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    with torch.device("meta"):
        x = torch.empty(1, 1, H, dtype=torch.bfloat16)
        guq, gus = torch.empty(2 * I, H // 2, dtype=torch.uint8), torch.empty(2 * I, H // 128, dtype=torch.bfloat16)
        dq, ds = torch.empty(H, I // 2, dtype=torch.uint8), torch.empty(H, I // 128, dtype=torch.bfloat16)
        w, s = torch.empty(H, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)
        assert mlp.fused_close_at_decode(x, x, w, w, guq, gus, dq, ds, w, s) == fused
        assert not mlp.fused_close_at_decode(x, x, w, w, guq, gus, dq, ds, w.float(), s)
        assert not mlp.fused_close_at_decode(x, x, w, w, guq, gus, dq, ds, w, s.float())


@pytest.mark.cuda
@torch.no_grad()
def test_close_op_matches_the_mlp_op_and_the_add_on_cuda(monkeypatch):
    """The 31B's and E2B's MLPs (both GEMVs on x levels: GEMV1_STAGED_MLP off), bf16 at M == 1: the op's output (the
    down GEMV's last row block writing the closing add) is `int4_add_rms_mlp` then the add in torch, within an ulp
    or two of bf16 where the norm's factor (summed in another order) rounds otherwise: 1e-2 of the output's
    largest element, 2e-3 over the row."""
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    gen = torch.Generator(device="cuda").manual_seed(4)
    for H, I in ((5376, 21504), (1536, 6144)):
        guq, gus = im.quantize_int4(torch.randn(2 * I, H, device="cuda", generator=gen), 128)
        dq, ds = im.quantize_int4(torch.randn(H, I, device="cuda", generator=gen), 128)
        for _ in range(3):
            x, r = (torch.randn(1, 1, H, device="cuda", generator=gen).bfloat16() for _ in range(2))
            wr, w, wc = ((torch.rand(H, device="cuda", generator=gen) + 0.5).bfloat16() for _ in range(3))
            s = (torch.rand(1, device="cuda", generator=gen) + 0.5).bfloat16()
            assert mlp.fused_close_at_decode(x, r, wr, w, guq, gus, dq, ds, wc, s)
            out = torch.ops.gemma4.int4_add_rms_mlp_close(x, r, wr, w, 1e-6, guq, gus, dq, ds, wc, s).float()
            h, y = torch.ops.gemma4.int4_add_rms_mlp(x, r, wr, w, 1e-6, guq, gus, dq, ds)
            want = ((h + im.rms_norm_reference(y, wc, 1e-6)) * s).float()
            assert (out - want).abs().max() <= 1e-2 * want.abs().max(), (H, I)
            assert (out - want).norm() <= 2e-3 * want.norm(), (H, I, ((out - want).norm() / want.norm()).item())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
def test_close_epilogue_leaves_the_down_gemv_as_it_was():
    """The 31B's down GEMV (x as levels, eight slices summed in-kernel) with CLOSE compiled for sm_90 (no GPU),
    aligned as launched: the same main loop's work, no spills, and registers for as many programs an SM as its
    grid puts there (336 programs on 132 SMs: 3; the close's values held as packed 16-byte loads, 135 registers
    against 128; with 2-byte loads it took 239, two an SM)."""
    sig = {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16",
           "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
           "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "COFF": "i32",
           "ch_ptr": "*bf16", "cw_ptr": "*bf16", "cs_ptr": "*bf16", "co_ptr": "*bf16", "ceps": "fp64"}
    n, k = 5376, 21504
    plan = im.gemv1_plan(n, k, 128)
    got = []
    for close in (0, 1):
        const = dict(GROUP=128, RED=2, XQ=True, ASM=True, LEVELS=plan.levels, GLUQ=0, CLOSE=close,
                     CSTEPS=im.norm_steps(n), PDL=2, **plan.cfg.kwargs)
        ops, reg, res = gemv1_sass_sm90(const, sig, plan.cfg.num_warps)
        got.append((ops, reg))
        assert "STACK:0 " in res and "LOCAL:0" in res, res
    (loop0, reg0), (loop1, reg1) = got
    work = lambda ops: {o: c for o, c in ops.items() if o.split(".")[0] in ("LDG", "IDP", "I2F", "FFMA", "LOP3")}  # noqa
    # the same loads, dp4a, conversions and FMAs (ptxas may pick a move's form otherwise), no more instructions
    assert work(loop0) and work(loop0) == work(loop1) and sum(loop1.values()) <= sum(loop0.values()) + 2, got
    grid = -(-n // plan.cfg.kwargs["BLOCK_N"]) * plan.splits
    assert programs_an_sm(reg1, plan.cfg.num_warps) >= -(-grid // 132), (reg0, reg1, grid)
