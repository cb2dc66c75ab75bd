"""The router's HTTP/1.1 client for engines (router/engine_http.py), against scripted servers.

Each test's engine is a plain asyncio server writing exactly the bytes the test gives it, with
a pause between pieces so they reach the client in separate reads; the client's side of a
forwarded stream is a recording transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest

from twinroute.router.engine_http import (
    CLIENT_BUFFER_HIGH,
    ClientGoneError,
    EngineConnectionError,
    EngineConnections,
    EngineResponse,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def dechunk(framed: bytes) -> list[bytes]:
    """The chunks of a chunked body (no terminating chunk expected)."""
    chunks = []
    while framed:
        size_line, _, rest = framed.partition(b"\r\n")
        size = int(size_line, 16)
        assert size > 0, "the terminating chunk is the client response's to write"
        assert rest[size : size + 2] == b"\r\n"
        chunks.append(rest[:size])
        framed = rest[size + 2 :]
    return chunks


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def send_slowly(writer: asyncio.StreamWriter, *pieces: bytes) -> None:
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.02)


class RecordingTransport:
    """The client's side of a forwarded stream."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def as_transport(sink: RecordingTransport) -> asyncio.Transport:
    return cast(asyncio.Transport, sink)


async def start_forwarding(
    pool: EngineConnections, address: str, *, buffered: int = 0, closing: bool = False
) -> tuple[EngineResponse, RecordingTransport]:
    """A streamed request as the router makes it: its first chunk read (it must be b"first"),
    the rest forwarded to a recording client (`buffered` bytes unsent, `closing` or not)."""
    response = await pool.post(address, "/", b"{}")
    assert await response.readany() == b"first"
    sink = RecordingTransport()
    sink.buffered = buffered
    sink.closing = closing
    response.forward_to(as_transport(sink), lambda _: None)
    return response, sink


@contextlib.asynccontextmanager
async def engine(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A scripted engine on a free port: its address, and the connections it accepted."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", connections
    finally:
        server.close()


@pytest.fixture
async def pool() -> AsyncIterator[EngineConnections]:
    connections = EngineConnections(connect_timeout_s=2.0)
    yield connections
    connections.close()


async def test_a_stream_split_anywhere_reaches_the_client_in_whole_chunks(
    pool: EngineConnections,
) -> None:
    events = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n", b"data: [DONE]\n\n"]
    body = b"".join(chunk(event) for event in events) + b"0\r\n\r\n"
    # Cut inside a size line, between CR and LF, inside data and inside the last chunk.
    cuts = [1, 4, 5, 20, 31, 40, len(body) - 3]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests on one kept-alive connection
            await read_request(reader)
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            await send_slowly(writer, STREAM_HEAD, *pieces)

    async with engine(script) as (address, accepted):
        for _ in range(2):
            response = await pool.post(address, "/v1/completions", b"{}")
            assert response.status == 200 and response.chunked
            assert response.headers["content-type"] == "text/event-stream"
            first = await response.readany()
            sink = RecordingTransport()
            forwarded: list[bytes] = []
            response.forward_to(as_transport(sink), forwarded.append)
            await response.forwarded(idle_timeout_s=5)
            response.release()
            assert first + b"".join(dechunk(bytes(sink.written))) == b"".join(events)
            assert b"".join(forwarded) == bytes(sink.written)
        assert len(accepted) == 1 and pool.opened == 1


async def test_chunks_that_arrive_before_forwarding_starts_are_framed_again(
    pool: EngineConnections,
) -> None:
    forwarding = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"), chunk(b"second"))
        await forwarding.wait()
        await send_slowly(writer, chunk(b"third") + b"0\r\n\r\n")

    async with engine(script) as (address, _):
        response = await pool.post(address, "/", b"{}")
        assert await response.readany() == b"first"
        await asyncio.sleep(0.2)  # "second" arrives while the caller writes "first"
        sink = RecordingTransport()
        response.forward_to(as_transport(sink), lambda _: None)
        forwarding.set()
        await response.forwarded(idle_timeout_s=5)
        assert dechunk(bytes(sink.written)) == [b"second", b"third"]


async def test_bodies_of_a_known_length_or_up_to_the_close_are_read_whole(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(
            writer,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n",
            b"Content-Length: 11\r\n\r\nhello",
            b" world",
        )
        await read_request(reader)
        await send_slowly(writer, b"HTTP/1.1 200 OK\r\n\r\nuntil", b" the close")

    async with engine(script) as (address, accepted):
        response = await pool.post(address, "/", b"{}")
        assert (response.status, response.chunked) == (503, False)
        assert await response.read() == b"hello world"
        response.release()
        response = await pool.post(address, "/", b"{}")
        assert await response.read() == b"until the close"
        response.release()
        assert len(accepted) == 1  # kept alive after the length, not after the close
        assert pool._reuse(address) is None


async def test_an_engine_that_dies_mid_chunk_passes_on_only_whole_chunks(
    pool: EngineConnections,
) -> None:
    forwarding = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await forwarding.wait()
        await send_slowly(writer, chunk(b"second"), b"a\r\nhal")
        writer.transport.abort()

    async with engine(script) as (address, _):
        response, sink = await start_forwarding(pool, address)
        forwarding.set()
        with pytest.raises(EngineConnectionError) as broke:
            await response.forwarded(idle_timeout_s=5)
        assert broke.value.kind == "disconnected"
        assert bytes(sink.written) == chunk(b"second")
        response.release()
        assert pool._reuse(address) is None


async def test_a_silent_engine_times_the_stream_out(pool: EngineConnections) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await asyncio.sleep(5)

    async with engine(script) as (address, _):
        response, _ = await start_forwarding(pool, address)
        with pytest.raises(TimeoutError):
            await response.forwarded(idle_timeout_s=0.2)
        response.release()


async def test_a_client_that_left_stops_the_stream_and_drops_the_engine_connection(
    pool: EngineConnections,
) -> None:
    engine_saw_close = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"), chunk(b"second"))
        if await reader.read() == b"":
            engine_saw_close.set()

    async with engine(script) as (address, _):
        response, sink = await start_forwarding(pool, address, closing=True)
        with pytest.raises(ClientGoneError):
            await response.forwarded(idle_timeout_s=5)
        await asyncio.wait_for(engine_saw_close.wait(), 5)
        assert sink.written == b""


async def test_a_slow_client_pauses_reading_the_engine_until_it_catches_up(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await send_slowly(writer, *(chunk(b"x" * 100) for _ in range(5)), b"0\r\n\r\n")

    async with engine(script) as (address, _):
        response, sink = await start_forwarding(pool, address, buffered=CLIENT_BUFFER_HIGH + 1)
        relay = asyncio.ensure_future(response.forwarded(idle_timeout_s=5))
        await asyncio.sleep(0.3)
        # Paused after the first forwarded write: the rest waits in the engine's socket.
        assert dechunk(bytes(sink.written)) == [b"x" * 100] and not relay.done()
        sink.buffered = 0
        await asyncio.wait_for(relay, 5)
        assert dechunk(bytes(sink.written)) == [b"x" * 100] * 5


async def test_a_kept_alive_connection_the_engine_closes_as_the_request_goes_is_retried(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: closed unanswered, as idle

    async with engine(script) as (address, accepted):
        for _ in range(2):
            response = await pool.post(address, "/", b"{}")
            assert await response.read() == b"ok"
            response.release()
        assert len(accepted) == 2


async def test_an_engine_that_closes_a_new_connection_unanswered_fails_the_request(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with engine(script) as (address, _):
        with pytest.raises(EngineConnectionError) as failed:
            await pool.post(address, "/", b"{}")
        assert failed.value.kind == "disconnected"


async def test_unreachable_engines_and_garbage_answers_are_connection_errors(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, b"SSH-2.0-OpenSSH\r\n\r\n")

    async with engine(script) as (address, _):
        with pytest.raises(EngineConnectionError) as garbage:
            await pool.post(address, "/", b"{}")
    assert garbage.value.kind == "bad answer"
    with pytest.raises(EngineConnectionError) as unreachable:
        await pool.post(address, "/", b"{}")  # the engine is gone now
    assert unreachable.value.kind == "cannot connect"


async def test_a_malformed_chunk_fails_the_stream(pool: EngineConnections) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + b"zz\r\nwhat\r\n")

    async with engine(script) as (address, _):
        response = await pool.post(address, "/", b"{}")
        with pytest.raises(EngineConnectionError) as broke:
            await response.readany()
        assert broke.value.kind == "bad answer"


async def test_a_stream_that_ends_while_the_client_lags_leaves_a_usable_connection(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await send_slowly(writer, chunk(b"last") + b"0\r\n\r\n")
        await read_request(reader)
        await send_slowly(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

    async with engine(script) as (address, accepted):
        # The client never catches up before the end.
        response, _ = await start_forwarding(pool, address, buffered=CLIENT_BUFFER_HIGH + 1)
        await asyncio.wait_for(response.forwarded(idle_timeout_s=5), 5)
        response.release()
        response = await asyncio.wait_for(pool.post(address, "/", b"{}"), 5)
        assert await asyncio.wait_for(response.read(), 5) == b"next"
        assert len(accepted) == 1


async def test_answers_without_a_body_and_stray_bytes(pool: EngineConnections) -> None:
    answered = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await read_request(reader)
            answered += 1
            if answered == 1:  # 204 has no body; the bytes after it belong to no request
                await send_slowly(writer, b"HTTP/1.1 204 No Content\r\n\r\n", b"stray")
            else:
                await send_slowly(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with engine(script) as (address, accepted):
        response = await pool.post(address, "/", b"{}")
        assert response.status == 204
        assert await asyncio.wait_for(response.read(), 5) == b""
        response.release()
        await asyncio.sleep(0.1)  # the stray bytes arrive on the idle connection
        response = await pool.post(address, "/", b"{}")
        assert await response.read() == b"ok"
        assert len(accepted) == 2  # the out-of-step connection was not reused


async def test_a_malformed_content_length_is_a_bad_answer(pool: EngineConnections) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\nok")

    async with engine(script) as (address, _):
        with pytest.raises(EngineConnectionError) as failed:
            await pool.post(address, "/", b"{}")
        assert failed.value.kind == "bad answer"


@pytest.mark.parametrize("size_line", [b"-6", b"0x1a", b"+1a", b"1_a"])
async def test_chunk_sizes_are_hex_digits_only(pool: EngineConnections, size_line: bytes) -> None:
    # int(..., 16) takes each of these; "-6" once sent the parser round a loop for ever.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"a") + size_line + b"\r\n" + b"x" * 26)

    async with engine(script) as (address, _):
        response = await pool.post(address, "/", b"{}")
        assert await asyncio.wait_for(response.readany(), 5) == b"a"  # whole chunks first
        with pytest.raises(EngineConnectionError) as broke:
            await asyncio.wait_for(response.readany(), 5)
        assert broke.value.kind == "bad answer"


async def test_a_negative_content_length_is_a_bad_answer(pool: EngineConnections) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nhello world")

    async with engine(script) as (address, _):
        with pytest.raises(EngineConnectionError):
            await pool.post(address, "/", b"{}")


async def test_a_kept_alive_connection_closed_while_serving_is_not_retried(
    pool: EngineConnections,
) -> None:
    # The engine read the request and worked on it before its connection went: sending it
    # again would run it twice.
    received: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        received.append(await read_request(reader))
        await asyncio.sleep(0.3)

    async with engine(script) as (address, _):
        response = await pool.post(address, "/", b"{}")
        assert await response.read() == b"ok"
        response.release()
        with pytest.raises(EngineConnectionError) as failed:
            await pool.post(address, "/", b'{"n": 2}')
        assert failed.value.kind == "disconnected"
        await asyncio.sleep(0.1)
    assert [request.endswith(b'{"n": 2}') for request in received] == [False, True]


async def test_time_held_back_by_a_slow_client_is_not_engine_silence(
    pool: EngineConnections,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await send_slowly(writer, *(chunk(b"token") for _ in range(20)), b"0\r\n\r\n")

    async with engine(script) as (address, _):
        response, sink = await start_forwarding(pool, address, buffered=CLIENT_BUFFER_HIGH + 1)
        relay = asyncio.ensure_future(response.forwarded(idle_timeout_s=0.3))
        await asyncio.sleep(0.6)  # the client lags twice the idle limit; the engine does not
        sink.buffered = 0
        await asyncio.wait_for(relay, 5)
        assert dechunk(bytes(sink.written)) == [b"token"] * 20


async def test_nothing_reaches_the_client_from_an_engine_after_its_idle_timeout(
    pool: EngineConnections,
) -> None:
    timed_out = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_slowly(writer, STREAM_HEAD + chunk(b"first"))
        await timed_out.wait()
        await send_slowly(writer, chunk(b"late token"))

    async with engine(script) as (address, _):
        response, sink = await start_forwarding(pool, address)
        with pytest.raises(TimeoutError):
            await response.forwarded(idle_timeout_s=0.2)
        timed_out.set()
        await asyncio.sleep(0.2)
        assert sink.written == b""
