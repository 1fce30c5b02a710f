"""What the multi-process benchmarks share: one process per device, joined over TCP, and models
built directly in their rank's share with random weights (no checkpoint)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from gpu_bench import materialize_random


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(rank: int, world_size: int, port: int, tiny: bool) -> torch.device:
    """This process's device (GPU `rank`, or the CPU with one thread for --tiny), in a process
    group of `world_size` (NCCL, gloo for --tiny) when that is more than one."""
    if tiny:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    else:
        device, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
    return device


def random_share(model_cls, shard, arch, tp, device: torch.device, dtype: torch.dtype):
    """This rank's share of `model_cls(arch)`, split by `shard` (`shard_language_model` or
    `shard_vision`, as the server's loader splits a checkpoint), random weights drawn on `device`."""
    with torch.device("meta"):
        model = model_cls(arch)
        shard(model, tp)
    return materialize_random(model, device, dtype, seed=tp.rank)
