"""An attack on d68cd79..2b472a7 (and 762af21, 7a55dae): the server reading a plain REQUEST's head with its frame
header and starting it itself (_ServerConnection._run_requests, _start, _refuse), a stub's bind-time `direct`,
the per-method call encoder and result decoder made with exec (MethodSpec.call_encoder, result_decoder), and the
client sending a stub's call from TcpConnection.call() itself (the rest in _send()), an answer to a call that has
ended being dropped by set_result()'s own check.

Each fast path must do what the general one it stands for does: the same answers, errors and bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rawtcp import RawClient, Script, fake_server, raw_opener
from services import Arith, ArithImpl, Control, ControlImpl
from test_hotpath_attack import acknowledge, read_request

import kubrpc
from kubrpc.errors import NotDeliveredError, RpcError
from kubrpc.interface import service_spec
from kubrpc.status import Status
from kubrpc.transports._frames import (
    HEADER,
    MAX_STREAM_ID,
    Frame,
    FrameType,
    encode_frame,
    encode_goaway,
    encode_metadata,
    encode_request,
)
from kubrpc.transports._tcp_client import TcpConnection
from kubrpc.transports._tcp_server import TcpListener
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio

_LIMIT = 2048  # the servers' max_message_size here


# -- a server with a handler that shows its metadata --------------------------------------------------------------


class Meta(Protocol):
    async def seen(self) -> str: ...


class MetaImpl:
    async def seen(self) -> str:
        return json.dumps(sorted(kubrpc.current_call().metadata.items()))


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[TcpListener, Callable[..., Any]]]:
    server = kubrpc.Server(max_message_size=_LIMIT, **options)
    server.register(Arith, ArithImpl())
    server.register(Control, ControlImpl())
    server.register(Meta, MetaImpl())
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0"))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        yield listener, raw_opener(stack, "127.0.0.1", port)


def add(stream: int, a: int = 1, b: int = 2, timeout_ms: int = 0) -> bytes:
    return encode_request(stream, "Arith/add", orjson.dumps({"a": a, "b": b}), timeout_ms)


def sleep(stream: int) -> bytes:
    return encode_request(stream, "Control/sleep", b'{"seconds": 30}')


def raw_request(stream: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), FrameType.REQUEST, flags, stream) + payload


async def answers(raw: RawClient, data: bytes) -> tuple[list[Frame], bool]:
    """The frames the server sends back for `data` (SETTINGS and PINGs aside), and whether it closed."""
    await raw.send(data)
    await raw.send(encode_frame(FrameType.PING, 0, b"end"))  # its ACK comes after every answer above
    got: list[Frame] = []
    with anyio.fail_after(10):  # a hang guard
        while True:
            try:
                frame = await raw.frame()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return got + [f for f in raw.frames if f.type not in (FrameType.SETTINGS, FrameType.PING)], True
            if frame.type == FrameType.PING and frame.payload == b"end":
                return got, False
            if frame.type not in (FrameType.SETTINGS, FrameType.PING):
                got.append(frame)


async def fast_and_general(data: bytes, before: bytes = b"", **options: Any) -> tuple[object, object]:
    """What a fresh server answers to `data` in one read (the fast path), and behind a PING (the decoder's path);
    `before` goes first, in its own read, on both."""
    results = []
    for lead in (b"", encode_frame(FrameType.PING, 0, b"lead")):
        async with serving(**options) as (_, open_raw):
            raw = await open_raw()
            if before:
                await answers(raw, before)
            results.append(await answers(raw, lead + data))
    return results[0], results[1]


# -- the server: REQUEST heads cut at the fast path's bounds -----------------------------------------------------


_GOOD_PATH = b"Arith/add"


def _cut_payloads() -> list[bytes]:
    """REQUEST payloads of every length around the 16/19/20-byte bounds, and paths that do not fit."""
    whole = struct.pack(">IH", 0, len(_GOOD_PATH)) + _GOOD_PATH + bytes(4) + b'{"a":1,"b":2}'
    cuts = [whole[:n] for n in range(0, 11)]  # up to the metadata length, cut anywhere (truncated)
    cuts += [whole[: 6 + len(_GOOD_PATH) + k] for k in range(0, 4)]  # the metadata length cut
    cuts += [
        struct.pack(">IH", 0, 0) + bytes(4),  # an empty path, nothing else: the shortest REQUEST (20 bytes)
        struct.pack(">IH", 0, 0) + bytes(4) + b"{}",
        struct.pack(">IH", 0, 1) + bytes(4),  # the path's one byte is the metadata length's first
        struct.pack(">IH", 0, 5) + b"Arith",  # the path fills it, no metadata length
        struct.pack(">IH", 0, 0xFFFF) + _GOOD_PATH + bytes(4),  # a path length beyond the payload
        struct.pack(">IH", 0, 4) + b"\xff\xfe\xfd\xfc" + bytes(4),  # not UTF-8
        struct.pack(">IH", 0, len(_GOOD_PATH)) + _GOOD_PATH + struct.pack(">I", 3) + b"{}",  # metadata cut
        struct.pack(">IH", 0, len(_GOOD_PATH)) + _GOOD_PATH + struct.pack(">I", 8) + b"not json{}",
        struct.pack(">IH", 0, len(_GOOD_PATH)) + _GOOD_PATH + struct.pack(">I", 2) + b"[]" + b"{}",
    ]
    return cuts


@pytest.mark.parametrize("payload", _cut_payloads(), ids=lambda p: p.hex() or "empty")
@pytest.mark.parametrize("place", ["alone", "first", "between", "last"])
async def test_a_request_cut_at_any_length_is_answered_as_the_decoder_answers_it(payload: bytes, place: str) -> None:
    bad = raw_request(2, payload)
    data = {"alone": bad, "first": bad + add(3), "between": add(1) + bad + add(3), "last": add(1) + bad}[place]
    fast, general = await fast_and_general(data)
    assert fast == general


@pytest.mark.parametrize("stream", [0, 4, 5])
@pytest.mark.parametrize("before", ["request", "refused", "error"])
async def test_a_stream_id_not_above_the_highest_closes_the_connection_on_both_paths(stream: int, before: str) -> None:
    """Stream 5 was seen (a call, a REQUEST answered with an error, or one refused as too large): 0, 4 and 5 are
    protocol errors on the fast path as on the decoder's."""
    first = {
        "request": add(5),
        "refused": encode_request(5, "Arith/add", b"x" * (_LIMIT + 1)),  # over max_message_size: refused
        "error": encode_request(5, "Arith/add", b"{}", 0, b"[]"),  # bad metadata: that call's error
    }[before]
    fast, general = await fast_and_general(add(stream) + add(9), before=first)
    assert fast == general
    assert fast[1] is True  # closed


async def test_requests_after_an_oversized_data_frame_in_the_same_read() -> None:
    """An OVERSIZED DATA frame (skipped unread) then REQUESTs, one of them reusing an id: answered the same on both
    paths."""
    oversized = HEADER.pack(_LIMIT + 64 * 1024 + 1, FrameType.DATA, 0, 3) + b"x" * (_LIMIT + 64 * 1024 + 1)
    fast, general = await fast_and_general(oversized + add(4) + add(5) + add(5))
    assert fast == general


# -- the server: limits reached within one read ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_max_concurrent_calls_reached_mid_read_refuses_as_the_decoder_does(seed: int) -> None:
    """Calls that wait (Control.sleep, in tasks) and calls that never wait (Arith.add, inline) mixed in one read,
    past max_concurrent_calls; and one both too large and over the limit (the limit is said first)."""
    import random

    rng = random.Random(seed)
    frames = []
    for stream in range(1, 14):
        pick = rng.randrange(4)
        if pick == 0:
            frames.append(add(stream, stream, 1))
        elif pick == 1:
            frames.append(encode_request(stream, "Arith/add", b'{"a": "' + b"x" * (_LIMIT + 1) + b'", "b": 1}'))
        else:
            frames.append(sleep(stream))
    fast, general = await fast_and_general(b"".join(frames), max_concurrent_calls=3)
    assert fast == general


async def test_max_pending_bytes_exhausted_mid_read_is_busy_as_the_decoder_says() -> None:
    frames = [sleep(s) for s in range(1, 80)] + [add(80), encode_request(81, "Meta/seen", b"{}", 0, b'{"A": "1"}')]
    fast, general = await fast_and_general(b"".join(frames), max_pending_bytes=_LIMIT)
    assert fast == general
    assert any(f.type == FrameType.ERROR and b"busy" in f.payload for f in fast[0])  # type: ignore[index]


async def test_requests_after_going_away_are_not_delivered_on_both_paths() -> None:
    results = []
    for lead in (b"", encode_frame(FrameType.PING, 0, b"lead")):
        async with serving() as (listener, open_raw):
            raw = await open_raw()
            await answers(raw, add(1))
            (conn,) = listener.connections
            conn.go_away("test")
            results.append(await answers(raw, lead + add(2) + sleep(3) + encode_request(4, "Meta/seen", b"{}")))
    assert results[0] == results[1]
    frames, _ = results[0]
    assert frames[0].type == FrameType.GOAWAY
    assert [f.stream for f in frames[1:]] == [2, 3, 4]
    assert all(f.type == FrameType.ERROR and b"shutting down" in f.payload for f in frames[1:])


async def test_metadata_keys_reach_the_handler_in_lower_case_on_both_paths() -> None:
    meta = encode_metadata({"X-Tenant": "a", "Trace": "b"})
    data = encode_request(1, "Meta/seen", b"{}", 0, meta) + encode_request(2, "Meta/seen", b"{}")
    fast, general = await fast_and_general(data)
    assert fast == general
    frames, closed = fast  # type: ignore[misc]
    assert not closed
    assert [orjson.loads(orjson.loads(f.payload)) for f in frames] == [[["trace", "b"], ["x-tenant", "a"]], []]


# -- the client: the stub's call sent from call() itself -------------------------------------------------------


async def _echo_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await acknowledge(reader, writer)
    while True:
        length, kind, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
        await reader.readexactly(length)
        if kind == FrameType.REQUEST:
            writer.write(encode_frame(FrameType.RESPONSE, stream, b"1"))


def _error(exc: BaseException) -> object:
    if isinstance(exc, RpcError):
        return type(exc), exc.code, exc.message
    return type(exc), str(exc)


async def _outcome(call: Any) -> object:
    try:
        return "ok", await call
    except Exception as exc:
        return _error(exc)


@asynccontextmanager
async def connected(script: Any = _echo_server, **options: Any) -> AsyncIterator[TcpConnection]:
    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None, **options).connect(endpoint)
        try:
            yield conn
        finally:
            await conn.aclose()


_PATH = "Arith/add"


async def _primed(conn: TcpConnection, timeout: float | None) -> None:
    """A first call that caches the path and timeout objects (the next with the same objects is the fast path)."""
    assert await conn.call(_PATH, b"{}", timeout=timeout, metadata={}) == b"1"
    assert conn._path is _PATH and conn._timeout is timeout


@pytest.mark.parametrize("timeout", [None, 7.5])
async def test_a_payload_over_max_message_size_fails_the_same_and_registers_nothing(timeout: float | None) -> None:
    async with connected(max_message_size=1024) as conn:
        await _primed(conn, timeout)
        sent = conn._next_stream
        fast = await _outcome(conn.call(_PATH, b"x" * 1025, timeout=timeout, metadata={}))
        general = await _outcome(conn.call(_PATH, b"x" * 1025, timeout=float(timeout or 1), metadata={"k": "v"}))
        assert fast == general == (RpcError, Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        assert conn._next_stream == sent and conn.in_flight == 0 and not conn._deadlines._at
        assert await conn.call(_PATH, b"{}", timeout=timeout, metadata={}) == b"1"


@pytest.mark.parametrize("timeout", [None, 7.5])
async def test_stream_ids_running_out_fail_the_fast_path_as_the_general_one(timeout: float | None) -> None:
    async with connected() as conn:
        await _primed(conn, timeout)
        conn._next_stream = MAX_STREAM_ID - 1

        assert await conn.call(_PATH, b"{}", timeout=timeout, metadata={}) == b"1"
        assert not conn.usable and conn._next_stream == MAX_STREAM_ID
        fast = await _outcome(conn.call(_PATH, b"{}", timeout=timeout, metadata={}))
        general = await _outcome(conn.call("Arith/div", b"{}", timeout=timeout, metadata={}))
        assert fast == general
        assert fast[0] is NotDeliveredError  # type: ignore[index]
        assert conn._next_stream == MAX_STREAM_ID and conn.in_flight == 0 and not conn._deadlines._at


@pytest.mark.parametrize("how", ["goaway", "lost"])
async def test_a_connection_gone_away_or_lost_between_calls_sends_nothing_on_the_fast_path(how: str) -> None:
    requests: list[int] = []
    gone = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        requests.append(stream)
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"1"))
        await gone.wait()
        if how == "goaway":
            writer.write(encode_goaway(stream, "draining"))
            await writer.drain()
            while True:
                length, kind, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
                await reader.readexactly(length)
                if kind == FrameType.REQUEST:
                    requests.append(stream)
        else:
            writer.transport.abort()

    async with connected(script) as conn:
        await _primed(conn, 5.0)
        timeout = conn._timeout
        gone.set()
        with anyio.fail_after(5):  # a hang guard
            while conn.usable:
                await asyncio.sleep(0.005)
        fast = await _outcome(conn.call(_PATH, b"{}", timeout=timeout, metadata={}))
        general = await _outcome(conn.call(_PATH, b"{}", timeout=5.0 + 0, metadata={"k": "v"}))
        assert fast == general and fast[0] is NotDeliveredError  # type: ignore[index]
        assert conn.in_flight == 0 and requests == [1]


def stalling(
    release: asyncio.Event,
    requested: Callable[[int, bytes, asyncio.StreamWriter], None],
    resumed_at: list[float] | None = None,
) -> Script:
    """A server that answers the first REQUEST, then stops reading until `release` (noting when it resumes in
    `resumed_at`), then hands every REQUEST to `requested(stream, payload, writer)`."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"1"))
        writer.transport.pause_reading()  # not reading meanwhile
        await release.wait()
        if resumed_at is not None:
            resumed_at.append(asyncio.get_running_loop().time())
        writer.transport.resume_reading()
        while True:
            length, kind, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
            payload = await reader.readexactly(length)
            if kind == FrameType.REQUEST:
                requested(stream, payload, writer)

    return script


async def test_calls_to_a_server_that_does_not_read_wait_and_are_sent_once() -> None:
    """Writes paused: the stub's next calls take the general way (they wait within their deadline); none is
    registered or written twice, and each ends DEADLINE_EXCEEDED saying why."""
    release = asyncio.Event()
    streams: list[int] = []

    def requested(stream: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        streams.append(stream)

    async with connected(stalling(release, requested)) as conn:
        timeout = 0.3
        await _primed(conn, timeout)
        big = b'"' + b"x" * (3 << 20) + b'"'
        fill = [asyncio.ensure_future(conn.call(_PATH, big, timeout=30.0, metadata={"k": "v"})) for _ in range(6)]
        with anyio.fail_after(10):
            while not conn._write_paused:
                await asyncio.sleep(0.01)
            calls = [conn.call(_PATH, b"{}", timeout=timeout, metadata={}) for _ in range(3)]
            got = await asyncio.gather(*calls, return_exceptions=True)
        for exc in got:
            assert isinstance(exc, RpcError) and exc.code is Status.DEADLINE_EXCEEDED
            assert "not reading" in exc.message
        sent = conn._next_stream
        assert sent <= 8  # the primer and those that filled the buffer only
        for call in fill:
            call.cancel()
        await asyncio.gather(*fill, return_exceptions=True)
        assert conn.in_flight == 0
        release.set()
        with anyio.fail_after(10):
            while len(streams) < sent - 2:  # every REQUEST written reaches the server, once
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert streams == list(range(2, sent))


@pytest.mark.parametrize("ended", ["deadline", "cancelled"])
async def test_an_answer_read_after_its_call_ended_in_the_same_turn_is_dropped(ended: str) -> None:
    """The call's future is done (its deadline passed, or its task was cancelled) and its answer is read before
    its task resumes: the answer is dropped, the caller gets its error, nothing stays in flight."""
    async with connected() as conn:
        await _primed(conn, 30.0)
        timeout = conn._timeout
        holder: list[int] = []

        async def one() -> bytes:
            holder.append(conn._next_stream)
            return await conn.call(_PATH, b"{}", timeout=timeout, metadata={})

        task = asyncio.ensure_future(one())
        await asyncio.sleep(0)  # sent, waiting
        (stream,) = holder
        if ended == "deadline":
            conn._deadlines._at.pop(stream)
            conn._deadline_passed(stream)
        else:
            task.cancel()
        conn.data_received(encode_frame(FrameType.RESPONSE, stream, b"late"))  # read before the task resumes
        got = await _outcome(task) if ended == "deadline" else None
        if ended == "deadline":
            assert got == (RpcError, Status.DEADLINE_EXCEEDED, "deadline exceeded")
        else:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert conn.in_flight == 0 and not conn._deadlines._at
        assert await conn.call(_PATH, b"{}", timeout=timeout, metadata={}) == b"1"


async def test_a_call_cancelled_right_after_it_was_written_sends_a_cancel_and_leaves_nothing() -> None:
    cancels: list[int] = []
    got_request = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        while True:
            length, kind, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(length)
            if kind == FrameType.CANCEL:
                cancels.append(stream)
            elif kind == FrameType.REQUEST:
                if stream == 1:
                    writer.write(encode_frame(FrameType.RESPONSE, stream, b"1"))
                else:
                    got_request.set()

    async with connected(script) as conn:
        await _primed(conn, None)
        task = asyncio.ensure_future(conn.call(_PATH, b"{}", timeout=None, metadata={}))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with anyio.fail_after(5):
            await got_request.wait()
            while not cancels:
                await asyncio.sleep(0.005)
        assert cancels == [2] and conn.in_flight == 0


# -- the channel: interceptors and feedback see every stub call, bound before the channel is entered -------------


class Recording:
    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, call: kubrpc.ClientCall, proceed: Any) -> bytes:
        self.paths.append(call.path)
        return await proceed()


async def test_a_stub_made_before_the_channel_is_entered_goes_through_its_interceptor() -> None:
    async with serving() as (listener, _):
        recording = Recording()
        channel = kubrpc.connect(listener.url, interceptors=[recording])
        stub = channel.stub(Arith, timeout=10)
        plain = kubrpc.connect(listener.url)
        plain_stub = plain.stub(Arith, timeout=10)
        async with channel, plain:
            for i in range(5):
                assert await stub.add(i, 1) == i + 1
                assert await plain_stub.add(i, 1) == i + 1
        assert recording.paths == ["Arith/add"] * 5


# -- MethodSpec.call_encoder() and result_decoder(), against encode_call() and decode_result() -------------------


@dataclass
class P:
    x: int


class Results(Protocol):
    async def i(self) -> int: ...

    async def s(self) -> str: ...

    async def b(self) -> bool: ...

    async def f(self) -> float: ...

    async def o(self) -> Optional[int]: ...  # noqa: UP045

    async def l(self) -> Literal["a", 1]: ...  # noqa: E743

    async def p(self) -> P: ...

    async def n(self) -> None: ...


_RESULT_BODIES = st.one_of(
    st.sampled_from(
        [
            b"1",
            b"-1",
            b"true",
            b"false",
            b"null",
            b'"a"',
            b'"1"',
            b"1.0",
            b"1e2",
            b"18446744073709551615",
            b"18446744073709551616",
            b"-9223372036854775809",
            b"99999999999999999999999",
            b"",
            b" 1 ",
            b"1 2",
            b"[1]",
            b'{"x": 1}',
            b'{"x": "1"}',
            b"NaN",
            b'"\\ud800"',
            b"\xff",
            b"[" * 300 + b"]" * 300,
            b'"Infinity"',
        ]
    ),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.text(max_size=4).map(lambda s: json.dumps(s).encode()),
    st.binary(max_size=4),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(service_spec(Results).methods)), _RESULT_BODIES)
def test_the_result_decoder_gives_the_results_and_errors_of_decode_result(name: str, body: bytes) -> None:
    spec = service_spec(Results).methods[name]

    def outcome(decode: Callable[[bytes], Any]) -> object:
        try:
            value = decode(body)
            return "ok", type(value), repr(value)
        except Exception as exc:
            return _error(exc)

    assert outcome(spec.result_decoder()) == outcome(spec.decode_result)


class Calls(Protocol):
    async def plain(self, a: int, b: str) -> int: ...

    async def defaults(self, a: int, b: int = 2, c: Optional[str] = None) -> int: ...  # noqa: UP045

    async def kwonly(self, a: int, *, b: int) -> int: ...

    async def none(self) -> int: ...

    async def odd(self, _: int, class_: int, àé: str, self_: int, kwargs: int, args: int) -> int: ...


_ARGS = st.one_of(
    st.integers(-(2**65), 2**65), st.text(max_size=3), st.none(), st.floats(), st.just(object()), st.binary(max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(service_spec(Calls).methods)),
    st.lists(_ARGS, max_size=7),
    st.dictionaries(st.sampled_from(["a", "b", "c", "_", "class_", "kwargs", "args", "self_", "zz"]), _ARGS),
)
def test_the_call_encoder_gives_the_bytes_and_errors_of_encode_call(
    name: str, args: list[object], kwargs: dict[str, object]
) -> None:
    spec = service_spec(Calls).methods[name]

    def outcome(encode: Callable[[tuple[Any, ...], Mapping[str, Any]], bytes], kw: dict[str, object]) -> object:
        try:
            return "ok", encode(tuple(args), kw)
        except Exception as exc:
            return _error(exc)

    fast = spec.call_encoder()
    assert outcome(fast, kwargs) == outcome(spec.encode_call, kwargs)
    assert outcome(fast, {}) == outcome(spec.encode_call, {})


def test_the_call_encoder_takes_parameter_names_of_its_own_code() -> None:
    spec = service_spec(Calls).methods["odd"]
    assert spec.call_encoder()(tuple(range(2)) + ("s",) + (3, 4, 5), {}) == orjson.dumps(
        {"_": 0, "class_": 1, "àé": "s", "self_": 3, "kwargs": 4, "args": 5}
    )
    assert math.isnan(service_spec(Results).methods["f"].result_decoder()(b'"NaN"'))


# -- the server: any frames, cut into reads anywhere, answered as one read behind a PING is ---------------------


def _mixed_frames(rng: Any) -> list[bytes]:
    frames: list[bytes] = []
    stream = 0
    for _ in range(rng.randrange(1, 16)):
        pick = rng.randrange(12)
        if pick == 0:
            frames.append(encode_frame(FrameType.PING, 0, b"p%d" % rng.randrange(100)))
        elif pick == 1:
            frames.append(encode_frame(FrameType.CANCEL, rng.randrange(1, stream + 2)))
        elif pick == 2:
            frames.append(encode_frame(rng.choice([FrameType.DATA, FrameType.END, FrameType.WINDOW_UPDATE, 99]), 3))
        elif pick == 3:
            frames.append(encode_frame(FrameType.SETTINGS, 0))
        else:
            stream += rng.randrange(1, 3)
            kind = rng.randrange(8)
            if kind == 0:
                frames.append(encode_request(stream, "Meta/seen", b"{}", 0, encode_metadata({"K": "v", "k": "w"})))
            elif kind == 1:
                frames.append(raw_request(stream, struct.pack(">IH", 0, 0) + bytes(4)))  # empty path
            elif kind == 2:
                frames.append(encode_request(stream, "Arith/add", b'{"a": 1}', rng.choice([0, 1, 2**32 - 1])))
            elif kind == 3:
                frames.append(encode_request(stream, "Arith/add", b'{"a": 1, "b": 2}', 0, b"{}"))  # empty object
            else:
                frames.append(add(stream, rng.randrange(-3, 3), rng.randrange(3)))
    return frames


@pytest.mark.parametrize("seed", range(16))
async def test_frames_cut_into_reads_anywhere_are_answered_as_in_one_read(seed: int) -> None:
    import random

    rng = random.Random(seed)
    data = b"".join(_mixed_frames(rng))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 8))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    async with serving() as (_, open_raw):
        whole = await answers(await open_raw(), encode_frame(FrameType.PING, 0, b"lead") + data)
        raw = await open_raw()
        for chunk in chunks[:-1]:
            await raw.send(chunk)
            await asyncio.sleep(0.002)  # (most likely a read each; any coalescing is a case too)
        cut = await answers(raw, chunks[-1])
    assert cut == whole


async def test_a_call_that_waited_for_the_server_to_read_carries_only_the_time_it_has_left() -> None:
    """A call made while writes are paused waits (within its deadline) until the server reads; then its REQUEST
    carried, and its client-side deadline started from, the whole timeout again: a call could take up to twice its
    timeout, and the server ran it with more time than its caller had left."""
    release = asyncio.Event()
    carried: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    resumed_at: list[float] = []

    def requested(stream: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        carried[stream] = struct.unpack_from(">I", payload)[0]
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"1"))

    async with connected(stalling(release, requested, resumed_at)) as conn:
        await _primed(conn, None)
        big = b'"' + b"x" * (3 << 20) + b'"'
        fill = [asyncio.ensure_future(conn.call(_PATH, big, timeout=None, metadata={"k": "v"})) for _ in range(6)]
        with anyio.fail_after(10):
            while not conn._write_paused:
                await asyncio.sleep(0.01)
        started = loop.time()
        call = asyncio.ensure_future(conn.call("Arith/div", b"{}", timeout=5.0, metadata={}))
        await asyncio.sleep(0.5)
        release.set()
        with anyio.fail_after(30):
            assert await call == b"1"
            await asyncio.gather(*fill)
        waited = resumed_at[0] - started  # at least this long before its REQUEST could be written
        (timeout_ms,) = (ms for ms in carried.values() if ms)
        assert timeout_ms <= math.ceil((5.0 - waited) * 1000)
