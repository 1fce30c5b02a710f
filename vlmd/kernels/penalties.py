"""The token history that repetition, presence and frequency penalties read, for a whole batch.

Every penalized request owns one row of a [rows, vocab] int32 table on the device: 2 x (times
the token was generated) + (1 if it is in the prompt). A step gathers its penalized rows' history
with one index, applies the three penalties as [rows, vocab] tensor ops, and records the tokens
it drew with one scatter, so the work per step is a few kernels whatever the batch. Rows are
reused; the table doubles when full (a copy, once per doubling).
"""

from __future__ import annotations

import torch

from vlmd.kernels.transfer import to_device
from vlmd.messages import SamplingParams

IN_PROMPT, GENERATED = 1, 2  # the two parts of a history entry


def penalized(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


class PenaltyTable:
    """The history rows of penalized requests; a row's prompt is written when the request first
    samples (the vocabulary is known from then on)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.history: torch.Tensor | None = None  # [capacity, vocab] int32, from the first use
        self._free: list[int] = []
        self._unwritten: dict[int, list[int]] = {}  # row -> prompt ids, until the row is written
        self._num_rows = 0  # rows ever handed out

    def add(self, prompt_ids: list[int], repetition: bool) -> int:
        """A row for a new request; the prompt counts only for the repetition penalty."""
        row = self._free.pop() if self._free else self._grow_row()
        self._unwritten[row] = list(prompt_ids) if repetition else []
        return row

    def remove(self, row: int) -> None:
        self._unwritten.pop(row, None)
        self._free.append(row)

    def _grow_row(self) -> int:
        self._num_rows += 1
        return self._num_rows - 1

    def _ensure(self, vocab_size: int) -> torch.Tensor:
        capacity = 0 if self.history is None else self.history.shape[0]
        if capacity < self._num_rows:
            grown = torch.zeros(
                max(8, 2 * capacity, self._num_rows), vocab_size, dtype=torch.int32, device=self.device
            )
            if self.history is not None:
                grown[:capacity] = self.history
            self.history = grown
            # Filled on the device: a tensor made from a host number would be a copy that waits.
            self._in_prompt = torch.full((), IN_PROMPT, dtype=torch.int32, device=self.device)
            self._generated = torch.full((), GENERATED, dtype=torch.int32, device=self.device)
        if self._unwritten:  # new rows: cleared, then their prompts marked, one op each
            rows = list(self._unwritten)
            self.history.index_fill_(0, to_device(rows, torch.long, self.device), 0)
            marked = [(row, token) for row in rows for token in self._unwritten[row]]
            if marked:
                index = to_device(marked, torch.long, self.device)  # [n, 2]: row, token
                self.history.index_put_((index[:, 0], index[:, 1]), self._in_prompt)
            self._unwritten.clear()
        return self.history

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab] of penalized requests whose history rows are `rows` [n] (device),
        with their penalties `values` [n, 3] (repetition, presence, frequency) applied."""
        history = self._ensure(logits.shape[-1])[rows]  # [n, vocab]
        counts = history >> 1
        return penalize(
            logits,
            history > 0,
            counts,
            repetition=values[:, 0:1],
            presence=values[:, 1:2],
            frequency=values[:, 2:3],
        )

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just drawn (one per row) as generated."""
        self.history.index_put_((rows, tokens), self._generated, accumulate=True)

    def check_integrity(self, held_rows: list[int]) -> None:
        """`held_rows`: the rows of the requests still running, each held once and not free."""
        free = set(self._free)
        assert len(free) == len(self._free) and all(0 <= r < self._num_rows for r in free)
        assert len(set(held_rows)) == len(held_rows) and not free & set(held_rows)


def penalize(
    logits: torch.Tensor,
    seen: torch.Tensor,
    output_counts: torch.Tensor,
    *,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """logits [n, vocab]; seen [n, vocab] bool; output_counts [n, vocab]; penalties [n, 1].

    The CTRL repetition penalty on tokens of the prompt or the output, as transformers applies it
    (positive logits divided, negative multiplied), then OpenAI's penalties on the output's token
    counts: logit - frequency * count - presence * (count > 0)."""
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0)
