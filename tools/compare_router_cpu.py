#!/usr/bin/env python3
"""Router CPU per request of two checkouts, side by side on the same engines.

For a change to the request path (the router, the scheduler's API): is the hot path dearer?
Each checkout needs its own `.venv` (`make venv` there; `git worktree add` makes a second
checkout of an older commit). Two `twinroute engine-sim` processes (time scale 1e-4, so the
modelled GPU time is microseconds) serve both; each round starts each checkout's router in
turn (`--embedded --policy dualmap`, or `--scheduler` with its own `twinroute scheduler`
process), warms it with 200 requests, sends `--requests` streamed completions (8 chunks) at
concurrency 16, and reads the processes' CPU from /proc. Rounds alternate the checkouts, so
a noisy neighbour hits both alike; the medians are the figures.

    python tools/compare_router_cpu.py --before ../baseline --after . --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


def start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A process that announces `... listening on ADDRESS`; (process, address)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"{argv[1]} did not start: {line!r}")
    return process, line.split("listening on ")[1].split()[0]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, count: int) -> None:
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> None:
            body = {
                "model": "m",
                "prompt": f"conversation {index % 50} " + "word " * 40,
                "max_tokens": 8,
                "stream": True,
            }
            async with gate, session.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")

        await asyncio.gather(*(one(index) for index in range(count)))


def one_run(checkout: Path, *, endpoints: str, mode: str, requests: int) -> dict[str, float]:
    twinroute = str(checkout / ".venv" / "bin" / "twinroute")
    processes: list[subprocess.Popen[str]] = []
    try:
        router_args = [twinroute, "router", "--port=0", "--model=m"]
        if mode == "embedded":
            router_args += ["--embedded", "--policy=dualmap", f"--endpoints={endpoints}"]
        else:
            scheduler, address = start(
                [twinroute, "scheduler", "--listen=127.0.0.1:0", "--metrics-listen=",
                 "--policy=dualmap", "--model=m", f"--static-endpoints={endpoints}"]
            )  # fmt: skip
            processes.append(scheduler)
            router_args += [f"--scheduler={address}"]
        router, url = start(router_args)
        processes.append(router)
        asyncio.run(load(url, 200))
        before = {p.pid: cpu_s(p.pid) for p in processes}
        started = time.perf_counter()
        asyncio.run(load(url, requests))
        wall_s = time.perf_counter() - started
        used = {p.pid: cpu_s(p.pid) - before[p.pid] for p in processes}
        return {
            "router_cpu_ms_per_request": used[router.pid] / requests * 1000,
            "scheduler_cpu_ms_per_request": (
                used[processes[0].pid] / requests * 1000 if mode == "grpc" else 0.0
            ),
            "wall_s": wall_s,
        }
    finally:
        for process in processes:
            process.terminate()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout with a .venv")
    parser.add_argument("--after", type=Path, required=True, help="checkout with a .venv")
    parser.add_argument("--mode", choices=("embedded", "grpc"), default="embedded")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    engine_bin = str(checkouts["after"] / ".venv" / "bin" / "twinroute")
    engines = [
        start([engine_bin, "engine-sim", "--port=0", "--model=m", f"--instance-id=e{i}",
               "--time-scale=0.0001"])
        for i in range(2)
    ]  # fmt: skip
    endpoints = ",".join(f"e{i}={address}" for i, (_, address) in enumerate(engines))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    try:
        for round_index in range(args.rounds):
            for name, checkout in checkouts.items():
                run = one_run(checkout, endpoints=endpoints, mode=args.mode, requests=args.requests)
                runs[name].append(run)
                print(f"round {round_index + 1} {name}: {run}", file=sys.stderr, flush=True)
    finally:
        for process, _ in engines:
            process.terminate()
            process.wait()
    medians: dict[str, Any] = {
        name: {
            key: statistics.median(run[key] for run in results)
            for key in ("router_cpu_ms_per_request", "scheduler_cpu_ms_per_request")
        }
        for name, results in runs.items()
    }
    report = {
        "command": " ".join(sys.argv),
        "mode": args.mode,
        "requests_per_run": args.requests,
        "rounds": args.rounds,
        "medians": medians,
        "runs": runs,
    }
    print(json.dumps(medians, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
