"""The gRPC scheduler on 127.0.0.1:0 with a real channel: every RPC, health, reflection, bad
input as status codes, leases (TTL on an injected clock), drain, auth, graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from twinroute.scheduler.api import (
    InvalidPickError,
    PickQuery,
    SchedulerUnreachableError,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.build import build_service
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.server import GrpcServer, TlsFiles
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint, NoEndpointError
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

from twinroute.vocabulary import DecisionReason

MODEL = "tiny-llama"
ADMIN_TOKEN = "s3cret"
AUTHORIZED = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


class FakeClock:
    """Injected time: tests move it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    service: SchedulerService
    server: GrpcServer
    client: SchedulerClient
    stub: Any
    channel: grpc.aio.Channel
    clock: FakeClock
    registry: CollectorRegistry


def make_service(
    *, policy: str = "dualmap", endpoints: int = 4, lease_ttl_s: float = 60.0
) -> tuple[SchedulerService, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    registry = CollectorRegistry()
    settings = SchedulerSettings(
        policy=policy,
        ttft_slo_s=2.0,
        lease_ttl_s=lease_ttl_s,
        key_block_tokens=16,
        key_block_chars=64,
    )
    service = build_service(
        settings, registry=registry, clock=clock, wall_clock=lambda: 1.7e9 + clock.now
    )
    service.set_endpoints(
        [
            Endpoint(id=f"e{i}", address=f"127.0.0.1:{8000 + i}", model=MODEL)
            for i in range(endpoints)
        ]
    )
    return service, clock, registry


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    service, clock, registry = make_service()
    server = GrpcServer(service=service, listen="127.0.0.1:0", admin_token=ADMIN_TOKEN)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    client = SchedulerClient(target=server.address, timeout_s=5.0, admin_token=ADMIN_TOKEN)
    try:
        yield Harness(
            service, server, client, pb_grpc.SchedulerStub(channel), channel, clock, registry
        )
    finally:
        await client.close()
        await channel.close()
        await server.stop(grace_s=0.5)


def tokens(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.uint32)


async def test_pick_then_complete_closes_the_lease(harness: Harness) -> None:
    answer = await harness.client.pick(
        PickQuery(request_id="r1", model=MODEL, token_ids=tokens(256))
    )
    assert answer.endpoint.id in {"e0", "e1", "e2", "e3"}
    assert answer.endpoint.address.startswith("127.0.0.1:")
    assert answer.policy == "dualmap"
    assert isinstance(answer.reason, DecisionReason)
    assert answer.predicted_ttft_s > 0
    assert harness.service.core.in_flight(answer.endpoint.id) == 1
    assert await harness.client.complete(lease_id=answer.lease_id, observed_ttft_s=0.05)
    assert harness.service.core.in_flight(answer.endpoint.id) == 0
    # A second Complete of the same lease is answered, not an error.
    assert not await harness.client.complete(lease_id=answer.lease_id)


async def test_same_prefix_goes_to_the_same_endpoint_text_and_tokens(harness: Harness) -> None:
    first = await harness.client.pick(PickQuery(request_id="a", model=MODEL, token_ids=tokens(512)))
    again = await harness.client.pick(PickQuery(request_id="b", model=MODEL, token_ids=tokens(512)))
    assert again.endpoint.id == first.endpoint.id
    assert again.expected_cached_blocks == 512 // 16
    text = "You are a helpful assistant. " * 40
    t1 = await harness.client.pick(PickQuery(request_id="c", model=MODEL, text=text))
    t2 = await harness.client.pick(PickQuery(request_id="d", model=MODEL, text=text + "Hi"))
    assert t1.endpoint.id == t2.endpoint.id


@pytest.mark.parametrize(
    ("request_fields", "code", "needle"),
    [
        ({"model": MODEL}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"model": MODEL, "prompt": pb.Prompt(text="")}, grpc.StatusCode.INVALID_ARGUMENT,
         "prompt is empty"),
        ({"model": MODEL, "prompt": pb.Prompt(token_ids=pb.TokenIds(ids=[]))},
         grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"prompt": pb.Prompt(text="hello")}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ({"model": "other-model", "prompt": pb.Prompt(text="hello")},
         grpc.StatusCode.NOT_FOUND, "not served"),
        ({"model": MODEL, "prompt": pb.Prompt(text="hello"),
          "exclude_endpoints": ["e0", "e1", "e2", "e3"]},
         grpc.StatusCode.UNAVAILABLE, "excluded"),
        ({"model": MODEL, "prompt": pb.Prompt(text="hello"), "ttft_slo_s": -1.0},
         grpc.StatusCode.INVALID_ARGUMENT, "must be positive"),
    ],
    ids=["no-prompt", "empty-text", "empty-token-ids", "no-model", "unknown-model",
         "all-excluded", "negative-slo"],
)  # fmt: skip
async def test_bad_picks_get_status_codes_with_reasons(
    harness: Harness, request_fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Pick(
            pb.PickRequest(request_id="bad", **request_fields),  # type: ignore[arg-type]
            metadata=AUTHORIZED,
        )
    assert caught.value.code() == code
    assert needle in (caught.value.details() or "")


async def test_client_raises_typed_errors(harness: Harness) -> None:
    with pytest.raises(InvalidPickError):
        await harness.client.pick(PickQuery(request_id="x", model=MODEL, text=""))
    with pytest.raises(UnknownModelError):
        await harness.client.pick(PickQuery(request_id="x", model="nope", text="hi"))
    with pytest.raises(NoEndpointError):
        await harness.client.pick(
            PickQuery(
                request_id="x",
                model=MODEL,
                text="hi",
                exclude_endpoints=frozenset({"e0", "e1", "e2", "e3"}),
            )
        )
    with pytest.raises(UnknownEndpointError):
        await harness.client.drain(endpoint_id="nope")


async def test_empty_pool_is_unavailable() -> None:
    service, _, _ = make_service(endpoints=0)
    service.core.set_endpoints([Endpoint(id="only", address="127.0.0.1:1", model=MODEL)])
    service.core.set_health("only", healthy=False)
    with pytest.raises(NoEndpointError, match="no routable endpoint"):
        await service.pick(PickQuery(request_id="r", model=MODEL, text="hello"))


async def test_models_filter_endpoints() -> None:
    service, _, _ = make_service(endpoints=0)
    service.set_endpoints(
        [
            Endpoint(id="a", address="127.0.0.1:1", model="m1"),
            Endpoint(id="b", address="127.0.0.1:2", model="m2"),
        ]
    )
    for i in range(8):
        answer = await service.pick(PickQuery(request_id=str(i), model="m2", text=f"p{i} " * 30))
        assert answer.endpoint.id == "b"


async def test_list_endpoints_reports_leases_and_unknown_scrapes(harness: Harness) -> None:
    answer = await harness.client.pick(PickQuery(request_id="r", model=MODEL, token_ids=tokens(64)))
    harness.service.core.update_scrape(
        "e0", running=3, queued=2, kv_usage=0.5, now=harness.clock.now
    )
    statuses = await harness.client.list_endpoints()
    by_id = {status.endpoint.id: status for status in statuses}
    assert set(by_id) == {"e0", "e1", "e2", "e3"}
    assert by_id[answer.endpoint.id].load.in_flight == 1
    assert (by_id["e0"].load.running, by_id["e0"].load.queued) == (3, 2)
    assert by_id["e0"].load.scrape_age_s == 0.0
    # Never scraped: unknown, not zero load, on the wire as in-process.
    assert by_id["e1"].load.scrape_age_s is None and by_id["e1"].load.running is None
    assert statuses == await harness.service.list_endpoints()
    raw = await harness.stub.ListEndpoints(pb.ListEndpointsRequest(), metadata=AUTHORIZED)
    assert raw.policy == "dualmap"
    harness.clock.now += 60  # the scrape is stale now
    stale = {s.endpoint.id: s for s in await harness.client.list_endpoints()}
    assert stale["e0"].load.scrape_age_s is None
    assert not await harness.client.list_endpoints(model="other")


async def test_explain_says_why(harness: Harness) -> None:
    for i in range(3):
        await harness.client.pick(
            PickQuery(request_id=f"req-{i}", model=MODEL, token_ids=tokens(128, start=i * 1000))
        )
    records = await harness.client.explain(limit=2)
    assert [r.request_id for r in records] == ["req-2", "req-1"]
    only = await harness.client.explain(limit=10, request_id="req-0")
    assert len(only) == 1
    record = only[0]
    assert record.decision.candidates, "every scored candidate is reported"
    assert record.decision.endpoint_id in {c.endpoint_id for c in record.decision.candidates}
    assert record.decided_at == pytest.approx(1.7e9 + harness.clock.now)
    assert record.prompt_blocks == 128 // 16


async def test_lease_ttl_expires_uncompleted_leases(harness: Harness) -> None:
    answer = await harness.client.pick(PickQuery(request_id="r", model=MODEL, token_ids=tokens(64)))
    assert harness.service.core.in_flight(answer.endpoint.id) == 1
    harness.clock.now += 30
    assert harness.service.expire() == 0
    harness.clock.now += 31  # past the 60 s TTL
    assert harness.service.expire() == 1
    assert harness.service.core.in_flight(answer.endpoint.id) == 0
    assert not await harness.client.complete(lease_id=answer.lease_id)
    exposition = harness.service.telemetry.exposition().decode()  # type: ignore[union-attr]
    assert "twinroute_scheduler_leases_expired_total 1.0" in exposition


async def test_a_renewed_lease_outlives_its_ttl_and_an_abandoned_one_does_not(
    harness: Harness,
) -> None:
    kept, lost = [
        await harness.client.pick(PickQuery(request_id=r, model=MODEL, token_ids=tokens(64, i)))
        for i, r in enumerate(("kept", "lost"))
    ]
    for _ in range(3):  # three quarters of the 60 s TTL, three times
        harness.clock.now += 45.0
        assert await harness.client.renew(lease_ids=[kept.lease_id, "unknown"]) == 1
        harness.service.expire()
    assert harness.service.core.leases.expired_total == 1
    assert await harness.client.complete(lease_id=kept.lease_id)
    assert not await harness.client.complete(lease_id=lost.lease_id)  # expired long ago


async def test_long_prompts_hashed_on_a_thread_place_exactly_as_inline() -> None:
    """Offloading changes where the hashing runs, never its result: the same long prompts
    (text and token ids, over the offload threshold) go to the same endpoints with the same
    expected cache hits, and bad ones are refused the same way."""
    answers = []
    for offload in (True, False):
        settings = SchedulerSettings(
            policy="dualmap", key_block_tokens=16, key_block_chars=64, offload_long_prompts=offload
        )
        # A clock that stands still: the load picture must not drift with the time hashing takes.
        service = build_service(settings, clock=FakeClock())
        service.set_endpoints(
            [Endpoint(id=f"e{i}", address=f"127.0.0.1:{8000 + i}", model=MODEL) for i in range(4)]
        )
        placed = []
        for i in range(6):
            text = f"document {i % 3} " + "lorem ipsum " * 4000  # 48 KiB: 750 blocks of 64
            ids = tokens(16 * 400, start=1000 * (i % 2))  # 400 blocks of 16
            for query in (
                PickQuery(request_id=f"t{i}", model=MODEL, text=text),
                PickQuery(request_id=f"i{i}", model=MODEL, token_ids=ids),
            ):
                placement = await service.pick(query)
                placed.append((placement.endpoint.id, placement.expected_cached_blocks))
        with pytest.raises(InvalidPickError):
            await service.pick(PickQuery(request_id="x", model=MODEL, token_ids=[-1] * 20000))
        answers.append(placed)
    assert answers[0] == answers[1]
    assert any(cached for _, cached in answers[0])  # the repeats found their prefixes


async def test_drain_waits_for_leases_and_stops_routing(harness: Harness) -> None:
    answer = await harness.client.pick(PickQuery(request_id="r", model=MODEL, token_ids=tokens(64)))
    target = answer.endpoint.id
    immediate = await harness.client.drain(endpoint_id=target, timeout_s=0)
    assert (immediate.drained, immediate.remaining_in_flight) == (False, 1)
    waiting = asyncio.create_task(harness.client.drain(endpoint_id=target, timeout_s=30))
    await asyncio.sleep(0)  # let the Drain RPC reach the server
    while not harness.service._drain_waiters.get(target):  # noqa: ASYNC110 (RPC in flight)
        await asyncio.sleep(0.001)
    await harness.client.complete(lease_id=answer.lease_id)
    result = await waiting
    assert (result.drained, result.remaining_in_flight) == (True, 0)
    for i in range(20):
        again = await harness.client.pick(
            PickQuery(request_id=f"x{i}", model=MODEL, token_ids=tokens(64))
        )
        assert again.endpoint.id != target
    listed = {s.endpoint.id: s for s in await harness.client.list_endpoints()}
    assert not listed[target].routable


async def test_undrain_puts_the_endpoint_back_and_answers_a_waiting_drain(
    harness: Harness,
) -> None:
    """Without Undrain, one Drain per engine took a pool down until the scheduler restarted."""
    answer = await harness.client.pick(PickQuery(request_id="r", model=MODEL, token_ids=tokens(64)))
    target = answer.endpoint.id
    waiting = asyncio.create_task(harness.client.drain(endpoint_id=target, timeout_s=30))
    while not harness.service._drain_waiters.get(target):  # noqa: ASYNC110 (RPC in flight)
        await asyncio.sleep(0.001)
    assert await harness.client.undrain(endpoint_id=target)
    result = await asyncio.wait_for(waiting, timeout=5)
    assert (result.drained, result.remaining_in_flight) == (False, 1)
    listed = {s.endpoint.id: s for s in await harness.client.list_endpoints()}
    assert listed[target].routable
    # Same prefix, same home as before the drain.
    again = await harness.client.pick(PickQuery(request_id="r2", model=MODEL, token_ids=tokens(64)))
    assert again.endpoint.id == target
    assert not await harness.client.undrain(endpoint_id=target)  # not draining: no change
    with pytest.raises(UnknownEndpointError):
        await harness.client.undrain(endpoint_id="nope")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Undrain(pb.UndrainRequest(endpoint_id=target))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Basic {ADMIN_TOKEN}"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["missing", "wrong-token", "wrong-scheme"],
)
async def test_drain_needs_the_admin_token(
    harness: Harness, metadata: tuple[tuple[str, str], ...] | None, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Drain(pb.DrainRequest(endpoint_id="e0"), metadata=metadata)
    assert caught.value.code() == code
    assert harness.service.core.routable()[0].id == "e0"


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, md, lease: stub.Pick(
            pb.PickRequest(request_id="r", model=MODEL, prompt=pb.Prompt(text="hi")), metadata=md
        ),
        lambda stub, md, lease: stub.Complete(pb.CompleteRequest(lease_id=lease), metadata=md),
        lambda stub, md, lease: stub.Progress(
            pb.ProgressRequest(lease_id=lease, event=pb.PROGRESS_EVENT_FIRST_TOKEN), metadata=md
        ),
        lambda stub, md, lease: stub.Cancel(pb.CancelRequest(pick_id="p"), metadata=md),
        lambda stub, md, lease: stub.Renew(pb.RenewRequest(lease_ids=[lease]), metadata=md),
        lambda stub, md, lease: stub.ListEndpoints(pb.ListEndpointsRequest(), metadata=md),
        lambda stub, md, lease: stub.Explain(pb.ExplainRequest(), metadata=md),
        lambda stub, md, lease: stub.Undrain(pb.UndrainRequest(endpoint_id="e0"), metadata=md),
        lambda stub, md, lease: stub.ReportMigration(
            pb.MigrationReport(migration_id="m"), metadata=md
        ),
    ],
    ids=[
        "Pick",
        "Complete",
        "Progress",
        "Cancel",
        "Renew",
        "ListEndpoints",
        "Explain",
        "Undrain",
        "ReportMigration",
    ],
)
async def test_every_call_needs_the_token(harness: Harness, call: Any) -> None:
    """With a token, no caller without it can place, close another request's lease, or read
    the decisions; the refusals are counted."""
    placed = await harness.client.pick(PickQuery(request_id="r", model=MODEL, text="x" * 64))
    wrong = (("authorization", "Bearer nope"),)
    for metadata, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (wrong, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(harness.stub, metadata, placed.lease_id)
        assert caught.value.code() == code
    assert harness.service.core.in_flight(placed.endpoint.id) == 1  # still open: 1 lease
    refused = {
        sample.labels["why"]: sample.value
        for metric in harness.registry.collect()
        if metric.name == "twinroute_scheduler_calls_refused"
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert refused == {"missing_token": 1.0, "wrong_token": 1.0}


async def test_a_drain_without_the_token_is_refused_logged_and_counted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="twinroute.scheduler.tokens")
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await harness.stub.Drain(pb.DrainRequest(endpoint_id="e0"))
    assert harness.service.core.draining == set()
    lines = [r.getMessage() for r in caplog.records if "refused Drain" in r.getMessage()]
    assert len(lines) == 1 and "missing token" in lines[0], lines  # rate-limited
    assert (
        harness.registry.get_sample_value(
            "twinroute_scheduler_calls_refused_total", {"call": "Drain", "why": "missing_token"}
        )
        == 3
    )


async def test_health_and_reflection(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    for name in ("", "twinroute.v1.Scheduler"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    names: set[str] = set()
    async for reply in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names |= {service.name for service in reply.list_services_response.service}
    assert {"twinroute.v1.Scheduler", "grpc.health.v1.Health"} <= names


async def test_graceful_stop_goes_not_serving_and_refuses_new_rpcs() -> None:
    service, _, _ = make_service()
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace_s=1.0))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.SchedulerStub(channel).ListEndpoints(
                pb.ListEndpointsRequest(), timeout=1.0
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_in_flight_rpc_finishes_during_graceful_stop() -> None:
    service, _, _ = make_service()
    server = GrpcServer(service=service, listen="127.0.0.1:0", admin_token=None)
    await server.start()
    answer = await service.pick(PickQuery(request_id="r", model=MODEL, text="hello " * 20))
    client = SchedulerClient(target=server.address, timeout_s=5.0)
    drain = asyncio.create_task(client.drain(endpoint_id=answer.endpoint.id, timeout_s=10))
    while not service._drain_waiters.get(answer.endpoint.id):  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    stopping = asyncio.create_task(server.stop(grace_s=5.0))
    await asyncio.sleep(0)
    await service.complete(lease_id=answer.lease_id)
    result = await drain
    await stopping
    await client.close()
    assert result.drained


async def test_unreachable_scheduler_is_not_confused_with_an_empty_pool() -> None:
    client = SchedulerClient(target="127.0.0.1:1", timeout_s=0.5)
    with pytest.raises(SchedulerUnreachableError):
        await client.pick(PickQuery(request_id="r", model=MODEL, text="hi"))
    await client.close()


async def test_metrics_names_are_exposed(harness: Harness) -> None:
    answer = await harness.client.pick(PickQuery(request_id="r", model=MODEL, token_ids=tokens(64)))
    await harness.client.complete(lease_id=answer.lease_id, observed_ttft_s=0.2)
    with pytest.raises(UnknownModelError):
        await harness.client.pick(PickQuery(request_id="r", model="nope", text="hi"))
    harness.service.core.update_scrape(
        "e1", running=1, queued=4, kv_usage=0.25, now=harness.clock.now
    )
    harness.service.set_endpoints(
        [Endpoint(id=f"e{i}", address=f"127.0.0.1:{8000 + i}", model=MODEL) for i in range(5)]
    )
    text = harness.service.telemetry.exposition().decode()  # type: ignore[union-attr]
    for name in (
        "twinroute_scheduler_decisions_total"
        f'{{policy="dualmap",reason="{answer.reason.value}"}} 1.0',
        "twinroute_scheduler_pick_duration_seconds_count 1.0",
        'twinroute_scheduler_observed_ttft_seconds_count{policy="dualmap"} 1.0',
        'twinroute_scheduler_predicted_ttft_seconds_count{policy="dualmap"} 1.0',
        'twinroute_scheduler_ttft_prediction_error_seconds_count{policy="dualmap"} 1.0',
        "twinroute_scheduler_slo_switches_total 0.0",
        'twinroute_scheduler_pick_errors_total{kind="unknown_model"} 1.0',
        'twinroute_scheduler_endpoint_queue_size{endpoint="e1"} 4.0',
        'twinroute_scheduler_endpoint_kv_cache_utilization{endpoint="e1"} 0.25',
        'twinroute_scheduler_endpoint_in_flight{endpoint="e0"}',
        'twinroute_scheduler_endpoint_pending_prefill_tokens{endpoint="e0"}',
        "twinroute_scheduler_ring_membership_changes_total 2.0",
        "twinroute_scheduler_ring_keys_remapped_ratio",
        "twinroute_scheduler_prefix_index_blocks 4.0",
        "twinroute_scheduler_leases_expired_total 0.0",
        'twinroute_scheduler_completions_total{outcome="success"} 1.0',
    ):
        assert name in text, name
    # Never-scraped endpoints report no queue figure rather than a zero.
    assert 'twinroute_scheduler_endpoint_queue_size{endpoint="e2"}' not in text
    # One endpoint joining four moves roughly 2/5 of the first candidates (DualMap's two rings)
    # at most; far less than a full reshuffle.
    ratio_line = next(
        line for line in text.splitlines()
        if line.startswith("twinroute_scheduler_ring_keys_remapped_ratio ")
    )  # fmt: skip
    assert 0.05 < float(ratio_line.split()[1]) < 0.45


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_trusted_clients_and_refuses_plaintext(
    tls_files: tuple[Path, Path],
) -> None:
    cert, key = tls_files
    service, _, _ = make_service()
    server = GrpcServer(
        service=service,
        listen="127.0.0.1:0",
        tls=TlsFiles(cert_path=str(cert), key_path=str(key)),
    )
    await server.start()
    try:
        client = SchedulerClient(
            target=server.address, timeout_s=5.0, root_certificates=cert.read_bytes()
        )
        answer = await client.pick(PickQuery(request_id="r", model=MODEL, text="hello " * 20))
        assert await client.complete(lease_id=answer.lease_id)
        await client.close()
        plaintext = SchedulerClient(target=server.address, timeout_s=1.0)
        with pytest.raises(SchedulerUnreachableError):
            await plaintext.pick(PickQuery(request_id="r", model=MODEL, text="hello"))
        await plaintext.close()
    finally:
        await server.stop(grace_s=0.1)


class SlowService(SchedulerService):
    """Decides after its callers' deadline (a busy scheduler)."""

    def pick_now(self, query: PickQuery) -> Any:
        import time

        time.sleep(0.3)
        return super().pick_now(query)


async def test_a_pick_its_caller_gave_up_on_leaves_no_lease() -> None:
    """The router's Pick deadline passed while the scheduler was still deciding: nobody will
    complete the lease it opened, so it must not stay open until its time-to-live."""
    base, clock, _ = make_service()
    service = SlowService(core=base.core, settings=base.settings, clock=clock)
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    client = SchedulerClient(target=server.address, timeout_s=0.1)
    try:
        with pytest.raises(SchedulerUnreachableError):
            await client.pick(PickQuery(request_id="late", model=MODEL, token_ids=tokens(64)))
        for _ in range(100):
            if len(service.core.leases) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(service.core.leases) == 0
        assert service.core.leases.expired_total == 0
    finally:
        await client.close()
        await server.stop(grace_s=0.5)


async def test_a_cancel_that_overtakes_its_pick_refuses_it() -> None:
    service, _, _ = make_service()
    query = PickQuery(request_id="r", model=MODEL, token_ids=tokens(64), pick_id="p-1")
    assert not await service.cancel(pick_id="p-1")
    with pytest.raises(InvalidPickError, match="cancelled"):
        await service.pick(query)
    assert len(service.core.leases) == 0
    # A retry is a new Pick with a pick_id of its own: unaffected.
    retry = await service.pick(dataclasses.replace(query, pick_id="p-2"))
    assert service.core.leases.get(retry.lease_id) is not None
    assert await service.cancel(pick_id="p-2")
    assert service.core.leases.get(retry.lease_id) is None
    text = service.telemetry.exposition().decode()  # type: ignore[union-attr]
    assert 'twinroute_scheduler_picks_cancelled_total{found="early"} 1.0' in text
    assert 'twinroute_scheduler_picks_cancelled_total{found="closed"} 1.0' in text


def test_series_of_departed_endpoints_are_dropped() -> None:
    """Pods come and go: per-endpoint series of endpoints no longer in the pool must not pile
    up for the life of the scheduler."""
    from twinroute.scheduler.scrape import EngineStats

    service, _, _ = make_service(endpoints=3)
    telemetry = service.telemetry
    assert telemetry is not None
    telemetry.scrape_failed("e2", "timeout")
    telemetry.scraped("e2", EngineStats(prefix_cache_queries=10.0, prefix_cache_hits=5.0))
    text = telemetry.exposition().decode()
    assert 'endpoint="e2"' in text
    service.set_endpoints(
        [Endpoint(id=f"e{i}", address=f"127.0.0.1:{8000 + i}", model=MODEL) for i in range(2)]
    )
    assert 'endpoint="e2"' not in telemetry.exposition().decode()
