"""`SchedulerClient`: the scheduler's API (`scheduler/api.py`) over one grpc.aio channel, to the
`twinroute scheduler` service.

Every call carries a deadline. A status the server raised on purpose comes back as the typed
error it stands for (the server names it in the `twinroute-error` trailing metadata); anything
else (connection refused, deadline exceeded) raises `SchedulerUnreachableError`, so a router can
fail open without confusing "the scheduler is down" with "the pool is empty".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import grpc
from twinroute.scheduler import wire
from twinroute.scheduler.api import (
    DEFAULT_EXPLAIN_LIMIT,
    DrainResult,
    EndpointStatus,
    MigrationOrder,
    MigrationReport,
    Outcome,
    PickQuery,
    Placement,
    ProgressEvent,
    SchedulerUnreachableError,
)
from twinroute.scheduler.types import DecisionRecord
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc


def _raise_typed(error: grpc.aio.AioRpcError) -> NoReturn:
    kind = ""
    for key, value in error.trailing_metadata() or ():
        if key == wire.ERROR_KIND_METADATA:
            kind = str(value)
    typed = wire.ERROR_KINDS.get(kind)
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
        tls_server_name: str | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """`root_certificates` (PEM) switches the channel to TLS, trusting that CA;
        `tls_server_name` is the name the certificate must carry when it differs from
        `target`'s host (a scheduler reached by IP). `admin_token` goes with every call
        (a scheduler with a token refuses any call without it)."""
        if channel is not None:
            self._channel = channel
        elif root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            options: tuple[tuple[str, str | int], ...] = RECONNECT_OPTIONS
            if tls_server_name:
                options += (("grpc.ssl_target_name_override", tls_server_name),)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub: Any = pb_grpc.SchedulerStub(self._channel)
        self._background: set[asyncio.Task[None]] = set()
        self._pick_prefix = f"{uuid.uuid4().hex[:12]}-"
        self._pick_numbers = itertools.count(1)
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        """Pick, under a pick_id of this call's own: when the deadline passes or the caller
        goes away first, a Cancel for it follows in the background, so the lease the scheduler
        may have opened for the abandoned answer is closed at once, not at its time-to-live."""
        # Unique across clients and restarts; a counter, not a uuid per call (the hot path).
        pick_id = query.pick_id or f"{self._pick_prefix}{next(self._pick_numbers)}"
        message = wire.query_to_pb(query)
        message.pick_id = pick_id
        try:
            response = await self._stub.Pick(
                message,
                timeout=timeout_s or self._timeout_s,
                wait_for_ready=True,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self._cancel_soon(pick_id)
            _raise_typed(error)
        except asyncio.CancelledError:
            self._cancel_soon(pick_id)
            raise
        return Placement(wire.answer_from_pb(response), reports=self)

    async def cancel(self, *, pick_id: str) -> bool:
        try:
            response = await self._stub.Cancel(
                pb.CancelRequest(pick_id=pick_id), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.closed)

    def _cancel_soon(self, pick_id: str) -> None:
        async def cancel() -> None:
            with contextlib.suppress(Exception):  # best effort: the lease's TTL is the backstop
                await self.cancel(pick_id=pick_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome = "success",
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> bool:
        """False when the scheduler no longer knew the lease (expired or closed twice)."""
        request = pb.CompleteRequest(
            lease_id=lease_id,
            outcome=wire.outcome_to_pb(outcome),
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )
        try:
            response = await self._stub.Complete(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> bool:
        """Report a milestone of a placed request; False when the scheduler did not apply it."""
        request = pb.ProgressRequest(lease_id=lease_id, event=wire.progress_to_pb(event))
        try:
            response = await self._stub.Progress(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        try:
            response = await self._stub.Renew(
                pb.RenewRequest(lease_ids=lease_ids),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return int(response.known)

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        try:
            response = await self._stub.ListEndpoints(
                pb.ListEndpointsRequest(model=model),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return [
            EndpointStatus(
                endpoint=wire.endpoint_from_pb(message),
                routable=message.routable,
                load=wire.load_from_pb(message.load),
            )
            for message in response.endpoints
        ]

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        try:
            response = await self._stub.Explain(
                pb.ExplainRequest(limit=limit, request_id=request_id),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return [wire.record_from_pb(record) for record in response.decisions]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        try:
            response = await self._stub.Drain(
                pb.DrainRequest(endpoint_id=endpoint_id, timeout_s=timeout_s),
                timeout=timeout_s + self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return DrainResult(
            drained=response.drained, remaining_in_flight=response.remaining_in_flight
        )

    async def undrain(self, *, endpoint_id: str) -> bool:
        try:
            response = await self._stub.Undrain(
                pb.UndrainRequest(endpoint_id=endpoint_id),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.was_draining)

    async def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Migration orders as the scheduler issues them (admin RPC), until cancelled. Raises
        `SchedulerUnreachableError` when the stream cannot be opened or breaks."""
        call = self._stub.WatchMigrations(
            pb.WatchMigrationsRequest(watcher=watcher), metadata=self._metadata
        )
        try:
            async for message in call:
                yield wire.order_from_pb(message)
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        finally:
            call.cancel()

    async def report_migration(self, report: MigrationReport) -> bool:
        """What became of an order (admin RPC); False when the scheduler did not know it."""
        try:
            response = await self._stub.ReportMigration(
                wire.report_to_pb(report), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._timeout_s)
        await self._channel.close()
