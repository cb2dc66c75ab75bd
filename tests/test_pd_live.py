"""Disaggregated prefill/decode, live: engine simulators with KV roles and the router's side of
vLLM's protocol (`kv_transfer_params`), all in this process on 127.0.0.1.

Engines run over the simulator's `Instance` with round-number costs (prefill 0.01 ms per
token, 1 ms per decode step, KV transfer 1 ms + 1 us per token), so every modelled time is a
few milliseconds. Placements come from a fixed port (each test knows where a request goes) or
from the scheduler's own `SchedulerService` over endpoints with roles.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from twinroute.scheduler.api import NoEndpointError, Outcome, PickAnswer, PickQuery, Placement
from twinroute.scheduler.types import Endpoint

from twinroute.bench.processes import free_port
from twinroute.enginesim import command as engine_command
from twinroute.enginesim.core import EngineCore, EngineSettings
from twinroute.enginesim.kv_transfer import (
    KV_PULL_PATH,
    KvRole,
    KvTransferAgent,
    KvTransferConfig,
    parse_kv_transfer_config,
)
from twinroute.enginesim.server import EngineIdentity, build_app
from twinroute.router.disaggregated import PREFILL_HEADER, prefill_body
from twinroute.router.server import ENDPOINT_HEADER, RouterSettings
from twinroute.router.server import build_app as build_router
from twinroute.simulator.instance import Instance, InstanceConfig
from twinroute.vocabulary import DecisionReason

MODEL = "sim-model"
PROMPT = " ".join(f"w{i}" for i in range(160))  # 10 full blocks of 16 tokens


class RoundCost:
    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 1e-5 * uncached_tokens

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 1e-3


def transfer_s(tokens: int) -> float:
    return 1e-3 + 1e-6 * tokens if tokens > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Engine:
    name: str
    url: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    runners: list[web.AppRunner] = []

    async def start(
        name: str,
        *,
        role: KvRole | None,
        pin_timeout_s: float = 480.0,
        clock: Callable[[], float] | None = None,
    ) -> Engine:
        instance = Instance(
            config=InstanceConfig(kv_capacity_tokens=100_000, block_size=16),
            cost=RoundCost(),
            record_tokens=True,
        )
        core = EngineCore(instance=instance, settings=EngineSettings(block_size=16))
        identity = EngineIdentity(model=MODEL, instance_id=name, max_model_len=100_000)
        kv = None
        if role is not None:
            config = KvTransferConfig(role=role)

            def kv(registry: CollectorRegistry) -> KvTransferAgent:
                return KvTransferAgent(
                    core=core,
                    config=config,
                    engine_id=name,
                    transfer_s=transfer_s,
                    registry=registry,
                    pin_timeout_s=pin_timeout_s,
                    clock=clock if clock is not None else time.monotonic,
                )

        runner = web.AppRunner(build_app(core=core, identity=identity, kv=kv))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Engine(name=name, url=f"http://127.0.0.1:{runner.addresses[0][1]}")

    yield start
    for runner in runners:
        await runner.cleanup()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Samples of a /metrics page by their full name with labels."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}


REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


async def prefill(session: aiohttp.ClientSession, engine: Engine, **fields: Any) -> dict[str, Any]:
    body = completion(max_tokens=1, kv_transfer_params=REMOTE_DECODE, **fields)
    async with session.post(f"{engine.url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
    return answer


# -- the engines ------------------------------------------------------------------------------


async def test_prefill_answers_nixl_params_and_decode_pulls_instead_of_prefilling(
    start_engine: StartEngine,
) -> None:
    prefill_engine = await start_engine("p0", role=KvRole.PRODUCER)
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    async with aiohttp.ClientSession() as session:
        answer = await prefill(session, prefill_engine)
        params = answer["kv_transfer_params"]
        assert answer["usage"]["completion_tokens"] == 1
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_engine_id"] == "p0"
        assert params["remote_host"] == "127.0.0.1"
        assert params["remote_port"] == int(prefill_engine.url.rsplit(":", 1)[1])
        assert len(params["remote_block_ids"]) == 10
        assert params["remote_request_id"] and params["tp_size"] == 1
        before = await metrics(session, prefill_engine.url)
        assert before["twinroute_engine_kv_pinned_requests"] == 1
        assert before["twinroute_engine_remote_prefills_total"] == 1

        body = completion(kv_transfer_params=params)
        async with session.post(f"{decode_engine.url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            decoded = await response.json()
        assert decoded["usage"]["completion_tokens"] == 4
        sent = await metrics(session, prefill_engine.url)
        received = await metrics(session, decode_engine.url)
    assert sent["twinroute_engine_kv_pinned_requests"] == 0
    assert sent["twinroute_engine_kv_sent_total"] == 1
    assert received["twinroute_engine_kv_transfers_total"] == 1
    assert received["twinroute_engine_kv_transfer_tokens_total"] == 160
    assert received["twinroute_engine_kv_transfer_seconds_count"] == 1
    # The decode instance did not prefill: its prefix cache was never queried.
    assert received['vllm:prefix_cache_queries_total{model_name="sim-model"}'] == 0


async def test_kv_already_cached_on_the_decode_instance_is_not_transferred(
    start_engine: StartEngine,
) -> None:
    prefill_engine = await start_engine("p0", role=KvRole.BOTH)
    decode_engine = await start_engine("d0", role=KvRole.BOTH)
    async with aiohttp.ClientSession() as session:
        # The decode instance prefills the prompt once itself (its blocks stay cached).
        async with session.post(f"{decode_engine.url}/v1/completions", json=completion()) as r:
            assert r.status == 200
        params = (await prefill(session, prefill_engine))["kv_transfer_params"]
        body = completion(kv_transfer_params=params)
        async with session.post(f"{decode_engine.url}/v1/completions", json=body) as response:
            assert response.status == 200
        received = await metrics(session, decode_engine.url)
    assert received["twinroute_engine_kv_transfers_total"] == 1
    assert received["twinroute_engine_kv_transfer_tokens_total"] == 0


async def test_a_pull_that_finds_no_kv_makes_the_decode_instance_prefill(
    start_engine: StartEngine,
) -> None:
    clock = FakeClock()
    prefill_engine = await start_engine("p0", role=KvRole.PRODUCER, pin_timeout_s=30, clock=clock)
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, prefill_engine))["kv_transfer_params"]
        clock.now += 31  # nobody pulled within the pin timeout
        sent = await metrics(session, prefill_engine.url)
        assert sent["twinroute_engine_kv_pinned_requests"] == 0
        assert sent["twinroute_engine_kv_pins_expired_total"] == 1
        body = completion(kv_transfer_params=params, stream=True)
        async with session.post(f"{decode_engine.url}/v1/completions", json=body) as response:
            assert response.status == 200
            assert b"[DONE]" in await response.read()
        dead = dict(params, remote_port=free_port(), remote_request_id="gone")
        body = completion(kv_transfer_params=dead)
        async with session.post(f"{decode_engine.url}/v1/completions", json=body) as response:
            assert response.status == 200
        received = await metrics(session, decode_engine.url)
    assert received['twinroute_engine_kv_transfer_failures_total{reason="not_found"}'] == 1
    assert received['twinroute_engine_kv_transfer_failures_total{reason="unreachable"}'] == 1
    assert received["twinroute_engine_kv_transfers_total"] == 0
    assert received['vllm:prefix_cache_queries_total{model_name="sim-model"}'] == 320


BAD_PARAMS = [
    ("not-an-object", "d0", ["do_remote_prefill"], False, "must be an object"),
    ("both-true", "d0", {"do_remote_decode": True, "do_remote_prefill": True}, False, "both"),
    ("flag-not-bool", "d0", {"do_remote_prefill": "yes"}, False, "true or false"),
    ("missing-host", "d0", {"do_remote_prefill": True, "remote_engine_id": "p0",
                            "remote_request_id": "r", "remote_block_ids": [], "remote_port": 1},
     False, "remote_host"),
    ("port-not-int", "d0", {"do_remote_prefill": True, "remote_engine_id": "p0",
                            "remote_request_id": "r", "remote_block_ids": [],
                            "remote_host": "127.0.0.1", "remote_port": "8000"}, False,
     "remote_port"),
    ("negative-block", "d0", {"do_remote_prefill": True, "remote_engine_id": "p0",
                              "remote_request_id": "r", "remote_block_ids": [-1],
                              "remote_host": "127.0.0.1", "remote_port": 8000}, False,
     "remote_block_ids"),
    ("decode-asked-to-prefill", "d0", REMOTE_DECODE, False, "kv_role is kv_consumer"),
    ("prefill-asked-to-decode", "p0", {"do_remote_prefill": True, "remote_engine_id": "p0",
                                       "remote_request_id": "r", "remote_block_ids": [],
                                       "remote_host": "127.0.0.1", "remote_port": 8000},
     False, "kv_role is kv_producer"),
    ("remote-decode-streamed", "p0", REMOTE_DECODE, True, "stream=false"),
    ("no-kv-config", "u0", REMOTE_DECODE, False, "without a KV transfer config"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("engine", "params", "stream", "reason"),
    [case[1:] for case in BAD_PARAMS],
    ids=[case[0] for case in BAD_PARAMS],
)
async def test_bad_kv_transfer_params_are_refused_with_a_reason(
    start_engine: StartEngine, engine: str, params: Any, stream: bool, reason: str
) -> None:
    engines = {
        "p0": await start_engine("p0", role=KvRole.PRODUCER),
        "d0": await start_engine("d0", role=KvRole.CONSUMER),
        "u0": await start_engine("u0", role=None),
    }
    body = completion(kv_transfer_params=params, stream=stream)
    url = f"{engines[engine].url}/v1/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == "kv_transfer_params"
    assert reason in error["message"]


async def test_params_that_do_not_match_the_pinned_prefill_are_refused(
    start_engine: StartEngine,
) -> None:
    prefill_engine = await start_engine("p0", role=KvRole.PRODUCER)
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    async with aiohttp.ClientSession() as session:
        params = (await prefill(session, prefill_engine))["kv_transfer_params"]
        forged = dict(params, remote_block_ids=[0, 1])
        body = completion(kv_transfer_params=forged)
        async with session.post(f"{decode_engine.url}/v1/completions", json=body) as response:
            assert response.status == 400
            assert "remote_block_ids" in (await response.json())["error"]["message"]
        other_prompt = completion(prompt=PROMPT + " more words", kv_transfer_params=params)
        async with session.post(
            f"{decode_engine.url}/v1/completions", json=other_prompt
        ) as response:
            assert response.status == 400
            assert "not the same prompt" in (await response.json())["error"]["message"]
        async with session.post(f"{prefill_engine.url}{KV_PULL_PATH}", data=b"{") as response:
            assert response.status == 400


# -- engine-sim flags ---------------------------------------------------------------------------


def engine_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine_command.add_arguments(parser)
    return parser.parse_args(["--port=0", *extra])


@pytest.mark.parametrize(
    ("flags", "role"),
    [
        (["--kv-role=prefill"], KvRole.PRODUCER),
        (["--kv-role=decode"], KvRole.CONSUMER),
        (
            ['--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_both"}'],
            KvRole.BOTH,
        ),
    ],
    ids=["shorthand-prefill", "shorthand-decode", "vllm-json"],
)
def test_engine_sim_takes_vllm_kv_transfer_config_or_the_shorthand(
    flags: list[str], role: KvRole
) -> None:
    args = engine_args(*flags)
    config = (
        parse_kv_transfer_config(args.kv_transfer_config)
        if args.kv_transfer_config
        else KvTransferConfig(role={"prefill": KvRole.PRODUCER, "decode": KvRole.CONSUMER}[
            args.kv_role])
    )  # fmt: skip
    assert config.role is role
    engine_command.build(args)  # builds without error


@pytest.mark.parametrize(
    ("text", "reason"),
    [("{", "not JSON"), ('{"kv_role": "kv_sender"}', "kv_role"), ("[]", "JSON object")],
    ids=["not-json", "unknown-role", "not-object"],
)
def test_bad_kv_transfer_config_stops_the_engine_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        engine_command.build(engine_args(f"--kv-transfer-config={text}"))


# -- the router ---------------------------------------------------------------------------------


class FixedPlacement:
    """A placement on (prefill, decode) that honours exclusions; records completions."""

    def __init__(self, *, prefill: Engine | None, decode: Engine) -> None:
        self.prefill = prefill
        self.decode = decode
        self.completed: list[tuple[str, Outcome]] = []
        self.progress_reports: list[tuple[str, str]] = []
        self.picks = 0

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        self.picks += 1
        if self.decode.name in query.exclude_endpoints:
            raise NoEndpointError("decode excluded")
        prefill = self.prefill
        use_prefill = prefill is not None and prefill.name not in query.exclude_endpoints
        answer = PickAnswer(
            endpoint=Endpoint(id=self.decode.name, address=self.decode.address),
            lease_id=f"lease-{self.picks}",
            reason=DecisionReason.CACHE_AFFINITY,
            policy="fixed",
            prefill_endpoint=(
                Endpoint(id=prefill.name, address=prefill.address)
                if use_prefill and prefill is not None
                else None
            ),
        )
        return Placement(answer, reports=self)

    async def complete(self, *, lease_id: str, outcome: Outcome = "success", **_: Any) -> bool:
        self.completed.append((lease_id, outcome))
        return True

    async def progress(self, *, lease_id: str, event: str) -> bool:
        self.progress_reports.append((lease_id, event))
        return True

    async def close(self) -> None:
        return None


StartRouter = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    runners: list[web.AppRunner] = []

    async def start(scheduler: Any, **settings: Any) -> str:
        app = build_router(
            scheduler=scheduler, settings=RouterSettings(models=(MODEL,), **settings)
        )
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def test_prefill_body_follows_vllm_proxies() -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 50,
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = json.loads(prefill_body(body))
    assert sent["kv_transfer_params"] == REMOTE_DECODE
    assert sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1
    assert sent["stream"] is False and "stream_options" not in sent
    assert body["stream"] is True  # the client's body is untouched


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_router_runs_the_prefill_hop_then_decodes(
    start_engine: StartEngine, start_router: StartRouter, stream: bool
) -> None:
    prefill_engine = await start_engine("p0", role=KvRole.PRODUCER)
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    scheduler = FixedPlacement(prefill=prefill_engine, decode=decode_engine)
    router = await start_router(scheduler)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            body = completion(stream=stream)
            async with session.post(f"{router}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers[ENDPOINT_HEADER] == "d0"
                assert response.headers["x-twinroute-instance"] == "d0"
                assert response.headers[PREFILL_HEADER] == "p0"
                raw = await response.read()
            if stream:
                events = [e for e in raw.decode().split("\n\n") if e]
                assert events[-1] == "data: [DONE]"
                text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
                assert len(text.split()) == 4
            else:
                answer = json.loads(raw)
                assert answer["usage"]["completion_tokens"] == 4
                assert "kv_transfer_params" not in answer
        sent = await metrics(session, prefill_engine.url)
        received = await metrics(session, decode_engine.url)
        routed = await metrics(session, router)
    assert sent["twinroute_engine_remote_prefills_total"] == 3
    assert sent["twinroute_engine_kv_pinned_requests"] == 0
    assert received["twinroute_engine_kv_transfers_total"] == 3
    assert routed['twinroute_router_prefill_hops_total{outcome="ok"}'] == 3
    assert routed["twinroute_router_prefill_seconds_count"] == 3
    assert [outcome for _, outcome in scheduler.completed] == ["success"] * 3
    reported = [event for _, event in scheduler.progress_reports]
    assert reported.count("prefill_done") == 3
    assert reported.count("first_token") == (3 if stream else 0)


async def test_chat_requests_take_the_prefill_hop_too(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    prefill_engine = await start_engine("p0", role=KvRole.BOTH)
    decode_engine = await start_engine("d0", role=KvRole.BOTH)
    router = await start_router(FixedPlacement(prefill=prefill_engine, decode=decode_engine))
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            events = [e for e in (await response.read()).decode().split("\n\n") if e]
        received = await metrics(session, decode_engine.url)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 3
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert received["twinroute_engine_kv_transfers_total"] == 1


async def test_a_dead_prefill_endpoint_is_replaced_then_the_decode_prefills(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    dead = Engine(name="p-dead", url=f"http://127.0.0.1:{free_port()}")
    retrying = FixedPlacement(prefill=dead, decode=decode_engine)
    router = await start_router(retrying)
    no_retries = FixedPlacement(prefill=dead, decode=decode_engine)
    router_without_retries = await start_router(no_retries, retries=0)
    async with aiohttp.ClientSession() as session:
        for url in (router, router_without_retries):
            for stream in (False, True):
                body = completion(stream=stream)
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    assert response.status == 200
                    assert PREFILL_HEADER not in response.headers
                    assert b"lorem" in await response.read()
        routed = await metrics(session, router)
        routed_without = await metrics(session, router_without_retries)
        received = await metrics(session, decode_engine.url)
    # Placed again without the dead prefill endpoint; its first lease closed without blame.
    assert routed["twinroute_router_prefill_retries_total"] == 2
    assert routed['twinroute_router_prefill_hops_total{outcome="engine_error"}'] == 2
    assert [o for _, o in retrying.completed].count("cancelled") == 2
    assert "engine_error" not in [o for _, o in retrying.completed]
    # No retry left: the decode endpoint prefilled on the same placement.
    assert routed_without['twinroute_router_prefill_fallbacks_total{reason="engine_error"}'] == 2
    assert [o for _, o in no_retries.completed] == ["success", "success"]
    assert received["twinroute_engine_kv_transfers_total"] == 0
    # The scheduler hears that each decode lease now carries its prefill, never that the dead
    # endpoint prefilled it.
    fell_back = [e for _, e in no_retries.progress_reports if e.startswith("prefill")]
    assert fell_back == ["prefill_fell_back", "prefill_fell_back"]
    assert not [e for _, e in retrying.progress_reports if e == "prefill_done"]


async def test_a_prefill_engine_without_kv_connector_falls_back_to_the_decode(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    unconfigured = await start_engine("p0", role=None)
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    scheduler = FixedPlacement(prefill=unconfigured, decode=decode_engine)
    router = await start_router(scheduler)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{router}/v1/completions", json=completion()) as response:
            assert response.status == 200
        routed = await metrics(session, router)
    assert routed['twinroute_router_prefill_fallbacks_total{reason="refused"}'] == 1
    assert scheduler.progress_reports == [("lease-1", "prefill_fell_back")]


@pytest.mark.parametrize("status", [400, 500], ids=["refused", "engine_error"])
async def test_what_a_failing_prefill_engine_says_stays_out_of_warnings(
    start_engine: StartEngine,
    start_router: StartRouter,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    # An engine's error text can quote the prompt; below DEBUG the logs must not carry it.
    async def quoting_error(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"error": {"message": f"bad: {body['prompt']}"}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/completions", quoting_error)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    quoting = Engine(name="p-quoting", url=f"http://127.0.0.1:{runner.addresses[0][1]}")
    decode_engine = await start_engine("d0", role=KvRole.CONSUMER)
    router = await start_router(FixedPlacement(prefill=quoting, decode=decode_engine), retries=0)
    marker = "w0 w1 w2"
    try:
        with caplog.at_level("DEBUG", logger="twinroute.router.disaggregated"):
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{router}/v1/completions", json=completion()) as answer,
            ):
                assert answer.status == 200
    finally:
        await runner.cleanup()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    debug = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert warnings and not any(marker in line for line in warnings)
    assert any(marker in line for line in debug)


async def test_router_with_the_scheduler_places_prefill_and_decode_by_role(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    from twinroute.scheduler.build import build_service
    from twinroute.scheduler.settings import SchedulerSettings
    from twinroute.scheduler.types import Role

    engines = {
        "p0": (await start_engine("p0", role=KvRole.BOTH), Role.PREFILL),
        "p1": (await start_engine("p1", role=KvRole.BOTH), Role.PREFILL),
        "d0": (await start_engine("d0", role=KvRole.BOTH), Role.DECODE),
    }
    service = build_service(SchedulerSettings(served_models=(MODEL,)))
    core = service.core
    service.set_endpoints(
        [Endpoint(id=n, address=e.address, role=r, model=MODEL) for n, (e, r) in engines.items()]
    )

    # Prefill leases still open on p0/p1 when each decode lease completes.
    prefills_open_at_complete: list[int] = []

    class Port:
        """The in-process scheduler, noting the open prefill leases at each Complete."""

        async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
            placement = await service.pick(query, timeout_s=timeout_s)
            return Placement(placement.answer, reports=self)

        async def complete(self, **report: Any) -> bool:
            prefills_open_at_complete.append(core.in_flight("p0") + core.in_flight("p1"))
            return await service.complete(**report)

        async def progress(self, *, lease_id: str, event: Any) -> bool:
            return await service.progress(lease_id=lease_id, event=event)

        async def close(self) -> None:
            return None

    router = await start_router(Port())
    async with aiohttp.ClientSession() as session:
        for group in range(4):
            prompt = " ".join(f"g{group}w{i}" for i in range(600))  # well over 100 tokens
            body = completion(prompt=prompt, stream=group % 2 == 0)
            async with session.post(f"{router}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers[ENDPOINT_HEADER] == "d0"
                assert response.headers[PREFILL_HEADER] in ("p0", "p1")
                await response.read()
        received = await metrics(session, engines["d0"][0].url)
    assert received["twinroute_engine_kv_transfers_total"] == 4
    assert sum(core.pd_picks.values()) == 4
    # Every pick's leases (decode and prefill) are closed by the router's Complete, which runs
    # off the response path: let it run.
    for _ in range(100):
        if len(core.leases) == 0:
            break
        await asyncio.sleep(0)
    assert len(core.leases) == 0
    # The prefill hop's report freed the prefill instance before its decode finished.
    assert prefills_open_at_complete == [0, 0, 0, 0]


# -- discovery ----------------------------------------------------------------------------------


def test_static_endpoint_files_and_pod_labels_carry_roles(tmp_path: Path) -> None:
    from twinroute.scheduler.discovery import load_endpoints_file, pod_endpoint
    from twinroute.scheduler.types import Role

    from twinroute.labels import POOL_LABEL, ROLE_LABEL

    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "endpoints:\n"
        "  - {id: p0, address: 127.0.0.1:8001, role: prefill}\n"
        "  - {id: d0, address: 127.0.0.1:8002, role: decode}\n"
        "  - {id: u0, address: 127.0.0.1:8003}\n"
    )
    roles = {e.id: e.role for e in load_endpoints_file(path)}
    assert roles == {"p0": Role.PREFILL, "d0": Role.DECODE, "u0": Role.UNIFIED}

    def pod(role: str) -> dict[str, Any]:
        return {
            "metadata": {
                "name": f"pool-{role}-x",
                "labels": {POOL_LABEL: "pool", ROLE_LABEL: role},
            },
            "status": {"podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]},
        }

    for role in (Role.PREFILL, Role.DECODE):
        endpoint = pod_endpoint(pod(role.value))
        assert endpoint is not None and endpoint.role is role


# -- operator -> engine-sim -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "kv_role"),
    [("prefill", KvRole.BOTH), ("decode", KvRole.BOTH), ("unified", None)],
    ids=["prefill", "decode", "unified"],
)
def test_simulator_pools_render_kv_transfer_config_that_engine_sim_accepts(
    role: str, kv_role: KvRole | None
) -> None:
    from twinroute.operator.render import engine_args as render_engine_args
    from twinroute.operator.spec import Role, parse_pool

    roles = {"unified": {"replicas": 1}} if role == "unified" else {
        "prefill": {"replicas": 1}, "decode": {"replicas": 2}}  # fmt: skip
    spec = {"model": {"name": MODEL}, "engine": {"kind": "simulator"}, "roles": roles}
    args = render_engine_args(parse_pool(name="pd", namespace="ns", spec=spec), role=Role(role))
    local = [a.replace("0.0.0.0", "127.0.0.1").replace("$(POD_NAME)", "pod") for a in args]
    parsed = engine_args(*local)
    if kv_role is None:
        assert parsed.kv_transfer_config is None
    else:
        assert parse_kv_transfer_config(parsed.kv_transfer_config).role is kv_role
    engine_command.build(parsed)


# -- bench live --pd ----------------------------------------------------------------------------


def test_bench_pd_endpoints_file_gives_the_scheduler_each_engine_role(tmp_path: Path) -> None:
    from twinroute.scheduler.discovery import load_endpoints_file
    from twinroute.scheduler.types import Role

    from twinroute.bench.pd_live import engine_roles, parse_pd, pd_table, write_endpoints

    roles = engine_roles(parse_pd("1:2", instances=3))
    assert roles == ["prefill", "decode", "decode"]
    urls = [f"http://127.0.0.1:{8000 + i}" for i in range(3)]
    path = write_endpoints(tmp_path / "endpoints.yaml", urls=urls, roles=roles, model=MODEL)
    endpoints = load_endpoints_file(path)
    assert [(e.id, e.address, e.role) for e in endpoints] == [
        ("engine-0", "127.0.0.1:8000", Role.PREFILL),
        ("engine-1", "127.0.0.1:8001", Role.DECODE),
        ("engine-2", "127.0.0.1:8002", Role.DECODE),
    ]
    with pytest.raises(ValueError, match="--instances"):
        parse_pd("1:2", instances=4)
    row = {
        "ttft_p50_s": 1.0,
        "ttft_p90_s": 2.0,
        "tpot_p50_s": 0.005,
        "tpot_p90_s": None,
        "throughput_rps": 3.0,
        "kv_transfers": 4.0,
        "kv_transfer_s": 0.2,
        "errors": 0,
    }
    assert "| x+pd | 1.000 | 2.000 | 5.0 | - | 3.00 | 4 | 0 | 50.0 | 0 |" in pd_table({"x+pd": row})
