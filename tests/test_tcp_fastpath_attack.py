"""An attack on the TCP fast paths: inline calls run as one plain function (Server.dispatch_inline), frames read
straight from the received bytes (FrameDecoder.feed), and stubs' positional encoder (MethodSpec.call_encoder).

Each test compares a fast path with the general one it stands for: the same answers, bytes and errors.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest

import kubrpc
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
