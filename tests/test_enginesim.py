"""The engine simulator's HTTP behaviour: vLLM's API shapes, metrics, and real prefix hits.

Engines run in this process on 127.0.0.1 (port 0) over the simulator's `Instance`, with a cost
model of round numbers so that the modelled times stay a few milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from twinroute.enginesim.core import EngineCore, EngineSettings, block_hashes
from twinroute.enginesim.server import INSTANCE_HEADER, EngineIdentity, build_app
from twinroute.enginesim.tokenizer import WordTokenizer
from twinroute.simulator.instance import Instance, InstanceConfig

MODEL = "sim-model"


class RoundCost:
    """0.01 ms per uncached prompt token, 1 ms per decode step."""

    def prefill_time_s(self, *, uncached_tokens: int, cached_tokens: int) -> float:
        return 1e-5 * uncached_tokens

    def decode_step_time_s(self, *, batch_size: int, kv_tokens: int) -> float:
        return 1e-3


StartEngine = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    runners: list[web.AppRunner] = []

    async def start(*, instance_id: str = "e0", kv_capacity_tokens: int = 100_000) -> str:
        instance = Instance(
            config=InstanceConfig(kv_capacity_tokens=kv_capacity_tokens, block_size=16),
            cost=RoundCost(),
            record_tokens=True,
        )
        core = EngineCore(instance=instance, settings=EngineSettings(block_size=16))
        identity = EngineIdentity(model=MODEL, instance_id=instance_id, max_model_len=100_000)
        runner = web.AppRunner(build_app(core=core, identity=identity))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def words(count: int, *, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_repeated_prompt_hits_the_prefix_cache_and_metrics_show_it(
    start_engine: StartEngine,
) -> None:
    url = await start_engine()
    prompt = words(100)  # 100 tokens: 6 full blocks of 16
    async with aiohttp.ClientSession() as session:
        cached = []
        for _ in range(2):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200
                cached.append((await response.json())["usage"]["prompt_tokens_details"])
        queries = await metric(session, url, "vllm:prefix_cache_queries_total")
        hits = await metric(session, url, "vllm:prefix_cache_hits_total")
    assert cached == [{"cached_tokens": 0}, {"cached_tokens": 96}]
    assert queries == 200
    assert hits == 96


async def test_prompts_in_other_cache_salts_do_not_share_blocks(start_engine: StartEngine) -> None:
    url = await start_engine()
    async with aiohttp.ClientSession() as session:
        for salt in ("a", "b"):
            body = {"model": MODEL, "prompt": words(64), "max_tokens": 1, "cache_salt": salt}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200
        assert await metric(session, url, "vllm:prefix_cache_hits_total") == 0


async def test_unknown_fields_are_ignored(start_engine: StartEngine) -> None:
    url = await start_engine()
    body = {
        "model": MODEL,
        "prompt": "hello there",
        "max_tokens": 3,
        "rid": "router-field",
        "return_text_in_logprobs": True,
        "bootstrap_host": None,
        "temperature": 0.0,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers[INSTANCE_HEADER] == "e0"
        payload = await response.json()
    assert payload["usage"]["completion_tokens"] == 3
    assert payload["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "one two three", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        ),
    ],
    ids=["completions", "chat"],
)
async def test_streaming_follows_openai_sse(
    start_engine: StartEngine, path: str, body: dict[str, object]
) -> None:
    url = await start_engine()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}{path}", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 4
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert choices[-1]["finish_reason"] == "length"
    if path.startswith("/v1/chat"):
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert choices[0]["delta"]["role"] == "assistant"
        text = "".join(c["delta"].get("content", "") for c in choices)
    else:
        assert all(c["object"] == "text_completion" for c in chunks)
        text = "".join(c["text"] for c in choices)
    assert len(text.split()) == 4


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x"}, 400, "model"),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": words(200_000)}, 400, "prompt"),
    ],
    ids=["no-model", "unknown-model", "no-prompt", "max-tokens-string", "prompt-over-kv"],
)
async def test_bad_requests_are_refused_with_reasons(
    start_engine: StartEngine, body: dict[str, object], status: int, param: str
) -> None:
    url = await start_engine()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body) as response,
    ):
        assert response.status == status
        error = (await response.json())["error"]
    assert error["param"] == param
    assert error["message"]


async def test_tokenize_and_render_agree_with_generation(start_engine: StartEngine) -> None:
    url = await start_engine()
    prompt = "the quick brown fox"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}) as r:
            tokenized = await r.json()
        body = {"model": MODEL, "prompt": prompt}
        async with session.post(f"{url}/v1/completions/render", json=body) as r:
            rendered = await r.json()
        async with session.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}) as r:
            detokenized = await r.json()
        async with session.get(f"{url}/v1/models") as r:
            models = await r.json()
        async with session.get(f"{url}/get_server_info") as r:
            # sglang-router would try to download a tokenizer named by server info.
            assert r.status == 404
    assert tokenized["count"] == 4
    assert rendered[0]["token_ids"] == tokenized["tokens"]
    assert detokenized["prompt"] == prompt
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_tokenizer_is_stable_and_prefix_preserving() -> None:
    first, second = WordTokenizer(), WordTokenizer()
    text = "system: be brief\nuser: hello"
    assert first.encode(text) == second.encode(text)
    assert first.encode(text + " more words")[: len(first.encode(text))] == first.encode(text)
    assert first.decode(first.encode(text)) == text


def test_block_hashes_chain_and_cover_full_blocks_only() -> None:
    tokens = list(range(40))
    hashes = block_hashes(tokens, block_size=16, namespace="m")
    assert len(hashes) == 2
    assert block_hashes(tokens[:32], block_size=16, namespace="m") == hashes
    changed = [99, *tokens[1:]]
    assert block_hashes(changed, block_size=16, namespace="m")[1] != hashes[1]
    assert block_hashes(tokens, block_size=16, namespace="other")[0] != hashes[0]
