"""Stream calls through the public API, over every transport that carries them (STREAM_TRANSPORTS).

The same tests run on each transport: the three kinds, errors after messages, cancellation both ways, one
deadline over the whole stream, flow control (a slow reader stops the writer), interceptors once per stream,
1,000 concurrent streams, drain. Transport-specific tests (frames, envelopes, WebSockets) live in their own files.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import pytest
from stream_services import Event, Feed, FeedImpl

import kubrpc
import kubrpc.metrics
from kubrpc import RpcError, Status
from kubrpc.interceptors import CallInfo, ClientCall, Proceed
from kubrpc.interface import CallKind

pytestmark = pytest.mark.anyio

#: The transports whose stream calls these tests check: every built-in one.
STREAM_TRANSPORTS = ["inproc", "tcp", "http"]

_names = itertools.count()


def _url(transport: str) -> str:
    if transport == "inproc":
        return f"inproc://feed-{next(_names)}"
    return f"{transport}://127.0.0.1:0"


@asynccontextmanager
async def serving(
    transport: str, impl: object | None = None, **options: Any
) -> AsyncIterator[tuple[str, kubrpc.Server, FeedImpl]]:
    """A server of Feed on `transport`: (url, server, impl)."""
    server = kubrpc.Server(**options)
    feed = impl if impl is not None else FeedImpl()
    server.register(Feed, feed)
    async with server.serve(_url(transport)) as listener:
        yield listener.url, server, feed  # type: ignore[misc]


@asynccontextmanager
async def feed_client(
    transport: str, **options: Any
) -> AsyncIterator[tuple[Feed, FeedImpl, kubrpc.Channel, kubrpc.Server]]:
    async with AsyncExitStack() as stack:
        url, server, impl = await stack.enter_async_context(serving(transport, **options.pop("server", {})))
        timeout = options.pop("timeout", 10.0)
        channel = await stack.enter_async_context(kubrpc.connect(url, **options))
        yield channel.stub(Feed, timeout=timeout), impl, channel, server


@pytest.fixture(params=STREAM_TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def aiter_of(items: list[Any], *, then: BaseException | None = None) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if then is not None:
        raise then


async def settle(check: Callable[[], bool], rounds: int = 400) -> bool:
    """Poll `check` for a while (a hang guard, not a timing assertion); True once it holds."""
    for _ in range(rounds):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def test_three_kinds(transport: str) -> None:
    async with feed_client(transport) as (feed, _, _, _):
        assert [t async for t in feed.ticks(3)] == [0, 1, 2]
        assert [t async for t in feed.ticks(0)] == []
        assert await feed.total(aiter_of([1, 2, 3])) == 6
        assert await feed.total(aiter_of([])) == 0
        assert [w async for w in feed.chat(aiter_of(["a", "b", "c"]))] == ["A", "B", "C"]
        assert [e async for e in feed.watch(["add", "del"])] == [Event(0, "add"), Event(1, "del")]
        assert await feed.add(2, 3) == 5  # unary calls still work beside streams


async def test_error_after_messages_arrives_after_them(transport: str) -> None:
    async with feed_client(transport) as (feed, _, _, _):
        got: list[int] = []
        with pytest.raises(RpcError) as info:
            async for t in feed.fail_after(3, "not_found"):
                got.append(t)  # noqa: PERF401 (the items read before the error are the point)
        assert got == [0, 1, 2]
        assert info.value.code is Status.NOT_FOUND and info.value.message == "failed after 3"
        got.clear()
        with pytest.raises(RpcError) as info:
            async for t in feed.fail_after(2, "crash"):
                got.append(t)  # noqa: PERF401
        assert got == [0, 1]
        assert info.value.code is Status.INTERNAL and "secret" not in info.value.message


async def test_leaving_the_loop_cancels_the_handler(transport: str) -> None:
    async with feed_client(transport) as (feed, impl, _, _):
        results = feed.forever(100)
        async for _ in results:
            break
        await results.aclose()  # type: ignore[attr-defined]
        assert await settle(lambda: impl.running == 0)
        assert impl.cancelled == 1
        # a break without aclose(): the generator is closed when dropped
        async for _ in feed.forever(100):
            break
        assert await settle(lambda: impl.running == 0 and impl.cancelled == 2)


async def test_a_cancelled_task_cancels_the_handler(transport: str) -> None:
    async with feed_client(transport) as (feed, impl, _, _):
        first = asyncio.Event()

        async def read() -> None:
            async for _ in feed.forever(10):
                first.set()

        task = asyncio.create_task(read())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await settle(lambda: impl.running == 0 and impl.cancelled == 1)


async def test_client_iterable_that_raises_cancels_the_call(transport: str) -> None:
    async with feed_client(transport) as (feed, _, _, _):
        with pytest.raises(KeyError, match="mine"):
            await feed.total(aiter_of([1, 2], then=KeyError("mine")))
        with pytest.raises(KeyError, match="again"):
            async for _ in feed.chat(aiter_of(["a"], then=KeyError("again"))):
                pass
        assert await feed.total(aiter_of([5])) == 5  # the channel is fine


async def test_bad_message_is_invalid_argument_naming_it(transport: str) -> None:
    async with feed_client(transport) as (feed, _, _, _):
        with pytest.raises(RpcError) as info:
            await feed.total(aiter_of([1, "two", 3]))
        assert info.value.code is Status.INVALID_ARGUMENT
        assert "values[1]" in info.value.message
        with pytest.raises(RpcError) as info:
            await feed.total(aiter_of([1, object()]))
        assert info.value.code is Status.INVALID_ARGUMENT and "values[1]" in info.value.message


async def test_server_finishing_early_ends_a_client_stream(transport: str) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"ab"

    async with feed_client(transport) as (feed, _, _, _):
        assert await feed.count(endless(), stop_after=3) == 3


async def test_one_deadline_covers_the_whole_stream(transport: str) -> None:
    async with feed_client(transport, timeout=0.5) as (feed, impl, _, _):
        got = 0
        with pytest.raises(RpcError) as info:
            async for _ in feed.forever(10):
                got += 1
                await asyncio.sleep(0.01)
        assert info.value.code is Status.DEADLINE_EXCEEDED
        assert got > 0
        assert await settle(lambda: impl.running == 0)


async def test_a_slow_reader_stops_the_writer(transport: str) -> None:
    size = 64 * 1024
    async with feed_client(transport) as (feed, impl, _, _):
        results = feed.forever(size)
        await results.__anext__()
        # The handler runs ahead of the reader by the windows and buffers on the way, and then waits.
        previous = -1
        for _ in range(100):
            await asyncio.sleep(0.05)
            if impl.sent == previous:
                break
            previous = impl.sent
        assert impl.sent == previous, "the handler never stopped sending to a reader that does not read"
        assert impl.sent * size < 64 * 1024 * 1024  # bounded, whatever the transport's buffers
        await results.aclose()  # type: ignore[attr-defined]
        assert await settle(lambda: impl.running == 0)


async def test_interceptors_see_one_call_per_stream(transport: str) -> None:
    server_calls: list[CallInfo] = []
    client_calls: list[ClientCall] = []

    async def on_server(call: CallInfo, proceed: Proceed) -> bytes:
        server_calls.append(call)
        return await proceed()

    async def on_client(call: ClientCall, proceed: Proceed) -> bytes:
        call.metadata["x-token"] = "t"
        client_calls.append(call)
        return await proceed()

    async with feed_client(transport, server={"interceptors": [on_server]}, interceptors=[on_client]) as (
        feed,
        _,
        _,
        _,
    ):
        assert [t async for t in feed.ticks(5)] == [0, 1, 2, 3, 4]
        assert await feed.total(aiter_of([1, 2, 3])) == 6
        assert [w async for w in feed.chat(aiter_of(["x"]))] == ["X"]
    assert [c.kind for c in server_calls] == [CallKind.SERVER_STREAM, CallKind.CLIENT_STREAM, CallKind.BIDI_STREAM]
    assert [c.kind for c in client_calls] == [CallKind.SERVER_STREAM, CallKind.CLIENT_STREAM, CallKind.BIDI_STREAM]
    assert all(c.metadata.get("x-token") == "t" for c in server_calls)


async def test_an_interceptor_rejects_a_stream(transport: str) -> None:
    async def deny(call: CallInfo, proceed: Proceed) -> bytes:
        raise RpcError(Status.PERMISSION_DENIED, "no streams for you")

    async with feed_client(transport, server={"interceptors": [deny]}) as (feed, _, _, _):
        with pytest.raises(RpcError) as info:
            async for _ in feed.ticks(3):
                pass
        assert info.value.code is Status.PERMISSION_DENIED


async def test_a_thousand_concurrent_streams_on_one_channel(transport: str) -> None:
    async with feed_client(transport) as (feed, _, channel, _):

        async def one(i: int) -> list[int]:
            return [t async for t in feed.ticks(i % 7)]

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        assert results == [list(range(i % 7)) for i in range(1000)]
        assert len(channel.connections) == 1


async def test_cancellation_storm(transport: str) -> None:
    async with feed_client(transport) as (feed, impl, _, _):
        started = asyncio.Event()

        async def read() -> None:
            async for _ in feed.forever(1):
                started.set()

        tasks = [asyncio.create_task(read()) for _ in range(200)]
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await settle(lambda: impl.running == 0)
        assert [t async for t in feed.ticks(2)] == [0, 1]


async def test_metrics_count_streams_and_messages(transport: str) -> None:
    server_metrics = kubrpc.metrics.ServerMetrics()
    client_metrics = kubrpc.metrics.ClientMetrics()
    async with feed_client(transport, server={"metrics": server_metrics}, metrics=client_metrics) as (feed, _, _, _):
        assert [t async for t in feed.ticks(4)] == [0, 1, 2, 3]
        assert await feed.total(aiter_of([1, 2])) == 3
    server_text = server_metrics.exposition()[0].decode()
    client_text = client_metrics.exposition()[0].decode()
    for text in (server_text, client_text):
        assert 'method="ticks"' in text
        assert "kubrpc_stream_messages" in text.replace("kubrpc_server_stream_messages", "kubrpc_stream_messages")


async def test_drain_refuses_new_streams_and_ends_running_ones(transport: str) -> None:
    async with AsyncExitStack() as stack:
        url, server, impl = await stack.enter_async_context(serving(transport, drain_timeout=0.2))
        channel = await stack.enter_async_context(kubrpc.connect(url))
        feed = channel.stub(Feed, timeout=10)
        results = feed.forever(1)
        await results.__anext__()
        got: list[BaseException] = []

        async def keep_reading() -> None:
            try:
                async for _ in results:
                    await asyncio.sleep(0)
            except RpcError as exc:
                got.append(exc)

        reader = asyncio.create_task(keep_reading())
        await stack.aclose()  # leaves the serve block: drain_timeout passes, the stream is cancelled
        await asyncio.wait_for(reader, 10)
    assert got and isinstance(got[0], RpcError) and got[0].code is Status.UNAVAILABLE
    assert impl.running == 0


async def test_draining_server_sends_new_streams_elsewhere(transport: str) -> None:
    if transport == "inproc":
        pytest.skip("one inproc name cannot be served twice, so there is no 'elsewhere' to reach")
    async with AsyncExitStack() as stack:
        serve_a = AsyncExitStack()
        url_a, _, impl_a = await serve_a.enter_async_context(serving(transport, drain_timeout=30))
        stack.push_async_callback(serve_a.aclose)
        url_b, _, _ = await stack.enter_async_context(serving(transport))
        a_only = await stack.enter_async_context(kubrpc.connect(url_a))
        hold = a_only.stub(Feed, timeout=30).forever(1)
        await hold.__anext__()  # keeps A draining (for up to 30 s) once its serve block exits
        hosts = ",".join(u.partition("://")[2] for u in (url_a, url_b))
        both = await stack.enter_async_context(kubrpc.connect(f"static://{hosts}", transport=transport))
        feed = both.stub(Feed, timeout=10)
        assert [t async for t in feed.ticks(2)] == [0, 1]  # connections to both are open
        assert [t async for t in feed.ticks(2)] == [0, 1]
        closing = asyncio.create_task(serve_a.aclose())
        await asyncio.sleep(0.2)
        for _ in range(20):  # every stream opened meanwhile runs on B
            assert [t async for t in feed.ticks(3)] == [0, 1, 2]
            assert await feed.total(aiter_of([1, 2])) == 3
        assert impl_a.running == 1
        await hold.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(closing, 30)


async def test_streaming_path_called_as_unary_is_unimplemented(transport: str) -> None:
    async with feed_client(transport) as (_, _, channel, _):
        with pytest.raises(RpcError) as info:
            await channel.call("test.Feed/ticks", b'{"n": 1}')
        assert info.value.code is Status.UNIMPLEMENTED
        assert "server stream" in info.value.message


# -- register() and stub() refuse what cannot stream ---------------------------------------------------------


def test_streamed_result_must_come_from_an_async_generator() -> None:
    class Bad:
        async def ticks(self, n: int) -> AsyncIterator[int]:  # a coroutine, not an async generator
            return aiter_of([1])

    server = kubrpc.Server()
    with pytest.raises(TypeError, match="async generator"):
        server.register(_Ticks, Bad())


class _Ticks(Protocol):
    def ticks(self, n: int) -> AsyncIterator[int]: ...


def test_protocol_declaring_async_def_stream_is_refused() -> None:
    class P(Protocol):
        async def ticks(self, n: int) -> AsyncIterator[int]: ...

    with pytest.raises(TypeError, match="without `async`"):
        kubrpc.Server().register(P, object())


def test_two_stream_parameters_are_refused() -> None:
    class P(Protocol):
        async def both(self, a: AsyncIterable[int], b: AsyncIterable[int]) -> int: ...

    with pytest.raises(TypeError, match="both streams"):
        kubrpc.Server().register(P, object())


def test_stream_of_unsupported_type_is_refused() -> None:
    class P(Protocol):
        def ticks(self, n: int) -> AsyncIterator[complex]: ...

    with pytest.raises(TypeError, match="complex"):
        kubrpc.Server().register(P, object())


def test_a_stream_of_none_is_a_stream() -> None:
    class P(Protocol):
        def beats(self, n: int) -> AsyncIterator[None]: ...

    class Impl:
        async def beats(self, n: int) -> AsyncIterator[None]:
            for _ in range(n):
                yield None

    server = kubrpc.Server()
    server.register(P, Impl())
    spec = server.method("P/beats")
    assert spec is not None and spec.kind is CallKind.SERVER_STREAM
