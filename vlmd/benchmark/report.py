"""Benchmark figures from per-request results: throughput, latency percentiles, embed-cache hits.

TTFT: sent to first token. TPOT: (E2E - TTFT) / (output tokens - 1), per request. ITL: every gap
between token arrivals, all requests pooled. E2E: sent to last token. Percentiles interpolate
linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

import math
import statistics
import time

from prometheus_client.parser import text_string_to_metric_families

from vlmd.benchmark.backends import RequestResult

CACHE_COUNTERS = {"hits": "vlmd_embed_cache_hits_total", "misses": "vlmd_embed_cache_misses_total"}
LATENCIES = (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token (excl. 1st)"))
LATENCIES += (("itl_ms", "Inter-token latency"), ("e2e_latency_ms", "End-to-end latency"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    values = [v * 1000 for v in values_s]
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def cache_counters(metrics_text: str) -> dict[str, float] | None:
    """The embed-cache counters of a /metrics page; None when it has none (not a vlmd server)."""
    values = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                values[sample.name] = sample.value
    except ValueError:
        return None
    if not all(name in values for name in CACHE_COUNTERS.values()):
        return None
    return {key: values[name] for key, name in CACHE_COUNTERS.items()}


def cache_hit_rate(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    if before is None or after is None:
        return {"embed_cache_hit_rate": None, "embed_cache_hits": None, "embed_cache_misses": None}
    hits, misses = (after[key] - before[key] for key in ("hits", "misses"))
    rate = hits / (hits + misses) if hits + misses > 0 else None
    return {"embed_cache_hit_rate": rate, "embed_cache_hits": int(hits), "embed_cache_misses": int(misses)}


def longest_gaps(results: list[RequestResult], count: int = 10) -> list[dict]:
    """The `count` longest gaps between tokens, each with the wall-clock time its token came (local
    time, as the server's log lines have it): to find what the server did meanwhile."""
    gaps = []
    for r in results:
        arrival = r.ttft
        for gap in r.itls:
            arrival += gap
            gaps.append((gap, r.sent_at + arrival))
    gaps.sort(reverse=True)
    return [{"itl_ms": gap * 1000, "arrived": _clock(when)} for gap, when in gaps[:count]]


def _clock(when: float) -> str:
    seconds, ms = divmod(round(when * 1000), 1000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ms:03d}"


def build_report(results: list[RequestResult], duration_s: float) -> dict:
    good = [r for r in results if r.ok]
    input_tokens = sum(
        r.prompt_tokens if r.prompt_tokens is not None else r.expected_prompt_tokens for r in good
    )
    output_tokens = sum(r.output_tokens for r in good)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "successful_requests": len(good),
        "failed_requests": len(results) - len(good),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(good) / duration_s,
        "input_token_throughput": input_tokens / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": summary_ms([r.ttft for r in good]),
        "tpot_ms": summary_ms(tpots),
        "itl_ms": summary_ms([gap for r in good for gap in r.itls]),
        "e2e_latency_ms": summary_ms([r.e2e for r in good]),
        # Conversations (--turns): the first turn computes its prompt whole; later ones repeat it.
        "ttft_ms_first_turn": summary_ms([r.ttft for r in good if r.turn == 1]),
        "ttft_ms_later_turns": summary_ms([r.ttft for r in good if r.turn > 1]),
        "longest_itls": longest_gaps(good),
        "errors": errors[:10],
        "requests": [
            {
                "ok": r.ok,
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "requested_output_tokens": r.requested_output_tokens,
                "turn": r.turn,
                "ttft_ms": None if r.ttft is None else r.ttft * 1000,
                "e2e_ms": None if r.e2e is None else r.e2e * 1000,
                # Each request's own: how much a percentile moves from one stretch of a run to the next.
                "itl_p99_ms": percentile(r.itls, 99) * 1000 if r.ok and r.itls else None,
                "error": r.error or None,
            }
            for r in results
        ],
    }


def format_table(report: dict) -> str:
    rate = report.get("embed_cache_hit_rate")
    rows = [
        ("Backend", report["backend"]),
        ("Successful requests", report["successful_requests"]),
        ("Failed requests", report["failed_requests"]),
        ("Benchmark duration (s)", f"{report['duration_s']:.2f}"),
        ("Total input tokens", report["total_input_tokens"]),
        ("Total output tokens", report["total_output_tokens"]),
        ("Request throughput (req/s)", f"{report['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{report['input_token_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{report['output_token_throughput']:.2f}"),
        ("Embed-cache hit rate", "n/a" if rate is None else f"{rate:.1%}"),
    ]
    lines = ["=" * 28 + " vlmd bench " + "=" * 28]
    lines += [f"{name:<40}{value:>28}" for name, value in rows]
    lines.append(f"{'(ms)':<36}{'mean':>8}{'median':>8}{'p90':>8}{'p99':>8}")
    latencies = LATENCIES
    if report["ttft_ms_later_turns"]["mean"] is not None:
        latencies += (
            ("ttft_ms_first_turn", "TTFT, first turns"),
            ("ttft_ms_later_turns", "TTFT, later turns"),
        )
    for key, name in latencies:
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>8}" for v in report[key].values())
        lines.append(f"{name:<36}{cells}")
    lines.append("=" * 68)
    return "\n".join(lines)
