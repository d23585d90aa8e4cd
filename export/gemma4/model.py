"""The whole Gemma 4 text decoder in one file, written for torch.export.

Numerically it follows transformers' `Gemma4ForCausalLM` (the oracle in our tests); the
structure is ours: static shapes, KV in registered buffers updated in place, one forward
that serves both chunked prefill (T up to `prefill_chunk`) and decode (T = 1).

    model(tokens[1, T], pos[1]) -> logits[1, vocab] (fp32, last position only)

writes K/V for positions pos..pos+T-1 and attends over the cache. Full layers keep `ctx` slots
and attend after the write. Sliding layers keep a ring of `sliding_window` slots whatever the
chunk: decode (T = 1) writes its slot, then attends; a prefill chunk attends over the ring (the
window before pos) plus its own fresh K/V, and only then is the ring overwritten with the
chunk's last `sliding_window` positions (by the model, after the last layer that reads that
ring). Parameter names follow the HF checkpoint minus its `model.` prefix, so loading is close
to an identity key map.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import attention_rows_on, quantize_kv  # registers torch.ops.gemma4.attention*
from ..kernels.hadamard import hadamard_rotate, rotate_rows  # registers torch.ops.gemma4.hadamard
from ..kernels import moe_int4  # noqa: F401  (registers torch.ops.gemma4.moe_route / moe_experts_int4)
from ..chain import Chain, Step
from .config import Gemma4Config


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, in fp32 (Gemma 4 scales by `weight`, not `1 + weight`)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        # pow(-0.5) rather than rsqrt: matches the reference bit for bit in fp32
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, rotary_fraction: float) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,). With rotary_fraction < 1 ("proportional" RoPE)
    the first int(fraction * head_dim / 2) use denominator head_dim and the rest are 0,
    i.e. those dimension pairs are not rotated."""
    n_rot = int(rotary_fraction * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float32) / head_dim))
    return torch.cat([inv, torch.zeros(head_dim // 2 - n_rot)])


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D) for `positions` (T,)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D). Rotate-half pairing (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class KVCache(nn.Module):
    """K and V buffers (1, Hkv, S, ·). A ring (sliding layers) writes position p at slot
    p % S; a flat cache (full layers) at slot p. With `kv_dtype` "int8" or "int4" (flat caches
    only; rings stay in the model dtype) K and V are stored quantized on write, symmetric with an
    fp16 scale per token and head in `k_scale` / `v_scale` (1, Hkv, S): int8 codes, or two int4
    codes per byte (1, Hkv, S, D / 2); see export/kernels/attention.py. Quantized K and V are
    Hadamard-rotated first (Attention rotates q and the output to match).

    `chunk_slots` > 0 (a ring that later KV-shared layers read): `chunk_k` / `chunk_v` (1,
    chunk_slots, Hkv, D) hold a prefill chunk's own K/V from the layer that computed them until
    the last reader has attended and written the window; a chain of compiled layers passes them
    this way (export/chain.py), the whole forward passes them along as tensors. Token-major, as
    the projections make them: a chunk of any T is a contiguous prefix."""

    def __init__(self, kv_heads: int, slots: int, head_dim: int, ring: bool, dtype: torch.dtype,
                 kv_dtype: str | None = None, chunk_slots: int = 0):
        super().__init__()
        self.ring = ring
        self.slots = slots
        self.quant = None if ring or kv_dtype in (None, "auto", "bf16") else kv_dtype
        if kv_dtype == "bf16" and not ring:
            dtype = torch.bfloat16
        code_dtype, width = {None: (dtype, head_dim), "int8": (torch.int8, head_dim),
                             "int4": (torch.uint8, head_dim // 2)}[self.quant]
        # persistent=False: not part of a checkpoint; the exporter/runner allocate them
        self.register_buffer("k", torch.zeros(1, kv_heads, slots, width, dtype=code_dtype), persistent=False)
        self.register_buffer("v", torch.zeros(1, kv_heads, slots, width, dtype=code_dtype), persistent=False)
        if self.quant:
            self.register_buffer("k_scale", torch.zeros(1, kv_heads, slots, dtype=torch.float16), persistent=False)
            self.register_buffer("v_scale", torch.zeros(1, kv_heads, slots, dtype=torch.float16), persistent=False)
        else:
            self.k_scale = self.v_scale = None
        self.chunked = chunk_slots > 0
        if self.chunked:
            if not ring:
                raise ValueError("chunk buffers serve rings only (a flat cache is written before it is read)")
            for b in ("chunk_k", "chunk_v"):
                self.register_buffer(b, torch.zeros(1, chunk_slots, kv_heads, width, dtype=dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep each buffer's storage dtype through `model.to(dtype)` (only device moves apply)."""
        dtypes = {b: getattr(self, b).dtype for b in self.buffer_names()}
        super()._apply(fn, recurse)
        for b, dt in dtypes.items():
            if getattr(self, b).dtype != dt:
                setattr(self, b, getattr(self, b).to(dt))
        return self

    def buffer_names(self) -> tuple[str, ...]:
        return (("k", "v", "k_scale", "v_scale") if self.quant else ("k", "v")) + (
            ("chunk_k", "chunk_v") if self.chunked else ())

    def write_chunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prefill chunk's own k, v (1, Hkv, T, D) into rows 0..T-1 of the chunk buffers."""
        rows = torch.arange(k.shape[2], device=k.device)
        self.chunk_k.index_copy_(1, rows, k.transpose(1, 2).to(self.chunk_k.dtype))
        self.chunk_v.index_copy_(1, rows, v.transpose(1, 2).to(self.chunk_v.dtype))

    def chunk(self, T) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V (1, Hkv, T, D) `write_chunk` left for a chunk of T tokens."""
        return self.chunk_k.narrow(1, 0, T).transpose(1, 2), self.chunk_v.narrow(1, 0, T).transpose(1, 2)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotated: bool = False) -> None:
        """k, v (1, Hkv, T, D) for `positions` (T,): quantized (if so configured) and written. A quantized
        cache rotates them first unless `rotated` says the caller has (Attention, with q, at decode)."""
        slots = positions % self.slots if self.ring else positions
        if self.quant:  # rotated first: spreads outlier channels over all of them before rounding
            if not rotated:
                k, v = hadamard_rotate(k), hadamard_rotate(v)
            (k, ks), (v, vs) = quantize_kv(k, self.quant), quantize_kv(v, self.quant)
            self.k_scale.index_copy_(2, slots, ks)
            self.v_scale.index_copy_(2, slots, vs)
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))

    def write_window(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ring after a prefill chunk, k, v (1, Hkv, T, D) for `positions` (T,): every slot
        takes the chunk's newest position that maps to it, if any (the last S positions win;
        static in S, whatever T)."""
        S = self.slots
        last = positions[-1]
        held = last - (last - torch.arange(S, device=k.device)) % S  # position each slot holds after (S,)
        row = held - positions[0]  # its row in the chunk (< 0: an older position, kept)
        take = (row >= 0)[:, None]
        row = row.clamp(min=0)
        self.k.copy_(torch.where(take, k.index_select(2, row).to(self.k.dtype), self.k))
        self.v.copy_(torch.where(take, v.index_select(2, row).to(self.v.dtype), self.v))


def project(module: nn.Module, x: torch.Tensor, joined: str, norm: nn.Module | None = None) -> list[torch.Tensor]:
    """The projections `module.JOINABLE[joined]` of norm(x) (those the module has, in order; x itself
    without a norm). Quantization may have joined them into one linear `joined` (their weights stacked
    by rows, `split_sizes`): one matmul reads x once and, at decode, one GEMV streams all the rows; a
    packed int4 one takes the norm into its op (quant.PackedInt4Linear.forward_rms: at decode the
    kernel that reads x computes it)."""
    fused = getattr(module, joined, None)
    linears = [fused] if fused is not None else [getattr(module, n) for n in module.JOINABLE[joined] if hasattr(module, n)]
    if norm is not None and norm.weight is not None and all(getattr(m, "forward_rms", None) for m in linears):
        ys = [m.forward_rms(x, norm.weight, norm.eps) for m in linears]  # each op computes the norm
    else:
        x = norm(x) if norm is not None else x
        ys = [m(x) for m in linears]
    return list(ys[0].split(fused.split_sizes, dim=-1)) if fused is not None else ys


class Attention(nn.Module):
    JOINABLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # linears of one input (see `project`)

    def __init__(self, cfg: Gemma4Config, i: int, cache_slots: int | None, dtype: torch.dtype,
                 kv_dtype: str | None = None, chunk_slots: int = 0):
        super().__init__()
        self.sliding = cfg.is_sliding(i)
        self.window = cfg.sliding_window
        self.head_dim = D = cfg.layer_head_dim(i)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.layer_kv_heads(i)
        self.shared = cfg.is_kv_shared(i)
        self.k_eq_v = cfg.uses_k_eq_v(i)
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        if not self.shared:  # KV-shared layers read an earlier layer's cache
            self.k_proj = nn.Linear(H, self.n_kv * D, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(H, self.n_kv * D, bias=False)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(D, cfg.rms_norm_eps, with_scale=False)
            self.kv_cache = KVCache(self.n_kv, cache_slots, D, ring=self.sliding, dtype=dtype, kv_dtype=kv_dtype,
                                    chunk_slots=chunk_slots)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)
        # the device the exported program runs on, where the model is traced on another (a low-memory export traces
        # a CPU model for CUDA; `Gemma4Model.set_target`): which ops a decode step takes depends on it. None: x's
        self.target: torch.device | None = None

    def forward(self, x, cos, sin, pos, cache: KVCache, fresh=None, norm: nn.Module | None = None,
                inv_freq: torch.Tensor | None = None):
        """-> (out, fresh): attention of norm(x) (of x without a norm) for the chunk's positions pos ..
        pos + T - 1 (pos (1,) int64). For a sliding layer's prefill chunk, `fresh` is the chunk's own K/V
        (1, Hkv, T, D) each, attended here beside the ring; the model writes them into the ring afterwards
        (a KV-shared layer gets its source layer's). Otherwise None (written already). inv_freq: the RoPE
        frequencies cos / sin come from, for a decode step that hands attention the raw rows (`_rows_step`)."""
        B, T, _ = x.shape
        D = self.head_dim
        chunk_beside_ring = self.sliding and not (isinstance(T, int) and T == 1)
        rows = project(self, x, "qkv_proj", norm)  # q[, k[, v]]
        if inv_freq is not None and self._takes_rows(T, cache, self.target or x.device):
            return self.o_proj(self._rows_step(rows, inv_freq, pos, cache).reshape(B, T, self.n_heads * D)), fresh
        q_rotated = False
        q = apply_rope(self.q_norm(rows[0].view(B, T, -1, D)), cos, sin)
        if not self.shared:
            raw_k = rows[1].view(B, T, -1, D)
            raw_v = raw_k if self.k_eq_v else rows[2].view(B, T, -1, D)
            k = apply_rope(self.k_norm(raw_k), cos, sin)
            v = self.v_norm(raw_v)  # k_eq_v: V taken before k_norm and RoPE
            if chunk_beside_ring:  # the ring still holds the window before pos: not overwritten yet
                fresh = (k.transpose(1, 2), v.transpose(1, 2))
            else:
                # a decode step into a quantized cache rotates q, k and v in one launch (`rotate_rows`);
                # a prefill chunk keeps three (the joined rows would be one more chunk-sized buffer)
                q_rotated = cache.quant is not None and isinstance(T, int) and T == 1
                if q_rotated:
                    q, k, v = rotate_rows(q, k, v)
                cache.update(pos + torch.arange(T, device=x.device), k.transpose(1, 2), v.transpose(1, 2),
                             rotated=q_rotated)
        # one op reads the cache: causal / window rule from the absolute positions, GQA inside. It takes pos
        # as the method got it: a value computed from it (positions[:1]) is a buffer Inductor fills with a
        # kernel of its own, a launch a layer at decode.
        # A quantized cache holds K, V rotated (Hadamard H, orthonormal, symmetric): q.k = (qH).(kH),
        # and sum p (vH) = (sum p v) H, so q is rotated and the output rotated back.
        if cache.quant and not q_rotated:
            q = hadamard_rotate(q)
        k_new, v_new = fresh if fresh is not None else (None, None)
        window = self.window if self.sliding else 0
        fused = getattr(self.o_proj, "forward_attention", None)
        if fused is not None and k_new is None and isinstance(T, int) and T == 1:
            # a packed o_proj takes the attention and the output's rotation (quant.PackedInt4Linear.forward_attention:
            # with its switch on, one op whose decode combine writes the GEMV's x levels, no quantize kernel of its own)
            return fused(q, cache.k, cache.v, cache.k_scale, cache.v_scale, pos, window, bool(cache.quant)), fresh
        out = torch.ops.gemma4.attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale, pos, window,
                                         k_new, v_new)  # (B, T, H, D)
        if cache.quant:
            out = hadamard_rotate(out)
        out = out.reshape(B, T, self.n_heads * D)
        return self.o_proj(out), fresh

    def _takes_rows(self, T, cache: KVCache, device: torch.device) -> bool:
        """Whether this step hands attention the raw rows: a decode step (T == 1) over a float cache on CUDA where
        the rows' switch takes them for this layer's q heads per KV head and head dim (attention.ATTENTION_ROWS_ENV)
        and the combined attention / o_proj op's switch is off."""
        from .quant import FUSED_ATTENTION_ENV  # quant imports this module

        eps_ok = self.shared or self.k_norm.eps == self.q_norm.eps == self.v_norm.eps
        return (isinstance(T, int) and T == 1 and cache.quant is None and eps_ok
                and attention_rows_on(device, self.n_heads // self.n_kv * self.head_dim)
                and os.environ.get(FUSED_ATTENTION_ENV, "0") != "1")

    def _rows_step(self, rows: list[torch.Tensor], inv_freq: torch.Tensor, pos: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """A decode step's attention (1, 1, H, D) from the projection's raw rows: the op norms and rotates q (and
        k, v, which it writes into the cache) itself (`gemma4::attention_rows`; a KV-shared layer
        `attention_q_rows`), the same values as the norms, RoPE and `KVCache.update` before `attention`."""
        window = self.window if self.sliding else 0
        eps = self.q_norm.eps
        if self.shared:
            return torch.ops.gemma4.attention_q_rows(rows[0], self.q_norm.weight, inv_freq, cache.k, cache.v, pos,
                                                     window, eps)
        return torch.ops.gemma4.attention_rows(rows[0], rows[1], None if self.k_eq_v else rows[2], self.q_norm.weight,
                                               self.k_norm.weight, inv_freq, cache.k, cache.v, pos, window, eps)


def add_linear(linear: nn.Module, x: torch.Tensor, r: torch.Tensor,
               norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, linear(h)) with h = x + norm(r). A packed int4 linear takes the add into its op
    (quant.PackedInt4Linear.forward_add: at decode a small weight's GEMV computes it and writes h)."""
    fused = getattr(linear, "forward_add", None)
    if fused is not None and norm.weight is not None:
        return fused(x, r, norm.weight, norm.eps)
    h = x + norm(r)
    return h, linear(h)


def glu_linear(linear: nn.Module, gate: torch.Tensor, up: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """linear(gelu_tanh(gate) * up); with index, up is a table [..., rows, K] and its row index is the up.
    A packed int4 linear takes gate and up (and the index) in one op with the activation
    (quant.PackedInt4Linear.forward_glu): at decode the kernel that reads x computes it (and reads the
    table's row in place)."""
    fused = getattr(linear, "forward_glu", None)
    if fused is not None:
        return fused(gate, up, index)
    if index is not None:
        up = up.index_select(-2, index).squeeze(-2)
    return linear(F.gelu(gate, approximate="tanh") * up)


class MLP(nn.Module):
    JOINABLE = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, norm: nn.Module | None = None):
        """The MLP of norm(x) (of x without a norm)."""
        gate, up = project(self, x, "gate_up_proj", norm)
        return glu_linear(self.down_proj, gate, up)

    def after_residual(self, x, r, post_norm: nn.Module, norm: nn.Module):
        """(h, self(norm(h))) with h = x + post_norm(r): a residual add and the MLP after it. A packed int4
        gate / up takes the add and both norms into its op (quant.PackedInt4Linear.forward_add_rms: at
        decode the kernel that reads x computes them and writes h)."""
        fused = getattr(self, "gate_up_proj", None)
        with_add = getattr(fused, "forward_add_rms", None)
        if (with_add is not None and post_norm.weight is not None and norm.weight is not None
                and post_norm.eps == norm.eps):
            with_mlp = getattr(fused, "forward_add_rms_mlp", None)  # with its switch on, the whole MLP as one op
            if with_mlp is not None and getattr(self.down_proj, "forward_glu", None) is not None:
                return with_mlp(self.down_proj, x, r, post_norm.weight, norm.weight, norm.eps)
            h, y = with_add(x, r, post_norm.weight, norm.weight, norm.eps)
            gate, up = y.split(fused.split_sizes, dim=-1)
            return h, glu_linear(self.down_proj, gate, up)
        h = x + post_norm(r)
        return h, self(h, norm)

    def closing(self, x, r, post_norm: nn.Module, norm: nn.Module, close_norm: nn.Module, scalar: torch.Tensor):
        """(h + close_norm(self(norm(h)))) * scalar with h = x + post_norm(r): a layer's MLP half and its closing
        residual add (a layer without per-layer inputs or experts). A packed int4 gate / up takes it all into one
        op (quant.PackedInt4Linear.forward_add_rms_mlp_close: with its switch on, at decode on CUDA the down
        GEMV's last row block writes the layer's output, no kernel of its own for the add)."""
        fused = getattr(self, "gate_up_proj", None)
        with_close = getattr(fused, "forward_add_rms_mlp_close", None)
        if (with_close is not None and getattr(self.down_proj, "forward_glu", None) is not None
                and all(n.weight is not None for n in (post_norm, norm, close_norm))
                and post_norm.eps == norm.eps == close_norm.eps):
            return with_close(self.down_proj, x, r, post_norm.weight, norm.weight, norm.eps, close_norm.weight, scalar)
        h, out = self.after_residual(x, r, post_norm, norm)
        return (h + close_norm(out)) * scalar


def ple_closing(gate: nn.Module, proj: nn.Module, x: torch.Tensor, r: torch.Tensor, norm: nn.Module,
                table: torch.Tensor, index: torch.Tensor, close_norm: nn.Module, scalar: torch.Tensor) -> torch.Tensor:
    """(h + close_norm(proj(gelu_tanh(gate(h)) * table[index]))) * scalar with h = x + norm(r): the MLP's output
    into the residual stream, the per-layer-input gate and projection (E2B / E4B) and the closing residual add.
    Packed int4 linears take it all into one op (quant.PackedInt4Linear.forward_add_ple_close: with its switch
    on, at decode on CUDA the projection's GEMV writes the layer's output, no kernel of its own for the add)."""
    with_close = getattr(gate, "forward_add_ple_close", None)
    if (with_close is not None and getattr(proj, "forward_glu", None) is not None and norm.weight is not None
            and close_norm.weight is not None and norm.eps == close_norm.eps):
        return with_close(proj, x, r, norm.weight, norm.eps, table, index, close_norm.weight, scalar)
    h, g = add_linear(gate, x, r, norm)
    p = glu_linear(proj, g, table, index)
    return (h + close_norm(p)) * scalar


def experts_of_norm(experts: nn.Module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                    norm: nn.Module) -> torch.Tensor:
    """experts(norm(x), w, idx). Packed int4 experts take the norm into their op (quant.PackedInt4Experts.forward_rms),
    where a decode token's quantize kernel may compute it."""
    fused = getattr(experts, "forward_rms", None)
    if fused is not None and norm.weight is not None:
        return fused(x, w, idx, norm.weight, norm.eps)
    return experts(norm(x), w, idx)


def experts_closing(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, ym: torch.Tensor):
    """A MoE layer's end from h = x (N, H) and the dense MLP's output ym: the experts of the norm of x, the two
    outputs' norms summed, the closing add and the layer scalar. Packed experts take it all into one op
    (quant.PackedInt4Experts.forward_rms_close: with its switch on, at decode on CUDA the experts' down kernel
    writes the layer's output, no kernel of its own for the add)."""
    norms = (layer.pre_feedforward_layernorm_2, layer.post_feedforward_layernorm_1,
             layer.post_feedforward_layernorm_2, layer.post_feedforward_layernorm)
    with_close = getattr(layer.experts, "forward_rms_close", None)
    if with_close is not None and all(n.weight is not None and n.eps == norms[0].eps for n in norms):
        return with_close(x, w, idx, norms[0].weight, norms[0].eps, ym, norms[1].weight, norms[2].weight,
                          norms[3].weight, layer.layer_scalar)
    moe = experts_of_norm(layer.experts, x, w, idx, norms[0])
    out = norms[1](ym) + norms[2](moe)
    return (x + norms[3](out)) * layer.layer_scalar


class Router(nn.Module):
    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x):  # x: (N, H) -> weights (N, K) fp32, index (N, K) int64
        # norm(x) * scale * H^-0.5, proj, softmax, top-k, renormalize, * per_expert_scale[idx]:
        # one op (on CUDA two small kernels in fp32; elsewhere these aten ops, export/kernels/moe_int4.py)
        return torch.ops.gemma4.moe_route(x, self.scale, self.proj.weight, self.per_expert_scale, self.top_k,
                                          self.norm.eps)


class Experts(nn.Module):
    """Expert weights as 3-D tensors, as in the checkpoint (float; the int4 recipe replaces this
    module by quant.PackedInt4Experts, same call)."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, w, idx):  # x: (N, H); w, idx: (N, K)
        if isinstance(x.shape[0], int) and x.shape[0] == 1:
            # decode: read only the K chosen experts
            gu = torch.einsum("h,kih->ki", x[0], self.gate_up_proj[idx[0]])
            gate, up = gu.chunk(2, dim=-1)
            y = torch.einsum("ki,khi->kh", F.gelu(gate, approximate="tanh") * up, self.down_proj[idx[0]])
            return (w[0, :, None] * y.float()).sum(0, keepdim=True).to(x.dtype)
        # prefill (T dynamic): every expert on every token, weighted by a dense (N, E) table
        gu = torch.einsum("nh,eih->nei", x, self.gate_up_proj)
        gate, up = gu.chunk(2, dim=-1)
        y = torch.einsum("nei,ehi->neh", F.gelu(gate, approximate="tanh") * up, self.down_proj)
        dense_w = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=w.dtype, device=x.device)
        dense_w = dense_w.scatter(1, idx, w)
        return torch.einsum("ne,neh->nh", dense_w, y.float()).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4Config, i: int, cache_slots: int | None, dtype: torch.dtype,
                 kv_dtype: str | None = None, chunk_slots: int = 0):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, i, cache_slots, dtype, kv_dtype, chunk_slots)
        self.mlp = MLP(H, cfg.layer_intermediate_size(i))
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: in the checkpoint
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.ple = cfg.has_ple
        if self.ple:
            self.per_layer_input_gate = nn.Linear(H, cfg.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)
            # which slice of the per-layer inputs is this layer's: a tensor (set by the model's
            # init_buffers), so one compiled layer reads every layer's slice
            self.register_buffer("ple_index", torch.tensor([i]), persistent=False)

    def forward(self, x, cos, sin, pos, cache, ple, fresh=None, inv_freq=None):
        """-> (x, fresh): see Attention.forward. ple: every layer's per-layer inputs (1, T, layers, P), this
        layer's at `ple_index` (None without them)."""
        attn, fresh = self.self_attn(x, cos, sin, pos, cache, fresh, norm=self.input_layernorm, inv_freq=inv_freq)
        if not self.moe and not self.ple:  # the MLP half and the closing add (one op for packed linears)
            return self.mlp.closing(x, attn, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                                    self.post_feedforward_layernorm, self.layer_scalar), fresh
        h, out = self.mlp.after_residual(x, attn, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        if self.moe:  # the MoE block runs beside the dense MLP, both from h
            flat = h.reshape(-1, h.shape[-1])
            w, idx = self.router(flat)
            if not self.ple:  # the experts and the closing add (one op for packed experts)
                return experts_closing(self, flat, w, idx, out.reshape(flat.shape)).view(h.shape), fresh
            moe = experts_of_norm(self.experts, flat, w, idx, self.pre_feedforward_layernorm_2).view(h.shape)
            out = self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(moe)
        # per-layer inputs (the layers without returned above): the residual add, the per-layer-input gate and
        # projection, the closing add
        return ple_closing(self.per_layer_input_gate, self.per_layer_projection, h, out, self.post_feedforward_layernorm,
                           ple, self.ple_index, self.post_per_layer_input_norm, self.layer_scalar), fresh


class Gemma4Model(nn.Module):
    """Gemma 4 text decoder with static KV caches. See the module docstring."""

    def __init__(self, cfg: Gemma4Config, ctx: int = 2048, prefill_chunk: int = 128,
                 dtype: torch.dtype = torch.float32, kv_dtype: str | None = None):
        """kv_dtype: None / "auto" (the model dtype), "bf16", "int8" or "int4" for the full
        layers' caches; sliding rings keep the model dtype."""
        super().__init__()
        if ctx > cfg.max_position_embeddings:
            raise ValueError(f"ctx {ctx} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
        self.cfg, self.ctx, self.prefill_chunk, self.kv_dtype = cfg, ctx, prefill_chunk, kv_dtype
        self.ring_size = cfg.ring_slots(ctx)
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        # sqrt(hidden) rounded to the model dtype first (73.5 in bf16 for 31B), as the reference
        self.embed_scale = _round_to(H**0.5, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.ring_size if cfg.is_sliding(i) else ctx, dtype, kv_dtype,
                         prefill_chunk if self.passes_chunk(i) else 0)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.has_ple:
            P, L = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * P)
            self.ple_scale = _round_to(P**0.5, dtype)
            self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.to(dtype)
        # RoPE frequencies stay fp32 whatever the model dtype
        self.register_buffer("inv_freq_sliding", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_full", torch.empty(cfg.global_head_dim // 2), persistent=False)
        self.init_buffers()

    def set_target(self, device: str | torch.device) -> None:
        """The device the exported program will run on, for a model traced on another one (a low-memory export traces
        its CPU copy for CUDA): the attention layers pick their decode ops for it (`Attention._takes_rows`), not for
        the device their inputs happen to be on."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.target = torch.device(device)

    @torch.no_grad()
    def init_buffers(self, zero_kv: bool = True):
        """(Re)compute the non-persistent buffers: RoPE frequencies (fp32) and, unless the
        caller allocated them as zeros already, zero KV. Needed after `to_empty()` when the
        model was built on the meta device."""
        cfg = self.cfg
        self.inv_freq_sliding.copy_(rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding, 1.0))
        self.inv_freq_full.copy_(rope_inv_freq(cfg.global_head_dim, cfg.rope_theta_full,
                                               cfg.partial_rotary_factor_full))
        for i, layer in enumerate(self.layers):
            if layer.ple:
                layer.ple_index.fill_(i)
        if zero_kv:
            self.reset_cache()

    @torch.no_grad()
    def reset_cache(self):
        for m in self.modules():
            if isinstance(m, KVCache):
                for b in m.buffer_names():
                    getattr(m, b).zero_()

    def caches(self) -> list[KVCache]:
        """The cache each layer attends over (KV-shared layers get their source's)."""
        return [self.layers[self.cfg.kv_source_layer(i)].self_attn.kv_cache
                for i in range(self.cfg.num_hidden_layers)]

    def last_reader(self, i: int) -> int:
        """The last layer that reads the cache layer `i` attends over (its own or its source's)."""
        cfg, src = self.cfg, self.cfg.kv_source_layer(i)
        return max(j for j in range(cfg.num_hidden_layers) if cfg.kv_source_layer(j) == src)

    def passes_chunk(self, i: int) -> bool:
        """Layer i is a sliding layer whose ring later (KV-shared) layers read: a prefill chunk's
        K/V must reach them before the ring is overwritten (its cache has chunk buffers)."""
        return self.cfg.is_sliding(i) and not self.cfg.is_kv_shared(i) and self.last_reader(i) != i

    def kv_cache_specs(self) -> list[dict]:
        """Every KV buffer the runner allocates; kind "chunk": a ring's chunk buffers (KVCache)."""
        return [{"fqn": f"{name}.{b}", "shape": list(getattr(m, b).shape),
                 "dtype": str(getattr(m, b).dtype).removeprefix("torch."),
                 "kind": "chunk" if b.startswith("chunk_") else "sliding" if m.ring else "full"}
                for name, m in self.named_modules() if isinstance(m, KVCache) for b in m.buffer_names()]

    def _per_layer_inputs(self, tokens, x):
        return per_layer_inputs(self, tokens, x)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (1, T) int64, pos (1,) int64 -> logits (1, vocab) fp32 of the last token."""
        cfg = self.cfg
        T = tokens.shape[1]
        positions = pos + torch.arange(T, device=tokens.device)  # (T,)
        x = self.embed_tokens(tokens) * self.embed_scale  # (1, T, H)
        ple = self._per_layer_inputs(tokens, x) if cfg.has_ple else None
        rope = {True: rope_tables(positions, self.inv_freq_sliding, x.dtype),
                False: rope_tables(positions, self.inv_freq_full, x.dtype)}
        caches = self.caches()
        # a sliding layer's chunk K/V, kept until the last layer reading its ring has attended
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        last_reader = {cfg.kv_source_layer(i): i for i in range(cfg.num_hidden_layers)}
        for i, layer in enumerate(self.layers):
            cos, sin = rope[cfg.is_sliding(i)]
            src = cfg.kv_source_layer(i)
            inv_freq = self.inv_freq_sliding if cfg.is_sliding(i) else self.inv_freq_full
            x, kv = layer(x, cos, sin, pos, caches[i], ple, fresh.get(src), inv_freq)
            if kv is not None:
                fresh[src] = kv
            if last_reader[src] == i and src in fresh:
                caches[i].write_window(positions, *fresh.pop(src))
        return head_logits(self.norm, self.lm_head, cfg.final_logit_softcapping, x)

    def chain(self) -> Chain:
        """The model as compiled units (export/chain.py): the embedding, one unit per distinct
        layer (same kind, role and tensor shapes and dtypes: the 31B's 60 layers are 2 units)
        and the head. With per-layer embeddings the carry is (x, per-layer inputs); a KV-shared
        layer's unit reads its source's cache under `kv_source.`, renamed per step."""
        cfg = self.cfg
        units: dict[str, nn.Module] = {"embed": EmbedUnit(self)}
        steps = [Step("embed")]
        seen: dict[tuple, int] = {}
        for i in range(cfg.num_hidden_layers):
            rep = seen.setdefault(self._layer_signature(i), i)
            if rep == i:
                units[f"layer{i}"] = LayerUnit(self, i)
            rename = ((f"layers.{rep}.", f"layers.{i}."),)
            if cfg.is_kv_shared(i):
                rename += ((LayerUnit.SOURCE + ".", f"layers.{cfg.kv_source_layer(i)}.self_attn.kv_cache."),)
            steps.append(Step(f"layer{rep}", rename))
        units["head"] = HeadUnit(self)
        steps.append(Step("head"))
        return Chain(units, tuple(steps))

    def _layer_signature(self, i: int) -> tuple:
        """Layers with equal signatures run the same compiled code on their own tensors: same
        kind, structure, tensor shapes and dtypes, and role towards a shared ring (its source
        passing a chunk on, a reader, the last reader writing the ring). A full cache is written
        where it is computed whoever reads it, so its source and readers need no role."""
        cfg, layer = self.cfg, self.layers[i]
        cache = self.caches()[i]
        tensors = [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False),
                   *(("cache." + n, t) for n, t in cache.named_buffers())]
        role = (self.passes_chunk(i), cfg.is_kv_shared(i), cfg.is_sliding(i) and self.last_reader(i) == i)
        return (cfg.is_sliding(i), role, tuple((n, type(m).__name__) for n, m in layer.named_modules()),
                tuple((n, tuple(t.shape), t.dtype) for n, t in tensors))


def per_layer_inputs(m: nn.Module, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PLE (1, T, layers, P): token-identity table mixed with a projection of the input
    embeddings x. `m`: the model or its embedding unit (same attribute names)."""
    cfg = m.cfg
    B, T = tokens.shape
    shape = (B, T, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
    ident = (m.embed_tokens_per_layer(tokens) * m.ple_scale).view(shape)
    proj = m.per_layer_model_projection(x) * cfg.hidden_size**-0.5
    proj = m.per_layer_projection_norm(proj.view(shape))
    return (proj + ident) * 2.0**-0.5


def head_logits(norm: nn.Module, lm_head: nn.Module, softcap: float | None, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits (1, vocab) of the last position of x (1, T, H). A packed int4 lm_head takes the final norm into
    its op (quant.PackedInt4Linear.forward_rms: at decode on CUDA x's quantize kernel computes it, as before a
    layer's q / k / v)."""
    last = x[:, -1, :]  # only the last position's logits are needed
    fused = getattr(lm_head, "forward_rms", None)
    if fused is not None and norm.weight is not None:
        logits = fused(last, norm.weight, norm.eps).float()
    else:
        logits = lm_head(norm(last)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class EmbedUnit(nn.Module):
    """(tokens (1, T), pos) -> x (1, T, H), and with per-layer embeddings (x, ple (1, T, layers,
    P)): the chain's first unit."""

    def __init__(self, model: Gemma4Model):
        super().__init__()
        self.cfg = model.cfg
        self.embed_tokens = model.embed_tokens
        self.embed_scale = model.embed_scale
        if model.cfg.has_ple:
            self.embed_tokens_per_layer = model.embed_tokens_per_layer
            self.ple_scale = model.ple_scale
            self.per_layer_model_projection = model.per_layer_model_projection
            self.per_layer_projection_norm = model.per_layer_projection_norm

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor):
        x = self.embed_tokens(tokens) * self.embed_scale
        return (x, per_layer_inputs(self, tokens, x)) if self.cfg.has_ple else x


class _CarriesHidden(nn.Module):
    """A unit whose carry is the hidden state x (1, T, H), and with PLE the per-layer inputs."""

    def _carry_of(self, cfg: Gemma4Config, like: torch.Tensor) -> None:
        self.carry_shapes = [(cfg.hidden_size,)]
        if cfg.has_ple:
            self.carry_shapes.append((cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))
        self.carry_dtype = like.dtype

    def example_carry(self, T: int) -> tuple[torch.Tensor, ...]:
        device = next(self.parameters()).device
        return tuple(torch.zeros(1, T, *s, dtype=self.carry_dtype, device=device) for s in self.carry_shapes)


class LayerUnit(_CarriesHidden):
    """(x (1, T, H)[, ple], pos) -> x: decoder layer `i` as in `Gemma4Model.forward`, held under
    the model's name `layers.{i}`. Its cache: its own, or a KV-shared layer's source cache under
    `kv_source`. A prefill chunk's K/V of a sliding cache goes into the ring after the last
    layer reading it has attended; until then it waits in the cache's chunk buffers."""

    SOURCE = "kv_source"

    def __init__(self, model: Gemma4Model, i: int):
        super().__init__()
        cfg = model.cfg
        self.index = str(i)
        self.layers = nn.ModuleDict({self.index: model.layers[i]})
        self.shared = cfg.is_kv_shared(i)
        if self.shared:
            setattr(self, self.SOURCE, model.caches()[i])
        self.last_reader = model.last_reader(i) == i  # writes the ring's window after a chunk
        self.rope_name = "inv_freq_sliding" if cfg.is_sliding(i) else "inv_freq_full"
        self.register_buffer(self.rope_name, getattr(model, self.rope_name), persistent=False)
        self._carry_of(cfg, model.layers[i].input_layernorm.weight)

    def forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        ple, pos = (None, a) if b is None else (a, b)  # (x, pos) or (x, ple, pos)
        T = x.shape[1]
        positions = pos + torch.arange(T, device=x.device)
        cos, sin = rope_tables(positions, getattr(self, self.rope_name), x.dtype)
        layer = self.layers[self.index]
        cache = getattr(self, self.SOURCE) if self.shared else layer.self_attn.kv_cache
        chunk = cache.ring and not (isinstance(T, int) and T == 1)  # a prefill chunk beside a ring
        x, fresh = layer(x, cos, sin, pos, cache, ple, cache.chunk(T) if chunk and self.shared else None,
                         getattr(self, self.rope_name))
        if fresh is not None and self.last_reader:
            cache.write_window(positions, *fresh)
        elif fresh is not None and not self.shared:
            cache.write_chunk(*fresh)
        return x


class HeadUnit(_CarriesHidden):
    """(x (1, T, H)[, ple], pos) -> fp32 logits (1, vocab) of the last position: the chain's last unit."""

    def __init__(self, model: Gemma4Model):
        super().__init__()
        self.norm, self.lm_head = model.norm, model.lm_head
        self.softcap = model.cfg.final_logit_softcapping
        self._carry_of(model.cfg, self.norm.weight)

    def forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """(x, pos) or (x, ple, pos): reads x only."""
        return head_logits(self.norm, self.lm_head, self.softcap, x)


def _round_to(x: float, dtype: torch.dtype) -> float:
    """x as the model dtype would hold it (built on cpu: works under a meta device context)."""
    return float(torch.tensor(x, dtype=dtype, device="cpu"))

