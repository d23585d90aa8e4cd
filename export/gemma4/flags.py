"""The export's command-line flags, one per `ExportConfig` field, in one table.

`python -m export.gemma4` adds all of them; a script that runs exports adds the ones it
needs (same names, types, choices and help), optionally with its own defaults:

    add_export_arguments(parser, ("ctx", "quant", "group_size"), ctx=131072, group_size=32)
    cfg = ExportConfig(**export_fields(args), preset=...)
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from export.cli import non_negative_int, positive_int
from export.gemma4.config import PRESETS
from export.gemma4.options import (
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_PRESET,
    DeviceChoice,
    DTypeChoice,
    ExportConfig,
    KvDtype,
)
from export.gemma4.quant import GROUP_SIZES, EmbeddingQuant, LinearQuant


def _enum(cls):
    """argparse type of an Enum flag: a bad value is refused with the choices (argparse's own
    message for a failed type is "invalid KvDtype value")."""

    def parse(text: str):
        try:
            return cls(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(str(c.value) for c in cls)})") from None

    parse.__name__ = cls.__name__
    return parse


def _flags(d: ExportConfig) -> dict[str, dict]:
    """field -> add_argument keywords (`default` from the config's own defaults)."""
    return {
        "checkpoint": dict(type=Path, help="Hugging Face model directory (config.json + *.safetensors)"),
        "preset": dict(help=f"config preset with seeded random weights: {', '.join(PRESETS)} "
                            f"(default when no --checkpoint: {DEFAULT_PRESET})"),
        "layers": dict(type=positive_int, default=d.layers,
                       help="keep only the first N decoder layers of --preset (slices at real width for tests)"),
        "ctx": dict(type=positive_int, default=d.ctx,
                    help="max tokens per sequence = full-attention KV length (default %(default)s; "
                         "at most the model's max_position_embeddings)"),
        "prefill_chunk": dict(type=int, default=None,
                              help=f"max tokens per prefill call; prefill takes any T in 1..this. Default on "
                                   f"cuda: the largest of 2048, 1024, 512, 256, 128 (at most --ctx) whose planned "
                                   f"runtime memory fits --gpu-budget (22 GiB without one); on cpu "
                                   f"{DEFAULT_PREFILL_CHUNK}, or --ctx when that is shorter"),
        "quant": dict(type=_enum(LinearQuant), choices=list(LinearQuant), default=d.quant,
                      help="linear weights incl. lm_head: int4 weight-only or none (default %(default)s)"),
        "group_size": dict(type=int, choices=GROUP_SIZES, default=d.group_size,
                           help="int4 group size along the input dim (default %(default)s)"),
        "embedding_quant": dict(type=_enum(EmbeddingQuant), choices=list(EmbeddingQuant), default=d.embedding_quant,
                                help="embedding tables: int8 per row or none (default %(default)s)"),
        "device": dict(type=_enum(DeviceChoice), choices=list(DeviceChoice), default=d.device,
                       help="where the compiled .so runs; auto = cuda if a GPU is visible (default %(default)s)"),
        "dtype": dict(type=_enum(DTypeChoice), choices=list(DTypeChoice), default=d.dtype,
                      help="activations and unquantized weights; auto = bfloat16 on cuda, float32 on cpu"),
        "kv_dtype": dict(type=_enum(KvDtype), choices=list(KvDtype), default=d.kv_dtype,
                         help="KV cache of the full-attention layers: int8 / int4 (fp16 scale per token and head, "
                              "quantized on write) or bf16; auto (default) = on cuda the most precise of the model "
                              "dtype, int8 and int4 whose planned memory fits --gpu-budget (22 GiB without one) at "
                              "--ctx, on cpu the model dtype. Sliding rings keep the model dtype"),
        "autotune": dict(action=argparse.BooleanOptionalAction, default=d.autotune,
                         help="Inductor max_autotune on cuda (Triton GEMMs only, as ExecuTorch's CUDA backend); "
                              "--no-autotune compiles minutes faster and lets GEMMs call cuBLAS (default on)"),
        "layer_units": dict(action=argparse.BooleanOptionalAction, default=d.layer_units,
                            help="compile the embedding, each distinct layer and the head once and run the layers "
                                 "as a chain: the export's lowering no longer grows with depth. --no-layer-units "
                                 "compiles each method as one graph (default on)"),
        "low_memory": dict(action="store_true", default=d.low_memory,
                           help="keep compile-time memory low (export.passes: zero-byte constants during compile)"),
        "multi_arch_kernels": dict(action="store_true", default=d.multi_arch_kernels,
                                   help="cuda: also build each kernel as a PTX+SASS fatbin (one nvcc call per kernel, "
                                        "slower export) so the artifact runs on other GPU generations; by default it "
                                        "runs on the exporting GPU's architecture only"),
        "kv_in_ptd": dict(action="store_true", default=d.kv_in_ptd,
                          help="also store the KV buffers (zeros) in model.ptd; by default the runner allocates them"),
        "out": dict(type=Path, default=d.out,
                    help="artifact directory (default out/<preset or checkpoint dir name>): new, empty or an earlier "
                    "export's, which the export replaces whole; a directory holding other files is refused"),
        "seed": dict(type=non_negative_int, default=d.seed, help="seed of a preset's random weights (default %(default)s)"),
    }


def add_export_arguments(parser, names: tuple[str, ...] | None = None, **overrides) -> None:
    """Add the flags of `names` (every field: None) to `parser` (or an argument group);
    `overrides` replace add_argument keywords per field, e.g. `ctx=dict(default=131072)`."""
    table = _flags(ExportConfig())
    for name in names or [f.name for f in fields(ExportConfig)]:
        kw = {**table[name], **overrides.get(name, {})}
        parser.add_argument("--" + name.replace("_", "-"), **kw)


def export_fields(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict:
    """The ExportConfig fields of `names` (default: every one present) from `args`."""
    names = names or tuple(f.name for f in fields(ExportConfig) if hasattr(args, f.name))
    return {name: getattr(args, name) for name in names}
