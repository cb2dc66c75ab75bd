"""Errors caused by a request's content are not engine failures.

- engine-sim answers bad input sent straight to it (no router in front) with a 400 and the
  reason, never a 500: it shares `twinroute.openai_format` with the router;
- the router relays an engine's 4xx as is, without retrying and without counting it against
  the engine;
- an engine's 5xx error answer (OpenAI's error format: the engine attributes the failure to
  the request) is tried on another engine, within the retry bound: if another engine serves
  the request, the first counts as failed; if every engine answers so, the client gets the
  engine's answer and no engine is counted as failing. A 5xx without such a body stays an
  engine failure.

Engines are real `twinroute engine-sim` processes; an engine that fails on one kind of content
is a small aiohttp server in this process (engine-sim has no such fault).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twinroute.scheduler.api import Outcome, PickQuery, Placement
from twinroute.scheduler.build import build_service
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

from twinroute.bench.processes import ServerProcess, start_announced, twinroute_argv
from twinroute.router.server import ENDPOINT_HEADER, RouterSettings, build_app

MODEL = "sim-model"
POISON = "poison-pill"

BAD_BODIES = {
    "lone-surrogate-completion": (
        "/v1/completions",
        b'{"model": "sim-model", "prompt": "\\ud800"}',
    ),
    "lone-surrogate-chat": (
        "/v1/chat/completions",
        b'{"model": "sim-model", "messages": [{"role": "user", "content": "a\\udfff"}]}',
    ),
    "lone-surrogate-tokenize": ("/tokenize", b'{"prompt": "x\\udbff"}'),
    "invalid-utf8": ("/v1/completions", b'{"model": "sim-model", "prompt": "\xff\xfe"}'),
    "deep-nesting": ("/v1/completions", b"[" * 5000 + b"]" * 5000),
    "huge-integer": (
        "/v1/completions",
        b'{"model": "sim-model", "max_tokens": ' + b"9" * 5000 + b"}",
    ),
    "chat-role-not-a-string": (
        "/v1/chat/completions",
        b'{"model": "sim-model", "messages": [{"role": 5, "content": "hi"}]}',
    ),
}  # fmt: skip


class RecordingScheduler:
    """The in-process round-robin scheduler, remembering each lease's outcome by endpoint."""

    def __init__(self, *, endpoints: list[tuple[str, str]]) -> None:
        self.inner = build_service(SchedulerSettings(policy="round_robin", served_models=(MODEL,)))
        self.inner.set_endpoints([Endpoint(id=e, address=address) for e, address in endpoints])
        self.outcomes: list[tuple[str, Outcome]] = []
        self._endpoint_of: dict[str, str] = {}

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        placement = await self.inner.pick(query, timeout_s=timeout_s)
        self._endpoint_of[placement.lease_id] = placement.endpoint.id
        return Placement(placement.answer, reports=self)

    async def complete(self, *, lease_id: str, outcome: Outcome = "success", **fields: Any) -> bool:
        self.outcomes.append((self._endpoint_of[lease_id], outcome))
        return await self.inner.complete(lease_id=lease_id, outcome=outcome, **fields)

    async def progress(self, **fields: Any) -> bool:
        return await self.inner.progress(**fields)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Awaitable[ServerProcess]]]:
    started: list[ServerProcess] = []

    async def start(name: str, *extra: str) -> ServerProcess:
        argv = twinroute_argv(
            "engine-sim", "--port=0", f"--model={MODEL}", f"--instance-id={name}",
            "--time-scale=0.05", *extra,
        )  # fmt: skip
        engine = await start_announced(name, argv)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.stop()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in reversed(runners):
        await runner.cleanup()


def content_failing_engine(name: str, *, json_error: bool) -> web.Application:
    """Answers 500 to any prompt holding POISON, as an engine that crashes on that content;
    with `json_error` in OpenAI's error format, else as a bare text page."""

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        if POISON in str(body.get("prompt")):
            if json_error:
                return web.json_response(
                    {"error": {"message": f"{name} cannot process this prompt",
                               "type": "InternalServerError", "param": None, "code": 500}},
                    status=500,
                )  # fmt: skip
            return web.Response(status=500, text="Internal Server Error")
        return web.json_response(
            {"object": "text_completion", "choices": [{"index": 0, "text": "ok"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    return app


async def start_router(
    serve: Callable[[web.Application], Awaitable[str]],
    scheduler: RecordingScheduler,
    **settings: Any,
) -> str:
    app = build_app(scheduler=scheduler, settings=RouterSettings(models=(MODEL,), **settings))
    return "http://" + await serve(app)


async def metrics(session: aiohttp.ClientSession, router: str) -> str:
    async with session.get(f"{router}/metrics") as response:
        return await response.text()


def retries_of(text: str, endpoint: str) -> float:
    prefix = f'twinroute_router_retries_total{{endpoint="{endpoint}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


@pytest.mark.parametrize(("path", "body"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_engine_sim_answers_bad_input_sent_straight_to_it_with_a_400(
    engines: Callable[..., Awaitable[ServerProcess]], path: str, body: bytes
) -> None:
    engine = await engines("direct")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://{engine.address}{path}",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            status, answer = response.status, await response.json()
        assert status == 400, answer
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"]
        async with session.get(f"http://{engine.address}/health") as response:
            assert response.status == 200


async def test_an_engine_4xx_is_relayed_as_is_and_not_counted_against_it(
    engines: Callable[..., Awaitable[ServerProcess]],
    servers: Callable[[web.Application], Awaitable[str]],
) -> None:
    # A tiny KV memory: engine-sim refuses long prompts that the router cannot judge.
    small = await engines("small", "--kv-capacity-tokens=64")
    scheduler = RecordingScheduler(endpoints=[("small", small.address)])
    router = await start_router(servers, scheduler)
    body = {"model": MODEL, "prompt": "word " * 400, "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=body) as response:
            status, answer = response.status, await response.json()
            assert response.headers[ENDPOINT_HEADER] == "small"
        assert status == 400
        assert "KV memory" in answer["error"]["message"]
        assert answer["error"]["param"] == "prompt"
        assert retries_of(await metrics(session, router), "small") == 0
        # The engine still serves a normal request.
        async with session.post(
            f"{router}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
        ) as response:
            assert response.status == 200
    assert scheduler.outcomes == [("small", "success"), ("small", "success")]


async def test_a_5xx_error_answer_served_elsewhere_counts_against_the_first_engine(
    engines: Callable[..., Awaitable[ServerProcess]],
    servers: Callable[[web.Application], Awaitable[str]],
) -> None:
    flaky = await servers(content_failing_engine("flaky", json_error=True))
    healthy = await engines("healthy")
    scheduler = RecordingScheduler(endpoints=[("flaky", flaky), ("healthy", healthy.address)])
    router = await start_router(servers, scheduler)
    body = {"model": MODEL, "prompt": f"{POISON} please", "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=body) as response:
            assert response.status == 200
            assert response.headers[ENDPOINT_HEADER] == "healthy"
        assert retries_of(await metrics(session, router), "flaky") == 1
    assert sorted(scheduler.outcomes) == [("flaky", "engine_error"), ("healthy", "success")]


@pytest.mark.parametrize("retries", [1, 5], ids=["retries-1", "retries-5"])
async def test_a_request_every_engine_fails_on_returns_the_engines_answer_blaming_none(
    servers: Callable[[web.Application], Awaitable[str]], retries: int
) -> None:
    endpoints = [
        (name, await servers(content_failing_engine(name, json_error=True))) for name in ("a", "b")
    ]
    scheduler = RecordingScheduler(endpoints=endpoints)
    router = await start_router(servers, scheduler, retries=retries)
    body = {"model": MODEL, "prompt": f"{POISON}!", "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=body) as response:
            status, answer = response.status, await response.json()
            last = response.headers[ENDPOINT_HEADER]
        # The engine's own answer, as is: its status and message.
        assert status == 500
        assert answer["error"]["message"] == f"{last} cannot process this prompt"
        text = await metrics(session, router)
        assert retries_of(text, "a") == 0 and retries_of(text, "b") == 0
        # Both engines go on serving ordinary requests.
        for _ in range(2):
            async with session.post(
                f"{router}/v1/completions", json={"model": MODEL, "prompt": "fine"}
            ) as response:
                assert response.status == 200
    tried = scheduler.outcomes[:2]
    # Bounded: with one retry, two engines tried; never more attempts than engines.
    assert sorted(name for name, _ in tried) == ["a", "b"]
    assert all(outcome == "success" for _, outcome in scheduler.outcomes), scheduler.outcomes


async def test_a_5xx_without_an_error_answer_stays_an_engine_failure(
    servers: Callable[[web.Application], Awaitable[str]],
) -> None:
    endpoints = [
        (name, await servers(content_failing_engine(name, json_error=False))) for name in ("a", "b")
    ]
    scheduler = RecordingScheduler(endpoints=endpoints)
    router = await start_router(servers, scheduler, retries=1)
    body = {"model": MODEL, "prompt": POISON}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=body) as response:
            status, answer = response.status, await response.json()
        assert status == 502
        assert answer["error"]["code"] == "upstream_failed"
        text = await metrics(session, router)
        assert retries_of(text, "a") == 1 and retries_of(text, "b") == 1
    assert sorted(scheduler.outcomes) == [("a", "engine_error"), ("b", "engine_error")]


def test_error_answer_shapes() -> None:
    from twinroute.router.server import _is_error_answer

    assert _is_error_answer(json.dumps({"error": {"message": "x"}}).encode())
    assert _is_error_answer(json.dumps({"object": "error", "message": "x"}).encode())
    for body in (b"Internal Server Error", b"[]", b'{"error": "x"}', b"{", b'{"detail": 1}'):
        assert not _is_error_answer(body), body
