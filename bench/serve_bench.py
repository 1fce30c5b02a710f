"""Traffic the engine benchmarks do not time, through `vlmd serve` and `vlmd bench`, each
scenario beside its baseline in one command (issues 15 and 16):

- sampling: 64 streams, 512-token prompts, 128 new tokens: greedy, sampled as most clients
  sample (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.05), and top-p without
  top-k (the full-sort path); output tokens/s of each.
- prefix: 3-turn chats that re-send a one-tile image and a 2k-word history each turn; TTFT of the
  later turns with the prefix cache and with --disable_prefix_cache.
- long_answers: 64 streams that declare max_tokens 4096 and hang up after 128 tokens, against 64
  that ask for 128, on a pool of 64 x 1k tokens; output tokens/s of each.
- images: under each ViT placement (--vit_placements, by default: the ViT in a process of its
  own, the same with prompt chunks of at most 256 tokens beside decode rows, and the ViT in the
  worker 2 tiles a step between steps), one text stream's inter-token latency alone, and while new 7-tile (1344x896) and
  13-tile (1792x1344) PNGs arrive back to back, four at a time; the 13-tile images' rate with and
  without a text stream decoding; end-to-end images/s of new 1-tile and 13-tile JPEGs and PNGs
  against the ViT's own tiles/s on the same weights (measured in this process once the server
  is gone).

    python bench/serve_bench.py --model_dir .cache/internvl3-8b --write_model --scenarios all

`--write_model` writes an InternVL3-8B-shaped checkpoint with random bf16 weights there first
(`vlmd demo-model --size internvl3-8b`) unless one is there. Figures go to stdout as a markdown
table and, with --output_json, to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
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
# Every `vlmd bench` run draws its prompts and images from a seed of its own: a seed drawn twice
# would send the same text and image bytes again, prefix and embedding cache hits.
RUN_SEEDS = itertools.count(1000)
IMAGE_TOKENS_PER_TILE = 256  # InternVL: 448 px tiles, 14 px patches, pixel shuffle by 2


@contextmanager
def serve(model_dir: str, port: int, *flags: str, log_dir: Path, env: dict[str, str] | None = None):
    """`vlmd serve` on loopback (in `env`, else this process's environment) until the block ends
    (SIGTERM, then its exit)."""
    log_path = log_dir / f"serve-{port}-{int(time.time())}.log"
    cmd = [sys.executable, "-m", "vlmd", "serve", "--model_dir", model_dir, "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
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
            time.sleep(0.25)
        # What the start spent its time on: the actors' ready lines, the kernel precompile's.
        keys = (" ready ", "compiled ahead", "kernel precompile")
        ready = [line for line in log_path.read_text().splitlines() if any(key in line for key in keys)]
        print("\n".join(ready), file=sys.stderr, flush=True)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        report_stalls(log_path)


def report_stalls(log_path: Path) -> None:
    """The stalls the server logged (a worker's slow host work on a GPU; with --log_stalls_ms,
    every actor's held event loop and late decode steps): where a token's latency went. On
    stderr: each kind's count and longest, then the last twenty lines."""
    lines = [
        line for line in log_path.read_text().splitlines() if "slow host work" in line or "stall:" in line
    ]
    if not lines:
        return
    kinds: dict[str, list[float]] = {}
    for line in lines:
        what = line.split("slow host work: ", 1)[-1].split("stall: ", 1)[-1]
        figures = re.findall(r"[0-9.]+", what)
        kinds.setdefault(re.sub(r"[0-9.]+", "N", what), []).append(
            float(figures[-2] if "launched" in what else figures[-1])
        )
    print(f"{len(lines)} stall line(s) in {log_path}:", file=sys.stderr)
    for kind, values in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        most = f"at most {max(values):.0f}" if "allocator" in kind else f"longest {max(values):.1f} ms"
        print(f"  {len(values)} x {kind} ({most})", file=sys.stderr)
    print("\n".join(lines[-20:]), file=sys.stderr, flush=True)


def _day_seconds(clock: str) -> float:
    """Seconds since midnight of "HH:MM:SS.mmm" (or "HH:MM:SS,mmm", as the log writes it)."""
    hours, minutes, seconds = clock.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def stalls_in_gaps(log_path: Path, gaps: list[dict]) -> list[list[str]]:
    """For each of a stream's gaps (`vlmd bench`'s longest_itls: the gap and when its token came,
    on this machine's clock as the log's, both to the millisecond), the server's stall lines logged
    from the token before (less 1 ms) to 2 ms after this one: what the server logged holding
    that token."""
    stamped = []
    for line in log_path.read_text().splitlines():
        found = re.match(r"\S+ (\d\d:\d\d:\d\d,\d{3})\s+(.*)", line)
        if found and any(key in line for key in ("stall:", "stall timeline", "slow host work")):
            stamped.append((_day_seconds(found[1]), found[2]))
    within = []
    for gap in gaps:
        end = _day_seconds(gap["arrived"])
        start = end - gap["itl_ms"] / 1e3
        within.append([what for at, what in stamped if start - 0.001 <= at <= end + 0.002])
    return within


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


def metric_values(url: str) -> dict[str, float]:
    """The unlabelled samples of the server's /metrics, by name (histograms' _count and _sum too)."""
    values = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if value and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


def wait_for_vit(url: str, timeout_s: float = 300) -> None:
    """Until the ViT has encoded an image (vlmd_vit_images_total grows)."""

    def encoded() -> float:
        return metric_values(url).get("vlmd_vit_images_total", 0.0)

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
        "--seed",
        str(next(RUN_SEEDS)),
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


# (name, width, height, tiles): InternVL's dynamic tiling of each size, with the thumbnail.
IMAGE_SIZES = (
    ("1-tile 448x448", 448, 448, 1),
    ("7-tile 1344x896", 1344, 896, 7),
    ("13-tile 1792x1344", 1792, 1344, 13),
)


# /metrics histograms of an image request's stages, each inside its time to first token.
STAGES = {
    "preprocessing": "vlmd_image_preprocess_seconds",
    "  of it inside a preprocess worker": "vlmd_image_preprocess_worker_seconds",
    "waiting for the ViT": "vlmd_image_wait_seconds",
    "  a ViT batch (per batch)": "vlmd_vit_batch_seconds",
    "time to first token": "vlmd_time_to_first_token_seconds",
}


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(count, sum) of each STAGES histogram, as /metrics shows them now."""
    values = metric_values(url)
    return {name: (values[name + "_count"], values[name + "_sum"]) for name in STAGES.values()}


def stage_rows(label: str, before: dict, after: dict) -> list[tuple[str, str, float]]:
    """The mean ms of each stage over the requests between two `stage_totals`."""
    rows = []
    for stage, name in STAGES.items():
        count = after[name][0] - before[name][0]
        mean_ms = (after[name][1] - before[name][1]) / count * 1e3 if count else None
        rows.append(("images", f"  {label}: {stage}, mean ms", mean_ms))
    return rows


def image_load(width: int, height: int, image_format: str, concurrency: int, num_prompts: int) -> list[str]:
    """Requests of one new image each and one new token."""
    seed = ["--seed", str(next(RUN_SEEDS))]
    size = ["--image_width", str(width), "--image_height", str(height), "--image_format", image_format]
    counts = ["--max_concurrency", str(concurrency), "--num_prompts", str(num_prompts)]
    return ["--images_per_request", "1", *size, "--output_len", "1", "--input_len", "16", *counts, *seed]


def text_stream(args, output_len: int) -> list[str]:
    """One streaming client: a 512-token prompt, `output_len` tokens, three times over."""
    flags = ["--num_prompts", "3", "--max_concurrency", "1", "--input_len", "512"]
    return [*flags, "--tokenizer", args.model_dir, "--output_len", str(output_len)]


@contextmanager
def in_background(url: str, *flags: str):
    """A `vlmd bench` load running until the block ends."""
    load, out = bench_in_background(url, *flags)
    try:
        yield load
    finally:
        load.kill()
        load.wait(60)
        os.unlink(out)


def images(args, log_dir: Path) -> list[tuple[str, str, float]]:
    """For each --vit_placements: text inter-token latency while 7- and 13-tile PNGs arrive back
    to back, four at a time (two of each size), and the 13-tile images' rate with and without a
    text stream decoding; then images per second end to end, each size and format, against the
    ViT's own tiles per second (under each --throughput_placements; by default the first)."""
    rows = []
    for placement in args.vit_placements:
        rows += emit(images_beside_text(args, log_dir, placement))
    return rows + image_throughput(args, log_dir)


def emit(rows: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """Print rows of the figures table as soon as they are measured (a run cut short keeps them)."""
    for scenario, measure, value in rows:
        print(f"| {scenario} | {measure} | {'-' if value is None else f'{value:.2f}'} |", flush=True)
    return rows


def placement_flags(placement: str) -> list[str]:
    """`vlmd serve` flags of a --vit_placements entry: "process", "worker", or "worker:N" (the ViT
    in the workers, N tiles a step while steps run: --vit_step_tiles) or "worker@S" (the ViT in the
    workers on a green context of S SMs: --vit_sms); a suffix "/C" caps the prompt tokens of a
    step where requests decode at C (--decode_step_prefill_tokens), a suffix "+P" runs those
    prompt tokens in side steps on a green context of P SMs instead (--prefill_sms)."""
    placement, _, prefill_sms = placement.partition("+")
    placement, _, cap = placement.partition("/")
    placement, _, step_tiles = placement.partition(":")
    where, _, sms = placement.partition("@")
    flags = ["--vit_placement", where, "--vit_step_tiles", step_tiles or "0"]
    flags += ["--vit_sms", sms] if sms else []
    flags += ["--prefill_sms", prefill_sms] if prefill_sms else []
    return flags + (["--decode_step_prefill_tokens", cap] if cap else [])


def print_gaps(log_path: Path, gaps: list[dict]) -> None:
    """Each of a bench report's longest gaps between tokens, with the server's stall lines logged
    while it lasted (to stderr)."""
    for gap, logged in zip(gaps, stalls_in_gaps(log_path, gaps), strict=True):
        print(f"  {gap['itl_ms']:.1f} ms, the token at {gap['arrived']}", file=sys.stderr)
        for what in logged[:8]:
            print(f"    logged meanwhile: {what[:200]}", file=sys.stderr)
        if len(logged) > 8:
            print(f"    and {len(logged) - 8} more lines", file=sys.stderr)
    sys.stderr.flush()


def images_beside_text(args, log_dir: Path, placement: str) -> list[tuple[str, str, float]]:
    rows = []
    _, w7, h7, _ = IMAGE_SIZES[1]
    _, w13, h13, _ = IMAGE_SIZES[2]
    n = args.image_prompts
    flags = ["--enable_multimodal", *placement_flags(placement), "--log_stalls_ms", "15", *args.serve_flags]
    with serve(args.model_dir, args.port, *flags, log_dir=log_dir) as url:
        alone = bench(url, *text_stream(args, args.long_output // 4))
        with in_background(url, *image_load(w7, h7, "png", 2, 100 * n)):
            with in_background(url, *image_load(w13, h13, "png", 2, 100 * n)):
                wait_for_vit(url)  # the loads' images drawn and on their way
                beside = bench(url, *text_stream(args, args.long_output // 4))
        for name, report in (("alone", alone), ("beside images", beside)):
            p99s = " / ".join(f"{r['itl_p99_ms']:.2f}" for r in report["requests"] if r["itl_p99_ms"])
            itl = report["itl_ms"]
            print(
                f"ViT {placement}: the text stream {name}: each request's ITL p99 ms: {p99s}; "
                f"all of them: median {itl['median']:.2f}, p90 {itl['p90']:.2f}, p99 {itl['p99']:.2f}",
                file=sys.stderr,
            )
        log_path = max(log_dir.glob("serve-*.log"), key=lambda path: path.stat().st_mtime)  # this server's
        for name, report in (("alone", alone), ("beside images", beside)):
            print(f"ViT {placement}: the text stream's longest gaps {name}:", file=sys.stderr)
            print_gaps(log_path, report["longest_itls"])
        before = stage_totals(url)
        images_alone = bench(url, *image_load(w13, h13, "png", 4, n))["request_throughput"]
        stages = stage_rows(f"ViT {placement}: 13-tile PNGs 4 at a time, no text", before, stage_totals(url))
        with in_background(url, *text_stream(args, args.long_output)):
            time.sleep(2)  # the text stream decoding
            before = stage_totals(url)
            images_beside = bench(url, *image_load(w13, h13, "png", 4, n))["request_throughput"]
            # The time to first token's mean counts a text request begun meanwhile, if any.
            stages_beside = stage_rows(
                f"ViT {placement}: 13-tile PNGs 4 at a time, beside a text stream", before, stage_totals(url)
            )
    for name, report in (("alone", alone), ("beside 7+13-tile images", beside)):
        for stat in ("p99", "median"):
            rows.append(
                ("images", f"ViT {placement}: text stream {name}: ITL {stat} ms", report["itl_ms"][stat])
            )
    rows.append(
        (
            "images",
            f"ViT {placement}:   ITL p99 beside / alone (target <= 1.5)",
            beside["itl_ms"]["p99"] / alone["itl_ms"]["p99"],
        )
    )
    rows.append(("images", f"ViT {placement}: 13-tile PNGs 4 at a time, no text: images/s", images_alone))
    rows += stages
    rows.append(
        (
            "images",
            f"ViT {placement}: 13-tile PNGs 4 at a time, beside a text stream: images/s",
            images_beside,
        )
    )
    rows += stages_beside
    rows.append(("images", f"ViT {placement}:   ratio (target >= 0.8)", images_beside / images_alone))
    return rows


def image_throughput(args, log_dir: Path) -> list[tuple[str, str, float]]:
    """Under each --throughput_placements: end-to-end images/s of new 1-tile and 13-tile JPEGs and
    PNGs (one new token each, 32 at a time, ViT batches of up to --vit_batch images), and the same
    load as text alone (as many prompt tokens as an image request has: the language model's
    prefill of them); then, with the servers gone, the ViT's own tiles/s on the same weights in
    one process. An image request runs the ViT and then the prefill of its rows on the same GPU,
    so its bound is 1 / (ViT time + prefill time); both ratios are reported."""
    rows, images_per_s, prefill_per_s = [], {}, {}
    if args.throughput_placements == ["none"]:
        return rows
    for placement in args.throughput_placements or args.vit_placements[:1]:
        flags = ["--enable_multimodal", "--visual_infer_batch_size", str(args.vit_batch)]
        flags += [*placement_flags(placement), *args.serve_flags]
        with serve(args.model_dir, args.port, *flags, log_dir=log_dir) as url:
            for name, width, height, tiles in (IMAGE_SIZES[0], IMAGE_SIZES[2]):
                # 32 at a time ramp up and drain at both ends of a run: enough requests that those
                # ends are a small part of it (32 13-tile requests sent at once were one burst).
                count = args.image_prompts * (16 if tiles == 1 else 4)
                for image_format in ("jpeg", "png"):
                    label = f"ViT {placement}: {name} {image_format.upper()}"
                    before = stage_totals(url)
                    load = image_load(width, height, image_format, 32, count)
                    rate = images_per_s[(placement, name, image_format)] = bench(url, *load)[
                        "request_throughput"
                    ]
                    rows += emit([("images", f"{label}, 32 at a time: images/s", rate)])
                    rows += emit(stage_rows(label, before, stage_totals(url)))
                text = ["--input_len", str(IMAGE_TOKENS_PER_TILE * tiles + 16), "--tokenizer", args.model_dir]
                counts = [
                    "--max_concurrency",
                    "32",
                    "--num_prompts",
                    str(count),
                    "--seed",
                    str(next(RUN_SEEDS)),
                ]
                rate = prefill_per_s[(placement, name)] = bench(url, *text, "--output_len", "1", *counts)[
                    "request_throughput"
                ]
                rows += emit([("images", "  the same load as text alone (prefill only): requests/s", rate)])
    for name, _, _, tiles in (IMAGE_SIZES[0], IMAGE_SIZES[2]):
        batch = args.vit_batch * tiles if tiles == 1 else tiles
        vit = vit_tiles_per_s(args.model_dir, batch)
        rows += emit([("images", f"ViT alone, {batch} tiles per forward: tiles/s", vit)])
        for (placement, size, image_format), rate in images_per_s.items():
            if size != name:
                continue
            bound = 1 / (tiles / vit + 1 / prefill_per_s[(placement, name)])  # the ViT, then the prefill
            label = f"  ViT {placement}: {name} {image_format.upper()} end to end"
            ratios = [
                ("images", f"{label}: tiles/s / ViT tiles/s (target >= 0.9)", rate * tiles / vit),
                ("images", f"{label} / (ViT + prefill) bound", rate / bound),
            ]
            rows += emit(ratios)
    return rows


def vit_tiles_per_s(model_dir: str, num_tiles: int, repeats: int = 30) -> float:
    """The vision tower and projector as the vision actor runs them (its attention, a CUDA graph
    per tile count), forwards of `num_tiles` random tiles back to back."""
    import torch

    from vlmd.kernels.vision_attention import make_tile_attention
    from vlmd.kernels.vision_graph import VisionGraphs
    from vlmd.models.loader import load_vision

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    vision = load_vision(model_dir, dtype, device, num_threads=8)
    vision.set_tile_attention(make_tile_attention("auto", device, dtype, vision.arch.vision_head_dim))
    side = vision.arch.image_size
    if cuda:
        vision = VisionGraphs(vision, num_tiles, side)
        vision.capture()
    pixels = torch.randn(num_tiles, 3, side, side, device=device, dtype=dtype)
    with torch.inference_mode():
        vision(pixels)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            vision(pixels)
        if cuda:
            torch.cuda.synchronize()
    return repeats * num_tiles / (time.perf_counter() - started)


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
    parser.add_argument(
        "--image_prompts",
        type=int,
        default=64,
        help="image requests per 4-at-a-time figure; the end-to-end ones send 16x (1 tile) and 4x (13 tiles)",
    )
    parser.add_argument(
        "--vit_batch", type=int, default=12, help="--visual_infer_batch_size for the images/s runs"
    )
    parser.add_argument(
        "--vit_placements",
        default="process,process/256,worker:2",
        help="the images scenario's text-beside-images runs under each (comma-separated; empty: "
        "none): process, worker, worker:N (--vit_step_tiles N) or worker@S (--vit_sms S), each with "
        "an optional /C (--decode_step_prefill_tokens C)",
    )
    parser.add_argument(
        "--throughput_placements",
        default="",
        help="the end-to-end images/s run under each (comma-separated, as --vit_placements; default: "
        "the first of --vit_placements; none: no such run)",
    )
    parser.add_argument(
        "--serve_flags", default="", help="more `vlmd serve` flags for the images scenario (one string)"
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    args.serve_flags = args.serve_flags.split()
    args.vit_placements = [p for p in args.vit_placements.split(",") if p]
    args.throughput_placements = [p for p in args.throughput_placements.split(",") if p]
    if args.write_model and not (Path(args.model_dir) / "config.json").exists():
        cmd = [sys.executable, "-m", "vlmd", "demo-model", "--size", "internvl3-8b", args.model_dir]
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"model written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    names = SCENARIOS if args.scenarios == "all" else args.scenarios.split(",")
    print("| scenario | measure | value |\n|---|---|---|", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="serve_bench-"))
    rows = []
    for name in names:
        scenario_rows = RUNS[name](args, log_dir)
        rows += scenario_rows if name == "images" else emit(scenario_rows)  # images: as measured
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
