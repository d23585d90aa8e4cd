"""scripts/gemv1_parts_variants.py and scripts/gemv1_cs_variants.py without a GPU: their variants
stay within the register budget and cut K into whole groups, and their runs under Triton's
interpreter (tiny stand-in shapes) check every variant (the op's kernel with K parts on its three
paths; the x-stationary prototype, K slices included) against an fp32 matmul."""

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts import gemv1_cs_variants as cs
from scripts import gemv1_parts_variants as pv

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", module, "--interpret", "--out", str(out), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_parts_candidates_fit_and_take_every_path():
    for n, k in ((5376, 8192), (43008, 5376), (5376, 21504)):
        cands = pv.candidates(n, k)
        assert {v.path for v in cands} == set(pv.PATHS)
        for v in cands:
            assert 4 <= v.block_n * v.parts * v.groups * 16 / (32 * v.warps) <= pv.MAX_WORDS_A_THREAD
            assert v.parts * v.groups <= k // pv.GROUP
    assert pv.PATHS["lane"] == (True, 0)  # x as levels through the per-lane loop: DEPTH 0 asks for it with parts


def test_cs_slices_are_whole_groups_within_the_tile():
    for k in (5376, 8192, 16384, 21504):
        for v in cs.candidates():
            splits, wps = v.splits(k)
            assert wps % cs.WORDS == 0 and wps <= v.w and splits * wps >= k // 8 and (splits - 1) * wps < k // 8


def test_parts_sweep_checks_every_path_in_the_interpreter(tmp_path):
    doc = _run("scripts.gemv1_parts_variants", tmp_path / "parts.json", "--shapes", "o_proj.sliding")
    assert doc["checks_passed"]
    got = {r["path"] for r in doc["rows"] if "path" in r}
    assert got == set(pv.PATHS) and all(r["rel_err"] <= 1e-2 for r in doc["rows"])
    # x as the other level count beside the plan
    assert {"plan", f"plan/x{pv.OTHER}"} <= {r["variant"] for r in doc["rows"]}


def test_cs_sweep_checks_its_variants_in_the_interpreter(tmp_path):
    doc = _run("scripts.gemv1_cs_variants", tmp_path / "cs.json")
    assert doc["checks_passed"] and len(doc["best"]) == 6
    assert any(r["splits"] and r["splits"] > 1 for r in doc["rows"])  # K slices and their sum ran
    assert all(r["rel_err"] <= 1e-2 for r in doc["rows"])
