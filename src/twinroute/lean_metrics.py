"""Counters and histograms for the request path, exposed through prometheus-client.

prometheus-client's `Histogram.observe` and `Counter.labels(...).inc` take a lock per value and
walk the buckets one Python call at a time: 0.8 and 1.3 us on an idle 2-core VM, against 0.2
and 0.5 us here (`tools/hot_path_parts.py --parts metrics`,
`benchmarks/hot_path/metric_updates.json`). A request through the router with its embedded
scheduler makes seven observations and about as many increments: some 9 us of the half
millisecond the router spends on it. The metrics here keep plain numbers (an observation is a
bisect and two additions) and build prometheus-client's metric families only when scraped, so
the exposition, names, labels and buckets stay what Prometheus expects (without the `_created`
series).

They are for values written by one thread, the event loop's: with no lock, updates from two
threads at once could lose one. A scrape from another thread may read a histogram's count and
sum one observation apart, which Prometheus tolerates (rates of both agree over any window).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# How prometheus-client writes a bucket's bound (`le`), so both kinds of histogram agree.
_bound_text: Callable[[float], str] = floatToGoString


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counters only go up; got an increment of {amount}")
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


_Child = TypeVar("_Child", _CounterChild, _HistogramChild)


class _Family(Collector, Generic[_Child]):
    """One metric name with its label names; children by label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        # The same children by the values as callers give them (an int status, say), so that
        # a repeated `labels(...)` is one dict lookup.
        self._given: dict[tuple[object, ...], _Child] = {}
        self._only: _Child | None = None
        if not self.labelnames:  # exposed from the start, at zero, as prometheus-client does
            self._only = self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object) -> _Child:
        child = self._given.get(values)
        if child is None:
            child = self._given[values] = self._child_for(tuple(str(v) for v in values))
        return child

    def _child_for(self, values: tuple[str, ...]) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(
                    f"{self.name}: {len(self.labelnames)} label values expected "
                    f"({', '.join(self.labelnames)}), got {len(values)}"
                )
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def _unlabelled(self) -> _Child:
        if self._only is None:
            raise ValueError(f"{self.name} has labels ({', '.join(self.labelnames)}): use labels()")
        return self._only

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LeanCounter(_Family[_CounterChild]):
    """A counter, as `prometheus_client.Counter` exposes it (`NAME_total`), without its
    `_created` series."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None,
    ) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LeanHistogram(_Family[_HistogramChild]):
    """A histogram with fixed upper bounds (`+Inf` added), as `prometheus_client.Histogram`
    exposes it, without its `_created` series."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets if not math.isinf(bound))
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"{name}: buckets must be increasing and distinct, got {buckets}")
        self.bounds = bounds
        self._labels_text = (*(_bound_text(bound) for bound in bounds), "+Inf")
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def observe(self, amount: float) -> None:
        self._unlabelled().observe(amount)

    def child(self) -> _HistogramChild:
        """The unlabelled histogram itself, for a caller that observes it on a hot path."""
        return self._unlabelled()

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for label, count in zip(self._labels_text, counts, strict=True):
                cumulative += count
                buckets.append((label, float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family
