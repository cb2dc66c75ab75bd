"""Benchmarks (`twinroute bench NAME`), each in its own module; results go to `benchmarks/`."""

from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    """The command this process runs, as a user would type it (recorded with results)."""
    return "twinroute " + shlex.join(sys.argv[1:])
