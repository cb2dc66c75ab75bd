"""Protobuf <-> the scheduler's API types (`scheduler/api.py`), both directions, in one place.

The gRPC servicer (`scheduler/server.py`) and the client (`scheduler/client.py`) convert here
and nowhere else, so the contract and the in-process types cannot drift apart in one of them.
Wire conventions: a proto3 scalar left at zero means "not given" (a request's TTFT SLO, the
prompt length), an endpoint load's `scrape_age_s` of -1 means "no fresh scrape" (its running,
queued and KV figures are then unknown, never zero), and a non-OK status names the API error
it stands for in the `twinroute-error` trailing metadata.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from twinroute.scheduler.api import (
    InvalidPickError,
    MigrationOffError,
    MigrationOrder,
    MigrationReport,
    Outcome,
    PickAnswer,
    PickQuery,
    ProgressEvent,
    StaleMembershipError,
    Trigger,
    UnknownEndpointError,
    UnknownModelError,
)
from twinroute.scheduler.types import (
    CandidateScore,
    Decision,
    DecisionRecord,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    Role,
)
from twinroute.v1 import scheduler_pb2 as pb

from twinroute.vocabulary import DecisionReason

# Trailing metadata key naming which error a non-OK status stands for, so the client never has
# to guess from the message (UNAVAILABLE also means "cannot connect").
ERROR_KIND_METADATA: Final = "twinroute-error"
# Error kind on the wire <-> the API's error type.
ERROR_KINDS: Final[dict[str, type[Exception]]] = {
    "invalid": InvalidPickError,
    "unknown_model": UnknownModelError,
    "no_endpoint": NoEndpointError,
    "unknown_endpoint": UnknownEndpointError,
    "migration_off": MigrationOffError,
    "stale_membership": StaleMembershipError,
    "unauthenticated": PermissionError,
    "permission_denied": PermissionError,
}

_ROLE_TO_PB = {
    Role.UNIFIED: pb.ROLE_UNIFIED,
    Role.PREFILL: pb.ROLE_PREFILL,
    Role.DECODE: pb.ROLE_DECODE,
}
_ROLE_FROM_PB = {value: role for role, value in _ROLE_TO_PB.items()}
_REASON_TO_PB = {
    reason: pb.DecisionReason.Value(f"DECISION_REASON_{reason.name}") for reason in DecisionReason
}
_OUTCOME_TO_PB: dict[Outcome, pb.Outcome.ValueType] = {
    "success": pb.OUTCOME_SUCCESS,
    "engine_error": pb.OUTCOME_ENGINE_ERROR,
    "stream_error": pb.OUTCOME_STREAM_ERROR,
    "cancelled": pb.OUTCOME_CANCELLED,
    "timeout": pb.OUTCOME_TIMEOUT,
}
_OUTCOME_FROM_PB: dict[int, Outcome] = {value: outcome for outcome, value in _OUTCOME_TO_PB.items()}
_PROGRESS_TO_PB: dict[ProgressEvent, pb.ProgressEvent.ValueType] = {
    "prefill_done": pb.PROGRESS_EVENT_PREFILL_DONE,
    "first_token": pb.PROGRESS_EVENT_FIRST_TOKEN,
    "prefill_fell_back": pb.PROGRESS_EVENT_PREFILL_FELL_BACK,
}
_PROGRESS_FROM_PB: dict[int, ProgressEvent] = {
    value: event for event, value in _PROGRESS_TO_PB.items()
}
_TRIGGER_TO_PB = {
    Trigger.DRAIN: pb.MIGRATION_TRIGGER_DRAIN,
    Trigger.IMBALANCE: pb.MIGRATION_TRIGGER_IMBALANCE,
}
_TRIGGER_FROM_PB = {value: trigger for trigger, value in _TRIGGER_TO_PB.items()}


# -- endpoints ------------------------------------------------------------------------------


def endpoint_to_pb(
    endpoint: Endpoint, *, routable: bool = True, load: LoadSnapshot | None = None
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
        message.load.CopyFrom(
            pb.EndpointLoad(
                in_flight=load.in_flight,
                running=load.running or 0,
                queued=load.queued or 0,
                pending_prefill_tokens=load.pending_prefill_tokens,
                kv_usage=load.kv_usage or 0.0,
                scrape_age_s=-1.0 if load.scrape_age_s is None else load.scrape_age_s,
            )
        )
    return message


def endpoint_from_pb(message: pb.Endpoint) -> Endpoint:
    return Endpoint(
        id=message.id,
        address=message.address,
        role=_ROLE_FROM_PB.get(message.role, Role.UNIFIED),
        model=message.model,
        labels=dict(message.labels),
    )


def load_from_pb(message: pb.EndpointLoad) -> LoadSnapshot:
    scraped = message.scrape_age_s >= 0
    return LoadSnapshot(
        in_flight=message.in_flight,
        pending_prefill_tokens=message.pending_prefill_tokens,
        running=message.running if scraped else None,
        queued=message.queued if scraped else None,
        kv_usage=message.kv_usage if scraped else None,
        scrape_age_s=message.scrape_age_s if scraped else None,
    )


# -- Pick -----------------------------------------------------------------------------------


def query_to_pb(query: PickQuery) -> pb.PickRequest:
    if query.token_ids is not None:
        ids = np.asarray(query.token_ids, dtype=np.uint32)
        prompt = pb.Prompt(token_ids=pb.TokenIds(ids=ids))
    else:
        prompt = pb.Prompt(text=query.text or "")
    return pb.PickRequest(
        request_id=query.request_id,
        model=query.model,
        prompt=prompt,
        session_id=query.session_id,
        lora_adapter=query.lora_adapter,
        cache_salt=query.cache_salt,
        expected_output_tokens=query.expected_output_tokens,
        ttft_slo_s=query.ttft_slo_s or 0.0,
        prompt_tokens=query.prompt_tokens,
        exclude_endpoints=sorted(query.exclude_endpoints),
        pick_id=query.pick_id,
        reports_first_token=query.reports_first_token,
        exact_engine_tokens=query.exact_engine_tokens,
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
        # Zero on the wire is "not given"; a negative one is refused by the scheduler.
        ttft_slo_s=request.ttft_slo_s if request.ttft_slo_s != 0 else None,
        prompt_tokens=request.prompt_tokens,
        exclude_endpoints=frozenset(request.exclude_endpoints),
        pick_id=request.pick_id,
        reports_first_token=request.reports_first_token,
        exact_engine_tokens=request.exact_engine_tokens,
    )


def answer_to_pb(answer: PickAnswer) -> pb.PickResponse:
    response = pb.PickResponse(
        endpoint=endpoint_to_pb(answer.endpoint),
        reason=_REASON_TO_PB[answer.reason],
        predicted_ttft_s=answer.predicted_ttft_s,
        lease_id=answer.lease_id,
        policy=answer.policy,
        expected_cached_blocks=answer.expected_cached_blocks,
        fallback_endpoints=[endpoint_to_pb(endpoint) for endpoint in answer.fallbacks],
    )
    if answer.prefill_endpoint is not None:
        response.prefill_endpoint.CopyFrom(endpoint_to_pb(answer.prefill_endpoint))
    return response


def answer_from_pb(response: pb.PickResponse) -> PickAnswer:
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
        fallbacks=tuple(endpoint_from_pb(endpoint) for endpoint in response.fallback_endpoints),
    )


def reason_from_pb(value: int) -> DecisionReason:
    """The value type of a reason; UNSPECIFIED for one this side does not know (a reason a
    newer peer added): the placement it comes with stands, and its lease must be reported."""
    try:
        name = pb.DecisionReason.Name(pb.DecisionReason.ValueType(value))
    except ValueError:
        return DecisionReason.UNSPECIFIED
    return DecisionReason[name.removeprefix("DECISION_REASON_")]


# -- Complete and Progress -----------------------------------------------------------------


def outcome_to_pb(outcome: Outcome) -> pb.Outcome.ValueType:
    return _OUTCOME_TO_PB[outcome]


def outcome_from_pb(value: int) -> Outcome | None:
    """None for UNSPECIFIED or an outcome a newer client added."""
    return _OUTCOME_FROM_PB.get(value)


def progress_to_pb(event: ProgressEvent) -> pb.ProgressEvent.ValueType:
    return _PROGRESS_TO_PB[event]


def progress_from_pb(value: int) -> ProgressEvent | None:
    return _PROGRESS_FROM_PB.get(value)


# -- Explain --------------------------------------------------------------------------------


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


def record_from_pb(record: pb.DecisionRecord) -> DecisionRecord:
    candidates = tuple(
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
        # Not on the wire: Explain reports blocks.
        prompt_tokens=0,
        decision=Decision(
            endpoint_id=record.endpoint_id,
            reason=reason_from_pb(record.reason),
            policy=record.policy,
            predicted_ttft_s=record.predicted_ttft_s,
            key_depth=record.key_depth,
            candidates=candidates,
            detail=record.detail,
        ),
    )


# -- migration ------------------------------------------------------------------------------


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


def report_to_pb(report: MigrationReport) -> pb.MigrationReport:
    return pb.MigrationReport(
        migration_id=report.migration_id,
        lease_id=report.lease_id,
        committed=report.committed,
        reason=report.reason,
        produced_tokens=report.produced_tokens,
        pause_s=report.pause_s,
    )


def report_from_pb(message: pb.MigrationReport) -> MigrationReport:
    return MigrationReport(
        migration_id=message.migration_id,
        lease_id=message.lease_id,
        committed=message.committed,
        reason=message.reason,
        produced_tokens=message.produced_tokens,
        pause_s=message.pause_s,
    )
