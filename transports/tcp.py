"""tcp: length-prefixed binary frames, many calls multiplexed on one connection (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import TYPE_CHECKING, cast

import anyio
import orjson

from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError, ProtocolError, RpcError
from kubrpc.status import Status

from ._deadlines import Deadlines
from ._frames import (
    FLAG_ACK,
    MAX_STREAM_ID,
    PREFACE,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_goaway,
    encode_metadata,
    encode_request,
    parse_goaway,
    parse_request,
)

if TYPE_CHECKING:
    from kubrpc.server import Server

__all__ = ("TcpConnection", "TcpListener", "TcpTransport")

log = logging.getLogger("kubrpc.tcp")

_REQUEST = FrameType.REQUEST
_RESPONSE = FrameType.RESPONSE
_ERROR = FrameType.ERROR
_CANCEL = FrameType.CANCEL
_PING = FrameType.PING
_GOAWAY = FrameType.GOAWAY


class TcpTransport:
    """The `tcp` transport: `tcp://HOST:PORT`; TLS with `ssl=` (a server or a client SSLContext, by side).

    `server_hostname` is the name a client checks the server's certificate against (default: the endpoint's
    host, which is a pod IP under Kubernetes: set it to the Service's DNS name there).
    """

    def __init__(
        self,
        *,
        max_message_size: int | None = None,
        connect_timeout: float = 5.0,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        if keepalive_interval is not None and not keepalive_interval > 0:
            raise ValueError("keepalive_interval must be > 0 or None")
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.keepalive = None if keepalive_interval is None else (keepalive_interval, keepalive_timeout)
        self.ssl = ssl
        self.server_hostname = server_hostname

    async def connect(self, endpoint: Endpoint, /) -> TcpConnection:
        """Open a connection to `endpoint`; NotDeliveredError if it cannot be reached."""
        loop = asyncio.get_running_loop()
        limit = self.max_message_size or _default_limit()
        try:
            with anyio.fail_after(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: TcpConnection(endpoint, limit, self.keepalive),
                    endpoint.host,
                    endpoint.port,
                    ssl=self.ssl,
                    server_hostname=(self.server_hostname or endpoint.host) if self.ssl is not None else None,
                )
        except TimeoutError:
            raise NotDeliveredError(f"timed out connecting to {endpoint.address}") from None
        except OSError as exc:
            raise NotDeliveredError(f"cannot connect to {endpoint.address}: {exc.strerror or exc}") from None
        return conn

    @asynccontextmanager
    async def listen(self, server: Server, host: str, port: int, /) -> AsyncIterator[TcpListener]:
        """Serve `server` on host:port until the block exits, then go away and drain."""
        loop = asyncio.get_running_loop()
        listener = TcpListener(server, self.max_message_size or server.max_message_size)
        aserver = await loop.create_server(
            lambda: _ServerConnection(listener),
            host,
            port,
            ssl=self.ssl,
            ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT if self.ssl is not None else None,
        )
        sockname = aserver.sockets[0].getsockname()
        listener.url = f"tcp://{_format_host(sockname[0])}:{sockname[1]}"
        try:
            yield listener
        finally:
            aserver.close()
            with anyio.CancelScope(shield=True):
                await listener.drain(server.drain_timeout)
                await listener.cancel_remaining()
                await aserver.wait_closed()


# A client that connects and never completes the TLS handshake holds a socket for at most this long.
_TLS_HANDSHAKE_TIMEOUT = 10.0


def _default_limit() -> int:
    from kubrpc.server import DEFAULT_MAX_MESSAGE_SIZE

    return DEFAULT_MAX_MESSAGE_SIZE


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# How long a draining server waits for clients to close their connections after the last answer.
_LINGER = 1.0

# Frames queued in one event-loop iteration go out in one write, but at most this many at a time,
# so that the peer starts on the first frames while this side is still producing the rest.
_FLUSH_FRAMES = 16  # measured: 4 and 64 were slower at concurrency 64 (benchmarks/bench_unary.py)


def _error_frame(stream: int, error: RpcError) -> bytes:
    return encode_frame(_ERROR, stream, orjson.dumps(error.to_json()))


class _FrameWriter(asyncio.Protocol):
    """Both ends of a connection: writes made in one loop turn go out in one write (at most _FLUSH_FRAMES)."""

    transport: asyncio.Transport | None
    _loop: asyncio.AbstractEventLoop
    _out: list[bytes]

    def write(self, data: bytes) -> None:
        """Queue bytes; everything queued in one event-loop iteration goes out in one write."""
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(data)
        if len(out) >= _FLUSH_FRAMES:
            self._flush()

    def write_now(self, data: bytes) -> None:
        """Send bytes at once: for a frame with nothing queued to batch with, it saves a loop turn."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self.write_now(out[0] if len(out) == 1 else b"".join(out))


class TcpListener:
    """A listening TCP socket and its connections."""

    def __init__(self, server: Server, max_message_size: int) -> None:
        self.server = server
        self.url = ""
        self.max_message_size = max_message_size
        self.connections: set[_ServerConnection] = set()
        self.draining = False
        self._orphans: set[asyncio.Task[None]] = set()
        self._idle: anyio.Event | None = None

    @property
    def active_calls(self) -> int:
        """Calls running now, over all connections."""
        return sum(len(c.calls) for c in self.connections) + len(self._orphans)

    async def drain(self, timeout: float) -> None:
        """Send GOAWAY everywhere, let running calls finish (at most `timeout` s), then close.

        Connections stay open after their last answer until the client closes them (it does once it
        has read the GOAWAY), for at most `_LINGER` s: closing first would reset requests the client
        sent before it read the GOAWAY, and the client could not tell that they never ran.
        """
        self.draining = True
        for conn in list(self.connections):
            conn.go_away("server shutting down")
        with anyio.move_on_after(timeout):
            while self.active_calls:
                await self._changed()
        with anyio.move_on_after(min(timeout, _LINGER)):
            while self.connections:
                await self._changed()
        for conn in list(self.connections):
            conn.close()

    async def _changed(self) -> None:
        self._idle = anyio.Event()
        await self._idle.wait()

    async def cancel_remaining(self) -> None:
        """Cancel the calls still running after drain() and wait until they have ended."""
        tasks = [t for c in self.connections for t in c.calls.values()] + list(self._orphans)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def adopt(self, task: asyncio.Task[None]) -> None:
        """Keep track of a call whose connection is gone, until it has finished cancelling."""
        self._orphans.add(task)
        task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Task[None]) -> None:
        self._orphans.discard(task)
        self.call_finished()

    def call_finished(self) -> None:
        """A call ended or a connection closed: wake drain()."""
        if self._idle is not None:
            self._idle.set()

    def __repr__(self) -> str:
        return f"<TcpListener {self.url} [{len(self.connections)} connections, {self.active_calls} calls]>"


class _ServerConnection(_FrameWriter):
    """One accepted connection: decodes frames and runs each request as a task.

    The hot path uses asyncio directly (a task per call, a timer per deadline, one write per loop
    iteration): benchmarks/bench_unary.py measured anyio's task group and cancel scopes at about
    40 % of the server's CPU per call. Every task is tracked and awaited when the listener closes.
    """

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.dispatch = listener.server.dispatch
        self.max_calls = listener.server.max_concurrent_calls
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(listener.max_message_size + 4096)
        self._preface: bytes | None = b""
        self._last_stream = 0
        self._going_away = False
        self._out: list[bytes] = []
        self.peer = ""  # host:port of the client, for CallInfo.peer
        self._deadlines = Deadlines(self._loop, self._deadline_passed)
        self._expired: set[int] = set()
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{_format_host(peer[0])}:{peer[1]}"
        listener = self.listener
        listener.connections.add(self)
        if listener.draining:
            self.go_away("server shutting down")
        elif len(listener.connections) > listener.server.max_connections:
            log.warning("refusing a connection from %s: over max_connections", self.peer)
            self.go_away("too many connections")
        elif listener.server.idle_timeout is not None:
            self._last_active = self._loop.time()
            self._idle_timer = self._loop.call_later(listener.server.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """Go away from a connection that has had no call for idle_timeout seconds (its client reconnects on demand)."""
        timeout = self.listener.server.idle_timeout
        assert timeout is not None
        idle = self._loop.time() - self._last_active
        if self.calls or idle < timeout:
            self._idle_timer = self._loop.call_later(timeout - idle if not self.calls else timeout, self._check_idle)
            return
        self._idle_timer = None
        self.go_away("idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self._out.clear()
        self._deadlines.close()
        for timer in (self._idle_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        for task in self.calls.values():
            task.cancel()
            self.listener.adopt(task)
        self.listener.call_finished()

    def pause_writing(self) -> None:
        # The peer is not reading its responses: stop reading its requests until it catches up.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._preface is not None:
            self._preface += data
            if len(self._preface) < len(PREFACE):
                if not PREFACE.startswith(self._preface):
                    self._fail("bad preface: not a kubrpc client")
                return
            if not self._preface.startswith(PREFACE):
                self._fail("bad preface: not a kubrpc client")
                return
            data = self._preface[len(PREFACE) :]
            self._preface = None
        try:
            for frame in self._decoder.feed(data):
                self._handle(frame)
        except ProtocolError as exc:
            self._fail(str(exc))

    def _handle(self, frame: Frame) -> None:
        kind, stream = frame.type, frame.stream
        if kind == _REQUEST:
            if stream == 0 or stream in self.calls:
                raise ProtocolError(f"stream id {stream} is zero or already in use")
            request = parse_request(frame.payload)
            if self._going_away:
                self.write(_error_frame(stream, NotDeliveredError("server shutting down")))
                return
            if len(self.calls) >= self.max_calls:
                error = RpcError(Status.RESOURCE_EXHAUSTED, "too many concurrent calls on this connection")
                self.write(_error_frame(stream, error))
                return
            if len(request.body) > self.listener.max_message_size:
                error = RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
                self.write(_error_frame(stream, error))
                return
            if stream > self._last_stream:
                self._last_stream = stream
            if self._idle_timer is not None:
                self._last_active = self._loop.time()
            timeout = request.timeout_ms / 1000 if request.timeout_ms else None
            metadata = request.metadata
            if metadata:  # keys are case-insensitive, as HTTP header names: handlers see them in lower case
                metadata = {k.lower(): v for k, v in metadata.items()}
            self.calls[stream] = self._loop.create_task(
                self._run(stream, request.path, request.body, timeout, metadata)
            )
            if timeout is not None:
                self._deadlines.add(stream, timeout)
        elif kind == _CANCEL:
            running = self.calls.get(stream)
            if running is not None:
                running.cancel()
        elif kind == _PING:
            if not frame.flags & FLAG_ACK:
                self.write(encode_frame(_PING, 0, frame.payload[:64], FLAG_ACK))
        # Unknown frame types, and frames only servers send, are ignored (forward compatibility).

    async def _run(
        self, stream: int, path: str, body: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> None:
        try:
            try:
                result = await self.dispatch(
                    path, body, timeout=timeout, metadata=metadata, peer=self.peer, deadline_enforced=True
                )
                if len(result) > self.listener.max_message_size:
                    raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
                frame = encode_frame(_RESPONSE, stream, result)
            except RpcError as exc:
                frame = _error_frame(stream, exc)
            if len(self.calls) == 1 and not self._out:  # the only call here: nothing to batch with
                self.write_now(frame)
            else:
                self.write(frame)
        except asyncio.CancelledError:
            if stream in self._expired:  # our deadline timer cancelled it
                self.write(_error_frame(stream, RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")))
            # else: cancelled by the client (CANCEL frame) or because the connection is gone: no answer
        finally:
            if self.calls.get(stream) is asyncio.current_task():
                del self.calls[stream]
            self._deadlines.discard(stream)
            self._expired.discard(stream)
            if self._idle_timer is not None:
                self._last_active = self._loop.time()
            self.listener.call_finished()

    def _deadline_passed(self, stream: int) -> None:
        task = self.calls.get(stream)
        if task is not None:
            self._expired.add(stream)
            task.cancel()

    def go_away(self, reason: str) -> None:
        """Tell the client to send no new calls here; running calls still get their answers.

        The connection stays open: later requests are answered as not delivered, and the client
        closes it once it has read the GOAWAY and has nothing pending.
        """
        if not self._going_away:
            self._going_away = True
            self.write(encode_goaway(self._last_stream, reason))
            if not self.listener.draining:  # drain() closes what is left when it ends
                self._linger_timer = self._loop.call_later(_LINGER, self._close_when_quiet)

    def _close_when_quiet(self) -> None:
        """After a GOAWAY: close once the calls are answered, if the client has not closed first."""
        if self.calls:
            self._linger_timer = self._loop.call_later(_LINGER, self._close_when_quiet)
        else:
            self._linger_timer = None
            self.close()

    def close(self) -> None:
        """Close after flushing what was written."""
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        log.info("closing connection from %s: %s", self._peer(), reason)
        self._going_away = True
        self.write(encode_goaway(self._last_stream, reason))
        self.close()
        for task in self.calls.values():
            task.cancel()

    def _peer(self) -> str:
        return self.peer or "?"


class TcpConnection(_FrameWriter):
    """A client connection: calls multiplexed by stream id, answered in any order."""

    def __init__(self, endpoint: Endpoint, max_message_size: int, keepalive: tuple[float, float] | None = None) -> None:
        self.endpoint = endpoint
        self.max_message_size = max_message_size
        self._keepalive = keepalive
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_received = 0.0
        self._ping_sent = False
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._next_stream = 1
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(max_message_size + 4096)
        self._goaway: int | None = None
        self._closed = False
        self._lost: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._deadlines = Deadlines(self._loop, self._deadline_passed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._lost = asyncio.get_running_loop().create_future()
        self.transport.write(PREFACE)
        if self._keepalive is not None:
            self._last_received = self._loop.time()
            self._keepalive_timer = self._loop.call_later(self._keepalive[0], self._check_alive)

    def _check_alive(self) -> None:
        """Keepalive: ping a connection that has been quiet for an interval; close it if no answer comes."""
        assert self._keepalive is not None
        interval, timeout = self._keepalive
        quiet = self._loop.time() - self._last_received
        if self._ping_sent and quiet >= timeout:
            log.warning("closing connection to %s: no answer to a keepalive ping", self.endpoint.address)
            if self.transport is not None:
                self.transport.abort()
            return
        if not self._ping_sent and quiet >= interval:
            self._ping_sent = True
            self.write(encode_frame(_PING, 0, b"kubrpcka"))
            self._keepalive_timer = self._loop.call_later(timeout, self._check_alive)
            return
        self._keepalive_timer = self._loop.call_later(
            interval - quiet if quiet < interval else interval, self._check_alive
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._deadlines.close()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        reason = f"connection to {self.endpoint.address} lost" + (f": {exc}" if exc is not None else "")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RpcError(Status.UNAVAILABLE, reason))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    @property
    def usable(self) -> bool:
        """False once closed or told to go away: new calls must use another connection."""
        return not self._closed and self._goaway is None and self._next_stream < MAX_STREAM_ID

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """Send one call and wait for its answer; cancelling the wait cancels the call on the server."""
        if not self.usable or self.transport is None:
            raise NotDeliveredError(f"connection to {self.endpoint.address} is closed or draining")
        if len(payload) > self.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        stream = self._next_stream
        self._next_stream = stream + 1
        loop = self._loop
        fut: asyncio.Future[Frame] = loop.create_future()
        self._pending[stream] = fut
        if timeout is None:
            timeout_ms = 0
        else:
            self._deadlines.add(stream, timeout)
            timeout_ms = max(1, math.ceil(timeout * 1000))
        request = encode_request(stream, path, payload, timeout_ms, encode_metadata(metadata) if metadata else b"")
        if len(self._pending) == 1 and not self._out:  # nothing in flight to batch with: send now
            self.write_now(request)
        else:
            self.write(request)
        try:
            frame = await fut
        except RpcError as exc:
            if exc.code is Status.DEADLINE_EXCEEDED:
                self._cancel(stream)
            raise
        except BaseException:
            self._cancel(stream)
            raise
        finally:
            self._deadlines.discard(stream)
            del self._pending[stream]
            if self._goaway is not None and not self._pending:
                self._close_transport()
        if frame.type == _RESPONSE:
            return frame.payload
        try:
            body = orjson.loads(frame.payload)
        except orjson.JSONDecodeError:
            body = None
        error = RpcError.from_json(body)
        if error.code is Status.UNAVAILABLE and self._goaway is not None and stream > self._goaway:
            raise NotDeliveredError(error.message)
        raise error

    def _close_transport(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _cancel(self, stream: int) -> None:
        self.write(encode_frame(_CANCEL, stream))

    def _deadline_passed(self, stream: int) -> None:
        fut = self._pending.get(stream)
        if fut is not None and not fut.done():
            fut.set_exception(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))

    def data_received(self, data: bytes) -> None:
        if self._keepalive is not None:
            self._last_received = self._loop.time()
            self._ping_sent = False
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            log.warning("closing connection to %s: %s", self.endpoint.address, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for frame in frames:
            kind = frame.type
            if kind == _RESPONSE or kind == _ERROR:
                fut = self._pending.get(frame.stream)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            elif kind == _GOAWAY:
                self._on_goaway(frame.payload)
            elif kind == _PING and not frame.flags & FLAG_ACK and self.transport is not None:
                self.write(encode_frame(_PING, 0, frame.payload[:64], FLAG_ACK))

    def _on_goaway(self, payload: bytes) -> None:
        try:
            last, reason = parse_goaway(payload)
        except ProtocolError:
            last, reason = 0, "malformed GOAWAY"
        self._goaway = last
        for stream, fut in self._pending.items():
            if stream > last and not fut.done():
                fut.set_exception(NotDeliveredError(f"{self.endpoint.address} is going away: {reason}"))
        if not self._pending:
            self._close_transport()

    async def aclose(self) -> None:
        """Close the connection and wait until the socket is released."""
        self._closed = True
        self._close_transport()
        if self._lost is not None:
            with anyio.CancelScope(shield=True):
                await self._lost

    def __repr__(self) -> str:
        state = "closed" if self._closed else "going away" if self._goaway is not None else "open"
        return f"<TcpConnection {self.endpoint.address} [{state}, {len(self._pending)} in flight]>"
