"""What every actor process is started with: the server args and the resolved runtime facts."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import msgspec

from vlmd import ipc
from vlmd.config import ServerArgs
from vlmd.messages import Hello, Message, Ready

LAUNCH_FILE = "launch.json"
SUPERVISOR_SOCKET = "supervisor.sock"
SCHEDULER_SOCKET = "scheduler.sock"
log = logging.getLogger("vlmd.launch")
# When this actor process began: `vlmd.actors.__main__` imports this module before its role's.
PROCESS_STARTED = time.perf_counter()


class RuntimeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Facts the supervisor resolved from the model and the machine, shared by all actors."""

    server_id: int  # the supervisor's pid: prefix of every shared-memory segment
    run_dir: str  # sockets live here
    device: str  # "cpu" | "cuda"
    dtype: str  # model dtype: "float32" | "bfloat16" | "float16"
    hidden_size: int  # language model hidden size: width of an embedding row
    image_seq_length: int  # image tokens per tile
    num_kv_pages: int  # 0 until the workers have sized the KV cache from free device memory
    max_req_total_len: int  # 0 until num_kv_pages is known
    max_model_len: int  # the model's max_position_embeddings
    conversation: str | None = None  # OpenGVLab's conversation template named by config.json
    embed_store: str = ""  # shared-memory segment of the EmbedStore ("" without multimodal)
    embed_store_rows: int = 0


class Launch(msgspec.Struct, frozen=True):
    args: ServerArgs
    runtime: RuntimeInfo

    def socket(self, name: str) -> str:
        return os.path.join(self.runtime.run_dir, name)


def write_launch(launch: Launch) -> None:
    with open(os.path.join(launch.runtime.run_dir, LAUNCH_FILE), "wb") as f:
        f.write(msgspec.json.encode(launch))


def read_launch(run_dir: str) -> Launch:
    with open(os.path.join(run_dir, LAUNCH_FILE), "rb") as f:
        return msgspec.json.decode(f.read(), type=Launch)


def die_with_parent() -> None:
    """Ask the kernel to kill this process when the supervisor dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() == 1:
        sys.exit(1)  # the parent died before we could register


def setup_logging(role: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("VLMD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {role:>9} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # PIL's plugins log what is wrong with an uploaded file (a TIFF's absurd samples per pixel at
    # ERROR): the client gets it as a 400, and a client must not be able to write server errors.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    return logging.getLogger(f"vlmd.{role}")


class Stopwatch:
    """The seconds each start-up phase took, for the actor's Ready line (so that kernel
    compilation, weight loading and graph capture are told apart)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last = time.perf_counter()

    @classmethod
    def after_imports(cls) -> Stopwatch:
        """An actor's clock, its first phase the imports since its process began (torch's and
        transformers' take seconds on a cold disk)."""
        clock = cls()
        clock._last = PROCESS_STARTED
        clock.lap("imports")
        return clock

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self._last))
        self._last = now

    def absorb(self, other: Stopwatch, prefix: str) -> None:
        """Take the phases `other` timed, each named with `prefix`; `other` started right after this
        one's last lap (the ViT's phases in the Ready line of the LM worker that hosts it)."""
        self.phases += [(prefix + phase, seconds) for phase, seconds in other.phases]
        self._last = other._last

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases)


async def connect_supervisor(launch: Launch, role: str, rank: int = 0) -> ipc.Channel:
    """The channel to the supervisor, before the actor is ready (workers wait on it for
    VisionLoaded); `announce_ready` takes it."""
    return await ipc.connect(launch.socket(SUPERVISOR_SOCKET), Hello(role, rank))


def freeze_start_up(name: str) -> int:
    """Collect the start-up's garbage, then move every object left (imports, the model's modules)
    out of the cyclic garbage collector's reach (`gc.freeze`): a full collection walks every
    tracked object, some 174k after a worker's imports (35 ms on this project's CPU VM), and one
    that runs while a step waits to be launched delays its tokens. Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d start-up objects frozen out of the garbage collector's passes", name, frozen)
    return frozen


async def announce_ready(
    launch: Launch,
    role: str,
    rank: int = 0,
    detail: str = "",
    num_kv_pages: int = 0,
    on_message: Callable[[Message], None] | None = None,
    channel: ipc.Channel | None = None,
) -> ipc.Channel:
    """Tell the supervisor we are ready (on `channel` if connected already); pass what it sends
    to `on_message` (the http actor's Shutdown); exit if the supervisor ever goes away. First the
    start-up's objects are frozen out of the garbage collector's passes (`freeze_start_up`)."""
    freeze_start_up(f"{role}{rank}")
    if channel is None:
        channel = await connect_supervisor(launch, role, rank)
    channel.send(Ready(role, rank, detail, num_kv_pages))

    async def watch() -> None:
        try:
            while True:
                msg = await channel.recv()
                if on_message is None:
                    log.warning("unexpected message from the supervisor: %r", type(msg).__name__)
                else:
                    on_message(msg)
        except ipc.ChannelClosed:
            pass
        os._exit(0)

    loop = asyncio.get_running_loop()
    _background.add(loop.create_task(watch()))
    if launch.args.log_stalls_ms:
        _background.add(loop.create_task(watch_loop(f"{role}{rank}", launch.args.log_stalls_ms / 1e3)))
        watch_gc(f"{role}{rank}", launch.args.log_stalls_ms / 1e3)
    return channel


# How often --log_stalls_ms wakes an actor's event loop to see how late the wake-up comes.
LOOP_WATCH_PERIOD_S = 0.005


async def watch_loop(name: str, threshold_s: float) -> None:
    """Log each wake-up of this event loop that comes `threshold_s` or more late: the loop was
    held (a callback's host work, the GIL held by another thread) and every message it should
    have passed on in the meantime (tokens included) waited."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LOOP_WATCH_PERIOD_S)
        late = loop.time() - started - LOOP_WATCH_PERIOD_S
        if late >= threshold_s:
            log.info("stall: %s's event loop was held %.1f ms", name, late * 1e3)


def watch_gc(name: str, threshold_s: float) -> Callable[[str, dict], None]:
    """Log each pass of the cyclic garbage collector that takes `threshold_s` or more: it holds
    the GIL, so the event loop (and any thread) waits it out. Returns the callback it installs
    in `gc.callbacks`."""
    started = 0.0

    def on_gc(phase: str, info: dict) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
            return
        seconds = time.perf_counter() - started
        if seconds >= threshold_s:
            log.info(
                "stall: %s's garbage collection of generation %d (%d objects collected) took %.1f ms",
                name,
                info["generation"],
                info["collected"],
                seconds * 1e3,
            )

    gc.callbacks.append(on_gc)
    return on_gc


# Host work longer than this on a thread that launches GPU work (a worker's, its ViT's) is
# logged on a GPU: the next step is launched only once it is done, so such work may delay
# tokens (issue 16's latency spikes).
SLOW_HOST_S = 0.015


class Timeline:
    """What a thread did since a moment (`restart`): each call a `HostWatch` timed and each
    message it took in, at their offsets from that moment, for the line that explains a stall
    (--log_stalls_ms). Times are time.monotonic(), one clock for every process of the host, so
    a message's sending by another process has its offset too."""

    MAX_EVENTS = 100  # past this many, the rest since the last restart are dropped

    def __init__(self) -> None:
        self.origin: float | None = None  # None: not noting anything
        self._events: list[tuple[float, str]] = []

    def restart(self, now: float) -> None:
        self.origin, self._events = now, []

    def stop(self) -> None:
        self.origin, self._events = None, []

    def note(self, started: float, seconds: float, what: str) -> None:
        if self.origin is not None and len(self._events) < self.MAX_EVENTS:
            self._events.append((started, f"{what} {seconds * 1e3:.1f} ms"))

    def received(self, what: str, sent_at: float) -> None:
        """A message taken in now, sent at `sent_at`."""
        if self.origin is not None and len(self._events) < self.MAX_EVENTS:
            self._events.append((time.monotonic(), f"{what} (sent +{(sent_at - self.origin) * 1e3:.1f})"))

    def describe(self) -> str:
        """`+offset what` for each event, in the order they began, offsets in ms."""
        events = sorted(self._events, key=lambda event: event[0])
        return ", ".join(f"+{(started - self.origin) * 1e3:.1f} {text}" for started, text in events)


_UNTIMED = contextlib.nullcontext()  # reusable: it keeps no state


class HostWatch:
    """Logs the calls of a thread that take longer than `threshold_s` (SLOW_HOST_S unless told;
    where `enabled`), naming what they did and for which step (or batch); notes every call,
    slow or not, on `timeline` where one is given."""

    def __init__(
        self,
        enabled: bool,
        threshold_s: float = SLOW_HOST_S,
        logger: logging.Logger | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.enabled = enabled
        self.threshold_s = threshold_s
        self.log = logger or logging.getLogger("vlmd.worker")
        self.timeline = timeline

    def timed(self, what: str, step_id: int) -> contextlib.AbstractContextManager:
        """Around a call; where nothing is logged or noted, a context that does nothing (it sits
        on the per-step path of the worker and the scheduler)."""
        if not self.enabled and self.timeline is None:
            return _UNTIMED
        return self._timed(what, step_id)

    @contextlib.contextmanager
    def _timed(self, what: str, step_id: int) -> Iterator[None]:
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        if self.timeline is not None:
            self.timeline.note(started, seconds, f"{what} {step_id}")
        if self.enabled and seconds > self.threshold_s:
            self.log.info("slow host work: %s %d took %.1f ms", what, step_id, seconds * 1e3)


_background: set = set()  # the event loop keeps only weak references to tasks
