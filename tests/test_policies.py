"""Every routing policy against the contract: one endpoint, empty pool, exclusions, determinism."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from twinroute.scheduler.keys import keys_from_block_ids, namespace_seed
from twinroute.scheduler.policies import POLICY_NAMES, PolicyConfig, make_policy
from twinroute.scheduler.prefix_index import PrefixIndex
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    Endpoint,
    LoadSnapshot,
    NoEndpointError,
    PromptKeys,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

SEED = namespace_seed(model="m")
BLOCK = 512


def keys(*block_ids: int, tokens: int | None = None) -> PromptKeys:
    total = BLOCK * len(block_ids) if tokens is None else tokens
    return keys_from_block_ids(
        np.array(block_ids, dtype=np.int64), block_size=BLOCK, total_tokens=total, seed=SEED
    )


def request(
    request_id: str, prompt: PromptKeys, *, exclude: frozenset[str] = frozenset()
) -> RoutingRequest:
    return RoutingRequest(
        request_id=request_id,
        keys=prompt,
        prompt_tokens=max(prompt.total_units, 1),
        exclude=exclude,
    )


def view(
    count: int,
    *,
    index: PrefixIndex | None = None,
    loads: Mapping[str, LoadSnapshot] | None = None,
) -> ClusterView:
    endpoints = tuple(Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000") for i in range(count))
    return ClusterView(
        endpoints=endpoints,
        loads=dict(loads or {}),
        prefix_index=index or PrefixIndex(capacity_blocks=4096),
        now=0.0,
    )


# The reason each policy gives on a cold pool of four idle endpoints.
COLD_POOL_REASONS = {
    "dualmap": DecisionReason.TIE_LESS_LOADED,
    "round_robin": DecisionReason.ROUND_ROBIN,
    "least_loaded": DecisionReason.LEAST_LOADED,
    "consistent_hash": DecisionReason.HASH,
    "chwbl": DecisionReason.HASH,
    "cache_aware": DecisionReason.LEAST_LOADED,
    "min_ttft": DecisionReason.MIN_TTFT,
    "preble": DecisionReason.EXPLORE,
}


def test_the_reason_table_covers_every_registered_policy() -> None:
    assert set(COLD_POOL_REASONS) == set(POLICY_NAMES)


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_cold_pool_reason(name: str) -> None:
    decision = make_policy(name).pick(request("r1", keys(1, 2, 3)), view(4))
    assert decision.reason is COLD_POOL_REASONS[name]
    assert decision.policy == name
    assert decision.endpoint_id in {"e0", "e1", "e2", "e3"}


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_a_single_endpoint_is_the_only_candidate(name: str) -> None:
    decision = make_policy(name).pick(request("r1", keys(1, 2, 3)), view(1))
    assert decision.endpoint_id == "e0"
    assert decision.reason is DecisionReason.ONLY_CANDIDATE


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_one_endpoint_left_after_exclusions_is_the_only_candidate(name: str) -> None:
    excluded = frozenset({"e0", "e1", "e3"})
    decision = make_policy(name).pick(request("r1", keys(1, 2), exclude=excluded), view(4))
    assert decision.endpoint_id == "e2"
    assert decision.reason is DecisionReason.ONLY_CANDIDATE


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_an_empty_pool_raises(name: str) -> None:
    with pytest.raises(NoEndpointError, match="no routable endpoint"):
        make_policy(name).pick(request("r1", keys(1, 2)), view(0))


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_all_endpoints_excluded_raises(name: str) -> None:
    everything = frozenset(f"e{i}" for i in range(3))
    with pytest.raises(NoEndpointError, match="all 3 endpoints are excluded"):
        make_policy(name).pick(request("r1", keys(1, 2), exclude=everything), view(3))


def _replay(name: str) -> list[Decision]:
    """A fixed sequence of requests, recording each decision in the prefix index."""
    policy = make_policy(name, config=PolicyConfig(hotness_window=32))
    index = PrefixIndex(capacity_blocks=64)
    rng = np.random.default_rng(5)
    decisions = []
    pending: dict[str, int] = {}
    for i in range(60):
        conversation = int(rng.integers(0, 6))
        turn_blocks = int(rng.integers(1, 6))
        prompt = keys(*(1000 * conversation + b for b in range(turn_blocks)))
        loads = {e: LoadSnapshot(in_flight=1, pending_prefill_tokens=p) for e, p in pending.items()}
        exclude = frozenset({"e1"}) if i % 7 == 0 else frozenset()
        decision = policy.pick(
            request(f"r{i}", prompt, exclude=exclude), view(5, index=index, loads=loads)
        )
        assert decision.endpoint_id not in exclude
        index.record(decision.endpoint_id, prompt)
        pending[decision.endpoint_id] = pending.get(decision.endpoint_id, 0) + prompt.total_units
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_the_same_inputs_give_the_same_decisions(name: str) -> None:
    first, second = _replay(name), _replay(name)
    assert [(d.endpoint_id, d.reason, d.key_depth) for d in first] == [
        (d.endpoint_id, d.reason, d.key_depth) for d in second
    ]


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_a_prompt_shorter_than_one_block_is_routed(name: str) -> None:
    short = keys(tokens=100)
    assert short.num_blocks == 0
    decision = make_policy(name).pick(request("r1", short), view(4))
    assert decision.endpoint_id in {"e0", "e1", "e2", "e3"}
    assert decision.expected_cached_blocks == 0


@pytest.mark.parametrize("name", POLICY_NAMES, ids=POLICY_NAMES)
def test_unknown_scrapes_are_not_read_as_zero(name: str) -> None:
    # running / queued / kv_usage None (a missing or stale scrape): only lease load is used.
    loads = {
        "e0": LoadSnapshot(in_flight=3, pending_prefill_tokens=400_000, decoding=2),
        "e1": LoadSnapshot(in_flight=0, pending_prefill_tokens=0),
        "e2": LoadSnapshot(in_flight=0, pending_prefill_tokens=0, running=0, kv_usage=0.1),
    }
    decision = make_policy(name).pick(request("r1", keys(7, 8)), view(3, loads=loads))
    assert decision.endpoint_id in {"e0", "e1", "e2"}
    assert decision.predicted_ttft_s >= 0.0
