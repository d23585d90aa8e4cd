"""`python -m runtime`: generate text from an exported Gemma 4 artifact.

Streams the reply to stdout as it is generated and ends with one summary line (time to
first token, prefill and decode speed, peak GPU memory). Needs only the export directory
(model.pte, model.ptd, tokenizer.json): no C++ build, no model code.
"""

from __future__ import annotations

import argparse
import sys
import time

from runtime.artifact import Artifact, ArtifactError
from runtime.memory import PeakSampler
from runtime.runner import ContextOverflowError, Runner, check_fits, resolve_device
from runtime.sampling import SamplingConfig
from runtime.tokenizer import TextTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Run an exported Gemma 4 model (model.pte + model.ptd + tokenizer.json) and stream "
        "its reply. Greedy by default; --temperature > 0 samples (with --top-k / --top-p, "
        "reproducibly with --seed).",
        epilog="example: python -m runtime --model out/tiny --prompt 'Hello' --max-new-tokens 32 --chat",
    )
    p.add_argument("--model", required=True, help="export directory holding model.pte, model.ptd and tokenizer.json")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in a user turn (the checkpoint's chat template, else Gemma's turn format)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    p.add_argument("--device", default=None,
                   help="device to run on, e.g. cuda:1 (default: the one the artifact was compiled for)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode through the compiled method's own calls instead of a replayed CUDA graph")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        return _run(args, sampling)
    except (ArtifactError, ContextOverflowError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, sampling: SamplingConfig) -> int:
    t0 = time.perf_counter()
    artifact = Artifact.open(args.model)
    meta = artifact.metadata
    tok = TextTokenizer.from_dir(args.model, meta.bos_token_id)  # fail before loading weights
    ids = tok.encode(args.prompt, chat=args.chat)
    stops = set(meta.eos_token_ids) | (tok.end_of_turn_ids() if args.chat else set())
    check_fits(meta.ctx, len(ids), args.max_new_tokens)
    with PeakSampler(resolve_device(meta.device, args.device)) as mem:
        runner = Runner(artifact, args.device, cuda_graph=not args.no_cuda_graph)
        load_s = time.perf_counter() - t0
        stream = tok.stream()
        for token in runner.generate(ids, args.max_new_tokens, sampling, stops):
            text = stream.step(tok.tokenizer, token)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
    stats = runner.last_stats
    stats.memory = mem.peak
    print(f"\n[load {load_s:.2f} s | {stats.summary()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
