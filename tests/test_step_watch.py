"""StepWatch: when a step is overdue (--step_timeout), without a clock or a server."""

from __future__ import annotations

from vlmd.core.step_watch import FIRST_OF_KIND_TIMEOUT_S, StepWatch
from vlmd.messages import StepItem, StepPlan


def plan(step_id: int, num_tokens: int) -> StepPlan:
    return StepPlan(step_id, [StepItem("r", 0, [1] * num_tokens)])


def test_nothing_in_flight_is_never_overdue():
    watch = StepWatch(5.0)
    assert watch.deadline() is None and watch.overdue(1e9) is None


def test_the_first_step_of_each_kind_may_compile_then_the_timeout_applies():
    watch = StepWatch(5.0)
    watch.sent(plan(1, 8), now=0.0)  # the first prefill
    assert watch.overdue(5.0 + 1) is None
    assert watch.overdue(FIRST_OF_KIND_TIMEOUT_S).step_id == 1
    watch.returned(1, now=100.0)
    watch.sent(plan(2, 1), now=100.0)  # the first decode-only step: its kernels are new too
    assert watch.overdue(200.0) is None
    watch.returned(2, now=200.0)
    watch.sent(plan(3, 1), now=200.0)
    watch.sent(plan(4, 8), now=200.5)
    assert watch.overdue(204.9) is None
    overdue = watch.overdue(205.0)
    assert overdue.step_id == 3 and overdue.running_s == 5.0 and overdue.allowed_s == 5.0


def test_a_step_counts_from_when_the_one_before_it_came_back():
    watch = StepWatch(5.0)
    for step_id, tokens in ((1, 8), (2, 1)):
        watch.sent(plan(step_id, tokens), now=0.0)
        watch.returned(step_id, now=1.0)
    watch.sent(plan(3, 1), now=10.0)
    watch.sent(plan(4, 1), now=10.1)  # planned while step 3 runs
    watch.returned(3, now=14.0)
    assert watch.deadline() == 19.0  # step 4 started once step 3 was done, not when it was sent
    assert watch.overdue(18.9) is None and watch.overdue(19.0).step_id == 4
