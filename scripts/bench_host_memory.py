"""Host memory of loading + quantizing a checkpoint, each way in a fresh process:

- naive: the whole float model, then quantize;
- streaming: quantize each unit as it is read (float source of one unit at a time);
- parked: streaming, and each quantized unit then parked on disk (export/spool.py), as a
  low-memory export does;
- export (`--export`): the whole `python -m export.gemma4 --low-memory` run (load, quantize,
  park, compile, write) from the checkpoint.

    python -m scripts.bench_host_memory --checkpoint ckpt/31b-2l --checkpoint ckpt/31b-6l \
        --device cuda --export --parallel 8 --json out/host_memory.json

Prints a table (peak RSS, quantized bytes, ratio) and, given checkpoints of two layer counts
of the same model, a linear extrapolation to the full layer count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from export.cli import positive_int, quiet_internal_warnings, run

GIB = 1 << 30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status("VmRSS")


def reset_peak_rss() -> None:
    """Restart the peak (VmHWM) from the current RSS, so import-time spikes do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(t) -> int:
    """Bytes held by a tensor, tensor subclasses (torchao) included."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "kv_cache" not in n]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def child(mode: str, checkpoint: str, device: str, group_size: int) -> dict:
    """Runs in a fresh process: load + quantize one way, report the peak."""
    import torch

    from export.backends import TargetDevice
    from export.gemma4.checkpoint import load_model
    from export.gemma4.quant import QuantRecipe, quantize_

    dev = TargetDevice(device)
    if dev is TargetDevice.CUDA:
        torch.cuda.init()
    baseline = rss_now()  # interpreter + torch + CUDA context: the fixed overhead
    reset_peak_rss()
    recipe = QuantRecipe(group_size=group_size)
    t0 = time.perf_counter()
    spool = None
    if mode == "naive":
        model = load_model(checkpoint, ctx=1024, prefill_chunk=8, dtype=torch.bfloat16)
        quantize_(model, recipe, dev)
    else:
        if mode == "parked":
            from export.spool import WeightSpool
            spool = WeightSpool(tempfile.gettempdir())

        def hook(model, unit):
            quantize_(model, recipe, dev, under=unit)
            if spool is not None:
                spool.park_module_(model.get_submodule(unit))
        model = load_model(checkpoint, ctx=1024, prefill_chunk=8, dtype=torch.bfloat16, on_unit_loaded=hook)
    wall = time.perf_counter() - t0
    return {"mode": mode, "checkpoint": checkpoint, "layers": model.cfg.num_hidden_layers,
            "peak_rss": peak_rss(), "baseline_rss": baseline, "weights_bytes": model_bytes(model),
            "wall_s": round(wall, 2)}


def export_child(checkpoint: str, device: str, autotune: bool, ctx: int = 8192) -> dict:
    """Runs in a fresh process: the whole CLI export as its only child, so the children's
    rusage is that export's peak RSS alone (its compile workers are smaller)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "export.gemma4", "--checkpoint", checkpoint, "--device", device,
               "--ctx", str(ctx), "--low-memory", "--out", os.path.join(d, "art")]
        cmd += [] if autotune else ["--no-autotune"]  # GEMM tuning does not touch host memory
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"export failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"mode": "export", "checkpoint": checkpoint, "peak_rss": peak, "wall_s": round(time.perf_counter() - t0, 2)}


def run_child(mode: str, args, checkpoint: str) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench_host_memory", "--child", mode, "--checkpoint", checkpoint,
           "--device", args.device, "--group-size", str(args.group_size), "--ctx", str(args.ctx)] \
        + (["--autotune"] if args.autotune else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(rows: list[dict], full_layers: int) -> dict | None:
    """Peak RSS at `full_layers`: overhead + weights + the transient of the largest slice.

    Weights grow linearly in the layer count (slope from the smallest and largest slice);
    the transient (peak minus what is kept) is the largest slice's. A straight line through
    the peaks themselves would be wrong: a small slice's peak is the embedding's read.
    """
    rows = sorted((r for r in rows if "layers" in r), key=lambda r: r["layers"])
    if len(rows) < 2 or rows[0]["layers"] == rows[-1]["layers"]:
        return None
    lo, hi = rows[0], rows[-1]
    if "weights_bytes" not in hi:  # whole exports: the line through the peaks
        per_layer = (hi["peak_rss"] - lo["peak_rss"]) / (hi["layers"] - lo["layers"])
        return {"per_layer_bytes": per_layer, "layers": full_layers, "weights_bytes": None, "transient_bytes": None,
                "peak_rss": hi["peak_rss"] + per_layer * (full_layers - hi["layers"])}
    slope = (hi["weights_bytes"] - lo["weights_bytes"]) / (hi["layers"] - lo["layers"])
    weights = hi["weights_bytes"] + slope * (full_layers - hi["layers"])
    transient = hi["peak_rss"] - hi["baseline_rss"] - hi["weights_bytes"]
    kept_plus_transient = hi["baseline_rss"] + weights + max(transient, 0)
    # a loader that holds float layers (naive) grows faster than its kept weights: take the
    # line through the peaks too, and report the larger
    peak_line = hi["peak_rss"] + (hi["peak_rss"] - lo["peak_rss"]) / (hi["layers"] - lo["layers"]) \
        * (full_layers - hi["layers"])
    return {"per_layer_bytes": slope, "layers": full_layers, "weights_bytes": weights,
            "transient_bytes": transient, "peak_rss": max(kept_plus_transient, peak_line)}


def table(rows: list[dict]) -> str:
    head = f"{'mode':<10} {'layers':>6} {'peak RSS GiB':>13} {'weights GiB':>12} {'overhead GiB':>13} {'(peak-ovh)/w':>13} {'s':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        w = r.get("weights_bytes")
        ovh = r.get("baseline_rss")
        ratio = (r["peak_rss"] - ovh) / w if w and ovh is not None else float("nan")
        out.append(f"{r['mode']:<10} {r.get('layers', '-'):>6} {r['peak_rss'] / GIB:>13.2f} "
                   f"{(w or 0) / GIB:>12.2f} {(ovh or 0) / GIB:>13.2f} {ratio:>13.2f} {r['wall_s']:>7.1f}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_host_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="checkpoint dir (repeat for slices)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--group-size", type=int, choices=(32, 128), default=32)
    ap.add_argument("--modes", default="naive,streaming,parked", help="comma list of naive,streaming,parked")
    ap.add_argument("--autotune", action="store_true", help="--export: with max_autotune (slow; same host memory)")
    ap.add_argument("--ctx", type=positive_int, default=8192, help="--export: the exported context")
    ap.add_argument("--parallel", type=positive_int, default=1, help="runs at once (each its own process; RSS is per process)")
    ap.add_argument("--export", action="store_true", help="also measure the whole CLI export")
    ap.add_argument("--full-layers", type=positive_int, default=60, help="layer count to extrapolate to")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.modes.split(",")) - {"naive", "streaming", "parked"}
    if unknown:
        ap.error(f"--modes: unknown {', '.join(sorted(unknown))}; use a comma list of naive,streaming,parked")
    missing = [c for c in args.checkpoint if not Path(c).is_dir()]
    if missing:
        ap.error(f"--checkpoint {missing[0]}: no such directory (python -m scripts.make_checkpoint writes one)")
    if args.child == "export":
        print(json.dumps(export_child(args.checkpoint[0], args.device, args.autotune, args.ctx)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint[0], args.device, args.group_size)))
        return
    modes = args.modes.split(",") + (["export"] if args.export else [])
    jobs = [(m, c) for c in args.checkpoint for m in modes]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda job: run_child(job[0], args, job[1]), jobs))
    for r in rows:  # an export: its checkpoint's layer count and int4 weight bytes (from a loader run)
        same = [o for o in rows if o["checkpoint"] == r["checkpoint"] and "weights_bytes" in o]
        if r["mode"] == "export" and same:
            r["layers"], r["slice_int4_bytes"] = same[0]["layers"], same[0]["weights_bytes"]
    print(table(rows))
    result = {"rows": rows, "device": args.device}
    for mode in modes:
        ex = extrapolate([r for r in rows if r["mode"] == mode], args.full_layers)
        if ex and ex["weights_bytes"] is None:
            result[f"extrapolated_{mode}"] = ex
            print(f"{mode}: peak {ex['per_layer_bytes'] / GIB:+.3f} GiB/layer -> {ex['peak_rss'] / GIB:.2f} GiB"
                  f" at {ex['layers']} layers (extrapolated)")
        elif ex:
            result[f"extrapolated_{mode}"] = ex
            print(f"{mode}: weights {ex['per_layer_bytes'] / GIB:.3f} GiB/layer -> {ex['weights_bytes'] / GIB:.2f} GiB"
                  f" + transient {ex['transient_bytes'] / GIB:.2f} -> peak {ex['peak_rss'] / GIB:.2f} GiB"
                  f" at {ex['layers']} layers (extrapolated)")
    for r in rows:
        if r.get("slice_int4_bytes"):
            print(f"export {r['layers']} layers: peak RSS {r['peak_rss'] / GIB:.2f} GiB, "
                  f"{r['peak_rss'] / r['slice_int4_bytes']:.2f} x the slice's int4 weights "
                  f"({r['slice_int4_bytes'] / GIB:.2f} GiB)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    quiet_internal_warnings()
    raise SystemExit(run(main, prog="python -m scripts.bench_host_memory"))
