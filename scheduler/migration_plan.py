"""Live migration of running requests, planned: a Llumnix-style policy (pure, deterministic).

`plan_migrations` proposes moves from the instances' loads; `scheduler/migration.py` carries
them out. Steps:
1. Load of an instance = (KV blocks used + KV demand of its first waiting request) / KV blocks
   (Llumnix's "virtual usage", as a fraction of memory). A draining instance counts as
   infinitely loaded, so everything on it leaves.
2. Imbalance: sources sorted by load descending, targets ascending (ties by endpoint id); the
   i-th source is paired with the i-th target while the source's load exceeds the target's by
   more than `min_gap`. From each source, requests are tried by KV blocks ascending (short ones
   are cheapest to move and to recompute); a move is proposed only when the pair's load gap
   shrinks and the target stays under `migrate_out_threshold` (it must not become a source),
   at most `max_per_pair` moves per pair and round.
3. Drain: every request on a draining instance goes to the least loaded target that has room
   for its blocks, loads updated after each placement.

Cost: O(instances log instances + requests on the sources log requests) per round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from twinroute.scheduler.api import Trigger

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request an instance runs: the engine's id (hook path) and/or the lease (router path)."""

    request_id: str
    kv_blocks: int
    lease_id: str = ""


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    endpoint_id: str
    capacity_blocks: int
    used_blocks: int
    # KV demand of the first waiting request (Llumnix counts it against the instance).
    waiting_blocks: int = 0
    running: tuple[RunningRequest, ...] = ()
    draining: bool = False

    @property
    def load(self) -> float:
        if self.draining:
            return math.inf
        return (self.used_blocks + self.waiting_blocks) / max(1, self.capacity_blocks)


@dataclass(frozen=True, slots=True)
class MigrationPolicySettings:
    # Load gap (fraction of KV memory) between a pair that counts as imbalance.
    min_gap: float = 0.2
    # A target must stay at or under this load after the move.
    migrate_out_threshold: float = 0.8
    max_per_pair: int = 1


@dataclass(frozen=True, slots=True)
class MigrationProposal:
    source: str
    target: str
    request: RunningRequest
    trigger: Trigger
    # Loads of source and target before and after the move (source is inf when draining).
    gap_before: float
    gap_after: float


def plan_migrations(
    instances: Sequence[InstanceLoad],
    *,
    settings: MigrationPolicySettings = MigrationPolicySettings(),
) -> list[MigrationProposal]:
    """Proposals for one round; see the module docstring for the steps."""
    used = {i.endpoint_id: i.used_blocks + i.waiting_blocks for i in instances}
    capacity = {i.endpoint_id: max(1, i.capacity_blocks) for i in instances}
    targets = [i for i in instances if not i.draining]

    def load(endpoint_id: str) -> float:
        return used[endpoint_id] / capacity[endpoint_id]

    proposals: list[MigrationProposal] = []
    for source in sorted((i for i in instances if i.draining), key=lambda i: i.endpoint_id):
        for request in sorted(source.running, key=lambda r: (r.kv_blocks, r.request_id)):
            fitting = [
                t
                for t in targets
                if used[t.endpoint_id] + request.kv_blocks <= capacity[t.endpoint_id]
            ]
            if not fitting:
                logger.warning(
                    "drain of %s: no instance has room for %s (%d blocks)",
                    source.endpoint_id, request.request_id, request.kv_blocks,
                )  # fmt: skip
                continue
            target = min(fitting, key=lambda t: (load(t.endpoint_id), t.endpoint_id))
            used[target.endpoint_id] += request.kv_blocks
            proposals.append(
                MigrationProposal(
                    source=source.endpoint_id,
                    target=target.endpoint_id,
                    request=request,
                    trigger=Trigger.DRAIN,
                    gap_before=math.inf,
                    gap_after=math.inf,
                )
            )

    by_load = sorted(targets, key=lambda i: (-load(i.endpoint_id), i.endpoint_id))
    half = len(by_load) // 2
    sources = by_load[:half]
    receivers = sorted(by_load[half:], key=lambda i: (load(i.endpoint_id), i.endpoint_id))
    for source, target in zip(sources, receivers, strict=False):
        s_id, t_id = source.endpoint_id, target.endpoint_id
        moved = 0
        for request in sorted(source.running, key=lambda r: (r.kv_blocks, r.request_id)):
            if moved >= settings.max_per_pair:
                break
            gap = load(s_id) - load(t_id)
            if gap <= settings.min_gap:
                break
            blocks = request.kv_blocks
            after_source = (used[s_id] - blocks) / capacity[s_id]
            after_target = (used[t_id] + blocks) / capacity[t_id]
            gap_after = after_source - after_target
            if abs(gap_after) >= gap or after_target > settings.migrate_out_threshold:
                continue
            used[s_id] -= blocks
            used[t_id] += blocks
            moved += 1
            proposals.append(
                MigrationProposal(
                    source=s_id,
                    target=t_id,
                    request=request,
                    trigger=Trigger.IMBALANCE,
                    gap_before=gap,
                    gap_after=gap_after,
                )
            )
    return proposals
