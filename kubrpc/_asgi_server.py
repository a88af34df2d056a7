"""Serving an ASGI app with uvicorn, hardened: for the HTTP transport and the metrics endpoint alike.

`serve_uvicorn()` runs an app on a bound socket inside an async block. Its connections are uvicorn's httptools
protocol, with the limits a hostile peer must not get past:


uvicorn keeps a connection open for as long as its peer sends nothing, buffers request heads of any size,
and counts idle connections against `limit_concurrency`. `_HttpProtocol` adds, per connection:

- a header timeout: a request's head (request line and headers) must arrive within `header_timeout`
  seconds of the connection opening, or of the head's first byte on a kept-alive connection (a CRLF the
  parser skips counts: it cancels uvicorn's keep-alive timeout);
- a body timeout: the body must arrive within `body_timeout` seconds of the head;
- a cap on the head's size, metered before the bytes reach the parser, so that an endless header line is
  cut off, not buffered; the chunk-size lines and trailers of a chunked body share one such allowance;
- `limit_concurrency` counts requests in progress, not connections: an idle or silent connection holds
  no slot, and N requests may run at once (uvicorn's own check admits N - 1);
- a peer that does not read its answers: once a response leaves more than the transport's high-water mark
  unsent, no further request of the connection is read or started (so none holds a slot waiting to write),
  and if the unsent bytes do not shrink for `body_timeout` seconds the connection is aborted;
- at most `_MAX_PIPELINE` requests queued behind a running one: uvicorn parses every pipelined request it
  reads into a queue, ~600 bytes of objects for a 30-byte request, with no bound; the next one gets 503
  "not started" and the connection closes (the requests after it are dropped unparsed into objects);
- a client that hangs up while a pipelined request runs cancels it (uvicorn tells only the newest request);
- graceful shutdown (drain) does not close an idle kept-alive connection at once: a client may be sending a
  request on it at that very moment, and could not tell whether it ran. A request that arrives on it during
  the drain gets 503 "not started" with `connection: close` (the client retries it elsewhere, safely), and
  the connection closes once answered, or idle after `min(_DRAIN_GRACE, drain_timeout)` seconds;
- a malformed request gets a JSON 400 with the parser's reason (uvicorn: text, and a warning logged for each);
  an `Upgrade` request (h2c, WebSocket; the parser stops at it for good) is the connection's last.

A refused connection gets a JSON error (400, 408, 431 or 503, `connection: close`) unless another response is
under way on it; then the bytes that still arrive are dropped for a moment (so that the peer can read the
answer before the close) and it is closed.

uvicorn internals this relies on (tests/test_http_hardening.py, test_http_attack.py, test_http_drain.py fail if they
change): the parser callbacks `on_message_begin`, `on_headers_complete`, `on_body`, `on_message_complete`,
and `on_response_complete`; `pause_writing`, `resume_writing`, `timeout_keep_alive_handler` and
`_unset_keepalive_if_required`, `shutdown` (called by uvicorn's Server.shutdown); the protocol's `app`,
`parser`, `cycle`, `pipeline`, `tasks`, `flow`, `url`, `headers`, `limit_concurrency`; and the cycle's `body`,
`more_body`, `keep_alive`, `response_started`, `response_complete`, `disconnected` and
`message_event`. `data_received` is replaced (`_feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Any, ClassVar, cast

import anyio
import httptools
import orjson
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol as WebSocketProtocol
from uvicorn.server import ServerState

from ._limits import ServerLimits
from .errors import error_response
from .status import Status

__all__ = ("NOT_STARTED", "protocol_class", "serve_uvicorn", "websocket_protocol_class")

# On a 503 that the server sends before the call could start, so that a client knows it is safe to retry.
NOT_STARTED = (b"kubrpc-not-started", b"1")
_DRAIN_GRACE = 1.0  # seconds an idle connection of a draining server stays open to refuse late requests
_LINGER = 2.0  # seconds a refused connection is still read (the bytes dropped) before it closes
_CHUNK_FRAMING = 32  # bytes allowed per chunk of a chunked body for its size line and CRLFs
_MAX_PIPELINE = 64  # requests queued on a connection behind the running one
_KEEPALIVE_IDLE = 30  # seconds a connection is quiet before TCP keepalive probes its peer (the HTTP client's default)
_KEEPALIVE_PROBE = 4  # seconds between probes; 3 unanswered probes close the connection
_CODES = {400: Status.INVALID_ARGUMENT, 408: Status.DEADLINE_EXCEEDED, 503: Status.UNAVAILABLE}


def protocol_class(limits: ServerLimits) -> type[HttpToolsProtocol]:
    """The uvicorn `http=` protocol class that enforces `limits` (and `limit_concurrency`, counting requests)."""
    return cast("type[HttpToolsProtocol]", type("HttpProtocol", (_HttpProtocol,), {"limits": limits}))


async def send_json(send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer an ASGI request with the JSON `body` (and `extra` headers)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, code: Status, message: str, *extra: tuple[bytes, bytes]) -> None:
    """Answer an ASGI request with a kubrpc JSON error and close the connection."""
    body = orjson.dumps({"code": code.wire_name, "message": message})
    await send_json(send, status, body, ((b"connection", b"close"), *extra))


def _is_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Is this request a stream call (Content-Type application/connect+...)?"""
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"application/connect+")
    return False


class _WebSocketProtocol(WebSocketProtocol):
    """uvicorn's WebSocket protocol, but a drain lets an open stream finish: uvicorn would close it at once
    (1012); the server cancels what still runs after drain_timeout, and the stream then ends with UNAVAILABLE.

    A peer that does not read is cut off as on HTTP: once the unsent bytes pass the transport's high-water mark
    (uvicorn's send() then waits), nothing more is read from it, and they must shrink within `body_timeout`
    seconds, or the connection is aborted (the handler's next send fails, and the stream ends). uvicorn alone
    waits for good: its keepalive ping closes the transport gracefully, which never completes while bytes wait
    unsent.
    """

    limits: ClassVar[ServerLimits] = ServerLimits()
    # The server's admission (max_pending_bytes), as (admit, release): messages still arriving count by the bytes
    # buffered of them.
    counter: ClassVar[tuple[Callable[[int], bool], Callable[[int], None]] | None] = None
    _write_timer: asyncio.TimerHandle | None = None
    _unsent = 0
    _held = 0  # bytes of messages still arriving, counted by the admission

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        counter = self.counter
        if counter is None:
            return
        admit, release = counter
        # What websockets and uvicorn hold of messages not complete yet: a frame's bytes, earlier fragments.
        closing = self.close_sent or self.transport.is_closing()
        held = 0 if closing else len(self.conn.reader.buffer) + sum(map(len, self.frames))
        if held > self._held and not admit(held - self._held):
            release(self._held)
            self._held = 0
            self._busy()
            return
        if held < self._held:
            release(self._held - held)
        self._held = held

    def _busy(self) -> None:
        """Close with 1013 (try again later): the app sees a disconnect; what still arrives is dropped (websockets
        discards it once failed) for a moment, so that the peer reads the close frame, not a reset."""
        self.conn.fail(1013, "server busy: too many request bytes held (max_pending_bytes)")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1013})
        self.close_sent = True
        self.frames = []
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(_LINGER, self.transport.close)

    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent and not self.transport.is_closing():
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._held and self.counter is not None:
            self.counter[1](self._held)
            self._held = 0
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        # Nothing more is read from a peer that does not read either: each of its pings would add a pong to
        # the unsent bytes (uvicorn answers them as they arrive), without bound.
        self.transport.pause_reading()
        if self._write_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(self.limits.body_timeout, self._check_writes)

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:  # (uvicorn's own pause: the app has not taken the last message yet)
            self.transport.resume_reading()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    async def receive(self) -> Any:
        message = await super().receive()
        if not self.writable.is_set():  # uvicorn resumed reading for the app: not while writes wait
            self.transport.pause_reading()
        return message

    def _check_writes(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent and unsent >= self._unsent:  # it reads nothing: drop the unsent bytes, the stream ends
            self.transport.abort()
        elif unsent:  # it reads, if slowly
            self._unsent = unsent
            self._write_timer = self.loop.call_later(self.limits.body_timeout, self._check_writes)


def websocket_protocol_class(
    limits: ServerLimits | None = None,
    admit: Callable[[int], bool] | None = None,
    release: Callable[[int], None] | None = None,
) -> type[asyncio.Protocol]:
    """The uvicorn `ws=` protocol class of the HTTP transport's bidirectional streams, held to `limits`; `admit`
    and `release` count the bytes of messages still arriving against the server's max_pending_bytes."""
    counter = None if admit is None or release is None else (admit, release)
    attributes = {"limits": limits or ServerLimits(), "counter": counter}
    return cast("type[asyncio.Protocol]", type("WebSocketProtocol", (_WebSocketProtocol,), attributes))


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


class _HttpProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection, under `limits` (see the module docstring)."""

    limits: ClassVar[ServerLimits] = ServerLimits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._max_requests = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's check counts idle connections; on_headers_complete counts requests
        self._app = self.app
        limits = self.limits
        self._header_timeout = limits.header_timeout
        self._body_timeout = limits.body_timeout
        self._max_header_size = limits.max_header_size
        # Bytes the head being read may still take before it is refused; None while a body is read or a call runs.
        self._head_room: int | None = self.limits.max_header_size
        self._head_unmetered = False  # the parser is being fed bytes that were not counted against a head
        self._measure_head = False  # this head began with uncounted bytes: measure it when it is complete
        self._chunked = False
        self._chunk_room = 0  # bytes of chunk-size lines and trailers still allowed (a chunked body)
        self._lingering = False
        # The loop time by which the head or body being read must have arrived; one lazily re-armed timer checks.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._running: RequestResponseCycle | None = None  # the request whose app runs (not one queued behind it)
        self._held = False  # a response is complete, but its bytes wait unsent: the next request waits too
        self._write_timer: asyncio.TimerHandle | None = None  # while bytes wait unsent: checks that they shrink
        self._unsent = 0
        # The connection's last request (refused for a too deep pipeline, or followed by bytes that are not HTTP):
        # what follows it is dropped.
        self._overflow: RequestResponseCycle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None  # set once shutdown() left the connection open

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._set_deadline(self.loop.time() + self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        running = self._running
        super().connection_lost(exc)
        # uvicorn tells only the newest request; the one running may be an older, pipelined one
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()

    def data_received(self, data: bytes) -> None:
        room = self._head_room
        if room is not None:  # a request head: count its bytes before the parser buffers them
            if len(data) > room:
                self._head_overflow(data, room)
                return
            self._head_room = room - len(data)
            self._head_unmetered = False
            if self._deadline is None:  # a kept-alive connection's next head starts (CRLFs before it too)
                self._deadline = at = self.loop.time() + self._header_timeout
                if at < self._timer_at:
                    self._set_timer(at)
            self._feed(data)
            return
        self._head_unmetered = True  # a body: a pipelined head may start in it
        if not self._chunked:
            self._feed(data)
            return
        self._chunk_room -= len(data)  # on_body and on_chunk_header give back what was body or framing
        self._feed(data)
        if self._chunked and self._chunk_room < 0 and not self.transport.is_closing():
            max_size = self.limits.max_header_size
            self._refuse(431, f"chunk headers and trailers of the request exceed {max_size} bytes", self._may_answer())

    def _feed(self, data: bytes) -> None:
        """Parse `data`: uvicorn's data_received, but a malformed request gets a JSON 400 that says what is wrong."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade() and not self.pipeline and self._overflow is None:
                self._websocket()
            else:
                self._upgrade_refused()
        except httptools.HttpParserError as exc:
            cycle = self.cycle
            # Answer unless a response is (or will be) under way; a bad body is its own request's error.
            answer = not self.pipeline and (
                cycle is None or cycle.response_complete or (cycle.more_body and not cycle.response_started)
            )
            reason = "HTTP/2 is not supported: send HTTP/1.1" if str(exc).startswith("Pause on PRI") else str(exc)
            if answer:
                self._refuse(400, f"malformed HTTP request: {reason}", True)
            else:  # the requests before it are answered, then the connection closes
                self._last(cycle)

    def _websocket(self) -> None:
        """A WebSocket upgrade (the HTTP transport's bidirectional streams): held to the same limits as a
        request (its head was metered and timed; it holds a request slot while it is open), and refused "not
        started" while the server is busy or draining."""
        app = self.app
        if app == self._busy or app == self._draining:
            message = "server is shutting down" if app == self._draining else "server busy (max_connections)"
            self._refuse(503, f"{message}; the call did not start", True, NOT_STARTED)
        elif app == self._headers_too_large:
            self._refuse(431, f"request headers exceed the limit of {self.limits.max_header_size} bytes", True)
        else:
            self.handle_websocket_upgrade()

    def _last(self, cycle: RequestResponseCycle) -> None:
        """Make `cycle` the connection's last request: it is answered, then the connection closes."""
        cycle.keep_alive = False
        self._overflow = cycle
        self._head_room = 0  # what follows is dropped unparsed (_head_overflow)

    def _upgrade_refused(self) -> None:
        """An `Upgrade` request (h2c, websocket): not spoken here. The parser stops at it for good, so it is the
        connection's last request: answered as plain HTTP/1.1 if it has no body, refused if it has one (which
        the parser skipped); what follows is dropped."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self._overflow is not None:
            self.transport.close()
            return
        if any(
            name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
            for name, value in self.headers
        ):
            upgrade = next((value for name, value in self.headers if name == b"upgrade"), b"").decode("latin-1")
            message = f"HTTP upgrade ({upgrade}) is not supported: send the request without an Upgrade header"
            self._refuse(400, message, not self.pipeline)
            return
        self._last(cycle)

    def _head_overflow(self, data: bytes, room: int) -> None:
        if self._lingering or self._overflow is not None:  # refused: drop what still arrives
            return
        view = memoryview(data)  # the parser takes one: no copies of a large first read
        if room:
            self._head_room = 0
            self._head_unmetered = False
            self._feed(cast(bytes, view[:room]))
            if self._overflow is not None or self._lingering:  # refused (a pipeline too deep, a bad request)
                return
        if self._head_room != 0 or self.transport.is_closing():  # the head ended within the limit, or was bad
            if not self.transport.is_closing():
                self.data_received(cast(bytes, view[room:]))
            return
        cycle = self.cycle  # a pipelined head: answer only if no response is under way
        answer = cycle is None or cycle.response_complete
        self._refuse(431, f"request headers exceed the limit of {self.limits.max_header_size} bytes", answer)

    # Parser callbacks

    def on_message_begin(self) -> None:
        self._measure_head = self._head_unmetered
        if self._deadline is None:  # a kept-alive connection's next request: the head's time starts now
            self._deadline = at = self.loop.time() + self._header_timeout
            if at < self._timer_at:  # (_set_deadline, inlined on the hot path)
                self._set_timer(at)
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._overflow is not None:  # the connection closes after the refused request: drop what follows
            return
        self._head_room = None
        self._chunk_room = self._max_header_size
        if _is_stream(self.headers):  # a stream's body lasts as long as the call: its deadline covers it
            self._deadline = None
        else:
            self._deadline = at = self.loop.time() + self._body_timeout
            if at < self._timer_at:
                self._set_timer(at)
        app = self._app
        if self._max_requests is not None and len(self.tasks) >= self._max_requests:
            app = self._busy
        if self._drain_timer is not None:  # the server drains: this request is not started
            app = self._draining
        if self._measure_head and _head_size(self.url, self.headers) > self._max_header_size:
            app = self._headers_too_large
        pipeline = self.pipeline
        if len(pipeline) >= _MAX_PIPELINE:
            app = self._pipeline_full
        self.app = app
        super().on_headers_complete()
        if not pipeline:  # it started (a queued request is started by on_response_complete)
            self._running = self.cycle
        elif app == self._pipeline_full:
            self._overflow = self.cycle

    def on_chunk_header(self) -> None:
        self._chunked = True
        self._chunk_room += _CHUNK_FRAMING

    def on_body(self, body: bytes) -> None:
        self._chunk_room += len(body)
        if self._overflow is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._overflow is not None:  # refused, or dropped: what follows is dropped unparsed (_head_overflow)
            self._head_room = 0
            return
        self._head_room = self._max_header_size
        self._head_unmetered = True  # any bytes after this in the same feed belong to an uncounted head
        self._chunked = False
        self._deadline = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle.more_body and cycle.response_complete:  # answered (refused) before its body arrived: drop what came
            cycle.body = bytearray()
        transport = self.transport
        if self.flow.write_paused and not transport.is_closing():
            # The peer is not reading its answers: read and start nothing more for it until it does
            # (resume_writing), so that no request of it holds a slot waiting to write.
            self._held = True
            self.flow.pause_reading()
            self._unset_keepalive_if_required()
            return
        if self.pipeline:
            self._running = self.pipeline[-1][0]  # super() starts it
        elif not cycle.keep_alive and transport.get_write_buffer_size():  # closing, with bytes still unsent
            self._watch_writes()
        super().on_response_complete()

    # A peer that does not read

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._held:
            self._held = False
            self.on_response_complete()  # now start the next request, or arm the keep-alive timeout

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        if self.transport.get_write_buffer_size():
            self._watch_writes()

    def _watch_writes(self) -> None:
        """Abort the connection if its unsent bytes do not shrink for `body_timeout` seconds."""
        if self._write_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(self._body_timeout, self._check_writes)

    def _check_writes(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent < self._unsent:  # the peer reads, if slowly
            self._watch_writes()
            return
        self.transport.abort()  # it reads nothing: drop the unsent bytes; a running request sees a disconnect

    def handle_websocket_upgrade(self) -> None:
        self._stop_timer()
        self._head_room = None
        super().handle_websocket_upgrade()

    def shutdown(self) -> None:
        """The server drains: a response under way closes the connection (uvicorn); an idle connection stays
        open for a short grace, so that a request already on its way is refused "not started", not lost."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            return
        grace = min(_DRAIN_GRACE, self.limits.drain_timeout)
        if grace <= 0 or self._lingering or self.transport.is_closing():
            self.transport.close()
            return
        self._drain_timer = self.loop.call_later(grace, self._drain_close)

    def _drain_close(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # idle: close (a request under way closes when answered)
            self.transport.close()

    # Refusals

    async def _draining(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = "server is shutting down; the call did not start"
        await send_error(send, 503, Status.UNAVAILABLE, message, NOT_STARTED)

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"server busy: {self._max_requests} requests in progress (max_connections); the call did not start"
        await send_error(send, 503, Status.UNAVAILABLE, message, NOT_STARTED)

    async def _headers_too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request headers exceed the limit of {self.limits.max_header_size} bytes"
        await send_error(send, 431, Status.RESOURCE_EXHAUSTED, message)

    async def _pipeline_full(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"more than {_MAX_PIPELINE} requests pipelined on one connection; the call did not start"
        self._refuse(503, message, True, NOT_STARTED)

    def _may_answer(self) -> bool:
        """While a body is read: may the connection still be answered (no response under way on it)?"""
        return not self.pipeline and (self.cycle is None or not self.cycle.response_started)

    def _refuse(self, status: int, message: str, answer: bool, *extra: tuple[bytes, bytes]) -> None:
        """End the request being read: answer `status` if `answer`, then close the connection."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app stops waiting for this request's body
            cycle.disconnected = True
            cycle.message_event.set()
        transport = self.transport
        if not answer:
            transport.close()
            return
        code = _CODES.get(status, Status.RESOURCE_EXHAUSTED)
        transport.write(error_response(status, code, message, *extra))
        if transport.can_write_eof():
            transport.write_eof()
        # Read on for a moment, dropping the bytes: closing with unread bytes would reset the connection, and
        # the peer, still sending, might lose the answer.
        self._lingering = True
        self._head_room = 0
        self._chunked = False
        self.flow.resume_reading()
        self._deadline = None
        self._set_deadline(self.loop.time() + _LINGER)

    # The timer

    def _set_deadline(self, at: float) -> None:
        self._deadline = at
        if at < self._timer_at:
            self._set_timer(at)

    def _set_timer(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._check_deadline)
        self._timer_at = at

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _check_deadline(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        at = self._deadline
        if at is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < at:
            self._set_deadline(at)
            return
        self._deadline = None
        limits = self.limits
        cycle = self.cycle
        if self._lingering:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self._watch_writes()
        elif self._head_room is not None:  # the head is late
            if cycle is not None and not cycle.response_complete:  # a pipelined head: the previous call runs on
                self._set_deadline(now + limits.header_timeout)
            elif self._head_room == limits.max_header_size:  # not a byte of a request: just close
                self.transport.close()
            else:
                self._refuse(408, f"request headers not received within {limits.header_timeout:g} s", True)
        elif self.pipeline:  # the body of a request queued behind a running one: uvicorn is not reading it yet
            self._set_deadline(now + limits.body_timeout)
        else:
            self._refuse(408, f"request body not received within {limits.body_timeout:g} s", self._may_answer())


class _QuietServer(uvicorn.Server):
    handshake_timeout: float | None = None  # seconds for a TLS handshake (uvicorn sets none: asyncio's 60 s)

    # The owner of the event loop (Server.run, a test) handles signals, not uvicorn.
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown; then a moment for the calls it cancelled after the graceful timeout to end (a
        stream cancelled so still writes its end-of-stream message)."""
        await super().shutdown(sockets)
        tasks = list(self.server_state.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=_LINGER)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup on the bound `sockets`, but with `handshake_timeout` for TLS handshakes."""
        config = self.config
        if sockets is None or config.ssl is None or self.handshake_timeout is None:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise OSError("the ASGI lifespan startup failed")

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
            )

        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets:
            server = await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self.handshake_timeout,
            )
            self.servers.append(server)
        self.started = True


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalive on the listening socket, which the connections it accepts inherit (Linux, macOS): a peer
    whose host vanished (no FIN, no RST) is noticed after `_KEEPALIVE_IDLE` quiet seconds and the probes, so that
    a quiet stream of it (no deadline, nothing to write) does not hold its request slot for good."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),  # Linux
        ("TCP_KEEPALIVE", _KEEPALIVE_IDLE),  # macOS
        ("TCP_KEEPINTVL", _KEEPALIVE_PROBE),
        ("TCP_KEEPCNT", 3),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


@asynccontextmanager
async def serve_uvicorn(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    ssl: SSLContext | None = None,
    sock: socket.socket | None = None,
    limits: ServerLimits | None = None,
    **options: Any,
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Run `app` with uvicorn on host:port (0: any) inside the block; yields the bound URL and the server.

    Connections are held to `limits` (header and body timeouts, header size; the defaults if None), and
    uvicorn's `limit_concurrency` counts requests in progress, not connections. `sock`: serve this bound
    socket instead (it is closed when the block exits).
    """
    if sock is None:
        sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio sets TCP_NODELAY only then
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    _keepalive(sock)
    family = sock.family
    bound = sock.getsockname()
    options.setdefault("http", protocol_class(limits or ServerLimits()))
    options.setdefault("ws", "none")  # no WebSocket routes: an Upgrade request is plain HTTP/1.1, then the close
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, **options)
    if ssl is not None:  # uvicorn builds its context from files; an SSLContext goes in after load()
        config.load()
        config.ssl = ssl
    userver = _QuietServer(config)
    userver.handshake_timeout = (limits or ServerLimits()).header_timeout  # a TLS handshake counts as the head's start
    with sock:
        # A plain task rather than a task group: the block may be left from another task than the one that
        # entered it (a drain run in the background while the caller goes on).
        serving = asyncio.ensure_future(userver.serve([sock]))
        try:
            with anyio.fail_after(10):
                while not userver.started:
                    if userver.should_exit or serving.done():
                        raise OSError(f"uvicorn failed to start on {host}:{port}")
                    await anyio.sleep(0.002)
            host_text = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
            yield f"{'http' if ssl is None else 'https'}://{host_text}:{bound[1]}", userver
        finally:
            userver.should_exit = True
            try:
                await asyncio.shield(serving)
            except asyncio.CancelledError:
                if not serving.done():  # the caller was cancelled while it drained: stop now
                    userver.force_exit = True
                    serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await serving
                raise
