"""`twinroute bench elastic`: DualMap's elasticity experiment, simulated or live.

Scenario: a pool of `--initial` instances is overloaded; at `--scale-out-at` `--added`
instances join; at `--scale-in-at` the load drops (arrivals slow to `--scale-in-load` of the
rate) and `--removed` instances leave through a drain (no new picks, their queued requests
moved to their other candidate, running ones finish within `--drain-deadline`, then removal).
The same trace runs behind each policy in `--policies` (dualmap and baselines) in one run.

Reported (JSON, a table and a PNG):
- SLO attainment (TTFT <= `--slo`) per window of `--window` seconds of arrival time and per
  phase (between membership changes);
- cache hit rate (engine prefix-cache hit tokens / prompt tokens) per window, and in the
  `--window` before and after each change;
- keys remapped by each change: the share of the prefix keys seen so far (every block hash
  of every prompt that arrived before the change; each stands for its whole prefix) whose
  first / second candidate on dualmap's two rings changed, computed from the rings over the
  routable members before and after the change. Ideal (the least a scheme that keeps every
  member's fair share can move): per candidate, adding k to n moves k/(n+k) of the keys (the
  newcomers' share), removing k of n moves the k/n the leavers owned; for the pair (either
  candidate), adding moves 1 - C(n,2)/C(n+k,2) and removing 1 - C(n-k,2)/C(n,2) (the share
  of 2-subsets that gain or lose a member). So 4 -> 8 ideally moves 1/2 per candidate and
  11/14 of pairs; 8 -> 4 also 1/2 per candidate and 11/14 of pairs.
- `failed_requests`: requests that never completed (lost at a forced removal in the
  simulator; an error or broken stream live). Must be 0.

`--live` runs the same with real processes: engine-sims (time-scaled), `twinroute scheduler`
with an `--endpoints-file` it reloads on change, and `twinroute router`; all engines start at
once but the scheduler first sees `--initial` of them. Scale-out rewrites the file; scale-in
calls the scheduler's Drain RPC as the operator does (`twinroute.operator.drain.Drainer`),
then removes the drained engines from the file. Hit rates come from the engines' prefix-cache
counters, keys remapped from the scheduler's own key function and rings.

Run: `twinroute bench elastic --json results/elastic/elastic.json --out results/elastic`
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from twinroute.simulator.traces import TraceChunk

DEFAULT_POLICIES = ("dualmap", "consistent_hash", "round_robin")
COMPARE_WINDOWS = 4
"""Before/after a change is also compared over this many windows: one window is noisy (the
trace's own reuse swings from window to window)."""
RECORDED_RATE_RPS = 3.907  # the bundled Mooncake synthetic trace: 3,993 requests in 1,022 s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--live", action="store_true", help="real processes, not the simulator")
    parser.add_argument("--trace", type=Path, default=None, help="Mooncake JSONL trace")
    parser.add_argument(
        "--policies",
        default=None,
        help=f"default: {','.join(DEFAULT_POLICIES)} (live: dualmap,round_robin)",
    )
    parser.add_argument("--initial", type=int, default=4, help="instances at the start")
    parser.add_argument("--added", type=int, default=4, help="instances added at scale-out")
    parser.add_argument("--removed", type=int, default=4, help="instances removed at scale-in")
    parser.add_argument("--scale-out-at", type=float, default=None, help="seconds (arrival time)")
    parser.add_argument("--scale-in-at", type=float, default=None, help="seconds (arrival time)")
    parser.add_argument(
        "--rate", type=float, default=None, help="req/s before scale-in (default 6)"
    )
    parser.add_argument(
        "--scale-in-load", type=float, default=0.5, help="share of the rate after scale-in"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of arrivals (default: whole trace)"
    )
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--slo", type=float, default=None, help="TTFT SLO, s (default 5)")
    parser.add_argument("--window", type=float, default=None, help="report window, seconds")
    parser.add_argument("--drain-deadline", type=float, default=120.0, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--virtual-nodes", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--out", type=Path, default=Path("results/elastic"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    # Live only.
    live = parser.add_argument_group("live")
    live.add_argument("--block-words", type=int, default=16)
    live.add_argument("--max-output-tokens", type=int, default=16)
    live.add_argument("--time-scale", type=float, default=1.0, help="engine-sim --time-scale")
    live.add_argument("--kv-capacity-tokens", type=int, default=None)
    live.add_argument("--request-timeout", type=float, default=120.0)
    live.add_argument(
        "--admission-hold", choices=("on", "off"), default="off",
        help="scheduler --admission-hold: held requests are the queued ones Drain can move",
    )  # fmt: skip


# -- the scenario -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ElasticPlan:
    initial: int
    added: int
    removed: int
    scale_out_at_s: float
    scale_in_at_s: float
    rate_rps: float
    scale_in_load: float
    ttft_slo_s: float
    window_s: float
    drain_deadline_s: float

    def __post_init__(self) -> None:
        if self.initial < 1 or self.added < 0 or self.removed < 0:
            raise ValueError("need --initial >= 1, --added >= 0, --removed >= 0")
        if self.removed >= self.initial + self.added:
            raise ValueError("--removed must leave at least one instance")
        if not 0 <= self.scale_out_at_s <= self.scale_in_at_s:
            raise ValueError("need 0 <= --scale-out-at <= --scale-in-at")
        if self.rate_rps <= 0 or not 0 < self.scale_in_load <= 1 or self.window_s <= 0:
            raise ValueError("--rate and --window must be > 0, --scale-in-load in (0, 1]")

    def phases(self, end_s: float) -> list[tuple[str, float, float]]:
        """(label, start, end) of the three phases, in arrival time."""
        after_out = self.initial + self.added
        return [
            (f"{self.initial} instances (before scale-out)", 0.0, self.scale_out_at_s),
            (f"{after_out} instances", self.scale_out_at_s, self.scale_in_at_s),
            (
                f"{after_out - self.removed} instances (after scale-in)",
                self.scale_in_at_s,
                max(end_s, self.scale_in_at_s),
            ),
        ]


def warp_arrivals(
    chunks: Iterable[TraceChunk], *, factor: float, slow_after_s: float, slow_load: float
) -> Iterator[TraceChunk]:
    """Arrival times times `factor`, and past `slow_after_s` stretched by 1/`slow_load` (the
    load drop that makes the scale-in reasonable)."""
    for chunk in chunks:
        arrival = chunk.arrival_s * factor
        late = arrival > slow_after_s
        arrival = np.where(late, slow_after_s + (arrival - slow_after_s) / slow_load, arrival)
        yield TraceChunk(
            arrival_s=arrival,
            prompt_tokens=chunk.prompt_tokens,
            output_tokens=chunk.output_tokens,
            block_offsets=chunk.block_offsets,
            block_ids=chunk.block_ids,
            block_size=chunk.block_size,
        )


def limit(
    chunks: Iterable[TraceChunk], *, duration_s: float | None, max_requests: int | None
) -> Iterator[TraceChunk]:
    """Stop at `duration_s` of arrivals or after `max_requests` requests."""
    from twinroute.simulator.traces import take

    if max_requests is not None:
        chunks = take(chunks, requests=max_requests)
    for chunk in chunks:
        if duration_s is None or len(chunk) == 0 or chunk.arrival_s[-1] < duration_s:
            yield chunk
            continue
        count = int(np.searchsorted(chunk.arrival_s, duration_s, side="left"))
        if count:
            end = int(chunk.block_offsets[count])
            yield TraceChunk(
                arrival_s=chunk.arrival_s[:count],
                prompt_tokens=chunk.prompt_tokens[:count],
                output_tokens=chunk.output_tokens[:count],
                block_offsets=chunk.block_offsets[: count + 1],
                block_ids=chunk.block_ids[:end],
                block_size=chunk.block_size,
            )
        return


# -- keys remapped ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Remap:
    """How many of the keys seen so far changed candidates in one membership change."""

    label: str
    at_s: float
    members_before: tuple[str, ...]
    members_after: tuple[str, ...]
    keys: int
    first: float
    second: float
    pair: float
    ideal_per_candidate: float
    ideal_pair: float

    @property
    def per_candidate(self) -> float:
        return (self.first + self.second) / 2


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def ideal_remap(
    *, before: Sequence[str], after: Sequence[str]
) -> tuple[float, float]:  # fmt: skip
    """(per candidate, pair) share of keys any balanced scheme must move.

    Per candidate: the leavers' keys (r/b of them) move, and of the rest the newcomers take
    their fair share a/A. Pair (two distinct members, uniformly): it survives when neither of
    its members left (C(b-r,2)/C(b,2)) and no newcomer entered (C(A-a,2)/C(A,2)).
    """
    old, new = set(before), set(after)
    b, big_a = len(old), len(new)
    r, a = len(old - new), len(new - old)
    if b == 0 or big_a == 0:
        return 1.0, 1.0
    per_candidate = 1 - (1 - r / b) * (1 - a / big_a)
    if b < 2 or big_a < 2:
        return per_candidate, 1.0
    pair = 1 - (_pairs(b - r) / _pairs(b)) * (_pairs(big_a - a) / _pairs(big_a))
    return per_candidate, pair


def measure_remap(
    keys: npt.NDArray[np.uint64],
    *,
    label: str,
    at_s: float,
    before: Sequence[str],
    after: Sequence[str],
    virtual_nodes: int,
    seed: int,
) -> Remap:
    """Candidates of `keys` on dualmap's rings (the seeds the policy uses for `seed`) over the
    members before and after the change, compared by endpoint name."""
    from twinroute.scheduler.ring import DEFAULT_SEEDS, DualHashRing

    def candidates(members: Sequence[str]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        rings = DualHashRing(
            virtual_nodes=virtual_nodes, seeds=(DEFAULT_SEEDS[0] ^ seed, DEFAULT_SEEDS[1] ^ seed)
        )
        rings.sync(members)
        names = np.asarray(rings.sorted_members)
        first, second = rings.candidates_many(keys)
        return names[first], names[second]

    ideal_candidate, ideal_pair = ideal_remap(before=before, after=after)
    if keys.size == 0:
        nan = math.nan
        return Remap(label, at_s, tuple(before), tuple(after), 0, nan, nan, nan,
                     ideal_candidate, ideal_pair)  # fmt: skip
    first_before, second_before = candidates(before)
    first_after, second_after = candidates(after)
    first_changed = first_before != first_after
    second_changed = second_before != second_after
    # The pair as a set: swapped roles keep both candidates (and their caches).
    same_pair = ((first_before == first_after) & (second_before == second_after)) | (
        (first_before == second_after) & (second_before == first_after)
    )
    return Remap(
        label=label,
        at_s=at_s,
        members_before=tuple(before),
        members_after=tuple(after),
        keys=int(keys.size),
        first=float(first_changed.mean()),
        second=float(second_changed.mean()),
        pair=float(1.0 - same_pair.mean()),
        ideal_per_candidate=ideal_candidate,
        ideal_pair=ideal_pair,
    )


class KeyLog:
    """Distinct prefix keys by first arrival time, so "the keys seen before t" is a slice."""

    def __init__(self) -> None:
        self._keys: list[npt.NDArray[np.uint64]] = []
        self._times: list[npt.NDArray[np.float64]] = []

    def add(self, at_s: float, hashes: npt.NDArray[np.uint64]) -> None:
        if hashes.size:
            self._keys.append(np.asarray(hashes, dtype=np.uint64))
            self._times.append(np.full(hashes.size, at_s))

    def seen_before(self, at_s: float) -> npt.NDArray[np.uint64]:
        if not self._keys:
            return np.zeros(0, dtype=np.uint64)
        keys = np.concatenate(self._keys)
        times = np.concatenate(self._times)
        return np.unique(keys[times < at_s])


# -- windows and phases -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Samples:
    """Per request, in arrival order: what the windowed report needs (NaN TTFT = failed)."""

    arrival_s: npt.NDArray[np.float64]
    ttft_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.float64]
    cached_tokens: npt.NDArray[np.float64]


def _share_within(ttft: npt.NDArray[np.float64], slo_s: float) -> float | None:
    return float(np.mean(ttft <= slo_s)) if ttft.size else None


def _hit_rate(samples: Samples, mask: npt.NDArray[np.bool_]) -> float | None:
    prompts = float(samples.prompt_tokens[mask].sum())
    return float(samples.cached_tokens[mask].sum()) / prompts if prompts > 0 else None


def windows(samples: Samples, *, window_s: float, slo_s: float) -> list[dict[str, Any]]:
    end = float(samples.arrival_s[-1]) if samples.arrival_s.size else 0.0
    rows: list[dict[str, Any]] = []
    for start in np.arange(0.0, end + window_s, window_s):
        mask = (samples.arrival_s >= start) & (samples.arrival_s < start + window_s)
        if not mask.any():
            continue
        ttft = samples.ttft_s[mask]
        rows.append(
            {
                "start_s": float(start),
                "requests": int(mask.sum()),
                "rate_rps": float(mask.sum()) / window_s,
                "slo_attainment": _share_within(ttft, slo_s),
                "ttft_p90_s": float(np.nanpercentile(ttft, 90))
                if np.isfinite(ttft).any()
                else None,
                "cache_hit_rate": _hit_rate(samples, mask),
            }
        )
    return rows


def phase_report(
    samples: Samples, *, phases: Sequence[tuple[str, float, float]], slo_s: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index, (label, start, end) in enumerate(phases):
        last = index == len(phases) - 1
        mask = (samples.arrival_s >= start) & (
            (samples.arrival_s <= end) if last else (samples.arrival_s < end)
        )
        ttft = samples.ttft_s[mask]
        finite = ttft[np.isfinite(ttft)]
        rows.append(
            {
                "phase": label,
                "start_s": start,
                "end_s": end,
                "requests": int(mask.sum()),
                "slo_attainment": _share_within(ttft, slo_s),
                "ttft_p50_s": float(np.percentile(finite, 50)) if finite.size else None,
                "ttft_p90_s": float(np.percentile(finite, 90)) if finite.size else None,
                "cache_hit_rate": _hit_rate(samples, mask),
            }
        )
    return rows


def around(
    samples: Samples, *, at_s: float, window_s: float, slo_s: float
) -> dict[str, float | None]:
    """Hit rate and SLO attainment of the requests arriving in the window before and after."""
    before = (samples.arrival_s >= at_s - window_s) & (samples.arrival_s < at_s)
    after = (samples.arrival_s >= at_s) & (samples.arrival_s < at_s + window_s)
    return {
        "cache_hit_rate_before": _hit_rate(samples, before),
        "cache_hit_rate_after": _hit_rate(samples, after),
        "slo_attainment_before": _share_within(samples.ttft_s[before], slo_s),
        "slo_attainment_after": _share_within(samples.ttft_s[after], slo_s),
    }


# -- the simulated run ------------------------------------------------------------------------


def _plan(args: argparse.Namespace, *, live: bool) -> ElasticPlan:
    # Live: the same modelled engines and rate, phases short enough for ~2 minutes in all.
    rate = args.rate if args.rate is not None else 6.0
    scale_out = args.scale_out_at if args.scale_out_at is not None else (10.0 if live else 90.0)
    scale_in = args.scale_in_at if args.scale_in_at is not None else (30.0 if live else 360.0)
    window = args.window if args.window is not None else (5.0 if live else 30.0)
    return ElasticPlan(
        initial=args.initial,
        added=args.added,
        removed=args.removed,
        scale_out_at_s=scale_out,
        scale_in_at_s=scale_in,
        rate_rps=rate,
        scale_in_load=args.scale_in_load,
        ttft_slo_s=args.slo if args.slo is not None else 5.0,
        window_s=window,
        drain_deadline_s=args.drain_deadline,
    )


def _trace_path(args: argparse.Namespace) -> Path:
    from twinroute.simulator.traces import bundled_mooncake_trace

    return Path(args.trace) if args.trace else bundled_mooncake_trace()


def _arrivals(args: argparse.Namespace, plan: ElasticPlan) -> Iterator[TraceChunk]:
    from twinroute.simulator.traces import read_mooncake

    return limit(
        warp_arrivals(
            read_mooncake(_trace_path(args)),
            factor=RECORDED_RATE_RPS / plan.rate_rps,
            slow_after_s=plan.scale_in_at_s,
            slow_load=plan.scale_in_load,
        ),
        duration_s=args.duration,
        max_requests=args.max_requests,
    )


def simulate_policy(
    policy: str, *, args: argparse.Namespace, plan: ElasticPlan, quiet: bool
) -> dict[str, Any]:
    from twinroute.simulator.cluster import ClusterConfig, MembershipEvent, simulate
    from twinroute.simulator.profiles import DEFAULT_PROFILE, get_profile
    from twinroute.simulator.routing import core_router_factory, trace_keys
    from twinroute.simulator.sim_cost import cost_model_for
    from twinroute.simulator.traces import MOONCAKE_BLOCK_TOKENS

    profile = get_profile(DEFAULT_PROFILE)
    cost = cost_model_for(profile)
    block = MOONCAKE_BLOCK_TOKENS
    scrape_interval = 0.5
    config = ClusterConfig(
        instances=plan.initial,
        profile=profile,
        ttft_slo_s=plan.ttft_slo_s,
        scrape_interval_s=scrape_interval,
        block_size=block,
        keep_samples=True,
        scrape_phase=((args.seed * 0.618033988749895) % 1.0) * scrape_interval,
    )
    events = [
        MembershipEvent(at_s=plan.scale_out_at_s, add=plan.added),
        MembershipEvent(
            at_s=plan.scale_in_at_s, remove=plan.removed, drain_deadline_s=plan.drain_deadline_s
        ),
    ]
    result = simulate(
        _arrivals(args, plan),
        config=config,
        router_factory=core_router_factory(
            policy=policy,
            cost=cost,
            ttft_slo_s=plan.ttft_slo_s,
            scrape_interval_s=scrape_interval,
            seed=args.seed,
            prefix_capacity_blocks=max(1, profile.kv_capacity_tokens // block),
        ),
        keys_for=trace_keys(block_size=block, model="sim-model", seed=args.seed),
        cost=cost,
        progress=None if quiet else sys.stderr,
        label=f"elastic {policy}",
        membership=events,
    )
    assert result.arrivals_s is not None and result.ttfts_s is not None
    assert result.prompt_tokens is not None and result.cached_tokens is not None
    samples = Samples(
        arrival_s=result.arrivals_s,
        ttft_s=result.ttfts_s,
        prompt_tokens=result.prompt_tokens.astype(np.float64),
        cached_tokens=result.cached_tokens.astype(np.float64),
    )
    end = float(samples.arrival_s[-1]) if samples.arrival_s.size else plan.scale_in_at_s
    changes = []
    for record in result.membership_log:
        entry: dict[str, Any] = {
            "kind": record.kind,
            "at_s": record.at_s,
            "members_before": list(record.members_before),
            "members_after": list(record.members_after),
        }
        if record.kind == "change":
            entry.update(
                added=list(record.added),
                drained=list(record.drained),
                queued_moved=record.queued_moved,
                queued_left=record.queued_left,
                **around(samples, at_s=record.at_s, window_s=plan.window_s, slo_s=plan.ttft_slo_s),
                **{
                    f"{key}_{COMPARE_WINDOWS}w": value
                    for key, value in around(
                        samples,
                        at_s=record.at_s,
                        window_s=COMPARE_WINDOWS * plan.window_s,
                        slo_s=plan.ttft_slo_s,
                    ).items()
                },
            )
        else:
            entry.update(drained=list(record.drained), failed_requests=record.failed_requests)
        changes.append(entry)
    for entry in changes:
        if entry["kind"] == "change" and entry["drained"]:
            # Drain to removal: when the last leaving instance was empty (or its deadline).
            removed = [
                c["at_s"]
                for c in changes
                if c["kind"] == "removed" and set(c["drained"]) <= set(entry["drained"])
            ]
            entry["all_removed_after_s"] = max(removed) - entry["at_s"] if removed else None
    load_times = result.load_times_s if result.load_times_s is not None else np.zeros(0)
    instances = (
        result.instances_at_load_times
        if result.instances_at_load_times is not None
        else np.zeros(0, np.int32)
    )
    return {
        "policy": policy,
        "requests": result.requests,
        "failed_requests": result.unfinished_requests,
        "slo_attainment": result.slo_attainment,
        "cache_hit_rate": result.cache_hit_rate,
        "ttft_p50_s": result.ttft_p50_s,
        "ttft_p90_s": result.ttft_p90_s,
        "load_cv": result.load_cv,
        "rebalance_moves": result.rebalance_moves,
        "wall_s": result.wall_s,
        "phases": phase_report(samples, phases=plan.phases(end), slo_s=plan.ttft_slo_s),
        "windows": windows(samples, window_s=plan.window_s, slo_s=plan.ttft_slo_s),
        "changes": changes,
        "instances_over_time": {
            "t_s": [float(t) for t in load_times[:: max(1, len(load_times) // 400)]],
            "instances": [int(n) for n in instances[:: max(1, len(load_times) // 400)]],
        },
    }


def sim_remaps(
    args: argparse.Namespace, plan: ElasticPlan, member_changes: Sequence[dict[str, Any]]
) -> list[Remap]:
    """Keys remapped by each membership change, over the prefix keys the trace showed so far."""
    from twinroute.simulator.routing import trace_keys
    from twinroute.simulator.traces import MOONCAKE_BLOCK_TOKENS

    keys_for = trace_keys(block_size=MOONCAKE_BLOCK_TOKENS, model="sim-model", seed=args.seed)
    log = KeyLog()
    for chunk in _arrivals(args, plan):
        offsets = chunk.block_offsets
        for row in range(len(chunk)):
            ids = chunk.block_ids[offsets[row] : offsets[row + 1]]
            keys = keys_for(ids, int(chunk.prompt_tokens[row]))
            log.add(float(chunk.arrival_s[row]), np.asarray(keys.block_hashes, np.uint64))
    return remaps_of(log, member_changes, virtual_nodes=args.virtual_nodes, seed=args.seed)


def remaps_of(
    log: KeyLog, member_changes: Sequence[dict[str, Any]], *, virtual_nodes: int, seed: int
) -> list[Remap]:
    """One `Remap` per change that altered the routable set (`members_before/after` are the
    routable members)."""
    remaps: list[Remap] = []
    for change in member_changes:
        before, after = change["routable_before"], change["routable_after"]
        label = f"{len(before)}->{len(after)}"
        remaps.append(
            measure_remap(
                log.seen_before(float(change["at_s"])),
                label=label,
                at_s=float(change["at_s"]),
                before=before,
                after=after,
                virtual_nodes=virtual_nodes,
                seed=seed,
            )
        )
    return remaps


def routable_changes(
    changes: Sequence[dict[str, Any]], initial: Sequence[str]
) -> list[dict[str, Any]]:
    """The routable set before and after each "change" record (draining ones leave routing at
    the change; removal later alters nothing the rings see)."""
    routable = list(initial)
    out: list[dict[str, Any]] = []
    for change in changes:
        if change["kind"] != "change":
            continue
        after = list(change["members_after"])
        out.append({"at_s": change["at_s"], "routable_before": routable, "routable_after": after})
        routable = after
    return out


# -- report -----------------------------------------------------------------------------------


def build_report(
    *,
    mode: str,
    plan: ElasticPlan,
    policies: dict[str, dict[str, Any]],
    remaps: Sequence[Remap],
    command: str,
    trace: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "bench": "elastic",
        "mode": mode,
        "command": command,
        "trace": trace,
        "plan": asdict(plan),
        "ttft_slo_s": plan.ttft_slo_s,
        "remapped_key_fraction": {r.label: r.per_candidate for r in remaps},
        "ideal_remapped_key_fraction": {r.label: r.ideal_per_candidate for r in remaps},
        "remapped_pair_fraction": {r.label: r.pair for r in remaps},
        "ideal_remapped_pair_fraction": {r.label: r.ideal_pair for r in remaps},
        "remaps": [
            {
                **asdict(r),
                "per_candidate": r.per_candidate,
                "members_before": list(r.members_before),
                "members_after": list(r.members_after),
            }
            for r in remaps
        ],
        "failed_requests": sum(int(p["failed_requests"]) for p in policies.values()),
        "slo_attainment_per_phase": {
            name: {row["phase"]: row["slo_attainment"] for row in p["phases"]}
            for name, p in policies.items()
        },
        "policies": policies,
        **(extra or {}),
    }


def _fmt(value: object, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def table(report: dict[str, Any]) -> str:
    lines = []
    policies: dict[str, dict[str, Any]] = report["policies"]
    phases = [row["phase"] for row in next(iter(policies.values()))["phases"]]
    lines.append("| policy | " + " | ".join(f"SLO met: {p}" for p in phases)
                 + " | hit rate per phase | failed |")  # fmt: skip
    lines.append("|---" * (len(phases) + 3) + "|")
    for name, row in policies.items():
        slo = " | ".join(f"{_fmt(p['slo_attainment'], '.1%')}" for p in row["phases"])
        hits = " / ".join(_fmt(p["cache_hit_rate"], ".1%") for p in row["phases"])
        lines.append(f"| {name} | {slo} | {hits} | {row['failed_requests']} |")
    lines.append("")
    lines.append("| change | keys seen | first moved | second moved | per candidate (ideal) "
                 "| pair moved (ideal) |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")
    for r in report["remaps"]:
        lines.append(
            f"| {r['label']} at {r['at_s']:.0f} s | {r['keys']} | {_fmt(r['first'])} | "
            f"{_fmt(r['second'])} | {_fmt(r['per_candidate'])} ({_fmt(r['ideal_per_candidate'])})"
            f" | {_fmt(r['pair'])} ({_fmt(r['ideal_pair'])}) |"
        )
    lines.append("")
    lines.append(
        "| policy | change | hit rate before / after (1 window) | "
        f"before / after ({COMPARE_WINDOWS} windows) | queued moved | left | "
        "drained after (s) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name, row in policies.items():
        for change in row["changes"]:
            if change["kind"] != "change":
                continue
            label = f"{len(change['members_before'])}->{len(change['members_after'])}"
            lines.append(
                f"| {name} | {label} at {change['at_s']:.0f} s | "
                f"{_fmt(change.get('cache_hit_rate_before'), '.1%')} / "
                f"{_fmt(change.get('cache_hit_rate_after'), '.1%')} | "
                f"{_fmt(change.get(f'cache_hit_rate_before_{COMPARE_WINDOWS}w'), '.1%')} / "
                f"{_fmt(change.get(f'cache_hit_rate_after_{COMPARE_WINDOWS}w'), '.1%')} | "
                f"{change.get('queued_moved', '-')} | {change.get('queued_left', '-')} | "
                f"{_fmt(change.get('all_removed_after_s', change.get('drain_s')), '.1f')} |"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], *, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies: dict[str, dict[str, Any]] = report["policies"]
    slo = report["ttft_slo_s"]
    figure, (ax_slo, ax_hit, ax_load) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for name, row in policies.items():
        starts = [w["start_s"] + report["plan"]["window_s"] / 2 for w in row["windows"]]
        width = 2.2 if name == "dualmap" else 1.2
        ax_slo.plot(starts, [100 * (w["slo_attainment"] or 0) for w in row["windows"]],
                    marker="o", markersize=3, linewidth=width, label=name)  # fmt: skip
        ax_hit.plot(starts, [100 * (w["cache_hit_rate"] or 0) for w in row["windows"]],
                    marker="o", markersize=3, linewidth=width, label=name)  # fmt: skip
    first = next(iter(policies.values()))
    instances = first["instances_over_time"]
    ax_load.step(instances["t_s"], instances["instances"], where="post", color="black",
                 label="instances")  # fmt: skip
    ax_rate = ax_load.twinx()
    ax_rate.plot([w["start_s"] + report["plan"]["window_s"] / 2 for w in first["windows"]],
                 [w["rate_rps"] for w in first["windows"]], color="tab:red", linewidth=1,
                 label="arrival rate")  # fmt: skip
    ax_rate.set_ylabel("arrivals (req/s)", color="tab:red")
    for axes in (ax_slo, ax_hit, ax_load):
        for remap in report["remaps"]:
            axes.axvline(remap["at_s"], color="grey", linestyle="--", linewidth=1)
    for remap in report["remaps"]:
        ax_slo.annotate(
            f"{remap['label']}\nkeys moved {100 * remap['per_candidate']:.0f}% "
            f"(ideal {100 * remap['ideal_per_candidate']:.0f}%)",
            xy=(remap["at_s"], 5), fontsize=7, color="grey",
        )  # fmt: skip
    ax_slo.set_ylabel(f"TTFT <= {slo:g} s (%)")
    ax_slo.set_ylim(0, 105)
    ax_slo.legend(loc="lower right", fontsize=8)
    ax_hit.set_ylabel("cache hit rate (%)")
    ax_load.set_ylabel("instances")
    ax_load.set_xlabel("arrival time (s)")
    ax_load.set_ylim(0, max(instances["instances"] or [1]) + 1)
    ax_slo.set_title(
        f"Elastic scaling ({report['mode']}): failed requests {report['failed_requests']}"
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _write(report: dict[str, Any], args: argparse.Namespace, *, stem: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False, default=_json_default)
    targets = [args.out / f"{stem}.json"]
    if args.json is not None and Path(args.json).resolve() != targets[0].resolve():
        targets.append(Path(args.json))
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    (args.out / f"{stem}.md").write_text(
        f"Command: `{report['command']}`\n\n{table(report)}\n", encoding="utf-8"
    )
    print(table(report))
    if not args.no_plot:
        path = plot(report, out=args.out / f"{stem}.png")
        print(f"plot: {path}")
    print("json: " + ", ".join(str(t) for t in targets))


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def run_sim(args: argparse.Namespace) -> int:
    plan = _plan(args, live=False)
    names = [p.strip() for p in (args.policies or ",".join(DEFAULT_POLICIES)).split(",")]
    names = [name for name in names if name]
    from twinroute.scheduler.policies import POLICY_NAMES

    unknown = sorted(set(names) - set(POLICY_NAMES))
    if unknown or not names:
        print(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    policies: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names, start=1):
        row = simulate_policy(name, args=args, plan=plan, quiet=args.quiet)
        policies[name] = row
        if not args.quiet:
            phases = ", ".join(_fmt(p["slo_attainment"], ".1%") for p in row["phases"])
            print(
                f"[{index}/{len(names)}] {name}: SLO met per phase {phases}, failed "
                f"{row['failed_requests']}, {row['wall_s']:.1f} s wall "
                f"({time.perf_counter() - started:.0f} s total)",
                file=sys.stderr,
                flush=True,
            )
    first = next(iter(policies.values()))
    initial = [f"sim-{i:03d}" for i in range(plan.initial)]
    remaps = sim_remaps(args, plan, routable_changes(first["changes"], initial))
    report = build_report(
        mode="sim",
        plan=plan,
        policies=policies,
        remaps=remaps,
        command="twinroute bench elastic " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else []),
        trace=str(_trace_path(args)),
        extra={"wall_s": time.perf_counter() - started},
    )
    _write(_clean(report), args, stem="elastic")
    return 0 if report["failed_requests"] == 0 else 1


def run(args: argparse.Namespace) -> int:
    try:
        if args.live:
            from twinroute.bench.elastic_live import run_live

            return run_live(args)
        return run_sim(args)
    except ValueError as error:
        print(f"twinroute bench elastic: {error}", file=sys.stderr)
        return 2
