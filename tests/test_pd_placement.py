"""Prefill/decode placement in the scheduler core (`scheduler/policies/pd.py`), and through
the real gRPC service."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc
import numpy as np
import pytest
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.client import SchedulerClient
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.costmodel import LLAMA3_8B_H100
from twinroute.scheduler.keys import keys_from_tokens, namespace_seed
from twinroute.scheduler.policies import PolicyConfig, make_policy
from twinroute.scheduler.policies.dualmap import DualMapPolicy
from twinroute.scheduler.policies.pd import PdMode, PdSettings
from twinroute.scheduler.server import GrpcServer
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.types import (
    Endpoint,
    NoEndpointError,
    Role,
    RoutingRequest,
)
from twinroute.v1 import scheduler_pb2 as pb
from twinroute.v1 import scheduler_pb2_grpc as pb_grpc

from twinroute.vocabulary import DecisionReason

SEED = namespace_seed(model="m")
BLOCK = 16


def pool(prefill: int, decode: int, *, unified: int = 0) -> list[Endpoint]:
    roles = [Role.PREFILL] * prefill + [Role.DECODE] * decode + [Role.UNIFIED] * unified
    names = {Role.PREFILL: "p", Role.DECODE: "d", Role.UNIFIED: "u"}
    counters: dict[Role, int] = {}
    endpoints: list[Endpoint] = []
    for role in roles:
        index = counters.get(role, 0)
        counters[role] = index + 1
        endpoints.append(
            Endpoint(id=f"{names[role]}{index}", address=f"127.0.0.1:{9000 + len(endpoints)}",
                     role=role)
        )  # fmt: skip
    return endpoints


def make_core(
    endpoints: Iterable[Endpoint],
    *,
    policy: str = "dualmap",
    min_prefill_tokens: int = 100,
    max_key_depth: int = 64,
) -> SchedulerCore:
    config = PolicyConfig(cost_model=LLAMA3_8B_H100, max_key_depth=max_key_depth)
    core = SchedulerCore(
        policy=make_policy(policy, config=config),
        cost_model=LLAMA3_8B_H100,
        pd=PdSettings(min_prefill_tokens=min_prefill_tokens),
    )
    core.set_endpoints(endpoints, now=0.0)
    return core


def request(
    name: str,
    *,
    start: int = 0,
    tokens: int = 4096,
    session: str = "",
    exclude: frozenset[str] = frozenset(),
) -> RoutingRequest:
    keys = keys_from_tokens(np.arange(start, start + tokens), block_size=BLOCK, seed=SEED)
    return RoutingRequest(
        request_id=name, keys=keys, prompt_tokens=tokens, session_id=session, exclude=exclude
    )


@pytest.mark.parametrize(
    ("tokens", "threshold", "disaggregated"),
    [
        (100, 100, False),
        (101, 100, True),
        (64, 0, True),
        (4096, 5000, False),
    ],
    ids=["at-threshold-skips", "one-over-disaggregates", "zero-threshold", "raised-threshold"],
)
def test_decider_skips_the_prefill_hop_for_short_uncached_prompts(
    tokens: int, threshold: int, disaggregated: bool
) -> None:
    core = make_core(pool(2, 2), min_prefill_tokens=threshold)
    result = core.pick(request("r", tokens=tokens), now=0.0)
    assert result.endpoint.role == Role.DECODE
    assert result.decision.endpoint_id == result.endpoint.id
    if disaggregated:
        assert result.prefill_endpoint is not None
        assert result.prefill_endpoint.role == Role.PREFILL
        assert result.decision.prefill_endpoint_id == result.prefill_endpoint.id
        assert core.pd_picks == {PdMode.DISAGGREGATED: 1}
        # The prefill instance carries the prompt's prefill; the decode one only decodes.
        prefill_load = core.load(result.prefill_endpoint.id, now=0.0)
        decode_load = core.load(result.endpoint.id, now=0.0)
        assert prefill_load.pending_prefill_tokens == tokens
        assert (decode_load.pending_prefill_tokens, decode_load.decoding) == (0, 1)
    else:
        assert result.prefill_endpoint is None and result.decision.prefill_endpoint_id is None
        assert core.pd_picks == {PdMode.SKIPPED_SHORT: 1}
        assert "prefill hop skipped" in result.decision.detail
        assert core.load(result.endpoint.id, now=0.0).pending_prefill_tokens == tokens


def test_decider_counts_what_the_decode_instance_already_holds() -> None:
    core = make_core(pool(2, 1))
    first = core.pick(request("turn-1", tokens=4096), now=0.0)
    assert first.prefill_endpoint is not None
    core.complete(first.lease_id, now=1.0)
    # The next turn adds 64 tokens to a prompt whose KV the decode instance received.
    second = core.pick(request("turn-2", tokens=4096 + 64), now=2.0)
    assert second.prefill_endpoint is None
    assert "holds 4096 of 4160" in second.decision.detail


def test_prefill_instance_follows_prefix_affinity_on_the_prefill_ring() -> None:
    # Keys stay one block deep (no hotness deepening): the ring alone names the pair.
    core = make_core(pool(4, 4), max_key_depth=1)
    chosen = {}
    for prefix in range(6):
        result = core.pick(request(f"a{prefix}", start=prefix * 100_000), now=0.0)
        assert result.prefill_endpoint is not None
        chosen[prefix] = result.prefill_endpoint.id
    for prefix in range(6):
        again = core.pick(request(f"b{prefix}", start=prefix * 100_000, tokens=4096 + 512), now=0.1)
        assert again.prefill_endpoint is not None
        assert again.prefill_endpoint.id == chosen[prefix]
        assert again.decision.reason == DecisionReason.CACHE_AFFINITY
    # The dualmap rings hold only prefill instances.
    policy = core.policy
    assert isinstance(policy, DualMapPolicy)
    assert set(policy.rings.members) == {"p0", "p1", "p2", "p3"}
    roles = {c.role for c in again.decision.candidates}
    assert {"prefill:ring-1", "prefill:ring-2"} <= roles
    assert any(role.startswith("decode:") for role in roles)


def test_prefill_slo_switch_weighs_only_prefill_queues() -> None:
    core = make_core(pool(2, 2), max_key_depth=1, min_prefill_tokens=0)

    def shared_first_block(name: str, unique_start: int) -> RoutingRequest:
        tokens = np.concatenate([np.arange(BLOCK), np.arange(unique_start, unique_start + 16384)])
        keys = keys_from_tokens(tokens, block_size=BLOCK, seed=SEED)
        return RoutingRequest(request_id=name, keys=keys, prompt_tokens=int(tokens.size))

    picks = [core.pick(shared_first_block(f"r{i}", (i + 1) * 10**6), now=0.0) for i in range(12)]
    prefills = [p.prefill_endpoint.id for p in picks if p.prefill_endpoint is not None]
    assert len(prefills) == 12
    reasons = [p.decision.reason for p in picks]
    # Affinity to the instance holding the shared block until its prefill queue would break
    # the SLO; then the other prefill instance, whatever the decode instances carry.
    assert reasons[1] == DecisionReason.CACHE_AFFINITY and prefills[1] == prefills[0]
    switched = reasons.index(DecisionReason.SLO_SWITCH)
    assert prefills[switched] != prefills[0]
    queued = core.load(prefills[0], now=0.0).pending_prefill_tokens
    assert queued / LLAMA3_8B_H100.linear_tokens_per_s > 4.0


def test_decode_instance_is_chosen_by_decode_load() -> None:
    core = make_core(pool(1, 3))
    picks = [core.pick(request(f"r{i}", start=i * 100_000), now=0.0) for i in range(6)]
    decodes = [p.endpoint.id for p in picks]
    # Each pick adds a decoding lease, so the least loaded one changes every time.
    assert decodes == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert all(p.decision.candidates[-1].role == "decode:least_loaded" for p in picks)
    for p in picks[:3]:
        core.complete(p.lease_id, now=1.0)
    assert core.pick(request("next", start=10**7), now=1.0).endpoint.id == "d0"
    # A scrape that reports a full KV cache keeps requests off that instance.
    core.update_scrape("d1", running=0, queued=0, kv_usage=0.99, now=1.0)
    later = [core.pick(request(f"s{i}", start=(20 + i) * 10**6), now=1.0) for i in range(4)]
    assert "d1" not in {p.endpoint.id for p in later}


def test_session_stays_on_its_decode_instance_while_it_is_routable() -> None:
    core = make_core(pool(2, 3))
    first = core.pick(request("t1", start=0, session="chat"), now=0.0)
    home = first.endpoint.id
    # Load the home instance so that load alone would choose another one.
    for i in range(5):
        core.pick(request(f"x{i}", start=(i + 1) * 10**6), now=0.0)
    second = core.pick(request("t2", start=5 * 10**7, session="chat"), now=0.0)
    assert second.endpoint.id == home
    assert second.decision.candidates[-1].role == "decode:session_affinity"
    core.drain(home)
    third = core.pick(request("t3", start=6 * 10**7, session="chat"), now=0.0)
    assert third.endpoint.id != home
    assert "left its unroutable decode endpoint" in third.decision.detail
    core.undrain(home)
    # The session now lives where it moved.
    fourth = core.pick(request("t4", start=7 * 10**7, session="chat"), now=0.0)
    assert fourth.endpoint.id == third.endpoint.id


def test_unhealthy_or_excluded_decode_instance_is_left_for_another() -> None:
    core = make_core(pool(1, 2))
    core.set_health("d0", healthy=False)
    assert {
        core.pick(request(f"r{i}", start=i * 10**6), now=0.0).endpoint.id for i in range(3)
    } == {"d1"}
    core.set_health("d0", healthy=True)
    result = core.pick(request("x", start=9 * 10**6, exclude=frozenset({"d1", "p0"})), now=0.0)
    # The only prefill instance is excluded: the decode instance prefills.
    assert result.endpoint.id == "d0" and result.prefill_endpoint is None
    assert "no routable prefill endpoint" in result.decision.detail


def test_only_prefill_endpoints_cannot_serve() -> None:
    core = make_core(pool(2, 0))
    with pytest.raises(NoEndpointError, match="no routable decode endpoint"):
        core.pick(request("r"), now=0.0)
    assert core.picks_failed == 1
    both = make_core(pool(2, 1))
    both.drain("d0")
    with pytest.raises(NoEndpointError, match="prefill endpoints, which cannot decode"):
        both.pick(request("r"), now=0.0)


def test_only_decode_endpoints_prefill_themselves() -> None:
    core = make_core(pool(0, 2))
    result = core.pick(request("r"), now=0.0)
    assert result.prefill_endpoint is None
    assert core.pd_picks == {PdMode.NO_PREFILL: 1}
    assert core.load(result.endpoint.id, now=0.0).pending_prefill_tokens == 4096


def test_unified_endpoints_serve_as_decode_instances_in_a_mixed_pool() -> None:
    core = make_core(pool(1, 0, unified=1))
    result = core.pick(request("r"), now=0.0)
    assert result.endpoint.id == "u0" and result.prefill_endpoint is not None


@pytest.mark.parametrize(
    "close", ["prefill_done", "first_token", "complete", "expire", "decode_removed"]
)
def test_the_prefill_lease_closes_once(close: str) -> None:
    core = make_core(pool(1, 1))
    result = core.pick(request("r"), now=0.0)
    assert core.in_flight("p0") == 1 and core.in_flight("d0") == 1
    if close == "prefill_done":
        assert core.prefill_leases.done(result.lease_id, now=0.1)
        assert not core.prefill_leases.done(result.lease_id, now=0.2)
        assert core.in_flight("d0") == 1
    elif close == "first_token":
        assert core.first_token(result.lease_id, now=0.3)
    elif close == "complete":
        core.complete(result.lease_id, now=1.0)
        assert core.in_flight("d0") == 0
    elif close == "expire":
        core.expire(now=10_000.0)
        assert core.in_flight("d0") == 0
    else:
        core.set_endpoints([e for e in pool(1, 1) if e.id != "d0"], now=0.5)
    assert core.in_flight("p0") == 0
    assert core.load("p0", now=0.5).pending_prefill_tokens == 0


def test_unified_pools_take_the_unified_path() -> None:
    core = SchedulerCore(policy=make_policy("dualmap"), cost_model=LLAMA3_8B_H100)
    core.set_endpoints(pool(0, 0, unified=3), now=0.0)
    assert not core.is_pd_pool()
    result = core.pick(request("r"), now=0.0)
    assert result.prefill_endpoint is None and result.decision.policy == "dualmap"
    assert not core.pd_picks


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_prefill_tokens"):
        PdSettings(min_prefill_tokens=-1)
    with pytest.raises(ValueError, match="kv_high_watermark"):
        PdSettings(kv_high_watermark=0.0)


async def test_grpc_pick_names_the_prefill_and_decode_endpoints() -> None:
    core = make_core(
        [Endpoint(id=e.id, address=e.address, role=e.role, model="tiny") for e in pool(2, 2)]
    )
    service = SchedulerService(core=core, clock=lambda: 100.0)
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            response = await stub.Pick(
                pb.PickRequest(
                    request_id="long",
                    model="tiny",
                    prompt=pb.Prompt(token_ids=pb.TokenIds(ids=list(range(2048)))),
                )
            )
            assert response.endpoint.id in {"d0", "d1"}
            assert response.endpoint.role == pb.ROLE_DECODE
            assert response.HasField("prefill_endpoint")
            assert response.prefill_endpoint.id in {"p0", "p1"}
            assert response.prefill_endpoint.role == pb.ROLE_PREFILL
            assert response.policy == "pd/dualmap"
            short = await stub.Pick(
                pb.PickRequest(
                    request_id="short",
                    model="tiny",
                    prompt=pb.Prompt(token_ids=pb.TokenIds(ids=list(range(50)))),
                )
            )
            assert short.endpoint.id in {"d0", "d1"}
            assert not short.HasField("prefill_endpoint")
        client = SchedulerClient(target=server.address, timeout_s=5.0)
        try:
            answer = await client.pick(
                PickQuery(request_id="c", model="tiny", token_ids=np.arange(4096, 8192))
            )
            assert answer.prefill_endpoint is not None
            assert answer.prefill_endpoint.role == Role.PREFILL
            assert answer.endpoint.role == Role.DECODE
            assert await client.complete(lease_id=answer.lease_id)
        finally:
            await client.close()
        assert core.in_flight(answer.prefill_endpoint.id) <= 1
        records = core.history.recent(1)
        assert records[0].decision.prefill_endpoint_id == answer.prefill_endpoint.id
    finally:
        await server.stop(grace_s=0.5)


def test_metrics_count_placements_by_mode() -> None:
    from prometheus_client import CollectorRegistry
    from twinroute.scheduler.telemetry import SchedulerTelemetry

    core = make_core(pool(1, 1))
    telemetry = SchedulerTelemetry(registry=CollectorRegistry(), core=core, clock=lambda: 0.0)
    core.pick(request("long", tokens=4096), now=0.0)
    core.pick(request("short", start=10**6, tokens=64), now=0.0)
    text = telemetry.exposition().decode()
    assert 'twinroute_scheduler_pd_placements_total{mode="disaggregated"} 1.0' in text
    assert 'twinroute_scheduler_pd_placements_total{mode="skipped_short"} 1.0' in text
    assert 'twinroute_scheduler_decisions_total{policy="dualmap",reason="least_loaded"} 1.0' in text


def test_scheduler_cli_and_config_set_the_decider_threshold(tmp_path: Path) -> None:
    import argparse

    from twinroute.scheduler.build import build_core
    from twinroute.scheduler.command import add_arguments, resolve_arguments

    def threshold(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--static-endpoints", "127.0.0.1:9000", *argv])
        return build_core(resolve_arguments(args)).pd.settings.min_prefill_tokens

    assert threshold("--pd-min-prefill-tokens", "7") == 7
    config = tmp_path / "scheduler.yaml"
    config.write_text("pdMinPrefillTokens: 300\n")
    assert threshold("--pd-min-prefill-tokens", "7", "--config", str(config)) == 300
    with pytest.raises(ValueError, match="pd_min_prefill_tokens must be >= 0"):
        threshold("--pd-min-prefill-tokens", "-1")


def test_a_fallen_back_prefill_hop_moves_the_prefill_onto_the_decode_lease() -> None:
    core = make_core(pool(1, 1))
    ahead = core.pick(request("ahead", start=10**6), now=0.0)
    result = core.pick(request("r"), now=0.0)
    assert result.prefill_endpoint is not None and result.prefill_endpoint.id == "p0"
    # Disaggregated: the decode instance only decodes, the prefill instance queues 2 prompts.
    assert core.load("d0", now=0.0).pending_prefill_tokens == 0
    assert core.load("p0", now=0.0).pending_prefill_tokens == 2 * 4096
    assert core.prefill_leases.fell_back(result.lease_id, now=0.0)
    # The prefill instance did no work for it: only its own prompt leaves, the one ahead stays.
    assert core.load("p0", now=0.0).pending_prefill_tokens == 4096
    assert core.in_flight("p0") == 1
    assert core.load("d0", now=0.0).pending_prefill_tokens == 4096
    assert core.in_flight("d0") == 2
    # Reported once; the lease (same id) still closes with Complete and leaves nothing behind.
    assert not core.prefill_leases.fell_back(result.lease_id, now=0.0)
    assert not core.prefill_leases.done(result.lease_id, now=0.0)
    assert core.complete(result.lease_id, now=0.0) is not None
    assert core.load("d0", now=0.0).pending_prefill_tokens == 0
    core.complete(ahead.lease_id, now=0.0)
    assert core.in_flight("p0") == 0 and core.in_flight("d0") == 0


def test_fallback_without_a_prefill_hop_changes_nothing() -> None:
    core = make_core(pool(1, 1))
    short = core.pick(request("short", tokens=64), now=0.0)
    assert short.prefill_endpoint is None
    before = core.load("d0", now=0.0)
    assert not core.prefill_leases.fell_back(short.lease_id, now=0.0)
    assert core.load("d0", now=0.0) == before


def test_a_draining_prefill_instance_gets_no_new_prefills() -> None:
    core = make_core(pool(2, 1))
    first = core.pick(request("a"), now=0.0)
    assert first.prefill_endpoint is not None
    leaving = first.prefill_endpoint.id
    core.drain(leaving)
    later = [core.pick(request(f"r{i}", start=i * 10**6), now=0.0) for i in range(1, 6)]
    assert all(p.prefill_endpoint is not None for p in later)
    assert leaving not in {p.prefill_endpoint.id for p in later if p.prefill_endpoint}
    # What it already has leaves at its prefill_done, not at the decode's Complete.
    assert core.in_flight(leaving) == 1
    assert core.prefill_leases.done(first.lease_id, now=0.1)
    assert core.in_flight(leaving) == 0


@pytest.mark.parametrize("leaves", ["drain", "unhealthy", "excluded", "removed"])
def test_a_session_leaves_a_decode_instance_that_cannot_take_it(leaves: str) -> None:
    endpoints = pool(1, 2)
    core = make_core(endpoints)
    home = core.pick(request("t1", session="chat"), now=0.0).endpoint.id
    exclude: frozenset[str] = frozenset()
    if leaves == "drain":
        core.drain(home)
    elif leaves == "unhealthy":
        core.set_health(home, healthy=False)
    elif leaves == "excluded":
        exclude = frozenset({home})
    else:
        core.set_endpoints([e for e in endpoints if e.id != home], now=0.0)
    turn = core.pick(request("t2", start=5 * 10**7, session="chat", exclude=exclude), now=0.0)
    assert turn.endpoint.id != home
    assert turn.decision.reason != DecisionReason.SESSION_AFFINITY
    assert "left its unroutable decode endpoint" in turn.decision.detail


def long_query(name: str, *, start: int) -> PickQuery:
    return PickQuery(request_id=name, model="m", token_ids=np.arange(start, start + 4096))


async def test_grpc_prefill_fallback_and_a_draining_prefill_instance() -> None:
    """Over the real gRPC service: a fallen-back prefill hop moves the prompt's prefill onto
    the decode endpoint; a Drain of a prefill instance answers drained once the prefills it
    had are reported done, while their decode leases stay open."""
    import asyncio

    core = make_core(
        [Endpoint(id=e.id, address=e.address, role=e.role, model="m") for e in pool(2, 1)]
    )
    service = SchedulerService(core=core, clock=lambda: 100.0)
    server = GrpcServer(service=service, listen="127.0.0.1:0")
    await server.start()
    client = SchedulerClient(target=server.address, timeout_s=5.0)
    try:
        answers = [await client.pick(long_query(f"r{i}", start=i * 10**5)) for i in range(4)]
        assert all(a.prefill_endpoint is not None and a.endpoint.id == "d0" for a in answers)
        fallen = answers[0]
        assert fallen.prefill_endpoint is not None
        on_prefill = core.load(fallen.prefill_endpoint.id, now=100.0).pending_prefill_tokens
        assert core.load("d0", now=100.0).pending_prefill_tokens == 0
        assert await client.progress(lease_id=fallen.lease_id, event="prefill_fell_back")
        assert core.load("d0", now=100.0).pending_prefill_tokens == 4096
        assert (
            core.load(fallen.prefill_endpoint.id, now=100.0).pending_prefill_tokens
            == on_prefill - 4096
        )
        assert not await client.progress(lease_id=fallen.lease_id, event="prefill_fell_back")
        # Drain the prefill instance that still holds prefills: no new prefill goes there.
        rest = answers[1:]
        leaving = next(a.prefill_endpoint.id for a in rest if a.prefill_endpoint is not None)
        held = [a for a in rest if a.prefill_endpoint and a.prefill_endpoint.id == leaving]
        marked = await client.drain(endpoint_id=leaving, timeout_s=0.0)
        assert not marked.drained and marked.remaining_in_flight == len(held)
        later = await client.pick(long_query("later", start=9 * 10**5))
        assert later.prefill_endpoint is not None and later.prefill_endpoint.id != leaving
        drain = asyncio.create_task(client.drain(endpoint_id=leaving, timeout_s=30.0))
        # Its prefills keep it busy (not the decodes behind them) ...
        await asyncio.wait({drain}, timeout=0.2)
        assert not drain.done()
        # ... until the router reports them done, which wakes the waiting Drain.
        for answer in held:
            assert await client.progress(lease_id=answer.lease_id, event="prefill_done")
        result = await asyncio.wait_for(drain, timeout=10.0)
        assert result.drained and result.remaining_in_flight == 0
        # Their decode leases are still open until Complete.
        assert core.in_flight("d0") == 5
    finally:
        await client.close()
        await server.stop(grace_s=0.5)


async def test_migration_never_moves_a_request_to_or_from_a_prefill_instance() -> None:
    from twinroute.scheduler.migration import Migrator

    core = make_core(pool(1, 2))
    picks = [core.pick(request(f"r{i}", start=i * 10**6), now=0.0) for i in range(4)]
    assert all(p.prefill_endpoint is not None for p in picks)
    for pick in picks:
        core.prefill_leases.done(pick.lease_id, now=0.0)
    migrator = Migrator(core=core, clock=lambda: 0.0)
    # The prefill instance, now idle, would be the least loaded target for the decode streams.
    leaving = picks[0].endpoint.id
    core.drain(leaving)
    results = await migrator.drain_now(leaving, timeout_s=5.0)
    assert results
    assert {r.proposal.target for r in results} <= {"d0", "d1"} - {leaving}
    # A draining prefill instance's prefills are left to finish (their hop reports them).
    fresh = core.pick(request("fresh", start=9 * 10**6), now=0.0)
    assert fresh.prefill_endpoint is not None
    core.drain("p0")
    assert "p0" not in {load.endpoint_id for load in await migrator.snapshot()}
    assert await migrator.drain_now("p0", timeout_s=5.0) == []


@pytest.mark.parametrize("success", [True, False], ids=["finished", "failed"])
def test_completing_a_pick_settles_the_prefills_ahead_only_when_it_succeeded(
    success: bool,
) -> None:
    core = make_core(pool(1, 1))
    ahead = core.pick(request("ahead", start=10**6), now=0.0)
    behind = core.pick(request("behind"), now=0.0)
    assert core.load("p0", now=0.0).pending_prefill_tokens == 2 * 4096
    core.complete(behind.lease_id, now=0.0, success=success)
    # A finished request was prefilled, so the one ahead of it was too; a failed one (its
    # prefill endpoint failed, it is placed again) says nothing about it.
    assert core.load("p0", now=0.0).pending_prefill_tokens == (0 if success else 4096)
    assert core.in_flight("p0") == 1
    core.complete(ahead.lease_id, now=0.0)
    assert core.in_flight("p0") == 0
