"""Services shared by the tests: Protocols and implementations that record what happened."""

from __future__ import annotations

import asyncio
import datetime
import enum
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio
import anyio.abc

import kubrpc
from kubrpc import RpcError, Status


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Tag:
    name: str
    weight: float = 1.0


@dataclass
class Item:
    id: uuid.UUID
    name: str
    color: Color
    created: datetime.datetime
    tags: list[Tag] = field(default_factory=list)
    blob: bytes = b""
    parent: Item | None = None


class Arith(Protocol):
    async def add(self, a: int, b: int) -> int: ...

    async def div(self, a: float, b: float) -> float: ...


@kubrpc.interface(name="test.Store")
class Store(Protocol):
    async def put(self, item: Item) -> Item: ...

    async def find(self, names: list[str], *, limit: int = 10) -> dict[str, Item | None]: ...

    async def echo(
        self, value: tuple[int, str], mode: Literal["a", "b"], when: datetime.date | None = None
    ) -> tuple[int, str]: ...

    async def blob(self, size: int) -> bytes: ...


class Control(Protocol):
    async def sleep(self, seconds: float) -> str: ...

    async def fail(self, code: str, message: str) -> None: ...

    async def crash(self) -> None: ...

    @kubrpc.method(idempotent=True)
    async def whoami(self) -> str: ...

    async def cancelled_inside(self) -> None: ...


class ArithImpl:
    async def add(self, a: int, b: int) -> int:
        total = a + b
        if not -(2**63) <= total < 2**64:  # the wire's integer range: a sum beyond it cannot be sent back
            raise RpcError(Status.OUT_OF_RANGE, "the sum is outside the 64-bit integer range")
        return total

    async def div(self, a: float, b: float) -> float:
        if b == 0:
            raise RpcError(Status.INVALID_ARGUMENT, "division by zero")
        return a / b


class StoreImpl:
    def __init__(self) -> None:
        self.items: dict[str, Item] = {}

    async def put(self, item: Item) -> Item:
        self.items[item.name] = item
        return item

    async def find(self, names: list[str], *, limit: int = 10) -> dict[str, Item | None]:
        return {n: self.items.get(n) for n in names[:limit]}

    async def echo(
        self, value: tuple[int, str], mode: Literal["a", "b"], when: datetime.date | None = None
    ) -> tuple[int, str]:
        return value

    async def blob(self, size: int) -> bytes:
        if not 0 <= size <= 1 << 20:
            raise RpcError(Status.OUT_OF_RANGE, "size must be in 0..1048576")
        return b"x" * size


class ControlImpl:
    """Records handler starts and cancellations so tests can see the server side of a call."""

    def __init__(self, name: str = "server") -> None:
        self.name = name
        self.started = 0
        self.cancelled = 0
        self.finished = 0
        self.calls = 0

    async def sleep(self, seconds: float) -> str:
        self.started += 1
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        self.finished += 1
        return "slept"

    async def fail(self, code: str, message: str) -> None:
        raise RpcError(Status[code], message)

    async def crash(self) -> None:
        raise KeyError("secret internal detail /etc/passwd")

    async def whoami(self) -> str:
        self.calls += 1
        return self.name

    async def cancelled_inside(self) -> None:
        """A handler whose own code raises CancelledError (say, from a future someone else cancelled)."""
        raise asyncio.CancelledError


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until `predicate()` holds; TimeoutError after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@asynccontextmanager
async def foreign_http(response: bytes) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP/1.1 server on 127.0.0.1 that is not kubrpc: per connection it reads one request whole, writes the
    raw bytes `response` and closes. Yields its port and the heads of the requests it has read."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(next(lengths, 0))
        heads.append(head)
        writer.write(response)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        await server.wait_closed()


def make_server(name: str = "server", **options: object) -> tuple[kubrpc.Server, ControlImpl]:
    """A server with every test service registered; returns it and its Control implementation."""
    server = kubrpc.Server(**options)  # type: ignore[arg-type]
    control = ControlImpl(name)
    server.register(Arith, ArithImpl())
    server.register(Store, StoreImpl())
    server.register(Control, control)
    return server, control


# For `kubrpc serve services:server` in a subprocess (tests/test_cli.py).
server, _control = make_server("subprocess", drain_timeout=10)
delayed_server, _ = make_server("delayed", drain_timeout=10, shutdown_delay=1.0)


class Instance:
    """A server a test can restart, as a pod of a rolling restart: run() serves until restart() drains it, then,
    after `down` seconds, serves again on the same port."""

    def __init__(self, make: Callable[[], kubrpc.Server], scheme: str = "tcp", *, down: float = 0.2) -> None:
        self.make = make
        self.scheme = scheme
        self.down = down
        self.port = 0
        self.restarts = 0
        self._restart = anyio.Event()
        self._stop = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); the first time, report started once the port is known."""
        first = True
        while not self._stop:
            async with self.make().serve(f"{self.scheme}://127.0.0.1:{self.port}") as listener:
                self.port = int(listener.url.rsplit(":", 1)[1])
                if first:
                    task_status.started()
                    first = False
                await self._restart.wait()
                self._restart = anyio.Event()
            # Drained and closed: down for a moment, as a pod would be.
            self.restarts += 1
            await anyio.sleep(self.down)

    def restart(self) -> None:
        """Drain the server now; run() starts a new one on the same port."""
        self._restart.set()

    async def restarted(self) -> None:
        """restart(), then wait (a hang guard of 20 s) until the drain is over."""
        before = self.restarts
        self.restart()
        with anyio.fail_after(20):
            while self.restarts == before:
                await anyio.sleep(0.01)

    def stop(self) -> None:
        """End run() after the current server drains."""
        self._stop = True
        self._restart.set()
