"""Plan: compare the rendered children with what exists and decide create/patch/delete.

Pure. An existing object is patched only when its `render-hash` annotation differs from the
rendering (so defaults the API server adds never cause a patch loop); an existing child that is
no longer rendered (e.g. the pool moved from unified to prefill/decode) is deleted. A patch that
lowers an engine Deployment's replicas carries a `ScaleIn`, so the executor drains the leaving
pods at the scheduler first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twinroute.operator.render import RENDER_HASH_ANNOTATION

from twinroute import labels

ObjectKey = tuple[str, str, str]  # (apiVersion, kind, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleIn:
    role: str
    from_replicas: int
    to_replicas: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Create:
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Patch:
    body: Mapping[str, Any]
    scale_in: ScaleIn | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    api_version: str
    kind: str
    name: str
    namespace: str


Action = Create | Patch | Delete


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not self.actions

    def summary(self) -> str:
        counts = {"create": 0, "patch": 0, "delete": 0}
        for action in self.actions:
            counts[type(action).__name__.lower()] += 1
        return ", ".join(f"{n} {verb}" for verb, n in counts.items() if n) or "nothing to do"


def object_key(body: Mapping[str, Any]) -> ObjectKey:
    return (str(body["apiVersion"]), str(body["kind"]), str(body["metadata"]["name"]))


def plan_children(
    *, desired: Sequence[Mapping[str, Any]], existing: Sequence[Mapping[str, Any]]
) -> Plan:
    """Actions that turn `existing` into `desired`; creations first, deletions last."""
    current = {object_key(body): body for body in existing}
    wanted = {object_key(body) for body in desired}
    actions: list[Action] = []
    for body in desired:
        found = current.get(object_key(body))
        if found is None or found.get("metadata", {}).get("deletionTimestamp"):
            actions.append(Create(body=body))
        elif _hash(found) != _hash(body):
            actions.append(Patch(body=body, scale_in=_scale_in(old=found, new=body)))
    for key, body in current.items():
        if key not in wanted and not body.get("metadata", {}).get("deletionTimestamp"):
            actions.append(
                Delete(
                    api_version=key[0],
                    kind=key[1],
                    name=key[2],
                    namespace=str(body["metadata"].get("namespace", "")),
                )
            )
    return Plan(actions=tuple(actions))


def _hash(body: Mapping[str, Any]) -> str | None:
    annotations = body.get("metadata", {}).get("annotations") or {}
    value = annotations.get(RENDER_HASH_ANNOTATION)
    return None if value is None else str(value)


def _scale_in(*, old: Mapping[str, Any], new: Mapping[str, Any]) -> ScaleIn | None:
    if new["kind"] != "Deployment":
        return None
    role = str(new["metadata"].get("labels", {}).get(labels.ROLE_LABEL, ""))
    if role == labels.SCHEDULER_ROLE:
        return None
    before = int(old.get("spec", {}).get("replicas", 1))
    after = int(new["spec"]["replicas"])
    if after >= before:
        return None
    return ScaleIn(role=role, from_replicas=before, to_replicas=after)
