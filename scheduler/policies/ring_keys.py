"""What the hash-ring policies share: the ring key of a request, and a ring that follows the
view's endpoint set.

A ring key is the block hash at the key depth: it stands for the whole prefix up to that block
(`scheduler/keys.py`), seeded by the request's namespace (model, LoRA adapter, cache_salt).
A prompt with no full block has no block hash (and nothing a prefix cache could reuse); it is
keyed on a hash of its session id, so a conversation's turns stay together, else of its
request id, which spreads such prompts over the ring.
"""

from __future__ import annotations

import xxhash
from twinroute.scheduler.ring import HashRing
from twinroute.scheduler.types import ClusterView, Endpoint, RoutingRequest

_SHORT_PROMPT_SEED = 0x7477_696E_726F_7574


def short_prompt_key(request: RoutingRequest) -> int:
    """Ring key of a prompt with no full block: its session, else the request itself."""
    if request.session_id:
        text = b"session\x1f" + request.session_id.encode("utf-8", "surrogatepass")
    else:
        text = b"request\x1f" + request.request_id.encode("utf-8", "surrogatepass")
    return xxhash.xxh64_intdigest(text, seed=_SHORT_PROMPT_SEED)


def prefix_key(request: RoutingRequest, *, blocks: int) -> tuple[int, int]:
    """(ring key, depth in blocks) of the first `blocks` blocks, or fewer if the prompt is
    shorter; depth 0 means the short-prompt key."""
    depth = min(blocks, request.keys.num_blocks)
    if depth <= 0:
        return short_prompt_key(request), 0
    return int(request.keys.block_hashes[depth - 1]), depth


def describe_key(request: RoutingRequest, depth: int) -> str:
    if depth > 0:
        return f"{depth}-block prefix"
    if request.session_id:
        return "session id (prompt under one block)"
    return "request id (prompt under one block)"


class SyncedRing:
    """A `HashRing` whose members follow the endpoint set of the views it is given."""

    def __init__(self, *, virtual_nodes: int, seed: int) -> None:
        self.ring = HashRing(virtual_nodes=virtual_nodes, seed=seed)
        self._synced: tuple[Endpoint, ...] | None = None

    def sync(self, view: ClusterView) -> None:
        # The core hands out the same endpoint tuple until membership changes.
        if view.endpoints is self._synced:
            return
        wanted = frozenset(e.id for e in view.endpoints)
        current = self.ring.members
        added, removed = wanted - current, current - wanted
        if len(added) + len(removed) == 1:
            for endpoint_id in added:
                self.ring.add(endpoint_id)
            for endpoint_id in removed:
                self.ring.remove(endpoint_id)
        elif added or removed:
            self.ring.update(add=sorted(added), remove=removed)
        self._synced = view.endpoints
