"""Every sampling parameter through both APIs of a real server: penalties against transformers'
logits processors, truncations that must collapse a hot distribution to the greedy token, and a
seeded request that draws the same tokens alone, in a busy batch and through either API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from tests.test_parity import IMG_B, IMG_C, chat, hf_prompt, vlmd_generate

PROMPT = chat("Tell me a story about a red fox.")
NUM_TOKENS = 20


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties on the tokens generated after the prompt."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


@pytest.fixture(scope="module")
def client(mm_server):
    return openai.OpenAI(base_url=mm_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def completion_text(client, **knobs) -> str:
    """/v1/completions on the raw prompt: the same token ids /generate gets. Knobs OpenAI's
    package does not name go in extra_body, as vLLM's clients send them."""
    native = {
        k: knobs.pop(k)
        for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
        if k in knobs
    }
    out = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=NUM_TOKENS, extra_body={"ignore_eos": True, **knobs}, **native
    )
    return out.choices[0].text


def test_penalties_give_transformers_tokens_through_both_apis(mm_server, reference, client, tokenizer):
    prompt_len = len(reference.tokenizer(hf_prompt(PROMPT)).input_ids)
    penalties = OpenAIPenalties(prompt_len, presence=0.8, frequency=0.6)
    want = reference.generate(
        hf_prompt(PROMPT),
        [],
        NUM_TOKENS,
        repetition_penalty=1.3,
        logits_processor=LogitsProcessorList([penalties]),
    )
    assert want != reference.generate(hf_prompt(PROMPT), [], NUM_TOKENS)  # the penalties change the tokens
    knobs = {"repetition_penalty": 1.3, "presence_penalty": 0.8, "frequency_penalty": 0.6}
    assert vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS, **knobs) == want
    assert completion_text(client, temperature=0, **knobs) == tokenizer.decode(want)


HOT = {"temperature": 5.0, "seed": 3}
TRUNCATIONS = [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}]


@pytest.mark.parametrize("knob", TRUNCATIONS, ids=[next(iter(k)) for k in TRUNCATIONS])
def test_truncations_reach_the_sampler_through_both_apis(mm_server, client, tokenizer, knob):
    """A hot sample is far from greedy; each of these knobs keeps only the best token."""
    greedy = vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS)
    assert vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS, do_sample=True, **HOT) != greedy
    assert vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS, do_sample=True, **HOT, **knob) == greedy
    assert completion_text(client, **HOT) != tokenizer.decode(greedy)
    assert completion_text(client, **HOT, **knob) == tokenizer.decode(greedy)


SEEDED = {
    "temperature": 0.9,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.01,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.2,
    "frequency_penalty": 0.1,
    "seed": 5,
}


def busy_batch() -> list[tuple[str, list[bytes], dict]]:
    """Requests of every kind to run beside the seeded one."""
    return [
        (chat("Hi."), [], {}),
        (chat("<img></img> Describe."), [IMG_C], {"do_sample": True, "temperature": 0.7}),
        (chat("Count to ten."), [], {"do_sample": True, "top_p": 0.5, "seed": 1}),
        (chat("<img></img><img></img> two"), [IMG_B, IMG_C], {"frequency_penalty": 1.0}),
        (chat("Why? " * 20), [], {"do_sample": True, "top_k": 3, "repetition_penalty": 1.5}),
        (chat("Name a colour."), [], {"do_sample": True, "min_p": 0.3}),
    ]


def test_a_seeded_request_draws_the_same_tokens_anywhere(mm_server, client, tokenizer):
    alone = vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS, do_sample=True, **SEEDED)
    assert alone != vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS, do_sample=True, **{**SEEDED, "seed": 6})
    assert alone != vlmd_generate(mm_server, PROMPT, [], NUM_TOKENS)
    jobs = [(PROMPT, [], {"do_sample": True, **SEEDED})] * 2 + busy_batch()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(lambda job: vlmd_generate(mm_server, job[0], job[1], NUM_TOKENS, **job[2]), jobs)
        )
    assert results[0] == results[1] == alone
    assert completion_text(client, **SEEDED) == tokenizer.decode(alone)
