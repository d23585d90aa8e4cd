"""scripts/gemv1_grid_variants.py's stream-K kernel on the CPU (Triton interpreter, one subprocess): a
fixed grid whose programs each take an equal run of the weight's steps across row blocks, the blocks
they share summed by the last of them, matches an fp32 matmul on the dequantized weight and repeats
bitwise."""

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
    from scripts import gemv1_grid_variants as g
    torch.manual_seed(0)
    errs, same = {}, True
    # ragged N; one program over every row block, blocks shared by several programs, more programs
    # than steps (clamped); two steps ahead; group 64; an all-zero group of x
    for N, K, G, bn, gr, ahead, programs in [(40, 1024, 128, 16, 2, 1, 1), (40, 1024, 128, 16, 2, 1, 5),
                                             (33, 640, 64, 8, 1, 2, 7), (24, 768, 128, 16, 2, 2, 100)]:
        qweight, scales = im.quantize_int4(torch.randn(N, K), G)
        x = torch.randn(1, K)
        x[0, :G] = 0
        ys = [g.int4_gemv1_stream(x, qweight, scales, block_n=bn, groups_per_step=gr, num_warps=1, ahead=ahead,
                                  programs=programs) for _ in range(2)]
        ref = x @ im.dequantize_int4(qweight, scales, torch.float32).t()
        errs[f"{N}x{K}/g{G}/{bn}x{gr}a{ahead}/P{programs}"] = ((ys[0] - ref).norm() / ref.norm()).item()
        same = same and torch.equal(ys[0], ys[1])
    print(json.dumps({"errs": errs, "same": same}))
""")


def test_stream_k_gemv_matches_the_reference_in_the_interpreter():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["errs"]) == 4 and out["same"]
    for name, err in out["errs"].items():
        assert err <= 1e-4, (name, err)  # fp32 x: the two levels' error (~1e-5) and fp32 rounding
