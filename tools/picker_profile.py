"""Where the endpoint picker's CPU goes per request, and a profile of its Python part.

    .venv/bin/python tools/picker_profile.py [--requests 3000] [--json FILE] [--profile]

Starts two near-instant engine simulators and `twinroute gateway --embedded` (Envoy, the
scheduler and its picker) in front of them, sends `--requests` non-streamed completions (16 at
a time) after 300 warm-up requests, and reads from /proc, before and after, the CPU of Envoy
and of every thread of the picker's process (the event loop, which runs the picker and the
scheduler, and gRPC's own threads). It does this twice: with `--policy dualmap`, and with
`--policy round_robin`, whose pick costs next to nothing, so the difference is the pick and
the rest is the gRPC stack's and the picker's own share. With `--profile` a third, dualmap run
goes under cProfile and the functions with the most own time are printed (cProfile inflates
every figure and sees no C; read its shares).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import pstats
import signal
import sys
import tempfile
from typing import Any

import aiohttp

from twinroute.bench.processes import process_tree, start_announced, twinroute_argv

REPO = pathlib.Path(__file__).resolve().parent.parent


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (threads of one name summed)."""
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as handle:
                name = handle.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "event loop" if tid == str(pid) else name
        by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return by_name


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, count: int, *, concurrency: int = 16) -> int:
    done = 0
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(index: int) -> None:
            nonlocal done
            body = {"model": "m", "prompt": f"request {index} says hello", "max_tokens": 1}
            async with gate, session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
                done += response.status == 200

        await asyncio.gather(*(one(i) for i in range(count)))
    return done


async def measure(*, policy: str, requests: int, profile: pathlib.Path | None) -> dict[str, Any]:
    engines = [
        await start_announced(
            f"e{i}",
            twinroute_argv("engine-sim", "--port=0", "--model=m", f"--instance-id=e{i}",
                           "--time-scale=0.0001"),
            timeout_s=60,
        )
        for i in range(2)
    ]  # fmt: skip
    endpoints = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
    args = ["gateway", "--port=0", "--model=m", "--embedded", f"--policy={policy}",
            f"--endpoints={endpoints}", "--access-log="]  # fmt: skip
    argv = (
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "twinroute", *args]
        if profile is not None
        else twinroute_argv(*args)
    )
    gateway = await start_announced("gateway", argv, timeout_s=60)
    try:
        tree = process_tree(gateway.process.pid)
        envoy = next(pid for pid, name in tree.items() if name == "envoy")
        await load(gateway.url, 300)
        threads_before = thread_cpu_s(gateway.process.pid)
        envoy_before = process_cpu_s(envoy)
        served = await load(gateway.url, requests)
        threads = {
            name: (used - threads_before.get(name, 0.0)) * 1000 / requests
            for name, used in thread_cpu_s(gateway.process.pid).items()
        }
        envoy_ms = (process_cpu_s(envoy) - envoy_before) * 1000 / requests
    finally:
        gateway.process.send_signal(signal.SIGINT)
        await gateway.process.wait()
        for engine in engines:
            await engine.stop()
    threads = {name: round(ms, 4) for name, ms in sorted(threads.items()) if ms > 0}
    return {
        "policy": policy,
        "requests": requests,
        "served": served,
        "envoy_cpu_ms_per_request": round(envoy_ms, 4),
        "picker_process_cpu_ms_per_request": round(sum(threads.values()), 4),
        "picker_process_threads_ms_per_request": threads,
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        profile = pathlib.Path(scratch) / "picker.prof" if args.profile else None
        runs = [
            asyncio.run(measure(policy="dualmap", requests=args.requests, profile=None)),
            asyncio.run(measure(policy="round_robin", requests=args.requests, profile=None)),
        ]
        top: list[dict[str, Any]] = []
        if profile is not None:
            # A third run, under cProfile, for the shares only (its CPU figures are inflated).
            asyncio.run(measure(policy="dualmap", requests=args.requests, profile=profile))
            stats = pstats.Stats(str(profile))
            total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
            rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])  # type: ignore[attr-defined]
            for (path, line, function), (_, calls, own, _cumulative, _) in rows[:25]:
                where = pathlib.Path(path).name if path != "~" else "(C)"
                top.append({"function": f"{where}:{line} {function}", "calls": calls,
                            "own_share": round(own / total, 4)})  # fmt: skip
    for run in runs:
        print(json.dumps(run))
    for row in top:
        print(f"{row['own_share']:6.1%}  {row['calls']:8d}  {row['function']}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "profile_own_time_top": top}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
