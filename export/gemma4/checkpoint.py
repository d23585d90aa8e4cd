"""Load a Hugging Face Gemma 4 checkpoint directory into `Gemma4Model`, tensor by tensor.

The model is built on the meta device, so no weight memory exists until a tensor is read;
each tensor is read from its safetensors shard (plain reads, no mapping), cast, and placed. Loading goes
one *unit* at a time (the embeddings, each decoder layer, the final norm, the lm_head) and
calls `on_unit_loaded(model, unit_name)` after each, so a caller can quantize the unit and
let the bf16 source go before the next one is read: host memory stays around one layer of
source weights plus what the caller keeps.

Key layouts: text-only checkpoints (`model.layers.0...`) and multimodal ones
(`model.language_model.layers.0...` beside `model.vision_tower...` / audio towers, which
are never read). KV-shared layers' k/v projections and norms are skipped when present.

Presets (no checkpoint) go through the same unit loop with `RandomWeights` as the source:
seeded random tensors per key, so exports of presets stream and quantize exactly like
checkpoint loads (`random_model`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from export import stages

from .config import Gemma4Config
from .model import Gemma4Model, KVCache

TEXT_PREFIXES = ("model.language_model.", "model.")
UnitHook = Callable[[Gemma4Model, str], None]  # (model, unit FQN)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names key, shard and fix."""


@dataclass
class ShardIndex:
    """Where each tensor lives: key -> shard file, and the text-model prefix in use."""

    root: Path
    key_to_shard: dict[str, str]
    prefix: str

    @classmethod
    def open(cls, root: str | Path) -> "ShardIndex":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: checkpoint directory not found (--checkpoint takes a HF model directory)")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (no readable weight_map: {e})") from None
            missing = sorted({s for s in weight_map.values() if not (root / s).is_file()})
            if missing:
                raise FileNotFoundError(f"{index}: lists shard(s) not in the directory: {', '.join(missing)}")
        elif (root / "model.safetensors").is_file():
            try:
                with safe_open(root / "model.safetensors", "pt") as f:
                    weight_map = {k: "model.safetensors" for k in f.keys()}
            except Exception as e:  # SafetensorError: a truncated or foreign file
                raise CheckpointError(f"{root / 'model.safetensors'}: not a readable safetensors file ({e}); "
                                      "re-download or re-save it") from None
        else:
            raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json")
        prefix = next((p for p in TEXT_PREFIXES if any(k.startswith(p + "layers.") for k in weight_map)), None)
        if prefix is None:
            raise CheckpointError(f"{root}: no decoder layers found under {' or '.join(TEXT_PREFIXES)}")
        return cls(root, weight_map, prefix)

    def full_key(self, key: str) -> str:
        """The checkpoint's name of our `key`: under the text prefix, but for an untied head, which
        transformers' `save_pretrained` keeps at the top level (`lm_head.weight`, beside `model.`)."""
        name = self.prefix + key
        if key == "lm_head.weight" and name not in self.key_to_shard and key in self.key_to_shard:
            return key
        return name

    def text_keys(self) -> set[str]:
        """Our names (prefix stripped) of every text-model tensor in the checkpoint."""
        p = self.prefix
        keys = {k[len(p):] for k in self.key_to_shard if k.startswith(p)}
        if p == "model.":  # the multimodal towers live under model.* too: not ours
            keys = {k for k in keys if not k.startswith(("language_model.", "vision_tower.", "audio_tower.",
                                                         "embed_vision.", "embed_audio."))}
        if "lm_head.weight" in self.key_to_shard:  # an untied head as transformers writes it
            keys.add("lm_head.weight")
        return keys


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class ShardReader:
    """Reads single tensors from safetensors shards with plain file reads, straight into a
    tensor of their own: no shard is memory-mapped, so the only host copy of a tensor is the
    one returned (a mapped shard's touched pages count in RSS beside that copy: 2 x 2.6 GiB
    for the 31B embedding). Headers are parsed once per shard."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._open: dict[str, tuple[object, int, dict]] = {}  # shard -> (file, data start, header)

    def shard_of(self, key: str) -> str:
        return self.index.key_to_shard[self.index.full_key(key)]

    def _shard(self, shard: str) -> tuple[object, int, dict]:
        if shard not in self._open:
            path = self.index.root / shard
            f = open(path, "rb")
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                f.close()
                raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
            self._open[shard] = (f, 8 + n, header)
        return self._open[shard]

    def read(self, key: str) -> torch.Tensor:
        shard = self.shard_of(key)
        f, start, header = self._shard(shard)
        entry = header.get(self.index.full_key(key))
        if entry is None:
            raise CheckpointError(f"{self.index.root / shard}: {self.index.full_key(key)} is listed in the index "
                                  "but not in this shard; the index does not match the shards")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.index.root / shard}: {key} has dtype {entry['dtype']}, "
                                  f"which the loader does not read (one of {', '.join(SAFETENSORS_DTYPES)})")
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        if end > begin:
            buf = out.view(-1).view(torch.uint8).numpy()
            f.seek(start + begin)
            if f.readinto(memoryview(buf)) != end - begin:
                raise CheckpointError(f"{self.index.root / shard}: {self.index.full_key(key)} is cut short "
                                      "(truncated shard?); download or save it again")
        return out

    def close(self):
        for f, _, _ in self._open.values():
            f.close()
        self._open.clear()


def _ignorable(cfg: Gemma4Config, key: str) -> bool:
    """Checkpoint tensors we knowingly do not load."""
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
        return True
    if key.endswith("rotary_emb.inv_freq") or key.endswith("original_inv_freq"):
        return True
    parts = key.split(".")
    if parts[0] == "layers" and cfg.is_kv_shared(int(parts[1])) and parts[2] == "self_attn":
        return parts[3] in ("k_proj", "v_proj", "k_norm", "v_norm")
    return False


def units(model: Gemma4Model) -> Iterator[tuple[str, nn.Module]]:
    """Loading order; each unit's tensors are read together, then the hook runs."""
    for name, child in model.named_children():
        if name == "layers":
            for i, layer in enumerate(child):
                yield f"layers.{i}", layer
        elif name != "lm_head":
            yield name, child
    yield "lm_head", model.lm_head


def _expected(unit_name: str, unit: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Checkpoint key -> (owning module, attribute, meta tensor) for a unit's persistent state."""
    out = {}
    for mod_name, mod in unit.named_modules():
        for attr, t in list(mod._parameters.items()) + [
                (b, t) for b, t in mod._buffers.items() if b not in mod._non_persistent_buffers_set]:
            if t is None:
                continue
            key = ".".join(x for x in (unit_name, mod_name, attr) if x)
            out[key] = (mod, attr, t)
    return out


class RandomWeights:
    """Seeded random tensors by key, standing in for a checkpoint (presets, benchmarks).

    A key's values depend only on (seed, key, device type): slices (`with_layers`) share
    weights with the full model and load order does not matter. 1-D weights and
    `layer_scalar` are drawn from U[0.5, 1.5) (away from their identity initialisation, so a
    missing multiply shows in parity tests), the rest from N(0, 0.05^2). The attention's
    `q_norm` / `k_norm` weights (head dim D) are drawn from U[0.5, 1.5) * D^-1/4: with Gemma 4's
    attention scaling of 1.0 the norms carry the score scale, and at 1 the scores of random q and
    k have a standard deviation of sqrt(D) (16 / 22.6), a softmax so peaked that bf16 rounding
    moves the logits by several percent; at D^-1/4 they are of order 1, as in a trained model.
    Drawn on `device`
    in blocks of at most BLOCK_ELEMS (the CPU generator is serial: ~80 s for the 31B slice's
    2.4e9 values; a GPU takes well under a second) and returned on the CPU in `dtype`.
    """

    BLOCK_ELEMS = 1 << 26  # 64 Mi values (128 MiB bf16) per draw

    def __init__(self, seed: int, device: str = "cpu"):
        self.seed, self.device = seed, torch.device(device)

    def _generator(self, key: str, block: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{key}:{block}".encode()).digest()
        return torch.Generator(self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @torch.no_grad()
    def read(self, key: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(meta.shape, dtype=dtype)
        flat = out.view(-1)
        identity_like = meta.dim() == 1 or key.endswith("layer_scalar")
        scale = meta.shape[0] ** -0.25 if key.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
        for b, start in enumerate(range(0, flat.numel(), self.BLOCK_ELEMS)):
            n = min(self.BLOCK_ELEMS, flat.numel() - start)
            g = self._generator(key, b)
            if identity_like:
                block = torch.empty(n, device=self.device).uniform_(0.5, 1.5, generator=g).mul_(scale)
            else:
                block = torch.randn(n, device=self.device, generator=g).mul_(0.05)
            flat[start:start + n].copy_(block)
        return out


@torch.no_grad()
def random_model(cfg: Gemma4Config, ctx: int, prefill_chunk: int, dtype: torch.dtype, seed: int,
                 device: str = "cpu", on_unit_loaded: UnitHook | None = None,
                 kv_dtype: str | None = None) -> Gemma4Model:
    """`Gemma4Model` with `RandomWeights`, built unit by unit like `load_model` (the same
    hook, the same order), so a preset export holds one float unit at a time."""
    with torch.device("meta"):
        model = Gemma4Model(cfg, ctx=ctx, prefill_chunk=prefill_chunk, dtype=dtype, kv_dtype=kv_dtype)
    source = RandomWeights(seed, device)
    _fill_units(model, lambda key, meta: source.read(key, meta, dtype if meta.is_floating_point() else meta.dtype),
                on_unit_loaded, "random weights")
    _materialize_runtime_buffers(model)
    return model


def _fill_units(model: Gemma4Model, read: Callable[[str, torch.Tensor], torch.Tensor],
                on_unit_loaded: UnitHook | None, desc: str,
                after_unit: Callable[[], None] = lambda: None) -> None:
    """The unit loop of both sources: fill each unit's persistent tensors with
    `read(key, meta)`, run `after_unit`, then the hook. A tied head shares the embedding's
    tensor (no read, no copy) unless the hook has replaced the embedding (e.g. int8): then the
    float table is let go at once (held to the head it would stay in host memory through every
    layer, 2.6 GiB on the 31B) and read again for the head."""
    unit_names = [name for name, _ in units(model)]  # names, not modules: a replaced unit is let go
    loaded_embedding = None
    with stages.stage(desc, total=len(unit_names), unit="unit") as progress:
        for unit_name in unit_names:
            unit = model.get_submodule(unit_name)
            if unit_name == "lm_head" and model.cfg.tie_word_embeddings:
                if loaded_embedding is not None:
                    model.lm_head.weight = loaded_embedding
                else:
                    mod_attr_set(model.lm_head, "weight", read("embed_tokens.weight", model.lm_head.weight))
            else:
                for key, (mod, attr, meta) in _expected(unit_name, unit).items():
                    mod_attr_set(mod, attr, read(key, meta))
            if unit_name == "embed_tokens":
                loaded_embedding = model.embed_tokens.weight
            after_unit()
            if on_unit_loaded is not None:
                on_unit_loaded(model, unit_name)
            if loaded_embedding is not None and getattr(model.embed_tokens, "weight", None) is not loaded_embedding:
                loaded_embedding = None
            progress.advance(1)


@torch.no_grad()
def load_model(root: str | Path, ctx: int, prefill_chunk: int, dtype: torch.dtype = torch.bfloat16,
               on_unit_loaded: UnitHook | None = None,
               kv_dtype: str | None = None) -> Gemma4Model:
    """Build `Gemma4Model` from a HF checkpoint directory, reading one unit at a time."""
    index = ShardIndex.open(root)
    cfg = Gemma4Config.from_json(root)
    with torch.device("meta"):
        model = Gemma4Model(cfg, ctx=ctx, prefill_chunk=prefill_chunk, dtype=dtype, kv_dtype=kv_dtype)
    available = index.text_keys()
    used: set[str] = set()
    reader = ShardReader(index)

    def read(key: str, meta: torch.Tensor) -> torch.Tensor:
        used.add(key)
        return _read_checked(reader, available, key, meta, dtype)

    try:  # after each unit, close the shards
        _fill_units(model, read, on_unit_loaded, "loading checkpoint", after_unit=reader.close)
    finally:
        reader.close()
    extra = sorted(k for k in available - used if not _ignorable(cfg, k))
    if extra:
        shard = index.key_to_shard[index.full_key(extra[0])]
        raise CheckpointError(f"{index.root}/{shard}: unexpected tensor {index.full_key(extra[0])}"
                              f" ({len(extra)} unexpected in all); does config.json match these weights?")
    _materialize_runtime_buffers(model)
    return model


def _read_checked(reader: ShardReader, available: set[str], key: str, meta: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    index = reader.index
    if key not in available:
        raise CheckpointError(f"{index.root}: tensor {index.full_key(key)} is missing from the checkpoint"
                              " (is config.json for a different model size?)")
    t = reader.read(key)
    if tuple(t.shape) != tuple(meta.shape):
        raise CheckpointError(f"{index.root}/{reader.shard_of(key)}: {index.full_key(key)} has shape "
                              f"{tuple(t.shape)}, the config implies {tuple(meta.shape)}")
    # `t` is already the reader's own tensor (no shard mapping behind it): cast only if needed
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def mod_attr_set(mod: nn.Module, attr: str, value: torch.Tensor):
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _materialize_runtime_buffers(model: Gemma4Model):
    """KV caches and RoPE tables are not in the checkpoint: allocate and initialise them.
    The caches are `lazy_zeros`: an export never writes them, so they take no host memory
    (10 GiB for the 31B's full-attention layers at 128k) unless the eager model runs."""
    from export.spool import lazy_zeros

    kv = {id(m) for m in model.modules() if isinstance(m, KVCache)}
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None and b.is_meta:
                mod._buffers[name] = (lazy_zeros(b.shape, b.dtype) if id(mod) in kv
                                      else torch.empty_like(b, device="cpu"))
    model.init_buffers(zero_kv=False)
