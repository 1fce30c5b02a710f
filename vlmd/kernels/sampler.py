"""Token sampling from logits: greedy, temperature, top-k, top-p, repetition / presence /
frequency penalties, seeds, and the top logprobs at each position.

Everything stays on the logits' device: the token counts the penalties need live there and are
updated from the sampled tokens on the device; parameters go up with non-blocking copies. The
only host sync is reading back the results once per step, for the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vlmd.kernels.row_stats import torch_row_stats
from vlmd.kernels.transfer import to_device
from vlmd.messages import SamplingParams, TopLogprobs


class SamplerState:
    """What sampling needs across a request's life: its parameters, RNG and token history."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> None:
        self.params = params
        self.device = device
        self.generator = None
        if params.do_sample and params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.penalized = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        self._prompt_ids = prompt_ids if params.repetition_penalty != 1.0 else []
        # Allocated on first use, when the vocabulary size is known; only for penalized requests.
        self.seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or generated
        self.output_counts: torch.Tensor | None = None  # [vocab] int32: times each token was generated

    def history(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seen is None:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=self.device)
            if self._prompt_ids:
                # index_fill_, not `seen[ids] = True`: the assignment waits for the device.
                self.seen.index_fill_(0, to_device(self._prompt_ids, torch.long, self.device), True)
        return self.seen, self.output_counts

    def observe(self, token: torch.Tensor) -> None:
        """token: [1] long on the device, the token just sampled (by `apply_penalties`, which
        allocated the history)."""
        if self.seen is not None:
            self.seen.index_fill_(0, token, True)
            self.output_counts.index_add_(0, token, torch.ones_like(token, dtype=torch.int32))


class Sampled(NamedTuple):
    token_ids: list[int]
    logprobs: list[float]  # of the sampled tokens, under the model's raw distribution
    top_logprobs: list[TopLogprobs]  # one per row when any row asked (empty for the others), else []


def sample(logits: torch.Tensor, states: list[SamplerState], row_stats=torch_row_stats) -> Sampled:
    """logits: [num_reqs, vocab] float32, one row per request."""
    tokens, logprobs, top = sample_on_device(logits, states, row_stats)
    token_list = tokens.tolist()  # the step's one wait for the device
    if top is None:
        return Sampled(token_list, logprobs.tolist(), [])
    num_top = [state.params.top_logprobs for state in states]
    return Sampled(
        token_list, logprobs.tolist(), top_lists(top.indices.tolist(), top.values.tolist(), num_top)
    )


class Top(NamedTuple):
    values: torch.Tensor  # [num_reqs, k] logprobs, largest first
    indices: torch.Tensor  # [num_reqs, k] their token ids


def sample_on_device(logits: torch.Tensor, states: list[SamplerState], row_stats=torch_row_stats):
    """Tokens [num_reqs], their raw logprobs [num_reqs] and the `Top` logprobs [num_reqs, k]
    (None when no row asked), all left on the device; the states observe the tokens.

    Every logprob is a raw logit minus its row's log-sum-exp from `row_stats`
    (`vlmd.kernels.row_stats`: one pass over the logits, no log_softmax matrix), so a row's
    numbers do not depend on what else is in the batch."""
    stats = row_stats(logits)
    penalized = any(state.penalized for state in states)
    if not penalized and all(state.params.greedy for state in states):
        tokens, chosen = stats.argmax, stats.best_logprob
    else:
        processed = apply_penalties(logits, states)
        # Without penalties the row statistics' argmax is each greedy row's token.
        tokens = torch.argmax(processed, dim=-1) if penalized else stats.argmax.clone()
        for i, state in enumerate(states):
            if not state.params.greedy:
                tokens[i] = _draw(processed[i], state)
        for i, state in enumerate(states):
            if state.penalized:  # only penalties read the history: the rest need no per-row work
                state.observe(tokens[i : i + 1])
        chosen = logits.gather(1, tokens[:, None])[:, 0] - stats.logsumexp
    num_top = max(state.params.top_logprobs for state in states)
    top = None
    if num_top:
        values, indices = torch.topk(logits, num_top, dim=-1)
        top = Top(values - stats.logsumexp[:, None], indices)
    return tokens, chosen, top


def apply_penalties(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """The logits with every penalized row's penalties applied, in one batched operation."""
    rows = [i for i, state in enumerate(states) if state.penalized]
    if not rows:
        return logits
    vocab_size, device = logits.shape[-1], logits.device
    histories = [states[i].history(vocab_size) for i in rows]
    params = [states[i].params for i in rows]

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, torch.float32, device)[:, None]  # [num_penalized, 1]

    index = to_device(rows, torch.long, device)
    penalized = penalize(
        logits[index],
        torch.stack([seen for seen, _ in histories]),  # [num_penalized, vocab]
        torch.stack([counts for _, counts in histories]),  # [num_penalized, vocab]
        repetition=column([p.repetition_penalty for p in params]),
        presence=column([p.presence_penalty for p in params]),
        frequency=column([p.frequency_penalty for p in params]),
    )
    processed = logits.clone()
    processed[index] = penalized
    return processed


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


def _draw(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    params = state.params
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=state.generator)[0]


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)


def top_lists(ids: list[list[int]], values: list[list[float]], num_top: list[int]) -> list[TopLogprobs]:
    """Each row's alternatives, cut to what its request asked for (the step computed the most any
    request asked for)."""
    return [TopLogprobs(i[:k], v[:k]) for i, v, k in zip(ids, values, num_top, strict=True)]
