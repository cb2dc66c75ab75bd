"""In-flight leases: the scheduler's own, always-known view of the load it has placed.

Every Pick opens one lease and exactly one Complete (or the time-to-live) closes it, so no
count can leak when a router dies or a completion is lost.

Pending prefill tokens are estimated per endpoint as a FIFO fluid queue: a lease enters with
its uncached prompt tokens, and the queue drains at the cost model's prefill rate (slowed by
the sequences decoding there) from the moment the scheduler placed it. A lease leaves the
prefill queue when the queue has drained through it, when its first token is reported, or when
it completes; a first-token report also settles every lease queued before it on that endpoint
(FIFO), which corrects the fluid estimate with what really happened. Leases past prefill count
as decoding until they complete.

Once an endpoint has reported a first token, the fluid model no longer drains past a lease
whose first token has not come: that lease's tokens may fall to zero, but the leases behind it
stay pending until a report settles them. The engine can be slower than the model (requests
waiting for KV memory, decode-heavy steps), and without this hold the estimate would say an
endpoint is idle while its queue grows, which is exactly when a policy most needs to know.
The hold applies only to leases whose caller said it will report their first token
(`reports_first_token`: the request streams). A non-streamed request has no first token to
report; holding at it would freeze the endpoint's estimate for its whole generation, so the
model drains through it. Endpoints that never report first tokens (a router that reports only
completions) keep the plain fluid estimate.

Cost: O(1) to open or close a lease; draining touches only leases that finish prefill.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twinroute.scheduler.costmodel import CostModel
from twinroute.scheduler.types import LoadSnapshot


@dataclass(slots=True)
class Lease:
    lease_id: str
    endpoint_id: str
    request_id: str
    opened_at: float
    prompt_tokens: int
    uncached_tokens: int
    predicted_ttft_s: float
    # Uncached tokens of this lease not yet prefilled (fluid estimate).
    remaining_prefill: float = 0.0
    prefilled: bool = False
    first_token_at: float | None = None
    # Its caller will report the first token (a stream): the drain may wait for that report.
    reports_first_token: bool = False
    # The prior-hardware work behind `predicted_ttft_s` (`CostCalibration.work_s`), which the
    # first token's observed TTFT is fitted against.
    work_s: float = 0.0
    # No other lease was open on its endpoint when it opened (nothing of ours ahead of it).
    found_idle: bool = False
    # The last time its holder said it still runs (Renew); the TTL counts from here.
    renewed_at: float = 0.0


@dataclass(slots=True)
class _EndpointQueue:
    endpoint_id: str
    prefill: deque[Lease] = field(default_factory=deque)
    pending_tokens: float = 0.0
    decoding: int = 0
    # Prompt tokens of the decoding leases (the KV their decode steps read).
    decoding_tokens: int = 0
    in_flight: int = 0
    last_drained_at: float = 0.0
    # Set by the first first-token report: from then on the drain waits for reports.
    reports_first_tokens: bool = False


class LeaseTable:
    """Open leases and per-endpoint load derived from them."""

    def __init__(
        self,
        *,
        cost_model: CostModel,
        ttl_s: float = 600.0,
        id_prefix: str = "",
        cost_of: Callable[[str], CostModel] | None = None,
    ) -> None:
        """`cost_of`: each endpoint's own (fitted) cost model, whose prefill rate drains its
        queue; None: `cost_model` for all."""
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        self._cost = cost_model
        self._cost_of = cost_of
        self._ttl_s = ttl_s
        self._ids = itertools.count(1)
        self._id_prefix = id_prefix
        self._leases: dict[str, Lease] = {}
        self._queues: dict[str, _EndpointQueue] = {}
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def id_prefix(self) -> str:
        """What every lease id this table issues starts with (the replica's id)."""
        return self._id_prefix

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def open(
        self,
        *,
        endpoint_id: str,
        request_id: str,
        now: float,
        prompt_tokens: int,
        uncached_tokens: int,
        predicted_ttft_s: float,
        lease_id: str | None = None,
        reports_first_token: bool = False,
    ) -> Lease:
        """Open a lease; `lease_id` reuses an id (a lease moved to another endpoint)."""
        if lease_id is not None and lease_id in self._leases:
            raise ValueError(f"lease {lease_id!r} is already open")
        queue = self._queue(endpoint_id, now)
        lease = Lease(
            lease_id=lease_id or f"{self._id_prefix}{next(self._ids)}",
            endpoint_id=endpoint_id,
            request_id=request_id,
            opened_at=now,
            prompt_tokens=prompt_tokens,
            uncached_tokens=uncached_tokens,
            predicted_ttft_s=predicted_ttft_s,
            remaining_prefill=float(max(0, uncached_tokens)),
            reports_first_token=reports_first_token,
            found_idle=queue.in_flight == 0,
        )
        self._leases[lease.lease_id] = lease
        queue.in_flight += 1
        if lease.remaining_prefill > 0:
            queue.prefill.append(lease)
            queue.pending_tokens += lease.remaining_prefill
        else:
            lease.prefilled = True
            queue.decoding += 1
            queue.decoding_tokens += lease.prompt_tokens
        return lease

    def first_token(self, lease_id: str, *, now: float) -> bool:
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        lease.first_token_at = now
        queue = self._queue(lease.endpoint_id, now)
        queue.reports_first_tokens = True
        if not lease.prefilled:
            # FIFO: everything queued before this lease has been prefilled too.
            while queue.prefill:
                head = queue.prefill.popleft()
                self._finish_prefill(queue, head)
                if head is lease:
                    break
        return True

    def close(self, lease_id: str, *, now: float) -> Lease | None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        queue = self._queue(lease.endpoint_id, now)
        queue.in_flight -= 1
        if lease.prefilled:
            queue.decoding -= 1
            queue.decoding_tokens -= lease.prompt_tokens
        else:
            queue.pending_tokens -= lease.remaining_prefill
            queue.prefill.remove(lease)
            lease.prefilled = True
        return lease

    def issued_here(self, lease_id: str) -> bool:
        """Whether this table could have issued `lease_id` (ids carry a per-process prefix,
        so a lease of a scheduler process before a restart is told apart)."""
        return lease_id.startswith(self._id_prefix)

    def renew(self, lease_id: str, *, now: float) -> bool:
        """Its holder still runs it: the TTL starts again. False for an unknown lease."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        lease.renewed_at = now
        return True

    def expire(self, *, now: float) -> list[Lease]:
        """Close leases neither completed nor renewed within the TTL (their holder is gone)."""
        cutoff = now - self._ttl_s
        stale = [
            lease
            for lease in self._leases.values()
            if lease.opened_at < cutoff and lease.renewed_at < cutoff
        ]
        for lease in stale:
            self.close(lease.lease_id, now=now)
        self.expired_total += len(stale)
        return stale

    def queued_on(self, endpoint_id: str, *, now: float) -> list[Lease]:
        """Leases believed still waiting for prefill there, oldest first."""
        queue = self._queues.get(endpoint_id)
        if queue is None:
            return []
        self._drain(queue, now)
        return list(queue.prefill)

    def leases_on(self, endpoint_id: str) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.endpoint_id == endpoint_id]

    def forget_endpoint(self, endpoint_id: str, *, now: float) -> list[Lease]:
        """Close every lease on an endpoint that left the pool."""
        leases = self.leases_on(endpoint_id)
        for lease in leases:
            self.close(lease.lease_id, now=now)
        self._queues.pop(endpoint_id, None)
        return leases

    def load(self, endpoint_id: str, *, now: float) -> LoadSnapshot:
        queue = self._queues.get(endpoint_id)
        if queue is None:
            return LoadSnapshot()
        self._drain(queue, now)
        return LoadSnapshot(
            in_flight=queue.in_flight,
            pending_prefill_tokens=round(max(0.0, queue.pending_tokens)),
            decoding=queue.decoding,
            decoding_tokens=queue.decoding_tokens,
        )

    def loads(self, *, now: float) -> dict[str, LoadSnapshot]:
        """The load of every endpoint that carries any of these leases (what a replica
        shares with its peers)."""
        shown: dict[str, LoadSnapshot] = {}
        for endpoint_id, queue in self._queues.items():
            if queue.in_flight:
                shown[endpoint_id] = self.load(endpoint_id, now=now)
        return shown

    def _queue(self, endpoint_id: str, now: float) -> _EndpointQueue:
        queue = self._queues.get(endpoint_id)
        if queue is None:
            queue = self._queues[endpoint_id] = _EndpointQueue(endpoint_id, last_drained_at=now)
        else:
            self._drain(queue, now)
        return queue

    def _drain(self, queue: _EndpointQueue, now: float) -> None:
        elapsed = now - queue.last_drained_at
        if elapsed <= 0:
            return
        queue.last_drained_at = now
        cost = self._cost if self._cost_of is None else self._cost_of(queue.endpoint_id)
        rate = cost.linear_tokens_per_s * cost.prefill_share(decoding=queue.decoding)
        budget = elapsed * rate
        while queue.prefill and budget > 0:
            head = queue.prefill[0]
            if head.remaining_prefill > budget:
                head.remaining_prefill -= budget
                queue.pending_tokens -= budget
                return
            if queue.reports_first_tokens and head.reports_first_token:
                # Done by the model, not yet by the engine: wait for its report.
                queue.pending_tokens -= head.remaining_prefill
                head.remaining_prefill = 0.0
                return
            budget -= head.remaining_prefill
            queue.prefill.popleft()
            self._finish_prefill(queue, head)

    @staticmethod
    def _finish_prefill(queue: _EndpointQueue, lease: Lease) -> None:
        queue.pending_tokens -= lease.remaining_prefill
        lease.remaining_prefill = 0.0
        lease.prefilled = True
        queue.decoding += 1
        queue.decoding_tokens += lease.prompt_tokens
        if not queue.prefill:
            queue.pending_tokens = 0.0
