"""Per-token serving overhead on the CPU: the demo model behind the real server (HTTP + IPC +
scheduling) against the same model's step time alone, at concurrency 1 and 32, in one run.

    python bench/serving_overhead.py [--model_dir DIR] [--new_tokens 64] [--rounds 3]

For each concurrency C, "forward alone" runs C requests (prompt + new tokens) through the
scheduler core and the model runner in this process, timing only the runner; "served" sends C
concurrent /generate requests to a real `vlmd serve`, timing the wall clock. The difference,
divided by the decode steps, is what serving adds per token.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from vlmd.actors.worker import create_runner
from vlmd.core.request import Request
from vlmd.core.scheduler import Scheduler, SchedulerConfig
from vlmd.demo import write_demo_model
from vlmd.messages import SamplingParams

PROMPT = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"


def forward_alone(
    model_dir: str, prompt_ids: list[int], concurrency: int, new_tokens: int, rounds: int
) -> float:
    """Seconds the runner spends on C requests of `new_tokens` each (best of `rounds`)."""
    page_size, num_pages = 16, 4096
    runner = create_runner(
        model_dir, "float32", torch.device("cpu"), num_pages=num_pages, page_size=page_size
    )
    best = float("inf")
    for r in range(rounds):
        scheduler = Scheduler(SchedulerConfig(num_pages, page_size, enable_prefix_cache=False))
        for i in range(concurrency):
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            scheduler.add(Request(f"{r}-{i}", list(prompt_ids), params))
        spent = 0.0
        while scheduler.has_work():
            plan = scheduler.schedule()
            started = time.perf_counter()
            result = runner.execute(plan)
            spent += time.perf_counter() - started
            scheduler.update(plan, result)
        best = min(best, spent)
    return best


def served(url: str, concurrency: int, new_tokens: int, rounds: int) -> float:
    """Wall seconds for C concurrent /generate requests of `new_tokens` each (best of `rounds`)."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}

    def one(_):
        response = requests.post(url + "/generate", json=body, timeout=600)
        assert response.status_code == 200 and response.json()["count_output_tokens"] == new_tokens

    best = float("inf")
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(one, range(concurrency)))
            best = min(best, time.perf_counter() - started)
    return best


def start_server(model_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Every request sends one prompt: both sides compute it whole (no prefix cache), as they did.
    cmd = [
        sys.executable,
        "-m",
        "vlmd",
        "serve",
        "--model_dir",
        model_dir,
        "--port",
        str(port),
        "--disable_prefix_cache",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    model_dir = args.model_dir or os.path.join(tempfile.mkdtemp(), "demo")
    if args.model_dir is None:
        write_demo_model(model_dir)
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as `vlmd serve` gives its worker
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
    alone = {
        c: forward_alone(model_dir, prompt_ids, c, args.new_tokens, args.rounds) for c in args.concurrency
    }
    process, url = start_server(model_dir)
    try:
        total = {c: served(url, c, args.new_tokens, args.rounds) for c in args.concurrency}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"# prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens per request, best of {args.rounds}"
    )
    print("| concurrency | forward alone ms/step | served ms/step | overhead ms/step | overhead share |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        steps = args.new_tokens  # one prefill step (which also samples) + new_tokens - 1 decode steps
        fwd, srv = alone[c] / steps * 1e3, total[c] / steps * 1e3
        print(f"| {c} | {fwd:.2f} | {srv:.2f} | {srv - fwd:.2f} | {(srv - fwd) / srv:.0%} |")


if __name__ == "__main__":
    main()
