"""Per-lease terms learnt for requests that found their engine busy, replayed on the logged
first tokens (after the first 60 s), and what the requests that missed the 0.5 s SLO looked
like at their pick.

    .venv/bin/python busy_terms.py

Each mode adds to twinroute's prediction (overhead + scale x work, the calibration replayed as
in replay.py) b x (a count of the endpoint's leases at the pick), b learnt online from busy
requests as the calibration learns its fit (relative error, reweighted towards the median,
decay 0.99, ridge towards 0); `fixed overhead*prefilling` adds the fitted overhead per lease
still prefilling, as busy_replay.py does.
"""

import statistics

from busy_replay import ReplayErrors, logged_runs
from twinroute.scheduler.calibration import CostCalibration
from twinroute.scheduler.costmodel import LLAMA3_8B_H100 as PRIOR

REGRESSORS = {
    "as is": lambda row: [],
    "fixed overhead*prefilling": lambda row: [],
    "b*prefilling": lambda row: [row["inflight"] - row["decoding"]],
    "b*inflight": lambda row: [row["inflight"]],
    "b1*prefilling+b2*decoding": lambda row: [row["inflight"] - row["decoding"], row["decoding"]],
    "b*[inflight>0]": lambda row: [1.0 if row["inflight"] else 0.0],
}


def solve(a: list[list[float]], b: list[float], ridge: float) -> list[float]:
    """Non-negative coefficients of the 1- or 2-regressor weighted least squares, ridged."""
    if len(b) == 1:
        return [max(0.0, b[0] / (a[0][0] + ridge))]
    a00, a01, a10, a11 = a[0][0] + ridge, a[0][1], a[1][0], a[1][1] + ridge
    det = a00 * a11 - a01 * a10
    return [max(0.0, (a11 * b[0] - a01 * b[1]) / det), max(0.0, (a00 * b[1] - a10 * b[0]) / det)]


def replay(rows: list[dict], mode: str, decay: float = 0.99) -> str:
    calibration = CostCalibration(prior=PRIOR)
    regressors = REGRESSORS[mode]
    k = len(regressors(rows[0]))
    sums_a = [[0.0] * k for _ in range(k)]
    sums_b = [0.0] * k
    coefficients = [0.0] * k
    learnt_from = 0
    errors = ReplayErrors(start=rows[0]["t"])
    for row in rows:
        fits = calibration.fitted()
        overhead, scale = fits.get(row["ep"], fits[""])[:2]
        base = overhead + scale * row["work"]
        xs = regressors(row)
        predicted = base + sum(c * x for c, x in zip(coefficients, xs, strict=True))
        if mode == "fixed overhead*prefilling":
            predicted = base + overhead * (row["inflight"] - row["decoding"])
        calibration.observe(
            row["ep"], work_s=row["work"], predicted_ttft_s=base, observed_ttft_s=row["obs"],
            fits=row["idle"] and row["idle_scrape"],
        )  # fmt: skip
        if any(xs):
            y = row["obs"]
            size = max(y, 0.5 * predicted)
            weight = 1 / size**2
            if learnt_from >= 16:
                weight /= max(abs(y - predicted) / size, 0.05)
            learnt_from += 1
            for i in range(k):
                sums_b[i] = sums_b[i] * decay + weight * xs[i] * (y - base)
                for j in range(k):
                    sums_a[i][j] = sums_a[i][j] * decay + weight * xs[i] * xs[j]
            ridge = 2.0 * sum(sums_a[i][i] for i in range(k)) / k / learnt_from
            coefficients = solve(sums_a, sums_b, ridge)
        errors.add(row, predicted)
    learnt = ", ".join(f"{c * 1000:.1f} ms" for c in coefficients)
    return errors.summary() + (f"; b = {learnt}" if learnt else "")


for name, rows in logged_runs():
    for mode in ["as is", "fixed overhead*prefilling", "b*prefilling", "b*inflight",
                 "b1*prefilling+b2*decoding", "b*[inflight>0]"]:  # fmt: skip
        print(f"{name}: {mode:28s} {replay(rows, mode)}")
    misses = [r for r in rows if r["obs"] > 0.5]
    on_idle = sum(1 for r in misses if r["idle"])
    predicted = sorted(r["pred"] for r in misses)
    print(
        f"{name}: {len(misses)} of {len(rows)} first tokens over 0.5 s; {on_idle} of them "
        f"on an engine idle by our leases; predicted {predicted[0] * 1000:.0f}-"
        f"{predicted[-1] * 1000:.0f} ms (median {statistics.median(predicted) * 1000:.0f} ms), "
        f"observed {min(r['obs'] for r in misses):.2f}-{max(r['obs'] for r in misses):.2f} s"
    )
