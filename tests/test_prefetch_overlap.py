"""scripts/prefetch_overlap.py on the CPU (Triton's interpreter, tiny shapes, no timing): attention then the
o projection against an fp32 reference on a bf16 ring and an int4 cache, the prefetching variants' outputs
bitwise the baseline's, and a bad --ctas refused with a message."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_smoke_rows(tmp_path):
    out = tmp_path / "smoke.json"
    r = run_script("scripts.prefetch_overlap", "--smoke", "--ctas", "2,5", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [(row["case"], row["kv_dtype"]) for row in doc["rows"]] == [("tiny-sliding", "bf16"), ("tiny-full", "int4")]
    for row in doc["rows"]:
        assert row["rel_err"] < 1e-5, row  # fp32 in the interpreter: attention's and the linear's own sums
        assert row["bitwise"] == {"attn|pf2+o": True, "attn|pf5+o": True}, row


def test_bad_ctas():
    r = run_script("scripts.prefetch_overlap", "--smoke", "--ctas", "a,b", timeout=120)
    assert r.returncode == 2 and "--ctas 'a,b'" in r.stderr and "Traceback" not in r.stderr, r.stderr
