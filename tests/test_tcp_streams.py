"""Stream calls on the TCP transport, over real sockets: the frames, flow control, a hostile peer, restarts.

The transport-independent behaviour (the three kinds, errors, deadline, drain) is tests/test_streaming.py's;
this file checks the wire (docs/protocol.md, "Streams") and that memory stays bounded whatever the peer does.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from rawtcp import RawClient, raw_opener
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.interface import CallKind
from kubrpc.transports._frames import (
    FLAG_CLIENT_STREAMS,
    FLAG_REFUSED,
    FLAG_SERVER_STREAMS,
    PREFACE,
    STREAM_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_request,
    encode_window_update,
    parse_goaway,
)
from kubrpc.transports._streams import MESSAGE_OVERHEAD
from kubrpc.transports._tcp_client import TcpConnection
from kubrpc.transports._tcp_server import _STREAM_ENTRY, TcpListener

BIDI = FLAG_CLIENT_STREAMS | FLAG_SERVER_STREAMS


@kubrpc.interface(name="test.Sink")
class Sink(Protocol):
    async def hold(self, values: AsyncIterable[bytes]) -> int: ...


class SinkImpl:
    """A handler that never reads the messages sent to it (until released)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def hold(self, values: AsyncIterable[bytes]) -> int:
        self.started.set()
        await self.release.wait()
        return sum([1 async for _ in values])


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[TcpListener, kubrpc.Server, FeedImpl, SinkImpl, Any]]:
    """Feed and Sink on tcp://127.0.0.1:0: (listener, server, feed, sink, open_raw)."""
    server = kubrpc.Server(**options)
    feed, sink = FeedImpl(), SinkImpl()
    server.register(Feed, feed)
    server.register(Sink, sink)
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0"))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        yield listener, server, feed, sink, raw_opener(stack, "127.0.0.1", port, skip_settings=True)


def stream_request(stream: int, path: str, args: dict[str, Any], flags: int, timeout_ms: int = 0) -> bytes:
    return encode_request(stream, path, orjson.dumps(args), timeout_ms, b"", flags)


def data(stream: int, payload: bytes) -> bytes:
    return encode_frame(FrameType.DATA, stream, payload)


async def settle(check: Any, rounds: int = 500) -> bool:
    """Poll `check` (a hang guard, not a timing assertion)."""
    for _ in range(rounds):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


def server_streams(listener: TcpListener) -> int:
    return sum(len(c.streams) for c in listener.connections)


# -- the frames, as docs/protocol.md shows them --------------------------------------------------------------


@pytest.mark.anyio
async def test_a_server_stream_on_the_wire_is_the_documented_bytes() -> None:
    async with serving() as (_, _, _, _, open_raw):
        request = stream_request(1, "test.Feed/ticks", {"n": 2}, FLAG_SERVER_STREAMS)
        assert request == bytes.fromhex(
            "00000020 01 04 00000001 00000000 000F 746573742E466565642F7469636B73 00000000 7B226E223A327D"
        )
        raw: RawClient = await open_raw(PREFACE + request)
        assert await raw.frame() == Frame(FrameType.WINDOW_UPDATE, 0, 1, b"\0\0\0\0")  # accepted, no credit to send
        assert await raw.frame() == Frame(FrameType.DATA, 0, 1, b"0")
        assert await raw.frame() == Frame(FrameType.DATA, 0, 1, b"1")
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 1, b"")  # the end, OK
        assert encode_window_update(1, 0) == bytes.fromhex("00000004 0A 00 00000001 00000000")
        assert data(1, b"0") == bytes.fromhex("00000001 08 00 00000001 30")


@pytest.mark.anyio
async def test_a_bidirectional_stream_with_half_close() -> None:
    async with serving() as (_, server, _, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(3, "test.Feed/chat", {}, BIDI))
        accept = await raw.frame()
        assert accept == Frame(FrameType.WINDOW_UPDATE, 0, 3, struct.pack(">I", STREAM_WINDOW))
        await raw.send(data(3, b'"ab"') + data(3, b'"cd"') + encode_frame(FrameType.END, 3))
        assert await raw.frame() == Frame(FrameType.DATA, 0, 3, b'"AB"')
        assert await raw.frame() == Frame(FrameType.DATA, 0, 3, b'"CD"')
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 3, b"")
        # a client stream's result is the RESPONSE payload
        await raw.send(stream_request(5, "test.Feed/total", {}, FLAG_CLIENT_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        await raw.send(data(5, b"1") + data(5, b"2") + encode_frame(FrameType.END, 5))
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 5, b"3")
        assert await settle(lambda: server._pending_bytes == 0)


@pytest.mark.anyio
async def test_errors_end_a_stream_as_error_frames() -> None:
    async with serving() as (_, _, _, _, open_raw):
        raw: RawClient = await open_raw(
            PREFACE + stream_request(1, "test.Feed/fail_after", {"n": 1, "code": "not_found"}, FLAG_SERVER_STREAMS)
        )
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        assert await raw.frame() == Frame(FrameType.DATA, 0, 1, b"0")
        error = await raw.frame()
        assert error.type == FrameType.ERROR and orjson.loads(error.payload)["code"] == "not_found"
        # a stream of the wrong kind, and a unary method called as a stream: unimplemented, saying why
        await raw.send(stream_request(3, "test.Feed/ticks", {"n": 1}, BIDI))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        error = await raw.frame()
        assert orjson.loads(error.payload)["code"] == "unimplemented" and "server stream" in error.payload.decode()
        await raw.send(stream_request(5, "test.Feed/add", {"a": 1, "b": 2}, FLAG_SERVER_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        assert orjson.loads((await raw.frame()).payload)["code"] == "unimplemented"
        # the deadline of the REQUEST covers the whole stream
        await raw.send(stream_request(7, "test.Feed/forever", {"size": 1}, FLAG_SERVER_STREAMS, timeout_ms=100))
        while (frame := await raw.frame()).type != FrameType.ERROR:
            assert frame.stream == 7 and frame.type in (FrameType.WINDOW_UPDATE, FrameType.DATA)
            if frame.type == FrameType.DATA:
                await raw.send(encode_window_update(7, 1 + MESSAGE_OVERHEAD))
        assert orjson.loads(frame.payload)["code"] == "deadline_exceeded"


@pytest.mark.anyio
async def test_data_beyond_the_window_is_a_protocol_error() -> None:
    async with serving() as (listener, server, _, _, open_raw):
        # a server stream grants the client no credit: any DATA is over it
        raw: RawClient = await open_raw(
            PREFACE + stream_request(1, "test.Feed/forever", {"size": 1}, FLAG_SERVER_STREAMS)
        )
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        await raw.send(data(1, b"x"))
        assert await raw.closed()
        goaway = next(f for f in raw.frames if f.type == FrameType.GOAWAY)
        assert "whose client streams no messages" in parse_goaway(goaway.payload)[1]
        # a client stream whose handler does not read: the window, then nothing more; DATA after END
        raw = await open_raw(PREFACE + stream_request(1, "test.Sink/hold", {}, FLAG_CLIENT_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        message = b"q" * (STREAM_WINDOW // 4)
        await raw.send(data(1, message) * 4)  # the last one takes the credit below zero: allowed
        await raw.send(encode_frame(FrameType.END, 1) + data(1, b'"late"'))
        assert await raw.closed()
        assert any("after END" in parse_goaway(f.payload)[1] for f in raw.frames if f.type == FrameType.GOAWAY)
        raw = await open_raw(PREFACE + stream_request(1, "test.Sink/hold", {}, FLAG_CLIENT_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        await raw.send(data(1, message) * 4 + data(1, b"1"))  # one message beyond the window
        assert await raw.closed()
        assert any("window" in parse_goaway(f.payload)[1] for f in raw.frames if f.type == FrameType.GOAWAY)
        assert await settle(lambda: not listener.connections and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_a_message_larger_than_the_window_still_goes() -> None:
    async with serving() as (_, _, _, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(1, "test.Feed/chat", {}, BIDI))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        big = b'"' + b"y" * (2 * STREAM_WINDOW) + b'"'
        await raw.send(data(1, big) + encode_frame(FrameType.END, 1))
        frame = await raw.frame()
        while frame.type == FrameType.WINDOW_UPDATE:
            frame = await raw.frame()
        assert frame == Frame(FrameType.DATA, 0, 1, big.upper())
        assert (await raw.frame()).type == FrameType.RESPONSE
    async with serving() as (listener, _, _, _, _), kubrpc.connect(listener.url) as channel:
        chat = channel.stub(Feed, timeout=10).chat

        async def words() -> AsyncIterator[str]:
            for n in (3 * STREAM_WINDOW, 1, STREAM_WINDOW):
                yield "z" * n

        assert [len(w) async for w in chat(words())] == [3 * STREAM_WINDOW, 1, STREAM_WINDOW]


@pytest.mark.anyio
async def test_refused_streams_are_flagged_not_delivered() -> None:
    async with serving(max_concurrent_calls=1) as (_, _, _, _, open_raw):
        raw: RawClient = await open_raw(
            PREFACE + stream_request(1, "test.Feed/forever", {"size": 1}, FLAG_SERVER_STREAMS)
        )
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE
        await raw.send(stream_request(3, "test.Feed/ticks", {"n": 1}, FLAG_SERVER_STREAMS))
        while (frame := await raw.frame()).stream != 3:
            pass
        assert frame.type == FrameType.ERROR and frame.flags & FLAG_REFUSED
        assert orjson.loads(frame.payload)["code"] == "resource_exhausted"
        # a unary call refused the same way carries no flag (nothing changes for old clients)
        await raw.send(encode_request(5, "test.Feed/add", b'{"a":1,"b":2}'))
        while (frame := await raw.frame()).stream != 5:
            pass
        assert frame.type == FrameType.ERROR and frame.flags == 0


@pytest.mark.anyio
async def test_the_client_opens_elsewhere_when_a_stream_is_refused() -> None:
    # A takes one call per connection: once a stream runs there, it refuses new ones (REFUSED), which go to B.
    async with serving(max_concurrent_calls=1) as (a, _, feed_a, _, _), serving() as (b, _, feed_b, _, _):
        hosts = ",".join(listener.url.partition("://")[2] for listener in (a, b))
        async with kubrpc.connect(f"static://{hosts}", transport="tcp", balancer="round_robin") as channel:
            feed = channel.stub(Feed, timeout=10)
            assert [t async for t in feed.ticks(1)] == [0]  # both connections open
            assert [t async for t in feed.ticks(1)] == [0]
            holds = [feed.forever(1), feed.forever(1)]  # round robin: one on each
            for hold in holds:
                await hold.__anext__()
            assert feed_a.running == 1 and feed_b.running == 1
            for _ in range(6):  # about half are picked on A first, refused there, and opened on B
                assert [t async for t in feed.ticks(2)] == [0, 1]
                assert await feed.total(_ints(2)) == 2
            assert feed_a.started == 1
            for hold in holds:
                await hold.aclose()  # type: ignore[attr-defined]


# -- flow control keeps memory bounded, both ways -------------------------------------------------------------


@pytest.mark.anyio
async def test_a_handler_that_never_reads_holds_one_window() -> None:
    async with serving() as (listener, server, _, sink, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(1, "test.Sink/hold", {}, FLAG_CLIENT_STREAMS))
        accept = await raw.frame()
        credit = struct.unpack(">I", accept.payload)[0]
        message = b'"' + b"m" * 996 + b'"'  # bytes travel as base64 JSON strings
        while credit > 0:  # everything the server allows, and no more
            await raw.send(data(1, message))
            credit -= len(message) + MESSAGE_OVERHEAD
        await sink.started.wait()
        (conn,) = listener.connections
        inbox = conn.streams[1].inbox
        assert inbox is not None
        assert await settle(lambda: inbox.buffered >= STREAM_WINDOW)
        assert inbox.buffered <= STREAM_WINDOW + len(message) + MESSAGE_OVERHEAD
        assert server._pending_bytes <= STREAM_WINDOW + _STREAM_ENTRY + 2048  # the window, the stream, the request
        # the client's side of it: a sender into a handler that does not read stops at the window
        async with kubrpc.connect(listener.url) as channel:
            sent = 0

            async def endless() -> AsyncIterator[bytes]:
                nonlocal sent
                for _ in range(2000):  # 2 MB, many windows
                    yield b"n" * 1000
                    sent += 1

            call = asyncio.create_task(channel.stub(Sink, timeout=30).hold(endless()))
            previous = -1
            for _ in range(100):  # until the sender stops
                await asyncio.sleep(0.05)
                if sent == previous:
                    break
                previous = sent
            assert sent == previous and sent * 1000 <= 2 * STREAM_WINDOW
            assert server._pending_bytes <= 2 * (STREAM_WINDOW + _STREAM_ENTRY + 2048)
            sink.release.set()  # it reads everything now: credit flows again, and both calls end
            assert await asyncio.wait_for(call, 10) == 2000
        await raw.send(encode_frame(FrameType.END, 1))
        while (frame := await raw.frame()).type == FrameType.WINDOW_UPDATE:
            pass
        assert frame.type == FrameType.RESPONSE, frame
        assert int(frame.payload) == 1 + STREAM_WINDOW // (len(message) + MESSAGE_OVERHEAD)
        assert await settle(lambda: server._pending_bytes == 0 and server_streams(listener) == 0)


@pytest.mark.anyio
async def test_a_client_that_never_reads_stops_the_handler() -> None:
    async with serving() as (listener, _, feed, _, _), kubrpc.connect(listener.url) as channel:
        results = channel.stub(Feed, timeout=30).forever(1000)
        await results.__anext__()
        previous = -1
        for _ in range(100):
            await asyncio.sleep(0.05)
            if feed.sent == previous:
                break
            previous = feed.sent
        assert feed.sent == previous, "the handler never stopped sending to a client that does not read"
        (client_conn,) = channel.connections.values()
        assert isinstance(client_conn, TcpConnection)
        (stream,) = client_conn._streams.values()
        assert stream.inbox.buffered <= STREAM_WINDOW + 1000 + MESSAGE_OVERHEAD
        (conn,) = listener.connections
        assert conn._out == [] or sum(map(len, conn._out)) < STREAM_WINDOW
        assert all(s.credit <= 0 for s in conn.streams.values())
        await results.aclose()  # type: ignore[attr-defined]
        assert await settle(lambda: feed.running == 0 and server_streams(listener) == 0)


# -- many streams, cancellations, restarts ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cancellation_storm_leaves_nothing_behind() -> None:
    async with serving() as (listener, server, feed, _, _), kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Feed, timeout=30)

        async def one(i: int) -> None:
            if i % 3 == 0:
                async for _ in stub.forever(10):
                    await asyncio.sleep(0)
            elif i % 3 == 1:

                async def words() -> AsyncIterator[str]:
                    while True:
                        yield "w"
                        await asyncio.sleep(0)

                async for _ in stub.chat(words()):
                    pass
            else:

                async def ints() -> AsyncIterator[int]:
                    while True:
                        yield 1
                        await asyncio.sleep(0)

                await stub.total(ints())

        tasks = [asyncio.create_task(one(i)) for i in range(300)]
        assert await settle(lambda: listener.active_calls >= 150)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        (client_conn,) = channel.connections.values()
        assert isinstance(client_conn, TcpConnection)
        assert await settle(lambda: feed.running == 0 and server_streams(listener) == 0 and listener.active_calls == 0)
        assert await settle(lambda: server._pending_bytes == 0 and client_conn.in_flight == 0)
        assert [t async for t in stub.ticks(3)] == [0, 1, 2]


@pytest.mark.anyio
async def test_a_server_restarted_in_the_middle_of_streams() -> None:
    server = kubrpc.Server(drain_timeout=0.1)
    feed = FeedImpl()
    server.register(Feed, feed)
    first = AsyncExitStack()
    listener = await first.enter_async_context(server.serve("tcp://127.0.0.1:0"))
    try:
        async with kubrpc.connect(listener.url) as channel:
            stub = channel.stub(Feed, timeout=30)
            errors: list[BaseException] = []

            async def read() -> None:
                try:
                    async for _ in stub.forever(10):
                        await asyncio.sleep(0.001)
                except RpcError as exc:
                    errors.append(exc)

            readers = [asyncio.create_task(read()) for _ in range(20)]
            assert await settle(lambda: feed.running == 20)
            await first.aclose()  # the server stops: drain_timeout passes, the streams end
            await asyncio.wait_for(asyncio.gather(*readers), 10)
            assert len(errors) == 20 and all(getattr(e, "code", None) is Status.UNAVAILABLE for e in errors)
            assert feed.running == 0
            async with server.serve(listener.url):  # back, on the same port
                for _ in range(3):
                    assert [t async for t in stub.ticks(2)] == [0, 1]
                assert await stub.total(_ints(5)) == 5
    finally:
        await first.aclose()


async def _ints(n: int) -> AsyncIterator[int]:
    for _ in range(n):
        yield 1


@pytest.mark.anyio
async def test_a_lost_connection_ends_every_stream_unavailable() -> None:
    async with serving() as (listener, _, feed, _, _), kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Feed, timeout=30)
        results = [stub.forever(1) for _ in range(5)]
        for r in results:
            await r.__anext__()
        for conn in list(listener.connections):
            assert conn.transport is not None
            conn.transport.abort()
        for r in results:
            with pytest.raises(RpcError) as info:
                async for _ in r:
                    pass
            assert info.value.code is Status.UNAVAILABLE
        assert await settle(lambda: feed.running == 0)


# -- a hostile peer: no interleaving of stream frames leaks a stream, a task or memory -----------------------


_METHODS = [
    ("test.Feed/chat", {}, BIDI),
    ("test.Feed/count", {"stop_after": 3}, FLAG_CLIENT_STREAMS),
    ("test.Feed/total", {}, FLAG_CLIENT_STREAMS),
    ("test.Feed/forever", {"size": 100}, FLAG_SERVER_STREAMS),
    ("test.Feed/ticks", {"n": 3}, FLAG_SERVER_STREAMS),
    ("test.Sink/hold", {}, FLAG_CLIENT_STREAMS),
    ("test.Feed/chat", {}, FLAG_SERVER_STREAMS),  # the wrong kind
]
_PAYLOADS = st.sampled_from([b'"w"', b"1", b"not json", b"", b'"' + b"p" * 70_000 + b'"'])


class HostilePeer(RuleBasedStateMachine):
    """A raw-socket client sending any interleaving of stream frames to a real server, which must stay whole."""

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.server = kubrpc.Server(max_concurrent_calls=8, drain_timeout=0.2)
        self.feed, self.sink = FeedImpl(), SinkImpl()
        self.server.register(Feed, self.feed)
        self.server.register(Sink, self.sink)
        self.listener: TcpListener = self.run(self.stack.enter_async_context(self.server.serve("tcp://127.0.0.1:0")))
        self.port = int(self.listener.url.rsplit(":", 1)[1])
        self.next_id = 1
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.connect()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def connect(self) -> None:
        self.run(self._open())

    async def _open(self) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(PREFACE)
        self.reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(1 << 24)
        while chunk := await reader.read(65536):
            decoder.feed(chunk)

    def send(self, frame: bytes) -> None:
        self.run(self._send(frame))

    async def _send(self, frame: bytes) -> None:
        if self.writer is None or self.reader_task is None or self.reader_task.done():
            await self._close()
            await self._open()  # the server closed it after a protocol error: a new connection
        assert self.writer is not None
        self.writer.write(frame)
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.sleep(0.002)

    def close_client(self) -> None:
        self.run(self._close())

    async def _close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None
        if self.reader_task is not None:
            try:
                await self.reader_task
            except (ConnectionError, OSError):
                pass
            self.reader_task = None

    @rule(target=streams, method=st.sampled_from(_METHODS), timeout_ms=st.sampled_from([0, 0, 50]))
    def open(self, method: tuple[str, dict[str, Any], int], timeout_ms: int) -> int:
        stream = self.next_id
        self.next_id += 2
        path, args, flags = method
        self.send(stream_request(stream, path, args, flags, timeout_ms))
        return stream

    @rule(stream=streams, payload=_PAYLOADS, copies=st.integers(1, 6))
    def data(self, stream: int, payload: bytes, copies: int) -> None:
        self.send(data(stream, payload) * copies)  # may be beyond the window, after END, of a closed stream

    @rule(stream=streams)
    def end(self, stream: int) -> None:
        self.send(encode_frame(FrameType.END, stream))

    @rule(stream=consumes(streams))
    def cancel(self, stream: int) -> None:
        self.send(encode_frame(FrameType.CANCEL, stream))

    @rule(stream=streams, increment=st.sampled_from([0, 1, 164, STREAM_WINDOW, 2**31 - 1, 2**32 - 1]))
    def window_update(self, stream: int, increment: int) -> None:
        self.send(encode_window_update(stream, increment))

    @rule(stream=streams)
    def duplicate_id(self, stream: int) -> None:
        self.send(stream_request(stream, "test.Feed/chat", {}, BIDI))

    @rule(
        kind=st.sampled_from([FrameType.DATA, FrameType.END, FrameType.WINDOW_UPDATE, FrameType.CANCEL, 42]),
        payload=st.binary(max_size=8),
    )
    def unknown_stream(self, kind: int, payload: bytes) -> None:
        self.send(encode_frame(kind, 999_999, payload))

    @rule(stream=streams)
    def bad_window_update(self, stream: int) -> None:
        self.send(encode_frame(FrameType.WINDOW_UPDATE, stream, b"\0\1"))

    @rule()
    def release_sinks(self) -> None:
        self.sink.release.set()

    @rule(reading=st.booleans())
    def reading(self, reading: bool) -> None:
        """Stop or resume reading the server's frames (its writes back up, up to its bound)."""
        if self.writer is not None:
            transport = self.writer.transport
            transport.resume_reading() if reading else transport.pause_reading()  # type: ignore[attr-defined]

    @rule()
    def reconnect(self) -> None:
        self.close_client()
        self.connect()

    @invariant()
    def bounded(self) -> None:
        conns = list(self.listener.connections)
        held = sum(len(c.streams) for c in conns)
        for conn in conns:
            assert set(conn.streams) <= set(conn.calls)
            for opened in conn.streams.values():
                if opened.inbox is not None:
                    assert opened.inbox.buffered <= STREAM_WINDOW + 70_002 + MESSAGE_OVERHEAD
        assert self.server._pending_bytes <= (held + 8) * (STREAM_WINDOW + 80_000)

    def teardown(self) -> None:
        try:
            self.close_client()

            async def quiet() -> bool:
                return await settle(
                    lambda: (
                        not self.listener.connections
                        and self.listener.active_calls == 0
                        and self.server._pending_bytes == 0
                        and self.feed.running == 0
                    )
                )

            assert self.run(quiet()), (self.listener, self.server._pending_bytes)
        finally:
            self.run(self.stack.aclose())
            leftover = self.run(_other_tasks())
            self.run(self.loop.shutdown_asyncgens())
            self.loop.close()
        assert not leftover, leftover


async def _other_tasks() -> set[asyncio.Task[Any]]:
    await asyncio.sleep(0)
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def test_a_hostile_peer_leaks_nothing() -> None:
    run = HostilePeer.TestCase
    run.settings = settings(
        max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    run().runTest()


@pytest.mark.slow
def test_a_hostile_peer_leaks_nothing_long() -> None:
    run = HostilePeer.TestCase
    run.settings = settings(
        max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
    )
    run().runTest()


def test_frame_types_are_stable() -> None:
    assert (FrameType.DATA, FrameType.END, FrameType.WINDOW_UPDATE) == (8, 9, 10)
    assert (FLAG_CLIENT_STREAMS, FLAG_SERVER_STREAMS, FLAG_REFUSED) == (0x02, 0x04, 0x02)


@pytest.mark.anyio
async def test_a_server_sending_beyond_the_window_loses_its_connection() -> None:
    """The client side of the bound: a server that ignores the window is closed on, its stream UNAVAILABLE."""
    flood = b'"' + b"f" * 1000 + b'"'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 24)
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        try:
            await reader.readexactly(len(PREFACE))
            while chunk := await reader.read(65536):
                for frame in decoder.feed(chunk):
                    if frame.type == FrameType.REQUEST and frame.flags:
                        writer.write(encode_window_update(frame.stream, 0))
                        writer.write(data(frame.stream, flood) * (2 * STREAM_WINDOW // len(flood)))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    try:
        async with kubrpc.connect(f"tcp://127.0.0.1:{port}", max_attempts=1) as channel:
            call = await channel.open_stream(
                "test.Feed/forever", b'{"size": 1}', kind=CallKind.SERVER_STREAM, timeout=10
            )
            (conn,) = channel.connections.values()
            assert isinstance(conn, TcpConnection)
            assert await settle(lambda: conn._closed)  # read nothing until the client has closed it
            got = 0
            with pytest.raises(RpcError) as info:
                while await call.receive() is not None:
                    got += 1
            assert info.value.code is Status.UNAVAILABLE
            assert 0 < got <= STREAM_WINDOW // (len(flood) + MESSAGE_OVERHEAD) + 1  # the window, not the flood
    finally:
        fake.close()
        await fake.wait_closed()


def test_the_protocol_doc_stream_dumps_match_the_encoder() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = doc[doc.index("### Byte dumps") : doc.index("## Example")]
    ticks, _, chat = section.partition("`Feed/chat`")

    def wire(text: str) -> bytes:
        lines = re.findall(r"^    (?:← )?([0-9A-F ]+?)\s{2,}", text, flags=re.M)
        return bytes.fromhex("".join(line.replace(" ", "") for line in lines))

    sent, _, answered = ticks.partition("answered by")
    assert wire(sent) == encode_request(1, "Feed/ticks", b'{"n":2}', 5000, b"", FLAG_SERVER_STREAMS)
    assert wire(answered) == b"".join(
        (
            encode_window_update(1, 0),
            data(1, b"0"),
            data(1, b"1"),
            encode_frame(FrameType.RESPONSE, 1),
        )
    )
    assert wire(chat) == b"".join(
        (
            encode_request(3, "Feed/chat", b"{}", 0, b"", BIDI),
            encode_window_update(3, STREAM_WINDOW),
            data(3, b'"hi"'),
            encode_frame(FrameType.END, 3),
            data(3, b'"HI"'),
            encode_frame(FrameType.RESPONSE, 3),
        )
    )
