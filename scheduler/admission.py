"""Admission hold: DualMap's hotspot rebalancing in the live scheduler.

A request routed to an instance whose backlog it cannot clear within the SLO is a hotspot's
request: once the router has sent it, it sits in the engine's waiting queue and nothing can
move it. The live scheduler therefore may hold the Pick answer of such a request in a
per-instance admission queue (its lease is open on the instance, so every later pick sees the
load) and, every `round_interval_s`:

1. **Rebalance.** One round of `MovePlanner.rebalance` (`scheduler/moves.py`) over the held
   requests only (the others are already on the wire): a held request moves to its other
   candidate when that one now meets the SLO, by descending benefit, non-recursively; the moved
   request is answered with the other candidate (reason REBALANCED, same lease id).
2. **Release** (FIFO per instance). The oldest held request of an instance is answered with its
   instance once its backlog falls within the SLO; the backlog is the prefill of the leases
   queued ahead of it there (the scheduler's fluid estimate), raised to the engine's scraped
   waiting count when that is fresh and larger.
3. **Deadline.** No request is held past `max_hold_s`, nor closer than `deadline_margin_s` to
   the caller's RPC deadline: it is then answered with its instance as picked, so a hold never
   turns into a lost request. A caller that goes away while held (cancelled RPC) has its lease
   closed as cancelled.

Only requests of policies that rebalance (`Policy.rebalances_hotspots`, with the core's
`rebalance` switch on) are held, and never prefill/decode placements. At most `max_held` are
held at once; beyond that, answers go out at once (counted).

Cost: a round is O(held + queued leases on hot instances); no work while nothing is held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twinroute.scheduler.api import PickAnswer
from twinroute.scheduler.core import SchedulerCore

from twinroute.vocabulary import DecisionReason

logger = logging.getLogger(__name__)

RELEASE_REASONS = ("backlog", "deadline", "cancelled", "shutdown", "gone")
_HOLD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """How long and how many requests the scheduler may hold, and how often it looks."""

    max_hold_s: float = 3.0
    deadline_margin_s: float = 0.25
    round_interval_s: float = 0.02
    max_held: int = 4096

    def __post_init__(self) -> None:
        if self.max_hold_s <= 0 or self.deadline_margin_s < 0 or self.round_interval_s <= 0:
            raise ValueError(f"admission settings must be positive: {self}")
        if self.max_held < 1:
            raise ValueError(f"max_held must be >= 1, got {self.max_held}")


class AdmissionMetrics:
    """Prometheus metrics of the admission hold, on the scheduler's registry."""

    def __init__(self, *, registry: CollectorRegistry, namespace: str = "twinroute") -> None:
        self.held = Gauge(
            f"{namespace}_admission_held",
            "Pick answers held now in the per-endpoint admission queues.",
            registry=registry,
        )
        self.hold_seconds = Histogram(
            f"{namespace}_admission_hold_seconds",
            "How long a held Pick answer waited, by how it left (moved, backlog, deadline, "
            "cancelled, shutdown, gone).",
            ["outcome"],
            buckets=_HOLD_BUCKETS,
            registry=registry,
        )
        self.moves = Counter(
            f"{namespace}_admission_moves",
            "Held requests answered with another endpoint, by reason (rebalance: the hotspot "
            "round moved it to its other candidate; drain: its endpoint is leaving).",
            ["reason"],
            registry=registry,
        )
        self.not_held = Counter(
            f"{namespace}_admission_not_held",
            "Hotspot requests answered at once, by why (full: max_held reached; deadline: no "
            "time left before the caller's deadline).",
            ["why"],
            registry=registry,
        )


@dataclass(slots=True)
class _Held:
    answer: PickAnswer
    slo_s: float
    since: float
    release_by: float
    future: asyncio.Future[PickAnswer]


class AdmissionQueue:
    """Per-endpoint FIFO of held Pick answers over one `SchedulerCore` (module docstring)."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        settings: AdmissionSettings = AdmissionSettings(),
        clock: Callable[[], float],
        metrics: AdmissionMetrics | None = None,
        run_rounds: bool = True,
    ) -> None:
        self.core = core
        self.settings = settings
        self._clock = clock
        self._metrics = metrics
        # False: no background task; the owner calls `run_round` (tests, on an injected clock).
        self._run_rounds = run_rounds
        self._queues: dict[str, collections.deque[_Held]] = {}
        self._by_lease: dict[str, _Held] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.moved_total = 0
        self.held_total = 0
        # How held requests left, and their total hold time (logged at shutdown).
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.held_seconds_total = 0.0

    def __len__(self) -> int:
        return len(self._by_lease)

    def held_on(self, endpoint_id: str) -> list[str]:
        """Lease ids held for an endpoint, oldest first."""
        return [held.answer.lease_id for held in self._queues.get(endpoint_id, ())]

    # -- admission --------------------------------------------------------------------------

    def backlog_s(self, endpoint_id: str, *, lease_id: str, now: float) -> float:
        """Seconds of prefill queued on the endpoint ahead of `lease_id` (module docstring)."""
        core = self.core
        load = core.load(endpoint_id, now=now)
        ahead_tokens = 0.0
        ahead = 0
        for lease in core.leases.queued_on(endpoint_id, now=now):
            if lease.lease_id == lease_id:
                break
            ahead_tokens += lease.remaining_prefill
            ahead += 1
        if load.queued is not None and load.queued > ahead:
            # The engine waits on more than the leases say (other routers, a stale estimate).
            own = core.leases.get(lease_id)
            per_request = ahead_tokens / ahead if ahead else (own.uncached_tokens if own else 0)
            ahead_tokens += (load.queued - ahead) * per_request
        return core.cost_model_for(endpoint_id).queue_time_s(
            dataclasses.replace(load, pending_prefill_tokens=round(ahead_tokens))
        )

    def _may_hold(self, answer: PickAnswer) -> bool:
        core = self.core
        return (
            answer.prefill_endpoint is None
            and core.rebalance_enabled
            and core.policy.rebalances_hotspots
            and len(core.routable()) > 1
        )

    async def admit(
        self, answer: PickAnswer, *, slo_s: float, deadline: float | None = None
    ) -> PickAnswer:
        """The answer to send: at once when its endpoint can serve it within `slo_s`,
        else after a hold (released, or moved to the other candidate). `deadline`: the
        caller's RPC deadline on this queue's clock."""
        if not self._may_hold(answer):
            return answer
        now = self._clock()
        endpoint_id = answer.endpoint.id
        if self.backlog_s(endpoint_id, lease_id=answer.lease_id, now=now) <= slo_s:
            return answer
        release_by = now + self.settings.max_hold_s
        if deadline is not None:
            release_by = min(release_by, deadline - self.settings.deadline_margin_s)
        if release_by <= now:
            self._count_not_held("deadline")
            return answer
        if len(self._by_lease) >= self.settings.max_held:
            self._count_not_held("full")
            return answer
        future: asyncio.Future[PickAnswer] = asyncio.get_running_loop().create_future()
        held = _Held(answer=answer, slo_s=slo_s, since=now, release_by=release_by, future=future)
        self._queues.setdefault(endpoint_id, collections.deque()).append(held)
        self._by_lease[answer.lease_id] = held
        self.held_total += 1
        self._set_gauge()
        self._ensure_task()
        try:
            return await future
        except asyncio.CancelledError:
            if self._by_lease.get(answer.lease_id) is held:
                # The caller left while held: its request will never run, so close the lease.
                self._drop(held)
                self.core.complete(answer.lease_id, now=self._clock(), success=False)
                self._observe(held, "cancelled", now=self._clock())
            raise

    def _count_not_held(self, why: str) -> None:
        if self._metrics is not None:
            self._metrics.not_held.labels(why).inc()

    # -- rounds -----------------------------------------------------------------------------

    def run_round(self, *, now: float | None = None) -> None:
        """One rebalancing round over the held requests, then releases (module docstring)."""
        if not self._by_lease:
            return
        now = self._clock() if now is None else now
        core = self.core
        for entry in list(self._by_lease.values()):
            if core.leases.get(entry.answer.lease_id) is None:
                # Expired or its endpoint left: answer as picked, the router retries elsewhere.
                self._release(entry, "gone", now=now)
        moves = core.moves.rebalance(now=now, movable=self._by_lease.__contains__)
        for move in moves:
            held = self._by_lease.get(move.lease_id)
            if held is None or not core.move(move.lease_id, target=move.target, now=now):
                continue
            lease = core.leases.get(move.lease_id)
            decision = core.open_decision(move.lease_id)
            scores = decision.candidates if decision is not None else ()
            answer = dataclasses.replace(
                held.answer,
                endpoint=core.endpoints[move.target],
                reason=DecisionReason.REBALANCED,
                predicted_ttft_s=lease.predicted_ttft_s if lease is not None else 0.0,
                expected_cached_blocks=next(
                    (c.expected_cached_blocks for c in scores if c.endpoint_id == move.target),
                    0,
                ),
            )
            self.moved_total += 1
            if self._metrics is not None:
                self._metrics.moves.labels("rebalance").inc()
            self._release(held, "moved", now=now, answer=answer)
        for endpoint_id, queue in list(self._queues.items()):
            for held in [h for h in queue if now >= h.release_by]:
                self._release(held, "deadline", now=now)
            while queue:
                head = queue[0]
                if self.backlog_s(endpoint_id, lease_id=head.answer.lease_id, now=now) > (
                    head.slo_s
                ):
                    break
                self._release(head, "backlog", now=now)
        self._set_gauge()

    def holds(self, lease_id: str) -> bool:
        """Whether the answer of this lease is held here (not yet sent to the router)."""
        return lease_id in self._by_lease

    def answer_moved(self, lease_id: str, *, now: float, reason: str = "drain") -> bool:
        """Answer a held request with the endpoint the core has just moved its lease to (a
        drain moved it off a leaving endpoint); False when it is not held or not open."""
        held = self._by_lease.get(lease_id)
        lease = self.core.leases.get(lease_id)
        if held is None or lease is None or lease.endpoint_id not in self.core.endpoints:
            return False
        decision = self.core.open_decision(lease_id)
        scores = decision.candidates if decision is not None else ()
        answer = dataclasses.replace(
            held.answer,
            endpoint=self.core.endpoints[lease.endpoint_id],
            reason=decision.reason if decision is not None else DecisionReason.DRAINED,
            predicted_ttft_s=lease.predicted_ttft_s,
            expected_cached_blocks=next(
                (c.expected_cached_blocks for c in scores if c.endpoint_id == lease.endpoint_id),
                0,
            ),
        )
        self.moved_total += 1
        if self._metrics is not None:
            self._metrics.moves.labels(reason).inc()
        self._release(held, "moved", now=now, answer=answer)
        return True

    def release_all(self, *, reason: str = "shutdown") -> int:
        """Answer every held request with its endpoint as picked (graceful stop)."""
        now = self._clock()
        held = list(self._by_lease.values())
        for entry in held:
            self._release(entry, reason, now=now)
        self._set_gauge()
        if reason == "shutdown":
            logger.info(
                "admission hold: %d requests held, %.1f s held in all, left by %s",
                self.held_total, self.held_seconds_total, dict(self.outcomes),
            )  # fmt: skip
        return len(held)

    def next_release_at(self) -> float:
        """The earliest deadline of a held request (inf when none)."""
        return min((held.release_by for held in self._by_lease.values()), default=math.inf)

    def _release(
        self, held: _Held, outcome: str, *, now: float, answer: PickAnswer | None = None
    ) -> None:
        self._drop(held)
        if not held.future.done():
            held.future.set_result(held.answer if answer is None else answer)
        self._observe(held, outcome, now=now)

    def _drop(self, held: _Held) -> None:
        self._by_lease.pop(held.answer.lease_id, None)
        queue = self._queues.get(held.answer.endpoint.id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(held)
            if not queue:
                del self._queues[held.answer.endpoint.id]
        self._set_gauge()

    def _observe(self, held: _Held, outcome: str, *, now: float) -> None:
        seconds = max(0.0, now - held.since)
        self.outcomes[outcome] += 1
        self.held_seconds_total += seconds
        if self._metrics is not None:
            self._metrics.hold_seconds.labels(outcome).observe(seconds)

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.held.set(len(self._by_lease))

    # -- background rounds ------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if not self._run_rounds:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._rounds(), name="admission-rounds"
            )
        self._wake.set()

    async def _rounds(self) -> None:
        """Run rounds every `round_interval_s` while anything is held; sleep otherwise."""
        while True:
            if not self._by_lease:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.settings.round_interval_s)
            try:
                self.run_round()
            except Exception:  # a bug here must not strand held requests
                logger.exception("admission round failed; releasing every held request")
                self.release_all(reason="deadline")

    async def close(self) -> None:
        self.release_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
