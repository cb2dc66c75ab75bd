"""`twinroute scheduler` as a process: it binds, serves a Pick and its metrics, and stops with
exit status 0 on SIGTERM (health NOT_SERVING first, then the servers close)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.client import SchedulerClient


async def test_scheduler_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        "endpoints:\n"
        "  - {id: a, address: '127.0.0.1:1'}\n"
        "  - {id: b, address: '127.0.0.1:2', role: unified}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twinroute", "scheduler", "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--endpoints-file", str(endpoints),
        "--model", "m", "--scrape-interval-s", "0", "--policy", "round_robin",
        "--log-level", "WARNING", "--grace-s", "1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        assert "scheduler listening on 127.0.0.1:" in line, line
        address = line.split("listening on ")[1].split()[0]
        metrics_url = line.split("metrics ")[1].rstrip(")\n")
        client = SchedulerClient(target=address, timeout_s=5)
        answer = await client.pick(PickQuery(request_id="r", model="m", text="hello " * 50))
        assert answer.endpoint.id in {"a", "b"}
        assert await client.complete(lease_id=answer.lease_id, observed_ttft_s=0.1)
        await client.close()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{metrics_url}/metrics") as response:
                text = await response.text()
            assert 'twinroute_scheduler_decisions_total{policy="round_robin"' in text
            async with http.get(f"{metrics_url}/debug/decisions?format=json") as response:
                assert (await response.json())["decisions"][0]["request_id"] == "r"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_scheduler_refuses_bad_endpoint_file(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n  - {adress: '127.0.0.1:1'}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twinroute", "scheduler", "--listen", "127.0.0.1:0",
        "--metrics-listen", "", "--endpoints-file", str(endpoints),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert b"unknown keys" in stderr


@pytest.mark.parametrize(
    "listen",
    [
        ["--listen", "0.0.0.0:0", "--metrics-listen", ""],
        ["--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0"],
    ],
    ids=["grpc", "metrics"],
)
async def test_no_token_on_a_network_address_is_refused(tmp_path: Path, listen: list[str]) -> None:
    """Secure by default: without a token the scheduler serves only loopback, unless told in so
    many words (--allow-unauthenticated)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twinroute", "scheduler", *listen,
        "--static-endpoints", "127.0.0.1:1", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert b"--allow-unauthenticated" in stderr and b"0.0.0.0" in stderr
