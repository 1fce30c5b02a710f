"""Image preprocessing off the actors' event loops: a pool of `--preprocess_workers` processes.

A preprocess worker decodes an image's bytes (fully: that is what finds a truncated file), checks
its size against --max_image_pixels, downscales it if the request asked to fit, cuts its tiles
(`vlmd.image.tile_image`) and writes them, uint8 `[num_tiles, 3, tile, tile]` (the ViT normalises
them on its device), into a new shared-memory segment whose name the caller chose. Decoding and tiling
an image costs tens of milliseconds of one core, so one Python process would bound the server's
image throughput; N processes do N images at a time, beside the ViT.

The http actor asks for an image the first time it sees its bytes (it must decode them to answer
a bad image with a 400 before anything is scheduled), and hands the tiles on to the ViT; the
vision front asks only when an image it has to encode comes without them (`vlmd.actors.pixels`).
Each asks through its own `PreprocessPool`. The workers are actors of their own, started and
stopped by the supervisor with the rest; this module imports neither torch nor the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import msgspec
import numpy as np

from vlmd import ipc, shm
from vlmd.actors.launch import Launch, announce_ready
from vlmd.actors.metrics import IMAGE_STAGE_BUCKETS_S
from vlmd.core.histogram import Histogram
from vlmd.image import (
    ImageError,
    ImageTooLarge,
    TilingConfig,
    decode_image,
    downscale,
    fit_within,
    tile_image,
)
from vlmd.messages import Hello, ImagePreprocessed, PreprocessImage

log = logging.getLogger("vlmd.preprocess")

# ImagePreprocessed.error_kind: what the caller answers.
BAD_IMAGE = "bad"  # a 400 with `error`
TOO_LARGE = "too_large"  # a 400: width x height beyond max_pixels (found from the header)
NO_SHARED_MEMORY = "no_shm"  # a 503: /dev/shm had no room for the tiles
NO_BYTES = "gone"  # the segment of the bytes is gone (no request holds them any more)


class PreprocessWorkerGone(Exception):
    """A preprocess worker died with jobs outstanding: the server is stopping (the supervisor stops
    every actor when one dies), so the callers answer 503 instead of waiting for ever."""


def worker_socket(rank: int) -> str:
    return f"preprocess-{rank}.sock"


def preprocess_job(job: PreprocessImage, tiling: TilingConfig, worker: int = -1) -> ImagePreprocessed:
    """Decode, check and tile one image into the segment `job.pixels_shm` (created here,
    owned by the caller from the answer on). Errors are answers, never exceptions; the answer
    says how long the job took."""
    started = time.perf_counter()
    answer = _preprocess(job, tiling, worker)
    return msgspec.structs.replace(answer, seconds=time.perf_counter() - started)


def _preprocess(job: PreprocessImage, tiling: TilingConfig, worker: int) -> ImagePreprocessed:
    limit = None if job.resize_to_fit else job.max_pixels
    try:
        data = shm.read_segment(job.bytes_shm, job.num_bytes) if job.bytes_shm else job.data
    except OSError as exc:
        return ImagePreprocessed(job.job_id, worker, error=str(exc), error_kind=NO_BYTES)
    try:
        image = decode_image(data, limit, procedure=tiling.procedure)
        width, height = image.size
        if width * height > job.max_pixels:  # only with resize_to_fit: decode_image refused the rest
            image = downscale(image, *fit_within(width, height, job.max_pixels))
        pixels = tile_image(image, tiling.with_max_tiles(job.max_tiles))  # [num_tiles, 3, tile, tile] uint8
    except ImageTooLarge as exc:
        return ImagePreprocessed(job.job_id, worker, exc.width, exc.height, error_kind=TOO_LARGE)
    except ImageError as exc:
        return ImagePreprocessed(job.job_id, worker, error=str(exc), error_kind=BAD_IMAGE)
    except Exception as exc:  # PIL's resize of a malformed image: the input is at fault, not the server
        log.warning("preprocessing failed: %r", exc)
        return ImagePreprocessed(
            job.job_id, worker, error=f"cannot be preprocessed: {exc}", error_kind=BAD_IMAGE
        )
    try:
        write_pixels(job.pixels_shm, pixels)
    except OSError as exc:
        log.warning("no shared memory for an image's tiles: %s", exc)
        return ImagePreprocessed(
            job.job_id, worker, width, height, error=str(exc), error_kind=NO_SHARED_MEMORY
        )
    return ImagePreprocessed(job.job_id, worker, width, height, pixels.shape[0])


def write_pixels(name: str, pixels: np.ndarray) -> None:
    """A new segment `name` holding an image's uint8 tiles; OSError (ENOSPC) when /dev/shm is
    full, creating nothing."""
    assert pixels.dtype == np.uint8
    shm.write_array(name, pixels)


class PreprocessPool:
    """The preprocess workers as one actor sees them: a job goes to the worker with the fewest
    jobs outstanding. With no workers (--preprocess_workers 0) jobs run on a thread of this
    process instead, for tests and debugging.

    Tiles of a job whose caller is gone (a client that disconnected, a request that failed on
    another image) are unlinked when they arrive, so a cancelled caller leaks nothing.
    """

    def __init__(self, tiling: TilingConfig, prefix: str, channels: list[ipc.Channel] = ()) -> None:
        self.tiling = tiling
        self.prefix = prefix  # of the segments it names: the server's, and the asking actor's
        self.channels = list(channels)
        self.num_outstanding = [0] * len(self.channels)
        self.num_images = [0] * max(1, len(self.channels))  # per worker (in-process: one)
        self.worker_seconds = Histogram(IMAGE_STAGE_BUCKETS_S)  # each job inside its worker
        self._answers: dict[int, asyncio.Future[ImagePreprocessed]] = {}
        self._job_ids = itertools.count()
        self._readers = [asyncio.get_running_loop().create_task(self._read(c)) for c in self.channels]

    @classmethod
    def for_actor(
        cls, launch: Launch, tiling: TilingConfig, role: str, channels: list[ipc.Channel]
    ) -> PreprocessPool:
        """The pool of the actor `role`, over `connect_workers`' channels; its segments are named
        after the server (the supervisor unlinks them whatever happens) and the actor."""
        return cls(tiling, f"{shm.segment_prefix(launch.runtime.server_id)}px-{role}-", channels)

    async def run(
        self,
        max_pixels: int,
        resize_to_fit: bool,
        max_tiles: int,
        bytes_shm: str,
        num_bytes: int,
        data: bytes | None = None,
    ) -> tuple[ImagePreprocessed, str]:
        """Preprocess the image whose bytes the segment `bytes_shm` holds (the caller keeps it
        until the answer): the answer, and the name of the segment its tiles are in when it has
        no error (the caller owns it from then on). A worker process reads the bytes from the
        segment; a thread of this process takes `data` where the caller has them."""
        job_id = next(self._job_ids)
        name = f"{self.prefix}{job_id}"
        job = PreprocessImage(job_id, b"", name, max_pixels, resize_to_fit, max_tiles, bytes_shm, num_bytes)
        if not self.channels and data is not None:
            job = msgspec.structs.replace(job, data=data, bytes_shm="", num_bytes=0)
        loop = asyncio.get_running_loop()
        if self.channels:
            worker = min(range(len(self.channels)), key=self.num_outstanding.__getitem__)
            answer = loop.create_future()
            self._answers[job_id] = answer
            self.num_outstanding[worker] += 1
            self.channels[worker].send(job)
        else:
            answer = asyncio.ensure_future(asyncio.to_thread(preprocess_job, job, self.tiling, 0))
        try:
            result = await asyncio.shield(answer)
        except asyncio.CancelledError:
            answer.add_done_callback(_unlink_tiles_of(name))
            raise
        self.num_images[max(result.worker, 0)] += 1
        self.worker_seconds.observe(result.seconds)
        return result, name

    async def _read(self, channel: ipc.Channel) -> None:
        try:
            while True:
                msg = await channel.recv()
                assert isinstance(msg, ImagePreprocessed), (
                    f"a preprocess worker answered {type(msg).__name__}"
                )
                self.num_outstanding[msg.worker] -= 1
                self._answers.pop(msg.job_id).set_result(msg)
        except ipc.ChannelClosed:  # a worker died, and the server with it: no answer is coming
            for answer in self._answers.values():  # a job may have gone to another worker: as dead soon
                if not answer.done():
                    answer.set_exception(PreprocessWorkerGone("an image preprocessing worker is gone"))
            self._answers.clear()


async def connect_workers(launch: Launch, role: str) -> list[ipc.Channel]:
    """A channel to every preprocess worker (they are ready before the vision and http actors start)."""
    paths = [launch.socket(worker_socket(rank)) for rank in range(launch.args.preprocess_workers)]
    return [await ipc.connect(path, Hello(role)) for path in paths]


def _unlink_tiles_of(name: str):
    def unlink(answer: asyncio.Future) -> None:
        if not answer.cancelled() and answer.exception() is None and not answer.result().error_kind:
            shm.unlink_segment(name)

    return unlink


async def run(launch: Launch, rank: int) -> None:
    """A preprocess worker: one job at a time, from whichever actor asks (the http actor, the vision
    front); the event loop blocks on each job, which is this process's only work."""
    args = launch.args
    tiling = TilingConfig.from_model_dir(args.model_dir, min_tiles=args.min_tiles, max_tiles=args.max_tiles)

    async def serve_channel(channel: ipc.Channel) -> None:
        await channel.recv()  # Hello
        try:
            while True:
                job = await channel.recv()
                assert isinstance(job, PreprocessImage), (
                    f"a preprocess worker expects PreprocessImage, got {job!r}"
                )
                channel.send(preprocess_job(job, tiling, rank))
        except ipc.ChannelClosed:
            pass  # the asking actor stopped; the server is stopping
        except Exception:  # the asker would wait forever: stop, and the supervisor stops the server
            log.exception("preprocess worker failed")
            logging.shutdown()
            os._exit(1)

    server = await ipc.serve(launch.socket(worker_socket(rank)), serve_channel)
    await announce_ready(launch, "preprocess", rank)
    async with server:
        await asyncio.Event().wait()
