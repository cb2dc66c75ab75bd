"""The OpenAI-compatible front end: validate, ask the scheduler, forward, report back.

Per request:
1. Read and validate the body (4xx in OpenAI's error shape; nothing is forwarded).
2. Compute the prompt for prefix keys: token ids from a local tokenizer when configured,
   else the prompt text (chat: the rendered conversation).
3. Pick (scheduler), forward the original body unchanged to the chosen engine.
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
5. Complete the lease (outcome, TTFT, tokens) off the response path.

Streaming is passed through chunk by chunk as it arrives (aiohttp sets TCP_NODELAY on both the
server and the client sockets). The response names the engine in `x-twinroute-endpoint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from yarl import URL

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
from twinroute.router.migration import MigrationCoordinator, MigrationFeed, SplicedStream
from twinroute.router.scheduling import (
    NoEndpointAvailable,
    Outcome,
    PickQuery,
    Placement,
    ProgressEvent,
    SchedulerPort,
    SchedulerUnavailable,
)

logger = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-twinroute-endpoint"
REASON_HEADER = "x-twinroute-reason"
# Headers of the engine's response that are passed on to the client.
_PASSED_HEADERS = ("Content-Type", "x-twinroute-instance", "Cache-Control")


class Tokenizer:
    """Token ids for prefix keys from a Hugging Face `tokenizer.json` on disk."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids


@dataclass(frozen=True, slots=True)
class RouterSettings:
    models: tuple[str, ...]
    retries: int = 2
    max_body_bytes: int = 16 * 1024 * 1024
    max_tokens_limit: int = 131_072
    connect_timeout_s: float = 2.0
    # Whole-response limit; long generations are legitimate, so it is generous.
    request_timeout_s: float = 600.0
    ttft_slo_s: float = 0.0
    # Estimate of model tokens per character, for the scheduler's TTFT model in text mode.
    tokens_per_char: float = 0.25


class _Lease:
    """One placement and whether its outcome went back to the scheduler (exactly once)."""

    __slots__ = ("placement", "reported", "started")

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.reported = False
        # When a prefill hop began (disaggregated requests): the client's wait starts there.
        self.started: float | None = None


class _EngineFailed(Exception):
    """The engine failed before anything reached the client; the request can go elsewhere.

    `engine_text` is what the engine said (its error body), which may quote the prompt: it
    goes back to the client in the error answer and to DEBUG logs, never to INFO and above.
    """

    def __init__(self, summary: str, *, engine_text: str = "") -> None:
        super().__init__(f"{summary}: {engine_text}" if engine_text else summary)
        self.summary = summary
        self.engine_text = engine_text


class _EngineRejected(Exception):
    """The engine answered a 5xx in OpenAI's error format: it may be this request's fault."""

    def __init__(self, *, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body
        self.headers = headers


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "twinroute_router_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.retries = Counter(
            "twinroute_router_retries",
            "Attempts retried on another endpoint, by the failed endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.stream_errors = Counter(
            "twinroute_router_stream_errors",
            "Streams that an engine broke after the first chunk.",
            ["endpoint"],
            registry=registry,
        )
        self.decisions = Counter(
            "twinroute_router_decisions",
            "Placements by the scheduler's reason.",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "twinroute_router_in_flight", "Requests being served.", registry=registry
        )
        self.pick_seconds = Histogram(
            "twinroute_router_pick_seconds",
            "Time to get a placement from the scheduler.",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "twinroute_router_time_to_first_token_seconds",
            "From the router's forward to the first chunk from the engine.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )


class RouterServer:
    def __init__(
        self,
        *,
        scheduler: SchedulerPort,
        settings: RouterSettings,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        migration_feed: MigrationFeed | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._tokenizer = tokenizer
        self._clock = clock
        self._registry = CollectorRegistry()
        self._metrics = RouterMetrics(self._registry)
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._request_numbers = itertools.count()
        self._prefix = f"twr-{int(time.time() * 1000) % 10**9}"
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._urls: dict[tuple[str, str], URL] = {}
        # vLLM's disaggregated prefill/decode protocol (router/disaggregated.py).
        self._disaggregation = Disaggregation(registry=self._registry, clock=clock)
        # Recompute migration of running streams on the scheduler's orders (router/migration.py).
        self.migration = (
            MigrationCoordinator(feed=migration_feed, registry=self._registry, clock=clock)
            if migration_feed is not None
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(
            total=self._settings.request_timeout_s, sock_connect=self._settings.connect_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        if self.migration is not None:
            await self.migration.start()

    async def stop(self) -> None:
        if self.migration is not None:
            await self.migration.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
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
        key = (request.path, response.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._metrics.requests.labels(request.path, str(response.status))
            if len(self._request_counters) < 256:  # paths come from clients: bound the cache
                self._request_counters[key] = counter
        counter.inc()
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
        return web.Response(
            body=generate_latest(self._registry),
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
        query = self._query(parsed, request)
        self._metrics.in_flight.inc()
        try:
            return await self._serve(request, raw, parsed, query)
        finally:
            self._metrics.in_flight.dec()

    def _query(self, parsed: ParsedRequest, request: web.Request) -> PickQuery:
        token_ids: Sequence[int] | None = parsed.prompt_token_ids
        text = parsed.prompt_text
        if token_ids is None and self._tokenizer is not None and text is not None:
            token_ids = self._tokenizer.encode(text)
            text = None
        request_id = request.headers.get("x-request-id") or (
            f"{self._prefix}-{next(self._request_numbers)}"
        )
        return PickQuery(
            request_id=request_id,
            model=parsed.model,
            prompt_text=text if token_ids is None else None,
            token_ids=token_ids,
            session_id=parsed.session_id,
            cache_salt=parsed.cache_salt,
            lora_adapter="",
            expected_output_tokens=parsed.max_tokens,
            ttft_slo_s=self._settings.ttft_slo_s,
            prompt_tokens=(
                len(token_ids)
                if token_ids is not None
                else max(1, round(len(text or "") * self._settings.tokens_per_char))
            ),
        )

    async def _serve(
        self, request: web.Request, raw: bytes, parsed: ParsedRequest, query: PickQuery
    ) -> web.StreamResponse:
        excluded: list[str] = []
        failures: list[str] = []
        # Leases of engines that answered a 5xx error of their own; settled at the end.
        rejected: list[tuple[_Lease, _EngineRejected]] = []
        engine_failed = False
        prompt_tokens = query.prompt_tokens

        def settle_rejections(*, request_caused: bool, outcome: Outcome = "engine_error") -> None:
            for lease, _ in rejected:
                if request_caused:
                    # The engine worked as designed: it refused this request.
                    self._complete_later(lease, "success", 0.0, prompt_tokens, 0)
                else:
                    if outcome == "engine_error":
                        self._metrics.retries.labels(lease.placement.endpoint_id).inc()
                    self._complete_later(lease, outcome, 0.0, prompt_tokens, 0)
            rejected.clear()

        def rejected_answer() -> web.Response | None:
            """Every engine tried answered a 5xx error of its own: relay the last answer."""
            if not rejected or engine_failed:
                return None
            last = rejected[-1][1]
            logger.info(
                "request %s: every engine tried (%s) answered HTTP %d; returned to the client",
                query.request_id,
                ", ".join(lease.placement.endpoint_id for lease, _ in rejected),
                last.status,
            )
            settle_rejections(request_caused=True)
            return web.Response(status=last.status, body=last.body, headers=last.headers)

        for _attempt in range(self._settings.retries + 1):
            if excluded:
                query = dataclasses.replace(query, exclude_endpoints=frozenset(excluded))
            try:
                started = self._clock()
                placement = await self._scheduler.pick(query)
                self._metrics.pick_seconds.observe(self._clock() - started)
            except NoEndpointAvailable as error:
                answer = rejected_answer()
                if answer is not None:
                    return answer
                settle_rejections(request_caused=False)
                return self._unavailable(f"no endpoint can serve the request: {error}", failures)
            except SchedulerUnavailable as error:
                settle_rejections(request_caused=False)
                return self._unavailable(f"the scheduler is unavailable: {error}", failures)
            except ValueError as error:
                raise RequestError(str(error)) from None
            self._metrics.decisions.labels(placement.reason).inc()
            lease = _Lease(placement)
            try:
                body = raw
                if placement.prefill_address is not None:
                    body = await self._prefill_hop(
                        request, raw, lease, query, may_retry=_attempt < self._settings.retries
                    )
                response = await self._forward(request, body, parsed, lease, prompt_tokens)
            except asyncio.CancelledError:
                # The client went away; the lease must still be closed exactly once.
                if not lease.reported:
                    self._complete_later(lease, "cancelled", 0.0, prompt_tokens, 0)
                settle_rejections(request_caused=False, outcome="cancelled")
                raise
            except PrefillFailed as failure:
                # The decode endpoint did nothing: its lease closes without blame.
                prefill_id = placement.prefill_endpoint_id or str(placement.prefill_address)
                failures.append(f"{prefill_id} (prefill): {failure}")
                excluded.append(prefill_id)
                self._complete_later(lease, "cancelled", 0.0, prompt_tokens, 0)
                continue
            except _EngineRejected as rejection:
                # Not yet the engine's fault: known only once another engine has tried.
                failures.append(f"{placement.endpoint_id}: {rejection}")
                excluded.append(placement.endpoint_id)
                rejected.append((lease, rejection))
                logger.info(
                    "request %s: endpoint %s answered HTTP %d; trying another engine",
                    query.request_id,
                    placement.endpoint_id,
                    rejection.status,
                )
                continue
            except _EngineFailed as error:
                engine_failed = True
                failures.append(f"{placement.endpoint_id}: {error}")
                excluded.append(placement.endpoint_id)
                self._metrics.retries.labels(placement.endpoint_id).inc()
                self._complete_later(lease, "engine_error", 0.0, prompt_tokens, 0)
                logger.warning(
                    "request %s: endpoint %s failed (%s); retrying elsewhere",
                    query.request_id,
                    placement.endpoint_id,
                    error.summary,
                )
                if error.engine_text:
                    logger.debug(
                        "request %s: endpoint %s said: %s",
                        query.request_id,
                        placement.endpoint_id,
                        error.engine_text,
                    )
                continue
            # Another engine served it (or refused it with a 4xx): the earlier 5xx answers
            # were those engines' failures.
            settle_rejections(request_caused=False)
            return response
        answer = rejected_answer()
        if answer is not None:
            return answer
        settle_rejections(request_caused=False)
        return web.json_response(
            error_body(
                message="every attempt failed: " + "; ".join(failures),
                error_type="engine_error",
                code="upstream_failed",
            ),
            status=502,
        )

    def _unavailable(self, message: str, failures: list[str]) -> web.Response:
        if failures:
            message += " (after: " + "; ".join(failures) + ")"
        return web.json_response(
            error_body(message=message, error_type="service_unavailable", code="no_endpoint"),
            status=503,
        )

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        parsed: ParsedRequest,
        lease: _Lease,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        placement = lease.placement
        assert self._session is not None, "start() the router before serving"
        url = self._urls.get((placement.address, request.path))
        if url is None:
            url = URL(f"http://{placement.address}{request.path}")
            if len(self._urls) < 4096:
                self._urls[(placement.address, request.path)] = url
        sent = lease.started if lease.started is not None else self._clock()
        try:
            upstream = await self._session.post(
                url, data=raw, headers={"Content-Type": "application/json"}
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise _EngineFailed(f"{type(error).__name__}: {error}") from None
        try:
            if upstream.status >= 500:
                try:
                    body = await upstream.read()
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    raise _EngineFailed(f"HTTP {upstream.status}, then {error}") from None
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
                    request, upstream, lease, sent, prompt_tokens, parsed=parsed
                )
            return await self._relay_whole(upstream, lease, sent, prompt_tokens)
        finally:
            upstream.release()

    async def _prefill_hop(
        self,
        request: web.Request,
        raw: bytes,
        lease: _Lease,
        query: PickQuery,
        *,
        may_retry: bool,
    ) -> bytes:
        """Prefill on the placement's prefill endpoint; the body for the decode endpoint.
        Raises `PrefillFailed` when the request should be placed again."""
        placement = lease.placement
        assert self._session is not None and placement.prefill_address is not None
        lease.started = self._clock()
        decode = await self._disaggregation.prepare(
            session=self._session,
            prefill_address=placement.prefill_address,
            prefill_endpoint_id=placement.prefill_endpoint_id or placement.prefill_address,
            path=request.path,
            raw=raw,
            request_id=query.request_id,
            may_retry=may_retry,
        )
        if decode.prefilled:
            self._progress_later(lease, "prefill_done")
        else:
            lease.placement = dataclasses.replace(
                placement, prefill_address=None, prefill_endpoint_id=None
            )
            # Awaited, not in the background: the scheduler must move the prefill onto the
            # decode lease before the decode's first token can be reported for it.
            if placement.lease_id:
                await self._report_progress(placement.lease_id, "prefill_fell_back")
        return decode.body

    def _headers(self, upstream: aiohttp.ClientResponse, placement: Placement) -> dict[str, str]:
        headers = {
            name: upstream.headers[name] for name in _PASSED_HEADERS if name in upstream.headers
        }
        headers[ENDPOINT_HEADER] = placement.endpoint_id
        headers[REASON_HEADER] = placement.reason
        if placement.prefill_endpoint_id:
            headers[PREFILL_HEADER] = placement.prefill_endpoint_id
        return headers

    async def _relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        lease: _Lease,
        sent: float,
        prompt_tokens: int,
    ) -> web.Response:
        placement = lease.placement
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise _EngineFailed(f"response broke: {type(error).__name__}: {error}") from None
        elapsed = self._clock() - sent
        output_tokens = 0
        if upstream.status == 200:
            usage = _usage(body)
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            output_tokens = usage.get("completion_tokens", 0)
        # A non-streamed response has no first token to time; its whole latency stands in.
        self._complete_later(lease, "success", elapsed, prompt_tokens, output_tokens)
        return web.Response(
            status=upstream.status, body=body, headers=self._headers(upstream, placement)
        )

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        lease: _Lease,
        sent: float,
        prompt_tokens: int,
        *,
        parsed: ParsedRequest | None = None,
    ) -> web.StreamResponse:
        placement = lease.placement
        content: Any = upstream.content
        spliced: SplicedStream | None = None
        if self.migration is not None and parsed is not None and self._session is not None:
            content = spliced = self.migration.splice(
                session=self._session,
                upstream=upstream,
                path=request.path,
                parsed=parsed,
                lease_id=placement.lease_id,
            )
        try:
            first = await content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise _EngineFailed(f"stream broke before its first chunk: {error}") from None
        if not first:
            raise _EngineFailed("stream ended before its first chunk")
        ttft = self._clock() - sent
        self._metrics.ttft_seconds.observe(ttft)
        self._progress_later(lease, "first_token")
        response = web.StreamResponse(status=200, headers=self._headers(upstream, placement))
        outcome: Outcome = "cancelled"
        events = 0
        try:
            await response.prepare(request)
            await response.write(first)
            events += first.count(b'"finish_reason":null')
            while True:
                try:
                    chunk = await content.readany()
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    outcome = "stream_error"
                    self._metrics.stream_errors.labels(placement.endpoint_id).inc()
                    logger.warning(
                        "endpoint %s broke a stream after it started: %s",
                        placement.endpoint_id,
                        error,
                    )
                    await response.write(_stream_error(placement.endpoint_id, error))
                    break
                if not chunk:
                    outcome = "success"
                    break
                events += chunk.count(b'"finish_reason":null')
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream (aiohttp's ClientConnectionResetError is one).
            outcome = "cancelled"
        finally:
            if spliced is not None:
                spliced.close()
            self._complete_later(lease, outcome, ttft, prompt_tokens, events)
        return response

    def _progress_later(self, lease: _Lease, event: ProgressEvent) -> None:
        """Tell the scheduler of a milestone without holding up the response; best effort
        (the lease's Complete settles everything anyway)."""
        lease_id = lease.placement.lease_id
        if not lease_id or lease.reported:
            return
        task = asyncio.get_running_loop().create_task(self._report_progress(lease_id, event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _report_progress(self, lease_id: str, event: ProgressEvent) -> None:
        """Best effort: a report the scheduler cannot take (unreachable, or too old to know
        the event) never fails the request; the lease's Complete settles it anyway."""
        try:
            await self._scheduler.progress(lease_id=lease_id, event=event)
        except SchedulerUnavailable as error:
            logger.debug("lease %s: %s not reported: %s", lease_id, event, error)
        except Exception as error:  # the scheduler refused it; the request goes on
            logger.warning(
                "lease %s: the scheduler refused the %s report: %s",
                lease_id, event, type(error).__name__,
            )  # fmt: skip

    def _complete_later(
        self,
        lease: _Lease,
        outcome: Outcome,
        observed_ttft_s: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        """Report to the scheduler without holding up the response."""
        if lease.reported:
            return
        lease.reported = True
        placement = lease.placement

        async def complete() -> None:
            try:
                await self._scheduler.complete(
                    lease_id=placement.lease_id,
                    outcome=outcome,
                    observed_ttft_s=observed_ttft_s,
                    prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens,
                )
            except SchedulerUnavailable as error:
                logger.warning("lease %s not completed: %s", placement.lease_id, error)

        task = asyncio.get_running_loop().create_task(complete())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


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


def _stream_error(endpoint_id: str, error: BaseException) -> bytes:
    body = error_body(
        message=f"engine {endpoint_id} failed while streaming: {type(error).__name__}: {error}",
        error_type="engine_stream_error",
        code="stream_interrupted",
    )
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def build_app(
    *,
    scheduler: SchedulerPort,
    settings: RouterSettings,
    tokenizer: Tokenizer | None = None,
    migration_feed: MigrationFeed | None = None,
) -> web.Application:
    server = RouterServer(
        scheduler=scheduler, settings=settings, tokenizer=tokenizer, migration_feed=migration_feed
    )
    app = web.Application(middlewares=[server.middleware], client_max_size=settings.max_body_bytes)
    app.add_routes(server.routes())

    async def lifecycle(app: web.Application) -> Any:
        await server.start()
        yield
        await server.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
