"""vLLM /metrics parsing (fixtures: one real vLLM capture, two hand-written in vLLM's format),
the scraper against real HTTP servers on 127.0.0.1 (staleness, health hysteresis), and the
telemetry HTTP app (/metrics, /debug/decisions)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.scrape import (
    EngineStats,
    ScrapeParseError,
    Scraper,
    ScrapeSettings,
    parse_vllm_metrics,
)
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.telemetry import SchedulerTelemetry, build_metrics_app
from twinroute.scheduler.tokens import TokenGuard
from twinroute.scheduler.types import Endpoint

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "vllm_metrics_real.txt",
            EngineStats(running=0, waiting=0, kv_usage=0.0, prefix_cache_queries=3584.0,
                        prefix_cache_hits=1760.0, engines=1),
        ),
        (
            "vllm_metrics_two_engines.txt",
            EngineStats(running=21, waiting=3, kv_usage=0.5, prefix_cache_queries=122880.0,
                        prefix_cache_hits=92160.0, engines=2),
        ),
        (
            "vllm_metrics_legacy.txt",
            EngineStats(running=4, waiting=7, kv_usage=0.915, prefix_cache_queries=1000.0,
                        prefix_cache_hits=250.0, engines=1),
        ),
    ],
    ids=["real-vllm-v1", "two-engines-summed", "legacy-gpu-cache-names"],
)  # fmt: skip
def test_fixtures_parse(fixture: str, expected: EngineStats) -> None:
    stats = parse_vllm_metrics((FIXTURES / fixture).read_text())
    assert stats.running == expected.running
    assert stats.waiting == expected.waiting
    assert stats.kv_usage == pytest.approx(expected.kv_usage)
    assert stats.prefix_cache_queries == expected.prefix_cache_queries
    assert stats.prefix_cache_hits == expected.prefix_cache_hits
    assert stats.engines == expected.engines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm:num_requests_running 2\n", EngineStats(running=2, engines=1)),
        ('vllm:num_requests_waiting{model_name="a b,c}"} 5 1700000000000\n',
         EngineStats(waiting=5, engines=1)),
        ("vllm:kv_cache_usage_perc{engine=\"0\"} NaN\nvllm:num_requests_running 1\n",
         EngineStats(running=1, engines=1)),
        ("vllm:kv_cache_usage_perc 1.7\n", EngineStats(kv_usage=1.0, engines=1)),
        ("other_metric 3\n", EngineStats()),
    ],
    ids=["no-labels", "timestamp-and-odd-label", "nan-ignored", "kv-clamped", "no-vllm-figures"],
)  # fmt: skip
def test_tolerant_of_format_details(text: str, expected: EngineStats) -> None:
    assert parse_vllm_metrics(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only comments\n",
        "<html><body>502 Bad Gateway</body></html>",
        'vllm:num_requests_running{engine="0" 3\n',
        "vllm:num_requests_running lots\n",
        "vllm:num_requests_running\n",
    ],
    ids=["empty", "comments-only", "html", "unbalanced-labels", "bad-value", "no-value"],
)
def test_garbage_raises_a_parse_error(text: str) -> None:
    with pytest.raises(ScrapeParseError):
        parse_vllm_metrics(text)


class Engine:
    """A real HTTP server standing in for one vLLM pod; its answers are set by the test."""

    def __init__(self) -> None:
        self.metrics = (FIXTURES / "vllm_metrics_two_engines.txt").read_text()
        self.healthy = True

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.metrics)

        async def health(_: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        return app


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_core() -> SchedulerCore:
    return SchedulerCore(
        policy=make_policy("least_loaded", config=PolicyConfig(cost_model=LLAMA3_8B_H100)),
        cost_model=LLAMA3_8B_H100,
        scrape_staleness_s=3.0,
    )


@pytest.fixture
async def engine_server() -> AsyncIterator[tuple[Engine, str]]:
    engine = Engine()
    server = TestServer(engine.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield engine, f"127.0.0.1:{server.port}"
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("labels", "tokens"),
    [
        ('block_size="32",num_gpu_blocks="128"', 4096),
        ('num_gpu_blocks="None",block_size="16"', None),
        ('block_size="16"', None),
        ('block_size="16",num_gpu_blocks="0"', None),
    ],
    ids=["sized", "not-sized-yet", "no-block-count", "zero-blocks"],
)
def test_the_engines_kv_size_comes_from_its_cache_config(labels: str, tokens: int | None) -> None:
    text = f"vllm:num_requests_running 0\nvllm:cache_config_info{{{labels}}} 1.0\n"
    assert parse_vllm_metrics(text).kv_capacity_tokens == tokens


def test_the_real_engines_kv_size_is_read() -> None:
    # The recorded vLLM 0.32 engine: 128 blocks of 32 tokens (--kv-cache-memory-bytes 4M).
    text = (FIXTURES / "vllm_metrics_real.txt").read_text()
    assert parse_vllm_metrics(text).kv_capacity_tokens == 4096


async def test_the_prefix_record_is_sized_to_what_the_engine_holds(
    engine_server: tuple[Engine, str],
) -> None:
    # Regression: the record was 32,768 blocks whatever the engines held, so it kept
    # believing in prefixes a small engine had long evicted.
    engine, address = engine_server
    engine.metrics = (FIXTURES / "vllm_metrics_real.txt").read_text()
    core = make_core()
    core.set_endpoints([Endpoint(id="up", address=address)])
    default = core.prefix_index.capacity_of("up")
    async with aiohttp.ClientSession() as session:
        await Scraper(core=core, session=session, clock=Clock()).scrape_once()
    assert default == 32_768
    assert core.prefix_index.capacity_of("up") == 4096 // core.key_block_tokens


async def test_scraper_feeds_load_and_marks_failures(engine_server: tuple[Engine, str]) -> None:
    engine, address = engine_server
    clock = Clock()
    core = make_core()
    registry = CollectorRegistry()
    telemetry = SchedulerTelemetry(registry=registry, core=core, clock=clock)
    core.set_endpoints(
        [Endpoint(id="up", address=address), Endpoint(id="down", address="127.0.0.1:1")]
    )
    async with aiohttp.ClientSession() as session:
        scraper = Scraper(
            core=core, session=session, clock=clock, listener=telemetry,
            settings=ScrapeSettings(timeout_s=2.0, unhealthy_after=2, healthy_after=2),
        )  # fmt: skip
        await scraper.scrape_once()
        load = core.load("up", now=clock.now)
        assert (load.running, load.queued) == (21, 3)
        assert load.kv_usage == pytest.approx(0.5)
        assert core.load("down", now=clock.now).running is None
        assert {e.id for e in core.routable()} == {"up", "down"}  # one failure is not enough
        await scraper.scrape_once()
        assert {e.id for e in core.routable()} == {"up"}

        # Garbage /metrics: the engine stays routable, its figures age into "unknown".
        engine.metrics = "<html>oops</html>"
        clock.now += 5
        await scraper.scrape_once()
        assert core.load("up", now=clock.now).running is None
        assert {e.id for e in core.routable()} == {"up"}

        # Failing health: out after two checks, back after two good ones.
        engine.healthy = False
        await scraper.scrape_once()
        assert {e.id for e in core.routable()} == {"up"}
        await scraper.scrape_once()
        assert core.routable() == ()
        engine.healthy = True
        engine.metrics = "vllm:num_requests_running 1\n"
        await scraper.scrape_once()
        assert core.routable() == ()
        await scraper.scrape_once()
        assert {e.id for e in core.routable()} == {"up"}
        assert core.load("up", now=clock.now).running == 1

    exposition = telemetry.exposition().decode()
    assert 'twinroute_scheduler_scrape_errors_total{endpoint="down",kind="connection"} ' in (
        exposition
    )
    assert 'twinroute_scheduler_scrape_errors_total{endpoint="up",kind="parse"} 1.0' in exposition
    assert 'twinroute_scheduler_scrape_errors_total{endpoint="up",kind="health"} 2.0' in exposition
    assert 'twinroute_scheduler_endpoint_health_changes_total{state="unhealthy"} 2.0' in exposition
    assert 'twinroute_scheduler_endpoint_prefix_cache_hit_rate{endpoint="up"} 0.75' in exposition


async def test_debug_decisions_page() -> None:
    clock = Clock()
    core = make_core()
    registry = CollectorRegistry()
    telemetry = SchedulerTelemetry(registry=registry, core=core, clock=clock)
    service = SchedulerService(core=core, telemetry=telemetry, clock=clock)
    service.set_endpoints([Endpoint(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(3)])
    for i in range(4):
        await service.pick(PickQuery(request_id=f"req-{i}", model="m", text=f"<b>{i}</b> " * 30))
    app = build_metrics_app(
        telemetry=telemetry,
        decisions=lambda limit, request_id: service.recent_decisions(
            limit=limit, request_id=request_id or ""
        ),
    )
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        response = await client.get("/debug/decisions", params={"format": "json", "limit": "2"})
        body = json.loads(await response.text())
        assert [d["request_id"] for d in body["decisions"]] == ["req-3", "req-2"]
        assert body["decisions"][0]["reason"] == "least_loaded"
        assert body["decisions"][0]["candidates"]
        one = await client.get("/debug/decisions", params={"request_id": "req-1"})
        page = await one.text()
        assert "req-1" in page and "req-2" not in page and "least_loaded" in page
        assert (await client.get("/debug/decisions", params={"limit": "x"})).status == 400
        metrics = await client.get("/metrics")
        text = await metrics.text()
        assert (
            'twinroute_scheduler_decisions_total{policy="least_loaded",reason="least_loaded"} 4.0'
            in text
        )


async def test_debug_decisions_page_needs_the_token_when_there_is_one() -> None:
    """The page lists request ids and where each prompt went: behind the pool's token, while
    metrics and health stay open for scrapers and probes."""
    clock = Clock()
    core = make_core()
    registry = CollectorRegistry()
    telemetry = SchedulerTelemetry(registry=registry, core=core, clock=clock)
    service = SchedulerService(core=core, telemetry=telemetry, clock=clock)
    app = build_metrics_app(
        telemetry=telemetry,
        decisions=lambda limit, request_id: service.recent_decisions(limit=limit),
        guard=TokenGuard("t0ken", count=telemetry.refused_calls_counter()),
    )
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        assert (await client.get("/debug/decisions")).status == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/debug/decisions", headers=wrong)).status == 403
        right = {"Authorization": "Bearer t0ken"}
        assert (await client.get("/debug/decisions", headers=right)).status == 200
        assert (await client.get("/metrics")).status == 200
        assert (await client.get("/healthz")).status == 200
    assert (
        registry.get_sample_value(
            "twinroute_scheduler_calls_refused_total",
            {"call": "/debug/decisions", "why": "missing_token"},
        )
        == 1
    )


class RoundCost:
    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 1e-5 * uncached_tokens

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 1e-3


async def test_scraper_reads_the_engine_simulator() -> None:
    """The engine simulator stands in for vLLM in the live benchmark: its /metrics must parse."""
    from twinroute.enginesim.core import EngineCore, EngineSettings
    from twinroute.enginesim.server import EngineIdentity, build_app
    from twinroute.simulator.instance import Instance, InstanceConfig

    instance = Instance(
        config=InstanceConfig(kv_capacity_tokens=10_000, block_size=16), cost=RoundCost()
    )
    core_engine = EngineCore(instance=instance, settings=EngineSettings(block_size=16))
    identity = EngineIdentity(model="sim", instance_id="sim-0", max_model_len=10_000)
    server = TestServer(build_app(core=core_engine, identity=identity), host="127.0.0.1", port=0)
    await server.start_server()
    clock = Clock()
    core = make_core()
    core.set_endpoints([Endpoint(id="sim-0", address=f"127.0.0.1:{server.port}")])
    try:
        async with aiohttp.ClientSession() as session:
            scraper = Scraper(core=core, session=session, clock=clock)
            await scraper.scrape_once()
    finally:
        await server.close()
    stats = scraper.health["sim-0"].last_stats
    assert stats is not None, scraper.health["sim-0"].last_error
    assert (stats.running, stats.waiting, stats.kv_usage) == (0, 0, 0.0)
    assert stats.prefix_cache_queries is not None
    assert core.load("sim-0", now=clock.now).queued == 0
