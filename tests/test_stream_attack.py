"""The attack pass on stream calls (transport-independent side): odd callers, odd handlers, deadlines,
cancellation, retries and delivery, interceptors and metrics, and the checks of register() and stub().

Each test runs over every transport of test_streaming.STREAM_TRANSPORTS (inproc, and tcp on 127.0.0.1) through
the public API. Each one failed before the fix that came with it (see the commit messages).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import pytest
from test_streaming import STREAM_TRANSPORTS, aiter_of, settle

import kubrpc
import kubrpc.metrics
from kubrpc import RpcError, Status
from kubrpc.interceptors import CallInfo, ClientCall, Proceed

pytestmark = pytest.mark.anyio

_names = itertools.count()


@pytest.fixture(params=STREAM_TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _url(transport: str) -> str:
    return f"inproc://attack-{next(_names)}" if transport == "inproc" else f"{transport}://127.0.0.1:0"


@kubrpc.interface(name="attack.Odd")
class Odd(Protocol):
    def ticks(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterable[int]) -> int: ...

    def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]: ...

    def stubborn(self, n: int) -> AsyncIterator[int]: ...

    async def read_in_task(self, values: AsyncIterable[int], take: int) -> int: ...

    async def wait(self, values: AsyncIterable[int]) -> int: ...


class OddImpl:
    def __init__(self) -> None:
        self.runs = 0
        self.yields_after_cancel = 0
        self.running = 0
        self.gate = asyncio.Event()

    async def ticks(self, n: int) -> AsyncIterator[int]:
        self.runs += 1
        for i in range(n):
            yield i

    async def total(self, values: AsyncIterable[int]) -> int:
        self.runs += 1
        return sum([v async for v in values])

    async def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]:
        async for w in words:
            yield w.upper()

    async def stubborn(self, n: int) -> AsyncIterator[int]:
        """Swallows its cancellation and keeps yielding (a badly written handler)."""
        self.running += 1
        cancelled = False
        try:
            for i in range(n):
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    cancelled = True
                if cancelled:
                    self.yields_after_cancel += 1
                yield i
        finally:
            self.running -= 1

    async def read_in_task(self, values: AsyncIterable[int], take: int) -> int:
        """Reads the request stream from a task of its own, and returns once it has `take` messages."""
        got: list[int] = []
        enough = asyncio.Event()

        async def reader() -> None:
            async for v in values:
                got.append(v)
                if len(got) >= take:
                    enough.set()

        task = asyncio.create_task(reader())
        await enough.wait()
        task.cancel()
        return sum(got[:take])

    async def wait(self, values: AsyncIterable[int]) -> int:
        """Never reads its stream; waits for the gate."""
        self.running += 1
        try:
            await self.gate.wait()
            return 0
        finally:
            self.running -= 1


@asynccontextmanager
async def odd_client(
    transport: str, *, server: dict[str, Any] | None = None, timeout: float | None = 10.0, **options: Any
) -> AsyncIterator[tuple[Odd, OddImpl, kubrpc.Channel]]:
    impl = OddImpl()
    srv = kubrpc.Server(**(server or {}))
    srv.register(Odd, impl)
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(srv.serve(_url(transport)))
        channel = await stack.enter_async_context(kubrpc.connect(listener.url, **options))
        yield channel.stub(Odd, timeout=timeout), impl, channel


# -- callers doing odd things ---------------------------------------------------------------------------------


async def test_a_client_iterable_raising_cancelled_error_ends_the_call(transport: str) -> None:
    async def raises() -> AsyncIterator[int]:
        yield 1
        raise asyncio.CancelledError

    async with odd_client(transport, timeout=None) as (odd, _, _):
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):  # a hang guard: without a deadline the call used to wait forever
                await odd.total(raises())
        assert await odd.total(aiter_of([2])) == 2


async def test_a_handler_reading_its_stream_from_its_own_task_may_return_early(transport: str) -> None:
    async def endless() -> AsyncIterator[int]:
        while True:
            yield 1
            await asyncio.sleep(0)

    async with odd_client(transport) as (odd, _, _):
        assert await odd.read_in_task(endless(), take=3) == 3


async def test_a_handler_that_swallows_its_cancellation_stops_at_its_next_yield(transport: str) -> None:
    async with odd_client(transport) as (odd, impl, _):
        results = odd.stubborn(10**9)
        await results.__anext__()
        await results.aclose()  # type: ignore[attr-defined]
        assert await settle(lambda: impl.running == 0)
        assert impl.yields_after_cancel <= 1
