"""`gemma4::attention_int4_linear` (export/kernels/attention_linear.py): attention into its int4 o_proj, with the
decode combine writing the GEMV's x as int8 levels. The Triton path against the two ops' kernels one after the
other (the interpreter, CPU: bit for bit), the op's CPU kernel against the references, where the fusion applies,
what torch's mutation analysis reads of the combine, the model's decode graph, and on CUDA the op against the two
ops at the 31B's sliding layer."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from export.kernels import attention as A
from export.kernels import attention_linear as AL
from export.kernels import int4_matmul as im
from tests.helpers import run_code
from tests.test_attention import filled_cache


_INTERPRETED = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import attention as A
    from export.kernels import hadamard as Hd
    from export.kernels import int4_matmul as im
    from tests.test_attention import decode_cases
    A.use_configs(A.smallest).__enter__()
    gen = torch.Generator().manual_seed(5)
    A.decode_splits = lambda *a: 3
    # fp32 q (the interpreter's bf16 casts are wrong for negative values); a flat cache and a wrapped ring
    with torch._library.triton.set_wrap_triton_enabled(False):
        # each setting with both caches, a different KV format on each (the six (cache, format) pairs all run):
        # the interpreter takes seconds a case
        for i, (G, levels, rot) in enumerate(((32, 2, False), (64, 1, False), (64, 2, False), (32, 2, True),
                                              (64, 1, True))):
            for j, (q, args, p, window, kv, want) in enumerate(decode_cases([(8, 2, 64, 300, 0, 290),
                                                                             (4, 1, 64, 24, 24, 70)], gen)):
                if (j // 3 + i) % 3 != j % 3:
                    continue
                K = q.shape[2] * q.shape[3]
                cnt_a = torch.full((10,), 7, dtype=torch.int32)
                cnt_b = cnt_a.clone()
                fused = A.launch(q, *args, p, window, True, levels=(G, cnt_a, 6, levels, rot))
                out = A.launch(q, *args, p, window, True)
                if rot:  # the output rotated back (a quantized cache holds V rotated)
                    out = Hd.launch(out)
                    want = Hd.hadamard_reference(want)
                first = im._quant_x(out.reshape(1, K), G, cnt_b, 6, levels=levels)
                same = all(torch.equal(a, b) for a, b in zip(fused, first)) and torch.equal(cnt_a, cnt_b)
                qweight, scales = im.quantize_int4(torch.randn(40, K), G)
                kern = im._gemv1_kernel(im.GEMV1_CONFIGS[2])
                quantize = lambda cnt, ncnt: A.launch(q, *args, p, window, True, levels=(G, cnt, ncnt, levels, rot))
                y = im.int4_gemv1(q.reshape(1, K), qweight, scales, 2, kernel=kern, xq=True, levels=levels,
                                  quantize=quantize)
                y_first = im.int4_gemv1(out.reshape(1, K), qweight, scales, 2, kernel=kern, xq=True, levels=levels)
                err = (out - want).abs().max().item()
                print("case", G, levels, int(rot), kv, same, torch.equal(y, y_first), int(cnt_a[:6].abs().sum()),
                      int(cnt_a[6:].sum()), err)
""")


def test_combine_writes_the_levels_the_quantize_kernel_would_in_the_interpreter():
    """The decode combine with XQ writes bit for bit the planes, factors and corrections the quantize kernel
    writes from the combine's output (with ROT from the Hadamard kernel's rotation of it), zeroes the GEMV's
    counters (and no more of them), and the GEMV on them gives the unfused ops' output bit for bit: groups of
    32 and 64 within D = 64, one and two levels, every KV format, a flat cache and a wrapped ring (Triton
    interpreter)."""
    rows = [ln.split()[1:] for ln in run_code(_INTERPRETED).splitlines() if ln.startswith("case")]
    assert len(rows) == 5 * 2 and {r[3] for r in rows} == {"float", "int8", "int4"}, rows
    for G, levels, rot, kv, same, y_same, zeroed, kept, err in rows:
        assert same == "True" and y_same == "True", (G, levels, kv)
        assert zeroed == "0" and kept == str(7 * 4), (G, levels, kv, zeroed, kept)
        assert float(err) <= 2e-5, (G, levels, kv, err)


def _case(H=8, Hkv=2, D=64, S=48, pos=40, N=24, G=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k, v = filled_cache(Hkv, S, D, pos + 1, False, gen)
    q = torch.randn(1, 1, H, D, generator=gen).to(dtype)
    qweight, scales = im.quantize_int4(torch.randn(N, H * D, generator=gen), G)
    return q, k.to(dtype), v.to(dtype), torch.tensor([pos]), qweight, scales


def test_cpu_kernel_is_attention_then_int4_linear():
    """On CPU the op is the attention reference (rotated back with rotate), its output's heads joined, then the
    int4 linear's reference; a weight that q's heads do not feed is refused with both shapes named."""
    from export.kernels.hadamard import hadamard_reference

    q, k, v, pos, qweight, scales = _case()
    y = torch.ops.gemma4.attention_int4_linear(q, k, v, None, None, pos, 0, qweight, scales)
    out = A.attention_reference(q, k, v, None, None, pos, 0)
    want = im.int4_linear_reference(out.reshape(1, 1, -1), qweight, scales)
    assert y.shape == (1, 1, 24) and torch.equal(y, want)
    y = torch.ops.gemma4.attention_int4_linear(q, k, v, None, None, pos, 0, qweight, scales, True)
    assert torch.equal(y, im.int4_linear_reference(hadamard_reference(out).reshape(1, 1, -1), qweight, scales))
    with pytest.raises(ValueError, match=r"attention_int4_linear: q \(1, 1, 8, 64\)"):
        torch.ops.gemma4.attention_int4_linear(q, k, v, None, None, pos, 0, qweight[:, :128], scales[:, :8])


@pytest.mark.parametrize("shape,kv,fused,fused_unfitted", [
    ((32, 16, 256, 1024, 5376), "float", True, True),  # 31B sliding layer (ring of the window): 16 shares a KV head
    ((32, 4, 512, 131072, 5376), "float", True, True),  # 31B full layer, bf16 cache
    ((16, 8, 256, 1024, 2816), "float", False, True),  # 26B-A4B sliding layer: o_proj 2816 x 4096
    ((8, 1, 256, 1024, 1536), "float", False, False),  # E2B sliding: o_proj's K of 2048 takes bf16 x (no levels)
    ((8, 1, 512, 131072, 1536), "float", False, True),  # E2B full: o_proj 1536 x 4096
])
def test_where_the_combine_writes_the_levels(shape, kv, fused, fused_unfitted, monkeypatch):
    """The fusion applies where the o_proj's M == 1 plan takes x as int8 levels and decode has a combine: with the
    fitted staged tiles (the default) the small models' o_proj up to K 6144 takes one bf16-x launch instead; without
    them (GEMV1_STEP_FIT off) K 4096 took levels."""
    H, Hkv, D, S, N = shape
    with torch.device("meta"):
        q = torch.empty(1, 1, H, D, dtype=torch.bfloat16)
        k = torch.empty(1, Hkv, S, D, dtype=torch.bfloat16)
        qweight = torch.empty(N, H * D // 2, dtype=torch.uint8)
        scales = torch.empty(N, H * D // 128, dtype=torch.bfloat16)
    for fit, want in ((True, fused), (False, fused_unfitted)):
        monkeypatch.setattr(im, "GEMV1_STEP_FIT", fit)
        assert AL.fused_at_decode(q, k, None, qweight, scales) == want
        assert not AL.fused_at_decode(q.float(), k, None, qweight, scales)  # the M == 1 kernels take bf16 x


_MUTATION = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors
    from export.kernels import attention as A

    class Target:  # TTIR needs a target only, no GPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Target())
    H, G, D, NS = 32, 2, 256, 16
    for pdl in (0, 2):
        for xq, rot in ((0, 0), (1, 0), (1, 1)):
            f = lambda *s, dtype=torch.float32: torch.empty(*s, dtype=dtype)
            args = dict(MP=f(H * NS), LP=f(H * NS), AP=f(H * NS * D), O=f(1, 1, H, D, dtype=torch.bfloat16), soh=D,
                        NUM_SPLITS=NS, G=G, D=D, SPLITS_P2=NS, CHUNK=NS, BLOCK_D=D if rot else 128, EAGER=1, PDL=pdl,
                        PART16=0, POS=f(1, dtype=torch.int64), WINDOW=1024, ACTIVE=0, SHARE_UNIT=32, SKIP=0, XQ=xq,
                        xq_ptr=f(4 * H * D // 8, dtype=torch.int32), xf_ptr=f(H * D // 128),
                        xc_ptr=f(H * D // 128, dtype=torch.int32), cnt_ptr=f(1344, dtype=torch.int32), NCNT=1344,
                        LEVELS=2, XGROUP=128, ROT=rot, rscale=D ** -0.5, LOG2D=8)
            print("combine", pdl, xq, " ".join(sorted(identify_mutated_tensors(A._combine, args, {}))))
""")


def test_combine_writes_only_its_outputs():
    """torch's mutation analysis (TTIR, no GPU) reads the combine as writing the output alone, or with XQ (and
    ROT) the levels and the counters alone: never its partials (a read taken as a write would clone them)."""
    rows = [ln.split()[1:] for ln in run_code(_MUTATION, timeout=300).splitlines() if ln.startswith("combine")]
    assert len(rows) == 6, rows
    for pdl, xq, *written in rows:
        assert written == (["cnt_ptr", "xc_ptr", "xf_ptr", "xq_ptr"] if xq == "1" else ["O"]), (pdl, xq, written)


@pytest.mark.cuda
@torch.no_grad()
def test_op_matches_attention_then_int4_linear_on_cuda():
    """At the 31B's sliding layer (32 heads over 16 KV heads of 256, a ring of 1024 in the model dtype, o_proj
    5376 x 8192) and its full layer at small and large fills (4 KV heads of 512; bf16, and the 24 GB recipe's
    int4 cache with the output rotated back), bf16 q: the op's decode (the combine writing the levels, the GEMV) gives
    `gemma4::attention` (then `gemma4::hadamard`) then `gemma4::int4_linear` bit for bit."""
    from export.kernels.hadamard import hadamard_rotate

    gen = torch.Generator(device="cuda").manual_seed(3)
    for H, Hkv, D, S, window, kv, fills in ((32, 16, 256, 1024, 1024, "float", (5, 700, 3000)),
                                            (32, 4, 512, 8192, 0, "float", (40, 5000)),
                                            (32, 4, 512, 8192, 0, "int4", (40, 5000))):
        qweight, scales = im.quantize_int4(torch.randn(5376, H * D, device="cuda", generator=gen), 128)
        k = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).bfloat16()
        v = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).bfloat16()
        cache = (k, v, None, None)
        if kv != "float":
            (kq, ks), (vq, vs) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
            cache = (kq, vq, ks, vs)
        rotate = kv != "float"
        for fill in fills:
            q = torch.randn(1, 1, H, D, device="cuda", generator=gen).bfloat16()
            pos = torch.tensor([fill], device="cuda")
            assert AL.fused_at_decode(q, cache[0], cache[2], qweight, scales, rotate)
            y = torch.ops.gemma4.attention_int4_linear(q, *cache, pos, window, qweight, scales, rotate)
            out = torch.ops.gemma4.attention(q, *cache, pos, window)
            if rotate:
                out = hadamard_rotate(out)
            want = torch.ops.gemma4.int4_linear(out.reshape(1, 1, -1), qweight, scales)
            assert torch.equal(y, want), (H, Hkv, D, kv, fill, (y.float() - want.float()).abs().max().item())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
@pytest.mark.parametrize("D,block_d,rot,warps", [(256, 128, 0, 4), (512, 512, 1, A.COMBINE_ROT_WARPS)])
def test_level_writing_combine_compiles_without_spills(D, block_d, rot, warps):
    """The combine writing the levels, compiled for sm_90 as the op launches it (no GPU, its pointers aligned): the
    31B's sliding layer (a group a program) and its full layer rotating a whole head of 512 back
    (COMBINE_ROT_WARPS) keep every value in registers."""
    from tests.helpers import sass_sm90

    sig = {"MP": "*fp32", "LP": "*fp32", "AP": "*fp32", "O": "*bf16", "soh": "i32", "NUM_SPLITS": "i32",
           "POS": "*i64", "WINDOW": "i32", "xq_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "cnt_ptr": "*i32",
           "NCNT": "i32", "rscale": "fp32"}
    p2 = 128 if D == 512 else 16
    const = dict(G=8 if D == 512 else 2, D=D, SPLITS_P2=p2, CHUNK=min(p2, 4096 // block_d), BLOCK_D=block_d,
                 EAGER=1, ACTIVE=1, SHARE_UNIT=32, SKIP=1, XQ=1, LEVELS=2, XGROUP=128, ROT=rot,
                 LOG2D=D.bit_length() - 1, PDL=2, PART16=0)
    _, _, res = sass_sm90(A._combine, sig, const, warps, whole=True)
    assert "STACK:0 " in res and "LOCAL:0" in res, res
