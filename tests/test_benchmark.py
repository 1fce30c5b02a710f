"""`vlmd bench`: against the demo server, against a fake OpenAI-compatible server, against none;
the stream parsers on recorded streams; the dataset and the percentiles."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.test_metrics import histogram, scrape
from vlmd.benchmark.backends import RequestResult, parse_openai_chat_line, parse_vlmd_line
from vlmd.benchmark.dataset import DatasetConfig, build_requests
from vlmd.benchmark.report import percentile

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms")


def bench(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlmd", "bench", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bench_against_the_demo_server(mm_server, tmp_path):
    out = tmp_path / "report.json"
    ttft_before = histogram(scrape(mm_server), "vlmd_time_to_first_token_seconds")[1]
    result = bench(
        *("--base_url", mm_server.url, "--num_prompts", "6", "--input_len", "16", "--output_len", "5"),
        *("--images_per_request", "1", "--image_reuse_fraction", "0.5", "--num_warmups", "1"),
        *("--image_pixel_pool", "1", "--seed", "123", "--output_json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    assert "Time to first token" in result.stdout and "Embed-cache hit rate" in result.stdout
    report = json.loads(out.read_text())
    assert report["successful_requests"] == 6 and report["failed_requests"] == 0
    assert [r["output_tokens"] for r in report["requests"]] == [5] * 6  # ignore_eos: what was asked
    assert report["total_output_tokens"] == 30
    # vlmd counts the prompt with its chat template and image tokens: more than the 16 words.
    assert all(r["prompt_tokens"] > 16 for r in report["requests"])
    assert report["total_input_tokens"] == sum(r["prompt_tokens"] for r in report["requests"])
    for key in ("duration_s", "request_throughput", "input_token_throughput", "output_token_throughput"):
        assert report[key] > 0
    for key in LATENCY_KEYS:
        stats = report[key]
        assert set(stats) == {"mean", "median", "p90", "p99"}
        assert 0 < stats["median"] <= stats["p90"] <= stats["p99"], (key, stats)
    # 3 of the 6 requests send an image of an earlier one again: 3 hits, 3 misses (the new ones
    # share their pixels, a pool of one, but each is a file of its own).
    assert report["embed_cache_hits"] == 3 and report["embed_cache_misses"] == 3
    assert report["embed_cache_hit_rate"] == 0.5
    # The server saw each request (warm-up included) once.
    assert histogram(scrape(mm_server), "vlmd_time_to_first_token_seconds")[1] - ttft_before == 7


def test_bench_at_a_rate_with_bounded_concurrency_and_no_images(mm_server, tmp_path):
    out = tmp_path / "report.json"
    result = bench(
        *("--base_url", mm_server.url, "--num_prompts", "5", "--input_len", "8", "--output_len", "3"),
        *("--request_rate", "40", "--max_concurrency", "2", "--output_json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["successful_requests"] == 5 and report["total_output_tokens"] == 15
    assert report["embed_cache_hit_rate"] is None  # no image, no cache lookups


def counter(server, name: str) -> float:
    return next(iter(scrape(server)[name].values()))


@pytest.mark.parametrize("backend", ["vlmd", "openai-chat"])
def test_conversations_send_their_history_and_report_ttft_per_turn(mm_server, tmp_path, backend):
    """--turns 3: each conversation's later turns send the chat so far (first prompt, image,
    answers) again, so the prefix cache finds most of it; TTFT is split by turn."""
    out = tmp_path / "report.json"
    hits_before = counter(mm_server, "vlmd_prefix_cache_hit_tokens")
    result = bench(
        *("--base_url", mm_server.url, "--backend", backend, "--num_prompts", "2", "--turns", "3"),
        *("--input_len", "120", "--output_len", "6", "--turn_input_len", "5", "--images_per_request", "1"),
        *("--seed", "7", "--output_json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    assert "TTFT, later turns" in result.stdout
    report = json.loads(out.read_text())
    assert report["successful_requests"] == 6
    assert sorted(r["turn"] for r in report["requests"]) == [1, 1, 2, 2, 3, 3]
    by_turn = {t: [r["prompt_tokens"] for r in report["requests"] if r["turn"] == t] for t in (1, 2, 3)}
    assert min(by_turn[2]) > max(by_turn[1]) and min(by_turn[3]) > max(by_turn[2]), "history not sent"
    # Turns 2 and 3 find at least the first turn's prompt (image included) in the prefix cache.
    hits = counter(mm_server, "vlmd_prefix_cache_hit_tokens") - hits_before
    assert hits >= 4 * (min(by_turn[1]) // 16 * 16)
    assert report["ttft_ms_first_turn"]["median"] > 0 and report["ttft_ms_later_turns"]["median"] > 0


def test_clients_that_hang_up_early(mm_server, tmp_path):
    """--disconnect_after: every stream is closed after 4 tokens of the 500 it declared; the
    server aborts the rest and holds no page once they are gone."""
    out = tmp_path / "report.json"
    result = bench(
        *("--base_url", mm_server.url, "--num_prompts", "4", "--input_len", "8", "--output_len", "500"),
        *("--disconnect_after", "4", "--output_json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["successful_requests"] == 4 and [r["output_tokens"] for r in report["requests"]] == [4] * 4
    for _ in range(50):
        if counter(mm_server, "vlmd_requests_running") == 0:
            break
        time.sleep(0.1)
    assert counter(mm_server, "vlmd_requests_running") == 0 and counter(mm_server, "vlmd_kv_pages_used") == 0


def test_bench_against_no_server_fails_in_one_line():
    result = bench("--base_url", f"http://127.0.0.1:{free_port()}", "--num_prompts", "2")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0], result.stderr


# --- openai-chat against a fake server -------------------------------------------------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Streams one chunk per requested token, then usage and [DONE]; remembers the bodies."""

    bodies: list[dict] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-vl", "object": "model"}]}))
        else:
            self._send(404, json.dumps({"detail": "Not Found"}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [
            {**chunk, "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]}
            for i in range(body["max_tokens"])
        ]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        usage = {"prompt_tokens": 42, "completion_tokens": body["max_tokens"], "total_tokens": 0}
        events.append({**chunk, "choices": [], "usage": usage})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, payload, "text/event-stream")

    def _send(self, status: int, text: str, kind: str = "application/json") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    _FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_openai_chat_backend_against_a_fake_server(fake_openai, tmp_path):
    out = tmp_path / "report.json"
    result = bench(
        *("--backend", "openai-chat", "--base_url", fake_openai, "--num_prompts", "4", "--output_len", "6"),
        *(
            "--images_per_request",
            "2",
            "--image_width",
            "64",
            "--image_height",
            "48",
            "--output_json",
            str(out),
        ),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "fake-vl" and report["successful_requests"] == 4
    assert report["total_output_tokens"] == 24 and report["total_input_tokens"] == 4 * 42
    assert report["embed_cache_hit_rate"] is None  # no /metrics there
    assert all(report[key]["mean"] is not None for key in LATENCY_KEYS)
    body = _FakeOpenAI.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-vl" and body["max_tokens"] == 6 and body["ignore_eos"] is True
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


# --- pure parts --------------------------------------------------------------------------------

# Recorded from an OpenAI-compatible server (ids and timestamps shortened).
OPENAI_STREAM = """\
data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" image shows"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" a cat"},"logprobs":null,"finish_reason":"length"}],"usage":null}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":281,"total_tokens":286,"completion_tokens":5}}

data: [DONE]
"""

VLMD_STREAM = """\
data:{"token": {"id": 957, "text": "ab", "logprob": -0.5, "special": false, "count_output_tokens": 1, "prompt_tokens": 30}, "generated_text": null, "finished": false, "finish_reason": null}

data:{"token": {"id": 297, "text": "cd", "logprob": -0.1, "special": false, "count_output_tokens": 2, "prompt_tokens": 30}, "generated_text": "abcd", "finished": true, "finish_reason": "length"}
"""


def replay(parse, stream: str) -> RequestResult:
    """Feed a recorded stream line by line, one line every 10 ms."""
    result = RequestResult(expected_prompt_tokens=0, requested_output_tokens=5)
    last = None
    for i, line in enumerate(stream.splitlines()):
        event = parse(line)
        if event is not None:
            result.add(event, 0.01 * i, last)
            last = 0.01 * i if event.num_chunks else last
    return result


def test_openai_chat_stream_parsing():
    result = replay(parse_openai_chat_line, OPENAI_STREAM)
    assert result.ok and not result.error
    assert result.num_chunks == 3  # the empty role chunk carries no text
    assert result.output_tokens == 5 and result.prompt_tokens == 281  # from usage
    assert result.ttft == pytest.approx(0.02) and result.itls == pytest.approx([0.02, 0.02])
    assert result.e2e == pytest.approx(0.10)


def test_openai_chat_errors():
    for line in (
        'data: {"object":"error","message":"max_tokens is too large","type":"BadRequestError","code":400}',
        'data: {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}',
    ):
        event = parse_openai_chat_line(line)
        assert event.done and event.error == "max_tokens is too large"
    assert parse_openai_chat_line("") is None and parse_openai_chat_line(": keep-alive") is None


def test_vlmd_stream_parsing():
    result = replay(parse_vlmd_line, VLMD_STREAM)
    assert result.ok and result.output_tokens == 2 and result.prompt_tokens == 30
    assert result.ttft == 0.0 and result.itls == pytest.approx([0.02]) and result.e2e == pytest.approx(0.02)
    error = parse_vlmd_line('data:{"error": "image 0: bad", "finished": true, "finish_reason": null}')
    assert error.done and error.error == "image 0: bad"


def test_image_reuse_is_exact_and_never_first():
    config = DatasetConfig(
        num_requests=10, input_len=4, output_len=2, images_per_request=2, image_width=32, image_height=32
    )
    for fraction, unique_requests in ((0.0, 10), (0.5, 5), (1.0, 1)):
        requests = build_requests(DatasetConfig(**{**config.__dict__, "image_reuse_fraction": fraction}))
        seen: set[bytes] = set()
        fresh = 0
        for request in requests:
            files = {bytes(image) for image in request.images}
            fresh += not seen.intersection(files)
            seen.update(files)
        assert fresh == unique_requests and len(seen) == 2 * unique_requests
        assert bytes(requests[0].images[0]) != bytes(requests[0].images[1])
    assert build_requests(config) == build_requests(config)  # a pure function of the seed


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_new_images_are_new_files_of_the_pools_pixels(image_format):
    """Past the pool, new images repeat its pixels in files of their own: every MD5 distinct, every
    file a valid image whose decoded pixels are its pool entry's."""
    config = DatasetConfig(
        num_requests=7, input_len=4, output_len=2, images_per_request=1, image_width=40,
        image_height=24, image_format=image_format, image_pixel_pool=3,
    )  # fmt: skip
    images = [request.images[0] for request in build_requests(config)]
    files = [bytes(image) for image in images]
    assert len({hashlib.md5(f).hexdigest() for f in files}) == 7
    pixels = []
    for image, data in zip(images, files, strict=True):
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == image_format.upper() and decoded.size == (40, 24)
            pixels.append(np.asarray(decoded.convert("RGB")))
        with Image.open(io.BytesIO(image.pixels)) as pool_entry:
            assert np.array_equal(pixels[-1], np.asarray(pool_entry.convert("RGB")))
    assert len({p.tobytes() for p in pixels}) == 3
    assert np.array_equal(pixels[0], pixels[3]) and np.array_equal(pixels[1], pixels[4])


def test_percentiles_match_numpy():
    values = [5.0, 1.0, 3.5, 9.0, 2.0, 7.25, 4.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_sampling_flags_reach_both_request_bodies():
    """The bench's sampling flags are the server's knobs (one definition); none given is greedy."""
    import argparse

    from vlmd.benchmark.args import add_bench_arguments, sampling_knobs
    from vlmd.benchmark.backends import openai_chat_body, vlmd_body

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    request = build_requests(DatasetConfig(num_requests=1, input_len=4, output_len=3))[0]
    greedy = sampling_knobs(parser.parse_args([]))
    assert greedy == {}
    assert vlmd_body(request, None, True, greedy)["parameters"]["do_sample"] is False
    assert openai_chat_body(request, None, True, greedy)["temperature"] == 0.0
    flags = ["--temperature", "0.7", "--top_p", "0.9", "--top_k", "50", "--min_p", "0.05"]
    flags += ["--repetition_penalty", "1.05", "--presence_penalty", "0.1", "--frequency_penalty", "0.2"]
    knobs = sampling_knobs(parser.parse_args(flags))
    assert knobs == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }
    parameters = vlmd_body(request, None, True, knobs)["parameters"]
    assert parameters["do_sample"] is True and parameters.items() >= knobs.items()
    assert openai_chat_body(request, "m", True, knobs).items() >= knobs.items()
    assert openai_chat_body(request, "m", True, {"top_p": 0.5})["temperature"] == 1.0  # OpenAI's default


def test_the_longest_gaps_carry_the_wall_clock_time_their_token_came():
    """The report's longest inter-token gaps, longest first, each with when its token arrived
    (local time, as the server's log has it): what to look for in the server's log."""
    import time

    from vlmd.benchmark.backends import RequestResult
    from vlmd.benchmark.report import longest_gaps

    sent = time.mktime((2026, 12, 7, 18, 0, 0, 0, 0, -1))
    a = RequestResult(1, 3, ok=True, ttft=0.5, itls=[0.01, 0.25, 0.02], sent_at=sent)
    b = RequestResult(1, 2, ok=True, ttft=1.0, itls=[0.07], sent_at=sent + 10)
    gaps = longest_gaps([a, b], count=2)
    assert [round(g["itl_ms"]) for g in gaps] == [250, 70]
    assert [g["arrived"] for g in gaps] == ["18:00:00.760", "18:00:11.070"]


def test_each_request_has_its_own_itl_p99():
    """A request's p99 over its own gaps (interpolated as the pooled one is); none without gaps."""
    from vlmd.benchmark.backends import RequestResult
    from vlmd.benchmark.report import build_report

    a = RequestResult(1, 3, ok=True, ttft=0.5, e2e=0.78, itls=[0.01, 0.25, 0.02], output_tokens=4)
    b = RequestResult(1, 2, ok=True, ttft=1.0, e2e=1.0, itls=[], output_tokens=1)
    report = build_report([a, b], duration_s=2.0)
    assert [r["itl_p99_ms"] for r in report["requests"]] == [pytest.approx(245.4), None]
