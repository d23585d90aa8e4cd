"""scripts/decode_combine_variants.py on the CPU (Triton's interpreter, tiny shapes): every row's
variants against the fp32 reference (forced share counts too, one share without a combine), the fp16
partials within fp16's rounding of the fp32 ones."""

from __future__ import annotations

import json

from tests.helpers import run_script


def test_smoke_rows_match_the_reference(tmp_path):
    out = tmp_path / "smoke.json"
    r = run_script("scripts.decode_combine_variants", "--smoke", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(row["layer"], row["kv_dtype"]) for row in rows} == {
        ("tiny-full", "bf16"), ("tiny-full", "int8"), ("tiny-full", "int4"), ("tiny-sliding", "bf16")}
    for row in rows:
        assert row["op_rel_err"] < 1e-5, row  # fp32 in the interpreter: the kernels' own sums
        assert row["h16_rel_err"] < 1e-3, row  # fp16 partials: ~2^-11 of each share's output
        assert 0 < row["h16_vs_op"], row  # the partials did go through fp16
        for n in (1, 4, 16, 64):  # shares forced (one: the split kernel writes the output, no combine)
            assert row[f"s{n}+pdl_rel_err"] < 1e-5, (n, row)


def test_unknown_variant_is_refused_before_any_kernel_runs():
    r = run_script("scripts.decode_combine_variants", "--variants", "op,nope", timeout=120)
    assert r.returncode == 2 and "--variants: unknown ['nope']" in r.stderr, r.stderr[-2000:]
