"""Where the router's CPU goes per request: with and without `--tokenizer`, and a profile.

    .venv/bin/python tools/router_cpu_profile.py [--requests 2000] [--json FILE] [--profile]

Starts one near-instant engine simulator and `twinroute router --embedded` in front of it,
sends `--requests` streaming completions (a 362-word prompt, 1,405 tokens of the tiny model,
that shares all but its last two words with every other; 8 output tokens, 8 at a time) after
100 warm-up requests, and reads the router process's CPU seconds from /proc before and after.
It does this in seven modes: with the tiny model's tokenizer (token-id keys, what KV-event
lookups need) and its prefix token cache; the same with prompts that share nothing (each starts
with its own word, so the cache never hits: its worst case); the tokenizer with the cache off,
with shared prompts and with prompts that share nothing (unshared prompts also cost the
scheduler more: every key is new to its index); without a tokenizer (keys over characters);
and, as the floor under all of them, a bare aiohttp relay, and below that aiohttp's server side
alone (a canned stream, no engine). With `--profile` the router also
runs under cProfile (tokenizer, cache on) and the functions with the most cumulative time are
printed (cProfile inflates every figure; read its shares, not its milliseconds). The JSON holds the
per-request CPU of every mode and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import os
import pathlib
import pstats
import signal
import sys
import time

import aiohttp

from twinroute.bench.processes import start_announced, twinroute_argv
from twinroute.bench.vllm_live import process_tree_cpu_s

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = REPO / ".tools" / "tiny-llama" / "tokenizer.json"
BARE_RELAY = "--bare-aiohttp-relay"
BARE_SERVER = "--bare-aiohttp-server"
# What the bare server answers every completion with: eight events and the end, one write.
CANNED_STREAM = (
    b'data: {"id":"cmpl-0","object":"text_completion","choices":[{"index":0,"text":" tok",'
    b'"logprobs":null,"finish_reason":null}]}\n\n' * 8
) + b"data: [DONE]\n\n"
PROMPT = " ".join(f"word{i % 50} of the shared system prompt" for i in range(60))


# mode -> (router flags, prompts share their prefix)
MODES: dict[str, tuple[list[str], bool]] = {
    "tokenizer": ([f"--tokenizer={TOKENIZER}"], True),
    "tokenizer_nothing_shared": ([f"--tokenizer={TOKENIZER}"], False),
    "tokenizer_cache_off": ([f"--tokenizer={TOKENIZER}", "--tokenizer-cache-chunks=0"], True),
    "tokenizer_cache_off_nothing_shared": (
        [f"--tokenizer={TOKENIZER}", "--tokenizer-cache-chunks=0"],
        False,
    ),
    "characters": ([], True),
    # Not twinroute: the floor under it, an aiohttp server relaying each stream through one
    # client session with nothing else (no pick, keys, metrics, retries or reports).
    "bare_aiohttp_relay": ([BARE_RELAY], True),
    # Not twinroute either: aiohttp serving the client alone, each completion answered with a
    # canned 8-event stream and no engine behind it (what aiohttp's server side costs).
    "bare_aiohttp_server": ([BARE_RELAY, BARE_SERVER], True),
}


def prompt(index: int, *, shared: bool) -> str:
    return f"{PROMPT} question {index}" if shared else f"request{index} {PROMPT} question"


async def measure(
    *, requests: int, mode: str, profile: pathlib.Path | None, engine_time_scale: float
) -> dict[str, float]:
    flags, shared = MODES[mode]
    engine = await start_announced(
        "engine",
        twinroute_argv(
            "engine-sim",
            "--port=0",
            "--model=m",
            "--instance-id=e0",
            f"--time-scale={engine_time_scale}",
        ),
        timeout_s=60,
    )
    port = 18000 + os.getpid() % 1000
    argv = [
        "router", f"--port={port}", "--model=m", "--embedded", f"--endpoints=e0={engine.address}",
        "--key-block-tokens=32", *flags,
    ]  # fmt: skip
    router = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(profile or "-"),
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_healthy(session, url)
            gate = asyncio.Semaphore(8)

            async def one(index: int) -> None:
                async with gate:
                    body = {
                        "model": "m",
                        "prompt": prompt(index, shared=shared),
                        "max_tokens": 8,
                        "stream": True,
                    }
                    async with session.post(f"{url}/v1/completions", json=body) as response:
                        async for _chunk in response.content.iter_any():
                            pass

            await asyncio.gather(*(one(i) for i in range(requests, requests + 100)))
            cpu_before, started = process_tree_cpu_s([router.pid]), time.monotonic()
            load_before = os.getloadavg()[0]
            await asyncio.gather(*(one(i) for i in range(requests)))
            cpu_s = process_tree_cpu_s([router.pid]) - cpu_before
            wall_s = time.monotonic() - started
    finally:
        try:
            with contextlib.suppress(ProcessLookupError):  # one that failed to start is gone
                router.send_signal(signal.SIGTERM)
            await asyncio.wait_for(router.wait(), 30)
        finally:
            await engine.stop()
    return {
        "requests": requests,
        "router_cpu_ms_per_request": round(1000 * cpu_s / requests, 3),
        "requests_per_s": round(requests / wall_s, 1),
        "load_average_1m": round((load_before + os.getloadavg()[0]) / 2, 2),
    }


async def _wait_healthy(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the router did not come up")


def bare_relay(argv: list[str]) -> None:
    """An aiohttp relay and nothing else, on `--port`, to the engines of `--endpoints` in
    turn; with `--bare-aiohttp-server`, no relay either: a canned stream for every request."""
    import uvloop
    from aiohttp import web

    flags = dict(arg.removeprefix("--").split("=", 1) for arg in argv if "=" in arg)
    engines = itertools.cycle([entry.split("=", 1)[1] for entry in flags["endpoints"].split(",")])

    async def main() -> None:
        session = aiohttp.ClientSession()

        async def relay(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            async with session.post(
                f"http://{next(engines)}{request.path}",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as upstream:
                response = web.StreamResponse(status=upstream.status)
                await response.prepare(request)
                while chunk := await upstream.content.readany():
                    await response.write(chunk)
                await response.write_eof()
                return response

        async def canned(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write_eof(CANNED_STREAM)
            return response

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/completions", canned if BARE_SERVER in argv else relay)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(flags["port"])).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await session.close()

    uvloop.run(main())


def serve(profile_path: str, argv: list[str]) -> None:
    """The router process: `twinroute` itself, under cProfile when a path is given."""
    from twinroute.cli import main

    if BARE_RELAY in argv:
        bare_relay(argv)
        return

    # CPU time, not wall time: next to busy engines a call that wakes another process (a send
    # on loopback) would otherwise be charged for the time the kernel ran someone else.
    profiler = cProfile.Profile(time.process_time) if profile_path != "-" else None
    if profiler is not None:
        profiler.enable()
    try:
        main(argv)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--engine-time-scale", type=float, default=0.001,
        help="the engine simulator's pace: 0.001 answers a stream in one read (the relay's "
        "floor), 0.5 sends its tokens in separate reads, as a real engine does",
    )  # fmt: skip
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    args = parser.parse_args()
    results: dict[str, object] = {
        "prompt_words": len(PROMPT.split()) + 2,
        "output_tokens": 8,
        "engine_time_scale": args.engine_time_scale,
    }
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
        measured = asyncio.run(
            measure(
                requests=args.requests,
                mode=mode,
                profile=None,
                engine_time_scale=args.engine_time_scale,
            )
        )
        results[mode] = measured
        print(f"{mode}: {measured}", flush=True)
    if args.profile:
        path = pathlib.Path("/tmp") / f"router-{os.getpid()}.prof"
        asyncio.run(
            measure(
                requests=args.requests,
                mode=args.modes.split(",")[0],
                profile=path,
                engine_time_scale=args.engine_time_scale,
            )
        )
        pstats.Stats(str(path)).sort_stats("cumulative").print_stats(30)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
