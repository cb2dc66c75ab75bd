"""The scheduler's API as its callers meet it: the gRPC client's translation of the contract,
the Placement handle's exactly-once Complete, and the router's fail-open.

The gRPC side is a small servicer of the real `twinroute.v1.Scheduler` service on
127.0.0.1:0 that records what it was asked; what is under test is the translation to and from
the contract, not a scheduling policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from twinroute.scheduler.api import (
    EndpointStatus,
    InvalidPickError,
    NoEndpointError,
    PickQuery,
    Placement,
    Scheduler,
    SchedulerUnreachableError,
    SettledReport,
)
from twinroute.scheduler.build import build_service
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint
from twinroute.scheduler.wire import ERROR_KIND_METADATA
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc

from twinroute.router.failopen import FailOpenScheduler
from twinroute.vocabulary import DecisionReason


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.picks: list[Any] = []
        self.completes: list[Any] = []
        self.progress: list[Any] = []
        self.reason: Any = pb.DECISION_REASON_SLO_SWITCH

    async def Pick(self, request: Any, context: Any) -> Any:
        self.picks.append(request)
        if len(request.exclude_endpoints) >= 2:
            # As the real service does: the error kind rides in the trailing metadata.
            context.set_trailing_metadata(((ERROR_KIND_METADATA, "no_endpoint"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no endpoint left for the request")
        return pb.PickResponse(
            endpoint=pb.Endpoint(id="pod-1", address="127.0.0.1:9001"),
            reason=self.reason,
            predicted_ttft_s=0.25,
            lease_id=f"lease-{len(self.picks)}",
            policy="dualmap",
        )

    async def Complete(self, request: Any, context: Any) -> Any:
        self.completes.append(request)
        return pb.CompleteResponse(known=True)

    async def Progress(self, request: Any, context: Any) -> Any:
        self.progress.append(request)
        return pb.ProgressResponse(known=True)

    async def ListEndpoints(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the router")

    async def Explain(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the router")

    async def Drain(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the router")


@pytest.fixture
async def grpc_target() -> AsyncIterator[tuple[str, RecordingScheduler]]:
    server = grpc.aio.server()
    servicer = RecordingScheduler()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(grace=None)


def query(**fields: Any) -> PickQuery:
    base: dict[str, Any] = {"request_id": "r1", "model": "m", "text": "hello"}
    return PickQuery(**{**base, **fields})


async def test_grpc_pick_and_complete_translate_the_contract(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    target, servicer = grpc_target
    scheduler = SchedulerClient(target=target)
    try:
        placement = await scheduler.pick(
            query(
                token_ids=[5, 6, 7],
                cache_salt="s",
                exclude_endpoints=frozenset({"pod-0"}),
                reports_first_token=True,
                exact_engine_tokens=True,
            )
        )
        assert await placement.complete(
            "stream_error", observed_ttft_s=0.5, prompt_tokens=3, output_tokens=2
        )
        text_placement = await scheduler.pick(query(ttft_slo_s=1.5))
    finally:
        await scheduler.close()
    assert placement.endpoint.address == "127.0.0.1:9001"
    assert placement.endpoint.id == "pod-1"
    assert placement.reason == "slo_switch"
    assert placement.predicted_ttft_s == 0.25
    asked = servicer.picks[0]
    assert list(asked.prompt.token_ids.ids) == [5, 6, 7]
    assert asked.cache_salt == "s"
    assert list(asked.exclude_endpoints) == ["pod-0"]
    # A stream says its first token will be reported; the text query (no stream) does not.
    assert asked.reports_first_token and asked.exact_engine_tokens
    assert not servicer.picks[1].reports_first_token
    assert not servicer.picks[1].exact_engine_tokens
    assert servicer.picks[1].prompt.text == "hello"
    # A query without its own SLO sends none (zero on the wire), one with it sends it.
    assert asked.ttft_slo_s == 0.0
    assert servicer.picks[1].ttft_slo_s == 1.5
    assert text_placement.lease_id == "lease-2"
    done = servicer.completes[0]
    assert (done.lease_id, done.outcome) == ("lease-1", pb.OUTCOME_STREAM_ERROR)
    assert (done.prompt_tokens, done.output_tokens) == (3, 2)


async def test_grpc_no_endpoint_is_not_an_outage(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    target, _ = grpc_target
    scheduler = SchedulerClient(target=target)
    try:
        with pytest.raises(NoEndpointError):
            await scheduler.pick(query(exclude_endpoints=frozenset({"a", "b"})))
    finally:
        await scheduler.close()


async def test_unreachable_scheduler_fails_open_to_the_static_list() -> None:
    from twinroute.bench.processes import free_port

    primary = SchedulerClient(target=f"127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(SchedulerUnreachableError):
        await primary.pick(query())
    endpoints = [Endpoint(id="a", address="127.0.0.1:1"), Endpoint(id="b", address="127.0.0.1:2")]
    scheduler = FailOpenScheduler(primary=primary, endpoints=endpoints)
    try:
        placements = [await scheduler.pick(query()) for _ in range(2)]
        excluded = await scheduler.pick(query(exclude_endpoints=frozenset({"a"})))
        # Fail-open placements carry no lease: their reports are no-ops, not errors.
        assert not await placements[0].complete("success", observed_ttft_s=0.1)
        assert not await placements[1].progress("first_token")
    finally:
        await scheduler.close()
    assert [p.endpoint.id for p in placements] == ["a", "b"]
    assert {p.reason for p in placements} == {"fallback"}
    assert {p.lease_id for p in placements} == {""}
    assert excluded.endpoint.id == "b"


async def test_fail_open_learns_the_schedulers_endpoints_and_keeps_them_while_it_is_away() -> None:
    """As the operator renders the router: no --endpoints, so the fallback list is what the
    scheduler last listed as routable; while it is away, that list places requests."""
    service = in_process()
    service.set_endpoints(
        [Endpoint(id=f"e{i}", address=f"127.0.0.1:{i + 1}", model="m") for i in range(3)]
    )
    await service.drain(endpoint_id="e2")  # not routable: not a fallback either
    primary = FlakyScheduler(service)
    scheduler = FailOpenScheduler(primary=primary, learn_every_s=0.01)
    with pytest.raises(SchedulerUnreachableError):  # nothing learnt yet: nothing to fall back to
        primary.away = True
        await scheduler.pick(query())
    primary.away = False
    learning = asyncio.create_task(scheduler.learn_endpoints())
    try:
        while scheduler.learnt_at is None:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        assert [e.id for e in scheduler.endpoints] == ["e0", "e1"]
        primary.away = True
        await asyncio.sleep(0.05)  # several failed refreshes
        placements = [await scheduler.pick(query()) for _ in range(4)]
    finally:
        learning.cancel()
    assert [p.endpoint.id for p in placements] == ["e0", "e1", "e0", "e1"]
    assert {p.reason for p in placements} == {DecisionReason.FALLBACK}


class FlakyScheduler:
    """An in-process scheduler that can be made unreachable."""

    def __init__(self, service: SchedulerService) -> None:
        self.service = service
        self.away = False

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        if self.away:
            raise SchedulerUnreachableError("away")
        return await self.service.pick(query, timeout_s=timeout_s)

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        if self.away:
            raise SchedulerUnreachableError("away")
        return await self.service.list_endpoints(model=model)


async def test_fail_open_with_everything_excluded_says_so() -> None:
    primary = SchedulerClient(target="127.0.0.1:1", timeout_s=0.2)
    scheduler = FailOpenScheduler(primary=primary, endpoints=[Endpoint(id="a", address="h:1")])
    try:
        with pytest.raises(NoEndpointError):
            await scheduler.pick(query(exclude_endpoints=frozenset({"a"})))
    finally:
        await scheduler.close()


async def test_fail_open_passes_the_schedulers_own_answers_through(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    target, servicer = grpc_target
    scheduler = FailOpenScheduler(
        primary=SchedulerClient(target=target), endpoints=[Endpoint(id="a", address="h:1")]
    )
    try:
        placement = await scheduler.pick(query())
        assert placement.endpoint.id == "pod-1" and placement.lease_id == "lease-1"
        # "No endpoint left" is the scheduler's answer, not an outage: no fallback.
        with pytest.raises(NoEndpointError):
            await scheduler.pick(query(exclude_endpoints=frozenset({"x", "y"})))
        await placement.complete("success")
    finally:
        await scheduler.close()
    assert [c.lease_id for c in servicer.completes] == ["lease-1"]


def in_process(registry: CollectorRegistry | None = None) -> SchedulerService:
    service = build_service(
        SchedulerSettings(policy="round_robin", served_models=("m",)), registry=registry
    )
    service.set_endpoints([Endpoint(id=f"e{i}", address=f"127.0.0.1:{i + 1}") for i in range(2)])
    return service


async def test_a_placement_completes_exactly_once_whatever_calls_it() -> None:
    service = in_process()
    placement = await service.pick(query(text="hello " * 40))
    assert service.core.in_flight(placement.endpoint.id) == 1
    # Claimed at the call, before anything is awaited: a second path finds it done at once.
    first = placement.complete("success", output_tokens=3)
    assert placement.done
    second = placement.complete("cancelled")
    assert (await first, await second) == (True, False)
    assert service.core.in_flight(placement.endpoint.id) == 0
    assert service.core.leases.expired_total == 0
    # Progress after completion reaches nobody.
    assert not await placement.progress("first_token")


async def test_the_in_process_scheduler_takes_reports_when_they_are_claimed() -> None:
    """The embedded scheduler waits on nothing: a report is made when the placement hands it
    out, and comes back settled, so a front end runs no task for it."""
    service = in_process()
    placement = await service.pick(query(text="hello " * 40, reports_first_token=True))
    lease = service.core.leases.get(placement.lease_id)
    assert lease is not None and lease.first_token_at is None
    progress = placement.progress("first_token")
    assert isinstance(progress, SettledReport)
    assert lease.first_token_at is not None  # made before anything was awaited
    report = placement.complete("success", output_tokens=3)
    assert isinstance(report, SettledReport)
    assert service.core.in_flight(placement.endpoint.id) == 0
    assert (await progress, await report, await placement.complete("cancelled")) == (
        True,
        True,
        False,
    )


async def test_an_in_process_report_that_fails_raises_where_it_is_awaited() -> None:
    service = in_process()
    placement = await service.pick(query())

    def refuse(*_: Any, **__: Any) -> None:
        raise InvalidPickError("refused")

    service.core.complete = refuse  # type: ignore[method-assign]
    report = placement.complete("success")  # claimed without raising
    assert placement.done
    with pytest.raises(InvalidPickError, match="refused"):
        await report


async def test_the_same_handle_over_grpc(grpc_target: tuple[str, RecordingScheduler]) -> None:
    target, servicer = grpc_target
    client = SchedulerClient(target=target)
    try:
        placement = await client.pick(query())
        assert await placement.progress("first_token")
        completes = [placement.complete("success"), placement.complete("engine_error")]
        assert [await c for c in completes] == [True, False]
    finally:
        await client.close()
    assert [c.outcome for c in servicer.completes] == [pb.OUTCOME_SUCCESS]
    assert [p.event for p in servicer.progress] == [pb.PROGRESS_EVENT_FIRST_TOKEN]


def test_both_backings_speak_the_one_api() -> None:
    """What a front end is written against: the in-process service, the gRPC client and the
    fail-open wrapper all offer every method of `Scheduler`."""
    methods = [name for name in dir(Scheduler) if not name.startswith("_")]
    assert {"pick", "complete", "progress", "drain", "watch_migrations"} <= set(methods)
    for backing in (SchedulerService, SchedulerClient, FailOpenScheduler):
        missing = [name for name in methods if not callable(getattr(backing, name, None))]
        assert missing == [], backing.__name__


async def test_lease_ids_never_repeat_across_scheduler_restarts() -> None:
    """A router's Complete for a request placed before a restart must not close a request
    placed after it: every scheduler process names its leases apart."""
    before = in_process()
    old = await before.pick(query(request_id="old", text="hello " * 40))
    registry = CollectorRegistry()
    restarted = in_process(registry)
    new = await restarted.pick(query(request_id="new", text="hello " * 40))
    assert old.lease_id != new.lease_id
    # The old router's report reaches the restarted scheduler: it knows no such lease.
    assert not await restarted.complete(lease_id=old.lease_id, outcome="success")
    assert restarted.core.leases.get(new.lease_id) is not None
    # ... and says so apart from a lease of its own closed twice.
    assert await restarted.complete(lease_id=new.lease_id)
    assert not await restarted.complete(lease_id=new.lease_id)
    completions = {
        outcome: registry.get_sample_value(
            "twinroute_scheduler_completions_total", {"outcome": outcome}
        )
        for outcome in ("success", "unknown", "foreign")
    }
    assert completions == {"success": 1.0, "unknown": 1.0, "foreign": 1.0}


async def test_a_reason_this_side_does_not_know_still_places_and_reports(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    """A newer scheduler's reason (a value this client's contract lacks) must not fail the
    pick: the lease is open on the scheduler and would leak until its time-to-live."""
    target, servicer = grpc_target
    servicer.reason = 99
    client = SchedulerClient(target=target)
    try:
        placement = await client.pick(query())
        assert placement.reason is DecisionReason.UNSPECIFIED
        assert await placement.complete("success")
    finally:
        await client.close()
    assert [c.lease_id for c in servicer.completes] == ["lease-1"]
