"""Token sampling for a whole batch at once: greedy, temperature, top-k, top-p, min-p,
repetition / presence / frequency penalties, seeds, and the top logprobs at each position.

A step samples in a fixed number of batched operations whatever the batch holds: the row
statistics (argmax and log-sum-exp, `vlmd.kernels.row_stats`), the penalties of the penalized
rows (`vlmd.kernels.penalties`), one threshold per row for top-k / top-p / min-p, and one draw
for every row (`vlmd.kernels.draw`: an exponential race whose noise is keyed by the request's
seed and the token's position, so a seeded request draws the same tokens in any batch). Nothing
waits for the device; the runner reads the results back once per step.

Order of the logits processors, as transformers applies them: penalties, temperature, top-k,
top-p (over the top-k tokens, renormalised), min-p (relative to the most likely token).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from vlmd.kernels.draw import make_draw, row_key
from vlmd.kernels.penalties import PenaltyTable, penalized
from vlmd.kernels.row_stats import make_row_stats
from vlmd.kernels.transfer import to_device
from vlmd.messages import SamplingParams, TopLogprobs

# Rows whose top-k keeps at most this many tokens find their top-p threshold among the top-k
# candidates (torch.topk); a row with top-p and no such top-k needs its whole row sorted.
MAX_CANDIDATES = 1024


class SamplerState(NamedTuple):
    """What sampling keeps of a request for its whole life."""

    params: SamplingParams
    seed: int  # the request's, else one derived from its id (the same on every rank)
    penalty_row: int  # its row in the penalty table; -1 when it has no penalty


def request_seed(params: SamplingParams, request_id: str) -> int:
    if params.seed is not None:
        return params.seed
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest()) >> 1


class Top(NamedTuple):
    values: torch.Tensor  # [num_reqs, k] logprobs, largest first
    indices: torch.Tensor  # [num_reqs, k] their token ids


class Sampled(NamedTuple):
    tokens: torch.Tensor  # [num_reqs] int64
    logprobs: torch.Tensor  # [num_reqs] float32: the tokens' logprobs under the raw logits
    top: Top | None  # None when no request asked for alternatives


class Sampler:
    """The sampling state of a runner's requests and the batched sampling of its steps."""

    def __init__(self, device: torch.device, row_stats=None, draw=None) -> None:
        """row_stats, draw: the kernels (`make_row_stats` and `make_draw` for the device by default)."""
        self.device = device
        self.row_stats = row_stats or make_row_stats(device)
        self.draw = draw or make_draw(device)
        self.penalties = PenaltyTable(device)
        self.states: dict[str, SamplerState] = {}

    def add(self, request_id: str, params: SamplingParams, prompt_ids: list[int]) -> None:
        row = -1
        if penalized(params):
            row = self.penalties.add(prompt_ids, repetition=params.repetition_penalty != 1.0)
        self.states[request_id] = SamplerState(params, request_seed(params, request_id), row)

    def remove(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None and state.penalty_row >= 0:
            self.penalties.remove(state.penalty_row)

    def sample(self, logits: torch.Tensor, request_ids: list[str], positions: list[int]) -> Sampled:
        """logits: [num_reqs, vocab] float32, one row per request; positions: where each row's
        token goes in its sequence (it keys the row's noise). Everything stays on the device.

        Every logprob is a raw logit minus its row's log-sum-exp, so a row's numbers do not
        depend on what else is in the batch."""
        states = [self.states[r] for r in request_ids]
        stats = self.row_stats(logits)
        penalized_rows = [i for i, state in enumerate(states) if state.penalty_row >= 0]
        if not penalized_rows and all(state.params.greedy for state in states):
            tokens, chosen = stats.argmax, stats.best_logprob
        else:
            index = None
            processed = logits
            if penalized_rows:
                index = to_device(
                    penalized_rows + [states[i].penalty_row for i in penalized_rows], torch.long, self.device
                )
                processed = self._penalize(logits, index, [states[i].params for i in penalized_rows])
            if all(state.params.greedy for state in states):
                tokens = torch.argmax(processed, dim=-1)
            else:
                tokens = self._draw(processed, states, positions)
            if index is not None:
                n = len(penalized_rows)
                self.penalties.observe(index[n:], tokens[index[:n]])
            chosen = logits.gather(1, tokens[:, None])[:, 0] - stats.logsumexp
        num_top = max(state.params.top_logprobs for state in states)
        top = None
        if num_top:
            values, indices = torch.topk(logits, num_top, dim=-1)
            top = Top(values - stats.logsumexp[:, None], indices)
        return Sampled(tokens, chosen, top)

    def _penalize(
        self, logits: torch.Tensor, index: torch.Tensor, params: list[SamplingParams]
    ) -> torch.Tensor:
        """index: the penalized rows of the batch, then their rows in the penalty table."""
        n = len(params)
        rows = index[:n]
        penalties = self.penalties.apply(logits[rows], index[n:], params)
        return logits.index_copy(0, rows, penalties)

    def _draw(self, logits: torch.Tensor, states: list[SamplerState], positions: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        params = [state.params for state in states]
        knobs = to_device(
            [[0.0 if p.greedy else 1.0 / p.temperature, p.top_p, p.min_p, _top_k(p, vocab)] for p in params],
            torch.float32,
            self.device,
        )  # [num_reqs, 4]
        keys = to_device(
            [row_key(state.seed, position) for state, position in zip(states, positions, strict=True)],
            torch.int64,
            self.device,
        )  # [num_reqs, 2]
        inv_temperature = knobs[:, 0].contiguous()
        num_candidates = _num_candidates(params, vocab)
        if num_candidates:
            thresholds = keep_thresholds(logits, knobs, num_candidates)
        else:
            thresholds = torch.full_like(inv_temperature, float("-inf"))
        return self.draw(logits, inv_temperature, thresholds, keys)

    def check_integrity(self) -> None:
        rows = [s.penalty_row for s in self.states.values() if s.penalty_row >= 0]
        assert len(set(rows)) == len(rows) and not set(rows) & set(self.penalties._free)
        self.penalties.check_integrity()


def _top_k(params: SamplingParams, vocab: int) -> int:
    return min(params.top_k, vocab) if params.top_k > 0 else vocab


def _num_candidates(params: list[SamplingParams], vocab: int) -> int:
    """How many of each row's best logits the thresholds need: 0 when no sampled row limits its
    tokens, the vocabulary when a row's top-p has no small top-k to search within."""
    sampled = [p for p in params if not p.greedy]
    limited = [p for p in sampled if _top_k(p, vocab) < vocab or p.top_p < 1.0]
    if not limited:
        return 1 if any(p.min_p > 0.0 for p in sampled) else 0
    if any(p.top_p < 1.0 and _top_k(p, vocab) > MAX_CANDIDATES for p in limited):
        return vocab
    return max(_top_k(p, vocab) for p in limited)


def keep_thresholds(logits: torch.Tensor, knobs: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """The smallest logit each row keeps [num_reqs]: -inf for a row that keeps every token.

    logits [num_reqs, vocab] (penalties applied); knobs [num_reqs, 4]: inverse temperature
    (0: greedy), top-p, min-p, top-k (the vocabulary size: none). `num_candidates` is at least
    every limited row's top-k, or the vocabulary. Thresholds keep ties: a token whose logit
    equals the k-th largest is kept, as transformers' top-k keeps it."""
    vocab = logits.shape[-1]
    if num_candidates >= vocab:
        values = torch.sort(logits, dim=-1, descending=True).values  # [num_reqs, vocab]
    else:
        values = torch.topk(logits, num_candidates, dim=-1).values  # [num_reqs, num_candidates]
    inv_temperature, top_p, min_p, top_k = (column[:, None] for column in knobs.unbind(1))
    in_top_k = torch.arange(values.shape[-1], device=values.device)[None, :] < top_k
    probs = torch.softmax((values * inv_temperature).masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    # The best token is always kept: so by construction, since probabilities may be NaN where
    # penalties pushed logits to infinity (a repetition_penalty of 1e-300), and an index of -1
    # below would crash the worker.
    keep[:, 0] = True
    last = keep.sum(dim=-1, keepdim=True) - 1
    thresholds = values.gather(1, last)
    limited = ((top_k < vocab) | (top_p < 1.0)) & (inv_temperature > 0)
    thresholds = torch.where(limited, thresholds, float("-inf"))
    # min-p: probability at least min_p times the best one's, i.e. a logit at least
    # best + T * log(min_p).
    floor = values[:, :1] + torch.log(min_p) / inv_temperature.clamp(min=1e-30)
    floor = torch.where((min_p > 0) & (inv_temperature > 0), floor, float("-inf"))
    return torch.maximum(thresholds, floor)[:, 0]


def top_lists(ids: list[list[int]], values: list[list[float]], num_top: list[int]) -> list[TopLogprobs]:
    """Each row's alternatives, cut to what its request asked for (the step computed the most any
    request asked for)."""
    return [TopLogprobs(i[:k], v[:k]) for i, v, k in zip(ids, values, num_top, strict=True)]
