"""A fixed-bucket histogram for the hot path, and its Prometheus collector.

The OpenTelemetry SDK spends ~6-15 µs on each `Histogram.record` (attribute hashing, locks,
measurement objects), which per entry would double what a trivial stage spends. Here an
observation is a `bisect` and two additions (~0.3 µs); a scrape turns the counts into a
Prometheus histogram with the same name, labels and `le` buckets the OTel exporter would give.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector


class Buckets:
    """Cumulative counts per label values; observed on the event loop, read by scrapes."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # label values -> [count per bucket (last: above every bound), sum]
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        found = self.series.get(labels)
        if found is None:
            found = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        found[0][bisect_left(self.bounds, value)] += 1  # the first bound >= value: `le`
        found[1][0] += value


class BucketsCollector(Collector):
    """Exposes a `Buckets` as the Prometheus histogram `name` (with `_bucket/_sum/_count`)."""

    def __init__(
        self, name: str, documentation: str, label_names: Sequence[str], buckets: Buckets
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label_names = list(label_names)
        self._buckets = buckets

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._label_names)
        bounds = [*map(str, self._buckets.bounds), "+Inf"]
        for labels, (counts, total) in list(self._buckets.series.items()):
            cumulative = list(accumulate(list(counts)))
            family.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), total[0])
        yield family
