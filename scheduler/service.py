"""The live scheduler: `SchedulerService` (in-process API over `SchedulerCore`), the grpc.aio
servicer for `twinroute.v1.Scheduler` that maps protobuf to it and back, and `GrpcServer`
(Scheduler + standard health + reflection, optional TLS, graceful stop).

`SchedulerService` is what a router embeds (`await service.pick(PickQuery(...))`, then exactly
one `await service.complete(lease_id=...)`); the servicer does nothing but convert messages,
so both paths behave the same. All time comes from the injected `clock` (monotonic seconds, the
core's time) and `wall_clock` (Unix seconds, only for reporting when a decision was made).

Graceful stop: health goes NOT_SERVING first (load balancers stop sending), then
`server.stop(grace)` lets in-flight RPCs finish while refusing new ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from twinroute.scheduler.admission import AdmissionQueue
from twinroute.scheduler.api import (
    ERROR_KIND_METADATA,
    OUTCOMES,
    PROGRESS_EVENTS,
    DrainResult,
    EndpointStatus,
    InvalidPickError,
    Outcome,
    PickAnswer,
    PickQuery,
    ProgressEvent,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.core import DecisionRecord, MembershipChange, SchedulerCore
from twinroute.scheduler.keys import keys_from_text, keys_from_tokens, namespace_seed
from twinroute.scheduler.migration import MigrationOrder, MigrationReport, Migrator, Trigger
from twinroute.scheduler.telemetry import SchedulerTelemetry
from twinroute.scheduler.types import (
    DecisionReason,
    Endpoint,
    NoEndpointError,
    Role,
    RoutingRequest,
)
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "twinroute.v1.Scheduler"
DEFAULT_EXPLAIN_LIMIT = 20


@dataclasses.dataclass(frozen=True, slots=True)
class KeySettings:
    """How prompts become prefix keys: token blocks, or character blocks for text prompts, and
    the token-per-character estimate for text prompts whose length the caller did not count."""

    block_tokens: int = 16
    block_chars: int = 64
    tokens_per_char: float = 0.25


class SchedulerService:
    """Pick / Complete / ListEndpoints / Explain / Drain over one `SchedulerCore`."""

    def __init__(
        self,
        *,
        core: SchedulerCore,
        keys: KeySettings = KeySettings(),
        telemetry: SchedulerTelemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        served_models: Iterable[str] = (),
        expiry_interval_s: float = 1.0,
        admission: AdmissionQueue | None = None,
    ) -> None:
        if keys.block_tokens <= 0 or keys.block_chars <= 0 or keys.tokens_per_char <= 0:
            raise ValueError(f"key settings must be positive, got {keys}")
        self.core = core
        self.keys = keys
        self.telemetry = telemetry
        self._clock = clock
        self._wall_clock = wall_clock
        self._served_models = frozenset(served_models)
        self._expiry_interval_s = expiry_interval_s
        self._next_expiry = 0.0
        self._seeds: dict[tuple[str, str, str], int] = {}
        # Endpoints of other models, per model; rebuilt when the endpoint set changes.
        self._membership: dict[str, Endpoint] | None = None
        self._other_models: dict[str, frozenset[str]] = {}
        self._known_models: frozenset[str] = frozenset()
        self._with_model: frozenset[str] = frozenset()
        self._drain_waiters: dict[str, list[asyncio.Event]] = {}
        # Hotspot requests' answers held so they can still be moved (`scheduler/admission.py`).
        self.admission = admission
        # Drain's way to take back a request still queued on a leaving endpoint:
        # (lease_id, target) -> True when the request had not been sent to the engine yet and
        # will now go to `target` (an admission hold answers its Pick there). None: every
        # request is sent at Pick, so queued ones finish where they are.
        self.withdraw_queued: Callable[[str, str], bool] | None = None
        # Live migration of running requests (`scheduler/migration.py`); None = off.
        self.migrator: Migrator | None = None

    # -- membership (discovery feeds this) ------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> MembershipChange:
        change = self.core.set_endpoints(endpoints, now=self._clock())
        if change:
            logger.info(
                "membership: +%s -%s (%d endpoints)",
                sorted(change.added), sorted(change.removed), len(endpoints),
            )  # fmt: skip
            if self.telemetry is not None:
                self.telemetry.membership_changed(endpoints)
            for endpoint_id in change.removed:
                self._wake_drainers(endpoint_id)
        return change

    def _model_filter(self, model: str) -> frozenset[str]:
        """Ids of endpoints that do not serve `model`; raises UnknownModelError."""
        if self._membership is not self.core.endpoints:
            self._membership = self.core.endpoints
            by_model: dict[str, set[str]] = {}
            for endpoint in self._membership.values():
                by_model.setdefault(endpoint.model, set()).add(endpoint.id)
            # Endpoints that name no model serve whatever the pool serves.
            with_model = frozenset(e.id for e in self._membership.values() if e.model)
            self._with_model = with_model
            self._other_models = {m: with_model - ids for m, ids in by_model.items() if m}
            self._known_models = frozenset(self._other_models) | self._served_models
        if model in self._other_models:
            return self._other_models[model]
        if model in self._known_models or not self._known_models:
            return self._with_model
        raise UnknownModelError(
            f"model {model!r} is not served by this pool; known: {sorted(self._known_models)}"
        )

    # -- requests ---------------------------------------------------------------------------

    def _routing_request(self, query: PickQuery) -> RoutingRequest:
        if not query.model:
            raise InvalidPickError("model is required")
        seed_key = (query.model, query.lora_adapter, query.cache_salt)
        seed = self._seeds.get(seed_key)
        if seed is None:
            if len(self._seeds) > 4096:
                self._seeds.clear()
            seed = self._seeds[seed_key] = namespace_seed(
                model=query.model, lora_adapter=query.lora_adapter, cache_salt=query.cache_salt
            )
        if query.token_ids is not None:
            prompt_tokens = len(query.token_ids)
            if prompt_tokens == 0:
                raise InvalidPickError("the prompt is empty (no token ids)")
            try:
                keys = keys_from_tokens(
                    query.token_ids, block_size=self.keys.block_tokens, seed=seed
                )
            except (TypeError, ValueError) as error:
                raise InvalidPickError(f"bad token ids: {error}") from None
        elif query.text:
            keys = keys_from_text(query.text, block_chars=self.keys.block_chars, seed=seed)
            prompt_tokens = query.prompt_tokens or max(
                1, round(len(query.text) * self.keys.tokens_per_char)
            )
        else:
            raise InvalidPickError("the prompt is empty (give token ids or text)")
        if query.ttft_slo_s < 0 or query.expected_output_tokens < 0:
            raise InvalidPickError("ttft_slo_s and expected_output_tokens must not be negative")
        exclude = query.exclude_endpoints | self._model_filter(query.model)
        return RoutingRequest(
            request_id=query.request_id,
            keys=keys,
            prompt_tokens=prompt_tokens,
            session_id=query.session_id,
            expected_output_tokens=query.expected_output_tokens,
            ttft_slo_s=query.ttft_slo_s if query.ttft_slo_s > 0 else None,
            exclude=exclude,
        )

    def pick_now(self, query: PickQuery) -> PickAnswer:
        """Synchronous `pick` (the whole decision is CPU work; no awaits inside)."""
        started = time.perf_counter()
        try:
            request = self._routing_request(query)
            now = self._clock()
            if now >= self._next_expiry:
                self.expire(now=now)
                self._next_expiry = now + self._expiry_interval_s
            result = self.core.pick(request, now=now)
        except InvalidPickError:
            self._refused("invalid")
            raise
        except UnknownModelError:
            self._refused("unknown_model")
            raise
        except NoEndpointError:
            self._refused("no_endpoint")
            raise
        decision = result.decision
        answer = PickAnswer(
            endpoint=result.endpoint,
            lease_id=result.lease_id,
            reason=decision.reason,
            policy=decision.policy,
            predicted_ttft_s=decision.predicted_ttft_s,
            expected_cached_blocks=decision.expected_cached_blocks,
            prefill_endpoint=result.prefill_endpoint,
        )
        if self.telemetry is not None:
            self.telemetry.observe_pick(time.perf_counter() - started)
        return answer

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> PickAnswer:
        """Choose an endpoint and open a lease; raises the errors of `twinroute.scheduler.api`.

        With an admission queue, the answer of a request routed to a hotspot may be held
        (and moved) before it is returned, never past `timeout_s` (the caller's deadline)."""
        answer = self.pick_now(query)
        if self.admission is None:
            return answer
        slo = query.ttft_slo_s if query.ttft_slo_s > 0 else self.core.policy.config.ttft_slo_s
        deadline = None if timeout_s is None else self._clock() + timeout_s
        return await self.admission.admit(answer, slo_s=slo, deadline=deadline)

    def _refused(self, kind: str) -> None:
        if self.telemetry is not None:
            self.telemetry.pick_refused(kind)

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
        """Close a lease; False when it was unknown (already closed or expired)."""
        if not lease_id:
            raise InvalidPickError("lease_id is required")
        if outcome not in OUTCOMES:
            raise InvalidPickError(f"unknown outcome {outcome!r}; choose from {OUTCOMES}")
        now = self._clock()
        observed = observed_ttft_s if observed_ttft_s > 0 else None
        lease = self.core.complete(
            lease_id,
            now=now,
            success=outcome == "success",
            observed_ttft_s=observed,
            output_tokens=output_tokens,
        )
        if self.telemetry is not None:
            self.telemetry.observe_complete(lease, outcome=outcome, observed_ttft_s=observed)
        if lease is not None:
            self._wake_drainers(lease.endpoint_id)
        return lease is not None

    def progress(self, *, lease_id: str, event: ProgressEvent) -> bool:
        """A placed request reached a milestone; False when the lease or event did not apply.

        `prefill_done` closes a disaggregated pick's prefill lease (the prefill instance's
        queue no longer holds it); `first_token` marks the request prefilled where it runs, so
        the queue ahead of later requests there, and the hotspot rebalancing that reads it,
        follow the engine instead of the lease model until Complete; `prefill_fell_back`
        (the prefill hop failed, the decode endpoint prefills itself) closes the prefill lease
        without crediting that instance and moves the prompt's prefill onto the decode lease.
        A Drain waiting on the prefill instance wakes when its share closes."""
        if not lease_id:
            raise InvalidPickError("lease_id is required")
        if event not in PROGRESS_EVENTS:
            raise InvalidPickError(f"unknown event {event!r}; choose from {PROGRESS_EVENTS}")
        now = self._clock()
        prefill_endpoint = self.core.prefill_endpoint_of(lease_id)
        if event == "prefill_done":
            known = self.core.prefill_done(lease_id, now=now)
        elif event == "prefill_fell_back":
            known = self.core.prefill_fell_back(lease_id, now=now)
        else:
            known = self.core.first_token(lease_id, now=now)
        if known and prefill_endpoint is not None:
            self._wake_drainers(prefill_endpoint)
        if self.telemetry is not None:
            self.telemetry.observe_progress(event, known=known)
        return known

    def expire(self, *, now: float | None = None) -> int:
        """Close leases past their TTL; returns how many."""
        expired = self.core.expire(self._clock() if now is None else now)
        for endpoint_id in {lease.endpoint_id for lease in expired}:
            self._wake_drainers(endpoint_id)
        if expired:
            logger.warning("%d lease(s) expired without Complete", len(expired))
        return len(expired)

    async def run_expiry(self) -> None:
        """Expire leases even while no Pick arrives; cancel to stop."""
        while True:
            self.expire()
            await asyncio.sleep(self._expiry_interval_s)

    # -- admin ------------------------------------------------------------------------------

    def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        now = self._clock()
        routable = {endpoint.id for endpoint in self.core.routable()}
        return [
            EndpointStatus(
                endpoint=endpoint,
                routable=endpoint.id in routable,
                load=self.core.load(endpoint.id, now=now),
            )
            for endpoint_id, endpoint in sorted(self.core.endpoints.items())
            if not model or endpoint.model in (model, "")
        ]

    def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        """Newest decisions first, `decided_at` in Unix seconds."""
        offset = self._wall_clock() - self._clock()
        return [
            dataclasses.replace(record, decided_at=record.decided_at + offset)
            for record in self.core.recent_decisions(max(1, limit), request_id=request_id or None)
        ]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        """Take the endpoint out of routing; wait up to `timeout_s` for its leases to close."""
        if not self.core.drain(endpoint_id):
            raise UnknownEndpointError(f"endpoint {endpoint_id!r} is not known to the scheduler")
        moved = self.move_queued_off(endpoint_id)
        if self.migrator is not None:
            self.migrator.start_drain(endpoint_id, timeout_s=timeout_s)
        logger.info(
            "draining %s (wait up to %.1fs); %d queued request(s) moved to their other candidate",
            endpoint_id, timeout_s, moved,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while (remaining := self.core.in_flight(endpoint_id)) > 0:
            left = deadline - loop.time()
            if left <= 0:
                break
            event = asyncio.Event()
            waiters = self._drain_waiters.setdefault(endpoint_id, [])
            waiters.append(event)
            try:
                await asyncio.wait_for(event.wait(), timeout=left)
            except TimeoutError:
                pass
            finally:
                if event in waiters:
                    waiters.remove(event)
        remaining = self.core.in_flight(endpoint_id)
        return DrainResult(drained=remaining == 0, remaining_in_flight=remaining)

    def move_queued_off(self, endpoint_id: str) -> int:
        """Move the requests still queued on a draining endpoint that this scheduler can still
        withdraw (held by the admission hold, or taken back by `withdraw_queued`) to their
        other candidate; returns how many moved. Those already sent run there: running ones
        finish within the drain's wait (or a migration moves them)."""
        admission, withdraw = self.admission, self.withdraw_queued
        if admission is None and withdraw is None:
            return 0
        now = self._clock()
        moved = 0
        for move in self.core.plan_drain_moves(endpoint_id, now=now):
            if admission is not None and admission.holds(move.lease_id):
                if self.core.move(
                    move.lease_id, target=move.target, now=now, cause="drain"
                ) and admission.answer_moved(move.lease_id, now=now):
                    moved += 1
            elif (
                withdraw is not None
                and withdraw(move.lease_id, move.target)
                and self.core.move(move.lease_id, target=move.target, now=now, cause="drain")
            ):
                moved += 1
        if moved:
            self._wake_drainers(endpoint_id)
        return moved

    # -- live migration ----------------------------------------------------------------------

    def attach_migrator(self, migrator: Migrator) -> None:
        """Turn on migration: Drain then migrates what runs on the endpoint within its wait,
        and routers can watch for orders (`WatchMigrations`)."""
        self.migrator = migrator
        migrator.on_lease_moved = self._wake_drainers

    def report_migration(self, report: MigrationReport) -> bool:
        """A router's answer to an order; False when the order is unknown (or migration off)."""
        if self.migrator is None:
            return False
        return self.migrator.orders.report(report)

    def _wake_drainers(self, endpoint_id: str) -> None:
        for event in self._drain_waiters.get(endpoint_id, ()):
            event.set()


# -- protobuf <-> value types -------------------------------------------------------------

_ROLE_TO_PB = {
    Role.UNIFIED: pb.ROLE_UNIFIED,
    Role.PREFILL: pb.ROLE_PREFILL,
    Role.DECODE: pb.ROLE_DECODE,
}
_REASON_TO_PB = {
    reason: pb.DecisionReason.Value(f"DECISION_REASON_{reason.name}") for reason in DecisionReason
}
_OUTCOME_FROM_PB: dict[int, Outcome] = {
    pb.OUTCOME_SUCCESS: "success",
    pb.OUTCOME_ENGINE_ERROR: "engine_error",
    pb.OUTCOME_STREAM_ERROR: "stream_error",
    pb.OUTCOME_CANCELLED: "cancelled",
    pb.OUTCOME_TIMEOUT: "timeout",
}
_PROGRESS_FROM_PB: dict[int, ProgressEvent] = {
    pb.PROGRESS_EVENT_PREFILL_DONE: "prefill_done",
    pb.PROGRESS_EVENT_FIRST_TOKEN: "first_token",
    pb.PROGRESS_EVENT_PREFILL_FELL_BACK: "prefill_fell_back",
}


def endpoint_to_pb(
    endpoint: Endpoint, *, routable: bool = True, load: pb.EndpointLoad | None = None
) -> pb.Endpoint:
    message = pb.Endpoint(
        id=endpoint.id,
        address=endpoint.address,
        role=_ROLE_TO_PB.get(endpoint.role, pb.ROLE_UNSPECIFIED),
        model=endpoint.model,
        routable=routable,
        labels=dict(endpoint.labels),
    )
    if load is not None:
        message.load.CopyFrom(load)
    return message


def record_to_pb(record: DecisionRecord) -> pb.DecisionRecord:
    decision = record.decision
    return pb.DecisionRecord(
        request_id=record.request_id,
        lease_id=record.lease_id,
        policy=decision.policy,
        endpoint_id=decision.endpoint_id,
        reason=_REASON_TO_PB[decision.reason],
        predicted_ttft_s=decision.predicted_ttft_s,
        decided_at=record.decided_at,
        prompt_blocks=record.prompt_blocks,
        key_depth=decision.key_depth,
        detail=decision.detail,
        candidates=[
            pb.CandidateScore(
                endpoint_id=c.endpoint_id,
                score=c.score,
                predicted_ttft_s=c.predicted_ttft_s,
                expected_cached_blocks=c.expected_cached_blocks,
                pending_prefill_tokens=c.pending_prefill_tokens,
                role=c.role,
            )
            for c in decision.candidates
        ],
    )


_TRIGGER_TO_PB = {
    Trigger.DRAIN: pb.MIGRATION_TRIGGER_DRAIN,
    Trigger.IMBALANCE: pb.MIGRATION_TRIGGER_IMBALANCE,
}


def order_to_pb(order: MigrationOrder) -> pb.MigrationOrder:
    return pb.MigrationOrder(
        migration_id=order.migration_id,
        lease_id=order.lease_id,
        request_id=order.request_id,
        source=endpoint_to_pb(order.source),
        target=endpoint_to_pb(order.target),
        trigger=_TRIGGER_TO_PB[order.trigger],
        deadline_s=order.deadline_s,
    )


def query_from_pb(request: pb.PickRequest) -> PickQuery:
    content = request.prompt.WhichOneof("content")
    token_ids: Any = None
    text: str | None = None
    if content == "token_ids":
        # The upb container exposes a buffer: no per-token Python objects.
        token_ids = np.asarray(request.prompt.token_ids.ids, dtype=np.uint32)
    elif content == "text":
        text = request.prompt.text
    return PickQuery(
        request_id=request.request_id,
        model=request.model,
        token_ids=token_ids,
        text=text,
        session_id=request.session_id,
        lora_adapter=request.lora_adapter,
        cache_salt=request.cache_salt,
        expected_output_tokens=request.expected_output_tokens,
        ttft_slo_s=request.ttft_slo_s,
        prompt_tokens=request.prompt_tokens,
        exclude_endpoints=frozenset(request.exclude_endpoints),
    )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, kind: str,
                 message: str) -> None:  # fmt: skip
    context.set_trailing_metadata(((ERROR_KIND_METADATA, kind),))
    await context.abort(code, message)


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """`twinroute.v1.Scheduler` over a `SchedulerService`; conversion only."""

    def __init__(self, *, service: SchedulerService, admin_token: str | None = None) -> None:
        self._service = service
        self._admin_token = admin_token

    async def Pick(
        self, request: pb.PickRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PickResponse:
        try:
            answer = await self._service.pick(
                query_from_pb(request), timeout_s=context.time_remaining()
            )
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
            raise
        except UnknownModelError as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "unknown_model", str(error))
            raise
        except NoEndpointError as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "no_endpoint", str(error))
            raise
        response = pb.PickResponse(
            endpoint=endpoint_to_pb(answer.endpoint),
            reason=_REASON_TO_PB[answer.reason],
            predicted_ttft_s=answer.predicted_ttft_s,
            lease_id=answer.lease_id,
            policy=answer.policy,
            expected_cached_blocks=answer.expected_cached_blocks,
        )
        if answer.prefill_endpoint is not None:
            response.prefill_endpoint.CopyFrom(endpoint_to_pb(answer.prefill_endpoint))
        return response

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompleteResponse:
        outcome = _OUTCOME_FROM_PB.get(request.outcome)
        if outcome is None:
            # Unknown or unspecified outcomes close the lease as failed, never leak it.
            outcome = "engine_error"
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
            raise
        return pb.CompleteResponse(known=known)

    async def Progress(
        self, request: pb.ProgressRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProgressResponse:
        event = _PROGRESS_FROM_PB.get(request.event)
        if event is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid",
                         f"unknown progress event {request.event}")  # fmt: skip
            raise AssertionError("unreachable")
        try:
            known = self._service.progress(lease_id=request.lease_id, event=event)
        except InvalidPickError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(error))
            raise
        return pb.ProgressResponse(known=known)

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListEndpointsResponse:
        endpoints = []
        for status in self._service.list_endpoints(model=request.model):
            load = status.load
            endpoints.append(
                endpoint_to_pb(
                    status.endpoint,
                    routable=status.routable,
                    load=pb.EndpointLoad(
                        in_flight=load.in_flight,
                        running=load.running or 0,
                        queued=load.queued or 0,
                        pending_prefill_tokens=load.pending_prefill_tokens,
                        kv_usage=load.kv_usage or 0.0,
                        scrape_age_s=-1.0 if load.scrape_age_s is None else load.scrape_age_s,
                    ),
                )
            )
        return pb.ListEndpointsResponse(endpoints=endpoints, policy=self._service.core.policy.name)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExplainResponse:
        records = self._service.explain(
            limit=request.limit or DEFAULT_EXPLAIN_LIMIT, request_id=request.request_id
        )
        return pb.ExplainResponse(decisions=[record_to_pb(record) for record in records])

    async def Drain(
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DrainResponse:
        await self._authorize(context)
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
            raise
        return pb.DrainResponse(
            drained=result.drained, remaining_in_flight=result.remaining_in_flight
        )

    async def WatchMigrations(
        self, request: pb.WatchMigrationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.MigrationOrder]:
        await self._authorize(context)
        migrator = self._service.migrator
        if migrator is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "migration_off",
                         "migration is off in this scheduler (--migration)")  # fmt: skip
            return
        logger.info("migration watcher %r subscribed", request.watcher or "?")
        async for order in migrator.orders.watch():
            yield order_to_pb(order)

    async def ReportMigration(
        self, request: pb.MigrationReport, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MigrationReportResponse:
        await self._authorize(context)
        known = self._service.report_migration(
            MigrationReport(
                migration_id=request.migration_id,
                lease_id=request.lease_id,
                committed=request.committed,
                reason=request.reason,
                produced_tokens=request.produced_tokens,
                pause_s=request.pause_s,
            )
        )
        return pb.MigrationReportResponse(known=known)

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._admin_token:
            return
        metadata: Mapping[str, Any] = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        if not header:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                         "admin RPCs need 'authorization: Bearer <token>' metadata")  # fmt: skip
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._admin_token.encode()
        ):
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                         "the admin token is wrong")  # fmt: skip


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
        pb_grpc.add_SchedulerServicer_to_server(
            SchedulerServicer(service=service, admin_token=admin_token), self.server
        )
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
        if self._service.admission is not None:
            # Held answers go out now, as picked: in-flight Picks finish within the grace.
            self._service.admission.release_all()
        await self.server.stop(grace_s)
