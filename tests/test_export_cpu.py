"""The tiny preset exported for CPU (session fixture `tiny_artifact`): the artifact's layout,
each weight stored once, and the compiled .so bound from the .ptd matching eager logits.

The loader below is deliberately minimal (the real runner lives in runtime/): it pulls each
program's .so out of the .pte, loads it with `AOTIModelContainerRunnerCpu`, and runs a method's
steps in order, binding every constant by name before each step (weights from the .ptd, KV
buffers from one shared allocation) and passing the carry on (export/ARTIFACT.md).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest
import torch

from export.artifact import load_ptd_tensor, read_ptd_index
from export.gemma4.export import METHODS

pytestmark = pytest.mark.slow
REL_TOL = 1e-3


def _named_data(pte: Path) -> dict[str, bytes]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    nd = deserialize_pte_binary(pte.read_bytes()).named_data
    return {k: bytes(nd.buffers[e.buffer_index]) for k, e in nd.pte_data.items()}


class MiniRunner:
    """Both methods of a CPU artifact, sharing weights and KV tensors (bound, not copied)."""

    def __init__(self, out: Path, tmp: Path):
        lib = Path(torch.__file__).parent / "lib"
        ctypes.CDLL(str(lib / "libtorch_cpu.so"), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)  # the .so needs its symbols
        self.blobs = _named_data(out / "model.pte")
        self.meta = json.loads(self.blobs["gemma4_metadata"])
        index = read_ptd_index(out / "model.ptd")
        self.weights = {k: load_ptd_tensor(out / "model.ptd", e) for k, e in index.items() if e.layout is not None}
        self.kv = {s["fqn"]: torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in self.meta["kv"]}
        self.runners = {}
        for method in METHODS:
            for step in self.meta["methods"][method]["steps"]:
                program = step["program"]
                if program not in self.runners:
                    so = tmp / f"{program}.so"
                    so.write_bytes(self.blobs[f"{program}_so_blob"])
                    self.runners[program] = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)

    def _run(self, method: str, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        carry, pos = [tokens.contiguous()], torch.tensor([pos])
        for step in self.meta["methods"][method]["steps"]:
            runner = self.runners[step["program"]]
            tensors = {name: self.kv.get(key, self.weights.get(key)) for name, key in step["constants"].items()}
            runner.update_constant_buffer(tensors, False, True, True)  # validate_full_update, user_managed
            args = [*carry, pos]
            out = runner.run([args[i] for i in step["inputs"]])
            carry = list(out) + carry[len(out):]
        return carry[0]

    def prefill(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self._run("prefill", tokens, pos)

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        return self._run("decode", token, pos)


@pytest.fixture(scope="module")
def mini(tiny_artifact, tmp_path_factory) -> MiniRunner:
    return MiniRunner(tiny_artifact.out_dir, tmp_path_factory.mktemp("so"))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_artifact_files_and_no_leftovers(tiny_artifact):
    out = tiny_artifact.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["model.ptd", "model.pte", "tokenizer.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_pte_holds_so_per_program_and_no_weights(mini):
    programs = {s["program"] for m in METHODS for s in mini.meta["methods"][m]["steps"]}
    assert "decode_layer2" in programs  # tiny runs as a chain: embedding, a unit per layer role, head
    assert set(mini.blobs) == {f"{p}_so_blob" for p in programs} | {"gemma4_metadata"}
    # the .so files carry no weights: ExecuTorch 1.2 would add {method}_weights_blob
    assert not any(k.endswith("_weights_blob") for k in mini.blobs)


def test_metadata_contract(tiny_artifact, mini):
    meta = tiny_artifact.metadata
    assert mini.meta == meta
    assert meta["format_version"] == 2 and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["kv_dtype"] == "float32"  # --kv-dtype auto on cpu: the model dtype's cache, named
    assert (meta["ctx"], meta["prefill_chunk"], meta["sliding_window"]) == (64, 12, 8)
    assert meta["ring_size"] == 8  # the window, whatever the chunk
    assert meta["quant"]["linear"] == "int4" and meta["quant"]["group_size"] == 32
    assert meta["quant"]["embedding"] == "int8"
    assert meta["eos_token_ids"] == [1] and meta["vocab_size"] == 512
    assert meta["kv"] == tiny_artifact.model.kv_cache_specs()


def test_metadata_constant_method_readable_by_executorch(tiny_artifact):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(tiny_artifact.out_dir / "model.pte")
    programs = {s["program"] for m in METHODS for s in tiny_artifact.metadata["methods"][m]["steps"]}
    assert programs | {"metadata"} <= set(program.method_names)
    text = program.load_method("metadata").execute([])[0]
    assert json.loads(text) == tiny_artifact.metadata


def test_pair_id_ties_pte_to_ptd(tiny_artifact):
    path = tiny_artifact.out_dir / "model.ptd"
    entry = read_ptd_index(path)["gemma4_pair_id"]
    with open(path, "rb") as f:
        f.seek(entry.offset)
        assert f.read(entry.size).decode() == tiny_artifact.metadata["pair_id"]


def test_each_weight_stored_once_serving_both_methods(tiny_artifact):
    meta = tiny_artifact.metadata
    index = read_ptd_index(tiny_artifact.out_dir / "model.ptd")
    kv = {s["fqn"] for s in meta["kv"]}
    keys = {m: {k for step in meta["methods"][m]["steps"] for k in step["constants"].values()} for m in METHODS}
    shared = keys["prefill"] & keys["decode"]
    assert len(shared - kv) > 40  # the same .ptd entries serve both methods
    assert all(k in index for k in (keys["prefill"] | keys["decode"]) - kv)
    assert not kv & set(index)  # KV buffers are the runner's, not in the .ptd
    # no tensor bytes appear twice: segments are distinct and the file is about their sum
    tensors = {k: e for k, e in index.items() if e.layout is not None}
    offsets = [e.offset for e in tensors.values()]
    assert len(set(offsets)) == len(offsets)
    weight_bytes = sum(e.size for e in tensors.values())
    model = tiny_artifact.model
    model_bytes = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if n not in kv)
    file_size = (tiny_artifact.out_dir / "model.ptd").stat().st_size
    assert weight_bytes <= model_bytes + 4096
    assert file_size < weight_bytes + (len(tensors) + 2) * 4096 + 65536  # padding only


def test_ptd_entries_equal_model_tensors(tiny_artifact, mini):
    state = dict(tiny_artifact.model.named_parameters(remove_duplicate=False))
    state.update(tiny_artifact.model.named_buffers(remove_duplicate=False))
    for key, t in mini.weights.items():
        if "::" not in key:  # "{program}::{name}": made by tracing, no model tensor (export/ARTIFACT.md)
            assert torch.equal(t, state[key].detach().cpu()), key
    # the quantized formats really are in the file
    assert mini.weights["layers.0.mlp.gate_proj.qweight"].dtype == torch.uint8
    assert mini.weights["embed_tokens.weight"].dtype == torch.int8


def test_so_constant_names_map_as_metadata_says(mini):
    """Every step binds exactly its program's constants; a step that runs its unit under the
    unit's own names (the first layer of a kind, the embedding, the head) maps each to its FQN."""
    for method in METHODS:
        for i, step in enumerate(mini.meta["methods"][method]["steps"]):
            fqns = mini.runners[step["program"]].get_constant_names_to_original_fqns()
            assert set(fqns) == set(step["constants"])
            own = step["program"] in (f"{method}_embed", f"{method}_head", f"{method}_layer{i - 1}")
            if own and not any(f.startswith("kv_source.") for f in fqns.values()):
                for n, f in fqns.items():  # a constant tracing made has no FQN: "{program}::{name}"
                    made = n.startswith("_lifted_tensor_constant")
                    assert step["constants"][n] == (f"{step['program']}::{n}" if made else f), (step["program"], n)


@torch.no_grad()
def test_so_logits_match_eager_prefill_and_decode(tiny_artifact, mini):
    """Chunked prefill (full chunk, partial chunk; both longer than the window) then decode
    past the sliding rings' wrap: every step within 1e-3 relative of the eager model with the
    same weights."""
    model = tiny_artifact.fresh_model()
    model.reset_cache()
    for t in mini.kv.values():
        t.zero_()
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    errors = []
    for start, end in [(0, 12), (12, 21)]:
        piece = ids[:, start:end]
        errors.append(_rel(mini.prefill(piece, start), model(piece, torch.tensor([start]))))
    for p in range(21, 40):
        tok = ids[:, p:p + 1]
        errors.append(_rel(mini.decode(tok, p), model(tok, torch.tensor([p]))))
    assert max(errors) < REL_TOL, errors
    # both methods wrote the same KV tensors the runner bound (no copies)
    layer0 = mini.kv["layers.0.self_attn.kv_cache.k"]
    torch.testing.assert_close(layer0, model.layers[0].self_attn.kv_cache.k, rtol=1e-4, atol=1e-5)


def test_preset_artifact_has_a_standin_tokenizer(tiny_artifact):
    """A preset has no tokenizer of its own: the exporter writes a byte-level stand-in so
    `python -m runtime --prompt ...` works on the default export."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_artifact.out_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == tiny_artifact.metadata["vocab_size"]
    ids = tok.encode("héllo, Gemma").ids
    assert ids and max(ids) < tiny_artifact.metadata["vocab_size"]
    assert tok.decode(ids) == "héllo, Gemma"
