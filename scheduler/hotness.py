"""DualMap's prefix hotness tree: how long a prefix key each request should use.

A prompt's chained block hashes are a path in a prefix tree (block i's hash names the node for
the prefix up to block i). The tree counts how many of the last `window` requests passed
through each node; rho(node) = count / requests in the window.

Adaptive key depth (DualMap): a node whose rho exceeds `2/n` (n = routable endpoints) carries more
than its fair share of two instances, so keying requests on it would pin that traffic to one
candidate pair: the node is *split* and requests through it key one block deeper. A split node
merges back (requests key on it again) only when rho falls below `1/n`. The gap between the two
thresholds is hysteresis, so a prefix near a threshold does not flip its key (and its
candidate pair, and its cache) with every request.

Two guards keep the split flags honest, because a wrong flag moves a conversation's key (and
so its candidate pair) away from the instances that cache it:
- **Warm-up.** Until the window has filled, shares are taken over at least
  `MIN_SPLIT_REQUESTS * n / 2` requests (or the whole window, if smaller), so a node needs
  more than `MIN_SPLIT_REQUESTS` requests to split. Otherwise the very first request of a
  fresh scheduler has rho = 1, splits its node, and that conversation's next turn keys one
  block deeper, on another pair, than its first.
- **Flags are re-checked where they are read.** A node is re-evaluated when a request passes
  through it, but a split node whose traffic dies down keeps its count (and its flag) until
  its last request leaves the window. The depth walk therefore checks each split node it
  passes against the merge threshold with the counts of now, instead of trusting a flag set
  when the window looked different.

Steps for one request with blocks h[0..B-1]:
  1. depth = min_depth; while depth < B and depth < max_depth and node h[depth-1] is split:
     depth += 1.
  2. Count the request on nodes h[0..depth] (one level below the chosen key as well, so the
     child's share is known the moment its parent splits); evict the oldest request from the
     window, uncounting its nodes.
  3. Re-evaluate the split flag of every node touched (split when rho > 2/n, merge when
     rho < 1/n).

Memory is bounded: the window holds at most `window` requests of at most `max_depth + 1` node
keys each, and a node is forgotten when its count falls to zero. Cost per request:
O(depth) dictionary operations.
"""

from __future__ import annotations

from collections import deque

from twinroute.scheduler.types import PromptKeys

MIN_SPLIT_REQUESTS = 8
"""A node must carry more than this many requests of a filling window to split (warm-up)."""


class HotnessTree:
    """Sliding-window prefix counts and the split state that sets each request's key depth."""

    def __init__(self, *, window: int = 1024, min_depth: int = 1, max_depth: int = 64) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        if not 1 <= min_depth <= max_depth:
            raise ValueError(f"need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
        self._window = window
        self.min_depth = min_depth
        self.max_depth = max_depth
        self._recent: deque[tuple[int, ...]] = deque()
        self._counts: dict[int, int] = {}
        self._split: set[int] = set()

    @property
    def window(self) -> int:
        return self._window

    def resize(self, window: int) -> None:
        """Change the window length (e.g. to keep several requests per instance in it)."""
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self._window = window
        while len(self._recent) > window:
            self._uncount(self._recent.popleft())

    def __len__(self) -> int:
        """Requests currently in the window."""
        return len(self._recent)

    @property
    def node_count(self) -> int:
        return len(self._counts)

    @property
    def split_count(self) -> int:
        return len(self._split)

    def rho(self, node: int) -> float:
        if not self._recent:
            return 0.0
        return self._counts.get(node, 0) / len(self._recent)

    def is_split(self, node: int) -> bool:
        return node in self._split

    def depth_for(self, keys: PromptKeys, *, endpoints: int | None = None) -> int:
        """The key depth (in blocks) for `keys`; 0 if no blocks. Records nothing, except that
        with `endpoints` (n) a split node passed on the way is merged if its share has fallen
        below 1/n since it was last counted (module docstring)."""
        blocks = keys.num_blocks
        if blocks == 0:
            return 0
        hashes = keys.block_hashes
        limit = min(blocks, self.max_depth)
        depth = min(self.min_depth, limit)
        split = self._split
        while depth < limit:
            node = int(hashes[depth - 1])
            if node not in split:
                break
            if endpoints is not None and self._below_merge(node, endpoints=endpoints):
                split.discard(node)
                break
            depth += 1
        return depth

    def _shares_over(self, endpoints: int) -> int:
        """Requests a share is taken over: the window so far, at least the warm-up floor."""
        size = len(self._recent)
        if size >= self._window:
            return size
        floor = min(self._window, (MIN_SPLIT_REQUESTS * max(1, endpoints) + 1) // 2)
        return max(size, floor)

    def _below_merge(self, node: int, *, endpoints: int) -> bool:
        return self._counts.get(node, 0) * max(1, endpoints) < len(self._recent)

    def observe(self, keys: PromptKeys, *, endpoints: int) -> int:
        """Choose the key depth for one request, then count it in the window.

        Returns the depth (0 when the prompt has no full block). `endpoints` is n in the
        2/n and 1/n thresholds.
        """
        depth = self.depth_for(keys, endpoints=endpoints)
        if depth == 0:
            return 0
        counted = min(keys.num_blocks, depth + 1)
        nodes = tuple(keys.block_hashes[:counted].tolist())
        self._recent.append(nodes)
        counts = self._counts
        for node in nodes:
            counts[node] = counts.get(node, 0) + 1
        if len(self._recent) > self._window:
            self._uncount(self._recent.popleft())
        self._reevaluate(nodes, endpoints=endpoints)
        return depth

    def _uncount(self, nodes: tuple[int, ...]) -> None:
        counts = self._counts
        for node in nodes:
            left = counts[node] - 1
            if left:
                counts[node] = left
            else:
                del counts[node]
                self._split.discard(node)

    def _reevaluate(self, nodes: tuple[int, ...], *, endpoints: int) -> None:
        size = len(self._recent)
        n = max(1, endpoints)
        split_over = self._shares_over(endpoints)
        # rho > 2/n  <=>  count * n > 2 * size (integers: no rounding at the boundary).
        for node in nodes:
            count = self._counts.get(node, 0)
            if count * n > 2 * split_over:
                self._split.add(node)
            elif count * n < size:
                self._split.discard(node)
