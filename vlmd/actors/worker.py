"""A TP rank worker: holds the language model and its KV cache, executes step plans; with
--vit_placement worker it also hosts its GPU's ViT replica (`vlmd.actors.hosted_vit`)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator

import torch

from vlmd import ipc
from vlmd.actors.device import TORCH_DTYPES, TP_TIMEOUT_S, embed_store_view, green_stream
from vlmd.actors.hosted_vit import HostedViT, StepTurns
from vlmd.actors.launch import (
    SCHEDULER_SOCKET,
    SLOW_HOST_S,
    HostWatch,
    Launch,
    Stopwatch,
    Timeline,
    announce_ready,
    connect_supervisor,
)
from vlmd.core.page_allocator import pages_for
from vlmd.kernels.attention import KVCacheSpec
from vlmd.kernels.cuda_graph import DecodeGraphs
from vlmd.kernels.flashinfer_backend import (
    SUPPORTED_HEAD_DIMS,
    WORKSPACE_BYTES,
    FlashInferBackend,
    flashinfer_unsupported_reason,
)
from vlmd.kernels.ops import make_ops
from vlmd.kernels.registry import make_attention_backend
from vlmd.kernels.warm import Precompile, model_jobs
from vlmd.messages import FlushStep, Hello, NewRequest, SamplingParams, StepItem, StepPlan, VisionLoaded
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.models.tensor_parallel import TPGroup
from vlmd.runner import LaunchedStep, ModelRunner

log = logging.getLogger("vlmd.worker")

TP_RENDEZVOUS_FILE = "tp-rendezvous"
# --tp_all_reduce symm_mem: tensors up to this size (a 64-row decode step of a 3584-wide model
# is 458 KB in bf16) are summed by one symmetric-memory kernel, larger ones by NCCL.
SYMM_MEM_ALL_REDUCE_BYTES = 1 << 20
# --tp_all_reduce fused: steps of up to this many tokens (decode batches of up to 256) sum their
# row-parallel outputs inside the add-RMSNorm after them; longer ones use NCCL.
FUSED_ALL_REDUCE_MAX_TOKENS = 256

# Device memory kept out of the KV pool for what the profiling step does not see (attention
# workspaces, CUDA graphs, allocator fragmentation).
GPU_HEADROOM_BYTES = 512 * 2**20


def make_runner(
    model,
    arch: InternVLArch,
    *,
    num_pages: int,
    page_size: int,
    embed_store: torch.Tensor | None = None,
    graph_max_batch_size: int = 0,
    gemv: bool = True,
    side_sms: int = 0,
) -> ModelRunner:
    """Give a loaded language model a KV cache of `num_pages` pages and an attention backend;
    with graph_max_batch_size > 0 and FlashInfer, capture decode steps in CUDA graphs; with
    `gemv`, one-row linear layers on CUDA run Triton's GEMV; with side_sms > 0, a second backend
    over the same cache for side steps, on a green context of that many SMs (--prefill_sms)."""
    weight = next(model.parameters())
    model.set_ops(make_ops(weight.device, weight.dtype, log, gemv=gemv))
    heads = model.model.layers[0].self_attn  # this rank's heads (all of them without TP)
    spec = KVCacheSpec(
        num_layers=arch.num_hidden_layers,
        num_pages=num_pages + (1 if graph_max_batch_size else 0),  # + the graphs' padding page
        page_size=page_size,
        num_kv_heads=heads.num_kv_heads,
        head_dim=arch.head_dim,
        dtype=weight.dtype,
        device=weight.device,
    )
    attn = make_attention_backend(spec, heads.num_heads, scale=1 / math.sqrt(arch.head_dim), logger=log)
    graphs = None
    if graph_max_batch_size and isinstance(attn, FlashInferBackend):
        graphs = DecodeGraphs(model, attn, graph_max_batch_size, dummy_page=num_pages)
        graphs.capture()
    elif graph_max_batch_size:
        log.warning("CUDA graphs need the FlashInfer backend: decoding op by op")
    if not side_sms:
        return ModelRunner(model, attn, embed_store, graphs)
    side_attn = make_attention_backend(spec, heads.num_heads, attn.scale, logger=log, kv_cache=attn.kv_cache)
    green, side_stream = None, None
    if weight.device.type == "cuda":
        green, side_stream = green_stream(weight.device, side_sms, "--prefill_sms")
        log.info("side steps (prompt chunks beside decode steps) on a green context of %d SMs", side_sms)
    return ModelRunner(model, attn, embed_store, graphs, side_attn, side_stream, green)


def create_runner(
    model_dir: str,
    dtype_name: str,
    device: torch.device,
    *,
    num_pages: int,
    page_size: int,
    num_threads: int = 1,
) -> ModelRunner:
    """Load the language model and give it a KV cache (benchmarks and tests)."""
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, TORCH_DTYPES[dtype_name], device, num_threads=num_threads)
    return make_runner(model, arch, num_pages=num_pages, page_size=page_size)


def profile_step(model, arch: InternVLArch, launch: Launch) -> tuple[int, int]:
    """Run the largest step the scheduler can plan (on a GPU its first use compiles the attention
    kernels): the device memory its activations need beyond the weights, and a KV page's bytes."""
    args = launch.args
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    num_tokens = args.max_num_batched_tokens
    probe = make_runner(
        model, arch, num_pages=pages_for(num_tokens, args.page_size), page_size=args.page_size
    )
    probe_kv_bytes = sum(t.numel() * t.element_size() for t in probe.attn.kv_cache)
    plan = StepPlan(
        step_id=0,
        items=[StepItem("probe", 0, [0] * num_tokens, list(range(pages_for(num_tokens, args.page_size))))],
        new_requests=[NewRequest("probe", SamplingParams(), [])],
    )
    probe.execute(plan)
    torch.cuda.synchronize(device)
    activation_bytes = torch.cuda.max_memory_allocated(device) - before - probe_kv_bytes
    bytes_per_page = probe.attn.spec.bytes_per_token * args.page_size
    del probe, plan
    torch.cuda.empty_cache()
    return activation_bytes, bytes_per_page


def gpu_kv_pages(model, arch: InternVLArch, launch: Launch, profile: tuple[int, int]) -> int:
    """KV pages that fit in mem_fraction of the device once the weights are loaded, the ViT has
    taken its share and the largest step's activations are kept aside."""
    args = launch.args
    device = next(model.parameters()).device
    activation_bytes, bytes_per_page = profile
    # The logits of a full batch of decodes (and a processed copy) are the other large transient;
    # the penalty table can grow to one int32 row per running request.
    logits_bytes = 3 * args.max_running_requests * arch.vocab_size * 4
    # Side steps (--prefill_sms) plan through a workspace of their own, and their activations
    # come from the side stream's share of the allocator's cache while the main stream keeps its
    # own: without room for both, the allocator would give its cache back to CUDA, which waits
    # for the whole device (the side step in flight included) in the middle of the decode steps.
    side_bytes = WORKSPACE_BYTES + activation_bytes if args.prefill_sms else 0
    free, total = torch.cuda.mem_get_info(device)
    reserved = activation_bytes + logits_bytes + side_bytes + GPU_HEADROOM_BYTES
    budget = free - (1 - args.mem_fraction) * total - reserved
    log.info(
        "memory: %.1f GiB free of %.1f GiB after weights; step activations %.2f GiB; KV page %d bytes",
        free / 2**30,
        total / 2**30,
        activation_bytes / 2**30,
        bytes_per_page,
    )
    return max(0, int(budget // bytes_per_page))


def join_tp_group(launch: Launch, rank: int, arch: InternVLArch) -> TPGroup:
    """Rank `rank` of the language model's tensor-parallel group (one GPU per rank); the ranks
    meet through a file in the run directory."""
    cuda = launch.runtime.device == "cuda"
    if cuda and launch.args.tp > 1:
        torch.cuda.set_device(rank)
    init_method = f"file://{launch.socket(TP_RENDEZVOUS_FILE)}"
    mode = launch.args.tp_all_reduce
    if mode not in ("nccl", "auto") and not cuda and launch.args.tp > 1 and rank == 0:
        log.warning("--tp_all_reduce %s needs GPUs: the ranks sum with gloo", mode)
    symm_mem_bytes = SYMM_MEM_ALL_REDUCE_BYTES if mode == "symm_mem" else 0
    fused_norm = None
    if mode in ("fused", "auto"):
        fused_norm = (FUSED_ALL_REDUCE_MAX_TOKENS, arch.hidden_size, TORCH_DTYPES[launch.runtime.dtype])
    tp = TPGroup.join(
        init_method,
        rank,
        launch.args.tp,
        cuda,
        TP_TIMEOUT_S,
        symm_mem_bytes,
        fused_norm,
        fused_required=mode == "fused",
        # The ViT shares this process's GPU: NCCL's own streams must not queue behind it either.
        high_priority=launch.args.vit_in_workers,
    )
    if cuda and tp.size > 1 and rank == 0:
        how = "NCCL"
        if tp.fused_norm is not None:
            how = "fused into the add-RMSNorm after them (FlashInfer)"
        elif tp.small is not None:
            how = "one symmetric-memory kernel"
        log.info("tp %d: decode-sized all-reduces: %s", tp.size, how)
    return tp


def start_precompile(
    launch: Launch, rank: int, arch: InternVLArch, device: torch.device
) -> Precompile | None:
    """On CUDA with FlashInfer, rank 0 compiles the model's FlashInfer modules (the ViT's
    attention too) in parallel processes while the weights load (vlmd.kernels.warm)."""
    args, dtype = launch.args, TORCH_DTYPES[launch.runtime.dtype]
    if rank != 0 or device.type != "cuda" or args.disable_kernel_precompile:
        return None
    heads = (arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads)
    if flashinfer_unsupported_reason(*heads, dtype, device) is not None:
        return None  # make_attention_backend says why once it picks torch
    vit_flashinfer = args.enable_multimodal and args.vit_attention != "sdpa"
    vit_head_dim = (
        arch.vision_head_dim if vit_flashinfer and arch.vision_head_dim in SUPPORTED_HEAD_DIMS else None
    )
    jobs = model_jobs(*heads, dtype, vit_head_dim)
    log.info("compiling FlashInfer's modules ahead, %d processes: %s", len(jobs), ", ".join(jobs))
    return Precompile(jobs)


async def build_runner(
    launch: Launch, rank: int, clock: Stopwatch, vision_loaded: Callable[[Stopwatch], Awaitable[None]]
) -> ModelRunner:
    """Load the model, run its first step, and once `vision_loaded(clock)` returns (the ViT holds
    its device memory; it laps `clock`) size the KV cache from what is left and capture the decode
    graphs."""
    args, runtime = launch.args, launch.runtime
    device = torch.device(runtime.device, rank) if runtime.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.torch_threads)
    arch = InternVLArch.from_model_dir(args.model_dir)
    precompile = start_precompile(launch, rank, arch, device)
    try:
        tp = join_tp_group(launch, rank, arch)
        model = load_language_model(
            args.model_dir, TORCH_DTYPES[runtime.dtype], device, num_threads=args.load_workers, tp=tp
        )
        clock.lap("weights")
        profile = None
        if not runtime.num_kv_pages:
            profile = profile_step(model, arch, launch)
            clock.lap("first step (kernel compile, profiling)")
        if precompile is not None:  # their CUDA contexts gone before the KV cache is sized
            log.info("rank %d: FlashInfer modules compiled ahead: %s", rank, precompile.wait())
            clock.lap("kernel precompile")
    finally:
        if precompile is not None:
            precompile.stop()
    log.info("rank %d: %s; the KV cache is sized once the ViT holds its memory", rank, clock)
    await vision_loaded(clock)
    num_pages = runtime.num_kv_pages or gpu_kv_pages(model, arch, launch, profile)
    if num_pages < 1:
        raise SystemExit("--mem_fraction leaves no device memory for the KV cache")
    graph_max_batch_size = 0 if args.disable_cudagraph or device.type != "cuda" else args.graph_max_batch_size
    runner = make_runner(
        model,
        arch,
        num_pages=num_pages,
        page_size=args.page_size,
        embed_store=embed_store_view(launch, device),
        graph_max_batch_size=graph_max_batch_size,
        side_sms=args.prefill_sms,
    )
    clock.lap("KV cache and CUDA graphs" if runner.graphs else "KV cache")
    return runner


async def run(launch: Launch, rank: int) -> None:
    clock = Stopwatch.after_imports()
    supervisor = await connect_supervisor(launch, "worker", rank)
    args = launch.args
    hosted = HostedViT(launch, rank) if args.vit_in_workers else None

    async def vision_loaded(clock: Stopwatch) -> None:
        msg = await supervisor.recv()
        assert isinstance(msg, VisionLoaded), f"a worker expects VisionLoaded, got {type(msg).__name__}"
        clock.lap("waiting for the ViT")

    runner = await build_runner(launch, rank, clock, hosted.load if hosted else vision_loaded)
    num_pages = runner.attn.spec.num_pages - (
        1 if runner.graphs else 0
    )  # the padding page is not the scheduler's
    channel = await ipc.connect(launch.socket(SCHEDULER_SOCKET), Hello("worker", rank, num_pages))
    detail = f"{clock}; KV cache {num_pages * args.page_size} tokens in {num_pages} pages"
    if hosted is not None:
        await hosted.connect()
        detail += f"; ViT replica {rank}"
    await announce_ready(launch, "worker", rank, f"({detail})", num_pages, channel=supervisor)
    turns = hosted.turns if hosted is not None else None
    stall_s = args.log_stalls_ms / 1e3
    steps = serve_steps(runner, channel, send_results=rank == 0, turns=turns, stall_s=stall_s)
    if hosted is None:
        await steps
    else:
        await _until_one_fails(steps, hosted.serve())


async def _until_one_fails(*loops: Coroutine) -> None:
    """Run loops that end only by failing (a peer gone) side by side on the event loop; the first
    failure stops the others and is raised."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
    for task in done:
        task.result()


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
            self._progressed |= self.forward.parts is not None
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
