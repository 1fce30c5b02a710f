"""The whole server on a GPU: KV sized by --mem_fraction, ViT and LM on CUDA, clean shutdown."""

from __future__ import annotations

import base64
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.conftest import make_image, start_server
from tests.test_http import metrics

pytestmark = pytest.mark.gpu


def _cuda_server(model_dir, tmp_path, *flags: str):
    """The demo model served with images on CUDA, in half the device's memory."""
    return start_server(
        model_dir, tmp_path, "--enable_multimodal", "--mem_fraction", "0.5", "--device", "cuda", *flags
    )


@pytest.mark.parametrize("tp", [1, 2])
def test_serves_text_and_images_on_cuda(model_dir, tmp_path, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA devices")
    server = _cuda_server(model_dir, tmp_path, "--tp", str(tp))
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


def _image_answers_alone_and_beside_text(server) -> None:
    """An image request answers alike alone before and after a batch of three image and three
    text requests (its rows from the embedding cache the second time); all of them are answered.
    Not the batch's answer: a bf16 step at another batch size runs other GEMM kernels, and random
    weights' near-ties then flip a token (seen once at token 19). With the prefix cache off, both
    alone runs compute the same steps."""
    prompt = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    images = [base64.b64encode(make_image(900, 600, seed=seed)).decode() for seed in (1, 2, 3)]
    bodies = [
        {
            "inputs": prompt,
            "parameters": {"max_new_tokens": 32, "ignore_eos": True},
            "multimodal_params": {"images": [{"type": "base64", "data": image}]},
        }
        for image in images
    ]
    bodies += [
        {"inputs": f"hello {i}", "parameters": {"max_new_tokens": 64, "ignore_eos": True}} for i in range(3)
    ]
    alone = requests.post(server.url + "/generate", json=bodies[0], timeout=300)
    assert alone.status_code == 200, alone.text
    with ThreadPoolExecutor(len(bodies)) as pool:
        first = list(
            pool.map(lambda body: requests.post(server.url + "/generate", json=body, timeout=300), bodies)
        )
    assert all(response.status_code == 200 for response in first), [r.text for r in first]
    again = requests.post(server.url + "/generate", json=bodies[0], timeout=300)
    assert again.json() == alone.json() and again.json()["count_output_tokens"] == 32


def test_vit_in_the_worker_queues_on_a_stream_of_least_priority(model_dir, tmp_path):
    """--vit_placement worker: images and text served side by side, the worker's thread queuing
    decode steps on a stream of the device's greatest priority and the ViT's thread on one of the
    least; no vision process but the front, and the ViT's start-up phases in the worker's line."""
    server = _cuda_server(model_dir, tmp_path, "--vit_placement", "worker", "--disable_prefix_cache")
    try:
        _image_answers_alone_and_beside_text(server)
        log = server.log()
        streams = re.search(
            r"rank 0: decode steps on a CUDA stream of priority (-?\d+), the ViT on one of priority "
            r"(-?\d+) \(greatest (-?\d+), least (-?\d+)\)",
            log,
        )
        assert streams, log
        decode, vit, greatest, least = map(int, streams.groups())
        assert greatest < least and (decode, vit) == (greatest, least)
        assert "vision CUDA graphs" in log and "captured" in log
        worker = next(line for line in log.splitlines() if "worker0 ready" in line)
        assert all(phase in worker for phase in ("ViT weights", "ViT largest batch", "ViT CUDA graphs")), (
            worker
        )
        assert server.actor_roles()["vision"] == 1
        assert int(re.search(r"KV cache (\d+) tokens", log)[1]) > 100_000
    finally:
        assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []


def test_vit_on_a_green_context_of_some_sms(model_dir, tmp_path):
    """--vit_sms: the worker's ViT on a CUDA green context of 32 SMs serves images beside text as
    the ViT on a stream of its own does, and the worker's log says where it runs."""
    green_context = getattr(torch.cuda, "GreenContext", None)
    if green_context is None or not hasattr(green_context, "Stream"):
        pytest.skip(f"torch {torch.__version__} has no CUDA green-context streams")
    flags = ("--vit_placement", "worker", "--vit_sms", "32", "--disable_prefix_cache")
    server = _cuda_server(model_dir, tmp_path, *flags)
    try:
        _image_answers_alone_and_beside_text(server)
        log = server.log()
        assert "the ViT on one of priority" in log and ", on a green context of 32 SMs" in log
        assert "vision CUDA graphs" in log  # captured on the green context's stream
    finally:
        assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []


def test_prompts_in_side_steps_on_a_green_context(model_dir, tmp_path):
    """--prefill_sms: image prompts that arrive one by one while text decodes run in side steps on
    a green context of 32 SMs beside the decode steps, and each gives the first token and logprob
    it gives alone (prefilled in a step of its own on the whole GPU: the same kernels over the
    same rows); the text goes on decoding meanwhile."""
    green_context = getattr(torch.cuda, "GreenContext", None)
    if green_context is None or not hasattr(green_context, "Stream"):
        pytest.skip(f"torch {torch.__version__} has no CUDA green-context streams")
    server = _cuda_server(model_dir, tmp_path, "--prefill_sms", "32", "--disable_prefix_cache")
    try:
        prompt = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        bodies = [
            {
                "inputs": prompt,
                "parameters": {"max_new_tokens": 1, "return_details": True},
                "multimodal_params": {
                    "images": [
                        {"type": "base64", "data": base64.b64encode(make_image(900, 600, seed=s)).decode()}
                    ]
                },
            }
            for s in (1, 2, 3)
        ]
        generate = lambda body: requests.post(server.url + "/generate", json=body, timeout=300)  # noqa: E731
        alone = [generate(body).json() for body in bodies]  # their embeddings cached, too
        text = {"inputs": "hello", "parameters": {"max_new_tokens": 4000, "ignore_eos": True}}
        with ThreadPoolExecutor(1) as pool:
            decoding = pool.submit(generate, text)
            time.sleep(0.5)  # the text decoding
            before = metrics(server).get("vlmd_side_steps_total", 0)
            beside = [generate(body).json() for body in bodies]
            assert not decoding.done(), "the text ended before the images came"
            assert metrics(server)["vlmd_side_steps_total"] - before >= len(bodies)
            assert decoding.result().status_code == 200
        assert beside == alone
        assert "side steps (prompt chunks beside decode steps) on a green context of 32 SMs" in server.log()
    finally:
        assert server.stop() == 0
    assert server.actor_pids() == [] and server.shm_segments() == []
