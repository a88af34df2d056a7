"""A fault-injecting TCP proxy on 127.0.0.1 for the test suite: latency, blackhole, resets.

    async with FaultProxy(upstream_port) as proxy:       # forwards 127.0.0.1:proxy.port -> 127.0.0.1:upstream_port
        proxy.mode = "accept_then_reset"                 # applies to connections accepted from now on
        ... proxy.accepted ...                           # connections accepted so far

Modes: "forward" (with `latency` seconds added to every chunk each way), "blackhole" (accept, read and
discard everything, never connect upstream, never answer), "reset_after" (forward until `reset_after`
bytes from the client have passed, or `reset_after_response` bytes from the server, then reset both sides),
"accept_then_reset" (accept, then reset at once, before reading anything), "half_close" (forward the
client's bytes, but send the client EOF once `reset_after_response` bytes of the answer have
passed, and read on). `chunk` > 0 forwards at most that many bytes per write each way (1: byte by byte);
`rate` > 0 limits each direction of each connection to that many bytes per second.
With `upstream_port=None` only the modes that never forward make sense.
A mode applies to connections accepted after it is set; `drop()` resets the ones open now.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Literal, Self

Mode = Literal["forward", "blackhole", "reset_after", "accept_then_reset", "half_close"]

__all__ = ("FaultProxy", "Mode")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """An asyncio TCP proxy whose faults can be switched while it runs."""

    def __init__(
        self,
        upstream_port: int | None = None,
        *,
        mode: Mode = "forward",
        latency: float = 0.0,
        reset_after: int | None = 0,
        reset_after_response: int | None = None,
        chunk: int = 0,
        rate: float = 0.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.mode: Mode = mode
        self.latency = latency
        self.reset_after = reset_after
        self.reset_after_response = reset_after_response
        self.chunk = chunk
        self.rate = rate
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """host:port of the proxy."""
        return f"127.0.0.1:{self.port}"

    def drop(self) -> None:
        """Reset every connection open now (new ones get the current mode)."""
        for writer in list(self._writers):
            _reset(writer)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, self.mode)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # CancelledError: the proxy is closing (asyncio would log a handler task that ends cancelled)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: Mode) -> None:
        if mode == "accept_then_reset":
            _reset(writer)
            return
        if mode == "blackhole" or self.upstream_port is None:
            while await reader.read(65536):
                pass
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(up_writer)
        limit = self.reset_after if mode == "reset_after" else None
        back = self.reset_after_response if mode in ("reset_after", "half_close") else None
        try:
            upstream = asyncio.create_task(self._pipe(up_reader, writer, back))
            downstream = asyncio.create_task(self._pipe(reader, up_writer, limit))
            try:
                pending = {upstream, downstream}
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if not task.result():
                            continue
                        if mode == "half_close" and task is upstream:
                            with contextlib.suppress(OSError):
                                writer.write_eof()  # the client reads EOF; its own bytes still go upstream
                            continue
                        _reset(writer)
                        _reset(up_writer)
                        return
            finally:
                if not downstream.done():
                    downstream.cancel()
                await asyncio.gather(downstream, return_exceptions=True)
                if not upstream.done():
                    upstream.cancel()
                await asyncio.gather(upstream, return_exceptions=True)
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> bool:
        """Copy reader to writer until EOF (False) or until `limit` bytes have passed (True: reset now)."""
        passed = 0
        while True:
            chunk = await reader.read(self.chunk or 65536)
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return False
            if limit is not None and passed + len(chunk) >= limit:
                writer.write(chunk[: limit - passed])
                await writer.drain()
                return True
            passed += len(chunk)
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.rate:
                await asyncio.sleep(len(chunk) / self.rate)
            writer.write(chunk)
            await writer.drain()
