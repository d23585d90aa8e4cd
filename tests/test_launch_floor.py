"""scripts/launch_floor.py on the CPU (Triton's interpreter, a short chain, no timing): every variant's chain
ends where its dependent launches lead and every `work` output is its weights' sum; bad --programs refused."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_smoke_rows(tmp_path):
    out = tmp_path / "smoke.json"
    r = run_script("scripts.launch_floor", "--interpret", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(row["programs"], row["work"], row["pdl"]) for row in rows} == {
        (p, w, d) for p in (1, 2) for w, d in (("none", 0), ("none", 2), ("late", 0), ("late", 2), ("early", 2))}
    assert all(row["ok"] for row in rows), rows


def test_bad_programs():
    r = run_script("scripts.launch_floor", "--programs", "a,b", timeout=120)
    assert r.returncode == 2 and "--programs 'a,b'" in r.stderr and "Traceback" not in r.stderr, r.stderr
