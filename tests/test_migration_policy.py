"""The scheduler's migration policy (Llumnix-style pairing, accepted only when the load gap
shrinks) and the `Migrator` loop over the router path: persistence, orders, reports, lease moves
and metrics. Pure or in-process; no engines, no sleeping."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import CollectorRegistry
from twinroute.scheduler.api import NOT_HELD_REASON, MigrationOrder, MigrationReport, Trigger
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
from twinroute.scheduler.migration import (
    AbortReason,
    MigrationMetrics,
    Migrator,
    MigratorSettings,
    parse_hooks,
)
from twinroute.scheduler.migration_plan import (
    InstanceLoad,
    MigrationPolicySettings,
    RunningRequest,
    plan_migrations,
)
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.types import Endpoint


def instance(
    endpoint_id: str,
    used: int,
    *,
    running: tuple[int, ...] = (),
    capacity: int = 100,
    waiting: int = 0,
    draining: bool = False,
) -> InstanceLoad:
    return InstanceLoad(
        endpoint_id=endpoint_id,
        capacity_blocks=capacity,
        used_blocks=used,
        waiting_blocks=waiting,
        running=tuple(
            RunningRequest(request_id=f"{endpoint_id}-r{i}", kv_blocks=blocks)
            for i, blocks in enumerate(running)
        ),
        draining=draining,
    )


PLANS = [
    (
        "balanced: nothing moves",
        [instance("a", 50, running=(10, 10)), instance("b", 45, running=(5,))],
        [],
    ),
    (
        "the shortest request that shrinks the gap moves to the least loaded",
        [instance("a", 90, running=(40, 5, 20)), instance("b", 10)],
        [("a", "b", "a-r1")],
    ),
    (
        "a move that balances the pair exactly is accepted",
        [instance("a", 70, running=(65, 25)), instance("b", 20)],
        [("a", "b", "a-r1")],
    ),
    (
        "no move when every candidate would widen the gap",
        [instance("a", 60, running=(60,)), instance("b", 30)],
        [],
    ),
    (
        "the waiting request's demand counts as load (Llumnix virtual usage)",
        [instance("a", 40, running=(10,), waiting=40), instance("b", 30)],
        [("a", "b", "a-r0")],
    ),
    (
        "pairs: most loaded with least loaded, second with second",
        [
            instance("a", 90, running=(10,)),
            instance("b", 80, running=(10,)),
            instance("c", 20),
            instance("d", 5),
        ],
        [("a", "d", "a-r0"), ("b", "c", "b-r0")],
    ),
    (
        "the target must stay under the migrate-out threshold",
        [instance("a", 100, running=(30,), capacity=100), instance("b", 60, capacity=100)],
        [],
    ),
    (
        "a draining instance sends everything to the least loaded with room",
        [
            instance("a", 30, running=(10, 20), draining=True),
            instance("b", 50),
            instance("c", 20),
        ],
        [("a", "c", "a-r0"), ("a", "c", "a-r1")],
    ),
    (
        "drain skips a request no instance has room for",
        [instance("a", 90, running=(90,), draining=True), instance("b", 50)],
        [],
    ),
]


@pytest.mark.parametrize(("loads", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(loads: list[InstanceLoad], expected: list[tuple[str, str, str]]) -> None:
    proposals = plan_migrations(loads)
    assert [(p.source, p.target, p.request.request_id) for p in proposals] == expected
    for p in proposals:
        if p.trigger is Trigger.IMBALANCE:
            assert abs(p.gap_after) < p.gap_before
        else:
            assert p.gap_before == math.inf


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    loads = [
        instance("c", 80, running=(10, 10)),
        instance("a", 80, running=(10, 10)),
        instance("b", 10),
        instance("d", 10),
    ]
    first = plan_migrations(loads)
    assert first == plan_migrations(list(reversed(loads)))
    assert [(p.source, p.target) for p in first] == [("a", "b"), ("c", "d")]


def test_max_per_pair_bounds_moves() -> None:
    loads = [instance("a", 95, running=(5, 5, 5, 5)), instance("b", 5)]
    settings = MigrationPolicySettings(max_per_pair=3)
    assert len(plan_migrations(loads, settings=settings)) == 3


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("", {}), ("a=127.0.0.1:1,b=127.0.0.1:2", {"a": "127.0.0.1:1", "b": "127.0.0.1:2"})],
    ids=["empty", "two"],
)
def test_parse_hooks(spec: str, expected: dict[str, str]) -> None:
    assert parse_hooks(spec) == expected


@pytest.mark.parametrize("spec", ["a", "127.0.0.1:1", "a=host", "=h:1"], ids=str)
def test_parse_hooks_rejects_bad_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="ENDPOINT_ID=HOST:PORT"):
        parse_hooks(spec)


# -- the Migrator over leases (router path) ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler_core(*ids: str) -> SchedulerCore:
    cost = COST_PROFILES[DEFAULT_COST_PROFILE]
    core = SchedulerCore(
        policy=make_policy("round_robin", config=PolicyConfig(cost_model=cost)), cost_model=cost
    )
    core.set_endpoints([Endpoint(id=i, address=f"127.0.0.1:{9000 + n}") for n, i in enumerate(ids)])
    return core


def open_lease(core: SchedulerCore, endpoint_id: str, prompt_tokens: int, *, now: float) -> str:
    lease = core.leases.open(
        endpoint_id=endpoint_id,
        request_id=f"req-{endpoint_id}-{prompt_tokens}",
        now=now,
        prompt_tokens=prompt_tokens,
        uncached_tokens=0,  # past prefill
        predicted_ttft_s=0.0,
    )
    return lease.lease_id


class Router:
    """A watcher that answers every order like a router holding (or not holding) the lease."""

    def __init__(
        self,
        migrator: Migrator,
        *,
        holds: bool = True,
        commit: bool = True,
        refusal: str = "target refused: HTTP 503",
    ) -> None:
        self.orders: list[MigrationOrder] = []
        self._migrator = migrator
        self._holds = holds
        self._commit = commit
        self._refusal = refusal
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for order in self._migrator.orders.watch():
            self.orders.append(order)
            reason = ""
            if not self._holds:
                reason = NOT_HELD_REASON
            elif not self._commit:
                reason = self._refusal
            self._migrator.orders.report(
                MigrationReport(
                    migration_id=order.migration_id,
                    lease_id=order.lease_id,
                    committed=self._holds and self._commit,
                    reason=reason,
                    produced_tokens=7,
                    pause_s=0.02,
                )
            )

    async def started(self) -> None:
        await self._migrator.orders.wait_for_watchers(1)

    async def close(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_imbalance_must_persist_before_a_lease_moves_and_the_lease_keeps_its_id() -> None:
    core = scheduler_core("a", "b")
    clock = Clock()
    hot = [open_lease(core, "a", tokens, now=clock.now) for tokens in (3200, 800, 4800)]
    registry = CollectorRegistry()
    migrator = Migrator(
        core=core,
        settings=MigratorSettings(
            persistent_rounds=3, capacity_tokens=16_000, block_tokens=16, order_deadline_s=5
        ),
        metrics=MigrationMetrics(registry),
        clock=clock,
    )
    moved_from: list[str] = []
    migrator.on_lease_moved = moved_from.append
    router = Router(migrator)
    await router.started()
    assert await migrator.run_round() == []
    assert await migrator.run_round() == []
    (result,) = await migrator.run_round()
    await router.close()
    assert result.committed
    # The shortest request moved, under its lease id, with what it produced recomputed there.
    (order,) = router.orders
    assert (order.lease_id, order.source.id, order.target.id) == (hot[1], "a", "b")
    assert order.trigger is Trigger.IMBALANCE
    lease = core.leases.get(hot[1])
    assert lease is not None and lease.endpoint_id == "b"
    assert lease.prompt_tokens == 800 + 7
    assert moved_from == ["a"]
    assert sample(registry, "twinroute_scheduler_migrations_proposed_total",
                  trigger="imbalance", path="router") == 1  # fmt: skip
    assert sample(registry, "twinroute_scheduler_migrations_committed_total",
                  trigger="imbalance", path="router") == 1  # fmt: skip


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        ("target refused: HTTP 503", AbortReason.ROUTER_REFUSED),
        ("stream finished", AbortReason.SOURCE_FINISHED),
        ("stream finishing", AbortReason.SOURCE_FINISHED),
    ],
    ids=["target-refused", "finished", "finishing"],
)
async def test_a_refused_order_leaves_the_lease_and_counts_the_reason(
    refusal: str, expected: AbortReason
) -> None:
    core = scheduler_core("a", "b")
    clock = Clock()
    lease_id = open_lease(core, "a", 8000, now=clock.now)
    registry = CollectorRegistry()
    migrator = Migrator(
        core=core,
        settings=MigratorSettings(persistent_rounds=1, capacity_tokens=16_000, block_tokens=16),
        metrics=MigrationMetrics(registry),
        clock=clock,
    )
    core.drain("a")
    router = Router(migrator, commit=False, refusal=refusal)
    await router.started()
    (result,) = await migrator.drain_now("a", timeout_s=5)
    await router.close()
    assert not result.committed and result.reason is expected
    lease = core.leases.get(lease_id)
    assert lease is not None and lease.endpoint_id == "a"
    assert sample(registry, "twinroute_scheduler_migrations_aborted_total",
                  trigger="drain", path="router", reason=expected.value) == 1  # fmt: skip


async def test_an_order_no_router_holds_is_settled_when_every_watcher_said_so() -> None:
    core = scheduler_core("a", "b")
    clock = Clock()
    open_lease(core, "a", 800, now=clock.now)
    migrator = Migrator(core=core, settings=MigratorSettings(persistent_rounds=1), clock=clock)
    core.drain("a")
    routers = [Router(migrator, holds=False), Router(migrator, holds=False)]
    for router in routers:
        await router.started()
    await migrator.orders.wait_for_watchers(2)
    (result,) = await migrator.drain_now("a", timeout_s=5)
    for router in routers:
        await router.close()
    assert result.reason is AbortReason.NOT_HELD
    assert all(len(router.orders) == 1 for router in routers)


async def test_without_a_hook_or_a_router_nothing_is_attempted() -> None:
    core = scheduler_core("a", "b")
    clock = Clock()
    open_lease(core, "a", 8000, now=clock.now)
    migrator = Migrator(core=core, clock=clock)
    core.drain("a")
    (result,) = await migrator.drain_now("a", timeout_s=5)
    assert result.reason is AbortReason.NO_PATH
    assert core.in_flight("a") == 1
