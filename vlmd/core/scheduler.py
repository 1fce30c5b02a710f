"""Continuous batching over a paged KV cache.

A step is a list of (request, token span) items under one token budget: running requests
first (a decode token, or the next chunk of a long prompt), then waiting requests in arrival
order while their pages fit. Admission reserves the pages of a request's whole life
(prompt + max_new_tokens), so a running request never runs out of pages and nothing is ever
preempted; pages themselves are allocated as tokens arrive and freed the moment a request ends.

The next step may be planned while the previous one runs: a request whose step in flight samples
a token decodes that token next (`PENDING_TOKEN`), unless it is sure to end by length first. A
request that turns out to have stopped on that token has run one wasted step; its pages are
freed at once, which is safe because the worker runs steps in order on one stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vlmd.core.page_allocator import PageAllocator, pages_for
from vlmd.core.request import Request, Status
from vlmd.messages import EmbedRun, EmbedSlice, NewRequest, StepItem, StepPlan, StepResult, TokenOut


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int
    page_size: int
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunk size)
    max_running_requests: int = 256


@dataclass
class Finished:
    request: Request
    reason: str


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.allocator = PageAllocator(config.num_pages)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._reserved_pages = 0  # pages promised to running requests but not yet allocated
        self._finished_since_last_step: list[str] = []
        self._step_id = 0

    # --- requests in and out ----------------------------------------------------------------

    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, "duplicate request id"
        assert pages_for(request.max_total_tokens, self.config.page_size) <= self.config.num_pages
        request.status = Status.WAITING_IMAGES if request.images else Status.WAITING
        self.requests[request.request_id] = request
        if request.status is Status.WAITING:
            self.waiting.append(request)

    def images_ready(self, request_id: str, runs: list[EmbedRun]) -> None:
        request = self.requests.get(request_id)
        if request is None or request.status is not Status.WAITING_IMAGES:
            return  # aborted meanwhile
        assert len(runs) == len(request.images)
        for run, image in zip(runs, request.images, strict=True):
            assert run.num_rows == image.num_tokens, "embedding rows must fill the image's tokens"
        request.embed_runs = runs
        request.status = Status.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Forget a request and free its pages at once; returns it if it was known."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request)
        return request

    def has_work(self) -> bool:
        return any(r.can_schedule() for r in self.running) or self._can_admit()

    # --- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        items: list[StepItem] = []
        new_requests: list[NewRequest] = []
        for request in self.running:
            if budget == 0:
                break
            if not request.can_schedule():
                continue
            item = self._schedule_span(request, budget)
            items.append(item)
            budget -= len(item.token_ids)
        while budget > 0 and self._can_admit():
            request = self._admit()
            new_requests.append(NewRequest(request.request_id, request.sampling, request.prompt_ids))
            item = self._schedule_span(request, budget)
            items.append(item)
            budget -= len(item.token_ids)
        if not items:
            return None
        self._step_id += 1
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        return StepPlan(self._step_id, items, new_requests, finished)

    def update(self, plan: StepPlan, result: StepResult) -> tuple[list[TokenOut], list[Finished]]:
        """Apply a step's results: advance computed tokens, append sampled ones, finish requests.
        `result` has one row per item that samples, in item order (the workers' contract)."""
        assert result.step_id == plan.step_id, "workers answer steps in order"
        outputs: list[TokenOut] = []
        finished: list[Finished] = []
        row = -1
        for item in plan.items:
            row += item.sample
            request = self.requests.get(item.request_id)
            if request is None:
                continue  # aborted while the step ran
            request.num_computed = item.start + len(item.token_ids)
            if not item.sample:
                continue
            assert result.request_ids[row] == item.request_id, "result rows follow the sampling items"
            request.num_pending -= 1
            token_id = result.token_ids[row]
            request.output_ids.append(token_id)
            reason, num_stop = request.finish_reason_after(token_id)
            top = [result.top_logprobs[row]] if request.sampling.top_logprobs and result.top_logprobs else []
            outputs.append(
                TokenOut(request.request_id, [token_id], [result.logprobs[row]], reason, num_stop, top)
            )
            if reason is not None:
                self._finish(request)
                finished.append(Finished(request, reason))
        return outputs, finished

    # --- internals --------------------------------------------------------------------------

    def _can_admit(self) -> bool:
        if not self.waiting or len(self.running) >= self.config.max_running_requests:
            return False
        need = pages_for(self.waiting[0].max_total_tokens, self.config.page_size)
        return self.allocator.num_free - self._reserved_pages >= need

    def _admit(self) -> Request:
        request = self.waiting.popleft()
        request.status = Status.RUNNING
        self._reserved_pages += pages_for(request.max_total_tokens, self.config.page_size)
        self.running.append(request)
        return request

    def _schedule_span(self, request: Request, budget: int) -> StepItem:
        start = request.num_scheduled
        end = min(request.num_known_after_inflight, start + budget)
        assert end > start, "a schedulable request has a token to compute"
        assert request.num_pending <= 1, "a pending token comes from the step just before"
        need = pages_for(end, self.config.page_size) - len(request.page_table)
        new_pages = self.allocator.allocate(need) if need > 0 else []
        request.page_table += new_pages
        self._reserved_pages -= len(new_pages)
        sample = end == request.num_known_after_inflight
        item = StepItem(
            request_id=request.request_id,
            start=start,
            token_ids=request.token_ids(start, end),
            new_pages=new_pages,
            embeds=_embed_slices(request, start, end),
            sample=sample,
        )
        request.num_scheduled = end
        request.num_pending += sample
        return item

    def _finish(self, request: Request) -> None:
        if request.status is Status.RUNNING:
            self.running.remove(request)
            unallocated = pages_for(request.max_total_tokens, self.config.page_size) - len(request.page_table)
            self._reserved_pages -= unallocated
            self._finished_since_last_step.append(request.request_id)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        self.allocator.free(request.page_table)
        request.page_table = []
        request.status = Status.FINISHED
        del self.requests[request.request_id]

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        owned = [page for r in self.running for page in r.page_table]
        assert len(owned) == len(set(owned)) == self.allocator.num_used, "page ownership mismatch"
        reserved = sum(
            pages_for(r.max_total_tokens, self.config.page_size) - len(r.page_table) for r in self.running
        )
        assert reserved == self._reserved_pages, "reservation drifted"
        assert self._reserved_pages <= self.allocator.num_free
        for r in self.running:
            assert r.status is Status.RUNNING
            assert r.num_computed <= r.num_scheduled <= r.num_known_after_inflight
        for r in self.waiting:
            assert r.status is Status.WAITING and not r.page_table


def _embed_slices(request: Request, start: int, end: int) -> list[EmbedSlice]:
    """The parts of the request's image embedding runs that fall inside [start, end)."""
    slices = []
    for image, run in zip(request.images, request.embed_runs, strict=True):
        lo = max(start, image.token_offset)
        hi = min(end, image.token_offset + image.num_tokens)
        if lo < hi:
            slices.append(EmbedSlice(run.row_offset + lo - image.token_offset, hi - lo, lo - start))
    return slices
