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
    device = torch.device(args.device)
    dtype = TORCH_DTYPES[runtime.dtype]
    arch = InternVLArch.from_model_dir(args.model_dir)
    model = load_language_model(args.model_dir, dtype, device, num_threads=args.load_workers)
    spec = KVCacheSpec(
        num_layers=arch.num_hidden_layers,
        num_pages=runtime.num_kv_pages,
        page_size=args.page_size,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        dtype=dtype,
        device=device,
    )
    attn = TorchReferenceBackend(spec, arch.num_attention_heads, scale=1 / math.sqrt(arch.head_dim))
    return ModelRunner(model, attn, embed_store_view(launch))


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
