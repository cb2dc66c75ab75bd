"""The simulator's router: the live `SchedulerCore` with a policy from `make_policy`.

Nothing here decides anything: it only translates the simulator's callbacks into the calls the
live scheduler makes (pick, first token, complete, scrape, expiry), so a policy behaves in the
simulation exactly as it would in production.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.keys import keys_from_block_ids, namespace_seed
from twinroute.scheduler.policies.pd import PdSettings
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


class CoreRouter:
    """Adapts `SchedulerCore` to the simulator's `Router` protocol."""

    def __init__(self, core: SchedulerCore) -> None:
        self._core = core

    def pick(self, request: RoutingRequest, *, now: float) -> tuple[str, Decision]:
        result = self._core.pick(request, now=now)
        return result.lease_id, result.decision

    def first_token(self, lease_id: str, *, now: float) -> None:
        self._core.first_token(lease_id, now=now)

    def prefill_done(self, lease_id: str, *, now: float) -> None:
        self._core.prefill_done(lease_id, now=now)

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
        return [(m.lease_id, m.source, m.target) for m in self._core.plan_rebalance(now=now)]

    def move(self, lease_id: str, *, target: str, now: float) -> bool:
        return self._core.move(lease_id, target=target, now=now)

    def counters(self) -> dict[str, int]:
        return {"slo_switches": self._core.slo_switches}

    # Elastic scaling (`simulate(membership=...)`): what discovery and the operator's Drain do.

    def set_endpoints(self, endpoints: tuple[Endpoint, ...], *, now: float) -> None:
        self._core.set_endpoints(endpoints, now=now)

    def drain(self, endpoint_id: str, *, now: float) -> None:
        self._core.drain(endpoint_id)

    def plan_drain_moves(self, endpoint_id: str, *, now: float) -> list[tuple[str, str, str]]:
        return [
            (m.lease_id, m.source, m.target)
            for m in self._core.plan_drain_moves(endpoint_id, now=now)
        ]

    def move_drained(self, lease_id: str, *, target: str, now: float) -> bool:
        return self._core.move(lease_id, target=target, now=now, cause="drain")


def core_router_factory(
    *,
    policy: str,
    cost: CostModel,
    ttft_slo_s: float,
    scrape_interval_s: float,
    seed: int,
    prefix_capacity_blocks: int,
    rebalance: bool = True,
    phase_aware: bool = True,
    pd: PdSettings | None = None,
    phase_interference_weight: float | None = None,
) -> Callable[[tuple[Endpoint, ...]], Router]:
    """Builds a fresh core and policy per simulation, as a scheduler process would.

    The prefix index holds, per endpoint, as many blocks as the engine's KV cache does, as a
    deployment configures it from the engines' KV size (vLLM logs and exports it): an index
    that remembered more than the engine can hold would promise reuse that was evicted.
    """
    from twinroute.scheduler.policies import PolicyConfig, make_policy

    def build(endpoints: tuple[Endpoint, ...]) -> Router:
        config = PolicyConfig(
            ttft_slo_s=ttft_slo_s, cost_model=cost, seed=seed, phase_aware=phase_aware
        )
        if phase_interference_weight is not None:
            config = dataclasses.replace(
                config, phase_interference_weight=phase_interference_weight
            )
        chosen = make_policy(policy, config=config)
        core = SchedulerCore(
            policy=chosen,
            cost_model=cost,
            prefix_capacity_blocks=prefix_capacity_blocks,
            # A scrape older than a few intervals means the engine stopped answering.
            scrape_staleness_s=max(5.0, 4 * scrape_interval_s),
            rebalance=rebalance,
            pd=pd,
        )
        core.set_endpoints(endpoints, now=0.0)
        return CoreRouter(core)

    return build
