"""`twinroute bench elastic`: DualMap's elasticity experiment, simulated or live.

Scenario: a pool of `--initial` instances is overloaded; at `--scale-out-at` `--added`
instances join; at `--scale-in-at` the load drops (arrivals slow to `--scale-in-load` of the
rate) and `--removed` instances leave through a drain (no new picks, their queued requests
moved to their other candidate, running ones finish within `--drain-deadline`, then removal).
The same trace runs behind each policy in `--policies` (dualmap and baselines) in one run.

Reported (JSON, a table and a PNG):
- SLO attainment (TTFT <= `--ttft-slo-s`) per window of `--window` seconds of arrival time and per
  phase (between membership changes);
- cache hit rate (engine prefix-cache hit tokens / prompt tokens) per window, and in the
  `--window` before and after each change;
- keys remapped by each change: the share of the prefix keys seen so far (every block hash
  of every prompt that arrived before the change; each stands for its whole prefix) whose
  first / second candidate on dualmap's two rings changed, computed from the rings over the
  routable members before and after the change. Ideal (the least a scheme that keeps every
  member's fair share can move): per candidate, adding k to n moves k/(n+k) of the keys (the
  newcomers' share), removing k of n moves the k/n the leavers owned; for the pair (either
  candidate), adding moves 1 - C(n,2)/C(n+k,2) and removing 1 - C(n-k,2)/C(n,2) (the share
  of 2-subsets that gain or lose a member). So 4 -> 8 ideally moves 1/2 per candidate and
  11/14 of pairs; 8 -> 4 also 1/2 per candidate and 11/14 of pairs.
- `failed_requests`: requests that never completed (lost at a forced removal in the
  simulator; an error or broken stream live). Must be 0.

`--live` runs the same with real processes: engine-sims (time-scaled), `twinroute scheduler`
with an `--endpoints-file` it reloads on change, and `twinroute router`; all engines start at
once but the scheduler first sees `--initial` of them. Scale-out rewrites the file; scale-in
calls the scheduler's Drain RPC as the operator does (`twinroute.operator.drain.Drainer`),
then removes the drained engines from the file. Hit rates come from the engines' prefix-cache
counters, keys remapped from the scheduler's own key function and rings.

Run: `twinroute bench elastic --json results/elastic/elastic.json --out results/elastic`
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twinroute.bench.elastic_report import (
    COMPARE_WINDOWS,
    RECORDED_RATE_RPS,
    ElasticPlan,
    KeyLog,
    Remap,
    Samples,
    around,
    build_report,
    clean,
    fmt,
    phase_report,
    plan_from,
    remaps_of,
    routable_changes,
    trace_path,
    windows,
    write_report,
)
from twinroute.simulator.cluster import MembershipRecord
from twinroute.simulator.traces import TraceChunk
from twinroute.vocabulary import DEFAULT_TTFT_SLO_S, POLICY_NAMES

DEFAULT_POLICIES = ("dualmap", "consistent_hash", "round_robin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--live", action="store_true", help="real processes, not the simulator")
    parser.add_argument(
        "--trace", type=Path, default=None,
        help="Mooncake JSONL trace (default: the bundled synthetic one)",
    )  # fmt: skip
    parser.add_argument(
        "--policies", default=None,
        help=f"comma-separated, from {', '.join(POLICY_NAMES)} (default: "
        f"{','.join(DEFAULT_POLICIES)}; live: dualmap,round_robin)",
    )  # fmt: skip
    parser.add_argument("--initial", type=int, default=4, help="instances at the start")
    parser.add_argument("--added", type=int, default=4, help="instances added at scale-out")
    parser.add_argument("--removed", type=int, default=4, help="instances removed at scale-in")
    parser.add_argument(
        "--scale-out-at", type=float, default=None,
        help="when --added instances join, seconds of arrival time (default: 90; live: 10)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-in-at", type=float, default=None,
        help="when the load drops and --removed instances drain, seconds of arrival time "
        "(default: 360; live: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=6.0,
        help="requests/s before the scale-in (the trace's arrivals rescaled to it)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-in-load", type=float, default=0.5,
        help="arrival rate after the scale-in, as a share of --rate",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=None,
        help="seconds of arrivals (default: the whole trace; live: --scale-in-at + 20)",
    )  # fmt: skip
    parser.add_argument(
        "--max-requests", type=int, default=None,
        help="send at most this many requests (default: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--ttft-slo-s", type=float, default=DEFAULT_TTFT_SLO_S, help="TTFT SLO, seconds"
    )
    parser.add_argument(
        "--window", type=float, default=None,
        help="report window, seconds of arrival time (default: 30; live: 5)",
    )  # fmt: skip
    parser.add_argument(
        "--drain-deadline", type=float, default=120.0,
        help="seconds a draining instance's running requests get before it is removed",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="simulator: seed of the policies' random choices, the scrape phase, the prefix keys",
    )  # fmt: skip
    parser.add_argument(
        "--virtual-nodes", type=int, default=256,
        help="virtual nodes per member on each ring, for keys remapped (live: also the "
        "scheduler's)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the JSON here (it is always in --out)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/elastic"),
        help="folder for the JSON, the table (.md), the PNG and, live, the processes' logs",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    # Live only.
    live = parser.add_argument_group("live", "with --live only")
    live.add_argument(
        "--block-words", type=int, default=16,
        help="prompt words per 512-token trace block (as `twinroute bench live`)",
    )  # fmt: skip
    live.add_argument(
        "--max-output-tokens", type=int, default=16, help="cap on each request's output tokens"
    )
    live.add_argument(
        "--time-scale", type=float, default=1.0,
        help="engine-sim --time-scale: wall seconds per modelled second",
    )  # fmt: skip
    live.add_argument(
        "--kv-capacity-tokens", type=int, default=None,
        help="engine KV memory in model tokens (default: the profile's)",
    )  # fmt: skip
    live.add_argument(
        "--request-timeout", type=float, default=120.0,
        help="seconds a request may take before it counts as failed",
    )  # fmt: skip
    live.add_argument(
        "--admission-hold", choices=("on", "off"), default="off",
        help="scheduler --admission-hold: held requests are the queued ones Drain can move",
    )  # fmt: skip


def warp_arrivals(
    chunks: Iterable[TraceChunk], *, factor: float, slow_after_s: float, slow_load: float
) -> Iterator[TraceChunk]:
    """Arrival times times `factor`, and past `slow_after_s` stretched by 1/`slow_load` (the
    load drop that makes the scale-in reasonable)."""
    for chunk in chunks:
        arrival = chunk.arrival_s * factor
        late = arrival > slow_after_s
        arrival = np.where(late, slow_after_s + (arrival - slow_after_s) / slow_load, arrival)
        yield TraceChunk(
            arrival_s=arrival,
            prompt_tokens=chunk.prompt_tokens,
            output_tokens=chunk.output_tokens,
            block_offsets=chunk.block_offsets,
            block_ids=chunk.block_ids,
            block_size=chunk.block_size,
        )


def limit(
    chunks: Iterable[TraceChunk], *, duration_s: float | None, max_requests: int | None
) -> Iterator[TraceChunk]:
    """Stop at `duration_s` of arrivals or after `max_requests` requests."""
    from twinroute.simulator.traces import take

    if max_requests is not None:
        chunks = take(chunks, requests=max_requests)
    for chunk in chunks:
        if duration_s is None or len(chunk) == 0 or chunk.arrival_s[-1] < duration_s:
            yield chunk
            continue
        count = int(np.searchsorted(chunk.arrival_s, duration_s, side="left"))
        if count:
            end = int(chunk.block_offsets[count])
            yield TraceChunk(
                arrival_s=chunk.arrival_s[:count],
                prompt_tokens=chunk.prompt_tokens[:count],
                output_tokens=chunk.output_tokens[:count],
                block_offsets=chunk.block_offsets[: count + 1],
                block_ids=chunk.block_ids[:end],
                block_size=chunk.block_size,
            )
        return


def _arrivals(args: argparse.Namespace, plan: ElasticPlan) -> Iterator[TraceChunk]:
    from twinroute.simulator.traces import read_mooncake

    return limit(
        warp_arrivals(
            read_mooncake(trace_path(args)),
            factor=RECORDED_RATE_RPS / plan.rate_rps,
            slow_after_s=plan.scale_in_at_s,
            slow_load=plan.scale_in_load,
        ),
        duration_s=args.duration,
        max_requests=args.max_requests,
    )


def simulate_policy(
    policy: str, *, args: argparse.Namespace, plan: ElasticPlan, quiet: bool
) -> dict[str, Any]:
    from twinroute.scheduler.settings import SchedulerSettings
    from twinroute.simulator.cluster import (
        SIMULATED_SCRAPE_INTERVAL_S,
        ClusterConfig,
        MembershipEvent,
        simulate,
    )
    from twinroute.simulator.profiles import DEFAULT_PROFILE, get_profile
    from twinroute.simulator.routing import core_adapter_factory, trace_keys
    from twinroute.simulator.sim_cost import cost_model_for
    from twinroute.simulator.traces import MOONCAKE_BLOCK_TOKENS

    profile = get_profile(DEFAULT_PROFILE)
    cost = cost_model_for(profile)
    block = MOONCAKE_BLOCK_TOKENS
    scrape_interval = SIMULATED_SCRAPE_INTERVAL_S
    config = ClusterConfig(
        instances=plan.initial,
        profile=profile,
        ttft_slo_s=plan.ttft_slo_s,
        scrape_interval_s=scrape_interval,
        block_size=block,
        keep_samples=True,
        scrape_phase=((args.seed * 0.618033988749895) % 1.0) * scrape_interval,
    )
    events = [
        MembershipEvent(at_s=plan.scale_out_at_s, add=plan.added),
        MembershipEvent(
            at_s=plan.scale_in_at_s, remove=plan.removed, drain_deadline_s=plan.drain_deadline_s
        ),
    ]
    settings = SchedulerSettings(
        policy=policy,
        ttft_slo_s=plan.ttft_slo_s,
        scrape_interval_s=scrape_interval,
        policy_seed=args.seed,
        key_block_tokens=block,
        prefix_capacity_tokens=profile.kv_capacity_tokens,
    )
    result = simulate(
        _arrivals(args, plan),
        config=config,
        router_factory=core_adapter_factory(settings, cost=cost),
        keys_for=trace_keys(block_size=block, model="sim-model", seed=args.seed),
        cost=cost,
        progress=None if quiet else sys.stderr,
        label=f"elastic {policy}",
        membership=events,
    )
    assert result.arrivals_s is not None and result.ttfts_s is not None
    assert result.prompt_tokens is not None and result.cached_tokens is not None
    samples = Samples(
        arrival_s=result.arrivals_s,
        ttft_s=result.ttfts_s,
        prompt_tokens=result.prompt_tokens.astype(np.float64),
        cached_tokens=result.cached_tokens.astype(np.float64),
    )
    end = float(samples.arrival_s[-1]) if samples.arrival_s.size else plan.scale_in_at_s
    changes = _membership_changes(result.membership_log, samples=samples, plan=plan)
    load_times = result.load_times_s if result.load_times_s is not None else np.zeros(0)
    instances = (
        result.instances_at_load_times
        if result.instances_at_load_times is not None
        else np.zeros(0, np.int32)
    )
    return {
        "policy": policy,
        "requests": result.requests,
        "failed_requests": result.unfinished_requests,
        "slo_attainment": result.slo_attainment,
        "cache_hit_rate": result.cache_hit_rate,
        "ttft_p50_s": result.ttft_p50_s,
        "ttft_p90_s": result.ttft_p90_s,
        "load_cv": result.load_cv,
        "rebalance_moves": result.rebalance_moves,
        "wall_s": result.wall_s,
        "phases": phase_report(samples, phases=plan.phases(end), slo_s=plan.ttft_slo_s),
        "windows": windows(samples, window_s=plan.window_s, slo_s=plan.ttft_slo_s),
        "changes": changes,
        "instances_over_time": {
            "t_s": [float(t) for t in load_times[:: max(1, len(load_times) // 400)]],
            "instances": [int(n) for n in instances[:: max(1, len(load_times) // 400)]],
        },
    }


def _membership_changes(
    log: Sequence[MembershipRecord], *, samples: Samples, plan: ElasticPlan
) -> list[dict[str, Any]]:
    """The simulator's membership log as the report's changes: each change with the SLO and
    hit rate around it (one window and `COMPARE_WINDOWS` windows), each removal, and how long
    a change's drained instances took to go."""
    changes = []
    for record in log:
        entry: dict[str, Any] = {
            "kind": record.kind,
            "at_s": record.at_s,
            "members_before": list(record.members_before),
            "members_after": list(record.members_after),
        }
        if record.kind == "change":
            entry.update(
                added=list(record.added),
                drained=list(record.drained),
                queued_moved=record.queued_moved,
                queued_left=record.queued_left,
                **around(samples, at_s=record.at_s, window_s=plan.window_s, slo_s=plan.ttft_slo_s),
                **{
                    f"{key}_{COMPARE_WINDOWS}w": value
                    for key, value in around(
                        samples,
                        at_s=record.at_s,
                        window_s=COMPARE_WINDOWS * plan.window_s,
                        slo_s=plan.ttft_slo_s,
                    ).items()
                },
            )
        else:
            entry.update(drained=list(record.drained), failed_requests=record.failed_requests)
        changes.append(entry)
    for entry in changes:
        if entry["kind"] == "change" and entry["drained"]:
            # Drain to removal: when the last leaving instance was empty (or its deadline).
            removed = [
                c["at_s"]
                for c in changes
                if c["kind"] == "removed" and set(c["drained"]) <= set(entry["drained"])
            ]
            entry["all_removed_after_s"] = max(removed) - entry["at_s"] if removed else None
    return changes


def sim_remaps(
    args: argparse.Namespace, plan: ElasticPlan, member_changes: Sequence[dict[str, Any]]
) -> list[Remap]:
    """Keys remapped by each membership change, over the prefix keys the trace showed so far."""
    from twinroute.simulator.routing import trace_keys
    from twinroute.simulator.traces import MOONCAKE_BLOCK_TOKENS

    keys_for = trace_keys(block_size=MOONCAKE_BLOCK_TOKENS, model="sim-model", seed=args.seed)
    log = KeyLog()
    for chunk in _arrivals(args, plan):
        offsets = chunk.block_offsets
        for row in range(len(chunk)):
            ids = chunk.block_ids[offsets[row] : offsets[row + 1]]
            keys = keys_for(ids, int(chunk.prompt_tokens[row]))
            log.add(float(chunk.arrival_s[row]), np.asarray(keys.block_hashes, np.uint64))
    return remaps_of(log, member_changes, virtual_nodes=args.virtual_nodes, seed=args.seed)


def run_sim(args: argparse.Namespace) -> int:
    plan = plan_from(args, live=False)
    names = [p.strip() for p in (args.policies or ",".join(DEFAULT_POLICIES)).split(",")]
    names = [name for name in names if name]
    unknown = sorted(set(names) - set(POLICY_NAMES))
    if unknown or not names:
        print(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    policies: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names, start=1):
        row = simulate_policy(name, args=args, plan=plan, quiet=args.quiet)
        policies[name] = row
        if not args.quiet:
            phases = ", ".join(fmt(p["slo_attainment"], ".1%") for p in row["phases"])
            print(
                f"[{index}/{len(names)}] {name}: SLO met per phase {phases}, failed "
                f"{row['failed_requests']}, {row['wall_s']:.1f} s wall "
                f"({time.perf_counter() - started:.0f} s total)",
                file=sys.stderr,
                flush=True,
            )
    first = next(iter(policies.values()))
    initial = [f"sim-{i:03d}" for i in range(plan.initial)]
    remaps = sim_remaps(args, plan, routable_changes(first["changes"], initial))
    report = build_report(
        mode="sim",
        plan=plan,
        policies=policies,
        remaps=remaps,
        command="twinroute bench elastic " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else []),
        trace=str(trace_path(args)),
        extra={"wall_s": time.perf_counter() - started},
    )
    write_report(clean(report), args, stem="elastic")
    return 0 if report["failed_requests"] == 0 else 1


def run(args: argparse.Namespace) -> int:
    try:
        if args.live:
            from twinroute.bench.elastic_live import run_live

            return run_live(args)
        return run_sim(args)
    except ValueError as error:
        print(f"twinroute bench elastic: {error}", file=sys.stderr)
        return 2
