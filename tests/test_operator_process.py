"""`twinroute operator` as a user runs it: a separate process with a kubeconfig, against the
local API server also run as a process (`python -m twinroute.testing.kube`)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

NS = "serving"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Any, *, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return 0, None


@pytest.fixture
def api_server(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    ready, kubeconfig = tmp_path / "url", tmp_path / "kubeconfig"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twinroute.testing.kube",
            "--ready-file",
            str(ready),
            "--kubeconfig",
            str(kubeconfig),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: ready.exists() and ready.read_text().strip(), what="API server")
        yield ready.read_text().strip(), kubeconfig
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_operator_process_serves_liveness_and_reconciles(
    api_server: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    url, kubeconfig = api_server
    liveness = free_port()
    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twinroute",
            "operator",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            NS,
            "--liveness-host",
            "127.0.0.1",
            "--liveness-port",
            str(liveness),
            "--scheduler-image",
            "twinroute:test",
            "--resync-s",
            "60",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": "/nonexistent"},
    )
    try:
        wait_for(
            lambda: http("GET", f"http://127.0.0.1:{liveness}/healthz")[0] == 200,
            what="liveness endpoint",
        )
        pools = f"{url}/apis/twinroute.io/v1alpha1/namespaces/{NS}/modelpools"
        status, _ = http(
            "POST",
            pools,
            {
                "apiVersion": "twinroute.io/v1alpha1",
                "kind": "ModelPool",
                "metadata": {"name": "chat", "namespace": NS},
                "spec": {"model": {"name": "m"}, "roles": {"unified": {"replicas": 1}}},
            },
        )
        assert status == 200
        deployment = f"{url}/apis/apps/v1/namespaces/{NS}/deployments/chat-unified"
        wait_for(lambda: http("GET", deployment)[0] == 200, what="engine Deployment")
        _, probe = http("GET", f"http://127.0.0.1:{liveness}/healthz")
        # kopf caches probe results for 10 s, so only the probe's presence is checked here.
        assert "reconciles" in probe
    finally:
        operator.terminate()
        assert operator.wait(timeout=20) is not None
        log.close()
    assert "Traceback" not in (tmp_path / "operator.log").read_text()
