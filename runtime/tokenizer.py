"""Text <-> token ids for the runner, from the tokenizer files the exporter copies next to
the .pte (tokenizer.json, and tokenizer_config.json / chat_template.jinja when present).

BOS comes from the artifact's metadata, not the tokenizer's post-processor, so the runner
adds exactly one BOS whatever the tokenizer.json says. Chat mode renders the checkpoint's
own chat template when there is one (jinja2, as transformers does) and otherwise the plain
Gemma turn format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

GEMMA_TURN_FORMAT = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
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

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text` (wrapped in a user turn when `chat`), with exactly one BOS."""
        if chat:
            text = self.render_chat(text)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def render_chat(self, prompt: str) -> str:
        if self.chat_template is None:
            return GEMMA_TURN_FORMAT.format(prompt=prompt)
        return _render_jinja(self.chat_template, prompt, self._token_text(self.bos_token_id))

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


def _render_jinja(template: str, prompt: str, bos_token: str) -> str:
    """Render a HF chat template for a single user message, ready for the model's reply."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        bos_token=bos_token,
    )
