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
from twinroute.vocabulary import DEFAULT_TTFT_SLO_S, DecisionReason

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


# Simulated engine metric scrapes come every half second, not every second as a live
# scheduler's default: the published simulator figures were measured so.
SIMULATED_SCRAPE_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    instances: int
    profile: InstanceProfile
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    scrape_interval_s: float = SIMULATED_SCRAPE_INTERVAL_S
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
    # Median of |predicted - observed| / observed TTFT over the same requests (what the live
    # scheduler reports as twinroute_scheduler_ttft_prediction_error_ratio).
    ttft_prediction_abs_error_ratio_p50: float
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
            "ttft_prediction_abs_error_ratio_p50": self.ttft_prediction_abs_error_ratio_p50,
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
    simulation = ClusterSimulation(
        config=config,
        router_factory=router_factory,
        keys_for=keys_for,
        cost=cost,
        membership=membership,
        progress=_Progress(total=total_requests, stream=progress, label=label),
    )
    simulation.run(chunks)
    return simulation.result(started=started)


class ClusterSimulation:
    """One run of the event loop in the module docstring: its state, and one method per kind
    of event (arrival, step end, scrape, KV arrival, membership change, drain deadline)."""

    def __init__(
        self,
        *,
        config: ClusterConfig,
        router_factory: Callable[[tuple[Endpoint, ...]], Router],
        keys_for: Callable[[npt.NDArray[np.int64], int], PromptKeys],
        cost: StepCostModel,
        membership: Sequence[MembershipEvent],
        progress: _Progress,
    ) -> None:
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
        self.config = config
        self._keys_for = keys_for
        self._cost = cost
        self._progress = progress
        endpoints = pool_endpoints(
            instances=config.instances, prefill=config.pd.prefill if config.pd else 0
        )
        self.router = router_factory(endpoints)
        self._instance_config = config.profile.instance_config(block_size=config.block_size)
        self.slots = [
            _Slot(endpoint_id=e.id, instance=Instance(config=self._instance_config, cost=cost))
            for e in endpoints
        ]
        self._slot_of = {e.id: index for index, e in enumerate(endpoints)}
        self._endpoints_by_id = {e.id: e for e in endpoints}
        self._ideal = PrefixCache(
            capacity_tokens=self._instance_config.kv_capacity_tokens * config.instances
        )
        self._seen_blocks: set[int] = set()
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._sequence = 0
        # Per-request records, indexed by arrival order.
        self.arrival_of: list[float] = []
        self.prompt_of: list[int] = []
        self.hit_of: list[int] = []
        self.ideal_of: list[int] = []
        self.unbounded_of: list[int] = []
        self.ttft_of: list[float] = []
        self.predicted_of: list[float] = []
        self.e2e_of: list[float] = []
        self.output_of: list[int] = []
        self._leases: dict[str, str] = {}
        self.reasons: dict[str, int] = {}
        self.load_times: list[float] = []
        self.load_rows: list[npt.NDArray[np.int32]] = []
        self.rebalance_moves = 0
        # Requests in flight, for rebalancing moves (dropped on completion: memory stays flat).
        self._lease_request: dict[str, str] = {}
        self._requests_by_id: dict[str, SimRequest] = {}
        self._next_scrape = config.scrape_phase
        self._draining = False
        self._last_arrival = 0.0
        self._routed = 0
        self._init_pd()
        self._init_membership(membership)

    # -- the event loop ----------------------------------------------------------------------

    def _push(self, at: float, kind: int, slot_index: int, version: int) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (at, kind, self._sequence, slot_index, version))

    def run(self, chunks: Iterable[TraceChunk]) -> None:
        """Route every request of the trace, then run until every instance is idle."""
        for chunk in chunks:
            for row in range(len(chunk)):
                now = float(chunk.arrival_s[row])
                self._last_arrival = now
                self._drain_until(now)
                self._arrive(chunk, row, now)
                self._routed += 1
                self._progress.update(done=self._routed, sim_time_s=now)
        self._draining = True
        self._drain_until(math.inf)
        # Free what finished requests no longer need.
        self._requests_by_id.clear()
        self._progress.update(done=self._routed, sim_time_s=self._last_arrival, force=True)

    def _drain_until(self, limit: float) -> None:
        """Handle every event up to `limit` (scrapes interleaved at their ticks)."""
        heap = self._heap
        while True:
            head = heap[0][0] if heap else math.inf
            # After the last arrival, scrapes (and rebalancing) go on while work is left.
            next_scrape = self._next_scrape
            if (
                next_scrape <= limit
                and next_scrape <= head
                and (next_scrape <= self._last_arrival or (self._draining and heap))
            ):
                self._scrape(next_scrape)
                self._next_scrape = next_scrape + self.config.scrape_interval_s
                continue
            if head > limit or not heap:
                return
            at, kind, _seq, slot_index, version = heapq.heappop(heap)
            if kind == _STEP_END and version == self.slots[slot_index].version:
                self._end_step(slot_index, at)
            elif kind == _MEMBERSHIP:
                self._change_membership(self._schedule[slot_index], at)
            elif kind == _DRAIN_DEADLINE and slot_index in self._leaving_since:
                self._remove_leaving(slot_index, at)
            elif kind == _KV_ARRIVES:
                self._kv_arrives(version, at)

    # -- arrivals ----------------------------------------------------------------------------

    def _arrive(self, chunk: TraceChunk, row: int, now: float) -> None:
        """Route one request of the trace and submit it to its instance."""
        offsets = chunk.block_offsets
        index = len(self.arrival_of)
        request_id = str(index)
        block_ids = chunk.block_ids[offsets[row] : offsets[row + 1]]
        prompt = int(chunk.prompt_tokens[row])
        output = int(chunk.output_tokens[row])
        # No per-request SLO: the router's configured one applies, as for a client that
        # sends none.
        routing = RoutingRequest(
            request_id=request_id,
            keys=self._keys_for(block_ids, prompt),
            prompt_tokens=prompt,
            expected_output_tokens=output,
            # The simulated router reports every request's first token, as a streaming one
            # does: the lease queue may wait for those reports.
            reports_first_token=True,
        )
        lease_id, decision = self.router.pick(routing, now=now)
        self.reasons[decision.reason.value] = self.reasons.get(decision.reason.value, 0) + 1
        self._leases[request_id] = lease_id
        self._lease_request[lease_id] = request_id
        ids = block_ids.tolist()
        request = SimRequest(
            request_id=request_id, prompt_tokens=prompt, output_tokens=output, block_ids=ids
        )
        self._requests_by_id[request_id] = request
        self.arrival_of.append(now)
        self.prompt_of.append(prompt)
        self.hit_of.append(0)
        self.ttft_of.append(math.nan)
        self.predicted_of.append(decision.predicted_ttft_s)
        self.e2e_of.append(math.nan)
        self._record_cache_bounds(ids, prompt)
        self.output_of.append(output)
        pd = self._pd
        if pd is not None and decision.prefill_endpoint_id is not None:
            prefill_index = self._slot_of[decision.prefill_endpoint_id]
            self.slots[prefill_index].instance.submit(
                pd.prefill_request(request, decode_index=self._slot_of[decision.endpoint_id])
            )
            self._wake(prefill_index, now)
        else:
            if pd is not None:
                pd.local += 1
            self.slots[self._slot_of[decision.endpoint_id]].instance.submit(request)
            self._wake(self._slot_of[decision.endpoint_id], now)

    def _record_cache_bounds(self, ids: list[int], prompt: int) -> None:
        """The ideal and unbounded caches see every request in arrival order."""
        block_size = self.config.block_size
        ideal = self._ideal
        matched = ideal.match(ids, block_size=block_size)
        self.ideal_of.append(min(prompt - 1, sum(ideal.block_tokens(b) for b in ids[:matched])))
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
            if block not in self._seen_blocks:
                break
            reuse = min(prompt - 1, (position + 1) * block_size)
        self.unbounded_of.append(reuse)
        self._seen_blocks.update(ids)

    # -- instances ---------------------------------------------------------------------------

    def _start_step(self, slot_index: int, now: float) -> None:
        slot = self.slots[slot_index]
        instance = slot.instance
        run = instance.plan_decode_run()
        slot.version += 1
        if run is not None:
            slot.run = run
            slot.run_start = now
            slot.run_steps = run.steps
            slot.busy = True
            self._push(now + float(run.ends_s[-1]), _STEP_END, slot_index, slot.version)
            return
        result = instance.step(now)
        if result.steps == 0:
            slot.busy = False
            return
        slot.busy = True
        slot.pending = result
        self._push(now + result.duration_s, _STEP_END, slot_index, slot.version)

    def _end_step(self, slot_index: int, now: float) -> None:
        slot = self.slots[slot_index]
        if slot.run is not None:
            result = slot.instance.apply_decode_run(slot.run, steps=slot.run_steps)
            slot.run = None
        else:
            assert slot.pending is not None
            result = slot.pending
            slot.pending = None
        if self._pd is not None:
            result = self._pd_step_ended(slot_index, result, now)
        for first in result.first_tokens:
            index = int(first.request_id)
            self.ttft_of[index] = now - self.arrival_of[index]
            self.hit_of[index] = first.cached_tokens
            self.router.first_token(self._leases[first.request_id], now=now)
        for done in result.finished:
            index = int(done.request_id)
            self.e2e_of[index] = now - self.arrival_of[index]
            self._requests_by_id.pop(done.request_id, None)
            self._lease_request.pop(self._leases[done.request_id], None)
            self.router.complete(
                self._leases.pop(done.request_id),
                now=now,
                observed_ttft_s=self.ttft_of[index],
                output_tokens=done.output_tokens,
            )
        self._start_step(slot_index, now)
        if slot_index in self._leaving_since:
            self._remove_if_empty(slot_index, now)

    def _cut_run(self, slot_index: int, now: float) -> None:
        """An arrival at `now` cuts a decode run at the first step boundary after it."""
        slot = self.slots[slot_index]
        run = slot.run
        assert run is not None
        offset = now - slot.run_start
        steps = 1 + int(np.searchsorted(run.ends_s[: slot.run_steps - 1], offset, side="left"))
        if steps < slot.run_steps:
            slot.run_steps = steps
            slot.version += 1
            self._push(
                slot.run_start + float(run.ends_s[steps - 1]), _STEP_END, slot_index, slot.version
            )

    def _wake(self, slot_index: int, now: float) -> None:
        slot = self.slots[slot_index]
        if not slot.busy:
            self._start_step(slot_index, now)
        elif slot.run is not None:
            self._cut_run(slot_index, now)

    def _scrape(self, now: float) -> None:
        """Engine metrics to the router, its periodic work and rebalancing moves, and the
        load sample of this tick."""
        router = self.router
        slots = self.slots
        for slot in slots:
            running, waiting, usage = slot.instance.scrape()
            router.update_scrape(
                slot.endpoint_id, running=running, queued=waiting, kv_usage=usage, now=now
            )
        for lease_id, source, target in router.tick(now=now):
            request_id = self._lease_request.get(lease_id)
            if request_id is None or not router.move(lease_id, target=target, now=now):
                continue
            if slots[self._slot_of[source]].instance.withdraw(request_id):
                self.rebalance_moves += 1
                target_index = self._slot_of[target]
                slots[target_index].instance.submit(self._requests_by_id[request_id])
                self._wake(target_index, now)
            else:
                # The engine admitted it meanwhile: the lease goes back where the request is.
                router.move(lease_id, target=source, now=now)
        if not self._draining:
            self.load_times.append(now)
            self.load_rows.append(
                np.fromiter((s.instance.load for s in slots), dtype=np.int32, count=len(slots))
            )
            if self._schedule:
                self.member_loads.append(
                    np.fromiter((slots[i].instance.load for i in self._members), dtype=np.int32)
                )

    # -- disaggregated prefill/decode; none of this runs in a unified pool -------------------

    def _init_pd(self) -> None:
        self._pd: PdFlow | None = None
        self._pd_router: PdRouter | None = None
        split = self.config.pd
        if split is not None:
            if not isinstance(self.router, PdRouter):
                raise TypeError("a disaggregated pool needs a router with prefill_done")
            self._pd = PdFlow(
                profile=self.config.profile, block_size=self.config.block_size, split=split
            )
            self._pd_router = self.router

    def _pd_step_ended(self, slot_index: int, result: StepResult, now: float) -> StepResult:
        """Prefills finished on a prefill instance: record their hit, tell the router, and
        send their KV to the decode instance."""
        pd, pd_router = self._pd, self._pd_router
        assert pd is not None and pd_router is not None
        result, done = pd.step_ended(slot_index, result, now=now)
        for prefill in done:
            self.hit_of[int(prefill.request_id)] = prefill.cached_tokens
            pd_router.prefill_done(self._leases[prefill.request_id], now=now)
            decode_cache = self.slots[pd.decode_index(prefill.request_id)].instance.cache
            decode_index, arrives_at, transfer_id = pd.start_transfer(
                prefill, decode_cache=decode_cache, now=now
            )
            self._push(arrives_at, _KV_ARRIVES, decode_index, transfer_id)
        return result

    def _kv_arrives(self, transfer_id: int, now: float) -> None:
        assert self._pd is not None
        decode_index, request = self._pd.arrived(transfer_id)
        self.slots[decode_index].instance.submit(request)
        self._wake(decode_index, now)

    # -- membership changes (elastic scaling); none of this runs without a schedule ----------

    def _init_membership(self, membership: Sequence[MembershipEvent]) -> None:
        self._schedule = tuple(sorted(membership, key=lambda event: event.at_s))
        self._elastic: ElasticRouter | None = None
        if self._schedule:
            if not isinstance(self.router, ElasticRouter):
                raise TypeError("a membership schedule needs a router with set_endpoints/drain")
            self._elastic = self.router
        # Slot indexes of the router's members (draining ones included) in join order.
        self._members: list[int] = list(range(len(self.slots)))
        self._leaving_since: dict[int, float] = {}
        self.membership_log: list[MembershipRecord] = []
        # Per scrape tick, the members' loads (the load CV of an elastic run is over members).
        self.member_loads: list[npt.NDArray[np.int32]] = []
        self.failed_requests = 0
        for event_index, event in enumerate(self._schedule):
            self._push(event.at_s, _MEMBERSHIP, event_index, 0)

    def _member_ids(self) -> tuple[str, ...]:
        return tuple(self.slots[index].endpoint_id for index in self._members)

    def _sync_router(self, now: float) -> None:
        assert self._elastic is not None
        self._elastic.set_endpoints(
            tuple(self._endpoints_by_id[e] for e in self._member_ids()), now=now
        )

    def _change_membership(self, event: MembershipEvent, now: float) -> None:
        assert self._elastic is not None
        before = self._member_ids()
        added: list[str] = []
        for _ in range(event.add):
            index = len(self.slots)
            endpoint = Endpoint(id=f"sim-{index:03d}", address=f"sim://{index}")
            self._endpoints_by_id[endpoint.id] = endpoint
            self.slots.append(
                _Slot(
                    endpoint_id=endpoint.id,
                    instance=Instance(config=self._instance_config, cost=self._cost),
                )
            )
            self._slot_of[endpoint.id] = index
            self._members.append(index)
            added.append(endpoint.id)
        if added:
            self._sync_router(now)
        routable = [index for index in self._members if index not in self._leaving_since]
        # Never the last routable one; all leave routing before any request is replanned.
        leaving = routable[len(routable) - min(event.remove, len(routable) - 1) :]
        for index in leaving:
            self._leaving_since[index] = now
            self._push(now + event.drain_deadline_s, _DRAIN_DEADLINE, index, 0)
            self._elastic.drain(self.slots[index].endpoint_id, now=now)
        moved = left = 0
        for index in leaving:
            source_moved, source_left = self._move_queued_off(index, now)
            moved += source_moved
            left += source_left
        self.membership_log.append(
            MembershipRecord(
                kind="change",
                at_s=now,
                members_before=before,
                members_after=tuple(
                    self.slots[index].endpoint_id
                    for index in self._members
                    if index not in self._leaving_since
                ),
                added=tuple(added),
                drained=tuple(self.slots[index].endpoint_id for index in leaving),
                queued_moved=moved,
                queued_left=left,
            )
        )
        for index in leaving:
            self._remove_if_empty(index, now)

    def _move_queued_off(self, index: int, now: float) -> tuple[int, int]:
        """Withdraw the requests still queued on a draining instance and resubmit them where
        the router's drain plan says; (moved, left where they are)."""
        assert self._elastic is not None
        source = self.slots[index]
        moved = left = 0
        for lease_id, _from, target in self._elastic.plan_drain_moves(source.endpoint_id, now=now):
            request_id = self._lease_request.get(lease_id)
            if request_id is None or not source.instance.withdraw(request_id):
                left += 1  # admitted meanwhile: it finishes where it is
                continue
            if not self._elastic.move_drained(lease_id, target=target, now=now):
                source.instance.submit(self._requests_by_id[request_id])
                left += 1
                continue
            moved += 1
            target_index = self._slot_of[target]
            self.slots[target_index].instance.submit(self._requests_by_id[request_id])
            self._wake(target_index, now)
        return moved, left

    def _remove_if_empty(self, index: int, now: float) -> None:
        slot = self.slots[index]
        if not slot.busy and not slot.instance.busy:
            self._remove_leaving(index, now)

    def _remove_leaving(self, index: int, now: float) -> None:
        """Take a drained instance out; what it still holds (deadline passed) fails."""
        before = self._member_ids()
        slot = self.slots[index]
        lost = slot.instance.load
        self.failed_requests += lost
        del self._leaving_since[index]
        self._members.remove(index)
        slot.version += 1  # its pending step, if any, never ends
        slot.busy = False
        slot.run = slot.pending = None
        self._sync_router(now)
        self.membership_log.append(
            MembershipRecord(
                kind="removed",
                at_s=now,
                members_before=before,
                members_after=self._member_ids(),
                drained=(slot.endpoint_id,),
                failed_requests=lost,
            )
        )

    # -- the report --------------------------------------------------------------------------

    def _load_samples(self) -> tuple[npt.NDArray[np.int32], float]:
        """Per-tick instance loads (one row per tick) and the load coefficient of variation."""
        if self._schedule:
            width = len(self.slots)
            loads = np.zeros((len(self.load_rows), width), np.int32)
            for row, values in enumerate(self.load_rows):
                loads[row, : values.shape[0]] = values
            return loads, _members_load_cv(self.member_loads)
        loads = (
            np.vstack(self.load_rows)
            if self.load_rows
            else np.zeros((0, self.config.instances), np.int32)
        )
        means = loads.mean(axis=1) if loads.size else np.zeros(0)
        busy_rows = means > 0
        load_cv = (
            float(np.mean(loads[busy_rows].std(axis=1) / means[busy_rows]))
            if busy_rows.any()
            else 0.0
        )
        return loads, load_cv

    def result(self, *, started: float) -> SimulationResult:
        """The metrics of the run (module docstring), after the warm-up share of requests;
        `started` is the wall clock (perf_counter) at the start."""
        config = self.config
        total = len(self.arrival_of)
        warmup = int(total * config.warmup_fraction)
        ttft = np.asarray(self.ttft_of[warmup:], dtype=np.float64)
        predicted = np.asarray(self.predicted_of[warmup:], dtype=np.float64)
        # How well the policy's TTFT prediction matched (policies that predict nothing say 0).
        predicting = predicted > 0
        missed = predicting & (predicted <= config.ttft_slo_s) & (ttft > config.ttft_slo_s)
        e2e = np.asarray(self.e2e_of[warmup:], dtype=np.float64)
        outputs = np.asarray(self.output_of[warmup:], dtype=np.float64)
        decoding = outputs > 1
        tpot = (e2e[decoding] - ttft[decoding]) / (outputs[decoding] - 1)
        prompts = np.asarray(self.prompt_of[warmup:], dtype=np.float64)
        hits = np.asarray(self.hit_of[warmup:], dtype=np.float64)
        measured = int(ttft.size)
        loads, load_cv = self._load_samples()
        counters = self.router.counters()
        prompt_total = float(prompts.sum()) or 1.0
        arrivals = self.arrival_of
        keep = config.keep_samples
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
            pd=self._pd.metrics() if self._pd is not None else {},
            slo_attainment=float(np.mean(ttft <= config.ttft_slo_s)) if measured else math.nan,
            cache_hit_rate=float(hits.sum()) / prompt_total,
            ideal_cache_hit_rate=float(sum(self.ideal_of[warmup:])) / prompt_total,
            unbounded_cache_hit_rate=float(sum(self.unbounded_of[warmup:])) / prompt_total,
            load_cv=load_cv,
            ttft_prediction_error_p50_s=(
                float(np.median(ttft[predicting] - predicted[predicting]))
                if predicting.any()
                else math.nan
            ),
            ttft_prediction_abs_error_ratio_p50=(
                float(
                    np.median(
                        np.abs(predicted[predicting] - ttft[predicting])
                        / np.maximum(ttft[predicting], 1e-9)
                    )
                )
                if predicting.any()
                else math.nan
            ),
            slo_misses_predicted_ok=float(missed.sum() / max(1, predicting.sum())),
            slo_switches=counters.get(
                "slo_switches", self.reasons.get(DecisionReason.SLO_SWITCH.value, 0)
            ),
            rebalance_moves=self.rebalance_moves,
            preemptions=sum(s.instance.metrics().preemptions for s in self.slots),
            rate_rps=total / arrivals[-1] if total > 1 and arrivals[-1] > 0 else math.nan,
            sim_duration_s=max(arrivals[-1] if arrivals else 0.0, 0.0),
            wall_s=time.perf_counter() - started,
            decisions=self.reasons,
            ttfts_s=ttft if keep else None,
            load_times_s=np.asarray(self.load_times) if keep else None,
            load_samples=loads if keep else None,
            membership_log=tuple(self.membership_log),
            failed_requests=self.failed_requests,
            unfinished_requests=int(np.isnan(np.asarray(self.e2e_of, dtype=np.float64)).sum()),
            arrivals_s=np.asarray(arrivals[warmup:]) if keep else None,
            prompt_tokens=np.asarray(self.prompt_of[warmup:], np.int64) if keep else None,
            cached_tokens=np.asarray(self.hit_of[warmup:], np.int64) if keep else None,
            instances_at_load_times=(
                np.asarray([row.size for row in self.member_loads], np.int32)
                if keep and self._schedule
                else None
            ),
        )
