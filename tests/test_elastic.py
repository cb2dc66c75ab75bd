"""Elastic scaling: drain moves queued requests (none lost), rings remap close to the ideal,
the simulator adds and removes instances mid-run, and `bench elastic` writes its report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100, CostModel
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import make_policy
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint, PromptKeys, RoutingRequest

from twinroute.bench import elastic, elastic_report
from twinroute.simulator.cluster import (
    ClusterConfig,
    MembershipEvent,
    SimulationResult,
    simulate,
)
from twinroute.simulator.profiles import InstanceProfile
from twinroute.simulator.routing import core_adapter_factory
from twinroute.simulator.traces import TraceChunk

SEED = namespace_seed(model="m")


def _endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(count)]


def _request(name: str, *, start: int, tokens: int = 8192) -> RoutingRequest:
    keys = keys_from_tokens(np.arange(start, start + tokens), block_size=16, seed=SEED)
    return RoutingRequest(request_id=name, keys=keys, prompt_tokens=tokens)


def _core(policy: str, count: int) -> SchedulerCore:
    core = SchedulerCore(policy=make_policy(policy), cost_model=LLAMA3_8B_H100)
    core.set_endpoints(_endpoints(count), now=0.0)
    return core


# -- drain in the core ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["dualmap", "round_robin", "consistent_hash"])
def test_drain_moves_every_queued_request_off_and_loses_none(policy: str) -> None:
    core = _core(policy, 4)
    leases = [core.pick(_request(f"r{k}", start=100_000 * k), now=0.0) for k in range(40)]
    source = max(core.endpoints, key=core.in_flight)
    on_source = [p.lease_id for p in leases if p.endpoint.id == source]
    # One request on the source is already running: it stays and finishes there.
    running = on_source[0]
    assert core.first_token(running, now=0.0)
    assert core.drain(source)

    moves = core.moves.drain(source, now=0.0)

    assert {m.lease_id for m in moves} == set(on_source) - {running}
    for move in moves:
        assert move.target != source and move.target in {e.id for e in core.routable()}
        assert core.move(move.lease_id, target=move.target, now=0.0, cause="drain")
    assert [lease.lease_id for lease in core.leases.leases_on(source)] == [running]
    assert [lease.lease_id for lease in core.running_leases(source)] == [running]
    assert len(core.leases) == len(leases)  # every request still has its lease
    assert core.drain_moves == len(moves) and core.rebalance_moves == 0
    if policy == "dualmap":
        assert all(m.other_candidate for m in moves)
        record = core.history.recent(1)[0]
        assert "draining" in record.decision.detail


def test_drain_of_both_candidates_falls_back_to_a_fresh_pick() -> None:
    core = _core("dualmap", 4)
    picks = [core.pick(_request(f"r{k}", start=100_000 * k), now=0.0) for k in range(60)]
    leaving = {"e2", "e3"}
    for endpoint_id in leaving:
        core.drain(endpoint_id)
    moves = [m for e in sorted(leaving) for m in core.moves.drain(e, now=0.0)]
    queued = {p.lease_id for p in picks if p.endpoint.id in leaving}
    assert {m.lease_id for m in moves} == queued
    assert {m.target for m in moves} <= {"e0", "e1"}
    orphans = [
        p
        for p in picks
        if {c.endpoint_id for c in p.decision.candidates} <= leaving | {p.endpoint.id}
        and p.endpoint.id in leaving
    ]
    assert orphans, "the test needs a request whose two candidates both leave"
    by_lease = {m.lease_id: m for m in moves}
    assert all(not by_lease[p.lease_id].other_candidate for p in orphans)


@settings(max_examples=40, deadline=None)
@given(
    pool=st.integers(min_value=2, max_value=8),
    requests=st.integers(min_value=1, max_value=40),
    leaving=st.sets(st.integers(min_value=0, max_value=7), min_size=1, max_size=7),
    policy=st.sampled_from(["dualmap", "consistent_hash", "least_loaded"]),
)
def test_drain_never_loses_a_request_nor_targets_a_leaving_endpoint(
    pool: int, requests: int, leaving: set[int], policy: str
) -> None:
    core = _core(policy, pool)
    picks = [core.pick(_request(f"r{k}", start=70_000 * k), now=0.0) for k in range(requests)]
    gone = {f"e{i}" for i in leaving if i < pool}
    if not gone or len(gone) == pool:
        return
    for endpoint_id in gone:
        assert core.drain(endpoint_id)
    for endpoint_id in sorted(gone):
        for move in core.moves.drain(endpoint_id, now=0.0):
            assert move.target not in gone
            assert core.move(move.lease_id, target=move.target, now=0.0, cause="drain")
    assert {lease.lease_id for e in core.endpoints for lease in core.leases.leases_on(e)} == {
        p.lease_id for p in picks
    }
    # Nothing queued is left on a leaving endpoint (none of these reported a first token).
    assert all(core.leases.leases_on(e) == [] for e in gone)


def test_plan_drain_moves_is_empty_for_an_endpoint_not_draining() -> None:
    core = _core("dualmap", 3)
    core.pick(_request("r", start=0), now=0.0)
    assert all(core.moves.drain(e, now=0.0) == [] for e in core.endpoints)


# -- rings: keys remapped ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "per_candidate", "pair"),
    [
        (4, 8, 4 / 8, 1 - 6 / 28),
        (8, 4, 4 / 8, 1 - 6 / 28),
        (7, 8, 1 / 8, 2 / 8),
        (8, 7, 1 / 8, 2 / 8),
        (1, 2, 1 / 2, 1.0),
    ],
    ids=["4->8", "8->4", "7->8", "8->7", "1->2"],
)
def test_ideal_remap_is_the_fair_share(
    before: int, after: int, per_candidate: float, pair: float
) -> None:
    names = [f"e{i}" for i in range(max(before, after))]
    ideal = elastic_report.ideal_remap(before=names[:before], after=names[:after])
    assert ideal == pytest.approx((per_candidate, pair))


REMAP_BOUND = 0.08
"""At 256 virtual nodes an endpoint's arc share is within a few percent of fair, so the share of
keys moved stays within 0.08 (absolute) of the ideal per candidate and for the pair."""


@pytest.mark.parametrize(("before", "after"), [(4, 8), (8, 4), (8, 9), (9, 8), (16, 12)])
def test_remapped_fraction_is_close_to_ideal_at_256_virtual_nodes(before: int, after: int) -> None:
    keys = np.random.default_rng(7).integers(0, 2**63, size=20_000, dtype=np.uint64)
    names = [f"sim-{i:03d}" for i in range(max(before, after))]
    remap = elastic_report.measure_remap(
        keys,
        label=f"{before}->{after}",
        at_s=0.0,
        before=names[:before],
        after=names[:after],
        virtual_nodes=256,
        seed=0,
    )
    assert remap.keys == keys.size
    assert abs(remap.first - remap.ideal_per_candidate) < REMAP_BOUND
    assert abs(remap.per_candidate - remap.ideal_per_candidate) < REMAP_BOUND
    assert abs(remap.pair - remap.ideal_pair) < REMAP_BOUND


def test_no_change_remaps_nothing() -> None:
    keys = np.arange(1000, dtype=np.uint64)
    names = [f"e{i}" for i in range(5)]
    remap = elastic_report.measure_remap(
        keys, label="5->5", at_s=0.0, before=names, after=names, virtual_nodes=64, seed=3
    )
    assert (remap.first, remap.second, remap.pair) == (0.0, 0.0, 0.0)


# -- the simulator's membership schedule ------------------------------------------------------


COST = CostModel(
    name="test-linear",
    linear_tokens_per_s=10_000.0,
    attention_s_per_token_pair=0.0,
    step_overhead_s=0.002,
    decode_overhead_s=0.010,
    per_sequence_s=1e-4,
    kv_read_s_per_token=0.0,
)
"""One cost model for the engines and the scheduler's estimate."""


PROFILE = InstanceProfile(name="test", cost_profile="test", kv_capacity_tokens=400_000)


def _keys(block_ids: npt.NDArray[np.int64], prompt_tokens: int) -> PromptKeys:
    return PromptKeys(
        block_size=512,
        block_hashes=(block_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)),
        total_units=prompt_tokens,
    )


def _trace(requests: int, *, gap_s: float, output: int = 40) -> TraceChunk:
    # 13 distinct 8-block prompts in turn: shared prefixes for the caches to reuse.
    rows = [
        (gap_s * k, 4096, output, [50_000 * (k % 13) + j for j in range(8)])
        for k in range(requests)
    ]
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


def _run(
    events: list[MembershipEvent], *, policy: str = "dualmap", gap_s: float = 0.05
) -> SimulationResult:
    return simulate(
        [_trace(400, gap_s=gap_s)],
        config=ClusterConfig(instances=2, profile=PROFILE, keep_samples=True),
        router_factory=core_adapter_factory(
            SchedulerSettings(
                policy=policy,
                ttft_slo_s=5.0,
                scrape_interval_s=0.5,
                policy_seed=0,
                key_block_tokens=512,
                prefix_capacity_tokens=800 * 512,
            ),
            cost=COST,
        ),
        keys_for=_keys,
        cost=COST,
        progress=None,
        membership=events,
    )


@pytest.mark.parametrize("policy", ["dualmap", "round_robin"])
def test_sim_schedule_adds_and_removes_instances_and_every_request_finishes(policy: str) -> None:
    result = _run(
        [MembershipEvent(at_s=5.0, add=2), MembershipEvent(at_s=12.0, remove=2)], policy=policy
    )
    assert result.unfinished_requests == 0 and result.failed_requests == 0
    assert result.ttfts_s is not None and not np.isnan(result.ttfts_s).any()
    changes = [r for r in result.membership_log if r.kind == "change"]
    removals = [r for r in result.membership_log if r.kind == "removed"]
    assert changes[0].added == ("sim-002", "sim-003")
    assert changes[0].members_after == ("sim-000", "sim-001", "sim-002", "sim-003")
    # Scale-in drains the newest two; each is removed once empty.
    assert changes[1].drained == ("sim-002", "sim-003")
    assert changes[1].members_after == ("sim-000", "sim-001")
    assert sorted(r.drained[0] for r in removals) == ["sim-002", "sim-003"]
    assert all(r.at_s >= 12.0 and r.failed_requests == 0 for r in removals)
    assert removals[-1].members_after == ("sim-000", "sim-001")
    assert result.instances_at_load_times is not None
    assert set(result.instances_at_load_times.tolist()) >= {2, 4}


def test_sim_drain_deadline_fails_what_is_still_running() -> None:
    # A deadline of 0: the leaving instances are removed at once with what they hold.
    events = [
        MembershipEvent(at_s=5.0, add=2),
        MembershipEvent(at_s=12.0, remove=2, drain_deadline_s=0.0),
    ]
    # Round robin keeps requests running on the instances that leave; dualmap would keep this
    # trace's 13 prompts where they are cached, on the instances that stay.
    result = _run(events, policy="round_robin")
    removals = [r for r in result.membership_log if r.kind == "removed"]
    lost = sum(r.failed_requests for r in removals)
    assert lost > 0
    assert result.failed_requests == lost == result.unfinished_requests


def test_a_schedule_refuses_a_prefill_decode_pool() -> None:
    from twinroute.simulator.disaggregation import PdSplit

    with pytest.raises(ValueError, match="disaggregated pool cannot change membership"):
        simulate(
            [_trace(2, gap_s=1.0)],
            config=ClusterConfig(instances=2, profile=PROFILE, pd=PdSplit(prefill=1, decode=1)),
            router_factory=core_adapter_factory(
                SchedulerSettings(
                    policy="dualmap",
                    ttft_slo_s=5.0,
                    scrape_interval_s=0.5,
                    policy_seed=0,
                    key_block_tokens=512,
                    prefix_capacity_tokens=800 * 512,
                ),
                cost=COST,
            ),
            keys_for=_keys,
            cost=COST,
            progress=None,
            membership=[MembershipEvent(at_s=1.0, add=1)],
        )


def test_membership_event_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        MembershipEvent(at_s=1.0, remove=-1)


def test_a_schedule_needs_a_router_that_can_change_membership() -> None:
    class Fixed:
        def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
            self.endpoints = endpoints

    with pytest.raises(TypeError, match="membership schedule"):
        simulate(
            [_trace(2, gap_s=1.0)],
            config=ClusterConfig(instances=1, profile=PROFILE),
            router_factory=Fixed,  # type: ignore[arg-type]
            keys_for=_keys,
            cost=COST,
            progress=None,
            membership=[MembershipEvent(at_s=1.0, add=1)],
        )


# -- bench elastic ----------------------------------------------------------------------------


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    elastic.add_arguments(parser)
    return parser.parse_args(
        [
            "--max-requests=500",
            "--scale-out-at=30",
            "--scale-in-at=70",
            "--window=10",
            "--policies=dualmap,round_robin",
            f"--json={tmp_path / 'elastic.json'}",
            f"--out={tmp_path / 'out'}",
            "--quiet",
            *extra,
        ]
    )


def test_bench_elastic_json_has_the_required_fields(tmp_path: Path) -> None:
    assert elastic.run(_args(tmp_path)) == 0
    report = json.loads((tmp_path / "elastic.json").read_text())
    assert report["failed_requests"] == 0
    assert set(report["remapped_key_fraction"]) == {"4->8", "8->4"}
    assert report["ideal_remapped_key_fraction"] == {"4->8": 0.5, "8->4": 0.5}
    for label, value in report["remapped_key_fraction"].items():
        assert abs(value - 0.5) < REMAP_BOUND, label
    phases = report["slo_attainment_per_phase"]
    assert set(phases) == {"dualmap", "round_robin"}
    assert all(len(per_phase) == 3 for per_phase in phases.values())
    assert all(0.0 <= v <= 1.0 for per_phase in phases.values() for v in per_phase.values())
    dualmap = report["policies"]["dualmap"]
    assert dualmap["windows"] and dualmap["requests"] == 500
    change = next(c for c in dualmap["changes"] if c["kind"] == "change")
    assert "cache_hit_rate_before" in change and "cache_hit_rate_after" in change
    assert (tmp_path / "out" / "elastic.png").stat().st_size > 0


def test_bench_elastic_refuses_a_scale_in_that_leaves_nobody(tmp_path: Path) -> None:
    assert elastic.run(_args(tmp_path, "--removed=8")) == 2


# -- the live Drain ---------------------------------------------------------------------------


async def test_live_drain_moves_only_the_requests_the_scheduler_still_holds() -> None:
    from twinroute.scheduler.service import SchedulerService

    core = _core("dualmap", 4)
    service = SchedulerService(core=core, clock=lambda: 0.0)
    picks = [core.pick(_request(f"r{k}", start=100_000 * k), now=0.0) for k in range(40)]
    source = max(core.endpoints, key=core.in_flight)
    on_source = [p.lease_id for p in picks if p.endpoint.id == source]
    held = set(on_source[::2])  # the others were already sent to the engine
    withdrawn: list[tuple[str, str]] = []

    def withdraw(lease_id: str, target: str) -> bool:
        if lease_id not in held:
            return False
        withdrawn.append((lease_id, target))
        return True

    service.withdraw_queued = withdraw
    result = await service.drain(endpoint_id=source, timeout_s=0.0)

    assert {lease for lease, _ in withdrawn} == held
    assert all(target != source for _, target in withdrawn)
    left = {lease.lease_id for lease in core.leases.leases_on(source)}
    assert left == set(on_source) - held
    assert result.remaining_in_flight == len(left) and not result.drained
    assert len(core.leases) == len(picks)


async def test_live_drain_without_a_hold_moves_nothing() -> None:
    from twinroute.scheduler.service import SchedulerService

    core = _core("dualmap", 3)
    service = SchedulerService(core=core, clock=lambda: 0.0)
    pick = core.pick(_request("r", start=0), now=0.0)
    result = await service.drain(endpoint_id=pick.endpoint.id, timeout_s=0.0)
    assert result.remaining_in_flight == 1
    assert [lease.endpoint_id for lease in core.leases.leases_on(pick.endpoint.id)] == [
        pick.endpoint.id
    ]


@pytest.mark.slow
def test_bench_elastic_live_scales_real_processes_and_loses_nothing(tmp_path: Path) -> None:
    args = _args(
        tmp_path,
        "--live",
        "--policies=dualmap",
        "--initial=1",
        "--added=1",
        "--removed=1",
        "--scale-out-at=2",
        "--scale-in-at=5",
        "--duration=8",
        "--window=2",
        "--rate=1.5",
        "--no-plot",
    )
    assert elastic.run(args) == 0
    report = json.loads((tmp_path / "elastic.json").read_text())
    assert report["mode"] == "live" and report["failed_requests"] == 0
    assert set(report["remapped_key_fraction"]) == {"1->2", "2->1"}
    scale_out, scale_in = report["policies"]["dualmap"]["changes"]
    assert scale_out["routable_after"] == ["engine-0", "engine-1"]
    assert scale_in["routable_after"] == ["engine-0"]
    assert [d["endpoint"] for d in scale_in["drain"]] == ["engine-1"]
    assert all(d["error"] == "" for d in scale_in["drain"])


async def test_live_drain_answers_held_requests_with_their_other_candidate() -> None:
    import asyncio

    from twinroute.scheduler.admission import AdmissionQueue
    from twinroute.scheduler.api import PickQuery, Placement
    from twinroute.scheduler.policies import PolicyConfig
    from twinroute.scheduler.service import SchedulerService

    from twinroute.vocabulary import DecisionReason

    now = [100.0]
    config = PolicyConfig(cost_model=LLAMA3_8B_H100, ttft_slo_s=2.0)
    core = SchedulerCore(policy=make_policy("dualmap", config=config), cost_model=LLAMA3_8B_H100)
    queue = AdmissionQueue(core=core, clock=lambda: now[0], run_rounds=False)
    service = SchedulerService(core=core, clock=lambda: now[0], admission=queue)
    service.set_endpoints(_endpoints(3))
    pending: list[asyncio.Task[Placement]] = []
    for k in range(40):
        ids = np.arange(1_000_000 * k, 1_000_000 * k + 16_000, dtype=np.uint32)
        query = PickQuery(request_id=f"r{k}", model="m", token_ids=ids)
        pending.append(asyncio.create_task(service.pick(query)))
        await asyncio.sleep(0)
    source = max(core.endpoints, key=lambda e: len(queue.held_on(e)))
    held = set(queue.held_on(source))
    assert len(held) >= 2, "the test needs requests held on one endpoint"

    await service.drain(endpoint_id=source, timeout_s=0.0)
    for _ in range(3):  # let the answered Picks return
        await asyncio.sleep(0)

    assert queue.held_on(source) == []
    answers = [task.result() for task in pending if task.done()]
    moved = [a for a in answers if a.lease_id in held]
    assert len(moved) == len(held)
    # Moved off a leaving endpoint: DRAINED, not a hotspot's REBALANCED.
    assert all(a.endpoint.id != source and a.reason is DecisionReason.DRAINED for a in moved)
    assert core.history.by_reason[DecisionReason.DRAINED] == len(held)
    assert core.history.by_reason[DecisionReason.REBALANCED] == 0
    assert all(core.leases.get(a.lease_id).endpoint_id == a.endpoint.id for a in moved)  # type: ignore[union-attr]
    assert core.drain_moves == len(held)
    queue.release_all()
    await asyncio.gather(*pending)
    assert len(core.leases) == len(pending)
