"""What `twinroute demo` concludes: the summary table and the sentences under it.

Pure functions over the live bench's JSON (`twinroute bench live`, `live.json`), so the
verdict is tested on recorded figures and never depends on how a run went.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from twinroute.bench.live import label, seconds

# twinroute's own paths, the one the others are measured against first.
TWINROUTE = "twinroute_dualmap"
KUBERNETES_SERVICE = "twinroute_round_robin"
# Differences smaller than these are called level: one run of a few hundred requests on a
# shared machine moves by about this much between repeats.
LEVEL_POINTS = 2.0  # percentage points (SLO attainment, cache hit rate)
LEVEL_RATIO = 1.10  # latency ratio
LEVEL_LOAD = 0.10  # max/mean load


@dataclass(frozen=True, slots=True)
class Comparison:
    """twinroute against one other path, the figures and what they mean."""

    other: str
    slo_points: float  # twinroute's SLO attainment minus the other's, percentage points
    p50_ratio: float  # the other's TTFT p50 / twinroute's (> 1: twinroute is faster)
    p90_ratio: float
    hit_points: float  # twinroute's cache hit rate minus the other's, percentage points
    load_difference: float  # the other's max/mean load minus twinroute's (> 0: we are evener)
    sentence: str
    losses: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "other": self.other,
            "other_label": label(self.other),
            "slo_attainment_points": round(self.slo_points, 2),
            "ttft_p50_ratio": _rounded(self.p50_ratio),
            "ttft_p90_ratio": _rounded(self.p90_ratio),
            "cache_hit_points": round(self.hit_points, 2),
            "max_over_mean_load_difference": round(self.load_difference, 3),
            "meaning": self.sentence,
            "where_twinroute_loses": list(self.losses),
        }


def _rounded(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _ratio(other: float | None, ours: float | None) -> float:
    if other is None or ours is None or ours <= 0:
        return math.nan
    return other / ours


def _times(ratio: float) -> str:
    """ "2.3x lower" / "1.4x higher" for a ratio other/ours of a lower-is-better figure."""
    if ratio >= 1:
        return f"{ratio:.2g}x lower"
    return f"{1 / ratio:.2g}x higher"


def _sooner(ratio: float) -> str:
    """ "2.3x sooner" / "1.4x later" for a ratio other/ours of a waiting time."""
    if ratio >= 1:
        return f"{ratio:.2g}x sooner"
    return f"{1 / ratio:.2g}x later"


def compare(results: dict[str, dict[str, Any]], other: str, *, ours: str = TWINROUTE,
            slo_s: float) -> Comparison:  # fmt: skip
    """twinroute (`ours`) against `other`, from the live bench's per-router figures."""
    mine, theirs = results[ours], results[other]
    slo_points = 100 * (mine["slo_attainment"] - theirs["slo_attainment"])
    p50 = _ratio(theirs["ttft_p50_s"], mine["ttft_p50_s"])
    p90 = _ratio(theirs["ttft_p90_s"], mine["ttft_p90_s"])
    hit_points = 100 * (mine["cache_hit_rate"] - theirs["cache_hit_rate"])
    load = theirs["max_over_mean_load"] - mine["max_over_mean_load"]
    losses: list[str] = []
    if slo_points < -LEVEL_POINTS:
        losses.append(
            f"{label(other)} kept more requests within the {slo_s:g} s SLO "
            f"({theirs['slo_attainment']:.1%} vs {mine['slo_attainment']:.1%})"
        )
    for name, ratio, key in (("median", p50, "ttft_p50_s"), ("p90", p90, "ttft_p90_s")):
        if math.isfinite(ratio) and ratio < 1 / LEVEL_RATIO:
            losses.append(
                f"{label(other)} had the lower {name} TTFT ({seconds(theirs[key])} vs "
                f"{seconds(mine[key])})"
            )
    if hit_points < -LEVEL_POINTS:
        losses.append(
            f"{label(other)} found more prompt tokens cached ({theirs['cache_hit_rate']:.1%} "
            f"vs {mine['cache_hit_rate']:.1%})"
        )
    if load < -LEVEL_LOAD:
        losses.append(
            f"{label(other)} spread requests more evenly (busiest engine "
            f"{theirs['max_over_mean_load']:.2f}x the mean vs {mine['max_over_mean_load']:.2f}x)"
        )
    if theirs["errors"] < mine["errors"]:
        losses.append(
            f"{label(other)} failed fewer requests ({theirs['errors']} vs {mine['errors']})"
        )
    return Comparison(
        other=other,
        slo_points=slo_points,
        p50_ratio=p50,
        p90_ratio=p90,
        hit_points=hit_points,
        load_difference=load,
        sentence=_meaning(
            mine, theirs, other=other, ours=ours, slo_s=slo_s, p50=p50, hit_points=hit_points
        ),
        losses=tuple(losses),
    )


def _meaning(mine: dict[str, Any], theirs: dict[str, Any], *, other: str, ours: str,
             slo_s: float, p50: float, hit_points: float) -> str:  # fmt: skip
    """One sentence a newcomer can act on: what the difference is, and why."""
    within = (
        f"{mine['slo_attainment']:.0%} of requests met the {slo_s:g} s TTFT objective against "
        f"{theirs['slo_attainment']:.0%}"
    )
    if _is_envoy(other):
        return (
            "The same scheduler behind Envoy makes the same kind of decisions "
            f"(cache hit {theirs['cache_hit_rate']:.0%} vs {mine['cache_hit_rate']:.0%}); use it "
            "where you already run a Gateway API gateway. It costs more CPU per request than "
            "the Python router on a small machine (BENCHMARKS.md)."
        )
    if not math.isfinite(p50):
        return f"{label(other)} answered no request; {within}."
    speed = (
        f"with twinroute the median request got its first token {_sooner(p50)} "
        f"({seconds(mine['ttft_p50_s'])} vs {seconds(theirs['ttft_p50_s'])})"
        if abs(math.log(p50)) >= math.log(LEVEL_RATIO)
        else f"the median TTFT was level ({seconds(mine['ttft_p50_s'])} vs "
        f"{seconds(theirs['ttft_p50_s'])})"
    )
    if other == KUBERNETES_SERVICE:
        why = (
            f"A Kubernetes Service spreads requests evenly but ignores the cache: the engines "
            f"found {theirs['cache_hit_rate']:.0%} of prompt tokens cached against "
            f"{mine['cache_hit_rate']:.0%} with twinroute, so they computed the rest again"
        )
    elif hit_points > LEVEL_POINTS:
        why = (
            f"It found fewer prompt tokens cached ({theirs['cache_hit_rate']:.0%} vs "
            f"{mine['cache_hit_rate']:.0%} with twinroute)"
        )
    elif hit_points < -LEVEL_POINTS:
        why = (
            f"It found more prompt tokens cached ({theirs['cache_hit_rate']:.0%} vs "
            f"{mine['cache_hit_rate']:.0%} with twinroute) yet placed requests differently "
            "under load"
        )
    else:
        why = (
            f"It found as much cached as twinroute ({theirs['cache_hit_rate']:.0%} vs "
            f"{mine['cache_hit_rate']:.0%}); the difference is where it put requests under load "
            f"(busiest engine {theirs['max_over_mean_load']:.2f}x the mean vs "
            f"{mine['max_over_mean_load']:.2f}x)"
        )
    return f"{why}; {speed}, and {within}."


def _is_envoy(name: str) -> bool:
    return name.startswith("twinroute_envoy")


def headline(comparison: Comparison) -> str:
    """The one line that leads the summary: twinroute against a Kubernetes Service."""
    parts = []
    if math.isfinite(comparison.p50_ratio):
        parts.append(f"median TTFT {_times(comparison.p50_ratio)}")
    if math.isfinite(comparison.p90_ratio):
        parts.append(f"p90 TTFT {_times(comparison.p90_ratio)}")
    parts.append(f"{comparison.slo_points:+.1f} points of requests within the SLO")
    parts.append(f"{comparison.hit_points:+.1f} points of prompt tokens cached")
    return f"Against {label(comparison.other)}: " + ", ".join(parts) + "."


@dataclass(frozen=True, slots=True)
class Verdict:
    markdown: str
    data: dict[str, Any]


def live_verdict(document: dict[str, Any], *, simulated_ideal: float | None = None) -> Verdict:
    """The summary of a live run: a table of every path, one sentence per other path, the
    headline against a Kubernetes Service, and where twinroute did not win."""
    results: dict[str, dict[str, Any]] = document["routers"]
    slo_s = float(document["slo_s"])
    reuse = document.get("reuse_in_window")
    lines = [
        f"| path | within {slo_s:g} s SLO | TTFT p50 | TTFT p90 | prompt tokens cached "
        "| busiest engine / mean | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {label(name)} | {r['slo_attainment']:.1%} | {seconds(r['ttft_p50_s'])} "
            f"| {seconds(r['ttft_p90_s'])} | {r['cache_hit_rate']:.1%} "
            f"| {r['max_over_mean_load']:.2f} | {r['errors']} |"
        )
    table = "\n".join(lines)
    if TWINROUTE not in results:
        return Verdict(markdown=table, data={"table": table, "comparisons": []})
    others = [n for n in results if n != TWINROUTE]
    comparisons = [compare(results, n, slo_s=slo_s) for n in others]
    lead = next((c for c in comparisons if c.other == KUBERNETES_SERVICE), None)
    text = [f"**{headline(lead)}**", ""] if lead is not None else []
    text += [table, "", "What each row means, against the twinroute router:"]
    text += [f"- **{label(c.other)}**: {c.sentence}" for c in comparisons]
    # The Envoy path is twinroute too: where it beats the router is no loss of twinroute's.
    losses = [loss for c in comparisons if not _is_envoy(c.other) for loss in c.losses]
    text += ["", "Where twinroute did not win here:"]
    text += [f"- {loss}" for loss in losses] or ["- nowhere in this run, beyond the noise margin"]
    text.append(
        "- not measured here: CPU per request. twinroute's Python router and its Envoy path "
        'cost several times the CPU of the Rust routers (BENCHMARKS.md, "Where we lose").'
    )
    if reuse is not None:
        gap = (
            f" The simulated pool replays the whole trace, where one cache as large as the pool "
            f"could hit {simulated_ideal:.0%}."
            if simulated_ideal is not None
            else ""
        )
        text += [
            "",
            f"Why the live hit rates are what they are: the live run replays "
            f"{document.get('duration_s', 0):g} s of the trace from second "
            f"{document.get('trace_start_s', 0):g}, starting with empty caches; "
            f"{reuse:.1%} of its prompt tokens repeat an earlier request of that window, "
            f"which is the most any router could find cached.{gap}",
        ]
    data = {
        "slo_s": slo_s,
        "reuse_in_window": reuse,
        "headline": headline(lead) if lead is not None else None,
        "comparisons": [c.as_dict() for c in comparisons],
        "paths": {
            name: {
                "label": label(name),
                "slo_attainment": r["slo_attainment"],
                "ttft_p50_s": r["ttft_p50_s"],
                "ttft_p90_s": r["ttft_p90_s"],
                "cache_hit_rate": r["cache_hit_rate"],
                "max_over_mean_load": r["max_over_mean_load"],
                "errors": r["errors"],
            }
            for name, r in results.items()
        },
    }
    return Verdict(markdown="\n".join(text), data=data)
