"""Test helpers: random weights that do not hide bugs, the transformers oracle, and a script run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from export.gemma4.config import Gemma4Config
from export.gemma4.model import Gemma4Model, RMSNorm


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights, with every weight that initialises to the identity (norm weights,
    layer_scalar, router scales) moved away from 1 so a missing multiply shows up."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:  # norms, router scales
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("layer_scalar"):
            b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=g))
    return model


def tiny_31b_like() -> Gemma4Config:
    """31B's features at toy size: k_eq_v with fewer full-layer KV heads and a wider
    full head_dim, no PLE, no KV sharing."""
    return Gemma4Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
        head_dim=16, global_head_dim=32, layer_types=("sliding_attention",) * 5 + ("full_attention",),
        sliding_window=8, max_position_embeddings=4096, final_logit_softcapping=30.0,
        attention_k_eq_v=True, hidden_size_per_layer_input=0)


def hf_oracle(model: Gemma4Model):
    """transformers' Gemma4ForCausalLM with the same weights (fp32, eager attention)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = model.cfg
    hf_cfg = Gemma4TextConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf = Gemma4ForCausalLM(hf_cfg).eval()
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.model.load_state_dict(ours, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


def hf_logits_stream(hf, tokens: torch.Tensor, chunks: list[int]):
    """Feed `tokens` (1, N) to the oracle in chunks of the given sizes; yield the last
    position's logits after each chunk."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config.get_text_config())
    start = 0
    for n in chunks:
        ids = tokens[:, start:start + n]
        pos = torch.arange(start, start + n)[None]
        out = hf(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        start += n
        yield out.logits[:, -1].float()


def run_script(module: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root (the repository on PYTHONPATH, `env` added to the
    environment), output captured."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_code(script: str, timeout: int = 600) -> str:
    """`python -c script` from the repository root (the repository on PYTHONPATH); its stdout, or the test fails
    with the end of its output."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


# `_int4_gemv1_kernel`'s argument types as the bf16-x op launches it through AOTInductor (eps a Python float: fp64
# there); the rest of its arguments are constexprs or left to their defaults
GEMV1_BF16_SIG = {"x_ptr": "*bf16", "xf_ptr": "*bf16", "xc_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16",
                  "part_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32", "N": "i32", "KW": "i32", "GPS": "i32",
                  "SPLITS": "i32", "stride_ww": "i32", "stride_sn": "i32", "stride_ps": "i32", "eps": "fp64",
                  "r_ptr": "*bf16", "wr_ptr": "*bf16", "h_ptr": "*bf16", "ui_ptr": "*i64"}


def sass_sm90(fn, sig: dict, const: dict, warps: int, aligned_ints: tuple = (), whole: bool = False):
    """A Triton kernel compiled for sm_90 with no GPU as a launch specializes it: `const` its constexprs, `sig` the
    types of the arguments it reads (the rest constexpr: their defaults), every pointer and `aligned_ints` marked
    16-byte aligned (Triton's launch and AOTInductor mark those; unmarked, a kernel compiles to other loads and other
    register counts). -> (SASS opcode counts of its main loop, or of the whole kernel with `whole`; registers;
    cuobjdump's resource line)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scripts.gemv1_tile_variants import _sass_loop

    names = list(fn.arg_names)
    full = {a: sig.get(a, "constexpr") for a in names}
    aligned = [a for a, t in full.items() if t.startswith("*") or a in aligned_ints]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kern = triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
    ops, res = _sass_loop(kern.asm["cubin"], whole=whole)
    return ops, int(res.split("REG:")[1].split()[0]), res


def gemv1_consumer_shared(const: dict, warps: int, sig: dict = GEMV1_BF16_SIG) -> int:
    """The most shared memory `_int4_gemv1_kernel` at `const` takes compiled with no GPU for the consumer cards: the
    RTX 4090 (sm_89, no PDL) and the RTX 5090 (sm_120)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from export.kernels import int4_matmul as im

    fn = im._int4_gemv1_kernel
    shared = []
    for arch in (89, 120):
        src = ASTSource(fn, {a: sig.get(a, "constexpr") for a in fn.arg_names},
                        constexprs={**const, "PDL": const.get("PDL", 0) if arch >= 90 else 0})
        shared.append(triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                      .metadata.shared)
    return max(shared)


def gemv1_sass_sm90(const: dict, sig: dict, warps: int) -> tuple[dict, int, str]:
    """`sass_sm90` of `_int4_gemv1_kernel`'s main loop (stride_ww aligned too, as the weights' rows are)."""
    from export.kernels import int4_matmul as im

    return sass_sm90(im._int4_gemv1_kernel, sig, const, warps, aligned_ints=("stride_ww",))


def programs_an_sm(registers: int, warps: int) -> int:
    """Programs of `warps` warps an sm_90 SM holds at `registers` a thread (allocated 8 at a time; 64K registers,
    2048 threads)."""
    return min(65536 // (-(-registers // 8) * 8 * 32 * warps), 2048 // (32 * warps))


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops a block dispatches (their names into `seen`) and runs them."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
