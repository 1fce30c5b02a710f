"""CUDA graphs of decode steps: embed -> language model -> logits, one graph per batch size.

A decode step of n requests replays the graph of the smallest captured size B >= n. The B - n
padding rows are requests of one token that live on a dummy page the scheduler never hands out,
so they write and read nothing that matters. Before each replay the FlashInfer decode wrapper of
that size is re-planned (its page-table buffers are the graph's static inputs), and the step's
token ids and positions are copied into the static input buffers; nothing waits for the device,
so the next step can be prepared while the previous one runs.

Batch sizes whose requests fill the GPU without splitting their KV (`NO_SPLIT_MIN_CTAS` CTAs of
one (request, KV head) each) get a second graph whose attention does not split: it skips the
merge kernel (on an H100, 28 layers at batch 64: 1.05 ms against 1.15, bench/RESULTS.md run 9).
One CTA per request is only as fast as the longest request, so a step replays it only when no
request's KV is more than `NO_SPLIT_MAX_IMBALANCE` times the batch's mean. All graphs write
their logits into one static buffer (the sampler reads them before the next replay, in stream
order).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from vlmd.kernels.attention import BatchLayout
from vlmd.kernels.flashinfer_backend import FlashInferBackend, PagedKVMetadata
from vlmd.kernels.ops import last_dim_contiguous
from vlmd.kernels.transfer import on_device, stage

log = logging.getLogger("vlmd.kernels")

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# One CTA per (request, KV head) wins from this many CTAs on (bench/decode_attention_bench.py on
# an H100, 4 KV heads: batch 16 even, batch 32 0.72 ms against 0.80 split).
NO_SPLIT_MIN_CTAS = 128
NO_SPLIT_MAX_IMBALANCE = 2.0  # longest KV / mean KV of the step


class GraphDecodeAttention:
    """The decode attention of one captured batch size: FlashInfer in CUDA-graph mode, with the
    page table in fixed device buffers that `plan` refills before every replay.

    In CUDA-graph mode FlashInfer always splits each request's KV over several CTAs and merges
    the parts in a second kernel (its grid must not depend on the lengths); `split_kv=False`
    gives each (request, KV head) one CTA and no merge, for batches large enough to fill the GPU
    that way (bench/decode_attention_bench.py compares the two)."""

    def __init__(self, backend: FlashInferBackend, batch_size: int, split_kv: bool = True) -> None:
        import flashinfer

        spec, device = backend.spec, backend.spec.device
        self.backend = backend
        self.kv_cache = backend.kv_cache
        self.kv_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
        # Every page at most once, plus the dummy page once per padding row.
        self.kv_indices = torch.zeros(spec.num_pages + batch_size, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.batch_indices = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            backend.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=backend.decode_use_tensor_cores,
            paged_kv_indptr_buffer=self.kv_indptr,
            paged_kv_indices_buffer=self.kv_indices,
            paged_kv_last_page_len_buffer=self.kv_last_page_len,
        )
        self._append = flashinfer.append_paged_kv_cache
        self.split_kv = split_kv

    def plan(self, layout: BatchLayout) -> None:
        """Outside the graph: fill the static buffers for this step (layout padded to the size)."""
        spec = self.backend.spec
        meta = PagedKVMetadata.from_layout(layout, spec.page_size)
        host_flat = stage(meta.to_tensor(), spec.device)  # pinned: no copy out of it waits
        host = meta.views(host_flat)
        device = meta.views(host_flat.to(spec.device, non_blocking=True))
        kv_indices = on_device(meta.kv_indices, spec.device)
        self.batch_indices.copy_(device.batch_indices)
        self.positions.copy_(device.positions)
        # FlashInfer copies host page indices into its buffer with a blocking copy, which would
        # wait for the step in flight: it gets them on the device. indptr / last_page_len stay
        # on the host, where it reads them to schedule the work.
        self.wrapper.plan(  # copies indptr / indices / last_page_len into the buffers above
            host.kv_indptr,
            kv_indices,
            host.kv_last_page_len,
            num_qo_heads=self.backend.num_q_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            page_size=spec.page_size,
            sm_scale=self.backend.scale,
            q_data_type=spec.dtype,
            kv_data_type=spec.dtype,
            disable_split_kv=not self.split_kv,
        )

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer_idx]  # [pages, 2, page_size, kv_heads, head_dim]
        # FlashInfer reads q/k/v through their row and head strides: v (a view of the fused q/k/v
        # output) needs no copy first.
        self._append(
            last_dim_contiguous(k),
            last_dim_contiguous(v),
            self.batch_indices,
            self.positions,
            cache,
            self.kv_indices,
            self.kv_indptr,
            self.kv_last_page_len,
            kv_layout="NHD",
        )
        return self.wrapper.run(last_dim_contiguous(q), cache)  # [batch, q_heads, head_dim]


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch_size`."""

    def __init__(self, model, backend: FlashInferBackend, max_batch_size: int, dummy_page: int) -> None:
        self.model = model
        self.backend = backend
        self.dummy_page = dummy_page
        self._dummy_pages: torch.Tensor | None = None  # the padding rows' page indices
        self.sizes = sorted({b for b in CAPTURE_SIZES if b < max_batch_size} | {max_batch_size})
        kv_heads = backend.spec.num_kv_heads
        # (size, split_kv) of every graph: all sizes split; the large ones also not.
        self.keys = [(s, True) for s in self.sizes]
        self.keys += [(s, False) for s in self.sizes if s * kv_heads >= NO_SPLIT_MIN_CTAS]
        device = backend.spec.device
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.input_positions = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        vocab = model.arch.vocab_size
        self.logits = torch.empty(max_batch_size, vocab, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._attn: dict[tuple[int, bool], GraphDecodeAttention] = {}
        self.replays: Counter[tuple[int, bool]] = Counter()

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        for key in sorted(self.keys, reverse=True):  # largest first, so smaller graphs reuse its memory
            size, split_kv = key
            attn = GraphDecodeAttention(self.backend, size, split_kv=split_kv)
            empty = torch.zeros(0, dtype=torch.int32, device=self.backend.spec.device)
            attn.plan(self._padded(BatchLayout([0], [], empty), size))
            self._forward(attn, size)  # warm-up: kernels loaded, workspaces sized
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(attn, size)
            pool = graph.pool()
            self._graphs[key], self._attn[key] = graph, attn
        torch.cuda.synchronize()
        unsplit = [s for s, split in self.keys if not split]
        also = f"; from {unsplit[0]} on also without split KV" if unsplit else ""
        log.info(
            "captured %d CUDA graphs (batch sizes %s%s) in %.1f s",
            len(self.keys),
            self.sizes,
            also,
            time.perf_counter() - started,
        )

    def _forward(self, attn: GraphDecodeAttention, size: int) -> None:
        hidden = self.model.forward(
            self.model.embed(self.input_ids[:size]), self.input_positions[:size], attn
        )
        self.model.compute_logits(hidden, out=self.logits[:size])

    def prepare(self, layout: BatchLayout, input_ids: torch.Tensor) -> tuple[int, bool]:
        """Fill the static inputs for a decode step of n requests (input_ids [n] on the device)
        and plan its attention; returns the graph to replay. Waits for nothing."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        key = (size, True)
        if (size, False) in self._graphs:
            balanced = max(layout.kv_lens) * n <= NO_SPLIT_MAX_IMBALANCE * sum(layout.kv_lens)
            key = (size, not balanced)
        padding = size - n
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:size].zero_()
        positions = torch.tensor(layout.positions() + [0] * padding, dtype=torch.long)
        self.input_positions[:size].copy_(stage(positions, self.input_positions.device), non_blocking=True)
        self._attn[key].plan(self._padded(layout, size))
        return key

    def replay(self, key: tuple[int, bool], n: int) -> torch.Tensor:
        """Replay the graph `prepare` chose; returns the logits of the n real rows [n, vocab]."""
        self._graphs[key].replay()
        self.replays[key] += 1
        return self.logits[:n]

    def _padded(self, layout: BatchLayout, size: int) -> BatchLayout:
        """The layout plus one-token requests on the dummy page, up to `size` requests."""
        padding = size - len(layout.kv_lens)
        qo_indptr = layout.qo_indptr + [layout.qo_indptr[-1] + i for i in range(1, padding + 1)]
        kv_indices = layout.kv_indices
        if padding:
            device = self.backend.spec.device
            if self._dummy_pages is None:
                self._dummy_pages = torch.full(
                    (self.max_batch_size,), self.dummy_page, dtype=torch.int32, device=device
                )
            kv_indices = torch.cat([on_device(kv_indices, device), self._dummy_pages[:padding]])
        return BatchLayout(qo_indptr, layout.kv_lens + [1] * padding, kv_indices)
