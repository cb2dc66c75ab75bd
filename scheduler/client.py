"""`SchedulerClient`: the scheduler's API (`scheduler/api.py`) over one grpc.aio channel, to the
`twinroute scheduler` service.

Every call carries a deadline. A status the server raised on purpose comes back as the typed
error it stands for (the server names it in the `twinroute-error` trailing metadata); anything
else (connection refused, deadline exceeded) raises `SchedulerUnreachableError`, so a router can
fail open without confusing "the scheduler is down" with "the pool is empty".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import grpc
from twinroute.scheduler import wire
from twinroute.scheduler.api import (
    DEFAULT_EXPLAIN_LIMIT,
    DrainResult,
    EndpointStatus,
    MigrationOrder,
    MigrationReport,
    Outcome,
    PickQuery,
    Placement,
    ProgressEvent,
    SchedulerUnreachableError,
)
from twinroute.scheduler.types import DecisionRecord
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def _raise_typed(error: grpc.aio.AioRpcError) -> NoReturn:
    kind = ""
    for key, value in error.trailing_metadata() or ():
        if key == wire.ERROR_KIND_METADATA:
            kind = str(value)
    typed = wire.ERROR_KINDS.get(kind)
    if typed is not None:
        raise typed(error.details() or kind) from None
    raise SchedulerUnreachableError(f"{error.code().name}: {error.details()}") from None


# A router usually starts beside its scheduler and may dial it first; gRPC's default reconnect
# backoff (1 s growing to 120 s) would then refuse picks for many seconds after the scheduler
# listens. Reconnect within a second instead: the channel is one connection to one peer.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class SchedulerClient:
    """Async client; build one per process and `await close()` at shutdown.

    Pick waits for the channel to be ready within its deadline (`wait_for_ready`) rather than
    failing at once while a connection is being re-established, so a scheduler that starts a
    moment after the router, or restarts, costs a short wait, not a failed pick; past the
    deadline the caller sees `SchedulerUnreachableError` (the router then falls back)."""

    def __init__(
        self,
        *,
        target: str,
        timeout_s: float = 1.0,
        admin_token: str | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        channel: grpc.aio.Channel | None = None,
        wait_for_ready: bool = True,
    ) -> None:
        """`root_certificates` (PEM) switches the channel to TLS, trusting that CA;
        `tls_server_name` is the name the certificate must carry when it differs from
        `target`'s host (a scheduler reached by IP). `admin_token` goes with every call
        (a scheduler with a token refuses any call without it). `wait_for_ready` False: a
        Pick fails at once while the scheduler is known down (one of several replicas, so
        the caller asks another) instead of waiting for it within its deadline."""
        if channel is not None:
            self._channel = channel
        elif root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            options: tuple[tuple[str, str | int], ...] = RECONNECT_OPTIONS
            if tls_server_name:
                options += (("grpc.ssl_target_name_override", tls_server_name),)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub: Any = pb_grpc.SchedulerStub(self._channel)
        self._background: set[asyncio.Task[None]] = set()
        self._pick_prefix = f"{uuid.uuid4().hex[:12]}-"
        self._pick_numbers = itertools.count(1)
        self._timeout_s = timeout_s
        self._wait_for_ready = wait_for_ready
        self.target = target
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        """Pick, under a pick_id of this call's own: when the deadline passes or the caller
        goes away first, a Cancel for it follows in the background, so the lease the scheduler
        may have opened for the abandoned answer is closed at once, not at its time-to-live."""
        # Unique across clients and restarts; a counter, not a uuid per call (the hot path).
        pick_id = query.pick_id or f"{self._pick_prefix}{next(self._pick_numbers)}"
        message = wire.query_to_pb(query)
        message.pick_id = pick_id
        try:
            response = await self._stub.Pick(
                message,
                timeout=timeout_s or self._timeout_s,
                wait_for_ready=self._wait_for_ready,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self._cancel_soon(pick_id)
            _raise_typed(error)
        except asyncio.CancelledError:
            self._cancel_soon(pick_id)
            raise
        return Placement(wire.answer_from_pb(response), reports=self)

    async def cancel(self, *, pick_id: str) -> bool:
        try:
            response = await self._stub.Cancel(
                pb.CancelRequest(pick_id=pick_id), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.closed)

    def _cancel_soon(self, pick_id: str) -> None:
        async def cancel() -> None:
            with contextlib.suppress(Exception):  # best effort: the lease's TTL is the backstop
                await self.cancel(pick_id=pick_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        """False when the scheduler no longer knew the lease (expired or closed twice)."""
        request = pb.CompleteRequest(
            lease_id=lease_id,
            outcome=wire.outcome_to_pb(outcome),
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )
        try:
            response = await self._stub.Complete(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> bool:
        """Report a milestone of a placed request; False when the scheduler did not apply it."""
        request = pb.ProgressRequest(lease_id=lease_id, event=wire.progress_to_pb(event))
        try:
            response = await self._stub.Progress(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        try:
            response = await self._stub.Renew(
                pb.RenewRequest(lease_ids=lease_ids),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return int(response.known)

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        try:
            response = await self._stub.ListEndpoints(
                pb.ListEndpointsRequest(model=model),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return [
            EndpointStatus(
                endpoint=wire.endpoint_from_pb(message),
                routable=message.routable,
                load=wire.load_from_pb(message.load),
            )
            for message in response.endpoints
        ]

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        try:
            response = await self._stub.Explain(
                pb.ExplainRequest(limit=limit, request_id=request_id),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return [wire.record_from_pb(record) for record in response.decisions]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        try:
            response = await self._stub.Drain(
                pb.DrainRequest(endpoint_id=endpoint_id, timeout_s=timeout_s),
                timeout=timeout_s + self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return DrainResult(
            drained=response.drained, remaining_in_flight=response.remaining_in_flight
        )

    async def undrain(self, *, endpoint_id: str) -> bool:
        try:
            response = await self._stub.Undrain(
                pb.UndrainRequest(endpoint_id=endpoint_id),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.was_draining)

    async def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Migration orders as the scheduler issues them (admin RPC), until cancelled. Raises
        `SchedulerUnreachableError` when the stream cannot be opened or breaks."""
        call = self._stub.WatchMigrations(
            pb.WatchMigrationsRequest(watcher=watcher), metadata=self._metadata
        )
        try:
            async for message in call:
                yield wire.order_from_pb(message)
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        finally:
            call.cancel()

    async def report_migration(self, report: MigrationReport) -> bool:
        """What became of an order (admin RPC); False when the scheduler did not know it."""
        try:
            response = await self._stub.ReportMigration(
                wire.report_to_pb(report), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            _raise_typed(error)
        return bool(response.known)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._timeout_s)
        await self._channel.close()


def resolve_targets(targets: Sequence[str], *, strict: bool = False) -> list[str]:
    """HOST:PORT targets as IP:PORT addresses: every address a name resolves to (a headless
    Service names each replica), sorted; a name that does not resolve is kept as it is (gRPC
    resolves it again on its own), or with `strict` raises OSError (a caller that looks again
    later keeps what it had rather than a name for every replica)."""
    addresses: list[str] = []
    for target in targets:
        host, _, port = target.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as error:
            if strict:
                raise OSError(f"{target} does not resolve: {error}") from error
            addresses.append(target)
            continue
        for family, _type, _proto, _name, sockaddr in infos:
            ip = str(sockaddr[0])
            address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if address not in addresses:
                addresses.append(address)
    return sorted(addresses)


def lease_owner(lease_id: str) -> str:
    """The replica that issued a lease: its id's prefix (`<replica>-<number>`)."""
    return lease_id.rpartition("-")[0]


class ReplicatedSchedulerClient:
    """The scheduler's API over several active-active replicas of one pool's scheduler.

    Picks rotate over the replicas; a replica that fails a Pick (down, restarting, or behind
    its peers' membership) is skipped for `down_for_s` and the same Pick goes to the next one
    within the caller's deadline, so a dead replica costs a pick one failed attempt, not a
    failed request. The reports of a placed request (Complete, Progress, Renew) go to the
    replica that issued its lease (lease ids name it); admin calls (Drain, Undrain) go to every
    replica, since each routes on its own rings; Explain asks them all."""

    def __init__(
        self,
        *,
        targets: Sequence[str],
        timeout_s: float = 1.0,
        admin_token: str | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        down_for_s: float = 1.0,
        names: Sequence[str] = (),
    ) -> None:
        """`targets`: the replicas' addresses now; `names`: what they were resolved from
        (`keep_resolved` looks again, so a replica that restarts at a new address is found)."""
        if not targets:
            raise ValueError("no scheduler replica to talk to")

        def client(target: str) -> SchedulerClient:
            return SchedulerClient(
                target=target,
                timeout_s=timeout_s,
                admin_token=admin_token,
                root_certificates=root_certificates,
                tls_server_name=tls_server_name,
                wait_for_ready=False,
            )

        self._client = client
        self._names = tuple(names)
        self._replicas = [client(target) for target in targets]
        self._timeout_s = timeout_s
        self._down_for_s = down_for_s
        # By target, so that a list that changes under a pick never misattributes a mark.
        self._down_until: dict[str, float] = {}
        self._turn = itertools.count()
        self._owners: dict[str, SchedulerClient] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.failovers = 0

    @property
    def targets(self) -> list[str]:
        return [replica.target for replica in self._replicas]

    async def keep_resolved(self, every_s: float = 5.0) -> None:
        """Follow the names' addresses (replicas come, go, restart elsewhere), until cancelled.
        A vanished replica's client is closed after its reports' time to arrive."""
        while True:
            await asyncio.sleep(every_s)
            try:
                wanted = await asyncio.to_thread(resolve_targets, self._names, strict=True)
            except OSError:
                continue  # a DNS hiccup: keep the replicas we know
            if not wanted or set(wanted) == set(self.targets):
                continue
            kept = [r for r in self._replicas if r.target in wanted]
            gone = [r for r in self._replicas if r.target not in wanted]
            known = {r.target for r in kept}
            # A new list, never changed in place: a pick under way keeps the one it took.
            self._replicas = kept + [self._client(t) for t in wanted if t not in known]
            if gone:
                task = asyncio.get_running_loop().create_task(self._close_later(gone))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_later(self, gone: list[SchedulerClient]) -> None:
        """Reports of leases a vanished replica issued may still be on their way."""
        await asyncio.sleep(self._timeout_s * 10)
        await asyncio.gather(*(replica.close() for replica in gone), return_exceptions=True)

    def _order(self) -> list[SchedulerClient]:
        """Replicas to try, from the next in turn; those marked down last (all of them may
        be: they are tried anyway rather than failing without asking)."""
        replicas = self._replicas
        start = next(self._turn) % len(replicas)
        order = replicas[start:] + replicas[:start]
        now = time.monotonic()
        return sorted(order, key=lambda r: self._down_until.get(r.target, 0.0) > now)

    async def pick(self, query: PickQuery, *, timeout_s: float | None = None) -> Placement:
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        last: SchedulerUnreachableError | None = None
        order = self._order()
        for attempt, replica in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # A replica that hangs (stopped, partitioned: its connection still looks up) may
            # take only its share of what is left, so the others still get their turn.
            budget = remaining if attempt == len(order) - 1 else remaining / 2
            try:
                placement = await replica.pick(query, timeout_s=budget)
            except SchedulerUnreachableError as error:
                self._down_until[replica.target] = time.monotonic() + self._down_for_s
                last = error
                continue
            if attempt:
                self.failovers += 1
            if placement.answer.lease_id:
                self._owners[lease_owner(placement.answer.lease_id)] = replica
            return placement
        raise last or SchedulerUnreachableError("no scheduler replica answered in time")

    def _owner(self, lease_id: str) -> SchedulerClient | None:
        return self._owners.get(lease_owner(lease_id))

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
        owner = self._owner(lease_id)
        if owner is None:
            return False
        return await owner.complete(
            lease_id=lease_id,
            outcome=outcome,
            observed_ttft_s=observed_ttft_s,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
        )

    async def progress(self, *, lease_id: str, event: ProgressEvent) -> bool:
        owner = self._owner(lease_id)
        return False if owner is None else await owner.progress(lease_id=lease_id, event=event)

    async def cancel(self, *, pick_id: str) -> bool:
        results = await asyncio.gather(
            *(replica.cancel(pick_id=pick_id) for replica in self._replicas),
            return_exceptions=True,
        )
        return any(result is True for result in results)

    async def renew(self, *, lease_ids: Sequence[str]) -> int:
        by_owner: dict[SchedulerClient, list[str]] = {}
        for lease_id in lease_ids:
            owner = self._owner(lease_id)
            if owner is not None and owner in self._replicas:
                by_owner.setdefault(owner, []).append(lease_id)
        results = await asyncio.gather(
            *(owner.renew(lease_ids=ids) for owner, ids in by_owner.items()),
            return_exceptions=True,
        )
        # A lost replica's leases are gone with it: nothing to renew there.
        return sum(result for result in results if isinstance(result, int))

    async def _first(self, call: Any) -> Any:
        last: Exception | None = None
        for replica in self._order():
            try:
                return await call(replica)
            except SchedulerUnreachableError as error:
                last = error
        assert last is not None
        raise last

    async def list_endpoints(self, *, model: str = "") -> list[EndpointStatus]:
        result: list[EndpointStatus] = await self._first(
            lambda replica: replica.list_endpoints(model=model)
        )
        return result

    async def explain(
        self, *, limit: int = DEFAULT_EXPLAIN_LIMIT, request_id: str = ""
    ) -> list[DecisionRecord]:
        results = await asyncio.gather(
            *(r.explain(limit=limit, request_id=request_id) for r in self._replicas),
            return_exceptions=True,
        )
        records = [record for result in results if isinstance(result, list) for record in result]
        if not records and all(isinstance(r, BaseException) for r in results):
            error = results[0]
            assert isinstance(error, BaseException)
            raise error
        # Newest first over every replica (their clocks are each process's own monotonic
        # time, so the order across replicas is approximate).
        records.sort(key=lambda record: record.decided_at, reverse=True)
        return records[:limit]

    async def drain(self, *, endpoint_id: str, timeout_s: float = 0.0) -> DrainResult:
        results = await asyncio.gather(
            *(r.drain(endpoint_id=endpoint_id, timeout_s=timeout_s) for r in self._replicas),
            return_exceptions=True,
        )
        drained = [result for result in results if isinstance(result, DrainResult)]
        if not drained:
            error = results[0]
            assert isinstance(error, BaseException)
            raise error
        # Drained only where every replica that answered says so: each routes on its own rings.
        return DrainResult(
            drained=all(result.drained for result in drained),
            remaining_in_flight=sum(result.remaining_in_flight for result in drained),
        )

    async def undrain(self, *, endpoint_id: str) -> bool:
        results = await asyncio.gather(
            *(r.undrain(endpoint_id=endpoint_id) for r in self._replicas),
            return_exceptions=True,
        )
        return any(result is True for result in results)

    async def watch_migrations(self, *, watcher: str = "") -> AsyncIterator[MigrationOrder]:
        """Every replica's orders, merged (each replica orders moves of its own leases)."""
        queue: asyncio.Queue[MigrationOrder] = asyncio.Queue()

        async def follow(replica: SchedulerClient) -> None:
            # Each replica's stream on its own: one that is down must not cost the others'
            # orders; it is subscribed again once it is back.
            while True:
                try:
                    async for order in replica.watch_migrations(watcher=watcher):
                        await queue.put(order)
                except Exception as error:
                    logger.debug("migration orders of %s: %s", replica.target, error)
                await asyncio.sleep(self._down_for_s)

        tasks = [asyncio.create_task(follow(replica)) for replica in list(self._replicas)]
        try:
            while True:
                yield await queue.get()
        finally:
            for task in tasks:
                task.cancel()

    async def report_migration(self, report: MigrationReport) -> bool:
        owner = self._owner(report.lease_id)
        return False if owner is None else await owner.report_migration(report)

    async def close(self) -> None:
        await asyncio.gather(*(replica.close() for replica in self._replicas))
