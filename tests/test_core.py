from __future__ import annotations

import numpy as np
import pytest
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import make_policy
from twinroute.scheduler.types import Endpoint, NoEndpointError, RoutingRequest

SEED = namespace_seed(model="m")


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(count)]


def request(
    name: str, *, start: int = 0, tokens: int = 4096, exclude: frozenset[str] = frozenset()
):
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
    records = core.recent_decisions(3)
    assert [r.request_id for r in records] == ["r4", "r3", "r2"]
    assert [r.request_id for r in core.recent_decisions(10, request_id="r1")] == ["r1"]
    assert records[0].prompt_blocks == 256


def test_leases_expire_through_the_core() -> None:
    core = SchedulerCore(
        policy=make_policy("round_robin"), cost_model=LLAMA3_8B_H100, lease_ttl_s=10.0
    )
    core.set_endpoints(endpoints(1))
    core.pick(request("r"), now=0.0)
    assert len(core.expire(now=11.0)) == 1
    assert core.in_flight("e0") == 0
