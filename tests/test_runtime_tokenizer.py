"""Tokenizer handling: BOS from metadata, chat formats, streaming decode."""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from runtime.tokenizer import TextTokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..4 like Gemma's order
WORDS = ["hello", "world", "user", "model", "the", "cat", "sat", "\n"]


def make_tokenizer_json(directory, vocab_size: int = 0) -> Tokenizer:
    """A WordLevel tokenizer whose special-token ids follow Gemma (pad 0, eos 1, bos 2),
    padded with filler words "w<i>" up to `vocab_size` so any model id decodes."""
    tokens = SPECIALS + WORDS
    tokens += [f"w{i}" for i in range(len(tokens), vocab_size - 1)] + ["<unk>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # words and newlines are tokens, spaces are not (invert: the pattern is what is kept)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^ \n]+|\n"), "removed", invert=True)
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))
    return tok


@pytest.fixture
def tok_dir(tmp_path):
    make_tokenizer_json(tmp_path)
    return tmp_path


def _id(tok: TextTokenizer, text: str) -> int:
    return tok.tokenizer.token_to_id(text)


def test_plain_prompt_gets_exactly_one_bos(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    assert tok.encode("hello world") == [2, _id(tok, "hello"), _id(tok, "world")]
    assert tok.encode("<bos> hello") == [2, _id(tok, "hello")]  # already there: not doubled
    assert TextTokenizer.from_dir(tok_dir, bos_token_id=None).encode("hello") == [_id(tok, "hello")]


def test_builtin_gemma_turn_format(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    assert tok.chat_template is None
    ids = tok.encode("hello", chat=True)
    expect = ["<bos>", "<start_of_turn>", "user", "\n", "hello", "<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert ids == [_id(tok, t) for t in expect]
    assert tok.end_of_turn_ids() == {_id(tok, "<end_of_turn>")}


def test_checkpoint_chat_template_wins(tok_dir):
    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }} {{ m.content }}<end_of_turn>{% endfor %}" \
               "{% if add_generation_prompt %}<start_of_turn>model{% endif %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    ids = tok.encode("the cat", chat=True)
    expect = ["<bos>", "<start_of_turn>", "user", "the", "cat", "<end_of_turn>", "<start_of_turn>", "model"]
    assert ids == [_id(tok, t) for t in expect]  # the template's own BOS is not doubled
    (tok_dir / "chat_template.jinja").write_text("{{ messages[0].content }} sat")
    assert TextTokenizer.from_dir(tok_dir, 2).render_chat("cat") == "cat sat"  # .jinja beats the config


def test_stream_decode_matches_batch_decode(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    ids = tok.encode("the cat sat")[1:]
    stream = tok.stream()
    text = "".join(s for i in ids if (s := stream.step(tok.tokenizer, i)) is not None)
    assert text.strip() == tok.decode(ids) == "the cat sat"


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        TextTokenizer.from_dir(tmp_path, 2)


def test_conversation_holds_each_reply_as_its_ids_and_extends_the_turn_before(tok_dir):
    """Each reply goes in as the ids the model generated (here ids no text encodes to: filler words
    with no spaces between), so the next turn's ids start with the last turn's prompt and reply."""
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    first = tok.encode_conversation([("user", "hello")])
    assert first == tok.encode("hello", chat=True)
    reply = [_id(tok, "the"), _id(tok, "\n"), _id(tok, "<pad>"), _id(tok, "cat")]
    turns = [("user", "hello"), ("assistant", reply), ("user", "world")]
    ids = tok.encode_conversation(turns)
    assert ids[:len(first) + len(reply)] == first + reply
    rest = ["<end_of_turn>", "\n", "<start_of_turn>", "user", "\n", "world", "<end_of_turn>", "\n",
            "<start_of_turn>", "model", "\n"]
    assert ids[len(first) + len(reply):] == [_id(tok, t) for t in rest]


def test_conversation_through_a_checkpoint_template(tok_dir):
    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}" \
               " {{ m.content | trim }}<end_of_turn>{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{% endif %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    reply = [_id(tok, "sat")]
    ids = tok.encode_conversation([("user", "the cat"), ("assistant", reply), ("user", "hello")])
    expect = ["<bos>", "<start_of_turn>", "user", "the", "cat", "<end_of_turn>", "<start_of_turn>", "model", "sat",
              "<end_of_turn>", "<start_of_turn>", "user", "hello", "<end_of_turn>", "<start_of_turn>", "model"]
    assert ids == [_id(tok, t) for t in expect]


def test_conversation_refuses_what_it_cannot_continue(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    for turns in ([("user", "hello"), ("assistant", [5])], [("assistant", [5]), ("user", "hello")],
                  [("user", "hello"), ("system", "be brief"), ("user", "world")], [("system", "be brief")]):
        with pytest.raises(ValueError, match="from the user's to the user's"):
            tok.encode_conversation(turns)
    with pytest.raises(ValueError, match="goes with chat turns"):
        tok.encode("hello", system="be brief")
    (tok_dir / "chat_template.jinja").write_text(  # renders the last message only: the reply is dropped
        "{{ messages[-1].content }}{% if add_generation_prompt %}<start_of_turn>model{% endif %}")
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    with pytest.raises(ValueError, match="does not render each earlier reply once"):
        tok.encode_conversation([("user", "hello"), ("assistant", [5]), ("user", "world")])


def test_system_turn_opens_the_first_user_turn_or_goes_to_the_template(tok_dir):
    """The Gemma turn format has no system turn: its text opens the first user turn (as Gemma's templates
    do); a checkpoint's template gets it as a message of its own."""
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    ids = tok.encode("the cat", chat=True, system="hello world")
    expect = ["<bos>", "<start_of_turn>", "user", "\n", "hello", "world", "\n", "\n", "the", "cat", "<end_of_turn>",
              "\n", "<start_of_turn>", "model", "\n"]
    assert ids == [_id(tok, t) for t in expect]
    later = tok.encode_conversation([("system", "hello world"), ("user", "the cat"), ("assistant", [5]), ("user", "sat")])
    assert later[:len(ids) + 1] == ids + [5]
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    (tok_dir / "chat_template.jinja").write_text(template)
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    assert tok.render_chat("cat", system="sat") == "[system] sat[user] cat"


def test_text_that_looks_like_a_reply_mark_stays_text(tok_dir):
    """Replies are placed by marks no text of the conversation holds: a user's text with private-use
    characters and digits is encoded as text, not taken for a reply."""
    tok = TextTokenizer.from_dir(tok_dir, bos_token_id=2)
    odd = "\ue0000\ue001 \ue000ab:0\ue001"
    sat = _id(tok, "sat")
    ids = tok.encode_conversation([("user", odd), ("assistant", [sat]), ("user", "hello")])
    assert ids.count(sat) == 1 and ids.count(_id(tok, "<unk>")) == 2
    assert tok.encode(odd, chat=True) == ids[:len(tok.encode(odd, chat=True))]
