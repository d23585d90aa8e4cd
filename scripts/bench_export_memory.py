"""Export memory, stock vs low-memory: the same model and ctx, each export in a fresh process.

    python -m scripts.bench_export_memory --preset 31b --runs stock:6,low:6,low:2,low:4 \
        --ctx 131072 --out out/bench --json out/bench/export_memory.json

Each run `MODE:LAYERS` exports `PRESETS[preset].with_layers(LAYERS)` (random weights, int4
g32 by default) through the real exporter (`export.gemma4.export.export_model`) in a child
process and reports, per phase (quantize, torch.export, lower, write) and overall: the
allocator peak (`torch.cuda.max_memory_allocated`), the device memory used sampled from a
thread through NVML (absolute and above the idle baseline taken before CUDA starts), host
peak RSS, wall time, and the .pte/.ptd sizes. When stock and low-memory artifacts of the
same layer count exist, a fresh process runs both (one prompt, then decode steps) and
reports whether the logits are identical. Table on stdout, JSON on disk; with low-memory
peaks at two or more layer counts, a linear fit extrapolates to the model's full depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from export.cli import finite_float, positive_int, quiet_internal_warnings, run

GIB = 1 << 30
PHASES = ("quantize", "torch_export", "lower", "write")
# the exporter's own flags (export/gemma4/flags.py) this benchmark passes through
EXPORT_FLAGS = ("ctx", "prefill_chunk", "quant", "group_size", "embedding_quant", "device", "autotune", "multi_arch_kernels")


# ---- measurement (child process) ----------------------------------------------------------

@dataclass
class Peaks:
    allocator: int = 0  # torch caching allocator peak, bytes
    nvml: int | None = None  # device memory used (all processes), sampled peak, bytes
    nvml_above_idle: int | None = None  # nvml minus the device's use before this process touched CUDA
    nvml_process: int | None = None  # this process's device memory (NVML per-process accounting)
    reserved: int = 0  # torch caching allocator reserved peak (segments incl. fragmentation), bytes
    host_rss: int = 0  # process RSS peak in this phase (sampled), bytes
    seconds: float = 0.0
    completed: bool = False  # the phase returned (a failed one still reports what it used)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    """Samples NVML device memory and host RSS every `period_s`, attributing to the phase."""

    def __init__(self, period_s: float = 0.01):
        self.period_s = period_s
        self.phase = "startup"
        self.peaks: dict[str, Peaks] = {}
        self._stop = threading.Event()
        self._handle = self._nvml()
        self.idle = self._used() if self._handle is not None else None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _nvml():
        try:
            import pynvml
            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("BENCH_NVML_INDEX", "0")))
        except Exception:  # no NVML (CPU machine): allocator and RSS only
            return None

    def _used(self) -> int:
        import pynvml
        return pynvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _process_used(self) -> int | None:
        """This process's device memory per NVML, or None (not listed yet, or another pid
        namespace): the figure that stays true when several exports share the GPU."""
        import pynvml
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory is not None]
        return mine[0] if mine else None

    def _sample(self) -> None:
        p = self.peaks.setdefault(self.phase, Peaks())
        p.host_rss = max(p.host_rss, _rss_now())
        if self._handle is not None:
            used = self._used()
            p.nvml = max(p.nvml or 0, used)
            p.nvml_above_idle = p.nvml - self.idle
            mine = self._process_used()
            if mine is not None:
                p.nvml_process = max(p.nvml_process or 0, mine)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class PhaseMeter:
    """A stage listener (export/stages.py): each export stage of PHASES is measured as a
    phase; `on_done()` runs after each."""

    def __init__(self, sampler: Sampler, on_done=lambda: None):
        from export import stages

        self.stages, self.sampler, self.on_done = stages, sampler, on_done
        self.names = dict(zip((stages.LOAD, stages.TORCH_EXPORT, stages.LOWER, stages.WRITE), PHASES))

    def __call__(self, event) -> None:
        import torch

        name = self.names.get(event.stage)
        if name is None or event.kind not in (self.stages.START, self.stages.END):
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self.sampler._sample()
        if event.kind == self.stages.START:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.sampler.phase = name
            return
        p = self.sampler.peaks.setdefault(name, Peaks())
        p.completed = p.completed or not event.error
        p.seconds += event.seconds or 0.0
        if cuda:
            p.allocator = max(p.allocator, torch.cuda.max_memory_allocated())
            p.reserved = max(p.reserved, torch.cuda.max_memory_reserved())
        self.sampler.phase = "between"
        self.on_done()


def child(args: argparse.Namespace) -> None:
    """One export, measured; writes its result JSON to args.result."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI (export.gemma4)
    sampler = Sampler().start()  # NVML baseline before torch touches CUDA
    import export.gemma4.export as X
    from export.gemma4.config import PRESETS

    name = f"{args.preset}-{args.layers}l"
    PRESETS[name] = PRESETS[args.preset].with_layers(args.layers)

    def report(result, error, total) -> dict:
        """The result JSON as measured so far; written every 15 s, after every phase and at the end."""
        import torch
        live = sampler.peaks.get(sampler.phase)
        if live is not None and torch.cuda.is_initialized():  # the phase still running
            live.allocator = max(live.allocator, torch.cuda.max_memory_allocated())
            live.reserved = max(live.reserved, torch.cuda.max_memory_reserved())
        phases = {k: asdict(v) for k, v in sampler.peaks.items() if k in PHASES}
        overall = {
            "allocator": max((p["allocator"] for p in phases.values()), default=0),
            "nvml": max((p["nvml"] or 0 for p in phases.values()), default=0) or None,
            "nvml_above_idle": max((p["nvml_above_idle"] or 0 for p in phases.values()), default=0) or None,
            "nvml_process": max((p["nvml_process"] or 0 for p in phases.values()), default=0) or None,
            "reserved": max((p["reserved"] for p in phases.values()), default=0),
            "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": total,
        }
        out = {"mode": args.mode, "layers": args.layers, "preset": args.preset, "ctx": args.ctx,
               "prefill_chunk": args.prefill_chunk, "quant": str(args.quant), "group_size": args.group_size,
               "embedding_quant": str(args.embedding_quant), "device": str(args.device), "autotune": args.autotune,
               "nvml_idle": sampler.idle, "phases": phases, "overall": overall, "error": error,
               "sizes": result.sizes if result else {}, "artifact": str(result.out_dir) if result else None,
               "exporter_seconds": result.seconds if result else {}}
        Path(args.result).write_text(json.dumps(out, indent=1))
        return out

    t_begin = time.perf_counter()
    unfinished = lambda: report(None, "unfinished (killed by the time budget?)", time.perf_counter() - t_begin)
    meter = PhaseMeter(sampler, on_done=unfinished)

    def keep_reporting():  # a run killed mid-phase keeps the peaks measured so far
        while not sampler._stop.wait(15.0):
            unfinished()
    reporter = threading.Thread(target=keep_reporting, daemon=True)
    reporter.start()
    from export.gemma4.flags import export_fields

    cfg = X.ExportConfig(**export_fields(args, EXPORT_FLAGS), preset=name, low_memory=args.mode == "low",
                         out=Path(args.artifact))
    if os.environ.get("BENCH_STACKS"):  # where the minutes go, even if the run is killed
        from scripts.stack_sample import sample_forever
        stacks = open(Path(args.result).with_suffix(".stacks"), "w")
        threading.Thread(target=sample_forever, args=(stacks, float(os.environ["BENCH_STACKS"]),
                                                      threading.get_ident()), daemon=True).start()
    t0 = time.perf_counter()
    result, error = None, None
    profiler = None
    if args.profile:  # where the minutes go (the 31B-width compiles are the device budget's main cost)
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        from export.stages import NOTE

        def log(event) -> None:
            if event.kind == NOTE:
                print(event.detail, flush=True)
        result = X.export_model(cfg, listeners=(meter, log))
    except Exception as e:  # keep the phases measured so far (a late failure still reports lowering)
        error = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t0
    if profiler is not None:
        import pstats
        profiler.disable()
        profiler.dump_stats(str(Path(args.result).with_suffix(".prof")))
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(60)
    sampler.stop()
    reporter.join()  # its last write must not land after the final one
    out = report(result, error, total)
    if error:
        raise SystemExit(f"export failed after the measured phases {sorted(out['phases'])}: {error}")


def compare(args: argparse.Namespace) -> None:
    """Run two artifacts on the same tokens; write max |diff| of every step's logits."""
    import torch
    from runtime.runner import Runner

    device = str(args.device)
    a, b = (Runner.load(p, device=device if device != "auto" else None) for p in args.compare)
    vocab = a.meta.vocab_size
    prompt = [2] + [(37 * i + 11) % (vocab - 3) + 3 for i in range(args.prompt_len - 1)]
    steps = [("prefill", lambda r: r.prefill(prompt))]
    steps += [(f"decode{i}", lambda r, t=t: r.decode(t % vocab)) for i, t in enumerate((5, 7, 11))]
    diffs = {}
    for label, step in steps:
        la, lb = step(a).float().cpu(), step(b).float().cpu()
        diffs[label] = {"max_abs": float((la - lb).abs().max()), "identical": bool(torch.equal(la, lb)),
                        "argmax_equal": bool(la.argmax() == lb.argmax())}
    Path(args.result).write_text(json.dumps(diffs, indent=1))


# ---- orchestration (parent) ----------------------------------------------------------------

@dataclass
class Run:
    mode: str
    layers: int
    ctx: int
    result: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.layers}l_{self.ctx}"


def _child_cmd(args, run: Run, result: Path, artifact: Path) -> list[str]:
    return [sys.executable, "-m", "scripts.bench_export_memory", "--child", "--mode", run.mode,
            "--layers", str(run.layers), "--preset", args.preset, "--ctx", str(run.ctx),
            "--prefill-chunk", str(args.prefill_chunk), "--quant", str(args.quant),
            "--group-size", str(args.group_size), "--embedding-quant", str(args.embedding_quant),
            "--device", str(args.device), "--artifact", str(artifact), "--result", str(result),
            "--autotune" if args.autotune else "--no-autotune"] + (["--profile"] if args.profile else []) \
        + (["--multi-arch-kernels"] if args.multi_arch_kernels else [])


def _spawn(cmd: list[str], log: Path, timeout: float) -> str | None:
    """Run a child; None on success, else the reason (its log keeps the details)."""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
    return None if rc == 0 else f"exit {rc} (see {log})"


def _fmt(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GIB:6.2f}"


def table(runs: list[Run], comparisons: dict) -> str:
    head = (f"{'mode':5} {'L':>2} {'ctx':>6} | {'lower: alloc':>12} {'resv':>6} {'nvml/p':>6} {'nvml':>6} | "
            f"{'all: alloc':>10} {'nvml/p':>6} | {'host RSS':>8} | {'time s':>6} | {'pte MiB':>7} {'ptd GiB':>7}")
    lines = [head, "-" * len(head)]
    for r in runs:
        tag = f"{r.mode:5} {r.layers:>2} {r.ctx:>6}"
        if r.error and not r.result.get("phases"):
            lines.append(f"{tag} | failed: {r.error}")
            continue
        if r.error:
            lines.append(f"{tag} | failed after measuring {sorted(r.result['phases'])}: "
                         f"{r.result.get('error') or r.error}"[:200])
        ph, ov, sz = r.result["phases"], r.result["overall"], r.result["sizes"]
        low = ph.get("lower", {})
        lines.append(
            f"{tag} | {_fmt(low.get('allocator')):>12} {_fmt(low.get('reserved')):>6} {_fmt(low.get('nvml_process')):>6} "
            f"{_fmt(low.get('nvml')):>6} | {_fmt(ov['allocator']):>10} {_fmt(ov.get('nvml_process')):>6} | "
            f"{_fmt(ov['host_rss']):>8} | {ov['seconds']:6.0f} | {sz.get('model.pte', 0) / (1 << 20):7.1f} "
            f"{sz.get('model.ptd', 0) / GIB:7.2f}")
    lines.append("(GiB; 'lower' = to_edge + AOTInductor compile of both methods, where the passes act; 'resv' ="
                 " allocator reserved; 'nvml/p' = this process per NVML (CUDA context included); 'nvml' ="
                 " whole device, meaningful only when exports run one at a time)")
    for key, c in comparisons.items():
        if "error" in c:
            lines.append(f"logits stock vs low, {key}: comparison failed: {c['error']}")
            continue
        worst = max(v["max_abs"] for v in c.values())
        same = all(v["identical"] for v in c.values())
        lines.append(f"logits stock vs low, {key}: {'identical' if same else 'DIFFER'} "
                     f"(max |diff| {worst:.3g} over prefill + {len(c) - 1} decode steps)")
    return "\n".join(lines)


def extrapolate(runs: list[Run], full_layers: int) -> dict | None:
    """Least-squares line through low-memory lowering peaks vs layers, evaluated at full depth."""
    ctx = max((r.ctx for r in runs if r.mode == "low"), default=None)  # one line per ctx: the largest
    pts = [(r.layers, r.result["phases"]["lower"]) for r in runs
           if r.mode == "low" and r.ctx == ctx and r.result.get("phases", {}).get("lower", {}).get("completed")]
    if len({x for x, _ in pts}) < 2:
        return None
    out = {"layers": full_layers, "ctx": ctx, "points": {}}
    for key in ("allocator", "reserved", "nvml_process"):
        xy = [(x, p[key]) for x, p in pts if p.get(key) is not None]
        if len({x for x, _ in xy}) < 2:
            continue
        n = len(xy)
        mx, my = sum(x for x, _ in xy) / n, sum(y for _, y in xy) / n
        slope = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
        out[key] = {"per_layer_bytes": slope, "at_full_depth_bytes": my + slope * (full_layers - mx)}
        out["points"][key] = {str(x): y for x, y in xy}
    return out


def parent(args: argparse.Namespace) -> None:
    from export.gemma4.config import PRESETS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = Path(args.artifacts) if args.artifacts else out
    runs = []
    for spec in args.runs.split(","):
        mode, layers, *ctx = spec.split(":")
        runs.append(Run(mode, int(layers), int(ctx[0]) if ctx else args.ctx))
    for r in runs:
        r.error = "not run"
    t_start = time.monotonic()
    env = dict(os.environ)
    if args.parallel > 1:  # several exports share the machine: split the compile workers
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(2, (os.cpu_count() or 2) // args.parallel))
    pending, active = list(runs), {}
    while pending or active:
        while pending and len(active) < max(1, args.parallel):
            r = pending.pop(0)
            left = args.time_budget - (time.monotonic() - t_start)
            if left < 60:
                r.error = "skipped: time budget spent"
                continue
            r.error = None
            log = open(out / f"{r.name}.log", "w")
            cmd = _child_cmd(args, r, out / f"{r.name}.json", artifacts / r.name)
            child_env = dict(env)
            if args.parallel > 1:  # concurrent compiles of the same kernel race in a shared cache dir
                cache = Path(tempfile.gettempdir()) / f"bench_export_cache_{os.getpid()}_{r.name}"
                child_env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
            active[r.name] = (r, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env), log)
        time.sleep(1.0)
        for name, (r, proc, log) in list(active.items()):
            over = time.monotonic() - t_start > args.time_budget
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                r.error = f"timed out after {args.time_budget:.0f} s"
            elif proc.returncode != 0:
                r.error = f"exit {proc.returncode} (see {out / (r.name + '.log')})"
            log.close()
            del active[name]
            result = out / f"{r.name}.json"
            if result.is_file():  # also after a late failure: the phases it measured
                r.result = json.loads(result.read_text())
            print(f"[{time.monotonic() - t_start:5.0f} s] {r.mode}:{r.layers}:{r.ctx} "
                  f"{'ok' if r.error is None else r.error}", flush=True)
            if r.error is not None and args.stop_on_error:
                pending.clear()
    comparisons = {}
    done = {(r.mode, r.layers, r.ctx) for r in runs if r.error is None}
    for layers, ctx in sorted({(r.layers, r.ctx) for r in runs}):
        if {("stock", layers, ctx), ("low", layers, ctx)} <= done and not args.no_compare:
            key = f"{layers}l_{ctx}"
            result = out / f"compare_{key}.json"
            cmd = [sys.executable, "-m", "scripts.bench_export_memory", "--compare",
                   str(artifacts / f"stock_{key}"), str(artifacts / f"low_{key}"), "--device", str(args.device),
                   "--prompt-len", str(args.prompt_len), "--result", str(result)]
            err = _spawn(cmd, out / f"compare_{key}.log", max(60.0, args.time_budget - (time.monotonic() - t_start)))
            comparisons[key] = json.loads(result.read_text()) if err is None else {"error": err}
    report = {"runs": [asdict(r) for r in runs], "logits": comparisons,
              "extrapolation": extrapolate(runs, PRESETS[args.preset].num_hidden_layers)}
    for layers, ctx in sorted({(r.layers, r.ctx) for r in runs}):
        pair = {r.mode: r for r in runs if (r.layers, r.ctx) == (layers, ctx)
                and r.result.get("phases", {}).get("lower", {}).get("completed")}
        if {"stock", "low"} <= set(pair):
            s, lo = pair["stock"].result["phases"]["lower"], pair["low"].result["phases"]["lower"]
            report.setdefault("ratios", {})[f"{layers}l_{ctx}"] = {
                k: (lo[k] / s[k] if s.get(k) and lo.get(k) is not None else None)
                for k in ("allocator", "nvml", "nvml_process")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(runs, comparisons))
    for layers, ratio in report.get("ratios", {}).items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in ratio.items() if v is not None) or "n/a (no GPU figures)"
        print(f"low / stock while lowering, {layers} layers: {shown}")
    ex = report["extrapolation"]
    if ex:
        for key in ("allocator", "reserved", "nvml_process"):
            if key in ex:
                print(f"low-memory lowering peak ({key}) extrapolated to {ex['layers']} layers: "
                      f"{ex[key]['at_full_depth_bytes'] / GIB:.2f} GiB ({ex[key]['per_layer_bytes'] / (1 << 20):+.1f} MiB/layer)")
    print(f"JSON: {args.json}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="31b")
    p.add_argument("--runs", default="stock:6,low:6,low:2,low:4",
                   help="MODE:LAYERS[:CTX],... (mode stock|low; CTX defaults to --ctx)")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="exports at once (each its own process; compile workers split between them). "
                        "Allocator, reserved, per-process NVML and RSS peaks stay per export; the "
                        "device-wide NVML column and wall times do not")
    from export.gemma4.flags import add_export_arguments
    from export.gemma4.options import DeviceChoice

    add_export_arguments(p, EXPORT_FLAGS,
                         ctx=dict(default=131072), prefill_chunk=dict(type=positive_int, default=128),
                         group_size=dict(default=32), device=dict(default=DeviceChoice.CUDA))
    p.add_argument("--out", default="out/bench_export_memory")
    p.add_argument("--json", default="out/bench_export_memory/export_memory.json")
    p.add_argument("--time-budget", type=finite_float, default=3600.0, help="seconds for all runs; later runs are skipped")
    p.add_argument("--prompt-len", type=positive_int, default=20)
    p.add_argument("--no-compare", action="store_true")
    p.add_argument("--artifacts", help="where the exported artifacts go (default: --out)")
    p.add_argument("--stop-on-error", action="store_true", help="skip the remaining runs after a failure")
    p.add_argument("--profile", action="store_true",
                   help="cProfile each export: <run>.prof next to its JSON, top functions in its log")
    # internal: one measured export / one logits comparison
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("stock", "low"), help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
    elif args.compare:
        compare(args)
    else:
        parent(args)


if __name__ == "__main__":
    quiet_internal_warnings()
    raise SystemExit(run(main, prog="python -m scripts.bench_export_memory"))
