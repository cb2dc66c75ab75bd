"""Fail-open: the router keeps routing when its scheduler cannot be reached.

`FailOpenScheduler` is the scheduler's API (`twinroute.scheduler.api.Scheduler`) over another
one: every call goes to the real scheduler, and a Pick it cannot answer
(`SchedulerUnreachableError`: connection refused, deadline) is placed round robin over a
fallback list instead, with reason `fallback` and no lease (so nothing is reported for it).
"No endpoint" and "bad request" answers are the scheduler's and pass through: only an absent
scheduler is failed open.

The fallback list is the endpoints the router was given (`--endpoints`) or, when it was given
none (as in operator-managed pools, where the scheduler discovers the engines), the routable
endpoints the scheduler last listed: `learn_endpoints` asks every `learn_every_s` and keeps the
last answer while the scheduler is away. A pod replaced while the scheduler is away costs a
retry (the router excludes an engine that fails and asks again), not a failed request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence

from twinroute.scheduler.api import (
    DEFAULT_EXPLAIN_LIMIT,
    DecisionRecord,
    DrainResult,
    Endpoint,
    EndpointStatus,
    MigrationOrder,
    MigrationReport,
    NoEndpointError,
    Outcome,
    PickAnswer,
    PickQuery,
    Placement,
    ProgressEvent,
    Scheduler,
    SchedulerUnreachableError,
)
from twinroute.vocabulary import DecisionReason

logger = logging.getLogger(__name__)


# How often the fallback list is refreshed from the scheduler when none was given.
DEFAULT_LEARN_EVERY_S = 5.0


class FailOpenScheduler:
    """`primary`, or round robin over the fallback endpoints while `primary` cannot be
    reached. With no `endpoints`, run `learn_endpoints` beside it to learn them."""

    def __init__(
        self,
        *,
        primary: Scheduler,
        endpoints: Sequence[Endpoint] = (),
        learn_every_s: float = DEFAULT_LEARN_EVERY_S,
    ) -> None:
        self._primary = primary
        self._endpoints = tuple(endpoints)
        self._turn = itertools.count()
        self._learn_every_s = learn_every_s
        self.learnt_at: float | None = None  # loop time of the last list, None: never

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The fallback list now."""
        return self._endpoints

    async def learn_endpoints(self) -> None:
        """Keep the fallback list to what the scheduler routes to, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                statuses = await self._primary.list_endpoints()
            except SchedulerUnreachableError:
                pass  # keep the last list: that is what it is for
            except Exception:
                logger.exception("cannot learn the fallback endpoints")
            else:
                learnt = tuple(status.endpoint for status in statuses if status.routable)
                if learnt != self._endpoints:
                    logger.info("fallback endpoints: %s", ", ".join(e.id for e in learnt) or "none")
                self._endpoints = learnt
                self.learnt_at = loop.time()
            await asyncio.sleep(self._learn_every_s)

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        try:
            return await self._primary.pick(query, timeout_s=timeout_s)
        except SchedulerUnreachableError as error:
            if not self._endpoints:
                raise
            logger.warning("scheduler unavailable (%s); placing round robin", error)
            return Placement(self._round_robin(query), reports=None)

    def _round_robin(self, query: PickQuery) -> PickAnswer:
        count = len(self._endpoints)
        start = next(self._turn)
        for offset in range(count):
            endpoint = self._endpoints[(start + offset) % count]
            if endpoint.id not in query.exclude_endpoints:
                return PickAnswer(
                    endpoint=endpoint, lease_id="", reason=DecisionReason.FALLBACK, policy=""
                )
        raise NoEndpointError(f"all {count} endpoints were excluded")

    async def complete(
        self,
        *,
        lease_id: str,
        outcome: Outcome = "success",
        observed_ttft_s: float = 0.0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> bool:
        return await self._primary.complete(
            lease_id=lease_id,
            outcome=outcome,
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> bool:
        return await self._primary.progress(lease_id=lease_id, event=event)

    async def cancel(self, *, pick_id: str) -> bool:
        return await self._primary.cancel(pick_id=pick_id)

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        return await self._primary.renew(lease_ids=lease_ids)

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        return await self._primary.list_endpoints(model=model)

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        return await self._primary.explain(limit=limit, request_id=request_id)

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        return await self._primary.drain(endpoint_id=endpoint_id, timeout_s=timeout_s)

    async def undrain(self, *, endpoint_id: str) -> bool:
        return await self._primary.undrain(endpoint_id=endpoint_id)

    def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        return self._primary.watch_migrations(watcher=watcher)

    async def report_migration(self, report: MigrationReport) -> bool:
        return await self._primary.report_migration(report)

    async def close(self) -> None:
        await self._primary.close()
