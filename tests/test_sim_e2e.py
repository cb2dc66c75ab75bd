"""End-to-end simulations whose policy ordering is known before running them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from twinroute.cli import main
from twinroute.simulator.cluster import SimulationResult
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import SharedPrefixWorkload

# Eight heavy system prompts (8k tokens each), equally popular, each request adding 1k unique
# tokens. Each instance caches about two system prompts (24k tokens of KV), so the four caches
# together hold all eight only if each prefix keeps to a few instances: rotation makes every
# instance see all eight and thrash, prefix affinity keeps each on its own pair.
HEAVY_PREFIXES = TraceSpec(
    path=None,
    trace_format="synthetic",
    workload=SharedPrefixWorkload(
        requests=600,
        rate_rps=3.0,
        system_prompts=8,
        system_prompt_tokens=8192,
        zipf_s=0.0,
        mean_turns=1.0,
        user_tokens=1024,
        output_tokens=32,
        follow_up_share=0.0,
    ),
)


def _run(
    policy: str, *, trace: TraceSpec = HEAVY_PREFIXES, **overrides: object
) -> SimulationResult:
    spec = RunSpec(
        trace=trace,
        policy=policy,
        instances=4,
        kv_capacity_tokens=24_000,
        **overrides,  # type: ignore[arg-type]
    )
    return run_spec(spec, progress=None)


@pytest.fixture(scope="module")
def heavy() -> dict[str, SimulationResult]:
    return {p: _run(p) for p in ("round_robin", "consistent_hash", "dualmap")}


def test_affinity_beats_rotation_on_heavy_shared_prefixes(
    heavy: dict[str, SimulationResult],
) -> None:
    rotation = heavy["round_robin"].cache_hit_rate
    assert heavy["dualmap"].cache_hit_rate > rotation + 0.2
    assert heavy["consistent_hash"].cache_hit_rate > rotation + 0.2
    for result in heavy.values():
        assert result.cache_hit_rate <= result.unbounded_cache_hit_rate + 1e-9
        assert result.requests == result.measured_requests == 600
        assert not math.isnan(result.ttft_p99_s)


def test_dualmap_serves_more_within_slo_than_rotation() -> None:
    # At 14 req/s rotation needs ~6.6k uncached tokens a request, more than 4 instances prefill
    # (4 x 20k tokens/s); with the prefixes cached, dualmap needs about a third of that.
    busy = replace(HEAVY_PREFIXES, workload=replace(HEAVY_PREFIXES.workload, rate_rps=14.0))
    dualmap = _run("dualmap", trace=busy)
    rotation = _run("round_robin", trace=busy)
    assert dualmap.ttft_p50_s < rotation.ttft_p50_s
    assert dualmap.slo_attainment > rotation.slo_attainment + 0.2


def test_same_seed_gives_the_same_result() -> None:
    first = _run("dualmap", seed=3).summary()
    again = _run("dualmap", seed=3).summary()
    for summary in (first, again):
        summary.pop("wall_s")
    assert first == again


def test_simulate_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    code = main(
        [
            "simulate",
            "--format",
            "synthetic",
            "--synthetic-requests",
            "200",
            "--instances",
            "2",
            "--policy",
            "round_robin",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in (
        "requests",
        "ttft_p50_s",
        "ttft_p90_s",
        "ttft_p99_s",
        "e2e_p50_s",
        "e2e_p90_s",
        "slo_attainment",
        "cache_hit_rate",
        "ideal_cache_hit_rate",
        "load_cv",
        "slo_switches",
        "rebalance_moves",
        "wall_s",
    ):
        assert key in metrics
    assert metrics["requests"] == 200


def test_simulate_prints_figures_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--format", "synthetic", "--synthetic-requests", "200",
                 "--instances", "2", "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "{" not in out, "no raw dict"
    assert not re.search(r"\d\.\d{5,}", out), "no unformatted float"
    assert re.search(r"within SLO +\d+\.\d%", out)
    assert re.search(r"TTFT p50/p90/p99 +[\d.]+ m?s / ", out)
    assert "docs/glossary.md" in out


def test_simulate_command_reports_a_bad_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{')
    assert main(["simulate", "--trace", str(bad), "--quiet"]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
