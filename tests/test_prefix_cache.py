"""The prefix cache through the real server: what is reused (hit tokens from /metrics, cached
tokens in OpenAI usage), what never is (another image, another tile limit), eviction, and that the
tokens always equal those of a server that computes every prompt whole."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import make_image, start_server
from tests.test_metrics import scrape
from vlmd.actors.tokenizer import PromptBuilder
from vlmd.image import TilingConfig, num_tiles

PAGE = 16  # the server's --page_size
SYSTEM = "<|im_start|>system\nYou are a helpful assistant. " + "Answer with care. " * 12 + "<|im_end|>\n"
IMG_1 = make_image(900, 600, seed=21)  # 3 x 2 tiles + thumbnail
IMG_2 = make_image(900, 600, seed=22)  # same size, other pixels


@pytest.fixture(scope="module")
def cached(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("logs"), "--enable_multimodal")
    yield server
    assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.fixture(scope="module")
def cold(model_dir, tmp_path_factory):
    server = start_server(
        model_dir, tmp_path_factory.mktemp("logs"), "--enable_multimodal", "--disable_prefix_cache"
    )
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def builder(model_dir):
    return PromptBuilder(str(model_dir), 256)


def generate(
    server, prompt: str, images: list[tuple[bytes, int | None]] = (), num_tokens: int = 12
) -> list[int]:
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": num_tokens, "ignore_eos": True, "return_details": True},
        "multimodal_params": {
            "images": [
                {"type": "base64", "data": base64.b64encode(data).decode(), "max_dynamic_patch": limit}
                for data, limit in images
            ]
        },
    }
    response = requests.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"]]


def counter(server, name: str) -> float:
    return next(iter(scrape(server)[name].values()))


def hit_tokens_of(server, fn):
    """(what fn returns, the prefix-cache hit tokens it added)."""
    before = counter(server, "vlmd_prefix_cache_hit_tokens")
    out = fn()
    return out, counter(server, "vlmd_prefix_cache_hit_tokens") - before


def expected_hit(previous: list[int], prompt: list[int]) -> int:
    """Tokens a prompt finds cached after `previous` (a prompt and its computed output): whole
    pages of their common prefix, leaving at least the prompt's last token to compute."""
    common = next((i for i, (a, b) in enumerate(zip(previous, prompt, strict=False)) if a != b), len(prompt))
    common = min(common, len(previous), len(prompt) - 1)
    return common // PAGE * PAGE


def tiles(limit: int | None = None) -> int:
    cfg = TilingConfig() if limit is None else TilingConfig().with_max_tiles(limit)
    return num_tiles(900, 600, cfg)


def test_three_turn_chat_prefills_only_its_new_tokens(cached, cold, builder):
    """Each turn sends the whole chat again, image included: turns 2 and 3 find everything up to
    where they differ from the last turn's prompt and answer, and answer as a cold server does."""
    history = (
        SYSTEM + "<|im_start|>user\n<img></img>\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    )
    computed: list[int] = []  # the last turn's prompt and the output whose KV was computed
    for turn, question in enumerate(["", "And the colours?", "Describe it again, briefly."]):
        if question:
            history += f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids, _ = builder.build(history, [tiles()])
        tokens, hit = hit_tokens_of(cached, lambda h=history: generate(cached, h, [(IMG_1, None)]))
        assert tokens == generate(cold, history, [(IMG_1, None)]), f"turn {turn + 1}"
        assert hit == expected_hit(computed, prompt_ids), f"turn {turn + 1}"
        if turn:
            assert hit >= 256 * tiles() + len(builder.build(SYSTEM, [])[0]) // PAGE * PAGE  # image reused
            assert len(prompt_ids) - hit < 3 * PAGE + len(builder.tokenizer.encode(question)) + 40
        computed = prompt_ids + tokens[:-1]  # the last token was sampled, never fed back
        history += builder.decode(tokens)


def test_another_image_shares_no_image_page(cached, reference, builder):
    """Same text, another image: only the pages before the image are reused, and each request
    gives its own reference tokens."""
    prompt = SYSTEM + "<|im_start|>user\n<img></img>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
    first = generate(cached, prompt, [(IMG_1, None)])
    second, hit = hit_tokens_of(cached, lambda: generate(cached, prompt, [(IMG_2, None)]))
    image_start = builder.build(prompt, [tiles()])[1][0].token_offset
    assert hit == image_start // PAGE * PAGE, "pages holding image positions were shared"
    hf_prompt = prompt.replace("<img></img>", "<IMG_CONTEXT>")
    assert first == reference.generate(hf_prompt, [IMG_1], 12)
    assert second == reference.generate(hf_prompt, [IMG_2], 12)


def test_the_same_image_at_two_tile_limits_is_two_entries(cached, cold, builder):
    prompt = "<|im_start|>user\nA long question before the picture. " * 3 + "<img></img>\nWhat?<|im_end|>\n"
    generate(cached, prompt, [(IMG_1, 2)])
    at_six, hit = hit_tokens_of(cached, lambda: generate(cached, prompt, [(IMG_1, 6)]))
    image_start = builder.build(prompt, [tiles(6)])[1][0].token_offset
    assert hit == image_start // PAGE * PAGE
    assert at_six == generate(cold, prompt, [(IMG_1, 6)])
    _, again = hit_tokens_of(cached, lambda: generate(cached, prompt, [(IMG_1, 2)]))
    assert again == (len(builder.build(prompt, [tiles(2)])[0]) - 1) // PAGE * PAGE  # all but the last


def test_concurrent_requests_share_a_system_prompt(cached, cold, builder):
    questions = [f"Question number {i}: what do you see?" for i in range(8)]
    prompts = [SYSTEM + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    generate(cached, prompts[0])  # the system prompt is cached from here on
    with ThreadPoolExecutor(8) as pool:
        got, hit = hit_tokens_of(cached, lambda: list(pool.map(lambda p: generate(cached, p), prompts)))
    system_pages = len(builder.build(SYSTEM, [])[0]) // PAGE
    assert hit >= 8 * system_pages * PAGE
    assert got == [generate(cold, p) for p in prompts]


def test_usage_reports_cached_tokens(cached, builder):
    body = {
        "model": "demo",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there!"}],
        "max_tokens": 4,
    }
    first = requests.post(cached.url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
    second = requests.post(cached.url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"]
    assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // PAGE * PAGE
    assert first["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens_details"]["cached_tokens"]
    # n choices share their prompt: it counts once in prompt_tokens, and so in cached_tokens.
    body["messages"][1]["content"] = "Something else entirely, and at some length, to be computed once."
    for _ in range(2):
        usage = requests.post(cached.url + "/v1/chat/completions", json={**body, "n": 4}, timeout=60).json()[
            "usage"
        ]
        assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"] - 1
    assert usage["prompt_tokens_details"]["cached_tokens"] == (usage["prompt_tokens"] - 1) // PAGE * PAGE


def test_eviction_under_a_small_pool(model_dir, tmp_path, cold):
    """A pool of 40 pages: prompts of ~12 pages each evict the oldest cached ones; answers stay
    those of a cold server, the newest prompt is still cached, the first one no more."""
    server = start_server(model_dir, tmp_path, "--max_total_token_num", "640")
    try:
        prompts = [
            f"<|im_start|>user\nTopic {i}: " + f"tell me about the number {i}. " * 25 for i in range(6)
        ]
        for prompt in prompts:
            assert generate(server, prompt) == generate(cold, prompt)
        assert counter(server, "vlmd_prefix_cache_evicted_pages") > 0
        _, last_hit = hit_tokens_of(server, lambda: generate(server, prompts[-1]))
        _, first_hit = hit_tokens_of(server, lambda: generate(server, prompts[0]))
        assert last_hit > 8 * PAGE and first_hit == 0
        families = scrape(server)
        assert next(iter(families["vlmd_kv_pages_used"].values())) == 0
        assert next(iter(families["vlmd_kv_pages_cached"].values())) <= 40
    finally:
        assert server.stop() == 0, server.log()
    assert "AssertionError" not in server.log()  # the idle integrity check never failed


def test_preemption_with_a_pool_a_tenth_of_the_declared_lengths(model_dir, tmp_path, cold):
    """32 concurrent requests of 24 + 96 declared tokens over a pool of 384 tokens (a tenth of
    32 x 120): all finish with a cold, unconstrained server's tokens, some are preempted on the
    way, more run at once than their declared lengths would allow, and nothing is left held."""
    server = start_server(model_dir, tmp_path, "--max_total_token_num", "384")
    prompts = [f"<|im_start|>user\nRequest {i}: count the apples.<|im_end|>\n" for i in range(32)]
    running: list[float] = []
    try:
        with ThreadPoolExecutor(33) as pool:
            futures = [pool.submit(generate, server, p, (), 96) for p in prompts]
            while not all(f.done() for f in futures):
                running.append(next(iter(scrape(server)["vlmd_requests_running"].values())))
            got = [f.result() for f in futures]
        assert got == [generate(cold, p, (), 96) for p in prompts]
        families = scrape(server)
        assert next(iter(families["vlmd_preemptions"].values())) > 0
        assert next(iter(families["vlmd_kv_pages_used"].values())) == 0
        assert max(running) > 384 // 120, "admission still reserves whole declared lengths"
    finally:
        assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []
    assert "AssertionError" not in server.log()  # the idle integrity check never failed
