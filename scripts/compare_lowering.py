"""The lowering's retrace skips and dropped provenance (export/retrace.py) change no logit:
one config exported with them and without them, both artifacts run on the same tokens,
logits compared bit for bit; each export's stage times side by side.

    python -m scripts.compare_lowering --device cuda --layers 2 --out-json OUT.json

The two exports run at once, each in a fresh process of its own (`--variant`; each pays
its own imports and Inductor's ISA probe, so their times compare), then this process loads
both artifacts and compares. The model is `narrow-31b` (scripts/profile_lowering.py: the
31B's layer pattern at toy width) unless --preset names another; low-memory, --no-autotune
(deterministic), bf16 on CUDA, fp32 on the CPU. Inductor's FX graph and AOT autograd caches
are off, so each export compiles.
"""

from __future__ import annotations

import os

os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"  # before torch reads its config
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


@contextlib.contextmanager
def without_skips():
    """The lowering as it was: every retrace runs."""
    import export.backends.aoti_base as aoti_base
    import export.pipeline as pipeline
    import export.retrace as retrace

    saved = pipeline.skip_identity_decompositions, retrace.decomposes_nothing, aoti_base.drop_provenance
    pipeline.skip_identity_decompositions, retrace.decomposes_nothing = contextlib.nullcontext, lambda *a: False
    aoti_base.drop_provenance = lambda program: program
    try:
        yield
    finally:
        pipeline.skip_identity_decompositions, retrace.decomposes_nothing, aoti_base.drop_provenance = saved


def logits(out: Path, device: str, chunk: int, vocab: int, n_decode: int = 4) -> list[torch.Tensor]:
    from runtime.runner import Runner

    runner = Runner.load(out, device=device, cuda_graph=False)
    ids = torch.randint(3, vocab, (chunk + 3 + n_decode,), generator=torch.Generator().manual_seed(0)).tolist()
    got = [runner.prefill(ids[:chunk]).float().cpu(), runner.prefill(ids[chunk:chunk + 3]).float().cpu()]
    got += [runner.decode(t).float().cpu() for t in ids[chunk + 3:]]
    return got


def export_variant(args) -> None:
    """One export (`--variant`), its stage events on stderr, its stage times in OUT/stages.json."""
    from export.gemma4.config import PRESETS
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model
    from scripts.profile_lowering import NARROW, narrow_31b

    PRESETS[NARROW] = narrow_31b()
    cfg = ExportConfig(preset=args.preset or NARROW, layers=args.layers, ctx=args.ctx,
                       prefill_chunk=args.prefill_chunk, group_size=32 if args.preset is None else 128,
                       device=DeviceChoice(args.device),
                       dtype=DTypeChoice.BF16 if args.device == "cuda" else DTypeChoice.FP32,
                       low_memory=True, autotune=False, out=args.root / args.variant)
    t0 = time.perf_counter()

    def log(event) -> None:
        if event.kind != "advance" or event.stage == "lower":
            extra = f" {event.seconds:.1f} s" if event.seconds is not None else ""
            when = f"{args.variant} {time.perf_counter() - t0:6.1f} s"
            print(f"[{when}] {event.stage} {event.kind}{extra} {event.detail}", file=sys.stderr, flush=True)

    with contextlib.nullcontext() if args.variant == "skips" else without_skips():
        result = export_model(cfg, listeners=(log,))
    rec = {k: round(v, 2) for k, v in result.seconds.items()}
    rec["wall"] = round(time.perf_counter() - t0, 2)
    # the lowering's own work: less the waits for the compile workers and the ISA probe
    rec["lower_own"] = round(rec["lower"] - rec.get("compile_workers_wait", 0) - rec.get("isa_probe_wait", 0), 2)
    record = {"stages": rec, "vocab_size": result.metadata["vocab_size"]}
    (args.root / f"{args.variant}.json").write_text(json.dumps(record))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default=None, help="default: narrow-31b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=8)
    p.add_argument("--out-json", type=Path, default=None)
    p.add_argument("--timeout-s", type=float, default=None, help="limit for the two exports")
    p.add_argument("--variant", choices=("skips", "no_skips"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        export_variant(args)
        return 0

    root = Path(tempfile.mkdtemp(prefix="compare_lowering_"))
    common = ["--device", args.device, "--layers", str(args.layers), "--ctx", str(args.ctx),
              "--prefill-chunk", str(args.prefill_chunk), "--root", str(root)]
    common += ["--preset", args.preset] if args.preset else []
    variants = ("skips", "no_skips")
    procs = {v: subprocess.Popen([sys.executable, "-m", "scripts.compare_lowering", "--variant", v, *common])
             for v in variants}
    t0 = time.perf_counter()
    for v, proc in procs.items():
        left = None if args.timeout_s is None else max(1.0, args.timeout_s - (time.perf_counter() - t0))
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            print(f"{v}: export still running after {args.timeout_s} s", file=sys.stderr)
            return 3
        if rc != 0:
            print(f"{v}: export exited {rc}", file=sys.stderr)
            return 3
    runs = {v: json.loads((root / f"{v}.json").read_text()) for v in variants}
    vocab = runs["skips"]["vocab_size"]
    a = logits(root / "skips", args.device, args.prefill_chunk, vocab)
    b = logits(root / "no_skips", args.device, args.prefill_chunk, vocab)
    bitwise = [bool(torch.equal(x, y)) for x, y in zip(a, b)]
    max_abs = [float((x - y).abs().max()) for x, y in zip(a, b)]
    stages = {v: runs[v]["stages"] for v in variants}
    rec = {"device": args.device, "preset": args.preset or "narrow-31b", "layers": args.layers, "ctx": args.ctx,
           "prefill_chunk": args.prefill_chunk, "autotune": False, "low_memory": True,
           "vec_isa_ok_env": os.environ.get("TORCHINDUCTOR_VEC_ISA_OK"), "stages_s": stages,
           "steps": ["prefill", "prefill"] + ["decode"] * (len(a) - 2),
           "bitwise_equal_per_step": bitwise, "max_abs_diff_per_step": max_abs, "bitwise_equal": all(bitwise)}
    if args.device == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    keys = sorted({k for r in stages.values() for k in r})
    print(f"{'stage (s)':<24}" + "".join(f"{n:>12}" for n in variants))
    for k in keys:
        print(f"{k:<24}" + "".join(f"{stages[n].get(k, float('nan')):>12.1f}" for n in variants))
    print(f"logits bitwise equal at every step: {rec['bitwise_equal']} ({sum(bitwise)}/{len(bitwise)} steps)")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(rec, indent=1))
    return 0 if rec["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
