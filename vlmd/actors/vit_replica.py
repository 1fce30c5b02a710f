"""The ViT ranks: `visual_dp` replicas of the ViT, each a group of `visual_tp` vision processes.

Vision rank r (0 <= r < tp, on GPU r when CUDA, beside LM rank r) belongs to replica group
g = r // visual_tp. The group's first rank is its leader: it reads the images' tiles (preprocessed
already, in shared memory: `vlmd.actors.preprocess`, `vlmd.actors.pixels`), tells
the other ranks of its group how many tiles follow (ForwardTiles, over a Unix socket), broadcasts
the pixels, and once every rank has run its share of the forward it writes the rows into the
EmbedStore runs the vision front reserved. The ranks of a group form their own torch.distributed
world (gloo on the CPU, NCCL on GPUs) through a rendezvous file of their own, apart from the LM
workers' world. Rank 0 is also the vision front (see `vlmd.actors.vision`).

With --vit_placement worker (visual_tp 1) no vision rank is a process of its own: LM worker g
hosts replica g and leads it from its event loop (`vlmd.actors.worker`), its device work queued
on a low-priority CUDA stream; only the front runs as vision rank 0, with no ViT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vlmd import ipc, shm
from vlmd.actors.device import TORCH_DTYPES, TP_TIMEOUT_S, embed_store_view
from vlmd.actors.launch import HostWatch, Launch, Stopwatch
from vlmd.image import ImageError, TilingConfig, normalize_lut
from vlmd.kernels.vision_attention import make_tile_attention
from vlmd.kernels.vision_graph import VisionGraphs
from vlmd.messages import BatchEncoded, EmbedRun, EncodeBatch, ForwardTiles, Hello, ImageRef
from vlmd.models.loader import load_vision
from vlmd.models.tensor_parallel import SINGLE_RANK, TPGroup

log = logging.getLogger("vlmd.vision")

VISION_FRONT_SOCKET = "vision-front.sock"  # the replica leaders but the front's own connect to it
CONNECT_TIMEOUT_S = 600.0  # the supervisor's start-up timeout bounds it anyway


@dataclass(frozen=True)
class VisionLayout:
    """Where vision rank `rank` sits among visual_dp groups of visual_tp ranks."""

    rank: int
    visual_tp: int
    visual_dp: int

    @property
    def group(self) -> int:
        return self.rank // self.visual_tp

    @property
    def rank_in_group(self) -> int:
        return self.rank % self.visual_tp

    @property
    def is_leader(self) -> bool:
        return self.rank_in_group == 0

    @property
    def peers(self) -> list[int]:
        """The other ranks of a leader's group."""
        return list(range(self.rank + 1, self.rank + self.visual_tp))

    @property
    def leaders(self) -> list[int]:
        """The leaders of every group but the front's."""
        return [g * self.visual_tp for g in range(1, self.visual_dp)]

    def group_socket(self) -> str:
        return f"vision-group{self.group}.sock"

    def rendezvous_file(self) -> str:
        return f"vision-rendezvous-{self.group}"


class ViTRank:
    """This process's share of one ViT replica: the whole ViT when visual_tp is 1."""

    def __init__(
        self,
        model,
        tiling: TilingConfig,
        tp: TPGroup = SINGLE_RANK,
        store: torch.Tensor | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.model = model
        self.tiling = tiling
        self.tp = tp
        self.store = store  # the EmbedStore (leaders only)
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.lut = torch.tensor(normalize_lut(tiling), device=self.device)  # [3, 256] float32
        if self.device.type == "cuda":  # copied on this thread's stream; the ViT's thread reads it
            torch.cuda.current_stream(self.device).synchronize()
        # All device work runs on one thread, which knows this rank's GPU as its current device.
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="vit")
        # The thread's host work that should be short, logged when it is not (on a GPU, where an
        # LM worker hosting this ViT shares its process with the steps' thread).
        self.watch = HostWatch(enabled=self.device.type == "cuda")
        self._batches = itertools.count()

    @classmethod
    def from_launch(
        cls, launch: Launch, layout: VisionLayout, clock: Stopwatch, stream: torch.cuda.Stream | None = None
    ) -> ViTRank:
        """Load this rank's share of the ViT; on a GPU run its largest batch once (compiling its
        kernels) and capture its graphs; `clock` times each phase. With `stream` (the ViT inside
        an LM worker), that work and every later batch run on it: the largest batch's memory stays
        cached for the stream the batches allocate from, and the graphs replay on it."""
        args = launch.args
        cuda = launch.runtime.device == "cuda"
        device = torch.device("cuda", layout.rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(args.torch_threads)
        tp = join_vision_group(launch, layout, cuda)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            model, tiling = _build_model(launch, device, tp, clock)
        store = embed_store_view(launch, device) if layout.is_leader else None
        executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="vit",
            initializer=_bind_thread if cuda else None,
            initargs=(device, stream) if cuda else (),
        )
        return cls(model, tiling, tp, store, executor)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def load_pixels(self, images: list[ImageRef]) -> tuple[torch.Tensor | None, list[int], list[str]]:
        """A batch's tiles, cut already, from their segments (`ImageRef.pixels_shm`), normalised on
        the device: (pixels [total_tiles, 3, tile, tile] in the model's dtype, or None if no image
        has tiles; tiles per image; per image "" or the reason it failed)."""
        size = self.tiling.tile_size
        total = sum(image.num_tiles for image in images if image.pixels_shm)
        # [total_tiles, C, tile, tile]; page-locked on a GPU: the copy to the device is queued, where
        # one out of pageable memory would hold this thread (and CUDA) until it is done.
        host = torch.empty((total, 3, size, size), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        tiles = host.numpy()
        counts: list[int] = []
        errors: list[str] = []
        offset = 0
        for i, image in enumerate(images):
            try:
                _read_tiles(image, tiles[offset : offset + image.num_tiles])
                counts.append(image.num_tiles)
                errors.append("")
                offset += image.num_tiles
            except ImageError as exc:
                counts.append(0)
                errors.append(f"image {i}: {exc}")
        if not offset:
            return None, counts, errors
        return self._normalize(host[:offset].to(self.device, non_blocking=True)), counts, errors

    def _normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, tile, tile] -> the model's dtype, through the float32 table of every value
        (`vlmd.image.normalize_lut`): the bits `vlmd.image.preprocess` gives, then one rounding.
        Contiguous: a broadcast to the group sends raw storage."""
        out = torch.empty(tiles.shape, dtype=self.dtype, device=self.device)  # [n, 3, tile, tile]
        for channel in range(3):
            out[:, channel] = self.lut[channel][tiles[:, channel].int()]
        return out

    @torch.inference_mode()
    def forward_into_store(self, pixels: torch.Tensor, counts: list[int], runs: list[EmbedRun]) -> None:
        """Leader: share the pixels with the group, run the ViT, write each image's rows into its run
        (images with no tiles failed and are skipped)."""
        self.tp.broadcast(pixels)
        self._write_rows(self.model(pixels), _tiles_of(counts, runs))

    def _write_rows(self, embeds: torch.Tensor, tiles: list[tuple[EmbedRun, int, int]]) -> None:
        """Once the device has computed `embeds` (waited for with the GIL released: a copy to the
        host would wait inside CUDA), copy them into the store (`_copy_rows`)."""
        if self.device.type == "cuda":
            computed = torch.cuda.Event()
            computed.record()
            computed.synchronize()
        with self.watch.timed("ViT thread: copying rows into the EmbedStore, batch", next(self._batches)):
            self._copy_rows(embeds, tiles)

    @torch.inference_mode()
    def forward_in_slices(
        self,
        pixels: torch.Tensor,
        counts: list[int],
        runs: list[EmbedRun],
        slice_tiles: int,
        wait_turn: Callable[[], None],
    ) -> None:
        """`forward_into_store` for a one-rank replica, `slice_tiles` tiles at a time, each slice
        once `wait_turn()` returns (tiles are encoded independently: the rows are the same)."""
        assert self.tp.size == 1, "a split ViT forwards its whole batch at once, in step with its group"
        tiles = _tiles_of(counts, runs)
        for start in range(0, pixels.shape[0], slice_tiles):
            wait_turn()
            embeds = self.model(pixels[start : start + slice_tiles])  # [n * image_seq_length, hidden]
            self._write_rows(embeds, tiles[start : start + slice_tiles])

    def _copy_rows(self, embeds: torch.Tensor, tiles: list[tuple[EmbedRun, int, int]]) -> None:
        """embeds [len(tiles) * rows per tile, hidden] into the store: each tile's rows where its
        image's run keeps them, the consecutive tiles of one image in one copy."""
        rows = embeds.shape[0] // len(tiles)  # per tile
        done = 0
        for _, group in itertools.groupby(tiles, key=lambda tile: id(tile[0])):
            group = list(group)
            run, first, count = group[0]
            assert run.num_rows == count * rows, "the reserved run does not fit the image"
            start, num_rows = run.row_offset + first * rows, len(group) * rows
            self.store[start : start + num_rows] = embeds[done : done + num_rows]
            done += num_rows

    @torch.inference_mode()
    def follow(self, num_tiles: int) -> None:
        """Another rank of the group: receive the leader's tiles and run this rank's share."""
        size = self.tiling.tile_size
        pixels = torch.empty(num_tiles, 3, size, size, dtype=self.dtype, device=self.device)
        self.tp.broadcast(pixels)
        self.model(pixels)


def _build_model(launch: Launch, device: torch.device, tp: TPGroup, clock: Stopwatch):
    """The ViT with its tile attention, and the tiling it reads; on a GPU warmed up and, unless
    split or told not to, captured in CUDA graphs."""
    args = launch.args
    dtype = TORCH_DTYPES[launch.runtime.dtype]
    model = load_vision(args.model_dir, dtype, device, args.load_workers, tp=tp)
    clock.lap("weights")
    model.set_tile_attention(
        make_tile_attention(args.vit_attention, device, dtype, model.arch.vision_head_dim)
    )
    tiling = TilingConfig.from_model_dir(args.model_dir, min_tiles=args.min_tiles, max_tiles=args.max_tiles)
    if device.type == "cuda":
        largest = args.visual_infer_batch_size * tiling.max_tiles_per_image
        _reserve_peak_memory(model, largest, tiling)
        clock.lap("largest batch (kernel compile)")
        # A tensor-parallel ViT runs op by op: capturing its all-reduces in CUDA graphs has not
        # been checked on GPUs, and every rank of a group would have to replay in lockstep. A ViT
        # on a green context (--vit_sms) is captured on its stream: the kernels of a graph
        # captured there keep to the green context's SMs wherever it replays (seen on an H100).
        if not args.disable_cudagraph and tp.size == 1:
            model = VisionGraphs(model, tiling.max_tiles_per_image, tiling.tile_size)
            # torch empties the allocator's cache before a capture
            model.capture(torch.cuda.current_stream(device) if args.vit_sms else None)
            if largest > tiling.max_tiles_per_image:  # batches beyond the graphs run op by op
                _reserve_peak_memory(model.vision, largest, tiling)
            clock.lap("CUDA graphs")
    return model, tiling


def _tiles_of(counts: list[int], runs: list[EmbedRun]) -> list[tuple[EmbedRun, int, int]]:
    """Per tile of a batch, in order: its image's run, its index in the image, the image's tiles
    (images with no tiles have none)."""
    return [(run, t, count) for count, run in zip(counts, runs, strict=True) for t in range(count)]


def _bind_thread(device: torch.device, stream: torch.cuda.Stream | None) -> None:
    """The ViT thread's GPU, and the stream it queues its work on: in an LM worker, a stream of
    the least priority (the device runs the decode steps' kernels first); else the default one."""
    torch.cuda.set_device(device)
    if stream is not None:
        torch.cuda.set_stream(stream)


def _read_tiles(image: ImageRef, out: np.ndarray) -> None:
    """Copy the image's uint8 tiles into `out` [num_tiles, 3, tile, tile] from the segment the vision
    front holds for this encode; ImageError if it has none."""
    if not image.pixels_shm:
        raise ImageError("the image's tiles are not available")
    try:
        shm.read_array(image.pixels_shm, out)
    except OSError as exc:
        log.info("cannot read image tiles: %s", exc)
        raise ImageError("the image's tiles are no longer available") from None


class ReplicaGroup:
    """A ViT replica as its leader drives it: this process's ViTRank and the other ranks' sockets.
    `forward(pixels, counts, runs)` runs on the ViT's thread (default: the whole batch at once)."""

    def __init__(self, vit: ViTRank, peers: list[ipc.Channel], forward: Callable | None = None) -> None:
        assert len(peers) == vit.tp.size - 1, "a leader drives every other rank of its group"
        self.vit = vit
        self.peers = peers
        self.forward = forward or vit.forward_into_store

    async def encode(self, images: list[ImageRef], runs: list[EmbedRun]) -> list[str]:
        """Encode a batch into its reserved runs; per image "" or why it failed."""
        pixels, counts, errors = await self.vit.run(self.vit.load_pixels, images)
        if pixels is not None:
            for peer in self.peers:
                peer.send(ForwardTiles(pixels.shape[0]))
            await self.vit.run(self.forward, pixels, counts, runs)
        return errors


async def connect_front(launch: Launch, layout: VisionLayout) -> ipc.Channel:
    """A replica leader's channel to the vision front, which may not be listening yet."""
    hello = Hello("vision", layout.rank)
    return await ipc.connect_when_listening(launch.socket(VISION_FRONT_SOCKET), hello, CONNECT_TIMEOUT_S)


async def serve_batches(front: ipc.Channel, group: ReplicaGroup) -> None:
    """A replica leader's work, in a vision process or an LM worker: encode each batch the front
    sends and answer once its rows are in the EmbedStore. One batch at a time (the front sends
    the next after the answer). ChannelClosed when the front is gone: the server is stopping."""
    while True:
        msg = await front.recv()
        assert isinstance(msg, EncodeBatch), f"a replica leader expects EncodeBatch, got {type(msg).__name__}"
        front.send(BatchEncoded(msg.batch_id, await group.encode(msg.images, msg.runs)))


def join_vision_group(launch: Launch, layout: VisionLayout, cuda: bool) -> TPGroup:
    """The ranks of one replica group meet through their own rendezvous file in the run directory;
    their world is theirs alone (the LM workers and the other groups have their own)."""
    init_method = f"file://{launch.socket(layout.rendezvous_file())}"
    return TPGroup.join(init_method, layout.rank_in_group, layout.visual_tp, cuda, TP_TIMEOUT_S)


@torch.inference_mode()
def _reserve_peak_memory(model, num_tiles: int, tiling: TilingConfig) -> None:
    """Run the largest batch once so its activations stay in this process's allocator cache: the
    LLM workers size their KV cache from what is left once the ViT is loaded. Every
    rank of a group runs it at the same point of its start, so their collectives pair up."""
    weight = next(model.parameters())
    size = tiling.tile_size
    model(torch.zeros(num_tiles, 3, size, size, dtype=weight.dtype, device=weight.device))
    torch.cuda.synchronize(weight.device)
