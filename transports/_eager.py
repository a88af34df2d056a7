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
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ("start_eager",)

T = TypeVar("T")

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
