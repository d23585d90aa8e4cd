"""The artifact's `metadata` JSON for a Gemma 4 export (export/ARTIFACT.md; the runtime
defines its format version and keys)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.backends.options import TargetDevice
from export.gemma4.config import Gemma4Config
from export.gemma4.options import KvDtype, ResolvedExport
from export.gemma4.quant import QuantReport
from runtime.artifact import FORMAT_VERSION


def eos_ids(checkpoint: Path | None, mcfg: Gemma4Config) -> list[int]:
    """config.json's eos ids plus generation_config.json's (instruct models add <end_of_turn>)."""
    ids = list(mcfg.eos_token_ids)
    gen = Path(checkpoint) / "generation_config.json" if checkpoint else None
    if gen is not None and gen.is_file():
        extra = json.loads(gen.read_text()).get("eos_token_id", [])
        ids += [i for i in (extra if isinstance(extra, list) else [extra]) if i not in ids]
    return ids


def _cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_metadata(r: ResolvedExport, model: nn.Module, report: QuantReport,
                   steps: dict[str, list[dict]], pair_id: str) -> dict[str, Any]:
    cfg, mcfg = r.cfg, r.model
    return {
        "format_version": FORMAT_VERSION,
        "pair_id": pair_id,
        "device": r.device.value,
        # cuda kernels run on this GPU architecture only, unless built as fatbins
        "cuda_arch": _cuda_arch() if r.device is TargetDevice.CUDA else None,
        "multi_arch_kernels": cfg.multi_arch_kernels,
        "dtype": str(r.dtype).removeprefix("torch."),
        "config": json.loads(json.dumps(asdict(mcfg))),
        "ctx": cfg.ctx,
        "prefill_chunk": cfg.prefill_chunk,
        "sliding_window": mcfg.sliding_window,
        "ring_size": model.ring_size,
        "bos_token_id": mcfg.bos_token_id,
        "eos_token_ids": eos_ids(cfg.checkpoint, mcfg),
        "vocab_size": mcfg.vocab_size,
        "quant": {**cfg.recipe().summary(), "int4_modules": len(report.int4),
                  "float_linears": sorted(report.skipped)},
        "kv_in_ptd": cfg.kv_in_ptd,
        # full layers' cache: int8 / int4, or the model dtype's name; "kv" lists every buffer's dtype and shape
        "kv_dtype": (cfg.kv_dtype.value if cfg.kv_dtype in (KvDtype.INT8, KvDtype.INT4)
                     else str(r.dtype).removeprefix("torch.")),
        "kv": model.kv_cache_specs(),
        "methods": {m: {"steps": s} for m, s in steps.items()},
    }
