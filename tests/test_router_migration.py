"""Recompute migration in the router: a stream moved mid-way (on drain, on imbalance) reaches the
client as one response (same id, every token once, one [DONE], usage summed), through the
embedded scheduler and through the gRPC scheduler with its admin token; a target that cannot
take the stream leaves it on the source with nothing lost.

Engines, router and scheduler run in this process on 127.0.0.1 (port 0); the engines' cost
model is round numbers (2 ms per decode step), so streams last a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from twinroute.scheduler.build import build_service
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.migration import MigrationMetrics, Migrator, MigratorSettings
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint

from twinroute.enginesim.core import EngineCore, EngineSettings
from twinroute.enginesim.server import FILLER, EngineIdentity, build_app
from twinroute.openai_format import parse_request
from twinroute.router.migration import continuation_body
from twinroute.router.server import ENDPOINT_HEADER, RouterSettings
from twinroute.router.server import build_app as build_router
from twinroute.simulator.instance import Instance, InstanceConfig
from twinroute.vocabulary import MigrationMode

MODEL = "sim-model"
PROMPT = ("please migrate me " * 30).strip()
TOKEN = "s3cret"


class RoundCost:
    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 1e-5 * uncached_tokens

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 2e-3


@dataclass
class Pool:
    engines: dict[str, str] = field(default_factory=dict)  # id -> host:port
    cores: dict[str, EngineCore] = field(default_factory=dict)
    runners: list[web.AppRunner] = field(default_factory=list)

    async def start_engine(self, name: str, *, natural_output_tokens: int = 16) -> None:
        instance = Instance(
            config=InstanceConfig(kv_capacity_tokens=100_000, block_size=16),
            cost=RoundCost(),
            record_tokens=True,
        )
        core = EngineCore(instance=instance, settings=EngineSettings(block_size=16))
        app = build_app(
            core=core,
            identity=EngineIdentity(
                model=MODEL,
                instance_id=name,
                max_model_len=100_000,
                natural_output_tokens=natural_output_tokens,
            ),
        )
        self.engines[name] = await self.serve(app)
        self.cores[name] = core

    async def serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    async def settle(self) -> None:
        for _ in range(200):
            if all(core.metrics().running == 0 for core in self.cores.values()):
                return
            await asyncio.sleep(0.01)

    def assert_engines_idle(self) -> None:
        for name, core in self.cores.items():
            metrics = core.metrics()
            assert (metrics.running, metrics.waiting, metrics.kv_usage) == (0, 0, 0.0), name


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool()
    yield pool
    for runner in reversed(pool.runners):
        await runner.cleanup()


@dataclass
class Received:
    endpoint: str
    events: list[dict[str, Any]] = field(default_factory=list)
    done_count: int = 0

    def content(self, *, chat: bool) -> str:
        parts = []
        for event in self.events:
            for choice in event.get("choices", []):
                if chat:
                    parts.append(choice.get("delta", {}).get("content") or "")
                else:
                    parts.append(choice.get("text") or "")
        return "".join(parts)

    @property
    def content_events(self) -> int:
        return sum(
            1
            for e in self.events
            for c in e.get("choices", [])
            if (c.get("text") or c.get("delta", {}).get("content"))
        )


class ClientStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.received = Received(endpoint=response.headers[ENDPOINT_HEADER])

    async def read(self, *, until_content: int | None = None) -> None:
        while until_content is None or self.received.content_events < until_content:
            line = await self.response.content.readline()
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line.removeprefix(b"data: ")
            if data == b"[DONE]":
                self.received.done_count += 1
                continue
            self.received.events.append(json.loads(data))


async def open_stream(
    session: aiohttp.ClientSession,
    router: str,
    *,
    chat: bool = False,
    max_tokens: int | None = 300,
    prompt: str = PROMPT,
) -> ClientStream:
    body: dict[str, Any] = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    response = await session.post(f"http://{router}{path}", json=body)
    assert response.status == 200, await response.text()
    return ClientStream(response)


def filler(tokens: int) -> str:
    return "".join(FILLER[i % len(FILLER)] for i in range(tokens))


def assert_one_response(
    received: Received, *, chat: bool, max_tokens: int, prompt: str = PROMPT
) -> None:
    assert received.content(chat=chat) == filler(max_tokens)
    assert received.content_events == max_tokens
    assert received.done_count == 1
    identities = {(e["id"], e["created"], e["model"]) for e in received.events}
    assert len(identities) == 1, identities
    (usage,) = [e["usage"] for e in received.events if e.get("usage")]
    assert usage["completion_tokens"] == max_tokens
    # Prompt tokens are the target's less what the first leg produced: exact unless the
    # tokenizer merges across the junction, as the engine's does with chat's trailing newline
    # (its two role tags stay).
    assert usage["prompt_tokens"] == len(prompt.split()) + (2 if chat else 0)
    assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens
    finishes = [c["finish_reason"] for e in received.events for c in e["choices"]]
    assert [f for f in finishes if f is not None] == ["length"]


def round_robin(pool: Pool, *, migration: MigrationMode = "off") -> SchedulerService:
    """The in-process scheduler over the pool's engines, as `twinroute router --embedded`
    builds it."""
    service = build_service(
        SchedulerSettings(policy="round_robin", served_models=(MODEL,), migration=migration)
    )
    service.set_endpoints([Endpoint(id=i, address=a) for i, a in sorted(pool.engines.items())])
    return service


async def embedded_router(
    pool: Pool, *, mode: MigrationMode = "drain"
) -> tuple[str, SchedulerService]:
    service = round_robin(pool, migration=mode)
    assert service.migrator is not None
    app = build_router(
        scheduler=service, settings=RouterSettings(models=(MODEL,)), migrate_streams=True
    )
    router = await pool.serve(app)
    return router, service


async def wait_subscribed(service: SchedulerService, watchers: int = 1) -> None:
    assert service.migrator is not None
    await asyncio.wait_for(service.migrator.orders.wait_for_watchers(watchers), timeout=30)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_drain_migrates_a_running_stream_into_one_uninterrupted_response(
    pool: Pool, chat: bool
) -> None:
    await pool.start_engine("a")
    await pool.start_engine("b")
    router, service = await embedded_router(pool)
    await wait_subscribed(service)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, router, chat=chat)
        await stream.read(until_content=20)
        source = stream.received.endpoint
        result = await service.drain(endpoint_id=source, timeout_s=10)
        assert result.drained and result.remaining_in_flight == 0
        await stream.read()
    assert_one_response(stream.received, chat=chat, max_tokens=300)
    (committed,) = [r for r in service.migrator.results if r.committed]
    assert committed.proposal.source == source
    await pool.settle()
    pool.assert_engines_idle()
    assert service.core.in_flight("a") == service.core.in_flight("b") == 0


async def test_a_target_that_cannot_be_reached_leaves_the_stream_on_the_source(
    pool: Pool,
) -> None:
    await pool.start_engine("a")
    await pool.start_engine("b")
    # "c" is in the pool but nothing listens there.
    pool.engines["c"] = "127.0.0.1:9"
    router, service = await embedded_router(pool)
    await wait_subscribed(service)
    async with aiohttp.ClientSession() as session:
        streams = [await open_stream(session, router, max_tokens=200) for _ in range(2)]
        for stream in streams:
            await stream.read(until_content=5)
        source = streams[0].received.endpoint
        assert source != "c"
        # Only "c" is left to receive: the drain's migrations all fail to connect.
        other = ({"a", "b"} - {source}).pop()
        service.core.set_health(other, healthy=False)
        await service.drain(endpoint_id=source, timeout_s=0.5)
        for stream in streams:
            await stream.read()
    for stream in streams:
        assert stream.received.content(chat=False) == filler(200)
        assert stream.received.done_count == 1
    refused = [r for r in service.migrator.results if not r.committed]
    assert refused and all(r.proposal.target == "c" for r in refused)


async def test_persistent_imbalance_moves_the_shortest_stream(pool: Pool) -> None:
    await pool.start_engine("a")
    await pool.start_engine("b")
    service = round_robin(pool)
    registry = CollectorRegistry()
    migrator = Migrator(
        core=service.core,
        # A small notional KV memory (125 blocks of 16) so that prompts are a real share of it.
        settings=MigratorSettings(persistent_rounds=2, capacity_tokens=2_000, block_tokens=16),
        metrics=MigrationMetrics(registry),
    )
    service.attach_migrator(migrator)
    router = await pool.serve(
        build_router(
            scheduler=service, settings=RouterSettings(models=(MODEL,)), migrate_streams=True
        )
    )
    await wait_subscribed(service)
    prompts = {
        name: (word + " ") * count
        for name, word, count in (("long", "long words", 400), ("medium", "mid words", 80),
                                  ("short", "short", 33))
    }  # fmt: skip
    prompts = {name: prompt.strip() for name, prompt in prompts.items()}
    async with aiohttp.ClientSession() as session:
        streams = {
            name: await open_stream(session, router, max_tokens=400, prompt=prompt)
            for name, prompt in prompts.items()
        }
        # Round robin: long and short share an endpoint, medium has the other.
        assert streams["long"].received.endpoint == streams["short"].received.endpoint
        for stream in streams.values():
            await stream.read(until_content=5)
        for endpoint in service.core.endpoints:
            for lease in service.core.leases.leases_on(endpoint):
                service.core.first_token(lease.lease_id, now=time.monotonic())
        assert await migrator.run_round() == []
        (result,) = await migrator.run_round()
        assert result.committed, result
        assert result.proposal.source == streams["short"].received.endpoint
        for stream in streams.values():
            await stream.read()
    for name, stream in streams.items():
        assert_one_response(stream.received, chat=False, max_tokens=400, prompt=prompts[name])
    assert (
        registry.get_sample_value(
            "twinroute_scheduler_migrations_committed_total",
            {"trigger": "imbalance", "path": "router"},
        )
        == 1
    )


async def test_grpc_scheduler_orders_reach_the_router_with_the_admin_token(pool: Pool) -> None:
    await pool.start_engine("a")
    await pool.start_engine("b")
    service = round_robin(pool, migration="drain")
    server = GrpcServer(service=service, listen="127.0.0.1:0", admin_token=TOKEN)
    await server.start()
    try:
        # Without the token the order stream is refused.
        anonymous = SchedulerClient(target=server.address)
        with pytest.raises(PermissionError):
            async for _ in anonymous.watch_migrations():
                pass
        await anonymous.close()
        scheduler = SchedulerClient(target=server.address, admin_token=TOKEN)
        router = await pool.serve(
            build_router(
                scheduler=scheduler, settings=RouterSettings(models=(MODEL,)), migrate_streams=True
            )
        )
        await wait_subscribed(service)
        async with aiohttp.ClientSession() as session:
            stream = await open_stream(session, router, max_tokens=300)
            await stream.read(until_content=10)
            admin = SchedulerClient(target=server.address, admin_token=TOKEN, timeout_s=5)
            result = await admin.drain(endpoint_id=stream.received.endpoint, timeout_s=10)
            await admin.close()
            assert result.drained
            await stream.read()
        assert_one_response(stream.received, chat=False, max_tokens=300)
    finally:
        await server.stop(grace_s=0)


CONTINUATIONS = [
    (
        "completions: prompt plus the text so far",
        {"model": MODEL, "prompt": "hi", "max_tokens": 10},
        "completions",
        {"model": MODEL, "prompt": "hi lorem ipsum", "max_tokens": 8},
    ),
    (
        "chat: the partial answer is continued",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "max_completion_tokens": 10},
        "chat",
        {"model": MODEL, "max_tokens": 8, "continue_final_message": True,
         "add_generation_prompt": False,
         "messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": " lorem ipsum"}]},
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "kind", "expected"), [c[1:] for c in CONTINUATIONS], ids=[c[0] for c in CONTINUATIONS]
)
def test_continuation_body(body: dict[str, Any], kind: Any, expected: dict[str, Any]) -> None:
    parsed = parse_request(body, kind=kind, served_models=[MODEL])
    assert continuation_body(parsed, generated=" lorem ipsum", remaining=8) == expected


def test_token_id_prompts_are_not_continued() -> None:
    parsed = parse_request(
        {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 5},
        kind="completions",
        served_models=[MODEL],
    )
    assert continuation_body(parsed, generated=" x", remaining=3) is None


async def test_an_order_naming_another_source_is_refused(pool: Pool) -> None:
    """An order for this lease id but from an endpoint the stream is not on (a lease id of
    another scheduler's, say) must not splice this stream."""
    from twinroute.scheduler.api import MigrationOrder, Trigger

    await pool.start_engine("a")
    await pool.start_engine("b")
    router, service = await embedded_router(pool)
    await wait_subscribed(service)
    assert service.migrator is not None
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, router, max_tokens=200)
        await stream.read(until_content=5)
        here = stream.received.endpoint
        elsewhere = ({"a", "b"} - {here}).pop()
        (lease,) = service.core.leases.leases_on(here)
        wrong = MigrationOrder(
            migration_id="probe-1",
            lease_id=lease.lease_id,
            request_id=lease.request_id,
            source=service.core.endpoints[elsewhere],
            target=service.core.endpoints[here],
            trigger=Trigger.DRAIN,
            deadline_s=5.0,
        )
        report = await asyncio.wait_for(service.migrator.orders.issue(wrong), timeout=10)
        await stream.read()
    assert not report.committed and "source" in report.reason, report
    # The stream went on where it was, whole.
    assert stream.received.content(chat=False) == filler(200)
    assert stream.received.done_count == 1


async def test_a_chat_without_max_tokens_is_whole_across_a_drain(pool: Pool) -> None:
    """vLLM answers a chat request without max_tokens until the model ends it (the rest of the
    context window at most). Migrated early, its continuation must not be cut to a default
    budget: the client gets the whole answer, once."""
    natural = 120  # the simulated model's answers end after 120 tokens
    await pool.start_engine("a", natural_output_tokens=natural)
    await pool.start_engine("b", natural_output_tokens=natural)
    router, service = await embedded_router(pool)
    await wait_subscribed(service)
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, router, chat=True, max_tokens=None)
        await stream.read(until_content=5)
        result = await service.drain(endpoint_id=stream.received.endpoint, timeout_s=10)
        assert result.drained
        await stream.read()
    assert service.migrator is not None
    assert [r.committed for r in service.migrator.results] == [True]
    assert stream.received.content(chat=True) == filler(natural)
    assert stream.received.done_count == 1


def test_a_continuation_sets_no_budget_when_the_client_set_none() -> None:
    parsed = parse_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        kind="chat",
        served_models=[MODEL],
    )
    assert parsed.max_tokens is None
    body = continuation_body(parsed, generated=" lorem", remaining=None)
    assert body is not None and "max_tokens" not in body
    assert body["messages"][-1] == {"role": "assistant", "content": " lorem"}


NOT_RESUMABLE = {
    "guided json": {"response_format": {"type": "json_object"}},
    "stop strings": {"stop": ["\n\n"]},
    "logprobs": {"logprobs": 2},
    "echo": {"echo": True},
    "penalty": {"frequency_penalty": 0.5},
    "tools": {"tools": [{"type": "function", "function": {"name": "f"}}]},
}


@pytest.mark.parametrize("extra", NOT_RESUMABLE.values(), ids=NOT_RESUMABLE.keys())
async def test_a_stream_that_cannot_be_resumed_finishes_where_it_is(
    pool: Pool, extra: dict[str, Any]
) -> None:
    """Recompute migration restarts a grammar mid-output, misses a stop string across the
    splice, and loses echo, logprobs and penalties' history: such streams are not moved."""
    await pool.start_engine("a")
    await pool.start_engine("b")
    router, service = await embedded_router(pool)
    await wait_subscribed(service)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "stream": True, **extra}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"http://{router}/v1/completions", json=body)
        assert response.status == 200
        stream = ClientStream(response)
        await stream.read(until_content=5)
        await service.drain(endpoint_id=stream.received.endpoint, timeout_s=0.3)
        await stream.read()
        async with session.get(f"http://{router}/metrics") as page:
            metrics = await page.text()
    assert service.migrator is not None
    (result,) = service.migrator.results
    assert not result.committed and "not resumable" in result.detail
    assert stream.received.content(chat=False) == filler(120)
    assert 'twinroute_router_migration_refusals_total{why="not_resumable"} 1.0' in metrics
