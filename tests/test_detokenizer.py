"""Incremental detokenization concatenates to the full decode and never splits a character."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from vlmd.detokenizer import REPLACEMENT, IncrementalDetokenizer


def test_pieces_concatenate_to_the_full_decode(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    texts = ["这是什么？一辆车在桥上。", "héllo wörld — ok", "plain ascii text"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sequences.append([rng.randrange(tokenizer.vocab_size) for _ in range(200)])  # byte soup
    for ids in sequences:
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_split(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode("这是什么？", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert all(REPLACEMENT not in piece for piece in pieces)
    assert "".join(pieces) == "这是什么？"
