"""Policies over hand-built cluster views: the situations that tell the rules apart."""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np
import pytest
from twinroute.scheduler.keys import keys_from_block_ids, namespace_seed
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.policies.base import COLD_PAIR
from twinroute.scheduler.policies.chwbl import ChwblPolicy
from twinroute.scheduler.policies.consistent_hash import ConsistentHashPolicy
from twinroute.scheduler.policies.dualmap import DualMapPolicy
from twinroute.scheduler.prefix_index import PrefixIndex
from twinroute.scheduler.types import (
    ClusterView,
    Endpoint,
    LoadSnapshot,
    PromptKeys,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

SEED = namespace_seed(model="m")
BLOCK = 512
# Pending prefill that takes far longer than the 5 s SLO to clear (20k tokens/s profile).
SWAMPED = 1_000_000


def keys(*block_ids: int) -> PromptKeys:
    return keys_from_block_ids(
        np.array(block_ids, dtype=np.int64),
        block_size=BLOCK,
        total_tokens=BLOCK * len(block_ids),
        seed=SEED,
    )


def request(request_id: str, prompt: PromptKeys) -> RoutingRequest:
    return RoutingRequest(request_id=request_id, keys=prompt, prompt_tokens=prompt.total_units)


def view(
    ids: list[str] | int,
    *,
    index: PrefixIndex | None = None,
    loads: Mapping[str, LoadSnapshot] | None = None,
) -> ClusterView:
    names = [f"e{i}" for i in range(ids)] if isinstance(ids, int) else ids
    return ClusterView(
        endpoints=tuple(Endpoint(id=n, address=f"{n}:8000") for n in names),
        loads=dict(loads or {}),
        prefix_index=index or PrefixIndex(capacity_blocks=100_000),
        now=0.0,
    )


def pending(tokens: int, *, in_flight: int = 1) -> LoadSnapshot:
    return LoadSnapshot(in_flight=in_flight, pending_prefill_tokens=tokens)


# -- dualmap ----------------------------------------------------------------------------------


def test_dualmap_a_system_prompt_every_request_shares_does_not_pin_one_pair() -> None:
    policy = DualMapPolicy(config=PolicyConfig(hotness_window=256))
    index = PrefixIndex(capacity_blocks=100_000)
    pool = view(8, index=index)
    chosen: collections.Counter[str] = collections.Counter()
    depths: collections.Counter[int] = collections.Counter()
    pairs: set[frozenset[str]] = set()
    for i in range(400):
        # Two system-prompt blocks shared by all, then one of 100 conversations.
        prompt = keys(1, 2, 10_000 + i % 100, 20_000 + i)
        decision = policy.pick(request(f"r{i}", prompt), pool)
        index.record(decision.endpoint_id, prompt)
        if i >= 100:
            pairs.add(frozenset(c.endpoint_id for c in decision.candidates))
            chosen[decision.endpoint_id] += 1
            depths[decision.key_depth] += 1
    # The key goes past the shared prefix to the conversation (a few conversations that looked
    # hot while the window was nearly empty key one block deeper once more as they merge back).
    assert depths[3] >= 0.98 * 300
    assert len(pairs) >= 20
    assert len(chosen) >= 6
    assert max(chosen.values()) < 3 * 300 / 8


def test_dualmap_without_the_hotness_tree_a_shared_prefix_would_pin_one_pair() -> None:
    # The same traffic keyed on the first block alone (a fixed key) has one candidate pair.
    policy = DualMapPolicy(config=PolicyConfig(max_key_depth=1))
    pool = view(8)
    pairs = {
        frozenset(
            c.endpoint_id
            for c in policy.pick(request(f"r{i}", keys(1, 2, 10_000 + i)), pool).candidates
        )
        for i in range(100)
    }
    assert len(pairs) == 1


def _cached_pair(policy: DualMapPolicy, prompt: PromptKeys, pool: ClusterView) -> tuple[str, str]:
    policy.rings.sync(pool.ids())
    return policy.rings.candidates(int(prompt.block_hashes[0]))


def test_dualmap_keeps_affinity_to_the_candidate_with_the_cache() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(5, 6, 7, 8)
    pool = view(8, index=index)
    first, second = _cached_pair(policy, prompt, pool)
    index.record(second, prompt)
    # The cached candidate is busier, but well within the SLO: affinity holds.
    loaded = view(8, index=index, loads={second: pending(40_000), first: pending(0)})
    decision = policy.pick(request("r1", prompt), loaded)
    assert decision.endpoint_id == second
    assert decision.reason is DecisionReason.CACHE_AFFINITY
    assert decision.key_depth == 1
    assert [c.role for c in decision.candidates] == ["ring-1", "ring-2"]
    assert {c.endpoint_id for c in decision.candidates} == {first, second}
    assert "cached blocks" in decision.detail


def test_dualmap_switches_when_the_cached_candidate_would_break_the_slo() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(5, 6, 7, 8)
    first, second = _cached_pair(policy, prompt, view(8, index=index))
    index.record(first, prompt)
    swamped = view(8, index=index, loads={first: pending(SWAMPED)})
    decision = policy.pick(request("r1", prompt), swamped)
    assert decision.endpoint_id == second
    assert decision.reason is DecisionReason.SLO_SWITCH
    assert decision.predicted_ttft_s <= 5.0
    assert "would break" in decision.detail


def test_dualmap_a_tighter_request_slo_switches_earlier() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(5, 6, 7, 8)
    first, second = _cached_pair(policy, prompt, view(8, index=index))
    index.record(first, prompt)
    pool = view(8, index=index, loads={first: pending(40_000)})  # ~2 s of queue
    relaxed = policy.pick(request("r1", prompt), pool)
    # A fresh policy: the first pick counted the prompt in the hotness window.
    policy = DualMapPolicy(config=PolicyConfig())
    strict = policy.pick(
        RoutingRequest(
            request_id="r2", keys=prompt, prompt_tokens=prompt.total_units, ttft_slo_s=1.0
        ),
        pool,
    )
    assert (relaxed.endpoint_id, relaxed.reason) == (first, DecisionReason.CACHE_AFFINITY)
    assert (strict.endpoint_id, strict.reason) == (second, DecisionReason.SLO_SWITCH)


@pytest.mark.parametrize(
    ("cached_backlog", "other_backlog"),
    [(SWAMPED, 2 * SWAMPED), (2 * SWAMPED, SWAMPED)],
    ids=["cached-one-lower", "other-lower"],
)
def test_dualmap_both_over_the_slo_keeps_the_cache(cached_backlog: int, other_backlog: int) -> None:
    """A switch that cannot meet the SLO only gives the cache away: past the pool's capacity
    every candidate is over, and chasing the lower prediction spends compute on prefill that
    the cached one would have skipped (in the simulator, 5-6 points of SLO attainment lost
    just past the goodput cliff)."""
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(5, 6, 7, 8)
    first, second = _cached_pair(policy, prompt, view(8, index=index))
    index.record(first, prompt)
    loads = {first: pending(cached_backlog), second: pending(other_backlog)}
    decision = policy.pick(request("r1", prompt), view(8, index=index, loads=loads))
    assert decision.endpoint_id == first
    assert decision.reason is DecisionReason.CACHE_AFFINITY
    assert "both candidates over" in decision.detail
    assert f"kept {first}" in decision.detail


@pytest.mark.parametrize("busier", ["ring-1", "ring-2"], ids=["ring-1-busier", "ring-2-busier"])
def test_dualmap_equal_reuse_goes_to_the_less_loaded(busier: str) -> None:
    # The published rule: the pair only (the other six endpoints are idle).
    policy = DualMapPolicy(config=PolicyConfig(cold_placement=COLD_PAIR))
    prompt = keys(40, 41)
    first, second = _cached_pair(policy, prompt, view(8))
    heavy, light = (first, second) if busier == "ring-1" else (second, first)
    decision = policy.pick(
        request("r1", prompt), view(8, loads={heavy: pending(30_000), light: pending(1_000)})
    )
    assert decision.endpoint_id == light
    assert decision.reason is DecisionReason.TIE_LESS_LOADED


def memory(kv_usage: float) -> LoadSnapshot:
    """A freshly scraped endpoint with no queue, its KV memory `kv_usage` full."""
    return LoadSnapshot(in_flight=1, running=1, queued=0, kv_usage=kv_usage)


@pytest.mark.parametrize("fuller", ["ring-1", "ring-2"])
def test_dualmap_equal_reuse_and_load_goes_where_memory_is_free(fuller: str) -> None:
    # Placing a prompt where the KV memory is full evicts what others cached there (and, past
    # full, preempts): among equal candidates the one with room wins.
    policy = DualMapPolicy(config=PolicyConfig(cold_placement=COLD_PAIR))
    prompt = keys(40, 41)
    first, second = _cached_pair(policy, prompt, view(8))
    full, free = (first, second) if fuller == "ring-1" else (second, first)
    loads = {full: memory(0.97), free: memory(0.30)}
    decision = policy.pick(request("r1", prompt), view(8, loads=loads))
    assert decision.endpoint_id == free
    assert decision.reason is DecisionReason.TIE_LESS_LOADED
    scores = {c.endpoint_id: c for c in decision.candidates}
    # The charge is in the ranking score only; the predicted TTFT (the SLO check) is the
    # cost model's.
    assert scores[full].score > scores[full].predicted_ttft_s
    assert scores[full].predicted_ttft_s == scores[free].predicted_ttft_s


def test_dualmap_a_cold_prompt_leaves_a_pair_whose_memory_is_full() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    prompt = keys(40, 41)
    first, second = _cached_pair(policy, prompt, view(8))
    loads = {e: memory(0.5) for e in view(8).ids()}
    loads[first] = loads[second] = memory(0.98)
    decision = policy.pick(request("r1", prompt), view(8, loads=loads))
    assert decision.endpoint_id not in (first, second)
    # Without the charge the pair and the rest are equal, and ties stay on the pair.
    blind = DualMapPolicy(config=PolicyConfig(charge_eviction=False))
    assert blind.pick(request("r2", prompt), view(8, loads=loads)).endpoint_id in (first, second)


def test_dualmap_a_cold_prompt_goes_to_an_idle_endpoint_and_its_next_turn_follows() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    first_turn = keys(40, 41)
    first, second = _cached_pair(policy, first_turn, view(8, index=index))
    busy = {first: pending(30_000), second: pending(20_000)}
    decision = policy.pick(request("r1", first_turn), view(8, index=index, loads=busy))
    # The pair is busy and nothing holds the prompt: an idle endpoint beats both.
    elsewhere = decision.endpoint_id
    assert elsewhere not in (first, second)
    assert "least-loaded" in {c.role for c in decision.candidates}
    index.record(elsewhere, first_turn)
    # The next turn extends the prompt; the pair is idle now, but it holds nothing of it.
    second_turn = keys(40, 41, 42)
    decision = policy.pick(request("r2", second_turn), view(8, index=index))
    assert decision.endpoint_id == elsewhere
    assert decision.reason is DecisionReason.CACHE_AFFINITY
    assert any(c.role == "holder" for c in decision.candidates)
    # With the published rule the same turn stays on its (empty-handed) pair.
    pair_only = DualMapPolicy(config=PolicyConfig(cold_placement=COLD_PAIR))
    assert pair_only.pick(request("r3", second_turn), view(8, index=index)).endpoint_id in (
        first,
        second,
    )


def test_dualmap_an_excluded_candidate_falls_to_the_other_ones() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(5, 6, 7, 8)
    first, _second = _cached_pair(policy, prompt, view(8, index=index))
    index.record(first, prompt)
    decision = policy.pick(
        RoutingRequest(
            request_id="r1",
            keys=prompt,
            prompt_tokens=prompt.total_units,
            exclude=frozenset({first}),
        ),
        view(8, index=index),
    )
    assert decision.endpoint_id != first
    assert first not in {c.endpoint_id for c in decision.candidates}
    assert len(decision.candidates) == 2


def test_dualmap_unknown_scrapes_fall_back_to_lease_load() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    prompt = keys(40, 41)
    # Two endpoints: the pair is the pool (idle endpoints outside it, unscraped, would draw a
    # cold prompt away from a pair whose memory is known to be in use).
    first, second = _cached_pair(policy, prompt, view(2))
    unknown = LoadSnapshot(in_flight=1, pending_prefill_tokens=30_000)
    fresh = LoadSnapshot(in_flight=1, pending_prefill_tokens=0, running=0, queued=0, kv_usage=0.2)
    decision = policy.pick(request("r1", prompt), view(2, loads={first: unknown, second: fresh}))
    assert decision.endpoint_id == second


def test_dualmap_sessions_with_sub_block_prompts_stay_on_one_pair() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    short = keys_from_block_ids(
        np.zeros(0, dtype=np.int64), block_size=BLOCK, total_tokens=30, seed=SEED
    )
    pool = view(16)
    pairs = {
        frozenset(
            c.endpoint_id
            for c in policy.pick(
                RoutingRequest(
                    request_id=f"r{i}", keys=short, prompt_tokens=30, session_id="chat-7"
                ),
                pool,
            ).candidates
        )
        for i in range(20)
    }
    assert len(pairs) == 1


def test_dualmap_pairs_not_involving_a_new_endpoint_are_kept() -> None:
    policy = DualMapPolicy(config=PolicyConfig())
    prompts = [keys(7_000 + i) for i in range(300)]
    before = [policy.pick(request(f"a{i}", p), view(8)).candidates for i, p in enumerate(prompts)]
    after = [policy.pick(request(f"b{i}", p), view(9)).candidates for i, p in enumerate(prompts)]
    moved = 0
    for old, new in zip(before, after, strict=True):
        new_ids = {c.endpoint_id for c in new}
        if "e8" in new_ids:
            moved += 1
        else:
            assert new_ids == {c.endpoint_id for c in old}
    assert 0 < moved < 300 * 0.4  # about 2/9 of the pairs gain the new endpoint


# -- baselines --------------------------------------------------------------------------------


def test_consistent_hash_keys_stay_put_when_an_unrelated_endpoint_joins() -> None:
    policy = ConsistentHashPolicy(config=PolicyConfig())
    prompts = [keys(3_000 + i, 1, 2, 3, 4, 5) for i in range(400)]
    before = [policy.pick(request(f"a{i}", p), view(8)).endpoint_id for i, p in enumerate(prompts)]
    after = [policy.pick(request(f"b{i}", p), view(9)).endpoint_id for i, p in enumerate(prompts)]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert moved, "the new endpoint takes some keys"
    assert all(new == "e8" for _old, new in moved)
    assert len(moved) < 400 * 0.25
    assert len(set(before)) == 8


def test_consistent_hash_keys_on_the_first_blocks_only() -> None:
    policy = ConsistentHashPolicy(config=PolicyConfig(hash_prefix_blocks=2))
    pool = view(8)
    chosen = {
        policy.pick(request(f"r{i}", keys(1, 2, 100 + i)), pool).endpoint_id for i in range(50)
    }
    assert len(chosen) == 1


def test_consistent_hash_an_excluded_owner_falls_to_the_next_on_the_ring() -> None:
    policy = ConsistentHashPolicy(config=PolicyConfig())
    prompt = keys(9, 9, 9)
    owner = policy.pick(request("r0", prompt), view(8)).endpoint_id
    detour = policy.pick(
        RoutingRequest(
            request_id="r1",
            keys=prompt,
            prompt_tokens=prompt.total_units,
            exclude=frozenset({owner}),
        ),
        view(8),
    )
    assert detour.endpoint_id != owner
    assert detour.reason is DecisionReason.HASH


def test_chwbl_skips_an_owner_at_the_load_bound() -> None:
    policy = ChwblPolicy(config=PolicyConfig())
    prompt = keys(11, 12)
    owner = policy.pick(request("r0", prompt), view(4)).endpoint_id
    others = [e for e in ("e0", "e1", "e2", "e3") if e != owner]
    at_bound = {owner: LoadSnapshot(in_flight=3), others[0]: LoadSnapshot(in_flight=0)}
    at_bound |= {e: LoadSnapshot(in_flight=2) for e in others[1:]}
    total = sum(load.in_flight for load in at_bound.values())
    assert total == 7  # bound ceil(1.25 * 8 / 4) = 3
    decision = policy.pick(request("r1", prompt), view(4, loads=at_bound))
    assert decision.endpoint_id != owner
    assert decision.reason is DecisionReason.HASH_BOUNDED
    assert "bound 3" in decision.detail
    below = {e: LoadSnapshot(in_flight=2) for e in ("e0", "e1", "e2", "e3")}
    kept = policy.pick(request("r2", prompt), view(4, loads=below))
    assert (kept.endpoint_id, kept.reason) == (owner, DecisionReason.HASH)


def test_chwbl_rejects_a_load_factor_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ChwblPolicy(config=PolicyConfig(chwbl_load_factor=0.9))


def _cache_aware_setup() -> tuple[PrefixIndex, PromptKeys]:
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(21, 22, 23, 24)
    index.record("e2", prompt)
    return index, prompt


def test_cache_aware_routes_to_the_best_match_when_balanced() -> None:
    index, prompt = _cache_aware_setup()
    loads = {"e2": LoadSnapshot(in_flight=30), "e0": LoadSnapshot(in_flight=0)}
    decision = make_policy("cache_aware").pick(
        request("r1", prompt), view(4, index=index, loads=loads)
    )
    assert (decision.endpoint_id, decision.reason) == ("e2", DecisionReason.CACHE_AFFINITY)


def test_cache_aware_imbalance_overrides_the_cache() -> None:
    index, prompt = _cache_aware_setup()
    # max - min = 70 > 64 and 70 > 1.5 x 0: imbalanced, so the least loaded, cache or not.
    loads = {
        "e0": LoadSnapshot(in_flight=5),
        "e1": LoadSnapshot(in_flight=0),
        "e2": LoadSnapshot(in_flight=70),
        "e3": LoadSnapshot(in_flight=0),
    }
    decision = make_policy("cache_aware").pick(
        request("r1", prompt), view(4, index=index, loads=loads)
    )
    assert (decision.endpoint_id, decision.reason) == ("e1", DecisionReason.LEAST_LOADED)
    assert "imbalanced" in decision.detail


def test_cache_aware_sends_every_unmatched_prompt_to_the_first_idle_worker() -> None:
    # The faithful tie-break (first in order): with no match, unrelated prompts pile onto e0
    # as long as the imbalance stays under the absolute threshold (the peers' measured
    # behaviour; docs/design.md).
    policy = make_policy("cache_aware")
    in_flight: collections.Counter[str] = collections.Counter()
    chosen = []
    for i in range(10):
        loads = {e: LoadSnapshot(in_flight=0) for e in ("e0", "e1", "e2", "e3")}
        decision = policy.pick(request(f"r{i}", keys(500 + i, 1)), view(4, loads=loads))
        in_flight[decision.endpoint_id] += 1
        chosen.append((decision.endpoint_id, decision.reason))
    assert set(chosen) == {("e0", DecisionReason.LEAST_LOADED)}


def test_cache_aware_a_short_match_is_below_the_threshold() -> None:
    index = PrefixIndex(capacity_blocks=10_000)
    index.record("e3", keys(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
    prompt = keys(1, 2, 3, 99, 98, 97, 96, 95, 94, 93)  # 3 of 10 blocks: 0.3 is not > 0.3
    decision = make_policy("cache_aware").pick(request("r1", prompt), view(4, index=index))
    assert (decision.endpoint_id, decision.reason) == ("e0", DecisionReason.LEAST_LOADED)


def test_min_ttft_trades_the_cache_for_an_idle_endpoint_when_it_pays() -> None:
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(*range(60, 76))  # 8k tokens
    index.record("e1", prompt)
    policy = make_policy("min_ttft")
    idle = policy.pick(request("r1", prompt), view(4, index=index))
    assert (idle.endpoint_id, idle.reason) == ("e1", DecisionReason.MIN_TTFT)
    busy = policy.pick(request("r2", prompt), view(4, index=index, loads={"e1": pending(40_000)}))
    assert busy.endpoint_id != "e1"
    assert busy.candidates[0].endpoint_id == busy.endpoint_id
    assert all(busy.predicted_ttft_s <= c.predicted_ttft_s for c in busy.candidates)


def test_preble_exploits_a_long_cached_prefix_on_the_least_loaded_holder() -> None:
    index = PrefixIndex(capacity_blocks=10_000)
    prompt = keys(1, 2, 3, 4, 5)
    index.record("e0", prompt)
    index.record("e2", prompt)
    loads = {"e0": pending(20_000), "e2": pending(1_000)}
    decision = make_policy("preble").pick(request("r1", prompt), view(4, index=index, loads=loads))
    assert (decision.endpoint_id, decision.reason) == ("e2", DecisionReason.EXPLOIT)


def test_preble_explores_by_load_eviction_and_recompute_cost() -> None:
    index = PrefixIndex(capacity_blocks=10_000)
    index.record("e0", keys(1, 2))
    prompt = keys(1, 2, 30, 31, 32, 33)  # 2 of 6 blocks cached: explore
    loads = {
        "e0": LoadSnapshot(in_flight=1, pending_prefill_tokens=0, kv_usage=0.95, running=1),
        "e1": LoadSnapshot(in_flight=1, pending_prefill_tokens=0, kv_usage=0.1, running=1),
        "e2": LoadSnapshot(in_flight=1, pending_prefill_tokens=0, kv_usage=0.9, running=1),
        "e3": LoadSnapshot(in_flight=1, pending_prefill_tokens=0, kv_usage=0.9, running=1),
    }
    decision = make_policy("preble").pick(request("r1", prompt), view(4, index=index, loads=loads))
    assert decision.reason is DecisionReason.EXPLORE
    assert decision.endpoint_id == "e1"
    assert "eviction" in decision.detail
    # Unknown KV usage: the queued prefill stands in for cache pressure.
    unknown = {
        "e0": LoadSnapshot(in_flight=1, pending_prefill_tokens=50_000),
        "e1": LoadSnapshot(in_flight=1, pending_prefill_tokens=60_000),
        "e2": LoadSnapshot(in_flight=1, pending_prefill_tokens=10_000),
        "e3": LoadSnapshot(in_flight=1, pending_prefill_tokens=70_000),
    }
    decision = make_policy("preble").pick(
        request("r2", prompt), view(4, index=index, loads=unknown)
    )
    assert decision.endpoint_id == "e2"
