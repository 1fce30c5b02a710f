"""CUDA graphs of the vision tower for small batches of tiles.

One image of a few tiles is launch-bound: InternViT runs hundreds of small kernels for a single
tile, and the host launching them is slower than the GPU running them. Replaying a captured graph
removes that cost from time to first token. Large batches are GPU-bound and run op by op.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("vlmd.kernels")


class VisionGraphs:
    """`vision(pixel_values)` with a captured graph for every tile count up to `max_tiles`."""

    def __init__(self, vision: torch.nn.Module, max_tiles: int, image_size: int) -> None:
        self.vision = vision
        self.max_tiles = max_tiles
        weight = next(vision.parameters())
        self._pixels = torch.zeros(
            max_tiles, 3, image_size, image_size, dtype=weight.dtype, device=weight.device
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self, stream: torch.cuda.Stream | None = None) -> None:
        """Capture every tile count's graph, on `stream` (a green context's: the graphs' kernels
        then keep to its SMs) or on a side stream of torch's."""
        started = time.perf_counter()
        pool = None
        for num_tiles in range(self.max_tiles, 0, -1):  # largest first: the rest reuse its memory
            pixels = self._pixels[:num_tiles]
            self.vision(pixels)  # warm-up outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._outputs[num_tiles] = self.vision(pixels)
            pool = graph.pool()
            self._graphs[num_tiles] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d vision CUDA graphs (1..%d tiles) in %.1f s",
            self.max_tiles,
            self.max_tiles,
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_tiles, 3, H, W] -> [num_tiles * image_seq_length, hidden]. The result
        of a replay lives in the graph's memory: use it before the next call."""
        num_tiles = pixel_values.shape[0]
        graph = self._graphs.get(num_tiles)
        if graph is None:
            return self.vision(pixel_values)
        self._pixels[:num_tiles].copy_(pixel_values)
        graph.replay()
        return self._outputs[num_tiles]

    def parameters(self):
        return self.vision.parameters()
