"""Tensor-parallel decode: ms per step of the InternVL3-8B-shaped language model with --tp 1 and
--tp 2 (or more), every figure from one run on one host.

    python bench/tp_bench.py [--tp 1 2] [--batch_sizes 1 64] [--new_tokens 64] [--json PATH]

Each rank builds its share of the model with random bf16 weights (no checkpoint: the split is
`shard_language_model`, as `vlmd serve --tp N` loads it) and runs its own copy of the scheduler
on the same requests, so every rank executes the same step plans, as the server's ranks do;
steps are overlapped (the next launched before the last is read back) and decode replays CUDA
graphs with the NCCL all-reduces inside. Rank 0 times the interval between steps collected in a
row, median over the full-batch decode steps; then rank 0 profiles `--profile_steps` more
full-batch steps (GPU kernels per step, the costliest listed). Roofline per GPU: (the rank's LM weight bytes +
its KV bytes read per step) / copy bandwidth (measured on GPU 0 in the same run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import (  # noqa: E402
    PAGE_SIZE,
    add_text_requests,
    copy_bandwidth,
    full_batch_decode,
    lm_weight_bytes,
    model_shape,
    profile_decode,
    run_steps,
)
from ranks import free_port, join, random_share  # noqa: E402

from vlmd.actors.worker import FUSED_ALL_REDUCE_MAX_TOKENS, SYMM_MEM_ALL_REDUCE_BYTES, make_runner  # noqa: E402
from vlmd.core.page_allocator import pages_for  # noqa: E402
from vlmd.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from vlmd.kernels.collectives import FusedAllReduceNorm, SymmMemAllReduce  # noqa: E402
from vlmd.models.config import InternVLArch  # noqa: E402
from vlmd.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from vlmd.models.tensor_parallel import TPGroup, end_rank_process, shard_language_model  # noqa: E402


def progress(rank: int, size: int, what: str) -> None:
    """One line per phase on stderr, so a slow or stuck run shows where it is."""
    if rank == 0:
        print(f"{datetime.datetime.now():%H:%M:%S} tp {size}: {what}", file=sys.stderr, flush=True)


def rank_main(
    rank: int, size: int, all_reduce: str, linear: str, port: int, args: argparse.Namespace, out_path: str
) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr)
    device = join(rank, size, port, args.tiny)
    shape = model_shape(tiny=args.tiny)
    arch = InternVLArch.from_config_dict(shape.config)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    small = SymmMemAllReduce(device, SYMM_MEM_ALL_REDUCE_BYTES) if all_reduce == "symm_mem" else None
    fused = None
    if all_reduce == "fused" and size > 1:
        fused = FusedAllReduceNorm(rank, size, FUSED_ALL_REDUCE_MAX_TOKENS, arch.hidden_size, dtype)
    tp = TPGroup(rank, size, small, fused)
    progress(rank, size, "building the model")
    lm = random_share(Qwen2ForCausalLM, shard_language_model, arch, tp, device, dtype)
    max_batch = max(args.batch_sizes)
    num_pages = max_batch * pages_for(args.prompt_len + args.new_tokens, PAGE_SIZE)
    progress(rank, size, "capturing CUDA graphs")
    graphs = 0 if args.tiny else max_batch
    runner = make_runner(
        lm,
        arch,
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        graph_max_batch_size=graphs,
        gemv=linear == "triton",
    )
    config = SchedulerConfig(  # runs repeat their prompts: no prefix cache (see gpu_bench)
        num_pages, PAGE_SIZE, max_running_requests=max(256, max_batch), enable_prefix_cache=False
    )
    scheduler = Scheduler(config)
    gen = torch.Generator().manual_seed(1)  # the same prompts on every rank
    warmup = torch.randint(0, shape.num_text_ids, (max_batch, args.prompt_len), generator=gen)
    progress(rank, size, "warm-up")
    add_text_requests(scheduler, warmup, 3, "warmup")
    run_steps(runner, scheduler)
    rows = []
    for batch in args.batch_sizes:
        progress(rank, size, f"decode at batch {batch}")
        prompts = torch.randint(0, shape.num_text_ids, (batch, args.prompt_len), generator=gen)
        add_text_requests(scheduler, prompts, args.new_tokens, f"decode{batch}")
        decode = full_batch_decode(run_steps(runner, scheduler), batch)
        heads = lm.model.layers[0].self_attn
        avg_context = args.prompt_len + args.new_tokens / 2
        elem = lm.lm_head.weight.element_size()
        kv_bytes = (
            batch * avg_context * 2 * arch.num_hidden_layers * heads.num_kv_heads * arch.head_dim * elem
        )
        rows.append(
            {
                "tp": size,
                "all_reduce": all_reduce,
                "linear": linear,
                "batch": batch,
                "step_ms": statistics.median(s.interval_s for s in decode) * 1e3,
                "num_decode_steps": len(decode),
                "weight_bytes_per_gpu": lm_weight_bytes(lm),
                "kv_bytes_per_gpu": kv_bytes,
            }
        )
        progress(rank, size, f"batch {batch}: {rows[-1]['step_ms']:.2f} ms/step")
        if args.profile_steps > 0:  # every rank runs the steps; rank 0 profiles its GPU
            profiled = rank == 0 and not args.tiny  # (--tiny runs the steps: the CPU has no GPU kernels)
            prof = profile_decode(runner, scheduler, prompts, args.profile_steps, f"profile{batch}", profiled)
            if prof is not None:
                rows[-1] |= {"kernel_ms": prof.kernel_ms, "top_kernels": prof.top, "gaps": prof.summary()}
                progress(rank, size, f"batch {batch}: {prof.summary()}")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    end_rank_process(size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument(
        "--all_reduce",
        nargs="+",
        default=["nccl"],
        choices=["nccl", "symm_mem", "fused"],
        help="how tp > 1 sums (as --tp_all_reduce); several: each is run",
    )
    parser.add_argument(
        "--linear",
        nargs="+",
        default=None,
        choices=["triton", "torch"],
        help="one-row linear layers: Triton's GEMV (the server's default on CUDA; the default here but "
        "with --tiny) or torch's F.linear (cuBLAS); several: each is run",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model on the CPU (gloo)")
    parser.add_argument(
        "--profile_steps",
        type=int,
        default=8,
        help="decode steps profiled on rank 0's GPU (0: off; --tiny runs them unprofiled)",
    )
    args = parser.parse_args(argv)
    if args.tiny and set(args.all_reduce) - {"nccl"}:
        raise SystemExit("--all_reduce symm_mem and fused need GPUs")
    if args.linear is None:
        args.linear = ["torch"] if args.tiny else ["triton"]
    if args.tiny and "triton" in args.linear:
        raise SystemExit("--linear triton needs a GPU")
    if not args.tiny and torch.cuda.device_count() < max(args.tp):
        raise SystemExit(
            f"--tp {max(args.tp)} needs {max(args.tp)} GPUs; {torch.cuda.device_count()} visible"
        )
    if args.tiny:
        bandwidth = copy_bandwidth(torch.device("cpu"), 64 * 2**20, 3)
    else:
        bandwidth = copy_bandwidth(torch.device("cuda", 0), 2 * 2**30, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.tp:
            for all_reduce in args.all_reduce if size > 1 else ["nccl"]:
                for linear in args.linear:
                    path = os.path.join(tmp, f"tp{size}-{all_reduce}-{linear}.json")
                    spawn_args = (size, all_reduce, linear, free_port(), args, path)
                    mp.spawn(rank_main, args=spawn_args, nprocs=size)
                    with open(path) as f:
                        rows += json.load(f)
    by_key = {(r["tp"], r["linear"], r["batch"]): r for r in rows}
    for r in rows:
        r["roofline_ms"] = (r["weight_bytes_per_gpu"] + r["kv_bytes_per_gpu"]) / bandwidth * 1e3
        base = by_key.get((1, r["linear"], r["batch"]))
        r["over_tp1"] = r["step_ms"] / base["step_ms"] if base else None
    gpu = "CPU (gloo)" if args.tiny else torch.cuda.get_device_name(0)
    print(f"# {gpu} x {max(args.tp)}; torch {torch.__version__}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print(f"# command: python bench/tp_bench.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"# copy bandwidth {bandwidth / 1e12:.3f} TB/s; {args.prompt_len}-token prompts, {args.new_tokens} new"
    )
    print(
        "\n| tp | all-reduce | one-row linears | batch | ms/step | / tp 1 | roofline ms per GPU | / roofline |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        ratio = "-" if r["over_tp1"] is None else f"{r['over_tp1']:.2f}x"
        print(
            f"| {r['tp']} | {r['all_reduce'] if r['tp'] > 1 else '-'} | {r['linear']} | {r['batch']} "
            f"| {r['step_ms']:.2f} "
            f"| {ratio} | {r['roofline_ms']:.2f} "
            f"| {r['step_ms'] / r['roofline_ms']:.2f}x |"
        )
    for r in rows:
        if "top_kernels" in r:
            where = f"tp {r['tp']} ({r['all_reduce']}, {r['linear']} linears), batch {r['batch']}"
            print(f"\nrank 0 at {where}: {r['gaps']}")
            print("\n".join(f"- {ms:.3f} {name}" for name, ms in r["top_kernels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
