"""gemma4::attention (export/kernels/attention.py): the eager reference against the model's
previous masked-SDPA attention, the Triton kernels through the Triton interpreter, config
shared-memory bounds, quantized KV, the kv_dtype model option and planner, and (CUDA) the
compiled kernels with the consumer config set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from export.kernels import attention as A

REPO = Path(__file__).resolve().parent.parent


def masked_sdpa(q, keys, values, pos, window, ring):
    """The model's attention before the custom op: mask from slot positions, GQA folded into
    the query axis, aten SDPA (fp32)."""
    _, T, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = H // Hkv
    positions = pos + torch.arange(T, device=q.device)
    idx = torch.arange(S, device=q.device)
    last = positions[-1]
    slot_pos = last - (last - idx) % S if ring else idx
    qp, kp = positions[:, None], slot_pos[None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window:
        mask = mask & (qp - kp < window)
    qq = q.transpose(1, 2).contiguous().view(1, Hkv, G * T, D)
    out = F.scaled_dot_product_attention(qq, keys, values, attn_mask=mask.repeat(G, 1)[None, None], scale=1.0)
    return out.contiguous().view(1, H, T, D).transpose(1, 2)


def filled_cache(Hkv, S, D, n, ring, gen):
    """Cache after writing positions 0..n-1 (slot p % S on a ring), garbage in unwritten slots."""
    k = torch.randn(1, Hkv, S, D, generator=gen)
    v = torch.randn(1, Hkv, S, D, generator=gen)
    for p in range(n):
        s = p % S if ring else p
        k[:, :, s] = torch.randn(Hkv, D, generator=gen)
        v[:, :, s] = torch.randn(Hkv, D, generator=gen)
    return k, v


def ring_and_chunk(Hkv, W, D, pos, T, gen):
    """K/V of positions pos - W .. pos + T - 1 laid out as the model keeps them now, a ring of W
    slots holding those before pos plus the chunk's own (1, Hkv, T, D), and as one ring of
    W + T - 1 slots holding every position a query sees. Returns (ring, chunk, whole) pairs."""
    p = torch.arange(pos - W, pos + T)
    kv = [torch.randn(1, Hkv, W + T, D, generator=gen) for _ in range(2)]
    ring = [torch.randn(1, Hkv, W, D, generator=gen) for _ in range(2)]  # noise where nothing was written
    whole = [torch.randn(1, Hkv, W + T - 1, D, generator=gen) for _ in range(2)]
    before, seen = (p >= 0) & (p < pos), (p >= 0) & (p > pos - W)
    for r, w, x in zip(ring, whole, kv):
        r[:, :, p[before] % W] = x[:, :, before]
        w[:, :, p[seen] % (W + T - 1)] = x[:, :, seen]
    return ring, [x[:, :, W:] for x in kv], whole


@pytest.mark.parametrize("T", [1, 5, 8, 21, 40])
def test_reference_with_the_chunks_own_kv_matches_one_ring_holding_everything(T):
    """A chunk (shorter or longer than the window) attending a window-sized ring plus its own K/V
    gives what it gave over a ring of window + T - 1 slots holding both (masked SDPA)."""
    gen = torch.Generator().manual_seed(T)
    H, Hkv, D, W = 4, 2, 16, 8
    for pos in (0, 3, 8, 29):
        ring, chunk, whole = ring_and_chunk(Hkv, W, D, pos, T, gen)
        q = torch.randn(1, T, H, D, generator=gen)
        p = torch.tensor([pos])
        want = masked_sdpa(q, *whole, p, W, ring=True)
        got = A.attention_reference(q, *ring, None, None, p, W, *chunk)
        assert ((got - want).norm() / want.norm()).item() <= 1e-5, (T, pos)
        assert torch.ops.gemma4.attention(q, *ring, None, None, p, W, *chunk).equal(got)  # the op's CPU kernel


# (H, Hkv, D, S, window): tiny-like rings and flat caches, GQA 2..8, head dims 16..512
CASES = [(4, 2, 16, 15, 8), (4, 1, 32, 64, 0), (8, 2, 64, 40, 24), (32, 4, 512, 48, 0), (32, 16, 256, 23, 16)]


def inv_freq(D: int, fraction: float = 1.0) -> torch.Tensor:
    """RoPE inverse frequencies as the model builds them (model.rope_inv_freq), theta 10000."""
    from export.gemma4.model import rope_inv_freq

    return rope_inv_freq(D, 10000.0, fraction)


def raw_rows(H: int, Hkv: int, D: int, case: str, gen, **kw) -> tuple:
    """(q_raw, k_raw, v_raw, q_w, k_w) of `attention_rows` for `case`: "qkv" (all three), "keqv" (V from K's
    rows) or "q" (a KV-shared layer: q only); norm weights away from 1."""
    q = torch.randn(1, 1, H * D, generator=gen, **kw) * 3
    k = torch.randn(1, 1, Hkv * D, generator=gen, **kw) * 2
    v = torch.randn(1, 1, Hkv * D, generator=gen, **kw)
    qw, kw_ = (torch.rand(D, generator=gen, **kw) + 0.5 for _ in range(2))
    return {"qkv": (q, k, v, qw, kw_), "keqv": (q, k, None, qw, kw_), "q": (q, None, None, qw, None)}[case]


INTERPRETED_ROWS = r"""
import itertools
import os
import torch
from export.kernels import attention as A
from tests.test_attention import filled_cache, inv_freq, raw_rows
cm = A.use_configs(A.smallest); cm.__enter__()
gen = torch.Generator().manual_seed(0)
worst = {}
# (H, Hkv, D, S, window, pos, rotary fraction): rings before / after wrap, flat caches at fill 1 and further
# Each shape runs a quarter of the 24 (splits, early, case) combinations, every split count, both early values
# and every case among them; the six shapes together run each combination at least once (the interpreter
# takes ~2.5 s a launch on two cores: the full product was 144 launches).
combos = list(itertools.product((1, 3, 7, 100), "01", ("qkv", "keqv", "q")))
for i, (H, Hkv, D, S, window, pos, frac) in enumerate([(4, 2, 16, 15, 8, 3, 1.0), (4, 2, 16, 15, 8, 37, 1.0),
                                                       (8, 2, 32, 300, 0, 290, 0.25), (8, 1, 32, 40, 24, 70, 1.0),
                                                       (8, 2, 32, 300, 0, 0, 1.0), (4, 1, 16, 24, 24, 9, 1.0)]):
    for splits, early, case in combos[i % 4::4]:
        # splits 100: the combine reads the used shares only (ACTIVE, SKIP); early: the first block's tiles
        # loaded before the wait (EARLY)
        A.decode_splits = lambda *a, s=splits: s
        os.environ[A.ROWS_EARLY_ENV] = early
        assert A.rows_early(D) == (early == "1")
        k, v = filled_cache(Hkv, S, D, pos + 1, window > 0, gen)
        args = raw_rows(H, Hkv, D, case, gen)
        p = torch.tensor([pos])
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        want = A.rows_reference(*args, inv_freq(D, frac), k1, v1, p, window, 1e-6)
        got = A.rows_launch(*args, inv_freq(D, frac), k2, v2, p, window, 1e-6)
        assert (k1 != k).any() == (case != "q")  # the step's K written, or nothing
        key = (case, splits, early)
        worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item(), (k1 - k2).abs().max().item(),
                         (v1 - v2).abs().max().item())
print(worst)
assert max(worst.values()) <= 2e-5, worst
"""


def test_decode_from_the_raw_rows_matches_the_model_ops_in_the_interpreter():
    """`attention_rows`' kernels (q / k norms and RoPE, v's norm, the step's K / V written at pos's slot and taken
    from the rows by the share holding pos) against the model's ops then `attention` (rows_reference): outputs and
    both caches, one to seven shares, rings and flat caches, K / V / q rows, V from K's rows, q's alone."""
    run_interpreted(INTERPRETED_ROWS)


def rows_switch_logits(preset: str) -> dict:
    """{"0", "1"}: a tiny preset's logits (random weights, norms and layer scalars perturbed) over a chunk of 8 and
    22 decode steps, with the rows' switch (GEMMA4_ATTENTION_ROWS) off and on; the model set to CUDA's ops
    (`set_target`: the switch is CUDA's only) while it runs on the CPU, as a low-memory export traces it."""
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Gemma4Model(cfg, ctx=48, prefill_chunk=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for layer in model.layers:
            layer.layer_scalar.fill_(0.7)
    model.init_buffers()
    model.set_target("cuda")
    tokens = torch.randint(0, cfg.vocab_size, (1, 30))
    logits = {}
    for on in ("0", "1"):
        os.environ[A.ATTENTION_ROWS_ENV] = on
        model.reset_cache()
        with torch.no_grad():
            steps = [model(tokens[:, :8], torch.tensor([0]))]
            steps += [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(8, 30)]
        logits[on] = torch.stack(steps)
    return logits


def test_rows_switch_picks_layers_by_their_q_prologue(monkeypatch):
    """Unset (or "auto"), the rows go to a CUDA layer whose programs norm and rotate at most ROWS_AUTO_MAX_Q q
    elements (q heads per KV head x head dim: the 31B's and 26B-A4B's sliding layers, 2 x 256), not to E2B's /
    E4B's (8 / 4 x 256) nor to full layers (x 512); "1" and "0" decide for every layer; never on the CPU. Through
    the model: the 31B's sliding layer takes them, its full layer (bf16 cache) and E2B's sliding layer do not."""
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for switch in (None, "auto"):
        if switch is None:
            monkeypatch.delenv(A.ATTENTION_ROWS_ENV, raising=False)
        else:
            monkeypatch.setenv(A.ATTENTION_ROWS_ENV, switch)
        assert A.attention_rows_on(cuda, A.ROWS_AUTO_MAX_Q) and not A.attention_rows_on(cuda, A.ROWS_AUTO_MAX_Q + 1)
        assert not A.attention_rows_on(cuda, None) and not A.attention_rows_on(cpu, 32)
        taken = {}
        for preset in ("31b", "e2b"):
            cfg = PRESETS[preset]
            with torch.device("meta"):
                model = Gemma4Model(cfg, ctx=64, prefill_chunk=8, dtype=torch.bfloat16, kv_dtype="bf16")
            model.set_target("cuda")
            for i in (0, cfg.layer_types.index("full_attention")):
                attn = model.layers[i].self_attn
                cache = model.caches()[i]
                taken[preset, cfg.is_sliding(i)] = attn._takes_rows(1, cache, cuda)
        assert taken == {("31b", True): True, ("31b", False): False, ("e2b", True): False, ("e2b", False): False}
    for switch, want in (("1", True), ("0", False)):
        monkeypatch.setenv(A.ATTENTION_ROWS_ENV, switch)
        assert A.attention_rows_on(cuda, 4096) is want and A.attention_rows_on(cuda, 32) is want
        assert not A.attention_rows_on(cpu, 32)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_model_decode_through_the_raw_rows_op_gives_the_same_logits(preset, monkeypatch):
    """The model with the rows' switch on (its CPU kernel: the same aten ops; the model set to CUDA's ops, traced on
    the CPU as a low-memory export does) decodes to the same logits as with it off, bit for bit, through every layer
    kind the preset has (sliding, full, V from K, KV-shared)."""
    from export.gemma4.config import PRESETS

    monkeypatch.setenv(A.ATTENTION_ROWS_ENV, "0")  # (restored after the test: the helper sets it)
    cfg = PRESETS[preset]
    calls = []
    real = A.rows_reference
    monkeypatch.setattr(A, "rows_reference", lambda *a: calls.append(a[1] is None) or real(*a))
    logits = rows_switch_logits(preset)
    assert len(calls) == 22 * cfg.num_hidden_layers and any(calls) == any(map(cfg.is_kv_shared, range(
        cfg.num_hidden_layers)))
    assert torch.equal(logits["0"], logits["1"])


INTERPRETED_MODEL_ROWS = r"""
from export.gemma4.config import PRESETS
from export.kernels import attention as A
from tests.test_attention import rows_switch_logits

launches = []
A.rows_reference = lambda *a: launches.append(1) or A.rows_launch(*a)  # the ops' CPU kernel: the CUDA path's launch
cm = A.use_configs(A.smallest); cm.__enter__()
for preset in ("tiny", "tiny-moe"):
    launches.clear()
    logits = rows_switch_logits(preset)
    rel = ((logits["0"] - logits["1"]).norm() / logits["0"].norm()).item()
    print(preset, rel)
    assert len(launches) == 22 * PRESETS[preset].num_hidden_layers, (preset, len(launches))  # every layer, every step
    assert rel <= 1e-5, (preset, rel)
"""


def test_model_decode_through_the_rows_kernels_in_the_interpreter():
    """The tiny models (every layer kind: sliding rings past their wrap, full, V from K, KV-shared) decoding with the
    rows' switch on, the ops running the CUDA path's kernels (`rows_launch`) in the interpreter, in the model's own
    context (its views and strides of the projection's rows, partial RoPE, its caches), against the switch off:
    logits within fp32 roundings (2e-6 when written)."""
    run_interpreted(INTERPRETED_MODEL_ROWS)


@pytest.mark.cuda
def test_cuda_decode_from_the_raw_rows_in_bf16():
    """`attention_rows` on the GPU in bf16 at the real layers' shapes (E2B's sliding and full layers, the 31B's
    sliding one), small and large fills, against the model's ops in fp32 on the same bf16 rows, within 1e-2 of the
    distance the model's own bf16 ops are from them (random q / k give scores of std ~sqrt(D): a sharp softmax, and
    bf16 alone is up to ~3% off there; H100, 2026-12-06: the kernel at most 0.023 where the bf16 ops are 0.028, and
    0.0096 where they are 0.0025); the step's K / V in the cache as the model's bf16 ops write them (within an ulp
    of K), no other slot touched."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for H, Hkv, D, S, window, frac in [(8, 1, 256, 512, 512, 1.0), (8, 1, 512, 8192, 0, 0.25),
                                       (32, 16, 256, 1024, 1024, 1.0)]:
        for pos in (0, 40, 3000):
            for case in ("qkv", "keqv", "q"):
                k = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
                v = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
                args = raw_rows(H, Hkv, D, case, gen, device=dev, dtype=torch.bfloat16)
                p = torch.tensor([pos], device=dev)
                inv = inv_freq(D, frac).to(dev)
                k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
                want = A.rows_reference(*[a.float() if a is not None else None for a in args], inv, k1.float(),
                                        v1.float(), p, window, 1e-6)
                ref_k, ref_v = k.clone(), v.clone()  # (bf16 ops: the cache as they write it)
                base = A.rows_reference(*args, inv, ref_k, ref_v, p, window, 1e-6)  # the model's bf16 ops
                got = A.rows_launch(*args, inv, k2, v2, p, window, 1e-6)
                err, base_err = (((t.float() - want).norm() / want.norm()).item() for t in (got, base))
                assert err <= base_err + 1e-2, (H, D, pos, case, err, base_err)
                slot = pos % S
                for c2, ref in ((k2, ref_k), (v2, ref_v)):
                    d = (c2.float() - ref.float()).abs()
                    assert d[:, :, slot].max().item() <= 0.02 * ref[:, :, slot].float().abs().max().item()
                    d[:, :, slot] = 0
                    assert d.max().item() == 0.0  # no other slot touched


@pytest.mark.parametrize("H,Hkv,D,S,window", CASES)
def test_reference_matches_masked_sdpa_through_ring_wraparound(H, Hkv, D, S, window):
    gen = torch.Generator().manual_seed(D + S)
    ring = window > 0
    chunk = S - window + 1 if ring else 8  # the model's ring: window + chunk - 1 slots
    steps = [(0, min(chunk, 5)), (5, 1), (6, chunk), (6 + chunk, 1)]
    steps += [(p, 1) for p in range(7 + chunk, 2 * S + 3 if ring else S)]  # decode far past the wrap
    worst = 0.0
    for pos, T in steps:
        k, v = filled_cache(Hkv, S, D, pos + T, ring, gen)
        q = torch.randn(1, T, H, D, generator=gen)
        p = torch.tensor([pos])
        want = masked_sdpa(q, k, v, p, window, ring)
        got = A.attention_reference(q, k, v, None, None, p, window)
        worst = max(worst, ((got - want).norm() / want.norm()).item())  # relative, fp32
        assert torch.ops.gemma4.attention(q, k, v, None, None, p, window).equal(got)  # the op's CPU kernel
    assert worst <= 1e-5


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantize_roundtrip_and_packing(kv):
    x = torch.randn(2, 3, 7, 64)
    codes, scale = A.quantize_kv(x, kv)
    assert codes.dtype == (torch.int8 if kv == "int8" else torch.uint8) and scale.dtype == torch.float16
    assert codes.shape[-1] == (64 if kv == "int8" else 32) and scale.shape == x.shape[:-1]
    back = A.dequantize_kv(codes, scale, torch.float32)
    step = scale.float()[..., None]
    assert ((back - x).abs() <= 0.5 * step + 1e-3 * x.abs()).all()  # within half a step (+ fp16 scale)
    if kv == "int4":  # byte j: d = 2j low nibble, 2j + 1 high nibble, each code + 8
        q = torch.round(x / step).clamp(-7, 7)
        assert ((codes & 15).int() - 8).equal(q[..., 0::2].int())
        assert ((codes >> 4).int() - 8).equal(q[..., 1::2].int())


q_int8_levels = A.q_int8_levels  # the scripts below import it from here


def cache_args(k, v, kv):
    """The op's (k, v, k_scale, v_scale) for a float cache, or one quantized as `kv`."""
    if kv == "float":
        return k, v, None, None
    (kq, ks), (vq, vs) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
    return kq, vq, ks, vs


def run_interpreted(script: str, timeout: int = 600) -> None:
    """`script` in a fresh Python with Triton's interpreter on (the repo on its path); fails the test with
    its output if it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def decode_cases(cases, gen):
    """(q, cache args, pos, window, kv, reference) for each (H, Hkv, D, S, window, pos) of `cases` (a ring
    where window > 0) and every KV format: a decode step over a freshly filled cache."""
    for H, Hkv, D, S, window, pos in cases:
        k, v = filled_cache(Hkv, S, D, pos + 1, window > 0, gen)
        q = torch.randn(1, 1, H, D, generator=gen)
        p = torch.tensor([pos])
        for kv in ("float", "int8", "int4"):
            args = cache_args(k, v, kv)
            yield q, args, p, window, kv, A.attention_reference(q, *args, p, window)


def test_every_config_fits_consumer_shared_memory():
    for D in (16, 32, 256, 512):
        for fmt in (0, 1, 2):
            fit = A.fitting(A._DECODE_ALL, D, fmt)
            assert fit, (D, fmt)  # something always compiles
            for c in fit:
                assert A.smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, D, fmt,
                                    vwords=c.kwargs["VWORDS"], vsplit=c.kwargs["VSPLIT"]) <= A.SMEM_LIMIT == 101376
    for (D, fmt), cfg in A.DECODE_CONFIG.items():  # the measured configs, with their knobs, fit (else unused)
        c = A.decode_config(D, fmt)
        assert (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == tuple(cfg), (D, fmt, cfg)
        assert A.smem_bytes(16, c.kwargs["BLOCK_N"], c.num_stages, D, fmt, vwords=c.kwargs["VWORDS"],
                            vsplit=c.kwargs["VSPLIT"]) <= A.SMEM_LIMIT, (D, fmt, cfg)


def test_prefill_configs_fit_consumer_shared_memory():
    for D in (16, 32, 256, 512):
        for fmt in (0, 1, 2):
            cfg = A.prefill_config(D, fmt)
            assert A.prefill_smem_bytes(cfg, D, fmt) <= A.SMEM_LIMIT == 101376, (D, fmt, cfg)
            assert D // cfg[4] >= 16 and cfg[0] >= 16  # tl.dot's smallest operand
    for (D, fmt), cfg in A.PREFILL_CONFIG.items():
        assert A.prefill_smem_bytes(cfg, D, fmt) <= A.SMEM_LIMIT, (D, fmt, cfg)


def test_prefill_splits_only_for_a_static_chunk_with_few_row_blocks():
    t = A.PREFILL_TARGET_PROGRAMS
    assert A.prefill_splits(128, 8, 4, 64, 2) == max(1, min(A.PREFILL_MAX_SPLITS, t // 128))  # 128 programs
    assert A.prefill_splits(2048, 8, 4, 64, 2) == 1
    assert A.prefill_splits(object(), 8, 4, 64, 2) == 1  # a symbolic (non-int) T: one share


def test_decode_splits_are_static_and_bounded():
    t = A.TARGET_PROGRAMS
    assert A.decode_splits(131072, 4) == t // 4 and A.decode_splits(1151, 16) == min(t // 16, 72)
    assert A.decode_splits(15, 2) == 1


INTERPRETED = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import cache_args, filled_cache
cm = A.use_configs(A.smallest); cm.__enter__()
pm = A.use_prefill_config((16, 16, 4, 1, 2)); pm.__enter__()
gen = torch.Generator().manual_seed(0)
worst = {}
# (H, Hkv, D, S, window, pos, T): rings before / after wrap, flat caches with several decode splits
for H, Hkv, D, S, window, pos, T in [(4, 2, 16, 15, 8, 3, 1), (4, 2, 16, 15, 8, 37, 1), (4, 2, 16, 15, 8, 30, 8),
                                     (8, 2, 32, 300, 0, 290, 1), (8, 2, 32, 300, 0, 100, 7), (8, 1, 32, 40, 24, 70, 1)]:
    ring = window > 0
    k, v = filled_cache(Hkv, S, D, pos + T, ring, gen)
    q = torch.randn(1, T, H, D, generator=gen)
    p = torch.tensor([pos])
    for kv in ("float", "int8", "int4"):
        args = cache_args(k, v, kv)
        want = A.attention_reference(q, *args, p, window)
        for decode in ([True, False] if T == 1 else [False]):
            got = A.launch(q, *args, p, window, decode)
            worst[kv] = max(worst.get(kv, 0.0), (got - want).abs().max().item())
print(worst)
assert max(worst.values()) <= 2e-5, worst
"""


def test_triton_kernels_match_reference_in_the_interpreter():
    """Decode (several splits + combine) and prefill kernels, every KV format, on CPU."""
    run_interpreted(INTERPRETED)


INTERPRETED_ONE_SHARE = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import decode_cases
cm = A.use_configs(A.smallest); cm.__enter__()
launched = []
real_combine = A._combine
class Spy:  # records a combine launch
    def __getitem__(self, grid):
        launched.append(grid)
        return real_combine[grid]
A._combine = Spy()
gen = torch.Generator().manual_seed(4)
worst = {}
for splits in (1, 3):
    A.decode_splits = lambda *a, splits=splits: splits
    launched.clear()
    # a flat cache, a wrapped ring, a ring before wrap-around; every KV format
    for q, args, p, window, kv, want in decode_cases([(8, 2, 32, 300, 0, 290), (4, 1, 16, 24, 24, 70),
                                                      (4, 2, 16, 24, 24, 9)], gen):
        got = A.launch(q, *args, p, window, True)
        worst[(splits, kv)] = max(worst.get((splits, kv), 0.0), (got - want).abs().max().item())
    assert bool(launched) == (splits > 1), (splits, launched)
print(worst)
assert max(worst.values()) <= 2e-5, worst
"""


def test_decode_with_one_share_writes_its_output_without_a_combine():
    """Decode with one share per KV head: the split kernel writes the output and no combine runs;
    with three shares the combine runs. Both against the reference, every KV format, flat cache
    and rings (the Triton interpreter, CPU)."""
    run_interpreted(INTERPRETED_ONE_SHARE)


INTERPRETED_ACTIVE_SHARES = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import decode_cases
cm = A.use_configs(A.smallest); cm.__enter__()
gen = torch.Generator().manual_seed(6)
A.decode_splits = lambda *a: 7
worst = {}
# a flat cache filled to a few positions (most shares empty) and further, a wrapped ring, every KV format
# each shape runs all six (ACTIVE, shares slowest, SKIP) settings, two with each KV format (the interpreter
# takes seconds a launch)
FLAGS = ((False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, False, True),
         (True, True, True))
KV_FORMATS = ("float", "int8", "int4")
for q, args, p, window, kv, want in decode_cases([(8, 2, 32, 300, 0, 5), (8, 2, 32, 300, 0, 40),
                                                  (8, 2, 32, 300, 0, 290), (4, 1, 16, 24, 24, 70)], gen):
    for active, slowest, skip in FLAGS[KV_FORMATS.index(kv)::3]:
        got = A.launch(q, *args, p, window, True, active=active, shares_slowest=slowest, combine_skip=skip)
        key = (active, slowest, skip, kv)
        worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
print(worst)
assert max(worst.values()) <= 2e-5, worst

# more shares than the combine's first chunk (100, padded to 128, chunks of 64 at D 64): at fill 40 the used
# shares fit the first chunk (SKIP reads only it), at 4900 they do not (77 shares of 64 positions: every share
# in one round)
A.decode_splits = lambda *a: 100
worst = {}
# (the float cache only, with SKIP: the formats differ in the split kernel, not in the partials the combine reads;
# a launch at fill 4900 takes ~15 s in the interpreter)
for q, args, p, window, kv, want in decode_cases([(4, 2, 64, 5000, 0, 40), (4, 2, 64, 5000, 0, 4900)], gen):
    if kv == "float":
        got = A.launch(q, *args, p, window, True, active=True, shares_slowest=True, combine_skip=True)
        worst[int(p)] = (got - want).abs().max().item()
print(worst)
assert max(worst.values()) <= 2e-5, worst

# the combine alone: shares past the count the position gives hold garbage partials (l = 1, a large m, acc
# 1e4); read only with ACTIVE 0
G, D, NS, unit = 2, 16, 6, 4
pos = torch.tensor([9])  # 10 positions in shares of 4 (min 1 unit): 3 shares used
mp = torch.randn(NS * G)
lp = torch.rand(NS * G) + 0.5
ap = torch.randn(NS * G * D)
mp.view(NS, G)[3:] = 50.0
lp.view(NS, G)[3:] = 1.0
ap.view(NS, G, D)[3:] = 1.0e4
w = torch.exp(mp.view(NS, G)[:3] - mp.view(NS, G)[:3].max(0).values)
want = (w[:, :, None] * ap.view(NS, G, D)[:3]).sum(0) / (w * lp.view(NS, G)[:3]).sum(0)[:, None]
for active, chunk, skip in ((1, 8, 0), (0, 8, 0), (1, 4, 1), (1, 2, 1)):  # SKIP: chunks past the used shares not run
    out = torch.empty(1, 1, G, D)
    A._combine[(G, 1)](mp, lp, ap, out, out.stride(2), NS, G=G, D=D, SPLITS_P2=8, CHUNK=chunk, BLOCK_D=D, EAGER=1,
                       POS=pos, WINDOW=0, ACTIVE=active, SHARE_UNIT=unit, SKIP=skip)
    err = (out[0, 0] - want).abs().max().item()
    print(active, chunk, skip, err)
    assert (err <= 1e-4) == bool(active), (active, chunk, skip, err)
# every share used (24 positions in shares of 4), the chunks past the first run
lp.view(NS, G)[3:] = torch.rand(NS - 3, G) + 0.5
mp.view(NS, G)[3:] = torch.randn(NS - 3, G)
ap.view(NS, G, D)[3:] = torch.randn(NS - 3, G, D)
w = torch.exp(mp.view(NS, G) - mp.view(NS, G).max(0).values)
want = (w[:, :, None] * ap.view(NS, G, D)).sum(0) / (w * lp.view(NS, G)).sum(0)[:, None]
for chunk, skip in ((8, 0), (4, 1), (2, 1)):
    out = torch.empty(1, 1, G, D)
    A._combine[(G, 1)](mp, lp, ap, out, out.stride(2), NS, G=G, D=D, SPLITS_P2=8, CHUNK=chunk, BLOCK_D=D, EAGER=1,
                       POS=torch.tensor([23]), WINDOW=0, ACTIVE=1, SHARE_UNIT=unit, SKIP=skip)
    err = (out[0, 0] - want).abs().max().item()
    print("all", chunk, skip, err)
    assert err <= 1e-4, (chunk, skip, err)
"""


def test_decode_combine_reads_only_the_shares_holding_positions():
    """Decode's combine with ACTIVE reads only the shares the position fills (their count computed as the
    split kernel cuts them): with and without it, with either grid order and with the combine reading only
    its first chunk where the used shares fit it (SKIP) or not, the output matches the reference
    (flat cache at small and large fills, a wrapped ring, every KV format; with more shares than the
    combine's first chunk, used shares that fit it and that do not); and the combine alone ignores
    garbage partials past that count with ACTIVE (its chunks past them run or not), not without, and with
    every share used sums them all in any chunking (Triton interpreter)."""
    run_interpreted(INTERPRETED_ACTIVE_SHARES)


INTERPRETED_16BIT = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import cache_args, filled_cache
cm = A.use_configs(A.smallest); cm.__enter__()
pm = A.use_prefill_config((16, 16, 4, 1, 2)); pm.__enter__()
gen = torch.Generator().manual_seed(1)
worst = {}
for H, Hkv, D, S, window, pos, T in [(8, 2, 32, 300, 0, 290, 1), (8, 2, 32, 300, 0, 100, 7), (4, 2, 16, 15, 8, 37, 1)]:
    k, v = filled_cache(Hkv, S, D, pos + T, window > 0, gen)
    q = torch.randn(1, T, H, D, generator=gen).to(torch.bfloat16)
    p = torch.tensor([pos])
    for kv in ("int8", "int4"):
        (kq, ks), (vq, vs) = A.quantize_kv(k, kv), A.quantize_kv(v, kv)
        want = A.attention_reference(q.float(), kq, vq, ks, vs, p, window)
        for decode in ([True, False] if T == 1 else [False]):
            got = A.launch(q, kq, vq, ks, vs, p, window, decode).float()
            worst[kv] = max(worst.get(kv, 0.0), ((got - want).norm() / want.norm()).item())
print(worst)
assert max(worst.values()) <= 1e-2, worst
"""


INTERPRETED_KNOBS = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import cache_args, filled_cache, q_int8_levels
cm = A.use_configs(A.smallest); cm.__enter__()
A.TARGET_PROGRAMS = 4  # two shares per KV head: each program walks several blocks
gen = torch.Generator().manual_seed(3)
KNOBS = [dict(KSPLIT=2, SCALES_AHEAD=1), dict(VWORDS=1, VSPLIT=2, KBIAS=1),
         dict(KSPLIT=4, VWORDS=1, KBIAS=1, SCALES_AHEAD=1),
         dict(KSPLIT=4, KBIAS=1, SCALES_AHEAD=1, VPAIRS=1, NIBWORDS=1, PTX=1, TAIL=1),
         dict(VPAIRS=1, NIBWORDS=1, KBIAS=1, TAIL=2), dict(KQ8=1, SCALES_AHEAD=1, VPAIRS=1, PTX=1, TAIL=2),
         dict(KQ8=1, TAIL=1), dict(KQ8=2, VPAIRS=1, PTX=1, SCALES_AHEAD=1, TAIL=2),
         dict(NIBWORDS=1, KBIAS=1, NIB16=1, SCALES_AHEAD=1, PTX=1, TAIL=2),
         dict(NIBWORDS=1, KBIAS=1, NIB16=1, TAIL=2), dict(NIBWORDS=1, NIB16=1, TAIL=1)]
worst = {}
# a flat cache and a wrapped ring; fp32 q (exact dots) and bf16 q (fp16 dots, integer codes by their bits); each
# knob set with both caches and both q dtypes, half the four pairings each (the interpreter takes seconds a launch)
for c, (H, Hkv, D, S, window, pos) in enumerate([(8, 2, 64, 300, 0, 290), (8, 2, 64, 40, 24, 70)]):
    k, v = filled_cache(Hkv, S, D, pos + 1, window > 0, gen)
    for d, dt in enumerate((torch.float32, torch.bfloat16)):
        q = torch.randn(1, 1, H, D, generator=gen).to(dt)
        p = torch.tensor([pos])
        for kv in ("float", "int8", "int4"):
            if kv == "float" and dt != torch.float32:
                continue  # the interpreter's bf16 dots are not numpy's
            args = cache_args(k, v, kv)
            fmt = A.kv_format(args[0], args[2])
            plain = A.attention_reference(q.float(), *args, p, window)
            rounded = {n: A.attention_reference(q_int8_levels(q, n), *args, p, window) for n in (1, 2)}  # KQ8
            for knobs in KNOBS[(c + d) % 2::2]:
                A.DECODE_KNOBS[D, fmt] = knobs
                got = A.launch(q, *args, p, window, True).float()
                levels = A.with_knobs(A._cfg(16, 16, 4, 1), D, fmt).kwargs["KQ8"]
                want = rounded[levels] if levels else plain
                err = ((got - want).norm() / want.norm()).item()
                key = (kv, str(dt), tuple(knobs))
                worst[key] = max(worst.get(key, 0.0), err)
print(worst)
assert {k[2] for k in worst} == {tuple(k) for k in KNOBS}
for (kv, dt, knobs), err in worst.items():
    assert err <= (1e-5 if dt == "torch.float32" else 1e-2), (kv, dt, knobs, err)
"""


def test_decode_code_knobs_match_reference_in_the_interpreter():
    """Every decode knob (q . k chains, V from words, V in parts, biased int8 K, int4 nibbles
    1 / 3 in place, scales a block ahead, int8 q . k against the reference fed q's int8 levels) against the
    reference, fp32 and 16-bit dots, flat cache and wrapped ring, on CPU."""
    run_interpreted(INTERPRETED_KNOBS)


INTERPRETED_PREFILL = r"""
import torch
from export.kernels import attention as A
from tests.test_attention import cache_args, filled_cache
gen = torch.Generator().manual_seed(2)
worst = {}
# (H, Hkv, D, S, window, pos, T, cfg): chunks of a few hundred queries; a flat cache and a sliding
# ring past wrap-around; V's columns in one or two parts; positions in one share or several
cases = [(8, 2, 32, 700, 0, 300, 200, (64, 32, 4, 1, 2)), (8, 2, 32, 700, 0, 0, 96, (32, 16, 4, 1, 1)),
         (4, 2, 16, 32 + 96 - 1, 32, 517, 96, (32, 16, 4, 1, 2))]
for H, Hkv, D, S, window, pos, T, cfg in cases:
    ring = window > 0
    k, v = filled_cache(Hkv, S, D, pos + T, ring, gen)
    q = torch.randn(1, T, H, D, generator=gen)
    p = torch.tensor([pos])
    # the position splits (PREFILL_TARGET_PROGRAMS 10 ** 6: the most shares) on the float cache's smaller chunks
    # (200 queries in the most shares take ~25 s in the interpreter); the quantized formats in one share: their
    # loads differ, not the splits' merge
    for kv in ("float", "int8", "int4") if T < 200 else ("float",):
        args = cache_args(k, v, kv)
        want = A.attention_reference(q, *args, p, window)
        for target in (1, 10 ** 6) if kv == "float" and T < 200 else (1,):
            A.PREFILL_TARGET_PROGRAMS = target
            with A.use_prefill_config(cfg):
                got = A.launch(q, *args, p, window, False)
            key = (kv, A.prefill_splits(T, H // Hkv, Hkv, cfg[0], cfg[4]) > 1)
            worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
# the chunk's own K/V beside a window-sized ring: chunks longer and shorter than the window,
# before and after the ring wraps, positions in one share or several
from tests.test_attention import ring_and_chunk
for H, Hkv, D, W, pos, T, cfg in [(4, 2, 16, 32, 517, 96, (32, 16, 4, 1, 2)), (8, 2, 32, 24, 0, 50, (32, 16, 4, 1, 1)),
                                  (4, 2, 16, 32, 40, 7, (16, 16, 4, 1, 1))]:
    ring, chunk, _ = ring_and_chunk(Hkv, W, D, pos, T, gen)
    q = torch.randn(1, T, H, D, generator=gen)
    p = torch.tensor([pos])
    want = A.attention_reference(q, *ring, None, None, p, W, *chunk)
    for target in (1, 10 ** 6) if pos > W else (1,):  # the splits past the ring's wrap
        A.PREFILL_TARGET_PROGRAMS = target
        with A.use_prefill_config(cfg):
            got = A.launch(q, *ring, None, None, p, W, False, k_new=chunk[0], v_new=chunk[1])
        key = ("chunk beside ring", A.prefill_splits(T, H // Hkv, Hkv, cfg[0], cfg[4]) > 1)
        worst[key] = max(worst.get(key, 0.0), (got - want).abs().max().item())
print(worst)
assert {("float", True), ("float", False), ("int8", False), ("int4", False)} <= set(worst)
assert (("chunk beside ring", True) in worst) and (("chunk beside ring", False) in worst)
assert max(worst.values()) <= 2e-5, worst
"""


def test_prefill_kernel_matches_reference_in_the_interpreter():
    """Prefill chunks of up to 200 queries: unmasked and masked blocks, position splits + combine,
    V column parts, every KV format, a wrapped ring; and a chunk's own K/V beside a window-sized
    ring (chunks longer than the window)."""
    run_interpreted(INTERPRETED_PREFILL)


CODES_EXACT = r"""
import torch, triton, triton.language as tl
from export.kernels import attention as A

@triton.jit
def conv(X, Y, Z):
    i = tl.arange(0, 256)
    x = tl.load(X + i)
    tl.store(Y + i, A._codes(x, tl.float16))
    tl.store(Z + i, A._nibble(x.to(tl.uint8) & 15, tl.float16))

x = torch.arange(-128, 128, dtype=torch.int8)
y, z = torch.empty(256, dtype=torch.float16), torch.empty(256, dtype=torch.float16)
conv[(1,)](x, y, z)
assert y.equal(x.half()), y
assert z.equal(((x.view(torch.uint8) & 15).int() - 8).half()), z
"""


def test_codes_to_fp16_through_bits_are_exact_in_the_interpreter():
    run_interpreted(CODES_EXACT, timeout=300)


def test_quantized_codes_convert_exactly_with_16bit_queries_in_the_interpreter():
    """bf16 q over int8 / int4 caches: the fp16 dot operands built from the codes' bits."""
    run_interpreted(INTERPRETED_16BIT)


@pytest.mark.parametrize("kv", ["int8", "int4", "bf16"])
def test_model_kv_dtype_buffers_and_logits(kv):
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model

    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    base = Gemma4Model(cfg, ctx=64, prefill_chunk=8)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model = Gemma4Model(cfg, ctx=64, prefill_chunk=8, kv_dtype=kv)
    model.load_state_dict(base.state_dict())
    specs = {s["fqn"]: s for s in model.kv_cache_specs()}
    full = [f for f, s in specs.items() if s["kind"] == "full" and f.endswith(".k")]
    assert full
    for f in full:
        want = {"int8": "int8", "int4": "uint8", "bf16": "bfloat16"}[kv]
        assert specs[f]["dtype"] == want
        if kv != "bf16":
            assert specs[f[:-1] + "k_scale"]["dtype"] == "float16"
    assert all(s["dtype"] == "float32" for s in specs.values() if s["kind"] == "sliding")
    tokens = torch.randint(0, cfg.vocab_size, (1, 40))

    def run(m):
        m.reset_cache()
        out = [m(tokens[:, i:i + 8], torch.tensor([i])) for i in range(0, 32, 8)]
        out += [m(tokens[:, i:i + 1], torch.tensor([i])) for i in range(32, 40)]  # rings wrapped (8 slots)
        return torch.stack(out)

    ref, got = run(base), run(model)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err <= {"bf16": 2e-3, "int8": 5e-3, "int4": 5e-2}[kv], err


def test_planner_quantized_kv_of_the_31b_at_128k():
    from export.gemma4.config import PRESETS
    from export.gemma4.options import KvDtype
    from export.gemma4.planner import PlanInputs, kv_items

    def kv_gib(kv):
        items = kv_items(PlanInputs(PRESETS["31b"], ctx=131072, kv_dtype=kv))
        return sum(i.bytes for i in items if not i.reference) / 2**30

    assert kv_gib(KvDtype.INT8) <= 5.9 and kv_gib("int4") <= 3.4
    assert round(kv_gib(None), 2) == 10.78  # bf16: 10.0 GiB full + 0.78 GiB rings (the window)
    # rings stay bf16 either way
    assert abs((kv_gib("int8") - kv_gib("int4")) - 10 * 131072 * 4 * 512 * 2 * 0.5 / 2**30) < 1e-9


@pytest.mark.cuda
def test_compiled_kernels_with_consumer_configs(monkeypatch):
    """Every decode config that the consumer limit admits (near full and at a small fill), and each
    prefill config (positions in one share and in several), compiles within it and matches the
    reference."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for H, Hkv, D, S, window in [(32, 4, 512, 4096, 0), (32, 16, 256, 1151, 1024), (8, 1, 32, 64, 0)]:
        k = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
        for kv in ("float", "int8", "int4") if not window else ("float",):
            args = cache_args(k, v, kv)
            fmt = A.kv_format(args[0], args[2])
            # decode nearly full and at a small fill (most shares empty: the combine reads the used ones)
            for decode, T, pos in ((True, 1, S - 5), (True, 1, 40), (False, 37, min(S // 2, S - 37))):
                q = torch.randn(1, T, H, D, device=dev, generator=gen, dtype=torch.bfloat16)
                p = torch.tensor([pos], device=dev)
                want = A.attention_reference(q.float(), *args, p, window)
                if decode:
                    levels = A.decode_q_levels(D, fmt)
                    if levels:  # the int8 dot's q: the reference fed q's int8 levels (the default's
                        # rounding of q is measured in logits by scripts/kv_logits_error.py)
                        want = A.attention_reference(q_int8_levels(q, levels), *args, p, window)
                    for c in A.fitting(A._DECODE_ALL, D, fmt):
                        with A.use_configs(lambda cs, c=c: [c]):
                            got = A.launch(q, *args, p, window, decode)
                        err = ((got.float() - want).norm() / want.norm()).item()
                        assert err <= 1e-2, (H, D, kv, decode, c, err)
                    continue
                # prefill: its config, with positions in one share and in several (+ combine)
                for target in (1, 10 ** 6):
                    monkeypatch.setattr(A, "PREFILL_TARGET_PROGRAMS", target)
                    got = A.launch(q, *args, p, window, decode)
                    err = ((got.float() - want).norm() / want.norm()).item()
                    assert err <= 1e-2, (H, D, kv, decode, A.prefill_config(D, fmt), target, err)
    # the 31B sliding layer's chunk beside its window-sized ring, chunks longer than the window
    H, Hkv, D, W = 32, 16, 256, 1024
    for pos, T in ((0, 2048), (30720, 2048), (4000, 300)):
        ring, chunk, _ = ring_and_chunk(Hkv, W, D, pos, T, torch.Generator().manual_seed(pos))
        ring, chunk = [x.to(dev, torch.bfloat16) for x in ring], [x.to(dev, torch.bfloat16) for x in chunk]
        q = torch.randn(1, T, H, D, device=dev, generator=gen, dtype=torch.bfloat16)
        p = torch.tensor([pos], device=dev)
        want = A.attention_reference(q.float(), *ring, None, None, p, W, *chunk)
        for target in (1, 10 ** 6):
            monkeypatch.setattr(A, "PREFILL_TARGET_PROGRAMS", target)
            got = A.launch(q, *ring, None, None, p, W, False, k_new=chunk[0], v_new=chunk[1])
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err <= 1e-2, (pos, T, target, err)
    shared = [k.metadata.shared for fn in (A._attn_body, A._prefill_body)
              for caches in fn.device_caches.values() for k in caches[0].values()]
    assert shared and max(shared) <= A.SMEM_LIMIT


DECODE_COMPILE = r"""
import sys
import textwrap
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from export.kernels import attention as A

fn = A._attn_body
elt = {0: "*bf16", 1: "*i8", 2: "*u8"}
for arch in map(int, sys.argv[1:]):
    for (D, fmt) in A.DECODE_CONFIG:
        c = A.decode_config(D, fmt)
        ptrs = dict(Q="*bf16", K=elt[fmt], V=elt[fmt], KS="*fp16", VS="*fp16", POS="*i64", O="*bf16", MP="*fp32",
                    LP="*fp32", AP="*fp32")
        # the raw rows' variant (norms, RoPE and the step's K / V in the split kernel) where the cache is float,
        # with its first K / V block loaded before the wait where it takes that (EARLY)
        for rows in ((0, 1) if fmt == 0 else (0,)):
            consts = dict(G=8 if D == 512 else 2, D=D, KV_FMT=fmt, SPLIT=True, FP32=False, INTERPRET=False,
                          **c.kwargs, PDL=2 if arch >= 90 else 0,  # its wait where the card has griddepcontrol
                          ROWS=rows, FRESH=rows, KEQV=0, EARLY=int(rows and D <= A.ROWS_EARLY_MAX_D))
            ptrs.update(QW="*bf16", INV="*fp32", KR="*bf16", VR="*bf16", KW="*bf16", eps="fp32")
            sig = {n: ptrs.get(n, "i32") for n in fn.arg_names if n not in consts}
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            print(arch, D, fmt, rows, k.metadata.shared)
"""


def test_decode_kernels_compile_for_consumer_cards_within_shared_memory():
    """The decode kernel with each measured config and its code knobs (inline PTX included),
    compiled by Triton + ptxas for sm_89 and sm_120 with no GPU present: the real compiler
    accepts it and the shared memory it reports fits the consumer cards."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", DECODE_COMPILE, "89", "120"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.strip().splitlines()]
    floats = sum(fmt == 0 for _, fmt in A.DECODE_CONFIG)
    assert len(lines) == 2 * (len(A.DECODE_CONFIG) + floats), r.stdout
    assert all(int(shared) <= A.SMEM_LIMIT for *_, shared in lines), r.stdout


@pytest.mark.cuda
def test_ptx_code_conversions_are_exact():
    """The decode kernel's inline-PTX conversions over every code: int8 pairs of a 16-bit word to
    their fp16 values, int8 codes to fp16 1152 + c, and each int4 nibble of a 16-bit word (biased
    1032 + value, and the value)."""
    import triton
    import triton.language as tl

    @triton.jit
    def conv(W, X, LO, HI, BX, P, PB, N: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(W + i)
        lo, hi = A._pairs(w, tl.float16, True)
        tl.store(LO + i, lo)
        tl.store(HI + i, hi)
        tl.store(BX + i, A._biased_ptx(tl.load(X + i)))
        for r in tl.static_range(4):
            tl.store(P + r * N + i, A._plane(w, r, False, tl.float16, True))
            tl.store(PB + r * N + i, A._plane(w, r, True, tl.float16, True))

    n = 65536
    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).cuda()
    x = torch.arange(n, dtype=torch.int32).remainder(256).sub(128).to(torch.int8).cuda()
    lo, hi, bx = (torch.full((n,), float("nan"), dtype=torch.float16, device="cuda") for _ in range(3))
    p, pb = (torch.full((4, n), float("nan"), dtype=torch.float16, device="cuda") for _ in range(2))
    conv[(n // 1024,)](w, x, lo, hi, bx, p, pb, N=n, BLOCK=1024)
    b = w.view(torch.uint8).view(n, 2).cpu()
    assert lo.cpu().equal(b[:, 0].view(torch.int8).half()) and hi.cpu().equal(b[:, 1].view(torch.int8).half())
    assert bx.cpu().equal(x.cpu().half() + 1152)
    nib = torch.stack([(w.cpu().int() >> (4 * r)) & 15 for r in range(4)])
    assert p.cpu().equal((nib - 8).half()) and pb.cpu().equal((nib + 1024).half())


_MUTATION_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner

    class Sm90:  # TTIR needs a target, not a GPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors
    from export.kernels import attention as A

    launches = []

    def capture(kernel):  # `launch`'s wrap: record each launch instead of running it
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kw: launches.append((kernel, args, kw))
        return Grid()

    def check(name, q, k, v, ks, vs, pos, window, decode, kn=None, vn=None):
        launches.clear()
        A.launch(q, k, v, ks, vs, pos, window, decode, wrap=capture, k_new=kn, v_new=vn)
        inputs = [t for t in (q, k, v, ks, vs, pos, kn, vn) if t is not None]
        for kernel, args, kw in launches:
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            kwargs = {**dict(zip(fn.arg_names, args)), **kw}
            written = identify_mutated_tensors(kernel, kwargs, {})
            bad = sorted(n for n in written if any(kwargs[n] is t for t in inputs))
            print(name, fn.__name__, "pdl", kwargs.get("PDL", 0), "inputs-written", bad, "written", sorted(written))

    torch.manual_seed(0)
    pos = torch.tensor([3000])
    A.op_pdl_mode = lambda device: 2  # decode as on sm_90+: its kernels wait on the grid (export/kernels/pdl.py)
    for D, Hkv, H, kinds in ((512, 4, 32, ("bf16", "int8", "int4")), (256, 16, 32, ("bf16",))):
        for kv in kinds:
            raw = torch.randn(1, Hkv, 4096, D)
            if kv == "bf16":
                k = v = raw.bfloat16()
                ks = vs = None
            else:
                k, ks = A.quantize_kv(raw, kv)
                v, vs = A.quantize_kv(raw, kv)
            check(f"decode-{D}-{kv}", torch.randn(1, 1, H, D).bfloat16(), k, v, ks, vs, pos, 0, True)
            check(f"prefill-{D}-{kv}", torch.randn(1, 256, H, D).bfloat16(), k, v, ks, vs, pos, 0, False)
        fresh = torch.randn(1, Hkv, 256, D).bfloat16()
        ring = torch.randn(1, Hkv, 1024, D).bfloat16()
        check(f"prefill-fresh-{D}", torch.randn(1, 256, H, D).bfloat16(), ring, ring, None, None, pos, 1024, False,
              fresh, fresh)
""")


def test_inductor_sees_only_the_outputs_written():
    """torch's mutation analysis of every kernel `launch` runs (decode and prefill, each KV format,
    both head dims, a chunk's own K/V), on its TTIR for sm_90 (no GPU): none of the op's inputs may
    count as written. An op it cannot read (side-effecting inline PTX) makes it take every argument
    as written, and the compiled graph then copies the KV cache before each call."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _MUTATION_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "inputs-written" in ln]
    assert len(lines) >= 12, r.stdout + r.stderr[-2000:]  # split + combine per decode, a kernel or two per prefill
    assert all("inputs-written []" in ln for ln in lines), "\n".join(lines)
    assert any("_combine" in ln and "'O'" in ln for ln in lines), "\n".join(lines)
    decode = [ln for ln in lines if ln.startswith("decode")]
    assert decode and all(" pdl 2 " in ln for ln in decode), "\n".join(decode)  # read with their waits


def test_bench_attention_smoke_runs_the_model_s_rings(tmp_path):
    """scripts/bench_attention.py --smoke (the Triton interpreter, tiny shapes, ~40 s): every row
    against the fp32 reference, the sliding layer's decode over a window-sized ring and its
    prefill chunks with their own K/V, as the model runs them."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "attention.json"
    r = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    sliding = [row for row in rows if row["layer"] == "31b-sliding"]
    assert {row["phase"] for row in sliding} == {"decode", "prefill"}
    assert all(row["finite"] and row["rel_err_vs_fp32_ref"] < 1e-5 for row in rows), rows
