"""Unified vs disaggregated prefill/decode pools on the same GPU count, in the simulator.

For every rate, seed, pool layout and policy, one run of the bundled Mooncake trace, exactly
`twinroute simulate --policy P --rate R --seed S --warmup W [--pd X:Y]` with `--instances` GPUs
in all: a unified pool, or X prefill + Y decode instances (the scheduler's PD placement picks
the prefill instance with the policy on the prefill ring and the decode instance by load;
`scheduler/policies/pd.py`, `src/twinroute/simulator/disaggregation.py`). Prints a markdown
table per rate and writes the rows as JSON and a PNG (SLO attainment, TTFT P90, TPOT P90 and
end-to-end P90 against the rate; one line per layout and policy).

Run:  twinroute bench pd-layouts --rates 2 4 6 8 --layouts unified 3:5 4:4 6:2 \\
          --json benchmarks/pd.json --plot benchmarks/pd.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from twinroute.bench import command_line
from twinroute.simulator.disaggregation import parse_pd
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import bundled_mooncake_trace

METRICS = (
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "slo_attainment",
    "cache_hit_rate",
)
PD_METRICS = (
    "prefill_utilisation",
    "decode_utilisation",
    "transfer_p50_s",
    "decode_only_requests",
    "disaggregated_requests",
)


def _command(*, policy: str, rate: float, seed: int, warmup: float, layout: str, n: int) -> str:
    pd = f" --pd {layout}" if layout != "unified" else f" --instances {n}"
    return (
        f"twinroute simulate --policy {policy} --rate {rate:g} --seed {seed} "
        f"--warmup {warmup:g}{pd}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.vocabulary import POLICY_NAMES

    parser.add_argument(
        "--rates", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0], metavar="RATE",
        help="request rates to run, req/s",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], metavar="SEED",
        help="seeds to run at each rate",
    )  # fmt: skip
    parser.add_argument(
        "--instances", type=int, default=8, help="GPUs (simulated instances) in every layout"
    )
    parser.add_argument(
        "--layouts", nargs="+", default=["unified", "3:5", "4:4", "6:2"], metavar="LAYOUT",
        help="unified, or P:D prefill and decode instances (P + D = --instances)",
    )  # fmt: skip
    parser.add_argument(
        "--policies", nargs="+", default=["dualmap", "round_robin"], choices=POLICY_NAMES,
        metavar="POLICY", help=f"policies to compare, from {', '.join(POLICY_NAMES)}",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=float, default=0.125,
        help="share of the earliest requests left out of the metrics (simulate --warmup)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write a PNG here")


def run(args: argparse.Namespace) -> int:
    print("$ " + command_line())

    splits = {
        layout: (None if layout == "unified" else parse_pd(layout, instances=args.instances))
        for layout in args.layouts
    }
    trace = TraceSpec(path=str(bundled_mooncake_trace()))
    recorded_rate = trace.summary().rate_rps
    rows: list[dict[str, Any]] = []
    total = len(args.rates) * len(args.seeds) * len(splits) * len(args.policies)
    started = time.perf_counter()
    for rate in args.rates:
        for seed in args.seeds:
            for layout, split in splits.items():
                for policy in args.policies:
                    result = run_spec(
                        RunSpec(
                            trace=trace,
                            policy=policy,
                            instances=args.instances,
                            time_scale=recorded_rate / rate,
                            warmup_fraction=args.warmup,
                            seed=seed,
                            pd=split,
                        ),
                        progress=None,
                    )
                    row: dict[str, Any] = {
                        "rate_rps": rate,
                        "seed": seed,
                        "layout": layout,
                        "policy": policy,
                        "command": _command(
                            policy=policy,
                            rate=rate,
                            seed=seed,
                            warmup=args.warmup,
                            layout=layout,
                            n=args.instances,
                        ),
                        **{key: getattr(result, key) for key in METRICS},
                        **{key: result.pd.get(key) for key in PD_METRICS},
                    }
                    rows.append(row)
                    print(
                        f"  [{len(rows)}/{total}] {rate:g} req/s seed {seed} {layout} {policy}: "
                        f"TTFT p90 {row['ttft_p90_s']:.2f} s, SLO {row['slo_attainment']:.3f} "
                        f"({time.perf_counter() - started:.0f} s)",
                        file=sys.stderr,
                    )
    print_tables(rows, rates=args.rates)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot is not None:
        plot(rows, path=args.plot, instances=args.instances)
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else math.nan


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[float, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["rate_rps"], row["layout"], row["policy"]), []).append(row)
    return groups


def print_tables(rows: list[dict[str, Any]], *, rates: list[float]) -> None:
    groups = _groups(rows)
    for rate in rates:
        print(f"\n### {rate:g} req/s\n")
        print(
            "| pool | policy | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | e2e p50 | e2e p90 "
            "| SLO | hit rate | prefill util | decode util | transfer p50 | decode-only |"
        )
        print("|" + "---|" * 14)
        for (group_rate, layout, policy), members in groups.items():
            if group_rate != rate:
                continue

            def m(
                key: str,
                scale: float = 1.0,
                digits: int = 2,
                members: list[dict[str, Any]] = members,
            ) -> str:
                value = _median(members, key)
                return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"

            requests = _median(members, "decode_only_requests") + _median(
                members, "disaggregated_requests"
            )
            local = (
                "-"
                if math.isnan(requests)
                else f"{_median(members, 'decode_only_requests') / requests:.0%}"
            )
            print(
                f"| {layout} | {policy} | {m('ttft_p50_s')} s | {m('ttft_p90_s')} s "
                f"| {m('tpot_p50_s', 1e3, 1)} ms | {m('tpot_p90_s', 1e3, 1)} ms "
                f"| {m('e2e_p50_s')} s | {m('e2e_p90_s')} s | {m('slo_attainment', 100, 1)}% "
                f"| {m('cache_hit_rate', 100, 1)}% | {m('prefill_utilisation', 100, 0)}% "
                f"| {m('decode_utilisation', 100, 0)}% | {m('transfer_p50_s', 1e3, 1)} ms "
                f"| {local} |"
            )


def plot(rows: list[dict[str, Any]], *, path: Path, instances: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    series: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    for (rate, layout, policy), members in sorted(groups.items()):
        series.setdefault((layout, policy), []).append(
            (rate, {key: _median(members, key) for key in METRICS})
        )
    panels = (
        ("slo_attainment", "SLO attainment (TTFT <= 5 s)", 1.0, False),
        ("ttft_p90_s", "TTFT P90 (s)", 1.0, True),
        ("tpot_p90_s", "TPOT P90 (ms)", 1e3, True),
        ("e2e_p90_s", "end-to-end P90 (s)", 1.0, True),
    )
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layouts = sorted({layout for layout, _ in series}, key=lambda x: (x != "unified", x))
    for axis, (key, title, scale, log) in zip(axes.flat, panels, strict=True):
        for (layout, policy), points in series.items():
            colour = colours[layouts.index(layout) % len(colours)]
            axis.plot(
                [rate for rate, _ in points],
                [values[key] * scale for _, values in points],
                marker="o",
                color=colour,
                linestyle="-" if policy == "dualmap" else "--",
                label=f"{layout} {policy}",
            )
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("request rate (req/s)")
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(
        f"Mooncake trace, {instances} simulated H100s: unified vs prefill:decode pools "
        "(solid dualmap, dashed round_robin)",
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
