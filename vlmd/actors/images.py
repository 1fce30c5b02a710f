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
    """An image of the request cannot be used; the message says which and why, `param` names the
    request field at fault where one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    md5: str  # the embed-cache key (`embed_key`)
    num_tiles: int
    resize_to: tuple[int, int] | None = None  # (width, height) the vision actor downscales it to
    max_tiles: int = 0  # the image's tile limit; 0: the server's

    def ref(self, bytes_shm: str, token_offset: int, num_tokens: int) -> ImageRef:
        """The image as the scheduler and the vision actor see it, its bytes in `bytes_shm`."""
        width, height = self.resize_to or (0, 0)
        return ImageRef(
            self.md5,
            bytes_shm,
            len(self.data),
            self.num_tiles,
            token_offset,
            num_tokens,
            width,
            height,
            self.max_tiles,
        )


def embed_key(md5: str, resize_to: tuple[int, int] | None = None, max_tiles: int = 0) -> str:
    """The embed-cache key of an image: the MD5 of its bytes when the server's settings apply,
    else an MD5 over it and every setting that changes the embeddings, so that the same bytes
    tiled two ways are two entries."""
    settings = []
    if resize_to is not None:
        settings.append(f"{resize_to[0]}x{resize_to[1]}")
    if max_tiles:
        settings.append(f"max_tiles={max_tiles}")
    if not settings:
        return md5
    return hashlib.md5(":".join([md5, *settings]).encode()).hexdigest()


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
        max_tiles = self._tile_limit(index, image.max_dynamic_patch)
        tiling = self.tiling.with_max_tiles(max_tiles)
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
            key = embed_key(md5, max_tiles=max_tiles)
            return CheckedImage(data, key, num_tiles(width, height, tiling), max_tiles=max_tiles)
        if not image.resize_to_fit:
            raise BadImage(self._too_large(index, width, height))
        resize_to = fit_within(width, height, self.max_pixels)
        key = embed_key(md5, resize_to, max_tiles)
        return CheckedImage(data, key, num_tiles(*resize_to, tiling), resize_to, max_tiles)

    def _tile_limit(self, index: int, max_dynamic_patch: int | None) -> int:
        """The image's tile limit as ImageRef carries it: 0 where the server's tiles apply (no limit,
        the server's own, or a model that makes one tile of every image)."""
        if max_dynamic_patch is None:
            return 0
        check_tile_limit(max_dynamic_patch, self.tiling.max_tiles, "max_dynamic_patch", f"image {index}: ")
        if max_dynamic_patch == self.tiling.max_tiles or not self.tiling.crop_to_patches:
            return 0
        return max_dynamic_patch

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
        except httpx.InvalidURL as exc:  # not an httpx.HTTPError: raised before any request
            raise BadImage(f"image {index}: invalid URL {url[:64]!r}: {exc}") from None
        except httpx.TimeoutException:
            raise BadImage(f"image {index}: fetching {url} timed out") from None
        except httpx.HTTPError as exc:
            raise BadImage(f"image {index}: fetching {url} failed: {exc}") from None

    def _remember(self, md5: str, size: tuple[int, int]) -> None:
        self._size_by_md5[md5] = size
        if len(self._size_by_md5) > self._cache_size:
            self._size_by_md5.popitem(last=False)


def check_tile_limit(value: int, server_max_tiles: int, param: str, where: str = "") -> None:
    """A request's tile limit must lie in 1..--max_tiles (the server's); BadImage names `param`."""
    if not 1 <= value <= server_max_tiles:
        raise BadImage(
            f"{where}`{param}` must be between 1 and the server's max tiles ({server_max_tiles}, "
            f"--max_tiles), got {value}",
            param,
        )


def _decode_base64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"image {index}: invalid base64 data") from None
