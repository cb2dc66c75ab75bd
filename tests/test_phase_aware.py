"""Phase-aware placement: the TTFT estimate with decode steps interleaved under the chunked
prefill budget, the interference a request inflicts on running decodes, the output-length
estimator, dualmap's use of them, and the `--rebalance` / `--phase-aware` switches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100, OutputLengthEstimator, decode_load
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import make_policy
from twinroute.scheduler.policies.base import Policy, PolicyConfig, score_endpoint
from twinroute.scheduler.policies.dualmap import DualMapPolicy
from twinroute.scheduler.prefix_index import PrefixIndex
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    Endpoint,
    LoadSnapshot,
    RoutingRequest,
)

from twinroute.cli import main
from twinroute.simulator.instance import Instance, InstanceConfig, SimRequest
from twinroute.vocabulary import DecisionReason

MODEL = LLAMA3_8B_H100
SEED = namespace_seed(model="m")


def request(name: str, *, start: int = 0, tokens: int = 4096, output: int = 0) -> RoutingRequest:
    keys = keys_from_tokens(np.arange(start, start + tokens), block_size=16, seed=SEED)
    return RoutingRequest(
        request_id=name, keys=keys, prompt_tokens=tokens, expected_output_tokens=output
    )


# -- the estimate ------------------------------------------------------------------------------


def test_without_decodes_phase_aware_and_blind_agree() -> None:
    load = LoadSnapshot(pending_prefill_tokens=30_000)
    blind = MODEL.estimate_ttft_s(uncached_tokens=8_000, cached_tokens=2_000, load=load)
    aware = MODEL.estimate_ttft_s(
        uncached_tokens=8_000, cached_tokens=2_000, load=load, phase_aware=True
    )
    assert aware == pytest.approx(blind)


@pytest.mark.parametrize(
    ("decoding", "kv_tokens"),
    [(8, 8 * 2_000), (64, 64 * 12_000), (200, 400_000)],
    ids=["few-short", "many-long", "kv-full"],
)
def test_phase_aware_ttft_matches_the_simulated_engine(decoding: int, kv_tokens: int) -> None:
    """The simulator's engine is the reference: a prompt arriving behind `decoding` running
    sequences gets its first token after as many mixed steps as the estimate counts."""
    config = InstanceConfig(kv_capacity_tokens=2_000_000, block_size=512)
    engine = Instance(config=config, cost=MODEL)
    context = kv_tokens // decoding
    for index in range(decoding):
        engine.submit(
            SimRequest(request_id=f"d{index}", prompt_tokens=context, output_tokens=100_000)
        )
    # Prefill them all, then sample: from here on every step decodes all of them.
    while engine.metrics().pending_prefill_tokens > 0:
        engine.step(0.0)
    engine.submit(SimRequest(request_id="new", prompt_tokens=20_000, output_tokens=10))
    elapsed = 0.0
    while True:
        result = engine.step(elapsed)
        elapsed += result.duration_s
        if any(first.request_id == "new" for first in result.first_tokens):
            break
    load = LoadSnapshot(decoding=decoding, decoding_tokens=kv_tokens)
    aware = MODEL.estimate_ttft_s(
        uncached_tokens=20_000, cached_tokens=0, load=load, phase_aware=True
    )
    blind = MODEL.estimate_ttft_s(uncached_tokens=20_000, cached_tokens=0, load=load)
    # Within 15% (the engine's KV grows a token per step and attention is per chunk).
    assert aware == pytest.approx(elapsed, rel=0.15)
    assert abs(aware - elapsed) < abs(blind - elapsed)


def test_heavier_decode_load_predicts_a_later_first_token() -> None:
    def ttft(decoding: int, kv: int) -> float:
        load = LoadSnapshot(pending_prefill_tokens=20_000, decoding=decoding, decoding_tokens=kv)
        return MODEL.estimate_ttft_s(
            uncached_tokens=12_000, cached_tokens=0, load=load, phase_aware=True
        )

    assert ttft(0, 0) < ttft(32, 32 * 4_000) < ttft(32, 32 * 12_000) < ttft(128, 128 * 12_000)


def test_a_scrape_that_sees_more_running_raises_the_decode_load() -> None:
    known = LoadSnapshot(decoding=4, decoding_tokens=40_000)
    assert decode_load(known) == (4, 40_000)
    assert decode_load(LoadSnapshot(decoding=4, decoding_tokens=40_000, running=8)) == (8, 80_000)
    assert decode_load(LoadSnapshot(running=8)) == (8, 0)
    assert decode_load(LoadSnapshot(decoding=4, decoding_tokens=40_000, running=2)) == (4, 40_000)


@given(
    decoding=st.integers(min_value=0, max_value=256),
    context=st.integers(min_value=0, max_value=32_000),
    pending=st.integers(min_value=0, max_value=500_000),
    uncached=st.integers(min_value=0, max_value=64_000),
)
def test_phase_aware_ttft_is_finite_and_at_least_the_prefill(
    decoding: int, context: int, pending: int, uncached: int
) -> None:
    load = LoadSnapshot(
        pending_prefill_tokens=pending, decoding=decoding, decoding_tokens=decoding * context
    )
    ttft = MODEL.estimate_ttft_s(
        uncached_tokens=uncached, cached_tokens=0, load=load, phase_aware=True
    )
    assert math.isfinite(ttft)
    assert ttft >= MODEL.prefill_time_s(uncached_tokens=uncached, cached_tokens=0)


def test_interference_grows_with_the_decodes_disturbed_and_the_expected_output() -> None:
    def hurt(decoding: int, output: int) -> float:
        return MODEL.interference_s(
            uncached_tokens=8_000,
            cached_tokens=0,
            prompt_tokens=8_000,
            expected_output_tokens=output,
            load=LoadSnapshot(decoding=decoding, decoding_tokens=decoding * 8_000),
        )

    assert hurt(0, 500) == 0.0
    assert 0.0 < hurt(8, 0) < hurt(8, 500) < hurt(64, 500)
    # 64 sequences each wait for ~0.4 s of prefill chunks.
    assert hurt(64, 0) == pytest.approx(64 * 0.43, rel=0.1)


# -- the output-length estimator -----------------------------------------------------------------


def test_output_estimate_follows_each_group_and_falls_back_to_the_overall_mean() -> None:
    estimator = OutputLengthEstimator(prior_tokens=100, weight=0.5)
    assert estimator.estimate(1) == 100
    estimator.observe(1, 1_000)
    assert estimator.estimate(1) == 1_000
    estimator.observe(1, 2_000)
    assert estimator.estimate(1) == 1_500
    estimator.observe(2, 10)
    assert estimator.estimate(2) == 10
    # Unseen group and no group: the overall mean of what was observed.
    assert 10 < estimator.estimate(3) == estimator.estimate(None) < 2_000
    estimator.observe(4, 0)  # nothing produced tells nothing
    assert len(estimator) == 2


def test_output_estimator_memory_is_bounded_least_recently_used_first() -> None:
    estimator = OutputLengthEstimator(max_groups=3, prior_tokens=0, weight=1.0)
    for group in range(3):
        estimator.observe(group, 100 + group)
    assert estimator.estimate(0) == 100  # touched: now the most recent
    for group in range(3, 1_000):
        estimator.observe(group, 7)
    assert len(estimator) == 3
    assert estimator.estimate(0) == 7  # evicted long ago: the overall mean


@pytest.mark.parametrize(
    ("max_groups", "weight", "prior"),
    [(0, 0.2, 10), (10, 0.0, 10), (10, 1.5, 10), (10, 0.2, -1)],
    ids=["no-groups", "zero-weight", "weight-over-one", "negative-prior"],
)
def test_output_estimator_refuses_bad_settings(max_groups: int, weight: float, prior: int) -> None:
    with pytest.raises(ValueError, match="max_groups"):
        OutputLengthEstimator(max_groups=max_groups, weight=weight, prior_tokens=prior)


def test_core_fills_a_missing_expected_output_from_completed_requests_of_the_group() -> None:
    core = SchedulerCore(policy=make_policy("dualmap"), cost_model=MODEL)
    core.set_endpoints([Endpoint(id="e0", address="a")], now=0.0)
    first = core.pick(request("r1"), now=0.0)
    assert core.complete(first.lease_id, now=1.0, output_tokens=900) is not None
    core.pick(request("r2", tokens=5_000), now=2.0)
    # Same first block, so the same group: the estimate is what r1 produced.
    assert core.output_lengths.estimate(int(request("r2").keys.block_hashes[0])) == 900
    # A request that says its max_tokens keeps it.
    stated = core.pick(request("r3", output=7), now=3.0)
    assert stated.decision.endpoint_id == "e0"
    assert len(core.output_lengths) == 1


# -- dualmap -------------------------------------------------------------------------------------


def _view(loads: dict[str, LoadSnapshot]) -> ClusterView:
    endpoints = tuple(Endpoint(id=e, address=e) for e in sorted(loads))
    return ClusterView(endpoints=endpoints, loads=loads, prefix_index=PrefixIndex(), now=0.0)


def test_dualmap_sends_a_new_prefix_to_the_candidate_with_less_decode_work() -> None:
    """Equal reuse, equal queued prefill: phase-blind sees a tie (the decode tokens are a sliver
    of the budget either way); phase-aware sees that one candidate decodes 96 long sequences."""
    probe = request("probe", output=400)
    busy = LoadSnapshot(pending_prefill_tokens=8_000, decoding=96, decoding_tokens=96 * 14_000)
    calm = LoadSnapshot(pending_prefill_tokens=8_000, decoding=2, decoding_tokens=2 * 14_000)
    for busy_id in ("e0", "e1"):
        calm_id = "e1" if busy_id == "e0" else "e0"
        loads = {busy_id: busy, calm_id: calm}
        aware = DualMapPolicy(config=PolicyConfig(phase_aware=True)).pick(probe, _view(loads))
        assert aware.reason is DecisionReason.TIE_LESS_LOADED
        assert aware.endpoint_id == calm_id
        scores = {c.endpoint_id: c for c in aware.candidates}
        assert scores[busy_id].score > scores[busy_id].predicted_ttft_s  # interference added
        assert scores[busy_id].predicted_ttft_s > scores[calm_id].predicted_ttft_s


def test_phase_blind_dualmap_keeps_the_old_estimate() -> None:
    load = LoadSnapshot(pending_prefill_tokens=8_000, decoding=96, decoding_tokens=96 * 14_000)
    decision = DualMapPolicy(config=PolicyConfig(phase_aware=False)).pick(
        request("probe", output=400), _view({"e0": load, "e1": load})
    )
    expected = MODEL.estimate_ttft_s(uncached_tokens=4096, cached_tokens=0, load=load)
    assert decision.predicted_ttft_s == pytest.approx(expected)
    assert all(c.score == c.predicted_ttft_s for c in decision.candidates)


# -- switches ------------------------------------------------------------------------------------


class _PinnedPair(Policy):
    """Always e0, naming e1 as the other candidate: builds a hotspot on purpose."""

    name = "pinned-pair"
    rebalances_hotspots = True

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        scores = tuple(
            score_endpoint(request, view, endpoint_id, cost_model=self.config.cost_model)
            for endpoint_id in ("e0", "e1")
        )
        return Decision(
            endpoint_id="e0", reason=DecisionReason.CACHE_AFFINITY, policy=self.name,
            candidates=scores,
        )  # fmt: skip


@pytest.mark.parametrize("rebalance", [True, False], ids=["on", "off"])
def test_core_rebalance_switch(rebalance: bool) -> None:
    core = SchedulerCore(
        policy=_PinnedPair(config=PolicyConfig()), cost_model=MODEL, rebalance=rebalance
    )
    core.set_endpoints([Endpoint(id=f"e{i}", address="a") for i in range(2)], now=0.0)
    for index in range(10):  # ~8 s of prefill on e0 against a 5 s SLO
        core.pick(request(f"r{index}", start=index * 100_000, tokens=16_000), now=0.0)
    assert bool(core.moves.rebalance(now=0.0)) is rebalance


def test_rebalancing_skips_leases_the_caller_cannot_move_but_counts_them_ahead() -> None:
    core = SchedulerCore(policy=_PinnedPair(config=PolicyConfig()), cost_model=MODEL)
    core.set_endpoints([Endpoint(id=f"e{i}", address="a") for i in range(2)], now=0.0)
    leases = [
        core.pick(request(f"r{i}", start=i * 100_000, tokens=16_000), now=0.0).lease_id
        for i in range(10)
    ]
    every = core.moves.rebalance(now=0.0)
    movable = set(leases[:5])
    some = core.moves.rebalance(now=0.0, movable=movable.__contains__)
    assert some and {m.lease_id for m in some} <= movable
    assert {m.lease_id for m in every} - movable


@pytest.mark.parametrize(
    ("flags", "rebalance", "phase_aware"),
    [
        ([], "on", "on"),
        (["--rebalance", "off"], "off", "on"),
        (["--phase-aware", "off"], "on", "off"),
    ],
    ids=["defaults", "rebalance-off", "phase-blind"],
)
def test_simulate_takes_the_switches_and_reports_them(
    tmp_path: Path, flags: list[str], rebalance: str, phase_aware: str
) -> None:
    out = tmp_path / "m.json"
    code = main(
        ["simulate", "--max-requests", "200", "--rate", "8", "--quiet", "--json", str(out), *flags]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert (metrics["rebalance"], metrics["phase_aware"]) == (rebalance, phase_aware)
    assert metrics["requests"] == 200


@pytest.mark.parametrize(("flags", "aware"), [([], True), (["--phase-aware", "off"], False)],
                         ids=["default-on", "off"])  # fmt: skip
def test_scheduler_command_phase_aware_switch(flags: list[str], aware: bool) -> None:
    import argparse

    from twinroute.scheduler.build import build_service
    from twinroute.scheduler.command import add_arguments, resolve_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--static-endpoints", "127.0.0.1:9000", *flags])
    assert build_service(resolve_arguments(args)).core.policy.config.phase_aware is aware
