"""The router's side of vLLM's disaggregated prefill/decode protocol (KV connectors such as
NixlConnector), used when the scheduler's placement names a prefill endpoint.

Per request:
1. **Prefill hop.** The client's body, with `max_tokens` (and a chat request's
   `max_completion_tokens`) set to 1, `stream` false, no `stream_options`, and
   `kv_transfer_params` asking for remote decode (`do_remote_decode: true`, the `remote_*`
   fields null, as vLLM's proxies send it), goes to the prefill endpoint, with the request's
   `X-Request-Id`. Its one output token is discarded; its answer's `kv_transfer_params` (where
   the KV waits: `remote_engine_id`, `remote_block_ids`, `remote_host`, `remote_port`, ...) is
   all that is kept.
2. **Decode.** The client's body, unchanged but for those `kv_transfer_params`, goes to the
   decode endpoint through the router's usual forward path (streamed or not, retries,
   lease reporting), so the client sees the decode instance's response.
3. **Prefill failure never loses the request.** A prefill endpoint that cannot be reached or
   answers a 5xx is an engine failure: while the router's retry budget lasts, the request is
   placed again with that endpoint excluded (another prefill instance, or none, and then the
   decode instance prefills). Otherwise, and when the prefill endpoint refuses the request
   (4xx) or answers without usable `kv_transfer_params` (an engine without a KV connector), the
   decode instance gets the original body and prefills itself: a fallback, counted by reason.
4. **The scheduler hears of it** (`Progress`): `prefill_done` after a hop that worked, so the
   prefill instance stops carrying the request while the decode runs; `prefill_fell_back`,
   awaited before the decode is sent, so the decode endpoint's lease carries the prefill.

Metrics: `twinroute_router_prefill_seconds` (prefill hop latency), `twinroute_router_prefill_hops
{outcome}` and `twinroute_router_prefill_fallbacks{reason}`. TTFT reported to the scheduler
counts from the start of the prefill hop (what the client waits for).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram

from twinroute.router.upstream_errors import describe

logger = logging.getLogger(__name__)

PARAM = "kv_transfer_params"
PREFILL_HEADER = "x-twinroute-prefill-endpoint"


def remote_decode_params() -> dict[str, Any]:
    """What the prefill request carries: prefill here, the KV goes to a remote decode."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def prefill_body(body: Mapping[str, Any]) -> bytes:
    """The client's request as the prefill instance gets it (step 1 of the module docstring)."""
    prefill = dict(body)
    prefill[PARAM] = remote_decode_params()
    prefill["stream"] = False
    prefill.pop("stream_options", None)
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    return json.dumps(prefill, separators=(",", ":")).encode()


def decode_body(body: Mapping[str, Any], params: Mapping[str, Any]) -> bytes:
    """The client's request as the decode instance gets it: the prefill's params added."""
    return json.dumps({**body, PARAM: dict(params)}, separators=(",", ":")).encode()


class PrefillFailed(Exception):
    """The prefill hop failed; `retriable` when another prefill instance may succeed."""

    def __init__(self, *, reason: str, detail: str, retriable: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retriable = retriable


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """What goes to the decode endpoint: the body, and whether it carries a prefill's KV."""

    body: bytes
    prefilled: bool


class DisaggregationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.prefill_seconds = Histogram(
            "twinroute_router_prefill_seconds",
            "Prefill hop latency: from sending the prefill request to its kv_transfer_params.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.prefill_hops = Counter(
            "twinroute_router_prefill_hops",
            "Prefill hops of disaggregated requests, by outcome (ok or the failure's reason).",
            ["outcome"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "twinroute_router_prefill_fallbacks",
            "Disaggregated requests the decode endpoint prefilled itself, by why.",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "twinroute_router_prefill_retries",
            "Disaggregated requests placed again after their prefill endpoint failed.",
            registry=registry,
        )


class Disaggregation:
    """Runs prefill hops for one router (its HTTP session, its metrics registry)."""

    def __init__(
        self, *, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics = DisaggregationMetrics(registry)
        self._clock = clock

    async def prepare(
        self,
        *,
        session: aiohttp.ClientSession,
        prefill_address: str,
        prefill_endpoint_id: str,
        path: str,
        raw: bytes,
        request_id: str,
        may_retry: bool,
        timeout_s: float = 60.0,
    ) -> DecodeRequest:
        """Run the prefill hop; the decode request to send. Raises `PrefillFailed` only when
        the failure is retriable and `may_retry` (the caller places the request again)."""
        body = json.loads(raw)
        started = self._clock()
        try:
            params = await self._prefill(
                session=session,
                url=f"http://{prefill_address}{path}",
                body=prefill_body(body),
                request_id=request_id,
                timeout_s=timeout_s,
            )
        except PrefillFailed as failure:
            self.metrics.prefill_hops.labels(failure.reason).inc()
            if failure.retriable and may_retry:
                self.metrics.retries.inc()
                logger.warning(
                    "request %s: prefill on %s failed (%s); placing it again",
                    request_id, prefill_endpoint_id, failure,
                )  # fmt: skip
                raise
            self.metrics.fallbacks.labels(failure.reason).inc()
            logger.warning(
                "request %s: prefill on %s failed (%s); the decode endpoint prefills it",
                request_id, prefill_endpoint_id, failure,
            )  # fmt: skip
            return DecodeRequest(body=raw, prefilled=False)
        self.metrics.prefill_seconds.observe(self._clock() - started)
        self.metrics.prefill_hops.labels("ok").inc()
        return DecodeRequest(body=decode_body(body, params), prefilled=True)

    async def _prefill(
        self,
        *,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        request_id: str,
        timeout_s: float,
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        try:
            # A prefill answers once its one token is out: a first-byte wait, retried on a miss.
            async with asyncio.timeout(timeout_s):
                async with session.post(url, data=body, headers=headers) as response:
                    status = response.status
                    answer = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            logger.debug("request %s: prefill hop to %s failed: %r", request_id, url, error)
            raise PrefillFailed(
                reason="engine_error", detail=describe(error), retriable=True
            ) from None
        # What the engine said can quote the prompt: the detail (logged at WARNING and sent
        # to the client on failure) names only the status and size; the text is for DEBUG.
        detail = f"{len(answer)} bytes"
        if status != 200:
            logger.debug(
                "request %s: prefill answered HTTP %s: %s",
                request_id, status, answer[:200].decode(errors="replace"),
            )  # fmt: skip
        if status >= 500:
            raise PrefillFailed(reason="engine_error", detail=f"HTTP {status}: {detail}",
                                retriable=True)  # fmt: skip
        if status != 200:
            raise PrefillFailed(reason="refused", detail=f"HTTP {status}: {detail}",
                                retriable=False)  # fmt: skip
        try:
            params = json.loads(answer).get(PARAM)
        except (ValueError, AttributeError):
            params = None
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise PrefillFailed(
                reason="no_kv_params",
                detail=f"the answer has no usable {PARAM} (is the engine's KV connector on?)",
                retriable=False,
            )
        return params
