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

    def depth_for(self, keys: PromptKeys) -> int:
        """The key depth (in blocks) for `keys`, without recording anything; 0 if no blocks."""
        blocks = keys.num_blocks
        if blocks == 0:
            return 0
        hashes = keys.block_hashes
        limit = min(blocks, self.max_depth)
        depth = min(self.min_depth, limit)
        split = self._split
        while depth < limit and int(hashes[depth - 1]) in split:
            depth += 1
        return depth

    def observe(self, keys: PromptKeys, *, endpoints: int) -> int:
        """Choose the key depth for one request, then count it in the window.

        Returns the depth (0 when the prompt has no full block). `endpoints` is n in the
        2/n and 1/n thresholds.
        """
        depth = self.depth_for(keys)
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
        # rho > 2/n  <=>  count * n > 2 * size (integers: no rounding at the boundary).
        for node in nodes:
            count = self._counts.get(node, 0)
            if count * n > 2 * size:
                self._split.add(node)
            elif count * n < size:
                self._split.discard(node)
