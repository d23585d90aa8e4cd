"""Gemma 4 text-decoder configuration: a frozen dataclass, parsed from a raw HF config.json.

We read config.json ourselves instead of going through `Gemma4TextConfig`: its
`__post_init__` pops `global_head_dim` / `num_global_key_value_heads` into a per-layer
table and afterwards some attributes raise. Defaults for missing keys follow
transformers 5.17's `Gemma4TextConfig` so a sparse config.json means the same thing here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


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

    def layer_intermediate_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.is_kv_shared(i)
        return self.intermediate_size * (2 if wide else 1)

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "Gemma4Config":
        """Parse a config.json dict: text-only `gemma4_text` or multimodal `gemma4`
        (whose text part sits under `text_config`)."""
        if "text_config" in raw and raw.get("model_type") != "gemma4_text":
            raw = {**raw["text_config"]}
        known = {f for f in cls.__dataclass_fields__}
        kw: dict[str, Any] = {k: raw[k] for k in known & raw.keys() if raw[k] is not None}
        if "layer_types" in kw:
            kw["layer_types"] = tuple(kw["layer_types"])
        rope = raw.get("rope_parameters") or {}
        if SLIDING in rope:
            kw["rope_theta_sliding"] = float(rope[SLIDING].get("rope_theta", 10_000.0))
        if FULL in rope:
            kw["rope_theta_full"] = float(rope[FULL].get("rope_theta", 1_000_000.0))
            kw["partial_rotary_factor_full"] = float(rope[FULL].get("partial_rotary_factor", 1.0))
            if rope[FULL].get("rope_type", "proportional") not in ("proportional", "default"):
                raise ValueError(f"unsupported full-attention rope_type {rope[FULL]['rope_type']!r}")
        eos = raw.get("eos_token_id", 1)
        kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        if raw.get("use_bidirectional_attention") == "all":
            raise ValueError("bidirectional Gemma 4 configs are not causal LMs; not supported")
        for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            kw.setdefault(k, 0)
        return cls(**kw)

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
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw)

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
                                "top_k_experts": 2, "moe_intermediate_size": 24}),
    # Real configs, as in shared/reference/gemma4_text_configs.json.
    **_load_real(),
}
