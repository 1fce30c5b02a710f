"""The http actor: Starlette on uvicorn (uvloop). Parses and validates requests, fetches and
checks images, builds prompt ids (tokenizer actor), talks to the scheduler, answers clients.
When the server stops (a Shutdown from the supervisor), it drains: see `HttpActor.drain`.

LightLLM's routes (/generate, /generate_stream) live in `lightllm_api`, OpenAI's in `openai_api`;
both use the request machinery of `HttpActor` (read_body, check_images, tokenize, submit, forget).
Every client error is a 4xx JSON `{"error": ...}`; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlmd import ipc, shm
from vlmd.actors.fetch import ImageFetcher
from vlmd.actors.gate import Gate, render_error
from vlmd.actors.images import BadImage, CheckedImage, HeldImages, ImageChecker, NoSharedMemory
from vlmd.actors.inflight import ClientError, ClientGone, Tracked
from vlmd.actors.launch import SCHEDULER_SOCKET, Launch, Stopwatch, announce_ready, connect_supervisor
from vlmd.actors.lightllm_api import LightLLMApi, error_response
from vlmd.actors.limits import RETRY_AFTER_S, Places, QueueGate, check_image_count
from vlmd.actors.metrics import LatencyMetrics, MetricsQueries, add_preprocess_counts, render_metrics
from vlmd.actors.openai_api import OpenAIApi
from vlmd.actors.preprocess import PreprocessPool, PreprocessWorkerGone, connect_workers
from vlmd.actors.slow_clients import BodyReads, header_deadline
from vlmd.actors.tokenizer import ImageSpan, PromptBuilder, PromptError
from vlmd.api import ImageInput
from vlmd.image import TilingConfig
from vlmd.messages import (
    Abort,
    Drained,
    Hello,
    Message,
    MetricsSnapshot,
    RequestFailed,
    SamplingParams,
    Shutdown,
    StartServing,
    SubmitRequest,
    TokenOut,
)

log = logging.getLogger("vlmd.http")
# Prometheus' default scrape_timeout: no scraper waits longer for an answer.
METRICS_TIMEOUT_S = 10.0
# Requests ended at --shutdown_timeout get this long to send their error (a 503, or an error event
# that closes the stream) before the supervisor stops the process, which closes what is left.
END_GRACE_S = 2.0


class HttpActor:
    def __init__(self, launch: Launch, channel: ipc.Channel, preprocess: list[ipc.Channel] = ()) -> None:
        self.args, self.runtime = launch.args, launch.runtime
        self.channel = channel
        self.held = HeldImages(shm.segment_prefix(self.runtime.server_id))
        self.prompts = PromptBuilder(
            self.args.model_dir,
            self.runtime.image_seq_length,
            trust_remote_code=self.args.trust_remote_code,
            conversation=self.runtime.conversation,
        )
        tiling = TilingConfig.from_model_dir(
            self.args.model_dir, min_tiles=self.args.min_tiles, max_tiles=self.args.max_tiles
        )
        fetcher = ImageFetcher(
            self.args.image_fetch_timeout, self.args.max_image_bytes, self.args.allow_private_image_urls
        )
        self.preprocess = PreprocessPool.for_actor(launch, tiling, "http", preprocess)
        self.images = ImageChecker(
            tiling,
            fetcher,
            self.args.max_image_pixels,
            self.preprocess,
            self.held.pixels,
            image_bytes=self.held.bytes,
        )
        self.queue = QueueGate(self.args.max_queued_requests)
        self.latency = LatencyMetrics()
        self.inflight: dict[str, Tracked] = {}
        self.metric_queries = MetricsQueries(channel.send)
        self.gate = Gate(self.app(), self.args.api_key)
        self.bodies = BodyReads(self.args.client_timeout)
        self.supervisor: ipc.Channel | None = None  # set once the supervisor knows we are ready
        # Set once requests in flight are ended (past --shutdown_timeout, or the scheduler gone):
        # what a request that comes to run after that is answered with.
        self.end_error: ClientError | None = None
        self._drain_task: asyncio.Task | None = None

    # --- scheduler side ---------------------------------------------------------------------

    async def receive_loop(self) -> None:
        while True:
            msg = await self.channel.recv()
            if isinstance(msg, TokenOut):
                self._on_tokens(msg)
            elif isinstance(msg, RequestFailed):
                tracked = self.inflight.get(msg.request_id)
                if tracked is not None:
                    self._fail(msg.request_id, tracked, ClientError(msg.status, msg.message))
            elif isinstance(msg, MetricsSnapshot):
                self.metric_queries.answer(msg)

    def _fail(self, request_id: str, tracked: Tracked, error: ClientError) -> None:
        """End a request with `error`: its API answers it (an error response, or an error event
        in a stream) and forgets it."""
        if not tracked.done.done():
            self.queue.leave(request_id)
            self._release_images(tracked)
            tracked.done.set_exception(error)
            tracked.updates.put_nowait(error)

    def _on_tokens(self, msg: TokenOut) -> None:
        tracked = self.inflight.get(msg.request_id)
        if tracked is None:
            return
        now = time.perf_counter()
        self.latency.on_tokens(tracked.arrival, tracked.last_token_at, len(msg.token_ids), now)
        tracked.last_token_at = now
        self.queue.leave(msg.request_id)
        self._release_images(tracked)  # encoded before its first token: its bytes are not read again
        if msg.finish_reason is not None:
            self.latency.on_finished(tracked.arrival, now)
        tracked.num_cached_tokens += msg.num_cached_tokens
        tracked.token_ids += msg.token_ids
        tracked.logprobs += msg.logprobs
        tracked.top_logprobs += msg.top_logprobs
        tracked.updates.put_nowait(msg)
        if msg.finish_reason is not None and not tracked.done.done():
            tracked.done.set_result((msg.finish_reason, msg.num_stop_tokens))

    # --- routes -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.gate.draining:  # load balancers stop sending requests here
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        try:
            snapshot = await self.metric_queries.ask(METRICS_TIMEOUT_S)
        except TimeoutError:
            return error_response(503, f"the scheduler did not answer within {METRICS_TIMEOUT_S:g} s")
        values = {**snapshot.values, "requests_queued": len(self.queue)}
        add_preprocess_counts(values, self.preprocess.num_images)  # the vision front's are in values
        histograms = {**snapshot.histograms, **self.latency.snapshots()}
        histograms["image_preprocess_worker_seconds"] = self.preprocess.worker_seconds.snapshot()
        text = render_metrics(values, histograms)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- the request machinery every API uses ----------------------------------------------

    async def until_disconnect(self, request: Request) -> None:
        """Returns when the client closes the connection (the body has been read already)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def first_update(self, updates: asyncio.Queue, request: Request) -> TokenOut:
        """A stream's first update, awaited before its response starts: a request that fails
        before its first token (an image the ViT refused, a full cache, a drain) is answered with
        its own status and error body, as any other request, not a 200 and an error event.
        Raises that ClientError, or ClientGone if the client leaves first."""
        getting = asyncio.ensure_future(updates.get())
        gone = asyncio.ensure_future(self.until_disconnect(request))
        try:
            await asyncio.wait([getting, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not getting.done():
            getting.cancel()
            raise ClientGone()
        update = getting.result()
        if isinstance(update, ClientError):
            raise update
        return update

    async def read_body(self, request: Request, body_type: type):
        """The request body decoded as `body_type`; a ClientError names the field at fault.
        ClientGone when the client hangs up before it has sent it all."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ClientError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        raw = await self.bodies.read(request, limit)
        try:
            return msgspec.json.decode(raw, type=body_type)
        except msgspec.ValidationError as exc:
            raise ClientError(400, f"invalid request: {exc}", _field_at_fault(str(exc))) from None
        except msgspec.DecodeError as exc:
            raise ClientError(400, f"malformed JSON: {exc}") from None
        except RecursionError:  # msgspec decodes (and skips unknown fields) recursively
            raise ClientError(400, "malformed JSON: nested too deeply") from None

    async def check_images(
        self, images: list[ImageInput], params: list[str] | None = None
    ) -> list[CheckedImage]:
        """Fetch the request's images; decode, check and preprocess those not seen before. The
        caller must `release_checked` them once the request is submitted or refused. `params`:
        the body field of each image, named by its error."""
        if images and not self.args.enable_multimodal:
            raise ClientError(400, "this server runs without --enable_multimodal: images are not accepted")
        if not images:
            return []
        check_image_count(len(images), self.args.max_images_per_request)
        started = time.perf_counter()
        try:
            checked = await self.images.check_all(images)
        except BadImage as exc:
            message, param = str(exc), exc.param
            if params is not None and exc.index is not None:
                param = f"{params[exc.index]}.{param}" if param else params[exc.index]
                message = f"{message} (`{param}`)"
            raise ClientError(400, message, param) from None
        except NoSharedMemory as exc:
            log.warning("%s", exc)  # the path stays in the log
            raise _no_shared_memory() from None
        except PreprocessWorkerGone:
            raise ClientError(503, "the server is stopping: an image preprocessing worker is gone") from None
        if len({image.md5 for image in checked}) > self.args.cache_capacity:
            self.release_checked(checked)
            raise ClientError(
                400,
                f"the request has more distinct images than --cache_capacity ({self.args.cache_capacity}) holds",
            )
        self.latency.image_preprocess.observe(time.perf_counter() - started)
        return checked

    def release_checked(self, checked: list[CheckedImage]) -> None:
        """Let go of the tiles `check_images` held: submitted requests hold their own."""
        self.images.release(checked)

    async def tokenize(
        self, build: Callable, prompt, checked: list[CheckedImage], param: str
    ) -> tuple[list[int], list[ImageSpan]]:
        """Prompt ids with the images expanded: `build(prompt, tiles_per_image)`, off the event loop;
        `param` is the body field the prompt came from, named by its errors."""
        try:
            # The fast tokenizer releases the GIL: a long prompt does not stall other requests.
            prompt_ids, spans = await asyncio.to_thread(build, prompt, [image.num_tiles for image in checked])
        except PromptError as exc:
            raise ClientError(400, str(exc), param) from None
        if not prompt_ids:  # nothing to compute a first token from
            raise ClientError(400, f"parameter `{param}` is empty: the prompt has no tokens", param)
        return prompt_ids, spans

    def check_length(
        self,
        num_prompt_tokens: int,
        max_new_tokens: int,
        param: str = "max_new_tokens",
        prompt_param: str = "inputs",
    ) -> None:
        limit = self.runtime.max_req_total_len
        if num_prompt_tokens >= limit:
            raise ClientError(
                400,
                f"the prompt has {num_prompt_tokens} tokens; max_req_total_len allows at most {limit - 1}",
                prompt_param,
            )
        if num_prompt_tokens + max_new_tokens > limit:
            raise ClientError(
                400,
                f"parameter `{param}` ({max_new_tokens}) goes beyond the context: the prompt has "
                f"{num_prompt_tokens} tokens and max_req_total_len is {limit}",
                param,
            )

    def submit(
        self,
        prompt_ids: list[int],
        spans: list[ImageSpan],
        checked: list[CheckedImage],
        sampling: SamplingParams,
        places: Places,
        stop_token_seqs: list[list[int]] = (),
        updates: asyncio.Queue | None = None,
        arrival: float | None = None,
    ) -> tuple[str, Tracked]:
        """Hand a checked request to the scheduler; its tokens arrive in the Tracked. It holds one
        of `places` (reserved in the queue, --max_queued_requests, before its images were
        checked) until its first token or its end; `arrival` (time.perf_counter() when the
        request was parsed) is where its latencies count from."""
        request_id = uuid.uuid4().hex
        self.queue.enter(request_id, places)
        refs, segments, pixel_segments = self.held.hold(checked, spans)
        tracked = Tracked(
            asyncio.get_running_loop().create_future(),
            arrival=time.perf_counter() if arrival is None else arrival,
            num_prompt_tokens=len(prompt_ids),
        )
        if updates is not None:
            tracked.updates = updates
        tracked.segments, tracked.pixel_segments = segments, pixel_segments
        self.inflight[request_id] = tracked
        if self.end_error is not None:  # it passed the gate before the end, and comes too late
            self._fail(request_id, tracked, self.end_error)
            return request_id, tracked
        self.channel.send(
            SubmitRequest(
                request_id=request_id,
                prompt_ids=prompt_ids,
                sampling=sampling,
                images=refs,
                stop_token_seqs=list(stop_token_seqs),
                eos_token_ids=self.prompts.eos_token_ids,
            )
        )
        return request_id, tracked

    def forget(self, request_id: str, tracked: Tracked) -> None:
        """The request is over for the client: if it did not finish, abort it; let go of its images
        (other requests that need them hold them too). Forgetting a request twice is harmless."""
        self.queue.leave(request_id)
        if self.inflight.pop(request_id, None) is None:
            return
        if not tracked.done.done():
            tracked.done.cancel()
            self.channel.send(Abort(request_id))
        self._release_images(tracked)

    # --- stopping ---------------------------------------------------------------------------------

    def on_supervisor(self, msg: Message) -> None:
        if isinstance(msg, Shutdown) and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._shut_down(msg.timeout_s))

    async def _shut_down(self, timeout_s: float) -> None:
        num_ended = await self.drain(timeout_s)
        self.supervisor.send(Drained(num_ended))

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503; /health too), let those in flight finish for up to
        `timeout_s` seconds, then end the rest with a 503 (an error event in a stream) and give
        their answers END_GRACE_S to go out. Returns how many were still running at the timeout."""
        self.gate.draining = True
        self.bodies.drain()
        log.info("draining: %d request(s) in flight, %g s to finish", self.gate.num_active, timeout_s)
        if await self.gate.wait_idle(timeout_s):
            return 0
        num_running = self.gate.num_active
        log.warning("%d request(s) still running after --shutdown_timeout: ending them", num_running)
        limit = self.args.shutdown_timeout
        message = f"the server stopped before the request finished (--shutdown_timeout {limit:g} s)"
        await self.end_all(ClientError(503, message))
        return num_running

    async def end_all(self, error: ClientError, abort: bool = True) -> None:
        """End every request in flight, and any that comes to run later, with `error` (a 503, or
        an error event that closes a stream); give their answers END_GRACE_S to go out."""
        self.gate.draining = True
        self.bodies.drain()
        self.end_error = error
        for request_id, tracked in list(self.inflight.items()):
            if not tracked.done.done():
                self._fail(request_id, tracked, error)
                if abort:
                    self.channel.send(Abort(request_id))
        await self.gate.wait_idle(END_GRACE_S)

    def _release_images(self, tracked: Tracked) -> None:
        self.held.release(tracked.segments, tracked.pixel_segments)
        tracked.segments, tracked.pixel_segments = [], []

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            *LightLLMApi(self).routes(),
            *OpenAIApi(self).routes(),
        ]
        handlers = {404: _not_found, 405: _not_allowed, ClientGone: _client_gone}
        return Starlette(routes=routes, exception_handlers=handlers)


def _no_shared_memory() -> ClientError:
    return ClientError(
        503,
        "the server is out of shared memory for images; retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _field_at_fault(validation_message: str) -> str | None:
    """The field a msgspec validation error names: `... - at `$.messages[0]`` and/or
    `Object missing required field `role``."""
    path = re.search(r"at `\$\.?(.*?)`", validation_message)
    missing = re.search(r"required field `(.+?)`", validation_message)
    return ".".join(m[1] for m in (path, missing) if m and m[1]) or None


async def _not_found(request: Request, exc: Exception) -> Response:
    return render_error(request.url.path, ClientError(404, f"no route {request.url.path}"))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; whatever the request started is aborted


async def _not_allowed(request: Request, exc: Exception) -> Response:
    message = f"method {request.method} not allowed on {request.url.path}"
    return render_error(request.url.path, ClientError(405, message))


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the supervisor alone decides when this actor stops.
    It drains it first (Shutdown), then sends SIGTERM, whose default action ends the process at
    once; uvicorn's own handlers would stop accepting connections on a Ctrl-C to the process
    group, where a draining server must still answer 503 and /health."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def run(launch: Launch, rank: int) -> None:
    """Load beside the LM workers (connections, tokenizer, the port bound), then wait for the
    supervisor's StartServing, which brings the KV pool the workers sized, and serve."""
    stopwatch = Stopwatch.after_imports()
    supervisor = await connect_supervisor(launch, "http")
    channel = await ipc.connect(launch.socket(SCHEDULER_SOCKET), Hello("http"))
    preprocess = await connect_workers(launch, "http") if launch.args.enable_multimodal else []
    sock = socket.socket(socket.AF_INET6 if ":" in launch.args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((launch.args.host, launch.args.port))  # a taken port fails here, before any waiting
    actor = HttpActor(launch, channel, preprocess)
    stopwatch.lap("tokenizer and image checks")
    start = await supervisor.recv()
    assert isinstance(start, StartServing), f"the http actor expects StartServing, got {start!r}"
    actor.runtime = msgspec.structs.replace(
        actor.runtime, num_kv_pages=start.num_kv_pages, max_req_total_len=start.max_req_total_len
    )
    stopwatch.lap("waiting for the LM workers")
    receiver = asyncio.get_running_loop().create_task(actor.receive_loop())
    config = uvicorn.Config(
        actor.gate, log_level="warning", lifespan="off", http=header_deadline(launch.args.client_timeout)
    )
    server = _Server(config)
    actor.supervisor = await announce_ready(
        launch,
        "http",
        detail=f"(http://{launch.args.host}:{launch.args.port}; {stopwatch})",
        on_message=actor.on_supervisor,
        channel=supervisor,
    )
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    done, _ = await asyncio.wait([receiver, serving], return_when=asyncio.FIRST_COMPLETED)
    if receiver in done:
        # The scheduler is gone (an actor died; the supervisor is stopping the server): answer
        # the requests in flight with a 503 that says so, not a 500 or a dropped connection.
        error = ClientError(503, "the server is stopping: its scheduler is gone (see the server log)")
        await actor.end_all(error, abort=False)
    for task in done:
        task.result()  # the scheduler connection closed, or the server failed: exit non-zero
    raise SystemExit(1)
