"""Fuzzing the four generation routes with malformed and adversarial bodies (tests/fuzz_bodies.py)
against one real multimodal server. Every case must be answered below 500: a 200 (a stream without
an error event), or a 4xx whose JSON error, in the route's shape, names the field at fault; then
a normal request must be served. Every few cases, and at the end, the idle server must hold no KV
page, no embed-cache pin, no queued request and no image-bytes segment, and its log no traceback.

The default run is bounded and reproducible (derandomized); `pytest --long` soaks with many more
examples, drawn afresh each run (hypothesis prints the seed of a failure).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import requests
from hypothesis import HealthCheck, given, note, settings

from tests.conftest import Server, start_server
from tests.fuzz_bodies import ROUTES, Case, field_cases, field_paths, image_cases, raw_cases
from tests.test_http import metrics

# Bounds that keep each case cheap on a CPU: at most 3 tiles (768 image tokens) per image, and at
# most 1024 tokens per request (a chat without max_tokens fills the context).
FUZZ_FLAGS = (
    "--enable_multimodal",
    "--max_tiles",
    "2",
    "--max_req_total_len",
    "1024",
    "--max_body_bytes",
    str(2 * 2**20),
    "--image_fetch_timeout",
    "1",
    "--visual_infer_batch_size",
    "4",
)
IDLE_CHECK_EVERY = 20  # cases
LONG_FACTOR = 50  # --long: this many times the default examples
LOG_FAILURES = ("Traceback", "AssertionError", " ERROR ")


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    yield from _serve(model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def fuzz_worker_server(model_dir, tmp_path_factory):
    """fuzz_server with the ViT inside the LM worker (--vit_placement worker)."""
    yield from _serve(model_dir, tmp_path_factory, "--vit_placement", "worker")


def _serve(model_dir, tmp_path_factory, *flags: str):
    server = start_server(model_dir, tmp_path_factory.mktemp("fuzz"), *FUZZ_FLAGS, *flags)
    yield server
    assert server.stop() == 0, server.log()
    assert server.actor_pids() == [] and server.shm_segments() == []


@pytest.fixture
def fuzz(request):
    """fuzz(strategy, examples): check that many cases of `strategy` on fuzz_server (or on the
    server fixture an indirect parameter names)."""
    fuzz_server = request.getfixturevalue(getattr(request, "param", "fuzz_server"))
    long = request.config.getoption("--long")
    seen = [0]
    # Each case is written here before it is sent: a case that kills the server makes hypothesis'
    # replay fail another way (FlakyFailure), and its report would not show the case.
    cases = fuzz_server.log_path.with_name("fuzz-cases.log")
    log = LogTail(fuzz_server)
    first_failure: list[str] = []  # a leak fails every later case too: the first one is the lead

    def run(strategy, examples: int) -> None:
        @settings(
            max_examples=examples * (LONG_FACTOR if long else 1),
            derandomize=not long,  # CI draws the same cases every run
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(case=strategy)
        def check(case: Case) -> None:
            sent = f"{case.route} {_abridged(case.body)!r}"
            with open(cases, "a") as f:
                f.write(sent + "\n")
            try:
                check_case(fuzz_server, case)
                log.assert_clean()  # after each case, so that a bad line is the case's own
                seen[0] += 1
                if seen[0] % IDLE_CHECK_EVERY == 0:
                    assert_idle(fuzz_server)
            except BaseException:
                first_failure[:] = first_failure or [sent]
                raise

        try:
            check()
        except BaseException as exc:
            if fuzz_server.process.poll() is not None:
                last = "\n".join(cases.read_text().splitlines()[-3:])
                raise AssertionError(f"the server died; the last cases sent:\n{last}") from exc
            raise AssertionError(f"the first case that failed: {first_failure[0]}") from exc
        assert_idle(fuzz_server)

    return run


class LogTail:
    """The server log's lines since the last look."""

    def __init__(self, server: Server) -> None:
        self.path = server.log_path
        self.offset = self.path.stat().st_size

    def assert_clean(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = f.read()
        self.offset += len(raw)
        new = raw.decode(errors="replace")
        assert not any(failure in new for failure in LOG_FAILURES), new[-5000:]


@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_each_field(fuzz, route):
    """Every field of the route's body first (with others perhaps), so that a bounded run covers
    them all: hypothesis left to pick fields freely revisits some and misses others."""
    for path in field_paths(route):
        fuzz(field_cases(route, path), examples=4)


def test_fuzz_fields_together(fuzz):
    fuzz(field_cases(), examples=150)


def test_fuzz_raw_bodies(fuzz):
    fuzz(raw_cases(), examples=60)


def test_fuzz_images(fuzz):
    fuzz(image_cases(), examples=200)


@pytest.mark.parametrize("fuzz", ["fuzz_worker_server"], indirect=True, ids=["vit_in_worker"])
def test_fuzz_images_with_the_vit_in_the_worker(fuzz):
    """The adversarial images again, the ViT in the LM worker: an image that cannot be encoded
    fails alone, and the worker goes on serving steps."""
    fuzz(image_cases(), examples=100)


def _abridged(body: bytes) -> bytes:
    """The body with its image data cut short, for the case log."""
    return re.sub(rb"[A-Za-z0-9+/=_-]{120,}", lambda m: b"<%d base64 bytes>" % len(m[0]), body)[:2000]


# --- the oracle ------------------------------------------------------------------------------------


def check_case(server: Server, case: Case) -> None:
    note(f"{case.route}: {case.what}")
    headers = {"Content-Type": "application/json"}
    with requests.post(
        server.url + case.route, data=case.body, headers=headers, stream=True, timeout=120
    ) as r:
        status, kind = r.status_code, r.headers.get("content-type", "")
        text = r.content.decode(errors="replace")
    assert status < 500, f"{status}: {text[:2000]}\n{server.log()[-5000:]}"
    if status == 200:
        if kind.startswith("text/event-stream"):
            assert_clean_stream(case.route, text)
        else:
            json.loads(text)
    else:
        assert not case.expect_ok, f"a valid request got {status}: {text[:2000]}"
        message, param = error_fields(case.route, json.loads(text))
        if status == 400 and case.names:
            assert any(name in message or name in (param or "") for name in case.names), (
                f"the error names none of {case.names}: {text[:2000]}"
            )
    assert_serving(server)


def error_fields(route: str, body: dict) -> tuple[str, str | None]:
    """The message (and OpenAI's param) of an error body, checked for the route's shape."""
    if route.startswith("/v1/"):
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        return error["message"], error["param"]
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"], None


def assert_clean_stream(route: str, text: str) -> None:
    """A stream that started (200) ran to its end: no error event, OpenAI's ends with [DONE]."""
    payloads = [line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("data:")]
    assert payloads, text
    if route.startswith("/v1/"):
        assert payloads[-1] == "[DONE]", text[-2000:]
        payloads = payloads[:-1]
    for payload in payloads:
        assert "error" not in json.loads(payload), payload


def assert_serving(server: Server) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}
    response = requests.post(server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, f"{response.text}\n{server.log()[-5000:]}"


def assert_idle(server: Server, timeout_s: float = 10) -> None:
    """Nothing in flight, nothing held: no KV page, no pin, no queued request, no image bytes."""
    gauges = (
        "vlmd_kv_pages_used",
        "vlmd_requests_running",
        "vlmd_requests_waiting",
        "vlmd_requests_queued",
        "vlmd_embed_cache_pinned_images",
    )
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(server)
        held = {name: values[name] for name in gauges if values[name] != 0}
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not held, held
    assert server.shm_segments() == [f"vlmd-{server.server_id}-embeds"]
    log = server.log()
    assert not any(failure in log for failure in LOG_FAILURES), log[-5000:]
