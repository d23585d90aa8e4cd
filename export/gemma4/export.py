"""Export driver: Gemma 4 -> `model.pte` + `model.ptd` compiled by AOTInductor.

    result = export_model(ExportConfig(preset="tiny", device=DeviceChoice.CPU, out=Path("out/tiny")))

Steps: resolve the config once (every check that needs no weights, export/gemma4/options.py),
build or load the model unit by unit and quantize each unit as it arrives, then the generic
pipeline (export/pipeline.py): `torch.export` `prefill` and `decode` from ONE model instance
(so both name the same KV buffers), each as a chain of units that compile once however many
layers run them (export/chain.py; `--no-layer-units`: the whole graph), lower each unit to
one AOTI delegate, map each step's compiled constants to `.ptd` keys (export/constants.py),
and write the artifact atomically (export/artifact.py). How memory is spent is the config's
strategy (export/strategy.py); progress and timings are stage events (export/stages.py).
export/ARTIFACT.md is the contract.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from export import pipeline, stages
from export.artifact import write_artifact
from export.backends import compile_workers
from export.chain import Chain
from export.constants import plan_ptd
from export.gemma4.metadata import build_metadata
from export.gemma4.options import (  # noqa: F401  (the export's vocabulary, importable from here)
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_PRESET,
    DeviceChoice,
    DTypeChoice,
    ExportConfig,
    ExportConfigError,
    KvDtype,
    ResolvedExport,
    model_config,
    resolve,
)
from export.gemma4.quant import QuantReport, quantize_
from export.gemma4.tokenizer import MIN_STANDIN_VOCAB, write_tokenizer
from export.pipeline import EXPORT_KW, compiled_methods, export_methods, use_packaged_flatc  # noqa: F401
from runtime.artifact import METHODS  # noqa: F401

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
REPORTED_STAGES = (stages.LOAD, stages.TORCH_EXPORT, "compile_workers_wait", "isa_probe_wait", stages.LOWER,
                   stages.WRITE)


@dataclass
class ExportResult:
    out_dir: Path
    metadata: dict
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time, and "total"
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    model: nn.Module | None = None  # the eager model exactly as exported (a parity reference)
    parked_bytes: int = 0  # weight bytes parked on disk while compiling (low-memory)


def _resolved(cfg: ExportConfig | ResolvedExport) -> ResolvedExport:
    return cfg if isinstance(cfg, ResolvedExport) else resolve(cfg)


def build_model(r: ResolvedExport, on_unit_loaded=None) -> nn.Module:
    """The eager model: a checkpoint's weights or a preset's seeded random ones
    (`RandomWeights`, drawn on the export device), handed unit by unit to `on_unit_loaded`."""
    cfg = r.cfg
    kw = dict(ctx=cfg.ctx, prefill_chunk=cfg.prefill_chunk, dtype=r.dtype, on_unit_loaded=on_unit_loaded,
              kv_dtype=cfg.kv_dtype.value)
    if cfg.checkpoint is not None:
        from export.gemma4.checkpoint import load_model
        return load_model(cfg.checkpoint, **kw).eval()
    from export.gemma4.checkpoint import random_model
    return random_model(r.model, seed=cfg.seed, device=r.device.value, **kw).eval()


def prepare_model(cfg: ExportConfig | ResolvedExport, spool=None) -> tuple[nn.Module, QuantReport]:
    """The model exactly as exported (quantized, where the strategy keeps it). Tests call
    this too, to get an eager model with the artifact's weights.

    Quantization runs unit by unit as the checkpoint is read (bounded host memory: the
    float source of a layer is gone before the next layer is read). With a `spool`, each
    quantized unit is then parked on disk (export/spool.py), so host memory holds about
    one unit of weights at a time."""
    r = _resolved(cfg)
    recipe = r.cfg.recipe()
    report = QuantReport()

    def quantize_unit(model: nn.Module, unit: str) -> None:
        quantize_(model, recipe, r.device, under=unit, report=report)
        if spool is not None:
            spool.park_module_(model.get_submodule(unit))

    model = build_model(r, on_unit_loaded=quantize_unit)
    model.set_target(r.device.value)  # the ops it traces are the target's, wherever the eager copy sits
    place = r.strategy.eager_model_device(r.device)
    if place != "cpu":
        model.to(place)
    return model, report


def export_model(cfg: ExportConfig | ResolvedExport, listeners: tuple = ()) -> ExportResult:
    """The whole export; see the module docstring. `listeners` get every stage event."""
    r = _resolved(cfg)
    timings = stages.Timings()
    compile_workers.start()  # they import torch while the model loads and traces
    compile_workers.start_isa_probe()  # Inductor's host ISA probe, likewise
    with stages.Stages(timings, *listeners).active(), r.strategy.spool(r.cfg.out_dir.parent) as spool:
        t0 = time.perf_counter()
        result = _export(r, spool)
        timings.seconds["total"] = time.perf_counter() - t0
    result.seconds = {k: timings.seconds[k] for k in (*REPORTED_STAGES, "total") if k in timings.seconds}
    return result


def _export(r: ResolvedExport, spool) -> ExportResult:
    cfg = r.cfg
    with stages.stage(stages.LOAD):
        model, report = prepare_model(r, spool=spool)
    stages.note(stages.LOAD, f"model ready: {len(report.int4)} int4 linears, {len(report.skipped)} left in {r.dtype}"
                + (f"; {spool.parked_bytes / 2**30:.2f} GiB parked on disk" if spool is not None else ""))
    chain = model.chain() if cfg.layer_units else Chain.whole(model)
    programs = export_methods(chain, cfg.prefill_chunk)
    edge = pipeline.lower(programs, r.device, r.strategy, autotune=cfg.autotune,
                          multi_arch=cfg.multi_arch_kernels)
    del programs
    kv_fqns = {s["fqn"] for s in model.kv_cache_specs()}
    tensors, steps = plan_ptd(model, compiled_methods(edge), kv_fqns, cfg.kv_in_ptd, chain, METHODS)
    pair_id = secrets.token_hex(16)
    metadata = build_metadata(r, model, report, steps, pair_id)
    with stages.stage(stages.WRITE):
        et_program = pipeline.to_executorch(edge, json.dumps(metadata, sort_keys=True))
        sizes = write_artifact(cfg.out_dir, et_program, tensors, pair_id,
                               add_files=lambda d: _add_tokenizer(d, cfg.checkpoint, r.model.vocab_size))
    return ExportResult(out_dir=cfg.out_dir, metadata=metadata, sizes=sizes, model=model,
                        parked_bytes=spool.parked_bytes if spool is not None else 0)


def _add_tokenizer(directory: Path, checkpoint: Path | None, vocab_size: int) -> None:
    """The checkpoint's tokenizer files; a preset large enough gets a stand-in tokenizer."""
    for name in TOKENIZER_FILES if checkpoint else ():
        if (Path(checkpoint) / name).is_file():
            shutil.copyfile(Path(checkpoint) / name, directory / name)
    if checkpoint is None and vocab_size >= MIN_STANDIN_VOCAB:
        write_tokenizer(directory / "tokenizer.json", vocab_size)  # a preset has no tokenizer of its own
