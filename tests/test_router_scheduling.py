"""The router's scheduler ports: the gRPC adapter over a real channel, fallback, exclusion.

The gRPC side is a small servicer of the real `twinroute.v1.Scheduler` service on
127.0.0.1:0 that records what it was asked; what is under test is the router's translation
to and from the contract, not a scheduling policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from twinroute.scheduler.api import ERROR_KIND_METADATA
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc

from twinroute.router.scheduling import (
    FallbackScheduler,
    GrpcScheduler,
    NoEndpointAvailable,
    PickQuery,
    SchedulerUnavailable,
    WithFallback,
)


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.picks: list[Any] = []
        self.completes: list[Any] = []

    async def Pick(self, request: Any, context: Any) -> Any:
        self.picks.append(request)
        if len(request.exclude_endpoints) >= 2:
            # As the real service does: the error kind rides in the trailing metadata.
            context.set_trailing_metadata(((ERROR_KIND_METADATA, "no_endpoint"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no endpoint left for the request")
        return pb.PickResponse(
            endpoint=pb.Endpoint(id="pod-1", address="127.0.0.1:9001"),
            reason=pb.DECISION_REASON_SLO_SWITCH,
            predicted_ttft_s=0.25,
            lease_id=f"lease-{len(self.picks)}",
            policy="dualmap",
        )

    async def Complete(self, request: Any, context: Any) -> Any:
        self.completes.append(request)
        return pb.CompleteResponse(known=True)

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
    base: dict[str, Any] = {
        "request_id": "r1",
        "model": "m",
        "prompt_text": "hello",
        "token_ids": None,
    }
    return PickQuery(**{**base, **fields})


async def test_grpc_pick_and_complete_translate_the_contract(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    target, servicer = grpc_target
    scheduler = GrpcScheduler(target=target)
    try:
        placement = await scheduler.pick(
            query(token_ids=[5, 6, 7], cache_salt="s", exclude_endpoints=frozenset({"pod-0"}))
        )
        await scheduler.complete(
            lease_id=placement.lease_id,
            outcome="stream_error",
            observed_ttft_s=0.5,
            prompt_tokens=3,
            output_tokens=2,
        )
        text_placement = await scheduler.pick(query())
    finally:
        await scheduler.close()
    assert placement.address == "127.0.0.1:9001"
    assert placement.endpoint_id == "pod-1"
    assert placement.reason == "slo_switch"
    assert placement.predicted_ttft_s == 0.25
    asked = servicer.picks[0]
    assert list(asked.prompt.token_ids.ids) == [5, 6, 7]
    assert asked.cache_salt == "s"
    assert list(asked.exclude_endpoints) == ["pod-0"]
    assert servicer.picks[1].prompt.text == "hello"
    assert text_placement.lease_id == "lease-2"
    done = servicer.completes[0]
    assert (done.lease_id, done.outcome) == ("lease-1", pb.OUTCOME_STREAM_ERROR)
    assert (done.prompt_tokens, done.output_tokens) == (3, 2)


async def test_grpc_no_endpoint_is_not_an_outage(
    grpc_target: tuple[str, RecordingScheduler],
) -> None:
    target, _ = grpc_target
    scheduler = GrpcScheduler(target=target)
    try:
        with pytest.raises(NoEndpointAvailable):
            await scheduler.pick(query(exclude_endpoints=frozenset({"a", "b"})))
    finally:
        await scheduler.close()


async def test_unreachable_scheduler_falls_back_to_the_static_list() -> None:
    from twinroute.bench.processes import free_port

    primary = GrpcScheduler(target=f"127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(SchedulerUnavailable):
        await primary.pick(query())
    fallback = FallbackScheduler(endpoints=[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")])
    scheduler = WithFallback(primary=primary, fallback=fallback)
    try:
        placements = [await scheduler.pick(query()) for _ in range(2)]
        excluded = await scheduler.pick(query(exclude_endpoints=frozenset({"a"})))
        # Fallback placements carry no lease: completing them is a no-op, not an error.
        await scheduler.complete(
            lease_id="", outcome="success", observed_ttft_s=0.1, prompt_tokens=1, output_tokens=1
        )
    finally:
        await scheduler.close()
    assert [p.endpoint_id for p in placements] == ["a", "b"]
    assert {p.reason for p in placements} == {"fallback"}
    assert excluded.endpoint_id == "b"


async def test_fallback_with_everything_excluded_says_so() -> None:
    fallback = FallbackScheduler(endpoints=[("a", "127.0.0.1:1")])
    with pytest.raises(NoEndpointAvailable):
        await fallback.pick(query(exclude_endpoints=frozenset({"a"})))
