"""Where an export's lowering time goes, on the CPU: a narrow model with the 31B's layer
pattern (5 sliding : 1 full, k_eq_v, no PLE) at toy width, exported in low-memory mode with
N layers under cProfile.

    python -m scripts.profile_lowering --layers 12 --prof /tmp/p12.prof [--no-profile]

Prints each stage event with its time since the start, the stage table and Inductor's own
timers (`torch._dynamo.utils.compile_times`); with --prof, writes the cProfile stats
(`python -m pstats FILE`, or `--top` to print the largest cumulative entries here).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

NARROW = "narrow-31b"


def narrow_31b(layers: int = 60):
    """The 31B's structure at toy width (every layer kind, one int4 group per row)."""
    from export.gemma4.config import PRESETS, _pattern

    return replace(PRESETS["31b"], vocab_size=512, hidden_size=64, intermediate_size=96,
                   num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                   head_dim=16, global_head_dim=32, sliding_window=8, layer_types=_pattern(layers, 6),
                   num_hidden_layers=layers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--prof", type=Path, default=None, help="write cProfile stats here")
    p.add_argument("--top", type=int, default=40, help="print this many cumulative entries")
    p.add_argument("--out", type=Path, default=None, help="artifact directory (default: a temp dir)")
    p.add_argument("--stock", action="store_true", help="stock memory mode instead of --low-memory")
    p.add_argument("--json", type=Path, default=None, help="write the stage times here")
    args = p.parse_args(argv)

    from export.gemma4.config import PRESETS
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model

    PRESETS[NARROW] = narrow_31b()
    out = args.out or Path(tempfile.mkdtemp(prefix="profile_lowering_")) / "narrow"
    cfg = ExportConfig(preset=NARROW, layers=args.layers, ctx=64, prefill_chunk=8, group_size=32,
                       device=DeviceChoice.CPU, dtype=DTypeChoice.FP32, low_memory=not args.stock, out=out)
    t0 = time.perf_counter()

    def log(event) -> None:
        what = event.detail or (f"{event.seconds:.1f} s" if event.seconds is not None else "")
        print(f"{time.perf_counter() - t0:8.1f} s  {event.stage:<22} {event.kind:<8} {what}", file=sys.stderr)

    prof = cProfile.Profile() if args.prof else None
    if prof:
        prof.enable()
    result = export_model(cfg, listeners=(log,))
    if prof:
        prof.disable()
        prof.dump_stats(args.prof)
    import torch._dynamo.utils as dutils

    print(dutils.compile_times(repr="str", aggregate=True))
    row = {"layers": args.layers, "profiled": bool(prof), "stages": {k: round(v, 2) for k, v in result.seconds.items()}}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    if prof:
        pstats.Stats(str(args.prof)).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
