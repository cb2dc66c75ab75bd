"""A prefill/decode pool on the one-machine cluster (see `local_cluster.py`), every part a
process: kubectl apply a ModelPool with prefill and decode replicas -> the operator renders one
Deployment per role, engines with vLLM's `--kv-transfer-config` -> the local kubelet runs them
as engine-sim processes with their role labels -> the scheduler discovers both roles through
the Kubernetes watch -> traffic through the router takes the disaggregated path (prefill hop on
a prefill engine, KV pulled by a decode engine), visible in the router's, the scheduler's and
the engines' metrics, with no failed request -> deleting the pool removes everything.

On failure the test prints the objects, events and the tail of every process's log.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from local_cluster import LocalCluster, wait_until
from test_local_cluster import TrafficLog, send

POOL = "pd"
PREFILL_HEADER = "x-twinroute-prefill-endpoint"
MANIFEST = """\
apiVersion: twinroute.io/v1alpha1
kind: ModelPool
metadata:
  name: pd
spec:
  model:
    name: twinroute-sim
  engine:
    kind: simulator
    image: ghcr.io/twinroute/twinroute:0.1.0
    args: ["--time-scale", "0.05"]
    resources:
      requests:
        cpu: 100m
        memory: 128Mi
  roles:
    prefill:
      replicas: 1
    decode:
      replicas: 2
  routing:
    policy: dualmap
    ttftSloSeconds: 5
  # The local kubelet runs pods as processes and resolves no headless Service.
  scheduler:
    replicas: 1
"""

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(work_dir=tmp_path)
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


@pytest.fixture
def manifest(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "pd-pool.yaml"
    path.write_text(MANIFEST)
    return path


async def test_prefill_decode_pool_through_the_real_processes(
    cluster: LocalCluster, manifest: pathlib.Path
) -> None:
    try:
        await scenario(cluster, manifest)
    except BaseException:
        print(await cluster.dump())
        raise


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


async def engines_by_role(cluster: LocalCluster) -> dict[str, list[str]]:
    """{role: [engine base URL, ...]} of the Ready engine pods (ports as the kubelet mapped)."""
    found: dict[str, list[str]] = {}
    for pod in await cluster.pods(pool=POOL, engines_only=True):
        if not _ready(pod):
            continue
        role = pod["metadata"]["labels"]["twinroute.io/role"]
        port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
        found.setdefault(role, []).append(f"http://127.0.0.1:{port}")
    return found


async def engine_metrics(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def scenario(cluster: LocalCluster, manifest: pathlib.Path) -> None:
    await cluster.kubectl("apply", "-f", str(manifest))

    async def three_engines() -> bool:
        roles = await engines_by_role(cluster)
        return len(roles.get("prefill", [])) == 1 and len(roles.get("decode", [])) == 2

    await wait_until(three_engines, "one prefill and two decode engines Ready", timeout_s=90)
    deployments = await cluster.get_json("deployments", selector=f"twinroute.io/pool={POOL}")
    names = {d["metadata"]["name"] for d in deployments["items"]}
    assert {"pd-prefill", "pd-decode"} <= names, names
    for deployment in deployments["items"]:
        if deployment["metadata"]["name"] in ("pd-prefill", "pd-decode"):
            args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            assert "--kv-transfer-config" in args, args
    await cluster.wait_for_frontend(pool=POOL)

    async def discovered() -> bool:
        samples = await cluster.scheduler_metric("twinroute_scheduler_ready_endpoints")
        return max(samples.values(), default=0.0) == 3

    await wait_until(discovered, "the scheduler to discover all three engines", timeout_s=30)

    # No wait for the router: it starts beside the scheduler and may dial it first; its picks
    # wait for the channel within their deadline, so the first request must already succeed.

    # Traffic: long shared-prefix prompts, streamed and not. A group's first request is
    # disaggregated (nothing cached on its decode engine); later turns may skip the hop.
    log = TrafficLog()
    prefilled_by: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for turn in range(3):
            await asyncio.gather(
                *(send(session, router=cluster.router_url, group=g, turn=turn, log=log)
                  for g in range(6))
            )  # fmt: skip
        # One request outside the groups: its prompt is new everywhere, so it is disaggregated.
        body = {"model": "twinroute-sim", "prompt": "fresh " * 800, "max_tokens": 4}
        async with session.post(f"{cluster.router_url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            prefilled_by.append(response.headers.get(PREFILL_HEADER, ""))
    assert log.failures == [], log.failures[:5]
    assert log.sent == 18
    roles = await engines_by_role(cluster)
    assert prefilled_by[0].startswith("pd-prefill-"), prefilled_by

    placements = await cluster.scheduler_metric("twinroute_scheduler_pd_placements_total")
    disaggregated = sum(v for k, v in placements.items() if 'mode="disaggregated"' in k)
    assert disaggregated >= 7, placements  # six groups' first turns and the fresh prompt
    explained = await cluster.debug_decisions(pool=POOL, limit=30)
    candidate_roles = {c["role"].split(":")[0] for d in explained for c in d["candidates"]}
    assert {"prefill", "decode"} <= candidate_roles, candidate_roles

    prefill_metrics = await engine_metrics(roles["prefill"][0])
    decode_metrics = [await engine_metrics(url) for url in roles["decode"]]
    remote_prefills = prefill_metrics["twinroute_engine_remote_prefills_total"]
    transfers = sum(m["twinroute_engine_kv_transfers_total"] for m in decode_metrics)
    assert remote_prefills >= disaggregated, (remote_prefills, disaggregated)
    assert transfers == remote_prefills, (transfers, remote_prefills)
    assert prefill_metrics["twinroute_engine_kv_pinned_requests"] == 0
    failed = sum(
        v for m in decode_metrics for k, v in m.items()
        if k.startswith("twinroute_engine_kv_transfer_failures_total")
    )  # fmt: skip
    assert failed == 0
    router = await engine_metrics(cluster.router_url)
    hops = router['twinroute_router_prefill_hops_total{outcome="ok"}']
    print(
        f"pd pool: {log.sent + 1} requests, placements {placements}, remote prefills "
        f"{remote_prefills:g}, KV transfers {transfers:g}, prefill hops {hops:g}"
    )
    assert hops == remote_prefills
    assert not any(k.startswith("twinroute_router_prefill_fallbacks_total{") for k in router)

    # Delete the pool: every child goes, every engine process stops.
    engine_urls = [url for urls in roles.values() for url in urls]
    await cluster.kubectl("delete", "modelpool", POOL, "--wait=false")

    async def all_gone() -> bool:
        deployments = await cluster.get_json("deployments", selector=f"twinroute.io/pool={POOL}")
        return not deployments["items"] and not await cluster.pods(pool=POOL)

    await wait_until(all_gone, "the pool's Deployments and Pods to be gone", timeout_s=60)
    for url in engine_urls:
        with pytest.raises((aiohttp.ClientError, OSError)):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                await session.get(f"{url}/health")
