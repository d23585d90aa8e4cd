"""scripts/gemv1_prefetch_variants.py without a GPU: its prefetch and spin kernels assemble for sm_90
(the PTX of every mode reaches ptxas), a prefetch covers the weight's first rows and their scales, and
its run under Triton's interpreter (tiny stand-in shapes, the kernels without their PTX) checks every
variant's output bitwise against the cold one and the cold one against an fp32 matmul."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gemv1_prefetch_variants as pv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", sorted(pv.MODES))
def test_prefetch_modes_assemble_for_sm90(mode):
    from scripts.gemv1_tile_variants import _compile_sm90
    bulk = mode == "bulk"
    k = _compile_sm90(pv._prefetch_kernel, {"ptr": "*u8", "out_ptr": "*i32", "NBYTES": "i64", "PER_PROG": "i64"},
                      {"MODE": pv.MODES[mode], "STRIDE": pv.BULK if bulk else pv.LINE, "BLOCK": 32 if bulk else 128,
                       "ASM": True}, 4, ["ptr", "out_ptr"])
    want = "cp.async.bulk.prefetch.L2.global" if bulk else (
        "prefetch.global.L2::evict_last" if mode == "line_el" else "prefetch.global.L2 [")
    assert want in k.asm["ptx"] and k.asm["cubin"]


def test_spin_kernel_reads_the_global_timer():
    from scripts.gemv1_tile_variants import _compile_sm90
    k = _compile_sm90(pv._spin_kernel, {"out_ptr": "*i32", "NS": "i32"}, {"ASM": True}, 1, ["out_ptr"])
    assert k.asm["ptx"].count("%globaltimer") >= 2  # before the loop and in it


@pytest.mark.parametrize("mode", ["line", "bulk"])
def test_spin_prefetch_kernel_assembles_for_sm90(mode):
    """The stand-in that prefetches inside: the wait and the prefetch PTX in one kernel."""
    from scripts.gemv1_tile_variants import _compile_sm90
    bulk = mode == "bulk"
    k = _compile_sm90(pv._spin_prefetch_kernel,
                      {"out_ptr": "*i32", "NS": "i32", "w_ptr": "*u8", "WBYTES": "i64", "s_ptr": "*u8", "SBYTES": "i64",
                       "PER_PROG": "i64"},
                      {"MODE": pv.MODES[mode], "STRIDE": pv.BULK if bulk else pv.LINE, "BLOCK": 32 if bulk else 128,
                       "ASM": True}, 4, ["out_ptr", "w_ptr", "s_ptr"])
    ptx = k.asm["ptx"]
    assert "%globaltimer" in ptx and ("cp.async.bulk.prefetch.L2.global" if bulk else "prefetch.global.L2 [") in ptx


def test_prefetch_weight_asks_for_whole_rows_and_their_scales(monkeypatch):
    import torch
    asked = []
    monkeypatch.setattr(pv, "prefetch", lambda t, nbytes, mode: asked.append((t, nbytes, mode)))
    q = torch.zeros(100, 64, dtype=torch.uint8)  # 100 rows of K = 128
    s = torch.zeros(100, 2, dtype=torch.bfloat16)  # groups of 64
    pv.prefetch_weight(q, s, 64 * 10 + 5, "line")
    assert [(t is q, n) for t, n, _ in asked] == [(True, 640), (False, 40)]  # 10 rows, their 10 x 2 scales
    asked.clear()
    pv.prefetch_weight(q, s, 1 << 30, "bulk")
    assert [n for _, n, _ in asked] == [6400, 400]  # capped at the whole weight


def test_sweep_runs_and_checks_in_the_interpreter(tmp_path):
    out = tmp_path / "pf.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.gemv1_prefetch_variants", "--interpret", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["checks_passed"] and len(doc["shapes"]) == 6 and set(doc["layers"]) == {"sliding", "full"}
    for row in doc["shapes"]:
        assert row["bitwise_cold"] and row["rel_err"] <= 1e-2
        assert {"cold", "pf/line", "pf/line_el", "inspin/line"} <= set(row["gemv_us"])
    assert all(lay["bitwise_off"] for lay in doc["layers"].values())
    assert all({"pf_o_in", "pf_o_in+heads"} <= set(lay["us"]) for lay in doc["layers"].values())
