"""Pick RPCs per second and Pick latency of `twinroute scheduler` over real gRPC.

Setup: the scheduler runs as its own process (`twinroute scheduler`, static pool of
`--endpoints` endpoints, scraping off, metrics on), pinned to one CPU core; this process is the
client, pinned to another core. Every Pick carries an 8k-token prompt as token ids (the
router's exact-keys path): `--conversations` conversations share a 1024-token system prompt,
each has its own 4096-token history and every request a fresh tail, so cache-aware policies
find real prefixes. Each Pick is followed by its Complete on the same connection (as a router
does), so the server's one core pays for both; the figures count Picks only.

Three measurements, per policy and key block size:
- in_process: the same requests through `SchedulerService.pick_now` + `complete` in this
  process (protobuf -> value types, keys, policy, lease, no transport): what the decision
  itself costs, to set against the gRPC figures;
- saturation: `--concurrency` callers in a closed loop for `--seconds`: Picks/s the one core
  sustains, with the latency seen at that load;
- fixed rate: Picks sent open-loop at `--rate` per second (the target: 2,000) for `--seconds`:
  client-observed p50/p99 Pick latency at that rate (includes the client's own gRPC cost).

Prints a table, writes `--json` rows and a `--plot` PNG when asked.

Run:  twinroute bench scheduler-pick --policies dualmap,round_robin \
          --json /tmp/pick.json --plot benchmarks/scheduler_pick.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from twinroute.bench import command_line
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc
from twinroute.vocabulary import POLICY_NAMES

MODEL = "bench-model"


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    block_size: int
    mode: str
    offered_rps: float
    picks: int
    errors: int
    picks_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Server CPU seconds (user + system) spent in the run, and Picks per server CPU second:
    # the one-core capacity even when the shared host gives the server less than a core.
    server_cpu_s: float
    picks_per_cpu_s: float


def build_requests(*, count: int, prompt_tokens: int, conversations: int, seed: int) -> list[bytes]:
    """Serialized PickRequests (built once, outside the timed loop)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 128_000, size=1024, dtype=np.uint32)
    history_tokens = min(4096, max(0, prompt_tokens - 1024))
    histories = rng.integers(0, 128_000, size=(conversations, history_tokens), dtype=np.uint32)
    tail_tokens = max(0, prompt_tokens - 1024 - history_tokens)
    requests = []
    for i in range(count):
        tail = rng.integers(0, 128_000, size=tail_tokens, dtype=np.uint32)
        ids = np.concatenate([system, histories[i % conversations], tail])[:prompt_tokens]
        request = pb.PickRequest(
            request_id=f"bench-{i}",
            model=MODEL,
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
            expected_output_tokens=128,
        )
        requests.append(request.SerializeToString())
    return requests


def start_scheduler(
    *, policy: str, endpoints: int, core: int | None, block_size: int
) -> tuple[Any, str]:
    static = ",".join(f"e{i}=127.0.0.1:{20000 + i}" for i in range(endpoints))
    command = [
        sys.executable, "-m", "twinroute", "scheduler", "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--static-endpoints", static, "--model", MODEL,
        "--policy", policy, "--scrape-interval-s", "0", "--log-level", "WARNING",
        "--key-block-tokens", str(block_size),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(process.pid, {core})
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"scheduler did not start: {line!r}")
    address = line.split("listening on ")[1].split()[0]
    return process, address


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_in_process(
    *, policy: str, endpoints: int, block_size: int, requests: list[bytes], seconds: float,
    warmup: int,
) -> tuple[list[float], int, float, float]:  # fmt: skip
    from twinroute.scheduler.build import build_service
    from twinroute.scheduler.discovery import parse_endpoint_list
    from twinroute.scheduler.settings import SchedulerSettings
    from twinroute.scheduler.wire import query_from_pb

    service = build_service(
        SchedulerSettings(policy=policy, key_block_tokens=block_size, served_models=(MODEL,)),
        registry=CollectorRegistry(),
    )
    static = ",".join(f"e{i}=127.0.0.1:{20000 + i}" for i in range(endpoints))
    service.set_endpoints(parse_endpoint_list(static, model=MODEL))
    messages = [pb.PickRequest.FromString(raw) for raw in requests]

    def one(i: int, latencies: list[float]) -> None:
        started = time.perf_counter()
        answer = service.pick_now(query_from_pb(messages[i % len(messages)]))
        latencies.append(time.perf_counter() - started)
        service.core.complete(answer.lease_id, now=time.monotonic(), observed_ttft_s=0.1)

    for i in range(warmup):
        one(i, [])
    latencies: list[float] = []
    cpu_before = time.process_time()
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        one(i, latencies)
        i += 1
    elapsed = time.perf_counter() - started
    return latencies, 0, elapsed, time.process_time() - cpu_before


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return (float("nan"),) * 3
    array = np.asarray(latencies) * 1000
    return (
        float(np.percentile(array, 50)),
        float(np.percentile(array, 99)),
        float(array.max()),
    )


async def _one(
    pick: Any, complete: Any, payload: bytes, latencies: list[float], errors: list[int]
) -> None:
    started = time.perf_counter()
    try:
        response = await pick(payload, timeout=5.0)
    except grpc.aio.AioRpcError:
        errors[0] += 1
        return
    latencies.append(time.perf_counter() - started)
    await complete(
        pb.CompleteRequest(
            lease_id=response.lease_id, outcome=pb.OUTCOME_SUCCESS, observed_ttft_s=0.1
        ),
        timeout=5.0,
    )


async def measure(
    *, address: str, requests: list[bytes], mode: str, seconds: float, concurrency: int,
    rate: float, warmup: int, server_pid: int,
) -> tuple[list[float], int, float, float]:  # fmt: skip
    async with grpc.aio.insecure_channel(address) as channel:
        # Send pre-serialized bytes: the client pays no per-token cost in the timed loop.
        pick = channel.unary_unary(
            "/twinroute.v1.Scheduler/Pick",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.PickResponse.FromString,
        )
        complete = pb_grpc.SchedulerStub(channel).Complete
        latencies: list[float] = []
        errors = [0]
        for i in range(warmup):
            await _one(pick, complete, requests[i % len(requests)], [], errors)
        errors = [0]
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        deadline = started + seconds
        counter = iter(range(10**9))
        if mode == "saturation":

            async def caller() -> None:
                while time.perf_counter() < deadline:
                    payload = requests[next(counter) % len(requests)]
                    await _one(pick, complete, payload, latencies, errors)

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        else:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / rate
            sent = 0
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    break
                due = int((now - started) / interval) + 1
                while sent < due:
                    payload = requests[sent % len(requests)]
                    task = asyncio.create_task(_one(pick, complete, payload, latencies, errors))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                await asyncio.sleep(interval / 2)
            if tasks:
                await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        return latencies, errors[0], elapsed, cpu_seconds(server_pid) - cpu_before


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies", default="dualmap,round_robin",
        help=f"comma-separated, from {', '.join(POLICY_NAMES)}",
    )  # fmt: skip
    parser.add_argument(
        "--endpoints", type=int, default=64, help="static endpoints in the scheduler's pool"
    )
    parser.add_argument(
        "--block-sizes",
        default="16,64",
        help="scheduler --key-block-tokens values (tokens per key), comma-separated",
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=8192,
        help="token ids per Pick: a 1024-token shared system prompt, up to 4096 of history, "
        "then a fresh tail",
    )  # fmt: skip
    parser.add_argument(
        "--conversations", type=int, default=256, help="conversations, each its own history"
    )
    parser.add_argument("--requests", type=int, default=512, help="distinct prompts, cycled")
    parser.add_argument(
        "--seconds", type=float, default=10.0,
        help="seconds per measurement (in_process: at most 4)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=int, default=16, help="saturation: callers in a closed loop"
    )
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="fixed rate: Picks per second, open loop"
    )
    parser.add_argument(
        "--warmup", type=int, default=500, help="unmeasured Picks before each measurement"
    )
    parser.add_argument(
        "--server-core", type=int, default=0, help="CPU core the scheduler process is pinned to"
    )
    parser.add_argument(
        "--client-core", type=int, default=1, help="CPU core this (client) process is pinned to"
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to this file")
    parser.add_argument("--plot", metavar="PNG", help="write a chart to this PNG")


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {args.client_core})
    print(f"# {command_line()}", flush=True)
    requests = build_requests(
        count=args.requests, prompt_tokens=args.prompt_tokens,
        conversations=args.conversations, seed=1,
    )  # fmt: skip
    rows: list[Row] = []
    runs = [
        (policy, int(block)) for policy in args.policies.split(",")
        for block in args.block_sizes.split(",")
    ]  # fmt: skip
    for policy, block_size in runs:
        process, address = start_scheduler(
            policy=policy, endpoints=args.endpoints, core=args.server_core, block_size=block_size
        )
        try:
            for mode in ("in_process", "saturation", "fixed_rate"):
                if mode == "in_process":
                    latencies, errors, elapsed, server_cpu = measure_in_process(
                        policy=policy, endpoints=args.endpoints, block_size=block_size,
                        requests=requests, seconds=min(args.seconds, 4.0), warmup=args.warmup,
                    )  # fmt: skip
                else:
                    latencies, errors, elapsed, server_cpu = asyncio.run(
                        measure(
                            address=address,
                            requests=requests,
                            mode=mode,
                            seconds=args.seconds,
                            concurrency=args.concurrency,
                            rate=args.rate,
                            warmup=args.warmup,
                            server_pid=process.pid,
                        )
                    )
                p50, p99, worst = _percentiles(latencies)
                row = Row(
                    policy=policy, block_size=block_size, mode=mode,
                    offered_rps=args.rate if mode == "fixed_rate" else 0.0,
                    picks=len(latencies), errors=errors, picks_per_s=len(latencies) / elapsed,
                    p50_ms=p50, p99_ms=p99, max_ms=worst, server_cpu_s=server_cpu,
                    picks_per_cpu_s=len(latencies) / server_cpu if server_cpu > 0 else 0.0,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{policy:<12} block={block_size:<4} {mode:<11} "
                    f"offered={row.offered_rps:>5.0f}/s picks/s={row.picks_per_s:>6.0f} "
                    f"picks/server-cpu-s={row.picks_per_cpu_s:>6.0f} "
                    f"p50={p50:6.3f}ms p99={p99:6.3f}ms max={worst:6.2f}ms errors={errors}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=30)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"command": command_line(), "rows": [asdict(r) for r in rows]},
                      handle, indent=2)  # fmt: skip
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
        saturation = [r for r in rows if r.mode in ("saturation", "in_process")]
        labels = [f"{r.policy} b{r.block_size} {r.mode}" for r in saturation]
        left.barh(labels, [r.picks_per_cpu_s for r in saturation])
        left.axvline(2000, color="red", linestyle="--", label="target 2,000/s")
        left.set_xlabel("Picks per CPU second (server core; in_process: this process)")
        left.set_title(f"{args.endpoints} endpoints, {args.prompt_tokens}-token prompts")
        left.invert_yaxis()
        left.legend()
        fixed = [r for r in rows if r.mode == "fixed_rate"]
        positions = np.arange(len(fixed))
        right.barh(positions - 0.2, [r.p50_ms for r in fixed], height=0.4, label="p50")
        right.barh(positions + 0.2, [r.p99_ms for r in fixed], height=0.4, label="p99")
        right.axvline(2.0, color="red", linestyle="--", label="p99 target 2 ms")
        right.set_yticks(positions, [f"{r.policy} b{r.block_size}" for r in fixed])
        right.set_xscale("log")
        right.set_xlabel("ms (log)")
        right.set_title(f"Pick latency at {args.rate:.0f}/s offered (client-observed)")
        right.invert_yaxis()
        right.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=100)
    return 0
