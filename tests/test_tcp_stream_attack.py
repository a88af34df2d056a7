"""The attack pass on TCP stream calls: hostile and slow peers, over real sockets on 127.0.0.1.

Each test is a finding of the attack pass (or a probe that came out clean and guards the behaviour): a peer
that keeps streams open without progress, a peer that holds many streams, a hostile server against the client.
The wire is docs/protocol.md's "Streams"; tests/test_tcp_streams.py has the protocol's own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import anyio
import orjson
import pytest
from faultproxy import FaultProxy
from rawtcp import RawClient, raw_opener
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.transports import _tcp_server
from kubrpc.transports._frames import (
    FLAG_CLIENT_STREAMS,
    FLAG_REFUSED,
    FLAG_SERVER_STREAMS,
    PREFACE,
    STREAM_WINDOW,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_goaway,
    encode_request,
    encode_window_update,
)
from kubrpc.transports._streams import MESSAGE_OVERHEAD
from kubrpc.transports._tcp_client import TcpConnection
from kubrpc.transports._tcp_server import TcpListener

BIDI = FLAG_CLIENT_STREAMS | FLAG_SERVER_STREAMS
#: What the server counts for an open stream's own state (the old code counted nothing: 8 KiB is its value now).
_STREAM_ENTRY: int = getattr(_tcp_server, "_STREAM_ENTRY", 8 * 1024)


@kubrpc.interface(name="test.Quiet")
class Quiet(Protocol):
    def wait(self) -> AsyncIterator[int]: ...


class QuietImpl:
    """A server stream whose handler waits on its own source (a watch with no events yet), not on the client."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def wait(self) -> AsyncIterator[int]:
        await self.release.wait()
        yield 1


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[TcpListener, kubrpc.Server, QuietImpl, Any]]:
    """Feed and Quiet on tcp://127.0.0.1:0: (listener, server, quiet, open_raw)."""
    server = kubrpc.Server(**options)
    quiet = QuietImpl()
    server.register(Feed, FeedImpl())
    server.register(Quiet, quiet)
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0"))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        yield listener, server, quiet, raw_opener(stack, "127.0.0.1", port, skip_settings=True)


def stream_request(stream: int, path: str, args: dict[str, Any], flags: int, timeout_ms: int = 0) -> bytes:
    return encode_request(stream, path, orjson.dumps(args), timeout_ms, b"", flags)


def server_streams(listener: TcpListener) -> int:
    return sum(len(c.streams) for c in listener.connections)


async def settle(check: Any, rounds: int = 1000) -> bool:
    """Poll `check` (a hang guard, not a timing assertion)."""
    for _ in range(rounds):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


async def final_frame(raw: RawClient, stream: int) -> Any:
    """The RESPONSE or ERROR that ends `stream` (skipping its DATA and WINDOW_UPDATEs)."""
    while True:
        frame = await raw.frame()
        if frame.stream == stream and frame.type in (FrameType.RESPONSE, FrameType.ERROR):
            return frame


# -- finding 1: a stream with no progress held its slot and memory forever (slowloris on stream DATA) ---------


@pytest.mark.anyio
async def test_a_stream_whose_client_never_sends_ends_after_idle_timeout() -> None:
    async with serving(idle_timeout=0.3) as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(1, "test.Feed/total", {}, FLAG_CLIENT_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE  # accepted; then the client sends nothing
        frame = await final_frame(raw, 1)
        assert frame.type == FrameType.ERROR
        error = orjson.loads(frame.payload)
        assert error["code"] == "deadline_exceeded" and "stalled" in error["message"], error
        assert "idle_timeout" in error["message"]
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_a_stream_whose_client_never_grants_credit_ends_after_idle_timeout() -> None:
    async with serving(idle_timeout=0.3) as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(
            PREFACE + stream_request(1, "test.Feed/forever", {"size": 1000}, FLAG_SERVER_STREAMS)
        )
        frame = await final_frame(raw, 1)  # it sends a window of DATA, then waits for credit that never comes
        assert frame.type == FrameType.ERROR
        assert orjson.loads(frame.payload)["code"] == "deadline_exceeded"
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_streams_that_move_or_wait_on_the_server_are_not_stalled() -> None:
    async with serving(idle_timeout=0.3) as (listener, _, quiet, open_raw):
        raw: RawClient = await open_raw(
            PREFACE
            + stream_request(1, "test.Quiet/wait", {}, FLAG_SERVER_STREAMS)
            + stream_request(3, "test.Feed/total", {}, FLAG_CLIENT_STREAMS)
        )
        for _ in range(40):  # a slow but steady client stream: one message every 50 ms, for 2 s
            await raw.send(encode_frame(FrameType.DATA, 3, b"1"))
            await asyncio.sleep(0.05)
        await raw.send(encode_frame(FrameType.END, 3))
        frame = await final_frame(raw, 3)
        assert (frame.type, frame.payload) == (FrameType.RESPONSE, b"40")
        assert server_streams(listener) == 1  # the watch with no event yet waits on the server's side: it stays
        quiet.release.set()
        assert (await final_frame(raw, 1)).type == FrameType.RESPONSE


# -- finding 2: an open stream cost ~6.4 KiB of server memory but counted ~30 bytes against max_pending_bytes --


@pytest.mark.anyio
async def test_open_streams_count_their_state_against_max_pending_bytes() -> None:
    budget = 64 * _STREAM_ENTRY
    async with serving(max_pending_bytes=budget, max_message_size=budget) as (listener, server, _, open_raw):
        n = 500
        requests = b"".join(stream_request(2 * i + 1, "test.Feed/total", {}, FLAG_CLIENT_STREAMS) for i in range(n))
        raw: RawClient = await open_raw(PREFACE + requests)
        accepted = refused = 0
        for _ in range(n):
            frame = await raw.frame()
            if frame.type == FrameType.WINDOW_UPDATE:
                accepted += 1
            else:
                assert frame.type == FrameType.ERROR and frame.flags & FLAG_REFUSED, frame
                error = orjson.loads(frame.payload)
                assert error == {"code": "resource_exhausted", "message": "server busy"}, error
                refused += 1
        assert accepted <= budget // _STREAM_ENTRY and refused == n - accepted, (accepted, refused)
        assert server._pending_bytes <= budget and server_streams(listener) == accepted
        async with kubrpc.connect(listener.url) as channel:  # everyone else is still served, once streams end
            await raw.send(b"".join(encode_frame(FrameType.END, 2 * i + 1) for i in range(n)))
            assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)
            assert await channel.stub(Feed, timeout=10).add(1, 2) == 3


# -- a hostile or broken server against the client ---------------------------------------------------------------


@asynccontextmanager
async def fake_server(behave: Any) -> AsyncIterator[tuple[str, list[int]]]:
    """A server speaking raw frames: `behave(frame, writer)` for each frame; yields (url, stream ids opened)."""
    opened: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 24)
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        try:
            await reader.readexactly(len(PREFACE))
            while chunk := await reader.read(65536):
                for frame in decoder.feed(chunk):
                    if frame.type == FrameType.REQUEST:
                        opened.append(frame.stream)
                    behave(frame, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"tcp://127.0.0.1:{fake.sockets[0].getsockname()[1]}", opened
    finally:
        fake.close()
        await fake.wait_closed()


def nothing_left(channel: kubrpc.Channel, before: set[asyncio.Task[Any]]) -> bool:
    """No stream or call left in the channel's connections, and no task but those running `before` (and the
    fake server's connection handlers)."""
    conns = [c for c in channel.connections.values() if isinstance(c, TcpConnection)]
    tasks = [t for t in asyncio.all_tasks() - before if not t.done() and "handle" not in repr(t.get_coro())]
    return all(c.in_flight == 0 and not c._streams for c in conns) and not tasks


async def endless() -> AsyncIterator[int]:
    for i in range(1_000_000):
        yield i


# -- finding 3: DATA before the accepting WINDOW_UPDATE, then a REFUSED ERROR, re-opened the stream elsewhere -----


@pytest.mark.anyio
async def test_data_before_the_accept_is_a_protocol_error_so_a_refusal_after_it_runs_nothing_twice() -> None:
    def ran_then_refused(frame: Any, writer: asyncio.StreamWriter) -> None:
        if frame.type == FrameType.REQUEST:  # it ran the handler (a message went out), then claims it did not
            writer.write(encode_frame(FrameType.DATA, frame.stream, b"0"))
            unavailable = orjson.dumps({"code": "unavailable", "message": "draining"})
            writer.write(encode_frame(FrameType.ERROR, frame.stream, unavailable, FLAG_REFUSED))

    async with fake_server(ran_then_refused) as (url, opened), kubrpc.connect(url, max_attempts=3) as channel:
        before = asyncio.all_tasks()
        with pytest.raises(RpcError) as info:
            assert await asyncio.wait_for(channel.stub(Feed, timeout=10).ticks(3).__anext__(), 10) is None
        assert type(info.value) is RpcError and info.value.code is Status.UNAVAILABLE  # not NotDeliveredError
        assert "before the server accepted it" in info.value.message, info.value.message
        assert opened == [1]  # before: [1, 2, 3], the stream opened again after its handler had run
        assert await settle(lambda: nothing_left(channel, before))


# -- finding 4: a stream ended by the server's protocol error said only "connection lost" ----------------------


@pytest.mark.anyio
async def test_a_server_protocol_error_says_why_in_the_streams_error() -> None:
    def overflowing(frame: Any, writer: asyncio.StreamWriter) -> None:
        if frame.type == FrameType.REQUEST:
            writer.write(encode_window_update(frame.stream, 2**32 - 1))  # credit over 2^31 - 1

    async with fake_server(overflowing) as (url, _), kubrpc.connect(url, max_attempts=1) as channel:
        before = asyncio.all_tasks()
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(channel.stub(Feed, timeout=10).total(endless()), 10)
        assert info.value.code is Status.UNAVAILABLE
        assert "broke the protocol" in info.value.message and "overflows the window" in info.value.message
        assert await settle(lambda: nothing_left(channel, before))


# -- probes that came out clean: the client honours its deadline and cancellation whatever the server does -----


def never_accepts(frame: Any, writer: asyncio.StreamWriter) -> None:
    pass


def accepts_without_credit(frame: Any, writer: asyncio.StreamWriter) -> None:
    if frame.type == FrameType.REQUEST:
        writer.write(encode_window_update(frame.stream, 0))


@pytest.mark.anyio
@pytest.mark.parametrize("behave", [never_accepts, accepts_without_credit])
async def test_open_and_send_end_with_the_deadline_whatever_the_server_does(behave: Any) -> None:
    async with fake_server(behave) as (url, opened), kubrpc.connect(url, max_attempts=1) as channel:
        before = asyncio.all_tasks()
        for call in (
            channel.stub(Feed, timeout=0.3).total(endless()),
            channel.stub(Feed, timeout=0.3).ticks(1).__anext__(),
        ):
            with pytest.raises(RpcError) as info:
                await asyncio.wait_for(call, 10)
            assert info.value.code is Status.DEADLINE_EXCEEDED
        assert len(opened) == 2
        assert await settle(lambda: nothing_left(channel, before))


@pytest.mark.anyio
async def test_cancelling_a_sender_blocked_on_credit_frees_it() -> None:
    async with fake_server(accepts_without_credit) as (url, _), kubrpc.connect(url, max_attempts=1) as channel:
        before = asyncio.all_tasks()
        call = asyncio.ensure_future(channel.stub(Feed).total(endless()))  # no deadline: only cancel() ends it
        assert await settle(lambda: any(c.in_flight for c in channel.connections.values()))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 10)
        assert await settle(lambda: nothing_left(channel, before))


@pytest.mark.anyio
async def test_garbage_errors_and_frames_after_the_end_are_survived() -> None:
    def garbage(frame: Any, writer: asyncio.StreamWriter) -> None:
        if frame.type == FrameType.REQUEST and frame.stream == 1:
            writer.write(encode_window_update(1, 0) + encode_frame(FrameType.ERROR, 1, b"\xff{not json"))
        elif frame.type == FrameType.REQUEST:
            writer.write(encode_window_update(frame.stream, 0) + encode_frame(FrameType.DATA, frame.stream, b"7"))
            writer.write(encode_frame(FrameType.RESPONSE, frame.stream, b""))
            writer.write(encode_frame(FrameType.DATA, frame.stream, b"8") * 10)  # after the end: ignored
            writer.write(encode_frame(FrameType.DATA, 999, b"9") * 10)  # a stream never opened: ignored

    async with fake_server(garbage) as (url, _), kubrpc.connect(url, max_attempts=1) as channel:
        before = asyncio.all_tasks()
        feed = channel.stub(Feed, timeout=10)
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(feed.ticks(1).__anext__(), 10)
        assert info.value.code is Status.UNKNOWN and "malformed" in info.value.message
        assert [t async for t in feed.ticks(5)] == [7]
        assert await settle(lambda: nothing_left(channel, before))


# -- network faults: a proxy resetting mid-stream, in either direction -----------------------------------------


@kubrpc.interface(name="test.Ledger")
class Ledger(Protocol):
    async def record(self, call: int, values: AsyncIterable[int]) -> int: ...

    def emit(self, call: int, n: int) -> AsyncIterator[int]: ...

    def echo(self, call: int, values: AsyncIterable[int]) -> AsyncIterator[int]: ...


class LedgerImpl:
    """Counts how often each call ran: a stream that is not idempotent must never run twice."""

    def __init__(self) -> None:
        self.runs: dict[int, int] = {}

    async def record(self, call: int, values: AsyncIterable[int]) -> int:
        self.runs[call] = self.runs.get(call, 0) + 1
        return sum([v async for v in values])

    async def emit(self, call: int, n: int) -> AsyncIterator[int]:
        self.runs[call] = self.runs.get(call, 0) + 1
        for i in range(n):
            yield i

    async def echo(self, call: int, values: AsyncIterable[int]) -> AsyncIterator[int]:
        self.runs[call] = self.runs.get(call, 0) + 1
        async for v in values:
            yield v


@pytest.mark.anyio
@pytest.mark.parametrize(("after", "after_response"), [(300, None), (5000, None), (60_000, None), (None, 20_000)])
async def test_a_reset_in_the_middle_of_streams_runs_nothing_twice_and_leaks_nothing(
    after: int | None, after_response: int | None
) -> None:
    server = kubrpc.Server()
    ledger = LedgerImpl()
    server.register(Ledger, ledger)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        async with FaultProxy(
            port, mode="reset_after", reset_after=after, reset_after_response=after_response
        ) as proxy:
            async with kubrpc.connect(f"tcp://{proxy.url}", max_attempts=3) as channel:
                before = asyncio.all_tasks()
                stub = channel.stub(Ledger, timeout=10)

                async def values(n: int) -> AsyncIterator[int]:
                    for i in range(n):
                        yield i

                async def one(call: int) -> None:
                    kind = call % 3
                    if kind == 0:
                        await stub.record(call, values(2000))
                    elif kind == 1:
                        assert len([v async for v in stub.emit(call, 2000)]) == 2000
                    else:
                        assert len([v async for v in stub.echo(call, values(2000))]) == 2000

                results = await asyncio.wait_for(
                    asyncio.gather(*(one(call) for call in range(30)), return_exceptions=True), 30
                )
                failures = [r for r in results if isinstance(r, BaseException)]
                assert failures, "the proxy reset nothing"
                assert all(isinstance(r, RpcError) and r.code is Status.UNAVAILABLE for r in failures), failures
                assert max(ledger.runs.values()) == 1, ledger.runs  # nothing ran twice
                assert await settle(lambda: nothing_left(channel, before))
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)
        assert listener.active_calls == 0


# -- hostile frames against the server: each gets its answer, and leaves nothing behind ------------------------


def request(stream: int, path: str, args: dict[str, Any], flags: int = 0) -> bytes:
    return encode_request(stream, path, orjson.dumps(args), 0, b"", flags)


def frame(type: FrameType, stream: int, payload: bytes = b"") -> bytes:
    return encode_frame(type, stream, payload)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sent", "goaway"),
    [
        (
            request(1, "test.Feed/chat", {}, BIDI) + frame(FrameType.END, 1) + frame(FrameType.DATA, 1, b'"a"'),
            "after END",
        ),
        (
            request(1, "test.Feed/ticks", {"n": 1}, FLAG_SERVER_STREAMS) + frame(FrameType.DATA, 1, b"1"),
            "whose client streams no messages",  # before: "beyond its flow-control window", which it never had
        ),
        (request(1, "test.Feed/add", {"a": 1, "b": 2}) + request(1, "test.Feed/total", {}, 2), "already used"),
        (
            request(1, "test.Feed/forever", {"size": 1}, FLAG_SERVER_STREAMS) + encode_window_update(1, 2**31),
            "overflows",
        ),
        (request(1, "test.Feed/chat", {}, BIDI) + frame(FrameType.WINDOW_UPDATE, 1, b"\0\0\1"), "must be 4 bytes"),
    ],
)
async def test_protocol_errors_on_streams_close_that_connection_saying_why(sent: bytes, goaway: str) -> None:
    async with serving() as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + sent)
        assert await raw.closed()
        (away,) = [f for f in raw.frames if f.type == FrameType.GOAWAY]
        assert goaway in away.payload.decode(), away
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)
        async with kubrpc.connect(listener.url) as channel:  # everyone else is still served
            assert [t async for t in channel.stub(Feed, timeout=10).ticks(2)] == [0, 1]


@pytest.mark.anyio
async def test_frames_for_unknown_or_ended_streams_are_ignored() -> None:
    async with serving() as (listener, server, _, open_raw):
        stray = b"".join(
            frame(t, 7, p)
            for t, p in ((FrameType.DATA, b"1"), (FrameType.END, b""), (FrameType.CANCEL, b""), (FrameType.DATA, b"2"))
        )
        raw: RawClient = await open_raw(
            PREFACE
            + stray
            + encode_window_update(7, 5)
            + encode_window_update(0, 5)
            + request(1, "test.Feed/total", {}, FLAG_CLIENT_STREAMS)
            + frame(FrameType.DATA, 1, b"1")
            + frame(FrameType.END, 1)
            + frame(FrameType.END, 1)  # END twice
            + encode_window_update(1, 0) * 10_000  # a flood of empty credit
        )
        assert (await final_frame(raw, 1)).payload == b"1"
        await raw.send(frame(FrameType.DATA, 1, b"5") + frame(FrameType.CANCEL, 1))  # the stream has ended
        await raw.send(request(3, "test.Feed/total", {}, FLAG_CLIENT_STREAMS))  # the next stream still works
        await raw.send(frame(FrameType.DATA, 3, b"2") + frame(FrameType.END, 3))
        assert (await final_frame(raw, 3)).payload == b"2"
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_drain_ends_streams_that_never_finish_whatever_their_client_does() -> None:
    server = kubrpc.Server(drain_timeout=0.3)
    server.register(Feed, FeedImpl())
    server.register(Quiet, QuietImpl())
    async with AsyncExitStack() as stack:
        serve = AsyncExitStack()
        listener = await serve.enter_async_context(server.serve("tcp://127.0.0.1:0"))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        open_raw = raw_opener(stack, "127.0.0.1", port, skip_settings=True)
        reading: RawClient = await open_raw(
            PREFACE
            + request(1, "test.Quiet/wait", {}, FLAG_SERVER_STREAMS)  # waits on the server's side
            + request(3, "test.Feed/total", {}, FLAG_CLIENT_STREAMS)  # waits for a message
            + request(5, "test.Feed/forever", {"size": 100}, FLAG_SERVER_STREAMS)  # waits for credit
        )
        deaf: RawClient = await open_raw(
            PREFACE + request(1, "test.Feed/forever", {"size": 60_000}, FLAG_SERVER_STREAMS), rcvbuf=4096
        )
        deaf.stop_reading()  # its server is blocked writing to it
        assert await settle(lambda: server_streams(listener) == 4)
        with anyio.fail_after(20):
            await serve.aclose()  # GOAWAY, drain_timeout, the streams are ended, the connections close
        ended = {f.stream: orjson.loads(f.payload) for f in reading.frames if f.type == FrameType.ERROR}
        assert await reading.closed()
        ended |= {f.stream: orjson.loads(f.payload) for f in reading.frames if f.type == FrameType.ERROR}
        assert set(ended) == {1, 3, 5} and all(e["code"] == "unavailable" for e in ended.values()), ended
        assert server_streams(listener) == 0 and server._pending_bytes == 0 and listener.active_calls == 0


@pytest.mark.anyio
async def test_goaway_with_streams_in_flight_keeps_the_accepted_and_sends_the_rest_elsewhere() -> None:
    """Stream 1 is accepted and runs on after the GOAWAY; stream 2, above last_stream, opens on a new connection."""

    def goes_away(frame: Any, writer: asyncio.StreamWriter) -> None:
        if frame.type != FrameType.REQUEST:
            return
        if frame.stream == 1 and not goes_away.seen:  # type: ignore[attr-defined]
            goes_away.seen = True  # type: ignore[attr-defined]
            writer.write(encode_window_update(1, 0) + encode_frame(FrameType.DATA, 1, b"10"))
        elif frame.stream == 2:
            writer.write(encode_goaway(1, "restarting") + encode_frame(FrameType.DATA, 1, b"11"))
            writer.write(encode_frame(FrameType.RESPONSE, 1, b""))
        else:  # the first stream of a new connection
            writer.write(encode_window_update(frame.stream, 0) + encode_frame(FrameType.DATA, frame.stream, b"30"))
            writer.write(encode_frame(FrameType.RESPONSE, frame.stream, b""))

    goes_away.seen = False  # type: ignore[attr-defined]
    async with fake_server(goes_away) as (url, opened), kubrpc.connect(url, max_attempts=2) as channel:
        before = asyncio.all_tasks()
        feed = channel.stub(Feed, timeout=10)
        first = feed.ticks(2)
        assert await first.__anext__() == 10
        assert [t async for t in feed.ticks(1)] == [30]  # refused by the GOAWAY, opened again elsewhere
        assert [t async for t in first] == [11]  # the accepted stream finished where it was
        assert opened == [1, 2, 1]
        assert await settle(lambda: nothing_left(channel, before))


@pytest.mark.anyio
async def test_a_slow_link_keeps_every_buffer_within_a_window() -> None:
    """Latency and a bandwidth limit between the ends: flow control, not the link, bounds what waits anywhere."""
    server = kubrpc.Server()
    feed = FeedImpl()
    server.register(Feed, feed)
    size = 2000
    bound = STREAM_WINDOW + 2 * size + MESSAGE_OVERHEAD  # a window, and one message (as base64 JSON) beyond it
    async with server.serve("tcp://127.0.0.1:0") as listener:
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        async with FaultProxy(port, latency=0.005, rate=2_000_000) as proxy:
            async with kubrpc.connect(f"tcp://{proxy.url}") as channel:
                results = channel.stub(Feed, timeout=30).forever(size)
                client_peak = server_peak = got = 0
                async for _ in results:
                    got += 1
                    (conn,) = [c for c in channel.connections.values() if isinstance(c, TcpConnection)]
                    (stream,) = conn._streams.values()
                    client_peak = max(client_peak, stream.inbox.buffered)
                    for opened in (s for c in listener.connections for s in c.streams.values()):
                        server_peak = max(server_peak, STREAM_WINDOW - opened.credit)  # sent and not granted back
                    if got % 100 == 0:
                        await asyncio.sleep(0.05)  # a slow reader too
                    if got == 600:  # about 1.6 MB: six windows through the link
                        break
        assert client_peak <= bound and server_peak <= bound, (client_peak, server_peak)
        assert await settle(lambda: feed.running == 0 and server_streams(listener) == 0)
        assert server._pending_bytes == 0


@pytest.mark.anyio
async def test_a_half_closed_link_ends_the_stream_unavailable_on_both_sides() -> None:
    server = kubrpc.Server()
    feed = FeedImpl()
    server.register(Feed, feed)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        async with FaultProxy(port, mode="half_close", reset_after_response=50_000) as proxy:
            async with kubrpc.connect(f"tcp://{proxy.url}", max_attempts=1) as channel:
                before = asyncio.all_tasks()
                got = 0
                with pytest.raises(RpcError) as info:
                    async for _ in channel.stub(Feed, timeout=30).forever(1000):
                        got += 1
                assert info.value.code is Status.UNAVAILABLE and 0 < got < 50
                assert await settle(lambda: nothing_left(channel, before))
        assert await settle(lambda: feed.running == 0 and server_streams(listener) == 0)
        assert server._pending_bytes == 0


@pytest.mark.anyio
async def test_a_drip_of_empty_credit_does_not_keep_a_stalled_stream_alive() -> None:
    async with serving(idle_timeout=0.3) as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + request(1, "test.Feed/forever", {"size": 1000}, FLAG_SERVER_STREAMS))
        ended = None
        for _ in range(300):  # a hang guard: before, the stream lived as long as the drip went on
            await raw.send(encode_window_update(1, 0) + encode_window_update(1, 1))  # never enough to send again
            try:
                got = await raw.frame(timeout=0.05)
            except TimeoutError:
                continue
            if got.type == FrameType.ERROR:
                ended = orjson.loads(got.payload)
                break
        assert ended is not None and ended["code"] == "deadline_exceeded", ended
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


async def test_a_result_message_over_the_clients_limit_ends_only_its_stream() -> None:
    """The client's side of the same rule: a server's DATA frame over the client's frame limit is skipped unread,
    that stream ends RESOURCE_EXHAUSTED and is cancelled on the server, and the connection goes on."""
    from stream_services import Feed, FeedImpl

    from kubrpc.transports.tcp import TcpTransport

    server = kubrpc.Server(max_message_size=8 * 1024 * 1024)
    impl = FeedImpl()
    server.register(Feed, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        transport = TcpTransport(max_message_size=1000)
        async with kubrpc.connect(listener.url, transport=transport) as channel:
            feed = channel.stub(Feed, timeout=30)
            with pytest.raises(kubrpc.RpcError) as info:
                async for _ in feed.forever(200_000):  # 200 KB messages: over 1000 + the frame overhead
                    pass
            assert info.value.code is kubrpc.Status.RESOURCE_EXHAUSTED
            assert [t async for t in feed.ticks(3)] == [0, 1, 2]
            assert len(channel.connections) == 1
