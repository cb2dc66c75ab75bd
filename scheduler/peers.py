"""Active-active replicas over gRPC: each replica streams its load to every peer.

`PeerExchange` runs in every replica given `--peers`: one client stream per peer address
(`SchedulerPeers/ShareLoad`), a `LoadShare` every `interval_s` with the load this replica's own
leases put on each endpoint and its ring membership digest. A host name that resolves to several
addresses (a Kubernetes headless Service) stands for all of them and is resolved again every few
seconds, so replicas that come and go (or restart at a new address) are found. `PeerServicer`
takes the peers' shares into the core's `PeerLoads` (`scheduler/peer_loads.py`, where the
consistency model is).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from twinroute.scheduler.client import resolve_targets
from twinroute.scheduler.peer_loads import (
    EndpointLoadShare,
    PeerLoads,
    PeerShare,
    ReplicaMembership,
)
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.tokens import TokenGuard
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEFAULT_SHARE_INTERVAL_S = 0.02
RESOLVE_EVERY_S = 5.0
RECONNECT_AFTER_S = 0.5
# Marks an Explain one replica asks another on a caller's behalf (never asked on again).
FORWARDED_METADATA = "x-twinroute-forwarded"
# Block hashes per snapshot message at most (gRPC's default message limit is 4 MiB).
SNAPSHOT_HASHES_PER_MESSAGE = 100_000

Context = grpc.aio.ServicerContext[Any, Any]


def enable_replicas(service: SchedulerService, *, stale_after_s: float, grace_s: float) -> str:
    """Make `service` one of several replicas: its core adds the peers' load and compares
    memberships. Returns this replica's id (its lease-id prefix, so a lease names its owner)."""
    core = service.core
    replica_id = core.leases.id_prefix.rstrip("-") or "replica"
    core.peer_loads = PeerLoads(own_replica_id=replica_id, stale_after_s=stale_after_s)
    core.prefix_index.journal = []
    core.replica = ReplicaMembership(peers=core.peer_loads, grace_s=grace_s)
    core.replica.observe(core.endpoints.values(), wall_now=time.time())
    return replica_id


def _load_only_share(service: SchedulerService, *, replica_id: str) -> pb.LoadShare:
    core = service.core
    assert core.replica is not None, "enable_replicas first"
    share = pb.LoadShare(
        replica_id=replica_id,
        sent_at_unix_s=time.time(),
        membership_digest=core.replica.digest,
        membership_changed_at_unix_s=core.replica.changed_at_unix_s,
    )
    for endpoint_id, load in core.leases.loads(now=service.now()).items():
        share.endpoints.add(
            endpoint_id=endpoint_id,
            in_flight=load.in_flight,
            pending_prefill_tokens=load.pending_prefill_tokens,
            decoding=load.decoding,
            decoding_tokens=load.decoding_tokens,
        )
    return share


def own_share(service: SchedulerService, *, replica_id: str) -> pb.LoadShare:
    """This replica's load, and the placements it made since the previous share."""
    core = service.core
    share = _load_only_share(service, replica_id=replica_id)
    journal = core.prefix_index.journal
    if journal:
        for endpoint_id, hashes in journal:
            share.placed.add(endpoint_id=endpoint_id, block_hashes=hashes)
        journal.clear()
    return share


def snapshot_shares(service: SchedulerService, *, replica_id: str) -> list[pb.LoadShare]:
    """Everything this replica's prefix index holds, as shares (with the current load) of at
    most `SNAPSHOT_HASHES_PER_MESSAGE` hashes: what a peer gets first on every new stream, so
    a replica that (re)joins knows the caches at once instead of only what is placed later."""
    index = service.core.prefix_index
    messages: list[pb.LoadShare] = []
    current = _load_only_share(service, replica_id=replica_id)
    room = SNAPSHOT_HASHES_PER_MESSAGE
    for endpoint_id in list(index.endpoints()):
        hashes = index.snapshot(endpoint_id)
        while hashes:
            if room == 0:
                messages.append(current)
                current = _load_only_share(service, replica_id=replica_id)
                room = SNAPSHOT_HASHES_PER_MESSAGE
            # Least recent first across messages, so the receiver's order ends as ours.
            part, hashes = hashes[-room:], hashes[:-room]
            current.placed.add(endpoint_id=endpoint_id, block_hashes=part)
            room -= len(part)
    messages.append(current)
    return messages


def share_from_pb(message: pb.LoadShare, *, received_at: float) -> PeerShare:
    return PeerShare(
        replica_id=message.replica_id,
        received_at=received_at,
        sent_at_unix_s=message.sent_at_unix_s,
        membership_digest=message.membership_digest,
        membership_changed_at_unix_s=message.membership_changed_at_unix_s,
        endpoints={
            e.endpoint_id: EndpointLoadShare(
                in_flight=e.in_flight,
                pending_prefill_tokens=e.pending_prefill_tokens,
                decoding=e.decoding,
                decoding_tokens=e.decoding_tokens,
            )
            for e in message.endpoints
        },
        lag_s=time.time() - message.sent_at_unix_s,
    )


class PeerServicer(pb_grpc.SchedulerPeersServicer):
    """Takes the peers' shares; with a token configured, peers must send it (they share it)."""

    def __init__(self, *, service: SchedulerService, admin_token: str | None = None) -> None:
        self._service = service
        self._guard = TokenGuard(admin_token)
        # Where the peers' forwarded gateway access-log entries go (this replica's endpoint
        # picker); None: dropped.
        self.on_gateway_log: Callable[[bytes], None] | None = None
        # Set when the server stops: the peers' endless streams end at their next share
        # instead of holding the server for its whole grace period.
        self.closing = False

    async def ShareLoad(
        self, request_iterator: AsyncIterator[pb.LoadShare], context: Context
    ) -> pb.ShareLoadAck:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        why = self._guard.refusal(str(header)) if self._guard.required else None
        if why is not None:
            self._guard.refused("ShareLoad", why, peer=context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"peer refused: {why}")
        peers = self._service.core.peer_loads
        if peers is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this scheduler runs without --peers"
            )
        assert peers is not None
        core = self._service.core
        async for message in request_iterator:
            if self.closing:
                break
            if not peers.update(share_from_pb(message, received_at=self._service.now())):
                continue  # our own share (a replica listed among its own peers)
            for placed in message.placed:
                if placed.endpoint_id in core.endpoints:
                    core.prefix_index.record_hashes(placed.endpoint_id, placed.block_hashes)
            if self.on_gateway_log is not None:
                for entry in message.gateway_logs:
                    self.on_gateway_log(entry)
        return pb.ShareLoadAck()


class PeerExchange:
    """Streams this replica's share to every peer; `run` until cancelled.

    One share is taken per interval and sent to every peer (its placements since the last one
    go once to each); a peer whose stream is down misses what was said meanwhile, and its
    queue keeps only the newest shares."""

    QUEUE_SHARES = 50
    # Gateway access-log entries held for the next share at most (beyond, the oldest go: their
    # leases then close at the lease TTL).
    MAX_GATEWAY_LOGS = 10_000

    def __init__(
        self,
        *,
        service: SchedulerService,
        replica_id: str,
        targets: Sequence[str],
        own_addresses: Sequence[str] = (),
        interval_s: float = DEFAULT_SHARE_INTERVAL_S,
        admin_token: str | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        resolver: Callable[[Sequence[str]], list[str]] = lambda t: resolve_targets(t, strict=True),
    ) -> None:
        """`root_certificates` (PEM): the peers serve TLS signed by that CA (the replicas'
        own certificate); `tls_server_name`: the name it carries (peers are dialled by IP)."""
        self._service = service
        self._replica_id = replica_id
        self._targets = tuple(targets)
        self._own = frozenset(own_addresses)
        self._interval_s = interval_s
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None
        self._resolver = resolver
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=root_certificates)
            if root_certificates is not None
            else None
        )
        self._channel_options: tuple[tuple[str, str], ...] = (
            (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
        )
        self._senders: dict[str, tuple[asyncio.Task[None], asyncio.Queue[pb.LoadShare]]] = {}
        self._gateway_logs: collections.deque[bytes] = collections.deque(
            maxlen=self.MAX_GATEWAY_LOGS
        )
        self.sent = 0

    def forward_gateway_log(self, entry: bytes) -> None:
        """Send an access-log entry this replica's picker cannot place (another replica picked
        the request) to every peer with the next share."""
        self._gateway_logs.append(entry)

    async def run(self) -> None:
        broadcast = asyncio.create_task(self._broadcast())
        try:
            while True:
                try:
                    wanted = set(await asyncio.to_thread(self._resolver, self._targets)) - self._own
                except OSError as error:
                    # DNS hiccup: keep streaming to the peers we know.
                    logger.warning("peers: %s; keeping the %d known", error, len(self._senders))
                    await asyncio.sleep(RESOLVE_EVERY_S)
                    continue
                for address in wanted - self._senders.keys():
                    logger.info("peer %s: sharing load every %g ms", address,
                                self._interval_s * 1000)  # fmt: skip
                    queue: asyncio.Queue[pb.LoadShare] = asyncio.Queue(self.QUEUE_SHARES)
                    task = asyncio.create_task(self._send_to(address, queue))
                    self._senders[address] = (task, queue)
                for address in self._senders.keys() - wanted:
                    self._senders.pop(address)[0].cancel()
                await asyncio.sleep(RESOLVE_EVERY_S)
        finally:
            broadcast.cancel()
            tasks = [broadcast, *(task for task, _ in self._senders.values())]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _broadcast(self) -> None:
        while True:
            share = own_share(self._service, replica_id=self._replica_id)
            if self._gateway_logs:
                share.gateway_logs.extend(self._gateway_logs)
                self._gateway_logs.clear()
            for _task, queue in self._senders.values():
                if queue.full():
                    queue.get_nowait()  # the oldest: the newest load is what counts
                queue.put_nowait(share)
            self.sent += 1
            await asyncio.sleep(self._interval_s)

    async def _stream(self, queue: asyncio.Queue[pb.LoadShare]) -> AsyncIterator[pb.LoadShare]:
        """A new stream: the snapshot of what this replica knows, then the shares as taken."""
        while not queue.empty():
            queue.get_nowait()  # older than the snapshot, which includes them
        for share in snapshot_shares(self._service, replica_id=self._replica_id):
            yield share
        while True:
            yield await queue.get()

    async def explain(self, *, limit: int, request_id: str) -> list[pb.DecisionRecord]:
        """The peers' decisions for `request_id` (a request another replica placed)."""
        metadata = (*(self._metadata or ()), (FORWARDED_METADATA, "1"))

        async def ask(address: str) -> list[pb.DecisionRecord]:
            async with self._channel(address) as channel:
                stub: Any = pb_grpc.SchedulerStub(channel)
                request = pb.ExplainRequest(limit=limit, request_id=request_id)
                response = await stub.Explain(request, timeout=1.0, metadata=metadata)
                return list(response.decisions)

        answers = await asyncio.gather(*(ask(a) for a in list(self._senders)),
                                       return_exceptions=True)  # fmt: skip
        return [record for answer in answers if isinstance(answer, list) for record in answer]

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address)
        return grpc.aio.secure_channel(address, self._credentials, options=self._channel_options)

    async def _send_to(self, address: str, queue: asyncio.Queue[pb.LoadShare]) -> None:
        failures = 0
        while True:
            async with self._channel(address) as channel:
                stub: Any = pb_grpc.SchedulerPeersStub(channel)
                try:
                    await stub.ShareLoad(self._stream(queue), metadata=self._metadata)
                    failures = 0
                except grpc.aio.AioRpcError as error:
                    # A peer that is down or restarting: try again shortly; its own shares
                    # stop meanwhile, and ours go stale on its side, as they should. One that
                    # keeps refusing (TLS or token mismatch) is said out loud.
                    failures += 1
                    log = logger.warning if failures in (4, 100) else logger.debug
                    log("peer %s: %s (%s), %d tries in a row", address, error.code().name,
                        error.details(), failures)  # fmt: skip
            await asyncio.sleep(RECONNECT_AFTER_S)
