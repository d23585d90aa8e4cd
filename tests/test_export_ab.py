"""scripts/export_ab.py's plumbing on the tiny CPU artifact (no GPU): two artifacts (here the same one
twice) decoded alternately, every step's logits compared, one JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def test_export_ab_times_both_and_compares_their_logits(tiny_artifact, tmp_path):
    out = tmp_path / "ab.json"
    model = str(tiny_artifact.out_dir)
    r = subprocess.run([sys.executable, "-m", "scripts.export_ab", "--model-a", model, "--model-b", model,
                        "--fills", "5,9", "--steps", "3", "--rounds", "2", "--profile-fill", "0",
                        "--workdir", str(tmp_path / "w"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["fills"]) == {"5", "9"} and doc["switch"] == "GEMMA4_FUSED_NORMS"
    for row in doc["fills"].values():
        assert len(row["a_ms"]) == len(row["b_ms"]) == 2
        assert row["bitwise_equal"] is True and row["max_abs_logit_diff"] == 0.0
    assert "bitwise equal" in r.stdout
    # each run reported as it ends (a timeout still leaves the rounds done)
    assert [ln.split("] ")[1].split(":")[0] for ln in r.stdout.splitlines() if "] round" in ln] == \
        ["round 1 a", "round 1 b", "round 2 a", "round 2 b"], r.stdout


def test_export_ab_wants_both_artifacts_or_none(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scripts.export_ab", "--model-a", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--model-a and --model-b go together" in r.stderr


def test_several_switches_are_set_alike_in_each_export(tmp_path, monkeypatch):
    """`--switch A,B` sets both variables to --a in one export's environment and to --b in the other's (fusions
    measured together), each export with caches of its own."""
    import argparse

    from scripts import export_ab

    envs = {}

    class Done:
        def __init__(self, cmd, env, **_):
            envs[cmd[cmd.index("--out") + 1]] = env

        def wait(self):
            return 0

    monkeypatch.setattr(export_ab.subprocess, "Popen", Done)
    args = argparse.Namespace(switch="GEMMA4_FUSED_ATTENTION,GEMMA4_FUSED_MLP", a="0", b="1", workdir=tmp_path,
                              preset="tiny", layers=1, ctx=64)
    export_ab.export_both(args)
    a, b = envs[str(tmp_path / "a")], envs[str(tmp_path / "b")]
    assert (a["GEMMA4_FUSED_ATTENTION"], a["GEMMA4_FUSED_MLP"], b["GEMMA4_FUSED_ATTENTION"], b["GEMMA4_FUSED_MLP"]) \
        == ("0", "0", "1", "1")
    assert a["TRITON_CACHE_DIR"] != b["TRITON_CACHE_DIR"] and a["TORCHINDUCTOR_CACHE_DIR"].endswith("inductor_a")
