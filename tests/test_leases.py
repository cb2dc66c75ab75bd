from __future__ import annotations

import pytest
from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.leases import LeaseTable

# 1,000 prefill tokens per second, no decode slowdown to speak of: easy arithmetic.
COST = CostModel(
    name="test",
    linear_tokens_per_s=1000.0,
    attention_s_per_token_pair=0.0,
    step_overhead_s=0.0,
    decode_overhead_s=0.01,
    per_sequence_s=0.0,
    kv_read_s_per_token=0.0,
    step_token_budget=1_000_000,
)


def open_lease(
    table: LeaseTable,
    *,
    endpoint: str = "a",
    now: float = 0.0,
    uncached: int = 1000,
    streams: bool = True,
):
    return table.open(
        endpoint_id=endpoint,
        request_id="r",
        now=now,
        prompt_tokens=uncached,
        uncached_tokens=uncached,
        predicted_ttft_s=1.0,
        reports_first_token=streams,
    )


def test_pending_prefill_drains_fifo_at_the_cost_model_rate() -> None:
    table = LeaseTable(cost_model=COST)
    open_lease(table, uncached=1000)
    open_lease(table, uncached=500)
    assert table.load("a", now=0.0).pending_prefill_tokens == 1500
    load = table.load("a", now=0.5)
    assert (load.pending_prefill_tokens, load.decoding) == (1000, 0)
    load = table.load("a", now=1.2)
    assert (load.pending_prefill_tokens, load.decoding) == (300, 1)
    load = table.load("a", now=5.0)
    assert (load.pending_prefill_tokens, load.decoding, load.in_flight) == (0, 2, 2)


def test_first_token_settles_every_lease_queued_before_it() -> None:
    table = LeaseTable(cost_model=COST)
    open_lease(table, uncached=1000)
    second = open_lease(table, uncached=1000)
    open_lease(table, uncached=1000)
    assert table.first_token(second.lease_id, now=0.1)
    load = table.load("a", now=0.1)
    assert (load.pending_prefill_tokens, load.decoding) == (1000, 2)


def test_close_releases_everything_it_held() -> None:
    table = LeaseTable(cost_model=COST)
    lease = open_lease(table, uncached=1000)
    assert table.close(lease.lease_id, now=0.2) is lease
    load = table.load("a", now=0.2)
    assert (load.in_flight, load.pending_prefill_tokens, load.decoding) == (0, 0, 0)
    assert table.close(lease.lease_id, now=0.3) is None


def test_leases_expire_so_counts_never_leak() -> None:
    table = LeaseTable(cost_model=COST, ttl_s=30.0)
    open_lease(table, now=0.0)
    open_lease(table, now=20.0)
    expired = table.expire(now=40.0)
    assert len(expired) == 1 and table.expired_total == 1
    assert table.load("a", now=40.0).in_flight == 1


def test_loads_are_per_endpoint() -> None:
    table = LeaseTable(cost_model=COST)
    open_lease(table, endpoint="a")
    open_lease(table, endpoint="b", uncached=0)
    assert table.load("a", now=0.0).pending_prefill_tokens == 1000
    b = table.load("b", now=0.0)
    assert (b.pending_prefill_tokens, b.decoding) == (0, 1)
    assert table.load("never", now=0.0).in_flight == 0
    assert len(table.forget_endpoint("a", now=0.0)) == 1
    assert len(table) == 1


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="TTL"):
        LeaseTable(cost_model=COST, ttl_s=0)


def test_once_first_tokens_are_reported_the_drain_waits_for_them() -> None:
    # The engine is slower than the model (e.g. requests wait for KV memory): without a
    # report, the leases behind an unreported one stay pending instead of looking prefilled.
    table = LeaseTable(cost_model=COST)
    first = open_lease(table, uncached=1000)
    assert table.first_token(first.lease_id, now=0.5)
    second = open_lease(table, now=0.5, uncached=1000)
    open_lease(table, now=0.5, uncached=1000)
    load = table.load("a", now=10.0)
    assert (load.pending_prefill_tokens, load.decoding) == (1000, 1)
    assert table.first_token(second.lease_id, now=10.0)
    load = table.load("a", now=10.5)
    assert (load.pending_prefill_tokens, load.decoding) == (500, 2)


def test_without_first_token_reports_the_fluid_estimate_drains_everything() -> None:
    table = LeaseTable(cost_model=COST)
    for _ in range(3):
        open_lease(table, uncached=1000)
    load = table.load("a", now=10.0)
    assert (load.pending_prefill_tokens, load.decoding) == (0, 3)


def test_a_request_that_does_not_stream_does_not_freeze_the_estimate() -> None:
    # Regression: a non-streamed request has no first token to report; the drain waited at it
    # for the whole of its generation, and every lease behind it stayed pending.
    table = LeaseTable(cost_model=COST)
    streamed = open_lease(table, uncached=1000)
    assert table.first_token(streamed.lease_id, now=1.0)
    open_lease(table, now=1.0, uncached=1000, streams=False)
    open_lease(table, now=1.0, uncached=1000)
    load = table.load("a", now=60.0)
    # The whole answer is still on its way, but by the model both prefills are long done;
    # the streamed one behind it is held at zero tokens until its own report.
    assert (load.pending_prefill_tokens, load.decoding) == (0, 2)
