"""cache_aware: the SGLang router's (and vllm-router's) cache-aware rule.

Steps, with the router's defaults (balance_abs_threshold 64, balance_rel_threshold 1.5,
cache_threshold 0.3):
1. Load = requests in flight per endpoint (the router's own count of what it sent and has not
   seen finish; here the scheduler's leases). Imbalanced when
   (max - min) > balance_abs_threshold AND max > balance_rel_threshold x min:
   then the least loaded endpoint (LEAST_LOADED), ignoring the cache.
2. Otherwise the best prefix match: the endpoint whose recorded prefix (the prefix index,
   standing in for the router's approximate per-worker radix tree) covers the most blocks of
   the prompt. Match ratio = matched blocks / prompt blocks (the router counts characters of
   the text; blocks are our unit). Ratio > cache_threshold: that endpoint (CACHE_AFFINITY);
   among equally good matches, the first in the view's order.
3. Else the least loaded endpoint (LEAST_LOADED).
Ties for least loaded go to the first endpoint in the view's order, like the router's
`min_by_key` over its worker list. This is faithful on purpose: with no prefix match and
little load, every unrelated prompt goes to the same first idle worker, which costs the peer
routers cache hit rate and balance at low concurrency (measured on real vLLM engines;
docs/design.md, "The baselines").

Cost: O(N) over the in-flight counts, plus `holders` (a binary search per holder of the
prompt's first block).
"""

from __future__ import annotations

from twinroute.scheduler.policies.base import Policy, eligible_endpoints
from twinroute.scheduler.types import ClusterView, Decision, RoutingRequest

from twinroute.vocabulary import DecisionReason


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        eligible = eligible_endpoints(request, view)
        config = self.config
        loads = [view.load(e.id).in_flight for e in eligible]
        least_at = loads.index(min(loads))
        least_id = eligible[least_at].id
        highest, lowest = max(loads), loads[least_at]
        if len(eligible) == 1:
            return self._decide(request, view, least_id, DecisionReason.ONLY_CANDIDATE, "")
        if (
            highest - lowest > config.balance_abs_threshold
            and highest > config.balance_rel_threshold * lowest
        ):
            return self._decide(
                request,
                view,
                least_id,
                DecisionReason.LEAST_LOADED,
                f"imbalanced (in flight max {highest}, min {lowest}): least loaded",
            )
        holders = view.prefix_index.holders(request.keys)
        best_id, best_blocks = "", 0
        if holders:
            for endpoint in eligible:
                matched = holders.get(endpoint.id, 0)
                if matched > best_blocks:
                    best_id, best_blocks = endpoint.id, matched
        blocks = request.keys.num_blocks
        ratio = best_blocks / blocks if blocks else 0.0
        if best_id and ratio > config.cache_threshold:
            return self._decide(
                request,
                view,
                best_id,
                DecisionReason.CACHE_AFFINITY,
                f"match {best_blocks}/{blocks} blocks ({ratio:.2f} > {config.cache_threshold:g})",
                matched_blocks=best_blocks,
            )
        return self._decide(
            request,
            view,
            least_id,
            DecisionReason.LEAST_LOADED,
            f"best match {best_blocks}/{blocks} blocks ({ratio:.2f} <= "
            f"{config.cache_threshold:g}): least loaded ({lowest} in flight)",
            matched_blocks=holders.get(least_id, 0) if holders else 0,
        )
