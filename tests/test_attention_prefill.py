"""Prefill attention with q . k as a GEMM over D chunks (`gemma4::attention`'s configs with DK > 0,
export/kernels/attention.py): agreement with the fp32 reference at head_dim 512 in the Triton
interpreter (flat caches, a wrapped ring, a chunk's own K/V beside a window-sized ring, GQA,
each KV format, position splits), and the shared memory of the prefill configs as Triton and
ptxas compile them for sm_89 / sm_90 / sm_120 (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from export.kernels import attention as A

REPO = Path(__file__).resolve().parent.parent

INTERPRETED_DK = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import cache_args, filled_cache, ring_and_chunk
gen = torch.Generator().manual_seed(5)
worst, rel = {}, {}
D = 512
# (H, Hkv, S, window, pos, T, cfg): cfg = (BLOCK_M, BLOCK_N, warps, stages, DV, DK, DLOOP, VEARLY); fills that
# end inside a block and cross block edges, 2 / 4 / 8 query heads per KV head, a ring past wrap-around
cases = [(8, 2, 96, 0, 37, 5, (16, 16, 8, 2, 2, 64, 1, 0)),
         (8, 2, 96, 0, 0, 40, (32, 16, 8, 2, 1, 128, 0, 1)),
         (8, 1, 64, 0, 19, 7, (32, 32, 4, 2, 2, 64, 1, 1)),
         (4, 2, 24 + 9 - 1, 24, 70, 9, (16, 16, 8, 2, 2, 128, 1, 0))]
for H, Hkv, S, window, pos, T, cfg in cases:
    k, v = filled_cache(Hkv, S, D, pos + T, window > 0, gen)
    q = torch.randn(1, T, H, D, generator=gen)
    p = torch.tensor([pos])
    for kv in ("float", "int8", "int4"):
        args = cache_args(k, v, kv)
        want = A.attention_reference(q, *args, p, window)
        for target in (1, 10 ** 6) if kv == "float" else (1,):
            A.PREFILL_TARGET_PROGRAMS = target
            with A.use_prefill_config(cfg):
                got = A.launch(q, *args, p, window, False)
            key = (kv, A.prefill_splits(T, H // Hkv, Hkv, cfg[0], cfg[4]) > 1)
            worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
        if kv != "float":  # bf16 queries: the dots in fp16 on the integer codes
            A.PREFILL_TARGET_PROGRAMS = 1
            with A.use_prefill_config(cfg):
                got = A.launch(q.bfloat16(), *args, p, window, False).float()
            want = A.attention_reference(q.bfloat16().float(), *args, p, window)
            rel[kv] = max(rel.get(kv, 0.0), ((got - want).norm() / want.norm()).item())
# a chunk's own K/V beside a window-sized ring (float), shorter and longer than the window
for H, Hkv, W, pos, T, cfg in [(8, 2, 16, 40, 21, (16, 16, 8, 2, 2, 64, 1, 0)),
                               (4, 1, 24, 30, 6, (16, 32, 4, 2, 1, 128, 0, 1))]:
    ring, chunk, _ = ring_and_chunk(Hkv, W, D, pos, T, gen)
    q = torch.randn(1, T, H, D, generator=gen)
    p = torch.tensor([pos])
    want = A.attention_reference(q, *ring, None, None, p, W, *chunk)
    for target in (1, 10 ** 6):
        A.PREFILL_TARGET_PROGRAMS = target
        with A.use_prefill_config(cfg):
            got = A.launch(q, *ring, None, None, p, W, False, k_new=chunk[0], v_new=chunk[1])
        key = ("chunk beside ring", A.prefill_splits(T, H // Hkv, Hkv, cfg[0], cfg[4]) > 1)
        worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
print(worst, rel)
assert {("float", True), ("float", False), ("chunk beside ring", True), ("chunk beside ring", False)} <= set(worst)
assert max(worst.values()) <= 1e-4, worst  # fp32 sums of 512 products in another order; scores ~ 50
assert set(rel) == {"int8", "int4"} and max(rel.values()) <= 1e-2, rel
"""


def test_d_chunked_prefill_matches_reference_at_head_dim_512_in_the_interpreter():
    """DK 64 / 128, the chunk loop pipelined or unrolled, V loaded before or after q . k, one or
    two V column parts; every KV format (fp32 queries within 1e-4; bf16 queries, fp16 dots on
    the quantized codes, within 1e-2), positions in one share or several."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", INTERPRETED_DK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_d_chunked_configs_fit_consumer_shared_memory_by_the_estimate():
    """The estimate grows with the q / K chunk buffers and the V share, and admits the 64-row
    wgmma tiles at head_dim 512 that the q-in-registers path could not fit."""
    small = A.prefill_smem_bytes((64, 64, 8, 2, 2, 64, 1, 0), 512, 0)
    assert small <= A.SMEM_LIMIT
    assert A.prefill_smem_bytes((64, 64, 8, 3, 2, 64, 1, 0), 512, 0) > small  # one more chunk stage
    assert A.prefill_smem_bytes((64, 64, 8, 2, 2, 64, 1, 1), 512, 0) > small  # V beside the chunk buffers
    assert A.prefill_smem_bytes((64, 64, 8, 2, 1, 64, 1, 0), 512, 0) > small  # the whole V tile
    assert A.prefill_smem_bytes((64, 32, 4, 2, 2), 512, 0) > A.SMEM_LIMIT  # q held: 64 KiB of q alone


def test_a_split_d_chunked_launch_takes_v_in_parts_small_enough_for_its_fp32_partials():
    dv, splits = A.prefill_parts(128, 8, 4, 512, 64, 1, 64)  # 64 row-block programs: positions split
    assert splits > 1 and dv == 2 and 64 * 512 // dv * 4 <= A.PREFILL_PARTIAL_BYTES
    assert A.prefill_parts(2048, 8, 4, 512, 64, 1, 64) == (1, 1)  # no split: V whole
    assert A.prefill_parts(256, 8, 4, 512, 128, 2, 64) == (2, 1)  # 4 parts would leave one share: 2, unsplit
    assert A.prefill_parts(object(), 8, 4, 512, 64, 1, 64) == (1, 1)  # a symbolic chunk never splits
    assert A.prefill_parts(128, 8, 4, 512, 32, 2, 0) == (2, A.prefill_splits(128, 8, 4, 32, 2))  # q held: as is


PREFILL_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from export.kernels import attention as A

fn = A._prefill_body
elt = {0: "*bf16", 1: "*i8", 2: "*u8"}
cfgs = [(fmt, cfg) for (D, fmt), cfg in A.PREFILL_CONFIG.items() if D == 512]
cfgs += [(fmt, (64, 64, 8, 2, 2, 64, 1, 0)) for fmt in (0, 1, 2)]  # a D-chunked config on every format
for arch in map(int, sys.argv[1:]):
    for (fmt, cfg), split in [(c, split) for c in cfgs for split in (False, True)]:
        bm, bn, warps, stages, dv, dk, dloop, vearly = (*cfg, 0, 0, 0)[:8]
        if split:  # a chunk of 128 queries: positions in shares, fp32 partials (V parts as launch takes them)
            dv, splits = A.prefill_parts(128, 8, 4, 512, bm, dv, dk)
            assert splits > 1, (cfg, splits)
        ptrs = dict(Q="*bf16", K=elt[fmt], V=elt[fmt], KS="*fp16", VS="*fp16", KN="*bf16", VN="*bf16", POS="*i64",
                    O="*bf16", MP="*fp32", LP="*fp32", AP="*fp32")
        consts = dict(G=8, D=512, KV_FMT=fmt, DV=dv, SPLIT=split, FP32=False, INTERPRET=False, BLOCK_M=bm,
                      BLOCK_N=bn, FRESH=False, DK=dk, DLOOP=dloop, VEARLY=vearly)
        sig = {n: ptrs.get(n, "i32") for n in fn.arg_names if n not in consts}
        # as launched: pointers and the strides / sizes the 31B has are multiples of 16
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig
                 if n not in ("T", "WINDOW", "NUM_SPLITS")}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        print(arch, fmt, "-".join(map(str, cfg)), split, k.metadata.shared)
"""


def test_prefill_kernels_compile_for_consumer_cards_within_shared_memory():
    """The head_dim-512 prefill configs (and a D-chunked one for every KV format) compiled by
    Triton + ptxas for sm_89, sm_90 and sm_120 with no GPU present, writing the output or (a short
    static chunk) fp32 partials: the compiler accepts them and the shared memory it reports fits
    the consumer cards' limit (a D-chunked config's partial tile of 64 x 512 fp32 alone would not)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", PREFILL_COMPILE, "89", "90", "120"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.strip().splitlines()]
    n = sum(D == 512 for D, _ in A.PREFILL_CONFIG) + 3
    assert len(lines) == 3 * 2 * n, r.stdout
    assert all(int(shared) <= A.SMEM_LIMIT for *_, shared in lines), r.stdout
