"""Hash rings: unit behaviour, remapping on scaling, balance, and cross-process identity.

The ideal remap share, derived
------------------------------
Let a key's pair after a change be (A, B): A is ring 1's owner, B is ring 2's owner unless
that equals A, in which case B is the next distinct endpoint clockwise on ring 2.

Adding X to N endpoints. On each ring, the clockwise order of distinct endpoints seen from a
key only gains X (X's virtual nodes are inserted; nobody else's move). If X is neither A nor
B, then ring 1's owner was A before too, and on ring 2 the endpoints ahead of B are A or X;
without X, B is still the first endpoint other than A. So the pair changes exactly when X is
in the new pair, and the expected share is

    P(A = X) + P(A != X) * P(B = X | A != X) = 1/(N+1) + N/(N+1) * 1/N = 2/(N+1),

using that X owns 1/(N+1) of ring 1 and, ring 2 being independent of ring 1, X is equally
likely to be any of the N endpoints other than A that ring 2 offers first. The collision rule
is what makes this exactly 2/(N+1) and not 1 - (1 - 1/(N+1))^2 = 2/(N+1) - 1/(N+1)^2:
when both rings pick the same endpoint, the second candidate still comes from the walk, so X
enters the pair of those keys too. 2/(N+1) is also the least any scheme can move while it
stays balanced: each key has two distinct candidates among N+1 endpoints, so in a balanced
pool each endpoint holds 2/(N+1) of the pairs, and every pair that now holds X has changed.

Removing X from N endpoints is the same argument backwards: exactly the pairs that contained
X change, 2/N of them in expectation, and 2/N is again the minimum.

The tests check the exact identity (only pairs gaining or losing X change) and that the
measured share is within 1.25 x of the ideal. The measured share deviates from the ideal
because X's share of each ring is a sum of `virtual_nodes` random arcs (coefficient of
variation 1/sqrt(V), 6.25% at V = 256, about 4.4% for the two rings together) and because a
finite key sample adds sampling noise (we use at least 400 keys per endpoint).

Balance. With V virtual nodes an endpoint's share of one ring has coefficient of variation
1/sqrt(V); the largest of N such shares sits near 1 + sqrt(2 ln N)/sqrt(V). At V = 256 that is
about 1.13 at N = 8, 1.17 at N = 32, 1.19 at N = 128 and 1.22 at N = 512, with a layout-dependent
spread: over 30 ring seeds, 0 of 30 layouts exceed 1.25 at N = 8 or 32, about 1 in 30 do at
N >= 128. So the first candidate alone meets max/mean <= 1.25 at realistic pool sizes
(8..128) but not for every layout at N >= 256: with our default seeds and 512 endpoints named
vllm-000..511, vllm-451 owns 1.285 x its fair share of ring 1, measured as 1.26-1.35 with a
million keys (`twinroute bench ring-quality`). Both candidates together average two independent
rings and stay within 1.25 up to N = 512; so does the first candidate with 512 virtual nodes.
Those are the three balance tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twinroute.scheduler.ring import (
    DEFAULT_SEEDS,
    DEFAULT_VIRTUAL_NODES,
    DualHashRing,
    HashRing,
    RingChange,
)

BOUND = 1.25


def _names(count: int, prefix: str = "vllm") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(count)]


def _keys(count: int, *, seed: int = 2026) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, 2**64, size=count, dtype=np.uint64))


def _pairs(ring: DualHashRing, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.str_]:
    """(keys x 2) endpoint names, comparable across membership changes."""
    first, second = ring.candidates_many(keys)
    names = np.array(ring.sorted_members)
    return np.stack([names[first], names[second]], axis=1)


def _dual(members: list[str], **kwargs: int) -> DualHashRing:
    ring = DualHashRing(**kwargs)  # type: ignore[arg-type]
    ring.sync(members)
    return ring


# --- unit behaviour -------------------------------------------------------------------------


def test_empty_rings_refuse_lookups() -> None:
    ring = DualHashRing()
    with pytest.raises(LookupError):
        ring.candidates(1)
    with pytest.raises(LookupError):
        HashRing().lookup(1)
    with pytest.raises(LookupError):
        list(HashRing().walk(1))
    with pytest.raises(LookupError):
        HashRing().lookup_many(np.arange(3, dtype=np.uint64))


def test_one_member_is_both_candidates() -> None:
    ring = _dual(["only"])
    assert {ring.candidates(k) for k in range(200)} == {("only", "only")}
    first, second = ring.candidates_many(np.arange(50, dtype=np.uint64))
    assert (first == 0).all() and (second == 0).all()


@pytest.mark.parametrize("members", [2, 3, 8, 64], ids=lambda n: f"n{n}")
def test_the_two_candidates_are_distinct(members: int) -> None:
    ring = _dual(_names(members))
    keys = _keys(5000)
    assert all(a != b for a, b in (ring.candidates(int(k)) for k in keys[:2000]))
    first, second = ring.candidates_many(keys)
    assert not (first == second).any()


def test_vectorised_and_scalar_lookups_agree_collisions_included() -> None:
    ring = _dual(_names(5))
    keys = _keys(3000)
    first, second = ring.candidates_many(keys)
    names = ring.sorted_members
    collided = ring.rings[0].lookup_many(keys) == ring.rings[1].lookup_many(keys)
    assert collided.sum() > 100  # about 1/5 of keys exercise the walk
    for at, key in enumerate(keys.tolist()):
        assert ring.candidates(key) == (names[first[at]], names[second[at]])
        assert ring.rings[1].lookup(key) == names[ring.rings[1].lookup_many(keys[at : at + 1])[0]]


def test_same_key_same_answer_and_order_of_arrival_does_not_matter() -> None:
    forward = _dual(_names(40))
    backward = DualHashRing()
    for name in reversed(_names(40)):
        backward.add(name)
    churned = _dual(_names(45))
    for name in _names(45)[40:]:
        churned.remove(name)
    keys = _keys(4000)
    expected = [forward.candidates(int(k)) for k in keys]
    assert expected == [forward.candidates(int(k)) for k in keys]
    assert expected == [backward.candidates(int(k)) for k in keys]
    assert expected == [churned.candidates(int(k)) for k in keys]


@settings(max_examples=40, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.booleans(), st.sampled_from([f"e{i}" for i in range(12)])), max_size=30
    )
)
def test_any_history_of_adds_and_removes_gives_the_ring_a_fresh_build_gives(
    operations: list[tuple[bool, str]],
) -> None:
    grown = DualHashRing(virtual_nodes=16)
    for adding, name in operations:
        if adding:
            grown.add(name)
        else:
            grown.remove(name)
    fresh = DualHashRing(virtual_nodes=16)
    fresh.sync(grown.members)
    assert grown.members == fresh.members
    if not fresh.members:
        return
    keys = _keys(500)
    for ring_grown, ring_fresh in zip(grown.rings, fresh.rings, strict=True):
        assert (ring_grown.lookup_many(keys) == ring_fresh.lookup_many(keys)).all()
    assert [grown.candidates(int(k)) for k in keys] == [fresh.candidates(int(k)) for k in keys]


def test_second_candidate_is_the_next_distinct_endpoint_clockwise_on_ring_two() -> None:
    ring = _dual(_names(3))
    collided = [
        int(k) for k in _keys(2000) if ring.rings[0].lookup(int(k)) == ring.rings[1].lookup(int(k))
    ]
    assert collided
    for key in collided:
        walk = list(ring.rings[1].walk(key))
        assert walk[0] == ring.rings[0].lookup(key)
        assert ring.candidates(key) == (walk[0], walk[1])


def test_walk_visits_every_member_once_starting_with_the_owner() -> None:
    ring = HashRing(seed=9)
    for name in _names(12):
        ring.add(name)
    for key in range(0, 10_000, 997):
        walk = list(ring.walk(key))
        assert walk[0] == ring.lookup(key)
        assert sorted(walk) == _names(12)


def test_removing_a_non_member_or_adding_a_member_again_changes_nothing() -> None:
    ring = _dual(_names(6))
    keys = _keys(2000)
    before = _pairs(ring, keys)
    ring.remove("not-there")
    ring.add("vllm-003")
    assert len(ring) == 6
    assert ring.members == frozenset(_names(6))
    assert (before == _pairs(ring, keys)).all()


def test_sync_reports_what_changed() -> None:
    ring = DualHashRing()
    assert ring.sync(["a", "b", "c"]) == RingChange(
        added=frozenset({"a", "b", "c"}), removed=frozenset()
    )
    change = ring.sync(["b", "c", "d"])
    assert change == RingChange(added=frozenset({"d"}), removed=frozenset({"a"}))
    assert not ring.sync(["d", "c", "b"])
    assert ring.members == frozenset({"b", "c", "d"}) and len(ring) == 3
    assert "b" in ring and "a" not in ring
    single = ring.sync(["b", "c", "d", "e"])
    assert single.added == frozenset({"e"}) and "e" in ring.rings[1]
    assert ring.sync([]) == RingChange(added=frozenset(), removed=frozenset({"b", "c", "d", "e"}))
    with pytest.raises(LookupError):
        ring.candidates(0)


def test_excluded_endpoints_are_skipped_and_other_pairs_keep_their_candidates() -> None:
    ring = _dual(_names(6))
    keys = [int(k) for k in _keys(3000)]
    excluded = {"vllm-002", "vllm-004"}
    for key in keys:
        pair = ring.candidates(key)
        avoided = ring.candidates(key, exclude=excluded)
        assert not excluded & set(avoided) and avoided[0] != avoided[1]
        if not excluded & set(pair):
            assert avoided == pair
        else:
            first = next(e for e in ring.rings[0].walk(key) if e not in excluded)
            second = next(e for e in ring.rings[1].walk(key) if e not in excluded | {first})
            assert avoided == (first, second)
    assert ring.candidates(keys[0], exclude=set(_names(6)) - {"vllm-001"}) == (
        "vllm-001",
        "vllm-001",
    )
    with pytest.raises(LookupError, match="excluded"):
        ring.candidates(keys[0], exclude=frozenset(_names(6)))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: HashRing(virtual_nodes=0), ValueError),
        (lambda: DualHashRing(seeds=(5, 5)), ValueError),
        (lambda: HashRing().add(""), ValueError),
        (lambda: HashRing().add(7), TypeError),  # type: ignore[arg-type]
        (lambda: DualHashRing().sync(["a", None]), TypeError),  # type: ignore[list-item]
        (lambda: _dual(["a"]).candidates("key"), TypeError),  # type: ignore[arg-type]
        (lambda: _dual(["a"]).candidates(1.5), TypeError),  # type: ignore[arg-type]
        (lambda: _dual(["a"]).candidates_many(np.array([0.5])), TypeError),
    ],
    ids=[
        "no-vnodes",
        "same-seeds",
        "empty-id",
        "int-id",
        "none-in-sync",
        "str-key",
        "float-key",
        "float-keys",
    ],
)
def test_bad_input_is_refused_clearly(call: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()  # type: ignore[operator]


def test_keys_are_mixed_with_the_ring_seed() -> None:
    """Same members, same key, different seeds: the two rings place keys independently, so
    their owners agree about as often as chance says (1/N), not always."""
    one, two = HashRing(seed=DEFAULT_SEEDS[0]), HashRing(seed=DEFAULT_SEEDS[1])
    for ring in (one, two):
        ring.update(add=_names(10))
    keys = _keys(20_000)
    agreement = float(np.mean(one.lookup_many(keys) == two.lookup_many(keys)))
    assert 0.08 < agreement < 0.12
    assert one.position(12345) != two.position(12345)


def test_sequential_small_keys_still_spread() -> None:
    ring = _dual(_names(8))
    first, _ = ring.candidates_many(np.arange(80_000, dtype=np.uint64))
    load = np.bincount(first, minlength=8)
    assert load.max() / load.mean() <= BOUND


# --- remapping on scaling -------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    members=st.integers(2, 512),
    adding=st.booleans(),
    pick=st.integers(0, 2**16),
    prefix=st.sampled_from(["vllm", "pool-a/engine", "qwen-14b-7f9c"]),
)
@example(members=2, adding=True, pick=0, prefix="vllm")
@example(members=2, adding=False, pick=1, prefix="vllm")
@example(members=3, adding=False, pick=0, prefix="vllm")
@example(members=512, adding=True, pick=0, prefix="vllm")
@example(members=512, adding=False, pick=451, prefix="vllm")
def test_scaling_by_one_remaps_close_to_the_minimum(
    members: int, adding: bool, pick: int, prefix: str
) -> None:
    """See the module docstring for the ideal: 2/(N+1) on add, 2/N on remove.

    `derandomize=True`: the bound is statistical (vnode layout, key sample), so the examples
    are fixed and CI cannot flake; they still cover N from 2 to 512 and both directions.
    """
    names = _names(members, prefix)
    ring = _dual(names)
    keys = _keys(max(40_000, 400 * members), seed=members)
    before = _pairs(ring, keys)
    if adding:
        changed_endpoint = f"{prefix}-new-{pick}"
        ring.add(changed_endpoint)
        after = _pairs(ring, keys)
        holds_it = (after == changed_endpoint).any(axis=1)
        ideal = 2 / (members + 1)
    else:
        changed_endpoint = names[pick % members]
        ring.remove(changed_endpoint)
        after = _pairs(ring, keys)
        holds_it = (before == changed_endpoint).any(axis=1)
        ideal = 2 / members
    changed = (before != after).any(axis=1)
    # Exactly the pairs that gain (or lose) the endpoint change: no collateral moves.
    assert (changed == holds_it).all()
    assert not (after[:, 0] == after[:, 1]).any() or members + (1 if adding else -1) == 1
    share = float(changed.mean())
    assert share <= BOUND * ideal, f"N={members}: remapped {share:.4f}, ideal {ideal:.4f}"


@pytest.mark.parametrize("members", [2, 3, 4, 8, 16, 32, 64, 128, 256, 512], ids=lambda n: f"n{n}")
def test_removing_any_endpoint_remaps_close_to_the_minimum(members: int) -> None:
    """The worst case over every endpoint: removing X changes exactly the pairs holding X
    (checked above), so the worst removal is the endpoint in the most pairs."""
    ring = _dual(_names(members))
    keys = _keys(max(40_000, 400 * members), seed=members)
    first, second = ring.candidates_many(keys)
    pairs_held = np.bincount(first, minlength=members) + np.bincount(second, minlength=members)
    worst_share = pairs_held.max() / keys.shape[0]
    assert worst_share <= BOUND * 2 / members


# --- balance --------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [8, 32, 128], ids=lambda n: f"n{n}")
def test_first_candidates_spread_evenly_at_realistic_pool_sizes(members: int) -> None:
    ring = _dual(_names(members))
    first, _ = ring.candidates_many(_keys(4000 * members, seed=members + 1))
    load = np.bincount(first, minlength=members)
    assert load.max() / load.mean() <= BOUND


@pytest.mark.parametrize("members", [8, 32, 128, 256, 512], ids=lambda n: f"n{n}")
def test_both_candidates_together_spread_evenly_up_to_512(members: int) -> None:
    ring = _dual(_names(members))
    first, second = ring.candidates_many(_keys(max(200_000, 2000 * members), seed=members + 2))
    load = np.bincount(first, minlength=members) + np.bincount(second, minlength=members)
    assert load.max() / load.mean() <= BOUND


def test_first_candidates_spread_evenly_at_512_endpoints_with_512_virtual_nodes() -> None:
    """At N >= 256 the first candidate alone needs more than 256 virtual nodes to stay under
    1.25 for every layout (module docstring); 512 virtual nodes are enough."""
    ring = _dual(_names(512), virtual_nodes=512)
    first, _ = ring.candidates_many(_keys(2000 * 512, seed=3))
    load = np.bincount(first, minlength=512)
    assert load.max() / load.mean() <= BOUND


def test_default_virtual_nodes() -> None:
    assert DEFAULT_VIRTUAL_NODES == 256
    assert HashRing().virtual_nodes == 256


# --- identical across processes -------------------------------------------------------------


def test_candidates_are_identical_across_processes() -> None:
    script = (
        "import json\n"
        "from twinroute.scheduler.ring import DualHashRing\n"
        "from twinroute.scheduler.keys import keys_from_tokens, namespace_seed\n"
        "ring = DualHashRing()\n"
        "ring.sync([f'engine-{i}' for i in range(20)])\n"
        "keys = keys_from_tokens(list(range(4096)), block_size=16,"
        " seed=namespace_seed(model='m')).block_hashes.tolist()\n"
        "print(json.dumps([ring.candidates(k) for k in keys + list(range(100))]))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("0", "12345", "random")
    }
    assert len(outputs) == 1
    from twinroute.scheduler.keys import keys_from_tokens, namespace_seed

    ring = _dual([f"engine-{i}" for i in range(20)])
    keys = keys_from_tokens(list(range(4096)), block_size=16, seed=namespace_seed(model="m"))
    here = [list(ring.candidates(k)) for k in keys.block_hashes.tolist() + list(range(100))]
    assert json.loads(outputs.pop()) == here


def test_candidates_match_pinned_values() -> None:
    """Two scheduler versions side by side must pick the same pairs."""
    ring = _dual(["a", "b", "c", "d"])
    assert [ring.candidates(k) for k in (0, 1, 2**63, 2**64 - 1)] == [
        ("a", "c"),
        ("a", "d"),
        ("c", "a"),
        ("c", "a"),
    ]
