"""Prometheus text rendering of the scheduler's metrics snapshot."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# snapshot key -> (metric name without the _total suffix, kind, help)
COUNTERS = {
    "vit_images_total": ("vlmd_vit_images", "images the ViT actually encoded"),
    "embed_cache_hits_total": ("vlmd_embed_cache_hits", "images whose embeddings came from the MD5 cache"),
    "embed_cache_misses_total": ("vlmd_embed_cache_misses", "images that had to be encoded"),
}
GAUGES = {
    "kv_pages_used": ("vlmd_kv_pages_used", "KV cache pages in use"),
    "kv_pages_total": ("vlmd_kv_pages_total", "KV cache pages in the pool"),
    "requests_running": ("vlmd_requests_running", "requests in the running batch"),
    "requests_waiting": ("vlmd_requests_waiting", "requests waiting for images or KV pages"),
}
FINISHED_PREFIX = "requests_finished_"


class _Snapshot:
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

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


def render_metrics(values: dict[str, float]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values))
    return generate_latest(registry)
