"""/metrics: Prometheus text rendering of the scheduler's snapshot (which carries the vision
actor's counters and histograms, and the scheduler's wait for images) and of the http actor's own
latency histograms (its image preprocessing among them)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vlmd.core.histogram import Histogram
from vlmd.messages import GetMetrics, HistogramSnapshot, MetricsSnapshot

# snapshot key -> (metric name without the _total suffix, help)
COUNTERS = {
    "vit_images_total": ("vlmd_vit_images", "images the ViT actually encoded"),
    "images_preprocessed_total": (
        "vlmd_images_preprocessed",
        "images decoded, tiled and normalised (by the http actor's and the vision front's requests)",
    ),
    "embed_cache_hits_total": ("vlmd_embed_cache_hits", "images whose embeddings came from the MD5 cache"),
    "embed_cache_misses_total": ("vlmd_embed_cache_misses", "images that had to be encoded"),
    "embed_cache_evictions_total": ("vlmd_embed_cache_evictions", "embeddings evicted from the MD5 cache"),
    "prefix_cache_queried_tokens_total": (
        "vlmd_prefix_cache_queried_tokens",
        "tokens looked up in the prefix cache when requests were admitted",
    ),
    "prefix_cache_hit_tokens_total": (
        "vlmd_prefix_cache_hit_tokens",
        "of those, tokens whose KV was cached (not computed again)",
    ),
    "prefix_cache_evicted_pages_total": (
        "vlmd_prefix_cache_evicted_pages",
        "cached KV pages evicted (least recently used first) to free pages",
    ),
    "preemptions_total": (
        "vlmd_preemptions",
        "running requests sent back to the queue (KV freed) for an older one's pages",
    ),
    "decode_steps_prefill_capped_total": (
        "vlmd_decode_steps_prefill_capped",
        "steps whose prompt tokens beside decode rows were held to --decode_step_prefill_tokens",
    ),
    "side_steps_total": (
        "vlmd_side_steps",
        "steps of prompt spans run beside the decode steps, on SMs of their own (--prefill_sms)",
    ),
}
GAUGES = {
    "kv_pages_used": ("vlmd_kv_pages_used", "KV cache pages requests hold"),
    "kv_pages_cached": (
        "vlmd_kv_pages_cached",
        "KV cache pages no request holds, kept for the prefix cache (evicted when pages run out)",
    ),
    "kv_pages_total": ("vlmd_kv_pages_total", "KV cache pages in the pool"),
    "embed_cache_pinned_images": (
        "vlmd_embed_cache_pinned_images",
        "images in the MD5 cache pinned by requests in flight or an encode (never evicted)",
    ),
    "requests_running": ("vlmd_requests_running", "requests in the running batch"),
    "requests_waiting": ("vlmd_requests_waiting", "requests waiting for images or KV pages"),
    "requests_queued": (
        "vlmd_requests_queued",
        "requests accepted and not yet given their first token (bounded by --max_queued_requests)",
    ),
}
HISTOGRAMS = {
    "time_to_first_token_seconds": (
        "vlmd_time_to_first_token_seconds",
        "from the parsed request to its first token",
    ),
    "inter_token_latency_seconds": ("vlmd_inter_token_latency_seconds", "between consecutive tokens"),
    "e2e_request_latency_seconds": (
        "vlmd_e2e_request_latency_seconds",
        "from the parsed request to its last token",
    ),
    "vit_batch_size": ("vlmd_vit_batch_size", "images per ViT batch"),
    "image_preprocess_seconds": (
        "vlmd_image_preprocess_seconds",
        "a request's images loaded (base64 or URL), decoded, tiled and normalised, in the http actor",
    ),
    "image_wait_seconds": (
        "vlmd_image_wait_seconds",
        "from a request with images reaching the scheduler to its embeddings ready (ViT queue and forward)",
    ),
    "image_preprocess_worker_seconds": (
        "vlmd_image_preprocess_worker_seconds",
        "an image inside a preprocess worker (decoded, tiled, written to shared memory), for the http actor",
    ),
    "vit_batch_seconds": (
        "vlmd_vit_batch_seconds",
        "a ViT batch on its replica, from its dispatch to its rows written (the forward, and any wait "
        "for the GPU or the replica's thread)",
    ),
}
FINISHED_PREFIX = "requests_finished_"
VIT_REPLICA_PREFIX = "vit_replica_images_"  # + the replica's number: images that ViT replica encoded
PREPROCESS_WORKER_PREFIX = "preprocess_worker_images_"  # + the worker's rank: images it preprocessed

TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
VIT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
IMAGE_STAGE_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
# A histogram nobody has reported yet (no image encoded so far) renders empty with these bounds.
BUCKETS = {
    "time_to_first_token_seconds": TTFT_BUCKETS_S,
    "inter_token_latency_seconds": ITL_BUCKETS_S,
    "e2e_request_latency_seconds": E2E_BUCKETS_S,
    "vit_batch_size": VIT_BATCH_BUCKETS,
    "image_preprocess_seconds": IMAGE_STAGE_BUCKETS_S,
    "image_wait_seconds": IMAGE_STAGE_BUCKETS_S,
    "image_preprocess_worker_seconds": IMAGE_STAGE_BUCKETS_S,
    "vit_batch_seconds": IMAGE_STAGE_BUCKETS_S,
}


def add_preprocess_counts(values: dict[str, float], num_images: list[int]) -> None:
    """Add one actor's images per preprocess worker (`PreprocessPool.num_images`) to `values`,
    which may hold another actor's already: both ask the same workers."""
    for rank, count in enumerate(num_images):
        key = f"{PREPROCESS_WORKER_PREFIX}{rank}"
        values[key] = values.get(key, 0.0) + count
    values["images_preprocessed_total"] = values.get("images_preprocessed_total", 0.0) + sum(num_images)


class LatencyMetrics:
    """The http actor's latency histograms; it sees every token arrive, as the client would."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.image_preprocess = Histogram(IMAGE_STAGE_BUCKETS_S)

    def on_tokens(self, arrival: float, last_token_at: float | None, num_tokens: int, now: float) -> None:
        """`num_tokens` arrived at `now` for a request that arrived at `arrival` and last received a
        token at `last_token_at` (None: these are its first). Tokens arriving together are 0 s apart."""
        if last_token_at is None:
            self.ttft.observe(now - arrival)
        else:
            self.itl.observe(now - last_token_at)
        for _ in range(num_tokens - 1):
            self.itl.observe(0.0)

    def on_finished(self, arrival: float, now: float) -> None:
        self.e2e.observe(now - arrival)

    def snapshots(self) -> dict[str, HistogramSnapshot]:
        return {
            "time_to_first_token_seconds": self.ttft.snapshot(),
            "inter_token_latency_seconds": self.itl.snapshot(),
            "e2e_request_latency_seconds": self.e2e.snapshot(),
            "image_preprocess_seconds": self.image_preprocess.snapshot(),
        }


class MetricsQueries:
    """Scrapes waiting for the scheduler's snapshot, by query id.

    A scrape's entry is removed when the scrape ends, however it ends (answered, timed out,
    cancelled, failed to send), so a scheduler that never answers a query leaves nothing behind.
    """

    def __init__(self, send: Callable[[GetMetrics], None]) -> None:
        self._send = send
        self._pending: dict[int, asyncio.Future[MetricsSnapshot]] = {}
        self._query_ids = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    async def ask(self, timeout_s: float) -> MetricsSnapshot:
        """The scheduler's snapshot; TimeoutError if it does not come within `timeout_s`."""
        query_id = next(self._query_ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[query_id] = future
        try:
            self._send(GetMetrics(query_id))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            del self._pending[query_id]

    def answer(self, snapshot: MetricsSnapshot) -> None:
        """A snapshot arrived; one whose scrape has ended (a late answer) is dropped."""
        future = self._pending.get(snapshot.query_id)
        if future is not None and not future.done():
            future.set_result(snapshot)


class _Snapshot:
    def __init__(self, values: dict[str, float], histograms: dict[str, HistogramSnapshot]) -> None:
        self.values = values
        self.histograms = histograms

    def collect(self):
        for key, (name, help_text) in COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=self.values.get(key, 0.0))
        for key, (name, help_text) in GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=self.values.get(key, 0.0))
        finished = CounterMetricFamily(
            "vlmd_requests_finished", "finished requests", labels=["finish_reason"]
        )
        for key, value in sorted(self.values.items()):
            if key.startswith(FINISHED_PREFIX):
                finished.add_metric([key.removeprefix(FINISHED_PREFIX)], value)
        yield finished
        per_replica = CounterMetricFamily(
            "vlmd_vit_replica_images", "images each ViT replica (--visual_dp) encoded", labels=["replica"]
        )
        for key, value in sorted(self.values.items()):
            if key.startswith(VIT_REPLICA_PREFIX):
                per_replica.add_metric([key.removeprefix(VIT_REPLICA_PREFIX)], value)
        yield per_replica
        per_worker = CounterMetricFamily(
            "vlmd_preprocess_worker_images",
            "images each preprocess worker (--preprocess_workers) decoded, tiled and normalised",
            labels=["worker"],
        )
        for key, value in sorted(self.values.items()):
            if key.startswith(PREPROCESS_WORKER_PREFIX):
                per_worker.add_metric([key.removeprefix(PREPROCESS_WORKER_PREFIX)], value)
        yield per_worker
        for key, (name, help_text) in HISTOGRAMS.items():
            snapshot = self.histograms.get(key) or Histogram(BUCKETS[key]).snapshot()
            yield _histogram_family(name, help_text, snapshot)


def _histogram_family(name: str, help_text: str, snapshot: HistogramSnapshot) -> HistogramMetricFamily:
    assert len(snapshot.counts) == len(snapshot.bounds) + 1
    edges = [f"{bound:g}" for bound in snapshot.bounds] + ["+Inf"]
    cumulative = list(accumulate(snapshot.counts))
    return HistogramMetricFamily(
        name, help_text, buckets=list(zip(edges, cumulative, strict=True)), sum_value=snapshot.sum
    )


def render_metrics(values: dict[str, float], histograms: dict[str, HistogramSnapshot]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values, histograms))
    return generate_latest(registry)
