"""Faults with the real processes (engine-sim x2, `twinroute scheduler`, `twinroute router`),
each with what is expected and checked. Faults covered elsewhere are not repeated here: an
engine killed mid-run (`test_router.py`), garbage scrapes (`test_scrape.py`), the operator
restarted (`test_operator_kopf.py`), an unreachable scheduler in-process
(`test_scheduler_api.py`).

- An engine that hangs (SIGSTOP): the scheduler's health checks time out, the endpoint
  leaves the rings, requests go to the other engine; after SIGCONT it returns.
- The scheduler restarted under load: the router fails open while the scheduler is away
  (responses say `fallback`), no request fails, and placement returns to the scheduler once it
  is back on the same port; with a static fallback list (`--endpoints`), and as the operator
  renders the router (no list: it learnt the engines from the scheduler beforehand).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from twinroute.bench.processes import ServerProcess, free_port, start_announced, twinroute_argv

MODEL = "sim-model"
ENDPOINT_HEADER = "x-twinroute-endpoint"
REASON_HEADER = "x-twinroute-reason"

pytestmark = pytest.mark.slow


@dataclass(slots=True)
class Stack:
    engines: list[ServerProcess]
    scheduler: ServerProcess
    router: ServerProcess
    scheduler_argv: list[str]
    metrics_url: str


async def start_scheduler(argv: list[str]) -> ServerProcess:
    return await start_announced("scheduler", argv, timeout_s=60)


@pytest.fixture(params=["static", "learnt"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    engines = list(
        await asyncio.gather(
            *(
                start_announced(
                    f"e{i}",
                    twinroute_argv(
                        "engine-sim",
                        "--port=0",
                        f"--model={MODEL}",
                        f"--instance-id=e{i}",
                        "--time-scale=0.02",
                    ),
                    timeout_s=60,
                )
                for i in range(2)
            )
        )
    )
    endpoints = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
    metrics = f"127.0.0.1:{free_port()}"
    scheduler_argv = twinroute_argv(
        "scheduler",
        f"--listen=127.0.0.1:{free_port()}",
        f"--metrics-listen={metrics}",
        f"--model={MODEL}",
        f"--static-endpoints={endpoints}",
        "--scrape-interval-s=0.2",
        "--scrape-timeout-s=0.3",
        "--log-level=WARNING",
        "--grace-s=1",
    )
    scheduler = await start_scheduler(scheduler_argv)
    router = await start_announced(
        "router",
        twinroute_argv(
            "router",
            "--port=0",
            f"--model={MODEL}",
            f"--scheduler={scheduler.address}",
            *(
                [f"--endpoints={endpoints}"]
                if request.param == "static"
                else ["--fail-open-learn-every-s=0.2"]
            ),
        ),
        timeout_s=60,
    )
    if request.param == "learnt":
        # The router has run a while beside its scheduler: it knows both engines.
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                async with session.get(f"{router.url}/metrics") as response:
                    if "twinroute_router_fallback_endpoints 2.0" in await response.text():
                        break
                await asyncio.sleep(0.1)
    running = Stack(
        engines=engines,
        scheduler=scheduler,
        router=router,
        scheduler_argv=scheduler_argv,
        metrics_url=f"http://{metrics}/metrics",
    )
    try:
        yield running
    finally:
        for engine in running.engines:
            if engine.process.returncode is None:
                os.kill(engine.process.pid, signal.SIGCONT)
        await asyncio.gather(
            running.router.stop(),
            running.scheduler.stop(),
            *(e.stop() for e in running.engines),
        )


async def routable(session: aiohttp.ClientSession, stack: Stack, endpoint: str) -> float | None:
    async with session.get(stack.metrics_url) as response:
        text = await response.text()
    needle = f'twinroute_scheduler_endpoint_routable{{endpoint="{endpoint}"}} '
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_for_routable(
    session: aiohttp.ClientSession, stack: Stack, endpoint: str, value: float
) -> None:
    async with asyncio.timeout(30):
        while True:
            if await routable(session, stack, endpoint) == value:
                return
            await asyncio.sleep(0.1)


async def complete(
    session: aiohttp.ClientSession, router: str, prompt: str
) -> tuple[int, str, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with session.post(f"{router}/v1/completions", json=body) as response:
        await response.read()
        return (
            response.status,
            response.headers.get(ENDPOINT_HEADER, ""),
            response.headers.get(REASON_HEADER, ""),
        )


async def test_a_hung_engine_leaves_routing_and_comes_back(stack: Stack) -> None:
    hung = stack.engines[0]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_for_routable(session, stack, "e0", 1.0)
        os.kill(hung.process.pid, signal.SIGSTOP)
        try:
            await wait_for_routable(session, stack, "e0", 0.0)
            answers = await asyncio.gather(
                *(complete(session, stack.router.url, f"prompt {n} " * 40) for n in range(12))
            )
        finally:
            os.kill(hung.process.pid, signal.SIGCONT)
        assert {status for status, _, _ in answers} == {200}
        assert {endpoint for _, endpoint, _ in answers} == {"e1"}
        await wait_for_routable(session, stack, "e0", 1.0)
        after = await asyncio.gather(
            *(complete(session, stack.router.url, f"later {n} " * 40) for n in range(24))
        )
    assert {status for status, _, _ in after} == {200}
    assert "e0" in {endpoint for _, endpoint, _ in after}, "the engine never came back"


async def test_scheduler_restart_under_load_fails_open_and_loses_nothing(stack: Stack) -> None:
    results: list[tuple[int, str, str]] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)

    async def load(session: aiohttp.ClientSession) -> None:
        n = 0
        pending: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            try:
                results.append(await complete(session, stack.router.url, f"user {i} " * 30))
            except aiohttp.ClientError as error:
                results.append((0, "", f"{type(error).__name__}: {error}"))

        while not stop.is_set():
            task = asyncio.create_task(one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(0.02)
        await asyncio.gather(*pending)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        traffic = asyncio.create_task(load(session))
        try:
            await stack.scheduler.stop()
            restarted_at = len(results)
            # Away longer than the router's pick deadline (1 s): a pick waits for the
            # scheduler's channel only that long, then the router fails open.
            await asyncio.sleep(1.5)
            stack.scheduler = await start_scheduler(stack.scheduler_argv)
            back_at = len(results)
            # Until the router's channel reconnects, requests may still take the fallback.
            async with asyncio.timeout(30):
                while True:
                    if any(r[2] not in ("", "fallback") for r in results[back_at:]):
                        break
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await traffic
    failed = [r for r in results if r[0] != 200]
    assert failed == [], failed[:5]
    assert len(results) > restarted_at
    assert "fallback" in {reason for _, _, reason in results[restarted_at:back_at]}
    assert results[-1][2] != "fallback"
