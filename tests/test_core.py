from __future__ import annotations

import numpy as np
import pytest
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import make_policy
from twinroute.scheduler.policies.base import Policy, PolicyConfig, score_endpoint
from twinroute.scheduler.types import (
    ClusterView,
    Decision,
    Endpoint,
    NoEndpointError,
    RoutingRequest,
)

from twinroute.vocabulary import DecisionReason

SEED = namespace_seed(model="m")


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(count)]


def request(
    name: str, *, start: int = 0, tokens: int = 4096, exclude: frozenset[str] = frozenset()
) -> RoutingRequest:
    keys = keys_from_tokens(np.arange(start, start + tokens), block_size=16, seed=SEED)
    return RoutingRequest(request_id=name, keys=keys, prompt_tokens=tokens, exclude=exclude)


def core_with(policy: str = "least_loaded", count: int = 3) -> SchedulerCore:
    core = SchedulerCore(
        policy=make_policy(policy), cost_model=LLAMA3_8B_H100, scrape_staleness_s=5.0
    )
    core.set_endpoints(endpoints(count), now=0.0)
    return core


def test_pick_opens_a_lease_and_records_the_prompt() -> None:
    core = core_with()
    result = core.pick(request("r1"), now=0.0)
    assert result.endpoint.id == result.decision.endpoint_id
    load = core.load(result.endpoint.id, now=0.0)
    assert (load.in_flight, load.pending_prefill_tokens) == (1, 4096)
    assert core.prefix_index.matched_blocks(result.endpoint.id, request("again").keys) == 256
    assert core.complete(result.lease_id, now=1.0) is not None
    assert core.load(result.endpoint.id, now=1.0).in_flight == 0


def test_cached_prompt_opens_a_lease_with_little_prefill() -> None:
    core = core_with(count=1)
    core.pick(request("first"), now=0.0)
    second = core.pick(request("second"), now=0.0)
    lease = core.leases.get(second.lease_id)
    assert lease is not None and lease.uncached_tokens == 0


def test_draining_and_unhealthy_endpoints_get_no_new_requests() -> None:
    core = core_with(policy="round_robin", count=3)
    assert core.drain("e0")
    core.set_health("e1", healthy=False)
    chosen = {core.pick(request(f"r{i}"), now=0.0).endpoint.id for i in range(6)}
    assert chosen == {"e2"}
    core.set_health("e1", healthy=True)
    core.undrain("e0")
    chosen = {core.pick(request(f"s{i}"), now=0.0).endpoint.id for i in range(6)}
    assert chosen == {"e0", "e1", "e2"}
    assert not core.drain("unknown")


def test_excluded_endpoints_are_never_chosen_and_none_left_is_an_error() -> None:
    core = core_with(count=2)
    result = core.pick(request("r", exclude=frozenset({"e0"})), now=0.0)
    assert result.endpoint.id == "e1"
    with pytest.raises(NoEndpointError, match="excluded"):
        core.pick(request("r", exclude=frozenset({"e0", "e1"})), now=0.0)
    assert core.picks_failed == 1


def test_an_empty_pool_is_a_clear_error() -> None:
    core = core_with(count=0)
    with pytest.raises(NoEndpointError, match="no routable endpoint"):
        core.pick(request("r"), now=0.0)


def test_stale_scrapes_count_as_unknown_not_zero() -> None:
    core = core_with()
    core.update_scrape("e0", running=7, queued=3, kv_usage=0.5, now=10.0)
    fresh = core.load("e0", now=12.0)
    assert (fresh.running, fresh.queued, fresh.kv_usage) == (7, 3, 0.5)
    stale = core.load("e0", now=20.0)
    assert (stale.running, stale.queued, stale.kv_usage) == (None, None, None)


def test_membership_changes_forget_departed_endpoints() -> None:
    core = core_with(count=3)
    result = core.pick(request("r"), now=0.0)
    change = core.set_endpoints([e for e in endpoints(4) if e.id != result.endpoint.id], now=1.0)
    assert change.added == {"e3"} and change.removed == {result.endpoint.id}
    assert core.prefix_index.size(result.endpoint.id) == 0
    assert len(core.leases) == 0
    assert core.membership_changes == 2


def test_recent_decisions_are_newest_first_and_filterable() -> None:
    core = core_with()
    for i in range(5):
        core.pick(request(f"r{i}", start=i * 10_000), now=float(i))
    records = core.history.recent(3)
    assert [r.request_id for r in records] == ["r4", "r3", "r2"]
    assert [r.request_id for r in core.history.recent(10, request_id="r1")] == ["r1"]
    assert records[0].prompt_blocks == 256


def test_leases_expire_through_the_core() -> None:
    core = SchedulerCore(
        policy=make_policy("round_robin"), cost_model=LLAMA3_8B_H100, lease_ttl_s=10.0
    )
    core.set_endpoints(endpoints(1))
    core.pick(request("r"), now=0.0)
    assert len(core.expire(now=11.0)) == 1
    assert core.in_flight("e0") == 0


class _PinnedPair(Policy):
    """Always e0, naming e1 as the other candidate: builds a hotspot on purpose."""

    name = "pinned-pair"
    rebalances_hotspots = True

    def pick(self, request: RoutingRequest, view: ClusterView) -> Decision:
        scores = tuple(
            score_endpoint(request, view, endpoint_id, cost_model=self.config.cost_model)
            for endpoint_id in ("e0", "e1")
        )
        return Decision(
            endpoint_id="e0",
            reason=DecisionReason.CACHE_AFFINITY,
            policy=self.name,
            candidates=scores,
        )


def hotspot_core(policy: Policy, *, requests: int = 10) -> tuple[SchedulerCore, list[str]]:
    core = SchedulerCore(policy=policy, cost_model=LLAMA3_8B_H100)
    core.set_endpoints(endpoints(3), now=0.0)
    # 10 distinct 16k-token prompts at once: ~8 s of prefill queued on e0 against a 5 s SLO.
    leases = [
        core.pick(request(f"r{i}", start=i * 100_000, tokens=16_000), now=0.0).lease_id
        for i in range(requests)
    ]
    return core, leases


def test_rebalancing_moves_the_queue_tail_of_a_hotspot_to_the_other_candidate() -> None:
    core, leases = hotspot_core(_PinnedPair(config=PolicyConfig()))
    queue_before = LLAMA3_8B_H100.queue_time_s(core.load("e0", now=0.0))
    assert queue_before > 5.0
    moves = core.moves.rebalance(now=0.0)
    assert moves and {(m.source, m.target) for m in moves} == {("e0", "e1")}
    # The newest requests wait longest, so they gain most and go first.
    assert [m.lease_id for m in moves] == leases[::-1][: len(moves)]
    assert all(m.benefit_s > 0 for m in moves)
    assert core.load("e0", now=0.0).in_flight == 10  # planning changes nothing
    applied = core.rebalance(now=0.0)
    assert [m.lease_id for m in applied] == [m.lease_id for m in moves]
    assert LLAMA3_8B_H100.queue_time_s(core.load("e0", now=0.0)) <= 5.0
    assert LLAMA3_8B_H100.queue_time_s(core.load("e1", now=0.0)) <= 5.0
    assert core.rebalance_moves == len(moves)
    assert core.history.by_reason[DecisionReason.REBALANCED] == len(moves)
    assert core.history.recent(1)[0].decision.reason is DecisionReason.REBALANCED
    # A moved lease keeps its id: reports about it land on its new endpoint.
    moved = moves[0].lease_id
    assert core.first_token(moved, now=1.0)
    assert core.complete(moved, now=2.0) is not None
    assert core.load("e1", now=2.0).in_flight == len(moves) - 1
    assert core.moves.rebalance(now=0.0) == []


def test_policies_that_do_not_ask_for_rebalancing_never_move_anything() -> None:
    class Unmoved(_PinnedPair):
        rebalances_hotspots = False

    core, _ = hotspot_core(Unmoved(config=PolicyConfig()))
    assert core.moves.rebalance(now=0.0) == []


def test_a_request_that_would_break_the_slo_on_the_other_candidate_stays() -> None:
    core, _ = hotspot_core(_PinnedPair(config=PolicyConfig(ttft_slo_s=0.5)))
    # 0.5 s SLO: a 16k-token prompt alone takes ~0.9 s anywhere, so no move can help.
    assert core.moves.rebalance(now=0.0) == []


def test_move_refuses_unknown_prefilled_and_unroutable() -> None:
    core, leases = hotspot_core(_PinnedPair(config=PolicyConfig()))
    assert not core.move("nope", target="e1", now=0.0)
    assert not core.move(leases[-1], target="gone", now=0.0)
    assert core.first_token(leases[0], now=0.5)
    assert not core.move(leases[0], target="e1", now=0.5)
    assert core.move(leases[-1], target="e2", now=0.5)
    assert core.load("e2", now=0.5).in_flight == 1
