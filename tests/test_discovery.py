"""Endpoint discovery: static lists and YAML files, and the Kubernetes source against the kmock
API server (pods created, made Ready, deleted through the API; a watch answered 410 Gone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import kmock
import pytest
from kmock._internal import rendering
from kubernetes import client as k8s
from twinroute.scheduler.discovery import (
    KubernetesSource,
    StaticSource,
    load_endpoints_file,
    parse_endpoint_list,
    pod_endpoint,
)
from twinroute.scheduler.types import Endpoint, Role
from typing_extensions import override

from twinroute.labels import (
    ENGINE_PORT_ANNOTATION,
    MODEL_LABEL,
    POOL_LABEL,
    ROLE_LABEL,
    SERVED_MODEL_ANNOTATION,
)
from twinroute.testing.kube import KubeApiServer

NAMESPACE = "llm"
SELECTOR = f"{POOL_LABEL}=pool-a"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:8001", (("127.0.0.1:8001", "127.0.0.1:8001"),)),
        ("a=127.0.0.1:8001, b=http://127.0.0.1:8002/",
         (("a", "127.0.0.1:8001"), ("b", "127.0.0.1:8002"))),
        ("", ()),
    ],
    ids=["bare-address", "named-and-url", "empty"],
)  # fmt: skip
def test_parse_endpoint_list(spec: str, expected: tuple[tuple[str, str], ...]) -> None:
    endpoints = parse_endpoint_list(spec, model="m")
    assert tuple((e.id, e.address) for e in endpoints) == expected
    assert all(e.model == "m" for e in endpoints)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("localhost", "HOST:PORT"), ("a=127.0.0.1:x", "HOST:PORT"),
     ("a=127.0.0.1:1,a=127.0.0.1:2", "twice")],
    ids=["no-port", "bad-port", "duplicate-id"],
)  # fmt: skip
def test_parse_endpoint_list_refuses_bad_input(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_endpoint_list(spec)


def test_endpoints_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "endpoints:\n"
        "  - {id: p0, address: '127.0.0.1:9000', role: prefill, model: big, labels: {zone: a}}\n"
        "  - address: 127.0.0.1:9001\n"
    )
    first, second = load_endpoints_file(path, model="default-model")
    assert first == Endpoint(
        id="p0", address="127.0.0.1:9000", role=Role.PREFILL, model="big", labels={"zone": "a"}
    )
    assert (second.id, second.role, second.model) == (
        "127.0.0.1:9001",
        Role.UNIFIED,
        "default-model",
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[1, 2]", "'endpoints' list"),
        ("endpoints:\n  - {adress: '127.0.0.1:1'}\n", "unknown keys"),
        ("endpoints:\n  - {address: '127.0.0.1:1', role: boss}\n", "role"),
        ("endpoints: [\n", "not valid YAML"),
    ],
    ids=["not-a-mapping", "typo-key", "bad-role", "broken-yaml"],
)
def test_endpoints_file_refuses_bad_input(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_endpoints_file(path)


async def test_static_source_yields_once() -> None:
    endpoints = parse_endpoint_list("a=127.0.0.1:1,b=127.0.0.1:2")
    snapshots = [snapshot async for snapshot in StaticSource(endpoints=endpoints).snapshots()]
    assert snapshots == [endpoints]


def pod(
    name: str,
    *,
    ready: bool = True,
    ip: str | None = "10.0.0.1",
    role: str = "unified",
    pool: str = "pool-a",
    deleting: bool = False,
    port: int | None = 8000,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {POOL_LABEL: pool, ROLE_LABEL: role, MODEL_LABEL: "meta-llama.Llama-3-8B"},
        "annotations": {SERVED_MODEL_ANNOTATION: "meta-llama/Llama-3-8B"},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ports = [{"name": "http", "containerPort": port}] if port else []
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "vllm", "image": "vllm", "ports": ports}]},
        "status": status,
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (pod("a"), ("a", "10.0.0.1:8000", Role.UNIFIED)),
        (pod("b", role="decode", ip="fd00::5"), ("b", "[fd00::5]:8000", Role.DECODE)),
        (pod("c", ready=False), None),
        (pod("d", ip=None), None),
        (pod("e", deleting=True), None),
        (pod("f", role="scheduler"), None),
        (pod("g", role="oracle"), None),
    ],
    ids=["ready", "ipv6-decode", "not-ready", "no-ip", "terminating", "scheduler-pod",
         "unknown-role"],
)  # fmt: skip
def test_pod_endpoint(body: Mapping[str, Any], expected: tuple[str, str, Role] | None) -> None:
    endpoint = pod_endpoint(body)
    if expected is None:
        assert endpoint is None
        return
    assert endpoint is not None
    assert (endpoint.id, endpoint.address, endpoint.role) == expected
    assert endpoint.model == "meta-llama/Llama-3-8B"
    assert endpoint.labels[POOL_LABEL] == "pool-a"


def test_pod_port_from_annotation() -> None:
    body = pod("a", port=None)
    body["metadata"]["annotations"][ENGINE_PORT_ANNOTATION] = "8123"
    endpoint = pod_endpoint(body, default_port=9)
    assert endpoint is not None and endpoint.address == "10.0.0.1:8123"
    assert (pod_endpoint(pod("b", port=None), default_port=9) or endpoint).address.endswith(":9")


@attrs.define(kw_only=True)
class GoneOnceApiServer(KubeApiServer):
    """Answers the first watch that resumes from a resourceVersion with `410 Gone`, as an API
    server does once that version is compacted away."""

    gone_sent: int = 0

    @override
    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        if self.gone_sent == 0 and request.params.get("resourceVersion"):
            self.gone_sent += 1
            yield {
                "type": "ERROR",
                "object": {"kind": "Status", "code": 410, "reason": "Expired",
                           "message": "too old resource version"},
            }  # fmt: skip
            return
        async for item in super()._serve_watch(request):
            yield item


async def next_snapshot(iterator: AsyncIterator[tuple[Endpoint, ...]]) -> set[str]:
    snapshot = await asyncio.wait_for(anext(iterator), timeout=10)
    return {endpoint.id for endpoint in snapshot}


async def test_kubernetes_source_follows_ready_pods() -> None:
    async with GoneOnceApiServer() as api, kmock.Server(api, port=0) as server:
        url = f"http://127.0.0.1:{server.port}"
        base = f"{url}/api/v1/namespaces/{NAMESPACE}/pods"
        async with aiohttp.ClientSession() as http:

            async def create(body: dict[str, Any]) -> None:
                async with http.post(base, json=body) as response:
                    assert response.status < 300, await response.text()

            for body in (
                pod("engine-0"), pod("engine-1", ready=False, ip="10.0.0.2"),
                pod("router-0", role="scheduler"), pod("other-0", pool="pool-b"),
            ):  # fmt: skip
                await create(body)
            configuration = k8s.Configuration()
            configuration.host = url
            source = KubernetesSource(
                api_client=k8s.ApiClient(configuration),
                namespace=NAMESPACE,
                label_selector=SELECTOR,
                max_backoff_s=0.1,
            )
            snapshots = source.snapshots()
            assert await next_snapshot(snapshots) == {"engine-0"}
            # The first watch from the list's version is answered 410: relist, nothing lost.
            ready = pod("engine-1", ip="10.0.0.2")
            async with http.patch(
                f"{base}/engine-1/status",
                json={"status": ready["status"]},
                headers={"Content-Type": "application/merge-patch+json"},
            ) as response:
                assert response.status < 300, await response.text()
            assert await next_snapshot(snapshots) == {"engine-0", "engine-1"}
            assert api.gone_sent == 1
            assert source.relists_after_gone == 1 and source.lists == 2
            await create(pod("engine-2", ip="10.0.0.3"))
            assert await next_snapshot(snapshots) == {"engine-0", "engine-1", "engine-2"}
            async with http.delete(f"{base}/engine-0") as response:
                assert response.status < 300
            assert await next_snapshot(snapshots) == {"engine-1", "engine-2"}
            await snapshots.aclose()  # type: ignore[attr-defined]
