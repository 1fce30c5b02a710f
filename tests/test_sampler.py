"""The sampler against transformers' logits processors and its own invariants."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from vlmd.kernels.sampler import SamplerState, apply_penalties, sample, sample_on_device
from vlmd.messages import SamplingParams

CPU = torch.device("cpu")


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(3, 50)
    states = [SamplerState(SamplingParams(), [], CPU) for _ in range(3)]
    tokens, logprobs, _ = sample(logits, states)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert torch.allclose(torch.tensor(logprobs), expected)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 40)
    prompt, generated = [3, 7, 7, 21], [39, 3]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits.clone())
    state = SamplerState(SamplingParams(repetition_penalty=1.3), prompt, CPU)
    state.history(40)
    for token in generated:
        state.observe(torch.tensor([token]))
    assert torch.equal(apply_penalties(logits, [state]), expected)


def observed(params: SamplingParams, generated: list[int], vocab_size: int) -> SamplerState:
    state = SamplerState(params, [], CPU)
    state.history(vocab_size)
    for token in generated:
        state.observe(torch.tensor([token]))
    return state


def test_presence_and_frequency_penalties_by_hand():
    # Token 1 generated twice, token 2 once, tokens 0 and 3 never.
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    state = observed(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 2, 1], 4)
    # logit - frequency * count - presence * (count > 0)
    expected = torch.tensor([[1.0, 2.0 - 0.25 * 2 - 0.5, -1.0 - 0.25 * 1 - 0.5, 0.5]])
    assert torch.equal(apply_penalties(logits, [state]), expected)
    # Negative penalties encourage repetition.
    state = observed(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), [3], 4)
    assert torch.equal(apply_penalties(logits, [state]), torch.tensor([[1.0, 2.0, -1.0, 0.5 + 0.5 + 1.0]]))


def test_penalties_apply_only_to_their_rows_and_count_what_is_sampled():
    logits = torch.tensor([[0.0, 3.0, 2.9], [0.0, 3.0, 2.9]])
    states = [
        SamplerState(SamplingParams(frequency_penalty=0.5), [], CPU),
        SamplerState(SamplingParams(), [], CPU),
    ]
    # Row 0: 1 (3.0 > 2.9), then 2 (3.0 - 0.5 < 2.9), then 1 (2.5 > 2.4); row 1 is never penalized.
    assert [sample(logits, states).token_ids for _ in range(3)] == [[1, 1], [2, 1], [1, 1]]
    assert states[0].output_counts.tolist() == [0, 2, 1] and states[1].output_counts is None
    assert torch.equal(apply_penalties(logits, states)[1], logits[1])


def test_top_logprobs_are_the_raw_distributions_best_per_row():
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(top_logprobs=5),
        SamplingParams(),
        SamplingParams(top_logprobs=2, presence_penalty=2.0),
    ]
    states = [SamplerState(p, [], CPU) for p in params]
    out = sample(logits, states)
    raw = torch.log_softmax(logits, -1)
    best = raw.topk(5, -1)
    assert [len(top.token_ids) for top in out.top_logprobs] == [5, 0, 2]
    for row, top in zip([0, 2], [out.top_logprobs[0], out.top_logprobs[2]], strict=True):
        k = len(top.token_ids)
        assert top.token_ids == best.indices[row, :k].tolist()
        assert torch.allclose(torch.tensor(top.logprobs), best.values[row, :k])
    assert torch.allclose(torch.tensor(out.logprobs), raw[torch.arange(3), torch.tensor(out.token_ids)])
    # The sampled token's logprob and the same token among the alternatives: one number.
    assert out.top_logprobs[0].logprobs[0] == out.logprobs[0]
    assert sample(logits, [SamplerState(SamplingParams(), [], CPU)]).top_logprobs == []


ALL_KNOBS = SamplingParams(
    do_sample=True,
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    seed=3,
    repetition_penalty=1.2,
    presence_penalty=0.5,
    frequency_penalty=0.3,
    top_logprobs=5,
)


@pytest.mark.gpu
def test_gpu_sampling_never_waits_for_the_device():
    cuda = torch.device("cuda")
    params = [ALL_KNOBS, SamplingParams(), SamplingParams(frequency_penalty=1.0, top_logprobs=3)]
    states = [SamplerState(p, [1, 2, 3], cuda) for p in params]
    logits = torch.randn(3, 1000, device=cuda)
    sample(logits, states)  # first use allocates the penalty buffers (and warms the allocators)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sample_on_device(logits, states)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_greedy_penalized_sampling_agrees_on_cpu_and_gpu():
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3),
        SamplingParams(),
    ]
    logits = torch.randn(2, 300)
    tokens = {}
    for device in (CPU, torch.device("cuda")):
        states = [SamplerState(p, [5, 6], device) for p in params]
        tokens[device.type] = [sample(logits.to(device), states).token_ids for _ in range(8)]
    assert tokens["cpu"] == tokens["cuda"]


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


def test_row_stats_give_the_first_argmax_and_log_softmax():
    from vlmd.kernels.row_stats import torch_row_stats

    logits = torch.randn(4, 300)
    logits[0, 10] = logits[0, 200] = 9.0  # a tie: the first index, as torch.argmax
    logits[1, :150] = float("-inf")  # masked logits count for nothing
    stats = torch_row_stats(logits)
    assert stats.argmax.tolist() == logits.argmax(-1).tolist() and stats.argmax[0] == 10
    log_softmax = torch.log_softmax(logits, -1)
    assert torch.allclose(stats.best_logprob, log_softmax.gather(1, stats.argmax[:, None])[:, 0])
    assert torch.allclose(logits[:, :1] - stats.logsumexp[:, None], log_softmax[:, :1])


def test_sampled_rows_report_the_drawn_tokens_log_softmax():
    """Without penalties or top logprobs the logprobs come from the row statistics: a drawn
    token's logprob is still its log_softmax under the raw logits."""
    logits = torch.randn(3, 80)
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams(top_k=5, seed=4)]
    states = [SamplerState(p, [], CPU) for p in params]
    tokens, logprobs, top = sample_on_device(logits, states)
    assert top is None and tokens[0] == logits[0].argmax()
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(logprobs, expected)


def test_row_stats_kernels_fall_back_to_torch_off_cuda(caplog):
    from vlmd.kernels.row_stats import make_row_stats, torch_row_stats

    caplog.set_level("WARNING")
    assert make_row_stats(CPU) is torch_row_stats and caplog.text == ""
    if not torch.cuda.is_available():  # no CUDA (or no Triton): the kernels cannot build or run
        assert make_row_stats(torch.device("cuda")) is torch_row_stats
        assert "sampling's argmax + logsumexp run (Triton's kernels failed) op by op (" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(1, 151674), (7, 151674), (64, 151674), (3, 4096), (5, 1000)])
def test_triton_row_stats_match_torch(rows, vocab):
    from vlmd.kernels.row_stats import TritonRowStats, make_row_stats, torch_row_stats

    cuda = torch.device("cuda")
    assert isinstance(make_row_stats(cuda), TritonRowStats)
    generator = torch.Generator(device=cuda).manual_seed(rows)
    wide = torch.randn(rows, vocab + 64, device=cuda, generator=generator) * 4
    logits = wide[:, :vocab]  # rows strided, as a slice of a captured graph's padded output
    logits[0, vocab // 2] = logits[0, vocab - 1] = 60.0  # a tie across chunks: the first wins
    if rows > 1:
        logits[1, : min(4096, vocab // 2)] = float("-inf")  # a masked chunk adds nothing
    got, want = TritonRowStats()(logits), torch_row_stats(logits)
    assert torch.equal(got.argmax, want.argmax) and got.argmax[0] == vocab // 2
    assert torch.allclose(got.logsumexp, want.logsumexp, rtol=1e-6, atol=1e-5)
    log_softmax = torch.log_softmax(logits, -1).gather(1, want.argmax[:, None])[:, 0]
    assert torch.allclose(got.best_logprob, log_softmax, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
def test_gpu_row_stats_sampling_never_waits_for_the_device():
    from vlmd.kernels.row_stats import make_row_stats

    cuda = torch.device("cuda")
    row_stats = make_row_stats(cuda)
    states = [SamplerState(p, [], cuda) for p in (SamplingParams(), SamplingParams(temperature=0.8, seed=1))]
    logits = torch.randn(2, 151674, device=cuda)
    sample(logits, states, row_stats)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sample_on_device(logits, states, row_stats)
            sample_on_device(logits[:1], states[:1], row_stats)  # all greedy
    finally:
        torch.cuda.set_sync_debug_mode("default")
