"""The model runner of a TP rank worker: executes one StepPlan on the language model.

Owns the weights, the attention backend (and through it the KV cache), per-request page tables
and sampler state. Knows nothing of sockets: the worker actor feeds it plans.
"""

from __future__ import annotations

import torch

from vlmd.kernels.attention import AttentionBackend, BatchLayout
from vlmd.kernels.sampler import SamplerState, sample
from vlmd.messages import StepItem, StepPlan, StepResult


class ModelRunner:
    def __init__(self, model, attn: AttentionBackend, embed_store: torch.Tensor | None, graphs=None) -> None:
        """model: a language model with embed / forward / compute_logits; embed_store: the
        shared [rows, hidden] arena of image embedding rows (None without images); graphs:
        captured decode steps (`DecodeGraphs`) or None."""
        self.model = model
        self.attn = attn
        self.embed_store = embed_store
        self.graphs = graphs
        self.device = attn.spec.device
        self._page_tables: dict[str, list[int]] = {}
        self._samplers: dict[str, SamplerState] = {}

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_ids:
            self._page_tables.pop(request_id, None)
            self._samplers.pop(request_id, None)
        for new in plan.new_requests:
            self._page_tables[new.request_id] = []
            self._samplers[new.request_id] = SamplerState(new.sampling, new.prompt_ids, self.device)
        layout = self._layout(plan.items)
        sampled = [i for i, item in enumerate(plan.items) if item.sample]
        if self._graph_step(plan.items):
            logits = self.graphs.run(layout, [item.token_ids[0] for item in plan.items])
        else:
            logits = self._eager(plan.items, layout, sampled)
        if not sampled:
            return StepResult(plan.step_id, [], [], [])
        request_ids = [plan.items[i].request_id for i in sampled]
        sampled = sample(logits, [self._samplers[r] for r in request_ids])
        return StepResult(
            plan.step_id, request_ids, sampled.token_ids, sampled.logprobs, sampled.top_logprobs
        )

    def _graph_step(self, items: list[StepItem]) -> bool:
        """Pure decode steps small enough for a captured graph replay it."""
        return (
            self.graphs is not None
            and len(items) <= self.graphs.max_batch_size
            and all(len(item.token_ids) == 1 and item.sample and not item.embeds for item in items)
        )

    def _eager(self, items: list[StepItem], layout: BatchLayout, sampled: list[int]) -> torch.Tensor | None:
        """Run the step op by op; returns the logits of the sampled rows [num_sampled, vocab]."""
        self.attn.plan(layout)
        inputs_embeds = self._input_embeddings(items, layout)
        positions = torch.tensor(layout.positions(), dtype=torch.long, device=self.device)
        hidden = self.model.forward(inputs_embeds, positions, self.attn)  # [num_tokens, hidden]
        if not sampled:
            return None
        last_rows = torch.tensor([layout.qo_indptr[i + 1] - 1 for i in sampled], device=self.device)
        return self.model.compute_logits(hidden[last_rows])  # float32

    def _layout(self, items: list[StepItem]) -> BatchLayout:
        qo_indptr = [0]
        kv_lens, page_tables = [], []
        for item in items:
            table = self._page_tables[item.request_id]
            table += item.new_pages
            qo_indptr.append(qo_indptr[-1] + len(item.token_ids))
            kv_lens.append(item.start + len(item.token_ids))
            page_tables.append(table)
        return BatchLayout(qo_indptr, kv_lens, page_tables)

    def _input_embeddings(self, items: list[StepItem], layout: BatchLayout) -> torch.Tensor:
        ids = torch.tensor(
            [t for item in items for t in item.token_ids], dtype=torch.long, device=self.device
        )
        embeds = self.model.embed(ids)  # [num_tokens, hidden]
        for item, start in zip(items, layout.qo_indptr, strict=False):
            for piece in item.embeds:
                dst = start + piece.dst_offset
                rows = self.embed_store[piece.row_offset : piece.row_offset + piece.num_rows]
                embeds[dst : dst + piece.num_rows] = rows.to(device=self.device, dtype=embeds.dtype)
        return embeds
