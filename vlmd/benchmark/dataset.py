"""Synthetic benchmark requests: random-word prompts, fixed output lengths, generated images of
one resolution, a given fraction of requests reusing images sent by earlier ones (embed-cache hits).

A new image is a new file: its bytes, and so its MD5 (the server's embedding and prefix cache key),
are its own. The pixels come from a small pool drawn once per run (`image_pixel_pool`), and each
file carries its serial number in a metadata chunk (PNG tEXt, JPEG COM): the server decodes, tiles
and encodes it as any image it has not seen, while the client neither spends seconds encoding
each 13-tile PNG nor holds thousands of them in memory (a background load of thousands of
requests would otherwise take minutes to draw before its first request).

Everything is a pure function of the seed, so two runs send the same requests.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

WORDS = (
    "the a an of to in on at for with from by about over under after before between into through "
    "cat dog house street city river mountain tree flower car bus train boat plane bird horse "
    "table chair window door book picture photo image chart map sign light shadow cloud rain snow "
    "red green blue yellow black white small large old new bright dark quiet busy happy tall "
    "walks runs sits stands looks shows holds carries opens reads writes paints builds grows "
    "morning evening night summer winter market garden kitchen office school station bridge park "
    "people child woman man friend family teacher driver farmer doctor artist worker player"
).split()


@dataclass(frozen=True)
class BenchImage:
    """An image file: one of the pool's encodings with a metadata chunk naming `serial`, built
    when it is sent (`bytes(image)`)."""

    pixels: bytes  # one of the pool's encoded files
    serial: int  # distinct per new image of a run
    image_format: str  # "png" | "jpeg"

    def __bytes__(self) -> bytes:
        note = f"vlmd bench image {self.serial}".encode()
        if self.image_format == "png":  # a tEXt chunk before IEND (the file's last 12 bytes)
            data = b"Comment\0" + note
            chunk = struct.pack(">I", len(data)) + b"tEXt" + data
            chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data))
            return self.pixels[:-12] + chunk + self.pixels[-12:]
        # a COM segment after SOI (the file's first 2 bytes)
        return self.pixels[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note + self.pixels[2:]

    def base64(self) -> str:
        """The file in base64, as request bodies carry it."""
        return base64.b64encode(bytes(self)).decode()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str  # the user's text; the backend adds the chat format and one placeholder per image
    prompt_len: int  # tokens of `prompt`: exact with a tokenizer, else its number of words
    output_len: int  # tokens asked for (max_new_tokens / max_tokens)
    images: tuple[BenchImage, ...]  # `bytes(image)`: the file
    image_format: str  # "png" | "jpeg"
    # A later turn of a conversation: the user messages after `prompt` so far, and the answers
    # before each of them (answers[j] came before turns[j]); the images go with the first.
    turns: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    followups: tuple[str, ...] = ()  # the conversation's later user messages, sent one per turn

    @property
    def turn(self) -> int:
        return len(self.turns) + 1

    def next_turn(self, answer: str) -> BenchRequest:
        """The conversation's next turn, once this one was answered with `answer`."""
        return replace(self, turns=self.followups[: self.turn], answers=(*self.answers, answer))


@dataclass(frozen=True)
class DatasetConfig:
    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0  # lengths drawn uniformly from [len * (1 - r), len * (1 + r)]
    images_per_request: int = 0
    image_width: int = 448
    image_height: int = 448
    image_format: str = "jpeg"
    image_reuse_fraction: float = 0.0  # of the requests, those whose images were all sent before
    image_pixel_pool: int = 8  # distinct pixel images drawn; every new image is still a new file
    seed: int = 0
    turns: int = 1  # turns per conversation (each request is a conversation's first turn)
    turn_input_len: int = 32  # words of each later user message

    def __post_init__(self) -> None:
        assert self.num_requests >= 0 and self.input_len >= 1 and self.output_len >= 1
        assert 0.0 <= self.range_ratio < 1.0 and 0.0 <= self.image_reuse_fraction <= 1.0
        assert self.image_format in ("png", "jpeg") and self.image_pixel_pool >= 1


def make_image(width: int, height: int, rng: np.random.Generator, image_format: str) -> bytes:
    """Coarse random blocks plus fine noise: structure at several scales, like a photo, and
    a distinct MD5 for every call."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-24, 24, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)  # [height, width, 3]
    out = io.BytesIO()
    Image.fromarray(pixels).save(
        out, format=image_format.upper(), **({"quality": 90} if image_format == "jpeg" else {})
    )
    return out.getvalue()


def build_requests(config: DatasetConfig, tokenizer=None) -> list[BenchRequest]:
    """`config.num_requests` requests; exactly round(fraction * n) of them (never the first)
    reuse images of earlier requests, chosen at random."""
    rng = random.Random(config.seed)
    pixels_rng = np.random.default_rng(config.seed)
    n = config.num_requests
    num_reusers = min(round(config.image_reuse_fraction * n), max(n - 1, 0))
    reusers = set(rng.sample(range(1, n), num_reusers)) if num_reusers else set()
    sent: list[BenchImage] = []
    pool: list[bytes] = []
    requests = []
    for i in range(n):
        if config.images_per_request and i in reusers:
            images = [rng.choice(sent) for _ in range(config.images_per_request)]
        else:
            images = []
            for _ in range(config.images_per_request):
                if len(pool) < config.image_pixel_pool:
                    pool.append(
                        make_image(config.image_width, config.image_height, pixels_rng, config.image_format)
                    )
                images.append(BenchImage(pool[len(sent) % len(pool)], len(sent), config.image_format))
                sent.append(images[-1])
        prompt, prompt_len = random_prompt(_vary(config.input_len, config.range_ratio, rng), rng, tokenizer)
        output_len = _vary(config.output_len, config.range_ratio, rng)
        followups = tuple(
            random_prompt(config.turn_input_len, rng, tokenizer)[0] for _ in range(config.turns - 1)
        )
        requests.append(
            BenchRequest(
                prompt, prompt_len, output_len, tuple(images), config.image_format, followups=followups
            )
        )
    return requests


def random_prompt(num_tokens: int, rng: random.Random, tokenizer=None) -> tuple[str, int]:
    """Random words; with a tokenizer, cut and re-encoded until they are `num_tokens` tokens
    (a cut can merge differently when re-encoded: the closest length after a few tries wins)."""
    words = [rng.choice(WORDS) for _ in range(num_tokens)]
    if tokenizer is None:
        return " ".join(words), num_tokens
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    while len(ids) < num_tokens:
        ids += tokenizer.encode(" " + rng.choice(WORDS), add_special_tokens=False)
    best = None
    for _ in range(8):
        text = tokenizer.decode(ids[:num_tokens])
        ids = tokenizer.encode(text, add_special_tokens=False)
        if best is None or abs(len(ids) - num_tokens) < abs(best[1] - num_tokens):
            best = (text, len(ids))
        if len(ids) == num_tokens:
            break
        while len(ids) < num_tokens:
            ids += tokenizer.encode(" " + rng.choice(WORDS), add_special_tokens=False)
    return best


def _vary(length: int, ratio: float, rng: random.Random) -> int:
    if ratio == 0.0:
        return length
    return max(1, rng.randint(int(length * (1 - ratio)), int(length * (1 + ratio))))
