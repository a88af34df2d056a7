"""A hand-driven TCP client for the wire tests: raw sockets on 127.0.0.1 that send bytes and read frames."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import anyio.abc
from anyio.abc import SocketStream

from kubrpc.endpoint import Endpoint
from kubrpc.transports._frames import PREFACE, Frame, FrameDecoder, FrameType

__all__ = ("HELLO_SIZE", "RawClient", "Script", "fake_server", "raw_opener")

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HELLO_SIZE = len(PREFACE) + 18  # what a kubrpc client sends first: the preface and its PING


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[Endpoint]:
    """A TCP server on 127.0.0.1 that runs `script` on each connection (and closes it afterwards): a broken or
    hostile server for kubrpc's client, speaking the wire (docs/protocol.md) by hand."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass  # (ended by the test, or by the client: not a failure of the script, nor logged by asyncio)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()


class RawClient:
    """A hand-driven client socket: send bytes, read frames.

    With `skip_settings`, frame() passes over the server's SETTINGS acknowledgements (tests/test_tcp_hardening.py
    checks them); closed() keeps every frame that came before the close.
    """

    def __init__(self, stream: SocketStream, *, skip_settings: bool = False) -> None:
        self.stream = stream
        self.skip_settings = skip_settings
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[Frame] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    def stop_reading(self) -> None:
        """Read nothing more from the socket until the next frame() (anyio reads ahead otherwise)."""
        self.stream._transport.pause_reading()  # type: ignore[attr-defined]

    async def frame(self, timeout: float = 10) -> Frame:
        """The next frame from the server."""
        with anyio.fail_after(timeout):
            while not self.frames:
                received = self.decoder.feed(await self.stream.receive())
                if self.skip_settings:
                    received = [f for f in received if f.type != FrameType.SETTINGS]
                self.frames += received
        return self.frames.pop(0)

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server closed the connection (frames before that are kept)."""
        with anyio.fail_after(timeout):
            while True:
                try:
                    self.frames += self.decoder.feed(await self.stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                    return True


def raw_opener(
    stack: AsyncExitStack, host: str, port: int, *, skip_settings: bool = False
) -> Callable[..., Awaitable[RawClient]]:
    """`await open_raw(preface=PREFACE, rcvbuf=None)`: a RawClient connected to host:port (closed with `stack`),
    which has sent `preface` (b"": nothing) and, if given, set its receive buffer to `rcvbuf` bytes."""

    async def open_raw(preface: bytes = PREFACE, rcvbuf: int | None = None) -> RawClient:
        stream = await stack.enter_async_context(await anyio.connect_tcp(host, port))
        if rcvbuf is not None:
            stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if preface:
            await stream.send(preface)
        return RawClient(stream, skip_settings=skip_settings)

    return open_raw
