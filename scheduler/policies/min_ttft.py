"""min_ttft: the endpoint with the lowest estimated TTFT (Mooncake's Conductor-like rule).

Steps: for every eligible endpoint, predicted TTFT = time to clear its pending prefill (cost
model queueing) + prefill of the prompt's part it is not believed to hold (the prefix index);
take the minimum (MIN_TTFT). Ties go to fewer pending prefill tokens, then the view's order.
It trades cache for load on every request, which makes it oscillate between the instance with
the cache and an idle one (DualMap's argument against per-request minimum TTFT).

Cost: one `holders` call (a binary search per holder of the first block) and O(N) arithmetic;
the prefill time is computed once per distinct matched depth, not per endpoint.
"""

from __future__ import annotations

from twinroute.scheduler.policies.base import (
    Policy,
    cost_model_of,
    eligible_endpoints,
    score_endpoint,
)
from twinroute.scheduler.types import (
    CandidateScore,
    ClusterView,
    Decision,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

REPORTED_CANDIDATES = 3


class MinTtftPolicy(Policy):
    name = "min_ttft"

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        eligible = eligible_endpoints(request, view)
        profile = self.config.cost_model
        holders = view.prefix_index.holders(request.keys)
        # Shared by the endpoints predicted with the profile (one prefill per cached depth).
        prefill_by_matched: dict[int, float] = {}
        ranked: list[tuple[float, int, int, str, int]] = []
        for order, endpoint in enumerate(eligible):
            matched = holders.get(endpoint.id, 0)
            cost = cost_model_of(view, endpoint.id, profile)
            prefill = prefill_by_matched.get(matched) if cost is profile else None
            if prefill is None:
                cached = request.keys.prefix_tokens(matched, prompt_tokens=request.prompt_tokens)
                prefill = cost.prefill_time_s(
                    uncached_tokens=request.prompt_tokens - cached, cached_tokens=cached
                )
                if cost is profile:
                    prefill_by_matched[matched] = prefill
            load = view.load(endpoint.id)
            ttft = cost.queue_time_s(load) + prefill
            ranked.append((ttft, load.pending_prefill_tokens, order, endpoint.id, matched))
        best = min(ranked)
        shortlist = sorted(ranked)[:REPORTED_CANDIDATES] if len(ranked) > 1 else [best]
        candidates = tuple(self._score(request, view, entry) for entry in shortlist)
        chosen = candidates[0]
        reason = DecisionReason.ONLY_CANDIDATE if len(eligible) == 1 else DecisionReason.MIN_TTFT
        return Decision(
            endpoint_id=chosen.endpoint_id,
            reason=reason,
            policy=self.name,
            predicted_ttft_s=chosen.predicted_ttft_s,
            expected_cached_blocks=chosen.expected_cached_blocks,
            candidates=candidates,
            detail=(
                f"lowest predicted TTFT {chosen.predicted_ttft_s:.3f}s of {len(eligible)} "
                f"endpoints ({chosen.expected_cached_blocks} cached blocks)"
            ),
        )

    def _score(
        self, request: RoutingRequest, view: ClusterView, entry: tuple[float, int, int, str, int]
    ) -> CandidateScore:
        _ttft, _pending, _order, endpoint_id, matched = entry
        return score_endpoint(
            request,
            view,
            endpoint_id,
            cost_model=self.config.cost_model,
            role="min-ttft",
            matched_blocks=matched,
        )
