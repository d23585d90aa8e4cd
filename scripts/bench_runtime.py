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
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="preset to export and bench (repeatable); default tiny")
    p.add_argument("--layers", type=non_negative_int, action="append",
                   help="first n layers of the matching --preset (0 = all), repeat per preset")
    p.add_argument("--ctx", type=positive_int, default=2048)
    p.add_argument("--prefill-chunk", type=positive_int, default=128)
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
    args = p.parse_args(argv)
    if args.model is not None and not args.model.is_dir():
        p.error(f"--model {args.model}: no such directory (pass an export output directory)")
    if len(args.layers or []) > len(args.preset or ["tiny"]):
        p.error("--layers is given once per --preset: more --layers than presets")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = args.preset or ["tiny"]
    layers = (args.layers or []) + [0] * (len(presets) - len(args.layers or []))
    rows = []
    for preset, n in zip(presets, layers):
        case = Case(preset, n or None, args.ctx, args.prefill_chunk, args.quant, args.dtype, args.device,
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
