"""scripts/gemv1_small_variants.py without a GPU: the shapes it sweeps are the small models' M == 1
linears, its tiles respect the register budget and cover K in one or two steps (up to four with x staged), and
its run under Triton's interpreter (one subprocess, tiny stand-in shapes) checks every variant against an fp32
matmul."""

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts import gemv1_small_variants as sv

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_are_the_small_models_linears_up_to_12288():
    got = {(n, k) for _, n, k in sv.shapes()}
    assert (256, 2560) in got and (2560, 256) in got and (2816, 704) in got and (8192, 2816) in got
    layers = [s for m in sv.LAYERS for s in sv.LAYERS[m]]
    order = [(n, k) for _, n, k in sv.shapes()]
    assert order[:len(set(layers))] == list(dict.fromkeys(layers))  # the layer graphs' shapes first
    assert (20480, 2560) in got and (262144, 1536) not in got  # E4B's gate/up (its layer), no lm_head
    assert all(n <= 12288 and k <= 12288 for n, k in got - set(layers))


def test_candidates_cover_k_in_few_steps_within_the_register_budget():
    for k in (256, 1536, 2112, 2816, 10240):
        g = sv.im.group_size_for(k, 128)
        groups = k // g
        cands = sv.candidates(k)
        assert cands and any(v.xq for v in cands) and any(not v.xq for v in cands) and any(v.stage for v in cands)
        assert all(v.block_n >= 4 and not v.xq for v in cands if v.stage)  # (the kernel stages 4 rows or more)
        for v in cands:
            steps = -(-groups // v.groups)
            assert v.groups & (v.groups - 1) == 0 and (steps <= 2 or (v.stage and steps <= 4))
            assert v.block_n * v.groups * (g // 8) <= sv.MAX_WORDS_A_THREAD * 32 * v.warps
    # E2B's 12 groups: a staged step of 4 (3 steps, none masked) beside the plan's 8 (the second half masked)
    assert {(v.block_n, v.groups) for v in sv.candidates(1536) if v.stage} >= {(8, 4), (16, 4), (8, 8)}


def test_sweep_runs_and_checks_in_the_interpreter(tmp_path):
    out = tmp_path / "small.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.gemv1_small_variants", "--interpret", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["checks_passed"] and doc["rows"]
    variants = {row["variant"] for row in doc["rows"]}
    assert "plan" in variants and any(v.startswith("b") for v in variants) and any(v.startswith("q") for v in variants)
    assert any(v.startswith("s") for v in variants)  # x computed once a program (STAGE)
    assert all(row["rel_err"] <= 1e-2 for row in doc["rows"])
