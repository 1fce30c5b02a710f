"""A property test of the scheduler core alone: thousands of random submit / images-ready / abort /
plan / complete sequences over small KV pools, with shared prefixes, images, steps planned ahead
and preemption.

A model of the workers follows every plan as they would (page tables from `new_pages`, reset for
preempted requests, dropped for finished ones) and writes into each KV page what the step
computes there; before every item it checks that the request's pages hold, at every position
already computed, that request's own token (or its image's row): a page shared through the
prefix cache, evicted, or handed from a preempted request to another must never be read with
someone else's content. `check_integrity` runs after every operation, and when all requests are
gone no page is held.

With side steps (`side_prefill`), a side step runs once every step planned before it has run (the
worker's side stream waits for the main one), and the steps that run while it is in flight must
neither write a page it reads or writes nor read a page it writes.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from vlmd.core.page_allocator import pages_for
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.messages import PENDING_TOKEN, EmbedRun, ImageRef, SamplingParams, StepPlan, StepResult

EOS = 3
IMAGE_TOKEN = 9


class Workers:
    """What the TP workers do with plans, reduced to page tables and page contents."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.tables: dict[str, list[int]] = {}
        self.pages: list[list[object]] = [[None] * page_size for _ in range(num_pages)]
        self.last_sampled: dict[str, int] = {}
        self.side_reads: set[int] = set()  # pages of the side step in flight
        self.side_writes: set[int] = set()

    def execute(self, plan: StepPlan, images: dict[str, list[ImageRef]], expected) -> dict[str, int]:
        if not plan.side:  # a side step's tables were kept at its launch
            self.prepare(plan)
        return self.compute(plan, images, expected)

    def prepare(self, plan: StepPlan) -> None:
        """The plan's changes to the page tables (a worker's host work, in plan order)."""
        for rid in plan.finished_ids:
            self.tables.pop(rid, None)
        for rid in plan.preempted_ids:
            if rid in self.tables:
                self.tables[rid] = []
        for new in plan.new_requests:
            self.tables[new.request_id] = []
        for item in plan.items:
            self.tables[item.request_id] += item.new_pages

    def compute(self, plan: StepPlan, images: dict[str, list[ImageRef]], expected) -> dict[str, int]:
        """What the plan's forward reads and writes in the KV pages."""
        sampled = {}
        for item in plan.items:
            table = self.tables[item.request_id]
            assert len(table) == pages_for(item.start + len(item.token_ids), self.page_size)
            for pos in range(item.start):  # what attention reads
                page, slot = divmod(pos, self.page_size)
                assert self.pages[table[page]][slot] == expected(item.request_id, pos), (
                    f"{item.request_id} reads position {pos} of page {table[page]} with another's content"
                )
                if not plan.side:
                    assert table[page] not in self.side_writes, "a step reads a page the side step writes"
            for offset, token in enumerate(item.token_ids):
                pos = item.start + offset
                if token == PENDING_TOKEN:
                    assert not plan.side, "a side step has no pending token"
                    token = self.last_sampled[item.request_id]
                page, slot = divmod(pos, self.page_size)
                if not plan.side:
                    assert table[page] not in self.side_reads | self.side_writes, (
                        "a step writes a page the side step uses"
                    )
                self.pages[table[page]][slot] = content(token, pos, images[item.request_id])
            if item.sample:
                sampled[item.request_id] = None
        return sampled

    def launch_side(self, plan: StepPlan) -> None:
        """The side step starts (every step before it has run): its tables, and the pages it will
        read and write until it ends."""
        self.prepare(plan)
        self.side_reads, self.side_writes = set(), set()
        for item in plan.items:
            table = self.tables[item.request_id]
            self.side_reads |= {table[pos // self.page_size] for pos in range(item.start)}
            end = item.start + len(item.token_ids)
            self.side_writes |= {table[pos // self.page_size] for pos in range(item.start, end)}


def content(token: int, pos: int, images: list[ImageRef]) -> object:
    """What a KV slot holds: the token, or for an image position the image's key and row."""
    for image in images:
        if image.token_offset <= pos < image.token_offset + image.num_tokens:
            return (image.md5, pos - image.token_offset)
    return token


def simulate(seed: int, num_ops: int = 120, side_prefill: bool = False) -> Scheduler:
    rng = random.Random(seed)
    page_size = rng.choice([2, 4])
    num_pages = rng.randint(8, 30)
    config = SchedulerConfig(
        num_pages,
        page_size,
        max_num_batched_tokens=rng.choice([3, 8, 64]),
        decode_step_prefill_tokens=rng.choice([None, None, 1, 2, 5]),
        max_running_requests=rng.choice([2, 4, 16]),
        enable_prefix_cache=rng.random() < 0.85,
        side_prefill=side_prefill,
    )
    sched = Scheduler(config)
    workers = Workers(num_pages, page_size)
    prefixes = [[rng.randint(10, 14) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    images = ["cat", "dog"]
    tokens: dict[str, list[int]] = {}  # every request's known tokens, to check the KV against
    image_refs: dict[str, list[ImageRef]] = {}
    in_flight: deque[StepPlan] = deque()
    side: list[StepPlan] = []  # the side step in flight, and the steps it waits for
    before_side: list[StepPlan] = []
    side_started: list[bool] = []
    next_id = 0

    def expected(rid: str, pos: int) -> object:
        return content(tokens[rid][pos], pos, image_refs[rid])

    def submit() -> None:
        nonlocal next_id
        rid = f"r{next_id}"
        next_id += 1
        prompt = list(rng.choice(prefixes)) + [rng.randint(10, 30) for _ in range(rng.randint(1, 8))]
        refs = []
        if rng.random() < 0.3:  # an image of 2..5 rows somewhere in the prompt
            rows = rng.randint(2, 5)
            at = rng.randint(0, len(prompt))
            prompt[at:at] = [IMAGE_TOKEN] * rows
            refs = [ImageRef(rng.choice(images), "", 0, 1, at, rows)]
        max_new = rng.randint(1, 12)
        while pages_for(len(prompt) + max_new, page_size) > num_pages:
            max_new -= 1
            if max_new == 0:
                return
        tokens[rid], image_refs[rid] = list(prompt), refs
        request = Request(
            rid, prompt, SamplingParams(max_new_tokens=max_new), images=refs, eos_token_ids=[EOS]
        )
        sched.add(request)

    def launch_side() -> None:
        plan = sched.schedule_side()
        if plan is not None:
            side[:] = [plan]
            before_side[:] = list(in_flight)
            start_side_if_ready()

    def start_side_if_ready() -> None:
        if side and not before_side and not side_started:
            side_started.append(True)
            workers.launch_side(side[0])

    def complete(plan: StepPlan | None = None) -> None:
        if plan is None:
            plan = in_flight.popleft()
            if plan in before_side:
                before_side.remove(plan)
        sampled = workers.execute(plan, image_refs, expected)
        if plan.side:
            side.clear()
            side_started.clear()
            workers.side_reads, workers.side_writes = set(), set()
        else:
            start_side_if_ready()  # once the steps it waits for have run
        ids = list(sampled)
        new_tokens = [rng.choice([EOS, 20, 21, 22, 23]) if rng.random() < 0.9 else EOS for _ in ids]
        for rid, token in zip(ids, new_tokens, strict=True):
            workers.last_sampled[rid] = token
            if rid in sched.requests:
                tokens[rid].append(token)
        sched.update(plan, StepResult(plan.step_id, ids, new_tokens, [0.0] * len(ids)))

    for _ in range(num_ops):
        op = rng.random()
        if op < 0.25:
            submit()
        elif op < 0.35:
            for request in list(sched.requests.values()):
                if request.images and not request.embed_runs:
                    sched.images_ready(
                        request.request_id, [EmbedRun(i.md5, 0, i.num_tokens) for i in request.images]
                    )
        elif op < 0.42 and sched.requests:
            sched.abort(rng.choice(list(sched.requests)))
        elif op < 0.75 and len(in_flight) < 2:
            plan = sched.schedule()
            if plan is not None:
                in_flight.append(plan)
            if side_prefill and not side:
                launch_side()
        elif side_started and op < 0.85:
            complete(side[0])
        elif in_flight:
            complete()
        sched.check_integrity()
    # Drain: images arrive, everything runs to its end.
    for request in list(sched.requests.values()):
        if request.images and not request.embed_runs:
            sched.images_ready(request.request_id, [EmbedRun(i.md5, 0, i.num_tokens) for i in request.images])
    for _ in range(2000):
        if side_prefill and not side:
            launch_side()
        if len(in_flight) < 2 and (plan := sched.schedule()) is not None:
            in_flight.append(plan)
        elif in_flight:
            complete()
        elif side:
            complete(side[0])
        else:
            break
        sched.check_integrity()
    assert not sched.requests, "requests left that never finished: a deadlock"
    assert sched.num_used_pages == 0 and sched.allocator.num_used == sched.cache.num_nodes
    sched.check_idle()
    return sched


@pytest.mark.parametrize("block", range(8))
def test_random_sequences_keep_every_invariant(block):
    stats = [simulate(seed).stats for seed in range(block * 250, (block + 1) * 250)]
    assert sum(s.preemptions for s in stats) > 0 and sum(s.hit_tokens for s in stats) > 0


@pytest.mark.parametrize("block", range(4))
def test_random_sequences_with_side_steps_keep_every_invariant(block):
    """The same, with prompt spans in side steps beside the decode steps (side_prefill)."""
    scheds = [simulate(seed, side_prefill=True) for seed in range(block * 250, (block + 1) * 250)]
    assert sum(s.stats.preemptions for s in scheds) > 0 and sum(s.stats.hit_tokens for s in scheds) > 0
    assert sum(s.stats.side_steps for s in scheds) > 0
