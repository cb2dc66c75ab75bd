"""HTTP face of the engine simulator: enough of vLLM's OpenAI server to stand in for a pod.

Routes: `/v1/completions`, `/v1/chat/completions` (streaming SSE ending in `data: [DONE]`, and
not), their `/render` variants (token ids, what vllm-router's cache_aware asks for),
`/tokenize`, `/detokenize`, `/v1/models`, `/health`, `/metrics` (vLLM's metric names with the
`model_name` label). Unknown request fields are ignored, as routers add their own. Every
response names the instance in `x-twinroute-instance`. There is deliberately no
`/get_server_info`: sglang-router would try to download the tokenizer a model path names.

Outputs are filler words, exactly `max_tokens` of them (the filler never ends early), so a
request's cost is what its caller asked for. A prompt that ends with a filler word is continued
from the next one (`filler_start`), so a stream migrated by recompute reads like one response.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twinroute.enginesim.core import EngineCore, Generation
from twinroute.enginesim.kv_transfer import (
    PARAM as KV_PARAM,
)
from twinroute.enginesim.kv_transfer import (
    Arrival,
    KvTransferAgent,
    RemoteDecode,
    RemotePrefill,
    parse_kv_transfer_params,
)
from twinroute.enginesim.tokenizer import WordTokenizer
from twinroute.openai_format import (
    Kind,
    ParsedRequest,
    RequestError,
    answer_errors,
    decode_json,
    parse_request,
)

INSTANCE_HEADER = "x-twinroute-instance"
MAX_BODY_BYTES = 64 * 1024 * 1024
FILLER = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit")
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    model: str
    instance_id: str
    max_model_len: int
    # Which step-cost model prices the engine's time (shown in /v1/models).
    cost_model: str = ""
    # How long the simulated model's answers are when a request sets no limit (a chat request
    # without max_tokens): where a real model would emit its end of sequence. A request that
    # continues its final message counts the tokens that message already has.
    natural_output_tokens: int = 16


class _EngineCollector(Collector):
    """Reads the instance's gauges and counters at scrape time (no bookkeeping per step)."""

    def __init__(self, *, core: EngineCore, model: str) -> None:
        self._core = core
        self._model = model

    def collect(self) -> Iterator[Metric]:
        metrics = self._core.metrics()
        scale = self._core.settings.token_scale
        labels = [self._model]
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", metrics.running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", metrics.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full.", metrics.kv_usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, float(value))
            yield gauge
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                metrics.prefix_cache_queries / scale,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                metrics.prefix_cache_hits / scale,
            ),
            ("vllm:num_preemptions", "Preemptions (recompute).", float(metrics.preemptions)),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter


class EngineServer:
    """Request handlers over one `EngineCore`; build with `build_app`."""

    def __init__(
        self,
        *,
        core: EngineCore,
        identity: EngineIdentity,
        kv: Callable[[CollectorRegistry], KvTransferAgent] | None = None,
    ) -> None:
        self._core = core
        self._identity = identity
        self._tokenizer = WordTokenizer()
        self._tokenizer.remember(FILLER)
        self._registry = CollectorRegistry()
        self._registry.register(_EngineCollector(core=core, model=identity.model))
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=self._registry,
        ).labels(identity.model)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=self._registry,
        ).labels(identity.model)
        self._request_numbers = itertools.count()
        # Disaggregated prefill/decode (vLLM's kv_transfer_params); None: not configured.
        self.kv = kv(self._registry) if kv is not None else None

    # -- plumbing --------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        kv_routes = self.kv.routes() if self.kv is not None else []
        return [
            *kv_routes,
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/completions/render", self._render_completions),
            web.post("/v1/chat/completions/render", self._render_chat),
            web.post("/tokenize", self._tokenize),
            web.post("/detokenize", self._detokenize),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
        ]

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await answer_errors(request, handler, max_body_bytes=MAX_BODY_BYTES)
        if not response.prepared:
            response.headers[INSTANCE_HEADER] = self._identity.instance_id
        return response

    def _headers(self) -> dict[str, str]:
        return {INSTANCE_HEADER: self._identity.instance_id}

    async def _parse(self, request: web.Request, kind: Kind) -> ParsedRequest:
        body = decode_json(await request.read())
        return parse_request(body, kind=kind, served_models=[self._identity.model])

    def _token_ids(self, parsed: ParsedRequest) -> list[int]:
        if parsed.prompt_token_ids is not None:
            return list(parsed.prompt_token_ids)
        assert parsed.prompt_text is not None
        return self._tokenizer.encode(parsed.prompt_text)

    # -- info routes -----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        model = {
            "id": self._identity.model,
            "object": "model",
            "created": 0,
            "owned_by": "twinroute-engine-sim",
            "root": self._identity.model,
            "max_model_len": self._identity.max_model_len,
            "twinroute_cost_model": self._identity.cost_model,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = decode_json(await request.read())
        if "messages" in body:
            parsed = parse_request(body, kind="chat", served_models=[])
            tokens = self._token_ids(parsed)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string", param="prompt")
            tokens = self._tokenizer.encode(prompt)
        return web.json_response(
            {"count": len(tokens), "max_model_len": self._identity.max_model_len, "tokens": tokens}
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = decode_json(await request.read())
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise RequestError("tokens must be a list of integers", param="tokens")
        return web.json_response({"prompt": self._tokenizer.decode(tokens)})

    async def _render_completions(self, request: web.Request) -> web.Response:
        parsed = await self._parse(request, "completions")
        return web.json_response([self._rendered(parsed)])

    async def _render_chat(self, request: web.Request) -> web.Response:
        parsed = await self._parse(request, "chat")
        return web.json_response(self._rendered(parsed))

    def _rendered(self, parsed: ParsedRequest) -> dict[str, Any]:
        return {
            "request_id": f"cmpl-{uuid.uuid4().hex}",
            "model": parsed.model,
            "prompt": parsed.prompt_text,
            "token_ids": self._token_ids(parsed),
            "sampling_params": {"max_tokens": self._max_tokens(parsed)},
        }

    # -- generation ------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, await self._parse(request, "completions"))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, await self._parse(request, "chat"))

    def _max_tokens(self, parsed: ParsedRequest) -> int:
        """The request's budget, or the simulated model's natural answer length (less what a
        continued final message already holds)."""
        if parsed.max_tokens is not None:
            return parsed.max_tokens
        natural = self._identity.natural_output_tokens
        messages = parsed.body.get("messages")
        if parsed.body.get("continue_final_message") is True and isinstance(messages, list):
            last = messages[-1] if messages else None
            if isinstance(last, dict) and isinstance(last.get("content"), str):
                natural -= len(self._tokenizer.pieces(last["content"]))
        return max(1, natural)

    async def _generate(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        token_ids = self._token_ids(parsed)
        max_tokens = self._max_tokens(parsed)
        limit = self._core.max_prompt_tokens(max_tokens=max_tokens)
        if len(token_ids) > limit:
            raise RequestError(
                f"prompt has {len(token_ids)} tokens; with max_tokens={max_tokens} "
                f"this engine's KV memory fits at most {limit}",
                param="prompt",
            )
        prefix = "chatcmpl" if parsed.kind == "chat" else "cmpl"
        request_id = f"{prefix}-{self._identity.instance_id}-{next(self._request_numbers)}"
        namespace = f"{parsed.model}\x00{parsed.cache_salt}"
        kv_params = await self._kv_params(request, parsed)
        arrival = Arrival(transferred=False)
        if isinstance(kv_params, RemotePrefill):
            assert self.kv is not None
            arrival = await self.kv.receive(kv_params, token_ids=token_ids, namespace=namespace)
        generation = self._core.submit(
            request_id=request_id,
            token_ids=token_ids,
            max_tokens=max_tokens,
            namespace=namespace,
            kv_transferred=arrival.transferred,
            prefill_hit_tokens=arrival.prefill_hit_tokens,
        )
        hand_over: Callable[[], dict[str, Any]] | None = None
        if isinstance(kv_params, RemoteDecode):
            assert self.kv is not None
            kv = self.kv
            local = request.transport.get_extra_info("sockname") if request.transport else None

            def hand_over() -> dict[str, Any]:
                return kv.hand_over(
                    request_id=request_id,
                    token_ids=token_ids,
                    namespace=namespace,
                    cached_tokens=generation.cached_tokens,
                    local_address=(str(local[0]), int(local[1])) if local else ("127.0.0.1", 0),
                )

        try:
            if parsed.stream:
                return await self._stream(request, parsed, generation, request_id, arrived)
            return await self._whole(parsed, generation, request_id, arrived, hand_over)
        finally:
            self._core.abandon(request_id)

    async def _kv_params(
        self, request: web.Request, parsed: ParsedRequest
    ) -> RemoteDecode | RemotePrefill | None:
        """The request's `kv_transfer_params`, checked against this engine's KV role."""
        raw = await request.read()  # aiohttp keeps the body: no second read from the socket
        if KV_PARAM.encode() not in raw:
            return None
        params = parse_kv_transfer_params(decode_json(raw).get(KV_PARAM))
        if params is None:
            return None
        if self.kv is None:
            raise RequestError(
                f"{KV_PARAM} asks for a KV transfer, but this engine was started without a KV "
                "transfer config (--kv-transfer-config or --kv-role)",
                param=KV_PARAM,
            )
        self.kv.check_allowed(params, stream=parsed.stream)
        return params

    async def _whole(
        self,
        parsed: ParsedRequest,
        generation: Generation,
        request_id: str,
        arrived: float,
        hand_over: Callable[[], dict[str, Any]] | None = None,
    ) -> web.Response:
        produced = 0
        while (count := await generation.queue.get()) is not None:
            if produced == 0:
                self._ttft.observe(time.monotonic() - arrived)
            produced += count
        self._e2e.observe(time.monotonic() - arrived)
        start = filler_start(parsed.prompt_text)
        text = "".join(FILLER[(start + i) % len(FILLER)] for i in range(produced))
        finish = "length"
        if parsed.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        answer = {
            "id": request_id,
            "object": obj,
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [choice],
            "usage": _usage(generation, produced),
        }
        if hand_over is not None:
            answer[KV_PARAM] = hand_over()
        return web.json_response(answer)

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        generation: Generation,
        request_id: str,
        arrived: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                INSTANCE_HEADER: self._identity.instance_id,
            }
        )
        await response.prepare(request)
        created = int(time.time())
        chat = parsed.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": request_id,
                "object": obj,
                "created": created,
                "model": parsed.model,
                "choices": choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        produced = 0
        start = filler_start(parsed.prompt_text)
        while (count := await generation.queue.get()) is not None:
            pieces = [FILLER[(start + produced + i) % len(FILLER)] for i in range(count)]
            if produced == 0:
                self._ttft.observe(time.monotonic() - arrived)
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                    await response.write(
                        chunk([{**first, "logprobs": None, "finish_reason": None}])
                    )
            produced += count
            text = "".join(pieces)
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
            else:
                choice = {"index": 0, "text": text}
            choice.update(logprobs=None, finish_reason=None)
            await response.write(chunk([choice]))
        self._e2e.observe(time.monotonic() - arrived)
        if chat:
            last: dict[str, Any] = {"index": 0, "delta": {}}
        else:
            last = {"index": 0, "text": ""}
        last.update(logprobs=None, finish_reason="length")
        await response.write(chunk([last]))
        if parsed.include_usage:
            await response.write(chunk([], usage=_usage(generation, produced)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def filler_start(prompt_text: str | None) -> int:
    """Where the filler continues: after the filler word a prompt ends with (a continuation of
    an earlier answer, as a migrated stream sends), else at the first word. So text generated
    in two parts reads exactly like text generated in one."""
    if prompt_text:
        for index, word in enumerate(FILLER):
            if prompt_text.endswith(word):
                return (index + 1) % len(FILLER)
    return 0


def _usage(generation: Generation, produced: int) -> dict[str, Any]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": produced,
        "total_tokens": generation.prompt_tokens + produced,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


def build_app(
    *,
    core: EngineCore,
    identity: EngineIdentity,
    kv: Callable[[CollectorRegistry], KvTransferAgent] | None = None,
) -> web.Application:
    """`kv` builds the engine's KV transfer agent on the engine's metrics registry
    (disaggregated prefill/decode); None: an engine without a KV connector."""
    server = EngineServer(core=core, identity=identity, kv=kv)
    app = web.Application(middlewares=[server.middleware], client_max_size=MAX_BODY_BYTES)
    app.add_routes(server.routes())

    async def lifecycle(app: web.Application) -> Any:
        core.start()
        yield
        if server.kv is not None:
            await server.kv.close()
        await core.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
