"""model.ptd writing (FlatTensor, streamed, tied tensors once) and the atomic output dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from executorch.exir._serialize._cord import Cord
from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

import export.artifact as artifact
from export.artifact import PtdTensor, atomic_output_dir, load_ptd_tensor, read_ptd_index, write_ptd


def _tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 17, generator=g).to(torch.bfloat16)
    b = torch.randint(-128, 127, (5, 9), dtype=torch.int8, generator=g)
    c = torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=g)
    return {"a": a, "b": b, "c": c}


def test_ptd_roundtrip_and_executorch_reads_it(tmp_path):
    ts = _tensors()
    entries = [PtdTensor.of(k, v) for k, v in ts.items()] + [PtdTensor.of("a_alias", ts["a"])]
    write_ptd(tmp_path / "m.ptd", entries, {"blob": b"hello"})
    index = read_ptd_index(tmp_path / "m.ptd")
    for k, v in ts.items():
        assert torch.equal(load_ptd_tensor(tmp_path / "m.ptd", index[k]), v)
    assert index["a_alias"].offset == index["a"].offset  # tied: one segment, two keys
    assert all(e.offset % artifact.SEGMENT_ALIGNMENT == 0 for e in index.values())
    # ExecuTorch's own FlatTensor deserializer agrees
    payload = FlatTensorSerializer().deserialize(Cord((tmp_path / "m.ptd").read_bytes()))
    assert set(payload.named_data) == {"a", "b", "c", "a_alias", "blob"}
    assert bytes(payload.buffers[payload.named_data["blob"].buffer_index]) == b"hello"
    b_entry = payload.named_data["b"]
    assert b_entry.tensor_layout.sizes == [5, 9]
    assert bytes(payload.buffers[b_entry.buffer_index]) == ts["b"].numpy().tobytes()


def test_ptd_streams_in_bounded_chunks(tmp_path, monkeypatch):
    """Small CHUNK_BYTES: many writes per tensor, same bytes; each tensor loaded once, lazily."""
    ts = _tensors()
    write_ptd(tmp_path / "whole.ptd", [PtdTensor.of(k, v) for k, v in ts.items()])
    monkeypatch.setattr(artifact, "CHUNK_BYTES", 7)
    loads = []

    def lazy(k, v):
        return PtdTensor(k, tuple(v.shape), v.dtype, lambda: loads.append(k) or v)
    write_ptd(tmp_path / "chunked.ptd", [lazy(k, v) for k, v in ts.items()])
    assert (tmp_path / "whole.ptd").read_bytes() == (tmp_path / "chunked.ptd").read_bytes()
    assert loads == list(ts)


def test_ptd_rejects_duplicate_keys_and_wrong_shapes(tmp_path):
    t = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="duplicate"):
        write_ptd(tmp_path / "x.ptd", [PtdTensor.of("k", t), PtdTensor.of("k", t)])
    bad = PtdTensor("k", (3, 3), torch.float32, lambda: t)
    with pytest.raises(ValueError, match="planned"):
        write_ptd(tmp_path / "y.ptd", [bad])


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    out = tmp_path / "art"
    with atomic_output_dir(out) as d:
        (d / "f").write_text("one")
    assert (out / "f").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as d:
            (d / "f").write_text("two")
            raise RuntimeError("compile failed")
    assert (out / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    with atomic_output_dir(out) as d:
        (d / "f").write_text("three")
    assert (out / "f").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_killed_export_leaves_no_artifact_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from export.artifact import atomic_output_dir
        with atomic_output_dir({str(out)!r}) as d:
            (d / "model.pte").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".art.tmp-")
    with atomic_output_dir(out) as d:
        (d / "model.pte").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert (out / "model.pte").read_bytes() == b"whole"
