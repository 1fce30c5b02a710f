"""The vision actor: MD5 embedding cache, image preprocessing and the ViT, batched across requests.

A cache hit answers at once and pins the entry for the request; misses queue for the encoder,
which takes up to --visual_infer_batch_size images at a time, runs InternViT + projector, and
writes the rows into the shared EmbedStore. The same image requested again while it is being
encoded waits for that one encode instead of running the ViT twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vlmd import ipc, shm
from vlmd.actors.launch import SCHEDULER_SOCKET, Launch, announce_ready
from vlmd.actors.metrics import VIT_BATCH_BUCKETS
from vlmd.actors.worker import TORCH_DTYPES, embed_store_view
from vlmd.core.embed_index import EmbedIndex
from vlmd.core.histogram import Histogram
from vlmd.image import ImageError, TilingConfig, decode_image, downscale, preprocess
from vlmd.kernels.vision_graph import VisionGraphs
from vlmd.messages import EmbedRun, EncodeImages, Hello, ImageRef, ImagesFailed, ImagesReady, ReleaseImages
from vlmd.models.loader import load_vision

log = logging.getLogger("vlmd.vision")


@dataclass
class Pending:
    """A request waiting for some of its images."""

    runs: list[EmbedRun | None]
    md5s: list[str]


@dataclass
class Job:
    """One image to encode, and the (request, image index) pairs waiting for it."""

    image: ImageRef
    waiters: list[tuple[str, int]] = field(default_factory=list)


class VisionActor:
    def __init__(self, launch: Launch, channel: ipc.Channel) -> None:
        args, runtime = launch.args, launch.runtime
        self.channel = channel
        self.batch_size = args.visual_infer_batch_size
        self.device = torch.device(runtime.device)
        if self.device.type == "cpu":
            torch.set_num_threads(args.torch_threads)
        self.model = load_vision(args.model_dir, TORCH_DTYPES[runtime.dtype], self.device, args.load_workers)
        self.tiling = TilingConfig.from_model_dir(
            args.model_dir, min_tiles=args.min_tiles, max_tiles=args.max_tiles
        )
        self.store = embed_store_view(launch)
        self.index = EmbedIndex(args.cache_capacity, runtime.embed_store_rows)
        self.pending: dict[str, Pending] = {}
        self.pinned: dict[str, list[str]] = {}  # request id -> md5s it pins
        self.jobs: dict[str, Job] = {}  # md5 -> job queued, running or parked
        self.parked: list[tuple[Job, torch.Tensor]] = []  # encoded, waiting for room in the cache
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        if self.device.type == "cuda":
            self._reserve_peak_memory(args.visual_infer_batch_size * self.tiling.max_tiles_per_image)
            if not args.disable_cudagraph:
                self.model = VisionGraphs(self.model, self.tiling.max_tiles_per_image, self.tiling.tile_size)
                self.model.capture()
        self.counters = {
            "vit_images_total": 0.0,
            "embed_cache_hits_total": 0.0,
            "embed_cache_misses_total": 0.0,
        }
        self.batch_sizes = Histogram(VIT_BATCH_BUCKETS)

    def on_encode(self, msg: EncodeImages) -> None:
        pending = Pending([None] * len(msg.images), [image.md5 for image in msg.images])
        self.pending[msg.request_id] = pending
        self.pinned.setdefault(msg.request_id, [])
        for i, image in enumerate(msg.images):
            entry = self.index.lookup(image.md5, pin_for=msg.request_id)
            if entry is not None or image.md5 in self.jobs:
                self.counters["embed_cache_hits_total"] += 1
                shm.unlink_segment(image.bytes_shm)  # the bytes are not needed
            else:
                self.counters["embed_cache_misses_total"] += 1
            if entry is not None:
                pending.runs[i] = EmbedRun(image.md5, entry.row_offset, entry.num_rows)
                self.pinned[msg.request_id].append(image.md5)
            elif image.md5 in self.jobs:
                self.jobs[image.md5].waiters.append((msg.request_id, i))
            else:
                job = Job(image, [(msg.request_id, i)])
                self.jobs[image.md5] = job
                self.queue.put_nowait(job)
        self._reply_if_complete(msg.request_id)

    def on_release(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self.index.unpin(request_id, self.pinned.pop(request_id, []))
        parked, self.parked = self.parked, []
        for job, result in parked:
            self._store(job, result)

    def _reply_if_complete(self, request_id: str) -> None:
        pending = self.pending.get(request_id)
        if pending is not None and all(run is not None for run in pending.runs):
            del self.pending[request_id]
            counters = {**self.counters, "embed_cache_evictions_total": float(self.index.num_evictions)}
            histograms = {"vit_batch_size": self.batch_sizes.snapshot()}
            self.channel.send(ImagesReady(request_id, pending.runs, counters, histograms))

    def _fail(self, request_id: str, status: int, message: str) -> None:
        if self.pending.pop(request_id, None) is not None:
            self.channel.send(ImagesFailed(request_id, status, message))

    async def encode_loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            started = time.perf_counter()
            results = await asyncio.to_thread(self._encode, [job.image for job in batch])
            log.debug("encoded %d image(s) in %.3f s", len(batch), time.perf_counter() - started)
            self.counters["vit_images_total"] += sum(1 for r in results if not isinstance(r, str))
            self.batch_sizes.observe(len(batch))
            for job, result in zip(batch, results, strict=True):
                self._store(job, result)

    def _store(self, job: Job, result: torch.Tensor | str) -> None:
        """Put an encoded image in the EmbedStore and answer its waiters. When the cache is full
        of images that requests still use, park it until one of them is released."""
        md5 = job.image.md5
        waiters = [(r, i) for r, i in job.waiters if r in self.pending]
        if isinstance(result, str) or not waiters:
            del self.jobs[md5]
            for request_id, _ in waiters:
                self._fail(request_id, 400, result)
            return
        entry = self.index.insert(md5, result.shape[0], pin_for=waiters[0][0])
        if entry is None:
            if self._pins_will_be_released():
                self.parked.append((job, result))  # the job stays in self.jobs: new requests join it
                return
            del self.jobs[md5]
            for request_id, _ in waiters:
                self._fail(request_id, 503, "the image embedding cache is full of images in use; retry later")
            return
        del self.jobs[md5]
        self.store[entry.row_offset : entry.row_offset + entry.num_rows] = result
        for request_id, i in waiters:
            entry.pinned_by.add(request_id)
            self.pinned[request_id].append(md5)
            self.pending[request_id].runs[i] = EmbedRun(md5, entry.row_offset, entry.num_rows)
            self._reply_if_complete(request_id)

    def _pins_will_be_released(self) -> bool:
        """Some pinned image belongs to a request that has all its embeddings: it is scheduled and
        will unpin when it ends. If every pin is held by requests still waiting here, none will."""
        return any(md5s and request_id not in self.pending for request_id, md5s in self.pinned.items())

    @torch.inference_mode()
    def _encode(self, images: list[ImageRef]) -> list[torch.Tensor | str]:
        """Decode, tile and encode a batch; an image that fails gets its error message instead."""
        tiles: list[np.ndarray] = []
        counts: list[int] = []
        errors: dict[int, str] = {}
        for i, image in enumerate(images):
            try:
                data = shm.read_bytes_segment(image.bytes_shm, image.num_bytes)
                decoded = decode_image(data)
                if image.resize_width:  # the client asked to fit --max_image_pixels
                    decoded = downscale(decoded, image.resize_width, image.resize_height)
                pixels = preprocess(decoded, self.tiling)  # [num_tiles, 3, tile, tile]
                assert pixels.shape[0] == image.num_tiles, "http and vision disagree on the tile count"
                tiles.append(pixels)
                counts.append(pixels.shape[0])
            except (ImageError, OSError) as exc:
                errors[i] = f"image {i}: {exc}"
                counts.append(0)
        rows: list[torch.Tensor] = []
        if tiles:
            pixel_values = torch.from_numpy(np.concatenate(tiles)).to(self.device, self.model_dtype)
            embeds = self.model(pixel_values)  # [total_tiles * image_seq_length, hidden]
            rows_per_tile = embeds.shape[0] // sum(counts)
            rows = list(torch.split(embeds, [c * rows_per_tile for c in counts if c]))
        out: list[torch.Tensor | str] = []
        for i in range(len(images)):
            out.append(errors[i] if i in errors else rows.pop(0))
        return out

    @torch.inference_mode()
    def _reserve_peak_memory(self, num_tiles: int) -> None:
        """Run the largest batch once so its activations stay in this process's allocator cache:
        the LLM workers, which start after the vision actor, size their KV cache from what is left."""
        size = self.tiling.tile_size
        self.model(torch.zeros(num_tiles, 3, size, size, dtype=self.model_dtype, device=self.device))
        torch.cuda.synchronize(self.device)

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


async def run(launch: Launch, rank: int) -> None:
    channel = await ipc.connect(launch.socket(SCHEDULER_SOCKET), Hello("vision"))
    args = launch.args
    if args.visual_tp > 1 or args.visual_dp > 1:
        log.warning(
            "visual_tp=%d, visual_dp=%d: split and replicated ViT layouts are not built yet; "
            "one whole ViT serves every image (on the first GPU)",
            args.visual_tp,
            args.visual_dp,
        )
    actor = VisionActor(launch, channel)
    await announce_ready(launch, "vision", detail=f"(EmbedStore {launch.runtime.embed_store_rows} rows)")
    encoder = asyncio.get_running_loop().create_task(actor.encode_loop())
    encoder.add_done_callback(_exit_on_crash)
    while True:
        msg = await channel.recv()
        if isinstance(msg, EncodeImages):
            actor.on_encode(msg)
        elif isinstance(msg, ReleaseImages):
            actor.on_release(msg.request_id)


def _exit_on_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("encoder crashed", exc_info=task.exception())
        logging.shutdown()
        os._exit(1)
