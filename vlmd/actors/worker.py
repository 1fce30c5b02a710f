"""A TP rank worker: holds the language model and its KV cache, executes step plans (its step
loop: `vlmd.actors.steps`); with --vit_placement worker it also hosts its GPU's ViT replica
(`vlmd.actors.hosted_vit`)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine

import torch

from vlmd import ipc
from vlmd.actors.device import TORCH_DTYPES, TP_TIMEOUT_S, embed_store_view, green_stream
from vlmd.actors.hosted_vit import HostedViT
from vlmd.actors.launch import (
    SCHEDULER_SOCKET,
    Launch,
    Stopwatch,
    announce_ready,
    connect_supervisor,
)
from vlmd.actors.steps import serve_steps
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
from vlmd.messages import Hello, NewRequest, SamplingParams, StepItem, StepPlan, VisionLoaded
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.models.tensor_parallel import TPGroup
from vlmd.runner import ModelRunner

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
