"""gemma4::moe_route and gemma4::moe_experts_int4: references vs the float model's Router and
Experts, the Triton kernels through the interpreter (CPU) and on CUDA, shared memory of every config."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from export.gemma4.config import Gemma4Config
from export.gemma4.model import Experts, Router
from export.kernels import int4_matmul
from export.kernels import moe_int4 as mo
from tests.helpers import RecordOps, run_code

E, H, I, TOP_K = 8, 64, 32, 2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cfg(**kw):
    base = dict(vocab_size=64, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, layer_types=("full_attention",),
                sliding_window=8, max_position_embeddings=64, hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=E, top_k_experts=TOP_K, moe_intermediate_size=I)
    return Gemma4Config(**{**base, **kw})


def _router(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = Router(_cfg())
    with torch.no_grad():
        r.proj.weight.copy_(torch.randn(E, H, generator=g) * 0.2)
        r.scale.copy_(torch.rand(H, generator=g) + 0.5)
        r.per_expert_scale.copy_(torch.rand(E, generator=g) + 0.5)
    return r


def _stacks(seed=0, group=32):
    """Quantized stacks and the float Experts module holding their dequantized weights (fp32)."""
    g = torch.Generator().manual_seed(seed)
    gu_q, gu_s = mo.quantize_experts(torch.randn(E, 2 * I, H, generator=g), group)
    d_q, d_s = mo.quantize_experts(torch.randn(E, H, I, generator=g), group)
    ex = Experts(_cfg())
    with torch.no_grad():
        ex.gate_up_proj.copy_(mo.dequantize_experts(gu_q, gu_s, torch.float32))
        ex.down_proj.copy_(mo.dequantize_experts(d_q, d_s, torch.float32))
    return (gu_q, gu_s, d_q, d_s), ex


def _route(router, x):
    return torch.ops.gemma4.moe_route(x, router.scale, router.proj.weight, router.per_expert_scale, router.top_k,
                                      router.norm.eps)


def _float_router(router, x):
    """The router's math written out (as transformers' Gemma4 router computes it)."""
    xn = router.norm(x) * router.scale * x.shape[-1] ** -0.5
    probs = torch.softmax(router.proj(xn), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, router.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return w * router.per_expert_scale[idx], idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_reference_is_the_router_math(dtype):
    """In fp32 from the inputs' values whatever their dtype (as the CUDA kernels route): a bf16
    router's logits are not rounded to bf16 first."""
    router = _router().to(dtype)
    x = torch.randn(7, H).to(dtype)
    w, idx = _route(router, x)
    w_ref, idx_ref = _float_router(copy.deepcopy(router).float(), x.float())
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == (7, TOP_K)
    assert torch.equal(idx, idx_ref) and torch.equal(w, w_ref)
    assert torch.equal(router(x)[1], idx)  # the model's Router calls the op


def test_experts_reference_matches_float_experts_decode_and_prefill():
    stacks, ex = _stacks()
    router = _router()
    x = torch.randn(9, H)
    w, idx = _route(router, x)
    y = torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks)
    assert y.shape == (9, H) and y.dtype == torch.float32
    assert _rel(y, ex(x, w, idx)) < 1e-6  # prefill: every expert, dense weights
    for n in range(3):  # decode: the top-k experts gathered
        one = torch.ops.gemma4.moe_experts_int4(x[n:n + 1], w[n:n + 1], idx[n:n + 1], *stacks)
        assert _rel(one, ex(x[n:n + 1], w[n:n + 1], idx[n:n + 1])) < 1e-6
        assert _rel(one, y[n:n + 1]) < 1e-5  # gather and dense agree


def test_experts_reference_equals_per_token_loop():
    """Independent of both reference paths: a loop over tokens and their experts."""
    stacks, ex = _stacks(seed=1)
    x = torch.randn(5, H)
    w, idx = _route(_router(1), x)
    want = torch.zeros(5, H)
    for n in range(5):
        for k in range(TOP_K):
            e = int(idx[n, k])
            gate, up = (ex.gate_up_proj[e] @ x[n]).chunk(2)
            want[n] += w[n, k] * (ex.down_proj[e] @ (torch.nn.functional.gelu(gate, approximate="tanh") * up))
    assert _rel(torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks), want) < 1e-5


def test_decode_routing_takes_the_gemv_unless_switched_off(monkeypatch):
    """The routing GEMV is the default for a decode token; GEMMA4_ROUTE_GEMV1=0 asks for the slices kernel."""
    monkeypatch.delenv(mo.ROUTE_GEMV1_ENV, raising=False)
    assert mo.route_gemv1()
    monkeypatch.setenv(mo.ROUTE_GEMV1_ENV, "0")
    assert not mo.route_gemv1()
    monkeypatch.setenv(mo.ROUTE_GEMV1_ENV, "1")
    assert mo.route_gemv1()


def test_prefill_sort_is_parallel_unless_switched_off(monkeypatch):
    """The count / scan / scatter kernels are the default counting sort (measured 40x faster than one
    program on the H200); GEMMA4_MOE_SORT_PARALLEL=0 asks for the one-program `_align_kernel`."""
    monkeypatch.delenv(mo.SORT_PARALLEL_ENV, raising=False)
    assert mo.sort_parallel()
    monkeypatch.setenv(mo.SORT_PARALLEL_ENV, "0")
    assert not mo.sort_parallel()
    monkeypatch.setenv(mo.SORT_PARALLEL_ENV, "1")
    assert mo.sort_parallel()


def test_gate_up_from_x_levels_is_off_unless_switched_on():
    """The dp4a decode gate / up (`GATE_UP_Q`) is off until timed; GEMMA4_MOE_GATE_UP_Q=1 in a process (an exporting
    one: scripts/export_ab.py --switch) turns it on."""
    code = "from export.kernels import moe_int4 as mo; print(mo.GATE_UP_Q)"
    env = {k: v for k, v in os.environ.items() if k != mo.GATE_UP_Q_ENV}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    outs = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120).stdout
            for e in (env, {**env, mo.GATE_UP_Q_ENV: "1"})]
    assert [o.strip() for o in outs] == ["False", "True"], outs


def test_fake_shapes_and_shape_check():
    from torch._subclasses.fake_tensor import FakeTensorMode
    stacks, _ = _stacks()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, H)
        w, idx = torch.ops.gemma4.moe_route(x, torch.empty(H), torch.empty(E, H), torch.empty(E), 3, 1e-6)
        assert w.shape == (4, 3) and w.dtype == torch.float32 and idx.dtype == torch.int64
        y = torch.ops.gemma4.moe_experts_int4(x, torch.empty(4, 2), torch.empty(4, 2, dtype=torch.long), *stacks)
        assert y.shape == (4, H)
    with pytest.raises(ValueError, match="do not agree"):
        bad_x = torch.zeros(2, H + 32)
        torch.ops.gemma4.moe_experts_int4(bad_x, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), *stacks)


def test_every_config_fits_consumer_shared_memory():
    for kind, pool in (("route", mo.ROUTE_CONFIGS), ("words_gate_up", mo.WORDS_GATE_UP_CONFIGS),
                       ("words_down", mo.WORDS_DOWN_CONFIGS), ("grouped_gate_up", mo.GROUPED_CONFIGS),
                       ("grouped_down", mo.GROUPED_CONFIGS)):
        for cfg in pool:
            assert mo.config_smem_bytes(cfg, kind) <= mo.SMEM_LIMIT_BYTES, (kind, cfg)
    assert all(mo.ROUTE_H_SLICE % c.kwargs["BLOCK_H"] == 0 for c in mo.ROUTE_CONFIGS)  # slices do not overlap
    for group in (32, 64, 128):  # every group size the recipe stores has configs on every path
        assert [c for c in mo.GROUPED_CONFIGS if group % c.kwargs["BLOCK_K"] == 0]


def test_cpu_backend_decomposes_the_ops_into_aten():
    from export.backends.cpu import Gemma4CpuBackend
    stacks, _ = _stacks()
    router = _router()

    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = router
            for name, t in zip(("a", "b", "c", "d"), stacks):
                self.register_buffer(name, t)

        def forward(self, x):
            w, idx = self.router(x)
            return torch.ops.gemma4.moe_experts_int4(x, w, idx, self.a, self.b, self.c, self.d)

    x = torch.randn(6, H)
    N = torch.export.Dim("N", min=1, max=16)
    ep = torch.export.export(Moe(), (x,), dynamic_shapes=({0: N},), strict=False)
    ep = ep.run_decompositions(Gemma4CpuBackend.get_decomposition_table())
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("gemma4" in t for t in targets) and any("topk" in t for t in targets)
    assert torch.allclose(ep.module()(x), Moe()(x))


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton.runtime.interpreter as ti
    _orig = ti._patch_lang_tensor
    def _patched(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _patched
    from export.kernels import int4_matmul, moe_int4 as mo
    torch.manual_seed(0)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    worst, decode, qdecode, same_ids, xtile_same = 0.0, 0.0, 0.0, True, True
    # E not a power of two, top_k 3, more entries than one counting-sort step (N * top_k > 128),
    # routing over two slices of H (the second one partial), groups of 64 and 32; fp32: the
    # interpreter's bf16 casts are wrong for negative values
    with int4_matmul.one_config():  # the switch the MoE kernels follow
        for E, H, I, K, N, g1, g2 in [(6, 320, 64, 3, 45, 64, 32), (8, 64, 32, 2, 1, 32, 32)]:
            x = torch.randn(N, H)
            scale, pw, pes = torch.rand(H) + 0.5, torch.randn(E, H) * 0.2, torch.rand(E) + 0.5
            w, idx = mo.moe_route_reference(x, scale, pw, pes, K, 1e-6)
            wk, ik = mo.launch_route(x, scale, pw, pes, K, 1e-6)
            same_ids &= torch.equal(ik, idx)
            worst = max(worst, rel(wk, w))
            for gemv1 in (False, True):  # a decode token through the slices kernel and through the GEMV's
                w1, i1 = mo.launch_route(x[:1], scale, pw, pes, K, 1e-6, gemv1=gemv1)
                same_ids &= torch.equal(i1, idx[:1])
                worst = max(worst, rel(w1, w[:1]))
            stacks = (*mo.quantize_experts(torch.randn(E, 2 * I, H), g1),
                      *mo.quantize_experts(torch.randn(E, H, I), g2))
            ref = mo.moe_experts_reference(x, w, idx, *stacks)
            worst = max(worst, rel(mo.launch_experts_grouped(x, w, idx, *stacks), ref))
            skewed = torch.arange(K).repeat(N, 1)  # every token on the same experts: several tiles each
            ref = mo.moe_experts_reference(x, w, skewed, *stacks)
            worst = max(worst, rel(mo.launch_experts_grouped(x, w, skewed, *stacks), ref))
            for slices in (1, 3):  # the word GEMVs: fp32 x meets the nibble floats' offsets (~1e-4)
                one = mo.launch_experts_decode(x[:1], w[:1], idx[:1], *stacks, slices=slices)
                decode = max(decode, rel(one, mo.moe_experts_reference(x[:1], w[:1], idx[:1], *stacks)))
                default, mo.DOWN_XTILE = mo.DOWN_XTILE, 1 - mo.DOWN_XTILE  # act loaded as one row or as the
                try:  # weight tile's rows: the same sums
                    xtile_same &= torch.equal(
                        mo.launch_experts_decode(x[:1], w[:1], idx[:1], *stacks, slices=slices), one)
                finally:
                    mo.DOWN_XTILE = default
                mo.GATE_UP_Q = not mo.GATE_UP_Q  # gate / up from x's int8 levels (dp4a) or from x itself
                try:
                    other = mo.launch_experts_decode(x[:1], w[:1], idx[:1], *stacks, slices=slices)
                finally:
                    mo.GATE_UP_Q = not mo.GATE_UP_Q
                qdecode = max(qdecode, rel(other, mo.moe_experts_reference(x[:1], w[:1], idx[:1], *stacks)))
                nw = torch.rand(H) + 0.5  # the experts' input norm in x's quantize kernel (GATE_UP_Q only)
                saved, mo.GATE_UP_Q = mo.GATE_UP_Q, True
                try:
                    normed = mo.launch_experts_decode(x[:1], w[:1], idx[:1], *stacks, slices=slices, norm=(nw, 1e-6))
                finally:
                    mo.GATE_UP_Q = saved
                qdecode = max(qdecode, rel(normed, mo.moe_rms_experts_reference(x[:1], nw, 1e-6, w[:1], idx[:1],
                                                                                *stacks)))
    sorts_ok = True  # the prefill's counting sort, one program and many, against torch's stable argsort
    for N, K, E in [(45, 3, 6), (700, 8, 128), (1, 8, 128), (300, 8, 5)]:  # 700 * 8: several scan steps
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)]) if E >= K else torch.randint(0, E, (N, K))
        flat = idx.flatten()
        want = torch.argsort(flat, stable=True).to(torch.int32)
        want_off = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=E).cumsum(0)]).to(torch.int32)
        for parallel in (False, True):
            srt, off = torch.full((N * K,), -7, dtype=torch.int32), torch.full((E + 1,), -7, dtype=torch.int32)
            mo.sort_entries(idx, srt, off, E, parallel=parallel)
            sorts_ok &= torch.equal(srt, want) and torch.equal(off, want_off)
    print("sorts_ok", sorts_ok, "same_ids", same_ids, "xtile_same", xtile_same, "qdecode", qdecode, "decode", decode,
          "worst", worst)
""")


def test_triton_kernels_through_the_interpreter():
    """Routing, the decode GEMVs (the down kernel's act both ways, gate / up from bf16 x or x's int8 levels) and
    the prefill sort (both ways) + grouped GEMMs at toy sizes, ~10 s."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "same_ids True" in r.stdout and "sorts_ok True" in r.stdout and "xtile_same True" in r.stdout, r.stdout
    assert float(r.stdout.split("worst")[-1]) < 1e-5
    assert float(r.stdout.split(" decode")[-1].split()[0]) < 1e-3
    assert float(r.stdout.split("qdecode")[-1].split()[0]) < 1e-3  # the other gate / up (`GATE_UP_Q`)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 7, 128])
@pytest.mark.parametrize("e,h,i,k,group", [(128, 2816, 704, 8, 128), (8, 64, 32, 2, 32)])
def test_cuda_kernels_match_reference(monkeypatch, n, e, h, i, k, group):
    from export.kernels.int4_matmul import group_size_for
    torch.manual_seed(n)
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    scale = (torch.rand(h, device="cuda") + 0.5).bfloat16()
    pw = (torch.randn(e, h, device="cuda") * 0.05).bfloat16()
    pes = (torch.rand(e, device="cuda") + 0.5).bfloat16()
    stacks = (*mo.quantize_experts(torch.randn(e, 2 * i, h, device="cuda") * 0.05, group_size_for(h, group)),
              *mo.quantize_experts(torch.randn(e, h, i, device="cuda") * 0.05, group_size_for(i, group)))
    torch.full((1 << 24,), float("nan"), device="cuda")  # poison the allocator's free blocks
    w_ref, idx_ref = mo.moe_route_reference(x.float(), scale.float(), pw.float(), pes.float(), k, 1e-6)
    for gemv1 in ("0", "1"):  # a decode token's logits through the slices kernel or the GEMV's
        monkeypatch.setenv(mo.ROUTE_GEMV1_ENV, gemv1)
        w, idx = torch.ops.gemma4.moe_route(x, scale, pw, pes, k, 1e-6)
        # fp32 routing in the kernel vs the fp32 reference: the same experts but for near ties
        assert (idx == idx_ref).float().mean() > 0.98 and _rel(w[idx == idx_ref], w_ref[idx == idx_ref]) < 1e-3
    want = mo.moe_experts_reference(x.float(), w, idx, *stacks)  # fp32 with the dequantized weights
    nw = (torch.rand(h, device="cuda") + 0.5).bfloat16()
    want_n = mo.moe_rms_experts_reference(x.float(), nw.float(), 1e-6, w, idx, *stacks)
    for q in (False, True):  # decode's gate / up from bf16 x or from x's int8 levels (`GATE_UP_Q`)
        monkeypatch.setattr(mo, "GATE_UP_Q", q)
        y = torch.ops.gemma4.moe_experts_int4(x, w, idx, *stacks)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert _rel(y, want) <= 1e-2
        y = torch.ops.gemma4.moe_rms_experts_int4(x, nw, 1e-6, w, idx, *stacks)  # the norm in the op
        assert y.dtype == torch.bfloat16 and _rel(y, want_n) <= 1e-2


# ---- the recipe: Experts -> PackedInt4Experts ----------------------------------------------


def _tiny_moe(dtype=torch.float32):
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model
    from tests.helpers import randomize_
    return randomize_(Gemma4Model(PRESETS["tiny-moe"], ctx=32, prefill_chunk=4), seed=0).eval().to(dtype)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_quantize_turns_experts_into_int4_stacks_unit_by_unit(target):
    """Both targets: every layer's Experts becomes PackedInt4Experts when its unit is quantized
    (the streaming loader's `under`), holding the int4 layout of the float stacks."""
    from export.backends import TargetDevice
    from export.gemma4.quant import PackedInt4Experts, QuantRecipe, QuantReport, quantize_
    dtype = torch.bfloat16 if target == "cuda" else torch.float32
    model, ref = _tiny_moe(dtype), _tiny_moe(dtype)
    report = QuantReport()
    quantize_(model, QuantRecipe(group_size=32), TargetDevice(target), under="layers.0", report=report)
    assert isinstance(model.layers[0].experts, PackedInt4Experts)
    assert not isinstance(model.layers[1].experts, PackedInt4Experts)  # not yet in scope
    for i in range(1, len(model.layers)):
        quantize_(model, QuantRecipe(group_size=32), TargetDevice(target), under=f"layers.{i}", report=report)
    assert {f"layers.{i}.experts" for i in range(len(model.layers))} <= set(report.int4)
    assert not any("experts" in f for f in report.skipped)
    ex = model.layers[1].experts
    assert ex.gate_up_proj.qweight.shape == (8, 64, 32) and ex.down_proj.qweight.shape == (8, 64, 16)
    assert ex.gate_up_proj.scales.dtype == torch.bfloat16
    w = ref.layers[1].experts.down_proj.float()
    assert _rel(ex.down_proj.dequantize(torch.float32), w) < 0.15  # int4 g32 on normal weights: ~0.1
    assert {k for k in model.state_dict() if ".experts." in k} == {
        f"layers.{i}.experts.{p}.{b}" for i in range(len(model.layers))
        for p in ("gate_up_proj", "down_proj") for b in ("qweight", "scales")}
    tok = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # on CPU tensors the ops run their references (exactness: the next test)
        assert torch.isfinite(model(tok, torch.tensor([0]))).all()


def test_quantized_layer_matches_float_layer_with_dequantized_experts():
    """The MoE block through the int4 op equals the float block given the dequantized stacks."""
    from export.backends import TargetDevice
    from export.gemma4.quant import QuantRecipe, quantize_
    model, ref = _tiny_moe(), _tiny_moe()
    quantize_(model, QuantRecipe(group_size=32, linears=()), TargetDevice.CPU)  # experts only
    with torch.no_grad():
        for q, f in zip(model.layers, ref.layers):
            f.experts.gate_up_proj.copy_(q.experts.gate_up_proj.dequantize(torch.float32))
            f.experts.down_proj.copy_(q.experts.down_proj.dequantize(torch.float32))
        tok = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(1))
        assert _rel(model(tok, torch.tensor([0])), ref(tok, torch.tensor([0]))) < 1e-5  # prefill
        assert _rel(model(tok[:, :1], torch.tensor([4])), ref(tok[:, :1], torch.tensor([4]))) < 1e-5  # decode


def test_packed_experts_take_their_input_norm_in_the_op(monkeypatch):
    """A MoE layer hands its packed experts x and their input norm (gemma4::moe_rms_experts_int4): on CPU the op's
    reference, so the logits are exactly those of the norm's module then gemma4::moe_experts_int4, with the
    fused-norms switch off too; a wrong norm width is refused."""
    from export.backends import TargetDevice
    from export.gemma4.quant import QuantRecipe, quantize_

    model = _tiny_moe(torch.bfloat16)
    quantize_(model, QuantRecipe(group_size=32, linears=()), TargetDevice.CPU)
    with torch.no_grad():
        for layer in model.layers:  # a norm that is not all ones
            layer.pre_feedforward_layernorm_2.weight.uniform_(0.5, 1.5)
    tok = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(2))

    def run(seen):
        model.reset_cache()
        with torch.no_grad(), RecordOps(seen):
            return model(tok, torch.tensor([0])).float(), model(tok[:, :1], torch.tensor([4])).float()

    seen = []
    fused = run(seen)
    assert seen.count("gemma4.moe_rms_experts_int4.default") == 2 * len(model.layers)
    assert "gemma4.moe_experts_int4.default" not in seen
    monkeypatch.setenv("GEMMA4_FUSED_NORMS", "0")
    seen = []
    switched = run(seen)
    assert "gemma4.moe_rms_experts_int4.default" not in seen and all(map(torch.equal, switched, fused))
    monkeypatch.delenv("GEMMA4_FUSED_NORMS")
    for layer in model.layers:
        object.__setattr__(layer.experts, "forward_rms", None)
    seen = []
    plain = run(seen)
    assert seen.count("gemma4.moe_experts_int4.default") == 2 * len(model.layers)
    assert all(map(torch.equal, plain, fused))
    stacks, _ = _stacks()
    with pytest.raises(ValueError, match="norm weight"):
        torch.ops.gemma4.moe_rms_experts_int4(torch.zeros(1, H), torch.ones(H - 32), 1e-6, torch.zeros(1, 2),
                                              torch.zeros(1, 2, dtype=torch.long), *stacks)


@pytest.mark.parametrize("group", [32, 128])
def test_planner_expert_bytes_equal_the_module_bytes(group):
    """26B-A4B: the planner's int4 expert stacks are the bytes PackedInt4Experts stores."""
    from export.gemma4.config import PRESETS
    from export.gemma4.quant import PackedInt4Stack
    from export.gemma4.inventory import inventory
    from export.gemma4.quant import QuantRecipe
    cfg = PRESETS["26b-a4b"]
    E, Hd, Id, L = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_hidden_layers
    weights, _ = inventory(cfg, "bfloat16", QuantRecipe(group_size=group), None)
    planned = sum(t.nbytes for t in weights if ".experts." in t.fqn)
    with torch.device("meta"):
        stacks = (PackedInt4Stack(E, Hd, 2 * Id, group), PackedInt4Stack(E, Id, Hd, group))
    real = L * sum(s.qweight.nbytes + s.scales.nbytes for s in stacks)
    assert planned == real
    assert real == L * (mo.experts_int4_bytes(E, 2 * Id, Hd, stacks[0].group_size)
                        + mo.experts_int4_bytes(E, Hd, Id, stacks[1].group_size))
    if group == 128:
        assert stacks[1].group_size == 64  # I = 704 = 11 x 64
        assert 11.0 * 2**30 < real < 11.2 * 2**30  # the 26B's experts: 11.08 GiB in int4 g128


def test_bench_moe_runs_on_cpu(tmp_path):
    """scripts/bench_moe.py at toy size on the CPU: the table's rows and the JSON keys."""
    import json

    from scripts.bench_moe import main
    out = tmp_path / "moe.json"
    assert main(["--device", "cpu", "--preset", "tiny-moe", "--ms", "1,4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["copy_gbps"] > 0 and {r["op"] for r in doc["rows"]} >= {"route", "experts_int4", "moe_int4"}
    for r in doc["rows"]:
        assert r["us"] > 0 and r["bytes"] > 0 and 0 < r["fraction_of_copy_bw"] and r["m"] in (1, 4)
    decode = next(r for r in doc["rows"] if r["op"] == "experts_int4" and r["m"] == 1)
    assert decode["active_experts"] == 2 and decode["rel_err"] < 1e-5


@pytest.mark.cuda
def test_cuda_aoti_compiles_the_moe_kernels_into_the_so(tmp_path):
    """AOTInductor builds the routing and expert kernels into the .so (no fallback op): decode
    (N == 1, the GEMVs) and a dynamic prefill chunk (the sort + grouped GEMMs)."""
    from export.kernels.int4_matmul import group_size_for
    from runtime.aoti import promote_libtorch
    e, h, i, k = 16, 512, 128, 4
    torch.manual_seed(0)

    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", (torch.rand(h, device="cuda") + 0.5).bfloat16())
            self.register_buffer("proj", (torch.randn(e, h, device="cuda") * 0.05).bfloat16())
            self.register_buffer("pes", (torch.rand(e, device="cuda") + 0.5).bfloat16())
            stacks = (*mo.quantize_experts(torch.randn(e, 2 * i, h, device="cuda") * 0.05, group_size_for(h, 128)),
                      *mo.quantize_experts(torch.randn(e, h, i, device="cuda") * 0.05, group_size_for(i, 128)))
            for name, t in zip(("a", "b", "c", "d"), stacks):
                self.register_buffer(name, t)

        def forward(self, x):
            w, idx = torch.ops.gemma4.moe_route(x, self.scale, self.proj, self.pes, k, 1e-6)
            return torch.ops.gemma4.moe_experts_int4(x, w, idx, self.a, self.b, self.c, self.d)

    mod = Moe()
    N = torch.export.Dim("N", min=1, max=256)
    for n, shapes in ((1, None), (64, ({0: N},))):
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        ep = torch.export.export(mod, (x,), dynamic_shapes=shapes)
        with int4_matmul.one_config():  # the switch the MoE kernels follow
            so = torch._inductor.aot_compile(ep.module(), (x,),
                                             options={"aot_inductor.output_path": str(tmp_path / f"m{n}.so")})
        promote_libtorch("cuda")
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda:0")
        for rows in ((1,) if shapes is None else (1, 37, 200)):
            x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
            (y,) = runner.run([x])
            w, idx = torch.ops.gemma4.moe_route(x, mod.scale, mod.proj, mod.pes, k, 1e-6)
            want = mo.moe_experts_reference(x.float(), w, idx, mod.a, mod.b, mod.c, mod.d)
            assert _rel(y, want) <= 1e-2, rows


_MUTATION_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget

    class Sm90:  # TTIR needs a target, not a GPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors
    from export.kernels import moe_int4 as mo
    E, H, I, K, N = 128, 2816, 704, 8, 16
    bf, z = torch.bfloat16, torch.zeros
    x, idx, w = z(N, H, dtype=bf), z(N, K, dtype=torch.int64), z(N, K)
    guq, gus = z(E, 2 * I, H // 2, dtype=torch.uint8), z(E, 2 * I, H // 128, dtype=bf)
    dq, ds = z(E, H, I // 2, dtype=torch.uint8), z(E, H, I // 64, dtype=bf)
    i32 = lambda n: z(n, dtype=torch.int32)
    strides = dict(stride_qe=1, stride_qn=1, stride_se=1, stride_sn=1)
    grouped = dict(sorted_ptr=i32(N * K), row_off_ptr=i32(E + 1), w_ptr=w, E=E, TOP_K=K, FP32=False, E_P2=128,
                   NK_BUCKET=128, **strides)
    # the down kernel's close off, its pointers as the op passes them
    no_close = dict(CLOSE=0, ccnt_ptr=idx, ym_ptr=x, ch_ptr=x, w1_ptr=x, w2_ptr=x, wc_ptr=x, cs_ptr=x, co_ptr=x,
                    ceps=0.0, CSTEPS=0)
    cases = {
        "route": (mo._autotuned("route"), dict(x_ptr=x, scale_ptr=z(H, dtype=bf), w_ptr=z(E, H, dtype=bf),
                  part_ptr=z(11, N, E), ss_ptr=z(11, N), N=N, H=H, E=E, H_SLICE=256, stride_xn=H, stride_wn=H, PDL=2)),
        "topk": (mo._route_topk_kernel, dict(part_ptr=z(11, N, E), ss_ptr=z(11, N), pes_ptr=z(E, dtype=bf),
                 w_out_ptr=w, idx_out_ptr=idx, N=N, E=E, SPLITS=11, eps=1e-6, inv_h=1 / H, inv_sqrt_h=0.02,
                 TOP_K=K, BLOCK_E=128, K_P2=8, PDL=2)),
        "gemv_gate_up": (mo._autotuned("words_gate_up", 128), dict(x_ptr=x, idx_ptr=idx, q_ptr=guq, s_ptr=gus,
                         act_ptr=z(K, 800), I=I, ACT_STRIDE=800, NGROUPS=H // 128, GROUP=128, DOWN_GROUP=64,
                         X_BF16=True, ASM=True, PDL=2, zc_ptr=idx, ZC=0, **strides)),
        "gemv_gate_up_zc": (mo._autotuned("words_gate_up", 128), dict(x_ptr=x, idx_ptr=idx, q_ptr=guq, s_ptr=gus,
                            act_ptr=z(K, 800), I=I, ACT_STRIDE=800, NGROUPS=H // 128, GROUP=128, DOWN_GROUP=64,
                            X_BF16=True, ASM=True, PDL=2, zc_ptr=i32(1), ZC=1, **strides)),
        "gemv_down": (mo._autotuned("words_down", 64), dict(act_ptr=z(K, 800), w_ptr=w, idx_ptr=idx, q_ptr=dq, s_ptr=ds,
                      out_ptr=z(2, H), N_OUT=H, ACT_STRIDE=800, C_PER_SPLIT=44, TOP_K=K, NGROUPS=I // 64,
                      GROUP=64, ASM=True, stride_os=H, PDL=2, XTILE=0, **no_close, **strides)),
        "gemv_down_xt": (mo._autotuned("words_down", 64), dict(act_ptr=z(K, 800), w_ptr=w, idx_ptr=idx, q_ptr=dq,
                         s_ptr=ds, out_ptr=z(2, H), N_OUT=H, ACT_STRIDE=800, C_PER_SPLIT=44, TOP_K=K,
                         NGROUPS=I // 64, GROUP=64, ASM=True, stride_os=H, PDL=2, XTILE=1, **no_close, **strides)),
        "gemv_down_close": (mo._autotuned("words_down", 64), dict(act_ptr=z(K, 800), w_ptr=w, idx_ptr=idx, q_ptr=dq,
                            s_ptr=ds, out_ptr=z(1, H, dtype=bf), N_OUT=H, ACT_STRIDE=800, C_PER_SPLIT=88, TOP_K=K,
                            NGROUPS=I // 64, GROUP=64, ASM=True, stride_os=H, PDL=2, XTILE=1, CLOSE=1,
                            ccnt_ptr=i32(1), ym_ptr=z(H, dtype=bf), ch_ptr=z(H, dtype=bf), w1_ptr=z(H, dtype=bf),
                            w2_ptr=z(H, dtype=bf), wc_ptr=z(H, dtype=bf), cs_ptr=z(1, dtype=bf),
                            co_ptr=z(H, dtype=bf), ceps=1e-6, CSTEPS=3, **strides)),
        "gemv_gate_up_q": (mo._gemv_q_gate_up_kernel, dict(xq_ptr=i32(4 * 48), xf_ptr=z(22), xc_ptr=i32(22),
                           idx_ptr=idx, q_ptr=guq, s_ptr=gus, act_ptr=z(K, 800), I=I, KW=H // 8, ACT_STRIDE=800,
                           GROUP=128, DOWN_GROUP=64, BLOCK_N=16, GROUPS=2, ASM=True, PDL=2, **strides)),
        "sum_slices": (mo._sum_slices_kernel, dict(part_ptr=z(2, H), out_ptr=x, N=H, SLICES=2, BLOCK=1024, PDL=2)),
        "align": (mo._align_kernel, dict(idx_ptr=idx, sorted_ptr=i32(N * K), row_off_ptr=i32(E + 1), NK=N * K, E=E,
                  BLOCK=128, E_P2=128)),
        "sort_count": (mo._sort_count_kernel, dict(idx_ptr=idx, counts_ptr=i32(4 * 128), NK=N * K, BLOCK=64,
                       E_P2=128)),
        "sort_scan": (mo._sort_scan_kernel, dict(counts_ptr=i32(4 * 128), base_ptr=i32(4 * 128),
                      row_off_ptr=i32(E + 1), NB=4, E=E, ROWS=32, E_P2=128)),
        "sort_scatter": (mo._sort_scatter_kernel, dict(idx_ptr=idx, base_ptr=i32(4 * 128), row_off_ptr=i32(E + 1),
                         sorted_ptr=i32(N * K), NK=N * K, E=E, BLOCK=64, E_P2=128)),
        "grouped_gate_up": (mo._autotuned("grouped_gate_up", 128), dict(a_ptr=x, q_ptr=guq, s_ptr=gus,
                            out_ptr=z(N * K, I, dtype=bf), N_OUT=I, K=H, stride_am=H, stride_om=I, GATE_UP=True,
                            GROUP=128, **grouped)),
        "grouped_down": (mo._autotuned("grouped_down", 64), dict(a_ptr=z(N * K, I, dtype=bf), q_ptr=dq, s_ptr=ds,
                         out_ptr=z(N * K, H), N_OUT=H, K=I, stride_am=I, stride_om=H, GATE_UP=False, GROUP=64,
                         **grouped)),
    }
    for name, (kernel, kwargs) in cases.items():
        print(name, sorted(identify_mutated_tensors(kernel, kwargs, {})))
""")


def test_inductor_sees_only_the_outputs_written():
    """Inductor's mutation analysis of each kernel's TTIR (built for sm_90, no GPU needed) finds
    only its outputs: had it failed, AOTInductor would assume every input written and copy the
    expert stacks on every call. The decode kernels as the ops launch them on sm_90+, with the
    grid wait (PDL 2)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _MUTATION_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert got == {"route": "['part_ptr', 'ss_ptr']", "topk": "['idx_out_ptr', 'w_out_ptr']", "gemv_gate_up": "['act_ptr']",
                   "gemv_gate_up_zc": "['act_ptr', 'zc_ptr']", "gemv_down_close": "['ccnt_ptr', 'co_ptr', 'out_ptr']",
                   "gemv_gate_up_q": "['act_ptr']", "gemv_down": "['out_ptr']", "gemv_down_xt": "['out_ptr']",
                   "sum_slices": "['out_ptr']", "align": "['row_off_ptr', 'sorted_ptr']",
                   "sort_count": "['counts_ptr']", "sort_scan": "['base_ptr', 'row_off_ptr']",
                   "sort_scatter": "['sorted_ptr']",
                   "grouped_gate_up": "['out_ptr']", "grouped_down": "['out_ptr']"}, r.stdout + r.stderr[-2000:]


_COMPILE_SCRIPT = textwrap.dedent(r"""
import sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from export.kernels import moe_int4 as mo
C = "constexpr"
def sig(**kw): return kw
route_t = sig(x_ptr="*bf16", scale_ptr="*bf16", w_ptr="*bf16", part_ptr="*fp32", ss_ptr="*fp32", N="i32", H="i32",
              E="i32", H_SLICE="i32", stride_xn="i32", stride_wn="i32", BLOCK_T=C, BLOCK_E=C, BLOCK_H=C, PDL=C)
topk_t = sig(part_ptr="*fp32", ss_ptr="*fp32", pes_ptr="*bf16", w_out_ptr="*fp32", idx_out_ptr="*i64", N="i32",
             E="i32", SPLITS="i32", eps="fp32", inv_h="fp32", inv_sqrt_h="fp32", TOP_K=C, BLOCK_E=C, K_P2=C, PDL=C)
strides = dict(stride_qe="i32", stride_qn="i32", stride_se="i32", stride_sn="i32")
gu_t = sig(x_ptr="*bf16", idx_ptr="*i64", q_ptr="*u8", s_ptr="*bf16", act_ptr="*fp32", I="i32", ACT_STRIDE="i32",
           **strides,
           NGROUPS=C, GROUP=C, DOWN_GROUP=C, X_BF16=C, BLOCK_N=C, GROUPS=C, ASM=C, PDL=C)
dn_t = sig(act_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64", q_ptr="*u8", s_ptr="*bf16", out_ptr="*bf16", N_OUT="i32",
           ACT_STRIDE="i32", C_PER_SPLIT="i32", **strides, stride_os="i32", TOP_K=C, NGROUPS=C, GROUP=C, BLOCK_N=C,
           GROUPS=C, ASM=C, PDL=C)
gq_t = sig(xq_ptr="*i32", xf_ptr="*fp32", xc_ptr="*i32", idx_ptr="*i64", q_ptr="*u8", s_ptr="*bf16", act_ptr="*fp32",
           I="i32", KW="i32", ACT_STRIDE="i32", **strides, GROUP=C, DOWN_GROUP=C, BLOCK_N=C, GROUPS=C, ASM=C, PDL=C)
sum_t = sig(part_ptr="*fp32", out_ptr="*bf16", N="i32", SLICES=C, BLOCK=C, PDL=C)
al_t = sig(idx_ptr="*i64", sorted_ptr="*i32", row_off_ptr="*i32", NK="i32", E="i32", BLOCK=C, E_P2=C)
gr_t = lambda out: sig(a_ptr="*bf16", sorted_ptr="*i32", row_off_ptr="*i32", q_ptr="*u8",
                       s_ptr="*bf16", w_ptr="*fp32", out_ptr=out, N_OUT="i32", K="i32", E="i32", stride_am="i32",
                       **strides, stride_om="i32", NK_BUCKET="i32",
                       GATE_UP=C, TOP_K=C, FP32=C, GROUP=C, E_P2=C, TILE=C, BLOCK_N=C, BLOCK_K=C, JOIN=C)
one = lambda pool, g=0: [c for c in pool if not g or g % c.kwargs.get("BLOCK_K", 1) == 0][0]  # what the op runs
grouped = dict(TOP_K=8, FP32=False, E_P2=128)
gemv1_t = sig(x_ptr="*bf16", scale_ptr="*bf16", w_ptr="*bf16", part_ptr="*fp32", ss_ptr="*fp32", H="i32", E="i32",
              stride_wn="i32", BLOCK_E=C, BLOCK_H=C, STEPS=C, PDL=C)
cases = [
    (mo._route_logits_kernel, route_t, {}, one(mo.ROUTE_CONFIGS)),
    (mo._route_gemv1_kernel, gemv1_t, dict(BLOCK_E=mo.ROUTE_GEMV1_BLOCK_E, BLOCK_H=mo.ROUTE_GEMV1_BLOCK_H,
                                           STEPS=triton.cdiv(2816, mo.ROUTE_GEMV1_BLOCK_H)), None),
    (mo._route_topk_kernel, topk_t, dict(TOP_K=8, BLOCK_E=128, K_P2=8), None),
    (mo._gemv_words_gate_up_kernel, gu_t, dict(NGROUPS=22, GROUP=128, DOWN_GROUP=64, X_BF16=True, ASM=True),
     one(mo.WORDS_GATE_UP_CONFIGS)),
    (mo._gemv_words_down_kernel, dn_t, dict(TOP_K=8, NGROUPS=11, GROUP=64, ASM=True), one(mo.WORDS_DOWN_CONFIGS)),
    (mo._gemv_q_gate_up_kernel, gq_t, dict(GROUP=128, DOWN_GROUP=64, ASM=True, BLOCK_N=mo.GATE_UP_Q_CONFIG[0],
                                          GROUPS=mo.GATE_UP_Q_CONFIG[1]), None),
    (mo._sum_slices_kernel, sum_t, dict(SLICES=2, BLOCK=1024), None),
    (mo._align_kernel, al_t, dict(BLOCK=mo.ALIGN_BLOCK, E_P2=128), None),
    (mo._sort_count_kernel, sig(idx_ptr="*i64", counts_ptr="*i32", NK="i32", BLOCK=C, E_P2=C),
     dict(BLOCK=mo.SORT_BLOCK, E_P2=128), None),
    (mo._sort_scan_kernel, sig(counts_ptr="*i32", base_ptr="*i32", row_off_ptr="*i32", NB="i32", E="i32", ROWS=C,
                               E_P2=C), dict(ROWS=mo.SORT_SCAN_ROWS, E_P2=128), None),
    (mo._sort_scatter_kernel, sig(idx_ptr="*i64", base_ptr="*i32", row_off_ptr="*i32", sorted_ptr="*i32", NK="i32",
                                  E="i32", BLOCK=C, E_P2=C), dict(BLOCK=mo.SORT_BLOCK, E_P2=128), None),
    (mo._grouped_kernel, gr_t("*bf16"), dict(GATE_UP=True, GROUP=128, **grouped), one(mo.GROUPED_CONFIGS, 128)),
    (mo._grouped_kernel, gr_t("*fp32"), dict(GATE_UP=False, GROUP=64, **grouped), one(mo.GROUPED_CONFIGS, 64)),
]
for arch in map(int, sys.argv[1:]):
    for fn, types, consts, cfg in cases:
        c = {**consts, **(cfg.kwargs if cfg else {})}
        if "PDL" in types:  # the grid wait where the ops compile it (sm_90+: the RTX 5090, not the 4090)
            c["PDL"] = 2 if arch >= 90 else 0
        opts = {"num_warps": cfg.num_warps if cfg else 4, "num_stages": cfg.num_stages if cfg else 3}
        k = triton.compile(ASTSource(fn, types, constexprs=c), target=GPUTarget("cuda", arch, 32), options=opts)
        print(arch, fn.__name__, k.metadata.shared)
""")


def test_kernels_compile_for_consumer_cards_within_shared_memory():
    """Each kernel (one config, the 26B-A4B's shapes) compiled by Triton + ptxas for sm_89 and
    sm_120 with no GPU present: the real compiler accepts it (the interpreter is laxer) and the
    shared memory it reports fits the consumer cards."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, "89", "120"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(lines) == 26 and {a for a, _, _ in lines} == {"89", "120"}, r.stdout
    assert all(int(shared) <= mo.SMEM_LIMIT_BYTES for _, _, shared in lines), r.stdout



@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
def test_down_act_in_the_weight_tiles_layout_takes_no_shared_memory_trips():
    """The decode down kernel compiled for sm_90 offline (the 26B-A4B's shapes and first config): with act loaded as
    one row of the tile, every nibble product of a step is converted to act's layout through shared memory (barriers
    in the main loop); with DOWN_XTILE's tile of equal rows none is (the step's [rows, groups, 1] factor still is:
    two barriers), and act's loads are 16 bytes wide."""
    from scripts.gemv1_tile_variants import _compile_sm90, _sass_loop

    sig = {"act_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16",
           "out_ptr": "*bf16", "N_OUT": "i32", "ACT_STRIDE": "i32", "C_PER_SPLIT": "i32", "stride_qe": "i32", "stride_qn": "i32",
           "stride_se": "i32", "stride_sn": "i32", "stride_os": "i32"}
    c = mo.WORDS_DOWN_CONFIGS[0]
    # ints as the launch specializes them: 2816 rows, act rows of decode_act_stride(704) = 800, whole-expert strides
    aligned = ["act_ptr", "w_ptr", "idx_ptr", "q_ptr", "s_ptr", "out_ptr", "N_OUT", "ACT_STRIDE", "stride_qe",
               "stride_se", "stride_os"]
    loops = {}
    for xtile in (0, 1):
        const = dict(TOP_K=8, NGROUPS=11, GROUP=64, BLOCK_N=c.kwargs["BLOCK_N"], GROUPS=c.kwargs["GROUPS"],
                     DEPTH=c.kwargs["DEPTH"], ASM=True, PDL=0, XTILE=xtile)
        k = _compile_sm90(mo._gemv_words_down_kernel, sig, const, c.num_warps, aligned)
        loops[xtile] = _sass_loop(k.asm["cubin"])[0]
    bars = {x: sum(n for op, n in loops[x].items() if op.startswith("BAR")) for x in (0, 1)}
    assert bars[0] >= 8 and loops[0].get("STS.128", 0) >= 8, loops[0]
    assert bars[1] <= 2 and loops[1].get("STS.128", 0) == 0, loops[1]
    assert loops[1].get("LDG.E.128", 0) >= 9, loops[1]  # the weight tile and act's nine runs, 16 bytes a load


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
def test_gate_up_from_x_levels_takes_half_the_instructions_a_word():
    """The decode gate / up compiled for sm_90 offline (the 26B-A4B's shapes): the words kernel (bf16 x, a lop3 and an
    FMA a nibble) runs ~38 SASS instructions a word of 8 nibbles in its loop; from x's int8 levels
    (`GATE_UP_Q`, the int4 op's per-lane dp4a loop) under 21, with no barrier in the loop."""
    from scripts.gemv1_tile_variants import _compile_sm90, _sass_loop

    common = {"idx_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*bf16", "act_ptr": "*fp32", "I": "i32"}
    strides = {"ACT_STRIDE": "i32", "stride_qe": "i32", "stride_qn": "i32", "stride_se": "i32", "stride_sn": "i32"}
    aligned = ["idx_ptr", "q_ptr", "s_ptr", "act_ptr", "I", *strides]
    c = mo.WORDS_GATE_UP_CONFIGS[0]
    k = _compile_sm90(mo._gemv_words_gate_up_kernel, {"x_ptr": "*bf16", **common, **strides},
                      dict(NGROUPS=22, GROUP=128, DOWN_GROUP=64, X_BF16=True, ASM=True, PDL=0, **c.kwargs),
                      c.num_warps, ["x_ptr", *aligned])
    loop = _sass_loop(k.asm["cubin"])[0]
    words = sum(loop.values()) * c.num_warps * 32 / (2 * c.kwargs["BLOCK_N"] * c.kwargs["GROUPS"] * 16)
    bn, gr, warps = mo.GATE_UP_Q_CONFIG
    k = _compile_sm90(mo._gemv_q_gate_up_kernel,
                      {"xq_ptr": "*i32", "xf_ptr": "*fp32", "xc_ptr": "*i32", **common, "KW": "i32", **strides},
                      dict(GROUP=128, DOWN_GROUP=64, BLOCK_N=bn, GROUPS=gr, ASM=True, PDL=0), warps,
                      ["xq_ptr", "xf_ptr", "xc_ptr", "KW", *aligned])
    loop_q = _sass_loop(k.asm["cubin"])[0]
    words_q = sum(loop_q.values()) * warps * 32 / (2 * bn * gr * 16)
    assert words > 30 and words_q < 21, (words, words_q)
    assert not any(op.startswith("BAR") for op in loop_q), loop_q


_CLOSE_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul, moe_int4 as mo
    torch.manual_seed(0)
    # fp32 (the interpreter's bf16 casts truncate): the experts' down kernel's close against moe_close_reference
    # on the kernel's own y, the gate / up launch zeroing the counter (words kernel, and x's quantize kernel)
    with int4_matmul.one_config():
        for E, H, I, K, g1, g2 in [(6, 320, 64, 3, 64, 32), (8, 1152, 32, 2, 32, 32)]:
            stacks = (*mo.quantize_experts(torch.randn(E, 2 * I, H), g1),
                      *mo.quantize_experts(torch.randn(E, H, I), g2))
            x, ym = torch.randn(1, H) * 3, torch.randn(1, H) * 5
            scale, pw, pes = torch.rand(H) + 0.5, torch.randn(E, H) * 0.2, torch.rand(E) + 0.5
            w, idx = mo.moe_route_reference(x, scale, pw, pes, K, 1e-6)
            nw, w1, w2, wc = (torch.rand(H) + 0.5 for _ in range(4))
            s = torch.rand(1) + 0.5
            for q in (False, True):
                cnt = torch.full((1,), 7, dtype=torch.int32)
                down_group = I // stacks[3].shape[2]
                if q:
                    act = mo.launch_decode_gate_up_q(x, idx, stacks[0], stacks[1], down_group, norm=(nw, 1e-6),
                                                     zero=cnt)
                else:
                    act = mo.launch_decode_gate_up(int4_matmul.rms_norm_reference(x, nw, 1e-6), idx, stacks[0],
                                                   stacks[1], down_group, zero=cnt)
                zeroed = int(cnt[0])
                out = torch.full_like(x, float("nan"))
                y = mo.launch_decode_down(act, w, idx, stacks[2], stacks[3], x.dtype, slices=1,
                                          close=(cnt, ym, x, w1, w2, wc, s, 1e-6, out))
                want = mo.moe_close_reference(x, y, ym, w1, w2, wc, 1e-6, s)
                err = ((out - want).abs().max() / want.abs().max()).item()  # elements near 0 have no own scale
                print("close", H, q, zeroed, int(cnt[0]), err)
""")


def test_experts_down_kernel_writes_the_closing_add_in_the_interpreter():
    """The experts' down kernel with CLOSE writes, from its last program, the MoE layer's closing add over the row
    (written over NaNs) as `moe_close_reference` computes it from the kernel's own y (fp32: to an ulp of the norms'
    factors, measured against the row's largest element); the gate / up launch (the words kernel's ZC, or x's quantize kernel with GATE_UP_Q) zeroes the counter
    (set to 7), which the close leaves at 0; widths of one and two norm steps (Triton interpreter)."""
    rows = [ln.split()[1:] for ln in run_code(_CLOSE_SCRIPT).splitlines() if ln.startswith("close")]
    assert len(rows) == 4, rows
    for h, q, zeroed, left, err in rows:
        assert zeroed == "0" and left == "0" and float(err) <= 1e-5, (h, q, zeroed, left, err)


def test_close_op_on_cpu_is_the_experts_then_the_add():
    """On CPU `moe_rms_experts_close` is `moe_rms_experts_reference` then `moe_close_reference` (bf16, as the
    model's ops round it); a dense output of another shape or a scalar of two elements is refused, named."""
    torch.manual_seed(2)
    E, H, I, K = 8, 64, 32, 2
    stacks = (*mo.quantize_experts(torch.randn(E, 2 * I, H), 32), *mo.quantize_experts(torch.randn(E, H, I), 32))
    x, ym = torch.randn(1, H).bfloat16(), torch.randn(1, H).bfloat16()
    w, idx = mo.moe_route_reference(x.float(), torch.rand(H) + 0.5, torch.randn(E, H), torch.rand(E) + 0.5, K, 1e-6)
    nw, w1, w2, wc = ((torch.rand(H) + 0.5).bfloat16() for _ in range(4))
    s = (torch.rand(1) + 0.5).bfloat16()
    out = torch.ops.gemma4.moe_rms_experts_close(x, nw, 1e-6, w, idx, *stacks, ym, w1, w2, wc, s)
    y = mo.moe_rms_experts_reference(x, nw, 1e-6, w, idx, *stacks)
    rms = lambda t, wt: int4_matmul.rms_norm_reference(t, wt, 1e-6)  # noqa: E731
    assert out.dtype == torch.bfloat16 and torch.equal(out, (x + rms(rms(ym, w1) + rms(y, w2), wc)) * s)
    with pytest.raises(ValueError, match=r"moe_rms_experts_close: the dense MLP's output \(2, 64\)"):
        torch.ops.gemma4.moe_rms_experts_close(x, nw, 1e-6, w, idx, *stacks, ym.repeat(2, 1), w1, w2, wc, s)
    with pytest.raises(ValueError, match=r"layer scalar \(2,\)"):
        torch.ops.gemma4.moe_rms_experts_close(x, nw, 1e-6, w, idx, *stacks, ym, w1, w2, wc, s.repeat(2))


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("gate_up_q", [False, True])
def test_close_op_matches_the_experts_and_the_add_on_cuda(monkeypatch, gate_up_q):
    """The 26B-A4B's widths (2816, 128 experts of 704, top 8), one bf16 token: the op (the experts' down kernel writing
    the closing add) against `moe_rms_experts_int4` and the add in torch, within an ulp or two of bf16 where the
    norms' factors (summed in another order) round otherwise; gate / up from bf16 x and from its int8 levels."""
    monkeypatch.setattr(mo, "GATE_UP_Q", gate_up_q)
    torch.manual_seed(3)
    E, H, I, K = 128, 2816, 704, 8
    stacks = (*mo.quantize_experts(torch.randn(E, 2 * I, H, device="cuda") * 0.05, 128),
              *mo.quantize_experts(torch.randn(E, H, I, device="cuda") * 0.05, 64))
    for _ in range(3):
        x, ym = (torch.randn(1, H, device="cuda").bfloat16() for _ in range(2))
        w, idx = torch.ops.gemma4.moe_route(x, (torch.rand(H, device="cuda") + 0.5).bfloat16(),
                                            (torch.randn(E, H, device="cuda") * 0.05).bfloat16(),
                                            (torch.rand(E, device="cuda") + 0.5).bfloat16(), K, 1e-6)
        nw, w1, w2, wc = ((torch.rand(H, device="cuda") + 0.5).bfloat16() for _ in range(4))
        s = (torch.rand(1, device="cuda") + 0.5).bfloat16()
        assert mo.close_fused_at_decode(x, nw, ym, w1, w2, wc, s)
        out = torch.ops.gemma4.moe_rms_experts_close(x, nw, 1e-6, w, idx, *stacks, ym, w1, w2, wc, s).float()
        y = torch.ops.gemma4.moe_rms_experts_int4(x, nw, 1e-6, w, idx, *stacks)
        want = mo.moe_close_reference(x, y, ym, w1, w2, wc, 1e-6, s).float()
        assert (out - want).abs().max() <= 1e-2 * want.abs().max()
        assert (out - want).norm() <= 2e-3 * want.norm(), ((out - want).norm() / want.norm()).item()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="offline compiles need Triton's compiler")
def test_close_leaves_the_experts_down_kernels_main_loop():
    """The experts' down kernel with CLOSE at the 26B-A4B's widths compiled for sm_90 (no GPU), aligned as launched:
    the same main loop's loads, conversions and FMAs, no spills, and registers for as many programs an SM as its
    grid puts there (352 programs of 8 rows: 3 an SM); the gate / up kernel zeroing the counter (ZC) keeps its
    registers."""
    from tests.helpers import programs_an_sm, sass_sm90

    work = lambda ops: {o: c for o, c in ops.items() if o.split(".")[0] in ("LDG", "I2F", "FFMA", "FMUL")}  # noqa
    cfg = mo.WORDS_DOWN_CONFIGS[0]
    sig = dict(act_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64", q_ptr="*u8", s_ptr="*bf16", out_ptr="*bf16",
               N_OUT="i32", ACT_STRIDE="i32", C_PER_SPLIT="i32", stride_qe="i32", stride_qn="i32", stride_se="i32",
               stride_sn="i32", stride_os="i32", ccnt_ptr="*i32", ym_ptr="*bf16", ch_ptr="*bf16", w1_ptr="*bf16",
               w2_ptr="*bf16", wc_ptr="*bf16", cs_ptr="*bf16", co_ptr="*bf16", ceps="fp64")
    got = []
    for close in (0, 1):
        const = dict(TOP_K=8, NGROUPS=11, GROUP=64, ASM=True, PDL=2, XTILE=1, CLOSE=close, CSTEPS=3, **cfg.kwargs)
        ops, reg, res = sass_sm90(mo._gemv_words_down_kernel, sig, const, cfg.num_warps)
        assert "STACK:0 " in res and "LOCAL:0" in res, res
        got.append((ops, reg))
    (loop0, reg0), (loop1, reg1) = got
    assert work(loop0) and work(loop0) == work(loop1) and sum(loop1.values()) <= sum(loop0.values()) + 2, got
    grid = -(-2816 // cfg.kwargs["BLOCK_N"])
    assert programs_an_sm(reg1, cfg.num_warps) >= -(-grid // 132), (reg0, reg1, grid)
    cfg = mo.WORDS_GATE_UP_CONFIGS[0]
    sig = dict(x_ptr="*bf16", idx_ptr="*i64", q_ptr="*u8", s_ptr="*bf16", act_ptr="*fp32", I="i32", ACT_STRIDE="i32",
               stride_qe="i32", stride_qn="i32", stride_se="i32", stride_sn="i32", zc_ptr="*i32")
    regs = [sass_sm90(mo._gemv_words_gate_up_kernel, sig, dict(NGROUPS=22, GROUP=128, DOWN_GROUP=64, X_BF16=True,
                                                               ASM=True, PDL=2, ZC=zc, **cfg.kwargs),
                      cfg.num_warps)[1] for zc in (0, 1)]
    assert regs[1] <= regs[0], regs
