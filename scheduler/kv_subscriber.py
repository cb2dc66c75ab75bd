"""Following every engine's KV-cache events over ZMQ into a `KvEventIndex`.

The wire format, the replay protocol and what each index state means are described in
`scheduler/kv_events.py`; this module holds the sockets (kept apart so that the routing core,
which reads the index, imports no transport).

When batches are read. Not as they arrive: each arrival would wake the event loop on its own
(ZMQ's I/O thread signals the socket's descriptor), and those wake-ups more than doubled the
subscriber's CPU per batch (99-107 against 45-51 us, ZMQ's I/O thread and the 10 us of decoding
and applying included, `benchmarks/hot_path/kv-read-on-pick/`), at about two batches per
request on a router in front of vLLM. An engine's socket is read instead when a decision is
about to read its index (the index's `read_through` hook: a pick sees every batch that reached
the socket before it, which is fresher than a reader callback queued behind the pick would be)
and by a sweep every `sweep_interval_s` (default 0.25 s), which keeps metrics, gap replays and
the silent rule current when no request comes. Batches wait in ZMQ's queue meanwhile (its
high-water mark is raised so that a burst is not dropped). A pick reads an engine's index
several times (its score, the placement, the record check) and the policies that consult every
engine read them all, so a socket is asked at most once a millisecond (`READ_AGAIN_AFTER_S`, by
the index's clock): the reads of one pick agree, and each costs a system call only once. ZMQ
(re)sends the subscription from the application's side too, so after connecting, or after an
engine restarts, the subscription lands at the next read or sweep: `sweep_interval_s` bounds
that delay (batches published before it are missed, and replayed where the engine has a replay
socket).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio
from twinroute.scheduler.kv_events import (
    KvEventBatch,
    KvEventDecodeError,
    KvEventIndex,
    decode_message,
)

logger = logging.getLogger(__name__)

# The end marker of a replay: sequence -1, signed, big-endian.
END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_REPLAY_TIMEOUT_S = 2.0
DEFAULT_SWEEP_INTERVAL_S = 0.25
READ_AGAIN_AFTER_S = 0.001
# vLLM's PUB high-water mark is 100,000 batches; ZMQ's default of 1,000 on our side would
# drop (and so gap) a burst that arrives while a replay is being read.
_RECEIVE_HWM = 100_000
# Plain ints: testing a reading against pyzmq's flag enums builds an enum each time, so
# asking a socket whether a batch waits cost 2.2 us instead of 1.5
# (`benchmarks/hot_path/kv-read-on-pick/micro.py`).
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_AnySocket = TypeVar("_AnySocket", bound="zmq.Socket[Any]")


@dataclass(frozen=True, slots=True)
class KvEventSource:
    """Where one engine publishes: its PUB address and, if configured, its replay address."""

    address: str  # tcp://ENGINE:5557 for an engine configured with endpoint tcp://*:5557
    replay_address: str | None = None  # tcp://ENGINE:PORT for its replay_endpoint
    # The publisher's topic; "" (vLLM's default) follows every topic it sends.
    topic: str = ""


class KvEventSubscriber:
    """Follows every engine's KV events into a `KvEventIndex`; start, set endpoints, stop.

    `set_endpoints` may be called at any time (before `start` too) and never blocks: a new or
    changed source gets a fresh socket and a fresh index entry, a removed one is closed and its
    index forgotten. `stop` cancels every task and closes every socket before it returns.
    While running it is the index's `read_through` hook (module docstring).
    """

    def __init__(
        self,
        index: KvEventIndex,
        *,
        replay_timeout_s: float = DEFAULT_REPLAY_TIMEOUT_S,
        sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if replay_timeout_s <= 0:
            raise ValueError(f"replay_timeout_s must be positive, got {replay_timeout_s}")
        if sweep_interval_s <= 0:
            raise ValueError(f"sweep_interval_s must be positive, got {sweep_interval_s}")
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self._given_context = context
        self._context: zmq.asyncio.Context | None = None
        self._sources: dict[str, KvEventSource] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Each followed endpoint's live stream, read on demand and by the sweep.
        self._live: dict[str, _LiveBatches] = {}
        self._sweep: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._sockets: set[zmq.Socket[Any]] = set()
        self.messages_received = 0
        self.duplicates_skipped = 0
        self.replays_succeeded = 0
        self.replays_failed = 0

    @property
    def running(self) -> bool:
        return self._context is not None

    def open_sockets(self) -> int:
        return len(self._sockets)

    def sources(self) -> dict[str, KvEventSource]:
        return dict(self._sources)

    def set_endpoints(self, sources: Mapping[str, KvEventSource | None]) -> None:
        """Follow exactly these endpoints (None: the endpoint publishes no events)."""
        wanted = {endpoint_id: src for endpoint_id, src in sources.items() if src is not None}
        for endpoint_id in list(self._sources):
            if wanted.get(endpoint_id) != self._sources[endpoint_id]:
                self._drop(endpoint_id)
        for endpoint_id in sources:
            if endpoint_id not in wanted:
                self.index.forget(endpoint_id)
        for endpoint_id, source in wanted.items():
            if endpoint_id not in self._sources:
                self._sources[endpoint_id] = source
                if self.running:
                    self._launch(endpoint_id, source)

    async def start(self) -> None:
        if self.running:
            return
        given = self._given_context
        self._context = zmq.asyncio.Context() if given is None else given
        for endpoint_id, source in self._sources.items():
            self._launch(endpoint_id, source)
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_now_and_then())
        self.index.read_through(self.read_now)

    def read_now(self, endpoint_id: str) -> None:
        """Apply whatever has reached `endpoint_id`'s socket (nothing if it is not followed),
        unless it was read less than `READ_AGAIN_AFTER_S` ago (module docstring)."""
        live = self._live.get(endpoint_id)
        if live is None:
            return
        now = self.index.clock()
        if now - live.read_at < READ_AGAIN_AFTER_S:
            return
        live.read_at = now
        live.drain()

    async def _sweep_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            for live in list(self._live.values()):
                try:
                    live.drain()
                except Exception:  # a bug here must not stop the sweep for every engine
                    logger.exception("KV event sweep of %s failed", live.endpoint_id)

    async def stop(self) -> None:
        self.index.read_through(None)
        tasks = [*self._tasks.values(), *self._retiring]
        if self._sweep is not None:
            tasks.append(self._sweep)
            self._sweep = None
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retiring.clear()
        for socket in list(self._sockets):  # only if a task died before its finally ran
            self._close(socket)
        context, self._context = self._context, None
        if context is not None and context is not self._given_context:
            context.destroy(linger=0)

    def _drop(self, endpoint_id: str) -> None:
        del self._sources[endpoint_id]
        # No read of the old socket from here on (its task's cancellation also stops them):
        # one would bring the forgotten index back.
        self._live.pop(endpoint_id, None)
        self.index.forget(endpoint_id)
        task = self._tasks.pop(endpoint_id, None)
        if task is not None:
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _launch(self, endpoint_id: str, source: KvEventSource) -> None:
        self._tasks[endpoint_id] = asyncio.get_running_loop().create_task(
            self._follow(endpoint_id, source), name=f"kv-events:{endpoint_id}"
        )

    def _socket(self, kind: int, address: str) -> zmq.asyncio.Socket:
        assert self._context is not None
        return self._configured(self._context.socket(kind), address)

    def _configured(self, socket: _AnySocket, address: str) -> _AnySocket:
        self._sockets.add(socket)
        socket.setsockopt(zmq.LINGER, 0)
        if "[" in address:
            socket.setsockopt(zmq.IPV6, 1)
        return socket

    def _close(self, socket: zmq.Socket[Any]) -> None:
        self._sockets.discard(socket)
        socket.close(linger=0)

    async def _follow(self, endpoint_id: str, source: KvEventSource) -> None:
        # A plain (not asyncio) SUB socket, read without blocking by `read_now` and the sweep
        # (module docstring): no future, task or loop wake-up per message. The task only sleeps
        # here until a replay is needed or the socket fails.
        assert self._context is not None
        sub = self._configured(zmq.Socket(self._context, zmq.SUB), source.address)
        loop = asyncio.get_running_loop()
        live: _LiveBatches | None = None
        try:
            sub.setsockopt(zmq.RCVHWM, _RECEIVE_HWM)
            sub.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            sub.connect(source.address)
            live = self._live[endpoint_id] = _LiveBatches(self, endpoint_id, source, sub, loop)
            while True:
                # What queued during a replay is read now, not at the next read or sweep.
                live.drain()
                batch, expected = await live.gap
                try:
                    replayed_through = await self._replay(endpoint_id, source, expected)
                    if batch.seq <= replayed_through:
                        self.duplicates_skipped += 1
                    else:
                        self.index.apply_batch(endpoint_id, batch)
                finally:
                    self.index.note_replay(endpoint_id, pending=False)
                live.after_replay(replayed_through)
        except zmq.ZMQError as error:
            # A bad address: this endpoint's index can no longer be trusted (unknown from now
            # on, so picks fall back to the approximate index); the others carry on.
            logger.error("KV event subscription to %s failed: %s", endpoint_id, error)
            self.index.resync(endpoint_id)
        finally:
            # A replaced source's new task may already have put its own stream here.
            if live is not None and self._live.get(endpoint_id) is live:
                del self._live[endpoint_id]
            self._close(sub)

    async def _replay(self, endpoint_id: str, source: KvEventSource, start: int) -> int:
        """Apply every batch from `start` that the replay socket still has; the last seq seen."""
        assert source.replay_address is not None
        dealer = self._socket(zmq.DEALER, source.replay_address)
        last = -1
        first: int | None = None
        failure = ""
        try:
            # One deadline for the whole exchange: a DEALER's send waits for a peer, so an
            # unreachable replay socket would otherwise hold this endpoint's stream forever.
            async with asyncio.timeout(self.replay_timeout_s):
                dealer.connect(source.replay_address)
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while True:
                    frames = await dealer.recv_multipart()
                    if frames and frames[0] == b"":
                        frames = frames[1:]  # the DEALER/ROUTER envelope delimiter
                    if len(frames) >= 2 and frames[1] == END_SEQ:
                        break
                    try:
                        batch = decode_message(frames)
                    except KvEventDecodeError as error:
                        self.index.note_decode_error(endpoint_id, error.seq)
                        continue
                    last = batch.seq
                    if batch.seq < self.index.next_seq(endpoint_id):
                        continue
                    if first is None:
                        first = batch.seq
                    self.index.apply_batch(endpoint_id, batch)
        except TimeoutError:
            failure = f"no end of replay within {self.replay_timeout_s} s"
        except zmq.ZMQError as error:
            failure = f"{type(error).__name__}: {error}"
        finally:
            self._close(dealer)
        if not failure and first != start:
            held = "nothing" if first is None else f"only from {first}"
            failure = f"the replay buffer holds {held}, {start} was needed"
        if failure:
            self.replays_failed += 1
            logger.warning("KV event replay for %s failed: %s", endpoint_id, failure)
        else:
            self.replays_succeeded += 1
        return last


class _LiveBatches:
    """One endpoint's live stream, read from its SUB socket when asked (`drain`).

    `drain` handles every message waiting, in order, as `_follow` used to one by one: skip
    what a replay already applied, notice a publisher restart, apply the rest. A batch past a
    gap, when the engine has a replay socket, resolves `gap` with (batch, first missing seq)
    and stops reading until `_follow` has replayed (the socket keeps queueing meanwhile); a
    ZMQ error fails `gap`, which ends `_follow`.
    """

    def __init__(
        self,
        subscriber: KvEventSubscriber,
        endpoint_id: str,
        source: KvEventSource,
        socket: zmq.Socket[bytes],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.subscriber = subscriber
        self.endpoint_id = endpoint_id
        self.source = source
        self.topic = source.topic.encode()
        self.socket = socket
        self.loop = loop
        self.gap: asyncio.Future[tuple[KvEventBatch, int]] = loop.create_future()
        # When a decision's read last asked the socket (`KvEventSubscriber.read_now`).
        self.read_at = -math.inf
        # Set after a replay: live copies of the batches it applied are duplicates, until
        # the first live batch past it (PUB delivers in order).
        self.replayed_through = -1

    def after_replay(self, replayed_through: int) -> None:
        self.replayed_through = replayed_through
        self.gap = self.loop.create_future()

    def drain(self) -> None:
        if self.gap.done():
            return  # a replay is due: the rest waits in the socket
        socket = self.socket
        try:
            while cast(int, socket.getsockopt(_EVENTS)) & _POLLIN:
                self._handle(socket.recv_multipart(zmq.NOBLOCK))
                if self.gap.done():
                    return
        except zmq.Again:
            return
        except Exception as error:  # ends `_follow`, as a raise there used to
            self.gap.set_exception(error)

    def _handle(self, frames: list[bytes]) -> None:
        subscriber, endpoint_id, index = self.subscriber, self.endpoint_id, self.subscriber.index
        subscriber.messages_received += 1
        try:
            batch = decode_message(frames)
        except KvEventDecodeError as error:
            index.note_decode_error(endpoint_id, error.seq)
            logger.warning("undecodable KV events from %s: %s", endpoint_id, error)
            return
        if self.topic and batch.topic != self.topic:
            return  # a longer topic that only shares our prefix
        if self.replayed_through >= 0:
            if batch.seq <= self.replayed_through:
                subscriber.duplicates_skipped += 1
                return
            self.replayed_through = -1
        expected = index.next_seq(endpoint_id)
        if batch.seq < expected:
            logger.info("KV event publisher of %s restarted", endpoint_id)
            index.note_restart(endpoint_id)
            expected = 0
        if batch.seq > expected and self.source.replay_address is not None:
            index.note_replay(endpoint_id, pending=True)
            self.gap.set_result((batch, expected))
            return
        index.apply_batch(endpoint_id, batch)
