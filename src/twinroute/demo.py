"""`twinroute demo` (`make demo`): every routing policy on the bundled Mooncake trace.

Simulates a pool of 8 vLLM instances (the `llama3-8b-h100` profile) behind the live routing
core, once per policy and request rate, and prints how each policy fares: the share of
requests within the TTFT SLO, TTFT percentiles, the engine prefix-cache hit rate against what
one cache of the whole pool's size could reach, and how evenly the load spreads. Then the live
part: the start of the same trace through real processes on 127.0.0.1 (engine simulators, the
gRPC scheduler, the router), with dualmap and with round_robin, and dualmap once more through
Envoy with the scheduler as its endpoint picker, as `twinroute bench live` does.
No GPU, no Kubernetes; about two minutes. `twinroute bench goodput` does the full search.
"""

from __future__ import annotations

import argparse
import sys
import time

from twinroute.simulator.command import positive_int
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import bundled_mooncake_trace, read_mooncake, summarize
from twinroute.vocabulary import DEFAULT_TTFT_SLO_S

DEFAULT_RATES = (6.0, 8.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rates",
        default=",".join(f"{r:g}" for r in DEFAULT_RATES),
        help="comma-separated request rates (req/s) to replay the trace at",
    )
    parser.add_argument(
        "--instances", type=positive_int, default=8, help="vLLM instances in the simulated pool"
    )
    parser.add_argument("--policies", default=None, help="comma-separated (default: all)")
    parser.add_argument(
        "--ttft-slo-s", type=float, default=DEFAULT_TTFT_SLO_S, help="TTFT SLO, seconds"
    )
    parser.add_argument(
        "--live-seconds",
        type=float,
        default=40.0,
        help="then replay the trace for this long through real processes on 127.0.0.1 (4 "
        "engine simulators, `twinroute scheduler`, `twinroute router`), once with dualmap and "
        "once with round_robin, then dualmap through Envoy (`twinroute gateway`); 0 = skip",
    )
    parser.add_argument(
        "--out", default="results/demo", help="folder for the live part's table, JSON and PNGs"
    )


def run(args: argparse.Namespace) -> int:
    from twinroute.scheduler.policies import POLICY_NAMES

    policies = (
        [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.policies
        else list(POLICY_NAMES)
    )
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        print(f"twinroute demo: unknown policies {unknown}", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    path = bundled_mooncake_trace()
    summary = summarize(read_mooncake(path))
    trace = TraceSpec(path=str(path))
    print(
        f"Mooncake synthetic trace: {summary.requests} requests, mean prompt "
        f"{summary.mean_prompt_tokens:,.0f} tokens, recorded at {summary.rate_rps:.2f} req/s; "
        f"{args.instances} simulated instances (llama3-8b-h100), TTFT SLO {args.ttft_slo_s:g} s"
    )
    started = time.perf_counter()
    header = (
        f"{'rate':>6} {'policy':<16} {'within SLO':>10} {'TTFT p50':>9} {'TTFT p90':>9} "
        f"{'cache hit':>9} {'ideal':>6} {'load CV':>7} {'SLO switches':>12}"
    )
    print(header)
    print("-" * len(header))
    for rate in rates:
        rows = []
        for policy in policies:
            spec = RunSpec(
                trace=trace,
                policy=policy,
                instances=args.instances,
                time_scale=summary.rate_rps / rate,
                ttft_slo_s=args.ttft_slo_s,
            )
            result = run_spec(spec, progress=None)
            rows.append((policy, result))
            print(
                f"{rate:>6g} {policy:<16} {100 * result.slo_attainment:>9.1f}% "
                f"{result.ttft_p50_s:>8.2f}s {result.ttft_p90_s:>8.2f}s "
                f"{100 * result.cache_hit_rate:>8.1f}% {100 * result.ideal_cache_hit_rate:>5.1f}% "
                f"{result.load_cv:>7.2f} {result.slo_switches:>12}",
                flush=True,
            )
        best = max(rows, key=lambda row: row[1].slo_attainment)
        print(f"{'':>6} best within SLO at {rate:g} req/s: {best[0]}")
        print()
    print(
        f"({time.perf_counter() - started:.0f} s; `twinroute bench goodput` finds each "
        "policy's highest rate within the SLO)"
    )
    if args.live_seconds <= 0:
        return 0
    return _live(seconds=args.live_seconds, slo_s=args.ttft_slo_s, out=args.out)


def _live(*, seconds: float, slo_s: float, out: str) -> int:
    """The same trace through the real processes, via `twinroute bench live`."""
    from twinroute.bench import live

    print()
    print(
        f"Live: the trace's first {seconds:g} s replayed through 4 `twinroute engine-sim` "
        "processes behind `twinroute scheduler` (gRPC) and `twinroute router`, then behind "
        "Envoy with the scheduler as its endpoint picker (`twinroute gateway`), on 127.0.0.1"
    )
    parser = argparse.ArgumentParser(prog="twinroute demo (live)")
    live.add_arguments(parser)
    live_args = parser.parse_args(
        [
            "--routers=twinroute_dualmap,twinroute_round_robin,twinroute_envoy",
            f"--duration={seconds}",
            f"--ttft-slo-s={slo_s}",
            "--twinroute-scheduler=grpc",
            f"--out={out}",
        ]
    )
    return live.run(live_args)
