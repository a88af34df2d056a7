"""`bytes` values as raw attachments on the TCP wire (docs/protocol.md, "Attachments"): negotiation, nesting,
streams, the documented bytes, and hostile messages, over real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import tracemalloc
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson
import pytest
from rawtcp import RawClient, raw_opener
from services import Arith, ArithImpl
from test_tcp_attack import fake_server

import kubrpc
from kubrpc import RpcError, Status, codec
from kubrpc.interface import service_spec
from kubrpc.transports._frames import (
    FLAG_ATTACHED,
    FLAG_CLIENT_STREAMS,
    HEADER,
    PREFACE,
    SETTING_ATTACHMENTS,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_message,
    encode_request,
    encode_settings,
    encode_window_update,
)
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio

ASK = encode_settings((SETTING_ATTACHMENTS, 1))


@dataclass
class Blob:
    name: str
    data: bytes
    parts: list[bytes] = field(default_factory=list)
    by_key: dict[str, bytes] = field(default_factory=dict)
    maybe: bytes | None = None
    nested: list[Blob] = field(default_factory=list)


class Files(Protocol):
    async def put(self, name: str, data: bytes) -> int: ...

    async def get(self, name: str) -> bytes: ...

    async def echo(self, blob: Blob) -> Blob: ...

    async def many(self, items: list[bytes]) -> list[bytes]: ...

    async def same(self, a: bytes, b: bytes) -> bool: ...

    async def loose(self, data: bytes, extra: Any) -> Any: ...

    def chunks(self, n: int, size: int) -> AsyncIterator[bytes]: ...

    async def total(self, items: AsyncIterable[Blob]) -> int: ...


class FilesImpl:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"a": b"\x00\x01\xff"}

    async def put(self, name: str, data: bytes) -> int:
        self.files[name] = data
        return len(data)

    async def get(self, name: str) -> bytes:
        return self.files[name]

    async def echo(self, blob: Blob) -> Blob:
        assert type(blob.data) is bytes and all(type(p) is bytes for p in blob.parts)
        return blob

    async def many(self, items: list[bytes]) -> list[bytes]:
        return items

    async def same(self, a: bytes, b: bytes) -> bool:
        return a is b

    async def loose(self, data: bytes, extra: Any) -> Any:
        return [len(data), extra]

    async def chunks(self, n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size

    async def total(self, items: AsyncIterable[Blob]) -> int:
        return sum([len(item.data) + sum(map(len, item.parts)) async for item in items])


class Recorder:
    """A loopback proxy that forwards a connection and keeps every frame each way (after the client's preface)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent = FrameDecoder(1 << 26)
        self.received = FrameDecoder(1 << 26)
        self.to_server: list[Frame] = []
        self.to_client: list[Frame] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        skip = len(PREFACE) if up else 0
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                if skip:
                    cut, skip = min(skip, len(data)), skip - min(skip, len(data))
                    data = data[cut:]
                if up:
                    self.to_server += self.sent.feed(data)
                else:
                    self.to_client += self.received.feed(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        both = [
            asyncio.ensure_future(self._pipe(reader, up_writer, True)),
            asyncio.ensure_future(self._pipe(up_reader, writer, False)),
        ]
        self.tasks.update(both)
        await asyncio.gather(*both)

    def flags(self, kind: int, frames: list[Frame]) -> list[int]:
        return [f.flags for f in frames if f.type == kind]


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[str, FilesImpl, Recorder]]:
    """A server of Files and Arith, and a recording proxy in front of it: (proxy URL, impl, recorder)."""
    server = kubrpc.Server(**options)
    impl = FilesImpl()
    server.register(Files, impl)
    server.register(Arith, ArithImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener:
        port = int(listener.url.rsplit(":", 1)[1])
        recorder = Recorder(port)
        proxy = await asyncio.start_server(recorder._serve, "127.0.0.1", 0)
        try:
            yield f"tcp://127.0.0.1:{proxy.sockets[0].getsockname()[1]}", impl, recorder
        finally:
            proxy.close()
            for task in recorder.tasks:
                task.cancel()
            await asyncio.gather(*recorder.tasks, return_exceptions=True)
            await proxy.wait_closed()


@asynccontextmanager
async def raw(**options: Any) -> AsyncIterator[tuple[Callable[..., Any], FilesImpl, str]]:
    """A Files server (options as Server's), an opener of raw clients that see every frame, and its URL."""
    server = kubrpc.Server(**options)
    impl = FilesImpl()
    server.register(Files, impl)
    server.register(Arith, ArithImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener, AsyncExitStack() as stack:
        host, port = listener.url.removeprefix("tcp://").rsplit(":", 1)
        yield raw_opener(stack, host, int(port)), impl, listener.url


def attached_request(stream: int, path: str, message: bytes, flags: int = 0) -> bytes:
    """A REQUEST with FLAG_ATTACHED whose body is `message`, taken as it is (a hostile client's)."""
    return encode_request(stream, path, message, 0, b"", flags | FLAG_ATTACHED)


def message(json: object, *data: bytes, count: int | None = None, sizes: list[int] | None = None) -> bytes:
    """A message in the attachments format, table given or made from `data`."""
    sizes = [len(d) for d in data] if sizes is None else sizes
    count = len(sizes) if count is None else count
    head = count.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes)
    return head + orjson.dumps(json) + b"".join(data)


async def answer(client: RawClient, stream: int) -> Frame:
    """The next frame for `stream` (past SETTINGS and the frames of other streams)."""
    while (frame := await client.frame()).stream != stream:
        pass
    return frame


async def negotiated(channel: kubrpc.Channel) -> None:
    """Wait until every connection of `channel` has the server's answer to its SETTINGS."""
    with anyio.fail_after(10):
        while not all(getattr(c, "attachments", False) for c in channel.connections.values()):
            await anyio.sleep(0.01)


# -- round trips through the public API -----------------------------------------------------------------------


async def test_nested_bytes_travel_as_attachments_once_the_server_said_it_reads_them() -> None:
    blob = Blob(
        "n",
        os.urandom(300_000),
        [b"", b"\x00", os.urandom(70_000)],
        {"k": b"v", "empty": b""},
        b"\xff" * 3,
        [Blob("inner", b"i", maybe=None)],
    )
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=10)
        assert await files.echo(blob) == blob  # the first call asks, and goes as plain JSON meanwhile
        await negotiated(channel)
        for _ in range(2):
            back = await files.echo(blob)
            assert back == blob and type(back.data) is bytes and type(back.nested[0]) is Blob
        assert await files.put("b", b"x" * 1000) == 1000
        assert await files.get("b") == b"x" * 1000
    requests = recorder.flags(FrameType.REQUEST, recorder.to_server)
    responses = recorder.flags(FrameType.RESPONSE, recorder.to_client)
    assert requests == [0, FLAG_ATTACHED, FLAG_ATTACHED, FLAG_ATTACHED, FLAG_ATTACHED]
    assert responses == [0, FLAG_ATTACHED, FLAG_ATTACHED, 0, FLAG_ATTACHED]  # put's int: plain
    # The client asked once; the server answered once; no base64 of the 300 kB on the wire after that.
    assert [f.payload for f in recorder.to_server if f.type == FrameType.SETTINGS] == [ASK[HEADER.size :]]
    assert [f.payload for f in recorder.to_client if f.type == FrameType.SETTINGS] == [b"", ASK[HEADER.size :]]
    second = [f for f in recorder.to_server if f.type == FrameType.REQUEST][1]
    assert blob.data in second.payload and len(second.payload) < len(blob.data) + 71_000 + 500


async def test_methods_without_bytes_never_ask_and_keep_the_plain_wire() -> None:
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=10)
        assert [await arith.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
    assert recorder.flags(FrameType.REQUEST, recorder.to_server) == [0] * 5
    assert not [f for f in recorder.to_server if f.type == FrameType.SETTINGS]  # the old first bytes, exactly
    spec = service_spec(Arith).methods["add"]
    assert not spec.attachable


async def test_the_same_attachment_twice_is_one_bytes_object() -> None:
    async with raw() as (open_raw, _, _):
        client: RawClient = await open_raw(PREFACE + attached_request(1, "Files/same", message({"a": 0, "b": 0}, b"z")))
        frame = await answer(client, 1)
        assert (frame.type, frame.payload) == (FrameType.RESPONSE, b"true")


async def test_streams_carry_attachments_both_ways() -> None:
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=10)
        await files.get("a")
        await negotiated(channel)
        got = [chunk async for chunk in files.chunks(3, 1 << 20)]
        assert got == [bytes([i]) * (1 << 20) for i in range(3)]

        async def items() -> AsyncIterator[Blob]:
            for i in range(3):
                yield Blob(str(i), os.urandom(100_000), [b"ab"])

        assert await files.total(items()) == 3 * 100_002
    data = [f for f in recorder.to_client if f.type == FrameType.DATA]
    assert [f.flags for f in data] == [FLAG_ATTACHED] * 3 and all(len(f.payload) < (1 << 20) + 100 for f in data)
    assert [f.flags for f in recorder.to_server if f.type == FrameType.DATA] == [FLAG_ATTACHED] * 3


async def test_a_server_that_does_not_answer_settings_gets_plain_json_only() -> None:
    """A server that predates attachments ignores the client's SETTINGS: every call stays base64 in JSON."""
    seen: list[Frame] = []

    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE))
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        decoder = FrameDecoder(1 << 24)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                seen.append(frame)
                if frame.type == FrameType.REQUEST:
                    body = orjson.loads(frame.payload[frame.payload.index(b"{") :])
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, orjson.dumps(len(body["data"]))))

    async with fake_server(old_server) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)
        for _ in range(3):
            assert await files.put("a", b"ABC") == 4  # the length of its base64
            await anyio.sleep(0.05)
        assert not list(channel.connections.values())[0].attachments  # type: ignore[attr-defined]
    requests = [f for f in seen if f.type == FrameType.REQUEST]
    assert [f.flags for f in requests] == [0, 0, 0]
    assert all(f.payload.endswith(b'{"name":"a","data":"QUJD"}') for f in requests)
    assert [f.type for f in seen].count(FrameType.SETTINGS) == 1  # asked once


async def test_the_server_answers_in_the_format_only_when_the_request_asks() -> None:
    async with raw() as (open_raw, _, _):
        client: RawClient = await open_raw(PREFACE + encode_request(1, "Files/get", b'{"name":"a"}'))
        frame = await answer(client, 1)
        assert (frame.type, frame.flags, frame.payload) == (FrameType.RESPONSE, 0, b'"AAH/"')
        await client.send(attached_request(3, "Files/get", message({"name": "a"})))
        frame = await answer(client, 3)
        assert (frame.flags, frame.payload) == (FLAG_ATTACHED, message(0, b"\x00\x01\xff"))
        # A client's SETTINGS is answered once per connection, and only when it says it reads attachments.
        await client.send(encode_settings((SETTING_ATTACHMENTS, 0)) + encode_settings((99, 1)) + ASK + ASK)
        await client.send(encode_frame(FrameType.PING, 0, b"mark"))
        frames = []
        while (frame := await client.frame()).type != FrameType.PING:
            frames.append(frame)
        assert frames == [Frame(FrameType.SETTINGS, 0, 0, ASK[HEADER.size :])]


async def test_the_client_refuses_attachments_it_did_not_ask_for() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        length, _, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
        await reader.readexactly(length)
        writer.write(encode_frame(FrameType.RESPONSE, stream, message(0, b"x"), FLAG_ATTACHED))
        await anyio.sleep(1)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport().connect(endpoint)
        try:
            with pytest.raises(RpcError, match="did not ask for") as caught:
                await conn.call("Files/get", b'{"name":"a"}', timeout=5, metadata={})
            assert caught.value.code is Status.INTERNAL
        finally:
            await conn.aclose()


async def test_http_and_inproc_keep_base64() -> None:
    server = kubrpc.Server()
    server.register(Files, FilesImpl())
    for url in ("http://127.0.0.1:0", "inproc://files-base64"):
        async with server.serve(url) as listener, kubrpc.connect(listener.url) as channel:
            assert await channel.call("Files/get", b'{"name":"a"}', timeout=5) == b'"AAH/"'
            files = channel.stub(Files, timeout=5)
            assert await files.get("a") == b"\x00\x01\xff" and await files.put("b", b"\x00") == 1
            assert [c async for c in files.chunks(1, 2)] == [b"\x00\x00"]


async def test_methods_whose_bytes_an_index_could_be_confused_with_stay_plain() -> None:
    spec = service_spec(Files).methods
    assert spec["loose"].attach_result is False and spec["loose"].attach_args is False  # Any: could hold bytes
    assert spec["echo"].attach_args and spec["echo"].attach_result and not spec["total"].attach_args
    assert spec["total"].attach_messages
    assert not codec.attachable(bytes | int) and not codec.attachable(dict[str, Any]) and not codec.attachable(int)
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=5)
        await files.get("a")
        await negotiated(channel)
        assert await files.loose(b"abc", {"x": 1}) == [3, {"x": 1}]
    assert recorder.flags(FrameType.REQUEST, recorder.to_server) == [0, 0]


async def test_more_attachments_than_the_limit_go_as_base64_in_the_format() -> None:
    items = [i.to_bytes(3, "big") for i in range(codec.MAX_ATTACHMENTS + 1)]  # distinct objects: each is one
    async with serving() as (url, _, recorder), kubrpc.connect(url) as channel:
        files = channel.stub(Files, timeout=30)
        await files.get("a")
        await negotiated(channel)
        assert await files.many(items) == items
    request = [f for f in recorder.to_server if f.type == FrameType.REQUEST][1]
    assert request.flags == FLAG_ATTACHED and b'"AAAA"' in request.payload  # count 0, base64 in the JSON


# -- the documented bytes -------------------------------------------------------------------------------------


async def test_protocol_doc_attachments_example_matches_the_encoder_and_a_server() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## Attachments") : doc.index("## Streams")]
    lines = re.findall(r"^    ([0-9A-F ]+?)\s{2,}(←?)", section, flags=re.M)
    sent = bytes.fromhex("".join(hex.replace(" ", "") for hex, arrow in lines if not arrow))
    answered = bytes.fromhex("".join(hex.replace(" ", "") for hex, arrow in lines if arrow))
    put = codec.pack({"name": "a", "data": b"\x00\x01\xff"})
    get = codec.pack({"name": "a"})
    head = encode_request(1, "Files/put", b"", 2000)[HEADER.size :]
    head3 = encode_request(3, "Files/get", b"", 2000)[HEADER.size :]
    assert sent == ASK + b"".join(
        encode_message(FrameType.REQUEST, 1, put, 0, head) + encode_message(FrameType.REQUEST, 3, get, 0, head3)
    )
    result = codec.pack(b"\x00\x01\xff")
    expected = ASK + encode_frame(FrameType.RESPONSE, 1, b"3")
    assert answered == expected + b"".join(encode_message(FrameType.RESPONSE, 3, result))
    # A real server answers those very bytes with those very bytes (after its empty SETTINGS).
    async with raw() as (open_raw, _, _):
        client: RawClient = await open_raw(PREFACE + sent)
        assert await client.frame() == Frame(FrameType.SETTINGS, 0, 0, b"")
        decoder = FrameDecoder(1 << 20)
        want = decoder.feed(answered)
        assert [await client.frame() for _ in want] == want


# -- hostile messages -----------------------------------------------------------------------------------------

HOSTILE = [
    (b"\x00\x00", "truncated attachments table"),
    ((2**32 - 1).to_bytes(4, "big") + b"{}", "attachments: a message carries at most 65536"),
    ((1000).to_bytes(4, "big") + b"{}", "the table of 1000 attachments does not fit"),
    (message({"name": "a", "data": 0}, b"abc", sizes=[1 << 20]), "lengths add up to 1048576 bytes, more than"),
    (message({"name": "a", "data": 1}, b"abc"), "attachment index 1 is out of range: the message has 1"),
    (message({"name": "a", "data": -1}, b"abc"), "attachment index -1 is out of range"),
    (message({"name": "a", "data": 0}, b"abc", b"unused"), "attachment 1 of 2 is not referred to"),
    (message({"name": 0, "data": "AAH/"}, b"abc"), "invalid argument 'name': expected string, got integer"),
    (message({"name": "a", "data": 0}, b"abc", sizes=[1, 2]), "attachment 1 of 2 is not referred to"),
    (b"\x00\x00\x00\x00{not json", "request body is not valid JSON"),
    (message({"name": "a", "data": 0.0}, b"abc"), "invalid argument 'data': expected base64 string, got number"),
]


@pytest.mark.parametrize(("body", "why"), HOSTILE, ids=[w.split(":")[0][:40] for _, w in HOSTILE])
async def test_a_lying_message_is_invalid_argument_and_the_connection_goes_on(body: bytes, why: str) -> None:
    async with raw() as (open_raw, impl, url):
        client: RawClient = await open_raw(PREFACE + attached_request(1, "Files/put", body))
        frame = await answer(client, 1)
        assert frame.type == FrameType.ERROR, frame
        error = orjson.loads(frame.payload)
        assert error["code"] == "invalid_argument" and why in error["message"], error
        assert "b" not in impl.files
        await client.send(attached_request(3, "Files/put", message({"name": "b", "data": 0}, b"fine")))
        assert (await answer(client, 3)).payload == b"4"
        async with kubrpc.connect(url) as channel:  # and everyone else
            assert await channel.stub(Files, timeout=5).get("b") == b"fine"


async def test_a_lying_stream_message_ends_that_stream_alone() -> None:
    async with raw() as (open_raw, _, _):
        body = message({})
        opened = attached_request(1, "Files/total", body, FLAG_CLIENT_STREAMS)
        client: RawClient = await open_raw(PREFACE + opened)
        assert (await answer(client, 1)).type == FrameType.WINDOW_UPDATE
        good = message({"name": "x", "data": 0}, b"abc")
        bad = message({"name": "x", "data": 5}, b"abc")
        await client.send(
            encode_frame(FrameType.DATA, 1, good, FLAG_ATTACHED) + encode_frame(FrameType.DATA, 1, bad, FLAG_ATTACHED)
        )
        frame = await answer(client, 1)
        assert frame.type == FrameType.ERROR and b"attachment index 5 is out of range" in frame.payload
        assert b"items[1]" in frame.payload
        # A table that lies, on a new stream: the message is named.
        client2: RawClient = await open_raw(PREFACE + attached_request(1, "Files/total", body, FLAG_CLIENT_STREAMS))
        assert (await answer(client2, 1)).type == FrameType.WINDOW_UPDATE
        await client2.send(encode_frame(FrameType.DATA, 1, b"\x00\x00\x00\x09{}", FLAG_ATTACHED))
        frame = await answer(client2, 1)
        assert frame.type == FrameType.ERROR
        assert orjson.loads(frame.payload)["message"].startswith("invalid message 'items[0]': the table of 9")
        await client.send(attached_request(3, "Files/get", message({"name": "a"})))
        assert (await answer(client, 3)).payload == message(0, b"\x00\x01\xff")
        await client.send(encode_window_update(1, 10))  # the ended stream: ignored


async def test_a_malformed_answer_fails_the_call_internal() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(encode_frame(FrameType.SETTINGS, 0))
        decoder = FrameDecoder(1 << 20)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.type == FrameType.SETTINGS:
                    writer.write(ASK)
                elif frame.type == FrameType.REQUEST and frame.flags & FLAG_ATTACHED:
                    lie = message(7, b"x")  # index out of range
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, lie, FLAG_ATTACHED))
                elif frame.type == FrameType.REQUEST:
                    writer.write(encode_frame(FrameType.RESPONSE, frame.stream, b'"AAH/"'))

    async with fake_server(script) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)
        assert await files.get("a") == b"\x00\x01\xff"
        await negotiated(channel)
        with pytest.raises(RpcError, match="malformed result from Files/get: .*index 7 is out of range") as e:
            await files.get("a")
        assert e.value.code is Status.INTERNAL


def test_decoding_is_bounded_by_the_message_whatever_its_table_says() -> None:
    """The most attachments, each referred to many times: memory stays a small multiple of the message."""
    dec = codec.decoder(list[bytes])
    count = codec.MAX_ATTACHMENTS
    data = codec.Packed(message(list(range(count)) * 8, *[b"ab"] * count))
    tracemalloc.start()
    try:
        out = codec.unpacked(data, lambda json: dec(orjson.loads(json), ""))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 8 * count and out[0] is out[count]  # one object per attachment, not per reference
    assert peak < 40 * len(data), (peak, len(data))
    huge = codec.Packed((2**32 - 1).to_bytes(4, "big") + b"[]")
    with pytest.raises(codec.DecodeError, match="at most 65536"):
        codec.unpacked(huge, orjson.loads)


async def test_limits_count_the_whole_message_with_its_attachments() -> None:
    async with serving(max_message_size=4096) as (url, impl, _):
        impl.files["big"] = b"x" * 5000
        async with kubrpc.connect(url, transport=TcpTransport(max_message_size=4096)) as channel:
            files = channel.stub(Files, timeout=5)
            await files.get("a")
            await negotiated(channel)
            with pytest.raises(RpcError, match="request exceeds the maximum message size") as caught:
                await files.put("b", b"x" * 5000)  # refused by the client before it is sent
            assert caught.value.code is Status.RESOURCE_EXHAUSTED
            with pytest.raises(RpcError, match="response exceeds the maximum message size") as caught:
                await files.get("big")
            assert caught.value.code is Status.RESOURCE_EXHAUSTED
            assert await files.put("c", b"y" * 4000) == 4000
    async with raw(max_message_size=4096) as (open_raw, impl, _):
        client: RawClient = await open_raw(
            PREFACE + attached_request(1, "Files/put", message({"name": "b", "data": 0}, b"z" * 5000))
        )
        frame = await answer(client, 1)
        assert frame.type == FrameType.ERROR and orjson.loads(frame.payload)["code"] == "resource_exhausted"
        assert "b" not in impl.files


async def test_interceptors_and_metrics_see_calls_with_attachments() -> None:
    seen: list[str] = []

    async def spy(call: kubrpc.CallInfo, proceed: Callable[[], Any]) -> bytes:
        seen.append(call.method)
        result: bytes = await proceed()
        return result

    server = kubrpc.Server(metrics=True, interceptors=[spy])
    server.register(Files, FilesImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener, kubrpc.connect(listener.url, metrics=True) as channel:
        files = channel.stub(Files, timeout=5)
        await files.get("a")
        await negotiated(channel)
        assert await files.get("a") == b"\x00\x01\xff"
        assert [c async for c in files.chunks(2, 10)] == [b"\x00" * 10, b"\x01" * 10]
        blobs = [Blob("a", b"1"), Blob("b", b"22")]

        async def items() -> AsyncIterator[Blob]:
            for blob in blobs:
                yield blob

        assert await files.total(items()) == 3
    assert seen == ["get", "get", "chunks", "total"]


def test_pack_and_unpacked_round_trip_any_nesting() -> None:
    """Property: whatever the nesting, the attachments format gives back what plain JSON would."""
    from hypothesis import given, settings, strategies as st

    leaf = st.builds(Blob, name=st.text(max_size=5), data=st.binary(max_size=40), maybe=st.none() | st.binary())
    blobs = st.recursive(
        leaf,
        lambda inner: st.builds(
            Blob,
            name=st.text(max_size=5),
            data=st.binary(max_size=40),
            parts=st.lists(st.binary(max_size=10), max_size=4),
            by_key=st.dictionaries(st.text(max_size=3), st.binary(max_size=10), max_size=3),
            nested=st.lists(inner, max_size=3),
        ),
        max_leaves=8,
    )
    decode = codec.decoder(dict[str, Blob])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(max_size=4), blobs, max_size=3))
    def check(value: dict[str, Blob]) -> None:
        packed = codec.pack(value)
        wire = codec.Packed(packed.table() + packed + b"".join(bytes(a) for a in packed.attachments))
        assert len(wire) == packed.size
        assert codec.unpacked(wire, lambda json: decode(orjson.loads(json), "")) == value
        assert decode(orjson.loads(codec.dumps(value)), "") == value

    check()
