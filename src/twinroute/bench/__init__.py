"""Benchmarks (`twinroute bench NAME`), each in its own module; results go to `benchmarks/`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """The command this process runs, as a user would type it (recorded with results)."""
    return "twinroute " + shlex.join(sys.argv[1:])


def recorded_path(path: str) -> str:
    """`path` as a committed record should name it: relative to the working directory (the
    repository, for the bundled trace) when it lies below it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path
