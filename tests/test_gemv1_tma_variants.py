"""scripts/gemv1_tma_variants.py without a GPU: its configs fit the consumer cards' shared memory and TMA's
box rules, its layer graph holds the picks it names, and under Triton's interpreter every kind of launch of the
op's TMA kernel (one slice, K slices summed in-kernel, a slice that is no whole number of steps, rows past N)
agrees with an fp32 matmul on the dequantized weight and with the op's plan. (The kernel's compiles:
tests/test_int4_matmul.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gemv1_tma_variants as tv

ROOT = Path(__file__).resolve().parents[1]


def test_candidates_fit_the_consumer_cards_and_tma_boxes():
    for n, k in ((5376, 8192), (16384, 5376), (43008, 5376), (5376, 21504)):
        cands = tv.candidates(n, k, 132)
        assert {v.stages for v in cands} == {3, 4, 6} and {v.block_n for v in cands} == {32, 64, 128}
        assert 8 in {v.groups for v in cands}  # four copies a step: 16 KB of a 32-row program before the PDL wait
        for v in cands:
            copy = min(v.groups, 2) * tv.GROUP // 8  # words of a row a copy: the box's inner extent, 128 bytes at most
            assert tv.smem_bytes(v.block_n, v.groups, v.stages) <= tv.SMEM
            assert copy * 4 % 16 == 0 and copy * 4 <= 128 and v.block_n <= 256
            assert v.block_n * v.groups * tv.GROUP // 8 >= 4 * 32 * v.warps
            assert 1 <= v.splits <= k // tv.GROUP // v.groups


def test_layer_picks_hold_the_plan_the_best_and_the_op_choice_with_and_without_pdl():
    """The layer graph compares the plan, each shape's best and what the op runs with GEMV1_TMA on (its tile and
    splits; the plan where it takes no TMA kernel), each also in the artifact's PDL mode on sm_90+."""
    assert tv.op_choice(5376, 21504) == tv.Variant(*tv.im.GEMV1_TMA_TILE, 3)  # 168 row blocks: ~512 programs
    assert isinstance(tv.op_choice(43008, 5376), tv.Plan)  # gate / up: no TMA kernel
    best = {"a": tv.Variant(32, 4, 3, 4, 2), "b": tv.Plan()}
    todo = {"a": (5376, 8192), "b": (43008, 5376)}
    assert set(tv.layer_picks(best, todo, 0)) == {"plan", "best", "op"}
    picks = tv.layer_picks(best, todo, 2)
    assert set(picks) == {"plan", "best", "op", "plan_pdl", "best_pdl", "op_pdl"}
    assert picks["best_pdl"]("a") == tv.Variant(32, 4, 3, 4, 2, 2) and picks["best_pdl"]("a").label.endswith("p")
    assert picks["plan_pdl"]("b").pdl == 2 and picks["op_pdl"]("b").label == "planp"
    assert picks["op"]("a").splits == 3 and picks["op_pdl"]("a").pdl == 2  # 168 row blocks: ~512 programs


def test_layer_tiles_run_the_op_choice_at_each_tile_and_refuse_bad_ones():
    """--layer-tiles: each tile in place of GEMV1_TMA_TILE where the op takes the TMA kernel (its warps, ~512
    programs), the plan elsewhere, with and without PDL; a malformed or oversized tile is named."""
    assert tv.parse_tiles("32x4x3, 32x4x6,64X2x4") == [(32, 4, 3), (32, 4, 6), (64, 2, 4)]
    assert tv.parse_tiles("") == []
    for bad in ("32x4", "32x4x1", "32x3x3", "axbxc", "128x8x6"):  # 128 x 8 x 6: 384 KB of shared memory
        with pytest.raises(ValueError, match=bad):
            tv.parse_tiles(bad)
    todo = {"o": (5376, 8192), "gu": (43008, 5376)}
    picks = tv.layer_picks({}, todo, 2, [(32, 4, 6), (64, 2, 3)])
    assert {"tile32x4x6", "tile32x4x6_pdl", "tile64x2x3", "tile64x2x3_pdl"} <= set(picks)
    assert picks["tile32x4x6"]("o") == tv.Variant(32, 4, 6, tv.im.GEMV1_TMA_TILE[3], 3)  # 168 row blocks x 3
    assert picks["tile64x2x3_pdl"]("o") == tv.Variant(64, 2, 3, tv.im.GEMV1_TMA_TILE[3], 6, 2)  # 84 x 6
    assert isinstance(picks["tile32x4x6"]("gu"), tv.Plan) and picks["tile32x4x6_pdl"]("gu").pdl == 2
    r = subprocess.run([sys.executable, "-m", "scripts.gemv1_tma_variants", "--layer-tiles", "32x4"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--layer-tiles: '32x4' is not" in r.stderr and "Traceback" not in r.stderr, r.stderr


_CHECK = """
import torch
from export.kernels import int4_matmul as im
from scripts import gemv1_tma_variants as tv
from scripts.gemv1_variants import launch_directly
launch_directly("test")
torch.manual_seed(0)
cases = [((40, 1024), tv.Variant(32, 2, 3, 4, 3)),   # 8 groups in slices of 3: a step past the slice's end
         ((40, 1024), tv.Variant(32, 4, 3, 4, 1)),   # one slice, rows past N
         ((72, 2048), tv.Variant(64, 1, 3, 4, 2)),   # two slices summed in-kernel
         ((72, 2048), tv.Variant(32, 4, 6, 8, 1))]
for (n, k), v in cases:
    q, s = im.quantize_int4(torch.randn(n, k), tv.GROUP)
    ref_w = im.dequantize_int4(q, s, torch.float32)
    for _ in range(2):
        x = torch.randn(1, k, dtype=torch.bfloat16)
        y, p = v(x, q, s).float(), tv.Plan()(x, q, s).float()
        ref = x.float() @ ref_w.t()
        err = float((y - ref).norm() / ref.norm())
        vs_plan = float((y - p).norm() / p.norm())
        assert err <= 1e-2 and vs_plan <= 2e-3, (v.label, n, k, err, vs_plan)
print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess env")
def test_variants_match_fp32_and_the_plan_in_the_interpreter():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    code = "import scripts.triton_interpreter\n" + _CHECK
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]


def test_small_shapes_are_the_small_models_weights_on_the_pools_plan():
    """--small sweeps the small models' M == 1 weights that the op still runs on the pool's plan (x as levels) with
    the prologue it plans them with, each K whole groups of 128 (the TMA kernel's group)."""
    todo = tv.small_shapes()
    assert set(todo) == set(tv.SMALL) and todo["e4b.mlp.down_proj"] == (2560, 10240)
    assert todo["e2b.mlp.down_proj"] == (1536, 6144) and todo["e2b.mlp.down_proj.wide"] == (1536, 12288)
    for nm, (n, k) in todo.items():
        assert k % 128 == 0 and tv.im.gemv1_plan(n, k, 128, tv.prologue_for(nm)).xq, nm
    assert [tv.prologue_for(nm) for nm in ("e2b.mlp.gate_up_proj", "e2b.mlp.down_proj", "26b-a4b.qk_proj.full",
                                           "26b-a4b.o_proj.full")] == ["res", "glu", "norm", "plain"]
