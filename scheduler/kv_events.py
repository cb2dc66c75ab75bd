"""What each vLLM engine really caches, learnt from its KV-cache events.

The prefix index (`scheduler/prefix_index.py`) guesses what an engine holds from what the
scheduler sent there. An engine started with `--kv-events-config` says what it holds: every
full block it caches or evicts is published on a ZMQ PUB socket, named by the same hash that
`VllmBlockHasher` (`scheduler/vllm_blocks.py`) computes from a request's token ids. This module
decodes those messages, keeps one block set per engine and answers "how many leading blocks of
this prompt does that engine hold?" while, and only while, it can vouch for the answer.

Wire format (vLLM 0.32, `vllm/distributed/kv_events.py`). The engine's PUB socket binds an
endpoint with a wildcard, `tcp://*:5557` (so the scheduler connects to `tcp://ENGINE:5557`; an
engine given a concrete host connects instead, which this subscriber does not serve). It sends
three frames per batch: the topic, an 8-byte big-endian sequence number counting from 0 per
engine process, and a msgpack payload `[ts, [event, ...], data_parallel_rank]` (an array; the
rank is nil when unset). Each event is a *map*, not an array, tagged by its "type" key, with
the fields that have defaults left out while they hold them:

    BlockStored     block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
                    lora_name, extra_keys?, group_idx?, kv_cache_spec_kind?, ...
    BlockRemoved    block_hashes, medium, group_idx?, ...
    AllBlocksCleared

Hashes are 64-bit ints (the digest's last 8 bytes) or, with
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, whole digests as bytes; both are folded to the int.
Decoding uses msgspec structs that ignore unknown fields; an event of an unknown type is
counted by its tag and skipped, so a newer vLLM degrades to "fewer events understood".

What is indexed. Only the engine's main KV cache (medium "GPU", also on CPU builds; events
without a medium count as main): host or storage tiers of a KV offloader ("CPU", "STORAGE")
are not what a prefix hit reuses. Only KV groups that keep the whole history
(`FULL_HISTORY_KINDS`, or no kind given; no group index means group 0): sliding-window or
Mamba groups cache a tail and cannot vouch for a prefix. A block hash counts *copies*: vLLM
does not deduplicate, so two requests computing the same block at once cache it twice,
publish two BlockStored and, when one copy is evicted, one BlockRemoved; a set would forget a
block the engine still holds. (Caveat: requests in vLLM's opt-in
`kv_cache_report_mode="full"` re-announce reused blocks, which inflates counts; the default
mode does not.)

Matched blocks. `matched_blocks(hashes)` is the number of *leading* hashes present: vLLM's own
lookup walks the chain from block 0 and stops at the first miss, so a block held after a hole
(a removal can punch one) is never reused and is not counted. With several full-history groups
the smallest count wins. A block-aligned prompt still recomputes its last token, so a caller
turning blocks into tokens caps at `prompt_tokens - 1`.

States, one per engine (`KvState`):

- unknown: nothing heard since it was added or resynced.
- live: every batch since sequence 0, or since the last AllBlocksCleared, was applied in order.
  Only a live engine's answer is used: `precise_matched_blocks` is None otherwise and the caller
  falls back to the approximate prefix index.
- gap: a batch was missed (a sequence number skipped, the first batch heard was not 0, a
  payload did not decode, or the sequence went back to a new engine process that had already
  sent batches). It stays in gap until an AllBlocksCleared (what `POST /reset_prefix_cache`
  sends) or until a new engine process is heard from sequence 0. `KvEventSubscriber` keeps
  most gaps from happening: it fetches the missing batches from the engine's replay socket
  and applies them before anything newer; only what the replay cannot supply is a gap. While
  such a replay runs (`note_replay`), the engine reads as a gap too: its index lacks them.
- silent: live, but the scheduler placed a request there that had to store a new block
  (reported with `note_placed`: at least one full block of the prompt not held) at least
  `silent_after_s` ago and no message has come since. A stalled publisher or a lost
  subscription looks exactly like this, and so does a request queued on the engine for that
  long, hence a default (15 s) well above a healthy queueing delay. The first message that
  arrives makes it live again.

`KvEventSubscriber` (`scheduler/kv_subscriber.py`) owns the sockets: one SUB per engine (a task
each), a DEALER per replay. vLLM's replay socket (ROUTER, `replay_endpoint`) answers a request
`("", start_seq)` with every batch it still buffers from `start_seq` on as `("", topic, seq,
payload)`, then an end marker `("", "", -1 as 8 bytes, "")`; its buffer holds the last 10,000
batches by default, so a replay recovers short outages only. Live batches that the replay
already applied are skipped by sequence number; a live sequence that goes back outside that
window is a restarted engine. (Not detected: a restarted engine whose first batches were all
lost while the subscriber reconnected *and* already number past the old process's last one.
vLLM takes far longer to start than ZMQ to reconnect, so its batch 0 is normally heard.)

Data parallelism: each vLLM DP rank publishes on its own port (base + rank) with its own cache;
one `KvEventSource` is one rank, and an endpoint that fronts several ranks is not modelled here.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

logger = logging.getLogger(__name__)

MAIN_MEDIUM = "GPU"
# KV group kinds whose blocks cover the whole prefix (vLLM's KVCacheSpecKind values).
FULL_HISTORY_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
DEFAULT_SILENT_AFTER_S = 15.0
# Evicted block hashes remembered while an index is not whole (about 8 MiB at most).
REMOVED_MEMORY = 1 << 17
_MASK_64 = (1 << 64) - 1


# --- wire types --------------------------------------------------------------------------
# Mirrors of vLLM's structs for decoding only: every field but the hashes has a default, so an
# older or newer vLLM that adds or drops a field still decodes; unknown fields are ignored.


class BlockStored(msgspec.Struct, tag=True, gc=False):
    """Full blocks the engine just cached (or, in "full" report mode, reused)."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = msgspec.field(default_factory=list)
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    """Blocks the engine evicted (one copy each)."""

    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    """The engine dropped its whole prefix cache (`/reset_prefix_cache`)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _TypedPayload(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = None


class _RawPayload(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _EventTag(msgspec.Struct, gc=False):
    type: str = "?"


_TYPED_DECODER = msgspec.msgpack.Decoder(_TypedPayload)
_RAW_DECODER = msgspec.msgpack.Decoder(_RawPayload)
_EVENT_DECODER = msgspec.msgpack.Decoder(KvEvent)
_TAG_DECODER = msgspec.msgpack.Decoder(_EventTag)


class KvEventDecodeError(ValueError):
    """A message that is not a vLLM KV-event batch; `seq` is set when its frame was readable."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """One decoded message: its sequence number and the events this decoder understood."""

    seq: int
    events: list[KvEvent]
    ts: float = 0.0
    topic: bytes = b""
    data_parallel_rank: int | None = None
    # Events of types this decoder does not know, by tag.
    skipped: Mapping[str, int] = field(default_factory=dict)


def _decode_payload(payload: bytes) -> tuple[float, int | None, list[KvEvent], dict[str, int]]:
    """(ts, rank, events, skipped) of one payload; unknown event types are counted, left out."""
    try:
        typed = _TYPED_DECODER.decode(payload)
        return typed.ts, typed.data_parallel_rank, typed.events, {}
    except msgspec.ValidationError:
        pass  # an event this decoder does not know, probably: sort them one by one
    except msgspec.DecodeError as error:
        raise KvEventDecodeError(f"not a KV-event payload: {error}") from None
    try:
        raw = _RAW_DECODER.decode(payload)
    except msgspec.DecodeError as error:
        raise KvEventDecodeError(f"not a KV-event payload: {error}") from None
    events: list[KvEvent] = []
    skipped: Counter[str] = Counter()
    for item in raw.events:
        try:
            events.append(_EVENT_DECODER.decode(item))
        except msgspec.DecodeError:
            try:
                tag = _TAG_DECODER.decode(item).type
            except msgspec.DecodeError:
                tag = "?"
            skipped[tag] += 1
    return raw.ts, raw.data_parallel_rank, events, dict(skipped)


def decode_message(frames: Sequence[bytes]) -> KvEventBatch:
    """Decode the frames `(topic, seq, payload)` of one PUB message (or one replayed batch)."""
    if len(frames) != 3:
        raise KvEventDecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq_frame, payload = frames
    if len(seq_frame) != 8:
        raise KvEventDecodeError(f"sequence frame of {len(seq_frame)} bytes, expected 8")
    seq = int.from_bytes(seq_frame, "big")
    try:
        ts, rank, events, skipped = _decode_payload(payload)
    except KvEventDecodeError as error:
        raise KvEventDecodeError(str(error), seq=seq) from None
    return KvEventBatch(
        seq=seq, events=events, ts=ts, topic=bytes(topic), data_parallel_rank=rank, skipped=skipped
    )


# --- the index ---------------------------------------------------------------------------


class KvState(enum.StrEnum):
    UNKNOWN = "unknown"
    LIVE = "live"
    GAP = "gap"
    SILENT = "silent"


@dataclass(slots=True)
class KvEventCounters:
    """Monotonic counts for metrics; shared by every engine of one `KvEventIndex`."""

    # Applied events by type ("BlockStored", "BlockRemoved", "AllBlocksCleared").
    events_applied: Counter[str] = field(default_factory=Counter)
    # Events left out, by reason: "type:<tag>", "medium:<medium>", "kind:<kv cache spec kind>".
    events_skipped: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    restarts: int = 0
    decode_errors: int = 0
    # BlockRemoved for a block not indexed: a store was missed (normal while in gap).
    removed_unknown: int = 0


def _as_ints(hashes: list[int | bytes]) -> list[int]:
    if not hashes or type(hashes[0]) is int:
        return cast(list[int], hashes)  # one publisher, one setting: all ints
    return [h if isinstance(h, int) else int.from_bytes(h[-8:], "big") & _MASK_64 for h in hashes]


class EngineKvIndex:
    """The blocks one engine holds, as its events say, and whether they can be trusted."""

    def __init__(
        self,
        *,
        silent_after_s: float = DEFAULT_SILENT_AFTER_S,
        main_medium: str = MAIN_MEDIUM,
        counters: KvEventCounters | None = None,
    ) -> None:
        if silent_after_s <= 0:
            raise ValueError(f"silent_after_s must be positive, got {silent_after_s}")
        self.silent_after_s = silent_after_s
        self.main_medium = main_medium
        self.counters = KvEventCounters() if counters is None else counters
        # KV group -> block hash -> copies held; full-history groups only.
        self._groups: dict[int, dict[int, int]] = {}
        self._partial_groups: set[int] = set()
        self._state = KvState.UNKNOWN
        self.last_seq: int | None = None
        self.last_message_at: float | None = None
        # When the first request that had to store a block was placed since the last message.
        self._awaiting_since: float | None = None
        # Blocks the events said were evicted (and not stored again) since the index stopped
        # being whole: known absent, where a gap leaves the rest unknown. Bounded, oldest
        # forgotten first.
        self._removed: OrderedDict[int, None] = OrderedDict()
        # A batch showed a gap and the missed ones are being fetched from the engine's replay
        # socket: until they are applied the index lacks them, so it reads as a gap.
        self.replay_pending = False

    # -- reading --

    def state(self, now: float) -> KvState:
        if self._state is not KvState.LIVE:
            return self._state
        if self.replay_pending:
            return KvState.GAP
        if self._awaiting_since is not None and now - self._awaiting_since >= self.silent_after_s:
            return KvState.SILENT
        return KvState.LIVE

    def next_seq(self) -> int:
        """The sequence number the next batch must carry to keep the index exact."""
        return 0 if self.last_seq is None else self.last_seq + 1

    def blocks_held(self) -> int:
        """Distinct block hashes indexed (summed over full-history KV groups)."""
        return sum(len(blocks) for blocks in self._groups.values())

    def known_absent(self, block_hash: int) -> bool:
        """Whether the events said this block was evicted (and not stored since)."""
        return block_hash in self._removed

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading `hashes` the engine holds (see the module docstring), any state."""
        if not self._groups:
            return 0
        matched = len(hashes)
        for blocks in self._groups.values():
            depth = 0
            while depth < matched and hashes[depth] in blocks:
                depth += 1
            matched = depth
            if matched == 0:
                break
        return matched

    # -- writing --

    def apply(self, seq: int, events: Sequence[KvEvent], now: float) -> None:
        """Apply one batch; `seq` decides whether the index stays exact (see `KvState`)."""
        self._heard(now)
        self._advance(seq)
        counters = self.counters
        for event in events:
            if isinstance(event, BlockStored):
                blocks = self._group_for(
                    event.medium, event.group_idx, event.kv_cache_spec_kind, storing=True
                )
                if blocks is not None:
                    for block_hash in _as_ints(event.block_hashes):
                        blocks[block_hash] = blocks.get(block_hash, 0) + 1
                        self._removed.pop(block_hash, None)
            elif isinstance(event, BlockRemoved):
                blocks = self._group_for(event.medium, event.group_idx, None, storing=False)
                if blocks is not None:
                    for block_hash in _as_ints(event.block_hashes):
                        copies = blocks.get(block_hash)
                        if copies is None:
                            counters.removed_unknown += 1
                            self._note_removed(block_hash)
                        elif copies == 1:
                            del blocks[block_hash]
                            self._note_removed(block_hash)
                        else:
                            blocks[block_hash] = copies - 1
            else:
                # Everything before is gone, so whatever was missed no longer matters.
                self._groups.clear()
                self._removed.clear()
                self._state = KvState.LIVE
            counters.events_applied[type(event).__name__] += 1

    def note_decode_error(self, seq: int | None, now: float) -> None:
        """A message arrived whose events could not be read: they are lost, so a gap."""
        self.counters.decode_errors += 1
        self._heard(now)
        if seq is not None:
            self._advance(seq)
        self._enter_gap()

    def note_placed(self, hashes: Sequence[int], now: float) -> None:
        """The scheduler sent a request with these block hashes here (see "silent")."""
        if self._awaiting_since is None and self.matched_blocks(hashes) < len(hashes):
            self._awaiting_since = now

    def resync(self) -> None:
        """Drop everything known and wait for sequence 0 (a new engine process) or a replay."""
        self._groups.clear()
        self._partial_groups.clear()
        self._state = KvState.UNKNOWN
        self.last_seq = None

    def _note_removed(self, block_hash: int) -> None:
        if self._state is KvState.LIVE:
            return  # a whole index needs no list: what it does not hold is absent
        self._removed[block_hash] = None
        if len(self._removed) > REMOVED_MEMORY:
            self._removed.popitem(last=False)

    def _heard(self, now: float) -> None:
        self.last_message_at = now
        self._awaiting_since = None

    def _advance(self, seq: int) -> None:
        last = self.last_seq
        if last is None:
            # A process's first batch is 0 and its cache starts empty; anything later means
            # batches were sent before we listened.
            if seq == 0:
                self._state = KvState.LIVE
            else:
                self._enter_gap()
        elif seq > last + 1:
            self._enter_gap()
        elif seq <= last:
            # Sequence numbers restart with the engine process, and so does its cache.
            self.counters.restarts += 1
            self._groups.clear()
            self._partial_groups.clear()
            if seq == 0:
                self._state = KvState.LIVE
            else:
                self._enter_gap()
        self.last_seq = seq

    def _enter_gap(self) -> None:
        self.counters.gaps += 1
        self._state = KvState.GAP

    def _group_for(
        self, medium: str | None, group_idx: int | None, kind: str | None, *, storing: bool
    ) -> dict[int, int] | None:
        """The block counts an event updates, or None when it is not indexed."""
        if medium is not None and medium != self.main_medium:
            self.counters.events_skipped[f"medium:{medium}"] += 1
            return None
        # Publishers that predate KV groups send no index: they have one group.
        group = 0 if group_idx is None else group_idx
        if kind is not None and kind not in FULL_HISTORY_KINDS:
            self._partial_groups.add(group)
            self._groups.pop(group, None)
        if group in self._partial_groups:
            self.counters.events_skipped[f"kind:{kind or 'partial'}"] += 1
            return None
        blocks = self._groups.get(group)
        if blocks is None:
            if not storing:
                # Only a store creates a group (an empty one would make every match 0); a
                # removal from a group never stored finds nothing, and is counted as such.
                return {}
            blocks = self._groups[group] = {}
        return blocks


class KvEventIndex:
    """`EngineKvIndex` per endpoint, with shared counters and an injectable clock."""

    def __init__(
        self,
        *,
        silent_after_s: float = DEFAULT_SILENT_AFTER_S,
        main_medium: str = MAIN_MEDIUM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if silent_after_s <= 0:
            raise ValueError(f"silent_after_s must be positive, got {silent_after_s}")
        self.silent_after_s = silent_after_s
        self.main_medium = main_medium
        self.clock = clock
        self.counters = KvEventCounters()
        self._engines: dict[str, EngineKvIndex] = {}
        self._before_read: Callable[[str], None] | None = None

    def read_through(self, before_read: Callable[[str], None] | None) -> None:
        """Have the decisions' reads (`precise_matched_blocks`, `partial_answer`) call
        `before_read(endpoint_id)` first: the subscriber applies what has reached that
        engine's socket, so a pick sees every batch delivered before it (None: no hook)."""
        self._before_read = before_read

    def _engine(self, endpoint_id: str) -> EngineKvIndex:
        engine = self._engines.get(endpoint_id)
        if engine is None:
            engine = self._engines[endpoint_id] = EngineKvIndex(
                silent_after_s=self.silent_after_s,
                main_medium=self.main_medium,
                counters=self.counters,
            )
        return engine

    def engine(self, endpoint_id: str) -> EngineKvIndex | None:
        return self._engines.get(endpoint_id)

    def endpoints(self) -> list[str]:
        return list(self._engines)

    def apply(
        self, endpoint_id: str, seq: int, events: Sequence[KvEvent], now: float | None = None
    ) -> None:
        self._engine(endpoint_id).apply(seq, events, self.clock() if now is None else now)

    def apply_batch(self, endpoint_id: str, batch: KvEventBatch, now: float | None = None) -> None:
        """`apply` a decoded message, counting the events it could not understand."""
        for tag, count in batch.skipped.items():
            self.counters.events_skipped[f"type:{tag}"] += count
        self.apply(endpoint_id, batch.seq, batch.events, now)

    def note_decode_error(
        self, endpoint_id: str, seq: int | None = None, now: float | None = None
    ) -> None:
        self._engine(endpoint_id).note_decode_error(seq, self.clock() if now is None else now)

    def note_placed(
        self, endpoint_id: str, hashes: Sequence[int], now: float | None = None
    ) -> None:
        """Call for every placement on an endpoint with events; feeds the "silent" rule."""
        engine = self._engines.get(endpoint_id)
        if engine is not None:
            engine.note_placed(hashes, self.clock() if now is None else now)

    def note_restart(self, endpoint_id: str) -> None:
        """The endpoint's publisher started over: forget its blocks, wait for sequence 0."""
        self.counters.restarts += 1
        self._engine(endpoint_id).resync()

    def note_replay(self, endpoint_id: str, *, pending: bool) -> None:
        """A replay of `endpoint_id`'s missed batches began (`pending`) or ended: meanwhile its
        index reads as a gap (see `KvState`)."""
        engine = self._engines.get(endpoint_id)
        if engine is not None:
            engine.replay_pending = pending

    def resync(self, endpoint_id: str) -> None:
        engine = self._engines.get(endpoint_id)
        if engine is not None:
            engine.resync()

    def forget(self, endpoint_id: str) -> None:
        """The endpoint left (or stopped publishing): drop its index."""
        self._engines.pop(endpoint_id, None)

    def state(self, endpoint_id: str, now: float | None = None) -> KvState:
        engine = self._engines.get(endpoint_id)
        if engine is None:
            return KvState.UNKNOWN
        return engine.state(self.clock() if now is None else now)

    def states(self, now: float | None = None) -> dict[str, KvState]:
        at = self.clock() if now is None else now
        return {endpoint_id: engine.state(at) for endpoint_id, engine in self._engines.items()}

    def next_seq(self, endpoint_id: str) -> int:
        engine = self._engines.get(endpoint_id)
        return 0 if engine is None else engine.next_seq()

    def blocks_held(self, endpoint_id: str) -> int:
        engine = self._engines.get(endpoint_id)
        return 0 if engine is None else engine.blocks_held()

    def partial_answer(
        self, endpoint_id: str, hashes: Sequence[int], now: float | None = None
    ) -> tuple[int, bool] | None:
        """For an engine whose index has a gap (it was joined mid-stream, or batches were
        lost): (leading blocks it is known to hold, whether the next block is known to have
        been evicted). None in any other state."""
        if self._before_read is not None:
            self._before_read(endpoint_id)
        engine = self._engines.get(endpoint_id)
        if engine is None or engine.state(self.clock() if now is None else now) is not KvState.GAP:
            return None
        held = engine.matched_blocks(hashes)
        return held, held < len(hashes) and engine.known_absent(hashes[held])

    def precise_matched_blocks(
        self, endpoint_id: str, hashes: Sequence[int], now: float | None = None
    ) -> int | None:
        """Leading blocks of `hashes` the endpoint holds, or None unless its index is live."""
        if self._before_read is not None:
            self._before_read(endpoint_id)
        engine = self._engines.get(endpoint_id)
        if engine is None or engine.state(self.clock() if now is None else now) is not KvState.LIVE:
            return None
        return engine.matched_blocks(hashes)
