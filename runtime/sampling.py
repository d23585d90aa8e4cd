"""Next-token sampling: greedy, temperature, top-k, top-p, reproducible with a seed.

Sampling runs on the logits' device with a `torch.Generator` of that device, so a CUDA
decode loop never copies the vocab-sized logits to the host; the same seed on the same
device gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax); the other fields are then ignored
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = off
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan would sample garbage
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(cfg: SamplingConfig, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from the config (None for greedy, which draws nothing)."""
    if cfg.greedy:
        return None
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token id from `logits` [vocab] or [1, vocab]; returns an int64 tensor of shape [1]."""
    logits = logits.reshape(-1).float()
    if cfg.greedy:
        # torch's argmax: 8.96 us in a CUDA graph on the H100, where two reductions (rows' maxima, then the first
        # largest) took 9.6-14.4 (scripts/argmax_variants.py, scripts/measurements/argmax_variants.json)
        return logits.argmax().reshape(1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = _keep_top_k(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = _keep_top_p(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.numel())
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: drop a token when the tokens more likely than it already reach p
    (so the most likely token always survives)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
