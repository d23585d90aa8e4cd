"""Each Gemma 4 variant's full model with the 24 GB recipe: export, runtime at its max context, slice parity.

    python -m scripts.bench_variants --json scripts/measurements/variants.json          # e2b, e4b, 26b-a4b
    python -m scripts.bench_variants --variant e2b --stages export --workdir /tmp/var --json ...
    python -m scripts.bench_variants --variant e2b --stages runtime,slice --workdir /tmp/var --json ...
    python -m scripts.bench_variants --variant tiny --ctx 256 --device cpu --prompt 64 --new-tokens 8 \
        --json out/variants.json                                                         # the code path on a CPU

Per variant, in stages (each adds its fields to the variant's record in the JSON, under a lock, so
stages of different variants may run side by side; other variants' records are kept):
1. export: `python -m export.gemma4 --preset P --low-memory --ctx MAX --kv-dtype auto
   --embedding-quant int8 --no-autotune` (the 24 GB recipe: the most precise KV cache and the largest
   prefill chunk the CLI fits to 22 GiB, `kv_dtype` the cache it took;
   `--autotune` for the CLI's default tuning), one fresh process, timed by the exporter's own stages:
   `export_s`, `export_gpu_gib` (allocator peak), `export_host_gib` (peak RSS); then the planner's
   runtime figure for the same flags (`--plan`): `plan_gib`, device total with the CUDA context.
2. runtime, in a process of its own under the NVML sampler: load, a warm-up prefill and decode, then
   a `--prompt`-token prefill from position 0 (`prefill_tok_s`) and `--new-tokens` greedy decode steps
   after it, CUDA-graph replayed as the runner decodes (`decode_tok_s`); `runtime_peak_gib` is this
   process's NVML peak (allocator peak beside it). The floor (`floor_tok_s`): the copy bandwidth
   measured in the same process over the bytes a decode step must read at that position: every bound
   weight but gather-only tables (embedding rows), only the top-k of the experts (k / E of each expert
   stack), and the filled KV (full layers: the position; rings: the window).
3. slice (CUDA): the variant's first two layers exported in-process without autotune, the runner's
   logits (prefill chunks, then decode steps) against the eager model with the same quantized weights
   (tests/test_export_cuda.py's harness; the eager models run the ops' plain-torch references, so no
   Triton kernel is compiled outside the artifact): `slice_rel_err` is the worst step against the
   eager bf16 model, `slice_rel_err_steps` also holds both against the fp32 model with the same
   dequantized weights, and `slice_parity_ok` says the artifact is no further from it than twice the
   eager bf16 model (+0.5%); `slice_export_gpu_gib` / `slice_export_nvml_gib` the slice export's
   allocator and device peaks.

Table on stdout; JSON keyed by variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# the 24 GB recipe (README): int8 embedding, the cache `--kv-dtype auto` fits to the default 22 GiB budget
RECIPE = ("--kv-dtype", "auto", "--embedding-quant", "int8")
DEFAULT_VARIANTS = ("e2b", "e4b", "26b-a4b")
SLICE_CASES = {"e2b": "e2b-2l-int4-noat", "e4b": "e4b-2l-int4-noat", "26b-a4b": "26b-2l-int4-noat",
               "31b": "31b-2l-int4-noat"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def max_ctx(preset: str) -> int:
    from export.gemma4.config import PRESETS

    return PRESETS[preset].max_position_embeddings


def expert_fraction(preset: str) -> float:
    """The share of each expert stack a decode step reads: top-k of E experts (1 without MoE)."""
    from export.gemma4.config import PRESETS

    cfg = PRESETS[preset]
    return cfg.top_k_experts / cfg.num_experts if cfg.enable_moe_block else 1.0


def export_variant(preset: str, ctx: int, out: Path, args: argparse.Namespace, log_path: Path) -> dict:
    from scripts.bench_export_time import run_one

    extra = [*RECIPE, "--device", args.device, "--autotune" if args.autotune else "--no-autotune"]
    rec = run_one(preset, None, ctx, extra, log_path, out=out)
    return {"export_s": rec["total_s"], "export_gpu_gib": rec["gpu_allocator_gib"],
            "export_host_gib": rec["host_rss_gib"], "export_stages_s": rec["stages"], "export_wall_s": rec["wall_s"],
            "export_command": rec["command"]}


def measure_runtime(model_dir: Path, prompt: int, new_tokens: int, fraction: float, snapshot: bool = False) -> dict:
    """In a process of its own (scripts.bench_runtime.in_child): see the module docstring, step 3.
    `snapshot`: the allocator's trace of the timed prefill and decode, reduced to the blocks alive
    at its peak (`memory_at_peak`; slower, so its times are not the ones to quote)."""
    from runtime.artifact import Artifact
    from runtime.memory import PeakSampler
    from runtime.runner import Runner, resolve_device
    from scripts.bench_runtime import chain_reference_us, copy_bandwidth, decode_read_bytes, decode_steps, timed_prefill

    artifact = Artifact.open(model_dir)
    meta = artifact.metadata
    device = resolve_device(meta.device, None)
    ids = torch.randint(3, meta.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    with PeakSampler(device) as mem:
        t = time.perf_counter()
        runner = Runner(artifact)
        load_s = time.perf_counter() - t
        runner.prefill(ids[: min(prompt, 2 * meta.prefill_chunk + 3)])  # first calls: a whole and a partial chunk
        decode_steps(runner, runner.decode(ids[0]), 4)
        runner.reset()
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        logits, seconds = timed_prefill(runner, ids)
        dec = decode_steps(runner, logits, new_tokens)
        if snapshot:
            from scripts.plot_memory_timeline import live_at_peak

            at_peak = live_at_peak(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
        read = decode_read_bytes(runner, prompt + new_tokens // 2, meta.raw["sliding_window"], fraction)
        del runner
    bw = copy_bandwidth(device, nbytes=2 << 30 if device.startswith("cuda") else 1 << 28)
    step_bytes = sum(read.values())
    gib = 2**30
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "ctx": meta.ctx,
        "kv_dtype": meta.raw.get("kv_dtype"),
        "prefill_chunk": meta.prefill_chunk, "load_s": load_s, "prompt": prompt, "new_tokens": new_tokens,
        "prefill_tok_s": prompt / seconds, "decode_ms": dec["ms_per_token"], "decode_median_ms": dec["median_ms"],
        "decode_tok_s": 1e3 / dec["ms_per_token"], "copy_gbps": bw / 1e9, "bytes_read_per_token": read,
        "floor_tok_s": bw / step_bytes, "chain_us_per_kernel": chain_reference_us(device),
        "runtime_peak_gib": (mem.peak.nvml_process_bytes or mem.peak.allocator_bytes) / gib,
        "runtime_allocator_peak_gib": mem.peak.allocator_bytes / gib,
        "runtime_reserved_peak_gib": mem.peak.reserved_bytes / gib,
        "runtime_nvml_device_peak_gib": None if mem.peak.nvml_bytes is None else mem.peak.nvml_bytes / gib,
        **({"memory_at_peak": at_peak} if snapshot else {}),
    }


def slice_parity(preset: str) -> dict:
    """The first two layers through tests/test_export_cuda.py's measured export and parity."""
    from tests.test_export_cuda import case_config, measure

    case = SLICE_CASES[preset]
    # the eager models run the ops' plain-torch references: no Triton kernel compiles in eager calls
    rec = measure(case_config(case, Path(tempfile.mkdtemp(prefix=f"variant_slice_{preset}_")) / "art"), fp32=True,
                  reference_ops=True)
    errs = rec["rel_err"]
    return {"slice_case": case, "slice_rel_err": max(errs["compiled_vs_eager"]), "slice_rel_err_steps": errs,
            "slice_parity_ok": rec["parity_ok"], "slice_export_s": rec["export_s"],
            "slice_export_gpu_gib": rec["gpu_allocator_peak_gib"], "slice_export_nvml_gib": rec["gpu_nvml_peak_gib"],
            "slice_eager_ops": rec["eager_ops"]}


STAGES = ("export", "runtime", "slice")


def bench_variant(preset: str, stage: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One stage's fields of a variant's record (the artifact lives in workdir/preset)."""
    from scripts.bench_runtime import in_child, plan_gib

    ctx = args.ctx or max_ctx(preset)
    out = workdir / preset
    if stage == "export":
        log(f"{preset}: export at ctx {ctx}")
        rec = {"ctx": ctx, "recipe": " ".join(RECIPE), "autotune": args.autotune,
               **export_variant(preset, ctx, out, args, workdir / f"export_{preset}.log")}
        log(f"{preset}: exported in {rec['export_s']:.0f} s, GPU {rec['export_gpu_gib']} GiB, "
            f"host {rec['export_host_gib']} GiB")
        plan = plan_gib(preset, None, ctx, RECIPE[1], RECIPE[3], args.device)
        return {**rec, "plan_gib": plan["total_gib"], "plan_allocator_gib": plan["allocator_gib"],
                "plan_items": plan["items"]}
    if stage == "runtime":
        if not (out / "model.pte").is_file():
            raise SystemExit(f"{out}: no artifact; run --stages export first with the same --workdir")
        log(f"{preset}: runtime")
        return in_child(measure_runtime, out, args.prompt, args.new_tokens, expert_fraction(preset),
                        args.snapshot and args.device == "cuda")
    if preset in SLICE_CASES and args.device == "cuda":
        log(f"{preset}: 2-layer slice parity")
        return in_child(slice_parity, preset)
    return {}


def derived(rec: dict) -> dict:
    if "runtime_peak_gib" in rec and "plan_gib" in rec:
        rec["peak_over_plan"] = rec["runtime_peak_gib"] / rec["plan_gib"]
    if "decode_tok_s" in rec:
        rec["fraction_of_floor"] = rec["decode_tok_s"] / rec["floor_tok_s"]
    return rec


def merge_record(path: Path, preset: str, fields: dict) -> dict:
    """Read-modify-write of one variant's record under a lock (stages may run side by side)."""
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # the directory itself: no lock file left beside the JSON
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recs = json.loads(path.read_text()) if path.is_file() else {}
        # the process's GEMMA4_* switches (an export's fusions and kernel choices; the stages run with the same)
        switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("GEMMA4_")}
        recs[preset] = derived({**recs.get(preset, {}), "variant": preset, **fields, "switches": switches})
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(recs, indent=1))
        tmp.replace(path)  # a stage finished is never lost to a later one's failure
    finally:
        os.close(lock)
    return recs


def print_table(recs: dict[str, dict]) -> None:
    def f(r, key, fmt, scale=1.0):
        v = r.get(key)
        return "-" if v is None else format(v * scale if scale != 1 else v, fmt)

    cols = [("variant", "variant", "s", 1, 9), ("ctx", "ctx", "d", 1, 7), ("export s", "export_s", ".0f", 1.0, 8),
            ("exp GPU", "export_gpu_gib", ".2f", 1.0, 7), ("exp host", "export_host_gib", ".2f", 1.0, 8),
            ("plan", "plan_gib", ".2f", 1.0, 6), ("peak", "runtime_peak_gib", ".2f", 1.0, 6),
            ("pk/plan", "peak_over_plan", ".3f", 1.0, 7), ("dec tok/s", "decode_tok_s", ".1f", 1.0, 9),
            ("floor", "floor_tok_s", ".1f", 1.0, 7), ("%floor", "fraction_of_floor", ".1f", 100.0, 6),
            ("prefill", "prefill_tok_s", ".0f", 1.0, 8), ("slice err", "slice_rel_err", ".2e", 1.0, 9)]
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _, _, _, w) in enumerate(cols)))
    for r in recs.values():
        print(" ".join(f"{f(r, k, fmt, sc):>{w}}" if i else f"{f(r, k, fmt, sc):<{w}}"
                       for i, (_, k, fmt, sc, w) in enumerate(cols)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--variant", action="append", help=f"preset, repeatable (default: {', '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--ctx", type=int, help="context of every export (default: each model's max_position_embeddings)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--prompt", type=int, default=2048, help="prefill prompt length; decode follows it (default 2048)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of export,runtime,slice (default: all); a later stage run alone "
                        "finds the artifact under the same --workdir and adds its fields to the variant's record")
    p.add_argument("--autotune", action="store_true",
                   help="export with Inductor max_autotune (the CLI default; off here: it tunes every bf16 GEMM "
                        "of the prefill units, minutes per unit on the E models)")
    p.add_argument("--snapshot", action="store_true",
                   help="runtime stage on CUDA: record the allocator's trace and keep the blocks alive at its peak "
                        "(`memory_at_peak`, to hold the planner's terms to); its times are slower")
    p.add_argument("--workdir", type=Path, help="artifacts and export logs (default: a new temporary directory)")
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from export.gemma4.config import PRESETS

    variants = args.variant or list(DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in PRESETS]
    if unknown:
        raise SystemExit(f"--variant {', '.join(unknown)}: not a preset (one of {', '.join(sorted(PRESETS))})")
    stages = [x for x in args.stages.split(",") if x]
    if not stages or set(stages) - set(STAGES):
        raise SystemExit(f"--stages {args.stages}: expected a comma-separated subset of {','.join(STAGES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_variants_"))
    workdir.mkdir(parents=True, exist_ok=True)
    recs = {}
    for preset in variants:
        for stage in STAGES:
            if stage in stages:
                recs = merge_record(args.json, preset, bench_variant(preset, stage, args, workdir))
    print_table({k: v for k, v in recs.items() if k in variants})
    return 0


if __name__ == "__main__":
    sys.exit(main())
