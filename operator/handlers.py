"""kopf handlers for ModelPool, registered on a registry built per process (no globals).

Handlers stay thin: parse (spec.py), render (render.py), plan (plan.py), apply (apply.py, the
only writer), compute status (status.py). The same `reconcile` serves resume, create, update
and a periodic resync, so a restarted operator converges without creating duplicates and a
child deleted by hand comes back.

Deletion: children carry owner references (a real cluster's garbage collector would remove
them), and the delete handler also deletes them explicitly, so cleanup does not depend on a
garbage collector being present (the test API server has none).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from twinroute.operator.apply import ApplyError, KubeApi
from twinroute.operator.plan import plan_children
from twinroute.operator.render import Owner, RenderSettings, render_children
from twinroute.operator.spec import PoolSpec, SpecError, parse_pool
from twinroute.operator.status import Problem, compute_status

from twinroute import labels

GROUP, VERSION, PLURAL = labels.API_GROUP, labels.API_VERSION, labels.MODELPOOL_PLURAL
FINALIZER = "twinroute.io/cleanup"
APPLY_RETRY_DELAY_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorConfig:
    render: RenderSettings
    resync_interval_s: float = 30.0
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileResult:
    """What one reconcile did: the parsed pool (None when the spec is invalid), the problem
    to report as a condition, and whether to retry."""

    pool: PoolSpec | None
    problem: Problem | None
    retry: bool = False


class Reconciler:
    """Brings one pool's children and status in line with its spec; serialised per pool."""

    def __init__(self, *, api: KubeApi, config: OperatorConfig) -> None:
        self._api = api
        self._config = config
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.reconciles = 0

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(
        self, *, body: Mapping[str, Any], logger: logging.Logger | Any
    ) -> ReconcileResult:
        metadata = body["metadata"]
        namespace, name = str(metadata["namespace"]), str(metadata["name"])
        generation = int(metadata.get("generation") or 0)
        previous = body.get("status") or {}
        with self._lock(namespace, name):
            self.reconciles += 1
            try:
                pool = parse_pool(name=name, namespace=namespace, spec=body.get("spec") or {})
            except SpecError as error:
                invalid = Problem(reason="InvalidSpec", message=str(error))
                self._write_status(
                    namespace=namespace,
                    name=name,
                    previous=previous,
                    status=compute_status(
                        pool=None,
                        generation=generation,
                        deployments=(),
                        pods=(),
                        previous=previous,
                        problem=invalid,
                        now=self._config.now(),
                    ),
                )
                return ReconcileResult(pool=None, problem=invalid)
            problem: Problem | None = None
            retry = False
            try:
                desired = render_children(
                    pool,
                    owner=Owner(name=name, uid=str(metadata["uid"])),
                    settings=self._config.render,
                )
                existing = self._api.list_children(namespace=namespace, pool=name)
                plan = plan_children(desired=desired, existing=existing)
                if not plan.empty:
                    logger.info("Applying to %s/%s: %s", namespace, name, plan.summary())
                    self._api.execute(plan=plan, namespace=namespace, pool=name)
                    existing = self._api.list_children(namespace=namespace, pool=name)
                pods = self._api.list_pods(
                    namespace=namespace, selector=f"{labels.POOL_LABEL}={name}"
                )
            except ApplyError as error:
                logger.warning("Apply to %s/%s failed: %s", namespace, name, error)
                problem = Problem(reason="ApplyFailed", message=str(error))
                retry = True
                existing, pods = [], []
            deployments = [c for c in existing if c.get("kind") == "Deployment"]
            status = compute_status(
                pool=pool,
                generation=generation,
                deployments=deployments,
                pods=pods,
                previous=previous,
                problem=problem,
                now=self._config.now(),
            )
            try:
                self._write_status(namespace=namespace, name=name, previous=previous, status=status)
            except ApplyError as error:
                logger.warning("Status of %s/%s not written: %s", namespace, name, error)
                retry = True
            return ReconcileResult(pool=pool, problem=problem, retry=retry)

    def cleanup(self, *, namespace: str, name: str) -> int:
        with self._lock(namespace, name):
            count = self._api.delete_children(namespace=namespace, pool=name)
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
        return count

    def _write_status(
        self, *, namespace: str, name: str, previous: Mapping[str, Any], status: Mapping[str, Any]
    ) -> None:
        if all(previous.get(key) == value for key, value in status.items()):
            return
        self._api.patch_pool_status(namespace=namespace, name=name, status=status)


def build_registry(
    *,
    reconciler: Reconciler,
    config: OperatorConfig,
    login: Callable[[], kopf.ConnectionInfo] | None = None,
) -> kopf.OperatorRegistry:
    """Every handler of the operator on a fresh registry."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=labels.API_GROUP
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=labels.API_GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.INFO
        # Watch exactly the namespaces named on the command line (or the whole cluster): no
        # namespace or CRD scanning, so the operator needs no permissions on either.
        settings.scanning.disabled = True
        # Watches end and restart often, so a dropped connection is noticed quickly.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # A pool deleted while its resync timer runs keeps its finalizer until kopf sees the
        # timer has exited, which it checks this often (kopf's default is 60 s).
        settings.background.cancellation_polling = 1.0

    if login is not None:
        connect = login

        @kopf.on.login(registry=registry)
        def login_handler(**_: Any) -> kopf.ConnectionInfo:
            return connect()

    def on_change(body: kopf.Body, logger: logging.Logger | Any, **_: Any) -> None:
        outcome = reconciler.reconcile(body=body, logger=logger)
        if outcome.pool is None and outcome.problem is not None:
            kopf.warn(body, reason=outcome.problem.reason, message=outcome.problem.message)
            # Hopeless until the spec changes; an update handler runs again when it does.
            raise kopf.PermanentError(outcome.problem.message)
        if outcome.retry:
            message = outcome.problem.message if outcome.problem else "status not written"
            kopf.warn(body, reason="ApplyFailed", message=message)
            raise kopf.TemporaryError(message, delay=APPLY_RETRY_DELAY_S)
        kopf.info(body, reason="Reconciled", message="children match the spec")

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(GROUP, VERSION, PLURAL, registry=registry)(on_change)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        interval=config.resync_interval_s,
        initial_delay=config.resync_interval_s,
    )
    def resync(body: kopf.Body, logger: logging.Logger | Any, **_: Any) -> None:
        # Refreshes status (replicas become ready without the pool changing) and repairs
        # children removed or edited behind the operator's back. Invalid pools stay as they are.
        reconciler.reconcile(body=body, logger=logger)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def on_delete(name: str, namespace: str | None, logger: logging.Logger | Any, **_: Any) -> None:
        assert namespace is not None, "ModelPool is namespaced"
        count = reconciler.cleanup(namespace=namespace, name=name)
        logger.info("Deleted %d children of %s/%s", count, namespace, name)

    @kopf.on.probe(id="reconciles", registry=registry)
    def reconciles_probe(**_: Any) -> int:
        return reconciler.reconciles

    return registry
