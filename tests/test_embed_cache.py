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
