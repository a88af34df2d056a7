"""Stream services the streaming tests serve over every transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import kubrpc
from kubrpc import RpcError, Status


@dataclass
class Event:
    """One event of a watch."""

    seq: int
    kind: str


@kubrpc.interface(name="test.Feed")
class Feed(Protocol):
    def ticks(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterable[int]) -> int: ...

    def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]: ...

    def fail_after(self, n: int, code: str) -> AsyncIterator[int]: ...

    def forever(self, size: int) -> AsyncIterator[bytes]: ...

    async def count(self, values: AsyncIterable[bytes], *, stop_after: int = -1) -> int: ...

    def watch(self, kinds: list[str]) -> AsyncIterator[Event]: ...

    async def add(self, a: int, b: int) -> int: ...


class FeedImpl:
    def __init__(self) -> None:
        self.cancelled = 0
        self.finished = 0
        self.started = 0
        self.running = 0
        self.sent = 0

    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, values: AsyncIterable[int]) -> int:
        return sum([v async for v in values])

    async def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]:
        async for w in words:
            yield w.upper()

    async def fail_after(self, n: int, code: str) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        if code == "crash":
            raise ValueError("secret detail")
        raise RpcError(Status[code.upper()], f"failed after {n}")

    async def forever(self, size: int) -> AsyncIterator[bytes]:
        self.started += 1
        self.running += 1
        try:
            while True:
                yield b"x" * size
                self.sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
            self.finished += 1

    async def count(self, values: AsyncIterable[bytes], *, stop_after: int = -1) -> int:
        n = 0
        async for _ in values:
            n += 1
            if n == stop_after:
                break
        return n

    async def watch(self, kinds: list[str]) -> AsyncIterator[Event]:
        for seq, kind in enumerate(kinds):
            yield Event(seq, kind)

    async def add(self, a: int, b: int) -> int:
        total = a + b
        if not -(2**63) <= total < 2**63:  # a sum past int64 cannot be sent back: say so, as a service would
            raise RpcError(Status.OUT_OF_RANGE, "the sum does not fit in 64 bits")
        return total
