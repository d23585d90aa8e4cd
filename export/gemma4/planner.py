"""Memory planner: will this export, and its artifact at run time, fit the card?

Pure arithmetic over a `Gemma4Config` and the export options (no torch, no GPU), so it runs
before a 20-minute export and in CPU tests. It predicts five peaks:

    runtime GPU          weights once + KV (rings for sliding layers) + the prefill chunk's
                         working set + logits + workspace + CUDA context
    export GPU stock     every constant real on the GPU, roughly doubled while lowering
    export GPU low-mem   the program's constants zero-byte: the largest one made real for an
                         autotune call (+ the eager model, which export.py keeps on the GPU)
    export GPU quantize  torchao's int4 packing of the largest linear (it runs on CUDA)
    export host          naive (whole model in RAM) or streaming (int4 + one bf16 unit)

Every coefficient that is not plain tensor arithmetic is a named constant below, documented
by the measurement it was fitted on; GPU runs will refit them. A peak is a list of `Item`s:
items inside torch's caching allocator add up to the allocator peak
(`torch.cuda.max_memory_allocated`), the others (CUDA context, reserved slack) bring it to
the device figure (NVML), which is what a budget is compared with.

    python -m export.gemma4.planner --preset 31b --ctx 131072 --gpu-budget 24GiB

Not modelled yet: CPU exports (the GPU peaks assume the CUDA backend), a runner that
allocates one arena instead of a tensor per constant (drop ALLOC_SLACK), expert weights
dequantized whole inside the graph (the model's prefill runs every expert).

The export CLI wires it as (PlanInputs' defaults are the exporter's):

    inputs = PlanInputs(config, ctx=1024, prefill_chunk=cfg.prefill_chunk, linear=cfg.quant,
                        group_size=cfg.group_size, embedding=cfg.embedding_quant,
                        dtype="bfloat16", low_memory=cfg.low_memory)
    ctx = resolve_ctx(inputs, args.ctx, Budget(gpu_bytes))  # "auto" or an int; DoesNotFit
    print(render_table(plan(replace(inputs, ctx=ctx))))     # --plan
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from enum import Enum

from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.quant import GROUP_SIZES, EmbeddingQuant, LinearQuant

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# ---- model terms (fitted or measured; refit from GPU runs) ---------------------------------

CUDA_CONTEXT_BYTES = round(0.60 * GiB)
"""Device memory outside the caching allocator (CUDA context, kernel images). NVML minus
allocator peak of two low-memory compiles on an H100: 0.85 - 0.25 = 0.60 GiB (toy),
3.28 - 2.67 = 0.61 GiB (31B-width slice)."""

KERNEL_WORKSPACE_BYTES = round(0.47 * GiB)
"""Device memory the runner uses outside the caching allocator beyond the CUDA context
(cuBLAS/Triton workspaces, the two .so's kernel images, cached blocks of libraries).
Fitted on one run (H100, 2026-11-22, `scripts/bench_runtime.py`, 31B 2-layer int4 slice at
ctx 8192): NVML 5.40 GiB - allocator 4.31 - context 0.60 - slack 0.02 = 0.47 GiB. It was a
64 MiB guess before, which put the runtime total 7% under the measurement."""

LARGE_ALLOC_BYTES = 10 * MiB
ALLOC_SLACK_PER_LARGE_TENSOR = 1 * MiB
"""The caching allocator gives requests over 10 MiB their own segment rounded up to 2 MiB:
about 1 MiB reserved-but-unused per such tensor when the runner allocates each constant
and KV buffer separately. An estimate from the allocator's rounding rule."""

# Stock and low-memory export peaks: H100, 2026-11-23, `scripts/bench_export_memory.py --parallel 6
# --no-autotune --runs stock:6:C,low:6:C` for C = 8192, 32768, 131072 (the 31B 6-layer slice,
# int4 g32, bf16; planner weights 5.428 GiB, KV 0.150 / 0.338 / 1.088 GiB). Allocator peaks:
# stock 21128429568 / 22135062528 / 26161594368 B, low-memory 2843811328 B at all three.
# The factors below come from the 8k and 128k runs; 32k is the check (predicted within 0.01%).

STOCK_KV_FACTOR = (26161594368 - 21128429568) / ((1.0878143310546875 - 0.1503143310546875) * GiB)
"""Stock export: allocator bytes per byte of KV cache while lowering (5.00): the eager
model's cache on the GPU, ExecuTorch's two deep copies of each program, the device move and
Inductor's constant all hold one. From the 8k -> 128k difference."""

STOCK_WEIGHT_FACTOR = (21128429568 - STOCK_KV_FACTOR * 0.1503143310546875 * GiB) / (5.427686225622892 * GiB)
"""Stock export: allocator bytes per byte of weights while lowering (3.49; the int4
subclasses are unwrapped once instead of deep-copied as tensors). From the 8k run, after its KV."""

STOCK_RESERVED_SLACK = (21143486464 - 21128429568) / 21128429568
"""Stock export: reserved-but-unallocated fraction at the peak (0.07%: expandable segments,
which the CLI and the benchmark turn on)."""

STOCK_METHODS_RESIDENT = 1
"""Methods whose GPU constants are alive at once in a stock export (prefill and decode are
lowered one after the other); the factors above were measured over both methods."""

LOWMEM_WORKSPACE_BYTES = 2843811328 - 262144 * 5376 * 2
"""Low-memory export: allocator peak minus the largest constant made real for an autotune
call (24 MiB): 2843811328 B with the 262144 x 5376 bf16 (2.625 GiB) table, the same at 8k,
32k and 128k, and at 2, 4 and 6 layers (2026-11-22, before expandable segments: 2.71 GiB)."""

LOWMEM_RESERVED_SLACK_BYTES = 2856321024 - 2843811328
"""Low-memory export: the allocator's reserved-but-unallocated bytes at the peak (12 MiB with
expandable segments; 1.59 GiB without them). With the CUDA context that gives the
per-process NVML figure, 3.26 GiB."""

QUANT_TRANSIENT_BYTES_PER_PARAM = 10.4
"""torchao 0.17 `Int4TilePackedTo4dTensor.from_hp` (which requires CUDA) holds, above its
bf16 input: the padded bf16 copy, int32 codes, bf16 temporaries and the packed nibbles.
Measured on the CPU (peak RSS) running the same steps on 8192 x 5376 and 16384 x 6144:
10.33 and 10.38 bytes per padded parameter."""

QUANT_ROWS_PER_CHUNK = 16384
"""Rows of a weight quantized at once (0: the whole tensor). export/gemma4/quant.py packs
weights taller than 4x this (the lm_head) in row blocks (`CUDA_PACK_ROWS`), one block on the
GPU at a time, so the transient is one block's."""

QUANT_RESULTS_STAY_ON_GPU = False
"""export/gemma4/quant.py packs each int4 weight on the GPU and leaves it there, so the
largest weight (lm_head, quantized last) is packed beside every other int4 weight."""

EXPORT_EAGER_MODEL_ON_GPU = False
"""export/gemma4/export.py `prepare_model` moves the quantized eager model (weights and KV)
to the GPU for a CUDA export and keeps it through lowering; low-memory mode zeroes the
exported program's constants, not the eager model's."""

HOST_BASE_BYTES = round(0.68 * GiB)
"""Export process before any weight: interpreter, torch, ExecuTorch, torchao and the CUDA
context. `scripts/bench_host_memory.py` baseline on the H100 (2026-11-23): 0.68-0.69 GiB in
all eight runs."""

COMPILE_HOST_BYTES = round((4.12 - 0.68) * GiB)
"""Host memory of lowering beyond the process base when the weights are parked (low-memory):
traced graphs, Inductor's compile state, ExecuTorch's programs. The 31B 6-layer low-memory
exports' lowering phase held 4.09-4.12 GiB RSS at 8k, 32k and 128k (H100, 2026-11-23)."""

LOW_MEMORY_UNIT_READ_FACTOR = (4895686656 - HOST_BASE_BYTES) / (262144 * 5376 * 2)
"""Low-memory export, host peak above the base per byte of the largest float unit (1.48): the
unit's own copy while it is read and quantized, plus, for a tied head, the parked table's
pages read back to quantize the head. Fitted on the 31B 2-layer export from a bf16
checkpoint (4895686656 B peak RSS, the 2.625 GiB embedding); the 6-layer export (4.62 GiB)
is the check (H100, 2026-11-23, after the loader stopped memory-mapping shards: 5.92 and
5.94 GiB before)."""

MATH_SCORE_BUFFERS = 2
MATH_KV_UPCAST_BUFFERS = 2
MATH_MASK_BYTES = 4
"""SDPA decomposed on the MATH backend (what export.py gets unless the dtype is bf16; traced with torch 2.11):
q, K, V are copied to fp32, scores [H, T, S] fp32 get an additive fp32 mask and a
`_safe_softmax`, so at the softmax scores and probabilities (2 fp32 buffers), the layer's
K and V in fp32 (2 buffers) and the fp32 mask [G*T, S] can all be live. An upper envelope:
Inductor may fuse some of them away."""

LOGITS_BUFFERS = 3
"""[1, vocab]: lm_head output, its fp32 copy, the softcapped result."""

MLP_LIVE_WIDTHS = 3
"""[T, intermediate] buffers live in the MLP: gate, up, gelu(gate) * up."""

INT4_K_MULTIPLE, INT4_N_MULTIPLE = 1024, 8
"""torchao 0.17 tile_packed_to_4d pads in_features to 1024 and out_features to 8 (the
activations are padded the same way at run time)."""

EMBED_INT8_SCALE_BYTES = 2
"""int8 embedding: one bf16 scale per row."""

CTX_GRANULARITY = 1024


def model_terms() -> dict[str, float | int | bool]:
    """The coefficients above, recorded in every JSON plan so a measurement can be refitted."""
    names = ("CUDA_CONTEXT_BYTES", "KERNEL_WORKSPACE_BYTES", "ALLOC_SLACK_PER_LARGE_TENSOR", "STOCK_WEIGHT_FACTOR",
             "STOCK_KV_FACTOR",
             "STOCK_RESERVED_SLACK", "STOCK_METHODS_RESIDENT", "LOWMEM_WORKSPACE_BYTES", "LOWMEM_RESERVED_SLACK_BYTES",
             "QUANT_TRANSIENT_BYTES_PER_PARAM", "QUANT_ROWS_PER_CHUNK", "QUANT_RESULTS_STAY_ON_GPU",
             "EXPORT_EAGER_MODEL_ON_GPU", "HOST_BASE_BYTES", "COMPILE_HOST_BYTES", "LOW_MEMORY_UNIT_READ_FACTOR", "MATH_SCORE_BUFFERS",
             "MATH_KV_UPCAST_BUFFERS", "MATH_MASK_BYTES", "LOGITS_BUFFERS", "MLP_LIVE_WIDTHS")
    return {n: globals()[n] for n in names}


# ---- options -----------------------------------------------------------------------------


class Int4Layout(str, Enum):
    """TINYGEMM: torchao 0.17 tile_packed_to_4d (CUDA): K padded to 1024, N to 8, a bf16
    scale and zero point per group. TINYGEMM_K128: the same packing with K padded only to
    what `_convert_weight_to_int4pack` needs (inner_k_tiles 8 x 16 = 128; a packer of our
    own, not yet written or run). PLAIN: nibbles + one bf16 scale per group, no padding: what
    the CUDA recipe writes (`PackedInt4Linear`, read by `gemma4::int4_linear`); its group size
    is halved, down to 32, where K needs it (export/kernels/int4_matmul.group_size_for)."""

    TINYGEMM = "tinygemm"
    TINYGEMM_K128 = "tinygemm-k128"
    PLAIN = "plain"

    @property
    def k_multiple(self) -> int:
        return {Int4Layout.TINYGEMM: INT4_K_MULTIPLE, Int4Layout.TINYGEMM_K128: 128}.get(self, 1)

    @property
    def tinygemm(self) -> bool:
        return self is not Int4Layout.PLAIN


class DType(str, Enum):
    BF16 = "bfloat16"
    FP16 = "float16"
    FP32 = "float32"

    @property
    def bytes(self) -> int:
        return 4 if self is DType.FP32 else 2


class KvQuant(str, Enum):
    """Quantized KV of the full-attention layers (export --kv-dtype int8 / int4): codes plus an
    fp16 scale per token and head for K and for V; sliding rings keep the model dtype."""

    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return 8 if self is KvQuant.INT8 else 4


KV_SCALE_BYTES = 2  # fp16 scale per token and head (export/kernels/attention.py quantize_kv)


class AttentionImpl(str, Enum):
    """TRITON: `triton::sdpa` (export.py turns it on for CUDA + bf16): no score matrix, only
    the bool mask. MATH: SDPA decomposed (any other dtype): fp32 scores and K/V copies."""

    MATH = "math"
    TRITON = "triton"


class Loader(str, Enum):
    """NAIVE: the whole model in its dtype in host RAM. STREAMING: quantized
    weights + one layer of bf16 + fixed overhead."""

    NAIVE = "naive"
    STREAMING = "streaming"


@dataclass(frozen=True)
class PlanInputs:
    config: Gemma4Config
    ctx: int = 2048
    prefill_chunk: int = 128  # tokens per prefill step
    linear: LinearQuant = LinearQuant.INT4  # every nn.Linear but the MoE router; lm_head untied
    group_size: int = 32
    int4_layout: Int4Layout = Int4Layout.TINYGEMM
    experts: LinearQuant | None = None  # MoE expert stacks; None: as `linear`
    embedding: EmbeddingQuant = EmbeddingQuant.NONE  # embed_tokens and the PLE table
    dtype: DType = DType.BF16  # unquantized weights and activations
    kv_dtype: DType | KvQuant | None = None  # None: the model dtype; int8/int4: full layers quantized
    attention: AttentionImpl | None = None  # None: TRITON for bf16, MATH otherwise (as export.py)
    low_memory: bool = False
    loader: Loader = Loader.NAIVE

    def __post_init__(self):
        dtype = DType(self.dtype)
        derived = {"experts": self.linear, "kv_dtype": dtype,
                   "attention": AttentionImpl.TRITON if dtype is DType.BF16 else AttentionImpl.MATH}
        for name, enum in (("linear", LinearQuant), ("int4_layout", Int4Layout), ("experts", LinearQuant),
                           ("embedding", EmbeddingQuant), ("dtype", DType), ("kv_dtype", DType),
                           ("attention", AttentionImpl), ("loader", Loader)):
            value = getattr(self, name)
            if name == "kv_dtype" and value is not None and str(getattr(value, "value", value)) in KvQuant._value2member_map_:
                object.__setattr__(self, name, KvQuant(value))
                continue
            object.__setattr__(self, name, enum(derived[name] if value is None else value))  # strings too
        if self.ctx < 1 or self.prefill_chunk < 1:
            raise ValueError(f"ctx ({self.ctx}) and prefill_chunk ({self.prefill_chunk}) must be positive")
        if self.ctx > self.config.max_position_embeddings:
            raise ValueError(f"ctx {self.ctx} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size}: int4 supports {' or '.join(map(str, GROUP_SIZES))}")


# ---- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""
    in_allocator: bool = True  # False: only the device figure (NVML) sees it
    reference: bool = False  # shown for comparison, counted nowhere

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "gib": round(self.bytes / GiB, 3), "note": self.note,
                "in_allocator": self.in_allocator, "reference": self.reference}


@dataclass(frozen=True)
class Peak:
    title: str
    items: tuple[Item, ...]

    @property
    def allocator_bytes(self) -> int:
        return sum(i.bytes for i in self.items if i.in_allocator and not i.reference)

    @property
    def total_bytes(self) -> int:
        """The device figure (GPU) or the RSS (host): what a budget is compared with."""
        return sum(i.bytes for i in self.items if not i.reference)

    def to_dict(self) -> dict:
        return {"title": self.title, "total_bytes": self.total_bytes, "total_gib": round(self.total_bytes / GiB, 3),
                "allocator_bytes": self.allocator_bytes, "items": [i.to_dict() for i in self.items]}


@dataclass(frozen=True)
class Tensor:
    """`count` stored tensors of `bytes` each (a quantized linear stores two: data, scales)."""

    kind: str
    name: str
    count: int
    bytes: int
    int4: bool = False  # packed int4 data or its scales


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    ring_slots: int
    tensors: tuple[Tensor, ...]  # every stored weight tensor
    kv: tuple[Item, ...]  # counted items, then the reference "window only" figure (not counted)
    runtime_gpu: Peak
    export_gpu_stock: Peak
    export_gpu_low_memory: Peak
    export_gpu_quantize: Peak
    export_host_naive: Peak
    export_host_streaming: Peak

    @property
    def weights(self) -> tuple[Item, ...]:
        return _weights_by_kind(self.tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(t.count * t.bytes for t in self.tensors)

    @property
    def kv_bytes(self) -> int:
        return sum(i.bytes for i in self.kv if not i.reference)

    @property
    def export_gpu(self) -> Peak:
        """The export's GPU peak in the chosen mode: compiling or quantizing, whichever is larger."""
        compile_peak = self.export_gpu_low_memory if self.inputs.low_memory else self.export_gpu_stock
        return max(compile_peak, self.export_gpu_quantize, key=lambda p: p.total_bytes)

    @property
    def export_host(self) -> Peak:
        return self.export_host_streaming if self.inputs.loader is Loader.STREAMING else self.export_host_naive

    def peaks(self) -> dict[str, Peak]:
        return {"runtime_gpu": self.runtime_gpu, "export_gpu_stock": self.export_gpu_stock,
                "export_gpu_low_memory": self.export_gpu_low_memory, "export_gpu_quantize": self.export_gpu_quantize,
                "export_host_naive": self.export_host_naive, "export_host_streaming": self.export_host_streaming}

    def to_dict(self) -> dict:
        inp = self.inputs
        options = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(inp).items() if k != "config"}
        return {
            "model": preset_name(inp.config), "options": options, "config": asdict(inp.config),
            "ring_slots": self.ring_slots,
            "weights": [i.to_dict() for i in self.weights], "weights_bytes": self.weights_bytes,
            "kv": [i.to_dict() for i in self.kv], "kv_bytes": self.kv_bytes,
            "peaks": {k: p.to_dict() for k, p in self.peaks().items()},
            "export_gpu_bytes": self.export_gpu.total_bytes, "export_gpu_phase": self.export_gpu.title,
            "runtime_gpu_bytes": self.runtime_gpu.total_bytes, "export_host_bytes": self.export_host.total_bytes,
            "model_terms": model_terms(),
        }


# ---- weights -----------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def int4_bytes(n_out: int, k_in: int, group_size: int, layout: Int4Layout) -> tuple[int, int]:
    """(packed data, scales) bytes of one int4 [n_out, k_in] weight."""
    if layout.tinygemm:
        n, k, per_group = _round_up(n_out, INT4_N_MULTIPLE), _round_up(k_in, math.lcm(layout.k_multiple, group_size)), 4
    else:
        while k_in % group_size and group_size > 32:  # as PackedInt4Linear picks it
            group_size //= 2
        n, k, per_group = n_out, _round_up(k_in, group_size), 2  # scale only
    return n * k // 2, n * (k // group_size) * per_group  # tinygemm: a scale and a zero point per group


def _linear(inp: PlanInputs, kind: str, name: str, count: int, n_out: int, k_in: int, experts: int = 0) -> list[Tensor]:
    """Stored tensors of `count` linears [n_out, k_in] (or 3-D expert stacks [experts, n_out, k_in])."""
    stack = max(experts, 1)
    if count == 0:
        return []
    if (inp.experts if experts else inp.linear) is LinearQuant.NONE:
        return [Tensor(kind, name, count, stack * n_out * k_in * inp.dtype.bytes)]
    data, scales = int4_bytes(n_out, k_in, inp.group_size, inp.int4_layout)
    return [Tensor(kind, f"{name} (int4)", count, stack * data, int4=True),
            Tensor(kind, f"{name} (scales)", count, stack * scales, int4=True)]


def _attention_tensors(inp: PlanInputs) -> list[Tensor]:
    c = inp.config
    out = []
    for kind_name, sliding in (("sliding", True), ("full", False)):
        layers = [i for i in range(c.num_hidden_layers) if c.is_sliding(i) == sliding]
        if not layers:
            continue
        i0, H = layers[0], c.hidden_size
        q_width = c.num_attention_heads * c.layer_head_dim(i0)
        kv_width = c.layer_kv_heads(i0) * c.layer_head_dim(i0)
        owners = sum(1 for i in layers if not c.is_kv_shared(i))  # shared layers have no k/v
        v_owners = 0 if c.uses_k_eq_v(i0) else owners
        out += _linear(inp, "attention", f"q_proj {kind_name}", len(layers), q_width, H)
        out += _linear(inp, "attention", f"k_proj {kind_name}", owners, kv_width, H)
        out += _linear(inp, "attention", f"v_proj {kind_name}", v_owners, kv_width, H)
        out += _linear(inp, "attention", f"o_proj {kind_name}", len(layers), H, q_width)
    return out


def _mlp_tensors(inp: PlanInputs) -> list[Tensor]:
    c = inp.config
    widths: dict[int, int] = {}
    for i in range(c.num_hidden_layers):
        widths[c.layer_intermediate_size(i)] = widths.get(c.layer_intermediate_size(i), 0) + 1
    out = []
    for inter, n in sorted(widths.items()):
        for proj in ("gate_proj", "up_proj"):
            out += _linear(inp, "mlp", f"{proj} {inter}", n, inter, c.hidden_size)
        out += _linear(inp, "mlp", f"down_proj {inter}", n, c.hidden_size, inter)
    if c.enable_moe_block:
        L, E, I, H = c.num_hidden_layers, c.num_experts, c.moe_intermediate_size, c.hidden_size
        out += _linear(inp, "moe experts", "experts.gate_up_proj", L, 2 * I, H, experts=E)
        out += _linear(inp, "moe experts", "experts.down_proj", L, H, I, experts=E)
        out.append(Tensor("moe router", "router.proj", L, E * H * inp.dtype.bytes))  # kept in dtype: tiny, accuracy
    return out


def _table(inp: PlanInputs, kind: str, name: str, rows: int, dim: int) -> list[Tensor]:
    """An embedding table: int8 rows + a scale per row, or in the model dtype."""
    if inp.embedding is EmbeddingQuant.INT8:
        return [Tensor(kind, f"{name} (int8)", 1, rows * dim), Tensor(kind, f"{name} (scales)", 1, rows * EMBED_INT8_SCALE_BYTES)]
    return [Tensor(kind, name, 1, rows * dim * inp.dtype.bytes)]


def _embedding_tensors(inp: PlanInputs) -> list[Tensor]:
    c = inp.config
    out = _table(inp, "embedding", "embed_tokens", c.vocab_size, c.hidden_size)
    tied_dense = c.tie_word_embeddings and inp.linear is LinearQuant.NONE and inp.embedding is EmbeddingQuant.NONE
    if not tied_dense:  # a quantized lm_head is its own (untied) tensor
        out += _linear(inp, "lm_head", "lm_head", 1, c.vocab_size, c.hidden_size)
    if c.has_ple:
        L, P, H = c.num_hidden_layers, c.hidden_size_per_layer_input, c.hidden_size
        out += _table(inp, "ple table", "embed_tokens_per_layer", c.vocab_size_per_layer_input, L * P)
        out += _linear(inp, "ple linears", "per_layer_model_projection", 1, L * P, H)
        out += _linear(inp, "ple linears", "per_layer_input_gate", L, P, H)
        out += _linear(inp, "ple linears", "per_layer_projection", L, H, P)
    return out


def small_param_count(c: Gemma4Config) -> int:
    """Norm weights and router scales: the 1-D parameters, kept in the model dtype."""
    n = c.hidden_size  # final norm
    for i in range(c.num_hidden_layers):
        n += 4 * c.hidden_size  # input/post-attention/pre-ff/post-ff norms
        n += c.layer_head_dim(i) * (1 if c.is_kv_shared(i) else 2)  # q_norm (+ k_norm)
        if c.enable_moe_block:
            n += 3 * c.hidden_size + c.hidden_size + c.num_experts  # 3 norms, router.scale, per_expert_scale
        if c.has_ple:
            n += c.hidden_size  # post_per_layer_input_norm
    if c.has_ple:
        n += c.hidden_size_per_layer_input  # per_layer_projection_norm
    return n


def weight_tensors(inp: PlanInputs) -> tuple[Tensor, ...]:
    c, a = inp.config, inp.dtype.bytes
    small = [Tensor("norms & scalars", "norm weights, router scales", 1, small_param_count(c) * a),
             Tensor("norms & scalars", LAYER_SCALAR, c.num_hidden_layers, a)]  # a buffer in transformers
    return tuple(_attention_tensors(inp) + _mlp_tensors(inp) + _embedding_tensors(inp) + small)


LAYER_SCALAR = "layer_scalar"


def param_count(c: Gemma4Config) -> int:
    """Parameters of the checkpoint's text model as transformers counts them: the tied
    lm_head once, layer_scalar (a buffer there) not at all."""
    dense = PlanInputs(c, ctx=min(1024, c.max_position_embeddings), linear=LinearQuant.NONE,
                       embedding=EmbeddingQuant.NONE, dtype=DType.FP32)
    return sum(t.count * t.bytes for t in weight_tensors(dense) if t.name != LAYER_SCALAR) // 4


def linear_param_count(c: Gemma4Config) -> int:
    """Parameters of the decoder's linears and experts (no lm_head, no embeddings)."""
    dense = PlanInputs(c, ctx=min(1024, c.max_position_embeddings), linear=LinearQuant.NONE, dtype=DType.FP32)
    kinds = ("attention", "mlp", "moe experts", "ple linears")
    return sum(t.count * t.bytes for t in weight_tensors(dense) if t.kind in kinds) // 4


def _weights_by_kind(tensors: tuple[Tensor, ...]) -> tuple[Item, ...]:
    kinds: dict[str, int] = {}
    for t in tensors:
        kinds[t.kind] = kinds.get(t.kind, 0) + t.count * t.bytes
    return tuple(Item(f"weights: {k}", b) for k, b in kinds.items())


# ---- KV cache ----------------------------------------------------------------------------


def layer_slots(inp: PlanInputs, i: int) -> int:
    c = inp.config
    return c.ring_slots(inp.ctx, inp.prefill_chunk) if c.is_sliding(i) else inp.ctx


def kv_layer_bytes(inp: PlanInputs, i: int, slots: int | None = None) -> int:
    """K and V of layer i: 2 x [1, kv_heads, slots, head_dim]; 0 for a KV-shared layer. With a
    quantized kv_dtype a full layer holds head_dim codes of that width plus an fp16 scale per
    slot and head (K and V each); sliding rings stay in the model dtype."""
    c = inp.config
    if c.is_kv_shared(i):
        return 0
    slots = layer_slots(inp, i) if slots is None else slots
    D = c.layer_head_dim(i)
    if isinstance(inp.kv_dtype, KvQuant):
        if c.is_sliding(i):
            return 2 * c.layer_kv_heads(i) * slots * D * inp.dtype.bytes
        return 2 * c.layer_kv_heads(i) * slots * (D * inp.kv_dtype.bits // 8 + KV_SCALE_BYTES)
    return 2 * c.layer_kv_heads(i) * slots * D * inp.kv_dtype.bytes


def kv_items(inp: PlanInputs) -> tuple[Item, ...]:
    c = inp.config
    owners = [i for i in range(c.num_hidden_layers) if not c.is_kv_shared(i)]
    sliding = [i for i in owners if c.is_sliding(i)]
    full = [i for i in owners if not c.is_sliding(i)]
    ring = c.ring_slots(inp.ctx, inp.prefill_chunk)
    window = min(c.sliding_window, inp.ctx)
    shared = f"; {c.num_kv_shared_layers} KV-shared layers hold none" if c.num_kv_shared_layers else ""
    return (
        Item("kv: full layers", sum(kv_layer_bytes(inp, i) for i in full), f"{len(full)} x {inp.ctx} slots{shared}"),
        Item("kv: sliding layers (ring)", sum(kv_layer_bytes(inp, i) for i in sliding), f"{len(sliding)} x {ring}-slot ring"),
        Item("kv: sliding held to the window", sum(kv_layer_bytes(inp, i, window) for i in sliding),
             f"reference figure, not counted: {len(sliding)} x {window} slots", reference=True),
    )


def _kv_tensors(inp: PlanInputs) -> list[Tensor]:
    c = inp.config
    return [Tensor("kv", f"layers.{i}.kv_cache.{b}", 1, kv_layer_bytes(inp, i) // 2)
            for i in range(c.num_hidden_layers) if not c.is_kv_shared(i) for b in ("k", "v")]


# ---- activations -------------------------------------------------------------------------


def _in_copy(inp: PlanInputs, T: int, k: int) -> int:
    """tinygemm int4 linears pad their input activation (a copy)."""
    if inp.linear is LinearQuant.NONE or not inp.int4_layout.tinygemm:
        return 0
    return T * _round_up(k, inp.int4_layout.k_multiple) * inp.dtype.bytes


def attention_block(inp: PlanInputs, i: int, T: int) -> dict[str, int]:
    """Live buffers of layer i's attention for T tokens; GQA folded into the query axis."""
    c, a = inp.config, inp.dtype.bytes
    H, D, Hkv, S = c.num_attention_heads, c.layer_head_dim(i), c.layer_kv_heads(i), layer_slots(inp, i)
    G = H // Hkv
    parts = {"q, k, v, attention out": T * (2 * H * D + 2 * Hkv * D) * a + _in_copy(inp, T, c.hidden_size)}
    if inp.attention is AttentionImpl.MATH:
        parts[f"scores + probs fp32 [{H}, {T}, {S}] x{MATH_SCORE_BUFFERS}"] = MATH_SCORE_BUFFERS * H * T * S * 4
        parts[f"K, V upcast fp32 [{Hkv}, {S}, {D}]"] = MATH_KV_UPCAST_BUFFERS * Hkv * S * D * 4 + H * T * D * 4
        parts[f"mask [{G * T}, {S}] bool + fp32"] = G * T * S * (1 + MATH_MASK_BYTES)
    else:
        parts[f"mask [{G * T}, {S}] bool"] = G * T * S
    return parts


def mlp_block(inp: PlanInputs, i: int, T: int) -> dict[str, int]:
    c, a = inp.config, inp.dtype.bytes
    inter = c.layer_intermediate_size(i)
    parts = {f"mlp [{T}, {inter}] x{MLP_LIVE_WIDTHS}": T * MLP_LIVE_WIDTHS * inter * a
             + _in_copy(inp, T, c.hidden_size) + _in_copy(inp, T, inter)}
    if c.enable_moe_block:
        E, I, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
        n = c.top_k_experts if T == 1 else T * E  # decode gathers the top-k; prefill runs every expert
        parts[f"moe [{n}, {3 * I}] + [{n}, {H}] fp32"] = n * (3 * I * a + H * (a + 4)) + T * E * 4
    return parts


def step_activations(inp: PlanInputs, T: int) -> tuple[str, dict[str, int]]:
    """(label, parts) of the widest block for a T-token step, plus the buffers alive across layers."""
    c, a = inp.config, inp.dtype.bytes
    carried = {"hidden states": T * c.hidden_size * (2 * a + 4)}  # residual, normed, fp32 norm temp
    if c.has_ple:
        carried["per-layer inputs"] = 3 * T * c.num_hidden_layers * c.hidden_size_per_layer_input * a
    best_label, best = "", {}
    for i in range(c.num_hidden_layers):
        kind = "sliding" if c.is_sliding(i) else "full"
        for block, parts in (("attention", attention_block(inp, i, T)), ("mlp", mlp_block(inp, i, T))):
            if sum(parts.values()) > sum(best.values()):
                best_label, best = f"{block} of {kind} layer {i}", parts
    return best_label, {**carried, **best}


def activation_items(inp: PlanInputs) -> tuple[Item, ...]:
    """The larger of a prefill chunk and a decode step, item by item."""
    steps = [("prefill", *step_activations(inp, inp.prefill_chunk)), ("decode", *step_activations(inp, 1))]
    name, label, parts = max(steps, key=lambda s: sum(s[2].values()))
    notes = [f"{name} step; widest block: {label}"] + [""] * len(parts)
    return tuple(Item(f"activations: {p}", b, note) for (p, b), note in zip(parts.items(), notes))


# ---- peaks -------------------------------------------------------------------------------


def _large_tensor_count(tensors: list[Tensor]) -> int:
    return sum(t.count for t in tensors if t.bytes > LARGE_ALLOC_BYTES)


def runtime_peak(inp: PlanInputs, tensors: tuple[Tensor, ...], kv: tuple[Item, ...]) -> Peak:
    c = inp.config
    counted_kv = tuple(i for i in kv if not i.reference)
    n_large = _large_tensor_count(list(tensors) + _kv_tensors(inp))
    items = (
        *_weights_by_kind(tensors), *counted_kv, *activation_items(inp),
        Item("logits", LOGITS_BUFFERS * c.vocab_size * 4, f"[1, {c.vocab_size}] fp32 x{LOGITS_BUFFERS}"),
        Item("kernel workspace", KERNEL_WORKSPACE_BYTES, "cuBLAS/Triton/kernel images (fitted)", in_allocator=False),
        Item("allocator slack", n_large * ALLOC_SLACK_PER_LARGE_TENSOR, f"{n_large} tensors > 10 MiB", in_allocator=False),
        Item("cuda context", CUDA_CONTEXT_BYTES, in_allocator=False),
    )
    return Peak("runtime GPU", items)


def stock_export_peak(inp: PlanInputs, weights: int, kv: int) -> Peak:
    fw, fk = STOCK_WEIGHT_FACTOR * STOCK_METHODS_RESIDENT, STOCK_KV_FACTOR * STOCK_METHODS_RESIDENT
    w, k = round(weights * fw), round(kv * fk)
    return Peak("export GPU, stock", (
        Item("weights on the GPU while lowering", w, f"x{fw:.2f}: real bytes on the GPU, lowering copies"),
        Item("kv on the GPU while lowering", k, f"x{fk:.2f}: real bytes on the GPU, lowering copies"),
        Item("reserved slack", round((w + k) * STOCK_RESERVED_SLACK), f"{STOCK_RESERVED_SLACK:.1%} of the allocator peak", in_allocator=False),
        Item("cuda context", CUDA_CONTEXT_BYTES, in_allocator=False),
    ))


def low_memory_export_peak(inp: PlanInputs, tensors: tuple[Tensor, ...], weights: int, kv: int) -> Peak:
    everything = list(tensors) + _kv_tensors(inp)
    big = max(everything, key=lambda t: t.bytes)
    resident = ((Item("eager model on the GPU (weights + kv)", weights + kv, "export.py prepare_model"),)
                if EXPORT_EAGER_MODEL_ON_GPU else ())
    return Peak("export GPU, low-memory", (
        *resident,
        Item("largest constant made real", big.bytes, f"{big.name}, for an autotune call"),
        Item("autotune workspace", LOWMEM_WORKSPACE_BYTES),
        Item("reserved slack", LOWMEM_RESERVED_SLACK_BYTES, "cached by the allocator",
             in_allocator=False),
        Item("cuda context", CUDA_CONTEXT_BYTES, in_allocator=False),
    ))


def _linear_shapes(inp: PlanInputs) -> list[tuple[str, int, int, int]]:
    """(name, stack, n_out, k_in) of every quantized weight, for the quantization transient."""
    c = inp.config
    H, V = c.hidden_size, c.vocab_size
    shapes = [("lm_head", 1, V, H)]
    for i in range(c.num_hidden_layers):
        q = c.num_attention_heads * c.layer_head_dim(i)
        shapes += [(f"layers.{i}.q_proj", 1, q, H), (f"layers.{i}.o_proj", 1, H, q)]
        inter = c.layer_intermediate_size(i)
        shapes += [(f"layers.{i}.mlp.gate_proj", 1, inter, H), (f"layers.{i}.mlp.down_proj", 1, H, inter)]
    if c.enable_moe_block and inp.experts is LinearQuant.INT4:
        E, I = c.num_experts, c.moe_intermediate_size
        shapes += [("experts.gate_up_proj", E, 2 * I, H), ("experts.down_proj", E, H, I)]
    if c.has_ple:
        shapes.append(("per_layer_model_projection", 1, c.num_hidden_layers * c.hidden_size_per_layer_input, H))
    return shapes


def quantize_export_peak(inp: PlanInputs, tensors: tuple[Tensor, ...]) -> Peak:
    """torchao packs int4 for CUDA on the GPU, one weight at a time; the largest is the worst."""
    if inp.linear is LinearQuant.NONE or not inp.int4_layout.tinygemm:
        return Peak("export GPU, quantize", ())

    def cost(shape: tuple[str, int, int, int]) -> tuple[int, int]:
        _, stack, n, k = shape
        rows = QUANT_ROWS_PER_CHUNK if QUANT_ROWS_PER_CHUNK and n > 4 * QUANT_ROWS_PER_CHUNK else n
        padded = stack * _round_up(rows, INT4_N_MULTIPLE) * _round_up(k, inp.int4_layout.k_multiple)
        return stack * rows * k * inp.dtype.bytes, round(padded * QUANT_TRANSIENT_BYTES_PER_PARAM)

    name, stack, n, k = max(_linear_shapes(inp), key=lambda s: sum(cost(s)))
    src, transient = cost((name, stack, n, k))
    dims = f"{stack} x {n} x {k}" if stack > 1 else f"{n} x {k}"
    items = [Item("largest weight in bf16", src, f"{name} [{dims}]"),
             Item("int4 packing transient", transient, f"{QUANT_TRANSIENT_BYTES_PER_PARAM} B per padded param")]
    if QUANT_RESULTS_STAY_ON_GPU:  # worst order: the largest is packed last (lm_head is)
        done = sum(t.count * t.bytes for t in tensors if t.int4) - stack * sum(
            int4_bytes(n, k, inp.group_size, inp.int4_layout))
        items.insert(0, Item("int4 weights already packed", done, "quant.py leaves them on the GPU"))
    return Peak("export GPU, quantize", (*items, Item("cuda context", CUDA_CONTEXT_BYTES, in_allocator=False)))


def layer_param_count(c: Gemma4Config, i: int) -> int:
    """Parameters of decoder layer i (what a streaming loader holds unquantized at once)."""
    H, D = c.hidden_size, c.layer_head_dim(i)
    q, kv = c.num_attention_heads * D, c.layer_kv_heads(i) * D
    owns_kv = not c.is_kv_shared(i)
    n = 2 * q * H + owns_kv * kv * H * (1 if c.uses_k_eq_v(i) else 2) + 3 * H * c.layer_intermediate_size(i)
    if c.enable_moe_block:
        n += c.num_experts * (3 * c.moe_intermediate_size * H + H)
    if c.has_ple:
        n += 2 * H * c.hidden_size_per_layer_input
    return n


def _largest_bf16_unit(inp: PlanInputs) -> tuple[str, int]:
    """The biggest thing a streaming loader holds in its dtype at once: a layer or a table."""
    c, a = inp.config, inp.dtype.bytes
    i = max(range(c.num_hidden_layers), key=lambda j: layer_param_count(c, j))
    tables = [("embed_tokens", c.vocab_size * c.hidden_size)]
    if c.has_ple:
        tables.append(("embed_tokens_per_layer", c.vocab_size_per_layer_input * c.num_hidden_layers * c.hidden_size_per_layer_input))
    name, n = max([(f"layer {i}", layer_param_count(c, i)), *tables], key=lambda t: t[1])
    return name, n * a


def host_peaks(inp: PlanInputs, weights: int) -> tuple[Peak, Peak]:
    """Naive: the float model whole (plus its quantized copy if that is larger). Streaming:
    one float unit at a time; the quantized weights stay in RAM, or with low-memory are
    parked on disk, where reading the largest unit or lowering's own state is the peak. KV
    caches are lazy zeros that an export never writes (export/spool.py)."""
    c = inp.config
    dense = param_count(c) * inp.dtype.bytes
    base = Item("process base", HOST_BASE_BYTES, "imports + CUDA context (measured)")
    model = (Item(f"whole model in {inp.dtype.value}", dense, f"{param_count(c) / 1e9:.3f}e9 params")
             if dense >= weights else Item("quantized weights", weights))
    unit_name, unit = _largest_bf16_unit(inp)
    naive = Peak("export host, naive", (base, model))
    if not inp.low_memory:
        return naive, Peak("export host, streaming", (
            base, Item("quantized weights", weights), Item(f"one unit in {inp.dtype.value}", unit, unit_name)))
    reading = round(unit * LOW_MEMORY_UNIT_READ_FACTOR)
    if reading >= COMPILE_HOST_BYTES:
        top = Item(f"reading one unit in {inp.dtype.value}", reading,
                   f"{unit_name}, x{LOW_MEMORY_UNIT_READ_FACTOR:.2f} (fitted)")
    else:
        top = Item("lowering (graphs, compile state)", COMPILE_HOST_BYTES, "measured on the 31B slice")
    return naive, Peak("export host, streaming", (
        base, Item("quantized weights", 0, f"{weights / GiB:.2f} GiB parked on disk (low-memory)"), top))


def plan(inputs: PlanInputs) -> MemoryPlan:
    tensors = weight_tensors(inputs)
    weights = sum(t.count * t.bytes for t in tensors)
    kv = kv_items(inputs)
    kv_bytes = sum(i.bytes for i in kv if not i.reference)
    naive, streaming = host_peaks(inputs, weights)
    return MemoryPlan(
        inputs=inputs, ring_slots=inputs.config.ring_slots(inputs.ctx, inputs.prefill_chunk),
        tensors=tensors, kv=kv,
        runtime_gpu=runtime_peak(inputs, tensors, kv),
        export_gpu_stock=stock_export_peak(inputs, weights, kv_bytes),
        export_gpu_low_memory=low_memory_export_peak(inputs, tensors, weights, kv_bytes),
        export_gpu_quantize=quantize_export_peak(inputs, tensors),
        export_host_naive=naive, export_host_streaming=streaming,
    )


# ---- fitting a budget --------------------------------------------------------------------


class DoesNotFit(Exception):
    """A requested ctx does not fit the budget; the message holds the breakdown."""


@dataclass(frozen=True)
class Budget:
    gpu: int  # device memory of the card the artifact runs on
    export_gpu: int | None = None  # of the card that exports; None: the same card
    host: int | None = None  # host RAM for the export; None: not checked

    @classmethod
    def of(cls, budget: "Budget | int") -> "Budget":
        return budget if isinstance(budget, Budget) else cls(int(budget))

    def __str__(self) -> str:
        extra = "".join(f", {k} {_gib(v)}" for k, v in (("export GPU", self.export_gpu), ("host", self.host)) if v)
        return f"{_gib(self.gpu)} GPU{extra}"


@dataclass(frozen=True)
class CtxFit:
    ctx: int  # 0: nothing fits
    limit: str  # what stops the next step up
    plan: MemoryPlan | None  # the plan at `ctx`


def violations(p: MemoryPlan, budget: Budget | int) -> list[str]:
    """One line per peak over its budget, naming the peak and its largest items."""
    b = Budget.of(budget)
    checks = [(p.runtime_gpu, b.gpu), (p.export_gpu, b.export_gpu or b.gpu)]
    if b.host is not None:
        checks.append((p.export_host, b.host))
    out = []
    for peak, limit in checks:
        if peak.total_bytes > limit:
            top = sorted(peak.items, key=lambda i: -i.bytes)[:2]
            out.append(f"{peak.title} {_gib(peak.total_bytes)} > {_gib(limit)} "
                       f"(largest: {', '.join(f'{i.name} {_gib(i.bytes)}' for i in top)})")
    return out


def fit_ctx(inputs: PlanInputs, budget: Budget | int, granularity: int = CTX_GRANULARITY) -> CtxFit:
    """The largest ctx (a multiple of `granularity`, at most max_position_embeddings) whose
    runtime and export peaks fit; every peak grows with ctx, so a bisection finds it."""
    top = inputs.config.max_position_embeddings // granularity

    def at(k: int) -> MemoryPlan:
        return plan(replace(inputs, ctx=k * granularity))

    if not violations(at(top), budget):
        return CtxFit(top * granularity, f"max_position_embeddings ({inputs.config.max_position_embeddings})", at(top))
    lo, hi = 0, top  # lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if not violations(at(mid), budget) else (lo, mid)
    limit = "; ".join(violations(at(hi), budget))
    return CtxFit(lo * granularity, f"at ctx {hi * granularity}: {limit}", at(lo) if lo else None)


def largest_ctx(config: Gemma4Config, budget_bytes: Budget | int, **options) -> int:
    """The largest ctx whose runtime and export GPU peaks fit `budget_bytes` (0 if none);
    `options` are PlanInputs fields (prefill_chunk, linear, ...)."""
    options.pop("ctx", None)
    return fit_ctx(PlanInputs(config, ctx=1, **options), budget_bytes).ctx


def check_fits(inputs: PlanInputs, budget: Budget | int) -> tuple[bool, str]:
    """(ok, message): the message names each peak over budget, the breakdown, and the
    largest ctx that would fit."""
    p = plan(inputs)
    bad = violations(p, budget)
    if not bad:
        return True, (f"ctx {inputs.ctx} fits {Budget.of(budget)}: runtime GPU {_gib(p.runtime_gpu.total_bytes)}, "
                      f"{p.export_gpu.title} {_gib(p.export_gpu.total_bytes)}")
    best = fit_ctx(inputs, budget)
    hint = f"the largest ctx that fits is {best.ctx}" if best.ctx else f"no ctx fits ({best.limit})"
    return False, "\n".join([f"ctx {inputs.ctx} does not fit {Budget.of(budget)}:", *(f"  {x}" for x in bad),
                             hint, "", render_table(p)])


def resolve_ctx(inputs: PlanInputs, requested: int | str, budget: Budget | int | None) -> int:
    """The ctx to export with: "auto" -> the largest that fits `budget`; an int is checked
    against the budget when there is one. Raises DoesNotFit (message: the breakdown and the
    largest ctx that would fit) before anything is compiled."""
    if str(requested) == "auto":
        if budget is None:
            raise ValueError("--ctx auto needs --gpu-budget")
        best = fit_ctx(inputs, budget)
        if best.ctx == 0:
            smallest = plan(replace(inputs, ctx=min(CTX_GRANULARITY, inputs.config.max_position_embeddings)))
            raise DoesNotFit(f"no ctx fits {Budget.of(budget)}: {best.limit}\n\n{render_table(smallest)}")
        return best.ctx
    ctx = int(requested)
    if budget is not None:
        ok, message = check_fits(replace(inputs, ctx=ctx), budget)
        if not ok:
            raise DoesNotFit(message)
    return ctx


# ---- rendering and parsing ---------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def preset_name(c: Gemma4Config) -> str:
    for name, preset in PRESETS.items():
        if preset == c:
            return name
    for name, preset in PRESETS.items():
        if preset.num_hidden_layers >= c.num_hidden_layers and preset.with_layers(c.num_hidden_layers) == c:
            return f"{name} ({c.num_hidden_layers}-layer slice)"
    return "custom"


def _section(title: str, items: tuple[Item, ...], total: str, total_bytes: int) -> list[str]:
    rows = [title]
    for i in items:
        value = f"({i.bytes / GiB:.2f})" if i.reference else f"{i.bytes / GiB:.2f}"
        note = "; ".join(n for n in (i.note, "" if i.in_allocator or i.reference else "outside the allocator") if n)
        rows.append(f"  {i.name:<{_NAME_WIDTH}}{value:>9}  {note}".rstrip())
    rows.append(f"  {'= ' + total:<{_NAME_WIDTH}}{total_bytes / GiB:9.2f}")
    return rows


_NAME_WIDTH = 52


def _peak_rows(peak: Peak) -> list[str]:
    if not peak.items:
        return [f"{peak.title}: none (nothing to quantize)"]
    rows = _section(peak.title, peak.items, "total", peak.total_bytes)
    if peak.allocator_bytes != peak.total_bytes:
        rows[-1] += f"  (allocator {peak.allocator_bytes / GiB:.2f})"
    return rows


def render_table(p: MemoryPlan) -> str:
    """The breakdown as an aligned text table, GiB."""
    inp, c = p.inputs, p.inputs.config
    quant = (f"int4 g{inp.group_size} {inp.int4_layout.value}" if inp.linear is LinearQuant.INT4 else f"none ({inp.dtype.value})")
    head = [f"memory plan: {preset_name(c)}  ctx {inp.ctx}  prefill_chunk {inp.prefill_chunk}  ring {p.ring_slots}",
            f"  linears {quant}, embedding {inp.embedding.value}, kv {inp.kv_dtype.value}, "
            f"attention {inp.attention.value}, {'low-memory' if inp.low_memory else 'stock'} export, {inp.loader.value} loader",
            "", f"{'':<{_NAME_WIDTH + 2}}{'GiB':>9}"]
    rows = head + _section("weights", p.weights, "weights", p.weights_bytes)
    rows += _section("kv cache", p.kv, "kv", p.kv_bytes) + [""]
    for peak in (p.runtime_gpu, p.export_gpu_stock, p.export_gpu_low_memory, p.export_gpu_quantize,
                 p.export_host_naive, p.export_host_streaming):
        rows += _peak_rows(peak) + [""]
    rows.append(f"runtime GPU {_gib(p.runtime_gpu.total_bytes)}; export GPU {_gib(p.export_gpu.total_bytes)} "
                f"({p.export_gpu.title}); export host {_gib(p.export_host.total_bytes)} ({p.export_host.title})")
    return "\n".join(rows)


_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB, "mb": 1000**2,
          "g": GiB, "gib": GiB, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4}


def parse_size(text: str | int) -> int:
    """"24GiB" -> bytes. Binary units (KiB, MiB, GiB, TiB; bare K/M/G/T mean the same),
    decimal ones (KB, MB, GB, TB), a plain number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use e.g. 24GiB, 24G, 32000MiB, 25.7GB or a byte count")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(n)


# ---- command line ------------------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser, model_options: bool = True) -> None:
    """--gpu-budget/--host-budget, and with `model_options` one flag per PlanInputs field.
    An export CLI that already has the model flags passes model_options=False."""
    parser.add_argument("--gpu-budget", type=parse_size, help="GPU memory of the card that runs it, e.g. 24GiB")
    parser.add_argument("--export-gpu-budget", type=parse_size, help="GPU memory of the card that exports (default: --gpu-budget)")
    parser.add_argument("--host-budget", type=parse_size, help="host RAM for the export, e.g. 64GiB (default: not checked)")
    if not model_options:
        return
    d = PlanInputs.__dataclass_fields__
    parser.add_argument("--ctx", default=str(d["ctx"].default), help="context length, or 'auto' (needs --gpu-budget)")
    parser.add_argument("--prefill-chunk", type=int, default=d["prefill_chunk"].default)
    parser.add_argument("--linear", choices=[e.value for e in LinearQuant], default=d["linear"].default.value)
    parser.add_argument("--group-size", type=int, default=d["group_size"].default)
    parser.add_argument("--int4-layout", choices=[e.value for e in Int4Layout], default=d["int4_layout"].default.value)
    parser.add_argument("--embedding", choices=[e.value for e in EmbeddingQuant], default=d["embedding"].default.value)
    parser.add_argument("--dtype", choices=[e.value for e in DType], default=d["dtype"].default.value)
    parser.add_argument("--kv-dtype", choices=[e.value for e in DType] + [e.value for e in KvQuant],
                        help="default: --dtype; int8/int4 quantize the full layers' KV")
    parser.add_argument("--experts", choices=[e.value for e in LinearQuant], help="MoE experts (default: as --linear)")
    parser.add_argument("--attention", choices=[e.value for e in AttentionImpl], help="default: triton for bf16, else math")
    parser.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=d["low_memory"].default)
    parser.add_argument("--loader", choices=[e.value for e in Loader], default=d["loader"].default.value)


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    if args.gpu_budget is None:
        return None
    return Budget(args.gpu_budget, args.export_gpu_budget, args.host_budget)


def inputs_from_args(args: argparse.Namespace, config: Gemma4Config) -> PlanInputs:
    """PlanInputs from `add_plan_arguments` flags; ctx 'auto' becomes a placeholder for resolve_ctx."""
    ctx = min(CTX_GRANULARITY, config.max_position_embeddings) if str(args.ctx) == "auto" else int(args.ctx)
    return PlanInputs(config, ctx=ctx, prefill_chunk=args.prefill_chunk, linear=args.linear,
                      group_size=args.group_size, int4_layout=args.int4_layout, experts=args.experts,
                      embedding=args.embedding,
                      dtype=args.dtype, kv_dtype=args.kv_dtype, attention=args.attention,
                      low_memory=args.low_memory, loader=args.loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.gemma4.planner", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--config", help="a Hugging Face checkpoint directory or config.json")
    parser.add_argument("--layers", type=int, help="plan the first N layers only (a slice at real width)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_plan_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback when something fails")
    args = parser.parse_args(argv)
    try:  # a bad --config / --layers: one line naming it, exit 2
        config = Gemma4Config.from_name(args.preset) if args.preset else Gemma4Config.from_json(args.config)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--config: {e}")
    if args.layers is not None:
        try:
            config = config.with_layers(args.layers)
        except ValueError as e:
            parser.error(f"--layers: {e}")
    budget = budget_from_args(args)
    try:
        inputs = inputs_from_args(args, config)
        ctx = resolve_ctx(inputs, args.ctx, budget)
    except (DoesNotFit, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    p = plan(replace(inputs, ctx=ctx))
    print(json.dumps(p.to_dict(), indent=1) if args.json else render_table(p))
    if budget and not args.json:
        best = fit_ctx(inputs, budget)
        print(f"\nlargest ctx for {budget}: {best.ctx} (limit: {best.limit})")
    return 0


if __name__ == "__main__":
    from export.cli import quiet_internal_warnings, run

    quiet_internal_warnings()
    sys.exit(run(main, prog="python -m export.gemma4.planner"))
