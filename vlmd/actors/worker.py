"""A TP rank worker: holds the language model and its KV cache, executes step plans."""

from __future__ import annotations

import logging
import math
import time

import torch

from vlmd import ipc, shm
from vlmd.actors.launch import SCHEDULER_SOCKET, Launch, announce_ready
from vlmd.kernels.attention import KVCacheSpec, TorchReferenceBackend
from vlmd.messages import Hello, StepPlan
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.runner import ModelRunner

log = logging.getLogger("vlmd.worker")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embed_store_view(launch: Launch) -> torch.Tensor | None:
    """The shared EmbedStore as a [rows, hidden] tensor (no copy), or None without images."""
    runtime = launch.runtime
    if not runtime.embed_store:
        return None
    segment = shm.SharedSegment.attach(runtime.embed_store)
    count = runtime.embed_store_rows * runtime.hidden_size
    store = torch.frombuffer(segment.buf, dtype=TORCH_DTYPES[runtime.dtype], count=count)
    return store.view(runtime.embed_store_rows, runtime.hidden_size)


def build_runner(launch: Launch) -> ModelRunner:
    args, runtime = launch.args, launch.runtime
    torch.set_num_threads(args.torch_threads)
    return create_runner(
        args.model_dir,
        runtime.dtype,
        torch.device(args.device),
        num_pages=runtime.num_kv_pages,
        page_size=args.page_size,
        num_threads=args.load_workers,
        embed_store=embed_store_view(launch),
    )


def create_runner(
    model_dir: str,
    dtype_name: str,
    device: torch.device,
    *,
    num_pages: int,
    page_size: int,
    num_threads: int = 1,
    embed_store: torch.Tensor | None = None,
) -> ModelRunner:
    """Load the language model and give it a KV cache of `num_pages` pages."""
    dtype = TORCH_DTYPES[dtype_name]
    arch = InternVLArch.from_model_dir(model_dir)
    model = load_language_model(model_dir, dtype, device, num_threads=num_threads)
    spec = KVCacheSpec(
        num_layers=arch.num_hidden_layers,
        num_pages=num_pages,
        page_size=page_size,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        dtype=dtype,
        device=device,
    )
    attn = TorchReferenceBackend(spec, arch.num_attention_heads, scale=1 / math.sqrt(arch.head_dim))
    return ModelRunner(model, attn, embed_store)


async def run(launch: Launch, rank: int) -> None:
    started = time.perf_counter()
    runner = build_runner(launch)
    channel = await ipc.connect(launch.socket(SCHEDULER_SOCKET), Hello("worker", rank))
    num_tokens = launch.runtime.num_kv_pages * launch.args.page_size
    detail = f"(weights loaded in {time.perf_counter() - started:.1f} s, KV cache {num_tokens} tokens)"
    await announce_ready(launch, "worker", rank, detail)
    while True:
        plan = await channel.recv()
        assert isinstance(plan, StepPlan), f"worker expects StepPlan, got {type(plan).__name__}"
        result = runner.execute(plan)
        if rank == 0:
            channel.send(result)
