"""A lean HTTP/1.1 client for unary calls: keep-alive connections to one endpoint, httptools to parse answers.

The http transport's unary calls are one POST and one answer each. aiohttp's client spent about 80 µs of CPU per
call on them (benchmarks/bench_unary.py), most of it in layers a kubrpc call does not use (cookie jars, redirects,
multidicts, decompression, streams of body chunks). This client does only what a call needs: a connection from a
pool (LIFO, so that the warm ones stay warm and idle ones expire), one request written in one `write()`, the answer
parsed by httptools as it arrives, with the body size checked as it grows. It never follows a redirect, never
decompresses, and never retries: what a failure means is the caller's to decide (HttpConnection.call).

Errors: `ConnectFailed` (nothing was sent: the call was not delivered), `Disconnected` (the connection closed or
reset before the whole answer arrived; `reused` says whether it had carried an answer before, which is the
keep-alive race of a server closing an idle connection), `ReadTimeout` (the whole answer did not come within
`read_timeout` seconds: a server trickling bytes cannot hold a call) and `TooLarge` (the answer's body exceeds the
limit; the connection is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl as ssl_module
from collections import deque
from urllib.parse import quote

import httptools

__all__ = ("ConnectFailed", "Disconnected", "Http1Pool", "ReadTimeout", "Response", "TooLarge", "set_keepalive")

#: What stays as it is in a request path (RFC 3986 pchar, as aiohttp's URLs keep it); the rest is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;="

#: Seconds an idle connection may be reused; under uvicorn's 5 s keep-alive, so that none is reused as it closes.
IDLE_REUSE = 4.0

#: Bytes an answer's head may take (interim 1xx heads included): past it the connection is dropped, so that a head
#: that never ends neither grows httptools' header buffer nor keeps a call without a deadline waiting.
MAX_HEAD = 64 * 1024


class ConnectFailed(OSError):
    """The connection could not be made: nothing was sent."""


class Disconnected(ConnectionError):
    """The connection ended before the whole answer arrived."""

    def __init__(self, message: str, *, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class ReadTimeout(TimeoutError):
    """The whole answer did not arrive within `read_timeout` seconds of the request."""


class TooLarge(Exception):
    """The answer's body is larger than the limit."""


class _Unsolicited(Exception):
    """An answer began when no request was waiting for one."""


class Response:
    """An answer: its status, the one header a kubrpc client reads (`kubrpc-not-started`), and its body."""

    __slots__ = ("body", "not_started", "status")

    def __init__(self, status: int, not_started: bool, body: bytes) -> None:
        self.status = status
        self.not_started = not_started
        self.body = body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    __slots__ = (
        "_body",
        "_framed",
        "_received",
        "_limit",
        "_loop",
        "_not_started",
        "_parser",
        "_pool",
        "_read_timer",
        "_size",
        "_status",
        "_waiter",
        "answered",
        "closed",
        "idle_since",
        "transport",
    )

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._status = 0
        self._not_started = False
        self._framed = False  # the answer says where its body ends (Content-Length or chunked)
        self._received = 0  # bytes of the answer received so far (bounded: MAX_HEAD for its head)
        self._read_timer: asyncio.TimerHandle | None = None
        self.answered = 0  # answers received on this connection
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the server is not speaking HTTP/1.1 with us
            self._drop()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # 101 Switching Protocols: not an answer to a call
            self._fail(Disconnected("the server switched protocols (HTTP 101) instead of answering", reused=False))
            self._drop()
        except httptools.HttpParserError as exc:  # httptools wraps what a callback raises (TooLarge) in one too
            too_large = isinstance(exc, TooLarge) or isinstance(exc.__context__, TooLarge)
            self._fail(
                TooLarge() if too_large else Disconnected(f"malformed HTTP answer: {exc}", reused=self.answered > 0)
            )
            self._drop()
        except TooLarge as exc:
            self._fail(exc)
            self._drop()
        else:
            if self._waiter is not None:  # the answer is still incomplete
                self._received += len(data)
                if not self._status:  # and so is its head
                    if self._received > MAX_HEAD:
                        reason = f"the answer's head exceeds {MAX_HEAD // 1024} KiB"
                        self._fail(Disconnected(reason, reused=self.answered > 0))
                        self._drop()
                elif self._received > 2 * self._limit + MAX_HEAD:  # the body is bounded; its framing and trailers too
                    self._fail(TooLarge())
                    self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._waiter is None:
            return
        if exc is None and self._status and not self._framed:  # a body that ends with the connection: complete
            waiter = self._waiter
            response = Response(self._status, self._not_started, b"".join(self._body))
            self._reset()
            if not waiter.done():
                waiter.set_result(response)
            return
        reason = f"connection closed before the answer was complete ({exc or 'EOF'})"
        self._fail(Disconnected(reason, reused=self.answered > 0))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request (in the same segment): nobody asked for it
            raise _Unsolicited()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"kubrpc-not-started" and value == b"1":
            self._not_started = True
        elif name == b"content-length" or name == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        length = getattr(self._parser, "content_length", None)  # not in every httptools version
        if isinstance(length, int) and length > self._limit:
            raise TooLarge()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            raise TooLarge()
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self._clear_answer()
            return
        waiter = self._waiter
        response = Response(self._status, self._not_started, b"".join(self._body))
        keep = self._parser.should_keep_alive()
        self._reset()
        self.answered += 1
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if keep and not self.closed:
            self._pool.release(self)
        else:
            self._drop()

    # the client's side

    def send(self, request: bytes, limit: int, read_timeout: float | None) -> asyncio.Future[Response]:
        """Write one request; the future gets its answer."""
        assert self.transport is not None
        self._waiter = waiter = self._loop.create_future()
        self._limit = limit
        self._received = 0
        if read_timeout is not None:
            self._read_timer = self._loop.call_later(read_timeout, self._timed_out)
        self.transport.write(request)
        return waiter

    def abandon(self) -> None:
        """The caller left before the answer: the connection's state is unknown, so it is closed."""
        self._reset()
        self._drop()

    def _timed_out(self) -> None:
        self._read_timer = None
        self._fail(ReadTimeout())
        self._drop()

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._reset()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _clear_answer(self) -> None:
        """Forget what has arrived of an answer."""
        self._body = []
        self._size = 0
        self._status = 0
        self._not_started = False
        self._framed = False

    def _reset(self) -> None:
        """No request is waiting any more: forget its answer and its timer."""
        self._waiter = None
        self._clear_answer()
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _drop(self) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


class Http1Pool:
    """Keep-alive connections to one endpoint: at most `max_connections`, reused newest first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None,
        server_hostname: str | None,
        connect_timeout: float | None,
        keepalive: tuple[float, float] | None,
        max_connections: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._max = max_connections if max_connections > 0 else math.inf
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._targets: dict[str, bytes] = {}  # request lines by path
        authority = f"[{host}]" if ":" in host else host
        self._host_line = f"Host: {authority}:{port}\r\n".encode("latin-1")

    async def request(
        self, path: str, body: bytes, headers: dict[str, str] | None, *, limit: int, read_timeout: float | None
    ) -> Response:
        """POST `body` to `path` on a pooled connection and return the answer (see the module's errors)."""
        target = self._targets.get(path)
        if target is None:  # percent-encoded once per path, so that no path can break the request line
            target = f"POST /{quote(path, safe=_PATH_SAFE)} HTTP/1.1\r\n".encode("ascii")
            if len(self._targets) < 4096:
                self._targets[path] = target
        conn = await self._acquire()
        head = [target, self._host_line]
        if headers:
            for name, value in headers.items():
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        waiter = conn.send(b"".join(head), limit, read_timeout)
        try:
            return await waiter
        except asyncio.CancelledError:  # (the task's cancellation cancelled the waiter too)
            if waiter.cancelled() or not waiter.done():
                conn.abandon()
            raise

    async def _acquire(self) -> _Connection:
        idle = self._idle
        while True:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < IDLE_REUSE:
                    return conn
                conn._drop()
            if len(self._open) < self._max:
                return await self._connect()
            waiter = self.loop.create_future()  # every connection is busy: wait for one to be released or closed
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the wake-up on
                raise

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectFailed("the connection pool is closed")
        conn = _Connection(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None,
                )
        except BaseException as exc:
            self._open.discard(conn)
            self._wake()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"connect timeout ({self._connect_timeout:g} s)") from None
            if isinstance(exc, OSError | ssl_module.SSLError):
                raise ConnectFailed(str(exc) or type(exc).__name__) from None
            raise
        if self._closed:  # closed while this connection was being made: nobody would close it
            conn._drop()
            raise ConnectFailed("the connection pool is closed")
        if self._keepalive is not None and conn.transport is not None:
            set_keepalive(conn.transport.get_extra_info("socket"), self._keepalive)
        return conn

    def release(self, conn: _Connection) -> None:
        """`conn` finished its answer and may carry another."""
        if self._closed:
            conn._drop()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake()

    def forget(self, conn: _Connection) -> None:
        """`conn` is closed: it no longer counts."""
        if conn in self._open:
            self._open.discard(conn)
            self._wake()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close every connection (calls on them fail with Disconnected)."""
        self._closed = True
        for conn in list(self._open):
            conn._drop()
        self._idle.clear()
        while self._waiters:  # callers queued for a connection: each finds the pool closed
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports' connection_lost run before the loop moves on


def set_keepalive(sock: socket.socket | None, keepalive: tuple[float, float]) -> None:
    """TCP keepalive on a socket: probed after `interval` idle seconds, closed after `timeout` more."""
    if sock is None:
        return
    interval, timeout = keepalive
    probes = 3
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", interval),
        ("TCP_KEEPALIVE", interval),
        ("TCP_KEEPINTVL", timeout / probes),
        ("TCP_KEEPCNT", probes),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(value)))
