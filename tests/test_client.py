"""Client resilience: dead peers found by keepalive, retries capped by a budget."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import anyio.abc
import pytest
from services import Arith

import kubrpc
from kubrpc import RetryBudget, RpcError, Status
from kubrpc.transports.tcp import TcpConnection, TcpTransport

pytestmark = pytest.mark.anyio


@pytest.fixture
async def silent_peer() -> AsyncIterator[str]:
    """A TCP server that accepts connections and reads everything, but never answers."""

    async def swallow(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, swallow)
            yield f"tcp://127.0.0.1:{port}"
            tg.cancel_scope.cancel()


async def test_keepalive_fails_calls_to_a_silent_peer(silent_peer: str) -> None:
    transport = TcpTransport(keepalive_interval=0.1, keepalive_timeout=0.1)
    async with kubrpc.connect(silent_peer, transport=transport) as channel:
        with anyio.fail_after(5), pytest.raises(RpcError) as info:
            await channel.stub(Arith).add(1, 2)  # no deadline: only the keepalive can end it
    assert info.value.code is Status.UNAVAILABLE
    assert "lost" in info.value.message


async def test_keepalive_keeps_a_healthy_idle_connection(start_server: object) -> None:
    url, _, _ = await start_server("tcp")  # type: ignore[operator]
    transport = TcpTransport(keepalive_interval=0.05, keepalive_timeout=0.5)
    async with kubrpc.connect(url, transport=transport) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 1) == 2
        await anyio.sleep(0.4)  # several idle intervals: pings are answered, the connection stays
        (conn,) = channel.connections.values()
        assert conn.usable
        assert await arith.add(2, 2) == 4


class Flaky(Protocol):
    @kubrpc.method(idempotent=True)
    async def get(self) -> int: ...


class AlwaysUnavailable:
    def __init__(self) -> None:
        self.calls = 0

    async def get(self) -> int:
        self.calls += 1
        raise RpcError(Status.UNAVAILABLE, "overloaded")


async def test_retry_budget_caps_retries_during_an_outage() -> None:
    server = kubrpc.Server()
    impl = AlwaysUnavailable()
    server.register(Flaky, impl)
    budget = RetryBudget(0.2, min_tokens=10)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        async with kubrpc.connect(listener.url, max_attempts=5, retry_budget=budget) as channel:
            flaky = channel.stub(Flaky, timeout=5)
            for _ in range(500):
                with pytest.raises(RpcError):
                    await flaky.get()
    # Without a budget: 2,500 attempts. With it: 500 calls + 20 % + the initial 10 tokens.
    assert 500 < impl.calls <= 500 + 100 + 10
    assert budget.retries == impl.calls - 500 and budget.refused > 0


def test_retry_budget_counts_deposits_as_one_at_a_time_would() -> None:
    """deposit() only counts (it runs on every call); tokens, withdraw() and a new ratio see every deposit made."""
    budget = RetryBudget(0.25, min_tokens=0, max_tokens=2)
    for _ in range(3):
        budget.deposit()
    assert budget.tokens == 0.75 and not budget.withdraw()  # a retry needs a whole token
    budget.deposit()
    assert budget.withdraw() and budget.tokens == 0.0
    for _ in range(5):
        budget.deposit()
    budget.ratio = 1.0  # the five were made at 0.25
    assert budget.tokens == 1.25
    for _ in range(10):
        budget.deposit()
    assert budget.tokens == 2.0  # capped, as one deposit at a time is
    budget.tokens = 0.5
    budget.deposit()
    assert budget.tokens == 1.5 and repr(budget) == "<RetryBudget 100% [1.5 tokens, 1 retries, 1 refused]>"


async def test_idempotent_calls_are_retried_when_the_budget_allows() -> None:
    server = kubrpc.Server()
    impl = AlwaysUnavailable()
    server.register(Flaky, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        async with kubrpc.connect(listener.url, max_attempts=3) as channel:
            with pytest.raises(RpcError):
                await channel.stub(Flaky, timeout=5).get()
    assert impl.calls == 3


class CountingTcp(TcpTransport):
    """The tcp transport, counting connection attempts per port."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: dict[int, int] = {}

    async def connect(self, endpoint: kubrpc.Endpoint, /) -> TcpConnection:
        self.attempts[endpoint.port] = self.attempts.get(endpoint.port, 0) + 1
        return await super().connect(endpoint)


async def test_an_endpoint_refusing_connections_is_backed_off(start_server: object) -> None:
    url, _, _ = await start_server("tcp")  # type: ignore[operator]
    live = int(url.rsplit(":", 1)[1])
    transport = CountingTcp()
    endpoints = [kubrpc.Endpoint("127.0.0.1", 1), kubrpc.Endpoint("127.0.0.1", live)]
    async with kubrpc.connect(endpoints, transport=transport, balancer="round_robin") as channel:
        arith = channel.stub(Arith, timeout=5)
        assert [await arith.add(i, 0) for i in range(200)] == list(range(200))
    # Without backoff every other call would try port 1 again (100 refused connects).
    assert 1 <= transport.attempts[1] <= 5
    assert transport.attempts[live] == 1


async def test_the_call_deadline_bounds_connecting(silent_peer: str, tmp_path: object) -> None:
    import ssl
    from pathlib import Path

    from kubrpc.testing.certs import self_signed_certificate

    cert, _ = self_signed_certificate(Path(str(tmp_path)))
    context = ssl.create_default_context(cafile=str(cert))
    transport = TcpTransport(ssl=context, connect_timeout=60)  # the TLS handshake never completes
    async with kubrpc.connect(silent_peer, transport=transport) as channel:
        with anyio.fail_after(20), pytest.raises(RpcError) as info:
            await channel.stub(Arith, timeout=0.3).add(1, 2)
    assert info.value.code is Status.DEADLINE_EXCEEDED
