"""What a prefill chunk costs the requests that decode beside it (issue 16, item 1).

While images arrive, their prompts (256 rows per tile: 3,328 tokens for a 13-tile image) are
prefilled in chunks that ride in the same steps as the running requests' decode rows, so a
decoding stream's inter-token latency is the time of a step with a chunk in it. A decode step
reads every weight once and is bound by memory bandwidth; a chunk of K prompt rows multiplies the
same weights, and while K is small that work hides under the weight reads. This bench measures,
on the InternVL3-8B shape (Qwen2-7B, random bf16 weights), for each chunk size K: the step time
with `batch` decode rows and a K-token chunk of queued 3,328-token prompts (the step budget set
to batch + K), against the decode step with no chunk; and the prompt tokens per second it gives,
against the prefill rate of whole 8,192-token steps with nobody decoding.

    python bench/mixed_step_bench.py [--batch_sizes 1 16] [--chunks 0 128 256 512 1024 2048]
    python bench/mixed_step_bench.py --tiny   # a tiny float32 model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import PAGE_SIZE, Step, model_shape, run_steps  # noqa: E402
from layout_bench import random_hub_state  # noqa: E402

from vlmd.actors.worker import make_runner  # noqa: E402
from vlmd.core.page_allocator import pages_for  # noqa: E402
from vlmd.core.request import Request  # noqa: E402
from vlmd.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from vlmd.messages import SamplingParams  # noqa: E402
from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.loader import language_model_from_state_dict  # noqa: E402

IMAGE_PROMPT = {"full": 3328, "tiny": 96}  # a 13-tile image's rows (+ a little text on the GPU)
FULL_STEP = 8192  # the server's default step budget (--max_num_batched_tokens)
log = logging.getLogger("mixed_step_bench")


def measure_steps(lm, arch, batch: int, chunk: int, args) -> dict:
    """Median ms of the steps in which all `batch` requests decode beside a `chunk`-token prompt
    chunk (chunk 0: the decode steps alone), and how many such steps were timed."""
    prompt_len = IMAGE_PROMPT["tiny" if args.tiny else "full"]
    budget = batch + chunk if chunk else FULL_STEP  # no chunk: no prompts queued beside the rows
    num_prompts = 0 if chunk == 0 else -(-args.steps * chunk // prompt_len) + 1
    # The decode rows prefill in the same small steps first; they decode until the chunks are over.
    warmup_steps = -(-batch * args.prompt_len // (chunk or FULL_STEP))
    decode_len = warmup_steps + (args.steps if chunk == 0 else -(-num_prompts * prompt_len // chunk)) + 8
    num_pages = batch * pages_for(args.prompt_len + decode_len, PAGE_SIZE)
    num_pages += num_prompts * pages_for(prompt_len + 1, PAGE_SIZE) + 8
    graphs = 0 if args.tiny else 64
    runner = make_runner(lm, arch, num_pages=num_pages, page_size=PAGE_SIZE, graph_max_batch_size=graphs)
    scheduler = Scheduler(
        SchedulerConfig(num_pages, PAGE_SIZE, max_num_batched_tokens=budget, enable_prefix_cache=False)
    )
    gen = torch.Generator().manual_seed(batch * 100_003 + chunk)
    vocab = arch.vocab_size - 16
    decode_params = SamplingParams(max_new_tokens=decode_len, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        scheduler.add(Request(f"decode-{i}", ids, decode_params))
    prompts_added = False

    def add_prompts(step: Step) -> None:
        """Once every decode row is past its prefill, queue the prompts."""
        nonlocal prompts_added
        if not prompts_added and sum(len(item.token_ids) == 1 for item in step.plan.items) == batch:
            add_prompts_to(scheduler, num_prompts, prompt_len, vocab, gen)
            prompts_added = True

    steps = run_steps(runner, scheduler, on_step=add_prompts)
    chunk_tokens = [
        sum(len(item.token_ids) for item in s.plan.items if len(item.token_ids) > 1) for s in steps
    ]
    decode_rows = [sum(len(item.token_ids) == 1 for item in s.plan.items) for s in steps]
    wanted = [
        s
        for s, rows, tokens in zip(steps, decode_rows, chunk_tokens, strict=True)
        if rows == batch and (tokens == chunk if chunk else tokens == 0)
    ][2:]  # not the first ones: they wait for the steps before them
    assert wanted, f"no step ran {batch} decode rows beside a {chunk}-token chunk"
    scheduler.check_integrity()
    step_ms = statistics.median(s.interval_s for s in wanted) * 1e3
    del runner  # its KV cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"batch": batch, "chunk": chunk, "step_ms": step_ms, "steps": len(wanted)}


def prefill_only(lm, arch, args) -> float:
    """Prompt tokens per second of whole FULL_STEP-token steps with nobody decoding."""
    prompt_len = IMAGE_PROMPT["tiny" if args.tiny else "full"]
    budget = 512 if args.tiny else FULL_STEP
    num_prompts = -(-args.steps * budget // prompt_len) + 1
    num_pages = num_prompts * pages_for(prompt_len + 1, PAGE_SIZE) + 8
    runner = make_runner(lm, arch, num_pages=num_pages, page_size=PAGE_SIZE, graph_max_batch_size=0)
    scheduler = Scheduler(
        SchedulerConfig(num_pages, PAGE_SIZE, max_num_batched_tokens=budget, enable_prefix_cache=False)
    )
    add_prompts_to(scheduler, num_prompts, prompt_len, arch.vocab_size - 16, torch.Generator().manual_seed(7))
    full = [s for s in run_steps(runner, scheduler) if sum(len(i.token_ids) for i in s.plan.items) == budget]
    del runner, scheduler
    return budget / statistics.median(s.interval_s for s in full[1:] or full)


def add_prompts_to(
    scheduler: Scheduler, num_prompts: int, prompt_len: int, vocab: int, gen: torch.Generator
) -> None:
    """Queue `num_prompts` random prompts of `prompt_len` tokens that want one new token each."""
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for i in range(num_prompts):
        ids = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        scheduler.add(Request(f"prompt-{i}", ids, params))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU")
    parser.add_argument("--batch_sizes", type=int, nargs="+")
    parser.add_argument("--chunks", type=int, nargs="+")
    parser.add_argument("--prompt_len", type=int, default=512, help="the decoding requests' prompts")
    parser.add_argument("--steps", type=int, help="steps timed per figure (about)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    defaults = (
        {"batch_sizes": [1, 4], "chunks": [0, 8, 32], "steps": 6}
        if args.tiny
        else {"batch_sizes": [1, 16], "chunks": [0, 128, 256, 512, 1024, 2048], "steps": 24}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.prompt_len = min(args.prompt_len, 16)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    device, dtype = (
        (torch.device("cpu"), torch.float32) if args.tiny else (torch.device("cuda"), torch.bfloat16)
    )
    arch = InternVLArch.from_config_dict(model_shape(args.tiny).config)
    lm = language_model_from_state_dict(arch, random_hub_state(arch, device, dtype), dtype, device)
    rows = [
        measure_steps(lm, arch, batch, chunk, args) for batch in args.batch_sizes for chunk in args.chunks
    ]
    full_rate = prefill_only(lm, arch, args)
    print(
        f"Prefill chunks beside decode rows, {'tiny model' if args.tiny else 'InternVL3-8B shape'}; "
        f"chunks of {IMAGE_PROMPT['tiny' if args.tiny else 'full']}-token prompts; whole steps of "
        f"prefill alone: {full_rate:.0f} prompt tokens/s\n"
    )
    print("| decode rows | chunk tokens | step ms | x the decode step | prompt tokens/s | x prefill alone |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        alone = next(r for r in rows if r["batch"] == row["batch"] and r["chunk"] == 0)["step_ms"]
        rate = row["chunk"] / row["step_ms"] * 1e3
        row |= {"over_decode": row["step_ms"] / alone, "prompt_tokens_per_s": rate}
        print(
            f"| {row['batch']} | {row['chunk']} | {row['step_ms']:.2f} | {row['over_decode']:.2f}x "
            f"| {rate:.0f} | {rate / full_rate:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "prefill_alone_tokens_per_s": full_rate}, f, indent=1)


if __name__ == "__main__":
    main()
