"""The quantization recipe: CPU int4 packing and its in-graph dequant, int8 embeddings,
lm_head untying, and what the recipe leaves in float (and why)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.backends import TargetDevice
from export.gemma4.config import PRESETS
from export.gemma4.model import Gemma4Model
from export.gemma4.quant import (
    EmbeddingQuant,
    Int4Linear,
    Int8Embedding,
    LinearQuant,
    QuantRecipe,
    quantize_,
)
from tests.helpers import RecordOps, randomize_


def _weight(n=48, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int4_codes_roundtrip_exactly():
    """A weight already on the int4 grid of its groups dequantizes exactly (packing order,
    nibble order, scale/offset broadcast all right)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 64), generator=g).float()
    codes[:, ::32] = 0  # every group spans the full 0..15 range, so its scale is exactly 1/15
    codes[:, 1::32] = 15
    scale = torch.rand(8, 2, generator=g) + 0.5
    offset = torch.randn(8, 2, generator=g)
    w = (codes.view(8, 2, 32) * (scale / 15)[..., None] + offset[..., None]).view(8, 64)
    q = Int4Linear.from_float(w, 32)
    torch.testing.assert_close(q.dequantize(), w, rtol=1e-5, atol=1e-5)


def test_int4_linear_error_and_layout():
    w = _weight()
    q = Int4Linear.from_float(w, 32)
    assert q.qweight.shape == (48, 32) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == q.offsets.shape == (48, 2)
    x = torch.randn(3, 64)
    rel = ((q(x) - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert 0.01 < rel < 0.15  # 4-bit: clearly lossy, clearly not garbage


def test_int4_rows_slice_along_dim0():
    """The N-chunking pass's premise: slicing qweight/scales/offsets rows gives those output
    features, with the same graph (views use -1 for dim 0)."""
    w = _weight(n=40)
    q = Int4Linear.from_float(w, 32)
    part = Int4Linear(64, 16, 32, torch.float32)
    for name in ("qweight", "scales", "offsets"):
        getattr(part, name).copy_(getattr(q, name)[8:24])
    x = torch.randn(2, 64)
    torch.testing.assert_close(part(x), q(x)[:, 8:24])
    ep = torch.export.export(q, (x,))
    views = [n.args[1] for n in ep.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.view.default]
    assert views and all(v[0] == -1 for v in views)


def test_int8_embedding_gathers_then_dequantizes():
    w = _weight(n=100, k=16)
    e = Int8Embedding.from_float(w)
    tok = torch.tensor([[0, 5, 99]])
    torch.testing.assert_close(e(tok), w[tok], rtol=0, atol=w.abs().max().item() / 127)


def _tiny():
    return randomize_(Gemma4Model(PRESETS["tiny"], ctx=32, prefill_chunk=4), seed=0).eval()


def test_quantize_unties_lm_head_and_keeps_embedding():
    model = _tiny()
    emb = model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.embed_tokens.weight
    report = quantize_(model, QuantRecipe(), TargetDevice.CPU)
    assert report.untied_lm_head and "lm_head" in report.int4
    assert isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.embed_tokens, nn.Embedding) and torch.equal(model.embed_tokens.weight, emb)
    # what stayed float, and why: per_layer_projection has K = 8 < group 32
    assert set(report.skipped) == {f"layers.{i}.per_layer_projection" for i in range(PRESETS["tiny"].num_hidden_layers)}
    assert all("multiple of 32" in why for why in report.skipped.values())


def test_quantize_int8_embedding_without_int4_keeps_a_float_head():
    model = _tiny()
    head = model.lm_head.weight.detach().clone()
    report = quantize_(model, QuantRecipe(linear=LinearQuant.NONE, embedding=EmbeddingQuant.INT8), TargetDevice.CPU)
    assert report.int8_embedding == ["embed_tokens", "embed_tokens_per_layer"]
    assert isinstance(model.embed_tokens, Int8Embedding)
    assert model.lm_head.weight.dtype == torch.float32 and torch.equal(model.lm_head.weight, head)


def test_quantize_under_one_subtree():
    model = _tiny()
    report = quantize_(model, QuantRecipe(), TargetDevice.CPU, under="layers.1")
    assert report.int4 and all(f.startswith("layers.1.") for f in report.int4)
    assert isinstance(model.layers[0].mlp.gate_proj, nn.Linear)
    assert model.lm_head.weight is model.embed_tokens.weight  # lm_head not in scope: still tied


def test_quantized_model_still_runs_close_to_float():
    model = _tiny()
    ref = _tiny()
    quantize_(model, QuantRecipe(group_size=32, embedding=EmbeddingQuant.INT8), TargetDevice.CPU)
    tok = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(tok, torch.tensor([0])), ref(tok, torch.tensor([0]))
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 0.5 and not torch.equal(a, b)


def test_cuda_recipe_packs_on_the_host_into_the_kernel_layout():
    """The CUDA target's linears become PackedInt4Linear (gemma4::int4_linear), packed without a
    GPU; on CPU tensors the op runs its reference, so the model runs here too."""
    from export.gemma4.quant import PackedInt4Linear
    from export.kernels.int4_matmul import dequantize_int4
    model, ref = _tiny().to(torch.bfloat16), _tiny().to(torch.bfloat16)
    report = quantize_(model, QuantRecipe(group_size=128), TargetDevice.CUDA)
    assert report.int4 and not report.skipped.get("lm_head")
    head = model.lm_head
    assert isinstance(head, PackedInt4Linear) and head.qweight.dtype == torch.uint8
    assert head.scales.shape == (head.out_features, head.in_features // head.group_size)
    w = ref.lm_head.weight.float()
    err = ((dequantize_int4(head.qweight, head.scales, torch.float32) - w).norm() / w.norm()).item()
    assert err < 0.15  # g<=128 symmetric int4 on random normal weights: ~0.11
    x = torch.randn(3, head.in_features, dtype=torch.bfloat16)
    y = (x.float() @ dequantize_int4(head.qweight, head.scales, torch.float32).t())
    assert ((head(x).float() - y).norm() / y.norm()).item() < 1e-2
    tok = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(tok, torch.tensor([0])), ref(tok, torch.tensor([0]))
    # every linear of a 64-wide bf16 model at ~11% weight error: a loose bound, not parity
    assert torch.isfinite(a).all() and ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.75


def test_cuda_recipe_joins_the_linears_of_one_input(monkeypatch):
    """q/k/v and gate/up become one PackedInt4Linear each (rows stacked: the parts' own codes
    and scales), and the model computes what the separate linears computed."""
    from export.gemma4 import quant
    from export.gemma4.quant import PackedInt4Linear

    model = _tiny().to(torch.bfloat16)
    report = quantize_(model, QuantRecipe(group_size=128), TargetDevice.CUDA)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.qkv_proj, PackedInt4Linear) and not hasattr(attn, "q_proj")
    assert isinstance(mlp.gate_up_proj, PackedInt4Linear) and not hasattr(mlp, "up_proj")
    assert report.joined["layers.0.mlp.gate_up_proj"] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    parts = [n for n in ("q_proj", "k_proj", "v_proj") if f"layers.0.self_attn.{n}" in report.int4]
    assert attn.qkv_proj.split_sizes[0] == attn.n_heads * attn.head_dim and len(attn.qkv_proj.split_sizes) == len(parts)

    separate = _tiny().to(torch.bfloat16)
    monkeypatch.setattr(quant, "_join_linears", lambda *a: None)
    quantize_(separate, QuantRecipe(group_size=128), TargetDevice.CUDA)
    sep_mlp = separate.layers[0].mlp
    assert torch.equal(mlp.gate_up_proj.qweight, torch.cat([sep_mlp.gate_proj.qweight, sep_mlp.up_proj.qweight]))
    assert torch.equal(mlp.gate_up_proj.scales, torch.cat([sep_mlp.gate_proj.scales, sep_mlp.up_proj.scales]))
    tok = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(tok, torch.tensor([0])).float(), separate(tok, torch.tensor([0])).float()
    assert ((a - b).norm() / b.norm()).item() < 1e-2  # bf16 outputs of the same products


def test_packed_down_projection_takes_the_activation_in_one_op():
    """The MLP hands a packed int4 down projection gate and up (gemma4::int4_glu_linear): on CPU the
    op's reference, so the MLP computes exactly down(gelu_tanh(gate) * up)."""
    import torch.nn.functional as F

    from export.gemma4.quant import PackedInt4Linear

    model = _tiny().to(torch.bfloat16)
    quantize_(model, QuantRecipe(group_size=128), TargetDevice.CUDA)
    mlp = model.layers[0].mlp
    assert isinstance(mlp.down_proj, PackedInt4Linear)
    x = torch.randn(1, 3, mlp.gate_up_proj.in_features, dtype=torch.bfloat16)
    gate, up = mlp.gate_up_proj(x).split(mlp.gate_up_proj.split_sizes, dim=-1)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.down_proj(F.gelu(gate, approximate="tanh") * up))
    seen = []
    with torch.no_grad(), RecordOps(seen):
        mlp(x)
    assert "gemma4.int4_glu_linear.default" in seen and seen.count("gemma4.int4_linear.default") == 1


def test_packed_per_layer_projection_takes_the_activation_in_one_op():
    """A per-layer-embedding layer (E2B / E4B) hands its packed int4 projection the gate and the
    per-layer input (gemma4::int4_glu_linear): on CPU the op's reference, so the layer computes what
    the float path does with the same weights, exactly."""
    import dataclasses

    from export.gemma4.quant import PackedInt4Linear

    cfg = dataclasses.replace(PRESETS["tiny"], hidden_size_per_layer_input=32)  # one group of 32: packed
    assert cfg.has_ple
    model = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=4), seed=2).to(torch.bfloat16).eval()
    quantize_(model, QuantRecipe(group_size=32), TargetDevice.CUDA)
    layer = model.layers[0]
    assert isinstance(layer.per_layer_projection, PackedInt4Linear)
    tok = torch.randint(0, cfg.vocab_size, (1, 3), generator=torch.Generator().manual_seed(3))
    seen = []
    with torch.no_grad(), RecordOps(seen):
        fused = model(tok, torch.tensor([0])).float()
    assert seen.count("gemma4.int4_glu_linear.default") == 2 * cfg.num_hidden_layers  # the MLP's and the PLE's
    for lyr in model.layers:  # the same weights without the fused path
        object.__setattr__(lyr.per_layer_projection, "forward_glu", None)
    model.reset_cache()
    seen = []
    with torch.no_grad(), RecordOps(seen):
        plain = model(tok, torch.tensor([0])).float()
    assert seen.count("gemma4.int4_glu_linear.default") == cfg.num_hidden_layers
    assert torch.equal(fused, plain)


def test_packed_projections_take_the_norms_before_them_in_their_ops(monkeypatch):
    """A layer hands its packed int4 q / k / v projection x and the input norm (gemma4::int4_rms_linear, as the
    model hands its packed lm_head the final norm), its packed gate / up the residual stream, the attention output
    and the two norms between them (gemma4::int4_add_rms_linear), and its packed per-layer-input gate the residual
    stream, the MLP's output and its norm (gemma4::int4_add_linear): on CPU the ops' references, so the model
    computes what the float path does with the same weights, exactly, with one op where there were a norm (and an
    add) and `int4_linear`."""
    from export.gemma4.quant import PackedInt4Linear

    model = _tiny().to(torch.bfloat16)
    quantize_(model, QuantRecipe(group_size=128), TargetDevice.CUDA)
    attn = model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, PackedInt4Linear)
    for layer in model.layers:  # norms that are not all ones
        with torch.no_grad():
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    tok = torch.randint(0, 512, (1, 3), generator=torch.Generator().manual_seed(4))
    seen = []
    with torch.no_grad(), RecordOps(seen):
        fused = model(tok, torch.tensor([0])).float()
    n = len(model.layers)
    assert isinstance(model.lm_head, PackedInt4Linear)
    assert seen.count("gemma4.int4_rms_linear.default") == n + 1  # and the lm_head with the final norm
    assert seen.count("gemma4.int4_add_rms_linear.default") == n
    assert isinstance(model.layers[0].per_layer_input_gate, PackedInt4Linear)  # the preset has per-layer inputs
    assert seen.count("gemma4.int4_add_linear.default") == n  # the MLP's output added, then the gate
    monkeypatch.setenv("GEMMA4_FUSED_NORMS", "0")  # the A/B switch: aten norms, the same logits
    model.reset_cache()
    seen = []
    with torch.no_grad(), RecordOps(seen):
        switched = model(tok, torch.tensor([0])).float()
    assert not [op for op in seen if "rms_linear" in op or "add_linear" in op] and torch.equal(switched, fused)
    monkeypatch.delenv("GEMMA4_FUSED_NORMS")
    for layer in model.layers:  # the same weights without the fused paths (a KV-shared layer: q alone)
        attn = layer.self_attn
        for linear in [getattr(attn, n) for n in ("qkv_proj", "q_proj") if hasattr(attn, n)]:
            object.__setattr__(linear, "forward_rms", None)
        object.__setattr__(layer.mlp.gate_up_proj, "forward_add_rms", None)
        object.__setattr__(layer.mlp.gate_up_proj, "forward_rms", None)
        object.__setattr__(layer.per_layer_input_gate, "forward_add", None)
    object.__setattr__(model.lm_head, "forward_rms", None)
    model.reset_cache()
    seen = []
    with torch.no_grad(), RecordOps(seen):
        plain = model(tok, torch.tensor([0])).float()
    assert seen.count("gemma4.int4_rms_linear.default") == 0
    assert seen.count("gemma4.int4_add_rms_linear.default") == 0
    assert seen.count("gemma4.int4_add_linear.default") == 0
    assert torch.equal(fused, plain)


def test_packed_o_proj_takes_the_attention_into_its_op_at_decode(monkeypatch):
    """With GEMMA4_FUSED_ATTENTION=1, at a decode step a layer hands its packed o_proj the attention's inputs
    (gemma4::attention_int4_linear: on CUDA the combine writes the GEMV's x levels), over a quantized cache
    with the output's rotation back too; a prefill chunk keeps `gemma4::attention` then the linear, and so
    does every step with the switch unset (the default) or "0". On CPU the op is the references of the ops,
    so the logits are the unfused ones exactly."""
    tok = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(6))

    def run(kv_dtype=None):
        model = randomize_(Gemma4Model(PRESETS["tiny"], ctx=32, prefill_chunk=4, kv_dtype=kv_dtype), seed=0).eval()
        quantize_(model.to(torch.bfloat16), QuantRecipe(group_size=32), TargetDevice.CUDA)
        seen, logits = [], []
        with torch.no_grad():
            logits.append(model(tok[:, :4], torch.tensor([0])).float())
            with RecordOps(seen):
                logits.append(model(tok[:, 4:], torch.tensor([4])).float())
        return seen, torch.cat(logits, 1)

    n = PRESETS["tiny"].num_hidden_layers
    for kv_dtype in (None, "int8"):  # a bf16 cache; int8 caches in the full layers (the sliding rings stay bf16)
        monkeypatch.delenv("GEMMA4_FUSED_ATTENTION", raising=False)
        for switch in (None, "0"):
            if switch is not None:
                monkeypatch.setenv("GEMMA4_FUSED_ATTENTION", switch)
            seen, plain = run(kv_dtype)
            assert seen.count("gemma4.attention.default") == n and "gemma4.attention_int4_linear.default" not in seen
            rotations = seen.count("gemma4.hadamard.default")
            assert (rotations > 0) == (kv_dtype is not None)
        monkeypatch.setenv("GEMMA4_FUSED_ATTENTION", "1")
        seen, fused = run(kv_dtype)
        assert seen.count("gemma4.attention_int4_linear.default") == n and "gemma4.attention.default" not in seen
        quantized = rotations - seen.count("gemma4.hadamard.default")  # each output's rotation back is in the op
        assert (quantized > 0) == (kv_dtype is not None) and quantized < n
        assert torch.equal(fused, plain)


def test_packed_mlp_after_the_residual_add_is_one_op_with_its_switch(monkeypatch):
    """With GEMMA4_FUSED_MLP=1 a layer hands its packed gate / up and down projections the residual add, both
    norms and the activation as one op (gemma4::int4_add_rms_mlp: at decode on CUDA the gate / up GEMV writes
    the down GEMV's x levels), at prefill and decode alike; unset (the default) or "0", the two ops. On CPU
    the op is the references of the two, so the logits are the same exactly."""
    tok = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(7))

    def run():
        model = randomize_(Gemma4Model(PRESETS["tiny"], ctx=32, prefill_chunk=4), seed=0).eval()
        quantize_(model.to(torch.bfloat16), QuantRecipe(group_size=32), TargetDevice.CUDA)
        seen = []
        with torch.no_grad(), RecordOps(seen):
            logits = torch.cat([model(tok[:, :4], torch.tensor([0])), model(tok[:, 4:], torch.tensor([4]))], 1)
        return seen, logits.float()

    n = PRESETS["tiny"].num_hidden_layers
    monkeypatch.delenv("GEMMA4_FUSED_MLP", raising=False)
    seen, plain = run()
    assert "gemma4.int4_add_rms_mlp.default" not in seen and seen.count("gemma4.int4_glu_linear.default") == 2 * n
    monkeypatch.setenv("GEMMA4_FUSED_MLP", "1")
    seen, fused = run()
    assert seen.count("gemma4.int4_add_rms_mlp.default") == 2 * n
    assert "gemma4.int4_glu_linear.default" not in seen and "gemma4.int4_add_rms_linear.default" not in seen
    assert torch.equal(fused, plain)


def test_packed_layer_end_is_one_op_with_its_switch(monkeypatch):
    """With GEMMA4_FUSED_CLOSE=1 a layer hands its packed linears its closing residual add too: a layer without
    per-layer inputs its MLP half as one op (gemma4::int4_add_rms_mlp_close: at decode on CUDA the down GEMV writes the
    layer's output), one with them (E2B / E4B) the per-layer gate, projection and add (gemma4::int4_add_ple_close), one
    with experts (26B-A4B) the experts and the add (gemma4::moe_rms_experts_close); at prefill and decode alike. Unset (the default) or "0": the ops before, the add in aten ops. On CPU the ops are
    the references, so the logits are the same exactly."""
    import dataclasses

    tok = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(8))

    def run(cfg):
        model = randomize_(Gemma4Model(cfg, ctx=32, prefill_chunk=4), seed=0).eval()
        quantize_(model.to(torch.bfloat16), QuantRecipe(group_size=32), TargetDevice.CUDA)
        seen = []
        with torch.no_grad(), RecordOps(seen):
            logits = torch.cat([model(tok[:, :4], torch.tensor([0])), model(tok[:, 4:], torch.tensor([4]))], 1)
        return seen, logits.float()

    # per-layer inputs 32 wide: the projection packed too (8, the tiny preset's, is below the group)
    tiny = PRESETS["tiny"]
    n = tiny.num_hidden_layers
    moe = dataclasses.replace(PRESETS["tiny-moe"], hidden_size_per_layer_input=0)
    for cfg, op in ((dataclasses.replace(tiny, hidden_size_per_layer_input=32), "int4_add_ple_close"),
                    (dataclasses.replace(tiny, hidden_size_per_layer_input=0), "int4_add_rms_mlp_close"),
                    (moe, "moe_rms_experts_close")):
        monkeypatch.delenv("GEMMA4_FUSED_CLOSE", raising=False)
        for switch in (None, "0"):
            if switch is not None:
                monkeypatch.setenv("GEMMA4_FUSED_CLOSE", switch)
            seen, plain = run(cfg)
            assert not any(s.endswith("_close.default") for s in seen), op
        monkeypatch.setenv("GEMMA4_FUSED_CLOSE", "1")
        seen, fused = run(cfg)
        assert seen.count(f"gemma4.{op}.default") == 2 * n and sum(s.endswith("_close.default") for s in seen) == 2 * n
        assert torch.equal(fused, plain), op


def _one_shot(weight: torch.Tensor, group: int):
    from export.kernels.int4_matmul import quantize_int4
    return quantize_int4(weight, group)


def test_blockwise_quantization_equals_one_shot(monkeypatch):
    """Row blocks (the bound on temporaries, and the unit moved to a GPU) give the codes and
    scales of quantizing the whole weight at once, for linears, expert stacks and the int8
    table, blocks not dividing the rows included."""
    from export.gemma4 import quant
    from export.gemma4.quant import PackedInt4Linear, PackedInt4Stack

    monkeypatch.setattr(quant, "_rows", lambda K, work: 7)  # 7 rows per block: uneven splits
    w = _weight(50, 64, seed=3).to(torch.bfloat16)
    lin = PackedInt4Linear.from_float(w, 32)
    q, s = _one_shot(w, lin.group_size)
    assert torch.equal(lin.qweight, q) and torch.equal(lin.scales, s)

    stack_w = torch.stack([_weight(10, 64, seed=e) for e in range(3)]).to(torch.bfloat16)
    stack = PackedInt4Stack.from_float(stack_w, 32)
    for e in range(3):
        q, s = _one_shot(stack_w[e], stack.group_size)
        assert torch.equal(stack.qweight[e], q) and torch.equal(stack.scales[e], s)

    table = _weight(50, 64, seed=4)
    emb = Int8Embedding.from_float(table)
    scale = (table.abs().amax(-1) / 127).clamp_min(1e-8)
    assert torch.equal(emb.scales, scale)
    assert torch.equal(emb.weight, (table / scale[:, None]).round().clamp(-127, 127).to(torch.int8))


@pytest.mark.cuda
def test_quantizing_on_the_gpu_is_bitwise_the_hosts():
    """A CUDA export quantizes host weights block by block on the GPU: the same codes and
    scales, bit for bit, as the host arithmetic."""
    from export.gemma4.quant import PackedInt4Linear, PackedInt4Stack

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = torch.device("cuda")
    w = _weight(4096 + 13, 5376, seed=5).to(torch.bfloat16)
    a, b = PackedInt4Linear.from_float(w, 128), PackedInt4Linear.from_float(w, 128, gpu)
    assert a.qweight.device.type == "cpu" and b.qweight.device.type == "cpu"
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    s = torch.randn(4, 704, 2816, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    a, b = PackedInt4Stack.from_float(s, 128), PackedInt4Stack.from_float(s, 128, gpu)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    t = _weight(3000, 5376, seed=7).to(torch.bfloat16)
    a, b = Int8Embedding.from_float(t), Int8Embedding.from_float(t, gpu)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales)
