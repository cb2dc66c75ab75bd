"""Prompt keys: chained block hashes over token ids (or characters, or trace block ids).

A block's key stands for the whole prefix up to and including that block, like vLLM's
prefix-cache block hashes, so two prompts share key i exactly when they share their first
i + 1 blocks. Keys are seeded by a namespace (model, LoRA adapter, cache_salt): prompts in
different namespaces never share a key, just as vLLM never shares their cached blocks.

Steps, all vectorised with numpy (hashing a 32k-token prompt costs tens of microseconds, not
a Python loop per token or per block):
1. Cut the ids into full blocks of `block_size` (the tail is not hashed: vLLM caches only full
   blocks) and fold each block's ids into one 64-bit value with a multiply-xor scheme, one
   column of the (blocks x block_size) matrix at a time.
2. Mix each block value with its position and the namespace seed (splitmix64 finaliser).
3. Chain: a prefix sum of the mixed values (wrapping uint64 arithmetic), mixed again. The sum
   over positions 0..i depends on every block of the prefix and its position, so the result is
   a prefix hash without a sequential loop.

All arithmetic is fixed-width and seeded explicitly: keys are identical across processes and
never depend on PYTHONHASHSEED.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import xxhash
from twinroute.scheduler.types import PromptKeys

DEFAULT_BLOCK_SIZE = 16
"""vLLM's default prefix-cache block size in tokens."""

DUALMAP_BLOCK_SIZE = 512
"""DualMap keys prompts on 512-token blocks; the Mooncake traces use the same unit."""

DEFAULT_BLOCK_CHARS = 64
"""Text mode block size in characters: about 16 tokens of English text at ~4 chars per token."""

_U64 = np.uint64
_MASK = (1 << 64) - 1
_FOLD_PRIME = _U64(0x100000001B3)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX_1 = _U64(0xBF58476D1CE4E5B9)
_MIX_2 = _U64(0x94D049BB133111EB)
_EMPTY = np.zeros(0, dtype=np.uint64)


def _splitmix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = values + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX_1
    z = (z ^ (z >> _U64(27))) * _MIX_2
    result: npt.NDArray[np.uint64] = z ^ (z >> _U64(31))
    return result


def mix64(value: int) -> int:
    """Scalar splitmix64 finaliser (the same function as the vectorised one)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def namespace_seed(*, model: str, lora_adapter: str = "", cache_salt: str = "") -> int:
    """The 64-bit seed of a prefix-cache namespace."""
    text = "\x1f".join(("twinroute/v1", model, lora_adapter, cache_salt))
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def _chain(block_values: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    if block_values.shape[0] == 0:
        return _EMPTY
    with np.errstate(over="ignore"):
        positions = np.arange(block_values.shape[0], dtype=np.uint64)
        salted = block_values ^ _splitmix(positions ^ _U64(seed))
        prefix_sums = np.cumsum(_splitmix(salted), dtype=np.uint64)
        return _splitmix(prefix_sums ^ _U64(seed))


def _fold_blocks(ids: npt.NDArray[np.uint64], block_size: int) -> npt.NDArray[np.uint64]:
    blocks = ids.shape[0] // block_size
    if blocks == 0:
        return _EMPTY
    matrix = ids[: blocks * block_size].reshape(blocks, block_size)
    folded = np.full(blocks, 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(block_size):
            folded = (folded ^ (matrix[:, column] + _GOLDEN)) * _FOLD_PRIME
    return folded


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")


def keys_from_tokens(
    token_ids: Sequence[int] | npt.NDArray[np.integer], *, block_size: int, seed: int
) -> PromptKeys:
    """Keys of a tokenised prompt."""
    _check_block_size(block_size)
    ids = np.asarray(token_ids, dtype=np.int64).astype(np.uint64, copy=False)
    hashes = _chain(_fold_blocks(ids, block_size), seed)
    return PromptKeys(block_size=block_size, block_hashes=hashes, total_units=int(ids.shape[0]))


def keys_from_text(text: str, *, block_chars: int, seed: int) -> PromptKeys:
    """Keys of a prompt given as text, when no tokenizer is configured.

    Blocks are counted in characters (code points), so a multi-byte character is never split.
    """
    _check_block_size(block_chars)
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = _chain(_fold_blocks(code_points, block_chars), seed)
    return PromptKeys(
        block_size=block_chars, block_hashes=hashes, total_units=int(code_points.shape[0])
    )


def keys_from_block_ids(
    block_ids: Sequence[int] | npt.NDArray[np.integer],
    *,
    block_size: int,
    total_tokens: int,
    seed: int,
) -> PromptKeys:
    """Keys of a trace prompt described by one id per block (Mooncake `hash_ids`).

    Trace ids already stand for their whole prefix; chaining them anyway keeps one key scheme
    for every source and puts them in the namespace of `seed`.
    """
    _check_block_size(block_size)
    ids = np.asarray(block_ids, dtype=np.int64).astype(np.uint64, copy=False)
    full_blocks = min(ids.shape[0], total_tokens // block_size)
    with np.errstate(over="ignore"):
        values = _splitmix(ids[:full_blocks] * _FOLD_PRIME)
    return PromptKeys(
        block_size=block_size, block_hashes=_chain(values, seed), total_units=total_tokens
    )


def truncate(keys: PromptKeys, blocks: int) -> PromptKeys:
    """The first `blocks` blocks of `keys` (a view, no copy)."""
    blocks = max(0, min(blocks, keys.num_blocks))
    return PromptKeys(
        block_size=keys.block_size,
        block_hashes=keys.block_hashes[:blocks],
        total_units=min(keys.total_units, blocks * keys.block_size),
    )
