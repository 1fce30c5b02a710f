"""Token sampling for a whole batch at once: greedy, temperature, top-k, top-p, min-p,
repetition / presence / frequency penalties, seeds, and the top logprobs at each position.

A step samples in a fixed number of batched operations whatever the batch holds: the row
statistics (argmax and log-sum-exp, `vlmd.kernels.row_stats`), the penalties
(`vlmd.kernels.penalties`: one pass over the batch, each penalized row reading its history), one
threshold per row for top-k / top-p / min-p (`vlmd.kernels.thresholds`), and one draw for
every row (`vlmd.kernels.draw`: an exponential race whose noise is keyed by the request's seed
and the token's position, so a seeded request draws the same tokens in any batch). Nothing waits
for the device; the runner reads the results back once per step.

Order of the logits processors, as transformers applies them: penalties, temperature, top-k,
top-p (over the top-k tokens, renormalised), min-p (relative to the most likely token).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from vlmd.kernels.draw import make_draw
from vlmd.kernels.penalties import PenaltyTable, penalized
from vlmd.kernels.row_stats import make_row_stats
from vlmd.kernels.thresholds import make_thresholds
from vlmd.kernels.transfer import to_device
from vlmd.messages import SamplingParams, TopLogprobs

# Rows whose top-k keeps at most this many tokens find their top-p threshold among the top-k
# candidates (torch.topk); a row with top-p and no such top-k needs its whole row sorted.
MAX_CANDIDATES = 1024
NO_TOP_K = 2**31  # a top-k no vocabulary reaches
# Columns of a request's row in the knob table (float64: the seed's 32-bit words stay exact).
KNOB_COLUMNS = (
    "inv_temperature",
    "top_p",
    "min_p",
    "top_k",
    "repetition",
    "presence",
    "frequency",
    "seed_lo",
    "seed_hi",
)


class SamplerState(NamedTuple):
    """What sampling keeps of a request for its whole life (its knobs live in the device table)."""

    params: SamplingParams
    slot: int  # its row in the knob table
    penalty_row: int  # its row in the penalty table; -1 when it has no penalty
    num_candidates: int  # best logits its thresholds need: 0 none, NO_TOP_K the whole row


def request_seed(params: SamplingParams, request_id: str) -> int:
    if params.seed is not None:
        return params.seed
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest()) >> 1


def knob_row(params: SamplingParams, seed: int) -> list[float]:
    """The request's row of the knob table (KNOB_COLUMNS)."""
    inv_temperature = 0.0 if params.greedy else 1.0 / params.temperature
    top_k = params.top_k if params.top_k > 0 else NO_TOP_K
    penalties = [params.repetition_penalty, params.presence_penalty, params.frequency_penalty]
    return [inv_temperature, params.top_p, params.min_p, top_k, *penalties, seed & 0xFFFFFFFF, seed >> 32]


def candidates_needed(params: SamplingParams) -> int:
    """How many of its row's best logits the thresholds need: 0 when the request keeps every
    token, NO_TOP_K (the whole row) when its top-p has no small top-k to search within."""
    if params.greedy:
        return 0
    top_k = params.top_k if params.top_k > 0 else NO_TOP_K
    if params.top_p < 1.0:
        return top_k if top_k <= MAX_CANDIDATES else NO_TOP_K
    if top_k < NO_TOP_K:
        return top_k
    return 1 if params.min_p > 0.0 else 0


class Top(NamedTuple):
    values: torch.Tensor  # [num_reqs, k] logprobs, largest first
    indices: torch.Tensor  # [num_reqs, k] their token ids


class Sampled(NamedTuple):
    tokens: torch.Tensor  # [num_reqs] int64
    logprobs: torch.Tensor  # [num_reqs] float32: the tokens' logprobs under the raw logits
    top: Top | None  # None when no request asked for alternatives


class Sampler:
    """The sampling state of a runner's requests and the batched sampling of its steps.

    Each request's knobs are one row of a device table, written once when it arrives; a step
    gathers its rows with one index, so the host work per step is a list of slots."""

    def __init__(self, device: torch.device, row_stats=None, draw=None, thresholds=None) -> None:
        """row_stats, draw, thresholds: the kernels (`make_row_stats`, `make_draw` and
        `make_thresholds` for the device by default)."""
        self.device = device
        self.row_stats = row_stats or make_row_stats(device)
        self.draw = draw or make_draw(device)
        self.thresholds = thresholds or make_thresholds(device)
        self.penalties = PenaltyTable(device)
        self.states: dict[str, SamplerState] = {}
        self.knobs = torch.zeros(0, len(KNOB_COLUMNS), dtype=torch.float64, device=device)
        self._free_slots: list[int] = []
        self._unwritten: dict[int, list[float]] = {}  # slot -> row, written before the next step

    def add(self, request_id: str, params: SamplingParams, prompt_ids: list[int]) -> None:
        row = -1
        if penalized(params):
            row = self.penalties.add(prompt_ids, repetition=params.repetition_penalty != 1.0)
        slot = self._free_slots.pop() if self._free_slots else len(self.states) + len(self._free_slots)
        self._unwritten[slot] = knob_row(params, request_seed(params, request_id))
        self.states[request_id] = SamplerState(params, slot, row, candidates_needed(params))

    def remove(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is None:
            return
        self._unwritten.pop(state.slot, None)
        self._free_slots.append(state.slot)
        if state.penalty_row >= 0:
            self.penalties.remove(state.penalty_row)

    def _write_knobs(self) -> None:
        """The new requests' rows, in one copy (the table doubles when it is full)."""
        slots = list(self._unwritten)
        capacity = self.knobs.shape[0]
        needed = max(slots) + 1
        if needed > capacity:
            grown = torch.zeros(
                max(64, 2 * capacity, needed), len(KNOB_COLUMNS), dtype=torch.float64, device=self.device
            )
            grown[:capacity] = self.knobs
            self.knobs = grown
        rows = to_device(list(self._unwritten.values()), torch.float64, self.device)
        self.knobs.index_copy_(0, to_device(slots, torch.long, self.device), rows)
        self._unwritten.clear()

    def sample(self, logits: torch.Tensor, request_ids: list[str], positions: list[int]) -> Sampled:
        """logits: [num_reqs, vocab] float32, one row per request; positions: where each row's
        token goes in its sequence (it keys the row's noise). Everything stays on the device.

        Every logprob is a raw logit minus its row's log-sum-exp, so a row's numbers do not
        depend on what else is in the batch."""
        states = [self.states[r] for r in request_ids]
        stats = self.row_stats(logits)
        greedy = all(state.params.greedy for state in states)
        penalized_rows = [i for i, state in enumerate(states) if state.penalty_row >= 0]
        if greedy and not penalized_rows:
            tokens, chosen = stats.argmax, stats.best_logprob
        else:
            if self._unwritten:
                self._write_knobs()
            n, num_reqs = len(penalized_rows), len(states)
            # One copy: every row's slot, position and history row (-1: none), and the
            # penalized rows.
            index = to_device(
                [state.slot for state in states]
                + positions
                + [state.penalty_row for state in states]
                + penalized_rows,
                torch.long,
                self.device,
            )
            knobs = self.knobs[index[:num_reqs]]  # [num_reqs, len(KNOB_COLUMNS)]
            processed = logits
            if n:
                history_rows = index[2 * num_reqs : 3 * num_reqs]
                processed = self.penalties.apply(logits, history_rows, knobs[:, 4:7].float())
            if greedy:
                tokens = torch.argmax(processed, dim=-1)
            else:
                positions_ = index[num_reqs : 2 * num_reqs]
                tokens = self._draw(processed, knobs, positions_, max(s.num_candidates for s in states))
            if n:
                rows = index[3 * num_reqs :]
                self.penalties.observe(history_rows[rows], tokens[rows])
            chosen = logits.gather(1, tokens[:, None])[:, 0] - stats.logsumexp
        num_top = max(state.params.top_logprobs for state in states)
        top = None
        if num_top:
            values, indices = torch.topk(logits, num_top, dim=-1)
            top = Top(values - stats.logsumexp[:, None], indices)
        return Sampled(tokens, chosen, top)

    def _draw(
        self, logits: torch.Tensor, knobs: torch.Tensor, positions: torch.Tensor, num_candidates: int
    ) -> torch.Tensor:
        thresholds_knobs = knobs[:, :4].float()  # inverse temperature, top-p, min-p, top-k
        inv_temperature = thresholds_knobs[:, 0].contiguous()
        if num_candidates:
            thresholds = keep_thresholds(
                logits, thresholds_knobs, min(num_candidates, logits.shape[-1]), self.thresholds
            )
        else:
            thresholds = torch.full_like(inv_temperature, float("-inf"))
        seeds = knobs[:, 7:9].long()  # [num_reqs, 2]: the seed's low and high words
        return self.draw(logits, inv_temperature, thresholds, seeds, positions)

    def check_integrity(self) -> None:
        slots = [s.slot for s in self.states.values()]
        assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_slots)
        self.penalties.check_integrity([s.penalty_row for s in self.states.values() if s.penalty_row >= 0])


def keep_thresholds(
    logits: torch.Tensor, knobs: torch.Tensor, num_candidates: int, thresholds
) -> torch.Tensor:
    """The smallest logit each row keeps [num_reqs]: -inf for a row that keeps every token.

    logits [num_reqs, vocab] (penalties applied); knobs [num_reqs, 4]: inverse temperature
    (0: greedy), top-p, min-p, top-k (the vocabulary size: none). `num_candidates` is at least
    every limited row's top-k, or the vocabulary. `thresholds`: `vlmd.kernels.thresholds`' op,
    which finds them among each row's best logits."""
    vocab = logits.shape[-1]
    if num_candidates >= vocab:
        values = torch.sort(logits, dim=-1, descending=True).values  # [num_reqs, vocab]
    else:
        values = torch.topk(logits, num_candidates, dim=-1).values  # [num_reqs, num_candidates]
    return thresholds(values, knobs, vocab)


def top_lists(ids: list[list[int]], values: list[list[float]], num_top: list[int]) -> list[TopLogprobs]:
    """Each row's alternatives, cut to what its request asked for (the step computed the most any
    request asked for)."""
    return [TopLogprobs(i[:k], v[:k]) for i, v, k in zip(ids, values, num_top, strict=True)]
