"""The simulator's router: the live `SchedulerCore`, built from `SchedulerSettings` by the same
builder as the live scheduler (`twinroute.scheduler.build`).

Nothing here decides anything: `CoreAdapter` only translates the simulator's callbacks into the
calls the live scheduler makes (pick, first token, complete, scrape, expiry, moves), so a
policy behaves in the simulation exactly as it would in production.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from twinroute.scheduler.build import build_core
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.keys import keys_from_block_ids, namespace_seed
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Decision, Endpoint, PromptKeys, RoutingRequest
from twinroute.simulator.cluster import Router


def trace_keys(
    *, block_size: int, model: str, seed: int
) -> Callable[[npt.NDArray[np.int64], int], PromptKeys]:
    """Prompt keys from trace block ids, in a namespace that depends on the seed."""
    namespace = namespace_seed(model=model, cache_salt=f"twinroute-sim-{seed}")

    def keys_for(block_ids: npt.NDArray[np.int64], prompt_tokens: int) -> PromptKeys:
        return keys_from_block_ids(
            block_ids, block_size=block_size, total_tokens=prompt_tokens, seed=namespace
        )

    return keys_for


class CoreAdapter:
    """The simulator's `Router` protocol over a `SchedulerCore`."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    def pick(self, request: RoutingRequest, *, now: float) -> tuple[str, Decision]:
        result = self._core.pick(request, now=now)
        return result.lease_id, result.decision

    def first_token(self, lease_id: str, *, now: float) -> None:
        self._core.first_token(lease_id, now=now)

    def prefill_done(self, lease_id: str, *, now: float) -> None:
        self._core.prefill_leases.done(lease_id, now=now)

    def complete(
        self, lease_id: str, *, now: float, observed_ttft_s: float, output_tokens: int
    ) -> None:
        self._core.complete(
            lease_id,
            now=now,
            success=True,
            observed_ttft_s=observed_ttft_s,
            output_tokens=output_tokens,
        )

    def update_scrape(
        self, endpoint_id: str, *, running: int, queued: int, kv_usage: float, now: float
    ) -> None:
        self._core.update_scrape(
            endpoint_id, running=running, queued=queued, kv_usage=kv_usage, now=now
        )

    def tick(self, *, now: float) -> list[tuple[str, str, str]]:
        self._core.expire(now)
        # DualMap's hotspot rebalancing, for policies that ask for it; the simulator moves
        # only requests it can withdraw (still queued, not admitted by the engine).
        return [(m.lease_id, m.source, m.target) for m in self._core.moves.rebalance(now=now)]

    def move(self, lease_id: str, *, target: str, now: float) -> bool:
        return self._core.move(lease_id, target=target, now=now)

    def counters(self) -> dict[str, int]:
        return {"slo_switches": self._core.history.slo_switches}

    # Elastic scaling (`simulate(membership=...)`): what discovery and the operator's Drain do.

    def set_endpoints(self, endpoints: tuple[Endpoint, ...], *, now: float) -> None:
        self._core.set_endpoints(endpoints, now=now)

    def drain(self, endpoint_id: str, *, now: float) -> None:
        self._core.drain(endpoint_id)

    def plan_drain_moves(self, endpoint_id: str, *, now: float) -> list[tuple[str, str, str]]:
        return [
            (m.lease_id, m.source, m.target) for m in self._core.moves.drain(endpoint_id, now=now)
        ]

    def move_drained(self, lease_id: str, *, target: str, now: float) -> bool:
        return self._core.move(lease_id, target=target, now=now, cause="drain")


def core_adapter_factory(
    settings: SchedulerSettings, *, cost: CostModel
) -> Callable[[tuple[Endpoint, ...]], Router]:
    """Builds a fresh core and policy per simulation, as a scheduler process would, predicting
    with `cost` (the simulated instances' own model).

    The prefix index holds, per endpoint, as many blocks as the engine's KV cache does
    (`settings.prefix_capacity_tokens`), as a deployment configures it from the engines' KV
    size: an index that remembered more than the engine can hold would promise reuse that was
    evicted.
    """

    def build(endpoints: tuple[Endpoint, ...]) -> Router:
        core = build_core(settings, cost_model=cost)
        core.set_endpoints(endpoints, now=0.0)
        return CoreAdapter(core)

    return build
