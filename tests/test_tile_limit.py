"""Per-request tile limits: `max_dynamic_patch` on an image (/generate and OpenAI's `image_url`) and
LightLLM's request-wide `parameters.image_max_patch_num`, through the real server."""

from __future__ import annotations

import asyncio
import copy
import hashlib

import openai
import pytest
import requests
from transformers import GotOcr2ImageProcessorPil

from tests.conftest import make_image
from tests.test_http import PNG, b64, good_request, metrics
from tests.test_parity import IMG_A, NUM_TOKENS, chat, hf_prompt
from vlmd.actors.fetch import ImageFetcher
from vlmd.actors.images import ImageChecker
from vlmd.api import ImageInput
from vlmd.image import IMAGENET_MEAN, IMAGENET_STD, TilingConfig, num_tiles

PROMPT = chat("<img></img>\nWhat is in this picture?")
TOKENS_PER_TILE = 256
# IMG_A is 900 x 600: 3 x 2 tiles + thumbnail by default, 2 x 1 + thumbnail at a limit of 2.
TILES_A, TILES_A_AT_2 = 7, 3


def image(data: bytes, **fields) -> dict:
    return {"type": "base64", "data": b64(data), **fields}


def post(server, images: list[dict], prompt: str = PROMPT, **parameters) -> requests.Response:
    body = {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": NUM_TOKENS,
            "ignore_eos": True,
            "return_details": True,
            **parameters,
        },
        "multimodal_params": {"images": images},
    }
    return requests.post(server.url + "/generate", json=body, timeout=120)


def answer(response: requests.Response) -> tuple[list[int], int]:
    """(generated token ids, prompt tokens) of a successful /generate."""
    assert response.status_code == 200, response.text
    payload = response.json()
    return [t["id"] for t in payload["tokens"]], payload["prompt_tokens"]


def test_tile_limit_gives_transformers_tokens_at_that_limit(mm_server, reference):
    at_2 = copy.copy(reference)  # shares the model; only the processor's max_patches differs
    at_2.processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        size={"height": 448, "width": 448},
        min_patches=1,
        max_patches=2,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    expected = at_2.generate(hf_prompt(PROMPT), [IMG_A])
    limited, limited_prompt = answer(post(mm_server, [image(IMG_A, max_dynamic_patch=2)]))
    unlimited, unlimited_prompt = answer(post(mm_server, [image(IMG_A)]))
    assert limited == expected
    assert unlimited != expected, "the limit must change what the model sees, or this proves little"
    assert unlimited_prompt - limited_prompt == (TILES_A - TILES_A_AT_2) * TOKENS_PER_TILE
    # LightLLM's request-wide limit applies to images without their own; <= 0 means none.
    assert answer(post(mm_server, [image(IMG_A)], image_max_patch_num=2)) == (expected, limited_prompt)
    own = post(mm_server, [image(IMG_A, max_dynamic_patch=12)], image_max_patch_num=2)
    assert answer(own) == (unlimited, unlimited_prompt)
    assert answer(post(mm_server, [image(IMG_A)], image_max_patch_num=0)) == (unlimited, unlimited_prompt)


def test_same_bytes_at_two_limits_are_two_cache_entries(mm_server):
    data = make_image(800, 500, seed=43)  # 1 tile at a limit of 1, 3 x 2 + thumbnail at 6

    def counts() -> tuple[float, float]:
        values = metrics(mm_server)
        return values["vlmd_embed_cache_misses_total"], values["vlmd_embed_cache_hits_total"]

    start = counts()
    first = [answer(post(mm_server, [image(data, max_dynamic_patch=limit)])) for limit in (1, 6)]
    sent_once = counts()
    again = [answer(post(mm_server, [image(data, max_dynamic_patch=limit)])) for limit in (1, 6)]
    sent_twice = counts()
    assert first == again and first[0][1] != first[1][1]
    assert (sent_once[0] - start[0], sent_once[1] - start[1]) == (2, 0)
    assert (sent_twice[0] - sent_once[0], sent_twice[1] - sent_once[1]) == (0, 2)


def test_cache_key_is_the_plain_md5_unless_a_limit_changes_the_tiles():
    data = make_image(800, 500, seed=43)
    server = TilingConfig()  # 12 tiles

    async def check_at(limits):
        checker = ImageChecker(server, ImageFetcher(1.0, 2**20, allow_private=False), 10**8)
        checked = [
            await checker.check(0, ImageInput("base64", b64(data), max_dynamic_patch=n)) for n in limits
        ]
        checker.release(checked)  # the first check preprocessed the image: its tiles are held
        assert len(checker.pixels) == 0
        return checked

    none, at_max, at_1, at_6 = asyncio.run(check_at([None, 12, 1, 6]))
    md5 = hashlib.md5(data).hexdigest()
    assert none.md5 == at_max.md5 == md5 and none.max_tiles == at_max.max_tiles == 0
    assert len({md5, at_1.md5, at_6.md5}) == 3 and (at_1.max_tiles, at_6.max_tiles) == (1, 6)
    assert at_6.num_tiles == num_tiles(800, 500, server.with_max_tiles(6)) == 7 and at_1.num_tiles == 1
    assert at_6.ref("segment", 0, at_6.num_tiles * TOKENS_PER_TILE).max_tiles == 6


@pytest.mark.parametrize(
    ("images", "parameters", "field"),
    [
        ([image(PNG, max_dynamic_patch=0)], {}, "max_dynamic_patch"),
        ([image(PNG, max_dynamic_patch=100)], {}, "max_dynamic_patch"),
        ([image(PNG, max_dynamic_patch="x")], {}, "max_dynamic_patch"),
        ([image(PNG)], {"image_max_patch_num": 100}, "image_max_patch_num"),
        ([image(PNG)], {"image_max_patch_num": "x"}, "image_max_patch_num"),
    ],
)
def test_bad_limit_on_generate_is_a_400_naming_the_field(mm_server, images, parameters, field):
    response = post(mm_server, images, **parameters)
    assert response.status_code == 400 and field in response.json()["error"], response.text
    good_request(mm_server)


# --- OpenAI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(mm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=mm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, data: bytes, **image_url_fields):
    image_url = {"url": "data:image/png;base64," + b64(data), **image_url_fields}
    content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "What is this?"}]
    return client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": content}],
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


def test_openai_image_url_takes_max_dynamic_patch(client, mm_server):
    limited, unlimited = ask(client, IMG_A, max_dynamic_patch=2), ask(client, IMG_A)
    delta = (TILES_A - TILES_A_AT_2) * TOKENS_PER_TILE
    assert unlimited.usage.prompt_tokens - limited.usage.prompt_tokens == delta
    prompt = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    response = post(mm_server, [image(IMG_A, max_dynamic_patch=2)], prompt, max_new_tokens=16)
    assert response.status_code == 200, response.text
    assert limited.choices[0].message.content == response.json()["generated_text"][0]
    assert limited.usage.prompt_tokens == response.json()["prompt_tokens"]


@pytest.mark.parametrize("value", [0, 100, "x"])
def test_bad_max_dynamic_patch_on_openai_is_a_400_naming_it(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, PNG, max_dynamic_patch=value)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert "max_dynamic_patch" in error["message"] and "max_dynamic_patch" in error["param"]
    assert ask(client, PNG).usage.completion_tokens == 16
