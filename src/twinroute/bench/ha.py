"""`twinroute bench ha`: 1, 2 and 3 active-active scheduler replicas on the same engines.

Method:
1. **Workload** as `twinroute bench live` (text prompts from the bundled Mooncake trace, 512-token
   blocks as `--block-words` words), a window that reuses prefixes (`--trace-start-s`).
2. **Per configuration**, fresh `--engines` engine simulators, N `twinroute scheduler` processes
   (dualmap, the engines as a static pool) and one `twinroute router --scheduler A,B,C` that
   rotates picks over them and fails over within its 1 s pick deadline:
   - `1`, `2`, `3`: replicas that share their load (`--peers`, every 20 ms);
   - `3_no_exchange`: three replicas that do not: each sees only its own leases and records
     only its own decisions (what replicas without shared state give you today);
   - `kill`: three sharing replicas; one is killed (SIGKILL) at 35% of the replay and started
     again on the same port at 65%.
3. **Measures**, from the client and the engines as in `bench live`: prefix-cache hit rate,
   SLO attainment, TTFT p50/p90, failed requests; picks per replica (their `/metrics`); picks
   that waited longer than 1 s and the slowest pick's histogram bucket (the router's
   `twinroute_router_pick_seconds`).
4. **Scheduler tier** (`--tier-seconds`): N replicas without a router; this process sends Picks
   (with their Completes) through the replicated client from `--tier-concurrency` callers for
   the given time: Picks/s the tier sustains. On a machine with fewer cores than replicas plus
   the caller, this measures the machine, not the design (the JSON records the core count).

Writes `--json` (`{"replicas": {"1": ..., "2": ..., "3": ..., "3_no_exchange": ...},
"kill": {...}}`) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinroute.bench import command_line
from twinroute.formatting import percent, seconds

CONFIGS = ("1", "2", "3", "3_no_exchange", "kill")
MODEL = "twinroute-sim"
PICK_DEADLINE_S = 1.0
KILL_AT, RESTART_AT = 0.35, 0.65
# The router's pick histogram's bucket bounds (`twinroute_router_pick_seconds`).
PICK_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)} (method in `twinroute bench ha` "
        "module docs)",
    )  # fmt: skip
    parser.add_argument("--engines", type=int, default=4, help="engine simulators")
    parser.add_argument(
        "--duration", type=float, default=40.0, help="seconds of trace replayed per config"
    )
    parser.add_argument(
        "--trace-start-s", type=float, default=900.0,
        help="where in the bundled trace the replayed window starts (seconds)",
    )  # fmt: skip
    parser.add_argument("--ttft-slo-s", type=float, default=5.0, help="TTFT objective, seconds")
    parser.add_argument(
        "--block-words", type=int, default=16, help="words per 512-token trace block"
    )
    parser.add_argument(
        "--max-output-tokens", type=int, default=32, help="cap on each request's output"
    )
    parser.add_argument(
        "--tier-seconds", type=float, default=5.0,
        help="seconds of Picks against 1, 2 and 3 bare replicas (0 = skip the tier part)",
    )  # fmt: skip
    parser.add_argument(
        "--tier-concurrency", type=int, default=64, help="concurrent Pick callers in the tier part"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--out", type=Path, default=Path("results/ha"), help="folder for logs and the JSON"
    )


async def _start_replicas(
    count: int, *, exchange: bool, endpoints: str, slo_s: float, shape: Any, logs: Path,
    label: str, extra: Sequence[str] = (),
) -> tuple[list[Any], list[list[str]]]:  # fmt: skip
    """`count` schedulers on ports chosen here (a replica restarts on its own port)."""
    from twinroute.bench.processes import free_port, start_announced, twinroute_argv

    ports = [free_port() for _ in range(count)]
    metrics = [free_port() for _ in range(count)]
    peers = ",".join(f"127.0.0.1:{port}" for port in ports)
    argvs = [
        twinroute_argv(
            "scheduler",
            f"--listen=127.0.0.1:{port}",
            f"--metrics-listen=127.0.0.1:{metrics_port}",
            "--policy=dualmap",
            f"--model={MODEL}",
            f"--static-endpoints={endpoints}",
            f"--ttft-slo-s={slo_s}",
            f"--key-block-chars={shape.key_block_chars}",
            f"--tokens-per-char={shape.tokens_per_char:.4f}",
            *([f"--peers={peers}"] if exchange and count > 1 else []),
            *extra,
        )
        for port, metrics_port in zip(ports, metrics, strict=True)
    ]
    started = await asyncio.gather(
        *(
            start_announced(f"scheduler-{i}", argv, log_path=str(logs / f"{label}-sched-{i}.log"))
            for i, argv in enumerate(argvs)
        )
    )
    return list(started), argvs


async def _metrics(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return await response.text()


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one series in a Prometheus exposition (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _pick_waits(router_metrics: str) -> dict[str, Any]:
    """Picks the router waited for longer than 1 s, and the slowest pick's bucket bound."""
    name = "twinroute_router_pick_seconds_bucket"
    total = _sample(router_metrics, name, 'le="+Inf"')
    slowest = 0.0
    below = 0.0
    for bound in PICK_BUCKETS:
        count = _sample(router_metrics, name, f'le="{bound}"')
        if count > below:
            slowest = bound
        below = count
    over = total - below
    return {
        "picks": int(total),
        "picks_over_1s": int(over),
        # An upper bound: the histogram's bucket that held the slowest pick; a pick cannot
        # wait past the router's deadline (then it fails open), so over 1 s reads as 1 s.
        "max_pick_gap_s": PICK_DEADLINE_S if over else slowest,
    }


async def run_config(config: str, args: argparse.Namespace, workload: Any) -> dict[str, Any]:
    from twinroute.bench.live import (
        TRACE_BLOCK_TOKENS,
        replay,
        scrape,
        summarize,
        text_shape,
    )
    from twinroute.bench.processes import start_announced, twinroute_argv

    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    count = 3 if config in ("3_no_exchange", "kill") else int(config)
    scale = TRACE_BLOCK_TOKENS // args.block_words
    engines = await asyncio.gather(
        *(
            start_announced(
                f"engine-{i}",
                twinroute_argv(
                    "engine-sim",
                    "--port=0",
                    f"--model={MODEL}",
                    f"--block-size={args.block_words}",
                    f"--token-scale={scale}",
                    f"--instance-id=engine-{i}",
                ),
                log_path=str(logs / f"{config}-engine-{i}.log"),
            )
            for i in range(args.engines)
        )
    )
    processes: list[Any] = list(engines)
    # Stopped from this list, not from `processes`: a replica restarted under load replaces
    # its entry here, and the restarted process must be stopped too.
    schedulers: list[Any] = []
    chaos: asyncio.Task[None] | None = None
    try:
        urls = [e.url for e in engines]
        endpoints = ",".join(f"engine-{i}={u.removeprefix('http://')}" for i, u in enumerate(urls))
        shape = text_shape(workload, token_scale=scale)
        schedulers, argvs = await _start_replicas(
            count, exchange=config != "3_no_exchange", endpoints=endpoints,
            slo_s=args.ttft_slo_s, shape=shape, logs=logs, label=config,
        )  # fmt: skip
        router = await start_announced(
            "router",
            twinroute_argv(
                "router",
                "--port=0",
                f"--model={MODEL}",
                f"--endpoints={endpoints}",
                f"--tokens-per-char={shape.tokens_per_char:.4f}",
                "--scheduler=" + ",".join(s.address for s in schedulers),
                f"--scheduler-timeout-s={PICK_DEADLINE_S}",
            ),
            log_path=str(logs / f"{config}-router.log"),
        )
        processes.append(router)
        events: list[dict[str, Any]] = []
        chaos = (
            asyncio.create_task(_kill_and_restart(schedulers, argvs, args, logs, events))
            if config == "kill"
            else None
        )
        before = await scrape(urls)
        result = await replay(url=router.url, workload=workload, timeout_s=300.0)
        after = await scrape(urls)
        if chaos is not None:
            await chaos
        router_metrics = await _metrics(router.url)
        picks_per_replica = []
        for argv in argvs:
            metrics_url = "http://" + next(
                a.split("=", 1)[1] for a in argv if a.startswith("--metrics-listen=")
            )
            text = await _metrics(metrics_url)
            picks_per_replica.append(
                int(_sample(text, "twinroute_scheduler_pick_duration_seconds_count"))
            )
    finally:
        if chaos is not None and not chaos.done():
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
        await asyncio.gather(
            *(p.stop() for p in [*reversed(processes), *schedulers]), return_exceptions=True
        )
    figures = summarize(result, before=before, after=after, slo_s=args.ttft_slo_s)
    return {
        "replicas": count,
        "exchange": config != "3_no_exchange",
        "requests": figures["requests"],
        "failed_requests": figures["errors"],
        "error_samples": figures["error_samples"],
        "hit_rate": figures["cache_hit_rate"],
        "slo_attainment": figures["slo_attainment"],
        "ttft_p50_s": figures["ttft_p50_s"],
        "ttft_p90_s": figures["ttft_p90_s"],
        "max_over_mean_load": figures["max_over_mean_load"],
        # Picks each replica served in this run (a restarted one counts since its restart).
        "picks_per_replica": picks_per_replica,
        "events": events,
        **_pick_waits(router_metrics),
    }


async def _kill_and_restart(
    schedulers: list[Any], argvs: list[list[str]], args: argparse.Namespace, logs: Path,
    events: list[dict[str, Any]],
) -> None:  # fmt: skip
    from twinroute.bench.processes import start_announced

    started = time.monotonic()
    await asyncio.sleep(args.duration * KILL_AT)
    victim = schedulers[1]
    victim.kill()
    events.append({"at_s": round(time.monotonic() - started, 2), "event": "SIGKILL replica 1"})
    await asyncio.sleep(args.duration * (RESTART_AT - KILL_AT))
    schedulers[1] = await start_announced(
        "scheduler-1", argvs[1], log_path=str(logs / "kill-sched-1-restarted.log")
    )
    events.append({"at_s": round(time.monotonic() - started, 2), "event": "replica 1 restarted"})


async def tier_rate(count: int, args: argparse.Namespace, workload: Any) -> dict[str, Any]:
    """Picks/s of `count` bare replicas (static pool, sharing load), Completes included."""
    from twinroute.bench.live import TRACE_BLOCK_TOKENS, text_shape
    from twinroute.bench.scheduler_pick import cpu_seconds
    from twinroute.scheduler.api import PickQuery
    from twinroute.scheduler.client import ReplicatedSchedulerClient

    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    endpoints = ",".join(f"engine-{i}=127.0.0.1:{20000 + i}" for i in range(args.engines))
    shape = text_shape(workload, token_scale=TRACE_BLOCK_TOKENS // args.block_words)
    schedulers, _ = await _start_replicas(
        count, exchange=True, endpoints=endpoints, slo_s=args.ttft_slo_s, shape=shape,
        logs=logs, label=f"tier{count}",
        # No engines behind these addresses: scraping them would mark every one unhealthy.
        extra=["--scrape-interval-s=0"],
    )  # fmt: skip
    client = ReplicatedSchedulerClient(targets=[s.address for s in schedulers], timeout_s=5.0)
    prompts = [workload.prompt(i) for i in range(min(len(workload), 256))]
    done = 0
    failed = 0
    try:
        deadline = time.monotonic() + args.tier_seconds

        async def caller(offset: int) -> None:
            nonlocal done, failed
            index = offset
            while time.monotonic() < deadline:
                query = PickQuery(
                    request_id=f"t{offset}-{index}", model=MODEL,
                    text=prompts[index % len(prompts)], expected_output_tokens=16,
                )  # fmt: skip
                index += args.tier_concurrency
                try:
                    placement = await client.pick(query)
                    await placement.complete("success")
                    done += 1
                except Exception as error:
                    failed += 1
                    if failed == 1:
                        print(f"  tier: a pick failed: {type(error).__name__}: {error}",
                              flush=True)  # fmt: skip

        pids = [s.process.pid for s in schedulers]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        own_before = time.process_time()
        started = time.monotonic()
        await asyncio.gather(*(caller(i) for i in range(args.tier_concurrency)))
        elapsed = time.monotonic() - started
        replica_cpu = [cpu_seconds(pid) - b for pid, b in zip(pids, cpu_before, strict=True)]
        caller_cpu = time.process_time() - own_before
    finally:
        await client.close()
        await asyncio.gather(*(s.stop() for s in schedulers), return_exceptions=True)
    return {
        "picks_per_s": done / elapsed if elapsed else 0.0,
        "tier_failed_picks": failed,
        # Who was busy: each replica's CPU share of the run, and the calling process's (one
        # Python process can only drive so many Picks; on 2 cores it is the limit).
        "tier_replica_cpu_share": [round(c / elapsed, 3) for c in replica_cpu],
        "tier_caller_cpu_share": round(caller_cpu / elapsed, 3),
        "tier_cpu_ms_per_pick": round(1000 * (sum(replica_cpu)) / done, 3) if done else None,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| config | hit rate | within SLO | TTFT p50 | TTFT p90 | failed | picks > 1 s "
        "| picks per replica | tier Picks/s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    rows = {**results["replicas"], "kill": results.get("kill")}
    for name, r in rows.items():
        if r is None:
            continue
        tier = r.get("picks_per_s")
        lines.append(
            f"| {name} | {percent(r['hit_rate'])} | {percent(r['slo_attainment'])} "
            f"| {seconds(r['ttft_p50_s'])} | {seconds(r['ttft_p90_s'])} | {r['failed_requests']} "
            f"| {r['picks_over_1s']} | {' / '.join(map(str, r['picks_per_replica']))} "
            f"| {'-' if tier is None else f'{tier:,.0f}'} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from twinroute.bench.live import _default_trace, load_workload

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        print(f"bench ha: unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workload = load_workload(
        trace=_default_trace(), duration_s=args.duration, speedup=1.0,
        block_words=args.block_words, max_output=args.max_output_tokens,
        start_s=args.trace_start_s,
    )  # fmt: skip
    print(
        f"bench ha: {len(workload)} requests over {args.duration:g} s from trace second "
        f"{args.trace_start_s:g}, {args.engines} engines, configs {', '.join(configs)}",
        flush=True,
    )
    results: dict[str, Any] = {
        "command": command_line(),
        "cpu_cores": os.cpu_count(),
        "requests": len(workload),
        "engines": args.engines,
        "slo_s": args.ttft_slo_s,
        "trace_start_s": args.trace_start_s,
        "duration_s": args.duration,
        "replicas": {},
    }
    for index, config in enumerate(configs, start=1):
        print(f"  [{index}/{len(configs)}] {config} ...", flush=True)
        row = asyncio.run(run_config(config, args, workload))
        if config == "kill":
            results["kill"] = row
        else:
            results["replicas"][config] = row
        print(
            f"  [{index}/{len(configs)}] {config}: hit {row['hit_rate'] or 0:.1%}, within SLO "
            f"{row['slo_attainment']:.1%}, failed {row['failed_requests']}, picks over 1 s "
            f"{row['picks_over_1s']}, per replica {row['picks_per_replica']}",
            flush=True,
        )
    if args.tier_seconds > 0:
        for config, row in results["replicas"].items():
            if config in ("1", "2", "3"):
                print(f"  tier: {config} replica(s), {args.tier_seconds:g} s of Picks ...",
                      flush=True)  # fmt: skip
                row.update(asyncio.run(tier_rate(int(config), args, workload)))
                print(f"  tier: {config}: {row['picks_per_s']:,.0f} Picks/s", flush=True)
    print(table(results))
    text = json.dumps(results, indent=1, default=_json_default)
    (args.out / "ha.json").write_text(text + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(f"wrote {args.out / 'ha.json'}" + (f" and {args.json}" if args.json else ""))
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
