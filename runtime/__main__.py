"""`python -m runtime`: generate text from an exported Gemma 4 artifact.

Streams the reply to stdout as it is generated and ends with one summary line (time to
first token, prefill and decode speed, peak GPU memory). Needs only the export directory
(model.pte, model.ptd, tokenizer.json): no C++ build, no model code. Without a tokenizer.json,
`--prompt-ids` feeds token ids and the reply is printed as ids. `--prompt-file` reads a long
prompt (a document) from a file, or from stdin with `-`.

`--interactive` is a chat: each line on stdin is a user turn (a line ending in a backslash goes on
with the next), each reply streams back followed by
its summary line; the cache keeps the conversation, so a turn prefills only itself (not every
turn before it). `/reset` starts a new conversation, `/exit` or end of input ends.

A prompt of more than PROGRESS_CHUNKS prefill chunks shows a progress bar on stderr while it is read
(a 128k-token prompt takes tens of seconds on the 31B).

Bad input ends in one line naming the flag or file and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from runtime.artifact import Artifact, ArtifactError
from runtime.conversation import Conversation
from runtime.cli_types import non_negative_int, positive_int
from runtime.memory import PeakSampler
from runtime.runner import ContextOverflowError, Runner, check_fits, resolve_device
from runtime.sampling import SamplingConfig
from runtime.tokenizer import TextTokenizer


def _temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give e.g. cuda, cuda:1 or cpu") from None
    return text


def _seed(text: str) -> int:
    """An int torch's generator takes (a larger one failed only after the model loaded, naming no flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in -2**63..2**64-1, got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


PROGRESS_CHUNKS = 4  # prompts of more chunks than this show a prefill progress bar


def prefill_progress(chunk: int):
    """`Runner.prefill`'s `progress`: a tqdm bar on stderr over a prompt of more than PROGRESS_CHUNKS chunks (made
    at its first chunk, closed once the prompt is in, before the reply streams); nothing for a shorter one."""
    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if total <= PROGRESS_CHUNKS * chunk:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return advance


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give comma-separated token ids, e.g. 2,818,5279; got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"give one or more token ids >= 0, got {text!r}")
    return ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Run an exported Gemma 4 model (model.pte + model.ptd + tokenizer.json) and stream "
        "its reply. Greedy by default; --temperature > 0 samples (with --top-k / --top-p, "
        "reproducibly with --seed).",
        epilog="example: python -m runtime --model out/tiny --prompt 'Hello' --max-new-tokens 32 --chat",
    )
    p.add_argument("--model", required=True, help="export directory holding model.pte, model.ptd and tokenizer.json")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, metavar="FILE",
                        help="read the prompt text from FILE (- for stdin), e.g. a long document")
    prompt.add_argument("--prompt-ids", type=_token_ids,
                        help="the prompt as comma-separated token ids (BOS included); works without a tokenizer.json")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens to generate at most (default 128; fewer where the context ends first)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in a user turn (the checkpoint's chat template, else Gemma's turn format)")
    p.add_argument("--system", metavar="TEXT",
                   help="a system prompt before the first user turn (with --chat or --interactive)")
    p.add_argument("--interactive", action="store_true",
                   help="chat: each line on stdin is a user turn (--prompt / --prompt-file, if given, the first; "
                   "end a line with \\ to go on with the next), the cache keeps the conversation; /reset starts a "
                   "new one, /exit or end of input ends; --max-new-tokens applies to each reply")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=_seed, default=None, help="seed for sampling (same seed, same text)")
    p.add_argument("--device", type=_device, default=None,
                   help="device to run on, e.g. cuda:1 (default: the one the artifact was compiled for)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode through the compiled method's own calls instead of a replayed CUDA graph")
    p.add_argument("--debug", action="store_true", help="show the Python traceback when something fails")
    args = p.parse_args(argv)
    if args.chat and args.prompt_ids is not None:
        p.error("--chat wraps prompt text; with --prompt-ids give the turn tokens yourself")
    if args.interactive and args.prompt_ids is not None:
        p.error("--interactive chats in text: give --prompt or --prompt-file (or neither), not --prompt-ids")
    if args.interactive and args.prompt_file == Path("-"):
        p.error("--interactive reads the turns from stdin: give --prompt-file a file, not -")
    if args.system is not None and not (args.chat or args.interactive):
        p.error("--system goes with chat turns: add --chat (or --interactive)")
    if not args.interactive and args.prompt is None and args.prompt_file is None and args.prompt_ids is None:
        p.error("give the prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids IDS (or chat with --interactive)")
    return args


def _utf8(text: str, source: str) -> str:
    """`text` (from argv or stdin, where Python keeps undecodable bytes as lone surrogates) if it is
    UTF-8 text, else a ValueError naming `source`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{source}: not UTF-8 text (an undecodable byte at character {e.start})") from None
    return text


def _stdin_keeps_bad_bytes() -> None:
    """Undecodable bytes on stdin become lone surrogates (`_utf8` names them) instead of an exception
    mid-read, whatever the locale's error handler."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def _read_prompt_file(path: Path) -> str:
    """--prompt-file's text: the file's, or stdin's for -."""
    if path == Path("-"):
        _stdin_keeps_bad_bytes()
        return _utf8(sys.stdin.read(), "--prompt-file - (stdin)")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--prompt-file {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--prompt-file {path}: is a directory; give a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        return _run(args, sampling)
    except (ArtifactError, ContextOverflowError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"python -m runtime: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npython -m runtime: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback on request
        if args.debug:
            raise
        print(f"python -m runtime: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, sampling: SamplingConfig) -> int:
    t0 = time.perf_counter()
    artifact = Artifact.open(args.model)
    meta = artifact.metadata
    tok = None  # fail before loading weights
    if args.prompt_ids is None or (Path(args.model) / "tokenizer.json").is_file():
        tok = TextTokenizer.from_dir(args.model, meta.bos_token_id)
    text = _read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt
    text = _utf8(text, "--prompt") if args.prompt is not None else text
    if args.system is not None:
        _utf8(args.system, "--system")
    if args.interactive:
        return _chat(args, sampling, artifact, tok, text, t0)
    ids = args.prompt_ids if args.prompt_ids is not None else tok.encode(text, chat=args.chat, system=args.system)
    if max(ids, default=0) >= meta.vocab_size:
        raise ValueError(f"--prompt-ids: token id {max(ids)} is outside the model's vocabulary of {meta.vocab_size}")
    stops = set(meta.eos_token_ids) | (tok.end_of_turn_ids() if args.chat else set())
    max_new = args.max_new_tokens
    if 0 < meta.ctx - len(ids) < max_new:  # the prompt fits: generate until the context is full
        max_new = meta.ctx - len(ids)
        print(f"note: the artifact's context holds {meta.ctx} tokens: after the {len(ids)}-token prompt, at most "
              f"{max_new} new tokens (not {args.max_new_tokens}); re-export with a larger --ctx for more",
              file=sys.stderr)
    check_fits(meta.ctx, len(ids), max_new)
    with PeakSampler(resolve_device(meta.device, args.device)) as mem:
        runner = Runner(artifact, args.device, cuda_graph=not args.no_cuda_graph)
        load_s = time.perf_counter() - t0
        stream = tok.stream() if tok is not None else None
        for token in runner.generate(ids, max_new, sampling, stops, progress=prefill_progress(meta.prefill_chunk)):
            text = stream.step(tok.tokenizer, token) if tok is not None else f"{token} "
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
    stats = runner.last_stats
    stats.memory = mem.peak
    print(f"\n[load {load_s:.2f} s | {stats.summary()}]")
    return 0


def _turns(first: str | None):
    """The user's turns: `first`, then stdin's lines, a line ending in a backslash going on with the next
    (a prompt on stderr where stdin is a terminal)."""
    if first is not None:
        yield first
    _stdin_keeps_bad_bytes()
    lines: list[str] = []
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("... " if lines else "> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            if lines:
                yield "\n".join(lines)
            return
        line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        yield "\n".join(lines + [line])
        lines = []


def _chat(args: argparse.Namespace, sampling: SamplingConfig, artifact: Artifact, tok: TextTokenizer,
          first: str | None, t0: float) -> int:
    """--interactive: a `Conversation` on stdin's turns; each reply's summary on a line of its own. A turn
    that would not fit the context, or is not UTF-8 text, is refused with a note and the chat goes on."""
    meta = artifact.metadata
    with PeakSampler(resolve_device(meta.device, args.device)) as mem:
        runner = Runner(artifact, args.device, cuda_graph=not args.no_cuda_graph)
        print(f"[load {time.perf_counter() - t0:.2f} s | context {meta.ctx} tokens | /reset: a new conversation, "
              "/exit or end of input: quit]", file=sys.stderr)
        chat = Conversation(runner, tok, system=args.system)
        for text in _turns(first):
            command = text.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                chat.reset()
                print("[a new conversation]", file=sys.stderr)
                continue
            if not command:
                continue
            try:
                _utf8(text, "this turn")
                stream = tok.stream()
                for token in chat.reply(text, args.max_new_tokens, sampling, prefill_progress(meta.prefill_chunk)):
                    piece = stream.step(tok.tokenizer, token)
                    if piece:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except ValueError as e:  # not UTF-8, past the context (ContextOverflowError), a template's refusal
                print(f"[{e}: skipped; /reset starts a new conversation]", file=sys.stderr)
                continue
            stats = runner.last_stats
            stats.memory = mem.snapshot()
            print(f"\n[{stats.summary()} | conversation {runner.pos} of {meta.ctx} tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
