"""Programmatic dependent launch for the M == 1 GEMV (export/kernels/int4_matmul.py `_pdl_wait`,
scripts/gemv1_pdl_variants.py) without a GPU: PDL off compiles for sm_90 to the same PTX and SASS as
the argument left out; with PDL the GEMV's weight tiles load before `griddepcontrol.wait` and every
read of x and every write after it, the quantize kernel waits before anything; the script's run in
Triton's interpreter (which runs no inline PTX: the variants' plumbing, the checks and the replays)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gemv1_pdl_variants as pv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("offline compiles need Triton's compiler, not its interpreter")
    return {pdl: pv.compile_sm90(pdl) for pdl in (None, 0, 1, 2)}


def test_pdl_off_is_the_default_and_compiles_no_grid_dependency_code(compiled):
    for name in ("gemv", "quant"):
        assert compiled[0][name]["ptx"] == compiled[None][name]["ptx"]
        assert compiled[0][name]["sass"] == compiled[None][name]["sass"]
        assert "griddepcontrol" not in compiled[0][name]["ptx"]
        assert "griddepcontrol" in compiled[1][name]["ptx"]
    off = pv.sass_order(compiled[0]["gemv"]["sass"])
    assert "wait" not in off and "release" not in off
    assert "ldg32nc" in off  # x's factor and correction through the non-coherent cache, as before


@pytest.mark.parametrize("pdl", [1, 2])
def test_pdl_gemv_loads_weights_before_the_wait_and_x_after(compiled, pdl):
    order = pv.sass_order(compiled[pdl]["gemv"]["sass"])
    assert order.count("wait") == 1 and order.count("release") == 1
    w = order.index("wait")
    before, after = order[:w], order[w + 1:]
    # the first tile: 128 rows x 2 groups of 16 words, 4 warps -> 8 16-byte loads a thread
    assert before.count("ldg128") == 8
    assert not any(t in ("ldg32", "ldg32nc", "stg", "atom") for t in before)
    assert "ldg32" in after and "ldg32nc" not in order  # x's words after the wait, none non-coherent
    assert "atom" in after and "stg" in after  # the split sum's counter and the outputs
    assert (order.index("release") < w) == (pdl == 1)  # dependents released first thing, or after the wait


@pytest.mark.parametrize("pdl", [1, 2])
def test_pdl_quantize_waits_before_any_global_access(compiled, pdl):
    order = pv.sass_order(compiled[pdl]["quant"]["sass"])
    w = order.index("wait")
    assert all(t == "release" for t in order[:w]) and order.count("wait") == 1
    assert (order.index("release") < w) == (pdl == 1)
    assert "stg" in order[w:] and any(t.startswith("ldg") for t in order[w:])


def test_sass_order_reads_the_tags():
    sass = """
        /*0000*/                   LDG.E.128 R52, desc[UR14][R52.64] ;
        /*0010*/                   PREEXIT ;
        /*0020*/              @!P0 LDG.E.U16.CONSTANT R21, desc[UR14][R6.64] ;
        /*0030*/                   ACQBULK ;
        /*0040*/                   LDG.E.CONSTANT R11, desc[UR14][R8.64] ;
        /*0050*/                   LDG.E R12, desc[UR14][R8.64] ;
        /*0060*/              @P1 ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR4][R2.64], R5 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R7 ;
    """
    assert pv.sass_order(sass) == ["ldg128", "release", "ldg16nc", "wait", "ldg32nc", "ldg32", "atom", "stg"]


def test_variants_run_bitwise_in_the_interpreter(tmp_path):
    """The script's run on tiny stand-ins of the sliding layer: every variant (PDL's code not run in
    the interpreter) bitwise the launches of today on a ragged shape, on each projection and in the
    layer's replays, within fp32 error, the split counters back at 0."""
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.gemv1_pdl_variants", "--smoke", "--layers", "sliding",
                        "--budget", "100000", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    doc = json.loads(out.read_text())
    variants = list(pv.VARIANTS)
    assert list(doc["variants"]) == variants
    assert doc["checks_passed"] and doc["ragged"]["checks"] == 2 * 2 * len(variants) and not doc["ragged"]["bad"]
    assert {s["shape"] for s in doc["shapes"]} == {"qkv_proj.sliding", "o_proj.sliding", "mlp.gate_up_proj",
                                                   "mlp.down_proj"}
    for s in doc["shapes"]:
        assert set(s["checks"]) == set(variants) and set(s["us"]) == {*variants, "x only"}
        assert all(c["rel_err"] < 1e-4 and c["bitwise_off"] and c["counters_zero"] for c in s["checks"].values())
    rc = doc["layers"]["sliding"]["replay_checks"]
    assert rc["reps"] >= 2 and not any(rc["mismatches"].values()) and not any(rc["counter_not_zero"].values())
    assert all(n == 3 for n in rc["counter_buffers"].values())  # qkv, o and down split K; gate/up does not
    assert rc["off_worst_rel_err"] < 1e-4
