"""ModelPool `spec.scheduler.replicas` above one: active-active scheduler replicas as rendered.

Each replica finds its peers, and each router all the replicas, through one headless Service;
a PodDisruptionBudget keeps one replica through voluntary disruptions. One replica renders
exactly as before (no peers, the router on its own pod's scheduler)."""

from __future__ import annotations

from typing import Any

from twinroute.operator.render import Owner, RenderSettings, render_children
from twinroute.operator.spec import parse_pool

from twinroute import labels

SETTINGS = RenderSettings(scheduler_image="twinroute:1")


def children(replicas: int) -> dict[tuple[str, str], dict[str, Any]]:
    spec = {
        "model": {"name": "llama", "source": "/models/llama"},
        "roles": {"unified": {"replicas": 2}},
        "scheduler": {"replicas": replicas},
    }
    pool = parse_pool(name="chat", namespace="ns", spec=spec)
    rendered = render_children(pool, owner=Owner(name="chat", uid="u"), settings=SETTINGS)
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def containers(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = objects[("Deployment", "chat-scheduler")]["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def flag(container: dict[str, Any], name: str) -> str | None:
    args: list[str] = container["args"]
    return args[args.index(name) + 1] if name in args else None


def test_several_replicas_find_each_other_through_a_headless_service() -> None:
    objects = children(3)
    assert objects[("Deployment", "chat-scheduler")]["spec"]["replicas"] == 3
    peers = objects[("Service", "chat-scheduler-peers")]["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert peers["selector"][labels.ROLE_LABEL] == labels.SCHEDULER_ROLE
    every_replica = f"chat-scheduler-peers.ns.svc:{SETTINGS.grpc_port}"
    by_name = containers(objects)
    assert flag(by_name["scheduler"], "--peers") == every_replica
    assert flag(by_name["router"], "--scheduler") == every_replica, "routers use all replicas"
    assert "--scheduler-replicas" in by_name["router"]["args"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in (
        by_name["scheduler"]["env"]
    )
    budget = objects[("PodDisruptionBudget", "chat-scheduler")]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"][labels.ROLE_LABEL] == labels.SCHEDULER_ROLE


def test_replicas_dial_each_other_over_the_pools_tls() -> None:
    spec = {
        "model": {"name": "llama", "source": "/models/llama"},
        "roles": {"unified": {"replicas": 2}},
        "scheduler": {"replicas": 2},
    }
    pool = parse_pool(name="chat", namespace="ns", spec=spec)
    settings = RenderSettings(scheduler_image="twinroute:1", tls_secret="chat-tls")
    rendered = render_children(pool, owner=Owner(name="chat", uid="u"), settings=settings)
    objects = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    scheduler = containers(objects)["scheduler"]
    assert flag(scheduler, "--tls-cert") is not None
    assert flag(scheduler, "--peer-ca") == flag(containers(objects)["router"], "--scheduler-ca")
    assert flag(scheduler, "--peer-server-name") == settings.tls_server_name


def test_a_lean_envoy_gateway_runs_with_several_replicas() -> None:
    # Its access log reaches one replica, which forwards each request's end to the replica
    # that picked it (tests/test_picker.py).
    spec = {
        "model": {"name": "llama", "source": "/models/llama"},
        "roles": {"unified": {"replicas": 2}},
        "scheduler": {"replicas": 2},
        "gateway": {"kind": "envoy"},
    }
    pool = parse_pool(name="chat", namespace="ns", spec=spec)
    assert (pool.gateway.processing, pool.scheduler.replicas) == ("lean", 2)


def test_one_replica_renders_as_before() -> None:
    objects = children(1)
    assert ("Service", "chat-scheduler-peers") not in objects
    assert not any(kind == "PodDisruptionBudget" for kind, _ in objects)
    by_name = containers(objects)
    assert flag(by_name["scheduler"], "--peers") is None
    assert flag(by_name["router"], "--scheduler") == f"127.0.0.1:{SETTINGS.grpc_port}"
