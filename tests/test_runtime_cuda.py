"""The runner on CUDA: the tiny preset exported for cuda (fp32, so parity can be tight), run
through AOTIModelContainerRunnerCuda. Needs a GPU; skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch

from runtime.runner import Runner
from runtime.sampling import SamplingConfig
from tests.test_runtime_runner import REL_TOL, _prompt, check_parity_with_eager

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


@pytest.fixture(scope="session")
def tiny_cuda(tmp_path_factory):
    """(artifact dir, eager model on cuda with the same weights): one CUDA compile per session."""
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model, prepare_model
    from export.gemma4.quant import LinearQuant

    cfg = ExportConfig(preset="tiny", device=DeviceChoice.CUDA, dtype=DTypeChoice.FP32, quant=LinearQuant.NONE,
                       ctx=64, prefill_chunk=8, autotune=False,  # max_autotune: minutes for a test
                       out=tmp_path_factory.mktemp("tiny_cuda") / "tiny")
    export_model(cfg)
    model, _ = prepare_model(cfg)
    return cfg.out, model.eval()


@pytest.fixture(scope="module")
def cuda_runner(tiny_cuda) -> Runner:
    return Runner.load(tiny_cuda[0])


def test_cuda_logits_match_eager(cuda_runner, tiny_cuda):
    assert cuda_runner.device == "cuda:0"
    assert all(t.is_cuda for t in cuda_runner._bound.weights.values())
    errors = check_parity_with_eager(cuda_runner, tiny_cuda[1])
    assert max(errors) <= REL_TOL, errors


def test_cuda_same_seed_same_text(cuda_runner):
    prompt = _prompt(11, cuda_runner.meta.vocab_size, seed=1)
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = list(cuda_runner.generate(prompt, 16, cfg, stop_ids=()))
    assert list(cuda_runner.generate(prompt, 16, cfg, stop_ids=())) == first
    assert torch.cuda.max_memory_allocated() > 0
