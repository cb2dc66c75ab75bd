"""The router's progress reports (`Progress`: prefill hop done, first token) reach the core
through the real gRPC service and change what the scheduler believes each engine carries."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.policies.pd import PdSettings
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.types import Endpoint, Role
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

NOW = 100.0


def make_service(endpoints: list[Endpoint]) -> tuple[SchedulerCore, SchedulerService]:
    core = SchedulerCore(
        policy=make_policy("dualmap", config=PolicyConfig(cost_model=LLAMA3_8B_H100)),
        cost_model=LLAMA3_8B_H100,
        pd=PdSettings(min_prefill_tokens=100),
    )
    core.set_endpoints(endpoints, now=NOW)
    return core, SchedulerService(core=core, clock=lambda: NOW)


def engines(*roles: Role) -> list[Endpoint]:
    return [
        Endpoint(id=f"{role.value}-{i}", address=f"127.0.0.1:{9100 + i}", role=role, model="m")
        for i, role in enumerate(roles)
    ]


def long_prompt(seed: int) -> PickQuery:
    tokens = np.random.default_rng(seed).integers(0, 30_000, size=4096)
    return PickQuery(request_id=f"r{seed}", model="m", token_ids=tokens)


async def test_prefill_done_frees_the_prefill_instance_and_keeps_the_decode_lease() -> None:
    core, service = make_service(engines(Role.PREFILL, Role.DECODE))
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    client = SchedulerClient(target=server.address, timeout_s=5.0)
    try:
        answer = await client.pick(long_prompt(1))
        assert answer.prefill_endpoint is not None
        prefill_id, decode_id = answer.prefill_endpoint.id, answer.endpoint.id
        assert core.load(prefill_id, now=NOW).pending_prefill_tokens > 0
        assert await client.progress(lease_id=answer.lease_id, event="prefill_done")
        assert core.load(prefill_id, now=NOW).pending_prefill_tokens == 0
        assert core.in_flight(prefill_id) == 0
        assert core.in_flight(decode_id) == 1
        # Reported twice, or for a lease without a prefill hop: not applied, no harm.
        assert not await client.progress(lease_id=answer.lease_id, event="prefill_done")
        assert await client.progress(lease_id=answer.lease_id, event="first_token")
        assert await client.complete(lease_id=answer.lease_id)
        assert core.in_flight(decode_id) == 0
        assert not await client.progress(lease_id=answer.lease_id, event="first_token")
    finally:
        await client.close()
        await server.stop()


async def test_first_token_settles_the_queue_ahead_of_later_requests() -> None:
    core, service = make_service(engines(Role.UNIFIED))
    first = await service.pick(long_prompt(1))
    second = await service.pick(long_prompt(2))
    endpoint = first.endpoint.id
    before = core.load(endpoint, now=NOW).pending_prefill_tokens
    assert await service.progress(lease_id=first.lease_id, event="first_token")
    after = core.load(endpoint, now=NOW).pending_prefill_tokens
    # The first request's prefill left the queue; the second one's is still there.
    assert 0 < after < before
    assert core.load(endpoint, now=NOW).in_flight == 2
    assert await service.progress(lease_id=second.lease_id, event="first_token")
    assert core.load(endpoint, now=NOW).pending_prefill_tokens == 0


async def test_bad_progress_reports_are_refused_with_a_reason() -> None:
    _core, service = make_service(engines(Role.UNIFIED))
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            for request, reason in (
                (pb.ProgressRequest(lease_id="x"), "unknown progress event"),
                (
                    pb.ProgressRequest(event=pb.PROGRESS_EVENT_FIRST_TOKEN),
                    "lease_id is required",
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.Progress(request)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert reason in str(raised.value.details())
            unknown = await stub.Progress(
                pb.ProgressRequest(lease_id="nope", event=pb.PROGRESS_EVENT_FIRST_TOKEN)
            )
            assert not unknown.known
    finally:
        await server.stop()
