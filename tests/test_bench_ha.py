"""`twinroute bench ha`: the figures it reads, and one replica killed under load end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from twinroute.bench.ha import _pick_waits

REPOSITORY = Path(__file__).resolve().parents[1]


def test_pick_waits_are_read_from_the_routers_histogram() -> None:
    exposition = "\n".join(
        [
            'twinroute_router_pick_seconds_bucket{le="0.001"} 3.0',
            'twinroute_router_pick_seconds_bucket{le="0.002"} 3.0',
            'twinroute_router_pick_seconds_bucket{le="0.005"} 3.0',
            'twinroute_router_pick_seconds_bucket{le="0.01"} 5.0',
            'twinroute_router_pick_seconds_bucket{le="0.05"} 5.0',
            'twinroute_router_pick_seconds_bucket{le="0.25"} 5.0',
            'twinroute_router_pick_seconds_bucket{le="1.0"} 5.0',
            'twinroute_router_pick_seconds_bucket{le="+Inf"} 6.0',
        ]
    )
    assert _pick_waits(exposition) == {"picks": 6, "picks_over_1s": 1, "max_pick_gap_s": 1.0}
    calm = exposition.replace('le="+Inf"} 6.0', 'le="+Inf"} 5.0')
    assert _pick_waits(calm) == {"picks": 5, "picks_over_1s": 0, "max_pick_gap_s": 0.01}


def replica_processes() -> set[int]:
    """Pids of running `twinroute scheduler` replicas (their command lines name --peers)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # it exited meanwhile
        if b"scheduler" in argv and any(a.startswith(b"--peers=") for a in argv):
            found.add(int(cmdline.parent.name))
    return found


@pytest.mark.slow
def test_killing_one_of_three_replicas_under_load_fails_no_request(tmp_path: Path) -> None:
    out = tmp_path / "ha.json"
    running_before = replica_processes()
    result = subprocess.run(
        [sys.executable, "-m", "twinroute", "bench", "ha", "--configs", "kill",
         "--duration", "12", "--tier-seconds", "0", "--json", str(out), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPOSITORY,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert replica_processes() <= running_before, "the restarted replica outlived the run"
    kill = json.loads(out.read_text())["kill"]
    assert [e["event"] for e in kill["events"]] == ["SIGKILL replica 1", "replica 1 restarted"]
    assert kill["requests"] > 20
    assert kill["failed_requests"] == 0, kill["error_samples"]
    survivors = kill["picks_per_replica"][0] + kill["picks_per_replica"][2]
    assert survivors > kill["picks_per_replica"][1], "the others took the killed one's share"
