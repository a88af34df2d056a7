"""The attack pass on stream calls (transport-independent side): odd callers, odd handlers, deadlines,
cancellation, retries and delivery, interceptors and metrics, and the checks of register() and stub().

Each test runs over every transport of test_streaming.STREAM_TRANSPORTS (inproc, and tcp on 127.0.0.1) through
the public API. Each one failed before the fix that came with it (see the commit messages).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import pytest
from prometheus_client import CollectorRegistry
from test_streaming import STREAM_TRANSPORTS, aiter_of, settle

import kubrpc
import kubrpc.metrics
from kubrpc import RpcError, Status
from kubrpc._streaming import StreamCall
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


class CountingBalancer:
    """A round-robin balancer that learns from calls (CallFeedback): counts on_start and on_finish pairs."""

    def __init__(self) -> None:
        self.endpoints: list[Any] = []
        self.turn = 0
        self.started = 0
        self.finished = 0
        self.statuses: list[Status] = []

    def update(self, endpoints: Any) -> None:
        self.endpoints = [ep for ep in endpoints if ep.ready]

    def pick(self) -> Any:
        if not self.endpoints:
            raise RpcError(Status.UNAVAILABLE, "no endpoints")
        self.turn += 1
        return self.endpoints[self.turn % len(self.endpoints)]

    def on_start(self, endpoint: Any) -> None:
        self.started += 1

    def on_finish(self, endpoint: Any, *, status: Status, latency: float) -> None:
        self.finished += 1
        self.statuses.append(status)

    @property
    def in_flight(self) -> int:
        return self.started - self.finished


# -- interceptors, deadlines and delivery ---------------------------------------------------------------------


async def test_the_deadline_covers_the_client_interceptors_of_a_stream(transport: str) -> None:
    async def slow(call: ClientCall, proceed: Proceed) -> bytes:
        await asyncio.sleep(3600)  # fetching a token from a service that hangs
        return await proceed()

    async with odd_client(transport, timeout=0.2, interceptors=[slow]) as (odd, _, _):
        with pytest.raises(RpcError) as info:
            async with asyncio.timeout(10):  # a hang guard
                async for _ in odd.ticks(3):
                    pass
        assert info.value.code is Status.DEADLINE_EXCEEDED
        with pytest.raises(RpcError) as info:
            async with asyncio.timeout(10):
                await odd.total(aiter_of([1]))
        assert info.value.code is Status.DEADLINE_EXCEEDED


async def test_an_interceptor_that_proceeds_twice_does_not_run_the_stream_twice(transport: str) -> None:
    async def twice(call: ClientCall, proceed: Proceed) -> bytes:
        await proceed()
        return await proceed()

    balancer = CountingBalancer()
    async with odd_client(transport, interceptors=[twice], balancer=balancer) as (odd, impl, _):
        with pytest.raises(RpcError) as info:
            async for _ in odd.ticks(3):
                pass
        assert info.value.code is Status.INTERNAL and "proceed() twice" in info.value.message
        with pytest.raises(RpcError):
            await odd.total(aiter_of([1, 2]))
        assert await settle(lambda: balancer.in_flight == 0)
        assert impl.runs <= 2  # each stream opened once (and cancelled), never twice


async def test_feedback_pairs_stay_balanced_on_every_ending(transport: str) -> None:
    async def after(call: ClientCall, proceed: Proceed) -> bytes:
        result = await proceed()
        if call.metadata.get("x-fail") == "after":
            raise RpcError(Status.PERMISSION_DENIED, "refused after proceeding")
        return result

    balancer = CountingBalancer()
    async with odd_client(transport, interceptors=[after], balancer=balancer, timeout=5) as (odd, impl, channel):
        assert [t async for t in odd.ticks(3)] == [0, 1, 2]
        assert await odd.total(aiter_of([1, 2])) == 3
        async for _ in odd.ticks(10):
            break
        with pytest.raises(KeyError):
            await odd.total(aiter_of([1], then=KeyError("x")))
        failing = channel.stub(Odd, timeout=5, metadata={"x-fail": "after"})
        with pytest.raises(RpcError):
            async for _ in failing.ticks(3):
                pass
        short = channel.stub(Odd, timeout=0.1)
        with pytest.raises(RpcError):
            await short.wait(aiter_of([1]))
        assert await settle(lambda: impl.running == 0)
        never = asyncio.create_task(odd.wait(aiter_of([1])))
        assert await settle(lambda: impl.running == 1)
        never.cancel()
        with pytest.raises(asyncio.CancelledError):
            await never
        assert await settle(lambda: balancer.in_flight == 0), (balancer.started, balancer.finished)
        assert balancer.started == 7, balancer.statuses


async def test_client_metrics_count_every_stream_once_with_its_ending(transport: str) -> None:
    metrics = kubrpc.metrics.ClientMetrics(CollectorRegistry())

    async def deny(call: ClientCall, proceed: Proceed) -> bytes:
        if call.metadata.get("x-deny"):
            raise RpcError(Status.PERMISSION_DENIED, "denied here")
        return await proceed()

    async with odd_client(transport, metrics=metrics, interceptors=[deny], timeout=5) as (odd, _, channel):
        assert [t async for t in odd.ticks(2)] == [0, 1]
        with pytest.raises(RpcError):
            await odd.total(aiter_of([1, object()]))  # cannot be encoded: INVALID_ARGUMENT
        with pytest.raises(RpcError):
            async for _ in channel.stub(Odd, metadata={"x-deny": "1"}).ticks(2):
                pass
        with pytest.raises(RpcError):
            await channel.stub(Odd, timeout=0.1).wait(aiter_of([1]))
    text = metrics.exposition()[0].decode()

    def count(method: str, code: str) -> float:
        for line in text.splitlines():
            if (
                line.startswith("kubrpc_client_calls_total{")
                and f'method="{method}"' in line
                and f'code="{code}"' in line
            ):
                return float(line.rpartition(" ")[2])
        return 0.0

    assert count("ticks", "OK") == 1
    assert count("total", "INVALID_ARGUMENT") == 1
    assert count("ticks", "PERMISSION_DENIED") == 1
    assert count("wait", "DEADLINE_EXCEEDED") == 1


# -- stubs: arguments are checked when the stub is called --------------------------------------------------------


@kubrpc.interface(name="attack.Mixed")
class Mixed(Protocol):
    async def mid(self, a: int, values: AsyncIterable[int], b: int = 10, *, c: int = 100) -> int: ...

    def echo(self, a: int, words: AsyncIterable[str], *, suffix: str = "") -> AsyncIterator[str]: ...

    def ticks(self, n: int) -> AsyncIterator[int]: ...

    async def add(self, a: int, b: int) -> int: ...


class MixedImpl:
    async def mid(self, a: int, values: AsyncIterable[int], b: int = 10, *, c: int = 100) -> int:
        return a + b + c + sum([v async for v in values])

    async def echo(self, a: int, words: AsyncIterable[str], *, suffix: str = "") -> AsyncIterator[str]:
        async for w in words:
            yield f"{a}{w}{suffix}"

    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def add(self, a: int, b: int) -> int:
        return a + b


@asynccontextmanager
async def mixed_client(transport: str) -> AsyncIterator[Mixed]:
    srv = kubrpc.Server()
    srv.register(Mixed, MixedImpl())
    async with srv.serve(_url(transport)) as listener, kubrpc.connect(listener.url) as channel:
        yield channel.stub(Mixed, timeout=10)


async def test_the_stream_parameter_anywhere_positional_or_keyword(transport: str) -> None:
    async with mixed_client(transport) as mixed:
        assert await mixed.mid(1, aiter_of([2])) == 113
        assert await mixed.mid(1, aiter_of([2]), 3) == 106
        assert await mixed.mid(1, aiter_of([2]), 3, c=4) == 10
        assert await mixed.mid(1, values=aiter_of([2]), b=3) == 106
        assert await mixed.mid(a=1, values=aiter_of([2]), c=0) == 13
        assert await mixed.mid(values=aiter_of([]), a=1) == 111
        assert [w async for w in mixed.echo(1, aiter_of(["x"]), suffix="!")] == ["1x!"]
        assert [w async for w in mixed.echo(words=aiter_of(["y"]), a=2)] == ["2y"]
        with pytest.raises(TypeError, match="multiple values for argument 'values'"):
            await mixed.mid(1, aiter_of([2]), values=aiter_of([3]))
        with pytest.raises(TypeError, match="missing required argument 'values'"):
            await mixed.mid(1)
        with pytest.raises(TypeError, match="'values' must be an async iterable, not list"):
            await mixed.mid(1, [1, 2])


async def test_a_stream_stub_checks_its_arguments_when_called(transport: str) -> None:
    async with mixed_client(transport) as mixed:
        with pytest.raises(TypeError, match="'words' must be an async iterable, not list"):
            mixed.echo(1, ["x"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="missing required argument 'n'"):
            mixed.ticks()  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="missing required argument 'n'"):
            mixed.ticks(m=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="missing required argument 'b'"):
            await mixed.add(a=1, c=2)  # type: ignore[call-arg]  (as many names as parameters, not the same)
        with pytest.raises(RpcError) as info:
            mixed.ticks(object())  # type: ignore[arg-type]
        assert info.value.code is Status.INVALID_ARGUMENT


# -- handlers doing odd things, and the server's side ---------------------------------------------------------


@kubrpc.interface(name="attack.Server")
class Side(Protocol):
    def ticks(self, n: int) -> AsyncIterator[int]: ...

    def fail_after(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterable[int]) -> int: ...

    async def first(self, values: AsyncIterable[bytes]) -> int: ...

    def forever(self) -> AsyncIterator[int]: ...

    def raises_in_finally(self) -> AsyncIterator[int]: ...

    def slow(self) -> AsyncIterator[int]: ...

    def unencodable(self) -> AsyncIterator[int]: ...

    def blob(self, size: int) -> AsyncIterator[bytes]: ...

    async def sizes(self, values: AsyncIterable[bytes]) -> int: ...


class SideImpl:
    def __init__(self) -> None:
        self.running = 0
        self.runs = 0

    async def ticks(self, n: int) -> AsyncIterator[int]:
        self.runs += 1
        for i in range(n):
            yield i

    async def fail_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise RpcError(Status.NOT_FOUND, "gone")

    async def total(self, values: AsyncIterable[int]) -> int:
        self.runs += 1
        return sum([v async for v in values])

    async def first(self, values: AsyncIterable[bytes]) -> int:
        return 0  # returns before reading anything

    async def forever(self) -> AsyncIterator[int]:
        self.running += 1
        try:
            while True:
                yield 1
        finally:
            self.running -= 1

    async def unencodable(self) -> AsyncIterator[int]:
        self.running += 1
        try:
            yield 0
            yield 1
            yield object()  # type: ignore[misc]
            yield 3
        finally:
            self.running -= 1

    async def slow(self) -> AsyncIterator[int]:
        self.running += 1
        try:
            while True:
                yield 1
                await asyncio.sleep(0.01)
        finally:
            self.running -= 1

    async def raises_in_finally(self) -> AsyncIterator[int]:
        self.running += 1
        try:
            while True:
                yield 1
        finally:
            self.running -= 1
            raise RpcError(Status.ABORTED, "raised in its finally")  # after the client left

    async def blob(self, size: int) -> AsyncIterator[bytes]:
        yield b"a"
        yield b"a" * size

    async def sizes(self, values: AsyncIterable[bytes]) -> int:
        return sum([len(v) async for v in values])


@asynccontextmanager
async def side_client(
    transport: str, *, server: dict[str, Any] | None = None, timeout: float | None = 10.0, **options: Any
) -> AsyncIterator[tuple[Side, SideImpl, kubrpc.Channel]]:
    impl = SideImpl()
    srv = kubrpc.Server(**(server or {}))
    srv.register(Side, impl)
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(srv.serve(_url(transport)))
        channel = await stack.enter_async_context(kubrpc.connect(listener.url, **options))
        yield channel.stub(Side, timeout=timeout), impl, channel


async def test_server_metrics_count_each_kind_and_ending_exactly(transport: str) -> None:
    metrics = kubrpc.metrics.ServerMetrics(CollectorRegistry())
    async with side_client(transport, server={"metrics": metrics}) as (side, impl, channel):
        assert [t async for t in side.ticks(3)] == [0, 1, 2]
        assert await side.total(aiter_of([1, 2])) == 3
        with pytest.raises(RpcError):
            async for _ in side.fail_after(2):
                pass
        async for _ in side.forever():
            break
        assert await settle(lambda: impl.running == 0)
        with pytest.raises(RpcError) as info:
            async for _ in channel.stub(Side, timeout=0.2).forever():
                await asyncio.sleep(0.01)
        assert info.value.code is Status.DEADLINE_EXCEEDED
        assert await settle(lambda: impl.running == 0)
    text = metrics.exposition()[0].decode()

    def value(name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rpartition(" ")[2])
        return 0.0

    calls = "kubrpc_server_calls_total"
    assert value(calls, method="ticks", code="OK") == 1
    assert value(calls, method="total", code="OK") == 1
    assert value(calls, method="fail_after", code="NOT_FOUND") == 1
    assert value(calls, method="forever", code="CANCELLED") == 1
    assert value(calls, method="forever", code="DEADLINE_EXCEEDED") == 1
    messages = "kubrpc_server_stream_messages_total"
    assert value(messages, method="ticks", direction="sent") == 3
    assert value(messages, method="total", direction="received") == 2
    assert value(messages, method="fail_after", direction="sent") == 2


async def test_a_message_the_handler_cannot_encode_is_internal_after_the_others(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with side_client(transport) as (side, impl, _):
        got: list[int] = []
        with pytest.raises(RpcError) as info:
            async for t in side.unencodable():
                got.append(t)  # noqa: PERF401
        assert got == [0, 1]
        assert info.value.code is Status.INTERNAL and info.value.message == "internal error"
        assert impl.running == 0
        assert "a message of attack.Server/unencodable cannot be encoded" in caplog.text


async def test_a_handler_raising_in_its_finally_after_the_client_left(transport: str) -> None:
    async with side_client(transport) as (side, impl, _):
        for _ in range(3):
            async for _ in side.raises_in_finally():
                break
        assert await settle(lambda: impl.running == 0)
        assert [t async for t in side.ticks(2)] == [0, 1]


async def test_a_client_stream_handler_that_returns_before_reading(transport: str) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1000

    async with side_client(transport) as (side, _, _):
        for _ in range(3):
            assert await side.first(endless()) == 0
        assert await side.total(aiter_of([4])) == 4


async def test_huge_messages_are_resource_exhausted_both_ways(transport: str) -> None:
    async with side_client(transport, server={"max_message_size": 100_000}) as (side, _, _):
        got: list[int] = []
        with pytest.raises(RpcError) as info:
            async for blob in side.blob(200_000):
                got.append(len(blob))  # noqa: PERF401
        assert got == [1]
        assert info.value.code is Status.RESOURCE_EXHAUSTED and "maximum message size" in info.value.message
        assert await side.sizes(aiter_of([b"a" * 1000])) == 1000
        with pytest.raises(RpcError) as info:
            await side.sizes(aiter_of([b"a", b"b" * 100_001]))  # over the limit, within the frame's overhead
        assert info.value.code is Status.RESOURCE_EXHAUSTED and "maximum message size" in info.value.message
        assert await side.sizes(aiter_of([b"a" * 1000])) == 1000


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_a_request_message_far_over_the_servers_limit_ends_only_its_stream(transport: str) -> None:
    """tcp: a DATA frame over the frame limit is skipped unread and ends its stream alone (it was a protocol
    error that dropped the connection, and every other call on it failed UNAVAILABLE)."""
    async with side_client(transport, server={"max_message_size": 100_000}) as (side, _, channel):
        other = side.slow()
        await other.__anext__()  # another stream on the same connection
        with pytest.raises(RpcError) as info:
            await side.sizes(aiter_of([b"a", b"b" * 1_000_000]))
        assert info.value.code is Status.RESOURCE_EXHAUSTED and "maximum message size" in info.value.message
        assert await other.__anext__() == 1  # the other stream goes on
        await other.aclose()  # type: ignore[attr-defined]
        assert len(channel.connections) == 1


# -- the channel's side: closing, abandoning, cancelling ------------------------------------------------------


async def test_closing_the_channel_ends_running_streams_clearly(transport: str) -> None:
    impl = SideImpl()
    srv = kubrpc.Server()
    srv.register(Side, impl)
    async with srv.serve(_url(transport)) as listener:
        before = len(asyncio.all_tasks())
        channel = kubrpc.connect(listener.url)
        await channel.__aenter__()
        side = channel.stub(Side, timeout=30)
        results = side.forever()
        await results.__anext__()
        ended: list[BaseException] = []

        async def read() -> None:
            try:
                async for _ in results:
                    await asyncio.sleep(0)
            except RpcError as exc:
                ended.append(exc)

        async def endless() -> AsyncIterator[int]:
            while True:
                yield 1
                await asyncio.sleep(0)

        async def write() -> None:
            try:
                await side.total(endless())
            except RpcError as exc:
                ended.append(exc)

        tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
        assert await settle(lambda: impl.running == 1)
        await asyncio.sleep(0.05)
        await channel.aclose()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
        assert [type(e) for e in ended] == [RpcError, RpcError]
        assert all(e.code in (Status.UNAVAILABLE, Status.CANCELLED) for e in ended if isinstance(e, RpcError))
        assert await settle(lambda: impl.running == 0)
        assert await settle(lambda: len(asyncio.all_tasks()) <= before)
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in side.ticks(1):
                pass


async def test_thousands_of_abandoned_streams_leave_nothing_behind(transport: str) -> None:
    balancer = CountingBalancer()
    gc.collect()
    calls_before = sum(isinstance(o, StreamCall) for o in gc.get_objects())  # what earlier tests still hold
    async with side_client(transport, balancer=balancer) as (side, impl, channel):
        before = len(asyncio.all_tasks())
        for i in range(600):
            results = side.slow()
            await results.__anext__()
            if i % 3 == 0:
                del results  # dropped unclosed: the event loop's finalizer closes it
            elif i % 3 == 1:
                await results.aclose()  # type: ignore[attr-defined]
            else:
                task = asyncio.create_task(side.total(aiter_of([1, 2, 3])))
                await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await results.aclose()  # type: ignore[attr-defined]
        gc.collect()
        assert await settle(lambda: impl.running == 0)
        assert await settle(lambda: balancer.in_flight == 0), (balancer.started, balancer.finished)
        assert await settle(lambda: len(asyncio.all_tasks()) <= before)
        assert all(conn.in_flight == 0 for conn in channel.connections.values())
        gc.collect()
        assert sum(isinstance(o, StreamCall) for o in gc.get_objects()) <= calls_before + 1
        assert [t async for t in side.ticks(2)] == [0, 1]


# -- delivery: a stream runs at most once, unless it was refused before running --------------------------------


async def test_a_stream_runs_once_across_drain_and_resets() -> None:
    from faultproxy import FaultProxy

    impl_a, impl_b = SideImpl(), SideImpl()
    server_a = kubrpc.Server(drain_timeout=5)
    server_a.register(Side, impl_a)
    server_b = kubrpc.Server()
    server_b.register(Side, impl_b)
    async with AsyncExitStack() as stack:
        serve_a = AsyncExitStack()
        stack.push_async_callback(serve_a.aclose)
        listener_a = await serve_a.enter_async_context(server_a.serve("tcp://127.0.0.1:0"))
        listener_b = await stack.enter_async_context(server_b.serve("tcp://127.0.0.1:0"))
        proxy = await stack.enter_async_context(FaultProxy(int(listener_a.url.rpartition(":")[2])))
        hosts = f"{proxy.url},{listener_b.url.partition('://')[2]}"
        channel = await stack.enter_async_context(kubrpc.connect(f"static://{hosts}", transport="tcp"))
        side = channel.stub(Side, timeout=10)
        hold = channel.stub(Side, timeout=30).forever()  # keeps A draining once its serve block exits
        while impl_a.running == 0:
            await hold.aclose()  # type: ignore[attr-defined]
            hold = channel.stub(Side, timeout=30).forever()
            await hold.__anext__()
        calls = failures = 0

        async def one(i: int) -> None:
            nonlocal calls, failures
            calls += 1
            try:
                if i % 2:
                    assert [t async for t in side.ticks(3)] == [0, 1, 2]
                else:
                    assert await side.total(aiter_of([1, 2])) == 3
            except RpcError as exc:
                assert exc.code is Status.UNAVAILABLE, exc
                failures += 1

        for i in range(20):
            await one(i)
        proxy.drop()  # resets the connection to A, with the held stream on it (maybe delivered: not retried)
        with pytest.raises(RpcError):
            async for _ in hold:
                pass
        hold = channel.stub(Side, timeout=30).forever()
        while impl_a.running == 0:
            await hold.aclose()  # type: ignore[attr-defined]
            hold = channel.stub(Side, timeout=30).forever()
            await hold.__anext__()
        closing = asyncio.create_task(serve_a.aclose())  # A drains: new streams are refused, go to B
        await asyncio.sleep(0.1)
        for i in range(20):
            await one(i)
        await hold.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(closing, 10)
        assert impl_a.runs + impl_b.runs <= calls  # never run twice
        assert failures == 0  # refusals went elsewhere; no stream was lost


async def test_server_interceptors_that_time_out_or_replace_the_result(transport: str) -> None:
    async def own_timeout(call: CallInfo, proceed: Proceed) -> bytes:
        if call.metadata.get("x-mode") == "timeout":
            try:
                async with asyncio.timeout(0.1):
                    return await proceed()
            except TimeoutError:
                raise RpcError(Status.DEADLINE_EXCEEDED, "the interceptor's own limit") from None
        if call.metadata.get("x-mode") == "replace":
            await proceed()
            return b"41"
        return await proceed()

    async with side_client(transport, server={"interceptors": [own_timeout]}) as (_, impl, channel):
        timed = channel.stub(Side, timeout=10, metadata={"x-mode": "timeout"})
        got = 0
        with pytest.raises(RpcError) as info:
            async for _ in timed.slow():
                got += 1
        assert info.value.code is Status.DEADLINE_EXCEEDED and "own limit" in info.value.message
        assert got > 0
        assert await settle(lambda: impl.running == 0)
        replaced = channel.stub(Side, timeout=10, metadata={"x-mode": "replace"})
        assert await replaced.total(aiter_of([1])) == 41
        assert [t async for t in replaced.ticks(2)] == [0, 1]  # a stream of results has no result to replace


# -- register() and stub(): every wrong way to declare a stream is a TypeError naming the method and the fix ----


class _Impl:
    """An implementation for the Protocols below (register() reads the Protocol first)."""


def _protocols() -> list[tuple[str, type, str]]:
    """(case, Protocol, what the TypeError must say)."""

    class AsyncIterableResult(Protocol):
        def m(self, n: int) -> AsyncIterable[int]: ...

    class AsyncDefAsyncIterableResult(Protocol):
        async def m(self, n: int) -> AsyncIterable[int]: ...

    class IteratorResult(Protocol):
        def m(self, n: int) -> Iterator[int]: ...

    class AsyncDefIteratorResult(Protocol):
        async def m(self, n: int) -> Iterator[int]: ...

    class IterableParam(Protocol):
        async def m(self, values: Iterable[int]) -> int: ...

    class GeneratorParam(Protocol):
        async def m(self, values: AsyncGenerator[int, None]) -> int: ...

    class OptionalResult(Protocol):
        def m(self) -> AsyncIterator[int] | None: ...

    class OptionalParam(Protocol):
        async def m(self, values: AsyncIterable[int] | None) -> int: ...

    class ListOfStreams(Protocol):
        async def m(self, values: list[AsyncIterable[int]]) -> int: ...

    class BareResult(Protocol):
        def m(self) -> AsyncIterator: ...  # type: ignore[type-arg]

    class StreamOfStreams(Protocol):
        def m(self) -> AsyncIterator[AsyncIterator[int]]: ...

    class TwoStreams(Protocol):
        async def m(self, a: AsyncIterable[int], b: AsyncIterable[int]) -> int: ...

    class StreamDefault(Protocol):
        async def m(self, a: AsyncIterable[int] = aiter_of([])) -> int: ...  # noqa: B008

    class Kwargs(Protocol):
        async def m(self, a: AsyncIterable[int], **more: int) -> int: ...

    class AsyncDefStream(Protocol):
        async def m(self) -> AsyncIterator[int]: ...

    return [
        ("AsyncIterable result", AsyncIterableResult, "-> AsyncIterator[int]`"),
        ("async def AsyncIterable result", AsyncDefAsyncIterableResult, "-> AsyncIterator[int]`"),
        ("Iterator result", IteratorResult, "-> AsyncIterator[int]`"),
        ("async def Iterator result", AsyncDefIteratorResult, "-> list[int]`"),
        ("Iterable parameter", IterableParam, "values: AsyncIterable[int]`"),
        ("AsyncGenerator parameter", GeneratorParam, "values: AsyncIterable[int]`"),
        ("Optional result", OptionalResult, "-> AsyncIterator[int]`"),
        ("Optional parameter", OptionalParam, "values: AsyncIterable[int]`"),
        ("list of streams", ListOfStreams, "values: AsyncIterable[int]`"),
        ("AsyncIterator without its type", BareResult, "AsyncIterator[int]"),
        ("stream of streams", StreamOfStreams, "AsyncIterator[list[...]]"),
        ("two stream parameters", TwoStreams, "at most one AsyncIterable parameter"),
        ("stream parameter with a default", StreamDefault, "cannot have a default"),
        ("**kwargs", Kwargs, "**kwargs cannot be sent"),
        ("async def stream of results", AsyncDefStream, "without `async`"),
    ]


@pytest.mark.parametrize(("case", "protocol", "fix"), _protocols(), ids=[case for case, _, _ in _protocols()])
def test_every_wrong_stream_declaration_names_the_method_and_the_fix(case: str, protocol: type, fix: str) -> None:
    for check in (
        lambda: kubrpc.Server().register(protocol, _Impl()),
        lambda: kubrpc.connect("inproc://x").stub(protocol),
    ):
        with pytest.raises(TypeError) as info:
            check()
        message = str(info.value)
        assert f"{protocol.__name__}.m" in message, message
        assert fix in message, message


def test_an_implementation_may_annotate_its_stream_as_any_async_iterator() -> None:
    class Impl:
        async def ticks(self, n: int) -> AsyncIterable[int]:
            yield n

    class Gen:
        async def ticks(self, n: int) -> AsyncGenerator[int, None]:
            yield n

    for impl in (Impl(), Gen()):
        kubrpc.Server().register(Mixed, _with_ticks(impl))


def _with_ticks(impl: object) -> object:
    """`impl` with the other methods of Mixed taken from MixedImpl."""
    full = MixedImpl()
    full.ticks = impl.ticks  # type: ignore[attr-defined,method-assign]
    return full


# -- deadlines and cancellation at every step -----------------------------------------------------------------


async def test_the_deadline_ends_a_pump_blocked_on_flow_control_or_on_its_iterable(transport: str) -> None:
    async def endless() -> AsyncIterator[int]:
        while True:
            yield 1

    async def stuck() -> AsyncIterator[int]:
        yield 1
        await asyncio.Event().wait()  # never yields again
        yield 2

    async with odd_client(transport, timeout=0.3) as (odd, impl, _):
        before = len(asyncio.all_tasks())
        for source in (endless(), stuck()):
            with pytest.raises(RpcError) as info:
                async with asyncio.timeout(10):  # a hang guard
                    await odd.wait(source)  # the handler never reads: the pump waits for credit, or its iterable
            assert info.value.code is Status.DEADLINE_EXCEEDED
        assert await settle(lambda: impl.running == 0)
        assert await settle(lambda: len(asyncio.all_tasks()) <= before)


async def test_the_deadline_passes_while_connecting_or_picking() -> None:
    from faultproxy import FaultProxy

    async with FaultProxy(None, mode="blackhole") as proxy, kubrpc.connect(f"tcp://{proxy.url}") as channel:
        odd = channel.stub(Odd, timeout=0.3)
        with pytest.raises(RpcError) as info:
            async with asyncio.timeout(10):
                async for _ in odd.ticks(1):
                    pass
        assert info.value.code is Status.DEADLINE_EXCEEDED
    async with kubrpc.connect([], wait_for_endpoints=30) as channel:
        with pytest.raises(RpcError) as info:
            async with asyncio.timeout(10):
                await channel.stub(Odd, timeout=0.3).total(aiter_of([1]))
        assert info.value.code in (Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE)


@pytest.mark.parametrize("kind", ["results", "client", "bidi"])
async def test_the_callers_task_cancelled_at_every_await(transport: str, kind: str) -> None:
    balancer = CountingBalancer()
    async with odd_client(transport, balancer=balancer) as (odd, impl, channel):
        before = len(asyncio.all_tasks())

        async def slow_source() -> AsyncIterator[str]:
            for i in range(50):
                yield str(i)
                await asyncio.sleep(0)

        async def run() -> None:
            if kind == "results":
                async for _ in odd.stubborn(50):
                    await asyncio.sleep(0)
            elif kind == "client":
                await odd.total(_ints(slow_source()))
            else:
                async for _ in odd.chat(slow_source()):
                    await asyncio.sleep(0)

        for steps in range(0, 60, 3):
            task = asyncio.create_task(run())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await settle(lambda: balancer.in_flight == 0), (balancer.started, balancer.finished)
        assert await settle(lambda: impl.running == 0)
        assert await settle(lambda: len(asyncio.all_tasks()) <= before)
        assert all(conn.in_flight == 0 for conn in channel.connections.values())


async def _ints(words: AsyncIterable[str]) -> AsyncIterator[int]:
    async for w in words:
        yield int(w)


async def test_odd_errors_of_the_callers_iterable(transport: str) -> None:
    class Ends:
        def __aiter__(self) -> Ends:
            return self

        async def __anext__(self) -> int:
            raise StopAsyncIteration  # a hand-written iterator that ends at once: a normal, empty stream

    async with odd_client(transport) as (odd, _, _):
        assert await odd.total(Ends()) == 0
        with pytest.raises(RpcError) as info:
            await odd.total(aiter_of([1], then=RpcError(Status.ABORTED, "mine")))
        assert info.value.code is Status.ABORTED and info.value.message == "mine"
        with pytest.raises(KeyboardInterrupt):
            await odd.total(aiter_of([1], then=KeyboardInterrupt()))
        assert await odd.total(aiter_of([3])) == 3


async def test_a_stub_stream_read_from_two_tasks_or_left_from_nested_loops(transport: str) -> None:
    async with odd_client(transport) as (odd, impl, _):
        results = odd.stubborn(10**6)
        await results.__anext__()
        both = await asyncio.gather(results.__anext__(), results.__anext__(), return_exceptions=True)
        assert all(isinstance(r, int) or isinstance(r, RuntimeError) for r in both), both
        await results.aclose()  # type: ignore[attr-defined]
        assert await settle(lambda: impl.running == 0)
        nested = 0
        for _ in range(3):
            async for _ in odd.ticks(5):
                async for _ in odd.ticks(5):
                    nested += 1
                    break
                break
        assert nested == 3
