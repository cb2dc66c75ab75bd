"""The API server's pod watch dropped: the scheduler's Kubernetes discovery resumes without
losing endpoints.

The local API server (`twinroute.testing.kube`) ends open watch streams on demand, either by
cutting the connection mid-stream or by ending the stream cleanly (a server-side timeout), and
can answer the next resumed watch with `410 Gone`. Discovery must keep every endpoint through
the drop (no snapshot with fewer endpoints in between), pick up a pod created while the watch
was down, and forget a pod deleted while it was down: from the replayed events when it
resumes, or from the relist that `410 Gone` forces.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import kmock
import pytest
from kubernetes import client as k8s
from twinroute.scheduler.discovery import KubernetesSource
from twinroute.scheduler.types import Endpoint

from twinroute.labels import MODEL_LABEL, POOL_LABEL, ROLE_LABEL
from twinroute.testing.kube import KubeApiServer

NAMESPACE = "llm"
SELECTOR = f"{POOL_LABEL}=pool-a"
DROPS = {"connection-cut": True, "stream-ended": False}


def pod(name: str, *, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {POOL_LABEL: "pool-a", ROLE_LABEL: "unified", MODEL_LABEL: "m"},
        },
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http",
                                                               "containerPort": 8000}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


async def until(predicate: Callable[[], bool], *, what: str, timeout_s: float = 10.0) -> None:
    """Poll a condition the discovery thread or the server changes (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def next_ids(snapshots: AsyncIterator[tuple[Endpoint, ...]]) -> set[str]:
    snapshot = await asyncio.wait_for(anext(snapshots), timeout=10)
    return {endpoint.id for endpoint in snapshot}


class Cluster:
    """The API server, an HTTP client for it, and a discovery source watching it."""

    def __init__(self, *, api: KubeApiServer, url: str, http: aiohttp.ClientSession) -> None:
        self.api = api
        self.http = http
        self.base = f"{url}/api/v1/namespaces/{NAMESPACE}/pods"
        configuration = k8s.Configuration()
        configuration.host = url
        self.source = KubernetesSource(
            api_client=k8s.ApiClient(configuration),
            namespace=NAMESPACE,
            label_selector=SELECTOR,
            max_backoff_s=0.2,
        )

    async def create(self, name: str, *, ip: str) -> None:
        async with self.http.post(self.base, json=pod(name, ip=ip)) as response:
            assert response.status < 300, await response.text()

    async def delete(self, name: str) -> None:
        async with self.http.delete(f"{self.base}/{name}") as response:
            assert response.status < 300, await response.text()

    async def watching(self, *, watches: int) -> None:
        """Wait until discovery has opened its `watches`-th watch and it is being served."""
        await until(
            lambda: self.source.watches >= watches and self.api.open_watch_count() == 1,
            what=f"watch number {watches} to be open",
        )


async def run_cluster(body: Callable[[Cluster], Awaitable[None]]) -> None:
    async with (
        KubeApiServer() as api,
        kmock.Server(api, port=0) as server,
        aiohttp.ClientSession() as http,
    ):
        await body(Cluster(api=api, url=f"http://127.0.0.1:{server.port}", http=http))


@pytest.mark.parametrize("reset", DROPS.values(), ids=DROPS.keys())
async def test_endpoints_survive_a_dropped_watch_and_new_pods_are_seen(reset: bool) -> None:
    async def body(cluster: Cluster) -> None:
        await cluster.create("engine-0", ip="10.0.0.1")
        await cluster.create("engine-1", ip="10.0.0.2")
        snapshots = cluster.source.snapshots()
        assert await next_ids(snapshots) == {"engine-0", "engine-1"}
        await cluster.watching(watches=1)

        assert cluster.api.drop_watches(reset=reset) == 1
        # Created while the watch is down (a cut connection backs off before resuming).
        await cluster.create("engine-2", ip="10.0.0.3")
        # Snapshots come only on change: the next one holds all three, so none in between
        # lost engine-0 or engine-1.
        assert await next_ids(snapshots) == {"engine-0", "engine-1", "engine-2"}
        await cluster.watching(watches=2)
        # Resumed from its last resourceVersion: no relist was needed.
        assert cluster.source.lists == 1 and cluster.source.relists_after_gone == 0

        # And the resumed watch keeps following the pool.
        await cluster.create("engine-3", ip="10.0.0.4")
        assert await next_ids(snapshots) == {"engine-0", "engine-1", "engine-2", "engine-3"}
        assert cluster.api.watches_dropped == 1
        await snapshots.aclose()  # type: ignore[attr-defined]

    await run_cluster(body)


@pytest.mark.parametrize("reset", DROPS.values(), ids=DROPS.keys())
async def test_pod_deleted_while_the_watch_is_down_is_replayed_on_resume(reset: bool) -> None:
    async def body(cluster: Cluster) -> None:
        for index in range(3):
            await cluster.create(f"engine-{index}", ip=f"10.0.0.{index + 1}")
        snapshots = cluster.source.snapshots()
        assert await next_ids(snapshots) == {"engine-0", "engine-1", "engine-2"}
        await cluster.watching(watches=1)

        cluster.api.drop_watches(reset=reset)
        await cluster.delete("engine-1")
        assert await next_ids(snapshots) == {"engine-0", "engine-2"}
        await cluster.watching(watches=2)
        assert cluster.source.lists == 1  # the deletion came as a replayed event
        await snapshots.aclose()  # type: ignore[attr-defined]

    await run_cluster(body)


@pytest.mark.parametrize("reset", DROPS.values(), ids=DROPS.keys())
async def test_gone_after_the_drop_relists_and_forgets_deleted_pods(reset: bool) -> None:
    async def body(cluster: Cluster) -> None:
        for index in range(3):
            await cluster.create(f"engine-{index}", ip=f"10.0.0.{index + 1}")
        snapshots = cluster.source.snapshots()
        assert await next_ids(snapshots) == {"engine-0", "engine-1", "engine-2"}
        await cluster.watching(watches=1)

        # The version discovery resumes from is "compacted away": its next watch gets 410.
        cluster.api.answer_gone(count=1)
        cluster.api.drop_watches(reset=reset)
        await cluster.delete("engine-1")
        await cluster.create("engine-3", ip="10.0.0.4")
        # Whatever the interleaving (relist before or after the changes), the set converges
        # without ever losing engine-0 or engine-2.
        seen = await next_ids(snapshots)
        while seen != {"engine-0", "engine-2", "engine-3"}:
            assert {"engine-0", "engine-2"} <= seen, seen
            seen = await next_ids(snapshots)
        await until(lambda: cluster.source.relists_after_gone == 1, what="the relist")
        assert cluster.api.gone_sent == 1 and cluster.source.lists == 2
        await cluster.watching(watches=3)

        await cluster.delete("engine-0")
        assert await next_ids(snapshots) == {"engine-2", "engine-3"}
        await snapshots.aclose()  # type: ignore[attr-defined]

    await run_cluster(body)
