"""scripts/decode_combine_variants.py on the CPU (Triton's interpreter, tiny shapes): every row's
variants against the fp32 reference, the fp16 partials within fp16's rounding of the fp32 ones, the
merged ones (no combine launch) as close as the op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_rows_match_the_reference(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "scripts.decode_combine_variants", "--smoke", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(row["layer"], row["kv_dtype"]) for row in rows} == {
        ("tiny-full", "bf16"), ("tiny-full", "int8"), ("tiny-full", "int4"), ("tiny-sliding", "bf16")}
    for row in rows:
        assert row["op_rel_err"] < 1e-5, row  # fp32 in the interpreter: the kernels' own sums
        assert row["h16_rel_err"] < 1e-3, row  # fp16 partials: ~2^-11 of each share's output
        assert 0 < row["h16_vs_op"], row  # the partials did go through fp16
        for var in ("m4", "m8", "m16", "mall"):  # merged by the split kernel: the same sums, other order
            assert row[f"{var}_rel_err"] < 1e-5, (var, row)
