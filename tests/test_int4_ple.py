"""`gemma4::int4_add_ple_close` (export/kernels/int4_ple.py): E2B / E4B's layer end as one op, the per-layer
projection's GEMV writing the closing add (`_int4_gemv1_kernel`'s CLOSE) and the per-layer gate's zeroing its
counter (ZC). The kernels against the unfused ones and the add (the interpreter, CPU), the op's CPU kernel against
the references, where the fusion applies, the compiled kernels (sm_90, no GPU), and on CUDA the op against the two
ops and the add. What torch's mutation analysis reads of the kernels: tests/test_int4_matmul.py."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from export.kernels import int4_matmul as im
from export.kernels import int4_ple as ple
from tests.helpers import gemv1_sass_sm90, programs_an_sm, run_code

_INTERPRETED = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im
    torch.manual_seed(0)
    f = lambda t: t.float()
    trunc = lambda t: (f(t).view(torch.int32) & -65536).view(torch.float32)  # the interpreter's bf16 cast
    with torch._library.triton.set_wrap_triton_enabled(False):
        for K, P in [(1536, 256), (512, 64)]:  # E2B's widths, and a small one with groups of 64
            G = min(128, P)
            gq, gs = im.quantize_int4(torch.randn(P, K), 128)
            pq, ps = im.quantize_int4(torch.randn(K, P), G)
            x, r = (torch.randn(1, K) * 3).bfloat16(), (torch.randn(1, K) * 7).bfloat16()
            wr, wc = (torch.rand(K) + 0.5).bfloat16(), (torch.rand(K) + 0.5).bfloat16()
            s = (torch.rand(1) + 0.5).bfloat16()
            table, idx = torch.randn(5, P).bfloat16(), torch.tensor([3])
            gk = im._gemv1_kernel(im.gemv1_plan(P, K, 128).cfg)
            pk = im._gemv1_kernel(im.gemv1_plan(K, P, G).cfg)
            cnt = torch.full((1,), 7, dtype=torch.int32)
            h = torch.full_like(x, float("nan"))
            gate = im.int4_gemv1(x, gq, gs, 1, kernel=gk, xq=False, res=(r, wr, h, 1e-6), zero=cnt)
            zeroed = int(cnt[0])
            out = torch.full_like(x, float("nan"))
            p = im.int4_gemv1(gate, pq, ps, 1, kernel=pk, xq=False, up=table, up_index=idx,
                              close=(h, wc, 1e-6, s, out), cnt=cnt)
            h0 = torch.empty_like(x)
            gate0 = im.int4_gemv1(x, gq, gs, 1, kernel=gk, xq=False, res=(r, wr, h0, 1e-6))
            p0 = im.int4_gemv1(gate0, pq, ps, 1, kernel=pk, xq=False, up=table, up_index=idx)
            # the close as the kernel computes it (the norm's factor in fp32), each bf16 rounding the interpreter's
            inv = 1.0 / torch.sqrt((f(p) ** 2).sum() / K + 1e-6)
            emulated = trunc(trunc(f(h) + trunc(f(p) * inv * f(wc))) * f(s))
            print("ple", K, P, zeroed, int(cnt[0]), torch.equal(h, h0) and torch.equal(gate, gate0) and torch.equal(p, p0),
                  int((f(out) != emulated).sum()))
""")


def test_projection_writes_the_closing_add_in_the_interpreter():
    """The per-layer gate's GEMV with ZC zeroes the counter (set to 7) and computes h, its output as without it; the
    projection's GEMV with CLOSE writes its output as without it and, from its last row block, (h + rms_norm(p) * w)
    * s over the row (written over NaNs) bit for bit as that computes in fp32 with the interpreter's bf16 casts
    (they truncate), and leaves the counter at 0 (Triton interpreter, ~90 s)."""
    rows = [ln.split()[1:] for ln in run_code(_INTERPRETED).splitlines() if ln.startswith("ple")]
    assert len(rows) == 2, rows
    for k, p, zeroed, left, same, differ in rows:
        assert zeroed == "0" and left == "0" and same == "True" and differ == "0", (k, p, zeroed, left, same, differ)


def _weights(K=256, P=64, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    gate = im.quantize_int4(torch.randn(P, K, generator=gen), 64)
    proj = im.quantize_int4(torch.randn(K, P, generator=gen), 64)
    return gate, proj


def test_cpu_kernel_is_the_two_ops_then_the_closing_add():
    """On CPU the op is `int4_add_linear`'s reference, `int4_glu_linear`'s over the table's row, then (h +
    rms_norm(p) * w) * s in bf16; a table of another width, a closing weight of another length, a scalar of two
    elements are refused, each named."""
    gen = torch.Generator().manual_seed(1)
    (gq, gs), (pq, ps) = _weights(gen=gen)
    x, r = (torch.randn(1, 1, 256, generator=gen).bfloat16() for _ in range(2))
    wr, wc = ((torch.rand(256, generator=gen) + 0.5).bfloat16() for _ in range(2))
    s = (torch.rand(1, generator=gen) + 0.5).bfloat16()
    table, idx = torch.randn(1, 1, 4, 64, generator=gen).bfloat16(), torch.tensor([2])
    out = torch.ops.gemma4.int4_add_ple_close(x, r, wr, 1e-6, gq, gs, table, idx, pq, ps, wc, s)
    h, g = im.int4_add_linear_reference(x, r, wr, 1e-6, gq, gs)
    p = im.int4_glu_linear_reference(g, table, pq, ps, idx)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (h + im.rms_norm_reference(p, wc, 1e-6)) * s)
    with pytest.raises(ValueError, match=r"int4_add_ple_close: table \(1, 1, 4, 32\)"):
        torch.ops.gemma4.int4_add_ple_close(x, r, wr, 1e-6, gq, gs, table[..., :32], idx, pq, ps, wc, s)
    with pytest.raises(ValueError, match=r"closing norm's weight \(128,\)"):
        torch.ops.gemma4.int4_add_ple_close(x, r, wr, 1e-6, gq, gs, table, idx, pq, ps, wc[:128], s)
    with pytest.raises(ValueError, match=r"layer scalar \(2,\)"):
        torch.ops.gemma4.int4_add_ple_close(x, r, wr, 1e-6, gq, gs, table, idx, pq, ps, wc, s.repeat(2))


@pytest.mark.parametrize("K,fused", [(1536, True), (2560, True)])
def test_where_the_projection_writes_the_closing_add(K, fused):
    """E2B's and E4B's layer ends at M == 1 in bf16 take it (both small weights' GEMVs on bf16 x, the projection's in
    one slice); two tokens, fp32 x or a table in another dtype do not."""
    P = 256
    with torch.device("meta"):
        x = torch.empty(1, 1, K, dtype=torch.bfloat16)
        gq, gs = torch.empty(P, K // 2, dtype=torch.uint8), torch.empty(P, K // 128, dtype=torch.bfloat16)
        pq, ps = torch.empty(K, P // 2, dtype=torch.uint8), torch.empty(K, P // 128, dtype=torch.bfloat16)
        w, s = torch.empty(K, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)
        table, idx = torch.empty(1, 1, 35, P, dtype=torch.bfloat16), torch.empty(1, dtype=torch.int64)
        assert ple.fused_at_decode(x, x, w, gq, gs, table, idx, pq, ps, w, s) == fused
        x2, t2 = torch.empty(1, 2, K, dtype=torch.bfloat16), torch.empty(1, 2, 35, P, dtype=torch.bfloat16)
        assert not ple.fused_at_decode(x2, x2, w, gq, gs, t2, idx, pq, ps, w, s)
        xf, wf = x.float(), w.float()
        assert not ple.fused_at_decode(xf, xf, wf, gq, gs, table.float(), idx, pq, ps, wf, s.float())
        assert not ple.fused_at_decode(x, x, w, gq, gs, table.float(), idx, pq, ps, w, s)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
@pytest.mark.parametrize("K", [1536, 2560])
def test_epilogues_leave_the_small_gemvs_main_loops(K):
    """E2B's / E4B's per-layer projection with CLOSE and gate with ZC compiled for sm_90 (no GPU), aligned as
    launched: the same main loops' loads, conversions and FMAs, no more instructions, no spills; the gate's registers
    as they were; the projection's more (the row's y, h and w held for the norm) but still as many programs an SM as
    its grid puts there, all resident at once."""
    sig = {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16",
           "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
           "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "eps": "fp64",
           "r_ptr": "*bf16", "wr_ptr": "*bf16", "h_ptr": "*bf16", "ui_ptr": "*i64", "COFF": "i32", "ch_ptr": "*bf16",
           "cw_ptr": "*bf16", "cs_ptr": "*bf16", "co_ptr": "*bf16", "ceps": "fp64", "zc_ptr": "*i32"}
    work = lambda ops: {o: c for o, c in ops.items() if o.split(".")[0] in ("LDG", "I2F", "FFMA")}  # noqa
    P = 256
    for n, k, flags, switch in ((K, P, dict(GLU=1, UI=1), "CLOSE"), (P, K, dict(RES=1), "ZC")):
        plan = im.gemv1_plan(n, k, 128)
        got = []
        for on in (0, 1):
            const = {"GROUP": 128, **plan.cfg.kwargs, "RED": 0, "XQ": False, "ASM": True, "PDL": 2, "LEVELS": 2,
                     "GLU": 0, "NORM": 0, "RES": 0, "UI": 0, "EARLY": 1, "GLUQ": 0, "DGROUP": 128, "DLEVELS": 2,
                     "NORM_STEPS": im.norm_steps(k // 2), "CLOSE": 0, "ZC": 0, "CSTEPS": im.norm_steps(n), **flags,
                     switch: on}
            ops, reg, res = gemv1_sass_sm90(const, sig, plan.cfg.num_warps)
            assert "STACK:0 " in res and "LOCAL:0" in res, res
            got.append((ops, reg))
        (loop0, reg0), (loop1, reg1) = got
        assert work(loop0) and work(loop0) == work(loop1) and sum(loop1.values()) <= sum(loop0.values()) + 2, got
        grid = -(-n // plan.cfg.kwargs["BLOCK_N"])
        assert (reg1 == reg0) if switch == "ZC" else programs_an_sm(reg1, plan.cfg.num_warps) >= -(-grid // 132), \
            (n, k, switch, reg0, reg1, grid)


@pytest.mark.cuda
@torch.no_grad()
def test_op_matches_the_two_ops_and_the_add_on_cuda():
    """E2B's and E4B's layer ends, bf16 at M == 1 (the table of every layer's rows, this layer's by index): the op's
    output is `int4_add_linear`, `int4_glu_linear` and the add in torch, within an ulp or two of bf16 where the norm's
    factor (summed in another order) rounds otherwise: 1e-2 of the largest element, 2e-3 over the row."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    P = 256
    for K, layers in ((1536, 35), (2560, 42)):
        gq, gs = im.quantize_int4(torch.randn(P, K, device="cuda", generator=gen), 128)
        pq, ps = im.quantize_int4(torch.randn(K, P, device="cuda", generator=gen), 128)
        table = torch.randn(1, 1, layers, P, device="cuda", generator=gen).bfloat16()
        for i in (0, layers - 1):
            idx = torch.tensor([i], device="cuda")
            x, r = (torch.randn(1, 1, K, device="cuda", generator=gen).bfloat16() for _ in range(2))
            wr, wc = ((torch.rand(K, device="cuda", generator=gen) + 0.5).bfloat16() for _ in range(2))
            s = (torch.rand(1, device="cuda", generator=gen) + 0.5).bfloat16()
            assert ple.fused_at_decode(x, r, wr, gq, gs, table, idx, pq, ps, wc, s)
            out = torch.ops.gemma4.int4_add_ple_close(x, r, wr, 1e-6, gq, gs, table, idx, pq, ps, wc, s).float()
            h, g = torch.ops.gemma4.int4_add_linear(x, r, wr, 1e-6, gq, gs)
            p = torch.ops.gemma4.int4_glu_linear(g, table, pq, ps, idx)
            want = ((h + im.rms_norm_reference(p, wc, 1e-6)) * s).float()
            assert (out - want).abs().max() <= 1e-2 * want.abs().max(), (K, i)
            assert (out - want).norm() <= 2e-3 * want.norm(), (K, i, ((out - want).norm() / want.norm()).item())
