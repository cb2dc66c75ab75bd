"""Planning moves of queued requests: DualMap's hotspot rebalancing and scale-in drain.

Both plan without changing anything (`MovePlanner`); the caller withdraws each request it can
(an admission hold, the simulator's engine queue, a router) and then applies the move with
`SchedulerCore.move`, which re-opens the lease on the target under the same id. A request the
engine admitted meanwhile stays where it is.

**Hotspot rebalancing** (`rebalance`). Only for policies that ask for it
(`Policy.rebalances_hotspots`) with the core's `rebalance` switch on. An endpoint is a hotspot
when the time to clear its pending prefill exceeds the SLO. For each request still queued there
(no first token, not believed prefilled) whose decision named another candidate j: benefit
B = TTFT(r, here) - TTFT(r, j), with TTFT(r, here) as if it waited for the whole queue ahead
of it. Moves go in descending B, only when B > 0 and TTFT(r, j) (with the moves already planned
onto j) is within the request's SLO, until the hotspot's queue fits the SLO. One batch, not
recursive: a request moves at most once per round and a target is never made a hotspot.
Cost: O(queued leases on hotspots x log) per round; nothing when no endpoint is hot.

**Drain** (`drain`). A draining endpoint takes no new picks; its queued requests (oldest
first) go to the other candidate their decision named, which keeps the prefix on its pair of
the dual ring (removing an endpoint leaves the other member of each of its pairs in the new
pair). When that candidate is not routable either (several endpoints leave at once), a fresh
pick of the policy over the endpoints still routable chooses. Running requests are not moved
here: they finish within the drain deadline, or live migration moves them. Cost: O(queued
leases on the endpoint), plus one policy pick per orphaned request.

`movable(lease_id)` False keeps a lease out of the moves (the live scheduler can move only
requests whose answer it still holds); it still counts in the queue ahead.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.leases import Lease, LeaseTable
from twinroute.scheduler.policies.base import Policy
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    PrefixIndexView,
    RoutingRequest,
)


@dataclass(frozen=True, slots=True)
class RebalanceMove:
    """A queued request moved off a hotspot to its other candidate (same lease id)."""

    lease_id: str
    request_id: str
    source: str
    target: str
    benefit_s: float


@dataclass(frozen=True, slots=True)
class DrainMove:
    """A request still queued on a draining endpoint and where it goes instead (same lease).

    `other_candidate` is True when the target is the other candidate its decision named (the
    prefix's cache stays with its pair); False when that one is gone too and a fresh pick over
    the endpoints still routable chose the target.
    """

    lease_id: str
    request_id: str
    source: str
    target: str
    other_candidate: bool


class PlannedState(Protocol):
    """What planning reads of the core (`SchedulerCore` is the one implementation)."""

    @property
    def rebalance_enabled(self) -> bool: ...

    @property
    def policy(self) -> Policy: ...

    def cost_model_for(self, endpoint_id: str) -> CostModel: ...

    @property
    def prefix_index(self) -> PrefixIndexView: ...

    @property
    def cache_lookup(self) -> PrefixIndexView: ...

    @property
    def leases(self) -> LeaseTable: ...

    @property
    def draining(self) -> set[str]: ...

    def routable(self) -> tuple[Endpoint, ...]: ...

    def is_routable(self, endpoint_id: str) -> bool: ...

    def load(self, endpoint_id: str, *, now: float) -> LoadSnapshot: ...

    def view(self, *, now: float) -> ClusterView: ...

    def open_request(self, lease_id: str) -> tuple[RoutingRequest, Decision] | None: ...


class MovePlanner:
    """Plans moves over one core's state (module docstring); changes nothing."""

    def __init__(self, core: PlannedState) -> None:
        self._core = core

    def rebalance(
        self, *, now: float, movable: Callable[[str], bool] | None = None
    ) -> list[RebalanceMove]:
        """One round of hotspot rebalancing, planned."""
        core = self._core
        if (
            not core.rebalance_enabled
            or not core.policy.rebalances_hotspots
            or len(core.routable()) < 2
        ):
            return []
        default_slo = core.policy.config.ttft_slo_s
        added: collections.Counter[str] = collections.Counter()
        moves: list[RebalanceMove] = []
        for endpoint in core.routable():
            moves += self._off_hotspot(
                endpoint.id, added=added, default_slo=default_slo, now=now, movable=movable
            )
        return moves

    def _off_hotspot(
        self,
        source: str,
        *,
        added: collections.Counter[str],
        default_slo: float,
        now: float,
        movable: Callable[[str], bool] | None,
    ) -> list[RebalanceMove]:
        """The moves off one endpoint, if it is a hotspot; `added` counts the uncached tokens
        already planned onto each target (updated here)."""
        core = self._core
        cost = core.cost_model_for(source)
        load = core.load(source, now=now)
        queue_s = cost.queue_time_s(load)
        if queue_s <= default_slo:
            return []
        options: list[tuple[float, Lease, str, int]] = []
        ahead = 0.0
        for lease in core.leases.queued_on(source, now=now):
            ahead += lease.remaining_prefill
            entry = core.open_request(lease.lease_id)
            if entry is None or (movable is not None and not movable(lease.lease_id)):
                continue
            request, decision = entry
            target = self.other_candidate(request, decision, source)
            if target is None:
                continue
            # Its own wait: the prefill queued up to and including it (FIFO).
            here_s = cost.queue_time_s(
                dataclasses.replace(load, pending_prefill_tokens=round(ahead))
            )
            there_s, uncached_there = self.ttft_on(request, target, added=added[target], now=now)
            benefit = here_s - there_s
            slo = default_slo if request.ttft_slo_s is None else request.ttft_slo_s
            if benefit > 0 and there_s <= slo:
                options.append((benefit, lease, target, uncached_there))
        options.sort(key=lambda option: -option[0])
        pending = load.pending_prefill_tokens
        moves: list[RebalanceMove] = []
        for benefit, lease, target, uncached_there in options:
            if queue_s <= default_slo:
                break
            entry = core.open_request(lease.lease_id)
            assert entry is not None
            request = entry[0]
            slo = default_slo if request.ttft_slo_s is None else request.ttft_slo_s
            there_s, _ = self.ttft_on(request, target, added=added[target], now=now)
            if there_s > slo:
                continue
            pending -= round(lease.remaining_prefill)
            added[target] += uncached_there
            queue_s = cost.queue_time_s(dataclasses.replace(load, pending_prefill_tokens=pending))
            moves.append(
                RebalanceMove(
                    lease_id=lease.lease_id,
                    request_id=lease.request_id,
                    source=source,
                    target=target,
                    benefit_s=benefit,
                )
            )
        return moves

    def drain(
        self, endpoint_id: str, *, now: float, movable: Callable[[str], bool] | None = None
    ) -> list[DrainMove]:
        """Where each request still queued on a draining endpoint goes; nothing when the
        endpoint is not draining."""
        core = self._core
        if endpoint_id not in core.draining or not core.routable():
            return []
        moves: list[DrainMove] = []
        for lease in core.leases.queued_on(endpoint_id, now=now):
            entry = core.open_request(lease.lease_id)
            if entry is None or (movable is not None and not movable(lease.lease_id)):
                continue
            request, decision = entry
            target = self.other_candidate(request, decision, endpoint_id)
            other = target is not None
            if target is None:
                try:
                    target = core.policy.pick(request, core.view(now=now)).endpoint_id
                except NoEndpointError:
                    continue
                if not core.is_routable(target) or target in request.exclude:
                    continue
            moves.append(
                DrainMove(
                    lease_id=lease.lease_id,
                    request_id=lease.request_id,
                    source=endpoint_id,
                    target=target,
                    other_candidate=other,
                )
            )
        return moves

    def other_candidate(
        self, request: RoutingRequest, decision: Decision, source: str
    ) -> str | None:
        """The first candidate the decision named, other than `source`, still routable and
        not excluded for the request: where a queued request moves (hotspot or drain)."""
        core = self._core
        return next(
            (
                c.endpoint_id
                for c in decision.candidates
                if c.endpoint_id != source
                and core.is_routable(c.endpoint_id)
                and c.endpoint_id not in request.exclude
            ),
            None,
        )

    def ttft_on(
        self, request: RoutingRequest, endpoint_id: str, *, added: int, now: float
    ) -> tuple[float, int]:
        """(predicted TTFT, uncached tokens) of `request` on an endpoint carrying `added` more."""
        core = self._core
        matched = core.cache_lookup.matched_blocks(endpoint_id, request.keys)
        cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
        load = core.load(endpoint_id, now=now)
        if added:
            load = dataclasses.replace(
                load, pending_prefill_tokens=load.pending_prefill_tokens + added
            )
        uncached = request.prompt_tokens - cached
        ttft = core.cost_model_for(endpoint_id).estimate_ttft_s(
            uncached_tokens=uncached, cached_tokens=cached, load=load
        )
        return ttft, uncached
