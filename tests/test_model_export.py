"""torch.export (non-strict, as the exporter does) of both entry points: prefill with dynamic T, decode with T = 1."""

import pytest
import torch
from torch.export import Dim

from export.gemma4.config import PRESETS
from export.pipeline import EXPORT_KW
from export.gemma4.model import Gemma4Model
from tests.helpers import randomize_


@pytest.mark.parametrize("name", ["tiny-moe"])  # tiny-moe has every feature of tiny and MoE
@torch.no_grad()
def test_export_prefill_and_decode(name):
    chunk = 12  # longer than the window (8): a chunk attends its own K/V beside the ring
    model = randomize_(Gemma4Model(PRESETS[name], ctx=64, prefill_chunk=chunk), seed=3).eval()
    T = Dim("T", min=1, max=chunk)
    prefill = torch.export.export(model, (torch.zeros(1, chunk, dtype=torch.long), torch.tensor([0])),
                                  dynamic_shapes=({1: T}, None), **EXPORT_KW)
    decode = torch.export.export(model, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])), **EXPORT_KW)
    # once functionalized (as to_edge does), both programs mutate exactly the KV buffers
    # (a ring's chunk buffers serve the compiled chain's readers: the whole forward never writes them)
    kv = {s["fqn"] for s in model.kv_cache_specs() if s["kind"] != "chunk"}
    for ep in (prefill, decode):
        assert set(ep.run_decompositions({}).graph_signature.buffers_to_mutate.values()) == kv

    # the exported programs compute what the eager model computes
    tokens = torch.randint(0, PRESETS[name].vocab_size, (1, 12))
    ref_model = randomize_(Gemma4Model(PRESETS[name], ctx=64, prefill_chunk=chunk), seed=3).eval()
    pm, dm = prefill.module(), decode.module()
    for m in (pm, dm):
        for b in kv:
            m.get_buffer(b).zero_()
    # prefill module and decode module hold separate buffer copies after .module(): share them
    for b in kv:
        dm.get_submodule(b.rsplit(".", 1)[0]).register_buffer(b.rsplit(".", 1)[1], pm.get_buffer(b), persistent=False)
    got = [pm(tokens[:, :11], torch.tensor([0])), dm(tokens[:, 11:12], torch.tensor([11]))]
    want = [ref_model(tokens[:, :11], torch.tensor([0])), ref_model(tokens[:, 11:12], torch.tensor([11]))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
