"""Image URLs through a real server: what is fetched, and every refusal a 400 naming its reason.

A test's HTTP server listens on loopback, so the shared server (`mm_server`) runs with
--allow_private_image_urls for the tests that must reach it. The refusals of private addresses
need a server without the flag and a first hop that is public: that test runs again in a network
namespace of its own, where 8.8.8.8 is an address of the loopback interface (root only). Without
root, ImageFetcher itself is checked against loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import make_image, start_server
from tests.test_http import GOOD_PROMPT, generate
from vlmd.actors.fetch import FetchError, ImageFetcher, address_refusal

PNG = make_image(300, 200, seed=21)
PUBLIC = "8.8.8.8"  # in the test's own network namespace only
IN_NETNS = "VLMD_TEST_IN_NETNS"
ENDLESS_S = 30  # how long an endless body goes on if nobody stops reading it


class _Host(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path, _, query = self.path.partition("?")
        try:
            if path == "/image.png":
                self._head(200, {"Content-Length": len(PNG)})
                self.wfile.write(PNG)
            elif path.startswith("/hops/"):  # /hops/n: n redirects, then the image
                hops = int(path.rsplit("/", 1)[1])
                self._redirect(f"/hops/{hops - 1}" if hops > 1 else "/image.png")
            elif path == "/to":
                self._redirect(unquote(query))
            elif path == "/trickle":  # a byte every 0.1 s: each read is quick, the whole is not
                self._head(200, {"Content-Length": len(PNG)})
                self._endless(self._trickle)
            elif path == "/declared-huge":
                self._head(200, {"Content-Length": 10**12})
                self._endless(lambda: self.wfile.write(bytes(65536)))
            elif path == "/endless-chunked":
                self._head(200, {"Transfer-Encoding": "chunked"})
                self._endless(lambda: self.wfile.write(b"10000\r\n" + bytes(65536) + b"\r\n"))
            elif path == "/endless-unframed":  # no length: the body lasts until the connection closes
                self._head(200, {"Connection": "close"})
                self._endless(lambda: self.wfile.write(bytes(65536)))
            elif path == "/understated":  # declares 1000 bytes, sends without end
                self._head(200, {"Content-Length": 1000, "Connection": "close"})
                self._endless(lambda: self.wfile.write(PNG))
            else:
                self._head(404, {"Content-Length": 0})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _head(self, status: int, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()

    def _trickle(self) -> None:
        self.wfile.write(PNG[:1])
        time.sleep(0.1)

    def _redirect(self, location: str) -> None:
        self._head(302, {"Location": location, "Content-Length": 0})

    def _endless(self, write) -> None:
        deadline = time.monotonic() + ENDLESS_S
        while time.monotonic() < deadline:
            write()
        self.close_connection = True

    def log_message(self, *args):
        pass


def serve_http(address: str) -> tuple[str, ThreadingHTTPServer]:
    server = ThreadingHTTPServer((address, 0), _Host)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{address}:{server.server_address[1]}", server


@pytest.fixture(scope="module")
def host():
    url, server = serve_http("127.0.0.1")
    yield url
    server.shutdown()


def url_body(url: str) -> dict:
    return {
        "inputs": GOOD_PROMPT,
        "parameters": {"max_new_tokens": 4, "return_details": True},
        "multimodal_params": {"images": [{"type": "url", "data": url}]},
    }


def refusal(server, url: str) -> str:
    response = generate(server, url_body(url))
    assert response.status_code == 400, response.text
    return response.json()["error"]


# --- with --allow_private_image_urls (the shared server) -------------------------------------------


def test_an_image_behind_five_redirects_is_fetched(mm_server, host):
    direct = generate(mm_server, url_body(host + "/image.png"))
    redirected = generate(mm_server, url_body(host + "/hops/5"))
    body = url_body("")
    body["multimodal_params"]["images"] = [{"type": "base64", "data": base64.b64encode(PNG).decode()}]
    sent = generate(mm_server, body)
    assert direct.status_code == redirected.status_code == sent.status_code == 200, redirected.text
    # The same image whichever way it came: the same tokens. Logprobs only to float rounding: a
    # repeated prompt is partly a prefix-cache hit, computed in other chunks than the first time.
    answers = [response.json()["tokens"] for response in (direct, redirected, sent)]
    assert [t["id"] for t in answers[0]] == [t["id"] for t in answers[1]] == [t["id"] for t in answers[2]]
    for tokens in answers[1:]:
        assert [t["logprob"] for t in tokens] == pytest.approx([t["logprob"] for t in answers[0]], abs=1e-4)


def test_more_than_five_redirects_are_refused(mm_server, host):
    assert "redirects more than 5 times" in refusal(mm_server, host + "/hops/6")


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/_x", "/to?file:///etc/passwd"],
)
def test_only_http_and_https_are_fetched(mm_server, host, url):
    url = host + url if url.startswith("/") else url
    message = refusal(mm_server, url)
    assert "is not http or https" in message and ("file" in message or url.split(":")[0] in message)


@pytest.mark.parametrize(
    "url", ["http://a..b/x.png", "http://.example.com/x.png", f"https://{'a' * 64}.com/x.png"]
)
def test_a_host_name_that_cannot_be_encoded_is_a_400(mm_server, url):
    """An empty label, or one over 63 characters, fails IDNA encoding before any lookup (it was
    an uncaught UnicodeError: a 500)."""
    assert "is not a valid host name" in refusal(mm_server, url)


def test_a_trickling_server_hits_the_deadline_of_the_whole_download(mm_server, host):
    started = time.monotonic()
    message = refusal(mm_server, host + "/trickle")
    assert "took longer than --image_fetch_timeout (2 s)" in message
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("path", ["/declared-huge", "/endless-chunked", "/endless-unframed"])
def test_a_body_beyond_max_image_bytes_is_refused_as_it_streams(mm_server, host, path):
    """Endless bodies: only a count of the bytes as they arrive stops them before the deadline."""
    message = refusal(mm_server, host + path)
    assert "--max_image_bytes allows" in message or "more than --max_image_bytes" in message


def test_a_body_is_what_its_content_length_says(mm_server, host):
    """A server that declares less than it sends has the declared bytes read, no more."""
    assert "truncated image" in refusal(mm_server, host + "/understated")


def test_the_server_serves_after_refusals(mm_server, host):
    assert generate(mm_server, url_body(host + "/image.png")).status_code == 200


# --- without it: only public addresses ---------------------------------------------------------------

PRIVATE_URLS = {
    "http://127.0.0.1:{port}/image.png": "a loopback",
    "http://localhost:{port}/image.png": "a loopback",
    "http://[::1]:{port}/image.png": "a loopback",
    "http://[::ffff:127.0.0.1]:{port}/image.png": "a loopback",
    "http://0.0.0.0:{port}/image.png": "an unspecified",
    "http://10.1.2.3/image.png": "a private",
    "http://192.168.0.1/image.png": "a private",
    "http://169.254.169.254/latest/meta-data/": "a link-local",
    "http://224.0.0.1/image.png": "a multicast",
    "http://100.64.0.1/image.png": "a non-public",
}


def test_without_the_flag_only_public_addresses_are_fetched_at_every_hop(model_dir, tmp_path):
    if os.environ.get(IN_NETNS) != "1":
        run_in_network_namespace(tmp_path, "test_without_the_flag_only_public_addresses")
        return
    public, public_server = serve_http(PUBLIC)
    loopback, loopback_server = serve_http("127.0.0.1")
    port = loopback.rsplit(":", 1)[1]
    server = start_server(model_dir, tmp_path, "--enable_multimodal")
    try:
        assert generate(server, url_body(public + "/image.png")).status_code == 200
        assert generate(server, url_body(public + "/hops/2")).status_code == 200
        for url, kind in PRIVATE_URLS.items():
            for sent in (url.format(port=port), f"{public}/to?{url.format(port=port)}"):
                message = refusal(server, sent)
                assert f"is {kind} address" in message and "--allow_private_image_urls" in message, sent
        assert generate(server, url_body(public + "/image.png")).status_code == 200
    finally:
        assert server.stop() == 0, server.log()
        public_server.shutdown()
        loopback_server.shutdown()


def run_in_network_namespace(tmp_path: Path, test_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    setup = f'ip link set lo up && ip addr add {PUBLIC}/32 dev lo && exec "$@"'
    pytest_args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--basetemp",
        str(tmp_path / "ns"),
    ]
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, "sh", *pytest_args, __file__, "-k", test_name],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, IN_NETNS: "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_the_fetcher_refuses_loopback_without_root_or_server():
    fetcher = ImageFetcher(2.0, 2**20, allow_private=False)
    with pytest.raises(FetchError, match="is a loopback address"):
        asyncio.run(fetcher.fetch("http://127.0.0.1:9/image.png"))


@pytest.mark.parametrize(
    "address, kind",
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("127.0.0.2", "a loopback"),
        ("::1", "a loopback"),
        ("::ffff:10.0.0.1", "a private"),
        ("172.16.5.4", "a private"),
        ("fc00::1", "a private"),
        ("fe80::1%eth0", "a link-local"),
        ("ff02::1", "a multicast"),
        ("239.255.255.250", "a multicast"),
        ("::", "an unspecified"),
        ("192.0.2.1", "a private"),  # documentation
    ],
)
def test_address_refusal(address, kind):
    assert address_refusal(address) == kind
