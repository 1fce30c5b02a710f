"""The scheduler's view of one request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vlmd.core.prefix_cache import Node, PageKey
from vlmd.messages import PENDING_TOKEN, EmbedRun, ImageRef, SamplingParams


class Status(enum.Enum):
    WAITING_IMAGES = "waiting_images"  # embeddings not yet in the EmbedStore
    WAITING = "waiting"  # ready to be admitted (or, once preempted, re-admitted) when KV pages allow
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Token bookkeeping: `num_computed` tokens are in the KV cache, `num_tokens` are known.

    There are no prefill and decode phases, only computed tokens catching up with known ones.
    With steps in flight, `num_scheduled` tokens will be in the KV cache once they finish, and
    `num_pending` of them will have sampled a token the scheduler has not seen yet: the next
    step may already feed that unseen token back (as `PENDING_TOKEN`). A preempted request
    loses its KV (`num_computed` back to 0) and keeps its tokens: prompt and output so far are
    computed again once it is re-admitted, mostly from the prefix cache.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[ImageRef] = field(default_factory=list)
    stop_token_seqs: list[list[int]] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_scheduled: int = 0  # num_computed + the tokens of steps in flight
    num_pending: int = 0  # steps in flight that sample a token for this request
    page_table: list[int] = field(default_factory=list)
    num_pages_sent: int = 0  # page_table[:num_pages_sent] is what the workers know of it
    # Prefix-cache nodes the request holds for its first len(path) pages (page_table[i] is
    # path[i].page, or a private page of the same content when another request cached it first).
    path: list[Node] = field(default_factory=list)
    embed_runs: list[EmbedRun] = field(default_factory=list)  # aligned with images once ready
    status: Status = Status.WAITING
    sent_to_workers: bool = False  # the workers know its sampling parameters (NewRequest)
    num_cached_tokens: int = -1  # prompt tokens the prefix cache held at first admission (-1: not yet)
    first_step_since_preempted: int = 0  # results of steps planned before it are stale
    in_side: bool = False  # a span of it is in the side step in flight (side_prefill)
    _page_keys: list[PageKey] = field(default_factory=list, repr=False)  # page_key's memo

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_new_tokens

    @property
    def num_known_after_inflight(self) -> int:
        """Tokens known once every step in flight has returned."""
        return self.num_tokens + self.num_pending

    def can_schedule(self) -> bool:
        """Something is left to compute, the request is not sure to end by length first, and
        no more than one of its sampled tokens is unseen (only the step just before can feed one
        back on the device)."""
        return (
            self.num_pending <= 1
            and self.num_scheduled < self.num_known_after_inflight
            and len(self.output_ids) + self.num_pending < self.sampling.max_new_tokens
        )

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of positions [start, end); positions sampled by steps in flight are PENDING_TOKEN.
        Costs O(end - start), whatever the length of the sequence."""
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        known = self.prompt_ids[start:prompt_len] if start < prompt_len else []
        known += self.output_ids[max(start - prompt_len, 0) : end - prompt_len]
        return known + [PENDING_TOKEN] * (end - max(start, self.num_tokens))

    def page_key(self, index: int, page_size: int) -> PageKey:
        """The content of full page `index` (`vlmd.core.prefix_cache.PageKey`): its token ids and
        the images it overlaps, each by its cache key and where in it the page starts. Only for
        pages of known tokens; memoized, so a request looked up again costs no rebuild."""
        keys = self._page_keys
        while len(keys) <= index:
            start = len(keys) * page_size
            end = start + page_size
            assert end <= self.num_tokens, "only a page of known tokens has a key"
            images = tuple(
                (
                    image.md5,
                    max(start, image.token_offset) - image.token_offset,
                    max(start, image.token_offset) - start,
                )
                for image in self.images
                if image.token_offset < end and start < image.token_offset + image.num_tokens
            )
            keys.append((tuple(self.token_ids(start, end)), images))
        return keys[index]

    def finish_reason_after(self, token_id: int) -> tuple[str | None, int]:
        """Called once `token_id` is appended: (finish reason, trailing tokens to hide)."""
        if not self.sampling.ignore_eos and token_id in self.eos_token_ids:
            return "stop", 0
        for seq in self.stop_token_seqs:
            if seq and self.output_ids[-len(seq) :] == seq:
                return "stop", len(seq)
        if len(self.output_ids) >= self.sampling.max_new_tokens:
            return "length", 0
        return None, 0
