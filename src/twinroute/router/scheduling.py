"""How the router asks for a placement: one small async interface, several backings.

`SchedulerPort` is what the request path needs (pick, then exactly one complete per pick).
Backings: `GrpcScheduler` (the `twinroute scheduler` service over gRPC),
`twinroute.router.embedded.CoreScheduler` (the scheduler's core in-process) and
`FallbackScheduler` (round robin over a static list, used when the scheduler cannot be
reached, so requests keep flowing and say so in their reason).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

Outcome = Literal["success", "engine_error", "stream_error", "cancelled", "timeout"]


@dataclass(frozen=True, slots=True)
class Placement:
    address: str
    endpoint_id: str
    lease_id: str
    reason: str
    predicted_ttft_s: float = 0.0
    prefill_address: str | None = None


class NoEndpointAvailable(LookupError):
    """The scheduler has no endpoint left for the request (empty pool or all excluded)."""


class SchedulerUnavailable(ConnectionError):
    """The scheduler could not be asked (connection, deadline)."""


@dataclass(frozen=True, slots=True)
class PickQuery:
    request_id: str
    model: str
    prompt_text: str | None
    token_ids: Sequence[int] | None
    session_id: str = ""
    lora_adapter: str = ""
    cache_salt: str = ""
    expected_output_tokens: int = 0
    ttft_slo_s: float = 0.0
    exclude_endpoints: frozenset[str] = frozenset()
    # Prompt length in model tokens: exact with token ids, else the router's estimate; 0 = none.
    prompt_tokens: int = 0


class SchedulerPort(Protocol):
    async def pick(self, query: PickQuery) -> Placement: ...

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None: ...

    async def close(self) -> None: ...


class FallbackScheduler:
    """Round robin over static `(endpoint_id, address)` pairs; leases are not tracked."""

    def __init__(self, *, endpoints: Sequence[tuple[str, str]], reason: str = "fallback") -> None:
        if not endpoints:
            raise ValueError("a fallback needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        self._turn = itertools.count()
        self._reason = reason

    async def pick(self, query: PickQuery) -> Placement:
        count = len(self._endpoints)
        start = next(self._turn)
        for offset in range(count):
            endpoint_id, address = self._endpoints[(start + offset) % count]
            if endpoint_id not in query.exclude_endpoints:
                return Placement(
                    address=address, endpoint_id=endpoint_id, lease_id="", reason=self._reason
                )
        raise NoEndpointAvailable(f"all {count} endpoints were excluded")

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        return None

    async def close(self) -> None:
        return None


class WithFallback:
    """Ask `primary`; when it cannot be reached, place the request with `fallback`."""

    def __init__(self, *, primary: SchedulerPort, fallback: SchedulerPort) -> None:
        self._primary = primary
        self._fallback = fallback

    async def pick(self, query: PickQuery) -> Placement:
        try:
            return await self._primary.pick(query)
        except SchedulerUnavailable as error:
            logger.warning("scheduler unavailable (%s); using the fallback policy", error)
            return await self._fallback.pick(query)

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        if not lease_id:  # placed by the fallback
            return
        try:
            await self._primary.complete(
                lease_id=lease_id,
                outcome=outcome,
                observed_ttft_s=observed_ttft_s,
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
            )
        except SchedulerUnavailable as error:
            # The lease expires by its TTL on the scheduler side; nothing leaks.
            logger.warning("could not complete lease %s: %s", lease_id, error)

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()


_OUTCOMES = {
    "success": "OUTCOME_SUCCESS",
    "engine_error": "OUTCOME_ENGINE_ERROR",
    "stream_error": "OUTCOME_STREAM_ERROR",
    "cancelled": "OUTCOME_CANCELLED",
    "timeout": "OUTCOME_TIMEOUT",
}


class GrpcScheduler:
    """The `twinroute.v1.Scheduler` service over one grpc.aio channel."""

    def __init__(self, *, target: str, timeout_s: float = 1.0) -> None:
        import grpc

        from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc

        self._grpc = grpc
        self._pb = scheduler_pb2
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._timeout_s = timeout_s

    async def pick(self, query: PickQuery) -> Placement:
        pb = self._pb
        if query.token_ids is not None:
            prompt = pb.Prompt(token_ids=pb.TokenIds(ids=list(query.token_ids)))
        else:
            prompt = pb.Prompt(text=query.prompt_text or "")
        request = pb.PickRequest(
            request_id=query.request_id,
            model=query.model,
            prompt=prompt,
            session_id=query.session_id,
            lora_adapter=query.lora_adapter,
            cache_salt=query.cache_salt,
            expected_output_tokens=query.expected_output_tokens,
            ttft_slo_s=query.ttft_slo_s,
            exclude_endpoints=sorted(query.exclude_endpoints),
            prompt_tokens=query.prompt_tokens,
        )
        try:
            response: Any = await self._stub.Pick(request, timeout=self._timeout_s)
        except self._grpc.aio.AioRpcError as error:
            code = error.code()
            if (
                code
                in (
                    self._grpc.StatusCode.NOT_FOUND,
                    self._grpc.StatusCode.UNAVAILABLE,
                    self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                    self._grpc.StatusCode.FAILED_PRECONDITION,
                )
                and "endpoint" in (error.details() or "").lower()
            ):
                raise NoEndpointAvailable(error.details() or "no endpoint") from None
            if code == self._grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(error.details() or "scheduler refused the request") from None
            raise SchedulerUnavailable(f"{code.name}: {error.details()}") from None
        prefill = response.prefill_endpoint.address if response.HasField("prefill_endpoint") else ""
        reason_name = pb.DecisionReason.Name(response.reason)
        return Placement(
            address=response.endpoint.address,
            endpoint_id=response.endpoint.id,
            lease_id=response.lease_id,
            reason=reason_name.removeprefix("DECISION_REASON_").lower(),
            predicted_ttft_s=response.predicted_ttft_s,
            prefill_address=prefill or None,
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
        pb = self._pb
        request = pb.CompleteRequest(
            lease_id=lease_id,
            outcome=pb.Outcome.Value(_OUTCOMES[outcome]),
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
        )
        try:
            await self._stub.Complete(request, timeout=self._timeout_s)
        except self._grpc.aio.AioRpcError as error:
            raise SchedulerUnavailable(f"{error.code().name}: {error.details()}") from None

    async def close(self) -> None:
        await self._channel.close()
