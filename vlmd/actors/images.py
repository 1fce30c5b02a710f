"""Fetching, checking and preprocessing request images in the http actor (before anything is
scheduled).

The http actor's event loop also forwards every token to its client, so nothing here holds it
for long: a 13-tile PNG arrives as about 8 MB of base64, which the standard library decodes in
about 20 ms and hashes in about 10 (and a chat client resends it with every turn). Its base64
is decoded by pybase64 (about 1 ms), hashed and written into shared memory on a thread of their
own (`in_bytes_thread`), without the GIL, while the loop goes on; a preprocess worker reads them
there (not through the loop's socket to it), as the vision actor does.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import pybase64

from vlmd import shm
from vlmd.actors.fetch import FetchError, ImageFetcher
from vlmd.actors.preprocess import NO_SHARED_MEMORY, TOO_LARGE, PreprocessPool
from vlmd.api import ImageInput
from vlmd.image import TilingConfig, fit_within, num_tiles
from vlmd.messages import ImageRef
from vlmd.shm import SharedBytes, SharedPixels


class BadImage(ValueError):
    """An image of the request cannot be used; the message says which and why, `param` names the
    request field at fault where one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.index: int | None = None  # the request's image at fault (set by `check_all`)


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    md5: str  # the embed-cache key (`embed_key`)
    num_tiles: int
    resize_to: tuple[int, int] | None = None  # (width, height) the vision actor downscales it to
    max_tiles: int = 0  # the image's tile limit; 0: the server's
    pixels_shm: str = ""  # its tiles, held for the check (`ImageChecker.release`); "": none here
    bytes_shm: str = ""  # its bytes, held for the check as its tiles are

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
            self.pixels_shm,
        )


class HeldImages:
    """The shared-memory segments of submitted requests' images, each shared by every request of
    its key: the bytes (`SharedBytes`), and the tiles where the check has them (`SharedPixels`)."""

    def __init__(self, prefix: str) -> None:
        self.bytes = SharedBytes(prefix)
        self.pixels = SharedPixels()

    def hold(self, checked: list[CheckedImage], spans: list) -> tuple[list[ImageRef], list[str], list[str]]:
        """Each image's ref (placed at its span) and the segments held for the request: bytes
        (which the check wrote), tiles."""
        segments = [self.bytes.hold(image.bytes_shm) for image in checked]
        pixels = [self.pixels.hold(image.pixels_shm) for image in checked if image.pixels_shm]
        refs = [
            image.ref(name, span.token_offset, span.num_tokens)
            for image, span, name in zip(checked, spans, segments, strict=True)
        ]
        return refs, segments, pixels

    def release(self, segments: list[str], pixel_segments: list[str]) -> None:
        for name in segments:
            self.bytes.release(name)
        for name in pixel_segments:
            self.pixels.release(name)


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


class NoSharedMemory(Exception):
    """/dev/shm had no room for an image's bytes or tiles: a 503."""


class ImageChecker:
    """Fetches image bytes, computes the MD5, and has an image it has not seen decoded, checked,
    tiled by the preprocess pool, once: the tiles go on to the ViT in shared memory.

    An image of more than `max_bytes` bytes (--max_image_bytes, however it came) is refused; one
    of more than `max_pixels` pixels is refused from its header alone, unless the request asks for
    `resize_to_fit`: then it is decoded and downscaled. Sizes are remembered by MD5, so an image
    sent again is not decoded again: its embeddings are most likely in the vision actor's cache,
    and where they are not, the vision front has the bytes preprocessed then (or shares the tiles
    of a request of the same key that holds them here).

    A checked image holds its bytes in shared memory (`CheckedImage.bytes_shm`, one segment per
    MD5, written off the event loop: the preprocess worker reads them there, as the vision actor
    does later) and may hold its tiles (`CheckedImage.pixels_shm`): the caller lets go of both
    with `release` once the request is submitted (which takes holds of its own) or refused.
    """

    def __init__(
        self,
        tiling: TilingConfig,
        fetcher: ImageFetcher,
        max_pixels: int,
        pool: PreprocessPool | None = None,
        pixels: SharedPixels | None = None,
        cache_size: int = 4096,
        image_bytes: SharedBytes | None = None,
    ) -> None:
        self.tiling = tiling
        self.fetcher = fetcher
        self.max_bytes = fetcher.max_bytes
        self.max_pixels = max_pixels
        if pool is None:  # in process: tests
            pool = PreprocessPool(tiling, f"{shm.segment_prefix(os.getpid())}px-check-")
        self.pool = pool
        self.pixels = SharedPixels() if pixels is None else pixels  # an empty one is falsy
        if image_bytes is None:  # in process: tests
            image_bytes = SharedBytes(f"{shm.segment_prefix(os.getpid())}bytes-check-")
        self.bytes = image_bytes
        self._size_by_md5: OrderedDict[str, tuple[int, int]] = OrderedDict()  # upright (width, height)
        self._cache_size = cache_size

    async def check_all(self, images: list[ImageInput]) -> list[CheckedImage]:
        """Every image checked, or the first error with nothing held (the others are cancelled)."""
        tasks = [asyncio.ensure_future(self._check_indexed(i, image)) for i, image in enumerate(images)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.release([t.result() for t in tasks if not t.cancelled() and t.exception() is None])
            raise

    async def _check_indexed(self, index: int, image: ImageInput) -> CheckedImage:
        try:
            return await self.check(index, image)
        except BadImage as exc:
            exc.index = index
            raise

    def release(self, checked: list[CheckedImage]) -> None:
        """Let go of the bytes and tiles the checked images hold."""
        for image in checked:
            if image.bytes_shm:
                self.bytes.release(image.bytes_shm)
            if image.pixels_shm:
                self.pixels.release(image.pixels_shm)

    async def check(self, index: int, image: ImageInput) -> CheckedImage:
        max_tiles = self._tile_limit(index, image.max_dynamic_patch)
        data = await self._load_bytes(index, image)
        md5 = await md5_hex(data)
        try:
            bytes_shm = await self.bytes.acquire_async(md5, data, partial(in_bytes_thread, len(data)))
        except OSError as exc:
            raise NoSharedMemory(f"no shared memory for an image's bytes: {exc}") from None
        try:
            checked = await self._check_held(index, image, data, md5, max_tiles, bytes_shm)
        except BaseException:
            self.bytes.release(bytes_shm)
            raise
        return replace(checked, bytes_shm=bytes_shm)

    async def _check_held(
        self, index: int, image: ImageInput, data: bytes, md5: str, max_tiles: int, bytes_shm: str
    ) -> CheckedImage:
        """`check`, its bytes held in `bytes_shm`: the image measured, and preprocessed if new."""
        size = self._size_by_md5.get(md5)
        if size is not None:
            checked = self._measure(index, image, data, md5, size, max_tiles)
            return replace(checked, pixels_shm=self.pixels.acquire(checked.md5))
        answer, name = await self.pool.run(
            self.max_pixels, image.resize_to_fit, max_tiles, bytes_shm, len(data), data
        )
        if answer.error_kind == TOO_LARGE:
            raise BadImage(self._too_large(index, answer.width, answer.height))
        if answer.error_kind == NO_SHARED_MEMORY:
            raise NoSharedMemory(f"no shared memory for an image's tiles: {answer.error}")
        if answer.error_kind:
            raise BadImage(f"image {index}: {answer.error}")
        try:
            checked = self._measure(index, image, data, md5, (answer.width, answer.height), max_tiles)
            assert checked.num_tiles == answer.num_tiles, "the tile count and the tiles disagree"
        except BaseException:
            shm.unlink_segment(name)
            raise
        self._remember(md5, (answer.width, answer.height))
        return replace(checked, pixels_shm=self.pixels.adopt(checked.md5, name))

    def _measure(
        self, index: int, image: ImageInput, data: bytes, md5: str, size: tuple[int, int], max_tiles: int
    ) -> CheckedImage:
        """The image's key and tile count from its upright size, holding no tiles."""
        tiling = self.tiling.with_max_tiles(max_tiles)
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
        if image.type == "base64" or (image.type == "url" and is_data_url(image.data)):
            data = await decode_base64(index, image.data)
            if len(data) > self.max_bytes:
                raise BadImage(
                    f"image {index} has {len(data)} bytes; --max_image_bytes allows {self.max_bytes}"
                )
            return data
        if image.type == "url":
            try:
                return await self.fetcher.fetch(image.data)
            except FetchError as exc:
                raise BadImage(f"image {index}: {exc}") from None
        raise BadImage(f"image {index}: unsupported type {image.type!r} (expected 'url' or 'base64')")

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


async def decode_base64(index: int, text: str) -> bytes:
    """`base64.b64decode(text, validate=True)` (after a data: URL's comma, its whitespace removed:
    the line breaks of MIME's 76-column base64, which LightLLM's lenient decode takes): what it
    returns, and BadImage for what it rejects. A large text is decoded on the bytes thread
    (`in_bytes_thread`)."""
    if is_data_url(text) and "," not in text:
        raise BadImage(f"image {index}: a data URL needs a comma before its data")
    data = await in_bytes_thread(len(text), _decode_base64, text)
    if data is None:
        raise BadImage(f"image {index}: invalid base64 data")
    return data


def is_data_url(text: str) -> bool:
    """A data: URL (its scheme in any case, as every URL scheme)."""
    return text[:5].lower() == "data:"


_WHITESPACE = " \t\n\r\v\f"
_NO_WHITESPACE = str.maketrans("", "", _WHITESPACE)


def _decode_base64(text: str) -> bytes | None:
    """`_strict_base64` of the text after a data URL's comma; a text it refuses that has
    whitespace is tried again without it (no text with whitespace passes the strict decode, so
    the common one is not scanned first)."""
    if is_data_url(text):
        text = text.partition(",")[2]
    data = _strict_base64(text)
    if data is None and any(char in text for char in _WHITESPACE):  # refused for its line breaks?
        data = _strict_base64(text.translate(_NO_WHITESPACE))
    return data


def _strict_base64(text: str) -> bytes | None:
    """pybase64's strict decode (SIMD: about 20x the standard library's speed; it lets go of the
    GIL on a str) under the standard library's rules for padding, which differ from pybase64's
    only where the text is padded beyond a whole quantum: there the padding is dropped first."""
    end = text[-8:]  # the final run of '=', counted without copying the text
    pads = len(end) - len(end.rstrip("="))
    if pads == len(end):
        pads = len(text) - len(text.rstrip("="))
    body = len(text) - pads  # the characters before it
    # The final run of '=' as the one call takes it: any number after whole quanta (but not
    # alone), else as many as the last quantum lacks. pybase64 refuses any '=' before it, and
    # any beyond a whole quantum: those are dropped.
    whole = body % 4 == 0
    if whole:
        accepted = body > 0 or not pads
    else:
        accepted = pads == {2: 2, 3: 1}.get(body % 4)
    if not accepted:
        return None
    try:
        return pybase64.b64decode(text[:body] if whole and pads else text, validate=True)
    except (binascii.Error, ValueError):
        return None


async def md5_hex(data: bytes) -> str:
    """hashlib.md5(data).hexdigest(); for a large image on the bytes thread."""
    return await in_bytes_thread(len(data), _md5_hex, data)


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# Below this many bytes an image's bytes are decoded or hashed on the event loop (a thread's
# hand-off would cost more than the work).
THREAD_BYTES = 1 << 18
# Larger ones on one thread of their own, one after another: pybase64 and hashlib let it run
# without the GIL, and one thread takes at most one core from the event loop's (eight MD5s on
# threads of their own, on a 2-core machine, had the loop wake 45 ms late).
_BYTES_THREAD = ThreadPoolExecutor(1, thread_name_prefix="image-bytes")


async def in_bytes_thread(size: int, fn, *args):
    """fn(*args), on the bytes thread where `size` is THREAD_BYTES or more, else right here."""
    if size < THREAD_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_BYTES_THREAD, fn, *args)
