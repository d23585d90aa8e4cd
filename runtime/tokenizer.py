"""Text <-> token ids for the runner, from the tokenizer files the exporter copies next to
the .pte (tokenizer.json, and tokenizer_config.json / chat_template.jinja when present).

BOS comes from the artifact's metadata, not the tokenizer's post-processor, so the runner
adds exactly one BOS whatever the tokenizer.json says. Chat mode renders the checkpoint's
own chat template when there is one (jinja2, as transformers does) and otherwise the plain
Gemma turn format.

A conversation (`encode_conversation`) is rendered whole each turn, the model's earlier replies
as the token ids it generated, not their text encoded again (which may split differently): the
ids then start with every id of the turns before, and the runner's cache keeps them
(`Runner.generate(..., reuse=True)`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

GEMMA_TURN = {"user": "<start_of_turn>user\n{}<end_of_turn>\n", "assistant": "<start_of_turn>model\n{}<end_of_turn>\n"}
GEMMA_REPLY_PROMPT = "<start_of_turn>model\n"
# a reply's place in the rendered conversation: private-use characters around a tag that no text of the
# conversation holds, and the reply's index
_REPLY_MARK = "\ue000{tag}:{index}\ue001"
# Tokens that end a model turn in Gemma chat formats; added to the stop set when present.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<turn|>")


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_token_id: int | None
    chat_template: str | None  # jinja source, None = built-in Gemma turn format

    @staticmethod
    def from_dir(directory: str | Path, bos_token_id: int | None) -> "TextTokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the runner needs the checkpoint's tokenizer.json next to model.pte "
                "(the exporter copies it; copy it from the HF checkpoint directory)"
            )
        return TextTokenizer(Tokenizer.from_file(str(path)), bos_token_id, _find_chat_template(directory))

    def encode(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of `text` (a user turn when `chat`, after a `system` turn if given), with exactly
        one BOS."""
        if chat:
            return self.encode_conversation(([("system", system)] if system else []) + [("user", text)])
        if system:
            raise ValueError("a system prompt goes with chat turns: encode(..., chat=True)")
        return self._with_bos(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render_chat(self, prompt: str, system: str | None = None) -> str:
        """The text of a one-turn chat (`system`, if given, first), ready for the model's reply."""
        return self._render(([{"role": "system", "content": system}] if system else [])
                            + [{"role": "user", "content": prompt}])

    def encode_conversation(self, turns: list[tuple[str, str | list[int]]]) -> list[int]:
        """Token ids of a conversation ready for the model's next reply: `turns` are (role, content)
        with role "user" (text) or "assistant" (the reply's generated ids, its stop token left out), the
        last one the user's, and optionally a "system" turn first (text). Rendered by the chat template
        (else the Gemma turn format) with each reply in its place as its own ids; one BOS."""
        roles = [r for r, _ in turns]
        body = roles[1:] if roles[:1] == ["system"] else roles
        if not body or body[0] != "user" or body[-1] != "user" or any(r not in ("user", "assistant") for r in body):
            raise ValueError(f"a conversation is user / assistant turns from the user's to the user's (a system "
                             f"turn before them, if any), got {roles}")
        replies = [c for r, c in turns if r == "assistant"]
        texts = [c for r, c in turns if r != "assistant"]
        tag = next(t for t in iter(lambda: secrets.token_hex(4), None) if not any(t in x for x in texts))
        messages, n = [], 0
        for role, content in turns:
            if role == "assistant":
                content, n = _REPLY_MARK.format(tag=tag, index=n), n + 1
            messages.append({"role": role, "content": content})
        marks = re.compile(re.escape(_REPLY_MARK.format(tag=tag, index="@")).replace("@", "(\\d+)"))
        pieces = marks.split(self._render(messages))  # text, reply index, text, ...
        if sorted(int(i) for i in pieces[1::2]) != list(range(n)):
            raise ValueError("the chat template does not render each earlier reply once: cannot continue the "
                             "conversation from its tokens")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            ids += list(replies[int(piece)]) if k % 2 else self.tokenizer.encode(piece, add_special_tokens=False).ids
        return self._with_bos(ids)

    def _render(self, messages: list[dict]) -> str:
        """`messages` as the chat template renders them, ready for the model's reply. The Gemma turn
        format has no system turn: its text opens the first user turn, as Gemma's own templates do."""
        if self.chat_template is not None:
            return _render_jinja(self.chat_template, messages, self._token_text(self.bos_token_id))
        if messages[0]["role"] == "system":
            system, first, *rest = messages
            messages = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        return "".join(GEMMA_TURN[m["role"]].format(m["content"]) for m in messages) + GEMMA_REPLY_PROMPT

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> DecodeStream:
        """An incremental decoder: `.step(self.tokenizer, id)` returns new text or None
        (None while a multi-byte character is still incomplete)."""
        return DecodeStream(skip_special_tokens=True)

    def end_of_turn_ids(self) -> set[int]:
        ids = (self.tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
        return {i for i in ids if i is not None}

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""


def _find_chat_template(directory: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list
    of {name, template} where "default" wins), else None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg_path = directory / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    template = json.loads(cfg_path.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _render_jinja(template: str, messages: list[dict], bos_token: str) -> str:
    """Render a HF chat template for `messages`, ready for the model's reply."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=bos_token,
    )
