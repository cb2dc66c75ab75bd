"""The operator (real kopf, real Kubernetes client) against the local kmock-based API server.

Each test starts the API server and the operator on their own threads and event loops, applies
ModelPools through the API and waits (bounded) for the operator's effects.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kubernetes import client
from twinroute.operator.command import build_operator, run_in_thread
from twinroute.operator.handlers import Reconciler
from twinroute.operator.render import RenderSettings, derive_pool_token
from twinroute.v1 import scheduler_pb2, scheduler_pb2_grpc

from twinroute import labels
from twinroute.testing.kube import KubeApiServer, api_server_in_thread

NS = "serving"
POOLS = "twinroute.io/v1alpha1/modelpools"
DEPLOYMENTS = "apps/v1/deployments"
WAIT_S = 20.0
KEY = b"kopf-test-key-" + b"k" * 32


@dataclass
class Cluster:
    api: KubeApiServer
    url: str
    reconciler: Reconciler
    liveness: str

    def create_pool(self, name: str, spec: dict[str, Any]) -> None:
        self._request(
            "POST",
            f"/apis/twinroute.io/v1alpha1/namespaces/{NS}/modelpools",
            {
                "apiVersion": "twinroute.io/v1alpha1",
                "kind": "ModelPool",
                "metadata": {"name": name, "namespace": NS},
                "spec": spec,
            },
        )

    def patch_pool(self, name: str, patch: dict[str, Any]) -> None:
        self._request(
            "PATCH", f"/apis/twinroute.io/v1alpha1/namespaces/{NS}/modelpools/{name}", patch
        )

    def delete_pool(self, name: str) -> None:
        self._request(
            "DELETE", f"/apis/twinroute.io/v1alpha1/namespaces/{NS}/modelpools/{name}", None
        )

    def _request(self, method: str, path: str, body: Any) -> None:
        api_client = client.ApiClient(client.Configuration(host=self.url))
        request = api_client.param_serialize(
            method,
            path,
            body=body,
            header_params={
                "Content-Type": "application/merge-patch+json"
                if method == "PATCH"
                else "application/json"
            },
        )
        response = api_client.call_api(*request)
        response.read()
        assert 200 <= response.status < 300, (response.status, response.data)


def wait_for(check: Callable[[], Any], *, what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll another thread's progress, bounded; returns the first truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with api_server_in_thread() as server:
        registry, reconciler = build_operator(
            configuration=client.Configuration(host=server.url),
            # As the chart runs it: every pool gets a token of its own.
            render=RenderSettings(scheduler_image="twinroute:test", pool_token_key=KEY),
            resync_interval_s=0.5,
            drain_timeout_s=2.0,
        )
        stop, ready = threading.Event(), threading.Event()
        port = _free_port()
        liveness = f"http://127.0.0.1:{port}/healthz"
        thread = run_in_thread(
            registry=registry, namespaces=[NS], liveness_endpoint=liveness, stop=stop, ready=ready
        )
        assert ready.wait(WAIT_S), "operator did not start"
        try:
            yield Cluster(api=server.api, url=server.url, reconciler=reconciler, liveness=liveness)
        finally:
            stop.set()
            thread.join(timeout=WAIT_S)
            assert not thread.is_alive(), "operator did not stop"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNIFIED = {
    "model": {"name": "llama-3-8b", "source": "meta-llama/Meta-Llama-3-8B"},
    "roles": {"unified": {"replicas": 2}},
    "routing": {"policy": "dualmap"},
}


def deployment(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return cluster.api.stored(DEPLOYMENTS, NS, name)


def pool_status(cluster: Cluster, name: str) -> dict[str, Any]:
    body = cluster.api.stored(POOLS, NS, name) or {}
    return dict(body.get("status") or {})


def test_create_pool_makes_children_with_labels_args_owner_and_status(cluster: Cluster) -> None:
    cluster.create_pool("chat", UNIFIED)
    engine = wait_for(lambda: deployment(cluster, "chat-unified"), what="engine deployment")
    pool = cluster.api.stored(POOLS, NS, "chat")
    assert pool is not None
    assert engine["metadata"]["labels"][labels.POOL_LABEL] == "chat"
    assert engine["metadata"]["labels"][labels.ROLE_LABEL] == "unified"
    assert engine["metadata"]["labels"][labels.MODEL_LABEL] == "llama-3-8b"
    owner = engine["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelPool",
        "chat",
        pool["metadata"]["uid"],
        True,
    )
    args = engine["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-prefix-caching" in args
    assert args[args.index("--served-model-name") + 1] == "llama-3-8b"
    assert engine["spec"]["replicas"] == 2
    for resource, name in (
        ("v1/services", "chat"),
        ("v1/services", "chat-unified"),
        ("v1/configmaps", "chat-scheduler"),
        ("v1/services", "chat-scheduler"),
        ("v1/secrets", "chat-scheduler-token"),
        (DEPLOYMENTS, "chat-scheduler"),
        ("v1/serviceaccounts", "chat-scheduler"),
        ("rbac.authorization.k8s.io/v1/rolebindings", "chat-scheduler"),
    ):
        assert wait_for(lambda r=resource, n=name: cluster.api.stored(r, NS, n), what=name)
    status = wait_for(
        lambda: pool_status(cluster, "chat").get("roles") and pool_status(cluster, "chat"),
        what="status",
    )
    assert status["observedGeneration"] == pool["metadata"]["generation"]
    assert status["roles"]["unified"] == {"desired": 2, "ready": 0, "updated": 0}
    assert status["phase"] == "Progressing"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "False",
    }


def test_status_follows_ready_replicas_and_pods(cluster: Cluster) -> None:
    cluster.create_pool("chat", UNIFIED)
    wait_for(lambda: deployment(cluster, "chat-unified"), what="engine deployment")
    # Play the Deployment controller and kubelet: replicas ready, pods with IPs.
    for name, ready in (("chat-unified", 2), ("chat-scheduler", 1)):
        body = deployment(cluster, name)
        assert body is not None
        body["status"] = {
            "replicas": body["spec"]["replicas"],
            "readyReplicas": ready,
            "updatedReplicas": body["spec"]["replicas"],
        }
        cluster.api.put_object(DEPLOYMENTS, body)
    for index in range(2):
        cluster.api.put_object("v1/pods", _engine_pod(f"chat-unified-{index}", f"10.0.0.{index}"))
    status = wait_for(
        lambda: (
            pool_status(cluster, "chat").get("phase") == "Ready" and pool_status(cluster, "chat")
        ),
        what="Ready phase",
    )
    assert status["readySummary"] == "unified 2/2"
    assert [e["address"] for e in status["endpoints"]] == ["10.0.0.0:8000", "10.0.0.1:8000"]


def _engine_pod(name: str, ip: str, *, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "creationTimestamp": created,
            "labels": {labels.POOL_LABEL: "chat", labels.ROLE_LABEL: "unified"},
            "annotations": {labels.ENGINE_PORT_ANNOTATION: "8000"},
        },
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_replica_change_patches_in_place_without_recreating(cluster: Cluster) -> None:
    cluster.create_pool("chat", UNIFIED)
    before = wait_for(lambda: deployment(cluster, "chat-unified"), what="engine deployment")
    cluster.patch_pool("chat", {"spec": {"roles": {"unified": {"replicas": 5}}}})
    after = wait_for(
        lambda: (d := deployment(cluster, "chat-unified")) and d["spec"]["replicas"] == 5 and d,
        what="replicas patched",
    )
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    deleted = [k for k, obj in cluster.api.objects.items() if obj.deleted]
    assert deleted == [], f"nothing may be recreated, deleted: {deleted}"


class _RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers a Drain that does not wait (`timeout_s` 0) with a stream still running there,
    and a waiting Drain with the endpoint empty; records each call's endpoint and wait."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.authorizations: set[str] = set()
        self._lock = threading.Lock()

    def Drain(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.calls.append((request.endpoint_id, request.timeout_s))
            self.authorizations.add(dict(context.invocation_metadata()).get("authorization", ""))
        if request.timeout_s == 0:
            return scheduler_pb2.DrainResponse(drained=False, remaining_in_flight=1)
        return scheduler_pb2.DrainResponse(drained=True, remaining_in_flight=0)


def test_scale_in_drains_the_leaving_pods_at_the_scheduler_first(cluster: Cluster) -> None:
    servicer = _RecordingScheduler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cluster.create_pool("chat", {**UNIFIED, "roles": {"unified": {"replicas": 3}}})
        wait_for(lambda: deployment(cluster, "chat-unified"), what="engine deployment")
        for index, created in enumerate(
            ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z")
        ):
            cluster.api.put_object(
                "v1/pods", _engine_pod(f"chat-unified-{index}", f"10.0.0.{index}", created=created)
            )
        cluster.api.put_object(
            "v1/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "chat-scheduler-0",
                    "namespace": NS,
                    "labels": {labels.POOL_LABEL: "chat", labels.ROLE_LABEL: labels.SCHEDULER_ROLE},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "scheduler",
                            "ports": [
                                {"name": labels.SCHEDULER_GRPC_PORT_NAME, "containerPort": port}
                            ],
                        }
                    ]
                },
                "status": {"podIP": "127.0.0.1"},
            },
        )
        cluster.patch_pool("chat", {"spec": {"roles": {"unified": {"replicas": 1}}}})
        wait_for(
            lambda: (d := deployment(cluster, "chat-unified")) and d["spec"]["replicas"] == 1,
            what="scale-in",
        )
        # The two newest pods leave, and are the ones marked for deletion. Both are taken out
        # of routing (Drain without a wait) before either is waited on, within the budget.
        leaving = ["chat-unified-1", "chat-unified-2"]
        marks, waits = servicer.calls[:2], servicer.calls[2:]
        assert sorted(marks) == [(name, 0.0) for name in leaving]
        assert sorted(name for name, _ in waits) == leaving
        assert all(0.0 < wait <= 2.0 for _, wait in waits), waits
        # With this pool's own token, the one its scheduler mounts.
        token = derive_pool_token(KEY, namespace=NS, pool="chat")
        assert servicer.authorizations == {f"Bearer {token}"}
        secret = cluster.api.stored("v1/secrets", NS, "chat-scheduler-token") or {}
        assert base64.b64decode(secret["data"]["token"]).decode() == token
        for name, cost in (
            ("chat-unified-1", "-1000"),
            ("chat-unified-2", "-1000"),
            ("chat-unified-0", None),
        ):
            pod = cluster.api.stored("v1/pods", NS, name) or {}
            annotations = pod["metadata"].get("annotations") or {}
            assert annotations.get("controller.kubernetes.io/pod-deletion-cost") == cost
    finally:
        server.stop(grace=None)


def test_invalid_pool_is_degraded_with_an_event_and_operator_stays_healthy(
    cluster: Cluster,
) -> None:
    spec = {
        "model": {"name": "m"},
        "roles": {"unified": {"replicas": 1}, "decode": {"replicas": 1}},
    }
    cluster.create_pool("broken", spec)
    status = wait_for(
        lambda: (
            pool_status(cluster, "broken").get("phase") == "Degraded"
            and pool_status(cluster, "broken")
        ),
        what="Degraded",
    )
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "either unified, or prefill and decode" in degraded["message"]
    event = wait_for(
        lambda: [
            e for e in cluster.api.stored_all("v1/events", NS) if e.get("reason") == "InvalidSpec"
        ],
        what="InvalidSpec event",
    )
    assert event[0]["type"] == "Warning"
    assert cluster.api.stored_all(DEPLOYMENTS, NS) == []
    with urllib.request.urlopen(cluster.liveness, timeout=5) as answer:
        assert answer.status == 200
    # Still reconciling others.
    cluster.create_pool("chat", UNIFIED)
    wait_for(lambda: deployment(cluster, "chat-unified"), what="healthy pool reconciled")
    # Fixing the spec is picked up (no retry loop before, a reconcile after).
    cluster.patch_pool("broken", {"spec": {"roles": {"unified": None, "prefill": {"replicas": 1}}}})
    wait_for(lambda: deployment(cluster, "broken-decode"), what="fixed pool reconciled")
    fixed = wait_for(
        lambda: (s := pool_status(cluster, "broken")).get("phase") == "Progressing" and s,
        what="Degraded cleared",
    )
    assert next(c for c in fixed["conditions"] if c["type"] == "Degraded")["status"] == "False"


def test_delete_removes_every_child(cluster: Cluster) -> None:
    cluster.create_pool("chat", UNIFIED)
    wait_for(lambda: deployment(cluster, "chat-scheduler"), what="children")
    wait_for(
        lambda: (cluster.api.stored(POOLS, NS, "chat") or {}).get("metadata", {}).get("finalizers"),
        what="finalizer",
    )
    cluster.delete_pool("chat")
    wait_for(lambda: cluster.api.stored(POOLS, NS, "chat") is None, what="pool gone")
    for resource in (
        DEPLOYMENTS,
        "v1/services",
        "v1/configmaps",
        "v1/secrets",
        "v1/serviceaccounts",
        "rbac.authorization.k8s.io/v1/rolebindings",
    ):
        assert cluster.api.stored_all(resource, NS) == [], resource


def test_restart_resumes_without_duplicates(cluster: Cluster) -> None:
    cluster.create_pool("chat", UNIFIED)
    wait_for(lambda: deployment(cluster, "chat-scheduler"), what="children")
    registry, reconciler = build_operator(
        configuration=client.Configuration(host=cluster.url),
        render=RenderSettings(scheduler_image="twinroute:test", pool_token_key=KEY),
        resync_interval_s=60,
        drain_timeout_s=1.0,
    )
    stop, ready = threading.Event(), threading.Event()
    thread = run_in_thread(
        registry=registry, namespaces=[NS], liveness_endpoint=None, stop=stop, ready=ready
    )
    try:
        wait_for(lambda: reconciler.reconciles > 0, what="second operator resumed")
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    deployments = sorted(d["metadata"]["name"] for d in cluster.api.stored_all(DEPLOYMENTS, NS))
    assert deployments == ["chat-scheduler", "chat-unified"]
    history = [k for k, obj in cluster.api.objects.items() if len(obj.history) and obj.deleted]
    assert history == []
