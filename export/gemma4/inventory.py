"""What an export stores, read off the model itself: the planner's tensor inventory.

The model is built on the meta device (no bytes) and quantized there by the export's own
recipe (`quantize_`, CUDA), so every weight, buffer and KV / scale buffer appears with the
dtype and shape the artifact will hold: int4 layouts, int8 tables, quantized KV and all.
Nothing here describes the model a second time; a tensor the model gains is counted
(under "other") without a change here.

    weights, kv = inventory(config, dtype, recipe, kv_dtype)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from export.backends.options import TargetDevice
from export.gemma4.config import Gemma4Config
from export.gemma4.quant import QuantRecipe, quantize_

REFERENCE_PREFILL_CHUNK = 2  # the KV inventory is per slot; any chunk builds the same buffers

# FQN pattern -> kind, first match wins (the weight table's rows, by what they serve)
KINDS = (
    (r"\.kv_cache\.", "kv"),
    (r"(^|\.)(layer_scalar|scale|per_expert_scale)$|norm[^.]*\.weight$", "norms & scalars"),
    (r"^layers\.\d+\.self_attn\.", "attention"),
    (r"^layers\.\d+\.mlp\.", "mlp"),
    (r"^layers\.\d+\.experts\.", "moe experts"),
    (r"^layers\.\d+\.router\.", "moe router"),
    (r"^embed_tokens\.", "embedding"),
    (r"^lm_head\.", "lm_head"),
    (r"^embed_tokens_per_layer\.", "ple table"),
    (r"^(layers\.\d+\.)?per_layer_(model_projection|input_gate|projection)\.", "ple linears"),
    (r"^inv_freq", "rope tables"),
)


def kind_of(fqn: str) -> str:
    return next((kind for pattern, kind in KINDS if re.search(pattern, fqn)), "other")


@dataclass(frozen=True)
class StoredTensor:
    fqn: str
    kind: str  # a row of the weight table (KINDS), or "kv"
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    slots: int = 0  # KV only: the slot dimension at which nbytes was taken
    ring: bool = False  # KV only: a sliding layer's ring (else a full layer's cache)
    chunk: bool = False  # KV only: a ring's chunk buffers (prefill_chunk slots; KV-shared readers)

    def at_slots(self, slots: int) -> int:
        """A KV buffer's bytes with `slots` slots (they grow linearly in the slot dim)."""
        return self.nbytes // self.slots * slots


def _stored(fqn: str, t: torch.Tensor) -> StoredTensor:
    return StoredTensor(fqn, kind_of(fqn), tuple(t.shape), str(t.dtype).removeprefix("torch."),
                        t.numel() * t.element_size())


def meta_model(config: Gemma4Config, dtype: torch.dtype, recipe: QuantRecipe | None, kv_dtype: str | None,
               ctx: int, prefill_chunk: int = REFERENCE_PREFILL_CHUNK):
    """The model as a CUDA export builds it, on the meta device (`recipe` None: unquantized)."""
    from export.gemma4.model import Gemma4Model

    with torch.device("meta"):
        model = Gemma4Model(config, ctx=ctx, prefill_chunk=prefill_chunk, dtype=dtype, kv_dtype=kv_dtype)
    if recipe is not None:
        quantize_(model, recipe, TargetDevice.CUDA)
    return model


def _tensors(model) -> list[StoredTensor]:
    """Every parameter and buffer once (a tied weight is one tensor), KV buffers apart."""
    seen, out = set(), []
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for fqn, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(_stored(fqn, t))
    return out


@functools.lru_cache(maxsize=64)
def inventory(config: Gemma4Config, dtype: str, recipe: QuantRecipe | None,
              kv_dtype: str | None) -> tuple[tuple[StoredTensor, ...], tuple[StoredTensor, ...]]:
    """(weights and other constants, KV buffers) of an export; KV figures are per their
    `slots` (scale them with `at_slots`). Cached: the planner asks many times per ctx search."""
    ctx = min(1024, config.max_position_embeddings)
    model = meta_model(config, getattr(torch, dtype), recipe, kv_dtype, ctx)
    specs = {s["fqn"]: s for s in model.kv_cache_specs()}
    weights, kv = [], []
    for t in _tensors(model):
        if t.fqn in specs:
            kind = specs[t.fqn]["kind"]
            slots = t.shape[1] if kind == "chunk" else t.shape[2]  # chunk buffers are token-major
            kv.append(StoredTensor(t.fqn, "kv", t.shape, t.dtype, t.nbytes, slots=slots, ring=kind == "sliding",
                                   chunk=kind == "chunk"))
        else:
            weights.append(t)
    return tuple(weights), tuple(kv)
