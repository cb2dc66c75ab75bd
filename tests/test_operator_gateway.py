"""ModelPool `spec.gateway`: what fronts the pool, as the operator renders it.

`router` is today's shape; `envoy` adds an Envoy Deployment whose bootstrap (the renderer
`twinroute gateway` uses) the real Envoy accepts; `inferencePool` hands the engines to an
existing GIE gateway through an InferencePool whose endpoint picker is the scheduler."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml
from twinroute.operator.render import (
    GATEWAY_CONFIG_FILE,
    Owner,
    RenderSettings,
    render_children,
)
from twinroute.operator.spec import SpecError, parse_pool
from twinroute.scheduler.settings import parse_config

from twinroute import labels
from twinroute.gateway.command import envoy_binary

SETTINGS = RenderSettings(scheduler_image="twinroute:1")
UNIFIED: dict[str, Any] = {
    "model": {"name": "llama", "source": "/models/llama"},
    "roles": {"unified": {"replicas": 2}},
}


def children(gateway: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    spec = {**UNIFIED, **({"gateway": gateway} if gateway is not None else {})}
    pool = parse_pool(name="chat", namespace="ns", spec=spec)
    rendered = render_children(pool, owner=Owner(name="chat", uid="u"), settings=SETTINGS)
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def scheduler_containers(objects: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    deployment = objects[("Deployment", "chat-scheduler")]
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def test_router_is_the_default_and_has_no_picker() -> None:
    objects = children()
    assert [c["name"] for c in scheduler_containers(objects)] == ["scheduler", "router"]
    service = objects[("Service", "chat")]
    assert service["spec"]["selector"][labels.ROLE_LABEL] == labels.SCHEDULER_ROLE
    ports = {p["name"] for p in objects[("Service", "chat-scheduler")]["spec"]["ports"]}
    assert labels.SCHEDULER_PICKER_PORT_NAME not in ports
    assert not any(kind == "InferencePool" for kind, _ in objects)


def test_envoy_gateway_fronts_the_pool_and_asks_the_scheduler() -> None:
    objects = children({"kind": "envoy", "failureMode": "FailOpen", "replicas": 2})
    (scheduler,) = scheduler_containers(objects)
    assert scheduler["name"] == "scheduler", "no router: Envoy carries the requests"
    assert {"name": "picker", "containerPort": 9002, "protocol": "TCP"} in scheduler["ports"]
    config = parse_config(yaml.safe_load(objects[("ConfigMap", "chat-scheduler")]["data"]
                                         ["scheduler.yaml"]))  # fmt: skip
    assert config.picker_port == 9002
    gateway = objects[("Deployment", "chat-gateway")]
    pod = gateway["spec"]["template"]["spec"]
    assert gateway["spec"]["replicas"] == 2
    assert pod["containers"][0]["image"] == "envoyproxy/envoy:v1.40.0"
    service = objects[("Service", "chat")]
    assert service["spec"]["selector"][labels.ROLE_LABEL] == labels.GATEWAY_ROLE
    bootstrap = yaml.safe_load(objects[("ConfigMap", "chat-gateway")]["data"][GATEWAY_CONFIG_FILE])
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    pool_address = clusters["pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert clusters["pool"]["type"] == "STRICT_DNS"
    assert pool_address["endpoint"]["address"]["socket_address"] == {
        "address": "chat-unified.ns.svc.cluster.local",
        "port_value": 8000,
    }
    picker = clusters["picker"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert picker["endpoint"]["address"]["socket_address"]["address"] == (
        "chat-scheduler.ns.svc.cluster.local"
    )
    listener = bootstrap["static_resources"]["listeners"][0]
    ext_proc = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    assert ext_proc["typed_config"]["failure_mode_allow"] is True
    # A changed bootstrap rolls the Envoy pods.
    other = children({"kind": "envoy", "failureMode": "FailClose"})
    annotation = "twinroute.io/config-hash"
    assert (
        other[("Deployment", "chat-gateway")]["spec"]["template"]["metadata"]["annotations"][
            annotation
        ]
        != gateway["spec"]["template"]["metadata"]["annotations"][annotation]
    )


def test_the_rendered_bootstrap_is_one_envoy_accepts(tmp_path: Any) -> None:
    objects = children({"kind": "envoy"})
    path = tmp_path / "envoy.yaml"
    path.write_text(objects[("ConfigMap", "chat-gateway")]["data"][GATEWAY_CONFIG_FILE])
    checked = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_inference_pool_points_an_existing_gateway_at_the_scheduler() -> None:
    objects = children({"kind": "inferencePool"})
    pool = objects[("InferencePool", "chat")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {
        "selector": {"matchLabels": {labels.POOL_LABEL: "chat", labels.ROLE_LABEL: "unified"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {
            "group": "",
            "kind": "Service",
            "name": "chat-scheduler",
            "port": {"number": 9002},
            "failureMode": "FailClose",
        },
    }
    assert ("Service", "chat") not in objects, "the user's gateway is the pool's endpoint"
    ports = {p["name"]: p["port"] for p in objects[("Service", "chat-scheduler")]["spec"]["ports"]}
    assert ports[labels.SCHEDULER_PICKER_PORT_NAME] == 9002


@pytest.mark.parametrize("kind", ["envoy", "inferencePool"])
def test_a_prefill_decode_pool_needs_the_router(kind: str) -> None:
    spec = {
        "model": {"name": "llama"},
        "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
        "gateway": {"kind": kind},
    }
    with pytest.raises(SpecError, match=r"gateway\.kind"):
        parse_pool(name="pd", namespace="ns", spec=spec)


@pytest.mark.parametrize(
    ("gateway", "field"),
    [
        ({"kind": "nginx"}, "gateway.kind"),
        ({"kind": "envoy", "failureMode": "open"}, "gateway.failureMode"),
        ({"kind": "envoy", "processing": "buffered"}, "gateway.processing"),
        ({"kind": "envoy", "replicas": 0}, "gateway.replicas"),
    ],
)
def test_invalid_gateway_names_the_field(gateway: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_pool(name="p", namespace="ns", spec={**UNIFIED, "gateway": gateway})
