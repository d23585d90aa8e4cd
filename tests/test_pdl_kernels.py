"""The kernels that wait on the grid before them (export/kernels/pdl.py: the int4 GEMV's, decode
attention's, the Hadamard op's and the MoE decode's), compiled offline for sm_90
(no GPU): in PDL mode 2 each holds the wait, and its global loads and stores are the same
instructions as without it. The wait's 0 is added to the pointers; written as a plain 0, Triton
lost the pointers' alignment and the attention kernel's cp.async tile loads became 2-byte loads.
Also: torch's mutation analysis reads the Hadamard kernel with its wait as writing its output alone.
Float arguments are compiled as AOTInductor types them (fp64; Triton's own launch: fp32), and no kernel may
then do its arithmetic in fp64: `sqrt_rn` refuses fp64 (a 31B export failed on it), and fp64 is 1/64 of
the fp32 rate on the RTX 4090 / 5090."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import collections, re
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from export.kernels import attention as A
    from export.kernels import hadamard as Hd
    from export.kernels import int4_matmul as im
    from export.kernels import moe_int4 as mo

    from torch._inductor.codegen.common import SizeArg
    from torch._inductor.codegen.triton_utils import signature_of

    # the type AOTInductor gives a Python float argument of a user kernel (fp64 in torch 2.11, where
    # Triton's own launch gives fp32): every float argument is compiled as that
    FLOAT = signature_of(SizeArg("eps", 1e-6), size_dtype=None)
    F64_MATH = re.compile(r"\\b(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|max|min|neg|abs|ex2|lg2)\\.[\\w.]*f64\\b")

    def compile90(fn, sig, const, warps, stages=1):
        # pointers and the ints AOTInductor would specialize as multiples of 16
        sig = {a: FLOAT if t == "fp32" else t for a, t in sig.items()}
        names = list(fn.arg_names)
        aligned = [a for a, t in sig.items() if t.startswith("*") or a.startswith("s") or a in ("S", "H", "N", "KW")]
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        full = {**{a: "constexpr" for a in const}, **sig}
        k = triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
        return k.asm["ptx"]

    def memory_ops(ptx):
        ops = re.findall(r"\\b((?:ld|st)\\.global[\\w.]*|cp\\.async\\.\\w+\\.shared\\.global|ldmatrix[\\w.]*|"
                         r"griddepcontrol\\.\\w+)", ptx)
        return collections.Counter(op.replace(".nc", "") for op in ops)  # PDL reads x coherently (int4_matmul)

    def report(name, fn, sig, const, warps, stages=1):
        ptx = [compile90(fn, sig, {**const, "PDL": p}, warps, stages) for p in (0, 2)]
        a, b = (memory_ops(x) for x in ptx)
        waits = b.pop("griddepcontrol.wait", 0), b.pop("griddepcontrol.launch_dependents", 0)
        same = a == b
        f64 = sum(len(F64_MATH.findall(x)) for x in ptx)  # a float argument turned the math fp64
        print(name, "waits", waits[0], "triggers", waits[1], "without", a.get("griddepcontrol.wait", 0),
              "same-memory-ops", same, "f64-math", f64, dict(a) if not same else "", dict(b) if not same else "")

    att = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KS": "*fp16", "VS": "*fp16", "POS": "*i64", "O": "*bf16",
           "MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "T": "i32", "S": "i32", "H": "i32", "WINDOW": "i32",
           "NUM_SPLITS": "i32", "sqt": "i32", "sqh": "i32", "skh": "i32", "sks": "i32", "svh": "i32", "svs": "i32",
           "ssh": "i32", "sot": "i32", "soh": "i32"}
    for D, fmt, kv in ((512, 0, "*bf16"), (512, 1, "*i8"), (512, 2, "*u8"), (256, 0, "*bf16")):
        cfg = A.with_knobs(A.decode_config(D, fmt), D, fmt)
        const = dict(cfg.kwargs, G=8 if D == 512 else 2, D=D, KV_FMT=fmt, SPLIT=True, FP32=False, INTERPRET=False,
                     SHARE_UNIT=cfg.kwargs["BLOCK_N"], SHARES_SLOWEST=int(A.DECODE_SHARES_SLOWEST))
        report(f"attn_body-{D}-{fmt}", A._attn_body, {**att, "K": kv, "V": kv}, const, cfg.num_warps, cfg.num_stages)
    report("combine-512", A._combine, {"MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "O": "*bf16", "soh": "i32",
                                       "NUM_SPLITS": "i32", "POS": "*i64", "WINDOW": "i32"},
           dict(G=8, D=512, SPLITS_P2=128, CHUNK=64, BLOCK_D=64, EAGER=1, ACTIVE=1, SHARE_UNIT=32, SKIP=1), 4)
    # the combine writing the o projection's x levels (the 31B's sliding layer: 16 shares, a group of 128)
    report("combine-xq", A._combine, {"MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "O": "*bf16", "soh": "i32",
                                      "NUM_SPLITS": "i32", "POS": "*i64", "WINDOW": "i32", "xq_ptr": "*i32",
                                      "xf_ptr": "*fp32", "xc_ptr": "*i32", "cnt_ptr": "*i32", "NCNT": "i32"},
           dict(G=2, D=256, SPLITS_P2=16, CHUNK=16, BLOCK_D=128, EAGER=1, ACTIVE=0, SHARE_UNIT=32, SKIP=0, XQ=1,
                LEVELS=2, XGROUP=128, ROT=0, LOG2D=8), 4)
    # and the full layer's over an int4 cache, its output rotated back first (a whole head of 512 a program)
    report("combine-xq-rot", A._combine, {"MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "O": "*bf16", "soh": "i32",
                                          "NUM_SPLITS": "i32", "POS": "*i64", "WINDOW": "i32", "xq_ptr": "*i32",
                                          "xf_ptr": "*fp32", "xc_ptr": "*i32", "cnt_ptr": "*i32", "NCNT": "i32",
                                          "rscale": "fp32"},
           dict(G=8, D=512, SPLITS_P2=128, CHUNK=8, BLOCK_D=512, EAGER=1, ACTIVE=1, SHARE_UNIT=64, SKIP=1, XQ=1,
                LEVELS=2, XGROUP=128, ROT=1, LOG2D=9), 4)
    report("hadamard-512", Hd._hadamard_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "n_rows": "i32", "scale": "fp32"},
           dict(D=512, LOG2D=9, BLOCK_R=Hd.block_rows(512)), 4)
    cfg = im.gemv1_plan(5376, 8192, 128).cfg
    report("gemv1", im._int4_gemv1_kernel,
           {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32"},
           dict(GROUP=128, RED=2, XQ=True, ASM=True, LEVELS=1, **cfg.kwargs), cfg.num_warps)
    cfg = im.gemv1_plan(12288, 1536, 128).cfg  # E2B's gate / up in two slices writing the down GEMV's levels
    report("gemv1-gluq", im._int4_gemv1_kernel,
           {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "HALF": "i32", "GOFF": "i32",
            "lq_ptr": "*i32", "lf_ptr": "*fp32", "lc_ptr": "*i32", "dcnt_ptr": "*i32", "DNCNT": "i32"},
           dict(GROUP=128, RED=2, XQ=True, ASM=True, LEVELS=2, GLUQ=1, DGROUP=128, DLEVELS=2, **cfg.kwargs),
           cfg.num_warps)
    cfg = im.gemv1_plan(1536, 256, 128).cfg  # a small weight (the per-layer projection): bf16 x, the activation
    report("gemv1-glu", im._int4_gemv1_kernel,
           {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32"},
           dict(GROUP=128, RED=0, XQ=False, ASM=True, LEVELS=2, GLU=1, **cfg.kwargs), cfg.num_warps)
    report("gemv1-norm", im._int4_gemv1_kernel,  # bf16 x with the input norm (E2B's q / k / v)
           {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "eps": "fp32"},
           dict(GROUP=128, RED=0, XQ=False, ASM=True, LEVELS=2, GLU=0, NORM=1, NORM_STEPS=im.norm_steps(768),
                **cfg.kwargs), cfg.num_warps)
    # the layer's closing add in the last GEMV (CLOSE): the 31B's down projection (x as levels, eight slices summed
    # in-kernel), E2B's per-layer projection (bf16 x, the table's row as up); E2B's per-layer gate zeroing the
    # projection's counter (ZC, with its residual add)
    close = {"COFF": "i32", "ch_ptr": "*bf16", "cw_ptr": "*bf16", "cs_ptr": "*bf16", "co_ptr": "*bf16", "ceps": "fp32"}
    cfg = im.gemv1_plan(5376, 21504, 128).cfg
    report("gemv1-close", im._int4_gemv1_kernel,
           {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", **close},
           dict(GROUP=128, RED=2, XQ=True, ASM=True, LEVELS=2, CLOSE=1, CSTEPS=im.norm_steps(5376), **cfg.kwargs),
           cfg.num_warps)
    cfg = im.gemv1_plan(1536, 256, 128).cfg
    report("gemv1-glu-close", im._int4_gemv1_kernel,
           {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "ui_ptr": "*i64", **close},
           dict(GROUP=128, RED=0, XQ=False, ASM=True, LEVELS=2, GLU=1, UI=1, EARLY=1, CLOSE=1,
                CSTEPS=im.norm_steps(1536), **cfg.kwargs), cfg.num_warps)
    cfg = im.gemv1_plan(256, 1536, 128).cfg
    report("gemv1-res-zc", im._int4_gemv1_kernel,
           {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
            "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32", "SPLITS": "i32",
            "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "eps": "fp32", "r_ptr": "*bf16",
            "wr_ptr": "*bf16", "h_ptr": "*bf16", "zc_ptr": "*i32"},
           dict(GROUP=128, RED=0, XQ=False, ASM=True, LEVELS=2, RES=1, EARLY=1, ZC=1, NORM_STEPS=im.norm_steps(768),
                **cfg.kwargs), cfg.num_warps)
    quant = {"x_ptr": "*bf16", "u_ptr": "*bf16", "xq_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32",
             "cnt_ptr": "*i32", "NG": "i32", "NCNT": "i32"}
    report("quant_x", im._quant_x_kernel, quant, dict(GROUP=128, GB=im.QUANT_X_GROUPS, LEVELS=1, GLU=1), 4)
    # the input norm and the quantize (NORM): a layer's q / k / v
    report("quant_x-norm", im._quant_x_kernel, {**quant, "eps": "fp32"},
           dict(GROUP=128, GB=im.QUANT_X_GROUPS, LEVELS=2, GLU=0, NORM=1, RES=0, NORM_STEPS=im.norm_steps(5376)), 4)
    # the residual add, the two norms before the MLP and the quantize (RES): h written after the wait too
    report("quant_x-res", im._quant_x_kernel,
           {**quant, "eps": "fp32", "r_ptr": "*bf16", "wr_ptr": "*bf16", "h_ptr": "*bf16"},
           dict(GROUP=32, GB=im.QUANT_X_GROUPS, LEVELS=2, GLU=0, NORM=1, RES=1, NORM_STEPS=im.norm_steps(5376)), 4)
    # the MoE decode's kernels at 26B-A4B width (H 2816, I 704, 128 experts, top 8)
    cfg = mo.ROUTE_CONFIGS[0]
    report("moe_route", mo._route_logits_kernel,
           {"x_ptr": "*bf16", "scale_ptr": "*bf16", "w_ptr": "*bf16", "part_ptr": "*fp32", "ss_ptr": "*fp32", "N": "i32",
            "H": "i32", "E": "i32", "H_SLICE": "i32", "stride_xn": "i32", "stride_wn": "i32"}, cfg.kwargs, cfg.num_warps)
    report("moe_topk", mo._route_topk_kernel,
           {"part_ptr": "*fp32", "ss_ptr": "*fp32", "pes_ptr": "*bf16", "w_out_ptr": "*fp32", "idx_out_ptr": "*i64",
            "N": "i32", "E": "i32", "SPLITS": "i32", "eps": "fp32", "inv_h": "fp32", "inv_sqrt_h": "fp32"},
           dict(TOP_K=8, BLOCK_E=128, K_P2=8), 1)
    moe_strides = {"stride_qe": "i32", "stride_qn": "i32", "stride_se": "i32", "stride_sn": "i32"}
    cfg = mo.WORDS_GATE_UP_CONFIGS[0]
    report("moe_gate_up", mo._gemv_words_gate_up_kernel,
           {"x_ptr": "*bf16", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16", "act_ptr": "*fp32", "I": "i32",
            "ACT_STRIDE": "i32", **moe_strides},
           dict(NGROUPS=22, GROUP=128, DOWN_GROUP=64, X_BF16=True, ASM=True, **cfg.kwargs), cfg.num_warps)
    cfg = mo.WORDS_DOWN_CONFIGS[0]
    report("moe_down", mo._gemv_words_down_kernel,
           {"act_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16", "out_ptr": "*fp32",
            "N_OUT": "i32", "ACT_STRIDE": "i32", "C_PER_SPLIT": "i32", **moe_strides, "stride_os": "i32"},
           dict(TOP_K=8, NGROUPS=11, GROUP=64, ASM=True, **cfg.kwargs), cfg.num_warps)
    cfg = mo.WORDS_DOWN_CONFIGS[0]  # with the MoE layer's closing add (CLOSE) and its counter's zeroing (ZC)
    report("moe_down_close", mo._gemv_words_down_kernel,
           {"act_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16", "out_ptr": "*bf16",
            "N_OUT": "i32", "ACT_STRIDE": "i32", "C_PER_SPLIT": "i32", **moe_strides, "stride_os": "i32",
            "ccnt_ptr": "*i32", "ym_ptr": "*bf16", "ch_ptr": "*bf16", "w1_ptr": "*bf16", "w2_ptr": "*bf16",
            "wc_ptr": "*bf16", "cs_ptr": "*bf16", "co_ptr": "*bf16", "ceps": "fp32"},
           dict(TOP_K=8, NGROUPS=11, GROUP=64, ASM=True, XTILE=1, CLOSE=1, CSTEPS=3, **cfg.kwargs), cfg.num_warps)
    cfg = mo.WORDS_GATE_UP_CONFIGS[0]
    report("moe_gate_up_zc", mo._gemv_words_gate_up_kernel,
           {"x_ptr": "*bf16", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16", "act_ptr": "*fp32", "I": "i32",
            "ACT_STRIDE": "i32", **moe_strides, "zc_ptr": "*i32"},
           dict(NGROUPS=22, GROUP=128, DOWN_GROUP=64, X_BF16=True, ASM=True, ZC=1, **cfg.kwargs), cfg.num_warps)
    bn, gr, warps = mo.GATE_UP_Q_CONFIG
    report("moe_gate_up_q", mo._gemv_q_gate_up_kernel,
           {"xq_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16",
            "act_ptr": "*fp32", "I": "i32", "KW": "i32", "ACT_STRIDE": "i32", **moe_strides},
           dict(GROUP=128, DOWN_GROUP=64, BLOCK_N=bn, GROUPS=gr, ASM=True), warps)
    report("moe_sum_slices", mo._sum_slices_kernel, {"part_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32"},
           dict(SLICES=2, BLOCK=1024), 4)

    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    x = torch.empty(16, 512, dtype=torch.bfloat16)
    args = dict(x_ptr=x, y_ptr=torch.empty_like(x), n_rows=16, scale=512 ** -0.5, D=512, LOG2D=9,
                BLOCK_R=Hd.block_rows(512), PDL=2)
    print("hadamard-written", sorted(identify_mutated_tensors(Hd._hadamard_kernel, args, {})))
""")


def test_waiting_kernels_keep_their_memory_instructions():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if " waits " in ln}
    assert set(rows) == {"attn_body-512-0", "attn_body-512-1", "attn_body-512-2", "attn_body-256-0", "combine-512",
                         "combine-xq", "combine-xq-rot", "hadamard-512", "gemv1", "gemv1-gluq", "gemv1-glu",
                         "gemv1-norm", "gemv1-close", "gemv1-glu-close", "gemv1-res-zc", "quant_x", "quant_x-norm",
                         "quant_x-res", "moe_route", "moe_topk", "moe_gate_up", "moe_down", "moe_down_close",
                         "moe_gate_up_zc", "moe_gate_up_q", "moe_sum_slices"}, r.stdout
    for name, ln in rows.items():
        # mode 2 holds the wait and the trigger (the GEMV twice: before x and before its writes), mode 0 neither
        assert int(ln[2]) >= 1 and int(ln[4]) >= 1 and ln[6] == "0", ln
        assert ln[8] == "True", " ".join(ln)  # the same loads and stores, as wide as without the wait
        assert ln[10] == "0", " ".join(ln)  # no fp64 arithmetic from a float argument typed as AOTInductor types it
    assert "hadamard-written ['y_ptr']" in r.stdout, r.stdout
