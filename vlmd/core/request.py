"""The scheduler's view of one request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vlmd.messages import EmbedRun, ImageRef, SamplingParams


class Status(enum.Enum):
    WAITING_IMAGES = "waiting_images"  # embeddings not yet in the EmbedStore
    WAITING = "waiting"  # ready to be admitted when KV pages allow
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Token bookkeeping: `num_computed` tokens are in the KV cache, `all_ids` are known.

    There are no prefill and decode phases, only computed tokens catching up with known ones.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[ImageRef] = field(default_factory=list)
    stop_token_seqs: list[list[int]] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    page_table: list[int] = field(default_factory=list)
    embed_runs: list[EmbedRun] = field(default_factory=list)  # aligned with images once ready
    status: Status = Status.WAITING
    sent_to_workers: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_new_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

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
