"""The order bus of recompute migration: the scheduler's orders to the routers that hold the
streams, and the routers' reports back.

Stock vLLM cannot move KV between instances, so a running stream migrates by recompute: the
router holding its lease splices the stream onto the target (`twinroute.router.migration`).
`MigrationOrders` fans each order out to every watching router (`WatchMigrations`) and resolves
its future with the first report that settles it; a router that does not hold the lease answers
"not held", and only when every watcher said so is the order settled that way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from twinroute.scheduler.api import NOT_HELD_REASON, MigrationOrder, MigrationReport


@dataclass(slots=True)
class _Pending:
    order: MigrationOrder
    future: asyncio.Future[MigrationReport]
    watchers: int
    not_held: int = 0


class MigrationOrders:
    """Fan-out of orders to every watching router, and the futures their reports resolve."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[MigrationOrder]] = []
        self._pending: dict[str, _Pending] = {}
        self._watchers_changed = asyncio.Condition()

    @property
    def watchers(self) -> int:
        return len(self._queues)

    async def watch(self) -> AsyncIterator[MigrationOrder]:
        """Orders from now on, until the caller stops iterating."""
        queue: asyncio.Queue[MigrationOrder] = asyncio.Queue()
        self._queues.append(queue)
        async with self._watchers_changed:
            self._watchers_changed.notify_all()
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    async def wait_for_watchers(self, count: int) -> None:
        """Return once at least `count` watchers subscribed (a router connects, a test)."""
        async with self._watchers_changed:
            await self._watchers_changed.wait_for(lambda: len(self._queues) >= count)

    def issue(self, order: MigrationOrder) -> asyncio.Future[MigrationReport]:
        future: asyncio.Future[MigrationReport] = asyncio.get_running_loop().create_future()
        self._pending[order.migration_id] = _Pending(
            order=order, future=future, watchers=len(self._queues)
        )
        for queue in self._queues:
            queue.put_nowait(order)
        return future

    def withdraw(self, migration_id: str) -> None:
        self._pending.pop(migration_id, None)

    def report(self, report: MigrationReport) -> bool:
        """Settle an order; False when its id is unknown (reported already, or expired)."""
        pending = self._pending.get(report.migration_id)
        if pending is None or pending.order.lease_id != report.lease_id:
            return False
        if not report.committed and report.reason == NOT_HELD_REASON:
            pending.not_held += 1
            if pending.not_held < pending.watchers:
                return True
        del self._pending[report.migration_id]
        if not pending.future.done():
            pending.future.set_result(report)
        return True
