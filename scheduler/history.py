"""`DecisionHistory`: what a core decided, for Explain and the decisions metric.

A bounded record of the newest decisions (oldest dropped first) and a count of every decision
by reason since start; moves of a placed request (hotspot rebalancing, drain) are recorded as
decisions of their own, so Explain shows where a request went last and why.

Cost: O(1) to record; `recent` walks back from the newest until it has `limit` records.
"""

from __future__ import annotations

import collections

from twinroute.scheduler.types import Decision, DecisionRecord, RoutingRequest

from twinroute.vocabulary import DecisionReason


class DecisionHistory:
    def __init__(self, *, size: int = 1024) -> None:
        self._records: collections.deque[DecisionRecord] = collections.deque(maxlen=size)
        self.by_reason: collections.Counter[DecisionReason] = collections.Counter()

    def record(
        self, request: RoutingRequest, decision: Decision, *, lease_id: str, now: float
    ) -> None:
        self.by_reason[decision.reason] += 1
        self._records.append(
            DecisionRecord(
                request_id=request.request_id,
                lease_id=lease_id,
                decided_at=now,
                prompt_blocks=request.keys.num_blocks,
                prompt_tokens=request.prompt_tokens,
                decision=decision,
            )
        )

    def recent(self, limit: int = 50, *, request_id: str | None = None) -> list[DecisionRecord]:
        """The newest decisions first, optionally only those of one request."""
        records: list[DecisionRecord] = []
        for record in reversed(self._records):
            if request_id is not None and record.request_id != request_id:
                continue
            records.append(record)
            if len(records) >= limit:
                break
        return records

    @property
    def slo_switches(self) -> int:
        """Decisions that left the cache-affinity candidate because it would break the SLO."""
        return self.by_reason[DecisionReason.SLO_SWITCH]
