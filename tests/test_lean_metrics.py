"""The lean metrics expose what prometheus-client's own would, for the same updates."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from twinroute.lean_metrics import LeanCounter, LeanHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0, 0.0005, 0.001, 0.001000001, 0.05, 0.1, 0.7, 1.0, 3.0, 1e9)


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample but the `_created` ones (the lean metrics have none)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_histograms_expose_the_same_buckets_sum_and_count() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["kind"], buckets=BUCKETS, registry=theirs)
    lean = LeanHistogram("h_seconds", "doc", ["kind"], buckets=BUCKETS, registry=ours)
    plain_reference = Histogram("p_seconds", "doc", buckets=BUCKETS, registry=theirs)
    plain = LeanHistogram("p_seconds", "doc", buckets=BUCKETS, registry=ours)
    for index, value in enumerate(VALUES):
        kind = "a" if index % 3 else "b"
        reference.labels(kind).observe(value)
        lean.labels(kind).observe(value)
        plain_reference.observe(value)
        plain.child().observe(value)
    assert _samples(ours) == _samples(theirs)
    # 0.0005 and 0.001 itself: a bound holds the values equal to it
    assert ours.get_sample_value("h_seconds_bucket", {"kind": "a", "le": "0.001"}) == 2


def test_counters_expose_the_same_totals() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("c", "doc", ["route", "status"], registry=theirs)
    lean = LeanCounter("c", "doc", ["route", "status"], registry=ours)
    plain_reference = Counter("d_total", "doc", registry=theirs)
    plain = LeanCounter("d_total", "doc", registry=ours)
    for index in range(7):
        reference.labels("/v1/completions", 200 + index % 2).inc()
        lean.labels("/v1/completions", str(200 + index % 2)).inc()
        plain_reference.inc(0.5)
        plain.inc(0.5)
    assert _samples(ours) == _samples(theirs)
    assert ours.get_sample_value("d_total") == 3.5


def test_unlabelled_metrics_are_exposed_at_zero_before_any_update() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    Counter("c", "doc", registry=theirs)
    Histogram("h", "doc", buckets=BUCKETS, registry=theirs)
    LeanCounter("c", "doc", registry=ours)
    LeanHistogram("h", "doc", buckets=BUCKETS, registry=ours)
    assert _samples(ours) == _samples(theirs)


def test_misuse_is_refused_clearly() -> None:
    registry = CollectorRegistry()
    counter = LeanCounter("c", "doc", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="1 label values expected"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="use labels"):
        counter.inc()
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        LeanHistogram("h", "doc", buckets=(1.0, 0.5), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        LeanCounter("c", "doc", registry=registry)


def test_label_values_given_as_other_types_name_the_same_series() -> None:
    registry = CollectorRegistry()
    counter = LeanCounter("answers", "doc", ["status"], registry=registry)
    counter.labels(200).inc()
    counter.labels("200").inc()
    assert counter.labels(200) is counter.labels("200")
    assert registry.get_sample_value("answers_total", {"status": "200"}) == 2
