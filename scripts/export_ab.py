"""Two exports of one tree that differ in an environment switch, their decode timed alternately in
fresh processes, their kernels counted and their logits compared (a measuring tool, one GPU call).

    python -m scripts.export_ab --switch GEMMA4_FUSED_NORMS --a 0 --b 1 [--preset 31b --layers 12]
        [--ctx 131072] [--fills 1024,32768] [--steps 64] [--rounds 2] [--workdir /tmp/ab] [--json out.json]
    python -m scripts.export_ab --model-a DIR --model-b DIR ...   # two artifacts exported already

Why: a change to what the export builds (a fusion, a kernel choice) is best measured on the same slice
exported both ways from one tree, side by side: `--switch` names an environment variable the export
reads (or several, comma-separated, each set to the same value: fusions measured together) (GEMMA4_FUSED_NORMS: the norms in the int4 op's kernels or in aten ops, export/gemma4/quant.py), set
to `--a` for one export and `--b` for the other. Both run at once (their own Inductor and Triton
caches), `python -m export.gemma4 --preset P --layers L --ctx C --kv-dtype int4 --embedding-quant int8
--low-memory --no-autotune --prefill-chunk 2048 --seed 0` (the 24 GB recipe on a slice).

Then, per artifact: `scripts.profile_decode` at the first fill with PDL off (each kernel's own time, and
the launches a step; `--profile-fill 0` skips it, as on a CPU artifact), and `--rounds` x (a, b) runs of
`scripts.pdl_ab`'s child (one process each: load, prefill each fill with fixed random ids, `--steps`
greedy decode steps, each step's CUDA-graph replay timed by CUDA events, median). The logits of a's and
b's first runs are compared step by step (an export that changes the arithmetic changes them; a pure
launch change keeps them bitwise). Table on stdout, JSON with `--json`: `exports`, `profile`, and per
fill `a_ms` / `b_ms` (one median a round), `max_abs_logit_diff`, `rel_logit_diff` (the difference's norm over
a's), `bitwise_equal`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "export.gemma4", "--preset", args.preset, "--layers", str(args.layers),
            "--ctx", str(args.ctx), "--kv-dtype", "int4", "--embedding-quant", "int8", "--low-memory",
            "--device", "cuda", "--seed", "0", "--no-autotune", "--prefill-chunk", "2048", "--out", str(out)]


def export_both(args: argparse.Namespace) -> tuple[dict, dict]:
    """Both exports at once; {name: artifact dir}, {name: {seconds, rc, log}}."""
    procs, dirs, info = {}, {}, {}
    t0 = time.perf_counter()
    for name, value in (("a", args.a), ("b", args.b)):
        out = args.workdir / name
        log = args.workdir / f"export_{name}.log"
        env = dict(os.environ, **{var: value for var in args.switch.split(",")},
                   TORCHINDUCTOR_CACHE_DIR=str(args.workdir / f"inductor_{name}"),
                   TRITON_CACHE_DIR=str(args.workdir / f"triton_{name}"))
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        procs[name] = (subprocess.Popen(export_cmd(args, out), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                       log)
        dirs[name] = out
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        info[name] = {"seconds": round(time.perf_counter() - t0, 1), "rc": rc, "log": str(log)}
        if rc != 0:
            tail = log.read_text()[-2000:]
            raise SystemExit(f"export {name} ({args.switch}={getattr(args, name)}) failed, rc {rc}:\n{tail}")
    return dirs, info


def profile(model: Path, fill: int, out: Path) -> dict:
    """Kernel ms and launches of a decode step without PDL (`scripts.profile_decode`)."""
    env = dict(os.environ, GEMMA4_PDL_OFF="1")
    r = subprocess.run([sys.executable, "-m", "scripts.profile_decode", "--model", str(model), "--fill", str(fill),
                        "--steps", "32", "--json", str(out)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"profile of {model} failed:\n{r.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    return {"kernel_ms": doc["kernel_ms"], "launches_per_step": sum(row["launches_per_step"] for row in doc["rows"]),
            "rows": doc["rows"][:12]}


def timed_run(model: Path, fills: str, steps: int, out: Path) -> tuple[dict, dict]:
    """One `scripts.pdl_ab` child: ({fill: median ms}, {fill: logits})."""
    import torch

    r = subprocess.run([sys.executable, "-m", "scripts.pdl_ab", "--model", str(model), "--fills", fills,
                        "--steps", str(steps), "--child", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"decode run of {model} failed:\n{r.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    return {f: v["median_ms"] for f, v in doc.items()}, torch.load(str(out) + ".pt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch", default="GEMMA4_FUSED_NORMS",
                   help="the environment variable the two exports differ in (comma-separated: several, set alike)")
    p.add_argument("--a", default="0", help="its value for export a (default %(default)s)")
    p.add_argument("--b", default="1", help="its value for export b (default %(default)s)")
    p.add_argument("--model-a", type=Path, help="an artifact for a (no export)")
    p.add_argument("--model-b", type=Path, help="an artifact for b (no export)")
    p.add_argument("--preset", default="31b")
    p.add_argument("--layers", type=int, default=12, help="layers of the slice (default %(default)s)")
    p.add_argument("--ctx", type=int, default=131072)
    p.add_argument("--fills", default="1024,32768", help="prompt lengths to decode after (comma-separated)")
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps per fill")
    p.add_argument("--rounds", type=int, default=2, help="alternated (a, b) runs")
    p.add_argument("--profile-fill", type=int, default=1024, help="fill of the kernel profile; 0: no profile")
    p.add_argument("--workdir", type=Path, default=None, help="artifacts and logs (default: a new temporary directory)")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    if (a.model_a is None) != (a.model_b is None):
        p.error("--model-a and --model-b go together")
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    fills = [f for f in a.fills.split(",") if f]
    a.workdir = a.workdir or Path(tempfile.mkdtemp(prefix="export_ab_"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.model_a is not None:
        models, exports = {"a": a.model_a, "b": a.model_b}, {}
    else:
        print(f"exporting {a.preset} ({a.layers} layers, ctx {a.ctx}) with {a.switch}={a.a} and ={a.b}", flush=True)
        models, exports = export_both(a)
        print(f"exports done in {max(e['seconds'] for e in exports.values()):.0f} s", flush=True)
    prof = {}
    t0 = time.perf_counter()
    if a.profile_fill:
        for n, m in models.items():
            prof[n] = profile(m, a.profile_fill, a.workdir / f"profile_{n}.json")
            print(f"[{time.perf_counter() - t0:5.0f} s] profile {n}: {prof[n]['kernel_ms']:.3f} ms of kernels",
                  flush=True)
    times = {n: {f: [] for f in fills} for n in models}
    logits = {}
    for rnd in range(a.rounds):
        for n, m in models.items():
            ms, lg = timed_run(m, a.fills, a.steps, a.workdir / f"run_{n}_{rnd}.json")
            for f in fills:
                times[n][f].append(ms[f])
            logits.setdefault(n, lg)
            print(f"[{time.perf_counter() - t0:5.0f} s] round {rnd + 1} {n}: "
                  + ", ".join(f"fill {f} {ms[f]:.3f} ms" for f in fills), flush=True)
    doc = {"switch": a.switch, "a": a.a, "b": a.b, "models": {n: str(m) for n, m in models.items()},
           "exports": exports, "profile": prof, "steps": a.steps, "fills": {}}
    print(f"{'fill':>7} {'a ms':>8} {'b ms':>8} {'change':>8}  logits")
    for f in fills:
        la, lb = logits["a"][f], logits["b"][f]
        diff = float((la - lb).abs().max())
        rel = float((la.float() - lb.float()).norm() / la.float().norm().clamp(min=1e-30))
        row = {"a_ms": times["a"][f], "b_ms": times["b"][f], "max_abs_logit_diff": diff, "rel_logit_diff": rel,
               "bitwise_equal": bool((la == lb).all())}
        doc["fills"][f] = row
        best_a, best_b = min(row["a_ms"]), min(row["b_ms"])
        print(f"{f:>7} {best_a:8.3f} {best_b:8.3f} {best_b - best_a:+8.3f}  "
              f"{'bitwise equal' if row['bitwise_equal'] else f'max |diff| {diff:.3g}, rel {rel:.2e}'}")
    for n, pr in prof.items():
        print(f"{n}: {pr['kernel_ms']:.3f} ms of kernels, {pr['launches_per_step']:.0f} launches a step (PDL off)")
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
