"""Discrete-event simulation of a pool of instances behind the live routing core.

The router is the very `SchedulerCore` the live scheduler runs, with the same policy objects.
It sees what a real scheduler sees and nothing more: its own routing record and in-flight
leases (updated at pick, first token and completion, exactly when a real router would learn of
them) and engine metrics (running, waiting, KV usage) scraped every `scrape_interval_s`, so
between scrapes they are stale.

Event loop: arrivals come from the trace stream (one chunk in memory at a time); the heap holds
one pending "step ends" event per busy instance and the scrape ticks. An instance that is only
decoding jumps to its next finish in one event (`Instance.plan_decode_run`); an arrival routed
to it cuts that run at the first step boundary after the arrival, so the new request is admitted
exactly when a step-by-step engine would admit it. At equal times, step ends go before scrapes
and scrapes before arrivals.

Metrics (after the warm-up share of requests, as DualMap discards its first 500): TTFT and
end-to-end latency percentiles, SLO attainment (TTFT <= SLO), engine prefix-cache hit rate
(hit tokens / prompt tokens at admission), the ideal hit rate (one LRU cache with the whole
pool's KV capacity seeing every request in arrival order; an upper bound no placement can beat
by much), the unbounded-cache hit rate, and the load coefficient of variation (std/mean of
per-instance requests, running + waiting, at each scrape tick up to the last arrival, averaged
over ticks with any load).

Disaggregated pools (`ClusterConfig.pd`): prefill instances, a modelled KV transfer, decode
instances; the flow and its per-role figures are in `simulator/disaggregation.py`.

Membership changes (`simulate(membership=[MembershipEvent, ...])`, unified pools, an
`ElasticRouter`): heap events (after step ends at equal times) add instances or drain the
newest routable ones; a drain withdraws the requests the core still believes queued there and
resubmits them where `plan_drain_moves` says, and the instance leaves the router when empty or
at its drain deadline (what is still on it then fails and is counted). Without a schedule none
of this runs. The load CV of such a run is over the members at each tick.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO, runtime_checkable

import numpy as np
import numpy.typing as npt

from twinroute.scheduler.types import (
    Decision,
    DecisionReason,
    Endpoint,
    PromptKeys,
    RoutingRequest,
)
from twinroute.simulator.disaggregation import PdFlow, PdSplit, pool_endpoints
from twinroute.simulator.instance import (
    DecodeRun,
    Instance,
    SimRequest,
    StepCostModel,
    StepResult,
)
from twinroute.simulator.kvcache import PrefixCache
from twinroute.simulator.profiles import InstanceProfile
from twinroute.simulator.traces import TraceChunk

FloatArray = npt.NDArray[np.float64]


class Router(Protocol):
    """What the simulator needs from the routing core (`SchedulerCore` adapted)."""

    def pick(self, request: RoutingRequest, *, now: float) -> tuple[str, Decision]: ...

    def first_token(self, lease_id: str, *, now: float) -> None: ...

    def complete(
        self, lease_id: str, *, now: float, observed_ttft_s: float, output_tokens: int
    ) -> None: ...

    def update_scrape(
        self, endpoint_id: str, *, running: int, queued: int, kv_usage: float, now: float
    ) -> None: ...

    def tick(self, *, now: float) -> list[tuple[str, str, str]]:
        """Periodic work (lease expiry); returns planned rebalancing moves (lease, from, to)."""
        ...

    def move(self, lease_id: str, *, target: str, now: float) -> bool:
        """Move a queued request's lease to `target`; False if it cannot move."""
        ...

    def counters(self) -> dict[str, int]: ...


@runtime_checkable
class PdRouter(Router, Protocol):
    """A router for disaggregated pools: told when a prefill instance finished its part."""

    def prefill_done(self, lease_id: str, *, now: float) -> None: ...


@runtime_checkable
class ElasticRouter(Router, Protocol):
    """A router whose endpoint set can change during a run (`simulate(membership=...)`)."""

    def set_endpoints(self, endpoints: tuple[Endpoint, ...], *, now: float) -> None: ...

    def drain(self, endpoint_id: str, *, now: float) -> None:
        """Stop routing to the endpoint (it is leaving)."""
        ...

    def plan_drain_moves(self, endpoint_id: str, *, now: float) -> list[tuple[str, str, str]]:
        """Where the requests still queued on a draining endpoint go (lease, from, to)."""
        ...

    def move_drained(self, lease_id: str, *, target: str, now: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """At `at_s`, `add` new instances join and then `remove` instances leave (the newest
    routable ones first, as a ReplicaSet scales in): each leaving one is drained (no new
    requests; its queued requests withdrawn and rerouted), runs what it has admitted to the
    end, and is removed when empty, or at `drain_deadline_s` after the drain, when what is
    still on it fails (as a pod killed at the end of its grace period)."""

    at_s: float
    add: int = 0
    remove: int = 0
    drain_deadline_s: float = 600.0

    def __post_init__(self) -> None:
        if self.add < 0 or self.remove < 0 or self.drain_deadline_s < 0 or self.at_s < 0:
            raise ValueError(f"membership event must have non-negative fields: {self}")


@dataclass(frozen=True, slots=True)
class MembershipRecord:
    """What one membership event did (`kind` "change"), or one drained instance's removal
    (`kind` "removed")."""

    kind: str
    at_s: float
    members_before: tuple[str, ...]
    members_after: tuple[str, ...]
    added: tuple[str, ...] = ()
    drained: tuple[str, ...] = ()
    queued_moved: int = 0
    queued_left: int = 0
    failed_requests: int = 0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    instances: int
    profile: InstanceProfile
    ttft_slo_s: float = 5.0
    scrape_interval_s: float = 0.5
    # Time of the first scrape (seeded, so that scrapes do not always align with arrivals).
    scrape_phase: float = 0.0
    warmup_fraction: float = 0.0
    block_size: int = 512
    # Keep per-request TTFTs and per-instance load samples for plots.
    keep_samples: bool = False
    # A disaggregated pool: the first `pd.prefill` instances prefill, the others decode
    # (`simulator/disaggregation.py`); None is a unified pool.
    pd: PdSplit | None = None


@dataclass(frozen=True, slots=True)
class SimulationResult:
    requests: int
    measured_requests: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    slo_attainment: float
    cache_hit_rate: float
    ideal_cache_hit_rate: float
    unbounded_cache_hit_rate: float
    load_cv: float
    # Median of observed minus predicted TTFT, over requests whose policy predicted one.
    ttft_prediction_error_p50_s: float
    # Share of those requests predicted within the SLO that then missed it.
    slo_misses_predicted_ok: float
    slo_switches: int
    rebalance_moves: int
    preemptions: int
    rate_rps: float
    sim_duration_s: float
    wall_s: float
    decisions: dict[str, int] = field(default_factory=dict)
    ttfts_s: FloatArray | None = None
    load_times_s: FloatArray | None = None
    load_samples: npt.NDArray[np.int32] | None = None
    # With a membership schedule: what changed when, requests lost at forced removals, and
    # (with keep_samples) per-request arrival, prompt and cached tokens for windowed reports.
    membership_log: tuple[MembershipRecord, ...] = ()
    failed_requests: int = 0
    # Requests that never completed (lost at a forced removal; 0 in a healthy run).
    unfinished_requests: int = 0
    arrivals_s: FloatArray | None = None
    prompt_tokens: npt.NDArray[np.int64] | None = None
    cached_tokens: npt.NDArray[np.int64] | None = None
    instances_at_load_times: npt.NDArray[np.int32] | None = None
    # Time per output token after the first: (e2e - TTFT) / (output tokens - 1).
    tpot_p50_s: float = math.nan
    tpot_p90_s: float = math.nan
    # Disaggregated pools only: per-role figures (`PdFlow.metrics`).
    pd: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """The JSON-able headline metrics (no sample arrays)."""
        return {
            "requests": self.requests,
            "measured_requests": self.measured_requests,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p90_s": self.ttft_p90_s,
            "ttft_p99_s": self.ttft_p99_s,
            "e2e_p50_s": self.e2e_p50_s,
            "e2e_p90_s": self.e2e_p90_s,
            "tpot_p50_s": self.tpot_p50_s,
            "tpot_p90_s": self.tpot_p90_s,
            "slo_attainment": self.slo_attainment,
            "cache_hit_rate": self.cache_hit_rate,
            "ideal_cache_hit_rate": self.ideal_cache_hit_rate,
            "unbounded_cache_hit_rate": self.unbounded_cache_hit_rate,
            "load_cv": self.load_cv,
            "ttft_prediction_error_p50_s": self.ttft_prediction_error_p50_s,
            "slo_misses_predicted_ok": self.slo_misses_predicted_ok,
            "slo_switches": self.slo_switches,
            "rebalance_moves": self.rebalance_moves,
            "preemptions": self.preemptions,
            "rate_rps": self.rate_rps,
            "sim_duration_s": self.sim_duration_s,
            "wall_s": self.wall_s,
            "decisions": dict(self.decisions),
            **({"pd": dict(self.pd)} if self.pd else {}),
        }


_STEP_END = 0
_SCRAPE = 1
_MEMBERSHIP = 2
_DRAIN_DEADLINE = 3
_KV_ARRIVES = 4


class _Slot:
    """Simulator-side state of one instance: its pending step or decode run."""

    __slots__ = (
        "busy",
        "endpoint_id",
        "instance",
        "pending",
        "run",
        "run_start",
        "run_steps",
        "version",
    )

    def __init__(self, *, endpoint_id: str, instance: Instance) -> None:
        self.endpoint_id = endpoint_id
        self.instance = instance
        self.busy = False
        self.version = 0
        self.pending: StepResult | None = None
        self.run: DecodeRun | None = None
        self.run_start = 0.0
        self.run_steps = 0


class _Progress:
    def __init__(self, *, total: int | None, stream: TextIO | None, label: str) -> None:
        self._total = total
        self._stream = stream
        self._label = label
        self._started = time.perf_counter()
        self._last = self._started

    def update(self, *, done: int, sim_time_s: float, force: bool = False) -> None:
        if self._stream is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < 2.0:
            return
        self._last = now
        share = f" {100.0 * done / self._total:5.1f}%" if self._total else ""
        total = f"/{self._total}" if self._total else ""
        self._stream.write(
            f"{self._label}:{share} {done}{total} requests routed, simulated "
            f"{sim_time_s:.0f} s, {now - self._started:.1f} s wall\n"
        )
        self._stream.flush()


def _members_load_cv(rows: Sequence[npt.NDArray[np.int32]]) -> float:
    """Mean over ticks with any load of std/mean of the members' loads at that tick."""
    ratios = [float(row.std() / row.mean()) for row in rows if row.size and row.mean() > 0]
    return float(np.mean(ratios)) if ratios else 0.0


def _percentile(values: FloatArray, q: float) -> float:
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, q))


def simulate(
    chunks: Iterable[TraceChunk],
    *,
    config: ClusterConfig,
    router_factory: Callable[[tuple[Endpoint, ...]], Router],
    keys_for: Callable[[npt.NDArray[np.int64], int], PromptKeys],
    cost: StepCostModel,
    total_requests: int | None = None,
    progress: TextIO | None = sys.stderr,
    label: str = "simulate",
    membership: Sequence[MembershipEvent] = (),
) -> SimulationResult:
    """Run one simulation; deterministic for a given trace, router and cost model.

    `keys_for(block_ids, prompt_tokens)` returns the `PromptKeys` the router sees.
    `membership` schedules instances joining and leaving (needs an `ElasticRouter`).
    """
    started = time.perf_counter()
    if config.instances < 1:
        raise ValueError("need at least one instance")
    if config.pd is not None:
        if config.pd.instances != config.instances:
            raise ValueError(
                f"the prefill:decode split {config.pd.prefill}:{config.pd.decode} does not "
                f"make {config.instances} instances"
            )
        if membership:
            raise ValueError("a disaggregated pool cannot change membership in a simulation")
    endpoints = pool_endpoints(
        instances=config.instances, prefill=config.pd.prefill if config.pd else 0
    )
    router = router_factory(endpoints)
    instance_config = config.profile.instance_config(block_size=config.block_size)
    slots = [
        _Slot(endpoint_id=e.id, instance=Instance(config=instance_config, cost=cost))
        for e in endpoints
    ]
    slot_of = {e.id: index for index, e in enumerate(endpoints)}
    ideal = PrefixCache(capacity_tokens=instance_config.kv_capacity_tokens * config.instances)
    seen_blocks: set[int] = set()

    heap: list[tuple[float, int, int, int, int]] = []
    sequence = 0

    def push(at: float, kind: int, slot_index: int, version: int) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(heap, (at, kind, sequence, slot_index, version))

    # Per-request records, indexed by arrival order.
    arrival_of: list[float] = []
    prompt_of: list[int] = []
    hit_of: list[int] = []
    ideal_of: list[int] = []
    unbounded_of: list[int] = []
    ttft_of: list[float] = []
    predicted_of: list[float] = []
    e2e_of: list[float] = []
    leases: dict[str, str] = {}
    reasons: dict[str, int] = {}
    load_times: list[float] = []
    load_rows: list[npt.NDArray[np.int32]] = []
    rebalance_moves = 0
    progress_line = _Progress(total=total_requests, stream=progress, label=label)

    def start_step(slot_index: int, now: float) -> None:
        slot = slots[slot_index]
        instance = slot.instance
        run = instance.plan_decode_run()
        slot.version += 1
        if run is not None:
            slot.run = run
            slot.run_start = now
            slot.run_steps = run.steps
            slot.busy = True
            push(now + float(run.ends_s[-1]), _STEP_END, slot_index, slot.version)
            return
        result = instance.step(now)
        if result.steps == 0:
            slot.busy = False
            return
        slot.busy = True
        slot.pending = result
        push(now + result.duration_s, _STEP_END, slot_index, slot.version)

    def end_step(slot_index: int, now: float) -> None:
        slot = slots[slot_index]
        if slot.run is not None:
            result = slot.instance.apply_decode_run(slot.run, steps=slot.run_steps)
            slot.run = None
        else:
            assert slot.pending is not None
            result = slot.pending
            slot.pending = None
        if pd is not None:
            result = pd_step_ended(slot_index, result, now)
        for first in result.first_tokens:
            index = int(first.request_id)
            ttft_of[index] = now - arrival_of[index]
            hit_of[index] = first.cached_tokens
            router.first_token(leases[first.request_id], now=now)
        for done in result.finished:
            index = int(done.request_id)
            e2e_of[index] = now - arrival_of[index]
            requests_by_id.pop(done.request_id, None)
            lease_request.pop(leases[done.request_id], None)
            router.complete(
                leases.pop(done.request_id),
                now=now,
                observed_ttft_s=ttft_of[index],
                output_tokens=done.output_tokens,
            )
        start_step(slot_index, now)
        if slot_index in leaving_since:
            remove_if_empty(slot_index, now)

    def cut_run(slot_index: int, now: float) -> None:
        """An arrival at `now` cuts a decode run at the first step boundary after it."""
        slot = slots[slot_index]
        run = slot.run
        assert run is not None
        offset = now - slot.run_start
        steps = 1 + int(np.searchsorted(run.ends_s[: slot.run_steps - 1], offset, side="left"))
        if steps < slot.run_steps:
            slot.run_steps = steps
            slot.version += 1
            push(slot.run_start + float(run.ends_s[steps - 1]), _STEP_END, slot_index, slot.version)

    def scrape(now: float) -> None:
        for slot in slots:
            running, waiting, usage = slot.instance.scrape()
            router.update_scrape(
                slot.endpoint_id, running=running, queued=waiting, kv_usage=usage, now=now
            )
        nonlocal rebalance_moves
        for lease_id, source, target in router.tick(now=now):
            request_id = lease_request.get(lease_id)
            if request_id is None or not router.move(lease_id, target=target, now=now):
                continue
            if slots[slot_of[source]].instance.withdraw(request_id):
                rebalance_moves += 1
                target_index = slot_of[target]
                slots[target_index].instance.submit(requests_by_id[request_id])
                wake(target_index, now)
            else:
                # The engine admitted it meanwhile: the lease goes back where the request is.
                router.move(lease_id, target=source, now=now)
        if not draining:
            load_times.append(now)
            load_rows.append(
                np.fromiter((s.instance.load for s in slots), dtype=np.int32, count=len(slots))
            )
            if schedule:
                member_loads.append(
                    np.fromiter((slots[i].instance.load for i in members), dtype=np.int32)
                )

    # Requests in flight, for rebalancing moves (dropped on completion: memory stays flat).
    lease_request: dict[str, str] = {}
    requests_by_id: dict[str, SimRequest] = {}

    def wake(slot_index: int, now: float) -> None:
        slot = slots[slot_index]
        if not slot.busy:
            start_step(slot_index, now)
        elif slot.run is not None:
            cut_run(slot_index, now)

    # -- disaggregated prefill/decode; none of this runs in a unified pool ------------------
    output_of: list[int] = []
    pd: PdFlow | None = None
    pd_router: PdRouter | None = None
    if config.pd is not None:
        if not isinstance(router, PdRouter):
            raise TypeError("a disaggregated pool needs a router with prefill_done")
        pd = PdFlow(profile=config.profile, block_size=config.block_size, split=config.pd)
        pd_router = router

    def pd_step_ended(slot_index: int, result: StepResult, now: float) -> StepResult:
        """Prefills finished on a prefill instance: record their hit, tell the router, and
        send their KV to the decode instance."""
        assert pd is not None and pd_router is not None
        result, done = pd.step_ended(slot_index, result, now=now)
        for prefill in done:
            hit_of[int(prefill.request_id)] = prefill.cached_tokens
            pd_router.prefill_done(leases[prefill.request_id], now=now)
            decode_cache = slots[pd.decode_index(prefill.request_id)].instance.cache
            decode_index, arrives_at, transfer_id = pd.start_transfer(
                prefill, decode_cache=decode_cache, now=now
            )
            push(arrives_at, _KV_ARRIVES, decode_index, transfer_id)
        return result

    def kv_arrives(transfer_id: int, now: float) -> None:
        assert pd is not None
        decode_index, request = pd.arrived(transfer_id)
        slots[decode_index].instance.submit(request)
        wake(decode_index, now)

    # -- membership changes (elastic scaling); none of this runs without a schedule --------
    schedule = tuple(sorted(membership, key=lambda event: event.at_s))
    elastic: ElasticRouter | None = None
    if schedule:
        if not isinstance(router, ElasticRouter):
            raise TypeError("a membership schedule needs a router with set_endpoints/drain")
        elastic = router
    # Slot indexes of the router's members (draining ones included) in join order.
    members: list[int] = list(range(len(slots)))
    leaving_since: dict[int, float] = {}
    membership_log: list[MembershipRecord] = []
    # Per scrape tick, the members' loads (the load CV of an elastic run is over members).
    member_loads: list[npt.NDArray[np.int32]] = []
    failed_requests = 0
    for event_index, event in enumerate(schedule):
        push(event.at_s, _MEMBERSHIP, event_index, 0)

    def member_ids() -> tuple[str, ...]:
        return tuple(slots[index].endpoint_id for index in members)

    def sync_router(now: float) -> None:
        assert elastic is not None
        elastic.set_endpoints(tuple(endpoints_by_id[e] for e in member_ids()), now=now)

    endpoints_by_id = {e.id: e for e in endpoints}

    def change_membership(event: MembershipEvent, now: float) -> None:
        assert elastic is not None
        before = member_ids()
        added: list[str] = []
        for _ in range(event.add):
            index = len(slots)
            endpoint = Endpoint(id=f"sim-{index:03d}", address=f"sim://{index}")
            endpoints_by_id[endpoint.id] = endpoint
            slots.append(
                _Slot(endpoint_id=endpoint.id, instance=Instance(config=instance_config, cost=cost))
            )
            slot_of[endpoint.id] = index
            members.append(index)
            added.append(endpoint.id)
        if added:
            sync_router(now)
        routable = [index for index in members if index not in leaving_since]
        # Never the last routable one; all leave routing before any request is replanned.
        leaving = routable[len(routable) - min(event.remove, len(routable) - 1) :]
        moved = left = 0
        for index in leaving:
            leaving_since[index] = now
            push(now + event.drain_deadline_s, _DRAIN_DEADLINE, index, 0)
            elastic.drain(slots[index].endpoint_id, now=now)
        for index in leaving:
            source = slots[index]
            for lease_id, _from, target in elastic.plan_drain_moves(source.endpoint_id, now=now):
                request_id = lease_request.get(lease_id)
                if request_id is None or not source.instance.withdraw(request_id):
                    left += 1  # admitted meanwhile: it finishes where it is
                    continue
                if not elastic.move_drained(lease_id, target=target, now=now):
                    source.instance.submit(requests_by_id[request_id])
                    left += 1
                    continue
                moved += 1
                target_index = slot_of[target]
                slots[target_index].instance.submit(requests_by_id[request_id])
                wake(target_index, now)
        membership_log.append(
            MembershipRecord(
                kind="change",
                at_s=now,
                members_before=before,
                members_after=tuple(
                    slots[index].endpoint_id for index in members if index not in leaving_since
                ),
                added=tuple(added),
                drained=tuple(slots[index].endpoint_id for index in leaving),
                queued_moved=moved,
                queued_left=left,
            )
        )
        for index in leaving:
            remove_if_empty(index, now)

    def remove_if_empty(index: int, now: float) -> None:
        slot = slots[index]
        if not slot.busy and not slot.instance.busy:
            remove_leaving(index, now)

    def remove_leaving(index: int, now: float) -> None:
        """Take a drained instance out; what it still holds (deadline passed) fails."""
        nonlocal failed_requests
        before = member_ids()
        slot = slots[index]
        lost = slot.instance.load
        failed_requests += lost
        del leaving_since[index]
        members.remove(index)
        slot.version += 1  # its pending step, if any, never ends
        slot.busy = False
        slot.run = slot.pending = None
        sync_router(now)
        membership_log.append(
            MembershipRecord(
                kind="removed",
                at_s=now,
                members_before=before,
                members_after=member_ids(),
                drained=(slot.endpoint_id,),
                failed_requests=lost,
            )
        )

    block_size = config.block_size
    next_scrape = config.scrape_phase
    draining = False
    last_arrival = 0.0
    routed = 0

    def drain_until(limit: float) -> None:
        nonlocal next_scrape
        while True:
            head = heap[0][0] if heap else math.inf
            # After the last arrival, scrapes (and rebalancing) go on while work is left.
            if (
                next_scrape <= limit
                and next_scrape <= head
                and (next_scrape <= last_arrival or (draining and heap))
            ):
                scrape(next_scrape)
                next_scrape += config.scrape_interval_s
                continue
            if head > limit or not heap:
                return
            at, kind, _seq, slot_index, version = heapq.heappop(heap)
            if kind == _STEP_END and version == slots[slot_index].version:
                end_step(slot_index, at)
            elif kind == _MEMBERSHIP:
                change_membership(schedule[slot_index], at)
            elif kind == _DRAIN_DEADLINE and slot_index in leaving_since:
                remove_leaving(slot_index, at)
            elif kind == _KV_ARRIVES:
                kv_arrives(version, at)

    for chunk in chunks:
        offsets = chunk.block_offsets
        for row in range(len(chunk)):
            now = float(chunk.arrival_s[row])
            last_arrival = now
            drain_until(now)
            index = len(arrival_of)
            request_id = str(index)
            block_ids = chunk.block_ids[offsets[row] : offsets[row + 1]]
            prompt = int(chunk.prompt_tokens[row])
            output = int(chunk.output_tokens[row])
            routing = RoutingRequest(
                request_id=request_id,
                keys=keys_for(block_ids, prompt),
                prompt_tokens=prompt,
                expected_output_tokens=output,
                ttft_slo_s=config.ttft_slo_s,
            )
            lease_id, decision = router.pick(routing, now=now)
            reasons[decision.reason.value] = reasons.get(decision.reason.value, 0) + 1
            leases[request_id] = lease_id
            lease_request[lease_id] = request_id
            ids = block_ids.tolist()
            request = SimRequest(
                request_id=request_id, prompt_tokens=prompt, output_tokens=output, block_ids=ids
            )
            requests_by_id[request_id] = request
            arrival_of.append(now)
            prompt_of.append(prompt)
            hit_of.append(0)
            ttft_of.append(math.nan)
            predicted_of.append(decision.predicted_ttft_s)
            e2e_of.append(math.nan)
            # Ideal and unbounded caches see every request in arrival order.
            matched = ideal.match(ids, block_size=block_size)
            ideal_of.append(min(prompt - 1, sum(ideal.block_tokens(b) for b in ids[:matched])))
            ideal.acquire(ids[:matched])
            for position in range(matched, len(ids)):
                tokens = min(block_size, prompt - position * block_size)
                if ideal.reserve(tokens):
                    ideal.commit(ids[position], tokens)
                else:
                    ids_held = position
                    break
            else:
                ids_held = len(ids)
            ideal.release(ids[:ids_held])
            reuse = 0
            for position, block in enumerate(ids):
                if block not in seen_blocks:
                    break
                reuse = min(prompt - 1, (position + 1) * block_size)
            unbounded_of.append(reuse)
            seen_blocks.update(ids)
            output_of.append(output)
            if pd is not None and decision.prefill_endpoint_id is not None:
                prefill_index = slot_of[decision.prefill_endpoint_id]
                slots[prefill_index].instance.submit(
                    pd.prefill_request(request, decode_index=slot_of[decision.endpoint_id])
                )
                wake(prefill_index, now)
            else:
                if pd is not None:
                    pd.local += 1
                slots[slot_of[decision.endpoint_id]].instance.submit(request)
                wake(slot_of[decision.endpoint_id], now)
            routed += 1
            progress_line.update(done=routed, sim_time_s=now)
    draining = True
    drain_until(math.inf)
    # Free what finished requests no longer need.
    requests_by_id.clear()
    progress_line.update(done=routed, sim_time_s=last_arrival, force=True)

    total = len(arrival_of)
    warmup = int(total * config.warmup_fraction)
    ttft = np.asarray(ttft_of[warmup:], dtype=np.float64)
    predicted = np.asarray(predicted_of[warmup:], dtype=np.float64)
    # How well the policy's TTFT prediction matched (policies that predict nothing say 0).
    predicting = predicted > 0
    missed = predicting & (predicted <= config.ttft_slo_s) & (ttft > config.ttft_slo_s)
    e2e = np.asarray(e2e_of[warmup:], dtype=np.float64)
    outputs = np.asarray(output_of[warmup:], dtype=np.float64)
    decoding = outputs > 1
    tpot = (e2e[decoding] - ttft[decoding]) / (outputs[decoding] - 1)
    prompts = np.asarray(prompt_of[warmup:], dtype=np.float64)
    hits = np.asarray(hit_of[warmup:], dtype=np.float64)
    measured = int(ttft.size)
    if schedule:
        width = len(slots)
        loads = np.zeros((len(load_rows), width), np.int32)
        for row, values in enumerate(load_rows):
            loads[row, : values.shape[0]] = values
    else:
        loads = np.vstack(load_rows) if load_rows else np.zeros((0, config.instances), np.int32)
    means = loads.mean(axis=1) if loads.size else np.zeros(0)
    busy_rows = means > 0
    load_cv = (
        float(np.mean(loads[busy_rows].std(axis=1) / means[busy_rows])) if busy_rows.any() else 0.0
    )
    if schedule:
        load_cv = _members_load_cv(member_loads)
    counters = router.counters()
    prompt_total = float(prompts.sum()) or 1.0
    sim_end = max(arrival_of[-1] if arrival_of else 0.0, 0.0)
    return SimulationResult(
        requests=total,
        measured_requests=measured,
        ttft_p50_s=_percentile(ttft, 50),
        ttft_p90_s=_percentile(ttft, 90),
        ttft_p99_s=_percentile(ttft, 99),
        e2e_p50_s=_percentile(e2e, 50),
        e2e_p90_s=_percentile(e2e, 90),
        tpot_p50_s=_percentile(tpot, 50),
        tpot_p90_s=_percentile(tpot, 90),
        pd=pd.metrics() if pd is not None else {},
        slo_attainment=float(np.mean(ttft <= config.ttft_slo_s)) if measured else math.nan,
        cache_hit_rate=float(hits.sum()) / prompt_total,
        ideal_cache_hit_rate=float(sum(ideal_of[warmup:])) / prompt_total,
        unbounded_cache_hit_rate=float(sum(unbounded_of[warmup:])) / prompt_total,
        load_cv=load_cv,
        ttft_prediction_error_p50_s=(
            float(np.median(ttft[predicting] - predicted[predicting]))
            if predicting.any()
            else math.nan
        ),
        slo_misses_predicted_ok=float(missed.sum() / max(1, predicting.sum())),
        slo_switches=counters.get("slo_switches", reasons.get(DecisionReason.SLO_SWITCH.value, 0)),
        rebalance_moves=rebalance_moves,
        preemptions=sum(s.instance.metrics().preemptions for s in slots),
        rate_rps=total / arrival_of[-1] if total > 1 and arrival_of[-1] > 0 else math.nan,
        sim_duration_s=sim_end,
        wall_s=time.perf_counter() - started,
        decisions=reasons,
        ttfts_s=ttft if config.keep_samples else None,
        load_times_s=np.asarray(load_times) if config.keep_samples else None,
        load_samples=loads if config.keep_samples else None,
        membership_log=tuple(membership_log),
        failed_requests=failed_requests,
        unfinished_requests=int(np.isnan(np.asarray(e2e_of, dtype=np.float64)).sum()),
        arrivals_s=np.asarray(arrival_of[warmup:]) if config.keep_samples else None,
        prompt_tokens=np.asarray(prompt_of[warmup:], np.int64) if config.keep_samples else None,
        cached_tokens=np.asarray(hit_of[warmup:], np.int64) if config.keep_samples else None,
        instances_at_load_times=(
            np.asarray([row.size for row in member_loads], np.int32)
            if config.keep_samples and schedule
            else None
        ),
    )
