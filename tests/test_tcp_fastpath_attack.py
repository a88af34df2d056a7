"""An attack on the TCP fast paths: inline calls run as one plain function (Server.dispatch_inline), frames read
straight from the received bytes (FrameDecoder.feed), and stubs' positional encoder (MethodSpec.call_encoder).

Each test compares a fast path with the general one it stands for: the same answers, bytes and errors.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
from hypothesis import given, settings, strategies as st

import kubrpc
from kubrpc.interface import service_spec
from kubrpc.transports._frames import Frame, FrameDecoder
from kubrpc.transports._tcp_server import TcpListener

pytestmark = pytest.mark.anyio


class Reload(Protocol):
    async def greet(self, name: str) -> str: ...


@asynccontextmanager
async def serving(iface: type, impl: object, **options: Any) -> AsyncIterator[tuple[TcpListener, kubrpc.Server]]:
    server = kubrpc.Server(drain_timeout=2, **options)
    server.register(iface, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        assert isinstance(listener, TcpListener)
        yield listener, server


# -- a handler whose code changes after register() (a hot reloader patches __code__ in place) ---------------------


async def test_a_handler_reloaded_with_an_await_is_run_in_a_task_once_not_answered_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hot reloaders (jurigged, reloadium, an IDE's) swap a function's __code__ in place: a handler registered
    without an await that gains one was still run inline, closed at its first wait and answered INTERNAL, on every
    call until a restart. It must run in a task of its own, once."""
    ran: list[str] = []

    class Impl:
        async def greet(self, name: str) -> str:
            ran.append(name)
            return f"hi {name}"

    async def reloaded(self: object, name: str) -> str:
        ran.append(name)
        await asyncio.sleep(0)
        return f"hello {name}"

    assert Impl.greet.__code__.co_freevars == reloaded.__code__.co_freevars  # (both close over `ran`)
    impl = Impl()
    async with serving(Reload, impl) as (listener, server), kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Reload, timeout=5)
        assert server.runs_inline("Reload/greet")
        assert await stub.greet("ann") == "hi ann"
        Impl.greet.__code__ = reloaded.__code__  # what a hot reloader does
        caplog.set_level(logging.ERROR, "kubrpc")
        assert await stub.greet("bob") == "hello bob"
        assert await stub.greet("cy") == "hello cy"
        assert not server.runs_inline("Reload/greet")
    assert ran == ["ann", "bob", "cy"]  # each call's handler ran once
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- a result that fails to encode with something other than TypeError ------------------------------------------


@dataclass
class Stats:
    mean: float
    note: str | None = None
    cache: dict[str, float] = field(init=False, repr=False)  # set later, by whoever needs it


class Results(Protocol):
    async def stats(self) -> Stats: ...

    async def ping(self) -> str: ...


class InlineResults:
    async def stats(self) -> Stats:
        return Stats(1.5)  # `cache` never set: orjson skips it, the float encoder's second pass does not

    async def ping(self) -> str:
        return "pong"


class WaitingResults:
    async def stats(self) -> Stats:
        await asyncio.sleep(0)
        return Stats(1.5)

    async def ping(self) -> str:
        await asyncio.sleep(0)
        return "pong"


@pytest.mark.parametrize("impl", [InlineResults(), WaitingResults()], ids=["inline", "task"])
async def test_a_result_whose_encoding_raises_is_internal_and_the_connection_lives_on(
    impl: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-TypeError from encoding the result (here AttributeError) escaped the server: run inline, it went up
    through data_received and the transport closed the connection with every call on it; in a task, the call
    was never answered (the client waited out its deadline)."""
    async with serving(Results, impl) as (listener, server), kubrpc.connect(listener.url) as channel:
        assert server.runs_inline("Results/stats") is isinstance(impl, InlineResults)
        stub = channel.stub(Results, timeout=5)
        with pytest.raises(kubrpc.RpcError) as caught:
            await stub.stats()
        assert (caught.value.code, caught.value.message) == (kubrpc.Status.INTERNAL, "internal error")
        assert await stub.ping() == "pong"
        assert len(listener.connections) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "result of Results/stats cannot be encoded"
    ]


# -- FrameDecoder.feed: frames read from the received buffer itself ----------------------------------------------

_frames = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, 7, 8, 9, 200]),  # types, DATA (7) and unknown ones among them
        st.sampled_from([0, 1, 8, 9]),  # 8: FLAG_ATTACHED (a Packed payload on REQUEST, RESPONSE, DATA)
        st.integers(0, 3),
        st.one_of(st.binary(max_size=30), st.integers(4000, 6000).map(lambda n: bytes(range(256)) * (n // 256))),
    ),
    max_size=6,
)


@given(_frames, st.binary(max_size=8), st.data(), st.sampled_from(["bytearray", "memoryview"]))
@settings(max_examples=300, deadline=None)
def test_frames_fed_from_a_buffer_the_receiver_reuses_are_those_of_one_feed(
    sent: list[tuple[int, int, int, bytes]], tail: bytes, data: st.DataObject, kind: str
) -> None:
    """feed() reads frames straight from `data` when nothing is buffered and keeps a partial tail through a
    memoryview: chunks given as a bytearray (or a view of one) that the receiver overwrites once feed() returns,
    split anywhere (byte by byte, several frames and a partial one in one chunk, large frames read through a
    view), must give the frames, payload types and budget of one feed of the whole as bytes."""
    wire = b"".join(struct.pack(">IBBI", len(p), t, f, s) + p for t, f, s, p in sent) + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    if data.draw(st.booleans()):
        cuts = list(range(len(wire) + 1))  # byte by byte
    held = [0]

    def admit(n: int) -> bool:
        held[0] += n
        return True

    def release(n: int) -> None:
        held[0] -= n

    def decoded(frames: list[Frame]) -> list[tuple[int, int, int, str, bytes]]:
        return [(f.type, f.flags, f.stream, type(f.payload).__name__, bytes(f.payload)) for f in frames]

    whole = FrameDecoder(1 << 20)
    expected = decoded(whole.feed(wire))
    decoder = FrameDecoder(1 << 20, admit, release)
    got: list[tuple[int, int, int, str, bytes]] = []
    reused = bytearray()
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        reused[:] = wire[start:stop]
        got += decoded(decoder.feed(reused if kind == "bytearray" else memoryview(reused)))  # type: ignore[arg-type]
        reused[:] = b"\xee" * (stop - start)  # the receiver's next read overwrites its buffer
    assert got == expected
    assert decoder.buffered == whole.buffered
    decoder.close()
    assert held == [0]


# -- MethodSpec.call_encoder(): the stubs' positional fast path -----------------------------------------------------


class Shapes(Protocol):
    async def none(self) -> int: ...

    async def one(self, a: int) -> int: ...

    async def two(self, a: int, b: str) -> int: ...

    async def three(self, a: Any, b: float, c: bytes) -> int: ...

    async def four(self, a: int, b: int, c: int, d: list[float]) -> int: ...

    async def five(self, a: int, b: int, c: int, d: int, e: set[int]) -> int: ...

    async def six(self, a: int, b: int, c: int, d: int, e: int, f: int | None) -> int: ...

    async def defaults(self, a: int, b: int | None = None, c: str = "c") -> int: ...

    async def keyword_only(self, a: int, *, b: int) -> int: ...

    async def stream(self, a: int, items: AsyncIterable[int]) -> int: ...


_values = st.one_of(
    st.integers(-(2**65), 2**65),  # beyond 64 bits: orjson refuses them
    st.floats(),  # NaN and infinities: the float encoder's second pass
    st.text(max_size=3),
    st.none(),
    st.binary(max_size=3),
    st.sets(st.integers(0, 3), max_size=2),
    st.just(object()),  # no encoding at all
    st.just({1: "non-string key"}),
)


@given(
    st.sampled_from(sorted(service_spec(Shapes).methods)),
    st.lists(_values, max_size=7),
    st.dictionaries(st.sampled_from(["a", "b", "c", "f", "items", "zz"]), _values, max_size=2),
)
@settings(max_examples=500, deadline=None)
def test_the_positional_encoder_gives_the_bytes_and_errors_of_encode_call(
    name: str, args: list[object], kwargs: dict[str, object]
) -> None:
    """call_encoder() skips encode_call()'s binding when every argument comes by position (a dict display for up
    to four): for any call, right or wrong, it must give the same bytes, or the same exception and message."""
    spec = service_spec(Shapes).methods[name]

    def outcome(encode: Callable[[tuple[Any, ...], Mapping[str, Any]], bytes], kw: dict[str, object]) -> object:
        try:
            return encode(tuple(args), kw)
        except Exception as exc:  # TypeError like Python's, RpcError INVALID_ARGUMENT for what cannot be encoded
            return type(exc), str(exc)

    fast = spec.call_encoder()
    assert outcome(fast, kwargs) == outcome(spec.encode_call, kwargs)
    assert outcome(fast, {}) == outcome(spec.encode_call, {})


# -- inline and task paths: the same limits, and nothing of one call's task reaching the next -------------------


class Sized(Protocol):
    async def text(self, size: int) -> str: ...

    async def tag(self, name: str) -> str: ...


class InlineSized:
    async def text(self, size: int) -> str:
        return "x" * size

    async def tag(self, name: str) -> str:  # names its task, as code tagging a request for its logs does
        task = asyncio.current_task()
        assert task is not None
        before = task.get_name()
        task.set_name(name)
        return before


class WaitingSized(InlineSized):
    async def text(self, size: int) -> str:
        await asyncio.sleep(0)
        return await super().text(size)

    async def tag(self, name: str) -> str:
        await asyncio.sleep(0)
        return await super().tag(name)


@pytest.mark.parametrize("impl", [InlineSized(), WaitingSized()], ids=["inline", "task"])
async def test_a_result_of_max_message_size_goes_and_one_byte_more_is_resource_exhausted(impl: object) -> None:
    async with serving(Sized, impl, max_message_size=1000) as (listener, server), kubrpc.connect(listener.url) as ch:
        assert server.runs_inline("Sized/text") is not isinstance(impl, WaitingSized)
        stub = ch.stub(Sized, timeout=5)
        assert await stub.text(998) == "x" * 998  # 1000 bytes of JSON, with its quotes
        with pytest.raises(kubrpc.RpcError) as caught:
            await stub.text(999)
        assert (caught.value.code, caught.value.message) == (
            kubrpc.Status.RESOURCE_EXHAUSTED,
            "response exceeds the maximum message size",
        )
        assert await stub.text(1) == "x"


@pytest.mark.parametrize("impl", [InlineSized(), WaitingSized()], ids=["inline", "task"])
async def test_a_name_one_call_gives_its_task_is_not_the_next_calls(impl: object) -> None:
    """Inline calls share a stand-in task: one renamed it (and with it the taskName of every later inline call's
    log records, on 3.12+), as a call that cancels it or hangs callbacks on it must not reach the next."""
    async with serving(Sized, impl) as (listener, _), kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Sized, timeout=5)
        seen = [await stub.tag(f"request {i}") for i in range(3)]
        assert not any(name.startswith("request") for name in seen), seen
