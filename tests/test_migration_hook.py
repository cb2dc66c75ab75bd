"""Live KV migration between two engine simulators through their MigrationHook (gRPC), driven by
the scheduler's `Migrator`: the client's stream on the source continues with every token once,
and every abort path leaves both instances clean (KV, running counts, reservations).

Engines run in this process on 127.0.0.1 (port 0) with a cost model of round numbers (1 ms per
decode step); transfer sleeps are injected (no wall-clock waits for modelled transfer time).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from twinroute.scheduler.api import Trigger
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
from twinroute.scheduler.migration import AbortReason, Migrator, MigratorSettings
from twinroute.scheduler.migration_plan import (
    MigrationPolicySettings,
    MigrationProposal,
    RunningRequest,
)
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.types import Endpoint
from twinroute.v1 import scheduler_pb2 as pb

from twinroute.enginesim.core import EngineCore, EngineSettings
from twinroute.enginesim.migration import EngineMigrationHook, MigrationHookServer
from twinroute.enginesim.server import FILLER, EngineIdentity, build_app
from twinroute.simulator.instance import Instance, InstanceConfig

MODEL = "sim-model"


class RoundCost:
    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 1e-5 * uncached_tokens

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 1e-3


async def no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class Engine:
    name: str
    url: str
    core: EngineCore
    hook: EngineMigrationHook
    server: MigrationHookServer

    def assert_clean(self) -> None:
        metrics = self.core.metrics()
        assert (metrics.running, metrics.waiting) == (0, 0), self.name
        assert metrics.kv_usage == 0.0, self.name
        assert self.hook.reservations == 0, self.name


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    runners: list[web.AppRunner] = []
    servers: list[MigrationHookServer] = []

    async def start(
        name: str,
        *,
        kv_capacity_tokens: int = 100_000,
        sleep: Callable[[float], Awaitable[None]] = no_wait,
    ) -> Engine:
        instance = Instance(
            config=InstanceConfig(kv_capacity_tokens=kv_capacity_tokens, block_size=16),
            cost=RoundCost(),
            record_tokens=True,
        )
        core = EngineCore(instance=instance, settings=EngineSettings(block_size=16))
        identity = EngineIdentity(model=MODEL, instance_id=name, max_model_len=100_000)
        runner = web.AppRunner(build_app(core=core, identity=identity))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        hook = EngineMigrationHook(core=core, sleep=sleep)
        server = MigrationHookServer(hook=hook, listen="127.0.0.1:0")
        await server.start()
        servers.append(server)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return Engine(name=name, url=url, core=core, hook=hook, server=server)

    yield start
    for server in servers:
        await server.stop(grace_s=0)
    for runner in runners:
        await runner.cleanup()


def migrator_for(*engines: Engine) -> Migrator:
    cost = COST_PROFILES[DEFAULT_COST_PROFILE]
    core = SchedulerCore(
        policy=make_policy("round_robin", config=PolicyConfig(cost_model=cost)), cost_model=cost
    )
    core.set_endpoints(
        [Endpoint(id=e.name, address=e.url.removeprefix("http://")) for e in engines]
    )
    return Migrator(
        core=core,
        settings=MigratorSettings(max_stages=3, last_stage_blocks=1),
        hooks={e.name: e.server.address for e in engines},
    )


class Stream:
    """A streamed completion read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.texts: list[str] = []
        self.done = False

    async def read_until(self, tokens: int | None) -> None:
        while not self.done and (tokens is None or len(self.texts) < tokens):
            line = await self.response.content.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line.removeprefix(b"data: ")
            if data == b"[DONE]":
                self.done = True
                break
            choice = json.loads(data)["choices"][0]
            if choice.get("finish_reason") is None and choice["text"]:
                self.texts.append(choice["text"])


async def open_stream(
    session: aiohttp.ClientSession, url: str, *, max_tokens: int, tag: str = "me"
) -> Stream:
    response = await session.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": f"migrate {tag} " * 40, "max_tokens": max_tokens,
              "stream": True},
    )  # fmt: skip
    assert response.status == 200
    return Stream(response)


async def running_request(engine: Engine, migrator: Migrator) -> RunningRequest:
    loads = await migrator.snapshot()
    (load,) = [load for load in loads if load.endpoint_id == engine.name]
    (request,) = load.running
    return request


def proposal(request: RunningRequest, *, source: Engine, target: Engine) -> MigrationProposal:
    return MigrationProposal(
        source=source.name,
        target=target.name,
        request=request,
        trigger=Trigger.IMBALANCE,
        gap_before=0.5,
        gap_after=0.1,
    )


def expected_text(tokens: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(tokens)]


async def settle(*engines: Engine) -> None:
    """Let the engines' driver tasks finish their last step."""
    for _ in range(100):
        if all(e.core.metrics().running == 0 and e.hook.reservations == 0 for e in engines):
            return
        await asyncio.sleep(0.01)


async def test_a_stream_migrated_midway_continues_with_every_token_once(
    start_engine: StartEngine,
) -> None:
    source, target = await start_engine("a"), await start_engine("b")
    migrator = migrator_for(source, target)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=400)
        await stream.read_until(20)
        request = await running_request(source, migrator)
        result = await migrator.execute(proposal(request, source=source, target=target), deadline=0)
        assert result.committed, result
        # The target now decodes it; the source holds only the client's connection.
        assert target.core.metrics().running == 1
        assert source.core.metrics().running == 0
        await stream.read_until(None)
    assert stream.done
    assert "".join(stream.texts) == "".join(expected_text(400))
    await settle(source, target)
    source.assert_clean()
    target.assert_clean()


async def test_preallocate_refused_when_the_target_is_short_of_blocks(
    start_engine: StartEngine,
) -> None:
    source, target = await start_engine("a"), await start_engine("b", kv_capacity_tokens=64)
    migrator = migrator_for(source, target)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=200)
        await stream.read_until(5)
        request = await running_request(source, migrator)
        result = await migrator.execute(proposal(request, source=source, target=target), deadline=0)
        assert not result.committed
        assert result.reason is AbortReason.PREALLOCATE_REFUSED
        assert "insufficient free blocks" in result.detail
        await stream.read_until(None)
    assert "".join(stream.texts) == "".join(expected_text(200))
    await settle(source, target)
    source.assert_clean()
    target.assert_clean()


async def test_target_dying_mid_transfer_leaves_the_request_running_on_the_source(
    start_engine: StartEngine,
) -> None:
    target = await start_engine("b")

    async def target_dies_on_the_last_stage(seconds: float) -> None:
        await target.server.stop(grace_s=0)

    source = await start_engine("a", sleep=target_dies_on_the_last_stage)
    migrator = migrator_for(source, target)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=200)
        await stream.read_until(5)
        request = await running_request(source, migrator)
        result = await migrator.execute(proposal(request, source=source, target=target), deadline=0)
        assert not result.committed
        assert result.reason is AbortReason.UNREACHABLE
        await stream.read_until(None)
    assert stream.done
    assert "".join(stream.texts) == "".join(expected_text(200))
    await settle(source)
    source.assert_clean()


async def test_source_finishing_first_aborts_and_frees_the_reservation(
    start_engine: StartEngine,
) -> None:
    source, target = await start_engine("a"), await start_engine("b")
    migrator = migrator_for(source, target)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=50)
        await stream.read_until(2)
        request = await running_request(source, migrator)
        await stream.read_until(None)
        await settle(source)
        result = await migrator.execute(proposal(request, source=source, target=target), deadline=0)
    assert not result.committed
    assert result.reason is AbortReason.SOURCE_FINISHED
    assert "".join(stream.texts) == "".join(expected_text(50))
    source.assert_clean()
    target.assert_clean()


async def test_abort_from_the_source_after_the_last_stage_resumes_it_there(
    start_engine: StartEngine,
) -> None:
    source, target = await start_engine("a"), await start_engine("b")
    migrator = migrator_for(source, target)
    src = migrator._stub(source.server.address)
    dst = migrator._stub(target.server.address)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=200)
        await stream.read_until(5)
        request = await running_request(source, migrator)
        accepted = await dst.PreAllocate(
            pb.PreAllocateRequest(
                migration_id="m1", request_id=request.request_id, kv_blocks=request.kv_blocks
            )
        )
        assert accepted.accepted
        last = await src.Transfer(
            pb.TransferRequest(
                migration_id="m1",
                request_id=request.request_id,
                destination_address=target.server.address,
                stage=1,
                last_stage=True,
            )
        )
        assert last.refused_reason == "" and last.output_tokens >= 5
        assert source.core.metrics().running == 0  # suspended, KV still held
        assert source.core.metrics().kv_usage > 0
        for stub in (src, dst):
            aborted = await stub.Abort(pb.AbortRequest(migration_id="m1", from_source=True))
            assert aborted.aborted
        late = await dst.Commit(pb.CommitRequest(migration_id="m1", request_id=request.request_id))
        assert not late.committed
        await stream.read_until(None)
    assert "".join(stream.texts) == "".join(expected_text(200))
    await settle(source, target)
    source.assert_clean()
    target.assert_clean()


async def test_destination_lost_after_commit_is_recomputed_on_the_source(
    start_engine: StartEngine,
) -> None:
    source, target = await start_engine("a"), await start_engine("b")
    migrator = migrator_for(source, target)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, source.url, max_tokens=400)
        await stream.read_until(5)
        request = await running_request(source, migrator)
        result = await migrator.execute(proposal(request, source=source, target=target), deadline=0)
        assert result.committed
        await stream.read_until(len(stream.texts) + 5)
        await target.server.stop(grace_s=0)
        await stream.read_until(None)
    assert stream.done
    assert "".join(stream.texts) == "".join(expected_text(400))


async def test_engine_sim_serves_the_hook_on_migration_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from twinroute.scheduler.migration import insecure_hook_stub

    from twinroute.enginesim import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--migration-port", "0", "--kv-capacity-tokens",
                              "16000"])  # fmt: skip
    runner = web.AppRunner(command.build(args))
    await runner.setup()
    try:
        line = capsys.readouterr().out
        assert line.startswith("engine-sim migration hook on 127.0.0.1:")
        address = line.split()[-1]
        listing = await insecure_hook_stub(address).ListRequests(pb.ListRequestsRequest())
        assert (listing.total_kv_blocks, listing.free_kv_blocks) == (1000, 1000)
        assert list(listing.requests) == []
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("flags", "rebalance", "hooks"),
    [
        ([], None, None),
        (["--migration", "drain"], False, {}),
        (["--migration", "on", "--migration-hooks", "e0=127.0.0.1:7001"], True,
         {"e0": "127.0.0.1:7001"}),
    ],
    ids=["off", "drain", "on-with-hooks"],
)  # fmt: skip
def test_scheduler_migration_flags(
    flags: list[str], rebalance: bool | None, hooks: dict[str, str] | None
) -> None:
    import argparse

    from prometheus_client import CollectorRegistry
    from twinroute.scheduler import command
    from twinroute.scheduler.build import build_service

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--static-endpoints", "e0=127.0.0.1:1", *flags])
    service = build_service(command.resolve_arguments(args), registry=CollectorRegistry())
    migrator = service.migrator
    if rebalance is None:
        assert migrator is None
        return
    assert migrator is not None
    assert migrator.settings.rebalance is rebalance
    assert migrator.hooks == hooks
    assert service.telemetry is not None
    exposition = service.telemetry.exposition().decode()
    assert "twinroute_scheduler_migrations_proposed" in exposition


async def test_imbalance_round_moves_a_stream_through_the_hooks(start_engine: StartEngine) -> None:
    # 1,000 tokens of KV (62 blocks): two streams of about 6 blocks make "a" 19% fuller than
    # "b"; moving one evens them out.
    source = await start_engine("a", kv_capacity_tokens=1000)
    target = await start_engine("b", kv_capacity_tokens=1000)
    migrator = migrator_for(source, target)
    migrator = Migrator(
        core=migrator.core,
        settings=MigratorSettings(
            policy=MigrationPolicySettings(min_gap=0.05), persistent_rounds=1, last_stage_blocks=1
        ),
        hooks=migrator.hooks,
    )
    async with aiohttp.ClientSession() as session:
        # Different prompts: no shared prefix blocks, each stream holds its own KV.
        streams = [
            await open_stream(session, source.url, max_tokens=300, tag=tag) for tag in ("x", "y")
        ]
        for stream in streams:
            await stream.read_until(5)
        (result,) = await migrator.run_round()
        assert result.committed, result
        assert (result.proposal.source, result.proposal.target) == ("a", "b")
        assert target.core.metrics().running == 1
        for stream in streams:
            await stream.read_until(None)
    for stream in streams:
        assert "".join(stream.texts) == "".join(expected_text(300))
    await settle(source, target)
    source.assert_clean()
    target.assert_clean()
