from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from twinroute.bench.command import BENCHES
from twinroute.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS), ids=sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twinroute", name, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: twinroute" in result.stdout


# The commands a user runs the product with (the benchmarks are `twinroute bench NAME`).
PRODUCT_COMMANDS = sorted(set(SUBCOMMANDS) - {"bench"})


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    chosen: argparse.ArgumentParser = subparsers.choices[name]
    return chosen


def _assert_options_explained(sub: argparse.ArgumentParser, command: str) -> None:
    undocumented = [
        action.option_strings
        for action in sub._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
        and not action.help
    ]  # fmt: skip
    assert undocumented == [], f"{command}: options without help"
    # As read, whatever the wrapping: a comma-separated default may wrap after a comma.
    text = re.sub(r",\s+", ",", " ".join(sub.format_help().split()))
    assert "default: None" not in text and "default: []" not in text, command
    for action in sub._actions:
        default = action.default
        # 0 is a default to show; None, False (a flag), "" and [] are not.
        absent = default is None or default is False or default is argparse.SUPPRESS
        shown = not absent and default not in ("", [], ())
        if action.option_strings and action.help and shown and action.nargs != 0:
            # A list default reads as it is typed: its values separated by spaces.
            typed = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
            assert re.sub(r",\s+", ",", f"default: {typed}") in text, (
                f"{command} {action.option_strings[0]} hides its default"
            )


@pytest.mark.parametrize("name", PRODUCT_COMMANDS)
def test_every_option_says_what_it_does_and_its_default(name: str) -> None:
    _assert_options_explained(_subparser(build_parser(name), name), f"twinroute {name}")


@pytest.mark.parametrize("bench", sorted(BENCHES), ids=sorted(BENCHES))
def test_every_bench_option_says_what_it_does_and_its_default(bench: str) -> None:
    sub = _subparser(_subparser(build_parser("bench"), "bench"), bench)
    _assert_options_explained(sub, f"twinroute bench {bench}")


def test_bench_help_lists_every_bench() -> None:
    assert not SUBCOMMANDS["bench"][1].rstrip(")").endswith("..."), "say where the list is"
    text = " ".join(_subparser(build_parser("bench"), "bench").format_help().split())
    for name, (_module, help_text) in BENCHES.items():
        assert f"{name} {' '.join(help_text.split())}" in text, f"twinroute bench --help: {name}"


def test_router_help_lists_every_policy() -> None:
    from twinroute.scheduler.policies import POLICY_NAMES

    sub = _subparser(build_parser("router"), "router")
    policy = next(action for action in sub._actions if "--policy" in action.option_strings)
    named = " ".join([*(policy.choices or ()), policy.help or ""])
    text = sub.format_help()
    missing = [name for name in POLICY_NAMES if name not in named or name not in text]
    assert missing == [], f"twinroute router --help does not name the policies {missing}"


def test_soak_chaos_help_names_the_faults() -> None:
    sub = _subparser(_subparser(build_parser("bench"), "bench"), "soak")
    chaos = next(action for action in sub._actions if "--chaos" in action.option_strings)
    text = " ".join((chaos.help or "").lower().split())
    assert "--help" not in text
    for fault in ("kill", "engine", "drain", "token", "scheduler", "restart"):
        assert fault in text, f"twinroute bench soak --chaos does not say: {fault}"
    assert "stop" in text or "hang" in text or "hung" in text, "--chaos: the hung engine"


def test_simulate_refuses_a_pool_of_no_instances(capsys: pytest.CaptureFixture[str]) -> None:
    for count in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", "--instances", count])
        assert exit_info.value.code == 2
        assert "--instances" in capsys.readouterr().err
