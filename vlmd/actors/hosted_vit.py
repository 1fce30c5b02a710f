"""The ViT replica an LM worker hosts (--vit_placement worker).

Two processes on one GPU time-share it: a decode step beside a busy ViT process waits for the
ViT's time slices. In one process the two can be told apart by stream priority instead: the
worker's thread (its event loop) queues every decode step on a stream of the greatest priority,
and the ViT's thread (`ViTRank.executor`) queues its batches on one of the least, so the device
dispatches a step's kernels ahead of the ViT's waiting blocks. The worker leads its replica as the
vision ranks' leaders do (`serve_batches`, beside its step loop); the vision front keeps the
cache, the pins and the preprocessing in a process of its own, with no ViT. On the CPU there are
no streams: the ViT still runs on its own thread, never on the event loop.

With --vit_step_tiles N the ViT does not run beside the steps but between them: while requests
decode, it encodes N tiles per step collected (`StepTurns`), queued on the steps' own stream, so a
decode step waits for at most one slice; while the steps only prefill prompts, or the worker is
idle, it encodes freely (a prompt's first token waits for a whole prefill step anyway, and the
images' own prompts are prefilled in such steps).

With --vit_sms N the ViT's stream belongs to a CUDA green context of N SMs: priorities only order
the blocks waiting for an SM, and a ViT GEMM's blocks, once placed, hold every SM until they end;
on a green context they can hold only those N, and a decode step's kernels keep the rest.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

from vlmd import ipc
from vlmd.actors.device import green_stream
from vlmd.actors.launch import Launch, Stopwatch
from vlmd.actors.vit_replica import ReplicaGroup, VisionLayout, ViTRank, connect_front, serve_batches

log = logging.getLogger("vlmd.worker")

# How long a thread may hold the GIL while another waits for it, in the worker's process. On an
# H100 with a ViT thread on a green context of 48 SMs beside batch-1 decode steps, the longest
# step was 7.59 ms at 0.5 ms, against 11.7 to 14.5 ms at the 5 ms default with 32 and 64 SMs
# (bench/RESULTS.md, "Side steps").
GIL_SWITCH_INTERVAL_S = 0.0005


class StepTurns:
    """The ViT thread's turns between decode steps: while the newest step launched has decode rows,
    one turn per step collected (an unused turn is not kept: the ViT never bunches slices); while
    it has none (only prompt chunks), or the worker is idle, always."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._decoding = False
        self._turn = False

    def step_launched(self, decoding: bool) -> None:
        """A step was launched; `decoding`: some request in it decodes (a one-token span)."""
        with self._changed:
            self._decoding = decoding
            if not decoding:
                self._changed.notify_all()

    def step_collected(self) -> None:
        with self._changed:
            self._turn = True
            self._changed.notify_all()

    def idle(self) -> None:
        """No step follows (FlushStep): the ViT may run freely."""
        with self._changed:
            self._decoding = False
            self._changed.notify_all()

    def wait(self) -> None:
        """On the ViT's thread, before a slice: until a step is collected, or none of the newest
        step's requests decodes, or the worker idles."""
        with self._changed:
            self._changed.wait_for(lambda: self._turn or not self._decoding)
            self._turn = False


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
        self.green = None  # the green context of --vit_sms (kept alive with its stream)
        self.step_stream: torch.cuda.Stream | None = None  # the decode steps' (None on the CPU)
        self.slice_tiles = launch.args.vit_step_tiles
        self.turns = StepTurns() if self.slice_tiles else None
        if launch.runtime.device == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)  # first: a query on another GPU would open a context there
            least, greatest = torch.cuda.Stream.priority_range()  # a lower number runs first
            if launch.args.vit_sms:
                self.green, self.vit_stream = green_stream(device, launch.args.vit_sms, "--vit_sms")
            else:
                self.vit_stream = torch.cuda.Stream(device, priority=least)
            self.step_stream = torch.cuda.Stream(device, priority=greatest)
            torch.cuda.set_stream(self.step_stream)
        # The ViT's thread holds the GIL while it queues kernels (op by op, for batches larger
        # than its graphs); the step loop, waiting for the GIL after every receive or wait, would
        # wait up to Python's 5 ms default each time.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

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
                "(greatest %d, least %d)%s",
                self.layout.rank,
                _current_priority(),
                await self.vit.run(_current_priority),
                greatest,
                least,
                f", on a green context of {self.launch.args.vit_sms} SMs" if self.green is not None else "",
            )

    async def serve(self) -> None:
        """Encode the batches the front sends, on the ViT's thread, until the front is gone."""
        forward = self._forward_between_steps if self.turns is not None else None
        await serve_batches(self.front, ReplicaGroup(self.vit, [], forward))

    def _forward_between_steps(self, pixels, counts, runs) -> None:
        """On the ViT's thread: the batch in slices of --vit_step_tiles tiles, one per turn, on the
        decode steps' stream (between two steps, not beside them)."""
        if self.step_stream is None:  # the CPU
            self.vit.forward_in_slices(pixels, counts, runs, self.slice_tiles, self.turns.wait)
            return
        # The pixels were copied and normalised on the ViT's stream: the steps' stream reads them
        # after that. The slices' copies out to the store wait for them, so the pixels are not
        # freed (back to the ViT stream's pool) before the last slice has read them.
        self.step_stream.wait_stream(self.vit_stream)
        with torch.cuda.stream(self.step_stream):
            self.vit.forward_in_slices(pixels, counts, runs, self.slice_tiles, self.turns.wait)


def _current_priority() -> int:
    return torch.cuda.current_stream().priority
