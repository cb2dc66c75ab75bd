"""The one place a `SchedulerSettings` becomes a core and a service.

`twinroute scheduler`, the embedded router (`twinroute router --embedded`), the cluster
simulator and the benchmarks all build here, so one setting means the same thing in each of
them: the policy and its configuration, the prefix index size, lease TTL, scrape staleness,
prefill/decode decider, admission hold and migration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from twinroute.scheduler.admission import AdmissionMetrics, AdmissionQueue, AdmissionSettings
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import COST_PROFILES, CostModel
from twinroute.scheduler.kv_events import KvEventIndex
from twinroute.scheduler.kv_subscriber import KvEventSource, KvEventSubscriber
from twinroute.scheduler.migration import MigrationMetrics, Migrator, MigratorSettings
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.policies.pd import PdSettings
from twinroute.scheduler.prefix_index import DEFAULT_CAPACITY_BLOCKS
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.telemetry import SchedulerTelemetry, register_block_memo_metrics
from twinroute.scheduler.types import Endpoint


def policy_config(settings: SchedulerSettings, *, cost_model: CostModel) -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_s=settings.ttft_slo_s,
        cost_model=cost_model,
        virtual_nodes=settings.virtual_nodes,
        seed=settings.policy_seed,
        phase_aware=settings.phase_aware,
        phase_interference_weight=settings.phase_interference_weight,
        cold_placement=settings.cold_placement,
    )


def build_core(
    settings: SchedulerSettings, *, cost_model: CostModel | None = None, lease_id_prefix: str = ""
) -> SchedulerCore:
    """A fresh core and policy. `cost_model` replaces the settings' cost profile (the
    simulator predicts with the model of the instances it simulates); `lease_id_prefix` names
    this core's leases apart from every other's (a live scheduler's are unique per process)."""
    cost = cost_model if cost_model is not None else COST_PROFILES[settings.cost_profile]
    capacity_blocks = (
        max(1, settings.prefix_capacity_tokens // settings.key_block_tokens)
        if settings.prefix_capacity_tokens is not None
        else DEFAULT_CAPACITY_BLOCKS
    )
    return SchedulerCore(
        policy=make_policy(settings.policy, config=policy_config(settings, cost_model=cost)),
        cost_model=cost,
        prefix_capacity_blocks=capacity_blocks,
        lease_ttl_s=settings.lease_ttl_s,
        lease_id_prefix=lease_id_prefix,
        scrape_staleness_s=settings.scrape_staleness_s,
        rebalance=settings.rebalance,
        key_block_tokens=settings.key_block_tokens,
        cost_calibration=settings.cost_calibration,
        kv_events=KvEventIndex() if settings.follows_kv_events else None,
        pd=PdSettings(
            min_prefill_tokens=settings.pd_min_prefill_tokens,
            transfer_s_per_token=settings.pd_transfer_s_per_token,
        ),
    )


def build_service(
    settings: SchedulerSettings,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> SchedulerService:
    """The in-process `Scheduler` over a fresh core: with Prometheus telemetry on `registry`
    (None: none), the admission hold when `settings.admission_hold`, and a migrator attached
    when `settings.migration` is not off (its imbalance rounds, for `on`, run in
    `service.migrator.run()`, which the caller starts).

    Lease ids carry a random prefix of this process: after a restart, or beside another
    replica, a router's report about a lease placed elsewhere finds no lease here, instead of
    closing (or migrating) another request's."""
    core = build_core(settings, lease_id_prefix=f"{uuid.uuid4().hex[:12]}-")
    telemetry = (
        SchedulerTelemetry(
            registry=registry, core=core, clock=clock, virtual_nodes=settings.virtual_nodes
        )
        if registry is not None
        else None
    )
    admission = None
    if settings.admission_hold:
        admission = AdmissionQueue(
            core=core,
            settings=AdmissionSettings(max_hold_s=settings.admission_max_hold_s),
            clock=clock,
            metrics=AdmissionMetrics(registry=registry) if registry is not None else None,
        )
    service = SchedulerService(
        core=core,
        settings=settings,
        telemetry=telemetry,
        clock=clock,
        wall_clock=wall_clock,
        admission=admission,
    )
    if registry is not None and service.engine_hasher is not None:
        register_block_memo_metrics(registry, service.engine_hasher)
    if settings.migration != "off":
        service.attach_migrator(
            Migrator(
                core=core,
                settings=MigratorSettings(
                    rebalance=settings.migration == "on",
                    interval_s=settings.migration_interval_s,
                    capacity_tokens=(
                        settings.prefix_capacity_tokens or MigratorSettings().capacity_tokens
                    ),
                ),
                hooks=dict(settings.migration_hooks),
                metrics=MigrationMetrics(registry) if registry is not None else None,
            )
        )
    return service


def kv_event_sources(
    settings: SchedulerSettings, endpoints: Sequence[Endpoint]
) -> dict[str, KvEventSource | None]:
    """Where each endpoint's engine publishes its KV events (None: nowhere known): the
    address given for it, else tcp://ITS_HOST:`kv_events_port`; its replay address likewise."""
    explicit = dict(settings.kv_events_endpoints)
    explicit_replay = dict(settings.kv_events_replay_endpoints)
    sources: dict[str, KvEventSource | None] = {}
    for endpoint in endpoints:
        host = endpoint.address.split("://")[-1].rsplit(":", 1)[0]
        address = explicit.get(endpoint.id)
        if address is None and settings.kv_events_port is not None:
            address = f"tcp://{host}:{settings.kv_events_port}"
        replay = explicit_replay.get(endpoint.id)
        if replay is None and settings.kv_events_replay_port is not None:
            replay = f"tcp://{host}:{settings.kv_events_replay_port}"
        sources[endpoint.id] = (
            KvEventSource(address=address, replay_address=replay) if address else None
        )
    return sources


class KvEventFollower:
    """Keeps a service's KV-event subscriptions equal to its endpoints (scheduler process and
    embedded router alike): `set_endpoints` on every membership snapshot, `run` beside it."""

    def __init__(self, service: SchedulerService, index: KvEventIndex) -> None:
        self._settings = service.settings
        self.subscriber = KvEventSubscriber(index)

    @classmethod
    def of(cls, service: SchedulerService) -> KvEventFollower | None:
        """A follower when the service's settings follow KV events, else None."""
        index = service.core.kv_events
        return cls(service, index) if index is not None else None

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        self.subscriber.set_endpoints(kv_event_sources(self._settings, endpoints))

    async def run(self) -> None:
        """Follow until cancelled; every socket is closed when it returns."""
        await self.subscriber.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.subscriber.stop()


def embedded_service(
    settings: SchedulerSettings, endpoints: Sequence[Endpoint]
) -> tuple[SchedulerService, list[Callable[[], Coroutine[Any, Any, None]]]]:
    """A front end's in-process scheduler over a static list of engines (`twinroute router
    --embedded`, `twinroute gateway --embedded`), with Prometheus telemetry, and the work to run
    beside it: imbalance rounds (`--migration on`) and the engines' KV-event subscriptions."""
    service = build_service(settings, registry=CollectorRegistry())
    # Every static engine serves every model the front end serves.
    service.set_endpoints(endpoints)
    migrator = service.migrator
    work: list[Callable[[], Coroutine[Any, Any, None]]] = (
        [migrator.run] if migrator is not None and migrator.settings.rebalance else []
    )
    follower = KvEventFollower.of(service)
    if follower is not None:
        follower.set_endpoints(endpoints)
        work.append(follower.run)
    return service, work
