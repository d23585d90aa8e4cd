"""scripts/small_mlp_variants.py (a GPU design probe) without a GPU: its MLP shapes are the models' dense MLPs, its
tiles fit the register budget and the consumer cards, and its run under Triton's interpreter checks the one-launch
bf16 variant's h, gate / up and down against fp32."""

import json
import os
import subprocess
import sys
from pathlib import Path

from export.gemma4.config import PRESETS
from export.kernels import int4_matmul as im
from scripts import small_mlp_variants as sm

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_are_the_models_dense_mlps():
    for m in ("e2b", "e4b", "26b-a4b"):
        cfg = PRESETS[m]
        assert sm.SHAPES[m][0] == cfg.hidden_size
        assert sm.SHAPES[m][1] == cfg.intermediate_size, (m, cfg.intermediate_size)
    e2b = PRESETS["e2b"]  # the KV-shared layers' double-wide MLP
    wide = {e2b.layer_intermediate_size(i) for i in range(e2b.num_hidden_layers)} - {e2b.intermediate_size}
    assert sm.SHAPES["e2b-wide"] == (e2b.hidden_size, *wide), wide


def test_tiles_hold_a_few_words_a_thread_and_the_op_takes_levels_there():
    for gu, down in sm.TILES:
        for bn, groups, warps in (gu, down):
            assert groups & (groups - 1) == 0 and bn >= 4  # (STAGE needs 4 rows or more)
            assert bn * groups * 16 <= 64 * 32 * warps
    for m in ("e2b", "e2b-wide", "e4b", "26b-a4b"):  # the levels side: x as levels (two launches each)
        h, inter = sm.SHAPES[m]
        gd = im.group_size_for(inter, 128)
        assert sm.Op(levels=True).plan(2 * inter, h, 128, "res").xq
        assert sm.Op(levels=True).plan(h, inter, gd, "glu").xq
        # the op's side: the plan as it is (E2B's gate / up and the 26B-A4B's pair staged), the switch left on
        staged = sm.Op().plan(2 * inter, h, 128, "res"), sm.Op().plan(h, inter, gd, "glu")
        want = {"e2b": [False, True], "e2b-wide": [True, True], "e4b": [True, True], "26b-a4b": [False, False]}
        assert [p.xq for p in staged] == want[m], m
        assert im.GEMV1_STAGED_MLP


def test_probe_runs_and_checks_in_the_interpreter(tmp_path):
    out = tmp_path / "mlp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.small_mlp_variants", "--interpret", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["models"]["tiny"]["rows"]
    assert doc["checks_passed"]
    assert [r["variant"].split("/")[0] for r in rows] == ["bf16"] + ["pc"] * len(sm.TINY_PC), rows
    for row in rows:
        assert row["h_err"] <= 1e-3 and row["gu_err"] <= 1e-2 and row["d_err"] <= 1e-2, row
        assert row["repeat_equal"], row  # (the one-launch MLP: its counters back at 0 after the replays)
    # the one-launch MLP's producers loop over several row blocks there (P = PF x the interpreter's 4 "SMs")
    assert all(384 // (c[0] // 2) > c[7] * 4 for c in sm.TINY_PC)


def test_one_launch_mlp_fits_the_registers_without_spilling():
    """The probe's first configuration for E2B compiled for sm_90 as launched: no stack (no spills), and at most
    128 registers a thread (its 8 warps: two programs an SM at least, producers beside consumers)."""
    import triton

    from scripts import persistent_mlp as pm
    from tests.helpers import sass_sm90

    sig = {a: "*bf16" for a in ("x_ptr", "r_ptr", "wr_ptr", "wn_ptr", "h_ptr", "gu_ptr", "act_ptr", "y_ptr",
                                "gus_ptr", "ds_ptr")}
    sig.update({"guw_ptr": "*i32", "dw_ptr": "*i32", "cnt_ptr": "*i32", "eps": "fp32"})
    sig.update({a: "i32" for a in ("K", "I", "P", "Q", "stride_gw", "stride_gs", "stride_dw", "stride_ds")})
    hid, inter = sm.SHAPES["e2b"]
    bn, groups, depth, bnd, dgroups, warps, stage = sm.PC_CONFIGS[0][:7]
    const = dict(GROUP=128, BN=bn, GROUPS=groups, DEPTH=depth, DGROUP=128, BND=bnd, DGROUPS=dgroups,
                 DSTEPS=triton.cdiv(inter // 128, dgroups), NORM_STEPS=im.norm_steps(hid // 2), STAGE=stage, ASM=True,
                 PDL=2)
    _, regs, res = sass_sm90(pm._mlp_pc_kernel, sig, const, warps, aligned_ints=("stride_gw", "stride_dw", "K", "I"),
                             whole=True)
    assert "STACK:0" in res and regs <= 128, res


def test_unknown_model_is_refused(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.small_mlp_variants", "--models", "e2b,nope"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--models: nope unknown" in r.stderr and "Traceback" not in r.stderr, r.stderr
