"""scripts/chain_variants.py without a GPU: under Triton's interpreter its chain kernel (a sliding layer's o
projection, norm, gate / up, activation and down) agrees with the fp32 chain, one launch a phase and as one
persistent launch (one program: its grid-wide barriers pass at once there), the two bitwise equal (the same
sums in the same order), the barriers' counters back at 0 after the launch and no barrier flagged."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import scripts.triton_interpreter  # noqa: F401  (before any kernel module)
    import torch
    from scripts import chain_variants as cv
    from scripts.gemv1_variants import launch_directly, rel

    launch_directly("test")
    torch.manual_seed(0)
    shape = cv.SHAPES["tiny"]
    w, ref = cv.make_weights(shape)
    x = torch.randn(1, shape[1], dtype=torch.bfloat16)
    wn = (1.0 + 0.5 * torch.rand(shape[0])).to(torch.bfloat16)
    want = cv.reference(x, wn, ref)
    sep = cv.Chain(8, 2, 2, 1, False)(x, wn, w, poison=True).clone()
    persist_chain = cv.Chain(8, 2, 2, 1, True)
    persist = persist_chain(x, wn, w, poison=True)
    _, _, bar, flag = persist_chain.buffers(x, w)
    print("sep", rel(sep, want))
    print("persist", rel(persist, want))
    print("equal", int(torch.equal(sep, persist)), "counters", bar.tolist(), "flag", int(flag.item()))
""")


def test_chain_kernel_through_the_interpreter():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines() if ln.strip()}
    assert float(out["sep"][0]) <= 2e-2 and float(out["persist"][0]) <= 2e-2, r.stdout
    assert out["equal"][0] == "1", r.stdout
    assert out["equal"][2:] == ["[0,", "0,", "0,", "0]", "flag", "0"], r.stdout
