"""The whole product on one machine, every part a process (see `local_cluster.py`):
kubectl apply a ModelPool -> the operator renders the engine and scheduler Deployments -> the
local kubelet runs their containers (engine-sim, `twinroute scheduler --config`, `twinroute
router`) as processes and writes Pods -> the scheduler discovers the engines through the
Kubernetes watch -> traffic through the router sticks to one engine per shared prefix; scale
out and in under traffic loses nothing; the operator restarted duplicates nothing; deleting the pool
removes every child and stops every engine.

On failure the test prints the objects, events and the tail of every process's log.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import yaml
from local_cluster import REPO_ROOT, LocalCluster, wait_until

POOL = "sim"
MODEL = "twinroute-sim"
SAMPLE = REPO_ROOT / "manifests" / "samples" / "modelpool-simulator.yaml"
ENDPOINT_HEADER = "x-twinroute-endpoint"

pytestmark = pytest.mark.slow


@dataclass(slots=True)
class TrafficLog:
    served_by: dict[int, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: list[str] = field(default_factory=list)
    sent: int = 0


def group_prefix(group: int) -> str:
    """A long system prompt per group: several prefix-key blocks (2,048 characters each)."""
    words = random.Random(group).choices(["alpha", "beta", "gamma", "delta", "omega"], k=1800)
    return f"You are assistant number {group}. " + " ".join(words)


async def send(
    session: aiohttp.ClientSession, *, router: str, group: int, turn: int, log: TrafficLog
) -> None:
    body = {
        "model": MODEL,
        "prompt": f"{group_prefix(group)}\nUser turn {turn}: say something.",
        "max_tokens": 4,
        "stream": turn % 2 == 0,
    }
    log.sent += 1
    try:
        async with session.post(f"{router}/v1/completions", json=body) as response:
            text = await response.text()
            if response.status != 200:
                log.failures.append(f"group {group} turn {turn}: {response.status} {text[:200]}")
                return
            if body["stream"] and "[DONE]" not in text:
                log.failures.append(f"group {group} turn {turn}: stream ended without [DONE]")
                return
            log.served_by[group].append(response.headers.get(ENDPOINT_HEADER, "?"))
    except (aiohttp.ClientError, TimeoutError) as error:
        log.failures.append(f"group {group} turn {turn}: {type(error).__name__} {error}")


async def steady_traffic(
    *, router: str, log: TrafficLog, stop: asyncio.Event, groups: int = 6, interval_s: float = 0.05
) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()
        turn = 0
        while not stop.is_set():
            task = asyncio.create_task(
                send(session, router=router, group=turn % groups, turn=turn, log=log)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
            turn += 1
            await asyncio.sleep(interval_s)
        await asyncio.gather(*pending)


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(work_dir=tmp_path)
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


async def ready_endpoints(cluster: LocalCluster) -> float:
    samples = await cluster.scheduler_metric("twinroute_scheduler_ready_endpoints")
    return max(samples.values(), default=0.0)


async def ready_engine_pods(cluster: LocalCluster) -> list[str]:
    return [
        pod["metadata"]["name"]
        for pod in await cluster.pods(pool=POOL, engines_only=True)
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
        and not pod["metadata"].get("deletionTimestamp")
    ]


async def test_pool_lifecycle_through_the_real_processes(cluster: LocalCluster) -> None:
    try:
        await scenario(cluster)
    except BaseException:
        print(await cluster.dump())
        raise


async def scenario(cluster: LocalCluster) -> None:
    # The sample as it is, but with one scheduler replica: the local kubelet runs pods as
    # processes on 127.0.0.1 and nothing here resolves the replicas' headless Service (the
    # real-cluster scenario applies the sample unchanged).
    pool = yaml.safe_load(SAMPLE.read_text())
    pool["spec"]["scheduler"] = {**pool["spec"].get("scheduler", {}), "replicas": 1}
    manifest = cluster.work_dir / "modelpool-simulator.yaml"
    manifest.write_text(yaml.safe_dump(pool))
    await cluster.kubectl("apply", "-f", str(manifest))
    await wait_until(lambda: _count_is(cluster, 2), "two Ready engine pods", timeout_s=90)
    await cluster.wait_for_frontend(pool=POOL)
    router = cluster.router_url

    async def two_endpoints() -> bool:
        return await ready_endpoints(cluster) == 2

    await wait_until(two_endpoints, "the scheduler to discover both engines", timeout_s=30)

    # No wait for the router: it starts beside the scheduler and may dial it first; its picks
    # wait for the channel within their deadline, so the first request must already succeed.

    # Affinity: each group's requests go to one engine while the pool is lightly loaded.
    log = TrafficLog()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for turn in range(5):
            await asyncio.gather(
                *(send(session, router=router, group=g, turn=turn, log=log) for g in range(6))
            )
    assert log.failures == []
    for group, endpoints in log.served_by.items():
        top = collections.Counter(endpoints).most_common(1)[0][1]
        assert top >= 4, f"group {group} scattered over {endpoints}"
    assert len({e for es in log.served_by.values() for e in es}) == 2, "one engine got nothing"
    decisions = await cluster.scheduler_metric("twinroute_scheduler_decisions_total")
    assert sum(decisions.values()) >= 30, decisions
    affinity = sum(v for k, v in decisions.items() if 'reason="cache_affinity"' in k)
    assert affinity >= 24, decisions  # every turn after a group's first found its prefix
    explained = await cluster.debug_decisions(pool=POOL, limit=5)
    assert all(d["reason"] and d["candidates"] for d in explained), explained
    pool = await cluster.get_json("modelpool", POOL)
    assert pool["status"]["phase"] in ("Ready", "Progressing"), pool["status"]

    # Scale out and in under steady traffic: nothing fails.
    stop = asyncio.Event()
    steady = TrafficLog()
    traffic = asyncio.create_task(steady_traffic(router=router, log=steady, stop=stop))
    try:
        await _scale(cluster, 3)

        async def three_endpoints() -> bool:
            return await ready_endpoints(cluster) == 3

        await wait_until(three_endpoints, "the third engine in the rings", timeout_s=60)
        remapped = await cluster.scheduler_metric("twinroute_scheduler_ring_keys_remapped_ratio")
        # Adding one endpoint to two moves the first candidate of ~1/3 of the keys.
        assert 0.15 <= max(remapped.values()) <= 0.5, remapped
        await asyncio.sleep(1.0)
        await _scale(cluster, 2)
        await wait_until(two_endpoints, "the scheduler back at two engines", timeout_s=60)
        await wait_until(lambda: _count_is(cluster, 2), "two engine pods left", timeout_s=30)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await traffic
    assert steady.sent >= 40
    assert steady.failures == [], steady.failures[:5]

    # The operator restarted: it resumes, and no child is duplicated or recreated.
    before = await _children(cluster)
    await cluster.restart_operator()
    await asyncio.sleep(2.0)  # time for a resumed handler to (wrongly) create anything
    assert await _children(cluster) == before
    assert len(await ready_engine_pods(cluster)) == 2

    # Delete the pool: every child goes, every engine process stops.
    pods = await cluster.pods(pool=POOL)
    ports = [
        int(port["containerPort"])
        for pod in pods
        for container in pod["spec"]["containers"]
        for port in container.get("ports") or []
    ]
    assert len(ports) == 2 + 3, ports  # two engines; the scheduler pod's grpc, metrics, http
    await cluster.kubectl("delete", "modelpool", POOL, "--wait=false")

    async def all_gone() -> bool:
        deployments = await cluster.get_json("deployments", selector=f"twinroute.io/pool={POOL}")
        return not deployments["items"] and not await cluster.pods(pool=POOL)

    await wait_until(all_gone, "the pool's Deployments and Pods to be gone", timeout_s=60)
    for port in ports:
        with pytest.raises((aiohttp.ClientError, OSError)):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                await session.get(f"http://127.0.0.1:{port}/health")


async def _count_is(cluster: LocalCluster, count: int) -> bool:
    return len(await ready_engine_pods(cluster)) == count


async def _children(cluster: LocalCluster) -> dict[str, str]:
    """{kind/name: uid} of everything the operator made for the pool."""
    found: dict[str, str] = {}
    for kind in (
        "deployments",
        "services",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "rolebindings",
    ):
        listing = await cluster.get_json(kind, selector=f"twinroute.io/pool={POOL}")
        for item in listing["items"]:
            found[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["uid"]
    return found


async def _scale(cluster: LocalCluster, replicas: int) -> None:
    await cluster.kubectl(
        "patch",
        "modelpool",
        POOL,
        "--type=merge",
        "-p",
        f'{{"spec":{{"roles":{{"unified":{{"replicas":{replicas}}}}}}}}}',
    )
