"""tcp: length-prefixed binary frames, many calls multiplexed on one connection (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

import anyio

from kubrpc._limits import DEFAULT_MAX_MESSAGE_SIZE
from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError

from ._tcp_base import format_host
from ._tcp_client import TcpConnection
from ._tcp_server import TcpListener, _ServerConnection

if TYPE_CHECKING:
    from kubrpc.interfaces import ServerCore

__all__ = ("TcpConnection", "TcpListener", "TcpTransport")


class TcpTransport:
    """The `tcp` transport: `tcp://HOST:PORT`; TLS with `ssl=` (a server or a client SSLContext, by side).

    `server_hostname` is the name a client checks the server's certificate against (default: the endpoint's
    host, which is a pod IP under Kubernetes: set it to the Service's DNS name there).

    A client's connection is ready once the server has acknowledged it (its first frame), within
    `connect_timeout`; any failure before that is a connect failure (NotDeliveredError). A server closes a
    connection that has not sent the preface within `preface_timeout` seconds, and one whose frame (over 1 KiB)
    has begun arriving and is not complete within `frame_timeout` seconds.

    Stream calls of all three kinds travel as DATA frames with per-stream, credit-based flow control (a window of
    256 KiB each way, granted back as the application reads): docs/protocol.md, "Streams".

    `sock=` (server side) serves an already bound socket instead of binding host:port, as the workers of
    `Server.run(workers=N)` share their supervisor's; the listener takes it over and closes it when done.
    """

    attachments = True
    """Carries bytes values as raw attachments after the JSON (docs/protocol.md, "Attachments"), once the
    server says it reads them: a Channel's stubs of methods with bytes values encode them so."""

    def __init__(
        self,
        *,
        max_message_size: int | None = None,
        connect_timeout: float = 5.0,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        preface_timeout: float = 10.0,
        frame_timeout: float = 30.0,
        sock: socket.socket | None = None,
    ) -> None:
        if keepalive_interval is not None and not keepalive_interval > 0:
            raise ValueError("keepalive_interval must be > 0 or None")
        if not preface_timeout > 0:
            raise ValueError("preface_timeout must be > 0")
        if not frame_timeout > 0:
            raise ValueError("frame_timeout must be > 0")
        self.preface_timeout = preface_timeout
        self.frame_timeout = frame_timeout
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.keepalive = None if keepalive_interval is None else (keepalive_interval, keepalive_timeout)
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.sock = sock

    async def connect(self, endpoint: Endpoint, /) -> TcpConnection:
        """Open a connection to `endpoint`; NotDeliveredError if it cannot be reached."""
        loop = asyncio.get_running_loop()
        limit = self.max_message_size or DEFAULT_MAX_MESSAGE_SIZE
        conn: TcpConnection | None = None
        try:
            with anyio.fail_after(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: TcpConnection(endpoint, limit, self.keepalive),
                    endpoint.host,
                    endpoint.port,
                    ssl=self.ssl,
                    server_hostname=(self.server_hostname or endpoint.host) if self.ssl is not None else None,
                )
                # Not ready until the server acknowledges the preface: an endpoint that accepts and then
                # resets (a sidecar in front of a crashed app) fails here, as a refused connection does.
                await conn.acknowledged()
        except TimeoutError:
            await _discard(conn)
            raise NotDeliveredError(f"timed out connecting to {endpoint.address}") from None
        except OSError as exc:
            raise NotDeliveredError(f"cannot connect to {endpoint.address}: {exc.strerror or exc}") from None
        except BaseException:
            await _discard(conn)
            raise
        return conn

    @asynccontextmanager
    async def listen(self, server: ServerCore, host: str, port: int, /) -> AsyncIterator[TcpListener]:
        """Serve `server` on host:port until the block exits, then go away and drain."""
        loop = asyncio.get_running_loop()
        limit = self.max_message_size or server.limits.max_message_size
        listener = TcpListener(server, limit, self.preface_timeout, self.frame_timeout)
        where: dict[str, Any] = {"host": host, "port": port} if self.sock is None else {"sock": self.sock}
        aserver = await loop.create_server(
            lambda: _ServerConnection(listener),
            **where,
            ssl=self.ssl,
            ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT if self.ssl is not None else None,
        )
        sockname = aserver.sockets[0].getsockname()
        listener.url = f"tcp://{format_host(sockname[0])}:{sockname[1]}"
        try:
            yield listener
        finally:
            aserver.close()
            with anyio.CancelScope(shield=True):
                await listener.drain(server.limits.drain_timeout)
                await listener.cancel_remaining()
                await aserver.wait_closed()


# A client that connects and never completes the TLS handshake holds a socket for at most this long.
_TLS_HANDSHAKE_TIMEOUT = 10.0


async def _discard(conn: TcpConnection | None) -> None:
    """Drop a connection that never became ready."""
    if conn is not None:
        if conn.transport is not None:
            conn.transport.abort()
        await conn.aclose()
