"""Unit tests of the pure core: page allocator, scheduler, embed-cache index. No model, no torch."""

from __future__ import annotations

import pytest

from vlmd.core.embed_index import EmbedIndex, RowArena
from vlmd.core.page_allocator import PageAllocator, pages_for
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.messages import PENDING_TOKEN, EmbedRun, ImageRef, SamplingParams, StepPlan, StepResult


def make_request(rid: str, prompt_len: int = 5, max_new: int = 4, **kw) -> Request:
    return Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(max_new_tokens=max_new), **kw)


def make_scheduler(num_pages: int = 16, page_size: int = 4, budget: int = 64, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(num_pages, page_size, budget, **kw))


def result(plan: StepPlan, sampled: dict[str, tuple[int, float]]) -> StepResult:
    """The workers' answer to `plan`: (token, logprob) for each request that samples."""
    ids = [item.request_id for item in plan.items if item.sample]
    return StepResult(plan.step_id, ids, [sampled[r][0] for r in ids], [sampled[r][1] for r in ids])


def run_step(sched: Scheduler, token: int = 7):
    plan = sched.schedule()
    assert plan is not None
    sampled = {item.request_id: (token, -0.5) for item in plan.items if item.sample}
    outputs, finished = sched.update(plan, result(plan, sampled))
    sched.check_integrity()
    return plan, outputs, finished


# --- page allocator ---------------------------------------------------------------------------


def test_allocator_hands_out_and_takes_back():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    assert len(set(pages)) == 3 and alloc.num_free == 1
    with pytest.raises(MemoryError):
        alloc.allocate(2)
    alloc.free(pages)
    alloc.check_integrity()
    assert alloc.num_free == 4


def test_allocator_rejects_double_free():
    alloc = PageAllocator(2)
    pages = alloc.allocate(1)
    alloc.free(pages)
    with pytest.raises(AssertionError):
        alloc.free(pages)


def test_pages_for_rounds_up():
    assert [pages_for(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


# --- scheduler --------------------------------------------------------------------------------


def test_prefill_then_decode_until_length():
    sched = make_scheduler()
    sched.add(make_request("a", prompt_len=5, max_new=3))
    plan, outputs, _ = run_step(sched, token=11)
    (item,) = plan.items
    assert item.start == 0 and item.token_ids == list(range(100, 105)) and item.sample
    assert len(item.new_pages) == 2 and plan.new_requests[0].request_id == "a"
    assert outputs[0].token_ids == [11] and outputs[0].finish_reason is None
    plan, outputs, _ = run_step(sched, token=12)
    assert plan.items[0].start == 5 and plan.items[0].token_ids == [11] and not plan.new_requests
    plan, outputs, finished = run_step(sched, token=13)
    assert outputs[0].finish_reason == "length" and finished[0].request.output_ids == [11, 12, 13]
    assert sched.num_used_pages == 0 and not sched.running
    assert sched.schedule() is None


def test_finished_request_is_announced_to_workers_in_next_plan():
    sched = make_scheduler()
    sched.add(make_request("a", max_new=1))
    run_step(sched)
    sched.add(make_request("b"))
    plan, _, _ = run_step(sched)
    assert plan.finished_ids == ["a"]


def test_eos_and_stop_sequences():
    sched = make_scheduler()
    sched.add(make_request("eos", max_new=10, eos_token_ids=[7]))
    sched.add(make_request("ign", max_new=2))
    _, outputs, finished = run_step(sched, token=7)
    reasons = {o.request_id: o.finish_reason for o in outputs}
    assert reasons == {"eos": "stop", "ign": None}


def test_ignore_eos_keeps_going():
    sched = make_scheduler()
    req = Request("a", [1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True), eos_token_ids=[7])
    sched.add(req)
    _, outputs, _ = run_step(sched, token=7)
    assert outputs[0].finish_reason is None


def test_stop_token_sequence_reports_tokens_to_hide():
    sched = make_scheduler()
    sched.add(make_request("a", max_new=10, stop_token_seqs=[[8, 9]]))
    run_step(sched, token=8)
    _, outputs, _ = run_step(sched, token=9)
    assert outputs[0].finish_reason == "stop" and outputs[0].num_stop_tokens == 2


def test_continuous_batching_admits_between_steps():
    sched = make_scheduler()
    sched.add(make_request("a", max_new=5))
    run_step(sched)
    sched.add(make_request("b", prompt_len=3))
    plan, _, _ = run_step(sched)
    assert [(i.request_id, len(i.token_ids)) for i in plan.items] == [("a", 1), ("b", 3)]


def test_admission_takes_what_is_needed_now_and_the_newest_is_preempted():
    # 4 pages of 4 tokens, two requests of 5 + 4 tokens (3 pages each): both are admitted on
    # their prompts' 2 pages; when the oldest needs its third, the newest is preempted, comes
    # back once the oldest is done, and ends with its tokens.
    sched = make_scheduler(num_pages=4, enable_prefix_cache=False)
    sched.add(make_request("a", prompt_len=5, max_new=4))
    sched.add(make_request("b", prompt_len=6, max_new=4))
    plan, _, _ = run_step(sched, token=1)
    assert [i.request_id for i in plan.items] == ["a", "b"]
    run_step(sched, token=2)  # a: position 5, b: position 6
    run_step(sched, token=3)  # a: position 6, b: position 7 (their pages are full)
    plan, _, finished = run_step(sched, token=4)  # b needs a page for position 8: b, the newest, yields
    assert [i.request_id for i in plan.items] == ["a"] and plan.preempted_ids == ["b"]
    assert [f.request.request_id for f in finished] == ["a"]  # a's 4th token
    b = sched.requests["b"]
    assert b.output_ids == [1, 2, 3] and b.num_computed == 0 and sched.waiting[0] is b
    assert sched.stats.preemptions == 1
    plan, _, finished = run_step(sched, token=5)  # b again: all 9 known tokens, then its 4th
    (item,) = plan.items
    assert (item.request_id, item.start, len(item.token_ids), len(item.new_pages)) == ("b", 0, 9, 3)
    assert item.token_ids == [*range(100, 106), 1, 2, 3] and not plan.new_requests
    assert finished[0].request.output_ids == [1, 2, 3, 5] and finished[0].reason == "length"
    assert sched.num_used_pages == 0 and not sched.requests


def test_a_request_that_fills_the_pool_alone_is_admitted_once_nothing_runs():
    """The watermark keeps pages free for running requests' next tokens: a request that fits the
    pool but not the pool less the watermark waits while others run, and is admitted once none
    does (it was never admitted: it held the head of the queue, and every request behind it,
    for ever)."""
    sched = make_scheduler(num_pages=200, budget=1024, enable_prefix_cache=False)  # watermark: 2 pages
    sched.add(make_request("a", prompt_len=5, max_new=3))
    run_step(sched)
    sched.add(make_request("big", prompt_len=199 * 4 - 1, max_new=1))  # 199 pages with its token
    sched.add(make_request("next", prompt_len=5, max_new=1))
    plan, _, _ = run_step(sched)
    assert [item.request_id for item in plan.items] == ["a"]  # big waits while a runs
    _, _, finished = run_step(sched)
    assert [f.request.request_id for f in finished] == ["a"]
    plan, _, finished = run_step(sched)
    assert [item.request_id for item in plan.items] == ["big"]
    assert [f.request.request_id for f in finished] == ["big"]
    plan, _, finished = run_step(sched)
    assert [f.request.request_id for f in finished] == ["next"]
    assert sched.num_used_pages == 0 and not sched.requests


def test_chunked_prefill_spans_cover_the_prompt():
    sched = make_scheduler(budget=4)
    sched.add(make_request("a", prompt_len=10, max_new=2))
    spans = []
    for _ in range(3):
        plan, outputs, _ = run_step(sched)
        spans.append((plan.items[0].start, len(plan.items[0].token_ids), plan.items[0].sample))
    assert spans == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert len(outputs) == 1


def test_abort_frees_pages_at_once():
    sched = make_scheduler()
    sched.add(make_request("a", max_new=20))
    run_step(sched)
    assert sched.num_used_pages > 0
    sched.abort("a")
    sched.check_integrity()
    assert sched.num_used_pages == 0 and not sched.requests
    assert not sched.has_work() and sched.schedule() is None


def test_abort_while_step_in_flight_ignores_its_result():
    sched = make_scheduler()
    sched.add(make_request("a"))
    plan = sched.schedule()
    sched.abort("a")
    outputs, finished = sched.update(plan, result(plan, {"a": (5, 0.0)}))
    assert outputs == [] and finished == []
    sched.check_integrity()


def test_images_gate_admission_and_map_to_spans():
    sched = make_scheduler(budget=6)
    image = ImageRef("m", "seg", 10, 1, token_offset=2, num_tokens=5)
    sched.add(make_request("a", prompt_len=9, images=[image]))
    assert sched.schedule() is None  # waiting for its embeddings
    sched.images_ready("a", [EmbedRun("m", 100, 5)])
    plan, _, _ = run_step(sched)
    assert [(s.row_offset, s.num_rows, s.dst_offset) for s in plan.items[0].embeds] == [(100, 4, 2)]
    plan, _, _ = run_step(sched)
    assert [(s.row_offset, s.num_rows, s.dst_offset) for s in plan.items[0].embeds] == [(104, 1, 0)]


def test_many_requests_keep_integrity():
    sched = make_scheduler(num_pages=12, budget=16)
    for i in range(10):
        sched.add(make_request(f"r{i}", prompt_len=3 + i, max_new=1 + i % 4))
    finished = 0
    for _ in range(100):
        if not sched.has_work():
            break
        _, _, done = run_step(sched)
        finished += len(done)
    assert finished == 10 and sched.num_used_pages == 0


def test_idle_check_catches_a_leaked_page_and_a_held_cached_page():
    """The scheduler actor's check once no request is left, in constant time whatever the cache
    holds: it passes after a run, and fails on a page in use that nobody caches (leaked) and on a
    cached page still referenced."""
    sched = make_scheduler()
    sched.add(make_request("a", prompt_len=9, max_new=3))
    while sched.has_work():
        run_step(sched)
    assert sched.idle and sched.cache.num_nodes == 2  # the prompt's two full pages stay cached
    sched.check_idle()
    leaked = sched.allocator.allocate(1)
    with pytest.raises(AssertionError, match="1 page.* in use, not cached"):
        sched.check_idle()
    sched.allocator.free(leaked)
    node = next(iter(sched.cache.root.children.values()))
    sched.cache.acquire([node])
    with pytest.raises(AssertionError, match="1 cached page.* held"):
        sched.check_idle()


# --- steps planned while the previous one is in flight ----------------------------------------


def test_next_step_feeds_back_the_pending_token():
    sched = make_scheduler()
    sched.add(make_request("a", prompt_len=5, max_new=4))
    first = sched.schedule()  # the prompt, samples token 1
    second = sched.schedule()  # planned before the first returns
    assert second.items[0].start == 5 and second.items[0].token_ids == [PENDING_TOKEN]
    assert second.items[0].sample
    assert sched.schedule() is None  # a pending token comes only from the step just before
    sched.update(first, result(first, {"a": (11, -0.1)}))
    sched.check_integrity()
    third = sched.schedule()  # token 11 is known now; token 2 is pending
    assert third.items[0].start == 6 and third.items[0].token_ids == [PENDING_TOKEN]
    sched.update(second, result(second, {"a": (12, -0.2)}))
    sched.update(third, result(third, {"a": (13, -0.3)}))
    assert sched.requests["a"].output_ids == [11, 12, 13]
    fourth = sched.schedule()
    assert fourth.items[0].token_ids == [13]
    sched.check_integrity()


def test_no_step_is_planned_past_max_new_tokens():
    sched = make_scheduler()
    sched.add(make_request("a", max_new=2))
    first, second = sched.schedule(), sched.schedule()
    assert second is not None and sched.schedule() is None  # token 2 is the last: nothing after it
    assert not sched.has_work()
    sched.update(first, result(first, {"a": (11, 0.0)}))
    _, finished = sched.update(second, result(second, {"a": (12, 0.0)}))
    assert [f.reason for f in finished] == ["length"]
    assert sched.num_used_pages == 0
    sched.check_integrity()


def test_a_stop_seen_late_wastes_one_step_and_frees_pages():
    sched = make_scheduler()
    request = make_request("a", max_new=10)
    request.eos_token_ids = [2]
    sched.add(request)
    first, second = sched.schedule(), sched.schedule()
    outputs, finished = sched.update(first, result(first, {"a": (2, 0.0)}))  # EOS
    assert [f.reason for f in finished] == ["stop"] and outputs[0].finish_reason == "stop"
    assert sched.num_used_pages == 0  # freed before the speculative step returns
    sched.check_integrity()
    assert sched.update(second, result(second, {"a": (9, 0.0)})) == ([], [])  # its token is dropped
    sched.add(make_request("b"))
    assert sched.schedule().finished_ids == ["a"]  # the worker drops a's state after both steps


def test_chunked_prefill_plans_ahead_with_known_tokens():
    sched = make_scheduler(budget=4)
    sched.add(make_request("a", prompt_len=10))
    plans = [sched.schedule() for _ in range(3)]
    assert [(p.items[0].start, len(p.items[0].token_ids)) for p in plans] == [(0, 4), (4, 4), (8, 2)]
    assert [p.items[0].sample for p in plans] == [False, False, True]
    assert PENDING_TOKEN not in [t for p in plans for t in p.items[0].token_ids]


# --- prefix cache -----------------------------------------------------------------------------


def _cache_chain(num_pages: int):
    """A prefix cache holding one chain of `num_pages` pages (no request holds them)."""
    from vlmd.core.prefix_cache import PrefixCache

    cache = PrefixCache(PageAllocator(num_pages))
    parent = cache.root
    for i, page in enumerate(cache.allocate(num_pages)):
        parent = cache.insert(parent, ((i,) * 4, ()), page)
    cache.release([*_path(parent)])
    return cache


def _path(node):
    path = []
    while node.key is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def test_prefix_cache_nodes_are_invisible_to_the_garbage_collector_and_freed_with_it():
    """A pass of the cyclic garbage collector holds the GIL for as long as the objects it tracks
    take to walk (35 to 100 ms in the scheduler on the device, with a large cache): the cache's
    nodes are not tracked, whatever their number. Their parent links are cycles the collector
    cannot see: dropping the cache, or evicting its pages, frees them all the same."""
    import gc
    import sys

    gc.collect()
    tracked, blocks = len(gc.get_objects()), sys.getallocatedblocks()
    cache = _cache_chain(5000)
    gc.collect()
    first = next(iter(cache.root.children.values()))
    assert not gc.is_tracked(cache.root) and not gc.is_tracked(first)
    assert len(gc.get_objects()) - tracked < 500  # not one (nor three) per node
    evicted = first
    while evicted.children:
        (evicted,) = evicted.children.values()
    assert cache.evict(1) == 1 and evicted.parent is None  # the leaf, its cycle broken
    del cache, first, evicted
    gc.collect()
    assert sys.getallocatedblocks() - blocks < 500  # a node and its key are 3 blocks: 15000 leaked


# --- embed index ------------------------------------------------------------------------------


def test_arena_first_fit_and_coalescing():
    arena = RowArena(10)
    a, b, c = arena.allocate(3), arena.allocate(3), arena.allocate(3)
    assert (a, b, c) == (0, 3, 6) and arena.allocate(2) is None
    arena.free(b, 3)
    arena.free(a, 3)
    arena.check_integrity()
    assert arena.allocate(6) == 0


def test_index_hit_pins_and_lru_evicts_unpinned_only():
    index = EmbedIndex(capacity_images=2, num_rows=100)
    index.insert("a", 10, pin_for="r1")
    index.insert("b", 10, pin_for="r2")
    assert index.insert("c", 10, pin_for="r3") is None  # both pinned
    index.unpin("r1", ["a"])
    assert index.insert("c", 10, pin_for="r3") is not None  # evicts "a"
    assert "a" not in index and index.num_evictions == 1
    index.check_integrity()


def test_index_lookup_refreshes_lru():
    index = EmbedIndex(capacity_images=2, num_rows=100)
    index.insert("a", 10, pin_for="r")
    index.insert("b", 10, pin_for="r")
    index.unpin("r", ["a", "b"])
    assert index.lookup("a", pin_for="r2") is not None
    index.unpin("r2", ["a"])
    index.insert("c", 10, pin_for="r3")
    assert "a" in index and "b" not in index


def test_index_evicts_to_make_room_in_the_arena():
    index = EmbedIndex(capacity_images=10, num_rows=30)
    for name in "abc":
        index.insert(name, 10, pin_for="r")
    index.unpin("r", ["a", "b"])
    entry = index.insert("d", 20, pin_for="r")
    assert entry is not None and entry.row_offset == 0
    index.check_integrity()


def test_prompt_chunks_beside_decode_rows_are_capped():
    """--decode_step_prefill_tokens 3: while a request decodes, a step carries at most 3 prompt
    tokens beside it; with nobody decoding, a prompt takes the whole budget."""
    sched = make_scheduler(num_pages=32, budget=16, decode_step_prefill_tokens=3, enable_prefix_cache=False)
    sched.add(make_request("a", prompt_len=10, max_new=20))
    plan, _, _ = run_step(sched)
    assert [len(i.token_ids) for i in plan.items] == [10]  # nobody decodes: the whole budget
    sched.add(make_request("b", prompt_len=11, max_new=2))
    sched.add(make_request("c", prompt_len=4, max_new=2))
    chunks = []
    while sched.requests["b"].num_computed < 11:
        plan, _, _ = run_step(sched)
        spans = {i.request_id: len(i.token_ids) for i in plan.items}
        assert spans["a"] == 1  # the decode row runs every step
        assert sum(n for r, n in spans.items() if r != "a") <= 3
        chunks.append(spans.get("b", 0))
    assert chunks == [3, 3, 3, 2]  # b's 11 tokens 3 at a time; c waits behind them
    assert sched.stats.capped_steps == 4  # the last: b's 2 tokens and c's first
    plan, _, _ = run_step(sched)
    assert {i.request_id: len(i.token_ids) for i in plan.items} == {"a": 1, "b": 1, "c": 3}


def test_without_the_cap_a_prompt_fills_the_budget_beside_decode_rows():
    sched = make_scheduler(num_pages=32, budget=16, enable_prefix_cache=False)
    sched.add(make_request("a", prompt_len=10, max_new=20))
    run_step(sched)
    sched.add(make_request("b", prompt_len=11, max_new=2))
    plan, _, _ = run_step(sched)
    assert {i.request_id: len(i.token_ids) for i in plan.items} == {"a": 1, "b": 11}
    assert sched.stats.capped_steps == 0


def test_side_steps_take_the_prompts_while_requests_decode():
    """side_prefill: while a request decodes, a new prompt goes in a side step, chunk after chunk
    (the step budget), and never in the decode steps; its request is in no other step until the
    side step returns; with nothing decoding, prompts ride in the main steps as before."""
    sched = make_scheduler(num_pages=32, budget=8, side_prefill=True, enable_prefix_cache=False)
    sched.add(make_request("a", prompt_len=5, max_new=20))
    assert sched.schedule_side() is None  # nothing decodes: the prompt goes in a main step
    plan, _, _ = run_step(sched)
    assert [len(i.token_ids) for i in plan.items] == [5]
    sched.add(make_request("b", prompt_len=11, max_new=2))
    side = sched.schedule_side()
    assert [(i.request_id, len(i.token_ids), i.sample) for i in side.items] == [("b", 8, False)]
    assert side.side and [n.request_id for n in side.new_requests] == ["b"]
    assert sched.schedule_side() is None  # one side step at a time
    for _ in range(2):  # the decode steps meanwhile carry "a" alone
        plan, _, _ = run_step(sched)
        assert [(i.request_id, len(i.token_ids)) for i in plan.items] == [("a", 1)]
    sched.abort("b")  # its pages wait for the side step, which may still write them
    used = sched.allocator.num_used
    assert "b" not in sched.requests and sched.num_used_pages > 0
    sched.check_integrity()
    sched.update(side, result(side, {}))
    assert sched.allocator.num_used < used and sched.side is None
    sched.check_integrity()
    plan = sched.schedule()
    assert plan.finished_ids == ["b"]  # the workers drop it once its side step has ended
    sched.add(make_request("c", prompt_len=3, max_new=2))
    side = sched.schedule_side()
    assert [(i.request_id, len(i.token_ids), i.sample) for i in side.items] == [("c", 3, True)]
    outputs, _ = sched.update(side, result(side, {"c": (9, -0.1)}))
    assert [(o.request_id, o.token_ids) for o in outputs] == [("c", [9])]
    sched.check_integrity()
    assert sched.stats.side_steps == 2


def test_prefill_sms_needs_one_rank_and_no_prompt_cap(tmp_path):
    import argparse

    from vlmd.config import ConfigError, add_serve_arguments, build_server_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    def args(*flags: str):
        return build_server_args(parser.parse_args(["--model_dir", str(tmp_path), *flags]), environ={})

    assert args().prefill_sms == 0
    assert args("--prefill_sms", "48").prefill_sms == 48
    for flags in (("-1",), ("48", "--tp", "2"), ("48", "--decode_step_prefill_tokens", "256")):
        with pytest.raises(ConfigError, match="prefill_sms"):
            args("--prefill_sms", *flags)
    assert args().log_stalls_ms == 0 and args("--log_stalls_ms", "15").log_stalls_ms == 15
    with pytest.raises(ConfigError, match="log_stalls_ms"):
        args("--log_stalls_ms", "-1")


def test_the_flag_reaches_the_server_args_and_must_be_positive(tmp_path):
    import argparse

    from vlmd.config import ConfigError, add_serve_arguments, build_server_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    def args(*flags: str):
        return build_server_args(parser.parse_args(["--model_dir", str(tmp_path), *flags]), environ={})

    assert args().decode_step_prefill_tokens is None
    assert args("--decode_step_prefill_tokens", "256").decode_step_prefill_tokens == 256
    with pytest.raises(ConfigError, match="decode_step_prefill_tokens"):
        args("--decode_step_prefill_tokens", "0")
