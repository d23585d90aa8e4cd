"""scripts/gemv1_selfq_variants.py on the CPU (Triton's interpreter, tiny shapes, no timing): the GEMV that
quantizes its own x gives the op's two-launch path's output bit for bit, both within 1e-4 of an fp32 matmul on the
dequantized weight (fp32 x in the interpreter), at the large weights' tile and at small ones (--tiles); a bad --qb
or --tiles is refused with a message."""

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
        assert set(row["rel_err"]) == {"op"} and row["rel_err"]["op"] < 1e-4, row


def test_smoke_small_tiles(tmp_path):
    """--tiles: the same checks at each tile (small weights get many programs), named with @tile."""
    out = tmp_path / "smoke.json"
    r = run_script("scripts.gemv1_selfq_variants", "--smoke", "--qb", "4", "--tiles", "8:2:4,16:4:8", "--out", str(out),
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in json.loads(out.read_text())["rows"]:
        assert row["bitwise"] == {f"{v}@{t}": True for t in ("8x2w4", "16x4w8") for v in ("op-kernel", "selfq/4")}, row
        assert set(row["rel_err"]) == {"op@8x2w4", "op@16x4w8"} and max(row["rel_err"].values()) < 1e-4, row


def test_bad_tiles():
    r = run_script("scripts.gemv1_selfq_variants", "--smoke", "--tiles", "8:3:4", timeout=120)
    assert r.returncode == 2 and "'8:3:4': expected BLOCK_N:GROUPS:WARPS" in r.stderr and "Traceback" not in r.stderr


def test_bad_qb():
    r = run_script("scripts.gemv1_selfq_variants", "--smoke", "--qb", "3", timeout=120)
    assert r.returncode == 2 and "--qb '3'" in r.stderr and "Traceback" not in r.stderr, r.stderr
