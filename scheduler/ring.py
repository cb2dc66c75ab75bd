"""Consistent-hash rings with virtual nodes, and DualMap's pair of independent rings.

`HashRing` places `virtual_nodes` points per endpoint on a 64-bit circle (xxh64 of
"<endpoint>#<i>" under the ring's seed) and maps a key to the owner of the first point
clockwise of the key's position (the key mixed with the ring's seed, so two rings with
different seeds place the same key independently).

`DualHashRing` keeps two such rings over the same membership. A key's candidates are the first
ring's owner and the second ring's owner; when both are the same endpoint, the second walks
clockwise on its ring to the next distinct endpoint. Adding one endpoint to N then changes a
key's pair only when the newcomer enters it (about 2/(N+1) of keys, the minimum for a pair
that stays balanced); removing one changes only the pairs that contained it (about 2/N).

Cost: lookup is a binary search over N * virtual_nodes points (O(log(N * V))); membership
changes rebuild the sorted arrays (O(N * V log(N * V)), milliseconds at 512 x 256).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash
from twinroute.scheduler.keys import mix64

DEFAULT_VIRTUAL_NODES = 256
DEFAULT_SEEDS = (0x5D1A_2B3C_4D5E_6F70, 0x0F1E_2D3C_4B5A_6978)

_U64 = np.uint64
_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RingChange:
    added: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def _mix_many(keys: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        z = (keys ^ _U64(seed)) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        result: npt.NDArray[np.uint64] = z ^ (z >> _U64(31))
        return result


class HashRing:
    """One consistent-hash ring."""

    def __init__(self, *, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, seed: int = 0) -> None:
        if virtual_nodes <= 0:
            raise ValueError(f"virtual_nodes must be positive, got {virtual_nodes}")
        self._virtual_nodes = virtual_nodes
        self._seed = seed & _MASK
        self._points: dict[str, npt.NDArray[np.uint64]] = {}
        self._positions = np.zeros(0, dtype=np.uint64)
        self._position_list: list[int] = []
        self._owner_index = np.zeros(0, dtype=np.int32)
        self._owner_list: list[int] = []
        self._owners: list[str] = []

    @property
    def virtual_nodes(self) -> int:
        return self._virtual_nodes

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._points)

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._points

    def __len__(self) -> int:
        return len(self._points)

    def _points_of(self, endpoint_id: str) -> npt.NDArray[np.uint64]:
        return np.fromiter(
            (
                xxhash.xxh64_intdigest(f"{endpoint_id}#{i}".encode(), seed=self._seed)
                for i in range(self._virtual_nodes)
            ),
            dtype=np.uint64,
            count=self._virtual_nodes,
        )

    def add(self, endpoint_id: str) -> None:
        if endpoint_id in self._points:
            return
        self._points[endpoint_id] = self._points_of(endpoint_id)
        self._rebuild()

    def remove(self, endpoint_id: str) -> None:
        if self._points.pop(endpoint_id, None) is not None:
            self._rebuild()

    def update(self, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Apply several membership changes with one rebuild."""
        for endpoint_id in remove:
            self._points.pop(endpoint_id, None)
        for endpoint_id in add:
            if endpoint_id not in self._points:
                self._points[endpoint_id] = self._points_of(endpoint_id)
        self._rebuild()

    def _rebuild(self) -> None:
        # Sorted owner names make the layout independent of insertion order.
        self._owners = sorted(self._points)
        if not self._owners:
            self._positions = np.zeros(0, dtype=np.uint64)
            self._owner_index = np.zeros(0, dtype=np.int32)
            self._position_list, self._owner_list = [], []
            return
        positions = np.concatenate([self._points[o] for o in self._owners])
        owners = np.repeat(np.arange(len(self._owners), dtype=np.int32), self._virtual_nodes)
        # Ties (equal positions, astronomically rare) break by owner so the order is total.
        order = np.lexsort((owners, positions))
        self._positions = positions[order]
        self._owner_index = owners[order]
        self._position_list = self._positions.tolist()
        self._owner_list = self._owner_index.tolist()

    def position(self, key: int) -> int:
        """Where `key` lands on this ring."""
        return mix64((key ^ self._seed) & _MASK)

    def _first_slot(self, key: int) -> int:
        if not self._owners:
            raise LookupError("the hash ring has no members")
        slot = bisect.bisect_left(self._position_list, self.position(key))
        return 0 if slot == len(self._position_list) else slot

    def lookup(self, key: int) -> str:
        """The owner of the first virtual node clockwise of `key`."""
        return self._owners[self._owner_list[self._first_slot(key)]]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct endpoints in clockwise order from `key`, each once."""
        slot = self._first_slot(key)
        seen: set[int] = set()
        total = len(self._owner_list)
        for step in range(total):
            owner = self._owner_list[(slot + step) % total]
            if owner not in seen:
                seen.add(owner)
                yield self._owners[owner]
                if len(seen) == len(self._owners):
                    return

    def lookup_many(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.int32]:
        """Vectorised `lookup`: indexes into `sorted(members)` for each key."""
        if not self._owners:
            raise LookupError("the hash ring has no members")
        positions = _mix_many(np.asarray(keys, dtype=np.uint64), self._seed)
        slots = np.searchsorted(self._positions, positions, side="left")
        slots[slots == self._positions.shape[0]] = 0
        result: npt.NDArray[np.int32] = self._owner_index[slots]
        return result

    def sorted_members(self) -> list[str]:
        return list(self._owners)


class DualHashRing:
    """DualMap's two rings: two stable, distinct candidates per key."""

    def __init__(
        self,
        *,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        seeds: tuple[int, int] = DEFAULT_SEEDS,
    ) -> None:
        if seeds[0] == seeds[1]:
            raise ValueError("the two rings need different seeds to be independent")
        self._rings = (
            HashRing(virtual_nodes=virtual_nodes, seed=seeds[0]),
            HashRing(virtual_nodes=virtual_nodes, seed=seeds[1]),
        )

    @property
    def members(self) -> frozenset[str]:
        return self._rings[0].members

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
        change = RingChange(added=wanted - current, removed=current - wanted)
        if change:
            for ring in self._rings:
                ring.update(add=sorted(change.added), remove=change.removed)
        return change

    def candidates(self, key: int) -> tuple[str, str]:
        """(first, second) for `key`; the same endpoint twice only when there is one member."""
        first = self._rings[0].lookup(key)
        for second in self._rings[1].walk(key):
            if second != first:
                return first, second
        return first, first

    def candidates_many(
        self, keys: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """Vectorised `candidates` as indexes into `sorted(members)` (for analysis)."""
        first = self._rings[0].lookup_many(keys)
        second = self._rings[1].lookup_many(keys)
        collisions = np.flatnonzero(first == second)
        if collisions.size:
            members = self._rings[0].sorted_members()
            index = {name: i for i, name in enumerate(members)}
            for at in collisions.tolist():
                pair = self.candidates(int(keys[at]))
                second[at] = index[pair[1]]
        return first, second
