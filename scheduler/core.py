"""The scheduler's core: one object that the live gRPC scheduler and the cluster simulator both
drive, so a policy behaves the same in both.

It owns the endpoint set (with draining and unhealthy endpoints held out of routing), the
prefix index, the lease table and the last scrape of each endpoint; per decision it builds one
immutable `ClusterView`, asks the policy, and records the outcome (a lease, the prompt's blocks
on the chosen endpoint, a bounded decision history for Explain, counters for telemetry).

Time is always passed in (`now`), never read: the simulator runs it on simulated time and tests
never sleep.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from twinroute.scheduler.costmodel import CostModel, OutputLengthEstimator
from twinroute.scheduler.leases import Lease, LeaseTable
from twinroute.scheduler.policies.base import Policy
from twinroute.scheduler.policies.pd import PdMode, PdPlacer, PdSettings
from twinroute.scheduler.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    DecisionReason,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    Role,
    RoutingRequest,
)

MoveCause = Literal["rebalance", "drain"]


@dataclass(frozen=True, slots=True)
class PickResult:
    lease_id: str
    decision: Decision
    endpoint: Endpoint
    prefill_endpoint: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One past decision, as Explain reports it."""

    request_id: str
    lease_id: str
    decided_at: float
    prompt_blocks: int
    prompt_tokens: int
    decision: Decision


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


@dataclass(frozen=True, slots=True)
class MembershipChange:
    added: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True, slots=True)
class _Scrape:
    running: int | None
    queued: int | None
    kv_usage: float | None
    at: float


class _Loads(Mapping[str, LoadSnapshot]):
    """Per-endpoint load computed on first access: most policies read two endpoints, not all."""

    def __init__(self, core: SchedulerCore, ids: tuple[str, ...], now: float) -> None:
        self._core = core
        self._ids = ids
        self._now = now
        self._cache: dict[str, LoadSnapshot] = {}

    def __getitem__(self, endpoint_id: str) -> LoadSnapshot:
        load = self._cache.get(endpoint_id)
        if load is None:
            if endpoint_id not in self._core.endpoints:
                raise KeyError(endpoint_id)
            load = self._cache[endpoint_id] = self._core.load(endpoint_id, now=self._now)
        return load

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class SchedulerCore:
    def __init__(
        self,
        *,
        policy: Policy,
        cost_model: CostModel,
        prefix_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        lease_ttl_s: float = 600.0,
        scrape_staleness_s: float = 5.0,
        history_size: int = 1024,
        lease_id_prefix: str = "",
        rebalance: bool = True,
        pd: PdSettings | None = None,
    ) -> None:
        self.policy = policy
        # Prefill/decode placement, used when the endpoint set has prefill or decode roles.
        self.pd = PdPlacer(prefill_policy=policy, settings=pd)
        self.pd_picks: collections.Counter[PdMode] = collections.Counter()
        # Disaggregated picks: the decode lease's id -> its prefill lease (closed when the
        # prefill is reported done, at the first token, or with the decode lease).
        self._pd_prefill_leases: dict[str, str] = {}
        # ... and the tokens the decode instance prefills itself if the prefill hop falls back.
        self._pd_fallback_tokens: dict[str, int] = {}
        self._pd_roles_of: dict[str, Endpoint] | None = None
        self._pd_pool_cached = False
        self._pd_split_of: tuple[Endpoint, ...] | None = None
        self._pd_prefill: tuple[Endpoint, ...] = ()
        self._pd_decode: tuple[Endpoint, ...] = ()
        # Hotspot rebalancing for policies that opt in (`Policy.rebalances_hotspots`); False
        # runs them without it (`twinroute simulate --rebalance off`).
        self.rebalance_enabled = rebalance
        # Expected output of requests that bring none, per prefix group (phase-aware placement).
        self.output_lengths = OutputLengthEstimator()
        self.cost_model = cost_model
        self.prefix_index = PrefixIndex(capacity_blocks=prefix_capacity_blocks)
        self.leases = LeaseTable(
            cost_model=cost_model, ttl_s=lease_ttl_s, id_prefix=lease_id_prefix
        )
        self.scrape_staleness_s = scrape_staleness_s
        self.endpoints: dict[str, Endpoint] = {}
        self.draining: set[str] = set()
        self.unhealthy: set[str] = set()
        self._scrapes: dict[str, _Scrape] = {}
        self._history: collections.deque[DecisionRecord] = collections.deque(maxlen=history_size)
        self._routable: tuple[Endpoint, ...] = ()
        self._routable_ids: frozenset[str] = frozenset()
        # Telemetry, read by the service's metrics and by the simulator's report.
        self.decisions: collections.Counter[DecisionReason] = collections.Counter()
        self.membership_changes = 0
        self.picks_failed = 0
        self.rebalance_moves = 0
        self.drain_moves = 0
        # The request and decision behind each open lease (what rebalancing needs to move it).
        self._open: dict[str, tuple[RoutingRequest, Decision]] = {}

    # -- membership -------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint], *, now: float = 0.0) -> MembershipChange:
        """Make the endpoint set equal to `endpoints` (discovery's latest snapshot)."""
        wanted = {endpoint.id: endpoint for endpoint in endpoints}
        added = frozenset(wanted) - frozenset(self.endpoints)
        removed = frozenset(self.endpoints) - frozenset(wanted)
        for endpoint_id in removed:
            self._forget(endpoint_id, now=now)
        self.endpoints = wanted
        change = MembershipChange(added=added, removed=removed)
        if change:
            self.membership_changes += 1
        self._refresh_routable()
        return change

    def _forget(self, endpoint_id: str, *, now: float) -> None:
        self.prefix_index.remove_endpoint(endpoint_id)
        for lease in self.leases.forget_endpoint(endpoint_id, now=now):
            self._open.pop(lease.lease_id, None)
            self._close_prefill_lease(lease.lease_id, now=now)
        self._scrapes.pop(endpoint_id, None)
        self.draining.discard(endpoint_id)
        self.unhealthy.discard(endpoint_id)

    def drain(self, endpoint_id: str) -> bool:
        """Stop routing to an endpoint that is leaving; its leases run to completion."""
        if endpoint_id not in self.endpoints:
            return False
        self.draining.add(endpoint_id)
        self._refresh_routable()
        return True

    def undrain(self, endpoint_id: str) -> None:
        self.draining.discard(endpoint_id)
        self._refresh_routable()

    def set_health(self, endpoint_id: str, *, healthy: bool) -> None:
        """Failing endpoints leave routing until they recover."""
        if healthy:
            self.unhealthy.discard(endpoint_id)
        elif endpoint_id in self.endpoints:
            self.unhealthy.add(endpoint_id)
        self._refresh_routable()

    def _refresh_routable(self) -> None:
        held_out = self.draining | self.unhealthy
        self._routable = tuple(
            endpoint
            for endpoint_id, endpoint in sorted(self.endpoints.items())
            if endpoint_id not in held_out
        )
        self._routable_ids = frozenset(endpoint.id for endpoint in self._routable)

    def routable(self) -> tuple[Endpoint, ...]:
        return self._routable

    def in_flight(self, endpoint_id: str) -> int:
        return len(self.leases.leases_on(endpoint_id))

    # -- load -------------------------------------------------------------------------------

    def update_scrape(
        self,
        endpoint_id: str,
        *,
        running: int | None,
        queued: int | None,
        kv_usage: float | None,
        now: float,
    ) -> None:
        if endpoint_id in self.endpoints:
            self._scrapes[endpoint_id] = _Scrape(running, queued, kv_usage, now)

    def load(self, endpoint_id: str, *, now: float) -> LoadSnapshot:
        own = self.leases.load(endpoint_id, now=now)
        scrape = self._scrapes.get(endpoint_id)
        if scrape is None or now - scrape.at > self.scrape_staleness_s:
            return own
        return LoadSnapshot(
            in_flight=own.in_flight,
            pending_prefill_tokens=own.pending_prefill_tokens,
            decoding=own.decoding,
            decoding_tokens=own.decoding_tokens,
            running=scrape.running,
            queued=scrape.queued,
            kv_usage=scrape.kv_usage,
            scrape_age_s=now - scrape.at,
        )

    def view(self, *, now: float) -> ClusterView:
        routable = self._routable
        ids = tuple(endpoint.id for endpoint in routable)
        return ClusterView(
            endpoints=routable,
            loads=_Loads(self, ids, now),
            prefix_index=self.prefix_index,
            now=now,
        )

    # -- decisions --------------------------------------------------------------------------

    def pick(self, request: RoutingRequest, *, now: float) -> PickResult:
        """Choose an endpoint, open a lease on it and record the prompt there."""
        if request.expected_output_tokens <= 0 and self.policy.config.phase_aware:
            request = dataclasses.replace(
                request,
                expected_output_tokens=self.output_lengths.estimate(_output_group(request)),
            )
        if self.is_pd_pool():
            return self._pick_pd(request, now=now)
        try:
            decision = self.policy.pick(request, self.view(now=now))
        except NoEndpointError:
            self.picks_failed += 1
            raise
        endpoint = self.endpoints.get(decision.endpoint_id)
        if (
            endpoint is None
            or endpoint.id not in self._routable_ids
            or endpoint.id in request.exclude
        ):
            self.picks_failed += 1
            raise NoEndpointError(
                f"policy {decision.policy!r} chose {decision.endpoint_id!r}, which is not routable"
            )
        matched = self.prefix_index.matched_blocks(endpoint.id, request.keys)
        cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
        lease = self.leases.open(
            endpoint_id=endpoint.id,
            request_id=request.request_id,
            now=now,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=request.prompt_tokens - cached,
            predicted_ttft_s=decision.predicted_ttft_s,
        )
        self.prefix_index.record(endpoint.id, request.keys)
        self._open[lease.lease_id] = (request, decision)
        self.decisions[decision.reason] += 1
        self._history.append(
            DecisionRecord(
                request_id=request.request_id,
                lease_id=lease.lease_id,
                decided_at=now,
                prompt_blocks=request.keys.num_blocks,
                prompt_tokens=request.prompt_tokens,
                decision=decision,
            )
        )
        prefill = (
            self.endpoints.get(decision.prefill_endpoint_id)
            if decision.prefill_endpoint_id
            else None
        )
        return PickResult(
            lease_id=lease.lease_id, decision=decision, endpoint=endpoint, prefill_endpoint=prefill
        )

    def open_decision(self, lease_id: str) -> Decision | None:
        """The decision behind an open lease (after a move, the moved one)."""
        entry = self._open.get(lease_id)
        return entry[1] if entry is not None else None

    def first_token(self, lease_id: str, *, now: float) -> bool:
        # The decode instance's first token comes after the prefill instance finished.
        self.prefill_done(lease_id, now=now)
        return self.leases.first_token(lease_id, now=now)

    def complete(
        self,
        lease_id: str,
        *,
        now: float,
        success: bool = True,
        observed_ttft_s: float | None = None,
        output_tokens: int = 0,
    ) -> Lease | None:
        """Close a lease; returns it (for telemetry) or None when it was unknown or expired."""
        entry = self._open.pop(lease_id, None)
        if entry is not None and success and output_tokens > 0:
            self.output_lengths.observe(_output_group(entry[0]), output_tokens)
        # A failed request (e.g. its prefill endpoint failed and it is placed again) proves
        # nothing about the prefills queued before it there.
        self._close_prefill_lease(lease_id, now=now, done=success)
        return self.leases.close(lease_id, now=now)

    def expire(self, now: float) -> list[Lease]:
        expired = self.leases.expire(now=now)
        for lease in expired:
            self._open.pop(lease.lease_id, None)
            self._close_prefill_lease(lease.lease_id, now=now)
        return expired

    # -- prefill/decode disaggregation -------------------------------------------------------

    def is_pd_pool(self) -> bool:
        """True when any endpoint has the prefill or decode role: picks then place both
        (`scheduler/policies/pd.py`); unified pools never take this path."""
        if self._pd_roles_of is not self.endpoints:
            self._pd_roles_of = self.endpoints
            self._pd_pool_cached = any(
                endpoint.role in (Role.PREFILL, Role.DECODE) for endpoint in self.endpoints.values()
            )
        return self._pd_pool_cached

    def _pd_views(self, *, now: float) -> tuple[ClusterView, ClusterView]:
        """(prefill view, decode view) of the routable endpoints; the same tuples until the
        routable set changes, so the prefill policy's rings re-sync only then."""
        routable = self._routable
        if self._pd_split_of is not routable:
            self._pd_split_of = routable
            self._pd_prefill = tuple(e for e in routable if e.role == Role.PREFILL)
            self._pd_decode = tuple(e for e in routable if e.role != Role.PREFILL)
        views = []
        for endpoints in (self._pd_prefill, self._pd_decode):
            ids = tuple(e.id for e in endpoints)
            views.append(
                ClusterView(
                    endpoints=endpoints,
                    loads=_Loads(self, ids, now),
                    prefix_index=self.prefix_index,
                    now=now,
                )
            )
        return views[0], views[1]

    def _pick_pd(self, request: RoutingRequest, *, now: float) -> PickResult:
        """A disaggregated pick: one lease on the decode endpoint (its decode load; its
        prefill too when the prefill hop is skipped) and, when there is a prefill endpoint, a
        second lease there carrying the prompt's uncached tokens until the prefill is done.
        Neither is in `_open`: hotspot rebalancing and drain moves, which move a request to
        its other ring candidate, do not apply to a pair of instances. Nothing to withdraw
        either: the admission hold never holds a disaggregated answer, so its prefill is on
        the wire from Pick; on a draining prefill instance it finishes there, and the router's
        `prefill_done` (or `prefill_fell_back`) report closes its lease, which is what the
        drain waits for."""
        prefill_view, decode_view = self._pd_views(now=now)
        try:
            placement = self.pd.place(request, prefill_view=prefill_view, decode_view=decode_view)
        except NoEndpointError:
            self.picks_failed += 1
            raise
        decision = placement.decision
        decode = self.endpoints[decision.endpoint_id]
        prefill = (
            self.endpoints[decision.prefill_endpoint_id]
            if decision.prefill_endpoint_id is not None
            else None
        )
        lease = self.leases.open(
            endpoint_id=decode.id,
            request_id=request.request_id,
            now=now,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=placement.decode_uncached_tokens,
            predicted_ttft_s=decision.predicted_ttft_s,
        )
        # The decode instance holds the prompt's KV either way (transferred or computed).
        self.prefix_index.record(decode.id, request.keys)
        if prefill is not None:
            prefill_lease = self.leases.open(
                endpoint_id=prefill.id,
                request_id=request.request_id,
                now=now,
                prompt_tokens=request.prompt_tokens,
                uncached_tokens=placement.prefill_uncached_tokens,
                predicted_ttft_s=decision.predicted_ttft_s,
            )
            self._pd_prefill_leases[lease.lease_id] = prefill_lease.lease_id
            self._pd_fallback_tokens[lease.lease_id] = placement.fallback_uncached_tokens
            self.prefix_index.record(prefill.id, request.keys)
        self.decisions[decision.reason] += 1
        self.pd_picks[placement.mode] += 1
        self._history.append(
            DecisionRecord(
                request_id=request.request_id,
                lease_id=lease.lease_id,
                decided_at=now,
                prompt_blocks=request.keys.num_blocks,
                prompt_tokens=request.prompt_tokens,
                decision=decision,
            )
        )
        return PickResult(
            lease_id=lease.lease_id, decision=decision, endpoint=decode, prefill_endpoint=prefill
        )

    def prefill_done(self, lease_id: str, *, now: float) -> bool:
        """The prefill instance of a disaggregated pick finished (its KV is on the way): its
        prefill lease closes, settling the prefill queued before it there (FIFO). False when
        the pick had no prefill hop or it was already closed."""
        return self._close_prefill_lease(lease_id, now=now)

    def prefill_endpoint_of(self, lease_id: str) -> str | None:
        """The endpoint of a disaggregated pick's prefill lease while it is open."""
        prefill_lease_id = self._pd_prefill_leases.get(lease_id)
        prefill = self.leases.get(prefill_lease_id) if prefill_lease_id is not None else None
        return prefill.endpoint_id if prefill is not None else None

    def prefill_fell_back(self, lease_id: str, *, now: float) -> bool:
        """The prefill hop of a disaggregated pick failed and the decode instance got the
        request whole, so it prefills the prompt itself: the prefill lease closes without
        settling anything queued before it there (that instance did no work for it), and the
        decode lease (same id) carries the tokens the decode instance lacks, queued behind
        what it already has. False when the pick had no open prefill hop."""
        prefill_lease_id = self._pd_prefill_leases.pop(lease_id, None)
        fallback_tokens = self._pd_fallback_tokens.pop(lease_id, 0)
        if prefill_lease_id is None:
            return False
        self.leases.close(prefill_lease_id, now=now)
        decode = self.leases.get(lease_id)
        if decode is None or decode.first_token_at is not None or fallback_tokens <= 0:
            return True
        self.leases.close(lease_id, now=now)
        self.leases.open(
            endpoint_id=decode.endpoint_id,
            request_id=decode.request_id,
            now=decode.opened_at,
            prompt_tokens=decode.prompt_tokens,
            uncached_tokens=fallback_tokens,
            predicted_ttft_s=decode.predicted_ttft_s,
            lease_id=lease_id,
        )
        return True

    def _close_prefill_lease(self, lease_id: str, *, now: float, done: bool = True) -> bool:
        """Close a pick's prefill lease; `done` also settles what was queued before it there
        (FIFO), as a finished prefill implies."""
        prefill_lease_id = self._pd_prefill_leases.pop(lease_id, None)
        self._pd_fallback_tokens.pop(lease_id, None)
        if prefill_lease_id is None:
            return False
        if done:
            self.leases.first_token(prefill_lease_id, now=now)
        return self.leases.close(prefill_lease_id, now=now) is not None

    # -- hotspot rebalancing ------------------------------------------------------------------

    def plan_rebalance(
        self, *, now: float, movable: Callable[[str], bool] | None = None
    ) -> list[RebalanceMove]:
        """DualMap's hotspot rebalancing, planned without changing anything.

        Only for policies that ask for it (`Policy.rebalances_hotspots`). An endpoint is a
        hotspot when the time to clear its pending prefill exceeds the SLO. For each request
        still queued there (no first token, not believed prefilled) whose decision named
        another candidate j: benefit B = TTFT(r, here) - TTFT(r, j), with TTFT(r, here) as if
        it waited for the whole queue. Moves go in descending B, only when B > 0 and
        TTFT(r, j) (with the moves already planned onto j) is within the request's SLO, until
        the hotspot's queue fits the SLO. One batch, not recursive: a request moves at most
        once per round and a target is never made a hotspot.

        `movable(lease_id)` False keeps a lease out of the moves (the live scheduler can move
        only requests whose answer it still holds); it still counts in the queue ahead.

        Cost: O(queued leases on hotspots x log) per round; nothing when no endpoint is hot.
        """
        if (
            not self.rebalance_enabled
            or not self.policy.rebalances_hotspots
            or len(self._routable) < 2
        ):
            return []
        cost = self.cost_model
        default_slo = self.policy.config.ttft_slo_s
        added: collections.Counter[str] = collections.Counter()
        moves: list[RebalanceMove] = []
        for endpoint in self._routable:
            source = endpoint.id
            load = self.load(source, now=now)
            queue_s = cost.queue_time_s(load)
            if queue_s <= default_slo:
                continue
            options: list[tuple[float, Lease, str, int]] = []
            ahead = 0.0
            for lease in self.leases.queued_on(source, now=now):
                ahead += lease.remaining_prefill
                entry = self._open.get(lease.lease_id)
                if entry is None or (movable is not None and not movable(lease.lease_id)):
                    continue
                request, decision = entry
                target = self._other_candidate(request, decision, source)
                if target is None:
                    continue
                # Its own wait: the prefill queued up to and including it (FIFO).
                here_s = cost.queue_time_s(
                    dataclasses.replace(load, pending_prefill_tokens=round(ahead))
                )
                there_s, uncached_there = self._ttft_on(
                    request, target, added=added[target], now=now
                )
                benefit = here_s - there_s
                slo = default_slo if request.ttft_slo_s is None else request.ttft_slo_s
                if benefit > 0 and there_s <= slo:
                    options.append((benefit, lease, target, uncached_there))
            options.sort(key=lambda option: -option[0])
            pending = load.pending_prefill_tokens
            for benefit, lease, target, uncached_there in options:
                if queue_s <= default_slo:
                    break
                request, _decision = self._open[lease.lease_id]
                slo = default_slo if request.ttft_slo_s is None else request.ttft_slo_s
                there_s, _ = self._ttft_on(request, target, added=added[target], now=now)
                if there_s > slo:
                    continue
                pending -= round(lease.remaining_prefill)
                added[target] += uncached_there
                queue_s = cost.queue_time_s(
                    dataclasses.replace(load, pending_prefill_tokens=pending)
                )
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

    def _other_candidate(
        self, request: RoutingRequest, decision: Decision, source: str
    ) -> str | None:
        """The first candidate the decision named, other than `source`, still routable and
        not excluded for the request: where a queued request moves (hotspot or drain)."""
        return next(
            (
                c.endpoint_id
                for c in decision.candidates
                if c.endpoint_id != source
                and c.endpoint_id in self._routable_ids
                and c.endpoint_id not in request.exclude
            ),
            None,
        )

    def _ttft_on(
        self, request: RoutingRequest, endpoint_id: str, *, added: int, now: float
    ) -> tuple[float, int]:
        """(predicted TTFT, uncached tokens) of `request` on an endpoint carrying `added` more."""
        matched = self.prefix_index.matched_blocks(endpoint_id, request.keys)
        cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
        load = self.load(endpoint_id, now=now)
        if added:
            load = dataclasses.replace(
                load, pending_prefill_tokens=load.pending_prefill_tokens + added
            )
        uncached = request.prompt_tokens - cached
        ttft = self.cost_model.estimate_ttft_s(
            uncached_tokens=uncached, cached_tokens=cached, load=load
        )
        return ttft, uncached

    def move(
        self, lease_id: str, *, target: str, now: float, cause: MoveCause = "rebalance"
    ) -> bool:
        """Move a queued lease to `target` (its request was withdrawn and resubmitted there).

        The lease keeps its id, so the caller's first-token and completion reports still
        find it. False when the lease is unknown, already prefilled, or the target is not
        routable. `cause` says whether a hotspot or a drain moved it (detail and counter).
        """
        lease = self.leases.get(lease_id)
        entry = self._open.get(lease_id)
        if lease is None or entry is None or lease.prefilled or target not in self._routable_ids:
            return False
        request, decision = entry
        source = lease.endpoint_id
        self.leases.close(lease_id, now=now)
        ttft, uncached = self._ttft_on(request, target, added=0, now=now)
        self.leases.open(
            endpoint_id=target,
            request_id=request.request_id,
            now=now,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=uncached,
            predicted_ttft_s=ttft,
            lease_id=lease_id,
        )
        self.prefix_index.record(target, request.keys)
        moved = dataclasses.replace(
            decision,
            endpoint_id=target,
            reason=DecisionReason.REBALANCED,
            predicted_ttft_s=ttft,
            detail=(
                f"moved off draining {source} to {target}"
                if cause == "drain"
                else f"moved from hotspot {source} to its other candidate {target}"
            ),
        )
        self._open[lease_id] = (request, moved)
        self.decisions[DecisionReason.REBALANCED] += 1
        if cause == "drain":
            self.drain_moves += 1
        else:
            self.rebalance_moves += 1
        self._history.append(
            DecisionRecord(
                request_id=request.request_id,
                lease_id=lease_id,
                decided_at=now,
                prompt_blocks=request.keys.num_blocks,
                prompt_tokens=request.prompt_tokens,
                decision=moved,
            )
        )
        return True

    def rebalance(self, *, now: float) -> list[RebalanceMove]:
        """Plan and apply a round at once, for callers that can always withdraw a queued
        request; callers that may fail to withdraw use `plan_rebalance` and `move`."""
        moves = self.plan_rebalance(now=now)
        return [m for m in moves if self.move(m.lease_id, target=m.target, now=now)]

    # -- drain (scale-in) ----------------------------------------------------------------------

    def plan_drain_moves(
        self, endpoint_id: str, *, now: float, movable: Callable[[str], bool] | None = None
    ) -> list[DrainMove]:
        """Where each request still queued on a draining endpoint goes, planned without
        changing anything (the caller withdraws each request, then calls `move` with
        `cause="drain"`; a request the engine admitted meanwhile stays and finishes there).

        Scale-in: a draining endpoint takes no new picks (`drain`); its queued requests
        (leases not yet prefilled, oldest first) go to the other candidate their decision
        named, which keeps the prefix on its pair of the dual ring (removing an endpoint
        leaves the other member of each of its pairs in the new pair). When that candidate is
        not routable either (several endpoints leave at once), a fresh pick of the policy
        over the endpoints still routable chooses. Running requests are not moved here: they
        finish within the drain deadline, or a migration hook moves them
        (`running_leases`). Nothing when the endpoint is not draining. `movable(lease_id)`
        False leaves a lease out (the live scheduler can move only what it still holds).

        Cost: O(queued leases on the endpoint), plus one policy pick per orphaned request.
        """
        if endpoint_id not in self.draining or not self._routable:
            return []
        moves: list[DrainMove] = []
        for lease in self.leases.queued_on(endpoint_id, now=now):
            entry = self._open.get(lease.lease_id)
            if entry is None or (movable is not None and not movable(lease.lease_id)):
                continue
            request, decision = entry
            target = self._other_candidate(request, decision, endpoint_id)
            other = target is not None
            if target is None:
                try:
                    target = self.policy.pick(request, self.view(now=now)).endpoint_id
                except NoEndpointError:
                    continue
                if target not in self._routable_ids or target in request.exclude:
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

    def running_leases(self, endpoint_id: str) -> list[Lease]:
        """Leases past prefill on an endpoint: on a draining one, what must finish before the
        drain deadline, or what a live-migration hook may move (`scheduler/migration.py`)."""
        return [lease for lease in self.leases.leases_on(endpoint_id) if lease.prefilled]

    def recent_decisions(
        self, limit: int = 50, *, request_id: str | None = None
    ) -> list[DecisionRecord]:
        """The newest decisions first, optionally only those of one request."""
        records: list[DecisionRecord] = []
        for record in reversed(self._history):
            if request_id is not None and record.request_id != request_id:
                continue
            records.append(record)
            if len(records) >= limit:
                break
        return records

    @property
    def slo_switches(self) -> int:
        return self.decisions[DecisionReason.SLO_SWITCH]


def _output_group(request: RoutingRequest) -> int | None:
    """The prefix group whose output lengths predict this request's: its first key block."""
    keys = request.keys
    return int(keys.block_hashes[0]) if keys.num_blocks else None
