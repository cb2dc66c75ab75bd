"""Status of a ModelPool, computed from what exists: pure, with the clock passed in.

Conditions follow Kubernetes conventions: `Ready` (every role has all its replicas ready and
the scheduler is up), `Progressing` (a rollout or scale is under way), `Degraded` (the spec is
invalid or the last apply failed). A condition's `lastTransitionTime` moves only when its
status changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twinroute.operator.render import engine_name, scheduler_name
from twinroute.operator.spec import PoolSpec

from twinroute import labels


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Why the pool is Degraded: a reason in CamelCase and a message for people."""

    reason: str
    message: str


def compute_status(
    *,
    pool: PoolSpec | None,
    generation: int,
    deployments: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any],
    problem: Problem | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The full `.status` to write (a merge patch of this replaces every field it names)."""
    previous_conditions = {
        str(c.get("type")): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)
    }
    status: dict[str, Any] = {"observedGeneration": generation}
    if pool is None:
        assert problem is not None, "a pool that did not parse must come with its problem"
        status["phase"] = "Degraded"
        status["conditions"] = _conditions(
            ready=(False, "InvalidSpec", problem.message),
            progressing=(False, "InvalidSpec", "nothing is reconciled until the spec is fixed"),
            degraded=(True, problem.reason, problem.message),
            previous=previous_conditions,
            generation=generation,
            now=now,
        )
        return status

    by_name = {str(d["metadata"]["name"]): d for d in deployments}
    roles: dict[str, dict[str, int]] = {}
    summary: list[str] = []
    all_ready = True
    progressing = False
    for role in pool.roles:
        desired = pool.replicas[role]
        ready, updated, current = _deployment_counts(
            by_name.get(engine_name(pool=pool.name, role=role))
        )
        roles[role.value] = {"desired": desired, "ready": ready, "updated": updated}
        summary.append(f"{role.value} {ready}/{desired}")
        all_ready = all_ready and ready >= desired
        progressing = progressing or ready != desired or updated != desired or current != desired
    sched_ready, _, _ = _deployment_counts(by_name.get(scheduler_name(pool=pool.name)))
    scheduler_up = sched_ready >= 1
    status["roles"] = roles
    status["readySummary"] = ", ".join(summary)
    status["scheduler"] = {"desired": pool.scheduler.replicas, "ready": sched_ready}
    status["endpoints"] = _endpoints(pool, pods)
    if pool.disaggregated is False:
        status["unifiedReplicas"] = roles["unified"]["ready"]
    status["selector"] = f"{labels.POOL_LABEL}={pool.name}"

    if problem is not None:
        phase = "Degraded"
    elif all_ready and scheduler_up:
        phase = "Ready"
    else:
        phase = "Progressing"
    status["phase"] = phase
    waiting = ", ".join(s for s in summary) + f", scheduler {sched_ready}/{pool.scheduler.replicas}"
    status["conditions"] = _conditions(
        ready=(True, "AllReplicasReady", waiting)
        if all_ready and scheduler_up
        else (False, "ReplicasNotReady", waiting),
        progressing=(True, "RollingOut", waiting)
        if progressing or not scheduler_up
        else (False, "Stable", "every role runs its desired replicas"),
        degraded=(True, problem.reason, problem.message)
        if problem is not None
        else (False, "AsExpected", "the spec is valid and was applied"),
        previous=previous_conditions,
        generation=generation,
        now=now,
    )
    return status


def _deployment_counts(deployment: Mapping[str, Any] | None) -> tuple[int, int, int]:
    if deployment is None:
        return 0, 0, 0
    status = deployment.get("status") or {}
    return (
        int(status.get("readyReplicas") or 0),
        int(status.get("updatedReplicas") or 0),
        int(status.get("replicas") or 0),
    )


def _endpoints(pool: PoolSpec, pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ready engine pods, as the scheduler's discovery sees them (same rule)."""
    engine_roles = {role.value for role in pool.roles}
    found = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        role = (metadata.get("labels") or {}).get(labels.ROLE_LABEL)
        if role not in engine_roles or metadata.get("deletionTimestamp"):
            continue
        pod_status = pod.get("status") or {}
        ip = pod_status.get("podIP")
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pod_status.get("conditions") or []
        )
        if not ip or not ready:
            continue
        port = (metadata.get("annotations") or {}).get(
            labels.ENGINE_PORT_ANNOTATION, str(pool.engine.port)
        )
        found.append({"id": str(metadata["name"]), "address": f"{ip}:{port}", "role": role})
    return sorted(found, key=lambda e: (e["role"], e["id"]))


def _conditions(
    *,
    ready: tuple[bool, str, str],
    progressing: tuple[bool, str, str],
    degraded: tuple[bool, str, str],
    previous: Mapping[str, Mapping[str, Any]],
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = []
    for kind, (value, reason, message) in (
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ):
        text = "True" if value else "False"
        old = previous.get(kind)
        since = old.get("lastTransitionTime") if old and old.get("status") == text else None
        result.append(
            {
                "type": kind,
                "status": text,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": since or stamp,
            }
        )
    return result
