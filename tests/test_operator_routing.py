"""ModelPool routing settings reach the scheduler and the router: each field parsed, rendered,
and read back by the real `twinroute scheduler` / `twinroute router` argument parsers (the
operator and the scheduler never import each other, so this test holds them together)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from twinroute.operator.render import (
    CONFIG_DIR,
    CONFIG_FILE,
    Owner,
    RenderSettings,
    render_children,
)
from twinroute.operator.spec import (
    DEFAULT_ADMISSION_HOLD,
    DEFAULT_MIGRATION,
    DEFAULT_PD_MIN_PREFILL_TOKENS,
    DEFAULT_PHASE_AWARE,
    SpecError,
    parse_pool,
)
from twinroute.scheduler import command as scheduler_command
from twinroute.scheduler.settings import SchedulerSettings

from twinroute.router import command as router_command

SETTINGS = RenderSettings(scheduler_image="twinroute:1")
PD: dict[str, Any] = {
    "model": {"name": "llama"},
    "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 3}},
}


def spec_with(routing: dict[str, Any]) -> dict[str, Any]:
    return {**PD, "routing": routing}


INVALID = {
    "pd threshold negative": ({"pdMinPrefillTokens": -1}, "routing.pdMinPrefillTokens"),
    "pd threshold string": ({"pdMinPrefillTokens": "100"}, "routing.pdMinPrefillTokens"),
    "pd threshold boolean": ({"pdMinPrefillTokens": True}, "routing.pdMinPrefillTokens"),
    "pd threshold huge": ({"pdMinPrefillTokens": 10**8}, "routing.pdMinPrefillTokens"),
    "migration unknown": ({"migration": "always"}, "routing.migration"),
    "migration boolean": ({"migration": False}, "routing.migration"),
    "admission hold string": ({"admissionHold": "on"}, "routing.admissionHold"),
    "phase aware number": ({"phaseAware": 1}, "routing.phaseAware"),
    "rebalancing string": ({"rebalancing": "yes"}, "routing.rebalancing"),
}


@pytest.mark.parametrize(("routing", "field"), INVALID.values(), ids=INVALID.keys())
def test_invalid_routing_settings_name_the_field(routing: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_pool(name="chat", namespace="ns", spec=spec_with(routing))
    assert error.value.field == field
    assert str(error.value).startswith(f"spec.{field}:")


def test_defaults() -> None:
    routing = parse_pool(name="chat", namespace="ns", spec=PD).routing
    assert routing.pd_min_prefill_tokens == DEFAULT_PD_MIN_PREFILL_TOKENS == 100
    assert routing.migration == DEFAULT_MIGRATION == "drain"
    assert routing.admission_hold is DEFAULT_ADMISSION_HOLD is False
    assert routing.phase_aware is DEFAULT_PHASE_AWARE is True
    assert routing.rebalancing is True


def rendered_processes(
    routing: dict[str, Any], tmp_path: Path
) -> tuple[SchedulerSettings, argparse.Namespace]:
    """The scheduler's settings and the router's arguments as their own parsers read the
    rendered pod (the scheduler's --config pointed at the rendered ConfigMap's text)."""
    pool = parse_pool(name="chat", namespace="ns", spec=spec_with(routing))
    objects = render_children(pool, owner=Owner(name="chat", uid="u"), settings=SETTINGS)
    kinds = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    config = tmp_path / CONFIG_FILE
    config.write_text(kinds["ConfigMap", "chat-scheduler"]["data"][CONFIG_FILE])
    pod = kinds["Deployment", "chat-scheduler"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    scheduler_argv = [
        str(config) if arg == f"{CONFIG_DIR}/{CONFIG_FILE}" else arg
        for arg in containers["scheduler"]["args"]
    ]
    parser = argparse.ArgumentParser()
    scheduler_command.add_arguments(parser)
    scheduler = scheduler_command.resolve_arguments(parser.parse_args(scheduler_argv))
    parser = argparse.ArgumentParser()
    router_command.add_arguments(parser)
    router = parser.parse_args(containers["router"]["args"])
    return scheduler, router


# routing -> (pd threshold, migration, phase-aware, admission hold, router's Pick timeout)
RENDERED = {
    "defaults": ({}, (100, "drain", True, False, 1.0)),
    "pd threshold 300": ({"pdMinPrefillTokens": 300}, (300, "drain", True, False, 1.0)),
    "pd threshold 0 (always prefill hop)": (
        {"pdMinPrefillTokens": 0},
        (0, "drain", True, False, 1.0),
    ),
    "migration off": ({"migration": "off"}, (100, "off", True, False, 1.0)),
    "migration on": ({"migration": "on"}, (100, "on", True, False, 1.0)),
    "phase blind": ({"phaseAware": False}, (100, "drain", False, False, 1.0)),
    "admission hold": ({"admissionHold": True}, (100, "drain", True, True, 4.0)),
    "admission hold without rebalancing holds nothing": (
        {"admissionHold": True, "rebalancing": False},
        (100, "drain", True, False, 1.0),
    ),
}


@pytest.mark.parametrize(("routing", "expected"), RENDERED.values(), ids=RENDERED.keys())
def test_routing_settings_reach_the_scheduler_and_router(
    routing: dict[str, Any], expected: tuple[int, str, bool, bool, float], tmp_path: Path
) -> None:
    scheduler, router = rendered_processes(routing, tmp_path)
    pd_threshold, migration, phase_aware, hold, pick_timeout = expected
    assert scheduler.pd_min_prefill_tokens == pd_threshold
    assert (scheduler.migration, router.migration) == (migration, migration)
    assert scheduler.phase_aware is phase_aware
    assert scheduler.admission_hold is hold
    # A held Pick must not outlast the router's deadline for it.
    assert router.scheduler_timeout_s == pick_timeout
    if hold:
        assert router.scheduler_timeout_s > scheduler.admission_max_hold_s
    # The pool's SLO is the scheduler's alone: the router neither takes nor stamps one.
    assert router.ttft_slo_s is None
    assert scheduler.ttft_slo_s == 5.0


def test_a_routing_change_rolls_the_scheduler_pods(tmp_path: Path) -> None:
    def template(routing: dict[str, Any]) -> dict[str, Any]:
        pool = parse_pool(name="chat", namespace="ns", spec=spec_with(routing))
        objects = render_children(pool, owner=Owner(name="chat", uid="u"), settings=SETTINGS)
        deployment = next(
            o
            for o in objects
            if (o["kind"], o["metadata"]["name"]) == ("Deployment", "chat-scheduler")
        )
        return dict(deployment["spec"]["template"])

    base = template({})
    for change in ({"pdMinPrefillTokens": 50}, {"migration": "off"}, {"admissionHold": True}):
        assert template(change) != base, change
