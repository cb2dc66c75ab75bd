"""Live migration of running requests, carried out: the `Migrator`.

The plan comes from `scheduler/migration_plan.py` (Llumnix-style, pure). Two paths, chosen per
pair:
- Engine hooks (`twinroute.v1.MigrationHook`, both instances have a hook address): PreAllocate
  on the target, up to `max_stages` Transfer stages on the source (the last one when at most
  `last_stage_blocks` remain), Commit on the target; on any failure Abort on both sides (each
  side cleans its own part: the target frees its reservation, the source resumes the request).
  The client's HTTP stream stays on the source, which forwards what the target produces.
- Router recompute (stock vLLM): an order on the `WatchMigrations` stream
  (`scheduler/migration_orders.py`); the router holding the lease splices the stream onto the
  target and reports back; a committed report moves the lease to the target (same id,
  `SchedulerCore.move_running`), so Drain sees the source empty.

Imbalance must persist for `persistent_rounds` consecutive rounds before a source migrates; a
request migrates at most once for imbalance. Drain migrates at once, within the drain deadline.
Metrics: migrations proposed / committed / aborted, by trigger, path and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from twinroute.scheduler.api import (
    NOT_HELD_REASON,
    STREAM_FINISHING_REASON,
    MigrationOrder,
    Trigger,
)
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.migration_orders import MigrationOrders
from twinroute.scheduler.migration_plan import (
    InstanceLoad,
    MigrationPolicySettings,
    MigrationProposal,
    RunningRequest,
    plan_migrations,
)
from twinroute.scheduler.types import Role
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class Path(enum.StrEnum):
    HOOK = "hook"
    ROUTER = "router"


class AbortReason(enum.StrEnum):
    """Why a migration did not commit; a bounded set, used as a metric label."""

    PREALLOCATE_REFUSED = "preallocate_refused"
    SOURCE_FINISHED = "source_finished"
    TRANSFER_REFUSED = "transfer_refused"
    COMMIT_REFUSED = "commit_refused"
    UNREACHABLE = "unreachable"
    DEADLINE = "deadline"
    ROUTER_REFUSED = "router_refused"
    NOT_HELD = "not_held"
    NO_PATH = "no_path"


@dataclass(frozen=True, slots=True)
class MigratorSettings:
    policy: MigrationPolicySettings = field(default_factory=MigrationPolicySettings)
    interval_s: float = 1.0
    # Run the imbalance policy (else only drains migrate).
    rebalance: bool = True
    persistent_rounds: int = 3
    max_stages: int = 3
    last_stage_blocks: int = 16
    # The router path's view of an instance: KV memory and block size, in tokens.
    capacity_tokens: int = 432_000
    block_tokens: int = 16
    # How long a router has to carry out an imbalance order.
    order_deadline_s: float = 10.0
    rpc_timeout_s: float = 30.0


class MigrationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.proposed = Counter(
            "twinroute_scheduler_migrations_proposed",
            "Migrations the policy proposed and the scheduler started, by trigger and path.",
            ["trigger", "path"],
            registry=registry,
        )
        self.committed = Counter(
            "twinroute_scheduler_migrations_committed",
            "Migrations that committed (the request runs on the target).",
            ["trigger", "path"],
            registry=registry,
        )
        self.aborted = Counter(
            "twinroute_scheduler_migrations_aborted",
            "Migrations that did not commit (the request stayed on the source), by reason.",
            ["trigger", "path", "reason"],
            registry=registry,
        )
        self.pause_seconds = Histogram(
            "twinroute_scheduler_migration_pause_seconds",
            "Client stream pause at the splice, as routers report it.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class MigrationResult:
    proposal: MigrationProposal
    path: Path
    committed: bool
    reason: AbortReason | None = None
    detail: str = ""


HookStubFactory = Callable[[str], "pb_grpc.MigrationHookAsyncStub"]


def insecure_hook_stub(address: str) -> pb_grpc.MigrationHookAsyncStub:
    return pb_grpc.MigrationHookStub(grpc.aio.insecure_channel(address))


@dataclass(slots=True)
class _DrainState:
    deadline: float
    task: asyncio.Task[None] | None = None
    tried: set[str] = field(default_factory=set)


class Migrator:
    """Runs the policy on the scheduler's view and carries its proposals out."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        settings: MigratorSettings = MigratorSettings(),
        hooks: Mapping[str, str] = {},
        metrics: MigrationMetrics | None = None,
        stub_factory: HookStubFactory = insecure_hook_stub,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.core = core
        self.settings = settings
        self.hooks = dict(hooks)
        self.orders = MigrationOrders()
        self.metrics = metrics
        self._stub_factory = stub_factory
        self._stubs: dict[str, pb_grpc.MigrationHookAsyncStub] = {}
        self._clock = clock
        self._sleep = sleep
        self._ids = itertools.count(1)
        # Engines key their state by migration id: a restarted scheduler must not reuse one.
        self._id_prefix = f"mig-{uuid.uuid4().hex[:8]}"
        self._imbalance_rounds: dict[str, int] = {}
        self._migrated: set[str] = set()
        self._drains: dict[str, _DrainState] = {}
        # Called with the source endpoint after a lease left it (the service wakes Drain).
        self.on_lease_moved: Callable[[str], None] = lambda endpoint_id: None
        self.results: list[MigrationResult] = []

    # -- the scheduler's view ---------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.MigrationHookAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = self._stub_factory(address)
        return stub

    async def _hook_load(self, endpoint_id: str, *, draining: bool) -> InstanceLoad | None:
        try:
            listing = await self._stub(self.hooks[endpoint_id]).ListRequests(
                pb.ListRequestsRequest(), timeout=self.settings.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("ListRequests on %s failed: %s", endpoint_id, error.code().name)
            return None
        running = tuple(
            RunningRequest(request_id=r.request_id, kv_blocks=r.kv_blocks)
            for r in listing.requests
            if not r.waiting
        )
        waiting = next((r.kv_blocks for r in listing.requests if r.waiting), 0)
        return InstanceLoad(
            endpoint_id=endpoint_id,
            capacity_blocks=listing.total_kv_blocks,
            used_blocks=listing.total_kv_blocks - listing.free_kv_blocks,
            waiting_blocks=waiting,
            running=running,
            draining=draining,
        )

    def _lease_load(self, endpoint_id: str, *, draining: bool, now: float) -> InstanceLoad:
        """From leases and the last scrape. Draining: every lease moves (queued ones too, a
        recompute migration of a request with nothing produced is a plain resend)."""
        block = self.settings.block_tokens
        capacity = max(1, self.settings.capacity_tokens // block)
        leases = self.core.leases.leases_on(endpoint_id)
        running = tuple(
            RunningRequest(
                request_id=lease.request_id,
                kv_blocks=max(1, math.ceil(lease.prompt_tokens / block)),
                lease_id=lease.lease_id,
            )
            for lease in leases
            if draining or lease.prefilled
        )
        snapshot = self.core.load(endpoint_id, now=now)
        if snapshot.kv_usage is not None:
            used = round(snapshot.kv_usage * capacity)
        else:
            used = sum(max(1, math.ceil(lease.prompt_tokens / block)) for lease in leases)
        return InstanceLoad(
            endpoint_id=endpoint_id,
            capacity_blocks=capacity,
            used_blocks=used,
            running=running,
            draining=draining,
        )

    async def snapshot(self) -> list[InstanceLoad]:
        now = self._clock()
        loads: list[InstanceLoad] = []
        for endpoint_id, endpoint in sorted(self.core.endpoints.items()):
            # A prefill instance is never a source or target: its requests leave it when the
            # prefill is done (the router's report), and a stream must stay on a decode one.
            if endpoint_id in self.core.unhealthy or endpoint.role is Role.PREFILL:
                continue
            draining = endpoint_id in self.core.draining
            if endpoint_id in self.hooks:
                load = await self._hook_load(endpoint_id, draining=draining)
                if load is not None:
                    loads.append(load)
            else:
                loads.append(self._lease_load(endpoint_id, draining=draining, now=now))
        return loads

    # -- rounds ------------------------------------------------------------------------------

    async def run_round(self) -> list[MigrationResult]:
        """One imbalance round: plan, keep what persisted, carry it out (concurrently)."""
        loads = [load for load in await self.snapshot() if not load.draining]
        proposals = [
            p
            for p in plan_migrations(loads, settings=self.settings.policy)
            if p.request.request_id not in self._migrated
        ]
        sources = {p.source for p in proposals}
        for endpoint_id in list(self._imbalance_rounds):
            if endpoint_id not in sources:
                del self._imbalance_rounds[endpoint_id]
        ready: list[MigrationProposal] = []
        for proposal in proposals:
            rounds = self._imbalance_rounds.get(proposal.source, 0) + 1
            self._imbalance_rounds[proposal.source] = rounds
            if rounds >= self.settings.persistent_rounds:
                ready.append(proposal)
        for proposal in ready:
            self._imbalance_rounds.pop(proposal.source, None)
            self._migrated.add(proposal.request.request_id)
        if len(self._migrated) > 65_536:
            self._migrated.clear()
        deadline = self._clock() + self.settings.order_deadline_s
        return list(await asyncio.gather(*(self.execute(p, deadline=deadline) for p in ready)))

    async def run(self) -> None:
        """Imbalance rounds every `interval_s` until cancelled."""
        while True:
            await self._sleep(self.settings.interval_s)
            try:
                await self.run_round()
            except Exception:
                logger.exception("migration round failed")

    def start_drain(self, endpoint_id: str, *, timeout_s: float) -> None:
        """Migrate what runs on a draining endpoint within `timeout_s` (in the background)."""
        state = self._drains.get(endpoint_id)
        deadline = self._clock() + max(0.0, timeout_s)
        if state is not None and state.task is not None and not state.task.done():
            state.deadline = max(state.deadline, deadline)
            return
        state = self._drains[endpoint_id] = _DrainState(deadline=deadline)
        state.task = asyncio.get_running_loop().create_task(
            self._drain(endpoint_id, state), name=f"migrate-drain-{endpoint_id}"
        )

    async def drain_now(self, endpoint_id: str, *, timeout_s: float) -> list[MigrationResult]:
        """One pass of drain migrations, awaited (what `start_drain` repeats in the background)."""
        state = self._drains.setdefault(
            endpoint_id, _DrainState(deadline=self._clock() + timeout_s)
        )
        results, _left = await self._drain_pass(endpoint_id, state)
        return results

    async def _drain(self, endpoint_id: str, state: _DrainState) -> None:
        try:
            while self._clock() < state.deadline and endpoint_id in self.core.draining:
                results, left = await self._drain_pass(endpoint_id, state)
                if left == 0:
                    return
                if not results:
                    # Nothing (new) to move: wait for queued requests to start running.
                    await self._sleep(min(0.1, max(0.0, state.deadline - self._clock())))
        except Exception:
            logger.exception("drain migrations of %s failed", endpoint_id)

    async def _drain_pass(
        self, endpoint_id: str, state: _DrainState
    ) -> tuple[list[MigrationResult], int]:
        """One round of drain migrations; also how many requests were still on the endpoint
        (running or queued there, as its hook or the leases tell) before it."""
        loads = await self.snapshot()
        left = sum(
            len(load.running) + (1 if load.waiting_blocks else 0)
            for load in loads
            if load.endpoint_id == endpoint_id
        )
        proposals = [
            p
            for p in plan_migrations(loads, settings=self.settings.policy)
            if p.trigger is Trigger.DRAIN
            and p.source == endpoint_id
            and _key(p.request) not in state.tried
        ]
        for proposal in proposals:
            state.tried.add(_key(proposal.request))
        results = await asyncio.gather(
            *(self.execute(p, deadline=state.deadline) for p in proposals)
        )
        for result in results:
            if not result.committed and result.reason in (
                AbortReason.UNREACHABLE,
                AbortReason.COMMIT_REFUSED,
                AbortReason.PREALLOCATE_REFUSED,
            ):
                # Another target may take it on the next pass.
                state.tried.discard(_key(result.proposal.request))
        return list(results), left

    # -- one migration ------------------------------------------------------------------------

    async def execute(self, proposal: MigrationProposal, *, deadline: float) -> MigrationResult:
        if proposal.source in self.hooks and proposal.target in self.hooks:
            path = Path.HOOK
        elif proposal.request.lease_id and self.orders.watchers > 0:
            path = Path.ROUTER
        else:
            return self._record(
                MigrationResult(
                    proposal=proposal,
                    path=Path.ROUTER,
                    committed=False,
                    reason=AbortReason.NO_PATH,
                    detail="no engine hook on both sides and no router watching",
                ),
                proposed=False,
            )
        if self.metrics is not None:
            self.metrics.proposed.labels(proposal.trigger.value, path.value).inc()
        logger.info(
            "migrating %s from %s to %s (%s, %s)",
            proposal.request.request_id, proposal.source, proposal.target,
            proposal.trigger.value, path.value,
        )  # fmt: skip
        if path is Path.HOOK:
            result = await self._via_hooks(proposal)
        else:
            result = await self._via_router(proposal, deadline=deadline)
        return self._record(result, proposed=True)

    def _record(self, result: MigrationResult, *, proposed: bool) -> MigrationResult:
        self.results.append(result)
        if len(self.results) > 1024:
            del self.results[:512]
        trigger = result.proposal.trigger.value
        if self.metrics is not None:
            if result.committed:
                self.metrics.committed.labels(trigger, result.path.value).inc()
            elif result.reason is not None:
                self.metrics.aborted.labels(trigger, result.path.value, result.reason.value).inc()
        if not result.committed:
            logger.info(
                "migration of %s not committed: %s (%s)",
                result.proposal.request.request_id, result.reason, result.detail,
            )  # fmt: skip
        return result

    def _migration_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    async def _via_hooks(self, proposal: MigrationProposal) -> MigrationResult:
        migration_id = self._migration_id()
        request_id = proposal.request.request_id
        source_address = self.hooks[proposal.source]
        target_address = self.hooks[proposal.target]
        source = self._stub(source_address)
        target = self._stub(target_address)
        timeout = self.settings.rpc_timeout_s

        def failed(reason: AbortReason, detail: str) -> MigrationResult:
            return MigrationResult(
                proposal=proposal, path=Path.HOOK, committed=False, reason=reason, detail=detail
            )

        try:
            answer = await target.PreAllocate(
                pb.PreAllocateRequest(
                    migration_id=migration_id,
                    request_id=request_id,
                    kv_blocks=proposal.request.kv_blocks,
                    source_address=source_address,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            return failed(AbortReason.UNREACHABLE, f"PreAllocate: {error.code().name}")
        if not answer.accepted:
            return failed(AbortReason.PREALLOCATE_REFUSED, answer.reason)
        try:
            remaining = proposal.request.kv_blocks
            state: pb.TransferResponse | None = None
            for stage in range(1, self.settings.max_stages + 1):
                last = stage == self.settings.max_stages or (
                    stage > 1 and remaining <= self.settings.last_stage_blocks
                )
                state = await source.Transfer(
                    pb.TransferRequest(
                        migration_id=migration_id,
                        request_id=request_id,
                        destination_address=target_address,
                        stage=stage,
                        last_stage=last,
                    ),
                    timeout=timeout,
                )
                if state.refused_reason:
                    await self._abort_both(source, target, migration_id, request_id,
                                           state.refused_reason)  # fmt: skip
                    reason = (
                        AbortReason.SOURCE_FINISHED
                        if "finished" in state.refused_reason
                        or "not running" in (state.refused_reason)
                        else AbortReason.TRANSFER_REFUSED
                    )
                    return failed(reason, state.refused_reason)
                remaining = state.blocks_remaining
                if last:
                    break
            assert state is not None
            commit = await target.Commit(
                pb.CommitRequest(
                    migration_id=migration_id,
                    request_id=request_id,
                    prompt_tokens=state.prompt_tokens,
                    output_tokens=state.output_tokens,
                    max_tokens=state.max_tokens,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            await self._abort_both(source, target, migration_id, request_id,
                                   f"{error.code().name}")  # fmt: skip
            return failed(AbortReason.UNREACHABLE, f"{error.code().name}: {error.details()}")
        if not commit.committed:
            await self._abort_both(source, target, migration_id, request_id, commit.reason)
            return failed(AbortReason.COMMIT_REFUSED, commit.reason)
        return MigrationResult(proposal=proposal, path=Path.HOOK, committed=True)

    async def _abort_both(
        self,
        source: pb_grpc.MigrationHookAsyncStub,
        target: pb_grpc.MigrationHookAsyncStub,
        migration_id: str,
        request_id: str,
        reason: str,
    ) -> None:
        """Each side cleans its own part (the target its reservation, the source resumes the
        request); a side that cannot be reached is skipped (the target's reservation times
        out with its commit wait, a dead source has nothing left to clean)."""
        abort = pb.AbortRequest(
            migration_id=migration_id, request_id=request_id, from_source=True, reason=reason
        )
        for stub in (target, source):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Abort(abort, timeout=self.settings.rpc_timeout_s)

    async def _via_router(self, proposal: MigrationProposal, *, deadline: float) -> MigrationResult:
        core = self.core
        source = core.endpoints.get(proposal.source)
        target = core.endpoints.get(proposal.target)
        if source is None or target is None:
            return MigrationResult(
                proposal=proposal,
                path=Path.ROUTER,
                committed=False,
                reason=AbortReason.NO_PATH,
                detail="endpoint left",
            )
        left = max(0.0, deadline - self._clock())
        order = MigrationOrder(
            migration_id=self._migration_id(),
            lease_id=proposal.request.lease_id,
            request_id=proposal.request.request_id,
            source=source,
            target=target,
            trigger=proposal.trigger,
            deadline_s=left,
        )
        future = self.orders.issue(order)
        try:
            report = await asyncio.wait_for(future, timeout=left)
        except TimeoutError:
            self.orders.withdraw(order.migration_id)
            return MigrationResult(
                proposal=proposal,
                path=Path.ROUTER,
                committed=False,
                reason=AbortReason.DEADLINE,
                detail=f"no report within {left:.1f}s",
            )
        if not report.committed:
            if report.reason == NOT_HELD_REASON:
                reason = AbortReason.NOT_HELD
            elif report.reason.startswith(STREAM_FINISHING_REASON):
                reason = AbortReason.SOURCE_FINISHED
            else:
                reason = AbortReason.ROUTER_REFUSED
            return MigrationResult(
                proposal=proposal,
                path=Path.ROUTER,
                committed=False,
                reason=reason,
                detail=report.reason,
            )
        if self.metrics is not None:
            self.metrics.pause_seconds.observe(report.pause_s)
        moved_from = core.move_running(
            order.lease_id,
            target=target.id,
            produced_tokens=report.produced_tokens,
            now=self._clock(),
        )
        if moved_from is not None:
            self.on_lease_moved(moved_from)
        return MigrationResult(proposal=proposal, path=Path.ROUTER, committed=True)


def _key(request: RunningRequest) -> str:
    return request.lease_id or request.request_id


def parse_hooks(spec: str) -> dict[str, str]:
    """`a=127.0.0.1:7001,b=127.0.0.1:7002` -> {"a": "127.0.0.1:7001", ...}."""
    hooks: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        endpoint_id, sep, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if not sep or not endpoint_id or not host or not port.isdigit():
            raise ValueError(f"migration hook {item!r} is not ENDPOINT_ID=HOST:PORT")
        hooks[endpoint_id] = address
    return hooks
