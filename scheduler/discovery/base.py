"""The one interface every discovery source implements."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from twinroute.scheduler.types import Endpoint

logger = logging.getLogger(__name__)


class EndpointSource(Protocol):
    def snapshots(self) -> AsyncIterator[tuple[Endpoint, ...]]:
        """Complete endpoint sets, the first as soon as it is known, then one per change.
        A finite source (a static list) simply ends; the last snapshot stays in force."""
        ...


async def run_discovery(
    source: EndpointSource, *, apply: Callable[[Sequence[Endpoint]], object]
) -> None:
    """Apply every snapshot of `source` until it ends (or the task is cancelled)."""
    async for endpoints in source.snapshots():
        apply(endpoints)
