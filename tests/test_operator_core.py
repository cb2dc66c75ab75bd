"""The operator's pure core: spec parsing, rendering, planning, status, scale-in choice."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

import pytest
from twinroute.operator.apply import choose_leaving_pods, scheduler_addresses
from twinroute.operator.plan import Create, Delete, Patch, ScaleIn, plan_children
from twinroute.operator.render import (
    RENDER_HASH_ANNOTATION,
    Owner,
    RenderSettings,
    derive_pool_token,
    engine_args,
    render_children,
    scheduler_config,
)
from twinroute.operator.spec import PoolSpec, Role, SpecError, parse_pool
from twinroute.operator.status import Problem, compute_status

from twinroute import labels

KEY = b"operator-key-" + b"k" * 32
# As the chart runs the operator: every pool gets a token of its own.
SETTINGS = RenderSettings(scheduler_image="twinroute:1", pool_token_key=KEY)
OWNER = Owner(name="chat", uid="uid-1")
NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
UNIFIED: dict[str, Any] = {
    "model": {"name": "llama", "source": "/models/llama"},
    "roles": {"unified": {"replicas": 2}},
}
PD: dict[str, Any] = {
    "model": {"name": "llama"},
    "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 3}},
}


def pool(spec: dict[str, Any] | None = None, *, name: str = "chat") -> PoolSpec:
    return parse_pool(name=name, namespace="ns", spec=spec or UNIFIED)


def children(spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return render_children(pool(spec), owner=OWNER, settings=SETTINGS)


def by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


# ---- spec -------------------------------------------------------------------------------------

INVALID = {
    "both unified and decode": (
        {"model": {"name": "m"}, "roles": {"unified": {}, "decode": {}}},
        "roles",
    ),
    "prefill without decode": ({"model": {"name": "m"}, "roles": {"prefill": {}}}, "roles"),
    "no roles": ({"model": {"name": "m"}, "roles": {}}, "roles"),
    "unknown role": ({"model": {"name": "m"}, "roles": {"unified": {}, "x": {}}}, "roles"),
    "missing model": ({"roles": {"unified": {}}}, "model"),
    "replicas as string": (
        {**UNIFIED, "roles": {"unified": {"replicas": "2"}}},
        "roles.unified.replicas",
    ),
    "replicas boolean": (
        {**UNIFIED, "roles": {"unified": {"replicas": True}}},
        "roles.unified.replicas",
    ),
    "prefix caching off": (
        {**UNIFIED, "engine": {"args": ["--no-enable-prefix-caching"]}},
        "engine.args",
    ),
    "port managed": ({**UNIFIED, "engine": {"args": ["--port=9000"]}}, "engine.args"),
    "stats off": ({**UNIFIED, "engine": {"args": ["--disable-log-stats"]}}, "engine.args"),
    "policy unknown": ({**UNIFIED, "routing": {"policy": "random"}}, "routing.policy"),
    "slo negative": ({**UNIFIED, "routing": {"ttftSloSeconds": -1}}, "routing.ttftSloSeconds"),
    "rebalancing string": ({**UNIFIED, "routing": {"rebalancing": "yes"}}, "routing.rebalancing"),
    "scheduler replicas zero": ({**UNIFIED, "scheduler": {"replicas": 0}}, "scheduler.replicas"),
    # Each replica would see only its own leases (a fraction of the load), silently.
    "scheduler replicas six": ({**UNIFIED, "scheduler": {"replicas": 6}}, "scheduler.replicas"),
    "engine not an object": ({**UNIFIED, "engine": ["x"]}, "engine"),
    "too many engine args": ({**UNIFIED, "engine": {"args": ["--x"] * 129}}, "engine.args"),
    # The model source is a path in the engines' volume, which the router cannot reach.
    "tokenizer from a path": (
        {**UNIFIED, "routing": {"tokenizer": {}}},
        "routing.tokenizer.source",
    ),
    "tokenizer leaves its volume": (
        {
            **UNIFIED,
            "routing": {
                "tokenizer": {"volume": {"emptyDir": {}}, "source": "../etc/tokenizer.json"}
            },
        },
        "routing.tokenizer.source",
    ),
    "tokenizer two volume sources": (
        {**UNIFIED, "routing": {"tokenizer": {"volume": {"emptyDir": {}, "hostPath": {}}}}},
        "routing.tokenizer.volume",
    ),
    "tokenizer secret without name": (
        {**UNIFIED, "routing": {"tokenizer": {"source": "a/b", "hubTokenSecret": {"key": "t"}}}},
        "routing.tokenizer.hubTokenSecret.name",
    ),
}


@pytest.mark.parametrize(("spec", "field"), INVALID.values(), ids=INVALID.keys())
def test_invalid_spec_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_pool(name="p", namespace="ns", spec=spec)
    assert error.value.field == field


@pytest.mark.parametrize("name", ["Chat", "a" * 41, "-x", "x_y"], ids=str)
def test_pool_names_must_leave_room_for_children(name: str) -> None:
    with pytest.raises(SpecError):
        parse_pool(name=name, namespace="ns", spec=UNIFIED)


def test_defaults_fill_a_minimal_spec() -> None:
    parsed = pool({"model": {"name": "m"}, "roles": {"unified": {}}})
    assert parsed.model_source == "m"
    assert parsed.replicas == {Role.UNIFIED: 1}
    assert (parsed.routing.policy, parsed.routing.ttft_slo_s, parsed.routing.virtual_nodes) == (
        "dualmap",
        5.0,
        256,
    )
    assert parsed.routing.prefix_block_size == 64
    assert not parsed.disaggregated and pool(PD).disaggregated


# ---- render -----------------------------------------------------------------------------------


def test_every_child_is_labelled_owned_and_hashed() -> None:
    for spec in (UNIFIED, PD):
        for child in children(spec):
            metadata = child["metadata"]
            assert metadata["labels"][labels.POOL_LABEL] == "chat"
            assert metadata["labels"][labels.MODEL_LABEL] == "llama"
            assert metadata["labels"][labels.MANAGED_BY_LABEL] == labels.MANAGED_BY_VALUE
            assert metadata["ownerReferences"][0]["uid"] == "uid-1"
            assert metadata["namespace"] == "ns"
            assert len(metadata["annotations"][RENDER_HASH_ANNOTATION]) == 16


def test_children_of_unified_and_disaggregated_pools() -> None:
    unified = set(by_name(children(UNIFIED)))
    pd = set(by_name(children(PD)))
    common = {
        ("ConfigMap", "chat-scheduler"),
        ("ServiceAccount", "chat-scheduler"),
        ("RoleBinding", "chat-scheduler"),
        ("Deployment", "chat-scheduler"),
        ("Service", "chat"),
        ("Service", "chat-scheduler"),
        ("Secret", "chat-scheduler-token"),
        # Two active-active scheduler replicas by default: their peers' headless Service and
        # a disruption budget that keeps one.
        ("Service", "chat-scheduler-peers"),
        ("PodDisruptionBudget", "chat-scheduler"),
    }
    assert unified == common | {("Deployment", "chat-unified"), ("Service", "chat-unified")}
    assert pd == common | {
        ("Deployment", "chat-prefill"),
        ("Service", "chat-prefill"),
        ("Deployment", "chat-decode"),
        ("Service", "chat-decode"),
    }


def test_only_the_router_is_published_and_the_scheduler_stays_in_the_cluster() -> None:
    """The pool Service may be a LoadBalancer: it carries the OpenAI port and nothing else;
    the scheduler's gRPC (Drain, leases) and metrics ports sit on a ClusterIP Service."""
    for service_type in ("ClusterIP", "LoadBalancer", "NodePort"):
        objects = by_name(children({**UNIFIED, "scheduler": {"serviceType": service_type}}))
        published = objects[("Service", "chat")]["spec"]
        assert published["type"] == service_type
        assert [p["name"] for p in published["ports"]] == [labels.ROUTER_HTTP_PORT_NAME]
        internal = objects[("Service", "chat-scheduler")]["spec"]
        assert internal["type"] == "ClusterIP"
        assert {p["name"] for p in internal["ports"]} == {
            labels.SCHEDULER_GRPC_PORT_NAME,
            labels.SCHEDULER_METRICS_PORT_NAME,
        }


def _scheduler_pod(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects[("Deployment", "chat-scheduler")]["spec"]["template"]["spec"]
    return spec


def test_every_pool_gets_a_token_of_its_own_that_both_containers_mount() -> None:
    objects = by_name(children())
    secret = objects[("Secret", "chat-scheduler-token")]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert token == derive_pool_token(KEY, namespace="ns", pool="chat")
    assert len(token) == 64
    # Another pool, another namespace or another key: another token.
    assert token != derive_pool_token(KEY, namespace="ns", pool="chat2")
    assert token != derive_pool_token(KEY, namespace="ns2", pool="chat")
    assert token != derive_pool_token(KEY + b"x", namespace="ns", pool="chat")
    pod = _scheduler_pod(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["admin-token"]["secret"]["secretName"] == "chat-scheduler-token"
    scheduler, router = pod["containers"]
    assert "--admin-token-file" in scheduler["args"]
    assert "--scheduler-token-file" in router["args"]
    assert "--allow-unauthenticated" not in scheduler["args"]
    # Nothing of the token or the key in the settings' repr (they reach logs).
    assert KEY.decode() not in repr(SETTINGS)
    # A new key rolls the scheduler pods (they read the token once, at start).
    rekeyed = render_children(
        pool(),
        owner=OWNER,
        settings=RenderSettings(scheduler_image="twinroute:1", pool_token_key=KEY + b"x"),
    )
    annotations = [
        by_name(c)[("Deployment", "chat-scheduler")]["spec"]["template"]["metadata"]["annotations"]
        for c in (children(), rekeyed)
    ]
    assert annotations[0] != annotations[1]
    assert token not in json.dumps(annotations[0])


def test_without_a_tokenizer_the_front_end_keys_text_by_characters() -> None:
    for container in _scheduler_pod(by_name(children()))["containers"]:
        assert "--tokenizer" not in container["args"]


def test_a_hub_tokenizer_reaches_the_router_with_a_cache_and_the_hub_token() -> None:
    spec = {
        "model": {"name": "llama", "source": "meta-llama/Llama-3.1-8B-Instruct"},
        "roles": {"unified": {"replicas": 2}},
        "routing": {
            "tokenizer": {"revision": "v1", "hubTokenSecret": {"name": "hf", "key": "token"}}
        },
    }
    pod = _scheduler_pod(by_name(children(spec)))
    scheduler, router = pod["containers"]
    args = router["args"]
    # The model's own repository unless told otherwise.
    assert args[args.index("--tokenizer") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--tokenizer-revision") + 1] == "v1"
    assert "--tokenizer" not in scheduler["args"]
    env = {e["name"]: e for e in router["env"]}
    cache = env["HF_HOME"]["value"]
    assert {"name": "hub-cache", "mountPath": cache} in router["volumeMounts"]
    assert env["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hf", "key": "token", "optional": True}
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["hub-cache"]
    # The root filesystem stays read-only: the cache is the only place written.
    assert router["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_tokenizer_on_a_volume_is_mounted_read_only_for_the_picker() -> None:
    claim = {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    spec = {
        **UNIFIED,
        "gateway": {"kind": "envoy", "processing": "full"},
        "routing": {"tokenizer": {"volume": claim, "source": "llama/tokenizer.json"}},
    }
    pod = _scheduler_pod(by_name(children(spec)))
    (scheduler,) = pod["containers"]
    args = scheduler["args"]
    path = args[args.index("--tokenizer") + 1]
    mount = next(m for m in scheduler["volumeMounts"] if m["name"] == "tokenizer")
    assert mount["readOnly"] is True
    assert path == f"{mount['mountPath']}/llama/tokenizer.json"
    assert {"name": "tokenizer", **claim} in pod["volumes"]
    assert "--tokenizer-revision" not in args
    assert all(e["name"] != "HF_TOKEN" for e in scheduler.get("env", []))


def test_without_any_token_the_scheduler_is_told_so_in_its_flags() -> None:
    objects = by_name(
        render_children(pool(), owner=OWNER, settings=RenderSettings(scheduler_image="t:1"))
    )
    assert ("Secret", "chat-scheduler-token") not in objects
    scheduler, router = _scheduler_pod(objects)["containers"]
    assert "--allow-unauthenticated" in scheduler["args"]
    assert "--scheduler-token-file" not in router["args"]


def test_engine_timeouts_reach_the_router_flags() -> None:
    import argparse

    from twinroute.router.command import add_arguments as router_arguments

    spec = {**UNIFIED, "scheduler": {"timeouts": {"firstByteSeconds": 120, "idleSeconds": 15}}}
    pod = _scheduler_pod(by_name(children(spec)))
    parser = argparse.ArgumentParser()
    router_arguments(parser)
    router = parser.parse_args(pod["containers"][1]["args"])
    assert (router.first_byte_timeout_s, router.idle_timeout_s) == (120.0, 15.0)
    assert (router.connect_timeout_s, router.response_timeout_s) == (2.0, 600.0)


def test_vllm_args_carry_what_routing_needs() -> None:
    args = engine_args(
        pool({**UNIFIED, "engine": {"args": ["--max-model-len", "8192"]}}), role=Role.UNIFIED
    )
    assert args[0] == "/models/llama"
    assert args[args.index("--served-model-name") + 1] == "llama"
    assert args[args.index("--port") + 1] == "8000"
    assert "--enable-prefix-caching" in args
    assert args[-2:] == ["--max-model-len", "8192"]
    assert "--kv-transfer-config" not in args
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events == {
        "enable_kv_cache_events": True,
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
        "publisher": "zmq",
    }


def test_engines_publish_kv_events_where_the_scheduler_listens_unless_told_not_to() -> None:
    spec = {**UNIFIED, "engine": {"args": ["--block-size=32"]}}
    engine = by_name(children(spec))[("Deployment", "chat-unified")]
    ports = engine["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in ports
    assert {"name": "kv-replay", "containerPort": 5558, "protocol": "TCP"} in ports
    config = scheduler_config(pool(spec), settings=SETTINGS)
    assert (config["kvEventsPort"], config["engineBlockSize"]) == (5557, 32)
    assert config["kvEventsReplayPort"] == 5558

    off = {**spec, "routing": {"kvEvents": False}}
    assert "--kv-events-config" not in engine_args(pool(off), role=Role.UNIFIED)
    assert "kvEventsPort" not in scheduler_config(pool(off), settings=SETTINGS)
    # The engine simulator publishes no KV events.
    simulated = {**UNIFIED, "engine": {"kind": "simulator", "image": "twinroute:1"}}
    assert "kvEventsPort" not in scheduler_config(pool(simulated), settings=SETTINGS)


KV_ROLES = {
    "nixl prefill": ("NixlConnector", Role.PREFILL, "kv_both"),
    "nixl decode": ("NixlConnector", Role.DECODE, "kv_both"),
    "nccl prefill": ("P2pNcclConnector", Role.PREFILL, "kv_producer"),
    "nccl decode": ("P2pNcclConnector", Role.DECODE, "kv_consumer"),
}


@pytest.mark.parametrize(("connector", "role", "kv_role"), KV_ROLES.values(), ids=KV_ROLES.keys())
def test_disaggregated_roles_get_kv_transfer_config(
    connector: str, role: Role, kv_role: str
) -> None:
    spec = {**PD, "engine": {"kvTransfer": {"connector": connector}}}
    args = engine_args(pool(spec), role=role)
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": connector, "kv_role": kv_role}


def test_simulator_engine_runs_engine_sim_with_its_flags() -> None:
    spec = {**UNIFIED, "engine": {"kind": "simulator", "image": "twinroute:1"}}
    engine = by_name(children(spec))[("Deployment", "chat-unified")]
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["twinroute", "engine-sim"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "llama"
    assert args[args.index("--instance-id") + 1] == "$(POD_NAME)"
    assert container["env"][0]["name"] == "POD_NAME"


def test_scheduler_gets_routing_config_and_discovery_selector() -> None:
    config = scheduler_config(
        pool({**PD, "routing": {"policy": "chwbl", "virtualNodes": 256}}), settings=SETTINGS
    )
    assert (config["policy"], config["virtualNodes"]) == ("chwbl", 256)
    assert config["discovery"]["labelSelector"] == (
        "twinroute.io/pool=chat,twinroute.io/role in (prefill,decode)"
    )
    deployment = by_name(children(PD))[("Deployment", "chat-scheduler")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "chat-scheduler"
    assert pod["securityContext"]["runAsNonRoot"] is True
    router = next(c for c in pod["containers"] if c["name"] == "router")
    # Every router spreads its picks over all the replicas (the default two).
    assert deployment["spec"]["replicas"] == 2
    assert router["args"][router["args"].index("--scheduler") + 1] == (
        "chat-scheduler-peers.ns.svc:50051"
    )
    one = by_name(children({**PD, "scheduler": {"replicas": 1}}))[("Deployment", "chat-scheduler")]
    alone = next(c for c in one["spec"]["template"]["spec"]["containers"] if c["name"] == "router")
    assert alone["args"][alone["args"].index("--scheduler") + 1] == "127.0.0.1:50051"


def test_rendering_is_deterministic_and_a_routing_change_rolls_the_scheduler() -> None:
    assert children() == children()
    before = by_name(children())[("Deployment", "chat-scheduler")]
    after = by_name(children({**UNIFIED, "routing": {"policy": "round_robin"}}))[
        ("Deployment", "chat-scheduler")
    ]
    key = "twinroute.io/config-hash"
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != after["spec"]["template"]["metadata"]["annotations"][key]
    )


# ---- plan -------------------------------------------------------------------------------------


def existing_from(desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an API server would return: the objects plus server-side fields."""
    result = json.loads(json.dumps(desired))
    for obj in result:
        obj["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
        obj["metadata"]["resourceVersion"] = "7"
        obj["status"] = {"observedGeneration": 1}
    return result


def test_plan_creates_everything_on_an_empty_namespace() -> None:
    plan = plan_children(desired=children(), existing=[])
    assert all(isinstance(a, Create) for a in plan.actions)
    assert len(plan.actions) == 11


def test_plan_is_empty_when_everything_matches_even_with_server_fields() -> None:
    desired = children()
    assert plan_children(desired=desired, existing=existing_from(desired)).empty


def test_plan_patches_scale_out_without_drain_and_scale_in_with_drain() -> None:
    existing = existing_from(children())
    out = plan_children(
        desired=children({**UNIFIED, "roles": {"unified": {"replicas": 4}}}), existing=existing
    )
    assert [type(a) for a in out.actions] == [Patch]
    assert isinstance(out.actions[0], Patch) and out.actions[0].scale_in is None
    shrink = plan_children(
        desired=children({**UNIFIED, "roles": {"unified": {"replicas": 1}}}), existing=existing
    )
    assert shrink.actions == (
        Patch(
            body=shrink.actions[0].body,  # type: ignore[union-attr]
            scale_in=ScaleIn(role="unified", from_replicas=2, to_replicas=1),
        ),
    )


def test_switching_to_disaggregated_deletes_the_unified_children() -> None:
    plan = plan_children(desired=children(PD), existing=existing_from(children()))
    deletes = {(a.kind, a.name) for a in plan.actions if isinstance(a, Delete)}
    creates = {
        (a.body["kind"], a.body["metadata"]["name"]) for a in plan.actions if isinstance(a, Create)
    }
    assert deletes == {("Deployment", "chat-unified"), ("Service", "chat-unified")}
    assert creates == {
        ("Deployment", "chat-prefill"),
        ("Service", "chat-prefill"),
        ("Deployment", "chat-decode"),
        ("Service", "chat-decode"),
    }
    assert isinstance(plan.actions[-1], Delete), "deletions come last"


# ---- status -----------------------------------------------------------------------------------


def deployment(
    name: str, *, desired: int, ready: int, updated: int | None = None
) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {"name": name},
        "status": {
            "replicas": desired,
            "readyReplicas": ready,
            "updatedReplicas": desired if updated is None else updated,
        },
    }


STATUS_CASES = {
    "nothing yet": (
        [],
        "Progressing",
        {"Ready": "False", "Progressing": "True", "Degraded": "False"},
    ),
    "engines ready, scheduler not": (
        [deployment("chat-unified", desired=2, ready=2)],
        "Progressing",
        {"Ready": "False", "Progressing": "True", "Degraded": "False"},
    ),
    "all ready": (
        [
            deployment("chat-unified", desired=2, ready=2),
            deployment("chat-scheduler", desired=1, ready=1),
        ],
        "Ready",
        {"Ready": "True", "Progressing": "False", "Degraded": "False"},
    ),
    "rolling": (
        [
            deployment("chat-unified", desired=2, ready=2, updated=1),
            deployment("chat-scheduler", desired=1, ready=1),
        ],
        "Ready",
        {"Ready": "True", "Progressing": "True", "Degraded": "False"},
    ),
}


@pytest.mark.parametrize(
    ("deployments", "phase", "conditions"), STATUS_CASES.values(), ids=STATUS_CASES.keys()
)
def test_status_phase_and_conditions(
    deployments: list[dict[str, Any]], phase: str, conditions: dict[str, str]
) -> None:
    status = compute_status(
        pool=pool(),
        generation=3,
        deployments=deployments,
        pods=[],
        previous={},
        problem=None,
        now=NOW,
    )
    assert status["phase"] == phase
    assert {c["type"]: c["status"] for c in status["conditions"]} == conditions
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_invalid_spec_status_is_degraded_with_the_reason() -> None:
    status = compute_status(
        pool=None,
        generation=2,
        deployments=[],
        pods=[],
        previous={},
        problem=Problem(reason="InvalidSpec", message="spec.roles: bad"),
        now=NOW,
    )
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (status["phase"], degraded["status"], degraded["reason"], degraded["message"]) == (
        "Degraded",
        "True",
        "InvalidSpec",
        "spec.roles: bad",
    )


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = compute_status(
        pool=pool(), generation=1, deployments=[], pods=[], previous={}, problem=None, now=NOW
    )
    later = NOW + datetime.timedelta(minutes=5)
    same = compute_status(
        pool=pool(), generation=1, deployments=[], pods=[], previous=first, problem=None, now=later
    )
    assert same["conditions"] == first["conditions"]
    ready = [
        deployment("chat-unified", desired=2, ready=2),
        deployment("chat-scheduler", desired=1, ready=1),
    ]
    flipped = compute_status(
        pool=pool(),
        generation=1,
        deployments=ready,
        pods=[],
        previous=first,
        problem=None,
        now=later,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {
        "Ready": "2026-01-01T12:05:00Z",
        "Progressing": "2026-01-01T12:05:00Z",
        "Degraded": "2026-01-01T12:00:00Z",
    }


def pod(
    name: str,
    *,
    role: str = "unified",
    ip: str | None = "10.0.0.1",
    ready: bool = True,
    created: str = "2026-01-01T00:00:00Z",
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "creationTimestamp": created,
        "labels": {labels.ROLE_LABEL: role},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": metadata,
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_endpoints_are_ready_engine_pods_only() -> None:
    pods = [
        pod("a", ip="10.0.0.1"),
        pod("b", ready=False),
        pod("c", ip=None),
        pod("d", deleting=True),
        pod("s", role="scheduler"),
        pod("e", ip="10.0.0.5"),
    ]
    status = compute_status(
        pool=pool(), generation=1, deployments=[], pods=pods, previous={}, problem=None, now=NOW
    )
    assert status["endpoints"] == [
        {"id": "a", "address": "10.0.0.1:8000", "role": "unified"},
        {"id": "e", "address": "10.0.0.5:8000", "role": "unified"},
    ]


# ---- scale-in ---------------------------------------------------------------------------------

LEAVING = {
    "newest ready pods first": (
        [
            pod("old", created="2026-01-01T00:00:00Z"),
            pod("mid", created="2026-01-02T00:00:00Z"),
            pod("new", created="2026-01-03T00:00:00Z"),
        ],
        2,
        ["new", "mid"],
    ),
    "unready pods before ready ones": (
        [
            pod("old", created="2026-01-01T00:00:00Z", ready=False),
            pod("new", created="2026-01-03T00:00:00Z"),
        ],
        1,
        ["old"],
    ),
    "already deleting pods are not chosen": ([pod("a", deleting=True), pod("b")], 1, ["b"]),
    "nothing to remove": ([pod("a")], 0, []),
}


@pytest.mark.parametrize(("pods", "count", "leaving"), LEAVING.values(), ids=LEAVING.keys())
def test_choose_leaving_pods(pods: list[dict[str, Any]], count: int, leaving: list[str]) -> None:
    assert choose_leaving_pods(pods, count=count) == leaving


def test_scheduler_addresses_use_the_grpc_port_of_running_pods() -> None:
    ports = {
        "containers": [
            {
                "ports": [
                    {"name": "grpc", "containerPort": 50051},
                    {"name": "metrics", "containerPort": 9090},
                ]
            }
        ]
    }
    pods = [
        {**pod("s1", ip="10.0.0.9"), "spec": ports},
        {**pod("s2", ip=None), "spec": ports},
        {**pod("s3", ip="10.0.0.8", deleting=True), "spec": ports},
    ]
    assert scheduler_addresses(pods) == ["10.0.0.9:50051"]
