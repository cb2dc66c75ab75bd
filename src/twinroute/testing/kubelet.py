"""A local stand-in for the kubelet and the Deployment controller, for the one-machine cluster.

The local API server (`twinroute.testing.kube`) stores objects but runs nothing. This process
does what a cluster's controllers and kubelets would do for the Deployments the operator
creates: for each Deployment matching `--selector` in `--namespace` it keeps `spec.replicas`
Pod objects, each backed by real processes on 127.0.0.1 (one per container), and writes back
what discovery reads (`status.podIP`, the `Ready` condition, container ports). Deleting a
Deployment or scaling it in marks pods not ready, stops their processes (SIGTERM, then SIGKILL)
and deletes the Pod objects; a container that exits is restarted (restartPolicy Always) with its
`restartCount` raised.

What differs from a cluster, and why:
- Every pod shares 127.0.0.1, so each declared `containerPort` P gets a free host port Q: argv
  tokens `P`, `...:P` and `...=P` become Q, and so do the pod's `containerPort` and any pod
  annotation whose value is P (the engine-port annotation discovery reads). `--host 0.0.0.0`
  becomes 127.0.0.1.
- Only images whose command starts with `twinroute` can run: the command becomes
  `python -m twinroute ...` with this interpreter; other containers leave the pod `Pending`
  with reason `UnsupportedCommand`.
- ConfigMap and Secret volumes are written to a folder per pod (a Secret's `items` honoured)
  and mount paths in argv point there.
- Readiness is the container's `readinessProbe` (HTTP GET), polled every 0.5 s.
- Scale-in picks pods as the ReplicaSet controller does: not ready first, then the lowest
  `controller.kubernetes.io/pod-deletion-cost` (the operator lowers it on the pods it drains),
  then the newest.

Run: `python -m twinroute.testing.kubelet --kubeconfig F --namespace NS --log-dir D`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import logging
import os
import pathlib
import secrets
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml

logger = logging.getLogger(__name__)

TEMPLATE_HASH_LABEL = "pod-template-hash"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
POLL_INTERVAL_S = 0.3
PROBE_INTERVAL_S = 0.5
RESTART_BACKOFF_S = 1.0
STOP_GRACE_S = 5.0


class UnsupportedPodError(ValueError):
    """A pod template this local kubelet cannot run; the message says what."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def rewrite_token(token: str, *, ports: Mapping[int, int]) -> str:
    """`8000` -> `41234`, `127.0.0.1:50051` -> `127.0.0.1:41235`, `--port=8000` likewise."""
    if token == "0.0.0.0":
        return "127.0.0.1"
    for separator in (":", "="):
        head, sep, tail = token.rpartition(separator)
        if sep and tail.isdigit() and int(tail) in ports:
            return f"{head}{sep}{ports[int(tail)]}"
    if token.isdigit() and int(token) in ports:
        return str(ports[int(token)])
    return token


def expand_env_refs(token: str, *, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command and args."""
    for name, value in env.items():
        token = token.replace(f"$({name})", value)
    return token


@dataclass(slots=True)
class ContainerRun:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str | None
    log_path: pathlib.Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False


@dataclass(slots=True)
class LocalPod:
    name: str
    deployment: str
    template_hash: str
    containers: list[ContainerRun]
    manifest: dict[str, Any]
    stopping: bool = False
    unsupported: str = ""
    supervisor: asyncio.Task[None] | None = None
    reported: str = ""  # last status written, to skip no-op patches
    ports: dict[int, int] = field(default_factory=dict)
    # volume name -> (ConfigMap name, local folder), filled before the containers start
    config_volumes: dict[str, DataVolume] = field(default_factory=dict)
    created_seq: int = 0  # creation order, for "newest first" on scale-in

    @property
    def ready(self) -> bool:
        return not self.stopping and not self.unsupported and all(c.ready for c in self.containers)


class ApiClient:
    """Plain REST against the local API server (no auth, JSON only)."""

    def __init__(self, *, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._session = session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        async with self._session.request(
            method, self._base + path, data=data, headers={"Content-Type": content_type}
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except json.JSONDecodeError:
                return response.status, text


def api_url_from_kubeconfig(path: str) -> str:
    config = yaml.safe_load(pathlib.Path(path).read_text())
    url: str = config["clusters"][0]["cluster"]["server"]
    if not url.startswith("http://127.0.0.1:"):
        raise UnsupportedPodError(f"the local kubelet only talks to a local API server, not {url}")
    return url


class LocalKubelet:
    def __init__(
        self,
        *,
        api: ApiClient,
        namespace: str,
        selector: str,
        work_dir: pathlib.Path,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._selector = selector
        self._work_dir = work_dir
        self._pods: dict[str, LocalPod] = {}
        self._created = 0

    # -- the control loop ---------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync_once()
            except (aiohttp.ClientError, OSError) as error:
                logger.warning("API server unreachable (%s); retrying", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=POLL_INTERVAL_S)
        await asyncio.gather(*(self._stop_pod(pod) for pod in list(self._pods.values())))

    async def sync_once(self) -> None:
        path = f"/apis/apps/v1/namespaces/{self._namespace}/deployments"
        if self._selector:
            path += "?labelSelector=" + _quote(self._selector)
        status, listing = await self._api.request("GET", path)
        if status != 200:
            logger.warning("listing deployments answered %s", status)
            return
        deployments = {d["metadata"]["name"]: d for d in listing.get("items") or []}
        for pod in list(self._pods.values()):
            if pod.deployment not in deployments and not pod.stopping:
                await self._begin_stop(pod)
        for name, deployment in deployments.items():
            await self._reconcile_deployment(name=name, deployment=deployment)
        for pod in list(self._pods.values()):
            if not pod.stopping:
                await self._report_pod(pod)

    async def _reconcile_deployment(self, *, name: str, deployment: dict[str, Any]) -> None:
        spec = deployment.get("spec") or {}
        wanted = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        current_hash = template_hash(template)
        live = [p for p in self._pods.values() if p.deployment == name and not p.stopping]
        current = [p for p in live if p.template_hash == current_hash]
        stale = [p for p in live if p.template_hash != current_hash]
        for _ in range(wanted - len(current)):
            await self._start_pod(deployment=deployment, template=template, digest=current_hash)
        if len(current) > wanted:
            costs = await self._deletion_costs()
            # The ReplicaSet controller's order: not ready first, then the lowest
            # pod-deletion-cost (the operator marks the pods it drained), then the newest.
            ranked = sorted(current, key=lambda p: (p.ready, costs.get(p.name, 0), -p.created_seq))
            for pod in ranked[: len(current) - wanted]:
                await self._begin_stop(pod)
        current = [p for p in self._pods.values() if p.deployment == name and not p.stopping]
        if stale and sum(p.ready for p in current if p.template_hash == current_hash) >= wanted:
            for pod in stale:
                await self._begin_stop(pod)
        await self._report_deployment(deployment=deployment, digest=current_hash)

    async def _deletion_costs(self) -> dict[str, int]:
        status, listing = await self._api.request(
            "GET", f"/api/v1/namespaces/{self._namespace}/pods"
        )
        costs: dict[str, int] = {}
        if status != 200:
            return costs
        for pod in listing.get("items") or []:
            value = ((pod.get("metadata") or {}).get("annotations") or {}).get(
                DELETION_COST_ANNOTATION, "0"
            )
            with contextlib.suppress(ValueError):
                costs[pod["metadata"]["name"]] = int(value)
        return costs

    # -- pods ---------------------------------------------------------------------------

    async def _start_pod(
        self, *, deployment: Mapping[str, Any], template: Mapping[str, Any], digest: str
    ) -> None:
        deployment_name = deployment["metadata"]["name"]
        pod_name = f"{deployment_name}-{digest[:8]}-{secrets.token_hex(3)[:5]}"
        pod_dir = self._work_dir / pod_name
        pod_dir.mkdir(parents=True, exist_ok=True)
        metadata = template.get("metadata") or {}
        pod_spec = json.loads(json.dumps(template.get("spec") or {}))
        ports: dict[int, int] = {}
        for container in pod_spec.get("containers") or []:
            for port in container.get("ports") or []:
                ports.setdefault(int(port["containerPort"]), free_port())
        annotations = {
            key: rewrite_token(str(value), ports=ports) if str(value).isdigit() else value
            for key, value in (metadata.get("annotations") or {}).items()
        }
        manifest: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": self._namespace,
                "labels": {**(metadata.get("labels") or {}), TEMPLATE_HASH_LABEL: digest[:8]},
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": deployment_name,
                        "uid": deployment["metadata"].get("uid", ""),
                        "controller": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        for container in pod_spec.get("containers") or []:
            for port in container.get("ports") or []:
                port["containerPort"] = ports[int(port["containerPort"])]
        self._created += 1
        pod = LocalPod(
            created_seq=self._created,
            name=pod_name,
            deployment=deployment_name,
            template_hash=digest,
            containers=[],
            manifest=manifest,
            ports=ports,
        )
        pod.config_volumes = config_volume_folders(pod_spec=pod_spec, pod_dir=pod_dir)
        try:
            pod.containers = self._container_runs(
                pod_name=pod_name,
                pod_spec=pod_spec,
                ports=ports,
                mounts_from={k: v.folder for k, v in pod.config_volumes.items()},
                pod_dir=pod_dir,
            )
        except UnsupportedPodError as error:
            pod.unsupported = str(error)
        status, answer = await self._api.request(
            "POST", f"/api/v1/namespaces/{self._namespace}/pods", body=manifest
        )
        if status not in (200, 201):
            raise RuntimeError(f"creating pod {pod_name} answered {status}: {answer}")
        self._pods[pod_name] = pod
        logger.info("pod %s created for deployment %s", pod_name, deployment_name)
        if not pod.unsupported:
            pod.supervisor = asyncio.get_running_loop().create_task(self._supervise(pod))

    def _container_runs(
        self,
        *,
        pod_name: str,
        pod_spec: Mapping[str, Any],
        ports: Mapping[int, int],
        mounts_from: Mapping[str, pathlib.Path],
        pod_dir: pathlib.Path,
    ) -> list[ContainerRun]:
        runs: list[ContainerRun] = []
        for container in pod_spec.get("containers") or []:
            command = list(container.get("command") or [])
            if not command or command[0] != "twinroute":
                raise UnsupportedPodError(
                    f"container {container.get('name')} runs {command or 'its image entrypoint'}"
                    "; the local kubelet runs only `twinroute ...` commands"
                )
            env = {"POD_NAME": pod_name}
            for variable in container.get("env") or []:
                if "value" in variable:
                    env[variable["name"]] = str(variable["value"])
                elif (variable.get("valueFrom") or {}).get("fieldRef", {}).get(
                    "fieldPath"
                ) == "metadata.name":
                    env[variable["name"]] = pod_name
                elif (variable.get("valueFrom") or {}).get("fieldRef", {}).get(
                    "fieldPath"
                ) == "status.podIP":
                    env[variable["name"]] = "127.0.0.1"
            mount_paths = {
                mount["mountPath"]: mounts_from[mount["name"]]
                for mount in container.get("volumeMounts") or []
                if mount["name"] in mounts_from
            }
            argv = [sys.executable, "-m", "twinroute", *command[1:], *container.get("args", [])]
            argv = [
                _remap_mount(rewrite_token(expand_env_refs(t, env=env), ports=ports), mount_paths)
                for t in argv
            ]
            runs.append(
                ContainerRun(
                    name=str(container.get("name")),
                    argv=argv,
                    env=env,
                    ready_url=_probe_url(container, ports=ports),
                    log_path=pod_dir / f"{container.get('name')}.log",
                )
            )
        return runs

    async def _fill_config_volumes(self, pod: LocalPod) -> None:
        for volume in pod.config_volumes.values():
            status, answer = await self._api.request(
                "GET", f"/api/v1/namespaces/{self._namespace}/{volume.resource}/{volume.name}"
            )
            if status != 200:
                raise UnsupportedPodError(f"{volume.resource} {volume.name} not found ({status})")
            for key, value in (answer.get("data") or {}).items():
                if volume.items and key not in volume.items:
                    continue
                path = volume.folder / volume.items.get(key, key)
                if volume.resource == "secrets":
                    path.write_bytes(base64.b64decode(value))
                    path.chmod(0o600)
                else:
                    path.write_text(value)

    async def _supervise(self, pod: LocalPod) -> None:
        try:
            await self._fill_config_volumes(pod)
        except UnsupportedPodError as error:
            pod.unsupported = str(error)
            return
        tasks = [asyncio.create_task(self._run_container(pod, run)) for run in pod.containers]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _run_container(self, pod: LocalPod, run: ContainerRun) -> None:
        while not pod.stopping:
            with run.log_path.open("ab") as log:
                run.process = await asyncio.create_subprocess_exec(
                    *run.argv,
                    stdout=log,
                    stderr=log,
                    env={**os.environ, **run.env, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,
                )
            logger.info("pod %s container %s pid %s", pod.name, run.name, run.process.pid)
            prober = asyncio.create_task(self._probe(run))
            code = await run.process.wait()
            prober.cancel()
            run.ready = False
            if pod.stopping:
                return
            run.restarts += 1
            logger.warning(
                "pod %s container %s exited %s; restart %d",
                pod.name,
                run.name,
                code,
                run.restarts,
            )
            await self._report_pod(pod)
            await asyncio.sleep(RESTART_BACKOFF_S)

    async def _probe(self, run: ContainerRun) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if run.ready_url is None:
                    run.ready = True
                else:
                    try:
                        async with session.get(run.ready_url) as response:
                            run.ready = response.status == 200
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        run.ready = False
                await asyncio.sleep(PROBE_INTERVAL_S)

    async def _begin_stop(self, pod: LocalPod) -> None:
        pod.stopping = True
        await self._report_pod(pod, force=True)
        asyncio.get_running_loop().create_task(self._stop_pod(pod))

    async def _stop_pod(self, pod: LocalPod) -> None:
        pod.stopping = True
        for run in pod.containers:
            run.ready = False
        await asyncio.gather(*(_stop_process(run.process) for run in pod.containers))
        if pod.supervisor is not None:
            pod.supervisor.cancel()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await self._api.request(
                "DELETE", f"/api/v1/namespaces/{self._namespace}/pods/{pod.name}"
            )
        self._pods.pop(pod.name, None)
        logger.info("pod %s deleted", pod.name)

    async def _report_pod(self, pod: LocalPod, *, force: bool = False) -> None:
        now = _now()
        ready = pod.ready
        phase = "Pending" if pod.unsupported else "Running"
        container_statuses = [
            {
                "name": run.name,
                "ready": run.ready,
                "restartCount": run.restarts,
                "started": run.process is not None and run.process.returncode is None,
            }
            for run in pod.containers
        ]
        summary = json.dumps([ready, phase, container_statuses, pod.stopping])
        if summary == pod.reported and not force:
            return
        pod.reported = summary
        status: dict[str, Any] = {
            "phase": phase,
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "lastTransitionTime": now,
                },
                {
                    "type": "ContainersReady",
                    "status": "True" if ready else "False",
                    "lastTransitionTime": now,
                },
            ],
            "containerStatuses": container_statuses,
        }
        if pod.unsupported:
            status["reason"] = "UnsupportedCommand"
            status["message"] = pod.unsupported
        patch: dict[str, Any] = {"status": status}
        if pod.stopping:
            # What the API server would set on delete; discovery drops such pods at once.
            patch["metadata"] = {"deletionTimestamp": now}
            await self._api.request(
                "PATCH",
                f"/api/v1/namespaces/{self._namespace}/pods/{pod.name}",
                body={"metadata": patch["metadata"]},
                content_type="application/merge-patch+json",
            )
        await self._api.request(
            "PATCH",
            f"/api/v1/namespaces/{self._namespace}/pods/{pod.name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def _report_deployment(self, *, deployment: Mapping[str, Any], digest: str) -> None:
        name = deployment["metadata"]["name"]
        pods = [p for p in self._pods.values() if p.deployment == name and not p.stopping]
        updated = [p for p in pods if p.template_hash == digest]
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": sum(p.ready for p in pods),
            "availableReplicas": sum(p.ready for p in pods),
        }
        if all((deployment.get("status") or {}).get(k) == v for k, v in status.items()):
            return
        await self._api.request(
            "PATCH",
            f"/apis/apps/v1/namespaces/{self._namespace}/deployments/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )


@dataclass(frozen=True, slots=True)
class DataVolume:
    """A ConfigMap or Secret volume: where its files go, and which keys under what names."""

    resource: str  # "configmaps" or "secrets"
    name: str
    folder: pathlib.Path
    items: Mapping[str, str]  # key -> file name; empty: every key under its own name


def config_volume_folders(
    *, pod_spec: Mapping[str, Any], pod_dir: pathlib.Path
) -> dict[str, DataVolume]:
    """A folder per ConfigMap or Secret volume; its files are written before the containers
    start."""
    folders: dict[str, DataVolume] = {}
    for volume in pod_spec.get("volumes") or []:
        if volume.get("configMap"):
            resource, source = "configmaps", volume["configMap"]
            name = str(source["name"])
        elif volume.get("secret"):
            resource, source = "secrets", volume["secret"]
            name = str(source["secretName"])
        else:
            continue
        folder = pod_dir / "volumes" / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        items = {str(item["key"]): str(item["path"]) for item in source.get("items") or []}
        folders[volume["name"]] = DataVolume(resource, name, folder, items)
    return folders


def _probe_url(container: Mapping[str, Any], *, ports: Mapping[int, int]) -> str | None:
    probe = (container.get("readinessProbe") or {}).get("httpGet")
    if not probe:
        return None
    port = probe.get("port")
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
        if port not in named:
            return None
        number = named[port]
    else:
        number = int(port)
    # `ports` maps template ports to host ports; the container's ports are already rewritten.
    host_port = ports.get(number, number)
    return f"http://127.0.0.1:{host_port}{probe.get('path', '/')}"


def _remap_mount(token: str, mount_paths: Mapping[str, pathlib.Path]) -> str:
    for mount_path, folder in mount_paths.items():
        if token == mount_path or token.startswith(mount_path.rstrip("/") + "/"):
            return str(folder) + token[len(mount_path.rstrip("/")) :]
    return token


async def _stop_process(process: asyncio.subprocess.Process | None) -> None:
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twinroute.testing.kubelet")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--selector", default="", help="only Deployments with these labels")
    parser.add_argument("--work-dir", required=True, help="pod folders and container logs")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        url = api_url_from_kubeconfig(args.kubeconfig)
    except (OSError, KeyError, UnsupportedPodError) as error:
        print(f"kubelet: {error}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        timeout = aiohttp.ClientTimeout(total=10.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            kubelet = LocalKubelet(
                api=ApiClient(base_url=url, session=session),
                namespace=args.namespace,
                selector=args.selector,
                work_dir=pathlib.Path(args.work_dir),
            )
            print(f"kubelet watching {url} namespace {args.namespace}", flush=True)
            await kubelet.run(stop=stop)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
