"""`twinroute bench NAME`: a dispatcher over benchmark modules, like the top-level CLI.

Each benchmark module provides `add_arguments(parser)` and `run(args) -> int`, and imports its
heavy dependencies (matplotlib, the simulator) inside functions so listing benches stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Protocol

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "elastic": (
        "twinroute.bench.elastic",
        "scale a pool out and back in under load: SLO over time, keys remapped, failed requests",
    ),
    "goodput": (
        "twinroute.bench.goodput",
        "highest request rate each policy serves within the TTFT SLO (simulated pool)",
    ),
    "live": (
        "twinroute.bench.live",
        "twinroute vs sglang-router vs vllm-router in front of the same engine-sim processes",
    ),
    "soak": (
        "twinroute.bench.soak",
        "sustained traffic through engine-sims, scheduler and router; --chaos injects faults",
    ),
}


class _Bench(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Bench:
    module: _Bench = importlib.import_module(BENCHES[name][0])
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, (_module, help_text) in BENCHES.items():
        sub = benches.add_parser(name, help=help_text, description=help_text)
        _load(name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench", None) is None:
        print("twinroute bench: choose one of " + ", ".join(sorted(BENCHES)))
        return 2
    return _load(args.bench).run(args)
