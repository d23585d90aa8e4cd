"""The lowering's retrace skips and dropped provenance (export/retrace.py) change no logit: one config exported
with them and without them in one process, both artifacts run on the same tokens, logits
compared bit for bit; each export's stage times side by side.

    python -m scripts.compare_lowering --device cuda --layers 6 --out-json OUT.json

The model is `narrow-31b` (scripts/profile_lowering.py: the 31B's layer pattern at toy
width) unless --preset names another. Without the skips goes second, on warm caches (the
ISA probe, Triton's kernel cache), so its times are if anything flattered. Inductor's FX
graph and AOT autograd caches are off so that the second export compiles too.
"""

from __future__ import annotations

import os

os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"  # before torch reads its config
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default=None, help="default: narrow-31b")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=8)
    p.add_argument("--out-json", type=Path, default=None)
    args = p.parse_args(argv)

    from export.gemma4.config import PRESETS
    from export.gemma4.export import DeviceChoice, DTypeChoice, ExportConfig, export_model
    from scripts.profile_lowering import NARROW, narrow_31b

    PRESETS[NARROW] = narrow_31b()
    root = Path(tempfile.mkdtemp(prefix="compare_lowering_"))
    dev = DeviceChoice(args.device)
    dtype = DTypeChoice.BF16 if args.device == "cuda" else DTypeChoice.FP32
    runs, outs = {}, {}
    for name, ctx in (("skips", contextlib.nullcontext()), ("no_skips", without_skips())):
        cfg = ExportConfig(preset=args.preset or NARROW, layers=args.layers, ctx=args.ctx,
                           prefill_chunk=args.prefill_chunk, group_size=32 if args.preset is None else 128,
                           device=dev, dtype=dtype, low_memory=True, autotune=False, out=root / name)
        t0 = time.perf_counter()
        with ctx:
            result = export_model(cfg)
        runs[name] = {k: round(v, 2) for k, v in result.seconds.items()}
        runs[name]["wall"] = round(time.perf_counter() - t0, 2)
        outs[name] = (cfg.out_dir, result.metadata)
        print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr, flush=True)
    vocab = outs["skips"][1]["vocab_size"]
    a = logits(outs["skips"][0], args.device, args.prefill_chunk, vocab)
    b = logits(outs["no_skips"][0], args.device, args.prefill_chunk, vocab)
    bitwise = [bool(torch.equal(x, y)) for x, y in zip(a, b)]
    max_abs = [float((x - y).abs().max()) for x, y in zip(a, b)]
    rec = {"device": args.device, "preset": args.preset or NARROW, "layers": args.layers, "ctx": args.ctx,
           "prefill_chunk": args.prefill_chunk, "stages_s": runs, "bitwise_equal_per_step": bitwise,
           "max_abs_diff_per_step": max_abs, "bitwise_equal": all(bitwise)}
    if args.device == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    keys = sorted({k for r in runs.values() for k in r})
    print(f"{'stage':<24}" + "".join(f"{n:>12}" for n in runs))
    for k in keys:
        print(f"{k:<24}" + "".join(f"{runs[n].get(k, float('nan')):>12.1f}" for n in runs))
    print(f"logits bitwise equal at every step: {rec['bitwise_equal']} ({sum(bitwise)}/{len(bitwise)} steps)")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(rec, indent=1))
    return 0 if rec["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
