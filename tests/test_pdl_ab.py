"""scripts/pdl_ab.py's plumbing on the tiny CPU artifact (no GPU, so no PDL: the runs with and
without the switch, or with it for some kernel families, must agree bit for bit, and the script must say
so)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_pdl_ab_runs_both_ways_and_compares_every_step(tiny_artifact, tmp_path):
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, "-m", "scripts.pdl_ab", "--model", str(tiny_artifact.out_dir),
                        "--fills", "5,9", "--steps", "4", "--only", "_int4_gemv1_kernel", "--only", "_quant_x,_attn_body",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bitwise_equal"] is True and set(doc["fills"]) == {"5", "9"}
    assert doc["only_sets"] == ["_int4_gemv1_kernel", "_quant_x,_attn_body"]
    for row in doc["fills"].values():
        assert len(row["off_ms"]) == len(row["on_ms"]) == 2 and row["max_abs_logit_diff"] == 0.0
        assert [len(t) for t in row["only_sets_ms"]] == [2, 2]


def test_every_run_is_its_own_and_each_set_gets_two():
    """With three or more `--only` sets no run may stand for another (a set's second round once took
    the name of the third set's first)."""
    from scripts.pdl_ab import run_order

    for n in range(5):
        order = run_order(n)
        assert len(order) == len(set(order)) == 2 * (n + 2)
        for mode in ("off", "on", *range(n)):
            assert [r for m, r in order if m == mode] == [1, 2]
