"""A TCP call's handler starts where its request is read (transports/_eager.py): still inside its own task.

Each test calls over a real socket and checks what a handler sees, so that running the first step early
changes nothing a handler can observe: its task, timeouts and cancel scopes, context variables, and answers
that come back whatever order the handlers finish in.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Protocol

import anyio
import pytest
from rawtcp import RawClient, raw_opener

import kubrpc
from kubrpc.status import Status
from kubrpc.transports._eager import start_eager
from kubrpc.transports._frames import PREFACE, FrameType, encode_request

pytestmark = pytest.mark.anyio

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("_seen", default="unset")


class Probe(Protocol):
    async def task_name(self) -> str: ...

    async def task_name_after_waiting(self) -> str: ...

    async def timed(self, seconds: float) -> str: ...

    async def scoped(self) -> str: ...

    async def set_var(self, value: str) -> str: ...

    async def get_var(self) -> str: ...

    @kubrpc.method(timeout=0.2)
    async def own_timeout(self) -> str: ...

    async def boom(self) -> str: ...


class ProbeImpl:
    async def task_name(self) -> str:  # no await: run inline, in the stand-in task
        task = asyncio.current_task()
        assert task is not None, "a handler without await still finds a current task"
        with anyio.CancelScope():  # noqa: ASYNC100  (enough for anyio: it needs a current task)
            return task.get_name()

    async def task_name_after_waiting(self) -> str:
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        return task.get_name()

    async def timed(self, seconds: float) -> str:
        try:
            async with asyncio.timeout(seconds):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out"
        return "slept"

    async def scoped(self) -> str:
        with anyio.move_on_after(0.05) as scope:
            await anyio.sleep(10)
        return "cancelled" if scope.cancelled_caught else "not cancelled"

    async def set_var(self, value: str) -> str:
        before = _seen.get()
        _seen.set(value)
        return before

    async def get_var(self) -> str:
        return _seen.get()

    async def own_timeout(self) -> str:
        await asyncio.sleep(10)
        return "late"

    async def boom(self) -> str:
        raise RuntimeError("secret")


@pytest.fixture
async def probe_url() -> AsyncIterator[str]:
    server = kubrpc.Server()
    impl: Probe = ProbeImpl()
    server.register(Probe, impl)
    async with server.serve("tcp://127.0.0.1:0") as listener:
        yield listener.url


async def test_a_handler_runs_in_its_own_task_with_timeouts_and_cancel_scopes(probe_url: str) -> None:
    async with kubrpc.connect(probe_url) as channel:
        probe = channel.stub(Probe, timeout=5)
        names = await asyncio.gather(*(probe.task_name_after_waiting() for _ in range(20)))
        assert len(set(names)) == 20  # a task each, not one shared by the connection
        assert set(await asyncio.gather(*(probe.task_name() for _ in range(20)))) == {"kubrpc: calls that never wait"}
        assert await probe.timed(0.05) == "timed out"
        assert await probe.scoped() == "cancelled"
        with pytest.raises(kubrpc.RpcError) as caught:
            await probe.own_timeout()
        assert caught.value.code is Status.DEADLINE_EXCEEDED


async def test_context_variables_do_not_leak_between_calls_on_one_connection(probe_url: str) -> None:
    async with kubrpc.connect(probe_url) as channel:
        probe = channel.stub(Probe, timeout=5)
        assert await probe.set_var("first") == "unset"
        assert await probe.get_var() == "unset"
        results = await asyncio.gather(*(probe.set_var(str(i)) for i in range(50)))
        assert results == ["unset"] * 50


async def test_answers_of_one_read_come_back_whatever_order_the_handlers_finish_in(probe_url: str) -> None:
    host, port = probe_url.removeprefix("tcp://").rsplit(":", 1)
    async with AsyncExitStack() as stack:
        raw: RawClient = await raw_opener(stack, host, int(port), skip_settings=True)(PREFACE)  # type: ignore[assignment]
        batch = b"".join(
            encode_request(s, path, body)
            for s, path, body in (
                (1, "Probe/timed", b'{"seconds": 0.1}'),  # waits: answered after the others
                (3, "Probe/get_var", b"{}"),  # finishes in its first step
                (5, "Probe/boom", b"{}"),  # fails in its first step
                (7, "Probe/set_var", b'{"value": "x"}'),
            )
        )
        await raw.send(batch)
        frames = [await raw.frame() for _ in range(4)]
        by_stream = {f.stream: f for f in frames}
        assert [f.stream for f in frames][-1] == 1
        assert by_stream[3].payload == b'"unset"' and by_stream[7].payload == b'"unset"'
        assert by_stream[5].type == FrameType.ERROR and b"secret" not in by_stream[5].payload
        assert by_stream[1].payload == b'"timed out"'


async def test_start_eager_inside_a_task_starts_on_the_next_turn_instead() -> None:
    ran: list[str] = []

    async def step() -> str:
        ran.append("ran")
        return "done"

    task = start_eager(asyncio.get_running_loop(), step())  # a task is running (this test): no early step
    assert ran == [] and not task.done()
    assert await task == "done"


async def test_start_eager_runs_the_first_step_now_from_a_callback() -> None:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[tuple[bool, str | None]] = loop.create_future()

    async def handler() -> str | None:
        task = asyncio.current_task()
        return None if task is None else task.get_name()

    def callback() -> None:
        task = start_eager(loop, handler())
        started.set_result((task.done(), task.result() if task.done() else None))

    loop.call_soon(callback)
    done, name = await started
    assert done and name is not None  # finished in the callback, inside its own task
