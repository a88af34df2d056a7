"""Start a task whose first step runs at once, where it is created (Python 3.12's eager tasks, and 3.11's stock loop).

A call whose handler never waits then finishes inside the read that brought its request: no trip through the
event loop's queue to start it, none to run its done callbacks, and its answer joins the others of that read in
one write. The task still exists while its first step runs, so `asyncio.current_task()`, `asyncio.timeout()`
and anyio's cancel scopes in a handler behave as in any task: this is not a coroutine driven by hand.

Python 3.12+ has this built in (`asyncio.Task(..., eager_start=True)`). On 3.11 the task is created as usual,
which queues its first step as the last handle of the loop's ready queue; that handle is taken back out and run
now. This needs the stock loop's ready queue (`BaseEventLoop._ready`, unchanged from 3.4 to 3.13) and checks that
the handle taken is this task's step; on any other loop (uvloop), or when a task is running already (a step
cannot run inside another), the task starts on the loop's next turn as usual.

A call that can never wait (`ServerCore.dispatch_inline()`: its handler's code has no await) needs no task at
all: `InlineRunner` runs it to its end at once, as one plain function, in a copy of the current context, as a
task would. Its task would cost more than the rest of the server's work on such a call (measured: 1.5 µs of 5.7
on 3.11). While it runs, `asyncio.current_task()` is a stand-in task shared by such calls, so that code asking
for the current task (anyio's cancel scopes, logging) still finds one.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from enum import Enum
from typing import Any, Final, Literal, TypeVar

__all__ = ("NOT_RUN", "InlineRunner", "NotRun", "start_eager")

T = TypeVar("T")


class _NotRun(Enum):
    NOT_RUN = "NOT_RUN"


NotRun = Literal[_NotRun.NOT_RUN]
NOT_RUN: Final = _NotRun.NOT_RUN
"""What InlineRunner.call() returns when it could not run the call: start a task for it instead."""

if sys.version_info >= (3, 12):

    def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task for `coro` whose first step has run already, if it could (no task is running now)."""
        if asyncio.current_task(loop) is not None:
            return loop.create_task(coro)
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task for `coro` whose first step has run already, if it could (stock loop, no task running now)."""
        task = loop.create_task(coro)
        ready = getattr(loop, "_ready", None)
        if type(ready) is deque and ready:
            handle = ready[-1]
            if getattr(handle._callback, "__self__", None) is task and asyncio.current_task(loop) is None:
                ready.pop()
                handle._run()
        return task


_STAND_IN_NAME = "kubrpc: calls that never wait"  # (compared by identity: Task.set_name() makes another str)


class InlineRunner:
    """Runs calls that never wait (ServerCore.dispatch_inline()) to their end at once, without a task each.

    Each runs in its own copy of the context, with one stand-in task, shared by call after call, entered as
    current. What a call does to "its task" must not reach the next call: a stand-in that was cancelled is
    replaced before the next call, and one given done callbacks ends right after the call (they run then, as
    they would once the call's own task had ended). One per listener.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stand_in: asyncio.Task[None] | None = None
        self._release: asyncio.Future[None] | None = None  # the stand-in waits for it, to end
        self._retired: set[asyncio.Task[None]] = set()  # stand-ins ending, for aclose() to wait for
        self._closed = False

    def call(self, function: Callable[..., T], *args: Any) -> T | NotRun:
        """`function(*args)` now, in a copy of the context, under the stand-in task; NOT_RUN if it cannot be (a
        task is running already, or closed): run the call in a task of its own then."""
        if self._closed:
            return NOT_RUN
        loop = self._loop
        stand_in = self._stand_in
        if stand_in is None or stand_in.cancelling() or stand_in.done():  # new, or a call cancelled "its" task
            stand_in = self._stand_by()
        try:
            _enter_task(loop, stand_in)
        except RuntimeError:  # a task is running: a step cannot run inside another (cheaper than asking first)
            return NOT_RUN
        try:
            return copy_context().run(function, *args)
        finally:
            _leave_task(loop, stand_in)
            # A call waits for "its task" to end, or renamed it (the next call's logs would carry that name): end it
            if stand_in._callbacks or stand_in.get_name() is not _STAND_IN_NAME:
                self._retire()

    def _stand_by(self) -> asyncio.Task[None]:
        """A new stand-in task (the one before it, if any, ends)."""
        if self._stand_in is not None:
            self._retire()
        self._release = release = self._loop.create_future()
        self._stand_in = stand_in = self._loop.create_task(_wait(release), name=_STAND_IN_NAME)
        return stand_in

    def _retire(self) -> None:
        """End the stand-in task (as a call's task ends: with None), on the loop's next turn."""
        stand_in, release = self._stand_in, self._release
        self._stand_in = self._release = None
        if release is not None and not release.done():
            release.set_result(None)
        if stand_in is not None and not stand_in.done():
            self._retired.add(stand_in)
            stand_in.add_done_callback(self._retired.discard)

    async def aclose(self) -> None:
        """Run nothing more; end the stand-in tasks."""
        self._closed = True
        self._retire()
        if self._retired:
            await asyncio.wait(self._retired)


async def _wait(release: asyncio.Future[None]) -> None:
    """The body of a stand-in task: it waits until released (or cancelled)."""
    await release
