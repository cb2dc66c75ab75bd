"""Admission hold in the live scheduler: the real gRPC service on 127.0.0.1:0, a real channel,
time on an injected clock and rounds run by the test (`run_rounds=False`), so nothing here
depends on how long anything takes. Waiting is only for RPCs to arrive or answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twinroute.scheduler.admission import AdmissionMetrics, AdmissionQueue, AdmissionSettings
from twinroute.scheduler.api import PickQuery, Placement
from twinroute.scheduler.build import build_core, build_service
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.command import add_arguments, resolve_arguments
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

from twinroute.vocabulary import DecisionReason

MODEL = "m"
SLO_S = 2.0
# 16k-token prompts: ~0.9 s of prefill each on the H100 model, so three fill a 2 s SLO.
PROMPT = 16_000
DEFAULT_SETTINGS = AdmissionSettings()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Live:
    service: SchedulerService
    queue: AdmissionQueue
    server: GrpcServer
    client: SchedulerClient
    clock: FakeClock
    registry: CollectorRegistry
    # Picks still open (held), by request id.
    pending: dict[str, asyncio.Task[Placement]] = field(default_factory=dict)

    @property
    def core(self) -> SchedulerCore:
        return self.service.core


def build(
    *, policy: str = "dualmap", settings: AdmissionSettings = DEFAULT_SETTINGS
) -> tuple[SchedulerService, AdmissionQueue, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    scheduler_settings = SchedulerSettings(policy=policy, ttft_slo_s=SLO_S)
    core = build_core(scheduler_settings)
    registry = CollectorRegistry()
    queue = AdmissionQueue(
        core=core,
        settings=settings,
        clock=clock,
        metrics=AdmissionMetrics(registry=registry),
        run_rounds=False,
    )
    service = SchedulerService(core=core, settings=scheduler_settings, clock=clock, admission=queue)
    service.set_endpoints(
        [Endpoint(id=f"e{i}", address=f"127.0.0.1:{9100 + i}", model=MODEL) for i in range(2)]
    )
    return service, queue, clock, registry


@pytest.fixture
async def live(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    options = getattr(request, "param", {})
    service, queue, clock, registry = build(**options)
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    client = SchedulerClient(target=server.address, timeout_s=30.0)
    try:
        yield Live(service, queue, server, client, clock, registry)
    finally:
        await client.close()
        await server.stop(grace_s=0.5)


def query(name: str, *, start: int) -> PickQuery:
    ids = np.arange(start, start + PROMPT, dtype=np.uint32)
    return PickQuery(request_id=name, model=MODEL, token_ids=ids)


async def until(condition: Callable[[], bool], *, what: str) -> None:
    """Wait for RPC traffic to make `condition` true (no timing is asserted)."""
    for _ in range(2_000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def pick_until_held(live: Live, *, limit: int = 20) -> tuple[list[Placement], str]:
    """Pick distinct long prompts until one is held; returns the answered ones and the held
    request's id (its Pick still open)."""
    answered: list[Placement] = []
    for index in range(limit):
        name = f"r{index}"
        task = asyncio.create_task(live.client.pick(query(name, start=index * 1_000_000)))
        await until(_answered_or_held(live, task, live.queue.held_total), what=name)
        if task.done():
            answered.append(task.result())
            continue
        live.pending[name] = task
        return answered, name
    raise AssertionError("no request was held")


def _answered_or_held(
    live: Live, task: asyncio.Task[Placement], held_before: int
) -> Callable[[], bool]:
    return lambda: task.done() or live.queue.held_total > held_before


def pending(live: Live, name: str) -> asyncio.Task[Placement]:
    return live.pending[name]


async def test_a_request_for_a_hotspot_is_held_and_released_fifo_as_the_backlog_clears(
    live: Live,
) -> None:
    answered, first = await pick_until_held(live)
    assert len(answered) >= 4  # both endpoints fill to the SLO before anything is held
    held_endpoint = "e0" if live.queue.held_on("e0") else "e1"
    # A second hot request for the same endpoint queues behind the first.
    second = asyncio.create_task(live.client.pick(query("late", start=77_000_000)))
    await until(lambda: len(live.queue) == 2 or second.done(), what="second hold")
    assert not pending(live, first).done()
    live.queue.run_round()  # no time passed: nothing cleared, nothing moves
    assert not pending(live, first).done()
    # Time passes: the fluid estimate drains the queue ahead until the head fits the SLO.
    live.clock.now += 1.5
    live.queue.run_round()
    answer = await pending(live, first)
    assert answer.endpoint.id == held_endpoint
    assert answer.reason is not DecisionReason.REBALANCED
    live.clock.now += 10.0
    live.queue.run_round()
    await second
    assert len(live.queue) == 0
    text = generate_latest(live.registry).decode()
    assert 'twinroute_admission_hold_seconds_count{outcome="backlog"}' in text
    assert "twinroute_admission_held 0.0" in text


async def test_a_held_request_moves_to_its_other_candidate_once_that_one_cools(
    live: Live,
) -> None:
    answered, name = await pick_until_held(live)
    held_on = "e0" if live.queue.held_on("e0") else "e1"
    other = "e1" if held_on == "e0" else "e0"
    # The other candidate's requests finish (the router completes them): it cools down,
    # while the hotspot's queue does not move (no time passes).
    for answer in answered:
        if answer.endpoint.id == other:
            assert await live.client.complete(lease_id=answer.lease_id)
    live.queue.run_round()
    moved = await pending(live, name)
    assert (moved.endpoint.id, moved.reason) == (other, DecisionReason.REBALANCED)
    assert live.core.leases.get(moved.lease_id).endpoint_id == other  # type: ignore[union-attr]
    assert live.queue.moved_total == 1
    decisions = await live.service.explain(limit=1, request_id=name)
    assert decisions[0].decision.reason is DecisionReason.REBALANCED
    text = generate_latest(live.registry).decode()
    assert 'twinroute_admission_moves_total{reason="rebalance"} 1.0' in text
    # The moved lease completes normally.
    assert await live.client.complete(lease_id=moved.lease_id)


@pytest.mark.parametrize(
    "live", [{"settings": AdmissionSettings(max_hold_s=0.3)}], indirect=True, ids=["max-hold-0.3s"]
)
async def test_nothing_is_held_past_its_deadline(live: Live) -> None:
    _answered, name = await pick_until_held(live)
    live.clock.now += 0.1  # the backlog is still over the SLO after 0.1 s...
    live.queue.run_round()
    assert not pending(live, name).done()
    live.clock.now += 0.25  # ...and at 0.35 s the hold ends anyway
    live.queue.run_round()
    answer = await pending(live, name)
    assert answer.reason is not DecisionReason.REBALANCED
    text = generate_latest(live.registry).decode()
    assert 'twinroute_admission_hold_seconds_count{outcome="deadline"} 1.0' in text


async def test_a_caller_deadline_too_close_to_hold_within_gets_its_answer_at_once(
    live: Live,
) -> None:
    await pick_until_held(live)
    # 0.2 s of RPC deadline is inside the 0.25 s margin: answered as picked, not held.
    short = SchedulerClient(target=live.server.address, timeout_s=0.2)
    try:
        answer = await short.pick(query("hurried", start=55_000_000))
    finally:
        await short.close()
    assert answer.lease_id not in live.queue.held_on(answer.endpoint.id)
    text = generate_latest(live.registry).decode()
    assert 'twinroute_admission_not_held_total{why="deadline"} 1.0' in text


async def test_a_caller_that_goes_away_while_held_leaves_no_lease_behind(live: Live) -> None:
    await pick_until_held(live)
    open_before = len(live.core.leases)
    channel = grpc.aio.insecure_channel(live.server.address)
    try:
        stub = pb_grpc.SchedulerStub(channel)
        ids = list(range(66_000_000, 66_000_000 + PROMPT))
        call = stub.Pick(
            pb.PickRequest(
                request_id="gone", model=MODEL, prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids))
            )
        )
        await until(lambda: len(live.queue) == 2, what="the second hold")
        assert len(live.core.leases) == open_before + 1
        call.cancel()
        await until(lambda: len(live.queue) == 1, what="the cancelled hold to go")
    finally:
        await channel.close()
    assert len(live.core.leases) == open_before
    text = generate_latest(live.registry).decode()
    assert 'twinroute_admission_hold_seconds_count{outcome="cancelled"} 1.0' in text


async def test_graceful_stop_answers_every_held_request(live: Live) -> None:
    _answered, name = await pick_until_held(live)
    await live.server.stop(grace_s=2.0)
    answer = await pending(live, name)
    assert answer.lease_id
    assert len(live.queue) == 0


@pytest.mark.parametrize("live", [{"policy": "least_loaded"}], indirect=True, ids=["least-loaded"])
async def test_policies_that_do_not_rebalance_are_never_held(live: Live) -> None:
    for index in range(12):
        await live.client.pick(query(f"r{index}", start=index * 1_000_000))
    assert live.queue.held_total == 0


def test_admission_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        AdmissionSettings(max_hold_s=0)
    with pytest.raises(ValueError, match="max_held"):
        AdmissionSettings(max_held=0)


@pytest.mark.parametrize(("flag", "held"), [("on", True), ("off", False)], ids=["on", "off"])
def test_scheduler_command_switch(flag: str, held: bool) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--static-endpoints", "127.0.0.1:9000", "--model", MODEL, "--admission-hold", flag]
    )
    service = build_service(resolve_arguments(args))
    assert (service.admission is not None) is held
    if held:
        assert service.admission is not None
        assert service.admission.settings.max_hold_s == 3.0


async def test_the_embedded_router_scheduler_holds_and_releases_too() -> None:
    import argparse

    from twinroute.router.command import add_arguments as router_arguments
    from twinroute.router.command import embedded_settings

    parser = argparse.ArgumentParser()
    router_arguments(parser)
    args = parser.parse_args(
        ["--embedded", f"--model={MODEL}", "--endpoints=e0=127.0.0.1:9100,e1=127.0.0.1:9101",
         f"--ttft-slo-s={SLO_S}", "--admission-hold=on"]
    )  # fmt: skip
    clock = FakeClock()
    scheduler = build_service(embedded_settings(args), clock=clock)
    scheduler.set_endpoints(
        [Endpoint(id="e0", address="127.0.0.1:9100"), Endpoint(id="e1", address="127.0.0.1:9101")]
    )
    queue = scheduler.admission
    assert isinstance(queue, AdmissionQueue)
    try:
        task = None
        for index in range(20):
            ids = list(range(index * 1_000_000, index * 1_000_000 + PROMPT))
            query = PickQuery(request_id=f"r{index}", model=MODEL, token_ids=ids)
            task = asyncio.create_task(scheduler.pick(query))
            await until(_done_or_held(task, queue), what=f"r{index}")
            if not task.done():
                break
        assert task is not None and not task.done()
        # Its own background rounds release it once the (injected) time has drained the queue.
        clock.now += 60.0
        placement = await asyncio.wait_for(task, timeout=10.0)
        assert placement.endpoint.id in {"e0", "e1"} and placement.lease_id
    finally:
        await scheduler.close()
    assert len(queue) == 0


def _done_or_held(task: asyncio.Task[Placement], queue: AdmissionQueue) -> Callable[[], bool]:
    return lambda: task.done() or len(queue) == 1
