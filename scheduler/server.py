"""The gRPC edge of the scheduler: the `twinroute.v1.Scheduler` servicer and `GrpcServer`.

The servicer only converts (`scheduler/wire.py`) and maps the API's typed errors onto status
codes; every decision is the in-process `SchedulerService`'s, so a router embedding the service
and one calling it over gRPC see the same behaviour. `GrpcServer` serves it with the standard
health and reflection services, optional TLS and a graceful stop: health goes NOT_SERVING first
(load balancers stop sending), held answers go out, then `server.stop(grace)` lets in-flight
RPCs finish while refusing new ones.

With a token configured, every call needs it (`authorization: Bearer <token>`), the data plane's
(Pick, Complete, Progress, Cancel) as much as the admin RPCs: a lease is closed by its id, so a
caller that can reach the port could otherwise close other requests' leases or Drain the pool.
Only the standard health service answers without it (the kubelet's probes). Refusals are logged
(at most one line per RPC and reason a minute) and counted in `calls_refused_total`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from twinroute.scheduler import wire
from twinroute.scheduler.api import (
    DEFAULT_EXPLAIN_LIMIT,
    InvalidPickError,
    MigrationOffError,
    StaleMembershipError,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.peers import FORWARDED_METADATA, PeerServicer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.tokens import TokenGuard
from twinroute.scheduler.types import NoEndpointError
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "twinroute.v1.Scheduler"

Context = grpc.aio.ServicerContext[Any, Any]
ExplainElsewhere = Callable[..., Awaitable[list[pb.DecisionRecord]]]


async def _abort(context: Context, code: grpc.StatusCode, kind: str, message: str) -> NoReturn:
    context.set_trailing_metadata(((wire.ERROR_KIND_METADATA, kind),))
    await context.abort(code, message)
    raise AssertionError("abort returns only by raising")


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """`twinroute.v1.Scheduler` over a `SchedulerService`; conversion only."""

    def __init__(self, *, service: SchedulerService, admin_token: str | None = None) -> None:
        self._service = service
        # Active-active replicas: asks the peers for a request this replica did not place.
        self.explain_elsewhere: ExplainElsewhere | None = None
        telemetry = service.telemetry
        self._guard = TokenGuard(
            admin_token,
            count=telemetry.refused_calls_counter() if telemetry is not None else None,
        )

    async def Pick(self, request: pb.PickRequest, context: Context) -> pb.PickResponse:
        await self._authorize(context, "Pick")
        query = wire.query_from_pb(request)
        try:
            placement = await self._service.pick(query, timeout_s=context.time_remaining())
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
        except UnknownModelError as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown_model", str(error))
        except NoEndpointError as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "no_endpoint", str(error))
        except StaleMembershipError as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "stale_membership", str(error))
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller's deadline passed while deciding: the answer would reach nobody, so
            # nobody would complete its lease.
            await placement.complete("cancelled")
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline",
                         "decided after the Pick's deadline; its lease is closed")  # fmt: skip
        # The router completes the lease by id (Complete); the handle is not needed here.
        return wire.answer_to_pb(placement.answer)

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        await self._authorize(context, "Complete")
        # Unknown or unspecified outcomes close the lease as failed, never leak it.
        outcome = wire.outcome_from_pb(request.outcome) or "engine_error"
        try:
            known = await self._service.complete(
                lease_id=request.lease_id,
                outcome=outcome,
                observed_ttft_s=request.observed_ttft_s,
                prompt_tokens=request.prompt_tokens,
                output_tokens=request.output_tokens,
                cached_prompt_tokens=request.cached_prompt_tokens,
            )
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
        return pb.CompleteResponse(known=known)

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        await self._authorize(context, "Cancel")
        try:
            closed = await self._service.cancel(pick_id=request.pick_id)
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
        return pb.CancelResponse(closed=closed)

    async def Renew(self, request: pb.RenewRequest, context: Context) -> pb.RenewResponse:
        await self._authorize(context, "Renew")
        known = await self._service.renew(lease_ids=list(request.lease_ids))
        return pb.RenewResponse(known=known)

    async def Progress(self, request: pb.ProgressRequest, context: Context) -> pb.ProgressResponse:
        await self._authorize(context, "Progress")
        event = wire.progress_from_pb(request.event)
        if event is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                         f"unknown progress event {request.event}")  # fmt: skip
        try:
            known = await self._service.progress(lease_id=request.lease_id, event=event)
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
        return pb.ProgressResponse(known=known)

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: Context
    ) -> pb.ListEndpointsResponse:
        await self._authorize(context, "ListEndpoints")
        statuses = await self._service.list_endpoints(model=request.model)
        return pb.ListEndpointsResponse(
            endpoints=[
                wire.endpoint_to_pb(status.endpoint, routable=status.routable, load=status.load)
                for status in statuses
            ],
            policy=self._service.core.policy.name,
        )

    async def Explain(self, request: pb.ExplainRequest, context: Context) -> pb.ExplainResponse:
        await self._authorize(context, "Explain")
        limit = request.limit or DEFAULT_EXPLAIN_LIMIT
        records = await self._service.explain(limit=limit, request_id=request.request_id)
        response = pb.ExplainResponse(decisions=[wire.record_to_pb(r) for r in records])
        forwarded = any(key == FORWARDED_METADATA for key, _ in context.invocation_metadata() or ())
        if not records and request.request_id and self.explain_elsewhere and not forwarded:
            # Another replica placed it: any replica answers for any request.
            response.decisions.extend(
                await self.explain_elsewhere(limit=limit, request_id=request.request_id)
            )
        return response

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.DrainResponse:
        await self._authorize(context, "Drain")
        if not request.endpoint_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                         "endpoint_id is required")  # fmt: skip
        if request.timeout_s < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                         "timeout_s must not be negative")  # fmt: skip
        try:
            result = await self._service.drain(
                endpoint_id=request.endpoint_id, timeout_s=request.timeout_s
            )
        except UnknownEndpointError as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown_endpoint", str(error))
        return pb.DrainResponse(
            drained=result.drained, remaining_in_flight=result.remaining_in_flight
        )

    async def Undrain(self, request: pb.UndrainRequest, context: Context) -> pb.UndrainResponse:
        await self._authorize(context, "Undrain")
        if not request.endpoint_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                         "endpoint_id is required")  # fmt: skip
        try:
            was_draining = await self._service.undrain(endpoint_id=request.endpoint_id)
        except UnknownEndpointError as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown_endpoint", str(error))
        return pb.UndrainResponse(was_draining=was_draining)

    async def WatchMigrations(
        self, request: pb.WatchMigrationsRequest, context: Context
    ) -> AsyncIterator[pb.MigrationOrder]:
        await self._authorize(context, "WatchMigrations")
        orders = self._service.watch_migrations(watcher=request.watcher)
        try:
            async for order in orders:
                yield wire.order_to_pb(order)
        except MigrationOffError as error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "migration_off", str(error))

    async def ReportMigration(
        self, request: pb.MigrationReport, context: Context
    ) -> pb.MigrationReportResponse:
        await self._authorize(context, "ReportMigration")
        known = await self._service.report_migration(wire.report_from_pb(request))
        return pb.MigrationReportResponse(known=known)

    async def _authorize(self, context: Context, call: str) -> None:
        if not self._guard.required:
            return
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = str(value)
                break
        why = self._guard.refusal(header)
        if why is None:
            return
        self._guard.refused(call, why, peer=context.peer())
        if why == "missing_token":
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                         "calls need 'authorization: Bearer <token>' metadata")  # fmt: skip
        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                     "the token is wrong")  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    cert_path: str
    key_path: str


class GrpcServer:
    """The Scheduler, health and reflection services on one grpc.aio server."""

    def __init__(
        self,
        *,
        service: SchedulerService,
        listen: str,
        admin_token: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        self._service = service
        self.servicer = SchedulerServicer(service=service, admin_token=admin_token)
        pb_grpc.add_SchedulerServicer_to_server(self.servicer, self.server)
        # Active-active replicas' load exchange (refused where the scheduler has no --peers).
        self.peers = PeerServicer(service=service, admin_token=admin_token)
        pb_grpc.add_SchedulerPeersServicer_to_server(self.peers, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        if tls is None:
            port = self.server.add_insecure_port(listen)
        else:
            with open(tls.cert_path, "rb") as cert, open(tls.key_path, "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = self.server.add_secure_port(listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rpartition(":")[0]
        self.address = f"{host}:{port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """NOT_SERVING first, then stop accepting; in-flight RPCs get `grace_s` to finish."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.peers.closing = True
        if self._service.admission is not None:
            # Held answers go out now, as picked: in-flight Picks finish within the grace.
            self._service.admission.release_all()
        await self.server.stop(grace_s)
