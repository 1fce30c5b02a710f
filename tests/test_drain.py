"""Stopping a server with requests in flight: SIGTERM (or one Ctrl-C) drains, --shutdown_timeout
bounds the drain, a second signal stops at once; each way, the server exits 0 and leaves no
process, shared-memory segment or run directory behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests

from tests.conftest import Server, start_server
from tests.test_http import PNG, chat_body, metrics
from tests.test_lifecycle import assert_one_line_error, serve

CHAT = [{"role": "user", "content": "a long answer please"}]


def events(response: requests.Response) -> Iterator[dict]:
    """The server-sent events of a /generate_stream answer, as they arrive."""
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            yield json.loads(line[5:])


def open_stream(server: Server, max_new_tokens: int) -> requests.Response:
    body = chat_body("a long answer please", max_new_tokens=max_new_tokens, ignore_eos=True)
    response = requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return response


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_running(server: Server, num_requests: int) -> None:
    wait_until(lambda: metrics(server)["vlmd_requests_running"] >= num_requests, "requests to run")


def draining(server: Server) -> bool:
    response = requests.get(server.url + "/health", timeout=10)
    return response.status_code == 503 and response.json() == {"status": "draining"}


def assert_nothing_left(server: Server, exit_timeout_s: float = 30) -> None:
    assert server.process.wait(timeout=exit_timeout_s) == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []
    assert not any(name.startswith(f"vlmd-{server.server_id}-") for name in os.listdir("/tmp"))


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_sigterm_refuses_new_requests_and_lets_those_in_flight_finish(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--enable_multimodal")  # --shutdown_timeout 30
    pool = ThreadPoolExecutor(1)
    chat = pool.submit(
        lambda: client(server).chat.completions.create(
            model="demo", messages=CHAT, max_tokens=300, temperature=0, extra_body={"ignore_eos": True}
        )
    )
    with open_stream(server, max_new_tokens=1500) as stream:
        received = events(stream)
        head = [next(received) for _ in range(3)]
        wait_running(server, 2)
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: draining(server), "/health to report draining")
        refused = requests.post(server.url + "/generate", json=chat_body("hi", max_new_tokens=2), timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        with pytest.raises(openai.InternalServerError) as refused_chat:
            client(server).chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        assert refused_chat.value.status_code == 503
        assert refused_chat.value.body["type"] == "server_error"
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200  # still scraped
        tail = list(received)
    whole = head + tail
    assert [e["token"]["count_output_tokens"] for e in whole] == list(range(1, 1501))
    assert whole[-1]["finished"] and whole[-1]["finish_reason"] == "length"
    answer = chat.result(timeout=60)
    assert answer.usage.completion_tokens == 300 and answer.choices[0].finish_reason == "length"
    assert_nothing_left(server)
    assert "draining" in server.log() and "0 request(s) ended" in server.log()


def test_requests_past_the_shutdown_timeout_are_ended_and_the_server_stops(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--shutdown_timeout", "1")
    pool = ThreadPoolExecutor(2)
    long_body = chat_body("a long answer please", max_new_tokens=3000, ignore_eos=True)
    plain = pool.submit(requests.post, server.url + "/generate", json=long_body, timeout=60)

    def openai_stream() -> Exception | None:
        chunks = client(server).chat.completions.create(
            model="demo", messages=CHAT, max_tokens=3000, temperature=0, stream=True
        )
        try:
            for _ in chunks:
                pass
        except openai.APIError as exc:
            return exc
        return None

    streamed = pool.submit(openai_stream)
    with open_stream(server, max_new_tokens=3000) as stream:
        received = events(stream)
        head = [next(received) for _ in range(3)]
        wait_running(server, 3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        tail = list(received)
        ended_after = time.monotonic() - signalled
    assert 1 <= ended_after < 6  # the timeout, then at once: no wait for the 3,000 tokens
    assert len(head + tail) < 3000 and tail[-1]["finished"] and "--shutdown_timeout" in tail[-1]["error"]
    response = plain.result(timeout=10)
    assert response.status_code == 503 and "--shutdown_timeout" in response.json()["error"]
    error = streamed.result(timeout=10)
    assert isinstance(error, openai.APIError) and "--shutdown_timeout" in error.message
    assert_nothing_left(server, exit_timeout_s=10)
    assert "3 request(s) still running after --shutdown_timeout" in server.log()


class _HeldImage(BaseHTTPRequestHandler):
    """Serves PNG once the test releases it: a request stays in its image fetch meanwhile."""

    requested = threading.Semaphore(0)  # one release per fetch started
    release = threading.Event()

    def do_GET(self):
        self.requested.release()
        self.release.wait(60)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args):
        pass


def test_requests_let_in_before_the_drain_that_come_to_run_after_the_timeout_are_refused(model_dir, tmp_path):
    """Streams included: a stream ended before its first token is a 503, not a 200 and an
    error event (its response starts with the first token)."""
    host = ThreadingHTTPServer(("127.0.0.1", 0), _HeldImage)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    server = start_server(
        model_dir, tmp_path, "--enable_multimodal", "--shutdown_timeout", "1", "--allow_private_image_urls"
    )
    body = chat_body("<img></img> describe", max_new_tokens=3000, ignore_eos=True)
    url = f"http://127.0.0.1:{host.server_address[1]}/image.png"
    body = chat_body("<img></img> describe", max_new_tokens=3000, ignore_eos=True)
    body["multimodal_params"] = {"images": [{"type": "url", "data": url}]}
    image_part = {"type": "image_url", "image_url": {"url": url}}
    chat = {"messages": [{"role": "user", "content": [image_part]}], "max_tokens": 3000, "stream": True}
    sent = [("/generate", body), ("/generate_stream", body), ("/v1/chat/completions", chat)]
    pool = ThreadPoolExecutor(len(sent))
    try:
        pending = [pool.submit(requests.post, server.url + path, json=b, timeout=60) for path, b in sent]
        for _ in sent:
            assert _HeldImage.requested.acquire(timeout=30)
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "still running after --shutdown_timeout" in server.log(), "the timeout")
    finally:
        _HeldImage.release.set()
        host.shutdown()
    plain, stream, openai_stream = (p.result(timeout=30) for p in pending)  # within the 2 s grace
    for response in (plain, stream):
        assert response.status_code == 503 and "--shutdown_timeout" in response.json()["error"]
    assert openai_stream.status_code == 503
    assert "--shutdown_timeout" in openai_stream.json()["error"]["message"]
    assert_nothing_left(server, exit_timeout_s=10)


def test_ctrl_c_drains_and_a_second_one_stops_at_once(model_dir, tmp_path):
    """Ctrl-C signals the whole process group: the actors must not die of the first one."""
    server = start_server(model_dir, tmp_path, new_session=True)
    with open_stream(server, max_new_tokens=3000) as stream:
        received = events(stream)
        next(received)
        os.killpg(server.process.pid, signal.SIGINT)
        wait_until(lambda: draining(server), "/health to report draining")
        time.sleep(1)
        assert len(server.actor_pids()) == 3  # scheduler, worker, http: none died of the Ctrl-C
        refused = requests.post(server.url + "/generate", json=chat_body("hi", max_new_tokens=2), timeout=10)
        assert refused.status_code == 503  # still answering: uvicorn did not stop at the Ctrl-C
        count = next(received)["token"]["count_output_tokens"]
        assert [next(received)["token"]["count_output_tokens"] for _ in range(20)] == list(
            range(count + 1, count + 21)
        )  # the request in flight goes on
        signalled = time.monotonic()
        os.killpg(server.process.pid, signal.SIGINT)
        # The stream ends unfinished: dropped mid-stream where the http actor is stopped first,
        # or with an error event where it first sees the scheduler gone (both happen: a race).
        dropped, last = False, None
        try:
            for event in received:
                last = event
        except requests.RequestException:
            dropped = True
        assert dropped or "error" in last, last
    assert_nothing_left(server, exit_timeout_s=10)
    assert time.monotonic() - signalled < 8
    assert "received SIGINT again" in server.log()


def test_shutdown_timeout_must_not_be_negative(model_dir):
    result = serve("--model_dir", str(model_dir), "--shutdown_timeout", "-1")
    assert_one_line_error(result, "--shutdown_timeout")
