"""A wake-up for whoever waits until a connection has no call in flight (Connection.wait_idle)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ("IdleSignal",)


class IdleSignal:
    """`wait(busy)` returns once `busy()` is False; the owner calls `notify()` whenever its last call ends.

    Costs nothing until someone waits: the event exists only then.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    async def wait(self, busy: Callable[[], bool]) -> None:
        """Return once `busy()` is False (checked again after every notify())."""
        while busy():
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()

    def notify(self) -> None:
        """The owner's in-flight count reached zero: wake the waiters, who check again."""
        event = self._event
        if event is not None:
            self._event = None
            event.set()
