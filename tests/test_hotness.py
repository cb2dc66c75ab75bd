from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twinroute.scheduler.hotness import MIN_SPLIT_REQUESTS, HotnessTree
from twinroute.scheduler.keys import keys_from_block_ids, namespace_seed
from twinroute.scheduler.types import PromptKeys

SEED = namespace_seed(model="m")
BLOCK = 512


def prompt(*block_ids: int) -> PromptKeys:
    return keys_from_block_ids(
        np.array(block_ids, dtype=np.int64),
        block_size=BLOCK,
        total_tokens=BLOCK * len(block_ids),
        seed=SEED,
    )


def test_a_new_prefix_keys_on_the_minimum_depth() -> None:
    tree = HotnessTree(window=64)
    assert tree.observe(prompt(1, 2, 3), endpoints=8) == 1


def test_a_prompt_without_full_blocks_has_no_key_and_is_not_counted() -> None:
    tree = HotnessTree(window=64)
    assert tree.observe(prompt(), endpoints=8) == 0
    assert len(tree) == 0


def test_a_system_prompt_every_request_shares_is_keyed_deeper() -> None:
    tree = HotnessTree(window=64)
    depths = [tree.observe(prompt(0, 100 + i, 200 + i), endpoints=8) for i in range(32)]
    # Past the warm-up (more than MIN_SPLIT_REQUESTS requests through it) block 0 is hot;
    # every later request keys one deeper, on its own conversation block, so the shared
    # block pins no pair.
    assert set(depths[: MIN_SPLIT_REQUESTS + 1]) == {1}
    assert set(depths[MIN_SPLIT_REQUESTS + 1 :]) == {2}
    assert tree.is_split(int(prompt(0).block_hashes[0]))


def test_a_fresh_trees_first_conversation_keeps_its_key_on_its_next_turn() -> None:
    # Regression: the first request of a fresh scheduler had rho = 1 and split its node, so
    # the same conversation's second turn keyed one block deeper, on another candidate pair,
    # away from the instance that cached its first turn.
    tree = HotnessTree(window=1024)
    first_turn = tree.observe(prompt(1, 2), endpoints=4)
    for i in range(20):
        tree.observe(prompt(5_000 + i, 6_000 + i), endpoints=4)
    second_turn = tree.observe(prompt(1, 2, 3), endpoints=4)
    assert first_turn == second_turn == 1


def test_a_split_node_whose_traffic_died_down_is_merged_when_next_read() -> None:
    # Regression: a split node was re-evaluated only after the depth walk, so its next request
    # still keyed deeper on a flag set when the prefix was hot, leaving its pair.
    endpoints, window = 4, 100
    tree = HotnessTree(window=window)
    node = int(prompt(7).block_hashes[0])
    for i in range(60):
        tree.observe(prompt(7, 100 + i), endpoints=endpoints)
    assert tree.is_split(node)
    for i in range(95):
        tree.observe(prompt(10_000 + i), endpoints=endpoints)
    assert tree.rho(node) == pytest.approx(0.05)  # below 1/n = 0.25
    assert tree.observe(prompt(7, 999), endpoints=endpoints) == 1
    assert not tree.is_split(node)


def test_a_prefix_hot_at_two_levels_is_keyed_two_deeper() -> None:
    tree = HotnessTree(window=64)
    depths = [tree.observe(prompt(0, 1, 300 + i), endpoints=8) for i in range(16)]
    assert depths[-1] == 3


@pytest.mark.parametrize(
    ("share_of_window", "was_split", "split_after"),
    [
        (0.30, False, True),  # above 2/n: split
        (0.20, True, True),  # between 1/n and 2/n: a split node stays split
        (0.20, False, False),  # between 1/n and 2/n: an unsplit node stays unsplit
        (0.05, True, False),  # below 1/n: merge
    ],
    ids=["above-2/n-splits", "hysteresis-keeps-split", "hysteresis-keeps-merged", "below-1/n"],
)
def test_split_thresholds_with_hysteresis(
    share_of_window: float, was_split: bool, split_after: bool
) -> None:
    endpoints, window = 8, 200  # 1/n = 12.5%, 2/n = 25%
    tree = HotnessTree(window=window)
    hot = prompt(7, 8)
    node = int(hot.block_hashes[0])
    if was_split:
        for _ in range(window):
            tree.observe(hot, endpoints=endpoints)
        assert tree.is_split(node)
    # Refill the window: `share_of_window` of it carries the node, the rest are unrelated.
    hot_requests = round(share_of_window * window)
    for i in range(window - hot_requests):
        tree.observe(prompt(10_000 + i), endpoints=endpoints)
    for _ in range(hot_requests):
        tree.observe(hot, endpoints=endpoints)
    assert tree.rho(node) == pytest.approx(share_of_window)
    assert tree.is_split(node) is split_after


def test_depth_is_capped_by_the_prompt_and_by_max_depth() -> None:
    tree = HotnessTree(window=16, max_depth=3)
    for _ in range(8):
        tree.observe(prompt(1, 2, 3, 4, 5), endpoints=8)
    assert tree.depth_for(prompt(1, 2, 3, 4, 5)) == 3
    assert tree.depth_for(prompt(1, 2)) == 2


def test_the_window_slides_and_forgets_cold_nodes() -> None:
    tree = HotnessTree(window=10)
    for i in range(50):
        tree.observe(prompt(i, 1000 + i), endpoints=4)
    assert len(tree) == 10
    # Each request counts its key node and the one below it.
    assert tree.node_count == 20
    assert tree.rho(int(prompt(0).block_hashes[0])) == 0.0


def test_resize_trims_the_window() -> None:
    tree = HotnessTree(window=100)
    for i in range(100):
        tree.observe(prompt(i), endpoints=4)
    tree.resize(10)
    assert (len(tree), tree.window, tree.node_count) == (10, 10, 10)


@pytest.mark.parametrize(
    "kwargs",
    [{"window": 0}, {"min_depth": 0}, {"min_depth": 5, "max_depth": 4}],
    ids=["empty-window", "zero-depth", "min-above-max"],
)
def test_bad_settings_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        HotnessTree(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=6), max_size=80
    ),
    window=st.integers(min_value=1, max_value=20),
    endpoints=st.integers(min_value=1, max_value=16),
)
def test_memory_stays_bounded_and_depth_valid(
    prompts: list[list[int]], window: int, endpoints: int
) -> None:
    tree = HotnessTree(window=window, max_depth=4)
    for ids in prompts:
        keys = prompt(*ids)
        depth = tree.observe(keys, endpoints=endpoints)
        assert depth == (0 if not ids else max(1, min(depth, len(ids), 4)))
        assert len(tree) <= window
        assert tree.node_count <= window * 5
        assert tree.split_count <= tree.node_count


def test_with_two_endpoints_no_prefix_is_ever_split() -> None:
    # 2/n = 1: no prefix can carry more than the whole window, so keys stay short.
    tree = HotnessTree(window=16)
    depths = {tree.observe(prompt(1, 2, 3), endpoints=2) for _ in range(32)}
    assert depths == {1}
