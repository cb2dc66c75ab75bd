"""Disaggregated prefill/decode in the engine simulator: vLLM's `kv_transfer_params` protocol.

What a router (or vLLM's own disaggregation proxy) does, and what each side answers, as with
vLLM's NixlConnector:
1. **Prefill instance.** The request arrives with `kv_transfer_params: {"do_remote_decode":
   true, ...}` (the proxy also sets `max_tokens=1`, `stream=false`). It runs like any other
   request; when it finishes, the prompt's KV blocks are **pinned** (taken out of the evictable
   prefix cache, as NixlConnector delays freeing them) until a decode instance pulls them or
   `pin_timeout_s` passes (vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, 480 s by default). The
   response carries `kv_transfer_params` with NixlConnector's fields: `do_remote_prefill:
   true`, `do_remote_decode: false`, `remote_engine_id`, `remote_request_id`,
   `remote_block_ids`, `remote_host`, `remote_port`, `tp_size`.
2. **Decode instance.** The request arrives with those params. Instead of prefilling, the
   engine pulls the KV from `remote_host:remote_port` (here the prefill engine's HTTP port,
   route `KV_PULL_PATH`, standing in for NIXL's side channel and RDMA read). The sender holds
   the pin for the modelled transfer time, `InstanceProfile.kv_transfer_s(tokens)` (KV bytes
   per token over the link, plus a per-transfer latency) times `time_scale`, for the prompt
   tokens the decode instance does not already hold in its prefix cache, then frees the pin.
   The request then joins the decode instance's batch with its KV in place
   (`SimRequest.kv_transferred`): it needs KV memory but no prefill compute.
3. **Failures never lose the request.** A pull that cannot complete (the prefill engine is gone,
   or the pin expired) makes the decode instance prefill the prompt itself (vLLM's
   "recompute" policy for failed KV loads); `kv_transfer_failures{reason}` counts it.
   Malformed params, params that contradict the engine's `kv_role`, or params that do not match
   what the prefill pinned (other blocks, another prompt) are the caller's mistake: 400 with
   the reason, param `kv_transfer_params`.

Unknown keys inside `kv_transfer_params` are ignored (proxies add their own, such as
`aborted_request`); `null` or all-false params mean no transfer. An engine started without a
KV transfer config refuses requests that ask for one (a misconfigured pool must be visible).

Engine flags (`twinroute engine-sim`): `--kv-transfer-config '{"kv_connector": "NixlConnector",
"kv_role": "kv_both"}'` (vLLM's shape, what the operator renders), or the shorthand
`--kv-role prefill|decode|both`. `kv_producer` only prefills for remote decodes,
`kv_consumer` only decodes remote prefills, `kv_both` does either (NixlConnector's role for
both pools).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twinroute.enginesim.core import EngineCore, block_hashes
from twinroute.openai_format import RequestError

logger = logging.getLogger(__name__)

KV_PULL_PATH = "/twinroute/kv/pull"
PARAM = "kv_transfer_params"
# vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT default: pinned KV is freed after this long unpulled.
DEFAULT_PIN_TIMEOUT_S = 480.0
_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class KvRole(enum.StrEnum):
    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"

    @property
    def prefills_for_remote(self) -> bool:
        return self is not KvRole.CONSUMER

    @property
    def decodes_remote_prefills(self) -> bool:
        return self is not KvRole.PRODUCER


# `--kv-role` shorthand -> vLLM's kv_role.
ROLE_SHORTHAND = {"prefill": KvRole.PRODUCER, "decode": KvRole.CONSUMER, "both": KvRole.BOTH}


@dataclass(frozen=True, slots=True)
class KvTransferConfig:
    """The parts of vLLM's `--kv-transfer-config` the simulator acts on."""

    role: KvRole
    connector: str = "NixlConnector"


def parse_kv_transfer_config(text: str) -> KvTransferConfig:
    """vLLM's `--kv-transfer-config` JSON; ValueError naming the problem otherwise."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"--kv-transfer-config is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError("--kv-transfer-config must be a JSON object")
    role = document.get("kv_role")
    if role not in {r.value for r in KvRole}:
        raise ValueError(
            f"--kv-transfer-config kv_role must be one of {', '.join(r.value for r in KvRole)}, "
            f"got {role!r}"
        )
    connector = document.get("kv_connector", "NixlConnector")
    if not isinstance(connector, str) or not connector:
        raise ValueError("--kv-transfer-config kv_connector must be a non-empty string")
    return KvTransferConfig(role=KvRole(role), connector=connector)


# -- the request's kv_transfer_params -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteDecode:
    """Prefill here, keep the KV for a decode instance to pull."""


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """The KV was prefilled elsewhere: pull it from `host:port`."""

    engine_id: str
    request_id: str
    block_ids: tuple[int, ...]
    host: str
    port: int


KvParams = RemoteDecode | RemotePrefill


def _refuse(message: str) -> RequestError:
    return RequestError(f"{PARAM}: {message}", param=PARAM)


def parse_kv_transfer_params(value: object) -> KvParams | None:
    """The request's `kv_transfer_params` (None: no transfer asked for); RequestError (400)
    when they cannot mean anything."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _refuse(f"must be an object, got {type(value).__name__}")
    flags = {}
    for name in ("do_remote_decode", "do_remote_prefill"):
        flag = value.get(name, False)
        if flag is None:
            flag = False
        if not isinstance(flag, bool):
            raise _refuse(f"{name} must be true or false, got {flag!r}")
        flags[name] = flag
    if flags["do_remote_decode"] and flags["do_remote_prefill"]:
        raise _refuse("do_remote_decode and do_remote_prefill cannot both be true")
    if flags["do_remote_decode"]:
        return RemoteDecode()
    if not flags["do_remote_prefill"]:
        return None
    strings = {}
    for name in ("remote_engine_id", "remote_request_id", "remote_host"):
        text = value.get(name)
        if not isinstance(text, str) or not text:
            raise _refuse(f"do_remote_prefill needs {name} (a non-empty string), got {text!r}")
        strings[name] = text
    port = value.get("remote_port")
    if type(port) is not int or not 0 < port < 65536:
        raise _refuse(f"remote_port must be a port number, got {port!r}")
    blocks = value.get("remote_block_ids")
    if not isinstance(blocks, list) or not all(type(b) is int and b >= 0 for b in blocks):
        raise _refuse("remote_block_ids must be a list of non-negative integers")
    return RemotePrefill(
        engine_id=strings["remote_engine_id"],
        request_id=strings["remote_request_id"],
        block_ids=tuple(blocks),
        host=strings["remote_host"],
        port=port,
    )


# -- both sides ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a decode request's prompt KV got here: pulled (`transferred`) or, after a failed
    pull, to be prefilled locally."""

    transferred: bool
    # Model tokens the prefill instance had cached (reported as the request's cached tokens).
    prefill_hit_tokens: int = 0


@dataclass(slots=True)
class _Pin:
    held: list[int]  # block hashes referenced in the prefix cache
    block_ids: tuple[int, ...]  # the ids handed out as remote_block_ids
    prompt_tokens: int  # model tokens
    cached_tokens: int  # model tokens the prefill found in its cache
    expires_at: float
    pulling: bool = False


class _PinCollector(Collector):
    def __init__(self, agent: KvTransferAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "twinroute_engine_kv_pinned_requests",
            "Prefilled requests whose KV waits for a decode instance to pull it.",
        )
        gauge.add_metric([], float(self._agent.pinned()))
        yield gauge


class KvTransferAgent:
    """One engine's side of KV transfer (both roles, as `config.role` allows); see the module
    docstring. `transfer_s(tokens)` is the modelled link time (the profile's), multiplied by
    the core's `time_scale` when slept."""

    def __init__(
        self,
        *,
        core: EngineCore,
        config: KvTransferConfig,
        engine_id: str,
        transfer_s: Callable[[int], float],
        registry: CollectorRegistry,
        side_channel_host: str = "",
        pin_timeout_s: float = DEFAULT_PIN_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        if pin_timeout_s <= 0:
            raise ValueError(f"pin timeout must be > 0 seconds, got {pin_timeout_s}")
        self.config = config
        self.engine_id = engine_id
        self._core = core
        self._transfer_s = transfer_s
        self._side_channel_host = side_channel_host
        self._pin_timeout_s = pin_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._pins: dict[str, _Pin] = {}
        self._block_numbers = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        # First on the registry: its scrape expires stale pins before the counters are read.
        registry.register(_PinCollector(self))
        self.remote_prefills = Counter(
            "twinroute_engine_remote_prefills",
            "Requests prefilled here for a decode instance (do_remote_decode).",
            registry=registry,
        )
        self.pins_expired = Counter(
            "twinroute_engine_kv_pins_expired",
            "Pinned KV freed unpulled after the pin timeout.",
            registry=registry,
        )
        self.sent = Counter(
            "twinroute_engine_kv_sent",
            "KV transfers served to decode instances.",
            registry=registry,
        )
        self.transfers = Counter(
            "twinroute_engine_kv_transfers",
            "Remote prefills whose KV was pulled here (do_remote_prefill).",
            registry=registry,
        )
        self.transfer_tokens = Counter(
            "twinroute_engine_kv_transfer_tokens",
            "Model tokens of KV pulled here (the prompt less what this engine had cached).",
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "twinroute_engine_kv_transfer_seconds",
            "Wall time of each KV pull, request to KV in place.",
            buckets=_TRANSFER_BUCKETS,
            registry=registry,
        )
        self.transfer_failures = Counter(
            "twinroute_engine_kv_transfer_failures",
            "Remote prefills whose KV could not be pulled; prefilled here instead.",
            ["reason"],
            registry=registry,
        )

    # -- plumbing ----------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [web.post(KV_PULL_PATH, self._pull)]

    async def close(self) -> None:
        for request_id in list(self._pins):
            self._unpin(request_id)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pinned(self) -> int:
        self._expire()
        return len(self._pins)

    def check_allowed(self, params: KvParams, *, stream: bool) -> None:
        """Refuse (400) what this engine's kv_role cannot do."""
        role = self.config.role
        if isinstance(params, RemoteDecode):
            if not role.prefills_for_remote:
                raise _refuse(
                    f"do_remote_decode asks for a prefill, but this engine's kv_role is {role}"
                )
            if stream:
                raise _refuse("do_remote_decode needs stream=false (the params come back in the "
                              "response body)")  # fmt: skip
        elif not role.decodes_remote_prefills:
            raise _refuse(
                f"do_remote_prefill asks for a decode, but this engine's kv_role is {role}"
            )

    def _hashes(self, token_ids: Sequence[int], namespace: str) -> list[int]:
        return block_hashes(
            token_ids, block_size=self._core.settings.block_size, namespace=namespace
        )

    # -- prefill side ------------------------------------------------------------------------

    def hand_over(
        self,
        *,
        request_id: str,
        token_ids: Sequence[int],
        namespace: str,
        cached_tokens: int,
        local_address: tuple[str, int],
    ) -> dict[str, Any]:
        """The prefill finished: pin its KV, return the response's `kv_transfer_params`.
        `local_address` is the socket the request came in on (what the router reached)."""
        self._expire()
        instance = self._core.instance
        cache = instance.cache
        hashes = self._hashes(token_ids, namespace)
        held = hashes[: cache.match(hashes, block_size=instance.config.block_size)]
        cache.acquire(held)
        scale = self._core.settings.token_scale
        block_ids = tuple(next(self._block_numbers) for _ in hashes)
        self._pins[request_id] = _Pin(
            held=held,
            block_ids=block_ids,
            prompt_tokens=len(token_ids) * scale,
            cached_tokens=cached_tokens * scale,
            expires_at=self._clock() + self._pin_timeout_s,
        )
        self.remote_prefills.inc()
        host, port = local_address
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_request_id": request_id,
            "remote_block_ids": list(block_ids),
            "remote_host": self._side_channel_host or host,
            "remote_port": port,
            "tp_size": 1,
        }

    def _unpin(self, request_id: str) -> None:
        pin = self._pins.pop(request_id, None)
        if pin is not None:
            self._core.instance.cache.release(pin.held)

    def _expire(self) -> None:
        now = self._clock()
        for request_id in [
            r for r, p in self._pins.items() if p.expires_at <= now and not p.pulling
        ]:
            self._unpin(request_id)
            self.pins_expired.inc()
            logger.info("KV of %s was not pulled within %.0f s; freed", request_id,
                        self._pin_timeout_s)  # fmt: skip

    async def _pull(self, request: web.Request) -> web.Response:
        """A decode instance reads a pinned request's KV: the answer comes when the modelled
        transfer is done, and the pin is freed then."""
        self._expire()
        try:
            body = json.loads(await request.read())
            request_id = body["remote_request_id"]
            block_ids = tuple(body["remote_block_ids"])
            have = int(body.get("cached_tokens", 0))
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response({"error": f"bad pull request: {error}"}, status=400)
        pin = self._pins.get(request_id) if isinstance(request_id, str) else None
        if pin is None:
            return web.json_response(
                {"error": f"no pinned KV for {request_id!r} (never prefilled here, or expired)"},
                status=404,
            )
        if pin.pulling:
            return web.json_response({"error": f"KV of {request_id!r} is being pulled"}, status=409)
        if block_ids != pin.block_ids:
            return web.json_response(
                {"error": f"remote_block_ids do not match the blocks pinned for {request_id!r}"},
                status=409,
            )
        tokens = max(0, pin.prompt_tokens - max(0, have))
        modelled = self._transfer_s(tokens)
        pin.pulling = True
        try:
            await self._sleep(modelled * self._core.settings.time_scale)
        finally:
            pin.pulling = False
            self._unpin(request_id)
        self.sent.inc()
        return web.json_response(
            {
                "prompt_tokens": pin.prompt_tokens,
                "prefill_cached_tokens": pin.cached_tokens,
                "transferred_tokens": tokens,
                "modelled_transfer_s": modelled,
            }
        )

    # -- decode side -------------------------------------------------------------------------

    async def receive(
        self, params: RemotePrefill, *, token_ids: Sequence[int], namespace: str
    ) -> Arrival:
        """Pull the prompt's KV named by `params`; an `Arrival` that says whether it came."""
        instance = self._core.instance
        hashes = self._hashes(token_ids, namespace)
        matched = instance.cache.match(hashes, block_size=instance.config.block_size)
        have = sum(instance.cache.block_tokens(h) for h in hashes[:matched])
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0)
            )
        host = f"[{params.host}]" if ":" in params.host else params.host
        url = f"http://{host}:{params.port}{KV_PULL_PATH}"
        started = self._clock()
        try:
            async with self._session.post(
                url,
                json={
                    "remote_request_id": params.request_id,
                    "remote_block_ids": list(params.block_ids),
                    "cached_tokens": have,
                },
            ) as response:
                answer = await response.json(content_type=None)
                status = response.status
            if not isinstance(answer, dict):
                answer = {}
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
            return self._failed("unreachable", params, f"{type(error).__name__}: {error}")
        if status == 404:
            return self._failed("not_found", params, str(answer.get("error", "")))
        if status == 409 or status == 400:
            raise _refuse(f"engine {params.engine_id} refused the pull: {answer.get('error')}")
        if status != 200:
            return self._failed("error", params, f"HTTP {status}")
        expected = len(token_ids) * self._core.settings.token_scale
        if answer.get("prompt_tokens") != expected:
            raise _refuse(
                f"the prefill of {params.request_id!r} had {answer.get('prompt_tokens')} prompt "
                f"tokens, this request has {expected}: not the same prompt"
            )
        self.transfers.inc()
        self.transfer_tokens.inc(int(answer.get("transferred_tokens", 0)))
        self.transfer_seconds.observe(self._clock() - started)
        return Arrival(
            transferred=True, prefill_hit_tokens=int(answer.get("prefill_cached_tokens", 0))
        )

    def _failed(self, reason: str, params: RemotePrefill, detail: str) -> Arrival:
        self.transfer_failures.labels(reason).inc()
        logger.warning(
            "KV of %s from %s:%d not pulled (%s: %s); prefilling it here",
            params.request_id, params.host, params.port, reason, detail,
        )  # fmt: skip
        return Arrival(transferred=False)
