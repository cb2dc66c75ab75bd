"""The pool's engine pods, watched with the official Kubernetes client.

An endpoint is a pod that matches the label selector, is Ready, has a pod IP and carries no
deletion timestamp (a terminating pod leaves at once, before its grace period ends). Labels
carry the pool, role and model (`twinroute.labels`); the served model name comes from the
`twinroute.io/served-model` annotation when present (label values cannot hold every name), the
port from the container port named `http`, else the `twinroute.io/engine-port` annotation,
else `default_port`. Pods with the scheduler role are never endpoints.

Steps: list (a full snapshot and a resourceVersion), then watch from that version; every event
updates the pod table and a snapshot is emitted when the endpoint set changes. A watch that
ends (server timeout, dropped connection) resumes from the last version seen; `410 Gone` (the
version was compacted away) relists. Failures back off exponentially up to `max_backoff_s`.

The official client is blocking, so list and watch run in one worker thread that hands
snapshots to the event loop; `snapshots()` owns that thread and stops it (closing the open
watch response) when the consumer stops iterating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import watch as k8s_watch
from twinroute.scheduler.types import Endpoint, Role

from twinroute.labels import (
    ENGINE_PORT_ANNOTATION,
    ENGINE_PORT_NAME,
    MODEL_LABEL,
    POOL_LABEL,
    ROLE_LABEL,
    SCHEDULER_ROLE,
    SERVED_MODEL_ANNOTATION,
)

logger = logging.getLogger(__name__)


def _is_ready(pod: Mapping[str, Any]) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Ready":
            return str(condition.get("status")) == "True"
    return False


def _port(pod: Mapping[str, Any], *, default_port: int) -> int:
    for container in (pod.get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            if port.get("name") == ENGINE_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    annotation = ((pod.get("metadata") or {}).get("annotations") or {}).get(ENGINE_PORT_ANNOTATION)
    if annotation and str(annotation).isdigit():
        return int(annotation)
    return default_port


def pod_endpoint(pod: Mapping[str, Any], *, default_port: int = 8000) -> Endpoint | None:
    """The endpoint a pod (as JSON) stands for, or None when it must not receive requests."""
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionTimestamp") or not _is_ready(pod):
        return None
    ip = (pod.get("status") or {}).get("podIP")
    labels: Mapping[str, str] = metadata.get("labels") or {}
    role_value = labels.get(ROLE_LABEL, Role.UNIFIED.value)
    if not ip or role_value == SCHEDULER_ROLE:
        return None
    try:
        role = Role(role_value)
    except ValueError:
        logger.warning("pod %s has unknown role %r; skipped", metadata.get("name"), role_value)
        return None
    annotations = metadata.get("annotations") or {}
    model = annotations.get(SERVED_MODEL_ANNOTATION) or labels.get(MODEL_LABEL, "")
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(
        id=str(metadata.get("name")),
        address=f"{host}:{_port(pod, default_port=default_port)}",
        role=role,
        model=str(model),
        labels={
            key: str(labels[key]) for key in (POOL_LABEL, ROLE_LABEL, MODEL_LABEL) if key in labels
        },
    )


class KubernetesSource:
    """Snapshots of the Ready pods matching `label_selector` in `namespace`."""

    def __init__(
        self,
        *,
        api_client: k8s.ApiClient,
        namespace: str,
        label_selector: str,
        default_port: int = 8000,
        watch_timeout_s: int = 300,
        read_timeout_s: float = 330.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._api = k8s.CoreV1Api(api_client)
        self._namespace = namespace
        self._selector = label_selector
        self._default_port = default_port
        self._watch_timeout_s = watch_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_backoff_s = max_backoff_s
        self._response: Any = None
        self._response_lock = threading.Lock()
        # Counters for tests and logs.
        self.lists = 0
        self.watches = 0
        self.relists_after_gone = 0

    async def snapshots(self) -> AsyncIterator[tuple[Endpoint, ...]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Endpoint, ...]] = asyncio.Queue()
        stop = threading.Event()

        def emit(snapshot: tuple[Endpoint, ...]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, snapshot)

        worker = threading.Thread(
            target=self._run, args=(emit, stop), name="kube-discovery", daemon=True
        )
        worker.start()
        try:
            while True:
                yield await queue.get()
        finally:
            stop.set()
            self._interrupt()
            await asyncio.to_thread(worker.join, 5.0)

    def _interrupt(self) -> None:
        with self._response_lock:
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()

    # -- worker thread ----------------------------------------------------------------------

    def _run(self, emit: Callable[[tuple[Endpoint, ...]], None], stop: threading.Event) -> None:
        pods: dict[str, Endpoint] = {}
        last: tuple[Endpoint, ...] | None = None
        version: str | None = None
        backoff = 0.5

        def publish() -> None:
            nonlocal last
            snapshot = tuple(pods[name] for name in sorted(pods))
            if snapshot != last:
                last = snapshot
                emit(snapshot)

        while not stop.is_set():
            try:
                if version is None:
                    pods, version = self._list()
                    publish()
                version = self._watch(pods, version, publish, stop)
                backoff = 0.5
            except _Gone:
                self.relists_after_gone += 1
                logger.info("pod watch: resourceVersion too old; relisting")
                version = None
            except ApiException as error:
                if error.status == 410:
                    self.relists_after_gone += 1
                    version = None
                    continue
                logger.warning("pod discovery failed (%s %s); retry in %.1fs",
                               error.status, error.reason, backoff)  # fmt: skip
                stop.wait(backoff)
                backoff = min(self._max_backoff_s, backoff * 2)
            except Exception as error:  # connection drops, read timeouts, bad JSON
                if stop.is_set():
                    break
                logger.warning("pod watch dropped (%s: %s); resuming in %.1fs",
                               type(error).__name__, error, backoff)  # fmt: skip
                stop.wait(backoff)
                backoff = min(self._max_backoff_s, backoff * 2)

    def _list(self) -> tuple[dict[str, Endpoint], str | None]:
        self.lists += 1
        response: Any = self._api.list_namespaced_pod(
            self._namespace,
            label_selector=self._selector,
            _preload_content=False,
            _request_timeout=(10.0, self._read_timeout_s),
        )
        body = json.loads(response.data)
        pods: dict[str, Endpoint] = {}
        for pod in body.get("items") or ():
            endpoint = pod_endpoint(pod, default_port=self._default_port)
            if endpoint is not None:
                pods[endpoint.id] = endpoint
        version = (body.get("metadata") or {}).get("resourceVersion") or None
        return pods, version

    def _watch(
        self,
        pods: dict[str, Endpoint],
        version: str | None,
        publish: Callable[[], None],
        stop: threading.Event,
    ) -> str | None:
        """Apply watch events until the stream ends; returns the last version seen."""
        self.watches += 1
        kwargs: dict[str, Any] = {}
        if version:
            kwargs["resource_version"] = version
        response: Any = self._api.list_namespaced_pod(
            self._namespace,
            label_selector=self._selector,
            watch=True,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _preload_content=False,
            _request_timeout=(10.0, self._read_timeout_s),
            **kwargs,
        )
        with self._response_lock:
            self._response = response
        try:
            if stop.is_set():
                return version
            for line in _lines(response):
                if stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                name = (obj.get("metadata") or {}).get("name")
                if not name:
                    continue
                endpoint = (
                    None
                    if kind == "DELETED"
                    else pod_endpoint(obj, default_port=self._default_port)
                )
                if endpoint is None:
                    pods.pop(name, None)
                else:
                    pods[name] = endpoint
                publish()
        finally:
            with self._response_lock:
                self._response = None
            response.release_conn()
        return version


def _lines(response: Any) -> Iterator[str]:
    lines: Iterator[str] = k8s_watch.iter_resp_lines(response)  # type: ignore[no-untyped-call]
    return lines


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""
