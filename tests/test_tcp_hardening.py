"""Hostile and broken TCP peers over real loopback sockets: silent, non-reading, flooding, hoarding, resetting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import cast

import anyio
import orjson
import pytest
from faultproxy import FaultProxy
from rawtcp import RawClient, raw_opener
from services import Arith, make_server, wait_until

import kubrpc
from kubrpc import Status
from kubrpc.endpoint import Endpoint
from kubrpc.errors import RpcError
from kubrpc.transports._frames import (
    ADMIT_ABOVE,
    PREFACE,
    REFUSED,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_metadata,
    encode_request,
)
from kubrpc.transports._tcp_base import MAX_WRITE_BUFFER
from kubrpc.transports._tcp_server import TcpListener
from kubrpc.transports.tcp import TcpConnection, TcpTransport

pytestmark = pytest.mark.anyio

# What may sit in a write buffer beyond the bound: the frame that crossed it, or one read's worth of answers.
SLACK = 512 * 1024


@asynccontextmanager
async def serving(**options: object) -> AsyncIterator[tuple[TcpListener, kubrpc.Server, Callable[..., object]]]:
    """A test server on tcp://127.0.0.1; `listen_*` options go to the transport. Yields a raw-socket opener."""
    listen = {k.removeprefix("listen_"): v for k, v in options.items() if k.startswith("listen_")}
    server, _ = make_server(**{k: v for k, v in options.items() if not k.startswith("listen_")})
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0", **listen))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        yield listener, server, raw_opener(stack, "127.0.0.1", port)


def request(stream: int, path: str, args: dict[str, object], metadata: dict[str, str] | None = None) -> bytes:
    return encode_request(stream, path, orjson.dumps(args), 0, encode_metadata(metadata or {}))


# -- 16.6: the server acknowledges the preface ---------------------------------------------------------------


async def test_the_server_acknowledges_a_good_preface_with_settings_first() -> None:
    async with serving() as (_, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + request(1, "Arith/add", {"a": 1, "b": 2}))  # type: ignore[operator]
        assert await raw.frame() == Frame(FrameType.SETTINGS, 0, 0, b"")
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 1, b"3")
        # The exact bytes docs/protocol.md gives for it.
        assert encode_frame(FrameType.SETTINGS, 0) == bytes.fromhex("00000000 07 00 00000000")
        # What the kubrpc client sends first: the preface and a PING, which old servers answer too.
        hello = PREFACE + encode_frame(FrameType.PING, 0, b"kubrpcok")
        raw = await open_raw(hello + request(1, "Arith/add", {"a": 1, "b": 2}))  # type: ignore[operator]
        assert await raw.frame() == Frame(FrameType.SETTINGS, 0, 0, b"")
        assert await raw.frame() == Frame(FrameType.PING, 1, 0, b"kubrpcok")
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 1, b"3")


async def test_an_endpoint_that_accepts_then_resets_costs_a_connect_failure_not_a_call() -> None:
    async with AsyncExitStack() as stack:
        good = [await stack.enter_async_context(serving()) for _ in range(2)]
        # A mesh sidecar in front of a crashed app: it accepts, then resets at once.
        bad = await stack.enter_async_context(FaultProxy(mode="accept_then_reset"))
        endpoints = [Endpoint("127.0.0.1", int(listener.url.rsplit(":", 1)[1])) for listener, _, _ in good]
        endpoints.insert(1, Endpoint("127.0.0.1", bad.port))
        async with kubrpc.connect(endpoints, transport="tcp", balancer="round_robin") as channel:
            arith = channel.stub(Arith, timeout=10)  # Arith.add is not idempotent: only "not delivered" retries
            failures = 0
            for i in range(300):
                try:
                    assert await arith.add(i, 1) == i + 1
                except RpcError:
                    failures += 1
        assert failures == 0
        # Each reset is a connect failure: the endpoint gets the connect backoff (0.05 s doubling to 5 s), not
        # a reconnect per call (the old code: one per call that picked it, a third of them failing).
        assert 1 <= bad.accepted <= 30


async def test_a_connection_is_not_ready_until_the_server_acknowledges_it() -> None:
    async with FaultProxy(mode="accept_then_reset") as bad:
        transport = TcpTransport(connect_timeout=5)
        with pytest.raises(kubrpc.errors.NotDeliveredError, match="lost before the server acknowledged"):
            await transport.connect(Endpoint("127.0.0.1", bad.port))
        assert bad.accepted == 1


async def test_a_connection_sent_away_before_it_is_acknowledged_is_a_connect_failure() -> None:
    async with serving(max_connections=1) as (listener, _, open_raw):
        first: RawClient = await open_raw()  # type: ignore[operator]
        assert (await first.frame()).type == FrameType.SETTINGS
        endpoint = Endpoint("127.0.0.1", int(listener.url.rsplit(":", 1)[1]))
        with pytest.raises(kubrpc.errors.NotDeliveredError, match="too many connections"):
            await TcpTransport().connect(endpoint)


# -- 9.9: a preface timeout ------------------------------------------------------------------------------------


async def test_silent_connections_are_closed_after_the_preface_timeout_and_free_their_slots() -> None:
    async with serving(max_connections=3, listen_preface_timeout=0.3) as (listener, _, open_raw):
        silent: list[RawClient] = [await open_raw(b"") for _ in range(2)]  # type: ignore[operator]
        half: RawClient = await open_raw(PREFACE[:3])  # type: ignore[operator]
        for raw in [*silent, half]:
            assert await raw.closed()
        goaway = [f for f in half.frames if f.type == FrameType.GOAWAY]
        assert goaway and b"no preface within 0.3 s" in goaway[0].payload
        await wait_until(lambda: not listener.connections)
        async with kubrpc.connect(listener.url) as channel:
            assert await channel.stub(Arith, timeout=5).add(1, 2) == 3


def test_the_preface_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="preface_timeout"):
        TcpTransport(preface_timeout=0)


# -- 9.7: a peer that never reads ------------------------------------------------------------------------------


async def test_a_peer_that_never_reads_gets_a_bounded_write_buffer_and_then_every_answer() -> None:
    size = 100_000  # each answer ~133 KiB of base64: 300 of them are ~40 MiB
    async with serving() as (listener, _, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        blob = b"".join(request(s, "test.Store/blob", {"size": size}) for s in range(1, 151))
        await raw.stream.send(blob)
        (conn,) = listener.connections
        assert conn.transport is not None
        await wait_until(lambda: conn._write_paused, timeout=10)
        # More requests while paused: read later, and held back (not run) while the peer still does not read.
        await raw.stream.send(b"".join(request(s, "test.Store/blob", {"size": size}) for s in range(151, 301)))
        peak = 0
        for _ in range(20):
            peak = max(peak, conn.transport.get_write_buffer_size() + sum(map(len, conn._out)))
            await anyio.sleep(0.01)
        assert conn._write_paused
        assert peak <= MAX_WRITE_BUFFER + SLACK
        # Now read: every call is answered, in any order, and the connection keeps working.
        streams: set[int] = set()
        while len(streams) < 300:
            frame = await raw.frame()
            assert frame.type == FrameType.RESPONSE, frame.payload[:200]
            streams.add(frame.stream)
        assert streams == set(range(1, 301))
        await raw.stream.send(request(301, "Arith/add", {"a": 2, "b": 2}))
        assert await raw.frame() == Frame(FrameType.RESPONSE, 0, 301, b"4")


async def test_a_peer_that_never_reads_is_closed_after_the_idle_timeout_even_with_calls_held() -> None:
    async with serving(idle_timeout=0.5) as (listener, _, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        await raw.stream.send(b"".join(request(s, "test.Store/blob", {"size": 100_000}) for s in range(1, 101)))
        (conn,) = listener.connections
        await wait_until(lambda: conn._write_paused, timeout=10)
        await wait_until(lambda: not listener.connections, timeout=10)  # its calls are cancelled, its socket freed
        await wait_until(lambda: listener.active_calls == 0, timeout=10)


async def test_a_peer_flooding_pings_without_reading_gets_a_bounded_write_buffer() -> None:
    async with serving() as (listener, _, open_raw):
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        (conn,) = listener.connections
        assert conn.transport is not None
        burst = encode_frame(FrameType.PING, 0, b"p" * 64) * 1000
        with anyio.move_on_after(2):  # the server stops reading: our sends block once TCP's buffers are full
            for _ in range(2000):  # at most 148 MB of PINGs
                await raw.stream.send(burst)
        assert conn.transport.get_write_buffer_size() <= MAX_WRITE_BUFFER + SLACK
        assert conn._write_paused


# -- 9.8: max_pending_bytes counts metadata and partly received frames -------------------------------------


async def test_max_pending_bytes_counts_metadata() -> None:
    async with serving(max_message_size=4096, max_pending_bytes=64 * 1024) as (_, _, open_raw):
        raw: RawClient = await open_raw()  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        metadata = {"x-big": "m" * 15_000}
        await raw.stream.send(b"".join(request(s, "Control/sleep", {"seconds": 30}, metadata) for s in range(1, 41)))
        busy = 0
        while busy < 30:  # 64 KiB holds four such calls; the old code ran all forty
            frame = await raw.frame()
            assert frame.type == FrameType.ERROR
            error = RpcError.from_json(orjson.loads(frame.payload))
            assert (error.code, error.message) == (Status.RESOURCE_EXHAUSTED, "server busy")
            busy += 1


async def test_max_pending_bytes_counts_frames_still_arriving() -> None:
    body = b" " * 1_000_000 + b'{"a": 1, "b": 2}'  # JSON whitespace: a valid 1 MB request
    whole = encode_request(1, "Arith/add", body)
    frame = whole[:-16]  # all but 16 bytes: the server holds it until the rest arrives
    async with serving(max_message_size=1 << 20, max_pending_bytes=1 << 20) as (listener, _, open_raw):
        peers: list[RawClient] = [await open_raw(PREFACE + frame) for _ in range(8)]  # type: ignore[operator]
        refused: list[RawClient] = []
        for raw in peers:
            with anyio.move_on_after(1):  # the one admitted waits for its last bytes: no answer yet
                assert (await raw.frame()).type == FrameType.SETTINGS
                answer = await raw.frame()
                assert answer.type == FrameType.ERROR and answer.stream == 1
                assert b"server busy" in answer.payload
                refused.append(raw)
        assert len(refused) >= 6  # the old code buffered all eight (and answered none)
        held = sum(c._decoder.buffered for c in listener.connections)
        assert held <= (1 << 20) + SLACK
        # A refused frame's remaining bytes are discarded as they arrive; the connection then goes on.
        await refused[0].stream.send(whole[-16:] + request(3, "Arith/add", {"a": 2, "b": 3}))
        assert await refused[0].frame() == Frame(FrameType.RESPONSE, 0, 3, b"5")


def test_the_decoder_counts_a_partial_frame_as_it_arrives_and_skips_a_refused_one() -> None:
    budget = [0]

    def admit(size: int) -> bool:
        if budget[0] + size > 100:
            return False
        budget[0] += size
        return True

    def release(size: int) -> None:
        budget[0] -= size

    n = ADMIT_ABOVE + 1
    wire = encode_frame(FrameType.REQUEST, 1, b"a" * n) + encode_frame(FrameType.PING, 0, b"b" * 8)
    first, second = FrameDecoder(1 << 20, admit, release), FrameDecoder(1 << 20, admit, release)
    budget[0] = 100 - 30  # room for 30 bytes
    assert first.feed(wire[:30]) == [] and budget[0] == 100  # counted as its bytes arrive
    assert second.feed(wire[:20]) == [Frame(REFUSED, 0, 1, b"")]  # over budget: answered, not buffered
    assert second.buffered == 0 and budget[0] == 100
    for at in range(20, len(wire)):  # the rest of the refused frame is discarded, byte by byte
        got = second.feed(wire[at : at + 1])
    assert got == [Frame(FrameType.PING, 0, 0, b"b" * 8)]  # a short frame is never refused while partial
    assert first.feed(wire[30:]) == [Frame(FrameType.REQUEST, 0, 1, b"a" * n), Frame(FrameType.PING, 0, 0, b"b" * 8)]
    assert budget[0] == 70  # released when complete: the receiver admits the whole frame again
    first.feed(wire[:30])
    first.close()  # the connection ended mid-frame
    assert budget[0] == 70


# -- 9.10: the client's own writes -------------------------------------------------------------------------


@asynccontextmanager
async def ping_flooder() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A broken server: acknowledges the preface, then floods PINGs and never reads. Sets the event when done."""
    done = asyncio.Event()
    burst = encode_frame(FrameType.PING, 0, b"p" * 64) * 1000
    tasks: set[asyncio.Task[None]] = set()
    accepted: list[asyncio.Transport] = []

    class Flood(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            accepted.append(self.transport)
            self.writable = asyncio.Event()
            self.writable.set()

        def data_received(self, data: bytes) -> None:  # the preface: from now on, read nothing
            self.transport.pause_reading()
            self.transport.write(encode_frame(FrameType.SETTINGS, 0))
            task = asyncio.get_running_loop().create_task(self.flood())
            tasks.add(task)

        async def flood(self) -> None:
            with anyio.move_on_after(2):  # the client stops reading: we stop once TCP's buffers are full
                for _ in range(2000):  # at most 148 MB
                    await self.writable.wait()
                    self.transport.write(burst)
                    await asyncio.sleep(0)
            done.set()

        def pause_writing(self) -> None:
            self.writable.clear()

        def resume_writing(self) -> None:
            self.writable.set()

    server = await asyncio.get_running_loop().create_server(Flood, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in accepted:
            transport.abort()
        server.close()
        await server.wait_closed()


async def test_a_server_flooding_pings_cannot_grow_the_clients_write_buffer() -> None:
    async with ping_flooder() as (port, done):
        conn: TcpConnection = await TcpTransport().connect(Endpoint("127.0.0.1", port))
        try:
            with anyio.fail_after(20):
                await done.wait()
            assert conn.transport is not None
            assert conn.transport.get_write_buffer_size() <= MAX_WRITE_BUFFER + SLACK
            assert conn._write_paused
            # A new call waits for the server to read, within its deadline, and then says why it failed.
            with pytest.raises(RpcError, match="not reading") as info:
                await conn.call("Arith/add", b'{"a":1,"b":2}', timeout=0.2, metadata={})
            assert info.value.code is Status.DEADLINE_EXCEEDED
            assert conn.in_flight == 0
        finally:
            await conn.aclose()


async def test_bulk_calls_both_ways_on_one_connection_never_wait_on_each_other() -> None:
    """Both ends hold writes past the bound; the client keeps reading, so the two can never both stop reading."""
    from services import Store

    async with serving() as (listener, _, _), kubrpc.connect(listener.url) as channel:
        store = channel.stub(Store)
        text = "x" * 900_000

        async def echo(i: int) -> None:
            assert await store.echo((i, text), "a") == (i, text)

        with anyio.fail_after(60):  # a hang guard: the calls take well under a second when nothing deadlocks
            async with anyio.create_task_group() as tg:
                for i in range(48):
                    tg.start_soon(echo, i)
