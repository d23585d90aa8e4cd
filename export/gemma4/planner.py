"""Memory planner: will this export, and its artifact at run time, fit the card?

Arithmetic over the tensors the export stores, read off the model built on the meta device
(export/gemma4/inventory.py: every weight, buffer and KV / scale buffer with its dtype and
shape, quantized by the export's own recipe), and over the model's geometry for the working
sets. No weights, no GPU: it runs before a 20-minute export and in CPU tests. It predicts
four peaks:

    runtime GPU          weights once + KV (rings for sliding layers) + the prefill chunk's
                         working set + logits + workspace + CUDA context
    export GPU stock     every constant real on the GPU, roughly doubled while lowering
    export GPU low-mem   the program's constants zero-byte: the largest one made real for an
                         autotune call
    export host          naive (whole model in RAM) or streaming (int4 + one bf16 unit)

Every coefficient that is not plain tensor arithmetic is a named constant below, documented
by the measurement it was fitted on; GPU runs will refit them. A peak is a list of `Item`s:
items inside torch's caching allocator add up to the allocator peak
(`torch.cuda.max_memory_allocated`), the others (CUDA context, reserved slack) bring it to
the device figure (NVML), which is what a budget is compared with.

    python -m export.gemma4.planner --preset 31b --ctx 131072 --gpu-budget 24GiB

Not modelled yet: CPU exports (the GPU peaks assume the CUDA backend and its recipe), a
runner that allocates one arena instead of a tensor per constant (drop ALLOC_SLACK), expert
weights dequantized whole inside the graph (the model's prefill runs every expert).

The export CLI wires it as (PlanInputs' defaults are the exporter's):

    inputs = PlanInputs(config, ctx=1024, prefill_chunk=cfg.prefill_chunk, linear=cfg.quant,
                        group_size=cfg.group_size, embedding=cfg.embedding_quant,
                        dtype="bfloat16", low_memory=cfg.low_memory)
    fit_kv = cfg.kv_dtype is KvDtype.AUTO  # on a GPU: the cache fitted too
    ctx, kv = resolve_ctx_and_kv(inputs, args.ctx, Budget(gpu_bytes), fit_kv)  # "auto" or an int; DoesNotFit
    inputs = replace(inputs, kv_dtype=kv.kv_dtype) if kv else inputs  # --kv-dtype auto on cuda: fitted
    chunk = fit_prefill_chunk(replace(inputs, ctx=ctx), gpu_bytes or DEFAULT_GPU_BUDGET).chunk  # no --prefill-chunk
    print(render_table(plan(replace(inputs, ctx=ctx, prefill_chunk=chunk))))  # --plan
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from enum import Enum

import torch

from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.inventory import StoredTensor, inventory, meta_model
from export.gemma4.options import KvDtype
from export.gemma4.quant import GROUP_SIZES, EmbeddingQuant, LinearQuant, QuantRecipe

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# ---- model terms (fitted or measured; refit from GPU runs) ---------------------------------

CUDA_CONTEXT_BYTES = round(0.60 * GiB)
"""Device memory outside the caching allocator (CUDA context, kernel images). NVML minus
allocator peak of two low-memory compiles on an H100: 0.85 - 0.25 = 0.60 GiB (toy),
3.28 - 2.67 = 0.61 GiB (31B-width slice)."""

KERNEL_WORKSPACE_BYTES = round(0.25 * GiB)
"""Device memory the runner uses beyond the caching allocator's reserve and the CUDA context
(the .so's kernel images, cuBLAS / Triton workspaces outside torch's allocator, small cached
blocks). H200, 2026-12-01, the 24 GB recipe at chunk 2048: NVML minus the allocator's reserved
peak minus the context was 0.13 GiB on the 31B 12-layer slice (all three KV dtypes); the E2B /
E4B / 26B-A4B runs recorded no reserved figure, and with `allocator_reserve` counted their
remainder is 0.30 / 0.09 / 0.17 GiB. 0.25 is the value that keeps all nine runtime measurements
(those six, the three H100 ones in tests/test_planner.py) within 4.4% of their plans, the 31B's
above their measurements. (It was 0.47, fitted on one H100 run, when the reserve had no item.)"""

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

LOW_MEMORY_INT8_TABLE_READ_FACTOR = (7.78 - 0.60) / (262144 * 8960 * 2 / GiB)
"""The same with `--embedding-quant int8` where the largest unit is an embedding table (1.64): the table and its
int8 copy with their scales side by side while it is quantized. Fitted on E2B's whole bf16 checkpoint (its 4.38 GiB
per-layer table) loaded, quantized and parked as a low-memory export does, on a CPU (7.78 GiB peak RSS over a
0.60 GiB base, 2026-12-07); the 31B's 1-layer checkpoint (its 2.625 GiB table) gave 1.55 the same way."""

LOGITS_BUFFERS = 3
"""[1, vocab]: lm_head output, its fp32 copy, the softcapped result."""

MLP_LIVE_WIDTHS = 3
"""[T, intermediate] buffers live in the MLP: gate, up, gelu(gate) * up."""

CTX_GRANULARITY = 1024


def model_terms() -> dict[str, float | int | bool]:
    """The coefficients above, recorded in every JSON plan so a measurement can be refitted."""
    names = ("CUDA_CONTEXT_BYTES", "KERNEL_WORKSPACE_BYTES", "ALLOC_SLACK_PER_LARGE_TENSOR", "STOCK_WEIGHT_FACTOR",
             "STOCK_KV_FACTOR",
             "STOCK_RESERVED_SLACK", "STOCK_METHODS_RESIDENT", "LOWMEM_WORKSPACE_BYTES", "LOWMEM_RESERVED_SLACK_BYTES",
             "EXPORT_EAGER_MODEL_ON_GPU", "HOST_BASE_BYTES", "COMPILE_HOST_BYTES", "LOW_MEMORY_UNIT_READ_FACTOR",
             "LOW_MEMORY_INT8_TABLE_READ_FACTOR", "LOGITS_BUFFERS", "MLP_LIVE_WIDTHS")
    return {n: globals()[n] for n in names}


# ---- options -----------------------------------------------------------------------------


class DType(str, Enum):
    BF16 = "bfloat16"
    FP16 = "float16"
    FP32 = "float32"

    @property
    def bytes(self) -> int:
        return 4 if self is DType.FP32 else 2


QUANTIZED_KV = (KvDtype.INT8.value, KvDtype.INT4.value)  # full layers: codes + an fp16 scale per slot and head


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
    embedding: EmbeddingQuant = EmbeddingQuant.NONE  # embed_tokens and the PLE table
    dtype: DType = DType.BF16  # unquantized weights and activations
    kv_dtype: DType | KvDtype | None = None  # None / auto: the model dtype; int8 / int4: full layers quantized
    low_memory: bool = False
    loader: Loader = Loader.NAIVE

    def __post_init__(self):
        dtype = DType(self.dtype)
        for name, enum in (("linear", LinearQuant), ("embedding", EmbeddingQuant), ("dtype", DType),
                           ("loader", Loader)):
            object.__setattr__(self, name, enum(getattr(self, name)))  # strings too
        kv = self.kv_dtype
        name = {"bf16": "bfloat16"}.get(str(getattr(kv, "value", kv)), str(getattr(kv, "value", kv)))
        kv = dtype if kv is None or name == "auto" else KvDtype(name) if name in QUANTIZED_KV else DType(name)
        if isinstance(kv, DType) and kv is not dtype:
            raise ValueError(f"kv_dtype {kv.value}: the model keeps its KV in its dtype ({dtype.value}) or in int8 / int4")
        object.__setattr__(self, "kv_dtype", kv)
        if self.ctx < 1 or self.prefill_chunk < 1:
            raise ValueError(f"ctx ({self.ctx}) and prefill_chunk ({self.prefill_chunk}) must be positive")
        if self.ctx > self.config.max_position_embeddings:
            raise ValueError(f"ctx {self.ctx} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size}: int4 supports {' or '.join(map(str, GROUP_SIZES))}")

    def recipe(self) -> QuantRecipe:
        return QuantRecipe(linear=self.linear, group_size=self.group_size, embedding=self.embedding)

    @property
    def model_kv_dtype(self) -> str | None:
        """The model's `kv_dtype` argument for this plan."""
        return self.kv_dtype.value if isinstance(self.kv_dtype, KvDtype) else None

    def inventory(self) -> tuple[tuple[StoredTensor, ...], tuple[StoredTensor, ...]]:
        """(stored weights and constants, KV buffers) as the export builds them."""
        return inventory(self.config, self.dtype.value, self.recipe(), self.model_kv_dtype)


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
class MemoryPlan:
    inputs: PlanInputs
    ring_slots: int
    tensors: tuple[StoredTensor, ...]  # every stored weight and constant (KV apart)
    kv_tensors: tuple[StoredTensor, ...]  # every KV / scale buffer at this ctx
    kv: tuple[Item, ...]  # full layers' caches, sliding layers' rings
    runtime_gpu: Peak
    export_gpu_stock: Peak
    export_gpu_low_memory: Peak
    export_host_naive: Peak
    export_host_streaming: Peak

    @property
    def weights(self) -> tuple[Item, ...]:
        return _weights_by_kind(self.tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def kv_bytes(self) -> int:
        return sum(i.bytes for i in self.kv if not i.reference)

    @property
    def export_gpu(self) -> Peak:
        """The export's GPU peak in the chosen mode."""
        return self.export_gpu_low_memory if self.inputs.low_memory else self.export_gpu_stock

    @property
    def export_host(self) -> Peak:
        return self.export_host_streaming if self.inputs.loader is Loader.STREAMING else self.export_host_naive

    def peaks(self) -> dict[str, Peak]:
        return {"runtime_gpu": self.runtime_gpu, "export_gpu_stock": self.export_gpu_stock,
                "export_gpu_low_memory": self.export_gpu_low_memory,
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


# ---- weights: counts from the unquantized model ------------------------------------------


def _dense(c: Gemma4Config) -> tuple[StoredTensor, ...]:
    """The unquantized model's tensors in fp32 (4 bytes a parameter), KV apart."""
    return inventory(c, "float32", None, None)[0]


LAYER_SCALAR = "layer_scalar"
NOT_PARAMETERS = (LAYER_SCALAR, "ple_index")  # buffers (in the checkpoint, or ours) a parameter count skips


def param_count(c: Gemma4Config) -> int:
    """Parameters of the checkpoint's text model as transformers counts them: the tied
    lm_head once; layer_scalar and the RoPE tables (buffers there) not at all, nor our per-layer
    index into the per-layer inputs."""
    return sum(t.nbytes for t in _dense(c) if not t.fqn.endswith(NOT_PARAMETERS) and t.kind != "rope tables") // 4


def linear_param_count(c: Gemma4Config) -> int:
    """Parameters of the decoder's linears and experts (no lm_head, no embeddings)."""
    kinds = ("attention", "mlp", "moe experts", "ple linears")
    return sum(t.nbytes for t in _dense(c) if t.kind in kinds and len(t.shape) >= 2) // 4


def layer_param_count(c: Gemma4Config, i: int) -> int:
    """Matrix parameters of decoder layer i (norms and scalars are `small_param_count`'s)."""
    return sum(t.nbytes for t in _dense(c) if t.fqn.startswith(f"layers.{i}.") and len(t.shape) >= 2) // 4


def small_param_count(c: Gemma4Config) -> int:
    """Norm weights and router scales: the 1-D parameters, kept in the model dtype."""
    return sum(t.nbytes for t in _dense(c) if len(t.shape) <= 1 and not t.fqn.endswith(NOT_PARAMETERS)
               and t.kind != "rope tables") // 4


def _weights_by_kind(tensors: tuple[StoredTensor, ...]) -> tuple[Item, ...]:
    kinds: dict[str, int] = {}
    for t in tensors:
        kinds[t.kind] = kinds.get(t.kind, 0) + t.nbytes
    return tuple(Item(f"weights: {k}", b) for k, b in kinds.items())


# ---- KV cache ----------------------------------------------------------------------------


def kv_tensors(inp: PlanInputs) -> tuple[StoredTensor, ...]:
    """Every KV / scale buffer at this ctx (rings: the window, whatever the prefill chunk; a
    ring's chunk buffers: the prefill chunk)."""
    c = inp.config
    ring = c.ring_slots(inp.ctx)

    def slots(t: StoredTensor) -> int:
        return inp.prefill_chunk if t.chunk else ring if t.ring else inp.ctx

    return tuple(replace(t, nbytes=t.at_slots(slots(t)), slots=slots(t)) for t in inp.inventory()[1])


def kv_items(inp: PlanInputs) -> tuple[Item, ...]:
    c = inp.config
    kv = kv_tensors(inp)
    full = [t for t in kv if not t.ring and not t.chunk]
    chunk = [t for t in kv if t.chunk]
    layers = lambda ts: len({t.fqn.rsplit(".kv_cache.", 1)[0] for t in ts})  # noqa: E731
    n_full, n_ring = layers(full), layers([t for t in kv if t.ring])
    shared = f"; {c.num_kv_shared_layers} KV-shared layers hold none" if c.num_kv_shared_layers else ""
    ring = c.ring_slots(inp.ctx)
    items = (
        Item("kv: full layers", sum(t.nbytes for t in full), f"{n_full} x {inp.ctx} slots{shared}"),
        Item("kv: sliding layers (ring)", sum(t.nbytes for t in kv if t.ring),
             f"{n_ring} x {ring}-slot ring (the window; a chunk attends its own K/V beside it)"),
    )
    if chunk:
        items += (Item("kv: chunk buffers (rings KV-shared layers read)", sum(t.nbytes for t in chunk),
                       f"{layers(chunk)} x {inp.prefill_chunk} slots (a prefill chunk's K/V, kept for its readers)"),)
    return items


# ---- activations -------------------------------------------------------------------------


def attention_block(inp: PlanInputs, i: int, T: int) -> dict[str, int]:
    """Live buffers of layer i's attention for T tokens: `gemma4::attention` reads the cache
    in place and keeps scores on chip, so only q, k, v and the output are buffers; a quantized
    cache adds the Hadamard-rotated q and output beside them. A sliding layer's prefill chunk
    then writes its last window into the ring through one ring-sized K and V each."""
    c, a = inp.config, inp.dtype.bytes
    H, D, Hkv = c.num_attention_heads, c.layer_head_dim(i), c.layer_kv_heads(i)
    parts = {"q, k, v, attention out": T * (2 * H * D + 2 * Hkv * D) * a}
    if isinstance(inp.kv_dtype, KvDtype) and not c.is_sliding(i):
        parts["rotated q, rotated out (quantized kv)"] = T * 2 * H * D * a
    if c.is_sliding(i) and T > 1:
        parts["ring write (new K, V of the ring's size)"] = 2 * c.ring_slots(inp.ctx) * Hkv * D * a
    return parts


def dequantizes(inp: PlanInputs, T: int) -> bool:
    """Whether a T-token step runs its int4 linears as dequant + mm (export/kernels/int4_matmul.py):
    a chunk that can reach DEQUANT_MIN_M, in a 2-byte dtype. Each such linear then holds its
    weight in the activation dtype ([N, K]) beside its output ([T, N]) while the mm runs."""
    from export.kernels.int4_matmul import DEQUANT_MIN_M

    return inp.linear is LinearQuant.INT4 and inp.dtype.bytes == 2 and T >= DEQUANT_MIN_M


def _unit_of(name: str) -> str:
    """The unit a stored name (or a prefix of one) belongs to: "layers.5" for "layers.5.mlp...", else its first part."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


@functools.lru_cache(maxsize=64)
def _packed_by_unit(config: Gemma4Config, dtype: str, recipe: QuantRecipe, kv: str | None
                    ) -> dict[str, dict[str, tuple[int, int]]]:
    """{unit ("layers.5", "lm_head", ...): {linear's name: (N, K)}} of the int4 linears stored."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for t in inventory(config, dtype, recipe, kv)[0]:
        if t.fqn.endswith(".qweight") and len(t.shape) == 2:
            fqn = t.fqn.removesuffix(".qweight")
            out.setdefault(_unit_of(fqn), {})[fqn] = (t.shape[0], t.shape[1] * 2)
    return out


def _packed_linears(inp: PlanInputs, prefix: str) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} of the int4 linears whose stored names start with `prefix` (the name less it)."""
    linears = _packed_by_unit(inp.config, inp.dtype.value, inp.recipe(), inp.model_kv_dtype).get(_unit_of(prefix), {})
    return {fqn.removeprefix(prefix): nk for fqn, nk in linears.items() if fqn.startswith(prefix)}


def _linear_run(name: str, N: int, K: int, T: int, a: int) -> dict[str, int]:
    """The buffers a dequantized linear adds while its mm runs: the weight and the output."""
    return {f"{name} dequant scratch [{N}, {K}]": N * K * a, f"{name} output [{T}, {N}]": T * N * a}


def _widest(moments: list[dict[str, int]]) -> dict[str, int]:
    return max(moments, key=lambda m: sum(m.values()))


def mlp_block(inp: PlanInputs, i: int, T: int) -> dict[str, int]:
    """Live buffers of layer i's MLP at its widest moment. Float linears: the joined gate/up
    output [T, 2 x inter] and gelu(gate) * up beside it (MLP_LIVE_WIDTHS widths). Dequantized
    int4 linears: the widest of the gate/up mm (its weight in the activation dtype and its
    output), the activation written from that output, and the down mm (the activation, the down
    weight and its output); the gate/up output is the first two of the three widths, not more."""
    c, a = inp.config, inp.dtype.bytes
    inter = c.layer_intermediate_size(i)
    widths = {f"mlp [{T}, {inter}] x{MLP_LIVE_WIDTHS}": T * MLP_LIVE_WIDTHS * inter * a}
    linears = _packed_linears(inp, f"layers.{i}.mlp.") if dequantizes(inp, T) else {}
    if {"gate_up_proj", "down_proj"} <= linears.keys():
        gate_up, down = linears["gate_up_proj"], linears["down_proj"]
        parts = _widest([_linear_run("mlp gate/up", *gate_up, T, a), widths,
                         {f"mlp [{T}, {inter}]": T * inter * a, **_linear_run("mlp down", *down, T, a)}])
    else:
        parts = widths
    if c.enable_moe_block:
        E, I, H, K = c.num_experts, c.moe_intermediate_size, c.hidden_size, c.top_k_experts
        if T == 1 or inp.linear is LinearQuant.INT4:
            # int4 stacks (gemma4::moe_experts_int4): the T * top-k (token, expert) entries only, grouped
            # by expert: their activations, each entry's fp32 output, the fp32 sum over a token's experts
            n = T * K
            parts[f"moe [{n}, {I}] + [{n}, {H}] fp32 (top-k entries)"] = n * (I * a + H * 4) + T * H * 4 + T * E * 4
        else:  # float stacks: every expert on every token
            n = T * E
            parts[f"moe [{n}, {3 * I}] + [{n}, {H}] fp32 (every expert)"] = n * (3 * I * a + H * (a + 4)) + T * E * 4
    return parts


def attention_linears(inp: PlanInputs, i: int, T: int) -> dict[str, int]:
    """Buffers layer i's dequantized attention linears add beyond `attention_block`'s: the
    widest of the q/k/v mm (its weight; its output is q, k, v) and the output projection's mm
    (its weight and its output)."""
    if not dequantizes(inp, T):
        return {}
    a = inp.dtype.bytes
    runs = [{f"attention {name} dequant scratch [{N}, {K}]": N * K * a} if name != "o_proj"
            else _linear_run("attention o_proj", N, K, T, a)
            for name, (N, K) in _packed_linears(inp, f"layers.{i}.self_attn.").items()]
    return _widest(runs) if runs else {}


def step_activations(inp: PlanInputs, T: int) -> tuple[str, dict[str, int]]:
    """(label, parts) of the widest moment of a T-token step: the buffers alive across layers
    plus the widest layer's attention buffers and the larger of its attention linears' and its
    MLP's moment. The attention buffers are counted into the MLP: the compiled graph keeps them
    allocated there (on the H200 a 6-layer 31B slice at chunk 2048 held hidden states + the full
    layer's attention buffers, 0.36 GiB, when its gate/up dequant asked for 0.43 GiB more).
    With per-layer embeddings the model's first moment (the table's rows, the projection of the
    embeddings and their sum, three [T, layers x P] buffers) is a candidate too; after it only
    the sum is carried."""
    c, a = inp.config, inp.dtype.bytes
    carried = {"hidden states": T * c.hidden_size * (2 * a + 4)}  # residual, normed, fp32 norm temp
    ple = T * c.num_hidden_layers * c.hidden_size_per_layer_input * a
    if c.has_ple:
        carried["per-layer inputs"] = ple
    if c.num_kv_shared_layers and T > 1:  # a shared ring's chunk K/V wait for its last reader
        carried["chunk K/V of a shared sliding ring"] = 2 * T * c.num_key_value_heads * c.head_dim * a
    moments = []  # (label, parts, whether the parts hold the PLE sum the layers find carried)
    if c.has_ple:
        proj = _packed_linears(inp, "per_layer_model_projection").get("")
        start = {"per-layer inputs: table rows, projection, sum": 3 * ple,
                 **(_linear_run("per-layer projection", *proj, T, a) if proj and dequantizes(inp, T) else {})}
        moments.append(("the per-layer inputs (model start)", start, True))
    for i in range(c.num_hidden_layers):
        kind = "sliding" if c.is_sliding(i) else "full"
        parts = {**attention_block(inp, i, T), **_widest([attention_linears(inp, i, T), mlp_block(inp, i, T)])}
        moments.append((f"attention + mlp of {kind} layer {i}", parts, False))
    best_label, best, holds_ple = max(moments, key=lambda m: sum(m[1].values()) + (0 if m[2] else ple * c.has_ple))
    if holds_ple:
        carried.pop("per-layer inputs")
    return best_label, {**carried, **best}


def allocator_reserve(inp: PlanInputs, T: int) -> int:
    """Bytes the caching allocator holds reserved but unallocated at a T-token step's peak: with
    dequantized linears, a layer's peak is its largest weight dequantized (the joined gate/up);
    the blocks its other linears' dequantized weights held, freed by then, stay cached and cannot
    serve that larger request. Their sum, for the layer where it is largest (the 31B: a full
    layer's q/k, output and down projections, 0.56 GiB; measured 0.50 / 0.50 / 0.57 GiB of
    reserved over allocated on its 12-layer slice with int4 / int8 / bf16 KV)."""
    if not dequantizes(inp, T):
        return 0
    a, best = inp.dtype.bytes, 0
    for i in range(inp.config.num_hidden_layers):
        sizes = sorted((N * K * a for N, K in _packed_linears(inp, f"layers.{i}.").values()), reverse=True)
        best = max(best, sum(sizes[1:]))
    return best


def activation_items(inp: PlanInputs) -> tuple[Item, ...]:
    """The larger of a prefill chunk and a decode step, item by item."""
    steps = [("prefill", *step_activations(inp, inp.prefill_chunk)), ("decode", *step_activations(inp, 1))]
    name, label, parts = max(steps, key=lambda s: sum(s[2].values()))
    notes = [f"{name} step; widest block: {label}"] + [""] * len(parts)
    return tuple(Item(f"activations: {p}", b, note) for (p, b), note in zip(parts.items(), notes))


# ---- peaks -------------------------------------------------------------------------------


def _large_tensor_count(tensors) -> int:
    return sum(1 for t in tensors if t.nbytes > LARGE_ALLOC_BYTES)


def runtime_peak(inp: PlanInputs, tensors: tuple[StoredTensor, ...], kv_ts: tuple[StoredTensor, ...],
                 kv: tuple[Item, ...]) -> Peak:
    c = inp.config
    counted_kv = tuple(i for i in kv if not i.reference)
    n_large = _large_tensor_count([*tensors, *kv_ts])
    items = (
        *_weights_by_kind(tensors), *counted_kv, *activation_items(inp),
        Item("logits", LOGITS_BUFFERS * c.vocab_size * 4, f"[1, {c.vocab_size}] fp32 x{LOGITS_BUFFERS}"),
        Item("allocator reserve", allocator_reserve(inp, inp.prefill_chunk),
             "freed dequantized weights kept cached at the prefill peak: reserved, not allocated", in_allocator=False),
        Item("kernel workspace", KERNEL_WORKSPACE_BYTES, "kernel images, workspaces (fitted)", in_allocator=False),
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


def low_memory_export_peak(inp: PlanInputs, tensors: tuple[StoredTensor, ...], kv_ts: tuple[StoredTensor, ...],
                           weights: int, kv: int) -> Peak:
    big = max([*tensors, *kv_ts], key=lambda t: t.nbytes)
    resident = ((Item("eager model on the GPU (weights + kv)", weights + kv, "export.py prepare_model"),)
                if EXPORT_EAGER_MODEL_ON_GPU else ())
    return Peak("export GPU, low-memory", (
        *resident,
        Item("largest constant made real", big.nbytes, f"{big.fqn}, for an autotune call"),
        Item("autotune workspace", LOWMEM_WORKSPACE_BYTES),
        Item("reserved slack", LOWMEM_RESERVED_SLACK_BYTES, "cached by the allocator",
             in_allocator=False),
        Item("cuda context", CUDA_CONTEXT_BYTES, in_allocator=False),
    ))


def _largest_float_unit(inp: PlanInputs) -> tuple[str, int]:
    """The biggest thing a streaming loader holds in its dtype at once: one of its units (a
    layer or a table), as export/gemma4/checkpoint.py walks them."""
    return _largest_unit(inp.config, inp.dtype.value, min(1024, inp.ctx))


@functools.lru_cache(maxsize=64)
def _largest_unit(config: Gemma4Config, dtype: str, ctx: int) -> tuple[str, int]:
    from export.gemma4.checkpoint import units

    model = meta_model(config, getattr(torch, dtype), None, None, ctx)
    sizes = {name: sum(p.numel() * p.element_size() for p in unit.parameters())
             for name, unit in units(model) if name != "lm_head" or not config.tie_word_embeddings}
    name = max(sizes, key=sizes.get)
    return (f"layer {name.removeprefix('layers.')}" if name.startswith("layers.") else name), sizes[name]


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
    unit_name, unit = _largest_float_unit(inp)
    naive = Peak("export host, naive", (base, model))
    if not inp.low_memory:
        return naive, Peak("export host, streaming", (
            base, Item("quantized weights", weights), Item(f"one unit in {inp.dtype.value}", unit, unit_name)))
    int8_table = inp.embedding is EmbeddingQuant.INT8 and unit_name.startswith("embed_tokens")
    factor = LOW_MEMORY_INT8_TABLE_READ_FACTOR if int8_table else LOW_MEMORY_UNIT_READ_FACTOR
    reading = round(unit * factor)
    if reading >= COMPILE_HOST_BYTES:
        top = Item(f"reading one unit in {inp.dtype.value}", reading,
                   f"{unit_name}{' to int8' if int8_table else ''}, x{factor:.2f} (fitted)")
    else:
        top = Item("lowering (graphs, compile state)", COMPILE_HOST_BYTES, "measured on the 31B slice")
    return naive, Peak("export host, streaming", (
        base, Item("quantized weights", 0, f"{weights / GiB:.2f} GiB parked on disk (low-memory)"), top))


def plan(inputs: PlanInputs) -> MemoryPlan:
    tensors = inputs.inventory()[0]
    kv_ts = kv_tensors(inputs)
    weights = sum(t.nbytes for t in tensors)
    kv = kv_items(inputs)
    kv_bytes = sum(i.bytes for i in kv if not i.reference)
    naive, streaming = host_peaks(inputs, weights)
    return MemoryPlan(
        inputs=inputs, ring_slots=inputs.config.ring_slots(inputs.ctx),
        tensors=tensors, kv_tensors=kv_ts, kv=kv,
        runtime_gpu=runtime_peak(inputs, tensors, kv_ts, kv),
        export_gpu_stock=stock_export_peak(inputs, weights, kv_bytes),
        export_gpu_low_memory=low_memory_export_peak(inputs, tensors, kv_ts, weights, kv_bytes),
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


def _low_memory_hint(inputs: PlanInputs, budget: Budget | int, ctx: int) -> str:
    """A line for a user whose stock export does not fit where low-memory mode would: the largest
    ctx with --low-memory, when it is more than `ctx` (else '')."""
    if inputs.low_memory:
        return ""
    lm = fit_ctx(replace(inputs, low_memory=True), budget).ctx
    return (f"with --low-memory (weights and KV kept off the GPU while compiling) ctx up to {lm} fits"
            if lm > ctx else "")


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
    lm = _low_memory_hint(inputs, budget, best.ctx)
    return False, "\n".join([f"ctx {inputs.ctx} does not fit {Budget.of(budget)}:", *(f"  {x}" for x in bad),
                             hint, *([lm] if lm else []), "", render_table(p)])


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
            lm = _low_memory_hint(inputs, budget, 0)
            raise DoesNotFit(f"no ctx fits {Budget.of(budget)}: {best.limit}" + (f"\n{lm}" if lm else "")
                             + f"\n\n{render_table(smallest)}")
        return best.ctx
    ctx = int(requested)
    if budget is not None:
        ok, message = check_fits(replace(inputs, ctx=ctx), budget)
        if not ok:
            raise DoesNotFit(message)
    return ctx


PREFILL_CHUNKS = (2048, 1024, 512, 256, 128)
"""The prefill chunks an export picks from when none is given, largest first."""

DEFAULT_GPU_BUDGET = 22 * GiB
"""What the prefill chunk is fitted to when no --gpu-budget is given: a 24 GB card (24564
MiB) less about 2 GiB that a desktop session, other processes and fragmentation take."""


KV_CHOICES = (KvDtype.AUTO, KvDtype.INT8, KvDtype.INT4)
"""What `--kv-dtype auto` picks from, most precise first: the model dtype's cache, then int8, then int4."""


@dataclass(frozen=True)
class KvFit:
    kv_dtype: KvDtype  # AUTO: the model dtype's cache
    name: str  # what the cache holds: bfloat16 / float32 / int8 / int4
    reason: str  # one line: why this one


def fit_kv_dtype(inputs: PlanInputs, budget: Budget | int = DEFAULT_GPU_BUDGET, runtime_only: bool = False) -> KvFit:
    """The most precise full-attention cache of KV_CHOICES whose runtime and export peaks (`runtime_only`: the
    runtime peak, as the prefill chunk is fitted without a budget) fit the budget at inputs.ctx; int4 when none
    does. Every step down costs error in the attention output and saves memory and, at long fills, decode time."""
    b = Budget.of(budget)
    over: list[str] = []
    for kv in KV_CHOICES:
        p = plan(replace(inputs, kv_dtype=kv))
        name, runtime = p.inputs.kv_dtype.value, p.runtime_gpu.total_bytes
        bad = (runtime > b.gpu) if runtime_only else violations(p, b)
        if not bad:
            but = f" ({', '.join(over)})" if over else ""
            return KvFit(kv, name, f"the most precise that fits: runtime plan {_gib(runtime)} of {_gib(b.gpu)}{but}")
        # the runtime over the budget, or else the export peak that is (a stock export's)
        over.append(f"{name} would need {_gib(runtime)}" if runtime_only or runtime > b.gpu
                    else f"{name}: {bad[0].split(' (largest')[0]}")
    return KvFit(KvDtype.INT4, KvDtype.INT4.value, f"the smallest: none fits {_gib(b.gpu)} ({', '.join(over)})")


def resolve_ctx_and_kv(inputs: PlanInputs, requested: int | str, budget: Budget | int | None,
                       fit_kv: bool) -> tuple[int, KvFit | None]:
    """The ctx (`resolve_ctx`) and, with `fit_kv` (`--kv-dtype auto` on a GPU), the cache: the context
    first, fitted with the most compact cache (it is what the card must hold), then the most precise
    cache that fits at that context (`fit_kv_dtype`: against the budget, or without one the runtime peak
    against DEFAULT_GPU_BUDGET, a stock export's compile-time peak being the exporting machine's business).
    Without `fit_kv` the cache is the one asked for and the second item None."""
    probe = replace(inputs, kv_dtype=KvDtype.INT4) if fit_kv else inputs
    ctx = resolve_ctx(probe, requested, budget)
    if not fit_kv:
        return ctx, None
    if budget is None:
        return ctx, fit_kv_dtype(replace(inputs, ctx=ctx), DEFAULT_GPU_BUDGET, runtime_only=True)
    return ctx, fit_kv_dtype(replace(inputs, ctx=ctx), budget)


@dataclass(frozen=True)
class ChunkFit:
    chunk: int
    reason: str  # one line: why this chunk
    plan: MemoryPlan  # the plan at `chunk`


def fit_prefill_chunk(inputs: PlanInputs, budget: Budget | int = DEFAULT_GPU_BUDGET) -> ChunkFit:
    """The largest of PREFILL_CHUNKS (never above ctx) whose planned runtime total fits the
    budget's GPU; the smallest when none does. A larger chunk costs its activations and the
    int4 dequant scratch's matmul output (the sliding rings hold the window whatever the chunk)."""
    gpu = Budget.of(budget).gpu
    candidates = [c for c in PREFILL_CHUNKS if c <= inputs.ctx] or [max(2, inputs.ctx)]
    over = ""
    for chunk in candidates:
        p = plan(replace(inputs, prefill_chunk=chunk))
        total = p.runtime_gpu.total_bytes
        if total <= gpu:
            return ChunkFit(chunk, f"runtime plan {_gib(total)} of {_gib(gpu)}{over}", p)
        over = f" ({chunk} would need {_gib(total)})"
    return ChunkFit(chunk, f"the smallest: no chunk fits {_gib(gpu)}{over}", p)


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


def _section(title: str, items: tuple[Item, ...], total: str, total_bytes: int, width: int) -> list[str]:
    rows = [title]
    for i in items:
        value = f"({i.bytes / GiB:.2f})" if i.reference else f"{i.bytes / GiB:.2f}"
        note = "; ".join(n for n in (i.note, "" if i.in_allocator or i.reference else "outside the allocator") if n)
        rows.append(f"  {i.name:<{width}}{value:>9}  {note}".rstrip())
    rows.append(f"  {'= ' + total:<{width}}{total_bytes / GiB:9.2f}")
    return rows


_NAME_WIDTH = 52  # at least; a longer item name widens the table's name column


def _peak_rows(peak: Peak, width: int) -> list[str]:
    if not peak.items:
        return [f"{peak.title}: none (nothing to quantize)"]
    rows = _section(peak.title, peak.items, "total", peak.total_bytes, width)
    if peak.allocator_bytes != peak.total_bytes:
        rows[-1] += f"  (allocator {peak.allocator_bytes / GiB:.2f})"
    return rows


def render_table(p: MemoryPlan) -> str:
    """The breakdown as an aligned text table, GiB."""
    inp, c = p.inputs, p.inputs.config
    quant = f"int4 g{inp.group_size}" if inp.linear is LinearQuant.INT4 else f"none ({inp.dtype.value})"
    head = [f"memory plan: {preset_name(c)}  ctx {inp.ctx}  prefill_chunk {inp.prefill_chunk}  ring {p.ring_slots}",
            f"  linears {quant}, embedding {inp.embedding.value}, kv {inp.kv_dtype.value}, "
            f"{'low-memory' if inp.low_memory else 'stock'} export, {inp.loader.value} loader",
            ""]
    peaks = (p.runtime_gpu, p.export_gpu_stock, p.export_gpu_low_memory, p.export_host_naive, p.export_host_streaming)
    width = max(_NAME_WIDTH, *(len(i.name) + 1 for i in (*p.weights, *p.kv, *(i for k in peaks for i in k.items))))
    rows = head + [f"{'':<{width + 2}}{'GiB':>9}"] + _section("weights", p.weights, "weights", p.weights_bytes, width)
    rows += _section("kv cache", p.kv, "kv", p.kv_bytes, width) + [""]
    for peak in peaks:
        rows += _peak_rows(peak, width) + [""]
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


MIN_BUDGET_BYTES = 1 << 20  # a memory budget under this is a missing unit ("24" is 24 bytes), not a card


def size_arg(text: str) -> int:
    """`parse_size` as an argparse type for a memory budget: a bad size is refused with parse_size's own
    message (argparse turns a plain ValueError into "invalid value", dropping what a size looks like), and
    so is one under MIN_BUDGET_BYTES, which is a number given without its unit."""
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < MIN_BUDGET_BYTES:
        bare = re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text)
        hint = f"give a unit, e.g. {text.strip()}GiB" if bare else "give at least 1MiB"
        raise argparse.ArgumentTypeError(f"{text!r} is {n} bytes, less than any card or host: {hint}")
    return n


# ---- command line ------------------------------------------------------------------------


PLANNED_EXPORT_FLAGS = ("prefill_chunk", "quant", "group_size", "embedding_quant", "dtype", "kv_dtype", "low_memory")


def add_plan_arguments(parser: argparse.ArgumentParser, model_options: bool = True) -> None:
    """--gpu-budget/--host-budget, and with `model_options` the export's own flags that
    change the plan (export/gemma4/flags.py: the same names, types and defaults) plus --ctx
    and --loader. An export CLI that already has the model flags passes model_options=False."""
    parser.add_argument("--gpu-budget", type=size_arg, help="GPU memory of the card that runs it, e.g. 24GiB")
    parser.add_argument("--export-gpu-budget", type=size_arg, help="GPU memory of the card that exports (default: --gpu-budget)")
    parser.add_argument("--host-budget", type=size_arg, help="host RAM for the export, e.g. 64GiB (default: not checked)")
    if not model_options:
        return
    from export.gemma4.flags import add_export_arguments

    d = PlanInputs.__dataclass_fields__
    parser.add_argument("--ctx", default=str(d["ctx"].default), help="context length, or 'auto' (needs --gpu-budget)")
    add_export_arguments(parser, PLANNED_EXPORT_FLAGS)
    parser.add_argument("--loader", choices=[e.value for e in Loader], default=d["loader"].default.value)


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    if args.gpu_budget is None:
        return None
    return Budget(args.gpu_budget, args.export_gpu_budget, args.host_budget)


def inputs_for(config: Gemma4Config, cfg: "ExportConfig", ctx: int, loader: Loader | str = Loader.STREAMING) -> PlanInputs:
    """The planner's view of an export with options `cfg`, on the GPU it runs on (`--device
    auto` plans CUDA on any machine)."""
    from export.backends.options import TargetDevice
    from export.gemma4.options import DeviceChoice

    device = TargetDevice.CUDA if cfg.device is DeviceChoice.AUTO else cfg.device.resolve()
    return PlanInputs(config, ctx=ctx, prefill_chunk=cfg.prefill_chunk, linear=cfg.quant, group_size=cfg.group_size,
                      embedding=cfg.embedding_quant, dtype=str(cfg.dtype.resolve(device)).removeprefix("torch."),
                      low_memory=cfg.low_memory, kv_dtype=cfg.kv_dtype, loader=loader)


def inputs_from_args(args: argparse.Namespace, config: Gemma4Config) -> PlanInputs:
    """PlanInputs from `add_plan_arguments` flags; ctx 'auto' becomes a placeholder for resolve_ctx."""
    from export.gemma4.flags import export_fields
    from export.gemma4.options import ExportConfig

    ctx = min(CTX_GRANULARITY, config.max_position_embeddings) if str(args.ctx) == "auto" else int(args.ctx)
    return inputs_for(config, ExportConfig(**export_fields(args, PLANNED_EXPORT_FLAGS), ctx=ctx), ctx, args.loader)


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
        # as the exporter on a GPU: --kv-dtype auto takes the most precise cache that fits, after the ctx
        ctx, kv = resolve_ctx_and_kv(inputs, args.ctx, budget, str(args.kv_dtype) == KvDtype.AUTO.value)
    except (DoesNotFit, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    if kv is not None:
        print(f"kv cache {kv.name}: {kv.reason}", file=sys.stderr)
        inputs = replace(inputs, kv_dtype=kv.kv_dtype)
    if args.prefill_chunk is None:  # as the exporter picks it (ctx first, then the chunk)
        fit = fit_prefill_chunk(replace(inputs, ctx=ctx), budget or DEFAULT_GPU_BUDGET)
        inputs = replace(inputs, prefill_chunk=fit.chunk)
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
