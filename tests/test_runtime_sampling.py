"""Sampling: greedy, temperature, top-k, top-p and seeds."""

from __future__ import annotations

import pytest
import torch

from runtime.sampling import SamplingConfig, make_generator, sample


def _draws(logits, cfg, n=400):
    gen = make_generator(cfg, "cpu")
    return [int(sample(logits, cfg, gen)) for _ in range(n)]


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    cfg = SamplingConfig()
    assert make_generator(cfg, "cpu") is None
    out = sample(logits, cfg, None)
    assert out.dtype == torch.int64 and out.shape == (1,) and int(out) == 1


def test_top_k_only_draws_the_k_best():
    logits = torch.tensor([0.0, 1.0, 0.5, 0.9, -2.0])
    draws = set(_draws(logits, SamplingConfig(temperature=5.0, top_k=2, seed=0)))
    assert draws == {1, 3}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert set(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.7, seed=1))) == {0, 1}
    # a tiny p still keeps the most likely token
    assert set(_draws(logits, SamplingConfig(temperature=1.0, top_p=1e-6, seed=1), n=50)) == {0}


def test_temperature_flattens_and_seed_reproduces():
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    cold = _draws(logits, SamplingConfig(temperature=0.2, seed=3))
    hot = _draws(logits, SamplingConfig(temperature=5.0, seed=3))
    assert cold.count(0) > 390 and hot.count(0) < 200
    assert hot == _draws(logits, SamplingConfig(temperature=5.0, seed=3))
    assert hot != _draws(logits, SamplingConfig(temperature=5.0, seed=4))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=-0.5), dict(top_p=float("nan")), dict(top_k=-1),
                                dict(top_k=1.5), dict(seed="7")])
def test_bad_sampling_values_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingConfig(**kw)
