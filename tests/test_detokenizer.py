"""Incremental detokenization concatenates to the full decode and never splits a character."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vlmd.detokenizer import REPLACEMENT, IncrementalDetokenizer, Matcher, StopStringText


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


class CharTokenizer:
    """One token per character: token ids are code points."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def run_stop(text: str, stop: list[str]) -> tuple[list[str], StopStringText]:
    return run_tokens(CharTokenizer(), list(map(ord, text)), stop)


def run_tokens(tokenizer, token_ids: list[int], stop: list[str]) -> tuple[list[str], StopStringText]:
    """What each token releases, until a stop string; then what the end releases."""
    out = StopStringText(tokenizer, stop)
    pieces = []
    for token_id in token_ids:
        out.push(token_id)
        pieces.append(out.release())
        if out.stopped:
            break
    if not out.stopped:
        out.finish()
    pieces.append(out.release())
    return pieces, out


def test_stop_string_cuts_the_text_before_it_and_spans_tokens():
    pieces, out = run_stop("hello world, and more", ["wor", "more"])
    assert out.stopped and out.text == "hello " and "".join(pieces) == "hello "
    # The earliest match wins, whichever stop string it is.
    assert run_stop("abcdef", ["def", "bc"])[1].text == "a"


def test_a_possible_stop_prefix_is_held_back_until_resolved():
    pieces, out = run_stop("ab xy ab xz", ["xyz"])
    assert not out.stopped and "".join(pieces) == "ab xy ab xz"
    # "x" and "xy" could begin "xyz": they are released only once the next character rules it out.
    assert pieces[:6] == ["a", "b", " ", "", "", "xy "]


def test_no_stop_strings_release_everything_at_once():
    pieces, out = run_stop("plain", [])
    assert pieces == ["p", "l", "a", "i", "n", ""] and out.text == "plain"


def test_stop_string_in_real_tokens(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "The image shows a busy street at night"
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = StopStringText(tokenizer, ["usy str"])  # starts and ends inside tokens
    shown = ""
    for token in ids:
        out.push(token)
        shown += out.release()
    assert out.stopped and out.text == shown == "The image shows a b"


def reference_stop(pieces: list[str], stop: list[str]) -> tuple[list[str], str]:
    """What StopStringText must do, the slow way: after each piece, cut at the earliest start of a
    stop string in the text, else release all but its longest end that begins one."""
    text, released, shown = "", 0, []
    for piece in pieces:
        text += piece
        starts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if starts:
            text = text[: min(starts)]
            return [*shown, text[released:], ""], text  # nothing more at the end
        held = max(
            (n for s in stop for n in range(1, min(len(s), len(text) + 1)) if s.startswith(text[-n:])),
            default=0,
        )
        end = max(released, len(text) - held)
        shown.append(text[released:end])
        released = end
    shown.append(text[released:])
    return shown, text


class PieceTokenizer:
    """Token i decodes to pieces[i] (no piece is held back by the incremental decoder)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


@given(
    pieces=st.lists(st.text("abc", min_size=1, max_size=4), max_size=12),
    stop=st.lists(st.text("abc", min_size=1, max_size=5), max_size=3),
)
@settings(max_examples=400, deadline=None)
def test_stop_strings_match_the_slow_reference_over_any_split(pieces, stop):
    shown, out = run_tokens(PieceTokenizer(pieces), list(range(len(pieces))), stop)
    assert (shown, out.text) == reference_stop(pieces, stop)


def test_a_matcher_fed_after_a_whole_match_goes_on_matching():
    """Token-id matchers (/generate_stream) are fed every token: a match that overlaps the one
    before is found (feeding past a whole match indexed beyond the stop sequence)."""
    matcher = Matcher("abab")
    assert matcher.first_end("abab") == 3
    assert matcher.first_end("ab") == 1  # "ab" + the last match's "ab"
    assert matcher.first_end("x") == -1 and matcher.matched == 0
