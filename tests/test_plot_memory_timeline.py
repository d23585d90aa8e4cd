"""scripts/plot_memory_timeline.py: series rebuilt from an allocator trace and from samples."""

import json
import pickle
import sys

import pytest

from export.gemma4 import planner as P
from export.gemma4.config import PRESETS
from scripts import plot_memory_timeline as M

MiB = 1024**2


def snapshot():
    """Before the trace starts 10 MiB is already allocated in a 20 MiB segment; the trace
    then allocates 30 MiB in a new 32 MiB segment, frees it, frees the segment."""
    events = [
        {"action": "segment_alloc", "size": 32 * MiB, "time_us": 1_000_000},
        {"action": "alloc", "size": 30 * MiB, "time_us": 1_500_000},
        {"action": "free_requested", "size": 30 * MiB, "time_us": 2_000_000},
        {"action": "free_completed", "size": 30 * MiB, "time_us": 2_000_000},
        {"action": "segment_free", "size": 32 * MiB, "time_us": 3_000_000},
    ]
    segment = {"device": 0, "total_size": 20 * MiB,
               "blocks": [{"size": 10 * MiB, "state": "active_allocated"}, {"size": 10 * MiB, "state": "inactive"}]}
    return {"segments": [segment], "device_traces": [events]}


def test_snapshot_series_rebuilds_allocated_and_reserved():
    allocated, reserved = M.snapshot_series(snapshot())
    assert allocated.t == [0.0, 0.5, 1.0, 1.0, 2.0]
    assert allocated.bytes == [10 * MiB, 40 * MiB, 40 * MiB, 10 * MiB, 10 * MiB]
    assert reserved.bytes == [52 * MiB, 52 * MiB, 52 * MiB, 52 * MiB, 20 * MiB]
    assert allocated.peak == (0.5, 40 * MiB)


def test_live_at_peak_lists_the_blocks_alive_at_the_traces_peak():
    """Base 10 MiB; the trace allocates 30 (linear.py) and 5 MiB (attention.py), frees the 30,
    allocates 20: the peak (45 MiB) holds the 30 and the 5, not the 20 that came later."""
    here = [{"filename": "/site/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/repo/export/kernels/int4_matmul.py", "line": 7, "name": "launch"}]
    events = [
        {"action": "alloc", "addr": 1, "size": 30 * MiB, "frames": here},
        {"action": "alloc", "addr": 2, "size": 5 * MiB, "frames": [{"filename": "attention.py", "line": 3, "name": "f"}]},
        {"action": "free_requested", "addr": 1, "size": 30 * MiB},
        {"action": "free_completed", "addr": 1, "size": 30 * MiB},
        {"action": "alloc", "addr": 3, "size": 20 * MiB},
    ]
    segment = {"device": 0, "total_size": 64 * MiB,
               "blocks": [{"size": 10 * MiB, "state": "active_allocated"}, {"size": 5 * MiB, "state": "active_allocated"},
                          {"size": 20 * MiB, "state": "active_allocated"}]}
    got = M.live_at_peak({"segments": [segment], "device_traces": [events]}, top=1)
    assert got["base_bytes"] == 10 * MiB and got["peak_bytes"] == 45 * MiB
    assert got["live_blocks"] == [{"bytes": 30 * MiB, "where": "int4_matmul.py:7 launch"}]
    assert got["live_blocks_left_out"] == 1


def test_snapshot_without_trace_is_a_clear_error():
    with pytest.raises(ValueError, match="_record_memory_history"):
        M.snapshot_series({"segments": [], "device_traces": [[]]})


def test_samples_forms(tmp_path):
    a = M.samples_series([[10.0, 1], [10.5, 3]], "x")
    b = M.samples_series([{"t": 10.0, "bytes": 1}, {"t": 10.5, "bytes": 3}], "x")
    c = M.samples_series({"label": "nvml", "samples": [[10.0, 1], [10.5, 3]], "marks": [[10.2, "lower"]]}, "x")
    assert a.t == b.t == c.t == [0.0, 0.5] and a.bytes == b.bytes == c.bytes == [1, 3]
    assert c.label == "nvml" and c.marks == [(pytest.approx(0.2), "lower")]
    with pytest.raises(ValueError, match="non-empty list"):
        M.samples_series({"samples": []}, "x")
    (tmp_path / "bad.json").write_text("nope")
    with pytest.raises(ValueError, match="neither"):
        M.load_series(tmp_path / "bad.json")


def test_plan_lines_default_to_runtime_and_binding_export_phase():
    p = P.plan(P.PlanInputs(PRESETS["31b"], ctx=8192)).to_dict()
    labels = [label for label, _ in M.plan_lines(p)]
    assert labels[0] == "plan: runtime GPU" and f"plan: {p['export_gpu_phase']}" in labels
    with pytest.raises(ValueError, match="no peak"):
        M.plan_lines(p, ["nope"])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    snap = tmp_path / "s.pickle"
    snap.write_bytes(pickle.dumps(snapshot()))
    samples = tmp_path / "nvml.json"
    samples.write_text(json.dumps({"label": "nvml", "samples": [[0, 5 * MiB], [1, 60 * MiB], [2, 30 * MiB]]}))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(P.plan(P.PlanInputs(PRESETS["tiny"], ctx=64)).to_dict()))
    out = tmp_path / "t.png"
    assert M.main([str(snap), str(samples), "-o", str(out), "--plan", str(plan), "--budget", "64MiB"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        M._pyplot()
