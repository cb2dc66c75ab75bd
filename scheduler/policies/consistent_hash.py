"""consistent_hash: one hash ring keyed on the prompt's first blocks (prefix hashing).

Steps: the key is the block hash of the first `hash_prefix_blocks` blocks (or of all of them
when the prompt is shorter; a prompt with no full block is keyed on its session or request
id, see `ring_keys.py`); the ring (`virtual_nodes` points per endpoint, vllm-router uses 160,
KubeAI 256) maps it to its owner clockwise. Excluded endpoints are skipped along the ring's
clockwise walk, so other keys keep their owner. No load information at all: a hot prefix lands
on one endpoint whatever its queue, which is this baseline's known weakness.

Cost: one bisect over N x V ring points (plus a short walk when the owner is excluded).
"""

from __future__ import annotations

from twinroute.scheduler.policies.base import (
    Policy,
    PolicyConfig,
    eligible_endpoints,
    score_endpoint,
)
from twinroute.scheduler.policies.ring_keys import SyncedRing, describe_key, prefix_key
from twinroute.scheduler.types import ClusterView, Decision, RoutingRequest

from twinroute.vocabulary import DecisionReason


class ConsistentHashPolicy(Policy):
    name = "consistent_hash"

    def __init__(self, *, config: PolicyConfig) -> None:
        super().__init__(config=config)
        self._ring = SyncedRing(virtual_nodes=config.virtual_nodes, seed=config.seed)

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        eligible = eligible_endpoints(request, view)
        self._ring.sync(view)
        key, depth = prefix_key(request, blocks=self.config.hash_prefix_blocks)
        if request.exclude:
            chosen = next(e for e in self._ring.ring.walk(key) if e not in request.exclude)
        else:
            chosen = self._ring.ring.lookup(key)
        score = score_endpoint(
            request, view, chosen, cost_model=self.config.cost_model, role="ring-owner"
        )
        return Decision(
            endpoint_id=chosen,
            reason=DecisionReason.ONLY_CANDIDATE if len(eligible) == 1 else DecisionReason.HASH,
            policy=self.name,
            predicted_ttft_s=score.predicted_ttft_s,
            expected_cached_blocks=score.expected_cached_blocks,
            key_depth=depth,
            candidates=(score,),
            detail=f"key {describe_key(request, depth)}: ring owner {chosen}",
        )
