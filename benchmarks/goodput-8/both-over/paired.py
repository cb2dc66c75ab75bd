"""Seed-paired SLO attainment of routing variants at fixed rates around the goodput cliff.

Near its goodput a policy's attainment swings by 10 points from seed to seed, so two
variants are compared seed by seed: the same seed (same ring namespace, scrape phase and
random choices) at the same rate through each variant, and the mean of the differences with
its standard error.

    # one variant's runs (16 seeds x 4 rates, two at a time), with the twinroute given
    python3 paired.py run --label after --twinroute .venv/bin/twinroute --out runs
    python3 paired.py run --label preble --policy preble --twinroute .venv/bin/twinroute \
        --out runs
    # a summary per run (what `paired.json` holds) and the comparison against one label
    python3 paired.py compare --out runs --base before --json paired.json

`twinroute simulate --instances 8 --warmup 0.125` on the bundled trace, one run per (seed,
rate); each run's JSON is written to `OUT/LABEL-SEED-RATE.json` (skipped when present).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RATES = ("8.25", "8.36", "8.47", "8.6")
SEEDS = range(16)
KEPT = ("slo_attainment", "slo_switches", "cache_hit_rate", "ttft_p90_s", "preemptions")


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)

    def one(seed_rate: tuple[int, str]) -> None:
        seed, rate = seed_rate
        path = args.out / f"{args.label}-{seed}-{rate}.json"
        if path.exists():
            return
        subprocess.run(
            [args.twinroute, "simulate", "--policy", args.policy, "--instances", "8",
             "--rate", rate, "--seed", str(seed), "--warmup", "0.125", "--json", str(path),
             "--quiet"],
            check=True, capture_output=True,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, [(s, r) for s in SEEDS for r in RATES]))


def compare(args: argparse.Namespace) -> None:
    labels = sorted({p.name.split("-")[0] for p in args.out.glob("*.json")})
    runs = {
        label: {
            rate: [
                {k: json.loads((args.out / f"{label}-{s}-{rate}.json").read_text())[k]
                 for k in KEPT}
                for s in SEEDS
            ]
            for rate in RATES
        }
        for label in labels
    }  # fmt: skip
    table = {}
    for label in labels:
        rows = {}
        for rate in RATES:
            mine = [r["slo_attainment"] for r in runs[label][rate]]
            base = [r["slo_attainment"] for r in runs[args.base][rate]]
            diffs = [a - b for a, b in zip(mine, base, strict=True)]
            rows[rate] = {
                "slo_attainment_mean": round(statistics.mean(mine), 4),
                f"minus_{args.base}_mean": round(statistics.mean(diffs), 4),
                f"minus_{args.base}_standard_error": round(
                    statistics.stdev(diffs) / len(diffs) ** 0.5, 4
                ),
                "seeds_better": sum(d > 0 for d in diffs),
                "seeds_worse": sum(d < 0 for d in diffs),
                "slo_switches_mean": round(
                    statistics.mean(r["slo_switches"] for r in runs[label][rate]), 1
                ),
                "cache_hit_rate_mean": round(
                    statistics.mean(r["cache_hit_rate"] for r in runs[label][rate]), 4
                ),
                "preemptions_mean": round(
                    statistics.mean(r["preemptions"] for r in runs[label][rate]), 1
                ),
            }
            print(
                f"{label:8s} @ {rate}: {rows[rate]['slo_attainment_mean']:.1%} within the SLO, "
                f"{rows[rate][f'minus_{args.base}_mean']:+.1%} "
                f"+-{rows[rate][f'minus_{args.base}_standard_error']:.1%} vs {args.base} "
                f"({rows[rate]['seeds_better']} seeds better, {rows[rate]['seeds_worse']} worse)"
            )
        table[label] = rows
    if args.json:
        report = {"rates": RATES, "seeds": list(SEEDS), "base": args.base, "summary": table,
                  "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--label", required=True)
    run_parser.add_argument("--policy", default="dualmap")
    run_parser.add_argument("--twinroute", default=".venv/bin/twinroute")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--jobs", type=int, default=2)
    compare_parser = sub.add_parser("compare")
    compare_parser.add_argument("--out", type=Path, required=True)
    compare_parser.add_argument("--base", required=True)
    compare_parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()
