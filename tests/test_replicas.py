"""Active-active scheduler replicas: shared load, membership epochs, failover.

The pure parts (`scheduler/peer_loads.py`) on a fake clock; then real replicas, each a
`SchedulerService` behind its own gRPC server with a `PeerExchange`, and the router's
`ReplicatedSchedulerClient` in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import pytest
from twinroute.scheduler.api import PickQuery, StaleMembershipError
from twinroute.scheduler.build import build_service
from twinroute.scheduler.client import ReplicatedSchedulerClient, SchedulerClient, lease_owner
from twinroute.scheduler.peer_loads import (
    EndpointLoadShare,
    PeerLoads,
    PeerShare,
    ReplicaMembership,
    membership_digest,
)
from twinroute.scheduler.peers import PeerExchange, enable_replicas
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings
from twinroute.scheduler.types import Endpoint, LoadSnapshot

MODEL = "m"
ENDPOINTS = [Endpoint(id=f"e{i}", address=f"127.0.0.1:{9300 + i}", model=MODEL) for i in range(4)]


def share(replica: str, *, at: float, digest: str = "d", changed_at: float = 0.0,
          **loads: EndpointLoadShare) -> PeerShare:  # fmt: skip
    return PeerShare(
        replica_id=replica, received_at=at, sent_at_unix_s=0.0, membership_digest=digest,
        membership_changed_at_unix_s=changed_at, endpoints=loads,
    )  # fmt: skip


def test_peers_load_adds_to_ours_until_it_goes_stale() -> None:
    peers = PeerLoads(own_replica_id="me", stale_after_s=1.0)
    assert not peers.update(share("me", at=0.0, e1=EndpointLoadShare(in_flight=9)))
    peers.update(share("a", at=0.0, e1=EndpointLoadShare(in_flight=2, pending_prefill_tokens=500)))
    peers.update(share("b", at=0.5, e1=EndpointLoadShare(in_flight=1, decoding=1)))
    own = LoadSnapshot(in_flight=1, pending_prefill_tokens=100, queued=3)
    seen = peers.add_to(own, "e1", now=0.6)
    assert (seen.in_flight, seen.pending_prefill_tokens, seen.decoding) == (4, 600, 1)
    assert seen.queued == 3, "scraped figures are the engine's own: never summed"
    # a's share is 1 s old at 1.0: only b's counts; at 1.5 nothing does.
    assert peers.add_to(own, "e1", now=1.2).in_flight == 2
    assert peers.add_to(own, "e1", now=1.5) is own
    assert peers.add_to(own, "e2", now=0.1) is own


def test_a_replica_is_behind_only_a_fresh_peer_with_newer_membership_and_only_for_a_while() -> None:
    peers = PeerLoads(own_replica_id="me", stale_after_s=1.0)
    replica = ReplicaMembership(peers=peers, grace_s=2.0)
    assert replica.observe(ENDPOINTS[:3], wall_now=100.0)
    assert not replica.observe(list(reversed(ENDPOINTS[:3])), wall_now=101.0), "order-free"
    newer = membership_digest(ENDPOINTS)
    # An older, different membership (the peer is the one behind): we route.
    peers.update(share("a", at=0.0, digest=newer, changed_at=99.0))
    assert replica.behind(now=0.1) is None
    # A newer one: refuse, for at most the grace, then route on what we have.
    peers.update(share("a", at=0.2, digest=newer, changed_at=100.5))
    assert replica.behind(now=0.3) is not None
    peers.update(share("a", at=1.0, digest=newer, changed_at=100.5))
    assert replica.behind(now=1.9) is not None
    peers.update(share("a", at=2.0, digest=newer, changed_at=100.5))
    assert replica.behind(now=2.4) is None and replica.routed_while_behind == 1
    # Caught up: the same digest is no disagreement.
    replica.observe(ENDPOINTS, wall_now=102.0)
    assert replica.behind(now=2.5) is None


def test_a_replica_that_has_not_heard_from_discovery_is_behind_and_no_one_else_is() -> None:
    peers = PeerLoads(own_replica_id="me", stale_after_s=1.0)
    starting = ReplicaMembership(peers=peers, grace_s=2.0)
    assert not starting.observe([], wall_now=100.0), "no endpoints: no opinion"
    assert membership_digest([]) == ""
    peers.update(share("a", at=0.0, digest=membership_digest(ENDPOINTS), changed_at=50.0))
    assert starting.behind(now=0.1) is not None, "it asks another replica to answer"
    # The other way round: a healthy replica hearing from one just started (no opinion yet,
    # and the newest clock) is not behind it.
    healthy = ReplicaMembership(peers=PeerLoads(own_replica_id="a"), grace_s=2.0)
    healthy.observe(ENDPOINTS, wall_now=50.0)
    healthy.peers.update(share("me", at=0.0, digest="", changed_at=100.0))
    assert healthy.behind(now=0.1) is None


def test_peers_not_heard_from_for_long_are_forgotten() -> None:
    peers = PeerLoads(own_replica_id="me", stale_after_s=1.0)
    peers.update(share("old", at=0.0, e1=EndpointLoadShare(in_flight=1)))
    peers.update(share("new", at=20.0, e1=EndpointLoadShare(in_flight=1)))
    assert [s.replica_id for s in peers.shares()] == ["new"]


@dataclass
class Replica:
    service: SchedulerService
    server: GrpcServer
    exchange: asyncio.Task[None]
    replica_id: str

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        self.exchange.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.exchange
        await self.server.stop(grace_s=0.1)


async def start_replicas(count: int, *, stale_after_s: float = 0.5) -> list[Replica]:
    settings = SchedulerSettings(policy="dualmap", served_models=(MODEL,))
    built = []
    for _ in range(count):
        service = build_service(settings)
        service.set_endpoints(ENDPOINTS)
        replica_id = enable_replicas(service, stale_after_s=stale_after_s, grace_s=5.0)
        server = GrpcServer(service=service, listen="127.0.0.1:0")
        await server.start()
        built.append((service, server, replica_id))
    addresses = [server.address for _, server, _ in built]
    replicas = []
    for service, server, replica_id in built:
        exchange = PeerExchange(
            service=service, replica_id=replica_id, targets=addresses,
            own_addresses=[server.address], interval_s=0.01,
        )  # fmt: skip
        server.servicer.explain_elsewhere = exchange.explain
        replicas.append(Replica(service, server, asyncio.create_task(exchange.run()), replica_id))
    return replicas


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started = await start_replicas(3)
    try:
        yield started
    finally:
        for replica in started:
            await replica.stop()


def query(index: int) -> PickQuery:
    ids = np.arange(index * 1000, index * 1000 + 256, dtype=np.uint32)
    return PickQuery(request_id=f"r{index}", model=MODEL, token_ids=ids)


async def until(condition: Callable[[], bool], *, what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.01)


async def test_each_replica_sees_the_load_the_others_placed(replicas: list[Replica]) -> None:
    a, b, c = replicas
    client = SchedulerClient(target=a.address, timeout_s=5.0)
    try:
        placement = await client.pick(query(1))
        endpoint = placement.answer.endpoint.id
        assert lease_owner(placement.answer.lease_id) == a.replica_id

        def seen_by(replica: Replica) -> int:
            return replica.service.core.load(endpoint, now=replica.service.now()).in_flight

        await until(lambda: seen_by(b) == 1 and seen_by(c) == 1, what="peers see a's lease")
        await placement.complete("success")
        await until(lambda: seen_by(b) == 0 and seen_by(c) == 0, what="and its end")
    finally:
        await client.close()


async def test_a_dead_replicas_load_drops_out_after_the_staleness_limit(
    replicas: list[Replica],
) -> None:
    a, b, _ = replicas
    client = SchedulerClient(target=a.address, timeout_s=5.0)
    try:
        placement = await client.pick(query(2))
        endpoint = placement.answer.endpoint.id

        def seen_by_b() -> int:
            return b.service.core.load(endpoint, now=b.service.now()).in_flight

        await until(lambda: seen_by_b() == 1, what="b sees a's lease")
        stopped = time.monotonic()
        await a.stop()
        await until(lambda: seen_by_b() == 0, what="a's load expires at b", within_s=3.0)
        assert time.monotonic() - stopped >= 0.3, "not before the staleness limit (0.5 s)"
    finally:
        await client.close()


async def test_picks_rotate_over_replicas_and_reports_reach_the_owner(
    replicas: list[Replica],
) -> None:
    client = ReplicatedSchedulerClient(targets=[r.address for r in replicas], timeout_s=5.0)
    try:
        placements = [await client.pick(query(i)) for i in range(6)]
        owners = {lease_owner(p.answer.lease_id) for p in placements}
        assert owners == {r.replica_id for r in replicas}
        assert sum(len(r.service.core.leases) for r in replicas) == 6
        assert await client.renew(lease_ids=[p.answer.lease_id for p in placements]) == 6
        for placement in placements:
            assert await client.complete(lease_id=placement.answer.lease_id)
        assert sum(len(r.service.core.leases) for r in replicas) == 0
    finally:
        await client.close()


async def test_a_dead_replica_costs_no_pick(replicas: list[Replica]) -> None:
    client = ReplicatedSchedulerClient(targets=[r.address for r in replicas], timeout_s=2.0)
    try:
        await client.pick(query(0))
        await replicas[1].stop()
        slowest = 0.0
        for i in range(12):
            started = time.monotonic()
            placement = await client.pick(query(i))
            slowest = max(slowest, time.monotonic() - started)
            assert lease_owner(placement.answer.lease_id) != replicas[1].replica_id
        assert client.failovers >= 1
        assert slowest < 1.0, f"a pick waited {slowest:.2f} s"
    finally:
        await client.close()


async def test_renewals_survive_a_replica_that_went_away(replicas: list[Replica]) -> None:
    client = ReplicatedSchedulerClient(targets=[r.address for r in replicas], timeout_s=5.0)
    try:
        placements = [await client.pick(query(i)) for i in range(3)]
        # As keep_resolved does when a replica's address stops resolving.
        client._replicas = [r for r in client._replicas if r.target != replicas[0].address]
        renewed = await client.renew(lease_ids=[p.answer.lease_id for p in placements])
        assert renewed == sum(
            lease_owner(p.answer.lease_id) != replicas[0].replica_id for p in placements
        )
    finally:
        await client.close()


async def test_a_hung_replica_does_not_eat_the_pick_deadline(replicas: list[Replica]) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, then say nothing: a stopped process behind a live socket

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    hung_address = f"127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    client = ReplicatedSchedulerClient(targets=[hung_address, replicas[0].address], timeout_s=2.0)
    try:
        for i in range(4):
            started = time.monotonic()
            placement = await client.pick(query(i))
            assert time.monotonic() - started < 1.9
            assert lease_owner(placement.answer.lease_id) == replicas[0].replica_id
    finally:
        await client.close()
        hung.close()


async def test_a_replica_behind_its_peers_membership_sends_picks_elsewhere(
    replicas: list[Replica],
) -> None:
    a, b, c = replicas
    newer = [*ENDPOINTS, Endpoint(id="e9", address="127.0.0.1:9399", model=MODEL)]
    b.service.set_endpoints(newer)
    c.service.set_endpoints(newer)
    direct = SchedulerClient(target=a.address, timeout_s=5.0)
    try:
        await until(
            lambda: (
                a.service.core.replica is not None
                and a.service.core.replica.behind(now=a.service.now()) is not None
            ),
            what="a notices it is behind",
        )
        with pytest.raises(StaleMembershipError):
            await direct.pick(query(3))
        client = ReplicatedSchedulerClient(targets=[r.address for r in replicas], timeout_s=5.0)
        try:
            for i in range(4):
                placement = await client.pick(query(i))
                assert lease_owner(placement.answer.lease_id) != a.replica_id
        finally:
            await client.close()
    finally:
        await direct.close()


async def test_replica_metrics_show_peers_their_age_and_the_membership(
    replicas: list[Replica],
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from twinroute.scheduler.telemetry import SchedulerTelemetry

    a = replicas[0]
    registry = CollectorRegistry()
    SchedulerTelemetry(registry=registry, core=a.service.core, clock=a.service.now)
    await until(
        lambda: len(a.service.core.peer_loads.fresh(now=a.service.now())) == 2  # type: ignore[union-attr]
        , what="a hears both peers",
    )  # fmt: skip
    text = generate_latest(registry).decode()
    assert 'twinroute_scheduler_peers{state="fresh"} 2.0' in text
    for replica in replicas[1:]:
        assert f'twinroute_scheduler_peer_share_age_seconds{{peer="{replica.replica_id}"}}' in text
    assert "twinroute_scheduler_membership_behind 0.0" in text
    assert f'digest="{membership_digest(ENDPOINTS)}"' in text


async def test_a_prompt_one_replica_placed_is_known_to_the_others(
    replicas: list[Replica],
) -> None:
    a, b, c = replicas
    client = SchedulerClient(target=a.address, timeout_s=5.0)
    try:
        placement = await client.pick(query(7))
        endpoint = placement.answer.endpoint.id
        keys, _ = a.service._prompt_keys(query(7))

        def known_by(replica: Replica) -> int:
            return replica.service.core.prefix_index.matched_blocks(endpoint, keys)

        await until(
            lambda: known_by(b) == known_by(c) == len(keys.block_hashes) > 0,
            what="b and c record a's placement",
        )
        # b now sends the same prompt where a did: the cache is where a put it.
        via_b = SchedulerClient(target=b.address, timeout_s=5.0)
        try:
            again = await via_b.pick(query(7))
        finally:
            await via_b.close()
        assert again.answer.endpoint.id == endpoint
        assert again.answer.reason == "cache_affinity"
    finally:
        await client.close()


def test_a_new_stream_starts_with_a_snapshot_of_what_the_replica_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twinroute.scheduler import peers as peer_module

    settings = SchedulerSettings(policy="dualmap", served_models=(MODEL,))
    source = build_service(settings)
    source.set_endpoints(ENDPOINTS)
    replica_id = enable_replicas(source, stale_after_s=1.0, grace_s=1.0)
    for i in range(6):
        source.pick_now(query(i))
    index = source.core.prefix_index
    monkeypatch.setattr(peer_module, "SNAPSHOT_HASHES_PER_MESSAGE", 20)
    unshared = list(index.journal or [])
    messages = peer_module.snapshot_shares(source, replica_id=replica_id)
    assert len(messages) > 1, "split into messages of at most 20 hashes"
    assert all(sum(len(p.block_hashes) for p in m.placed) <= 20 for m in messages)
    # A replica that joins takes them in order and ends with the same record, same order.
    joined = build_service(settings).core.prefix_index
    for message in messages:
        for placed in message.placed:
            joined.record_hashes(placed.endpoint_id, placed.block_hashes)
    for endpoint in ENDPOINTS:
        assert joined.snapshot(endpoint.id) == index.snapshot(endpoint.id)
    assert index.journal == unshared and unshared, "the journal is left for the next share"


async def test_any_replica_explains_a_request_another_placed(replicas: list[Replica]) -> None:
    a, b, _ = replicas
    via_a = SchedulerClient(target=a.address, timeout_s=5.0)
    via_b = SchedulerClient(target=b.address, timeout_s=5.0)
    try:
        placement = await via_a.pick(query(11))
        # b placed nothing: it asks its peers (once they are streaming to each other).
        await until(lambda: len(b.service.core.peer_loads.fresh(now=b.service.now())) == 2,  # type: ignore[union-attr]
                    what="b hears its peers")  # fmt: skip
        records = await via_b.explain(request_id="r11")
        assert [r.lease_id for r in records] == [placement.answer.lease_id]
        assert await via_b.explain(request_id="nobody-placed-this") == []
    finally:
        await via_a.close()
        await via_b.close()
