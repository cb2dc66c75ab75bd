"""The `twinroute` command.

Subcommands live in their own modules and are imported only when chosen, so `twinroute --help`
stays fast and a subcommand's heavy dependencies (grpc, kopf, matplotlib) load only when used.
Each module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
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
        "every benchmark, one subcommand each: `twinroute bench --help` lists them",
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
        if _shows_default(action) and "%(default)" not in text:
            text += " (default: " + _shown_default(action.default).replace("%", "%%") + ")"
        return text

    def _split_lines(self, text: str, width: int) -> list[str]:
        return _ListWrapper(width=width, break_on_hyphens=False).wrap(" ".join(text.split()))


class _ListWrapper(textwrap.TextWrapper):
    """Lines break at spaces (never inside an option's name at a hyphen) and also after a
    comma inside a word, so that a comma-separated list (a default such as
    "dualmap,round_robin") wraps between its names rather than inside one."""

    def _split(self, text: str) -> list[str]:
        return [
            piece
            for chunk in super()._split(text)
            for piece in re.split(r"(?<=,)(?=\S)", chunk)
            if piece
        ]


def _shows_default(action: argparse.Action) -> bool:
    """Whether `DefaultsShown` ends the option's help with its default: an option that takes a
    value and has one (0 is a value; None, "", an empty list and a flag's False are not)."""
    default = action.default
    absent = default is None or default is False or default is argparse.SUPPRESS
    empty = isinstance(default, str | list | tuple) and not default
    return bool(action.option_strings) and action.nargs != 0 and not absent and not empty


def _shown_default(default: object) -> str:
    """A default as it is typed: a list or tuple as its values separated by spaces."""
    if isinstance(default, list | tuple):
        return " ".join(str(value) for value in default)
    return str(default)


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
