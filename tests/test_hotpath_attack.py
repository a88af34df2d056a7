"""An attack on the hot paths of 5836569: the TCP client resolving plain RESPONSE frames straight from the bytes
read (TcpConnection._read_answers), its cached REQUEST tail (TcpConnection._request), the server running plain
REQUEST frames straight from the bytes read (_ServerConnection._run_requests), and the per-method argument
decoder made with exec (MethodSpec.args_decoder).

Each fast path must do what the general one it stands for does: the same answers, errors, bookkeeping
(in_flight, wait_idle, closing a connection told to go away) and bytes on the wire.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Union

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rawtcp import HELLO_SIZE, RawClient, fake_server
from services import Arith, ArithImpl
from test_tcp_hardening import request, serving

import kubrpc
from kubrpc.errors import NotDeliveredError, RpcError
from kubrpc.interface import MethodSpec, service_spec
from kubrpc.status import Status
from kubrpc.transports._frames import (
    FLAG_ATTACHED,
    HEADER,
    Frame,
    FrameType,
    encode_frame,
    encode_goaway,
    encode_metadata,
    encode_request,
)
from kubrpc.transports._tcp_client import TcpConnection
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"
    ONE = 1


# -- a fake server speaking the wire (docs/protocol.md) --------------------------------------------------------


async def acknowledge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(HELLO_SIZE)
    writer.write(encode_frame(FrameType.SETTINGS, 0))
    await writer.drain()


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One REQUEST frame, whole: (stream, flags, payload)."""
    length, kind, flags, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
    payload = await reader.readexactly(length)
    assert kind == FrameType.REQUEST
    return int(stream), int(flags), payload


async def closed_by_client(reader: asyncio.StreamReader) -> bool:
    """True once the client has closed the connection (whatever else it sends first is skipped)."""
    while await reader.read(65536):
        pass
    return True


_PING = encode_frame(FrameType.PING, 0, b"12345678")


# -- the client's answers read straight from the bytes: bookkeeping when other frames follow ----------------------


@pytest.mark.parametrize("after", ["ping", "partial ping", "unknown frame"])
async def test_the_last_answer_followed_by_another_frame_in_one_read_wakes_wait_idle(after: str) -> None:
    """_read_answers() popped the last call, then handed the rest of the read to the decoder: nobody called
    _quiet(), so a wait_idle() that was waiting (a pool retiring the connection) was never woken."""
    rest = {"ping": _PING, "partial ping": _PING[:4], "unknown frame": encode_frame(99, 0, b"x")}[after]
    answered = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        await answered.wait()  # the test's wait_idle() is waiting
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"3") + rest)
        await closed_by_client(reader)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            call = asyncio.ensure_future(conn.call("Arith/add", b'{"a":1,"b":2}', timeout=None, metadata={}))
            while not conn.in_flight:
                await asyncio.sleep(0)
            idle = asyncio.ensure_future(conn.wait_idle())
            await asyncio.sleep(0)
            assert not idle.done()
            answered.set()
            assert await call == b"3"
            with anyio.fail_after(5):  # a hang guard, not a timing assertion
                await idle
            assert conn.in_flight == 0
        finally:
            await conn.aclose()


@pytest.mark.parametrize("after", ["ping", "partial ping"])
async def test_a_connection_told_to_go_away_closes_once_its_last_answer_is_read_with_another_frame(
    after: str,
) -> None:
    """docs/protocol.md: the client closes a GOAWAY'd connection once its calls are answered. When the last
    answer came in the same read as another frame (or the start of one), the connection stayed open."""
    rest = {"ping": _PING, "partial ping": _PING[:4]}[after]
    closed = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        writer.write(encode_goaway(stream, "draining"))
        await writer.drain()
        await asyncio.sleep(0.05)  # (two reads, whatever the timing: the answer below is never needed sooner)
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"3") + rest)
        closed.set_result(await closed_by_client(reader))

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            assert await conn.call("Arith/add", b'{"a":1,"b":2}', timeout=None, metadata={}) == b"3"
            assert not conn.usable
            with anyio.fail_after(5):  # a hang guard
                assert await closed
        finally:
            await conn.aclose()


# -- MethodSpec.args_decoder() against decode_args() -------------------------------------------------------------

_TYPES: dict[str, object] = {
    "int": int,
    "str": str,
    "bool": bool,
    "float": float,
    "opt_int": Optional[int],  # noqa: UP045 (the annotation under test)
    "int_or_str": Union[int, str],  # noqa: UP007
    "list_int": list[int],
    "dict_str_int": dict[str, int],
    "point": "Point",
    "literal": Literal["a", "b"],
    "color": Color,
}


@dataclass
class Point:
    x: int
    y: int = 0


_NAMES = ["a", "b", "obj", "payload", "v0", "_slow", "type", "len", "café", "_d1", "True_"]


def _json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([1.0, 1e19, -0.0]),
        st.text(max_size=5),
        st.sampled_from(["a", "b", "red", "NaN", "Infinity"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, max_size=3)
        ),
        max_leaves=6,
    )


@st.composite
def _signatures_and_bodies(draw: st.DrawFn) -> tuple[list[tuple[str, str, bool]], list[bytes]]:
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=5, unique=True))
    params = [(n, draw(st.sampled_from(sorted(_TYPES))), draw(st.booleans())) for n in names]
    bodies: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        keys = [n for n in names if draw(st.integers(0, 9))] + draw(st.lists(st.sampled_from(_NAMES), max_size=2))
        obj = {k: draw(_json_values()) for k in keys}
        kind = draw(st.integers(0, 19))
        if kind == 0:
            bodies.append(b"")
        elif kind == 1:
            bodies.append(_dumps_exact(draw(_json_values())))  # not an object, mostly
        elif kind == 2 and obj:  # a key twice (the last one counts, for both decoders)
            first = next(iter(obj))
            bodies.append(b'{"' + first.encode() + b'": 1, ' + _dumps_exact(obj)[1:])
        elif kind == 3:
            bodies.append(_dumps_exact(obj)[:-1])  # truncated
        else:
            bodies.append(_dumps_exact(obj))
    return params, bodies


def _dumps_exact(obj: object) -> bytes:
    """JSON with integers beyond 64 bits written out (orjson refuses them)."""
    return json.dumps(obj, ensure_ascii=False).encode()


def _spec_of(params: list[tuple[str, str, bool]]) -> MethodSpec:
    scope: dict[str, object] = {"Protocol": Protocol, **{f"T_{k}": v for k, v in _TYPES.items()}, "Point": Point}
    required = [f"{n}: T_{t}" for n, t, default in params if not default]
    optional = [f"{n}: T_{t} = {_DEFAULTS[t]}" for n, t, default in params if default]
    source = f"class Iface(Protocol):\n    async def m(self, {', '.join(required + optional)}) -> int: ...\n"
    exec(source, scope)
    return service_spec(scope["Iface"]).methods["m"]  # type: ignore[arg-type]


_DEFAULTS = {
    "int": "7",
    "str": "'s'",
    "bool": "False",
    "float": "0.5",
    "opt_int": "None",
    "int_or_str": "1",
    "list_int": "()",
    "dict_str_int": "None",
    "point": "None",
    "literal": "'a'",
    "color": "None",
}


def _outcome(decode: Callable[[bytes], dict[str, object]], body: bytes) -> object:
    try:
        return ("ok", decode(body))
    except RpcError as exc:
        return ("error", exc.code, exc.message, exc.details)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_signatures_and_bodies())
def test_args_decoder_gives_the_results_and_errors_of_decode_args(
    case: tuple[list[tuple[str, str, bool]], list[bytes]],
) -> None:
    params, bodies = case
    spec = _spec_of(params)
    fast = spec.args_decoder()
    for body in bodies:
        expected = _outcome(spec.decode_args, body)
        got = _outcome(fast, body)
        assert got == expected, body
        if expected[0] == "ok":  # of the same types too (True is not 1)
            assert [type(v) for v in got[1].values()] == [type(v) for v in expected[1].values()]  # type: ignore[index]


_built: list[int] = []


@dataclass
class Counted:
    """A dataclass whose __post_init__ (user code) counts its runs, and refuses negative values."""

    n: int

    def __post_init__(self) -> None:
        _built.append(self.n)
        if self.n < 0:
            raise ValueError("n must not be negative")


class Builds(Protocol):
    async def put(self, first: Counted, second: Counted, flag: bool) -> int: ...


@pytest.mark.parametrize(
    "body",
    [
        b'{"first": {"n": 1}, "second": {"n": -1}, "flag": true}',  # the second's __post_init__ refuses it
        b'{"first": {"n": 1}, "second": {"n": "x"}, "flag": true}',  # the second fails to decode
        b'{"first": {"n": 1}, "second": {"n": 2}, "flag": true}',  # fine
    ],
)
def test_args_decoder_runs_user_code_of_the_arguments_as_often_as_decode_args(body: bytes) -> None:
    """On a body that names every argument, args_decoder() decoded it, and when a value failed it handed the body
    to decode_args(), which decoded it all again: a dataclass's __post_init__ (user code, with its side effects)
    ran once more per argument than with decode_args(), and a failing body cost one more decoding pass."""
    spec = service_spec(Builds).methods["put"]
    _built.clear()
    expected = _outcome(spec.decode_args, body)
    runs = list(_built)
    _built.clear()
    assert _outcome(spec.args_decoder(), body) == expected
    assert _built == runs


# -- the client against a server that answers out of order, twice, for unknown streams, split anyhow ------------

_CALLS = 6


def _answers(streams: list[int], rng: random.Random) -> tuple[bytes, dict[int, object]]:
    """A read's worth of frames answering `streams` in a random order, mixed with noise; and what each call gets."""
    frames: list[bytes] = []
    expected: dict[int, object] = {}
    order = list(streams)
    rng.shuffle(order)
    for stream in order:
        noise = [
            _PING,
            encode_frame(FrameType.SETTINGS, 0, b""),
            encode_frame(FrameType.RESPONSE, 999_999, b"1"),  # no such call
            encode_frame(FrameType.ERROR, 999_998, b"{}"),
            encode_frame(99, stream, b"unknown type"),
            encode_frame(FrameType.WINDOW_UPDATE, stream, b"\x00\x00\x00\x01"),
            encode_frame(FrameType.DATA, 999_997, b"1"),
        ]
        frames.extend(rng.choice(noise) for _ in range(rng.randrange(3)))
        if not rng.randrange(4):  # with a flag it does not know (ignored): the general path
            frames.append(encode_frame(FrameType.RESPONSE, stream, b"9", 0x10))
            expected[stream] = ("ok", b"9")
        elif rng.randrange(3):
            frames.append(encode_frame(FrameType.RESPONSE, stream, str(stream).encode()))
            expected[stream] = ("ok", str(stream).encode())
        else:
            frames.append(encode_frame(FrameType.ERROR, stream, b'{"code": "not_found", "message": "m%d"}' % stream))
            expected[stream] = ("error", Status.NOT_FOUND, f"m{stream}")
        if rng.randrange(2):  # answered twice: the second is for a call that has ended
            frames.append(encode_frame(FrameType.RESPONSE, stream, b"twice"))
    return b"".join(frames), expected


def _cuts(blob: bytes, rng: random.Random, mode: str) -> list[bytes]:
    if mode == "every byte":
        return [blob[i : i + 1] for i in range(len(blob))]
    if mode == "whole":
        return [blob]
    points = sorted(rng.sample(range(1, len(blob)), min(len(blob) - 1, rng.randrange(1, 6))))
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["whole", "random cuts", "every byte"])
async def test_answers_in_any_order_and_split_anyhow_reach_their_calls(seed: int, mode: str) -> None:
    rng = random.Random(seed)
    expected: dict[int, object] = {}
    pings = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        await acknowledge(reader, writer)
        streams = [(await read_request(reader))[0] for _ in range(_CALLS)]
        blob, answers = _answers(streams, rng)
        expected.update(answers)
        pings = blob.count(_PING)
        for chunk in _cuts(blob, rng, mode):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.001)  # (most likely a read each; any coalescing is a case too)
        await closed_by_client(reader)

    async def one(i: int) -> object:
        try:
            return ("ok", await conn.call("Arith/add", b'{"a":' + str(i).encode() + b"}", timeout=None, metadata={}))
        except RpcError as exc:
            return ("error", exc.code, exc.message)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            with anyio.fail_after(10):  # a hang guard
                idle_waiter = asyncio.ensure_future(_idle_once_busy(conn))
                got = await asyncio.gather(*(one(i) for i in range(_CALLS)))
                await idle_waiter
            assert got == [expected[stream] for stream in range(1, _CALLS + 1)]
            assert conn.in_flight == 0 and conn.usable
        finally:
            await conn.aclose()


async def _idle_once_busy(conn: TcpConnection) -> None:
    while not conn.in_flight:
        await asyncio.sleep(0)
    await conn.wait_idle()


# -- the client's cached REQUEST tail: never the wrong path, timeout or metadata -------------------------------


class Echo(Protocol):
    async def echo(self, a: int) -> list[object]: ...

    async def other(self, a: int) -> list[object]: ...


async def _echo_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each REQUEST with what it carried: [stream, flags, timeout_ms, path, metadata, body]."""
    await acknowledge(reader, writer)
    while True:
        length, kind, flags, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
        payload = await reader.readexactly(length)
        if kind != FrameType.REQUEST:
            continue
        timeout_ms, path_len = struct.unpack_from(">IH", payload)
        path = payload[6 : 6 + path_len]
        (meta_len,) = struct.unpack_from(">I", payload, 6 + path_len)
        meta = payload[10 + path_len : 10 + path_len + meta_len]
        body = payload[10 + path_len + meta_len :]
        said = [stream, flags, timeout_ms, path.decode(), meta.decode(), body.decode()]
        writer.write(encode_frame(FrameType.RESPONSE, stream, orjson.dumps(said)))


def _ms(timeout: float | None) -> int:
    return 0 if timeout is None else min(max(1, math.ceil(timeout * 1000)), 2**32 - 1)


@pytest.mark.parametrize("seed", range(4))
async def test_stub_and_channel_calls_interleaved_each_carry_their_own_path_timeout_and_metadata(seed: int) -> None:
    """_request() reuses the last plain REQUEST's encoded path and timeout when both are the same objects: calls
    of stubs with other timeouts, of Channel.call() with equal paths and timeouts that are other objects, with
    metadata and without, in any order, must each send exactly their own."""
    rng = random.Random(seed)
    one_and_a_half = 11.5
    timeouts = [None, one_and_a_half, float("11.5"), 11.5000001, 20.0004, 30.0, 5e6]  # (5e6 s: over u32 ms)
    paths = ["Echo/echo", "".join(["Echo/", "echo"]), "Echo/other", "Echo/other"[:]]
    metadatas: list[dict[str, str]] = [{}, {"k": "v"}, {}, {"x-id": "1"}]
    async with fake_server(_echo_requests) as endpoint, kubrpc.connect(f"tcp://{endpoint.address}") as channel:
        stubs = [(channel.stub(Echo, timeout=t), t, {}) for t in timeouts]
        stubs += [(channel.stub(Echo, timeout=t, metadata={"m": "1"}), t, {"m": "1"}) for t in (None, one_and_a_half)]
        for i in range(150):
            if rng.randrange(2):
                stub, timeout, want_meta = rng.choice(stubs)
                name = rng.choice(["echo", "other"])
                got = await getattr(stub, name)(i)
                want_path = f"Echo/{name}"
            else:
                want_path, timeout, want_meta = rng.choice(paths), rng.choice(timeouts), rng.choice(metadatas)
                body = b'{"a":' + str(i).encode() + b"}"
                got = orjson.loads(await channel.call(want_path, body, timeout=timeout, metadata=want_meta))
            _, flags, timeout_ms, path, meta, body = got
            assert (flags, timeout_ms, path, body) == (0, _ms(timeout), want_path, f'{{"a":{i}}}'), i
            assert (orjson.loads(meta) if meta else {}) == want_meta, i


# -- the server's REQUESTs read straight from the bytes, against the decoder's way -----------------------------

_LIMIT = 2048  # the server's max_message_size in these tests


def _raw_request(stream: int, head: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(head), FrameType.REQUEST, flags, stream) + head


def _hostile_requests(rng: random.Random) -> list[bytes]:
    """REQUEST frames, good and bad, with stream ids mostly increasing."""
    frames = []
    stream = 0
    for _ in range(rng.randrange(1, 12)):
        pick = rng.randrange(25)
        if pick == 0 and stream:
            sid = rng.choice([stream, stream - 1, 0])  # reused, decreasing, zero: a protocol error
        else:
            stream += rng.randrange(1, 3)
            sid = stream
        a, b = rng.randrange(-5, 5), rng.choice([1, 2, True, "x", 2**63])
        body = orjson.dumps({"a": a, "b": b}) if not isinstance(b, int) or b < 2**63 else b'{"a":1,"b":%d}' % b
        kind = rng.randrange(30)  # (0 and 1, and reused ids, close the connection: rarer)
        if kind == 0:
            frames.append(_raw_request(sid, b"\x00\x00"))  # truncated head
        elif kind == 1:
            frames.append(_raw_request(sid, struct.pack(">IH", 0, 200) + b"Arith/add"))  # path beyond the payload
        elif kind == 2:
            frames.append(_raw_request(sid, struct.pack(">IH", 0, 3) + b"\xff\xfe\xfd" + b"\x00" * 4 + body))
        elif kind == 3:
            frames.append(encode_request(sid, "Arith/add", body, 0, b"{not json"))
        elif kind == 4:
            frames.append(encode_request(sid, "Arith/add", body, 0, b'{"k": 1}'))  # a value not a string
        elif kind == 5:
            frames.append(_raw_request(sid, struct.pack(">IH", 0, 9) + b"Arith/add" + struct.pack(">I", 1 << 30)))
        elif kind == 6:
            frames.append(encode_request(sid, "Arith/add", b'{"a": "' + b"x" * (_LIMIT + 1) + b'", "b": 1}'))
        elif kind == 7:
            frames.append(encode_request(sid, "Arith/nope", body))
        elif kind == 8:
            frames.append(encode_request(sid, "Arith/add", body, rng.choice([1, 0, 2**32 - 1])))
        elif kind == 9:
            frames.append(encode_request(sid, "Arith/add", body, 0, encode_metadata({"X-Key": "v"})))
        else:
            frames.append(encode_request(sid, "Arith/add", body))
    return frames


async def _answers_of(open_raw: Callable[..., Awaitable[RawClient]], data: bytes) -> tuple[list[Frame], bool]:
    """The frames the server sends back for `data` (SETTINGS and PING ACKs aside), and whether it closed."""
    raw = await open_raw()
    await raw.send(data)
    await raw.send(encode_frame(FrameType.PING, 0, b"end"))  # its ACK comes after every answer above
    got: list[Frame] = []
    with anyio.fail_after(10):  # a hang guard
        while True:
            try:
                frame = await raw.frame()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return got + raw.frames, True
            if frame.type == FrameType.PING and frame.payload == b"end":
                return got, False
            if frame.type not in (FrameType.SETTINGS, FrameType.PING):
                got.append(frame)


@pytest.mark.parametrize("seed", range(40))
async def test_hostile_requests_in_one_read_are_answered_as_the_decoder_would(seed: int) -> None:
    """The same REQUEST frames, in one read (the server's fast path, _run_requests) and behind a PING (the
    decoder's path): the same answers, and the same protocol errors (reused, decreasing or zero stream ids close
    the connection after a GOAWAY; other connections go on)."""
    frames = _hostile_requests(random.Random(seed))
    data = b"".join(frames)
    async with serving(max_message_size=_LIMIT) as (_, _, open_raw):
        fast = await _answers_of(open_raw, data)
        general = await _answers_of(open_raw, encode_frame(FrameType.PING, 0, b"first") + data)
        assert fast == general
        # and another connection is served meanwhile, whatever happened to these
        assert await _answers_of(open_raw, request(1, "Arith/add", {"a": 1, "b": 2})) == (
            [Frame(FrameType.RESPONSE, 0, 1, b"3")],
            False,
        )


# -- the client: answers the fast path must leave to the general one -----------------------------------------


async def test_answers_too_large_or_attached_unasked_in_one_read_fail_only_their_call() -> None:
    """A read of plain answers, one of them over max_message_size (under the frame limit) and one in the
    attachments format that its call did not ask for: those two calls fail, the others get their answers."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        s = [(await read_request(reader))[0] for _ in range(4)]
        writer.write(
            encode_frame(FrameType.RESPONSE, s[0], b"1")
            + encode_frame(FrameType.RESPONSE, s[1], b'"' + b"x" * 1100 + b'"')
            + encode_frame(FrameType.RESPONSE, s[2], b"\x00\x00\x00\x00" + b"3", FLAG_ATTACHED)
            + encode_frame(FrameType.RESPONSE, s[3], b"4")
        )
        await closed_by_client(reader)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(max_message_size=1024, keepalive_interval=None).connect(endpoint)
        try:
            calls = [conn.call("Arith/add", b"{}", timeout=None, metadata={}) for _ in range(4)]
            with anyio.fail_after(10):  # a hang guard
                got = await asyncio.gather(*calls, return_exceptions=True)
            assert got[0] == b"1" and got[3] == b"4"
            assert isinstance(got[1], RpcError) and got[1].code is Status.RESOURCE_EXHAUSTED
            assert isinstance(got[2], RpcError) and got[2].code is Status.INTERNAL
            assert "did not ask" in got[2].message
            assert conn.in_flight == 0 and conn.usable
        finally:
            await conn.aclose()


async def test_a_goaway_with_calls_in_flight_closes_the_connection_after_the_last_answer_only() -> None:
    """GOAWAY(last=2) with calls 1, 2 and 3 in flight: 3 is not delivered at once; the connection stays open
    while 1 is unanswered (a PING round trip shows the client has read everything before), and closes after."""
    events: list[str] = []

    async def ping_round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_frame(FrameType.PING, 0, b"sync"))
        while True:
            length, kind, flags, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
            payload = await reader.readexactly(length)
            if kind == FrameType.PING and flags & 1 and payload == b"sync":
                return

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        s = [(await read_request(reader))[0] for _ in range(3)]
        writer.write(encode_goaway(s[1], "draining"))
        writer.write(encode_frame(FrameType.RESPONSE, s[1], b"2"))
        await ping_round_trip(reader, writer)
        events.append("open after 2")  # (a close would have ended the round trip: IncompleteReadError)
        writer.write(encode_frame(FrameType.RESPONSE, s[0], b"1") + _PING)
        await closed_by_client(reader)
        events.append("closed after 1")

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            calls = [conn.call("Arith/add", b"{}", timeout=None, metadata={}) for _ in range(3)]
            with anyio.fail_after(10):  # a hang guard
                got = await asyncio.gather(*calls, return_exceptions=True)
                assert got[:2] == [b"1", b"2"]
                assert isinstance(got[2], NotDeliveredError)
                while len(events) < 2:
                    await asyncio.sleep(0.01)
            assert events == ["open after 2", "closed after 1"]
            assert conn.in_flight == 0 and not conn.usable
        finally:
            await conn.aclose()


async def test_a_connection_lost_with_calls_in_flight_fails_them_and_wakes_wait_idle() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        s = [(await read_request(reader))[0] for _ in range(3)]
        writer.write(encode_frame(FrameType.RESPONSE, s[1], b"2") + b"\x00\x00")  # and the start of a frame
        await writer.drain()
        writer.transport.abort()

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            calls = [conn.call("Arith/add", b"{}", timeout=None, metadata={}) for _ in range(3)]
            with anyio.fail_after(10):  # a hang guard
                idle = asyncio.ensure_future(_idle_once_busy(conn))
                got = await asyncio.gather(*calls, return_exceptions=True)
                await idle
            assert got[1] == b"2"
            for failed in (got[0], got[2]):
                assert isinstance(failed, RpcError) and failed.code is Status.UNAVAILABLE
            assert conn.in_flight == 0 and not conn.usable
        finally:
            await conn.aclose()


async def test_a_call_cancelled_after_its_answer_was_read_leaves_nothing_in_flight() -> None:
    """Two answers in one read: the first call's task, woken first, cancels the second, whose answer is read
    already (its future resolved, its task not yet resumed). Nothing stays in flight; the connection goes on."""
    cancels: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        a, b = (await read_request(reader))[0], (await read_request(reader))[0]
        # b is the call of first() (the second sent): its answer first, so that its task wakes first
        writer.write(encode_frame(FrameType.RESPONSE, b, b"1") + encode_frame(FrameType.RESPONSE, a, b"2"))
        while True:
            length, kind, _, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(length)
            if kind == FrameType.CANCEL:
                cancels.append(stream)
            elif kind == FrameType.REQUEST:
                writer.write(encode_frame(FrameType.RESPONSE, stream, b"3"))

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            second = asyncio.ensure_future(conn.call("Arith/add", b"{}", timeout=30, metadata={}))

            async def first() -> bytes:
                result = await conn.call("Arith/add", b"{}", timeout=30, metadata={})
                second.cancel()
                return result

            with anyio.fail_after(10):  # a hang guard
                one = asyncio.ensure_future(first())
                await asyncio.sleep(0)
                assert await one == b"1"
                with pytest.raises(asyncio.CancelledError):
                    await second
                assert conn.in_flight == 0
                await conn.wait_idle()
                assert await conn.call("Arith/add", b"{}", timeout=30, metadata={}) == b"3"
            assert cancels in ([], [1])  # (a CANCEL for an answered call is ignored by servers)
            assert conn.usable and conn.in_flight == 0
        finally:
            await conn.aclose()


async def test_a_connection_out_of_stream_ids_is_unusable_after_its_last_call_and_the_next_call_opens_another() -> None:
    """`usable` is an attribute the stub reads on every call: it turns False with the last stream id, so the next
    call goes on a new connection instead of failing."""
    from kubrpc.transports._frames import MAX_STREAM_ID

    server = kubrpc.Server()
    server.register(Arith, ArithImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        arith = channel.stub(Arith, timeout=10.0)
        assert await arith.add(1, 2) == 3
        (first,) = channel._connections.values()
        first._next_stream = MAX_STREAM_ID - 2
        assert await arith.add(2, 3) == 5  # stream id MAX - 2
        assert first.usable
        assert await arith.add(3, 4) == 7  # MAX - 1: the last
        assert not first.usable
        assert await arith.add(4, 5) == 9  # on another connection
        (second,) = channel._connections.values()
        assert second is not first and second.usable
