"""The OpenAI-compatible front end: validate, ask the scheduler, forward, report back.

Per request:
1. Read and validate the body (4xx in OpenAI's error shape; nothing is forwarded).
2. Compute the prompt for prefix keys: token ids from a local tokenizer when configured,
   else the prompt text (chat: the rendered conversation). The request's own TTFT objective
   comes only from its client, in the `x-twinroute-ttft-slo-s` header (seconds); without it
   the scheduler's setting applies.
3. Pick (the scheduler's API, `twinroute.scheduler.api`, in-process or over gRPC), forward the
   original body unchanged to the chosen engine.
4. Failure before the first byte reaches the client (connection refused, a 5xx, a stream
   that dies before its first chunk, a non-streamed body that breaks) -> complete the lease
   as an engine error, exclude that endpoint, pick again; at most `retries` more attempts.
   After the first chunk went out, a dying engine ends the stream with an error event.
   Content-caused errors are not engine failures: a 4xx from the engine is relayed to the
   client as is and closes the lease as a success (the engine worked as designed). A 5xx
   whose body is an error answer in OpenAI's format (the engine answered and attributes the
   failure to this request) is tried on another engine within the same `retries` bound; only
   if another engine then serves it do the earlier ones count as engine errors. If every
   engine tried answers so, the client gets the last engine's answer as is and no engine is
   counted as failing: the request is the common factor.
5. Complete the lease (outcome, TTFT, tokens) off the response path: the `Placement` of each
   attempt owes exactly one Complete, which it enforces itself.

Streaming is passed through chunk by chunk as it arrives: the first chunk through aiohttp with
the response's headers, every later one straight from the engine's socket to the client's,
framing and all (`engine_http.py`; TCP_NODELAY on both sides). The response names the engine
in `x-twinroute-endpoint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from twinroute.lean_metrics import LeanCounter, LeanHistogram
from twinroute.openai_format import (
    Kind,
    ParsedRequest,
    RequestError,
    answer_errors,
    decode_json,
    error_body,
    parse_request,
)
from twinroute.router.disaggregated import PREFILL_HEADER, Disaggregation, PrefillFailed
from twinroute.router.engine_http import ClientGoneError, EngineConnections, EngineResponse
from twinroute.router.failopen import FailOpenScheduler
from twinroute.router.migration import MigrationCoordinator, SplicedStream
from twinroute.router.upstream_errors import describe
from twinroute.scheduler.api import (
    NoEndpointError,
    Outcome,
    PickQuery,
    Placement,
    Scheduler,
    SchedulerUnreachableError,
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

logger = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-twinroute-endpoint"
_REQUEST_ID_KEY = web.RequestKey("twinroute_request_id", str)
# Lease ids per Renew call: one message stays well under gRPC's 4 MiB default.
RENEW_BATCH = 10_000
REASON_HEADER = "x-twinroute-reason"
# Headers of the engine's response that are passed on to the client.
_PASSED_HEADERS = tuple(
    (name, name.lower()) for name in ("Content-Type", "x-twinroute-instance", "Cache-Control")
)


@dataclass(frozen=True, slots=True)
class RouterSettings:
    models: tuple[str, ...]
    retries: int = 2
    max_body_bytes: int = 16 * 1024 * 1024
    max_tokens_limit: int = 131_072
    connect_timeout_s: float = 2.0
    # Per attempt, before anything reached the client, so a miss is retried elsewhere: a
    # stream's first chunk (its time to first token, queueing included) ...
    first_byte_timeout_s: float = 60.0
    # ... and a non-streamed answer, which arrives whole (long generations are legitimate).
    response_timeout_s: float = 600.0
    # A started stream may run as long as it keeps sending; this long silent, it is broken.
    idle_timeout_s: float = 60.0
    # How often the leases of running requests are renewed at the scheduler (0 = never): a
    # fraction of its lease TTL, so a long stream keeps its lease and a lost router's leases
    # expire within the TTL.
    lease_renew_every_s: float = 30.0
    # Tokenize long prompts on a worker thread (with the batch call, which releases the GIL),
    # so one long prompt does not stall every stream on the event loop; off: inline, always.
    offload: bool = True
    # Estimate of model tokens per character, for the scheduler's TTFT model in text mode.
    tokens_per_char: float = 0.25

    def __post_init__(self) -> None:
        if self.lease_renew_every_s < 0:
            raise ValueError(
                f"--lease-renew-every-s must not be negative, got {self.lease_renew_every_s}"
            )
        for name in ("connect", "first_byte", "response", "idle"):
            value = getattr(self, f"{name}_timeout_s")
            if not value > 0:
                flag = "--" + name.replace("_", "-") + "-timeout-s"
                raise ValueError(f"{flag} must be positive, got {value}")


class _EngineFailed(Exception):
    """The engine failed before anything reached the client; the request can go elsewhere.

    `summary` says what went wrong in words fit for the client (never the engine's address);
    `detail` is the full error, for the router's own log. `engine_text` is what the engine said
    (its error body), which may quote the prompt: it goes back to the client in the error
    answer and to DEBUG logs, never to INFO and above.
    """

    def __init__(self, summary: str, *, engine_text: str = "", detail: str = "") -> None:
        super().__init__(f"{summary}: {engine_text}" if engine_text else summary)
        self.summary = summary
        self.engine_text = engine_text
        self.detail = detail or summary


class _EngineRejected(Exception):
    """The engine answered a 5xx in OpenAI's error format: it may be this request's fault."""

    def __init__(self, *, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body
        self.headers = headers


# Distinct endpoint label values the router keeps at most; beyond them, "other". Endpoints come
# and go with the pool, and the router hears of them only through placements.
MAX_ENDPOINT_LABELS = 256


class _StreamResponse(web.StreamResponse):
    """A stream whose head waits for its first body bytes and goes out in the same write, as
    aiohttp's own `web.Response` does: one send to the client's socket less per stream, and
    a client that reads the head and the first event together. The switch is aiohttp's own
    (private) class attribute; an aiohttp without it sends the head at once, as before."""

    _send_headers_immediately = False


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._endpoints: set[str] = set()
        self.requests = LeanCounter(
            "twinroute_router_requests",
            "Requests answered, by matched route (other: no route matched) and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.retries = Counter(
            "twinroute_router_retries",
            "Attempts retried on another endpoint, by the failed endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.timeouts = Counter(
            "twinroute_router_engine_timeouts",
            "Engine waits that ran out: first_byte (a stream's first chunk; retried elsewhere), "
            "response (a whole answer; retried elsewhere), idle (a started stream went silent).",
            ["kind"],
            registry=registry,
        )
        self.stream_errors = Counter(
            "twinroute_router_stream_errors",
            "Streams that an engine broke after the first chunk.",
            ["endpoint"],
            registry=registry,
        )
        self.decisions = LeanCounter(
            "twinroute_router_decisions",
            "Placements by the scheduler's reason.",
            ["reason"],
            registry=registry,
        )
        self.reports_lost = Counter(
            "twinroute_router_reports_lost",
            "Reports to the scheduler that did not arrive, by report (complete, first_token, "
            "prefill_done, prefill_fell_back, renew) and why (unreachable, refused); a lost "
            "Complete holds its lease until the lease's time-to-live.",
            ["report", "why"],
            registry=registry,
        )
        # What every request updates is kept lean (`twinroute/lean_metrics.py`); the gauge
        # reads a plain count when scraped.
        self.in_flight_count = 0
        Gauge(
            "twinroute_router_in_flight", "Requests being served.", registry=registry
        ).set_function(lambda: self.in_flight_count)
        self.pick_seconds = LeanHistogram(
            "twinroute_router_pick_seconds",
            "Time to get a placement from the scheduler.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
            registry=registry,
        )
        self.ttft_seconds = LeanHistogram(
            "twinroute_router_time_to_first_token_seconds",
            "From the router's forward to the first chunk from the engine.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )

    def endpoint(self, endpoint_id: str) -> str:
        """The label value for an endpoint: its id, while the bound of distinct ones allows."""
        if endpoint_id in self._endpoints:
            return endpoint_id
        if len(self._endpoints) < MAX_ENDPOINT_LABELS:
            self._endpoints.add(endpoint_id)
            return endpoint_id
        return "other"

    def count_retry(self, endpoint_id: str) -> None:
        self.retries.labels(self.endpoint(endpoint_id)).inc()


class RouterServer:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        settings: RouterSettings,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        migrate_streams: bool = False,
        scheduler_metrics: Callable[[], bytes] | None = None,
    ) -> None:
        """`migrate_streams`: carry out the scheduler's migration orders for the streams this
        router relays (the scheduler must run with migration on)."""
        self._scheduler = scheduler
        self._settings = settings
        self._tokenizer = tokenizer
        self._clock = clock
        self._registry = CollectorRegistry()
        self._metrics = RouterMetrics(self._registry)
        register_tokenizer_metrics(tokenizer, self._registry, name="twinroute_router_prompt_chars")
        self._scheduler_metrics = scheduler_metrics
        if isinstance(scheduler, FailOpenScheduler):
            fallback = scheduler
            Gauge(
                "twinroute_router_fallback_endpoints",
                "Endpoints the router would place on, round robin, while its scheduler is away "
                "(given, or learnt from the scheduler); 0: such requests get a 503.",
                registry=self._registry,
            ).set_function(lambda: len(fallback.endpoints))
        # Engine requests go through `_engines`; the session serves the prefill hop and
        # migration's continuations.
        self._engines: EngineConnections | None = None
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._request_numbers = itertools.count()
        # Unique across router replicas and restarts, so ids never collide on a shared engine.
        self._prefix = f"twr-{uuid.uuid4().hex[:10]}"
        self._request_counters: dict[tuple[str, int], Any] = {}
        # Placements with a lease, by lease id, until they complete: what `_renew_leases`
        # keeps alive at the scheduler.
        self._placed: dict[str, Placement] = {}
        self._renewing: asyncio.Task[None] | None = None
        # vLLM's disaggregated prefill/decode protocol (router/disaggregated.py).
        self._disaggregation = Disaggregation(registry=self._registry, clock=clock)
        # Recompute migration of running streams on the scheduler's orders (router/migration.py).
        self.migration = (
            MigrationCoordinator(scheduler=scheduler, registry=self._registry, clock=clock)
            if migrate_streams
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        # No total: a healthy stream has no length limit. The deadlines are per attempt
        # (`_forward`) and per silent stretch of a stream (`_IdleWatch`).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        self._engines = EngineConnections(connect_timeout_s=self._settings.connect_timeout_s)
        if self.migration is not None:
            await self.migration.start()
        if self._settings.lease_renew_every_s > 0:
            self._renewing = asyncio.get_running_loop().create_task(
                self._renew_leases(), name="renew-leases"
            )

    async def _renew_leases(self) -> None:
        """Every `lease_renew_every_s`, tell the scheduler which leases still run here."""
        while True:
            await asyncio.sleep(self._settings.lease_renew_every_s)
            self._placed = {
                lease_id: placement
                for lease_id, placement in self._placed.items()
                if not placement.done
            }
            lease_ids = list(self._placed)
            for start in range(0, len(lease_ids), RENEW_BATCH):
                try:
                    await self._scheduler.renew(lease_ids=lease_ids[start : start + RENEW_BATCH])
                except Exception as error:  # best effort: the next round tries again
                    why = (
                        "unreachable" if isinstance(error, SchedulerUnreachableError) else "refused"
                    )
                    self._metrics.reports_lost.labels("renew", why).inc()
                    logger.debug("lease renewal failed: %s", error)
                    break

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self.migration is not None:
            await self.migration.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._engines is not None:
            self._engines.close()
        await self._scheduler.close()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics_page),
        ]

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await answer_errors(
            request, handler, max_body_bytes=self._settings.max_body_bytes
        )
        # Label by the route that matched, never by the raw path: clients choose paths.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        key = (route, response.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self._metrics.requests.labels(
                route, str(response.status)
            )
        counter.inc()
        request_id = request.get(_REQUEST_ID_KEY)
        if request_id is not None and not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    # -- info routes -----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "twinroute"}
            for m in self._settings.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        if self._scheduler_metrics is not None:
            body += self._scheduler_metrics()
        return web.Response(
            body=body,
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    # -- proxying --------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "chat")

    async def _route(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        raw = await request.read()
        parsed = parse_request(
            decode_json(raw),
            kind=kind,
            served_models=self._settings.models,
            max_tokens_limit=self._settings.max_tokens_limit,
        )
        query = await self._query(parsed, request)
        self._metrics.in_flight_count += 1
        try:
            return await self._serve(request, raw, parsed, query)
        finally:
            self._metrics.in_flight_count -= 1

    async def _query(self, parsed: ParsedRequest, request: web.Request) -> PickQuery:
        token_ids = await prompt_token_ids(parsed, self._tokenizer, offload=self._settings.offload)
        own_id = tag_request_id(
            f"{self._prefix}-{next(self._request_numbers)}", request.headers.get(REQUEST_ID_HEADER)
        )
        request[_REQUEST_ID_KEY] = own_id
        return pick_query(
            parsed,
            request_id=own_id,
            token_ids=token_ids,
            ttft_slo_s=requested_slo(request.headers.get(TTFT_SLO_HEADER)),
            tokens_per_char=self._settings.tokens_per_char,
        )

    async def _serve(
        self, request: web.Request, raw: bytes, parsed: ParsedRequest, query: PickQuery
    ) -> web.StreamResponse:
        attempts = _Attempts(
            request_id=query.request_id,
            prompt_tokens=query.prompt_tokens,
            report=self._report_soon,
            retries=self._metrics.count_retry,
        )
        for attempt in range(self._settings.retries + 1):
            if attempts.excluded:
                query = dataclasses.replace(query, exclude_endpoints=frozenset(attempts.excluded))
            try:
                started = self._clock()
                placement = await self._scheduler.pick(query)
                self._metrics.pick_seconds.observe(self._clock() - started)
            except (NoEndpointError, UnknownModelError) as error:
                answer = attempts.rejected_answer()
                if answer is not None:
                    return answer
                return self._unavailable(f"no endpoint can serve the request: {error}", attempts)
            except SchedulerUnreachableError as error:
                return self._unavailable(f"the scheduler is unavailable: {error}", attempts)
            except ValueError as error:  # InvalidPickError: the request itself is wrong
                raise RequestError(str(error)) from None
            self._metrics.decisions.labels(placement.reason.value).inc()
            if placement.lease_id:
                self._placed[placement.lease_id] = placement
            try:
                sent = self._clock()
                body = raw
                if placement.prefill_endpoint is not None:
                    body = await self._prefill_hop(
                        request, raw, placement, query, may_retry=attempt < self._settings.retries
                    )
                response = await self._forward(request, body, parsed, placement, query, sent=sent)
            except asyncio.CancelledError:
                # The client went away; the lease is still closed, once.
                attempts.cancelled(placement)
                raise
            except PrefillFailed as failure:
                attempts.prefill_failed(placement, failure)
                continue
            except _EngineRejected as rejection:
                attempts.rejected(placement, rejection)
                continue
            except _EngineFailed as error:
                attempts.failed(placement, error)
                continue
            # Another engine served it (or refused it with a 4xx): the earlier 5xx answers
            # were those engines' failures.
            attempts.settle(request_caused=False)
            return response
        answer = attempts.rejected_answer()
        if answer is not None:
            return answer
        attempts.settle(request_caused=False)
        return web.json_response(
            error_body(
                message="every attempt failed: " + "; ".join(attempts.failures),
                error_type="engine_error",
                code="upstream_failed",
            ),
            status=502,
        )

    def _unavailable(self, message: str, attempts: _Attempts) -> web.Response:
        attempts.settle(request_caused=False)
        if attempts.failures:
            message += " (after: " + "; ".join(attempts.failures) + ")"
        return web.json_response(
            error_body(message=message, error_type="service_unavailable", code="no_endpoint"),
            status=503,
        )

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        parsed: ParsedRequest,
        placement: Placement,
        query: PickQuery,
        *,
        sent: float,
    ) -> web.StreamResponse:
        """Send the request to the placement's endpoint and relay its answer; `sent` is when
        the client's wait for this attempt began (the prefill hop's start, if any)."""
        assert self._engines is not None, "start() the router before serving"
        # Until the first chunk of a stream, or the whole of any other answer, arrives: past
        # this the attempt failed before the client saw anything, and is tried elsewhere.
        deadline = asyncio.get_running_loop().time() + (
            self._settings.first_byte_timeout_s
            if parsed.stream
            else self._settings.response_timeout_s
        )
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self._engines.post(placement.endpoint.address, request.path, raw)
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            self._count_timeout(error, first_byte=parsed.stream)
            raise _EngineFailed(
                describe(error), detail=f"{type(error).__name__}: {error}"
            ) from None
        try:
            if upstream.status >= 500:
                try:
                    async with asyncio.timeout_at(deadline):
                        body = await upstream.read()
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    raise _EngineFailed(
                        f"HTTP {upstream.status}, then {describe(error)}", detail=str(error)
                    ) from None
                if _is_error_answer(body):
                    raise _EngineRejected(
                        status=upstream.status,
                        body=body,
                        headers=self._headers(upstream, placement),
                    )
                raise _EngineFailed(
                    f"HTTP {upstream.status} ({len(body)} bytes)",
                    engine_text=body[:200].decode(errors="replace"),
                )
            if parsed.stream and upstream.status == 200:
                return await self._relay_stream(
                    request,
                    upstream,
                    placement,
                    parsed,
                    sent=sent,
                    deadline=deadline,
                    prompt_tokens=query.prompt_tokens,
                )
            return await self._relay_whole(
                upstream, placement, sent=sent, deadline=deadline, prompt_tokens=query.prompt_tokens
            )
        finally:
            upstream.release()

    async def _prefill_hop(
        self,
        request: web.Request,
        raw: bytes,
        placement: Placement,
        query: PickQuery,
        *,
        may_retry: bool,
    ) -> bytes:
        """Prefill on the placement's prefill endpoint; the body for the decode endpoint.
        Raises `PrefillFailed` when the request should be placed again."""
        prefill = placement.prefill_endpoint
        assert self._session is not None and prefill is not None
        decode = await self._disaggregation.prepare(
            session=self._session,
            prefill_address=prefill.address,
            prefill_endpoint_id=prefill.id or prefill.address,
            path=request.path,
            raw=raw,
            request_id=query.request_id,
            may_retry=may_retry,
            timeout_s=self._settings.first_byte_timeout_s,
        )
        if decode.prefilled:
            self._report_soon(placement.progress("prefill_done"), what="prefill_done")
        else:
            # Awaited, not in the background: the scheduler must move the prefill onto the
            # decode lease before the decode's first token can be reported for it. The
            # placement no longer names the prefill endpoint from here on.
            await self._report(placement.progress("prefill_fell_back"), what="prefill_fell_back")
        return decode.body

    def _headers(self, upstream: EngineResponse, placement: Placement) -> dict[str, str]:
        headers = {
            name: upstream.headers[lower]
            for name, lower in _PASSED_HEADERS
            if lower in upstream.headers
        }
        headers[ENDPOINT_HEADER] = placement.endpoint.id
        headers[REASON_HEADER] = placement.reason.value
        if placement.prefill_endpoint is not None:
            headers[PREFILL_HEADER] = placement.prefill_endpoint.id
        return headers

    def _count_timeout(self, error: BaseException, *, first_byte: bool) -> None:
        if isinstance(error, TimeoutError):
            self._metrics.timeouts.labels("first_byte" if first_byte else "response").inc()

    async def _relay_whole(
        self,
        upstream: EngineResponse,
        placement: Placement,
        *,
        sent: float,
        deadline: float,
        prompt_tokens: int,
    ) -> web.Response:
        try:
            async with asyncio.timeout_at(deadline):
                body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            self._count_timeout(error, first_byte=False)
            raise _EngineFailed(
                f"response broke: {describe(error)}", detail=f"{type(error).__name__}: {error}"
            ) from None
        elapsed = self._clock() - sent
        output_tokens = 0
        if upstream.status == 200:
            usage = _usage(body)
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            output_tokens = usage.get("completion_tokens", 0)
        # A non-streamed response has no first token to time; its whole latency stands in.
        self._report_soon(
            placement.complete(
                "success",
                observed_ttft_s=elapsed,
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
            ),
            what="complete",
        )
        return web.Response(
            status=upstream.status, body=body, headers=self._headers(upstream, placement)
        )

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: EngineResponse,
        placement: Placement,
        parsed: ParsedRequest,
        *,
        sent: float,
        deadline: float,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        endpoint_id = placement.endpoint.id
        content: Any = upstream
        spliced: SplicedStream | None = None
        if self.migration is not None and self._session is not None:
            content = spliced = self.migration.splice(
                session=self._session,
                upstream=upstream,
                path=request.path,
                parsed=parsed,
                lease_id=placement.lease_id,
                endpoint_id=endpoint_id,
            )
        try:
            async with asyncio.timeout_at(deadline):
                first = await content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            self._count_timeout(error, first_byte=True)
            raise _EngineFailed(
                f"stream broke before its first chunk: {describe(error)}", detail=str(error)
            ) from None
        if not first:
            raise _EngineFailed("stream ended before its first chunk")
        ttft = self._clock() - sent
        self._metrics.ttft_seconds.observe(ttft)
        self._report_soon(placement.progress("first_token"), what="first_token")
        response = _StreamResponse(status=200, headers=self._headers(upstream, placement))
        response.headers[REQUEST_ID_HEADER] = request[_REQUEST_ID_KEY]
        # The engine's own chunks go to the client as they are (engine_http.py): the client's
        # response must be chunked too, which HTTP/1.0 has no word for.
        client = request.transport
        if spliced is not None or not upstream.chunked or request.version < aiohttp.HttpVersion11:
            client = None
        if client is not None:
            response.enable_chunked_encoding()
        outcome: Outcome = "cancelled"
        events = _EventCount(first)
        try:
            await response.prepare(request)
            if client is not None and upstream.read_to_end:
                # The whole stream came with its first read (a short answer, a fast engine):
                # head, body and end go to the client in one write.
                await response.write_eof(first)
                outcome = "success"
                return response
            await response.write(first)  # with the head, in one write
            if client is not None:
                broke = await self._pass_on(upstream, client, events)
            else:
                broke = await self._read_on(content, response, events)
            if broke is None:
                outcome = "success"
            else:
                outcome = "stream_error"
                self._metrics.stream_errors.labels(self._metrics.endpoint(endpoint_id)).inc()
                logger.warning(
                    "endpoint %s broke a stream after it started: %s", endpoint_id, broke
                )
                await response.write(_stream_error(endpoint_id, broke))
            await response.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream (aiohttp's ClientConnectionResetError and
            # engine_http's ClientGoneError are ones).
            outcome = "cancelled"
        finally:
            if spliced is not None:
                spliced.close()
            self._report_soon(
                placement.complete(
                    outcome,
                    observed_ttft_s=ttft,
                    prompt_tokens=prompt_tokens,
                    output_tokens=events.count,
                ),
                what="complete",
            )
        return response

    async def _pass_on(
        self, upstream: EngineResponse, client: asyncio.Transport, events: _EventCount
    ) -> BaseException | None:
        """Splice the rest of the stream from the engine's socket to the client's; what broke
        it, if anything did (a client that left raises ClientGoneError)."""
        upstream.forward_to(client, events.add)
        try:
            await upstream.forwarded(idle_timeout_s=self._settings.idle_timeout_s)
        except ClientGoneError:
            raise
        except TimeoutError as error:
            self._metrics.timeouts.labels("idle").inc()
            return error
        except OSError as error:
            return error
        return None

    async def _read_on(
        self, content: Any, response: web.StreamResponse, events: _EventCount
    ) -> BaseException | None:
        """Relay the rest of the stream read by read (a migrating stream, an HTTP/1.0 client,
        an engine that does not chunk); what broke it, if anything did."""
        idle = _IdleWatch(self._settings.idle_timeout_s)
        try:
            while True:
                try:
                    idle.waiting()
                    chunk = await content.readany()
                    idle.received()
                except asyncio.CancelledError:
                    if not idle.fired():
                        raise
                    self._metrics.timeouts.labels("idle").inc()
                    return TimeoutError(f"no data for {self._settings.idle_timeout_s:g} s")
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    return error
                if not chunk:
                    return None
                events.add(chunk)
                await response.write(chunk)
        finally:
            idle.stop()

    def _report_soon(self, report: Awaitable[bool], *, what: str) -> None:
        """Send a report to the scheduler without holding up the response."""
        if isinstance(report, SettledReport):  # the embedded scheduler took it already
            if report.error is not None:
                self._lost(report.error, what=what)
            return
        task = asyncio.ensure_future(self._report(report, what=what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _report(self, report: Awaitable[bool], *, what: str) -> None:
        """Best effort: a report the scheduler cannot take (unreachable, or too old to know
        the event) never fails the request; the lease's time-to-live settles what is lost."""
        try:
            await report
        except Exception as error:  # whatever went wrong, the request goes on
            self._lost(error, what=what)

    def _lost(self, error: Exception, *, what: str) -> None:
        if isinstance(error, SchedulerUnreachableError):
            # A lost Complete holds load until the lease's time-to-live; a lost milestone
            # only makes the estimate coarser until then.
            self._metrics.reports_lost.labels(what, "unreachable").inc()
            level = logging.WARNING if what == "complete" else logging.DEBUG
            logger.log(level, "%s not reported: %s", what, error)
            return
        self._metrics.reports_lost.labels(what, "refused").inc()
        logger.warning("the scheduler refused the %s report: %s", what, type(error).__name__)


class _IdleWatch:
    """A started stream's silence limit, without a timer per chunk: one timer per `limit_s`
    checks whether the stream has been waiting for its next chunk that long, and if so
    cancels the task reading it (which `fired` then tells apart from any other cancel).
    Time spent writing to a slow client does not count. (`asyncio.timeout` around each read
    costs about 4 us a chunk here, this about 0.06 us: 0.4 ms on a 100-chunk stream.)"""

    def __init__(self, limit_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._limit_s = limit_s
        self._waiting_since: float | None = None
        self._fired = False
        self._handle = self._loop.call_later(limit_s, self._check)

    def waiting(self) -> None:
        self._waiting_since = self._loop.time()

    def received(self) -> None:
        self._waiting_since = None

    def fired(self) -> bool:
        """True (once) when this watch cancelled the task: the cancel is consumed."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        self._task.uncancel()
        return True

    def stop(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self._waiting_since
        if since is not None and now - since >= self._limit_s and self._task is not None:
            self._fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at((since or now) + self._limit_s, self._check)


class _Attempts:
    """One request's tries across engines: what is excluded and why, and what is owed for
    each try (its Placement's Complete, with the outcome the later tries reveal).

    An engine that answers a 5xx error of its own may have refused this very request: whose
    fault it was is known only once another engine has tried. Those placements wait here and
    are settled as engine errors when another engine serves the request (or fails), and as
    successes when every engine tried answered so (the request is the common factor, and the
    client gets the last engine's answer as is)."""

    def __init__(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        report: Callable[..., None],
        retries: Callable[[str], None],
    ) -> None:
        self._request_id = request_id
        self._prompt_tokens = prompt_tokens
        self._report = report
        self._retries = retries
        self.excluded: list[str] = []
        self.failures: list[str] = []
        self._rejected: list[tuple[Placement, _EngineRejected]] = []
        self._engine_failed = False

    def _close(self, placement: Placement, outcome: Outcome) -> None:
        self._report(
            placement.complete(outcome, prompt_tokens=self._prompt_tokens), what="complete"
        )

    def cancelled(self, placement: Placement) -> None:
        """The client went away during this try."""
        self._close(placement, "cancelled")
        self.settle(request_caused=False, outcome="cancelled")

    def prefill_failed(self, placement: Placement, failure: PrefillFailed) -> None:
        """The prefill endpoint failed: the decode endpoint did nothing, so its lease closes
        without blame and the prefill endpoint is excluded."""
        prefill = placement.prefill_endpoint
        prefill_id = prefill.id if prefill is not None else "?"
        self.failures.append(f"{prefill_id} (prefill): {failure}")
        self.excluded.append(prefill_id)
        self._close(placement, "cancelled")

    def rejected(self, placement: Placement, rejection: _EngineRejected) -> None:
        """Not yet the engine's fault: known only once another engine has tried."""
        endpoint_id = placement.endpoint.id
        self.failures.append(f"{endpoint_id}: {rejection}")
        self.excluded.append(endpoint_id)
        self._rejected.append((placement, rejection))
        logger.info(
            "request %s: endpoint %s answered HTTP %d; trying another engine",
            self._request_id, endpoint_id, rejection.status,
        )  # fmt: skip

    def failed(self, placement: Placement, error: _EngineFailed) -> None:
        endpoint_id = placement.endpoint.id
        self._engine_failed = True
        self.failures.append(f"{endpoint_id}: {error}")
        self.excluded.append(endpoint_id)
        self._retries(endpoint_id)
        self._close(placement, "engine_error")
        logger.warning(
            "request %s: endpoint %s failed (%s); retrying elsewhere",
            self._request_id, endpoint_id, error.detail,
        )  # fmt: skip
        if error.engine_text:
            logger.debug(
                "request %s: endpoint %s said: %s",
                self._request_id, endpoint_id, error.engine_text,
            )  # fmt: skip

    def settle(self, *, request_caused: bool, outcome: Outcome = "engine_error") -> None:
        """Close the leases of the engines that answered a 5xx error of their own."""
        for placement, _ in self._rejected:
            if request_caused:
                # The engine worked as designed: it refused this request.
                self._close(placement, "success")
            else:
                if outcome == "engine_error":
                    self._retries(placement.endpoint.id)
                self._close(placement, outcome)
        self._rejected.clear()

    def rejected_answer(self) -> web.Response | None:
        """Every engine tried answered a 5xx error of its own: relay the last answer."""
        if not self._rejected or self._engine_failed:
            return None
        last = self._rejected[-1][1]
        logger.info(
            "request %s: every engine tried (%s) answered HTTP %d; returned to the client",
            self._request_id,
            ", ".join(placement.endpoint.id for placement, _ in self._rejected),
            last.status,
        )
        self.settle(request_caused=True)
        return web.Response(status=last.status, body=last.body, headers=last.headers)


def _is_error_answer(body: bytes) -> bool:
    """An error in OpenAI's format (`{"error": {"message": ...}}`, or vLLM's older
    `{"object": "error", "message": ...}`): the engine itself answered, deliberately."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(answer, dict):
        return False
    error = answer.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return True
    return answer.get("object") == "error" and isinstance(answer.get("message"), str)


def _usage(body: bytes) -> dict[str, int]:
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return {}
    return {k: v for k, v in usage.items() if isinstance(v, int)}


class _EventCount:
    """Token events relayed so far: the engine's chunks with `"finish_reason":null`."""

    __slots__ = ("count",)

    def __init__(self, first: bytes) -> None:
        self.count = first.count(b'"finish_reason":null')

    def add(self, data: bytes) -> None:
        self.count += data.count(b'"finish_reason":null')


def _stream_error(endpoint_id: str, error: BaseException) -> bytes:
    body = error_body(
        message=f"engine {endpoint_id} failed while streaming: {describe(error)}",
        error_type="engine_stream_error",
        code="stream_interrupted",
    )
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def build_app(
    *,
    scheduler: Scheduler,
    settings: RouterSettings,
    tokenizer: Tokenizer | None = None,
    migrate_streams: bool = False,
    scheduler_metrics: Callable[[], bytes] | None = None,
) -> web.Application:
    """`scheduler_metrics`: the embedded scheduler's exposition, served on /metrics after the
    router's own."""
    server = RouterServer(
        scheduler=scheduler,
        settings=settings,
        tokenizer=tokenizer,
        migrate_streams=migrate_streams,
        scheduler_metrics=scheduler_metrics,
    )
    app = web.Application(middlewares=[server.middleware], client_max_size=settings.max_body_bytes)
    app.add_routes(server.routes())

    async def lifecycle(app: web.Application) -> Any:
        await server.start()
        yield
        await server.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
