"""The MD5 embedding cache through a real server: LRU bounded by --cache_capacity."""

from __future__ import annotations

import base64

import requests

from tests.conftest import make_image, start_server
from tests.test_http import GOOD_PROMPT, metrics


def test_lru_evicts_beyond_cache_capacity(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--cache_capacity", "2")
    images = {name: make_image(460, 460, seed=seed) for seed, name in enumerate("ABC", start=40)}

    def send(name: str) -> None:
        body = {
            "inputs": GOOD_PROMPT,
            "parameters": {"max_new_tokens": 2},
            "multimodal_params": {
                "images": [{"type": "base64", "data": base64.b64encode(images[name]).decode()}]
            },
        }
        assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200

    try:
        # A B A: one hit. C evicts the least recently used (B), so A hits and B misses again.
        for name in "ABACAB":
            send(name)
        values = metrics(server)
    finally:
        assert server.stop() == 0
    assert values["vlmd_embed_cache_misses_total"] == 4  # A, B, C, B
    assert values["vlmd_embed_cache_hits_total"] == 2  # A, A
    assert values["vlmd_vit_images_total"] == 4
    assert values["vlmd_embed_cache_evictions_total"] == 2  # B for C, then C for B


def test_full_cache_waits_for_pins_instead_of_failing(model_dir, tmp_path):
    """With room for one image, a second request's image waits until the first request ends."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(model_dir, tmp_path, "--enable_multimodal", "--cache_capacity", "1")
    images = [base64.b64encode(make_image(460, 460, seed=seed)).decode() for seed in (60, 61)]

    def send(image: str, max_new_tokens: int, images_in_prompt: int = 1) -> requests.Response:
        body = {
            "inputs": "<img></img>" * images_in_prompt + " describe",
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": image}] * images_in_prompt},
        }
        return requests.post(server.url + "/generate", json=body, timeout=120)

    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(send, images[0], 300)
            second = pool.submit(send, images[1], 4)
            assert first.result().status_code == 200 and second.result().status_code == 200
        values = metrics(server)
        two_distinct = {
            "inputs": "<img></img><img></img>",
            "multimodal_params": {"images": [{"type": "base64", "data": image} for image in images]},
        }
        refused = requests.post(server.url + "/generate", json=two_distinct, timeout=60)
    finally:
        assert server.stop() == 0
    assert values["vlmd_vit_images_total"] == 2
    assert refused.status_code == 400 and "--cache_capacity" in refused.json()["error"]
