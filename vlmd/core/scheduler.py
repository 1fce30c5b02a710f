"""Continuous batching over a paged KV cache with a prefix cache and preemption.

A step is a list of (request, token span) items under one token budget: running requests
first, oldest first (a decode token, or the next chunk of a long prompt), then waiting
requests in arrival order while their KV fits. Pages are allocated as tokens arrive. With
`decode_step_prefill_tokens`, a step in which requests decode carries at most that many prompt
tokens beside them: the prompts wait, the decode rows never do.

Admission takes what a request needs now, not what it may need: its known tokens not found in
the prefix cache (`vlmd.core.prefix_cache`), plus a small watermark of the pool while others run
(with none running, a request may take the whole pool). When a running
request needs a page and none is free (nor evictable from the cache), the newest running
requests are preempted: their pages are released, they go back to the front of the queue with
every token they have, and are computed again once re-admitted (much of it a prefix-cache hit).
The oldest request therefore always progresses, and a request whose prompt + max_new_tokens fit
the pool on its own always finishes.

Every page of a request whose KV is computed is offered to the prefix cache as it fills, so the
next turn of a chat, or another request with the same system prompt, starts from it.

With `side_prefill`, prompt spans do not ride in steps with decode rows at all: while requests
decode, they go in side steps (`schedule_side`), one in flight at a time, which the workers run
beside the decode steps (on a CUDA green context of some SMs: `--prefill_sms`), so that a decode
row waits for no prompt. A request in the side step in flight is in no other step; if it is
aborted meanwhile, its pages are released once that step has returned (the side step may still
write them).

The next step may be planned while the previous one runs: a request whose step in flight samples
a token decodes that token next (`PENDING_TOKEN`), unless it is sure to end by length first. A
request that turns out to have stopped on that token has run one wasted step; its pages are
freed at once, which is safe because the worker runs steps in order on one stream (the same
holds for a preempted request's pages, and for cached pages evicted and handed to another).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vlmd.core.page_allocator import PageAllocator, pages_for
from vlmd.core.prefix_cache import PrefixCache
from vlmd.core.request import Request, Status
from vlmd.messages import EmbedRun, EmbedSlice, NewRequest, StepItem, StepPlan, StepResult, TokenOut


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int
    page_size: int
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunk size)
    # In a step where requests decode (one token left to compute), prompt tokens beyond this
    # wait for later steps: a smaller chunk beside the decode rows, a shorter inter-token latency
    # while prompts and images arrive, a slower prefill. None: the step budget alone.
    decode_step_prefill_tokens: int | None = None
    max_running_requests: int = 256
    enable_prefix_cache: bool = True
    # Prompt spans beside decode rows go in side steps (`Scheduler.schedule_side`), not in the
    # decode steps: the workers run them beside the decode steps, on SMs of their own.
    side_prefill: bool = False
    # Admission leaves this share of the pool free for the running requests' next tokens, so that
    # a request admitted now is not the one preempted at the next step.
    watermark: float = 0.01


@dataclass
class Finished:
    request: Request
    reason: str


@dataclass
class SchedulerStats:
    """Counters for /metrics."""

    queried_tokens: int = 0  # known tokens looked up in the prefix cache at admission
    hit_tokens: int = 0  # of those, found cached
    preemptions: int = 0
    capped_steps: int = 0  # steps whose prompt tokens beside decode rows reached the cap
    side_steps: int = 0  # side steps planned (side_prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.allocator = PageAllocator(config.num_pages)
        self.cache = PrefixCache(self.allocator)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._watermark_pages = int(config.num_pages * config.watermark)
        self._head_path: tuple[Request | None, list] = (None, [])  # the queue's head and its cached path
        self._finished_since_last_step: list[str] = []
        self._preempted_since_last_step: list[str] = []
        self._step_id = 0
        self.side: StepPlan | None = None  # the side step in flight (side_prefill)
        self._side_aborted: list[Request] = []  # gone while in it: pages held until it returns

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

    @property
    def idle(self) -> bool:
        return not self.requests and self.side is None

    @property
    def last_step_id(self) -> int:
        """The id of the last step planned (0 before the first)."""
        return self._step_id

    @property
    def num_used_pages(self) -> int:
        """Pages requests hold (their own and the cached ones they share); the rest of the pool is
        free, or cached for a later request and evictable."""
        return self.allocator.num_used - self.cache.num_unreferenced

    # --- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        prefill_budget = self._prefill_budget(budget)  # tokens of spans longer than one
        items, new_requests, budget, prefill_budget = self._spans(budget, prefill_budget, with_decodes=True)
        if prefill_budget == 0 < budget:
            self.stats.capped_steps += 1
        if not items:
            return None  # what was preempted and finished goes out with the next plan
        return self._plan(items, new_requests)

    def schedule_side(self) -> StepPlan | None:
        """With side_prefill, while some request decodes and no side step is in flight: a step of
        prompt spans only (running requests' next chunks, then admissions) under the step budget,
        to run beside the decode steps. Its requests are in no other step until it returns."""
        if not self.config.side_prefill or self.side is not None or not self._any_decodes(now=False):
            return None
        budget = self.config.max_num_batched_tokens
        items, new_requests, _, _ = self._spans(budget, budget, with_decodes=False)
        if not items:
            return None
        for item in items:
            self.requests[item.request_id].in_side = True
        self.stats.side_steps += 1
        self.side = self._plan(items, new_requests, side=True)
        return self.side

    def _spans(
        self, budget: int, prefill_budget: int, with_decodes: bool
    ) -> tuple[list[StepItem], list[NewRequest], int, int]:
        """A step's spans under `budget` tokens, of which at most `prefill_budget` in spans longer
        than one: running requests first, oldest first (their decode rows only `with_decodes`),
        then waiting ones in arrival order while their KV fits. Returns the items, the requests
        new to the workers, and what is left of both budgets."""
        items: list[StepItem] = []
        new_requests: list[NewRequest] = []
        for request in list(self.running):  # oldest first; preemption removes from the end
            if budget == 0:
                break
            if request.status is not Status.RUNNING or request.in_side or not request.can_schedule():
                continue
            decodes = _decodes(request)
            if (decodes and not with_decodes) or (not decodes and prefill_budget == 0):
                continue  # its next chunk waits; the decode rows after it run
            item = self._schedule_span(request, budget if decodes else min(budget, prefill_budget))
            if item is None:
                break  # it was the newest and preempted itself: nothing after it runs
            items.append(item)
            budget -= len(item.token_ids)
            prefill_budget -= 0 if decodes else len(item.token_ids)
        while budget > 0 and prefill_budget > 0 and self._can_admit():
            request = self._admit()
            if not request.sent_to_workers:
                new_requests.append(NewRequest(request.request_id, request.sampling, request.prompt_ids))
                request.sent_to_workers = True
            item = self._schedule_span(request, min(budget, prefill_budget))
            assert item is not None, "an admitted request's first span fits"
            items.append(item)
            budget -= len(item.token_ids)
            prefill_budget -= len(item.token_ids)
        return items, new_requests, budget, prefill_budget

    def _plan(self, items: list[StepItem], new_requests: list[NewRequest], side: bool = False) -> StepPlan:
        self._step_id += 1
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        preempted, self._preempted_since_last_step = self._preempted_since_last_step, []
        return StepPlan(self._step_id, items, new_requests, finished, preempted, side)

    def update(self, plan: StepPlan, result: StepResult) -> tuple[list[TokenOut], list[Finished]]:
        """Apply a step's results: advance computed tokens, cache filled pages, append sampled
        tokens, finish requests. `result` has one row per item that samples, in item order."""
        assert result.step_id == plan.step_id, "workers answer steps in order"
        if plan.side:
            assert plan is self.side, "one side step in flight"
            self.side = None
            for item in plan.items:
                if (request := self.requests.get(item.request_id)) is not None:
                    request.in_side = False
            for request in self._side_aborted:  # the step that could still write them has returned
                self._finished_since_last_step.append(request.request_id)
                self._release_pages(request)
            self._side_aborted = []
        outputs: list[TokenOut] = []
        finished: list[Finished] = []
        row = -1
        for item in plan.items:
            row += item.sample
            request = self.requests.get(item.request_id)
            if request is None:
                continue  # aborted while the step ran
            if plan.step_id >= request.first_step_since_preempted:  # else its KV is gone since
                request.num_computed = item.start + len(item.token_ids)
                self._cache_full_pages(request)
            if not item.sample:
                continue
            assert result.request_ids[row] == item.request_id, "result rows follow the sampling items"
            request.num_pending -= 1
            token_id = result.token_ids[row]
            request.output_ids.append(token_id)
            reason, num_stop = request.finish_reason_after(token_id)
            top = [result.top_logprobs[row]] if request.sampling.top_logprobs and result.top_logprobs else []
            cached = request.num_cached_tokens if len(request.output_ids) == 1 else 0
            outputs.append(
                TokenOut(
                    request.request_id, [token_id], [result.logprobs[row]], reason, num_stop, top, cached
                )
            )
            if reason is not None:
                self._finish(request)
                finished.append(Finished(request, reason))
        return outputs, finished

    # --- admission and preemption -------------------------------------------------------------

    def _can_admit(self) -> bool:
        if not self.waiting or len(self.running) >= self.config.max_running_requests:
            return False
        head = self.waiting[0]
        if head.num_pending:
            return False  # preempted with a token still in flight: re-admit once it is known
        path = self._lookup(head)
        self._head_path = (head, path)  # `_admit` takes it: nothing changes the cache in between
        need = pages_for(head.num_tokens + 1, self.config.page_size) - len(path)
        held = sum(node.ref_count == 0 for node in path)  # cached pages it would stop being evictable
        # The watermark keeps room for the running requests' next tokens; with none running, a
        # request that fits the pool (the http actor bounds every request by it) takes it all.
        watermark = self._watermark_pages if self.running else 0
        return self.cache.num_available - held - need >= watermark

    def _admit(self) -> Request:
        request = self.waiting.popleft()
        head, path = self._head_path
        assert head is request, "_admit follows the _can_admit that looked its head up"
        self.cache.acquire(path)
        request.path = path
        request.page_table = [node.page for node in path]
        num_cached = len(path) * self.config.page_size
        request.num_computed = request.num_scheduled = num_cached
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += num_cached
        request.status = Status.RUNNING
        self.running.append(request)
        return request

    def _lookup(self, request: Request) -> list:
        """The cached path of the request's known tokens, leaving at least one to compute (its
        logits give the next token)."""
        if not self.config.enable_prefix_cache:
            return []
        num_pages = (request.num_tokens - 1) // self.config.page_size
        return self.cache.match(request.page_key(i, self.config.page_size) for i in range(num_pages))

    def _preempt(self, request: Request) -> None:
        """Free a running request's KV and put it back at the front of the queue, tokens kept."""
        self.running.remove(request)
        self._release_pages(request)
        request.num_computed = request.num_scheduled = 0
        request.first_step_since_preempted = self._step_id + 1  # steps planned before: stale
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self._preempted_since_last_step.append(request.request_id)
        self.stats.preemptions += 1

    def _allocate(self, request: Request, count: int) -> list[int] | None:
        """`count` pages for `request`, preempting the newest running requests while there are
        too few; None when `request` itself had to be preempted."""
        while self.cache.num_available < count:
            # The newest not in the side step in flight (its pages are being written there);
            # `request` itself is running and in no side step, so there is one.
            victim = next(r for r in reversed(self.running) if not r.in_side)
            self._preempt(victim)
            if victim is request:
                return None
        return self.cache.allocate(count)

    # --- internals --------------------------------------------------------------------------

    def _prefill_budget(self, budget: int) -> int:
        """The step's budget for spans of more than one token: the cap where a running request
        decodes this step, else the whole budget. With side_prefill, none while a request decodes
        or a side step is in flight (prompts go in side steps; never two prefills at once)."""
        if self.config.side_prefill:
            return 0 if self.side is not None or self._any_decodes(now=False) else budget
        cap = self.config.decode_step_prefill_tokens
        if cap is None or cap >= budget:
            return budget
        return cap if self._any_decodes() else budget

    def _any_decodes(self, now: bool = True) -> bool:
        """A running request outside the side step decodes in the next step (`now`), or is
        decoding (its next step may wait for the two in flight)."""
        return any(
            r.status is Status.RUNNING and not r.in_side and (r.can_schedule() or not now) and _decodes(r)
            for r in self.running
        )

    def _schedule_span(self, request: Request, budget: int) -> StepItem | None:
        start = request.num_scheduled
        end = min(request.num_known_after_inflight, start + budget)
        assert end > start, "a schedulable request has a token to compute"
        assert request.num_pending <= 1, "a pending token comes from the step just before"
        need = pages_for(end, self.config.page_size) - len(request.page_table)
        if need > 0:
            pages = self._allocate(request, need)
            if pages is None:
                return None
            request.page_table += pages
        # The workers learn a request's pages as its spans need them: after (re-)admission, the
        # cached ones come with its first span.
        new_pages = request.page_table[request.num_pages_sent :]
        request.num_pages_sent = len(request.page_table)
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

    def _cache_full_pages(self, request: Request) -> None:
        """Offer the request's pages whose every position is computed to the prefix cache."""
        if not self.config.enable_prefix_cache:
            return
        page_size = self.config.page_size
        while (len(request.path) + 1) * page_size <= min(request.num_computed, request.num_tokens):
            index = len(request.path)
            parent = request.path[-1] if request.path else self.cache.root
            node = self.cache.insert(parent, request.page_key(index, page_size), request.page_table[index])
            request.path.append(node)

    def _release_pages(self, request: Request) -> None:
        """Give back a request's pages: the cached path is released (it stays cached), private
        pages go back to the allocator."""
        self.allocator.free(_private_pages(request))
        self.cache.release(request.path)
        request.path, request.page_table, request.num_pages_sent = [], [], 0

    def _finish(self, request: Request) -> None:
        if request.in_side:  # aborted while the side step runs: its pages wait for that step
            self.running.remove(request)
            self._side_aborted.append(request)
            request.status = Status.FINISHED
            del self.requests[request.request_id]
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self._finished_since_last_step.append(request.request_id)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
            if request.sent_to_workers:  # preempted: the workers still hold its sampler
                self._finished_since_last_step.append(request.request_id)
        self._release_pages(request)
        request.status = Status.FINISHED
        del self.requests[request.request_id]

    def check_idle(self) -> None:
        """With no request left (`idle`), in constant time: every page in use is cached, and no
        cached page is held. `check_integrity` walks everything instead (tests)."""
        assert self.idle, "requests are left"
        assert self.allocator.num_used == self.cache.num_nodes, (
            f"{self.allocator.num_used - self.cache.num_nodes} page(s) in use, not cached, no request left"
        )
        assert self.cache.num_unreferenced == self.cache.num_nodes, (
            f"{self.cache.num_nodes - self.cache.num_unreferenced} cached page(s) held, no request left"
        )

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        holders = self.running + self._side_aborted
        cached = self.cache.check_integrity(r.path for r in holders)
        private = [page for r in holders for page in _private_pages(r)]
        assert len(private) == len(set(private)), "a private page owned twice"
        assert not set(private) & cached, "a page both private and cached"
        assert len(private) + len(cached) == self.allocator.num_used, "page ownership mismatch"
        assert all(r.in_side for r in self._side_aborted) and (
            self.side is not None or not self._side_aborted
        )
        in_side = {r.request_id for r in self.running if r.in_side}
        assert in_side <= {item.request_id for item in self.side.items} if self.side else not in_side
        for r in self.running:
            assert r.status is Status.RUNNING
            assert r.num_computed <= r.num_scheduled <= r.num_known_after_inflight
            assert len(r.path) * self.config.page_size <= r.num_computed, "a cached page not computed"
            assert len(r.page_table) == pages_for(r.num_scheduled, self.config.page_size)
            assert r.num_pages_sent <= len(r.page_table)
        for r in self.waiting:
            assert r.status is Status.WAITING and not r.page_table and not r.path


def _private_pages(request: Request) -> list[int]:
    """The request's pages the prefix cache does not hold: past its cached path, or duplicates of a
    page another request cached first."""
    path = request.path
    return [page for i, page in enumerate(request.page_table) if i >= len(path) or page != path[i].page]


def _embed_slices(request: Request, start: int, end: int) -> list[EmbedSlice]:
    """The parts of the request's image embedding runs that fall inside [start, end)."""
    slices = []
    for image, run in zip(request.images, request.embed_runs, strict=True):
        lo = max(start, image.token_offset)
        hi = min(end, image.token_offset + image.num_tokens)
        if lo < hi:
            slices.append(EmbedSlice(run.row_offset + lo - image.token_offset, hi - lo, lo - start))
    return slices


def _decodes(request: Request) -> bool:
    """One token left to compute: the request decodes (or ends its prompt) this step."""
    return request.num_known_after_inflight - request.num_scheduled == 1
