"""Ring quality: how much DualMap's pair of rings remaps on scaling, and how evenly it spreads.

For each pool size N the script builds a `DualHashRing` of N endpoints (256 virtual nodes
unless `--virtual-nodes` says otherwise) and places `--keys-per-endpoint` x N distinct random
64-bit keys (at least `--min-keys`). It reports:

- add: the share of keys whose (first, second) pair changes when one endpoint joins, against
  the ideal 2/(N+1) (the newcomer's fair share of pair slots, the least any balanced scheme
  can move; the derivation is in `tests/test_ring.py`);
- remove (mean / worst): the share that changes when one endpoint leaves, against 2/N. The
  worst is taken over every endpoint: by construction, removing X changes exactly the pairs
  that contain X, so the worst removal is the endpoint in the most pairs. `--check-removals`
  removes a few endpoints for real to confirm that identity;
- balance: max/mean of distinct keys per endpoint for the first candidate alone and for both
  candidates counted together (each key counted on both of its endpoints).

Prints a table (and `--json`), and writes a PNG with `--plot`.

Run:  twinroute bench ring-quality --plot benchmarks/ring_quality.png
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from twinroute.bench import command_line
from twinroute.scheduler.ring import DEFAULT_VIRTUAL_NODES, DualHashRing

DEFAULT_SIZES = (2, 3, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True, slots=True)
class QualityRow:
    endpoints: int
    keys: int
    add_share: float
    add_ideal: float
    remove_mean_share: float
    remove_worst_share: float
    remove_ideal: float
    first_max_over_mean: float
    pair_max_over_mean: float
    removals_checked: int

    @property
    def add_ratio(self) -> float:
        return self.add_share / self.add_ideal

    @property
    def remove_worst_ratio(self) -> float:
        return self.remove_worst_share / self.remove_ideal


def _endpoint_names(count: int) -> list[str]:
    return [f"vllm-{i:03d}" for i in range(count)]


def _pairs_by_id(ring: DualHashRing, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """(keys x 2) endpoint numbers (the NNN in vllm-NNN; -1 for the newcomer)."""
    first, second = ring.candidates_many(keys)
    numbers = np.array(
        [int(name.rsplit("-", 1)[1]) if name != "newcomer" else -1 for name in ring.sorted_members],
        dtype=np.int64,
    )
    return np.stack([numbers[first], numbers[second]], axis=1)


def measure(
    *, endpoints: int, keys: npt.NDArray[np.uint64], virtual_nodes: int, check_removals: int
) -> QualityRow:
    ring = DualHashRing(virtual_nodes=virtual_nodes)
    ring.sync(_endpoint_names(endpoints))
    before = _pairs_by_id(ring, keys)

    ring.add("newcomer")
    after_add = _pairs_by_id(ring, keys)
    add_share = float(np.mean(np.any(before != after_add, axis=1)))
    ring.remove("newcomer")

    pair_slots = np.bincount(before.ravel(), minlength=endpoints)
    # Pairs containing X = pairs that change when X leaves (distinct candidates, N >= 2).
    containing = pair_slots / keys.shape[0]
    for number in np.argsort(containing)[::-1][:check_removals].tolist():
        name = f"vllm-{number:03d}"
        ring.remove(name)
        changed = float(np.mean(np.any(before != _pairs_by_id(ring, keys), axis=1)))
        ring.add(name)
        if not np.isclose(changed, containing[number]):
            raise AssertionError(f"removing {name} changed {changed}, not {containing[number]}")

    first_load = np.bincount(before[:, 0], minlength=endpoints)
    return QualityRow(
        endpoints=endpoints,
        keys=int(keys.shape[0]),
        add_share=add_share,
        add_ideal=2 / (endpoints + 1),
        remove_mean_share=float(containing.mean()),
        remove_worst_share=float(containing.max()),
        remove_ideal=2 / endpoints,
        first_max_over_mean=float(first_load.max() / first_load.mean()),
        pair_max_over_mean=float(pair_slots.max() / pair_slots.mean()),
        removals_checked=min(check_removals, endpoints),
    )


def _plot(rows: list[QualityRow], path: str, *, virtual_nodes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.endpoints for r in rows]
    figure, (remap, balance) = plt.subplots(1, 2, figsize=(11, 4.2))
    remap.plot(sizes, [r.add_ratio for r in rows], "o-", label="add one")
    remap.plot(sizes, [r.remove_worst_ratio for r in rows], "s-", label="remove one (worst)")
    remap.axhline(1.25, color="red", linestyle="--", label="bound 1.25")
    remap.axhline(1.0, color="grey", linewidth=0.8)
    remap.set(xscale="log", xlabel="endpoints N", ylabel="pair remap / ideal")
    remap.set_title("Keys whose candidate pair changes")
    remap.legend()
    balance.plot(sizes, [r.first_max_over_mean for r in rows], "o-", label="first candidate")
    balance.plot(sizes, [r.pair_max_over_mean for r in rows], "s-", label="both candidates")
    balance.axhline(1.25, color="red", linestyle="--", label="bound 1.25")
    balance.set(xscale="log", xlabel="endpoints N", ylabel="max / mean distinct keys")
    balance.set_title(f"Load balance, {virtual_nodes} virtual nodes")
    balance.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default=",".join(map(str, DEFAULT_SIZES)),
        help="pool sizes N to measure, comma-separated",
    )  # fmt: skip
    parser.add_argument(
        "--virtual-nodes", type=int, default=DEFAULT_VIRTUAL_NODES,
        help="virtual nodes per endpoint on each of the two rings",
    )  # fmt: skip
    parser.add_argument(
        "--keys-per-endpoint", type=int, default=2000,
        help="random 64-bit keys placed per endpoint (N x this, at least --min-keys)",
    )  # fmt: skip
    parser.add_argument("--min-keys", type=int, default=50_000, help="keys placed at least")
    parser.add_argument(
        "--check-removals", type=int, default=3,
        help="endpoints (those in the most pairs) removed for real, to confirm the computed "
        "share (0 = none)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=2026, help="seed of the random keys")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines too")
    parser.add_argument("--plot", metavar="PNG", help="write the two panels to this PNG")


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(size < 2 for size in sizes):
        raise ValueError("--sizes must all be >= 2 (a pair needs two endpoints)")
    rng = np.random.default_rng(args.seed)
    print("# " + command_line())
    header = (
        f"{'N':>4} {'keys':>8} {'add':>8} {'ideal':>8} {'ratio':>6} "
        f"{'rm mean':>8} {'rm worst':>8} {'ideal':>8} {'ratio':>6} {'1st max/mean':>12} "
        f"{'pair max/mean':>13}"
    )
    print(header)
    rows = []
    for size in sizes:
        count = max(args.min_keys, args.keys_per_endpoint * size)
        keys = np.unique(rng.integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False))
        started = time.perf_counter()
        row = measure(
            endpoints=size,
            keys=keys,
            virtual_nodes=args.virtual_nodes,
            check_removals=args.check_removals,
        )
        rows.append(row)
        print(
            f"{row.endpoints:>4} {row.keys:>8} {row.add_share:>8.4f} {row.add_ideal:>8.4f} "
            f"{row.add_ratio:>6.3f} {row.remove_mean_share:>8.4f} {row.remove_worst_share:>8.4f} "
            f"{row.remove_ideal:>8.4f} {row.remove_worst_ratio:>6.3f} "
            f"{row.first_max_over_mean:>12.3f} {row.pair_max_over_mean:>13.3f}"
            f"   ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    if args.plot:
        _plot(rows, args.plot, virtual_nodes=args.virtual_nodes)
        print(f"wrote {args.plot}")
    return 0
