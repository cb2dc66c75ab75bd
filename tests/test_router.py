"""The router in front of engine-sim processes on 127.0.0.1: forwarding, retries, failures.

The router runs in this process over the in-process scheduler with the round_robin policy, so
each test knows which engine a request goes to; the engines are real `twinroute engine-sim`
processes (killed with SIGKILL where a test needs an engine to die).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twinroute.scheduler.api import Placement, SettledReport
from twinroute.scheduler.build import build_service
from twinroute.scheduler.openai_queries import Tokenizer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

from twinroute.bench.processes import ServerProcess, free_port, start_announced, twinroute_argv
from twinroute.openai_format import render_chat
from twinroute.router.server import ENDPOINT_HEADER, RouterSettings, build_app

MODEL = "sim-model"

StartEngine = Callable[..., Awaitable[ServerProcess]]


def round_robin(endpoints: list[tuple[str, str]]) -> SchedulerService:
    """The scheduler in-process, rotating over `endpoints` in id order."""
    service = build_service(SchedulerSettings(policy="round_robin", served_models=(MODEL,)))
    service.set_endpoints([Endpoint(id=eid, address=address) for eid, address in endpoints])
    return service


StartRouter = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    engines: list[ServerProcess] = []

    async def start(name: str, *, time_scale: float = 1.0) -> ServerProcess:
        argv = twinroute_argv(
            "engine-sim",
            "--port=0",
            f"--model={MODEL}",
            f"--instance-id={name}",
            f"--time-scale={time_scale}",
        )
        engine = await start_announced(name, argv)
        engines.append(engine)
        return engine

    yield start
    await asyncio.gather(*(engine.stop() for engine in engines))


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    runners: list[web.AppRunner] = []

    async def start(endpoints: list[tuple[str, str]], **settings: Any) -> str:
        app = build_app(
            scheduler=round_robin(endpoints), settings=RouterSettings(models=(MODEL,), **settings)
        )
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving(scheduler: Any, **runner_options: Any) -> AsyncIterator[str]:
    """The router app over `scheduler` on a free port, for as long as the block runs; its
    cleanup waits for the background reports."""
    app = build_app(scheduler=scheduler, settings=RouterSettings(models=(MODEL,)))
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def completion(prompt: str = "hello world", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **fields}


async def test_streaming_and_whole_responses_pass_through(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    engine = await start_engine("e0")
    router = await start_router([("e0", engine.address)])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=completion()) as response:
            assert response.status == 200
            assert response.headers[ENDPOINT_HEADER] == "e0"
            assert response.headers["x-twinroute-instance"] == "e0"
            assert (await response.json())["usage"]["completion_tokens"] == 4
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        }
        async with session.post(f"{router}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in (await response.read()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content", "") for d in deltas).split() == ["lorem", "ipsum", "dolor"]


def _dechunked(framed: bytes) -> bytes:
    body = b""
    while True:
        size_line, _, framed = framed.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body
        body += framed[:size]
        framed = framed[size + 2 :]


async def test_a_stream_reaches_http_1_0_and_1_1_clients_alike(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    # HTTP/1.1 gets the engine's own chunks spliced through; HTTP/1.0 has no chunks and gets
    # the stream read by read, ended by the close.
    engine = await start_engine("e0")
    router = await start_router([("e0", engine.address)])
    host, port = router.removeprefix("http://").split(":")
    body = json.dumps(completion(stream=True, max_tokens=5)).encode()
    texts = {}
    for version in ("1.0", "1.1"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /v1/completions HTTP/{version}\r\nHost: router\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head, _, payload = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(f"HTTP/{version} 200".encode())
        chunked = b"transfer-encoding: chunked" in head.lower()
        assert chunked == (version == "1.1")
        events = (_dechunked(payload) if chunked else payload).decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        texts[version] = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]]
    assert texts["1.0"] == texts["1.1"] == [" lorem", " ipsum", " dolor", " sit", " amet", ""]


async def test_connection_refused_is_retried_on_another_endpoint(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    engine = await start_engine("e1")
    dead = f"127.0.0.1:{free_port()}"
    router = await start_router([("dead", dead), ("e1", engine.address)])
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            body = completion(stream=stream)
            async with session.post(f"{router}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers[ENDPOINT_HEADER] == "e1"
                await response.read()
        async with session.get(f"{router}/metrics") as response:
            metrics = await response.text()
    assert 'twinroute_router_retries_total{endpoint="dead"}' in metrics


async def test_a_5xx_before_the_first_byte_is_retried(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded")

    app = web.Application()
    app.router.add_post("/v1/completions", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        engine = await start_engine("e1")
        broken_address = f"127.0.0.1:{runner.addresses[0][1]}"
        router = await start_router([("broken", broken_address), ("e1", engine.address)])
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{router}/v1/completions", json=completion()) as response,
        ):
            assert response.status == 200
            assert response.headers[ENDPOINT_HEADER] == "e1"
    finally:
        await runner.cleanup()


async def test_every_endpoint_failing_gives_a_502_naming_them(start_router: StartRouter) -> None:
    endpoints = [(f"dead{i}", f"127.0.0.1:{free_port()}") for i in range(2)]
    router = await start_router(endpoints, retries=5)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{router}/v1/completions", json=completion()) as response,
    ):
        error = (await response.json())["error"]
    # Two endpoints: after both failed, the scheduler has nothing left to offer.
    assert response.status == 503
    assert "dead0" in error["message"]
    assert "dead1" in error["message"]
    # ...by name only: engines' addresses are the cluster's business, not the client's.
    for _, address in endpoints:
        assert address not in error["message"]
        assert address.split(":")[1] not in error["message"]


@pytest.mark.slow
async def test_an_engine_killed_mid_run(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    """A stream already under way ends with an error event; a request still waiting for its
    first token on the dead engine is served by the other one."""
    # Twenty times slower than modelled, so the long prompt's prefill takes a visible while.
    doomed = await start_engine("doomed", time_scale=20.0)
    healthy = await start_engine("healthy")
    router = await start_router([("doomed", doomed.address), ("healthy", healthy.address)])
    async with aiohttp.ClientSession() as session:
        # Turn 0 -> doomed: a long generation that is streaming when the engine dies.
        streaming = await session.post(
            f"{router}/v1/completions", json=completion(max_tokens=100_000 // 100, stream=True)
        )
        assert streaming.headers[ENDPOINT_HEADER] == "doomed"
        first = await streaming.content.readany()
        assert first.startswith(b"data: ")
        # Turn 1 -> healthy (spacer); turn 2 -> doomed: a long prompt still prefilling.
        async with session.post(f"{router}/v1/completions", json=completion()) as spacer:
            assert spacer.headers[ENDPOINT_HEADER] == "healthy"
        long_prompt = " ".join(f"t{i}" for i in range(20_000))
        waiting = asyncio.create_task(
            session.post(f"{router}/v1/completions", json=completion(long_prompt, stream=True))
        )
        await _until_engine_has(session, doomed.url, requests=2)
        doomed.kill()
        rest = (await streaming.read()).decode()
        response = await waiting
        assert response.status == 200
        assert response.headers[ENDPOINT_HEADER] == "healthy"
        assert (await response.read()).decode().rstrip().endswith("data: [DONE]")
        streaming.release()
        response.release()
    error_events = [e for e in rest.split("\n\n") if '"error"' in e]
    assert len(error_events) == 1
    assert "doomed" in json.loads(error_events[0].removeprefix("data: "))["error"]["message"]
    assert rest.rstrip().endswith("data: [DONE]")


async def _until_engine_has(session: aiohttp.ClientSession, url: str, *, requests: int) -> None:
    async with asyncio.timeout(20):
        while True:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))
            )
            if total >= requests:
                return
            await asyncio.sleep(0.02)


BAD_INPUTS = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model", "model"),
    (json.dumps({"model": 7, "prompt": "x"}).encode(), 400, "model", "string"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model", "does not exist"),
    (json.dumps({"model": MODEL}).encode(), 400, "prompt", "prompt"),
    (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "prompt", "empty"),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt", "prompt"),
    (json.dumps({"model": MODEL, "prompt": [1, -2]}).encode(), 400, "prompt", "token ids"),
    (json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt", "batched"),
    (
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1.5}).encode(),
        400,
        "max_tokens",
        "integer",
    ),
    (
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(),
        400,
        "max_tokens",
        "at least 1",
    ),
    (
        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**9}).encode(),
        400,
        "max_tokens",
        "at most",
    ),
    (
        json.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}).encode(),
        400,
        "stream",
        "boolean",
    ),
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * 5000 + b'"}', 413, None, "bytes"),
]


@pytest.mark.parametrize(
    ("raw", "status", "param", "says"),
    BAD_INPUTS,
    ids=[
        "malformed-json",
        "not-an-object",
        "missing-model",
        "model-not-string",
        "unknown-model",
        "missing-prompt",
        "empty-prompt",
        "prompt-number",
        "negative-token-id",
        "batched-prompts",
        "max-tokens-float",
        "max-tokens-zero",
        "max-tokens-absurd",
        "stream-not-bool",
        "oversized-body",
    ],
)
async def test_bad_completions_get_4xx_with_a_reason(
    start_router: StartRouter, raw: bytes, status: int, param: str | None, says: str
) -> None:
    # Nothing may be forwarded: the only endpoint does not exist.
    router = await start_router([("nowhere", f"127.0.0.1:{free_port()}")], max_body_bytes=4096)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{router}/v1/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        payload = await response.json()
    assert response.status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param
    assert says in payload["error"]["message"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (None, "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ],
    ids=["missing", "empty", "not-object", "bad-role", "bad-content"],
)
async def test_bad_chat_messages_get_400(
    start_router: StartRouter, messages: object, param: str
) -> None:
    router = await start_router([("nowhere", f"127.0.0.1:{free_port()}")])
    body: dict[str, Any] = {"model": MODEL}
    if messages is not None:
        body["messages"] = messages
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{router}/v1/chat/completions", json=body) as response,
    ):
        payload = await response.json()
    assert response.status == 400
    assert payload["error"]["param"] == param


async def test_models_health_and_metrics(start_router: StartRouter) -> None:
    router = await start_router([("nowhere", f"127.0.0.1:{free_port()}")])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == [MODEL]
        async with session.get(f"{router}/health") as response:
            assert response.status == 200
        async with session.get(f"{router}/metrics") as response:
            assert "twinroute_router_in_flight" in await response.text()


class RecordingPort:
    """The in-process round-robin scheduler, recording every query and report of the router."""

    def __init__(self, endpoints: list[tuple[str, str]]) -> None:
        self.inner = round_robin(endpoints)
        self.queries: list[Any] = []
        self.lease_ids: list[str] = []
        self.completions: list[dict[str, Any]] = []
        self.completed = asyncio.Event()
        self.progress_reports: list[dict[str, Any]] = []

    async def pick(self, query: Any, *, timeout_s: float | None = None) -> Placement:
        self.queries.append(query)
        placement = await self.inner.pick(query, timeout_s=timeout_s)
        self.lease_ids.append(placement.lease_id)
        return Placement(placement.answer, reports=self)

    async def complete(self, **fields: Any) -> bool:
        self.completions.append(fields)
        self.completed.set()
        return await self.inner.complete(**fields)

    async def progress(self, **fields: Any) -> bool:
        self.progress_reports.append(fields)
        return await self.inner.progress(**fields)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> str:
    """A tokenizer.json on disk, as `--tokenizer` expects (built here, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<": 3, "|": 4, "user": 5, ">": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


async def test_prompt_keys_use_the_local_tokenizer_and_leases_are_completed(
    start_engine: StartEngine, word_tokenizer: str
) -> None:
    engine = await start_engine("e0")
    port = RecordingPort([("e0", engine.address)])
    app = build_app(
        scheduler=port,
        settings=RouterSettings(models=(MODEL,)),
        tokenizer=Tokenizer(word_tokenizer),
    )
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    router = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            body = completion("hello world hello", max_tokens=2)
            async with session.post(f"{router}/v1/completions", json=body) as response:
                assert response.status == 200
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "world"}]}
            async with session.post(f"{router}/v1/chat/completions", json=chat) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()  # waits for the background completions
    assert list(port.queries[0].token_ids) == [1, 2, 1]
    assert port.queries[0].text is None
    # No per-request SLO unless the client asked for one.
    assert port.queries[0].ttft_slo_s is None
    assert port.queries[0].expected_output_tokens == 2
    # The chat conversation is rendered, then tokenized.
    rendered = render_chat([{"role": "user", "content": "world"}])
    assert list(port.queries[1].token_ids) == list(Tokenizer(word_tokenizer).encode(rendered))
    assert 2 in port.queries[1].token_ids
    assert sorted(c["lease_id"] for c in port.completions) == sorted(port.lease_ids)
    assert port.inner.core.leases.expired_total == 0 and len(port.inner.core.leases) == 0
    assert {c["outcome"] for c in port.completions} == {"success"}
    assert port.completions[0]["output_tokens"] in (2, 16)


async def test_a_client_that_leaves_before_its_first_token_still_closes_the_lease(
    start_engine: StartEngine,
) -> None:
    engine = await start_engine("slow", time_scale=50.0)
    port = RecordingPort([("slow", engine.address)])
    async with serving(port, handler_cancellation=True) as router:
        body = completion(" ".join(f"t{i}" for i in range(5_000)), stream=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
            with pytest.raises(TimeoutError):
                async with session.post(f"{router}/v1/completions", json=body) as response:
                    await response.read()
        await asyncio.wait_for(port.completed.wait(), timeout=5)
    assert [(c["lease_id"], c["outcome"]) for c in port.completions] == [
        (port.lease_ids[0], "cancelled")
    ]


async def test_embedded_router_process_places_with_the_scheduler_core(
    start_engine: StartEngine,
) -> None:
    engines = [await start_engine(f"e{i}") for i in range(2)]
    endpoints = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
    router = await start_announced(
        "router",
        twinroute_argv(
            "router", "--port=0", f"--model={MODEL}", "--embedded", "--policy=round_robin",
            f"--endpoints={endpoints}",
        ),
    )  # fmt: skip
    try:
        served = []
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                async with session.post(f"{router.url}/v1/completions", json=completion()) as r:
                    assert r.status == 200
                    assert r.headers["x-twinroute-reason"] == "round_robin"
                    served.append(r.headers[ENDPOINT_HEADER])
    finally:
        await router.stop()
    assert sorted(served) == ["e0", "e0", "e1", "e1"]


async def test_router_process_over_the_grpc_scheduler_process(start_engine: StartEngine) -> None:
    engines = [await start_engine(f"e{i}") for i in range(2)]
    endpoints = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
    scheduler = await start_announced(
        "scheduler",
        twinroute_argv(
            "scheduler", "--listen=127.0.0.1:0", "--metrics-listen=", "--policy=round_robin",
            f"--model={MODEL}", f"--static-endpoints={endpoints}",
        ),
    )  # fmt: skip
    router = await start_announced(
        "router",
        twinroute_argv(
            "router", "--port=0", f"--model={MODEL}", f"--scheduler={scheduler.address}"
        ),
    )
    try:
        served = []
        async with aiohttp.ClientSession() as session:
            for stream in (False, True, False, True):
                body = completion(stream=stream)
                async with session.post(f"{router.url}/v1/completions", json=body) as r:
                    assert r.status == 200
                    assert r.headers["x-twinroute-reason"] == "round_robin"
                    served.append(r.headers[ENDPOINT_HEADER])
                    await r.read()
    finally:
        await router.stop()
        await scheduler.stop()
    assert sorted(served) == ["e0", "e0", "e1", "e1"]


async def test_a_request_carries_an_slo_only_when_its_client_asks(
    start_engine: StartEngine,
) -> None:
    engine = await start_engine("e0")
    port = RecordingPort([("e0", engine.address)])
    async with serving(port) as router, aiohttp.ClientSession() as session:
        for value, status in (("1.5", 200), ("fast", 400), ("-2", 400), ("nan", 400)):
            headers = {"x-twinroute-ttft-slo-s": value}
            async with session.post(
                f"{router}/v1/completions", json=completion(), headers=headers
            ) as response:
                assert response.status == status, value
                if status == 400:
                    error = (await response.json())["error"]
                    assert "x-twinroute-ttft-slo-s" in error["message"]
        async with session.post(f"{router}/v1/completions", json=completion()) as response:
            assert response.status == 200
    # Refused requests never reached the scheduler.
    assert [q.ttft_slo_s for q in port.queries] == [1.5, None]


def test_embedded_scheduler_flags_are_refused_with_a_remote_scheduler() -> None:
    """The pool's SLO and the other embedded scheduler settings are the scheduler's: a router
    in front of `twinroute scheduler` refuses them instead of silently ignoring them."""
    import argparse

    from twinroute.router import command as router_command

    parser = argparse.ArgumentParser()
    router_command.add_arguments(parser)
    argv = ["--model=m", "--scheduler=127.0.0.1:1", "--ttft-slo-s=2", "--policy=round_robin"]
    with pytest.raises(ValueError, match="--policy, --ttft-slo-s set the embedded scheduler"):
        router_command.build_scheduler(parser.parse_args(argv))
    embedded = parser.parse_args(
        ["--model=m", "--embedded", "--endpoints=127.0.0.1:1", "--ttft-slo-s=2"]
    )
    settings = router_command.embedded_settings(embedded)
    assert (settings.ttft_slo_s, settings.policy) == (2.0, "dualmap")


async def post_whole_then_streamed(
    session: aiohttp.ClientSession,
    router: str,
    *,
    after_each: Callable[[bool], None] = lambda _stream: None,
) -> None:
    """A whole completion, then a streamed one, each answered 200 and read to its end;
    `after_each(stream)` once each is read."""
    for stream in (False, True):
        body = completion(stream=stream)
        async with session.post(f"{router}/v1/completions", json=body) as response:
            assert response.status == 200
            await response.read()
        after_each(stream)


async def test_a_report_that_fails_any_way_is_counted_and_costs_the_client_nothing(
    start_engine: StartEngine,
) -> None:
    engine = await start_engine("e0")

    class Refusing(RecordingPort):
        async def complete(self, **fields: Any) -> bool:
            raise RuntimeError("the scheduler had a bad day")

    port = Refusing([("e0", engine.address)])
    async with serving(port) as router, aiohttp.ClientSession() as session:
        await post_whole_then_streamed(session, router)
        await asyncio.sleep(0.1)  # the reports run off the response path
        async with session.get(f"{router}/metrics") as response:
            text = await response.text()
    assert 'twinroute_router_reports_lost_total{report="complete",why="refused"} 2.0' in text


async def test_an_embedded_scheduler_takes_the_reports_without_a_task_and_counts_refusals(
    start_engine: StartEngine,
) -> None:
    """An in-process scheduler's reports are made when claimed (no task per report); one it
    refuses is counted as lost, exactly as a remote scheduler's refusal is."""
    engine = await start_engine("e0")

    class AtOnce(RecordingPort):
        def complete(self, **fields: Any) -> Any:  # type: ignore[override]
            def refuse() -> bool:
                self.completions.append(fields)
                raise RuntimeError("the scheduler had a bad day")

            return SettledReport.of(refuse)

        def progress(self, **fields: Any) -> Any:  # type: ignore[override]
            self.progress_reports.append(fields)
            return SettledReport(True)

    port = AtOnce([("e0", engine.address)])

    def reported_already(stream: bool) -> None:
        # Made before the answer was done: nothing waits in the background.
        assert len(port.completions) == 1 + stream

    async with serving(port) as router, aiohttp.ClientSession() as session:
        await post_whole_then_streamed(session, router, after_each=reported_already)
        async with session.get(f"{router}/metrics") as response:
            text = await response.text()
    assert [r["event"] for r in port.progress_reports] == ["first_token"]
    assert 'twinroute_router_reports_lost_total{report="complete",why="refused"} 2.0' in text


async def test_random_paths_add_no_metric_series(start_router: StartRouter) -> None:
    """Clients choose paths: labelling requests by the raw path would let them grow the
    metric series without bound. Unknown paths share one label."""
    import random

    router = await start_router([("nowhere", f"127.0.0.1:{free_port()}")])

    def series(text: str) -> set[str]:
        return {
            line.split(" ")[0]
            for line in text.splitlines()
            if line.startswith("twinroute_router_requests_total{")
        }

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router}/health") as response:
            assert response.status == 200
        async with session.get(f"{router}/metrics") as response:
            before = series(await response.text())
        paths = {"/" + "".join(random.choices("abcdefghij/", k=12)) for _ in range(400)}
        for path in paths:
            async with session.get(f"{router}{path}") as response:
                assert response.status in (404, 405)
        async with session.get(f"{router}/metrics") as response:
            text = await response.text()
    after = series(text)
    assert len(after - before) <= 2, sorted(after - before)[:5]
    assert 'route="other"' in text


async def test_the_request_id_is_the_routers_own_and_says_so(start_engine: StartEngine) -> None:
    """A client's x-request-id is neither trusted to be unique nor to be safe to log or to hand
    to an engine (vLLM refuses a request id already running): the router uses its own, keeps a
    well-formed client id beside it for correlation, and returns the id in the answer."""
    engine = await start_engine("e0")
    port = RecordingPort([("e0", engine.address)])
    echoed = []
    async with serving(port) as router, aiohttp.ClientSession() as session:
        for client_id in ("trace-42", "trace-42", "x" * 500, "evil\u2028id"):
            headers = {"x-request-id": client_id}
            async with session.post(
                f"{router}/v1/completions", json=completion(), headers=headers
            ) as response:
                assert response.status == 200
                echoed.append(response.headers["x-request-id"])
    ids = [q.request_id for q in port.queries]
    assert ids == echoed
    assert len(set(ids)) == 4, ids
    assert ids[0].endswith(":trace-42") and ids[1].endswith(":trace-42")
    assert all(len(i) < 200 and i.isprintable() and "evil" not in i for i in ids[2:])


async def test_the_embedded_schedulers_metrics_are_served_with_the_routers() -> None:
    import argparse

    from aiohttp.test_utils import TestClient, TestServer

    from twinroute.router import command as router_command

    parser = argparse.ArgumentParser()
    router_command.add_arguments(parser)
    args = parser.parse_args(["--model=m", "--embedded", "--endpoints=e0=127.0.0.1:1"])
    scheduler, _background, scheduler_metrics = router_command.build_scheduler(args)
    assert scheduler_metrics is not None
    app = build_app(
        scheduler=scheduler,
        settings=RouterSettings(models=("m",)),
        scheduler_metrics=scheduler_metrics,
    )
    async with TestClient(TestServer(app)) as client:
        text = await (await client.get("/metrics")).text()
    assert "twinroute_router_in_flight" in text
    assert "twinroute_scheduler_ready_endpoints 1.0" in text
