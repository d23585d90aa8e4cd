"""The MoE kernel pools list first the config an export without autotune runs: for the prefill's grouped GEMMs the
fastest (within 5%) of the sweep on the H200 at the 24 GB recipe's 2048-token chunk, for the routing logits the
fastest at 512 tokens and within 20% of it at 2048 (scripts/moe_prefill_variants.py,
scripts/measurements/moe_prefill_variants.json)."""

from __future__ import annotations

import json
from pathlib import Path

from export.kernels import moe_int4 as mo

SWEEP = Path(__file__).parent.parent / "scripts" / "measurements" / "moe_prefill_variants.json"


def _rows(kernel: str, m: int) -> dict[str, float]:
    doc = json.loads(SWEEP.read_text())
    return {r["config"]: r["us"] for r in doc["rows"] if r["kernel"] == kernel and r["m"] == m and "us" in r}


def test_the_routing_pool_runs_its_fastest_swept_config_first():
    c = mo.ROUTE_CONFIGS[0]
    k = c.kwargs
    tag = f"t{k['BLOCK_T']}e{k['BLOCK_E']}h{k['BLOCK_H']}w{c.num_warps}s{c.num_stages}"
    for m, slack in ((2048, 1.2), (512, 1.01)):  # one config for every chunk: the best at 512, near it at 2048
        rows = _rows("route_logits", m)
        assert tag in rows and rows[tag] <= slack * min(rows.values()), (m, tag, rows)
        assert rows[tag] < 0.4 * rows["t16e16h128w4s2"]  # what the one-config mode ran before


def test_the_grouped_pool_runs_its_fastest_swept_config_first():
    c = next(c for c in mo.GROUPED_CONFIGS if 64 % c.kwargs["BLOCK_K"] == 0)  # the 26B-A4B's down groups are 64
    k = c.kwargs
    tag = f"t{k['TILE']}n{k['BLOCK_N']}k{k['BLOCK_K']}w{c.num_warps}s{c.num_stages}" + ("j" if k["JOIN"] else "")
    rows = _rows("grouped", 2048)
    assert tag in rows and rows[tag] <= 1.05 * min(rows.values()), (tag, rows)
