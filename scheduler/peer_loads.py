"""What the other replicas of this scheduler placed, as they last said (active-active).

Replicas of one pool's scheduler compute the same DualMap candidate pair for a prompt from the
same ring membership; what a replica cannot see is the load its peers' leases put on each
engine since the engines were last scraped. Each replica sends its own leases' load per
endpoint to every peer every few milliseconds (`scheduler/peers.py`); this table keeps the
latest share of each peer and adds the fresh ones to the replica's own view of an endpoint.

Consistency model (docs/design.md, "Active-active replicas"): a peer's load is at most one
send interval plus the network old while the peer lives; a share older than `stale_after_s`
(a peer that died or cannot reach us) stops counting, so a dead replica's in-flight requests
drop out of the picture until the engines' own scraped queues show them. Membership: a replica
whose ring membership digest differs from a fresh peer's, and whose membership changed before
that peer's did, is behind (`behind_peer`); the service then refuses picks for at most a grace
period so that routers ask a replica that is up to date.

Pure data, no transport: the routing core reads it on the hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from twinroute.scheduler.types import Endpoint, LoadSnapshot

# A peer's share stops counting this long after it arrived (the sender sends every ~20 ms).
DEFAULT_PEER_STALE_S = 1.0
# How long a replica behind its peers' membership refuses picks at most.
DEFAULT_MEMBERSHIP_GRACE_S = 2.0


def membership_digest(endpoints: Iterable[Endpoint]) -> str:
    """The same on every replica that sees the same pool: sorted ids, addresses and roles.
    "" for no endpoints: a replica that has not heard from discovery yet has no opinion (its
    peers never take it for newer, and it takes itself for behind any peer that has one)."""
    lines = sorted(f"{e.id} {e.address} {e.role.value}" for e in endpoints)
    if not lines:
        return ""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class EndpointLoadShare:
    in_flight: int = 0
    pending_prefill_tokens: int = 0
    decoding: int = 0
    decoding_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PeerShare:
    """One peer's last word: the load its own leases carry, and its ring membership."""

    replica_id: str
    received_at: float  # the receiver's clock
    sent_at_unix_s: float
    membership_digest: str
    membership_changed_at_unix_s: float
    endpoints: Mapping[str, EndpointLoadShare] = field(default_factory=dict)
    # The receiver's wall clock minus `sent_at_unix_s` on arrival: transit plus clock skew.
    lag_s: float = 0.0


class PeerLoads:
    """The latest share of each peer and the sum of the fresh ones per endpoint."""

    def __init__(self, *, own_replica_id: str, stale_after_s: float = DEFAULT_PEER_STALE_S):
        if stale_after_s <= 0:
            raise ValueError(f"peer staleness must be positive, got {stale_after_s}")
        self.own_replica_id = own_replica_id
        self.stale_after_s = stale_after_s
        self._shares: dict[str, PeerShare] = {}
        # A peer not heard from for this long is forgotten (a restarted replica comes back
        # under a new id; the old one must not linger in the metrics).
        self.forget_after_s = 10 * stale_after_s
        self._totals: dict[str, EndpointLoadShare] = {}
        # When the oldest counted share goes stale: the totals are recomputed then.
        self._valid_until = float("inf")

    def update(self, share: PeerShare) -> bool:
        """Take a peer's share; False (ignored) for our own (a replica listed among its peers)."""
        if share.replica_id == self.own_replica_id:
            return False
        self._shares[share.replica_id] = share
        self._recompute(share.received_at)
        return True

    def _recompute(self, now: float) -> None:
        totals: dict[str, list[int]] = {}
        valid_until = float("inf")
        forgotten = [
            r for r, s in self._shares.items() if now - s.received_at > self.forget_after_s
        ]
        for replica_id in forgotten:
            del self._shares[replica_id]
        for share in self._shares.values():
            expires = share.received_at + self.stale_after_s
            if expires <= now:
                continue
            valid_until = min(valid_until, expires)
            for endpoint_id, load in share.endpoints.items():
                row = totals.setdefault(endpoint_id, [0, 0, 0, 0])
                row[0] += load.in_flight
                row[1] += load.pending_prefill_tokens
                row[2] += load.decoding
                row[3] += load.decoding_tokens
        self._totals = {key: EndpointLoadShare(*row) for key, row in totals.items()}
        self._valid_until = valid_until

    def added_load(self, endpoint_id: str, *, now: float) -> EndpointLoadShare | None:
        """What the fresh peers' leases put on `endpoint_id`; None when nothing."""
        if now >= self._valid_until:
            self._recompute(now)
        return self._totals.get(endpoint_id)

    def add_to(self, own: LoadSnapshot, endpoint_id: str, *, now: float) -> LoadSnapshot:
        added = self.added_load(endpoint_id, now=now)
        if added is None:
            return own
        return LoadSnapshot(
            in_flight=own.in_flight + added.in_flight,
            pending_prefill_tokens=own.pending_prefill_tokens + added.pending_prefill_tokens,
            decoding=own.decoding + added.decoding,
            decoding_tokens=own.decoding_tokens + added.decoding_tokens,
            running=own.running,
            queued=own.queued,
            kv_usage=own.kv_usage,
            scrape_age_s=own.scrape_age_s,
        )

    def shares(self) -> list[PeerShare]:
        """Every peer heard from, fresh or not (for metrics)."""
        return list(self._shares.values())

    def fresh(self, *, now: float) -> list[PeerShare]:
        return [s for s in self._shares.values() if now - s.received_at < self.stale_after_s]

    def behind_peer(self, *, digest: str, changed_at_unix_s: float, now: float) -> PeerShare | None:
        """A fresh peer whose membership differs from ours and changed after ours did: ours is
        the older picture. None when no peer says so (or all agree)."""
        for share in self.fresh(now=now):
            if share.membership_digest and (
                not digest
                or (
                    share.membership_digest != digest
                    and share.membership_changed_at_unix_s > changed_at_unix_s
                )
            ):
                return share
        return None


class ReplicaMembership:
    """This replica's ring membership as its peers compare it (module docstring).

    `observe` takes every discovery snapshot; `behind` answers, per pick, whether a fresh peer
    has newer membership, for at most `grace_s` after this replica first noticed: a replica
    whose discovery never converges (cut off from the API server) routes on what it has rather
    than refusing for ever."""

    def __init__(self, *, peers: PeerLoads, grace_s: float = DEFAULT_MEMBERSHIP_GRACE_S) -> None:
        self.peers = peers
        self.grace_s = grace_s
        self.digest = ""
        self.changed_at_unix_s = 0.0
        self._behind_since: float | None = None
        self.routed_while_behind = 0

    def observe(self, endpoints: Iterable[Endpoint], *, wall_now: float) -> bool:
        """Take the endpoint set; True when the membership changed."""
        digest = membership_digest(endpoints)
        if digest == self.digest:
            return False
        self.digest = digest
        self.changed_at_unix_s = wall_now
        return True

    def behind(self, *, now: float) -> PeerShare | None:
        """The peer this replica is behind, while it should refuse picks for it; else None."""
        peer = self.peers.behind_peer(
            digest=self.digest, changed_at_unix_s=self.changed_at_unix_s, now=now
        )
        if peer is None:
            self._behind_since = None
            return None
        if self._behind_since is None:
            self._behind_since = now
        if now - self._behind_since > self.grace_s:
            self.routed_while_behind += 1
            return None
        return peer
