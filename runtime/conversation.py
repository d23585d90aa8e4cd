"""A chat on one runner: the turns so far, each new reply prefilling only its own turn.

    chat = Conversation(runner, tokenizer, system="Answer briefly.")
    for token in chat.reply("What is in this report?\n" + report, max_new_tokens=256):
        ...  # stream it
    for token in chat.reply("And the second table?", 256):  # the report is not read again
        ...

The user's turns are kept as text and the replies as the ids the model generated (stop token left
out), so the conversation's ids (`TextTokenizer.encode_conversation`) start with every id of the turns
before, and `Runner.generate(..., reuse=True)` keeps them in the cache.
"""

from __future__ import annotations

from typing import Callable, Iterator

from runtime.runner import ContextOverflowError, Runner
from runtime.sampling import SamplingConfig
from runtime.tokenizer import TextTokenizer


class Conversation:
    def __init__(self, runner: Runner, tokenizer: TextTokenizer, system: str | None = None):
        self.runner, self.tokenizer, self.system = runner, tokenizer, system
        self.stops = set(runner.meta.eos_token_ids) | tokenizer.end_of_turn_ids()
        self.turns: list[tuple[str, str | list[int]]] = []
        self.reset()

    def reset(self) -> None:
        """Start over (the system prompt stays); the cache's shared prefix is still reused."""
        self.turns = [("system", self.system)] if self.system else []

    def ids(self, text: str) -> list[int]:
        """The conversation's ids with `text` as the next user turn, ready for the reply."""
        return self.tokenizer.encode_conversation(self.turns + [("user", text)])

    def reply(self, text: str, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
              progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
        """Stream the reply to the user's `text` (up to `max_new_tokens`, fewer where the context ends first),
        then keep both turns (a reply the caller leaves early as far as it went). A turn that leaves no room
        for a reply raises ContextOverflowError before any work, and the conversation stays as it was.
        `progress`: `Runner.prefill`'s, for the tokens not in the cache yet."""
        ids = self.ids(text)
        room = self.runner.ctx - len(ids)
        if room < 1:
            raise ContextOverflowError(f"this turn would take the conversation to {len(ids)} tokens, past the "
                                       f"context of {self.runner.ctx} (a shorter turn or a new conversation fits)")
        reply: list[int] = []
        try:
            for token in self.runner.generate(ids, min(max_new_tokens, room), sampling, self.stops, reuse=True,
                                              progress=progress):
                reply.append(token)
                yield token
        finally:  # a reply left early is kept as far as it went: the cache holds it
            if reply:
                self.turns += [("user", text), ("assistant", reply[:-1] if reply[-1] in self.stops else reply)]
