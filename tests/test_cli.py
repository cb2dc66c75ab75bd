from __future__ import annotations

import subprocess
import sys

import pytest

from twinroute.cli import SUBCOMMANDS, main


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
