"""The sampler against transformers' logits processors, its distributions against the
probabilities they define (chi-square), and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmd.kernels.draw import row_keys, torch_draw, torch_noise
from vlmd.kernels.penalties import PenaltyTable
from vlmd.kernels.row_stats import torch_row_stats
from vlmd.kernels.sampler import Sampler
from vlmd.messages import SamplingParams

CPU = torch.device("cpu")


def sampler_for(params: list[SamplingParams], device=CPU, prompt_ids=()) -> tuple[Sampler, list[str]]:
    sampler = Sampler(device)
    ids = [f"r{i}" for i in range(len(params))]
    for request_id, p in zip(ids, params, strict=True):
        sampler.add(request_id, p, list(prompt_ids))
    return sampler, ids


def tokens_of(sampler: Sampler, logits: torch.Tensor, ids: list[str], position: int = 0) -> list[int]:
    return sampler.sample(logits, ids, [position] * len(ids)).tokens.tolist()


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(3, 50)
    sampler, ids = sampler_for([SamplingParams()] * 3)
    out = sampler.sample(logits, ids, [0, 0, 0])
    assert torch.equal(out.tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert torch.allclose(out.logprobs, expected) and out.top is None


def penalties(repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    return torch.tensor([[repetition, presence, frequency]])  # [1, 3]


def history_table(prompt: list[int], generated: list[int], vocab_size: int, repetition: bool = True):
    table = PenaltyTable(CPU)
    row = table.add(prompt, repetition=repetition)
    rows = torch.tensor([row])
    table.apply(torch.zeros(1, vocab_size), rows, penalties())  # writes the prompt
    for token in generated:
        table.observe(rows, torch.tensor([token]))
    return table, rows


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 40)
    prompt, generated = [3, 7, 7, 21], [39, 3]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits.clone())
    table, rows = history_table(prompt, generated, 40)
    assert torch.equal(table.apply(logits, rows, penalties(repetition=1.3)), expected)


def test_presence_and_frequency_penalties_by_hand():
    # Token 1 generated twice, token 2 once, tokens 0 and 3 never; the prompt does not count.
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    table, rows = history_table([0, 3], [1, 2, 1], 4, repetition=False)
    got = table.apply(logits, rows, penalties(presence=0.5, frequency=0.25))
    # logit - frequency * count - presence * (count > 0)
    assert torch.equal(got, torch.tensor([[1.0, 2.0 - 0.25 * 2 - 0.5, -1.0 - 0.25 * 1 - 0.5, 0.5]]))
    # Negative penalties encourage repetition.
    table, rows = history_table([], [3], 4, repetition=False)
    got = table.apply(logits, rows, penalties(presence=-1.0, frequency=-0.5))
    assert torch.equal(got, torch.tensor([[1.0, 2.0, -1.0, 0.5 + 0.5 + 1.0]]))


def test_penalties_apply_only_to_their_rows_and_count_what_is_sampled():
    logits = torch.tensor([[0.0, 3.0, 2.9], [0.0, 3.0, 2.9], [0.0, 3.0, 2.9]])
    sampler, ids = sampler_for(
        [SamplingParams(frequency_penalty=0.5), SamplingParams(), SamplingParams(presence_penalty=1)]
    )
    # Row 0: 1 (3.0 > 2.9), then 2 (3.0 - 0.5 < 2.9), then 1 (2.5 > 2.4); row 1 is never
    # penalized; row 2: 1, then 2 (2.0 < 2.9), then 0 (both seen: 2.0 and 1.9 < 0.0? no: 1.9 > 0).
    assert [tokens_of(sampler, logits, ids) for _ in range(3)] == [[1, 1, 1], [2, 1, 2], [1, 1, 1]]
    history = sampler.penalties.history
    assert history[sampler.states["r0"].penalty_row].tolist() == [0, 4, 2]  # 2 x times generated
    assert sampler.states["r1"].penalty_row == -1


def test_penalty_rows_are_reused_and_the_table_grows():
    sampler, ids = sampler_for([SamplingParams(repetition_penalty=2.0)] * 10, prompt_ids=[1])
    logits = torch.zeros(10, 6)
    logits[:, 1] = 1.0  # the prompt's token, penalized: 0.5 < 1.0 of token 2
    logits[:, 2] = 0.9
    assert tokens_of(sampler, logits, ids) == [2] * 10
    assert sampler.penalties.history.shape[0] >= 10
    sampler.check_integrity()
    for request_id in ids[:4]:
        sampler.remove(request_id)
    sampler.add("new", SamplingParams(frequency_penalty=2.0), [1])  # a reused row, cleared
    assert sampler.states["new"].penalty_row in range(10)
    assert tokens_of(sampler, logits[:1], ["new"]) == [1]  # the prompt does not count, no leftover
    sampler.check_integrity()


def test_top_logprobs_are_the_raw_distributions_best_per_row():
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(top_logprobs=5),
        SamplingParams(),
        SamplingParams(top_logprobs=2, presence_penalty=2.0),
    ]
    sampler, ids = sampler_for(params)
    out = sampler.sample(logits, ids, [0, 0, 0])
    raw = torch.log_softmax(logits, -1)
    best = raw.topk(5, -1)
    assert torch.equal(out.top.indices, best.indices) and torch.allclose(out.top.values, best.values)
    assert torch.allclose(out.logprobs, raw[torch.arange(3), out.tokens])


def test_sampled_rows_report_the_drawn_tokens_log_softmax():
    logits = torch.randn(3, 80)
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.7),
        SamplingParams(do_sample=True, top_k=5),
    ]
    sampler, ids = sampler_for(params)
    out = sampler.sample(logits, ids, [4, 9, 2])
    assert out.tokens[0] == logits[0].argmax()
    expected = torch.log_softmax(logits, -1).gather(1, out.tokens[:, None])[:, 0]
    assert torch.allclose(out.logprobs, expected)


# --- distributions: many draws of one row against transformers' probabilities ------------------------

NUM_DRAWS = 20_000


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def chi_square_bound(dof: int, z: float = 6.0) -> float:
    """The chi-square quantile about z standard deviations out (Wilson-Hilferty): a correct
    sampler exceeds it with probability ~1e-9."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def draw_counts(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """NUM_DRAWS draws of one row: one batch of rows with seeds of their own."""
    sampler = Sampler(CPU)
    ids = [f"r{i}" for i in range(NUM_DRAWS)]
    for i, request_id in enumerate(ids):
        sampler.add(request_id, SamplingParams(**{**_fields(params), "seed": i}), [])
    tokens = sampler.sample(logits.expand(NUM_DRAWS, -1).contiguous(), ids, [7] * NUM_DRAWS).tokens
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__struct_fields__}


# Logits chosen so that every cut falls between tokens of clearly different probability.
LOGITS = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.6, 0.2, -0.3, -0.8, -1.5, -2.5, -4.0, 3.0])
DISTRIBUTIONS = {
    "temperature": SamplingParams(do_sample=True, temperature=0.8),
    "hot": SamplingParams(do_sample=True, temperature=3.0),
    "top_k": SamplingParams(do_sample=True, top_k=4),
    "top_p": SamplingParams(do_sample=True, temperature=0.7, top_p=0.8),
    "top_k_then_top_p": SamplingParams(do_sample=True, top_k=6, top_p=0.7),
    "min_p": SamplingParams(do_sample=True, temperature=1.3, min_p=0.2),
    "all": SamplingParams(do_sample=True, temperature=1.5, top_k=8, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_draws_follow_transformers_probabilities(name):
    params = DISTRIBUTIONS[name]
    want = reference_probs(LOGITS, params).double()
    counts = draw_counts(LOGITS, params)
    kept = want > 0
    assert kept.sum() < len(LOGITS) or name in ("temperature", "hot")  # each cut cuts something
    assert counts[~kept].sum() == 0, f"drew tokens the reference never keeps: {counts.tolist()}"
    expected = want[kept] * NUM_DRAWS
    chi_square = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi_square < chi_square_bound(int(kept.sum()) - 1), (
        chi_square,
        counts.tolist(),
        expected.tolist(),
    )


def test_noise_is_exponential_and_keyed():
    keys = row_keys(torch.tensor([[3, 0], [3, 0], [4, 0]]), torch.tensor([0, 1, 0]))
    noise = torch_noise(keys, 200_000)  # -log(E), E ~ Exp(1): a Gumbel variable
    assert abs(noise.mean() - 0.5772) < 0.01 and abs(noise.std() - math.pi / math.sqrt(6)) < 0.01
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(torch_noise(keys[:1], 200_000)[0], noise[0])  # a row's noise is its own


# --- seeds ---------------------------------------------------------------------------------------


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=generator)
    seeded = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, top_k=200, seed=11)
    others = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=2, frequency_penalty=0.5),
        SamplingParams(do_sample=True, top_p=0.5),  # a full sort for the whole batch
    ]
    sampler, ids = sampler_for([seeded])
    alone = [sampler.sample(logits[:1], ids, [p]).tokens.item() for p in range(20)]
    sampler, ids = sampler_for([*others, seeded])
    batch = torch.cat([logits[1:], logits[:1]])  # its row last
    beside = [sampler.sample(batch, ids, [p] * 4).tokens[3].item() for p in range(20)]
    assert beside == alone
    assert len(set(alone)) > 5  # it does sample


def test_seeds_differ_and_unseeded_requests_differ():
    logits = torch.zeros(1, 1000)
    draws = {}
    for name, params, request_id in [
        ("seed 1", SamplingParams(do_sample=True, seed=1), "a"),
        ("seed 1 again", SamplingParams(do_sample=True, seed=1), "b"),
        ("seed 2", SamplingParams(do_sample=True, seed=2), "a"),
        ("unseeded a", SamplingParams(do_sample=True), "a"),
        ("unseeded b", SamplingParams(do_sample=True), "b"),
    ]:
        sampler = Sampler(CPU)
        sampler.add(request_id, params, [])
        draws[name] = [sampler.sample(logits, [request_id], [p]).tokens.item() for p in range(10)]
    assert draws["seed 1"] == draws["seed 1 again"]
    assert len({tuple(v) for v in draws.values()}) == 4


def test_top_k_one_tiny_top_p_and_temperature_zero_are_greedy():
    logits = torch.randn(4, 100)
    params = [
        SamplingParams(do_sample=True, top_k=1),
        SamplingParams(do_sample=True, top_p=1e-6),
        SamplingParams(do_sample=True, temperature=0.0),
        SamplingParams(do_sample=True, min_p=1.0),
    ]
    sampler, ids = sampler_for(params)
    for position in range(5):
        assert tokens_of(sampler, logits, ids, position) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 1e-6])
def test_a_temperature_too_small_for_float32_is_greedy(temperature):
    """1 / temperature overflowed float32: NaN probabilities kept no token, and top-p's index -1
    crashed the worker (found fuzzing the server, which it took down)."""
    logits = torch.randn(4, 100)
    params = [
        SamplingParams(do_sample=True, temperature=temperature, top_p=0.5),
        SamplingParams(do_sample=True, temperature=temperature, top_k=5),
        SamplingParams(do_sample=True, temperature=temperature, min_p=0.1),
        SamplingParams(do_sample=True, temperature=temperature),
    ]
    sampler, ids = sampler_for(params)
    for position in range(5):
        assert tokens_of(sampler, logits, ids, position) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [1e-300, 5e-324])
def test_a_penalty_that_pushes_logits_to_infinity_still_draws_a_token(penalty):
    """Positive logits / 1e-300 are inf: probabilities were NaN and top-p gathered index -1,
    which crashed the worker (found probing the sampler after the fuzzer found the temperature case)."""
    logits = torch.randn(3, 100)
    prompt = list(range(0, 100, 2))  # the penalized tokens
    params = [
        SamplingParams(do_sample=True, repetition_penalty=penalty, top_p=0.5),
        SamplingParams(do_sample=True, repetition_penalty=penalty, top_k=3),
        SamplingParams(do_sample=True, repetition_penalty=penalty),
    ]
    sampler, ids = sampler_for(params, prompt_ids=prompt)
    for position in range(5):
        tokens = tokens_of(sampler, logits, ids, position)
        assert all(0 <= token < 100 for token in tokens)


def test_top_k_keeps_the_k_best_and_ties_at_the_kth():
    logits = torch.arange(100, dtype=torch.float32)[None].repeat(2, 1)
    logits[1, 90] = 95.0  # ties with the 5th best
    sampler, ids = sampler_for([SamplingParams(do_sample=True, top_k=5, temperature=10.0)] * 2)
    drawn = [set(), set()]
    for position in range(300):
        for row, token in enumerate(tokens_of(sampler, logits, ids, position)):
            drawn[row].add(token)
    assert drawn[0] == set(range(95, 100))
    assert drawn[1] == {90, *range(95, 100)}


def test_greedy_rows_in_a_sampled_batch_take_the_penalized_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.9]] * 2)
    sampler, ids = sampler_for([SamplingParams(presence_penalty=1.0), SamplingParams(do_sample=True)])
    assert tokens_of(sampler, logits, ids, 0)[0] == 1
    assert tokens_of(sampler, logits, ids, 1)[0] == 2  # token 1 now costs 1.0


# --- GPU -----------------------------------------------------------------------------------------

ALL_KNOBS = SamplingParams(
    do_sample=True,
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    min_p=0.01,
    seed=3,
    repetition_penalty=1.2,
    presence_penalty=0.5,
    frequency_penalty=0.3,
    top_logprobs=5,
)


@pytest.mark.gpu
def test_gpu_sampling_never_waits_for_the_device():
    cuda = torch.device("cuda")
    params = [
        ALL_KNOBS,
        SamplingParams(),
        SamplingParams(frequency_penalty=1.0, top_logprobs=3),
        SamplingParams(do_sample=True, top_p=0.9),  # a full sort
    ]
    sampler, ids = sampler_for(params, cuda, prompt_ids=[1, 2, 3])
    logits = torch.randn(4, 151674, device=cuda)
    sampler.sample(logits, ids, [5] * 4)  # first use allocates the penalty table (and warms the allocators)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for position in range(3):
            sampler.sample(logits, ids, [position] * 4)
            sampler.sample(logits[1:2], ids[1:2], [position])  # all greedy
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_sampling_agrees_on_cpu_and_gpu():
    """Penalized greedy rows exactly; sampled rows too (the same keyed noise), but for the
    last-bit differences of the two devices' logs, which a near tie would need."""
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=5),
        SamplingParams(do_sample=True, top_p=0.8, min_p=0.02, seed=6),
    ]
    logits = torch.randn(4, 30000) * 3
    tokens = {}
    for device in (CPU, torch.device("cuda")):
        sampler, ids = sampler_for(params, device, prompt_ids=[5, 6])
        tokens[device.type] = [
            sampler.sample(logits.to(device), ids, [p] * 4).tokens.tolist() for p in range(8)
        ]
    assert tokens["cpu"] == tokens["cuda"]


def triton_inputs(
    make, kernel_class, rows: int, vocab: int
) -> tuple[torch.device, torch.Tensor, torch.Generator]:
    """After checking that `make` builds the Triton kernel on CUDA: random logits whose rows are
    strided, as a slice of a captured graph's padded output, and the generator (seeded by `rows`)
    that drew them, for the test's other draws."""
    cuda = torch.device("cuda")
    assert isinstance(make(cuda), kernel_class)
    generator = torch.Generator(device=cuda).manual_seed(rows)
    wide = torch.randn(rows, vocab + 64, device=cuda, generator=generator) * 4
    return cuda, wide[:, :vocab], generator


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(1, 151674), (64, 151674), (5, 1000)])
def test_triton_draw_matches_torch(rows, vocab):
    from vlmd.kernels.draw import TritonDraw, make_draw

    cuda, logits, generator = triton_inputs(make_draw, TritonDraw, rows, vocab)
    inv_t = torch.rand(rows, device=cuda, generator=generator) * 2
    inv_t[0] = 0.0  # a greedy row
    thresholds = torch.where(torch.rand(rows, device=cuda) < 0.5, 0.5, float("-inf"))
    seeds = torch.tensor([[9 + i, 2**31 + i] for i in range(rows)], device=cuda)
    positions = torch.arange(rows, device=cuda) * 4099
    got = TritonDraw()(logits, inv_t, thresholds, seeds, positions)
    assert torch.equal(got, torch_draw(logits, inv_t, thresholds, seeds, positions))
    assert got[0] == logits[0].argmax()


def test_row_stats_give_the_first_argmax_and_log_softmax():

    logits = torch.randn(4, 300)
    logits[0, 10] = logits[0, 200] = 9.0  # a tie: the first index, as torch.argmax
    logits[1, :150] = float("-inf")  # masked logits count for nothing
    stats = torch_row_stats(logits)
    assert stats.argmax.tolist() == logits.argmax(-1).tolist() and stats.argmax[0] == 10
    log_softmax = torch.log_softmax(logits, -1)
    assert torch.allclose(stats.best_logprob, log_softmax.gather(1, stats.argmax[:, None])[:, 0])
    assert torch.allclose(logits[:, :1] - stats.logsumexp[:, None], log_softmax[:, :1])


@pytest.mark.parametrize(
    "module,make,reference,what",
    [
        (
            "row_stats",
            "make_row_stats",
            "torch_row_stats",
            "sampling's argmax + logsumexp run (Triton's kernels failed)",
        ),
        ("draw", "make_draw", "torch_draw", "sampling's token draw runs (Triton's kernels failed)"),
        ("penalties", "make_penalize", "torch_penalize", "sampling's penalties run"),
        (
            "thresholds",
            "make_thresholds",
            "torch_thresholds",
            "sampling's top-k / top-p / min-p thresholds run",
        ),
    ],
)
def test_sampling_kernels_fall_back_to_torch_off_cuda(caplog, module, make, reference, what):
    import importlib

    kernels = importlib.import_module(f"vlmd.kernels.{module}")
    make, reference = getattr(kernels, make), getattr(kernels, reference)
    caplog.set_level("WARNING")
    assert make(CPU) is reference and caplog.text == ""
    if not torch.cuda.is_available():  # no CUDA (or no Triton): the kernels cannot build or run
        assert make(torch.device("cuda")) is reference
        assert f"{what} op by op (" in caplog.text


def test_penalties_leave_the_rows_without_a_history_row_as_they_are():
    table = PenaltyTable(CPU)
    row = table.add([1, 2], repetition=True)
    logits = torch.tensor([[0.5, 2.0, -2.0, 1.0]] * 3)
    values = torch.tensor([[2.0, 1.0, 1.0], [2.0, 0.0, 0.0], [2.0, 1.0, 1.0]])  # -1 wins over values
    got = table.apply(logits, torch.tensor([-1, row, -1]), values)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert got[1].tolist() == [0.5, 1.0, -4.0, 1.0]  # the prompt's tokens 1 and 2 penalized


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(1, 151674), (64, 151674), (5, 1000)])
def test_triton_penalties_match_torch(rows, vocab):
    from vlmd.kernels.penalties import TritonPenalize, make_penalize, torch_penalize

    cuda, logits, generator = triton_inputs(make_penalize, TritonPenalize, rows, vocab)
    history = torch.randint(0, 9, (rows + 3, vocab), dtype=torch.int32, device=cuda, generator=generator)
    history_rows = torch.randperm(rows + 3, device=cuda, generator=generator)[:rows]
    history_rows[::3] = -1  # rows without penalties
    shape = (rows, 1)
    values = torch.cat(
        [
            0.5 + torch.rand(shape, device=cuda, generator=generator),  # repetition 0.5 to 1.5
            torch.randn(shape, device=cuda, generator=generator),  # presence
            torch.randn(shape, device=cuda, generator=generator),  # frequency
        ],
        dim=1,
    )
    got = TritonPenalize()(logits, history, history_rows, values)
    assert torch.equal(got, torch_penalize(logits, history, history_rows, values))
    assert torch.equal(got[0], logits[0])


@pytest.mark.gpu
@pytest.mark.parametrize("rows,candidates", [(1, 50), (64, 50), (64, 1024), (5, 3)])
def test_triton_thresholds_keep_the_tokens_torch_keeps(rows, candidates):
    from vlmd.kernels.thresholds import TritonThresholds, make_thresholds, torch_thresholds

    vocab = 151674
    cuda, logits, generator = triton_inputs(make_thresholds, TritonThresholds, rows, vocab)
    values = torch.topk(logits, candidates, dim=-1).values

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(rows, device=cuda, generator=generator)

    top_k = torch.where(uniform(0, 1) < 0.5, torch.floor(uniform(1, candidates + 1)), 2.0**31)
    knobs = torch.stack(
        [uniform(0.2, 3), uniform(0.05, 1.2).clamp(max=1), uniform(-0.2, 0.3).clamp(min=0), top_k], 1
    )
    knobs[0, 0] = 0.0  # a greedy row
    got, want = TritonThresholds()(values, knobs, vocab), torch_thresholds(values, knobs, vocab)
    assert torch.equal((logits >= got[:, None]).sum(1), (logits >= want[:, None]).sum(1))
    assert torch.allclose(got, want, rtol=1e-6, atol=0.0) and got[0] == float("-inf")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(1, 151674), (7, 151674), (64, 151674), (3, 4096), (5, 1000)])
def test_triton_row_stats_match_torch(rows, vocab):
    from vlmd.kernels.row_stats import TritonRowStats, make_row_stats

    cuda, logits, generator = triton_inputs(make_row_stats, TritonRowStats, rows, vocab)
    logits[0, vocab // 2] = logits[0, vocab - 1] = 60.0  # a tie across chunks: the first wins
    if rows > 1:
        logits[1, : min(4096, vocab // 2)] = float("-inf")  # a masked chunk adds nothing
    got, want = TritonRowStats()(logits), torch_row_stats(logits)
    assert torch.equal(got.argmax, want.argmax) and got.argmax[0] == vocab // 2
    assert torch.allclose(got.logsumexp, want.logsumexp, rtol=1e-6, atol=1e-5)
    log_softmax = torch.log_softmax(logits, -1).gather(1, want.argmax[:, None])[:, 0]
    assert torch.allclose(got.best_logprob, log_softmax, rtol=1e-6, atol=1e-5)
