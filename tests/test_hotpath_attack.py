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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Union

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kubrpc.endpoint import Endpoint
from kubrpc.errors import RpcError
from kubrpc.interface import MethodSpec, service_spec
from kubrpc.transports._frames import HEADER, PREFACE, FrameType, encode_frame, encode_goaway
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"
    ONE = 1


# -- a fake server speaking the wire (docs/protocol.md) --------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_HELLO_SIZE = len(PREFACE) + 18  # the preface and the client's PING


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[Endpoint]:
    """A TCP server on 127.0.0.1 that runs `script` on each connection (and closes it afterwards)."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass  # (ended by the test, or by the client: not a failure of the script, nor logged by asyncio)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()


async def acknowledge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(_HELLO_SIZE)
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
