"""Stream calls on the HTTP wire: Connect's streaming protocol (POST, enveloped messages) and WebSockets.

The generic stream tests run over http in test_streaming.py; these check the wire byte for byte with httpx, aiohttp
and raw sockets, and attack it: malformed envelopes, wrong flags, truncated streams, oversized messages, a peer
that never reads, a peer that floods, a drain.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import aiohttp
import httpx
import orjson
import pytest
from hypothesis import given, strategies as st
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc import RpcError, Status
from kubrpc._protojson import client_stream_codec
from kubrpc.endpoint import Endpoint
from kubrpc.interface import CallKind, service_spec
from kubrpc.transports._envelope import COMPRESSED, END_STREAM, Decoder, EnvelopeError, envelope
from kubrpc.transports.http import HttpTransport

pytestmark = pytest.mark.anyio

NATIVE = {"content-type": "application/connect+json", "kubrpc-codec": "native"}
CONNECT = {"content-type": "application/connect+json", "connect-protocol-version": "1"}


def end(body: object = None) -> bytes:
    """The end-of-stream envelope of `body` ({} by default)."""
    return envelope(orjson.dumps({} if body is None else body), END_STREAM)


def split(data: bytes) -> list[tuple[int, bytes]]:
    """A whole response body as its envelopes (and nothing may be left over)."""
    decoder = Decoder(1 << 30)
    out = decoder.feed(data)
    assert decoder.pending == 0, f"a truncated envelope at the end of {data!r}"
    return out


def end_error(data: bytes) -> dict[str, Any]:
    """The error of the end-of-stream envelope that ends `data`."""
    flags, last = split(data)[-1]
    assert flags == END_STREAM
    error: dict[str, Any] = orjson.loads(last)["error"]
    return error


# -- the envelope codec (sans I/O) ---------------------------------------------------------------------------


@given(
    st.lists(st.tuples(st.sampled_from([0, END_STREAM, COMPRESSED]), st.binary(max_size=300)), max_size=8),
    st.lists(st.integers(1, 50), max_size=20),
)
def test_envelopes_decode_whatever_the_chunking(messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(envelope(m, f) for f, m in messages)
    decoder = Decoder(300)
    got: list[tuple[int, bytes]] = []
    at = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[at : at + cut])
        at += cut
    got += decoder.feed(wire[at:])
    assert got == messages
    assert decoder.pending == 0


@given(st.integers(101, 2**32 - 1), st.binary(max_size=200))
def test_an_oversized_message_is_refused_from_its_head(size: int, rest: bytes) -> None:
    decoder = Decoder(100)
    head = bytes((0,)) + size.to_bytes(4, "big")
    with pytest.raises(EnvelopeError, match=rf"message of {size} bytes exceeds the maximum message size \(100 bytes\)"):
        decoder.feed(head + rest)
    assert decoder.pending <= 5  # nothing of the message was buffered


@given(st.integers(0, 255).filter(lambda f: f & ~(COMPRESSED | END_STREAM)))
def test_unknown_flags_are_refused(flags: int) -> None:
    with pytest.raises(EnvelopeError, match="unknown envelope flags"):
        Decoder(100).feed(bytes((flags,)) + b"\0\0\0\0")


def test_envelope_bytes() -> None:
    assert envelope(b"{}") == b"\x00\x00\x00\x00\x02{}"
    assert envelope(b"", END_STREAM) == b"\x02\x00\x00\x00\x00"


# -- a server for the wire tests -----------------------------------------------------------------------------


@kubrpc.interface(name="test.Slow")
class Slow(Protocol):
    def every(self, seconds: float) -> AsyncIterator[int]: ...

    async def hold(self, values: AsyncIterable[bytes]) -> int: ...


class SlowImpl:
    def __init__(self) -> None:
        self.running = 0
        self.release = asyncio.Event()

    async def every(self, seconds: float) -> AsyncIterator[int]:
        self.running += 1
        try:
            for i in range(10_000):
                yield i
                await asyncio.sleep(seconds)
        finally:
            self.running -= 1

    async def hold(self, values: AsyncIterable[bytes]) -> int:
        """Reads nothing until released (a handler that falls behind a flooding client)."""
        self.running += 1
        try:
            await self.release.wait()
            return sum([1 async for _ in values])
        finally:
            self.running -= 1


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[str, kubrpc.Server, FeedImpl, SlowImpl]]:
    server = kubrpc.Server(**options)
    feed, slow = FeedImpl(), SlowImpl()
    server.register(Feed, feed)
    server.register(Slow, slow)
    async with server.serve("http://127.0.0.1:0") as listener:
        yield listener.url, server, feed, slow


@asynccontextmanager
async def wire(**options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, kubrpc.Server, FeedImpl, SlowImpl]]:
    async with AsyncExitStack() as stack:
        url, server, feed, slow = await stack.enter_async_context(serving(**options))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=20))
        yield client, server, feed, slow


async def post(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await client.post(f"/{path}", content=body, headers=headers)


async def still_serves(client: httpx.AsyncClient, server: kubrpc.Server) -> None:
    response = await post(client, "test.Feed/ticks", envelope(b'{"n": 2}'), NATIVE)
    assert response.content == envelope(b"0") + envelope(b"1") + end()
    assert server._pending_bytes == 0  # nothing admitted is left held


# -- the native codec (kubrpc's client) ----------------------------------------------------------------------


async def test_server_stream_native_wire() -> None:
    async with wire() as (client, server, _, _):
        response = await post(client, "test.Feed/ticks", envelope(b'{"n": 3}'), NATIVE)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/connect+json"
        assert response.content == envelope(b"0") + envelope(b"1") + envelope(b"2") + end()
        response = await post(client, "test.Feed/watch", envelope(b'{"kinds": ["add"]}'), NATIVE)
        assert response.content == envelope(b'{"seq":0,"kind":"add"}') + end()
        await still_serves(client, server)


async def test_client_stream_native_wire() -> None:
    async with wire() as (client, _, _, _):
        body = envelope(b"{}") + envelope(b"1") + envelope(b"2") + envelope(b"3")
        response = await post(client, "test.Feed/total", body, NATIVE)
        assert response.content == envelope(b"6") + end()
        response = await post(client, "test.Feed/total", b"", NATIVE)  # no message: the arguments are {}
        assert response.content == envelope(b"0") + end()


async def test_error_after_messages_is_the_end_stream() -> None:
    async with wire() as (client, _, _, _):
        response = await post(client, "test.Feed/fail_after", envelope(b'{"n": 2, "code": "not_found"}'), NATIVE)
        assert response.status_code == 200
        assert response.content == envelope(b"0") + envelope(b"1") + end(
            {"error": {"code": "not_found", "message": "failed after 2"}}
        )


async def test_connect_timeout_covers_the_whole_stream() -> None:
    async with wire() as (client, _, _, slow):
        headers = {**NATIVE, "connect-timeout-ms": "300"}
        response = await post(client, "test.Slow/every", envelope(b'{"seconds": 0.02}'), headers)
        messages = split(response.content)
        assert len(messages) > 2 and all(flags == 0 for flags, _ in messages[:-1])
        assert end_error(response.content) == {"code": "deadline_exceeded", "message": "deadline exceeded"}
        assert slow.running == 0
        response = await post(client, "test.Slow/every", envelope(b"{}"), {**NATIVE, "connect-timeout-ms": "01"})
        assert response.status_code == 400 and "connect-timeout-ms" in response.json()["message"]


# -- the proto3 JSON codec (Connect clients from `kubrpc proto`) ------------------------------------------------


async def test_server_stream_proto_json_wire() -> None:
    async with wire() as (client, _, _, _):
        response = await post(client, "test.Feed/ticks", envelope(b'{"n": "3"}'), CONNECT)
        # TicksResponse { int64 result = 1; }: 0 is the default (left out), int64 travels as a string
        assert response.content == envelope(b"{}") + envelope(b'{"result":"1"}') + envelope(b'{"result":"2"}') + end()
        response = await post(client, "test.Feed/watch", envelope(b'{"kinds": ["add", "del"]}'), CONNECT)
        assert response.content == envelope(b'{"kind":"add"}') + envelope(b'{"seq":"1","kind":"del"}') + end()
        response = await post(client, "test.Feed/ticks", envelope(b'{"n": "x"}'), CONNECT)
        error = end_error(response.content)
        assert error["code"] == "invalid_argument" and "'n'" in error["message"]


async def test_client_stream_proto_json_wire() -> None:
    async with wire() as (client, _, _, _):
        body = envelope(b'{"values": "1"}') + envelope(b'{"values": "2"}') + envelope(b"{}")  # {}: the zero value
        response = await post(client, "test.Feed/total", body, CONNECT)
        assert response.content == envelope(b'{"result":"3"}') + end()
        response = await post(client, "test.Feed/total", b"", CONNECT)  # no message at all
        assert response.content == envelope(b"{}") + end()
        # the ordinary fields come from the first message (stopAfter), every message carries one item
        item = base64.b64encode(b"ab").decode()
        first = orjson.dumps({"values": item, "stopAfter": "2"})
        body = envelope(first) + b"".join(envelope(orjson.dumps({"values": item})) for _ in range(5))
        response = await post(client, "test.Feed/count", body, CONNECT)
        assert response.content == envelope(b'{"result":"2"}') + end()
        later = orjson.dumps({"values": item, "stopAfter": "5"})
        response = await post(client, "test.Feed/count", envelope(first) + envelope(later), CONNECT)
        error = end_error(response.content)
        assert error["code"] == "invalid_argument"
        assert "'stopAfter'" in error["message"] and "first message" in error["message"]


async def test_connect_bidi_is_refused_with_the_reason() -> None:
    async with wire() as (client, server, _, _):
        response = await post(client, "test.Feed/chat", envelope(b"{}"), CONNECT)
        error = end_error(response.content)
        assert error["code"] == "unimplemented" and "HTTP/2" in error["message"]
        await still_serves(client, server)


async def test_binary_codec_and_compression_are_refused() -> None:
    async with wire() as (client, server, _, _):
        response = await post(
            client, "test.Feed/ticks", envelope(b"\x08\x03"), {"content-type": "application/connect+proto"}
        )
        assert response.status_code == 415
        assert response.json()["code"] == "unimplemented" and "JSON codec only" in response.json()["message"]
        headers = {**CONNECT, "connect-content-encoding": "gzip"}
        response = await post(client, "test.Feed/ticks", envelope(b"{}"), headers)
        assert response.status_code == 501 and "uncompressed" in response.json()["message"]
        await still_serves(client, server)


async def test_unknown_method_and_unary_method_as_a_stream() -> None:
    async with wire() as (client, server, _, _):
        response = await post(client, "test.Feed/nope", envelope(b"{}"), NATIVE)
        assert end_error(response.content)["code"] == "unimplemented"
        response = await post(client, "test.Feed/add", envelope(b'{"a": 1, "b": 2}'), NATIVE)
        error = end_error(response.content)
        assert error["code"] == "unimplemented" and "unary" in error["message"]
        await still_serves(client, server)


# -- attacks on the request stream: each is the right code and message, and the server serves on ---------------


@pytest.mark.parametrize(
    ("path", "body", "code", "message"),
    [
        ("test.Feed/total", envelope(b"{}") + envelope(b"1", COMPRESSED), "invalid_argument", "flags 0x01"),
        ("test.Feed/total", envelope(b"{}") + envelope(b"1", END_STREAM), "invalid_argument", "flags 0x02"),
        ("test.Feed/total", envelope(b"{}") + b"\x80\0\0\0\x01x", "invalid_argument", "unknown envelope flags 0x80"),
        ("test.Feed/total", envelope(b"{}") + envelope(b"12")[:-1], "invalid_argument", "ended inside an envelope"),
        ("test.Feed/total", b"\0\0\0", "invalid_argument", "ended inside an envelope"),
        (
            "test.Feed/total",
            envelope(b"{}") + envelope(b"1" * 2000),
            "resource_exhausted",
            "exceeds the maximum message size (1000 bytes)",
        ),
        (
            "test.Feed/total",
            b"\0\xff\xff\xff\xff",
            "resource_exhausted",
            "exceeds the maximum message size (1000 bytes)",
        ),
        ("test.Feed/ticks", envelope(b'{"n": 1}') + envelope(b"{}"), "invalid_argument", "exactly one request message"),
        ("test.Feed/total", envelope(b"[1]"), "invalid_argument", ""),
        ("test.Feed/total", envelope(b"{}") + envelope(b'"two"'), "invalid_argument", "values[0]"),
    ],
)
async def test_malformed_request_streams(path: str, body: bytes, code: str, message: str) -> None:
    async with wire(max_message_size=1000) as (client, server, _, _):
        response = await post(client, path, body, NATIVE)
        assert response.status_code == 200
        error = end_error(response.content)
        assert error["code"] == code and message in error["message"], error
        await still_serves(client, server)


async def test_oversized_response_message_ends_the_stream() -> None:
    async with wire(max_message_size=1000) as (client, server, feed, _):
        response = await post(client, "test.Feed/forever", envelope(b'{"size": 2000}'), NATIVE)
        error = end_error(response.content)
        assert error["code"] == "resource_exhausted" and "maximum message size" in error["message"]
        await still_serves(client, server)
        assert feed.running == 0


# -- flow control: a peer that never reads, a peer that floods ---------------------------------------------


async def raw_request(url: str, path: str, body: bytes, headers: dict[str, str], *, chunked: bool = False) -> Any:
    """Open a connection and send a request head (and `body`); returns (reader, writer)."""
    host, _, port = url.partition("://")[2].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST /{path} HTTP/1.1", f"host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    lines.append("transfer-encoding: chunked" if chunked else f"content-length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    if body:
        writer.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
    return reader, writer


async def test_a_peer_that_never_reads_stops_the_handler_and_is_cut_off() -> None:
    size = 64 * 1024
    async with serving(body_timeout=0.5) as (url, _, feed, _):
        reader, writer = await raw_request(url, "test.Feed/forever", envelope(b'{"size": %d}' % size), NATIVE)
        try:
            previous = -1
            for _ in range(200):  # the handler stops once the socket buffers are full
                await asyncio.sleep(0.05)
                if feed.sent == previous and feed.sent > 0:
                    break
                previous = feed.sent
            assert feed.sent == previous, "the handler never stopped writing to a peer that does not read"
            assert feed.sent * size < 32 * 1024 * 1024  # what the kernel's and uvicorn's buffers hold, bounded
            # Unsent bytes that do not shrink for body_timeout: the connection is aborted, the handler cancelled.
            for _ in range(400):
                if feed.running == 0:
                    break
                await asyncio.sleep(0.025)
            assert feed.running == 0 and feed.cancelled == 1
        finally:
            writer.close()
            reader.feed_eof()


async def test_a_flooding_client_is_held_to_the_window() -> None:
    async with serving() as (url, server, _, slow):
        reader, writer = await raw_request(url, "test.Slow/hold", envelope(b"{}"), NATIVE, chunked=True)
        message = envelope(b'"' + base64.b64encode(b"x" * 3000) + b'"')
        chunk = b"%x\r\n%s\r\n" % (len(message) * 10, message * 10)
        written = 0
        try:
            while written < 256 * 1024 * 1024:  # the server stops reading long before this
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    break
                written += len(chunk)
            assert written < 64 * 1024 * 1024, "the server read everything a flooding client sent"
            # What the server holds of it: the stream's window (and one message), counted by admission.
            assert 0 < server._pending_bytes <= 64 * 1024 + 4100
            slow.release.set()  # the handler reads now: the flow resumes
        finally:
            writer.transport.abort()
            reader.feed_eof()
        for _ in range(400):
            if slow.running == 0 and server._pending_bytes == 0:
                break
            await asyncio.sleep(0.025)
        assert slow.running == 0 and server._pending_bytes == 0


async def test_held_request_bytes_count_against_max_pending_bytes() -> None:
    async with wire(max_message_size=4000, max_pending_bytes=10_000) as (client, server, _, slow):
        item = b'"' + base64.b64encode(b"x" * 2500) + b'"'
        body = envelope(b"{}") + envelope(item) * 8
        response = await post(client, "test.Slow/hold", body, NATIVE)
        error = end_error(response.content)
        assert error["code"] == "resource_exhausted" and "server busy" in error["message"]
        assert slow.running == 0
        slow.release.set()
        await still_serves(client, server)


# -- WebSockets: bidirectional streams ------------------------------------------------------------------------


async def test_websocket_bidi_round_trip_and_half_close() -> None:
    async with serving() as (url, server, _, _), aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + "/test.Feed/chat", headers=NATIVE) as ws:
            await ws.send_bytes(envelope(b"{}"))
            await ws.send_bytes(envelope(b'"a"'))
            assert await ws.receive_bytes() == envelope(b'"A"')
            await ws.send_bytes(envelope(b'"b"'))
            assert await ws.receive_bytes() == envelope(b'"B"')
            await ws.send_bytes(envelope(b"{}", END_STREAM))  # half-close: the handler's iterator ends
            assert await ws.receive_bytes() == end()
            closing = await ws.receive()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1000
        assert server._pending_bytes == 0


@pytest.mark.parametrize(
    ("frames", "code", "message"),
    [
        ([envelope(b"{}") + envelope(b'"a"')], "invalid_argument", "one envelope"),
        ([envelope(b"{}"), b"\0\0"], "invalid_argument", "one envelope"),
        ([envelope(b"{}"), envelope(b'"a"', COMPRESSED)], "invalid_argument", "flags 0x01"),
        ([envelope(b"{}"), b"\0\xff\xff\xff\xff"], "resource_exhausted", "exceeds the maximum message size"),
        ([envelope(b"{}"), "text"], "invalid_argument", "text WebSocket message"),
        ([envelope(b"{}"), envelope(b"{}", END_STREAM), envelope(b'"late"')], "invalid_argument", "after the end"),
    ],
)
async def test_malformed_websocket_streams(frames: list[bytes | str], code: str, message: str) -> None:
    async with serving(max_message_size=1000) as (url, _, _, _), aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + "/test.Feed/chat", headers=NATIVE) as ws:
            for frame in frames:
                await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
            data = await ws.receive_bytes()
            while split(data)[-1][0] != END_STREAM:
                data = await ws.receive_bytes()
            error = end_error(data)
            assert error["code"] == code and message in error["message"], error
        feed = kubrpc.connect(url)
        async with feed as channel:
            stub = channel.stub(Feed, timeout=10)
            assert [w async for w in stub.chat(_aiter(["x"]))] == ["X"]


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


# -- drain ----------------------------------------------------------------------------------------------------


async def test_a_draining_server_refuses_new_streams_not_started() -> None:
    async with wire() as (client, server, _, _), aiohttp.ClientSession() as session:
        server.draining = True
        response = await post(client, "test.Feed/ticks", envelope(b'{"n": 1}'), NATIVE)
        assert response.status_code == 503 and response.headers["kubrpc-not-started"] == "1"
        url = str(client.base_url).rstrip("/")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(url.replace("http", "ws") + "/test.Feed/chat", headers=NATIVE)
        assert info.value.status == 503 and info.value.headers is not None
        assert info.value.headers["kubrpc-not-started"] == "1"
        async with kubrpc.connect(url) as channel:
            with pytest.raises(RpcError) as error:
                async for _ in channel.stub(Feed, timeout=5).ticks(1):
                    pass
            assert error.value.code is Status.UNAVAILABLE and "did not start" in error.value.message


async def test_drain_lets_streams_finish_then_ends_them_unavailable() -> None:
    async with AsyncExitStack() as stack:
        serve = AsyncExitStack()
        url, _, _, slow = await serve.enter_async_context(serving(drain_timeout=0.3))
        channel = await stack.enter_async_context(kubrpc.connect(url))
        got: list[int] = []
        errors: list[RpcError] = []
        chat_errors: list[RpcError] = []

        async def read() -> None:
            try:
                async for i in channel.stub(Slow, timeout=30).every(0.01):
                    got.append(i)  # noqa: PERF401 (read as they arrive: the test waits for some)
            except RpcError as exc:
                errors.append(exc)

        async def chat() -> None:
            async def words() -> AsyncIterator[str]:
                while True:
                    yield "w"
                    await asyncio.sleep(0.01)

            try:
                async for _ in channel.stub(Feed, timeout=30).chat(words()):
                    pass
            except RpcError as exc:
                chat_errors.append(exc)

        tasks = [asyncio.create_task(read()), asyncio.create_task(chat())]
        for _ in range(2000):  # a hang guard
            if len(got) >= 3:
                break
            await asyncio.sleep(0.01)
        await serve.aclose()  # drain: both run on for drain_timeout, then end with UNAVAILABLE
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert len(got) > 3
        for error in (errors, chat_errors):
            assert error and error[0].code is Status.UNAVAILABLE
            assert "shut down before the stream finished" in error[0].message, error[0].message
        assert slow.running == 0


# -- WebSocket upgrades are held to the hardened protocol's limits ------------------------------------------------


async def test_websocket_upgrades_keep_the_connection_limits() -> None:
    async with serving(max_connections=1, max_header_size=2048) as (url, _, _, slow), aiohttp.ClientSession() as s:
        ws_url = url.replace("http", "ws") + "/test.Feed/chat"
        async with s.ws_connect(ws_url, headers=NATIVE) as ws:  # holds the one request slot while open
            await ws.send_bytes(envelope(b"{}"))
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(ws_url, headers=NATIVE)
            assert info.value.status == 503 and info.value.headers is not None
            assert info.value.headers["kubrpc-not-started"] == "1"
            await ws.send_bytes(envelope(b"{}", END_STREAM))
            assert await ws.receive_bytes() == end()
        for _ in range(200):  # the slot is given back once the stream's task has ended
            try:
                async with s.ws_connect(ws_url, headers=NATIVE) as ws:
                    await ws.send_bytes(envelope(b"{}"))
                    await ws.send_bytes(envelope(b'"z"'))
                    assert await ws.receive_bytes() == envelope(b'"Z"')
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("the request slot of a finished WebSocket stream was never given back")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(ws_url, headers={**NATIVE, "x-big": "x" * 4000})
        assert info.value.status == 431
        assert slow.running == 0


async def test_a_slow_websocket_head_times_out() -> None:
    async with serving(header_timeout=0.3) as (url, _, _, _):
        host, _, port = url.partition("://")[2].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /test.Feed/chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n")  # and no more
            answer = await asyncio.wait_for(reader.read(), 20)
            assert answer.startswith(b"HTTP/1.1 408 ")
        finally:
            writer.close()
            await writer.wait_closed()


# -- the client's side ----------------------------------------------------------------------------------------


async def test_the_client_holds_the_server_to_its_message_size() -> None:
    async with serving() as (url, _, feed, _):
        host, _, port = url.partition("://")[2].rpartition(":")
        conn = await HttpTransport(max_message_size=1000).connect(Endpoint(host, int(port)))
        try:
            stream = await conn.open_stream(
                "test.Feed/forever", b'{"size": 5000}', kind=CallKind.SERVER_STREAM, timeout=10, metadata={}
            )
            with pytest.raises(RpcError) as info:
                await stream.receive()
            assert info.value.code is Status.RESOURCE_EXHAUSTED and "maximum message size" in info.value.message
            stream.cancel()  # idempotent after the end
            ws = await conn.open_stream("test.Feed/chat", b"{}", kind=CallKind.BIDI_STREAM, timeout=10, metadata={})
            with pytest.raises(RpcError) as info:
                await ws.send(b'"' + b"x" * 1000 + b'"')
            assert info.value.code is Status.RESOURCE_EXHAUSTED
            assert await ws.send(b'"x"')
            await ws.close_send()
            assert await ws.receive() == b'"X"'
            assert await ws.receive() is None
            with pytest.raises(RpcError) as info:
                await conn.open_stream(
                    "test.Feed/ticks", b"x" * 2000, kind=CallKind.SERVER_STREAM, timeout=5, metadata={}
                )
            assert info.value.code is Status.RESOURCE_EXHAUSTED
        finally:
            await conn.aclose()
        for _ in range(400):
            if feed.running == 0:
                break
            await asyncio.sleep(0.025)
        assert feed.running == 0
        assert conn.in_flight == 0


async def test_one_deadline_covers_a_websocket_stream() -> None:
    async with serving() as (url, _, _, _), kubrpc.connect(url) as channel:

        async def words() -> AsyncIterator[str]:
            while True:
                yield "w"
                await asyncio.sleep(0.01)

        got = 0
        with pytest.raises(RpcError) as info:
            async for _ in channel.stub(Feed, timeout=0.5).chat(words()):
                got += 1
        assert info.value.code is Status.DEADLINE_EXCEEDED and got > 0


async def test_a_hostile_stream_server_is_an_error_not_a_hang() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
    )
    bodies = {
        b"flags": b"\x80\0\0\0\x01x",
        b"trunc": b"\0\0\0\0\x05abc",
        b"noend": b"\0\0\0\0\x011",
        b"badend": b"\x02\0\0\0\x01[",
    }
    answers = {name: head % len(body) + body for name, body in bodies.items()}
    which: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(answers[which[0]])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await HttpTransport().connect(Endpoint("127.0.0.1", port))
    expected = {
        b"flags": (Status.INTERNAL, "flags 0x80"),
        b"trunc": (Status.UNAVAILABLE, "broke off"),
        b"noend": (Status.UNAVAILABLE, "broke off"),
        b"badend": (Status.INTERNAL, "malformed end-of-stream"),
    }
    try:
        for name, (code, text) in expected.items():
            which[:] = [name]
            stream = await conn.open_stream("a.B/c", b"{}", kind=CallKind.SERVER_STREAM, timeout=10, metadata={})
            with pytest.raises(RpcError) as info:
                while True:
                    await stream.receive()
            assert info.value.code is code and text in info.value.message, (name, info.value)
    finally:
        await conn.aclose()
        server.close()
        await server.wait_closed()
    assert conn.in_flight == 0


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=5)
        | st.binary(max_size=5).map(base64.b64encode).map(bytes.decode),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["values", "stopAfter", "stop_after", "x"]), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_client_stream_messages_are_a_call_or_invalid_argument(value: object) -> None:
    for name in ("count", "total"):
        codec = client_stream_codec(service_spec(Feed).methods[name])
        data = orjson.dumps(value)
        for convert in (codec.first, codec.later):
            try:
                out = convert(data)
            except RpcError as exc:
                assert exc.code is Status.INVALID_ARGUMENT
            else:
                assert out is not None


@kubrpc.interface(name="test.Items")
class Items(Protocol):
    async def lists(self, names: AsyncIterable[list[str]]) -> int: ...

    async def optionals(self, tag: str, values: AsyncIterable[int | None]) -> int: ...


def test_client_stream_items_that_are_lists_or_optional() -> None:
    spec = service_spec(Items)
    lists = client_stream_codec(spec.methods["lists"])
    assert lists.first(b'{"names": ["a", "b"]}') == (b"{}", b'["a","b"]')  # one message holds one list
    assert lists.later(b"{}") == b"[]"  # absent: the empty list
    optionals = client_stream_codec(spec.methods["optionals"])
    assert optionals.first(b'{"tag": "t", "values": "7"}') == (b'{"tag":"t"}', b"7")
    assert optionals.later(b"{}") == b"null"  # absent optional: None
    assert optionals.later(b'{"values": "0"}') == b"0"
    assert optionals.first(None) == (b'{"tag":""}', None)  # no message: the ordinary fields at their zero values
