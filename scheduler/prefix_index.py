"""The scheduler's approximate record of what each endpoint has in its prefix cache.

The scheduler never sees an engine's cache; it learns from its own decisions, like llm-d's
approximate prefix-cache scorer: every request it routes to an endpoint leaves that request's
block keys there. Each endpoint's record is an LRU bounded in blocks, sized like the engine's
KV cache, so old prefixes fade the way the engine evicts them: the pool-wide default until the
engine says how much KV it holds (`set_capacity`, from vLLM's `vllm:cache_config_info`), then
that engine's own size.

Invariant that makes lookups cheap: a request's blocks are recorded deepest first, so within one
endpoint a shallower block is never older than a deeper block of the same prompt and the LRU
evicts tails before heads (vLLM frees a sequence's blocks tail first for the same reason).
Presence is then prefix-closed along one prompt, and the matched depth is found by binary
search: O(log blocks) dictionary look-ups per endpoint.

`holders` answers for every endpoint at once through an inverted index (block key -> endpoints
that hold it): a binary search for the deepest block any endpoint holds, then per holder of
the first block a binary search of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from twinroute.scheduler.types import PromptKeys

DEFAULT_CAPACITY_BLOCKS = 32_768


class PrefixIndex:
    """Per-endpoint LRUs of block keys plus an inverted index; implements PrefixIndexView."""

    def __init__(self, *, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self._capacity = capacity_blocks
        # Endpoints whose engines reported their KV size; the rest use `_capacity`.
        self._capacity_of: dict[str, int] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}
        # Active-active replicas: what `record` learnt since the last share to the peers
        # (None: a lone scheduler keeps no journal).
        self.journal: list[tuple[str, list[int]]] | None = None

    @property
    def capacity_blocks(self) -> int:
        """The default capacity, for endpoints whose engines have not reported theirs."""
        return self._capacity

    def capacity_of(self, endpoint_id: str) -> int:
        return self._capacity_of.get(endpoint_id, self._capacity)

    def set_capacity(self, endpoint_id: str, capacity_blocks: int) -> None:
        """The endpoint's engine holds this many blocks of KV; a smaller record is trimmed
        oldest first at once."""
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self._capacity_of[endpoint_id] = capacity_blocks
        lru = self._lru.get(endpoint_id)
        if lru is not None:
            self._trim(endpoint_id, lru)

    def _trim(self, endpoint_id: str, lru: OrderedDict[int, None]) -> None:
        overflow = len(lru) - self.capacity_of(endpoint_id)
        for _ in range(max(0, overflow)):
            evicted, _none = lru.popitem(last=False)
            self._forget(evicted, endpoint_id)

    def size(self, endpoint_id: str | None = None) -> int:
        """Blocks recorded on one endpoint, or on all of them."""
        if endpoint_id is not None:
            return len(self._lru.get(endpoint_id, ()))
        return sum(len(lru) for lru in self._lru.values())

    def endpoints(self) -> Iterable[str]:
        return self._lru.keys()

    def snapshot(self, endpoint_id: str) -> list[int]:
        """Every block recorded on `endpoint_id`, most recently used first: what
        `record_hashes` takes to rebuild the same order elsewhere (a peer that just joined)."""
        return list(reversed(self._lru.get(endpoint_id, {})))

    def record(self, endpoint_id: str, keys: PromptKeys) -> None:
        """`endpoint_id` now holds every block of `keys` (it just served the prompt)."""
        hashes = keys.block_hashes.tolist()
        if self.journal is not None:
            self.journal.append((endpoint_id, hashes))
        self.record_hashes(endpoint_id, hashes)

    def record_hashes(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """`record` for keys as plain block hashes (a peer replica's placements); never
        journaled, so what peers say is not said back to them."""
        lru = self._lru.get(endpoint_id)
        if lru is None:
            lru = self._lru[endpoint_id] = OrderedDict()
        holders = self._holders
        for key in reversed(hashes):
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                holder_set = holders.get(key)
                if holder_set is None:
                    holders[key] = {endpoint_id}
                else:
                    holder_set.add(endpoint_id)
        self._trim(endpoint_id, lru)

    def _forget(self, key: int, endpoint_id: str) -> None:
        holder_set = self._holders.get(key)
        if holder_set is not None:
            holder_set.discard(endpoint_id)
            if not holder_set:
                del self._holders[key]

    def remove_endpoint(self, endpoint_id: str) -> None:
        """Forget everything recorded for an endpoint that left the pool."""
        self._capacity_of.pop(endpoint_id, None)
        lru = self._lru.pop(endpoint_id, None)
        if lru is not None:
            for key in lru:
                self._forget(key, endpoint_id)

    def matched_blocks(self, endpoint_id: str, keys: PromptKeys) -> int:
        lru = self._lru.get(endpoint_id)
        if not lru or keys.num_blocks == 0:
            return 0
        return _deepest_present(keys.block_hashes.tolist(), lru)

    def holders(self, keys: PromptKeys) -> Mapping[str, int]:
        if keys.num_blocks == 0:
            return {}
        hashes = keys.block_hashes.tolist()
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        return {
            endpoint_id: _deepest_present(hashes, self._lru[endpoint_id]) for endpoint_id in first
        }


def _deepest_present(hashes: list[int], present: Mapping[int, None] | set[int]) -> int:
    """Length of the longest prefix of `hashes` found in `present` (prefix-closed)."""
    low, high = 0, len(hashes)
    while low < high:
        middle = (low + high + 1) // 2
        if hashes[middle - 1] in present:
            low = middle
        else:
            high = middle - 1
    return low
