"""The vision front: MD5 embedding cache, pins, and dispatch of image batches to the ViT replicas.

A cache hit answers at once and pins the entry for the request; misses queue for the encoder.
The front reserves each image's run in the EmbedStore (pinned while it is encoded), holds the
images' tiles (preprocessed already, or made by the preprocess pool: `vlmd.actors.pixels`), and
hands up to --visual_infer_batch_size images to the least loaded ViT replica (`vlmd.actors.vit_replica`),
whose leader writes the rows straight into the shared store. The same image requested again
while it is being encoded waits for that one encode instead of running the ViT twice; the encode
reads the bytes segment both requests share. Image bytes belong to the http actor, which keeps
each segment until no request needs it: the front and the replicas only read them. Vision rank 0
is the front and the leader of replica 0; the leaders of the other replicas are remote. With
--vit_placement worker every leader is remote: the LM workers host the replicas, and the front
holds no ViT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from vlmd import ipc
from vlmd.actors.launch import SCHEDULER_SOCKET, Launch, Stopwatch, announce_ready
from vlmd.actors.metrics import (
    IMAGE_STAGE_BUCKETS_S,
    VIT_BATCH_BUCKETS,
    VIT_REPLICA_PREFIX,
    add_preprocess_counts,
)
from vlmd.actors.pixels import FrontPixels, HeldBatch, PassThroughPixels
from vlmd.actors.vit_replica import (
    CONNECT_TIMEOUT_S,
    VISION_FRONT_SOCKET,
    ReplicaGroup,
    VisionLayout,
    ViTRank,
    connect_front,
    serve_batches,
)
from vlmd.core.embed_index import EmbedIndex, Entry
from vlmd.core.histogram import Histogram
from vlmd.messages import (
    BatchEncoded,
    EmbedRun,
    EncodeBatch,
    EncodeImages,
    ForwardTiles,
    Hello,
    HistogramSnapshot,
    ImageRef,
    ImagesFailed,
    ImagesReady,
    ReleaseImages,
    VisionStats,
)

log = logging.getLogger("vlmd.vision")

ENCODING = "\0encoding"  # pins an entry whose rows a replica is still writing (never a request id)


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
    in_flight: bool = False  # a replica has it: it may have read the bytes already, or failed to
    # Requests that came while it was in flight with no waiter left (`VisionActor._wanted`): the
    # bytes may have been gone when the replica read them, so if it fails they get an encode of
    # their own, which reads the bytes they hold.
    successors: list[tuple[str, int]] = field(default_factory=list)


class Replica:
    """One ViT replica as the front sees it: at most one batch in flight."""

    def __init__(self, group: int, encode) -> None:
        self.group = group
        self.encode = encode  # async (images, runs) -> per image "" or the reason it failed
        self.busy = False
        self.num_images = 0  # images encoded so far


class RemoteReplica:
    """The leader of another replica group, over its socket."""

    def __init__(self, channel: ipc.Channel) -> None:
        self.channel = channel
        self._answer: asyncio.Future | None = None
        self._batch_id = 0

    async def encode(self, images: list[ImageRef], runs: list[EmbedRun]) -> list[str]:
        self._batch_id += 1
        self._answer = asyncio.get_running_loop().create_future()
        self.channel.send(EncodeBatch(self._batch_id, images, runs))
        answer: BatchEncoded = await self._answer
        assert answer.batch_id == self._batch_id, "a replica answers its one batch in flight"
        return answer.errors

    async def read_answers(self) -> None:
        while True:
            msg = await self.channel.recv()  # ChannelClosed: the replica died, and the server with it
            assert isinstance(msg, BatchEncoded) and self._answer is not None
            self._answer.set_result(msg)


class VisionActor:
    def __init__(
        self, launch: Launch, channel: ipc.Channel, replicas: list[Replica], pixels: FrontPixels | None = None
    ) -> None:
        args, runtime = launch.args, launch.runtime
        self.channel = channel
        self.pixels = PassThroughPixels() if pixels is None else pixels  # None: tests' stand-ins
        self.batch_size = args.visual_infer_batch_size
        self.index = EmbedIndex(args.cache_capacity, runtime.embed_store_rows)
        self.replicas = replicas
        self.pending: dict[str, Pending] = {}
        self.pinned: dict[str, list[str]] = {}  # request id -> md5s it pins
        self.jobs: dict[str, Job] = {}  # md5 -> job queued or being encoded
        self.queue: deque[Job] = deque()  # misses waiting for a replica and for room in the cache
        self._wake = asyncio.Event()  # a job was queued, a batch ended or pins were released
        self._tasks: set[asyncio.Task] = set()
        self.counters = {
            "vit_images_total": 0.0,
            "embed_cache_hits_total": 0.0,
            "embed_cache_misses_total": 0.0,
        }
        self.batch_sizes = Histogram(VIT_BATCH_BUCKETS)
        self.batch_seconds = Histogram(IMAGE_STAGE_BUCKETS_S)

    def on_encode(self, msg: EncodeImages) -> None:
        pending = Pending([None] * len(msg.images), [image.md5 for image in msg.images])
        self.pending[msg.request_id] = pending
        self.pinned.setdefault(msg.request_id, [])
        for i, image in enumerate(msg.images):
            job = self.jobs.get(image.md5)  # before the index: a run being written is not a hit yet
            entry = None if job is not None else self.index.lookup(image.md5, pin_for=msg.request_id)
            if job is not None or entry is not None:
                self.counters["embed_cache_hits_total"] += 1
            else:
                self.counters["embed_cache_misses_total"] += 1
            if entry is not None:
                pending.runs[i] = EmbedRun(image.md5, entry.row_offset, entry.num_rows)
                self.pinned[msg.request_id].append(image.md5)
            elif job is not None and job.in_flight and not self._wanted(job):
                job.successors.append((msg.request_id, i))
            elif job is not None:
                job.waiters.append((msg.request_id, i))
            else:
                job = Job(image, [(msg.request_id, i)])
                self.jobs[image.md5] = job
                self.queue.append(job)
                self._wake.set()
        self._reply_if_complete(msg.request_id)

    def on_release(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self.index.unpin(request_id, self.pinned.pop(request_id, []))
        self._wake.set()  # room may have opened for a queued image
        self._send_stats()

    def _reply_if_complete(self, request_id: str) -> None:
        pending = self.pending.get(request_id)
        if pending is not None and all(run is not None for run in pending.runs):
            del self.pending[request_id]
            counters, histograms = self._stats()
            self.channel.send(ImagesReady(request_id, pending.runs, counters, histograms))

    def _stats(self) -> tuple[dict[str, float], dict[str, HistogramSnapshot]]:
        counters = {
            **self.counters,
            "embed_cache_evictions_total": float(self.index.num_evictions),
            "embed_cache_pinned_images": float(self.index.num_pinned),
        }
        for replica in self.replicas:
            counters[f"{VIT_REPLICA_PREFIX}{replica.group}"] = float(replica.num_images)
        add_preprocess_counts(counters, self.pixels.num_images)
        return counters, {
            "vit_batch_size": self.batch_sizes.snapshot(),
            "vit_batch_seconds": self.batch_seconds.snapshot(),
        }

    def _send_stats(self) -> None:
        """/metrics shows pins as they are once idle (a leaked pin stays visible)."""
        self.channel.send(VisionStats(*self._stats()))

    def _fail(self, request_id: str, status: int, message: str) -> None:
        if self.pending.pop(request_id, None) is not None:
            self.channel.send(ImagesFailed(request_id, status, message))

    async def dispatch_loop(self) -> None:
        """Hand queued images to idle replicas, least loaded first. A replica takes one batch at a
        time, so while all are busy the queue grows and the next batches are fuller."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue and (replica := self._least_loaded()) is not None:
                batch = self._take_batch()
                if not batch:
                    break
                replica.busy = True
                task = asyncio.get_running_loop().create_task(self._encode_on(replica, batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(_exit_on_crash)

    def _least_loaded(self) -> Replica | None:
        idle = [replica for replica in self.replicas if not replica.busy]
        return min(idle, key=lambda replica: (replica.num_images, replica.group), default=None)

    def _take_batch(self) -> list[tuple[Job, Entry]]:
        """Up to batch_size queued jobs, each with a run reserved in the EmbedStore. When the cache is
        full of images in use, the queue waits for a release, or fails if none can come."""
        batch: list[tuple[Job, Entry]] = []
        while self.queue and len(batch) < self.batch_size:
            job = self.queue[0]
            md5 = job.image.md5
            if not self._wanted(job):
                self._drop(self.queue.popleft())  # every request that wanted it is gone
                continue
            entry = self.index.insert(md5, job.image.num_tokens, pin_for=ENCODING)
            if entry is None:
                if batch or self._room_will_free():  # this batch's encode will end too
                    break  # retried when pins are released or a batch ends
                self._drop(self.queue.popleft())
                for request_id, _ in job.waiters:
                    self._fail(
                        request_id, 503, "the image embedding cache is full of images in use; retry later"
                    )
                continue
            job.in_flight = True
            batch.append((self.queue.popleft(), entry))
        return batch

    def _wanted(self, job: Job) -> bool:
        """Some waiter of the job is still here. A request that joins a job while one is finds the
        bytes the job reads: that waiter held them when the newcomer took its own hold (a release
        at the http actor reaches this actor before any request sent after it), and the newcomer
        holds them from then on. Once no waiter is left, a replica may have found them gone."""
        return any(request_id in self.pending for request_id, _ in job.waiters)

    def _drop(self, job: Job) -> None:
        del self.jobs[job.image.md5]

    def _room_will_free(self) -> bool:
        """An encode in flight will end, or some pinned image belongs to a request that has all its
        embeddings: it is scheduled and will unpin when it ends. If every pin is held by requests
        still waiting here and no encode runs, none will."""
        if any(replica.busy for replica in self.replicas):
            return True
        return any(md5s and request_id not in self.pending for request_id, md5s in self.pinned.items())

    async def _encode_on(self, replica: Replica, batch: list[tuple[Job, Entry]]) -> None:
        started = time.perf_counter()
        images = [job.image for job, _ in batch]
        runs = [EmbedRun(entry.md5, entry.row_offset, entry.num_rows) for _, entry in batch]
        held = HeldBatch()
        try:
            held = await self.pixels.hold(images)
            errors = await replica.encode(held.images, runs)
        finally:
            replica.busy = False
            self._wake.set()
            self.pixels.release(held)
        errors = [mine or theirs for mine, theirs in zip(held.errors, errors, strict=True)]
        num_encoded = sum(1 for error in errors if not error)
        seconds = time.perf_counter() - started
        log.debug("replica %d encoded %d image(s) in %.3f s", replica.group, num_encoded, seconds)
        self.batch_seconds.observe(seconds)
        replica.num_images += num_encoded
        self.counters["vit_images_total"] += num_encoded
        self.batch_sizes.observe(len(batch))
        for (job, entry), error, status in zip(batch, errors, held.statuses, strict=True):
            self._finish(job, entry, error, status)
        self._send_stats()  # the encode's own pins are gone, whether or not a waiter is left

    def _finish(self, job: Job, entry: Entry, error: str, status: int = 400) -> None:
        """The job's rows are written (or it failed): answer its waiters still here."""
        md5 = job.image.md5
        del self.jobs[md5]
        waiters = [(r, i) for r, i in job.waiters if r in self.pending]
        successors = [(r, i) for r, i in job.successors if r in self.pending]
        if error:
            self.index.remove(md5)
            for request_id, _ in waiters:
                self._fail(request_id, status, error)
            if successors:  # they hold the bytes: the encode they get reads them while they wait
                self.jobs[md5] = Job(job.image, successors)
                self.queue.append(self.jobs[md5])
                self._wake.set()
            return
        waiters += successors
        self.index.unpin(ENCODING, [md5])  # kept in the cache even if no waiter is left
        for request_id, i in waiters:
            entry.pinned_by.add(request_id)
            self.pinned[request_id].append(md5)
            self.pending[request_id].runs[i] = EmbedRun(md5, entry.row_offset, entry.num_rows)
            self._reply_if_complete(request_id)


async def run(launch: Launch, rank: int) -> None:
    """Every vision rank: the front (rank 0), another group's leader, or a leader's peer."""
    args = launch.args
    layout = VisionLayout(rank, args.visual_tp, args.visual_dp)
    if rank == 0:
        await _run_front(launch, layout)
    elif layout.is_leader:
        await _run_leader(launch, layout)
    else:
        await _run_peer(launch, layout)


async def _run_front(launch: Launch, layout: VisionLayout) -> None:
    channel = await ipc.connect(launch.socket(SCHEDULER_SOCKET), Hello("vision"))
    if launch.args.vit_in_workers:
        replicas, detail = await _replicas_in_workers(launch, layout)
    else:
        replicas, detail = await _replicas_in_vision_ranks(launch, layout)
    actor = VisionActor(launch, channel, replicas, await FrontPixels.connect(launch))
    await announce_ready(
        launch, "vision", 0, detail=f"({detail}, EmbedStore {launch.runtime.embed_store_rows} rows)"
    )
    _watch(actor.dispatch_loop())
    while True:
        msg = await channel.recv()
        if isinstance(msg, EncodeImages):
            actor.on_encode(msg)
        elif isinstance(msg, ReleaseImages):
            actor.on_release(msg.request_id)


async def _replicas_in_vision_ranks(launch: Launch, layout: VisionLayout) -> tuple[list[Replica], str]:
    """--vit_placement process: this rank leads replica 0 (its own ViT share and its group's
    peers); the leaders of the other groups connect."""
    leaders = await _accept(launch.socket(VISION_FRONT_SOCKET), layout.leaders)
    clock = Stopwatch.after_imports()
    group = await _lead_group(launch, layout, clock)
    replicas = [Replica(0, group.encode), *await _remote_replicas(leaders, first_group=1)]
    return replicas, f"{clock}; ViT {layout.visual_dp} replica(s) of {layout.visual_tp} rank(s)"


async def _replicas_in_workers(launch: Launch, layout: VisionLayout) -> tuple[list[Replica], str]:
    """--vit_placement worker: no ViT here and no GPU touched; LM worker g leads replica g
    (visual_tp 1: vision rank g), and connects once its ViT is loaded."""
    clock = Stopwatch.after_imports()
    leaders = await _accept(launch.socket(VISION_FRONT_SOCKET), list(range(layout.visual_dp)))
    replicas = await _remote_replicas(leaders, first_group=0)
    clock.lap("waiting for the LM workers' ViTs")
    return replicas, f"{clock}; ViT {layout.visual_dp} replica(s) in the LM workers"


async def _remote_replicas(leaders: list[asyncio.Future], first_group: int) -> list[Replica]:
    """The replicas whose leaders connect to this front, numbered from `first_group`."""
    replicas = []
    for g, leader in enumerate(leaders, start=first_group):
        remote = RemoteReplica(await leader)
        replicas.append(Replica(g, remote.encode))
        _watch(remote.read_answers())
    return replicas


async def _lead_group(launch: Launch, layout: VisionLayout, clock: Stopwatch) -> ReplicaGroup:
    """This rank's ViT share (loaded on `clock`) leading its replica group, once the group's
    other ranks have connected (they send nothing back but their death)."""
    peers = await _accept(launch.socket(layout.group_socket()), layout.peers)
    vit = ViTRank.from_launch(launch, layout, clock)
    group = ReplicaGroup(vit, [await peer for peer in peers])
    for peer in group.peers:
        _watch(_expect_silence(peer))
    return group


async def _run_leader(launch: Launch, layout: VisionLayout) -> None:
    clock = Stopwatch.after_imports()
    group = await _lead_group(launch, layout, clock)
    front = await connect_front(launch, layout)
    await announce_ready(
        launch, "vision", layout.rank, detail=f"({clock}; ViT replica {layout.group} leader)"
    )
    await serve_batches(front, group)


async def _run_peer(launch: Launch, layout: VisionLayout) -> None:
    clock = Stopwatch.after_imports()
    vit = ViTRank.from_launch(launch, layout, clock)
    hello = Hello("vision", layout.rank)
    leader = await ipc.connect_when_listening(launch.socket(layout.group_socket()), hello, CONNECT_TIMEOUT_S)
    await announce_ready(
        launch,
        "vision",
        layout.rank,
        detail=f"({clock}; ViT replica {layout.group} rank {layout.rank_in_group})",
    )
    while True:
        msg = await leader.recv()  # ChannelClosed: the leader died, and the server with it
        assert isinstance(msg, ForwardTiles), f"a ViT rank expects ForwardTiles, got {type(msg).__name__}"
        await vit.run(vit.follow, msg.num_tiles)


async def _accept(path: str, ranks: list[int]) -> list[asyncio.Future]:
    """Listen on `path` for the vision ranks `ranks`; one future per rank resolves to its channel."""
    if not ranks:
        return []
    loop = asyncio.get_running_loop()
    futures = {rank: loop.create_future() for rank in ranks}

    async def on_channel(channel: ipc.Channel) -> None:
        hello = await channel.recv()
        assert isinstance(hello, Hello) and hello.rank in futures, f"unexpected vision connection {hello!r}"
        futures[hello.rank].set_result(channel)

    _servers.append(await ipc.serve(path, on_channel))
    return [futures[rank] for rank in ranks]


async def _expect_silence(channel: ipc.Channel) -> None:
    """A peer never writes to its leader: reading only notices it die."""
    msg = await channel.recv()
    raise AssertionError(f"a ViT peer sent {type(msg).__name__}")


def _watch(coro) -> None:
    """Run `coro` for the process's life; if it fails (a peer died), the process exits."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_exit_on_crash)


_servers: list = []
_background: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks


def _exit_on_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("vision task failed", exc_info=task.exception())
        logging.shutdown()
        os._exit(1)
