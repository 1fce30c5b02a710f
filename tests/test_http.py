"""The HTTP API against a real server: the seed's client, the embed cache, every bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import free_port, make_image, start_server

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seed" / "lightllm-multimodal.rst"
SEED_CLIENT_COPY = Path(__file__).with_name("seed_client.py")
GOOD_PROMPT = "<|im_start|>user\n<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
PNG = make_image(500, 300, seed=11)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def generate(server, body, **kw) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, timeout=60, **kw)


def good_request(server) -> None:
    body = {
        "inputs": GOOD_PROMPT,
        "parameters": {"max_new_tokens": 4},
        "multimodal_params": {"images": [{"type": "base64", "data": b64(PNG)}]},
    }
    response = generate(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["count_output_tokens"] >= 1


def metrics(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(vlmd_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            values[match[1] + (match[2] or "")] = float(match[3])
    return values


# --- the seed document's client ----------------------------------------------------------------


def seed_client_source() -> str:
    """The client script of the user's reference document, as written there."""
    if SEED_DOC.exists():
        doc = SEED_DOC.read_text()
        block = doc.split(".. code-block:: python", 1)[1]
        lines = [line[4:] for line in block.splitlines()[1:] if line.startswith("    ") or not line.strip()]
        return "\n".join(lines)
    return SEED_CLIENT_COPY.read_text()


def test_seed_client_script_gets_200_and_text(mm_server, tmp_path):
    image_path = tmp_path / "demo.jpeg"
    image_path.write_bytes(make_image(640, 480, seed=5, fmt="JPEG"))
    source = seed_client_source()
    url = "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg"
    assert url in source and "http://127.0.0.1:8000/generate" in source
    port = mm_server.url.rsplit(":", 1)[1]
    source = source.replace(url, str(image_path)).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    script = tmp_path / "client.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.match(r"Result: \{'generated_text': \[['\"]", result.stdout), result.stdout
    assert "'finish_reason': " in result.stdout and "'prompt_tokens': " in result.stdout


def test_seed_client_copy_is_verbatim():
    if not SEED_DOC.exists():
        pytest.skip("the seed document is not beside this checkout")
    assert seed_client_source().strip() == SEED_CLIENT_COPY.read_text().strip()


# --- generation behaviour ----------------------------------------------------------------------


def chat_body(text: str, **params) -> dict:
    prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return {"inputs": prompt, "parameters": {"return_details": True, **params}}


def test_stop_sequence_with_leading_space_stops_on_the_token(mm_server):
    tokens = generate(mm_server, chat_body("hello", max_new_tokens=12, ignore_eos=True)).json()["tokens"]
    # Stop at the third generated token, written the seed's way: a space, then the token text.
    stop_text = tokens[2]["text"]
    first = next(i for i, t in enumerate(tokens) if t["text"] == stop_text)
    body = chat_body("hello", max_new_tokens=12, ignore_eos=True, stop_sequences=[" " + stop_text])
    stopped = generate(mm_server, body).json()
    before_stop = generate(
        mm_server, chat_body("hello", max_new_tokens=max(first, 1), ignore_eos=True)
    ).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["count_output_tokens"] == first + 1
    # The stop text is not returned: the text is what the tokens before it decode to.
    expected = before_stop["generated_text"][0] if first > 0 else ""
    assert stopped["generated_text"] == [expected]


def test_eos_from_generation_config_ends_generation_unless_ignored(mm_server, model_dir, tmp_path):
    body = chat_body("hello", max_new_tokens=20, ignore_eos=True)
    ids = [t["id"] for t in generate(mm_server, body).json()["tokens"]]
    eos = ids[5]  # a token this prompt is known to produce: make it the model's EOS
    first = ids.index(eos)
    model_copy = tmp_path / "model"
    model_copy.mkdir()
    for item in model_dir.iterdir():
        (model_copy / item.name).symlink_to(item)
    (model_copy / "generation_config.json").unlink()
    (model_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    server = start_server(model_copy, tmp_path)
    try:
        stopped = generate(server, chat_body("hello", max_new_tokens=20)).json()
        ignored = generate(server, body).json()
    finally:
        assert server.stop() == 0
    assert stopped["finish_reason"] == "stop" and stopped["count_output_tokens"] == first + 1
    assert ignored["finish_reason"] == "length" and [t["id"] for t in ignored["tokens"]] == ids


def test_same_image_twice_runs_the_vit_once(mm_server):
    image = make_image(700, 500, seed=99)
    before = metrics(mm_server)
    body = {
        "inputs": GOOD_PROMPT,
        "parameters": {"max_new_tokens": 3},
        "multimodal_params": {"images": [{"type": "base64", "data": b64(image)}]},
    }
    first = generate(mm_server, body).json()
    second = generate(mm_server, body).json()
    after = metrics(mm_server)
    assert first == second
    assert after["vlmd_vit_images_total"] - before["vlmd_vit_images_total"] == 1
    assert after["vlmd_embed_cache_misses_total"] - before["vlmd_embed_cache_misses_total"] == 1
    assert after["vlmd_embed_cache_hits_total"] - before["vlmd_embed_cache_hits_total"] == 1


# --- bad input ---------------------------------------------------------------------------------


class _ImageHost(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/image.png":
            self._send(200, PNG, "image/png")
        elif self.path == "/text":
            self._send(200, b"just some text", "text/plain")
        elif self.path == "/slow.png":
            time.sleep(4)
            self._send(200, PNG, "image/png")
        else:
            self._send(404, b"missing", "text/plain")

    def _send(self, status, data, kind):
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def with_image(image: dict, prompt: str = GOOD_PROMPT) -> dict:
    return {"inputs": prompt, "multimodal_params": {"images": [image]}}


TRUNCATED_PNG = PNG[: len(PNG) // 2]

BAD_BODIES = {
    "missing inputs": ({"parameters": {}}, "inputs"),
    "inputs not a string": ({"inputs": 42}, "inputs"),
    "max_new_tokens wrong type": (
        {"inputs": "hi", "parameters": {"max_new_tokens": "ten"}},
        "max_new_tokens",
    ),
    "max_new_tokens zero": ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    "max_new_tokens beyond context": (
        {"inputs": "hi", "parameters": {"max_new_tokens": 10**7}},
        "max_new_tokens",
    ),
    "top_p out of range": ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p"),
    "images not a list": ({"inputs": "hi", "multimodal_params": {"images": "x"}}, "images"),
    "invalid base64": (with_image({"type": "base64", "data": "not base64!!"}), "base64"),
    "not an image": (with_image({"type": "base64", "data": b64(b"hello world, no pixels here")}), "image"),
    "truncated image": (with_image({"type": "base64", "data": b64(TRUNCATED_PNG)}), "truncated"),
    "unknown image type": (with_image({"type": "file", "data": "/etc/passwd"}), "type"),
    "more images than placeholders": (
        {
            "inputs": "<img></img> one",
            "multimodal_params": {"images": [{"type": "base64", "data": b64(PNG)}] * 2},
        },
        "placeholder",
    ),
    "more placeholders than images": (
        with_image({"type": "base64", "data": b64(PNG)}, "<img></img><image>"),
        "placeholder",
    ),
    "placeholder without image": ({"inputs": "<img></img> describe"}, "placeholder"),
    "placeholder without image names inputs": ({"inputs": "<img></img> describe"}, "`inputs`"),
    # Found fuzzing the API: each was a 500, the empty prompt an AssertionError that took the
    # scheduler (and the server) down.
    "empty inputs": ({"inputs": "", "parameters": {"max_new_tokens": 2}}, "inputs"),
    "top_k beyond 64 bits": ({"inputs": "hi", "parameters": {"top_k": 10**20}}, "top_k"),
    "URL with a bad port": (with_image({"type": "url", "data": "http://[::1"}), "image 0"),
    "URL with a NUL": (with_image({"type": "url", "data": "http://\x00/"}), "image 0"),
    "too many stop_sequences": (
        {"inputs": "hi", "parameters": {"stop_sequences": [f"s{i}" for i in range(17)]}},
        "stop_sequences",
    ),
    # LightLLM's, not done by vlmd: a 400, not one answer where n were asked for.
    "n": ({"inputs": "hi", "parameters": {"n": 2}}, "`n`"),
    "best_of": ({"inputs": "hi", "parameters": {"best_of": 3}}, "best_of"),
    "min_new_tokens": ({"inputs": "hi", "parameters": {"min_new_tokens": 5}}, "min_new_tokens"),
    "guided_json": ({"inputs": "hi", "parameters": {"guided_json": {"type": "object"}}}, "guided_json"),
    "allowed_token_ids": ({"inputs": "hi", "parameters": {"allowed_token_ids": [1, 2]}}, "allowed_token_ids"),
    "a stop_sequence too long": (
        {"inputs": "hi", "parameters": {"stop_sequences": ["ok", "x" * 1001]}},
        "at most 1000 characters",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_body_gets_4xx_then_server_serves(mm_server, case):
    body, word = BAD_BODIES[case]
    response = generate(mm_server, body)
    assert 400 <= response.status_code < 500, response.text
    assert word in response.json()["error"]
    good_request(mm_server)


def test_malformed_json(mm_server):
    response = requests.post(mm_server.url + "/generate", data=b'{"inputs": "hi",', timeout=10)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]
    good_request(mm_server)


def test_a_broken_upload_is_no_error_in_the_server_log(mm_server):
    """PIL logs a TIFF claiming 23,299 samples per pixel at ERROR (found by test_fuzz.py --long)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    samples_per_pixel = b"\x15\x01\x03\x00\x01\x00\x00\x00"  # tag 277, SHORT, 1 value
    tiff = out.getvalue().replace(samples_per_pixel + b"\x03\x00", samples_per_pixel + b"\x03\x5b")
    response = generate(mm_server, with_image({"type": "base64", "data": b64(tiff)}))
    assert response.status_code == 400 and "image 0" in response.json()["error"]
    good_request(mm_server)
    assert "samples per pixel" not in mm_server.log()


def test_deeply_nested_json_is_a_400(mm_server):
    """msgspec recurses into (and over) nested values: a RecursionError was a 500."""
    depth = 100_000
    for nested in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        raw = b'{"inputs": "hi", "unknown": ' + nested + b"}"
        response = requests.post(mm_server.url + "/generate", data=raw, timeout=30)
        assert response.status_code == 400 and "nested too deeply" in response.json()["error"]
    good_request(mm_server)


def test_body_over_the_limit_is_413(mm_server):
    body = with_image({"type": "base64", "data": "A" * (9 * 2**20)})
    response = generate(mm_server, body)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    good_request(mm_server)


@pytest.mark.parametrize(
    "path, word",
    [
        ("/image.png", None),
        ("/missing.png", "404"),
        ("/text", "image"),
        ("/slow.png", "--image_fetch_timeout"),
    ],
)
def test_image_urls(mm_server, image_host, path, word):
    response = generate(mm_server, with_image({"type": "url", "data": image_host + path}))
    if word is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and word in response.json()["error"], response.text
    good_request(mm_server)


def test_unreachable_url(mm_server):
    port = free_port()
    response = generate(mm_server, with_image({"type": "url", "data": f"http://127.0.0.1:{port}/x.png"}))
    assert response.status_code == 400 and "failed" in response.json()["error"]
    good_request(mm_server)


def test_the_defaults_of_unsupported_lightllm_parameters_pass(mm_server):
    defaults = {"n": 1, "best_of": 1, "min_new_tokens": 1, "max_new_tokens": 2}
    assert generate(mm_server, {"inputs": "hi", "parameters": defaults}).status_code == 200


def test_unknown_route_is_json_404(mm_server):
    response = requests.get(mm_server.url + "/nope", timeout=10)
    assert response.status_code == 404 and response.json() == {"error": "no route /nope"}


@pytest.mark.parametrize(
    "method, path, status",
    [("GET", "/v1/models/demo", 404), ("POST", "/v1/responses", 404), ("GET", "/v1/chat/completions", 405)],
)
def test_an_unknown_openai_route_answers_in_openai_shape(mm_server, method, path, status):
    """What the openai client reads its error from (`client.models.retrieve` asks for the first)."""
    response = requests.request(method, mm_server.url + path, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert path in error["message"] and error["type"] == "invalid_request_error"


def test_no_leaks_after_all_requests(mm_server):
    good_request(mm_server)
    values = metrics(mm_server)
    assert values["vlmd_kv_pages_used"] == 0
    assert values["vlmd_requests_running"] == 0 and values["vlmd_requests_waiting"] == 0
    assert mm_server.shm_segments() == [f"vlmd-{mm_server.server_id}-embeds"]


def test_images_refused_without_multimodal(text_server):
    response = generate(text_server, with_image({"type": "base64", "data": b64(PNG)}))
    assert response.status_code == 400 and "--enable_multimodal" in response.json()["error"]
    response = generate(text_server, {"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200


def test_prompt_longer_than_max_req_total_len(text_server):
    response = generate(text_server, {"inputs": "word " * 2000, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 400 and "max_req_total_len" in response.json()["error"]
    assert "`inputs`" in response.json()["error"]  # the field at fault, as the fuzzer requires
    completion = {"prompt": "word " * 2000, "max_tokens": 2}
    response = requests.post(text_server.url + "/v1/completions", json=completion, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = generate(text_server, {"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200


def test_seeded_sampling_through_the_server(mm_server):
    def text(seed):
        body = chat_body(
            "hello", max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=1.0, seed=seed
        )
        return generate(mm_server, body).json()["generated_text"]

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_a_tiny_temperature_is_greedy_and_the_server_survives(mm_server):
    """temperature 1e-39 overflowed 1 / temperature in the sampler and crashed the worker, which
    took the server down (found fuzzing with --long)."""
    greedy = generate(mm_server, chat_body("hello", max_new_tokens=8, ignore_eos=True)).json()
    tiny = chat_body("hello", max_new_tokens=8, ignore_eos=True, do_sample=True, temperature=1e-39, top_p=0.5)
    response = generate(mm_server, tiny)
    assert response.status_code == 200, response.text
    assert [t["id"] for t in response.json()["tokens"]] == [t["id"] for t in greedy["tokens"]]
    good_request(mm_server)
