"""export/passes/inplace_triton_ops.py: a Triton op that writes the KV cache (`gemma4::attention_rows`) reaches
Inductor as its own kernels writing the buffers in place, not as a fallback the `.so` cannot call."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from export.kernels import attention as A  # noqa: F401  (registers the gemma4 ops)
from export.passes.inplace_triton_ops import inplace_triton_ops
from tests.helpers import run_code

H, HKV, D, S = 4, 2, 32, 16


class Rows(nn.Module):
    """A writer layer and a KV-shared reader over one cache, as the model calls the ops at decode; `view`: the
    writer gets a slice of a larger cache (a view of its base)."""

    def __init__(self, view: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("k", torch.randn(1, HKV, 2 * S if view else S, D, generator=g))
        self.register_buffer("v", torch.randn(1, HKV, 2 * S if view else S, D, generator=g))
        self.qw = nn.Parameter(torch.rand(D, generator=g) + 0.5)
        self.kw = nn.Parameter(torch.rand(D, generator=g) + 0.5)
        self.register_buffer("inv", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
        self.proj = nn.Linear(D, (H + 2 * HKV) * D)
        self.view = view

    def forward(self, x, pos):
        q, k, v = self.proj(x).split([H * D, HKV * D, HKV * D], -1)
        kc, vc = (self.k[:, :, :S], self.v[:, :, :S]) if self.view else (self.k, self.v)
        out = torch.ops.gemma4.attention_rows(q, k, v, self.qw, self.kw, self.inv, kc, vc, pos, 0, 1e-6)
        shared = torch.ops.gemma4.attention_q_rows(q * 0.5, self.qw, self.inv, kc, vc, pos, 0, 1e-6)
        return out + shared


def _module(view: bool = False) -> tuple[Rows, torch.fx.GraphModule, tuple]:
    model = Rows(view).eval().requires_grad_(False)
    args = (torch.randn(1, 1, D, generator=torch.Generator().manual_seed(1)), torch.tensor([5]))
    ep = torch.export.export(model, args).run_decompositions({})  # functional, as ExecuTorch hands it over
    return model, ep.module(), args


def test_the_cache_writing_op_is_called_in_place_with_the_same_results():
    """The functional node becomes the op's call on the buffers themselves (no auto_functionalized_v2, no copy
    back), and the rewritten module returns the same output and leaves the same caches as the functional one."""
    _, gm, (x, pos) = _module()
    assert sum(n.target is auto_functionalized_v2 for n in gm.graph.nodes) == 1
    reference = copy.deepcopy(gm)
    assert inplace_triton_ops(gm) == 1
    nodes = list(gm.graph.nodes)
    assert not any(n.target is auto_functionalized_v2 for n in nodes)
    assert not any(n.target is torch.ops.aten.copy_.default for n in nodes)
    (call,) = [n for n in nodes if n.target is torch.ops.gemma4.attention_rows.default]
    assert [call.kwargs["k"].target, call.kwargs["v"].target] == ["k", "v"]  # the buffers, not copies
    (reader,) = [n for n in nodes if n.target is torch.ops.gemma4.attention_q_rows.default]
    assert nodes.index(reader) > nodes.index(call) and reader.args[3] is call.kwargs["k"]
    for pos_ in (pos, torch.tensor([S + 3])):  # a slot past the ring's wrap too
        want, got = reference(x, pos_), gm(x, pos_)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for name in ("k", "v"):
            torch.testing.assert_close(getattr(gm, name), getattr(reference, name), rtol=0, atol=0)
    assert not torch.equal(gm.k, Rows().k)  # the step's K was written


def test_a_view_of_the_cache_is_left_functional():
    """An op writing a view of its base stays as it is (the fallback check then names it): calling it on the base
    would write the wrong tensor."""
    _, gm, _ = _module(view=True)
    assert inplace_triton_ops(gm) == 0
    assert sum(n.target is auto_functionalized_v2 for n in gm.graph.nodes) == 1


ROWS_LAYERS_CODE = r"""
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from export.gemma4 import model as M
from export.gemma4.config import PRESETS
from scripts.count_decode_kernels import compile_user_kernels, cuda_without_gpu, fallbacks, launches, unit_code

cfg = PRESETS["tiny"]
assert cfg.is_kv_shared(3) and not cfg.is_kv_shared(0)
with torch.device("meta"):
    model = M.Gemma4Model(cfg, ctx=64, prefill_chunk=12, dtype=torch.float32, kv_dtype=None)
    model = model.eval().requires_grad_(False)
M.attention_rows_on = lambda device, q_per_program=None: device.type == "cuda"
out = {}
with cuda_without_gpu():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model._apply(lambda t: torch.empty_like(t, device="cuda"))
        chain = model.chain()
    for name in ("layer0", "layer3"):  # a cache writer, a KV-shared reader
        for in_place in (False, True):
            code = unit_code(chain.units[name], mode, in_place)
            out[f"{name} {in_place}"] = {"kernels": launches(code), "calls": fallbacks(code).count("attention_rows")}
            if in_place:  # the writer's and the reader's kernels, as Inductor spliced them
                out[f"{name} {in_place}"]["compiled"] = compile_user_kernels(code)
print(json.dumps(out))
"""


def test_exported_rows_layers_compile_to_the_attention_kernel():
    """The tiny preset's decode layers exported with GEMMA4_ATTENTION_ROWS=1 as ExecuTorch hands them to the backend
    (torch.export, run_decompositions, the module), then compiled by Inductor for CUDA on this machine (no GPU; in
    a process of its own, as count_decode_kernels runs): each layer launches the split attention kernel and nothing
    calls `attention_rows` as a fallback; without the pass the writer layers hold that fallback and no attention
    kernel (what the `.so` could not run). The rows' kernels, as Inductor splices them into the code, compile for
    sm_90."""
    seen = json.loads(run_code(ROWS_LAYERS_CODE, timeout=900).splitlines()[-1])
    before = seen["layer0 False"]
    assert before["calls"] > 0 and not any(k.startswith("_attn_body") for k in before["kernels"]), seen
    for name in ("layer0", "layer3"):
        after = seen[f"{name} True"]
        assert after["calls"] == 0 and sum(k.startswith("_attn_body") for k in after["kernels"]) == 1, seen
        compiled, failed = after["compiled"]
        assert compiled >= 1 and failed == [], (name, failed)
