"""round_robin: rotate over the eligible endpoints.

Steps: take the next endpoint in a rotation over the view's endpoints (in view order), skipping
excluded ones. No load or cache information. O(1) amortised.
"""

from __future__ import annotations

import itertools

from twinroute.scheduler.policies.base import Policy, PolicyConfig, eligible_endpoints
from twinroute.scheduler.types import ClusterView, Decision, RoutingRequest

from twinroute.vocabulary import DecisionReason


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, *, config: PolicyConfig) -> None:
        super().__init__(config=config)
        self._turn = itertools.count()

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        endpoints = eligible_endpoints(request, view)
        chosen = endpoints[next(self._turn) % len(endpoints)]
        reason = (
            DecisionReason.ONLY_CANDIDATE if len(endpoints) == 1 else DecisionReason.ROUND_ROBIN
        )
        return Decision(endpoint_id=chosen.id, reason=reason, policy=self.name)
