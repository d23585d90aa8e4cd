"""Memory timeline of an export or a run as a PNG, optionally against the planner's peaks.

People look at pictures of memory, not logs. Two kinds of input, told apart by content:

* a CUDA allocator snapshot (pickle), recorded around the work with
      torch.cuda.memory._record_memory_history(max_entries=1_000_000)
      ...                                        # export or run
      torch.cuda.memory._dump_snapshot("export.pickle")
  -> allocated and reserved bytes over time, rebuilt from the allocator's trace;
* JSON samples, e.g. from an NVML sampler: `[[t_seconds, bytes], ...]`, `[{"t": .., "bytes": ..}]`
  or `{"samples": [...], "label": "nvml", "marks": [[t_seconds, "lowering"], ...]}`
  -> one line per file (several files may be given), marks as vertical lines.

    python scripts/plot_memory_timeline.py export.pickle nvml.json -o timeline.png \
        --plan plan.json --budget 24GiB

`--plan` takes the planner's JSON (`python -m export.gemma4.planner ... --json`) and draws the
predicted peaks (device and allocator figures). matplotlib comes with the test extra
(`pip install -e ".[test]"`); only this script needs it, and it says so when it is missing.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3

ALLOCATED_DELTA = {"alloc": 1, "free_completed": -1}
RESERVED_DELTA = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}


@dataclass
class Series:
    label: str
    t: list[float]  # seconds from the first sample
    bytes: list[int]
    marks: list[tuple[float, str]] = field(default_factory=list)
    x_unit: str = "seconds"

    @property
    def peak(self) -> tuple[float, int]:
        i = max(range(len(self.bytes)), key=self.bytes.__getitem__)
        return self.t[i], self.bytes[i]


# ---- reading ----------------------------------------------------------------------------------

def _cumulative(events: list[dict], deltas: dict[str, int], end_value: int) -> list[int]:
    """Running total of the events' signed sizes, shifted so it ends at `end_value` (the
    trace is a ring buffer: what was allocated before its first entry is only known from
    the final state)."""
    running, values = 0, []
    for e in events:
        running += deltas.get(e["action"], 0) * e.get("size", 0)
        values.append(running)
    base = end_value - running
    return [base + v for v in values]


def snapshot_series(snapshot: dict, device: int = 0) -> list[Series]:
    """Allocated and reserved bytes over time from `torch.cuda.memory._snapshot()`."""
    traces = snapshot.get("device_traces") or []
    if device >= len(traces) or not traces[device]:
        raise ValueError(f"the snapshot has no allocator trace for device {device}: record it with "
                         "torch.cuda.memory._record_memory_history() before the work")
    events = traces[device]
    segments = [s for s in snapshot.get("segments", []) if s.get("device", device) == device]
    allocated_end = sum(b["size"] for s in segments for b in s["blocks"] if b["state"].startswith("active"))
    reserved_end = sum(s["total_size"] for s in segments)
    unit = "seconds"
    if all("time_us" in e for e in events):
        t0 = events[0]["time_us"]
        t = [(e["time_us"] - t0) / 1e6 for e in events]
    else:  # a trace without times: use the event index
        t, unit = [float(i) for i in range(len(events))], "allocator event"
    return [Series("allocated (allocator)", t, _cumulative(events, ALLOCATED_DELTA, allocated_end), x_unit=unit),
            Series("reserved (allocator)", t, _cumulative(events, RESERVED_DELTA, reserved_end), x_unit=unit)]


def _where(event: dict) -> str:
    """The innermost Python frame of an allocation outside torch (its caller in this project)."""
    for f in event.get("frames") or []:
        name = f.get("filename", "")
        if name.endswith(".py") and "/torch/" not in name:
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return ""


def live_at_peak(snapshot: dict, device: int = 0, top: int = 20) -> dict:
    """The blocks alive when the allocated bytes peaked within the trace, largest first, each
    with the frame that asked for it: what a planner's activation terms are to be held to. The
    trace starts late: what was allocated before it (bound weights, the cache) is its base, known
    from the final state; blocks from before the trace are counted when freed but not listed."""
    events = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    net = best = 0
    at_best: list[tuple[int, str]] = []
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
        net += ALLOCATED_DELTA.get(e["action"], 0) * e["size"]
        if net > best:
            best, at_best = net, list(live.values())
    segments = [s for s in snapshot.get("segments", []) if s.get("device", device) == device]
    end = sum(b["size"] for s in segments for b in s["blocks"] if b["state"].startswith("active"))
    base = end - net
    blocks = sorted(at_best, key=lambda b: -b[0])
    return {"base_bytes": base, "peak_bytes": base + best,
            "live_blocks": [{"bytes": b, "where": w} for b, w in blocks[:top]],
            "live_blocks_left_out": max(len(blocks) - top, 0)}


def samples_series(obj, label: str) -> Series:
    """Samples as [[t, bytes], ...], [{"t", "bytes"}, ...] or {"samples": ..., "label", "marks"}."""
    marks = []
    if isinstance(obj, dict):
        label = obj.get("label", label)
        marks = [(float(t), str(m)) for t, m in obj.get("marks", [])]
        obj = obj.get("samples")
    if not isinstance(obj, list) or not obj:
        raise ValueError(f"{label}: expected a non-empty list of samples [[t_seconds, bytes], ...]")
    pairs = [(s["t"], s["bytes"]) if isinstance(s, dict) else tuple(s) for s in obj]
    t0 = float(pairs[0][0])
    return Series(label, [float(t) - t0 for t, _ in pairs], [int(b) for _, b in pairs],
                  [(t - t0, m) for t, m in marks])


def load_series(path: str | Path, device: int = 0) -> list[Series]:
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip (a snapshot compressed to come back from the GPU machine)
        import gzip
        raw = gzip.decompress(raw)
    if raw[:1] == b"\x80":  # pickle protocol 2+: an allocator snapshot
        return snapshot_series(pickle.loads(raw), device)
    try:
        return [samples_series(json.loads(raw), path.stem)]
    except json.JSONDecodeError:
        raise ValueError(f"{path}: neither an allocator snapshot (pickle) nor JSON samples") from None


def plan_lines(plan: dict, keys: list[str] | None = None) -> list[tuple[str, int]]:
    """(label, bytes) of the planned peaks to draw: by default the runtime peak and the
    export phase the plan says binds."""
    peaks = plan["peaks"]
    if not keys:
        export = [k for k, p in peaks.items() if p["title"] == plan.get("export_gpu_phase")]
        keys = ["runtime_gpu", *export]
    lines = []
    for k in keys:
        if k not in peaks:
            raise ValueError(f"the plan has no peak {k!r}; it has {', '.join(peaks)}")
        p = peaks[k]
        lines.append((f"plan: {p['title']}", p["total_bytes"]))
        if p["allocator_bytes"] != p["total_bytes"]:
            lines.append((f"plan: {p['title']} (allocator)", p["allocator_bytes"]))
    return lines


# ---- drawing ----------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot_memory_timeline needs matplotlib: pip install matplotlib "
                         "(or the project's test extra: pip install -e \".[test]\")") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot(series: list[Series], out: str | Path, title: str = "memory timeline",
         lines: list[tuple[str, int]] = (), budget: int | None = None) -> Path:
    """One PNG: each series over time (GiB), its peak marked, planned peaks and the budget as
    horizontal lines, marks as vertical ones."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    for s in series:
        (line,) = ax.plot(s.t, [b / GiB for b in s.bytes], label=s.label, linewidth=1.2,
                         drawstyle="steps-post")  # a value holds until the next event
        t, peak = s.peak
        ax.annotate(f"{peak / GiB:.2f} GiB", (t, peak / GiB), textcoords="offset points", xytext=(4, 4),
                    color=line.get_color(), fontsize=8)
        ax.plot([t], [peak / GiB], "o", color=line.get_color(), markersize=3)
        for mt, text in s.marks:
            ax.axvline(mt, color="grey", linewidth=0.6, linestyle=":")
            ax.text(mt, 0, f" {text}", rotation=90, fontsize=7, va="bottom", color="grey")
    for i, (label, value) in enumerate(lines):
        ax.axhline(value / GiB, linestyle="--", linewidth=0.9, color=f"C{(i + len(series)) % 10}",
                   label=f"{label} {value / GiB:.2f} GiB")
    if budget:
        ax.axhline(budget / GiB, color="red", linewidth=1.2, label=f"budget {budget / GiB:.2f} GiB")
    ax.set_xlabel(series[0].x_unit)
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def _parse_size(text: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, not only with -m
    from export.gemma4.planner import parse_size

    return parse_size(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="allocator snapshot pickles and/or JSON sample files")
    parser.add_argument("-o", "--out", required=True, help="PNG to write")
    parser.add_argument("--device", type=int, default=0, help="device index in a snapshot")
    parser.add_argument("--plan", help="the planner's JSON, to draw the predicted peaks")
    parser.add_argument("--plan-peak", action="append",
                        help="which planned peak to draw (repeatable; default: runtime_gpu and the binding export phase)")
    parser.add_argument("--budget", type=_parse_size, help="draw a budget line, e.g. 24GiB")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        series = [s for path in args.inputs for s in load_series(path, args.device)]
        lines = plan_lines(json.loads(Path(args.plan).read_text()), args.plan_peak) if args.plan else []
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_memory_timeline: {e}", file=sys.stderr)
        return 1
    out = plot(series, args.out, args.title or " + ".join(Path(p).name for p in args.inputs), lines, args.budget)
    for s in series:
        print(f"{s.label}: peak {s.peak[1] / GiB:.2f} GiB at {s.peak[0]:.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
