"""What two corrections of the queue estimate would have done to requests that found their
engine busy, replayed on the logged first tokens (after the first 60 s).

    .venv/bin/python busy_replay.py

- `queue x q`: the part of each prediction that is not the request's own prefill (queue and
  interleaved decode steps) scaled by q, learnt online from busy requests as the calibration
  learns its fit (relative error, reweighted towards the median), or fixed at 1.6.
- `+ overhead per queued lease`: each request still queued ahead (in flight, not decoding)
  adds the endpoint's fitted per-request overhead to the wait.
The fit itself is twinroute's (`twinroute.scheduler.calibration`), replayed as in replay.py.
"""

import gzip
import json
import statistics
from pathlib import Path

from twinroute.scheduler.calibration import CostCalibration
from twinroute.scheduler.costmodel import LLAMA3_8B_H100 as PRIOR
from twinroute.scheduler.types import EMPTY_LOAD

HERE = Path(__file__).parent


def replay(rows: list[dict], mode: str) -> str:
    calibration = CostCalibration(prior=PRIOR)
    learnt, num, den = 1.0, 0.0, 0.0
    errors = ReplayErrors(start=rows[0]["t"])
    for row in rows:
        own = (
            PRIOR.estimate_ttft_s(
                uncached_tokens=row["prompt"] - row["cached"],
                cached_tokens=row["cached"],
                load=EMPTY_LOAD,
            )
            - PRIOR.step_overhead_s
        )
        queue = max(0.0, row["work"] - own)
        fits = calibration.fitted()
        fit = fits.get(row["ep"], fits[""])
        overhead, scale = fit[0], fit[1]
        base = overhead + scale * row["work"]
        if mode == "queue x q learnt":
            predicted = overhead + scale * (own + learnt * queue)
        elif mode == "queue x 1.6":
            predicted = overhead + scale * (own + 1.6 * queue)
        elif mode == "+ overhead per queued lease":
            predicted = base + overhead * (row["inflight"] - row["decoding"])
        else:
            predicted = base
        calibration.observe(
            row["ep"], work_s=row["work"], predicted_ttft_s=base, observed_ttft_s=row["obs"],
            fits=row["idle"] and row["idle_scrape"],
        )  # fmt: skip
        if queue > 0 and not row["idle"]:
            y, x = row["obs"], scale * queue
            size = max(y, 0.5 * predicted)
            weight = 1 / size**2 / max(abs(y - predicted) / size, 0.05)
            num = num * 0.99 + weight * x * (y - overhead - scale * own)
            den = den * 0.99 + weight * x * x
            learnt = min(4.0, max(0.25, num / den))
        errors.add(row, predicted)

    return errors.summary()


def median_abs(values: list[float]) -> float:
    return statistics.median(abs(v) for v in values)


class ReplayErrors:
    """Relative errors of the predictions for first tokens after the first 60 s: all of them,
    those that found their engine busy, those queued behind another's prefill."""

    def __init__(self, *, start: float) -> None:
        self.start = start
        self.all: list[float] = []
        self.busy: list[float] = []
        self.queued: list[float] = []

    def add(self, row: dict, predicted: float) -> None:
        if row["t"] - self.start > 60:
            error = (predicted - row["obs"]) / row["obs"]
            self.all.append(abs(error))
            if row["inflight"] > 0:
                self.busy.append(error)
            if row["pending"] > 0:
                self.queued.append(error)

    def summary(self) -> str:
        """Median absolute error of each group, with the bias (median signed error)."""
        return (
            f"all {statistics.median(self.all):.0%}; busy {median_abs(self.busy):.0%} off "
            f"(bias {statistics.median(self.busy):+.0%}); prefill queued ahead "
            f"{median_abs(self.queued):.0%} off (bias {statistics.median(self.queued):+.0%})"
        )


def logged_runs() -> list[tuple[str, list[dict]]]:
    """Each logged run's first tokens, in the order they came: (file name, rows)."""
    runs = []
    for log in sorted(HERE.glob("*.jsonl.gz")):
        with gzip.open(log, "rt") as handle:
            runs.append((log.name, [json.loads(line) for line in handle]))
    return runs


if __name__ == "__main__":
    for name, rows in logged_runs():
        for mode in ("as is", "queue x q learnt", "queue x 1.6", "+ overhead per queued lease"):
            print(f"{name}: {mode}: {replay(rows, mode)}")
