"""The limits that protect the server: each gives its 4xx (or 503 with Retry-After) naming the
flag, and the server goes on serving."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import requests
from PIL import Image

from tests.conftest import make_image, start_server
from tests.test_http import chat_body, generate, metrics
from tests.test_image_fetch import host  # noqa: F401 (a fixture: an image host on loopback)
from vlmd.image import fit_within

MAX_PIXELS = 300_000
MAX_IMAGE_BYTES = 2 * 2**20
FETCH_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def limited_server(model_dir, tmp_path_factory):
    server = start_server(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "--enable_multimodal",
        "--max_images_per_request",
        "2",
        "--max_image_pixels",
        str(MAX_PIXELS),
        "--max_queued_requests",
        "1",
        "--max_running_requests",
        "1",
        "--max_image_bytes",
        str(MAX_IMAGE_BYTES),
        "--allow_private_image_urls",  # the test's slow image host is on loopback
        "--image_fetch_timeout",
        str(FETCH_TIMEOUT_S),
    )
    yield server
    assert server.stop() == 0, server.log()


def image_body(images: list[bytes], max_new_tokens: int = 6, **image_fields) -> dict:
    body = chat_body(
        "<img></img>" * len(images) + " describe", max_new_tokens=max_new_tokens, ignore_eos=True
    )
    body["multimodal_params"] = {
        "images": [{"type": "base64", "data": base64.b64encode(i).decode(), **image_fields} for i in images]
    }
    return body


def token_ids(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["tokens"]]


def test_too_many_images(limited_server):
    small = [make_image(300, 200, seed=seed) for seed in (80, 81, 82)]
    response = generate(limited_server, image_body(small))
    assert response.status_code == 400
    assert "--max_images_per_request allows at most 2" in response.json()["error"]
    assert len(token_ids(generate(limited_server, image_body(small[:2])))) == 6


def test_image_over_max_pixels_is_refused_unless_resize_to_fit(limited_server):
    large = make_image(800, 600, seed=83)  # 480,000 pixels
    response = generate(limited_server, image_body([large]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert f"--max_image_pixels allows {MAX_PIXELS}" in error and "resize_to_fit" in error
    assert len(token_ids(generate(limited_server, image_body([make_image(500, 400, seed=84)])))) == 6

    resized = token_ids(generate(limited_server, image_body([large], resize_to_fit=True)))
    # The same downscale done by the client: what the README promises resize_to_fit does.
    size = fit_within(800, 600, MAX_PIXELS)
    assert size == (632, 474)

    def client_side(resample: Image.Resampling) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(large)).convert("RGB").resize(size, resample).save(out, "PNG")
        return out.getvalue()

    assert token_ids(generate(limited_server, image_body([client_side(Image.Resampling.BICUBIC)]))) == resized
    # The model does see such pixel differences: another filter gives other tokens.
    assert token_ids(generate(limited_server, image_body([client_side(Image.Resampling.NEAREST)]))) != resized
    # Sent again, the resized image is an embed-cache hit under its own key.
    assert token_ids(generate(limited_server, image_body([large], resize_to_fit=True))) == resized


def test_image_over_max_image_bytes_is_refused(limited_server):
    """Counted before the image is decoded (this one is also over --max_image_pixels)."""
    big = make_image(1200, 1200, seed=85)  # noise: about 3.8 MB as PNG
    assert len(big) > MAX_IMAGE_BYTES
    response = generate(limited_server, image_body([big]))
    assert response.status_code == 400
    assert f"has {len(big)} bytes; --max_image_bytes allows {MAX_IMAGE_BYTES}" in response.json()["error"]
    assert len(token_ids(generate(limited_server, image_body([make_image(300, 200, seed=86)])))) == 6


def queued(server, body: dict) -> tuple[list[requests.Response], threading.Thread]:
    """`body` sent from a thread, returned once it holds the one place of the queue; its response
    lands in the list when the thread ends."""
    response: list[requests.Response] = []
    thread = threading.Thread(target=lambda: response.append(generate(server, body)))
    thread.start()
    deadline = time.monotonic() + 10
    while metrics(server)["vlmd_requests_queued"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(server)["vlmd_requests_queued"] == 1
    return response, thread


def test_full_queue_is_503_with_retry_after(limited_server):
    """One request runs (--max_running_requests 1), one waits for its first token: a third is refused."""
    long_body = chat_body("a long answer please", max_new_tokens=3000, ignore_eos=True)
    with requests.post(
        limited_server.url + "/generate_stream", json=long_body, stream=True, timeout=60
    ) as running:
        lines = running.iter_lines()
        assert any(next(lines).startswith(b"data:") for _ in range(4))
        waiting, thread = queued(limited_server, chat_body("queued", max_new_tokens=2))
        refused = generate(limited_server, chat_body("one too many", max_new_tokens=2))
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "--max_queued_requests" in refused.json()["error"]
        refused_stream = requests.post(limited_server.url + "/generate_stream", json=long_body, timeout=30)
        assert refused_stream.status_code == 503 and refused_stream.headers["Retry-After"] == "1"
    thread.join(60)  # the stream closed: the long request is aborted and the queued one runs
    assert waiting[0].status_code == 200, waiting[0].text
    assert generate(limited_server, chat_body("hello", max_new_tokens=2)).status_code == 200
    assert metrics(limited_server)["vlmd_requests_queued"] == 0


def test_a_request_fetching_its_image_holds_its_place_in_the_queue(limited_server, host):  # noqa: F811
    """The image host sends a byte every 0.1 s: the request waits for it until --image_fetch_timeout,
    holding the one place of --max_queued_requests, so a request that comes meanwhile is a 503
    at once (not after the fetch, nor let through to fetch beside it)."""
    body = chat_body("<img></img> describe", max_new_tokens=2)
    body["multimodal_params"] = {"images": [{"type": "url", "data": host + "/trickle"}]}
    fetching, thread = queued(limited_server, body)
    refused = generate(limited_server, chat_body("meanwhile", max_new_tokens=2))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"] == (
        "the server has 1 requests waiting for their first token, --max_queued_requests allows 1; retry later"
    )
    thread.join(FETCH_TIMEOUT_S + 30)
    assert fetching[0].status_code == 400 and "--image_fetch_timeout" in fetching[0].json()["error"], (
        fetching[0].text
    )
    assert metrics(limited_server)["vlmd_requests_queued"] == 0
    assert generate(limited_server, chat_body("after", max_new_tokens=2)).status_code == 200


def test_more_completions_than_the_queue_holds_is_a_400_not_a_retry(limited_server):
    body = {"prompt": ["one", "two"], "max_tokens": 2}
    response = requests.post(limited_server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "Retry-After" not in response.headers
    assert (
        "asks for 2 completions at once; --max_queued_requests allows 1"
        in response.json()["error"]["message"]
    )
    response = requests.post(
        limited_server.url + "/v1/completions", json={**body, "prompt": "one"}, timeout=60
    )
    assert response.status_code == 200
    assert metrics(limited_server)["vlmd_requests_queued"] == 0


def test_limits_and_their_defaults_are_in_serve_help():
    import subprocess
    import sys

    help_text = subprocess.run(
        [sys.executable, "-m", "vlmd", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(help_text.split())
    assert "--max_images_per_request" in flat and "(default: 16)" in flat
    assert "--max_image_pixels" in flat and "(default: 50000000)" in flat
    assert "--max_queued_requests" in flat and "(default: 1024)" in flat
    assert "--max_image_bytes" in flat and f"(default: {32 * 2**20})" in flat
    assert "--image_fetch_timeout" in flat and "(default: 10.0)" in flat
    assert "--client_timeout" in flat and "(default: 30.0)" in flat
    assert "--allow_private_image_urls" in flat
