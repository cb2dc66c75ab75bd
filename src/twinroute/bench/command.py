"""`twinroute bench NAME`: every benchmark of the project, one subcommand each.

This package is the one home of benchmark code; what they measured (write-ups, JSON behind
every figure, plots) lives in `benchmarks/`, and `BENCHMARKS.md` summarises it. Each
benchmark module provides `add_arguments(parser)` and `run(args) -> int`, states its method
in its docstring, prints the exact command it ran, and imports its heavy dependencies
(matplotlib, the simulator, grpc) inside functions where it can, so listing benches stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Protocol

from twinroute.cli import DefaultsShown

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
    "vllm": (
        "twinroute.bench.vllm_live",
        "the routers in front of real vLLM CPU engines: prefix hits vs a merged-cache bound, TTFT",
    ),
    "soak": (
        "twinroute.bench.soak",
        "sustained traffic through engine-sims, scheduler and router; --chaos injects faults",
    ),
    "decision-cost": (
        "twinroute.bench.decision_cost",
        "microseconds per routing decision, per policy, at 8 and 256 endpoints",
    ),
    "scheduler-pick": (
        "twinroute.bench.scheduler_pick",
        "Pick latency and CPU of the gRPC scheduler process under an open-loop load",
    ),
    "router-overhead": (
        "twinroute.bench.router_overhead",
        "latency and CPU the routers add in front of near-instant engines",
    ),
    "streaming": (
        "twinroute.bench.streaming",
        "streams/s, chunk gaps and CPU per stream of each path (router, Envoy + picker, peers)",
    ),
    "ring-quality": (
        "twinroute.bench.ring_quality",
        "keys remapped when one endpoint joins or leaves, and load balance of the dual ring",
    ),
    "pd-layouts": (
        "twinroute.bench.pd_layouts",
        "unified vs prefill:decode pools of the same size, simulated",
    ),
    "sim-switches": (
        "twinroute.bench.sim_switches",
        "dualmap with hotspot rebalancing off, and phase-blind, each switched alone (simulated)",
    ),
    "rebalance-live": (
        "twinroute.bench.rebalance_live",
        "the live scheduler's admission hold on vs off (runs `twinroute bench live`)",
    ),
    "ha": (
        "twinroute.bench.ha",
        "1, 2 and 3 active-active scheduler replicas, one killed under load; the tier's Picks/s",
    ),
    "migration-drain": (
        "twinroute.bench.migration_drain",
        "draining an engine with migration off, by router recompute, and by KV hooks",
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
        sub = benches.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsShown
        )
        _load(name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench", None) is None:
        print("twinroute bench: choose one of " + ", ".join(sorted(BENCHES)))
        return 2
    try:
        return _load(args.bench).run(args)
    except ValueError as error:
        print(f"twinroute bench {args.bench}: {error}", file=sys.stderr)
        return 2
