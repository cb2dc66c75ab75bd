"""What every long-running twinroute process shares to run its event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

# `--log-level` of every long-running command.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def event_loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """uvloop when installed (less per-request CPU on the proxy paths), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, Any]], Any] = uvloop.run
    return run
