"""The model as a chain of compiled units (export/chain.py): each distinct layer compiled once,
run as every layer of its kind with that layer's own tensors.

CPU: the split (which units, which renames), the units run eagerly in chain order against the
whole model's forward (bitwise, fp32; int8 KV too; per-layer embeddings and KV shared across
layers as in E2B / E4B), a low-memory artifact of a 31B-like model through the runner against
its eager model and against the same model compiled whole, and the `tiny` artifact (per-layer
embeddings, shared KV) through the runner against its eager model. CUDA (`cuda` marker): the
31B-like model in bf16 with the Triton kernels, chain against whole graph (bitwise) and against
an fp32 model with the same dequantized weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from export.chain import WHOLE, Chain, Step, advance, run_units
from export.gemma4.config import PRESETS, _pattern
from export.gemma4.model import EmbedUnit, Gemma4Model, HeadUnit, LayerUnit
from tests.helpers import randomize_, tiny_31b_like

LAYERS = 8  # 5 sliding, full, sliding, full (the last layer is full): two layer units


def config(layers: int = LAYERS):
    return replace(tiny_31b_like(), num_hidden_layers=layers, layer_types=_pattern(layers, 6))


def test_step_renames_only_its_prefix():
    step = Step("layer5", (("layers.5.", "layers.11."), ("kv_source.", "layers.3.self_attn.kv_cache.")))
    assert step.model_key("layers.5.mlp.down_proj.qweight") == "layers.11.mlp.down_proj.qweight"
    assert step.model_key("kv_source.k") == "layers.3.self_attn.kv_cache.k"
    assert step.model_key("inv_freq_full") == "inv_freq_full"
    assert step.model_key("layers.55.x") == "layers.55.x"  # another layer's prefix is not this one
    assert Step("embed").model_key("embed_tokens.weight") == "embed_tokens.weight"


def test_a_units_outputs_replace_the_carrys_first_entries():
    x, ple, pos = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert advance([x], (x, ple)) == [x, ple]  # the embedding adds the per-layer inputs
    assert advance([ple, ple], x)[0] is x and advance([ple, ple], x)[1] is ple  # a layer passes them on
    units = [lambda t, p: (t + 1, t * 0), lambda a, b, p: a + b + p]  # (*carry, pos) in, carry out
    assert run_units(units, x, pos).item() == 3.0


def test_chain_names_its_programs_and_checks_its_units():
    chain = Chain({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}, (Step("a"), Step("b"), Step("b")))
    assert chain.programs("decode") == ["decode_a", "decode_b"]
    assert Chain.whole(torch.nn.Linear(2, 2)).programs("prefill") == ["prefill"]
    assert Chain.program("decode", WHOLE) == "decode"
    with pytest.raises(ValueError, match="lacks"):
        Chain({"a": torch.nn.Linear(2, 2)}, (Step("a"), Step("c")))


def test_31b_like_model_splits_into_one_unit_per_layer_kind():
    model = Gemma4Model(config(14), ctx=64, prefill_chunk=8)
    chain = model.chain()
    assert list(chain.units) == ["embed", "layer0", "layer5", "head"]
    assert isinstance(chain.units["embed"], EmbedUnit) and isinstance(chain.units["head"], HeadUnit)
    kinds = ["layer0" if model.cfg.is_sliding(i) else "layer5" for i in range(14)]
    assert kinds.count("layer5") == 3  # layers 5, 11 and the last
    assert [s.unit for s in chain.steps] == ["embed"] + kinds + ["head"]
    assert chain.steps[12].rename == (("layers.5.", "layers.11."),)
    # a unit's tensors are the model's own, under the model's names
    unit = chain.units["layer5"]
    assert unit.get_parameter("layers.5.mlp.down_proj.weight") is model.layers[5].mlp.down_proj.weight


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_tiny_presets_split_into_a_unit_per_layer_role(preset):
    """4 layers: a sliding source whose ring layer 2 reads, a full source layer 3 reads: four
    roles, four units; the readers' steps map `kv_source.` to their source's cache."""
    model = Gemma4Model(PRESETS[preset], ctx=32, prefill_chunk=4)
    chain = model.chain()
    assert list(chain.units) == ["embed", "layer0", "layer1", "layer2", "layer3", "head"]
    assert chain.steps[3].rename == (("layers.2.", "layers.2."), ("kv_source.", "layers.0.self_attn.kv_cache."))
    assert chain.steps[4].rename[1] == ("kv_source.", "layers.1.self_attn.kv_cache.")
    assert chain.units["layer2"].get_buffer("kv_source.k") is model.layers[0].self_attn.kv_cache.k
    kinds = {s["fqn"]: s["kind"] for s in model.kv_cache_specs()}
    # only the ring that a later layer reads keeps a prefill chunk's K/V for it
    assert kinds["layers.0.self_attn.kv_cache.chunk_k"] == "chunk"
    assert [k for k in kinds if "chunk" in k] == ["layers.0.self_attn.kv_cache.chunk_k",
                                                   "layers.0.self_attn.kv_cache.chunk_v"]


def e2b_like(preset: str = "tiny"):
    """E2B's structure at toy size: 10 layers (4 sliding, full, 4 sliding, full), the last 5
    KV-shared: layers 5-8 read layer 3's ring (8 last, writing it), layer 9 layer 4's cache."""
    return replace(PRESETS[preset], num_hidden_layers=10, layer_types=_pattern(10, 5), num_kv_shared_layers=5)


def test_shared_kv_layers_of_one_role_share_a_unit():
    chain = Gemma4Model(e2b_like(), ctx=32, prefill_chunk=4).chain()
    assert list(chain.units) == ["embed", "layer0", "layer3", "layer4", "layer5", "layer8", "layer9", "head"]
    assert [s.unit for s in chain.steps[1:-1]] == ["layer0"] * 3 + ["layer3", "layer4"] + ["layer5"] * 3 + [
        "layer8", "layer9"]
    assert chain.steps[7].rename == (("layers.5.", "layers.6."), ("kv_source.", "layers.3.self_attn.kv_cache."))


def moe_config():
    """The 26B-A4B's structure at toy size: a MoE block beside each dense MLP, no per-layer
    embeddings, no shared KV (so it splits like the 31B)."""
    return replace(PRESETS["tiny-moe"], num_hidden_layers=LAYERS, layer_types=_pattern(LAYERS, 6),
                   num_kv_shared_layers=0, hidden_size_per_layer_input=0, use_double_wide_mlp=False)


@pytest.mark.parametrize("kv_dtype,moe", [(None, False), ("int8", False), (None, True)])
@torch.no_grad()
def test_units_in_chain_order_give_the_models_logits(kv_dtype, moe):
    """Each layer as its own LayerUnit (the code a compiled unit runs), prefill chunks past the
    sliding window and decode steps: bitwise the whole forward's logits."""
    cfg = moe_config() if moe else config()
    assert list(Gemma4Model(cfg, ctx=64, prefill_chunk=12).chain().units) == ["embed", "layer0", "layer5", "head"]
    whole = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12, kv_dtype=kv_dtype), seed=1).eval()
    parts = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12, kv_dtype=kv_dtype), seed=1).eval()
    _assert_units_give_the_whole_logits(cfg, whole, parts)


def _assert_units_give_the_whole_logits(cfg, whole, parts):
    units = [EmbedUnit(parts)] + [LayerUnit(parts, i) for i in range(cfg.num_hidden_layers)] + [HeadUnit(parts)]
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = 0
    for n in (12, 12, 5, 1, 1, 1):  # 3 chunks (the ring wraps: window 8), then decode
        tokens, start = ids[:, pos:pos + n], torch.tensor([pos])
        assert torch.equal(run_units(units, tokens, start), whole(tokens, start)), (pos, n)
        pos += n


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], PRESETS["tiny-moe"], e2b_like()], ids=["tiny", "tiny-moe", "e2b"])
@torch.no_grad()
def test_units_with_per_layer_inputs_and_shared_kv_give_the_models_logits(cfg):
    """Per-layer embeddings in the carry, KV-shared readers of a ring through its chunk
    buffers (prefill) or the ring itself (decode): bitwise the whole forward."""
    whole = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12), seed=1).eval()
    parts = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=12), seed=1).eval()
    _assert_units_give_the_whole_logits(cfg, whole, parts)
    for a, b in zip(whole.caches(), parts.caches()):  # the rings and caches end up the same too
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def _export(tmp_path_factory, layer_units: bool, cuda: bool = False):
    """The 31B-like model exported low-memory: fp32 on the CPU, or bf16 on CUDA with the int4
    Triton kernels and without autotune (one config per kernel, so both exports compile alike)."""
    from export.gemma4.export import DeviceChoice, ExportConfig, export_model

    PRESETS["test-chain-31b-like"] = config()
    try:
        out = tmp_path_factory.mktemp("chain") / "art"
        device = dict(device=DeviceChoice.CUDA, autotune=False) if cuda else dict(device=DeviceChoice.CPU)
        return export_model(ExportConfig(preset="test-chain-31b-like", out=out, ctx=64, prefill_chunk=12,
                                         low_memory=True, layer_units=layer_units, **device))
    finally:
        del PRESETS["test-chain-31b-like"]


@pytest.fixture(scope="module")
def chain_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=True)


@pytest.fixture(scope="module")
def whole_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=False)


@pytest.fixture(scope="module")
def cuda_chain_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=True, cuda=True)


@pytest.fixture(scope="module")
def cuda_whole_artifact(tmp_path_factory):
    return _export(tmp_path_factory, layer_units=False, cuda=True)


def _logits(out, ids: list[int]) -> list[torch.Tensor]:
    """Through the runner: 3 prefill chunks (the ring wraps), then 3 decode steps."""
    from runtime.runner import Runner

    runner, pos, out_logits = Runner.load(out), 0, []
    for n in (12, 12, 5, 1, 1, 1):
        out_logits.append(runner.prefill(ids[pos:pos + n]) if n > 1 else runner.decode(ids[pos]))
        pos += n
    return out_logits


def test_artifact_steps_bind_each_layers_own_tensors(chain_artifact):
    meta = chain_artifact.metadata
    for method in ("prefill", "decode"):
        steps = meta["methods"][method]["steps"]
        kinds = [0, 0, 0, 0, 0, 5, 0, 5]
        assert [s["program"] for s in steps] == ([f"{method}_embed"] + [f"{method}_layer{k}" for k in kinds]
                                                 + [f"{method}_head"])
        assert steps[0]["inputs"] == [0] and steps[1]["inputs"] == [0, 1]  # the embedding reads no position
        for i, step in enumerate(steps[1:-1]):
            keys = {k for k in step["constants"].values() if k.startswith("layers.")}
            assert keys and all(k.startswith(f"layers.{i}.") for k in keys), (i, sorted(keys)[:3])
            assert f"layers.{i}.layer_scalar" in keys  # a per-layer scalar is bound, not baked into the code


def _assert_matches_eager(out, model):
    model.reset_cache()
    ids = torch.randint(0, model.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    pos, errors = 0, []
    for n, got in zip((12, 12, 5, 1, 1, 1), _logits(out, ids)):
        want = model(torch.tensor([ids[pos:pos + n]]), torch.tensor([pos]))[0]
        errors.append(((got - want).norm() / want.norm()).item())  # a wrong layer's weights: O(1)
        pos += n
    assert max(errors) <= 1e-4, errors


@torch.no_grad()
def test_artifact_chain_matches_its_eager_model(chain_artifact):
    _assert_matches_eager(chain_artifact.out_dir, chain_artifact.model)


@torch.no_grad()
def test_tiny_artifact_runs_as_a_chain_with_per_layer_inputs_and_shared_kv(tiny_artifact):
    """`tiny` (per-layer embeddings, KV shared across layers; int4, fp32) as a chain: the carry
    is (x, per-layer inputs), the shared layers bind their source's cache (and, in prefill, the
    ring's chunk buffers); through the runner within 1e-4 of its eager model."""
    for method in ("prefill", "decode"):
        steps = tiny_artifact.metadata["methods"][method]["steps"]
        assert [s["program"] for s in steps] == [f"{method}_{u}" for u in
                                                 ("embed", "layer0", "layer1", "layer2", "layer3", "head")]
        assert [s["inputs"] for s in steps[1:]] == [[0, 1, 2]] * 4 + [[0]]  # (x, ple, pos); the head reads x
        kv = {k for s in steps for k in s["constants"].values() if ".kv_cache." in k}
        reads = {k for k in steps[3]["constants"].values() if ".kv_cache." in k}
        assert reads and all(k.startswith("layers.0.self_attn.kv_cache.") for k in reads)
        chunk = {"layers.0.self_attn.kv_cache.chunk_k", "layers.0.self_attn.kv_cache.chunk_v"}
        assert (chunk <= kv) == (method == "prefill")  # decode writes and reads the ring itself
        assert {f"layers.{i}.ple_index" for i in range(4)} <= {k for s in steps for k in s["constants"].values()}
    _assert_matches_eager(tiny_artifact.out_dir, tiny_artifact.fresh_model())


@torch.no_grad()
def test_artifact_chain_gives_the_whole_graphs_logits(chain_artifact, whole_artifact):
    """The same model compiled whole (`--no-layer-units`): bitwise the same logits (fp32, CPU)."""
    assert [s["program"] for s in whole_artifact.metadata["methods"]["decode"]["steps"]] == ["decode"]
    ids = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    for a, b in zip(_logits(chain_artifact.out_dir, ids), _logits(whole_artifact.out_dir, ids)):
        assert torch.equal(a, b)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_artifact_chain_gives_the_whole_graphs_logits(cuda_chain_artifact, cuda_whole_artifact):
    """On CUDA (bf16, int4 kernels, `--no-autotune`): the chain and the whole graph give bitwise the
    same logits through the runner (CUDA-graph decode), and the chain is no further from an fp32
    reference with the same dequantized weights than twice the eager bf16 model, plus 0.5% (bf16
    alone moves this small random model's logits by several percent; a wrong layer, by tens)."""
    from export.kernels import attention, int4_matmul
    from tests.test_export_cuda import fp32_reference

    assert len(cuda_chain_artifact.metadata["methods"]["decode"]["steps"]) == LAYERS + 2
    ids = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    chain, whole = _logits(cuda_chain_artifact.out_dir, ids), _logits(cuda_whole_artifact.out_dir, ids)
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(chain, whole)]
    assert all(d == 0 for d in diffs), diffs
    model = cuda_chain_artifact.model.cuda()
    ref = fp32_reference(model)
    model.reset_cache()
    ref.reset_cache()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    pos, errors = 0, []
    with int4_matmul.one_config(), attention.use_configs(attention.one_config):  # eager: no tuning runs
        for n, got in zip((12, 12, 5, 1, 1, 1), chain):
            x, p = torch.tensor([ids[pos:pos + n]], device="cuda"), torch.tensor([pos], device="cuda")
            want = ref(x, p)[0].float()
            errors.append((rel(got, want), rel(model(x, p)[0], want)))
            pos += n
    assert all(c <= 2 * e + 5e-3 for c, e in errors), errors


@pytest.mark.parametrize("name,units", [
    ("e2b", ["layer0", "layer4", "layer13", "layer15", "layer19", "layer33"]),
    ("e4b", ["layer0", "layer5", "layer22", "layer24", "layer29", "layer40"])])
def test_e2b_e4b_split_into_six_layer_units(name, units):
    """Sliding, full (the full source of the shared layers too: a full cache is written where it
    is computed); the sliding source (passing its chunk on); shared sliding readers and their
    last (writing the ring); shared full layers. On the meta device: no bytes."""
    with torch.device("meta"):
        model = Gemma4Model(PRESETS[name], ctx=4096, prefill_chunk=128, dtype=torch.bfloat16)
    chain = model.chain()
    assert list(chain.units) == ["embed", *units, "head"]
    assert len(chain.steps) == PRESETS[name].num_hidden_layers + 2
