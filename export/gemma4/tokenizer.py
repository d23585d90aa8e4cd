"""A stand-in tokenizer for models without one (presets, random-weight checkpoints).

Byte-level BPE with Gemma's special ids (pad 0, eos 1, bos 2) and filler tokens up to the
vocabulary size, so any text encodes and every id the model can emit decodes. It lets a
preset export run end to end through `python -m runtime`; the text it makes is noise.
"""

from __future__ import annotations

from pathlib import Path


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
MIN_STANDIN_VOCAB = len(SPECIALS) + 256  # specials + one token per byte


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with Gemma's special ids (pad 0, eos 1, bos 2), padded to
    `vocab_size` with filler tokens so every id the model can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer ({len(vocab)})")
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"<filler_{i}>"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
