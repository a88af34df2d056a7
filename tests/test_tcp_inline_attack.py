"""An attack on the TCP server's inline calls (transports/_eager.py InlineRunner, Server.runs_inline).

A unary handler whose code has no await runs to its end where its request is read, with a stand-in task as
`asyncio.current_task()`. Each test compares it over a real socket with a handler that waits (and so has a task
of its own): the client must see the same answer, and what one call does to "its task" must not reach the next.
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol
from unittest.mock import create_autospec

import anyio
import orjson
import pytest
from rawtcp import RawClient, raw_opener
from services import wait_until

import kubrpc
from kubrpc.status import Status
from kubrpc.transports._frames import FrameType, encode_request
from kubrpc.transports._tcp_server import TcpListener

pytestmark = pytest.mark.anyio

_calls_ended: list[str] = []  # the done callbacks that handlers add to their task


class Attack(Protocol):
    async def fail_rpc(self) -> str: ...

    async def fail_value(self) -> str: ...

    async def fail_cancelled(self) -> str: ...

    async def fail_stop(self) -> str: ...

    async def fail_generator_exit(self) -> str: ...

    async def fail_timeout(self) -> str: ...

    async def method_name(self) -> str: ...

    async def moved_on(self) -> str: ...

    async def failed_after(self) -> str: ...

    async def spawn(self) -> str: ...

    async def cancel_own_task(self) -> str: ...

    async def cancelling(self) -> str: ...

    async def on_task_done(self, tag: str) -> str: ...


_background: set[asyncio.Task[None]] = set()


class Inline:
    """No await anywhere: every call runs inline."""

    async def fail_rpc(self) -> str:
        raise kubrpc.RpcError(Status.NOT_FOUND, "no such thing")

    async def fail_value(self) -> str:
        raise ValueError("secret")

    async def fail_cancelled(self) -> str:  # say, from a future that someone else cancelled
        raise asyncio.CancelledError

    async def fail_stop(self) -> str:
        raise StopIteration

    async def fail_generator_exit(self) -> str:
        raise GeneratorExit

    async def fail_timeout(self) -> str:
        raise TimeoutError

    async def method_name(self) -> str:
        return kubrpc.current_call().method

    async def moved_on(self) -> str:
        with anyio.move_on_after(-1) as scope:  # noqa: ASYNC100  (the point: a passed deadline, no await)
            pass
        return f"{scope.cancel_called} {scope.cancelled_caught}"

    async def failed_after(self) -> str:
        with anyio.fail_after(-1) as scope:  # noqa: ASYNC100
            pass
        return str(scope.cancel_called)

    async def spawn(self) -> str:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return "spawned"

    async def cancel_own_task(self) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # it never waits again: the call still ends normally
        return "cancelled"

    async def cancelling(self) -> str:
        task = asyncio.current_task()
        assert task is not None
        return str(task.cancelling())

    async def on_task_done(self, tag: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _: _calls_ended.append(tag))  # cleanup "when this call's task ends"
        return tag


def _waiting(cls: type) -> type:
    """`cls` with every handler waiting once first: each call then has a task of its own."""

    def waits(name: str) -> Callable[..., Any]:
        async def handler(self: object, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return await getattr(cls, name)(self, **kwargs)

        handler.__signature__ = inspect.signature(getattr(cls, name))  # type: ignore[attr-defined]
        handler.__annotations__ = getattr(cls, name).__annotations__
        return handler

    names = [name for name in vars(cls) if not name.startswith("_")]
    return type(f"Waiting{cls.__name__}", (cls,), {name: waits(name) for name in names})


Waiting = _waiting(Inline)


@asynccontextmanager
async def serving(impl: object) -> AsyncIterator[tuple[TcpListener, kubrpc.Server]]:
    server = kubrpc.Server(drain_timeout=2)
    server.register(Attack, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        assert isinstance(listener, TcpListener)
        yield listener, server


async def one_read(listener: TcpListener, calls: list[tuple[str, dict[str, object]]]) -> dict[int, tuple[int, bytes]]:
    """Send `calls` in one write (one read on the server), then a last call; the answers by stream id.

    Answers of one read come back in the order the calls end: once the last call's is in, every call of
    the read that ended has answered (so a missing one never answers).
    """
    host, port = listener.url.removeprefix("tcp://").rsplit(":", 1)
    async with AsyncExitStack() as stack:
        raw: RawClient = await raw_opener(stack, host, int(port), skip_settings=True)()
        batch = [encode_request(2 * i + 1, f"Attack/{m}", orjson.dumps(a)) for i, (m, a) in enumerate(calls)]
        last = 2 * len(calls) + 1
        await raw.send(b"".join(batch) + encode_request(last, "Attack/method_name", b"{}"))
        answers: dict[int, tuple[int, bytes]] = {}
        while last not in answers:
            frame = await raw.frame()
            answers[frame.stream] = (frame.type, frame.payload)
        del answers[last]
        return answers


# -- a handler that fools the bytecode check ---------------------------------------------------------------------


class _CompiledAsyncFunction:
    """What Cython (and Nuitka) make of an `async def`: function-like, with a __code__ that has no bytecode of
    the body, so inspect.iscoroutinefunction() holds but the body (which may await) cannot be read."""

    def __init__(self, body: Callable[..., Any]) -> None:
        async def stub(self: object, name: str) -> str:  # its signature, not its body
            return name

        self._body = body
        self.__name__ = body.__name__
        self.__qualname__ = body.__qualname__
        self.__code__ = stub.__code__
        self.__defaults__ = None
        self.__kwdefaults__ = None
        self.__annotations__ = {"name": str, "return": str}

    def __get__(self, instance: object, owner: type | None = None) -> object:
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._body(*args, **kwargs)


class Greeter(Protocol):
    async def greet(self, name: str) -> str: ...


async def _greet_after_waiting(self: object, name: str) -> str:
    await asyncio.sleep(0.01)
    return f"hello {name}"


class CompiledGreeter:
    greet = _CompiledAsyncFunction(_greet_after_waiting)


async def test_a_compiled_handler_that_waits_is_not_run_inline() -> None:
    """A Cython-compiled `async def` that awaits was taken for one that never waits: every call was INTERNAL."""
    impl = CompiledGreeter()
    assert inspect.iscoroutinefunction(impl.greet)  # registered as `async def`
    server = kubrpc.Server()
    server.register(Greeter, impl)
    assert not server.runs_inline("Greeter/greet")
    async with server.serve("tcp://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        assert await channel.stub(Greeter, timeout=5).greet("ann") == "hello ann"


class GreeterImpl:
    async def greet(self, name: str) -> str:
        return name


async def test_a_mock_implementation_registers_and_serves() -> None:
    """create_autospec() of an implementation (a test double) made register() raise TypeError from dis."""
    impl = create_autospec(GreeterImpl, instance=True)
    impl.greet.return_value = "from the mock"
    server = kubrpc.Server()
    server.register(Greeter, impl)
    assert not server.runs_inline("Greeter/greet")
    async with server.serve("tcp://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        assert await channel.stub(Greeter, timeout=5).greet("ann") == "from the mock"
    impl.greet.assert_awaited_once_with(name="ann")


def test_the_bytecode_check_sees_through_no_await_it_cannot_read() -> None:
    """What runs inline: `async def` functions and methods without await; anything it cannot read runs in a task."""

    async def plain(self: object) -> str:
        return ""

    async def nested(self: object) -> str:
        async def inner() -> None:
            await asyncio.sleep(0)  # its own code: calling `nested` does not wait for it

        inner().close()
        return ""

    async def comprehension(self: object) -> str:
        return "".join([await asyncio.sleep(0, "") for _ in range(1)])

    async def async_for(self: object) -> str:
        return "".join([str(x) async for x in _numbers()])

    async def in_fstring(self: object) -> str:
        return f"{await asyncio.sleep(0, '')}"

    inline = {"plain": plain, "nested": nested}
    waits = {"comprehension": comprehension, "async_for": async_for, "in_fstring": in_fstring}
    import functools

    from kubrpc.server import _never_waits

    for name, fn in inline.items():
        assert _never_waits(fn), name
        assert _never_waits(types.MethodType(fn, object())), name
        assert _never_waits(staticmethod(fn).__get__(None, object)), name
        assert _never_waits(classmethod(fn).__get__(None, object)), name
    for name, fn in waits.items():
        assert not _never_waits(fn), name
    for other in (
        functools.partial(plain, None),
        lambda: plain(None),  # a sync def returning a coroutine
        types.MethodType(_CompiledAsyncFunction(_greet_after_waiting), object()),
        _CompiledAsyncFunction(_greet_after_waiting),
        create_autospec(GreeterImpl, instance=True).greet,
    ):
        assert not _never_waits(other), other


async def _numbers() -> AsyncIterator[int]:
    yield 1


# -- inline calls answer as calls with a task of their own ---------------------------------------------------------


_SAME_ANSWER: list[tuple[str, dict[str, object]]] = [
    ("fail_rpc", {}),
    ("fail_value", {}),
    ("fail_cancelled", {}),
    ("fail_stop", {}),
    ("fail_generator_exit", {}),
    ("fail_timeout", {}),
    ("method_name", {}),
    ("moved_on", {}),
    ("failed_after", {}),
    ("spawn", {}),
    ("cancel_own_task", {}),
]


async def test_inline_calls_answer_as_calls_with_a_task_of_their_own() -> None:
    answers = {}
    for impl in (Inline(), Waiting()):
        async with serving(impl) as (listener, server):
            assert server.runs_inline("Attack/fail_rpc") is (type(impl) is Inline)
            async with kubrpc.connect(listener.url) as channel:
                stub = channel.stub(Attack, timeout=5)
                seen = []
                for name, args in _SAME_ANSWER:
                    try:
                        seen.append(await getattr(stub, name)(**args))
                    except kubrpc.RpcError as exc:
                        seen.append(f"{exc.code.name}: {exc.message}")
            answers[type(impl).__name__] = seen
            assert server._pending_bytes == 0
    assert answers["Inline"] == answers["WaitingInline"]
    assert answers["Inline"][:3] == ["NOT_FOUND: no such thing", "INTERNAL: internal error", "INTERNAL: internal error"]


async def test_a_call_that_cancels_its_task_does_not_cancel_the_calls_after_it() -> None:
    """One call cancelled the stand-in task that the next inline calls of the read shared: they saw a task being
    cancelled, and one whose handler raised CancelledError was taken for a cancelled call and never answered."""
    calls: list[tuple[str, dict[str, object]]] = [
        ("cancel_own_task", {}),
        ("cancelling", {}),
        ("fail_cancelled", {}),
        ("cancelling", {}),
    ]
    for impl in (Inline(), Waiting()):
        async with serving(impl) as (listener, _):
            answers = await one_read(listener, calls)
            assert sorted(answers) == [1, 3, 5, 7], f"{type(impl).__name__}: calls left unanswered"
            assert answers[1] == (FrameType.RESPONSE, b'"cancelled"')
            assert answers[3] == answers[7] == (FrameType.RESPONSE, b'"0"')
            assert answers[5][0] == FrameType.ERROR and b"internal" in answers[5][1]


async def test_done_callbacks_on_a_calls_task_run_when_it_ends_and_do_not_pile_up() -> None:
    """A handler that adds a done callback to its task (cleanup when the call ends) saw it run only at shutdown,
    and the callbacks of every inline call piled up on the stand-in task meanwhile."""
    for impl in (Inline(), Waiting()):
        _calls_ended.clear()
        async with serving(impl) as (listener, _), kubrpc.connect(listener.url) as channel:
            stub = channel.stub(Attack, timeout=5)
            assert await stub.on_task_done("first") == "first"
            await wait_until(lambda: _calls_ended == ["first"])
            await asyncio.gather(*(stub.on_task_done(str(i)) for i in range(50)))
            await one_read(listener, [("on_task_done", {"tag": "x"})] * 50)
            await wait_until(lambda: len(_calls_ended) == 101)
            if isinstance(impl, Inline):
                stand_in = listener.inline._stand_in
                assert stand_in is None or not stand_in._callbacks


async def test_no_task_is_left_behind_by_inline_calls(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the calls did to the stand-in task (cancelled it, hung callbacks on it), serve() ends them all."""
    before = asyncio.all_tasks()
    for _ in range(2):
        async with serving(Inline()) as (listener, _):
            calls: list[tuple[str, dict[str, object]]] = [("cancel_own_task", {}), ("on_task_done", {"tag": "t"})]
            await one_read(listener, calls * 3)
            await one_read(listener, [("spawn", {})])
            await wait_until(lambda: not _background)
    assert asyncio.all_tasks() == before
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    async with serving(Inline()):  # a listener that never ran a call inline
        pass
    assert asyncio.all_tasks() == before


def test_stand_in_tasks_end_with_each_event_loop() -> None:
    """Two event loops in turn (the stock one, then uvloop): each listener's stand-in task ends with its serve()."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> set[asyncio.Task[Any]]:
        async with serving(Inline()) as (listener, _), serving(Inline()) as (other, _):
            for url in (listener.url, other.url):
                async with kubrpc.connect(url) as channel:
                    stub = channel.stub(Attack, timeout=5)
                    assert await stub.cancel_own_task() == "cancelled"
                    assert await stub.cancelling() == "0"
                    assert await stub.on_task_done("t") == "t"
                    assert await stub.method_name() == "method_name"
            assert listener.inline is not other.inline
        current = asyncio.current_task()
        return {task for task in asyncio.all_tasks() if task is not current}

    assert asyncio.run(main()) == set()
    assert uvloop.run(main()) == set()
    assert asyncio.run(main()) == set()


async def test_a_flood_of_inline_calls_is_answered_and_holds_nothing_after() -> None:
    """10,000 calls in one write: each answered, none counted as running, no request bytes held after."""
    async with serving(Inline()) as (listener, server):
        answers = await one_read(listener, [("cancelling", {})] * 10_000)
        assert len(answers) == 10_000 and set(answers.values()) == {(FrameType.RESPONSE, b'"0"')}
        assert server._pending_bytes == 0 and listener.active_calls == 0
        async with kubrpc.connect(listener.url) as channel:  # and everyone else is still served
            assert await channel.stub(Attack, timeout=5).method_name() == "method_name"


def test_what_runs_inline() -> None:
    """Only a unary handler without await, on a server without interceptors (metrics are one), with no method
    timeout of its own."""

    class Timed(Protocol):
        @kubrpc.method(timeout=5)
        async def timed(self) -> str: ...

        async def untimed(self) -> str: ...

    class TimedImpl:
        async def timed(self) -> str:
            return ""

        async def untimed(self) -> str:
            return ""

    server = kubrpc.Server()
    server.register(Timed, TimedImpl())
    assert not server.runs_inline("Timed/timed") and server.runs_inline("Timed/untimed")
    assert not server.runs_inline("Timed/unknown")
    metered = kubrpc.Server(metrics=True)
    metered.register(Timed, TimedImpl())
    assert not metered.runs_inline("Timed/untimed")
