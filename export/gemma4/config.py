"""Gemma 4 text-decoder configuration: a frozen dataclass, parsed from a raw HF config.json.

We read config.json ourselves instead of going through `Gemma4TextConfig` (whose per-layer
attributes raise when read globally). Two forms exist: the one Google publishes
(`global_head_dim`, `num_global_key_value_heads`) and the one transformers' `save_pretrained`
writes, where full-attention layers' head_dim and KV heads sit in `per_layer_config`
(`{"05": {"head_dim": 512, "num_key_value_heads": 4}}`; a value equal to the global one is
left out). A field that decides a tensor shape must be present: a missing one is a
`ConfigError` naming it, never a default. Other missing keys take transformers 5.17's defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

# Fields that decide a tensor shape; the second table's fields only when its condition holds.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "layer_types", "attention_k_eq_v", "num_kv_shared_layers",
                "hidden_size_per_layer_input")
SHAPE_FIELDS_IF = {
    "vocab_size_per_layer_input": lambda raw: raw["hidden_size_per_layer_input"] > 0,  # PLE table rows
    "use_double_wide_mlp": lambda raw: raw["num_kv_shared_layers"] > 0,  # KV-shared layers' MLP width
    "num_experts": lambda raw: bool(raw.get("enable_moe_block")),
    "top_k_experts": lambda raw: bool(raw.get("enable_moe_block")),
    "moe_intermediate_size": lambda raw: bool(raw.get("enable_moe_block")),
}


class ConfigError(ValueError):
    """config.json lacks or misstates a field; the message names the field and the file."""


@dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # sliding layers
    head_dim: int = 256  # sliding layers
    num_global_key_value_heads: int | None = None  # full layers, only used with attention_k_eq_v
    global_head_dim: int = 512  # full layers
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 512  # keys visible to a sliding query, itself included
    max_position_embeddings: int = 131072
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25  # "proportional" RoPE on full layers
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    attention_k_eq_v: bool = False  # full layers: V = v_norm(k_proj(x))
    num_kv_shared_layers: int = 0  # the last N layers reuse K/V of an earlier layer
    hidden_size_per_layer_input: int = 256  # PLE width per layer; 0 = no PLE
    vocab_size_per_layer_input: int = 262144
    use_double_wide_mlp: bool = False  # KV-shared layers get a 2x MLP
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    def __post_init__(self):
        if not self.layer_types:  # HF default: 5 sliding : 1 full
            types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        types = list(self.layer_types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(types)} entries, num_hidden_layers is {self.num_hidden_layers}")
        if types[-1] != FULL:  # transformers forces the last layer to full attention
            types[-1] = FULL
        object.__setattr__(self, "layer_types", tuple(types))
        bad = set(types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    # ---- per-layer geometry -------------------------------------------------------
    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == SLIDING

    def layer_head_dim(self, i: int) -> int:
        return self.head_dim if self.is_sliding(i) else self.global_head_dim

    def layer_kv_heads(self, i: int) -> int:
        # transformers overrides full-layer KV heads only when attention_k_eq_v is set
        if not self.is_sliding(i) and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def uses_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(i)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_shared(self, i: int) -> bool:
        return self.num_kv_shared_layers > 0 and i >= self.first_kv_shared_layer

    def kv_source_layer(self, i: int) -> int:
        """The layer whose KV cache layer i reads: itself, or for a KV-shared layer the last
        non-shared layer of the same type."""
        if not self.is_kv_shared(i):
            return i
        prev = self.layer_types[: self.first_kv_shared_layer]
        return len(prev) - 1 - prev[::-1].index(self.layer_types[i])

    def ring_slots(self, ctx: int) -> int:
        """Slots of a sliding layer's KV ring: the window, never more than the context (a
        prefill chunk attends to its own K/V beside the ring; export/gemma4/model.py)."""
        return min(self.sliding_window, ctx)

    def layer_intermediate_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(i)
        return self.intermediate_size * (2 if wide else 1)

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Gemma4Config":
        """Parse a config.json dict: text-only `gemma4_text` or multimodal `gemma4` (whose
        text part sits under `text_config`), in either head-geometry form (module docstring)."""
        where = source
        kind = raw.get("model_type")
        if kind is not None and kind not in ("gemma4", "gemma4_text"):
            raise ConfigError(f"{source}: model_type {kind!r} is not Gemma 4 (gemma4 or gemma4_text); this exporter "
                              "reads Gemma 4 checkpoints only")
        if "text_config" in raw and raw.get("model_type") != "gemma4_text":
            if not isinstance(raw["text_config"], dict):
                raise ConfigError(f"{source}: text_config is not an object")
            raw, where = {**raw["text_config"]}, f"{source} (text_config)"
        _require_shape_fields(raw, where)
        known = {f for f in cls.__dataclass_fields__} - {"global_head_dim", "num_global_key_value_heads"}
        kw: dict[str, Any] = {k: raw[k] for k in known & raw.keys() if raw[k] is not None}
        kw["layer_types"] = tuple(kw["layer_types"])
        kw["global_head_dim"], kw["num_global_key_value_heads"] = _full_layer_geometry(raw, where)
        rope = raw.get("rope_parameters") or {}
        if SLIDING in rope:
            kw["rope_theta_sliding"] = float(rope[SLIDING].get("rope_theta", 10_000.0))
        if FULL in rope:
            kw["rope_theta_full"] = float(rope[FULL].get("rope_theta", 1_000_000.0))
            kw["partial_rotary_factor_full"] = float(rope[FULL].get("partial_rotary_factor", 1.0))
            if rope[FULL].get("rope_type", "proportional") not in ("proportional", "default"):
                raise ConfigError(f"{where}: unsupported full-attention rope_type {rope[FULL]['rope_type']!r}")
        eos = raw.get("eos_token_id", 1)
        kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        if raw.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{where}: bidirectional Gemma 4 configs are not causal LMs; not supported")
        for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            kw.setdefault(k, 0)
        try:
            return cls(**kw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Gemma4Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a config object")
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> "Gemma4Config":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]

    def to_hf_dict(self) -> dict[str, Any]:
        """A `gemma4_text` config.json dict that transformers and `from_hf_dict` both read."""
        d = asdict(self)
        for k in ("rope_theta_sliding", "rope_theta_full", "partial_rotary_factor_full", "eos_token_ids"):
            d.pop(k)
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
            FULL: {"rope_type": "proportional", "rope_theta": self.rope_theta_full,
                   "partial_rotary_factor": self.partial_rotary_factor_full},
        }
        d["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        d["hidden_activation"] = "gelu_pytorch_tanh"
        d["model_type"] = "gemma4_text"
        if not self.enable_moe_block:
            for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                d[k] = None
        return d

    def with_layers(self, n: int) -> "Gemma4Config":
        """The first n layers of this config (for slices at real width); the last stays full."""
        if not 1 <= n <= self.num_hidden_layers:
            raise ValueError(f"a slice needs 1..{self.num_hidden_layers} layers, got {n}")
        types = list(self.layer_types[:n])
        shared = max(0, self.num_kv_shared_layers - (self.num_hidden_layers - n))
        return replace(self, num_hidden_layers=n, layer_types=tuple(types), num_kv_shared_layers=shared)


def _require_shape_fields(raw: dict[str, Any], where: str) -> None:
    """Refuse a config lacking a field that decides a tensor shape (no silent default)."""
    for name in SHAPE_FIELDS:
        if raw.get(name) is None:
            raise ConfigError(f"{where} lacks {name}, which decides tensor shapes; add it "
                              "(the model's original config.json has it)")
    ints = [k for k in SHAPE_FIELDS if k not in ("layer_types", "attention_k_eq_v")]
    for name in ints:
        if not isinstance(raw[name], int) or isinstance(raw[name], bool) or raw[name] < 0:
            raise ConfigError(f"{where}: {name} must be a non-negative integer, got {raw[name]!r}")
    if not isinstance(raw["layer_types"], list):
        raise ConfigError(f"{where}: layer_types must be a list of attention types")
    for name, needed in SHAPE_FIELDS_IF.items():
        if needed(raw) and raw.get(name) is None:
            raise ConfigError(f"{where} lacks {name}, which decides tensor shapes with these settings; add it")


def _full_layer_geometry(raw: dict[str, Any], where: str) -> tuple[int, int | None]:
    """(head_dim, KV heads or None) of the full-attention layers, from either form."""
    full = [i for i, t in enumerate(raw["layer_types"]) if t == FULL]
    full.append(len(raw["layer_types"]) - 1)  # transformers forces the last layer to full
    if "per_layer_config" not in raw:
        if raw.get("global_head_dim") is None:
            raise ConfigError(f"{where} lacks global_head_dim (or per_layer_config), which decides the "
                              "full-attention layers' shapes; add it")
        kv = raw.get("num_global_key_value_heads") if raw["attention_k_eq_v"] else None
        return raw["global_head_dim"], kv
    per_layer = raw["per_layer_config"] or {}
    try:
        overrides = {int(k): v for k, v in per_layer.items()}
    except (AttributeError, ValueError):
        raise ConfigError(f"{where}: per_layer_config must map layer indices to objects") from None
    wanted = overrides.get(full[0], {})
    for i, o in overrides.items():
        if set(o) - {"head_dim", "num_key_value_heads"}:
            raise ConfigError(f"{where}: per_layer_config[{i}] sets {sorted(set(o) - {'head_dim', 'num_key_value_heads'})}; "
                              "only head_dim and num_key_value_heads may vary per layer here")
        if i not in full and o:
            raise ConfigError(f"{where}: per_layer_config overrides sliding layer {i}; only full-attention "
                              "layers may differ from the global head_dim / num_key_value_heads")
    for i in full:
        if overrides.get(i, {}) != wanted:
            raise ConfigError(f"{where}: per_layer_config gives full-attention layers {full[0]} and {i} "
                              "different geometry; all full layers must match")
    if "num_key_value_heads" in wanted and not raw["attention_k_eq_v"]:
        raise ConfigError(f"{where}: per_layer_config sets num_key_value_heads on full layers without "
                          "attention_k_eq_v; not supported")
    return wanted.get("head_dim", raw["head_dim"]), wanted.get("num_key_value_heads")


def _pattern(n: int, period: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % period == 0 or i == n - 1 else SLIDING for i in range(n))


def _load_real() -> dict[str, Gemma4Config]:
    return {
        "31b": Gemma4Config(
            vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
            num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
            head_dim=256, global_head_dim=512, layer_types=_pattern(60, 6), sliding_window=1024,
            max_position_embeddings=262144, final_logit_softcapping=30.0, attention_k_eq_v=True,
            hidden_size_per_layer_input=0),
        "26b-a4b": Gemma4Config(
            vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
            num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
            head_dim=256, global_head_dim=512, layer_types=_pattern(30, 6), sliding_window=1024,
            max_position_embeddings=262144, final_logit_softcapping=30.0, attention_k_eq_v=True,
            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
            top_k_experts=8, moe_intermediate_size=704),
        "e4b": Gemma4Config(
            vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
            num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
            layer_types=_pattern(42, 6), sliding_window=512, max_position_embeddings=131072,
            final_logit_softcapping=30.0, num_kv_shared_layers=18, hidden_size_per_layer_input=256),
        "e2b": Gemma4Config(
            vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
            num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
            layer_types=_pattern(35, 5), sliding_window=512, max_position_embeddings=131072,
            final_logit_softcapping=30.0, num_kv_shared_layers=20, hidden_size_per_layer_input=256,
            use_double_wide_mlp=True),
    }


# Tiny presets: every feature at toy sizes, seconds on a CPU. `tiny` has PLE, KV sharing,
# the double-wide MLP and k_eq_v; `tiny-moe` adds the MoE block beside the dense MLP.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
    # 4 layers keep CI's AOTInductor compiles short; the last two share the first two's KV
    head_dim=16, global_head_dim=32, layer_types=(SLIDING, FULL, SLIDING, FULL),
    sliding_window=8, max_position_embeddings=4096, final_logit_softcapping=30.0,
    attention_k_eq_v=True, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=512, use_double_wide_mlp=True)

PRESETS: dict[str, Gemma4Config] = {
    "tiny": Gemma4Config(**_TINY),
    "tiny-moe": Gemma4Config(**{**_TINY, "enable_moe_block": True, "num_experts": 8,
                                "top_k_experts": 2, "moe_intermediate_size": 32}),  # 32: int4 experts' smallest group
    # Real configs, as published (tests/data/gemma4_text_configs.json; tests/test_config.py checks them).
    **_load_real(),
}
