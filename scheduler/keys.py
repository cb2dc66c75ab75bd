"""Prompt keys: chained block hashes over token ids (or characters, or trace block ids).

A block's key stands for the whole prefix up to and including that block, like vLLM's
prefix-cache block hashes, so two prompts share key i exactly when they share their first
i + 1 blocks (up to 64-bit hash collisions). Keys are seeded by a namespace (model, LoRA
adapter, cache_salt): prompts in different namespaces never share a key, just as vLLM never
shares their cached blocks.

Token ids and characters: the ids are cut into full blocks of `block_size` (the tail is not
hashed: vLLM caches only full blocks), each written as little-endian 64-bit words, and each
block's key is XXH3-64 of its bytes seeded with the key before it (the namespace seed for the
first). Key i therefore depends on blocks 0..i and, through the chain, on its depth, the way
vLLM chains each block's hash to its parent's. One short C call per block: on an idle 2-core
VM (`tools/hot_path_parts.py`, `benchmarks/hot_path/prompt_keys.json`) 11-12 us for a
1,400-token prompt in 32-token blocks and 17 us in 16-token blocks, where the vectorised
splitmix64 scheme it replaced took 29-30 us either way (some 35 array operations, each with
its fixed cost), on a request path that costs the router about half a millisecond in all.
Past about 300 blocks the per-block call costs more than numpy did: a 32k-token prompt in
16-token blocks takes 0.31 ms against 0.14 ms (such prompts are hashed on a worker thread,
which holds the GIL while it does); in the default 64-token blocks the two are level there
(110 against 111 us).

Trace block ids (Mooncake `hash_ids`, the simulator's prompts) keep their vectorised scheme:
they are a separate key space (no trace prompt is ever compared with a tokenised one), and
every simulation result committed in the benchmarks stays reproducible with them.

1. View the ids, each multiplied by an odd constant, as one value per block.
2. Combine each block value with its block position and the namespace seed, and mix
   (splitmix64).
3. Chain: a prefix sum of the mixed block values (wrapping uint64), mixed once more with the
   seed. Element i of the sum depends on every block 0..i and on its position, so it is a
   prefix hash computed without a sequential loop.

All arithmetic is fixed-width and seeded explicitly: keys are identical across processes and
machines and never depend on PYTHONHASHSEED. The scheme is not cryptographic; keys decide
routing only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import xxhash
from twinroute.scheduler.types import BlockHashes, PromptKeys

DEFAULT_BLOCK_SIZE = 16
"""vLLM's default prefix-cache block size in tokens."""

DUALMAP_BLOCK_SIZE = 512
"""DualMap keys prompts on 512-token blocks; the Mooncake traces use the same unit."""

DEFAULT_BLOCK_CHARS = 64
"""Text-mode block size in characters: about 16 tokens (one vLLM block) of English text at
roughly 4 characters per token, so text-mode keys have about the same granularity as token
keys at `DEFAULT_BLOCK_SIZE`."""

_U64 = np.uint64
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_TRACE_ID_MULTIPLIER = 0xD6E8_FEB8_6659_FD93
_EMPTY: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
_EMPTY.flags.writeable = False


def mix64(value: int) -> int:
    """The splitmix64 finaliser on one Python int (same function as the vectorised one)."""
    z = (value + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _MIX_1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX_2) & _MASK
    return z ^ (z >> 31)


def mix64_array(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser on every element (a new array; `values` is not modified)."""
    return _mix_in_place(values + _U64(_GOLDEN))


def _mix_in_place(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser after its increment, overwriting `z`. numpy wraps uint64 array
    arithmetic silently (no overflow warning for arrays), which is the arithmetic we want."""
    z ^= z >> _U64(30)
    z *= _U64(_MIX_1)
    z ^= z >> _U64(27)
    z *= _U64(_MIX_2)
    z ^= z >> _U64(31)
    return z


def namespace_seed(*, model: str, lora_adapter: str = "", cache_salt: str = "") -> int:
    """The 64-bit seed of a prefix-cache namespace (xxh64; the same in every process).

    The parts are joined with a separator that cannot occur in them unnoticed (unit separator
    plus length prefixes), so ("ab", "c") and ("a", "bc") are different namespaces.
    """
    parts = ("twinroute/v1", model, lora_adapter, cache_salt)
    text = "\x1f".join(f"{len(part)}:{part}" for part in parts)
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"))


def _chain(block_values: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    if block_values.shape[0] == 0:
        return _EMPTY
    seed_u64 = _U64(seed & _MASK)
    # Block value, position and namespace in one mixed word per block; no two (value,
    # position) pairs of one prompt share an input except by a 64-bit coincidence.
    salted = np.arange(block_values.shape[0], dtype=np.uint64)
    salted *= _U64(_GOLDEN)
    salted += seed_u64
    salted ^= block_values
    salted += _U64(_GOLDEN)
    prefix_sums = np.cumsum(_mix_in_place(salted), dtype=np.uint64)
    prefix_sums ^= seed_u64
    prefix_sums += _U64(_GOLDEN)
    hashes = _mix_in_place(prefix_sums)
    hashes.flags.writeable = False
    return hashes


def _chain_words(words: npt.NDArray[np.uint64], block_size: int, seed: int) -> BlockHashes:
    """XXH3-64 of each full block of `words` (little-endian bytes), seeded with the key
    before it; the first with `seed`."""
    blocks = words.shape[0] // block_size
    if blocks == 0:
        return _EMPTY
    data = words[: blocks * block_size].astype("<u8", copy=False).tobytes()
    step = 8 * block_size
    digest = xxhash.xxh3_64_intdigest
    key = seed & _MASK
    hashes: list[int] = []
    append = hashes.append
    for start in range(0, blocks * step, step):
        key = digest(data[start : start + step], key)
        append(key)
    array = np.array(hashes, dtype=np.uint64)
    array.flags.writeable = False
    return array


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(f"block size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")


def _as_ids(
    values: Sequence[int] | npt.NDArray[np.integer], *, what: str
) -> npt.NDArray[np.uint64]:
    """Non-negative integer ids as uint64; a clear error for anything else."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if array.shape[0] == 0:
        return _EMPTY
    if array.dtype.kind == "u":
        return array.astype(np.uint64, copy=False)
    if array.dtype.kind != "i":
        raise TypeError(f"{what} must be integers, got dtype {array.dtype}")
    if int(array.min()) < 0:
        raise ValueError(f"{what} must be non-negative, got {int(array.min())}")
    return array.astype(np.uint64, copy=False)


def keys_from_tokens(
    token_ids: Sequence[int] | npt.NDArray[np.integer], *, block_size: int, seed: int
) -> PromptKeys:
    """Keys of a tokenised prompt; units are tokens."""
    _check_block_size(block_size)
    ids = _as_ids(token_ids, what="token ids")
    hashes = _chain_words(ids, block_size, seed)
    return PromptKeys(block_size=block_size, block_hashes=hashes, total_units=int(ids.shape[0]))


def keys_from_text(text: str, *, block_chars: int, seed: int) -> PromptKeys:
    """Keys of a prompt given as text, when no tokenizer is configured; units are characters.

    Blocks are counted in code points, never bytes, so a multi-byte UTF-8 character is never
    split across blocks, and the keys do not depend on how the text was encoded on the wire.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    _check_block_size(block_chars)
    # Lone surrogates (from JSON escapes) are kept as their code points, not rejected.
    encoded = text.encode("utf-32-le", "surrogatepass")
    code_points = np.frombuffer(encoded, dtype="<u4").astype(np.uint64)
    hashes = _chain_words(code_points, block_chars, seed)
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
    for every source and puts them in the namespace of `seed`. Only the ids of full blocks
    (`total_tokens // block_size`) become keys, as with token ids.
    """
    _check_block_size(block_size)
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be non-negative, got {total_tokens}")
    ids = _as_ids(block_ids, what="block ids")
    full_blocks = min(ids.shape[0], total_tokens // block_size)
    # An odd multiplier spreads small sequential ids over all 64 bits (a bijection); the
    # chain mixes them.
    values = ids[:full_blocks] * _U64(_TRACE_ID_MULTIPLIER)
    return PromptKeys(
        block_size=block_size, block_hashes=_chain(values, seed), total_units=total_tokens
    )


def truncate(keys: PromptKeys, blocks: int) -> PromptKeys:
    """The first `blocks` blocks of `keys` (a read-only view, no copy).

    `total_units` shrinks to the units those blocks cover, so `prefix_tokens` stays right.
    """
    blocks = max(0, min(blocks, keys.num_blocks))
    if blocks == keys.num_blocks and keys.total_units <= blocks * keys.block_size:
        return keys
    return PromptKeys(
        block_size=keys.block_size,
        block_hashes=keys.block_hashes[:blocks],
        total_units=min(keys.total_units, blocks * keys.block_size),
    )
