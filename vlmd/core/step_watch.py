"""When a step the workers run is overdue (--step_timeout): pure bookkeeping, no clock of its own.

A worker runs one step at a time, in order, so the step that matters is the oldest in flight, and
its time counts from when the workers could start it: when it was sent, or when the step before
it came back, whichever is later. Nothing is timed before the first step: loading weights,
sizing the KV cache and capturing CUDA graphs happen before a worker says it is ready.

The first step of each kind (one with a prefill chunk, one of decodes only) may compile kernels
on first use (FlashInfer's JIT takes minutes on a cold cache, Triton's seconds), so until a step
of its kind has come back, a step is allowed at least FIRST_OF_KIND_TIMEOUT_S.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vlmd.messages import StepPlan

FIRST_OF_KIND_TIMEOUT_S = 900.0  # as the test suite's GPU start-up bound: a cold FlashInfer JIT


@dataclass(frozen=True)
class Overdue:
    step_id: int
    running_s: float  # since the workers could start it
    allowed_s: float


def step_kind(plan: StepPlan) -> str:
    """Steps of one kind run the same kernels: those with a prefill chunk, and decode-only ones."""
    return "prefill" if any(len(item.token_ids) > 1 for item in plan.items) else "decode"


class StepWatch:
    """The steps in flight, and how long the oldest may still take (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        assert timeout_s > 0
        self.timeout_s = timeout_s
        self._in_flight: deque[tuple[int, str, float]] = deque()  # (step id, kind, sent at)
        self._last_returned_at = float("-inf")
        self._kinds_done: set[str] = set()

    def sent(self, plan: StepPlan, now: float) -> None:
        self._in_flight.append((plan.step_id, step_kind(plan), now))

    def returned(self, step_id: int, now: float) -> None:
        oldest, kind, _ = self._in_flight.popleft()
        assert oldest == step_id, f"step {step_id} came back before step {oldest}"
        self._kinds_done.add(kind)
        self._last_returned_at = now

    def deadline(self) -> float | None:
        """When the oldest step in flight becomes overdue; None when none is in flight."""
        if not self._in_flight:
            return None
        _, kind, sent_at = self._in_flight[0]
        return max(sent_at, self._last_returned_at) + self._allowed(kind)

    def overdue(self, now: float) -> Overdue | None:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        step_id, kind, sent_at = self._in_flight[0]
        return Overdue(step_id, now - max(sent_at, self._last_returned_at), self._allowed(kind))

    def _allowed(self, kind: str) -> float:
        if kind in self._kinds_done:
            return self.timeout_s
        return max(self.timeout_s, FIRST_OF_KIND_TIMEOUT_S)
