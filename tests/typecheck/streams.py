"""What mypy checks of stream stubs: tests/test_typecheck.py runs `mypy --strict` on this file.

A line that ends in `# E: CODE` must get exactly that mypy error; every other line must pass. The file is
only type-checked, never run. A stub is typed as its Protocol: a stream of results is an AsyncIterator to
read with `async for` (not awaited), a client stream is awaited and takes an AsyncIterable.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

import kubrpc


class Feed(Protocol):
    def ticks(self, n: int) -> AsyncIterator[int]: ...

    async def total(self, values: AsyncIterable[int]) -> int: ...

    def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]: ...


class FeedImpl:
    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, values: AsyncIterable[int]) -> int:
        return sum([v async for v in values])

    async def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]:
        async for w in words:
            yield w.upper()


class WrongMessages:
    async def ticks(self, n: int) -> AsyncIterator[str]:
        yield str(n)

    async def total(self, values: AsyncIterable[int]) -> int:
        return 0

    async def chat(self, words: AsyncIterable[str]) -> AsyncIterator[str]:
        yield ""


async def words() -> AsyncIterator[str]:
    yield "a"


async def use(channel: kubrpc.Channel) -> None:
    feed = channel.stub(Feed)
    async for tick in feed.ticks(3):
        number: int = tick
        del number
    total: int = await feed.total(_ints())
    async for word in feed.chat(words()):
        text: str = word
        del text
    del total
    await feed.ticks(3)  # E: misc
    async for bad in feed.total(_ints()):  # E: attr-defined
        del bad
    await feed.total([1, 2])  # E: arg-type
    async for t in feed.ticks("3"):  # E: arg-type
        t.upper()  # E: attr-defined


async def _ints() -> AsyncIterator[int]:
    yield 1


def implementations() -> None:
    good: Feed = FeedImpl()
    wrong: Feed = WrongMessages()  # E: assignment
    del good, wrong
