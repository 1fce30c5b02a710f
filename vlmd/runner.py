"""The model runner of a TP rank worker: executes StepPlans on the language model.

Owns the weights, the attention backend (and through it the KV cache), per-request page tables
and sampler state. Knows nothing of sockets: the worker actor feeds it plans.

A step is launched and collected in two calls so that the GPU never waits for the host: the
worker launches step N+1 (all of it queued on the device, nothing read back) before it collects
step N's tokens. Step N+1 may feed back a token step N sampled (`PENDING_TOKEN`): it is taken
from step N's device tensor, in stream order. Nothing in `launch` waits for the device.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vlmd.core.scheduler import Scheduler
from vlmd.kernels.attention import AttentionBackend, BatchLayout
from vlmd.kernels.page_table import DevicePageTables
from vlmd.kernels.sampler import Sampler, top_lists
from vlmd.kernels.transfer import to_device
from vlmd.messages import PENDING_TOKEN, StepItem, StepPlan, StepResult, TokenOut


@dataclass
class LaunchedStep:
    """A step queued on the device; its sampled tokens are being copied to the host."""

    step_id: int
    request_ids: list[str]  # the requests that sample, in item order
    tokens: torch.Tensor | None  # [num_sampled] int64, host (pinned on CUDA)
    logprobs: torch.Tensor | None  # [num_sampled] float32, host
    top_ids: torch.Tensor | None = None  # [num_sampled, k] when any request asked for alternatives
    top_logprobs: torch.Tensor | None = None  # [num_sampled, k]
    num_top: list[int] = field(default_factory=list)  # alternatives each request asked for
    copied: torch.cuda.Event | None = None  # recorded after the copies to the host; None on the CPU


# A side step's forward is queued this many decoder layers at a time, so that the worker's thread
# never spends long queuing it while a decode step waits to be launched, or its tokens to be sent
# (a part begun just before they are ready delays them by the part's length; the launch
# timelines in bench/RESULTS.md give what a layer takes to queue).
SIDE_LAYERS_PER_PART = 2
_ALL_QUEUED = object()  # what `advance_side` takes from a side step's parts once none is left


@dataclass
class SideStep:
    """A side step (--prefill_sms) being queued on the side stream a few layers at a time
    (`ModelRunner.advance_side`), then to the logits of the rows that sample. Its sampling is
    queued on the main stream once it has ended (`finish_side`)."""

    plan: StepPlan
    sampled: list[int]  # items that sample
    parts: Iterator | None  # its parts still to queue (`ModelRunner._side_parts`; None once all are)
    logits: torch.Tensor | None = None  # [len(sampled), vocab] float32, once queued
    done: torch.cuda.Event | None = None  # recorded on the side stream after the logits (CUDA)
    # What the main stream made for it and the side stream reads: alive until it has ended (the
    # main stream's allocator would hand their memory out again at once).
    inputs: tuple = ()


class ModelRunner:
    def __init__(
        self,
        model,
        attn: AttentionBackend,
        embed_store: torch.Tensor | None,
        graphs=None,
        side_attn: AttentionBackend | None = None,
        side_stream: torch.cuda.Stream | None = None,
        side_context: object = None,
    ) -> None:
        """model: a language model with embed / forward / compute_logits; embed_store: the
        shared [rows, hidden] arena of image embedding rows (None without images); graphs:
        captured decode steps (`DecodeGraphs`) or None; side_attn: a backend over the same KV
        cache for side steps (--prefill_sms), run on `side_stream` (None on the CPU: in turn), a
        stream of the green context `side_context` (kept alive here as long as its stream)."""
        self.model = model
        self.attn = attn
        self.embed_store = embed_store
        self.graphs = graphs
        self.side_attn = side_attn
        self.side_stream = side_stream
        self.side_context = side_context
        self.device = attn.spec.device
        self._cuda = self.device.type == "cuda"
        self.page_tables = DevicePageTables(self.device)
        self.sampler = Sampler(self.device)
        # The last launched step that sampled: its tokens on the device, and each request's row.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        # Recorded once a launched step's host-to-device inputs are consumed (see `launch`).
        self._inputs_copied: torch.cuda.Event | None = None
        # Times the parts of a launch: `watch.timed(what, step_id)` (the worker's HostWatch logs
        # the slow ones on a GPU).
        self.watch = _NO_WATCH

    def execute(self, plan: StepPlan) -> StepResult:
        """Launch and collect one step (no overlap)."""
        return self.collect(self.launch(plan))

    def _apply_membership(self, plan: StepPlan) -> None:
        """The requests the plan adds, drops and resets (host state; the side steps' too)."""
        for request_id in plan.finished_ids:
            self.page_tables.remove(request_id)
            self.sampler.remove(request_id)
        for request_id in plan.preempted_ids:  # their KV is gone; they start again from position 0
            self.page_tables.reset(request_id)
        for new in plan.new_requests:
            self.page_tables.add(new.request_id)
            self.sampler.add(new.request_id, new.sampling, new.prompt_ids)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        timed, step_id = self.watch.timed, plan.step_id
        self._apply_membership(plan)
        if self._inputs_copied is not None:
            # FlashInfer plans through one pinned host buffer per wrapper: the previous step's
            # copy out of it must have run before this step's plan refills it (it runs first
            # in that step, so this returns at once).
            with timed("waiting for the step before to read its inputs, before step", step_id):
                self._inputs_copied.synchronize()
        with timed("laying out and planning step", step_id):
            layout = self._layout(plan.items)
            sampled = [i for i, item in enumerate(plan.items) if item.sample]
            input_ids = self._input_ids(plan.items)
            graph = self.graphs.prepare(layout, input_ids) if self._graph_step(plan.items) else None
            if graph is None:
                self.attn.plan(layout)
            self._mark_inputs_copied()
        with timed("queuing the forward of step", step_id):
            if graph is not None:
                logits = self.graphs.replay(graph, len(plan.items))
            else:
                logits = self._eager(plan.items, layout, input_ids, sampled)
        with timed("queuing the sampling of step", step_id):
            step = self._sample(plan, logits, sampled)
            if step.tokens is None:
                return step
            self._last_tokens = step.tokens  # the next step may feed them back
            self._last_rows = {r: row for row, r in enumerate(step.request_ids)}
            return self._copy_to_host(step)

    def _sample(self, plan: StepPlan, logits: torch.Tensor | None, sampled: list[int]) -> LaunchedStep:
        """Sample the step's rows that sample (their logits, in item order), on the device."""
        if not sampled:
            return LaunchedStep(plan.step_id, [], None, None)
        request_ids = [plan.items[i].request_id for i in sampled]
        # A row's token goes right after its context: the position keys its noise.
        positions = [plan.items[i].start + len(plan.items[i].token_ids) for i in sampled]
        tokens, logprobs, top = self.sampler.sample(logits, request_ids, positions)
        step = LaunchedStep(plan.step_id, request_ids, tokens, logprobs)
        if top is not None:
            step.top_ids, step.top_logprobs = top.indices, top.values
            step.num_top = [self.sampler.states[r].params.top_logprobs for r in request_ids]
        return step

    @torch.inference_mode()
    def launch_side(self, plan: StepPlan) -> SideStep:
        """Start a side step: its requests, layout and ids now, the rest by `advance_side`, a
        part at a time, beside the steps of the main stream. Its page tables and ids are made on
        the main stream as a step's are (the tables are the main stream's), and the side stream
        waits for everything queued there so far: the steps before it, which may still write the
        KV its requests read, or read pages handed to it since."""
        assert self.side_attn is not None, "side steps need --prefill_sms"
        assert all(item.token_ids[-1] != PENDING_TOKEN for item in plan.items), "side steps are prompts"
        with self.watch.timed("admitting and laying out side step", plan.step_id):
            self._apply_membership(plan)
            layout = self._layout(plan.items)
            input_ids = self._input_ids(plan.items)
            sampled = [i for i, item in enumerate(plan.items) if item.sample]
        if self.side_stream is not None:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
        # layout and input_ids: made on the main stream, read on the side one.
        step = SideStep(plan, sampled, None, inputs=(layout, input_ids))
        step.parts = self._side_parts(step, layout, input_ids)
        return step

    def _side_parts(self, step: SideStep, layout: BatchLayout, input_ids: torch.Tensor) -> Iterator[None]:
        """A side step's work on the side stream, yielding after each part: its inputs (the image
        rows' copy from shared memory included: should the store be pageable, such a copy first
        waits for its stream's work, which on the main stream would hold this thread until the
        step in flight has ended), its attention plan, then its forward SIDE_LAYERS_PER_PART
        layers at a time, the last part with the logits of the rows that sample."""
        timed, step_id = self.watch.timed, step.plan.step_id
        with timed("queuing the inputs (image rows included) of side step", step_id):
            inputs_embeds = self._input_embeddings(step.plan.items, layout, input_ids)
            positions = self._to_device(layout.positions())
            last_rows = self._to_device([layout.qo_indptr[i + 1] - 1 for i in step.sampled])
        yield
        with timed("planning side step", step_id):
            self.side_attn.plan(layout)
        yield
        for hidden in self.model.forward_in_parts(
            inputs_embeds, positions, self.side_attn, SIDE_LAYERS_PER_PART
        ):
            if hidden is None:
                yield
        if step.sampled:
            step.logits = self.model.compute_logits(hidden[last_rows])

    @torch.inference_mode()
    def advance_side(self, step: SideStep) -> bool:
        """Queue the next part of a side step (`_side_parts`); True once all of it is queued."""
        if step.parts is None:
            return True
        with self._on_side_stream():
            if next(step.parts, _ALL_QUEUED) is not _ALL_QUEUED:
                return False
            step.parts = None
            if self.side_stream is not None:
                step.done = torch.cuda.Event()
                step.done.record()
        return True

    def _on_side_stream(self):
        stream = self.side_stream
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    @staticmethod
    def side_done(step: SideStep) -> bool:
        """All of the side step is queued, and on CUDA it has run."""
        return step.parts is None and (step.done is None or step.done.query())

    @torch.inference_mode()
    def finish_side(self, step: SideStep) -> LaunchedStep:
        """Once `side_done(step)`: queue its sampling on the main stream (the sampler's tables are
        the main stream's) and the copy of its tokens to the host; `collect` then waits for them."""
        if step.done is not None and step.logits is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(step.done)
            step.logits.record_stream(main)  # made on the side stream, read on the main one
        launched = self._sample(step.plan, step.logits, step.sampled)
        return launched if launched.tokens is None else self._copy_to_host(launched)

    @staticmethod
    def copied(step: LaunchedStep) -> bool:
        """The step's tokens are on the host (`collect` will not wait)."""
        return step.copied is None or step.copied.query()

    def _mark_inputs_copied(self) -> None:
        if self._cuda:
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens and return them."""
        if step.tokens is None:
            return StepResult(step.step_id, [], [], [])
        if step.copied is not None:
            step.copied.synchronize()
        top = []
        if step.top_ids is not None:
            top = top_lists(step.top_ids.tolist(), step.top_logprobs.tolist(), step.num_top)
        return StepResult(step.step_id, step.request_ids, step.tokens.tolist(), step.logprobs.tolist(), top)

    def _copy_to_host(self, step: LaunchedStep) -> LaunchedStep:
        """Start copying the step's results to pinned host memory; `collect` waits for them."""
        if not self._cuda:
            return step
        for name in ("tokens", "logprobs", "top_ids", "top_logprobs"):
            value = getattr(step, name)
            if value is not None:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                setattr(step, name, host.copy_(value, non_blocking=True))
        step.copied = torch.cuda.Event()
        step.copied.record()
        return step

    def _graph_step(self, items: list[StepItem]) -> bool:
        """Pure decode steps small enough for a captured graph replay it."""
        return (
            self.graphs is not None
            and len(items) <= self.graphs.max_batch_size
            and all(len(item.token_ids) == 1 and item.sample and not item.embeds for item in items)
        )

    def _eager(
        self, items: list[StepItem], layout: BatchLayout, input_ids: torch.Tensor, sampled: list[int]
    ) -> torch.Tensor | None:
        """Run the planned step op by op; returns the logits of the sampled rows [num_sampled, vocab]."""
        inputs_embeds = self._input_embeddings(items, layout, input_ids)
        positions = self._to_device(layout.positions())
        hidden = self.model.forward(inputs_embeds, positions, self.attn)  # [num_tokens, hidden]
        if not sampled:
            return None
        last_rows = self._to_device([layout.qo_indptr[i + 1] - 1 for i in sampled])
        return self.model.compute_logits(hidden[last_rows])  # float32

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor on the device, without waiting for the device."""
        return to_device(values, torch.long, self.device)

    def _input_ids(self, items: list[StepItem]) -> torch.Tensor:
        """The step's input ids [num_tokens] on the device, pending tokens filled in from the
        previous step's samples."""
        ids: list[int] = []
        rows, sources = [], []  # rows of pending tokens, and their rows in the previous step's samples
        for item in items:
            if item.token_ids[-1] == PENDING_TOKEN:  # only ever the last token of a span
                assert item.request_id in self._last_rows, "a pending token comes from the step just before"
                rows.append(len(ids) + len(item.token_ids) - 1)
                sources.append(self._last_rows[item.request_id])
            ids += item.token_ids
        n, k = len(ids), len(rows)
        flat = self._to_device(ids + rows + sources)  # one transfer
        input_ids = flat[:n]
        if k:
            input_ids[flat[n : n + k]] = self._last_tokens[flat[n + k :]]
        return input_ids

    def _layout(self, items: list[StepItem]) -> BatchLayout:
        return step_layout(self.page_tables, items, self.attn.spec.page_size)

    def _input_embeddings(
        self, items: list[StepItem], layout: BatchLayout, input_ids: torch.Tensor
    ) -> torch.Tensor:
        embeds = self.model.embed(input_ids)  # [num_tokens, hidden]
        for item, start in zip(items, layout.qo_indptr, strict=False):
            for piece in item.embeds:
                dst = start + piece.dst_offset
                rows = self.embed_store[piece.row_offset : piece.row_offset + piece.num_rows]
                # From shared memory, which the worker page-locks on CUDA (`embed_store_view`):
                # the copy is queued; out of pageable memory CUDA would first wait for the stream.
                embeds[dst : dst + piece.num_rows] = rows.to(self.device, non_blocking=True).to(embeds.dtype)
        return embeds


class _NoWatch:
    """A watch that times nothing (the runner outside a worker: tests, benchmarks)."""

    @staticmethod
    def timed(what: str, step_id: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


_NO_WATCH = _NoWatch()


def step_layout(page_tables: DevicePageTables, items: list[StepItem], page_size: int) -> BatchLayout:
    """A step's layout: the items' new pages appended to their tables, the tables gathered on the
    device. Host work per request, whatever the lengths of their contexts."""
    qo_indptr = [0]
    kv_lens, rows, num_pages = [], [], []
    for item in items:
        rows.append(page_tables.append(item.request_id, item.new_pages))
        qo_indptr.append(qo_indptr[-1] + len(item.token_ids))
        kv_len = item.start + len(item.token_ids)
        kv_lens.append(kv_len)
        num_pages.append(-(-kv_len // page_size))
    page_tables.flush()
    return BatchLayout(qo_indptr, kv_lens, page_tables.gather(rows, num_pages))


def run_in_process(
    scheduler: Scheduler, runner: ModelRunner, max_in_flight: int = 2, max_steps: int | None = None
) -> Iterator[tuple[StepPlan, list[TokenOut]]]:
    """Drive a scheduler and a runner in one process the way the actors do (benchmarks, tests):
    up to `max_in_flight` steps planned ahead, each launched before the one before it is
    collected. Yields every step once collected and applied, in order, with the tokens it gave
    to requests (tokens sampled for requests that had already stopped are dropped). Plans at
    most `max_steps` steps; run it to the end, or the scheduler keeps steps it never hears of."""
    launched: deque[tuple[StepPlan, LaunchedStep]] = deque()
    num_planned = 0

    def finish() -> tuple[StepPlan, list[TokenOut]]:
        plan, step = launched.popleft()
        outputs, _ = scheduler.update(plan, runner.collect(step))
        return plan, outputs

    while True:
        more = len(launched) < max_in_flight and (max_steps is None or num_planned < max_steps)
        plan = scheduler.schedule() if more else None
        if plan is None:
            if not launched:
                return
            yield finish()
            continue
        launched.append((plan, runner.launch(plan)))
        num_planned += 1
        if len(launched) == max_in_flight:
            yield finish()
