"""The sampler against transformers' logits processors and its own invariants."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from vlmd.kernels.sampler import SamplerState, apply_repetition_penalty, sample
from vlmd.messages import SamplingParams

CPU = torch.device("cpu")


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(3, 50)
    states = [SamplerState(SamplingParams(), [], CPU) for _ in range(3)]
    tokens, logprobs = sample(logits, states)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert torch.allclose(torch.tensor(logprobs), expected)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 40)
    seen = [3, 7, 7, 21, 39]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits.clone())[0]
    assert torch.equal(apply_repetition_penalty(logits[0], set(seen), 1.3), expected)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 1000)

    def draw(seed):
        state = SamplerState(SamplingParams(do_sample=True, temperature=1.5, seed=seed), [], CPU)
        return [sample(logits, [state])[0][0] for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(1, 100)
    for params in (SamplingParams(do_sample=True, top_k=1), SamplingParams(do_sample=True, top_p=1e-6)):
        state = SamplerState(params, [], CPU)
        assert sample(logits, [state])[0] == [int(logits.argmax())]


def test_top_k_keeps_only_the_k_best():
    logits = torch.arange(100, dtype=torch.float32)[None]
    state = SamplerState(SamplingParams(do_sample=True, top_k=5, temperature=10.0, seed=0), [], CPU)
    drawn = {sample(logits, [state])[0][0] for _ in range(200)}
    assert drawn <= set(range(95, 100)) and len(drawn) > 1


def test_temperature_zero_with_do_sample_is_greedy():
    logits = torch.randn(1, 100)
    state = SamplerState(SamplingParams(do_sample=True, temperature=0.0), [], CPU)
    assert sample(logits, [state])[0] == [int(logits.argmax())]
