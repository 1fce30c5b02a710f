"""Clients that send slowly, stop sending, or hang up mid-body (--client_timeout), through a real
server: none holds a socket or a drain for longer than the timeout, none fills the log."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.conftest import start_server
from tests.test_http import metrics

TIMEOUT_S = 1.0
PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("logs"), "--client_timeout", str(TIMEOUT_S))
    yield server
    server.stop()


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_after(sock: socket.socket, trickle: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (sending `trickle` a byte every 0.2 s meanwhile), and
    what it sent before closing."""
    started = time.monotonic()
    sock.settimeout(0.2)
    received = b""
    while time.monotonic() - started < 10 * TIMEOUT_S:
        if trickle:
            try:
                sock.sendall(trickle[:1])
            except OSError:  # closed under it
                break
            trickle = trickle[1:]
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    return time.monotonic() - started, received


def request_line(path: str = "/health") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.mark.parametrize(
    "sent, trickle",
    [
        (b"", b""),  # connects and sends nothing
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", b""),  # headers never finished
        (b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100),  # a header a byte at a time
    ],
    ids=["silent", "unfinished headers", "slowloris"],
)
def test_a_connection_without_whole_headers_is_closed_after_the_timeout(server, sent, trickle):
    with connect(server) as sock:
        sock.sendall(sent)
        seconds, received = closed_after(sock, trickle)
    assert TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S + 2, seconds
    assert received == b""


def test_a_keep_alive_connection_gets_the_timeout_again_after_each_response(server):
    with connect(server) as sock:
        for _ in range(3):
            time.sleep(TIMEOUT_S * 0.6)  # within the timeout each time, over it in all
            sock.sendall(request_line())
            received = b""
            while not received.endswith(b'{"status":"ok"}'):
                received += sock.recv(65536)
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # then stops mid-headers
        seconds, _ = closed_after(sock)
    assert seconds < TIMEOUT_S + 2


def test_a_body_that_stops_is_a_408_and_the_server_goes_on(server):
    with connect(server) as sock:
        head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"inputs": ')
        seconds, received = closed_after(sock)
    assert seconds < TIMEOUT_S + 2
    status, _, rest = received.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", received
    assert b"--client_timeout" in rest
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200


def test_a_body_sent_slowly_but_steadily_is_read(server):
    """Each part within the timeout: the whole takes longer than it, and is served."""
    body = (
        b'{"inputs": "' + PROMPT.encode().replace(b"\n", b"\\n") + b'", "parameters": {"max_new_tokens": 2}}'
    )
    parts = [body[i : i + len(body) // 3 + 1] for i in range(0, len(body), len(body) // 3 + 1)]
    with connect(server) as sock:
        head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode())
        for part in parts:
            time.sleep(TIMEOUT_S * 0.6)
            sock.sendall(part)
        sock.settimeout(60)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"])
def test_a_client_hanging_up_mid_body_leaves_no_error_in_the_log(server, path):
    logged = server.log()
    with connect(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        time.sleep(0.2)
    time.sleep(0.5)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200
    new = server.log()[len(logged) :]
    assert "Traceback" not in new and "ERROR" not in new, new
    assert metrics(server)["vlmd_requests_queued"] == 0


def test_a_body_awaited_when_the_server_stops_does_not_hold_the_drain(model_dir, tmp_path):
    """A client that sent half a body when SIGTERM comes: it gets a 503 at once, and the server
    stops without waiting for --shutdown_timeout (30 s) or --client_timeout (here 60 s)."""
    server = start_server(model_dir, tmp_path, "--client_timeout", "60")
    with connect(server) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)
        started = time.monotonic()
        assert server.stop() == 0
        stopped_in = time.monotonic() - started
        sock.settimeout(5)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert stopped_in < 15, stopped_in
