"""scripts/gemv1_tile_variants.py's kernels on the CPU (Triton interpreter, one subprocess):
the planar x levels are `_quant_x_kernel`'s (computed in torch), and the lane tiles (masked, clamped, x loaded a
tile ahead, three tiles ahead, scales loaded unmasked, the slice unrolled, x's factor per group) match an fp32
matmul on the dequantized weight on a ragged shape."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = textwrap.dedent("""
    import json
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from export.kernels import int4_matmul as im
    from scripts import gemv1_tile_variants as t
    torch.manual_seed(0)
    N, K, G = 40, 640, 128  # 5 groups: no tile of rows divides N, slices of 2 groups leave one over
    x = torch.randn(1, K) * 3
    planes, pf, pc = t.quant_x(x, G, planar=True)
    planes = planes[:, : K // 8]
    # the levels in torch, as `_quant_x_kernel` computes them (fp32, the same operations)
    xg = x.view(-1, G)
    amax = xg.abs().amax(1, keepdim=True)
    tt = xg * (127.0 / amax)
    h = torch.floor(tt + 0.5)
    l = torch.floor((tt - h) * 254.0 + 0.5)
    def words(v):  # [K] int levels -> [2, K / 8] words: bytes of k = 8j + 2t (+ 1)
        b = (v.to(torch.int32).view(-1, 4, 2) & 0xFF) << (8 * torch.arange(4)).view(1, 4, 1)
        return b.sum(1).t().to(torch.int32)  # (the sum is int64: back to the int32 bit patterns)
    out = {"levels_equal": bool((planes[:2] == words(h.view(-1))).all() and (planes[2:4] == words(l.view(-1))).all()),
           "correction_equal": bool((planes[4].view(-1, G // 8).sum(1) == 16 * pc).all()
                                    and (pc == 8 * (254 * h.sum(1) + l.sum(1)).to(torch.int32)).all()),
           "factor_equal": bool((planes[5].view(torch.float32).view(-1, G // 8) == (pf / 16)[:, None]).all()
                                and (pf == amax.view(-1) / (127.0 * 254.0)).all()),
           "errs": {}}
    qweight, scales = im.quantize_int4(torch.randn(N, K), G)
    ref_w = im.dequantize_int4(qweight, scales, torch.float32)
    for v in (t.V(16, 2, 1, 1), t.V(16, 1, 1, 3, clamp=True), t.V(16, 2, 1, 2, xpre=True, clamp=True),
              t.V(16, 2, 1, 1, sasm=True), t.V(16, 2, 1, 1, sasm=True, unroll=True),
              t.V(16, 2, 1, 2, xpre=True, sasm=True, xg=True)):
        for splits in (1, 3):
            xr = torch.randn(1, K)
            y = t.path(v, xr, qweight, scales, splits, poison=True)
            ref = xr @ ref_w.t()
            out["errs"][f"{v.label}/{splits}"] = ((y - ref).norm() / ref.norm()).item()
    print(json.dumps(out))
""")


def test_lane_tiles_match_the_reference_in_the_interpreter():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["levels_equal"] and out["correction_equal"] and out["factor_equal"]
    assert len(out["errs"]) == 12
    for name, err in out["errs"].items():
        assert err <= 1e-4, (name, err)  # fp32 x: the two levels' error (~1e-5) and fp32 rounding
