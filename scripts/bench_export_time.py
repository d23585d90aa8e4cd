"""Export wall time by stage, through the CLI with its defaults: one fresh process per run.

    python -m scripts.bench_export_time --layers 60 --layers 12 \
        --json scripts/measurements/export_time_31b.json

Each run is `python -m export.gemma4 --preset 31b --low-memory --ctx 131072 [--layers N]
--out DIR` (device auto, autotune on, the prefill chunk the CLI fits), timed by the
exporter's own stages (the JSON summary it prints: `seconds`, `peak_gib`). The JSON gets one
record per run under "runs" (`layers`, `ctx`, `total_s`, `stages` name -> seconds,
`gpu_allocator_gib`, `host_rss_gib`, `wall_s`) and the deepest run's record at the top level;
runs already in the file for other layer counts are kept. The stderr of each run (its
heartbeat lines among them) is kept beside the JSON as `export_time_<layers>l.log`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(preset: str, layers: int | None, ctx: int, extra: list[str], log: Path, out: Path | None = None) -> dict:
    out = out or Path(tempfile.mkdtemp(prefix="bench_export_time_")) / "artifact"
    cmd = [sys.executable, "-m", "export.gemma4", "--preset", preset, "--low-memory", "--ctx", str(ctx),
           "--out", str(out), *extra] + (["--layers", str(layers)] if layers else [])
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    stages = {k: v for k, v in summary["seconds"].items() if k != "total"}
    return {"layers": layers, "ctx": ctx, "total_s": summary["seconds"]["total"], "stages": stages,
            "gpu_allocator_gib": summary["peak_gib"].get("gpu_allocator"),
            "host_rss_gib": summary["peak_gib"]["host_rss"], "wall_s": round(wall, 1),
            "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="31b")
    p.add_argument("--layers", type=int, action="append", help="repeat for several runs (default: the full model)")
    p.add_argument("--ctx", type=int, default=131072)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("extra", nargs="*", help="more exporter flags, after --")
    args = p.parse_args(argv)

    old = json.loads(args.json.read_text()).get("runs", []) if args.json.is_file() else []
    runs = {r["layers"]: r for r in old}
    from export.gemma4.config import PRESETS

    full = PRESETS[args.preset].num_hidden_layers
    for layers in args.layers or [full]:
        log = args.json.with_name(f"export_time_{layers}l.log")
        rec = run_one(args.preset, None if layers == full else layers, args.ctx, args.extra, log)
        rec["layers"] = layers
        runs[layers] = rec
        print(f"{layers:>3} layers: total {rec['total_s']:.0f} s " +
              " ".join(f"{k} {v:.0f}" for k, v in rec["stages"].items()) +
              f" | GPU allocator {rec['gpu_allocator_gib']} GiB, host RSS {rec['host_rss_gib']} GiB", flush=True)
    ordered = [runs[k] for k in sorted(runs, reverse=True)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**ordered[0], "runs": ordered}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
