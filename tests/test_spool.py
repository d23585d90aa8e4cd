"""export/spool.py: weights parked on disk, lazy-zero KV, deep copies that alias, and the
.ptd writer copying parked bytes file to file."""

import copy
import os

import pytest
import torch
from torch import nn

from export.artifact import PtdTensor, load_ptd_tensor, read_ptd_index, write_ptd
from export.spool import MIN_PARK_BYTES, WeightSpool, file_range, lazy_zeros, shared_deepcopy

MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_parked_tensor_equals_source_and_leaves_no_file(tmp_path):
    t = torch.randn(300, 200, dtype=torch.bfloat16)
    with WeightSpool(tmp_path) as spool:
        assert list(tmp_path.iterdir()) == []  # the spool file is unlinked from the start
        p = spool.park(t)
        assert torch.equal(p, t) and p.data_ptr() != t.data_ptr()
        rng = file_range(p)
        assert rng is not None and rng.nbytes == t.numel() * 2 and rng.offset % 4096 == 0
        assert file_range(p[1:]) is None  # a view is not the parked range
        assert spool.park(p) is p  # parked once
        assert spool.parked_bytes == rng.nbytes
    assert file_range(p) is None  # closed: the writer falls back to reading the tensor
    assert torch.equal(p, t)  # the mapping outlives the file descriptor


def test_small_tensors_stay_in_ram(tmp_path):
    small = torch.ones(MIN_PARK_BYTES // 4 - 1)
    with WeightSpool(tmp_path) as spool:
        assert spool.park(small) is small


def test_park_module_keeps_ties_and_buffers(tmp_path):
    emb = nn.Embedding(512, 64)
    head = nn.Linear(64, 512, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    m.register_buffer("table", torch.arange(40000, dtype=torch.float32))
    m.register_buffer("scratch", torch.zeros(40000), persistent=False)
    want = emb.weight.detach().clone()
    with WeightSpool(tmp_path) as spool:
        spool.park_module_(m)
        assert m["head"].weight is m["emb"].weight  # still one Parameter
        assert file_range(m["emb"].weight) is not None and file_range(m.table) is not None
        assert file_range(m.scratch) is None  # non-persistent buffers are not weights
        assert torch.equal(m["emb"].weight, want)


def test_ptd_writer_copies_parked_bytes(tmp_path):
    a, b = torch.randn(128, 256), torch.randint(0, 255, (70000,), dtype=torch.uint8)
    with WeightSpool(tmp_path / "spool") as spool:
        pa, pb = spool.park(a), spool.park(b)
        plan = [PtdTensor.of("a", pa), PtdTensor.of("small", torch.arange(5.0)), PtdTensor.of("b", pb)]
        assert plan[0].parked is not None and plan[1].parked is None
        write_ptd(tmp_path / "m.ptd", plan, {"blob": b"xyz"})
    index = read_ptd_index(tmp_path / "m.ptd")
    assert torch.equal(load_ptd_tensor(tmp_path / "m.ptd", index["a"]), a)
    assert torch.equal(load_ptd_tensor(tmp_path / "m.ptd", index["b"]), b)
    assert torch.equal(load_ptd_tensor(tmp_path / "m.ptd", index["small"]), torch.arange(5.0))


def test_lazy_zeros_cost_nothing_until_written():
    before = _rss()
    kv = lazy_zeros((64, 1024, 1024), torch.bfloat16)  # 128 MiB
    assert kv.shape == (64, 1024, 1024) and kv.dtype == torch.bfloat16
    assert float(kv[17, 3].abs().sum()) == 0.0
    assert _rss() - before < 16 * MIB
    kv[0].fill_(1.0)  # written pages do count
    assert _rss() - before >= 1 * MIB


def test_shared_deepcopy_aliases_parked_and_lazy_tensors_only(tmp_path):
    with WeightSpool(tmp_path) as spool:
        w = nn.Parameter(spool.park(torch.randn(256, 256)), requires_grad=False)
        kv = lazy_zeros((1024, 64), torch.float32)
        plain = torch.randn(256, 256)
        state = {"w": w, "kv": kv, "plain": plain}
        with shared_deepcopy():
            c = copy.deepcopy(state)
        assert isinstance(c["w"], nn.Parameter) and c["w"] is not w
        assert c["w"].data_ptr() == w.data_ptr() and c["kv"].data_ptr() == kv.data_ptr()
        assert c["plain"].data_ptr() != plain.data_ptr() and torch.equal(c["plain"], plain)
        c2 = copy.deepcopy(state)  # outside the block: real copies again
        assert c2["w"].data_ptr() != w.data_ptr()


def test_low_memory_tiny_export_parked_its_weights(tiny_artifact_low_memory):
    # the fixture exported with every weight parked; the .ptd holds the eager model's bytes
    ptd = tiny_artifact_low_memory.out_dir / "model.ptd"
    index = read_ptd_index(ptd)
    checked = 0
    for key, t in tiny_artifact_low_memory.model.state_dict().items():
        if key in index and t.numel() * t.element_size() >= 4096:
            assert torch.equal(load_ptd_tensor(ptd, index[key]), t), key
            checked += 1
    assert checked > 0, sorted(index)[:5]
