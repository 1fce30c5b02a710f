"""Fetching image URLs on a client's behalf, without letting a client reach what the server can.

A URL is a request the server makes from inside its network, so every hop is checked where it
connects: the host is resolved once, and only an address that passes the check is dialled (a
name that resolves to a public address when checked and a private one when dialled gets no
second resolution to exploit). Redirects are followed here, at most MAX_REDIRECTS, each one's
scheme checked. One deadline bounds the whole download, redirects included, and the size cap
counts bytes as they arrive, so neither a trickling server nor a lying or missing Content-Length
holds the server. Proxies from the environment are not used: the check must see the destination.

httpcore (httpx's transport) does the HTTP: it takes a network backend, which is where the check
lives; httpx parses and joins URLs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpcore
import httpx

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
SCHEMES = ("http", "https")
# Identity: images are compressed already, and the size cap then counts the bytes that are stored.
HEADERS = [(b"User-Agent", b"vlmd"), (b"Accept", b"image/*"), (b"Accept-Encoding", b"identity")]


class FetchError(Exception):
    """Why a URL was not fetched, in words for the client who sent it."""


def address_refusal(address: str) -> str | None:
    """What kind of address `address` is, if the server must not fetch from it: one that reaches
    the server itself or its internal network rather than the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 scope ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    kinds = [
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("an unspecified", ip.is_unspecified),  # 0.0.0.0 reaches this host
        ("a private", ip.is_private),
        ("a non-public", not ip.is_global),  # shared (carrier NAT), reserved, documentation
    ]
    return next((kind for kind, matches in kinds if matches), None)


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, dialling only addresses that pass `address_refusal`."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address=None, socket_options=None
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        allowed = [a for a in addresses if self.allow_private or address_refusal(a) is None]
        if not allowed:
            raise FetchError(
                f"{host} is {address_refusal(addresses[0])} address; this server fetches images only "
                "from public addresses unless started with --allow_private_image_urls"
            )
        for address in allowed[:-1]:  # as a browser would: the next address if one does not answer
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                pass
        return await self.inner.connect_tcp(allowed[-1], port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout=None, socket_options=None):
        raise FetchError("image URLs cannot name a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve {host}: {exc.strerror}") from None
    except UnicodeError as exc:  # the IDNA encoding of a label that is empty or over 63 characters
        raise FetchError(f"{host} is not a valid host name: {exc}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))  # in the resolver's order, once each


class ImageFetcher:
    """Downloads image URLs under --image_fetch_timeout and --max_image_bytes."""

    def __init__(self, timeout_s: float, max_bytes: int, allow_private: bool) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.pool = httpcore.AsyncConnectionPool(
            network_backend=CheckedBackend(allow_private), max_connections=100, max_keepalive_connections=20
        )

    async def fetch(self, url: str) -> bytes:
        """The body of `url` after redirects; FetchError says why there is none."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(url)
        except TimeoutError:
            raise FetchError(
                f"fetching {url} took longer than --image_fetch_timeout ({self.timeout_s:g} s)"
            ) from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise FetchError(f"fetching {url} failed: {str(exc) or type(exc).__name__}") from None

    async def _follow(self, url: str) -> bytes:
        target = _checked_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            async with self.pool.stream("GET", _core_url(target), headers=HEADERS) as response:
                location = _header(response, b"location")
                if response.status in REDIRECT_STATUSES and location is not None:
                    target = _checked_url(location, base=target)
                    continue
                if response.status != 200:
                    raise FetchError(f"fetching {target} returned HTTP {response.status}")
                return await self._read(target, response)
        raise FetchError(f"{url} redirects more than {MAX_REDIRECTS} times")

    async def _read(self, url: httpx.URL, response: httpcore.Response) -> bytes:
        declared = _header(response, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError(f"{url} has {declared} bytes; --max_image_bytes allows {self.max_bytes}")
        data = bytearray()
        async for chunk in response.aiter_stream():
            data += chunk
            if len(data) > self.max_bytes:
                raise FetchError(f"{url} has more than --max_image_bytes ({self.max_bytes}) bytes")
        return bytes(data)


def _checked_url(url: str, base: httpx.URL | None = None) -> httpx.URL:
    """`url` (a redirect's Location: joined to `base`), if its scheme is http or https."""
    try:
        parsed = httpx.URL(url) if base is None else base.join(url)
    except httpx.InvalidURL as exc:
        raise FetchError(f"invalid URL {url[:200]!r}: {exc}") from None
    fault = None
    if parsed.scheme not in SCHEMES:
        fault = f"scheme {parsed.scheme!r} is not http or https"
    elif not parsed.host:
        fault = "it names no host"
    if fault is not None:
        raise FetchError(f"{base} redirects to {parsed}: {fault}" if base else f"{parsed}: {fault}")
    return parsed


def _core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    value = next((v for k, v in response.headers if k.lower() == name), None)
    return None if value is None else value.decode("latin-1").strip()
