"""A local Kubernetes API server for tests and the one-machine end-to-end run.

kmock's `KubernetesEmulator` stores objects and serves list/watch/get, but on its own it cannot
carry kopf or kubectl: it sets no `uid`, `resourceVersion` or `generation`, applies every PATCH
as a dict merge (kopf removes finalizers with a JSON patch whose `test` op checks
`/metadata/resourceVersion`), ignores label selectors, and has no `generateName`. This subclass
adds exactly those API-server behaviours:

- create: `uid`, `resourceVersion`, `generation: 1`, `creationTimestamp`, `generateName`;
- patch: JSON patch (a failed `test` answers 422), merge patch (strategic merge is treated as a
  merge patch), PUT replaces; a `/status` patch changes only `.status`, a patch of the object
  itself never changes `.status`; `generation` moves when anything but metadata/status changes;
- list/watch: `labelSelector` (equality, `!=`, `in`, `notin`, existence);
- discovery of the resource kinds twinroute, kopf and kubectl touch.

- the cluster-scoped `namespaces` resource (kmock's path parser cannot address it);
- a watch resumed from a `resourceVersion` replays the deletions after it too (kmock's bus
  keeps no history, so they are logged here);
- `api_calls()`: every request so far as RBAC sees it (who, verb, group, resource), so tests
  can compare what each component really calls with the roles the chart grants it;
- fault injection: `drop_watches()` ends every open watch stream (a cut connection or a clean
  server-side end) and `answer_gone()` answers the next watches that resume from a version
  with `410 Gone`, as after an etcd compaction, so clients must relist.

Namespaces are stored objects only: nothing requires one to exist before objects are put in it.
There is no garbage collector and no controllers: Deployments never get pods by themselves.

Run it as a process: `python -m twinroute.testing.kube --port 0 --ready-file PATH` writes the
URL into PATH once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import pathlib
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import parsing, rendering
from typing_extensions import override

# (key "group/version/plural" or "version/plural", kind, namespaced, subresources, short names)
RESOURCES: tuple[tuple[str, str, bool, tuple[str, ...], tuple[str, ...]], ...] = (
    ("v1/namespaces", "Namespace", False, ("status",), ("ns",)),
    ("v1/pods", "Pod", True, ("status",), ("po",)),
    ("v1/services", "Service", True, ("status",), ("svc",)),
    ("v1/configmaps", "ConfigMap", True, (), ("cm",)),
    ("v1/secrets", "Secret", True, (), ()),
    ("v1/serviceaccounts", "ServiceAccount", True, (), ("sa",)),
    ("v1/events", "Event", True, (), ("ev",)),
    ("apps/v1/deployments", "Deployment", True, ("status", "scale"), ("deploy",)),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True, ("status",), ("pdb",)),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True, (), ()),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True, (), ()),
    ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False, (), ()),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False, (), ()),
    (
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("status",),
        ("crd", "crds"),
    ),
    ("monitoring.coreos.com/v1/servicemonitors", "ServiceMonitor", True, (), ("smon",)),
    ("twinroute.io/v1alpha1/modelpools", "ModelPool", True, ("status", "scale"), ("mp",)),
    # The Gateway API Inference Extension's, as a cluster that installed its CRDs has it.
    (
        "inference.networking.k8s.io/v1/inferencepools",
        "InferencePool",
        True,
        ("status",),
        ("infpool",),
    ),
)
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(?:/([^/]+))?(?:/(status|finalize))?")
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")


@attrs.define(kw_only=True)
class KubeApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus what kopf and kubectl need from an API server (see module doc)."""

    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _names: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # (resourceVersion of the deletion, resource, the object as last stored)
    _deletions: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)
    # Fault injection; touched from test threads, so guarded by a thread lock.
    _fault_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _open_watches: dict[int, _OpenWatch] = attrs.field(factory=dict, init=False)
    _watch_ids: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _gone_pending: int = attrs.field(default=0, init=False)
    gone_sent: int = attrs.field(default=0, init=False)
    watches_dropped: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, kind, namespaced, subresources, shortnames in RESOURCES:
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=set(VERBS),
                subresources=set(subresources),
                shortnames=set(shortnames),
            )

    @override
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser reads `/api/v1/namespaces/NAME` as a namespace prefix; the
        # cluster-scoped `namespaces` resource is parsed here instead.
        match = _NAMESPACES_PATH.fullmatch(raw_request.path.rstrip("/"))
        if match is None:
            return await super().__call__(raw_request)
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        name, subresource = match.group(1), match.group(2)
        parsed = parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
        request = rendering.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url,
            method=raw_request.method, params=dict(raw_request.query),
            headers=dict(raw_request.headers), cookies=dict(raw_request.cookies),
            data=data, body=body, text=body.decode(errors="replace"),
            action=parsing.guess_k8s(parsed, kmock.method(raw_request.method),
                                     dict(raw_request.query)),
            resource=kmock.resource(group="", version="v1", plural="namespaces"),
            namespace=None, name=name, subresource=subresource,
        )  # fmt: skip
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as error:  # the API answers every failure as a Status object
            return await self._render_error(error)

    def next_version(self) -> str:
        return str(next(self._versions))

    def api_calls(self) -> list[ApiCall]:
        """Every resource request so far, as RBAC authorizes it; discovery is left out (any
        authenticated user may read it)."""
        calls = []
        for request in list(self._requests):
            if request.resource is None or not request.resource.plural:
                continue  # discovery (/api, /apis/GROUP/VERSION): not a resource request
            authorization = str(request.headers.get("Authorization", ""))
            scheme, _, token = authorization.partition(" ")
            calls.append(
                ApiCall(
                    user=token.strip() if scheme.lower() == "bearer" else "",
                    verb=_rbac_verb(request),
                    group=str(request.resource.group or ""),
                    resource=str(request.resource.plural)
                    + (f"/{request.subresource}" if request.subresource else ""),
                    namespace=request.namespace,
                    name=request.name,
                )
            )
        return calls

    def open_watch_count(self) -> int:
        with self._fault_lock:
            return len(self._open_watches)

    def drop_watches(self, *, reset: bool = True) -> int:
        """End every open watch stream now; returns how many. `reset` cuts the connection
        mid-stream (a dying API server or load balancer), otherwise the stream ends cleanly as
        on a server-side timeout. Thread-safe."""
        with self._fault_lock:
            watches = list(self._open_watches.values())
            self.watches_dropped += len(watches)
        for watch in watches:
            watch.loop.call_soon_threadsafe(watch.end, reset)
        return len(watches)

    def answer_gone(self, *, count: int = 1) -> None:
        """The next `count` watches that resume from a resourceVersion get `410 Gone` (the
        version was compacted away), as a real API server answers after a long gap."""
        with self._fault_lock:
            self._gone_pending += count

    def stored(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A copy of one stored object, or None (for assertions in tests)."""
        for (res, ns, nm), obj in list(self.objects.items()):
            if _resource_key(res) == resource and ns == namespace and nm == name:
                return None if obj.deleted else copy.deepcopy(obj.raw)
        return None

    def stored_all(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        found = []
        for (res, ns, _), obj in list(self.objects.items()):
            wanted = namespace is None or ns == namespace
            if _resource_key(res) == resource and not obj.deleted and wanted:
                found.append(copy.deepcopy(obj.raw))
        return found

    def put_object(self, resource: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object as if created through the API (tests use it for pods); not
        thread-safe against concurrent writes to the same object."""
        obj = copy.deepcopy(dict(body))
        metadata = obj.setdefault("metadata", {})
        self._fill_created(metadata)
        self.objects[resource, metadata.get("namespace"), metadata["name"]] = obj
        return obj

    def _fill_created(self, metadata: dict[str, Any]) -> None:
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = f"{metadata['generateName']}{next(self._names):05x}"
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _now())
        metadata["generation"] = 1
        metadata["resourceVersion"] = self.next_version()

    @override
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (
            (request.resource, request.namespace, str(request.name))
            if request.resource is not None and request.name is not None
            else None
        )
        was_live = key is not None and self._is_live(key)
        try:
            return await self._handle_change(request)
        finally:
            if key is not None and was_live and not self._is_live(key):
                stored = self._objects[key]
                version = next(self._versions)
                last = copy.deepcopy(stored.last.raw)
                last.setdefault("metadata", {})["resourceVersion"] = str(version)
                self._deletions.append((version, key[0], last))

    def _is_live(self, key: tuple[Any, str | None, str]) -> bool:
        return key in self._objects and not self._objects[key].deleted

    async def _handle_change(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action == kmock.action.CREATE:
            if isinstance(request.data, dict):
                metadata = request.data.setdefault("metadata", {})
                if request.namespace and not metadata.get("namespace"):
                    metadata["namespace"] = request.namespace
                self._fill_created(metadata)
        elif (
            request.resource is not None
            and request.action == kmock.action.UPDATE
            and request.name is not None
        ):
            return await self._update(request)
        return await super()._handle(request)

    async def _update(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        key = (request.resource, request.namespace, str(request.name))
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            stored = self.objects[key]
            old = copy.deepcopy(stored.raw)
            changed = _apply_change(old, request)
            if request.subresource == "status":
                new = {**old, "status": changed.get("status")}
            elif request.subresource in (None, ""):
                # The object's own endpoint never changes its status (as with a subresource).
                new = dict(changed)
                new.pop("status", None)
                if "status" in old:
                    new["status"] = old["status"]
            else:
                raise kmock.KubernetesError(
                    status=405,
                    reason="MethodNotAllowed",
                    message=f"subresource {request.subresource!r}",
                )
            if new.get("status") is None:
                new.pop("status", None)
            metadata = new.setdefault("metadata", {})
            for immutable in ("name", "namespace", "uid", "creationTimestamp"):
                if immutable in old.get("metadata", {}):
                    metadata[immutable] = old["metadata"][immutable]
            if new != old:
                if _body_without(new) != _body_without(old):
                    metadata["generation"] = int(old["metadata"].get("generation", 1)) + 1
                metadata["resourceVersion"] = self.next_version()
                stored.history.append(new)
                gone = metadata.get("deletionTimestamp") and not metadata.get("finalizers")
                if gone:
                    stored.delete()
                await self._buses[request.resource].put(
                    {"type": "DELETED" if gone else "MODIFIED", "object": copy.deepcopy(new)}
                )
        return aiohttp.web.json_response(new)

    @override
    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        answer = await super()._serve_version(request)
        assert isinstance(answer, dict)
        # The core group's version is "v1", not "/v1"; subresources have no short names.
        answer["groupVersion"] = str(answer["groupVersion"]).lstrip("/")
        for entry in answer["resources"]:
            if "/" in entry["name"]:
                entry["shortNames"], entry["singularName"] = [], ""
                if entry["name"].endswith("/scale"):
                    entry["kind"] = "Scale"
        return answer

    @override
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        answer = await super()._serve_list(request)
        assert isinstance(answer, dict) and request.resource is not None
        selector = LabelSelector.parse(request.params.get("labelSelector", ""))
        fields = _field_selector(request.params.get("fieldSelector", ""))
        items = [
            item
            for item in answer["items"]
            if selector.matches(item) and _fields_match(item, fields)
        ]
        version = str(next(self._versions))
        if _wants_table(request):
            return self._table(request, items, version=version)
        info = self.resources[request.resource]
        group = request.resource.group
        return {
            "apiVersion": f"{group}/{request.resource.version}"
            if group
            else str(request.resource.version),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    @override
    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        answer = await super()._serve_fetch(request)
        if _wants_table(request) and isinstance(answer, dict):
            return self._table(request, [answer], version=str(next(self._versions)))
        return answer

    def _table(
        self, request: rendering.Request, items: list[dict[str, Any]], *, version: str
    ) -> dict[str, Any]:
        """`kubectl get` asks for server-side printing: Name, the CRD's printer columns (when
        the resource is a stored CRD), Age."""
        assert request.resource is not None
        columns: list[dict[str, Any]] = []
        crd = self.stored(
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            None,
            f"{request.resource.plural}.{request.resource.group}",
        )
        for served in (crd or {}).get("spec", {}).get("versions", []):
            if served.get("name") == request.resource.version:
                columns = [
                    c for c in served.get("additionalPrinterColumns", []) if not c.get("priority")
                ]
        if not any(c["jsonPath"] == ".metadata.creationTimestamp" for c in columns):
            columns.append(
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
            )
        definitions = [
            {"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}
        ]
        definitions += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": "",
                "description": c.get("description", ""),
                "priority": 0,
            }
            for c in columns
        ]
        rows = []
        for item in items:
            cells: list[Any] = [item["metadata"]["name"]]
            for column in columns:
                value = _json_path(item, column["jsonPath"])
                cells.append(_age(value) if column.get("type") == "date" and value else value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": item["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": version},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    @override
    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """Replay what exists (or, from a list's `resourceVersion`, what changed since), then
        stream changes. Unlike kmock's own, the bus position is taken under the same lock as
        the snapshot, so an object created between the two is neither lost nor doubled."""
        assert request.resource is not None
        selector = LabelSelector.parse(request.params.get("labelSelector", ""))
        fields = _field_selector(request.params.get("fieldSelector", ""))

        def wanted(obj: Mapping[str, Any]) -> bool:
            namespace = (obj.get("metadata") or {}).get("namespace")
            in_scope = request.namespace is None or namespace == request.namespace
            return in_scope and selector.matches(obj) and _fields_match(obj, fields)

        since = request.params.get("resourceVersion", "")
        resuming = since.isdigit() and int(since) > 0
        with self._fault_lock:
            gone = resuming and self._gone_pending > 0
            if gone:
                self._gone_pending -= 1
                self.gone_sent += 1
        yield b""  # headers out: the stream is open even when nothing happens
        if gone:
            yield {
                "type": "ERROR",
                "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "code": 410, "reason": "Expired",
                           "message": f"too old resource version: {since}"},
            }  # fmt: skip
            return
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            existing = [
                copy.deepcopy(obj.raw)
                for (res, _, _), obj in list(self.objects.items())
                if res == request.resource and not obj.deleted
            ]
            deletions = [
                copy.deepcopy(obj)
                for version, res, obj in self._deletions
                if res == request.resource and resuming and version > int(since)
            ]
        replay: list[dict[str, Any]] = [{"type": "ADDED", "object": obj} for obj in existing]
        if resuming:
            # Watching from a list's version: only what changed after it (as the API does),
            # deletions included, in version order.
            replay = [
                event
                for event in replay
                if int(event["object"].get("metadata", {}).get("resourceVersion") or 0) > int(since)
            ]
            replay += [{"type": "DELETED", "object": obj} for obj in deletions]
            replay.sort(key=lambda event: int(event["object"]["metadata"]["resourceVersion"]))
        watch = _OpenWatch(
            loop=asyncio.get_running_loop(), ended=asyncio.Event(), raw_request=request._raw_request
        )
        with self._fault_lock:
            watch_id = next(self._watch_ids)
            self._open_watches[watch_id] = watch
        stream = aiter(bus.stream(since=mark))
        try:
            for event in replay:
                if wanted(event["object"]):
                    yield event
            while not watch.ended.is_set():
                event = await _next_unless(stream, watch.ended)
                if event is not None and wanted(event.get("object") or {}):
                    yield event
        finally:
            with self._fault_lock:
                self._open_watches.pop(watch_id, None)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
            await bus.unmark(mark)
        if watch.reset and request._raw_request is not None:
            transport = request._raw_request.transport
            if transport is not None:
                transport.abort()


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiCall:
    """One API request as RBAC sees it. `user` is the bearer token the client sent (tests give
    each component its own token, as each has its own ServiceAccount in a cluster)."""

    user: str
    verb: str
    group: str
    resource: str  # plural, with "/subresource" when there is one
    namespace: str | None
    name: str | None


def _rbac_verb(request: rendering.Request) -> str:
    method = str(getattr(request.method, "value", request.method)).upper()
    if method == "GET":
        if request.name:
            return "get"
        watching = str(request.params.get("watch", "")).lower() in ("true", "1")
        return "watch" if watching else "list"
    collection = {"DELETE": "deletecollection"}
    if not request.name and method in collection:
        return collection[method]
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


@dataclass(slots=True, kw_only=True)
class _OpenWatch:
    loop: asyncio.AbstractEventLoop
    ended: asyncio.Event
    raw_request: Any
    reset: bool = False

    def end(self, reset: bool) -> None:
        self.reset = reset
        self.ended.set()


async def _next_unless(stream: AsyncIterator[Any], ended: asyncio.Event) -> Any:
    """The stream's next item, or None once `ended` is set first."""
    step = asyncio.ensure_future(anext(stream))
    waiter = asyncio.ensure_future(ended.wait())
    try:
        done, _ = await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # The watch itself is going away (client gone): take the pending read with it, before
        # the caller releases the bus position that read uses.
        step.cancel()
        with contextlib.suppress(BaseException):
            await step
        raise
    finally:
        waiter.cancel()
    if ended.is_set():
        # The drop wins over an event that arrived at the same moment: the client sees it
        # again when it resumes from its last version, as from a real API server.
        step.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await step
        return None
    if step in done:
        return step.result()
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await step
    return None


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _json_path(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.strip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _age(timestamp: str) -> str:
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return timestamp
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _resource_key(resource: Any) -> str:
    group = resource.group
    return (
        f"{group}/{resource.version}/{resource.plural}"
        if group
        else f"{resource.version}/{resource.plural}"
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body_without(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _apply_change(old: dict[str, Any], request: rendering.Request) -> dict[str, Any]:
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    data = request.data
    if request.method == kmock.method.PUT:
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="not an object")
        expected = (data.get("metadata") or {}).get("resourceVersion")
        if expected and expected != old["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )
        return copy.deepcopy(data)
    if content_type == "application/json-patch+json":
        if not isinstance(data, list):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="a JSON patch must be a list"
            )
        return json_patch(old, data)
    if content_type in (
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json",
        "",
    ):
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="not an object")
        merged = merge_patch(old, data)
        assert isinstance(merged, dict)
        return merged
    raise kmock.KubernetesError(
        status=415,
        reason="UnsupportedMediaType",
        message=f"patch type {content_type!r} is not supported",
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(document: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """RFC 6902 (add, remove, replace, test, move, copy); a failed `test` answers 422."""
    result = copy.deepcopy(document)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            if _pointer_get(result, path) != op.get("value"):
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=f"test operation failed at {path}"
                )
        elif kind in ("add", "replace"):
            result = _pointer_set(
                result, path, copy.deepcopy(op.get("value")), insert=kind == "add"
            )
        elif kind == "remove":
            result = _pointer_remove(result, path)
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_pointer_get(result, op.get("from", "")))
            if kind == "move":
                result = _pointer_remove(result, op.get("from", ""))
            result = _pointer_set(result, path, value, insert=True)
        else:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"unknown JSON patch op {kind!r}"
            )
    return result


_MISSING = object()


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    return [t.replace("~1", "/").replace("~0", "~") for t in path.lstrip("/").split("/")]


def _pointer_get(doc: Any, path: str) -> Any:
    for token in _tokens(path):
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return _MISSING
    return doc


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    tokens = _tokens(path)
    if not tokens:
        raise kmock.KubernetesError(status=422, reason="Invalid", message="empty path")
    parent = (
        _pointer_get(
            doc, "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens[:-1])
        )
        if len(tokens) > 1
        else doc
    )
    if parent is _MISSING or not isinstance(parent, dict | list):
        raise kmock.KubernetesError(status=422, reason="Invalid", message=f"no parent of {path}")
    return parent, tokens[-1]


def _pointer_set(doc: Any, path: str, value: Any, *, insert: bool) -> Any:
    if path == "":
        return value
    parent, token = _parent(doc, path)
    if isinstance(parent, list):
        index = len(parent) if token == "-" else int(token)
        if insert:
            parent.insert(index, value)
        else:
            parent[index] = value
    else:
        if not insert and token not in parent:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"no {path}")
        parent[token] = value
    return doc


def _pointer_remove(doc: Any, path: str) -> Any:
    parent, token = _parent(doc, path)
    try:
        if isinstance(parent, list):
            del parent[int(token)]
        else:
            del parent[token]
    except (KeyError, IndexError, ValueError) as error:
        raise kmock.KubernetesError(
            status=422, reason="Invalid", message=f"cannot remove {path}"
        ) from error
    return doc


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed `labelSelector` query: every requirement must hold."""

    requirements: tuple[tuple[str, str, frozenset[str]], ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        requirements = []
        for term in _split_terms(text):
            match = re.fullmatch(r"\s*(\S+?)\s+(in|notin)\s+\(([^)]*)\)\s*", term)
            if match:
                values = frozenset(v.strip() for v in match.group(3).split(",") if v.strip())
                requirements.append((match.group(1), match.group(2), values))
                continue
            match = re.fullmatch(r"\s*([^!=\s]+)\s*(==|!=|=)\s*(\S*)\s*", term)
            if match:
                op = "!=" if match.group(2) == "!=" else "="
                requirements.append((match.group(1), op, frozenset([match.group(3)])))
                continue
            match = re.fullmatch(r"\s*(!?)\s*(\S+)\s*", term)
            if not match:
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message=f"unable to parse requirement {term!r}"
                )
            requirements.append((match.group(2), "!" if match.group(1) else "exists", frozenset()))
        return cls(tuple(requirements))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        object_labels = (obj.get("metadata") or {}).get("labels") or {}
        for key, op, values in self.requirements:
            present = key in object_labels
            value = object_labels.get(key)
            ok = {
                "=": present and value in values,
                "in": present and value in values,
                "!=": not present or value not in values,
                "notin": not present or value not in values,
                "exists": present,
                "!": not present,
            }[op]
            if not ok:
                return False
        return True


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current += char
    if current.strip():
        terms.append(current)
    return [t for t in terms if t.strip()]


def _field_selector(text: str) -> dict[str, str]:
    pairs = {}
    for term in _split_terms(text):
        key, _, value = term.partition("=")
        pairs[key.strip()] = value.lstrip("=").strip()
    return pairs


def _fields_match(obj: Mapping[str, Any], fields: Mapping[str, str]) -> bool:
    for path, expected in fields.items():
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if str(value if value is not None else "") != expected:
            return False
    return True


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    api: KubeApiServer


@contextlib.contextmanager
def api_server_in_thread(*, port: int = 0) -> Iterator[RunningServer]:
    """Serve a fresh `KubeApiServer` on 127.0.0.1 from its own thread and event loop."""
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), stop
        async with KubeApiServer() as api, kmock.Server(api, port=port) as server:
            holder["running"] = RunningServer(url=f"http://127.0.0.1:{server.port}", api=api)
            started.set()
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        finally:
            started.set()

    thread = threading.Thread(target=main, name="kube-api-server", daemon=True)
    thread.start()
    started.wait(timeout=30)
    if "running" not in holder:
        raise RuntimeError("the local Kubernetes API server did not start")
    try:
        yield holder["running"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(timeout=30)


def write_kubeconfig(*, path: str, url: str, namespace: str = "default") -> None:
    """A kubeconfig for kubectl and the Kubernetes client pointing at `url` (no auth)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": url}}],
        "users": [{"name": "local", "user": {"token": "local"}}],
        "contexts": [
            {
                "name": "local",
                "context": {"cluster": "local", "user": "local", "namespace": namespace},
            }
        ],
        "current-context": "local",
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Kubernetes API server (kmock-based).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default=None, help="write the URL here once listening")
    parser.add_argument("--kubeconfig", default=None, help="also write a kubeconfig here")
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with KubeApiServer() as api, kmock.Server(api, port=args.port) as server:
            url = f"http://127.0.0.1:{server.port}"
            if args.kubeconfig:
                write_kubeconfig(path=args.kubeconfig, url=url)
            if args.ready_file:
                await asyncio.to_thread(
                    pathlib.Path(args.ready_file).write_text, url + "\n", encoding="utf-8"
                )
            print(url, flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
