"""What `twinroute demo` concludes: the summary table and the sentences under it.

Pure functions over the live bench's JSON (`twinroute bench live`, `live.json`), so the
verdict is tested on recorded figures and never depends on how a run went.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from twinroute.bench.live import label
from twinroute.formatting import percent, seconds

# twinroute's own path, the one the others are measured against.
TWINROUTE = "twinroute_dualmap"
KUBERNETES_SERVICE = "twinroute_round_robin"
# Differences smaller than these are called level. Shares (SLO attainment, cache hits) use two
# standard errors of the difference of two shares over the run's requests, at least this many
# percentage points: one run of a few hundred requests moves by about that between repeats.
MIN_LEVEL_POINTS = 2.0
LEVEL_RATIO = 1.10  # latency ratio
LEVEL_LOAD = 0.10  # max/mean load
LEVEL_ERRORS = 0.01  # share of requests


@dataclass(frozen=True, slots=True)
class Comparison:
    """twinroute against one other path, the figures and what they mean."""

    other: str
    slo_points: float  # twinroute's SLO attainment minus the other's, percentage points
    p50_ratio: float  # the other's TTFT p50 / twinroute's (> 1: twinroute is faster); NaN: n/a
    p90_ratio: float
    hit_points: float  # twinroute's cache hit rate minus the other's, percentage points
    load_difference: float  # the other's max/mean load minus twinroute's (> 0: we are evener)
    level_points: float  # the noise margin used for the shares
    sentence: str
    losses: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "other": self.other,
            "other_label": label(self.other),
            "slo_attainment_points": _rounded(self.slo_points, 2),
            "ttft_p50_ratio": _rounded(self.p50_ratio, 3),
            "ttft_p90_ratio": _rounded(self.p90_ratio, 3),
            "cache_hit_points": _rounded(self.hit_points, 2),
            "max_over_mean_load_difference": _rounded(self.load_difference, 3),
            "level_points": _rounded(self.level_points, 2),
            "meaning": self.sentence,
            "where_twinroute_loses": list(self.losses),
        }


def _rounded(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def _number(value: Any) -> float:
    """A figure from the JSON; None (nothing measured) becomes NaN."""
    return math.nan if value is None else float(value)


def _ratio(other: float | None, ours: float | None) -> float:
    if other is None or ours is None or ours <= 0:
        return math.nan
    return other / ours


def _factor(ratio: float) -> str:
    """3.4 -> "3.4x", 123 -> "123x": two significant figures, never an exponent."""
    return f"{ratio:.2g}x" if ratio < 10 else f"{ratio:.0f}x"


def _times(ratio: float) -> str:
    """ "2.3x lower" / "1.4x higher" / "level" for a ratio other/ours of a lower-is-better
    figure."""
    if abs(math.log(ratio)) < math.log(LEVEL_RATIO):
        return "level"
    return f"{_factor(ratio)} lower" if ratio > 1 else f"{_factor(1 / ratio)} higher"


def _sooner(ratio: float) -> str:
    """ "2.3x sooner" / "1.4x later" for a ratio other/ours of a waiting time."""
    return f"{_factor(ratio)} sooner" if ratio >= 1 else f"{_factor(1 / ratio)} later"


def level_points(mine: dict[str, Any], theirs: dict[str, Any], key: str) -> float:
    """The noise margin, in percentage points, for a share measured on both runs."""
    a, b = _number(mine.get(key)), _number(theirs.get(key))
    n = max(1, min(int(mine.get("requests") or 0), int(theirs.get("requests") or 0)))
    if math.isnan(a) or math.isnan(b):
        return MIN_LEVEL_POINTS
    spread = math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    return max(MIN_LEVEL_POINTS, 100 * 2 * spread)


def _answered(figures: dict[str, Any]) -> bool:
    return figures.get("ttft_p50_s") is not None


def compare(results: dict[str, dict[str, Any]], other: str, *, ours: str = TWINROUTE,
            slo_s: float) -> Comparison:  # fmt: skip
    """twinroute (`ours`) against `other`, from the live bench's per-router figures."""
    mine, theirs = results[ours], results[other]
    margin = level_points(mine, theirs, "slo_attainment")
    slo_points = 100 * (mine["slo_attainment"] - theirs["slo_attainment"])
    p50 = _ratio(theirs["ttft_p50_s"], mine["ttft_p50_s"])
    p90 = _ratio(theirs["ttft_p90_s"], mine["ttft_p90_s"])
    hit_points = 100 * (_number(mine.get("cache_hit_rate")) - _number(theirs.get("cache_hit_rate")))
    load = _number(theirs.get("max_over_mean_load")) - _number(mine.get("max_over_mean_load"))
    losses: list[str] = []
    if slo_points < -margin:
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
    # Cache and load figures of a run that answered nothing say nothing (NaN compares false).
    if hit_points < -level_points(mine, theirs, "cache_hit_rate"):
        losses.append(
            f"{label(other)} found more prompt tokens cached ({theirs['cache_hit_rate']:.1%} "
            f"vs {mine['cache_hit_rate']:.1%})"
        )
    if load < -LEVEL_LOAD:
        losses.append(
            f"{label(other)} spread requests more evenly (busiest engine "
            f"{theirs['max_over_mean_load']:.2f}x the mean vs {mine['max_over_mean_load']:.2f}x)"
        )
    requests = max(1, int(mine.get("requests") or 0))
    if (mine["errors"] - theirs["errors"]) / requests > LEVEL_ERRORS:
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
        level_points=margin,
        sentence=_meaning(
            mine, theirs, other=other, slo_s=slo_s, p50=p50, hit_points=hit_points, margin=margin
        ),
        losses=tuple(losses),
    )


def _meaning(mine: dict[str, Any], theirs: dict[str, Any], *, other: str, slo_s: float,
             p50: float, hit_points: float, margin: float) -> str:  # fmt: skip
    """One sentence a newcomer can act on: what the difference is, and why."""
    within = (
        f"{mine['slo_attainment']:.0%} of requests met the {slo_s:g} s TTFT objective against "
        f"{theirs['slo_attainment']:.0%}"
    )
    if not _answered(mine):
        return f"twinroute's router answered no request in this run (see its logs); {within}."
    if not _answered(theirs):
        return f"It answered no request in this run (see its logs); {within}."
    if _is_envoy(other):
        similar = abs(hit_points) <= margin
        return (
            f"The same scheduler behind Envoy (cache hit {theirs['cache_hit_rate']:.0%} vs "
            f"{mine['cache_hit_rate']:.0%}, median TTFT {seconds(theirs['ttft_p50_s'])} vs "
            f"{seconds(mine['ttft_p50_s'])}"
            + ("" if similar else "; the cache hits differ more than the noise")
            + "); use it where you already run a Gateway API gateway. It costs more CPU per "
            "request than the Python router on a small machine (BENCHMARKS.md)."
        )
    speed = (
        f"with twinroute the median request got its first token {_sooner(p50)} "
        f"({seconds(mine['ttft_p50_s'])} vs {seconds(theirs['ttft_p50_s'])})"
        if abs(math.log(p50)) >= math.log(LEVEL_RATIO)
        else f"the median TTFT was level ({seconds(mine['ttft_p50_s'])} vs "
        f"{seconds(theirs['ttft_p50_s'])})"
    )
    hits = f"{theirs['cache_hit_rate']:.0%} vs {mine['cache_hit_rate']:.0%} with twinroute"
    if other == KUBERNETES_SERVICE and hit_points > margin:
        why = (
            f"A Kubernetes Service spreads requests evenly but ignores the cache: the engines "
            f"found {theirs['cache_hit_rate']:.0%} of prompt tokens cached against "
            f"{mine['cache_hit_rate']:.0%} with twinroute, so they computed the rest again"
        )
    elif hit_points > margin:
        why = f"It found fewer prompt tokens cached ({hits})"
    elif hit_points < -margin:
        why = f"It found more prompt tokens cached ({hits}) yet placed requests differently"
    else:
        why = (
            f"It found as much cached as twinroute ({theirs['cache_hit_rate']:.0%} vs "
            f"{mine['cache_hit_rate']:.0%}); the difference is where it put "
            f"requests under load (busiest engine {theirs['max_over_mean_load']:.2f}x the mean "
            f"vs {mine['max_over_mean_load']:.2f}x)"
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
    if math.isfinite(comparison.hit_points):
        parts.append(f"{comparison.hit_points:+.1f} points of prompt tokens cached")
    return f"Against {label(comparison.other)}: " + ", ".join(parts) + "."


@dataclass(frozen=True, slots=True)
class Verdict:
    markdown: str
    data: dict[str, Any]


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
            f"| {seconds(r['ttft_p90_s'])} | {percent(r.get('cache_hit_rate'))} "
            f"| {_cell(r.get('max_over_mean_load'), '.2f')} | {r['errors']} |"
        )
    table = "\n".join(lines)
    others = [n for n in results if n != TWINROUTE]
    if TWINROUTE not in results or not others:
        return Verdict(markdown=table, data={"table": table, "comparisons": []})
    comparisons = [compare(results, n, slo_s=slo_s) for n in others]
    lead = next((c for c in comparisons if c.other == KUBERNETES_SERVICE), None)
    text = [f"**{headline(lead)}**", ""] if lead is not None else []
    text += [table, "", "What each row means, against the twinroute router:"]
    text += [f"- **{label(c.other)}**: {c.sentence}" for c in comparisons]
    # The Envoy path is twinroute too: where it beats the router is no loss of twinroute's.
    losses = [loss for c in comparisons if not _is_envoy(c.other) for loss in c.losses]
    text += ["", "Where twinroute did not win here:"]
    text += [f"- {loss}" for loss in losses] or [
        "- nowhere in this run, beyond the noise margin (two standard errors, at least "
        f"{MIN_LEVEL_POINTS:g} points; latency within {LEVEL_RATIO:g}x)"
    ]
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
        window_s = float(document.get("duration_s", 0)) * float(document.get("speedup", 1))
        text += [
            "",
            f"Why the live hit rates are what they are: the live run replays {window_s:g} s of "
            f"the trace from second {document.get('trace_start_s', 0):g}, starting with empty "
            f"caches; {reuse:.1%} of its prompt tokens repeat an earlier request of that window, "
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
                **{
                    key: r.get(key)
                    for key in (
                        "requests",
                        "slo_attainment",
                        "ttft_p50_s",
                        "ttft_p90_s",
                        "cache_hit_rate",
                        "max_over_mean_load",
                        "errors",
                    )
                },
            }
            for name, r in results.items()
        },
    }
    return Verdict(markdown="\n".join(text), data=data)
