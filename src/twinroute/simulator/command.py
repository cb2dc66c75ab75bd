"""`twinroute simulate`: one policy, one trace, one pool; prints and optionally writes JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from twinroute.formatting import percent, seconds
from twinroute.simulator.cluster import SIMULATED_SCRAPE_INTERVAL_S
from twinroute.simulator.disaggregation import parse_pd
from twinroute.simulator.profiles import DEFAULT_PROFILE, INSTANCE_PROFILES
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import (
    TRACE_FORMATS,
    PrefixModel,
    SharedPrefixWorkload,
    TraceFormatError,
    bundled_mooncake_trace,
)
from twinroute.vocabulary import (
    DEFAULT_PD_MIN_PREFILL_TOKENS,
    DEFAULT_POLICY,
    DEFAULT_TTFT_SLO_S,
    POLICY_NAMES,
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a pool of no instances is no pool)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Trace options shared by `simulate` and the benchmarks."""
    group = parser.add_argument_group("trace")
    group.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="trace file (default: the bundled Mooncake synthetic trace)",
    )
    group.add_argument(
        "--format", choices=TRACE_FORMATS, default="mooncake", help="how the trace file is laid out"
    )
    group.add_argument(
        "--block-size", type=int, default=512, help="prompt tokens per trace block id"
    )
    group.add_argument(
        "--replicate",
        type=int,
        default=1,
        metavar="N",
        help="merge N copies of the trace with disjoint block ids (load a bigger pool)",
    )
    group.add_argument(
        "--max-requests",
        type=int,
        default=None,
        metavar="N",
        help="replay only the first N requests (after --replicate)",
    )
    group.add_argument("--prefix-groups", type=int, default=64, help="azure: system prompts")
    group.add_argument(
        "--prefix-tokens", type=int, default=2048, help="azure: system prompt length"
    )
    group.add_argument("--zipf", type=float, default=1.1, help="azure/synthetic: popularity skew")
    group.add_argument(
        "--synthetic-requests", type=int, default=2000, help="synthetic: number of requests"
    )
    group.add_argument(
        "--synthetic-rate", type=float, default=4.0, help="synthetic: requests per second"
    )


def trace_spec_from(args: argparse.Namespace) -> TraceSpec:
    if args.replicate < 1:
        raise ValueError("--replicate must be >= 1")
    path = args.trace
    if path is None and args.format == "mooncake":
        path = bundled_mooncake_trace()
    if path is None and args.format == "azure":
        raise ValueError("--format azure needs --trace FILE")
    return TraceSpec(
        path=str(path) if path is not None else None,
        trace_format=args.format,
        block_size=args.block_size,
        copies=args.replicate,
        max_requests=args.max_requests,
        prefix_model=PrefixModel(
            groups=args.prefix_groups, prefix_tokens=args.prefix_tokens, zipf_s=args.zipf
        ),
        workload=SharedPrefixWorkload(
            requests=args.synthetic_requests, rate_rps=args.synthetic_rate, zipf_s=args.zipf
        ),
    )


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pool")
    group.add_argument(
        "--instances", type=positive_int, default=8, help="vLLM instances in the simulated pool"
    )
    group.add_argument(
        "--profile", choices=sorted(INSTANCE_PROFILES), default=DEFAULT_PROFILE,
        help="hardware and model the instances simulate (step costs, KV size, batching)",
    )  # fmt: skip
    group.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=None,
        help="KV cache per instance in tokens (default: the profile's)",
    )
    group.add_argument(
        "--ttft-slo-s", type=float, default=DEFAULT_TTFT_SLO_S, help="TTFT SLO in seconds"
    )
    group.add_argument(
        "--scrape-interval-s",
        type=float,
        default=SIMULATED_SCRAPE_INTERVAL_S,
        help="seconds between engine metric scrapes (staleness the router sees)",
    )
    group.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="share of the earliest requests left out of the metrics (DualMap: 500 of 3,993)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_trace_arguments(parser)
    add_pool_arguments(parser)
    parser.add_argument(
        "--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY, help="routing policy"
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="multiply arrival times (0.5 = twice the rate)",
    )
    load.add_argument("--rate", type=float, default=None, help="target request rate (req/s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the simulation's random choices"
    )
    parser.add_argument(
        "--rebalance",
        choices=("on", "off"),
        default="on",
        help="hotspot rebalancing of queued requests, for policies that use it (dualmap)",
    )
    parser.add_argument(
        "--phase-aware",
        choices=("on", "off"),
        default="on",
        help="placement counts decode load and expected output (TTFT estimate and score; "
        "benchmarks/phase_aware.md)",
    )
    parser.add_argument(
        "--pd",
        default=None,
        metavar="P:D",
        help="disaggregated pool: P prefill and D decode instances (P + D = --instances, "
        "or P + D instances when --instances is not given); default: a unified pool",
    )
    parser.add_argument(
        "--pd-min-prefill-tokens",
        type=int,
        default=DEFAULT_PD_MIN_PREFILL_TOKENS,
        help="with --pd: a decode instance prefills prompts itself when at most this many of "
        "their tokens are not cached there",
    )
    # Unset unless given, so that --pd alone sizes the pool.
    parser.set_defaults(instances=None)
    parser.add_argument("--json", type=Path, default=None, help="write the metrics here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    try:
        trace = trace_spec_from(args)
        summary = trace.summary()
        time_scale = 1.0
        if args.time_scale is not None:
            time_scale = args.time_scale
        elif args.rate is not None:
            if args.rate <= 0:
                raise ValueError("--rate must be > 0")
            time_scale = summary.rate_rps / args.rate
        if time_scale <= 0:
            raise ValueError("--time-scale must be > 0")
        pd = parse_pd(args.pd, instances=args.instances) if args.pd is not None else None
        instances = pd.instances if pd is not None else args.instances or 8
        if args.pd_min_prefill_tokens < 0:
            raise ValueError("--pd-min-prefill-tokens must be >= 0")
        spec = RunSpec(
            trace=trace,
            policy=args.policy,
            instances=instances,
            pd=pd,
            pd_min_prefill_tokens=args.pd_min_prefill_tokens,
            profile=args.profile,
            kv_capacity_tokens=args.kv_capacity_tokens,
            time_scale=time_scale,
            ttft_slo_s=args.ttft_slo_s,
            scrape_interval_s=args.scrape_interval_s,
            warmup_fraction=args.warmup,
            seed=args.seed,
            rebalance=args.rebalance == "on",
            phase_aware=args.phase_aware == "on",
        )
        result = run_spec(
            spec, progress=None if args.quiet else sys.stderr, total_requests=summary.requests
        )
    except (TraceFormatError, ValueError, FileNotFoundError) as error:
        print(f"twinroute simulate: {error}", file=sys.stderr)
        return 2
    metrics = result.summary()
    metrics.update(
        policy=args.policy,
        instances=instances,
        pd_split=args.pd or "unified",
        time_scale=time_scale,
        seed=args.seed,
        ttft_slo_s=args.ttft_slo_s,
        rebalance=args.rebalance,
        phase_aware=args.phase_aware,
    )
    shown_trace = Path(trace.path).name if trace.path else f"a {trace.trace_format} trace"
    print("\n".join(report(metrics, trace=shown_trace)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 0


def _prediction_line(m: dict[str, Any]) -> str:
    ratio = m["ttft_prediction_abs_error_ratio_p50"]
    if not isinstance(ratio, int | float) or math.isnan(ratio):
        return "  TTFT prediction     none (this policy predicts no TTFT)"
    return (
        f"  TTFT prediction     median error {seconds(m['ttft_prediction_error_p50_s'])} "
        f"({percent(ratio)} of TTFT); requests predicted within the SLO that missed it: "
        f"{percent(m['slo_misses_predicted_ok'])}"
    )


def report(metrics: dict[str, Any], *, trace: str) -> list[str]:
    """What `twinroute simulate` prints: each figure once, with its unit (the JSON keys and
    their meaning are in docs/glossary.md)."""
    m = metrics
    decisions: dict[str, int] = dict(m["decisions"])
    lines = [
        f"{m['policy']} on {trace}: {m['instances']} instances ({m['pd_split']}), "
        f"{m['rate_rps']:.3g} req/s, TTFT SLO {m['ttft_slo_s']:g} s, seed {m['seed']}",
        f"  within SLO          {percent(m['slo_attainment'])}",
        f"  TTFT p50/p90/p99    {seconds(m['ttft_p50_s'])} / {seconds(m['ttft_p90_s'])} / "
        f"{seconds(m['ttft_p99_s'])}",
        f"  e2e p50/p90         {seconds(m['e2e_p50_s'])} / {seconds(m['e2e_p90_s'])}",
        f"  TPOT p50/p90        {seconds(m['tpot_p50_s'])} / {seconds(m['tpot_p90_s'])}",
        f"  cache hit           {percent(m['cache_hit_rate'])} of prompt tokens (ideal "
        f"{percent(m['ideal_cache_hit_rate'])}, "
        f"unbounded {percent(m['unbounded_cache_hit_rate'])})",
        f"  load CV             {m['load_cv']:.2f} (0 = perfectly even)",
        _prediction_line(m),
        "  decisions           "
        + (
            ", ".join(
                f"{reason} {count:,}"
                for reason, count in sorted(decisions.items(), key=lambda item: -item[1])
            )
            or "-"
        ),
        f"  SLO switches {m['slo_switches']:,}, rebalance moves {m['rebalance_moves']:,}, "
        f"preemptions {m['preemptions']:,}; rebalancing {m['rebalance']}, phase-aware "
        f"{m['phase_aware']}",
    ]
    pd = m.get("pd")
    if isinstance(pd, dict) and pd:
        shown = ", ".join(
            f"{key} {seconds(value) if key.endswith('_s') else percent(value)}"
            if key.endswith(("_s", "_utilisation"))
            else f"{key} {value:,.0f}"
            if isinstance(value, int | float)
            else f"{key} {value}"
            for key, value in sorted(pd.items())
        )
        lines.append(f"  prefill/decode      {shown}")
    lines.append(
        f"  {m['requests']:,} requests ({m['measured_requests']:,} measured), "
        f"{m['sim_duration_s']:,.0f} s simulated in {m['wall_s']:.1f} s; time scale "
        f"{m['time_scale']:.3g}. Terms: docs/glossary.md; --json FILE keeps every figure."
    )
    return lines
