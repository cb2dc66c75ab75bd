"""Live migration of running requests: a Llumnix-style policy, and the loop that carries it out.

Policy (`plan_migrations`, pure, deterministic):
1. Load of an instance = (KV blocks used + KV demand of its first waiting request) / KV blocks
   (Llumnix's "virtual usage", as a fraction of memory). A draining instance counts as
   infinitely loaded, so everything on it leaves.
2. Imbalance: sources sorted by load descending, targets ascending (ties by endpoint id); the
   i-th source is paired with the i-th target while the source's load exceeds the target's by
   more than `min_gap`. From each source, requests are tried by KV blocks ascending (short ones
   are cheapest to move and to recompute); a move is proposed only when the pair's load gap
   shrinks and the target stays under `migrate_out_threshold` (it must not become a source),
   at most `max_per_pair` moves per pair and round.
3. Drain: every request on a draining instance goes to the least loaded target that has room
   for its blocks, loads updated after each placement.
Cost: O(instances log instances + requests on the sources log requests) per round.

Execution (`Migrator`): two paths, chosen per pair.
- Engine hooks (`twinroute.v1.MigrationHook`, both instances have a hook address): PreAllocate
  on the target, up to `max_stages` Transfer stages on the source (the last one when at most
  `last_stage_blocks` remain), Commit on the target; on any failure Abort on both sides (each
  side cleans its own part: the target frees its reservation, the source resumes the request).
  The client's HTTP stream stays on the source, which forwards what the target produces.
- Router recompute (stock vLLM): an order on the `WatchMigrations` stream; the router holding
  the lease splices the stream onto the target and reports back; a committed report moves the
  lease to the target (same id), so Drain sees the source empty.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.types import Endpoint, Role
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class Trigger(enum.StrEnum):
    DRAIN = "drain"
    IMBALANCE = "imbalance"


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
class RunningRequest:
    """A request an instance runs: the engine's id (hook path) and/or the lease (router path)."""

    request_id: str
    kv_blocks: int
    lease_id: str = ""


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    endpoint_id: str
    capacity_blocks: int
    used_blocks: int
    # KV demand of the first waiting request (Llumnix counts it against the instance).
    waiting_blocks: int = 0
    running: tuple[RunningRequest, ...] = ()
    draining: bool = False

    @property
    def load(self) -> float:
        if self.draining:
            return math.inf
        return (self.used_blocks + self.waiting_blocks) / max(1, self.capacity_blocks)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    # Load gap (fraction of KV memory) between a pair that counts as imbalance.
    min_gap: float = 0.2
    # A target must stay at or under this load after the move.
    migrate_out_threshold: float = 0.8
    max_per_pair: int = 1


@dataclass(frozen=True, slots=True)
class MigrationProposal:
    source: str
    target: str
    request: RunningRequest
    trigger: Trigger
    # Loads of source and target before and after the move (source is inf when draining).
    gap_before: float
    gap_after: float


def plan_migrations(
    instances: Sequence[InstanceLoad], *, settings: PolicySettings = PolicySettings()
) -> list[MigrationProposal]:
    """Proposals for one round; see the module docstring for the steps."""
    used = {i.endpoint_id: i.used_blocks + i.waiting_blocks for i in instances}
    capacity = {i.endpoint_id: max(1, i.capacity_blocks) for i in instances}
    targets = [i for i in instances if not i.draining]

    def load(endpoint_id: str) -> float:
        return used[endpoint_id] / capacity[endpoint_id]

    proposals: list[MigrationProposal] = []
    for source in sorted((i for i in instances if i.draining), key=lambda i: i.endpoint_id):
        for request in sorted(source.running, key=lambda r: (r.kv_blocks, r.request_id)):
            fitting = [
                t
                for t in targets
                if used[t.endpoint_id] + request.kv_blocks <= capacity[t.endpoint_id]
            ]
            if not fitting:
                logger.warning(
                    "drain of %s: no instance has room for %s (%d blocks)",
                    source.endpoint_id, request.request_id, request.kv_blocks,
                )  # fmt: skip
                continue
            target = min(fitting, key=lambda t: (load(t.endpoint_id), t.endpoint_id))
            used[target.endpoint_id] += request.kv_blocks
            proposals.append(
                MigrationProposal(
                    source=source.endpoint_id,
                    target=target.endpoint_id,
                    request=request,
                    trigger=Trigger.DRAIN,
                    gap_before=math.inf,
                    gap_after=math.inf,
                )
            )

    by_load = sorted(targets, key=lambda i: (-load(i.endpoint_id), i.endpoint_id))
    half = len(by_load) // 2
    sources = by_load[:half]
    receivers = sorted(by_load[half:], key=lambda i: (load(i.endpoint_id), i.endpoint_id))
    for source, target in zip(sources, receivers, strict=False):
        s_id, t_id = source.endpoint_id, target.endpoint_id
        moved = 0
        for request in sorted(source.running, key=lambda r: (r.kv_blocks, r.request_id)):
            if moved >= settings.max_per_pair:
                break
            gap = load(s_id) - load(t_id)
            if gap <= settings.min_gap:
                break
            blocks = request.kv_blocks
            after_source = (used[s_id] - blocks) / capacity[s_id]
            after_target = (used[t_id] + blocks) / capacity[t_id]
            gap_after = after_source - after_target
            if abs(gap_after) >= gap or after_target > settings.migrate_out_threshold:
                continue
            used[s_id] -= blocks
            used[t_id] += blocks
            moved += 1
            proposals.append(
                MigrationProposal(
                    source=s_id,
                    target=t_id,
                    request=request,
                    trigger=Trigger.IMBALANCE,
                    gap_before=gap,
                    gap_after=gap_after,
                )
            )
    return proposals


# -- orders to routers (recompute path) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    migration_id: str
    lease_id: str
    request_id: str
    source: Endpoint
    target: Endpoint
    trigger: Trigger
    deadline_s: float


@dataclass(frozen=True, slots=True)
class MigrationReport:
    migration_id: str
    lease_id: str
    committed: bool
    reason: str = ""
    produced_tokens: int = 0
    pause_s: float = 0.0


# A router that does not hold the lease answers with this reason; only when every watcher
# said so is the order settled as not held (several routers may watch one scheduler).
NOT_HELD_REASON = "not held by this router"
# The stream ended (or is ending) before the router could move it.
STREAM_FINISHING_REASON = "stream finish"


@dataclass(slots=True)
class _Pending:
    order: MigrationOrder
    future: asyncio.Future[MigrationReport]
    watchers: int
    not_held: int = 0


class MigrationOrders:
    """Fan-out of orders to every watching router, and the futures their reports resolve."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[MigrationOrder]] = []
        self._pending: dict[str, _Pending] = {}
        self._watchers_changed = asyncio.Condition()

    @property
    def watchers(self) -> int:
        return len(self._queues)

    async def watch(self) -> AsyncIterator[MigrationOrder]:
        """Orders from now on, until the caller stops iterating."""
        queue: asyncio.Queue[MigrationOrder] = asyncio.Queue()
        self._queues.append(queue)
        async with self._watchers_changed:
            self._watchers_changed.notify_all()
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    async def wait_for_watchers(self, count: int) -> None:
        """Return once at least `count` watchers subscribed (a router connects, a test)."""
        async with self._watchers_changed:
            await self._watchers_changed.wait_for(lambda: len(self._queues) >= count)

    def issue(self, order: MigrationOrder) -> asyncio.Future[MigrationReport]:
        future: asyncio.Future[MigrationReport] = asyncio.get_running_loop().create_future()
        self._pending[order.migration_id] = _Pending(
            order=order, future=future, watchers=len(self._queues)
        )
        for queue in self._queues:
            queue.put_nowait(order)
        return future

    def withdraw(self, migration_id: str) -> None:
        self._pending.pop(migration_id, None)

    def report(self, report: MigrationReport) -> bool:
        """Settle an order; False when its id is unknown (reported already, or expired)."""
        pending = self._pending.get(report.migration_id)
        if pending is None or pending.order.lease_id != report.lease_id:
            return False
        if not report.committed and report.reason == NOT_HELD_REASON:
            pending.not_held += 1
            if pending.not_held < pending.watchers:
                return True
        del self._pending[report.migration_id]
        if not pending.future.done():
            pending.future.set_result(report)
        return True


def move_running_lease(
    core: SchedulerCore, lease_id: str, *, target: str, produced_tokens: int, now: float
) -> str | None:
    """Re-open a lease on `target` under the same id (the router's Complete still finds it);
    the target recomputes the prompt and what was produced. Returns the source, or None."""
    lease = core.leases.get(lease_id)
    if lease is None or target not in core.endpoints:
        return None
    core.leases.close(lease_id, now=now)
    tokens = lease.prompt_tokens + produced_tokens
    core.leases.open(
        endpoint_id=target,
        request_id=lease.request_id,
        now=now,
        prompt_tokens=tokens,
        uncached_tokens=tokens,
        predicted_ttft_s=0.0,
        lease_id=lease_id,
    )
    return lease.endpoint_id


# -- execution ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigratorSettings:
    policy: PolicySettings = PolicySettings()
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
        moved_from = move_running_lease(
            core,
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
