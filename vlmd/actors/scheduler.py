"""The scheduler actor: a thin asyncio shell around `vlmd.core.scheduler.Scheduler`.

Connections (all accepted on scheduler.sock, each opened with a Hello): the http actor submits
and aborts requests and receives tokens; the vision actor encodes images; TP rank workers
execute step plans. Two steps are in flight at a time: the next one is planned and sent while the
workers run the last one (its sampled tokens fed back on the device), so the GPU never waits
for this loop. Messages that arrive meanwhile are applied between steps. With --prefill_sms a
side step of prompt spans may be in flight as well (`Scheduler.schedule_side`): the workers run it
beside the decode steps and answer it whenever it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter, deque

import msgspec

from vlmd import ipc
from vlmd.actors.launch import SCHEDULER_SOCKET, HostWatch, Launch, announce_ready
from vlmd.actors.metrics import IMAGE_STAGE_BUCKETS_S
from vlmd.config import step_timeout_s
from vlmd.core.histogram import Histogram
from vlmd.core.page_allocator import pages_for
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.core.step_watch import Overdue, StepWatch
from vlmd.messages import (
    Abort,
    EncodeImages,
    Fatal,
    FlushStep,
    GetMetrics,
    Hello,
    HistogramSnapshot,
    ImagesFailed,
    ImagesReady,
    MetricsSnapshot,
    ReleaseImages,
    RequestFailed,
    StepPlan,
    StepResult,
    SubmitRequest,
    VisionStats,
)

log = logging.getLogger("vlmd.scheduler")

# The step the workers run, and the next one, planned meanwhile (see the module docstring).
MAX_STEPS_IN_FLIGHT = 2
# After telling the supervisor that a worker hung: exit if nobody has stopped us by then.
HUNG_EXIT_BACKSTOP_S = 30.0


class SchedulerActor:
    def __init__(self, launch: Launch) -> None:
        self.args = launch.args
        timeout_s = step_timeout_s(launch.args, launch.runtime.device)
        self.step_watch = StepWatch(timeout_s) if timeout_s else None
        self.side_watch = StepWatch(timeout_s) if timeout_s else None  # side steps (--prefill_sms)
        # --log_stalls_ms: planning or applying a step that takes a third of it is logged (the
        # workers' next plan waits for this loop).
        stall_s = launch.args.log_stalls_ms / 1e3
        self.watch = HostWatch(bool(stall_s), stall_s / 3, logger=log)
        self.supervisor: ipc.Channel | None = None  # set once the supervisor knows we are ready
        self.core: Scheduler | None = None  # built once every worker has said how many KV pages it has
        self._worker_pages: dict[int, int] = {}
        self.http: ipc.Channel | None = None
        self.vision: ipc.Channel | None = None
        self.workers: dict[int, ipc.Channel] = {}
        self.num_workers = launch.args.tp
        self._work = asyncio.Event()
        self._results: asyncio.Queue[StepResult] = asyncio.Queue()
        self._workers_ready = asyncio.Event()
        self._vision_counters: dict[str, float] = {}
        self._vision_histograms: dict[str, HistogramSnapshot] = {}
        self._finished = Counter()
        self._with_images: set[str] = set()  # requests whose images the vision actor has pinned
        self._images_asked_at: dict[str, float] = {}  # request id -> when its images went to the ViT
        self._image_wait = Histogram(IMAGE_STAGE_BUCKETS_S)

    async def on_channel(self, channel: ipc.Channel) -> None:
        hello = await channel.recv()
        assert isinstance(hello, Hello), f"expected Hello, got {hello!r}"
        if hello.role == "http":
            self.http = channel
        elif hello.role == "vision":
            self.vision = channel
        elif hello.role == "worker":
            self.workers[hello.rank] = channel
            self._worker_pages[hello.rank] = hello.num_kv_pages
            if len(self.workers) == self.num_workers:
                self.core = Scheduler(
                    SchedulerConfig(
                        num_pages=min(self._worker_pages.values()),
                        page_size=self.args.page_size,
                        max_num_batched_tokens=self.args.max_num_batched_tokens,
                        decode_step_prefill_tokens=self.args.decode_step_prefill_tokens,
                        max_running_requests=self.args.max_running_requests,
                        enable_prefix_cache=not self.args.disable_prefix_cache,
                        side_prefill=self.args.prefill_sms > 0,
                    )
                )
                self._workers_ready.set()
        try:
            while True:
                self._dispatch(await channel.recv())
        except ipc.ChannelClosed:
            # A peer only disconnects when it dies: the server cannot go on without it.
            log.error("%s%s disconnected", hello.role, hello.rank if hello.role == "worker" else "")
            logging.shutdown()
            os._exit(1)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, StepResult):
            self._results.put_nowait(msg)
            self._work.set()  # the step loop may be waiting for a side step's result
        elif isinstance(msg, SubmitRequest):
            self._submit(msg)
        elif isinstance(msg, Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, ImagesReady):
            self._vision_counters = msg.counters
            self._vision_histograms = msg.histograms
            if (asked_at := self._images_asked_at.pop(msg.request_id, None)) is not None:
                self._image_wait.observe(time.monotonic() - asked_at)
            self.core.images_ready(msg.request_id, msg.runs)
            self._work.set()
        elif isinstance(msg, VisionStats):
            self._vision_counters = msg.counters
            self._vision_histograms = msg.histograms
        elif isinstance(msg, ImagesFailed):
            self._abort(msg.request_id)
            self.http.send(RequestFailed(msg.request_id, msg.status, msg.message))
        elif isinstance(msg, GetMetrics):
            histograms = {**self._vision_histograms, "image_wait_seconds": self._image_wait.snapshot()}
            self.http.send(MetricsSnapshot(msg.query_id, self._metrics(), histograms))
        else:
            log.warning("unexpected message %r", type(msg).__name__)

    def _submit(self, msg: SubmitRequest) -> None:
        sampling = msg.sampling
        if sampling.do_sample and sampling.seed is None:
            # Every TP rank samples from the same logits; a shared seed makes them draw the same.
            sampling = msgspec.structs.replace(sampling, seed=random.getrandbits(63))
        request = Request(
            request_id=msg.request_id,
            prompt_ids=msg.prompt_ids,
            sampling=sampling,
            images=msg.images,
            stop_token_seqs=msg.stop_token_seqs,
            eos_token_ids=msg.eos_token_ids,
        )
        # The http actor refuses both; a request that slipped through must not reach the core,
        # whose assertions would take the whole server down.
        if not request.prompt_ids:
            self.http.send(RequestFailed(msg.request_id, 400, "the prompt has no tokens"))
            return
        if pages_for(request.max_total_tokens, self.core.config.page_size) > self.core.config.num_pages:
            self.http.send(RequestFailed(msg.request_id, 400, "prompt + max_new_tokens exceed the KV cache"))
            return
        self.core.add(request)
        if msg.images:
            self._with_images.add(msg.request_id)
            self._images_asked_at[msg.request_id] = time.monotonic()
            self.vision.send(EncodeImages(msg.request_id, msg.images))
        self._work.set()

    def _abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._images_asked_at.pop(request_id, None)
        self._release_images(request_id)
        self._check_if_idle()
        self._work.set()

    def _release_images(self, request_id: str) -> None:
        if request_id in self._with_images:
            self._with_images.discard(request_id)
            self.vision.send(ReleaseImages(request_id))

    async def step_loop(self) -> None:
        await self._workers_ready.wait()
        in_flight: deque[StepPlan] = deque()
        flushed = False  # a FlushStep went out since the last plan
        timed = self.watch.timed
        while True:
            # The decode step first: the workers launch it before they start on a side step.
            if len(in_flight) < MAX_STEPS_IN_FLIGHT:
                with timed("scheduler: planning the step after step", self.core.last_step_id):
                    plan = self.core.schedule()
                if plan is not None:
                    self._to_workers(plan)
                    in_flight.append(plan)
                    flushed = False
                    continue
            with timed("scheduler: planning a side step after step", self.core.last_step_id):
                side = self.core.schedule_side()
            if side is not None:
                self._to_workers(side)
                continue
            if not in_flight and self.core.side is None:
                self._work.clear()
                await self._work.wait()
                continue
            if len(in_flight) == 1 and not flushed:
                # Workers hold their newest step until the next plan comes; none will now.
                self._to_workers(FlushStep())
                flushed = True
            if not in_flight:  # only the side step runs: new work may start beside it
                self._work.clear()
                if self._results.empty():
                    await self._work.wait()  # a result sets it too
                if self._results.empty():
                    continue
            result = await self._next_result()
            with timed("scheduler: applying the result of step", result.step_id):
                if self._is_side(result):
                    self._apply(self.core.side, result)
                else:
                    self._apply(in_flight.popleft(), result)

    def _is_side(self, result: StepResult) -> bool:
        return self.core.side is not None and result.step_id == self.core.side.step_id

    async def _next_result(self) -> StepResult:
        """The next result (the oldest step's, or the side step's); past --step_timeout the server
        stops instead."""
        if self.step_watch is None:
            return await self._results.get()
        watches = (self.step_watch, self.side_watch)
        while self._results.empty():  # a result already there is taken, however late
            now = time.monotonic()
            for watch in watches:
                if (overdue := watch.overdue(now)) is not None:
                    await self._hung(overdue)
            deadline = min((d for watch in watches if (d := watch.deadline()) is not None), default=now + 1)
            try:
                result = await asyncio.wait_for(self._results.get(), deadline - now)
                break
            except TimeoutError:
                pass  # a timer may fire a little early: the deadline is checked again
        else:
            result = self._results.get_nowait()
        watch = self.side_watch if self._is_side(result) else self.step_watch
        watch.returned(result.step_id, time.monotonic())
        return result

    async def _hung(self, overdue: Overdue) -> None:
        """A worker is hung: fail every request (their clients get a 503 at once, not a closed
        connection) and have the supervisor stop the server. Never returns."""
        workers = "worker0" if self.num_workers == 1 else f"one of worker0..worker{self.num_workers - 1}"
        reason = (
            f"step {overdue.step_id} has not come back from {workers} in {overdue.running_s:.1f} s "
            f"(--step_timeout allows {overdue.allowed_s:g} s): a worker is hung"
        )
        log.error("%s; stopping the server", reason)
        for request_id in list(self.core.requests):
            self.http.send(RequestFailed(request_id, 503, f"the server is stopping: {reason}"))
        self.supervisor.send(Fatal(reason))
        await asyncio.sleep(HUNG_EXIT_BACKSTOP_S)  # the supervisor stops every actor meanwhile
        logging.shutdown()
        os._exit(1)

    def _to_workers(self, msg) -> None:
        if isinstance(msg, StepPlan):
            msg.sent_at = time.monotonic()
            if self.step_watch is not None:
                (self.side_watch if msg.side else self.step_watch).sent(msg, msg.sent_at)
        for worker in self.workers.values():
            worker.send(msg)

    def _apply(self, plan: StepPlan, result: StepResult) -> None:
        outputs, finished = self.core.update(plan, result)
        for out in outputs:
            self.http.send(out)
        for done in finished:
            self._finished[done.reason] += 1
            self._release_images(done.request.request_id)
        self._check_if_idle()

    def _check_if_idle(self) -> None:
        """Once no request is left, a leaked page or a dangling reference (a page held, a cache
        node referenced) fails the check the moment it happens; the check counts, and costs the
        same whatever the prefix cache holds (the next request is not kept waiting)."""
        if self.core.idle:
            self.core.check_idle()
            assert not self._images_asked_at, (
                f"waits for images of requests gone: {list(self._images_asked_at)}"
            )

    def _metrics(self) -> dict[str, float]:
        stats = self.core.stats
        values = {
            "prefix_cache_queried_tokens_total": stats.queried_tokens,
            "prefix_cache_hit_tokens_total": stats.hit_tokens,
            "preemptions_total": stats.preemptions,
            "decode_steps_prefill_capped_total": stats.capped_steps,
            "side_steps_total": stats.side_steps,
            "prefix_cache_evicted_pages_total": self.core.cache.num_evicted,
            "kv_pages_cached": self.core.cache.num_unreferenced,
            "kv_pages_total": self.core.config.num_pages,
            "kv_pages_used": self.core.num_used_pages,
            "requests_running": len(self.core.running),
            "requests_waiting": len(self.core.requests) - len(self.core.running),
        }
        values.update({f"requests_finished_{reason}": n for reason, n in self._finished.items()})
        values.update(self._vision_counters)
        return values


async def run(launch: Launch, rank: int) -> None:
    actor = SchedulerActor(launch)
    server = await ipc.serve(launch.socket(SCHEDULER_SOCKET), actor.on_channel)
    actor.supervisor = await announce_ready(launch, "scheduler")
    async with server:
        await actor.step_loop()
