"""`SchedulerClient`: the `twinroute.v1.Scheduler` service over one grpc.aio channel, with the
same shapes and errors as the in-process `SchedulerService` (`twinroute.scheduler.api`).

Every call carries a deadline. A status the server raised on purpose comes back as the typed
error it stands for (the server names it in the `twinroute-error` trailing metadata); anything
else (connection refused, deadline exceeded) raises `SchedulerUnreachableError`, so a router can
fall back without confusing "the scheduler is down" with "the pool is empty".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
from twinroute.scheduler.api import (
    ERROR_KIND_METADATA,
    DrainResult,
    InvalidPickError,
    Outcome,
    PickAnswer,
    PickQuery,
    ProgressEvent,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.core import DecisionRecord
from twinroute.scheduler.migration import MigrationOrder, MigrationReport, Trigger
from twinroute.scheduler.types import (
    CandidateScore,
    Decision,
    DecisionReason,
    Endpoint,
    NoEndpointError,
    Role,
)
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc


class SchedulerUnreachableError(ConnectionError):
    """The scheduler could not answer (connection, deadline, server error)."""


_ROLE_FROM_PB = {
    pb.ROLE_UNIFIED: Role.UNIFIED,
    pb.ROLE_PREFILL: Role.PREFILL,
    pb.ROLE_DECODE: Role.DECODE,
}
_OUTCOME_TO_PB = {
    "success": pb.OUTCOME_SUCCESS,
    "engine_error": pb.OUTCOME_ENGINE_ERROR,
    "stream_error": pb.OUTCOME_STREAM_ERROR,
    "cancelled": pb.OUTCOME_CANCELLED,
    "timeout": pb.OUTCOME_TIMEOUT,
}
_PROGRESS_TO_PB = {
    "prefill_done": pb.PROGRESS_EVENT_PREFILL_DONE,
    "first_token": pb.PROGRESS_EVENT_FIRST_TOKEN,
    "prefill_fell_back": pb.PROGRESS_EVENT_PREFILL_FELL_BACK,
}
_ERRORS: dict[str, type[Exception]] = {
    "invalid": InvalidPickError,
    "unknown_model": UnknownModelError,
    "no_endpoint": NoEndpointError,
    "unknown_endpoint": UnknownEndpointError,
    "unauthenticated": PermissionError,
    "permission_denied": PermissionError,
}


def reason_from_pb(value: int) -> DecisionReason:
    """The value type of a reason; one this client does not know (UNSPECIFIED, or a reason a
    newer server added) raises ValueError rather than being guessed."""
    try:
        return DecisionReason[
            pb.DecisionReason.Name(pb.DecisionReason.ValueType(value)).removeprefix(
                "DECISION_REASON_"
            )
        ]
    except (KeyError, ValueError):
        raise ValueError(f"decision reason {value} is not known to this client") from None


def endpoint_from_pb(message: pb.Endpoint) -> Endpoint:
    return Endpoint(
        id=message.id,
        address=message.address,
        role=_ROLE_FROM_PB.get(message.role, Role.UNIFIED),
        model=message.model,
        labels=dict(message.labels),
    )


def _raise_typed(error: grpc.aio.AioRpcError) -> None:
    kind = ""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_KIND_METADATA:
            kind = str(value)
    typed = _ERRORS.get(kind)
    if typed is not None:
        raise typed(error.details() or kind) from None
    raise SchedulerUnreachableError(f"{error.code().name}: {error.details()}") from None


# A router usually starts beside its scheduler and may dial it first; gRPC's default reconnect
# backoff (1 s growing to 120 s) would then refuse picks for many seconds after the scheduler
# listens. Reconnect within a second instead: the channel is one connection to one peer.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class SchedulerClient:
    """Async client; build one per process and `await close()` at shutdown.

    Pick waits for the channel to be ready within its deadline (`wait_for_ready`) rather than
    failing at once while a connection is being re-established, so a scheduler that starts a
    moment after the router, or restarts, costs a short wait, not a failed pick; past the
    deadline the caller sees `SchedulerUnreachableError` (the router then falls back)."""

    def __init__(
        self,
        *,
        target: str,
        timeout_s: float = 1.0,
        admin_token: str | None = None,
        root_certificates: bytes | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is not None:
            self._channel = channel
        elif root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(target, credentials, options=RECONNECT_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub: Any = pb_grpc.SchedulerStub(self._channel)
        self._timeout_s = timeout_s
        self._admin_metadata = (
            (("authorization", f"Bearer {admin_token}"),) if admin_token else None
        )

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> PickAnswer:
        if query.token_ids is not None:
            ids = np.asarray(query.token_ids, dtype=np.uint32)
            prompt = pb.Prompt(token_ids=pb.TokenIds(ids=ids))
        else:
            prompt = pb.Prompt(text=query.text or "")
        request = pb.PickRequest(
            request_id=query.request_id,
            model=query.model,
            prompt=prompt,
            session_id=query.session_id,
            lora_adapter=query.lora_adapter,
            cache_salt=query.cache_salt,
            expected_output_tokens=query.expected_output_tokens,
            ttft_slo_s=query.ttft_slo_s,
            prompt_tokens=query.prompt_tokens,
            exclude_endpoints=sorted(query.exclude_endpoints),
        )
        try:
            response = await self._stub.Pick(
                request, timeout=timeout_s or self._timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return PickAnswer(
            endpoint=endpoint_from_pb(response.endpoint),
            lease_id=response.lease_id,
            reason=reason_from_pb(response.reason),
            policy=response.policy,
            predicted_ttft_s=response.predicted_ttft_s,
            expected_cached_blocks=response.expected_cached_blocks,
            prefill_endpoint=(
                endpoint_from_pb(response.prefill_endpoint)
                if response.HasField("prefill_endpoint")
                else None
            ),
        )

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome = "success",
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        timeout_s: float | None = None,
    ) -> bool:
        """False when the scheduler no longer knew the lease (expired or closed twice)."""
        request = pb.CompleteRequest(
            lease_id=lease_id,
            outcome=_OUTCOME_TO_PB[outcome],
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )
        try:
            response = await self._stub.Complete(request, timeout=timeout_s or self._timeout_s)
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return bool(response.known)

    async def progress(
        self, *, lease_id: str, event: ProgressEvent, timeout_s: float | None = None
    ) -> bool:
        """Report a milestone of a placed request; False when the scheduler did not apply it."""
        request = pb.ProgressRequest(lease_id=lease_id, event=_PROGRESS_TO_PB[event])
        try:
            response = await self._stub.Progress(request, timeout=timeout_s or self._timeout_s)
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return bool(response.known)

    async def list_endpoints(self, *, model: str = "") -> pb.ListEndpointsResponse:
        try:
            response: pb.ListEndpointsResponse = await self._stub.ListEndpoints(
                pb.ListEndpointsRequest(model=model), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return response

    async def explain(self, *, limit: int = 20, request_id: str = "") -> list[DecisionRecord]:
        try:
            response = await self._stub.Explain(
                pb.ExplainRequest(limit=limit, request_id=request_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return [_record_from_pb(record) for record in response.decisions]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        try:
            response = await self._stub.Drain(
                pb.DrainRequest(endpoint_id=endpoint_id, timeout_s=timeout_s),
                timeout=timeout_s + self._timeout_s,
                metadata=self._admin_metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return DrainResult(
            drained=response.drained, remaining_in_flight=response.remaining_in_flight
        )

    async def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Migration orders as the scheduler issues them (admin RPC), until cancelled. Raises
        `SchedulerUnreachableError` when the stream cannot be opened or breaks."""
        call = self._stub.WatchMigrations(
            pb.WatchMigrationsRequest(watcher=watcher), metadata=self._admin_metadata
        )
        try:
            async for message in call:
                yield order_from_pb(message)
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        finally:
            call.cancel()

    async def report_migration(self, report: MigrationReport) -> bool:
        """What became of an order (admin RPC); False when the scheduler did not know it."""
        try:
            response = await self._stub.ReportMigration(
                pb.MigrationReport(
                    migration_id=report.migration_id,
                    lease_id=report.lease_id,
                    committed=report.committed,
                    reason=report.reason,
                    produced_tokens=report.produced_tokens,
                    pause_s=report.pause_s,
                ),
                timeout=self._timeout_s,
                metadata=self._admin_metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
            raise
        return bool(response.known)

    async def close(self) -> None:
        await self._channel.close()


_TRIGGER_FROM_PB = {
    pb.MIGRATION_TRIGGER_DRAIN: Trigger.DRAIN,
    pb.MIGRATION_TRIGGER_IMBALANCE: Trigger.IMBALANCE,
}


def order_from_pb(message: pb.MigrationOrder) -> MigrationOrder:
    return MigrationOrder(
        migration_id=message.migration_id,
        lease_id=message.lease_id,
        request_id=message.request_id,
        source=endpoint_from_pb(message.source),
        target=endpoint_from_pb(message.target),
        # An unknown (newer) trigger is still an order to carry out.
        trigger=_TRIGGER_FROM_PB.get(message.trigger, Trigger.IMBALANCE),
        deadline_s=message.deadline_s,
    )


def _record_from_pb(record: Any) -> DecisionRecord:
    candidates: Sequence[CandidateScore] = tuple(
        CandidateScore(
            endpoint_id=c.endpoint_id,
            score=c.score,
            predicted_ttft_s=c.predicted_ttft_s,
            expected_cached_blocks=c.expected_cached_blocks,
            pending_prefill_tokens=c.pending_prefill_tokens,
            role=c.role,
        )
        for c in record.candidates
    )
    return DecisionRecord(
        request_id=record.request_id,
        lease_id=record.lease_id,
        decided_at=record.decided_at,
        prompt_blocks=record.prompt_blocks,
        prompt_tokens=0,
        decision=Decision(
            endpoint_id=record.endpoint_id,
            reason=reason_from_pb(record.reason),
            policy=record.policy,
            predicted_ttft_s=record.predicted_ttft_s,
            key_depth=record.key_depth,
            candidates=tuple(candidates),
            detail=record.detail,
        ),
    )
