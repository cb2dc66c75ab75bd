"""The scheduler inside the router process (`twinroute router --embedded`).

Used when the router is the only way into a static pool: the same `SchedulerService` the gRPC
scheduler serves (the `SchedulerCore` the simulator also runs) decides in-process, with the
load it learns from its own leases (every request passes through this router, so the leases
see all of it). No gRPC hop per request.

Prompt keys: token ids in blocks of `key_block_tokens` when the router has them (local
tokenizer or a token-id prompt), else characters in blocks of `key_block_chars`. The scheduler
needs the prompt length in model tokens for its TTFT estimate; from text it is estimated with
`tokens_per_char`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twinroute.router.scheduling import Outcome, PickQuery, Placement, ProgressEvent, place


@dataclass(frozen=True, slots=True)
class KeySettings:
    key_block_tokens: int = 64
    key_block_chars: int = 256
    tokens_per_char: float = 0.25


class CoreScheduler:
    """`SchedulerPort` over an in-process `SchedulerService`."""

    def __init__(
        self,
        *,
        endpoints: Sequence[tuple[str, str]],
        policy: str,
        models: Sequence[str],
        ttft_slo_s: float = 0.0,
        keys: KeySettings = KeySettings(),
        clock: Callable[[], float] = time.monotonic,
        admission_hold: bool = False,
    ) -> None:
        """`admission_hold`: hold the answers of requests routed to a hotspot so that hotspot
        rebalancing can still move them (`twinroute.scheduler.admission`; at most its default
        max hold, as there is no RPC deadline in-process)."""
        from twinroute.scheduler.admission import AdmissionQueue
        from twinroute.scheduler.core import SchedulerCore
        from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
        from twinroute.scheduler.policies import PolicyConfig, make_policy
        from twinroute.scheduler.service import KeySettings as ServiceKeys
        from twinroute.scheduler.service import SchedulerService
        from twinroute.scheduler.types import Endpoint

        cost = COST_PROFILES[DEFAULT_COST_PROFILE]
        config = PolicyConfig(cost_model=cost)
        if ttft_slo_s > 0:
            config = PolicyConfig(cost_model=cost, ttft_slo_s=ttft_slo_s)
        core = SchedulerCore(policy=make_policy(policy, config=config), cost_model=cost)
        admission = AdmissionQueue(core=core, clock=clock) if admission_hold else None
        self._service = SchedulerService(
            core=core,
            keys=ServiceKeys(
                block_tokens=keys.key_block_tokens,
                block_chars=keys.key_block_chars,
                tokens_per_char=keys.tokens_per_char,
            ),
            clock=clock,
            served_models=models,
            admission=admission,
        )
        self._service.set_endpoints(
            # Every static engine serves every model the router serves.
            [Endpoint(id=eid, address=address) for eid, address in endpoints]
        )

    @property
    def service(self) -> Any:
        """The in-process `SchedulerService` (drain and migration reach it here)."""
        return self._service

    async def pick(self, query: PickQuery) -> Placement:
        return await place(self._service, query)

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        await self._service.complete(
            lease_id=lease_id,
            outcome=outcome,
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
        )

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> None:
        self._service.progress(lease_id=lease_id, event=event)

    async def close(self) -> None:
        if self._service.admission is not None:
            await self._service.admission.close()
