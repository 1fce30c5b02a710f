"""The whole server on a GPU: KV sized by --mem_fraction, ViT and LM on CUDA, clean shutdown."""

from __future__ import annotations

import base64
import re

import pytest
import requests
import torch

from tests.conftest import make_image, start_server

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tp", [1, 2])
def test_serves_text_and_images_on_cuda(model_dir, tmp_path, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices")
    server = start_server(
        model_dir,
        tmp_path,
        "--enable_multimodal",
        "--mem_fraction",
        "0.5",
        "--device",
        "cuda",
        "--tp",
        str(tp),
    )
    try:
        prompt = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        image = base64.b64encode(make_image(900, 600, seed=1)).decode()
        body = {
            "inputs": prompt,
            "parameters": {"max_new_tokens": 32, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": image}]},
        }
        first = requests.post(server.url + "/generate", json=body, timeout=300)
        second = requests.post(server.url + "/generate", json=body, timeout=300)
        assert first.status_code == 200, first.text
        assert first.json() == second.json() and first.json()["count_output_tokens"] == 32
        text = requests.post(
            server.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 8}}
        )
        assert text.status_code == 200
        log = server.log()
        assert "attention backend: FlashInfer" in log and "captured" in log
        assert all(f"worker{rank} ready" in log for rank in range(tp))
        # The default on GPUs; the demo ViT's head dim (16) is one FlashInfer does not serve.
        assert "ViT attention: torch SDPA (FlashInfer by default, but head_dim 16" in log
        if tp > 1:  # the default: FlashInfer's fused all-reduce + add-RMSNorm
            assert "tp 2: decode-sized all-reduces: fused into the add-RMSNorm" in log
        kv_tokens = int(re.search(r"KV cache (\d+) tokens", log)[1])
        assert kv_tokens > 100_000  # half an H100 holds millions of the demo model's tokens
    finally:
        assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []
