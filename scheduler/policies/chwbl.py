"""chwbl: consistent hashing with bounded loads, as KubeAI's prefix-hash load balancer does it.

Steps (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads"; KubeAI's
`PrefixHash` strategy):
1. Key: the block hash of the prompt's first `hash_prefix_blocks` blocks (KubeAI hashes the
   first N characters plus the LoRA adapter; our block keys carry the namespace already).
2. Capacity: cap = ceil(chwbl_load_factor x (total in-flight + 1) / n) over the n eligible
   endpoints; the mean counts the request being placed, as in the paper, so cap >= 1 and at
   least one endpoint is always under it.
3. Walk the ring clockwise from the key and take the first endpoint that is not excluded and
   whose in-flight count is below cap (it can take one more without exceeding the bound).
   Reason HASH when the key's own owner took it, HASH_BOUNDED when a full one was skipped.
In-flight counts are the scheduler's own leases (always known, never stale).

Cost: O(N) to sum the in-flight counts, one bisect, and a walk of at most N distinct endpoints
(short in practice: only endpoints at the bound are skipped).
"""

from __future__ import annotations

import math

from twinroute.scheduler.policies.base import (
    Policy,
    PolicyConfig,
    eligible_endpoints,
    score_endpoint,
)
from twinroute.scheduler.policies.ring_keys import SyncedRing, describe_key, prefix_key
from twinroute.scheduler.types import ClusterView, Decision, RoutingRequest

from twinroute.vocabulary import DecisionReason


class ChwblPolicy(Policy):
    name = "chwbl"

    def __init__(self, *, config: PolicyConfig) -> None:
        super().__init__(config=config)
        if config.chwbl_load_factor < 1.0:
            raise ValueError(
                f"chwbl_load_factor must be at least 1, got {config.chwbl_load_factor}"
            )
        self._ring = SyncedRing(virtual_nodes=config.virtual_nodes, seed=config.seed)

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        eligible = eligible_endpoints(request, view)
        self._ring.sync(view)
        key, depth = prefix_key(request, blocks=self.config.hash_prefix_blocks)
        in_flight = {e.id: view.load(e.id).in_flight for e in eligible}
        total = sum(in_flight.values())
        cap = math.ceil(self.config.chwbl_load_factor * (total + 1) / len(eligible))
        skipped: list[str] = []
        chosen = ""
        for endpoint_id in self._ring.ring.walk(key):
            load = in_flight.get(endpoint_id)
            if load is None:
                continue
            if load < cap:
                chosen = endpoint_id
                break
            skipped.append(endpoint_id)
        if not chosen:
            # Unreachable while cap >= mean + something; kept so a bad config cannot crash.
            chosen = min(in_flight, key=lambda e: (in_flight[e], e))
        score = score_endpoint(
            request, view, chosen, cost_model=self.config.cost_model, role="ring-walk"
        )
        if len(eligible) == 1:
            reason = DecisionReason.ONLY_CANDIDATE
        elif skipped:
            reason = DecisionReason.HASH_BOUNDED
        else:
            reason = DecisionReason.HASH
        detail = f"key {describe_key(request, depth)}; bound {cap} in flight"
        if skipped:
            detail += f"; skipped {len(skipped)} at the bound ({', '.join(skipped[:4])})"
        return Decision(
            endpoint_id=chosen,
            reason=reason,
            policy=self.name,
            predicted_ttft_s=score.predicted_ttft_s,
            expected_cached_blocks=score.expected_cached_blocks,
            key_depth=depth,
            candidates=(score,),
            detail=detail,
        )
