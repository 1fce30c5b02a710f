"""Fixed-bucket histograms for /metrics: observed in one actor, shipped as a HistogramSnapshot,
rendered by the http actor. Pure Python, so any actor (or test) can own one."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from vlmd.messages import HistogramSnapshot


class Histogram:
    """Observation counts per bucket; a bucket holds the values <= its bound (Prometheus `le`)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        assert bounds and list(bounds) == sorted(set(bounds)), "bounds must be increasing"
        self.bounds = [float(bound) for bound in bounds]
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is (bounds[-1], +Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(list(self.bounds), list(self.counts), self.sum)
