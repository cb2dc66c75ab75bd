"""`twinroute bench elastic --live`: the elasticity scenario with real processes.

Per policy, on fresh processes: `--initial + --added` engine-sims (the modelled GPU of
`--profile`, replayed at `--time-scale`), one `twinroute scheduler` whose `--endpoints-file`
first lists only `--initial` of them, and one `twinroute router` in front. The trace's text
prompts (as in `bench live`) are replayed open-loop while a controller:
- at `--scale-out-at` rewrites the endpoints file with every engine (the scheduler re-reads it
  on change, as it would see new pods) and waits until the scheduler lists them routable;
- at `--scale-in-at` drains the newest `--removed` engines with the operator's own `Drainer`
  (the scheduler's Drain RPC: no new picks, queued requests it still holds moved, wait for the
  leases to close within `--drain-deadline`), then removes them from the file and stops them
  (the pod going away);
- every `--window` seconds reads the engines' prefix-cache counters and the scheduler's
  ListEndpoints (routable count).

Keys remapped are computed from the scheduler's own key function for text prompts and its
rings (seed 0, `--virtual-nodes`), over the routable sets the scheduler reported before and
after each change. Failed requests = client-side errors or streams that end without [DONE].
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from twinroute.bench.elastic_report import (
    COMPARE_WINDOWS,
    RECORDED_RATE_RPS,
    ElasticPlan,
    KeyLog,
    Samples,
    build_report,
    clean,
    fmt,
    phase_report,
    plan_from,
    remaps_of,
    trace_path,
    windows,
    write_report,
)
from twinroute.bench.live import (
    MODEL,
    TRACE_BLOCK_TOKENS,
    TextShape,
    Workload,
    load_workload,
    replay,
    scrape,
    text_shape,
)
from twinroute.bench.processes import ServerProcess, start_announced, twinroute_argv
from twinroute.scheduler.client import SchedulerClient
from twinroute.vocabulary import DecisionReason

DEFAULT_LIVE_POLICIES = "dualmap,round_robin"


def live_workload(args: argparse.Namespace, plan: ElasticPlan, *, duration_s: float) -> Workload:
    """The trace at `plan.rate_rps`, slowed to `scale_in_load` of it after the scale-in."""
    speedup = plan.rate_rps / RECORDED_RATE_RPS
    before = min(duration_s, plan.scale_in_at_s)
    # Trace time (after the speedup) that the slowed tail needs to fill the rest.
    needed = before + max(0.0, duration_s - plan.scale_in_at_s) * plan.scale_in_load
    workload = load_workload(
        trace=trace_path(args),
        duration_s=needed,
        speedup=speedup,
        block_words=args.block_words,
        max_output=args.max_output_tokens,
    )
    arrival = workload.arrival_s
    late = arrival > plan.scale_in_at_s
    warped = np.where(
        late, plan.scale_in_at_s + (arrival - plan.scale_in_at_s) / plan.scale_in_load, arrival
    )
    if args.max_requests is not None:
        count = min(len(workload), args.max_requests)
        return dataclasses.replace(
            workload,
            arrival_s=warped[:count],
            prompt_words=workload.prompt_words[:count],
            output_tokens=workload.output_tokens[:count],
            block_offsets=workload.block_offsets[: count + 1],
        )
    return dataclasses.replace(workload, arrival_s=warped)


def _endpoints_yaml(engines: list[ServerProcess], ids: list[str]) -> str:
    lines = ["endpoints:"]
    by_id = {e.name: e for e in engines}
    for endpoint_id in ids:
        lines.append(f"  - id: {endpoint_id}")
        lines.append(f"    address: {by_id[endpoint_id].address}")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text, encoding="utf-8")
    scratch.replace(path)


async def _routable(client: SchedulerClient) -> list[str]:
    statuses = await client.list_endpoints(model="")
    return sorted(status.endpoint.id for status in statuses if status.routable)


async def _wait_routable(client: SchedulerClient, wanted: set[str], *, timeout_s: float) -> float:
    """Seconds until the scheduler routes to exactly `wanted`."""
    started = time.monotonic()
    while set(await _routable(client)) != wanted:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the scheduler did not converge on {sorted(wanted)}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


class _LiveRun:
    """One policy's live run: engines, scheduler and router as processes, the trace replayed
    through the router while a control task scales out and in on the plan's schedule and a
    sampler reads the engines' prefix-cache counters every window."""

    def __init__(
        self, policy: str, *, args: argparse.Namespace, plan: ElasticPlan, workload: Workload
    ) -> None:
        self.policy = policy
        self.args = args
        self.plan = plan
        self.workload = workload
        self.logs = args.out / "logs"
        self.scale = TRACE_BLOCK_TOKENS // args.block_words
        self.total = plan.initial + plan.added
        self.ids = [f"engine-{i}" for i in range(self.total)]
        self.endpoints_file = args.out / f"{policy}-endpoints.yaml"
        self.engines: list[ServerProcess] = []
        self.processes: list[ServerProcess] = []
        self.stopped: set[str] = set()
        self.samples: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self.scheduler_address = ""
        self.started = 0.0

    async def start(self) -> tuple[ServerProcess, SchedulerClient]:
        """The processes, the scheduler routing to the initial engines; (router, client)."""
        args, policy = self.args, self.policy
        self.logs.mkdir(parents=True, exist_ok=True)
        engine_args = [
            "--port=0",
            f"--model={MODEL}",
            "--profile=llama3-8b-h100",
            f"--block-size={args.block_words}",
            f"--token-scale={self.scale}",
            f"--time-scale={args.time_scale}",
        ]
        if args.kv_capacity_tokens:
            engine_args.append(f"--kv-capacity-tokens={args.kv_capacity_tokens}")
        self.engines = list(
            await asyncio.gather(
                *(
                    start_announced(
                        endpoint_id,
                        twinroute_argv("engine-sim", *engine_args, f"--instance-id={endpoint_id}"),
                        log_path=str(self.logs / f"{policy}-{endpoint_id}.log"),
                    )
                    for endpoint_id in self.ids
                )
            )
        )
        self.processes = list(self.engines)
        _write_atomically(
            self.endpoints_file, _endpoints_yaml(self.engines, self.ids[: self.plan.initial])
        )
        shape: TextShape = text_shape(self.workload, token_scale=self.scale)
        scheduler = await start_announced(
            f"{policy}-scheduler",
            twinroute_argv(
                "scheduler",
                "--listen=127.0.0.1:0",
                "--metrics-listen=",
                f"--policy={policy}",
                f"--model={MODEL}",
                f"--endpoints-file={self.endpoints_file}",
                f"--ttft-slo-s={self.plan.ttft_slo_s}",
                f"--key-block-chars={shape.key_block_chars}",
                f"--tokens-per-char={shape.tokens_per_char:.4f}",
                f"--virtual-nodes={args.virtual_nodes}",
                f"--admission-hold={args.admission_hold}",
            ),
            log_path=str(self.logs / f"{policy}-scheduler.log"),
        )
        self.processes.append(scheduler)
        self.scheduler_address = scheduler.address
        router = await start_announced(
            f"{policy}-router",
            twinroute_argv(
                "router",
                "--port=0",
                f"--model={MODEL}",
                f"--scheduler={scheduler.address}",
                f"--tokens-per-char={shape.tokens_per_char:.4f}",
            ),
            log_path=str(self.logs / f"{policy}-router.log"),
        )
        self.processes.append(router)
        client = SchedulerClient(target=scheduler.address, timeout_s=5.0)
        await _wait_routable(client, set(self.ids[: self.plan.initial]), timeout_s=30.0)
        return router, client

    async def sample(self, client: SchedulerClient) -> None:
        live = [e for e in self.engines if e.name not in self.stopped]
        values = await scrape([e.url for e in live])
        self.samples.append(
            {
                "t_s": time.monotonic() - self.started,
                "counters": dict(zip([e.name for e in live], values, strict=True)),
                "routable": len(await _routable(client)),
            }
        )

    async def sampler(self, client: SchedulerClient) -> None:
        while True:
            await self.sample(client)
            await asyncio.sleep(self.plan.window_s)

    async def _until(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, self.started + at_s - time.monotonic()))

    async def scale_out(self, client: SchedulerClient) -> None:
        """Every engine into the endpoints file; wait until the scheduler routes to them."""
        await self._until(self.plan.scale_out_at_s)
        before = await _routable(client)
        await self.sample(client)
        at = time.monotonic() - self.started
        _write_atomically(self.endpoints_file, _endpoints_yaml(self.engines, self.ids))
        took = await _wait_routable(client, set(self.ids), timeout_s=30.0)
        after = await _routable(client)
        await self.sample(client)
        self.changes.append(
            {
                "kind": "change",
                "at_s": at,
                "routable_before": before,
                "routable_after": after,
                "applied_after_s": took,
            }
        )
        _progress(
            self.args,
            f"{self.policy}: scale-out at {at:.1f} s, {len(after)} routable after {took:.1f} s",
        )

    async def scale_in(self, client: SchedulerClient) -> None:
        """Drain the newest engines as the operator does, then take them out and stop them."""
        from twinroute.operator.drain import Drainer

        plan, ids, total = self.plan, self.ids, self.total
        await self._until(plan.scale_in_at_s)
        before = await _routable(client)
        await self.sample(client)
        at = time.monotonic() - self.started
        leaving = ids[total - plan.removed :]
        drained = await asyncio.to_thread(
            Drainer().drain,
            endpoint_ids=leaving,
            scheduler_addresses=[self.scheduler_address],
            timeout_s=plan.drain_deadline_s,
        )
        drain_s = time.monotonic() - self.started - at
        after = await _routable(client)
        await self.sample(client)
        # What Drain moved, as the scheduler's Explain records it.
        moved = sum(
            record.decision.reason is DecisionReason.DRAINED
            for record in await client.explain(limit=1024)
        )
        # The pods go: out of the file, then stopped (what is left on them would fail).
        remaining = ids[: total - plan.removed]
        _write_atomically(self.endpoints_file, _endpoints_yaml(self.engines, remaining))
        await _wait_routable(client, set(remaining), timeout_s=30.0)
        await self.sample(client)
        for engine in self.engines:
            if engine.name in leaving:
                self.stopped.add(engine.name)
                await engine.stop()
        self.changes.append(
            {
                "kind": "change",
                "at_s": at,
                "routable_before": before,
                "routable_after": after,
                "drain_s": drain_s,
                "queued_moved": moved,
                "drain": [
                    {
                        "endpoint": r.endpoint_id,
                        "drained": r.drained,
                        "remaining_in_flight": r.remaining_in_flight,
                        "error": r.error,
                    }
                    for r in drained
                ],
            }
        )
        done = sum(r.drained for r in drained)
        _progress(
            self.args,
            f"{self.policy}: scale-in at {at:.1f} s, drained {done}/{len(drained)} "
            f"in {drain_s:.1f} s",
        )

    async def run(self) -> dict[str, Any]:
        client: SchedulerClient | None = None
        try:
            router, client = await self.start()
            self.started = time.monotonic()
            sampler_task = asyncio.create_task(self.sampler(client))

            async def control(client: SchedulerClient) -> None:
                await self.scale_out(client)
                await self.scale_in(client)

            control_task = asyncio.create_task(control(client))
            result = await replay(
                url=router.url,
                workload=self.workload,
                timeout_s=self.args.request_timeout,
                progress_every_s=10.0 if not self.args.quiet else 1e9,
            )
            await control_task
            sampler_task.cancel()
            await asyncio.gather(sampler_task, return_exceptions=True)
            await self.sample(client)
        finally:
            if client is not None:
                await client.close()
            await asyncio.gather(*(p.stop() for p in reversed(self.processes)))
        return _summarize(
            self.policy,
            plan=self.plan,
            workload=self.workload,
            result=result,
            samples=self.samples,
            changes=self.changes,
            errors=result.error_samples,
        )


async def run_live_policy(
    policy: str, *, args: argparse.Namespace, plan: ElasticPlan, workload: Workload
) -> dict[str, Any]:
    return await _LiveRun(policy, args=args, plan=plan, workload=workload).run()


def _hit_rate_between(samples: list[dict[str, Any]], start: float, end: float) -> float | None:
    """Engine prefix-cache hit rate between the samples nearest the window's edges (the last
    one taken by `start`, the first one taken from `end` on; samples come every window)."""
    slack = 0.5
    before = [s for s in samples if s["t_s"] <= start + slack]
    after = [s for s in samples if s["t_s"] >= end - slack]
    base = before[-1] if before else (samples[0] if samples else None)
    top = after[0] if after else (samples[-1] if samples else None)
    if base is None or top is None or top["t_s"] <= base["t_s"]:
        return None
    first, last = base["counters"], top["counters"]
    queries = hits = 0.0
    for name, values in last.items():
        base = first.get(name, {"queries": 0.0, "hits": 0.0})
        queries += values["queries"] - base["queries"]
        hits += values["hits"] - base["hits"]
    return hits / queries if queries > 0 else None


def _summarize(
    policy: str,
    *,
    plan: ElasticPlan,
    workload: Workload,
    result: Any,
    samples: list[dict[str, Any]],
    changes: list[dict[str, Any]],
    errors: list[str],
) -> dict[str, Any]:
    ttft = np.asarray(result.ttft_s, dtype=np.float64)
    # Hit rates live come from the engines; per request there is none, so the windowed table
    # takes them from the counters (by wall time) instead of per-request cached tokens.
    samples_by_request = Samples(
        arrival_s=workload.arrival_s,
        ttft_s=ttft,
        prompt_tokens=np.zeros(len(workload)),
        cached_tokens=np.zeros(len(workload)),
    )
    end = float(workload.arrival_s[-1]) if len(workload) else plan.scale_in_at_s
    phases = phase_report(samples_by_request, phases=plan.phases(end), slo_s=plan.ttft_slo_s)
    for phase in phases:
        phase["cache_hit_rate"] = _hit_rate_between(samples, phase["start_s"], phase["end_s"])
    rows = windows(samples_by_request, window_s=plan.window_s, slo_s=plan.ttft_slo_s)
    for row in rows:
        row["cache_hit_rate"] = _hit_rate_between(
            samples, row["start_s"], row["start_s"] + plan.window_s
        )
    for change in changes:
        at = float(change["at_s"])
        change["members_before"] = change["routable_before"]
        change["members_after"] = change["routable_after"]
        change["cache_hit_rate_before"] = _hit_rate_between(samples, at - plan.window_s, at)
        change["cache_hit_rate_after"] = _hit_rate_between(samples, at, at + plan.window_s)
        wide = COMPARE_WINDOWS * plan.window_s
        change[f"cache_hit_rate_before_{COMPARE_WINDOWS}w"] = _hit_rate_between(
            samples, at - wide, at
        )
        change[f"cache_hit_rate_after_{COMPARE_WINDOWS}w"] = _hit_rate_between(
            samples, at, at + wide
        )
    return {
        "policy": policy,
        "requests": len(workload),
        "failed_requests": int(result.errors),
        "error_samples": errors,
        "slo_attainment": float(np.mean(ttft <= plan.ttft_slo_s)) if ttft.size else None,
        "ttft_p50_s": float(np.nanpercentile(ttft, 50)) if np.isfinite(ttft).any() else None,
        "ttft_p90_s": float(np.nanpercentile(ttft, 90)) if np.isfinite(ttft).any() else None,
        "cache_hit_rate": _hit_rate_between(samples, 0.0, 1e12),
        "wall_s": result.wall_s,
        "phases": phases,
        "windows": rows,
        "changes": changes,
        "instances_over_time": {
            "t_s": [s["t_s"] for s in samples],
            "instances": [s["routable"] for s in samples],
        },
    }


def _progress(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(f"  {line}", file=sys.stderr, flush=True)


def live_remaps(
    workload: Workload, changes: list[dict[str, Any]], *, args: argparse.Namespace
) -> list[Any]:
    """Keys remapped, from the scheduler's text keys of the prompts sent before each change."""
    from twinroute.scheduler.keys import keys_from_text, namespace_seed

    shape = text_shape(workload, token_scale=TRACE_BLOCK_TOKENS // args.block_words)
    seed = namespace_seed(model=MODEL)
    log = KeyLog()
    for index in range(len(workload)):
        keys = keys_from_text(workload.prompt(index), block_chars=shape.key_block_chars, seed=seed)
        log.add(float(workload.arrival_s[index]), np.asarray(keys.block_hashes, np.uint64))
    return remaps_of(log, changes, virtual_nodes=args.virtual_nodes, seed=0)


async def _run_all(args: argparse.Namespace) -> int:
    plan = plan_from(args, live=True)
    names = [p.strip() for p in (args.policies or DEFAULT_LIVE_POLICIES).split(",") if p.strip()]
    duration = args.duration if args.duration is not None else plan.scale_in_at_s + 20.0
    workload = live_workload(args, plan, duration_s=duration)
    _progress(
        args, f"{len(workload)} requests over {duration:.0f} s per policy: {', '.join(names)}"
    )
    started = time.perf_counter()
    policies: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names, start=1):
        row = await run_live_policy(name, args=args, plan=plan, workload=workload)
        policies[name] = row
        phases = ", ".join(fmt(p["slo_attainment"], ".1%") for p in row["phases"])
        _progress(
            args,
            f"[{index}/{len(names)}] {name}: SLO met per phase {phases}, failed "
            f"{row['failed_requests']} ({time.perf_counter() - started:.0f} s total)",
        )
    first = next(iter(policies.values()))
    remaps = live_remaps(workload, first["changes"], args=args)
    report = build_report(
        mode="live",
        plan=plan,
        policies=policies,
        remaps=remaps,
        command="twinroute bench elastic " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else []),
        trace=str(trace_path(args)),
        extra={
            "wall_s": time.perf_counter() - started,
            "engine_time_scale": args.time_scale,
            "remap_keys_from": "the scheduler's text keys (keys_from_text) of the prompts sent",
        },
    )
    write_report(clean(report), args, stem="elastic-live")
    return 0 if report["failed_requests"] == 0 else 1


def run_live(args: argparse.Namespace) -> int:
    result: int = asyncio.run(_run_all(args))
    return result
