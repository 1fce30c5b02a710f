"""A TP rank worker's step loop: the scheduler's plans executed in order (`serve_steps`), the side
steps of --prefill_sms queued a part at a time beside them (`SideSteps`), and --log_stalls_ms's
account of steps launched late (`StallLog`)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import sys
import time
from collections.abc import Iterator

import torch

from vlmd import ipc
from vlmd.actors.hosted_vit import StepTurns
from vlmd.actors.launch import SLOW_HOST_S, HostWatch, Timeline
from vlmd.messages import FlushStep, StepPlan
from vlmd.runner import LaunchedStep, ModelRunner

log = logging.getLogger("vlmd.worker")


async def serve_steps(
    runner: ModelRunner,
    channel: ipc.Channel,
    send_results: bool,
    overlap: bool | None = None,
    turns: StepTurns | None = None,
    stall_s: float = 0,
) -> None:
    """Execute the scheduler's plans in order. On a GPU a step is launched before the previous
    one is collected, so the device runs the next step while the host reads back and reports
    the last one; the scheduler sends FlushStep when no plan follows. On the CPU, where launching
    is computing, each step is collected at once (holding it would only delay its tokens);
    `overlap` overrides that choice (tests).

    A side step (--prefill_sms) is queued on the side stream a part at a time between the plans
    and while the thread waits for a decode step's tokens (`SideSteps`), and answered once it has
    ended, whenever that is. With stall_s > 0, each
    step launched stall_s or more after a decode step (no FlushStep between) is logged (`StallLog`)."""
    cuda = runner.device.type == "cuda"
    if overlap is None:
        overlap = cuda
    held = None  # the launched step not yet collected
    stalls = StallLog(stall_s, runner.device)
    # With --log_stalls_ms, host work of a third of it is logged: a few such pieces between two
    # decode steps add up to a stall. A wait for a decode step's tokens, which normally lasts
    # most of a step, only over SLOW_HOST_S. Both are noted on the stall lines' timeline.
    watch = HostWatch(
        cuda, min(SLOW_HOST_S, stall_s / 3) if stall_s else SLOW_HOST_S, timeline=stalls.timeline
    )
    waits = HostWatch(cuda, timeline=stalls.timeline)
    runner.watch = watch  # the parts of a slow launch logged too
    side = SideSteps(runner, channel, send_results, watch)

    held_decodes = False  # the held step is decode rows only (its wait is timed: it should be short)

    def report() -> None:
        nonlocal held
        side.fill_wait(held)
        with (
            waits.timed("waiting for decode step", held.step_id) if held_decodes else contextlib.nullcontext()
        ):
            result = runner.collect(held)
        held = None
        if send_results:
            channel.send(result)
        if turns is not None:  # the hosted ViT may queue a slice before the next step
            turns.step_collected()

    while True:
        msg = await side.next_message()
        if isinstance(msg, FlushStep):
            stalls.flushed()
            if held is not None:
                report()
            if turns is not None:
                turns.idle()
            continue
        assert isinstance(msg, StepPlan), f"worker expects StepPlan, got {type(msg).__name__}"
        stalls.received(msg)
        if msg.side:
            with watch.timed("launching side step", msg.step_id):
                side.launch(msg)
            continue
        decoding = any(len(item.token_ids) == 1 for item in msg.items)
        if turns is not None:
            turns.step_launched(decoding)
        with stalls.launch(msg.step_id, decoding), watch.timed("launching step", msg.step_id):
            launched = runner.launch(msg)
        if held is not None:
            report()
        held, held_decodes = launched, all(len(item.token_ids) == 1 for item in msg.items)
        if not overlap:
            report()


# How often a worker looks at a running side step between plans (seconds).
SIDE_POLL_S = 0.0005


# At most this many times a worker writes its threads' stacks when a launch is slow (StallLog).
STACK_DUMPS = 20


class StallLog:
    """--log_stalls_ms in a worker (threshold_s > 0): each step launched threshold_s or more after
    a decode step (no FlushStep between: the scheduler or this thread held the tokens), with a
    second line, the `timeline` of what this thread did since that decode step's launch (the
    calls its HostWatches timed, the plans it took in and when the scheduler sent them); and at
    each flush what the CUDA allocator did since the last: each cudaMalloc, and above all each
    time it gave its cache back to CUDA to retry one (a cudaFree waits for the whole device).
    The first STACK_DUMPS launches of steps with decode rows that take threshold_s also write
    every thread's Python stack at that moment to `dump_file` (stderr, in the server's log): what
    the launch waits on, and what the process's other threads (a hosted ViT's) do meanwhile."""

    ALLOCATOR_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free")

    def __init__(self, threshold_s: float, device: torch.device, dump_file=None) -> None:
        self.threshold_s = threshold_s
        self.device = device
        self.dump_file = dump_file or sys.stderr
        self._dumps_left = STACK_DUMPS if threshold_s and _has_fileno(self.dump_file) else 0
        self._last_decode: tuple[int, float] | None = None  # the last step launched if it decodes
        self.timeline = Timeline() if threshold_s else None  # since the last decode step's launch
        self._allocator = self._allocator_counts()

    @contextlib.contextmanager
    def launch(self, step_id: int, decoding: bool) -> Iterator[None]:
        """Around a step's launch: log it if late; while dumps are left, have faulthandler write
        every thread's stack should it take threshold_s. faulthandler writes from a thread of its
        own that needs no GIL: a thread that holds the GIL and so delays the launch is caught in
        the act."""
        self._log_if_late(step_id, decoding)
        if not self._dumps_left or not decoding:  # a prompt's launch is slow anyway
            yield
            return
        started = time.perf_counter()
        faulthandler.dump_traceback_later(self.threshold_s, file=self.dump_file)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
        seconds = time.perf_counter() - started
        if seconds >= self.threshold_s:
            self._dumps_left -= 1
            log.info(
                "stall: the threads' stacks %.0f ms into launching step %d are on stderr; it took %.1f ms",
                self.threshold_s * 1e3,
                step_id,
                seconds * 1e3,
            )

    def _log_if_late(self, step_id: int, decoding: bool) -> None:
        if not self.threshold_s:
            return
        now = time.monotonic()
        if self._last_decode is not None:
            last_id, last_at = self._last_decode
            if now - last_at >= self.threshold_s:
                log.info(
                    "stall: step %d launched %.1f ms after decode step %d",
                    step_id,
                    (now - last_at) * 1e3,
                    last_id,
                )
                log.info("stall timeline since decode step %d: %s", last_id, self.timeline.describe())
        self._last_decode = (step_id, now) if decoding else None
        if decoding:
            self.timeline.restart(now)
        else:
            self.timeline.stop()

    def received(self, plan: StepPlan) -> None:
        """A plan taken in (noted on the timeline)."""
        if self.timeline is not None:
            self.timeline.received(f"{'side plan' if plan.side else 'plan'} {plan.step_id} in", plan.sent_at)

    def flushed(self) -> None:
        self._last_decode = None  # the worker idles until the next plan
        if not self.threshold_s:
            return
        self.timeline.stop()
        counts = self._allocator_counts()
        grown = {
            key: counts[key] - self._allocator[key] for key in counts if counts[key] != self._allocator[key]
        }
        self._allocator = counts
        if grown:
            log.info("stall: the CUDA allocator since the last flush: %s", grown)

    def _allocator_counts(self) -> dict[str, int]:
        if not self.threshold_s or self.device.type != "cuda":
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return {key: stats.get(key, 0) for key in self.ALLOCATOR_KEYS}


def _has_fileno(stream) -> bool:
    """faulthandler writes to a file descriptor: a stream without one (a test's capture) gets no dumps."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


class SideSteps:
    """The worker's side step in flight (--prefill_sms): its parts (inputs, attention plan, a few
    layers at a time: `ModelRunner.launch_side`) queued between the plans it receives and while
    it waits for a decode step's tokens, then its sampling once the forward has run, then its
    result sent once its tokens are on the host."""

    def __init__(
        self, runner: ModelRunner, channel: ipc.Channel, send_results: bool, watch: HostWatch
    ) -> None:
        self.runner = runner
        self.channel = channel
        self.send_results = send_results
        self.watch = watch
        self.forward = None  # the side step, from its launch until its forward has run
        self.sampling = None  # its sampling, queued once the forward has run
        self._next: asyncio.Future | None = None  # the receive in progress while one runs
        self._progressed = False  # a part was queued since the last message was returned

    def launch(self, plan: StepPlan) -> None:
        assert self.forward is None and self.sampling is None, "one side step at a time"
        self.forward = self.runner.launch_side(plan)
        self.poll()

    def poll(self) -> None:
        """Queue the forward's next part; once it has run, its sampling; once that is on the
        host, send the result."""
        if self.forward is not None:
            step_id = self.forward.plan.step_id
            queued = True
            if self.forward.parts is not None:  # timed only when there is one (the timeline's room)
                self._progressed = True
                with self.watch.timed("queuing a part of side step", step_id):
                    queued = self.runner.advance_side(self.forward)
            if queued and self.runner.side_done(self.forward):
                with self.watch.timed("sampling side step", step_id):
                    self.sampling, self.forward = self.runner.finish_side(self.forward), None
        if self.sampling is not None and self.runner.copied(self.sampling):
            result, self.sampling = self.runner.collect(self.sampling), None
            if self.send_results:
                self.channel.send(result)

    def fill_wait(self, launched: LaunchedStep) -> None:
        """Queue the side step's parts while `launched`'s tokens are not on the host yet: time
        this thread would otherwise spend waiting for them."""
        while (
            self.forward is not None and self.forward.parts is not None and not self.runner.copied(launched)
        ):
            self.poll()

    async def next_message(self):
        """The next message from the scheduler. While a side step runs, it goes on meanwhile: a
        part queued (or its end looked at) between two messages at least, more parts one after
        another while no message waits, then looked at every SIDE_POLL_S."""
        if self._next is None and self.forward is None and self.sampling is None:
            return await self.channel.recv()
        if not self._progressed:  # should the messages come back to back (parts queued while a
            self.poll()  # step's tokens were awaited count: a plan waiting now is not held back)
        if self._next is None:
            self._next = asyncio.ensure_future(self.channel.recv())
        while True:
            if self.forward is None and self.sampling is None:
                timeout = None
            elif self.forward is not None and self.forward.parts is not None:
                timeout = 0  # more to queue: only let a waiting message in first
            else:
                timeout = SIDE_POLL_S
            await asyncio.wait({self._next}, timeout=timeout)
            if self._next.done():
                msg, self._next, self._progressed = self._next.result(), None, False
                return msg
            self.poll()
