#!/usr/bin/env python3
"""Do two checkouts route the same? Fixed-seed simulations of both, JSON compared.

For a change that must not change behaviour (a refactor): runs the same battery of
`twinroute simulate` runs (every policy at three rates and two seeds, prefill/decode pools,
rebalancing off, phase-blind, a 16-instance pool with a 2 s SLO, a synthetic trace, a faster
scrape, a small KV cache) and one `twinroute bench goodput --seeds 1` with each checkout's
`.venv`, then compares every JSON document with wall times, the recorded command and the
trace's path (they name the checkout) left out. Exit status 1 when anything differs.

    python tools/compare_behaviour.py --before ../baseline --after . --out /tmp/behaviour
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

POLICIES = (
    "dualmap", "round_robin", "least_loaded", "consistent_hash", "chwbl", "cache_aware",
    "min_ttft", "preble",
)  # fmt: skip
IGNORED_KEYS = {"wall_s", "command", "trace"}


def battery(*, slo_flag: str, scrape_flag: str) -> dict[str, list[str]]:
    """Run name -> `twinroute simulate` arguments."""
    runs = {
        f"sim_{policy}_r{rate}_s{seed}": [
            "--policy", policy, "--rate", str(rate), "--seed", str(seed)
        ]
        for policy in POLICIES
        for rate in (2, 6, 10)
        for seed in (0, 1)
    }  # fmt: skip
    runs.update(
        pd71=["--pd", "7:1", "--rate", "6", "--seed", "0"],
        pd44=["--pd", "4:4", "--rate", "4", "--seed", "1", "--pd-min-prefill-tokens", "50"],
        pd71_rr=["--pd", "7:1", "--rate", "6", "--policy", "round_robin"],
        reb_off=["--rebalance", "off", "--rate", "8"],
        pa_off=["--phase-aware", "off", "--rate", "8"],
        slo2=[slo_flag, "2", "--rate", "6", "--instances", "16", "--replicate", "2"],
        synthetic=["--format", "synthetic", "--synthetic-requests", "2000", "--synthetic-rate",
                   "20", "--zipf", "1.1", "--seed", "3"],
        scrape=[scrape_flag, "0.5", "--rate", "8", "--policy", "preble"],
        kv=["--kv-capacity-tokens", "200000", "--rate", "3", "--policy", "cache_aware",
            "--max-requests", "1500"],
    )  # fmt: skip
    return runs


def run_checkout(checkout: Path, out: Path) -> None:
    twinroute = str(checkout / ".venv" / "bin" / "twinroute")
    usage = subprocess.run(
        [twinroute, "simulate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    # Two flags gained their unit once; both spellings are known here.
    slo_flag = "--ttft-slo-s" if "--ttft-slo-s" in usage else "--ttft-slo"
    scrape_flag = "--scrape-interval-s" if "--scrape-interval-s" in usage else "--scrape-interval"
    out.mkdir(parents=True, exist_ok=True)
    runs = battery(slo_flag=slo_flag, scrape_flag=scrape_flag)
    for index, (name, arguments) in enumerate(runs.items(), start=1):
        print(f"{checkout.name}: [{index}/{len(runs) + 1}] simulate {name}", file=sys.stderr)
        subprocess.run(
            [twinroute, "simulate", "--quiet", "--json", str(out / f"{name}.json"), *arguments],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    print(f"{checkout.name}: [{len(runs) + 1}/{len(runs) + 1}] bench goodput", file=sys.stderr)
    subprocess.run(
        [twinroute, "bench", "goodput", "--seeds", "1", "--jobs", "2", "--no-plots",
         "--out", str(out / "goodput")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stripped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: stripped(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [stripped(v) for v in value]
    return value


def compare(before: Path, after: Path) -> list[str]:
    differing = []
    for path in sorted(before.rglob("*.json")):
        other = after / path.relative_to(before)
        texts = [
            json.dumps(stripped(json.loads(p.read_text())), sort_keys=True) if p.exists() else ""
            for p in (path, other)
        ]
        if texts[0] != texts[1]:
            differing.append(str(path.relative_to(before)))
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout with a .venv")
    parser.add_argument("--after", type=Path, required=True, help="checkout with a .venv")
    parser.add_argument("--out", type=Path, required=True, help="folder for both runs' JSON")
    args = parser.parse_args()
    for name in ("before", "after"):
        run_checkout(getattr(args, name).resolve(), args.out / name)
    documents = len(list((args.out / "before").rglob("*.json")))
    differing = compare(args.out / "before", args.out / "after")
    for name in differing:
        print(f"differs: {name}")
    print(f"{documents} JSON documents compared, {len(differing)} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
