"""The runner with steps planned ahead: launching step N+1 before step N is collected (its
pending tokens fed back on the device) gives exactly the tokens of one step at a time."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vlmd.actors.steps import serve_steps
from vlmd.actors.worker import make_runner
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.messages import PENDING_TOKEN, FlushStep, SamplingParams, StepResult
from vlmd.models.config import InternVLArch
from vlmd.models.loader import load_language_model
from vlmd.runner import run_in_process

PAGE_SIZE = 4
NUM_PAGES = 256


@pytest.fixture(scope="module")
def lm(model_dir):
    arch = InternVLArch.from_model_dir(model_dir)
    return load_language_model(model_dir, torch.float32, torch.device("cpu")), arch


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compared token for token must round alike: a BLAS that splits its sums over however
    many threads the machine's load leaves it may not (a seeded draw then flips near a boundary)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(lm, requests: list[Request], max_in_flight: int, budget: int = 64):
    model, arch = lm
    runner = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE, max_num_batched_tokens=budget))
    for request in requests:
        scheduler.add(request)
    out: dict[str, list[tuple[int, float]]] = {r.request_id: [] for r in requests}
    num_pending_fed = 0
    for plan, outputs in run_in_process(scheduler, runner, max_in_flight):
        scheduler.check_integrity()
        num_pending_fed += sum(item.token_ids[-1] == PENDING_TOKEN for item in plan.items)
        for token_out in outputs:
            out[token_out.request_id] += zip(token_out.token_ids, token_out.logprobs, strict=True)
    assert not scheduler.requests and scheduler.num_used_pages == 0
    return out, num_pending_fed


def make_requests(eos: int | None = None) -> list[Request]:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 990, (n,), generator=generator).tolist() for n in (7, 19, 3, 12)]
    params = [
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=9, do_sample=True, temperature=0.9, top_k=50, seed=3),
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=10, repetition_penalty=1.3, presence_penalty=0.5, top_logprobs=3),
    ]
    return [
        Request(f"r{i}", prompt, p, eos_token_ids=[eos] if eos is not None else [])
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
    ]


@pytest.mark.parametrize("budget", [64, 8])  # 8: prompts prefill in chunks
def test_steps_planned_ahead_give_the_same_tokens(lm, budget):
    want, fed_serial = generate(lm, make_requests(), max_in_flight=1, budget=budget)
    got, fed_ahead = generate(lm, make_requests(), max_in_flight=2, budget=budget)
    assert got == want
    assert fed_serial == 0 and fed_ahead > 10  # the overlapped run did feed tokens back
    assert [len(v) for v in want.values()] == [12, 9, 1, 10]


def test_a_stop_token_seen_late_ends_the_request_the_same(lm):
    """An EOS that a greedy request produces: the overlapped run computes one step past it,
    drops that token, and still frees everything."""
    reference, _ = generate(lm, make_requests(), max_in_flight=1)
    r3_tokens = [token for token, _ in reference["r3"]]
    eos = r3_tokens[4]  # r3's 5th greedy token becomes the end of sequence
    want, _ = generate(lm, make_requests(eos), max_in_flight=1)
    got, _ = generate(lm, make_requests(eos), max_in_flight=2)
    assert got == want
    assert len(got["r3"]) == r3_tokens.index(eos) + 1 < len(r3_tokens)
    assert len(got["r0"]) == 12  # r0 ignores EOS


# --- the worker's loop: a step is held until the next plan or a FlushStep --------------------------


class _FakeChannel:
    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list = []

    async def recv(self):
        return await self.inbox.get()

    def send(self, msg) -> None:
        self.sent.append(msg)


def test_worker_holds_each_step_until_the_next_plan_or_a_flush(lm):
    model, arch = lm

    def request() -> Request:
        return Request("a", list(range(5, 17)), SamplingParams(max_new_tokens=3, ignore_eos=True))

    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    scheduler.add(request())
    first, second = scheduler.schedule(), scheduler.schedule()  # the second feeds back a pending token

    async def scenario() -> list[list[StepResult]]:
        channel = _FakeChannel()
        runner = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
        loop = asyncio.create_task(serve_steps(runner, channel, send_results=True, overlap=True))
        seen = []
        for msg in (first, second, FlushStep()):
            await channel.inbox.put(msg)
            for _ in range(20):  # let the loop take the message
                await asyncio.sleep(0)
            seen.append(list(channel.sent))
        loop.cancel()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == []  # the first step is held: its plan came alone
    assert [r.step_id for r in seen[1]] == [first.step_id]  # reported once the next one launched
    assert [r.step_id for r in seen[2]] == [first.step_id, second.step_id]  # the flush gives the last
    reference = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    reference.add(request())
    serial = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    want = [out.token_ids[0] for _, outputs in run_in_process(reference, serial, 1) for out in outputs]
    assert [r.token_ids[0] for r in seen[2]] == want[:2]


def test_host_watch_logs_only_slow_work_and_only_where_enabled(caplog):
    """On a GPU the worker logs host work long enough to delay a step's launch (issue 16's
    latency spikes), naming what it was; quick work and the CPU (where launching is computing)
    log nothing."""
    import logging
    import time

    from vlmd.actors.launch import SLOW_HOST_S, HostWatch

    caplog.set_level(logging.INFO, logger="vlmd.worker")
    for enabled, seconds in ((True, 0.0), (True, 2 * SLOW_HOST_S), (False, 2 * SLOW_HOST_S)):
        with HostWatch(enabled).timed("launching step", 7):
            time.sleep(seconds)
    # A lower threshold (--log_stalls_ms): work under SLOW_HOST_S but over it is logged.
    with HostWatch(True, SLOW_HOST_S / 5).timed("planning side step", 8):
        time.sleep(SLOW_HOST_S / 2)
    slow = [r.getMessage() for r in caplog.records if "slow host work" in r.getMessage()]
    assert [m.split(" took ")[0] for m in slow] == [
        "slow host work: launching step 7",
        "slow host work: planning side step 8",
    ], slow


def test_worker_logs_a_decode_step_launched_late(lm, caplog):
    """With --log_stalls_ms, a step launched that long after a decode step (no FlushStep between)
    is logged with both steps' ids: the scheduler or the host held the tokens. A step after a
    prefill, or after a flush (the worker idled), is not a stall. A second line gives what the
    worker did since the decode step's launch: the launch itself, the late plan's arrival (and
    when it was sent), the late step's own launch not yet."""
    import logging
    import re
    import time

    model, arch = lm
    caplog.set_level(logging.INFO, logger="vlmd.worker")
    scheduler = Scheduler(SchedulerConfig(NUM_PAGES, PAGE_SIZE))
    scheduler.add(Request("a", list(range(5, 17)), SamplingParams(max_new_tokens=8, ignore_eos=True)))

    async def scenario() -> None:
        channel = _FakeChannel()
        runner = make_runner(model, arch, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
        loop = asyncio.create_task(serve_steps(runner, channel, True, overlap=False, stall_s=0.05))
        # prefill, (late) decode, late decode, flush, late decode
        for msg, wait_s in ((None, 0), (None, 0.08), (None, 0.08), (FlushStep(), 0), (None, 0.08)):
            await asyncio.sleep(wait_s)
            if msg is None:
                msg = scheduler.schedule()
                msg.sent_at = time.monotonic()  # as the scheduler actor stamps it
                plans.append(msg)
            await channel.inbox.put(msg)
            while not channel.inbox.empty() or (isinstance(msg, FlushStep) is False and not channel.sent):
                await asyncio.sleep(0.001)
            for result in channel.sent:
                scheduler.update(next(p for p in plans if p.step_id == result.step_id), result)
            channel.sent.clear()
        loop.cancel()

    plans = []
    asyncio.run(scenario())
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stall:")]
    assert len(stalls) == 1, stalls
    assert stalls[0].startswith(f"stall: step {plans[2].step_id} launched ")
    assert stalls[0].endswith(f" ms after decode step {plans[1].step_id}")
    timelines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stall timeline")]
    assert len(timelines) == 1, timelines
    prefix = f"stall timeline since decode step {plans[1].step_id}: "
    assert timelines[0].startswith(prefix), timelines
    events = timelines[0][len(prefix) :].split(", ")
    offsets = [float(re.match(r"\+(-?[0-9.]+) ", event).group(1)) for event in events]
    # The timeline starts as the decode step's launch does (a loaded machine may take a few ms).
    assert offsets == sorted(offsets) and 0 <= offsets[0] < 20, events
    assert events[0].startswith(f"+{offsets[0]:.1f} launching step {plans[1].step_id} ")
    assert any(f"laying out and planning step {plans[1].step_id}" in event for event in events), events
    # The late plan came ~80 ms later, and was sent about then (the test sends it at once).
    (arrival,) = [e for e in events if e.split(" ", 1)[1].startswith(f"plan {plans[2].step_id} in (sent +")]
    received = float(arrival.split(" ")[0])
    sent = float(arrival.split("(sent +")[1].rstrip(")"))
    assert 60 <= sent <= received < sent + 40, arrival
    assert not any(f"launching step {plans[2].step_id}" in event for event in events), events


def test_stall_log_writes_every_threads_stack_while_a_launch_is_held(tmp_path, caplog, monkeypatch):
    """--log_stalls_ms: a launch that takes the threshold gets every thread's Python stack written
    at that moment (faulthandler, which needs no GIL), the other threads' included: the launch's
    own frame and a second thread's both show. A quick launch writes none, nor a prompt's, and
    after STACK_DUMPS slow ones no more are written."""
    import logging
    import threading
    import time

    from vlmd.actors import steps

    monkeypatch.setattr(steps, "STACK_DUMPS", 2)
    caplog.set_level(logging.INFO, logger="vlmd.worker")
    release = threading.Event()

    def other_thread_work() -> None:  # stands for a hosted ViT's thread
        release.wait(10)

    def held_launch() -> None:
        time.sleep(0.25)

    other = threading.Thread(target=other_thread_work)
    other.start()
    dumps = tmp_path / "stacks.txt"
    try:
        with dumps.open("w") as dump_file:
            stalls = steps.StallLog(0.05, torch.device("cpu"), dump_file=dump_file)
            with stalls.launch(1, decoding=True):
                pass  # quick: nothing written
            with stalls.launch(2, decoding=False):
                held_launch()  # a prompt's launch, slow anyway: nothing written
            dump_file.flush()
            assert dumps.read_text() == ""
            for step_id in (3, 4, 5):
                with stalls.launch(step_id, decoding=True):
                    held_launch()
    finally:
        release.set()
        other.join()
    text = dumps.read_text()
    assert text.count("Timeout (") == 2, text  # the third slow launch: no dumps left
    assert "held_launch" in text and "other_thread_work" in text
    logged = [r.getMessage() for r in caplog.records if "stacks" in r.getMessage()]
    assert [m.split(" are on ")[0] for m in logged] == [
        "stall: the threads' stacks 50 ms into launching step 3",
        "stall: the threads' stacks 50 ms into launching step 4",
    ]


class _PartsRunner:
    """A runner stand-in for `SideSteps`: a side step of `num_parts` parts, each queued by one
    `advance_side`; a launched step whose tokens come after `polls` looks."""

    def __init__(self, num_parts: int) -> None:
        self.num_parts = num_parts
        self.queued = 0

    def launch_side(self, plan):
        from types import SimpleNamespace

        return SimpleNamespace(plan=plan, parts=iter(()))

    def advance_side(self, step) -> bool:
        self.queued += 1
        if self.queued == self.num_parts:
            step.parts = None
        return step.parts is None

    @staticmethod
    def side_done(step) -> bool:
        return False  # never ends here: only the parts matter

    @staticmethod
    def copied(step) -> bool:
        step.polls -= 1
        return step.polls < 0


def test_a_side_step_all_queued_is_only_looked_at_not_timed_as_a_part():
    """Once every part is queued, the polls that wait for the side step's end queue nothing and
    note nothing on the stall timeline (whose room they would fill, hiding the plans taken in)."""
    import time

    from vlmd.actors.launch import HostWatch, Timeline
    from vlmd.actors.steps import SideSteps
    from vlmd.messages import StepPlan

    runner, timeline = _PartsRunner(num_parts=2), Timeline()
    timeline.restart(time.monotonic())
    side = SideSteps(runner, _FakeChannel(), True, HostWatch(False, timeline=timeline))
    side.launch(StepPlan(1, [], side=True))
    for _ in range(6):
        side.poll()
    assert runner.queued == 2
    assert timeline.describe().count("queuing a part of side step 1") == 2


def test_side_steps_queue_parts_while_tokens_are_awaited_and_never_before_a_waiting_plan():
    """A side step's parts are queued while the worker would only wait for a decode step's
    tokens; a plan that waits is taken in without a part queued first once one was queued since
    the last plan (each part delays it: on an H100 the decode plan waited 3 to 4 ms behind one);
    plans that come back to back with none queued in between still get one part each, and while
    no plan waits the parts go on."""
    from types import SimpleNamespace

    from vlmd.actors.launch import HostWatch
    from vlmd.actors.steps import SideSteps
    from vlmd.messages import StepPlan

    async def scenario() -> list[int]:
        channel, runner = _FakeChannel(), _PartsRunner(num_parts=100)
        side = SideSteps(runner, channel, True, HostWatch(False))
        side.launch(StepPlan(1, [], side=True))  # its first part, at once
        seen = [runner.queued]
        side.fill_wait(SimpleNamespace(polls=3))  # tokens on the host at the fourth look
        seen.append(runner.queued)
        await channel.inbox.put(StepPlan(2, []))
        await side.next_message()  # parts were queued since the last plan: none first
        seen.append(runner.queued)
        await channel.inbox.put(StepPlan(3, []))
        await side.next_message()  # none since the last plan: one first
        seen.append(runner.queued)
        waiting = asyncio.ensure_future(side.next_message())
        await asyncio.sleep(0.02)  # no plan meanwhile: parts go on
        seen.append(runner.queued)
        await channel.inbox.put(StepPlan(4, []))
        await waiting
        return seen

    first, after_wait, after_plan, after_second, meanwhile = asyncio.run(scenario())
    assert (first, after_wait, after_plan, after_second) == (1, 4, 4, 5)
    assert meanwhile > after_second + 5
