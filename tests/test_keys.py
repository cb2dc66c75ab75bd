"""Prompt keys: chaining, namespaces, text mode, trace block ids, bad input, cross-process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from twinroute.scheduler.keys import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_BLOCK_SIZE,
    DUALMAP_BLOCK_SIZE,
    keys_from_block_ids,
    keys_from_text,
    keys_from_tokens,
    namespace_seed,
    truncate,
)
from twinroute.scheduler.types import PromptKeys

SEED = namespace_seed(model="meta-llama/Llama-3.1-8B-Instruct")
TOKENS = np.arange(1000, 1100, dtype=np.int64)


def _unchecked(value: object) -> Any:
    """Lets the bad-input table pass what the type checker would refuse."""
    return value


def _hashes(keys: PromptKeys) -> list[int]:
    return [int(h) for h in keys.block_hashes.tolist()]


def test_defaults_match_the_systems_they_follow() -> None:
    assert (DEFAULT_BLOCK_SIZE, DUALMAP_BLOCK_SIZE, DEFAULT_BLOCK_CHARS) == (16, 512, 64)


@pytest.mark.parametrize(
    ("tokens", "block_size", "blocks"),
    [(100, 16, 6), (96, 16, 6), (15, 16, 0), (0, 16, 0), (1024, 512, 2), (1023, 512, 1)],
    ids=["tail", "exact", "short", "empty", "dualmap-exact", "dualmap-tail"],
)
def test_only_full_blocks_are_hashed(tokens: int, block_size: int, blocks: int) -> None:
    keys = keys_from_tokens(np.arange(tokens), block_size=block_size, seed=SEED)
    assert keys.num_blocks == blocks
    assert keys.total_units == tokens
    assert keys.block_size == block_size
    assert keys.block_hashes.dtype == np.uint64


def test_tail_tokens_do_not_change_keys() -> None:
    base = keys_from_tokens(TOKENS[:96], block_size=16, seed=SEED)
    longer = keys_from_tokens(TOKENS[:111], block_size=16, seed=SEED)
    assert _hashes(base) == _hashes(longer)


@pytest.mark.parametrize("position", [0, 15, 16, 40, 95], ids=lambda p: f"token-{p}")
def test_a_changed_token_changes_its_block_and_every_later_one(position: int) -> None:
    base = keys_from_tokens(TOKENS, block_size=16, seed=SEED)
    changed = TOKENS.copy()
    changed[position] += 1
    other = keys_from_tokens(changed, block_size=16, seed=SEED)
    block = position // 16
    assert _hashes(base)[:block] == _hashes(other)[:block]
    assert all(a != b for a, b in zip(_hashes(base)[block:], _hashes(other)[block:], strict=True))


def test_shared_prefix_gives_equal_leading_keys_then_diverges() -> None:
    rng = np.random.default_rng(3)
    system_prompt = rng.integers(0, 128_000, 16 * 10)
    one = np.concatenate([system_prompt, rng.integers(0, 128_000, 200)])
    two = np.concatenate([system_prompt, rng.integers(0, 128_000, 300)])
    a = keys_from_tokens(one, block_size=16, seed=SEED)
    b = keys_from_tokens(two, block_size=16, seed=SEED)
    assert _hashes(a)[:10] == _hashes(b)[:10]
    assert not set(_hashes(a)[10:]) & set(_hashes(b)[10:])


def test_block_order_and_token_order_matter() -> None:
    swapped_blocks = np.concatenate([TOKENS[16:32], TOKENS[:16]])
    swapped_tokens = TOKENS[:32].copy()
    swapped_tokens[[0, 1]] = swapped_tokens[[1, 0]]
    base = _hashes(keys_from_tokens(TOKENS[:32], block_size=16, seed=SEED))
    assert _hashes(keys_from_tokens(swapped_blocks, block_size=16, seed=SEED))[1] != base[1]
    assert _hashes(keys_from_tokens(swapped_tokens, block_size=16, seed=SEED))[0] != base[0]


def test_a_repeated_block_gets_a_different_key_at_each_depth() -> None:
    keys = keys_from_tokens(np.tile(TOKENS[:16], 8), block_size=16, seed=SEED)
    assert len(set(_hashes(keys))) == 8


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"model": "a"}, {"model": "b"}),
        ({"model": "a"}, {"model": "a", "lora_adapter": "sql"}),
        ({"model": "a"}, {"model": "a", "cache_salt": "tenant-1"}),
        ({"model": "a", "lora_adapter": "x"}, {"model": "a", "cache_salt": "x"}),
        ({"model": "ab", "lora_adapter": "c"}, {"model": "a", "lora_adapter": "bc"}),
        (
            {"model": "a", "lora_adapter": "b\x1fc"},
            {"model": "a", "lora_adapter": "b", "cache_salt": "c"},
        ),
    ],
    ids=["model", "lora", "cache-salt", "lora-vs-salt", "boundary-shift", "separator-inside"],
)
def test_namespaces_never_share_keys(first: dict[str, str], second: dict[str, str]) -> None:
    assert namespace_seed(**first) != namespace_seed(**second)
    makers: list[Callable[[int], PromptKeys]] = [
        lambda seed: keys_from_tokens(TOKENS, block_size=16, seed=seed),
        lambda seed: keys_from_text("x" * 640, block_chars=64, seed=seed),
        lambda seed: keys_from_block_ids([1, 2, 3], block_size=512, total_tokens=1536, seed=seed),
    ]
    for make in makers:
        one, two = make(namespace_seed(**first)), make(namespace_seed(**second))
        assert not set(_hashes(one)) & set(_hashes(two))


@settings(max_examples=50, deadline=None)
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=2, unique=True))
def test_different_seeds_share_no_key_for_the_same_prompt(seeds: list[int]) -> None:
    one = keys_from_tokens(TOKENS, block_size=16, seed=seeds[0])
    two = keys_from_tokens(TOKENS, block_size=16, seed=seeds[1])
    assert not set(_hashes(one)) & set(_hashes(two))


def test_no_collisions_among_many_prompts_with_small_differences() -> None:
    """Random prompts, plus every single-token change and many two-token changes of one block:
    the structured differences a weak (linear) block fold would collide on."""
    rng = np.random.default_rng(7)
    seen: set[int] = set()
    total = 0
    for _ in range(300):
        keys = keys_from_tokens(rng.integers(0, 128_000, 512), block_size=16, seed=SEED)
        seen.update(_hashes(keys))
        total += keys.num_blocks
    block = np.full(16, 7, dtype=np.int64)
    variants = [block]
    for position in range(16):
        for delta in (1, 2, 1 << 16, 1 << 31):
            changed = block.copy()
            changed[position] += delta
            variants.append(changed)
    for first in range(16):
        for second in range(first + 1, 16):
            changed = block.copy()
            changed[first] += 1
            changed[second] += 1
            variants.append(changed)
            changed = block.copy()
            changed[first] += 1
            changed[second] -= 1
            variants.append(changed)
    for variant in variants:
        seen.update(_hashes(keys_from_tokens(variant, block_size=16, seed=SEED)))
    total += len(variants)
    assert len(seen) == total


def test_one_flipped_input_bit_flips_about_half_the_key_bits() -> None:
    """Avalanche, lightly: a single-bit change of one token moves each key bit with
    probability near 1/2 (averaged over many bits, so the check is not a coin toss)."""
    rng = np.random.default_rng(11)
    flipped_bits = []
    for _ in range(200):
        tokens = rng.integers(0, 128_000, 16)
        changed = tokens.copy()
        changed[rng.integers(16)] ^= 1 << int(rng.integers(17))
        a = int(keys_from_tokens(tokens, block_size=16, seed=SEED).block_hashes[0])
        b = int(keys_from_tokens(changed, block_size=16, seed=SEED).block_hashes[0])
        flipped_bits.append((a ^ b).bit_count())
    mean = float(np.mean(flipped_bits))
    assert 29 < mean < 35  # 32 +- ~6 standard errors of the mean of 200 draws
    assert min(flipped_bits) >= 12


def test_key_bits_are_balanced_over_random_prompts() -> None:
    rng = np.random.default_rng(5)
    hashes = keys_from_tokens(rng.integers(0, 50, 16 * 4000), block_size=16, seed=SEED)
    bits = (hashes.block_hashes[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    share_of_ones = bits.mean(axis=0)
    assert np.all(np.abs(share_of_ones - 0.5) < 0.04)  # 5 standard errors for 4000 keys


def test_token_list_and_array_give_the_same_keys() -> None:
    as_list = keys_from_tokens(TOKENS.tolist(), block_size=16, seed=SEED)
    as_uint32 = keys_from_tokens(TOKENS.astype(np.uint32), block_size=16, seed=SEED)
    assert (
        _hashes(as_list)
        == _hashes(as_uint32)
        == _hashes(keys_from_tokens(TOKENS, block_size=16, seed=SEED))
    )


def test_hashes_are_read_only() -> None:
    keys = keys_from_tokens(TOKENS, block_size=16, seed=SEED)
    with pytest.raises(ValueError, match="read-only"):
        keys.block_hashes[0] = 1


def test_text_mode_counts_characters_not_bytes() -> None:
    text = "é" * 64 + "日本語" * 30 + "🙂" * 70
    keys = keys_from_text(text, block_chars=64, seed=SEED)
    assert keys.total_units == len(text)
    assert keys.num_blocks == len(text) // 64
    assert keys.block_size == 64
    ascii_keys = keys_from_text("e" * 64, block_chars=64, seed=SEED)
    assert _hashes(keys)[0] != _hashes(ascii_keys)[0]


def test_text_mode_shares_prefix_keys_and_survives_lone_surrogates() -> None:
    system = "Tu es un assistant serviable. 日本語も話せます。 " * 8
    a = keys_from_text(system + "Quelle heure est-il ?", block_chars=64, seed=SEED)
    b = keys_from_text(system + "Raconte une blague.\ud800", block_chars=64, seed=SEED)
    shared = len(system) // 64
    assert _hashes(a)[:shared] == _hashes(b)[:shared]
    assert b.total_units == len(system) + len("Raconte une blague.\ud800")


def test_block_ids_mode_keeps_only_full_blocks_and_chains() -> None:
    keys = keys_from_block_ids([1, 2, 3], block_size=512, total_tokens=1100, seed=SEED)
    assert keys.num_blocks == 2
    assert keys.total_units == 1100
    same_prefix = keys_from_block_ids([1, 2, 9], block_size=512, total_tokens=1536, seed=SEED)
    assert _hashes(keys) == _hashes(same_prefix)[:2]
    other_first = keys_from_block_ids([5, 2, 3], block_size=512, total_tokens=1536, seed=SEED)
    assert not set(_hashes(other_first)) & set(_hashes(same_prefix))


def test_block_ids_and_tokens_are_different_key_spaces() -> None:
    tokens = keys_from_tokens(np.arange(16), block_size=16, seed=SEED)
    ids = keys_from_block_ids(np.arange(16), block_size=1, total_tokens=16, seed=SEED)
    assert not set(_hashes(tokens)) & set(_hashes(ids))


def test_truncate_is_a_prefix_view() -> None:
    keys = keys_from_tokens(TOKENS, block_size=16, seed=SEED)
    short = truncate(keys, 2)
    assert short.num_blocks == 2
    assert _hashes(short) == _hashes(keys)[:2]
    assert short.total_units == 32
    assert np.shares_memory(short.block_hashes, keys.block_hashes)
    assert truncate(keys, 99).num_blocks == 6
    assert truncate(keys, -1).num_blocks == 0
    assert truncate(keys, 0).total_units == 0
    assert keys.prefix_tokens(3, prompt_tokens=100) == 48
    text_keys = keys_from_text("x" * 400, block_chars=64, seed=SEED)
    # 2 blocks of 64 characters out of 400 characters, 100 real tokens: 32 tokens.
    assert text_keys.prefix_tokens(2, prompt_tokens=100) == 32


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: keys_from_tokens(TOKENS, block_size=0, seed=SEED), ValueError, "block size"),
        (
            lambda: keys_from_tokens(TOKENS, block_size=_unchecked(1.5), seed=SEED),
            TypeError,
            "block size",
        ),
        (lambda: keys_from_tokens([1, -2, 3], block_size=1, seed=SEED), ValueError, "non-neg"),
        (
            lambda: keys_from_tokens(_unchecked([1.0, 2.0]), block_size=1, seed=SEED),
            TypeError,
            "integers",
        ),
        (
            lambda: keys_from_tokens(_unchecked(["a"]), block_size=1, seed=SEED),
            TypeError,
            "integers",
        ),
        (
            lambda: keys_from_tokens(_unchecked([[1, 2]]), block_size=1, seed=SEED),
            ValueError,
            "one-dim",
        ),
        (lambda: keys_from_text(_unchecked(b"bytes"), block_chars=4, seed=SEED), TypeError, "str"),
        (lambda: keys_from_text("abc", block_chars=-1, seed=SEED), ValueError, "block size"),
        (
            lambda: keys_from_block_ids([1], block_size=512, total_tokens=-1, seed=SEED),
            ValueError,
            "total_tokens",
        ),
    ],
    ids=[
        "zero-block",
        "float-block",
        "negative-token",
        "float-tokens",
        "str-tokens",
        "2d-tokens",
        "bytes-text",
        "negative-chars",
        "negative-total",
    ],
)
def test_bad_input_is_refused_clearly(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_keys_are_identical_across_processes() -> None:
    script = (
        "import numpy as np\n"
        "from twinroute.scheduler.keys import *\n"
        "seed = namespace_seed(model='m', lora_adapter='l', cache_salt='s')\n"
        "print(seed)\n"
        "print(keys_from_tokens(np.arange(1000, 1100), block_size=16, seed=seed)"
        ".block_hashes.tolist())\n"
        "print(keys_from_text('héllo wörld 日本 ' * 20, block_chars=64, seed=seed)"
        ".block_hashes.tolist())\n"
        "print(keys_from_block_ids([4, 5, 6], block_size=512, total_tokens=1600, seed=seed)"
        ".block_hashes.tolist())\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2", "random")
    }
    assert len(outputs) == 1
    seed = namespace_seed(model="m", lora_adapter="l", cache_salt="s")
    here = [
        str(seed),
        str(_hashes(keys_from_tokens(np.arange(1000, 1100), block_size=16, seed=seed))),
        str(_hashes(keys_from_text("héllo wörld 日本 " * 20, block_chars=64, seed=seed))),
        str(_hashes(keys_from_block_ids([4, 5, 6], block_size=512, total_tokens=1600, seed=seed))),
    ]
    assert outputs == {"\n".join(here) + "\n"}


def test_keys_match_pinned_values() -> None:
    """Keys must not drift with numpy versions, platforms or refactors: schedulers of two
    versions side by side (a rolling update) must agree on every key. A deliberate change of
    the scheme updates these values and says so in `docs/design.md`."""
    assert namespace_seed(model="m") == 1388814801423089711
    assert _hashes(keys_from_tokens(np.arange(48), block_size=16, seed=0)) == [
        16680715524026282394,
        13710502030508884005,
        14581088409626518173,
    ]
    assert _hashes(keys_from_text("abcd" * 4, block_chars=8, seed=1)) == [
        17695594259239372742,
        13167690810522916806,
    ]
    assert _hashes(keys_from_block_ids([7, 8], block_size=512, total_tokens=1024, seed=2)) == [
        3465288304758533098,
        11999602048438466249,
    ]


def test_token_keys_are_xxh3_of_each_block_seeded_with_the_key_before() -> None:
    """The scheme as `scheduler/keys.py` documents it, computed here from its definition."""
    tokens = [7, 2**32 + 5, 0, 31999, 12, 12, 9, 1, 4]  # 2 full blocks of 4, a tail of 1
    key, expected = 99, []
    for block in range(2):
        key = xxhash.xxh3_64_intdigest(struct.pack("<4Q", *tokens[4 * block : 4 * block + 4]), key)
        expected.append(key)
    assert _hashes(keys_from_tokens(tokens, block_size=4, seed=99)) == expected
    text_key = xxhash.xxh3_64_intdigest(struct.pack("<3Q", *map(ord, "日本x")), 5)
    assert _hashes(keys_from_text("日本xyz", block_chars=3, seed=5)) == [text_key]


def test_trace_keys_match_exactly_when_the_block_id_prefixes_match() -> None:
    """On the bundled Mooncake trace: every distinct hash_ids prefix gets its own key, and
    every occurrence of a prefix the same key (ids are small sequential integers there, the
    case a weak id mix would fold together)."""
    from importlib.resources import files

    trace = files("twinroute") / "data" / "mooncake_synthetic_trace.jsonl"
    prefix_of_key: dict[int, tuple[int, ...]] = {}
    blocks = 0
    with trace.open("r", encoding="utf-8") as lines:
        for line in lines:
            ids = json.loads(line)["hash_ids"]
            keys = keys_from_block_ids(ids, block_size=512, total_tokens=len(ids) * 512, seed=SEED)
            for depth, key in enumerate(_hashes(keys)):
                prefix = tuple(ids[: depth + 1])
                assert prefix_of_key.setdefault(key, prefix) == prefix
            blocks += keys.num_blocks
    distinct_prefixes = len(prefix_of_key)
    assert blocks > distinct_prefixes > 10_000


@settings(max_examples=60, deadline=None)
@given(
    shared=st.integers(0, 80),
    first_tail=st.lists(st.integers(0, 2**31 - 1), max_size=60),
    second_tail=st.lists(st.integers(0, 2**31 - 1), max_size=60),
    block_size=st.sampled_from([1, 4, 16]),
)
def test_keys_agree_exactly_on_the_shared_full_blocks(
    shared: int, first_tail: list[int], second_tail: list[int], block_size: int
) -> None:
    prefix = list(range(shared))
    one, two = prefix + first_tail, prefix + second_tail
    a = _hashes(keys_from_tokens(one, block_size=block_size, seed=SEED))
    b = _hashes(keys_from_tokens(two, block_size=block_size, seed=SEED))
    common = 0
    while common < min(len(one), len(two)) and one[common] == two[common]:
        common += 1
    same_blocks = common // block_size
    assert a[:same_blocks] == b[:same_blocks]
    assert all(x != y for x, y in zip(a[same_blocks:], b[same_blocks:], strict=False))
