"""Attention over the static KV cache that reads only the filled slots: `gemma4::attention`.

    attention(q[1, T, H, D], k, v, k_scale, v_scale, pos[1], window, k_new=None, v_new=None)
        -> out[1, T, H, D]

Query t sits at absolute position pos + t and attends to the positions p <= pos + t (and,
with window > 0, pos + t - p < window). Position p lives at slot p % S of the cache
(1, Hkv, S, ·): for a flat cache (S = ctx) that is slot p, for a sliding ring it is the
ring slot, so one rule serves both and a wrapped ring needs nothing special. With k_new /
v_new (1, Hkv, T, D) (a prefill chunk's own K/V, float cache only), positions pos.. are read
from them and the cache holds those before pos: a sliding ring of the window then serves a
chunk of any length. Scale 1.0, no softcap (Gemma 4). GQA: the G = H / Hkv query heads of one
KV head share each K/V block.

A decode step may instead hand attention the projection's raw rows (`gemma4::attention_rows`, in the layers
ATTENTION_ROWS_ENV picks; float caches): the split kernel norms and rotates q itself, and the share holding the
step's position norms and rotates its K, norms its V, writes both into the cache and folds them into its softmax
in place of that slot (`gemma4::attention_q_rows` for a layer reading another's cache: q only, nothing written). Behind
ROWS_EARLY_ENV as well, its programs load their share's first K / V block before their PDL wait (`rows_early`).

KV formats (the cache WRITE is the model's, in plain aten ops, but for `attention_rows`; `attention` only reads):
  float  k, v (1, Hkv, S, D) in the model dtype; scales None
  int8   k, v int8 (1, Hkv, S, D), symmetric, k_scale / v_scale fp16 (1, Hkv, S) per token and head
  int4   k, v uint8 (1, Hkv, S, D / 2): byte j holds d = 2j (low nibble) and 2j + 1 (high), each
         the value + 8 in [0, 15]; fp16 scales per token and head as for int8
The quantized scores factor as (q . k_int) * k_scale, and p @ v as (p * v_scale) @ v_int, so the
kernels dequantize by converting the integer tile and scaling the scores / probabilities.

Triton path (CUDA): decode (T = 1 in the traced graph) is flash-decoding: grid
(Hkv, 1, NUM_SPLITS); each program reads one contiguous share of the filled positions
[lo, pos] (whole BLOCK_N blocks, cp.async-pipelined), split from the position tensor on the
device (static grid for AOTInductor and CUDA-graph replay; shares past the fill are empty and
write l = 0), and writes a partial (max, sum, acc); a combine kernel, spread over heads and
head-dim chunks, merges the non-empty shares (with many shares it reads only those the position
fills; with one share per KV head the kernel writes the output and there is no combine). The
shares are the grid's slowest axis: at a small fill the used ones are its first programs. On
sm_90+ both wait on the grid before them first thing (programmatic dependent launch,
export/kernels/pdl.py: each may start while the kernel before it finishes). With a quantized
cache the dots run in fp16 and
the integer codes become fp16 through their bit patterns (see _codes), not conversion
instructions (at head_dim 512 the int8 decode's q . k is an int8 dot instead: q rounded to int8
codes of max |q| / 127 per row, K's codes as stored; the reference does not round q); per head
dim / KV format, DECODE_KNOBS picks code variants measured on the H200
(scripts/decode_kv8_variants.py): q . k as independent dot chains over parts of D; V, the
transposed operand of p @ v (no 8-bit ldmatrix: an 8-bit tile read as is costs a shared load
per byte), read as 32-bit words split in registers, or as 16-bit words (int8: two codes, int4:
four) that ldmatrix.trans loads, each code of a word feeding the dot of its own output-column
plane; the codes converted in inline PTX (a sign flip and byte permute, or shift and mask, per
register of two words); K codes biased so the per-element subtraction becomes one per score;
the scales a block ahead; the tiles of a quantized cache read whole and only the scores masked
(T = 1: every position of a share is visible). Prefill (T > 1,
dynamic in the traced graph) has a kernel of its own
(_prefill_body): grid (NUM_SPLITS, cdiv(T*G, BLOCK_M), Hkv * DV), rows = (t, g) pairs of one KV
head, each row block walking only the positions its rows can see (causal and window range),
unmasked but for the window's lower edge and the causal diagonal; V's columns in DV parts and,
for a static chunk with few row blocks, the positions in NUM_SPLITS shares merged by
_prefill_combine. At head_dim 512 q . k runs as a GEMM over D (DK columns a step, q's chunk
re-read from L2 for every block, _pfk_block), so BLOCK_M 64 takes wgmma on sm_90 within the
consumer shared-memory limit: held whole, q alone is 64 KiB there (the held-q path stays for
head_dim 256, where wgmma fits with q held, and for configs without DK). The eager reference below is the CPU
kernel and the CPU backend's decomposition.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from export.kernels.hadamard import fwht
from export.kernels.int4_matmul import _store_levels, levels_buffers, rms_norm_reference
from export.kernels.pdl import op_pdl_mode, pdl_wait

SMEM_LIMIT = 101376  # bytes of shared memory per block on sm_89 / sm_120 (RTX 4090 / 5090)
# decode programs per layer (splits x KV heads): two resident per SM on the H200's 132 (fewer,
# longer shares beat more at every fill once the combine reads few partials)
TARGET_PROGRAMS = 264
# decode (head_dim, KV format) -> (BLOCK_N, num_warps, num_stages), measured best on an H200
# (scripts/attention_variants.py, scripts/decode_kv8_variants.py and their JSON in
# scripts/measurements/); each fits SMEM_LIMIT with its knobs
DECODE_CONFIG = {(512, 0): (32, 4, 2), (512, 1): (32, 4, 3), (512, 2): (64, 4, 2), (256, 0): (32, 4, 2)}
# decode (head_dim, KV format) -> code knobs of _attn_body (KNOB_DEFAULTS otherwise): KSPLIT q . k as
# that many independent dot chains; VWORDS V from 32-bit words split in registers; VSPLIT V's
# columns in parts; KBIAS K codes biased (int8 by 1152, int4 words by 1032); SCALES_AHEAD the scales
# a block ahead; VPAIRS int8 V as 16-bit words of two codes (even / odd column planes); NIBWORDS
# int4 K and V as 16-bit words of four codes (four column planes); PTX the int8 / int4 code
# conversions in inline PTX; TAIL 1 the share's whole blocks unmasked and the last one masked,
# 2 (quantized) every block's tiles read whole and only its scores masked; KQ8 (int8) q . k as an int8
# dot of q's codes (1: one level a row, 2: two) with K's (for int4 K, its nibbles split from the stored bytes
# as int8 dots' operand, exact against q rounded to int8 in the interpreter: the sm_90 loop per 64-position
# block 1511 -> 2053 instructions, the transposed 8-bit operand read from shared memory byte by byte; not
# kept). NIB16 (int4 with NIBWORDS): nibbles 1 / 3 taken in place as 16 * code, one shift for planes 2 / 3
# (`_plane`), q's planes 1 / 3 divided by 16 and V's outputs there: the sm_90 loop per 64-position block
# 1241 -> 1126 instructions (1511 before `_plane` made the mask and the fp16 exponent one lop3); 31B full
# layer at 1k / 32k / 128k 15.7 / 47.0 / 134.6 us -> 15.3 / 44.3 / 122.3 with the lop3 -> 15.0 / 44.2 / 121.5
# with NIB16 (decode_vbias.json), the default. V's codes biased by 1032 in the fp16 operand (the bias taken
# off in the rescale, 1126 -> 1039 with NIB16) was slower on every 31B fill (128k 128.0 us alone, 124.2 with
# NIB16) and dropped. A share past the fill returning before it loads q
# (decode_empty_exit.json, decode_combine_skip.json) was faster for E2B's int4 cache up to 32k and slower
# elsewhere (the 31B's int4 full layer at 128k 134.6 -> 178.5 us): dropped.
# H200, 31B full layer, fill 32k / 128k (scripts/measurements/decode_kv8_variants.json, copy 4256 GB/s):
# int8 76 / 257 us at first, 62 / 200 with four q . k chains, biased K and the scales ahead, 50 / 150
# with V as code pairs and the conversions in PTX, one q . k chain, whole tiles (0.63 / 0.85 of the
# copy bandwidth; four chains 50 / 156, 2 stages at 3 programs per SM 53 / 154, BLOCK_N 16 or 64,
# 8 warps and 132 or 528 programs slower); int4 82 / 283 -> 47 / 135 (16-bit words of four codes,
# BLOCK_N 64); bf16 76 / 254 (its whole blocks unmasked: no faster, the sliding layer slower).
# Third / fourth rounds (decode_kq8_variants.json, decode_kq8_round4.json): q . k as an int8 dot of q's
# codes with K's as stored (KQ8 1: no conversion of K, the loop 948 -> 718 instructions a warp and block
# for sm_90) 47.7 / 151 -> 45.7 / 134 us at 32k / 128k; q's remainder as a second level (KQ8 2, q to
# ~16 bits, a second int8 dot) is slower than the fp16 dots (51.4 / 158). Rescaling only when a row's
# max rose and V's codes biased (no subtract a code) paid nothing and were dropped. KQ8 1 is the int8
# default: q in one int8 level a row adds to the scores an error of the size K's own int8 rounding
# puts there. The 31B 6-layer slice's int8-KV decode logits (scripts/kv_logits_error.py, bf16-KV model
# as reference) moved 0.521% -> 0.531% with q / k norms that give scores of order 1, 2.7% -> 4.0% with
# scores of std sqrt(D) (a softmax so peaked that any rounding shows), int4 KV being 0.91% / 34% there;
# the op over the int8 cache 47.5 / 159.6 -> 45.9 / 143.3 us at 32k / 128k (decode_kq8_default.json).
DECODE_KNOBS: dict = {(512, 0): {"KSPLIT": 2},
                      (512, 1): {"KSPLIT": 1, "SCALES_AHEAD": 1, "VPAIRS": 1, "PTX": 1, "TAIL": 2, "KQ8": 1},
                      (512, 2): {"NIBWORDS": 1, "KBIAS": 1, "SCALES_AHEAD": 1, "PTX": 1, "TAIL": 2, "NIB16": 1}}
DECODE_TARGET: dict = {}  # (head_dim, KV format) -> programs per layer, where not TARGET_PROGRAMS
# decode's two kernels wait on the grid before them (export/kernels/pdl.py) on sm_90+: the artifact's
# launcher gives these the programmatic-stream-serialization attribute (export/backends/cuda.py)
PDL_KERNELS = ("_attn_body", "_combine")
COMBINE_BLOCK_D = 128  # head-dim columns per prefill combine program
# decode's combine (_combine): head-dim columns per program and its EAGER loads; the combine is ~5 us of
# the 31B full layer's decode at every fill (the split kernel alone: int8 46 / 160 us at 32k / 128k);
# 64 columns with EAGER took 1.5 us off it, 256 columns, or EAGER at 128, did not (H200)
DECODE_COMBINE_BLOCK_D = 64
COMBINE_EAGER = 1
# warps of the decode combine holding a whole head of 512 to rotate it back (`_combine`'s ROT): with 4 its fp32
# head, the chunk's partials and the butterflies take 247 registers (sm_90, ptxas, pointers aligned as launched;
# unaligned 255 and 424 bytes of stack); 8: 80, more threads for the head's butterflies
COMBINE_ROT_WARPS = 8
# decode's combine where a layer has at least this many shares a KV head: it reads only the shares holding
# positions (their count from the position, `_decode_share`), where EAGER reads every share's partials. H200
# (scripts/decode_combine_variants.py, decode_active_shares.json): E2B's full layer (264 shares) at fill 1k
# 13.7 -> 11.4 us (bf16), 15.2 -> 12.8 (int8), 25.4 -> 23.0 (int4), E4B's 1 us less, no change from 8k on
# nor on the 31B's full layer (66 shares); the sliding layers (16 / 32 shares, all holding positions)
# 0.3 us slower (the position's load comes before the partials'). Shares of at least 2 / 4 blocks: slower
DECODE_ACTIVE_MIN_SPLITS = 64
# and with it, where the used shares fit the combine's first chunk (CHUNK shares), only that chunk is read
# (`_combine`'s SKIP), else every share in one round, as without it: E2B's full layer pads 264 shares to 512,
# 8 chunks of 64, 17 used at fill 1k. H200 (decode_combine_skip.json, against SKIP off): E2B's full layer at
# 1k 11.5 -> 7.4 us (bf16), 12.8 -> 8.8 (int8), 25.4 -> 13.4 (int4), E4B's 1.5-3.3 us less, the 31B's 1.2-2.3
# us less at 1k-32k; from 8k on E2B int4 1.7-3.5 us less, bf16 / int8 1.6-2.0 more, E4B 0.3-0.6 more (not
# explained: the branch taken there runs the code without SKIP's). An earlier form that ran the first chunk
# and then the rest in a second round cost those ~1 us more (decode_empty_exit.json)
DECODE_COMBINE_SKIP = True
# decode's grid with the shares as its slowest axis (program ids: every KV head's first share, then the
# second ...), so that at a small fill the shares holding positions are the first programs the block
# scheduler places, spread over the SMs, rather than the KV heads' runs of mostly empty shares. H200
# (decode_share_order.json), fill 1k: E4B's full layer (2 KV heads) 0.9-1.8 us less, the 31B's (4) 0.3-0.6;
# from 8k on and on one-KV-head layers within +-0.4 us
DECODE_SHARES_SLOWEST = True
# decode's partials (each share's output over its positions) in fp16 as acc / l, not fp32 acc: half of
# the 4.3 MB the 31B full layer's 264 programs write and the combine reads. V is RMS-normed without a
# scale in Gemma 4 (|V| <= sqrt(D)), so acc / l, a weighted mean of V's rows, stays far inside fp16.
# Measured slower on the H200 at every fill and format (31B full layer int8 at 32k 47.7 -> 50.1 us,
# scripts/measurements/decode_combine_variants.json): off
DECODE_PARTIALS_FP16 = False
# prefill (head_dim, KV format) -> (BLOCK_M, BLOCK_N, num_warps, num_stages, DV[, DK, DLOOP, VEARLY]),
# measured best on an H200 (scripts/prefill_variants.py, scripts/measurements/prefill_*); each fits
# SMEM_LIMIT. head_dim 512: q . k over D chunks of DK = 64 (q re-read per block, the chunk loop
# pipelined, 3 stages: DLOOP 1) on wgmma, V in two column parts; holding q (BLOCK_M 32, mma.sync) was
# the best before, and every held-q wgmma config spilled. 31B full layer, T 2048, fills 8k / 32k /
# 128k (`prefill_variants --dk --dk-defaults`, matmul 755 TFLOP/s, prefill_dk_defaults.json): bf16
# 10.7 / 47.7 / 195 ms -> 4.7 / 23.0 / 94 (BLOCK_M 64, 4 warps: 232 / 191 / 187 TFLOP/s), int8
# 11.5 / 55.2 / 236 -> 7.2 / 31.1 / 130 and int4 14.4 / 59.5 / 252 -> 7.3 / 31.1 / 129 (BLOCK_M 128,
# 8 warps). Within 12% of these: BLOCK_M 64 x 8 warps with V whole (DV 1) at 3 stages, and the other
# format's pick; 2 stages 1.1-1.4x slower, DK 32 slower still; DK 128 at 2 stages below DK 64 at 3 / 4,
# the chunks unrolled or V loaded before q . k no better (prefill_dk_variants.json). Shorter chunks
# (position splits) were measured for BLOCK_M 64 at 2 stages only: int4 (4 warps, DV 2) 1.4-1.7x the
# held-q kernel at T 128 / 512; bf16 / int8 with V whole 1.15-1.4x at T 512 but 0.7-0.8x at T 128
# (a split takes DV 2 on 8 warps).
# head_dim 256: wgmma with q held fits.
PREFILL_CONFIG = {(512, 0): (64, 64, 4, 3, 2, 64, 1, 0), (512, 1): (128, 64, 8, 3, 2, 64, 1, 0),
                  (512, 2): (128, 64, 8, 3, 2, 64, 1, 0),
                  (256, 0): (64, 32, 4, 2, 1), (256, 1): (64, 32, 4, 2, 1)}
# a split chunk's fp32 partials (BLOCK_M x D / DV) pass through shared memory on their way out: a
# D-chunked config whose tile is larger takes V in more column parts when it splits positions
PREFILL_PARTIAL_BYTES = 65536
PREFILL_TARGET_PROGRAMS = 264  # a static chunk with fewer row-block programs splits the positions
PREFILL_MAX_SPLITS = 8
_PREFILL_FORCE = None  # a (BLOCK_M, BLOCK_N, num_warps, num_stages, DV) set by `use_prefill_config`
QUANT_BLOCK = {torch.int8: "int8", torch.uint8: "int4"}
KV_FORMAT = {"float": 0, "int8": 1, "int4": 2}


# ---- quantize / dequantize (plain aten; the model's quantize-on-write uses these) ---------------

def quantize_kv(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> (codes, fp16 scale (...)): int8 codes, or uint8 with two int4 nibbles."""
    xf = x.float()
    qmax = 127.0 if kv_dtype == "int8" else 7.0
    scale = (xf.abs().amax(-1) / qmax).clamp_min(1e-8).to(torch.float16)
    q = torch.round(xf / scale.float()[..., None]).clamp(-qmax, qmax)
    if kv_dtype == "int8":
        return q.to(torch.int8), scale
    u = (q + 8).to(torch.uint8)  # [1, 15]
    return u[..., 0::2] | (u[..., 1::2] * 16), scale


def dequantize_kv(codes: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return codes.to(dtype)
    if codes.dtype == torch.int8:
        vals = codes.float()
    else:  # int4 pairs: interleave low / high nibbles back into d = 2j, 2j + 1
        lo = (codes & 15).float() - 8
        hi = (codes >> 4).float() - 8
        vals = torch.stack((lo, hi), dim=-1).flatten(-2)
    return (vals * scale.float()[..., None]).to(dtype)


# ---- eager reference (the CPU kernel and the CPU backend's decomposition) -----------------------

def attention_reference(q, k, v, k_scale, v_scale, pos, window: int, k_new=None, v_new=None):
    """Plain torch, traceable with dynamic T: dequantize the cache, mask by absolute position.
    With k_new / v_new (1, Hkv, T, D), the chunk's own K/V: positions pos.. come from them and
    the cache holds only positions before pos (slot p % S)."""
    _, T, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    keys = dequantize_kv(k, k_scale, torch.float32)  # (1, Hkv, S, D)
    vals = dequantize_kv(v, v_scale, torch.float32)
    qpos = pos + torch.arange(T, device=q.device)  # (T,)
    last = qpos[-1] if k_new is None else pos[0] - 1  # the cache's newest position
    idx = torch.arange(S, device=q.device)
    slot_pos = last - (last - idx) % S  # position held by each slot (< 0: never written)
    if k_new is not None:  # the chunk's positions after the cache's slots
        keys = torch.cat((keys, k_new.float()), dim=2)
        vals = torch.cat((vals, v_new.float()), dim=2)
        slot_pos = torch.cat((slot_pos, qpos))
    qp, kp = qpos[:, None], slot_pos[None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window > 0:
        mask = mask & (qp - kp < window)
    qf = q.float()[0].transpose(0, 1).reshape(Hkv, G * T, D)  # rows (g, t) of each KV head
    scores = qf @ keys[0].transpose(1, 2)  # (Hkv, G*T, S [+ T]), scale 1.0
    scores = scores.masked_fill(~mask.repeat(G, 1)[None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vals[0]  # (Hkv, G*T, D)
    return out.reshape(H, T, D).transpose(0, 1)[None].to(q.dtype).contiguous()


def q_int8_levels(q: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """q as the int8 decode kernel's int8 q . k sees it (KQ8 `levels`): each row (token, head) in
    int8 codes of max |q| / 127, nearest, halves away from zero, and with two levels the remainder
    in 254ths of a code the same way; fp32 (codes times scale). The reference fed this is what
    the kernel computes; fed q itself, it shows what the rounding costs."""
    qf = q.float()
    s = qf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0
    r = qf / s
    h = torch.where(r >= 0, r + 0.5, r - 0.5).trunc()
    if levels == 1:
        return h * s
    r = (r - h) * 254.0
    return (h + torch.where(r >= 0, r + 0.5, r - 0.5).trunc() / 254.0) * s


def decode_q_levels(head_dim: int, kv_format: int) -> int:
    """How many int8 levels the decode kernel rounds q to for this head dim / KV format (0: none)."""
    return with_knobs(_cfg(16, 16, 4, 1), head_dim, kv_format).kwargs["KQ8"]


# ---- configs (every one within SMEM_LIMIT; tests assert it) -------------------------------------

def smem_bytes(block_m: int, block_n: int, stages: int, head_dim: int, kv_format: int, elt: int = 2,
               vwords: int = 0, vsplit: int = 1) -> int:
    """Upper estimate of a program's shared memory as Triton 3.6 lays it out (checked against
    compiled kernels for sm_89 / sm_90) of the decode kernel: stages - 1 buffers of the K and V
    tiles as stored (cp.async pipelining; one for the layout change when not pipelined), q and p
    as dot operands, and the fp16 V tile (its part, vsplit) that V's words pass through, or for
    int4 without them the V tile once more (its nibble split goes through shared memory). The
    prefill kernel's: prefill_smem_bytes."""
    stored = {0: head_dim * elt, 1: head_dim, 2: head_dim // 2}[kv_format]
    total = max(stages - 1, 1) * block_n * stored * 2 + block_m * head_dim * elt + block_m * block_n * elt
    if vwords and kv_format != 0:
        total += block_n * head_dim // vsplit * 2
    elif kv_format == 2:
        total += block_n * stored
    return total


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# decode: BLOCK_M 16 rows hold the G query heads of one KV head; stages >= 2 keep K/V loads in
# flight (cp.async) while the previous block is in the dot (one stage, or 8 warps, was slower for
# every tile and KV format on the H200)
_DECODE_ALL = [_cfg(16, bn, 4, s) for bn in (16, 32, 64) for s in (2, 3, 4)]
KNOB_DEFAULTS = {"KSPLIT": 1, "VWORDS": 0, "VSPLIT": 1, "KBIAS": 0, "SCALES_AHEAD": 0, "VPAIRS": 0, "PTX": 0,
                 "TAIL": 0, "NIBWORDS": 0, "KQ8": 0, "NIB16": 0}


def with_knobs(c: triton.Config, head_dim: int, kv_format: int) -> triton.Config:
    """c with the decode kernel's code knobs for this head dim / KV format (DECODE_KNOBS; those
    already in c win)."""
    knobs = {**KNOB_DEFAULTS, **DECODE_KNOBS.get((head_dim, kv_format), {}), **c.kwargs}
    if kv_format != 2:
        knobs["NIBWORDS"] = 0  # int4 codes only
    if kv_format != 1:
        knobs["VPAIRS"] = knobs["KQ8"] = 0  # int8 codes only
    if knobs["KQ8"]:
        knobs["KBIAS"], knobs["KSPLIT"] = 0, 1  # the int8 dot takes K's codes as stored
    if kv_format == 0:
        knobs["KBIAS"] = knobs["PTX"] = 0
    if kv_format == 2 and not knobs["NIBWORDS"]:
        knobs["KBIAS"] = 0  # int4 bytes: nibble planes unbiased
    if not (kv_format == 2 and knobs["NIBWORDS"]):
        knobs["NIB16"] = 0  # int4 as 16-bit words only
    if knobs["VPAIRS"] or knobs["NIBWORDS"]:
        knobs["VWORDS"], knobs["VSPLIT"] = 0, 1
    if kv_format == 0 and knobs["TAIL"] == 2:
        knobs["TAIL"] = 1  # a float cache's unwritten slots may hold NaN
    if kv_format == 2:
        knobs["KSPLIT"] = 1  # int4 K: the nibble planes
    if kv_format == 0:
        knobs["VWORDS"] = knobs["SCALES_AHEAD"] = 0
    return triton.Config(knobs, num_warps=c.num_warps, num_stages=c.num_stages)


def fitting(configs, head_dim: int, kv_format: int, limit: int = SMEM_LIMIT):
    """The configs (with their knobs) whose shared memory fits `limit`."""
    out = []
    for c in configs:
        k = with_knobs(c, head_dim, kv_format)
        if smem_bytes(k.kwargs["BLOCK_M"], k.kwargs["BLOCK_N"], k.num_stages, head_dim, kv_format,
                      vwords=k.kwargs["VWORDS"], vsplit=k.kwargs["VSPLIT"]) <= limit:
            out.append(k)
    return out


def prefill_smem_bytes(cfg: tuple, head_dim: int, kv_format: int) -> int:
    """Upper estimate of the prefill kernel's shared memory as Triton 3.6 lays it out (checked
    against kernels compiled for sm_90; sm_89 / sm_120 take the mma.sync path below) for cfg =
    (BLOCK_M, BLOCK_N, num_warps, num_stages, DV[, DK, DLOOP, VEARLY]). Tiles as dot operands
    (16-bit; int8 / int4 tiles convert to fp16 on their way there): K of BLOCK_N x D, this
    program's V share of BLOCK_N x D / DV, p of BLOCK_M x BLOCK_N.
    BLOCK_M >= 64 with 4 / 8 warps runs on wgmma (sm_90; sm_89 / sm_120 need less): q stays in shared memory
    (BLOCK_M x D) beside `stages` K and V buffers (one K buffer, V reusing it, unpipelined).
    BLOCK_M < 64 (mma.sync): q goes to registers; `stages` K buffers, one fewer V (as many, and
    8 KiB more for a split V, at BLOCK_N 16). DK > 0 (q . k over D chunks): `stages` buffers of
    the q and K chunks (BLOCK_M x DK, BLOCK_N x DK; two when unrolled) for the chunk loop, the V
    share reusing them after it (beside them when loaded before the loop: VEARLY), and p
    (BLOCK_M x BLOCK_N)."""
    block_m, block_n, warps, stages, dv, dk, _, vearly = (*cfg, 0, 0, 0)[:8]
    k = block_n * head_dim * 2
    v = k // dv
    p = block_m * block_n * 2
    if dk:
        chunks = max(stages, 2) * (block_m + block_n) * dk * 2
        return (chunks + v if vearly else max(chunks, v)) + p
    if block_m >= 64:  # p stays in registers (wgmma's A operand)
        return block_m * head_dim * 2 + (stages * (k + v) if stages > 1 else k)
    if block_n <= 16:
        return stages * (k + v) + p + (8192 if dv > 1 else 0)
    return stages * k + max(stages - 1, 1) * v + p


PREFILL_CANDIDATES = [(bm, bn, w, s, dv) for bm in (32, 64) for bn in (16, 32, 64) for w in (4, 8)
                      for s in (1, 2, 3) for dv in (1, 2)]


# ---- kernels -------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b, fp32 accumulation; with FP32 (an fp32 model) as IEEE fp32 products, not TF32, so that the
    model matches its fp32 reference."""
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _codes(x, dtype: tl.constexpr):
    """Cache tile -> dot operand. int8 codes to fp16 without a conversion instruction (those
    issue at a quarter of the integer rate and bound the int8 kernel): the fp16 with bits
    0x6400 + (c + 128) is exactly 1024 + c + 128, so subtract 1152. bf16 / fp32 pass through."""
    if x.dtype == tl.int8 and dtype == tl.float16:
        return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    return x.to(dtype)


@triton.jit
def _nibble(n, dtype: tl.constexpr):
    """A 4-bit code n in [0, 15] (stored value + 8) -> value as a dot operand; fp16 via the bits
    0x6400 + n = 1024 + n, then - 1032 (exact)."""
    if dtype == tl.float16:
        return (n.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return (n.to(tl.int32) - 8).to(dtype)


@triton.jit
def _words(w, KV_FMT: tl.constexpr, dtype: tl.constexpr):
    """[N, C] int32 words of cache rows -> [N, C * per_word] values as dot operands, in column
    order (int8: 4 bytes a word, little-endian; int4: 8 nibbles, each value + 8). Split by shifts
    in registers and put back in order (join + reshape): the dot then takes an fp16 tile through
    shared memory (16-byte stores, ldmatrix.trans) instead of reading the 8-bit tile byte by byte
    in the transposed operand layout."""
    if KV_FMT == 1:
        e0 = (w << 24) >> 24
        e1 = (w << 16) >> 24
        e2 = (w << 8) >> 24
        e3 = w >> 24
        x = tl.join(tl.join(e0, e2), tl.join(e1, e3))  # [N, C, 2, 2]: byte 2i + h at [.., i, h]
        x = tl.reshape(x, (x.shape[0], x.shape[1] * 4))
        if dtype == tl.float16:  # as _codes: bits 0x6400 + c + 128 are 1152 + c
            return (x + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        return x.to(dtype)
    else:
        e0 = w & 15
        e1 = (w >> 4) & 15
        e2 = (w >> 8) & 15
        e3 = (w >> 12) & 15
        e4 = (w >> 16) & 15
        e5 = (w >> 20) & 15
        e6 = (w >> 24) & 15
        e7 = (w >> 28) & 15
        x = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
        x = tl.reshape(x, (x.shape[0], x.shape[1] * 8))  # nibble 4i + 2j + h at [.., i, j, h]
        if dtype == tl.float16:
            return (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
        return (x - 8).to(dtype)


@triton.jit
def _biased_ptx(x):
    """int8 codes -> fp16 1152 + c in PTX, four codes (one 32-bit register) at a time: the bytes
    with the sign bit flipped are c + 128, and a byte permute puts 0x64 above each (fp16 bits
    0x6400 + c + 128). Three instructions per four codes; Triton moves the elementwise op past
    the shared-memory load, so it runs on the dot operand's registers."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, h; xor.b32 t, $2, 0x80808080; mov.b32 h, 0x64646464;"
        " prmt.b32 $0, t, h, 0x4140; prmt.b32 $1, t, h, 0x4342; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _pairs(w, dtype: tl.constexpr, PTX: tl.constexpr):
    """[N, C] int16 words of two int8 codes (column 2j low byte, 2j + 1 high) -> their (low,
    high) values as [N, C] dot operands. PTX (fp16): on 32-bit registers of two words, flip the
    sign bits, byte-permute 0x64 above the wanted bytes, one packed subtract of 1152 (the
    compiler's 16-bit shifts unpack and repack every register)."""
    if PTX and dtype == tl.float16:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t, h, c; xor.b32 t, $1, 0x80808080; mov.b32 h, 0x64646464; mov.b32 c, 0x64806480;"
            " prmt.b32 t, t, h, 0x4240; sub.rn.f16x2 $0, t, c; }",
            "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, h, c; xor.b32 t, $1, 0x80808080; mov.b32 h, 0x64646464; mov.b32 c, 0x64806480;"
            " prmt.b32 t, t, h, 0x4341; sub.rn.f16x2 $0, t, c; }",
            "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
        return lo, hi
    lo = (w << 8) >> 8
    hi = w >> 8
    if dtype == tl.float16:
        return ((lo + 0x6480).to(tl.float16, bitcast=True) - 1152.0,
                (hi + 0x6480).to(tl.float16, bitcast=True) - 1152.0)
    return lo.to(dtype), hi.to(dtype)


@triton.jit
def _plane(w, R: tl.constexpr, BIASED: tl.constexpr, dtype: tl.constexpr, PTX: tl.constexpr, N16: tl.constexpr = 0):
    """[N, C] int16 words of four int4 codes (nibble r = column 4c + r, each the value + 8) ->
    nibble R's values as an [N, C] dot operand; BIASED: fp16 1024 + code = value + 1032 (the
    caller takes 1032 * sum(q) off). PTX (fp16): on 32-bit registers of two words, a shift and
    one LOP3 per two values (and a packed subtract unless BIASED): the mask and the 0x6400 as one
    lop3 ((t & 0x000F000F) | 0x64006400), which ptxas kept as two LOP3 when written as and / or (the
    sm_90 loop per 64-position block of the 31B full layer 1511 -> 1241 instructions, the same bits).
    N16 (fp16): nibbles 1 and 3 taken where they lie, bits 4-7 of the word (of the word shifted by 8
    for 2 and 3: one shift for two planes), so their operand holds 16 * code (1024 + 16 * code biased,
    16 * value otherwise; exact in fp16): the caller divides their q by 16, or their outputs."""
    SHIFT: tl.constexpr = (R // 2) * 8 if N16 else 4 * R
    MASK: tl.constexpr = (0xF0 if R % 2 else 0x0F) if N16 else 0x0F
    SUB: tl.constexpr = 0x6480 if N16 and R % 2 else 0x6408  # 1152 = 1024 + 16 * 8, or 1032
    if PTX and dtype == tl.float16:
        if BIASED:
            return tl.inline_asm_elementwise(
                f"{{ .reg .b32 t; shr.b32 t, $1, {SHIFT}; lop3.b32 $0, t, {MASK * 65537}, 0x64006400, 0xEA; }}",
                "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t, c; shr.b32 t, $1, {SHIFT}; lop3.b32 t, t, {MASK * 65537}, 0x64006400, 0xEA;"
            f" mov.b32 c, {SUB * 65537}; sub.rn.f16x2 $0, t, c; }}",
            "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
    if dtype == tl.float16:
        x = ((w >> SHIFT) & MASK) | 0x6400
        if BIASED:
            return x.to(tl.float16, bitcast=True)
        return x.to(tl.float16, bitcast=True) - (1152.0 if N16 and R % 2 else 1032.0)
    n = (w >> (4 * R)) & 15
    return (n.to(tl.int32) - 8).to(dtype)


@triton.jit
def _tile(ptrs, kmask, MASK: tl.constexpr, other):
    """A [N, C] cache tile; rows past the share masked (MASK) or, for a whole block, not."""
    if MASK:
        return tl.load(ptrs, mask=kmask[:, None], other=other)
    return tl.load(ptrs)


@triton.jit
def _qk(q, K, kvh, slot, kmask, skh, sks, c0, DK: tl.constexpr, KBIAS: tl.constexpr, FP32: tl.constexpr,
        MASK: tl.constexpr, PTX: tl.constexpr):
    """q . K[slots, c0 : c0 + DK] (float / int8). KBIAS: int8 codes as c + 1152 (exact in fp16,
    no subtraction per element; the caller takes 1152 * sum(q) off each score), in PTX with PTX."""
    d = c0 + tl.arange(0, DK)
    kt = _tile(K + kvh * skh + slot[:, None] * sks + d[None, :], kmask, MASK, 0)
    if KBIAS and PTX:
        kt = _biased_ptx(kt)
    elif KBIAS:
        kt = (kt.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)
    else:
        kt = _codes(kt, q.dtype)
    return _dot(q, tl.trans(kt), FP32)


@triton.jit
def _pv(p, V, kvh, slot, kmask, svh, svs, c0, DP: tl.constexpr, KV_FMT: tl.constexpr, VWORDS: tl.constexpr,
        FP32: tl.constexpr, MASK: tl.constexpr):
    """p @ V[slots, c0 : c0 + DP] (float / int8 as loaded; VWORDS: int8 / int4 from 32-bit words)."""
    if VWORDS:
        PER: tl.constexpr = 4 if KV_FMT == 1 else 8  # values per word
        W = V.to(tl.pointer_type(tl.int32))
        wc = c0 // PER + tl.arange(0, DP // PER)
        w = _tile(W + kvh * (svh // 4) + slot[:, None] * (svs // 4) + wc[None, :], kmask, MASK,
                  0 if KV_FMT == 1 else -2004318072)  # int4 padding: nibbles 8 (value 0)
        vt = _words(w, KV_FMT, p.dtype)
    else:
        d = c0 + tl.arange(0, DP)
        vt = _codes(_tile(V + kvh * svh + slot[:, None] * svs + d[None, :], kmask, MASK, 0), p.dtype)
    return _dot(p, vt, FP32)


@triton.jit
def _block(q0, q1, q2, q3, qbias, ks_c, vs_c, m_i, l_i, acc, acc2, acc3, acc4, k0, end, qpos, kvh, K, V, KS, VS,
           S, WINDOW, skh, sks, svh, svs, ssh, D: tl.constexpr, KV_FMT: tl.constexpr, FP32: tl.constexpr,
           BLOCK_N: tl.constexpr, KSPLIT: tl.constexpr, VWORDS: tl.constexpr, VSPLIT: tl.constexpr,
           KBIAS: tl.constexpr, SCALES_AHEAD: tl.constexpr, VPAIRS: tl.constexpr, PTX: tl.constexpr,
           NIBWORDS: tl.constexpr, MASK: tl.constexpr, TMASK: tl.constexpr, K8: tl.constexpr = 0,
           N16: tl.constexpr = 0):
    """One K/V block of positions k0 .. k0 + BLOCK_N - 1 (< end) folded into the online softmax.
    float / int8: q0..q3 are q's KSPLIT column parts (independent dot chains); acc holds the
    output columns (acc2 the second half when VSPLIT = 2; acc / acc2 the even / odd ones when
    VPAIRS). int4 with NIBWORDS: K and V as 16-bit words of four codes, q0..q3 and acc..acc4 the
    columns 4c + r of nibble r. Otherwise int4: q0 / q1 hold q's even / odd columns (K's low / high nibbles); without VWORDS
    acc / acc2 hold the even / odd output columns (V's nibbles, no interleave), with it acc all of
    them. SCALES_AHEAD: ks_c / vs_c are this block's scales, loaded during the previous block; the
    next block's are requested here. MASK 0: a whole block of one query's (T = 1) share, every
    position visible, no masks. TMASK 0: the K / V tiles read whole (slots past the share hold
    finite codes of a quantized cache, and their scores are masked, their scales read as 0).
    K8 (int8): q0 is q in int8 codes and qbias its row scales; q . K is one int8 dot (int32 sums,
    exact) of the codes as stored, no conversion of K; K8 2: q1 holds a second level (q ~= scale *
    (q0 + q1 / 254)), a second int8 dot."""
    fdt: tl.constexpr = q0.dtype if not K8 else (tl.float32 if FP32 else tl.float16)  # p and V's operands
    kp = k0 + tl.arange(0, BLOCK_N)
    kmask = kp < end
    slot = k0 % S + tl.arange(0, BLOCK_N)  # one modulo a block: the valid positions span <= S slots
    slot = tl.where(slot >= S, slot - S, slot)
    ks_n = ks_c
    vs_n = vs_c
    if SCALES_AHEAD:
        nslot = (k0 + BLOCK_N) % S + tl.arange(0, BLOCK_N)
        nslot = tl.where(nslot >= S, nslot - S, nslot)
        nmask = kp + BLOCK_N < end
        ks_n = tl.load(KS + kvh * ssh + nslot, mask=nmask, other=0.0).to(tl.float32)
        vs_n = tl.load(VS + kvh * ssh + nslot, mask=nmask, other=0.0).to(tl.float32)
    if KV_FMT == 2 and NIBWORDS:
        KW = K.to(tl.pointer_type(tl.int16))
        dq = tl.arange(0, D // 4)
        kw = _tile(KW + kvh * (skh // 2) + slot[:, None] * (sks // 2) + dq[None, :], kmask, TMASK, -30584)
        if FP32:
            s = tl.dot(q0, tl.trans(_plane(kw, 0, KBIAS, q0.dtype, PTX)), input_precision="ieee")
            s += tl.dot(q1, tl.trans(_plane(kw, 1, KBIAS, q0.dtype, PTX)), input_precision="ieee")
            s += tl.dot(q2, tl.trans(_plane(kw, 2, KBIAS, q0.dtype, PTX)), input_precision="ieee")
            s += tl.dot(q3, tl.trans(_plane(kw, 3, KBIAS, q0.dtype, PTX)), input_precision="ieee")
        else:
            s = tl.dot(q0, tl.trans(_plane(kw, 0, KBIAS, q0.dtype, PTX, N16)))
            s += tl.dot(q1, tl.trans(_plane(kw, 1, KBIAS, q0.dtype, PTX, N16)))
            s += tl.dot(q2, tl.trans(_plane(kw, 2, KBIAS, q0.dtype, PTX, N16)))
            s += tl.dot(q3, tl.trans(_plane(kw, 3, KBIAS, q0.dtype, PTX, N16)))
        if KBIAS:
            s = s - qbias[:, None]
    elif KV_FMT == 2:
        dh = tl.arange(0, D // 2)
        kb = _tile(K + kvh * skh + slot[:, None] * sks + dh[None, :], kmask, TMASK, 136)
        ka = _nibble(kb & 15, q0.dtype)
        kz = _nibble(kb >> 4, q0.dtype)
        s = _dot(q0, tl.trans(ka), FP32) + _dot(q1, tl.trans(kz), FP32)
    elif K8:
        dk8 = tl.arange(0, D)
        kt = _tile(K + kvh * skh + slot[:, None] * sks + dk8[None, :], kmask, TMASK, 0)
        s = tl.dot(q0, tl.trans(kt), out_dtype=tl.int32).to(tl.float32)
        if K8 == 2:
            s += tl.dot(q1, tl.trans(kt), out_dtype=tl.int32).to(tl.float32) * (1.0 / 254.0)
        s = s * qbias[:, None]
    else:
        DK: tl.constexpr = D // KSPLIT
        s = _qk(q0, K, kvh, slot, kmask, skh, sks, 0, DK, KBIAS, FP32, TMASK, PTX)
        if KSPLIT >= 2:
            s += _qk(q1, K, kvh, slot, kmask, skh, sks, DK, DK, KBIAS, FP32, TMASK, PTX)
        if KSPLIT >= 4:
            s += _qk(q2, K, kvh, slot, kmask, skh, sks, 2 * DK, DK, KBIAS, FP32, TMASK, PTX)
            s += _qk(q3, K, kvh, slot, kmask, skh, sks, 3 * DK, DK, KBIAS, FP32, TMASK, PTX)
        if KBIAS:
            s = s - qbias[:, None]
    if KV_FMT != 0:
        if SCALES_AHEAD:
            ks = ks_c
            vs = vs_c
        elif MASK:
            ks = tl.load(KS + kvh * ssh + slot, mask=kmask, other=0.0).to(tl.float32)
            vs = tl.load(VS + kvh * ssh + slot, mask=kmask, other=0.0).to(tl.float32)
        else:
            ks = tl.load(KS + kvh * ssh + slot).to(tl.float32)
            vs = tl.load(VS + kvh * ssh + slot).to(tl.float32)
        s = s * ks[None, :]
    if MASK:
        valid = kmask[None, :] & (kp[None, :] <= qpos[:, None])
        if WINDOW > 0:
            valid = valid & (qpos[:, None] - kp[None, :] < WINDOW)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FMT != 0:
        p = p * vs[None, :]
    p = p.to(fdt)
    if KV_FMT == 2 and NIBWORDS:  # the dot operand loads are ldmatrix.trans of the 16-bit words
        VW = V.to(tl.pointer_type(tl.int16))
        dq = tl.arange(0, D // 4)
        vw = _tile(VW + kvh * (svh // 2) + slot[:, None] * (svs // 2) + dq[None, :], kmask, TMASK, -30584)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, _plane(vw, 0, False, fdt, PTX), input_precision="ieee")
            acc2 = acc2 * alpha[:, None] + tl.dot(p, _plane(vw, 1, False, fdt, PTX), input_precision="ieee")
            acc3 = acc3 * alpha[:, None] + tl.dot(p, _plane(vw, 2, False, fdt, PTX), input_precision="ieee")
            acc4 = acc4 * alpha[:, None] + tl.dot(p, _plane(vw, 3, False, fdt, PTX), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, _plane(vw, 0, False, fdt, PTX, N16))
            acc2 = acc2 * alpha[:, None] + tl.dot(p, _plane(vw, 1, False, fdt, PTX, N16))
            acc3 = acc3 * alpha[:, None] + tl.dot(p, _plane(vw, 2, False, fdt, PTX, N16))
            acc4 = acc4 * alpha[:, None] + tl.dot(p, _plane(vw, 3, False, fdt, PTX, N16))
    elif KV_FMT == 2 and not VWORDS:
        vb = _tile(V + kvh * svh + slot[:, None] * svs + dh[None, :], kmask, TMASK, 136)
        va = _nibble(vb & 15, fdt)
        vz = _nibble(vb >> 4, fdt)
        acc = acc * alpha[:, None] + _dot(p, va, FP32)
        acc2 = acc2 * alpha[:, None] + _dot(p, vz, FP32)
    elif VPAIRS:  # int8 V as 16-bit words of code pairs: the dot operand loads are ldmatrix.trans
        W = V.to(tl.pointer_type(tl.int16))
        dw = tl.arange(0, D // 2)
        ve, vo = _pairs(_tile(W + kvh * (svh // 2) + slot[:, None] * (svs // 2) + dw[None, :], kmask, TMASK, 0),
                        fdt, PTX)
        acc = acc * alpha[:, None] + _dot(p, ve, FP32)
        acc2 = acc2 * alpha[:, None] + _dot(p, vo, FP32)
    else:
        DV: tl.constexpr = D // VSPLIT
        acc = acc * alpha[:, None] + _pv(p, V, kvh, slot, kmask, svh, svs, 0, DV, KV_FMT, VWORDS, FP32, TMASK)
        if VSPLIT == 2:
            acc2 = acc2 * alpha[:, None] + _pv(p, V, kvh, slot, kmask, svh, svs, DV, DV, KV_FMT, VWORDS, FP32, TMASK)
    return m_new, l_i, acc, acc2, acc3, acc4, ks_n, vs_n


@triton.jit
def _rms_inv(row, ok, D: tl.constexpr, eps):
    """1 / rms of the rows at `row` [R, 1] (D values each, fp32), as RMSNorm computes it: (mean(x^2) + eps)^-1/2."""
    x = tl.load(row + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / D + tl.cast(eps, tl.float32))


@triton.jit
def _normed_part(row, W, r, ok, cols, dtype: tl.constexpr, HAS_W: tl.constexpr):
    """Columns `cols` of the rows at `row` [R, 1] normed (times 1 / rms `r`, times W[cols] with HAS_W), rounded to
    `dtype` as the norm's output is, back in fp32."""
    x = tl.load(row + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32) * r[:, None]
    if HAS_W:
        x = x * tl.load(W + cols).to(tl.float32)[None, :]
    return x.to(dtype).to(tl.float32)


@triton.jit
def _roped_part(row, W, INV, r, ok, pos, c0, DK: tl.constexpr, D: tl.constexpr, dtype: tl.constexpr):
    """Columns c0 .. c0 + DK - 1 of norm(rows) * W with RoPE at position `pos` (rotate-half pairs i, i + D / 2;
    cos / sin of pos * INV[i mod D / 2] rounded to `dtype`, as the model's tables are), fp32."""
    HALF: tl.constexpr = D // 2
    cols = c0 + tl.arange(0, DK)
    mate = tl.where(cols < HALF, cols + HALF, cols - HALF)
    x = _normed_part(row, W, r, ok, cols, dtype, True)
    xm = _normed_part(row, W, r, ok, mate, dtype, True)
    f = pos.to(tl.float32) * tl.load(INV + tl.where(cols < HALF, cols, cols - HALF))
    c = tl.cos(f).to(dtype).to(tl.float32)
    sn = tl.sin(f).to(dtype).to(tl.float32)
    sign = tl.where(cols < HALF, -1.0, 1.0)
    return x * c[None, :] + (sign * sn)[None, :] * xm


@triton.jit
def _fresh_kv(q0, q1, q2, q3, m_i, l_i, acc, acc2, KR, VR, KW, INV, pos, rk, rv, KOUT, VOUT, WRITE,
              D: tl.constexpr, KSPLIT: tl.constexpr, VSPLIT: tl.constexpr, KEQV: tl.constexpr):
    """The step's own position folded into a decode share's online softmax (float cache): k = RoPE(norm(KR) * KW),
    v = norm(VR) (no scale; KEQV: of KR's raw values), both rounded to the cache's dtype, as the cache would hold
    them; with WRITE they go to KOUT / VOUT (pos's slot). q0..q3 and acc / acc2 as `_block` holds them. rk / rv:
    1 / rms of KR's and VR's rows (`_fresh_rms`, computed by the caller right after its wait, so that their loads
    share q's trip to the L2 and the columns here come from the L1)."""
    cdt: tl.constexpr = KOUT.dtype.element_ty
    DK: tl.constexpr = D // KSPLIT
    DV: tl.constexpr = D // VSPLIT
    one = tl.full([1], 1, tl.int1)
    krow = KR + tl.zeros([1, 1], tl.int32)
    vrow = krow if KEQV else VR + tl.zeros([1, 1], tl.int32)
    k0 = _roped_part(krow, KW, INV, rk, one, pos, 0, DK, D, cdt).to(cdt)
    s = tl.sum(q0.to(tl.float32) * k0.to(tl.float32), 1)
    if WRITE:
        tl.store(KOUT + tl.arange(0, DK)[None, :], k0)
    if KSPLIT >= 2:
        k1 = _roped_part(krow, KW, INV, rk, one, pos, DK, DK, D, cdt).to(cdt)
        s += tl.sum(q1.to(tl.float32) * k1.to(tl.float32), 1)
        if WRITE:
            tl.store(KOUT + DK + tl.arange(0, DK)[None, :], k1)
    if KSPLIT >= 4:
        k2 = _roped_part(krow, KW, INV, rk, one, pos, 2 * DK, DK, D, cdt).to(cdt)
        k3 = _roped_part(krow, KW, INV, rk, one, pos, 3 * DK, DK, D, cdt).to(cdt)
        s += tl.sum(q2.to(tl.float32) * k2.to(tl.float32), 1) + tl.sum(q3.to(tl.float32) * k3.to(tl.float32), 1)
        if WRITE:
            tl.store(KOUT + 2 * DK + tl.arange(0, DK)[None, :], k2)
            tl.store(KOUT + 3 * DK + tl.arange(0, DK)[None, :], k3)
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    l_i = l_i * alpha + p
    p = p.to(q0.dtype).to(tl.float32)[:, None]  # as the blocks' p @ V takes it
    cv = tl.arange(0, DV)
    v0 = _normed_part(vrow, KW, rv, one, cv, cdt, False)
    acc = acc * alpha[:, None] + p * v0
    if WRITE:
        tl.store(VOUT + cv[None, :], v0.to(cdt))
    if VSPLIT == 2:
        v1 = _normed_part(vrow, KW, rv, one, DV + cv, cdt, False)
        acc2 = acc2 * alpha[:, None] + p * v1
        if WRITE:
            tl.store(VOUT + DV + cv[None, :], v1.to(cdt))
    return m_new, l_i, acc, acc2


@triton.jit
def _fresh_rms(KR, VR, eps, D: tl.constexpr, KEQV: tl.constexpr):
    """(rk, rv): 1 / rms of the step's raw K row at KR and V row at VR (KEQV: V is K's raw row), [1] each."""
    one = tl.full([1], 1, tl.int1)
    krow = KR + tl.zeros([1, 1], tl.int32)
    rk = _rms_inv(krow, one, D, eps)
    rv = rk if KEQV else _rms_inv(VR + tl.zeros([1, 1], tl.int32), one, D, eps)
    return rk, rv


@triton.jit
def _decode_share(n, NUM_SPLITS, UNIT: tl.constexpr):
    """Positions per decode share for n filled positions: n spread over NUM_SPLITS shares in whole
    UNITs (the kernel's BLOCK_N); shares past the fill are empty. The split kernel and the combine
    compute it alike (the combine may read the non-empty shares only)."""
    return tl.cdiv(tl.cdiv(n, NUM_SPLITS), UNIT) * UNIT


@triton.jit
def _share_bounds(pos0, pid_m, pid_s, T, WINDOW, NUM_SPLITS, G: tl.constexpr, BLOCK_M: tl.constexpr,
                  UNIT: tl.constexpr):
    """(start, end) of a decode program's share: positions start .. end - 1 of those its row block sees."""
    t_lo = (pid_m * BLOCK_M) // G
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
    hi = pos0 + t_hi
    lo = tl.where(WINDOW > 0, tl.maximum(pos0 + t_lo - WINDOW + 1, 0), 0)
    share = _decode_share(hi - lo + 1, NUM_SPLITS, UNIT)
    start = lo + pid_s * share
    return start, tl.minimum(start + share, hi + 1)


@triton.jit
def _early_tile(C, kvh, sch, scs, start, end, S, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The float cache's [BLOCK_N, D] tile of positions start .. start + BLOCK_N - 1 (those from end on read as
    0), loaded through L2 only (.cg): the tile `_attn_body`'s EARLY loads before its wait."""
    kp = start + tl.arange(0, BLOCK_N)
    slot = start % S + tl.arange(0, BLOCK_N)
    slot = tl.where(slot >= S, slot - S, slot)
    ptrs = C + kvh * sch + slot[:, None] * scs + tl.arange(0, D)[None, :]
    return tl.load(ptrs, mask=(kp < end)[:, None], other=0.0, cache_modifier=".cg")


@triton.jit
def _early_block(q0, kt, vt, m_i, l_i, acc, start, end, FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_block` of a float cache's first block (positions start .. end - 1 of it, every one visible: a decode
    share) from the tiles kt / vt `_early_tile` loaded."""
    kmask = start + tl.arange(0, BLOCK_N) < end
    s = _dot(q0, tl.trans(_codes(kt, q0.dtype)), FP32)
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(q0.dtype), _codes(vt, q0.dtype), FP32)
    return m_new, l_i, acc


@triton.jit
def _attn_body(Q, K, V, KS, VS, POS, O, MP, LP, AP, T, S, H, WINDOW, NUM_SPLITS,
               sqt, sqh, skh, sks, svh, svs, ssh, sot, soh,
               G: tl.constexpr, D: tl.constexpr, KV_FMT: tl.constexpr,
               SPLIT: tl.constexpr, FP32: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, KSPLIT: tl.constexpr, VWORDS: tl.constexpr, VSPLIT: tl.constexpr,
               KBIAS: tl.constexpr, SCALES_AHEAD: tl.constexpr, VPAIRS: tl.constexpr, PTX: tl.constexpr,
               TAIL: tl.constexpr, NIBWORDS: tl.constexpr, KQ8: tl.constexpr = 0, PDL: tl.constexpr = 0,
               PART16: tl.constexpr = 0, SHARE_UNIT: tl.constexpr = 16, SHARES_SLOWEST: tl.constexpr = 0,
               NIB16: tl.constexpr = 0, ROWS: tl.constexpr = 0, QW=None, INV=None, eps=0.0, KR=None, VR=None, KW=None,
               FRESH: tl.constexpr = 0, KEQV: tl.constexpr = 0, EARLY: tl.constexpr = 0):
    """ROWS (decode, float cache): Q holds the projection's raw rows (head h at h * D, sqh = D), and each program
    norms (QW) and rotates (RoPE, INV the inverse frequencies) its own q (`_roped_part`). FRESH: KR / VR hold the
    step's raw K / V rows (KEQV: V from K's raw rows, VR unused), normed (KW; V without a scale) and rotated (K) by
    the share holding position pos, which writes them into the cache at pos's slot and folds them into its softmax
    in place of that slot (its loop stops before pos): no other share reads the slot.
    EARLY (with ROWS, KSPLIT 1, VSPLIT 1): the share's first block of K and V loaded before the wait. Its
    positions precede pos (FRESH), or pos's slot was written by the writer layer's attention, kernels before the
    one this waits for (a KV-shared layer's q alone): no kernel this one overlaps writes them."""
    if SHARES_SLOWEST:  # grid (Hkv, row blocks, shares), else (shares, row blocks, Hkv)
        pid_s = tl.program_id(2)
        kvh = tl.program_id(0)
    else:
        pid_s = tl.program_id(0)
        kvh = tl.program_id(2)
    pid_m = tl.program_id(1)
    if ROWS:  # pos: the method's input, which no kernel of the step writes, read before the wait
        pos_in = tl.sum(tl.load(POS + tl.arange(0, 1)), 0).to(tl.int32)
    if EARLY:
        tl.static_assert(ROWS and KV_FMT == 0 and KSPLIT == 1 and VSPLIT == 1, "EARLY: the rows, one K / V part")
        e_start, e_end = _share_bounds(pos_in, pid_m, pid_s, T, WINDOW, NUM_SPLITS, G, BLOCK_M, SHARE_UNIT)
        if FRESH:
            e_end = tl.minimum(e_end, pos_in)
        k_early = _early_tile(K, kvh, skh, sks, e_start, e_end, S, BLOCK_N, D)
        v_early = _early_tile(V, kvh, svh, svs, e_start, e_end, S, BLOCK_N, D)
    if PDL:  # decode on sm_90+ (pdl.op_pdl_mode): every read and write after the wait (export/kernels/pdl.py)
        z = pdl_wait(PDL, not INTERPRET)
        Q, K, V, KS, VS, POS = Q + z, K + z, V + z, KS + z, VS + z, POS + z
        O, MP, LP, AP = O + z, MP + z, LP + z, AP + z
        if FRESH:
            KR, VR = KR + z, VR + z
    if FRESH:  # every program: the raw K / V rows' norms, their loads beside q's (the share holding pos uses them)
        rk_fresh, rv_fresh = _fresh_rms(KR + kvh * D, VR + kvh * D, eps, D, KEQV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    g = rows % G
    row_ok = t < T
    head = kvh * G + g
    if ROWS:
        pos0 = pos_in
    else:
        pos0 = tl.sum(tl.load(POS + tl.arange(0, 1)), 0).to(tl.int32)  # a 0-d scalar (also in the interpreter)
    qpos = pos0 + t
    start, end = _share_bounds(pos0, pid_m, pid_s, T, WINDOW, NUM_SPLITS, G, BLOCK_M, SHARE_UNIT)

    dtype: tl.constexpr = tl.float32 if FP32 else (tl.float16 if KV_FMT != 0 else Q.dtype.element_ty)
    qrow = Q + t[:, None] * sqt + head[:, None] * sqh
    # int4 V as nibble planes, int8 V as code pairs: acc / acc2 hold the even / odd output columns
    PLANES: tl.constexpr = (KV_FMT == 2 and not VWORDS and not NIBWORDS) or (KV_FMT == 1 and VPAIRS)
    ASM: tl.constexpr = PTX and not INTERPRET and not FP32  # inline PTX: compiled fp16 dots only
    QUADS: tl.constexpr = KV_FMT == 2 and NIBWORDS  # int4 as 16-bit words: four column planes 4c + r
    N16: tl.constexpr = NIB16 and QUADS and not FP32  # planes 1 / 3 as 16 * code (`_plane`)
    K8: tl.constexpr = KQ8 if KV_FMT == 1 else 0  # q . k as int8 dots (1 or 2 levels of q)
    if QUADS:
        c4 = 4 * tl.arange(0, D // 4)
        q0 = tl.load(qrow + c4[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        q1 = tl.load(qrow + c4[None, :] + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qrow + c4[None, :] + 2, mask=row_ok[:, None], other=0.0).to(dtype)
        q3 = tl.load(qrow + c4[None, :] + 3, mask=row_ok[:, None], other=0.0).to(tl.float32)
        if N16:  # their K planes hold 16 * code: q / 16 (a power of two, exact in fp16's normal range)
            q1 = q1 * 0.0625
            q3 = q3 * 0.0625
        q1 = q1.to(dtype)
        q3 = q3.to(dtype)
    elif KV_FMT == 2:  # K's nibble planes: q's even / odd columns
        ca = 2 * tl.arange(0, D // 2)
        q0 = tl.load(qrow + ca[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        q1 = tl.load(qrow + ca[None, :] + 1, mask=row_ok[:, None], other=0.0).to(dtype)
        q2 = q0
        q3 = q0
    elif K8:  # q as int8 codes with a scale per row (max |q| / 127), for the int8 dot with K's codes
        qf = tl.load(qrow + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q8s = tl.maximum(tl.max(tl.abs(qf), 1), 1.0e-30) / 127.0
        qr = qf / q8s[:, None]
        q0 = tl.where(qr >= 0, qr + 0.5, qr - 0.5).to(tl.int8)  # nearest, halves away from 0
        q1 = q0
        if K8 == 2:  # the remainder (|qr - q0| <= 1/2) in 254ths
            qr = (qr - q0.to(tl.float32)) * 254.0
            q1 = tl.where(qr >= 0, qr + 0.5, qr - 0.5).to(tl.int8)
        q2 = q0
        q3 = q0
    elif ROWS:  # q from the raw rows: normed and rotated here, in KSPLIT column parts
        tl.static_assert(KV_FMT == 0, "ROWS: a float cache")
        DK: tl.constexpr = D // KSPLIT
        rq = _rms_inv(qrow, row_ok, D, eps)
        q0 = _roped_part(qrow, QW, INV, rq, row_ok, pos0, 0, DK, D, dtype).to(dtype)
        q1 = q0
        q2 = q0
        q3 = q0
        if KSPLIT >= 2:
            q1 = _roped_part(qrow, QW, INV, rq, row_ok, pos0, DK, DK, D, dtype).to(dtype)
        if KSPLIT >= 4:
            q2 = _roped_part(qrow, QW, INV, rq, row_ok, pos0, 2 * DK, DK, D, dtype).to(dtype)
            q3 = _roped_part(qrow, QW, INV, rq, row_ok, pos0, 3 * DK, DK, D, dtype).to(dtype)
    else:
        DK: tl.constexpr = D // KSPLIT
        dk = tl.arange(0, DK)
        q0 = tl.load(qrow + dk[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        q1 = q0
        q2 = q0
        q3 = q0
        if KSPLIT >= 2:
            q1 = tl.load(qrow + DK + dk[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        if KSPLIT >= 4:
            q2 = tl.load(qrow + 2 * DK + dk[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
            q3 = tl.load(qrow + 3 * DK + dk[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
    acc3 = tl.zeros([BLOCK_M, 1], tl.float32)
    acc4 = tl.zeros([BLOCK_M, 1], tl.float32)
    if QUADS:
        acc = tl.zeros([BLOCK_M, D // 4], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D // 4], tl.float32)
        acc3 = tl.zeros([BLOCK_M, D // 4], tl.float32)
        acc4 = tl.zeros([BLOCK_M, D // 4], tl.float32)
    elif PLANES:
        acc = tl.zeros([BLOCK_M, D // 2], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D // 2], tl.float32)
    elif VSPLIT == 2:
        acc = tl.zeros([BLOCK_M, D // 2], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D // 2], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        acc2 = tl.zeros([BLOCK_M, 1], tl.float32)
    KB: tl.constexpr = KBIAS and not FP32  # fp32 dots take the codes as they are
    qbias = tl.zeros([BLOCK_M], tl.float32)
    if K8:
        qbias = q8s
    elif KB and QUADS:  # int4 K codes as value + 1032: the scores carry 1032 * sum(q); with N16 planes 1 / 3
        # as 1024 + 16 * code against q / 16: 1152 * the sum of their q as loaded
        qbias = 1032.0 * (tl.sum(q0.to(tl.float32), 1) + tl.sum(q2.to(tl.float32), 1))
        qbias += (1152.0 if N16 else 1032.0) * (tl.sum(q1.to(tl.float32), 1) + tl.sum(q3.to(tl.float32), 1))
    elif KB:  # int8 K codes as c + 1152: the scores carry 1152 * sum(q) (q as the dot sees it)
        qbias = 1152.0 * tl.sum(q0.to(tl.float32), 1)
        if KSPLIT >= 2:
            qbias += 1152.0 * tl.sum(q1.to(tl.float32), 1)
        if KSPLIT >= 4:
            qbias += 1152.0 * (tl.sum(q2.to(tl.float32), 1) + tl.sum(q3.to(tl.float32), 1))
    ks_c = tl.zeros([BLOCK_N], tl.float32)
    vs_c = tl.zeros([BLOCK_N], tl.float32)
    if SCALES_AHEAD:  # the first block's scales
        slot0 = start % S + tl.arange(0, BLOCK_N)
        slot0 = tl.where(slot0 >= S, slot0 - S, slot0)
        mask0 = start + tl.arange(0, BLOCK_N) < end
        ks_c = tl.load(KS + kvh * ssh + slot0, mask=mask0, other=0.0).to(tl.float32)
        vs_c = tl.load(VS + kvh * ssh + slot0, mask=mask0, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # TAIL 1 (T = 1: every position of the share is visible): the whole blocks unmasked, then the
    # partial last one, if any, masked. TAIL 2 (quantized): every block's tiles read whole, the
    # scores masked
    share_end = end
    if FRESH:  # pos itself comes from the step's rows, not from the cache: folded in first (nothing of it is
        # held through the loop), the loop stopping before it
        tl.static_assert(KV_FMT == 0, "FRESH: a float cache")
        if (start <= pos0) & (pos0 < share_end):
            m_i, l_i, acc, acc2 = _fresh_kv(q0, q1, q2, q3, m_i, l_i, acc, acc2, KR + kvh * D, VR + kvh * D, KW, INV,
                                            pos0, rk_fresh, rv_fresh, K + kvh * skh + (pos0 % S) * sks,
                                            V + kvh * svh + (pos0 % S) * svs, pid_m == 0, D, KSPLIT, VSPLIT, KEQV)
        end = tl.minimum(end, pos0)
    loop_end = end
    if TAIL == 1:
        loop_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    first = start
    if EARLY:  # the first block from the tiles loaded before the wait; the loop and the tail from the next one
        if start < end:
            m_i, l_i, acc = _early_block(q0, k_early, v_early, m_i, l_i, acc, start, end, FP32, BLOCK_N)
        first = start + BLOCK_N
    if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
        k0 = first
        while k0 < loop_end:
            m_i, l_i, acc, acc2, acc3, acc4, ks_c, vs_c = _block(
                q0, q1, q2, q3, qbias, ks_c, vs_c, m_i, l_i, acc, acc2, acc3, acc4, k0, end, qpos, kvh, K, V, KS,
                VS, S, WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, KSPLIT, VWORDS, VSPLIT, KB,
                SCALES_AHEAD, VPAIRS, ASM, NIBWORDS, TAIL != 1, TAIL == 0, K8, N16)
            k0 += BLOCK_N
    else:
        for k0 in range(first, loop_end, BLOCK_N):
            m_i, l_i, acc, acc2, acc3, acc4, ks_c, vs_c = _block(
                q0, q1, q2, q3, qbias, ks_c, vs_c, m_i, l_i, acc, acc2, acc3, acc4, k0, end, qpos, kvh, K, V, KS,
                VS, S, WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, KSPLIT, VWORDS, VSPLIT, KB,
                SCALES_AHEAD, VPAIRS, ASM, NIBWORDS, TAIL != 1, TAIL == 0, K8, N16)
    if TAIL == 1:
        if (loop_end < end) & (loop_end >= first):
            m_i, l_i, acc, acc2, acc3, acc4, ks_c, vs_c = _block(
                q0, q1, q2, q3, qbias, ks_c, vs_c, m_i, l_i, acc, acc2, acc3, acc4, loop_end, end, qpos, kvh, K, V,
                KS, VS, S, WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, KSPLIT, VWORDS, VSPLIT, KB,
                SCALES_AHEAD, VPAIRS, ASM, NIBWORDS, True, True, K8, N16)

    if N16:  # V's planes 1 / 3 summed 16 * value
        acc2 = acc2 * 0.0625
        acc4 = acc4 * 0.0625
    # output columns of acc / acc2: even / odd (int4 planes, int8 pairs), first / second half (VSPLIT 2),
    # or all; acc..acc4 the columns 4c + r (int4 words)
    if QUADS:
        ca = 4 * tl.arange(0, D // 4)
        cb = ca + 1
    elif PLANES:
        ca = 2 * tl.arange(0, D // 2)
        cb = ca + 1
    elif VSPLIT == 2:
        ca = tl.arange(0, D // 2)
        cb = ca + D // 2
    else:
        ca = tl.arange(0, D)
        cb = ca
    TWO: tl.constexpr = PLANES or VSPLIT == 2 or QUADS
    if SPLIT:  # partials (Hkv, NUM_SPLITS, G, ·) for the combine kernel; an empty share writes
        base = kvh * NUM_SPLITS * G + pid_s * G + g  # l = 0 and no acc (the combine skips it)
        ok = (g < G) & row_ok
        tl.store(MP + base, m_i, mask=ok)
        tl.store(LP + base, l_i, mask=ok)
        ok = ok & (start < share_end)
        if PART16:  # the share's output acc / l in fp16 (AP is fp16): |acc / l| <= max |V|
            inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
            acc = acc * inv_l[:, None]
            if TWO:
                acc2 = acc2 * inv_l[:, None]
            if QUADS:
                acc3 = acc3 * inv_l[:, None]
                acc4 = acc4 * inv_l[:, None]
        tl.store(AP + base[:, None] * D + ca[None, :], acc, mask=ok[:, None])
        if TWO:
            tl.store(AP + base[:, None] * D + cb[None, :], acc2, mask=ok[:, None])
        if QUADS:
            tl.store(AP + base[:, None] * D + ca[None, :] + 2, acc3, mask=ok[:, None])
            tl.store(AP + base[:, None] * D + ca[None, :] + 3, acc4, mask=ok[:, None])
    else:
        orow = O + t[:, None] * sot + head[:, None] * soh
        tl.store(orow + ca[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        if TWO:
            tl.store(orow + cb[None, :], (acc2 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        if QUADS:
            tl.store(orow + ca[None, :] + 2, (acc3 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.store(orow + ca[None, :] + 3, (acc4 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _pf_softmax(s, m_i, l_i, kp, kmask, qpos, KS, kvh, ssh, slot, WINDOW, KV_FMT: tl.constexpr, MASK: tl.constexpr):
    """Prefill: a block's raw scores s [BLOCK_M, BLOCK_N] into the online softmax (base 2: the
    scores take log2(e), and K's scales when quantized); MASK: positions past `end` (kmask), after
    the row's own or outside its window scored -inf. Returns (p, m_new, alpha, l_i)."""
    if KV_FMT != 0:
        ks = tl.load(KS + kvh * ssh + slot).to(tl.float32) * 1.4426950408889634
        s = s * ks[None, :]
    else:
        s = s * 1.4426950408889634
    if MASK:
        valid = kmask[None, :] & (kp[None, :] <= qpos[:, None])
        if WINDOW > 0:
            valid = valid & (qpos[:, None] - kp[None, :] < WINDOW)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, m_new, alpha, l_i


@triton.jit
def _pf_block(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S, WINDOW, skh, sks, svh, svs, ssh,
              D: tl.constexpr, KV_FMT: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              FRESH: tl.constexpr):
    """Prefill: one K/V block of positions k0 .. k0 + BLOCK_N - 1 into the online softmax (base 2:
    the scores carry log2(e)). MASK: the block holds positions some row must not see (causal
    diagonal, window edge, past the fill): loads past `end` read 0 and the scores are masked;
    other blocks load and score without any mask (every slot index is in the cache). Position p
    is at slot p % S of the cache, or with FRESH at row p - S of the chunk's own K/V (S = pos).
    V's columns `vc` (stored units) are this program's share of the output."""
    kp = k0 + tl.arange(0, BLOCK_N)
    if FRESH:
        slot = kp - S
    else:
        slot = kp % S
    if MASK:
        kmask = kp < end
    if KV_FMT == 2:
        dh = tl.arange(0, D // 2)
        kptr = K + kvh * skh + slot[:, None] * sks + dh[None, :]
        if MASK:
            kb = tl.load(kptr, mask=kmask[:, None], other=136)
        else:
            kb = tl.load(kptr)
        ka = _nibble(kb & 15, q.dtype)
        kz = _nibble(kb >> 4, q.dtype)
        s = _dot(q, tl.trans(ka), FP32) + _dot(qb, tl.trans(kz), FP32)
    else:
        d = tl.arange(0, D)
        kptr = K + kvh * skh + slot[:, None] * sks + d[None, :]
        if MASK:
            kt = _codes(tl.load(kptr, mask=kmask[:, None], other=0), q.dtype)
        else:
            kt = _codes(tl.load(kptr), q.dtype)
        s = _dot(q, tl.trans(kt), FP32)
    p, m_new, alpha, l_i = _pf_softmax(s, m_i, l_i, kp, kp < end, qpos, KS, kvh, ssh, slot, WINDOW, KV_FMT, MASK)
    if KV_FMT != 0:
        vs = tl.load(VS + kvh * ssh + slot).to(tl.float32)
        p = p * vs[None, :]
    if not FP32:
        p = p.to(q.dtype)
    vptr = V + kvh * svh + slot[:, None] * svs + vc[None, :]
    if KV_FMT == 2:
        if MASK:
            vb = tl.load(vptr, mask=kmask[:, None], other=136)
        else:
            vb = tl.load(vptr)
        va = _nibble(vb & 15, q.dtype)
        vz = _nibble(vb >> 4, q.dtype)
        acc = acc * alpha[:, None] + _dot(p, va, FP32)
        acc2 = acc2 * alpha[:, None] + _dot(p, vz, FP32)
    else:
        if MASK:
            vt = _codes(tl.load(vptr, mask=kmask[:, None], other=0), q.dtype)
        else:
            vt = _codes(tl.load(vptr), q.dtype)
        acc = acc * alpha[:, None] + _dot(p, vt, FP32)
    return m_new, l_i, acc, acc2


@triton.jit
def _nibble_cols(b, dtype: tl.constexpr):
    """[N, C] int4 pair bytes -> [N, 2C] values in column order (column 2j the low nibble of byte j,
    2j + 1 the high one) as dot operands."""
    x = tl.join(_nibble(b & 15, dtype), _nibble(b >> 4, dtype))
    return tl.reshape(x, (x.shape[0], x.shape[1] * 2))


@triton.jit
def _pfk_qk(s, qrow, qmask, K, kvh, slot, kmask, skh, sks, c, DK: tl.constexpr, KV_FMT: tl.constexpr,
            FP32: tl.constexpr, MASK: tl.constexpr):
    """s += q[:, c:c+DK] . K[slot, c:c+DK]^T: one D chunk of the scores, q's chunk re-read (L2)."""
    qc = tl.load(qrow + c + tl.arange(0, DK)[None, :], mask=qmask, other=0.0)
    if KV_FMT != 0 and not FP32:
        qc = qc.to(tl.float16)
    if KV_FMT == 2:
        kptr = K + kvh * skh + slot[:, None] * sks + c // 2 + tl.arange(0, DK // 2)[None, :]
        if MASK:
            kt = _nibble_cols(tl.load(kptr, mask=kmask[:, None], other=136), qc.dtype)
        else:
            kt = _nibble_cols(tl.load(kptr), qc.dtype)
    else:
        kptr = K + kvh * skh + slot[:, None] * sks + c + tl.arange(0, DK)[None, :]
        if MASK:
            kt = _codes(tl.load(kptr, mask=kmask[:, None], other=0), qc.dtype)
        else:
            kt = _codes(tl.load(kptr), qc.dtype)
    if FP32:
        return tl.dot(qc, tl.trans(kt), s, input_precision="ieee")
    return tl.dot(qc, tl.trans(kt), s)


@triton.jit
def _pfk_block(qrow, row_ok, m_i, l_i, acc, k0, end, qpos, kvh, vc, K, V, KS, VS, S, WINDOW, skh, sks, svh, svs,
               ssh, D: tl.constexpr, KV_FMT: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, FRESH: tl.constexpr, DK: tl.constexpr,
               DLOOP: tl.constexpr, VEARLY: tl.constexpr):
    """_pf_block with q . k as a GEMM over D: DK columns at a time, q's chunk read again for every
    block (from L2) instead of held, so BLOCK_M 64 / 128 fits beside the K chunks (wgmma on sm_90).
    DLOOP: the D chunks as a loop (its loads pipelined by num_stages) or unrolled. This program's
    V part (columns vc, stored units; int4 bytes unpacked in column order) is loaded first, in
    flight during q . k. Same masking and online softmax as _pf_block; acc in column order."""
    kp = k0 + tl.arange(0, BLOCK_N)
    if FRESH:
        slot = kp - S
    else:
        slot = kp % S
    kmask = kp < end
    qmask = row_ok[:, None] & (k0 >= 0)  # depends on the block: keeps the q loads in the loop
    vptr = V + kvh * svh + slot[:, None] * svs + vc[None, :]
    if VEARLY:
        if MASK:
            vraw = tl.load(vptr, mask=kmask[:, None], other=136 if KV_FMT == 2 else 0)
        else:
            vraw = tl.load(vptr)
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if DLOOP:
        for c in range(0, D, DK):
            s = _pfk_qk(s, qrow, qmask, K, kvh, slot, kmask, skh, sks, c, DK, KV_FMT, FP32, MASK)
    else:
        for c in tl.static_range(0, D, DK):
            s = _pfk_qk(s, qrow, qmask, K, kvh, slot, kmask, skh, sks, c, DK, KV_FMT, FP32, MASK)
    p, m_new, alpha, l_i = _pf_softmax(s, m_i, l_i, kp, kmask, qpos, KS, kvh, ssh, slot, WINDOW, KV_FMT, MASK)
    if FP32:
        dt: tl.constexpr = tl.float32
    elif KV_FMT != 0:
        dt: tl.constexpr = tl.float16
    else:
        dt: tl.constexpr = V.dtype.element_ty
    if KV_FMT != 0:
        vs = tl.load(VS + kvh * ssh + slot).to(tl.float32)
        p = p * vs[None, :]
    if not VEARLY:
        if MASK:
            vraw = tl.load(vptr, mask=kmask[:, None], other=136 if KV_FMT == 2 else 0)
        else:
            vraw = tl.load(vptr)
    if KV_FMT == 2:
        vt = _nibble_cols(vraw, dt)
    else:
        vt = _codes(vraw, dt)
    acc = acc * alpha[:, None] + _dot(p.to(dt), vt, FP32)  # dt is fp32 with FP32: p as it is
    return m_new, l_i, acc


@triton.jit
def _pf_step(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S, WINDOW, skh, sks, svh, svs, ssh,
             D: tl.constexpr, KV_FMT: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
             FRESH: tl.constexpr, BLOCK_M: tl.constexpr, DK: tl.constexpr, DLOOP: tl.constexpr,
             VEARLY: tl.constexpr):
    """One block through _pf_block (q held) or, DK > 0, _pfk_block (q . k over D chunks)."""
    if DK > 0:
        m_i, l_i, acc = _pfk_block(q, qb, m_i, l_i, acc, k0, end, qpos, kvh, vc, K, V, KS, VS, S, WINDOW, skh, sks,
                                   svh, svs, ssh, D, KV_FMT, FP32, BLOCK_M, BLOCK_N, MASK, FRESH, DK, DLOOP,
                                   VEARLY)
    else:
        m_i, l_i, acc, acc2 = _pf_block(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S, WINDOW,
                                        skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, MASK, FRESH)
    return m_i, l_i, acc, acc2


@triton.jit
def _pf_range(q, qb, m_i, l_i, acc, acc2, start, end, pos0, t_lo, t_hi, qpos, kvh, vc, K, V, KS, VS, S, WINDOW,
              skh, sks, svh, svs, ssh, D: tl.constexpr, KV_FMT: tl.constexpr, FP32: tl.constexpr,
              INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, FRESH: tl.constexpr, BLOCK_M: tl.constexpr = 16,
              DK: tl.constexpr = 0, DLOOP: tl.constexpr = 0, VEARLY: tl.constexpr = 0):
    """Prefill: positions [start, end) of one source (the cache, or with FRESH the chunk's own
    K/V) in blocks from `start`: [start, a) cut by the window's lower edge (masked), [a, b) seen
    whole by every row (unmasked), [b, end) the causal diagonal or the range's end (masked).
    DK > 0: each block through _pfk_block (q, qb: q's row pointers and row mask; acc2 unused)."""
    a = start
    if WINDOW > 0:
        a = start + tl.maximum(tl.cdiv(pos0 + t_hi - WINDOW + 1 - start, BLOCK_N), 0) * BLOCK_N
    a = tl.minimum(a, end)
    b = start + tl.maximum((tl.minimum(pos0 + t_lo + 1, end) - start) // BLOCK_N, 0) * BLOCK_N
    b = tl.maximum(tl.minimum(b, end), a)
    if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
        k0 = start
        while k0 < end:
            m_i, l_i, acc, acc2 = _pf_step(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S,
                                           WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N,
                                           (k0 < a) | (k0 >= b), FRESH, BLOCK_M, DK, DLOOP, VEARLY)
            k0 += BLOCK_N
    else:
        for k0 in range(start, a, BLOCK_N):
            m_i, l_i, acc, acc2 = _pf_step(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S,
                                           WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, True, FRESH,
                                           BLOCK_M, DK, DLOOP, VEARLY)
        for k0 in range(a, b, BLOCK_N):
            m_i, l_i, acc, acc2 = _pf_step(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S,
                                           WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, False, FRESH,
                                           BLOCK_M, DK, DLOOP, VEARLY)
        for k0 in range(b, end, BLOCK_N):
            m_i, l_i, acc, acc2 = _pf_step(q, qb, m_i, l_i, acc, acc2, k0, end, qpos, kvh, vc, K, V, KS, VS, S,
                                           WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32, BLOCK_N, True, FRESH,
                                           BLOCK_M, DK, DLOOP, VEARLY)
    return m_i, l_i, acc, acc2


@triton.jit
def _prefill_body(Q, K, V, KS, VS, KN, VN, POS, O, MP, LP, AP, T, S, WINDOW, NUM_SPLITS,
                  sqt, sqh, skh, sks, svh, svs, ssh, sot, soh, snkh, snkt, snvh, snvt,
                  G: tl.constexpr, D: tl.constexpr, KV_FMT: tl.constexpr, DV: tl.constexpr,
                  SPLIT: tl.constexpr, FP32: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, FRESH: tl.constexpr, DK: tl.constexpr = 0, DLOOP: tl.constexpr = 0,
                  VEARLY: tl.constexpr = 0):
    """Prefill: grid (NUM_SPLITS, cdiv(T * G, BLOCK_M), Hkv * DV). Rows are the (t, g) pairs of
    one KV head; the positions the rows can see, [lo, hi], are cut into NUM_SPLITS shares of
    whole blocks (partials combined by _prefill_combine when SPLIT); V's columns into DV parts,
    one per program (each computes the full scores, and keeps a 1 / DV accumulator). The blocks
    every row sees whole run without masks; only the window's lower edge and the causal
    diagonal are masked. FRESH: positions from pos on are read from the chunk's own K/V
    (KN, VN: (1, Hkv, T, D), float), those before it from the cache (a ring holding the window
    before the chunk); a share's two sources each walk their own blocks (_pf_range). DK > 0: q . k
    in D chunks of DK with q re-read per block (_pfk_block), int4 unpacked in column order."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    kvh = tl.program_id(2) // DV
    dv = tl.program_id(2) % DV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    g = rows % G
    row_ok = t < T
    head = kvh * G + g
    pos0 = tl.sum(tl.load(POS + tl.arange(0, 1)), 0).to(tl.int32)
    qpos = pos0 + t
    t_lo = (pid_m * BLOCK_M) // G
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
    hi = pos0 + t_hi
    lo = tl.where(WINDOW > 0, tl.maximum(pos0 + t_lo - WINDOW + 1, 0), 0)
    share = tl.cdiv(tl.cdiv(hi - lo + 1, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + pid_s * share
    end = tl.minimum(start + share, hi + 1)
    if DK > 0:  # q stays in memory: its row pointers and row mask stand in for q / qb
        vc = dv * (D // DV // (2 if KV_FMT == 2 else 1)) + tl.arange(0, D // DV // (2 if KV_FMT == 2 else 1))
        oa = dv * (D // DV) + tl.arange(0, D // DV)
        acc = tl.zeros([BLOCK_M, D // DV], tl.float32)
        acc2 = tl.zeros([BLOCK_M, 1], tl.float32)
        q = Q + t[:, None] * sqt + head[:, None] * sqh
        qb = row_ok
    elif KV_FMT == 2:  # even columns (low nibbles) in q / acc, odd ones in qb / acc2
        ca = 2 * tl.arange(0, D // 2)
        cb = ca + 1
        vc = dv * (D // 2 // DV) + tl.arange(0, D // 2 // DV)
        oa = 2 * vc
        acc = tl.zeros([BLOCK_M, D // 2 // DV], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D // 2 // DV], tl.float32)
    else:
        ca = tl.arange(0, D)
        cb = ca
        vc = dv * (D // DV) + tl.arange(0, D // DV)
        oa = vc
        acc = tl.zeros([BLOCK_M, D // DV], tl.float32)
        acc2 = tl.zeros([BLOCK_M, 1], tl.float32)
    if DK == 0:
        qrow = Q + t[:, None] * sqt + head[:, None] * sqh
        q = tl.load(qrow + ca[None, :], mask=row_ok[:, None], other=0.0)
        qb = q
        if KV_FMT == 2:
            qb = tl.load(qrow + cb[None, :], mask=row_ok[:, None], other=0.0)
        if KV_FMT != 0 and not FP32:
            q = q.to(tl.float16)
            qb = qb.to(tl.float16)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if FRESH:  # positions before pos0 from the cache, the rest from the chunk's own K/V
        m_i, l_i, acc, acc2 = _pf_range(q, qb, m_i, l_i, acc, acc2, start, tl.minimum(end, pos0), pos0, t_lo, t_hi,
                                        qpos, kvh, vc, K, V, KS, VS, S, WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT,
                                        FP32, INTERPRET, BLOCK_N, False, BLOCK_M, DK, DLOOP, VEARLY)
        m_i, l_i, acc, acc2 = _pf_range(q, qb, m_i, l_i, acc, acc2, tl.maximum(start, pos0), end, pos0, t_lo, t_hi,
                                        qpos, kvh, vc, KN, VN, KS, VS, pos0, WINDOW, snkh, snkt, snvh, snvt, ssh, D,
                                        KV_FMT, FP32, INTERPRET, BLOCK_N, True, BLOCK_M, DK, DLOOP, VEARLY)
    else:
        m_i, l_i, acc, acc2 = _pf_range(q, qb, m_i, l_i, acc, acc2, start, end, pos0, t_lo, t_hi, qpos, kvh, vc,
                                        K, V, KS, VS, S, WINDOW, skh, sks, svh, svs, ssh, D, KV_FMT, FP32,
                                        INTERPRET, BLOCK_N, False, BLOCK_M, DK, DLOOP, VEARLY)

    if SPLIT:  # partials (Hkv, NUM_SPLITS, T * G, ·); m in log2 units
        base = (kvh * NUM_SPLITS + pid_s) * T * G + rows
        tl.store(MP + base, m_i, mask=row_ok & (dv == 0))
        tl.store(LP + base, l_i, mask=row_ok & (dv == 0))
        tl.store(AP + base[:, None] * D + oa[None, :], acc, mask=row_ok[:, None])
        if KV_FMT == 2 and DK == 0:
            tl.store(AP + base[:, None] * D + oa[None, :] + 1, acc2, mask=row_ok[:, None])
    else:
        orow = O + t[:, None] * sot + head[:, None] * soh
        tl.store(orow + oa[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        if KV_FMT == 2 and DK == 0:
            tl.store(orow + oa[None, :] + 1, (acc2 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _prefill_combine(MP, LP, AP, O, T, sot, soh, NUM_SPLITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, h, d] from the prefill shares' partials; grid (cdiv(T * G, BLOCK_R), Hkv, D / BLOCK_D)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kvh = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = rows < T * G
    m_max = tl.full([BLOCK_R], -1.0e30, tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m_max = tl.maximum(m_max, tl.load(MP + (kvh * NUM_SPLITS + s) * T * G + rows, mask=ok, other=-1.0e30))
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        base = (kvh * NUM_SPLITS + s) * T * G + rows
        w = tl.math.exp2(tl.load(MP + base, mask=ok, other=-1.0e30) - m_max)
        l_sum += w * tl.load(LP + base, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(AP + base[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    t = rows // G
    head = kvh * G + rows % G
    tl.store(O + t[:, None] * sot + head[:, None] * soh + d[None, :], (acc / l_sum[:, None]).to(O.dtype.element_ty),
             mask=ok[:, None])


_FORCE = None  # configs filter set by `use_configs`
_KERNELS: dict = {}


def decode_config(head_dim: int, fmt: int) -> triton.Config:
    """The decode config: the measured best (DECODE_CONFIG) or, for other head dims, the fitting
    config with the most K/V bytes in flight. Decode is not autotuned: an export traces it at one
    fill, while its speed matters at every fill."""
    if (head_dim, fmt) in DECODE_CONFIG:
        fit = fitting([_cfg(16, *DECODE_CONFIG[head_dim, fmt])], head_dim, fmt)
        if fit:
            return fit[0]
    configs = fitting(_DECODE_ALL, head_dim, fmt)
    return max(configs, key=lambda c: (min(c.num_stages - 1, 2) * c.kwargs["BLOCK_N"], -c.num_warps))


def _kernel(decode: bool, head_dim: int, fmt: int):
    """The decode body for one head dim / KV format with its one config (first in the list a
    `use_configs` filter sees). Prefill has its own kernel and config (_prefill_kernel)."""
    assert decode, "prefill runs _prefill_body"
    first = decode_config(head_dim, fmt)
    configs = [first] + fitting(_DECODE_ALL, head_dim, fmt)
    key = (decode, head_dim, fmt, _FORCE, DECODE_CONFIG.get((head_dim, fmt)), SMEM_LIMIT,
           tuple(sorted(DECODE_KNOBS.get((head_dim, fmt), {}).items())))
    if key not in _KERNELS:
        chosen = _FORCE(configs) if _FORCE is not None else configs[:1]
        chosen = [with_knobs(c, head_dim, fmt) for c in chosen]
        _KERNELS[key] = triton.autotune(configs=chosen, key=["S", "G"])(_attn_body)
    return _KERNELS[key]


@triton.jit
def _combine(MP, LP, AP, O, soh, NUM_SPLITS, G: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr,
             CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, EAGER: tl.constexpr, PDL: tl.constexpr = 0,
             PART16: tl.constexpr = 0, POS=None, WINDOW=0, ACTIVE: tl.constexpr = 0, SHARE_UNIT: tl.constexpr = 16,
             SKIP: tl.constexpr = 0, XQ: tl.constexpr = 0, xq_ptr=None, xf_ptr=None, xc_ptr=None, cnt_ptr=None,
             NCNT=0, LEVELS: tl.constexpr = 2, XGROUP: tl.constexpr = 128, ROT: tl.constexpr = 0, rscale=1.0,
             LOG2D: tl.constexpr = 0):
    """out[h, d0:d0+BLOCK_D] = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s over the shares
    of head h; grid (H, D / BLOCK_D) so the partials are read by many programs at once. EAGER:
    every share's acc is loaded at once with its l and m (an empty share's unwritten acc is
    dropped by a select, not a load mask that waits for l), one memory round trip instead of two.
    ACTIVE: only the shares that hold positions are read, their count computed from the position
    (POS, WINDOW) as the split kernel cuts its shares (`_decode_share`, SHARE_UNIT its BLOCK_N): at a
    small fill most of the NUM_SPLITS shares are empty, and EAGER would read all of them. SKIP (with
    ACTIVE): where the used shares fit the first chunk, only its l, m and partials are read (each
    chunk's loads, even masked off, and its sum across the program's rows cost instructions and a
    shared-memory round; so do the l and m of all SPLITS_P2 shares); else all of them, as without SKIP,
    in one memory round trip.
    PART16: AP holds each share's acc_s / l_s in fp16 (half the bytes), weighted by exp(m_s - m) l_s.
    PDL: it waits first thing (export/kernels/pdl.py).
    XQ: the output is the x of an int4 GEMV that takes x as int8 levels (export/kernels/int4_matmul.py): each
    program's BLOCK_D values, rounded to O's dtype as the output would be, are whole groups of XGROUP of that
    x and go out as its levels (`_store_levels`: xq_ptr, xf_ptr, xc_ptr; LEVELS), O is not written, and the
    programs zero the GEMV's NCNT split-sum counters (cnt_ptr) as its quantize kernel would: that kernel's
    launch is gone. ROT (XQ, BLOCK_D = D = 2^LOG2D): the head's output is rotated back first (a quantized
    cache holds V rotated; hadamard.fwht times rscale = D^-1/2, rounded to O's dtype as the Hadamard op's
    output would be): the rotation's launch is gone too."""
    if PDL:
        z = pdl_wait(PDL, True)
        MP, LP, AP, O = MP + z, LP + z, AP + z, O + z
        if ACTIVE:
            POS = POS + z
        if XQ:
            xq_ptr, xf_ptr, xc_ptr, cnt_ptr = xq_ptr + z, xf_ptr + z, xc_ptr + z, cnt_ptr + z
    h = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    base = (h // G) * NUM_SPLITS * G + h % G
    used = NUM_SPLITS
    if ACTIVE:  # decode (T = 1): the positions [lo, pos] in shares of _decode_share's length
        pos0 = tl.sum(tl.load(POS + tl.arange(0, 1)), 0).to(tl.int32)
        lo = tl.where(WINDOW > 0, tl.maximum(pos0 - WINDOW + 1, 0), 0)
        n = pos0 - lo + 1
        used = tl.minimum(tl.cdiv(n, _decode_share(n, NUM_SPLITS, SHARE_UNIT)), NUM_SPLITS)
    if SKIP and ACTIVE and SPLITS_P2 > CHUNK:  # one chunk where the used shares fit it, else all in one round
        if used <= CHUNK:
            acc, l_sum = _combine_range(LP, MP, AP, base, G, D, d, used, CHUNK, CHUNK, EAGER, PART16)
        else:
            acc, l_sum = _combine_range(LP, MP, AP, base, G, D, d, used, SPLITS_P2, CHUNK, EAGER, PART16)
    else:
        acc, l_sum = _combine_range(LP, MP, AP, base, G, D, d, used, SPLITS_P2, CHUNK, EAGER, PART16)
    if XQ:
        pid = h * tl.num_programs(1) + tl.program_id(1)
        for i in range(pid * 1024, NCNT, tl.num_programs(0) * tl.num_programs(1) * 1024):
            offs = i + tl.arange(0, 1024)
            tl.store(cnt_ptr + offs, tl.zeros((1024,), dtype=tl.int32), mask=offs < NCNT)
        x = (acc / l_sum).to(O.dtype.element_ty).to(tl.float32)
        if ROT:
            tl.static_assert(BLOCK_D == D and (1 << LOG2D) == D, "the rotation takes the whole head")
            x = fwht(tl.reshape(x, (1, D)), 1, D, LOG2D) * tl.cast(rscale, tl.float32)  # fp32: AOTI passes fp64
            x = x.to(O.dtype.element_ty).to(tl.float32)
        GB: tl.constexpr = BLOCK_D // XGROUP
        _store_levels(tl.reshape(x, (GB, XGROUP // 8, 4, 2)), pid * GB + tl.arange(0, GB), xq_ptr, xf_ptr, xc_ptr,
                      tl.num_programs(0) * tl.num_programs(1) * GB, XGROUP, GB, LEVELS)
    else:
        tl.store(O + h * soh + d, (acc / l_sum).to(O.dtype.element_ty))


@triton.jit
def _combine_range(LP, MP, AP, base, G: tl.constexpr, D: tl.constexpr, d, used, LAST: tl.constexpr,
                   CHUNK: tl.constexpr, EAGER: tl.constexpr, PART16: tl.constexpr):
    """`_combine`'s (sum of the weighted partials [BLOCK_D], sum of the weighted l) over the shares 0 .. LAST - 1
    (those below `used`): their l and m in one load each, then the partials CHUNK shares at a time."""
    s = tl.arange(0, LAST)
    l = tl.load(LP + base + s * G, mask=s < used, other=0.0)
    m = tl.where(l > 0, tl.load(MP + base + s * G, mask=s < used, other=-1.0e30), -1.0e30)
    m_max = tl.max(m, 0)
    l_sum = tl.sum(l * tl.exp(m - m_max), 0)
    return _combine_chunks(LP, MP, AP, base, G, D, d, used, m_max, LAST, CHUNK, EAGER, PART16), l_sum


@triton.jit
def _combine_chunks(LP, MP, AP, base, G: tl.constexpr, D: tl.constexpr, d, used, m_max, LAST: tl.constexpr,
                    CHUNK: tl.constexpr, EAGER: tl.constexpr, PART16: tl.constexpr):
    """`_combine`'s sum over the shares 0 .. LAST - 1 (those below `used`), CHUNK at a time: [BLOCK_D]."""
    acc = tl.zeros(d.shape, tl.float32)
    for s0 in tl.static_range(0, LAST, CHUNK):  # unrolled: all chunks' loads in flight at once
        sc = s0 + tl.arange(0, CHUNK)
        lc = tl.load(LP + base + sc * G, mask=sc < used, other=0.0)
        ok = lc > 0
        w = tl.where(ok, tl.exp(tl.load(MP + base + sc * G, mask=ok, other=0.0) - m_max), 0.0)
        if PART16:
            w = w * lc
        if EAGER:
            a = tl.load(AP + (base + sc * G)[:, None] * D + d[None, :], mask=(sc < used)[:, None], other=0.0)
            acc += tl.sum(tl.where(ok[:, None], a.to(tl.float32) * w[:, None], 0.0), 0)
        else:
            a = tl.load(AP + (base + sc * G)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            acc += tl.sum(a.to(tl.float32) * w[:, None], 0)
    return acc


# ---- launch --------------------------------------------------------------------------------------

def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kv_format(k: torch.Tensor, k_scale: Optional[torch.Tensor]) -> int:
    if k_scale is None:
        return KV_FORMAT["float"]
    return KV_FORMAT[QUANT_BLOCK[k.dtype]]


def decode_splits(slots: int, kv_heads: int, head_dim: int = 0, fmt: int = 0) -> int:
    """Static number of decode shares per KV head: ~TARGET_PROGRAMS programs (DECODE_TARGET's
    for a head dim / KV format it lists) at full fill, no share shorter than 16 positions (the
    smallest BLOCK_N)."""
    target = DECODE_TARGET.get((head_dim, fmt), TARGET_PROGRAMS)
    return max(1, min(target // kv_heads, triton.cdiv(slots, 16)))


def _no_rows(q: torch.Tensor) -> dict:
    """The split kernel's ROWS / FRESH arguments switched off, every one passed (Inductor's analysis of what a
    Triton kernel writes needs all its arguments; unused pointers point at q)."""
    return dict(ROWS=0, QW=q, INV=q, eps=0.0, KR=q, VR=q, KW=q, FRESH=0, KEQV=0, EARLY=0)


def launch(q, k, v, k_scale, v_scale, pos, window: int, decode: bool, wrap=lambda f: f, k_new=None, v_new=None,
           part16: Optional[bool] = None, pdl_attr: bool = False, active: Optional[bool] = None,
           shares_slowest: Optional[bool] = None, combine_skip: Optional[bool] = None, levels: Optional[tuple] = None,
           rows: Optional[dict] = None):
    """Run the Triton kernels (`wrap` = wrap_triton inside the custom op; identity for the
    Triton interpreter in tests). `decode` needs T == 1; k_new / v_new (prefill, float cache):
    the chunk's own K/V, the cache holding the positions before it. part16: decode's partials in
    fp16 (DECODE_PARTIALS_FP16 by default). pdl_attr: decode's two kernels launched with the
    programmatic-dependent-launch attribute, as the artifact's launcher launches them (direct
    launches only: benchmarks). active: decode's combine reading only the shares that hold positions
    (by default where DECODE_ACTIVE_MIN_SPLITS says); shares_slowest: decode's grid order
    (DECODE_SHARES_SLOWEST by default); combine_skip: the combine's chunks past the shares used not run
    (DECODE_COMBINE_SKIP by default; with active only). levels (decode with more than one share per KV
    head, `decode_splits`): (group, counters, count, levels, rotate): the combine writes the output (rotated
    back by the Hadamard op's arithmetic first with rotate; `_combine`'s ROT) as the x of an int4 GEMV taking x
    as int8 levels (`_combine`'s XQ; group a divisor of D) and zeroes counters[:count], and the call returns
    that x's (planes, factors, corrections) (int4_matmul.levels_buffers), not the output. rows (decode, float
    cache): q is the projection's raw rows (1, 1, H, D) and `rows` the split kernel's ROWS / FRESH arguments
    (`attention_rows`)."""
    _, T, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    fmt = kv_format(k, k_scale)
    ks = k_scale if k_scale is not None else q  # unused pointers when float
    vs = v_scale if v_scale is not None else q
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    common = dict(G=G, D=D, KV_FMT=fmt, FP32=q.dtype == torch.float32, INTERPRET=_interpreting())
    strides = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
               ks.stride(1) if k_scale is not None else 0, out.stride(1), out.stride(2))
    if decode:
        splits = decode_splits(S, Hkv, D, fmt)
        part16 = DECODE_PARTIALS_FP16 if part16 is None else part16
        if splits > 1:
            mp = torch.empty(Hkv * splits * G, device=q.device, dtype=torch.float32)
            lp = torch.empty_like(mp)
            ap = torch.empty(Hkv * splits * G * D, device=q.device, dtype=torch.float16 if part16 else torch.float32)
        else:
            mp = lp = ap = out  # unused pointers
        slowest = DECODE_SHARES_SLOWEST if shares_slowest is None else shares_slowest
        if slowest:
            grid = lambda meta: (Hkv, triton.cdiv(G, meta["BLOCK_M"]), splits)  # noqa: E731
        else:
            grid = lambda meta: (splits, triton.cdiv(G, meta["BLOCK_M"]), Hkv)  # noqa: E731
        pdl = op_pdl_mode(q.device)  # the attribute comes from the artifact's launcher (PDL_KERNELS)
        attr = {"launch_pdl": True} if pdl and pdl_attr else {}
        unit = decode_config(D, fmt).kwargs["BLOCK_N"]  # the shares' unit, whatever config runs
        wrap(_kernel(True, D, fmt))[grid](q, k, v, ks, vs, pos, out, mp, lp, ap, T, S, H, window, splits, *strides,
                                          SPLIT=splits > 1, PDL=pdl, PART16=int(part16), SHARE_UNIT=unit,
                                          SHARES_SLOWEST=int(slowest), **common, **(rows or _no_rows(q)), **attr)
        if splits == 1:  # one share per KV head: the kernel wrote the output itself
            assert levels is None, "the output as levels comes from the combine: more than one share"
            return out
        p2 = triton.next_power_of_2(splits)
        block_d = min(D, DECODE_COMBINE_BLOCK_D) if levels is None else D if levels[4] else levels[0]
        assert D % block_d == 0, (D, block_d)
        act = splits >= DECODE_ACTIVE_MIN_SPLITS if active is None else active
        rot = levels is not None and levels[4]
        xq = levels_buffers(H * D, levels[0], levels[3], q.device) if levels is not None else (out, out, out)
        cnt, ncnt = (levels[1], levels[2]) if levels is not None else (out, 0)
        wrap(_combine)[(H, D // block_d)](mp, lp, ap, out, out.stride(2), splits, G=G, D=D, SPLITS_P2=p2,
                                          CHUNK=min(p2, 4096 // block_d), BLOCK_D=block_d, EAGER=COMBINE_EAGER,
                                          PDL=pdl, PART16=int(part16), POS=pos, WINDOW=window, ACTIVE=int(act),
                                          SHARE_UNIT=unit,
                                          SKIP=int(DECODE_COMBINE_SKIP if combine_skip is None else combine_skip),
                                          XQ=int(levels is not None), xq_ptr=xq[0], xf_ptr=xq[1], xc_ptr=xq[2],
                                          cnt_ptr=cnt, NCNT=ncnt, LEVELS=levels[3] if levels is not None else 2,
                                          XGROUP=levels[0] if levels is not None else 128,
                                          ROT=int(rot), rscale=D**-0.5,
                                          LOG2D=D.bit_length() - 1, num_warps=COMBINE_ROT_WARPS if rot else 4,
                                          **attr)
        if levels is not None:
            return xq
    else:
        bm, bn, warps, stages, dv, dk, dloop, vearly = (*prefill_config(D, fmt), 0, 0, 0)[:8]
        dv, splits = prefill_parts(T, G, Hkv, D, bm, dv, dk)
        kern = _prefill_kernel(bm, bn, warps, stages)
        grid = (splits, triton.cdiv(T * G, bm), Hkv * dv)
        if splits > 1:
            mp = torch.empty(Hkv * splits * T * G, device=q.device, dtype=torch.float32)
            lp = torch.empty_like(mp)
            ap = torch.empty(Hkv * splits * T * G * D, device=q.device, dtype=torch.float32)
        else:
            mp = lp = ap = q
        fresh = k_new is not None
        assert not fresh or fmt == 0, "the chunk's own K/V go with a float cache (a sliding ring)"
        kn, vn = (k_new, v_new) if fresh else (k, v)  # unused pointers without them
        fresh_strides = (kn.stride(1), kn.stride(2), vn.stride(1), vn.stride(2))
        wrap(kern)[grid](q, k, v, ks, vs, kn, vn, pos, out, mp, lp, ap, T, S, window, splits, *strides,
                         *fresh_strides, DV=dv, SPLIT=splits > 1, FRESH=fresh, DK=dk, DLOOP=dloop, VEARLY=vearly,
                         **common)
        if splits > 1:
            block_d = min(D, COMBINE_BLOCK_D)
            wrap(_prefill_combine)[(triton.cdiv(T * G, 16), Hkv, D // block_d)](
                mp, lp, ap, out, T, out.stride(1), out.stride(2), NUM_SPLITS=splits, G=G, D=D, BLOCK_R=16,
                BLOCK_D=block_d)
    return out


# A decode step over a float cache (every sliding ring; full layers with a bf16 cache) can hand attention the
# projection's raw q / k / v rows (`attention_rows`): its split kernel norms and rotates them and writes the step's
# K / V into the cache, no kernel of their own between the projection and attention; else the model's norm / RoPE /
# cache write, then `gemma4::attention`. Every program of the split kernel norms and rotates its KV head's q heads
# before its first dot, so the rows pay where that prologue is short: by default (unset, or "auto" in the exporting
# process) a layer takes them when its q heads per KV head times the head dim is at most ROWS_AUTO_MAX_Q (on the H100
# the 31B's 6-layer slice, sliding layers 2 x 256, stepped 1.094 -> 1.083 ms at fill 1k; E2B's, 8 x 256, 0.340 ->
# 0.353: scripts/measurements/ab_attention_rows_kvfirst_*_6l_h100.json; the 26B-A4B's 4-layer slice, 2 x 256, even at
# 0.449 ms, three launches fewer: ab_attention_rows_26b_4l_h100.json). "1" takes them on every float-cache
# layer, "0" on none (the A/B's two sides).
ATTENTION_ROWS_ENV = "GEMMA4_ATTENTION_ROWS"
ROWS_AUTO_MAX_Q = 512  # q elements a program norms and rotates (q heads per KV head x head dim)


def attention_rows_on(device: torch.device, q_per_program: int | None = None) -> bool:
    """Whether a layer whose split-kernel programs each norm and rotate `q_per_program` q elements (q heads per KV
    head x head dim; None: unknown, taken as too many) takes the raw rows on `device` (see ATTENTION_ROWS_ENV):
    CUDA only (the CPU backend's decompositions take no op that writes its arguments; its .so would call the op
    through a proxy executor it does not have)."""
    import os

    if device.type != "cuda":
        return False
    switch = os.environ.get(ATTENTION_ROWS_ENV, "auto")
    if switch in ("0", "1"):
        return switch == "1"
    return q_per_program is not None and q_per_program <= ROWS_AUTO_MAX_Q


# "1" in an exporting process: the rows' split kernel loads its share's first K / V block before its PDL wait (while
# the projection before it runs), where the head dim's knobs keep K and V in one part each (`rows_early`)
ROWS_EARLY_ENV = "GEMMA4_ATTENTION_EARLY"
ROWS_EARLY_MAX_D = 256  # the two [BLOCK_N, D] tiles held through the wait: 64 registers a thread at D 256


def rows_early(head_dim: int) -> bool:
    """Whether the rows' split kernel takes EARLY at `head_dim` (ROWS_EARLY_ENV, read at each launch: an export
    bakes it into the kernel it compiles)."""
    import os

    knobs = with_knobs(decode_config(head_dim, 0), head_dim, 0).kwargs
    return (os.environ.get(ROWS_EARLY_ENV, "0") == "1" and head_dim <= ROWS_EARLY_MAX_D
            and knobs["KSPLIT"] == 1 and knobs["VSPLIT"] == 1)


def _rope(x: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (1, 1, h, D) rotated at position pos (rotate-half pairs; cos / sin in x's dtype), as the model's
    rope_tables / apply_rope do (export/gemma4/model.py, which the kernels do not import)."""
    f = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rows_reference(q_raw, k_raw, v_raw, q_w, k_w, inv_freq, k, v, pos, window: int, eps: float) -> torch.Tensor:
    """`attention_rows` in aten ops (the CPU kernel): q = RoPE(norm(q_raw) * q_w); with k_raw, the step's
    k = RoPE(norm(k_raw) * k_w) and v = norm(v_raw) (of k_raw without v_raw) written at slot pos % S; then
    `attention` over the cache."""
    D = k.shape[-1]
    q = _rope(rms_norm_reference(q_raw.reshape(1, 1, -1, D), q_w, eps), inv_freq, pos)
    if k_raw is not None:
        rk = k_raw.reshape(1, 1, -1, D)
        kk = _rope(rms_norm_reference(rk, k_w, eps), inv_freq, pos)
        vv = rms_norm_reference(v_raw.reshape(1, 1, -1, D) if v_raw is not None else rk, None, eps)
        slot = pos % k.shape[2]
        k.index_copy_(2, slot, kk.transpose(1, 2).to(k.dtype))
        v.index_copy_(2, slot, vv.transpose(1, 2).to(v.dtype))
    return attention_reference(q, k, v, None, None, pos, window)


def rows_launch(q_raw, k_raw, v_raw, q_w, k_w, inv_freq, k, v, pos, window: int, eps: float, wrap=lambda f: f,
                **kw) -> torch.Tensor:
    """The decode kernels of `attention_rows` (`launch` with the split kernel's ROWS / FRESH; `wrap` and `kw` as
    `launch` takes them)."""
    D = k.shape[-1]
    assert k.dtype.is_floating_point, "the rows' path reads a float cache"
    q = q_raw.view(1, 1, -1, D)
    fresh = k_raw is not None
    rows = dict(ROWS=1, QW=q_w, INV=inv_freq, eps=eps, KR=k_raw if fresh else q_raw,
                VR=v_raw if v_raw is not None else (k_raw if fresh else q_raw), KW=k_w if k_w is not None else q_w,
                FRESH=int(fresh), KEQV=int(fresh and v_raw is None), EARLY=int(rows_early(D)))
    return launch(q, k, v, None, None, pos, window, True, wrap=wrap, rows=rows, **kw)


@triton_op("gemma4::attention_rows", mutates_args={"k", "v"})
def attention_rows(q_raw: torch.Tensor, k_raw: torch.Tensor, v_raw: Optional[torch.Tensor], q_w: torch.Tensor,
                   k_w: torch.Tensor, inv_freq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                   window: int, eps: float) -> torch.Tensor:
    """A decode step's attention from the projection's raw rows q_raw (1, 1, H * D), k_raw / v_raw (1, 1, Hkv * D;
    v_raw None: V from k_raw's values) over the float cache k, v (1, Hkv, S, D), which takes the step's K / V at
    slot pos % S: q and k normed (q_w, k_w) and rotated (RoPE of inv_freq (D / 2,) at pos), v normed without a
    scale, as the model's Attention does before `attention`. -> (1, 1, H, D)."""
    if q_raw.device.type != "cuda":
        return rows_reference(q_raw, k_raw, v_raw, q_w, k_w, inv_freq, k, v, pos, window, eps)
    return rows_launch(q_raw, k_raw, v_raw, q_w, k_w, inv_freq, k, v, pos, window, eps, wrap=wrap_triton)


@attention_rows.register_fake
def _attention_rows_fake(q_raw, k_raw, v_raw, q_w, k_w, inv_freq, k, v, pos, window, eps):
    return q_raw.new_empty(1, 1, q_raw.shape[-1] // k.shape[-1], k.shape[-1])


@triton_op("gemma4::attention_q_rows", mutates_args={})
def attention_q_rows(q_raw: torch.Tensor, q_w: torch.Tensor, inv_freq: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, pos: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """`attention_rows` of a layer that reads another layer's cache (KV sharing): q's rows only, nothing written."""
    if q_raw.device.type != "cuda":
        return rows_reference(q_raw, None, None, q_w, None, inv_freq, k, v, pos, window, eps)
    return rows_launch(q_raw, None, None, q_w, None, inv_freq, k, v, pos, window, eps, wrap=wrap_triton)


@attention_q_rows.register_fake
def _attention_q_rows_fake(q_raw, q_w, inv_freq, k, v, pos, window, eps):
    return q_raw.new_empty(1, 1, q_raw.shape[-1] // k.shape[-1], k.shape[-1])


def prefill_config(head_dim: int, fmt: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, DV[, DK, DLOOP, VEARLY]) of the prefill kernel:
    the measured best (PREFILL_CONFIG), else the fitting one with the largest tiles."""
    if _PREFILL_FORCE is not None:
        return _PREFILL_FORCE
    if (head_dim, fmt) in PREFILL_CONFIG:
        return PREFILL_CONFIG[head_dim, fmt]
    fits = [c for c in PREFILL_CANDIDATES if prefill_smem_bytes(c, head_dim, fmt) <= SMEM_LIMIT]
    return max(fits, key=lambda c: (c[0] * c[1] // c[4], -c[3])) if fits else (16, 16, 4, 1, 1)


def prefill_splits(T, G: int, kv_heads: int, block_m: int, dv: int) -> int:
    """Shares of the visible positions per row block: enough programs for the SMs when a static
    chunk T gives few row blocks; one when T is symbolic (an export's dynamic chunk)."""
    if not isinstance(T, int):
        return 1
    programs = triton.cdiv(T * G, block_m) * kv_heads * dv
    return max(1, min(PREFILL_MAX_SPLITS, PREFILL_TARGET_PROGRAMS // programs))


def prefill_parts(T, G: int, kv_heads: int, head_dim: int, block_m: int, dv: int, dk: int) -> tuple[int, int]:
    """(DV, position shares) of a prefill launch: the config's DV unless a D-chunked config splits
    the positions with an fp32 partial tile over PREFILL_PARTIAL_BYTES: then more V parts, or the
    config's DV in one share where the parts leave enough programs not to split."""
    splits = prefill_splits(T, G, kv_heads, block_m, dv)
    parts = dv
    while dk and splits > 1 and block_m * head_dim // parts * 4 > PREFILL_PARTIAL_BYTES and head_dim // parts > 64:
        parts *= 2
        splits = prefill_splits(T, G, kv_heads, block_m, parts)
    return (parts, splits) if splits > 1 else (dv, 1)


_PREFILL_KERNELS: dict = {}


def _prefill_kernel(bm, bn, warps, stages):
    key = (bm, bn, warps, stages)
    if key not in _PREFILL_KERNELS:
        _PREFILL_KERNELS[key] = triton.autotune(configs=[_cfg(bm, bn, warps, stages)], key=[])(_prefill_body)
    return _PREFILL_KERNELS[key]


@triton_op("gemma4::attention", mutates_args={})
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
              v_scale: Optional[torch.Tensor], pos: torch.Tensor, window: int, k_new: Optional[torch.Tensor] = None,
              v_new: Optional[torch.Tensor] = None) -> torch.Tensor:
    if q.device.type != "cuda":
        return attention_reference(q, k, v, k_scale, v_scale, pos, window, k_new, v_new)
    decode = isinstance(q.shape[1], int) and q.shape[1] == 1 and k_new is None  # the decode method
    return launch(q, k, v, k_scale, v_scale, pos, window, decode, wrap=wrap_triton, k_new=k_new, v_new=v_new)


@attention.register_fake
def _attention_fake(q, k, v, k_scale, v_scale, pos, window, k_new=None, v_new=None):
    return torch.empty_like(q)


@contextlib.contextmanager
def use_prefill_config(cfg) -> Iterator[None]:
    """Run prefill with (BLOCK_M, BLOCK_N, num_warps, num_stages, DV[, DK, DLOOP, VEARLY]) (tests,
    variant sweeps)."""
    global _PREFILL_FORCE
    saved, _PREFILL_FORCE = _PREFILL_FORCE, tuple(cfg)
    try:
        yield
    finally:
        _PREFILL_FORCE = saved


@contextlib.contextmanager
def use_configs(select) -> Iterator[None]:
    """Decode: autotune over `select(fitting_configs)` instead (tests: a forced set; --no-autotune:
    one). Prefill: use_prefill_config."""
    global _FORCE
    saved, _FORCE = _FORCE, select
    try:
        yield
    finally:
        _FORCE = saved


def _size(c):
    return (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages, c.num_warps)


def smallest(configs):
    """The smallest tiles (the Triton interpreter's tests: fastest there)."""
    return [min(configs, key=_size)]


def one_config(configs):
    """The one config a deterministic (no-autotune) export uses: decode's measured best (prefill
    has one config anyway: prefill_config)."""
    return configs[:1]
