"""One simulation from a plain, picklable description (`RunSpec`), for the CLI and benchmarks.

What a seed changes: the namespace of the prompt keys (so hash rings place prefixes
differently), the phase of the metric scrapes, the policy's random choices, and for generated
traces (synthetic, Azure prefix model) the workload itself. The Mooncake trace is replayed as
recorded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from twinroute.scheduler.policies.base import COLD_LEAST_LOADED, DEFAULT_PHASE_INTERFERENCE_WEIGHT
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.simulator.cluster import (
    SIMULATED_SCRAPE_INTERVAL_S,
    ClusterConfig,
    SimulationResult,
    simulate,
)
from twinroute.simulator.disaggregation import PdSplit
from twinroute.simulator.profiles import DEFAULT_PROFILE, InstanceProfile, get_profile
from twinroute.simulator.routing import core_adapter_factory, trace_keys
from twinroute.simulator.sim_cost import cost_model_for
from twinroute.simulator.traces import (
    MOONCAKE_BLOCK_TOKENS,
    PrefixModel,
    SharedPrefixWorkload,
    TraceChunk,
    TraceSummary,
    open_trace,
    replicate,
    scale_time,
    summarize,
    take,
)
from twinroute.vocabulary import DEFAULT_PD_MIN_PREFILL_TOKENS, DEFAULT_TTFT_SLO_S


@dataclass(frozen=True, slots=True)
class TraceSpec:
    path: str | None
    trace_format: str = "mooncake"
    block_size: int = MOONCAKE_BLOCK_TOKENS
    # Copies merged into one trace (block ids offset so copies share nothing).
    copies: int = 1
    # Keep only the first N requests (after replication); None keeps all.
    max_requests: int | None = None
    prefix_model: PrefixModel = field(default_factory=PrefixModel)
    workload: SharedPrefixWorkload = field(default_factory=SharedPrefixWorkload)

    def with_seed(self, seed: int) -> TraceSpec:
        return replace(
            self,
            prefix_model=replace(self.prefix_model, seed=seed),
            workload=replace(self.workload, seed=seed),
        )

    def _source(self) -> Iterator[TraceChunk]:
        return open_trace(
            Path(self.path) if self.path else None,
            trace_format=self.trace_format,
            block_size=self.block_size,
            prefix_model=self.prefix_model,
            workload=self.workload,
        )

    def summary(self) -> TraceSummary:
        """Summary of the trace as simulated (after replication, before time scaling)."""
        if self.max_requests is not None:
            return summarize(self.chunks(time_scale=1.0))
        base = summarize(self._source())
        if self.copies == 1:
            return base
        return TraceSummary(
            requests=base.requests * self.copies,
            duration_s=base.duration_s + base.mean_gap_s * (self.copies - 1) / self.copies,
            mean_prompt_tokens=base.mean_prompt_tokens,
            max_block_id=(base.max_block_id + 1) * self.copies - 1,
        )

    def chunks(self, *, time_scale: float) -> Iterator[TraceChunk]:
        stream = self._source()
        if self.copies > 1:
            base = summarize(self._source())
            stream = replicate(
                stream,
                copies=self.copies,
                id_stride=base.max_block_id + 1,
                spacing_s=base.mean_gap_s,
            )
        if self.max_requests is not None:
            stream = take(stream, requests=self.max_requests)
        if time_scale != 1.0:
            stream = scale_time(stream, factor=time_scale)
        return stream


@dataclass(frozen=True, slots=True)
class RunSpec:
    trace: TraceSpec
    policy: str
    instances: int = 8
    profile: str = DEFAULT_PROFILE
    kv_capacity_tokens: int | None = None
    time_scale: float = 1.0
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    scrape_interval_s: float = SIMULATED_SCRAPE_INTERVAL_S
    warmup_fraction: float = 0.0
    seed: int = 0
    model: str = "sim-model"
    keep_samples: bool = False
    # Hotspot rebalancing (for policies that use it) and phase-aware placement.
    rebalance: bool = True
    phase_aware: bool = True
    # The weight of the decode interference in phase-aware scores.
    phase_interference_weight: float = DEFAULT_PHASE_INTERFERENCE_WEIGHT
    # A disaggregated pool (prefill:decode instance counts, summing to `instances`) and the
    # decider's threshold (`twinroute.scheduler.policies.pd`).
    pd: PdSplit | None = None
    pd_min_prefill_tokens: int = DEFAULT_PD_MIN_PREFILL_TOKENS
    # Fit each instance's cost model from its first tokens (the profile as the prior).
    cost_calibration: bool = True
    # dualmap: where a prompt its ring pair does not hold goes.
    cold_placement: str = COLD_LEAST_LOADED

    def scheduler_settings(self, profile: InstanceProfile) -> SchedulerSettings:
        """The simulated scheduler's settings: prompt keys are the trace's blocks, and the
        prefix index is sized like the instances' KV cache."""
        return SchedulerSettings(
            policy=self.policy,
            ttft_slo_s=self.ttft_slo_s,
            policy_seed=self.seed,
            phase_aware=self.phase_aware,
            cost_calibration=self.cost_calibration,
            cold_placement=self.cold_placement,
            phase_interference_weight=self.phase_interference_weight,
            rebalance=self.rebalance,
            key_block_tokens=self.trace.block_size,
            prefix_capacity_tokens=profile.kv_capacity_tokens,
            scrape_interval_s=self.scrape_interval_s,
            pd_min_prefill_tokens=self.pd_min_prefill_tokens,
            pd_transfer_s_per_token=profile.kv_bytes_per_token / profile.kv_transfer_bytes_per_s,
        )


def run_spec(
    spec: RunSpec,
    *,
    progress: TextIO | None = sys.stderr,
    total_requests: int | None = None,
    label: str | None = None,
) -> SimulationResult:
    profile = get_profile(spec.profile).with_kv_capacity(spec.kv_capacity_tokens)
    cost = cost_model_for(profile)
    config = ClusterConfig(
        instances=spec.instances,
        profile=profile,
        ttft_slo_s=spec.ttft_slo_s,
        scrape_interval_s=spec.scrape_interval_s,
        warmup_fraction=spec.warmup_fraction,
        block_size=spec.trace.block_size,
        keep_samples=spec.keep_samples,
        pd=spec.pd,
        scrape_phase=((spec.seed * 0.618033988749895) % 1.0) * spec.scrape_interval_s,
    )
    return simulate(
        spec.trace.with_seed(spec.seed).chunks(time_scale=spec.time_scale),
        config=config,
        router_factory=core_adapter_factory(spec.scheduler_settings(profile), cost=cost),
        keys_for=trace_keys(block_size=spec.trace.block_size, model=spec.model, seed=spec.seed),
        cost=cost,
        total_requests=total_requests,
        progress=progress,
        label=label or f"simulate {spec.policy}",
    )
