"""`twinroute bench streaming` end to end on a tiny budget: the direct path and Envoy with the
endpoint picker, every figure the write-up quotes present, Envoy's CPU counted apart."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_streaming_bench_reports_every_path_and_process(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "twinroute", "bench", "streaming", "--paths=twinroute_envoy",
         "--concurrency=2,4", "--duration=1", "--tokens=8", f"--out={out}"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "streaming.json").read_text())
    assert set(results) == {"direct", "twinroute_envoy"}
    for runs in results.values():
        assert set(runs) == {"2", "4"}
        for run in runs.values():
            assert run["completed"] > 0 and run["errors"] == 0
            assert run["events_per_s"] >= 8 * run["streams_per_s"] * 0.9
            assert run["gap_p99_ms"] >= run["gap_p50_ms"] >= 0
    envoy = results["twinroute_envoy"]["2"]["cpu_ms_per_stream"]
    # Envoy and the gateway's Python process (scheduler and picker), each counted.
    assert "envoy" in envoy and len(envoy) == 2, envoy
    assert all(ms > 0 for ms in envoy.values())
    assert (out / "streaming.md").is_file() and (out / "streaming.png").is_file()
