"""Paged KV cache with automatic prefix caching, at the granularity of trace blocks.

Models what vLLM's block pool does with prompt blocks:
- a block, once computed, is registered under its id (an id stands for its whole prefix) and
  can be reused by any later prompt that starts with the same ids;
- running requests hold references; a block nobody references stays cached but is evictable,
  and eviction takes the least recently released first (vLLM's free queue; a finished request
  releases its blocks tail first, so a prompt's tail goes before its shared head);
- capacity is in tokens: cached blocks count their tokens, and running requests also hold
  private tokens (partially computed blocks, decoded tokens) that are never shared.

`usage` is what vLLM reports as `kv_cache_usage_perc`: memory not free and not evictable.
All operations are O(blocks touched); eviction is O(blocks evicted).
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    __slots__ = (
        "_evictable",
        "_evictable_tokens",
        "_refcounts",
        "_sizes",
        "capacity_tokens",
        "evicted_blocks",
        "used_tokens",
    )

    def __init__(self, *, capacity_tokens: int) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"KV capacity must be > 0 tokens, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self.used_tokens = 0
        self.evicted_blocks = 0
        self._refcounts: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        # Unreferenced cached blocks, least recently released first.
        self._evictable: OrderedDict[int, int] = OrderedDict()
        self._evictable_tokens = 0

    @property
    def free_tokens(self) -> int:
        """Tokens that can be allocated now, counting evictable blocks as free."""
        return self.capacity_tokens - self.used_tokens + self._evictable_tokens

    @property
    def usage(self) -> float:
        return (self.used_tokens - self._evictable_tokens) / self.capacity_tokens

    @property
    def cached_blocks(self) -> int:
        return len(self._sizes)

    def contains(self, block_id: int) -> bool:
        return block_id in self._sizes

    def match(self, block_ids: list[int], *, block_size: int) -> int:
        """Number of leading blocks of `block_ids` that are cached (stops after a partial one)."""
        sizes = self._sizes
        count = 0
        for block_id in block_ids:
            size = sizes.get(block_id)
            if size is None:
                break
            count += 1
            if size < block_size:
                break
        return count

    def block_tokens(self, block_id: int) -> int:
        return self._sizes[block_id]

    def acquire(self, block_ids: list[int]) -> None:
        """Reference cached blocks (a request reuses them); they stop being evictable."""
        refcounts = self._refcounts
        evictable = self._evictable
        for block_id in block_ids:
            count = refcounts[block_id]
            if count == 0:
                self._evictable_tokens -= evictable.pop(block_id)
            refcounts[block_id] = count + 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; the last block becomes evictable first."""
        refcounts = self._refcounts
        evictable = self._evictable
        sizes = self._sizes
        for block_id in reversed(block_ids):
            count = refcounts[block_id] - 1
            refcounts[block_id] = count
            if count == 0:
                size = sizes[block_id]
                evictable[block_id] = size
                self._evictable_tokens += size

    def reserve(self, tokens: int) -> bool:
        """Allocate private tokens, evicting as needed; False (and no change) if they don't fit."""
        if tokens > self.free_tokens:
            return False
        overflow = self.used_tokens + tokens - self.capacity_tokens
        if overflow > 0:
            self._evict(overflow)
        self.used_tokens += tokens
        return True

    def free(self, tokens: int) -> None:
        """Return private tokens."""
        self.used_tokens -= tokens

    def commit(self, block_id: int, tokens: int) -> bool:
        """Turn `tokens` private tokens into the cached block `block_id`, referenced once.

        If another request registered the same block meanwhile, reference that one and free
        the private copy. Returns True if the block was newly registered.
        """
        if block_id in self._sizes:
            self.free(tokens)
            self.acquire([block_id])
            return False
        self._sizes[block_id] = tokens
        self._refcounts[block_id] = 1
        return True

    def _evict(self, tokens: int) -> None:
        evictable = self._evictable
        sizes = self._sizes
        refcounts = self._refcounts
        freed = 0
        while freed < tokens:
            block_id, size = evictable.popitem(last=False)
            del sizes[block_id]
            del refcounts[block_id]
            freed += size
            self.evicted_blocks += 1
        self._evictable_tokens -= freed
        self.used_tokens -= freed
