"""What every long-running twinroute process does once it serves (src/twinroute/runtime.py)."""

from __future__ import annotations

import json
import subprocess
import sys

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
