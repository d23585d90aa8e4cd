"""CUDA exports (skipped without a GPU), and the measuring harness used on the GPU machine.

    python -m tests.test_export_cuda CASE OUT_JSON   # one measured export in this process

CASE is `tiny` (bf16, int4 g32, ctx 64, chunk 8) or `31b-2l` (the 31B config's first two
layers at real width: hidden 5376, vocab 262144; int4 g32, ctx 8192, chunk 128). Recorded:
wall time per stage, GPU peak twice (caching allocator, and NVML sampled every 10 ms from a
thread, which also sees the CUDA context, cuBLAS/Triton workspaces and AOTI allocations),
host peak RSS (this process; compiler subprocesses separately), file sizes, and the
relative errors of the compiled .so's logits and of the eager bf16 model's, both against an
fp32 reference with the same (dequantized) weights. bf16 alone moves a tiny random model's
logits by several percent (Inductor keeps fp32 inside fused kernels, eager rounds after
every op), so the compiled model is held to the eager model's own distance from fp32.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from export.artifact import read_ptd_index
from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, KvDtype, export_model
from export.gemma4.options import EmbeddingQuant

CASES = {  # tiny skips max_autotune (~3 min of GEMM tuning for a test artifact)
    "tiny": dict(preset="tiny", ctx=64, prefill_chunk=12, autotune=False),  # chunk > window (8)
    # the full layers' cache in int8: gemma4::hadamard rotates q, k, v and the output
    "tiny-kv8": dict(preset="tiny", ctx=64, prefill_chunk=12, autotune=False, kv_dtype=KvDtype.INT8),
    "31b-2l": dict(preset="31b", layers=2, ctx=8192, prefill_chunk=128),
    # the int4 recipe the 31B's byte budget needs (g128), exported in low-memory mode
    "31b-2l-int4": dict(preset="31b", layers=2, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True),
    # the same without max_autotune (one config per kernel), bf16 and int8 KV on the full layer
    "31b-2l-int4-noat": dict(preset="31b", layers=2, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True,
                             autotune=False),
    # 5 sliding layers and a full one, each kind compiled once and run as a chain (the default)
    "31b-6l-int4-noat": dict(preset="31b", layers=6, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True,
                             autotune=False, kv_dtype=KvDtype.INT4),
    "31b-2l-int4-kv8": dict(preset="31b", layers=2, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True,
                            autotune=False, kv_dtype=KvDtype.INT8),
    # int4 expert stacks (gemma4::moe_route / moe_experts_int4): the MoE block at toy size and at 26B-A4B width
    "tiny-moe": dict(preset="tiny-moe", ctx=64, prefill_chunk=12, autotune=False),
    "26b-2l-int4-noat": dict(preset="26b-a4b", layers=2, ctx=8192, prefill_chunk=128, group_size=128,
                             low_memory=True, autotune=False),
    # per-layer embeddings (int8 table, dequantized after the gather) at E2B / E4B width
    "e2b-2l-int4-noat": dict(preset="e2b", layers=2, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True,
                             autotune=False, embedding_quant=EmbeddingQuant.INT8),
    "e4b-2l-int4-noat": dict(preset="e4b", layers=2, ctx=8192, prefill_chunk=128, group_size=128, low_memory=True,
                             autotune=False, embedding_quant=EmbeddingQuant.INT8),
}


def case_config(case: str, out: Path) -> ExportConfig:
    return ExportConfig(**{"group_size": 32, **CASES[case]}, device=DeviceChoice.CUDA, dtype=DTypeChoice.BF16,
                        out=out)


class NvmlPeak:
    """Peak device memory in use (bytes), sampled from a thread while the block runs."""

    def __init__(self, period_s: float = 0.01):
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.period_s, self.peak, self.baseline = period_s, 0, self._used()
        self._stop = threading.Event()

    def _used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._h).used

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


class CudaMini:
    """Both methods of a CUDA artifact as the runner binds and runs them (each method's steps,
    every constant bound by name; no CUDA graph), called one chunk at a time."""

    def __init__(self, out: Path):
        from runtime.runner import Runner

        self.runner = Runner.load(out, cuda_graph=False)
        self.meta = self.runner.meta.raw

    def run(self, method: str, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        (logits,) = self.runner.methods[method].run([tokens.cuda().contiguous(), torch.tensor([pos], device="cuda")])
        return logits


@torch.no_grad()
def fp32_reference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in fp32 with every int4 weight dequantized: a linear applied to the identity
    returns exactly the bf16 weights the int4 kernel multiplies with."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from export.gemma4.model import Experts
    from export.gemma4.quant import PackedInt4Experts, PackedInt4Linear

    ref = copy.deepcopy(model)
    for fqn, mod in list(ref.named_modules()):
        if isinstance(mod, PackedInt4Linear):  # the bf16 weights gemma4::int4_linear multiplies with
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(mod.dequantize(torch.bfloat16), requires_grad=False)
            if hasattr(mod, "split_sizes"):  # a joined linear (q/k/v, gate/up): the model splits its output
                lin.split_sizes = mod.split_sizes
        elif isinstance(mod, PackedInt4Experts):  # float expert stacks, as gemma4::moe_experts_int4 reads them
            with torch.device("meta"):
                lin = Experts(model.cfg)
            lin.gate_up_proj = torch.nn.Parameter(mod.gate_up_proj.dequantize(torch.bfloat16), requires_grad=False)
            lin.down_proj = torch.nn.Parameter(mod.down_proj.dequantize(torch.bfloat16), requires_grad=False)
        else:
            continue
        parent, _, leaf = fqn.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, leaf, lin)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Linear) and is_traceable_wrapper_subclass(mod.weight):
            eye = torch.eye(mod.in_features, dtype=torch.bfloat16, device=mod.weight.device)
            w = torch.nn.functional.linear(eye, mod.weight).t().contiguous()
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
    return ref.float()


class ReferenceOps(TorchDispatchMode):
    """The project's custom ops run as their plain-torch references (the CPU backend's
    decompositions) on whatever device their inputs are: an eager model with the artifact's
    weights and no Triton kernel to JIT-compile (each of the eager model's first calls would
    compile one, minutes for a real-width slice)."""

    def __init__(self):
        super().__init__()
        from export.backends.cpu import Gemma4CpuBackend

        self.table = Gemma4CpuBackend.get_decomposition_table()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


class RecordingReferenceOps(ReferenceOps):
    """`ReferenceOps` that also records, into `seen`, the name of each custom op it runs as its reference."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.table:
            self.seen.append(str(func))
        return super().__torch_dispatch__(func, types, args, kwargs)


@torch.no_grad()
def parity(out: Path, model: torch.nn.Module, n_decode: int = 6, fp32: bool = True,
           reference_ops: bool = False) -> dict[str, list[float]]:
    """Per step (prefill: one chunk + a partial one; then decode), the relative error vs the
    fp32 reference of the compiled .so ("compiled") and of the eager bf16 model ("eager"),
    and compiled vs eager ("compiled_vs_eager"); without `fp32`, only the last (no fp32 model,
    no fp32 kernels to compile). `reference_ops`: the eager models run the ops' plain-torch
    references (`ReferenceOps`) instead of the Triton kernels the artifact holds."""
    mini = CudaMini(out)
    model = model.cuda()  # a low-memory export streams its weights through host memory
    ref = fp32_reference(model) if fp32 else None
    if ref is not None:
        ref.reset_cache()
    chunk, vocab = mini.meta["prefill_chunk"], mini.meta["vocab_size"]
    model.reset_cache()
    ids = torch.randint(3, vocab, (1, chunk + 3 + n_decode), generator=torch.Generator().manual_seed(0))
    steps = [("prefill", 0, chunk), ("prefill", chunk, chunk + 3)]
    steps += [("decode", p, p + 1) for p in range(chunk + 3, chunk + 3 + n_decode)]
    errors: dict[str, list[float]] = {"compiled": [], "eager": [], "compiled_vs_eager": []}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    t0 = time.perf_counter()
    for method, s, e in steps:
        print(f"[parity {time.perf_counter() - t0:6.1f} s] {method} {s}:{e}", file=sys.stderr, flush=True)
        got = mini.run(method, ids[:, s:e], s).float()
        tokens, pos = ids[:, s:e].cuda(), torch.tensor([s], device="cuda")
        with ReferenceOps() if reference_ops else contextlib.nullcontext():
            eager = model(tokens, pos).float()
            want = ref(tokens, pos).float() if ref is not None else None
        if want is not None:
            errors["compiled"].append(rel(got, want))
            errors["eager"].append(rel(eager, want))
        errors["compiled_vs_eager"].append(rel(got, eager))
    return errors if ref is not None else {"compiled_vs_eager": errors["compiled_vs_eager"]}


def parity_ok(errors: dict[str, list[float]]) -> bool:
    """The compiled model is no further from fp32 than twice the eager bf16 model, plus 0.5%
    (a wrong mask, cache slot or weight moves logits by tens of percent)."""
    return all(c <= 2 * e + 5e-3 for c, e in zip(errors["compiled"], errors["eager"]))


def stage_log(t0: float):
    """A listener printing each stage event with the seconds since `t0` to stderr, so a run
    stopped by its time limit still shows where its time went."""

    def log(event) -> None:
        extra = f" {event.seconds:.1f} s" if event.seconds is not None else ""
        print(f"[{time.perf_counter() - t0:7.1f} s] {event.stage} {event.kind}{extra} {event.detail}".rstrip(),
              file=sys.stderr, flush=True)

    return log


def measure(cfg: ExportConfig, fp32: bool = True, reference_ops: bool = False) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with NvmlPeak() as nvml:
        result = export_model(cfg, listeners=(stage_log(t0),))
    wall = time.perf_counter() - t0
    rec = {
        "case": cfg.name, "autotune": cfg.autotune, "export_s": round(wall, 1),
        "stages_s": {k: round(v, 1) for k, v in result.seconds.items()},
        "gpu_allocator_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gpu_nvml_peak_gib": nvml.peak / 2**30, "gpu_nvml_baseline_gib": nvml.baseline / 2**30,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "compiler_children_peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "sizes": result.sizes,
        "ptd_keys": len(read_ptd_index(result.out_dir / "model.ptd")),
        "int4_modules": result.metadata["quant"]["int4_modules"],
        # torchao turns this on process-wide unless told not to (minutes of serial tuning)
        "coordinate_descent_tuning": torch._inductor.config.coordinate_descent_tuning,
    }
    from export.kernels import attention, int4_matmul

    with int4_matmul.one_config(), attention.use_configs(attention.one_config):  # eager: no tuning runs
        rec["rel_err"] = parity(result.out_dir, result.model, fp32=fp32, reference_ops=reference_ops)
    rec["eager_ops"] = "reference" if reference_ops else "triton"
    rec["parity_ok"] = parity_ok(rec["rel_err"]) if fp32 else None
    return rec


@pytest.mark.cuda
@pytest.mark.slow
def test_tiny_cuda_int4_export_matches_eager(tmp_path):
    rec = measure(case_config("tiny", tmp_path / "tiny"))
    assert rec["int4_modules"] > 0
    assert not rec["coordinate_descent_tuning"]
    assert parity_ok(rec["rel_err"]), rec["rel_err"]


@pytest.mark.cuda
@pytest.mark.slow
def test_tiny_cuda_int8_kv_export_matches_eager(tmp_path):
    rec = measure(case_config("tiny-kv8", tmp_path / "tiny-kv8"))
    assert parity_ok(rec["rel_err"]), rec["rel_err"]


@pytest.mark.cuda
@pytest.mark.slow
def test_tiny_moe_cuda_int4_experts_export_matches_eager(tmp_path):
    rec = measure(case_config("tiny-moe", tmp_path / "tiny-moe"))
    assert rec["int4_modules"] > 0
    assert parity_ok(rec["rel_err"]), rec["rel_err"]


@torch.no_grad()
def test_reference_ops_run_every_custom_op_as_its_reference(monkeypatch):
    """Under ReferenceOps each gemma4 op of a prefill chunk and a decode step (int4 linears, with the norms before
    them too, attention over an int8 cache, the Hadamard rotations, a bf16 ring's attention into its o_proj at
    decode, the MLP as one op) goes to its plain-torch reference, with the same logits."""
    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model
    from export.gemma4.quant import QuantRecipe, quantize_
    from export.backends.options import TargetDevice
    from tests.helpers import randomize_

    seen = []

    model = Gemma4Model(PRESETS["tiny"], ctx=64, prefill_chunk=8, dtype=torch.bfloat16, kv_dtype="int8")
    model = randomize_(model, seed=2).to(torch.bfloat16).eval()
    report = quantize_(model, QuantRecipe(group_size=32), TargetDevice.CUDA)  # the CUDA layout: gemma4::int4_linear
    assert report.int4
    tokens, pos = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 9)), torch.tensor([0])
    for switch in ("0", "1"):  # the attention into its o_proj at decode and the MLP as one op, or not
        monkeypatch.setenv("GEMMA4_FUSED_ATTENTION", switch)
        monkeypatch.setenv("GEMMA4_FUSED_MLP", switch)
        model.reset_cache()
        want = [model(tokens[:, :8], pos), model(tokens[:, 8:], pos + 8)]  # a prefill chunk, a decode step
        model.reset_cache()
        with RecordingReferenceOps(seen):
            got = [model(tokens[:, :8], pos), model(tokens[:, 8:], pos + 8)]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert {"gemma4.int4_linear.default", "gemma4.int4_glu_linear.default", "gemma4.int4_rms_linear.default",
            "gemma4.int4_add_rms_linear.default", "gemma4.attention.default", "gemma4.hadamard.default",
            "gemma4.attention_int4_linear.default", "gemma4.int4_add_rms_mlp.default"} <= set(seen)



@torch.no_grad()
def test_reference_ops_run_the_closing_ops_as_their_references(monkeypatch):
    """With GEMMA4_FUSED_CLOSE=1 a layer's end is one op (the MLP half with the closing add without per-layer inputs,
    the per-layer gate, projection and add with them, the experts and the add beside a MoE block); under ReferenceOps each goes to its plain-torch reference, a
    prefill chunk's and a decode step's logits the same as without the switch."""
    import dataclasses

    from export.gemma4.config import PRESETS
    from export.gemma4.model import Gemma4Model
    from export.gemma4.quant import QuantRecipe, quantize_
    from export.backends.options import TargetDevice
    from tests.helpers import randomize_

    seen = []

    tokens, pos = torch.randint(0, PRESETS["tiny"].vocab_size, (1, 9)), torch.tensor([0])
    for preset, width in (("tiny", 32), ("tiny", 0), ("tiny-moe", 0)):  # per-layer inputs (packed), none; experts
        cfg = dataclasses.replace(PRESETS[preset], hidden_size_per_layer_input=width)
        model = randomize_(Gemma4Model(cfg, ctx=64, prefill_chunk=8, dtype=torch.bfloat16), seed=3).to(torch.bfloat16)
        quantize_(model.eval(), QuantRecipe(group_size=32), TargetDevice.CUDA)
        monkeypatch.setenv("GEMMA4_FUSED_CLOSE", "0")
        model.reset_cache()
        want = [model(tokens[:, :8], pos), model(tokens[:, 8:], pos + 8)]
        monkeypatch.setenv("GEMMA4_FUSED_CLOSE", "1")
        model.reset_cache()
        with RecordingReferenceOps(seen):
            got = [model(tokens[:, :8], pos), model(tokens[:, 8:], pos + 8)]
        assert all(torch.equal(g, w) for g, w in zip(got, want)), width
    assert {"gemma4.int4_add_ple_close.default", "gemma4.int4_add_rms_mlp_close.default",
            "gemma4.moe_rms_experts_close.default"} <= set(seen), set(seen)


if __name__ == "__main__":
    case, out_json = sys.argv[1], Path(sys.argv[2])
    rec = measure(case_config(case, Path("/tmp") / f"art_{case}_{os.getpid()}"))  # runs of one case side by side
    rec["wrapper_opt_level"] = torch._inductor.config.aot_inductor.compile_wrapper_opt_level
    out_json.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec))
