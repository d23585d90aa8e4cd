"""scripts/sweep_moe_decode.py on the CPU (Triton's interpreter, the tiny MoE preset, no timing): every word config
checked against the fp32 reference, gate / up from x's int8 levels too (`moe_int4.GATE_UP_Q`), the down kernel's
act loaded both ways (`moe_int4.DOWN_XTILE`) with the same sums, and the pair end to end."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_interpreter_rows(tmp_path):
    out = tmp_path / "sweep.json"
    r = run_script("scripts.sweep_moe_decode", "--device", "cpu", "--preset", "tiny-moe", "--sets", "2",
                   "--out", str(out), timeout=600, env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    down = [row for row in doc["rows"] if row["kind"].startswith("down")]
    assert {(tuple(row["cfg"]), row["slices"], row["xtile"]) for row in down} == {
        (cfg, sl, xt) for cfg in {tuple(row["cfg"]) for row in down} for sl in (1, 2, 4) for xt in (0, 1)}
    err = {(tuple(row["cfg"]), row["slices"], row["xtile"]): row["rel_err"] for row in down}
    assert all(err[c, s, 0] == err[c, s, 1] <= 1e-2 for c, s, _ in err), err
    assert all(row["rel_err"] <= 1e-2 for row in doc["rows"]), doc["rows"]
    assert doc["best"]["down_xtile"] in (0, 1) and [row["kind"] for row in doc["rows"]][-1] == "words"
    q = [row for row in doc["rows"] if row["kind"] == "gate_up/q"]
    assert len(q) == 5 and doc["best_gate_up_q"]["cfg"] in [row["cfg"] for row in q]
