"""Figures for people: the one way the demo, `simulate` and the benchmarks print them."""

from __future__ import annotations

import math


def _missing(value: object) -> bool:
    return not isinstance(value, int | float) or math.isnan(value)


def seconds(value: object) -> str:
    """Seconds: ms below one second, 3 significant figures; "-" when not measured."""
    if _missing(value):
        return "-"
    assert isinstance(value, int | float)
    return f"{value * 1000:.3g} ms" if abs(value) < 1.0 else f"{value:.3g} s"


def percent(value: object) -> str:
    """A share as a percentage with one decimal; "-" when not measured."""
    if _missing(value):
        return "-"
    assert isinstance(value, int | float)
    return f"{value:.1%}"
