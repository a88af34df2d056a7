"""An attack on b7d88eb: a typed stub makes its unary call's first attempt itself, and Channel.call() (the untyped
API) goes through the retry loop. Every observable must stay as it was: errors, picks, retries, deadlines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Protocol

import pytest
from services import Control, ControlImpl, make_server

import kubrpc
from kubrpc import Endpoint, RetryBudget, RpcError, Status
from kubrpc.balancers.round_robin import RoundRobin

pytestmark = pytest.mark.anyio


class CountingRoundRobin(RoundRobin):
    """round_robin, counting its picks."""

    def __init__(self) -> None:
        super().__init__()
        self.picks = 0

    def pick(self) -> Endpoint:
        self.picks += 1
        return super().pick()


@asynccontextmanager
async def served_channel(
    scheme: str, **options: object
) -> AsyncIterator[tuple[kubrpc.Channel, CountingRoundRobin, ControlImpl]]:
    """A test server on 127.0.0.1 and a channel to it (with an open connection) through a counting balancer."""
    server, control = make_server()
    balancer = CountingRoundRobin()
    async with (
        server.serve(f"{scheme}://127.0.0.1:0") as listener,
        kubrpc.connect(listener.url, balancer=balancer, **options) as channel,  # type: ignore[arg-type]
    ):
        assert await channel.stub(Control, timeout=10).whoami() == "server"  # the connection is open
        yield channel, balancer, control


# ---- Channel.call(): the first attempt of a positive timeout picks before the deadline is looked at again ---------


async def test_channel_call_with_a_vanishing_timeout_picks_like_a_stub(scheme: str) -> None:
    """A timeout too small to move the clock (1e-300 s) is positive: Channel.call() picked an endpoint and made the
    attempt, as a stub does; going straight into the retry loop, it saw the deadline gone and picked nothing."""
    async with served_channel(scheme) as (channel, balancer, _):
        for call in (
            lambda: channel.stub(Control, timeout=1e-300).whoami(),
            lambda: channel.call("Control/whoami", b"{}", timeout=1e-300, idempotent=True),
        ):
            before = balancer.picks
            with pytest.raises(RpcError) as info:
                await call()
            assert info.value.code is Status.DEADLINE_EXCEEDED
            assert balancer.picks - before == 1


# ---- a stub's call that needs one of Channel.call()'s checks goes through them -------------------------------------


async def test_a_stub_with_no_time_left_picks_nothing_and_sends_nothing(scheme: str) -> None:
    """Timeout 0 or negative (the stub's, or a channel default of 0): DEADLINE_EXCEEDED before any pick."""
    async with served_channel(scheme) as (channel, balancer, control):
        budget = channel.retry_budget.tokens
        for stub in (channel.stub(Control, timeout=0), channel.stub(Control, timeout=-1)):
            before, calls = balancer.picks, control.calls
            with pytest.raises(RpcError) as info:
                await stub.whoami()
            assert info.value == RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
            assert (balancer.picks, control.calls) == (before, calls)
        assert channel.retry_budget.tokens == pytest.approx(budget + 2 * channel.retry_budget.ratio)  # deposited


async def test_a_stub_with_invalid_metadata_fails_each_call_before_a_pick_or_a_deposit(scheme: str) -> None:
    """Made without complaint; each call INVALID_ARGUMENT, as Channel.call() says it, with no pick and no deposit."""
    async with served_channel(scheme) as (channel, balancer, control):
        stub = channel.stub(Control, timeout=5, metadata={"bad key": "1"})  # not an error yet
        budget, before = channel.retry_budget.tokens, balancer.picks
        for _ in range(2):
            with pytest.raises(RpcError) as info:
                await stub.whoami()
            with pytest.raises(RpcError) as untyped:
                await channel.call("Control/whoami", b"{}", timeout=5, metadata={"bad key": "1"})
            assert info.value == untyped.value
            assert info.value.code is Status.INVALID_ARGUMENT
        assert (balancer.picks, channel.retry_budget.tokens, control.calls) == (before, budget, 1)


# ---- a stub's own first attempt: the same picks, retries, budget and balancer feedback as Channel.call() ----------


class Flaky(Protocol):
    @kubrpc.method(idempotent=True)
    async def safe(self) -> str: ...

    async def unsafe(self) -> str: ...


class FlakyImpl:
    """Instance "a" answers UNAVAILABLE (a server's own answer, after running the handler); the others succeed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs = 0

    async def safe(self) -> str:
        return await self.unsafe()

    async def unsafe(self) -> str:
        self.runs += 1
        if self.name == "a":
            raise RpcError(Status.UNAVAILABLE, "a is unwell")
        return self.name


class Scripted:
    """A balancer that picks the endpoints of the last update by index, from a script (then the first one)."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.endpoints: list[Endpoint] = []
        self.picks = 0

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        self.endpoints = list(endpoints)

    def pick(self) -> Endpoint:
        if not self.endpoints:
            raise RpcError(Status.UNAVAILABLE, "no endpoints")
        index = self.script[self.picks] if self.picks < len(self.script) else 0
        self.picks += 1
        return self.endpoints[index]


class Learning(RoundRobin):
    """round_robin that learns from calls (kubrpc.interfaces.CallFeedback): records what the channel tells it."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[int] = []
        self.finished: list[tuple[int, Status]] = []

    def on_start(self, endpoint: Endpoint, /) -> None:
        self.started.append(endpoint.port)

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        self.finished.append((endpoint.port, status))


@asynccontextmanager
async def flaky_servers(scheme: str, names: str) -> AsyncIterator[tuple[list[Endpoint], list[FlakyImpl]]]:
    """One server per letter of `names` on 127.0.0.1, each with Flaky and Control (whoami says its letter)."""
    async with AsyncExitStack() as stack:
        endpoints, impls = [], []
        for name in names:
            server, _ = make_server(name)
            impl = FlakyImpl(name)
            server.register(Flaky, impl)
            listener = await stack.enter_async_context(server.serve(f"{scheme}://127.0.0.1:0"))
            endpoints.append(Endpoint("127.0.0.1", int(listener.url.rsplit(":", 1)[1])))
            impls.append(impl)
        yield endpoints, impls


async def test_a_retry_of_a_stub_call_avoids_the_endpoint_it_failed_on(scheme: str) -> None:
    """The balancer offers "a" again for the retry: the call passes it over for "b" (one run on "a", one retry)."""
    async with flaky_servers(scheme, "ab") as (endpoints, (a, b)):
        balancer = Scripted([0, 0, 0, 1])
        budget = RetryBudget()
        async with kubrpc.connect(endpoints, transport=scheme, balancer=balancer, retry_budget=budget) as channel:
            await channel.call("Control/whoami", b"{}", timeout=10)  # the connection to "a" is open
            assert await channel.stub(Flaky, timeout=10).safe() == "b"
            assert (a.runs, b.runs, balancer.picks, budget.retries) == (1, 1, 4, 1)


async def test_a_stub_call_the_server_answered_unavailable_is_not_sent_again(scheme: str) -> None:
    """UNAVAILABLE from a server that ran the handler: a non-idempotent call is not retried; an idempotent one is,
    charged to the retry budget."""
    async with flaky_servers(scheme, "ab") as (endpoints, (a, b)):
        balancer = Scripted([0, 0, 0, 1])
        budget = RetryBudget()
        async with kubrpc.connect(endpoints, transport=scheme, balancer=balancer, retry_budget=budget) as channel:
            await channel.call("Control/whoami", b"{}", timeout=10)
            stub = channel.stub(Flaky, timeout=10)
            with pytest.raises(RpcError) as info:
                await stub.unsafe()
            assert info.value == RpcError(Status.UNAVAILABLE, "a is unwell")
            assert (a.runs, b.runs, budget.retries) == (1, 0, 0)
            assert await stub.safe() == "b"
            assert (a.runs, b.runs, budget.retries) == (2, 1, 1)


async def test_every_stub_call_deposits_once_into_the_retry_budget(scheme: str) -> None:
    budget = RetryBudget(ratio=0.25, min_tokens=0)
    async with served_channel(scheme, retry_budget=budget) as (channel, balancer, _):
        assert budget.tokens == 0.25 and balancer.picks == 1  # the first call: one pick, though nothing was open
        stub = channel.stub(Control, timeout=10)
        for _ in range(3):
            await stub.whoami()
        assert (budget.tokens, balancer.picks) == (1.0, 4)


async def test_a_keyed_stub_calls_the_endpoint_of_its_key(scheme: str) -> None:
    """ring_hash with a key: every call of the stub on the key's endpoint, not wherever a keyless pick lands."""
    async with flaky_servers(scheme, "bcdefg") as (endpoints, _):
        async with kubrpc.connect(endpoints, transport=scheme, balancer="ring_hash") as channel:
            for key in ("tenant-1", "tenant-2", "tenant-3"):
                stub = channel.stub(Control, timeout=10, key=key)
                assert len({await stub.whoami() for _ in range(8)}) == 1


async def test_a_balancer_that_learns_from_calls_hears_of_every_stub_call(scheme: str) -> None:
    async with flaky_servers(scheme, "ab") as (endpoints, _):
        balancer = Learning()
        async with kubrpc.connect(endpoints, transport=scheme, balancer=balancer) as channel:
            stub = channel.stub(Flaky, timeout=10)
            for _ in range(4):
                try:
                    await stub.unsafe()
                except RpcError:
                    pass
            assert len(balancer.started) == 4
            assert sorted(status.name for _, status in balancer.finished) == ["OK", "OK", "UNAVAILABLE", "UNAVAILABLE"]


async def test_a_stub_never_sends_on_a_connection_that_is_not_usable() -> None:
    """The stub's own first attempt checks `usable`: a connection that says it takes no new calls (here told so
    directly; in life closed, sent away or out of stream ids) gets none, and the call goes on a new one."""
    async with served_channel("tcp") as (channel, balancer, control):
        (old,) = channel._connections.values()
        old.usable = False  # (TcpConnection.usable is a plain attribute)
        before, calls, sent = balancer.picks, control.calls, old._next_stream
        assert await channel.stub(Control, timeout=10).whoami() == "server"
        assert (balancer.picks, control.calls, old._next_stream) == (before + 1, calls + 1, sent)  # nothing sent on it
        (new,) = channel._connections.values()
        assert new is not old and new.usable
