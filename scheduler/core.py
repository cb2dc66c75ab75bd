"""The scheduler's core: one object that the live gRPC scheduler and the cluster simulator both
drive, so a policy behaves the same in both.

It owns the endpoint set (with draining and unhealthy endpoints held out of routing), the
prefix index, the lease table and the last scrape of each endpoint; per decision it builds one
immutable `ClusterView`, asks the policy, and records the outcome (a lease, the prompt's blocks
on the chosen endpoint, the decision in its `DecisionHistory`). Three parts of its own live in
their own modules: `PrefillLeases` (the prefill half of disaggregated picks),
`MovePlanner` (hotspot rebalancing and drain, planned) and `DecisionHistory` (Explain and the
decisions metric). The core applies what they plan (`move`).

Time is always passed in (`now`), never read: the simulator runs it on simulated time and tests
never sleep. Where the core sits among the other parts: docs/design.md.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from twinroute.scheduler.cache_lookup import CacheLookup
from twinroute.scheduler.calibration import CostCalibration
from twinroute.scheduler.costmodel import CostModel, OutputLengthEstimator
from twinroute.scheduler.history import DecisionHistory
from twinroute.scheduler.kv_events import KvEventIndex, KvState
from twinroute.scheduler.leases import Lease, LeaseTable
from twinroute.scheduler.moves import MovePlanner, RebalanceMove
from twinroute.scheduler.peer_loads import PeerLoads, ReplicaMembership
from twinroute.scheduler.policies.base import Policy
from twinroute.scheduler.policies.pd import PdMode, PdPlacer, PdSettings
from twinroute.scheduler.prefill_leases import PrefillLeases
from twinroute.scheduler.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    PrefixIndexView,
    Role,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

# Why a queued lease moved: a hotspot, a draining endpoint, or a gateway that retried the
# request on the pick's fallback after the primary failed before answering.
MoveCause = Literal["rebalance", "drain", "fallback"]


@dataclass(frozen=True, slots=True)
class PickResult:
    lease_id: str
    decision: Decision
    endpoint: Endpoint
    prefill_endpoint: Endpoint | None = None


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
    """The endpoint set, the load placed on it and the decisions about it (module docstring)."""

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
        key_block_tokens: int = 16,
        cost_calibration: bool = True,
        kv_events: KvEventIndex | None = None,
    ) -> None:
        self.policy = policy
        # Tokens one prefix-index block stands for: converts an engine's KV size to blocks.
        self.key_block_tokens = key_block_tokens
        self.cost_model = cost_model
        self.prefix_index = PrefixIndex(capacity_blocks=prefix_capacity_blocks)
        # What every decision reads of the caches: the engines' own KV events where they are
        # followed and live, the approximate record (`prefix_index`) otherwise.
        self.kv_events = kv_events
        self.cache_lookup: PrefixIndexView = (
            CacheLookup(approximate=self.prefix_index, events=kv_events)
            if kv_events is not None
            else self.prefix_index
        )
        # Each endpoint's cost model fitted from its first tokens, `cost_model` the prior;
        # None: the profile predicts as it is.
        self.calibration = CostCalibration(prior=cost_model) if cost_calibration else None
        self.leases = LeaseTable(
            cost_model=cost_model,
            ttl_s=lease_ttl_s,
            id_prefix=lease_id_prefix,
            cost_of=self.cost_model_for if cost_calibration else None,
        )
        self.scrape_staleness_s = scrape_staleness_s
        # Hotspot rebalancing for policies that opt in (`Policy.rebalances_hotspots`); False
        # runs them without it (`twinroute simulate --rebalance off`).
        self.rebalance_enabled = rebalance
        self.moves = MovePlanner(self)
        self.history = DecisionHistory(size=history_size)
        # Expected output of requests that bring none, per prefix group (phase-aware placement).
        self.output_lengths = OutputLengthEstimator()
        # Prefill/decode placement, used when the endpoint set has prefill or decode roles.
        self.pd = PdPlacer(prefill_policy=policy, settings=pd)
        self.pd_picks: collections.Counter[PdMode] = collections.Counter()
        self.prefill_leases = PrefillLeases(self.leases)
        self._pd_roles_of: dict[str, Endpoint] | None = None
        self._pd_pool_cached = False
        self._pd_split_of: tuple[Endpoint, ...] | None = None
        self._pd_prefill: tuple[Endpoint, ...] = ()
        self._pd_decode: tuple[Endpoint, ...] = ()
        self.endpoints: dict[str, Endpoint] = {}
        # Active-active replicas: what the other replicas' leases put on each endpoint, added
        # to this replica's own (None: a lone scheduler).
        self.peer_loads: PeerLoads | None = None
        # ... and this replica's ring membership as they compare it (refuses picks while it
        # is behind theirs).
        self.replica: ReplicaMembership | None = None
        self.draining: set[str] = set()
        self.unhealthy: set[str] = set()
        self._scrapes: dict[str, _Scrape] = {}
        self._routable: tuple[Endpoint, ...] = ()
        self._routable_ids: frozenset[str] = frozenset()
        # Counters, read by the service's metrics and by the simulator's report.
        self.membership_changes = 0
        self.picks_failed = 0
        self.rebalance_moves = 0
        self.drain_moves = 0
        # Leases a gateway moved to the pick's fallback (its primary failed before answering).
        self.fallback_moves = 0
        # The request and decision behind each open lease of a unified pick (what a move
        # needs); disaggregated picks are not here, as a pair of instances does not move.
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
        if self.kv_events is not None:
            self.kv_events.forget(endpoint_id)
        if self.calibration is not None:
            self.calibration.forget(endpoint_id)
        for lease in self.leases.forget_endpoint(endpoint_id, now=now):
            self._open.pop(lease.lease_id, None)
            self.prefill_leases.close(lease.lease_id, now=now)
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

    def is_routable(self, endpoint_id: str) -> bool:
        return endpoint_id in self._routable_ids

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

    def cost_model_for(self, endpoint_id: str) -> CostModel:
        """The endpoint's fitted cost model, or the profile before (or without) calibration."""
        if self.calibration is None:
            return self.cost_model
        return self.calibration.model_for(endpoint_id)

    def set_kv_capacity(self, endpoint_id: str, *, tokens: int) -> None:
        """The endpoint's engine holds `tokens` of KV (its own report): size its prefix-index
        record to match, so the record forgets prefixes about when the engine evicts them."""
        if endpoint_id in self.endpoints and tokens > 0:
            blocks = max(1, tokens // max(1, self.key_block_tokens))
            if blocks != self.prefix_index.capacity_of(endpoint_id):
                self.prefix_index.set_capacity(endpoint_id, blocks)

    def load(self, endpoint_id: str, *, now: float) -> LoadSnapshot:
        own = self.leases.load(endpoint_id, now=now)
        if self.peer_loads is not None:
            own = self.peer_loads.add_to(own, endpoint_id, now=now)
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

    def view(self, *, now: float, endpoints: tuple[Endpoint, ...] | None = None) -> ClusterView:
        """The immutable input of one decision: the routable endpoints (or the given subset),
        their load computed on first read, and the prefix index."""
        chosen = self._routable if endpoints is None else endpoints
        ids = tuple(endpoint.id for endpoint in chosen)
        return ClusterView(
            endpoints=chosen,
            loads=_Loads(self, ids, now),
            prefix_index=self.cache_lookup,
            now=now,
            cost_models=self.calibration.models if self.calibration is not None else {},
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
        matched = self.cache_lookup.matched_blocks(endpoint.id, request.keys)
        cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
        if self.kv_events is not None:
            decision = dataclasses.replace(
                decision,
                detail=f"{decision.detail}; cache: {self._cache_source(endpoint.id, request)}",
            )
            if request.keys.engine_hashes:
                self.kv_events.note_placed(endpoint.id, request.keys.engine_hashes, now=now)
                if isinstance(self.cache_lookup, CacheLookup):
                    self.cache_lookup.compare(
                        endpoint.id, request.keys, prompt_tokens=request.prompt_tokens
                    )
        lease = self.leases.open(
            endpoint_id=endpoint.id,
            request_id=request.request_id,
            now=now,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=request.prompt_tokens - cached,
            predicted_ttft_s=decision.predicted_ttft_s,
            reports_first_token=request.reports_first_token,
        )
        if self.calibration is not None:
            lease.work_s = self.calibration.work_s(endpoint.id, decision.predicted_ttft_s)
        if lease.found_idle and self.peer_loads is not None:
            # Idle by our own leases is not idle when another replica's requests are there:
            # its first token would teach the fit a queue as if it were the engine's speed.
            peers = self.peer_loads.added_load(endpoint.id, now=now)
            lease.found_idle = peers is None or peers.in_flight == 0
        self.prefix_index.record(endpoint.id, request.keys)
        self._open[lease.lease_id] = (request, decision)
        self.history.record(request, decision, lease_id=lease.lease_id, now=now)
        prefill = (
            self.endpoints.get(decision.prefill_endpoint_id)
            if decision.prefill_endpoint_id
            else None
        )
        return PickResult(
            lease_id=lease.lease_id, decision=decision, endpoint=endpoint, prefill_endpoint=prefill
        )

    def _idle_by_scrape(self, endpoint_id: str, *, now: float) -> bool:
        """Whether the engine's last fresh scrape (if any) saw nothing running or waiting:
        with `Lease.found_idle`, what makes a first token a measure of the engine's speed
        rather than of a queue (other routers' requests included)."""
        scrape = self._scrapes.get(endpoint_id)
        if scrape is None or now - scrape.at > self.scrape_staleness_s:
            return True
        return not scrape.running and not scrape.queued

    def _cache_source(self, endpoint_id: str, request: RoutingRequest) -> str:
        """What the decision knew of the chosen endpoint's cache, for Explain."""
        assert self.kv_events is not None
        if not request.keys.engine_hashes:
            return (
                "approximate (no engine block hashes: a text prompt, a chat the engine renders "
                "itself, or a LoRA adapter)"
            )
        state = self.kv_events.state(endpoint_id)
        if state is KvState.LIVE:
            return "precise (the engine's KV events)"
        if state is KvState.GAP:
            return "partial (the engine's KV events since a gap; the record for older blocks)"
        return f"approximate (the engine's KV events are {state.value})"

    def open_request(self, lease_id: str) -> tuple[RoutingRequest, Decision] | None:
        """The request and decision behind an open lease of a unified pick (after a move, the
        moved decision)."""
        return self._open.get(lease_id)

    def open_decision(self, lease_id: str) -> Decision | None:
        entry = self._open.get(lease_id)
        return entry[1] if entry is not None else None

    # -- reports ----------------------------------------------------------------------------

    def first_token(self, lease_id: str, *, now: float) -> bool:
        lease = self.leases.get(lease_id)
        if (
            self.calibration is not None
            and lease is not None
            and lease.first_token_at is None
            and lease_id in self._open  # a unified pick: its TTFT is one instance's doing
        ):
            self.calibration.observe(
                lease.endpoint_id,
                fits=lease.found_idle and self._idle_by_scrape(lease.endpoint_id, now=now),
                work_s=lease.work_s,
                predicted_ttft_s=lease.predicted_ttft_s,
                observed_ttft_s=now - lease.opened_at,
            )
        # The decode instance's first token comes after the prefill instance finished.
        self.prefill_leases.done(lease_id, now=now)
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
        self.prefill_leases.close(lease_id, now=now, done=success)
        return self.leases.close(lease_id, now=now)

    def renew(self, lease_ids: Sequence[str], *, now: float) -> int:
        """Leases whose holder still runs them; how many were known."""
        return sum(self.leases.renew(lease_id, now=now) for lease_id in lease_ids)

    def expire(self, now: float) -> list[Lease]:
        expired = self.leases.expire(now=now)
        for lease in expired:
            self._open.pop(lease.lease_id, None)
            self.prefill_leases.close(lease.lease_id, now=now)
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

    def _pick_pd(self, request: RoutingRequest, *, now: float) -> PickResult:
        """A disaggregated pick: one lease on the decode endpoint (its decode load; its
        prefill too when the prefill hop is skipped) and, when there is a prefill endpoint, a
        second lease there carrying the prompt's uncached tokens until the prefill is done
        (`PrefillLeases`). Neither is in `_open`: hotspot rebalancing and drain moves, which
        move a request to its other ring candidate, do not apply to a pair of instances.
        Nothing to withdraw either: the admission hold never holds a disaggregated answer, so
        its prefill is on the wire from Pick; on a draining prefill instance it finishes there,
        and the router's `prefill_done` (or `prefill_fell_back`) report closes its lease,
        which is what the drain waits for."""
        routable = self._routable
        if self._pd_split_of is not routable:
            # The same tuples until the routable set changes, so the prefill policy's rings
            # re-sync only then.
            self._pd_split_of = routable
            self._pd_prefill = tuple(e for e in routable if e.role == Role.PREFILL)
            self._pd_decode = tuple(e for e in routable if e.role != Role.PREFILL)
        try:
            placement = self.pd.place(
                request,
                prefill_view=self.view(now=now, endpoints=self._pd_prefill),
                decode_view=self.view(now=now, endpoints=self._pd_decode),
            )
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
            reports_first_token=request.reports_first_token,
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
            self.prefill_leases.pair(
                lease.lease_id,
                prefill_lease.lease_id,
                fallback_tokens=placement.fallback_uncached_tokens,
            )
            self.prefix_index.record(prefill.id, request.keys)
        self.pd_picks[placement.mode] += 1
        self.history.record(request, decision, lease_id=lease.lease_id, now=now)
        return PickResult(
            lease_id=lease.lease_id, decision=decision, endpoint=decode, prefill_endpoint=prefill
        )

    # -- moves (planned by `self.moves`) -------------------------------------------------------

    def move(
        self, lease_id: str, *, target: str, now: float, cause: MoveCause = "rebalance"
    ) -> bool:
        """Move a queued lease to `target` (its request was withdrawn and resubmitted there).

        The lease keeps its id, so the caller's first-token and completion reports still
        find it. False when the lease is unknown, already prefilled (but for a fallback,
        which never ran on its source), or the target is not routable. `cause` says what
        moved it: a hotspot, a drain (each its reason and counter) or a gateway's fallback.
        """
        lease = self.leases.get(lease_id)
        entry = self._open.get(lease_id)
        if lease is None or entry is None or target not in self._routable_ids:
            return False
        # A fallback served a request its primary never ran: whatever the model says of its
        # prefill there, it moves (a queued move is what rebalancing and drains may make).
        if lease.prefilled and cause != "fallback":
            return False
        request, decision = entry
        source = lease.endpoint_id
        self.leases.close(lease_id, now=now)
        ttft, uncached = self.moves.ttft_on(request, target, added=0, now=now)
        self.leases.open(
            endpoint_id=target,
            request_id=request.request_id,
            now=now,
            prompt_tokens=request.prompt_tokens,
            uncached_tokens=uncached,
            predicted_ttft_s=ttft,
            lease_id=lease_id,
            reports_first_token=request.reports_first_token,
        )
        moved_lease = self.leases.get(lease_id)
        if self.calibration is not None and moved_lease is not None:
            moved_lease.work_s = self.calibration.work_s(target, ttft)
        self.prefix_index.record(target, request.keys)
        drained = cause == "drain"
        if cause == "fallback":
            # The decision stands (the fallback was part of it); only where it ran changed.
            reason = decision.reason
            detail = f"{decision.detail}; served by fallback {target} after {source} failed"
        elif drained:
            reason = DecisionReason.DRAINED
            detail = f"moved off draining {source} to {target}"
        else:
            reason = DecisionReason.REBALANCED
            detail = f"moved from hotspot {source} to its other candidate {target}"
        moved = dataclasses.replace(
            decision, endpoint_id=target, reason=reason, predicted_ttft_s=ttft, detail=detail
        )
        self._open[lease_id] = (request, moved)
        if drained:
            self.drain_moves += 1
        elif cause == "rebalance":
            self.rebalance_moves += 1
        else:
            self.fallback_moves += 1
        self.history.record(request, moved, lease_id=lease_id, now=now)
        return True

    def rebalance(self, *, now: float) -> list[RebalanceMove]:
        """Plan and apply a round at once, for callers that can always withdraw a queued
        request; callers that may fail to withdraw use `moves.rebalance` and `move`."""
        moves = self.moves.rebalance(now=now)
        return [m for m in moves if self.move(m.lease_id, target=m.target, now=now)]

    def move_running(
        self, lease_id: str, *, target: str, produced_tokens: int, now: float
    ) -> str | None:
        """A running request migrated to `target` (live migration by recompute): its lease is
        re-opened there under the same id (the router's Complete still finds it), carrying the
        prompt and what was produced, which the target recomputes. Returns the source, or None
        when the lease or the target is unknown."""
        lease = self.leases.get(lease_id)
        if lease is None or target not in self.endpoints:
            return None
        self.leases.close(lease_id, now=now)
        tokens = lease.prompt_tokens + produced_tokens
        self.leases.open(
            endpoint_id=target,
            request_id=lease.request_id,
            now=now,
            prompt_tokens=tokens,
            uncached_tokens=tokens,
            predicted_ttft_s=0.0,
            lease_id=lease_id,
        )
        return lease.endpoint_id

    def running_leases(self, endpoint_id: str) -> list[Lease]:
        """Leases past prefill on an endpoint: on a draining one, what must finish before the
        drain deadline, or what live migration may move (`scheduler/migration.py`)."""
        return [lease for lease in self.leases.leases_on(endpoint_id) if lease.prefilled]


def _output_group(request: RoutingRequest) -> int | None:
    """The prefix group whose output lengths predict this request's: its first key block."""
    keys = request.keys
    return int(keys.block_hashes[0]) if keys.num_blocks else None
