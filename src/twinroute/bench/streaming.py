"""Streaming capacity: how many token streams each path carries, and what each costs in CPU.

Method: `--engines` engine-sim processes at a near-zero `--time-scale` stream `--tokens`
tokens per request (one SSE event each), so what is measured is the proxies' work, not the
model's. For each path (`direct`, then each of `--paths`: twinroute's Python router
`twinroute_<policy>`, Envoy with the endpoint picker `twinroute_envoy[_full|_gie]`, the peers
`vllm_<policy>`/`sglang_<policy>`) and each concurrency in `--concurrency`, a closed loop of
that many clients sends streamed completions for `--duration` seconds after a warm-up. Reported
per run: completed streams/s, events (chunks) per second, the p50/p99 gap between successive
reads of a stream at the client, errors, and CPU seconds per completed stream of every process
of the path (Envoy and the Python picker counted apart), read from /proc. Every path runs in
the same invocation on the same engines, so ratios between them are what to read.

Run:  twinroute bench streaming --paths twinroute_dualmap,twinroute_envoy \\
          --concurrency 16,64,256 --duration 15 --out results/streaming
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from twinroute.bench import command_line
from twinroute.bench.live import MODEL, ensure_peers, start_router
from twinroute.bench.processes import (
    ServerProcess,
    process_tree,
    start_engine_sims,
)
from twinroute.bench.scheduler_pick import cpu_seconds

DEFAULT_PATHS = "twinroute_dualmap,twinroute_envoy"


async def closed_loop(
    *, url: str, clients: int, duration_s: float, tokens: int, session: aiohttp.ClientSession
) -> dict[str, Any]:
    """`clients` loops, each sending one streamed request after the other until the time is
    up; returns counts and the read gaps (seconds) seen inside streams."""
    deadline = time.perf_counter() + duration_s
    completed = events = errors = 0
    gaps: list[float] = []

    async def client(number: int) -> None:
        nonlocal completed, events, errors
        index = 0
        while time.perf_counter() < deadline:
            body = {
                "model": MODEL,
                "prompt": f"client {number} request {index} streams",
                "max_tokens": tokens,
                "stream": True,
            }
            index += 1
            try:
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    if response.status != 200:
                        await response.read()
                        errors += 1
                        continue
                    seen = 0
                    last = time.perf_counter()
                    done = False
                    while True:
                        chunk = await response.content.readany()
                        if not chunk:
                            break
                        now = time.perf_counter()
                        if seen:
                            gaps.append(now - last)
                        last = now
                        seen += chunk.count(b"data: ")
                        done = done or b"[DONE]" in chunk
                    if done:
                        completed += 1
                        events += seen
                    else:
                        errors += 1
            except (aiohttp.ClientError, OSError):
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "elapsed_s": elapsed,
        "completed": completed,
        "events": events,
        "errors": errors,
        "gaps": gaps,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    engines = await start_engine_sims(
        args.engines, model=MODEL, time_scale=args.time_scale, logs=logs
    )
    urls = [engine.url for engine in engines]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    results: dict[str, Any] = {}
    try:
        for name in ["direct", *(p for p in args.paths.split(",") if p)]:
            processes: list[ServerProcess] = []
            if name != "direct":
                processes = await start_router(
                    name, engine_urls=urls, logs=logs, scheduler_mode="embedded", slo_s=5.0
                )
            try:
                results[name] = await measure_path(name, urls, processes, concurrencies, args)
            finally:
                await asyncio.gather(*(p.stop() for p in reversed(processes)))
    finally:
        await asyncio.gather(*(e.stop() for e in engines))
    return results


async def measure_path(
    name: str,
    engine_urls: list[str],
    processes: list[ServerProcess],
    concurrencies: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    tree: dict[int, str] = {}
    for process in processes:
        tree.update(process_tree(process.process.pid))
    runs: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for clients in concurrencies:
            url = processes[-1].url if processes else engine_urls[0]
            urls = [url] if processes else engine_urls
            print(f"  {name}: {clients} concurrent streams for {args.duration:g}s", flush=True)
            await closed_loop(
                url=urls[0], clients=clients, duration_s=2.0, tokens=args.tokens, session=session
            )
            before = {pid: cpu_seconds(pid) for pid in tree}
            parts = await asyncio.gather(
                *(
                    closed_loop(
                        url=target,
                        clients=max(1, clients // len(urls)),
                        duration_s=args.duration,
                        tokens=args.tokens,
                        session=session,
                    )
                    for target in urls
                )
            )
            used: dict[str, float] = {}
            for pid, command in tree.items():
                with contextlib.suppress(OSError):
                    used[command] = used.get(command, 0.0) + cpu_seconds(pid) - before[pid]
            completed = sum(p["completed"] for p in parts)
            elapsed = max(p["elapsed_s"] for p in parts)
            gaps = np.asarray([g for p in parts for g in p["gaps"]]) * 1000
            runs[str(clients)] = {
                "streams_per_s": completed / elapsed,
                "events_per_s": sum(p["events"] for p in parts) / elapsed,
                "completed": completed,
                "errors": sum(p["errors"] for p in parts),
                "gap_p50_ms": float(np.percentile(gaps, 50)) if gaps.size else 0.0,
                "gap_p99_ms": float(np.percentile(gaps, 99)) if gaps.size else 0.0,
                "cpu_ms_per_stream": {
                    command: 1000 * seconds / max(1, completed)
                    for command, seconds in sorted(used.items())
                },
                "cpu_ms_per_stream_total": 1000 * sum(used.values()) / max(1, completed),
            }
    return runs


def report(results: dict[str, Any], *, command: str, out: Path) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| path | concurrent streams | streams/s | chunks/s | read gap p50 (ms) "
        "| read gap p99 (ms) | CPU per stream (ms, by process) | errors |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, runs in results.items():
        for clients, r in runs.items():
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_stream"].items()) or "-"
            lines.append(
                f"| {name} | {clients} | {r['streams_per_s']:.1f} | {r['events_per_s']:.0f} "
                f"| {r['gap_p50_ms']:.2f} | {r['gap_p99_ms']:.2f} "
                f"| {r['cpu_ms_per_stream_total']:.2f} ({split}) | {r['errors']} |"
            )
    plot(results, out / "streaming.png")
    lines += ["", "![streaming capacity](streaming.png)"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (streams, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in results if n != "direct"]
    colours = plt.get_cmap("tab10")
    for index, name in enumerate(["direct", *names]):
        runs = results[name]
        clients = [int(c) for c in runs]
        style = {"color": colours(index), "marker": "o", "label": name}
        streams.plot(clients, [runs[c]["streams_per_s"] for c in runs], **style)
        if name != "direct":
            cpu.plot(clients, [runs[c]["cpu_ms_per_stream_total"] for c in runs], **style)
    ticks = sorted({int(c) for runs in results.values() for c in runs})
    for axis in (streams, cpu):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("concurrent streams")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    streams.set_ylabel("completed streams per second (higher is better)")
    streams.set_title("Streams carried")
    cpu.set_ylabel("proxy CPU per stream, ms (lower is better)")
    cpu.set_title("CPU of the path's processes per stream")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.vocabulary import POLICY_NAMES

    parser.add_argument(
        "--paths", default=DEFAULT_PATHS,
        help="comma-separated, besides direct (always run): twinroute_POLICY (POLICY from "
        f"{', '.join(POLICY_NAMES)}), twinroute_envoy[_full|_gie], vllm_POLICY and "
        "sglang_POLICY (the peer's own policy, e.g. round_robin, cache_aware)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", default="16,64,256",
        help="concurrent streams, one run per value, comma-separated",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--tokens", type=int, default=200, help="tokens (SSE events) per stream")
    parser.add_argument("--engines", type=int, default=2, help="engine-sim processes")
    parser.add_argument(
        "--time-scale", type=float, default=1e-4,
        help="engine-sim --time-scale: near zero, so the proxies' work is what is measured",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("results/streaming"),
        help="folder for streaming.json, .md and .png and the processes' logs",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_peers(args.paths.split(","))
    results = asyncio.run(measure(args))
    text = report(results, command=command_line(), out=args.out)
    print(text)
    (args.out / "streaming.md").write_text(text + "\n")
    (args.out / "streaming.json").write_text(json.dumps(results, indent=1))
    return 0
