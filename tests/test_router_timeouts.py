"""Engine timeouts per attempt: a hung engine is retried elsewhere within the first-byte (or
whole-response) timeout, a started stream that goes silent ends with an error event after the
idle timeout, and a stream that keeps sending runs as long as it likes.

The engines here are small aiohttp servers that misbehave on purpose (hang, stall, trickle);
the router runs in this process over the in-process scheduler, round robin in id order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from twinroute.scheduler.build import build_service
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

from twinroute.router.server import ENDPOINT_HEADER, RouterSettings, build_app

MODEL = "m"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish}
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


async def hang(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(
            {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )  # fmt: skip
    return await trickle(request, chunks=2, every_s=0.0)


async def trickle(request: web.Request, *, chunks: int, every_s: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(chunks):
        await response.write(chunk(f"t{i} "))
        await asyncio.sleep(every_s)
    await response.write(chunk("", "stop") + b"data: [DONE]\n\n")
    return response


async def stall_after_first_chunk(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chunk("first "))
    await asyncio.sleep(3600)
    return response


@pytest.fixture
async def engines() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


class Router:
    def __init__(self, url: str, service: SchedulerService) -> None:
        self.url = url
        self.service = service

    async def timeouts(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(f"{self.url}/metrics") as response:
            text = await response.text()
        return {
            sample.labels["kind"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "twinroute_router_engine_timeouts"
            for sample in family.samples
            if sample.name.endswith("_total")
        }


@pytest.fixture
async def start_router() -> AsyncIterator[Callable[..., Awaitable[Router]]]:
    runners: list[web.AppRunner] = []

    async def start(
        endpoints: list[tuple[str, str]], *, lease_ttl_s: float = 600.0, **settings: Any
    ) -> Router:
        service = build_service(
            SchedulerSettings(policy="round_robin", served_models=(MODEL,), lease_ttl_s=lease_ttl_s)
        )
        service.set_endpoints([Endpoint(id=eid, address=address) for eid, address in endpoints])
        app = build_app(scheduler=service, settings=RouterSettings(models=(MODEL,), **settings))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Router(f"http://127.0.0.1:{runner.addresses[0][1]}", service)

    yield start
    for runner in runners:
        await runner.cleanup()


FAST = {"first_byte_timeout_s": 0.5, "response_timeout_s": 0.5, "idle_timeout_s": 0.5}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_hung_engine_is_retried_elsewhere_within_the_timeout(
    engines: Callable[[Handler], Awaitable[str]],
    start_router: Callable[..., Awaitable[Router]],
    stream: bool,
) -> None:
    """Before, one 600 s total timeout held such a request ten minutes before any retry."""
    router = await start_router(
        [("a-hung", await engines(hang)), ("b-ok", await engines(answer))], **FAST
    )
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream}
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            async with session.post(f"{router.url}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers[ENDPOINT_HEADER] == "b-ok"
                await response.read()
        assert await router.timeouts(session) == {"first_byte" if stream else "response": 1.0}
    assert time.monotonic() - started < 5
    # The hung engine's lease closed as its failure; nothing is left open.
    assert router.service.core.in_flight("a-hung") == 0
    assert router.service.core.in_flight("b-ok") == 0


async def test_a_stream_that_goes_silent_ends_with_an_error_event(
    engines: Callable[[Handler], Awaitable[str]],
    start_router: Callable[..., Awaitable[Router]],
) -> None:
    router = await start_router([("stalls", await engines(stall_after_first_chunk))], **FAST)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            async with session.post(f"{router.url}/v1/completions", json=body) as response:
                assert response.status == 200
                text = (await response.read()).decode()
        assert "first" in text and "stream_interrupted" in text
        assert "timed out" in text
        assert await router.timeouts(session) == {"idle": 1.0}
    await asyncio.sleep(0.05)  # the Complete report runs in the background
    assert router.service.core.in_flight("stalls") == 0


async def test_a_stream_that_keeps_sending_has_no_length_limit(
    engines: Callable[[Handler], Awaitable[str]],
    start_router: Callable[..., Awaitable[Router]],
) -> None:
    """Four times the whole-response timeout, with a chunk every 0.1 s: whole and unharmed.
    Time spent while the client is slow to read does not count as the engine's silence."""

    async def steady(request: web.Request) -> web.StreamResponse:
        return await trickle(request, chunks=20, every_s=0.1)

    router = await start_router([("steady", await engines(steady))], **FAST)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router.url}/v1/completions", json=body) as response:
            text = (await response.read()).decode()
        assert text.count("data: ") == 22 and text.endswith("data: [DONE]\n\n")
        assert "stream_interrupted" not in text
        assert await router.timeouts(session) == {}


async def test_a_stream_longer_than_the_lease_ttl_keeps_its_lease(
    engines: Callable[[Handler], Awaitable[str]],
    start_router: Callable[..., Awaitable[Router]],
) -> None:
    """The router renews the leases of running requests, so the TTL bounds what a lost router
    leaks, not how long a healthy stream may hold its engine's load."""

    async def steady(request: web.Request) -> web.StreamResponse:
        return await trickle(request, chunks=15, every_s=0.1)

    router = await start_router(
        [("steady", await engines(steady))], lease_ttl_s=0.5, lease_renew_every_s=0.1, **FAST
    )
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "stream": True}
    held = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{router.url}/v1/completions", json=body) as response,
    ):
        for _ in range(4):  # 1.2 s, well past the 0.5 s TTL
            await asyncio.sleep(0.3)
            router.service.expire()
            held.append(router.service.core.in_flight("steady"))
        await response.read()
    assert held == [1, 1, 1, 1]
    assert router.service.core.leases.expired_total == 0


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--idle-timeout-s must be positive"):
        RouterSettings(models=(MODEL,), idle_timeout_s=0)
