"""The ViT replica an LM worker hosts (--vit_placement worker).

Two processes on one GPU time-share it: a decode step beside a busy ViT process waits for the
ViT's time slices. In one process the two can be told apart by stream priority instead: the
worker's thread (its event loop) queues every decode step on a stream of the greatest priority,
and the ViT's thread (`ViTRank.executor`) queues its batches on one of the least, so the device
dispatches a step's kernels ahead of the ViT's waiting blocks. The worker leads its replica as the
vision ranks' leaders do (`serve_batches`, beside its step loop); the vision front keeps the
cache, the pins and the preprocessing in a process of its own, with no ViT. On the CPU there are
no streams: the ViT still runs on its own thread, never on the event loop.
"""

from __future__ import annotations

import logging

import torch

from vlmd import ipc
from vlmd.actors.launch import Launch, Stopwatch
from vlmd.actors.vit_replica import ReplicaGroup, VisionLayout, ViTRank, connect_front, serve_batches

log = logging.getLogger("vlmd.worker")


class HostedViT:
    """Worker `rank`'s ViT replica (visual_tp 1: replica `rank`, led from this process)."""

    def __init__(self, launch: Launch, rank: int) -> None:
        """Before anything runs on the device: on a GPU, make a stream of the greatest priority
        current on this thread for good, so that the model's load, its profiling step, the decode
        graphs' capture and every step's kernels, copies and replays queue on it."""
        self.launch = launch
        self.layout = VisionLayout(rank, 1, launch.args.visual_dp)
        self.vit: ViTRank | None = None
        self.front: ipc.Channel | None = None
        self.vit_stream: torch.cuda.Stream | None = None  # None on the CPU
        if launch.runtime.device == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)  # first: a query on another GPU would open a context there
            least, greatest = torch.cuda.Stream.priority_range()  # a lower number runs first
            self.vit_stream = torch.cuda.Stream(device, priority=least)
            torch.cuda.set_stream(torch.cuda.Stream(device, priority=greatest))

    async def load(self, clock: Stopwatch) -> None:
        """Load the ViT, run its largest batch and capture its graphs, all on its stream: called
        once the LM's profiling step has emptied the allocator's cache and before the KV cache is
        sized, so that the pool is sized with the ViT's memory taken. Its phases join `clock`."""
        vit_clock = Stopwatch()
        self.vit = ViTRank.from_launch(self.launch, self.layout, vit_clock, self.vit_stream)
        clock.absorb(vit_clock, "ViT ")

    async def connect(self) -> None:
        """Join the vision front as the leader of this replica; the front is ready once every
        worker has."""
        self.front = await connect_front(self.launch, self.layout)
        if self.vit_stream is not None:  # what each thread's current stream is, as it serves
            least, greatest = torch.cuda.Stream.priority_range()
            log.info(
                "rank %d: decode steps on a CUDA stream of priority %d, the ViT on one of priority %d "
                "(greatest %d, least %d)",
                self.layout.rank,
                _current_priority(),
                await self.vit.run(_current_priority),
                greatest,
                least,
            )

    async def serve(self) -> None:
        """Encode the batches the front sends, on the ViT's thread, until the front is gone."""
        await serve_batches(self.front, ReplicaGroup(self.vit, []))


def _current_priority() -> int:
    return torch.cuda.current_stream().priority
