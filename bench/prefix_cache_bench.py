"""The scheduler's loop with a large prefix cache (issue 16, item 1): what the cache costs the loop
that plans every step, whatever runs. On an H100 a pass of the garbage collector over the
scheduler's objects held its loop 35 to 100 ms, and the check it made each time the server went
idle walked the whole cache; the next plan waited for both.

The scheduler (`vlmd.core.scheduler.Scheduler`, no actor, no model) serves `--requests` 13-tile
image prompts of 3,300 tokens one after another (each planned, its result applied, then the idle
check), filling the cache with their pages. What start-up made is frozen out of the collector
first, as the actors do (`vlmd.actors.launch.freeze_start_up`). Then, once full:

- a full pass of the garbage collector (`gc.collect()`), median of `--repeats`;
- the idle check the scheduler actor makes (`check_idle`, or `check_integrity` where a commit
  has no `check_idle`), median of `--repeats`;
- the objects the collector tracks (`len(gc.get_objects())`).

    python bench/prefix_cache_bench.py [--requests 300] [--repeats 5]

Run it on two commits in one command to compare them (bench/RESULTS.md gives the command).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import random
import statistics
import subprocess
import time

from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.messages import EmbedRun, ImageRef, SamplingParams, StepResult

PROMPT_TOKENS = 3300  # a 13-tile image (13 x 256 rows) and its text
PAGE_SIZE = 16


def serve_one(sched: Scheduler, index: int, rng: random.Random) -> None:
    """One image prompt planned, prefilled (its result applied) and finished."""
    image = ImageRef(f"md5-{index}", "segment", 10, 13, token_offset=20, num_tokens=13 * 256)
    request = Request(
        f"r{index}",
        [rng.randrange(1000) for _ in range(PROMPT_TOKENS)],
        SamplingParams(max_new_tokens=1),
        images=[image],
    )
    sched.add(request)
    sched.images_ready(request.request_id, [EmbedRun(image.md5, 0, image.num_tokens)])
    while (plan := sched.schedule()) is not None:
        ids = [item.request_id for item in plan.items if item.sample]
        sched.update(plan, StepResult(plan.step_id, ids, [5] * len(ids), [0.0] * len(ids)))
    assert sched.idle


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"# prefix_cache_bench {datetime.date.today()} {platform.processor() or platform.machine()}")
    num_pages = -(-PROMPT_TOKENS // PAGE_SIZE) * args.requests + 64
    sched = Scheduler(SchedulerConfig(num_pages=num_pages, page_size=PAGE_SIZE))
    rng = random.Random(0)
    gc.collect()
    gc.freeze()
    idle_check = getattr(sched, "check_idle", sched.check_integrity)
    for index in range(args.requests):
        serve_one(sched, index, rng)
        idle_check()
    print("| commit | cached pages | tracked objects | full gc.collect() ms | idle check ms |")
    print("|---|---|---|---|---|")
    print(
        f"| {commit.strip() or '?'} | {sched.cache.num_nodes} | {len(gc.get_objects())} "
        f"| {median_ms(gc.collect, args.repeats):.2f} | {median_ms(idle_check, args.repeats):.3f} |"
    )


if __name__ == "__main__":
    main()
