"""The scheduler reads the config the operator renders for it: the two are built apart
(operator and scheduler never import each other), so this test holds them together."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from twinroute.operator.render import RenderSettings, scheduler_config
from twinroute.operator.spec import parse_pool
from twinroute.scheduler.command import add_arguments, resolve_arguments


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def rendered_config(tmp_path: Path, routing: dict[str, object]) -> Path:
    pool = parse_pool(
        name="chat",
        namespace="serving",
        spec={
            "model": {"name": "llama-3-8b", "source": "meta-llama/Meta-Llama-3-8B"},
            "roles": {"unified": {"replicas": 2}},
            "routing": routing,
        },
    )
    path = tmp_path / "scheduler.yaml"
    path.write_text(
        yaml.safe_dump(
            scheduler_config(pool, settings=RenderSettings(scheduler_image="twinroute:test"))
        )
    )
    return path


def test_the_operator_rendered_config_configures_the_scheduler(tmp_path: Path) -> None:
    config = rendered_config(
        tmp_path,
        {
            "policy": "cache_aware",
            "ttftSloSeconds": 2.5,
            "prefixBlockSize": 64,
            "virtualNodes": 512,
        },
    )
    args = parse(["--config", str(config), "--host", "0.0.0.0"])
    resolve_arguments(args)
    assert args.policy == "cache_aware"
    assert args.ttft_slo == 2.5
    assert (args.block_size, args.virtual_nodes) == (64, 512)
    assert args.model == ["llama-3-8b"]
    assert args.namespace == "serving"
    assert "twinroute.io/pool=chat" in args.kube_selector
    assert args.listen.startswith("0.0.0.0:") and args.metrics_listen.startswith("0.0.0.0:")


def test_without_any_endpoint_source_the_scheduler_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="exactly one endpoint source"):
        resolve_arguments(parse([]))


def test_a_config_with_an_unknown_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text("policy: random_walk\n")
    with pytest.raises(ValueError, match="unknown policy"):
        resolve_arguments(parse(["--config", str(path)]))
