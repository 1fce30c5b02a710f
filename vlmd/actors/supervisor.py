"""`vlmd serve`: start every actor, wait for each to be ready, and stop them all together.

On SIGTERM or SIGINT the server first drains: the http actor refuses new requests and lets those
in flight finish for up to --shutdown_timeout seconds (`HttpActor.drain`). A second signal, a
signal during start-up, or the death of any actor stops it at once. Either way, every actor is
then stopped (SIGTERM, then SIGKILL after a grace period), every shared-memory segment of this
server is unlinked and the run directory is removed. Actors also die on their own if the
supervisor is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

from vlmd import ipc, shm
from vlmd.actors.launch import SUPERVISOR_SOCKET, Launch, RuntimeInfo, write_launch
from vlmd.actors.resolve import DTYPE_BYTES, resolve_runtime, with_kv_pages
from vlmd.config import ConfigError, ServerArgs
from vlmd.messages import Drained, Fatal, Hello, Ready, Shutdown, StartServing, VisionLoaded

log = logging.getLogger("vlmd.supervisor")
STOP_GRACE_S = 5.0
START_TIMEOUT_S = 600.0
DEATH_REPORT_GRACE_S = 0.3
# After an actor's death, how long the http actor may take to answer its requests in flight (a 503
# each, http.END_GRACE_S at most) and exit by itself before it is stopped.
HTTP_ANSWER_GRACE_S = 3.0
# How long past --shutdown_timeout to wait for the http actor's Drained before stopping anyway:
# it gives the requests it ends 2 s (http.END_GRACE_S) to send their errors.
DRAIN_BACKSTOP_S = 5.0
# What the --shm-size advice adds to the EmbedStore: image bytes wait in /dev/shm for the ViT, and a
# request whose image finds no room there is refused with a 503.
SHM_IMAGE_HEADROOM_MB = 256
HTTP = ("http", 0)


@dataclass
class Actor:
    name: str  # the role, with the rank for roles of one process per GPU (worker0, vision1)
    role: str
    rank: int
    process: asyncio.subprocess.Process


class Supervisor:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.server_id = 0
        self.actors: list[Actor] = []
        self._ready: dict[tuple[str, int], asyncio.Future] = {}
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._exit_code = 0
        self._terminating = False
        self._serving = False  # every actor is ready: a signal drains instead of stopping at once
        self._channels: dict[str, ipc.Channel] = {}  # by actor name, once it is ready
        self._drained: asyncio.Future[Drained] | None = None
        self._draining: asyncio.Task | None = None
        self._vision_loaded: asyncio.Future[None] | None = None  # every vision rank is ready
        self._http_hello: asyncio.Future[ipc.Channel] | None = None  # the http actor, loading
        self._background: set[asyncio.Future] = set()

    async def run(self) -> int:
        import os

        self.server_id = os.getpid()
        run_dir = tempfile.mkdtemp(prefix=f"vlmd-{self.server_id}-")
        server = None
        self._drained = asyncio.get_running_loop().create_future()
        self._vision_loaded = asyncio.get_running_loop().create_future()
        self._http_hello = asyncio.get_running_loop().create_future()
        try:
            runtime = resolve_runtime(self.args, self.server_id, run_dir)
            launch = Launch(self.args, runtime)
            if runtime.embed_store:
                create_embed_store(runtime)
            write_launch(launch)
            server = await ipc.serve(launch.socket(SUPERVISOR_SOCKET), self._on_channel)
            self._install_signal_handlers()
            if await self._start_all(launch):
                log.info("vlmd ready on http://%s:%d", self.args.host, self.args.port)
                print(
                    f"vlmd: serving on http://{self.args.host}:{self.args.port}", file=sys.stderr, flush=True
                )
                self._serving = True
                await self._stop.wait()
            log.info("stopping: %s", self._stop_reason)
        finally:
            if self._draining is not None:
                self._draining.cancel()
            await self._stop_actors()
            if server is not None:
                server.close()
            removed = shm.unlink_all(shm.segment_prefix(self.server_id))
            log.info("unlinked %d shared-memory segment(s)", len(removed))
            shutil.rmtree(run_dir, ignore_errors=True)
        return self._exit_code

    def _stages(self) -> list[list[tuple[str, int]]]:
        """Actors to start, stage by stage; each stage waits for the previous one to be ready.
        Workers and vision ranks load and compile side by side; a worker sizes its KV cache from
        free device memory only once every vision rank is ready (`VisionLoaded`). With the ViT in
        the workers, each loads its own before sizing its KV cache, and the one vision process,
        the front, is ready once every worker has joined it as its replica's leader. The http
        actor loads beside them too, and serves once the workers are ready (`StartServing`)."""
        workers = [("worker", rank) for rank in range(self.args.tp)]
        vision = [("vision", rank) for rank in range(self._num_vision_processes())]
        # The vision front and the http actor connect to the preprocess workers as they start.
        num_preprocess = self.args.preprocess_workers if self.args.enable_multimodal else 0
        preprocess = [("preprocess", rank) for rank in range(num_preprocess)]
        return [[("scheduler", 0), *preprocess], [*workers, *vision, HTTP]]

    def _num_vision_processes(self) -> int:
        """Vision rank r sits on GPU r: visual_dp replica groups of visual_tp ranks each. With the
        ViT in the workers only rank 0, the front, is a process."""
        if not self.args.enable_multimodal:
            return 0
        return 1 if self.args.vit_in_workers else self.args.tp

    async def _start_all(self, launch: Launch) -> bool:
        """Start the actors in dependency order; False if the server is stopping meanwhile."""
        for stage in self._stages():
            for role, rank in stage:
                await self._spawn(launch, role, rank)
            if ("worker", 0) in stage:
                vision = asyncio.gather(*[self._ready[actor] for actor in stage if actor[0] == "vision"])
                vision.add_done_callback(self._on_vision_loaded)
            loading = asyncio.gather(*[self._ready[actor] for actor in stage if actor != HTTP])
            if not await self._started(loading):
                return False
            if HTTP in stage:
                if launch.runtime.num_kv_pages == 0:
                    launch = self._with_worker_kv_pages(launch)
                if not await self._started(self._http_hello):
                    return False
                runtime = launch.runtime
                self._http_hello.result().send(StartServing(runtime.num_kv_pages, runtime.max_req_total_len))
                if not await self._started(self._ready[HTTP]):
                    return False
        return True

    async def _started(self, ready: asyncio.Future) -> bool:
        """Wait for `ready`; False (the server stopping) on a stop or after START_TIMEOUT_S."""
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait(
            [stop, ready], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        stop.cancel()
        if ready in done:
            return True
        ready.cancel()
        self._request_stop(self._stop_reason or "start-up timed out", 1)
        return False

    def _with_worker_kv_pages(self, launch: Launch) -> Launch:
        """Every rank sized its own pool; the smallest one is the server's."""
        pages = min(self._ready[("worker", rank)].result().num_kv_pages for rank in range(self.args.tp))
        launch = Launch(launch.args, with_kv_pages(launch.runtime, launch.args, pages))
        write_launch(launch)
        return launch

    async def _spawn(self, launch: Launch, role: str, rank: int) -> None:
        self._ready[(role, rank)] = asyncio.get_running_loop().create_future()
        cmd = [sys.executable, "-m", "vlmd.actors", role, launch.runtime.run_dir, str(rank)]
        process = await asyncio.create_subprocess_exec(*cmd)
        actor = Actor(self._name(role, rank), role, rank, process)
        self.actors.append(actor)
        asyncio.get_running_loop().create_task(self._watch(actor))

    def _name(self, role: str, rank: int) -> str:
        numbered = role in ("worker", "preprocess") or (role == "vision" and self._num_vision_processes() > 1)
        return f"{role}{rank}" if numbered else role

    async def _watch(self, actor: Actor) -> None:
        code = await actor.process.wait()
        if not self._terminating:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            log.error("actor %s (pid %d) died: %s", actor.name, actor.process.pid, how)
            self._request_stop(f"actor {actor.name} died ({how})", 1)

    async def _on_channel(self, channel: ipc.Channel) -> None:
        try:
            while True:
                msg = await channel.recv()
                if isinstance(msg, Hello) and msg.role == "worker" and not self.args.vit_in_workers:
                    self._background.add(asyncio.ensure_future(self._release_worker(channel)))
                elif isinstance(msg, Hello) and msg.role == "http" and not self._http_hello.done():
                    self._http_hello.set_result(channel)
                elif isinstance(msg, Ready):
                    log.info("%s ready %s", self._name(msg.role, msg.rank), msg.detail)
                    self._channels[self._name(msg.role, msg.rank)] = channel
                    future = self._ready.get((msg.role, msg.rank))
                    if future is not None and not future.done():
                        future.set_result(msg)
                elif isinstance(msg, Drained) and not self._drained.done():
                    self._drained.set_result(msg)
                elif isinstance(msg, Fatal):
                    log.error("%s", msg.reason)
                    self._request_stop(msg.reason, 1)
        except ipc.ChannelClosed:
            pass

    def _on_vision_loaded(self, ready: asyncio.Future) -> None:
        if not ready.cancelled() and ready.exception() is None:
            self._vision_loaded.set_result(None)

    async def _release_worker(self, channel: ipc.Channel) -> None:
        """Tell a worker once every vision rank holds its device memory (at once without images;
        never to workers that host the ViT)."""
        await self._vision_loaded
        channel.send(VisionLoaded())

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._serving and self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain(name))
        else:  # nothing to drain yet, or a second signal: stop at once
            self._request_stop(f"received {name}" + (" again" if self._draining else ""), 0)

    async def _drain(self, signal_name: str) -> None:
        """Let the http actor finish (or end) the requests in flight, then stop."""
        timeout_s = self.args.shutdown_timeout
        log.info(
            "received %s: draining for up to %g s (--shutdown_timeout); a second signal stops at once",
            signal_name,
            timeout_s,
        )
        self._channels["http"].send(Shutdown(timeout_s))
        try:
            drained = await asyncio.wait_for(self._drained, timeout_s + DRAIN_BACKSTOP_S)
            log.info("drained (%d request(s) ended at the timeout)", drained.num_ended)
        except TimeoutError:
            log.warning("the http actor did not finish draining in time: stopping anyway")
        self._request_stop(f"received {signal_name}; the drain is over", 0)

    def _request_stop(self, reason: str, exit_code: int) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._exit_code = exit_code
            self._stop.set()

    async def _stop_actors(self) -> None:
        if self._exit_code:
            # An actor died: its peers notice within moments; let their deaths be logged too, so
            # the log names the actor that died first, not only the first one seen.
            await asyncio.sleep(DEATH_REPORT_GRACE_S)
        self._terminating = True
        self._stop.set()
        http = [actor for actor in self.actors if actor.role == "http" and self._exit_code]
        await self._terminate([actor for actor in self.actors if actor not in http])
        if http:
            # After a death: without its scheduler the http actor answers the requests in flight
            # with a 503 and exits by itself; stopped last, it has the time to. (A drain answered
            # them already; a second signal stops everything at once.)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(http[0].process.wait(), HTTP_ANSWER_GRACE_S)
            await self._terminate(http)

    async def _terminate(self, actors: list[Actor]) -> None:
        """SIGTERM, then SIGKILL what is still running STOP_GRACE_S later."""
        for actor in actors:
            if actor.process.returncode is None:
                actor.process.send_signal(signal.SIGTERM)
        waits = [actor.process.wait() for actor in actors]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE_S)
        except TimeoutError:
            for actor in actors:
                if actor.process.returncode is None:
                    log.warning("actor %s did not stop in %.0f s: killing it", actor.name, STOP_GRACE_S)
                    actor.process.kill()
            await asyncio.gather(*waits)


def create_embed_store(runtime: RuntimeInfo) -> None:
    """The EmbedStore with all its pages allocated, or a ConfigError that says how to make room.

    Free space is checked before allocating: a tmpfs allocates page by page until it is full, and
    only then refuses and gives them back; meanwhile other users of /dev/shm would find it full.
    """
    num_bytes = runtime.embed_store_rows * runtime.hidden_size * DTYPE_BYTES[runtime.dtype]
    free = shm.free_bytes()
    if num_bytes <= free:
        try:
            shm.SharedSegment.create(runtime.embed_store, num_bytes).close()
            return
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            free = shm.free_bytes()  # someone else took it meanwhile
    need_mb = -(-num_bytes // 2**20)
    raise ConfigError(
        "--embed_store_mb",
        f"the EmbedStore needs {need_mb} MiB of shared memory but {shm.SHM_DIR} has {free // 2**20} MiB "
        f"free: enlarge {shm.SHM_DIR} (Docker: --shm-size={need_mb + SHM_IMAGE_HEADROOM_MB}m leaves "
        f"{SHM_IMAGE_HEADROOM_MB} MiB for the images of requests in flight) or lower --embed_store_mb",
    )


async def serve(args: ServerArgs) -> int:
    return await Supervisor(args).run()
