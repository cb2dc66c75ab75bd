"""`twinroute bench soak`: sustained traffic through the real processes, optionally with faults.

Starts `--engines` engine-sim processes, `twinroute scheduler` (static endpoints, gRPC, a
token) and `twinroute router --scheduler ...` as the operator renders it (the token, no
`--endpoints`: it fails open to the endpoints it learnt from the scheduler), all on
127.0.0.1, then sends open-loop Poisson traffic at
`--rate` requests/s for `--duration` seconds (a bounded loop: it stops by itself and then
waits at most `--request-timeout` for the requests in flight). Prompts come from `--groups`
long shared system prompts plus a distinct user turn; every other request streams.

Every request ends as `ok` or as a failure with its kind (HTTP status, stream without
`[DONE]`, connection error, timeout); a request never goes uncounted. Memory: VmRSS from
/proc/PID/status of each process after warm-up and at the end.

With `--chaos`, faults at fixed fractions of the run, each with a window (start of the fault to
`FAULT_SETTLE_S` after it ends):
- `engine_killed`: SIGKILL engine 0 while requests stream from it; restarted on the same
  port after 2 s. Streams cut mid-way end with an error event (expected, counted);
  requests not yet streaming are retried on the other candidate.
- `engine_hung`: SIGSTOP engine 1 for 3 s, then SIGCONT (timeouts, marked unhealthy,
  recovered).
- `drain_without_token`: a Drain of engine 1 with no token, then one with a wrong token:
  both refused (UNAUTHENTICATED, PERMISSION_DENIED), counted in the scheduler's
  `calls_refused_total`, logged, and engine 1 stays in routing.
- `scheduler_restarted`: with `LONG_STREAMS` long streams running, SIGTERM the scheduler and
  start it again on the same port; the router fails open to round robin meanwhile. The long
  streams finish after the restart, so their Completes reach the new process: checked from its
  records at the end of the run, every Complete of a lease it issued found its lease (none
  `unknown`: no earlier Complete closed it), the old ones were told apart (`foreign`), and no
  lease is left open or expired.
Each fault reports the requests whose lifetime overlaps its window, how many failed and why,
the window's latency p50/p99 beside the run's, and its checks (`checks`, each true or false).

The JSON (`--json`) has `requests`, `ok`, `failed_requests`, `failure_kinds`, `achieved_rps`,
latency percentiles, `rss_start_mb` / `rss_end_mb` per process (also under `processes`),
`faults` with `--chaos`, and the first 50 `failures` (start time, kind, what was said).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from twinroute.bench.processes import ServerProcess, free_port, start_announced, twinroute_argv
from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc
from twinroute.vocabulary import POLICY_NAMES

MODEL = "twinroute-sim"
FAULT_SETTLE_S = 5.0
PROGRESS_EVERY_S = 5.0
# Streams running across the scheduler restart, long enough to outlast it: about
# LONG_STREAM_S, at engine-sim's decode pace of about 6 ms a token (time scale 1) alone.
LONG_STREAMS = 4
LONG_STREAM_S = 4.0
ENGINE_SIM_TOKEN_S = 0.006


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument(
        "--rate", type=float, default=20.0, help="requests per second (Poisson arrivals)"
    )
    parser.add_argument("--engines", type=int, default=3, help="engine-sim processes (at least 2)")
    parser.add_argument(
        "--groups", type=int, default=12,
        help="shared system prompts; each request adds its own user turn to one",
    )  # fmt: skip
    parser.add_argument(
        "--chaos", action="store_true",
        help="inject faults at fixed shares of --duration: at 20%% SIGKILL engine 0 (restarted "
        "2 s later), at 45%% SIGSTOP engine 1 for 3 s (hung), at 60%% Drain engine 1 with no "
        "token and a wrong token (both must be refused), at 70%% restart the scheduler under "
        "load with long streams across the restart",
    )  # fmt: skip
    parser.add_argument(
        "--policy", default="dualmap", choices=POLICY_NAMES, help="the scheduler's --policy"
    )
    parser.add_argument(
        "--time-scale", type=float, default=0.05, help="engine-sim --time-scale (0.05 = 20x fast)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0,
        help="seconds a request may take before it fails as a timeout; also the longest "
        "wait for requests in flight at the end",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--log-dir", type=Path, default=Path("results/soak"),
        help="folder for the processes' logs and the pool's token file",
    )  # fmt: skip


@dataclass(slots=True)
class RequestResult:
    """One soak request as its client saw it."""

    started_s: float
    latency_s: float
    failure: str  # "" when the request succeeded
    detail: str = ""  # what the router or the connection said, for failures
    ended_s: float = 0.0  # on the run's clock, set when the answer is complete
    # One of the long streams run across the scheduler restart: counted like any request,
    # left out of the latency percentiles (it lasts seconds by design).
    long: bool = False


@dataclass(slots=True)
class FaultWindow:
    name: str
    start_s: float
    end_s: float = 0.0
    detail: str = ""
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Stack:
    """The processes under test; engines and the scheduler restart on the same ports."""

    args: argparse.Namespace
    engine_ports: list[int]
    scheduler_port: int
    metrics_port: int
    engines: list[ServerProcess] = field(default_factory=list)
    scheduler: ServerProcess | None = None
    router: ServerProcess | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(24))

    def log_path(self, name: str) -> str:
        return str(self.args.log_dir / f"{name}.log")

    @property
    def token_file(self) -> Path:
        return Path(self.args.log_dir) / "pool-token"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def start_engine(self, index: int) -> ServerProcess:
        return await start_announced(
            f"engine-{index}",
            twinroute_argv(
                "engine-sim",
                f"--port={self.engine_ports[index]}",
                f"--model={MODEL}",
                f"--instance-id=engine-{index}",
                f"--time-scale={self.args.time_scale}",
            ),
            log_path=self.log_path(f"engine-{index}"),
            timeout_s=90,
        )

    def endpoints(self) -> str:
        return ",".join(f"engine-{i}=127.0.0.1:{p}" for i, p in enumerate(self.engine_ports))

    async def start_scheduler(self) -> ServerProcess:
        return await start_announced(
            "scheduler",
            twinroute_argv(
                "scheduler",
                f"--listen=127.0.0.1:{self.scheduler_port}",
                f"--metrics-listen=127.0.0.1:{self.metrics_port}",
                f"--policy={self.args.policy}",
                f"--model={MODEL}",
                f"--static-endpoints={self.endpoints()}",
                f"--admin-token-file={self.token_file}",
                "--log-level=WARNING",
            ),
            log_path=self.log_path("scheduler"),
            timeout_s=90,
        )

    async def start(self) -> None:
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.engines = list(
            await asyncio.gather(*(self.start_engine(i) for i in range(len(self.engine_ports))))
        )
        self.scheduler = await self.start_scheduler()
        self.router = await start_announced(
            "router",
            twinroute_argv(
                "router",
                "--port=0",
                f"--model={MODEL}",
                f"--scheduler=127.0.0.1:{self.scheduler_port}",
                f"--scheduler-token-file={self.token_file}",
                "--fail-open-learn-every-s=1",
            ),
            log_path=self.log_path("router"),
            timeout_s=90,
        )

    def processes(self) -> dict[str, int]:
        found = {e.name: e.process.pid for e in self.engines}
        for server in (self.scheduler, self.router):
            if server is not None:
                found[server.name] = server.process.pid
        return found

    async def stop(self) -> None:
        for server in (self.router, self.scheduler, *self.engines):
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    await server.stop()


def rss_mb(pid: int) -> float | None:
    """VmRSS of a live process, in MiB (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return None


def system_prompt(group: int) -> str:
    words = random.Random(group).choices(
        ["policy", "cache", "route", "token", "prefix", "engine", "queue", "block"], k=600
    )
    return f"System prompt {group}: " + " ".join(words)


async def send_one(
    session: aiohttp.ClientSession,
    *,
    router_url: str,
    index: int,
    groups: int,
    max_tokens: int,
    started_s: float,
    clock: Any,
) -> RequestResult:
    group = index % groups
    stream = index % 2 == 0
    body = {
        "model": MODEL,
        "prompt": f"{system_prompt(group)}\nUser {index}: tell me something.",
        "max_tokens": max_tokens,
        "stream": stream,
    }
    begin = clock()
    failure = detail = ""
    try:
        async with session.post(f"{router_url}/v1/completions", json=body) as response:
            text = await response.text()
            if response.status != 200:
                failure, detail = f"http_{response.status}", text[:300]
            elif stream:
                failure, detail = stream_failure(text)
    except TimeoutError:
        failure = "timeout"
    except aiohttp.ClientError as error:
        failure, detail = f"connection:{type(error).__name__}", str(error)[:300]
    return RequestResult(
        started_s=started_s, latency_s=clock() - begin, failure=failure, detail=detail
    )


def stream_failure(text: str) -> tuple[str, str]:
    """("", "") for a whole SSE stream; else the failure kind and the error event's message."""
    for line in text.splitlines():
        payload = line.removeprefix("data:").strip()
        if not line.startswith("data:") or payload == "[DONE]":
            continue
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            return "stream_garbled", payload[:300]
        if isinstance(event, dict) and "error" in event:
            return "stream_error_event", json.dumps(event["error"])[:300]
    if "data: [DONE]" not in text:
        return "stream_truncated", text[-300:]
    return "", ""


async def traffic(
    *,
    router_url: str,
    args: argparse.Namespace,
    t0: float,
    outcomes: list[RequestResult],
    in_flight: list[int],
) -> None:
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        pending: set[asyncio.Task[None]] = set()
        index = 0
        next_at = 0.0
        while next_at < args.duration:
            delay = next_at - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)

            async def one(i: int, at: float) -> None:
                in_flight[0] += 1
                try:
                    outcome = await send_one(
                        session,
                        router_url=router_url,
                        index=i,
                        groups=args.groups,
                        max_tokens=args.max_tokens,
                        started_s=at,
                        clock=time.monotonic,
                    )
                    outcome.ended_s = time.monotonic() - t0
                    outcomes.append(outcome)
                finally:
                    in_flight[0] -= 1

            task = asyncio.create_task(one(index, time.monotonic() - t0))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
            next_at += rng.expovariate(args.rate)
        if pending:
            await asyncio.gather(*pending)


async def scheduler_samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The scheduler's metrics now: {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as session, session.get(stack.metrics_url) as response:
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def unauthenticated_drains(stack: Stack) -> dict[str, Any]:
    """Drain engine 1 with no token, then with a wrong one: both refused, logged, counted,
    and the engine still routable."""
    codes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.scheduler_port}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for metadata in (None, (("authorization", "Bearer not-the-token"),)):
            try:
                await stub.Drain(
                    scheduler_pb2.DrainRequest(endpoint_id="engine-1"), metadata=metadata, timeout=5
                )
                codes.append("OK")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
    samples = await scheduler_samples(stack)
    refused = {
        why: samples.get(
            ("twinroute_scheduler_calls_refused_total", (("call", "Drain"), ("why", why))), 0.0
        )
        for why in ("missing_token", "wrong_token")
    }
    routable = samples.get(
        ("twinroute_scheduler_endpoint_routable", (("endpoint", "engine-1"),)), 0.0
    )
    log = await asyncio.to_thread(Path(stack.log_path("scheduler")).read_text, errors="replace")
    return {
        "refused": codes == ["UNAUTHENTICATED", "PERMISSION_DENIED"],
        "counted": refused == {"missing_token": 1.0, "wrong_token": 1.0},
        "logged": "refused Drain" in log,
        "still_routable": routable == 1.0,
        "codes": codes,
    }


async def scheduler_records(stack: Stack) -> dict[str, Any]:
    """After the run, from the restarted scheduler's own counters: no Complete of a lease it
    issued came back unknown (so none was closed by another request's Complete), the
    Completes of leases from before the restart were told apart, nothing is open or expired."""
    samples = await scheduler_samples(stack)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    foreign = value("twinroute_scheduler_completions_total", outcome="foreign")
    unknown = value("twinroute_scheduler_completions_total", outcome="unknown")
    open_leases = value("twinroute_scheduler_leases_open")
    expired = value("twinroute_scheduler_leases_expired_total")
    return {
        "every_complete_found_its_own_lease": unknown == 0,
        "completes_from_before_the_restart_told_apart": foreign >= 1,
        "no_lease_left_open_or_expired": open_leases == 0 and expired == 0,
        "foreign_completes": foreign,
        "unknown_completes": unknown,
        "leases_open": open_leases,
        "leases_expired": expired,
    }


async def long_stream(
    session: aiohttp.ClientSession, *, router_url: str, index: int, t0: float, time_scale: float
) -> RequestResult:
    outcome = await send_one(
        session,
        router_url=router_url,
        index=2 * index,  # even: streamed
        groups=1,
        max_tokens=round(LONG_STREAM_S / (ENGINE_SIM_TOKEN_S * time_scale)),
        started_s=time.monotonic() - t0,
        clock=time.monotonic,
    )
    outcome.ended_s = time.monotonic() - t0
    outcome.long = True
    return outcome


async def chaos(
    *, stack: Stack, args: argparse.Namespace, t0: float, outcomes: list[RequestResult]
) -> list[FaultWindow]:
    windows: list[FaultWindow] = []

    async def at(fraction: float) -> None:
        delay = fraction * args.duration - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)

    def now() -> float:
        return time.monotonic() - t0

    # An engine killed while streaming, back on its port 2 s later.
    await at(0.2)
    window = FaultWindow(name="engine_killed", start_s=now(), detail="SIGKILL engine-0")
    stack.engines[0].kill()
    await stack.engines[0].process.wait()
    await asyncio.sleep(2.0)
    stack.engines[0] = await stack.start_engine(0)
    window.end_s = now()
    windows.append(window)

    # An engine that hangs (SIGSTOP) for 3 s.
    await at(0.45)
    hung = stack.engines[1 % len(stack.engines)]
    window = FaultWindow(name="engine_hung", start_s=now(), detail=f"SIGSTOP {hung.name} 3 s")
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(3.0)
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
    window.end_s = now()
    windows.append(window)

    # Drains without the pool's token.
    await at(0.6)
    window = FaultWindow(
        name="drain_without_token", start_s=now(), detail="Drain engine-1: no token, wrong token"
    )
    window.checks = await unauthenticated_drains(stack)
    window.end_s = now()
    windows.append(window)

    # The scheduler restarted under load, with long streams running across the restart.
    await at(0.7)
    assert stack.router is not None
    timeout = aiohttp.ClientTimeout(total=args.request_timeout * 4)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        streams = [
            asyncio.create_task(
                long_stream(
                    session,
                    router_url=stack.router.url,
                    index=i,
                    t0=t0,
                    time_scale=args.time_scale,
                )
            )
            for i in range(LONG_STREAMS)
        ]
        await asyncio.sleep(1.0)  # placed and streaming by now
        window = FaultWindow(
            name="scheduler_restarted",
            start_s=now(),
            detail=f"SIGTERM + restart, {LONG_STREAMS} long streams running across it",
        )
        assert stack.scheduler is not None
        await stack.scheduler.stop()
        stack.scheduler = await stack.start_scheduler()
        window.end_s = now()
        finished = await asyncio.gather(*streams)
    outcomes.extend(finished)
    window.checks["long_streams_whole"] = all(not o.failure for o in finished)
    window.checks["long_streams_outlived_the_restart"] = all(
        o.ended_s > window.end_s for o in finished
    )
    windows.append(window)
    return windows


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def summarize_window(window: FaultWindow, outcomes: Sequence[RequestResult]) -> dict[str, Any]:
    # A request belongs to a fault when its lifetime overlaps the fault's window.
    inside = [
        o
        for o in outcomes
        if o.started_s <= window.end_s + FAULT_SETTLE_S and o.ended_s >= window.start_s
    ]
    failures = collections.Counter(o.failure for o in inside if o.failure)
    latencies = [o.latency_s for o in inside if not o.failure and not o.long]
    return {
        "name": window.name,
        "detail": window.detail,
        "at_s": round(window.start_s, 3),
        "fault_duration_s": round(window.end_s - window.start_s, 2),
        "window_s": round(window.end_s - window.start_s + FAULT_SETTLE_S, 2),
        "requests_in_window": len(inside),
        "failed": sum(failures.values()),
        "failure_kinds": dict(failures),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "checks": window.checks,
    }


async def progress(
    *, t0: float, args: argparse.Namespace, outcomes: list[RequestResult], in_flight: list[int]
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        failed = sum(1 for o in outcomes if o.failure)
        print(
            f"soak t={time.monotonic() - t0:5.1f}/{args.duration:.0f}s "
            f"done={len(outcomes)} failed={failed} in_flight={in_flight[0]}",
            file=sys.stderr,
            flush=True,
        )


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        args=args,
        engine_ports=[free_port() for _ in range(args.engines)],
        scheduler_port=free_port(),
        metrics_port=free_port(),
    )
    try:
        await stack.start()
        assert stack.router is not None
        router_url = stack.router.url
        # Warm-up: one request per group, so start-of-run memory includes loaded code paths.
        warm: list[RequestResult] = []
        await traffic(
            router_url=router_url,
            args=argparse.Namespace(**{**vars(args), "duration": 1.0, "rate": float(args.groups)}),
            t0=time.monotonic(),
            outcomes=warm,
            in_flight=[0],
        )
        rss_start = {name: rss_mb(pid) for name, pid in stack.processes().items()}
        outcomes: list[RequestResult] = []
        in_flight = [0]
        t0 = time.monotonic()
        reporter = asyncio.create_task(
            progress(t0=t0, args=args, outcomes=outcomes, in_flight=in_flight)
        )
        faults = (
            asyncio.create_task(chaos(stack=stack, args=args, t0=t0, outcomes=outcomes))
            if args.chaos
            else None
        )
        try:
            await traffic(
                router_url=router_url, args=args, t0=t0, outcomes=outcomes, in_flight=in_flight
            )
            windows = await faults if faults is not None else []
            for window in windows:
                if window.name == "scheduler_restarted":
                    await asyncio.sleep(1.0)  # the last Complete reports land
                    window.checks.update(await scheduler_records(stack))
        finally:
            reporter.cancel()
            if faults is not None and not faults.done():
                faults.cancel()
        wall_s = time.monotonic() - t0
        rss_end = {name: rss_mb(pid) for name, pid in stack.processes().items()}
    finally:
        await stack.stop()
    failures = collections.Counter(o.failure for o in outcomes if o.failure)
    latencies = [o.latency_s for o in outcomes if not o.failure and not o.long]
    return {
        "duration_s": args.duration,
        "wall_s": round(wall_s, 2),
        "rate_rps": args.rate,
        "engines": args.engines,
        "policy": args.policy,
        "chaos": bool(args.chaos),
        "requests": len(outcomes),
        "ok": len(outcomes) - sum(failures.values()),
        "failed_requests": sum(failures.values()),
        "failure_kinds": dict(failures),
        "warmup_failed": sum(1 for o in warm if o.failure),
        "achieved_rps": round(len(outcomes) / wall_s, 2),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "processes": {
            name: {"rss_start_mb": rss_start.get(name), "rss_end_mb": rss_end.get(name)}
            for name in rss_end
        },
        "faults": [summarize_window(w, outcomes) for w in windows],
        "failures": [
            {
                "started_s": round(o.started_s, 3),
                "latency_s": round(o.latency_s, 3),
                "ended_s": round(o.ended_s, 3),
                "kind": o.failure,
                "detail": o.detail,
            }
            for o in outcomes
            if o.failure
        ][:50],
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['requests']} requests in {result['wall_s']} s "
        f"({result['achieved_rps']} req/s, target {result['rate_rps']}), "
        f"failed {result['failed_requests']} {result['failure_kinds'] or ''}",
        f"latency p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s",
        "RSS MiB (start -> end): "
        + ", ".join(
            f"{name} {_mb(v['rss_start_mb'])} -> {_mb(v['rss_end_mb'])}"
            for name, v in result["processes"].items()
        ),
    ]
    for fault in result["faults"]:
        lines.append(
            f"fault {fault['name']} at {fault['at_s']} s ({fault['detail']}): "
            f"{fault['failed']}/{fault['requests_in_window']} failed in its window "
            f"{fault['failure_kinds'] or ''}, p99 {fault['latency_p99_s']} s"
        )
        passed = {k: v for k, v in fault["checks"].items() if isinstance(v, bool)}
        if passed:
            lines.append(
                "  checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in passed.items())
            )
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "gone" if value is None else f"{value:.0f}"


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.rate <= 0 or args.engines < 2 or args.groups < 1:
        print("bench soak: --duration and --rate must be > 0, --engines >= 2", file=sys.stderr)
        return 2
    result = asyncio.run(soak(args))
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
