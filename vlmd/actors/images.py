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
from vlmd.image import ImageError, ImageTooLarge, TilingConfig, decode_image, fit_within, num_tiles
from vlmd.messages import ImageRef


class BadImage(ValueError):
    """An image of the request cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    md5: str  # the embed-cache key: MD5 of the bytes, or of the bytes and the size when resized
    num_tiles: int
    resize_to: tuple[int, int] | None = None  # (width, height) the vision actor downscales it to

    def ref(self, bytes_shm: str, token_offset: int, num_tokens: int) -> ImageRef:
        """The image as the scheduler and the vision actor see it, its bytes in `bytes_shm`."""
        width, height = self.resize_to or (0, 0)
        return ImageRef(
            self.md5, bytes_shm, len(self.data), self.num_tiles, token_offset, num_tokens, width, height
        )


class ImageChecker:
    """Fetches image bytes, decodes them once to validate and measure them, computes the MD5.

    An image of more than `max_pixels` pixels is refused from its header alone, unless the
    request asks for `resize_to_fit`: then it is decoded and the vision actor downscales it.
    Sizes are remembered by MD5, so an image sent again is not decoded again here.
    """

    def __init__(
        self,
        tiling: TilingConfig,
        fetch_timeout: float,
        max_bytes: int,
        max_pixels: int,
        cache_size: int = 4096,
    ) -> None:
        self.tiling = tiling
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.client = httpx.AsyncClient(timeout=fetch_timeout, follow_redirects=True)
        self._size_by_md5: OrderedDict[str, tuple[int, int]] = OrderedDict()  # upright (width, height)
        self._cache_size = cache_size

    async def check_all(self, images: list[ImageInput]) -> list[CheckedImage]:
        return list(await asyncio.gather(*(self.check(i, image) for i, image in enumerate(images))))

    async def check(self, index: int, image: ImageInput) -> CheckedImage:
        data = await self._load_bytes(index, image)
        md5 = hashlib.md5(data).hexdigest()
        size = self._size_by_md5.get(md5)
        if size is None:
            try:
                limit = None if image.resize_to_fit else self.max_pixels
                decoded = await asyncio.to_thread(decode_image, data, limit)
            except ImageTooLarge as exc:
                raise BadImage(self._too_large(index, exc.width, exc.height)) from None
            except ImageError as exc:
                raise BadImage(f"image {index}: {exc}") from None
            size = decoded.size
            self._remember(md5, size)
        width, height = size
        if width * height <= self.max_pixels:
            return CheckedImage(data, md5, num_tiles(width, height, self.tiling))
        if not image.resize_to_fit:
            raise BadImage(self._too_large(index, width, height))
        resize_to = fit_within(width, height, self.max_pixels)
        resized_md5 = hashlib.md5(f"{md5}:{resize_to[0]}x{resize_to[1]}".encode()).hexdigest()
        return CheckedImage(data, resized_md5, num_tiles(*resize_to, self.tiling), resize_to)

    def _too_large(self, index: int, width: int, height: int) -> str:
        return (
            f"image {index} has {width} x {height} = {width * height} pixels; --max_image_pixels allows "
            f'{self.max_pixels} (send it smaller, or set "resize_to_fit": true on the image to downscale it)'
        )

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

    def _remember(self, md5: str, size: tuple[int, int]) -> None:
        self._size_by_md5[md5] = size
        if len(self._size_by_md5) > self._cache_size:
            self._size_by_md5.popitem(last=False)


def _decode_base64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"image {index}: invalid base64 data") from None
