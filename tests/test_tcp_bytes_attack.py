"""Hostile peers against the raw-bytes path of the TCP transport (docs/protocol.md, "Attachments"): flags on
frames that never carry them, lying and unasked SETTINGS, frames split across reads, exactness of every shape,
streams against flow control, reconnection and mixed fleets; over real sockets and through the public API."""

from __future__ import annotations

import asyncio
import base64
import tracemalloc
import typing
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Protocol

import anyio
import anyio.lowlevel
import orjson
import pytest
from rawtcp import RawClient, raw_opener
from test_tcp_attack import fake_server
from test_tcp_bytes import (
    ASK,
    Blob,
    Files,
    FilesImpl,
    answer,
    attached_request,
    message,
    negotiated,
    raw,
    serving,
)

import kubrpc
from kubrpc import RpcError, Status, codec
from kubrpc.transports._frames import (
    FLAG_ACK,
    FLAG_ATTACHED,
    HEADER,
    PREFACE,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_message,
    encode_request,
    encode_settings,
    encode_window_update,
)

pytestmark = pytest.mark.anyio


async def test_flag_attached_on_frames_that_never_carry_it_is_ignored_by_the_client() -> None:
    """Bit 3 means ATTACHED on REQUEST, RESPONSE and DATA only; elsewhere it is a flag the client does not know,
    which it ignores: an ERROR with it keeps its code and message (it was read as 'malformed error body')."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(encode_frame(FrameType.SETTINGS, 0, b"", FLAG_ATTACHED))
        decoder = FrameDecoder(1 << 20)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.type == FrameType.REQUEST:
                    writer.write(encode_frame(FrameType.PING, 0, b"12345678", FLAG_ATTACHED))
                    error = orjson.dumps({"code": "not_found", "message": "no such file"})
                    writer.write(encode_frame(FrameType.ERROR, frame.stream, error, FLAG_ATTACHED))
                elif frame.type == FrameType.PING and frame.flags & FLAG_ACK:
                    pongs.append(frame.payload)

    pongs: list[bytes] = []
    async with fake_server(script) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)
        for _ in range(2):
            with pytest.raises(RpcError) as caught:
                await files.get("a")
            assert (caught.value.code, caught.value.message) == (Status.NOT_FOUND, "no such file")
        with anyio.fail_after(5):
            while len(pongs) < 2:
                await anyio.sleep(0.01)
        assert pongs == [b"12345678", b"12345678"]


async def test_flag_attached_on_frames_that_never_carry_it_is_ignored_by_the_server() -> None:
    """The server ignores bit 3 on PING, WINDOW_UPDATE, CANCEL, END and SETTINGS: PINGs are echoed as sent."""
    async with raw() as (open_raw, _, _):
        client: RawClient = await open_raw(PREFACE + encode_frame(FrameType.PING, 0, b"p" * 8, FLAG_ATTACHED))
        frame = await answer(client, 0)
        while frame.type != FrameType.PING:
            frame = await answer(client, 0)
        assert (frame.flags, frame.payload) == (FLAG_ACK, b"p" * 8)
        big_ping = encode_frame(FrameType.PING, 0, b"q" * 5000, FLAG_ATTACHED)  # over 4 KiB: the view path
        await client.send(big_ping + encode_frame(FrameType.SETTINGS, 0, ASK[HEADER.size :], FLAG_ATTACHED))
        await client.send(encode_frame(FrameType.CANCEL, 7, b"", FLAG_ATTACHED))
        await client.send(encode_window_update(9, 10)[:5] + bytes([FLAG_ATTACHED]) + encode_window_update(9, 10)[6:])
        frames = [await client.frame(), await client.frame()]
        assert Frame(FrameType.PING, FLAG_ACK, 0, b"q" * 64) in frames
        assert Frame(FrameType.SETTINGS, 0, 0, ASK[HEADER.size :]) in frames
        await client.send(attached_request(3, "Files/get", message({"name": "a"})))
        assert (await answer(client, 3)).payload == message(0, b"\x00\x01\xff")


async def test_settings_garbage_and_floods_are_answered_once_and_cost_nothing_held() -> None:
    async with raw() as (open_raw, _, url):
        junk = [
            encode_frame(FrameType.SETTINGS, 0, b"\x00\x01\x00"),  # a partial entry alone
            encode_frame(FrameType.SETTINGS, 0, b"\x00\x01\x00\x00\x00\x00\x00"),  # {1: 0} and one byte
            encode_settings((2, 1), (0xFFFF, 0xFFFFFFFF)),  # unknown ids
            encode_frame(FrameType.SETTINGS, 0, encode_settings((1, 0))[HEADER.size :] * 100_000),  # 600 KB of no
            encode_frame(FrameType.SETTINGS, 5, ASK[HEADER.size :]),  # on a stream id: still the connection's
        ]
        client: RawClient = await open_raw(PREFACE + b"".join(junk))
        await client.send(encode_settings((1, 0xFFFFFFFF)) + ASK * 1000 + encode_frame(FrameType.PING, 0, b"mark"))
        frames = []
        while (frame := await client.frame()).type != FrameType.PING:
            frames.append(frame)
        answers = [f for f in frames if f.type == FrameType.SETTINGS and f.payload]
        assert answers == [Frame(FrameType.SETTINGS, 0, 0, ASK[HEADER.size :])]
        await client.send(attached_request(1, "Files/get", message({"name": "a"})))
        assert (await answer(client, 1)).payload == message(0, b"\x00\x01\xff")
        async with kubrpc.connect(url) as channel:
            assert await channel.stub(Files, timeout=5).get("a") == b"\x00\x01\xff"


async def test_an_index_in_a_message_without_the_flag_is_a_wrong_type() -> None:
    async with raw() as (open_raw, impl, _):
        client: RawClient = await open_raw(PREFACE + ASK + encode_request(1, "Files/put", b'{"name":"z","data":0}'))
        frame = await answer(client, 1)
        while frame.type == FrameType.SETTINGS:
            frame = await answer(client, 1)
        assert frame.type == FrameType.ERROR and b"expected base64 string, got integer" in frame.payload
        assert "z" not in impl.files


async def test_a_request_flagged_before_any_settings_is_read_and_answered_in_the_format() -> None:
    """The flag on a REQUEST says the client reads the format: no SETTINGS needed (docs/protocol.md)."""
    async with raw() as (open_raw, impl, _):
        client: RawClient = await open_raw(
            PREFACE + attached_request(1, "Files/put", message({"name": "n", "data": 0}, b""))
        )
        assert (await answer(client, 1)).payload == b"0"
        assert impl.files["n"] == b""


async def test_frames_over_4k_split_across_reads_with_small_ones_between_while_handlers_hold_their_bytes() -> None:
    """Large attached frames leave the receive buffer as copies: it can grow and shrink under held arguments."""
    async with raw() as (open_raw, impl, _):
        client: RawClient = await open_raw()
        wire = b""
        for i in range(20):
            size = 4090 + 997 * i
            wire += attached_request(2 * i + 1, "Files/put", message({"name": f"f{i}", "data": 0}, bytes([i]) * size))
            wire += encode_frame(FrameType.PING, 0, b"x")
        for at in range(0, len(wire), 1777):
            await client.send(wire[at : at + 1777])
            await anyio.lowlevel.checkpoint()
        results = {}
        with anyio.fail_after(10):
            while len(results) < 20:
                frame = await client.frame()
                if frame.type == FrameType.RESPONSE:
                    results[frame.stream] = frame.payload
        assert results == {2 * i + 1: str(4090 + 997 * i).encode() for i in range(20)}
        assert all(impl.files[f"f{i}"] == bytes([i]) * (4090 + 997 * i) for i in range(20))
        assert all(type(impl.files[f"f{i}"]) is bytes for i in range(20))


class Sub(bytes):
    pass


async def test_every_length_and_shape_round_trips_exactly() -> None:
    """Lengths 0..70 in every container, bytes-like arguments, a bytes subclass as a result: all exact."""
    async with serving() as (url, impl, recorder):
        async with kubrpc.connect(url) as channel:
            files = channel.stub(Files, timeout=5)
            await files.get("a")
            await negotiated(channel)
            for n in range(71):
                data = bytes(range(256))[:n] * (1 + n // 40)
                parts = [data[:k] for k in range(0, len(data) + 1, 7)]
                blob = Blob("x", data, parts, {"k": data, "": b""}, data if n % 2 else None, [Blob("y", data)])
                assert await files.echo(blob) == blob
                assert await files.many(parts) == parts
                assert await files.put(f"p{n}", bytearray(data)) == len(data)
                assert await files.put(f"m{n}", memoryview(data)) == len(data)
                assert impl.files[f"m{n}"] == data and type(impl.files[f"m{n}"]) is bytes
            impl.files["sub"] = Sub(b"\x00sub")
            got = await files.get("sub")
            assert got == b"\x00sub" and type(got) is bytes
            same = b"twice"
            assert await files.many([same, same, b""]) == [same, same, b""]
            assert await files.same(same, same) is True  # one object sent once: one object received
        flags = recorder.flags(FrameType.REQUEST, recorder.to_server)
        assert flags[0] == 0 and all(f & FLAG_ATTACHED for f in flags[1:])


async def test_streams_carry_one_mib_messages_through_the_256k_window_both_ways() -> None:
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=30)
        await files.get("a")
        await negotiated(channel)
        big = 1 << 20
        got = [c async for c in files.chunks(3, big)]
        assert [len(c) for c in got] == [big] * 3 and got[2][0] == 2

        async def items() -> AsyncIterator[Blob]:
            for i in range(3):
                yield Blob("b", bytes([i]) * big, [b"a" * 70_000, b""])

        assert await files.total(items()) == 3 * (big + 70_000)
    data = [f for f in recorder.to_server + recorder.to_client if f.type == FrameType.DATA]
    assert len(data) == 6 and all(f.flags & FLAG_ATTACHED for f in data)


async def test_negotiation_starts_over_on_a_new_connection_after_the_server_restarts() -> None:
    server = kubrpc.Server()
    server.register(Files, FilesImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener:
        url = listener.url
    seen: list[object] = []
    async with kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=5)
        for _ in range(2):
            async with server.serve(url):
                with anyio.fail_after(10):
                    while True:
                        try:
                            assert await files.get("a") == b"\x00\x01\xff"
                            break
                        except RpcError as exc:
                            assert exc.code is Status.UNAVAILABLE
                            await anyio.sleep(0.05)
                conn = list(channel.connections.values())[0]
                assert conn not in seen
                seen.append(conn)
                await negotiated(channel)
                assert await files.put("b", b"raw") == 3


async def test_a_mixed_fleet_and_a_goaway_on_the_first_call_keep_every_value_exact() -> None:
    """Old servers (no SETTINGS answer, base64 only), one of which sends GOAWAY before running its first call,
    and a new one: every call lands somewhere, in the format that server reads, with the right value."""
    seen: list[Frame] = []

    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE))
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        decoder = FrameDecoder(1 << 24)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                seen.append(frame)
                if frame.type == FrameType.REQUEST:
                    if state["goaway_first"] and len([f for f in seen if f.type == FrameType.REQUEST]) == 1:
                        writer.write(encode_frame(FrameType.GOAWAY, 0, bytes(4) + b"bye"))
                        continue
                    body = orjson.loads(frame.payload[frame.payload.index(b"{") :])
                    size = len(base64.b64decode(body["data"]))
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, orjson.dumps(size)))

    state = {"goaway_first": False}
    for goaway_first in (False, True):
        state["goaway_first"] = goaway_first
        seen.clear()
        async with serving() as (url, impl, recorder), fake_server(old_server) as old:
            host, port = url.removeprefix("tcp://").rsplit(":", 1)
            async with kubrpc.connect([old, kubrpc.Endpoint(host, int(port))], balancer="round_robin") as channel:
                files = channel.stub(Files, timeout=5)
                for n in range(40):
                    assert await files.put(f"k{n}", bytes([n]) * n) == n
                    if n == 10:
                        await negotiated_some(channel)
            assert all(f.flags & FLAG_ATTACHED == 0 for f in seen if f.type == FrameType.REQUEST)
            assert any(f.flags & FLAG_ATTACHED for f in recorder.to_server if f.type == FrameType.REQUEST)
            assert all(impl.files[f"k{n}"] == bytes([n]) * n for n in range(40) if f"k{n}" in impl.files)


async def negotiated_some(channel: kubrpc.Channel) -> None:
    with anyio.fail_after(10):
        while not any(getattr(c, "attachments", False) for c in channel.connections.values()):
            await anyio.sleep(0.01)


async def test_settings_the_client_never_asked_for_do_not_switch_it_to_the_format() -> None:
    """A server that says {1: 1} first (as its preface acknowledgement, and again before the client asks), then
    never answers the client's SETTINGS: the client keeps plain JSON."""
    seen: list[Frame] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(ASK + ASK)
        decoder = FrameDecoder(1 << 24)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                seen.append(frame)
                if frame.type == FrameType.REQUEST:
                    body = orjson.loads(frame.payload[frame.payload.index(b"{") :])
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, orjson.dumps(len(body["data"]))))

    async with fake_server(script) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)
        await anyio.sleep(0.1)  # the unasked SETTINGS have arrived
        for _ in range(3):
            assert await files.put("a", b"ABC") == 4  # base64
            await anyio.sleep(0.05)
    assert [f.flags for f in seen if f.type == FrameType.REQUEST] == [0, 0, 0]


class Loose(Protocol):
    async def bare_list(self, data: bytes, extra: typing.List) -> typing.Dict:  # type: ignore[type-arg]  # noqa: UP006
        ...

    async def bare_tuple(self, data: bytes, extra: typing.Tuple) -> typing.Set:  # type: ignore[type-arg]  # noqa: UP006
        ...


class LooseImpl:
    async def bare_list(self, data: bytes, extra: typing.List) -> typing.Dict:  # type: ignore[type-arg]  # noqa: UP006
        return {"n": len(data), "extra": extra, "raw": b"r"}

    async def bare_tuple(self, data: bytes, extra: typing.Tuple) -> typing.Set:  # type: ignore[type-arg]  # noqa: UP006
        return {len(data), *extra}


async def test_bytes_in_unparametrised_typing_aliases_stay_base64() -> None:
    """typing.List, typing.Dict, typing.Tuple and typing.Set without arguments hold Any, as list and dict do: an
    index there would be read as an int (INVALID_ARGUMENT, or INTERNAL for a result), so such methods stay plain."""
    server = kubrpc.Server()
    server.register(Loose, LooseImpl())
    server.register(Files, FilesImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        await channel.stub(Files, timeout=5).get("a")
        await negotiated(channel)
        loose = channel.stub(Loose, timeout=5)
        assert await loose.bare_list(b"abc", [b"x", 1]) == {"n": 3, "extra": ["eA==", 1], "raw": "cg=="}
        assert await loose.bare_tuple(b"abcd", (b"x",)) == {4, "eA=="}


def test_many_small_attachments_are_written_in_few_parts_and_large_ones_uncopied() -> None:
    """65,536 one-byte attachments were 65,537 parts: a transport write (a send()) each, on both sides."""
    tiny = codec.pack([b"x"] * codec.MAX_ATTACHMENTS)
    parts = encode_message(FrameType.RESPONSE, 1, tiny)
    assert len(parts) == 1
    big, small = bytearray(b"B" * 70_000), [b"s%d" % i for i in range(4)]
    view = memoryview(b"V" * 80_000)
    mixed = codec.pack([small[0], big, small[1], small[2], view, small[3]])
    parts = encode_message(FrameType.DATA, 3, mixed)
    assert len(parts) == 5 and parts[1] == big and parts[3] is view  # a view of bytes goes uncopied
    frame = b"".join(parts)
    [decoded] = FrameDecoder(1 << 20).feed(frame)
    assert type(decoded.payload) is codec.Packed and decoded.flags == FLAG_ATTACHED
    dec = codec.decoder(list[bytes])
    assert codec.unpacked(decoded.payload, lambda json: dec(orjson.loads(json), "")) == [
        small[0],
        bytes(big),
        small[1],
        small[2],
        bytes(view),
        small[3],
    ]


async def test_stream_answers_in_the_format_the_stream_did_not_ask_for_fail_cleanly() -> None:
    """A server sends DATA, or a client stream's RESPONSE, flagged on streams opened plain: the DATA is a protocol
    error (the connection ends, its calls fail UNAVAILABLE), the RESPONSE fails its call INTERNAL; nothing hangs."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        decoder = FrameDecoder(1 << 24)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.type != FrameType.REQUEST:
                    continue
                writer.write(encode_window_update(frame.stream, 1 << 16))
                if b"Files/total" in frame.payload:
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, message(0, b"x"), FLAG_ATTACHED))
                else:
                    writer.write(encode_frame(FrameType.DATA, frame.stream, message(0, b"x"), FLAG_ATTACHED))

    async with fake_server(script) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)

        async def none() -> AsyncIterator[Blob]:
            return
            yield

        with anyio.fail_after(10):
            with pytest.raises(RpcError, match="did not ask for") as caught:
                await files.total(none())
            assert caught.value.code is Status.INTERNAL
            with pytest.raises(RpcError) as caught:
                [c async for c in files.chunks(1, 1)]
            assert caught.value.code is Status.UNAVAILABLE


class Shared(Protocol):
    async def log(self) -> bytes: ...

    async def big(self) -> bytes: ...


class SharedImpl:
    """`log` returns the server's live buffer (a bytearray, which bytes results may be) once released."""

    def __init__(self) -> None:
        self.buffer = bytearray(b"L" * 100_000)  # a frame part of its own (not joined)
        self.release = asyncio.Event()
        self.returned = False

    async def log(self) -> bytes:
        await self.release.wait()
        self.returned = True
        return self.buffer  # type: ignore[return-value]

    async def big(self) -> bytes:
        return b"B" * (3 << 20)


async def test_a_bytearray_result_changed_while_its_answer_waits_keeps_the_connection_in_step() -> None:
    """An attached RESPONSE is framed (lengths in its header and table) before it waits for the client to read;
    its large attachments were written as the handler's own objects: a bytearray result changed meanwhile made a
    frame whose bytes did not match its header, and every later frame of the connection garbage."""
    server = kubrpc.Server()
    impl = SharedImpl()
    server.register(Shared, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener, AsyncExitStack() as stack:
        host, port = listener.url.removeprefix("tcp://").rsplit(":", 1)
        client: RawClient = await raw_opener(stack, host, int(port))(rcvbuf=64 * 1024)
        assert (await client.frame()).type == FrameType.SETTINGS
        client.stop_reading()
        bigs = [attached_request(3 + 2 * i, "Shared/big", message({})) for i in range(8)]
        await client.send(attached_request(1, "Shared/log", message({})) + b"".join(bigs))
        (conn,) = listener.connections
        with anyio.fail_after(10):
            while not conn._write_paused:
                await anyio.sleep(0.01)
            impl.release.set()
            while not impl.returned:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # its answer waits for the client to read
        impl.buffer += b"M" * 50  # the server changes its buffer meanwhile
        frames = {}
        with anyio.fail_after(30):
            while len(frames) < 9:
                frame = await client.frame()
                frames[frame.stream] = frame
        assert all(frames[3 + 2 * i].payload == message(0, b"B" * (3 << 20)) for i in range(8))
        assert frames[1].payload == message(0, b"L" * 100_000)  # as returned, as base64 would have been
        await client.send(encode_frame(FrameType.PING, 0, b"still ok"))
        assert (await client.frame()).payload == b"still ok"


def test_mutable_attachments_are_copied_before_the_transport_may_keep_them() -> None:
    """uvloop and asyncio 3.12+ keep a bytearray given to transport.write() until it is sent (measured: a later
    change was sent, a resize sent more bytes than the frame's header says, or failed in the caller with
    "BufferError: Existing exports of data: object cannot be re-sized"): only immutable parts reach it."""
    buffer = bytearray(b"A" * 100_000)
    view_of_mutable = memoryview(bytearray(b"C" * 90_000))
    after_big = bytearray(b"s" * 10)
    message = codec.pack([buffer, view_of_mutable, b"B" * 70_000, after_big])
    parts = encode_message(FrameType.RESPONSE, 1, message)
    assert all(isinstance(p, bytes) or (isinstance(p, memoryview) and isinstance(p.obj, bytes)) for p in parts)
    frame = b"".join(parts)
    buffer += b"B" * 10  # the caller changes its buffer: what was framed stays whole
    after_big[0:1] = b"Z"
    assert b"".join(parts) == frame
    [decoded] = FrameDecoder(1 << 20).feed(frame)
    assert decoded.payload.endswith(b"s" * 10)


async def test_one_attachment_referred_to_many_times_is_sent_back_once_not_multiplied() -> None:
    """A peer may refer to one attachment many times (one bytes object); the encoder wrote each reference as an
    attachment of its own, over 65,536 as base64: an echo of 1 KB referred to 70,000 times (a 141 KB request)
    encoded 93 MB before failing RESOURCE_EXHAUSTED. Each object is now one attachment, however often it appears."""
    count = 70_000
    async with raw() as (open_raw, _, _):
        client: RawClient = await open_raw()
        request = attached_request(1, "Files/many", message({"items": [0] * count}, b"k" * 1000))
        tracemalloc.start()
        try:
            await client.send(request)
            frame = await answer(client, 1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert frame.type == FrameType.RESPONSE, frame.payload[:200]
        assert frame.payload == message([0] * count, b"k" * 1000)
        # orjson alone peaks at 17 MB writing 70,000 small integers; the old encoder's base64 took over 93 MB.
        assert peak < 40 << 20, (peak, len(request))


def test_the_encoder_sends_each_bytes_object_once() -> None:
    data, view = b"d" * 10, memoryview(bytearray(b"v" * 5))
    packed = codec.pack({"a": [data, data, b"", view, view], "b": data})
    assert bytes(packed) == b'{"a":[0,0,1,2,2],"b":0}'
    assert [bytes(a) for a in packed.attachments] == [data, b"", b"vvvvv"]
