"""A second attack on the TCP transport, from raw sockets: hoarding, stalling, malformed frames, broken servers."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import sys
import tracemalloc

import anyio
import orjson
import pytest
from rawtcp import HELLO_SIZE, RawClient, fake_server
from services import Arith, wait_until
from test_tcp_hardening import request, serving

import kubrpc
from kubrpc import Status
from kubrpc.errors import NotDeliveredError, RpcError
from kubrpc.transports._frames import (
    FRAME_OVERHEAD,
    HEADER,
    PREFACE,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_request,
    parse_goaway,
)
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio

_BODY = b'{"a": 1, "b": 2}'


def big_request(stream: int, size: int) -> bytes:
    """A valid Arith/add REQUEST frame of about `size` bytes (the body padded with JSON whitespace)."""
    return encode_request(stream, "Arith/add", b" " * size + _BODY)


async def reset(raw: RawClient) -> None:
    """Reset the connection (RST, not FIN), as a crashed peer or a proxy would."""
    sock = raw.stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await raw.stream.aclose()


async def add(url: str) -> int:
    async with kubrpc.connect(url) as channel:
        return await channel.stub(Arith, timeout=10).add(1, 2)


# -- max_pending_bytes: a header alone must not reserve the budget -----------------------------------------------


async def test_frame_headers_alone_cannot_reserve_the_servers_budget() -> None:
    """Four 20-byte writes, each announcing a 256 KiB request, used to reserve 1 MiB: everyone got "server busy"."""
    size = 1 << 18
    async with serving(max_message_size=size, max_pending_bytes=1 << 20) as (listener, server, open_raw):
        header = PREFACE + big_request(1, size - 100)[:20]
        peers: list[RawClient] = [await open_raw(header) for _ in range(4)]  # type: ignore[operator]
        await wait_until(lambda: sum(c._decoder.buffered for c in listener.connections) == 4 * 20)
        assert server._pending_bytes <= 4 * 20  # what they sent, not what they announced
        assert await add(listener.url) == 3
        # The bytes are counted as they arrive: a peer that sends its whole frame is still held to the budget.
        for raw in peers:
            await raw.stream.aclose()
        await wait_until(lambda: server._pending_bytes == 0)


async def test_a_frame_that_stalls_is_cut_off_after_the_frame_timeout_and_its_bytes_released() -> None:
    async with serving(max_message_size=1 << 18, listen_frame_timeout=0.3) as (listener, server, open_raw):
        raw: RawClient = await open_raw(PREFACE + big_request(1, 100_000)[:50_000])  # type: ignore[operator]
        await wait_until(lambda: server._pending_bytes >= 50_000)
        assert await raw.closed()
        goaway = [f for f in raw.frames if f.type == FrameType.GOAWAY]
        assert goaway and b"frame not received within 0.3 s" in goaway[0].payload
        await wait_until(lambda: server._pending_bytes == 0 and not listener.connections)
        # A frame that keeps arriving in time is not cut off, however it is sliced.
        slow: RawClient = await open_raw()  # type: ignore[operator]
        wire = big_request(2, 20_000)
        for at in range(0, len(wire), 4000):
            await slow.stream.send(wire[at : at + 4000])
            await anyio.sleep(0.01)
        answer = await slow.frame()
        while answer.type == FrameType.SETTINGS:
            answer = await slow.frame()
        assert (answer.type, answer.payload) == (FrameType.RESPONSE, b"3")


def test_the_frame_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="frame_timeout"):
        TcpTransport(frame_timeout=0)


def test_the_decoder_counts_a_partial_frame_as_its_bytes_arrive() -> None:
    budget = [0]

    def admit(size: int) -> bool:
        if budget[0] and budget[0] + size > 5000:
            return False
        budget[0] += size
        return True

    def release(size: int) -> None:
        budget[0] -= size

    wire = big_request(7, 8000)
    decoder = FrameDecoder(1 << 20, admit, release)
    budget[0] = 1000  # held by others
    assert decoder.feed(wire[:2000]) == [] and budget[0] == 3000
    assert decoder.feed(wire[2000:4000]) == [] and budget[0] == 5000
    # Past the budget mid-frame: the frame is answered as refused, its bytes dropped and released.
    refused = decoder.feed(wire[4000:6000])
    assert [(f.type, f.stream) for f in refused] == [(256, 7)] and budget[0] == 1000 and decoder.buffered == 0
    ping = encode_frame(FrameType.PING, 0, b"x")
    assert decoder.feed(wire[6000:] + ping) == [(FrameType.PING, 0, 0, b"x")]  # the rest is skipped
    # A frame alone may exceed the budget (as a whole request may) when nothing else is held.
    budget[0] = 0
    assert decoder.feed(wire[:7000]) == [] and budget[0] == 7000
    assert [f.stream for f in decoder.feed(wire[7000:])] == [7] and budget[0] == 0
    decoder.feed(wire[:3000])
    decoder.close()  # the connection ended mid-frame
    assert budget[0] == 0


# -- malformed frames close their connection only; harmless ones are ignored ------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(HEADER.pack(2**32 - 1, 1, 0, 1), id="huge-length"),
        pytest.param(HEADER.pack(1024 + FRAME_OVERHEAD + 1, 1, 0, 1), id="just-over-the-limit"),
        pytest.param(encode_frame(FrameType.REQUEST, 1), id="zero-length-request"),
        pytest.param(request(0, "Arith/add", {"a": 1, "b": 2}), id="request-on-stream-0"),
        pytest.param(request(1, "Control/sleep", {"seconds": 5}) * 2, id="stream-id-in-use"),
        pytest.param(b"KUBRPC2\n", id="wrong-preface"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="another-protocol"),  # (HTTP gets an HTTP 400: test_error_messages)
    ],
)
async def test_malformed_input_closes_only_that_connection_and_releases_everything(wire: bytes) -> None:
    async with serving(max_message_size=1024) as (listener, server, open_raw):
        bad_preface = wire.startswith((b"KUBRPC", b"SSH"))
        raw: RawClient = await open_raw(b"" if bad_preface else PREFACE)  # type: ignore[operator]
        await raw.stream.send(wire)
        assert await raw.closed()
        assert [f.type for f in raw.frames][-1] == FrameType.GOAWAY
        await wait_until(lambda: not listener.connections and server._pending_bytes == 0)
        assert await add(listener.url) == 3


async def test_harmless_frames_are_ignored_and_the_connection_goes_on() -> None:
    async with serving(max_message_size=1024) as (_, server, open_raw):
        raw: RawClient = await open_raw()  # type: ignore[operator]
        noise = b"".join(
            [
                encode_frame(99, 0, b"unknown type"),
                encode_frame(99, 5, b"x" * 1000),
                encode_frame(FrameType.CANCEL, 12345),  # an unknown stream
                encode_frame(FrameType.CANCEL, 0),
                encode_frame(FrameType.SETTINGS, 0, b"?"),
                encode_frame(FrameType.GOAWAY, 0, b"\0\0\0\0client"),
                encode_frame(FrameType.RESPONSE, 3, b"3"),
                encode_frame(FrameType.PING, 0, b"", 1),  # an ACK: not answered
            ]
        )
        await raw.stream.send(
            noise * 200 + encode_frame(FrameType.CANCEL, 1) * 5000 + request(1, "Arith/add", {"a": 1, "b": 2})
        )
        answer = await raw.frame()
        while answer.type == FrameType.SETTINGS:
            answer = await raw.frame()
        assert (answer.type, answer.stream, answer.payload) == (FrameType.RESPONSE, 1, b"3")
        assert not raw.frames and server._pending_bytes == 0


async def test_a_preface_trickled_byte_by_byte_is_accepted() -> None:
    async with serving() as (_, _server, open_raw):
        raw: RawClient = await open_raw(b"")  # type: ignore[operator]
        for byte in PREFACE + request(1, "Arith/add", {"a": 1, "b": 2}):
            await raw.stream.send(bytes([byte]))
        assert (await raw.frame()).type == FrameType.SETTINGS
        assert (await raw.frame()).payload == b"3"


# -- the budget returns to zero, and no handler runs twice, whatever happens to a connection ------------------


async def test_every_way_a_connection_can_end_returns_the_budget_and_runs_each_call_once() -> None:
    async with serving(
        max_message_size=1 << 18, idle_timeout=0.5, listen_preface_timeout=0.3, listen_frame_timeout=0.5
    ) as (listener, server, open_raw):
        control = server._routes["Control/sleep"].handler.__self__  # type: ignore[attr-defined]
        sleep = request(1, "Control/sleep", {"seconds": 0.2}, {"x": "y" * 8000})
        cuts = [10, len(PREFACE) + 5, len(PREFACE) + 2000, len(PREFACE) + len(sleep)]
        for cut in cuts:  # reset mid-preface, mid-header, mid-frame, and with the call running
            raw: RawClient = await open_raw(b"")  # type: ignore[operator]
            await raw.stream.send((PREFACE + sleep)[:cut])
            await anyio.sleep(0.05)
            await reset(raw)
        idle: RawClient = await open_raw(PREFACE + sleep[:3000])  # type: ignore[operator]  # cut off by frame_timeout
        silent: RawClient = await open_raw(b"")  # type: ignore[operator]  # cut off by the preface timeout
        done: RawClient = await open_raw(PREFACE + sleep)  # type: ignore[operator]  # answered, then idle: GOAWAY
        for peer in (idle, silent, done):
            assert await peer.closed()
        await wait_until(lambda: not listener.connections and not listener.active_calls)
        assert server._pending_bytes == 0
        assert control.started == 2  # the running one that was reset, and the answered one: once each


# -- metadata: what a call holds in memory, not only what it sent -------------------------------------------------


async def test_max_pending_bytes_bounds_the_memory_of_calls_with_many_small_metadata_entries() -> None:
    """1,450 tiny entries (15 KiB of JSON) held 133 KB per call: 300 calls held 40 MB under an 8 MiB cap."""
    metadata = orjson.dumps({f"k{i}": "" for i in range(1450)})
    budget = 8 << 20
    async with serving(max_message_size=1 << 20, max_pending_bytes=budget) as (listener, server, open_raw):
        raw: RawClient = await open_raw()  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        calls = b"".join(encode_request(s, "Control/sleep", b'{"seconds": 5}', 0, metadata) for s in range(1, 301))
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            await raw.stream.send(calls)
            busy = 0
            with anyio.fail_after(20):
                while busy + sum(len(c.calls) for c in listener.connections) < 300:
                    frame = await raw.frame()
                    assert frame.type == FrameType.ERROR and b"server busy" in frame.payload
                    busy += 1
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert busy > 0 and server._pending_bytes <= budget
        assert held <= budget * 3 // 2  # the old code held 40 MB


# -- draining: calls up to last_stream are answered, later ones are refused as not started -----------------------


async def test_a_drain_answers_every_call_up_to_last_stream_and_refuses_later_ones_unrun() -> None:
    async with serving(max_message_size=1 << 18) as (listener, server, open_raw):
        control = server._routes["Control/sleep"].handler.__self__  # type: ignore[attr-defined]
        raw: RawClient = await open_raw()  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        await raw.stream.send(b"".join(request(s, "Control/sleep", {"seconds": 0.3}) for s in (1, 2, 3)))
        await wait_until(lambda: control.started == 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.drain, 5.0)
            goaway = await raw.frame()
            assert goaway.type == FrameType.GOAWAY and parse_goaway(goaway.payload)[0] == 3
            # Sent after the GOAWAY, partly: refused without running; the partial one is dropped with the socket.
            await raw.stream.send(request(4, "Control/sleep", {"seconds": 0.3}) + big_request(5, 50_000)[:3000])
            answers = {}
            while len(answers) < 4:
                frame = await raw.frame()
                answers[frame.stream] = frame
            assert {s: answers[s].payload for s in (1, 2, 3)} == dict.fromkeys((1, 2, 3), b'"slept"')
            assert answers[4].type == FrameType.ERROR and b"unavailable" in answers[4].payload
            assert await raw.closed()
        assert control.started == 3 and server._pending_bytes == 0


# -- a peer that never reads: what the server holds beyond its write buffer ------------------------------------


def held_frames(conn: object) -> int:
    """Bytes of frames read and not yet handled (as objects in the old code's backlog, as bytes now)."""
    held: int = conn._decoder.buffered  # type: ignore[attr-defined]
    for f in getattr(conn, "_backlog", []):
        held += sys.getsizeof(f) + sys.getsizeof(f.payload) + sys.getsizeof(f.stream) + 8
    return held


async def test_frames_read_before_a_pause_wait_as_bytes_not_objects() -> None:
    """The old code kept the rest of a read as Frame objects: 200 KB of CANCELs held 2.8 MB on a paused connection."""
    async with serving() as (listener, _, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        (conn,) = listener.connections
        pings = encode_frame(FrameType.PING, 0, b"p" * 64) * 3000  # answered: fills the server's write buffer
        cancels = b"".join(encode_frame(FrameType.CANCEL, 1000 + i) for i in range(20_000))
        peak = 0
        with anyio.move_on_after(3):  # the server stops reading: our sends block once TCP's buffers are full
            for _ in range(500):
                await raw.stream.send(pings + cancels)
                peak = max(peak, held_frames(conn))
        await wait_until(lambda: conn._write_paused)
        for _ in range(20):
            peak = max(peak, held_frames(conn))
            await anyio.sleep(0.01)
        assert peak <= 512 * 1024  # one read (256 KiB) at most
        # Reading again: the held frames are handled in order, then the connection goes on.
        async with anyio.create_task_group() as tg:  # our own unsent bytes drain only as the server reads
            tg.start_soon(raw.stream.send, request(1, "Arith/add", {"a": 1, "b": 2}))
            with anyio.fail_after(30):
                while (answer := await raw.frame()).type == FrameType.PING:
                    pass
        assert (answer.type, answer.stream, answer.payload) == (FrameType.RESPONSE, 1, b"3")


# -- the client against broken and hostile servers ------------------------------------------------------------


async def acknowledge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(HELLO_SIZE)
    writer.write(encode_frame(FrameType.SETTINGS, 0))


async def one_request(reader: asyncio.StreamReader) -> int:
    """Read one REQUEST frame whole; return its stream id."""
    length, _, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
    await reader.readexactly(length)
    return int(stream)


async def test_a_malformed_goaway_does_not_make_calls_already_sent_look_undelivered() -> None:
    """The old client read a truncated GOAWAY as last_stream 0: a call the server had run was retried as not sent."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        await one_request(reader)
        writer.write(encode_frame(FrameType.GOAWAY, 0, b"\x00"))  # too short to say which calls it saw
        await anyio.sleep(0.2)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport().connect(endpoint)
        try:
            with pytest.raises(RpcError) as caught:
                await conn.call("Arith/add", _BODY, timeout=10, metadata={})
            assert type(caught.value) is RpcError and caught.value.code is Status.UNAVAILABLE
        finally:
            await conn.aclose()


async def test_a_response_larger_than_max_message_size_is_refused_by_the_client() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream = await one_request(reader)
        writer.write(encode_frame(FrameType.RESPONSE, stream, b'"' + b"x" * 5000 + b'"'))
        await anyio.sleep(1)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(max_message_size=1024).connect(endpoint)
        try:
            with pytest.raises(RpcError, match="response exceeds") as caught:
                await conn.call("Arith/add", _BODY, timeout=10, metadata={})
            assert caught.value.code is Status.RESOURCE_EXHAUSTED
        finally:
            await conn.aclose()


async def test_the_client_survives_noise_and_refuses_servers_that_never_acknowledge() -> None:
    async def noisy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        writer.write(encode_frame(FrameType.SETTINGS, 0, b"again"))
        stream = await one_request(reader)
        for other in (stream + 1, 0, 12345):  # answers for calls that do not exist
            writer.write(encode_frame(FrameType.RESPONSE, other, b"1") + encode_frame(FrameType.ERROR, other, b"?"))
        writer.write(encode_frame(FrameType.PING, 0, b"p") * 10_000 + encode_frame(99, 7, b"unknown"))
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"3"))
        await anyio.sleep(1)

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await anyio.sleep(2)  # accepts, reads nothing, sends nothing

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")  # (an HTTP answer is FAILED_PRECONDITION: test_error_messages)
        await anyio.sleep(1)

    async with fake_server(noisy) as endpoint:
        conn = await TcpTransport().connect(endpoint)
        try:
            assert await conn.call("Arith/add", _BODY, timeout=10, metadata={}) == b"3"
        finally:
            await conn.aclose()
    for script in (mute, garbage):
        async with fake_server(script) as endpoint:
            with pytest.raises(NotDeliveredError):
                await TcpTransport(connect_timeout=0.3).connect(endpoint)


async def test_a_server_that_stalls_mid_frame_costs_the_client_at_most_one_frame_and_the_deadline() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream = await one_request(reader)
        writer.write(HEADER.pack(1024 + FRAME_OVERHEAD, FrameType.RESPONSE, 0, stream) + b"x" * 30_000)
        await anyio.sleep(3)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(max_message_size=1024, keepalive_interval=None).connect(endpoint)
        try:
            with pytest.raises(RpcError) as caught:
                await conn.call("Arith/add", _BODY, timeout=0.3, metadata={})
            assert caught.value.code is Status.DEADLINE_EXCEEDED
            assert conn._decoder.buffered <= 1024 + FRAME_OVERHEAD + HEADER.size
        finally:
            await conn.aclose()


async def test_keepalive_fails_calls_on_a_server_that_went_silent() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        await anyio.sleep(5)  # then reads and answers nothing, PINGs included

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=0.2, keepalive_timeout=0.2).connect(endpoint)
        try:
            with anyio.fail_after(4), pytest.raises(RpcError) as caught:
                await conn.call("Arith/add", _BODY, timeout=None, metadata={})
            assert caught.value.code is Status.UNAVAILABLE
        finally:
            await conn.aclose()


async def test_a_non_reading_peer_that_resets_with_answers_held_returns_everything() -> None:
    async with serving() as (listener, server, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        (conn,) = listener.connections
        with anyio.move_on_after(3):  # answers pile up, then the server holds them and stops reading
            await raw.stream.send(b"".join(request(s, "test.Store/blob", {"size": 100_000}) for s in range(1, 301)))
        await wait_until(lambda: conn._write_paused)
        # Held: requests as calls waiting to write, or (answered within their read) as unread bytes.
        assert server._pending_bytes > 0 or conn._backlogged
        await reset(raw)
        await wait_until(lambda: not listener.connections and not listener.active_calls)
        assert server._pending_bytes == 0
        assert conn._decoder.buffered == 0


async def test_time_the_server_spends_not_reading_does_not_count_against_a_frame() -> None:
    async with serving(listen_frame_timeout=0.5) as (listener, _, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        (conn,) = listener.connections
        calls = b"".join(request(s, "test.Store/blob", {"size": 100_000}) for s in range(1, 101))
        last = big_request(101, 20_000)
        await raw.stream.send(calls + last[:5000])  # answers pile up while the last request is still partial
        await wait_until(lambda: conn._write_paused and conn._decoder.reserved > 0)
        await anyio.sleep(1.5)  # three frame timeouts, during which the server does not read
        assert listener.connections
        async with anyio.create_task_group() as tg:
            tg.start_soon(raw.stream.send, last[5000:])
            answered = set()
            while 101 not in answered:
                frame = await raw.frame()
                assert frame.type == FrameType.RESPONSE, frame.payload[:100]
                answered.add(frame.stream)
