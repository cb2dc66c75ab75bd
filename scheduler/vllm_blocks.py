"""vLLM's own prefix-cache block hashes, computed by the scheduler from a request's token ids.

A vLLM engine names every full KV block of a prompt by a chained hash and publishes those
names in its KV-cache events (`scheduler/kv_events.py`). Computing the same names here lets
the scheduler ask "how many leading blocks of this prompt does that engine hold?" exactly,
instead of guessing from its own routing history (`scheduler/prefix_index.py`).

The chain, as vLLM computes it with its default `prefix_caching_hash_algo="sha256"`:

    root       = H(seed)                         seed = the engines' PYTHONHASHSEED, if set,
                                                        else "vllm-none-hash"
    digest[i]  = H((digest[i-1] or root, tuple(tokens of block i), extra_keys[i]))
    H(obj)     = sha256(pickle.dumps(obj, protocol=HIGHEST_PROTOCOL))   ("sha256")
               = sha256(cbor2.dumps(obj, canonical=True))               ("sha256_cbor")

Only full blocks are hashed. `extra_keys[i]` is None for plain text; a request's
`cache_salt` adds `(("cache_salt", salt),)` to block 0 only. LoRA adapters (whose keys carry
the adapter's path on the engine's disk), multimodal inputs and prompt embeddings add keys the
scheduler cannot reproduce, so those requests are not hashed here.

Events carry each 32-byte digest as an int: its last 8 bytes, big-endian
(`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, vLLM's default); `block_hashes` returns those ints.

Refused algorithms: "xxhash" and "xxhash_cbor" root the chain in a random per-process seed
unless PYTHONHASHSEED is set, and vLLM only recommends them for caches that are never shared;
the scheduler supports the cryptographic default and its CBOR variant only.

Cost: one pickle and one sha256 of ~200 bytes per block, about 1.5 us for a 32-token block on
the development machine (plus ~0.5 us for a numpy input's `tolist()`); token ids become one
tuple once and are sliced per block. (Writing the pickle bytes by hand with numpy was tried and
was no faster: the per-block Python work, not pickle, dominates.) Token ids must hash as
Python ints: pickle encodes numpy scalars differently, which would silently change every hash,
so arrays go through `tolist()` and other sequences of non-ints through `operator.index`.
The scheduler hashes through `scheduler/vllm_block_memo.py`, which reuses the digests of
prefixes seen before; this module stays free of twinroute imports, as vLLM's own environment
loads it for the parity tests.
"""

from __future__ import annotations

import hashlib
import operator
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# vLLM's fixed root seed for cryptographic algorithms when PYTHONHASHSEED is unset.
DEFAULT_SEED = "vllm-none-hash"

SUPPORTED_ALGOS = ("sha256", "sha256_cbor")
_REFUSED_ALGOS = {
    "xxhash": (
        "xxhash roots vLLM's block hashes in a random per-process seed unless every engine "
        "runs with the same PYTHONHASHSEED, and the scheduler does not reproduce it; run the "
        "engines with the default --prefix-caching-hash-algo sha256"
    ),
}
_REFUSED_ALGOS["xxhash_cbor"] = _REFUSED_ALGOS["xxhash"]

_MASK_64 = (1 << 64) - 1

TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]


def as_int_tuple(token_ids: TokenIds) -> tuple[int, ...]:
    """Token ids as a tuple of Python ints, as vLLM pickles them."""
    if isinstance(token_ids, np.ndarray):
        return tuple(token_ids.tolist())
    tokens = tuple(token_ids)
    if tokens and type(tokens[0]) is not int:
        # numpy scalars pickle differently from ints: every hash would silently differ.
        tokens = tuple(map(operator.index, tokens))
    return tokens


class UnsupportedHashAlgoError(ValueError):
    """The engines' prefix-caching hash algorithm cannot be reproduced by the scheduler."""


def event_hash(digest: bytes) -> int:
    """The 64-bit int a KV event carries for a block digest (its last 8 bytes, big-endian)."""
    return int.from_bytes(digest[-8:], "big") & _MASK_64


# vLLM pickles with its interpreter's highest protocol; 5 on every Python vLLM supports.
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _pickle_sha256(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()


def _cbor_sha256() -> Callable[[object], bytes]:
    try:
        import cbor2  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise UnsupportedHashAlgoError(
            "prefix_caching_hash_algo 'sha256_cbor' needs the cbor2 package in the scheduler's "
            "environment (pip install cbor2)"
        ) from None
    dumps: Callable[..., bytes] = cbor2.dumps

    def digest(obj: object) -> bytes:
        return hashlib.sha256(dumps(obj, canonical=True)).digest()

    return digest


class VllmBlockHasher:
    """Computes the block hashes a vLLM engine gives a plain-text request's token ids.

    `block_size` is the engine's hash block size: the `block_size` its BlockStored events
    carry (vLLM's `--block-size`; the platform picks it when unset, so read it off an event or
    the engine's config). `seed` is the PYTHONHASHSEED value the engines run with, or None when
    they run without one (vLLM's default root then).
    """

    def __init__(self, block_size: int, *, algo: str = "sha256", seed: str | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if algo in _REFUSED_ALGOS:
            raise UnsupportedHashAlgoError(
                f"prefix_caching_hash_algo {algo!r}: " + _REFUSED_ALGOS[algo]
            )
        if algo == "sha256":
            hash_fn: Callable[[object], bytes] = _pickle_sha256
        elif algo == "sha256_cbor":
            hash_fn = _cbor_sha256()
        else:
            raise UnsupportedHashAlgoError(
                f"unknown prefix_caching_hash_algo {algo!r}; "
                f"supported: {', '.join(SUPPORTED_ALGOS)}"
            )
        self.block_size = block_size
        self.algo = algo
        self.seed = DEFAULT_SEED if seed is None else seed
        self._hash = hash_fn
        self._pickled = algo == "sha256"
        self.root = hash_fn(self.seed)

    def block_digests(self, token_ids: TokenIds, *, cache_salt: str | None = None) -> list[bytes]:
        """The full 32-byte digest of every full block of `token_ids`, in order."""
        tokens = as_int_tuple(token_ids)
        full = len(tokens) - len(tokens) % self.block_size
        if full == 0:
            return []
        return self._digests(tokens, first_block=0, full=full, parent=None, salt=cache_salt)

    def _digests(
        self,
        tokens: tuple[int, ...],
        *,
        first_block: int,
        full: int,
        parent: bytes | None,
        salt: str | None,
    ) -> list[bytes]:
        """The digests of the full blocks from `first_block` on, chained from `parent` (the
        digest of the block before; None for the root)."""
        size = self.block_size
        start = first_block * size
        digests: list[bytes] = []
        if start >= full:
            return digests
        # vLLM tags the salt with its source and applies it to the first block only.
        extra = (("cache_salt", salt),) if salt and first_block == 0 else None
        chained = self.root if parent is None else parent
        if self._pickled:
            # The default algorithm, inlined: a Python call per block would cost a fifth more.
            sha256, dumps, protocol = hashlib.sha256, pickle.dumps, _PICKLE_PROTOCOL
            chained = sha256(
                dumps((chained, tokens[start : start + size], extra), protocol)
            ).digest()
            digests.append(chained)
            for begin in range(start + size, full, size):
                chained = sha256(
                    dumps((chained, tokens[begin : begin + size], None), protocol)
                ).digest()
                digests.append(chained)
            return digests
        hash_fn = self._hash
        for begin in range(start, full, size):
            chained = hash_fn((chained, tokens[begin : begin + size], extra))
            digests.append(chained)
            extra = None
        return digests

    def block_hashes(self, token_ids: TokenIds, *, cache_salt: str | None = None) -> list[int]:
        """The 64-bit hashes of every full block of `token_ids`, as KV events carry them."""
        return [
            int.from_bytes(digest[-8:], "big")
            for digest in self.block_digests(token_ids, cache_salt=cache_salt)
        ]
