"""Shared test plumbing: the `cuda` marker skips cleanly on machines without a GPU; on a machine without one the
suite runs on its cores through pytest-xdist where that is installed."""

import os

import pytest
import torch

MAX_WORKERS = 4  # each worker compiles the session's tiny artifacts it needs: a few GB of memory apiece


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without a GPU, with pytest-xdist installed (the `test` extra) and no -n given, one worker a core (at most
    MAX_WORKERS), a test file to one worker (its module fixtures compile once): most of the suite's time is one core
    busy (the Triton interpreter, Inductor's code generation, a C++ compile), so two cores take about half as long.
    A GPU machine keeps one process (its tests share the device); `-n 0` or `-p no:xdist` turn it off."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is not None or config.getoption("usepdb", False) or torch.cuda.is_available():
        return
    n = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    if n > 1:
        config.option.numprocesses, config.option.dist, config.option.tx = n, "loadfile", ["popen"] * n


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- the tiny exported artifact, compiled once per test session ---------------------------
#
# Exporting compiles two AOTInductor methods (~2-3 min on two CPU cores), so every test that
# needs an artifact shares this one. Config: preset `tiny` (every Gemma 4 feature: sliding +
# full layers, k_eq_v, PLE, KV sharing, double-wide MLP, softcap), ctx 64, prefill_chunk 12
# (longer than the window of 8, which is the ring: a chunk attends across the ring and
# overwrites all of it; a few dozen tokens wrap the rings), fp32, CPU, int4 g32 linears (CPU
# dequant-in-graph module) and int8 embeddings: the quantized paths are exercised too.
# Compare against `model` (the same quantized weights, eager), not against a float model.

from dataclasses import dataclass as _dataclass  # noqa: E402
from pathlib import Path as _Path  # noqa: E402


@_dataclass
class TinyArtifact:
    """What `tiny_artifact` yields (treat the files as read-only; copy before editing)."""

    out_dir: _Path  # holds model.pte + model.ptd
    config: "object"  # the ExportConfig used (export/gemma4/export.py)
    metadata: dict  # the metadata JSON the export wrote
    model: torch.nn.Module  # eager model with the artifact's weights; call reset_cache() first

    def fresh_model(self) -> torch.nn.Module:
        """A new eager model with the same weights (for tests that must not share KV state)."""
        from export.gemma4.export import prepare_model

        return prepare_model(self.config)[0]


def tiny_export_config(out: _Path):
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig
    from export.gemma4.quant import EmbeddingQuant, LinearQuant

    return ExportConfig(preset="tiny", ctx=64, prefill_chunk=12, quant=LinearQuant.INT4, group_size=32,
                        embedding_quant=EmbeddingQuant.INT8, device=DeviceChoice.CPU,
                        dtype=DTypeChoice.FP32, out=out)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> TinyArtifact:
    from export.gemma4.export import export_model, prepare_model

    cfg = tiny_export_config(tmp_path_factory.mktemp("tiny_artifact") / "tiny")
    result = export_model(cfg)
    model = prepare_model(cfg)[0]
    model.reset_cache()
    return TinyArtifact(out_dir=result.out_dir, config=cfg, metadata=result.metadata, model=model)


# ---- the same tiny artifact exported with --low-memory, compiled once per session --
# Same config plus low_memory (every big constant zero-byte while compiling, every weight
# parked in the spool file and copied from there into the .ptd) and kv_in_ptd (KV written as
# zeros), so tests/test_passes_artifact.py can compare it with the stock one and check both
# KV modes of the .ptd.

@pytest.fixture(scope="session")
def tiny_artifact_low_memory(tmp_path_factory) -> TinyArtifact:
    from dataclasses import replace

    from export.gemma4.export import export_model, prepare_model

    cfg = replace(tiny_export_config(tmp_path_factory.mktemp("tiny_artifact_low_memory") / "tiny"),
                  low_memory=True, kv_in_ptd=True)
    with pytest.MonkeyPatch.context() as mp:  # park every weight on disk, however small (export/spool.py)
        mp.setattr("export.spool.MIN_PARK_BYTES", 1)
        result = export_model(cfg)
    assert result.parked_bytes > 0
    model = prepare_model(cfg)[0]
    model.reset_cache()
    return TinyArtifact(out_dir=result.out_dir, config=cfg, metadata=result.metadata, model=model)


# ---- the tiny artifact with an int8 KV cache, low-memory (gemma4::attention), once per session --

@pytest.fixture(scope="session")
def tiny_artifact_int8_kv(tmp_path_factory) -> TinyArtifact:
    from dataclasses import replace

    from export.gemma4.export import KvDtype, export_model, prepare_model

    cfg = replace(tiny_export_config(tmp_path_factory.mktemp("tiny_artifact_int8_kv") / "tiny"),
                  low_memory=True, kv_dtype=KvDtype.INT8)
    result = export_model(cfg)
    model = prepare_model(cfg)[0]
    model.reset_cache()
    return TinyArtifact(out_dir=result.out_dir, config=cfg, metadata=result.metadata, model=model)


# ---- tiny-moe with int4 experts (gemma4::moe_route / moe_experts_int4), low-memory, once per session --
# The MoE block beside the dense MLP: the CPU backend decomposes the MoE ops into their aten
# references; low-memory with every weight parked, so the expert stacks go through the spool
# and zero-byte constants like the linears.

@pytest.fixture(scope="session")
def tiny_moe_artifact(tmp_path_factory) -> TinyArtifact:
    from dataclasses import replace

    from export.gemma4.export import export_model, prepare_model

    cfg = replace(tiny_export_config(tmp_path_factory.mktemp("tiny_moe_artifact") / "tiny-moe"),
                  preset="tiny-moe", layers=2, low_memory=True)  # 2 layers: a sliding and a full one
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("export.spool.MIN_PARK_BYTES", 1)
        result = export_model(cfg)
    model = prepare_model(cfg)[0]
    model.reset_cache()
    return TinyArtifact(out_dir=result.out_dir, config=cfg, metadata=result.metadata, model=model)
