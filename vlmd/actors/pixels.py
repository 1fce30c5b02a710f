"""The vision front's hold on the tiles of a batch while a ViT replica encodes it.

The tiles of an image usually come from the http actor, which had the image preprocessed when it
first saw its bytes and holds the segment for every request of the key (`vlmd.shm.SharedPixels`)
until the request's first token. The front takes a hold of its own for the encode: a hard link
to the segment, so that the tiles outlive a request that disconnects meanwhile (a segment is
unlinked when its last name goes, and a replica in another process reads it by the front's
name). Where the tiles are gone or never were (an image sent again, whose embeddings the cache
no longer has), the front has the bytes preprocessed by the pool; the bytes are held by every
request waiting for the image, as before this front existed. Either way, each request's image is
decoded once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass, field

import msgspec

from vlmd import shm
from vlmd.actors.launch import Launch
from vlmd.actors.preprocess import (
    NO_BYTES,
    NO_SHARED_MEMORY,
    PreprocessPool,
    PreprocessWorkerGone,
    connect_workers,
)
from vlmd.image import TilingConfig
from vlmd.messages import ImageRef

log = logging.getLogger("vlmd.vision")

BYTES_GONE = "the image's bytes are no longer available"


@dataclass
class HeldBatch:
    """A batch's images, each naming tiles the front owns, or with an error (and its status)."""

    images: list[ImageRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # per image: "" or why it has no tiles
    statuses: list[int] = field(default_factory=list)  # per image: the HTTP status of its error
    owned: list[str] = field(default_factory=list)  # segment names (links or new) to unlink after


class PassThroughPixels:
    """The images as they came: for a stand-in replica in tests, which reads what it likes."""

    num_images: list[int] = []  # preprocessed per worker: none

    async def hold(self, images: list[ImageRef]) -> HeldBatch:
        return HeldBatch(list(images), [""] * len(images), [400] * len(images))

    def release(self, held: HeldBatch) -> None:
        pass


class FrontPixels:
    """Tiles for the vision front's batches: linked from the http actor's, else made by the pool."""

    def __init__(self, pool: PreprocessPool, max_pixels: int) -> None:
        self.pool = pool
        self.max_pixels = max_pixels  # --max_image_pixels, as the http actor checked the image
        self._link_ids = itertools.count()

    @classmethod
    async def connect(cls, launch: Launch) -> FrontPixels:
        args = launch.args
        tiling = TilingConfig.from_model_dir(
            args.model_dir, min_tiles=args.min_tiles, max_tiles=args.max_tiles
        )
        pool = PreprocessPool.for_actor(launch, tiling, "vision", await connect_workers(launch, "vision"))
        return cls(pool, args.max_image_pixels)

    @property
    def num_images(self) -> list[int]:
        """Images each preprocess worker did for this front."""
        return self.pool.num_images

    async def hold(self, images: list[ImageRef]) -> HeldBatch:
        """The batch's tiles, held until `release`; the images without tiles go to the pool together."""
        held = HeldBatch()
        for image, (name, error, status) in zip(
            images, await asyncio.gather(*(self._hold_one(image) for image in images)), strict=True
        ):
            if name:
                held.owned.append(name)
            held.images.append(msgspec.structs.replace(image, pixels_shm=name))
            held.errors.append(error)
            held.statuses.append(status)
        return held

    async def _hold_one(self, image: ImageRef) -> tuple[str, str, int]:
        name = self._link(image)
        return (name, "", 200) if name else await self._preprocess(image)

    def release(self, held: HeldBatch) -> None:
        for name in held.owned:
            shm.unlink_segment(name)
        held.owned = []

    def _link(self, image: ImageRef) -> str:
        """A name of the front's for the http actor's tiles of the image; "" if there are none."""
        if not image.pixels_shm:
            return ""
        name = f"{self.pool.prefix}link-{next(self._link_ids)}"
        try:
            os.link(os.path.join(shm.SHM_DIR, image.pixels_shm), os.path.join(shm.SHM_DIR, name))
        except OSError:  # FileNotFoundError: every request that held them has had its first token, or left
            return ""
        return name

    async def _preprocess(self, image: ImageRef) -> tuple[str, str, int]:
        """(segment, "", 200) with the image's tiles made from its bytes, or ("", why, status)."""
        resized = image.resize_width > 0
        try:
            answer, name = await self.pool.run(
                self.max_pixels, resized, image.max_tiles, image.bytes_shm, image.num_bytes
            )
        except PreprocessWorkerGone:
            return "", "the server is stopping: an image preprocessing worker is gone", 503
        if answer.error_kind == NO_BYTES:
            log.info("cannot read image bytes (no request holds them any more): %s", answer.error)
            return "", BYTES_GONE, 400
        if answer.error_kind == NO_SHARED_MEMORY:
            return "", "the server is out of shared memory for images; retry later", 503
        if answer.error_kind:  # the http actor decoded these bytes once already
            return "", f"the image cannot be preprocessed: {answer.error}", 400
        assert answer.num_tiles == image.num_tiles, "http and vision disagree on the tile count"
        return name, "", 200
