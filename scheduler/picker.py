"""The endpoint picker: twinroute's scheduler behind any Gateway API Inference Extension gateway.

A gateway (Envoy, Envoy Gateway, kgateway, Istio, GKE) opens one `ExternalProcessor/Process`
stream per HTTP request (Envoy's external processing API) and sends the request's headers and
body; the picker parses the OpenAI body once, asks the scheduler (`SchedulerService.pick`, the
same call the embedded router makes, through the same query builder, `openai_queries`), and
answers with the endpoint picker protocol:

- header `x-gateway-destination-endpoint` and dynamic metadata `envoy.lb` with the same value,
  `primary,fallback`: the chosen endpoint, then the pick's fallbacks (DualMap: the other ring
  candidate), which the gateway tries in order on retry;
- a subset hint (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`) restricts
  the pick; an empty or ineligible subset is answered 503;
- no endpoint -> ImmediateResponse 503, shedding (`max_in_flight`) -> 429, a bad body -> 400,
  a body over the limit -> 413, each with an OpenAI-style error JSON.

The response side, as far as the gateway sends it: the response headers name the endpoint that
served (`x-gateway-destination-endpoint-served`, in `envoy.lb` metadata or as a header), and
the lease follows it when a retry went to a fallback; a 5xx closes the lease as an engine
error. When the gateway streams the response body too, the first chunk of a stream is its first
token (Progress) and the last carries the usage (Complete). The gRPC stream's end closes the
lease in every case (exactly once: `Placement.complete`).

A gateway that sends no response phase to the picker (`twinroute gateway`'s lean mode) reports
each finished request on Envoy's access-log service instead (`AccessLogService`, served on the
same port): batched log entries name the endpoint that served, the status and the timings, by
the request id the picker saw in the request headers; the lease follows and closes from there.
One batched entry costs the picker a fraction of a gRPC round trip per request.

Each message costs a Python picker about as much as the whole of a lean proxy's work for a
request, so the picker adapts to the processing mode the gateway announces in
`protocol_config`, handles the request body as one buffered message or as the full-duplex
chunks GIE gateways send, and answers a response-body chunk only when the gateway sends one.
`twinroute gateway` renders an Envoy that sends the fewest messages (docs/design.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, Counter
from twinroute.scheduler.api import (
    InvalidPickError,
    Outcome,
    PickQuery,
    Placement,
    SettledReport,
    UnknownModelError,
)
from twinroute.scheduler.openai_queries import (
    REQUEST_ID_HEADER,
    TTFT_SLO_HEADER,
    Tokenizer,
    pick_query,
    prompt_token_ids,
    register_tokenizer_metrics,
    requested_slo,
    tag_request_id,
)
from twinroute.scheduler.types import Endpoint, NoEndpointError

from twinroute.lean_metrics import LeanCounter, LeanHistogram
from twinroute.openai_format import Kind, RequestError, decode_json, error_body, parse_request

logger = logging.getLogger(__name__)

DESTINATION_HEADER: Final = "x-gateway-destination-endpoint"
SERVED_KEY: Final = "x-gateway-destination-endpoint-served"
LB_NAMESPACE: Final = "envoy.lb"
SUBSET_NAMESPACE: Final = "envoy.lb.subset_hint"
SUBSET_KEY: Final = "x-gateway-destination-endpoint-subset"
# What the client sees of the decision, as on the router path.
ENDPOINT_HEADER: Final = "x-twinroute-endpoint"
REASON_HEADER: Final = "x-twinroute-reason"
EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
# A gateway whose ext_proc stream ends before the request does (no response phase) says so
# with this gRPC metadata, and reports each request's end in its gRPC access log instead.
END_REPORT_METADATA: Final = "x-twinroute-request-ends"
END_REPORT_ACCESS_LOG: Final = "access-log"
HEALTH_SERVICES: Final = ("liveness", "readiness", EXT_PROC_SERVICE)
_PATH_KINDS: Final[Mapping[str, Kind]] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
}
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
# NONE is also what a gateway that announces no protocol_config (older Envoys) reads as: the
# picker then answers the headers and waits for a buffered body, the common configuration.
_BUFFERED_MODES = frozenset(
    {processing_mode_pb2.ProcessingMode.BUFFERED, processing_mode_pb2.ProcessingMode.NONE}
)
_NO_BODY = processing_mode_pb2.ProcessingMode.NONE
# Requests awaiting their access-log entry at most (a bound on a gateway that stops logging).
_MAX_AWAITING_LOG: Final = 100_000
# Answers naming a pick kept for reuse at most (`EndpointPicker._buffered_answer`).
_MAX_KEPT_ANSWERS: Final = 4096
# The tail of a response body kept to read the usage from the last chunk of a stream.
_USAGE_TAIL_BYTES: Final = 4096
_HEADERS_CONTINUE: Final = ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse())
_BODY_CONTINUE: Final = ext_pb.ProcessingResponse(response_body=ext_pb.BodyResponse())


class PickingScheduler(Protocol):
    """What the picker needs of the scheduler (`SchedulerService` in the same process)."""

    async def pick(
        self, query: PickQuery, *, timeout_s: float | None = None, behind_ok: bool = False
    ) -> Placement: ...

    def follow_fallback(self, *, lease_id: str, endpoint_id: str) -> bool: ...

    def routable_endpoints(self) -> tuple[Endpoint, ...]: ...


@dataclass(frozen=True, slots=True)
class PickerSettings:
    models: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    max_tokens_limit: int = 131_072
    tokens_per_char: float = 0.25
    # Requests in flight through the picker at most; beyond, new ones are shed with 429
    # (0 = never shed).
    max_in_flight: int = 0
    # Long prompts are tokenized on a worker thread (see `twinroute.scheduler.openai_queries`).
    offload: bool = True
    # Answer the client which endpoint served and why (x-twinroute-endpoint/-reason).
    decision_headers: bool = True


class PickerMetrics:
    # What every request updates is kept lean (`twinroute/lean_metrics.py`).
    def __init__(self, registry: CollectorRegistry) -> None:
        self.picks = LeanCounter(
            "twinroute_picker_requests",
            "Requests the endpoint picker answered, by what it answered (picked, or the HTTP "
            "status of an immediate answer)",
            ["answer"],
            registry=registry,
        )
        self.fallbacks_served = Counter(
            "twinroute_picker_fallbacks_served",
            "Requests the gateway served on a fallback endpoint after the primary failed",
            registry=registry,
        )
        self.access_log_entries = LeanCounter(
            "twinroute_picker_access_log_entries",
            "Entries of the gateway's access log (lean gateways' request ends), by what became "
            "of them: here (closed a lease of this replica's), forwarded (sent to the peer "
            "replicas: another one picked), from_peer (a peer's, closed a lease here), "
            "unmatched (no lease open for it)",
            ["handled"],
            registry=registry,
        )
        self.pick_seconds = LeanHistogram(
            "twinroute_picker_pick_seconds",
            "From the request's last body byte at the picker to its answer",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25),
            registry=registry,
        )


class _Refusal(Exception):
    """An ImmediateResponse to send instead of a pick."""

    def __init__(self, status: int, body: dict[str, Any], *, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.body = body
        self.details = details


def immediate_response(
    status: int, body: Mapping[str, Any], *, details: str
) -> ext_pb.ProcessingResponse:
    """An answer the gateway sends to the client at once (the request goes nowhere)."""
    return ext_pb.ProcessingResponse(
        immediate_response=ext_pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            body=json.dumps(body).encode(),
            headers=ext_pb.HeaderMutation(
                set_headers=[_header("content-type", "application/json")]
            ),
            details=details,
        )
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _header_values(headers: ext_pb.HttpHeaders, wanted: frozenset[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for header in headers.headers.headers:
        if header.key in wanted:
            values[header.key] = (
                header.raw_value.decode("latin-1") if header.raw_value else header.value
            )
    return values


def _pick_mutation(destinations: str, endpoint_id: str, reason: str) -> ext_pb.CommonResponse:
    return ext_pb.CommonResponse(
        header_mutation=ext_pb.HeaderMutation(
            set_headers=[
                _header(DESTINATION_HEADER, destinations),
                # Echoed to the client by the gateway's route (and marks the request as picked
                # for its access log).
                _header(ENDPOINT_HEADER, endpoint_id),
                _header(REASON_HEADER, reason),
            ]
        ),
    )


def _lb_metadata(destinations: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.fields[LB_NAMESPACE].struct_value.fields[
        DESTINATION_HEADER
    ].string_value = destinations
    return metadata


_REQUEST_HEADERS: Final = frozenset({":path", "content-length", REQUEST_ID_HEADER, TTFT_SLO_HEADER})
_RESPONSE_HEADERS: Final = frozenset({":status", SERVED_KEY})


def _metadata_value(metadata: base_pb2.Metadata, namespace: str, key: str) -> Any:
    if namespace not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[namespace].fields
    if key not in fields:
        return None
    value = fields[key]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "list_value":
        return [item.string_value for item in value.list_value.values]
    return None


@dataclass(slots=True)
class _Exchange:
    """One HTTP request's life at the picker (one ext_proc stream)."""

    number: int
    full_duplex: bool = False
    response_body: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    subset: list[str] | None = None
    body: bytearray = field(default_factory=bytearray)
    decided: bool = False
    placement: Placement | None = None
    stream: bool = False
    prompt_tokens: int = 0
    picked_at: float = 0.0
    status: int = 0
    first_token_at: float = 0.0
    output_events: int = 0
    tail: bytes = b""
    outcome: Outcome | None = None
    # Envoy's x-request-id: how the access log names this request.
    gateway_request_id: str = ""
    # The gateway reports this request's end in its access log, not on this stream.
    ends_by_log: bool = False


class EndpointPicker(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """`envoy.service.ext_proc.v3.ExternalProcessor` over the scheduler."""

    def __init__(
        self,
        *,
        scheduler: PickingScheduler,
        settings: PickerSettings,
        registry: CollectorRegistry | None = None,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._tokenizer = tokenizer
        self._clock = clock
        registry = registry if registry is not None else CollectorRegistry()
        self._metrics = PickerMetrics(registry)
        register_tokenizer_metrics(tokenizer, registry, name="twinroute_picker_prompt_chars")
        self._picked = self._metrics.picks.labels("picked")
        # One access-log entry per request in lean mode: the label children bound once.
        self._log_entries = {
            handled: self._metrics.access_log_entries.labels(handled)
            for handled in ("here", "forwarded", "from_peer", "unmatched")
        }
        self._numbers = itertools.count(1)
        self._prefix = f"gw-{uuid.uuid4().hex[:6]}"
        self._in_flight = 0
        self._reports: set[asyncio.Task[bool]] = set()
        # Picked requests whose end the access log will report, by Envoy's request id; the
        # oldest are dropped beyond a bound (their leases then expire at the TTL).
        self._awaiting_log: dict[str, _Exchange] = {}
        self._answers: dict[tuple[str, str, str], ext_pb.ProcessingResponse] = {}
        # With active-active replicas, where access-log entries of requests this replica did
        # not pick go (the peer exchange, which hands them to the replica that did: Envoy
        # streams its whole access log to one replica). None: one replica, they match nothing.
        self.forward_log: Callable[[bytes], None] | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def Process(
        self,
        request_iterator: AsyncIterator[ext_pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ext_pb.ProcessingResponse]:
        exchange = _Exchange(number=next(self._numbers), ends_by_log=_ends_by_log(context))
        self._in_flight += 1
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    answer = self._request_headers(exchange, message)
                elif kind == "request_body":
                    answer = await self._request_body(exchange, message.request_body)
                elif kind == "request_trailers":
                    answer = await self._request_trailers(exchange)
                elif kind == "response_headers":
                    answer = self._response_headers(exchange, message)
                elif kind == "response_body":
                    answer = self._response_body(exchange, message.response_body)
                else:  # response trailers: nothing to learn, nothing to change
                    answer = [
                        ext_pb.ProcessingResponse(response_trailers=ext_pb.TrailersResponse())
                    ]
                for response in answer:
                    yield response
                if exchange.outcome is not None and exchange.placement is None:
                    return  # answered without a pick: nothing more to do for this request
        finally:
            self._in_flight -= 1
            self._close(exchange)

    # -- the request ---------------------------------------------------------------------------

    def _request_headers(
        self, exchange: _Exchange, message: ext_pb.ProcessingRequest
    ) -> list[ext_pb.ProcessingResponse]:
        config = message.protocol_config
        exchange.full_duplex = config.request_body_mode == _FULL_DUPLEX
        exchange.response_body = config.response_body_mode != _NO_BODY
        if not exchange.full_duplex and config.request_body_mode not in _BUFFERED_MODES:
            return self._refuse(
                exchange,
                500,
                "the gateway streams the request body in a mode the picker cannot answer "
                "before the upstream is chosen; use BUFFERED or FULL_DUPLEX_STREAMED",
                "picker_misconfigured",
            )
        headers = message.request_headers
        exchange.headers = _header_values(headers, _REQUEST_HEADERS)
        if message.HasField("metadata_context"):
            subset = _metadata_value(message.metadata_context, SUBSET_NAMESPACE, SUBSET_KEY)
            if subset is not None:
                exchange.subset = subset if isinstance(subset, list) else subset.split(",")
        if headers.end_of_stream:
            return self._refuse(exchange, 400, "the request has no body", "no_body")
        length = exchange.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._settings.max_body_bytes:
            return self._too_large(exchange)
        if exchange.full_duplex:
            # The body follows without waiting; headers are answered with the pick.
            return []
        return [_HEADERS_CONTINUE]

    async def _request_body(
        self, exchange: _Exchange, body: ext_pb.HttpBody
    ) -> list[ext_pb.ProcessingResponse]:
        if exchange.decided:
            return []
        exchange.body += body.body
        if len(exchange.body) > self._settings.max_body_bytes:
            return self._too_large(exchange)
        if not body.end_of_stream:
            return []
        return await self._decide(exchange)

    async def _request_trailers(self, exchange: _Exchange) -> list[ext_pb.ProcessingResponse]:
        answer = [] if exchange.decided else await self._decide(exchange)
        if exchange.outcome is None:
            answer.append(ext_pb.ProcessingResponse(request_trailers=ext_pb.TrailersResponse()))
        return answer

    async def _decide(self, exchange: _Exchange) -> list[ext_pb.ProcessingResponse]:
        exchange.decided = True
        started = self._clock()
        try:
            placement = await self._pick(exchange)
        except _Refusal as refusal:
            return self._refuse(exchange, refusal.status, refusal.body, refusal.details)
        exchange.placement = placement
        exchange.picked_at = self._clock()
        exchange.gateway_request_id = exchange.headers.get(REQUEST_ID_HEADER, "")
        if exchange.ends_by_log and exchange.gateway_request_id:
            self._await_log(exchange)
        self._metrics.pick_seconds.observe(exchange.picked_at - started)
        self._picked.inc()
        destinations = ",".join(
            [
                placement.endpoint.address,
                *(fallback.address for fallback in placement.answer.fallbacks),
            ]
        )
        if not exchange.full_duplex:
            # Buffered: the headers went on already; the pick rides on the body's answer.
            return [self._buffered_answer(destinations, placement)]
        # Full duplex: the picker holds the body and hands it back whole after the headers.
        mutation = _pick_mutation(destinations, placement.endpoint.id, placement.reason.value)
        body = ext_pb.CommonResponse(
            body_mutation=ext_pb.BodyMutation(
                streamed_response=ext_pb.StreamedBodyResponse(
                    body=bytes(exchange.body), end_of_stream=True
                )
            )
        )
        return [
            ext_pb.ProcessingResponse(
                request_headers=ext_pb.HeadersResponse(response=mutation),
                dynamic_metadata=_lb_metadata(destinations),
            ),
            ext_pb.ProcessingResponse(request_body=ext_pb.BodyResponse(response=body)),
        ]

    def _buffered_answer(
        self, destinations: str, placement: Placement
    ) -> ext_pb.ProcessingResponse:
        """The body's answer naming a pick. A pool has few distinct answers (an ordered pair
        of endpoints, a reason), and building one costs more than all the rest of answering
        (10 us of protobuf objects here), so each is built once and handed out again: gRPC
        only reads it (serialising), nothing here changes it after."""
        key = (destinations, placement.endpoint.id, placement.reason.value)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _MAX_KEPT_ANSWERS:
                self._answers.clear()  # membership churned: start again
            answer = self._answers[key] = ext_pb.ProcessingResponse(
                request_body=ext_pb.BodyResponse(
                    response=_pick_mutation(destinations, placement.endpoint.id, key[2])
                ),
                dynamic_metadata=_lb_metadata(destinations),
            )
        return answer

    async def _pick(self, exchange: _Exchange) -> Placement:
        settings = self._settings
        if settings.max_in_flight and self._in_flight > settings.max_in_flight:
            raise _Refusal(429, _error(
                f"the gateway has {self._in_flight - 1} requests in flight, its limit is "
                f"{settings.max_in_flight}; retry later", "rate_limit_exceeded", "shed",
            ), details="shed")  # fmt: skip
        path = exchange.headers.get(":path", "").split("?", 1)[0]
        kind = _PATH_KINDS.get(path)
        if kind is None:
            raise _Refusal(404, _error(f"no inference API at {path!r}", "invalid_request_error",
                                       "not_found"), details="unknown_path")  # fmt: skip
        try:
            parsed = parse_request(
                decode_json(bytes(exchange.body)),
                kind=kind,
                served_models=settings.models,
                max_tokens_limit=settings.max_tokens_limit,
            )
            slo = requested_slo(exchange.headers.get(TTFT_SLO_HEADER))
        except RequestError as error:
            raise _Refusal(error.status, error.body(), details="bad_request") from None
        token_ids = await prompt_token_ids(parsed, self._tokenizer, offload=settings.offload)
        query = pick_query(
            parsed,
            request_id=tag_request_id(
                f"{self._prefix}-{exchange.number}", exchange.headers.get(REQUEST_ID_HEADER)
            ),
            token_ids=token_ids,
            ttft_slo_s=slo,
            tokens_per_char=settings.tokens_per_char,
            # Without the response body the first token is never seen: the scheduler then
            # drains the request's prefill at its predicted TTFT instead of waiting for it.
            reports_first_token=parsed.stream and exchange.response_body,
        )
        exchange.stream = parsed.stream
        exchange.prompt_tokens = query.prompt_tokens
        if exchange.subset is not None:
            query = self._within_subset(query, exchange.subset)
        try:
            # Envoy cannot ask another replica: a replica behind its peers' membership routes
            # on what it has rather than fail the request.
            return await self._scheduler.pick(query, behind_ok=True)
        except (NoEndpointError, UnknownModelError) as error:
            raise _Refusal(503, _error(f"no endpoint can serve the request: {error}",
                                       "service_unavailable", "no_endpoint"),
                           details="no_endpoint") from None  # fmt: skip
        except InvalidPickError as error:
            raise _Refusal(400, _error(str(error), "invalid_request_error", "invalid"),
                           details="bad_request") from None  # fmt: skip

    def _within_subset(self, query: PickQuery, subset: list[str]) -> PickQuery:
        allowed = {address.strip() for address in subset if address.strip()}
        routable = self._scheduler.routable_endpoints()
        outside = frozenset(endpoint.id for endpoint in routable if endpoint.address not in allowed)
        if len(outside) == len(routable):
            raise _Refusal(503, _error(
                "none of the gateway's subset of endpoints is in the pool: "
                + (", ".join(sorted(allowed)) or "(empty subset)"),
                "service_unavailable", "no_endpoint",
            ), details="empty_subset")  # fmt: skip
        return dataclasses.replace(query, exclude_endpoints=query.exclude_endpoints | outside)

    # -- the response --------------------------------------------------------------------------

    def _response_headers(
        self, exchange: _Exchange, message: ext_pb.ProcessingRequest
    ) -> list[ext_pb.ProcessingResponse]:
        values = _header_values(message.response_headers, _RESPONSE_HEADERS)
        status = values.get(":status", "0")
        exchange.status = int(status) if status.isdigit() else 0
        placement = exchange.placement
        if placement is None:
            return [ext_pb.ProcessingResponse(response_headers=ext_pb.HeadersResponse())]
        served = None
        if message.HasField("metadata_context"):
            served = _metadata_value(message.metadata_context, LB_NAMESPACE, SERVED_KEY)
        if not isinstance(served, str):
            served = values.get(SERVED_KEY)
        endpoint_id = self._follow(placement, served)
        if not exchange.stream and exchange.status:
            # A whole answer arrives with its headers: its latency stands in for the TTFT.
            exchange.first_token_at = self._clock()
        if not self._settings.decision_headers:
            return [ext_pb.ProcessingResponse(response_headers=ext_pb.HeadersResponse())]
        return [
            ext_pb.ProcessingResponse(
                response_headers=ext_pb.HeadersResponse(
                    response=ext_pb.CommonResponse(
                        header_mutation=ext_pb.HeaderMutation(
                            set_headers=[
                                _header(ENDPOINT_HEADER, endpoint_id),
                                _header(REASON_HEADER, placement.reason.value),
                            ],
                            remove_headers=[SERVED_KEY],
                        )
                    )
                )
            )
        ]

    def _response_body(
        self, exchange: _Exchange, body: ext_pb.HttpBody
    ) -> list[ext_pb.ProcessingResponse]:
        placement = exchange.placement
        chunk = body.body
        if placement is not None and chunk:
            if not exchange.first_token_at:
                exchange.first_token_at = self._clock()
                if exchange.stream and exchange.status == 200:
                    self._report(placement.progress("first_token"))
            if exchange.stream:
                exchange.output_events += chunk.count(b'"finish_reason":null')
            exchange.tail = (exchange.tail + chunk)[-_USAGE_TAIL_BYTES:]
        if body.end_of_stream and placement is not None:
            self._finish(exchange)
        if not exchange.full_duplex:
            return [_BODY_CONTINUE]
        # Full duplex on the response too: the chunk goes back to the client through us.
        return [
            ext_pb.ProcessingResponse(
                response_body=ext_pb.BodyResponse(
                    response=ext_pb.CommonResponse(
                        body_mutation=ext_pb.BodyMutation(
                            streamed_response=ext_pb.StreamedBodyResponse(
                                body=chunk, end_of_stream=body.end_of_stream
                            )
                        )
                    )
                )
            )
        ]

    def _follow(self, placement: Placement, served: str | None) -> str:
        """The id of the endpoint that served (`served`: its IP:PORT); the lease follows when
        it was a fallback of the pick's."""
        if not served or served == placement.endpoint.address:
            return placement.endpoint.id
        for fallback in placement.answer.fallbacks:
            if fallback.address == served:
                if self._scheduler.follow_fallback(
                    lease_id=placement.lease_id, endpoint_id=fallback.id
                ):
                    self._metrics.fallbacks_served.inc()
                return fallback.id
        return placement.endpoint.id

    # -- the access log (lean gateways) --------------------------------------------------------

    def _await_log(self, exchange: _Exchange) -> None:
        awaiting = self._awaiting_log
        if len(awaiting) >= _MAX_AWAITING_LOG:
            del awaiting[next(iter(awaiting))]
        awaiting[exchange.gateway_request_id] = exchange

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                self._logged(entry)
        return als_pb2.StreamAccessLogsResponse()

    def take_peer_log(self, data: bytes) -> None:
        """An access-log entry a peer replica's picker received for a request it did not pick."""
        entry = accesslog_pb2.HTTPAccessLogEntry()
        try:
            entry.ParseFromString(data)
        except DecodeError:
            logger.warning("a peer forwarded an access-log entry that does not parse")
            return
        self._logged(entry, from_peer=True)

    def _logged(self, entry: Any, *, from_peer: bool = False) -> None:
        request_id = entry.request.request_id
        exchange = self._awaiting_log.pop(request_id, None)
        counts = self._log_entries
        if exchange is None:
            if from_peer or self.forward_log is None or not request_id:
                counts["unmatched"].inc()
            else:
                counts["forwarded"].inc()
                self.forward_log(entry.SerializeToString())
            return
        counts["from_peer" if from_peer else "here"].inc()
        if exchange.placement is None or exchange.outcome is not None:
            return
        common = entry.common_properties
        address = common.upstream_remote_address.socket_address
        served = f"{address.address}:{address.port_value}" if address.address else None
        self._follow(exchange.placement, served)
        exchange.status = entry.response.response_code.value
        if exchange.status == 0:
            exchange.outcome = "cancelled"
            self._report(exchange.placement.complete("cancelled"))
            return
        if not exchange.stream and common.HasField("time_to_first_upstream_rx_byte"):
            # A whole answer arrives with its headers: its latency stands in for the TTFT.
            first = common.time_to_first_upstream_rx_byte
            exchange.first_token_at = exchange.picked_at + first.seconds + first.nanos / 1e9
        self._finish(exchange)

    # -- closing the lease ---------------------------------------------------------------------

    def _finish(self, exchange: _Exchange) -> None:
        """The whole response went through: close the lease with what was seen of it."""
        placement = exchange.placement
        if placement is None or exchange.outcome is not None:
            return
        exchange.outcome = "success" if 0 < exchange.status < 500 else "engine_error"
        self._awaiting_log.pop(exchange.gateway_request_id, None)
        usage = _usage(exchange.tail) if exchange.tail else {}
        self._report(
            placement.complete(
                exchange.outcome,
                observed_ttft_s=(
                    exchange.first_token_at - exchange.picked_at if exchange.first_token_at else 0.0
                ),
                prompt_tokens=usage.get("prompt_tokens", exchange.prompt_tokens),
                output_tokens=usage.get("completion_tokens", exchange.output_events),
            )
        )

    def _close(self, exchange: _Exchange) -> None:
        """The gateway ended the stream: a lease not closed yet closes now, as success when a
        response came (the gateway sends no body to the picker) or as cancelled when none did
        (the client left, or the gateway gave up on every endpoint)."""
        placement = exchange.placement
        if placement is None or exchange.outcome is not None:
            return
        if exchange.status == 0 and exchange.gateway_request_id in self._awaiting_log:
            return  # Envoy sends no response phase here: its access log closes the lease
        if exchange.status == 0:
            exchange.outcome = "cancelled"
            self._report(placement.complete("cancelled"))
            return
        self._finish(exchange)

    def _report(self, report: Awaitable[bool]) -> None:
        if isinstance(report, SettledReport):  # the scheduler in this process took it
            if report.error is not None:
                logger.warning("the scheduler refused a report: %s", report.error)
            return
        task: asyncio.Task[bool] = asyncio.ensure_future(report)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    # -- refusals ------------------------------------------------------------------------------

    def _refuse(
        self, exchange: _Exchange, status: int, body: dict[str, Any] | str, details: str
    ) -> list[ext_pb.ProcessingResponse]:
        exchange.decided = True
        exchange.outcome = "cancelled"
        if isinstance(body, str):
            body = _error(body, "invalid_request_error" if status < 500 else "server_error",
                          details)  # fmt: skip
        self._metrics.picks.labels(str(status)).inc()
        return [immediate_response(status, body, details=f"twinroute_{details}")]

    def _too_large(self, exchange: _Exchange) -> list[ext_pb.ProcessingResponse]:
        return self._refuse(
            exchange,
            413,
            f"the request body is over the gateway's limit of {self._settings.max_body_bytes} "
            "bytes",
            "body_too_large",
        )


def _ends_by_log(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the gateway said (gRPC metadata on its ext_proc stream, set in its bootstrap)
    that request ends come in its access log: then the stream's end is not the request's."""
    for key, value in context.invocation_metadata() or ():
        if key == END_REPORT_METADATA:
            return value == END_REPORT_ACCESS_LOG
    return False


def _error(message: str, error_type: str, code: str) -> dict[str, Any]:
    return error_body(message=message, error_type=error_type, code=code)


def _usage(tail: bytes) -> dict[str, int]:
    """The usage of an answer from its last bytes: a whole JSON answer, or the last `data:`
    event of a stream that carries one (`stream_options.include_usage`)."""
    for piece in reversed(tail.split(b"data: ")):
        start = piece.find(b'"usage"')
        if start < 0:
            continue
        try:
            answer = json.loads(piece.strip())
        except ValueError:
            continue
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(usage, dict):
            return {k: v for k, v in usage.items() if isinstance(v, int)}
    return {}


class _AccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's access-log service, answered by the picker (lean gateways' request ends)."""

    def __init__(self, picker: EndpointPicker) -> None:
        self._picker = picker

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        return await self._picker.StreamAccessLogs(request_iterator, context)


class PickerServer:
    """The endpoint picker and the gRPC health services the protocol names on one port.

    `liveness` serves from the start; `readiness` and the ext_proc service only once
    discovery has given the scheduler its endpoints (`mark_synced`), so a gateway does not
    send requests to a picker that would answer them all 503."""

    def __init__(self, *, picker: EndpointPicker, listen: str) -> None:
        self.picker = picker
        self.server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        ext_grpc.add_ExternalProcessorServicer_to_server(picker, self.server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(_AccessLogs(picker), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{listen.rpartition(':')[0]}:{port}"
        self.synced = False

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        await self._set_ready()

    async def mark_synced(self) -> None:
        """Discovery has applied its first snapshot: ready (before or after `start`)."""
        self.synced = True
        await self._set_ready()

    async def _set_ready(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.synced
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", "readiness", EXT_PROC_SERVICE):
            await self.health.set(name, status)

    async def stop(self, *, grace_s: float = 5.0) -> None:
        for name in ("", *HEALTH_SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
