"""Live hotspot rebalancing: dualmap through the gRPC scheduler with and without the admission
hold, at several rates, on the same engines and trace.

For each `--speedups` S and hold in (off, on) this runs

    twinroute bench live --routers twinroute_dualmap --twinroute-scheduler grpc \\
        --admission-hold H --duration D --speedup S --ttft-slo-s 5 --out OUT/sS-H

(fresh engine-sim processes, scheduler and router each time), then reads each run's
`live.json` and the scheduler's shutdown line on the hold (requests held, seconds held, how
they left: moved to the other candidate, released as the backlog cleared, or at the deadline).
Prints a markdown table and writes `rebalance_live.json` and `rebalance_live.png` to `--out`.
`--reuse` skips runs whose `live.json` is already there (to re-tabulate).

Run:  twinroute bench rebalance-live --speedups 1.0 1.1 1.25 1.5 \\
          --duration 120 --out results/rebalance-live
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

_HOLD_LINE = re.compile(
    r"admission hold: (?P<held>\d+) requests held, (?P<seconds>[\d.]+) s held in all, "
    r"left by (?P<outcomes>\{.*\})"
)


def run_one(*, speedup: float, hold: str, duration: float, out: Path, reuse: bool) -> Path:
    target = out / f"s{speedup:g}-{hold}"
    if reuse and (target / "live.json").exists():
        return target
    command = [
        sys.executable, "-m", "twinroute", "bench", "live",
        "--routers", "twinroute_dualmap", "--twinroute-scheduler", "grpc",
        "--admission-hold", hold, "--duration", f"{duration:g}", "--speedup", f"{speedup:g}",
        "--ttft-slo-s", "5", "--out", str(target),
    ]  # fmt: skip
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return target


def read_run(target: Path) -> dict[str, Any]:
    data = json.loads((target / "live.json").read_text())
    result = data["routers"]["twinroute_dualmap"]
    row: dict[str, Any] = {
        "command": data["command"],
        "requests": result["requests"],
        "ttft_p50_s": result["ttft_p50_s"],
        "ttft_p90_s": result["ttft_p90_s"],
        "slo_attainment": result["slo_attainment"],
        "throughput_rps": result["throughput_rps"],
        "errors": result["errors"],
        "router_overhead_ms": result["router_overhead_ms"],
        "held": 0,
        "held_seconds": 0.0,
        "outcomes": {},
    }
    for log in sorted((target / "logs").glob("*scheduler.log")):
        for match in _HOLD_LINE.finditer(log.read_text()):
            row["held"] = int(match["held"])
            row["held_seconds"] = float(match["seconds"])
            row["outcomes"] = ast.literal_eval(match["outcomes"])
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speedups", type=float, nargs="+", default=[1.0, 1.1, 1.25, 1.5], metavar="S",
        help="trace speedups to run (`bench live --speedup`), each with the hold off and on",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of replay per run (wall clock)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/rebalance-live"),
        help="folder for each run's `bench live` output (OUT/sS-on|off), "
        "rebalance_live.json and .png",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", action="store_true", help="skip runs whose live.json is already there"
    )


def run(args: argparse.Namespace) -> int:
    rows = []
    for speedup in args.speedups:
        for hold in ("off", "on"):
            target = run_one(
                speedup=speedup, hold=hold, duration=args.duration, out=args.out, reuse=args.reuse
            )
            row = {"speedup": speedup, "hold": hold, "duration_s": args.duration}
            rows.append(row | read_run(target))
    print(
        "| speedup | admission hold | requests | TTFT p50 (s) | TTFT p90 (s) | SLO 5 s met | "
        "errors | held | moved | released (backlog / deadline) | client-minus-engine TTFT (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        outcomes = row["outcomes"]
        print(
            f"| {row['speedup']:g} | {row['hold']} | {row['requests']} | {row['ttft_p50_s']:.2f} | "
            f"{row['ttft_p90_s']:.2f} | {100 * row['slo_attainment']:.1f}% | {row['errors']} | "
            f"{row['held']} | {outcomes.get('moved', 0)} | {outcomes.get('backlog', 0)} / "
            f"{outcomes.get('deadline', 0)} | {row['router_overhead_ms']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rebalance_live.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, path=args.out / "rebalance_live.png")
    return 0


def plot(rows: list[dict[str, Any]], *, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for hold in ("off", "on"):
        mine = sorted((r for r in rows if r["hold"] == hold), key=lambda r: r["speedup"])
        rates = [r["requests"] / r["duration_s"] for r in mine]
        label = f"admission hold {hold}"
        left.plot(rates, [100 * r["slo_attainment"] for r in mine], marker="o", label=label)
        right.plot(rates, [r["ttft_p90_s"] for r in mine], marker="o", label=label)
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("requests with TTFT <= 5 s (%)")
    right.set_xlabel("offered rate (req/s)")
    right.set_ylabel("TTFT P90 (s)")
    left.legend(fontsize=8)
    figure.suptitle(
        "dualmap live, 4 engine-sims (Llama-3-8B/H100 model), gRPC scheduler", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
