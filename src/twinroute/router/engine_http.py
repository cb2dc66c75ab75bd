"""HTTP/1.1 to the engines, with a started stream spliced to the client from the socket's callback.

Most of a router's CPU on real engines goes to relaying streams: a vLLM answer is one HTTP
chunk per token. Through aiohttp's client every chunk wakes the relaying task (parser,
stream reader, future, coroutine step) and is framed again on the way out. Here the engine's
socket is read by a plain `asyncio.Protocol`: once the relay has sent the client the first
chunk (through aiohttp, with the response's headers), `EngineResponse.forward_to` makes every
further complete chunk go straight from the engine socket's `data_received` to the client's
transport, framing and all, with no task woken until the stream ends. In front of two real
vLLM engines that took 0.4-0.56 ms (15-18%) off the router's CPU per 8-token stream, and on
200-token streams about a quarter (BENCHMARKS.md, `benchmarks/hot_path/splice/`).

Only whole chunks are passed on, so a stream that breaks mid-chunk leaves the client's framing
intact for the relay's error event; the engine's terminating chunk is held back for the
client's response to write its own. Everything else (the first chunk, non-streamed answers,
error answers, bodies of a known length) is read through `readany()` / `read()`, de-chunked,
like aiohttp's `content`.

Connections are kept alive per engine and reused most recent first; one idle for longer than
`idle_keep_s` after the engine's last byte is closed rather than reused (uvicorn, vLLM's
server, drops idle ones after 5 s, and a request written into a connection the engine is
closing is lost). A reused connection that closes within `STALE_CLOSE_WINDOW_S` of the
request, before any answer, is retried once on a fresh one: the engine closed it idle and
never saw the request. A later close may have cut a request the engine was working on, and
is the engine's failure (never sent twice).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import cast

_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# A reused connection that closes this soon after a request was written on it was closed by
# the engine as idle (uvicorn's keep-alive timer), not while serving the request: retried.
STALE_CLOSE_WINDOW_S = 0.05
# A response head larger than this is not an engine's answer.
MAX_HEAD_BYTES = 64 * 1024
# The client's transport holding more than HIGH bytes unsent pauses reading the engine;
# below LOW it resumes (a slow client never makes the router buffer a whole answer).
CLIENT_BUFFER_HIGH = 256 * 1024
CLIENT_BUFFER_LOW = 64 * 1024
_BACKPRESSURE_POLL_S = 0.005


class EngineConnectionError(ConnectionError):
    """The engine could not be reached, closed the connection early, or answered garbage.

    `kind` says which in words fit for a client answer (never the engine's address)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class EngineConnectTimeoutError(EngineConnectionError, TimeoutError):
    """No connection within the connect timeout (counted as a timeout, like aiohttp's)."""


class ClientGoneError(ConnectionResetError):
    """The client's connection closed while its stream was being forwarded."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one exchange at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.released_at = 0.0
        self.sent_at = 0.0
        self.lost_at = 0.0
        self._begin()

    def _begin(self) -> None:
        """Ready for the next exchange."""
        self._head = bytearray()
        self._head_waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.reusable = True
        self.body_chunked = False
        self.received_any = False
        self._mode = "head"  # head | chunked | length | until_close | ended | failed
        self._remaining = 0  # body bytes still due (length mode)
        # Bytes of an incomplete chunk, kept until `_need` of them are here (a large chunk
        # arriving in many reads is parsed once, not at every read).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = 0
        self._pieces: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.sink: asyncio.Transport | None = None
        self._on_forward: Callable[[bytes], None] | None = None
        self.paused = False
        self.last_data_at = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a request goes out in one write; never held back by Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_at = time.monotonic()
        if self._mode == "until_close":
            self._mode = "ended"
            self._wake()
        elif self._mode not in ("ended", "failed"):
            self._fail(EngineConnectionError("disconnected", str(exc or "closed by the engine")))

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_data_at = time.monotonic()
        if self._mode == "head":
            self._head += data
            if not self._parse_head():
                return
            data = self._take_pending()
            if not data:
                return
        if self._mode == "chunked":
            if self._pending:
                self._pending.append(data)
                self._pending_size += len(data)
                if self._pending_size < self._need:
                    return
                data = self._take_pending()
            self._chunks(data)
        elif self._mode == "length":
            if len(data) >= self._remaining:
                data = data[: self._remaining]
                self._mode = "ended"
            self._remaining -= len(data)
            if data:
                self._pieces.append(data)
            self._wake()
        elif self._mode == "until_close":
            self._pieces.append(data)
            self._wake()
        elif self._mode == "ended":  # bytes nobody asked for: this connection is not in step
            self.abort()

    # -- parsing ------------------------------------------------------------------------------

    def _parse_head(self) -> bool:
        """Whether the head is complete (the mode is then set and `_pending` holds the
        body bytes that came with it)."""
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._fail(EngineConnectionError("bad answer", "response head too large"))
            return False
        lines = bytes(self._head[:end]).split(b"\r\n")
        rest = bytes(self._head[end + 4 :])
        version, _, status = lines[0].partition(b" ")
        try:
            self.status = int(status[:3])
        except ValueError:
            self._fail(EngineConnectionError("bad answer", f"status line {lines[0][:80]!r}"))
            return False
        if not version.startswith(b"HTTP/1."):
            self._fail(EngineConnectionError("bad answer", f"status line {lines[0][:80]!r}"))
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self._head = bytearray(rest)
            return self._parse_head()
        self.headers = headers
        self._head = bytearray()
        self._keep(rest, need=0)
        self.reusable = version == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if self.status in (204, 304):  # no body, whatever the headers say
            self._mode = "ended"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
            self.body_chunked = True
        elif "content-length" in headers:
            if not headers["content-length"].isdigit():  # int() would take "-3" or "1_0"
                self._fail(EngineConnectionError("bad answer", "malformed Content-Length"))
                return False
            self._remaining = int(headers["content-length"])
            self._mode = "length" if self._remaining else "ended"
        else:
            self._mode = "until_close"
            self.reusable = False
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(None)
        return True

    def _chunks(self, data: bytes) -> None:
        """Take every complete chunk from `data`; keep the rest for the next read."""
        position = 0
        size = len(data)
        pieces: list[bytes] = []
        while True:
            line_end = data.find(b"\r\n", position)
            if line_end < 0:
                need = size - position + 1
                break
            size_field = data[position:line_end].split(b";", 1)[0].strip(b" \t")
            if not _HEX_SIZE.fullmatch(size_field):  # int() would take "-6" or "0x1a"
                self._deliver(data, pieces, forwarded_end=position)
                self._fail(EngineConnectionError("bad answer", "malformed chunk size"))
                return
            length = int(size_field, 16)
            if length == 0:  # the last chunk, then optional trailers and an empty line
                if data.find(b"\r\n\r\n", line_end) < 0:
                    need = line_end + 4 - position
                    break
                self._deliver(data, pieces, forwarded_end=position)
                if self._mode == "chunked":
                    self._mode = "ended"
                    self._wake()
                return
            chunk_end = line_end + 2 + length
            if size < chunk_end + 2:
                need = chunk_end + 2 - position
                break
            if data[chunk_end : chunk_end + 2] != b"\r\n":
                self._deliver(data, pieces, forwarded_end=position)
                self._fail(EngineConnectionError("bad answer", "chunk not terminated"))
                return
            if self.sink is None:
                pieces.append(data[line_end + 2 : chunk_end])
            position = chunk_end + 2
        self._deliver(data, pieces, forwarded_end=position)
        if position < size:
            self._keep(data[position:], need=need)

    def _keep(self, data: bytes, *, need: int) -> None:
        self._pending = [data] if data else []
        self._pending_size = len(data)
        self._need = need

    def _take_pending(self) -> bytes:
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._keep(b"", need=0)
        return data

    def _deliver(self, data: bytes, pieces: list[bytes], *, forwarded_end: int) -> None:
        """Hand complete chunks on: raw to the client's transport when forwarding, else
        de-chunked to `readany()`."""
        if self.sink is None:
            if pieces:
                self._pieces.append(b"".join(pieces))
                self._wake()
            return
        if forwarded_end == 0:
            return
        framed = data if forwarded_end == len(data) else data[:forwarded_end]
        if self.sink.is_closing():
            self._fail(ClientGoneError("the client went away"))
            self.abort()
            return
        self.sink.write(framed)
        if self._on_forward is not None:
            self._on_forward(framed)
        if self.sink.get_write_buffer_size() > CLIENT_BUFFER_HIGH and self.transport:
            self.transport.pause_reading()
            self.paused = True
            self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._mode in ("ended", "failed"):
            return
        self._mode = "failed"
        self.error = error
        self.reusable = False
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(error)
            # Retrieved by whoever awaits the head; never "exception was never retrieved".
            self._head_waiter.exception()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- what EngineResponse uses -------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._mode == "ended"

    @property
    def has_pieces(self) -> bool:
        return bool(self._pieces)

    def send(self, request: bytes) -> asyncio.Future[None]:
        """Write one request; the future is done when its answer's head has arrived."""
        assert self.transport is not None
        self._begin()
        self._head_waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.monotonic()
        self.transport.write(request)
        return self._head_waiter

    async def wait(self) -> None:
        """Until something changes: data, the end, a failure, or a pause."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes | None:
        """Body bytes received and not taken yet; b"" at the end; None when there are none
        yet. Raises the exchange's error."""
        if self._pieces:
            return self._take_pieces()
        if self._mode == "failed":
            assert self.error is not None
            raise self.error
        if self._mode == "ended":
            return b""
        return None

    def _take_pieces(self) -> bytes:
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        return data

    def forward(self, sink: asyncio.Transport, on_forward: Callable[[bytes], None]) -> None:
        self.sink = sink
        self._on_forward = on_forward
        self.last_data_at = time.monotonic()  # the idle limit runs from here
        if self._pieces:  # arrived since the caller's last readany(): framed again
            data = self._take_pieces()
            sink.write(b"%x\r\n%b\r\n" % (len(data), data))
            on_forward(data)
        if self._pending and self._mode == "chunked":
            self._chunks(self._take_pending())

    def resume(self) -> None:
        self.paused = False
        # The engine's silence is not observable while its socket is not read.
        self.last_data_at = time.monotonic()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


class EngineResponse:
    """An engine's answer: status and headers (lower-case names), then its body."""

    def __init__(self, connection: _Connection, pool: EngineConnections) -> None:
        self._connection = connection
        self._pool: EngineConnections | None = pool
        self.status = connection.status
        self.headers = connection.headers

    @property
    def content(self) -> EngineResponse:
        """`readany()` here, as on aiohttp's response.content."""
        return self

    @property
    def read_to_end(self) -> bool:
        """Whether the whole body has arrived and been taken (`readany()` has only b"" left)."""
        connection = self._connection
        return connection.ended and not connection.has_pieces

    @property
    def chunked(self) -> bool:
        """Whether the rest of the body comes in HTTP chunks (what `forward_to` passes on)."""
        return self._connection.body_chunked

    async def readany(self) -> bytes:
        """The next body bytes as they arrive, de-chunked; b"" at the end."""
        connection = self._connection
        while True:
            data = connection.take()
            if data is not None:
                return data
            await connection.wait()

    async def read(self) -> bytes:
        parts = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)

    def forward_to(self, sink: asyncio.Transport, on_forward: Callable[[bytes], None]) -> None:
        """Pass every complete chunk from now on straight to `sink`, framed as the engine
        framed it, calling `on_forward` with each write; the last chunk is not passed on.
        Bytes already taken by `readany()` are the caller's to send. Needs `chunked`."""
        assert self.chunked, "forward_to needs a chunked body"
        self._connection.forward(sink, on_forward)

    async def forwarded(self, *, idle_timeout_s: float) -> None:
        """Until the forwarded stream ends. Raises the engine's failure, `ClientGoneError`,
        or TimeoutError when the engine sent nothing for `idle_timeout_s`."""
        connection = self._connection
        sink = connection.sink
        assert sink is not None, "forward_to first"
        while True:
            if connection.take() == b"":
                return
            if connection.paused:
                if sink.is_closing():
                    connection.abort()
                    raise ClientGoneError("the client went away")
                if sink.get_write_buffer_size() <= CLIENT_BUFFER_LOW:
                    connection.resume()
                else:
                    await asyncio.sleep(_BACKPRESSURE_POLL_S)
                continue
            silent_s = time.monotonic() - connection.last_data_at
            if silent_s >= idle_timeout_s:
                # Nothing more from this engine may reach the client after the error event
                # and the end the relay writes next.
                connection.abort()
                connection.sink = None
                raise TimeoutError(f"no data for {idle_timeout_s:g} s")
            try:
                async with asyncio.timeout(idle_timeout_s - silent_s):
                    await connection.wait()
            except TimeoutError:
                continue  # checked above, against the last data's time

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool when its body was
        read to the end and the engine keeps it alive, else it is closed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        connection = self._connection
        if connection.ended and connection.reusable and not connection.closed:
            if connection.paused:  # the stream ended while a slow client held it back
                connection.resume()
            pool.put_back(connection)
        else:
            connection.abort()

    def close(self) -> None:
        """Drop the connection (the engine sees the request's client go and aborts it)."""
        self._pool = None
        self._connection.abort()


class EngineConnections:
    """Keep-alive HTTP/1.1 connections to the engines, by address (`host:port`)."""

    def __init__(
        self, *, connect_timeout_s: float, idle_keep_s: float = 4.0, idle_per_engine: int = 64
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle_keep_s = idle_keep_s
        self._idle_per_engine = idle_per_engine
        self._idle: dict[str, list[_Connection]] = {}
        self.opened = 0  # connections opened in all (reuse shows as opened < requests)

    async def post(self, address: str, path: str, body: bytes) -> EngineResponse:
        """Send a JSON POST and wait for the answer's head. Cancel it (a deadline) and the
        connection is dropped."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        connection = self._reuse(address)
        if connection is not None:
            try:
                await connection.send(request)
                return EngineResponse(connection, self)
            except EngineConnectionError:
                connection.abort()
                closed_after_s = connection.lost_at - connection.sent_at
                if connection.received_any or not 0 <= closed_after_s <= STALE_CLOSE_WINDOW_S:
                    raise
                # Closed idle by the engine as the request went out: it never saw it. (One
                # closed later may have been working on it: that is the engine's failure.)
            except BaseException:
                connection.abort()
                raise
        connection = await self._open(address)
        try:
            await connection.send(request)
        except BaseException:
            connection.abort()
            raise
        return EngineResponse(connection, self)

    def _reuse(self, address: str) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.closed or connection.transport is None:
                continue
            if connection.transport.is_closing() or (
                now - connection.released_at > self._idle_keep_s
            ):
                connection.abort()
                continue
            return connection
        if idle is not None:  # engines come and go: forget the ones with nothing kept
            del self._idle[address]
        return None

    async def _open(self, address: str) -> _Connection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(address), host.strip("[]"), int(port)
                )
        except TimeoutError:
            raise EngineConnectTimeoutError(
                "timed out", f"connecting to {address} took over {self._connect_timeout_s:g} s"
            ) from None
        except (OSError, ValueError) as error:
            raise EngineConnectionError("cannot connect", f"{address}: {error!r}") from None
        self.opened += 1
        return connection

    def put_back(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.address, [])
        if len(idle) >= self._idle_per_engine:
            connection.abort()
            return
        # The engine's keep-alive timer runs from its last byte, not from our release.
        connection.released_at = connection.last_data_at or time.monotonic()
        idle.append(connection)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()
