"""The scheduler reads the config the operator renders for it: the two are built apart
(operator and scheduler never import each other), so this test holds them together.

The config file has a schema (`twinroute.scheduler.settings.parse_config`): every key the
operator writes is read into a setting, and a key nobody reads is an error naming it, so the
two cannot drift apart silently."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from twinroute.operator.render import RenderSettings, scheduler_config
from twinroute.operator.spec import parse_pool
from twinroute.scheduler.command import add_arguments, resolve_arguments
from twinroute.scheduler.settings import (
    CONFIG_SETTINGS,
    DISCOVERY_KEYS,
    PORT_KEYS,
    SchedulerSettings,
    parse_config,
)

SETTINGS = RenderSettings(scheduler_image="twinroute:test")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def rendered(routing: dict[str, object], *, roles: dict[str, Any] | None = None) -> dict[str, Any]:
    pool = parse_pool(
        name="chat",
        namespace="serving",
        spec={
            "model": {"name": "llama-3-8b", "source": "meta-llama/Meta-Llama-3-8B"},
            "roles": roles or {"unified": {"replicas": 2}},
            "routing": routing,
        },
    )
    return scheduler_config(pool, settings=SETTINGS)


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


ROUTINGS = {
    "defaults": {},
    "everything set": {
        "policy": "cache_aware",
        "ttftSloSeconds": 2.5,
        "prefixBlockSize": 128,
        "virtualNodes": 512,
        "scrapeIntervalSeconds": 0.5,
        "pdMinPrefillTokens": 300,
        "rebalancing": True,
        "admissionHold": True,
        "phaseAware": False,
        "migration": "on",
    },
    "no rebalancing": {"rebalancing": False, "admissionHold": True, "migration": "off"},
    "no KV events": {"kvEvents": False},
}


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_render_then_parse_leaves_nothing_over(routing: dict[str, Any]) -> None:
    config = rendered(routing)
    # The strict parse is the check: a rendered key the scheduler does not read raises.
    parsed = parse_config(yaml.safe_load(yaml.safe_dump(config)))
    settings = parsed.apply(SchedulerSettings())
    # Every scalar key became a setting, and says what the ModelPool said.
    scalar_keys = set(config) - {"discovery", "ports"}
    assert scalar_keys <= set(CONFIG_SETTINGS)
    assert {CONFIG_SETTINGS[key] for key in scalar_keys} <= set(parsed.settings)
    assert set(config["discovery"]) <= set(DISCOVERY_KEYS)
    assert set(config["ports"]) <= set(PORT_KEYS)
    pool = parse_pool(
        name="chat",
        namespace="serving",
        spec={"model": {"name": "llama-3-8b"}, "roles": {"unified": {"replicas": 2}},
              "routing": routing},
    ).routing  # fmt: skip
    assert settings.policy == pool.policy
    assert settings.ttft_slo_s == pool.ttft_slo_s
    assert settings.key_block_tokens == pool.prefix_block_size
    assert settings.virtual_nodes == pool.virtual_nodes
    assert settings.scrape_interval_s == pool.scrape_interval_s
    assert settings.pd_min_prefill_tokens == pool.pd_min_prefill_tokens
    assert settings.rebalance is pool.rebalancing
    assert settings.phase_aware is pool.phase_aware
    # vLLM engines publish KV events on 5557 unless the pool says not to; the scheduler
    # hashes prompts in vLLM's default block size (no --block-size in the engine's args).
    assert settings.follows_kv_events is pool.kv_events
    assert settings.kv_events_port == (5557 if pool.kv_events else None)
    assert settings.engine_block_size == (16 if pool.kv_events else None)
    assert settings.migration == pool.migration
    # The hold is what rebalancing needs in a live pool: without rebalancing it holds nothing.
    assert settings.admission_hold is (pool.admission_hold and pool.rebalancing)
    assert settings.served_models == ("llama-3-8b",)
    assert parsed.discovery is not None and parsed.discovery.namespace == "serving"


def test_the_operator_rendered_config_configures_the_scheduler(tmp_path: Path) -> None:
    config = write(tmp_path, rendered(ROUTINGS["everything set"]))
    args = parse(["--config", str(config), "--host", "0.0.0.0", "--ttft-slo-s", "9"])
    settings = resolve_arguments(args)
    # The file's values win over the flags they correspond to.
    assert (settings.policy, settings.ttft_slo_s) == ("cache_aware", 2.5)
    assert (settings.key_block_tokens, settings.virtual_nodes) == (128, 512)
    assert settings.migration == "on" and settings.admission_hold is True
    assert args.namespace == "serving"
    assert "twinroute.io/pool=chat" in args.kube_selector
    assert args.listen.startswith("0.0.0.0:") and args.metrics_listen.startswith("0.0.0.0:")


BAD = {
    "unknown key": ({"policy": "dualmap", "pool": "chat"}, "unknown key 'pool'"),
    "unknown nested key": (
        {"discovery": {"labelSelector": "a=b", "portAnnotation": "x"}},
        "discovery: unknown key 'portAnnotation'",
    ),
    "unknown port": ({"ports": {"router": 8080}}, "ports: unknown key 'router'"),
    "unknown policy": ({"policy": "random_walk"}, "unknown policy"),
    "wrong type": ({"ttftSloSeconds": "fast"}, "ttftSloSeconds: 'fast' is not a number"),
    "boolean as number": ({"virtualNodes": True}, "virtualNodes: True is not an integer"),
    "bad migration": ({"migration": "always"}, "migration: 'always' is not one of"),
    "not positive": ({"ttftSloSeconds": 0}, "ttft_slo_s must be positive"),
    "not a mapping": (["policy"], "must be a YAML mapping"),
    "no selector": ({"discovery": {"namespace": "x"}}, "labelSelector is required"),
}


@pytest.mark.parametrize(("config", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_config_names_the_key(tmp_path: Path, config: Any, message: str) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message):
        resolve_arguments(parse(["--config", str(path), "--static-endpoints", "127.0.0.1:1"]))


def test_without_any_endpoint_source_the_scheduler_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="exactly one endpoint source"):
        resolve_arguments(parse([]))


def test_one_default_per_setting() -> None:
    """The flags' defaults are the settings' own (no second copy that could drift)."""
    settings = resolve_arguments(parse(["--static-endpoints", "127.0.0.1:1"]))
    assert settings == SchedulerSettings()
