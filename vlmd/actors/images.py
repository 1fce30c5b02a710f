"""Fetching and checking request images in the http actor (before anything is scheduled)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import httpx

from vlmd.api import ImageInput
from vlmd.image import ImageError, TilingConfig, decode_image, num_tiles


class BadImage(ValueError):
    """An image of the request cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    md5: str
    num_tiles: int


class ImageChecker:
    """Fetches image bytes, decodes them once to validate and measure them, computes the MD5.

    Sizes are remembered by MD5, so an image sent again is not decoded again here.
    """

    def __init__(
        self, tiling: TilingConfig, fetch_timeout: float, max_bytes: int, cache_size: int = 4096
    ) -> None:
        self.tiling = tiling
        self.max_bytes = max_bytes
        self.client = httpx.AsyncClient(timeout=fetch_timeout, follow_redirects=True)
        self._tiles_by_md5: OrderedDict[str, int] = OrderedDict()
        self._cache_size = cache_size

    async def check_all(self, images: list[ImageInput]) -> list[CheckedImage]:
        return list(await asyncio.gather(*(self.check(i, image) for i, image in enumerate(images))))

    async def check(self, index: int, image: ImageInput) -> CheckedImage:
        data = await self._load_bytes(index, image)
        md5 = hashlib.md5(data).hexdigest()
        tiles = self._tiles_by_md5.get(md5)
        if tiles is None:
            try:
                decoded = await asyncio.to_thread(decode_image, data)
            except ImageError as exc:
                raise BadImage(f"image {index}: {exc}") from None
            tiles = num_tiles(decoded.width, decoded.height, self.tiling)
            self._remember(md5, tiles)
        return CheckedImage(data, md5, tiles)

    async def _load_bytes(self, index: int, image: ImageInput) -> bytes:
        if image.type == "base64":
            return _decode_base64(index, image.data)
        if image.type == "url":
            return await self._fetch(index, image.data)
        raise BadImage(f"image {index}: unsupported type {image.type!r} (expected 'url' or 'base64')")

    async def _fetch(self, index: int, url: str) -> bytes:
        if url.startswith("data:"):
            return _decode_base64(index, url.partition(",")[2])
        if not url.startswith(("http://", "https://")):
            raise BadImage(f"image {index}: URL must be http(s) or a data: URI, got {url[:64]!r}")
        try:
            async with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise BadImage(f"image {index}: fetching {url} returned HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise BadImage(f"image {index}: {url} is larger than {self.max_bytes} bytes")
                return bytes(data)
        except httpx.TimeoutException:
            raise BadImage(f"image {index}: fetching {url} timed out") from None
        except httpx.HTTPError as exc:
            raise BadImage(f"image {index}: fetching {url} failed: {exc}") from None

    def _remember(self, md5: str, tiles: int) -> None:
        self._tiles_by_md5[md5] = tiles
        if len(self._tiles_by_md5) > self._cache_size:
            self._tiles_by_md5.popitem(last=False)


def _decode_base64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"image {index}: invalid base64 data") from None
