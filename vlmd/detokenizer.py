"""Incremental detokenization: the text each new token adds, never splitting a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix
gives U+FFFD. The text of a token is therefore held back until the characters it starts are
complete, and the pieces always concatenate to the decode of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] give the context for decoding the next pieces
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now complete (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text held back at the end of the sequence (an unfinished character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopStringText:
    """The text of one generation, decoded incrementally and cut before the first stop string.

    A stop string may span tokens. Text is released only once no stop string can begin in it, so
    a stream never shows text that a later token turns into (the start of) a stop string. Each new
    character advances one matcher per stop string (`Matcher`): the work per token is that of its
    characters, however long the text and the stop strings are.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        assert all(stop), "stop strings are non-empty"
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matchers = [Matcher(s) for s in stop]
        self.text = ""  # everything decoded so far, up to the stop string once one matched
        self.stopped = False  # a stop string matched: the text is final
        self._finished = False
        self._released = 0  # text[:_released] has been handed out

    def push(self, token_id: int) -> None:
        self._append(self.detokenizer.push(token_id))

    def finish(self) -> None:
        """Generation ended without a stop string: the held-back text is final."""
        self._append(self.detokenizer.flush())
        self._finished = True

    def release(self) -> str:
        """The text that became safe to show since the last call."""
        end = len(self.text)
        if not (self.stopped or self._finished):
            end -= max((m.matched for m in self.matchers), default=0)  # what may begin a stop string
        piece = self.text[self._released : end]
        self._released = max(self._released, end)
        return piece

    def _append(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        # Where each stop string first ends in the piece: the earliest start among them wins.
        ends = [(m.first_end(piece), len(m.stop)) for m in self.matchers]
        found = [len(self.text) + end + 1 - length for end, length in ends if end >= 0]
        self.text += piece
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True


class Matcher:
    """Knuth-Morris-Pratt over a text (or token ids) as it grows: `matched` is the length of the
    longest end of what was fed so far that begins the stop string (or token sequence)."""

    def __init__(self, stop: Sequence) -> None:
        self.stop = stop
        self.matched = 0
        # fallback[i]: the longest proper prefix of stop[:i + 1] that is also its end
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k

    def first_end(self, piece: Sequence) -> int:
        """Feed `piece`; the index in it where the stop string first ends, or -1. After a whole
        match, feeding goes on from the longest end of it that begins the stop string again."""
        stop, fallback, k = self.stop, self.fallback, self.matched
        if k == len(stop):
            k = fallback[k - 1]
        for i, char in enumerate(piece):
            while k and char != stop[k]:
                k = fallback[k - 1]
            if char == stop[k]:
                k += 1
                if k == len(stop):
                    self.matched = k
                    return i
        self.matched = k
        return -1
