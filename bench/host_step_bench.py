"""Host work per decode step, scheduler and worker bookkeeping, no model: at batch 256, how it
grows with the context (1k, 4k, 16k tokens). The model's own time is the GPU's; this is what the
host adds every step, and it should not grow with the length of what is already cached.

    python bench/host_step_bench.py [--batch 256] [--contexts 1024 4096 16384] [--steps 64] [--repeats 3]
    python bench/host_step_bench.py --tiny   # small: checks the script

Baseline, in the same run (runs of its own): the worker's bookkeeping as it was, page tables as
host lists concatenated into the CSR indices every step.

Per step: `Scheduler.schedule` (admission, page allocation, prefix-cache bookkeeping), the
worker's bookkeeping (`step_layout`: page tables updated and gathered into the CSR page indices
on the device, here torch's meta device: the host's share of it; the host lists of FlashInfer's plan:
`PagedKVMetadata`), and `Scheduler.update` with one sampled token per request. Every request
decodes for the whole run; the figure is the mean over `--steps` steps, which includes the steps
on which pages fill and are offered to the prefix cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.kernels.attention import BatchLayout
from vlmd.kernels.flashinfer_backend import PagedKVMetadata
from vlmd.kernels.page_table import DevicePageTables
from vlmd.messages import SamplingParams, StepResult
from vlmd.runner import step_layout

PAGE_SIZE = 16


def measure(batch: int, context: int, steps: int, baseline: bool = False) -> dict:
    """Mean ms per decode step of each part; with `baseline`, the worker's bookkeeping is the old
    host lists instead of the device page tables."""
    num_pages = batch * (-(-(context + steps + 8) // PAGE_SIZE)) + 64
    scheduler = Scheduler(
        SchedulerConfig(num_pages, PAGE_SIZE, max_num_batched_tokens=1 << 30, max_running_requests=batch)
    )
    # The meta device: every torch op is dispatched as on a GPU, none computes, so what is timed is
    # the host's share (on a GPU the gather runs there, queued behind the step before).
    tables = DevicePageTables(torch.device("meta"))
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):  # distinct prompts: every page is cached, none shared
        scheduler.add(Request(f"r{i}", [(i * 7919 + j) % 50_000 for j in range(context)], params))
    times = {"schedule": 0.0, "worker": 0.0, "update": 0.0}
    lists: dict[str, list[int]] = {}  # the baseline: page tables kept as host lists

    def step(timed: bool) -> None:
        started = time.perf_counter()
        plan = scheduler.schedule()
        planned = time.perf_counter()
        if baseline:
            lists_bookkeeping(plan)
        else:
            for new in plan.new_requests:
                tables.add(new.request_id)
            layout = step_layout(tables, plan.items, PAGE_SIZE)
            PagedKVMetadata.from_layout(layout, PAGE_SIZE).to_tensor()
        laid_out = time.perf_counter()
        ids = [item.request_id for item in plan.items if item.sample]
        scheduler.update(plan, StepResult(plan.step_id, ids, [5] * len(ids), [0.0] * len(ids)))
        if timed:
            times["schedule"] += planned - started
            times["worker"] += laid_out - planned
            times["update"] += time.perf_counter() - laid_out

    def lists_bookkeeping(plan) -> None:
        """The worker's bookkeeping before the device page tables: lists, concatenated each step."""
        qo_indptr, kv_lens, tables = [0], [], []
        for item in plan.items:
            table = lists.setdefault(item.request_id, [])
            table += item.new_pages
            qo_indptr.append(qo_indptr[-1] + len(item.token_ids))
            kv_lens.append(item.start + len(item.token_ids))
            tables.append(table)
        layout = BatchLayout.from_page_tables(qo_indptr, kv_lens, tables, PAGE_SIZE)
        PagedKVMetadata.from_layout(layout, PAGE_SIZE).to_tensor()

    step(timed=False)  # the prefill
    gc.collect()
    gc.freeze()  # the state built so far: out of the cyclic collector's traversals, as in the actor
    try:
        for _ in range(steps):
            step(timed=True)
    finally:
        gc.unfreeze()
    assert all(len(r.output_ids) == steps + 1 for r in scheduler.running), "not every request decoded"
    return {"context": context} | {k: v / steps * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per context; the fastest is reported")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.contexts, args.steps, args.repeats = 8, [64, 256], 8, 1
    measure(args.batch, args.contexts[0], args.steps)  # warm-up: imports, allocator, caches
    runs: dict[tuple[int, bool], list[dict]] = {}
    for _ in range(args.repeats):  # contexts interleaved, so that drift in the machine hits each alike
        for context in args.contexts:
            for baseline in (False, True):
                runs.setdefault((context, baseline), []).append(
                    measure(args.batch, context, args.steps, baseline)
                )
    rows = []
    for context in args.contexts:  # the machine's other work only ever adds: the fastest run counts
        row = min(runs[context, False], key=lambda r: r["schedule"] + r["worker"] + r["update"])
        row["worker_lists"] = min(r["worker"] for r in runs[context, True])
        rows.append(row)
    print(
        f"Host work per decode step at batch {args.batch}, ms (mean over {args.steps} steps, "
        f"the fastest of {args.repeats} runs)\n"
    )
    print(
        "| context | schedule | worker bookkeeping | update | total | vs the first "
        "| baseline: worker bookkeeping with host lists |"
    )
    print("|---|---|---|---|---|---|---|")
    first = None
    for row in rows:
        total = row["schedule"] + row["worker"] + row["update"]
        first = first or total
        row["total"] = total
        print(
            f"| {row['context']} | {row['schedule']:.2f} | {row['worker']:.2f} | {row['update']:.2f} "
            f"| {total:.2f} | {total / first:.2f}x | {row['worker_lists']:.2f} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"batch": args.batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
