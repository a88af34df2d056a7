"""The inproc transport: `server.serve("inproc://NAME")` and `kubrpc.connect("inproc://NAME")`, with no sockets.

The wire tests of test_calls.py run here too, over inproc (their `served` fixture is overridden below), so that a
call in-process sees the same validation, errors, deadlines and cancellation as one over a socket.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import pytest
from anyio.abc import TaskStatus
from services import Arith, ArithImpl, Control, make_server, wait_until

# The wire suite, collected again in this module with the inproc `served` fixture below.
from test_calls import (  # noqa: F401
    test_add,
    test_bad_call_options_fail_before_anything_is_sent,
    test_cancelled_client_call_cancels_the_handler,
    test_client_side_binding_errors_are_type_errors,
    test_dataclasses_and_rich_types_round_trip,
    test_deadline_exceeded_cancels_the_handler,
    test_deeply_nested_arguments_are_invalid_not_a_crash,
    test_handler_exception_is_internal_and_leaks_nothing,
    test_handler_raising_cancelled_error_is_internal,
    test_handler_rpc_error_reaches_client_unchanged,
    test_invalid_argument_names_the_field,
    test_non_finite_floats_travel_as_strings,
    test_slow_calls_do_not_block_fast_ones,
    test_unknown_service_or_method_is_unimplemented,
)

import kubrpc
from kubrpc import CallInfo, ClientCall, NotDeliveredError, RpcError, Status, current_call
from kubrpc.interceptors import Proceed
from kubrpc.resolvers import create as create_resolver
from kubrpc.transports import names as transport_names
from kubrpc.transports.inproc import InprocListener

pytestmark = pytest.mark.anyio


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, kubrpc.Server, object]]:
    """The test server of test_calls.py, served in-process under a name of its own."""
    server, control = make_server()
    async with server.serve(f"inproc://{request.node.name}") as listener:
        yield listener.url, server, control


class Gate(Protocol):
    async def hold(self, tag: str) -> str: ...

    async def stubborn(self) -> str: ...

    async def mutate(self, values: list[int]) -> list[int]: ...

    async def context(self) -> dict[str, str]: ...

    async def relay(self, code: str) -> None: ...


# Context variables: one the serving code sets, one the calling code sets, one handlers set.
served_by: contextvars.ContextVar[str] = contextvars.ContextVar("served_by", default="")
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")
handler_mark: contextvars.ContextVar[str] = contextvars.ContextVar("handler_mark", default="")


class GateImpl:
    """Handlers that wait until the test lets them go, and record what they saw."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.ignored = 0
        self.relayed = 0

    async def hold(self, tag: str) -> str:
        self.started += 1
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        self.finished += 1
        return tag

    async def stubborn(self) -> str:
        """Ignores cancellation until released."""
        self.started += 1
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.ignored += 1  # and carries on
        self.finished += 1
        return "late"

    async def mutate(self, values: list[int]) -> list[int]:
        values.append(99)
        return values

    async def context(self) -> dict[str, str]:
        handler_mark.set("set by a handler")
        call = current_call()
        return {
            "served_by": served_by.get(),
            "caller": caller.get(),
            "peer": call.peer,
            "remaining": "none" if call.deadline is None else "set",
        }

    async def relay(self, code: str) -> None:
        """Fails as a handler does that lets a downstream call's error through, chained to a secret."""
        self.relayed += 1
        try:
            raise KeyError("secret internal detail")
        except KeyError as exc:
            if code == "NOT_DELIVERED":
                raise NotDeliveredError("downstream unreachable") from exc
            raise RpcError(Status[code], "downstream said no") from exc


def gate_server(**options: Any) -> tuple[kubrpc.Server, GateImpl]:
    server, _ = make_server(**options)
    gate = GateImpl()
    server.register(Gate, gate)
    return server, gate


@asynccontextmanager
async def serving_in_background(server: kubrpc.Server, url: str) -> AsyncIterator[tuple[Any, anyio.Event]]:
    """Serve `url` in a task; yields (listener, stop): setting stop leaves the serve block (and drains)."""
    stop = anyio.Event()

    async def serve(*, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        async with server.serve(url) as listener:
            task_status.started(listener)
            await stop.wait()

    async with anyio.create_task_group() as tg:
        listener = await tg.start(serve)
        try:
            yield listener, stop
        finally:
            stop.set()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
async def arith() -> AsyncIterator[Arith]:
    """The fixture form the README shows: a typed stub of a server in this process."""
    server = kubrpc.Server()
    server.register(Arith, ArithImpl())
    async with server.serve("inproc://arith"), kubrpc.connect("inproc://arith") as channel:
        yield channel.stub(Arith, timeout=5)


async def test_the_readme_fixture(arith: Arith) -> None:
    assert await arith.add(1, 2) == 3
    with pytest.raises(RpcError) as info:
        await arith.div(1, 0)
    assert info.value == RpcError(Status.INVALID_ARGUMENT, "division by zero")


# -- no sockets ------------------------------------------------------------------------------------------------


async def test_calls_open_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sockets(*args: object, **kwargs: object) -> None:
        raise AssertionError("the inproc transport opened a socket")

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(socket, "socket", no_sockets)
    monkeypatch.setattr(socket, "socketpair", no_sockets)
    monkeypatch.setattr(loop, "create_connection", no_sockets)
    monkeypatch.setattr(loop, "create_server", no_sockets)
    before = open_fds()
    server, _ = make_server()
    async with server.serve("inproc://nosockets") as listener:
        assert listener.url == "inproc://nosockets"
        async with kubrpc.connect("inproc://nosockets") as channel:
            arith = channel.stub(Arith, timeout=5)
            assert [await arith.add(i, 1) for i in range(20)] == list(range(1, 21))
            assert open_fds() == before
    assert open_fds() == before


async def test_the_transport_and_resolver_are_registered_by_scheme() -> None:
    assert "inproc" in transport_names()
    resolver = create_resolver("inproc://a,b")
    async for endpoints in resolver.watch():
        assert [ep.host for ep in endpoints] == ["a", "b"]
        break
    await resolver.aclose()
    async with kubrpc.connect("inproc://a") as channel:
        assert channel.transport_name == "inproc"


# -- names ---------------------------------------------------------------------------------------------------------


async def test_a_live_name_cannot_be_served_twice_and_is_free_after_the_block() -> None:
    first, first_control = make_server("first")
    second, second_control = make_server("second")
    async with first.serve("inproc://shared"):
        with pytest.raises(OSError, match=r"inproc://shared is already served by .* in this process") as info:
            async with second.serve("inproc://shared"):
                pass  # pragma: no cover
        assert info.value.errno == errno.EADDRINUSE
        async with kubrpc.connect("inproc://shared") as channel:
            assert await channel.stub(Control, timeout=5).whoami() == "first"  # the first still serves
    async with second.serve("inproc://shared"), kubrpc.connect("inproc://shared") as channel:
        assert await channel.stub(Control, timeout=5).whoami() == "second"
    assert (first_control.calls, second_control.calls) == (1, 1)


async def test_a_name_nobody_serves_is_not_delivered_and_named() -> None:
    async with kubrpc.connect("inproc://nobody", wait_for_endpoints=1) as channel:
        with anyio.fail_after(5), pytest.raises(NotDeliveredError) as info:
            await channel.stub(Arith, timeout=5).add(1, 2)
    assert info.value.code is Status.UNAVAILABLE
    assert info.value.message == "no server is serving inproc://nobody in this process"


async def test_a_server_that_starts_later_is_found() -> None:
    server, _ = make_server()
    async with kubrpc.connect("inproc://later", max_attempts=1) as channel:
        arith = channel.stub(Arith, timeout=5)
        with pytest.raises(NotDeliveredError):
            await arith.add(1, 1)
        async with server.serve("inproc://later"):
            assert await arith.add(1, 1) == 2


async def test_names_are_case_sensitive_and_checked() -> None:
    server, _ = make_server()
    async with server.serve("inproc://Billing.v2_x-y~z") as listener:
        assert listener.url == "inproc://Billing.v2_x-y~z"
        async with kubrpc.connect("inproc://billing.v2_x-y~z", max_attempts=1) as channel:
            with pytest.raises(NotDeliveredError, match="no server is serving"):
                await channel.stub(Arith, timeout=5).add(1, 1)
    for bad in ("inproc://", "inproc://a/b", "inproc://a:1", "inproc://a b", "inproc://a,b"):
        with pytest.raises(ValueError, match=r"expected inproc://NAME"):
            async with server.serve(bad):
                pass  # pragma: no cover
    for bad in ("inproc://", "inproc://a/b", "inproc://a,,b"):
        with pytest.raises(ValueError, match=r"expected inproc://NAME"):
            kubrpc.connect(bad)
    for wire in ("tcp", "http"):
        with pytest.raises(ValueError, match=r"'inproc://a' is a server in this process: leave transport= out"):
            kubrpc.connect("inproc://a", transport=wire)


async def test_several_names_are_balanced_over() -> None:
    one, one_control = make_server("one")
    two, two_control = make_server("two")
    async with one.serve("inproc://one"), two.serve("inproc://two"):
        async with kubrpc.connect("inproc://one,two") as channel:
            control = channel.stub(Control, timeout=5)
            seen = [await control.whoami() for _ in range(10)]
    assert sorted(seen) == ["one"] * 5 + ["two"] * 5
    assert (one_control.calls, two_control.calls) == (5, 5)


async def test_a_loop_must_call_a_server_on_its_own_loop() -> None:
    server, _ = make_server()

    async def from_another_loop() -> None:
        async with kubrpc.connect("inproc://oneloop", max_attempts=1) as channel:
            await channel.stub(Arith, timeout=5).add(1, 1)

    async with server.serve("inproc://oneloop"):
        with pytest.raises(NotDeliveredError, match="served on another event loop"):
            await anyio.to_thread.run_sync(anyio.run, from_another_loop)


# -- the call: codec, context, metadata, interceptors, errors --------------------------------------------------


async def test_arguments_and_results_are_copies_as_on_the_wire() -> None:
    server, _ = gate_server()
    async with server.serve("inproc://copies"), kubrpc.connect("inproc://copies") as channel:
        values = [1, 2]
        back = await channel.stub(Gate, timeout=5).mutate(values)
    assert values == [1, 2]  # the handler appended to its own decoded copy
    assert back == [1, 2, 99] and back is not values


async def test_handlers_run_in_the_servers_context_not_the_callers() -> None:
    server, _ = gate_server()
    served_by.set("the serving code")
    async with server.serve("inproc://ctx"), kubrpc.connect("inproc://ctx") as channel:
        caller.set("the calling code")
        seen = await channel.stub(Gate, timeout=5).context()
        untimed = await channel.stub(Gate).context()
    assert seen == {"served_by": "the serving code", "caller": "", "peer": "", "remaining": "set"}
    assert untimed["remaining"] == "none"
    assert handler_mark.get() == ""  # what the handler set stayed on the server's side


async def test_metadata_keys_arrive_in_lower_case_through_both_interceptor_chains() -> None:
    seen: list[CallInfo] = []
    order: list[str] = []

    async def record(call: CallInfo, proceed: Proceed, /) -> bytes:
        seen.append(call)
        order.append("server")
        return await proceed()

    async def tag(call: ClientCall, proceed: Proceed, /) -> bytes:
        order.append("client")
        call.metadata["X-Trace"] = "t-1"
        return await proceed()

    server, _ = make_server(interceptors=[record])
    async with server.serve("inproc://meta"), kubrpc.connect("inproc://meta", interceptors=[tag]) as channel:
        assert await channel.stub(Arith, timeout=5, metadata={"X-Tenant": "Acme"}).add(1, 2) == 3
    async with server.serve("inproc://meta"), kubrpc.connect("inproc://meta") as channel:  # no client interceptor
        assert await channel.stub(Arith, timeout=5, metadata={"X-Tenant": "Acme"}).add(1, 2) == 3
    assert order == ["client", "server", "server"]
    assert dict(seen[0].metadata) == {"x-tenant": "Acme", "x-trace": "t-1"}
    assert dict(seen[1].metadata) == {"x-tenant": "Acme"}
    assert seen[0].path == "Arith/add" and seen[0].deadline is not None


async def test_server_interceptors_reject_and_fail_as_on_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    async def guard(call: CallInfo, proceed: Proceed, /) -> bytes:
        if call.metadata.get("authorization") != "Bearer ok":
            raise RpcError(Status.UNAUTHENTICATED, "missing token")
        if call.method == "div":
            raise KeyError("secret internal detail")
        return await proceed()

    server, _ = make_server(interceptors=[guard])
    async with server.serve("inproc://guarded"), kubrpc.connect("inproc://guarded") as channel:
        with pytest.raises(RpcError) as denied:
            await channel.stub(Arith, timeout=5).add(1, 2)
        arith = channel.stub(Arith, timeout=5, metadata={"Authorization": "Bearer ok"})
        assert await arith.add(1, 2) == 3
        with pytest.raises(RpcError) as broken:
            await arith.div(1, 2)
    assert denied.value == RpcError(Status.UNAUTHENTICATED, "missing token")
    assert broken.value == RpcError(Status.INTERNAL, "internal error")
    assert broken.value.__cause__ is None and broken.value.__context__ is None
    assert "secret internal detail" in caplog.text


@pytest.mark.parametrize("code", ["PERMISSION_DENIED", "UNAVAILABLE", "NOT_DELIVERED"])
async def test_errors_carry_code_and_message_only(code: str) -> None:
    server, gate = gate_server()
    async with server.serve("inproc://errors"), kubrpc.connect("inproc://errors") as channel:
        with pytest.raises(RpcError) as info:
            await channel.stub(Gate, timeout=5).relay(code)
    error = info.value
    # Neither the server's exception object nor its cause crosses over: a handler's NotDeliveredError is a plain
    # UNAVAILABLE on the client, as on the wire, so the channel does not retry a call that did run.
    assert type(error) is RpcError
    assert error.__cause__ is None and error.__context__ is None
    expected = Status.UNAVAILABLE if code == "NOT_DELIVERED" else Status[code]
    message = "downstream unreachable" if code == "NOT_DELIVERED" else "downstream said no"
    assert error == RpcError(expected, message)
    assert gate.relayed == 1


# -- deadlines and cancellation -------------------------------------------------------------------------------


async def test_the_deadline_fails_the_call_even_if_the_handler_ignores_cancellation() -> None:
    server, gate = gate_server()
    async with server.serve("inproc://stubborn"), kubrpc.connect("inproc://stubborn") as channel:
        with anyio.fail_after(10), pytest.raises(RpcError) as info:
            await channel.stub(Gate, timeout=0.2).stubborn()
        assert info.value == RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
        assert gate.finished == 0  # the caller did not wait for the handler
        await wait_until(lambda: gate.ignored == 1)  # which was cancelled at the deadline
        gate.release.set()
        await wait_until(lambda: gate.finished == 1)


async def test_a_cancelled_caller_returns_at_once_and_cancels_the_handler() -> None:
    server, gate = gate_server()
    async with server.serve("inproc://cancel"), kubrpc.connect("inproc://cancel") as channel:
        stub = channel.stub(Gate, timeout=30)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stub.hold, "a")
                tg.start_soon(stub.stubborn)
                await wait_until(lambda: gate.started == 2)
                tg.cancel_scope.cancel()
        await wait_until(lambda: gate.cancelled == 1 and gate.ignored == 1)  # both handlers were told
        assert gate.finished == 0
        gate.release.set()
        await wait_until(lambda: gate.finished == 1)  # the stubborn one ends on its own
        assert await stub.hold("b") == "b"


async def test_closing_the_channel_cancels_its_calls() -> None:
    server, gate = gate_server()
    errors: list[RpcError] = []

    async def call(stub: Gate) -> None:
        try:
            await stub.hold("a")
        except RpcError as exc:
            errors.append(exc)

    async with server.serve("inproc://closing"), anyio.create_task_group() as tg:
        async with kubrpc.connect("inproc://closing") as channel:
            tg.start_soon(call, channel.stub(Gate, timeout=30))
            await wait_until(lambda: gate.started == 1)
        await wait_until(lambda: gate.cancelled == 1)
    assert [e.code for e in errors] == [Status.UNAVAILABLE]
    assert "connection closed before the call finished" in errors[0].message


# -- drain -------------------------------------------------------------------------------------------------------


async def test_a_draining_server_refuses_new_calls_and_finishes_running_ones() -> None:
    server, gate = gate_server(drain_timeout=30)
    results: list[str] = []
    async with serving_in_background(server, "inproc://drain") as (listener, stop):
        async with kubrpc.connect("inproc://drain", max_attempts=1) as channel:
            stub = channel.stub(Gate, timeout=30)

            async def running() -> None:
                results.append(await stub.hold("finished"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(running)
                await wait_until(lambda: gate.started == 1)
                stop.set()  # leave the serve block: drain
                await wait_until(lambda: listener.closing)
                with pytest.raises(NotDeliveredError, match=r"inproc://drain is shutting down"):
                    await stub.hold("new")
                assert gate.started == 1  # the refused call never ran
                gate.release.set()
    assert results == ["finished"]


async def test_a_new_server_may_take_the_name_while_the_old_one_drains() -> None:
    old, old_gate = gate_server(drain_timeout=30)
    new, _ = make_server("new")
    async with serving_in_background(old, "inproc://rolling") as (listener, stop):
        async with kubrpc.connect("inproc://rolling") as channel:
            async with anyio.create_task_group() as tg:
                tg.start_soon(channel.stub(Gate, timeout=30).hold, "old")
                await wait_until(lambda: old_gate.started == 1)
                stop.set()
                await wait_until(lambda: listener.closing)
                async with new.serve("inproc://rolling"):
                    assert await channel.stub(Control, timeout=5).whoami() == "new"
                    old_gate.release.set()


async def test_calls_still_running_at_the_drain_timeout_are_cancelled_and_unavailable() -> None:
    server, gate = gate_server(drain_timeout=0.1)
    errors: list[RpcError] = []
    async with kubrpc.connect("inproc://timeout") as channel:
        async with serving_in_background(server, "inproc://timeout") as (_, stop):
            stub = channel.stub(Gate, timeout=30)

            async def call() -> None:
                try:
                    await stub.hold("a")
                except RpcError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await wait_until(lambda: gate.started == 1)
                stop.set()
    assert gate.cancelled == 1
    assert len(errors) == 1 and type(errors[0]) is RpcError  # it was delivered: not safe to retry
    assert errors[0] == RpcError(Status.UNAVAILABLE, "inproc://timeout stopped before the call finished")


# -- admission limits ------------------------------------------------------------------------------------------


async def test_max_concurrent_calls_applies_per_connection() -> None:
    server, gate = gate_server(max_concurrent_calls=2)
    async with server.serve("inproc://busy"), kubrpc.connect("inproc://busy") as channel:
        stub = channel.stub(Gate, timeout=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stub.hold, "a")
            tg.start_soon(stub.hold, "b")
            await wait_until(lambda: gate.started == 2)
            with pytest.raises(RpcError) as info:
                await stub.hold("c")
            assert info.value == RpcError(Status.RESOURCE_EXHAUSTED, "too many concurrent calls on this connection")
            async with kubrpc.connect("inproc://busy") as other:  # another connection has its own allowance
                assert await other.stub(Arith, timeout=5).add(1, 1) == 2
            gate.release.set()
        assert await stub.hold("d") == "d"


async def test_max_connections_refuses_more_connections() -> None:
    server, _ = make_server(max_connections=1)
    async with server.serve("inproc://conns"), kubrpc.connect("inproc://conns") as first:
        assert await first.stub(Arith, timeout=5).add(1, 1) == 2
        async with kubrpc.connect("inproc://conns", max_attempts=1) as second:
            with pytest.raises(NotDeliveredError, match="too many connections"):
                await second.stub(Arith, timeout=5).add(1, 1)
        assert await first.stub(Arith, timeout=5).add(2, 2) == 4


async def test_max_message_size_applies_both_ways() -> None:
    server, _ = make_server(max_message_size=100)
    async with server.serve("inproc://sizes"), kubrpc.connect("inproc://sizes") as channel:
        with pytest.raises(RpcError) as request:
            await channel.call("test.Store/blob", b'{"size": %d}' % 1 + b" " * 200, timeout=5)
        with pytest.raises(RpcError) as response:
            await channel.call("test.Store/blob", b'{"size": 200}', timeout=5)
        assert await channel.call("test.Store/blob", b'{"size": 3}', timeout=5) == b'"eHh4"'
    assert request.value == RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
    assert response.value == RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")


async def test_request_bytes_held_by_running_calls_are_capped() -> None:
    server, gate = gate_server(max_message_size=1000, max_pending_bytes=1000)
    async with server.serve("inproc://pending"), kubrpc.connect("inproc://pending") as channel:
        stub = channel.stub(Gate, timeout=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stub.hold, "x" * 600)
            await wait_until(lambda: gate.started == 1)  # the first call now holds ~615 bytes
            with pytest.raises(RpcError) as info:
                await stub.hold("y" * 600)
            assert info.value == RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
            assert gate.started == 1
            gate.release.set()
        assert await stub.hold("z" * 600) == "z" * 600  # and the budget came back


async def test_listener_counts_connections_and_calls() -> None:
    server, gate = gate_server()
    async with server.serve("inproc://counts") as served, kubrpc.connect("inproc://counts") as channel:
        assert isinstance(served, InprocListener)
        listener = served
        stub = channel.stub(Gate, timeout=30)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stub.hold, "a")
            await wait_until(lambda: gate.started == 1)
            assert listener.active_calls == 1 and len(listener.connections) == 1
            assert "1 connections, 1 calls" in repr(listener)
            gate.release.set()
        await wait_until(lambda: listener.active_calls == 0)


def test_inproc_works_on_uvloop() -> None:
    async def main() -> int:
        server, _ = make_server()
        async with server.serve("inproc://uv"), kubrpc.connect("inproc://uv") as channel:
            return await channel.stub(Arith, timeout=5).add(20, 22)

    assert anyio.run(main, backend_options={"use_uvloop": True}) == 42
