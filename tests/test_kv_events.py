"""KV-event decoding, the per-engine block index and the ZMQ subscriber.

The index is checked against an independent model while replaying the batches a real vLLM
0.32 engine published (tests/fixtures/vllm_kv_events_real.jsonl). The subscriber is checked
end to end against real ZMQ sockets that publish exactly what vLLM publishes: payloads built
with msgspec structs shaped like vLLM's (`VllmBlockStored` and friends below; when the vLLM
venv is present, its own classes must encode a sample to the same bytes), a PUB socket
(XPUB here, which is the same on the wire and tells the test when a subscriber has joined)
and a ROUTER replay socket that answers like vLLM's `_service_replay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from twinroute.scheduler import kv_subscriber as kv_subscriber_module
from twinroute.scheduler.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineKvIndex,
    KvEvent,
    KvEventDecodeError,
    KvEventIndex,
    KvState,
    decode_message,
)
from twinroute.scheduler.kv_subscriber import END_SEQ, KvEventSource, KvEventSubscriber
from twinroute.scheduler.vllm_blocks import VllmBlockHasher

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vllm_kv_events_real.jsonl"
TOPIC = b"kv"


# --- vLLM's wire shapes (vllm/distributed/kv_events.py, 0.32) ---------------------------------


class VllmBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class VllmBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()


def vllm_payload(events: Sequence[Any], *, ts: float = 1.0, rank: int | None = 0) -> bytes:
    return _ENCODER.encode(VllmBatch(ts=ts, events=list(events), data_parallel_rank=rank))


def stored(
    hashes: Sequence[int],
    *,
    medium: str | None = "GPU",
    group: int | None = 0,
    kind: str | None = None,
) -> VllmBlockStored:
    return VllmBlockStored(
        block_hashes=list(hashes),
        parent_block_hash=None,
        token_ids=[],
        block_size=4,
        lora_id=None,
        medium=medium,
        lora_name=None,
        group_idx=group,
        kv_cache_spec_kind=kind,
    )


def removed(
    hashes: Sequence[int], *, medium: str | None = "GPU", group: int | None = 0
) -> VllmBlockRemoved:
    return VllmBlockRemoved(block_hashes=list(hashes), medium=medium, group_idx=group)


def ours(events: Iterable[Any]) -> list[KvEvent]:
    """What the scheduler decodes from these vLLM-shaped events."""
    batch = decode_message([TOPIC, (0).to_bytes(8, "big"), vllm_payload(list(events))])
    return batch.events


# --- the real engine's recording --------------------------------------------------------------


def fixture_batches() -> list[tuple[int, list[VllmEvent]]]:
    batches = []
    with FIXTURE.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            events = msgspec.convert(record["events"], list[VllmEvent])
            batches.append((record["seq"], events))
    return batches


def int_hashes(event: VllmBlockStored) -> list[int]:
    return [h for h in event.block_hashes if isinstance(h, int)]


def int_parent(event: VllmBlockStored) -> int | None:
    parent = event.parent_block_hash
    return parent if isinstance(parent, int) else None


class ReferenceCache:
    """An independent model of what the engine holds: copies per hash, nothing else."""

    def __init__(self) -> None:
        self.copies: dict[int, int] = {}
        self.parent: dict[int, int | None] = {}

    def apply(self, events: Iterable[VllmEvent]) -> None:
        for event in events:
            if isinstance(event, VllmAllBlocksCleared):
                self.copies.clear()
                continue
            for block_hash in event.block_hashes:
                assert isinstance(block_hash, int)  # the fixture's engine sent ints
                if isinstance(event, VllmBlockStored):
                    self.copies[block_hash] = self.copies.get(block_hash, 0) + 1
                elif self.copies.get(block_hash, 0) > 1:
                    self.copies[block_hash] -= 1
                else:
                    self.copies.pop(block_hash, None)
            if isinstance(event, VllmBlockStored):
                parent = int_parent(event)
                for block_hash in int_hashes(event):
                    self.parent[block_hash] = parent
                    parent = block_hash

    def chain(self, last: int) -> list[int]:
        """Every block hash from the root to `last`, as a prompt's hashes would be."""
        chain: list[int] = []
        cursor: int | None = last
        while cursor is not None:
            chain.append(cursor)
            cursor = self.parent[cursor]
        return chain[::-1]

    def leading(self, chain: Sequence[int]) -> int:
        depth = 0
        while depth < len(chain) and chain[depth] in self.copies:
            depth += 1
        return depth


# --- decoding ---------------------------------------------------------------------------------


def test_decodes_what_vllm_sends() -> None:
    payload = vllm_payload(
        [stored([1, 2**64 - 1], kind="full_attention"), removed([1]), VllmAllBlocksCleared()],
        ts=12.5,
    )
    batch = decode_message([TOPIC, (41).to_bytes(8, "big"), payload])
    assert (batch.seq, batch.ts, batch.topic, batch.data_parallel_rank) == (41, 12.5, TOPIC, 0)
    first, second, third = batch.events
    assert isinstance(first, BlockStored)
    assert first.block_hashes == [1, 2**64 - 1]
    assert (first.medium, first.group_idx, first.kv_cache_spec_kind) == ("GPU", 0, "full_attention")
    assert isinstance(second, BlockRemoved) and second.block_hashes == [1]
    assert isinstance(third, AllBlocksCleared)
    assert batch.skipped == {}


def test_unknown_event_types_and_fields_are_counted_or_ignored() -> None:
    class BlockMoved(msgspec.Struct, tag="BlockMoved"):
        block_hashes: list[int]

    class FutureBlockStored(msgspec.Struct, tag="BlockStored"):
        block_hashes: list[int]
        medium: str
        brand_new_field: list[str]

    payload = vllm_payload(
        [BlockMoved([5]), FutureBlockStored([7], "GPU", ["x"]), BlockMoved([6]), removed([7])]
    )
    batch = decode_message([TOPIC, (3).to_bytes(8, "big"), payload])
    assert batch.skipped == {"BlockMoved": 2}
    assert [type(e).__name__ for e in batch.events] == ["BlockStored", "BlockRemoved"]
    index = KvEventIndex(clock=lambda: 0.0)
    index.apply_batch("e", batch)
    assert index.blocks_held("e") == 0
    assert index.counters.events_skipped == {"type:BlockMoved": 2}


def test_a_batch_without_a_rank_and_hashes_as_bytes_decode() -> None:
    digest = bytes(range(32))
    payload = vllm_payload([stored([digest])], rank=None)  # type: ignore[list-item]
    batch = decode_message([b"", (0).to_bytes(8, "big"), payload])
    assert batch.data_parallel_rank is None
    index = KvEventIndex(clock=lambda: 0.0)
    index.apply("e", batch.seq, batch.events)
    assert index.precise_matched_blocks("e", [int.from_bytes(digest[-8:], "big")]) == 1


def test_malformed_messages_raise_with_the_sequence_when_known() -> None:
    with pytest.raises(KvEventDecodeError, match="3 frames") as no_seq:
        decode_message([TOPIC, (1).to_bytes(8, "big")])
    assert no_seq.value.seq is None
    with pytest.raises(KvEventDecodeError, match="8"):
        decode_message([TOPIC, b"\x01", vllm_payload([])])
    with pytest.raises(KvEventDecodeError) as garbage:
        decode_message([TOPIC, (9).to_bytes(8, "big"), b"\xc1not msgpack"])
    assert garbage.value.seq == 9
    with pytest.raises(KvEventDecodeError):
        decode_message([TOPIC, (9).to_bytes(8, "big"), msgspec.msgpack.encode({"ts": 1})])


_VLLM_ENCODE_SCRIPT = r"""
import sys
import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

def batch(rank):
    return KVEventBatch(ts=1795733779.25, events=[
        BlockStored(block_hashes=[1, 2**64 - 1], parent_block_hash=None,
                    token_ids=list(range(8)), block_size=4, lora_id=None, medium="GPU",
                    lora_name=None, extra_keys=[None, None], group_idx=0,
                    kv_cache_spec_kind="full_attention"),
        BlockStored(block_hashes=[b"\x00" * 31 + b"\x07"], parent_block_hash=2**63,
                    token_ids=[9, 9, 9, 9], block_size=4, lora_id=3, medium="CPU",
                    lora_name="adapter", session_id="s-1"),
        BlockRemoved(block_hashes=[1], medium="GPU", group_idx=0),
        AllBlocksCleared(),
    ], data_parallel_rank=rank)

encoder = msgspec.msgpack.Encoder()
print(encoder.encode(batch(0)).hex())
print(encoder.encode(batch(None)).hex())
"""


def _our_sample(rank: int | None) -> bytes:
    return vllm_payload(
        [
            VllmBlockStored(
                block_hashes=[1, 2**64 - 1],
                parent_block_hash=None,
                token_ids=list(range(8)),
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[None, None],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            ),
            VllmBlockStored(
                block_hashes=[b"\x00" * 31 + b"\x07"],
                parent_block_hash=2**63,
                token_ids=[9, 9, 9, 9],
                block_size=4,
                lora_id=3,
                medium="CPU",
                lora_name="adapter",
                session_id="s-1",
            ),
            VllmBlockRemoved(block_hashes=[1], medium="GPU", group_idx=0),
            VllmAllBlocksCleared(),
        ],
        ts=1795733779.25,
        rank=rank,
    )


@pytest.mark.slow
def test_the_test_encoder_is_byte_identical_to_vllms_classes(vllm_venv_python: Path) -> None:
    python = vllm_venv_python
    completed = subprocess.run(
        [str(python), "-c", _VLLM_ENCODE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with_rank, without_rank = completed.stdout.split()[-2:]
    assert bytes.fromhex(with_rank) == _our_sample(0)
    assert bytes.fromhex(without_rank) == _our_sample(None)
    batch = decode_message([TOPIC, (0).to_bytes(8, "big"), bytes.fromhex(with_rank)])
    assert [type(e).__name__ for e in batch.events] == [
        "BlockStored",
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]


# --- the index --------------------------------------------------------------------------------


def test_replaying_the_real_engine_matches_an_independent_model() -> None:
    index = KvEventIndex(clock=lambda: 0.0)
    reference = ReferenceCache()
    chains_seen: list[int] = []
    outcomes: set[str] = set()
    for seq, events in fixture_batches():
        index.apply("engine", seq, ours(events))
        reference.apply(events)
        chains_seen += [int_hashes(e)[-1] for e in events if isinstance(e, VllmBlockStored)]
        assert index.state("engine") is KvState.LIVE
        assert index.blocks_held("engine") == len(reference.copies)
        for last in chains_seen[-40:]:
            chain = reference.chain(last)
            expected = reference.leading(chain)
            assert index.precise_matched_blocks("engine", chain) == expected
            outcomes.add("none" if expected == 0 else "all" if expected == len(chain) else "part")
    assert outcomes == {"none", "part", "all"}  # the replay exercised every kind of answer
    assert index.blocks_held("engine") == 126
    assert index.counters.events_applied == {
        "BlockStored": 228,
        "BlockRemoved": 570,
        "AllBlocksCleared": 1,
    }
    assert (index.counters.gaps, index.counters.removed_unknown) == (0, 0)


def test_hashes_computed_from_token_ids_find_what_the_engine_holds() -> None:
    """The two halves together: VllmBlockHasher output against the event-fed index."""
    index = KvEventIndex(clock=lambda: 0.0)
    reference = ReferenceCache()
    tokens_through: dict[int, list[int]] = {}
    for seq, events in fixture_batches():
        index.apply("engine", seq, ours(events))
        reference.apply(events)
        for event in events:
            if isinstance(event, VllmBlockStored):
                parent = int_parent(event)
                prefix = [] if parent is None else tokens_through[parent]
                for i, block_hash in enumerate(int_hashes(event)):
                    tokens_through[block_hash] = prefix + event.token_ids[: 32 * (i + 1)]
    hasher = VllmBlockHasher(32)
    held_somewhere = 0
    for last, tokens in tokens_through.items():
        hashes = hasher.block_hashes([*tokens, 1, 2, 3])  # a partial block never counts
        assert hashes[-1] == last
        matched = index.precise_matched_blocks("engine", hashes)
        assert matched == reference.leading(reference.chain(last))
        held_somewhere += matched > 0
    assert held_somewhere > 0


def test_leading_blocks_only_holes_stop_the_count() -> None:
    engine = EngineKvIndex()
    engine.apply(0, ours([stored([1, 2, 3, 4, 5])]), now=0.0)
    assert engine.matched_blocks([1, 2, 3, 4, 5, 6]) == 5
    engine.apply(1, ours([removed([2])]), now=0.0)
    # 3, 4 and 5 are held but unreachable: a binary search would wrongly answer 5 here.
    assert engine.matched_blocks([1, 2, 3, 4, 5]) == 1
    assert engine.matched_blocks([1]) == 1
    assert engine.matched_blocks([3, 4]) == 2
    assert engine.matched_blocks([]) == 0
    assert engine.blocks_held() == 4
    engine.apply(2, ours([removed([9], group=3)]), now=0.0)  # a group never stored
    assert engine.matched_blocks([1]) == 1
    assert engine.counters.removed_unknown == 1


def test_a_block_cached_twice_survives_one_eviction() -> None:
    engine = EngineKvIndex()
    engine.apply(0, ours([stored([7, 8]), stored([7])]), now=0.0)
    engine.apply(1, ours([removed([7])]), now=0.0)
    assert engine.matched_blocks([7, 8]) == 2
    engine.apply(2, ours([removed([7]), removed([99])]), now=0.0)
    assert engine.matched_blocks([7, 8]) == 0
    assert engine.counters.removed_unknown == 1


def test_only_the_main_medium_and_full_history_groups_count() -> None:
    engine = EngineKvIndex()
    engine.apply(
        0,
        ours(
            [
                stored([1, 2], medium="CPU"),
                stored([1], medium=None),  # older vLLMs send no medium: the main cache
                stored([5, 6], group=1, kind="sliding_window"),
                removed([1], medium="CPU"),
                removed([5], group=1),
            ]
        ),
        now=0.0,
    )
    assert engine.matched_blocks([1, 2]) == 1
    assert engine.matched_blocks([5, 6]) == 0
    assert engine.counters.events_skipped == {
        "medium:CPU": 2,
        "kind:sliding_window": 1,
        "kind:partial": 1,
    }
    # Two full-history groups must both hold a block for vLLM to reuse it.
    both = EngineKvIndex()
    both.apply(0, ours([stored([1, 2, 3], group=0), stored([1, 2], group=1)]), now=0.0)
    assert both.matched_blocks([1, 2, 3]) == 2


def test_a_skipped_sequence_number_is_a_gap_until_the_cache_is_cleared() -> None:
    index = KvEventIndex(clock=lambda: 0.0)
    assert index.state("e") is KvState.UNKNOWN
    assert index.precise_matched_blocks("e", [1]) is None
    index.apply("e", 0, ours([stored([1, 2])]))
    index.apply("e", 1, [])
    assert index.precise_matched_blocks("e", [1, 2]) == 2
    index.apply("e", 3, ours([stored([3])]))  # 2 never arrived
    assert index.state("e") is KvState.GAP
    assert index.precise_matched_blocks("e", [1, 2]) is None
    index.apply("e", 4, ours([stored([4])]))
    assert index.state("e") is KvState.GAP  # in order again, but 2 is still missing
    index.apply("e", 5, ours([stored([9]), VllmAllBlocksCleared(), stored([10, 11])]))
    assert index.state("e") is KvState.LIVE
    assert index.precise_matched_blocks("e", [10, 11]) == 2
    assert index.precise_matched_blocks("e", [9]) == 0
    assert index.counters.gaps == 1


def test_joining_late_is_a_gap_and_a_new_engine_process_starts_over() -> None:
    index = KvEventIndex(clock=lambda: 0.0)
    index.apply("late", 7, ours([stored([1])]))
    assert index.state("late") is KvState.GAP
    index.apply("e", 0, ours([stored([1, 2])]))
    index.apply("e", 1, [])
    index.apply("e", 0, ours([stored([5])]))  # sequence back to 0: the engine restarted
    assert index.state("e") is KvState.LIVE
    assert index.precise_matched_blocks("e", [1]) == 0
    assert index.precise_matched_blocks("e", [5]) == 1
    index.apply("e", 1, [])
    index.apply("e", 1, [])  # a number seen before also means a new process ...
    index.apply("e", 3, [])
    assert index.state("e") is KvState.GAP  # ... whose batches 0 and 2 we never saw
    assert index.counters.restarts == 2


def test_an_undecodable_batch_is_a_gap() -> None:
    index = KvEventIndex(clock=lambda: 0.0)
    index.apply("e", 0, ours([stored([1])]))
    index.note_decode_error("e", seq=1)
    assert index.state("e") is KvState.GAP
    assert index.next_seq("e") == 2
    assert index.counters.decode_errors == 1


def test_silent_when_a_placement_that_must_store_blocks_hears_nothing() -> None:
    clock = [100.0]
    index = KvEventIndex(silent_after_s=5.0, clock=lambda: clock[0])
    index.apply("e", 0, ours([stored([1, 2])]))
    index.note_placed("e", [1, 2])  # fully cached: vLLM stores nothing, so no event is owed
    index.note_placed("e", [])  # shorter than a block: nothing to store either
    clock[0] += 60.0
    assert index.state("e") is KvState.LIVE
    index.note_placed("e", [1, 2, 3])  # block 3 is new: a BlockStored is owed from now
    clock[0] += 4.9
    assert index.state("e") is KvState.LIVE
    index.note_placed("e", [1, 2, 3, 4])  # later placements do not move the deadline
    clock[0] += 0.1
    assert index.state("e") is KvState.SILENT
    assert index.precise_matched_blocks("e", [1, 2]) is None
    index.apply("e", 1, ours([stored([3])]))
    assert index.state("e") is KvState.LIVE
    assert index.precise_matched_blocks("e", [1, 2, 3]) == 3
    index.note_placed("nobody", [1])
    assert index.endpoints() == ["e"]


def test_forget_drops_the_endpoint() -> None:
    index = KvEventIndex(clock=lambda: 0.0)
    index.apply("e", 0, ours([stored([1])]))
    index.forget("e")
    assert index.state("e") is KvState.UNKNOWN
    assert index.blocks_held("e") == 0
    assert index.next_seq("e") == 0
    assert index.counters.events_applied["BlockStored"] == 1  # counters stay monotonic


# --- the subscriber against real sockets ------------------------------------------------------


class FakeVllmPublisher:
    """vLLM's ZmqEventPublisher, on the wire: PUB frames, a replay buffer, a ROUTER."""

    def __init__(self, context: zmq.asyncio.Context, *, buffer_steps: int = 10_000) -> None:
        self.pub = context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report a second subscriber to the topic too
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.source = KvEventSource(
            address=f"tcp://127.0.0.1:{port}",
            replay_address=f"tcp://127.0.0.1:{replay_port}",
            topic=TOPIC.decode(),
        )
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.replay_requests: list[int] = []
        self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def wait_subscribed(self) -> None:
        """XPUB hears each subscription; from then on nothing published to it is lost."""
        while True:  # skip unsubscriptions of closed subscribers
            message = await asyncio.wait_for(self.pub.recv(), timeout=5.0)
            if message[:1] == b"\x01":
                assert message == b"\x01" + TOPIC
                return

    async def publish(self, events: Sequence[Any], *, drop: bool = False) -> int:
        seq, self.seq = self.seq, self.seq + 1
        payload = vllm_payload(events, ts=float(seq))
        self.buffer.append((seq, payload))
        if not drop:  # a dropped batch is buffered but never reaches the subscriber
            await self.pub.send_multipart([TOPIC, seq.to_bytes(8, "big"), payload])
        return seq

    async def _serve_replay(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            client, _, start_frame = frames
            start = int.from_bytes(start_frame, "big")
            self.replay_requests.append(start)
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self.router.send_multipart(
                        [client, b"", TOPIC, seq.to_bytes(8, "big"), payload]
                    )
            await self.router.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        self._replay_task.cancel()
        await asyncio.gather(self._replay_task, return_exceptions=True)
        self.pub.close(linger=0)
        self.router.close(linger=0)


async def eventually(condition: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def publisher(context: zmq.asyncio.Context) -> AsyncIterator[FakeVllmPublisher]:
    publisher = FakeVllmPublisher(context)
    yield publisher
    await publisher.close()


@pytest.fixture
async def subscriber() -> AsyncIterator[KvEventSubscriber]:
    subscriber = KvEventSubscriber(KvEventIndex(), replay_timeout_s=1.0)
    yield subscriber
    await subscriber.stop()
    assert subscriber.open_sockets() == 0


def kv_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("kv-events:")]


async def test_the_subscriber_fills_the_index_from_a_real_socket(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    await publisher.wait_subscribed()
    reference = ReferenceCache()
    batches = fixture_batches()
    for _, events in batches:
        await publisher.publish(events)
        reference.apply(events)
    index = subscriber.index
    await eventually(lambda: index.next_seq("engine") == len(batches))
    assert index.state("engine") is KvState.LIVE
    assert index.blocks_held("engine") == len(reference.copies) == 126
    held = [h for h in reference.copies if reference.leading(reference.chain(h)) > 0]
    for last in held:
        chain = reference.chain(last)
        assert index.precise_matched_blocks("engine", chain) == reference.leading(chain)
    assert (subscriber.replays_succeeded, subscriber.replays_failed) == (0, 0)
    assert publisher.replay_requests == []


async def subscribed_by_reads(
    subscriber: KvEventSubscriber,
    publisher: FakeVllmPublisher,
    *,
    before_read: Callable[[], None] = lambda: None,
) -> KvEventIndex:
    """Follow `publisher` as "engine" and wait for the subscription, which lands when the
    socket is next touched: the tests that set no sweep to speak of read the index for it."""
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    subscribed = asyncio.create_task(publisher.wait_subscribed())
    while not subscribed.done():
        before_read()
        subscriber.index.precise_matched_blocks("engine", [1])
        await asyncio.sleep(0.01)
    return subscriber.index


async def test_batches_wait_in_the_socket_until_a_decision_reads_that_engine(
    publisher: FakeVllmPublisher,
) -> None:
    """No loop wake-up per batch: what arrives is applied when a pick reads the engine's
    index (or at the sweep), and then everything that reached the socket is."""
    subscriber = KvEventSubscriber(KvEventIndex(), sweep_interval_s=3600.0)
    try:
        index = await subscribed_by_reads(subscriber, publisher)
        await publisher.publish([stored([1, 2])])
        await publisher.publish([stored([3])])
        await asyncio.sleep(0.2)  # the loop runs; the batches are in the socket
        assert index.next_seq("engine") == 0
        assert index.precise_matched_blocks("engine", [1, 2]) == 2
        assert index.next_seq("engine") == 2
        await publisher.publish([removed([1])])
        time.sleep(0.2)  # noqa: ASYNC251 - the loop must not run: no callback may apply it
        assert index.precise_matched_blocks("engine", [1, 2]) == 0
        await publisher.publish([stored([1])])
        time.sleep(0.2)  # noqa: ASYNC251
        assert index.partial_answer("engine", [3]) is None  # live, so no partial answer...
        assert index.next_seq("engine") == 4  # ...but the read applied the batch first
    finally:
        await subscriber.stop()
    assert subscriber.open_sockets() == 0


async def test_the_reads_of_one_pick_ask_each_engines_socket_once(
    publisher: FakeVllmPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pick reads an engine's index several times (its score, the placement, the record
    check) and `holders` reads every engine: the socket is asked at most once a millisecond,
    so the reads of one pick agree and a large pool does not pay a system call per engine
    per read."""
    now = [0.0]
    subscriber = KvEventSubscriber(KvEventIndex(clock=lambda: now[0]), sweep_interval_s=3600.0)
    asked: list[str] = []
    drain = kv_subscriber_module._LiveBatches.drain

    def counted(live: Any) -> None:
        asked.append(live.endpoint_id)
        drain(live)

    monkeypatch.setattr(kv_subscriber_module._LiveBatches, "drain", counted)

    def tick() -> None:
        now[0] += 1.0

    try:
        index = await subscribed_by_reads(subscriber, publisher, before_read=tick)
        await publisher.publish([stored([1, 2])])
        time.sleep(0.2)  # noqa: ASYNC251 - the loop must not run
        now[0] += 1.0
        asked.clear()
        for _ in range(50):  # one pick's worth of reads, and more, within a millisecond
            assert index.precise_matched_blocks("engine", [1, 2]) == 2
            assert index.partial_answer("engine", [1, 2]) is None
            now[0] += 0.000_01
        assert asked == ["engine"]
        await publisher.publish([removed([2])])
        time.sleep(0.2)  # noqa: ASYNC251
        now[0] += 0.001  # a later pick asks again, and sees the eviction
        assert index.precise_matched_blocks("engine", [1, 2]) == 1
        assert asked == ["engine", "engine"]
    finally:
        await subscriber.stop()


async def test_a_dropped_endpoint_is_not_brought_back_by_a_read(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    """Two things keep a read away from a dropped endpoint's socket today (its stream leaves
    the subscriber before its index is forgotten, and cancelling its task cancels the stream's
    pending gap, which stops reads); this pins the behaviour, not either mechanism."""
    # No replay socket: a batch past a gap is applied (as a gap) rather than held for a replay.
    source = KvEventSource(publisher.source.address, None, publisher.source.topic)
    subscriber.set_endpoints({"engine": source})
    await subscriber.start()
    await publisher.wait_subscribed()
    index = subscriber.index
    await publisher.publish([stored([1])])
    await eventually(lambda: index.precise_matched_blocks("engine", [1]) == 1)
    await publisher.publish([stored([2])])
    time.sleep(0.2)  # noqa: ASYNC251 - batch 1 waits in the old socket, still open
    subscriber.set_endpoints({})
    assert index.precise_matched_blocks("engine", [1, 2]) is None
    assert index.endpoints() == []


async def test_a_missed_batch_is_replayed_and_the_index_stays_live(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    await publisher.wait_subscribed()
    index = subscriber.index
    await publisher.publish([stored([1, 2])])
    await publisher.publish([stored([3])], drop=True)
    await publisher.publish([removed([1])], drop=True)
    await publisher.publish([stored([1, 4])])  # seq 3: the subscriber sees 1 and 2 missing
    await eventually(lambda: subscriber.replays_succeeded == 1)
    assert index.next_seq("engine") == 4
    assert publisher.replay_requests == [1]
    assert index.state("engine") is KvState.LIVE
    assert index.precise_matched_blocks("engine", [1, 2]) == 2
    assert index.precise_matched_blocks("engine", [3]) == 1
    assert index.precise_matched_blocks("engine", [1, 4]) == 2
    assert subscriber.duplicates_skipped == 1  # the live copy of seq 3
    await publisher.publish([removed([4])])
    await eventually(lambda: index.next_seq("engine") == 5)
    assert index.precise_matched_blocks("engine", [1, 4]) == 1


async def test_a_burst_with_a_gap_in_it_is_applied_whole_without_a_later_batch(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    """Whatever queued (in a burst, or while a replay ran) is read without waiting for another
    batch to arrive or a pick to read the index: the sweep reads it."""
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    await publisher.wait_subscribed()
    for block in range(60):
        await publisher.publish([stored([block])], drop=block == 20)
    index = subscriber.index
    await eventually(lambda: index.next_seq("engine") == 60)
    assert subscriber.replays_succeeded == 1
    assert index.state("engine") is KvState.LIVE
    assert index.blocks_held("engine") == 60


async def test_joining_late_replays_from_zero(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    for hashes in ([1], [2], [3]):
        await publisher.publish([stored(hashes)])  # nobody listening yet: lost, but buffered
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    await publisher.wait_subscribed()
    await publisher.publish([stored([4])])
    index = subscriber.index
    await eventually(lambda: subscriber.replays_succeeded == 1)
    assert index.next_seq("engine") == 4
    assert publisher.replay_requests == [0]
    assert index.state("engine") is KvState.LIVE
    assert index.blocks_held("engine") == 4


async def test_a_gap_the_replay_buffer_no_longer_holds_waits_for_a_cache_reset(
    context: zmq.asyncio.Context, subscriber: KvEventSubscriber
) -> None:
    publisher = FakeVllmPublisher(context, buffer_steps=1)
    try:
        subscriber.set_endpoints({"engine": publisher.source})
        await subscriber.start()
        await publisher.wait_subscribed()
        index = subscriber.index
        await publisher.publish([stored([1])])
        await publisher.publish([stored([2])], drop=True)
        await publisher.publish([stored([3])])  # the replay buffer holds only this one
        await eventually(lambda: subscriber.replays_failed == 1)
        await eventually(lambda: index.next_seq("engine") == 3)
        assert index.state("engine") is KvState.GAP
        assert index.precise_matched_blocks("engine", [1]) is None
        await publisher.publish([VllmAllBlocksCleared(), stored([7])])
        await eventually(lambda: index.state("engine") is KvState.LIVE)
        assert index.precise_matched_blocks("engine", [7]) == 1
        assert index.precise_matched_blocks("engine", [1]) == 0
    finally:
        await publisher.close()


async def test_an_unreachable_replay_socket_times_out_into_a_gap(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    # A port nobody listens on: the replay request cannot even be sent.
    probe = zmq.Context.instance().socket(zmq.ROUTER)
    free_port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    source = KvEventSource(publisher.source.address, f"tcp://127.0.0.1:{free_port}", "kv")
    subscriber.replay_timeout_s = 0.2
    subscriber.set_endpoints({"engine": source})
    await subscriber.start()
    await publisher.wait_subscribed()
    await publisher.publish([stored([1])])
    await publisher.publish([stored([2])], drop=True)
    await publisher.publish([stored([3])])
    index = subscriber.index
    await eventually(lambda: index.next_seq("engine") == 3)
    assert subscriber.replays_failed == 1
    assert index.state("engine") is KvState.GAP
    await publisher.publish([stored([4])])  # the stream goes on after the failed replay
    await eventually(lambda: index.next_seq("engine") == 4)


async def test_a_garbled_batch_is_a_gap_and_a_bad_address_spoils_only_its_endpoint(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    subscriber.set_endpoints(
        {"engine": publisher.source, "typo": KvEventSource("tcp://no-port-given")}
    )
    await subscriber.start()
    await publisher.wait_subscribed()
    index = subscriber.index
    await publisher.publish([stored([1])])
    await publisher.pub.send_multipart([TOPIC, (1).to_bytes(8, "big"), b"\xc1"])
    publisher.seq = 2
    await publisher.publish([stored([2])])
    await eventually(lambda: index.next_seq("engine") == 3)
    assert index.counters.decode_errors == 1
    assert index.state("engine") is KvState.GAP
    assert index.state("typo") is KvState.UNKNOWN
    await eventually(lambda: subscriber.open_sockets() == 1)  # the typo's task has ended


async def test_a_restarted_engine_is_followed_from_its_new_sequence(
    publisher: FakeVllmPublisher, subscriber: KvEventSubscriber
) -> None:
    subscriber.set_endpoints({"engine": publisher.source})
    await subscriber.start()
    await publisher.wait_subscribed()
    index = subscriber.index
    for hashes in ([1], [2], [3]):
        await publisher.publish([stored(hashes)])
    await eventually(lambda: index.next_seq("engine") == 3)
    publisher.seq = 0  # a new engine process behind the same address
    publisher.buffer.clear()
    await publisher.publish([stored([9])])
    await eventually(lambda: index.precise_matched_blocks("engine", [9]) == 1)
    assert index.precise_matched_blocks("engine", [1]) == 0
    assert index.counters.restarts == 1


async def test_set_endpoints_adds_replaces_and_removes_and_stop_leaves_nothing(
    context: zmq.asyncio.Context, publisher: FakeVllmPublisher
) -> None:
    other = FakeVllmPublisher(context)
    subscriber = KvEventSubscriber(KvEventIndex())
    try:
        subscriber.set_endpoints({"a": publisher.source, "b": None})  # before start: only noted
        assert subscriber.open_sockets() == 0
        await subscriber.start()
        await publisher.wait_subscribed()
        await publisher.publish([stored([1])])
        index = subscriber.index
        await eventually(lambda: index.blocks_held("a") == 1)
        subscriber.set_endpoints({"a": publisher.source, "b": other.source})
        await other.wait_subscribed()
        await other.publish([stored([2, 3])])
        await eventually(lambda: index.blocks_held("b") == 2)
        assert subscriber.open_sockets() == 2
        assert sorted(t.get_name() for t in kv_tasks()) == ["kv-events:a", "kv-events:b"]
        # "a" moves to the other publisher's address: a new stream, a new index.
        subscriber.set_endpoints({"a": other.source, "b": other.source})
        assert index.state("a") is KvState.UNKNOWN
        await other.wait_subscribed()
        await other.publish([stored([4])])  # seq 1 of that stream: "a" joined late
        await eventually(lambda: index.blocks_held("a") == 3)  # replayed from 0
        subscriber.set_endpoints({"b": None})
        assert index.endpoints() == []
        await eventually(lambda: subscriber.open_sockets() == 0)
        assert index.state("a") is KvState.UNKNOWN and index.state("b") is KvState.UNKNOWN
        subscriber.set_endpoints({"a": publisher.source})
        await eventually(lambda: subscriber.open_sockets() == 1)
    finally:
        await subscriber.stop()
        await other.close()
    assert subscriber.open_sockets() == 0
    assert not subscriber.running
    assert kv_tasks() == []


@contextlib.asynccontextmanager
async def followed_with_a_silent_replay(
    context: zmq.asyncio.Context, *, replay_timeout_s: float
) -> AsyncIterator[tuple[FakeVllmPublisher, KvEventSubscriber, zmq.asyncio.Socket]]:
    """A publisher whose replay socket takes the request and never answers, followed (and
    subscribed) by a subscriber: (publisher, subscriber, that replay socket)."""
    silent_router = context.socket(zmq.ROUTER)
    silent_router.setsockopt(zmq.LINGER, 0)
    replay_port = silent_router.bind_to_random_port("tcp://127.0.0.1")
    publisher = FakeVllmPublisher(context)
    subscriber = KvEventSubscriber(KvEventIndex(), replay_timeout_s=replay_timeout_s)
    try:
        source = KvEventSource(publisher.source.address, f"tcp://127.0.0.1:{replay_port}", "kv")
        subscriber.set_endpoints({"engine": source})
        await subscriber.start()
        await publisher.wait_subscribed()
        yield publisher, subscriber, silent_router
    finally:
        await subscriber.stop()
        await publisher.close()
        silent_router.close(linger=0)


async def test_an_engine_waiting_for_its_replay_is_not_read_as_exact(
    context: zmq.asyncio.Context,
) -> None:
    """Between the batch that shows a gap and the end of its replay, the engine's index lacks
    the missed batches: the decisions read it as a gap (the approximate record may answer for
    what it cannot vouch for), not as exact."""
    async with followed_with_a_silent_replay(context, replay_timeout_s=0.5) as (
        publisher,
        subscriber,
        silent_router,
    ):
        index = subscriber.index
        await publisher.publish([stored([1, 2])])
        await eventually(lambda: index.precise_matched_blocks("engine", [1, 2]) == 2)
        await publisher.publish([removed([2])], drop=True)
        await publisher.publish([stored([3])])
        await asyncio.wait_for(silent_router.recv_multipart(), timeout=5.0)
        assert index.state("engine") is KvState.GAP
        assert index.precise_matched_blocks("engine", [1, 2]) is None
        assert index.partial_answer("engine", [1, 2]) == (2, False)
        # The replay times out: the batch past the gap is applied, and the gap stays.
        await eventually(lambda: subscriber.replays_failed == 1)
        assert index.next_seq("engine") == 3
        assert index.state("engine") is KvState.GAP


async def test_stop_cancels_a_subscriber_in_the_middle_of_a_replay(
    context: zmq.asyncio.Context,
) -> None:
    async with followed_with_a_silent_replay(context, replay_timeout_s=30.0) as (
        publisher,
        subscriber,
        silent_router,
    ):
        await publisher.publish([stored([1])], drop=True)
        await publisher.publish([stored([2])])
        await asyncio.wait_for(silent_router.recv_multipart(), timeout=5.0)
        assert subscriber.open_sockets() == 2  # the SUB and the replay DEALER
        await asyncio.wait_for(subscriber.stop(), timeout=2.0)
        assert subscriber.open_sockets() == 0
        assert kv_tasks() == []
