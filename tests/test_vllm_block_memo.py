"""The memo of vLLM block digests: the same digests as hashing whole, fewer blocks hashed."""

from __future__ import annotations

import random

import numpy as np
import pytest
from twinroute.scheduler.vllm_block_memo import MemoizedBlockHasher
from twinroute.scheduler.vllm_blocks import VllmBlockHasher


def conversation_prompts(rng: random.Random, *, count: int) -> list[list[int]]:
    """Prompts that share a system prompt and grow turn by turn, as chat traffic does."""
    system = [rng.randrange(32_000) for _ in range(100)]
    turns = [list(system) for _ in range(4)]
    prompts = []
    for _ in range(count):
        turn = rng.choice(turns)
        turn += [rng.randrange(32_000) for _ in range(rng.randint(1, 40))]
        prompts.append(list(turn))
    return prompts


@pytest.mark.parametrize("memo_blocks", [100_000, 7])
def test_digests_equal_hashing_whole_with_and_without_salt(memo_blocks: int) -> None:
    whole = VllmBlockHasher(16)
    memo = MemoizedBlockHasher(16, memo_blocks=memo_blocks)
    rng = random.Random(memo_blocks)
    for prompt in conversation_prompts(rng, count=60):
        salt = rng.choice([None, None, "tenant-a", "tenant-b"])
        given = np.asarray(prompt, dtype=np.uint32) if rng.random() < 0.5 else prompt
        assert memo.block_hashes(given, cache_salt=salt) == whole.block_hashes(
            prompt, cache_salt=salt
        )
        assert len(memo) <= memo_blocks
    assert memo.block_digests([1, 2, 3]) == []


def test_a_repeated_prefix_is_not_hashed_again() -> None:
    memo = MemoizedBlockHasher(16)
    system = list(range(160))  # ten blocks
    memo.block_hashes(system + [900, 901] * 8)  # 11 blocks
    assert (memo.reused_blocks, memo.hashed_blocks) == (0, 11)
    memo.block_hashes(system + [700] * 40)  # the ten shared, then two of its own
    assert (memo.reused_blocks, memo.hashed_blocks) == (10, 13)
    # A salt is another namespace: nothing shared with the unsalted prompts.
    memo.block_hashes(system, cache_salt="s")
    assert (memo.reused_blocks, memo.hashed_blocks) == (10, 23)


def test_a_prefix_that_ages_out_is_hashed_once_more_then_found_again() -> None:
    memo = MemoizedBlockHasher(16, memo_blocks=30)
    head = list(range(64))  # four blocks every prompt shares
    rng = random.Random(1)
    for _ in range(50):  # six blocks of their own each: the head is pushed out again and again
        memo.block_hashes(head + [rng.randrange(32_000) for _ in range(96)])
        assert len(memo) <= 30
    reused, hashed = memo.reused_blocks, memo.hashed_blocks
    memo.block_hashes(head + [5] * 16)
    memo.block_hashes(head + [6] * 16)
    assert memo.hashed_blocks - hashed <= 4 + 2
    assert memo.reused_blocks - reused >= 4


def test_names_the_caller_already_has_stand_in_for_the_memos_own_keys() -> None:
    from twinroute.scheduler.keys import keys_from_tokens

    whole = VllmBlockHasher(16)
    memo = MemoizedBlockHasher(16)
    prompt = np.arange(100, 100 + 16 * 5 + 3, dtype=np.uint32)
    names = keys_from_tokens(prompt, block_size=16, seed=7).block_hashes
    assert memo.block_hashes(prompt, names=names) == whole.block_hashes(prompt)
    assert memo.block_hashes(prompt, names=names) == whole.block_hashes(prompt)
    assert (memo.reused_blocks, memo.hashed_blocks) == (5, 5)
    with pytest.raises(ValueError, match="block names"):
        memo.block_hashes(prompt, names=names[:3])
