"""Traffic the engine benchmarks do not time, through `vlmd serve` and `vlmd bench`, each
scenario beside its baseline in one command (issues 15 and 16):

- sampling: 64 streams, 512-token prompts, 128 new tokens: greedy, sampled as most clients
  sample (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.05), and top-p without
  top-k (the full-sort path); output tokens/s of each.
- prefix: 3-turn chats that re-send a one-tile image and a 2k-word history each turn; TTFT of the
  later turns with the prefix cache and with --disable_prefix_cache.
- long_answers: 64 streams that declare max_tokens 4096 and hang up after 128 tokens, against 64
  that ask for 128, on a pool of 64 x 1k tokens; output tokens/s of each.
- images: one text stream's inter-token latency alone, and while 1344x896 PNG images (7 tiles)
  arrive 4 at a time; the image requests' latency.

    python bench/serve_bench.py --model_dir .cache/internvl3-8b --write_model --scenarios all

`--write_model` writes an InternVL3-8B-shaped checkpoint with random bf16 weights there first
(`vlmd demo-model --size internvl3-8b`) unless one is there. Figures go to stdout as a markdown
table and, with --output_json, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

SCENARIOS = ("sampling", "prefix", "long_answers", "images")
SAMPLED = ["--temperature", "0.7", "--top_p", "0.9", "--top_k", "50", "--repetition_penalty", "1.05"]
TOP_P_ONLY = ["--temperature", "0.7", "--top_p", "0.9"]
START_TIMEOUT_S = 1200  # a cold start compiles FlashInfer's kernels


@contextmanager
def serve(model_dir: str, port: int, *flags: str, log_dir: Path):
    """`vlmd serve` on loopback until the block ends (SIGTERM, then its exit)."""
    log_path = log_dir / f"serve-{port}-{int(time.time())}.log"
    cmd = [sys.executable, "-m", "vlmd", "serve", "--model_dir", model_dir, "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vlmd serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vlmd serve did not start in time")
            time.sleep(1)
        ready = [line for line in log_path.read_text().splitlines() if " ready " in line]
        print("\n".join(ready), file=sys.stderr, flush=True)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def bench(url: str, *flags: str) -> dict:
    """One `vlmd bench` run; its JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "vlmd", "bench", "--base_url", url, *flags, "--output_json", out.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vlmd bench failed: {done.stderr[-2000:]}")
        return json.loads(Path(out.name).read_text())


def bench_in_background(url: str, *flags: str) -> tuple[subprocess.Popen, str]:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    cmd = [sys.executable, "-m", "vlmd", "bench", "--base_url", url, *flags, "--output_json", out]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def wait_for_vit(url: str, timeout_s: float = 300) -> None:
    """Until the ViT has encoded an image (vlmd_vit_images_total grows)."""

    def encoded() -> float:
        for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vlmd_vit_images_total "):
                return float(line.split()[1])
        return 0.0

    before, deadline = encoded(), time.monotonic() + timeout_s
    while encoded() == before:
        if time.monotonic() > deadline:
            raise RuntimeError("the image load never reached the ViT")
        time.sleep(0.2)


def streams(args, output_len: int, *flags: str) -> list[str]:
    """--streams concurrent streams of 512-token prompts, twice over, after as many warm-ups."""
    num = args.streams
    counts = ["--num_prompts", str(2 * num), "--max_concurrency", str(num), "--num_warmups", str(num)]
    return [
        *counts,
        "--input_len",
        "512",
        "--tokenizer",
        args.model_dir,
        "--output_len",
        str(output_len),
        *flags,
    ]


def sampling(args, log_dir: Path) -> list[tuple[str, str, float]]:
    rows = []
    with serve(args.model_dir, args.port, log_dir=log_dir) as url:
        for name, flags in (("greedy", []), ("sampled", SAMPLED), ("top-p only", TOP_P_ONLY)):
            report = bench(url, *streams(args, 128, *flags))
            measure = f"{args.streams} streams, {name}: output tokens/s"
            rows.append(("sampling", measure, report["output_token_throughput"]))
    return rows


def prefix(args, log_dir: Path) -> list[tuple[str, str, float]]:
    flags = ["--turns", "3", "--input_len", "2000", "--turn_input_len", "32", "--output_len", "32"]
    flags += ["--images_per_request", "1", "--num_prompts", "16", "--max_concurrency", "4"]
    rows = []
    for name, serve_flags in (("prefix cache", []), ("--disable_prefix_cache", ["--disable_prefix_cache"])):
        with serve(args.model_dir, args.port, "--enable_multimodal", *serve_flags, log_dir=log_dir) as url:
            report = bench(url, *flags)
        for key in ("ttft_ms_first_turn", "ttft_ms_later_turns"):
            rows.append(("prefix", f"{name}: {key} median", report[key]["median"]))
    return rows


def long_answers(args, log_dir: Path) -> list[tuple[str, str, float]]:
    rows = []
    runs = (
        ("max_tokens 128", streams(args, 128)),
        (
            f"max_tokens {args.long_output}, gone at 128",
            streams(args, args.long_output, "--disconnect_after", "128"),
        ),
    )
    pool = ["--max_total_token_num", str(args.streams * 1024)]
    with serve(args.model_dir, args.port, *pool, log_dir=log_dir) as url:
        for name, flags in runs:
            report = bench(url, *flags)
            measure = f"{args.streams} streams, {name}: output tokens/s"
            rows.append(("long_answers", measure, report["output_token_throughput"]))
    return rows


def images(args, log_dir: Path) -> list[tuple[str, str, float]]:
    text = [
        "--num_prompts",
        "3",
        "--max_concurrency",
        "1",
        "--input_len",
        "512",
        "--tokenizer",
        args.model_dir,
    ]
    text += ["--output_len", str(args.long_output // 4)]
    image_load = ["--images_per_request", "1", "--image_width", "1344", "--image_height", "896"]
    image_load += [
        "--image_format",
        "png",
        "--output_len",
        "1",
        "--max_concurrency",
        "4",
        "--num_prompts",
        "200",
    ]
    rows = []
    with serve(args.model_dir, args.port, "--enable_multimodal", log_dir=log_dir) as url:
        alone = bench(url, *text)
        rows.append(("images", "text stream alone: ITL p99 ms", alone["itl_ms"]["p99"]))
        rows.append(("images", "text stream alone: ITL median ms", alone["itl_ms"]["median"]))
        load, out = bench_in_background(url, *image_load)
        try:
            wait_for_vit(url)  # the load's images drawn and on their way
            beside = bench(url, *text)
        finally:
            load.kill()
            load.wait(60)
        rows.append(("images", "text stream beside images: ITL p99 ms", beside["itl_ms"]["p99"]))
        rows.append(("images", "text stream beside images: ITL median ms", beside["itl_ms"]["median"]))
        alone_images = bench(url, *image_load[:-2], "--num_prompts", str(args.streams))
        name = "1344x896 PNG requests, 4 at a time"
        rows.append(("images", f"{name}: latency median ms", alone_images["e2e_latency_ms"]["median"]))
        rows.append(("images", f"{name}: requests/s", alone_images["request_throughput"]))
        os.unlink(out)
    return rows


RUNS = {"sampling": sampling, "prefix": prefix, "long_answers": long_answers, "images": images}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--write_model", action="store_true", help="write an InternVL3-8B-shaped model there")
    parser.add_argument("--scenarios", default="all", help=f"comma-separated of {SCENARIOS}, or all")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument(
        "--long_output", type=int, default=4096, help="max_tokens the long-answer clients declare"
    )
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (fewer: a smoke run)")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.write_model and not (Path(args.model_dir) / "config.json").exists():
        cmd = [sys.executable, "-m", "vlmd", "demo-model", "--size", "internvl3-8b", args.model_dir]
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"model written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    names = SCENARIOS if args.scenarios == "all" else args.scenarios.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    rows = []
    for name in names:
        rows += RUNS[name](args, log_dir)
        print(f"{name} done", file=sys.stderr, flush=True)
    print("| scenario | measure | value |\n|---|---|---|")
    for scenario, measure, value in rows:
        print(f"| {scenario} | {measure} | {'-' if value is None else f'{value:.2f}'} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
