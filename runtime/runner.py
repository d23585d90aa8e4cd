"""Run an exported Gemma 4 artifact: load both methods (each a chain of compiled steps,
runtime/chain.py), bind one copy of the weights and one KV cache to both, then prefill in
chunks, decode and sample.

    runner = Runner.load("out/tiny")
    for token in runner.generate(prompt_ids, max_new_tokens=32, sampling=SamplingConfig()):
        ...
    print(runner.last_stats.summary())
    # a conversation's next turn: the cache keeps the prefix it shares with what it holds
    for token in runner.generate(prompt_ids + reply_ids + next_turn_ids, 32, reuse=True):
        ...

Memory model (the point of this file):
- weights: read from the .ptd's memory map tensor by tensor. On CPU the mapped tensors are
  bound as they are (zero copy; pages come from the page cache). On CUDA each tensor is
  copied to the GPU and its host pages dropped, so the host never holds the whole file.
  One tensor serves both methods and every step that names it
  (`update_constant_buffer(..., user_managed=True)`).
- KV cache: allocated here from the metadata (sliding layers at their ring size, full layers
  at ctx) and bound to both methods, so prefill's writes are what decode reads.
- inputs: static, whole (16-byte-aligned) buffers filled in place: the .so copies any input
  that is a view at an offset, with a warning, on every call.

Decode on CUDA is replayed through a CUDA graph (runtime/graphs.py) unless `cuda_graph=False`:
the decode chain is captured once at load, after the weights and KV are bound, and then
runs only through the graph. The next token goes from the sampler's output into the static
token buffer on the device; the host reads one token id per step (for the caller and the
stop check). `generate` queues each step before it reads the token the step is fed with (the
token's copy to the host goes first in the stream), so the GPU runs step i + 1 while the host
reads token i, hands it to the caller and checks it; a step queued past a stop is taken back
(its position is rewritten before anything reads it).

The runner knows which token ids its cache holds (`history`), so `generate(..., reuse=True)`
prefills only what a new prompt adds to them (a chat's next turn), as long as the positions it
takes back are ones the sliding layers' rings still hold (`rewind_limit`); else it starts over.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from runtime.aoti import CompiledMethod, load_method
from runtime.artifact import METHODS, Artifact, ArtifactError, Metadata, MethodStep
from runtime.chain import MethodChain
from runtime.graphs import DecodeGraph
from runtime.memory import MemoryPeak
from runtime.sampling import SamplingConfig, make_generator, sample


class ContextOverflowError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the exported context."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # prefilled by this call
    reused_tokens: int = 0  # the prompt's first tokens, already in the cache (`generate(..., reuse=True)`)
    new_tokens: int = 0
    prefill_s: float = 0.0  # prefill calls only
    ttft_s: float = 0.0  # start of prefill -> first token id on the host
    decode_s: float = 0.0  # first token id on the host -> the last one (new_tokens - 1 steps, the caller's time in)
    memory: MemoryPeak | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        mem = self.memory.describe() if self.memory else "GPU peak n/a"
        reused = f" ({self.reused_tokens} more reused)" if self.reused_tokens else ""
        return (
            f"TTFT {self.ttft_s * 1e3:.1f} ms | prefill {self.prompt_tokens} tok{reused} at "
            f"{self.prefill_tok_s:.1f} tok/s | decode {self.new_tokens} tok at "
            f"{self.decode_tok_s:.1f} tok/s | {mem}"
        )


@dataclass
class _Bindings:
    """Tensors the methods point at; kept alive here because the container does not own them."""

    weights: dict[tuple, torch.Tensor] = field(default_factory=dict)  # (ptd offset, dtype, shape)
    kv: dict[str, torch.Tensor] = field(default_factory=dict)  # fqn -> buffer


class Runner:
    """Python API over one exported artifact (see the module docstring)."""

    def __init__(self, artifact: Artifact, device: str | None = None, cuda_graph: bool = True):
        self.artifact = artifact
        self.meta: Metadata = artifact.metadata
        self.device = resolve_device(self.meta.device, device)
        check_cuda_arch(self.meta.raw, self.device)
        graphed = cuda_graph and self.device.startswith("cuda")
        self.programs: dict[str, CompiledMethod] = {
            p: load_method(p, artifact.so_blob(p), self.device, instances=n)
            for p, n in self._instances(graphed).items()}
        self._bound = _Bindings()
        self._allocate_kv()
        self.methods: dict[str, MethodChain] = {
            m: MethodChain(m, [(self.programs[s.program], self._constants_for(s), s.inputs)
                               for s in self.meta.method_steps[m]])
            for m in METHODS}
        self._inputs: dict[int, torch.Tensor] = {}  # T -> static token buffer [1, T]
        self._pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.history: list[int | None] = []  # the token id at each position < pos (None: not known)
        self._sequence = 0  # counts new sequences (reset, or a generate that rewinds)
        self.last_stats = GenerationStats()
        self.graph: DecodeGraph | None = None  # set: the decode chain's containers are replay-only
        if graphed:
            self.graph = DecodeGraph(self.methods["decode"], self._token_buffer(1), self._pos)
            self.reset()  # the warm-up runs wrote KV at position 0

    def _instances(self, graphed: bool) -> dict[str, int]:
        """Model instances per program. A container runs an instance again only after waiting
        for that instance's last run, which a CUDA graph capture cannot do (runtime/aoti.py):
        the captured decode gets one per step. Elsewhere two let the host queue a step while
        the GPU runs the previous one of that program; each instance loads its own kernels
        on its first run, so not one per step."""
        out = {}
        for method, steps in self.meta.method_steps.items():
            uses = Counter(s.program for s in steps)
            for p, n in uses.items():
                if self.device == "cpu":
                    out[p] = 1
                elif graphed and method == "decode":
                    out[p] = n
                else:
                    out[p] = min(n, 2)
        return out

    @staticmethod
    def load(model_dir: str | Path, device: str | None = None, cuda_graph: bool = True) -> "Runner":
        return Runner(Artifact.open(model_dir), device, cuda_graph)

    # ---- properties ------------------------------------------------------------------------
    @property
    def ctx(self) -> int:
        return self.meta.ctx

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._bound.kv.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._bound.weights.values())

    @property
    def pos(self) -> int:
        """The next position to write: one past the last the cache holds (`history`'s length)."""
        return len(self.history)

    @pos.setter
    def pos(self, value: int) -> None:
        """Move the position by hand (a benchmark timing decode at a fill over a zeroed cache): the ids of
        positions skipped over are not known."""
        del self.history[value:]
        self.history.extend([None] * (value - len(self.history)))

    @property
    def rewind_limit(self) -> int:
        """How many of the newest positions a new sequence may take back and write again. A sliding
        layer's ring of S slots holds the S newest positions; resuming at c reads the window W
        before it, still held after k positions are taken back while k <= S - W + 1 (the slots of
        the positions taken back then read as older than the window: masked). Without a ring
        smaller than the context, any."""
        window = self.meta.raw.get("sliding_window") or 0
        rings = [b.shape[2] for b in self.meta.kv if b.kind == "sliding" and len(b.shape) == 4]
        short = [s for s in rings if s < self.ctx]
        return min(s - window + 1 for s in short) if short and window else self.ctx

    # ---- loading ---------------------------------------------------------------------------
    def _allocate_kv(self) -> None:
        for buf in self.meta.kv:
            self._bound.kv[buf.fqn] = torch.zeros(buf.shape, dtype=buf.dtype, device=self.device)

    def _constants_for(self, step: MethodStep) -> dict[str, torch.Tensor]:
        """name -> tensor for every constant of the step's program: KV from our allocation,
        the rest from the .ptd, each checked against the dtype the .so was compiled for."""
        program = self.programs[step.program]
        fqns = program.constant_fqns()
        dtypes = program.constant_dtypes()
        out = {}
        for name in sorted(set(fqns) | set(dtypes)):
            key = self._resolve(step.program, name, step.constants.get(name), fqns.get(name, ""))
            tensor = self._bound.kv[key] if key in self._bound.kv else self._weight(key)
            want = dtypes.get(name)
            if want is not None and tensor.dtype != want:
                raise ArtifactError(
                    f"{step.program}: constant {name!r} ({key}) is {tensor.dtype} in the artifact but the "
                    f".so was compiled for {want}; the .pte and .ptd disagree, re-export"
                )
            out[name] = tensor
        return out

    def _resolve(self, program: str, name: str, from_meta: str | None, fqn: str) -> str:
        """The .ptd key (or KV fqn) of one AOTI constant: the step's table, else (an artifact
        whose metadata lists none) the FQN the .so recorded, then the `program::name` key used
        for compile-made constants. A program several steps run binds by the table only: its
        recorded FQNs are those of the one layer it was compiled from."""
        ptd = self.artifact.ptd
        for key in (from_meta,) if from_meta else (fqn, f"{program}::{name}"):
            if key and (key in self._bound.kv or key in ptd):
                return key
        raise ArtifactError(
            f"{program}: constant {name!r} (fqn {fqn!r}, metadata {from_meta!r}) is neither a KV buffer "
            f"of the metadata nor a tensor of {ptd.path}; the files do not match, re-export"
        )

    def _weight(self, key: str) -> torch.Tensor:
        """The bound tensor for a .ptd key; tensors sharing bytes in the file share memory."""
        entry = self.artifact.ptd.entries[key]
        ident = (entry.offset, entry.dtype, entry.shape)
        if ident not in self._bound.weights:
            host = self.artifact.ptd.tensor(key)
            if self.device == "cpu":
                self._bound.weights[ident] = host  # mapped, zero copy
            else:
                self._bound.weights[ident] = host.to(self.device)
                self.artifact.ptd.release(key)
        return self._bound.weights[ident]

    # ---- running ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sequence: position 0 and a zeroed cache (stale slots are masked by
        position, but zeros keep a masked 0 * garbage from turning into NaN)."""
        for t in self._bound.kv.values():
            t.zero_()
        self.history = []
        self._sequence += 1  # a generator of an earlier sequence no longer moves the position

    def reusable(self, ids: Sequence[int]) -> int:
        """How many of `ids`' first tokens the cache holds and `generate(ids, reuse=True)` keeps:
        the prefix shared with `history`, less one where that is all of `ids` (the last token is
        fed again for its logits), or 0 where keeping it would take back more than
        `rewind_limit` positions."""
        common = 0
        for held, want in zip(self.history, ids):
            if held is None or held != want:
                break
            common += 1
        keep = min(common, len(ids) - 1)
        return keep if keep > 0 and self.pos - keep <= self.rewind_limit else 0

    def rewind(self, keep: int) -> None:
        """Continue from position `keep` (the cache's first `keep` positions stay): the positions
        after it are written again before anything reads them, or read as masked. At most
        `rewind_limit` positions back."""
        if not (0 <= keep <= self.pos and self.pos - keep <= self.rewind_limit):
            raise ValueError(f"cannot rewind from position {self.pos} to {keep}: at most {self.rewind_limit} "
                             "back (the sliding layers' rings hold no more); reset() and prefill instead")
        del self.history[keep:]
        self._sequence += 1

    def check_fits(self, n_prompt: int, max_new_tokens: int = 0, start: int | None = None) -> None:
        check_fits(self.ctx, n_prompt, max_new_tokens, self.pos if start is None else start)

    def prefill(self, ids: Sequence[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Feed `ids` from the current position in chunks of `prefill_chunk`; returns the
        fp32 logits [vocab] of the last token. `progress(done, total)`: the tokens of `ids` the
        device has run so far, after each chunk (waited for once the next one is queued, so the
        device is never idle for it)."""
        self.check_fits(len(ids))
        chunk = self.meta.prefill_chunk
        logits, queued = None, None  # queued: (a wait for the chunk before, the tokens through it)
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            # a lone token goes through decode: same computation, and prefill's dynamic T
            # may have been exported with a lower bound of 2
            logits = self.decode(piece[0]) if len(piece) == 1 else self._prefill_chunk(piece)
            if progress is not None:
                if queued is not None:
                    queued[0]()
                    progress(queued[1], len(ids))
                queued = (_done_waiter(self.device), start + len(piece))
        if queued is not None:
            queued[0]()
            progress(queued[1], len(ids))
        return logits

    def _prefill_chunk(self, piece: Sequence[int]) -> torch.Tensor:
        tokens = self._token_buffer(len(piece))
        tokens.copy_(torch.tensor(piece, dtype=torch.int64).view(1, -1))
        self._pos.fill_(self.pos)
        (logits,) = self.methods["prefill"].run([tokens, self._pos])
        self.history.extend(int(t) for t in piece)
        return logits.view(-1)

    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token at the current position; returns the fp32 logits [vocab]."""
        logits = self._decode(token)
        return logits.clone() if self.graph else logits  # the graph's output is overwritten

    def _decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """`decode` without the copy: with a graph, the logits live until the next decode."""
        if self.pos >= self.ctx:
            raise ContextOverflowError(f"position {self.pos} is past the exported context of {self.ctx} tokens")
        buf = self._token_buffer(1)
        if isinstance(token, torch.Tensor):
            buf.copy_(token.view(1, 1))
        else:
            buf.fill_(int(token))
        self._pos.fill_(self.pos)
        if self.graph:
            logits = self.graph.replay()
        else:
            (logits,) = self.methods["decode"].run([buf, self._pos])
        self.history.append(None if isinstance(token, torch.Tensor) else int(token))  # `generate` fills it in
        return logits.view(-1)

    def _token_buffer(self, T: int) -> torch.Tensor:
        """A whole [1, T] int64 buffer per chunk length, reused across calls."""
        if T not in self._inputs:
            self._inputs[T] = torch.zeros((1, T), dtype=torch.int64, device=self.device)
        return self._inputs[T]

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        stop_ids: Iterable[int] | None = None,
        reuse: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[int]:
        """Yield up to `max_new_tokens` token ids, stopping after a stop id (eos by
        default; the stop token is yielded). Starts a fresh sequence; with `reuse`, one that
        keeps the cache's positions `prompt_ids` starts with (`reusable`: a conversation's next
        turn prefills only the turn). `progress`: `prefill`'s, for what it prefills. Timings land in
        `self.last_stats` (final once the iterator is exhausted)."""
        self.check_fits(len(prompt_ids), max_new_tokens, start=0)
        stops = set(self.meta.eos_token_ids if stop_ids is None else stop_ids)
        keep = self.reusable(prompt_ids) if reuse else 0
        if keep:
            self.rewind(keep)
        else:
            self.reset()
        gen = make_generator(sampling, self.device)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids) - keep, reused_tokens=keep)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids[keep:], progress)
        _sync(self.device)
        stats.prefill_s = time.perf_counter() - t0
        token = sample(logits, sampling, gen)
        token_id = int(token.item())
        stats.ttft_s = time.perf_counter() - t0
        reader, sequence = TokenReader(self.device), self._sequence
        first = self.pos  # where the new tokens go
        ahead = None  # the next token on the device: its step is queued before this token is read
        try:
            for i in range(max_new_tokens):
                if i:
                    token, ahead = ahead, None
                    reader.copy(token)  # queued before the next step: reading it waits for this step alone
                if i + 1 < max_new_tokens:  # the next step, fed from the device, runs while the host reads this one
                    ahead = sample(self._decode(token), sampling, gen)
                if i:
                    token_id = reader.value()
                    stats.decode_s = time.perf_counter() - t0 - stats.ttft_s
                if self._sequence == sequence and first + i < self.pos:
                    self.history[first + i] = token_id  # fed from the device: its id is known now
                stats.new_tokens += 1
                yield token_id
                if token_id in stops:
                    return
        finally:  # a step queued past the caller's last token is not part of the sequence
            if ahead is not None and self._sequence == sequence:
                self.history.pop()


class TokenReader:
    """A sampled token's id on the host without waiting for the work queued after it: on CUDA a
    non-blocking copy into pinned memory and an event right after it (waiting on the event waits
    for the copy alone); elsewhere the copy is the read."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self.host = torch.empty((), dtype=torch.int64, pin_memory=True)
            self.done = torch.cuda.Event()
        self._token: torch.Tensor | None = None

    def copy(self, token: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(token.view(()), non_blocking=True)  # on the token's device's current stream
            self.done.record(torch.cuda.current_stream(token.device))
        else:
            self._token = token

    def value(self) -> int:
        if self.cuda:
            self.done.synchronize()
            return int(self.host)
        return int(self._token.item())


def check_fits(ctx: int, n_prompt: int, max_new_tokens: int = 0, start: int = 0) -> None:
    """Raise ContextOverflowError unless the prompt and the new tokens fit in ctx."""
    if n_prompt < 1:
        raise ValueError("the prompt is empty: at least one token (BOS) is needed")
    if start + n_prompt + max_new_tokens > ctx:
        raise ContextOverflowError(
            f"{n_prompt} prompt tokens + {max_new_tokens} new tokens (starting at position {start}) "
            f"exceed the exported context of {ctx} tokens; shorten the prompt, lower "
            f"--max-new-tokens, or re-export with a larger --ctx"
        )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _done_waiter(device: str) -> Callable[[], None]:
    """A call that returns once the work queued so far on `device` has run (an event recorded now)."""
    if not device.startswith("cuda"):
        return lambda: None  # CPU methods run as they are called
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return done.synchronize


def check_cuda_arch(meta: dict, device: str) -> None:
    """Kernels built for one GPU architecture (the exporter's default) run on that one only."""
    arch = meta.get("cuda_arch")
    if not device.startswith("cuda") or not arch or meta.get("multi_arch_kernels"):
        return
    major, minor = torch.cuda.get_device_capability(device)
    if f"{major}.{minor}" != arch:
        raise ArtifactError(f"the artifact's kernels were compiled for compute capability {arch}, this GPU is "
                            f"{major}.{minor}; re-export on this GPU, or export with --multi-arch-kernels")


def resolve_device(compiled_for: str, requested: str | None) -> str:
    """The artifact's .so runs only on the device type it was compiled for."""
    if requested is None:
        return "cuda:0" if compiled_for == "cuda" else "cpu"
    if torch.device(requested).type not in ("cpu", "cuda"):
        raise ArtifactError(f"--device {requested}: artifacts run on cpu or cuda (this one was compiled for "
                            f"{compiled_for})")
    if torch.device(requested).type != compiled_for:
        raise ArtifactError(
            f"the artifact was compiled for {compiled_for}, not {requested}; re-export with --device "
            f"{torch.device(requested).type}"
        )
    return "cuda:0" if requested == "cuda" else requested
