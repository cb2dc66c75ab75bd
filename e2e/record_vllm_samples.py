"""Record real vLLM outputs as test fixtures, and print the figures seen while doing it.

    .venv/bin/python e2e/record_vllm_samples.py [--fixtures tests/fixtures]

Installs vLLM and builds the tiny model if needed, starts one server with KV events on, then
writes: `vllm_metrics_real.txt` (the `/metrics` text after a cold and a warm long prompt, idle),
`vllm_metrics_real_busy.txt` (scraped under load: requests running and waiting, KV in use),
`vllm_tokenize_real.json` (a `/tokenize` request and answer), `vllm_completion_stream_real.txt`
(the raw SSE body of a streaming completion) and `vllm_kv_events_real.jsonl` (decoded KV event
batches). Parsers for these formats are tested against these files, so re-record them when the
pinned vLLM version changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time

import aiohttp
from vllm_real import (
    REPO_ROOT,
    KvEventsRecorder,
    VllmServer,
    VllmServerConfig,
    ensure_tiny_llama,
    ensure_vllm_installed,
    metric_names,
    metric_total,
    parse_vllm_metrics,
)

LOG_DIR = REPO_ROOT / ".tools" / "logs"
LONG_PROMPT = " ".join(f"section {n} of the shared system prompt says hello" for n in range(60))


async def record(*, fixtures: pathlib.Path) -> None:
    started = time.monotonic()
    ensure_vllm_installed(log_path=LOG_DIR / "vllm-install.log")
    print(f"install check: {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    model_dir = ensure_tiny_llama()
    print(f"tiny model: {time.monotonic() - started:.1f} s -> {model_dir}")
    recorder = KvEventsRecorder(out_path=LOG_DIR / "kv-events.jsonl")
    async with recorder:
        config = VllmServerConfig(
            model_dir=model_dir,
            log_path=LOG_DIR / "vllm-samples.log",
            kv_events_endpoint=recorder.endpoint,
            # About 4096 tokens of KV cache: a few distinct long prompts force evictions, so
            # the sample has BlockRemoved events too.
            kv_cache_memory_bytes="4M",
        )
        async with VllmServer(config=config) as server:
            print(f"server startup: {server.startup_s:.1f} s on {server.base_url}")
            await _exercise(server=server, fixtures=fixtures)
            await asyncio.sleep(1.0)  # the publisher sends asynchronously
        batches = recorder.batches()
    print(f"KV event batches: {len(batches)}")
    with (fixtures / "vllm_kv_events_real.jsonl").open("w") as out:
        for batch in batches:
            out.write(json.dumps(batch, sort_keys=True) + "\n")


async def _exercise(*, server: VllmServer, fixtures: pathlib.Path) -> None:
    model = server.config.served_model_name
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(server.url("/reset_prefix_cache")) as response:
            print(f"reset_prefix_cache: {response.status}")
        tokenize_request = {"model": model, "prompt": "Hello, twinroute! section 1 says hello"}
        async with session.post(server.url("/tokenize"), json=tokenize_request) as response:
            tokenize_answer = await response.json()
        (fixtures / "vllm_tokenize_real.json").write_text(
            json.dumps({"request": tokenize_request, "response": tokenize_answer}, indent=2) + "\n"
        )
        async with session.post(
            server.url("/tokenize"), json={"model": model, "prompt": LONG_PROMPT}
        ) as r:
            print(f"long prompt tokens: {(await r.json())['count']}")

        stream_request = {
            "model": model,
            "prompt": "hello there",
            "max_tokens": 5,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.monotonic()
        async with session.post(server.url("/v1/completions"), json=stream_request) as response:
            raw = await response.read()
        print(f"streaming completion (5 tokens): {time.monotonic() - t0:.3f} s")
        (fixtures / "vllm_completion_stream_real.txt").write_bytes(raw)

        for label in ("cold", "warm"):
            body = {
                "model": model,
                "prompt": LONG_PROMPT,
                "max_tokens": 4,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            t0 = time.monotonic()
            async with session.post(server.url("/v1/completions"), json=body) as response:
                assert response.status == 200, await response.text()
                await response.json()
            print(f"long prompt, {label} cache, 4 tokens: {time.monotonic() - t0:.3f} s")
        for _ in range(3):
            t0 = time.monotonic()
            body = {
                "model": model,
                "prompt": "a short prompt",
                "max_tokens": 16,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            async with session.post(server.url("/v1/completions"), json=body) as response:
                await response.json()
            print(f"short prompt, 16 tokens: {time.monotonic() - t0:.3f} s")

        async with session.get(server.url("/metrics")) as response:
            metrics_text = await response.text()
        await _record_busy_metrics(session=session, server=server, fixtures=fixtures)
        for variant in range(3):
            body = {
                "model": model,
                "prompt": f"variant {variant} " + LONG_PROMPT,
                "max_tokens": 1,
                "temperature": 0.0,
            }
            async with session.post(server.url("/v1/completions"), json=body) as response:
                assert response.status == 200, await response.text()
    (fixtures / "vllm_metrics_real.txt").write_text(metrics_text)
    samples = parse_vllm_metrics(metrics_text)
    print(
        "vllm metric names:", ", ".join(n for n in metric_names(samples) if n.startswith("vllm:"))
    )
    print(
        f"prefix cache: queries {metric_total(samples, 'vllm:prefix_cache_queries_total'):.0f}"
        f" hits {metric_total(samples, 'vllm:prefix_cache_hits_total'):.0f}"
    )


async def _record_busy_metrics(
    *, session: aiohttp.ClientSession, server: VllmServer, fixtures: pathlib.Path
) -> None:
    """Scrape while 20 long generations compete for 16 sequence slots and 4096 cached tokens,
    so running, waiting and KV usage are all non-zero in the sample."""

    async def generate(n: int) -> None:
        body = {
            "model": server.config.served_model_name,
            "prompt": f"request {n} " * 40,
            "max_tokens": 300,
            "ignore_eos": True,
        }
        async with session.post(server.url("/v1/completions"), json=body) as response:
            assert response.status == 200, await response.text()
            await response.read()

    tasks = [asyncio.create_task(generate(n)) for n in range(20)]
    best = ""
    best_load = -1.0
    for _ in range(20):
        await asyncio.sleep(0.1)
        async with session.get(server.url("/metrics")) as response:
            text = await response.text()
        samples = parse_vllm_metrics(text)
        load = metric_total(samples, "vllm:num_requests_running") + metric_total(
            samples, "vllm:num_requests_waiting"
        )
        if load > best_load:
            best, best_load = text, load
    started = time.monotonic()
    await asyncio.gather(*tasks)
    print(f"20 concurrent x 300 tokens finished {time.monotonic() - started:.1f} s after scraping")
    (fixtures / "vllm_metrics_real_busy.txt").write_text(best)
    samples = parse_vllm_metrics(best)
    running, waiting, usage = (
        metric_total(samples, name)
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        )
    )
    print(f"busy sample: running {running:.0f} waiting {waiting:.0f} kv usage {usage:.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=pathlib.Path, default=REPO_ROOT / "tests" / "fixtures")
    args = parser.parse_args(argv)
    args.fixtures.mkdir(parents=True, exist_ok=True)
    asyncio.run(record(fixtures=args.fixtures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
