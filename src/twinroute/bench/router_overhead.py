"""Router overhead: latency added by going through a router instead of straight to an engine.

Method: `--engines` engine-sim processes run with a tiny `--time-scale`, so the modelled GPU
time is microseconds and what is left is HTTP and routing work. An open-loop async client sends
`--rate` non-streaming completions per second (short prompts, `max_tokens=1`) for `--duration`
seconds, first straight to the engines (the client rotates over them itself), then through each
router in turn, after a short warm-up per path. Added latency = a router's percentile minus
the direct path's percentile, measured in the same run on the same engines.

Targets: twinroute adds p50 <= 1 ms and p99 <= 5 ms at 200 req/s on the 2-core
machine, and no more than vllm-router's round_robin; Envoy with the endpoint picker
(`twinroute_envoy`, `twinroute gateway --embedded`) adds p50 <= 0.5 ms and p99 <= 2 ms.
A gateway's CPU counts Envoy (its child process) too, split by process in the JSON.

Under long prompts (`--long-prompt-kib K --long-every-s S`): beside the measured short
requests, one request with a K KiB prompt goes to the same path every S seconds, and only the
short requests' latency is measured: what one long prompt's tokenizing and hashing costs every
other request on the router's event loop. `twinroute_<policy>_inline` runs the same router with
`--offload=off` (that work inline) for the side-by-side comparison; `--tokenizer` gives the
twinroute routers a tokenizer. Router CPU seconds per request come from /proc.

Run:  twinroute bench router-overhead --rate 200 --duration 20
      twinroute bench router-overhead --routers twinroute_dualmap,twinroute_dualmap_inline \
          --long-prompt-kib 512 --long-every-s 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from twinroute.bench import command_line
from twinroute.bench.live import MODEL, ensure_peers, start_router
from twinroute.bench.processes import (
    process_tree,
    start_engine_sims,
)
from twinroute.bench.scheduler_pick import cpu_seconds

DEFAULT_ROUTERS = "twinroute_round_robin,vllm_round_robin"


async def long_prompts(
    *, urls: list[str], kib: int, every_s: float, until: float, session: aiohttp.ClientSession
) -> None:
    """One request with a `kib` KiB prompt (distinct words, so nothing is shared) every
    `every_s` until `until`; their latency is not measured."""
    words = "".join(f"w{i} " for i in range(kib * 1024 // 5))[: kib * 1024]
    rotation = itertools.cycle(urls)
    pending: list[asyncio.Task[None]] = []

    async def one(index: int, url: str) -> None:
        body = {"model": MODEL, "prompt": f"{index} {words}", "max_tokens": 1}
        with contextlib.suppress(aiohttp.ClientError):
            async with session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()

    index = 0
    while time.perf_counter() < until:
        pending.append(asyncio.create_task(one(index, next(rotation))))
        index += 1
        await asyncio.sleep(every_s)
    await asyncio.gather(*pending)


async def load(
    *,
    urls: list[str],
    rate: float,
    duration_s: float,
    session: aiohttp.ClientSession,
    long_prompt_kib: int = 0,
    long_every_s: float = 1.0,
) -> npt.NDArray[np.float64]:
    """Open-loop: request i leaves at i / rate; returns latencies (NaN for failures)."""
    count = int(rate * duration_s)
    latency = np.full(count, np.nan)
    rotation = itertools.cycle(urls)

    async def one(index: int, url: str) -> None:
        body = {"model": MODEL, "prompt": f"request {index} says hello", "max_tokens": 1}
        started = time.perf_counter()
        try:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
                if response.status == 200:
                    latency[index] = time.perf_counter() - started
        except aiohttp.ClientError:
            pass

    tasks = []
    start = time.perf_counter()
    if long_prompt_kib > 0:
        tasks.append(
            asyncio.create_task(
                long_prompts(
                    urls=urls,
                    kib=long_prompt_kib,
                    every_s=long_every_s,
                    until=start + duration_s,
                    session=session,
                )
            )
        )
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, next(rotation))))
    await asyncio.gather(*tasks)
    return latency


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    engines = await start_engine_sims(
        args.engines, model=MODEL, time_scale=args.time_scale, logs=logs
    )
    urls = [e.url for e in engines]
    paths: dict[str, list[str]] = {"direct": urls}
    started: list[Any] = []
    results: dict[str, Any] = {}
    pids: dict[str, dict[int, str]] = {"direct": {}}
    router_args = [f"--tokenizer={args.tokenizer}"] if args.tokenizer else []
    try:
        for name in [n for n in args.routers.split(",") if n]:
            processes = await start_router(
                name,
                engine_urls=urls,
                logs=logs,
                scheduler_mode=args.scheduler,
                slo_s=5.0,
                router_args=router_args if name.startswith("twinroute_") else (),
            )
            started.extend(processes)
            paths[name] = [processes[-1].url]
            pids[name] = {}
            for process in processes:
                pids[name].update(process_tree(process.process.pid))
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for name, targets in paths.items():
                print(f"  {name}: warm-up, then {args.rate:g} req/s for {args.duration:g}s")
                await load(urls=targets, rate=args.rate, duration_s=2.0, session=session)
                cpu_before = {pid: cpu_seconds(pid) for pid in pids[name]}
                latency = await load(
                    urls=targets,
                    rate=args.rate,
                    duration_s=args.duration,
                    session=session,
                    long_prompt_kib=args.long_prompt_kib,
                    long_every_s=args.long_every_s,
                )
                cpu_by_pid = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in pids[name]}
                cpu = sum(cpu_by_pid.values())
                per_command: dict[str, float] = {}
                for pid, used in cpu_by_pid.items():
                    command = pids[name][pid]
                    per_command[command] = per_command.get(command, 0.0) + used
                ok = latency[~np.isnan(latency)]
                results[name] = {
                    "requests": len(latency),
                    "errors": int(np.isnan(latency).sum()),
                    "p50_ms": float(np.percentile(ok, 50) * 1000),
                    "p90_ms": float(np.percentile(ok, 90) * 1000),
                    "p99_ms": float(np.percentile(ok, 99) * 1000),
                    "p999_ms": float(np.percentile(ok, 99.9) * 1000),
                    # Router processes' CPU over the measured requests (long ones included).
                    "router_cpu_ms_per_request": 1000 * cpu / max(1, len(latency)),
                    # The same split by process (a gateway: envoy and its python picker).
                    "cpu_ms_per_request_by_process": {
                        command: 1000 * used / max(1, len(latency))
                        for command, used in sorted(per_command.items())
                    },
                    "latency_ms": [round(float(x) * 1000, 3) for x in ok],
                }
    finally:
        await asyncio.gather(*(p.stop() for p in reversed(started)))
        await asyncio.gather(*(e.stop() for e in engines))
    direct = results["direct"]
    for r in results.values():
        r["added_p50_ms"] = r["p50_ms"] - direct["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - direct["p99_ms"]
    return results


def report(results: dict[str, Any], *, out: Path, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| path | p50 (ms) | p90 (ms) | p99 (ms) | p99.9 (ms) | added p50 (ms) "
        "| added p99 (ms) | router CPU (ms/request) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['p999_ms']:.2f} | {r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} "
            f"| {r['router_cpu_ms_per_request']:.3f} | {r['errors']} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        values = np.sort(np.asarray(r["latency_ms"]))
        axis.plot(values, np.linspace(0, 1, len(values)), label=name)
    axis.set_xscale("log")
    axis.set_xlabel("request latency (ms)")
    axis.set_ylabel("share of requests")
    axis.set_title("Router overhead: latency CDF, direct vs through each router")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "router_overhead.png", dpi=120)
    plt.close(figure)
    lines += ["", "![router overhead](router_overhead.png)"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.vocabulary import POLICY_NAMES

    parser.add_argument(
        "--rate", type=float, default=200.0,
        help="requests per second, open loop (non-streaming, max_tokens=1)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds measured per path, after a warm-up"
    )
    parser.add_argument("--engines", type=int, default=2, help="engine-sim processes")
    parser.add_argument(
        "--routers", default=DEFAULT_ROUTERS,
        help="comma-separated: twinroute_POLICY[_inline] (POLICY from "
        f"{', '.join(POLICY_NAMES)}; _inline: --offload=off), twinroute_envoy[_full|_gie], "
        "vllm_POLICY and sglang_POLICY (the peer's own policy, e.g. round_robin, "
        "cache_aware); the direct path always runs",
    )  # fmt: skip
    parser.add_argument(
        "--time-scale", type=float, default=1e-4,
        help="engine-sim --time-scale: tiny, so that the modelled GPU time is microseconds",
    )  # fmt: skip
    parser.add_argument(
        "--scheduler", choices=("grpc", "embedded"), default="embedded",
        help="twinroute routers: a `twinroute scheduler` process, or the router's --embedded",
    )  # fmt: skip
    parser.add_argument(
        "--long-prompt-kib", type=int, default=0,
        help="beside the measured requests, one with a prompt this long every --long-every-s "
        "(0 = none)",
    )  # fmt: skip
    parser.add_argument(
        "--long-every-s", type=float, default=1.0, help="seconds between the long-prompt requests"
    )
    parser.add_argument(
        "--tokenizer",
        help="a Hugging Face tokenizer.json for the twinroute routers (default: none, they "
        "key text prompts by characters)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("results/router_overhead"),
        help="folder for router_overhead.json, .md and .png and the processes' logs",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_peers(args.routers.split(","))
    results = asyncio.run(measure(args))
    text = report(results, out=args.out, command=command_line())
    print(text)
    (args.out / "router_overhead.md").write_text(text + "\n")
    (args.out / "router_overhead.json").write_text(json.dumps(results, indent=1))
    return 0
