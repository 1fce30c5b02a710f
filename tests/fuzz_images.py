"""Adversarial images for tests/test_fuzz.py: odd sizes, modes and formats that must decode (or be
refused with a 400), and damaged files; `damaged` corrupts a valid one where hypothesis says."""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image

from tests.conftest import make_image

TOO_MANY_PIXELS = "54-megapixel png"


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(make_image(width, height, seed=seed))).convert("RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims `width x height` and whose pixel data is one byte."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0")) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _tiff_samples_per_pixel(count: int) -> bytes:
    """An 8 x 8 RGB TIFF whose SamplesPerPixel tag (277, one SHORT) says `count`."""
    entry = b"\x15\x01\x03\x00\x01\x00\x00\x00"
    return _save(Image.new("RGB", (8, 8)), "TIFF").replace(
        entry + b"\x03\x00", entry + struct.pack("<H", count)
    )


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(_rgb(60, 40), "JPEG", exif=exif.tobytes())


@cache
def valid_images() -> dict[str, bytes]:
    """Images a server must accept: every mode and format of an upload, and extreme shapes."""
    small = _rgb(48, 36, seed=1)
    frames = [small, _rgb(48, 36, seed=2)]
    sixteen_bit = Image.fromarray((np.arange(48 * 36, dtype=np.uint16) * 37).reshape(36, 48))
    transparent = small.convert("P")
    return {
        "1x1": _save(_rgb(1, 1), "PNG"),
        "1x30000": _save(_rgb(1, 30000), "PNG"),
        "30000x1": _save(_rgb(30000, 1), "PNG"),
        "cmyk jpeg": _save(small.convert("CMYK"), "JPEG"),
        "cmyk tiff": _save(small.convert("CMYK"), "TIFF"),
        "16-bit png": _save(sixteen_bit, "PNG"),
        "32-bit int tiff": _save(sixteen_bit.convert("I"), "TIFF"),
        "float tiff": _save(
            Image.fromarray(np.linspace(0, 1, 48 * 36, dtype=np.float32).reshape(36, 48)), "TIFF"
        ),
        "palette png": _save(small.convert("P"), "PNG"),
        "palette png with transparency": _save(transparent, "PNG", transparency=0),
        "grey + alpha png": _save(small.convert("LA"), "PNG"),
        "1-bit png": _save(small.convert("1"), "PNG"),
        "rgba webp": _save(small.convert("RGBA"), "WEBP"),
        "animated gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "animated png": _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "animated webp": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "exif rotated jpeg": _exif_jpeg(6),
        "exif orientation 99": _exif_jpeg(99),
        "progressive jpeg": _save(small, "JPEG", progressive=True),
        "bmp": _save(small, "BMP"),
        "ico": _save(small, "ICO"),
        "tga": _save(small, "TGA"),
        "ppm": _save(small, "PPM"),
        # Beyond the default --max_image_pixels (50 M) in 7 kB: refused, or decoded and downscaled
        # when the request sets resize_to_fit.
        TOO_MANY_PIXELS: _save(Image.new("P", (9000, 6000)), "PNG"),
    }


@cache
def broken_images() -> dict[str, bytes]:
    """Bytes a server must refuse with a 400 naming the image."""
    png = make_image(64, 48, seed=3)
    jpeg = make_image(64, 48, seed=3, fmt="JPEG")
    return {
        "empty": b"",
        "text": b"just some text, no pixels",
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        "postscript": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "truncated png": png[: len(png) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "png header only": _png_header_only(64, 48),
        "png claiming 100000 x 100000": _png_header_only(100_000, 100_000),
        "png claiming 0 x 0": _png_header_only(0, 0),
        "tiff claiming 23299 samples per pixel": _tiff_samples_per_pixel(23299),
    }


def damaged(base: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    """`base` cut to `cut` bytes (None: whole) with bytes XORed at positions taken modulo its length."""
    data = bytearray(base if cut is None else base[: max(0, min(cut, len(base)))])
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask or 0xFF
    return bytes(data)


@cache
def damage_bases() -> list[bytes]:
    """Small valid images of several formats for `damaged` to work on."""
    small = _rgb(40, 30, seed=4)
    return [_save(small, fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")]
