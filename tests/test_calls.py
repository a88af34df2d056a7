"""End to end over real loopback sockets, on both transports: what a caller sees."""

from __future__ import annotations

import datetime
import logging
import math
import uuid
from typing import Protocol

import anyio
import pytest
from services import Arith, Color, Control, Item, Store, Tag, wait_until

import kubrpc
from kubrpc import Endpoint, RpcError, Status

pytestmark = pytest.mark.anyio


async def test_add(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 2) == 3
        assert await arith.add(a=-5, b=2) == -3
        assert await arith.div(1, 4) == 0.25


async def test_dataclasses_and_rich_types_round_trip(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    item = Item(
        id=uuid.uuid4(),
        name="widget",
        color=Color.GREEN,
        created=datetime.datetime(2026, 11, 26, 9, 30, tzinfo=datetime.UTC),
        tags=[Tag("a"), Tag("b", 2.5)],
        blob=b"\x00\xffbinary",
        parent=Item(uuid.uuid4(), "root", Color.RED, datetime.datetime(2020, 1, 1)),
    )
    async with kubrpc.connect(url) as channel:
        store = channel.stub(Store, timeout=5)
        back = await store.put(item)
        assert back == item
        assert isinstance(back.tags[1], Tag) and back.color is Color.GREEN
        found = await store.find(["widget", "nope"], limit=5)
        assert found == {"widget": item, "nope": None}
        assert await store.echo((1, "x"), "a", datetime.date(2026, 1, 2)) == (1, "x")


async def test_handler_rpc_error_reaches_client_unchanged(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        control = channel.stub(Control, timeout=5)
        for status in (Status.NOT_FOUND, Status.PERMISSION_DENIED, Status.FAILED_PRECONDITION, Status.CANCELLED):
            with pytest.raises(RpcError) as info:
                await control.fail(status.name, f"nope: {status.name}")
            assert info.value == RpcError(status, f"nope: {status.name}")


async def test_handler_exception_is_internal_and_leaks_nothing(
    served: tuple[str, kubrpc.Server, object], caplog: pytest.LogCaptureFixture
) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        control = channel.stub(Control, timeout=5)
        with caplog.at_level(logging.ERROR, logger="kubrpc.server"):
            with pytest.raises(RpcError) as info:
                await control.crash()
    assert info.value.code is Status.INTERNAL
    assert "secret" not in info.value.message and "KeyError" not in info.value.message
    assert "Control/crash" in caplog.text and "secret internal detail" in caplog.text  # logged on the server


async def test_invalid_argument_names_the_field(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        with pytest.raises(RpcError) as info:
            await arith.add("1", 2)  # type: ignore[arg-type]
        assert info.value.code is Status.INVALID_ARGUMENT
        assert "'a'" in info.value.message and "integer" in info.value.message
        store = channel.stub(Store, timeout=5)
        with pytest.raises(RpcError) as info:
            await store.echo((1, "x"), "c")  # type: ignore[arg-type]
        assert info.value.code is Status.INVALID_ARGUMENT and "'mode'" in info.value.message
        with pytest.raises(RpcError) as info:
            await channel.call("test.Store/put", b'{"item": {"id": "not-a-uuid", "name": "x"}}', timeout=5)
        assert info.value.code is Status.INVALID_ARGUMENT and "item.id" in info.value.message
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/add", b'{"a": 1}', timeout=5)
        assert info.value == RpcError(Status.INVALID_ARGUMENT, "missing argument 'b'")
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/add", b'{"a": 1, "b": 2, "c": 3}', timeout=5)
        assert info.value == RpcError(Status.INVALID_ARGUMENT, "unexpected argument 'c'")
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/add", b'{"a": 1, ', timeout=5)
        assert info.value == RpcError(Status.INVALID_ARGUMENT, "request body is not valid JSON")
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/add", b"[1, 2]", timeout=5)
        assert info.value.code is Status.INVALID_ARGUMENT
        assert await arith.add(1, 2) == 3  # the connection still serves


async def test_client_side_binding_errors_are_type_errors(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith)
        with pytest.raises(TypeError, match="missing required argument 'b'"):
            await arith.add(1)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
            await arith.add(1, 2, c=3)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="multiple values"):
            await arith.add(1, 2, a=3)  # type: ignore[misc]


async def test_unknown_service_or_method_is_unimplemented(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        with pytest.raises(RpcError) as info:
            await channel.call("Nope/add", b"{}", timeout=5)
        assert info.value == RpcError(
            Status.UNIMPLEMENTED, "unknown service 'Nope' (known: Arith, Control, test.Store)"
        )
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/mul", b"{}", timeout=5)
        assert info.value == RpcError(Status.UNIMPLEMENTED, "unknown method 'mul' of service 'Arith' (known: add, div)")


async def test_deadline_exceeded_cancels_the_handler(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, control = served
    async with kubrpc.connect(url) as channel:
        stub = channel.stub(Control, timeout=0.2)
        with pytest.raises(RpcError) as info:
            await stub.sleep(30)
        assert info.value.code is Status.DEADLINE_EXCEEDED
        await wait_until(lambda: control.cancelled == 1)  # type: ignore[attr-defined]
        assert control.finished == 0  # type: ignore[attr-defined]
        assert await channel.stub(Arith, timeout=5).add(2, 2) == 4


async def test_cancelled_client_call_cancels_the_handler(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, control = served
    async with kubrpc.connect(url) as channel:
        stub = channel.stub(Control)
        with anyio.move_on_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stub.sleep, 30)
                await wait_until(lambda: control.started == 1)  # type: ignore[attr-defined]
                tg.cancel_scope.cancel()
        await wait_until(lambda: control.cancelled == 1)  # type: ignore[attr-defined]
        assert control.finished == 0  # type: ignore[attr-defined]


async def test_2000_concurrent_calls_on_one_channel(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    results: dict[int, int] = {}
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=60)

        async def one(i: int) -> None:
            results[i] = await arith.add(i, i)

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(one, i)
    assert results == {i: 2 * i for i in range(2000)}


async def test_slow_calls_do_not_block_fast_ones(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        control, arith = channel.stub(Control), channel.stub(Arith, timeout=5)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(control.sleep, 30)
            with anyio.fail_after(5):
                assert [await arith.add(i, 1) for i in range(50)] == [i + 1 for i in range(50)]
            tg.cancel_scope.cancel()


async def test_no_endpoint_is_unavailable(scheme: str) -> None:
    async with kubrpc.connect([], transport=scheme, wait_for_endpoints=0.05) as channel:
        with pytest.raises(RpcError) as info:
            await channel.stub(Arith).add(1, 2)
    assert info.value.code is Status.UNAVAILABLE
    not_ready = [Endpoint("127.0.0.1", 1, ready=False)]
    async with kubrpc.connect(not_ready, transport=scheme) as channel:
        with pytest.raises(RpcError) as info:
            await channel.stub(Arith).add(1, 2)
    assert info.value.code is Status.UNAVAILABLE


async def test_unreachable_endpoint_is_unavailable(scheme: str) -> None:
    with anyio.fail_after(10):
        async with kubrpc.connect(f"{scheme}://127.0.0.1:1") as channel:
            with pytest.raises(RpcError) as info:
                await channel.stub(Arith, timeout=5).add(1, 2)
    assert info.value.code is Status.UNAVAILABLE


async def test_connect_failure_retries_on_another_endpoint(scheme: str, start_server: object) -> None:
    url, _, _ = await start_server(scheme)  # type: ignore[operator]
    port = int(url.rsplit(":", 1)[1])
    endpoints = [Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", port)]
    async with kubrpc.connect(endpoints, transport=scheme) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert [await arith.add(i, 0) for i in range(10)] == list(range(10))


async def test_static_target_with_weights_spreads_calls(start_server: object) -> None:
    urls = []
    controls = []
    for name in ("a", "b", "c"):
        url, _, control = await start_server("tcp", name=name)  # type: ignore[operator]
        urls.append(url.removeprefix("tcp://"))
        controls.append(control)
    target = "static://" + ",".join(urls)
    async with kubrpc.connect(target, balancer="round_robin") as channel:
        who = channel.stub(Control, timeout=5)
        names = [await who.whoami() for _ in range(30)]
        assert sorted(set(names)) == ["a", "b", "c"]
        assert [c.calls for c in controls] == [10, 10, 10]
        assert repr(channel) == f"<Channel {target} [3 ready | round_robin | tcp]>"


async def test_endpoints_that_leave_the_resolver_lose_their_connections(start_server: object) -> None:
    from kubrpc.testing import ManualResolver

    endpoints = []
    for name in ("a", "b"):
        url, _, _ = await start_server("tcp", name=name)  # type: ignore[operator]
        endpoints.append(Endpoint("127.0.0.1", int(url.rsplit(":", 1)[1])))
    resolver = ManualResolver(endpoints)
    async with kubrpc.connect(resolver) as channel:
        who = channel.stub(Control, timeout=5)
        assert {await who.whoami() for _ in range(4)} == {"a", "b"}
        resolver.set(endpoints[1:])
        await wait_until(lambda: len(channel.endpoints) == 1)
        assert {await who.whoami() for _ in range(4)} == {"b"}
        assert list(channel.connections) == [f"127.0.0.1:{endpoints[1].port}"]


def test_both_transports_work_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    from services import make_server

    async def main() -> list[int]:
        server, _ = make_server()
        results = []
        for scheme in ("tcp", "http"):
            async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
                async with kubrpc.connect(listener.url) as channel:
                    results.append(await channel.stub(Arith, timeout=5).add(20, 22))
        return results

    assert anyio.run(main, backend_options={"use_uvloop": True}) == [42, 42]


async def test_handler_raising_cancelled_error_is_internal(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        with anyio.fail_after(5), pytest.raises(RpcError) as info:
            await channel.stub(Control).cancelled_inside()  # no deadline: an unanswered call would hang
    assert info.value == RpcError(Status.INTERNAL, "internal error")


async def test_deeply_nested_arguments_are_invalid_not_a_crash(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    fields = b'"id": "%s", "name": "x", "color": "red", "created": "2026-01-01T00:00:00"' % str(uuid.uuid4()).encode()
    # 900 levels of Item.parent: JSON parsers allow 1024, Python's recursion does not follow.
    body = b'{"item": ' + (b"{" + fields + b', "parent": ') * 900 + b"{" + fields + b"}" * 901 + b"}"
    async with kubrpc.connect(url) as channel:
        with anyio.fail_after(10), pytest.raises(RpcError) as info:
            await channel.call("test.Store/put", body, timeout=5)
        assert info.value == RpcError(
            Status.INVALID_ARGUMENT, "argument 'item' is nested deeper than 254 levels, the most the encoder can write"
        )
        assert await channel.stub(Arith, timeout=5).add(1, 1) == 2


async def test_non_finite_floats_travel_as_strings(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.div(1e308, 1e-308) == math.inf
        assert await arith.div(-math.inf, 1) == -math.inf
        assert math.isnan(await arith.div(math.nan, 1))
        assert await channel.call("Arith/div", b'{"a": "Infinity", "b": 2}', timeout=5) == b'"Infinity"'


async def test_bad_call_options_fail_before_anything_is_sent(served: tuple[str, kubrpc.Server, object]) -> None:
    url, _, _ = served
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=math.inf)  # no deadline
        assert await arith.add(1, 2) == 3
        with pytest.raises(RpcError) as info:
            await channel.call("Arith/add", b"{}", timeout=5, metadata={"x-retry": 1})  # type: ignore[dict-item]
        assert info.value.code is Status.INVALID_ARGUMENT
        for conn in channel.connections.values():
            assert getattr(conn, "in_flight", 0) == 0
        assert await arith.add(2, 2) == 4


class Holder(Protocol):
    async def hold(self, blob: str, seconds: float) -> int: ...


class HolderImpl:
    async def hold(self, blob: str, seconds: float) -> int:
        await anyio.sleep(seconds)
        return len(blob)


async def test_request_bytes_held_by_running_calls_are_capped(scheme: str) -> None:
    server = kubrpc.Server(max_message_size=1000, max_pending_bytes=1000)
    server.register(Holder, HolderImpl())
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        holder = channel.stub(Holder, timeout=10)
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.hold, "x" * 600, 0.5)
            await anyio.sleep(0.2)  # the first call now holds ~620 bytes
            with pytest.raises(RpcError) as info:
                await holder.hold("y" * 600, 0)
            assert info.value == RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
            assert await holder.hold("small", 0) == 5  # what fits still runs
        assert await holder.hold("z" * 600, 0) == 600  # and the budget came back


class _Shutdown(BaseException):
    """Not an Exception: what a library's own 'abort' signal might look like."""


class Aborts(Protocol):
    async def run(self) -> int: ...


class AbortsImpl:
    async def run(self) -> int:
        raise _Shutdown("deep inside a library")


async def test_a_handler_raising_a_base_exception_is_internal_not_silence(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, TCP left the call unanswered (the client waited out its deadline) and HTTP sent a plain-text 500.
    server = kubrpc.Server()
    server.register(Aborts, AbortsImpl())
    with caplog.at_level(logging.ERROR, logger="kubrpc.server"):
        async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
            stub = channel.stub(Aborts, timeout=10)
            with anyio.fail_after(5), pytest.raises(RpcError) as info:
                await stub.run()
            assert (info.value.code, info.value.message) == (Status.INTERNAL, "internal error")
            with anyio.fail_after(5), pytest.raises(RpcError):
                await stub.run()  # the connection still serves
    assert "call of Aborts/run failed" in caplog.text
