"""scripts/gemv1_selfq_variants.py on the CPU (Triton's interpreter, tiny shapes, no timing): the GEMV that
quantizes its own x gives the op's two-launch path's output bit for bit, both within 1e-4 of an fp32 matmul on the
dequantized weight (fp32 x in the interpreter); a bad --qb is refused with a message."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_smoke_selfq_is_the_op_bit_for_bit(tmp_path):
    out = tmp_path / "smoke.json"
    r = run_script("scripts.gemv1_selfq_variants", "--smoke", "--qb", "4,8", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["checks_passed"] and len(doc["rows"]) == 2, doc
    for row in doc["rows"]:
        assert row["bitwise"] == {"op-kernel": True, "selfq/4": True, "selfq/8": True}, row
        assert row["rel_err"] < 1e-4, row


def test_bad_qb():
    r = run_script("scripts.gemv1_selfq_variants", "--smoke", "--qb", "3", timeout=120)
    assert r.returncode == 2 and "--qb '3'" in r.stderr and "Traceback" not in r.stderr, r.stderr
