"""`vlmd bench`: send the synthetic requests at a Poisson rate or a fixed concurrency, report.

    vlmd bench --base_url http://127.0.0.1:8000 --num_prompts 200 --input_len 128 --output_len 64 \\
        --images_per_request 1 --image_reuse_fraction 0.5 --request_rate 8 --output_json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time

import httpx

from vlmd.benchmark.args import BenchError, sampling_knobs, validate
from vlmd.benchmark.backends import BACKENDS, Backend, RequestResult, send
from vlmd.benchmark.dataset import BenchRequest, DatasetConfig, build_requests
from vlmd.benchmark.report import build_report, cache_counters, cache_hit_rate, format_table


def run(ns: argparse.Namespace) -> int:
    """The `vlmd bench` command: 0 when some request succeeded, 1 otherwise (message on stderr)."""
    try:
        validate(ns)
        report = asyncio.run(_bench(ns))
    except BenchError as exc:
        print(f"vlmd bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(report))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if report["successful_requests"] == 0:
        first = report["errors"][0] if report["errors"] else "no requests were sent"
        print(f"vlmd bench: error: every request failed (first error: {first})", file=sys.stderr)
        return 1
    return 0


async def _bench(ns: argparse.Namespace) -> dict:
    backend = BACKENDS[ns.backend]
    base_url = ns.base_url.rstrip("/")
    url = base_url + (ns.endpoint or backend.endpoint)
    limits = httpx.Limits(max_connections=ns.max_concurrency, max_keepalive_connections=ns.max_concurrency)
    async with httpx.AsyncClient(timeout=ns.request_timeout, limits=limits) as client:
        await _check_reachable(client, base_url)
        model = ns.model
        if model is None and ns.backend == "openai-chat":
            model = await _first_model(client, base_url)
        requests, warmups = _datasets(ns)

        def encode(request: BenchRequest) -> bytes:
            return json.dumps(backend.body(request, model, not ns.allow_eos, sampling_knobs(ns))).encode()

        if warmups:
            await _run_all(client, url, backend, warmups, [encode(r) for r in warmups], encode, ns, None)
        payloads = [encode(r) for r in requests]  # before the clock starts (first turns)
        before = await _cache_counters(client, base_url)
        progress = Progress(len(requests) * ns.turns)
        started = time.perf_counter()
        results = await _run_all(client, url, backend, requests, payloads, encode, ns, progress)
        duration = time.perf_counter() - started
        progress.close()
        after = await _cache_counters(client, base_url)
    report = {"backend": ns.backend, "base_url": base_url, "endpoint": url.removeprefix(base_url)}
    report["model"] = model
    report["config"] = {k: v for k, v in vars(ns).items() if k not in ("command", "output_json")}
    report["config"]["request_rate"] = (
        str(ns.request_rate) if math.isinf(ns.request_rate) else ns.request_rate
    )
    report.update(build_report(results, max(duration, 1e-9)))
    report.update(cache_hit_rate(before, after))
    return report


def _datasets(ns: argparse.Namespace) -> tuple[list[BenchRequest], list[BenchRequest]]:
    tokenizer = None
    if ns.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
    common = dict(
        input_len=ns.input_len,
        output_len=ns.output_len,
        range_ratio=ns.range_ratio,
        images_per_request=ns.images_per_request,
        image_width=ns.image_width,
        image_height=ns.image_height,
        image_format=ns.image_format,
        image_pixel_pool=ns.image_pixel_pool,
        turns=ns.turns,
        turn_input_len=ns.turn_input_len,
    )
    run_config = DatasetConfig(
        num_requests=ns.num_prompts, image_reuse_fraction=ns.image_reuse_fraction, seed=ns.seed, **common
    )
    # Warm-ups get images of their own (another seed): the run's cache hits are the run's own.
    warmup_config = DatasetConfig(num_requests=ns.num_warmups, seed=ns.seed + 1_000_003, **common)
    return build_requests(run_config, tokenizer), build_requests(warmup_config, tokenizer)


async def _run_all(
    client, url, backend: Backend, requests, payloads, encode, ns, progress
) -> list[RequestResult]:
    """Send every request: Poisson arrivals at --request_rate, at most --max_concurrency at once;
    each request starts a conversation of --turns turns, one after the other."""
    gate = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else contextlib.nullcontext()
    rng = random.Random(ns.seed)

    async def conversation(request: BenchRequest, payload: bytes) -> list[RequestResult]:
        results = []
        while True:
            result = RequestResult(request.prompt_len, request.output_len, turn=request.turn)
            async with gate:
                await send(client, url, backend, payload, result, ns.disconnect_after)
            results.append(result)
            if progress is not None:
                progress.advance()
            if request.turn >= ns.turns or not result.ok:
                return results
            request = request.next_turn(result.text)
            payload = encode(request)

    tasks = []
    for i, (request, payload) in enumerate(zip(requests, payloads, strict=True)):
        if i > 0 and not math.isinf(ns.request_rate):
            await asyncio.sleep(rng.expovariate(ns.request_rate))  # exponential gaps: Poisson arrivals
        tasks.append(asyncio.create_task(conversation(request, payload)))
    return [result for results in await asyncio.gather(*tasks) for result in results]


async def _check_reachable(client: httpx.AsyncClient, base_url: str) -> None:
    """Any HTTP answer will do (an OpenAI server may have no /health): only a dead socket fails."""
    try:
        await client.get(base_url + "/health", timeout=10)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise BenchError(f"cannot reach the server at {base_url} ({reason}); is it running?") from None


async def _first_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        response = await client.get(base_url + "/v1/models", timeout=10)
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{base_url}/v1/models names no model; pass --model") from None


async def _cache_counters(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    try:
        response = await client.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return cache_counters(response.text) if response.status_code == 200 else None


class Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal; elsewhere (a log file,
    a pipe) only the final count is written."""

    def __init__(self, total: int, width: int = 40) -> None:
        self.total, self.width, self.done = total, width, 0
        self.live = sys.stderr.isatty()
        self.started = time.perf_counter()
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        if self.live:
            filled = self.width * self.done // max(self.total, 1)
            elapsed = time.perf_counter() - self.started
            bar = "#" * filled + "." * (self.width - filled)
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} requests, {elapsed:.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
        else:
            elapsed = time.perf_counter() - self.started
            sys.stderr.write(f"vlmd bench: {self.done}/{self.total} requests done in {elapsed:.1f} s\n")
        sys.stderr.flush()
