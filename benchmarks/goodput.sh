#!/usr/bin/env bash
# Goodput of every routing policy on the bundled Mooncake trace at 8, 32 and 128 simulated
# instances (BENCHMARKS.md, "Goodput"). Bigger pools replay proportionally more copies of the
# trace (disjoint block ids: more users, not more of the same), so every pool sees about the
# same load and working set per instance. Results, tables and plots go to benchmarks/.
# Usage: benchmarks/goodput.sh [8|32|128 ...]   (default: all three; JOBS=2 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap
jobs=${JOBS:-2}
for instances in "${@:-8 32 128}"; do
  for n in $instances; do
    copies=$(( n / 8 ))
    .venv/bin/twinroute bench goodput --instances "$n" --replicate "$copies" \
      --seeds 3 --warmup 0.125 --jobs "$jobs" --out "benchmarks/goodput-$n"
  done
done
