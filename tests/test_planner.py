"""The memory planner against hand arithmetic for the four real configs.

Every expected figure here is written out from the model's shapes (gemma4.md and
gemma4_text_configs.json), independently of the planner's code: if the planner and this
file disagree, one of them has the geometry wrong. Model coefficients (the fitted export
factors) are imported by name: the tests check how they are applied, not their values.
"""

import json
import math
from dataclasses import replace

import pytest

from export.gemma4 import planner as P
from export.gemma4.config import PRESETS

GiB = 1024**3
V = 262144  # every real config


def plan(name, **kw):
    """The target configuration unless a test says otherwise: int4 linears, int8
    embedding, low-memory export, bf16, 128k."""
    for k, v in (("ctx", 131072), ("embedding", "int8"), ("low_memory", True)):
        kw.setdefault(k, v)
    return P.plan(P.PlanInputs(PRESETS[name], **kw))


def item(items, name):
    (found,) = [i for i in items if i.name == name]
    return found.bytes


def weights(p, kind):
    return item(p.weights, f"weights: {kind}")


# ---- parameter counts: the planner's inventory is the checkpoint's ---------------------------

def test_param_counts_match_transformers():
    # Gemma4ForCausalLM built on the meta device (transformers 5.17); gemma4.md rounds them
    # to 30.697e9, 25.233e9, 7.463e9.
    assert P.param_count(PRESETS["31b"]) == 30_697_345_280
    assert P.param_count(PRESETS["26b-a4b"]) == 25_233_141_760
    assert P.param_count(PRESETS["e4b"]) == 7_463_013_376
    assert P.param_count(PRESETS["e2b"]) == 4_628_569_344


def test_31b_linear_params():
    sliding = (8192 + 4096 + 4096) * 5376 + 5376 * 8192  # q, k, v, o
    full = (16384 + 2048) * 5376 + 5376 * 16384  # q, k (k_eq_v: no v), o
    mlp = 3 * 21504 * 5376
    assert 50 * sliding + 10 * full + 60 * mlp == 29_286_727_680  # "29.287e9" in gemma4.md
    assert P.linear_param_count(PRESETS["31b"]) == 29_286_727_680


def test_layer_param_counts_add_up():
    for name in ("31b", "26b-a4b", "e4b", "e2b"):
        c = PRESETS[name]
        layers = sum(P.layer_param_count(c, i) for i in range(c.num_hidden_layers))
        tables = c.vocab_size * c.hidden_size
        if c.has_ple:
            width = c.num_hidden_layers * c.hidden_size_per_layer_input
            tables += c.vocab_size_per_layer_input * width + width * c.hidden_size  # table + model projection
        assert layers + tables + P.small_param_count(c) == P.param_count(c), name


# ---- int4 weight bytes ------------------------------------------------------------------------

def decoder_linears(p):
    return weights(p, "attention") + weights(p, "mlp")


def test_31b_int4_reference_figures():
    n = 29_286_727_680
    # gemma4.md: group 32 with bf16 scales 15.34 GiB, with zero points 17.05, group 128 14.06
    plain32 = n * 0.5 + n / 32 * 2
    plain128 = n * 0.5 + n / 128 * 2
    zeros32 = n * 0.5 + n / 32 * 4
    assert round(plain32 / GiB, 2) == 15.34 and round(plain128 / GiB, 2) == 14.06 and round(zeros32 / GiB, 2) == 17.05
    assert decoder_linears(plan("31b", int4_layout="plain")) == plain32
    assert decoder_linears(plan("31b", int4_layout="plain", group_size=128)) == plain128
    # every K of 31B is a multiple of 128: tinygemm without torchao's 1024 padding = zero points, no padding
    assert decoder_linears(plan("31b", int4_layout="tinygemm-k128")) == zeros32


def test_31b_int4_tinygemm_pads_k_to_1024():
    # torchao 0.17 tile_packed_to_4d: in_features 5376 -> 6144; 8192, 16384, 21504 stay
    sliding = (8192 + 4096 + 4096) * 6144 + 5376 * 8192
    full = (16384 + 2048) * 6144 + 5376 * 16384
    mlp = 2 * 21504 * 6144 + 5376 * 21504
    padded = 50 * sliding + 10 * full + 60 * mlp
    for g in (32, 128):
        per_param = 0.5 + 4 / g  # nibble + bf16 scale and zero per group
        assert decoder_linears(plan("31b", group_size=g)) == padded * per_param
    assert round(padded * (0.5 + 4 / 32) / GiB, 2) == 18.65


def test_31b_head_and_embedding():
    p = plan("31b")
    assert weights(p, "lm_head") == V * 6144 // 2 + V * (6144 // 32) * 4  # int4, untied
    assert weights(p, "embedding") == V * 5376 + V * 2  # int8 + a bf16 scale per row
    assert round(weights(p, "embedding") / GiB, 2) == 1.31  # gemma4.md: int8 1.31 GiB
    dense = plan("31b", linear="none", embedding="none")
    assert weights(dense, "embedding") == V * 5376 * 2 == 2.625 * GiB
    assert "weights: lm_head" not in [i.name for i in dense.weights]  # tied: one tensor
    assert dense.weights_bytes == 30_697_345_280 * 2 + 60 * 2  # + layer_scalar (a buffer)


def test_26b_moe_expert_bytes():
    gate_up = 128 * 1408 * 3072 // 2 + 128 * 1408 * (3072 // 32) * 4  # K 2816 -> 3072
    down = 128 * 2816 * 1024 // 2 + 128 * 2816 * (1024 // 32) * 4  # K 704 -> 1024
    assert weights(plan("26b-a4b"), "moe experts") == 30 * (gate_up + down)
    bf16 = 30 * 128 * (1408 * 2816 + 2816 * 704) * 2
    assert weights(plan("26b-a4b", experts="none"), "moe experts") == bf16
    assert round(bf16 / GiB, 1) == 42.5  # what leaving the experts unquantized costs
    assert weights(plan("26b-a4b"), "moe router") == 30 * 128 * 2816 * 2  # kept bf16


def test_ple_table_and_linears():
    e4b = plan("e4b", embedding="none")
    assert weights(e4b, "ple table") == 262144 * 42 * 256 * 2 == 5.25 * GiB
    assert weights(plan("e2b", embedding="none"), "ple table") == 262144 * 35 * 256 * 2
    assert weights(plan("e4b"), "ple table") == 262144 * 42 * 256 + 262144 * 2  # int8 like embed_tokens
    # per_layer_model_projection [10752, 2560] + per layer gate [256, 2560], projection [2560, 256]
    int4 = lambda n, k: n * k // 2 + n * (k // 32) * 4  # K already padded  # noqa: E731
    expected = int4(10752, 3072) + 42 * (int4(256, 3072) + int4(2560, 1024))
    assert weights(plan("e4b"), "ple linears") == expected


def test_e2b_double_wide_mlp_on_shared_layers():
    # 15 layers at 6144, 20 KV-shared layers at 12288; bf16
    expected = (15 * 3 * 6144 * 1536 + 20 * 3 * 12288 * 1536) * 2
    assert weights(plan("e2b", linear="none"), "mlp") == expected


# ---- KV cache ---------------------------------------------------------------------------------

def test_31b_kv_at_131072():
    p = plan("31b", prefill_chunk=128)
    full = 10 * 131072 * (2 * 4 * 512 * 2)  # 8 KiB per token per layer
    ring = 50 * (1024 + 127) * (2 * 16 * 256 * 2)  # 16 KiB per token per layer
    window = 50 * 1024 * (2 * 16 * 256 * 2)
    assert full == 10 * GiB
    assert item(p.kv, "kv: full layers") == full
    assert item(p.kv, "kv: sliding layers (ring)") == ring
    assert item(p.kv, "kv: sliding held to the window") == window
    assert round((full + window) / GiB, 2) == 10.78  # the figure
    assert round(ring / GiB, 2) == 0.88
    assert p.kv_bytes == full + ring and p.ring_slots == 1151


def test_kv_sharing_e4b_e2b():
    ring = 512 + 127
    e4b = plan("e4b")  # 24 layers own a cache: 20 sliding + 4 full; 18 shared hold none
    assert e4b.kv_bytes == 20 * ring * (2 * 2 * 256 * 2) + 4 * 131072 * (2 * 2 * 512 * 2)
    e2b = plan("e2b")  # 15 own a cache: 12 sliding + 3 full; 20 shared
    assert e2b.kv_bytes == 12 * ring * (2 * 1 * 256 * 2) + 3 * 131072 * (2 * 1 * 512 * 2)


def test_ring_never_exceeds_ctx_and_fp32_kv_doubles():
    assert plan("31b", ctx=512).ring_slots == 512
    assert plan("31b", kv_dtype="float32").kv_bytes == 2 * plan("31b").kv_bytes


def test_kv_and_params_match_the_model():
    """The planner's geometry is the exported model's: KV buffers and parameter count."""
    torch = pytest.importorskip("torch")
    from export.gemma4.model import Gemma4Model

    for name in ("31b", "26b-a4b", "e4b", "e2b", "tiny", "tiny-moe"):
        c = PRESETS[name]
        ctx = min(8192, c.max_position_embeddings)
        with torch.device("meta"):
            m = Gemma4Model(c, ctx=ctx, prefill_chunk=128, dtype=torch.bfloat16)
        kv = sum(math.prod(s["shape"]) * 2 for s in m.kv_cache_specs())
        p = P.plan(P.PlanInputs(c, ctx=ctx, linear="none", embedding="none"))
        assert p.kv_bytes == kv and p.ring_slots == m.ring_size, name
        n = sum(x.numel() for x in m.parameters()) + c.num_hidden_layers  # + layer_scalar
        assert p.weights_bytes == 2 * n, name


# ---- peaks ------------------------------------------------------------------------------------

def test_runtime_is_the_sum_of_its_terms():
    p = plan("31b")
    r = p.runtime_gpu
    acts = sum(i.bytes for i in r.items if i.name.startswith("activations"))
    fixed = P.KERNEL_WORKSPACE_BYTES + P.CUDA_CONTEXT_BYTES + item(r.items, "allocator slack")
    assert r.total_bytes == p.weights_bytes + p.kv_bytes + acts + 3 * V * 4 + fixed
    assert r.allocator_bytes == r.total_bytes - fixed


def test_31b_attention_working_set_at_131072():
    # triton::sdpa (bf16): only the bool mask [G*T, S] with G = 32 / 4 for full layers
    r = plan("31b").runtime_gpu
    assert item(r.items, "activations: mask [1024, 131072] bool") == 8 * 128 * 131072
    # math SDPA (fp32 model): scores and probabilities [32, 128, 131072] fp32, K and V upcast
    m = plan("31b", dtype="float32", linear="none").runtime_gpu
    assert item(m.items, "activations: scores + probs fp32 [32, 128, 131072] x2") == 2 * 32 * 128 * 131072 * 4 == 4 * GiB
    assert item(m.items, "activations: K, V upcast fp32 [4, 131072, 512]") == 2 * 4 * 131072 * 512 * 4 + 32 * 128 * 512 * 4
    assert item(m.items, "activations: mask [1024, 131072] bool + fp32") == 8 * 128 * 131072 * 5


def test_export_peaks_apply_the_measured_terms():
    p = plan("31b")
    w, kv = p.weights_bytes, p.kv_bytes
    stock = p.export_gpu_stock
    assert stock.allocator_bytes == round(w * P.STOCK_WEIGHT_FACTOR) + round(kv * P.STOCK_KV_FACTOR)
    low = p.export_gpu_low_memory
    largest = V * 5376  # the int8 embedding beats the int4 lm_head (768 MiB) and a full K (512 MiB)
    resident = w + kv if P.EXPORT_EAGER_MODEL_ON_GPU else 0
    assert low.allocator_bytes == resident + largest + P.LOWMEM_WORKSPACE_BYTES
    q = p.export_gpu_quantize
    # the lm_head is packed in 16384-row blocks (1.22 GB with its transient), so the MLP's
    # gate projection [21504 x 5376], K padded to 6144, is the largest step (1.61 GB)
    assert P.QUANT_ROWS_PER_CHUNK == 16384
    assert item(q.items, "largest weight in bf16") == 21504 * 5376 * 2
    assert item(q.items, "int4 packing transient") == round(21504 * 6144 * P.QUANT_TRANSIENT_BYTES_PER_PARAM)
    assert plan("31b", linear="none").export_gpu_quantize.total_bytes == 0
    assert p.export_gpu.total_bytes == max(low.total_bytes, q.total_bytes)
    assert plan("31b", low_memory=False).export_gpu.total_bytes == max(stock.total_bytes, q.total_bytes)


# H100, 2026-11-23: the 31B 6-layer slice (int4 g32, bf16, prefill 128), measured by
# scripts/bench_export_memory.py and scripts/bench_runtime.py (GiB; NVML per process for the
# exports, device-wide for the runner, which ran alone).
MEASURED_6L = {  # ctx: (stock alloc, stock NVML, low alloc, low NVML, runtime alloc, runtime NVML)
    8192: (19.677, 20.289, 2.648, 3.258, 5.618, 6.727),
    32768: (20.615, 21.227, 2.648, 3.258, 5.825, 6.940),
    131072: (24.365, 24.977, 2.648, 3.258, 6.647, 7.763),
}


@pytest.mark.parametrize("ctx", sorted(MEASURED_6L))
def test_plan_within_5_percent_of_the_h100_measurements(ctx):
    """The stock factors come from the 8k and 128k exports, the low-memory terms from the 8k
    one; the 32k exports and all three runtime peaks are independent checks."""
    cfg = PRESETS["31b"].with_layers(6)
    stock_a, stock_n, low_a, low_n, rt_a, rt_n = MEASURED_6L[ctx]
    base = P.PlanInputs(cfg, ctx=ctx, prefill_chunk=128, linear="int4", group_size=32, embedding="none",
                      dtype="bfloat16", low_memory=True)
    p, s = P.plan(base), P.plan(replace(base, low_memory=False))
    for predicted, measured in [(s.export_gpu_stock.allocator_bytes, stock_a), (s.export_gpu_stock.total_bytes, stock_n),
                                (p.export_gpu_low_memory.allocator_bytes, low_a),
                                (p.export_gpu_low_memory.total_bytes, low_n),
                                (p.runtime_gpu.allocator_bytes, rt_a), (p.runtime_gpu.total_bytes, rt_n)]:
        assert predicted / GiB == pytest.approx(measured, rel=0.05)


def test_host_peaks_31b():
    p = plan("31b", low_memory=False)
    assert p.export_host_naive.total_bytes == P.HOST_BASE_BYTES + 30_697_345_280 * 2
    assert round(30_697_345_280 * 2 / GiB) == 57  # gemma4.md: ~57 GiB of bf16 weights
    s = p.export_host_streaming  # one unit: the bf16 table
    assert s.total_bytes == P.HOST_BASE_BYTES + p.weights_bytes + V * 5376 * 2
    low = plan("31b", low_memory=True).export_host_streaming  # weights parked: the table read is the peak
    assert low.total_bytes == P.HOST_BASE_BYTES + round(V * 5376 * 2 * P.LOW_MEMORY_UNIT_READ_FACTOR) < 20 * GiB


def test_low_memory_host_peak_matches_the_h100_exports():
    # bf16 checkpoints of the 31B 2- and 6-layer slices, whole low-memory exports (H100,
    # 2026-11-23); the factor was fitted on the 2-layer one, the 6-layer one checks it
    for layers, measured in ((2, 4.560), (6, 4.625)):
        p = P.plan(P.PlanInputs(PRESETS["31b"].with_layers(layers), ctx=8192, low_memory=True, loader="streaming"))
        assert p.export_host.total_bytes / GiB == pytest.approx(measured, rel=0.05)


# ---- fitting a budget -------------------------------------------------------------------------

WIDE_EXPORT = 1024 * GiB  # export on another machine: only the runtime peak binds


def test_largest_ctx_monotonic_and_bounded():
    c = PRESETS["31b"]
    previous = 0
    for gib in range(20, 50, 2):
        ctx = P.largest_ctx(c, P.Budget(gib * GiB, export_gpu=WIDE_EXPORT))
        assert ctx >= previous and ctx % P.CTX_GRANULARITY == 0 and ctx <= c.max_position_embeddings
        previous = ctx
    assert previous == c.max_position_embeddings


def test_largest_ctx_is_tight():
    inputs = P.PlanInputs(PRESETS["31b"], ctx=1024, embedding="int8")
    budget = P.Budget(28 * GiB, export_gpu=WIDE_EXPORT)
    fit = P.fit_ctx(inputs, budget)
    assert 0 < fit.ctx < 131072 and "runtime GPU" in fit.limit
    assert P.violations(P.plan(replace(inputs, ctx=fit.ctx)), budget) == []
    assert P.violations(P.plan(replace(inputs, ctx=fit.ctx + 1024)), budget) != []


def test_largest_ctx_stops_at_max_position_embeddings():
    fit = P.fit_ctx(P.PlanInputs(PRESETS["e2b"], ctx=1024), P.Budget(80 * GiB))
    assert fit.ctx == 131072 and "max_position_embeddings" in fit.limit


def test_nothing_fits_names_the_limit():
    fit = P.fit_ctx(P.PlanInputs(PRESETS["31b"], ctx=1024), P.Budget(8 * GiB))
    assert fit.ctx == 0 and fit.plan is None and "weights" in fit.limit


def test_resolve_ctx():
    inputs = P.PlanInputs(PRESETS["31b"], ctx=1024)
    budget = P.Budget(32 * GiB, export_gpu=WIDE_EXPORT)
    auto = P.resolve_ctx(inputs, "auto", budget)
    assert auto == P.fit_ctx(inputs, budget).ctx
    assert P.resolve_ctx(inputs, 8192, budget) == 8192
    assert P.resolve_ctx(inputs, 262144, None) == 262144  # no budget: nothing to check
    with pytest.raises(P.DoesNotFit, match=f"the largest ctx that fits is {auto}") as e:
        P.resolve_ctx(inputs, 131072, budget)
    assert "runtime GPU" in str(e.value) and "kv: full layers" in str(e.value)  # the breakdown
    with pytest.raises(ValueError, match="needs --gpu-budget"):
        P.resolve_ctx(inputs, "auto", None)


def test_check_fits_message():
    ok, msg = P.check_fits(P.PlanInputs(PRESETS["e2b"], ctx=8192, low_memory=True), 24 * GiB)
    assert ok and "fits" in msg
    # a stock export holds ~3.5x the weights on the GPU while lowering: E2B's 6.8 GiB does not fit
    ok, msg = P.check_fits(P.PlanInputs(PRESETS["e2b"], ctx=8192, low_memory=False), 24 * GiB)
    assert not ok and "export GPU, stock" in msg


# ---- parsing, rendering, JSON -----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * GiB), ("24 GiB", 24 * GiB), ("24G", 24 * GiB), ("24g", 24 * GiB), ("1.5TiB", 1.5 * 1024 * GiB),
    ("32000MiB", 32000 * 1024**2), ("25.7GB", 25.7e9), ("1024", 1024), (4096, 4096)])
def test_parse_size(text, expected):
    assert P.parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["24 gigs", "", "GiB", "-1GiB", "0", "24GiBs", "2 4GiB"])
def test_parse_size_errors_are_clear(text):
    with pytest.raises(ValueError, match="24GiB|positive"):
        P.parse_size(text)


def test_inputs_validate():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        P.PlanInputs(PRESETS["e2b"], ctx=262144)
    with pytest.raises(ValueError, match="group_size"):
        P.PlanInputs(PRESETS["31b"], group_size=48)
    with pytest.raises(ValueError):
        P.PlanInputs(PRESETS["31b"], linear="int3")


def test_defaults_follow_the_exporter():
    d = P.PlanInputs(PRESETS["31b"])
    assert (d.ctx, d.prefill_chunk, d.linear, d.group_size, d.embedding, d.low_memory) == (
        2048, 128, P.LinearQuant.INT4, 32, P.EmbeddingQuant.NONE, False)  # ExportConfig's defaults
    assert d.attention is P.AttentionImpl.TRITON and d.kv_dtype is P.DType.BF16  # bf16 on CUDA
    fp32 = P.PlanInputs(PRESETS["31b"], dtype="float32")
    assert fp32.attention is P.AttentionImpl.MATH and fp32.kv_dtype is P.DType.FP32
    assert P.PlanInputs(PRESETS["26b-a4b"], linear="none").experts is P.LinearQuant.NONE


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_plans_renders_and_serializes(name):
    c = PRESETS[name]
    p = P.plan(P.PlanInputs(c, ctx=min(4096, c.max_position_embeddings)))
    text = P.render_table(p)
    for title in ("weights", "kv cache", "runtime GPU", "export GPU, stock", "export GPU, low-memory", "export host, naive"):
        assert title in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["runtime_gpu_bytes"] == p.runtime_gpu.total_bytes and d["model"] == name
    assert d["peaks"]["export_gpu_low_memory"]["total_bytes"] == p.export_gpu_low_memory.total_bytes


def test_peaks_grow_with_ctx():
    for name in ("31b", "e4b"):
        a, b = plan(name, ctx=8192), plan(name, ctx=32768)
        for key, peak in a.peaks().items():
            assert peak.total_bytes <= b.peaks()[key].total_bytes, (name, key)


def test_cli_prints_table_and_refuses_what_does_not_fit(capsys):
    assert P.main(["--preset", "31b", "--ctx", "8192"]) == 0
    assert "runtime GPU" in capsys.readouterr().out
    assert P.main(["--preset", "31b", "--ctx", "131072", "--gpu-budget", "24GiB"]) == 1
    assert "does not fit" in capsys.readouterr().err
    assert P.main(["--preset", "e2b", "--ctx", "auto", "--gpu-budget", "24GiB", "--low-memory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["ctx"] > 0
    assert P.main(["--preset", "31b", "--layers", "6", "--ctx", "8192"]) == 0
    assert "6-layer slice" in capsys.readouterr().out
