"""The scheduler's Prometheus metrics and its debug pages, served on their own port.

One `CollectorRegistry` per process, built in the entry point and passed in (no globals).
Figures the core already counts (decisions by reason, SLO switches, leases, per-endpoint load,
prefix index size) are read from it when Prometheus scrapes, so a Pick pays only for the latency
histogram. Names live in the `twinroute_scheduler_` namespace and follow the field where a name
exists: llm-d's `inference_extension_scheduler_e2e_duration_seconds` becomes
`twinroute_scheduler_pick_duration_seconds`, `inference_pool_average_kv_cache_utilization`
and `inference_pool_average_queue_size` become per-endpoint `..._endpoint_kv_cache_utilization`
and `..._endpoint_queue_size`, vLLM's `time_to_first_token_seconds` becomes
`..._observed_ttft_seconds` (with `..._predicted_ttft_seconds` beside it).

`GET /debug/decisions` answers "why did this request go there": the newest decisions with
reason, predicted TTFT and every candidate's score (`?format=json`, `?limit=N`,
`?request_id=ID`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twinroute.scheduler.cache_lookup import CacheLookup
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.kv_events import KvState
from twinroute.scheduler.leases import Lease
from twinroute.scheduler.ring import DualHashRing
from twinroute.scheduler.scrape import EngineStats, ScrapeListener
from twinroute.scheduler.tokens import TokenGuard
from twinroute.scheduler.types import DecisionRecord, Endpoint
from twinroute.scheduler.vllm_block_memo import MemoizedBlockHasher

from twinroute.lean_metrics import LeanCounter, LeanHistogram

NAMESPACE = "twinroute_scheduler"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PICK_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01,
    0.025, 0.05, 0.1,
)  # fmt: skip
_TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 60.0,
)  # fmt: skip
# |observed - predicted| / observed: fine below 0.5, where a prediction is good enough to switch
# on; a median over any span of time is `histogram_quantile` of two scrapes' difference.
_RELATIVE_ERROR_BUCKETS = (
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip


class _CoreCollector(Collector):
    """Reads the core's own counters and per-endpoint load at scrape time."""

    def __init__(self, core: SchedulerCore, clock: Callable[[], float]) -> None:
        self._core = core
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        core = self._core
        now = self._clock()
        decisions = CounterMetricFamily(
            f"{NAMESPACE}_decisions",
            "Routing decisions by policy and reason.",
            labels=["policy", "reason"],
        )
        policy = core.policy.name
        for reason, count in sorted(core.history.by_reason.items()):
            decisions.add_metric([policy, reason.value], count)
        yield decisions
        yield CounterMetricFamily(
            f"{NAMESPACE}_slo_switches",
            "Decisions that left the cache-affinity candidate because it would break the SLO.",
            value=core.history.slo_switches,
        )
        placements = CounterMetricFamily(
            f"{NAMESPACE}_pd_placements",
            "Picks in a prefill/decode pool by how they were placed (disaggregated, "
            "skipped_short: the decode endpoint prefills a short uncached part itself, "
            "no_prefill: no routable prefill endpoint).",
            labels=["mode"],
        )
        for mode, count in sorted(core.pd_picks.items()):
            placements.add_metric([mode.value], count)
        yield placements
        yield CounterMetricFamily(
            f"{NAMESPACE}_leases_expired",
            "Leases closed by their time-to-live because no Complete came.",
            value=core.leases.expired_total,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_leases_open", "Leases opened by Pick and not yet closed.",
            value=len(core.leases),
        )  # fmt: skip
        yield CounterMetricFamily(
            f"{NAMESPACE}_ring_membership_changes",
            "Endpoint set changes applied to the rings (joins and leaves, batched).",
            value=core.membership_changes,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_prefix_index_blocks",
            "Prompt blocks the prefix index believes cached, over all endpoints.",
            value=core.prefix_index.size(),
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_ready_endpoints", "Endpoints currently routable.",
            value=len(core.routable()),
        )  # fmt: skip
        families = {
            "in_flight": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_in_flight",
                "Leases open on the endpoint.", labels=["endpoint"],
            ),
            "pending": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_pending_prefill_tokens",
                "Prompt tokens the scheduler estimates are not yet prefilled there.",
                labels=["endpoint"],
            ),
            "queued": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_queue_size",
                "vllm:num_requests_waiting at the last fresh scrape.", labels=["endpoint"],
            ),
            "running": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_running",
                "vllm:num_requests_running at the last fresh scrape.", labels=["endpoint"],
            ),
            "kv": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_kv_cache_utilization",
                "vllm:kv_cache_usage_perc at the last fresh scrape (0..1).", labels=["endpoint"],
            ),
            "routable": GaugeMetricFamily(
                f"{NAMESPACE}_endpoint_routable",
                "1 when the endpoint is in the rings (not draining, not failing).",
                labels=["endpoint"],
            ),
        }  # fmt: skip
        routable = {endpoint.id for endpoint in core.routable()}
        for endpoint_id in sorted(core.endpoints):
            load = core.load(endpoint_id, now=now)
            families["in_flight"].add_metric([endpoint_id], load.in_flight)
            families["pending"].add_metric([endpoint_id], load.pending_prefill_tokens)
            families["routable"].add_metric([endpoint_id], float(endpoint_id in routable))
            # Unknown figures are left out, never reported as zero.
            if load.queued is not None:
                families["queued"].add_metric([endpoint_id], load.queued)
            if load.running is not None:
                families["running"].add_metric([endpoint_id], load.running)
            if load.kv_usage is not None:
                families["kv"].add_metric([endpoint_id], load.kv_usage)
        yield from families.values()
        if core.calibration is not None:
            yield from _calibration_families(core)
        if core.kv_events is not None:
            yield from _kv_event_families(core)
        if core.peer_loads is not None:
            yield from _replica_families(core, now=now)


def _replica_families(core: SchedulerCore, *, now: float) -> Iterator[Metric]:
    """Active-active replicas: the peers heard from, how old their word is, and whether this
    replica's ring membership agrees with theirs."""
    peers = core.peer_loads
    assert peers is not None
    shares = peers.shares()
    counts = GaugeMetricFamily(
        f"{NAMESPACE}_peers",
        "Scheduler replicas heard from, by whether their last load share still counts.",
        labels=["state"],
    )
    fresh = sum(now - s.received_at < peers.stale_after_s for s in shares)
    counts.add_metric(["fresh"], fresh)
    counts.add_metric(["stale"], len(shares) - fresh)
    yield counts
    age = GaugeMetricFamily(
        f"{NAMESPACE}_peer_share_age_seconds",
        "Seconds since each peer's last load share arrived (the load exchange's age).",
        labels=["peer"],
    )
    lag = GaugeMetricFamily(
        f"{NAMESPACE}_peer_lag_seconds",
        "Each peer's last share: arrival wall clock minus its send time (transit and skew).",
        labels=["peer"],
    )
    for share in sorted(shares, key=lambda s: s.replica_id):
        age.add_metric([share.replica_id], now - share.received_at)
        lag.add_metric([share.replica_id], share.lag_s)
    yield age
    yield lag
    replica = core.replica
    if replica is not None:
        info = GaugeMetricFamily(
            f"{NAMESPACE}_membership_info",
            "This replica's ring membership: its digest (equal on replicas that agree).",
            labels=["digest"],
        )
        info.add_metric([replica.digest], 1.0)
        yield info
        yield GaugeMetricFamily(
            f"{NAMESPACE}_membership_changed_timestamp_seconds",
            "Wall clock when this replica's ring membership last changed (its epoch).",
            value=replica.changed_at_unix_s,
        )
        behind = replica.peers.behind_peer(
            digest=replica.digest, changed_at_unix_s=replica.changed_at_unix_s, now=now
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_membership_behind",
            "1 while a peer has newer ring membership than this replica (picks are refused "
            "for at most the grace period).",
            value=float(behind is not None),
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_routed_while_behind",
            "Picks answered past the grace period while a peer's membership was newer.",
            value=replica.routed_while_behind,
        )


def _kv_event_families(core: SchedulerCore) -> Iterator[Metric]:
    """What the engines' KV events told the scheduler, and how much routing ran on it."""
    events = core.kv_events
    assert events is not None
    counters = events.counters
    applied = CounterMetricFamily(
        f"{NAMESPACE}_kv_events_applied",
        "KV-cache events from the engines applied to the index, by type.",
        labels=["type"],
    )
    for kind, count in sorted(counters.events_applied.items()):
        applied.add_metric([kind], count)
    yield applied
    skipped = CounterMetricFamily(
        f"{NAMESPACE}_kv_events_skipped",
        "KV-cache events left out (an unknown type, an offload tier, a partial-history group).",
        labels=["why"],
    )
    for why, count in sorted(counters.events_skipped.items()):
        skipped.add_metric([why], count)
    yield skipped
    yield CounterMetricFamily(
        f"{NAMESPACE}_kv_event_gaps",
        "Missed KV-event batches (sequence gaps, undecodable batches): that engine's index "
        "is not trusted until it is whole again, and lookups fall back to the approximate one.",
        value=counters.gaps,
    )
    state = GaugeMetricFamily(
        f"{NAMESPACE}_kv_index_state",
        "1 for the state of each engine's KV-event index (live: lookups are exact; unknown, "
        "gap, silent: the approximate prefix index answers).",
        labels=["endpoint", "state"],
    )
    blocks = GaugeMetricFamily(
        f"{NAMESPACE}_kv_index_blocks",
        "Blocks the engine's KV events say it holds.",
        labels=["endpoint"],
    )
    states = events.states()
    for endpoint_id in sorted(core.endpoints):
        current = states.get(endpoint_id, KvState.UNKNOWN)
        for kind in KvState:
            state.add_metric([endpoint_id, kind.value], float(current is kind))
        blocks.add_metric([endpoint_id], events.blocks_held(endpoint_id))
    yield state
    yield blocks
    lookup = core.cache_lookup
    if isinstance(lookup, CacheLookup):
        lookups = CounterMetricFamily(
            f"{NAMESPACE}_prefix_lookups",
            "Cache lookups of a prompt on an endpoint by what answered: precise (the engine's "
            "KV events) or approximate (the scheduler's record of its own decisions).",
            labels=["source"],
        )
        for source, count in sorted(lookup.lookups.items()):
            lookups.add_metric([source], count)
        yield lookups
        agreement = CounterMetricFamily(
            f"{NAMESPACE}_prefix_record_checks",
            "Picks where the engine's KV events could say what the chosen endpoint holds, by "
            "how the approximate record's guess compared (same; over: it believed more cached; "
            "under: less).",
            labels=["verdict"],
        )
        for verdict, count in sorted(lookup.agreement.items()):
            agreement.add_metric([verdict], count)
        yield agreement
        yield CounterMetricFamily(
            f"{NAMESPACE}_prefix_record_error_tokens",
            "Prompt tokens by which the approximate record's guess missed the engine's own "
            "answer, summed over those picks.",
            value=lookup.disagreement_tokens,
        )


def _calibration_families(core: SchedulerCore) -> Iterator[Metric]:
    """The fitted cost models and how well they predict (`scheduler/calibration.py`)."""
    calibration = core.calibration
    assert calibration is not None
    error = GaugeMetricFamily(
        f"{NAMESPACE}_ttft_prediction_error_ratio",
        "Median absolute error of the predicted TTFT relative to the TTFT observed (first "
        'token reported), over the last 512 first tokens; endpoint="" is the whole pool.',
        labels=["endpoint"],
    )
    scale = GaugeMetricFamily(
        f"{NAMESPACE}_cost_time_scale",
        "How many times slower than the cost profile the endpoint's fitted model is "
        '(endpoint="" is the pool\'s fit, used for endpoints not yet observed).',
        labels=["endpoint"],
    )
    overhead = GaugeMetricFamily(
        f"{NAMESPACE}_cost_overhead_seconds",
        "Fixed part of the endpoint's fitted TTFT (router hop, HTTP, scheduling, one step).",
        labels=["endpoint"],
    )
    observations = CounterMetricFamily(
        f"{NAMESPACE}_cost_observations",
        "First tokens the endpoint's cost model was fitted with.",
        labels=["endpoint"],
    )
    for endpoint_id, (overhead_s, time_scale, count) in sorted(calibration.fitted().items()):
        if endpoint_id and endpoint_id not in core.endpoints:
            continue
        ratio = calibration.error_ratio(endpoint_id or None)
        if ratio is not None:
            error.add_metric([endpoint_id], ratio)
        scale.add_metric([endpoint_id], time_scale)
        overhead.add_metric([endpoint_id], overhead_s)
        observations.add_metric([endpoint_id], count)
    yield from (error, scale, overhead, observations)


class _BlockMemoCollector(Collector):
    """How many of vLLM's block digests the memo answered and how many were hashed."""

    def __init__(self, hasher: MemoizedBlockHasher) -> None:
        self._hasher = hasher

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{NAMESPACE}_engine_block_digests",
            "vLLM block digests of token-id prompts, by where they came from (memo: a prefix "
            "seen before; hashed: computed).",
            labels=["source"],
        )
        family.add_metric(["memo"], self._hasher.reused_blocks)
        family.add_metric(["hashed"], self._hasher.hashed_blocks)
        yield family
        yield GaugeMetricFamily(
            f"{NAMESPACE}_engine_block_digest_memo_blocks",
            "Block digests the memo holds.",
            value=len(self._hasher),
        )


def register_block_memo_metrics(registry: CollectorRegistry, hasher: MemoizedBlockHasher) -> None:
    registry.register(_BlockMemoCollector(hasher))


class RingRemapProbe:
    """Measures how much of the key space a membership change moves.

    It keeps its own `DualHashRing` with the policy's ring settings and a fixed sample of probe
    keys; after a change, the share of probes whose first candidate moved is what a hash-ring
    policy loses in cache affinity (ideal: about 2/(N+1) on a join).
    """

    def __init__(self, *, virtual_nodes: int, probes: int = 4096, seed: int = 0) -> None:
        self._ring = DualHashRing(virtual_nodes=virtual_nodes)
        generator = np.random.default_rng(seed)
        self._keys = generator.integers(0, 2**63, size=probes, dtype=np.uint64)

    def _owners(self) -> list[str]:
        if len(self._ring) == 0:
            return []
        first, _ = self._ring.candidates_many(self._keys)
        members = self._ring.sorted_members
        return [members[i] for i in first.tolist()]

    def sync(self, endpoint_ids: Iterable[str]) -> float:
        """Apply the new membership; the share of probe keys whose first candidate moved."""
        before = self._owners()
        if not self._ring.sync(endpoint_ids):
            return 0.0
        after = self._owners()
        if not before or not after:
            return 1.0 if before or after else 0.0
        moved = sum(1 for old, new in zip(before, after, strict=True) if old != new)
        return moved / len(after)


class SchedulerTelemetry(ScrapeListener):
    """Everything the scheduler reports; one per process, on the registry it is given."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        core: SchedulerCore,
        clock: Callable[[], float],
        virtual_nodes: int = 256,
    ) -> None:
        self.registry = registry
        self._policy = core.policy.name
        registry.register(_CoreCollector(core, clock))
        # What every request updates is kept lean (`twinroute/lean_metrics.py`: no lock, no
        # per-bucket calls); the rare events use prometheus-client's own.
        self.pick_duration = LeanHistogram(
            f"{NAMESPACE}_pick_duration_seconds",
            "Time to decide one Pick (keys, policy, lease), as served.",
            buckets=_PICK_BUCKETS,
            registry=registry,
        )
        self.pick_errors = Counter(
            f"{NAMESPACE}_pick_errors",
            "Picks refused, by kind (invalid, unknown_model, no_endpoint, cancelled).",
            ["kind"],
            registry=registry,
        )
        self.cancels = Counter(
            f"{NAMESPACE}_picks_cancelled",
            "Picks their caller gave up on, by what the cancel found (closed: the lease the "
            "Pick opened was closed; early: the Pick had not come yet and will be refused).",
            ["found"],
            registry=registry,
        )
        self.refused_calls = Counter(
            f"{NAMESPACE}_calls_refused",
            "Calls refused for their credentials, by RPC or path and why (missing_token, "
            "wrong_token).",
            ["call", "why"],
            registry=registry,
        )
        self._add_prediction_metrics(registry)
        self.completions = LeanCounter(
            f"{NAMESPACE}_completions",
            "Complete calls by outcome (unknown = a lease of this process already closed or "
            "expired; foreign = a lease id this process never issued, e.g. from before a "
            "restart, ignored).",
            ["outcome"],
            registry=registry,
        )
        self.progress_reports = LeanCounter(
            f"{NAMESPACE}_progress_reports",
            "Progress calls by event (prefill_done, first_token, prefill_fell_back) and whether "
            "the lease knew it.",
            ["event", "known"],
            registry=registry,
        )
        self.scrape_errors = Counter(
            f"{NAMESPACE}_scrape_errors",
            "Failed scrapes of engine /metrics or /health, by kind.",
            ["endpoint", "kind"],
            registry=registry,
        )
        # Which labelled series exist per endpoint, to drop them when the endpoint leaves.
        self._scrape_error_kinds: dict[str, set[str]] = {}
        self._hit_rate_endpoints: set[str] = set()
        self.engine_prefix_hit_rate = Gauge(
            f"{NAMESPACE}_endpoint_prefix_cache_hit_rate",
            "vllm:prefix_cache_hits / vllm:prefix_cache_queries since the engine started.",
            ["endpoint"],
            registry=registry,
        )
        self.health_changes = Counter(
            f"{NAMESPACE}_endpoint_health_changes",
            "Endpoints leaving (unhealthy) or rejoining (healthy) the rings.",
            ["state"],
            registry=registry,
        )
        self.keys_remapped = Gauge(
            f"{NAMESPACE}_ring_keys_remapped_ratio",
            "Share of the key space whose first candidate moved at the last membership change.",
            registry=registry,
        )
        self.keys_remapped_sum = Counter(
            f"{NAMESPACE}_ring_keys_remapped",
            "Sum over membership changes of the key-space share remapped.",
            registry=registry,
        )
        self._probe = RingRemapProbe(virtual_nodes=virtual_nodes)
        self._observed = self.observed_ttft.labels(self._policy)
        self._predicted = self.predicted_ttft.labels(self._policy)
        self._error = self.ttft_error.labels(self._policy)
        # By what the pick found: the fit learns from first tokens of requests that found
        # their engine idle, so their error is the fit's; the others' is the queue estimate's.
        self._relative_error = {
            found_idle: self.ttft_relative_error.labels(self._policy, at_pick)
            for found_idle, at_pick in ((True, "idle"), (False, "busy"))
        }
        self._under = self.ttft_underestimated.labels(self._policy)

    def _add_prediction_metrics(self, registry: CollectorRegistry) -> None:
        """How the TTFT predictions made at pick time compare with what the routers saw."""
        self.predicted_ttft = LeanHistogram(
            f"{NAMESPACE}_predicted_ttft_seconds",
            "The scheduler's TTFT prediction for completed requests.",
            ["policy"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.observed_ttft = LeanHistogram(
            f"{NAMESPACE}_observed_ttft_seconds",
            "TTFT the router observed for completed requests.",
            ["policy"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.ttft_error = LeanHistogram(
            f"{NAMESPACE}_ttft_prediction_error_seconds",
            "Absolute difference between observed and predicted TTFT.",
            ["policy"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.ttft_relative_error = LeanHistogram(
            f"{NAMESPACE}_ttft_prediction_relative_error",
            "|observed - predicted| / observed TTFT of completed requests, the prediction "
            "made at the pick (the ratio gauge is the median of the last ones; this one can be "
            "read over any span of time), by whether the request found its engine idle (none "
            "of the scheduler's requests in flight there) or busy.",
            ["policy", "engine_at_pick"],
            buckets=_RELATIVE_ERROR_BUCKETS,
            registry=registry,
        )
        self.ttft_underestimated = LeanCounter(
            f"{NAMESPACE}_ttft_underestimated",
            "Completions whose observed TTFT exceeded the prediction.",
            ["policy"],
            registry=registry,
        )

    def observe_pick(self, seconds: float) -> None:
        self.pick_duration.observe(seconds)

    def pick_refused(self, kind: str) -> None:
        self.pick_errors.labels(kind).inc()

    def observe_cancel(self, *, closed: bool) -> None:
        self.cancels.labels("closed" if closed else "early").inc()

    def observe_complete(
        self,
        lease: Lease | None,
        *,
        outcome: str,
        observed_ttft_s: float | None,
        foreign: bool = False,
    ) -> None:
        if lease is None:
            outcome = "foreign" if foreign else "unknown"
        self.completions.labels(outcome).inc()
        if lease is None or observed_ttft_s is None or outcome != "success":
            return
        self._observed.observe(observed_ttft_s)
        self._predicted.observe(lease.predicted_ttft_s)
        self._error.observe(abs(observed_ttft_s - lease.predicted_ttft_s))
        if observed_ttft_s > 0:
            self._relative_error[lease.found_idle].observe(
                abs(observed_ttft_s - lease.predicted_ttft_s) / observed_ttft_s
            )
        if observed_ttft_s > lease.predicted_ttft_s:
            self._under.inc()

    def observe_progress(self, event: str, *, known: bool) -> None:
        self.progress_reports.labels(event, "true" if known else "false").inc()

    def membership_changed(self, endpoints: Sequence[Endpoint]) -> None:
        ratio = self._probe.sync(endpoint.id for endpoint in endpoints)
        self.keys_remapped.set(ratio)
        self.keys_remapped_sum.inc(ratio)
        # Series of endpoints that left go with them: pods come and go for the life of the
        # scheduler, and their label values would pile up.
        current = {endpoint.id for endpoint in endpoints}
        for endpoint_id in set(self._scrape_error_kinds) - current:
            for kind in self._scrape_error_kinds.pop(endpoint_id):
                self.scrape_errors.remove(endpoint_id, kind)
        for endpoint_id in self._hit_rate_endpoints - current:
            self.engine_prefix_hit_rate.remove(endpoint_id)
        self._hit_rate_endpoints &= current

    # ScrapeListener
    def scraped(self, endpoint_id: str, stats: EngineStats) -> None:
        rate = stats.prefix_cache_hit_rate
        if rate is not None:
            self.engine_prefix_hit_rate.labels(endpoint_id).set(rate)
            self._hit_rate_endpoints.add(endpoint_id)

    def scrape_failed(self, endpoint_id: str, kind: str) -> None:
        self.scrape_errors.labels(endpoint_id, kind).inc()
        self._scrape_error_kinds.setdefault(endpoint_id, set()).add(kind)

    def health_changed(self, endpoint_id: str, *, healthy: bool) -> None:
        self.health_changes.labels("healthy" if healthy else "unhealthy").inc()

    def refused_calls_counter(self) -> Callable[[str, str], None]:
        """Counts one refused call: (call, why)."""
        return lambda call, why: self.refused_calls.labels(call, why).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- debug pages ---------------------------------------------------------------------------


def decision_to_json(record: DecisionRecord) -> dict[str, Any]:
    decision = record.decision
    return {
        "request_id": record.request_id,
        "lease_id": record.lease_id,
        "decided_at": record.decided_at,
        "policy": decision.policy,
        "endpoint_id": decision.endpoint_id,
        "prefill_endpoint_id": decision.prefill_endpoint_id,
        "reason": decision.reason.value,
        "predicted_ttft_s": decision.predicted_ttft_s,
        "expected_cached_blocks": decision.expected_cached_blocks,
        "prompt_blocks": record.prompt_blocks,
        "prompt_tokens": record.prompt_tokens,
        "key_depth": decision.key_depth,
        "detail": decision.detail,
        "candidates": [
            {
                "endpoint_id": c.endpoint_id,
                "score": c.score,
                "predicted_ttft_s": c.predicted_ttft_s,
                "expected_cached_blocks": c.expected_cached_blocks,
                "pending_prefill_tokens": c.pending_prefill_tokens,
                "role": c.role,
            }
            for c in decision.candidates
        ],
    }


def render_decisions_html(records: Sequence[DecisionRecord]) -> str:
    rows = []
    for record in records:
        d = record.decision
        candidates = "<br>".join(
            html.escape(
                f"{c.endpoint_id} [{c.role}] ttft={c.predicted_ttft_s:.3f}s "
                f"cached={c.expected_cached_blocks} pending={c.pending_prefill_tokens}"
            )
            for c in d.candidates
        )
        cells = (
            f"{record.decided_at:.3f}", record.request_id, record.lease_id, d.policy,
            d.endpoint_id, d.reason.value, f"{d.predicted_ttft_s:.3f}",
            f"{d.expected_cached_blocks}/{record.prompt_blocks}", d.detail,
        )  # fmt: skip
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + f"<td>{candidates}</td></tr>"
        )  # fmt: skip
    header = (
        "decided at (unix s)", "request", "lease", "policy", "endpoint", "reason",
        "predicted TTFT (s)", "cached/prompt blocks", "detail", "candidates (best first)",
    )  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>twinroute decisions</title>"
        "<style>td,th{border:1px solid #ccc;padding:2px 6px;font:12px monospace;"
        "vertical-align:top}</style></head><body><h1>Recent decisions (newest first)</h1>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
        + "".join(rows) + "</table></body></html>"
    )  # fmt: skip


DecisionSource = Callable[[int, str | None], list[DecisionRecord]]


def build_metrics_app(
    *, telemetry: SchedulerTelemetry, decisions: DecisionSource, guard: TokenGuard | None = None
) -> web.Application:
    """`/metrics` (Prometheus text), `/debug/decisions` and `/healthz`. With a `guard` that
    requires a token, the decisions page (request ids, prompts' placement) needs it too;
    metrics and health stay open for scrapers and probes."""

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=telemetry.exposition())
        response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
        return response

    async def debug_decisions(request: web.Request) -> web.Response:
        if guard is not None and guard.required:
            why = guard.refusal(request.headers.get("Authorization", ""))
            if why is not None:
                guard.refused(request.path, why, peer=request.remote or "?")
                if why == "missing_token":
                    raise web.HTTPUnauthorized(
                        text="needs 'Authorization: Bearer <token>'",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                raise web.HTTPForbidden(text="the token is wrong")
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        if limit <= 0:
            raise web.HTTPBadRequest(text="limit must be positive")
        request_id = request.query.get("request_id") or None
        records = decisions(limit, request_id)
        if request.query.get("format") == "json":
            body = {"decisions": [decision_to_json(record) for record in records]}
            return web.Response(text=json.dumps(body), content_type="application/json")
        return web.Response(text=render_decisions_html(records), content_type="text/html")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/decisions", debug_decisions)
    app.router.add_get("/healthz", healthz)
    return app
