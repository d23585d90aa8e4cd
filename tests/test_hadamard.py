"""`gemma4::hadamard`: the reference is the orthonormal matrix, the Triton kernel is the reference
(bitwise in fp32 under the interpreter and on CUDA), the kernel compiles for the consumer cards,
and a quantized-KV model's graph carries one op per rotation (q, k and v joined at decode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.kernels import hadamard as Hd

REPO = Path(__file__).resolve().parents[1]


def test_reference_is_the_orthonormal_matrix_and_its_own_inverse():
    x = torch.randn(3, 5, 256, dtype=torch.float64).float()
    y = Hd.hadamard_reference(x)
    assert torch.allclose(y, x @ Hd.hadamard(256), atol=1e-5)
    assert torch.allclose(Hd.hadamard_reference(y), x, atol=1e-5)
    h = Hd.hadamard(8, dtype=torch.float64)
    assert torch.allclose(h @ h, torch.eye(8, dtype=torch.float64)) and torch.equal(h, h.T)


def test_op_on_cpu_is_the_reference_and_checks_its_last_dim():
    x = torch.randn(2, 1, 4, 512, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.gemma4.hadamard(x), Hd.hadamard_reference(x))
    assert torch.equal(Hd.hadamard_rotate(x), Hd.hadamard_reference(x))
    with pytest.raises(ValueError, match="power of two"):
        Hd.launch(torch.randn(3, 48))


def test_fake_output_is_laid_out_as_the_kernels_write_it():
    """A transposed view in (the model rotates K / V as (1, Hkv, T, D) views): contiguous out, for the
    fake tensor export traces with as for the kernels, else the compiled graph indexes it wrongly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(1, 3, 4, 8).transpose(1, 2)
    with FakeTensorMode() as mode:
        fake = torch.ops.gemma4.hadamard(mode.from_tensor(x))
    real = torch.ops.gemma4.hadamard(x)
    assert fake.shape == real.shape and fake.stride() == real.stride() == (96, 24, 8, 1)


INTERPRETED = r"""
import torch
from export.kernels import hadamard as Hd
gen = torch.Generator().manual_seed(0)
for D in (2, 16, 256, 512):
    for shape in ((1, 1, 5, D), (1, 4, 1, D), (Hd.block_rows(D) * 3 + 1, D)):  # rows past a block's end
        x = torch.randn(*shape, generator=gen)
        got = Hd.launch(x)
        assert got.shape == x.shape and torch.equal(got, Hd.hadamard_reference(x)), (D, shape)
        xb = x.to(torch.bfloat16)
        got, want = Hd.launch(xb), Hd.hadamard_reference(xb)
        # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: one bf16 step apart at most
        step = want.float().abs().clamp_min(1e-30) * 2.0**-7
        assert got.dtype == torch.bfloat16 and ((got.float() - want.float()).abs() <= step).all(), (D, shape)
print("ok")
"""


def test_kernel_matches_the_reference_in_the_interpreter():
    """The butterflies in registers give the reference's fp32 values bit for bit."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from export.kernels import hadamard as Hd

fn = Hd._hadamard_kernel
for arch in map(int, sys.argv[1:]):
    for D in (256, 512):
        consts = dict(D=D, LOG2D=D.bit_length() - 1, BLOCK_R=Hd.block_rows(D), PDL=2 if arch >= 90 else 0)
        sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n_rows": "i32", "scale": "fp32"}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
        print(arch, D, k.metadata.shared, len(k.asm["cubin"]))
"""


def test_kernel_compiles_for_consumer_cards_within_shared_memory():
    """Compiled by Triton + ptxas for sm_89 and sm_120 with no GPU present: a cubin, and the shared
    memory of its layout conversions fits the consumer cards."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", COMPILE, "89", "120"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.strip().splitlines()]
    assert len(lines) == 4, r.stdout
    assert all(int(shared) <= 101376 and int(cubin) > 0 for *_, shared, cubin in lines), r.stdout


def test_quantized_kv_model_rotates_through_the_op():
    """The exported graph of a model with an int8 cache holds gemma4::hadamard for each full layer and no
    butterfly stacks: at decode two calls (q, k and v joined, `rotate_rows`; the output back), for a prefill
    chunk four (q, k, v, the output) and two in a KV-shared layer (q, the output); a bf16 cache holds none."""
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model
    from export.pipeline import EXPORT_KW
    from tests.helpers import randomize_

    cfg = PRESETS["tiny"]
    counts = {}
    for kv in ("int8", None):
        model = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=8, kv_dtype=kv), seed=3).eval()
        for T in (1, 4):
            with torch.no_grad():
                ep = torch.export.export(model, (torch.zeros(1, T, dtype=torch.long), torch.tensor([3])), **EXPORT_KW)
            targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
            counts[kv, T] = (targets.count("gemma4.hadamard.default"), sum("stack" in t for t in targets))
    full = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
    shared_full = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i) and cfg.is_kv_shared(i))
    assert counts["int8", 1] == (2 * full, 0)
    assert counts["int8", 4] == (4 * full - 2 * shared_full, 0)
    assert counts[None, 1] == counts[None, 4] == (0, 0)


def test_rotate_rows_is_each_tensor_rotated():
    """`rotate_rows` (one op call for several tensors) gives each tensor's own rotation bitwise, in its shape."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, h, 64, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
    for got, x in zip(Hd.rotate_rows(q, k, v), (q, k, v)):
        assert got.shape == x.shape and torch.equal(got, Hd.hadamard_rotate(x))


@pytest.mark.cuda
def test_kernel_matches_the_reference_on_cuda():
    """Bitwise in fp32 and bf16 (round to nearest on the GPU) on fresh inputs, and within 1e-2 of the
    float64 matrix product."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for D in (256, 512):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((1, 1, 32, D), (1, 4, 1, D), (1, 2048, 8, D), (77, D)):
                x = torch.randn(*shape, generator=gen, device="cuda").to(dtype)
                got = torch.ops.gemma4.hadamard(x)
                assert not got.isnan().any()
                assert torch.equal(got, Hd.hadamard_reference(x)), (D, dtype, shape)
                want = (x.double() @ Hd.hadamard(D, torch.float64, "cuda")).float()
                assert ((got.float() - want).norm() / want.norm()).item() <= 1e-2
