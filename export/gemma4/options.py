"""The export's options (`ExportConfig`, one field per CLI flag) and their validation,
resolved once into `ResolvedExport`: the model config, device, dtype and memory strategy
every later step uses.

    resolved = resolve(ExportConfig(preset="tiny", device=DeviceChoice.CPU))
"""

from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from export.backends.options import TargetDevice
from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.quant import GROUP_SIZES, EmbeddingQuant, LinearQuant, QuantRecipe
from export.strategy import ExportStrategy, strategy_for

DEFAULT_PRESET = "tiny"  # what a bare `python -m export.gemma4` exports
DEFAULT_PREFILL_CHUNK = 128  # unless --ctx is shorter


class DeviceChoice(str, enum.Enum):
    CUDA = "cuda"
    CPU = "cpu"
    AUTO = "auto"  # cuda when a GPU is visible, else cpu

    def __str__(self) -> str:  # CLI help and choices show the value
        return self.value

    def resolve(self) -> TargetDevice:
        if self is DeviceChoice.AUTO:
            return TargetDevice.CUDA if torch.cuda.is_available() else TargetDevice.CPU
        return TargetDevice(self.value)


class DTypeChoice(str, enum.Enum):
    BF16 = "bfloat16"
    FP32 = "float32"
    AUTO = "auto"  # bfloat16 on cuda, float32 on cpu

    def __str__(self) -> str:
        return self.value

    def resolve(self, device: TargetDevice) -> torch.dtype:
        if self is DTypeChoice.AUTO:
            return torch.bfloat16 if device is TargetDevice.CUDA else torch.float32
        return getattr(torch, self.value)


class KvDtype(str, enum.Enum):
    """Storage of the full-attention layers' KV cache (sliding rings keep the model dtype)."""

    AUTO = "auto"  # the model dtype (the export CLI on cuda: the most precise cache that fits its budget)
    BF16 = "bf16"
    INT8 = "int8"  # symmetric, fp16 scale per token and head
    INT4 = "int4"  # two codes per byte, fp16 scale per token and head

    def __str__(self) -> str:
        return self.value


class ExportConfigError(ValueError):
    """A bad export configuration; the message names the flag or file and what to do."""


@dataclass(frozen=True)
class ExportConfig:
    """Everything an export depends on; fields map one-to-one onto the CLI flags."""

    checkpoint: Path | None = None  # --checkpoint: HF model directory (config.json + safetensors)
    preset: str | None = None  # --preset: a config preset with random weights ("tiny" if neither)
    layers: int | None = None  # --layers: keep only the first N decoder layers (preset slices at real width)
    ctx: int = 2048  # --ctx: max tokens per sequence (full-attention KV length)
    prefill_chunk: int | None = None  # --prefill-chunk: max tokens per prefill call; None = min(128, ctx), the CLI plans it on cuda
    quant: LinearQuant = LinearQuant.INT4  # --quant: linear weights (lm_head included)
    group_size: int = 128  # --group-size: int4 group size along K (128, or 32: +1.3 GiB on the 31B, less error)
    embedding_quant: EmbeddingQuant = EmbeddingQuant.NONE  # --embedding-quant
    device: DeviceChoice = DeviceChoice.AUTO  # --device
    dtype: DTypeChoice = DTypeChoice.AUTO  # --dtype: activations and unquantized weights
    kv_dtype: KvDtype = KvDtype.AUTO  # --kv-dtype: full-attention KV cache storage (auto, bf16, int8, int4)
    autotune: bool = True  # --autotune/--no-autotune: Inductor max_autotune (cuda; slow compiles)
    layer_units: bool = True  # --layer-units/--no-layer-units: compile each distinct layer once (export/chain.py)
    low_memory: bool = False  # --low-memory: export.passes keep compile-time memory low
    multi_arch_kernels: bool = False  # --multi-arch-kernels: cuda kernels also as PTX fatbins (other GPUs)
    kv_in_ptd: bool = False  # --kv-in-ptd: also store the KV buffers (zeros) in the .ptd
    out: Path | None = None  # --out: artifact directory (default out/<preset or checkpoint name>)
    seed: int = 0  # --seed: random weights of a preset

    def __post_init__(self):
        if self.prefill_chunk is None:
            object.__setattr__(self, "prefill_chunk", max(2, min(DEFAULT_PREFILL_CHUNK, self.ctx)))

    @property
    def source_preset(self) -> str | None:
        """The preset to build, or None when loading a checkpoint."""
        if self.checkpoint is not None:
            return self.preset  # both set: resolve() rejects it
        return self.preset or DEFAULT_PRESET

    @property
    def name(self) -> str:
        if self.checkpoint is not None:
            return Path(self.checkpoint).name
        return self.source_preset + (f"-{self.layers}l" if self.layers else "")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("out") / self.name

    def recipe(self) -> QuantRecipe:
        return QuantRecipe(linear=self.quant, group_size=self.group_size, embedding=self.embedding_quant)


@dataclass(frozen=True)
class ResolvedExport:
    """An `ExportConfig` after every check that needs no weights, with what it resolves to."""

    cfg: ExportConfig
    model: Gemma4Config
    device: TargetDevice
    dtype: torch.dtype
    strategy: ExportStrategy


def _fail(msg: str) -> None:
    raise ExportConfigError(msg)


def _check_checkpoint_dir(path: Path) -> None:
    if path.is_file():  # e.g. the config.json or a shard itself
        _fail(f"--checkpoint {path}: a file, not a directory (pass the Hugging Face model directory that holds "
              f"it: --checkpoint {path.parent})")
    if not path.is_dir():
        _fail(f"--checkpoint {path}: no such directory (pass a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        _fail(f"--checkpoint {path}: config.json missing (pass a Hugging Face model directory)")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        _fail(f"--checkpoint {path}: no model.safetensors or model.safetensors.index.json "
              "(only safetensors checkpoints are supported)")


def model_config(cfg: ExportConfig) -> Gemma4Config:
    """The Gemma4Config the export will use, after checking where it comes from."""
    if cfg.checkpoint is not None and cfg.preset is not None:
        _fail("pass either --checkpoint DIR or --preset NAME, not both")
    if cfg.checkpoint is None:
        if cfg.source_preset not in PRESETS:
            _fail(f"--preset {cfg.source_preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        mcfg = PRESETS[cfg.source_preset]
        if cfg.layers is not None:
            if not 1 <= cfg.layers <= mcfg.num_hidden_layers:
                _fail(f"--layers {cfg.layers} is outside 1..{mcfg.num_hidden_layers} for --preset {cfg.source_preset}")
            mcfg = mcfg.with_layers(cfg.layers)
        return mcfg
    path = Path(cfg.checkpoint)
    if cfg.layers is not None:
        _fail("--layers slices a --preset; it cannot be used with --checkpoint")
    _check_checkpoint_dir(path)
    try:
        return Gemma4Config.from_json(path)
    except (ValueError, KeyError, TypeError) as e:  # the message names config.json and the field
        _fail(f"--checkpoint: {e}")


def check_ctx(cfg: ExportConfig, mcfg: Gemma4Config) -> None:
    """--ctx within 2..the model's max_position_embeddings; raises ExportConfigError."""
    if not 2 <= cfg.ctx <= mcfg.max_position_embeddings:
        fix = "lower --ctx" if cfg.ctx > mcfg.max_position_embeddings else "give --ctx 2 or more"
        _fail(f"--ctx {cfg.ctx} is outside 2..{mcfg.max_position_embeddings} "
              f"(the model's max_position_embeddings); {fix}")


def check_kv_dtype(cfg: ExportConfig) -> None:
    """--kv-dtype bf16 is the model dtype's cache: it needs a bfloat16 model; raises ExportConfigError."""
    dtype = cfg.dtype.resolve(cfg.device.resolve())
    if cfg.kv_dtype is KvDtype.BF16 and dtype != torch.bfloat16:
        _fail(f"--kv-dtype bf16 with a {str(dtype).removeprefix('torch.')} model (--dtype {cfg.dtype.value} on "
              f"{cfg.device.resolve().value}): pass --dtype bfloat16, or --kv-dtype auto (the model's dtype), int8 or int4")


def resolve(cfg: ExportConfig) -> ResolvedExport:
    """Every check that can fail without loading weights; raises ExportConfigError."""
    from export.pipeline import use_packaged_flatc

    mcfg = model_config(cfg)
    check_ctx(cfg, mcfg)
    check_kv_dtype(cfg)
    if not 2 <= cfg.prefill_chunk <= cfg.ctx:
        _fail(f"--prefill-chunk {cfg.prefill_chunk} must be in 2..ctx ({cfg.ctx}); decode covers T = 1")
    if cfg.group_size not in GROUP_SIZES:
        _fail(f"--group-size {cfg.group_size}: use 128 (default) or 32")
    if cfg.device is DeviceChoice.CUDA and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    device = cfg.device.resolve()
    dtype = cfg.dtype.resolve(device)
    if device is TargetDevice.CUDA and cfg.quant is LinearQuant.INT4 and dtype != torch.bfloat16:
        _fail("--quant int4 on cuda runs bf16 int4 kernels: pass --dtype bfloat16 (or --quant none)")
    if cfg.out is not None and Path(cfg.out).is_file():
        _fail(f"--out {cfg.out} is a file; pass a directory path")
    _check_out_replaceable(cfg)
    _check_out_writable(cfg)
    if cfg.checkpoint is None:
        _check_preset_fits(cfg, mcfg, dtype)
    try:
        use_packaged_flatc()
    except ValueError as e:
        _fail(str(e))
    return ResolvedExport(cfg, mcfg, device, dtype, strategy_for(cfg.low_memory))


def existing_ancestor(path: Path) -> Path:
    """The nearest directory or file at or above `path` that exists (absolute)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_out_replaceable(cfg: ExportConfig) -> None:
    """The artifact replaces its whole directory (export/artifact.py: `atomic_output_dir`), so an existing --out
    must be empty or an earlier export (its model.pte): never a checkpoint, a home or a project directory."""
    from runtime.artifact import PTE_NAME

    out = cfg.out_dir
    if out.is_dir() and any(out.iterdir()) and not (out / PTE_NAME).is_file():
        flag = f"--out {cfg.out}" if cfg.out is not None else f"the default --out ({out})"
        _fail(f"{flag}: {out} holds files but no export ({PTE_NAME}), and the export replaces the whole "
              "directory; pass a new or empty directory (or an earlier export's, to replace it)")


def _check_out_writable(cfg: ExportConfig) -> None:
    """The artifact's directory must be creatable: its nearest existing ancestor a directory this process can
    write in (tried now, not after the minutes of compiling; the weights' spool and the artifact's temp dir
    go there too)."""
    out = cfg.out_dir
    flag = f"--out {cfg.out}" if cfg.out is not None else f"the default --out ({out})"
    base = existing_ancestor(out if not out.exists() else out.parent)
    if not base.is_dir():
        _fail(f"{flag}: {base} is not a directory; pass a directory path you can write")
    try:  # a real write: permissions, a read-only mount, a pseudo file system
        os.rmdir(tempfile.mkdtemp(prefix=".gemma4-write-probe-", dir=base))
    except OSError as e:
        _fail(f"{flag}: cannot write in {base} ({e.strerror or e}); pass a directory you can write")


def _available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _check_preset_fits(cfg: ExportConfig, mcfg: Gemma4Config, dtype: torch.dtype) -> None:
    """A preset is built whole in host RAM (random weights, then quantized): refuse one that
    cannot fit instead of letting the OOM killer end it (and maybe a neighbour) later."""
    from export.gemma4.model import Gemma4Model

    with torch.device("meta"):
        meta = Gemma4Model(mcfg, ctx=cfg.ctx, prefill_chunk=cfg.prefill_chunk, dtype=dtype,
                           kv_dtype=cfg.kv_dtype.value)
    need = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    have = _available_host_bytes()
    if need > 0.8 * have:
        _fail(f"--preset {cfg.source_preset} builds a {need / 2**30:.1f} GiB float model in host RAM "
              f"and only {have / 2**30:.1f} GiB is available; use a smaller preset, --ctx, or "
              "--checkpoint (loaded tensor by tensor)")
