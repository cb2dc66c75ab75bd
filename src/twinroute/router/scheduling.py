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
ProgressEvent = Literal["prefill_done", "first_token", "prefill_fell_back"]


@dataclass(frozen=True, slots=True)
class Placement:
    address: str
    endpoint_id: str
    lease_id: str
    reason: str
    predicted_ttft_s: float = 0.0
    prefill_address: str | None = None
    prefill_endpoint_id: str | None = None


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

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> None:
        """A milestone of a placed request (prefill hop done, first token); best effort."""
        ...

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

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> None:
        return None

    async def close(self) -> None:
        return None


class WithFallback:
    """Ask `primary`; when it cannot be reached, place the request with `fallback`."""

    def __init__(self, *, primary: SchedulerPort, fallback: SchedulerPort) -> None:
        self._primary = primary
        self._fallback = fallback

    @property
    def primary(self) -> SchedulerPort:
        return self._primary

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

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> None:
        if lease_id:  # empty: placed by the fallback, which tracks nothing
            await self._primary.progress(lease_id=lease_id, event=event)

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()


class SchedulerBackend(Protocol):
    """What `SchedulerClient` (gRPC) and `SchedulerService` (in-process) both offer."""

    async def pick(self, query: Any) -> Any: ...

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> bool: ...


async def place(backend: SchedulerBackend, query: PickQuery) -> Placement:
    """Ask the scheduler for a placement and map its typed errors onto what the request path
    acts on: no endpoint for the request (answer the caller), a request the scheduler refuses
    (4xx), or a scheduler that cannot be reached (fall back)."""
    from twinroute.scheduler.api import InvalidPickError, UnknownModelError
    from twinroute.scheduler.api import PickQuery as SchedulerQuery
    from twinroute.scheduler.client import SchedulerUnreachableError
    from twinroute.scheduler.types import NoEndpointError

    try:
        answer = await backend.pick(
            SchedulerQuery(
                request_id=query.request_id,
                model=query.model,
                token_ids=query.token_ids,
                text=query.prompt_text if query.token_ids is None else None,
                session_id=query.session_id,
                lora_adapter=query.lora_adapter,
                cache_salt=query.cache_salt,
                expected_output_tokens=query.expected_output_tokens,
                ttft_slo_s=query.ttft_slo_s,
                prompt_tokens=query.prompt_tokens,
                exclude_endpoints=query.exclude_endpoints,
            )
        )
    except (NoEndpointError, UnknownModelError) as error:
        raise NoEndpointAvailable(str(error)) from None
    except InvalidPickError as error:
        raise ValueError(str(error)) from None
    except SchedulerUnreachableError as error:
        raise SchedulerUnavailable(str(error)) from None
    prefill = answer.prefill_endpoint
    return Placement(
        address=answer.endpoint.address,
        endpoint_id=answer.endpoint.id,
        lease_id=answer.lease_id,
        reason=answer.reason.value,
        predicted_ttft_s=answer.predicted_ttft_s,
        prefill_address=prefill.address if prefill is not None else None,
        prefill_endpoint_id=prefill.id if prefill is not None else None,
    )


class GrpcScheduler:
    """The `twinroute scheduler` service over gRPC, through the scheduler's own client."""

    def __init__(
        self,
        *,
        target: str,
        timeout_s: float = 1.0,
        admin_token: str | None = None,
        tls_ca: bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """`tls_ca` (PEM) switches the channel to TLS, trusting that CA; `tls_server_name` is
        the name the certificate must carry when it differs from `target`'s host (the scheduler
        reached by IP or 127.0.0.1). `admin_token` goes with the admin RPCs."""
        import grpc

        from twinroute.scheduler.client import RECONNECT_OPTIONS, SchedulerClient

        channel = None
        if tls_ca is not None:
            options: tuple[tuple[str, str | int], ...] = RECONNECT_OPTIONS + (
                (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
            )
            channel = grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options
            )
        self._client = SchedulerClient(
            target=target, timeout_s=timeout_s, admin_token=admin_token, channel=channel
        )

    @property
    def client(self) -> Any:
        """The `SchedulerClient` (migration orders ride on the same channel and token)."""
        return self._client

    async def pick(self, query: PickQuery) -> Placement:
        return await place(self._client, query)

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        from twinroute.scheduler.client import SchedulerUnreachableError

        try:
            await self._client.complete(
                lease_id=lease_id,
                outcome=outcome,
                observed_ttft_s=observed_ttft_s,
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
            )
        except SchedulerUnreachableError as error:
            raise SchedulerUnavailable(str(error)) from None

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> None:
        from twinroute.scheduler.client import SchedulerUnreachableError

        try:
            await self._client.progress(lease_id=lease_id, event=event)
        except SchedulerUnreachableError as error:
            raise SchedulerUnavailable(str(error)) from None

    async def close(self) -> None:
        await self._client.close()
