"""The elasticity experiment's shared parts: its plan, the keys-remapped measure, the
per-window and per-phase figures, and the report (JSON, table, PNG). `twinroute bench elastic`
(`bench/elastic.py`, simulated) and its `--live` run (`bench/elastic_live.py`) both build on
them; the scenario and the measures are described in `bench/elastic.py`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from twinroute.bench import recorded_path

COMPARE_WINDOWS = 4
"""Before/after a change is also compared over this many windows: one window is noisy (the
trace's own reuse swings from window to window)."""


RECORDED_RATE_RPS = 3.907  # the bundled Mooncake synthetic trace: 3,993 requests in 1,022 s


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


def plan_from(args: argparse.Namespace, *, live: bool) -> ElasticPlan:
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
        ttft_slo_s=args.ttft_slo_s,
        window_s=window,
        drain_deadline_s=args.drain_deadline,
    )


def trace_path(args: argparse.Namespace) -> Path:
    from twinroute.simulator.traces import bundled_mooncake_trace

    return Path(args.trace) if args.trace else bundled_mooncake_trace()


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
        "trace": recorded_path(trace),
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


def fmt(value: object, spec: str = ".3f") -> str:
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
        slo = " | ".join(f"{fmt(p['slo_attainment'], '.1%')}" for p in row["phases"])
        hits = " / ".join(fmt(p["cache_hit_rate"], ".1%") for p in row["phases"])
        lines.append(f"| {name} | {slo} | {hits} | {row['failed_requests']} |")
    lines.append("")
    lines.append("| change | keys seen | first moved | second moved | per candidate (ideal) "
                 "| pair moved (ideal) |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")
    for r in report["remaps"]:
        lines.append(
            f"| {r['label']} at {r['at_s']:.0f} s | {r['keys']} | {fmt(r['first'])} | "
            f"{fmt(r['second'])} | {fmt(r['per_candidate'])} ({fmt(r['ideal_per_candidate'])})"
            f" | {fmt(r['pair'])} ({fmt(r['ideal_pair'])}) |"
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
                f"{fmt(change.get('cache_hit_rate_before'), '.1%')} / "
                f"{fmt(change.get('cache_hit_rate_after'), '.1%')} | "
                f"{fmt(change.get(f'cache_hit_rate_before_{COMPARE_WINDOWS}w'), '.1%')} / "
                f"{fmt(change.get(f'cache_hit_rate_after_{COMPARE_WINDOWS}w'), '.1%')} | "
                f"{change.get('queued_moved', '-')} | {change.get('queued_left', '-')} | "
                f"{fmt(change.get('all_removed_after_s', change.get('drain_s')), '.1f')} |"
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


def write_report(report: dict[str, Any], args: argparse.Namespace, *, stem: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False, default=json_default)
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


def json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value
