"""`python -m export.gemma4`: export a Gemma 4 text model to model.pte + model.ptd.

Every flag is one field of `ExportConfig` (export/gemma4/options.py). With no arguments it
exports the `tiny` preset (random weights) for whatever device exists into out/tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch starts CUDA: the caching allocator grows segments in place instead of cutting
# new ones, so memory freed by one compile-time buffer fits the next (H100, 31B slice: 1.6 GiB
# reserved beyond the allocator peak without it). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
from dataclasses import fields, replace
from pathlib import Path

from export.backends.options import TargetDevice
from export.cli import quiet_internal_warnings, run
from export.gemma4.export import export_model
from export.gemma4.flags import add_export_arguments, export_fields
from export.gemma4.options import ExportConfig, ExportConfigError, KvDtype, check_ctx, check_kv_dtype, model_config, resolve
from export.gemma4.planner import (
    DEFAULT_GPU_BUDGET,
    Budget,
    DoesNotFit,
    PlanInputs,
    fit_prefill_chunk,
    inputs_for,
    plan,
    render_table,
    resolve_ctx_and_kv,
    size_arg,
)
from export.pipeline import lowering_phase
from export.stages import Heartbeat, ProgressBars

EPILOG = """\
examples:
  python -m export.gemma4                                   # tiny preset, any device -> out/tiny
  python -m export.gemma4 --checkpoint ~/gemma-4-31b-it --ctx 8192 --out out/31b
  python -m export.gemma4 --preset 31b --device cuda --quant int4 --group-size 128

The artifact (see export/ARTIFACT.md): model.pte holds one AOTInductor .so per method
(prefill, decode) and a `metadata` constant method (JSON); model.ptd holds every weight once,
keyed by its name in the model. A failed or killed export leaves no partial directory.
"""


def build_parser() -> argparse.ArgumentParser:
    d = ExportConfig()
    p = argparse.ArgumentParser(prog="python -m export.gemma4", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    add_export_arguments(src, ("checkpoint", "preset"))
    add_export_arguments(p, tuple(f.name for f in fields(ExportConfig) if f.name not in ("checkpoint", "preset")),
                         ctx=dict(type=str, default=str(d.ctx),
                                  help="max tokens per sequence = full-attention KV length (default %(default)s; at "
                                       "most the model's max_position_embeddings), or 'auto': the largest that fits "
                                       "--gpu-budget"))
    p.add_argument("--gpu-budget", type=size_arg, default=None,
                   help="GPU memory of the card, e.g. 24GiB: the export stops before any compile if the "
                        "planned runtime or export peak exceeds it (with the breakdown and the largest ctx that fits); "
                        "the default --prefill-chunk and --kv-dtype auto are fitted to it")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan (runtime and export peaks, by item) and exit without exporting")
    p.add_argument("--debug", action="store_true", help="show the Python traceback when the export fails")
    return p


def _plan_inputs(cfg: ExportConfig, ctx: int) -> PlanInputs:
    """The planner's view of this export (quantized unit by unit: the streaming loader;
    presets stream through the same unit loop)."""
    return inputs_for(model_config(cfg), cfg, ctx)


def resolve_plan(args: argparse.Namespace) -> ExportConfig:
    """--ctx auto / --gpu-budget checks and the prefill chunk, before anything is loaded or
    compiled. The ctx comes first (at the smallest chunk): context is what the card must hold,
    the chunk only buys prefill speed with what is left."""
    ctx_arg = str(args.ctx)
    if ctx_arg != "auto" and not ctx_arg.isdigit():
        raise ExportConfigError(f"--ctx {ctx_arg!r}: give a number of tokens or 'auto'")
    ctx = 1024 if ctx_arg == "auto" else int(ctx_arg)  # "auto": where the search starts
    if ctx < 2:  # --plan too: no plan for a context an export refuses
        raise ExportConfigError(f"--ctx {ctx} is below 2; give --ctx 2 or more")
    cfg = ExportConfig(**{**export_fields(args), "ctx": ctx})  # flags and fields match one-to-one
    check_kv_dtype(cfg)  # before any plan: the planner takes no bf16 cache beside a float32 model
    if ctx_arg == "auto" and args.gpu_budget is None:
        raise ExportConfigError("--ctx auto needs --gpu-budget (e.g. --gpu-budget 24GiB)")
    if ctx_arg != "auto":
        check_ctx(cfg, model_config(cfg))  # the plan needs a ctx the model takes (--plan too)
    cuda = cfg.device.resolve() is TargetDevice.CUDA
    given = "--gpu-budget" if args.gpu_budget else "the default budget (a 24 GB card; set --gpu-budget)"
    # --kv-dtype auto on a GPU (or against a given budget): the most precise cache that fits, after the ctx
    fit_kv = cfg.kv_dtype is KvDtype.AUTO and (cuda or args.gpu_budget is not None)
    kv = None
    if ctx_arg == "auto" or args.gpu_budget is not None or fit_kv:
        try:
            ctx, kv = resolve_ctx_and_kv(_plan_inputs(cfg, ctx), ctx_arg, args.gpu_budget, fit_kv)
        except DoesNotFit as e:
            raise ExportConfigError(str(e)) from None
        cfg = replace(cfg, ctx=ctx, prefill_chunk=args.prefill_chunk)  # None: re-fit the new ctx
    if kv is not None:
        print(f"kv cache {kv.name}, fitted to {given}: {kv.reason}", file=sys.stderr)
        cfg = replace(cfg, kv_dtype=kv.kv_dtype)
    if args.prefill_chunk is None and cuda:
        fit = fit_prefill_chunk(_plan_inputs(cfg, ctx), args.gpu_budget or DEFAULT_GPU_BUDGET)
        print(f"prefill chunk {fit.chunk}, fitted to {given}: {fit.reason}", file=sys.stderr)
        cfg = replace(cfg, prefill_chunk=fit.chunk)
    return cfg


DISK_MARGIN = 1.05  # on the disk check's estimate: the .pte, tokenizer files, the file system's own


def check_disk(cfg: ExportConfig) -> None:
    """Refuse an export that will not fit its disk, before it compiles for minutes: the .ptd holds the
    quantized weights (and with --kv-in-ptd the KV buffers), and a low-memory export first parks those
    weights in a spool file beside the output, which it copies into the .ptd at the end (both on disk then).
    The estimate is the planner's tensor inventory (the .ptd's own sizes)."""
    import shutil

    from export.gemma4.options import existing_ancestor
    from export.gemma4.planner import kv_items

    inputs = _plan_inputs(cfg, cfg.ctx)
    weights = sum(t.nbytes for t in inputs.inventory()[0])
    kv = sum(i.bytes for i in kv_items(inputs) if not i.reference) if cfg.kv_in_ptd else 0
    need = int((weights * (2 if cfg.low_memory else 1) + kv) * DISK_MARGIN)
    where = existing_ancestor(cfg.out_dir.parent)
    free = shutil.disk_usage(where).free
    if need > free:
        flag = f"--out {cfg.out}" if cfg.out is not None else f"the default --out ({cfg.out_dir})"
        spool = " (the weights parked while compiling, then the .ptd)" if cfg.low_memory else " (the .ptd)"
        raise ExportConfigError(f"{flag}: this export writes ~{need / 2**30:.1f} GiB{spool} and {where} has "
                                f"{free / 2**30:.1f} GiB free; free space or pass --out on a larger disk")


def _peaks() -> dict[str, float]:
    """Host peak RSS of this process, and the GPU allocator peak when CUDA was used."""
    import resource

    import torch

    gib = float(1 << 30)
    peaks = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 2)}
    if torch.cuda.is_initialized():
        peaks["gpu_allocator"] = round(torch.cuda.max_memory_allocated() / gib, 2)
    return peaks


def main(argv: list[str] | None = None) -> int:
    """Bad flags exit 2 with usage; other bad input (a checkpoint that does not match its
    config, a truncated shard) exits 2 with one line naming the file (`export.cli.run`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_internal_warnings()
    try:
        cfg = resolve_plan(args)
        if args.plan:
            print(render_table(plan(_plan_inputs(cfg, cfg.ctx))))
            return 0
        resolved = resolve(cfg)  # before anything is loaded or compiled
        check_disk(cfg)
    except ExportConfigError as e:
        parser.error(str(e))  # exits 2 with usage + message
    auto = f" (auto, for {Budget.of(args.gpu_budget)})" if str(args.ctx) == "auto" else ""
    dtype = str(resolved.dtype).removeprefix('torch.')
    kv = dtype if cfg.kv_dtype is KvDtype.AUTO else cfg.kv_dtype.value
    print(f"exporting {cfg.name} for {resolved.device.value} ({dtype}, quant {cfg.quant.value}, kv cache {kv}, "
          f"ctx {cfg.ctx}{auto}, prefill chunk {cfg.prefill_chunk}) -> {cfg.out_dir}", file=sys.stderr)
    if cfg.checkpoint is not None and not (Path(cfg.checkpoint) / "tokenizer.json").is_file():
        print(f"note: {cfg.checkpoint} has no tokenizer.json, so the artifact will not either: the runner "
              f"then takes token ids (python -m runtime --model {cfg.out_dir} --prompt-ids 2,...), or copy "
              "the model's tokenizer.json into the artifact directory", file=sys.stderr)
    err = lambda s: print(s, file=sys.stderr)  # noqa: E731
    result = export_model(resolved, listeners=(ProgressBars(err), Heartbeat(err, where=lowering_phase)))
    summary = {"out": str(result.out_dir), "files": result.sizes,
               "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
               "peak_gib": _peaks()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="python -m export.gemma4"))
