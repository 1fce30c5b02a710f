"""Greedy tokens through the real HTTP server equal transformers' generate on the same weights."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from PIL import Image
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

from tests.conftest import MM_FLAGS, make_image, serve_until_done
from tests.test_http import metrics

NUM_TOKENS = 32
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def chat(user: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


IMG_A = make_image(900, 600, seed=1)  # 3 x 2 tiles + thumbnail
IMG_B = make_image(300, 700, seed=2, fmt="JPEG")  # 1 x 2 tiles + thumbnail
IMG_C = make_image(448, 448, seed=3)  # one tile


class Reference:
    """transformers' InternVL in float32, fed exactly as its processor would feed it."""

    def __init__(self, model_dir) -> None:
        self.model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # vlmd's side runs with ignore_eos
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = GotOcr2ImageProcessorPil(
            crop_to_patches=True,
            size={"height": 448, "width": 448},
            min_patches=1,
            max_patches=12,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )

    def inputs(self, prompt: str, images: list[bytes]) -> tuple[torch.Tensor, dict]:
        """(input_ids [1, T], the pixel_values keyword if there are images) as the processor makes
        them: `prompt` marks each image with <IMG_CONTEXT>, as the HF chat template writes it."""
        kwargs = {}
        if images:
            pils = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
            processed = self.processor(images=pils, return_tensors="pt")
            pieces = prompt.split("<IMG_CONTEXT>")
            assert len(pieces) == len(images) + 1
            prompt = pieces[0]
            for n, piece in zip(processed["num_patches"], pieces[1:], strict=True):
                prompt += "<img>" + "<IMG_CONTEXT>" * (256 * int(n)) + "</img>" + piece
            kwargs["pixel_values"] = processed["pixel_values"]
        return self.tokenizer(prompt, return_tensors="pt").input_ids, kwargs

    @torch.inference_mode()
    def generate(self, prompt: str, images: list[bytes], num_tokens: int = NUM_TOKENS, **kwargs) -> list[int]:
        """`prompt` marks each image with <IMG_CONTEXT>, as the HF chat template writes it;
        `kwargs` go to generate() (logits processors)."""
        input_ids, pixels = self.inputs(prompt, images)
        kwargs |= pixels
        out = self.model.generate(
            input_ids, max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, **kwargs
        )
        tokens = out[0, input_ids.shape[1] :].tolist()
        assert len(tokens) == num_tokens
        return tokens


def vlmd_generate(
    server, prompt: str, images: list[bytes], num_tokens: int = NUM_TOKENS, **parameters
) -> list[int]:
    """`parameters`: more of /generate's `parameters` (sampling knobs)."""
    body = {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": num_tokens,
            "ignore_eos": True,
            "return_details": True,
            **parameters,
        },
        "multimodal_params": {
            "images": [{"type": "base64", "data": base64.b64encode(d).decode()} for d in images]
        },
    }
    response = requests.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    tokens = [t["id"] for t in payload["tokens"]]
    assert payload["count_output_tokens"] == len(tokens) == num_tokens
    return tokens


# (vlmd prompt, the same prompt with HF placeholders, images)
CASES = {
    "text": (chat("Tell me a story about a red fox."), None, []),
    "one_image": (chat("<img></img>\nWhat is in this picture?"), None, [IMG_A]),
    "two_images": (chat("<img></img>\n<image>\nCompare these two images."), None, [IMG_A, IMG_B]),
}


def hf_prompt(prompt: str) -> str:
    return prompt.replace("<img></img>", "<IMG_CONTEXT>").replace("<image>", "<IMG_CONTEXT>")


@pytest.fixture(params=["process", "worker"], ids=lambda placement: f"vit_in_{placement}")
def placed_server(request):
    """The multimodal server with each --vit_placement: the ViT in a vision process of its own,
    or in the LM worker's process on a thread (and on a GPU a stream) of its own."""
    return request.getfixturevalue("mm_server" if request.param == "process" else "mm_worker_server")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(placed_server, reference, case):
    prompt, _, images = CASES[case]
    expected = reference.generate(hf_prompt(prompt), images)
    assert len(set(expected)) >= 8, "the test model must not repeat itself, or this test proves little"
    assert vlmd_generate(placed_server, prompt, images) == expected


@pytest.fixture(scope="module")
def sliced_server(model_dir, tmp_path_factory):
    """The ViT in the LM worker, encoding one tile per decode step while steps run."""
    flags = (*MM_FLAGS, "--vit_placement", "worker", "--vit_step_tiles", "1")
    yield from serve_until_done(model_dir, tmp_path_factory, *flags)


def test_vit_between_steps_gives_the_same_tokens(sliced_server, reference):
    """--vit_step_tiles 1: images encoded a tile per step while long text answers decode still
    give transformers' tokens, text and images alike, and are encoded while the text decodes (the
    ViT takes its turns between steps; it does not wait for the steps to end)."""
    # Long past the images: 400 tokens each raced their encoding (about 1 s on 2 cores) and lost.
    long_text = [(chat(f"Text {i}: count slowly."), [], 1200) for i in range(2)]
    with_images = [
        (chat("<img></img> Describe."), [IMG_A], 16),
        (chat("<img></img><img></img> two"), [IMG_B, IMG_C], 16),
    ]
    expected = [reference.generate(hf_prompt(p), imgs, n) for p, imgs, n in long_text + with_images]
    with ThreadPoolExecutor(4) as pool:
        text = [pool.submit(vlmd_generate, sliced_server, *r) for r in long_text]
        time.sleep(0.5)  # the text decoding when the images come
        encoded = metrics(sliced_server).get("vlmd_vit_images_total", 0)
        images = [pool.submit(vlmd_generate, sliced_server, *r) for r in with_images]
        deadline = time.monotonic() + 60
        while metrics(sliced_server).get("vlmd_vit_images_total", 0) < encoded + 3:
            assert time.monotonic() < deadline, "the images were never encoded"
            time.sleep(0.05)
        assert not any(future.done() for future in text), "the ViT waited for the text to end"
        got = [future.result() for future in text + images]
    assert got == expected


@pytest.fixture(scope="module")
def capped_server(model_dir, tmp_path_factory):
    """At most 8 prompt tokens in a step where requests decode."""
    flags = (*MM_FLAGS, "--decode_step_prefill_tokens", "8")
    yield from serve_until_done(model_dir, tmp_path_factory, *flags)


def test_prompts_prefilled_8_tokens_a_step_beside_decoding_give_the_same_tokens(capped_server, reference):
    """--decode_step_prefill_tokens 8: prompts with images that arrive while text decodes are
    prefilled 8 tokens a step (chunk boundaries inside the images' rows) and still give
    transformers' tokens, as do the decoding requests."""
    long_text = [(chat(f"Text {i}: count slowly."), [], 200) for i in range(2)]
    with_images = [
        (chat("<img></img> Describe."), [IMG_A], 16),
        (chat("<img></img><img></img> two"), [IMG_B, IMG_C], 16),
    ]
    expected = [reference.generate(hf_prompt(p), imgs, n) for p, imgs, n in long_text + with_images]
    capped_before = metrics(capped_server).get("vlmd_decode_steps_prefill_capped_total", 0)
    with ThreadPoolExecutor(4) as pool:
        text = [pool.submit(vlmd_generate, capped_server, *r) for r in long_text]
        time.sleep(0.5)  # the text decoding when the images come
        images = [pool.submit(vlmd_generate, capped_server, *r) for r in with_images]
        got = [future.result() for future in text + images]
    assert got == expected
    # The image prompts (about 130 tokens together) went in chunks held to 8 (16 steps seen).
    assert metrics(capped_server)["vlmd_decode_steps_prefill_capped_total"] - capped_before >= 10


@pytest.fixture(scope="module")
def side_server(model_dir, tmp_path_factory):
    """Prompt chunks beside decode rows in side steps (--prefill_sms; on the CPU they run in turn
    with the decode steps), at most 256 tokens a step: an image prompt takes several side steps."""
    flags = (*MM_FLAGS, "--prefill_sms", "8", "--max_num_batched_tokens", "256")
    yield from serve_until_done(model_dir, tmp_path_factory, *flags)


def test_prompts_prefilled_in_side_steps_beside_decoding_give_the_same_tokens(side_server, reference):
    """--prefill_sms: prompts with images that arrive while text decodes are prefilled in side
    steps, chunk after chunk, and give transformers' tokens, as do the decoding requests; a
    seeded sampled request gives the tokens it gives alone."""
    long_text = [(chat(f"Text {i}: count slowly."), [], 400) for i in range(2)]
    with_images = [
        (chat("<img></img> Describe."), [IMG_A], 16),
        (chat("<img></img><img></img> two"), [IMG_B, IMG_C], 16),
    ]
    sampled = (chat("Tell me a story."), [], 24)
    knobs = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 11}
    expected = [reference.generate(hf_prompt(p), imgs, n) for p, imgs, n in long_text + with_images]
    sampled_alone = vlmd_generate(side_server, *sampled, **knobs)
    # The images' embeddings cached first (other prompts: no KV to reuse), so that their prompts
    # are ready while the text decodes (a CPU ViT would take longer than the text).
    for _, images, _ in with_images:
        vlmd_generate(side_server, chat("First, a warm-up. <img></img>" * len(images)), images, 1)
    before = metrics(side_server).get("vlmd_side_steps_total", 0)
    with ThreadPoolExecutor(5) as pool:
        text = [pool.submit(vlmd_generate, side_server, *r) for r in long_text]
        time.sleep(0.5)  # the text decoding when the images come
        images = [pool.submit(vlmd_generate, side_server, *r) for r in with_images]
        beside = pool.submit(vlmd_generate, side_server, *sampled, **knobs)
        got_images = [future.result() for future in images]
        assert not any(future.done() for future in text), "the text ended before the images' prompts"
        got = [future.result() for future in text] + got_images
        assert beside.result() == sampled_alone
    assert got == expected
    # The image prompts (2,816 image rows together) went in side steps of at most 256 tokens.
    assert metrics(side_server)["vlmd_side_steps_total"] - before >= 2816 // 256


def test_a_client_gone_while_its_prompt_is_in_a_side_step_leaves_nothing_held(side_server):
    """An image request whose client disconnects while its prompt is being prefilled in side
    steps: its pages are released once the side step in flight has returned, the text decoding
    meanwhile is answered, and the server keeps serving with no page, pin or request held."""
    import json
    import socket

    from tests.test_stream import assert_aborted_and_serving

    host, port = side_server.url.removeprefix("http://").split(":")
    # An image no other test sends, its embeddings cached first under another prompt (nothing of
    # this prompt's KV is cached), so that its prompt is ready while the text decodes.
    prompt, images = chat("<img></img> Describe at length."), [make_image(900, 600, seed=7)]
    vlmd_generate(side_server, chat("First, a warm-up. <img></img>"), images, 1)
    body = json.dumps(
        {
            "inputs": prompt,
            "parameters": {"max_new_tokens": 64},
            "multimodal_params": {
                "images": [{"type": "base64", "data": base64.b64encode(d).decode()} for d in images]
            },
        }
    ).encode()
    head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with ThreadPoolExecutor(1) as pool:
        text = pool.submit(vlmd_generate, side_server, chat("Keep counting."), [], 400)
        time.sleep(0.5)  # the text decoding
        before = metrics(side_server).get("vlmd_side_steps_total", 0)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body)
            deadline = time.monotonic() + 30
            while metrics(side_server).get("vlmd_side_steps_total", 0) < before + 2:  # its prompt started
                assert time.monotonic() < deadline, "the image prompt never reached a side step"
                time.sleep(0.02)
        assert len(text.result()) == 400
    assert_aborted_and_serving(side_server)
    assert metrics(side_server)["vlmd_embed_cache_pinned_images"] == 0


def test_concurrent_requests_match_one_at_a_time(placed_server, reference):
    requests_ = [
        (chat("Hi."), [], 32),
        (chat("<img></img> Describe."), [IMG_C], 33),
        (chat("A much longer question about several things: " + "why, " * 30 + "and how?"), [], 40),
        (chat("<img></img><img></img> two"), [IMG_B, IMG_C], 34),
        (chat("<IMG_CONTEXT>\nwhat?"), [IMG_A], 35),
        (chat("Count to ten."), [], 36),
        (chat("<image> and text after the image"), [IMG_B], 37),
        (chat("<img></img>"), [IMG_C], 38),
    ]
    expected = [reference.generate(hf_prompt(p), imgs, n) for p, imgs, n in requests_]
    with ThreadPoolExecutor(len(requests_)) as pool:
        got = list(pool.map(lambda r: vlmd_generate(placed_server, *r), requests_))
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"request {i} differs when batched"


def test_comparison_catches_dropped_swapped_and_shifted_images(mm_server, reference):
    """If vlmd dropped, swapped or shifted an image, the parity tests above would fail."""
    prompt = chat("<img></img>\n<img></img>\nCompare these two images.")
    original = reference.generate(hf_prompt(prompt), [IMG_A, IMG_B])
    dropped = reference.generate(hf_prompt(chat("<img></img>\nCompare these two images.")), [IMG_A])
    swapped = reference.generate(hf_prompt(prompt), [IMG_B, IMG_A])
    shifted_prompt = chat("\n<img></img><img></img>\nCompare these two images.")
    shifted = reference.generate(hf_prompt(shifted_prompt), [IMG_A, IMG_B])
    assert len({tuple(original), tuple(dropped), tuple(swapped), tuple(shifted)}) == 4
    assert vlmd_generate(mm_server, prompt, [IMG_A, IMG_B]) == original
    assert vlmd_generate(mm_server, prompt, [IMG_B, IMG_A]) == swapped
    assert vlmd_generate(mm_server, shifted_prompt, [IMG_A, IMG_B]) == shifted
