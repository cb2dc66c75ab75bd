from __future__ import annotations

import numpy as np
import pytest
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.prefix_index import PrefixIndex
from twinroute.scheduler.types import PromptKeys

SEED = namespace_seed(model="m")


def prompt(*segments: tuple[int, int]) -> PromptKeys:
    """Keys of a prompt built from (start, length) runs of token ids, 16-token blocks."""
    tokens = np.concatenate([np.arange(start, start + length) for start, length in segments])
    return keys_from_tokens(tokens, block_size=16, seed=SEED)


SYSTEM = (0, 64)  # 4 blocks shared by every conversation


def test_unknown_endpoint_matches_nothing() -> None:
    assert PrefixIndex().matched_blocks("nobody", prompt(SYSTEM)) == 0


def test_recorded_prompt_matches_fully_and_shares_its_prefix() -> None:
    index = PrefixIndex()
    index.record("a", prompt(SYSTEM, (1000, 64)))
    assert index.matched_blocks("a", prompt(SYSTEM, (1000, 64))) == 8
    assert index.matched_blocks("a", prompt(SYSTEM, (5000, 64))) == 4
    assert index.matched_blocks("b", prompt(SYSTEM, (1000, 64))) == 0


def test_holders_reports_every_endpoint_with_its_depth() -> None:
    index = PrefixIndex()
    index.record("a", prompt(SYSTEM, (1000, 64)))
    index.record("b", prompt(SYSTEM))
    index.record("c", prompt((9000, 64)))
    assert index.holders(prompt(SYSTEM, (1000, 32))) == {"a": 6, "b": 4}
    assert index.holders(prompt((7000, 64))) == {}


def test_lru_evicts_tails_before_heads() -> None:
    index = PrefixIndex(capacity_blocks=6)
    index.record("a", prompt(SYSTEM, (1000, 64)))  # 8 blocks into 6: the last two go
    assert index.size("a") == 6
    assert index.matched_blocks("a", prompt(SYSTEM, (1000, 64))) == 6
    index.record("a", prompt(SYSTEM, (2000, 32)))  # 2 new blocks: the oldest tail blocks go
    assert index.matched_blocks("a", prompt(SYSTEM, (2000, 32))) == 6
    assert index.matched_blocks("a", prompt(SYSTEM, (1000, 64))) == 4


def test_a_recently_used_prefix_survives_eviction() -> None:
    index = PrefixIndex(capacity_blocks=8)
    index.record("a", prompt(SYSTEM, (1000, 16)))
    for conversation in range(10):
        index.record("a", prompt(SYSTEM, (2000 + 100 * conversation, 16)))
    assert index.matched_blocks("a", prompt(SYSTEM)) == 4


def test_an_engines_own_kv_size_bounds_its_record_alone() -> None:
    index = PrefixIndex(capacity_blocks=100)
    index.record("a", prompt(SYSTEM, (1000, 64)))
    index.record("b", prompt(SYSTEM, (1000, 64)))
    index.set_capacity("a", 6)  # trimmed at once, tails first
    assert (index.size("a"), index.size("b")) == (6, 8)
    assert index.matched_blocks("a", prompt(SYSTEM, (1000, 64))) == 6
    assert index.holders(prompt(SYSTEM, (1000, 64))) == {"a": 6, "b": 8}
    index.record("a", prompt(SYSTEM, (2000, 64)))
    assert index.size("a") == 6
    index.remove_endpoint("a")
    assert index.capacity_of("a") == 100
    with pytest.raises(ValueError):
        index.set_capacity("b", 0)


def test_removing_an_endpoint_forgets_it_everywhere() -> None:
    index = PrefixIndex()
    index.record("a", prompt(SYSTEM))
    index.record("b", prompt(SYSTEM))
    index.remove_endpoint("a")
    assert index.holders(prompt(SYSTEM)) == {"b": 4}
    assert index.size() == 4


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex(capacity_blocks=0)
