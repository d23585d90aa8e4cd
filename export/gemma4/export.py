"""Export driver: Gemma 4 -> `model.pte` + `model.ptd` compiled by AOTInductor.

    cfg = ExportConfig(preset="tiny", device=DeviceChoice.CPU, out=Path("out/tiny"))
    result = export_model(cfg)

Steps (each with a tqdm bar): validate the config (before anything heavy), load or build
the model, quantize, `torch.export` `prefill` (tokens [1, T], T dynamic in
1..prefill_chunk) and `decode` (token [1, 1]) from ONE model instance so both name the same
KV buffers, lower both with the target's AOTI partitioner, then write the artifact
atomically: the `.pte` (one weight-free `.so` per method, the `metadata` constant method)
and the `.ptd` (each weight once, keyed by its FQN). export/ARTIFACT.md is the contract.
"""

from __future__ import annotations

import contextlib
import enum
import json
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from export.artifact import PtdTensor, atomic_output_dir, write_ptd
from export.backends import PREPROCESS_LISTENERS, compile_workers, CompiledMethod, ConstantKind, TargetDevice, partitioner_for
from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.quant import EmbeddingQuant, LinearQuant, QuantRecipe, QuantReport, quantize_
from export.gemma4.tokenizer import MIN_STANDIN_VOCAB, write_tokenizer
from export.spool import WeightSpool, shared_deepcopy

METHODS = ("prefill", "decode")
FORMAT_VERSION = 1
DEFAULT_PRESET = "tiny"  # what a bare `python -m export.gemma4` exports
DEFAULT_PREFILL_CHUNK = 128  # unless --ctx is shorter
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


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


class SdpaChoice(str, enum.Enum):
    AUTO = "auto"  # triton on cuda with bfloat16, else decomposed
    TRITON = "triton"  # ExecuTorch's Triton SDPA kernel (cuda, bfloat16 only)
    DECOMPOSED = "decomposed"  # Inductor fuses the math ops itself

    def __str__(self) -> str:
        return self.value

    def use_triton(self, device: TargetDevice, dtype: torch.dtype) -> bool:
        if self is SdpaChoice.AUTO:
            return device is TargetDevice.CUDA and dtype == torch.bfloat16
        return self is SdpaChoice.TRITON


class KvDtype(str, enum.Enum):
    """Storage of the full-attention layers' KV cache (sliding rings keep the model dtype)."""

    AUTO = "auto"  # the model dtype
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
    prefill_chunk: int | None = None  # --prefill-chunk: max tokens per prefill call (dynamic T); None = min(128, ctx)
    quant: LinearQuant = LinearQuant.INT4  # --quant: linear weights (lm_head included)
    group_size: int = 128  # --group-size: int4 group size along K (128, or 32: +1.3 GiB on the 31B, less error)
    embedding_quant: EmbeddingQuant = EmbeddingQuant.NONE  # --embedding-quant
    device: DeviceChoice = DeviceChoice.AUTO  # --device
    dtype: DTypeChoice = DTypeChoice.AUTO  # --dtype: activations and unquantized weights
    sdpa: SdpaChoice = SdpaChoice.AUTO  # --sdpa: attention kernel on cuda
    kv_dtype: KvDtype = KvDtype.AUTO  # --kv-dtype: full-attention KV cache storage (auto, bf16, int8, int4)
    autotune: bool = True  # --autotune/--no-autotune: Inductor max_autotune (cuda; slow compiles)
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
            return self.preset  # both set: validate() rejects it
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


@dataclass
class ExportResult:
    out_dir: Path
    metadata: dict
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    model: nn.Module | None = None  # the eager model exactly as exported (a parity reference)
    parked_bytes: int = 0  # weight bytes parked on disk while compiling (low-memory)


# ---- validation (cheap; runs before anything is loaded or compiled) -------------------------

def _fail(msg: str) -> None:
    raise ExportConfigError(msg)


def _check_checkpoint_dir(path: Path) -> None:
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


def validate(cfg: ExportConfig) -> tuple[Gemma4Config, TargetDevice, torch.dtype]:
    """Every check that can fail without loading weights; raises ExportConfigError."""
    mcfg = model_config(cfg)
    if not 2 <= cfg.ctx <= mcfg.max_position_embeddings:
        _fail(f"--ctx {cfg.ctx} is outside 2..{mcfg.max_position_embeddings} "
              f"(the model's max_position_embeddings); lower --ctx")
    if not 2 <= cfg.prefill_chunk <= cfg.ctx:
        _fail(f"--prefill-chunk {cfg.prefill_chunk} must be in 2..ctx ({cfg.ctx}); decode covers T = 1")
    if cfg.group_size not in (32, 128):
        _fail(f"--group-size {cfg.group_size}: use 128 (default) or 32")
    if cfg.device is DeviceChoice.CUDA and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    device = cfg.device.resolve()
    dtype = cfg.dtype.resolve(device)
    if device is TargetDevice.CUDA and cfg.quant is LinearQuant.INT4 and dtype != torch.bfloat16:
        _fail("--quant int4 on cuda runs bf16 int4 kernels: pass --dtype bfloat16 (or --quant none)")
    if cfg.sdpa is SdpaChoice.TRITON and (device is not TargetDevice.CUDA or dtype != torch.bfloat16):
        _fail("--sdpa triton needs --device cuda and --dtype bfloat16; use --sdpa auto or decomposed")
    if cfg.out is not None and Path(cfg.out).is_file():
        _fail(f"--out {cfg.out} is a file; pass a directory path")
    if cfg.checkpoint is None:
        _check_preset_fits(cfg, mcfg, dtype)
    if cfg.low_memory:
        try:
            from export.passes import low_memory_inductor_patches, low_memory_passes  # noqa: F401
        except ImportError as e:
            _fail(f"--low-memory: export.passes does not provide the low-memory passes yet ({e}); drop --low-memory")
    use_packaged_flatc()
    return mcfg, device, dtype


def use_packaged_flatc() -> None:
    """ExecuTorch's serializer runs `flatc` from PATH unless FLATC_EXECUTABLE names one; point
    it at the binary shipped inside the executorch package, so an interpreter started without
    its venv's bin/ on PATH still exports. A user's own FLATC_EXECUTABLE wins."""
    import os

    if os.environ.get("FLATC_EXECUTABLE"):
        return
    try:
        from importlib.resources import files
        flatc = Path(str(files("executorch.data.bin") / "flatc"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return  # no packaged binary: ExecuTorch looks on PATH as before
    if not flatc.is_file():
        return
    if not os.access(flatc, os.X_OK):
        try:
            flatc.chmod(flatc.stat().st_mode | 0o111)
        except OSError:
            _fail(f"{flatc} is not executable: chmod +x it, or set FLATC_EXECUTABLE to a flatc binary")
    os.environ["FLATC_EXECUTABLE"] = str(flatc)


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


# ---- model -----------------------------------------------------------------------------------

def build_model(cfg: ExportConfig, mcfg: Gemma4Config, dtype: torch.dtype, progress: bool = False,
                on_unit_loaded=None) -> nn.Module:
    """The eager model: a checkpoint's weights or a preset's seeded random ones
    (`RandomWeights`, drawn on the export device), handed unit by unit to `on_unit_loaded`."""
    if cfg.checkpoint is not None:
        from export.gemma4.checkpoint import load_model
        model = load_model(cfg.checkpoint, ctx=cfg.ctx, prefill_chunk=cfg.prefill_chunk, dtype=dtype,
                           on_unit_loaded=on_unit_loaded, progress=progress, kv_dtype=cfg.kv_dtype.value)
    else:  # seeded random weights, streamed unit by unit like a checkpoint load
        from export.gemma4.checkpoint import random_model
        draw_on = "cuda" if cfg.device.resolve() is TargetDevice.CUDA else "cpu"
        model = random_model(mcfg, ctx=cfg.ctx, prefill_chunk=cfg.prefill_chunk, dtype=dtype, seed=cfg.seed,
                             device=draw_on, on_unit_loaded=on_unit_loaded, progress=progress,
                             kv_dtype=cfg.kv_dtype.value)
    return model.eval()


def prepare_model(cfg: ExportConfig, progress: bool = False,
                  spool: WeightSpool | None = None) -> tuple[nn.Module, QuantReport]:
    """Validated config -> the model exactly as exported (quantized, on the export device).
    Tests call this too, to get an eager model with the artifact's weights.

    Quantization runs unit by unit as the checkpoint is read (bounded host memory: the
    float source of a layer is gone before the next layer is read). With a `spool`, each
    quantized unit is then parked on disk (export/spool.py), so host memory holds about
    one unit of weights at a time."""
    mcfg, device, dtype = validate(cfg)
    recipe = cfg.recipe()
    report = QuantReport()

    def quantize_unit(model: nn.Module, unit: str) -> None:
        quantize_(model, recipe, device, under=unit, report=report)
        if spool is not None:
            spool.park_module_(model.get_submodule(unit))

    model = build_model(cfg, mcfg, dtype, progress, on_unit_loaded=quantize_unit)
    if device is TargetDevice.CUDA and not cfg.low_memory:
        model.to("cuda")  # low-memory exports from the host; constants reach the GPU as zero-byte
    return model, report


# ---- export + lowering -------------------------------------------------------------------

def _example_inputs(model: nn.Module, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(model.buffers()).device
    return torch.zeros(1, T, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)


@torch.no_grad()
def export_methods(model: nn.Module, prefill_chunk: int) -> dict[str, torch.export.ExportedProgram]:
    """torch.export both entry points from the same instance (same KV buffers by FQN)."""
    T = torch.export.Dim("T", min=1, max=prefill_chunk)
    with math_sdpa():
        return _export_both(model, prefill_chunk, T)


def math_sdpa():
    """Trace SDPA with the MATH backend. Graphs record aten SDPA either way, but its fake
    output takes the chosen kernel's layout: CUDA's efficient-attention output (head_dim 512)
    is not viewable as model.py's `out.view(B, H, T, D)` asks, and every re-trace (export,
    to_edge decompositions) hit that on the H100. MATH's output is contiguous."""
    return torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH])


EXPORT_KW = dict(strict=False, prefer_deferred_runtime_asserts_over_guards=True)
"""Non-strict: strict export (dynamo) caches a real clone of every parameter it meets
(`real_value_cache`), i.e. a second copy of all weights in host memory and seconds of memcpy
per GiB, for both methods. Non-strict traces with fake tensors and touches no weight bytes.
Deferred asserts: stride arithmetic after the GQA reshapes yields guards such as
`T*min(16, 32*T) == 16*T`, true for every T >= 1, that the symbolic solver cannot prove;
they become runtime asserts instead of export errors."""


def _export_both(model: nn.Module, prefill_chunk: int, T) -> dict[str, torch.export.ExportedProgram]:
    prefill = torch.export.export(model, _example_inputs(model, prefill_chunk), dynamic_shapes=({1: T}, None),
                                  **EXPORT_KW)
    decode = torch.export.export(model, _example_inputs(model, 1), **EXPORT_KW)
    return {"prefill": prefill, "decode": decode}


def _EDGE_CONFIG():
    """Edge settings for a whole-graph AOTI delegate: the graph stays aten (Inductor compiles
    it; edge-op wrappers and dim-order ops only cost Python time, ~45% of a CPU export),
    and int4 dequant's shift (CPU) and torchao's _weight_int4pack_mm (CUDA) are allowed."""
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=False, _use_edge_ops=False, _skip_dim_order=True,
                             _core_aten_ops_exception_list=[torch.ops.aten.bitwise_right_shift.Tensor_Scalar,
                                                            torch.ops.aten._weight_int4pack_mm.default])


def lower(programs: dict, device: TargetDevice, low_memory: bool, triton_sdpa: bool, autotune: bool = True,
          progress: bool = False, multi_arch: bool = False):
    """to_edge + to_backend with the target's partitioner; one AOTI delegate per method.
    With `low_memory`, ExecuTorch's deep copies of the programs alias parked weights and
    lazy-zero KV caches (`shared_deepcopy`) instead of copying them."""
    from executorch.exir import to_edge_transform_and_lower

    partitioners = {m: [partitioner_for(device, m, low_memory=low_memory, triton_sdpa=triton_sdpa,
                                        autotune=autotune, multi_arch=multi_arch)]
                    for m in programs}
    with _bar(progress, total=len(programs), desc="lowering", unit="method",
              bar_format="{desc} {n}/{total} methods [{elapsed}{postfix}]") as bar, _ticking(bar):
        bar.set_postfix_str("to_edge: tracing to the edge dialect")

        def listener(method: str, stage: str) -> None:  # from each AOTI preprocess (export/backends)
            if stage == "compiled":
                bar.update(1)
            done = bar.n == len(programs)
            bar.set_postfix_str("all methods compiled" if done else
                                f"{method}: AOTInductor compile" if stage == "start" else f"{method}: compiled")
        PREPROCESS_LISTENERS.append(listener)
        try:
            # to_edge re-traces the graphs (MATH SDPA: same reason as in export_methods)
            with math_sdpa(), shared_deepcopy() if low_memory else contextlib.nullcontext():
                return to_edge_transform_and_lower(programs, partitioner=partitioners,
                                                   compile_config=_EDGE_CONFIG(),
                                                   constant_methods={"metadata": "{}"})
        finally:
            PREPROCESS_LISTENERS.remove(listener)


def compiled_methods(edge_manager) -> dict[str, CompiledMethod]:
    """The constant tables our backend left on each method's lowered module."""
    out = {}
    for method in edge_manager.methods:
        gm = edge_manager.exported_program(method).graph_module
        infos = [getattr(gm, n.target).meta.get("_delegate_info_meta") for n in gm.graph.nodes
                 if n.op == "get_attr" and n.target.startswith("lowered_module")]
        infos = [i for i in infos if isinstance(i, CompiledMethod)]
        if len(infos) != 1:
            raise RuntimeError(f"method {method}: expected one AOTI delegate, found {len(infos)} "
                               "(part of the graph was not lowered)")
        out[method] = infos[0]
    return out


# ---- the .ptd plan: AOTI constants -> the exporter's own tensors -------------------------------

def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by FQN, aliases (tied weights) included."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _subclass_parts(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors inside a traceable tensor subclass with their attribute paths,
    depth-first in `__tensor_flatten__` order: the order torch's `UnwrapTensorSubclass`
    numbers them (`original0`, `original1`, ...). A plain tensor is its own single part."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [("", t)]
    parts = []
    for attr in t.__tensor_flatten__()[0]:
        parts += [(f"{attr}.{sub}" if sub else attr, plain) for sub, plain in _subclass_parts(getattr(t, attr))]
    return parts


def _with_inner_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors by key, subclass weights (torchao int4) split into `fqn.<inner>` parts, and
    aliases from the FQN Inductor reports for a part to that key: aot_compile applies
    `unwrap_tensor_subclass_parameters`, so the .so names torchao's `q_proj.weight.qdata`
    `q_proj.parametrizations.weight.original0` (seen on the H100)."""
    out, aliases = dict(tensors), {}
    for fqn, t in tensors.items():
        parts = _subclass_parts(t)
        if parts[0][0] == "":
            continue
        owner, _, leaf = fqn.rpartition(".")
        prefix = f"{owner}.parametrizations.{leaf}" if owner else f"parametrizations.{leaf}"
        for i, (path, plain) in enumerate(parts):
            out[f"{fqn}.{path}"] = plain
            aliases[f"{prefix}.original{i}"] = f"{fqn}.{path}"
    return out, aliases


def _flat(name: str) -> str:
    """Compare names the way Inductor mangles them: dots to underscores, no export prefixes."""
    name = name.replace(".", "_")
    for prefix in ("L__self___", "p_", "b_"):
        name = name.removeprefix(prefix)
    return name


def _resolve(c, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
             flat: dict[str, str]) -> tuple[str, torch.Tensor] | None:
    """(.ptd key, tensor) for a compiled constant: its recorded FQN, else its mangled name;
    subclass parts under their `fqn.<inner>` key."""
    for candidate in (c.fqn, flat.get(_flat(c.fqn)), flat.get(_flat(c.name))):
        key = aliases.get(candidate, candidate)
        if key is not None and key in tensors:
            return key, tensors[key]
    return None


def _check_matches(key: str, t: torch.Tensor, info) -> None:
    if t.dtype != info.dtype or tuple(t.shape) != info.shape:
        raise RuntimeError(f"{key}: model tensor is {tuple(t.shape)} {t.dtype}, the compiled .so expects "
                           f"{info.shape} {info.dtype}")
    if not t.is_contiguous() or tuple(t.stride()) != info.stride:
        raise RuntimeError(f"{key}: the .so expects strides {info.stride}, the tensor has {tuple(t.stride())}; "
                           "only contiguous constants are supported")


def plan_ptd(model: nn.Module, compiled: dict[str, CompiledMethod], kv_fqns: set[str],
             kv_in_ptd: bool) -> tuple[list[PtdTensor], dict[str, dict[str, str]]]:
    """The .ptd tensors (each once, first-seen order) and, per method, constant -> .ptd key.

    KV buffers map to their FQN in every method (the runner binds its own allocation) and
    are written only with `kv_in_ptd` (as zeros).
    """
    tensors, aliases = _with_inner_tensors(model_tensors(model))
    flat = {_flat(k): k for k in [*tensors, *aliases]}
    plan: dict[str, PtdTensor] = {}
    mapping: dict[str, dict[str, str]] = {}
    for method, cm in compiled.items():
        mapping[method] = {}
        for c in cm.constants:
            key = c.fqn
            if c.fqn in kv_fqns:
                if kv_in_ptd and key not in plan:
                    plan[key] = PtdTensor(key, c.shape, c.dtype, lambda c=c: torch.zeros(c.shape, dtype=c.dtype))
            elif (found := _resolve(c, tensors, aliases, flat)) is not None:
                key, t = found
                _check_matches(key, t, c)
                plan.setdefault(key, PtdTensor.of(key, t))
            elif c.kind is ConstantKind.TENSOR_CONSTANT and c.value is not None:
                key = f"{method}::{c.name}"
                plan[key] = PtdTensor.of(key, c.value.contiguous())
            else:
                raise RuntimeError(f"method {method}: AOTI constant {c.name} (FQN {c.fqn}) is not a model "
                                   "tensor; cannot store it in the .ptd")
            mapping[method][c.name] = key
    return list(plan.values()), mapping


# ---- metadata -------------------------------------------------------------------------------

def _eos_ids(cfg: ExportConfig, mcfg: Gemma4Config) -> list[int]:
    """config.json's eos ids plus generation_config.json's (instruct models add <end_of_turn>)."""
    ids = list(mcfg.eos_token_ids)
    gen = Path(cfg.checkpoint) / "generation_config.json" if cfg.checkpoint else None
    if gen is not None and gen.is_file():
        extra = json.loads(gen.read_text()).get("eos_token_id", [])
        ids += [i for i in (extra if isinstance(extra, list) else [extra]) if i not in ids]
    return ids


def _cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_metadata(cfg: ExportConfig, mcfg: Gemma4Config, model: nn.Module, device: TargetDevice,
                   dtype: torch.dtype, report: QuantReport, mapping: dict[str, dict[str, str]],
                   pair_id: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "pair_id": pair_id,
        "device": device.value,
        # cuda kernels run on this GPU architecture only, unless built as fatbins
        "cuda_arch": _cuda_arch() if device is TargetDevice.CUDA else None,
        "multi_arch_kernels": cfg.multi_arch_kernels,
        "dtype": str(dtype).removeprefix("torch."),
        "config": json.loads(json.dumps(asdict(mcfg))),
        "ctx": cfg.ctx,
        "prefill_chunk": cfg.prefill_chunk,
        "sliding_window": mcfg.sliding_window,
        "ring_size": model.ring_size,
        "bos_token_id": mcfg.bos_token_id,
        "eos_token_ids": _eos_ids(cfg, mcfg),
        "vocab_size": mcfg.vocab_size,
        "quant": {**cfg.recipe().summary(), "int4_modules": len(report.int4),
                  "float_linears": sorted(report.skipped)},
        "kv_in_ptd": cfg.kv_in_ptd,
        "kv_dtype": cfg.kv_dtype.value,  # full layers' cache; "kv" lists every buffer's dtype and shape
        "kv": model.kv_cache_specs(),
        "methods": {m: {"constants": consts} for m, consts in mapping.items()},
    }


# ---- writing --------------------------------------------------------------------------------

def write_artifact(out: Path, et_program, tensors: list[PtdTensor], pair_id: str,
                   checkpoint: Path | None, progress: bool = False, vocab_size: int | None = None) -> dict[str, int]:
    """model.pte + model.ptd (+ tokenizer files), all or nothing; returns file sizes."""
    with atomic_output_dir(out) as tmp:
        with open(tmp / "model.pte", "wb") as f:
            et_program.write_to_file(f)
        total = sum(t.nbytes for t in tensors)
        with _bar(progress, total=total, desc="writing model.ptd", unit="B", unit_scale=True) as bar:
            write_ptd(tmp / "model.ptd", tensors, {"gemma4_pair_id": pair_id.encode()}, progress=bar.update)
        for name in TOKENIZER_FILES if checkpoint else ():
            if (Path(checkpoint) / name).is_file():
                shutil.copyfile(Path(checkpoint) / name, tmp / name)
        if checkpoint is None and vocab_size and vocab_size >= MIN_STANDIN_VOCAB:
            write_tokenizer(tmp / "tokenizer.json", vocab_size)  # a preset has no tokenizer of its own
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())}


def export_model(cfg: ExportConfig, progress: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """The whole export; see the module docstring."""
    mcfg, device, dtype = validate(cfg)
    compile_workers.start()  # they import torch while the model loads and traces
    # low-memory: quantized weights wait on disk (an unlinked file beside --out), not in RAM
    with WeightSpool(cfg.out_dir.parent) if cfg.low_memory else contextlib.nullcontext() as spool:
        return _export(cfg, mcfg, device, dtype, spool, progress, log)


def _export(cfg: ExportConfig, mcfg: Gemma4Config, device: TargetDevice, dtype: torch.dtype,
            spool: WeightSpool | None, progress: bool, log: Callable[[str], None]) -> ExportResult:
    from executorch.exir import ExecutorchBackendConfig

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model, report = prepare_model(cfg, progress, spool=spool)
    times["load_and_quantize"] = time.perf_counter() - t0
    log(f"model ready: {len(report.int4)} int4 linears, {len(report.skipped)} left in {dtype}"
        + (f"; {spool.parked_bytes / 2**30:.2f} GiB parked on disk" if spool is not None else ""))

    t = time.perf_counter()
    programs = export_methods(model, cfg.prefill_chunk)
    times["torch_export"] = time.perf_counter() - t

    t = time.perf_counter()
    waited = compile_workers.wait_ready()  # else every kernel compiles in-process, one after another
    if waited is not None:
        times["compile_workers_wait"] = waited  # part of "lower"
    edge = lower(programs, device, cfg.low_memory, cfg.sdpa.use_triton(device, dtype), cfg.autotune, progress,
                 multi_arch=cfg.multi_arch_kernels)
    del programs
    times["lower"] = time.perf_counter() - t

    kv_fqns = {s["fqn"] for s in model.kv_cache_specs()}
    tensors, mapping = plan_ptd(model, compiled_methods(edge), kv_fqns, cfg.kv_in_ptd)
    pair_id = secrets.token_hex(16)
    metadata = build_metadata(cfg, mcfg, model, device, dtype, report, mapping, pair_id)
    text = json.dumps(metadata, sort_keys=True)
    # to_edge_transform_and_lower took the constant methods before the constant tables existed;
    # ExecuTorch 1.2 keeps them (and the named data) on these attributes until to_executorch.
    edge._config_methods["metadata"] = text
    edge._named_data_store.add_named_data("gemma4_metadata", text.encode(), 1, None)

    t = time.perf_counter()
    et_program = edge.to_executorch(ExecutorchBackendConfig())
    sizes = write_artifact(cfg.out_dir, et_program, tensors, pair_id, cfg.checkpoint, progress,
                           vocab_size=mcfg.vocab_size)
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    return ExportResult(out_dir=cfg.out_dir, metadata=metadata, seconds=times, sizes=sizes, model=model,
                        parked_bytes=spool.parked_bytes if spool is not None else 0)


class _NullBar:
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@contextlib.contextmanager
def _ticking(bar, every_s: float = 1.0):
    """Redraw `bar` every second, so its elapsed time moves during a minute-long compile."""
    if isinstance(bar, _NullBar):
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every_s):
            bar.refresh()

    thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _bar(enabled: bool, **kw):
    """A tqdm bar when progress is on, else a no-op with the same interface."""
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(**kw)
