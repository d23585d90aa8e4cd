"""A conversation on the real exported tiny artifact (CPU): the runner keeps the cache's positions a new
prompt shares with what it holds (`generate(..., reuse=True)`, `rewind`), with the logits of a fresh
prefill, and no further back than its sliding rings hold; `python -m runtime --interactive` and
`--prompt-file`.

Uses the session-scoped `tiny_artifact` fixture (tests/conftest.py): ctx 64, sliding window 8 (rings of
8 slots), prefill chunk 12.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

from runtime.__main__ import main as cli_main
from tests.test_runtime_runner import REL_TOL, _prompt, _rel_err, art, runner  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_rewind_limit_is_what_the_rings_hold(runner):
    """Rings of exactly the window (8 slots, window 8): one position may be taken back, no more."""
    assert runner.meta.raw["ring_size"] == runner.meta.raw["sliding_window"] == 8
    assert runner.rewind_limit == 1
    runner.reset()
    runner.prefill(_prompt(20, runner.meta.vocab_size, 1))
    with pytest.raises(ValueError, match="at most 1 back"):
        runner.rewind(18)
    runner.rewind(19)
    assert runner.pos == 19 and len(runner.history) == 19
    held = list(runner.history)
    runner.pos = 23  # moved by hand (bench_runtime over a zeroed cache): the ids skipped over are unknown
    assert runner.history == held + [None] * 4 and runner.reusable(held + [7] * 5) == 0  # 23 - 19 > 1 back
    runner.pos = 10
    assert runner.history == held[:10] and runner.reusable(held + [7]) == 10  # the 10 it holds, none past them


@torch.no_grad()
def test_rewound_prefill_is_a_fresh_one_and_the_eager_models(runner, art):
    """The cache holds A + [x] past the rings' wrap; rewound to A, a prefill of B (two chunks and a lone
    token) gives the logits of a fresh prefill of A + B, and of the eager model."""
    vocab, model = runner.meta.vocab_size, art[1]
    a, b = _prompt(21, vocab, 2), _prompt(25, vocab, 3)
    runner.reset()
    runner.prefill(a + [5])
    assert runner.history == a + [5]
    runner.rewind(len(a))
    got = runner.prefill(b)
    assert runner.pos == len(a + b) and runner.history == a + b
    runner.reset()
    fresh = runner.prefill(a + b)
    model.reset_cache()
    for s in range(0, len(a + b), 12):
        piece = (a + b)[s:s + 12]
        want = model(torch.tensor([piece]), torch.tensor([s]))
    assert _rel_err(got, fresh) <= REL_TOL and _rel_err(got, want) <= REL_TOL


def test_generate_reuses_the_turns_before_and_gives_a_fresh_runs_tokens(runner):
    """A reply of 6 tokens (its last never fed back), then the conversation's next prompt: the turns
    before are kept (`reused_tokens`), only the new ones prefilled, the greedy tokens those of a fresh
    sequence. A prompt that departs from the cache further back than the rings hold starts over."""
    vocab = runner.meta.vocab_size
    a = _prompt(20, vocab, 4)
    reply = list(runner.generate(a, 6, stop_ids=(), reuse=True))
    assert runner.history == a + reply[:-1]
    turn = a + reply + _prompt(9, vocab, 5)
    assert runner.reusable(turn) == len(a) + 5
    again = list(runner.generate(turn, 8, stop_ids=(), reuse=True))
    stats = runner.last_stats
    assert (stats.reused_tokens, stats.prompt_tokens) == (len(a) + 5, 10) and "(25 more reused)" in stats.summary()
    assert again == list(runner.generate(turn, 8, stop_ids=()))
    assert runner.last_stats.reused_tokens == 0
    other = turn[:-3] + [7, 8, 9]  # departs 3 + 7 positions back: more than one
    assert runner.reusable(other) == 0
    list(runner.generate(other, 2, stop_ids=(), reuse=True))
    assert runner.last_stats.reused_tokens == 0 and runner.last_stats.prompt_tokens == len(other)


def test_a_stop_token_is_taken_back_and_the_next_turn_rewrites_its_slot(runner):
    """A reply ending at a stop: the stop's step was fed (queued) and taken back, so the cache holds
    the prompt and the reply before it; a next prompt with the stop in its place reuses all of that."""
    vocab = runner.meta.vocab_size
    a = _prompt(15, vocab, 6)
    greedy = list(runner.generate(a, 5, stop_ids=()))
    stop = greedy[2]
    cut = list(runner.generate(a, 5, stop_ids={stop}, reuse=True))
    assert cut[-1] == stop and runner.history == a + cut[:-1]
    turn = a + cut + _prompt(4, vocab, 7)
    reused = list(runner.generate(turn, 4, stop_ids=(), reuse=True))
    assert runner.last_stats.reused_tokens == len(a + cut) - 1
    assert reused == list(runner.generate(turn, 4, stop_ids=()))


def test_conversation_keeps_its_turns_and_refuses_one_past_the_context(runner, art, tmp_path):
    """`Conversation`: the second reply prefills its own turn only; its turns hold the replies without their
    stop token; a turn past the context raises before any work and leaves the conversation as it was."""
    from runtime import Conversation, TextTokenizer
    from runtime.runner import ContextOverflowError

    d = _artifact_with_tokenizer(art[0], tmp_path / "a")
    chat = Conversation(runner, TextTokenizer.from_dir(d, runner.meta.bos_token_id), system="the cat")
    first = list(chat.reply("hello the cat", 5))
    reply = chat.turns[-1][1]
    assert chat.turns[:2] == [("system", "the cat"), ("user", "hello the cat")]
    assert reply == (first[:-1] if first[-1] in chat.stops else first)
    list(chat.reply("the cat sat", 5))
    assert runner.last_stats.reused_tokens > len(reply) and len(chat.turns) == 5
    for token in chat.reply("hello", 5):
        break  # left after the first token: the turn is kept as far as it went, and the next reuses it
    assert chat.turns[-1] == ("assistant", [] if token in chat.stops else [token])
    ids = chat.ids("world")
    list(chat.reply("world", 2))
    stats = runner.last_stats
    assert stats.reused_tokens + stats.prompt_tokens == len(ids) and stats.reused_tokens > 40, (stats, len(ids))
    before = list(chat.turns)
    with pytest.raises(ContextOverflowError, match="past the context of 64"):
        next(chat.reply("hello " * 60, 5))
    assert chat.turns == before
    chat.reset()
    assert chat.turns == [("system", "the cat")]


# ---- the command line --------------------------------------------------------------------------


def _artifact_with_tokenizer(src: Path, dst: Path) -> Path:
    from runtime.artifact import Artifact
    from tests.test_runtime_tokenizer import make_tokenizer_json

    dst.mkdir()
    for name in ("model.pte", "model.ptd"):
        shutil.copyfile(src / name, dst / name)
    make_tokenizer_json(dst, Artifact.open(dst).metadata.vocab_size)
    return dst


def test_interactive_chat_streams_each_reply_and_keeps_the_conversation(art, tmp_path, monkeypatch, capsys):
    d = _artifact_with_tokenizer(art[0], tmp_path / "a")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello the cat\n\nthe cat sat\n/reset\nworld\n"))
    rc = cli_main(["--model", str(d), "--interactive", "--max-new-tokens", "4", "--system", "the cat"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summaries = [line for line in captured.out.splitlines() if line.startswith("[TTFT")]
    assert len(summaries) == 3, captured.out  # the empty line is no turn
    assert "reused" not in summaries[0] and "reused" in summaries[1], summaries  # turn 2 prefills itself alone
    assert "conversation" in summaries[1] and "a new conversation" in captured.err
    assert all("host peak RSS" in line and "RSS 0.00 GiB" not in line for line in summaries), summaries  # each turn's
    assert "[load" in captured.err and "Traceback" not in captured.err


def test_interactive_first_turn_from_a_prompt_file_and_a_turn_past_the_context(art, tmp_path, monkeypatch, capsys):
    d = _artifact_with_tokenizer(art[0], tmp_path / "a")
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat sat " * 3)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello " * 80 + "\n/exit\nworld\n"))
    rc = cli_main(["--model", str(d), "--interactive", "--prompt-file", str(doc), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sum(line.startswith("[TTFT") for line in captured.out.splitlines()) == 1  # /exit: "world" never runs
    assert "past the context of 64" in captured.err


def test_prompt_file_runs_like_prompt_and_bad_ones_are_named(art, tmp_path, monkeypatch, capsys):
    d = _artifact_with_tokenizer(art[0], tmp_path / "a")
    doc = tmp_path / "doc.txt"
    doc.write_text("hello the cat")
    assert cli_main(["--model", str(d), "--prompt", "hello the cat", "--max-new-tokens", "4"]) == 0
    by_flag = capsys.readouterr().out.splitlines()[0]
    assert cli_main(["--model", str(d), "--prompt-file", str(doc), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == by_flag
    monkeypatch.setattr("sys.stdin", io.StringIO("hello the cat"))
    assert cli_main(["--model", str(d), "--prompt-file", "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == by_flag
    for bad, message in ((tmp_path / "none.txt", "no such file"), (tmp_path, "is a directory")):
        assert cli_main(["--model", str(d), "--prompt-file", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"--prompt-file {bad}: {message}" in err and "Traceback" not in err, err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    assert cli_main(["--model", str(d), "--prompt-file", str(tmp_path / "bin.txt")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    # argv's undecodable bytes reach Python as lone surrogates (the tokenizer would raise a TypeError)
    for argv, source in ((["--prompt", "\udcff hi"], "--prompt"), (["--chat", "--prompt", "hi", "--system", "\udcff"],
                                                                   "--system")):
        assert cli_main(["--model", str(d), *argv]) == 2
        err = capsys.readouterr().err
        assert f"error: {source}: not UTF-8 text" in err and "internal error" not in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\udcffcd\nhello\n"))
    assert cli_main(["--model", str(d), "--interactive", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "[this turn: not UTF-8 text" in captured.err and "skipped; /reset" in captured.err
    assert sum(line.startswith("[TTFT") for line in captured.out.splitlines()) == 1  # the next line still runs


@pytest.mark.parametrize("argv, message", [
    (["--interactive", "--prompt-ids", "2,3"], "--interactive chats in text"),
    (["--interactive", "--prompt-file", "-"], "reads the turns from stdin"),
    ([], "give the prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids IDS"),
    (["--prompt", "a", "--prompt-file", "b"], "not allowed with argument"),
    (["--prompt", "a", "--system", "be brief"], "--system goes with chat turns"),
])
def test_conflicting_or_missing_prompt_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--model", "out/none", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_prefill_reports_each_chunk_and_the_cli_shows_a_long_prompts_progress(runner, art, tmp_path, capsys):
    """`progress` hears of every chunk once it has run (a lone last token too); the CLI draws a bar for a
    prompt of more than PROGRESS_CHUNKS chunks on stderr, none for a short one, and the reply is the same."""
    from runtime.__main__ import PROGRESS_CHUNKS

    chunk = runner.meta.prefill_chunk
    prompt = _prompt(PROGRESS_CHUNKS * chunk + 1, runner.meta.vocab_size, 8)  # 4 whole chunks and a lone token
    seen = []
    runner.reset()
    runner.prefill(prompt, progress=lambda done, total: seen.append((done, total)))
    n = len(prompt)
    assert seen == [(chunk * (i + 1), n) for i in range(PROGRESS_CHUNKS)] + [(n, n)]
    d = _artifact_with_tokenizer(art[0], tmp_path / "a")
    ids = ",".join(map(str, prompt))
    assert cli_main(["--model", str(d), "--prompt-ids", ids, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "prefill" in captured.err and "tok" in captured.err, captured.err
    assert cli_main(["--model", str(d), "--prompt-ids", ids[:-len(str(prompt[-1])) - 1], "--max-new-tokens", "3"]) == 0
    assert "prefill" not in capsys.readouterr().err


def test_a_turn_goes_on_past_a_line_ending_in_a_backslash(monkeypatch):
    from runtime.__main__ import _turns

    monkeypatch.setattr("sys.stdin", io.StringIO("a\\\nb\\\nc\nd\ne\\\n"))
    assert list(_turns("first")) == ["first", "a\nb\nc", "d", "e"]
