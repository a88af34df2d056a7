"""The attack pass on the HTTP transport's stream calls: Connect streaming POSTs, WebSockets, and kubrpc's client
against hostile servers. Each attack is a test that failed before its fix (the report lists the figures).

Over real sockets on 127.0.0.1: raw asyncio streams (to send exactly the bytes an attacker would), websockets,
and fake servers written here.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

import orjson
import pytest
import websockets
from test_http_streams import NATIVE, end_error, raw_request, serving

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.endpoint import Endpoint
from kubrpc.interface import CallKind
from kubrpc.transports._envelope import END_STREAM, envelope
from kubrpc.transports.http import HttpTransport

pytestmark = pytest.mark.anyio


async def read_response(reader: asyncio.StreamReader, *, guard: float = 20) -> tuple[bytes, bytes]:
    """One chunked HTTP response (head, body) from a raw connection; the hang guard fails the test."""

    async def read() -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                return head, body
            body += chunk[:-2]

    return await asyncio.wait_for(read(), guard)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    await asyncio.sleep(0)


async def until(check: Any, what: str, guard: float = 20) -> None:
    """Wait (a hang guard, not a timing bound) until check() is true."""
    for _ in range(int(guard / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


# -- a stream whose message never arrives (or trickles in) ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "sent", "what"),
    [
        ("test.Feed/ticks", b"", "the request message (the arguments)"),  # the head, then nothing
        ("test.Feed/ticks", envelope(b'{"n": 1}')[:3], "the request message (the arguments)"),  # a trickle, stopped
        ("test.Slow/hold", envelope(b"{}") + envelope(b'"' + b"A" * 100 + b'"')[:50], "a request message"),
    ],
)
async def test_a_stream_message_that_never_arrives_whole_is_cut_off(path: str, sent: bytes, what: str) -> None:
    """Before: the stream held its request slot (max_connections) and its handler forever, with no deadline."""
    async with serving(body_timeout=0.3) as (url, server, feed, slow):
        slow.release.set()
        reader, writer = await raw_request(url, path, sent, NATIVE, chunked=True)
        try:
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
            error = end_error(body)
            assert error["code"] == "deadline_exceeded", error
            assert error["message"].startswith(f"{what} did not arrive whole within 0.3 s (body_timeout)"), error
        finally:
            await close(writer)
        await until(lambda: server._pending_bytes == 0 and slow.running == 0, "the stream's bytes were never released")


async def test_a_peer_may_pause_between_messages() -> None:
    """The bound is on a message that has begun, not on the silence between messages."""
    async with serving(body_timeout=0.3) as (url, server, _, _):
        reader, writer = await raw_request(url, "test.Feed/total", envelope(b"{}"), NATIVE, chunked=True)
        try:
            for value in (b"1", b"2"):
                await asyncio.sleep(0.6)  # longer than body_timeout, between whole messages
                message = envelope(value)
                writer.write(b"%x\r\n%s\r\n" % (len(message), message))
            writer.write(b"0\r\n\r\n")
            _, body = await read_response(reader)
            assert body == envelope(b"3") + envelope(b"{}", END_STREAM)
        finally:
            await close(writer)
        assert server._pending_bytes == 0


async def test_a_websocket_whose_arguments_never_arrive_is_cut_off() -> None:
    async with serving(body_timeout=0.3) as (url, _, _, _):
        async with websockets.connect(url.replace("http", "ws") + "/test.Feed/chat", additional_headers=NATIVE) as ws:
            data = await asyncio.wait_for(ws.recv(), 20)
            assert isinstance(data, bytes)
            error = end_error(data)
            assert error["code"] == "deadline_exceeded" and "(body_timeout)" in error["message"], error


# -- envelopes still arriving count against max_pending_bytes ---------------------------------------------------


async def test_envelopes_still_arriving_count_against_max_pending_bytes() -> None:
    """Before: each stream's decoder held a partial message of up to max_message_size outside admission, so N
    streams held N x max_message_size (8 streams: 6.4 MB with max_pending_bytes at 3 MB, _pending_bytes 0)."""
    size, part = 900_000, 800_000
    async with serving(max_message_size=1_000_000, max_pending_bytes=3_000_000) as (url, server, _, slow):
        streams = []
        try:
            for _ in range(8):
                message = envelope(b'"' + b"A" * (size - 2) + b'"')[:part]  # its head, and most of it
                reader, writer = await raw_request(url, "test.Slow/hold", envelope(b"{}"), NATIVE, chunked=True)
                writer.write(b"%x\r\n%s\r\n" % (len(message), message))
                await writer.drain()
                streams.append((reader, writer))
            await until(lambda: server._pending_bytes >= 3 * part, "the partial messages were never counted")
            assert server._pending_bytes <= 3_000_000
            busy = 0
            for reader, _ in streams[3:]:  # the 4th and later are over the limit
                _, body = await read_response(reader)
                error = end_error(body)
                assert error["code"] == "resource_exhausted" and "server busy" in error["message"], error
                busy += 1
            assert busy == 5
        finally:
            for _, writer in streams:
                await close(writer)
        slow.release.set()
        await until(lambda: server._pending_bytes == 0 and slow.running == 0, "bytes or handlers left behind")


# -- a WebSocket peer that never reads ----------------------------------------------------------------------


@kubrpc.interface(name="test.Spray")
class Spray(Protocol):
    def spray(self, words: AsyncIterable[str]) -> AsyncIterator[bytes]: ...


class SprayImpl:
    def __init__(self) -> None:
        self.running = 0
        self.sent = 0

    async def spray(self, words: AsyncIterable[str]) -> AsyncIterator[bytes]:
        self.running += 1
        try:
            while True:
                yield b"x" * 65536
                self.sent += 1
        finally:
            self.running -= 1


async def test_a_websocket_peer_that_never_reads_is_cut_off() -> None:
    """Before: the handler waited forever on a full socket (uvicorn's keepalive ping then closed the transport
    gracefully, which never completes with unsent bytes): its request slot and handler were held for good."""
    server = kubrpc.Server(body_timeout=0.5)
    spray = SprayImpl()
    server.register(Spray, spray)
    async with server.serve("http://127.0.0.1:0") as listener:
        ws = await websockets.connect(
            listener.url.replace("http", "ws") + "/test.Spray/spray",
            additional_headers=NATIVE,
            max_queue=1,
            max_size=None,
            ping_interval=None,
        )
        try:
            await ws.send(envelope(b"{}"))
            previous = -1
            for _ in range(200):  # the handler stops once the buffers are full
                await asyncio.sleep(0.05)
                if spray.sent == previous and spray.sent > 0:
                    break
                previous = spray.sent
            assert spray.sent * 65536 < 64 * 1024 * 1024  # what the buffers hold, bounded
            await until(lambda: spray.running == 0, "a WebSocket peer that never reads held its stream for good")
        finally:
            ws.transport.abort()
            await asyncio.sleep(0)


# -- kubrpc's client against hostile servers ------------------------------------------------------------------


class FakeServer:
    """A TCP server that answers every request with `answer` (after reading its head), counting requests."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        self.requests.append(head)
        if self.answer is not None:
            writer.write(self.answer)
            await writer.drain()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.transport.abort()
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed(status: int) -> None:
    """Before: aiohttp followed it: a stream re-sent to wherever Location said, with its metadata; a 303 even
    turned the POST into a GET. (Unary calls: tests/test_http_client.py, their client follows none.)"""
    elsewhere = FakeServer(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1\r\n\r\n1")
    async with elsewhere as other:
        location = f"http://127.0.0.1:{other}/test.Feed/ticks"
        answer = (
            f"HTTP/1.1 {status} Moved\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ).encode()
        async with FakeServer(answer) as port:
            conn = await HttpTransport().connect(Endpoint("127.0.0.1", port))
            try:
                for kind in (CallKind.SERVER_STREAM, CallKind.CLIENT_STREAM, CallKind.BIDI_STREAM):
                    with pytest.raises(RpcError) as info:
                        stream = await conn.open_stream(
                            "test.Feed/ticks", b"{}", kind=kind, timeout=10, metadata={"x-secret": "s"}
                        )
                        stream.cancel()
                    assert f"HTTP {status}" in info.value.message and location in info.value.message, info.value
                    assert "redirect" in info.value.message and "not followed" in info.value.message
            finally:
                await conn.aclose()
            assert conn.in_flight == 0
        assert elsewhere.requests == []


@pytest.mark.parametrize("kind", [CallKind.SERVER_STREAM, CallKind.CLIENT_STREAM, CallKind.BIDI_STREAM])
async def test_a_server_that_never_answers_a_stream_is_bounded_by_read_timeout(kind: CallKind) -> None:
    """Before: a stream without a deadline waited forever for the answer's head (a unary call waits read_timeout)."""
    async with FakeServer(None) as port:
        conn = await HttpTransport(read_timeout=0.3).connect(Endpoint("127.0.0.1", port))
        try:
            with pytest.raises(RpcError) as info:
                await asyncio.wait_for(
                    conn.open_stream("test.Feed/chat", b"{}", kind=kind, timeout=None, metadata={}), 20
                )
            assert info.value.code is Status.UNAVAILABLE
            assert "no answer" in info.value.message and "read_timeout" in info.value.message
        finally:
            await conn.aclose()
        assert conn.in_flight == 0


# -- protocol headers on a stream -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2", "0", "", "v1"])
async def test_a_wrong_connect_protocol_version_on_a_stream_is_400(version: str) -> None:
    """Before: a stream took any Connect-Protocol-Version (a unary call gets 400), and passed it on as metadata."""
    async with serving() as (url, _, _, _):
        headers = {"content-type": "application/connect+json", "connect-protocol-version": version}
        reader, writer = await raw_request(url, "test.Feed/ticks", envelope(b'{"n": "2"}'), headers)
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 20)
        finally:
            await close(writer)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert body == {
            "code": "invalid_argument",
            "message": f"Connect-Protocol-Version must be 1, not {version!r}: "
            "kubrpc speaks version 1 of the Connect protocol",
        }


@pytest.mark.parametrize("bad", ["0", "-1", "soon", "12345678901", "1.5", "01"])
async def test_a_bad_connect_timeout_on_a_stream_is_400(bad: str) -> None:
    async with serving() as (url, _, _, _):
        headers = {**NATIVE, "connect-timeout-ms": bad}
        reader, writer = await raw_request(url, "test.Feed/ticks", envelope(b'{"n": 2}'), headers)
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 20)
        finally:
            await close(writer)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"bad connect-timeout-ms header" in answer


# -- WebSockets from a web page, and ping floods -----------------------------------------------------------------


async def test_a_web_page_cannot_call_streams_over_a_websocket() -> None:
    """Before: a WebSocket without Kubrpc-Codec spoke proto3 JSON, so any web page could open one to a server its
    visitor reaches (localhost, an intranet) and read a server stream: browsers send no CORS preflight for a
    WebSocket, and cannot set Kubrpc-Codec on one."""
    async with serving() as (url, _, _, _):
        ws_url = url.replace("http", "ws") + "/test.Feed/ticks"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(ws_url, origin=websockets.Origin("http://evil.example")) as ws:
                await ws.send(envelope(b'{"n": "3"}'))
                await ws.recv()
        response = info.value.response
        assert response.status_code == 400
        body = orjson.loads(response.body or b"")
        assert body["code"] == "invalid_argument" and "Kubrpc-Codec: native" in body["message"], body
        async with kubrpc.connect(url) as channel:  # kubrpc's own client is not affected
            from stream_services import Feed

            assert [t async for t in channel.stub(Feed, timeout=10).ticks(2)] == [0, 1]


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (mask 0: the payload as is)."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def test_a_ping_flood_from_a_peer_that_never_reads_is_bounded() -> None:
    """Before: uvicorn answered every ping at once, so a peer that sends pings and reads nothing made the server
    buffer its pongs without bound (244 MiB of pongs unsent after 256 MiB of pings; now ~100 KB)."""
    from stream_services import Feed, FeedImpl

    from kubrpc._asgi_server import _WebSocketProtocol

    server = kubrpc.Server()
    server.register(Feed, FeedImpl())
    async with server.serve("http://127.0.0.1:0") as listener:
        url = listener.url
        host, _, port = url.partition("://")[2].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            key = base64.b64encode(b"k" * 16).decode()
            writer.write(
                (
                    f"GET /test.Feed/chat HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
                    f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\nkubrpc-codec: native\r\n\r\n"
                ).encode()
            )
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)).startswith(b"HTTP/1.1 101 ")
            data = envelope(b"{}")
            writer.write(bytes((0x82, 0x80 | len(data))) + b"\0\0\0\0" + data)  # the arguments
            pings = _frame(0x9, b"p" * 125) * 512  # 67 KiB of pings
            written = 0
            while written < 256 * 1024 * 1024:  # the server stops reading long before this
                writer.write(pings)
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    break
                written += len(pings)
            assert written < 64 * 1024 * 1024, "the server read every ping of a peer that reads nothing"
            connections = listener.uvicorn.server_state.connections  # type: ignore[attr-defined]
            protocols = [p for p in connections if isinstance(p, _WebSocketProtocol)]
            assert protocols and all(p.transport.get_write_buffer_size() < 4 * 1024 * 1024 for p in protocols)
        finally:
            await close(writer)


# -- kubrpc's client: answers that are not a stream ------------------------------------------------------------


async def test_a_200_that_is_not_a_stream_says_so() -> None:
    """Before: a proxy's 200 HTML page was read as envelopes: INTERNAL "envelope flags 0x3c"."""
    page = b"<html>hello from the proxy</html>"
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s" % (len(page), page)
    async with FakeServer(answer) as port:
        conn = await HttpTransport().connect(Endpoint("127.0.0.1", port))
        try:
            with pytest.raises(RpcError) as info:
                await conn.open_stream("a.B/c", b"{}", kind=CallKind.SERVER_STREAM, timeout=10, metadata={})
            assert info.value.code is Status.INTERNAL
            assert "is not a stream: Content-Type 'text/html'" in info.value.message, info.value
        finally:
            await conn.aclose()
        assert conn.in_flight == 0


async def test_connections_of_vanished_peers_are_probed() -> None:
    """A quiet stream (no deadline, nothing to send) of a peer whose host vanished held its slot for good: the
    server's connections had no TCP keepalive. Now they inherit it from the listening socket (30 s, 3 probes)."""
    import socket

    from test_http_streams import Slow, SlowImpl

    from kubrpc._asgi_server import _HttpProtocol

    server = kubrpc.Server()
    slow = SlowImpl()
    server.register(Slow, slow)
    async with server.serve("http://127.0.0.1:0") as listener:
        reader, writer = await raw_request(listener.url, "test.Slow/hold", envelope(b"{}"), NATIVE, chunked=True)
        try:
            await until(lambda: slow.running == 1, "the stream never started")
            everything = listener.uvicorn.server_state.connections  # type: ignore[attr-defined]
            connections = [c for c in everything if isinstance(c, _HttpProtocol)]
            assert len(connections) == 1
            accepted = connections[0].transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        finally:
            await close(writer)
        slow.release.set()
        await until(lambda: slow.running == 0, "the handler of a gone peer ran on")


@pytest.mark.parametrize(
    ("sent", "code", "text"),
    [
        ("a text message", Status.INTERNAL, "a text WebSocket message"),  # before: UNAVAILABLE "closed (TEXT)"
        (b"\x80\0\0\0\x01x", Status.INTERNAL, "flags 0x80"),
        (envelope(b"1") + envelope(b"2"), Status.INTERNAL, "one envelope"),
        (b"\x02\0\0\0\x01[", Status.INTERNAL, "malformed end-of-stream"),
        (None, Status.UNAVAILABLE, "closed"),  # accepted, then closed at once
    ],
)
async def test_a_hostile_websocket_server_is_an_error(sent: str | bytes | None, code: Status, text: str) -> None:
    async def handler(ws: Any) -> None:
        await ws.recv()  # the arguments
        if sent is not None:
            await ws.send(sent)
            await ws.wait_closed()  # then silence (the client must not wait for more)

    async with websockets.serve(handler, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        conn = await HttpTransport().connect(Endpoint("127.0.0.1", port))
        try:
            stream = await conn.open_stream("a.B/c", b"{}", kind=CallKind.BIDI_STREAM, timeout=None, metadata={})
            with pytest.raises(RpcError) as info:
                await asyncio.wait_for(stream.receive(), 20)
            assert info.value.code is code and text in info.value.message, info.value
        finally:
            await conn.aclose()
        assert conn.in_flight == 0


class Resetting(FakeServer):
    """Answers a stream with its head and one message, then resets the connection."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        message = envelope(b"0")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n" % (len(message), message)
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()


@pytest.mark.parametrize(
    ("answer", "runs", "code", "text"),
    [
        # A proxy's 503 (no kubrpc-not-started): the call may have run; a stream is not retried.
        (
            b"HTTP/1.1 503 x\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\n<h1/>",
            1,
            Status.UNAVAILABLE,
            "not kubrpc",
        ),
        (
            b"HTTP/1.1 502 x\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\n<h1/>",
            1,
            Status.UNAVAILABLE,
            "HTTP 502",
        ),
        (
            b"HTTP/1.1 504 x\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\n<h1/>",
            1,
            Status.UNAVAILABLE,
            "HTTP 504",
        ),
        # kubrpc's word that it did not start the call: tried again (here on the same, only endpoint)
        (
            b"HTTP/1.1 503 x\r\nkubrpc-not-started: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            3,
            Status.UNAVAILABLE,
            "did not start",
        ),
        (None, 1, Status.UNAVAILABLE, "broke off"),  # a reset mid-stream: nothing runs twice
    ],
)
async def test_a_stream_runs_at_most_once_unless_not_started(
    answer: bytes | None, runs: int, code: Status, text: str
) -> None:
    from stream_services import Feed

    fake = FakeServer(answer) if answer is not None else Resetting(None)
    async with fake as port, kubrpc.connect(f"http://127.0.0.1:{port}", max_attempts=3) as channel:
        with pytest.raises(RpcError) as info:
            async for _ in channel.stub(Feed, timeout=10).ticks(5):
                pass
        assert info.value.code is code and text in info.value.message, info.value
        assert len(fake.requests) == runs


async def raw_websocket(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand (kubrpc's native codec), its arguments envelope sent: then raw frames."""
    host, _, port = url.partition("://")[2].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(b"k" * 16).decode()
    writer.write(
        (
            f"GET /{path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
            f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\nkubrpc-codec: native\r\n\r\n"
        ).encode()
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)).startswith(b"HTTP/1.1 101 ")
    data = envelope(b"{}")
    writer.write(bytes((0x82, 0x80 | len(data))) + b"\0\0\0\0" + data)
    return reader, writer


async def test_websocket_messages_still_arriving_count_against_max_pending_bytes() -> None:
    """Before: websockets buffered each connection's unfinished message (up to max_message_size) outside the
    server's admission: 8 WebSockets held 6.4 MB with max_pending_bytes at 3 MB, and _pending_bytes said 0."""
    size, part = 900_000, 800_000
    async with serving(max_message_size=1_000_000, max_pending_bytes=3_000_000) as (url, server, _, _):
        sockets = []
        try:
            for _ in range(8):
                reader, writer = await raw_websocket(url, "test.Feed/chat")
                head = bytes((0x82, 0x80 | 127)) + size.to_bytes(8, "big") + b"\0\0\0\0"
                writer.write(head + b"\0" * part)  # a message's head, and most of it
                await writer.drain()
                sockets.append((reader, writer))
            await until(lambda: server._pending_bytes >= 3 * part, "the partial messages were never counted")
            assert server._pending_bytes <= 3_000_000
            for reader, _ in sockets[3:]:  # the 4th and later are over the limit: closed "try again later"
                data = await asyncio.wait_for(reader.read(), 20)
                assert data[0] == 0x88 and int.from_bytes(data[2:4], "big") == 1013, data
                assert b"max_pending_bytes" in data
        finally:
            for _, writer in sockets:
                await close(writer)
        await until(lambda: server._pending_bytes == 0, "bytes left counted")


def _masked(first: int, payload: bytes) -> bytes:
    """A client frame with a zero mask (the payload as is); `first` is FIN and the opcode."""
    if len(payload) < 126:
        return bytes((first, 0x80 | len(payload))) + b"\0\0\0\0" + payload
    return bytes((first, 0x80 | 126)) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


async def test_fragmented_messages_are_one_envelope() -> None:
    async with serving() as (url, server, _, _):
        reader, writer = await raw_websocket(url, "test.Feed/chat")
        try:
            word = envelope(b'"' + b"a" * 300 + b'"')
            writer.write(_masked(0x02, word[:7]) + _masked(0x00, word[7:100]) + _masked(0x80, word[100:]))
            answer = envelope(b'"' + b"A" * 300 + b'"')
            head = await asyncio.wait_for(reader.readexactly(4), 20)
            assert head[:2] == b"\x82\x7e" and int.from_bytes(head[2:], "big") == len(answer)
            assert await asyncio.wait_for(reader.readexactly(len(answer)), 20) == answer
        finally:
            await close(writer)
        await until(lambda: server._pending_bytes == 0, "bytes left counted")


@pytest.mark.parametrize(
    "close_payload",
    [b"", b"\x03\xe8", b"\x03\xe8bye", b"\x03\xed", b"\x03\xe7", b"\x13\x87", b"\x0f\x9f", b"\x03"],
)
async def test_close_frames_with_odd_codes_end_the_stream(close_payload: bytes) -> None:
    """1000, 1005 and 999 (not allowed on the wire), 4999, 4000+, a 1-byte payload: the stream ends, the handler
    with it, and the server serves on."""
    async with serving() as (url, server, _, _):
        reader, writer = await raw_websocket(url, "test.Feed/chat")
        try:
            writer.write(_masked(0x88, close_payload))
            data = await asyncio.wait_for(reader.read(), 20)  # the server's close frame (or nothing), then EOF
            assert not data or data[0] == 0x88, data
        finally:
            await close(writer)
        await until(lambda: server._pending_bytes == 0, "bytes left counted")
        async with kubrpc.connect(url) as channel:
            from stream_services import Feed

            async def words() -> AsyncIterator[str]:
                yield "x"

            assert [w async for w in channel.stub(Feed, timeout=10).chat(words())] == ["X"]


async def test_the_message_bound_does_not_count_while_the_server_holds_off_reading() -> None:
    """A message that began while the server held off reading (its handler behind, the stream's window full) is
    not the peer's delay: body_timeout counts only while the server reads."""
    async with serving(body_timeout=1.5) as (url, server, _, slow):
        big = envelope(b'"' + base64.b64encode(b"x" * 70_000) + b'"')  # past the 64 KiB window on its own
        last = envelope(b'"' + base64.b64encode(b"y" * 300) + b'"')
        start = envelope(b"{}") + big + last[:100]  # ... and a message begun
        reader, writer = await raw_request(url, "test.Slow/hold", b"", NATIVE, chunked=True)
        try:
            writer.write(b"%x\r\n%s\r\n" % (len(start), start))
            await until(lambda: slow.running == 1 and server._pending_bytes > 70_000, "the stream never started")
            await asyncio.sleep(3.5)  # the handler reads nothing for longer than body_timeout
            slow.release.set()
            await asyncio.sleep(0.3)  # the server reads again, and waits for the rest of the message
            rest = last[100:]
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
            _, body = await read_response(reader)
            assert body == envelope(b"2") + envelope(b"{}", END_STREAM), body
        finally:
            await close(writer)
        await until(lambda: server._pending_bytes == 0 and slow.running == 0, "bytes or handlers left behind")
