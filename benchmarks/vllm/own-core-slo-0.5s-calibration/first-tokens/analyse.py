"""Median relative TTFT prediction error of one run's first tokens, split by what the pick saw.

    python3 analyse.py ca0a483.jsonl.gz relative-fit.jsonl.gz

Each line is one first token as the scheduler saw it (written by the temporary log line in
first-token-log.patch, not part of twinroute): `pred` the TTFT predicted at the pick, `obs`
the TTFT observed, `inflight` / `pending` / `decoding` the chosen engine's load by the
scheduler's leases at the pick, `t` the pick's time. Requests of the first 60 s are left out,
as the bench's own figure does.
"""

import gzip
import json
import statistics
import sys


def summary(rows: list[dict]) -> str:
    if not rows:
        return "none"
    errors = [abs(r["pred"] - r["obs"]) / r["obs"] for r in rows]
    bias = [(r["pred"] - r["obs"]) / r["obs"] for r in rows]
    return (
        f"{statistics.median(errors):.0%} off (median bias {statistics.median(bias):+.0%}), "
        f"{len(rows)} requests"
    )


for path in sys.argv[1:]:
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    start = rows[0]["t"]
    rows = [r for r in rows if r["t"] - start > 60]
    print(path)
    print("  all:                 ", summary(rows))
    print("  engine idle (ours):  ", summary([r for r in rows if r["inflight"] == 0]))
    print("  engine busy:         ", summary([r for r in rows if r["inflight"] > 0]))
    print("  busy, prefill queued:", summary([r for r in rows if r["pending"] > 0]))
