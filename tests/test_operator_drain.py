"""The operator's Drainer against the real scheduler service over gRPC: every leaving endpoint
leaves routing before any is waited on, and all are waited on together within one deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from twinroute.operator.drain import Drainer
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.types import Endpoint

MODEL = "tiny-llama"
ENDPOINTS = 4
# The bound on polling for the scheduler to reach a state (an RPC in flight), not a sleep.
REACH_S = 10.0


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[SchedulerService, str]]:
    core = SchedulerCore(
        policy=make_policy("round_robin", config=PolicyConfig(cost_model=LLAMA3_8B_H100)),
        cost_model=LLAMA3_8B_H100,
    )
    service = SchedulerService(core=core)
    service.set_endpoints(
        [
            Endpoint(id=f"e{i}", address=f"127.0.0.1:{8000 + i}", model=MODEL)
            for i in range(ENDPOINTS)
        ]
    )
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    try:
        yield service, server.address
    finally:
        await server.stop(grace_s=0.5)


async def open_one_lease_per_endpoint(address: str) -> dict[str, str]:
    """Round robin: one pick per endpoint; endpoint id -> its lease id."""
    client = SchedulerClient(target=address, timeout_s=5.0)
    try:
        leases: dict[str, str] = {}
        for i in range(ENDPOINTS):
            answer = await client.pick(
                PickQuery(
                    request_id=f"r{i}", model=MODEL, token_ids=np.arange(64, dtype=np.uint32) + i
                )
            )
            leases[answer.endpoint.id] = answer.lease_id
        assert len(leases) == ENDPOINTS
        return leases
    finally:
        await client.close()


async def until(condition: Callable[[], bool], *, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REACH_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_every_leaving_endpoint_leaves_routing_before_any_is_waited_on(
    scheduler: tuple[SchedulerService, str],
) -> None:
    service, address = scheduler
    leases = await open_one_lease_per_endpoint(address)
    leaving = ["e1", "e2"]
    draining = asyncio.create_task(
        asyncio.to_thread(
            Drainer().drain, endpoint_ids=leaving, scheduler_addresses=[address], timeout_s=30.0
        )
    )
    # Both Drains wait at once: with one endpoint waited on after the other, the second would
    # neither wait nor (without a mark first) be out of routing while the first is busy.
    await until(
        lambda: all(bool(service._drain_waiters.get(e)) for e in leaving),
        what="both Drains waiting",
    )
    assert service.core.draining == set(leaving)
    assert {e.id for e in service.core.routable()} == {"e0", "e3"}
    client = SchedulerClient(target=address, timeout_s=5.0)
    try:
        for endpoint_id in leaving:
            await client.complete(lease_id=leases[endpoint_id])
    finally:
        await client.close()
    results = await draining
    assert [(r.endpoint_id, r.drained, r.remaining_in_flight, r.error) for r in results] == [
        ("e1", True, 0, ""),
        ("e2", True, 0, ""),
    ]


async def test_idle_and_unknown_endpoints_answer_at_the_mark(
    scheduler: tuple[SchedulerService, str],
) -> None:
    service, address = scheduler
    results = await asyncio.to_thread(
        Drainer().drain, endpoint_ids=["e0", "gone"], scheduler_addresses=[address], timeout_s=30.0
    )
    idle, unknown = results
    assert (idle.endpoint_id, idle.drained, idle.error) == ("e0", True, "")
    assert not unknown.drained and unknown.error.startswith(str(grpc.StatusCode.NOT_FOUND))
    assert service.core.draining == {"e0"}
    assert not service._drain_waiters.get("e0")
