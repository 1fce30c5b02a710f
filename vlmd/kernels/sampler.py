"""Token sampling from logits: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Everything stays on the logits' device; the only host sync is reading back the chosen tokens and
their logprobs once per step, for the whole batch.
"""

from __future__ import annotations

import torch

from vlmd.messages import SamplingParams


class SamplerState:
    """What sampling needs across a request's life: its parameters, RNG and token history."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> None:
        self.params = params
        self.seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        self.generator = None
        if params.do_sample and params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def observe(self, token_id: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token_id)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[float]]:
    """logits: [num_reqs, vocab] float32, one row per request. Returns tokens and their logprobs
    under the model's raw distribution."""
    tokens, logprobs = sample_on_device(logits, states)
    token_list = tokens.tolist()
    observe(states, token_list)
    return token_list, logprobs.tolist()


def needs_history(states: list[SamplerState]) -> bool:
    """Whether sampling these requests reads their earlier tokens on the host (so the previous
    step's tokens must be read back first)."""
    return any(s.params.repetition_penalty != 1.0 for s in states)


def observe(states: list[SamplerState], token_ids: list[int]) -> None:
    for state, token in zip(states, token_ids, strict=True):
        state.observe(token)


def sample_on_device(logits: torch.Tensor, states: list[SamplerState]) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `sample`, without reading anything back: tokens [num_reqs] int64 and their logprobs
    [num_reqs] float32 on the logits' device. The caller `observe`s the tokens once read."""
    processed = logits
    penalized = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0 and s.seen]
    if penalized:
        processed = logits.clone()
        for i in penalized:
            processed[i] = apply_repetition_penalty(
                logits[i], states[i].seen, states[i].params.repetition_penalty
            )
    tokens = torch.argmax(processed, dim=-1)  # [num_reqs]; greedy rows are done
    for i, state in enumerate(states):
        if not state.params.greedy:
            tokens[i] = _draw(processed[i], state)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


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


def apply_repetition_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty as transformers applies it: positive logits divided, negative multiplied."""
    ids = torch.tensor(sorted(seen), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
