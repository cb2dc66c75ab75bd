"""Migration on drain: what scale-in costs the clients whose streams run on the leaving engine.

Setup (real processes on 127.0.0.1): `--engines` engine simulators (Llama-3-8B on H100 profile,
real time), `twinroute scheduler` (round robin, admin token) and `twinroute router` in front.
An open-loop client sends `--rate` streamed completions per second for `--duration` seconds
(`--max-tokens` each). At `--drain-at` seconds the operator's `Drain` RPC takes one engine out
(deadline `--drain-timeout`), as scale-in does. The same run is made three times:
- `migration off`: Drain waits for the streams on the engine to finish there;
- `migration drain`: the scheduler orders the router to migrate every stream on the engine by
  recompute (stock vLLM's path) and Drain returns once they moved.
- `migration hooks`: the engines serve the MigrationHook and the scheduler moves the streams'
  KV (live migration, the engine simulator's path): the GPU work moves at once, but the
  source keeps forwarding the streams it holds, so Drain still waits for them to end.

Reported per run: requests sent / failed (an HTTP error, an error event, a missing [DONE], or
fewer tokens than max_tokens); how long Drain took and whether it drained; for the streams
running on the drained engine at the drain, the largest gap between two tokens after the drain
(the splice pause when migrated) as p50 / max, next to the same figure for streams elsewhere in
the same window; the router's migration counters.

Run:  twinroute bench migration-drain --json benchmarks/migration.json \
          --plot benchmarks/migration.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from twinroute.bench import command_line
from twinroute.bench.processes import ServerProcess, free_port, start_announced, twinroute_argv
from twinroute.scheduler.client import SchedulerClient

MODEL = "twinroute-sim"
TOKEN = "bench-admin-token"


@dataclass
class StreamRecord:
    started: float
    endpoint: str = ""
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: int = 0
    ids: set[str] = field(default_factory=set)
    error: str = ""

    def ok(self, max_tokens: int) -> bool:
        return (
            not self.error and self.done == 1 and self.tokens == max_tokens and len(self.ids) == 1
        )

    def gap_after(self, moment: float) -> float | None:
        """Largest gap between tokens that ends after `moment`; None when none does."""
        times = np.asarray(self.token_times)
        if len(times) < 2:
            return None
        gaps = np.diff(times)
        after = gaps[times[1:] > moment]
        return float(after.max()) if len(after) else None


async def one_stream(
    session: aiohttp.ClientSession, router: str, record: StreamRecord, *, max_tokens: int, n: int
) -> None:
    body = {
        "model": MODEL,
        "prompt": f"request {n} " + "tell me a long story " * 60,
        "max_tokens": max_tokens,
        "stream": True,
    }
    try:
        async with session.post(f"http://{router}/v1/completions", json=body) as response:
            record.endpoint = response.headers.get("x-twinroute-endpoint", "")
            if response.status != 200:
                record.error = f"HTTP {response.status}"
                return
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    record.done += 1
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    record.error = str(payload["error"].get("message", "error event"))
                    continue
                record.ids.add(str(payload.get("id")))
                for choice in payload.get("choices", []):
                    if choice.get("text"):
                        record.tokens += 1
                        record.token_times.append(time.monotonic())
    except (aiohttp.ClientError, TimeoutError) as error:
        record.error = f"{type(error).__name__}: {error}"


async def scrape_counter(session: aiohttp.ClientSession, url: str, prefix: str) -> dict[str, float]:
    async with session.get(url) as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def run_once(args: argparse.Namespace, *, migration: str, logs: Path) -> dict[str, Any]:
    processes: list[ServerProcess] = []
    token_file = logs / "admin-token"
    token_file.write_text(TOKEN)
    try:
        engines = []
        hooks = {f"e{index}": f"127.0.0.1:{free_port()}" for index in range(args.engines)}
        for index in range(args.engines):
            argv = twinroute_argv(
                "engine-sim", "--port", "0", "--model", MODEL,
                "--instance-id", f"e{index}", "--time-scale", str(args.time_scale),
            )  # fmt: skip
            if migration == "hooks":
                argv += ["--migration-port", hooks[f"e{index}"].rpartition(":")[2]]
            engine = await start_announced(
                f"engine-{index}", argv, log_path=str(logs / f"engine-{index}-{migration}.log")
            )
            processes.append(engine)
            engines.append(engine)
        static = ",".join(f"e{i}={e.address}" for i, e in enumerate(engines))
        argv = twinroute_argv(
            "scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--policy", "round_robin", "--static-endpoints", static, "--model", MODEL,
            "--admin-token", TOKEN, "--migration", "off" if migration == "off" else "drain",
            "--scrape-interval-s", "0",
        )  # fmt: skip
        if migration == "hooks":
            argv += ["--migration-hooks", ",".join(f"{k}={v}" for k, v in hooks.items())]
        scheduler = await start_announced(
            "scheduler", argv, log_path=str(logs / f"scheduler-{migration}.log")
        )
        processes.append(scheduler)
        argv = twinroute_argv(
            "router", "--port", "0", "--model", MODEL, "--scheduler", scheduler.address,
            "--scheduler-token-file", str(token_file),
            "--migration", "on" if migration == "drain" else "off",
        )  # fmt: skip
        router = await start_announced(
            "router", argv, log_path=str(logs / f"router-{migration}.log")
        )
        processes.append(router)
        await asyncio.sleep(1.0)  # the router subscribes to migration orders

        records: list[StreamRecord] = []
        tasks: list[asyncio.Task[None]] = []
        drain_info: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            start = time.monotonic()

            async def drain() -> None:
                await asyncio.sleep(args.drain_at)
                client = SchedulerClient(target=scheduler.address, admin_token=TOKEN, timeout_s=5)
                drain_info["at"] = time.monotonic()
                result = await client.drain(endpoint_id="e0", timeout_s=args.drain_timeout)
                drain_info["took_s"] = time.monotonic() - drain_info["at"]
                drain_info["drained"] = result.drained
                drain_info["remaining"] = result.remaining_in_flight
                await client.close()

            drain_task = asyncio.create_task(drain())
            n = 0
            while (now := time.monotonic()) - start < args.duration:
                record = StreamRecord(started=now)
                records.append(record)
                tasks.append(
                    asyncio.create_task(
                        one_stream(session, router.address, record, max_tokens=args.max_tokens, n=n)
                    )
                )
                n += 1
                await asyncio.sleep(1.0 / args.rate)
            await drain_task
            await asyncio.gather(*tasks)
            counters = await scrape_counter(
                session, f"{router.url}/metrics", "twinroute_router_migration"
            )
    finally:
        for process in reversed(processes):
            await process.stop()
    moment = drain_info["at"]
    failed = [r for r in records if not r.ok(args.max_tokens)]
    # Streams that ran on the drained engine when the drain came.
    on_drained = [
        r
        for r in records
        if r.endpoint == "e0" and r.token_times and r.started < moment < r.token_times[-1]
    ]
    elsewhere = [
        r
        for r in records
        if r.endpoint != "e0" and r.token_times and r.started < moment < r.token_times[-1]
    ]

    def gaps(rows: list[StreamRecord]) -> list[float]:
        return [g for r in rows if (g := r.gap_after(moment)) is not None]

    drained_gaps = gaps(on_drained)
    other_gaps = gaps(elsewhere)
    return {
        "migration": migration,
        "requests": len(records),
        "failed": len(failed),
        "failures": [r.error or f"{r.tokens} tokens, {r.done} [DONE]" for r in failed][:10],
        "drain_s": drain_info["took_s"],
        "drained": drain_info["drained"],
        "remaining_in_flight": drain_info["remaining"],
        "streams_on_drained_engine": len(on_drained),
        "max_gap_on_drained_s": drained_gaps,
        "max_gap_elsewhere_s": other_gaps,
        "router_counters": counters,
    }


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    array = np.asarray(values) * 1000
    return f"{np.percentile(array, 50):.0f} / {array.max():.0f}"


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    data, labels = [], []
    for result in results:
        for key, where in (("max_gap_on_drained_s", "drained engine"),
                           ("max_gap_elsewhere_s", "other engines")):  # fmt: skip
            data.append(np.asarray(result[key] or [0.0]) * 1000)
            labels.append(f"migration {result['migration']}\n{where}")
    axes.boxplot(data, showfliers=True)
    axes.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    axes.set_ylabel("largest token gap after the drain (ms)")
    axes.set_title("Streams running at the drain: pause seen by the client")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


async def run_all(args: argparse.Namespace, *, logs: Path) -> list[dict[str, Any]]:
    results = []
    for migration in ("off", "drain", "hooks"):
        print(f"run: migration {migration} ...", flush=True)
        results.append(await run_once(args, migration=migration, logs=logs))
    return results


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="twinroute-migration-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run_all(args, logs=logs))
    header = (
        f"{'migration':<10} {'requests':>8} {'failed':>6} {'drain s':>8} {'drained':>7} "
        f"{'on e0':>5} {'gap e0 p50/max ms':>18} {'gap others p50/max ms':>22}"
    )
    print(header)
    for r in results:
        print(
            f"{r['migration']:<10} {r['requests']:>8} {r['failed']:>6} {r['drain_s']:>8.2f} "
            f"{r['drained']!s:>7} {r['streams_on_drained_engine']:>5} "
            f"{summary(r['max_gap_on_drained_s']):>18} {summary(r['max_gap_elsewhere_s']):>22}"
        )
    for r in results:
        for name, value in sorted(r["router_counters"].items()):
            if name.startswith("twinroute_router_migrations_total") or name.startswith(
                "twinroute_scheduler_migrations_"
            ):
                print(f"  [{r['migration']}] {name} {value:.0f}")
        for failure in r["failures"]:
            print(f"  [{r['migration']}] failed: {failure}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"command": command_line(), "args": _jsonable(vars(args)), "runs": results},
                indent=2,
            )
        )
    if args.plot:
        plot(results, Path(args.plot))
    return 0 if all(r["failed"] == 0 for r in results) else 1


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The arguments as recorded (the subcommand dispatch's own entries left out)."""
    return {k: v for k, v in values.items() if isinstance(v, str | int | float | bool | None)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", type=int, default=3, help="engine-sim processes")
    parser.add_argument("--rate", type=float, default=4.0, help="streams per second")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals")
    parser.add_argument("--max-tokens", type=int, default=500, help="tokens streamed per request")
    parser.add_argument(
        "--time-scale", type=float, default=1.0,
        help="engine-sim --time-scale: wall seconds per modelled second",
    )  # fmt: skip
    parser.add_argument("--drain-at", type=float, default=4.0, help="seconds into the run")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0,
        help="deadline of the Drain RPC, seconds: how long it may wait for the engine to empty",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--plot", metavar="PNG", help="write a PNG here")
    parser.add_argument(
        "--logs", metavar="DIR",
        help="keep the servers' logs in this folder (default: a temporary one, deleted)",
    )  # fmt: skip
