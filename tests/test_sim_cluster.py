"""The cluster event loop: timing, what the router learns and when, determinism.

The router here is a small recording round-robin written for the test: these tests are about
the simulator's bookkeeping, not about any policy (tests/test_sim_e2e.py runs the real ones).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from twinroute.scheduler.types import Decision, Endpoint, PromptKeys, RoutingRequest

from twinroute.simulator.cluster import ClusterConfig, SimulationResult, simulate
from twinroute.simulator.profiles import InstanceProfile
from twinroute.simulator.traces import SharedPrefixWorkload, TraceChunk, generate_shared_prefix
from twinroute.vocabulary import DecisionReason


class LinearCost:
    """Prefill at 10k tokens/s plus attention over the context; decode 10 ms + KV read."""

    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 0.002 + uncached_tokens / 10_000 + uncached_tokens * cached_tokens * 1e-10

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 0.010 + 1e-4 * batch_size + 1e-9 * kv_tokens


COST = LinearCost()
PROFILE = InstanceProfile(name="test", cost_profile="test", kv_capacity_tokens=200_000)


class RecordingRouter:
    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints
        self.turn = 0
        self.events: list[tuple[str, str, float]] = []
        self.scrapes: list[tuple[str, float, int, int]] = []

    def pick(self, request: RoutingRequest, *, now: float) -> tuple[str, Decision]:
        endpoint = self.endpoints[self.turn % len(self.endpoints)]
        self.turn += 1
        lease = f"lease-{request.request_id}"
        self.events.append(("pick", lease, now))
        return lease, Decision(
            endpoint_id=endpoint.id, reason=DecisionReason.ROUND_ROBIN, policy="test"
        )

    def first_token(self, lease_id: str, *, now: float) -> None:
        self.events.append(("first", lease_id, now))

    def complete(
        self, lease_id: str, *, now: float, observed_ttft_s: float, output_tokens: int
    ) -> None:
        self.events.append(("complete", lease_id, now))

    def update_scrape(
        self, endpoint_id: str, *, running: int, queued: int, kv_usage: float, now: float
    ) -> None:
        self.scrapes.append((endpoint_id, now, running, queued))

    def tick(self, *, now: float) -> list[tuple[str, str, str]]:
        return []

    def move(self, lease_id: str, *, target: str, now: float) -> bool:
        return False

    def counters(self) -> dict[str, int]:
        return {}


def _keys(block_ids: npt.NDArray[np.int64], prompt_tokens: int) -> PromptKeys:
    return PromptKeys(
        block_size=512, block_hashes=block_ids.astype(np.uint64), total_units=prompt_tokens
    )


def _chunk(rows: list[tuple[float, int, int, list[int]]]) -> TraceChunk:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r[3]) for r in rows])
    return TraceChunk(
        arrival_s=np.asarray([r[0] for r in rows], dtype=np.float64),
        prompt_tokens=np.asarray([r[1] for r in rows], dtype=np.int64),
        output_tokens=np.asarray([r[2] for r in rows], dtype=np.int64),
        block_offsets=offsets,
        block_ids=np.asarray([b for r in rows for b in r[3]], dtype=np.int64),
        block_size=512,
    )


def _simulate(
    chunks: list[TraceChunk], *, instances: int = 2, **config: object
) -> tuple[SimulationResult, list[RecordingRouter]]:
    routers: list[RecordingRouter] = []

    def factory(endpoints: tuple[Endpoint, ...]) -> RecordingRouter:
        routers.append(RecordingRouter(endpoints))
        return routers[-1]

    result = simulate(
        chunks,
        config=ClusterConfig(instances=instances, profile=PROFILE, **config),  # type: ignore[arg-type]
        router_factory=factory,
        keys_for=_keys,
        cost=COST,
        progress=None,
    )
    return result, routers


def test_lone_request_latency_is_the_cost_model() -> None:
    result, (router,) = _simulate([_chunk([(1.0, 3000, 4, list(range(6)))])])
    prefill = COST.prefill_time_s(uncached_tokens=3000, cached_tokens=0)
    decodes = sum(COST.decode_step_time_s(batch_size=1, kv_tokens=3000 + k) for k in (1, 2, 3))
    assert result.ttft_p50_s == pytest.approx(prefill)
    assert result.e2e_p50_s == pytest.approx(prefill + decodes)
    assert router.events == [
        ("pick", "lease-0", 1.0),
        ("first", "lease-0", pytest.approx(1.0 + prefill)),
        ("complete", "lease-0", pytest.approx(1.0 + prefill + decodes)),
    ]


def test_router_learns_engine_state_only_at_scrapes() -> None:
    rows = [(0.05 * k, 2000, 50, [1000 * k + j for j in range(4)]) for k in range(20)]
    _, (router,) = _simulate([_chunk(rows)], scrape_interval_s=0.25, scrape_phase=0.1)
    times = sorted({t for _, t, _, _ in router.scrapes})
    # Scrapes run on their own clock, and after the last arrival only while work is left.
    assert times[:4] == pytest.approx([0.1, 0.35, 0.6, 0.85])
    assert times == pytest.approx([0.1 + 0.25 * k for k in range(len(times))])
    assert len(times) > 4
    assert {e for e, _, _, _ in router.scrapes} == {"sim-000", "sim-001"}
    busy = [(r, q) for _, t, r, q in router.scrapes if t == pytest.approx(0.85)]
    assert sum(r + q for r, q in busy) > 0


def test_arrival_cuts_a_decode_run_at_the_next_step_boundary() -> None:
    # One long decode on a single instance, then a second request mid-run: it must start at
    # the first step boundary after it arrives, as a step-by-step engine would.
    rows = [(0.0, 600, 200, [1, 2]), (0.5, 600, 1, [7, 8])]
    result, (router,) = _simulate([_chunk(rows)], instances=1)
    first = dict((lease, t) for kind, lease, t in router.events if kind == "first")
    prefill = COST.prefill_time_s(uncached_tokens=600, cached_tokens=0)
    boundary = prefill
    generated = 1
    while boundary < 0.5:
        boundary += COST.decode_step_time_s(batch_size=1, kv_tokens=600 + generated)
        generated += 1
    # The step after the boundary carries the decode of the first and the whole second prompt.
    step = COST.prefill_time_s(uncached_tokens=600, cached_tokens=0) + COST.decode_step_time_s(
        batch_size=1, kv_tokens=600 + generated
    )
    assert first["lease-1"] == pytest.approx(boundary + step)
    assert result.requests == 2


def test_simulation_is_deterministic_and_streams_chunks() -> None:
    workload = SharedPrefixWorkload(requests=400, rate_rps=6.0, seed=5)
    whole = _simulate(list(generate_shared_prefix(workload, chunk_requests=1000)))[0]
    streamed = _simulate(list(generate_shared_prefix(workload, chunk_requests=37)))[0]
    a, b = whole.summary(), streamed.summary()
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b
    assert whole.requests == 400
    assert 0.0 < whole.cache_hit_rate <= whole.unbounded_cache_hit_rate


def test_warmup_leaves_early_requests_out() -> None:
    workload = SharedPrefixWorkload(requests=200, rate_rps=4.0, seed=2)
    result = _simulate(list(generate_shared_prefix(workload)), warmup_fraction=0.25)[0]
    assert result.requests == 200
    assert result.measured_requests == 150


class MovingRouter(RecordingRouter):
    """Sends everything to the first endpoint, then asks to move every lease to the second."""

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        super().__init__(endpoints)
        self.open: list[str] = []
        self.moved: list[str] = []

    def pick(self, request: RoutingRequest, *, now: float) -> tuple[str, Decision]:
        lease = f"lease-{request.request_id}"
        self.open.append(lease)
        return lease, Decision(
            endpoint_id=self.endpoints[0].id, reason=DecisionReason.HASH, policy="test"
        )

    def tick(self, *, now: float) -> list[tuple[str, str, str]]:
        return [(lease, "sim-000", "sim-001") for lease in self.open if lease not in self.moved]

    def move(self, lease_id: str, *, target: str, now: float) -> bool:
        if target == "sim-001":
            self.moved.append(lease_id)
        return True


def test_rebalancing_moves_only_requests_still_queued() -> None:
    # Ten long prompts arrive at once on one instance; at the first scrape only the first is
    # admitted, so the other nine can move to the idle instance.
    rows = [(0.0, 8192, 2, [100 * k + j for j in range(16)]) for k in range(10)]
    result = simulate(
        [_chunk(rows)],
        config=ClusterConfig(instances=2, profile=PROFILE, scrape_phase=0.01),
        router_factory=MovingRouter,
        keys_for=_keys,
        cost=COST,
        progress=None,
    )
    assert result.rebalance_moves == 9
    assert result.requests == 10 and not np.isnan(result.e2e_p90_s)
