"""Token sampling from logits: greedy, temperature, top-k, top-p, repetition penalty, seeds."""

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
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens: list[int] = []
    for row, state in enumerate(states):
        token = _sample_row(logits[row], state)
        tokens.append(token)
        state.observe(token)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)]
    return tokens, chosen.tolist()


def _sample_row(logits: torch.Tensor, state: SamplerState) -> int:
    params = state.params
    if params.repetition_penalty != 1.0 and state.seen:
        logits = apply_repetition_penalty(logits, state.seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=state.generator))


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
