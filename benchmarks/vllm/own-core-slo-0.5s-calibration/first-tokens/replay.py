"""Replay the logged first tokens through a calibration and report its prediction error.

    .venv/bin/python replay.py                      # twinroute's own calibration
    git show ca0a483:scheduler/calibration.py > mean_fit.py
    .venv/bin/python replay.py mean_fit.py          # another version of the module

For each log here, every first token in the order it came: the calibration predicts it from
the work logged at its pick (the prior profile's work, which does not depend on the fit),
then learns from it exactly as the scheduler does (only requests that found their engine
idle teach the fit). Prints the median relative error after the first 60 s, all requests
and those that found their engine idle, and the pool fit at the end. The replay leaves the
decisions as they were in the run, so it isolates the fit.
"""

import gzip
import importlib.util
import json
import statistics
import sys
from pathlib import Path

from twinroute.scheduler.costmodel import LLAMA3_8B_H100

HERE = Path(__file__).parent


def calibration_module(path: str | None):
    if path is None:
        import twinroute.scheduler.calibration as module

        return module
    spec = importlib.util.spec_from_file_location("replayed_calibration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def replay(module, rows: list[dict]) -> tuple[float, float, tuple]:
    calibration = module.CostCalibration(prior=LLAMA3_8B_H100)
    start = rows[0]["t"]
    errors, idle_errors = [], []
    for row in rows:
        model = calibration.model_for(row["ep"])
        scale = LLAMA3_8B_H100.linear_tokens_per_s / model.linear_tokens_per_s
        predicted = model.step_overhead_s + scale * row["work"]
        calibration.observe(
            row["ep"],
            work_s=row["work"],
            predicted_ttft_s=predicted,
            observed_ttft_s=row["obs"],
            fits=row["idle"] and row["idle_scrape"],
        )
        if row["t"] - start > 60:
            error = abs(predicted - row["obs"]) / row["obs"]
            errors.append(error)
            if row["inflight"] == 0:
                idle_errors.append(error)
    pool = calibration.fitted()[""]
    return statistics.median(errors), statistics.median(idle_errors), pool


if __name__ == "__main__":
    for path in sys.argv[1:] or [None]:
        module = calibration_module(path)
        for log in sorted(HERE.glob("*.jsonl.gz")):
            with gzip.open(log, "rt") as handle:
                rows = [json.loads(line) for line in handle]
            everyone, idle, (overhead_s, time_scale, _) = replay(module, rows)
            print(
                f"{path or 'twinroute'}: {log.name}: {everyone:.0%} off ({idle:.0%} for requests "
                f"that found their engine idle); fit {time_scale:.2f}x, {1000 * overhead_s:.0f} ms"
            )
