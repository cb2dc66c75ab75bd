"""What every long-running twinroute process does once it serves (src/twinroute/runtime.py)."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

import pytest

from twinroute import cli, runtime
from twinroute.runtime import SERVING_GC_THRESHOLDS

PROBE = """
import gc, json
import aiohttp  # a library's objects, built at start-up like a server's
before = gc.get_threshold()
from twinroute.runtime import settle_heap_for_serving
settle_heap_for_serving()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_a_serving_process_freezes_its_start_up_heap_and_collects_young_objects_less_often() -> (
    None
):
    # In a child process: freezing the test runner's own heap would outlive the test.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    probe = json.loads(out)
    assert probe["before"][0] < SERVING_GC_THRESHOLDS[0]
    assert tuple(probe["after"]) == SERVING_GC_THRESHOLDS
    # Everything start-up built is out of the collector's generations.
    assert probe["frozen"] > 10_000 and probe["tracked"] < probe["frozen"] // 10


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("twinroute.scheduler.command", ["scheduler", "--endpoints=e0=127.0.0.1:9"]),
        ("twinroute.gateway.command",
         ["gateway", "--embedded", "--model=m", "--endpoints=e0=127.0.0.1:9"]),
        ("twinroute.router.command",
         ["router", "--embedded", "--model=m", "--endpoints=e0=127.0.0.1:9"]),
        ("twinroute.enginesim.command", ["engine-sim", "--model=m"]),
    ],
)  # fmt: skip
def test_every_serving_command_runs_its_event_loop_on_the_shared_runner(
    module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop where installed: grpc.aio's per-stream work and aiohttp's per-request work both
    # cost less on it (benchmarks/gateway/picker-cost/).
    ran: list[str] = []

    def runner(coroutine: Coroutine[Any, Any, Any]) -> int:
        ran.append(repr(coroutine))
        coroutine.close()
        return 0

    def plain_asyncio(coroutine: Coroutine[Any, Any, Any]) -> int:
        coroutine.close()
        raise AssertionError("served on asyncio.run, not on the shared runner")

    monkeypatch.setattr(asyncio, "run", plain_asyncio)
    command = importlib.import_module(module)
    if hasattr(command, "event_loop_runner"):
        monkeypatch.setattr(command, "event_loop_runner", lambda: runner)
    monkeypatch.setattr(runtime, "event_loop_runner", lambda: runner)
    assert cli.main(argv) == 0
    assert len(ran) == 1
