"""The only module that writes to the Kubernetes API server.

It speaks REST through the official client's `ApiClient` (auth, TLS and kubeconfig handling
stay the client's) over the handful of resource kinds a pool owns. Reads used for planning
and status live here too, so every API call the operator makes is in one place and the RBAC in
the chart can be checked against it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubernetes import client
from twinroute.operator.drain import Drainer
from twinroute.operator.plan import Create, Delete, Patch, Plan, ScaleIn

from twinroute import labels

log = logging.getLogger(__name__)

# Deployment controllers remove the pods with the lowest deletion cost first.
POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"

# (apiVersion, kind) -> collection path in a namespace; the kinds a pool owns.
_COLLECTIONS: Final[dict[tuple[str, str], str]] = {
    ("v1", "Secret"): "/api/v1/namespaces/{namespace}/secrets",
    ("v1", "ConfigMap"): "/api/v1/namespaces/{namespace}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{namespace}/services",
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{namespace}/serviceaccounts",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{namespace}/deployments",
    (
        "policy/v1",
        "PodDisruptionBudget",
    ): "/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
    ): "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
    (
        "inference.networking.k8s.io/v1",
        "InferencePool",
    ): "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools",
}
# Kinds whose CRDs belong to someone else (the Gateway API Inference Extension): a cluster
# without them has none to list, and a pool that asks for one is told how to get them.
_FOREIGN_KINDS: Final = {
    ("inference.networking.k8s.io/v1", "InferencePool"): (
        "the InferencePool CRD (inference.networking.k8s.io/v1) is not installed: install "
        "the Gateway API Inference Extension's CRDs (its release manifests.yaml) and a "
        "gateway that implements it, or use gateway.kind router or envoy"
    ),
}
_PODS: Final = "/api/v1/namespaces/{namespace}/pods"
_POOLS: Final = (
    f"/apis/{labels.API_GROUP}/{labels.API_VERSION}/namespaces/{{namespace}}/"
    f"{labels.MODELPOOL_PLURAL}"
)
MERGE_PATCH: Final = "application/merge-patch+json"


class ApplyError(RuntimeError):
    """An API call failed; `status` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, *, verb: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{verb} {path}: HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainBudget:
    """How long one scale-in waits for the scheduler to drain the leaving pods."""

    timeout_s: float = 30.0


class KubeApi:
    """Reads and writes of pool children, pods and pool status."""

    def __init__(
        self,
        *,
        api_client: client.ApiClient,
        drainer: Drainer,
        drain_budget: DrainBudget = DrainBudget(),
        pool_token: Callable[[str, str], str] | None = None,
    ) -> None:
        """`pool_token(namespace, pool)` is the token a pool's scheduler requires when pools
        have tokens of their own (else the drainer's own, shared one, if any)."""
        self._api = api_client
        self._drainer = drainer
        self._drain_budget = drain_budget
        self._pool_token = pool_token

    # ---- reads ---------------------------------------------------------------------------

    def list_children(self, *, namespace: str, pool: str) -> list[dict[str, Any]]:
        selector = f"{labels.POOL_LABEL}={pool},{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"
        found: list[dict[str, Any]] = []
        for (api_version, kind), collection in _COLLECTIONS.items():
            try:
                answer = self._call(
                    "GET", collection.format(namespace=namespace), query={"labelSelector": selector}
                )
            except ApplyError as error:
                if error.status == 404 and (api_version, kind) in _FOREIGN_KINDS:
                    continue  # the CRD is not installed: the pool can own none
                raise
            for item in answer.get("items") or []:
                # Lists omit apiVersion/kind per item; the planner keys on them.
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                found.append(item)
        return found

    def list_pods(self, *, namespace: str, selector: str) -> list[dict[str, Any]]:
        answer = self._call(
            "GET", _PODS.format(namespace=namespace), query={"labelSelector": selector}
        )
        return list(answer.get("items") or [])

    # ---- writes --------------------------------------------------------------------------

    def execute(self, *, plan: Plan, namespace: str, pool: str) -> None:
        for action in plan.actions:
            if isinstance(action, Create):
                self._create(action.body)
            elif isinstance(action, Patch):
                if action.scale_in is not None:
                    self._drain_leaving_pods(
                        namespace=namespace, pool=pool, scale_in=action.scale_in
                    )
                self._patch(action.body)
            elif isinstance(action, Delete):
                self._delete(
                    api_version=action.api_version,
                    kind=action.kind,
                    name=action.name,
                    namespace=action.namespace,
                )

    def delete_children(self, *, namespace: str, pool: str) -> int:
        """Delete everything the pool owns (the operator does not rely on a garbage
        collector: some API servers, like the test one, have none). Returns the count."""
        children = self.list_children(namespace=namespace, pool=pool)
        for child in children:
            self._delete(
                api_version=child["apiVersion"],
                kind=child["kind"],
                name=child["metadata"]["name"],
                namespace=namespace,
            )
        return len(children)

    def patch_pool_status(self, *, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        path = f"{_POOLS.format(namespace=namespace)}/{name}/status"
        self._call("PATCH", path, body={"status": dict(status)}, content_type=MERGE_PATCH)

    # ---- internals -----------------------------------------------------------------------

    def _drain_leaving_pods(self, *, namespace: str, pool: str, scale_in: ScaleIn) -> None:
        """Pick the pods that will leave, mark them cheapest to delete, and drain them.

        The Deployment controller deletes the lowest `pod-deletion-cost` first, so the pods
        drained here are the ones that go. Drain is bounded: an unreachable scheduler delays
        the scale-in by at most the budget, never blocks it.
        """
        pods = self.list_pods(
            namespace=namespace,
            selector=f"{labels.POOL_LABEL}={pool},{labels.ROLE_LABEL}={scale_in.role}",
        )
        leaving = choose_leaving_pods(pods, count=scale_in.from_replicas - scale_in.to_replicas)
        if not leaving:
            return
        for name in leaving:
            self._call(
                "PATCH",
                f"{_PODS.format(namespace=namespace)}/{name}",
                body={"metadata": {"annotations": {POD_DELETION_COST: "-1000"}}},
                content_type=MERGE_PATCH,
            )
        schedulers = self.list_pods(
            namespace=namespace,
            selector=f"{labels.POOL_LABEL}={pool},{labels.ROLE_LABEL}={labels.SCHEDULER_ROLE}",
        )
        addresses = scheduler_addresses(schedulers)
        log.info(
            "Scale-in of %s/%s role %s: draining %s at %d scheduler(s)",
            namespace,
            pool,
            scale_in.role,
            ",".join(leaving),
            len(addresses),
        )
        self._drainer.drain(
            endpoint_ids=leaving,
            scheduler_addresses=addresses,
            timeout_s=self._drain_budget.timeout_s,
            token=self._pool_token(namespace, pool) if self._pool_token is not None else None,
        )

    def _create(self, body: Mapping[str, Any]) -> None:
        path = self._collection(body, namespace=body["metadata"]["namespace"])
        try:
            self._call("POST", path, body=dict(body))
        except ApplyError as error:
            missing_crd = _FOREIGN_KINDS.get((str(body["apiVersion"]), str(body["kind"])))
            if error.status == 404 and missing_crd:
                raise ApplyError(verb="POST", path=path, status=404, message=missing_crd) from error
            if error.status != 409:
                raise
            # Created by an earlier run whose answer was lost: bring it up to date instead.
            self._patch(body)

    def _patch(self, body: Mapping[str, Any]) -> None:
        metadata = body["metadata"]
        path = f"{self._collection(body, namespace=metadata['namespace'])}/{metadata['name']}"
        self._call("PATCH", path, body=dict(body), content_type=MERGE_PATCH)

    def _delete(self, *, api_version: str, kind: str, name: str, namespace: str) -> None:
        collection = _COLLECTIONS[(api_version, kind)].format(namespace=namespace)
        try:
            self._call("DELETE", f"{collection}/{name}", body={"propagationPolicy": "Background"})
        except ApplyError as error:
            if error.status != 404:
                raise

    @staticmethod
    def _collection(body: Mapping[str, Any], *, namespace: str) -> str:
        return _COLLECTIONS[(str(body["apiVersion"]), str(body["kind"]))].format(
            namespace=namespace
        )

    def _call(
        self,
        verb: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        request = self._api.param_serialize(
            verb,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(*request, _request_timeout=30)
            data = response.read()  # type: ignore[no-untyped-call]
        except client.ApiException as error:
            raise ApplyError(
                verb=verb, path=path, status=int(error.status or 0), message=str(error.reason)
            ) from error
        except OSError as error:  # urllib3 wraps connection failures in OSError subclasses
            raise ApplyError(verb=verb, path=path, status=0, message=str(error)) from error
        if not 200 <= response.status <= 299:
            raise ApplyError(
                verb=verb,
                path=path,
                status=int(response.status),
                message=_reason(data) or str(response.reason),
            )
        decoded: dict[str, Any] = json.loads(data) if data else {}
        return decoded


def _reason(body: Any) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def choose_leaving_pods(pods: Sequence[Mapping[str, Any]], *, count: int) -> list[str]:
    """The pods a scale-in by `count` should remove: not-ready ones first, then the newest.

    Pure. Newest first because the oldest pods hold the warmest prefix caches.
    """
    if count <= 0:
        return []

    def ready(pod: Mapping[str, Any]) -> bool:
        return any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (pod.get("status") or {}).get("conditions") or []
        )

    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    not_ready = sorted((p for p in live if not ready(p)), key=_age_key, reverse=True)
    ready_pods = sorted((p for p in live if ready(p)), key=_age_key, reverse=True)
    ordered = not_ready + ready_pods
    return [str(p["metadata"]["name"]) for p in ordered[:count]]


def _age_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    metadata = pod["metadata"]
    return (str(metadata.get("creationTimestamp") or ""), str(metadata["name"]))


def scheduler_addresses(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """host:port of the gRPC server of every running scheduler pod (each holds its own
    rings, so each one must hear about a drain)."""
    addresses = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for container in (pod.get("spec") or {}).get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") == labels.SCHEDULER_GRPC_PORT_NAME:
                    addresses.append(f"{ip}:{port['containerPort']}")
    return sorted(addresses)
