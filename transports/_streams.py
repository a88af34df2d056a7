"""What every transport's stream calls share: the inbox of one side of a stream."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ("MESSAGE_OVERHEAD", "Inbox")

#: What a message costs beyond its bytes while it waits in an inbox (the bytes object and its queue slot), so
#: that a window in bytes also bounds a stream of tiny messages.
MESSAGE_OVERHEAD = 64


class Inbox:
    """The messages one side of a stream has received and not read yet, then how the stream ended.

    The transport `put()`s each message as it arrives (never blocking: how much may arrive is the sender's
    flow-control window, which the transport widens as messages are read, through `on_read`) and `end()`s it
    once, with the error the stream ended with or None. The reader `get()`s messages in order, then None (or
    the error). It is also the async iterator of a client stream's messages that `ServerCore.dispatch_stream`
    reads. A writer in the same process can wait for `room()` instead of a window kept over the network.
    """

    __slots__ = ("_error", "_items", "_on_read", "_reader", "_writer", "buffered", "ended", "received")

    def __init__(self, on_read: Callable[[int], None] | None = None) -> None:
        self._items: deque[bytes] = deque()
        self._on_read = on_read
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self.buffered = 0
        """Bytes received and not read yet, each message counting MESSAGE_OVERHEAD more."""
        self.ended = False
        """True once end() was called (messages may still wait to be read)."""
        self.received = 0
        """Messages put so far."""

    def put(self, data: bytes) -> None:
        """A message arrived (ignored once the inbox has ended)."""
        if self.ended:
            return
        self._items.append(data)
        self.buffered += len(data) + MESSAGE_OVERHEAD
        self.received += 1
        self._wake_reader()

    def end(self, error: BaseException | None = None) -> None:
        """No message will follow; the reader gets `error` (or None) after the messages already put. First wins."""
        if self.ended:
            return
        self.ended = True
        self._error = error
        self._wake_reader()
        self._wake_writer()

    def abort(self, error: BaseException) -> int:
        """End now, dropping the unread messages: the reader gets `error` next. Returns the bytes dropped."""
        dropped = self.buffered
        self._items.clear()
        self.buffered = 0
        if not self.ended:
            self.end(error)
        else:
            self._error = self._error or error
        self._wake_writer()
        return dropped

    @property
    def waiting(self) -> bool:
        """True while a reader waits in get() for a message that has not arrived."""
        return self._reader is not None

    @property
    def error(self) -> BaseException | None:
        """What the stream ended with, once it has ended with an error."""
        return self._error

    async def get(self) -> bytes | None:
        """The next message; None once the stream ended without error; raises the error it ended with."""
        while not self._items:
            if self.ended:
                if self._error is not None:
                    raise self._error
                return None
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        data = self._items.popleft()
        self.buffered -= len(data) + MESSAGE_OVERHEAD
        if self._on_read is not None:
            self._on_read(len(data))
        self._wake_writer()
        return data

    async def room(self, limit: int) -> None:
        """Wait while `limit` bytes or more are unread (an in-process writer's flow control), or until the end."""
        while self.buffered >= limit and not self.ended:
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> bytes:
        data = await self.get()
        if data is None:
            raise StopAsyncIteration
        return data

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)

    def __repr__(self) -> str:
        state = "ended" if self.ended else "open"
        return f"<Inbox {state} [{len(self._items)} unread, {self.buffered} bytes]>"
