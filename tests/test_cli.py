from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("name", PRODUCT_COMMANDS)
def test_every_option_says_what_it_does_and_its_default(name: str) -> None:
    parser = build_parser(name)
    sub = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices[name]
    undocumented = [
        action.option_strings
        for action in sub._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
        and not action.help
    ]  # fmt: skip
    assert undocumented == [], f"twinroute {name}: options without help"
    text = sub.format_help()
    for action in sub._actions:
        shown = action.default not in (None, False, argparse.SUPPRESS, "", [])
        if action.option_strings and action.help and shown and action.nargs != 0:
            assert f"default: {action.default}" in " ".join(text.split()), (
                f"twinroute {name} {action.option_strings[0]} hides its default"
            )


def test_simulate_refuses_a_pool_of_no_instances(capsys: pytest.CaptureFixture[str]) -> None:
    for count in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", "--instances", count])
        assert exit_info.value.code == 2
        assert "--instances" in capsys.readouterr().err
