"""End to end on a real Kubernetes cluster (kind or any context you name).

    TWINROUTE_E2E_CONTEXT=kind-twinroute \
    TWINROUTE_E2E_IMAGE=ghcr.io/twinroute/twinroute:0.1.0 \
    .venv/bin/pytest e2e/test_real_cluster.py -v

It refuses to run unless the kubeconfig's current context is exactly TWINROUTE_E2E_CONTEXT
(so a forgotten production context is never touched), then, in a fresh namespace: installs the
chart (operator watching that namespace only), applies the engine-simulator sample with the
given image, waits for the pool to be Ready, sends traffic through the pool's router and checks
that requests with a shared prefix stick to one engine, scales the pool through the scale
subresource, deletes it and checks the children are gone. On failure it prints pods, events
and logs. It always uninstalls and deletes the namespace. For kind, load the image first:
`docker build -t IMAGE . && kind load docker-image IMAGE --name twinroute`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = os.environ.get("TWINROUTE_E2E_CONTEXT", "")
IMAGE = os.environ.get("TWINROUTE_E2E_IMAGE", "ghcr.io/twinroute/twinroute:0.1.0")
TIMEOUT_S = int(os.environ.get("TWINROUTE_E2E_TIMEOUT", "300"))

pytestmark = pytest.mark.skipif(
    not CONTEXT,
    reason="no cluster configured: set TWINROUTE_E2E_CONTEXT to the kube context to use "
    "(e.g. kind-twinroute) and TWINROUTE_E2E_IMAGE to an image the cluster can pull",
)


def tool(name: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    if not local.exists():
        subprocess.run(["bash", str(ROOT / "tools" / "fetch_k8s_tools.sh")], check=True)
    return str(local)


def kubectl(*args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        [tool("kubectl"), "--context", CONTEXT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def helm(*args: str) -> str:
    result = subprocess.run(
        [tool("helm"), "--kube-context", CONTEXT, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def refuse_unexpected_context() -> None:
    current = subprocess.run(
        [tool("kubectl"), "config", "current-context"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    if current != CONTEXT:
        pytest.fail(
            f"refusing to run: current kube context is {current!r}, but "
            f"TWINROUTE_E2E_CONTEXT={CONTEXT!r}; switch contexts deliberately first"
        )


def dump(namespace: str) -> None:
    """What a person needs to see when the scenario fails."""
    print(f"===== pods in {namespace}")
    print(kubectl("get", "pods,deploy,svc,mp", "-n", namespace, "-o", "wide", check=False))
    print(f"===== events in {namespace}")
    print(kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False))
    print("===== modelpools")
    print(kubectl("get", "mp", "-n", namespace, "-o", "yaml", check=False))
    pods = kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).split()
    for pod in pods:
        print(f"===== logs {pod}")
        print(kubectl("logs", "-n", namespace, pod, "--all-containers", "--tail=200", check=False))


@pytest.fixture
def installed() -> Iterator[str]:
    refuse_unexpected_context()
    namespace = f"twinroute-e2e-{secrets.token_hex(3)}"
    repository, _, tag = IMAGE.rpartition(":")
    kubectl("create", "namespace", namespace)
    try:
        helm(
            "install",
            "twinroute-e2e",
            str(ROOT / "charts" / "twinroute"),
            "--namespace",
            namespace,
            "--set",
            f"image.repository={repository}",
            "--set",
            f"image.tag={tag}",
            "--set",
            f"watchNamespaces={{{namespace}}}",
            "--set",
            "operator.resyncSeconds=5",
            "--wait",
            "--timeout",
            f"{TIMEOUT_S}s",
        )
        yield namespace
    except BaseException:
        dump(namespace)
        raise
    finally:
        subprocess.run(
            [
                tool("helm"),
                "--kube-context",
                CONTEXT,
                "uninstall",
                "twinroute-e2e",
                "--namespace",
                namespace,
            ],
            capture_output=True,
            timeout=TIMEOUT_S,
        )
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def wait_for(what: str, check: Any, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def pool(namespace: str) -> dict[str, Any]:
    text = kubectl("get", "mp", "sim", "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(text)) if text else {}


@contextlib.contextmanager
def port_forward(namespace: str, service: str, port: int) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            tool("kubectl"),
            "--context",
            CONTEXT,
            "port-forward",
            "-n",
            namespace,
            "--address",
            "127.0.0.1",
            f"svc/{service}",
            f"{local}:{port}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # "Forwarding from 127.0.0.1:..."
        yield f"http://127.0.0.1:{local}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def complete(base: str, prompt: str) -> tuple[int, str]:
    body = json.dumps({"model": "twinroute-sim", "prompt": prompt, "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.status, answer.headers.get("x-twinroute-instance", "")


def test_pool_comes_up_routes_scales_and_cleans_up(installed: str) -> None:
    namespace = installed
    sample = yaml.safe_load(
        (ROOT / "manifests" / "samples" / "modelpool-simulator.yaml").read_text()
    )
    sample["spec"]["engine"]["image"] = IMAGE
    sample["spec"]["scheduler"] = {"image": IMAGE}
    subprocess.run(
        [tool("kubectl"), "--context", CONTEXT, "apply", "-n", namespace, "-f", "-"],
        input=yaml.safe_dump(sample),
        text=True,
        check=True,
        timeout=60,
    )
    wait_for(
        "the pool to be Ready", lambda: pool(namespace).get("status", {}).get("phase") == "Ready"
    )
    status = pool(namespace)["status"]
    assert status["roles"]["unified"] == {"desired": 2, "ready": 2, "updated": 2}
    assert len(status["endpoints"]) == 2
    assert "sim" in kubectl("get", "mp", "-n", namespace)

    shared = "You are a helpful assistant. " * 200
    with port_forward(namespace, "sim", 8080) as base:
        answers = [complete(base, shared + f"question {i}") for i in range(12)]
    assert all(status_code == 200 for status_code, _ in answers)
    instances = {instance for _, instance in answers}
    assert len(instances) == 1, f"a shared prefix should stick to one engine: {instances}"

    kubectl("scale", "mp/sim", "-n", namespace, "--replicas=1")
    wait_for(
        "scale-in to one engine",
        lambda: (
            kubectl(
                "get",
                "deploy",
                "sim-unified",
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.replicas}",
                check=False,
            ).strip()
            == "1"
        ),
    )

    kubectl("delete", "mp", "sim", "-n", namespace, f"--timeout={TIMEOUT_S}s")
    wait_for(
        "children to be removed",
        lambda: (
            not kubectl(
                "get",
                "deploy,svc,cm",
                "-n",
                namespace,
                "-l",
                "twinroute.io/pool=sim",
                "-o",
                "name",
                check=False,
            ).strip()
        ),
    )
