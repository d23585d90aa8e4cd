"""gemma4::int4_ple, the per-layer-input block of E2B / E4B as one op: CPU reference, the Triton kernel
(interpreter on CPU, compiled offline for the consumer cards, real on CUDA)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from export.kernels import int4_matmul as im
from export.kernels import ple

REPO = Path(__file__).resolve().parent.parent


def _inputs(H, P, G, L=5, device="cpu", seed=0):
    """Random bf16 inputs of the block: x, r (the MLP's output), norm weights away from 1, a table of L
    layers' rows, a scalar away from 1, and int4 gate [P, H] / projection [H, P] weights."""
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    qg, sg = im.quantize_int4(torch.randn(P, H, generator=g), G)
    qp, sp = im.quantize_int4(torch.randn(H, P, generator=g), min(G, P))
    t = dict(x=torch.randn(1, 1, H, generator=g) * 3, r=torch.randn(1, 1, H, generator=g) * 7,
             weight_r=torch.rand(H, generator=g) + 0.5, table=torch.randn(1, 1, L, P, generator=g),
             weight_p=torch.rand(H, generator=g) + 0.5, scalar=torch.rand(1, generator=g) + 0.5)
    t = {k: v.to(bf).to(device) for k, v in t.items()}
    return dict(t, eps=1e-6, index=torch.tensor([L - 2], device=device), qweight_g=qg.to(device),
                scales_g=sg.to(device), qweight_p=qp.to(device), scales_p=sp.to(device))


ARGS = ("x", "r", "weight_r", "eps", "table", "index", "qweight_g", "scales_g", "qweight_p", "scales_p", "weight_p",
        "scalar")


def _call(fn, a):
    return fn(*(a[k] for k in ARGS))


def _fp64(a):
    """The block in fp64 on the dequantized weights (no bf16 rounding between the steps)."""
    d = lambda t: t.double()
    h = d(a["x"]) + im.rms_norm_reference(d(a["r"]), d(a["weight_r"]), a["eps"])
    gate = h @ im.dequantize_int4(a["qweight_g"], a["scales_g"], torch.float64).t()
    up = d(a["table"]).index_select(-2, a["index"]).squeeze(-2)
    p = (torch.nn.functional.gelu(gate, approximate="tanh") * up) @ im.dequantize_int4(
        a["qweight_p"], a["scales_p"], torch.float64).t()
    return (h + im.rms_norm_reference(p, d(a["weight_p"]), a["eps"])) * d(a["scalar"])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cpu_op_is_the_reference_within_bf16_of_fp64_and_checks_shapes():
    a = _inputs(256, 64, 32)
    y = _call(torch.ops.gemma4.int4_ple, a)
    assert y.shape == (1, 1, 256) and y.dtype == torch.bfloat16
    assert torch.equal(y, _call(ple.int4_ple_reference, a))
    assert _rel(y, _fp64(a)) <= 1e-2
    bad = dict(a, weight_p=a["weight_p"][:128])
    with pytest.raises(ValueError, match="int4_ple: weight_p"):
        _call(torch.ops.gemma4.int4_ple, bad)
    bad = dict(a, qweight_p=a["qweight_p"][:, :16], scales_p=a["scales_p"][:, :1])
    with pytest.raises(ValueError, match="int4_ple: projection"):
        _call(torch.ops.gemma4.int4_ple, bad)
    with pytest.raises(ValueError, match="int4_ple: table"):
        _call(torch.ops.gemma4.int4_ple, dict(a, table=a["table"][..., :32]))


def test_plan_spreads_the_gate_over_the_programs():
    for H, P in ((1536, 256), (2560, 256), (64, 8)):
        for interpret in (False, True):
            pl = ple.ple_plan(H, P, 128 if H > 64 else 32, interpret=interpret)
            assert pl.np * pl.block_n >= H and pl.np * pl.rb >= P
            assert pl.np == 1 if interpret else pl.block_n == 32


_INTERPRETED = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import ple
    from tests.test_ple import ARGS, _call, _fp64, _inputs, _rel

    with torch._library.triton.set_wrap_triton_enabled(False):
        for H, P, G in ((256, 64, 32), (1536, 256, 128), (2560, 256, 32)):
            a = _inputs(H, P, G, seed=H)
            y = _call(ple.int4_ple_m1, a)
            ref = _call(ple.int4_ple_reference, a)
            f64 = _fp64(a)
            print(H, P, G, _rel(y, ref), _rel(y, f64), _rel(ref, f64), bool(torch.isfinite(y).all()))
""")


def test_kernel_in_the_interpreter_is_the_block_within_bf16_roundings():
    """`_ple_kernel` (one program in the interpreter: the gate, the activation from the table's row, the
    projection, the norm, the add and the scalar) against the op's reference (the model's ops one by one)
    and fp64: as close to fp64 as the reference is, within 5e-3 of it (the activation rounded once, as the
    int4 op's GLU path rounds it, where aten rounds gelu and the product)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(rows) == 3, r.stdout
    for _, _, _, vs_ref, vs_f64, ref_f64, finite in rows:
        assert finite == "True" and float(vs_ref) <= 5e-3 and float(vs_f64) <= 1.1 * float(ref_f64), r.stdout


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from export.cubins import kernel_resources
from export.kernels import ple
from export.kernels.int4_matmul import norm_steps

fn = ple._ple_kernel
ptrs = dict(x_ptr="*bf16", r_ptr="*bf16", wr_ptr="*bf16", t_ptr="*bf16", idx_ptr="*i64", wg_ptr="*u8", sg_ptr="*bf16",
            wp_ptr="*u8", sp_ptr="*bf16", wn_ptr="*bf16", sc_ptr="*bf16", a_ptr="*bf16", p_ptr="*bf16",
            cnt_ptr="*i32", y_ptr="*bf16", eps="fp32")
for arch in map(int, sys.argv[1:]):
    for H, P, G in ((1536, 256, 128), (2560, 256, 32)):
        pl = ple.ple_plan(H, P, G, interpret=False)
        consts = dict(H=H, P=P, GG=G, GP=min(G, P), NP=pl.np, BLOCK_N=pl.block_n, RB=pl.rb, CG=pl.cg,
                      NSTEPS=norm_steps(H // 2), ASM=True, PDL=2 if arch >= 90 else 0)
        sig = {n: ptrs[n] for n in fn.arg_names if n not in consts}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": pl.num_warps, "num_stages": 1})
        res = kernel_resources(k.asm["cubin"])[0]
        print(arch, H, k.metadata.shared, res["stack"], res["local"])
"""


def test_kernel_compiles_for_consumer_cards_without_a_stack():
    """Compiled by Triton + ptxas for sm_89, sm_90 (its PDL wait) and sm_120 with no GPU present: shared
    memory within the consumer cards' 101376 bytes, no stack or local memory (a stack over the context's
    1024 B would cost device memory outside the allocator, export/cubins.py)."""
    from export.cubins import cuobjdump
    if cuobjdump() is None:
        pytest.skip("no cuobjdump in this Triton install")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _COMPILE, "89", "90", "120"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(rows) == 6, r.stdout
    assert all(int(shared) <= im.SMEM_LIMIT_BYTES and stack == "0" and local == "0"
               for _, _, shared, stack, local in rows), r.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("H,G", [(1536, 128), (2560, 128), (1536, 32)])
def test_cuda_op_is_the_block_and_replays_bitwise_in_a_graph(H, G):
    """On the GPU the op runs `_ple_kernel` with its programs waiting for each other (E2B / E4B widths):
    within 5e-3 of the reference and as close to fp64, on fresh random inputs; 64 replays of a CUDA graph
    of it, with new inputs copied in, each bitwise the eager call (the counter starts at zero each call,
    the last program's sum in a fixed order)."""
    a = _inputs(H, 256, G, device="cuda", seed=H + G)
    y = _call(torch.ops.gemma4.int4_ple, a)
    ref = _call(ple.int4_ple_reference, a)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, ref) <= 5e-3 and _rel(y, _fp64(a)) <= 1.1 * _rel(ref, _fp64(a))
    static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _call(torch.ops.gemma4.int4_ple, static)
    for i in range(64):
        fresh = _inputs(H, 256, G, device="cuda", seed=i)
        for k in ("x", "r", "table"):
            static[k].copy_(fresh[k])
        g.replay()
        want = _call(torch.ops.gemma4.int4_ple, static)
        assert torch.equal(out, want), i
