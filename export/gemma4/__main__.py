"""`python -m export.gemma4`: export a Gemma 4 text model to model.pte + model.ptd.

Every flag is one field of `ExportConfig` (export/gemma4/export.py). With no arguments it
exports the `tiny` preset (random weights) for whatever device exists into out/tiny.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from export.gemma4.config import PRESETS
from export.gemma4.export import (
    DEFAULT_PRESET,
    DeviceChoice,
    DTypeChoice,
    ExportConfig,
    ExportConfigError,
    SdpaChoice,
    export_model,
    validate,
)
from export.gemma4.quant import EmbeddingQuant, LinearQuant

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
    src.add_argument("--checkpoint", type=Path, help="Hugging Face model directory (config.json + *.safetensors)")
    src.add_argument("--preset", help=f"config preset with seeded random weights: {', '.join(PRESETS)} "
                                      f"(default when no --checkpoint: {DEFAULT_PRESET})")
    p.add_argument("--layers", type=int, default=d.layers,
                   help="keep only the first N decoder layers of --preset (slices at real width for tests)")
    p.add_argument("--ctx", type=int, default=d.ctx,
                   help="max tokens per sequence = full-attention KV length (default %(default)s; "
                        "at most the model's max_position_embeddings)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="max tokens per prefill call; prefill takes any T in 1..this (default %(default)s)")
    p.add_argument("--quant", type=LinearQuant, choices=list(LinearQuant), default=d.quant,
                   help="linear weights incl. lm_head: int4 weight-only or none (default %(default)s)")
    p.add_argument("--group-size", type=int, choices=(32, 128), default=d.group_size,
                   help="int4 group size along the input dim (default %(default)s)")
    p.add_argument("--embedding-quant", type=EmbeddingQuant, choices=list(EmbeddingQuant),
                   default=d.embedding_quant, help="embedding tables: int8 per row or none (default %(default)s)")
    p.add_argument("--device", type=DeviceChoice, choices=list(DeviceChoice), default=d.device,
                   help="where the compiled .so runs; auto = cuda if a GPU is visible (default %(default)s)")
    p.add_argument("--dtype", type=DTypeChoice, choices=list(DTypeChoice), default=d.dtype,
                   help="activations and unquantized weights; auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--sdpa", type=SdpaChoice, choices=list(SdpaChoice), default=d.sdpa,
                   help="attention on cuda: ExecuTorch's Triton kernel (bf16 only) or decomposed; "
                        "auto = triton for cuda + bfloat16 (default %(default)s)")
    p.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=d.autotune,
                   help="Inductor max_autotune on cuda (Triton GEMMs only, as ExecuTorch's CUDA backend); "
                        "--no-autotune compiles minutes faster and lets GEMMs call cuBLAS (default on)")
    p.add_argument("--low-memory", action="store_true", default=d.low_memory,
                   help="keep compile-time memory low (export.passes: zero-byte constants during compile)")
    p.add_argument("--kv-in-ptd", action="store_true", default=d.kv_in_ptd,
                   help="also store the KV buffers (zeros) in model.ptd; by default the runner allocates them")
    p.add_argument("--out", type=Path, default=d.out,
                   help="artifact directory (default out/<preset or checkpoint dir name>)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of a preset's random weights (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    """argparse namespace -> ExportConfig (flags and fields match one-to-one)."""
    return ExportConfig(**{f.name: getattr(args, f.name) for f in fields(ExportConfig)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(argv))
    try:
        _, device, dtype = validate(cfg)  # before anything is loaded or compiled
        print(f"exporting {cfg.name} for {device.value} ({str(dtype).removeprefix('torch.')}, "
              f"quant {cfg.quant.value}) -> {cfg.out_dir}", file=sys.stderr)
        result = export_model(cfg, progress=True, log=lambda s: print(s, file=sys.stderr))
    except ExportConfigError as e:
        parser.error(str(e))  # exits 2 with usage + message
    summary = {"out": str(result.out_dir), "files": result.sizes,
               "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
