"""What every long-running twinroute process shares to run its event loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any

# `--log-level` of every long-running command.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Python's default runs a young-generation collection every 700 container allocations, and
# each traverses every live young object: with hundreds of streams in flight the router ran
# about 20 a second, 1 ms each and up to 7 ms (CPU), and a full collection over the imported
# libraries took 45-55 ms. Reference counting frees what a request leaves behind; the cycle
# collector only has to run often enough to bound the memory that cycles hold.
SERVING_GC_THRESHOLDS = (20_000, 50, 100)


def event_loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """uvloop when installed (less per-request CPU on the proxy paths), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, Any]], Any] = uvloop.run
    return run


def settle_heap_for_serving() -> None:
    """Call once a server is up: what start-up built lives as long as the process, so it
    leaves the collector's generations (no full collection walks it again), and young
    collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
