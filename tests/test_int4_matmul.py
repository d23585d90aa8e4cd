"""gemma4::int4_linear: layout, CPU reference, Triton kernels (interpreter on CPU, real on CUDA)."""

import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from export.host_tma import host_tma_descriptors
from export.kernels import int4_matmul as im
from runtime.aoti import promote_libtorch


def _fp32_ref(x, qweight, scales):
    return x.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_pack_roundtrip_and_nibble_order():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = im.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(im.unpack_int4(packed), q)
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)  # even k: low nibble


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_error_within_half_a_step(group):
    w = torch.randn(64, 512)
    qweight, scales = im.quantize_int4(w, group)
    assert scales.shape == (64, 512 // group) and scales.dtype == torch.bfloat16
    err = (im.dequantize_int4(qweight, scales, torch.float32) - w).abs().reshape(64, -1, group)
    step = scales.float().unsqueeze(-1)
    # max|w| = 7.5 steps, so -8..7 covers it; the bf16 scale's rounding adds up to 7.5 x 2^-8 of a step
    assert (err <= 0.53 * step).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_is_the_reference_and_matches_fp32(dtype):
    w = torch.randn(40, 256)
    qweight, scales = im.quantize_int4(w, 32)
    x = torch.randn(2, 3, 256).to(dtype)
    y = torch.ops.gemma4.int4_linear(x, qweight, scales)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert torch.equal(y, im.int4_linear_reference(x, qweight, scales))
    assert _rel(y, _fp32_ref(x, qweight, scales)) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_fake_shape_and_shape_check():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y = torch.ops.gemma4.int4_linear(torch.empty(7, 256, dtype=torch.bfloat16),
                                         torch.empty(48, 128, dtype=torch.uint8),
                                         torch.empty(48, 2, dtype=torch.bfloat16))
    assert y.shape == (7, 48)
    with pytest.raises(ValueError, match="do not agree"):
        torch.ops.gemma4.int4_linear(torch.zeros(1, 100), torch.zeros(4, 64, dtype=torch.uint8),
                                     torch.zeros(4, 4, dtype=torch.bfloat16))


def test_every_config_fits_consumer_shared_memory():
    for cfg in im.GEMV1_CONFIGS + im.GEMV_CONFIGS + im.GEMM_CONFIGS:
        assert im.config_smem_bytes(cfg, group_size=32) <= im.SMEM_LIMIT_BYTES, cfg
    assert im.active_configs(im.GEMM_CONFIGS, consumer_only=True)  # the forced set is not empty
    assert all(c.consumer for c in im.active_configs(im.GEMM_CONFIGS, consumer_only=True))


@pytest.mark.parametrize("n,k,group", [(5376, 21504, 128), (262144, 5376, 128), (2816, 704, 32), (2816, 704, 128),
                                        (40, 256, 32)])
def test_layout_bytes_equal_planner_bytes(n, k, group):
    """The planner counts the buffers of the module the recipe builds (on the meta device):
    they are the kernel's layout, byte for byte."""
    from export.gemma4.quant import PackedInt4Linear

    with torch.device("meta"):
        mod = PackedInt4Linear.from_float(torch.empty(n, k, dtype=torch.bfloat16), group)  # the .ptd's buffers
    g = im.group_size_for(k, group)
    assert mod.qweight.nbytes + mod.scales.nbytes == im.int4_bytes(n, k, g)


def test_31b_linears_and_lm_head_fit_the_byte_budget_at_g128():
    from export.gemma4.config import PRESETS
    from scripts.bench_int4 import linear_shapes
    shapes = linear_shapes(PRESETS["31b"])
    total = lambda g: sum(im.int4_bytes(n, k, im.group_size_for(k, g)) * c for (n, k), (_, c) in shapes.items())
    assert total(128) <= 15.0 * 2**30 < total(32)  # g128: 14.74 GiB; g32: 16.08 GiB


def test_m1_path_passes_the_pdl_attribute_only_when_asked(monkeypatch):
    """The op launches its M == 1 kernels without the PDL attribute (the artifact's launcher sets it);
    `_gemv1(..., pdl_attr=True)` (bench_int4's `pdl_us`) hands it to whichever kernel the plan takes."""
    seen = []
    monkeypatch.setattr(im, "int4_gemv1", lambda *a, **kw: seen.append(("reg", kw["pdl_attr"])))
    monkeypatch.setattr(im, "int4_gemv1_tma", lambda *a, **kw: seen.append(("tma", kw["pdl_attr"])))
    monkeypatch.setattr(im, "tma_ok", lambda device: True)
    for n, k in ((1536, 2048), (5376, 8192)):  # a small weight (register kernel), a 31B mid-size one (TMA)
        q, s = im.quantize_int4(torch.randn(n, k), 128)
        x = torch.randn(1, k).bfloat16()
        im._gemv1(x, q, s)
        im._gemv1(x, q, s, pdl_attr=True)
    tma = "tma" if im.GEMV1_TMA else "reg"
    assert seen == [("reg", False), ("reg", True), (tma, False), (tma, True)], seen


def test_step_fit_takes_masked_groups_off_the_staged_small_tiles(monkeypatch):
    """GEMV1_STEP_FIT (the default; off is an A/B switch): E2B's q / k / v (12 groups a row) in three steps of 4
    rather than two of 8 (the second half masked), 4 warps; 20 or 22 groups in three steps of 8; ties (32 groups)
    to 8 groups a step; 16 rows from 6144. Off, or x not staged, or 2-row tiles: half the row's groups a step."""
    cfg = lambda n, k, g=128: (lambda c: (c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps))(
        im.gemv1_step_config(n, k, g))
    shapes = ((2560, 1536), (2048, 1536), (1536, 2048), (256, 1536), (2560, 256))
    on = {nk: cfg(*nk) for nk in shapes}
    assert on[2560, 1536] == on[2048, 1536] == (8, 4, 4)
    assert on[1536, 2048] == (4, 8, 8) and on[2560, 256] == (8, 2, 4) and on[256, 1536] == (2, 8, 8)
    assert cfg(3072, 2560) == (8, 8, 8) and cfg(8192, 2816) == (16, 8, 4) and cfg(1536, 4096) == (4, 8, 8)
    assert cfg(1536, 6144) == (4, 16, 8) and cfg(2816, 2112, 64) == (8, 16, 8) and cfg(8960, 1536) == (16, 4, 4)
    # x from the residual add or the activation (every program computes it over the row): 16 rows from 2048, 8 warps
    # from 128 words a row-step; under 2048 rows as with plain x
    mlp = lambda n, k, g=128, pro="res": (lambda c: (c.kwargs["BLOCK_N"], c.kwargs["GROUPS"], c.num_warps))(
        im.gemv1_step_config(n, k, g, pro))
    assert mlp(4224, 2816) == (16, 8, 8) and mlp(2816, 2112, 64, "glu") == (16, 16, 8)
    assert mlp(12288, 1536) == (16, 4, 4)
    assert mlp(1536, 2048, 128, "glu") == on[1536, 2048] and mlp(8192, 2816, 128, "norm") == (16, 8, 4)
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    assert mlp(4224, 2816) == cfg(4224, 2816) == (8, 8, 8)
    monkeypatch.setattr(im, "GEMV1_STEP_FIT", False)
    off = {nk: cfg(*nk) for nk in shapes}
    assert off[2560, 1536] == (8, 8, 8) and off[1536, 2048] == (4, 8, 8)
    assert all(on[nk] == off[nk] for nk in ((1536, 2048), (256, 1536), (2560, 256))), on
    monkeypatch.setattr(im, "GEMV1_STEP_FIT", True)
    monkeypatch.setattr(im, "GEMV1_STAGE", False)
    assert all(cfg(*nk) == off[nk] for nk in shapes)


def test_staged_tiles_take_mid_k_weights_in_one_launch(monkeypatch):
    """With the staged, fitted tiles, weights of K up to GEMV1_STAGED_MAX_K and 1024 to GEMV1_STAGED_MAX_N rows (the
    small models' mid-size projections) whose x is plain or a norm run as one bf16-x launch; with the residual add
    or the activation computed into x (a dense MLP's gate / up and down), K up to GEMV1_STAGED_MLP_MAX_K and up to
    GEMV1_STAGED_MLP_MAX_N rows. More rows or K, fewer than 1024 rows, or the switches off: the pool's two launches
    (x as levels). K up to 2048 takes one launch whatever the prologue."""
    inside = ((1536, 6144), (8192, 2816), (2816, 4096), (4224, 2816), (2048, 2560))
    outside = ((9216, 2816), (2816, 8192), (10752, 2560), (1000, 4608), (5376, 21504), (16384, 5376))
    for pro in ("plain", "norm"):
        assert not any(im.gemv1_plan(n, k, 128, pro).xq for n, k in inside)
        assert all(im.gemv1_plan(n, k, 128, pro).xq == im.GEMV1_XQ for n, k in outside)
    # E2B's gate / up, the 26B-A4B's gate / up and down, and shapes no model has with these prologues
    mlp_inside = ((12288, 1536), (4224, 2816), (2816, 2112), (8192, 2816), (2048, 2560), (9216, 2816), (10752, 2560))
    mlp_outside = ((1536, 6144), (2816, 4096), (20480, 2560), (2560, 10240), (12800, 1536), (43008, 5376))
    for pro in ("res", "glu"):
        assert not any(im.gemv1_plan(n, k, 128, pro).xq for n, k in mlp_inside)
        assert all(im.gemv1_plan(n, k, 128, pro).xq == im.GEMV1_XQ for n, k in mlp_outside
                   + tuple(nk for nk in outside if nk not in mlp_inside))
        assert not im.gemv1_plan(2560, 1536, 128, pro).xq
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", False)
    for pro in ("res", "glu"):
        assert all(im.gemv1_plan(n, k, 128, pro).xq == im.GEMV1_XQ for n, k in mlp_inside if k > 2048 or n > 9216)
    monkeypatch.setattr(im, "GEMV1_STAGED_MLP", True)
    assert im.prologue_of() == "plain" and im.prologue_of(norm=1) == "norm"
    assert im.prologue_of(norm=1, res=1) == "res" and im.prologue_of(up=1) == "glu"
    with pytest.raises(AssertionError):
        im.gemv1_plan(2560, 1536, 128, "gelu")
    monkeypatch.setattr(im, "GEMV1_STEP_FIT", False)
    assert all(im.gemv1_plan(n, k, 128).xq == im.GEMV1_XQ for n, k in inside)


def test_gemv1_plan_takes_pool_configs_and_whole_groups():
    for n, k in [(2048, 8192), (4096, 6400), (5376, 8192), (5376, 21504), (16384, 5376), (21504, 5376),
                 (262144, 5376), (1000, 4608), (12288, 1536), (100000, 256)]:
        g = im.group_size_for(k, 128)
        cfg, splits, xq, levels = im.gemv1_plan(n, k, g)
        assert any(cfg is c for c in im.GEMV1_CONFIGS) and 1 <= splits <= min(16, k // g) and xq == im.GEMV1_XQ
        assert im.gemv1_splits(n, k, g) == splits
        # one level only where the per-lane loop runs (the tile sums take two)
        lane = cfg.kwargs["PARTS"] == 1 or cfg.kwargs["DEPTH"] == 0
        assert levels == (im.GEMV1_LEVELS if lane else 2)
    xq, one = im.GEMV1_XQ, im.GEMV1_LEVELS
    assert im.gemv1_plan(2048, 8192, 128) == (im.GEMV1_CONFIGS[1], 1, xq, 2)  # K parts, no second kernel
    assert im.gemv1_plan(262144, 5376, 128) == (im.GEMV1_CONFIGS[0], 1, xq, one)  # 128-row tiles, one slice
    # 42 row blocks of 128 x 8 slices; from 8192 rows 64-row tiles x 2 slices
    assert im.gemv1_plan(5376, 21504, 128) == (im.GEMV1_CONFIGS[0], 8, xq, one)
    assert im.gemv1_plan(16384, 5376, 128) == (im.GEMV1_CONFIGS[2], 2, xq, one)
    # where the one-launch tiles lost on the H200 (scripts/measurements/gemv1_small_variants.json)
    assert im.gemv1_plan(12288, 1536, 128) == (im.GEMV1_CONFIGS[2], 2, xq, one)
    assert im.gemv1_plan(10752, 2560, 128) == (im.GEMV1_CONFIGS[2], 2, xq, one)  # and the staged ones too (H100)


def _step_label(plan):
    kw = plan.cfg.kwargs
    return f"{'q' if plan.xq else 'b'}{kw['BLOCK_N']}r{kw['GROUPS']}g{plan.cfg.num_warps}w/{kw['PARTS']}/{plan.splits}"


@pytest.mark.parametrize("n,k,label", [
    (2560, 2048, "b8r8g8w"), (1536, 2048, "b4r8g8w"), (2560, 1536, "b8r8g8w"), (2048, 1536, "b8r8g8w"),
    (5120, 1536, "b8r8g8w"), (8960, 1536, "b8r8g8w"), (256, 2560, "b2r16g8w"), (256, 1536, "b2r8g8w"),
    (2560, 256, "b8r2g4w"), (1536, 256, "b4r2g4w"), (2816, 704, "b8r8g8w")])
def test_gemv1_plan_runs_small_weights_in_one_bf16_launch(n, k, label, monkeypatch):
    """The small models' small weights with the step of half the row's groups (GEMV1_STEP_FIT off): bf16 x (no
    quantize launch), one slice, a step of half or all of the row's groups: the H200 sweep's best tile (x once a
    row of threads) or within 0.1 us of it."""
    monkeypatch.setattr(im, "GEMV1_STEP_FIT", False)
    g = im.group_size_for(k, 128)
    plan = im.gemv1_plan(n, k, g)
    assert _step_label(plan) == f"{label}/1/1"
    steps = -(-(k // g) // plan.cfg.kwargs["GROUPS"])
    assert 1 <= steps <= 2
    words = plan.cfg.kwargs["BLOCK_N"] * plan.cfg.kwargs["GROUPS"] * (g // 8) / (32 * plan.cfg.num_warps)
    assert 1 <= words <= 64  # a step's words a thread
    assert im.config_smem_bytes(plan.cfg, g) <= im.SMEM_LIMIT_BYTES


@pytest.mark.parametrize("n,k,label", [
    (2560, 1536, "b8r4g4w"), (5120, 1536, "b8r4g4w"), (8960, 1536, "b16r4g4w"), (1536, 6144, "b4r16g8w"),
    (8192, 2816, "b16r8g4w"), (2816, 4096, "b8r8g8w"), (6144, 2560, "b16r8g4w"), (2048, 2560, "b8r8g8w"),
    (2560, 4096, "b8r8g8w"), (1536, 4096, "b4r8g8w")])
def test_gemv1_plan_takes_the_staged_sweeps_tiles(n, k, label):
    """With the staged, fitted tiles (the default): the H100 sweep's best tile (x once a program,
    gemv1_small_stage_h100.json) or within 0.2 us of it (1536 x 4096: 5.24 against 5.07), one launch, one slice."""
    g = im.group_size_for(k, 128)
    assert _step_label(im.gemv1_plan(n, k, g)) == f"{label}/1/1"


@pytest.mark.parametrize("fit", [False, True])
def test_gemv1_step_config_is_sane_for_any_small_shape(fit, monkeypatch):
    """Every shape of the small branch, tiny ones too, x plain or the residual add: power-of-two tiles, K in one or
    two steps (up to four with the staged, fitted tiles, whose K reaches GEMV1_STAGED_MAX_K, or
    GEMV1_STAGED_MLP_MAX_K with the add), at most 64 words a thread, no more warps than the tile has words for
    (down to one), and the fp32 scratch within the card's shared memory."""
    monkeypatch.setattr(im, "GEMV1_STEP_FIT", fit)
    staged_region = {"plain": (im.GEMV1_STAGED_MAX_K, im.GEMV1_STAGED_MAX_N),
                     "res": (im.GEMV1_STAGED_MLP_MAX_K, im.GEMV1_STAGED_MLP_MAX_N)}
    for n, k, group, pro in itertools.product((1, 7, 40, 512, 1024, 2048, 6144, 8192, 9216, 12288),
                                              (32, 64, 96, 704, 1536, 2048, 2112, 2816, 4096, 5376, 6144),
                                              (32, 64, 128), ("plain", "res")):
        g = im.group_size_for(k, group)
        plan = im.gemv1_plan(n, k, g, pro)
        max_k, max_n = staged_region[pro]
        staged = fit and 1024 <= n <= max_n and k <= max_k
        if (k > im.GEMV1_STEP_MAX_K or n > im.GEMV1_STEP_MAX_N) and not staged:
            if n > im.GEMV1_THIN_N:
                assert plan.xq == im.GEMV1_XQ, (n, k, g, pro)
            continue
        assert plan.splits == 1 and not plan.xq, (n, k, g, pro)
        bn, groups, warps = plan.cfg.kwargs["BLOCK_N"], plan.cfg.kwargs["GROUPS"], plan.cfg.num_warps
        steps = -(-(k // g) // groups)
        assert bn & (bn - 1) == 0 and groups & (groups - 1) == 0 and 1 <= steps <= (4 if fit else 2)
        tile = bn * groups * (g // 8)
        assert tile <= 64 * 32 * warps and (warps == 1 or tile >= 32 * warps), (n, k, g, pro)
        assert im.config_smem_bytes(plan.cfg, g) <= im.SMEM_LIMIT_BYTES


def test_group_size_for_k_not_a_multiple():
    assert im.group_size_for(5376, 128) == 128
    assert im.group_size_for(704, 128) == 64  # 26B-A4B expert down_proj
    with pytest.raises(ValueError):
        im.group_size_for(100, 128)


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im
    im.GEMV1_CONFIGS[:] = [im._cfg1(16, 1, 4)]
    im.GEMV_CONFIGS[:] = [im._cfg(16, 16, 64, 4, 1)]
    im.GEMM_CONFIGS[:] = [im._cfg(16, 32, 64, 4, 1)]
    torch.manual_seed(0)
    worst = 0.0
    # fp32 activations: the interpreter's bf16 casts are wrong for negative values (M == 1 in
    # fp32 takes the padded-dot GEMV)
    for M, N, K, G in [(1, 48, 2048, 32), (1, 40, 512, 128), (3, 40, 384, 128), (20, 72, 256, 32), (5, 33, 512, 64)]:
        qweight, scales = im.quantize_int4(torch.randn(N, K), G)
        x = torch.randn(M, K)
        y = im.int4_linear._init_fn(x, qweight, scales)  # the Triton path, on CPU tensors
        ref = x @ im.dequantize_int4(qweight, scales, torch.float32).t()
        worst = max(worst, ((y - ref).norm() / ref.norm()).item())
    # the M == 1 kernel reads bf16 x (as bit patterns: no casts) into fp32 partials (2+ slices)
    # or a bf16 output (one slice)
    worst_bf16 = 0.0
    with torch._library.triton.set_wrap_triton_enabled(False):
        # (BLOCK_N, GROUPS, warps, K parts, tiles loaded ahead); the split reduction: 0 partials
        # + sum kernel, 2 the last program of a row block sums them
        for N, K, G, splits, cfg, red in [(48, 2048, 32, 1, (16, 2, 4), 0), (72, 1536, 128, 2, (32, 2, 4), 0),
                                          (33, 1024, 64, 3, (16, 4, 1), 0), (40, 2304, 128, 3, (8, 1, 4, 4, 2), 2),
                                          (72, 1536, 128, 1, (16, 1, 4, 4, 3), 0), (33, 2560, 128, 4, (32, 1, 1, 1, 2), 2),
                                          (40, 1280, 128, 1, (8, 1, 8, 8, 2), 0)]:
            im.GEMV1_CONFIGS[:] = [im._cfg1(*cfg)]
            im._KERNELS.clear()
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            x = torch.randn(1, K).bfloat16()
            y = im.int4_gemv1(x, qweight, scales, splits, red=red).float()
            ref = x.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()
            worst_bf16 = max(worst_bf16, ((y - ref).norm() / ref.norm()).item())
        # x as two int8 levels (quantize kernel + dp4a tiles), fp32 x here (the interpreter's bf16
        # casts): within max|x| / 64516 per element, so ~1e-5 of the output; a zero group of x too
        worst_xq = 0.0
        for N, K, G, splits, cfg, red in [(40, 1024, 128, 1, (8, 1, 4, 2, 1), 0), (40, 2304, 128, 3, (8, 1, 4, 4, 2), 2),
                                          (33, 768, 128, 2, (32, 1, 1, 1, 2), 0), (24, 512, 32, 1, (8, 2, 4), 0)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            x = torch.randn(1, K)
            x[0, G:2 * G] = 0
            kern = im._autotuned([im._cfg1(*cfg)], im._int4_gemv1_kernel)
            y = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, red=red, xq=True)
            ref = x @ im.dequantize_int4(qweight, scales, torch.float32).t()
            worst_xq = max(worst_xq, ((y - ref).norm() / ref.norm()).item())
        print("xq", worst_xq)
        # the split summed in-kernel (red 2) gives `_sum_splits_kernel`'s bits: the same partials
        # added in the same order; ragged N, slices of unequal length, each form of x
        same = True
        for N, K, G, splits, cfg in [(40, 2304, 128, 3, (8, 1, 4, 4, 2)), (33, 2560, 128, 4, (32, 1, 1, 1, 2))]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            kern = im._autotuned([im._cfg1(*cfg)], im._int4_gemv1_kernel)
            for xq, x in ((True, torch.randn(1, K)), (False, torch.randn(1, K).bfloat16())):
                ys = [im.int4_gemv1(x, qweight, scales, splits, kernel=kern, red=red, xq=xq) for red in (0, 2)]
                same = same and torch.equal(ys[0], ys[1])
        print("same", same)
        # the op's M == 1 plan: K parts unsplit (few rows), then the split tile (rows over the limit);
        # these shapes are small weights, taken by the pool's plan here with the one-launch tile off.
        # x takes the plan's levels (one, where the per-lane loop runs: within max|x| / 254 per 32)
        im.GEMV1_CONFIGS[:] = [im._cfg1(32, 1, 1), im._cfg1(8, 1, 8, parts=8, depth=2), im._cfg1(32, 1, 2, depth=2)]
        im.GEMV1_STEP_MAX_K = im.GEMV1_THIN_N = 0
        worst_op = 0.0
        for N, K, G, small in [(40, 2560, 32, 4096), (33, 704, 64, 8), (72, 1536, 128, 8)]:
            im.GEMV1_SMALL_N = small
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            x = torch.randn(1, K).bfloat16()
            y = im.int4_linear._init_fn(x, qweight, scales).float()
            ref = x.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()
            worst_op = max(worst_op, ((y - ref).norm() / ref.norm()).item())
        print("op_plan", worst_op)
        # the tensor-core small-M kernel's fragment bookkeeping (its mmas emulated): ragged N,
        # K slices and K parts of unequal length, M = 1 (x broadcast) and M > 1 (x per lane)
        worst_mma = 0.0
        for M, N, K, splits, block_n, parts in [(1, 40, 512, 1, 16, 1), (3, 72, 768, 2, 32, 1), (8, 16, 256, 3, 8, 1),
                                                (1, 24, 1280, 1, 8, 2), (2, 40, 1792, 2, 16, 2)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x = torch.randn(M, K).bfloat16()
            y = im.int4_gemv_mma(x, qweight, scales, splits, block_n, 1, parts).float()
            ref = x.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()
            worst_mma = max(worst_mma, ((y - ref).norm() / ref.norm()).item())
        print("mma", worst_mma)
        qweight, scales = im.quantize_int4(torch.randn(33, 768), 32)
        w = im.int4_dequant(qweight, scales, torch.bfloat16, block_n=16, block_w=16).float()
        ref = im.dequantize_int4(qweight, scales, torch.bfloat16).float()
        assert torch.allclose(w, ref, rtol=2 ** -7, atol=0)  # the interpreter's bf16 cast: 1 ulp off
    print("bf16", worst_bf16)
    print("worst", worst)
""")


def test_triton_kernels_through_the_interpreter():
    """GEMV (M == 1 and padded dot, split-K) and GEMM paths on tiny shapes: ~110 s on an idle core (the timeout
    is a hang guard: 300 s ran out on a two-core machine shared with other work)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("worst")[-1]) < 1e-5
    assert float(r.stdout.split("bf16")[-1].split()[0]) < 5e-3  # bf16 output rounding
    assert float(r.stdout.split("op_plan")[-1].split()[0]) <= 1e-2  # the op's plan, x as its levels
    assert float(r.stdout.split("mma")[-1].split()[0]) < 5e-3
    assert float(r.stdout.split("xq")[-1].split()[0]) < 1e-4  # x's two int8 levels
    assert r.stdout.split("same")[-1].split()[0] == "True"  # red 2 gives red 0's bits


def _script_rows(script: str, *tags: str, timeout: int = 600) -> list[list[str]] | tuple[list[list[str]], ...]:
    """Run `script` in a fresh interpreter (the repo on its path) and return, per tag, the fields after it
    of each line the script prints starting with it (one list for one tag); a failing run fails the test
    with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = tuple([ln.split()[1:] for ln in r.stdout.splitlines() if ln.split()[:1] == [tag]] for tag in tags)
    return rows[0] if len(tags) == 1 else rows


_STEP_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    def no_quantize(*args, **kwargs):
        raise AssertionError("a small weight's GEMV quantized x (a second launch)")

    im._quant_x = no_quantize
    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # 8, 4 and 2 rows (N ragged to the tile), K in one step or two (the second part empty:
        # 11 or 20 groups in steps of 8 or 16), 1 to 8 warps' tiles; bf16 x read as bit patterns
        for N, K, G in [(2052, 256, 128), (1030, 704, 64), (37, 2560, 128), (40, 96, 32), (7, 64, 32)]:
            plan = im.gemv1_plan(N, K, G)
            assert not plan.xq and plan.splits == 1, plan
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            x = (torch.randn(1, K) * 3).bfloat16()
            x[0, :G] = 0
            y = im.int4_linear._init_fn(x, qweight, scales)
            ref = x.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            print("step", N, K, G, plan.cfg.kwargs["BLOCK_N"], plan.cfg.kwargs["GROUPS"], y.dtype, err)
            # the first tiles loaded before the PDL wait (EARLY; the interpreter has no wait): the same sums
            early = im.int4_gemv1(x, qweight, scales, 1, kernel=im._gemv1_kernel(plan.cfg), xq=False, pdl_gemv=2,
                                  pdl_attr=False, early=True)
            print("early", N, K, torch.equal(early, y))
""")


def test_small_weights_one_launch_through_the_interpreter():
    """The op's M == 1 path on small weights (`gemv1_step_config`, bf16 x, one launch: the quantize
    kernel is made to fail) matches an fp32 matmul on the dequantized weight, ~1 min on 2 cores."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _STEP_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("step")]
    assert len(lines) == 5, r.stdout
    early = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("early")]
    assert len(early) == 5 and all(ln[3] == "True" for ln in early), early  # bitwise the op's
    assert {int(ln[4]) for ln in lines} == {2, 4, 8}  # every row count of the tile
    for ln in lines:
        assert ln[6] == "torch.bfloat16" and float(ln[7]) <= 1e-2, ln


_ONE_LEVEL_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # the per-lane loop at the plan's 128- and 64-row tiles, one slice and three (summed in-kernel),
        # ragged N; x with an all-zero group, and with an outlier channel (a factor per 32 elements
        # confines its coarse step to them)
        for N, K, splits, cfg, outlier in [(200, 1024, 1, im.GEMV1_CONFIGS[0], 0), (72, 1536, 3, im.GEMV1_CONFIGS[2], 0),
                                           (200, 1024, 1, im.GEMV1_CONFIGS[0], 1)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x = torch.randn(1, K) * 3
            x[0, :128] = 0
            x[0, 300] *= 1 + 40 * outlier
            w = im.dequantize_int4(qweight, scales, torch.float64)
            g = x.double().view(-1, 32)
            f = g.abs().amax(-1, keepdim=True) / 127
            h = torch.where(f > 0, torch.floor(g / torch.where(f > 0, f, 1) + 0.5), 0)
            exact = (h * f).view(1, K) @ w.t()  # x as one int8 level per 32 elements, in fp64
            ref = x.double() @ w.t()
            for levels in (1, 2):
                y = im.int4_gemv1(x, qweight, scales, splits, kernel=im._gemv1_kernel(cfg), xq=True, levels=levels)
                e_fp = ((y.double() - ref).norm() / ref.norm()).item()
                e_one = ((y.double() - exact).norm() / exact.norm()).item()
                print("levels", levels, N, K, splits, outlier, e_fp, e_one)
""")


def test_one_level_x_through_the_interpreter():
    """x as one int8 level per 32 elements (`_quant_x_kernel` and the per-lane loop at LEVELS 1:
    two dp4a a word) gives exactly the matmul with x rounded to its level (fp32 sums), within 1e-2
    of fp32, an outlier channel included; two levels stay closer to fp32 than one."""
    rows = _script_rows(_ONE_LEVEL_SCRIPT, "levels")
    assert len(rows) == 6, rows
    got = {(int(lv), int(n), int(o)): (float(e_fp), float(e_one)) for lv, n, k, sp, o, e_fp, e_one in rows}
    for case in ((200, 0), (72, 0), (200, 1)):
        assert got[(1, *case)][1] <= 1e-5  # the one-level matmul, exactly
        assert got[(2, *case)][0] < got[(1, *case)][0]  # two levels: closer to fp32
    assert got[(1, 200, 0)][0] <= 1e-2 and got[(1, 72, 0)][0] <= 1e-2  # Gaussian x: the op's bar
    # a channel 41x the others: 1.3e-2 here, where a factor per 128 elements gives 2.5e-2 (the same x, in fp64)
    assert got[(1, 200, 1)][0] <= 2e-2


_TMA_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    def register_kernel(*args, **kwargs):
        raise AssertionError("a mid-size weight took the register kernel")

    # tiny mid-size weights, so that the op's TMA path runs on shapes the interpreter takes in seconds: more
    # than GEMV1_SMALL_N rows (and GEMV1_THIN_N), ~GEMV1_TMA_PROGRAMS programs
    im.GEMV1_SMALL_N, im.GEMV1_THIN_N, im.GEMV1_TMA_PROGRAMS, im.GEMV1_TMA_MIN_K = 64, 16, 8, 0
    im.GEMV1_TMA = True  # the switch (on by default; GEMMA4_GEMV1_TMA=0 in the environment turns it off)
    im.int4_gemv1 = register_kernel
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # 20 groups in 2 slices of 10 (a step of 4 past each slice's end), 24 in 3 slices of 8, 18 in one slice
        # of 5 steps (the last past K) with rows past N (200 rows in blocks of 32)
        for N, K in ((100, 2560), (72, 3072), (200, 2304)):
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            w = im.dequantize_int4(qweight, scales, torch.float64)
            x = (torch.randn(1, K) * 3).bfloat16()
            x[0, :128] = 0
            y = im.int4_linear._init_fn(x, qweight, scales)
            print("tma", N, K, im.gemv1_tma_splits(N, K, 128), rel(y, x.double() @ w.t()))
            # the norm computed by the quantize kernel before it (`int4_rms_linear` at M == 1)
            nw = torch.rand(K).bfloat16() + 0.5
            y = im._gemv1(x, qweight, scales, norm=(nw, 1e-6))
            print("tma-norm", N, K, rel(y, im.rms_norm_reference(x, nw, 1e-6).double() @ w.t()))
        # GEMV1_TMA_SMALL: K under GEMV1_TMA_MIN_K at GEMV1_TMA_SMALL_TILE, one slice (20 groups in 10 steps, rows
        # past N), plain and with the residual add and both norms (`int4_add_rms_linear`, E4B's gate / up)
        im.GEMV1_TMA_MIN_K, im.GEMV1_TMA_SMALL = 4096, True
        for N, K in ((100, 2560),):
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            w = im.dequantize_int4(qweight, scales, torch.float64)
            x, r = (torch.randn(1, K) * 3).bfloat16(), (torch.randn(1, K) * 5).bfloat16()
            wr, nw = torch.rand(K).bfloat16() + 0.5, torch.rand(K).bfloat16() + 0.5
            tile, splits = im.gemv1_tma_tile(N, K, 128, "res")
            y = im.int4_linear._init_fn(x, qweight, scales)
            h, y_res = im._add_rms_linear(x, r, wr, nw, 1e-6, qweight, scales)
            want_h = x + im.rms_norm_reference(r, wr, 1e-6)
            print("tma-small", N, K, "x".join(map(str, tile)), splits, rel(y, x.double() @ w.t()),
                  rel(y_res, im.rms_norm_reference(want_h, nw, 1e-6).double() @ w.t()), rel(h, want_h))
        # GEMV1_TMA_DEEP: a small weight deep in K (40 rows, 25 groups) with the activation, at
        # GEMV1_TMA_SMALL_TILE in slices of 3 steps (4 slices of 7 groups, the last 4; rows past N; the programs'
        # target set low, so that the steps decide)
        im.GEMV1_TMA_DEEP, im.GEMV1_TMA_DEEP_STEPS, im.GEMV1_TMA_DEEP_PROGRAMS = True, 3, 1
        for N, K in ((40, 3200),):
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            w = im.dequantize_int4(qweight, scales, torch.float64)
            gate, up = (torch.randn(1, K) * 2).bfloat16(), (torch.randn(1, K) * 2).bfloat16()
            tile, splits = im.gemv1_tma_tile(N, K, 128, "glu")
            y = im._gemv1(gate, qweight, scales, up=up)
            print("tma-deep", N, K, "x".join(map(str, tile)), splits,
                  rel(y, im.glu_reference(gate, up).double() @ w.t()))
""")


def test_tma_gemv_through_the_interpreter():
    """With GEMV1_TMA on, mid-size weights take `_int4_gemv1_tma_kernel` (the register kernel made to fail):
    ragged slices and rows, the norm's quantize kernel before it, within 1e-2 of fp64 (the int4 weight
    dequantized)."""
    rows, norm, small, deep = _script_rows(_TMA_SCRIPT, "tma", "tma-norm", "tma-small", "tma-deep")
    assert len(rows) == 3 and len(norm) == 3, (rows, norm)
    assert [int(r[2]) for r in rows] == [2, 3, 1]
    assert all(float(r[3]) <= 1e-2 for r in rows) and all(float(r[2]) <= 1e-2 for r in norm), (rows, norm)
    # GEMV1_TMA_SMALL's tile on K under GEMV1_TMA_MIN_K, plain and with the residual add and both norms
    assert [r[:4] for r in small] == [["100", "2560", "32x2x3x4", "1"]], small
    # (h: the quantize kernel's add, within the interpreter's truncating bf16 casts of torch's)
    assert float(small[0][4]) <= 1e-2 and float(small[0][5]) <= 1e-2 and float(small[0][6]) <= 4e-3, small
    # GEMV1_TMA_DEEP's slices of a small weight, x the activation of gate and up
    assert [r[:4] for r in deep] == [["40", "3200", "32x2x3x4", "4"]] and float(deep[0][4]) <= 1e-2, deep


def test_tma_gemv_serves_the_mid_size_weights_on_levels(monkeypatch):
    """The TMA-fed GEMV's shapes: the 31B's mid-size weights (q / k / v, o, down: K from 5376), not its gate / up or
    lm_head (the register kernel's one-slice programs), nor small weights; without GEMV1_TMA_SMALL not the small
    models' mid-size weights (K 1536-2816) either. With it (on by default) the small models' mid-size weights on x
    levels take GEMV1_TMA_SMALL_TILE in one slice: E4B's gate / up and per-layer projection, the 26B-A4B's full
    q / k, not E2B's gate / up (a staged tile) nor E2B's or E4B's down (1536 / 2560 rows: GEMV1_TMA_DEEP's, off
    here)."""
    monkeypatch.setattr(im, "GEMV1_TMA_DEEP", False)
    for n, k in ((16384, 5376), (18432, 5376), (5376, 8192), (5376, 16384), (5376, 21504)):
        assert im.gemv1_tma_splits(n, k, 128) >= 1, (n, k)
        assert im.gemv1_tma_tile(n, k, 128) == (im.GEMV1_TMA_TILE, im.gemv1_tma_splits(n, k, 128))
    small = {(20480, 2560): "res", (10752, 2560): "plain", (9216, 2816): "norm"}
    assert im.GEMV1_TMA_SMALL
    monkeypatch.setattr(im, "GEMV1_TMA_SMALL", False)
    for n, k in ((43008, 5376), (262144, 5376), (12288, 1536), *small, (2048, 1536), (4096, 8192)):
        assert im.gemv1_tma_splits(n, k, 128) == 0, (n, k)
        assert im.gemv1_tma_tile(n, k, 128, small.get((n, k), "plain")) is None, (n, k)
    monkeypatch.setattr(im, "GEMV1_TMA_SMALL", True)
    for (n, k), pro in small.items():
        assert im.gemv1_tma_tile(n, k, 128, pro) == (im.GEMV1_TMA_SMALL_TILE, 1), (n, k)
    for n, k, pro in ((12288, 1536, "res"), (1536, 6144, "glu"), (2560, 10240, "glu"), (43008, 5376, "res"),
                      (262144, 5376, "plain"), (8192, 2816, "norm")):
        assert im.gemv1_tma_tile(n, k, 128, pro) is None or k >= im.GEMV1_TMA_MIN_K, (n, k)
        assert im.gemv1_tma_splits(n, k, 128) == 0, (n, k)
        assert im.gemv1_tma_tile(n, k, 128, pro) is None, (n, k)


def test_tma_gemv_serves_small_weights_deep_in_k(monkeypatch):
    """GEMV1_TMA_DEEP (on by default): small weights on x levels with K from GEMV1_TMA_DEEP_RATIO times their rows
    (E2B's down and double-wide down, E4B's down) take GEMV1_TMA_SMALL_TILE in K slices (~GEMV1_TMA_DEEP_PROGRAMS
    programs or more, at most GEMV1_TMA_DEEP_STEPS steps each: the counts measured best or near it in the MLP's
    layer graph); the 26B-A4B's full o and the staged or bf16-x small weights do not, nor any with the switch off."""
    deep = {(1536, 12288, "glu"): 6, (1536, 6144, "glu"): 5, (2560, 10240, "glu"): 5}
    others = ((2816, 8192, "plain"), (256, 1536, "plain"), (512, 4096, "plain"), (1536, 2048, "norm"))
    assert im.GEMV1_TMA_DEEP
    for (n, k, pro), slices in deep.items():
        assert im.gemv1_tma_tile(n, k, 128, pro) == (im.GEMV1_TMA_SMALL_TILE, slices), (n, k)
    for n, k, pro in others:
        assert im.gemv1_tma_tile(n, k, 128, pro) is None, (n, k)
    assert im.gemv1_tma_tile(1536, 12288, 32, "glu") is None  # group 32: the TMA kernel takes group 128 only
    monkeypatch.setattr(im, "GEMV1_TMA_DEEP", False)
    for n, k, pro in deep:
        assert im.gemv1_tma_tile(n, k, 128, pro) is None, (n, k)


def test_tma_gemv_compiles_to_tma_copies_within_the_consumer_shared_memory():
    """sm_90: the tiles come as cp.async.bulk.tensor copies, the first step's issued before the PDL wait (weights
    while the kernel before finishes); sm_89 (no TMA) compiles too; both within the consumer shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = im._int4_gemv1_tma_kernel
    names = list(fn.arg_names)
    bn, step, stages, warps = im.GEMV1_TMA_TILE
    copy = min(step, 2)  # groups a copy: 128 bytes of a row
    sig = {"x_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", "w_desc": f"tensordesc<i32[{bn}, {copy * 16}]>",
           "s_ptr": "*bf16", "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32",
           "GPS": "i32", "SPLITS": "i32", "stride_sn": "i32", "stride_ps": "i32"}
    full = {a: sig.get(a, "constexpr") for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in full.items() if t.startswith("*")}
    for arch in (90, 89):
        const = dict(GROUP=128, BLOCK_N=bn, GROUPS=step, STAGES=stages, ASM=True, PDL=2 if arch >= 90 else 0,
                     LEVELS=im.GEMV1_LEVELS)
        k = triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        ptx = k.asm["ptx"]
        assert k.metadata.shared <= im.SMEM_LIMIT_BYTES
        if arch == 89:
            assert "cp.async.bulk.tensor" not in ptx and "griddepcontrol" not in ptx
            continue
        first_wait = ptx.find("griddepcontrol.wait")
        assert first_wait > 0 and ptx[:first_wait].count("cp.async.bulk.tensor") == step // copy  # first step's copies


_GLU_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # fp32 gate / up for the quantize kernel (the interpreter's bf16 casts are wrong for negative values):
        # its activation against the same GEMV fed the activation computed first, one slice and three; and
        # the bf16-x plan (no quantize kernel: the GEMV computes the activation as it reads x, as bit patterns)
        for N, K, splits, cfg, xq in [(200, 1024, 1, im.GEMV1_CONFIGS[0], True), (72, 1536, 3, im.GEMV1_CONFIGS[2], True),
                                      (40, 512, 1, im._cfg1(8, 2, 4), False)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            gate, up = torch.randn(1, K) * 2, torch.randn(1, K)
            if not xq:
                gate, up = gate.bfloat16(), up.bfloat16()
            # the activation in fp32, rounded once to x's dtype (as Inductor's fused kernel and ours leave it)
            act = (im.glu_reference(gate.float(), up.float())).to(gate.dtype)
            kern = im._gemv1_kernel(cfg)
            fused = im.int4_gemv1(gate, qweight, scales, splits, kernel=kern, xq=xq, levels=1 if xq else 2, up=up)
            first = im.int4_gemv1(act, qweight, scales, splits, kernel=kern, xq=xq, levels=1 if xq else 2)
            ref = act.double() @ im.dequantize_int4(qweight, scales, torch.float64).t()
            d = ((fused.double() - first.double()).norm() / first.double().norm()).item()
            e = ((fused.double() - ref).norm() / ref.norm()).item()
            print("glu", N, K, splits, xq, d, e)
        # the bf16-x GEMV reading up as row 3 of a table of 5 (E2B / E4B's per-layer inputs): the same bits as
        # the row passed alone
        N, K = 48, 256
        qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
        gate, table = (torch.randn(1, K) * 2).bfloat16(), torch.randn(5, K).bfloat16()
        kern = im._gemv1_kernel(im.gemv1_plan(N, K, 128).cfg)
        row = im.int4_gemv1(gate, qweight, scales, 1, kernel=kern, xq=False, up=table, up_index=torch.tensor([3]))
        alone = im.int4_gemv1(gate, qweight, scales, 1, kernel=kern, xq=False, up=table[3:4].clone())
        print("table", torch.equal(row, alone), torch.equal(row, im.int4_gemv1(gate, qweight, scales, 1, kernel=kern,
                                                                          xq=False, up=table[2:3].clone())))
""")


def test_glu_in_the_quantize_kernel_through_the_interpreter():
    """The down projection's activation computed by the quantize kernel as it reads x, or with bf16 x by
    the GEMV itself (`int4_gemv1`'s up, the op `int4_glu_linear` at M == 1), gives the GEMV of the
    activation computed first (to the rounding of its tanh, written with exp), within 1e-2 of fp64."""
    rows, table = _script_rows(_GLU_SCRIPT, "glu", "table")
    assert len(rows) == 3, rows
    for n, k, splits, xq, d, e in rows:
        # fp32 x (the quantize kernel's): the tanh's rounding alone; bf16 x: an activation rounded to the other
        # bf16 neighbour moves an output across a bf16 rounding boundary now and then (one ulp, 2^-8, of a few of
        # the 40 outputs: ~4e-4 of the norm with x computed once a program, 7.8e-4 once a row of threads, on draws
        # where it happens)
        assert float(d) <= (1e-4 if xq == "True" else 2e-3) and float(e) <= 1e-2, (n, k, splits, xq, d, e)
    assert table == [["True", "False"]]  # the table's row read in place: that row's bits, not its neighbour's


def test_glu_op_on_cpu_is_the_reference_and_checks_shapes():
    qweight, scales = im.quantize_int4(torch.randn(48, 256), 32)
    gate, up = torch.randn(2, 3, 256).bfloat16(), torch.randn(2, 3, 256).bfloat16()
    y = torch.ops.gemma4.int4_glu_linear(gate, up, qweight, scales)
    assert y.shape == (2, 3, 48)
    assert torch.equal(y, torch.ops.gemma4.int4_linear(im.glu_reference(gate, up), qweight, scales))
    with pytest.raises(ValueError, match="differ"):
        torch.ops.gemma4.int4_glu_linear(gate, up[..., :128], qweight, scales)
    # up as a table of rows [..., rows, K] and one index: the row's activation
    table = torch.randn(2, 3, 5, 256).bfloat16()
    y = torch.ops.gemma4.int4_glu_linear(gate, table, qweight, scales, torch.tensor([2]))
    assert torch.equal(y, torch.ops.gemma4.int4_glu_linear(gate, table[:, :, 2], qweight, scales))
    with pytest.raises(ValueError, match="no table of rows"):
        torch.ops.gemma4.int4_glu_linear(gate, table[:, :2], qweight, scales, torch.tensor([2]))


_NORM_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # fp32 x for the quantize kernel (the interpreter's bf16 casts), one level and two, one slice and
        # three; bf16 x and weight for the bf16-x plan (the GEMV computes the norm, as bit patterns)
        for N, K, splits, cfg, xq, levels in [(200, 1024, 1, im.GEMV1_CONFIGS[0], True, 1),
                                              (72, 1536, 3, im.GEMV1_CONFIGS[2], True, 2),
                                              (40, 512, 1, im._cfg1(8, 2, 4), False, 2),
                                              (24, 2560, 1, im._cfg1(4, 8, 4), False, 2)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x = torch.randn(1, K) * 3
            w = torch.rand(K) + 0.5
            if not xq:
                x, w = x.bfloat16(), w.bfloat16()
            normed = im.rms_norm_reference(x, w, 1e-6)
            kern = im._gemv1_kernel(cfg)
            fused = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=xq, levels=levels, norm=(w, 1e-6))
            first = im.int4_gemv1(normed, qweight, scales, splits, kernel=kern, xq=xq, levels=levels)
            ref = normed.double() @ im.dequantize_int4(qweight, scales, torch.float64).t()
            d = ((fused.double() - first.double()).norm() / first.double().norm()).item()
            e = ((fused.double() - ref).norm() / ref.norm()).item()
            print("norm", N, K, splits, xq, d, e)
        # the residual add and both norms before the MLP in the quantize kernel (fp32, as above): h and y
        for N, K, splits, cfg, levels in [(200, 1024, 1, im.GEMV1_CONFIGS[0], 1), (72, 1536, 3, im.GEMV1_CONFIGS[2], 2)]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x, r = torch.randn(1, K) * 3, torch.randn(1, K) * 7
            wr, w = torch.rand(K) + 0.5, torch.rand(K) + 0.5
            h_ref = x + im.rms_norm_reference(r, wr, 1e-6)
            h = torch.full_like(x, float("nan"))
            kern = im._gemv1_kernel(cfg)
            fused = im.int4_gemv1(x, qweight, scales, splits, kernel=kern, xq=True, levels=levels, norm=(w, 1e-6),
                                  res=(r, wr, h))
            normed = im.rms_norm_reference(h_ref, w, 1e-6)
            first = im.int4_gemv1(normed, qweight, scales, splits, kernel=kern, xq=True, levels=levels)
            ref = normed.double() @ im.dequantize_int4(qweight, scales, torch.float64).t()
            dh = ((h - h_ref).norm() / h_ref.norm()).item()
            d = ((fused.double() - first.double()).norm() / first.double().norm()).item()
            e = ((fused.double() - ref).norm() / ref.norm()).item()
            print("res", N, K, splits, dh, d, e)
        # bf16 x: the residual add alone, in the small weights' GEMV (the op `int4_add_linear` at M == 1)
        for N, K, cfg in [(40, 512, im._cfg1(8, 2, 4)), (24, 2560, im._cfg1(4, 8, 4))]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x, r = (torch.randn(1, K) * 3).bfloat16(), (torch.randn(1, K) * 7).bfloat16()
            wr = (torch.rand(K) + 0.5).bfloat16()
            h_ref = x + im.rms_norm_reference(r, wr, 1e-6)
            h = torch.full_like(x, float("nan"))
            kern = im._gemv1_kernel(cfg)
            fused = im.int4_gemv1(x, qweight, scales, 1, kernel=kern, xq=False, res=(r, wr, h, 1e-6))
            first = im.int4_gemv1(h_ref, qweight, scales, 1, kernel=kern, xq=False)
            ref = h_ref.double() @ im.dequantize_int4(qweight, scales, torch.float64).t()
            dh = ((h.double() - h_ref.double()).norm() / h_ref.double().norm()).item()
            d = ((fused.double() - first.double()).norm() / first.double().norm()).item()
            e = ((fused.double() - ref).norm() / ref.norm()).item()
            print("resb", N, K, dh, d, e)
        # bf16 x: the residual add and the norm after it, both in the small weights' GEMV (`int4_add_rms_linear`
        # at M == 1 on a small weight), with x computed once a row of threads and once a program (STAGE)
        for N, K, cfg in [(40, 512, im._cfg1(8, 2, 4)), (24, 2560, im._cfg1(4, 8, 4))]:
            qweight, scales = im.quantize_int4(torch.randn(N, K), 128)
            x, r = (torch.randn(1, K) * 3).bfloat16(), (torch.randn(1, K) * 7).bfloat16()
            wr, w = (torch.rand(K) + 0.5).bfloat16(), (torch.rand(K) + 0.5).bfloat16()
            h_ref = x + im.rms_norm_reference(r, wr, 1e-6)
            normed = im.rms_norm_reference(h_ref, w, 1e-6)
            kern = im._gemv1_kernel(cfg)
            first = im.int4_gemv1(normed, qweight, scales, 1, kernel=kern, xq=False)
            ref = normed.double() @ im.dequantize_int4(qweight, scales, torch.float64).t()
            for stage in (False, True):
                h = torch.full_like(x, float("nan"))
                fused = im.int4_gemv1(x, qweight, scales, 1, kernel=kern, xq=False, norm=(w, 1e-6),
                                      res=(r, wr, h, 1e-6), stage=stage)
                dh = ((h.double() - h_ref.double()).norm() / h_ref.double().norm()).item()
                d = ((fused.double() - first.double()).norm() / first.double().norm()).item()
                e = ((fused.double() - ref).norm() / ref.norm()).item()
                print("resnormb", N, K, stage, dh, d, e)
""")


def test_norm_in_the_kernel_that_reads_x_through_the_interpreter():
    """The RMSNorm before a linear computed by the quantize kernel as it reads x, or with bf16 x by the
    GEMV itself (`int4_gemv1`'s norm, the op `int4_rms_linear` at M == 1), gives the GEMV of the norm
    computed first (to an ulp of its factor: the sum of squares runs in another order), within 1e-2 of
    fp64; so does the quantize kernel's residual add before the norm (`int4_add_rms_linear`), whose h
    (written over NaNs) is the add computed first, the bf16-x GEMV's residual add alone
    (`int4_add_linear`), its h within bf16 roundings of the add computed first, and the bf16-x GEMV's add and
    norm together (`int4_add_rms_linear` on a small weight), x once a row of threads or once a program."""
    rows, res, resb, resnormb = _script_rows(_NORM_SCRIPT, "norm", "res", "resb", "resnormb")
    assert len(rows) == 4 and len(res) == 2 and len(resb) == 2 and len(resnormb) == 4, (rows, res, resb, resnormb)
    for n, k, splits, xq, d, e in rows:
        assert float(d) <= 1e-3 and float(e) <= 1e-2, (n, k, splits, xq, d, e)
    for n, k, splits, dh, d, e in res:  # with the residual add (h too)
        assert float(dh) <= 1e-6 and float(d) <= 1e-3 and float(e) <= 1e-2, (n, k, splits, dh, d, e)
    for n, k, dh, d, e in resb:  # bf16 x, the add alone in the GEMV: h within a bf16 rounding here and there
        assert float(dh) <= 2e-3 and float(d) <= 2e-3 and float(e) <= 1e-2, (n, k, dh, d, e)
    for n, k, stage, dh, d, e in resnormb:  # bf16 x, the add and the norm of h in the GEMV
        assert float(dh) <= 2e-3 and float(d) <= 2e-3 and float(e) <= 1e-2, (n, k, stage, dh, d, e)


def test_residual_norm_op_on_cpu_is_the_reference_and_checks_shapes():
    """`int4_add_rms_linear` on CPU: h = x + the model's RMSNorm of r, then `int4_rms_linear` of h."""
    from export.gemma4.model import RMSNorm

    qweight, scales = im.quantize_int4(torch.randn(48, 256), 32)
    x, r = torch.randn(2, 3, 256).bfloat16(), torch.randn(2, 3, 256).bfloat16() * 4
    post, pre = RMSNorm(256, 1e-6), RMSNorm(256, 1e-6)
    with torch.no_grad():
        post.weight.uniform_(0.5, 1.5)
        pre.weight.uniform_(0.5, 1.5)
    wr, w = post.weight.detach(), pre.weight.detach()
    h, y = torch.ops.gemma4.int4_add_rms_linear(x, r, wr, w, 1e-6, qweight, scales)
    assert torch.equal(h, x + post(r))
    assert torch.equal(y, torch.ops.gemma4.int4_linear(pre(x + post(r)), qweight, scales))
    with pytest.raises(ValueError, match="int4_add_rms_linear"):
        torch.ops.gemma4.int4_add_rms_linear(x, r[..., :128], wr, w, 1e-6, qweight, scales)


_RES_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from export.kernels import int4_matmul as im
    G = 128
    from tests.helpers import GEMV1_BF16_SIG as sig
    # E2B / E4B per-layer-input gates (the add alone), a small weight with the add and the norm after it
    for n, k, norm in ((256, 1536, 0), (256, 2560, 0), (2560, 1536, 1)):
        plan = im.gemv1_plan(n, k, G)
        for arch in (89, 90, 120):
            const = {"GROUP": G, **plan.cfg.kwargs, "RED": 0, "XQ": plan.xq, "ASM": True,
                     "PDL": 2 if arch >= 90 else 0, "LEVELS": 2, "GLU": 0, "NORM": norm,
                     "NORM_STEPS": im.norm_steps(k // 2), "RES": 1}
            src = ASTSource(im._int4_gemv1_kernel, {a: sig.get(a, "constexpr") for a in im._int4_gemv1_kernel.arg_names},
                            constexprs=const)
            kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": plan.cfg.num_warps})
            print("res", n, k, arch, kern.metadata.shared)
""")


_EARLY_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from export.kernels import int4_matmul as im
    from tests.helpers import GEMV1_BF16_SIG as sig
    # E2B's q / k / v (with the norm), attention output, per-layer-input gate (residual add) and projection
    for n, k, flags in ((2560, 1536, dict(NORM=1)), (1536, 2048, {}), (256, 1536, dict(RES=1)),
                        (1536, 256, dict(GLU=1, UI=1))):
        plan = im.gemv1_plan(n, k, 128)
        for arch in (90, 120):
            for early in (0, 1):
                const = {"GROUP": 128, **plan.cfg.kwargs, "RED": 0, "XQ": False, "ASM": True, "PDL": 2, "LEVELS": 2,
                         "GLU": 0, "NORM": 0, "RES": 0, "UI": 0, "NORM_STEPS": im.norm_steps(k // 2), "EARLY": early,
                         **flags}
                src = ASTSource(im._int4_gemv1_kernel,
                                {a: sig.get(a, "constexpr") for a in im._int4_gemv1_kernel.arg_names}, constexprs=const)
                kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": plan.cfg.num_warps})
                ptx = kern.asm["ptx"]
                print("early", n, k, arch, early, ptx.find("ld.global") < ptx.find("griddepcontrol.wait"),
                      kern.metadata.shared)
""")


def test_small_gemv_can_load_its_first_tiles_before_the_pdl_wait():
    """EARLY (`GEMV1_EARLY`, the default: scripts/gemv1_early_variants.py): the small weights' GEMV
    compiled for sm_90 and sm_120 asks for its first weight tiles before `griddepcontrol.wait`, and without
    it after (the wait first thing), each config within the consumer cards' shared memory; no GPU."""
    rows = _script_rows(_EARLY_COMPILE_SCRIPT, "early")
    assert len(rows) == 16, rows
    for n, k, arch, early, before, shared in rows:
        assert before == ("True" if early == "1" else "False"), (n, k, arch, early, before)
        assert int(shared) <= im.SMEM_LIMIT_BYTES


_STAGE_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im

    torch.manual_seed(0)
    with torch._library.triton.set_wrap_triton_enabled(False):
        # 8 and 4 rows (N ragged to the tile), K in one step, two (the second ragged) or three, groups of 128 and 32,
        # every x the small weights' GEMV computes: plain, the norm, the activation with its table row, the residual
        # add (bf16 bit patterns)
        for N, K, G, cfg in [(40, 512, 128, im._cfg1(8, 2, 4)), (22, 1280, 128, im._cfg1(4, 8, 4)),
                             (36, 384, 128, im._cfg1(8, 2, 2)), (24, 352, 32, im._cfg1(8, 8, 4)),
                             (20, 1536, 128, im._cfg1(8, 4, 4)),  # GEMV1_STEP_FIT's E2B q / k / v tile
                             (40, 2816, 128, im._cfg1(16, 8, 4)),  # 16 rows, 22 groups in 3 steps of 8 (26B-A4B)
                             (12, 6144, 128, im._cfg1(4, 16, 8)),  # K 6144 in 3 steps of 16 (E2B's down's shape)
                             (40, 2816, 128, im._cfg1(16, 8, 8)),  # the staged MLP tiles: the 26B-A4B's gate / up
                             (36, 2112, 64, im._cfg1(16, 16, 8))]:  # and down (33 groups of 64 in 3 steps of 16)
            qweight, scales = im.quantize_int4(torch.randn(N, K), G)
            wref = im.dequantize_int4(qweight, scales, torch.float64)
            kern = im._gemv1_kernel(cfg)
            x = (torch.randn(1, K) * 3).bfloat16()
            w = (torch.rand(K) + 0.5).bfloat16()
            up = torch.randn(3, K).bfloat16()
            r = (torch.randn(1, K) * 7).bfloat16()
            ins = {"plain": ({}, x), "norm": (dict(norm=(w, 1e-6)), im.rms_norm_reference(x, w, 1e-6)),
                   "glu": (dict(up=up, up_index=torch.tensor([1])),
                           (torch.nn.functional.gelu(x.float(), approximate="tanh") * up[1].float()).bfloat16()),
                   "res": (None, x + im.rms_norm_reference(r, w, 1e-6))}
            for mode, (kw, xin) in ins.items():
                ys = []
                for stage in (False, True):
                    h = torch.full_like(x, float("nan"))
                    ys.append(im.int4_gemv1(x, qweight, scales, 1, kernel=kern, xq=False, stage=stage,
                                            **(kw if kw is not None else dict(res=(r, w, h, 1e-6)))).double())
                ref = xin.double() @ wref.t()
                e = [((y - ref).norm() / ref.norm()).item() for y in ys]
                d = ((ys[1] - ys[0]).norm() / ys[0].norm()).item()
                print("stage", mode, N, K, e[0], e[1], d)
""")


def test_staged_x_through_the_interpreter():
    """STAGE (`GEMV1_STAGE`): the small weights' GEMV computing each step's x once for the program (plain, with the
    norm, the activation of a table row, the residual add) gives the default within bf16 roundings of the output
    (the sums in another order), both within 1e-2 of fp64, the fitted staged tiles of 16 rows and of K 6144 too,
    and the staged MLP tiles (16 rows, 8 warps); ~30 s."""
    rows = _script_rows(_STAGE_SCRIPT, "stage")
    assert len(rows) == 36, rows
    for mode, n, k, e_off, e_on, d in rows:
        assert float(e_off) <= 1e-2 and float(e_on) <= 1e-2 and float(d) <= 4e-3, (mode, n, k, e_off, e_on, d)


_STAGE_COMPILE_SCRIPT = textwrap.dedent("""
    from export.kernels import int4_matmul as im
    from tests.helpers import GEMV1_BF16_SIG as sig, gemv1_consumer_shared, sass_sm90
    # E2B's q / k / v (with the norm), attention output and per-layer projection (activation, table row)
    for n, k, flags in ((2560, 1536, dict(NORM=1)), (1536, 2048, {}), (1536, 256, dict(GLU=1, UI=1))):
        plan = im.gemv1_plan(n, k, 128)
        for stage in (0, 1):
            const = {"GROUP": 128, **plan.cfg.kwargs, "RED": 0, "XQ": False, "ASM": True, "PDL": 2, "LEVELS": 2,
                     "NORM_STEPS": im.norm_steps(k // 2), "EARLY": 1, "STAGE": stage, **flags}
            loop, regs, res = sass_sm90(im._int4_gemv1_kernel, sig, const, plan.cfg.num_warps,
                                        aligned_ints=("stride_ww",))
            shared = gemv1_consumer_shared(const, plan.cfg.num_warps)
            print("stage", n, k, stage, sum(loop.values()), sum(v for o, v in loop.items() if o.startswith("BAR")),
                  regs, shared)
""")


def test_staged_x_takes_instructions_off_the_small_gemvs_loop():
    """Compiled for sm_90 with no GPU (as the op launches them: PDL, early tiles), STAGE hands x to the tile through
    shared memory (barriers in the loop) and takes a third or more of the loop's instructions off E2B's q / k / v
    with the norm (most of them x's: 451 -> 171), its attention output and its per-layer projection with the
    activation; it compiles for the RTX 4090 and 5090 within their shared memory."""
    rows = _script_rows(_STAGE_COMPILE_SCRIPT, "stage")
    assert len(rows) == 6, rows
    by = {(int(n), int(k), st): (int(ins), int(bar), int(regs), int(shared))
          for n, k, st, ins, bar, regs, shared in rows}
    for n, k in ((2560, 1536), (1536, 2048), (1536, 256)):
        off, on = by[n, k, "0"], by[n, k, "1"]
        assert off[1] == 0 and on[1] > 0, (n, k, off, on)  # the hand-over's barriers: staged only
        assert on[0] <= 0.8 * off[0], (n, k, off, on)
        assert on[2] <= 128 and on[3] <= im.SMEM_LIMIT_BYTES, (n, k, on)
    assert by[2560, 1536, "1"][0] <= 0.5 * by[2560, 1536, "0"][0], by  # with the norm: most of the loop was x


_STAGED_MLP_COMPILE_SCRIPT = textwrap.dedent("""
    from export.kernels import int4_matmul as im
    from tests.helpers import GEMV1_BF16_SIG as sig, gemv1_consumer_shared, sass_sm90
    # the staged MLP tiles as the op launches them (STAGE, PDL, early tiles): E2B's gate / up and the 26B-A4B's
    # (the residual add with both norms), the 26B-A4B's down (the activation; groups of 64)
    for n, k, pro in ((12288, 1536, "res"), (4224, 2816, "res"), (2816, 2112, "glu")):
        g = im.group_size_for(k, 128)
        plan = im.gemv1_plan(n, k, g, pro)
        flags = dict(RES=1, NORM=1) if pro == "res" else dict(GLU=1)
        const = {"GROUP": g, **plan.cfg.kwargs, "RED": 0, "XQ": False, "ASM": True, "PDL": 2, "LEVELS": 2,
                 "NORM_STEPS": im.norm_steps(k // 2) if pro == "res" else 0, "EARLY": 1, "STAGE": 1, **flags}
        _, regs, res = sass_sm90(im._int4_gemv1_kernel, sig, const, plan.cfg.num_warps, aligned_ints=("stride_ww",))
        spills = "STACK:0 " not in res or "LOCAL:0" not in res
        print("mlp", n, k, int(plan.xq), plan.cfg.kwargs["BLOCK_N"], regs, int(spills),
              gemv1_consumer_shared(const, plan.cfg.num_warps))
""")


def test_staged_mlp_tiles_compile_without_spills_for_every_card():
    """The staged MLP tiles (GEMV1_STAGED_MLP: 16 rows, bf16 x with the residual add and both norms, or the
    activation) compiled for sm_90 with no GPU: no spills, registers for two 8-warp programs an SM or more; for
    the RTX 4090 and 5090 within their shared memory."""
    rows = _script_rows(_STAGED_MLP_COMPILE_SCRIPT, "mlp")
    assert len(rows) == 3, rows
    for n, k, xq, rows_, regs, spills, shared in rows:
        assert xq == "0" and rows_ == "16" and spills == "0", (n, k, xq, rows_, spills)
        assert int(regs) <= 128 and int(shared) <= im.SMEM_LIMIT_BYTES, (n, k, regs, shared)


def test_residual_gemv_compiles_for_the_consumer_cards_and_the_h200():
    """The small weights' GEMV with the residual add (RES, as `int4_add_linear` launches it: bf16 x, eps typed
    fp64 as AOTInductor passes a float), and with the norm of h after it (`int4_add_rms_linear` on a small weight),
    compiled by Triton + ptxas for sm_89, sm_90 and sm_120 with no GPU."""
    rows = _script_rows(_RES_COMPILE_SCRIPT, "res")
    assert len(rows) == 9 and all(int(shared) <= im.SMEM_LIMIT_BYTES for *_, shared in rows), rows


def test_residual_op_on_cpu_is_the_reference_and_checks_shapes():
    """`int4_add_linear` on CPU: h = x + the model's RMSNorm of r, then `int4_linear` of h (no norm of its own)."""
    from export.gemma4.model import RMSNorm

    qweight, scales = im.quantize_int4(torch.randn(48, 256), 32)
    x, r = torch.randn(2, 3, 256).bfloat16(), torch.randn(2, 3, 256).bfloat16() * 4
    post = RMSNorm(256, 1e-6)
    with torch.no_grad():
        post.weight.uniform_(0.5, 1.5)
    h, y = torch.ops.gemma4.int4_add_linear(x, r, post.weight.detach(), 1e-6, qweight, scales)
    assert torch.equal(h, x + post(r))
    assert torch.equal(y, torch.ops.gemma4.int4_linear(x + post(r), qweight, scales))
    with pytest.raises(ValueError, match="int4_add_linear"):
        torch.ops.gemma4.int4_add_linear(x, r[..., :128], post.weight.detach(), 1e-6, qweight, scales)


def test_norm_op_on_cpu_is_the_reference_and_checks_shapes():
    """`int4_rms_linear` on CPU: Gemma 4's RMSNorm (the model's module, bit for bit) then `int4_linear`."""
    from export.gemma4.model import RMSNorm

    qweight, scales = im.quantize_int4(torch.randn(48, 256), 32)
    x = torch.randn(2, 3, 256).bfloat16() * 4
    norm = RMSNorm(256, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y = torch.ops.gemma4.int4_rms_linear(x, norm.weight.detach(), 1e-6, qweight, scales)
    assert y.shape == (2, 3, 48)
    assert torch.equal(im.rms_norm_reference(x, norm.weight.detach(), 1e-6), norm(x))
    assert torch.equal(y, torch.ops.gemma4.int4_linear(norm(x), qweight, scales))
    with pytest.raises(ValueError, match="norm weight"):
        torch.ops.gemma4.int4_rms_linear(x, norm.weight.detach()[:128], 1e-6, qweight, scales)


_MUTATION_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors
    from export.kernels import int4_matmul as im

    class Target:  # TTIR needs a target only, no GPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Target())
    N, K, G = 16384, 5376, 128
    # GLUQ off, its pointers passed as the op passes them (x) (tests/test_int4_mlp.py reads it on)
    NO_GLUQ = dict(GLUQ=0, HALF=0, GOFF=0, lq_ptr=torch.empty(1, dtype=torch.int32), lf_ptr=torch.empty(1),
                   lc_ptr=torch.empty(1, dtype=torch.int32), dcnt_ptr=torch.empty(1, dtype=torch.int32), DNCNT=0,
                   DGROUP=128, DLEVELS=2)
    # CLOSE and ZC off, their pointers passed as the op passes them (x / the counters)
    NO_CLOSE = dict(CLOSE=0, COFF=0, ch_ptr=torch.empty(1, dtype=torch.bfloat16),
                    cw_ptr=torch.empty(1, dtype=torch.bfloat16), cs_ptr=torch.empty(1, dtype=torch.bfloat16),
                    co_ptr=torch.empty(1, dtype=torch.bfloat16), ceps=0.0, CSTEPS=0,
                    zc_ptr=torch.empty(1, dtype=torch.int32), ZC=0, STAGE=0)
    NO_GLUQ = {**NO_GLUQ, **NO_CLOSE}
    # PDL 0 and 2 (the op's mode on sm_90+: its wait is pure inline PTX, which the analysis reads)
    # bf16 x with the activation (GLU: xf_ptr is u) or with the norm (NORM: xf_ptr is its weight)
    cases = [(xq, lv, pdl, glu) for xq, lv, glu in ((True, 2, 0), (True, 1, 0), (False, 2, 1), (False, 2, 0))
             for pdl in (0, 2)]
    for xq, levels, pdl, glu in cases:
        for splits, red in ((1, 0), (8, 0), (8, 2)):  # one slice; the split summed by a kernel or in-kernel
            cfg = im.gemv1_plan(N, K, G).cfg
            x = torch.empty(K // 2, dtype=torch.int32)
            args = dict(x_ptr=x, xf_ptr=torch.empty(K // G),
                        xc_ptr=torch.empty(K // G, dtype=torch.int32), w_ptr=torch.empty(N, K // 8, dtype=torch.int32),
                        s_ptr=torch.empty(N, K // G, dtype=torch.bfloat16), part_ptr=torch.empty(splits, N),
                        y_ptr=torch.empty(1, N, dtype=torch.bfloat16), cnt_ptr=torch.empty(N // 4, dtype=torch.int32),
                        N=N, KW=K // 8, GPS=K // G // splits, SPLITS=splits, stride_ww=K // 8, stride_sn=K // G,
                        stride_ps=N, GROUP=G, RED=red if splits > 1 else 0, XQ=xq, ASM=True, PDL=pdl, LEVELS=levels,
                        GLU=glu, NORM=int(not xq and not glu), eps=1e-6,
                        NORM_STEPS=im.norm_steps(K // 2) if not xq and not glu else 0,
                        r_ptr=x, wr_ptr=x, h_ptr=x, RES=0, ui_ptr=torch.empty(1, dtype=torch.int64), UI=glu,
                        EARLY=int(not xq and pdl > 0), **NO_GLUQ, **cfg.kwargs)  # bf16 x in PDL 2: first tiles
            # before the wait
            print("gemv1", xq, splits, sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {})))
    # bf16 x with x computed once a program (STAGE), plain, with the norm, with the activation of a table row
    N3, K3 = 2560, 1536
    for pdl in (0, 2):
        for norm, glu in ((0, 0), (1, 0), (0, 1)):
            bf = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
            args = dict(x_ptr=bf(K3), xf_ptr=bf(K3), xc_ptr=bf(K3), w_ptr=torch.empty(N3, K3 // 8, dtype=torch.int32),
                        s_ptr=bf(N3, K3 // G), part_ptr=torch.empty(1, 1), y_ptr=bf(1, N3),
                        cnt_ptr=torch.empty(1, dtype=torch.int32), N=N3, KW=K3 // 8, GPS=K3 // G, SPLITS=1,
                        stride_ww=K3 // 8, stride_sn=K3 // G, stride_ps=1, GROUP=G, RED=0, XQ=False, ASM=True,
                        PDL=pdl, LEVELS=2, GLU=glu, NORM=norm, eps=1e-6, NORM_STEPS=im.norm_steps(K3 // 2),
                        r_ptr=bf(K3), wr_ptr=bf(K3), h_ptr=bf(K3), RES=0, ui_ptr=torch.empty(1, dtype=torch.int64),
                        UI=glu, EARLY=int(pdl > 0), **{**NO_GLUQ, "STAGE": 1}, **im.gemv1_plan(N3, K3, G).cfg.kwargs)
            print("stage", pdl, norm, glu, *sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {})))
    # bf16 x with the residual add (RES: the small weights' GEMV writes h), alone and before the norm
    N2, K2 = 256, 1536
    for pdl, norm in ((0, 0), (2, 0), (2, 1)):
        bf = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
        args = dict(x_ptr=bf(K2), xf_ptr=bf(K2), xc_ptr=bf(K2), w_ptr=torch.empty(N2, K2 // 8, dtype=torch.int32),
                    s_ptr=bf(N2, K2 // G), part_ptr=torch.empty(1, 1), y_ptr=bf(1, N2),
                    cnt_ptr=torch.empty(1, dtype=torch.int32), N=N2, KW=K2 // 8, GPS=K2 // G, SPLITS=1,
                    stride_ww=K2 // 8, stride_sn=K2 // G, stride_ps=1, GROUP=G, RED=0, XQ=False, ASM=True, PDL=pdl,
                    LEVELS=2, GLU=0, NORM=norm, eps=1e-6, NORM_STEPS=im.norm_steps(K2 // 2), r_ptr=bf(K2),
                    wr_ptr=bf(K2), h_ptr=bf(K2), RES=1, ui_ptr=x, UI=0, EARLY=int(pdl > 0), **NO_GLUQ,
                    **im.gemv1_plan(N2, K2, G).cfg.kwargs)
        print("gemv1-res False 1", sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {})))
    for levels, pdl, glu, norm, res in ((2, 0, 0, 0, 0), (1, 0, 1, 0, 0), (2, 2, 0, 0, 0), (1, 2, 1, 0, 0),
                                        (2, 2, 0, 1, 0), (1, 0, 0, 1, 0), (2, 2, 0, 1, 1), (2, 0, 0, 1, 1)):
        x = torch.empty(K, dtype=torch.bfloat16)
        args = dict(x_ptr=x, u_ptr=torch.empty(K, dtype=torch.bfloat16),
                    xq_ptr=torch.empty(K // 2, dtype=torch.int32),
                    xf_ptr=torch.empty(K // G), xc_ptr=torch.empty(K // G, dtype=torch.int32),
                    cnt_ptr=torch.empty(8, dtype=torch.int32), NG=K // G, NCNT=0, GROUP=G, GB=im.QUANT_X_GROUPS,
                    PDL=pdl, LEVELS=levels, GLU=glu, NORM=norm, eps=1e-6,
                    r_ptr=torch.empty(K, dtype=torch.bfloat16) if res else x,
                    wr_ptr=torch.empty(K, dtype=torch.bfloat16) if res else x,
                    h_ptr=torch.empty(K, dtype=torch.bfloat16) if res else x, RES=res,
                    NORM_STEPS=im.norm_steps(K) if norm else 0)
        print("quant" + ("-res" if res else ""), sorted(identify_mutated_tensors(im._quant_x_kernel, args, {})))
    # the 31B's gate / up writing the down GEMV's levels (GLUQ), in one slice and in two summed in-kernel
    I = 21504
    cfg = im.gemv1_plan(2 * I, K, G).cfg
    for pdl in (0, 2):
        for splits, red in ((1, 0), (2, 2)):
            i32 = lambda *s: torch.empty(*s, dtype=torch.int32)
            x = i32(K // 2)
            args = dict(x_ptr=x, xf_ptr=torch.empty(K // G), xc_ptr=i32(K // G), w_ptr=i32(2 * I, K // 8),
                        s_ptr=torch.empty(2 * I, K // G, dtype=torch.bfloat16), part_ptr=torch.empty(splits, 2 * I),
                        y_ptr=torch.empty(1, 2 * I, dtype=torch.bfloat16), cnt_ptr=i32(I // 2 + 168), N=2 * I,
                        KW=K // 8, GPS=K // G // splits, SPLITS=splits, stride_ww=K // 8, stride_sn=K // G,
                        stride_ps=2 * I, GROUP=G, RED=red, XQ=True, ASM=True, PDL=pdl, LEVELS=2, GLU=0, NORM=0,
                        eps=1e-6, NORM_STEPS=0, r_ptr=x, wr_ptr=x, h_ptr=x, RES=0,
                        ui_ptr=torch.empty(1, dtype=torch.int64), UI=0, EARLY=0, GLUQ=1, HALF=I,
                        GOFF=I // 2 if red else 0, lq_ptr=i32(I // 2), lf_ptr=torch.empty(I // G), lc_ptr=i32(I // G),
                        dcnt_ptr=i32(1344), DNCNT=1344, DGROUP=G, DLEVELS=2, **NO_CLOSE, **cfg.kwargs)
            print("gluq", pdl, splits, " ".join(sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {}))))
    # the layer's closing add (CLOSE): the 31B's down projection in one slice and in eight summed in-kernel (x as
    # levels), E2B's per-layer projection (bf16 x, the table's row as the activation's up); and E2B's per-layer
    # gate zeroing the projection's counter (ZC, with its residual add)
    bf = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32)
    for pdl in (0, 2):
        for n, k, splits, xq in ((5376, 21504, 1, True), (5376, 21504, 8, True), (1536, 256, 1, False)):
            cfg = im.gemv1_plan(n, k, G).cfg
            x = i32(k // 2) if xq else bf(k)
            args = dict(x_ptr=x, xf_ptr=torch.empty(k // G) if xq else bf(4, k), xc_ptr=i32(k // G) if xq else x,
                        w_ptr=i32(n, k // 8), s_ptr=bf(n, k // G), part_ptr=torch.empty(splits, n), y_ptr=bf(1, n),
                        cnt_ptr=i32(n // 4 + 1), N=n, KW=k // 8, GPS=k // G // splits, SPLITS=splits,
                        stride_ww=k // 8, stride_sn=k // G, stride_ps=n, GROUP=G, RED=2 if splits > 1 else 0, XQ=xq,
                        ASM=True, PDL=pdl, LEVELS=2, GLU=int(not xq), NORM=0, eps=0.0, NORM_STEPS=0, r_ptr=x,
                        wr_ptr=x, h_ptr=x, RES=0, ui_ptr=torch.empty(1, dtype=torch.int64), UI=int(not xq),
                        EARLY=int(not xq and pdl > 0), **NO_GLUQ, **cfg.kwargs)
            args.update(CLOSE=1, COFF=n // 4 if splits > 1 else 0, ch_ptr=bf(n), cw_ptr=bf(n), cs_ptr=bf(1),
                        co_ptr=bf(1, n), ceps=1e-6, CSTEPS=im.norm_steps(n))
            print("close", pdl, splits, " ".join(sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {}))))
        n, k = 256, 1536
        args = dict(x_ptr=bf(k), xf_ptr=bf(k), xc_ptr=bf(k), w_ptr=i32(n, k // 8), s_ptr=bf(n, k // G),
                    part_ptr=torch.empty(1, 1), y_ptr=bf(1, n), cnt_ptr=i32(1), N=n, KW=k // 8, GPS=k // G, SPLITS=1,
                    stride_ww=k // 8, stride_sn=k // G, stride_ps=1, GROUP=G, RED=0, XQ=False, ASM=True, PDL=pdl,
                    LEVELS=2, GLU=0, NORM=0, eps=1e-6, NORM_STEPS=im.norm_steps(k // 2), r_ptr=bf(k), wr_ptr=bf(k),
                    h_ptr=bf(k), RES=1, ui_ptr=i32(1), UI=0, EARLY=int(pdl > 0), **NO_GLUQ,
                    **im.gemv1_plan(n, k, G).cfg.kwargs)
        args.update(zc_ptr=i32(1), ZC=1)
        print("zc", pdl, " ".join(sorted(identify_mutated_tensors(im._int4_gemv1_kernel, args, {}))))
    # the TMA kernel: its weight comes as a tensor descriptor (in the graph: the tensor and the block shape), which
    # torch reads as one only where it believes the GPU has TMA (here: no GPU)
    import torch.utils._triton as torch_triton
    torch_triton._device_supports_tma = lambda: True
    for f in (torch_triton.has_triton_tensor_descriptor_host_tma, torch_triton.has_triton_tma):
        getattr(f, "cache_clear", lambda: None)()
    bn, step, stages, warps = im.GEMV1_TMA_TILE
    for pdl in (0, 2):
        for n, k, splits in ((5376, 21504, 3), (16384, 5376, 1)):
            args = dict(x_ptr=i32(k // 2), xf_ptr=torch.empty(k // G), xc_ptr=i32(k // G), w_desc=i32(n, k // 8),
                        s_ptr=bf(n, k // G), part_ptr=torch.empty(splits, n), y_ptr=bf(1, n), cnt_ptr=i32(n // bn),
                        N=n, KW=k // 8, GPS=k // G // splits, SPLITS=splits, stride_sn=k // G, stride_ps=n, GROUP=G,
                        BLOCK_N=bn, GROUPS=step, STAGES=stages, ASM=True, PDL=pdl, LEVELS=2)
            meta = {"w_desc": ("stable", ([bn, min(step, 2) * G // 8],))}  # 128 bytes of a row a copy
            print("tma", pdl, splits, " ".join(sorted(identify_mutated_tensors(im._int4_gemv1_tma_kernel, args,
                                                                                meta))))
""")


def test_op_kernels_write_only_their_outputs():
    """torch's analysis of which arguments a wrapped Triton kernel writes must read the M == 1
    kernels as the op launches them: an op it cannot read (inline PTX with a side effect) makes it
    take every argument as written, and the compiled graph then clones the weight before each
    call. The analysis runs on TTIR (no GPU), in each PDL mode the op launches (0, and 2 on sm_90+; with bf16
    x in mode 2 the first tiles loaded before the wait, EARLY). It takes every argument as passed (a kernel
    argument left to its default makes it fail, and assume every one written): the op passes them all."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _MUTATION_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("gemv1", "quant"))]
    assert len(lines) == 35, r.stdout
    res = [" ".join(ln[1:]) for ln in lines if ln[0] in ("quant-res", "gemv1-res")]
    assert len(res) == 5 and all("'h_ptr'" in w and "r_ptr" not in w for w in res), res  # h written, r / wr read
    for ln in lines:
        ln = [{"quant-res": "quant", "gemv1-res": "gemv1"}.get(ln[0], ln[0])] + [w for w in ln[1:]
                                                                                if w.strip("[],'") != "h_ptr"]
        written = " ".join(ln[3:] if ln[0] == "gemv1" else ln[1:])
        assert "w_ptr" not in written and "s_ptr" not in written and "x_ptr'" not in written.replace("xq_ptr", ""), ln
        assert "u_ptr" not in written and (ln[0] == "quant" or "xf_ptr" not in written), ln  # gemv1 reads x's
        assert "ui_ptr" not in written, ln  # (and the table's row index, with the activation)
    assert any(ln[0] == "gemv1" and ln[2] == "8" and "'part_ptr'" in " ".join(ln[3:]) for ln in lines), lines
    assert im.GEMV1_RED_XQ in (0, 2) and im.GEMV1_RED in (0, 2)  # the modes read here
    # the gate / up writing the down GEMV's levels (GLUQ): y, the counters, the levels and the down's counters
    # (with K slices the partials), never x, the weights or the scales
    gluq = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("gluq")]
    assert len(gluq) == 4, r.stdout
    for pdl, splits, *written in gluq:
        want = {"cnt_ptr", "dcnt_ptr", "lc_ptr", "lf_ptr", "lq_ptr", "y_ptr"} | ({"part_ptr"} if splits == "2" else set())
        assert set(written) == want, (pdl, splits, written)
    # the closing add (CLOSE): y, the counters and the output (with K slices the partials); ZC: h, y and the counter
    close = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("close")]
    assert len(close) == 6, r.stdout
    for pdl, splits, *written in close:
        assert set(written) == {"cnt_ptr", "co_ptr", "y_ptr"} | ({"part_ptr"} if splits == "8" else set()), written
    zc = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("zc")]
    assert len(zc) == 2 and all(set(w) == {"h_ptr", "y_ptr", "zc_ptr"} for _, *w in zc), zc
    # the staged x (STAGE): y alone
    staged = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("stage")]
    assert len(staged) == 6 and all(w == ["y_ptr"] for *_, w in ((*ln[:3], ln[3:]) for ln in staged)), staged
    # the TMA kernel: y, with K slices the partials and the counters too (its descriptor's weight read only)
    tma = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("tma")]
    assert len(tma) == 4, r.stdout
    for pdl, splits, *written in tma:
        assert set(written) == ({"cnt_ptr", "part_ptr", "y_ptr"} if splits != "1" else {"y_ptr"}), (pdl, splits,
                                                                                                 written)


_SM90_LAYOUT_SCRIPT = textwrap.dedent("""
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from export.kernels import int4_matmul as im
    block_n, warps, one_row, parts = (int(v) for v in sys.argv[1:])
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "M": "i32", "N": "i32",
           "KW": "i32", "KW_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ww": "i32", "stride_sn": "i32",
           "stride_os": "i32", "stride_om": "i32", "BLOCK_N": "constexpr", "KS": "constexpr",
           "ONE_ROW": "constexpr", "ASM": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 6, 7, 8, 9, 11)}
    src = ASTSource(im._int4_gemv_mma_kernel, sig, attrs=attrs, constexprs={
        "BLOCK_N": block_n, "KS": parts, "ONE_ROW": bool(one_row), "ASM": True})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print(k.asm["ttgir"])
""")


@pytest.mark.parametrize("block_n,warps,one_row,parts", [(64, 4, 1, 1), (8, 4, 0, 4)])
def test_mma_gemv_lanes_hold_the_fragments_it_assumes(block_n, warps, one_row, parts):
    """The small-M kernel's inline mma.sync reads each lane's registers as fragments: that is
    right only in the layout Triton gives the 16-word load (sizePerThread [1, 4], threadsPerWarp
    [8, 4], warps along rows). Compiled for sm_90 here (no GPU needed, ~5 s): every inline asm
    of the kernel sits in that layout, and no layout conversion runs inside the loop."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _SM90_LAYOUT_SCRIPT, str(block_n), str(warps), str(one_row), str(parts)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ttgir = r.stdout
    want = f"sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [{warps}, 1], order = [1, 0]"
    layouts = dict(line.split(" = ", 1) for line in ttgir.splitlines() if line.startswith("#blocked"))
    asm_layouts = {name for line in ttgir.splitlines() if "elementwise_inline_asm" in line
                   for name in re.findall(r"#blocked\d*", line.split(" -> ", 1)[1])}
    assert asm_layouts and all(want in layouts[name] for name in asm_layouts), (asm_layouts, layouts)
    body = ttgir.split("scf.for", 1)[1].split("scf.yield", 1)[0]
    assert "convert_layout" not in body and "local_alloc" not in body


def _matches_the_unfused_op(got: torch.Tensor, unfused_input: torch.Tensor, qweight, scales) -> None:
    """A fused op's output against `int4_linear` of the input computed first, and against fp32."""
    first = torch.ops.gemma4.int4_linear(unfused_input, qweight, scales).float()
    ref = unfused_input.float() @ im.dequantize_int4(qweight, scales, torch.float32).t()
    got = got.float()
    assert torch.isfinite(got).all()
    assert ((got - first).norm() / first.norm()).item() <= 1e-2
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5])
# 31B / E2B down, a small-weight plan, E2B's per-layer projection (the last two: the GEMV's own activation)
@pytest.mark.parametrize("n,k", [(5376, 21504), (1536, 6144), (256, 1024), (1536, 256)])
def test_cuda_glu_op_is_the_linear_of_the_activation(m, n, k):
    """`int4_glu_linear` on the GPU (M == 1: the activation in the quantize kernel, or in the GEMV where
    the plan takes bf16 x; M > 1: aten, then the int4 path) against the activation computed first and fed
    to `int4_linear`, and against fp32, on fresh random inputs."""
    torch.manual_seed(n + m)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 128)
    gate = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 2
    up = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.gemma4.int4_glu_linear(gate, up, qweight, scales)
    _matches_the_unfused_op(got, im.glu_reference(gate, up), qweight, scales)
    # up as row 3 of a table of 7 rows (the per-layer inputs): the row's result, bitwise
    table = torch.randn(1, m, 7, k, device="cuda", dtype=torch.bfloat16)
    table[:, :, 3] = up
    got_row = torch.ops.gemma4.int4_glu_linear(gate, table, qweight, scales, torch.tensor([3], device="cuda"))
    assert torch.equal(got_row, got)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5])
# 31B q / k / v (x as int8 levels: the quantize kernel's norm), E4B's and E2B's (bf16 x: the GEMV's own)
@pytest.mark.parametrize("n,k", [(16384, 5376), (3072, 2560), (3072, 1536)])
def test_cuda_norm_op_is_the_linear_of_the_norm(m, n, k):
    """`int4_rms_linear` on the GPU (M == 1: the norm in the kernel that reads x; M > 1: aten, then the int4
    path) against the norm computed first and fed to `int4_linear`, and against fp32, on fresh random inputs;
    a norm weight in another dtype than x takes the aten path and agrees too."""
    torch.manual_seed(n + m)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 32)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 5
    for w in (torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5, torch.rand(k, device="cuda") + 0.5):
        got = torch.ops.gemma4.int4_rms_linear(x, w, 1e-6, qweight, scales)
        _matches_the_unfused_op(got, im.rms_norm_reference(x, w, 1e-6), qweight, scales)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5])
# 31B, E2B and 26B-A4B gate / up (x as int8 levels: the quantize kernel's residual add and norms), and a small
# weight (bf16 x: the GEMV's own add and norms)
@pytest.mark.parametrize("n,k", [(43008, 5376), (12288, 1536), (4224, 2816), (2560, 1536)])
def test_cuda_residual_norm_op_is_the_add_and_the_linear_of_the_norm(m, n, k):
    """`int4_add_rms_linear` on the GPU (M == 1: the residual add and both norms in the quantize kernel, or in the
    small weights' bf16-x GEMV; M > 1: aten, then the int4 path): h against the add computed first (to an ulp of
    the norm's factor), y against the norm of that h fed to `int4_linear` and against fp32, on fresh random
    inputs."""
    torch.manual_seed(n + m)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 32)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 3
    r = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 9
    wr, w = (torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    h, y = torch.ops.gemma4.int4_add_rms_linear(x, r, wr, w, 1e-6, qweight, scales)
    h_ref = x + im.rms_norm_reference(r, wr, 1e-6)
    assert ((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item() <= 1e-3
    _matches_the_unfused_op(y, im.rms_norm_reference(h_ref, w, 1e-6), qweight, scales)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5])
# E2B / E4B per-layer-input gates (bf16 x: the GEMV's residual add) and a weight that takes x as levels
@pytest.mark.parametrize("n,k", [(256, 1536), (256, 2560), (5376, 8192)])
def test_cuda_residual_op_is_the_add_and_the_linear_of_h(m, n, k):
    """`int4_add_linear` on the GPU (M == 1 on a small weight: the residual add in the bf16-x GEMV, which
    writes h; else aten, then the int4 path): h against the add computed first, y against `int4_linear` of
    that h and against fp32, on fresh random inputs."""
    torch.manual_seed(n + m)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 128)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 3
    r = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) * 9
    wr = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    h, y = torch.ops.gemma4.int4_add_linear(x, r, wr, 1e-6, qweight, scales)
    h_ref = x + im.rms_norm_reference(r, wr, 1e-6)
    assert ((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item() <= 2e-3
    _matches_the_unfused_op(y, h_ref, qweight, scales)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 8, 100, 512])
@pytest.mark.parametrize("n,k,group", [(1000, 4096, 128), (320, 704, 64), (2048, 2560, 32)])
def test_cuda_kernels_match_reference_consumer_configs(monkeypatch, m, n, k, group):
    monkeypatch.setattr(im, "CONSUMER_ONLY", True)
    torch.manual_seed(m)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), group)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    torch.full((1 << 24,), float("nan"), device="cuda")  # poison the allocator's free blocks
    y = torch.ops.gemma4.int4_linear(x, qweight, scales)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, _fp32_ref(x, qweight, scales)) <= 1e-2
    cpu = im.int4_linear_reference(x.cpu().float(), qweight.cpu(), scales.cpu())
    assert _rel(y.cpu(), cpu) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("xq", [False, True])
@pytest.mark.parametrize("n,k,group", [(1000, 4608, 128), (320, 704, 64), (2048, 2560, 32), (16384, 5376, 128),
                                       (5376, 21504, 128)])
def test_cuda_m1_bf16_and_two_level_x(monkeypatch, xq, n, k, group):
    """Both M == 1 paths (bf16 x with FMAs; x as two int8 levels with dp4a) at `gemv1_plan`'s
    config and split, fresh x with an all-zero group, poisoned outputs."""
    monkeypatch.setattr(im, "GEMV1_XQ", xq)
    torch.manual_seed(n + k)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), group)
    for _ in range(3):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
        x[0, :group] = 0
        torch.full((1 << 24,), float("nan"), device="cuda")  # outputs and partials
        torch.full((1 << 14,), 7, dtype=torch.int32, device="cuda")  # the split sum's counters (small pool)
        y = torch.ops.gemma4.int4_linear(x, qweight, scales)
        assert torch.isfinite(y).all() and _rel(y, _fp32_ref(x, qweight, scales)) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(16384, 5376), (5376, 21504), (5376, 8192), (18432, 5376)])
def test_cuda_mid_size_weights_take_the_tma_gemv(monkeypatch, n, k):
    """On sm_90+ with GEMV1_TMA on the op's mid-size weights go through `int4_gemv1_tma` (counted), within 1e-2 of
    fp32 and 2e-3 of the register kernel (the switch off), eager and replayed in a CUDA graph, fresh x, poisoned
    outputs."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA: sm_90+")
    monkeypatch.setattr(im, "GEMV1_TMA", True)  # the switch (on unless GEMMA4_GEMV1_TMA=0)
    calls = []
    tma = im.int4_gemv1_tma
    monkeypatch.setattr(im, "int4_gemv1_tma", lambda *a, **kw: calls.append(1) or tma(*a, **kw))
    torch.manual_seed(n + k)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 128)
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3)]
    x = xs[0].clone()
    torch.full((1 << 24,), float("nan"), device="cuda")
    torch.full((1 << 14,), 7, dtype=torch.int32, device="cuda")  # the split sum's counters (small pool)
    torch.ops.gemma4.int4_linear(x, qweight, scales)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = torch.ops.gemma4.int4_linear(x, qweight, scales)
    for xi in xs:
        y = torch.ops.gemma4.int4_linear(xi, qweight, scales)
        x.copy_(xi)
        graph.replay()
        with monkeypatch.context() as m:
            m.setattr(im, "GEMV1_TMA", False)
            y_reg = torch.ops.gemma4.int4_linear(xi, qweight, scales)
        assert torch.isfinite(y).all() and _rel(y, _fp32_ref(xi, qweight, scales)) <= 1e-2
        assert _rel(y, y_reg) <= 2e-3 and torch.equal(y, y_graph)
    assert len(calls) == 5 and im.gemv1_tma_splits(n, k, 128) >= 1


@pytest.mark.cuda
@pytest.mark.parametrize("n,k,switch", [(10752, 2560, "GEMV1_TMA_SMALL"), (9216, 2816, "GEMV1_TMA_SMALL"),
                                        (1536, 12288, "GEMV1_TMA_DEEP")])
def test_cuda_small_models_weights_take_the_tma_gemv_at_the_small_tile(monkeypatch, n, k, switch):
    """On sm_90+ the small models' mid-size weights (GEMV1_TMA_SMALL: E4B's per-layer projection, the 26B-A4B's
    full q / k, plain x here) and E2B's double-wide down (GEMV1_TMA_DEEP, x the activation of gate and up) go
    through `int4_gemv1_tma` at GEMV1_TMA_SMALL_TILE, within 1e-2 of fp32 and 2e-3 of the register kernel (the
    switch off), fresh inputs, poisoned pools."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA: sm_90+")
    monkeypatch.setattr(im, "GEMV1_TMA", True)
    monkeypatch.setattr(im, switch, True)
    tiles = []
    tma = im.int4_gemv1_tma
    monkeypatch.setattr(im, "int4_gemv1_tma", lambda *a, **kw: tiles.append((kw["tile"], a[3])) or tma(*a, **kw))
    glu = switch == "GEMV1_TMA_DEEP"
    torch.manual_seed(n + k)
    qweight, scales = im.quantize_int4(torch.randn(n, k, device="cuda"), 128)
    torch.full((1 << 24,), float("nan"), device="cuda")
    torch.full((1 << 14,), 7, dtype=torch.int32, device="cuda")  # the split sum's counters (small pool)
    op = torch.ops.gemma4.int4_glu_linear if glu else torch.ops.gemma4.int4_linear
    for _ in range(3):
        ins = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(2 if glu else 1)]
        x = im.glu_reference(*ins) if glu else ins[0]
        y = op(*ins, qweight, scales)
        with monkeypatch.context() as m:
            m.setattr(im, switch, False)
            y_reg = op(*ins, qweight, scales)
        assert torch.isfinite(y).all() and _rel(y, _fp32_ref(x, qweight, scales)) <= 1e-2
        assert _rel(y, y_reg) <= 2e-3
    want = im.gemv1_tma_tile(n, k, 128, "glu" if glu else "plain")
    assert want[0] == im.GEMV1_TMA_SMALL_TILE and tiles == [want] * 3


class _Lin(torch.nn.Module):
    """One int4 linear, its weight and scales buffers (what the AOTInductor tests export)."""

    def __init__(self, qweight, scales):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, x):
        return torch.ops.gemma4.int4_linear(x, self.qweight, self.scales)


@pytest.mark.cuda
def test_cuda_aoti_compiles_the_kernels_into_the_so(tmp_path):
    """AOTInductor builds the Triton kernels into the package (no fallback op) for every path:
    M == 1, the fused GEMM (a chunk of 256) and dequant + mm (a chunk of 1024)."""
    qweight, scales = im.quantize_int4(torch.randn(640, 1024, device="cuda"), 128)
    mod = _Lin(qweight, scales)
    M = torch.export.Dim("M", min=2, max=256)  # a prefill chunk's dynamic length: the GEMM path
    M_big = torch.export.Dim("M", min=2, max=1024)  # a chunk that reaches DEQUANT_MIN_M: dequant + mm
    for m, shapes in ((1, None), (64, ({0: M},)), (1024, ({0: M_big},))):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ep = torch.export.export(mod, (x,), dynamic_shapes=shapes)
        # as the project's backends compile and its runner loads: a bare .so in torch's
        # container runner (torch's .pt2 package loader crashed on the H200)
        with im.one_config():  # one config per kernel: the compile, not the tuning, is under test
            so = torch._inductor.aot_compile(ep.module(), (x,),
                                             options={"aot_inductor.output_path": str(tmp_path / f"m{m}.so")})
        promote_libtorch("cuda")
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda:0")
        for rows in ((1,) if shapes is None else (3, 64, 200) if m == 64 else (3, 600, 1024)):
            x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
            (y,) = runner.run([x])
            assert _rel(y, _fp32_ref(x, qweight, scales)) <= 1e-2, rows


@pytest.mark.cuda
def test_cuda_aoti_builds_the_tma_gemv_into_the_so(monkeypatch, tmp_path):
    """A mid-size weight at M == 1 on sm_90+: AOTInductor's wrapper builds the weight's tensor descriptor and
    launches `_int4_gemv1_tma_kernel` from the .so, within 1e-2 of fp32."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA: sm_90+")

    monkeypatch.setattr(im, "GEMV1_TMA", True)  # the switch (on unless GEMMA4_GEMV1_TMA=0)
    qweight, scales = im.quantize_int4(torch.randn(5376, 8192, device="cuda"), 128)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    ep = torch.export.export(_Lin(qweight, scales), (x,))
    with im.one_config(), host_tma_descriptors():  # as export/pipeline.py lowers
        so = torch._inductor.aot_compile(ep.module(), (x,), options={"aot_inductor.output_path": str(tmp_path / "t.so")})
    assert b"_int4_gemv1_tma_kernel" in open(so, "rb").read()
    promote_libtorch("cuda")
    runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda:0")
    for _ in range(3):
        x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
        (y,) = runner.run([x])
        assert _rel(y, _fp32_ref(x, qweight, scales)) <= 1e-2


def test_cpu_backend_decomposes_the_op_into_aten():
    from export.backends.cpu import Gemma4CpuBackend
    qweight, scales = im.quantize_int4(torch.randn(24, 64), 32)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)

        def forward(self, x):
            return torch.ops.gemma4.int4_linear(x, self.qweight, self.scales)

    x = torch.randn(3, 64)
    ep = torch.export.export(Lin(), (x,)).run_decompositions(Gemma4CpuBackend.get_decomposition_table())
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("gemma4" in t for t in targets) and any("bitwise" in t for t in targets)
    assert torch.allclose(ep.module()(x), im.int4_linear_reference(x, qweight, scales))


@pytest.mark.parametrize("chunk", [im.DEQUANT_MIN_M, im.DEQUANT_MIN_M - 1])
def test_exported_prefill_takes_dequant_and_mm_when_its_chunk_can_reach_dequant_min_m(chunk):
    """The graph AOTInductor compiles for a dynamic T in [2, chunk] (the triton op decomposed,
    as Inductor does): dequant + matmul when the chunk reaches DEQUANT_MIN_M, the fused GEMM
    below it, and T still dynamic over its whole range (no guard specialized it)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    qweight, scales = im.quantize_int4(torch.randn(48, 256), 32)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)

        def forward(self, x):
            return torch.ops.gemma4.int4_linear(x, self.qweight, self.scales)

    T = torch.export.Dim("T", min=2, max=chunk)
    ep = torch.export.export(Lin(), (torch.randn(1, chunk, 256, dtype=torch.bfloat16),), dynamic_shapes=({1: T},))
    ep = ep.run_decompositions({}, decompose_custom_triton_ops=True)
    kernels = {kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
               for n in ep.graph.nodes if "kernel_idx" in n.kwargs}
    matmuls = [n for n in ep.graph.nodes if n.target in (torch.ops.aten.matmul.default, torch.ops.aten.mm.default)]
    if chunk >= im.DEQUANT_MIN_M:
        assert kernels == {"_int4_dequant_kernel"} and len(matmuls) == 1
    else:
        assert kernels == {"_int4_matmul_kernel"} and not matmuls
    (vr,) = ep.range_constraints.values()
    assert (vr.lower, vr.upper) == (2, chunk)


def test_can_reach_reads_the_value_range_without_a_guard():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    s = env.create_unbacked_symint()
    torch._check(s >= 2)
    torch._check(s <= 1024)
    assert im.can_reach(s, 512) and im.can_reach(s, 1024) and not im.can_reach(s, 1025)
    assert im.can_reach(600, 512) and not im.can_reach(511, 512)
    assert not env.guards
