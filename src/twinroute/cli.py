"""The `twinroute` command.

Subcommands live in their own modules and are imported only when chosen, so `twinroute --help`
stays fast and a subcommand's heavy dependencies (grpc, kopf, matplotlib) load only when used.
Each module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "twinroute.demo",
        "run every routing policy on the bundled Mooncake trace and compare",
    ),
    "simulate": (
        "twinroute.simulator.command",
        "simulate a pool of vLLM instances behind one routing policy on a trace",
    ),
    "router": (
        "twinroute.router.command",
        "OpenAI-compatible router in front of vLLM engines (asks the scheduler)",
    ),
    "gateway": (
        "twinroute.gateway.command",
        "Envoy in front of the engines, the scheduler as its endpoint picker (GIE protocol)",
    ),
    "scheduler": (
        "twinroute.scheduler.command",
        "gRPC scheduler service: picks engines for the router (DualMap and baselines)",
    ),
    "engine-sim": (
        "twinroute.enginesim.command",
        "a simulated vLLM engine (OpenAI API, vLLM metrics) running the instance model",
    ),
    "bench": (
        "twinroute.bench.command",
        "every benchmark (goodput, live, elastic, soak, decision cost, rings, ...)",
    ),
    "operator": ("twinroute.operator.command", "run the ModelPool operator (kopf) for Kubernetes"),
}


class _Subcommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Subcommand:
    module: _Subcommand = importlib.import_module(SUBCOMMANDS[name][0])
    return module


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with its default, when it has one to show (argparse's
    own defaults formatter also prints "default: None" for options that are only optional)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, "", argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    from twinroute import __version__

    parser = argparse.ArgumentParser(
        prog="twinroute",
        description="Cache- and load-aware scheduling for vLLM fleets (DualMap routing).",
    )
    parser.add_argument("--version", action="version", version=f"twinroute {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=DefaultsShown,
        )
        if name == chosen:
            _load(name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(arguments)
    if args.command is None:
        parser.print_help()
        return 2
    return _load(args.command).run(args)


if __name__ == "__main__":
    sys.exit(main())
