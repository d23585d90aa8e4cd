"""scripts/read_ceiling.py without a GPU: its variants issue 16-byte loads within the register budget,
and both of its modes run under Triton's interpreter (tiny sizes), every read's xor equal to torch's
over the same words (and scales)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts import read_ceiling as rc

ROOT = Path(__file__).resolve().parents[1]


def test_rows_configs_load_16_bytes_a_thread_within_the_budget():
    cfgs = rc.rows_configs()
    assert cfgs and {c[5] for c in cfgs} == {False, True}
    for bn, sw, u, wp, waves, sc in cfgs:
        assert 4 <= bn * sw / (32 * wp) <= 64 and sw % 16 == 0


def _run(tmp_path, *extra):
    out = tmp_path / "rc.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "scripts.read_ceiling", "--interpret", "--out", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_deep_read_checks_in_the_interpreter(tmp_path):
    doc = _run(tmp_path)
    assert doc["checks_passed"] and any(r["variant"].startswith("deep") for r in doc["rows"])


def test_rows_read_checks_with_and_without_scales_in_the_interpreter(tmp_path):
    doc = _run(tmp_path, "--rows")
    assert doc["checks_passed"]
    assert {r.get("scales") for r in doc["rows"] if r["variant"].startswith("rows")} == {False, True}
