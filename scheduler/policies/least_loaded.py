"""least_loaded: the endpoint with the fewest pending prefill tokens.

Steps: score every eligible endpoint by the prefill tokens the scheduler believes are queued
there (DualMap's "Least Loaded" baseline); ties go to fewer in-flight requests, then to the
view's order. Ignores the prefix cache. O(N).
"""

from __future__ import annotations

from twinroute.scheduler.policies.base import Policy, eligible_endpoints, score_endpoint
from twinroute.scheduler.types import ClusterView, Decision, RoutingRequest

from twinroute.vocabulary import DecisionReason


class LeastLoadedPolicy(Policy):
    name = "least_loaded"

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        endpoints = eligible_endpoints(request, view)
        chosen = min(
            endpoints,
            key=lambda e: (view.load(e.id).pending_prefill_tokens, view.load(e.id).in_flight),
        )
        score = score_endpoint(
            request, view, chosen.id, cost_model=self.config.cost_model, role="least-loaded"
        )
        reason = (
            DecisionReason.ONLY_CANDIDATE if len(endpoints) == 1 else DecisionReason.LEAST_LOADED
        )
        return Decision(
            endpoint_id=chosen.id,
            reason=reason,
            policy=self.name,
            predicted_ttft_s=score.predicted_ttft_s,
            expected_cached_blocks=score.expected_cached_blocks,
            candidates=(score,),
        )
