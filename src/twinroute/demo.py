"""`twinroute demo` (`make demo`): why twinroute, on the bundled Mooncake trace, on one machine.

1. **Simulated**: a pool of 8 vLLM instances (the `llama3-8b-h100` profile) behind the live
   routing core, once per policy and request rate: the share of requests within the TTFT SLO,
   TTFT percentiles, the engines' prefix-cache hit rate against what one cache of the whole
   pool's size could reach, and how evenly the load spreads.
2. **Live**: a window of the same trace through real processes on 127.0.0.1 (4 engine
   simulators): what users run today (a Kubernetes Service, i.e. round robin; sglang-router and
   vllm-router when they can be installed) and twinroute (its router with a `twinroute
   scheduler`, and Envoy with the scheduler as its endpoint picker), as `twinroute bench live`.
   The window is one where the trace reuses prefixes: its first minutes barely repeat, so no
   router could show a cache there.
3. **Why twinroute**: a summary table, one sentence per alternative, and where twinroute did
   not win. Everything printed is also saved (Markdown and JSON, each with the command that
   reproduces it) under `--out`; the terms are defined in docs/glossary.md.
No GPU, no Kubernetes; about four minutes (about two with `--peers off --live-seconds 20`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twinroute.simulator.command import positive_int
from twinroute.simulator.runner import RunSpec, TraceSpec, run_spec
from twinroute.simulator.traces import bundled_mooncake_trace, read_mooncake, summarize
from twinroute.vocabulary import DEFAULT_TTFT_SLO_S

DEFAULT_RATES = (6.0, 8.0)
# Trace seconds where the live window starts: the bundled trace repeats about a third of its
# prompt tokens within 40 s from here, against 7% in its first 40 s (`twinroute.bench.live.
# window_reuse`), and 4 engine simulators are busy but not swamped.
DEFAULT_LIVE_TRACE_START_S = 900.0
GLOSSARY = "docs/glossary.md"
# In the order the live part runs them: twinroute, what users have today, Envoy last.
LIVE_ROUTERS = (
    "twinroute_dualmap",
    "twinroute_round_robin",
    "sglang_cache_aware",
    "vllm_cache_aware",
    "twinroute_envoy",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rates",
        default=",".join(f"{r:g}" for r in DEFAULT_RATES),
        help="comma-separated request rates (req/s) to replay the trace at, simulated",
    )
    parser.add_argument(
        "--instances", type=positive_int, default=8, help="vLLM instances in the simulated pool"
    )
    parser.add_argument(
        "--policies",
        default=None,
        help="comma-separated routing policies to simulate (default: every policy)",
    )
    parser.add_argument(
        "--ttft-slo-s",
        type=float,
        default=DEFAULT_TTFT_SLO_S,
        help="TTFT objective in seconds, simulated and live",
    )
    parser.add_argument(
        "--live-seconds",
        type=float,
        default=40.0,
        help="then replay this many seconds of the trace through real processes on 127.0.0.1, "
        "once per router; 0 = simulated part only",
    )
    parser.add_argument(
        "--live-trace-start-s",
        type=float,
        default=DEFAULT_LIVE_TRACE_START_S,
        help="where in the trace (seconds) the live window starts",
    )
    parser.add_argument(
        "--peers",
        choices=("on", "off"),
        default="on",
        help="live: also run sglang-router and vllm-router (pip-installed into "
        ".tools/peers-venv on first use; skipped when they cannot be installed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/demo"),
        help="folder for the tables (Markdown and JSON) and PNG plots",
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
        print(
            f"twinroute demo: unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}",
            file=sys.stderr,
        )
        return 2
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        print(f"twinroute demo: --rates wants numbers, got {args.rates!r}", file=sys.stderr)
        return 2
    if (
        not rates
        or min(rates) <= 0
        or args.ttft_slo_s <= 0
        or args.live_seconds < 0
        or args.live_trace_start_s < 0
    ):
        print(
            "twinroute demo: --rates > 0, --ttft-slo-s > 0, --live-seconds >= 0 and "
            "--live-trace-start-s >= 0 please",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    simulated = _simulated(args, policies=policies, rates=rates)
    live_document: dict[str, Any] | None = None
    if args.live_seconds > 0:
        code, live_document = _live(args)
        if code != 0:
            return code
    _summary(args, simulated=simulated, live=live_document)
    return 0


# -- simulated ---------------------------------------------------------------------------------


def _simulated(
    args: argparse.Namespace, *, policies: list[str], rates: list[float]
) -> dict[str, Any]:
    from twinroute.formatting import seconds

    path = bundled_mooncake_trace()
    summary = summarize(read_mooncake(path))
    trace = TraceSpec(path=str(path))
    intro = (
        f"Simulated: the bundled Mooncake trace ({summary.requests:,} requests, mean prompt "
        f"{summary.mean_prompt_tokens:,.0f} tokens, recorded at {summary.rate_rps:.2f} req/s) "
        f"through {args.instances} simulated vLLM instances (Llama-3-8B on H100), every "
        f"routing policy, TTFT SLO {args.ttft_slo_s:g} s. Terms: {GLOSSARY}."
    )
    print(intro, flush=True)
    started = time.perf_counter()
    header = (
        "| req/s | policy | within SLO | TTFT p50 | TTFT p90 | cache hit | ideal "
        "| load CV | SLO switches |"
    )
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [header, rule]
    print(header, flush=True)
    print(rule, flush=True)
    records: dict[str, dict[str, Any]] = {}
    verdicts: list[str] = []
    for rate in rates:
        rows: list[tuple[str, Any]] = []
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
            records.setdefault(f"{rate:g}", {})[policy] = result.summary()
            line = (
                f"| {rate:g} | {policy} | {result.slo_attainment:.1%} "
                f"| {seconds(result.ttft_p50_s)} | {seconds(result.ttft_p90_s)} "
                f"| {result.cache_hit_rate:.1%} | {result.ideal_cache_hit_rate:.1%} "
                f"| {result.load_cv:.2f} | {result.slo_switches} |"
            )
            lines.append(line)
            print(line, flush=True)
        verdicts.append(_rank_line(rate, rows))
    for verdict in verdicts:
        print(verdict)
    elapsed = time.perf_counter() - started
    print(
        f"({elapsed:.0f} s. `ideal` is what one cache as large as the whole pool would hit; "
        "`twinroute bench goodput` finds each policy's highest rate within the SLO.)",
        flush=True,
    )
    command = shlex.join(
        [
            "twinroute", "demo", "--live-seconds", "0",
            "--rates", ",".join(f"{r:g}" for r in rates),
            "--instances", str(args.instances), "--ttft-slo-s", f"{args.ttft_slo_s:g}",
            *(["--policies", ",".join(policies)] if args.policies else []),
        ]
    )  # fmt: skip
    ideal = max(
        (float(row["ideal_cache_hit_rate"]) for by in records.values() for row in by.values()),
        default=None,
    )
    document = {
        "command": command,
        "trace": path.name,
        "instances": args.instances,
        "ttft_slo_s": args.ttft_slo_s,
        "rates": records,
        "verdicts": verdicts,
    }
    (args.out / "simulated.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "simulated.md").write_text(
        f"Command: `{command}`\n\n{intro}\n\n" + "\n".join(lines) + "\n\n"
        + "\n".join(f"- {v}" for v in verdicts) + "\n"
    )  # fmt: skip
    return {"document": document, "ideal": ideal}


def _rank_line(rate: float, rows: list[tuple[str, Any]]) -> str:
    """Where dualmap stands among the policies at one rate, said plainly either way."""
    ranked = sorted(rows, key=lambda row: row[1].slo_attainment, reverse=True)
    best_name, best = ranked[0]
    place = next((i for i, (name, _) in enumerate(ranked, start=1) if name == "dualmap"), None)
    if place is None:
        return f"{rate:g} req/s: best within the SLO {best_name} ({best.slo_attainment:.1%})"
    ours = ranked[place - 1][1]
    if len(ranked) == 1:
        return f"{rate:g} req/s: dualmap {ours.slo_attainment:.1%} within the SLO"
    if place == 1:
        runner_name, runner = ranked[1]
        return (
            f"{rate:g} req/s: dualmap kept the most requests within the SLO "
            f"({ours.slo_attainment:.1%}; next {runner_name} {runner.slo_attainment:.1%})"
        )
    return (
        f"{rate:g} req/s: dualmap {ours.slo_attainment:.1%} within the SLO, "
        f"{_ordinal(place)} of {len(ranked)}; {best_name} did best ({best.slo_attainment:.1%})"
    )


def _ordinal(place: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(place, f"{place}th")


# -- live --------------------------------------------------------------------------------------


def _live(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """A window of the trace through real processes, via `twinroute bench live`."""
    from twinroute.bench import live

    routers = [name for name in LIVE_ROUTERS
               if args.peers == "on" or not name.startswith(("sglang", "vllm"))]  # fmt: skip
    routers = _installable(routers)
    print()
    print(
        f"Live: {args.live_seconds:g} s of the same trace (from second "
        f"{args.live_trace_start_s:g}) sent to 4 `twinroute engine-sim` processes on 127.0.0.1 "
        "through each of: " + ", ".join(live.label(name) for name in routers) + ".",
        flush=True,
    )
    argv = [
        f"--routers={','.join(routers)}",
        f"--duration={args.live_seconds:g}",
        f"--trace-start-s={args.live_trace_start_s:g}",
        f"--ttft-slo-s={args.ttft_slo_s:g}",
        "--twinroute-scheduler=grpc",
        f"--out={args.out}",
    ]
    parser = argparse.ArgumentParser(prog="twinroute demo (live)")
    live.add_arguments(parser)
    live_args = parser.parse_args(argv)
    live_args.reproduce_with = shlex.join(["twinroute", "bench", "live", *argv])
    try:
        code = live.run(live_args)
    except ValueError as error:  # e.g. a window past the end of the trace
        print(f"twinroute demo: {error}", file=sys.stderr)
        return 2, None
    if code != 0:
        return code, None
    document: dict[str, Any] = json.loads((args.out / "live.json").read_text())
    return 0, document


def _installable(routers: list[str]) -> list[str]:
    """The routers whose programs are here or can be installed; the others are skipped with
    the reason (no network, no wheel for this platform)."""
    from twinroute.bench import live

    kept = []
    for name in routers:
        try:
            live.ensure_peers([name])
        except (subprocess.CalledProcessError, OSError) as error:
            print(f"skipping {live.label(name)}: it could not be installed ({error})", flush=True)
            continue
        kept.append(name)
    return kept


# -- summary -----------------------------------------------------------------------------------


def _summary(
    args: argparse.Namespace, *, simulated: dict[str, Any], live: dict[str, Any] | None
) -> None:
    from twinroute.bench import command_line
    from twinroute.demo_report import live_verdict

    out: Path = args.out
    sections = ["# Why twinroute?", ""]
    data: dict[str, Any] = {"simulated": simulated["document"]["verdicts"]}
    if live is not None:
        verdict = live_verdict(live, simulated_ideal=simulated["ideal"])
        sections += [
            f"Live, {live['requests']} requests through each path "
            f"(reproduce: `{live['command']}`):",
            "",
            verdict.markdown,
            "",
        ]
        data["live"] = verdict.data
        data["live_command"] = live["command"]
    sections += [
        f"Simulated, {args.instances} instances, the whole trace "
        f"(reproduce: `{simulated['document']['command']}`):",
        "",
        *(f"- {line}" for line in simulated["document"]["verdicts"]),
        "",
        f"What the numbers mean: {GLOSSARY}. More: BENCHMARKS.md (every benchmark, and where "
        'twinroute loses); on Kubernetes: README.md, "Running on Kubernetes".',
    ]
    text = "\n".join(sections)
    # What this run wrote (an earlier run's files may lie beside them).
    written = ["summary.md", "summary.json", "simulated.md", "simulated.json"]
    if live is not None:
        written += ["live.md", "live.json", "live_summary.png", "live_ttft_cdf.png"]
    data["command"] = command_line()
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print()
    print("=" * 78)
    print(text)
    print()
    print(f"Saved in {out}/: {', '.join(written)}")
