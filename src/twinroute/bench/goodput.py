"""`twinroute bench goodput`: how much traffic each policy serves within the TTFT SLO.

Method (DualMap's metrics, on the cluster simulator):
1. **Goodput** per policy and seed: the highest request rate (arrival times scaled) at which at
   least `--target` (90%) of the measured requests meet the TTFT SLO. Found by bracketing
   (x1.5 steps from the trace's native rate x pool size / 8) and then bisecting on a geometric
   scale until the bracket is within `--tolerance` (3%); the reported goodput is the highest
   rate that passed. The median over seeds is the headline, min and max the spread.
2. **Effective request capacity** at fixed rates (`--rates`, default 0.5 to 1.5 x the best
   baseline's goodput): share of requests within the SLO, mean over seeds.
3. At the **reference rate** (the best baseline's goodput, or `--reference-rate`): P50/P90 TTFT,
   cache hit rate against the ideal, load CV; a TTFT CDF and per-instance load plot.

Writes `results.json`, `results.md` and PNG plots to `--out`, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twinroute.bench import recorded_path
from twinroute.simulator.command import add_pool_arguments, add_trace_arguments, trace_spec_from
from twinroute.simulator.runner import RunSpec, TraceSpec

BASELINE_ANCHOR = "dualmap"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.vocabulary import POLICY_NAMES

    add_trace_arguments(parser)
    add_pool_arguments(parser)
    parser.add_argument(
        "--policies", default=None,
        help=f"comma-separated, from {', '.join(POLICY_NAMES)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="seeds per point (0..N-1)")
    parser.add_argument(
        "--fixed-seeds",
        type=int,
        default=None,
        help="seeds for the fixed-rate runs (default: --seeds; fewer saves time on big pools)",
    )
    parser.add_argument(
        "--target", type=float, default=0.9, help="SLO attainment that defines goodput"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.03,
        help="the goodput search stops when its bracket is this narrow (relative width)",
    )  # fmt: skip
    parser.add_argument(
        "--rates",
        default=None,
        help="comma-separated fixed rates (req/s) for effective capacity "
        "(default: 0.5,0.75,1,1.25,1.5 x the best baseline's goodput)",
    )
    parser.add_argument(
        "--rate-factors",
        default="0.5,0.75,1,1.25,1.5",
        help="without --rates: fixed rates as these multiples of the best baseline's goodput",
    )
    parser.add_argument(
        "--reference-rate",
        type=float,
        default=None,
        help="rate for the TTFT CDF and load plots (default: best baseline's goodput)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel simulation processes")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-goodput"),
        help="folder for results.json, results.md and the PNG plots",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


@dataclass(frozen=True, slots=True)
class _Point:
    policy: str
    seed: int
    rate: float
    metrics: dict[str, Any]


def _spec(base: RunSpec, *, native_rate: float, rate: float, seed: int) -> RunSpec:
    return replace(base, time_scale=native_rate / rate, seed=seed)


def _run_point(base: RunSpec, native_rate: float, rate: float, seed: int) -> _Point:
    from twinroute.simulator.runner import run_spec

    result = run_spec(_spec(base, native_rate=native_rate, rate=rate, seed=seed), progress=None)
    return _Point(policy=base.policy, seed=seed, rate=rate, metrics=result.summary())


def _log(message: str) -> None:
    print(f"bench goodput: {message}", file=sys.stderr, flush=True)


def _bisect(
    base: RunSpec,
    *,
    native_rate: float,
    start_rate: float,
    seed: int,
    target: float,
    tolerance: float,
) -> tuple[float, list[_Point]]:
    """Highest passing rate for one policy and seed, and every point it evaluated."""
    points: list[_Point] = []

    def passes(rate: float) -> bool:
        started = time.perf_counter()
        point = _run_point(base, native_rate, rate, seed)
        points.append(point)
        attained = float(point.metrics["slo_attainment"])
        _log(
            f"{base.policy} seed {seed}: {rate:.3f} req/s -> {attained:.3f} within SLO "
            f"({time.perf_counter() - started:.1f} s)"
        )
        return attained >= target

    step = 1.5
    low, high = math.nan, math.nan
    rate = start_rate
    for _ in range(24):
        if passes(rate):
            low = rate
            if not math.isnan(high):
                break
            rate *= step
        else:
            high = rate
            if not math.isnan(low):
                break
            rate /= step
        if not math.isnan(low) and not math.isnan(high):
            break
    if math.isnan(low):
        return 0.0, points
    if math.isnan(high):
        return low, points
    while high / low > 1.0 + tolerance:
        middle = math.sqrt(low * high)
        if passes(middle):
            low = middle
        else:
            high = middle
    return low, points


def _goodput_task(
    base: RunSpec,
    native_rate: float,
    start_rate: float,
    seed: int,
    target: float,
    tolerance: float,
) -> tuple[str, int, float, list[_Point]]:
    goodput, points = _bisect(
        base,
        native_rate=native_rate,
        start_rate=start_rate,
        seed=seed,
        target=target,
        tolerance=tolerance,
    )
    return base.policy, seed, goodput, points


def _fixed_task(
    base: RunSpec, native_rate: float, rate: float, seed: int, keep: bool
) -> tuple[_Point, dict[str, list[float]] | None]:
    from twinroute.simulator.runner import run_spec

    spec = replace(_spec(base, native_rate=native_rate, rate=rate, seed=seed), keep_samples=keep)
    result = run_spec(spec, progress=None)
    samples = None
    if keep and result.ttfts_s is not None and result.load_samples is not None:
        assert result.load_times_s is not None
        samples = {
            "ttft_s": result.ttfts_s.tolist(),
            "load_times_s": result.load_times_s.tolist(),
            "load": result.load_samples.tolist(),
        }
    return _Point(policy=base.policy, seed=seed, rate=rate, metrics=result.summary()), samples


def _round_rate(rate: float) -> float:
    if rate <= 0:
        return rate
    digits = 2 - math.floor(math.log10(rate))
    return round(rate, max(digits, 0))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(statistics.fmean(finite)) if finite else math.nan


@dataclass(slots=True)
class _Measured:
    """What the runs of one `bench goodput` gave: each policy's goodput per seed, the points
    of the searches and of the fixed rates, and the reference run's samples for the plots."""

    goodputs: dict[str, dict[int, float]]
    points: list[_Point]
    fixed_points: list[_Point]
    rates: list[float]
    reference: float
    best_baseline: str | None
    samples: dict[str, dict[str, list[float]]]

    def median_goodput(self, policy: str) -> float:
        return _median(list(self.goodputs[policy].values()))


def _chosen_policies(args: argparse.Namespace) -> list[str]:
    from twinroute.vocabulary import POLICY_NAMES

    policies = (
        [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.policies
        else list(POLICY_NAMES)
    )
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {list(POLICY_NAMES)}")
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    return policies


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        policies = _chosen_policies(args)
        trace: TraceSpec = trace_spec_from(args)
        summary = trace.summary()
    except (ValueError, FileNotFoundError) as error:
        print(f"twinroute bench goodput: {error}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds))
    fixed_seeds = list(range(min(args.fixed_seeds or args.seeds, args.seeds)))
    bases = {
        policy: RunSpec(
            trace=trace,
            policy=policy,
            instances=args.instances,
            profile=args.profile,
            kv_capacity_tokens=args.kv_capacity_tokens,
            ttft_slo_s=args.ttft_slo_s,
            scrape_interval_s=args.scrape_interval_s,
            warmup_fraction=args.warmup,
        )
        for policy in policies
    }
    _log(
        f"{summary.requests} requests, native {summary.rate_rps:.3f} req/s, {args.instances} "
        f"instances, policies {','.join(policies)}, seeds {seeds}"
    )
    measured = _measure(
        args, bases=bases, native_rate=summary.rate_rps, seeds=seeds, fixed_seeds=fixed_seeds
    )
    results: dict[str, Any] = {
        # Relative to where it ran (the repository, for the bundled trace): no machine's paths.
        "trace": recorded_path(trace.path) if trace.path else trace.trace_format,
        "format": trace.trace_format,
        "replicate": trace.copies,
        "requests": summary.requests,
        "native_rate_rps": summary.rate_rps,
        "instances": args.instances,
        "profile": args.profile,
        "kv_capacity_tokens": args.kv_capacity_tokens,
        "ttft_slo_s": args.ttft_slo_s,
        "slo_target": args.target,
        "scrape_interval_s": args.scrape_interval_s,
        "warmup": args.warmup,
        "seeds": seeds,
        "fixed_rate_seeds": fixed_seeds,
        "rates_rps": measured.rates,
        "reference_rate_rps": measured.reference,
        "best_baseline": measured.best_baseline,
        "policies": {
            policy: _policy_results(policy, measured=measured, seeds=seeds) for policy in policies
        },
        "command": "twinroute bench goodput "
        + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else []),
    }
    results["wall_s"] = time.perf_counter() - started
    _write(results, samples=measured.samples, out=args.out, plots=not args.no_plots)
    return 0


def _measure(
    args: argparse.Namespace,
    *,
    bases: dict[str, RunSpec],
    native_rate: float,
    seeds: list[int],
    fixed_seeds: list[int],
) -> _Measured:
    """The goodput search of every policy and seed, then the runs at fixed rates around the
    best baseline's goodput, in `args.jobs` processes."""
    policies = list(bases)
    # The recorded rate suits about 8 instances per copy of the trace; start from there.
    copies = next(iter(bases.values())).trace.copies
    start_rate = _round_rate(native_rate * args.instances / (8.0 * copies))
    goodputs: dict[str, dict[int, float]] = {p: {} for p in policies}
    points: list[_Point] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [
            pool.submit(
                _goodput_task,
                bases[policy],
                native_rate,
                start_rate,
                seed,
                args.target,
                args.tolerance,
            )
            for policy in policies
            for seed in seeds
        ]
        for future in futures:
            policy, seed, goodput, evaluated = future.result()
            goodputs[policy][seed] = goodput
            points.extend(evaluated)
            _log(f"{policy} seed {seed}: goodput {goodput:.3f} req/s")

        median_goodput = {p: _median(list(goodputs[p].values())) for p in policies}
        baselines = [p for p in policies if p != BASELINE_ANCHOR]
        best_baseline = max(baselines, key=lambda p: median_goodput[p]) if baselines else None
        anchor_rate = (
            median_goodput[best_baseline] if best_baseline else median_goodput[policies[0]]
        )
        if args.rates:
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
        else:
            factors = [float(f) for f in args.rate_factors.split(",") if f.strip()]
            rates = [_round_rate(anchor_rate * f) for f in factors]
        rates = sorted({r for r in rates if r > 0})
        reference = args.reference_rate or _round_rate(anchor_rate)
        fixed = [
            pool.submit(
                _fixed_task,
                bases[policy],
                native_rate,
                rate,
                seed,
                seed == 0 and rate == reference,
            )
            for policy in policies
            for rate in sorted({*rates, reference})
            for seed in fixed_seeds
        ]
        samples: dict[str, dict[str, list[float]]] = {}
        fixed_points: list[_Point] = []
        for pending in fixed:
            point, kept = pending.result()
            fixed_points.append(point)
            _log(
                f"{point.policy} seed {point.seed}: fixed {point.rate:.3f} req/s -> "
                f"{point.metrics['slo_attainment']:.3f} within SLO"
            )
            if kept is not None:
                samples[point.policy] = kept
    return _Measured(
        goodputs=goodputs,
        points=points,
        fixed_points=fixed_points,
        rates=rates,
        reference=reference,
        best_baseline=best_baseline,
        samples=samples,
    )


def _policy_results(policy: str, *, measured: _Measured, seeds: list[int]) -> dict[str, Any]:
    """One policy's figures: goodput over seeds, SLO attainment at the fixed rates, the
    reference rate's latency and cache figures, and the metrics at its goodput."""
    by_seed = measured.goodputs[policy]
    # The metrics of the highest passing point of the policy's median-goodput seed.
    median_seed = sorted(by_seed, key=lambda s: by_seed[s])[len(by_seed) // 2]
    chosen = [
        p
        for p in measured.points
        if p.policy == policy and p.seed == median_seed and p.rate == by_seed[median_seed]
    ]
    mine = [p for p in measured.fixed_points if p.policy == policy]
    at_reference = [p.metrics for p in mine if p.rate == measured.reference]
    seeds_goodput = [by_seed[s] for s in seeds]
    return {
        "goodput_rps": measured.median_goodput(policy),
        "goodput_seeds": seeds_goodput,
        "goodput_min_rps": min(seeds_goodput),
        "goodput_max_rps": max(seeds_goodput),
        "effective_capacity": {
            f"{rate:g}": _mean([p.metrics["slo_attainment"] for p in mine if p.rate == rate])
            for rate in measured.rates
        },
        "ttft_p50_s": _mean([m["ttft_p50_s"] for m in at_reference]),
        "ttft_p90_s": _mean([m["ttft_p90_s"] for m in at_reference]),
        "cache_hit_rate": _mean([m["cache_hit_rate"] for m in at_reference]),
        "ideal_cache_hit_rate": _mean([m["ideal_cache_hit_rate"] for m in at_reference]),
        "load_cv": _mean([m["load_cv"] for m in at_reference]),
        "slo_switches": _mean([float(m["slo_switches"]) for m in at_reference]),
        "at_goodput": chosen[0].metrics if chosen else {},
        "curve": sorted(
            (p.rate, p.seed, p.metrics["slo_attainment"])
            for p in [*measured.points, *measured.fixed_points]
            if p.policy == policy
        ),
    }


def _write(
    results: dict[str, Any],
    *,
    samples: dict[str, dict[str, list[float]]],
    out: Path,
    plots: bool,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    if plots:
        from twinroute.bench.plots import plot_goodput

        for path in plot_goodput(results, samples=samples, out=out):
            _log(f"wrote {path}")
    _log(f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['wall_s']:.0f} s")


def markdown_table(results: dict[str, Any]) -> str:
    policies: dict[str, dict[str, Any]] = results["policies"]
    best = results.get("best_baseline")
    best_goodput = policies[best]["goodput_rps"] if best in policies else math.nan
    rates = [f"{r:g}" for r in results["rates_rps"]]
    header = (
        "| policy | goodput (req/s), median [min-max] | vs best baseline | "
        + " | ".join(f"within SLO @ {r}" for r in rates)
        + f" | TTFT p50 / p90 @ {results['reference_rate_rps']:g} (s) | hit rate / ideal "
        "@ ref | hit / ideal @ goodput | load CV @ ref |"
    )
    lines = [header, "|" + "---|" * (7 + len(rates))]
    order = sorted(policies, key=lambda p: -policies[p]["goodput_rps"])
    for name in order:
        row = policies[name]
        ratio = row["goodput_rps"] / best_goodput if best_goodput and best_goodput > 0 else math.nan
        at_goodput = row.get("at_goodput") or {}
        hit_goodput = at_goodput.get("cache_hit_rate", math.nan)
        ideal_goodput = at_goodput.get("ideal_cache_hit_rate", math.nan)
        cells = [
            f"`{name}`",
            f"{row['goodput_rps']:.2f} [{row['goodput_min_rps']:.2f}-{row['goodput_max_rps']:.2f}]",
            f"{ratio:.2f}x",
            *(f"{100 * row['effective_capacity'][r]:.0f}%" for r in rates),
            f"{row['ttft_p50_s']:.2f} / {row['ttft_p90_s']:.2f}",
            f"{100 * row['cache_hit_rate']:.1f}% / {100 * row['ideal_cache_hit_rate']:.1f}%",
            f"{100 * hit_goodput:.1f}% / {100 * ideal_goodput:.1f}%",
            f"{row['load_cv']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
