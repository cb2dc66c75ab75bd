"""Each mechanism switched alone, in the simulator: hotspot rebalancing and phase-aware placement.

For every rate and seed, dualmap runs the bundled Mooncake trace on `--instances` simulated
instances three times: with the defaults (rebalancing on, phase-aware on), with rebalancing
off, and phase-blind, i.e. exactly `twinroute simulate --policy dualmap --rate R --seed S
--warmup W [--rebalance off | --phase-aware off]`. Prints a markdown table per rate (median
/ mean [min-max] over seeds) of TTFT P90, SLO attainment and end-to-end P90, and writes
the rows as JSON and a PNG of SLO attainment and TTFT P90 against the rate.

`--weights W...` adds phase-aware runs with other weights of the interference term (an ablation
that `twinroute simulate` has no flag for; the weight is `PolicyConfig.phase_interference_weight`).

Run:  twinroute bench sim-switches --rates 7 7.5 8 8.5 9 \\
          --seeds 0 1 2 3 4 5 6 7 8 9 --weights 0 0.05 \\
          --json benchmarks/sim_switches.json --plot benchmarks/sim_switches.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import bundled_mooncake_trace


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    rebalance: bool
    phase_aware: bool
    flags: str
    # None: PolicyConfig's default interference weight (no CLI flag; set through RunSpec).
    interference_weight: float | None = None


VARIANTS = (
    Variant("defaults (rebalance on, phase-aware on)", True, True, ""),
    Variant("rebalance off", False, True, " --rebalance off"),
    Variant("phase-blind", True, False, " --phase-aware off"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from twinroute.vocabulary import POLICY_NAMES

    parser.add_argument(
        "--rates", type=float, nargs="+", default=[7.0, 8.0, 9.0], metavar="RATE",
        help="request rates to run, req/s",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
        help="seeds to run at each rate",
    )  # fmt: skip
    parser.add_argument("--instances", type=int, default=8, help="simulated instances")
    parser.add_argument(
        "--warmup", type=float, default=0.125,
        help="share of the earliest requests left out of the metrics (simulate --warmup)",
    )  # fmt: skip
    parser.add_argument(
        "--policy", default="dualmap", choices=POLICY_NAMES,
        help="routing policy run with each switch",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write a PNG here")
    parser.add_argument(
        "--weights",
        type=float,
        nargs="*",
        default=[],
        metavar="WEIGHT",
        help="also run phase-aware with these interference weights (ablation of the score term)",
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, metavar="JSON",
        help="re-tabulate and re-plot the rows saved by --json, running nothing",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    variants = VARIANTS + tuple(
        Variant(f"phase-aware, interference weight {w:g}", True, True, "", w) for w in args.weights
    )

    trace = TraceSpec(path=str(bundled_mooncake_trace()))
    recorded_rate = trace.summary().rate_rps
    rows: list[dict[str, object]] = []
    total = len(args.rates) * len(args.seeds) * len(variants)
    if args.from_json is not None:
        rows = json.loads(args.from_json.read_text())
        saved: list[dict[str, Any]] = rows
        args.rates = sorted({float(r["rate_rps"]) for r in saved})
        weights = sorted(
            {
                float(r["interference_weight"])
                for r in saved
                if r.get("interference_weight") is not None
            }
        )
        variants = VARIANTS + tuple(
            Variant(f"phase-aware, interference weight {w:g}", True, True, "", w) for w in weights
        )
        total = 0
    for rate in args.rates if total else ():
        for seed in args.seeds:
            for variant in variants:
                spec = RunSpec(
                    trace=trace,
                    policy=args.policy,
                    instances=args.instances,
                    time_scale=recorded_rate / rate,
                    warmup_fraction=args.warmup,
                    seed=seed,
                    rebalance=variant.rebalance,
                    phase_aware=variant.phase_aware,
                )
                if variant.interference_weight is not None:
                    spec = dataclasses.replace(
                        spec, phase_interference_weight=variant.interference_weight
                    )
                result = run_spec(spec, progress=None)
                rows.append(
                    {
                        "variant": variant.name,
                        "rate_rps": rate,
                        "seed": seed,
                        "ttft_p90_s": result.ttft_p90_s,
                        "slo_attainment": result.slo_attainment,
                        "e2e_p90_s": result.e2e_p90_s,
                        "rebalance_moves": result.rebalance_moves,
                        "interference_weight": variant.interference_weight,
                        "command": (
                            f"twinroute simulate --policy {args.policy} --instances "
                            f"{args.instances} --rate {rate:g} --seed {seed} --warmup "
                            f"{args.warmup:g}{variant.flags}"
                        ),
                    }
                )
                print(f"{len(rows)}/{total} runs", file=sys.stderr, flush=True)
    print(table(rows, rates=args.rates, variants=variants))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot is not None:
        plot(rows, rates=args.rates, variants=VARIANTS, path=args.plot)
    return 0


def _cell(values: list[float], *, fmt: str) -> str:
    median, mean = statistics.median(values), statistics.fmean(values)
    return (
        f"{format(median, fmt)} / {format(mean, fmt)} "
        f"[{format(min(values), fmt)}-{format(max(values), fmt)}]"
    )


def table(
    rows: list[dict[str, object]], *, rates: list[float], variants: tuple[Variant, ...]
) -> str:
    lines = [
        "| rate (req/s) | variant | TTFT P90 (s) | SLO attainment (%) | E2E P90 (s) | "
        "rebalancing moves |",
        "|---:|---|---|---|---|---|",
    ]
    for rate in rates:
        for variant in variants:
            mine = [r for r in rows if r["rate_rps"] == rate and r["variant"] == variant.name]

            def values(key: str, subset: list[dict[str, object]] = mine) -> list[float]:
                return [float(r[key]) for r in subset]  # type: ignore[arg-type]

            lines.append(
                f"| {rate:g} | {variant.name} | {_cell(values('ttft_p90_s'), fmt='.2f')} | "
                f"{_cell([100 * v for v in values('slo_attainment')], fmt='.1f')} | "
                f"{_cell(values('e2e_p90_s'), fmt='.1f')} | "
                f"{_cell(values('rebalance_moves'), fmt='.0f')} |"
            )
    return "\n".join(lines)


def plot(
    rows: list[dict[str, object]],
    *,
    rates: list[float],
    variants: tuple[Variant, ...],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    for variant in variants:
        slo = []
        p90 = []
        e2e = []
        for rate in rates:
            mine = [r for r in rows if r["rate_rps"] == rate and r["variant"] == variant.name]
            slo.append(statistics.fmean(100 * float(r["slo_attainment"]) for r in mine))  # type: ignore[arg-type]
            p90.append(statistics.median(float(r["ttft_p90_s"]) for r in mine))  # type: ignore[arg-type]
            e2e.append(statistics.median(float(r["e2e_p90_s"]) for r in mine))  # type: ignore[arg-type]
        left.plot(rates, slo, marker="o", label=variant.name)
        middle.plot(rates, p90, marker="o", label=variant.name)
        right.plot(rates, e2e, marker="o", label=variant.name)
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("requests with TTFT <= 5 s (%, mean over seeds)")
    left.axhline(90, color="grey", linewidth=0.8, linestyle="--")
    middle.set_xlabel("request rate (req/s)")
    middle.set_ylabel("TTFT P90 (s, median over seeds)")
    middle.set_yscale("log")
    right.set_xlabel("request rate (req/s)")
    right.set_ylabel("end-to-end latency P90 (s, median over seeds)")
    right.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle("dualmap, Mooncake trace, 8 simulated H100s", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
