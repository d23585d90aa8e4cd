"""The pure-Python .pte/.ptd readers, against files written by ExecuTorch's own serializers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.artifact import Artifact, ArtifactError, Metadata, MethodStep, PtdFile, PteFile

PAIR = "0123abcd"


def _metadata(pair_id: str = PAIR, **overrides) -> dict:
    meta = {
        "format_version": 1, "pair_id": pair_id, "device": "cpu", "dtype": "float32",
        "config": {}, "ctx": 64, "prefill_chunk": 8, "sliding_window": 8, "ring_size": 15,
        "bos_token_id": 2, "eos_token_ids": [1], "vocab_size": 32,
        "kv": [{"fqn": "layers.0.kv.k", "shape": [1, 2, 15, 4], "dtype": "float32", "kind": "sliding"}],
        "methods": {"prefill": {"constants": {"w0": "w.a"}}, "decode": {"constants": {"w0": "w.a"}}},
    }
    meta.update(overrides)
    return meta


@pytest.fixture(scope="module")
def et_program():
    """A real ExecuTorch Program (with a `metadata` constant method) to serialize variants of."""
    from executorch.exir import to_edge

    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    ep = torch.export.export(AddOne(), (torch.ones(2),))
    edge = to_edge(ep, constant_methods={"metadata": json.dumps(_metadata("from-method"))})
    return edge.to_executorch().executorch_program


def write_pte(path, program, named: dict[str, bytes]):
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize._program import PTEFile, serialize_pte_binary

    store = NamedDataStore()
    for key, data in named.items():
        store.add_named_data(key, data, alignment=16)
    data = serialize_pte_binary(PTEFile(program=program, named_data=store.get_named_data_store_output()))
    path.write_bytes(bytes(data))
    return path


def write_ptd(path, tensors: dict[str, torch.Tensor], blobs: dict[str, bytes]):
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize.data_serializer import DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    store = NamedDataStore()
    for key, t in tensors.items():
        store.add_named_data(key, t, alignment=16, external_tag="model")
    for key, data in blobs.items():
        store.add_named_data(key, data, external_tag="model")
    out = store.get_named_data_store_output()
    blob = FlatTensorSerializer().serialize(DataPayload(buffers=out.buffers, named_data=out.external_data["model"]))
    path.write_bytes(bytes(blob))
    return path


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    return {
        "w.a": a,
        "w.b": torch.arange(7, dtype=torch.int64),
        "w.c": torch.randn(2, 3, 4, generator=g),
        "w.a_tied": a.clone(),  # same bytes as w.a: the serializer shares one segment
    }


@pytest.fixture
def pair(tmp_path, et_program, tensors):
    so = b"\x7fELF" + bytes(range(256)) * 3
    write_pte(tmp_path / "model.pte", et_program, {
        "prefill_so_blob": so, "decode_so_blob": so[::-1],
        "gemma4_metadata": json.dumps(_metadata()).encode(),
    })
    write_ptd(tmp_path / "model.ptd", tensors, {"gemma4_pair_id": PAIR.encode()})
    return tmp_path, tensors, so


def test_pte_named_data_and_methods(pair):
    d, _, so = pair
    pte = PteFile.open(d / "model.pte")
    assert pte.named_bytes("prefill_so_blob") == so
    assert pte.named_bytes("decode_so_blob") == so[::-1]
    assert json.loads(pte.metadata_json())["pair_id"] == PAIR  # named data wins over the method
    assert pte.method_names == ["forward", "metadata"]


def test_pte_metadata_falls_back_to_constant_method(tmp_path, et_program):
    pte = PteFile.open(write_pte(tmp_path / "model.pte", et_program, {"prefill_so_blob": b"x" * 40}))
    assert json.loads(pte.metadata_json())["pair_id"] == "from-method"
    with pytest.raises(ArtifactError, match="no named data 'decode_so_blob'"):
        pte.named_bytes("decode_so_blob")


def test_ptd_index_and_zero_copy_tensors(pair):
    d, tensors, _ = pair
    ptd = PtdFile.open(d / "model.ptd")
    for key, t in tensors.items():
        got = ptd.tensor(key)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t), key
    assert ptd.entries["w.a"].offset == ptd.entries["w.a_tied"].offset  # deduplicated segment
    assert ptd.entries["w.a"].offset % 16 == 0
    assert ptd.raw_bytes("gemma4_pair_id") == PAIR.encode()
    ptd.release("w.c")  # dropping pages must not lose data: they are re-read from the file
    assert torch.equal(ptd.tensor("w.c"), tensors["w.c"])


def test_artifact_pair_opens(pair):
    d, _, so = pair
    art = Artifact.open(d)
    assert art.so_blob("prefill") == so
    assert art.metadata.ctx == 64 and art.metadata.eos_token_ids == (1,)
    assert art.metadata.kv[0].shape == (1, 2, 15, 4) and art.metadata.kv[0].dtype == torch.float32
    assert art.metadata.method_steps["decode"] == (MethodStep("decode", {"w0": "w.a"}),)  # format 1: one step


def test_metadata_steps_of_format_2():
    steps = [{"program": "decode_embed", "constants": {"e": "embed.w"}, "inputs": [0]},
             {"program": "decode_layer0", "constants": {"w": "layers.0.w"}, "inputs": [0, 1]},
             {"program": "decode_layer0", "constants": {"w": "layers.1.w"}, "inputs": [0, 1]}]
    meta = Metadata.parse(json.dumps(_metadata(format_version=2, methods={
        "prefill": {"steps": [{"program": "prefill", "constants": {}}]}, "decode": {"steps": steps}})), Path("m"))
    assert [s.program for s in meta.method_steps["decode"]] == ["decode_embed", "decode_layer0", "decode_layer0"]
    assert meta.method_steps["decode"][0].inputs == (0,) and meta.method_steps["prefill"][0].inputs == (0, 1)
    assert meta.method_steps["decode"][2].constants == {"w": "layers.1.w"}
    assert meta.programs() == ["prefill", "decode_embed", "decode_layer0"]


def test_metadata_without_a_method_is_a_clear_error():
    text = json.dumps(_metadata(format_version=2, methods={"prefill": {"steps": [{"program": "p", "constants": {}}]}}))
    with pytest.raises(ArtifactError, match="lacks or mistypes a field.*decode"):
        Metadata.parse(text, Path("m"))


def test_missing_ptd_is_a_clear_error(pair):
    d, _, _ = pair
    (d / "model.ptd").unlink()
    with pytest.raises(ArtifactError, match=r"model\.ptd not found.*needs its weights file"):
        Artifact.open(d)


def test_mismatched_pair_is_a_clear_error(pair, tensors):
    d, _, _ = pair
    write_ptd(d / "model.ptd", {"w.a": tensors["w.a"]}, {"gemma4_pair_id": b"ffff0000"})
    with pytest.raises(ArtifactError, match=r"pair_id ffff0000\) does not belong to .*model\.pte \(pair_id 0123abcd\)"):
        Artifact.open(d)


@pytest.mark.parametrize("name", ["model.pte", "model.ptd"])
def test_truncated_file_is_a_clear_error(pair, name):
    d, _, _ = pair
    path = d / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match=rf"{name} is truncated"):
        Artifact.open(d)


def test_not_an_executorch_file(tmp_path):
    (tmp_path / "model.pte").write_bytes(b"\x00" * 200)
    with pytest.raises(ArtifactError, match="not an ExecuTorch"):
        PteFile.open(tmp_path / "model.pte")


def test_metadata_version_is_checked(tmp_path, et_program):
    meta = json.dumps(_metadata(format_version=99)).encode()
    write_pte(tmp_path / "model.pte", et_program, {"gemma4_metadata": meta})
    with pytest.raises(ArtifactError, match="format_version 99"):
        Artifact.open(tmp_path)
