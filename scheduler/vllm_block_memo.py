"""vLLM block digests of prompt prefixes seen before, so a repeated prefix is not hashed again.

Following the engines' KV events, every token-id prompt gets vLLM's own block hashes
(`scheduler/vllm_blocks.py`): a pickle and a sha256 per block, about 60-100 us for a
1,400-token prompt, the same work again for every request that repeats a system prompt or a
conversation's earlier turns. `MemoizedBlockHasher` keeps the digests of recent prefixes,
keyed by twinroute's own chained block keys over the engine's block size (`scheduler/keys.py`,
vectorised: a few microseconds a prompt). Both chains name a whole prefix, so a prompt's
leading blocks are looked up one by one until the first one not seen, and only the blocks
from there on are hashed, chained from the last digest found.

The keys are 64-bit: two different prefixes sharing a key would hand one of them the other's
digests, so its cache lookups would come out short (never a wrong answer to the client), with
odds like those of the prefix index's own keys. Separate from `vllm_blocks.py`, which is also
loaded standalone inside vLLM's own environment for the parity tests.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.vllm_blocks import TokenIds, VllmBlockHasher, as_int_tuple

DEFAULT_MEMO_BLOCKS = 65_536  # about 200 bytes each
_NAMESPACE = "vllm-block-digests"


class MemoizedBlockHasher(VllmBlockHasher):
    """`VllmBlockHasher` with a bounded memo of prefix digests (oldest out)."""

    def __init__(
        self,
        block_size: int,
        *,
        algo: str = "sha256",
        seed: str | None = None,
        memo_blocks: int = DEFAULT_MEMO_BLOCKS,
    ) -> None:
        super().__init__(block_size, algo=algo, seed=seed)
        if memo_blocks <= 0:
            raise ValueError(f"memo_blocks must be positive, got {memo_blocks}")
        self.memo_blocks = memo_blocks
        self._memo: dict[int, tuple[bytes, int]] = {}  # in insertion order
        # The scheduler may hash a long prompt on a worker thread while the loop hashes others.
        self._lock = threading.Lock()
        self.reused_blocks = 0  # since start: digests the memo answered
        self.hashed_blocks = 0  # since start: digests computed

    def __len__(self) -> int:
        return len(self._memo)

    def block_digests(self, token_ids: TokenIds, *, cache_salt: str | None = None) -> list[bytes]:
        return [digest for digest, _ in self._blocks(token_ids, cache_salt=cache_salt)]

    def block_hashes(
        self,
        token_ids: TokenIds,
        *,
        cache_salt: str | None = None,
        names: npt.NDArray[np.uint64] | None = None,
    ) -> list[int]:
        """`names`: chained keys of the prompt's blocks in this hasher's block size that the
        caller already has (the routing keys, when their block size is the engine's, seeded
        with the salt), so they are not computed twice; None: computed here."""
        blocks = self._blocks(token_ids, cache_salt=cache_salt, names=names)
        return [block_hash for _, block_hash in blocks]

    def _blocks(
        self,
        token_ids: TokenIds,
        *,
        cache_salt: str | None,
        names: npt.NDArray[np.uint64] | None = None,
    ) -> list[tuple[bytes, int]]:
        """(digest, 64-bit hash as events carry it) of every full block."""
        ids = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
        full = len(ids) - len(ids) % self.block_size
        if full == 0:
            return []
        if names is None:
            seed = namespace_seed(model=_NAMESPACE, cache_salt=cache_salt or "")
            names = keys_from_tokens(ids[:full], block_size=self.block_size, seed=seed).block_hashes
        if len(names) != full // self.block_size:
            raise ValueError(f"{len(names)} block names for {full // self.block_size} blocks")
        chained: list[int] = names.tolist()
        blocks: list[tuple[bytes, int]] = []
        memo = self._memo
        with self._lock:
            for name in chained:
                block = memo.get(name)
                if block is None:
                    break
                blocks.append(block)
        known = len(blocks)
        self.reused_blocks += known
        if known == len(chained):
            return blocks
        # Only the blocks not found become Python ints and are hashed; the salt belongs to
        # block 0 alone.
        digests = self._digests(
            as_int_tuple(token_ids[known * self.block_size : full]),
            first_block=0,
            full=full - known * self.block_size,
            parent=blocks[-1][0] if blocks else None,
            salt=cache_salt if known == 0 else None,
        )
        fresh = [(digest, int.from_bytes(digest[-8:], "big")) for digest in digests]
        self.hashed_blocks += len(fresh)
        with self._lock:
            memo.update(zip(chained[known:], fresh, strict=True))
            # First in, first out: a hit costs no bookkeeping, and a hot prefix that ages out
            # is hashed once more by the next prompt that carries it.
            while len(memo) > self.memo_blocks:
                del memo[next(iter(memo))]
        return blocks + fresh
