"""Disaggregated prefill/decode pools in the cluster simulator (`twinroute simulate --pd`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Role

from twinroute.cli import main
from twinroute.simulator.cluster import ClusterConfig, SimulationResult, simulate
from twinroute.simulator.disaggregation import PdSplit, parse_pd, pool_endpoints
from twinroute.simulator.profiles import INSTANCE_PROFILES, InstanceProfile
from twinroute.simulator.routing import core_adapter_factory, trace_keys
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import SharedPrefixWorkload, TraceChunk

PROFILE = INSTANCE_PROFILES["llama3-8b-h100"]
COST = LLAMA3_8B_H100
BLOCK = 512


def chunk(rows: list[tuple[float, int, int, list[int]]]) -> TraceChunk:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r[3]) for r in rows])
    return TraceChunk(
        arrival_s=np.asarray([r[0] for r in rows], dtype=np.float64),
        prompt_tokens=np.asarray([r[1] for r in rows], dtype=np.int64),
        output_tokens=np.asarray([r[2] for r in rows], dtype=np.int64),
        block_offsets=offsets,
        block_ids=np.asarray([b for r in rows for b in r[3]], dtype=np.int64),
        block_size=BLOCK,
    )


def run_pool(
    rows: list[tuple[float, int, int, list[int]]],
    *,
    split: PdSplit | None,
    profile: InstanceProfile = PROFILE,
    min_prefill_tokens: int = 100,
) -> SimulationResult:
    instances = split.instances if split is not None else 2
    return simulate(
        [chunk(rows)],
        config=ClusterConfig(instances=instances, profile=profile, block_size=BLOCK, pd=split),
        router_factory=core_adapter_factory(
            SchedulerSettings(
                policy="dualmap",
                ttft_slo_s=5.0,
                scrape_interval_s=0.5,
                policy_seed=0,
                key_block_tokens=BLOCK,
                prefix_capacity_tokens=profile.kv_capacity_tokens,
                pd_min_prefill_tokens=min_prefill_tokens,
            ),
            cost=COST,
        ),
        keys_for=trace_keys(block_size=BLOCK, model="m", seed=0),
        cost=COST,
        progress=None,
    )


def test_ttft_is_prefill_then_transfer_then_the_first_decode_step() -> None:
    prompt = 4096
    result = run_pool([(0.0, prompt, 10, list(range(1, 9)))], split=PdSplit(1, 1))
    prefill = COST.prefill_time_s(uncached_tokens=prompt, cached_tokens=0)
    transfer = PROFILE.kv_transfer_s(prompt - 1)
    first_decode = COST.prefill_time_s(uncached_tokens=1, cached_tokens=prompt - 1)
    assert result.ttft_p50_s == pytest.approx(prefill + transfer + first_decode, rel=1e-9)
    assert result.pd["disaggregated_requests"] == 1
    assert result.pd["transfer_p50_s"] == pytest.approx(transfer, rel=1e-9)
    # 4095 tokens x 128 KiB over 25 GB/s, plus 2 ms.
    assert transfer == pytest.approx(0.002 + 4095 * 131_072 / 25e9)


def test_a_slower_link_adds_exactly_its_extra_transfer_time() -> None:
    rows = [(0.0, 8192, 5, list(range(1, 17)))]
    fast = run_pool(rows, split=PdSplit(1, 1))
    slow_profile = dataclasses.replace(PROFILE, kv_transfer_bytes_per_s=5e9)
    slow = run_pool(rows, split=PdSplit(1, 1), profile=slow_profile)
    extra = slow_profile.kv_transfer_s(8191) - PROFILE.kv_transfer_s(8191)
    assert extra > 0.1
    assert slow.ttft_p50_s - fast.ttft_p50_s == pytest.approx(extra, rel=1e-9)


def test_a_prompt_the_decode_instance_holds_skips_the_prefill_hop() -> None:
    blocks = list(range(1, 9))
    rows = [(0.0, 4096, 4, blocks), (10.0, 4096, 4, blocks)]
    result = run_pool(rows, split=PdSplit(1, 1))
    assert result.pd["disaggregated_requests"] == 1
    assert result.pd["decode_only_requests"] == 1
    # The second request's KV is all on the decode instance: one token to compute.
    second_ttft = COST.prefill_time_s(uncached_tokens=1, cached_tokens=4095)
    first_ttft = (
        COST.prefill_time_s(uncached_tokens=4096, cached_tokens=0)
        + PROFILE.kv_transfer_s(4095)
        + second_ttft
    )
    assert result.ttft_p50_s == pytest.approx((first_ttft + second_ttft) / 2, rel=1e-9)
    # Both requests report the prompt's cache hit where it was prefilled.
    assert result.cache_hit_rate == pytest.approx(4095 / 8192)


def test_raising_the_threshold_keeps_requests_on_decode_instances() -> None:
    rows = [(0.0, 4096, 4, list(range(1, 9)))]
    result = run_pool(rows, split=PdSplit(1, 1), min_prefill_tokens=10_000)
    assert result.pd["decode_only_requests"] == 1
    assert result.ttft_p50_s == pytest.approx(
        COST.prefill_time_s(uncached_tokens=4096, cached_tokens=0), rel=1e-9
    )
    # Nothing ran on the prefill instance.
    assert result.pd["prefill_utilisation"] == 0.0


def synthetic(pd: PdSplit | None, *, instances: int = 5) -> SimulationResult:
    return run_spec(
        RunSpec(
            trace=TraceSpec(
                path=None,
                trace_format="synthetic",
                workload=SharedPrefixWorkload(requests=300, rate_rps=6.0),
            ),
            policy="dualmap",
            instances=instances,
            pd=pd,
            keep_samples=True,
        ),
        progress=None,
    )


def test_every_request_finishes_and_runs_repeat_exactly() -> None:
    first = synthetic(PdSplit(2, 3))
    assert first.measured_requests == 300
    assert first.ttfts_s is not None and np.isfinite(first.ttfts_s).all()
    assert math.isfinite(first.e2e_p90_s) and math.isfinite(first.tpot_p90_s)
    pd = first.pd
    assert pd["disaggregated_requests"] + pd["decode_only_requests"] == 300  # type: ignore[operator]
    assert 0 < pd["prefill_utilisation"] <= 1  # type: ignore[operator]
    assert 0 < pd["decode_utilisation"] <= 1  # type: ignore[operator]
    assert first.decisions, "decisions are counted by reason"
    again = synthetic(PdSplit(2, 3))
    drop = {"wall_s"}
    assert {k: v for k, v in first.summary().items() if k not in drop} == {
        k: v for k, v in again.summary().items() if k not in drop
    }


def test_unified_pools_report_no_pd_figures() -> None:
    unified = synthetic(None)
    assert unified.pd == {} and "pd" not in unified.summary()
    assert all(e.role == Role.UNIFIED for e in pool_endpoints(instances=3, prefill=0))


@pytest.mark.parametrize(
    ("text", "instances", "message"),
    [
        ("3", None, "PREFILL:DECODE"),
        ("a:b", None, "PREFILL:DECODE"),
        ("3:5:1", None, "PREFILL:DECODE"),
        ("-1:5", None, "PREFILL:DECODE"),
        ("0:4", None, "at least one prefill and one decode"),
        ("4:0", None, "at least one prefill and one decode"),
        ("3:4", 8, "makes 7 instances but --instances says 8"),
    ],
    ids=["one-number", "not-numbers", "three-parts", "negative", "no-prefill", "no-decode", "sum"],
)
def test_bad_pd_specs_are_refused(text: str, instances: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pd(text, instances=instances)


def test_pd_spec_sizes_the_pool() -> None:
    assert parse_pd("3:5") == PdSplit(prefill=3, decode=5)
    assert parse_pd(" 4:4 ", instances=8).instances == 8
    roles = [e.role for e in pool_endpoints(instances=5, prefill=2)]
    assert roles == [Role.PREFILL] * 2 + [Role.DECODE] * 3


def test_simulate_cli_refuses_a_split_that_does_not_match(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["simulate", "--pd", "3:4", "--instances", "8", "--max-requests", "5", "--quiet"])
    assert code == 2
    assert "makes 7 instances but --instances says 8" in capsys.readouterr().err
    assert main(["simulate", "--pd", "x", "--max-requests", "5", "--quiet"]) == 2


def test_simulate_cli_runs_a_disaggregated_pool(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--pd", "1:2", "--max-requests", "40", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 instances (1:2)" in out
    assert "prefill/decode" in out and "disaggregated_requests 25" in out


def test_a_pd_pool_refuses_a_membership_schedule() -> None:
    from twinroute.simulator.cluster import MembershipEvent

    with pytest.raises(ValueError, match="cannot change membership"):
        simulate(
            [chunk([(0.0, 1024, 2, [1, 2])])],
            config=ClusterConfig(instances=2, profile=PROFILE, pd=PdSplit(1, 1)),
            router_factory=core_adapter_factory(
                SchedulerSettings(
                    policy="dualmap",
                    ttft_slo_s=5.0,
                    scrape_interval_s=0.5,
                    policy_seed=0,
                    key_block_tokens=BLOCK,
                    prefix_capacity_tokens=1000 * BLOCK,
                ),
                cost=COST,
            ),
            keys_for=trace_keys(block_size=BLOCK, model="m", seed=0),
            cost=COST,
            progress=None,
            membership=[MembershipEvent(at_s=1.0, add=1)],
        )
