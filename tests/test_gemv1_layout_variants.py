"""scripts/gemv1_layout_variants.py: the tiled re-layout round-trips and pads as it says (pure torch), the
reference sums are the per-slice sums of the words and scales, a check catches an output left unwritten, and
the load-only kernels (both layouts, every tile width and depth, ragged shapes, several K slices) reproduce
torch's sums exactly in Triton's interpreter (the script's --smoke run, one subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scripts import gemv1_layout_variants as lv


def test_tile_words_round_trips_and_pads_to_whole_tiles():
    torch.manual_seed(0)
    n, kw, bn, sw = 40, 80, 16, 32  # neither divides: 48 rows x 96 words stored
    words = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32)
    tiled = lv.tile_words(words, bn, sw)
    assert tiled.shape == (3, 3, bn, sw) and tiled.is_contiguous()
    assert torch.equal(lv.untile_words(tiled, n, kw), words)
    # a step of a row block is one contiguous run: tile (b, t) = rows b*bn.., words t*sw..
    flat = tiled.view(-1)
    b, t = 1, 1
    run = flat[(b * 3 + t) * bn * sw:(b * 3 + t + 1) * bn * sw].view(bn, sw)
    assert torch.equal(run, words[b * bn:(b + 1) * bn, t * sw:(t + 1) * sw])
    # the padding is zeros: the last row block's rows 40..47, every row's words 80..95
    assert (tiled[2, :, n - 2 * bn:] == 0).all() and (tiled[:, 2, :, kw - 2 * sw:] == 0).all()
    # the scales (int16, one a group of 16 words) tile with their own step
    scales = torch.randint(-2**15, 2**15 - 1, (n, kw // 16), dtype=torch.int16)
    st = lv.tile_words(scales, bn, sw // 16)
    assert torch.equal(lv.untile_words(st, n, kw // 16), scales)
    pad = (tiled.numel() - words.numel()) * 4 + (st.numel() - scales.numel()) * 2
    assert lv.padding_bytes(n, kw * 8, bn, sw) == pad
    # the 31B: only K 5376 at 64 words a step pads (672 -> 704 words a row, +4.8%)
    assert lv.padding_bytes(5376, 5376, 128, 64) == 5376 * 32 * 4 + 5376 * 2 * 2
    for n31, k31 in ((5376, 8192), (16384, 5376), (5376, 21504)):
        assert lv.padding_bytes(n31, k31, 128, 32) == 0


def test_reference_is_the_per_slice_sum_and_a_check_catches_an_unwritten_output():
    torch.manual_seed(0)
    wt = lv.Weight(5, 5 * lv.GROUP, device="cpu")  # 80 words a row, 5 scales
    ref = wt.ref(32, 2)  # 3 steps of 32 words, 2 slices: steps 0-1 (words 0..63) and step 2 (64..79)
    assert ref.shape == (2, 5)
    for j, (w0, w1) in enumerate(((0, 64), (64, 80))):
        for r in range(5):
            tot = sum(int(v) for v in wt.words[r, w0:w1])
            tot = (tot + sum(int(v) & 0xFFFF for v in wt.scales[r, w0 // 16:w1 // 16])) & 0xFFFFFFFF
            assert int(ref[j, r]) == (tot - 2**32 if tot >= 2**31 else tot)
    wt.launch = lambda v, splits, out: None  # a kernel that writes nothing
    assert not wt.check(lv.Variant("rows", 16, 32, 1, 1), 2)


def test_load_only_kernels_sum_exactly_in_the_interpreter(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "scripts.gemv1_layout_variants", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    doc = json.loads(out.read_text())
    assert doc["checks_passed"] and doc["ragged"]["checks"] == 3 * 18 and not doc["ragged"]["bad"]
    rows = doc["rows"]
    assert rows and all(r["ok"] for r in rows)
    seen = {(r["shape"], r["layout"], r["step_w"], r["ahead"]) for r in rows}
    assert len(seen) == 2 * 2 * 3 * 3  # two shapes (one ragged), both layouts, every tile width and depth
    assert any(r["splits"] > 1 for r in rows)
    assert any(r["padding_bytes"] > 0 for r in rows if r["shape"] == "tiny.ragged")
    assert [s["shape"] for s in doc["summary"]] == ["tiny.ragged", "tiny"]
