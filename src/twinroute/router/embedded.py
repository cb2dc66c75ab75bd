"""The scheduler's core inside the router process (`twinroute router --embedded`).

Used when the router is the only way into a static pool: the `SchedulerCore` that the gRPC
scheduler and the simulator share decides, with the load it learns from its own leases (every
request passes through this router, so the leases see all of it). No gRPC hop per request.

Prompt keys: token ids in blocks of `key_block_tokens` when the router has them (local
tokenizer or a token-id prompt), else characters in blocks of `key_block_chars`. The scheduler
needs the prompt length in model tokens for its TTFT estimate; from text it is estimated with
`tokens_per_char`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twinroute.router.scheduling import NoEndpointAvailable, Outcome, PickQuery, Placement


@dataclass(frozen=True, slots=True)
class KeySettings:
    key_block_tokens: int = 16
    key_block_chars: int = 64
    tokens_per_char: float = 0.25


class CoreScheduler:
    """`SchedulerPort` over an in-process `SchedulerCore`."""

    def __init__(
        self,
        *,
        endpoints: Sequence[tuple[str, str]],
        policy: str,
        model: str,
        ttft_slo_s: float = 0.0,
        keys: KeySettings = KeySettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from twinroute.scheduler.core import SchedulerCore
        from twinroute.scheduler.costmodel import COST_PROFILES, DEFAULT_COST_PROFILE
        from twinroute.scheduler.policies import PolicyConfig, make_policy
        from twinroute.scheduler.types import Endpoint

        cost = COST_PROFILES[DEFAULT_COST_PROFILE]
        config = PolicyConfig(cost_model=cost)
        if ttft_slo_s > 0:
            config = PolicyConfig(cost_model=cost, ttft_slo_s=ttft_slo_s)
        self._core = SchedulerCore(policy=make_policy(policy, config=config), cost_model=cost)
        self._clock = clock
        self._core.set_endpoints(
            [Endpoint(id=eid, address=address, model=model) for eid, address in endpoints],
            now=clock(),
        )
        self._keys = keys
        self._next_expiry = 0.0

    async def pick(self, query: PickQuery) -> Placement:
        from twinroute.scheduler.keys import keys_from_text, keys_from_tokens, namespace_seed
        from twinroute.scheduler.types import NoEndpointError, RoutingRequest

        seed = namespace_seed(
            model=query.model, lora_adapter=query.lora_adapter, cache_salt=query.cache_salt
        )
        if query.token_ids is not None:
            keys = keys_from_tokens(
                query.token_ids, block_size=self._keys.key_block_tokens, seed=seed
            )
            prompt_tokens = len(query.token_ids)
        else:
            text = query.prompt_text or ""
            keys = keys_from_text(text, block_chars=self._keys.key_block_chars, seed=seed)
            prompt_tokens = query.prompt_tokens or max(
                1, round(len(text) * self._keys.tokens_per_char)
            )
        now = self._clock()
        if now >= self._next_expiry:
            self._core.expire(now)
            self._next_expiry = now + 1.0
        request = RoutingRequest(
            request_id=query.request_id,
            keys=keys,
            prompt_tokens=prompt_tokens,
            session_id=query.session_id,
            expected_output_tokens=query.expected_output_tokens,
            ttft_slo_s=query.ttft_slo_s if query.ttft_slo_s > 0 else None,
            exclude=query.exclude_endpoints,
        )
        try:
            result = self._core.pick(request, now=now)
        except NoEndpointError as error:
            raise NoEndpointAvailable(str(error)) from None
        decision = result.decision
        return Placement(
            address=result.endpoint.address,
            endpoint_id=result.endpoint.id,
            lease_id=result.lease_id,
            reason=str(decision.reason.value),
            predicted_ttft_s=decision.predicted_ttft_s,
            prefill_address=result.prefill_endpoint.address if result.prefill_endpoint else None,
        )

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        self._core.complete(
            lease_id,
            now=self._clock(),
            success=outcome == "success",
            observed_ttft_s=observed_ttft_s if observed_ttft_s > 0 else None,
            output_tokens=output_tokens,
        )

    async def close(self) -> None:
        return None
