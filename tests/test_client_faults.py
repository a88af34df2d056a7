"""Network faults seen from the client: what a sick endpoint costs a caller, and that no call runs twice.

The faults come from tests/faultproxy.py (a TCP proxy on 127.0.0.1) or from small fake peers below; the
servers count how often a non-idempotent handler ran, to prove "at most once" over real sockets.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import aiohttp
import anyio
import pytest
from faultproxy import FaultProxy
from services import Control, ControlImpl

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.balancers.p2c import PowerOfTwoChoices
from kubrpc.transports.http import NOT_STARTED_HEADER, HttpConnection, HttpTransport
from kubrpc.transports.tcp import TcpConnection, TcpTransport

pytestmark = pytest.mark.anyio


class Counter(Protocol):
    async def bump(self) -> int: ...

    @kubrpc.method(idempotent=True)
    async def peek(self) -> int: ...


class CounterImpl:
    """Counts executions: `bump` is not idempotent, so it must run at most once per call."""

    def __init__(self) -> None:
        self.bumps = 0
        self.peeks = 0

    async def bump(self) -> int:
        self.bumps += 1
        return self.bumps

    async def peek(self) -> int:
        self.peeks += 1
        return self.bumps


@asynccontextmanager
async def counter_server(scheme: str = "http", **options: Any) -> AsyncIterator[tuple[int, CounterImpl, ControlImpl]]:
    """A server with Counter and Control on 127.0.0.1; yields (port, counter, control)."""
    server = kubrpc.Server(**options)
    counter, control = CounterImpl(), ControlImpl()
    server.register(Counter, counter)
    server.register(Control, control)
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
        yield int(listener.url.rsplit(":", 1)[1]), counter, control


def closed_port() -> int:
    """A loopback port that nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def failing_peeks(stub: Counter) -> tuple[Callable[[], Awaitable[None]], list[Status]]:
    """A call to start in many tasks, which peeks through `stub`, and the list of the codes its calls failed with."""
    outcomes: list[Status] = []

    async def call() -> None:
        try:
            await stub.peek()
        except RpcError as exc:
            outcomes.append(exc.code)

    return call, outcomes


class CountingHttp(HttpTransport):
    """The http transport, counting calls that went out on the wire, per port (a refused one is a refused connect)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.attempts: dict[int, int] = {}

    async def connect(self, endpoint: Endpoint, /) -> HttpConnection:
        attempts = self.attempts
        conn = await super().connect(endpoint)
        call = conn.call

        async def counted(path: str, payload: bytes, **kwargs: Any) -> bytes:
            attempts[endpoint.port] = attempts.get(endpoint.port, 0) + 1
            return await call(path, payload, **kwargs)

        conn.call = counted  # type: ignore[method-assign]
        return conn


# 9.11: a 503 is proof of non-delivery only when a kubrpc server says so.


@asynccontextmanager
async def sidecar_503(upstream_port: int) -> AsyncIterator[int]:
    """An Envoy-like sidecar on 127.0.0.1: forwards each request upstream, drops the answer, says 503 in text."""

    handlers: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
                try:
                    up_writer.write(head + body)
                    answer = await up_reader.readuntil(b"\r\n\r\n")  # the call ran; its answer is lost
                finally:
                    up_writer.close()
                    await up_writer.wait_closed()
                assert answer.startswith(b"HTTP/1.1 200")
                text = b"upstream connect error or disconnect/reset before headers"
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n")
                writer.write(b"content-length: %d\r\n\r\n%s" % (len(text), text))
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            handlers.discard(task)
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_503_from_a_sidecar_does_not_run_a_non_idempotent_call_again() -> None:
    async with counter_server() as (port, counter, _), sidecar_503(port) as sidecar:
        async with kubrpc.connect(f"http://127.0.0.1:{sidecar}") as channel:
            with anyio.fail_after(20), pytest.raises(RpcError) as info:
                await channel.stub(Counter, timeout=10).bump()
            assert counter.bumps == 1  # old code: 3, one per attempt
            assert info.value.code is Status.UNAVAILABLE
            assert "not kubrpc" in info.value.message and "upstream connect error" in info.value.message
            # An idempotent call may be retried on the same 503: it is safe to run again.
            with anyio.fail_after(20), pytest.raises(RpcError):
                await channel.stub(Counter, timeout=10).peek()
            assert counter.peeks == 3


async def test_a_busy_kubrpc_server_marks_its_503_not_started_and_the_call_goes_elsewhere() -> None:
    async with AsyncExitStack() as stack:
        busy_port, busy, busy_control = await stack.enter_async_context(counter_server(max_connections=1))
        good_port, good, _ = await stack.enter_async_context(counter_server())
        # Hold the busy server's one connection with a long call (servers that admit N-1 refuse it too).
        holder = await stack.enter_async_context(kubrpc.connect(f"http://127.0.0.1:{busy_port}"))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        failed: list[BaseException] = []

        async def hold() -> None:
            try:
                await holder.stub(Control, timeout=30).sleep(30)
            except RpcError as exc:
                failed.append(exc)

        tg.start_soon(hold)
        with anyio.fail_after(10):
            while not (busy_control.started or failed):
                await anyio.sleep(0.01)

        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.post(f"http://127.0.0.1:{busy_port}/Counter/bump", data=b"{}") as response:
            assert response.status == 503
            assert response.headers.get(NOT_STARTED_HEADER) == "1"  # old code: uvicorn's bare text 503
            assert (await response.json())["code"] == "unavailable"

        endpoints = [Endpoint("127.0.0.1", busy_port), Endpoint("127.0.0.1", good_port)]
        async with kubrpc.connect(endpoints, transport="http") as channel:
            stub = channel.stub(Counter, timeout=10)
            for _ in range(10):
                await stub.bump()
        assert (busy.bumps, good.bumps) == (0, 10)


async def test_a_busy_tcp_server_sends_calls_elsewhere_explicitly() -> None:
    async with AsyncExitStack() as stack:
        busy_port, busy, _ = await stack.enter_async_context(counter_server("tcp", max_connections=1))
        good_port, good, _ = await stack.enter_async_context(counter_server("tcp"))
        holder = await stack.enter_async_context(kubrpc.connect(f"tcp://127.0.0.1:{busy_port}"))
        await holder.stub(Counter, timeout=10).bump()  # holds the one connection
        endpoints = [Endpoint("127.0.0.1", busy_port), Endpoint("127.0.0.1", good_port)]
        async with kubrpc.connect(endpoints, transport="tcp") as channel:
            stub = channel.stub(Counter, timeout=10)
            for _ in range(10):
                await stub.bump()
        assert (busy.bumps, good.bumps) == (1, 10)  # GOAWAY "too many connections": not delivered, retried


# 16.7: the HTTP transport backs off from a refused endpoint as TCP does.


async def test_http_backs_off_from_an_endpoint_that_refuses_connections() -> None:
    async with counter_server() as (live, counter, _):
        dead = closed_port()
        transport = CountingHttp()
        endpoints = [Endpoint("127.0.0.1", dead), Endpoint("127.0.0.1", live)]
        async with kubrpc.connect(endpoints, transport=transport, balancer="round_robin") as channel:
            stub = channel.stub(Counter, timeout=10)
            assert [await stub.bump() for _ in range(200)] == list(range(1, 201))
    # Old code: every other call tried the refused endpoint again (100 connects).
    assert 1 <= transport.attempts[dead] <= 8
    assert counter.bumps == 200


async def test_calls_to_a_lone_refused_http_endpoint_fail_fast_without_connecting() -> None:
    dead = closed_port()
    transport = CountingHttp()
    async with kubrpc.connect([Endpoint("127.0.0.1", dead)], transport=transport) as channel:
        stub = channel.stub(Counter, timeout=10)
        for _ in range(300):
            with anyio.fail_after(10), pytest.raises(RpcError) as info:
                await stub.peek()
            assert info.value.code is Status.UNAVAILABLE
        assert "unreachable" in info.value.message  # says why, and when it will be tried again
    # Old code: 3 connects per call (900). Backoff 50 ms doubling: a handful while these calls run.
    assert 1 <= transport.attempts[dead] <= 30


class CountingTcp(TcpTransport):
    """The tcp transport, counting connection attempts per port."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: dict[int, int] = {}

    async def connect(self, endpoint: Endpoint, /) -> TcpConnection:
        self.attempts[endpoint.port] = self.attempts.get(endpoint.port, 0) + 1
        return await super().connect(endpoint)


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_concurrent_calls_to_a_refused_endpoint_back_off_once(scheme: str) -> None:
    dead = closed_port()
    transport = CountingTcp() if scheme == "tcp" else CountingHttp()
    async with kubrpc.connect([Endpoint("127.0.0.1", dead)], transport=transport) as channel:
        call, outcomes = failing_peeks(channel.stub(Counter, timeout=10))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(32):
                    tg.start_soon(call)
        assert outcomes == [Status.UNAVAILABLE] * 32
        # 32 refusals at once are one failure: the backoff starts at its first step, not 32 doublings in
        # (which left an endpoint that had restarted in the meantime avoided for 5 s).
        ((_, backoff, _),) = channel._down.values()
        assert backoff.attempts == 1
    if scheme == "tcp":  # waiters on the one connect attempt share its outcome
        assert transport.attempts[dead] == 1


# 16.6 (HTTP): an endpoint that accepts and resets every connection is backed off, and never runs a call.


@pytest.mark.parametrize("method", ["bump", "peek"])
async def test_an_http_endpoint_that_accepts_then_resets_is_backed_off(method: str) -> None:
    async with counter_server() as (live, counter, _), FaultProxy(mode="accept_then_reset") as proxy:
        endpoints = [Endpoint("127.0.0.1", proxy.port), Endpoint("127.0.0.1", live)]
        failed = 0
        async with kubrpc.connect(endpoints, transport="http", balancer="round_robin") as channel:
            call = getattr(channel.stub(Counter, timeout=10), method)
            for _ in range(200):
                try:
                    with anyio.fail_after(10):
                        await call()
                except RpcError as exc:
                    assert exc.code is Status.UNAVAILABLE
                    failed += 1
    # Old code: about 100 connections, and half the non-idempotent calls failed.
    assert proxy.accepted <= 12
    if method == "bump":  # may have been delivered (HTTP has no ack): not retried, but only a few fail
        assert failed <= 12 and counter.bumps == 200 - failed
    else:  # idempotent: retried elsewhere
        assert failed == 0


async def test_an_http_endpoint_that_answered_and_then_resets_everything_is_backed_off() -> None:
    async with AsyncExitStack() as stack:
        port, sick, _ = await stack.enter_async_context(counter_server())
        live, healthy, _ = await stack.enter_async_context(counter_server())
        proxy = await stack.enter_async_context(FaultProxy(port))
        endpoints = [Endpoint("127.0.0.1", proxy.port), Endpoint("127.0.0.1", live)]
        channel = await stack.enter_async_context(kubrpc.connect(endpoints, transport="http"))
        stub = channel.stub(Counter, timeout=10)
        for _ in range(20):
            await stub.bump()
        assert sick.bumps == healthy.bumps == 10
        proxy.mode = "accept_then_reset"  # the app behind the sidecar crashed
        proxy.drop()
        accepted, failed = proxy.accepted, 0
        for _ in range(200):
            try:
                with anyio.fail_after(10):
                    await stub.bump()
            except RpcError as exc:
                assert exc.code is Status.UNAVAILABLE
                failed += 1
        # Old code: about 100 failed calls and 100 connections.
        assert failed <= 12 and proxy.accepted - accepted <= 12
        assert sick.bumps + healthy.bumps == 220 - failed  # every call ran at most once


# 16.9: no HTTP call hangs without end on a silent connection.


async def test_an_http_call_without_a_deadline_ends_on_a_blackholed_connection() -> None:
    async with FaultProxy(mode="blackhole") as proxy:
        transport = HttpTransport(read_timeout=0.3)
        async with kubrpc.connect([Endpoint("127.0.0.1", proxy.port)], transport=transport) as channel:
            with anyio.fail_after(20), pytest.raises(RpcError) as info:
                await channel.stub(Counter).bump()  # no deadline: only the read timeout can end it
    assert info.value.code is Status.UNAVAILABLE
    assert "read_timeout" in info.value.message
    assert proxy.accepted == 1


async def test_http_connections_have_tcp_keepalive() -> None:
    async with counter_server() as (port, _, _):
        transport = HttpTransport(keepalive_interval=7, keepalive_timeout=9)
        async with kubrpc.connect([Endpoint("127.0.0.1", port)], transport=transport) as channel:
            await channel.stub(Counter, timeout=10).bump()
            (conn,) = channel.connections.values()
            pool: Any = conn._pool  # type: ignore[attr-defined]
            sockets = [c.transport.get_extra_info("socket") for c in pool._open]
            assert sockets
            for sock in sockets:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # as asyncio sets it by default
                if hasattr(socket, "TCP_KEEPIDLE"):
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3


def test_http_transport_options_are_checked() -> None:
    with pytest.raises(ValueError, match="keepalive_interval"):
        HttpTransport(keepalive_interval=0)
    with pytest.raises(ValueError, match="read_timeout"):
        HttpTransport(read_timeout=float("inf"))


# The other faults of the table in the README, over both transports: never more than one execution.


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_a_connection_reset_mid_request_never_runs_the_call_twice(scheme: str) -> None:
    async with (
        counter_server(scheme) as (port, counter, _),
        FaultProxy(port, mode="reset_after", reset_after=10) as proxy,
    ):
        async with kubrpc.connect([Endpoint("127.0.0.1", proxy.port)], transport=scheme) as channel:
            stub = channel.stub(Counter, timeout=10)
            for _ in range(5):
                with anyio.fail_after(20), pytest.raises(RpcError) as info:
                    await stub.bump()
                assert info.value.code is Status.UNAVAILABLE
            assert counter.bumps == 0  # the request never arrived whole
            proxy.mode = "forward"
            proxy.latency = 0.01
            with anyio.fail_after(20):
                while True:  # once the backoff, if any, has passed
                    try:
                        assert await stub.bump() == 1
                        break
                    except RpcError:
                        await anyio.sleep(0.05)
            assert counter.bumps == 1


# 16.8: p2c forgives a recovered endpoint within seconds.


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def share_of(balancer: PowerOfTwoChoices, clock: FakeClock, target: Endpoint, seconds: float) -> float:
    """Run healthy traffic (1 ms answers, a call every 10 ms) for `seconds`; the share of picks `target` got."""
    picks = hits = 0
    end = clock.now + seconds
    while clock.now < end:
        ep = balancer.pick()
        balancer.on_start(ep)
        clock.now += 0.001
        balancer.on_finish(ep, status=Status.OK, latency=0.001)
        clock.now += 0.009
        picks += 1
        hits += ep == target
    return hits / picks


def test_p2c_gives_a_recovered_endpoint_its_share_back_within_seconds() -> None:
    clock = FakeClock()
    a, b = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1)
    balancer = PowerOfTwoChoices(rng=random.Random(3), clock=clock)
    balancer.update([a, b])
    share_of(balancer, clock, b, 5.0)  # both healthy: estimates settle at 1 ms
    for _ in range(500):  # a burst of fast failures on b
        balancer.on_start(b)
        clock.now += 0.0001
        balancer.on_finish(b, status=Status.UNAVAILABLE, latency=0.0001)
    assert share_of(balancer, clock, b, 0.5) < 0.05  # avoided at first
    clock.now += 5.0  # health returns; five seconds pass
    # Old code: a 1 s penalty blended into the 10 s latency average, about 0 % for 76 s.
    assert share_of(balancer, clock, b, 5.0) > 0.3


def test_p2c_still_avoids_an_endpoint_that_keeps_failing() -> None:
    clock = FakeClock()
    a, b = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1)
    balancer = PowerOfTwoChoices(rng=random.Random(4), clock=clock)
    balancer.update([a, b])
    picks = {a: 0, b: 0}
    for _ in range(3000):  # 30 s of traffic; b fails every call it gets
        ep = balancer.pick()
        picks[ep] += 1
        balancer.on_start(ep)
        clock.now += 0.001
        balancer.on_finish(ep, status=Status.UNAVAILABLE if ep == b else Status.OK, latency=0.001)
        clock.now += 0.009
    assert picks[b] < 0.05 * picks[a]
