"""Decode speed of the pure-Python runtime next to eager PyTorch and the bandwidth floor.

    python -m scripts.bench_runtime --preset tiny --ctx 2048 --quant none --json out/bench.json
    python -m scripts.bench_runtime --preset 31b --layers 2 --ctx 8192 --quant none --json ...

For each case: export the artifact (in a spawned child, so the export's GPU memory is gone
before the runtime is measured), run it through `runtime.Runner` (greedy, fixed random
prompt, exactly --new-tokens tokens; on CUDA decode is replayed through a CUDA graph and then
timed again through the decode container's own run, `decode_ms_no_graph`; either way the host
reads one token id per step), run the eager model with the same weights (same
preset + seed) on the same device, and compute the floor: bytes a decode step must read
(every bound weight except gather-only tables, plus the whole static KV cache, which the
compiled attention reads with a mask) over the device's measured copy bandwidth. Prints a
table and writes JSON.

The KV-dtype sweep (`--kv-dtypes`; scripts/measure_gpu.sh runtime_31b):

    python -m scripts.bench_runtime --preset 31b --layers 12 --ctx 131072 --kv-dtypes int4,bf16,int8 \
        --time-budget 530 --workdir /tmp/rt31 --json scripts/measurements/runtime_31b.json
    python -m scripts.bench_runtime --preset tiny --layers 2 --ctx 256 --kv-dtypes int8 --device cpu \
        --fills 16,64,192 --prompts 32,128 --new-tokens 8      # the same code path on a CPU

exports the slice once per KV dtype with the export CLI (int4 linears, int8 embedding,
--low-memory, --no-autotune unless --autotune; side by side, each with its own compiler
caches), then per artifact: decode ms/token after prefilling to each --fills (CUDA graph, as
the runner decodes by default), prefill tok/s per --prompts, allocator and NVML peaks against
the planner's runtime figure, and transformers' Gemma4ForCausalLM on the same float weights
(eager attention up to 4096 tokens, sdpa beyond: eager's score matrix would not fit).
Whole-model figures are extrapolated per layer: the non-layer part of a step (embedding, final
norm, lm_head, sampling, timed on its own) plus the slice's layers times (model layers / slice
layers), valid when the slice holds the model's sliding:full pattern (the 31B's first 12
layers: 10 + 2 of 50 + 10). What would not fit --time-budget is skipped and listed; a long
fill that would not fit is reached by moving the position over a zeroed cache instead
(decode time depends on the position, not the cache's values; the row says `position`).
Beside the copy bandwidth, `chain_us_per_kernel` times a chain of small dependent kernels on the
same GPU (`chain_reference_us`): the machine's state for latency-bound work, so that two calls'
decode figures can be told apart from their machines'.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from export.cli import non_negative_int, positive_int, quiet_internal_warnings, run

import torch

GATHER_ONLY = ("embed_tokens_per_layer",)  # PLE table: a decode step reads one row


@dataclass(frozen=True)
class Case:
    preset: str
    layers: int | None  # keep only the first n layers (real-width slices)
    ctx: int
    prefill_chunk: int
    quant: str  # "none" | "int4"
    dtype: str  # "auto" | "bfloat16" | "float32"
    device: str  # "cuda" | "cpu"
    prompt_len: int
    new_tokens: int
    autotune: bool = False  # Inductor max_autotune: minutes of compile; int4 and M=1 GEMMs gain little
    seed: int = 0

    @property
    def name(self) -> str:
        return self.preset + (f"-{self.layers}l" if self.layers else "")


# ---- export (child process) ------------------------------------------------------------------

def _register_slice(case: Case) -> None:
    """A real-width slice is a preset of its own for the exporter (same seed -> same weights)."""
    from export.gemma4.config import PRESETS

    if case.layers:
        PRESETS[case.name] = PRESETS[case.preset].with_layers(case.layers)


def export_config(case: Case, out: Path | None = None):
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig
    from export.gemma4.quant import LinearQuant

    _register_slice(case)
    return ExportConfig(preset=case.name, ctx=case.ctx, prefill_chunk=case.prefill_chunk,
                        quant=LinearQuant(case.quant), device=DeviceChoice(case.device),
                        dtype=DTypeChoice(case.dtype), out=out, seed=case.seed, autotune=case.autotune)


def _export_child(case: Case, out: Path, result: dict) -> None:
    from export.gemma4.export import export_model

    res = export_model(export_config(case, out))
    result.update(seconds=res.seconds, sizes=res.sizes)


def export_artifact(case: Case, out: Path) -> dict:
    with mp.Manager() as manager:
        result = manager.dict()
        child = mp.get_context("spawn").Process(target=_export_child, args=(case, out, result))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"export of {case.name} failed (exit code {child.exitcode})")
        return dict(result)


# ---- measurements ----------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t)


def chain_reference_us(device: str) -> float | None:
    """The machine's cost of one dependent kernel (CUDA only; None elsewhere): us a kernel of a replayed graph of
    400 chained launches, each of 132 programs reading 16 KiB of its own from HBM after waiting on the one before,
    launched as the artifact launches its kernels (programmatic dependent launch on sm_90+; scripts/launch_floor.py).
    A decode step is hundreds of such kernels: a reference for comparing calls, which the copy bandwidth is not
    (two calls a few percent apart in decode time measured the same copy bandwidth within 0.5%)."""
    if not device.startswith("cuda"):
        return None
    from scripts.launch_floor import time_chain  # CUDA only: its kernels run on the current device

    pdl = 2 if torch.cuda.get_device_capability()[0] >= 9 else 0
    us, ok = time_chain(400, 132, "late", pdl, reps=7)
    return us if ok else None


def bytes_per_decode_step(runner) -> dict:
    ptd = runner.artifact.ptd
    gather_only = {(e.offset, e.dtype, e.shape) for k, e in ptd.entries.items() if any(g in k for g in GATHER_ONLY)}
    weights = sum(t.numel() * t.element_size() for ident, t in runner._bound.weights.items() if ident not in gather_only)
    return {"weights": weights, "kv": runner.kv_bytes, "total": weights + runner.kv_bytes}


def bench_runtime(model_dir: Path, prompt: list[int], new_tokens: int) -> dict:
    from runtime.memory import PeakSampler
    from runtime.runner import Runner, resolve_device
    from runtime.artifact import Artifact

    artifact = Artifact.open(model_dir)
    device = resolve_device(artifact.metadata.device, None)
    with PeakSampler(device) as mem:
        t = time.perf_counter()
        runner = Runner(artifact)
        load_s = time.perf_counter() - t
        list(runner.generate(prompt, 4, stop_ids=()))  # warm-up: first calls initialise kernels
        tokens = list(runner.generate(prompt, new_tokens, stop_ids=()))
    stats = runner.last_stats
    runner.reset()
    first_logits = runner.prefill(prompt).float().cpu()
    out = {
        "tokens": tokens, "first_logits": first_logits, "load_s": load_s, "cuda_graph": runner.graph is not None,
        "ttft_ms": stats.ttft_s * 1e3, "prefill_tok_s": stats.prefill_tok_s,
        "decode_ms": stats.decode_s / max(stats.new_tokens - 1, 1) * 1e3,
        "decode_tok_s": stats.decode_tok_s,
        "allocator_peak_gib": mem.peak.allocator_bytes / 2**30,
        "nvml_peak_gib": None if mem.peak.nvml_bytes is None else mem.peak.nvml_bytes / 2**30,
        "nvml_process_peak_gib": None if mem.peak.nvml_process_bytes is None else mem.peak.nvml_process_bytes / 2**30,
        "host_peak_rss_gib": mem.peak.host_rss_bytes / 2**30,
    }
    if runner.graph is not None:  # the same decode through the container's own run, beside it
        del runner
        torch.cuda.empty_cache()
        runner = Runner.load(model_dir, cuda_graph=False)
        list(runner.generate(prompt, 4, stop_ids=()))
        same = list(runner.generate(prompt, new_tokens, stop_ids=())) == tokens
        nograph = runner.last_stats
        out.update(decode_ms_no_graph=nograph.decode_s / max(nograph.new_tokens - 1, 1) * 1e3,
                   tokens_match_no_graph=same)
    return {"runner": runner, **out}


@torch.no_grad()
def bench_eager(case: Case, prompt: list[int], new_tokens: int, device: str) -> dict:
    """The same weights as the artifact (prepare_model with the same preset and seed),
    decoded token by token with the same greedy loop."""
    from export.gemma4.export import prepare_model

    model, _ = prepare_model(export_config(case))
    model.to(device).reset_cache()

    def run(tokens, pos):
        return model(torch.tensor([tokens], device=device), torch.tensor([pos], device=device))

    def generate(n):
        model.reset_cache()
        chunk, logits = case.prefill_chunk, None
        for s in range(0, len(prompt), chunk):
            logits = run(prompt[s:s + chunk], s)
        first = logits.float().view(-1).cpu()
        tok, times = int(logits.argmax()), []
        for i in range(n - 1):
            _sync(device)
            t = time.perf_counter()
            tok = int(run([tok], len(prompt) + i).argmax())
            times.append(time.perf_counter() - t)
        return first, times

    generate(4)
    first, times = generate(new_tokens)
    mean = statistics.fmean(times)
    return {"first_logits": first, "decode_ms": mean * 1e3, "decode_tok_s": 1 / mean}


def bench_case(case: Case, workdir: Path, model_dir: Path | None, eager: bool = True) -> dict:
    out = model_dir or workdir / case.name
    export = {} if model_dir else export_artifact(case, out)
    g = torch.Generator().manual_seed(case.seed)
    from runtime.artifact import Artifact

    vocab = Artifact.open(out).metadata.vocab_size
    prompt = torch.randint(3, vocab, (case.prompt_len,), generator=g).tolist()
    rt = bench_runtime(out, prompt, case.new_tokens)
    device = rt["runner"].device
    floor_bytes = bytes_per_decode_step(rt["runner"])
    del rt["runner"]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    first = rt.pop("first_logits")
    if eager:
        eager = bench_eager(case, prompt, case.new_tokens, device)
        err = ((first - eager["first_logits"]).norm() / eager.pop("first_logits").norm()).item()
    else:  # memory runs (the planner's comparison): the runner alone
        eager, err = {"decode_ms": float("nan"), "decode_tok_s": float("nan")}, float("nan")
    bw = copy_bandwidth(device)
    return {
        "case": asdict(case), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "export": export, "runtime": {k: v for k, v in rt.items() if k != "tokens"}, "eager": eager,
        "prefill_logits_rel_err_vs_eager": err,
        "bytes_per_decode_step": floor_bytes, "copy_bandwidth_GBps": bw / 1e9,
        "floor_ms_weights": floor_bytes["weights"] / bw * 1e3,
        "floor_ms_weights_kv": floor_bytes["total"] / bw * 1e3,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'case':<12} {'device':<22} {'rt ms/tok':>9} {'rt tok/s':>9} {'no graph':>9} {'eager ms':>9} " \
           f"{'floor ms':>9} {'floor+kv':>9} {'TTFT ms':>8} {'prefill/s':>9} {'alloc GiB':>9} {'NVML GiB':>9} {'rel err':>8}"
    print(head)
    for r in rows:
        rt, nv = r["runtime"], r["runtime"]["nvml_peak_gib"]
        print(f"{r['case']['preset'] + (str(r['case']['layers']) + 'l' if r['case']['layers'] else ''):<12} "
              f"{r['device'][:22]:<22} {rt['decode_ms']:>9.3f} {rt['decode_tok_s']:>9.1f} "
              f"{rt.get('decode_ms_no_graph', float('nan')):>9.3f} "
              f"{r['eager']['decode_ms']:>9.3f} {r['floor_ms_weights']:>9.3f} {r['floor_ms_weights_kv']:>9.3f} "
              f"{rt['ttft_ms']:>8.1f} {rt['prefill_tok_s']:>9.0f} {rt['allocator_peak_gib']:>9.2f} "
              f"{'n/a' if nv is None else f'{nv:.2f}':>9} {r['prefill_logits_rel_err_vs_eager']:>8.1e}")


# ---- the KV-dtype sweep on a real-width slice (--kv-dtypes) ---------------------------------
#
# One run, one JSON: export the slice once per KV dtype (the export CLI, concurrently), then for
# each artifact decode ms/token at several fills, prefill tok/s for several prompts, the memory
# peaks against the planner, and beside them transformers' Gemma4ForCausalLM (bf16) on the same
# weights. Figures for the whole model are extrapolated per layer (see `extrapolate_ms`).

HF_EAGER_MAX_PROMPT = 4096  # eager attention holds [heads, T, T] fp32 scores: 32k would need 128 GiB a layer


@dataclass(frozen=True)
class Sweep:
    preset: str
    layers: int | None
    ctx: int
    kv_dtypes: tuple[str, ...]
    fills: tuple[int, ...]  # decode measured after prefilling to each
    prompts: tuple[int, ...]  # prefill tok/s measured for each (from position 0)
    new_tokens: int
    device: str
    embedding_quant: str
    prefill_chunk: int | None  # None: the whole model's chunk (`full_model_chunk`)
    autotune: bool
    seed: int
    time_budget: float  # seconds for the whole run, exports included
    workdir: Path
    reuse: bool  # reuse artifacts already in workdir
    hf: bool  # run transformers' model beside

    @property
    def name(self) -> str:
        return self.preset + (f"-{self.layers}l" if self.layers else "")


class Clock:
    """Seconds left of the run's budget; stages that will not fit are skipped and listed."""

    def __init__(self, budget: float):
        self.t0, self.budget, self.skipped = time.perf_counter(), budget, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def allows(self, what: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            return True
        self.skipped.append(f"{what}: estimated {estimate_s:.0f} s, {self.left():.0f} s left of --time-budget")
        print(f"skip {self.skipped[-1]}", file=sys.stderr, flush=True)
        return False


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- slice geometry: what a decode step reads, what the whole model is -----------------------

def slice_scale(preset: str, layers: int | None) -> int:
    """Whole model layers / slice layers when the slice holds the model's pattern exactly
    (the 31B's first 12 layers: 10 sliding + 2 full of its 50 + 10), else 0."""
    from export.gemma4.config import PRESETS

    full = PRESETS[preset]
    part = full.with_layers(layers) if layers else full
    kinds = lambda c: (sum(c.is_sliding(i) for i in range(c.num_hidden_layers)),  # noqa: E731
                       sum(not c.is_sliding(i) for i in range(c.num_hidden_layers)))
    (fs, ff), (ps, pf) = kinds(full), kinds(part)
    k = full.num_hidden_layers // part.num_hidden_layers
    return k if (ps * k, pf * k) == (fs, ff) else 0


def extrapolate_ms(slice_ms: float, non_layer_ms: float, scale: int) -> float:
    """Whole-model ms from the slice: its layers' time (slice minus the non-layer part:
    embedding, final norm, lm_head, sampling and the host's step) times `scale`, plus the
    non-layer part once. With the model's pattern in the slice this is exactly 50 sliding +
    10 full layers at the slice's per-layer times."""
    return non_layer_ms + scale * (slice_ms - non_layer_ms)


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def decode_read_bytes(runner, pos: int, window: int, expert_fraction: float = 1.0) -> dict[str, int]:
    """Bytes one decode step at position `pos` must read, split into the decoder layers'
    part and the rest: every bound weight except gather-only tables (embeddings: one row),
    `expert_fraction` of each MoE expert stack (top-k of E), and the filled KV (full layers:
    pos + 1 slots; sliding rings: the window)."""
    ptd = runner.artifact.ptd
    ident = {k: (e.offset, e.dtype, e.shape) for k, e in ptd.entries.items()}
    gathered = {ident[k] for k in ident if "embed_tokens" in k} - {ident[k] for k in ident if "embed_tokens" not in k}
    layer_of = {ident[k]: _layer_of(k) for k in ident}
    experts = {ident[k] for k in ident if ".experts." in k}
    out = {"layer_weights": 0, "other_weights": 0, "kv": 0}
    for i, t in runner._bound.weights.items():
        if i not in gathered:
            nbytes = t.numel() * t.element_size() * (expert_fraction if i in experts else 1.0)
            out["layer_weights" if layer_of.get(i) is not None else "other_weights"] += int(nbytes)
    for buf in runner.meta.kv:
        if buf.kind == "chunk":  # a prefill chunk's K/V for KV-shared readers: decode reads none
            continue
        t = runner._bound.kv[buf.fqn]
        slots = buf.shape[2]  # (1, Hkv, S, ·) and scales (1, Hkv, S)
        read = min(pos + 1, slots) if buf.kind == "full" else min(pos + 1, window, slots)
        out["kv"] += t.numel() * t.element_size() // slots * read
    return out


def floor_ms(read: dict[str, int], scale: int, bytes_per_s: float) -> tuple[float, float]:
    """(slice, whole model) floors: the bytes over the copy bandwidth."""
    layers = read["layer_weights"] + read["kv"]
    return ((layers + read["other_weights"]) / bytes_per_s * 1e3,
            (scale * layers + read["other_weights"]) / bytes_per_s * 1e3)


# ---- the planner's figures (its CLI: the same inputs an export would use) --------------------

def plan_gib(preset: str, layers: int | None, ctx: int, kv: str, embedding: str, device: str,
             prefill_chunk: int | None = None) -> dict:
    """The runtime peak the planner gives for this export (`python -m export.gemma4 --plan`,
    so the same inputs as the export's): device total, allocator part and items, in GiB."""
    import re
    import subprocess

    cmd = [sys.executable, "-m", "export.gemma4", "--preset", preset, "--ctx", str(ctx), "--kv-dtype", kv,
           "--embedding-quant", embedding, "--low-memory", "--device", device, "--plan"]
    cmd += ["--layers", str(layers)] if layers else []
    cmd += ["--prefill-chunk", str(prefill_chunk)] if prefill_chunk else []
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    section = re.search(r"^runtime GPU\n((?:  .*\n)*?)\s+= total\s+([\d.]+)(?:\s+\(allocator ([\d.]+)\))?", text, re.M)
    if not section:
        raise RuntimeError(f"no runtime GPU total in the plan of {' '.join(cmd)}:\n{text}")
    items = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^  (\S.*?)\s{2,}([\d.]+)(?:\s|$)", section.group(1), re.M)}
    total = float(section.group(2))
    return {"total_gib": total, "allocator_gib": float(section.group(3) or total), "items": items,
            "command": " ".join(cmd[1:])}


def full_model_chunk(preset: str, ctx: int, embedding: str) -> tuple[int, str]:
    """(chunk, why): the prefill chunk the export CLI gives the whole model with the 24 GB
    recipe (int4 KV, `embedding`, low-memory, cuda) at `ctx` and the default budget. A slice
    exported alone would fit a larger chunk than the model it stands for, so the sweep passes
    this one to every export."""
    from export.gemma4.options import DeviceChoice, EmbeddingQuant, ExportConfig, KvDtype, model_config
    from export.gemma4.planner import DEFAULT_GPU_BUDGET, fit_prefill_chunk, inputs_for

    cfg = ExportConfig(preset=preset, ctx=ctx, kv_dtype=KvDtype.INT4, embedding_quant=EmbeddingQuant(embedding),
                       low_memory=True, device=DeviceChoice.CUDA)
    fit = fit_prefill_chunk(inputs_for(model_config(cfg), cfg, ctx), DEFAULT_GPU_BUDGET)
    return fit.chunk, f"the whole {preset} with --kv-dtype int4 --embedding-quant {embedding} at ctx {ctx}: {fit.reason}"


# ---- exports (the project's CLI, one process per KV dtype, side by side) ---------------------

def export_command(s: Sweep, kv: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "export.gemma4", "--preset", s.preset, "--ctx", str(s.ctx), "--kv-dtype", kv,
           "--embedding-quant", s.embedding_quant, "--low-memory", "--device", s.device, "--seed", str(s.seed),
           "--out", str(out), "--autotune" if s.autotune else "--no-autotune"]
    cmd += ["--layers", str(s.layers)] if s.layers else []
    return cmd + (["--prefill-chunk", str(s.prefill_chunk)] if s.prefill_chunk else [])


def start_exports(s: Sweep) -> dict[str, dict]:
    """Popen one export per KV dtype not already in workdir (with --reuse); each its own
    Inductor/Triton cache and an equal share of the CPUs for compile workers."""
    import os
    import subprocess

    todo = [kv for kv in s.kv_dtypes if not (s.reuse and (s.workdir / kv / "model.pte").is_file())]
    threads = max(1, (os.cpu_count() or 2) // max(len(todo), 1))
    jobs = {}
    for kv in s.kv_dtypes:
        out = s.workdir / kv
        if kv not in todo:
            jobs[kv] = {"out": out, "reused": True}
            continue
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(s.workdir / f"inductor_{kv}"),
               "TRITON_CACHE_DIR": str(s.workdir / f"triton_{kv}"), "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
        s.workdir.mkdir(parents=True, exist_ok=True)
        cmd = export_command(s, kv, out)
        proc = subprocess.Popen(cmd, env=env, stdout=open(s.workdir / f"export_{kv}.json", "w"),
                                stderr=open(s.workdir / f"export_{kv}.log", "w"), start_new_session=True)
        jobs[kv] = {"out": out, "proc": proc, "t0": time.perf_counter(), "command": " ".join(cmd[1:])}
    _kill_on_exit([j["proc"] for j in jobs.values() if "proc" in j])
    return jobs


def _kill_on_exit(procs: list) -> None:
    """The exports run in sessions of their own (their compile workers with them): end them if
    this process ends first, also when `timeout` sends it SIGTERM."""
    import atexit
    import os
    import signal

    def kill():
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    atexit.register(kill)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def wait_exports(jobs: dict[str, dict], deadline_s: float, clock: Clock) -> dict[str, dict]:
    """Wait for the exports until `deadline_s` of the run; kill (the process group) what runs past."""
    import os
    import signal

    running = {kv: j for kv, j in jobs.items() if "proc" in j}
    while running and clock.elapsed() < deadline_s:
        for kv, j in list(running.items()):
            if j["proc"].poll() is not None:
                j["seconds"] = round(time.perf_counter() - j["t0"], 1)
                log(f"export {kv}: exit {j['proc'].returncode} after {j['seconds']} s")
                del running[kv]
        time.sleep(1.0)
    for kv, j in running.items():
        os.killpg(j["proc"].pid, signal.SIGKILL)
        j["proc"].wait()
        clock.skipped.append(f"export {kv}: still running at {deadline_s:.0f} s of the run (killed)")
        log(clock.skipped[-1])
    result = {}
    for kv, j in jobs.items():
        ok = j.get("reused") or j["proc"].returncode == 0
        rec = {"ok": bool(ok), "reused": bool(j.get("reused")), "seconds": j.get("seconds"), "command": j.get("command")}
        if not j.get("reused"):
            log_file = j["out"].parent / f"export_{kv}.log"
            rec["log_tail"] = log_file.read_text(errors="replace")[-1500:] if not ok else None
            try:
                rec["summary"] = json.loads((j["out"].parent / f"export_{kv}.json").read_text())
            except ValueError:
                pass
        result[kv] = rec
    return result


# ---- the runner: prefill and decode at each fill, memory -------------------------------------

def queued_steps(advance, token: torch.Tensor, n: int, device: str) -> tuple[float, list[float]]:
    """n steps as `Runner.generate` takes them: `advance(token)` (the device token id in, the next one
    out, on the device) queued for step i + 1 before the host reads token i (`TokenReader`); the whole
    time and each step's, in seconds."""
    from runtime.runner import TokenReader

    reader = TokenReader(device)
    _sync(device)
    times, t0 = [], time.perf_counter()
    ahead = advance(token)
    for i in range(n):
        t = time.perf_counter()
        token, ahead = ahead, None
        reader.copy(token)
        if i + 1 < n:
            ahead = advance(token)
        reader.value()
        times.append(time.perf_counter() - t)
    return time.perf_counter() - t0, times


def decode_steps(runner, logits, n: int) -> dict:
    """n greedy steps as `Runner.generate` takes them (decode, argmax on the device, each step
    queued before the host reads the token it is fed with, one token id read per step); ms per
    token (mean and median)."""
    from runtime.sampling import SamplingConfig, sample

    greedy = SamplingConfig()
    total, times = queued_steps(lambda t: sample(runner._decode(t), greedy, None), sample(logits, greedy, None), n,
                                runner.device)
    return {"ms_per_token": total / n * 1e3, "median_ms": statistics.median(times) * 1e3}


def timed_prefill(runner, ids: list[int]) -> tuple[torch.Tensor, float]:
    _sync(runner.device)
    t = time.perf_counter()
    logits = runner.prefill(ids)
    _sync(runner.device)
    return logits, time.perf_counter() - t


class PrefillModel:
    """Seconds per prefilled token grow with the position (attention reads what is filled):
    t(p) = a + b p, fitted on the timed prompts, to tell whether a long fill fits the budget."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []  # (prompt length from 0, seconds)

    def add(self, n: int, seconds: float) -> None:
        self.points.append((n, seconds))

    def estimate(self, start: int, end: int) -> float:
        if not self.points:  # nothing timed yet: the first, short fill is just run
            return 0.0
        (n1, t1), (n2, t2) = (self.points[0], self.points[-1])
        if n1 == n2:
            a, b = t2 / n2, 0.0
        else:  # T(n) = a n + b n^2 / 2 through both points
            b = max((t2 / n2 - t1 / n1) * 2 / (n2 - n1), 0.0)
            a = max(t2 / n2 - b * n2 / 2, 0.0)
        return a * (end - start) + b * (end * end - start * start) / 2


def bench_kv_dtype(s: Sweep, kv: str, model_dir: Path, clock: Clock, reserve_s: float, scale: int,
                   non_layer_ms: float | None, bytes_per_s: float) -> dict:
    """Decode at each fill and prefill per prompt on one artifact, under a memory sampler."""
    from runtime.artifact import Artifact
    from runtime.memory import PeakSampler
    from runtime.runner import Runner, resolve_device

    artifact = Artifact.open(model_dir)
    meta = artifact.metadata
    device = resolve_device(meta.device, None)
    window = meta.raw["sliding_window"]
    ids = prompt_ids(s, meta.vocab_size)
    decode, prefill, model = [], [], PrefillModel()
    first_logits, fill_s = None, 0.0
    stages = {}  # where the allocator's peak is reached: (live, peak, reserved peak so far) after each phase

    def stage(name: str) -> None:
        if device.startswith("cuda"):
            stages[name] = (torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30,
                            torch.cuda.max_memory_reserved(device) / 2**30)

    with PeakSampler(device) as mem:
        t = time.perf_counter()
        runner = Runner(artifact)
        load_s = time.perf_counter() - t
        stage("load")
        runner.prefill(ids[: 2 * meta.prefill_chunk + 3])  # warm-up: a whole and a partial chunk, then decode
        stage("first prefill")
        decode_steps(runner, runner.decode(ids[0]), 4)
        stage("first decode")
        runner.reset()
        for x in sorted(set(s.fills) | set(s.prompts)):
            if x in s.prompts:
                runner.reset()
                logits, sec = timed_prefill(runner, ids[:x])
                model.add(x, sec)
                prefill.append({"kv_dtype": kv, "prompt": x, "tok_s": x / sec, "seconds": sec})
                first_logits = logits.float().cpu() if first_logits is None else first_logits
                method = "prefill"
            else:
                if runner.pos > x:
                    runner.reset()
                method, est = "prefill", model.estimate(runner.pos, x)
                if runner.pos < x and est > 0 and est > clock.left() - reserve_s:
                    method = "position"  # decode time depends on the position, not the KV's values
                    clock.skipped.append(f"{kv}: prefill {runner.pos}->{x} (estimated {est:.0f} s): decode at fill {x} "
                                         f"measured after moving the position there over a zeroed cache")
                    log(clock.skipped[-1])
                    runner.pos = x - 1
                    logits = runner.decode(ids[x - 1])
                elif runner.pos < x:
                    logits, sec = timed_prefill(runner, ids[runner.pos:x])
                    fill_s += sec
                    log(f"{kv}: prefill to {x} in {sec:.1f} s")
            if x not in s.fills:
                continue
            row = {"kv_dtype": kv, "fill": x, "fill_method": method, **decode_steps(runner, logits, s.new_tokens)}
            read = decode_read_bytes(runner, x + s.new_tokens // 2, window)
            row["floor_ms_slice"], row["floor_ms_60l"] = floor_ms(read, scale, bytes_per_s)
            row["bytes_read_slice"] = read
            row["ms_per_token_slice"] = row.pop("ms_per_token")
            if non_layer_ms is not None and scale:
                row["layers_ms_slice"] = row["ms_per_token_slice"] - non_layer_ms  # 10 sliding + 2 full for the 31B
                row["ms_per_token_60l"] = extrapolate_ms(row["ms_per_token_slice"], non_layer_ms, scale)
                row["extrapolated"] = True
                row["fraction_of_floor_60l"] = row["floor_ms_60l"] / row["ms_per_token_60l"]
            else:
                row["ms_per_token_60l"] = None
            row["fraction_of_floor_slice"] = row["floor_ms_slice"] / row["ms_per_token_slice"]
            decode.append(row)
            log(f"{kv}: fill {x}: {row['ms_per_token_slice']:.3f} ms/token (slice), floor {row['floor_ms_slice']:.3f}")
        stage("end")
        weights, kv_bytes = runner.weight_bytes, runner.kv_bytes
        del runner
    gib = 2**30
    memory = {"kv_dtype": kv, "load_s": load_s, "allocator_peak_gib": mem.peak.allocator_bytes / gib,
              "nvml_peak_gib": None if mem.peak.nvml_bytes is None else mem.peak.nvml_bytes / gib,
              "nvml_process_peak_gib": None if mem.peak.nvml_process_bytes is None else mem.peak.nvml_process_bytes / gib,
              "host_peak_rss_gib": mem.peak.host_rss_bytes / gib,
              "bound_weights_gib": weights / gib, "kv_gib": kv_bytes / gib,
              "allocator_live_peak_reserved_gib_after": stages}
    kernels = decode_kernels(artifact, ids, min(1024, max(s.fills))) if device.startswith("cuda") else None
    return {"decode": decode, "prefill": prefill, "memory": memory, "first_logits": first_logits, "fill_s": fill_s,
            "skipped": clock.skipped, "decode_kernels": kernels}


def decode_kernels(artifact, ids: list[int], fill: int, steps: int = 16, top: int = 12) -> dict:
    """Where a decode step's GPU time goes (scripts/profile_decode.py's table, its largest rows):
    a runner without the CUDA graph, `fill` tokens prefilled. A change that adds kernels or copies
    to the compiled decode shows here even where the step time alone would not say why. With
    programmatic dependent launch (sm_90+) a kernel's time includes its wait for the one before it."""
    from runtime.runner import Runner
    from scripts.profile_decode import kernel_profile

    try:
        runner = Runner(artifact, cuda_graph=False)
        token = int(runner.prefill(ids[:fill]).argmax())
        for _ in range(3):  # first calls
            token = int(runner.decode(token).argmax())
        prof = kernel_profile(runner, token, steps)
        del runner
    except Exception as e:  # noqa: BLE001 (a diagnostic: the sweep's figures stand without it)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"fill": fill, "steps": steps, "kernel_ms": prof["kernel_ms"], "launches_per_step": prof["launches_per_step"],
            "rows": prof["rows"][:top]}


def prompt_ids(s: Sweep, vocab: int) -> list[int]:
    """One random token sequence for every prompt and fill (prefixes of it), ours and transformers'."""
    g = torch.Generator().manual_seed(s.seed)
    return torch.randint(3, vocab, (max(s.fills + s.prompts),), generator=g).tolist()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- the non-layer part of a decode step (for the extrapolation) -----------------------------

def non_layer_model(s: Sweep):
    """The exported recipe's embedding, final norm and lm_head, eager, from a 1-layer model of
    the same preset (the layer is never run)."""
    from export.gemma4.export import DeviceChoice, ExportConfig, KvDtype, prepare_model
    from export.gemma4.quant import EmbeddingQuant

    cfg = ExportConfig(preset=s.preset, layers=1, ctx=min(s.ctx, 4096), embedding_quant=EmbeddingQuant(s.embedding_quant),
                       device=DeviceChoice(s.device), kv_dtype=KvDtype(s.kv_dtypes[0]), seed=s.seed)
    return prepare_model(cfg)[0]


@torch.no_grad()
def non_layer_ms(model, device: str, n: int = 64) -> float:
    """ms per step of what a decode step does outside the decoder layers, taken as the runner
    takes a step: token into a static buffer, embedding -> final norm -> lm_head -> softcap
    (one CUDA graph replay on CUDA), argmax on the device, one token id read by the host, the next
    step queued before that read (`queued_steps`, as the slice's decode steps are timed)."""
    from runtime.sampling import SamplingConfig, sample

    model.to(device)
    cfg = model.cfg
    tok = torch.zeros(1, 1, dtype=torch.int64, device=device)
    pos = torch.zeros(1, dtype=torch.int64, device=device)

    def head():
        x = model.embed_tokens(tok) * model.embed_scale
        if cfg.has_ple:
            model._per_layer_inputs(tok, x)
        logits = model.lm_head(model.norm(x[:, -1, :])).float()
        cap = cfg.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    step = head
    if device.startswith("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                head()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = head()

        def step():
            graph.replay()
            return out
    greedy = SamplingConfig()

    def advance(token):
        tok.copy_(token.view(1, 1))
        pos.fill_(0)
        return sample(step(), greedy, None)

    for _ in range(2):  # the first pass warms up
        total, _ = queued_steps(advance, torch.zeros(1, dtype=torch.int64, device=device), n, device)
    return total / n * 1e3


# ---- transformers' Gemma4ForCausalLM on the same weights -------------------------------------

def slice_state_dict(s: Sweep) -> dict[str, torch.Tensor]:
    """The slice's float weights as the exports drew them (same preset, seed and draw device), on the CPU."""
    from export.gemma4.checkpoint import random_model
    from export.gemma4.config import PRESETS

    mcfg = PRESETS[s.preset].with_layers(s.layers) if s.layers else PRESETS[s.preset]
    dtype = torch.bfloat16 if s.device == "cuda" else torch.float32
    model = random_model(mcfg, ctx=64, prefill_chunk=8, dtype=dtype, seed=s.seed, device=s.device)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def hf_model(s: Sweep, state: dict[str, torch.Tensor], device: str):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    from export.gemma4.config import PRESETS

    mcfg = PRESETS[s.preset].with_layers(s.layers) if s.layers else PRESETS[s.preset]
    hf_cfg = Gemma4TextConfig(**mcfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    dtype = next(iter(state.values())).dtype
    with torch.device(device):
        hf = Gemma4ForCausalLM(hf_cfg).to(dtype).eval()
    missing, unexpected = hf.model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"transformers' model does not take the slice's weights: missing {missing}, "
                           f"unexpected {unexpected}")
    hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


@torch.no_grad()
def bench_hf(hf, prompts: tuple[int, ...], new_tokens: int, ids: list[int], device: str) -> dict:
    """Prefill tok/s per prompt with eager attention (up to HF_EAGER_MAX_PROMPT: beyond, eager's
    score matrix does not fit) and with sdpa, and eager decode ms/token after the shortest prompt."""
    from transformers import DynamicCache

    ids = torch.tensor([ids], device=device)

    def forward(x, cache):
        return hf(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)

    out = {"prefill": [], "decode": None}
    for impl in ("eager", "sdpa"):
        hf.set_attn_implementation(impl)
        forward(ids[:, :64], DynamicCache(config=hf.config))  # warm-up
        for n in prompts:
            if impl == "eager" and n > HF_EAGER_MAX_PROMPT:
                continue
            cache = DynamicCache(config=hf.config)
            _sync(device)
            t = time.perf_counter()
            res = forward(ids[:, :n], cache)
            _sync(device)
            sec = time.perf_counter() - t
            out["prefill"].append({"prompt": n, "attn": impl, "tok_s": n / sec, "seconds": sec,
                                   "last_logits": res.logits[0, -1].float().cpu()})
            if impl == "eager" and out["decode"] is None:
                tok, times = res.logits[:, -1].argmax(-1, keepdim=True), []
                for _ in range(new_tokens):
                    t = time.perf_counter()
                    res = forward(tok, res.past_key_values)
                    tok = res.logits[:, -1].argmax(-1, keepdim=True)
                    int(tok.item())
                    times.append(time.perf_counter() - t)
                out["decode"] = {"fill": n, "attn": impl, "ms_per_token": statistics.fmean(times) * 1e3}
    return out


# ---- one measurement per process -------------------------------------------------------------

def _child_main(queue, fn, args) -> None:
    import traceback

    try:
        queue.put(("ok", _plain(fn(*args))))
    except BaseException as e:  # noqa: BLE001 (reported to the parent, which records it)
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))


def _plain(value):
    """Tensors as numpy arrays (by value: a tensor pickled by torch's reducers is shared memory
    the exiting child may no longer serve)."""
    if isinstance(value, torch.Tensor):
        return _Array(value.detach().cpu().float().numpy())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@dataclass
class _Array:
    array: object


def _tensors(value):
    if isinstance(value, _Array):
        return torch.from_numpy(value.array)
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(v) for v in value)
    return value


def in_child(fn, *args):
    """fn(*args) in a spawned process: whatever it leaves on the device (AOTI containers, CUDA
    graphs' pools, the allocator's cache, the CUDA context) is gone when it returns, so each
    artifact's peaks are its own and the next one starts from an empty device. The result
    comes back pickled: tensors in it as CPU tensors."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(target=_child_main, args=(q, fn, args))
    child.start()
    while True:
        try:
            status, value = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} died in its process (exit code {child.exitcode})")
    child.join()
    if status != "ok":
        raise RuntimeError(value)
    return _tensors(value)


def device_figures(s: "Sweep", device: str) -> dict:
    """Copy bandwidth and the non-layer part of a decode step, in a process of their own."""
    bw = copy_bandwidth(device, nbytes=2 << 30 if device.startswith("cuda") else 1 << 28)
    _free(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else None
    try:  # the extrapolation needs it; the slice's own figures do not
        ms, error = non_layer_ms(non_layer_model(s), device), None
    except Exception as e:  # noqa: BLE001 (recorded by the sweep)
        ms, error = None, f"non-layer part: {type(e).__name__}: {e}"
    return {"copy_bps": bw, "device": name, "non_layer_ms": ms, "error": error, "chain_us": chain_reference_us(device)}


# ---- the sweep -------------------------------------------------------------------------------

def run_sweep(s: Sweep, json_path: Path | None) -> dict:
    clock = Clock(s.time_budget)
    scale = slice_scale(s.preset, s.layers)
    cuda = s.device == "cuda"
    chunk_from = "--prefill-chunk"
    if s.prefill_chunk is None:
        chunk, chunk_from = full_model_chunk(s.preset, s.ctx, s.embedding_quant)
        s = replace(s, prefill_chunk=chunk)
        log(f"prefill chunk {chunk}: {chunk_from}")
    rec: dict = {"copy_gbps": None, "decode": [], "prefill": [], "plan_31b_131072_gib": None,
                 "prefill_chunk": s.prefill_chunk, "prefill_chunk_from": chunk_from,
                 "sweep": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
                 "extrapolated": f"whole-model figures (`*_60l`) = the non-layer part + {scale} x the slice's layers "
                                 "(the slice holds the model's sliding:full pattern)" if scale else None,
                 "memory": [], "hf": None, "exports": {}, "skipped": clock.skipped,
                 "notes": [f"exports: the export CLI, int4 g128 linears, {s.embedding_quant} embedding, --low-memory, "
                           + ("max_autotune" if s.autotune else "--no-autotune (to fit the compile into the run)"),
                           "decode: greedy, CUDA-graph replay on CUDA (the runner's default), one token id read per step",
                           f"transformers: eager attention up to {HF_EAGER_MAX_PROMPT} tokens, sdpa beyond (eager's "
                           "[heads, T, T] fp32 scores: 128 GiB a layer at 32k); logits of the last token only"]}

    def save():
        rec["elapsed_s"] = round(clock.elapsed(), 1)
        # the GEMMA4_* switches the exports ran with (fusions, kernel choices)
        rec["switches"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("GEMMA4_")}
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(rec, indent=1, default=str))

    jobs = start_exports(s)
    # beside the compiles: the planner (CPU). Everything that touches the device runs in a
    # process of its own after them (in_child), so this one never holds device memory.
    plan = _guarded(rec, "plan", "cpu", plan_gib, "31b", None, 131072, "int4", "int8", "cuda")
    rec["plan_31b_131072_gib"] = plan and plan["total_gib"]
    plans = {kv: _guarded(rec, f"plan {kv}", "cpu", plan_gib, s.preset, s.layers, s.ctx, kv, s.embedding_quant, "cuda",
                          s.prefill_chunk) or {} for kv in s.kv_dtypes}
    log(f"ready beside the exports after {clock.elapsed():.0f} s")
    reserve = 90.0 if cuda else 30.0  # the least the measurements need after the exports: one KV dtype, transformers
    rec["exports"] = wait_exports(jobs, s.time_budget - reserve, clock)
    save()

    device = "cuda:0" if cuda else "cpu"
    figures = in_child(device_figures, s, device)  # every ratio needs its copy bandwidth: no figure, no run
    if figures["error"]:
        rec.setdefault("errors", []).append(figures["error"])
    bw = figures["copy_bps"]
    rec["copy_gbps"] = bw / 1e9
    rec["device"] = figures["device"]
    rec["non_layer_ms"] = figures["non_layer_ms"]
    rec["chain_us_per_kernel"] = figures["chain_us"]  # `chain_reference_us`: the machine's state, for comparing calls
    save()
    ours_logits, base_est, hf_pending = {}, 40.0 if cuda else 120.0, s.hf
    todo = [kv for kv in s.kv_dtypes if rec["exports"][kv]["ok"]]
    for i, kv in enumerate(todo):
        if i == 1 and hf_pending:  # transformers after the first artifact: the comparison first
            if clock.allows("transformers' model", 40.0 if cuda else 60.0):
                rec["hf"] = _guarded(rec, "transformers", "cpu", in_child, hf_stage, s, device, ours_logits)
            hf_pending = False
            save()
        if not clock.allows(f"runtime {kv}", base_est):
            continue
        t = time.perf_counter()
        left_after = (len(todo) - i - 1) * base_est + (40.0 if hf_pending else 0.0)
        res = _guarded(rec, f"runtime {kv}", "cpu", in_child, bench_kv_dtype, s, kv, s.workdir / kv, clock, left_after,
                       scale, rec["non_layer_ms"], bw)
        if res is None:
            continue
        clock.skipped += [x for x in res.pop("skipped") if x not in clock.skipped]
        base_est = time.perf_counter() - t - res.pop("fill_s")  # the next may skip its long fill
        ours_logits[kv] = res.pop("first_logits")
        rec.setdefault("decode_kernels", {})[kv] = res.pop("decode_kernels")
        res["memory"]["plan"] = plans[kv]
        m = res["memory"]
        ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731 (a tiny plan rounds to 0.00)
        m["allocator_vs_plan"] = ratio(m["allocator_peak_gib"], plans[kv].get("allocator_gib"))
        m["nvml_vs_plan"] = ratio(m["nvml_peak_gib"], plans[kv].get("total_gib"))
        # this process's own device memory: the device figure also counts the driver's reserve
        m["nvml_process_vs_plan"] = ratio(m.get("nvml_process_peak_gib"), plans[kv].get("total_gib"))
        rec["decode"] += res["decode"]
        rec["prefill"] += res["prefill"]
        rec["memory"].append(m)
        save()
    if hf_pending and clock.allows("transformers' model", 40.0 if cuda else 60.0):
        rec["hf"] = _guarded(rec, "transformers", "cpu", in_child, hf_stage, s, device, ours_logits)
    _merge_hf(rec)
    save()
    return rec


def _guarded(rec: dict, what: str, device: str, fn, *args):
    """fn(*args), or None with the error recorded: one failed stage leaves the others' figures."""
    import traceback

    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (a one-shot device run: keep going, say what failed)
        rec.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
        log(f"{what} failed: {type(e).__name__}: {e}")
        _free(device)
        return None


def hf_stage(s: Sweep, device: str, ours_logits: dict) -> dict:
    """transformers' model on the slice's float weights (drawn here, as the exports drew them)."""
    hf = hf_model(s, slice_state_dict(s), device)
    res = bench_hf(hf, s.prompts, s.new_tokens, prompt_ids(s, hf.config.vocab_size), device)
    del hf
    first = res["prefill"][0].pop("last_logits")  # eager, the shortest prompt
    for row in res["prefill"]:
        row.pop("last_logits", None)
    # a sanity check, not parity: int4 weights (and KV) against bf16 ones
    res["prefill_logits_rel_err_vs_ours"] = {kv: ((lg - first).norm() / first.norm()).item()
                                             for kv, lg in ours_logits.items()}
    return res


def _merge_hf(rec: dict) -> None:
    """transformers' prefill tok/s beside ours, per prompt."""
    rows = sorted((rec["hf"] or {}).get("prefill", []), key=lambda r: r["attn"] != "sdpa")  # eager wins
    hf = {r["prompt"]: r for r in rows}
    for row in rec["prefill"]:
        h = hf.get(row["prompt"])
        row["hf_eager_tok_s"] = h["tok_s"] if h else None
        row["hf_attn"] = h["attn"] if h else None
        row["vs_hf"] = row["tok_s"] / h["tok_s"] if h else None


def print_sweep(rec: dict) -> None:
    print(f"copy bandwidth {rec['copy_gbps']:.0f} GB/s (read + write); non-layer part of a decode step "
          f"{rec.get('non_layer_ms') or float('nan'):.3f} ms; {rec['extrapolated'] or 'no extrapolation'}")
    print(f"\n{'kv':<5} {'fill':>7} {'how':>8} {'slice ms':>9} {'floor':>7} {'60l ms*':>8} {'60l floor':>9} "
          f"{'of floor':>8} {'60l tok/s*':>10}")
    for r in rec["decode"]:
        ms60 = r["ms_per_token_60l"]
        print(f"{r['kv_dtype']:<5} {r['fill']:>7} {r['fill_method']:>8} {r['ms_per_token_slice']:>9.3f} "
              f"{r['floor_ms_slice']:>7.3f} {ms60 or float('nan'):>8.3f} {r['floor_ms_60l']:>9.3f} "
              f"{r.get('fraction_of_floor_60l', float('nan')):>8.1%} {1e3 / ms60 if ms60 else float('nan'):>10.1f}")
    print("* extrapolated from the slice")
    print(f"\n{'kv':<5} {'prompt':>7} {'tok/s':>9} {'hf tok/s':>9} {'hf attn':>7} {'vs hf':>6}")
    for r in rec["prefill"]:
        hf = r.get("hf_eager_tok_s")
        print(f"{r['kv_dtype']:<5} {r['prompt']:>7} {r['tok_s']:>9.0f} {hf or float('nan'):>9.0f} "
              f"{r.get('hf_attn') or '-':>7} {r.get('vs_hf') or float('nan'):>6.2f}")
    print(f"\n{'kv':<5} {'alloc GiB':>9} {'plan':>6} {'ratio':>6} {'NVML GiB':>9} {'plan':>6} {'ratio':>6} "
          f"{'process':>8} {'ratio':>6}")
    for m in rec["memory"]:
        nv = m["nvml_peak_gib"]
        nan = float("nan")
        print(f"{m['kv_dtype']:<5} {m['allocator_peak_gib']:>9.2f} {m['plan'].get('allocator_gib', nan):>6.2f} "
              f"{m['allocator_vs_plan'] or nan:>6.3f} {nv or nan:>9.2f} {m['plan'].get('total_gib', nan):>6.2f} "
              f"{m['nvml_vs_plan'] or float('nan'):>6.3f} {m.get('nvml_process_peak_gib') or nan:>8.2f} "
              f"{m.get('nvml_process_vs_plan') or nan:>6.3f}")
    print("NVML: the device's used memory (also the driver's reserve); process: this process's own per NVML")
    for kv, k in (rec.get("decode_kernels") or {}).items():
        if k and "rows" in k:
            top = ", ".join(f"{r['kernel'][:40]} {r['us_per_step']:.0f} us x{r['launches_per_step']:.0f}" for r in k["rows"][:3])
            print(f"{kv} decode kernels (no graph, fill {k['fill']}): {k['kernel_ms']:.3f} ms, "
                  f"{k['launches_per_step']:.0f} launches a step; largest: {top}")
        elif k:
            print(f"{kv} decode kernels: {k.get('error')}")
    hf = rec.get("hf") or {}
    if hf.get("decode"):
        print(f"\ntransformers eager bf16 decode after {hf['decode']['fill']} tokens: {hf['decode']['ms_per_token']:.2f} ms/token (slice)")
    print(f"plan, full 31B at 131072, 24 GB recipe: {rec['plan_31b_131072_gib']} GiB")
    print(f"prefill chunk {rec['prefill_chunk']} ({rec['prefill_chunk_from']})")
    print("exports: " + ", ".join(f"{kv} {'ok' if e['ok'] else 'FAILED'}"
                                  f"{'' if e.get('seconds') is None else ' in %.0f s' % e['seconds']}"
                                  for kv, e in rec["exports"].items()) + f"; whole run {rec.get('elapsed_s')} s")
    for line in rec["skipped"]:
        print(f"skipped: {line}")
    for line in rec.get("errors", []):
        print(f"error: {line.splitlines()[0]}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts, e.g. 1024,32768") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 2")
    return values


def _kv_list(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    bad = [v for v in values if v not in ("auto", "bf16", "int8", "int4")]
    if bad:
        raise argparse.ArgumentTypeError(f"{','.join(bad)}: KV dtypes are auto, bf16, int8, int4")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="preset to export and bench (repeatable); default tiny")
    p.add_argument("--layers", type=non_negative_int, action="append",
                   help="first n layers of the matching --preset (0 = all), repeat per preset")
    p.add_argument("--ctx", type=positive_int, default=2048)
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="default: 128 (cases); with --kv-dtypes the chunk the export CLI gives the whole "
                        "model with the 24 GB recipe at --ctx (the slice's own plan would allow more)")
    p.add_argument("--quant", default="none", choices=["none", "int4"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autotune", action="store_true", help="compile with Inductor max_autotune (slow)")
    p.add_argument("--prompt-len", type=positive_int, default=100)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--model", type=Path, default=None, help="bench an existing artifact (one --preset) instead of exporting")
    p.add_argument("--workdir", type=Path, default=Path("out/bench"))
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-eager", action="store_true", help="skip the eager model (memory runs: the runner alone)")
    sweep = p.add_argument_group("KV-dtype sweep (one --preset, optionally --layers): exports with the "
                                 "CLI (int4 linears, --low-memory), decode per fill, prefill per prompt, memory vs plan, "
                                 "transformers' model beside")
    sweep.add_argument("--kv-dtypes", type=_kv_list, help="e.g. bf16,int8,int4: run the sweep, one export each")
    sweep.add_argument("--fills", type=_int_list, default=(1024, 32768, 131008),
                       help="decode --new-tokens tokens after prefilling to each (default %(default)s)")
    sweep.add_argument("--prompts", type=_int_list, default=(2048, 32768), help="prefill prompt lengths (default %(default)s)")
    sweep.add_argument("--embedding-quant", default="int8", choices=["none", "int8"])
    sweep.add_argument("--time-budget", type=float, default=3600.0,
                       help="seconds for the whole sweep, exports included: what will not fit is skipped and listed")
    sweep.add_argument("--reuse", action="store_true", help="reuse artifacts already in --workdir/<kv dtype>")
    sweep.add_argument("--no-hf", action="store_true", help="skip transformers' model")
    args = p.parse_args(argv)
    if args.model is not None and not args.model.is_dir():
        p.error(f"--model {args.model}: no such directory (pass an export output directory)")
    if len(args.layers or []) > len(args.preset or ["tiny"]):
        p.error("--layers is given once per --preset: more --layers than presets")
    if args.kv_dtypes:
        if len(args.preset or ["tiny"]) > 1 or args.model is not None:
            p.error("--kv-dtypes sweeps one --preset and exports it itself: drop the extra --preset / --model")
        if max(args.fills) + args.new_tokens > args.ctx:
            p.error(f"--fills: {max(args.fills)} + --new-tokens {args.new_tokens} exceeds --ctx {args.ctx}")
        if max(args.prompts) > args.ctx:
            p.error(f"--prompts: {max(args.prompts)} exceeds --ctx {args.ctx}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = args.preset or ["tiny"]
    layers = (args.layers or []) + [0] * (len(presets) - len(args.layers or []))
    if args.kv_dtypes:
        s = Sweep(presets[0], layers[0] or None, args.ctx, args.kv_dtypes, tuple(sorted(args.fills)),
                  tuple(sorted(args.prompts)), args.new_tokens, args.device, args.embedding_quant, args.prefill_chunk,
                  args.autotune, 0, args.time_budget, args.workdir, args.reuse, not args.no_hf)
        print_sweep(run_sweep(s, args.json))
        return 0
    rows = []
    for preset, n in zip(presets, layers):
        case = Case(preset, n or None, args.ctx, args.prefill_chunk or 128, args.quant, args.dtype, args.device,
                    args.prompt_len, args.new_tokens, args.autotune)
        print(f"== {case.name}: export + runtime + eager on {args.device}", file=sys.stderr, flush=True)
        rows.append(bench_case(case, args.workdir, args.model, eager=not args.no_eager))
        if args.json:  # after every case: a later one may run out of time
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2, default=str))
    print_table(rows)
    return 0


if __name__ == "__main__":
    quiet_internal_warnings()
    sys.exit(run(main, prog="python -m scripts.bench_runtime"))
