"""Weight quantization: a recipe is plain data, applied by one function, `quantize_`.

    recipe = QuantRecipe(linear=LinearQuant.INT4, group_size=32, embedding=EmbeddingQuant.INT8)
    report = quantize_(model, recipe, TargetDevice.CUDA)

Linears (the lm_head included) become int4 weight-only, group-wise along K:
- CUDA: `PackedInt4Linear`, the layout of export/kernels/int4_matmul.py (nibbles along K, one
  bf16 scale per group, symmetric, no padding), exported as `gemma4::int4_linear` whose Triton
  kernels AOTInductor compiles into the `.so`. Packed on the host, row block by row block, so
  no GPU is needed and no weight is ever whole in fp32.
- CPU: `Int4Linear` below stores packed nibbles + per-group scale and offset and dequantizes
  in the graph with plain aten ops.

MoE expert stacks (`model.Experts`, 3-D [E, N, K]) follow `linear`: with int4 they become
`PackedInt4Experts` on either target, each expert in the CUDA layout above, run by
`gemma4::moe_experts_int4` (export/kernels/moe_int4.py; the CPU backend decomposes it into
its aten reference), or with the experts' input norm `gemma4::moe_rms_experts_int4` (`forward_rms`).

The lm_head is tied to `embed_tokens` in the model; quantizing it unties it (the embedding
keeps its own tensor, bf16 or int8, for the gather). Optional int8 embedding: per-row
symmetric int8 + scale (`Int8Embedding`), dequantized after the gather.
"""

from __future__ import annotations

import enum
import fnmatch
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from export.backends.options import TargetDevice
from export.gemma4.model import Experts

GROUP_SIZES = (32, 128)  # int4 group sizes a recipe offers (--group-size); halved where K needs it


class LinearQuant(str, enum.Enum):
    NONE = "none"
    INT4 = "int4"

    def __str__(self) -> str:  # CLI help and choices show the value
        return self.value


class EmbeddingQuant(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QuantRecipe:
    """Which modules get which scheme. Module patterns are fnmatch globs on FQNs."""

    linear: LinearQuant = LinearQuant.INT4
    group_size: int = 128  # 128 (default) or 32; halved where K needs it (group_size_for)
    embedding: EmbeddingQuant = EmbeddingQuant.NONE
    linears: tuple[str, ...] = ("*",)  # every nn.Linear, lm_head included...
    skip_linears: tuple[str, ...] = ("*router.proj",)  # ...but the MoE router (tiny, sensitive)
    embeddings: tuple[str, ...] = ("embed_tokens", "embed_tokens_per_layer")

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size}: use 128 (default) or 32")

    def summary(self) -> dict:
        return {"linear": self.linear.value, "group_size": self.group_size,
                "embedding": self.embedding.value}


@dataclass
class QuantReport:
    """What `quantize_` did, by FQN (for the metadata and for tests)."""

    int4: list[str] = field(default_factory=list)
    int8_embedding: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # fqn -> why left in float
    untied_lm_head: bool = False
    joined: dict[str, list[str]] = field(default_factory=dict)  # fqn of a joined linear -> its parts

    def as_dict(self) -> dict:
        return asdict(self)


# ---- CPU int4 linear ------------------------------------------------------------------

class Int4Linear(nn.Module):
    """y = x @ W.T with W [N, K] stored as 4-bit codes, dequantized in the graph.

    Tensors (N = out_features stays dim 0 of every one of them and of every intermediate):
        qweight  uint8 [N, K/2]   byte j of row n: low nibble = code of k=2j, high = k=2j+1
        scales   dtype [N, K/g]   per group of g consecutive k
        offsets  dtype [N, K/g]   w = code * scale + offset  (asymmetric, codes 0..15)

    Dequant chain as exported (all views use -1 for dim 0, so slicing the three constants
    along dim 0 to [n0:n1] yields the same graph for rows n0..n1 of the output features):
        lo = bitwise_and(qweight, 15); hi = bitwise_right_shift(qweight, 4)   [N, K/2]
        codes = stack([lo, hi], -1).view(-1, K)                               [N, K]
        w = codes.to(dtype).view(-1, K/g, g) * scales.unsqueeze(-1) + offsets.unsqueeze(-1)
        y = linear(x, w.view(-1, K))                                          [.., N]
    An N-chunking pass can therefore split a vocab-sized matmul into slices of the three
    constants, run the chain per slice and concatenate the outputs along the last dim.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        N, K, G = out_features, in_features, in_features // group_size
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(N, G, dtype=dtype))
        self.register_buffer("offsets", torch.zeros(N, G, dtype=dtype))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, group_size: int) -> "Int4Linear":
        N, K = weight.shape
        with torch.device(weight.device):
            m = cls(K, N, group_size, weight.dtype)
        if weight.is_meta:  # the layout only (the planner's inventory)
            return m
        # Row blocks bound the fp32 temporaries (a 262144-row lm_head would otherwise need
        # several full fp32 copies of itself on the host at once).
        rows = max(1, (16 << 20) // (4 * K))
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            w = weight[r0:r1].float().view(r1 - r0, K // group_size, group_size)
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            codes = ((w - lo) / scale).round().clamp(0, 15).to(torch.uint8).view(r1 - r0, K)
            m.qweight[r0:r1] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            m.scales[r0:r1] = scale.squeeze(-1)
            m.offsets[r0:r1] = lo.squeeze(-1)
        return m

    def dequantize(self) -> torch.Tensor:
        K, g = self.in_features, self.group_size
        lo = torch.bitwise_and(self.qweight, 15)
        hi = torch.bitwise_right_shift(self.qweight, 4)
        codes = torch.stack([lo, hi], dim=-1).view(-1, K)
        w = codes.to(self.scales.dtype).view(-1, K // g, g)
        w = w * self.scales.unsqueeze(-1) + self.offsets.unsqueeze(-1)
        return w.view(-1, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _blockwise(weight: torch.Tensor, rows: int, work: torch.device | None, fn, outs) -> None:
    """Quantize `weight` [N, K] `rows` rows at a time with `fn(block) -> tensors`, written into
    the matching row ranges of `outs`. With a `work` device (the CUDA export's GPU), each block
    is moved there, quantized, and its results copied back: the arithmetic is the same IEEE
    ops elementwise, so the codes and scales are the host's bit for bit, in a fraction of the
    time (a 31B checkpoint is 31e9 values to scale, round and pack)."""
    for r0 in range(0, weight.shape[0], rows):
        block = weight[r0:r0 + rows]
        if work is not None and block.device != work:
            block = block.to(work, non_blocking=True)
        for out, value in zip(outs, fn(block)):
            out[r0:r0 + rows].copy_(value)


def quantize_work_device(device: "TargetDevice") -> torch.device | None:
    """Where quantization arithmetic runs: the GPU for a CUDA export when one is present
    (its blocks are a few MiB: the export's GPU peak does not move), else in place."""
    return torch.device("cuda") if device is TargetDevice.CUDA and torch.cuda.is_available() else None


def _rows(K: int, work: torch.device | None) -> int:
    """Rows per block: fp32 temporaries of ~16 MiB on the host, ~128 MiB on a GPU."""
    return max(1, ((128 if work is not None else 16) << 20) // (4 * K))


# Three launch fusions, each off unless its variable is "1" in the exporting process. Together they made the 31B's
# 6-layer slice decode slower on the H200 (0.875 -> 0.914 ms at fill 1k, 85 -> 66 launches a step:
# scripts/measurements/fusions_ab_31b_6l.json): with programmatic dependent launch the kernels they remove overlap
# their neighbours, while their work, moved into a GEMV's last-arriving program or the few-program combine, runs in
# series. One at a time each is slower too (H100, measure_gpu.sh fusions_split, fusions_split_*.json): fill 1k
# 1.106 -> 1.111 ms (attention), 1.105 -> 1.112 (MLP), 1.105 -> 1.109 (MLP and close).
# "1": the decode combine writes the o_proj's x levels (bit for bit the unfused pair in the op's cuda test; the 31B
# slice's logits came out rel 9.3e-3 from the plain export's: where it rotates the output back (a quantized cache)
# its sums run in another order than the Hadamard kernel's: the interpreter has shown a group's factor one ulp
# apart at D 512 with 16 shares, fp32, on a rotated float cache); "0" or unset: attention, then o_proj
FUSED_ATTENTION_ENV = "GEMMA4_FUSED_ATTENTION"
# "1" in an exporting process: a layer's gate / up GEMV also writes the down GEMV's x levels (one op for the MLP
# after its residual add; checked as FUSED_ATTENTION_ENV is, its GPU A/B measure_gpu.sh fused_mlp_ab); else two ops
FUSED_MLP_ENV = "GEMMA4_FUSED_MLP"
# "1" in an exporting process: a layer's last GEMV also writes the layer's output, its closing residual add (the
# down projection's with the MLP as one op, which FUSED_MLP_ENV's fusion is then part of; E2B / E4B's per-layer
# projection's; the 26B-A4B's experts' down kernel); checked as FUSED_ATTENTION_ENV is, its GPU A/B measure_gpu.sh
# fused_close_ab; else the add's kernel
FUSED_CLOSE_ENV = "GEMMA4_FUSED_CLOSE"
FUSED_NORMS_ENV = "GEMMA4_FUSED_NORMS"  # "0" in an exporting process: the norms stay aten ops (an A/B switch)


def fused_norms() -> bool:
    """Whether packed int4 linears take the norms before them into their ops (`forward_rms`,
    `forward_add_rms`, `forward_add`): yes unless FUSED_NORMS_ENV is "0" (scripts/export_ab.py measures
    one against the other); the model's results are the same either way."""
    return os.environ.get(FUSED_NORMS_ENV, "1") != "0"


class PackedInt4Linear(nn.Module):
    """y = gemma4::int4_linear(x, qweight, scales): W [N, K] as uint8 [N, K/2] nibbles (even k
    in the low nibble, code + 8) and bf16 scales [N, K/g], W ~= code * scale (symmetric).
    The group size is the recipe's, halved where K needs it (`group_size_for`)."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        from export.kernels.int4_matmul import group_size_for
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size_for(in_features, group_size)
        N, K = out_features, in_features
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(N, K // self.group_size, dtype=torch.bfloat16))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, group_size: int,
                   work: torch.device | None = None) -> "PackedInt4Linear":
        from export.kernels.int4_matmul import quantize_int4
        N, K = weight.shape
        with torch.device(weight.device):
            m = cls(K, N, group_size)
        if weight.is_meta:  # the layout only (the planner's inventory)
            return m
        _blockwise(weight, _rows(K, work), work, lambda b: quantize_int4(b, m.group_size), (m.qweight, m.scales))
        return m

    @classmethod
    @torch.no_grad()
    def join(cls, parts: list["PackedInt4Linear"]) -> "PackedInt4Linear":
        """One linear computing `parts` (same input) at once: their rows stacked, outputs split
        back by `split_sizes`. Rows are quantized independently, so the codes and scales are
        the parts' own."""
        K, G = parts[0].in_features, parts[0].group_size
        assert all(p.in_features == K and p.group_size == G for p in parts)
        with torch.device("meta"):
            m = cls(K, sum(p.out_features for p in parts), G)
        m.qweight = torch.cat([p.qweight for p in parts])
        m.scales = torch.cat([p.scales for p in parts])
        m.split_sizes = [p.out_features for p in parts]
        return m

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        from export.kernels.int4_matmul import dequantize_int4
        return dequantize_int4(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import export.kernels.int4_matmul  # noqa: F401  (registers torch.ops.gemma4.int4_linear)
        return torch.ops.gemma4.int4_linear(x, self.qweight, self.scales)

    def forward_glu(self, gate: torch.Tensor, up: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """forward(gelu_tanh(gate) * up) as one op (the MLP's down projection): at M == 1 on CUDA the
        activation is computed by the kernel that reads x, not by a kernel of its own. index: up is a table
        [..., rows, K] and its row index the up (the per-layer projection: read in place at M == 1, no
        gather's kernel)."""
        import export.kernels.int4_matmul  # noqa: F401  (registers torch.ops.gemma4.int4_glu_linear)
        return torch.ops.gemma4.int4_glu_linear(gate, up, self.qweight, self.scales, index)

    def forward_rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """forward(rms_norm(x) * weight) as one op (a layer's input norm and its q / k / v projection):
        at M == 1 on CUDA the norm is computed by the kernel that reads x, not by a kernel of its own
        (without `fused_norms()`: the norm in aten ops, then forward)."""
        from export.kernels.int4_matmul import rms_norm_reference  # registers torch.ops.gemma4.int4_rms_linear
        if not fused_norms():
            return self.forward(rms_norm_reference(x, weight, eps))
        return torch.ops.gemma4.int4_rms_linear(x, weight, eps, self.qweight, self.scales)

    def forward_add_rms(self, x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, forward(rms_norm(h) * weight)) with h = x + rms_norm(r) * weight_r, as one op (the residual add
        after attention and the MLP's norm): at M == 1 on CUDA the quantize kernel computes both norms and
        the add and writes h, no kernel of their own (without `fused_norms()`: aten ops, then forward)."""
        from export.kernels.int4_matmul import rms_norm_reference  # registers torch.ops.gemma4.int4_add_rms_linear
        if not fused_norms():
            h = x + rms_norm_reference(r, weight_r, eps)
            return h, self.forward(rms_norm_reference(h, weight, eps))
        return torch.ops.gemma4.int4_add_rms_linear(x, r, weight_r, weight, eps, self.qweight, self.scales)

    def forward_add_rms_mlp(self, down: "PackedInt4Linear", x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor,
                            weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, down.forward_glu(gate, up)) with (h, [gate, up]) = forward_add_rms(...): this joined gate / up
        projection, the activation and the down projection after the residual add, as one op where
        FUSED_MLP_ENV is "1" (export/kernels/int4_mlp.py: at decode on CUDA the gate / up GEMV writes the down
        GEMV's x levels, no quantize kernel of its own); else forward_add_rms then down.forward_glu."""
        import export.kernels.int4_mlp  # noqa: F401  (registers torch.ops.gemma4.int4_add_rms_mlp)
        if os.environ.get(FUSED_MLP_ENV, "0") != "1" or not fused_norms():
            h, y = self.forward_add_rms(x, r, weight_r, weight, eps)
            gate, up = y.split(self.split_sizes, dim=-1)
            return h, down.forward_glu(gate, up)
        return torch.ops.gemma4.int4_add_rms_mlp(x, r, weight_r, weight, eps, self.qweight, self.scales, down.qweight,
                                                 down.scales)

    def forward_add_rms_mlp_close(self, down: "PackedInt4Linear", x: torch.Tensor, r: torch.Tensor,
                                  weight_r: torch.Tensor, weight: torch.Tensor, eps: float, weight_c: torch.Tensor,
                                  scalar: torch.Tensor) -> torch.Tensor:
        """(h + rms_norm(y) * weight_c) * scalar with (h, y) = forward_add_rms_mlp(...): a layer's MLP half and its
        closing residual add, as one op where FUSED_CLOSE_ENV is "1" (export/kernels/int4_mlp.py
        `int4_add_rms_mlp_close`: at decode on CUDA the down GEMV's last row block writes it, no kernel of its own);
        else forward_add_rms_mlp, then the add in aten ops."""
        import export.kernels.int4_mlp  # noqa: F401  (registers torch.ops.gemma4.int4_add_rms_mlp_close)
        from export.kernels.int4_matmul import close_reference
        if os.environ.get(FUSED_CLOSE_ENV, "0") != "1" or not fused_norms():
            h, y = self.forward_add_rms_mlp(down, x, r, weight_r, weight, eps)
            return close_reference(h, y, weight_c, eps, scalar)
        return torch.ops.gemma4.int4_add_rms_mlp_close(x, r, weight_r, weight, eps, self.qweight, self.scales,
                                                       down.qweight, down.scales, weight_c, scalar)

    def forward_add_ple_close(self, proj: "PackedInt4Linear", x: torch.Tensor, r: torch.Tensor,
                              weight_r: torch.Tensor, eps: float, table: torch.Tensor, index: torch.Tensor,
                              weight_c: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        """(h + rms_norm(p) * weight_c) * scalar with (h, g) = forward_add(x, r, weight_r, eps) (this linear the
        per-layer-input gate) and p = proj.forward_glu(g, table, index): E2B / E4B's layer end as one op where
        FUSED_CLOSE_ENV is "1" (export/kernels/int4_ple.py `int4_add_ple_close`: at decode on CUDA the
        projection's GEMV writes it, no kernel of its own); else the two ops, then the add in aten ops."""
        import export.kernels.int4_ple  # noqa: F401  (registers torch.ops.gemma4.int4_add_ple_close)
        from export.kernels.int4_matmul import close_reference
        if os.environ.get(FUSED_CLOSE_ENV, "0") != "1" or not fused_norms():
            h, g = self.forward_add(x, r, weight_r, eps)
            return close_reference(h, proj.forward_glu(g, table, index), weight_c, eps, scalar)
        return torch.ops.gemma4.int4_add_ple_close(x, r, weight_r, eps, self.qweight, self.scales, table, index,
                                                   proj.qweight, proj.scales, weight_c, scalar)

    def forward_add(self, x: torch.Tensor, r: torch.Tensor, weight_r: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, forward(h)) with h = x + rms_norm(r) * weight_r, as one op (the MLP's output into the residual
        stream and the per-layer-input gate): at M == 1 on CUDA a small weight's GEMV computes the add and
        writes h, no kernel of its own (without `fused_norms()`: aten ops, then forward)."""
        from export.kernels.int4_matmul import rms_norm_reference  # registers torch.ops.gemma4.int4_add_linear
        if not fused_norms():
            h = x + rms_norm_reference(r, weight_r, eps)
            return h, self.forward(h)
        return torch.ops.gemma4.int4_add_linear(x, r, weight_r, eps, self.qweight, self.scales)

    def forward_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None,
                          v_scale: torch.Tensor | None, pos: torch.Tensor, window: int,
                          rotate: bool = False) -> torch.Tensor:
        """forward(R(attention(q, k, v, ...))) (q [1, T, H, D] over the cache k, v; `gemma4::attention`; R the
        Hadamard rotation back with rotate) as one op (a layer's attention and its o_proj): at a decode step on
        CUDA the attention's combine writes the GEMV's x as its int8 levels, no quantize kernel (nor rotation)
        of its own (export/kernels/attention_linear.py), where FUSED_ATTENTION_ENV is "1"; else the ops."""
        import export.kernels.attention_linear  # noqa: F401  (registers torch.ops.gemma4.attention_int4_linear)
        from export.kernels.hadamard import hadamard_rotate
        if os.environ.get(FUSED_ATTENTION_ENV, "0") != "1":
            out = torch.ops.gemma4.attention(q, k, v, k_scale, v_scale, pos, window)
            if rotate:
                out = hadamard_rotate(out)
            return self.forward(out.reshape(*out.shape[:2], -1))
        return torch.ops.gemma4.attention_int4_linear(q, k, v, k_scale, v_scale, pos, window, self.qweight,
                                                      self.scales, rotate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class PackedInt4Stack(nn.Module):
    """One expert stack W [E, N, K] in the int4 layout, expert by expert: qweight uint8
    [E, N, K/2], scales bf16 [E, N, K/g] (g: the recipe's group size, halved where K needs it)."""

    def __init__(self, experts: int, in_features: int, out_features: int, group_size: int):
        super().__init__()
        from export.kernels.int4_matmul import group_size_for
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.group_size = group_size_for(in_features, group_size)
        E, N, K = experts, out_features, in_features
        self.register_buffer("qweight", torch.zeros(E, N, K // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(E, N, K // self.group_size, dtype=torch.bfloat16))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, group_size: int,
                   work: torch.device | None = None) -> "PackedInt4Stack":
        from export.kernels.int4_matmul import quantize_int4
        E, N, K = weight.shape
        m = cls(E, K, N, group_size).to(weight.device)
        if weight.is_meta:
            return m
        # the experts one after another as rows of one [E*N, K] matrix (groups never cross rows)
        _blockwise(weight.reshape(E * N, K), _rows(K, work), work, lambda b: quantize_int4(b, m.group_size),
                   (m.qweight.view(E * N, K // 2), m.scales.view(E * N, -1)))
        return m

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        from export.kernels.moe_int4 import dequantize_experts
        return dequantize_experts(self.qweight, self.scales, dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")


class PackedInt4Experts(nn.Module):
    """`model.Experts` with int4 stacks (same call: x [N, H], weights and ids [N, top_k]):
    y = gemma4::moe_experts_int4(x, weights, idx, gate_up_proj.*, down_proj.*). Decode reads only
    the chosen experts' bytes; prefill groups the tokens by expert."""

    def __init__(self, gate_up_proj: PackedInt4Stack, down_proj: PackedInt4Stack):
        super().__init__()
        self.gate_up_proj = gate_up_proj  # [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up
        self.down_proj = down_proj  # [E, H, I]

    @classmethod
    def from_float(cls, experts: nn.Module, group_size: int,
                   work: torch.device | None = None) -> "PackedInt4Experts":
        return cls(PackedInt4Stack.from_float(experts.gate_up_proj, group_size, work),
                   PackedInt4Stack.from_float(experts.down_proj, group_size, work))

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        import export.kernels.moe_int4  # noqa: F401  (registers torch.ops.gemma4.moe_experts_int4)
        gu, down = self.gate_up_proj, self.down_proj
        return torch.ops.gemma4.moe_experts_int4(x, w, idx, gu.qweight, gu.scales, down.qweight, down.scales)

    def forward_rms(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """forward(rms_norm(x) * weight) as one op (gemma4::moe_rms_experts_int4: with `moe_int4.GATE_UP_Q` a decode
        token's norm is computed by x's quantize kernel, not by a kernel of its own); without `fused_norms()`: the
        norm in aten ops, then forward."""
        from export.kernels.int4_matmul import rms_norm_reference
        if not fused_norms():
            return self.forward(rms_norm_reference(x, weight, eps), w, idx)
        gu, down = self.gate_up_proj, self.down_proj
        return torch.ops.gemma4.moe_rms_experts_int4(x, weight, eps, w, idx, gu.qweight, gu.scales, down.qweight,
                                                     down.scales)

    def forward_rms_close(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, eps: float,
                          ym: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wc: torch.Tensor,
                          scalar: torch.Tensor) -> torch.Tensor:
        """A MoE layer's end, (x + rms_norm(rms_norm(ym) * w1 + rms_norm(y) * w2) * wc) * scalar with y =
        forward_rms(x, w, idx, weight, eps) and ym the dense MLP's output, as one op where FUSED_CLOSE_ENV is "1"
        (gemma4::moe_rms_experts_close: at decode on CUDA the experts' down kernel writes it, no kernel of its own
        for the add); else forward_rms, then the add in aten ops."""
        from export.kernels.moe_int4 import moe_close_reference  # registers torch.ops.gemma4.moe_rms_experts_close
        if os.environ.get(FUSED_CLOSE_ENV, "0") != "1" or not fused_norms():
            return moe_close_reference(x, self.forward_rms(x, w, idx, weight, eps), ym, w1, w2, wc, eps, scalar)
        gu, down = self.gate_up_proj, self.down_proj
        return torch.ops.gemma4.moe_rms_experts_close(x, weight, eps, w, idx, gu.qweight, gu.scales, down.qweight,
                                                      down.scales, ym, w1, w2, wc, scalar)


class Int8Embedding(nn.Module):
    """Embedding table as int8 rows + one scale per row; rows are dequantized after the
    gather, so only T rows are ever in float. Same call signature as nn.Embedding."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, dtype=dtype))

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, work: torch.device | None = None) -> "Int8Embedding":
        V, D = weight.shape
        with torch.device(weight.device):
            m = cls(V, D, weight.dtype)
        if weight.is_meta:  # the layout only (the planner's inventory)
            return m

        def rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w = block.float()
            amax = w.abs().amax(-1)
            scale = (amax / torch.full_like(amax, 127.0)).clamp_min(1e-8)  # tensor divisor: see quantize_int4
            return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale

        _blockwise(weight, _rows(D, work), work, rows, (m.weight, m.scales))
        return m

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight).to(self.scales.dtype)
        return rows * F.embedding(tokens, self.scales.unsqueeze(-1))


# ---- the one entry point ----------------------------------------------------------------

def _matches(fqn: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def _set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, leaf = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _untie_lm_head(model: nn.Module, report: QuantReport) -> None:
    """Give lm_head its own Parameter object (sharing storage, no copy), so replacing or
    quantizing it leaves embed_tokens' tensor alone."""
    head, emb = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach(), requires_grad=False)
        report.untied_lm_head = True


def _linear_skip_reason(fqn: str, lin: nn.Linear, recipe: QuantRecipe, device: TargetDevice) -> str | None:
    if lin.bias is not None:
        return "has a bias"
    if lin.in_features % 32:
        return f"in_features {lin.in_features} is not a multiple of 32 (the smallest int4 group)"
    if device is TargetDevice.CUDA and lin.weight.dtype != torch.bfloat16:
        return "the int4 CUDA kernels take bf16 activations: export with bf16 weights"
    return None


def _experts_skip_reason(mod: nn.Module, device: TargetDevice) -> str | None:
    E, I2, H = mod.gate_up_proj.shape
    if H % 32 or (I2 // 2) % 32:
        return f"hidden {H} / moe_intermediate {I2 // 2}: both must be multiples of 32 (the smallest int4 group)"
    if device is TargetDevice.CUDA and mod.gate_up_proj.dtype != torch.bfloat16:
        return "the int4 CUDA kernels take bf16 activations: export with bf16 weights"
    return None


def quantize_(model: nn.Module, recipe: QuantRecipe, device: TargetDevice,
              under: str | None = None, progress=None, report: QuantReport | None = None) -> QuantReport:
    """Quantize `model` in place following `recipe` for `device`; returns what was done.

    `under` limits the work to one subtree (e.g. a decoder layer just loaded), so a loader
    can quantize unit by unit; the lm_head untie happens whenever lm_head is in scope.
    `progress(n)` is called once per module handled. Pass `report` to accumulate over calls.
    """
    report = report if report is not None else QuantReport()
    work = quantize_work_device(device)
    in_scope = (lambda fqn: fqn == under or fqn.startswith(under + ".")) if under else (lambda fqn: True)
    if recipe.linear is LinearQuant.INT4 and in_scope("lm_head"):
        _untie_lm_head(model, report)
    if recipe.embedding is EmbeddingQuant.INT8 and in_scope("lm_head") and not report.untied_lm_head:
        _untie_lm_head(model, report)  # the float head must not become the int8 table
    for fqn, mod in list(model.named_modules()):
        if not fqn or not in_scope(fqn):
            continue
        if isinstance(mod, Experts) and recipe.linear is LinearQuant.INT4:
            why = _experts_skip_reason(mod, device)
            if why:
                report.skipped[fqn] = why
            else:
                _set_module(model, fqn, PackedInt4Experts.from_float(mod, recipe.group_size, work))
                report.int4.append(fqn)
        elif isinstance(mod, nn.Embedding) and recipe.embedding is EmbeddingQuant.INT8 and _matches(fqn, recipe.embeddings):
            _set_module(model, fqn, Int8Embedding.from_float(mod.weight, work))
            report.int8_embedding.append(fqn)
        elif isinstance(mod, nn.Linear) and recipe.linear is LinearQuant.INT4 and _matches(fqn, recipe.linears):
            why = "excluded by the recipe" if _matches(fqn, recipe.skip_linears) else \
                _linear_skip_reason(fqn, mod, recipe, device)
            if why:
                report.skipped[fqn] = why
            elif device is TargetDevice.CUDA:
                _set_module(model, fqn, PackedInt4Linear.from_float(mod.weight, recipe.group_size, work))
                report.int4.append(fqn)
            else:
                from export.kernels.int4_matmul import group_size_for  # halved where K needs it, as on CUDA
                group = group_size_for(mod.in_features, recipe.group_size)
                _set_module(model, fqn, Int4Linear.from_float(mod.weight, group))
                report.int4.append(fqn)
        else:
            continue
        if progress:
            progress(1)
    if recipe.linear is LinearQuant.INT4 and device is TargetDevice.CUDA:
        _join_linears(model, in_scope, report)
    return report


def _join_linears(model: nn.Module, in_scope, report: QuantReport) -> None:
    """Linears of one input that a module declares joinable (`JOINABLE`: q/k/v, gate/up) become
    one PackedInt4Linear: decode streams their rows in one GEMV launch instead of two or
    three (the 31B's decode step is mostly these launches), prefill dequantizes one weight."""
    for fqn, mod in list(model.named_modules()):
        if not in_scope(fqn) or not hasattr(mod, "JOINABLE"):
            continue
        for joined, names in mod.JOINABLE.items():
            parts = [n for n in names if hasattr(mod, n)]
            mods = [getattr(mod, n) for n in parts]
            if len(mods) < 2 or not all(isinstance(m, PackedInt4Linear) for m in mods) or \
                    len({(m.in_features, m.group_size) for m in mods}) != 1:
                continue
            setattr(mod, joined, PackedInt4Linear.join(mods))
            for n in parts:
                delattr(mod, n)
            report.joined[f"{fqn}.{joined}"] = [f"{fqn}.{n}" for n in parts]
