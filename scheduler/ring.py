"""Consistent-hash rings with virtual nodes, and DualMap's pair of independent rings.

`HashRing` places `virtual_nodes` points per endpoint on a 64-bit circle (xxh64 of
"<endpoint>#<i>" under the ring's seed) and maps a key to the owner of the first point at or
clockwise of the key's position. The key is mixed with the ring's seed (splitmix64 of
key ^ seed) before it is placed, so two rings with different seeds place the same key
independently, and keys that are small or sequential integers still spread over the circle.

`DualHashRing` keeps two such rings over the same membership. A key's candidates are
(first, second): first is ring 1's owner; second is ring 2's owner, or, when that is the same
endpoint as first, the next distinct endpoint clockwise on ring 2.

Remapping. Adding endpoint X to N endpoints changes a key's pair exactly when X enters it:
a ring's clockwise order of distinct endpoints only gains X, so if X is neither the new first
nor the new second, the old first and second are unchanged. Removing X changes exactly the
pairs that contained X. In expectation (random vnode positions, independent rings) X is in
2/(N+1) of the pairs after it is added, and was in 2/N of them before it is removed, which is
also the least any scheme can move while every endpoint holds its fair share (2/size) of the
pair slots. `tests/test_ring.py` derives this in full and checks it; `twinroute bench ring-quality`
prints the measured figures.

Ordering is total and independent of history: points are sorted by position, and points at
equal positions (astronomically rare) by endpoint name, so rings with the same seed and
members answer the same in every process, whatever order the members came in.

Cost: `lookup` is one bisect over N * V positions (about 1 us in CPython); `candidates` is two
lookups, plus a short clockwise walk on ring 2 for the ~1/N of keys whose owners collide.
`add`/`remove` merge or filter the sorted arrays (O(N * V)) and re-list the positions for
bisect: a few milliseconds at 512 endpoints x 256 virtual nodes. `lookup_many` is vectorised
with `np.searchsorted`.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash
from twinroute.scheduler.keys import mix64, mix64_array

DEFAULT_VIRTUAL_NODES = 256
"""Virtual nodes per endpoint (KubeAI uses 256; vllm-router's consistent_hash uses 160)."""

DEFAULT_SEEDS = (0x5D1A_2B3C_4D5E_6F70, 0x0F1E_2D3C_4B5A_6978)
"""Seeds of DualMap's two rings; any two different values give independent rings."""

_MASK = (1 << 64) - 1
_NO_POINTS: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
_NO_OWNERS: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)


@dataclass(frozen=True, slots=True)
class RingChange:
    """What a `DualHashRing.sync` changed."""

    added: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


_NO_CHANGE = RingChange(added=frozenset(), removed=frozenset())


def _check_endpoint_id(endpoint_id: object) -> str:
    if not isinstance(endpoint_id, str):
        raise TypeError(f"endpoint id must be str, got {type(endpoint_id).__name__}")
    if not endpoint_id:
        raise ValueError("endpoint id must not be empty")
    return endpoint_id


def _as_key(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int | np.integer):
        raise TypeError(f"ring key must be an int, got {type(key).__name__}")
    return int(key) & _MASK


class HashRing:
    """One consistent-hash ring with virtual nodes."""

    def __init__(self, *, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, seed: int = 0) -> None:
        if virtual_nodes <= 0:
            raise ValueError(f"virtual_nodes must be positive, got {virtual_nodes}")
        self._virtual_nodes = virtual_nodes
        self._seed = _as_key(seed)
        self._points: dict[str, npt.NDArray[np.uint64]] = {}
        # Sorted endpoint names; `_owner_index` holds indexes into this list.
        self._owners: list[str] = []
        self._members: frozenset[str] = frozenset()
        self._positions = _NO_POINTS
        self._owner_index = _NO_OWNERS
        # A list copy of `_positions`: bisect on a list is ~2x faster than a scalar searchsorted.
        self._position_list: list[int] = []

    @property
    def virtual_nodes(self) -> int:
        return self._virtual_nodes

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def members(self) -> frozenset[str]:
        return self._members

    @property
    def sorted_members(self) -> tuple[str, ...]:
        """Members in name order: what the indexes from `lookup_many` refer to."""
        return tuple(self._owners)

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._points

    def __len__(self) -> int:
        return len(self._owners)

    def _points_of(self, endpoint_id: str) -> npt.NDArray[np.uint64]:
        points = np.fromiter(
            (
                xxhash.xxh64_intdigest(f"{endpoint_id}#{i}".encode(), seed=self._seed)
                for i in range(self._virtual_nodes)
            ),
            dtype=np.uint64,
            count=self._virtual_nodes,
        )
        points.sort()
        return points

    def add(self, endpoint_id: str) -> None:
        """Add one endpoint; adding a member again changes nothing."""
        endpoint_id = _check_endpoint_id(endpoint_id)
        if endpoint_id in self._points:
            return
        points = self._points_of(endpoint_id)
        self._points[endpoint_id] = points
        owner = bisect.bisect_left(self._owners, endpoint_id)
        self._owners.insert(owner, endpoint_id)
        self._members = frozenset(self._owners)
        slots = np.searchsorted(self._positions, points, side="left")
        at = np.minimum(slots, max(self._positions.shape[0] - 1, 0))
        if self._positions.shape[0] and bool(np.any(self._positions[at] == points)):
            # A position already taken: let the full rebuild order the tie by name.
            self._rebuild()
            return
        owners = self._owner_index + (self._owner_index >= owner).astype(np.int32)
        self._positions = np.insert(self._positions, slots, points)
        self._owner_index = np.insert(owners, slots, np.int32(owner))
        self._position_list = self._positions.tolist()

    def remove(self, endpoint_id: str) -> None:
        """Remove one endpoint; removing a non-member changes nothing (removal is idempotent,
        so a repeated drain or delete event is harmless)."""
        if self._points.pop(endpoint_id, None) is None:
            return
        owner = bisect.bisect_left(self._owners, endpoint_id)
        del self._owners[owner]
        self._members = frozenset(self._owners)
        keep = self._owner_index != owner
        owners = self._owner_index[keep]
        owners -= (owners > owner).astype(np.int32)
        self._positions = self._positions[keep]
        self._owner_index = owners
        self._position_list = self._positions.tolist()

    def update(self, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Apply several membership changes with one rebuild."""
        added = [_check_endpoint_id(e) for e in add]
        for endpoint_id in remove:
            self._points.pop(endpoint_id, None)
        for endpoint_id in added:
            if endpoint_id not in self._points:
                self._points[endpoint_id] = self._points_of(endpoint_id)
        self._rebuild()

    def _rebuild(self) -> None:
        self._owners = sorted(self._points)
        self._members = frozenset(self._owners)
        if not self._owners:
            self._positions, self._owner_index, self._position_list = _NO_POINTS, _NO_OWNERS, []
            return
        positions = np.concatenate([self._points[o] for o in self._owners])
        owners = np.repeat(np.arange(len(self._owners), dtype=np.int32), self._virtual_nodes)
        # Stable sort over points laid out in name order: ties stay in name order.
        order = np.argsort(positions, kind="stable")
        self._positions = positions[order]
        self._owner_index = owners[order]
        self._position_list = self._positions.tolist()

    def position(self, key: int) -> int:
        """Where `key` lands on this ring."""
        return mix64(_as_key(key) ^ self._seed)

    def _first_slot(self, key: int) -> int:
        if not self._owners:
            raise LookupError("the hash ring has no members")
        slot = bisect.bisect_left(self._position_list, self.position(key))
        return 0 if slot == len(self._position_list) else slot

    def lookup(self, key: int) -> str:
        """The owner of the first virtual node at or clockwise of `key`'s position."""
        return self._owners[self._owner_index.item(self._first_slot(key))]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct endpoints in clockwise order from `key`, each once; `lookup(key)` first."""
        slot = self._first_slot(key)
        owner_index = self._owner_index
        total = owner_index.shape[0]
        seen: set[int] = set()
        for step in range(total):
            owner = owner_index.item((slot + step) % total)
            if owner not in seen:
                seen.add(owner)
                yield self._owners[owner]
                if len(seen) == len(self._owners):
                    return

    def lookup_many(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int32]:
        """Vectorised `lookup`: for each key, an index into `sorted_members`."""
        if not self._owners:
            raise LookupError("the hash ring has no members")
        keys = np.asarray(keys)
        if keys.dtype.kind not in "iu":
            raise TypeError(f"ring keys must be integers, got dtype {keys.dtype}")
        positions = mix64_array(keys.astype(np.uint64, copy=False) ^ np.uint64(self._seed))
        slots = np.searchsorted(self._positions, positions, side="left")
        slots[slots == self._positions.shape[0]] = 0
        result: npt.NDArray[np.int32] = self._owner_index[slots]
        return result


class DualHashRing:
    """DualMap's two rings: two stable, distinct candidates per key."""

    def __init__(
        self,
        *,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        seeds: tuple[int, int] = DEFAULT_SEEDS,
    ) -> None:
        if (seeds[0] & _MASK) == (seeds[1] & _MASK):
            raise ValueError("the two rings need different seeds to be independent")
        self._rings = (
            HashRing(virtual_nodes=virtual_nodes, seed=seeds[0]),
            HashRing(virtual_nodes=virtual_nodes, seed=seeds[1]),
        )

    @property
    def rings(self) -> tuple[HashRing, HashRing]:
        return self._rings

    @property
    def members(self) -> frozenset[str]:
        return self._rings[0].members

    @property
    def sorted_members(self) -> tuple[str, ...]:
        return self._rings[0].sorted_members

    def __len__(self) -> int:
        return len(self._rings[0])

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._rings[0]

    def add(self, endpoint_id: str) -> None:
        for ring in self._rings:
            ring.add(endpoint_id)

    def remove(self, endpoint_id: str) -> None:
        for ring in self._rings:
            ring.remove(endpoint_id)

    def sync(self, endpoint_ids: Iterable[str]) -> RingChange:
        """Make the membership equal to `endpoint_ids`; says what changed."""
        wanted = frozenset(endpoint_ids)
        current = self.members
        if wanted == current:
            return _NO_CHANGE
        change = RingChange(added=wanted - current, removed=current - wanted)
        for endpoint_id in change.added:
            _check_endpoint_id(endpoint_id)
        if len(change.added) + len(change.removed) == 1:
            for endpoint_id in change.added:
                self.add(endpoint_id)
            for endpoint_id in change.removed:
                self.remove(endpoint_id)
        elif change:
            for ring in self._rings:
                ring.update(add=sorted(change.added), remove=change.removed)
        return change

    def candidates(self, key: int, *, exclude: Collection[str] = ()) -> tuple[str, str]:
        """(first, second) for `key`; the same endpoint twice only when one member is left.

        `exclude` (endpoints the request must avoid, e.g. where the router already failed)
        are skipped as if absent from both rings: first becomes the next endpoint clockwise on
        ring 1, second the next one on ring 2 that is neither excluded nor first. Keys whose
        candidates are not excluded keep their pair. Raises LookupError when the rings are
        empty or every member is excluded.
        """
        if not exclude:
            first = self._rings[0].lookup(key)
            second = self._rings[1].lookup(key)
            if second != first:
                return first, second
        else:
            first = next((e for e in self._rings[0].walk(key) if e not in exclude), "")
            if not first:
                raise LookupError(f"all {len(self)} ring members are excluded")
        for second in self._rings[1].walk(key):
            if second != first and second not in exclude:
                return first, second
        return first, first

    def candidates_many(
        self, keys: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """Vectorised `candidates`, as indexes into `sorted_members` (for analysis and tests)."""
        keys = np.asarray(keys)
        first = self._rings[0].lookup_many(keys)
        second = self._rings[1].lookup_many(keys)
        collisions = np.flatnonzero(first == second)
        if collisions.size and len(self) > 1:
            index = {name: i for i, name in enumerate(self.sorted_members)}
            for at in collisions.tolist():
                second[at] = index[self.candidates(int(keys[at]))[1]]
        return first, second
