"""scripts/prefetch_overlap.py on the CPU (Triton's interpreter, tiny shapes, no timing): attention then the
o projection against an fp32 reference on a bf16 ring and an int4 cache, the prefetching variants' outputs
bitwise the baseline's, and a bad --ctas refused with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_smoke_rows(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, "-m", "scripts.prefetch_overlap", "--smoke", "--ctas", "2,5", "--out", str(out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [(row["case"], row["kv_dtype"]) for row in doc["rows"]] == [("tiny-sliding", "bf16"), ("tiny-full", "int4")]
    for row in doc["rows"]:
        assert row["rel_err"] < 1e-5, row  # fp32 in the interpreter: attention's and the linear's own sums
        assert row["bitwise"] == {"attn|pf2+o": True, "attn|pf5+o": True}, row


def test_bad_ctas():
    r = subprocess.run([sys.executable, "-m", "scripts.prefetch_overlap", "--smoke", "--ctas", "a,b"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--ctas 'a,b'" in r.stderr and "Traceback" not in r.stderr, r.stderr
