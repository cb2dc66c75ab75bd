"""Two real vLLM servers behind `twinroute scheduler` and `twinroute router`: vLLM's own
prefix-cache counters show more hits under `dualmap` than under `round_robin`.

    TWINROUTE_E2E_VLLM=1 .venv/bin/pytest e2e/test_vllm_routing.py -v

Runs when TWINROUTE_E2E_VLLM=1 or in CI (CI=true), like `test_vllm_real.py`. The servers stay
up for both policies; each policy gets a fresh scheduler and router, and both servers' prefix
caches are reset first (`POST /reset_prefix_cache`, enabled by VLLM_SERVER_DEV_MODE=1), so
each policy starts cold.

The traffic: GROUPS groups, each with its own long system prompt (~15 full 32-token blocks)
and TURNS distinct user turns, sent one at a time, turn by turn over the groups. GROUPS is odd
so that round robin alternates each group between the two servers (an even count would pin
every group to one server by accident). Expected, per group: dualmap keeps the group on one
server, so every turn after the first hits the cached prompt; round robin pays a miss on each
server, so only turns after the second hit. The router computes prefix keys from token ids
(the tiny model's tokenizer) in 32-token blocks, vLLM's CPU block size.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from vllm_real import (
    REAL_VLLM_MARKS,
    REPO_ROOT,
    TINY_LLAMA_DIR,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    metric_total,
    parse_vllm_metrics,
)

from twinroute.bench.processes import ServerProcess, start_announced, twinroute_argv

pytestmark = REAL_VLLM_MARKS

LOG_DIR = REPO_ROOT / ".tools" / "logs"
MODEL = "tiny-llama"
GROUPS = 7
TURNS = 4
BLOCK_TOKENS = 32


def system_prompt(group: int) -> str:
    return " ".join(
        f"rule {n} for assistant {group}: answer politely about topic {group * 31 + n}"
        for n in range(18)
    )


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    ensure_vllm_installed(log_path=LOG_DIR / "vllm-install.log")
    return ensure_tiny_llama()


@pytest.fixture
async def servers(model_dir: pathlib.Path) -> AsyncIterator[list[VllmServer]]:
    first = VllmServer(
        config=VllmServerConfig(
            model_dir=model_dir, log_path=LOG_DIR / "vllm-routing-0.log", cpu_core=0
        )
    )
    second = VllmServer(
        config=VllmServerConfig(
            model_dir=model_dir, log_path=LOG_DIR / "vllm-routing-1.log", cpu_core=1
        )
    )
    async with first, second:
        yield [first, second]


async def _counters(session: aiohttp.ClientSession, server: VllmServer) -> tuple[float, float]:
    async with session.get(server.url("/metrics")) as response:
        samples = parse_vllm_metrics(await response.text())
    return (
        metric_total(samples, "vllm:prefix_cache_hits_total"),
        metric_total(samples, "vllm:prefix_cache_queries_total"),
    )


async def _start_stack(
    *, policy: str, servers: list[VllmServer]
) -> tuple[ServerProcess, ServerProcess]:
    endpoints = ",".join(f"vllm-{i}=127.0.0.1:{s.port}" for i, s in enumerate(servers))
    scheduler = await start_announced(
        f"scheduler-{policy}",
        twinroute_argv(
            "scheduler",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            f"--policy={policy}",
            f"--key-block-tokens={BLOCK_TOKENS}",
            f"--model={MODEL}",
            f"--static-endpoints={endpoints}",
            "--ttft-slo-s=30",
        ),
        log_path=str(LOG_DIR / f"vllm-routing-scheduler-{policy}.log"),
        timeout_s=90,
    )
    try:
        router = await start_announced(
            f"router-{policy}",
            twinroute_argv(
                "router",
                "--port=0",
                f"--model={MODEL}",
                f"--scheduler={scheduler.address}",
                f"--tokenizer={TINY_LLAMA_DIR / 'tokenizer.json'}",
            ),
            log_path=str(LOG_DIR / f"vllm-routing-router-{policy}.log"),
            timeout_s=90,
        )
    except BaseException:
        await scheduler.stop()
        raise
    return scheduler, router


async def _hit_rate(
    *, policy: str, servers: list[VllmServer]
) -> tuple[float, list[str], dict[int, set[str]]]:
    """(vLLM hit rate over both servers, failures, endpoints each group went to)."""
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for server in servers:
            async with session.post(server.url("/reset_prefix_cache")) as response:
                assert response.status == 200, await response.text()
        before = [await _counters(session, s) for s in servers]
        scheduler, router = await _start_stack(policy=policy, servers=servers)
        failures: list[str] = []
        placements: dict[int, set[str]] = {g: set() for g in range(GROUPS)}
        try:
            for turn in range(TURNS):
                for group in range(GROUPS):
                    body = {
                        "model": MODEL,
                        "prompt": f"{system_prompt(group)}\nuser {turn}: question {turn * 7}?",
                        "max_tokens": 2,
                        "temperature": 0,
                    }
                    async with session.post(f"{router.url}/v1/completions", json=body) as answer:
                        text = await answer.text()
                        if answer.status != 200:
                            failures.append(f"{policy} g{group} t{turn}: {answer.status} {text}")
                        placements[group].add(answer.headers.get("x-twinroute-endpoint", "?"))
        finally:
            await router.stop()
            await scheduler.stop()
        after = [await _counters(session, s) for s in servers]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    assert queries > 0, "vLLM counted no prefix-cache queries"
    return hits / queries, failures, placements


async def test_dualmap_hits_vllm_prefix_cache_more_than_round_robin(
    servers: list[VllmServer],
) -> None:
    dualmap_rate, dualmap_failures, dualmap_places = await _hit_rate(
        policy="dualmap", servers=servers
    )
    rr_rate, rr_failures, rr_places = await _hit_rate(policy="round_robin", servers=servers)
    print(f"vLLM prefix-cache hit rate: dualmap {dualmap_rate:.3f}, round_robin {rr_rate:.3f}")
    assert dualmap_failures == [] and rr_failures == []
    # dualmap keeps each group on one server; round robin spreads every group over both.
    assert all(len(places) == 1 for places in dualmap_places.values()), dualmap_places
    assert all(len(places) == 2 for places in rr_places.values()), rr_places
    # Expected about (TURNS-1)/TURNS vs (TURNS-2)/TURNS of the prompt tokens: 0.75 vs 0.5,
    # less the distinct user turns and the partial last block.
    assert dualmap_rate >= rr_rate + 0.15, (dualmap_rate, rr_rate)
    assert dualmap_rate >= 0.55, dualmap_rate
