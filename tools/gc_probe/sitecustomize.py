"""Records the CPU time of every cyclic-GC collection of a `twinroute router` process.

Put this folder on PYTHONPATH and name an existing folder in GC_PROBE_DIR: every Python
process started with that environment imports this file, and a router writes `gc-PID.json`
there when it exits (collections and their CPU time per generation, the process's own CPU):

    mkdir -p results/gc
    GC_PROBE_DIR=results/gc PYTHONPATH=tools/gc_probe .venv/bin/twinroute bench streaming \
      --paths twinroute_dualmap --concurrency 256 --duration 15 --out results/gc/bench
"""

import atexit
import gc
import json
import os
import sys
import time

_started = [0.0]
_collections: list[tuple[int, float]] = []


def _timed(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.thread_time()
    else:
        _collections.append((info["generation"], time.thread_time() - _started[0]))


def _write() -> None:
    if sys.argv[1:2] != ["router"]:
        return
    out: dict[str, object] = {}
    for generation in (0, 1, 2):
        spent = [cpu_s for gen, cpu_s in _collections if gen == generation]
        out[f"gen{generation}"] = {
            "collections": len(spent),
            "cpu_ms_total": round(sum(spent) * 1000, 1),
            "cpu_ms_max": round(max(spent, default=0) * 1000, 2),
        }
    out["cpu_s_process"] = round(time.process_time(), 2)
    path = os.path.join(os.environ["GC_PROBE_DIR"], f"gc-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(out, handle)


if os.environ.get("GC_PROBE_DIR"):
    gc.callbacks.append(_timed)
    atexit.register(_write)
