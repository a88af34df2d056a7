"""Many deadlines, one timer: cheaper than a timer (or a cancel scope) per call on the hot path."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class Deadlines:
    """Calls `on_expire(key)` once a key's deadline (event-loop time) passes, unless it was discarded first.

    Calls of one stub share a timeout, so deadlines mostly arrive in order: the one timer is armed
    for the earliest deadline and re-armed only when it fires, or when an earlier deadline arrives.
    """

    __slots__ = ("_at", "_loop", "_now", "_on_expire", "_timer", "_timer_at", "forget")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[int], None]) -> None:
        self._loop = loop
        # The loop's clock; the stock loop's is time.monotonic, called through a Python method: skip that.
        self._now = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        self._on_expire = on_expire
        self._at: dict[int, float] = {}
        #: forget(key, None): discard() without a Python frame, for hot paths (the deadline, or None).
        self.forget: Callable[[int, None], float | None] = self._at.pop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, key: int, timeout: float) -> None:
        """Expire `key` in `timeout` seconds."""
        at = self._now() + timeout
        self._at[key] = at
        if at < self._timer_at:
            self._arm(at)

    def add_at(self, key: int, at: float) -> None:
        """Expire `key` at event-loop time `at` (at once if it has passed)."""
        self._at[key] = at
        if at < self._timer_at:
            self._arm(at)

    def discard(self, key: int) -> None:
        """Forget `key` (its call finished in time)."""
        self._at.pop(key, None)

    def close(self) -> None:
        """Forget everything and stop the timer."""
        self._at.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._fire)
        self._timer_at = at

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time()
        expired = [key for key, at in self._at.items() if at <= now]
        for key in expired:
            del self._at[key]
        if self._at:
            self._arm(min(self._at.values()))
        for key in expired:
            self._on_expire(key)
