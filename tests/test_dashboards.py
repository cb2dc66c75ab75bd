"""The Grafana dashboards the chart ships query what twinroute really exposes.

A renamed metric leaves a dashboard panel saying "No data" with nothing else to tell the
operator why; here every series a panel queries, and every label it groups by, is checked
against the /metrics of a running router with its embedded scheduler (the same metric
families a separate `twinroute scheduler` exposes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest

from twinroute.bench.processes import start_announced, twinroute_argv

DASHBOARDS = sorted((Path(__file__).parent.parent / "charts").glob("*/dashboards/*.json"))
# Labels Prometheus adds when it scrapes a pod, not the servers.
SCRAPE_LABELS = frozenset({"namespace", "service", "pod", "instance", "job", "le"})
pytestmark = pytest.mark.slow


def exposed_series(exposition: str) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry."""
    series: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ", 1)[0]
        labels = set(re.findall(r'([a-zA-Z_]+)="', rest.rsplit("}", 1)[0])) if rest else set()
        series.setdefault(name, set()).update(labels)
    return series


def panel_queries(dashboard: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel."""
    panels = json.loads(dashboard.read_text())["panels"]
    return [
        (panel.get("title", ""), target["expr"])
        for panel in panels
        for target in panel.get("targets", [])
        if "expr" in target
    ]


async def served_exposition() -> str:
    engine = await start_announced(
        "engine",
        twinroute_argv(
            "engine-sim", "--port=0", "--model=m", "--instance-id=e0", "--time-scale=0.01"
        ),
    )
    router = await start_announced(
        "router",
        twinroute_argv(
            "router", "--port=0", "--model=m", f"--endpoints=e0={engine.address}",
            "--embedded", "--policy=dualmap",
        ),
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            # One streamed request, so histograms and labelled series have samples.
            body = {"model": "m", "prompt": "hello " * 60, "max_tokens": 3, "stream": True}
            async with session.post(f"{router.url}/v1/completions", json=body) as response:
                assert response.status == 200
                await response.read()
            async with session.get(f"{router.url}/metrics") as response:
                return await response.text()
    finally:
        await router.stop()
        await engine.stop()


async def test_every_dashboard_panel_queries_series_twinroute_exposes() -> None:
    assert DASHBOARDS, "the chart ships dashboards"
    series = exposed_series(await served_exposition())
    missing = []
    for dashboard in DASHBOARDS:
        for title, expr in panel_queries(dashboard):
            grouped = set()
            for by in re.findall(r"by \(([^)]*)\)", expr):
                grouped |= {label.strip() for label in by.split(",")}
            for name in re.findall(r"\b(twinroute_[a-z_]+)", expr):
                if name not in series:
                    missing.append(f"{dashboard.name} / {title}: no series {name}")
                    continue
                absent = grouped - SCRAPE_LABELS - series[name]
                if absent:
                    missing.append(f"{dashboard.name} / {title}: {name} has no {sorted(absent)}")
    assert not missing, "\n".join(missing)
