"""The policy interface and what every policy shares.

A policy is a small object with one job: given one request and one immutable `ClusterView`,
return a `Decision` that says where and why. It may keep routing state of its own (hash rings,
a hotness tree, a rotation counter) but never reaches outside the view for load or cache
information, so the same object runs in the live scheduler and in the simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, cast

from twinroute.scheduler.costmodel import LLAMA3_8B_H100, CostModel
from twinroute.scheduler.types import (
    CandidateScore,
    ClusterView,
    Decision,
    Endpoint,
    NoEndpointError,
    RoutingRequest,
)

from twinroute.vocabulary import DEFAULT_TTFT_SLO_S, DEFAULT_VIRTUAL_NODES, DecisionReason

# Where dualmap places a prompt that neither of its ring candidates holds (`cold_placement`):
# on the pair, or on the pool's least loaded endpoint when it beats both (and, either way, a
# prompt is then followed to wherever the prefix index says it went).
COLD_PAIR = "pair"
COLD_LEAST_LOADED = "least_loaded"
COLD_PLACEMENTS = (COLD_PAIR, COLD_LEAST_LOADED)

# Phase-aware scores: seconds of score per sequence-second of delay inflicted on the sequences
# decoding there (0.01: 100 sequence-seconds weigh like 1 s of the request's own TTFT).
DEFAULT_PHASE_INTERFERENCE_WEIGHT = 0.01


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Settings every policy reads what it needs from; defaults follow the published rules."""

    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    cost_model: CostModel = field(default=LLAMA3_8B_H100)
    virtual_nodes: int = DEFAULT_VIRTUAL_NODES
    seed: int = 0
    # DualMap: sliding window of recent requests for prefix hotness, and key depth bounds.
    hotness_window: int = 1024
    min_key_depth: int = 1
    max_key_depth: int = 64
    # SGLang / vLLM router cache_aware defaults.
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.3
    # KubeAI CHWBL: skip endpoints whose in-flight count exceeds this factor of the mean.
    chwbl_load_factor: float = 1.25
    # Characters (text mode) or tokens of the prompt that CHWBL / consistent_hash key on.
    hash_prefix_blocks: int = 4
    # Phase-aware placement (`score_endpoint`): predicted TTFT counts the decode steps that
    # interleave with the prefill, and the score adds the delay the request inflicts on the
    # sequences decoding there, weighted: `phase_interference_weight` seconds of score per
    # sequence-second inflicted (`DEFAULT_PHASE_INTERFERENCE_WEIGHT`).
    phase_aware: bool = True
    phase_interference_weight: float = DEFAULT_PHASE_INTERFERENCE_WEIGHT
    # DualMap: where a prompt that neither ring candidate holds goes (`COLD_PLACEMENTS`).
    cold_placement: str = COLD_LEAST_LOADED
    # DualMap: rank candidates with the eviction their KV memory pressure implies
    # (`score_endpoint`'s `charge_eviction`).
    charge_eviction: bool = True


class Policy(ABC):
    """Chooses an endpoint for one request."""

    name: ClassVar[str]
    # True: the core may move queued requests off hotspots to their other candidate
    # (`MovePlanner.rebalance`); the decision's candidates name where they may go.
    rebalances_hotspots: ClassVar[bool] = False

    def __init__(self, *, config: PolicyConfig) -> None:
        self.config = config

    @abstractmethod
    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        """Choose among `view.endpoints` less `request.exclude`; raise NoEndpointError if none."""

    def _decide(
        self,
        request: RoutingRequest,
        view: ClusterView,
        endpoint_id: str,
        reason: DecisionReason,
        detail: str,
        *,
        matched_blocks: int | None = None,
    ) -> Decision:
        """A decision for `endpoint_id`, with its predicted TTFT as the one candidate score."""
        score = score_endpoint(
            request,
            view,
            endpoint_id,
            cost_model=self.config.cost_model,
            role="chosen",
            matched_blocks=matched_blocks,
            phase_aware=self.config.phase_aware,
            interference_weight=self.config.phase_interference_weight,
        )
        return Decision(
            endpoint_id=endpoint_id,
            reason=reason,
            policy=self.name,
            predicted_ttft_s=score.predicted_ttft_s,
            expected_cached_blocks=score.expected_cached_blocks,
            candidates=(score,),
            detail=detail,
        )


def eligible_endpoints(request: RoutingRequest, view: ClusterView) -> tuple[Endpoint, ...]:
    """Endpoints the request may go to; raises NoEndpointError when there are none."""
    endpoints = tuple(e for e in view.endpoints if e.id not in request.exclude)
    if not endpoints:
        if view.endpoints:
            raise NoEndpointError(
                f"all {len(view.endpoints)} endpoints are excluded for request "
                f"{request.request_id!r}"
            )
        raise NoEndpointError("the pool has no routable endpoint")
    return endpoints


def cost_model_of(view: ClusterView, endpoint_id: str, default: CostModel) -> CostModel:
    """The endpoint's fitted cost model when the view has one, else `default` (the profile)."""
    return cast(CostModel, view.cost_models.get(endpoint_id, default))


def slo_of(request: RoutingRequest, config: PolicyConfig) -> float:
    return config.ttft_slo_s if request.ttft_slo_s is None else request.ttft_slo_s


def score_endpoint(
    request: RoutingRequest,
    view: ClusterView,
    endpoint_id: str,
    *,
    cost_model: CostModel,
    role: str = "",
    matched_blocks: int | None = None,
    phase_aware: bool = False,
    interference_weight: float = 0.0,
    charge_eviction: bool = False,
) -> CandidateScore:
    """Predicted TTFT of `request` on `endpoint_id`, from the view's load and prefix record,
    with the endpoint's fitted cost model when the view has one, else `cost_model`.

    Phase-blind, the score is the predicted TTFT. `phase_aware`: the TTFT counts the decode
    steps interleaved with the prefill there, and the score adds `interference_weight` times
    the delay the request inflicts on the sequences decoding there (its prefill, then its
    expected output; `CostModel.interference_s`), so that among otherwise equal candidates the
    one with less decode work to disturb ranks first.

    `charge_eviction`: the score adds the prefill time of the uncached part times the
    endpoint's scraped KV usage (nothing when no fresh scrape gives it). A prompt placed where
    memory is nearly full evicts about as much cached prefix as it brings, which later
    requests pay to recompute, and past full the engine preempts running sequences. The
    predicted TTFT, which the SLO check reads, stays the cost model's.
    """
    matched = (
        view.prefix_index.matched_blocks(endpoint_id, request.keys)
        if matched_blocks is None
        else matched_blocks
    )
    cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
    load = view.load(endpoint_id)
    uncached = request.prompt_tokens - cached
    cost_model = cost_model_of(view, endpoint_id, cost_model)
    ttft = cost_model.estimate_ttft_s(
        uncached_tokens=uncached, cached_tokens=cached, load=load, phase_aware=phase_aware
    )
    score = ttft
    if phase_aware and interference_weight > 0:
        score += interference_weight * cost_model.interference_s(
            uncached_tokens=uncached,
            cached_tokens=cached,
            prompt_tokens=request.prompt_tokens,
            expected_output_tokens=request.expected_output_tokens,
            load=load,
        )
    if charge_eviction and load.kv_usage is not None:
        pressure = min(1.0, max(0.0, load.kv_usage))
        recompute = cost_model.prefill_time_s(uncached_tokens=uncached, cached_tokens=cached)
        score += pressure * recompute
    return CandidateScore(
        endpoint_id=endpoint_id,
        score=score,
        predicted_ttft_s=ttft,
        expected_cached_blocks=matched,
        pending_prefill_tokens=load.pending_prefill_tokens,
        role=role,
    )
