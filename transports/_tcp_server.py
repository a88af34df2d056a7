"""The server side of the tcp transport: a listener, and a protocol per accepted connection."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, NoReturn, cast

import anyio
import orjson

from kubrpc.codec import Attached
from kubrpc.errors import NotDeliveredError, ProtocolError, RpcError, error_response
from kubrpc.interface import CallKind
from kubrpc.status import Status

from ._deadlines import Deadlines
from ._eager import NOT_RUN, InlineRunner, start_eager
from ._frames import (
    _EMPTY_METADATA,
    _HEADER_AND_REQUEST_HEAD,
    FLAG_ACK,
    FLAG_ATTACHED,
    FLAG_REFUSED,
    FRAME_OVERHEAD,
    HEADER,
    MAX_WINDOW,
    OVERSIZED,
    PREFACE,
    REFUSED,
    SETTING_ATTACHMENTS,
    STREAM_WINDOW,
    BadRequest,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_goaway,
    encode_message,
    encode_settings,
    encode_window_update,
    parse_request,
    parse_settings,
    parse_window_update,
)
from ._streams import MESSAGE_OVERHEAD, Inbox
from ._tcp_base import (
    _BATCH_BELOW,
    _CANCEL,
    _DATA,
    _END,
    _ERROR,
    _PING,
    _REQUEST,
    _RESPONSE,
    _SETTINGS,
    _WINDOW_UPDATE,
    KIND_OF_FLAGS,
    STREAM_FLAGS,
    FrameWriter,
    format_host,
    log,
)

if TYPE_CHECKING:
    from kubrpc.interfaces import InlineDispatch, ServerCore


__all__ = ("TcpListener",)

# How long a draining server waits for clients to close their connections after the last answer.
_LINGER = 1.0
# The server's acknowledgement of a good preface: its first frame (docs/protocol.md).
_SETTINGS_FRAME = encode_frame(_SETTINGS, 0)
# The answer to a client's SETTINGS that says it reads attachments (docs/protocol.md, "Attachments").
_ATTACHMENTS_SETTINGS = encode_settings((SETTING_ATTACHMENTS, 1))
_BUSY = RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
# What max_pending_bytes counts for each metadata entry beyond its JSON: its key, lower-cased key and value as
# str objects, and its dict slots (measured: 16 KiB of short entries held about 9 times their size).
_METADATA_ENTRY = 128
# What max_pending_bytes counts for each open stream beyond its REQUEST frame: its task, handler coroutine,
# inbox and bookkeeping (measured: about 6.4 KiB each with 2,000 open streams), so that a peer holding many
# streams open is bounded by the budget, not by max_concurrent_calls times max_connections.
_STREAM_ENTRY = 8 * 1024
# At most this much of an HTTP request is read (and dropped) after its 400, so that the client gets the answer.
_HTTP_DISCARD = 1024 * 1024


# The start of an HTTP request line: what a client of the wrong transport (curl, kubrpc's http) sends first.
_HTTP_METHODS: tuple[bytes, ...] = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_HTTP_METHODS += (b"CONNECT ", b"TRACE ", b"PRI ")
_HTTP_REQUEST = re.compile(b"|".join(_HTTP_METHODS))


def _may_be_http(first: bytes) -> bool:
    """Could `first`, a few bytes that are not the preface, still grow into an HTTP request line? (TCP can split it.)"""
    return len(first) < len(b"OPTIONS ") and any(m.startswith(first) for m in _HTTP_METHODS)


def _never(path: str) -> InlineDispatch | None:
    """dispatch_inline() of a ServerCore without one: every call runs in a task."""
    return None


def _error_frame(stream: int, error: RpcError, flags: int = 0) -> bytes:
    return encode_frame(_ERROR, stream, orjson.dumps(error.to_json()), flags)


def _deadline_frame(stream: int) -> bytes:
    return _error_frame(stream, RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))


class TcpListener:
    """A listening TCP socket and its connections."""

    def __init__(
        self, server: ServerCore, max_message_size: int, preface_timeout: float = 10.0, frame_timeout: float = 30.0
    ) -> None:
        self.server = server
        self.url = ""
        self.max_message_size = max_message_size
        self.preface_timeout = preface_timeout
        self.frame_timeout = frame_timeout
        self.connections: set[_ServerConnection] = set()
        self.closing = False  # this listener is draining its connections (the server's state is core.draining)
        self._orphans: set[asyncio.Task[None]] = set()
        self.inline = InlineRunner(asyncio.get_running_loop())  # calls that never wait run without a task
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
        self.closing = True
        for conn in list(self.connections):
            conn.go_away("server shutting down")
        with anyio.move_on_after(timeout):
            while self.active_calls:
                await self._changed()
        for conn in list(self.connections):  # streams still running end now, telling their clients why
            conn.end_streams(RpcError(Status.UNAVAILABLE, "server shutting down: the stream outlived drain_timeout"))
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
        await self.inline.aclose()

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


class _ServerConnection(FrameWriter):
    """One accepted connection: decodes frames and runs each request as a task.

    The hot path uses asyncio directly (a task per call, a timer per deadline, one write per loop
    iteration): benchmarks/bench_unary.py measured anyio's task group and cancel scopes at about
    40 % of the server's CPU per call. Every task is tracked and awaited when the listener closes.
    """

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.dispatch = listener.server.dispatch
        self._admit, self._release = listener.server.admit, listener.server.release
        # (a ServerCore written before dispatch_inline() existed runs every call in a task)
        self._dispatch_inline: Callable[[str], InlineDispatch | None] = getattr(
            listener.server, "dispatch_inline", _never
        )
        self._max_message_size = listener.max_message_size
        self._inline = listener.inline
        self.max_calls = listener.server.limits.max_concurrent_calls
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, _ServerStream] = {}  # the stream calls among `calls`
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        server = listener.server
        self._decoder = FrameDecoder(listener.max_message_size + FRAME_OVERHEAD, server.admit, server.release)
        self._preface: bytes | None = b""
        self._discard = 0  # bytes of an HTTP request still to be read and dropped after its 400 (_bad_preface)
        self._preface_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None  # times the partial frame counted in the budget
        self._frame_begun = 0  # which one (FrameDecoder.begun)
        self._frame_since = 0.0
        # Frames read but not handled when writes paused wait in the decoder, as bytes (FrameDecoder.unread):
        # as objects, one read of tiny frames would cost ten times its size.
        self._backlogged = False
        self._refused: Frame | None = None  # a REFUSED pseudo-frame held behind the backlog (it has no bytes)
        self._write_paused = False
        self._reading = False  # frames of one read are being handled (their answers are flushed after the last)
        self._read_at = 0.0  # when they began to be handled: the calls' deadlines count from then
        self._last_stream = 0  # the highest stream id accepted (for GOAWAY)
        self._highest_stream = 0  # the highest stream id of any REQUEST
        self._going_away = False
        self._settled = False  # the client's SETTINGS was answered
        self._out: list[bytes] = []
        self.peer = ""  # host:port of the client, for CallInfo.peer
        self._deadlines = Deadlines(self._loop, self._deadline_passed)
        self._expired: set[int] = set()
        self._held: dict[int, int] = {}  # request bytes of each running call, for Server.admit/release
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self._limit_writes(self.transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{format_host(peer[0])}:{peer[1]}"
        listener = self.listener
        listener.connections.add(self)
        self._preface_timer = self._loop.call_later(listener.preface_timeout, self._no_preface)
        if listener.closing:
            self.go_away("server shutting down")
        elif len(listener.connections) > listener.server.limits.max_connections:
            log.warning("refusing a connection from %s: over max_connections", self.peer)
            self.go_away("too many connections")
        elif listener.server.limits.idle_timeout is not None:
            self._last_active = self._loop.time()
            self._idle_timer = self._loop.call_later(listener.server.limits.idle_timeout, self._check_idle)

    def _no_preface(self) -> None:
        self._preface_timer = None
        if self._preface is not None:
            self._fail(f"no preface within {self.listener.preface_timeout:g} s")

    def _check_idle(self) -> None:
        """Go away from a connection that has had no call for idle_timeout seconds (its client reconnects on demand)."""
        timeout = self.listener.server.limits.idle_timeout
        assert timeout is not None
        idle = self._loop.time() - self._last_active
        if self._write_paused and idle >= timeout:  # calls held that long for a client that does not read
            self._idle_timer = None
            self._fail(f"not reading its answers for {timeout:g} s")
            return
        if self.streams:
            self._end_stalled_streams(timeout)
        if self.calls or idle < timeout:
            self._idle_timer = self._loop.call_later(timeout - idle if not self.calls else timeout, self._check_idle)
            return
        self._idle_timer = None
        self.go_away("idle")

    def _end_stalled_streams(self, timeout: float) -> None:
        """End the streams whose handler has waited on the client, with no progress from it, since the last check.

        A stream lasts as long as its client keeps it going: one that neither sends the message its handler
        waits for nor grants the credit it waits for would hold its slot and memory forever (a slowloris).
        Checked every idle_timeout, so such a stream ends after one to two idle_timeouts.
        """
        for opened in self.streams.values():
            if opened.error is not None or opened.answered:
                continue
            waiting = opened.waiter is not None or (opened.inbox is not None and opened.inbox.waiting)
            if not waiting:
                opened.checked = -1
            elif opened.checked == opened.progress:
                opened.end(
                    RpcError(
                        Status.DEADLINE_EXCEEDED,
                        f"stream stalled: its handler waited {timeout:g} s (the server's idle_timeout) for the client"
                        " to send a message or grant credit; keep the stream moving, or end it",
                    )
                )
            else:
                opened.checked = opened.progress

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self._out.clear()
        self._out_size = 0
        self._decoder.close()
        self._unpause()
        self._deadlines.close()
        for timer in (self._idle_timer, self._linger_timer, self._preface_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        for task in self.calls.values():
            task.cancel()
            self.listener.adopt(task)
        self.listener.call_finished()

    def resume_writing(self) -> None:
        if self._decoder.reserved:  # a frame we stopped reading meanwhile: its frame_timeout starts again
            self._frame_since = self._loop.time()
        if self._backlogged:  # requests read before the pause come first; not from inside the transport's write
            self._unpause()
            self._loop.call_soon(self._handle_backlog)
        else:
            super().resume_writing()

    def _handle_backlog(self) -> None:
        self._backlogged = False
        if self.transport is None or self.transport.is_closing():
            return
        try:
            frames = self._decoder.feed(b"")
        except ProtocolError as exc:  # not expected: these frames were decoded once already
            self._fail(str(exc))
            return
        if self._refused is not None:  # it came after the frames held as bytes
            frames.append(self._refused)
            self._refused = None
        self._handle_frames(frames)
        if self._decoder.reserved:  # put back behind the backlog, counted again: timed from now
            self._frame_started()
        if not self._write_paused and not self._backlogged:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._discard:  # the rest of an HTTP request answered with the 400
            self._discard -= min(len(data), self._discard)
            if not self._discard and self.transport is not None:
                self.transport.abort()
            return
        if self._preface is not None:
            self._preface += data
            if len(self._preface) < len(PREFACE):
                # Not the preface: an HTTP client's method split across reads ("G", "ET ...") waits for its
                # space (a few bytes, within preface_timeout) so that it gets its HTTP 400; anything else goes.
                if not PREFACE.startswith(self._preface) and not _may_be_http(self._preface):
                    self._bad_preface(self._preface)
                return
            if not self._preface.startswith(PREFACE):
                self._bad_preface(self._preface)
                return
            data = self._preface[len(PREFACE) :]
            self._preface = None
            if self._preface_timer is not None:
                self._preface_timer.cancel()
                self._preface_timer = None
            if not self._going_away:
                self.write_now(_SETTINGS_FRAME)
        decoder = self._decoder
        if not decoder._buffer and not decoder._skip and not self._write_paused and not self._backlogged:
            at = self._run_requests(data)  # the usual case: nothing held over, and the client reads its answers
            if at == len(data):
                return
            data = data[at:]
        try:
            frames = decoder.feed(data)
        except ProtocolError as exc:
            self._fail(str(exc))
            return
        if decoder.reserved and decoder.begun != self._frame_begun:  # a large frame has begun arriving
            self._frame_started()
        self._handle_frames(frames)  # after any backlog: the decoder returns its frames first

    def _run_requests(self, data: bytes) -> int:
        """Handle the plain REQUEST frames at the start of `data`; where the first other frame (or a partial one)
        starts, or len(data) if the connection failed.

        The hot path of a server, as FrameDecoder.feed() and _handle_frames() would do it, without a Frame each.
        """
        unpack_from, limit, start = _HEADER_AND_REQUEST_HEAD.unpack_from, self._decoder.max_payload, self._start
        at, end = 0, len(data)
        if end < 20:  # the shortest REQUEST: a header, its head (timeout, path length) and metadata length
            return 0
        self._reading = True
        self._read_at = self._loop.time()
        try:
            while end - at >= 20:
                # The frame's header, and a REQUEST's head (other frames are not read further)
                length, kind, flags, stream, timeout_ms, path_len = unpack_from(data, at)
                stop = at + 10 + length
                if kind != _REQUEST or flags or stop > end or length > limit or self._write_paused:
                    break
                path_at = at + 16
                body_at = path_at + path_len + 4
                if body_at > stop or stream <= self._highest_stream or data[body_at - 4 : body_at] != _EMPTY_METADATA:
                    self._on_request(stream, 0, data[at + 10 : stop])  # metadata (or an error): the general way
                else:  # parse_request()'s common case
                    try:
                        path = data[path_at : body_at - 4].decode()
                    except UnicodeDecodeError:
                        self._on_request(stream, 0, data[at + 10 : stop])  # which answers why
                    else:
                        self._highest_stream = stream
                        start(stream, 0, timeout_ms, path, {}, data[body_at:stop], length)
                at = stop
        except ProtocolError as exc:
            self._fail(str(exc))
            return end
        finally:
            self._reading = False
            if self._out:  # the answers of calls that finished within this read, in one write
                self._flush()
        return at

    def _frame_started(self) -> None:
        """A frame counted against the budget while partial must arrive within frame_timeout, or the peer goes."""
        self._frame_begun = self._decoder.begun
        self._frame_since = self._loop.time()
        if self._frame_timer is None:
            self._frame_timer = self._loop.call_later(self.listener.frame_timeout, self._frame_late)

    def _frame_late(self) -> None:
        self._frame_timer = None
        if not self._decoder.reserved:  # it arrived (and no other has begun)
            return
        left = self._frame_since + self.listener.frame_timeout - self._loop.time()
        if self._write_paused or self._backlogged:  # we stopped reading it: idle_timeout judges that peer
            left = self.listener.frame_timeout
        if left > 0:  # a later frame than the one timed: time it from its own start
            self._frame_timer = self._loop.call_later(left, self._frame_late)
        else:
            self._fail(f"frame not received within {self.listener.frame_timeout:g} s")

    def _handle_frames(self, frames: list[Frame]) -> None:
        handle = self._handle
        self._reading = True
        self._read_at = self._loop.time()
        try:
            for i, frame in enumerate(frames):
                if self._write_paused:  # the peer is not reading its answers: start nothing more for it
                    self._hold(frames[i:])
                    return
                handle(frame)
        except ProtocolError as exc:
            self._fail(str(exc))
        finally:
            self._reading = False
            if self._out:  # the answers of calls that finished within this read, in one write
                self._flush()

    def _hold(self, frames: list[Frame]) -> None:
        """Keep frames for when writing resumes, as bytes in the decoder (a refused one as it is, behind them)."""
        if frames[-1].type == REFUSED:  # always the last: its bytes are gone; answered in its turn, as ids increase
            self._refused = frames.pop()
            self._backlogged = True
        if any(frame.type == OVERSIZED for frame in frames):  # pseudo-frames cannot be put back: handle them now
            for frame in frames:
                if frame.type == OVERSIZED:
                    self._handle(frame)
            frames = [frame for frame in frames if frame.type != OVERSIZED]
        if frames:
            self._decoder.unread(frames)
            self._backlogged = True

    def _handle(self, frame: Frame) -> None:
        kind, stream = frame.type, frame.stream
        if kind == _REQUEST:
            self._on_request(stream, frame.flags, frame.payload)
        elif kind == _CANCEL:
            running = self.calls.get(stream)
            if running is not None:
                running.cancel()
        elif kind == _DATA:
            open_stream = self.streams.get(stream)
            if open_stream is not None:  # else it has ended: DATA sent before the client learned it is dropped
                open_stream.received(frame.payload)
        elif kind == _WINDOW_UPDATE:
            open_stream = self.streams.get(stream)
            if open_stream is not None:
                open_stream.grant(parse_window_update(frame.payload))
        elif kind == _END:
            open_stream = self.streams.get(stream)
            if open_stream is not None:
                open_stream.half_close()
        elif kind == _PING:
            if not frame.flags & FLAG_ACK:
                self.write(encode_frame(_PING, 0, frame.payload[:64], FLAG_ACK))
        elif kind == _SETTINGS:  # the client's: it reads attachments? Then say that this server does too, once.
            if not self._settled and parse_settings(frame.payload).get(SETTING_ATTACHMENTS, 0) >= 1:
                self._settled = True
                self.write(_ATTACHMENTS_SETTINGS)
        elif kind == OVERSIZED:  # a DATA frame over the frame limit, skipped unread: end its stream alone
            open_stream = self.streams.get(stream)
            if open_stream is not None:
                limit = self.listener.max_message_size
                open_stream.end(
                    RpcError(Status.RESOURCE_EXHAUSTED, f"request exceeds the maximum message size ({limit} bytes)")
                )
        elif kind == REFUSED:  # a REQUEST over max_pending_bytes, refused before its body was buffered
            if stream <= self._highest_stream:
                self._reused(stream)
            self._highest_stream = stream
            self.write(_error_frame(stream, _BUSY))
        # Unknown frame types, and frames only servers send, are ignored (forward compatibility).

    def _on_request(self, stream: int, flags: int, payload: bytes) -> None:
        """A REQUEST frame: refuse it, or run its call (at once if it never waits, else in a task)."""
        if stream <= self._highest_stream:
            self._reused(stream)
        self._highest_stream = stream
        try:
            request = parse_request(payload, flags & FLAG_ATTACHED)
        except BadRequest as exc:
            self.write(_error_frame(stream, exc.error))
            return
        self._start(stream, flags, request.timeout_ms, request.path, request.metadata, request.body, len(payload))

    def _start(
        self, stream: int, flags: int, timeout_ms: int, path: str, metadata: dict[str, str], body: bytes, size: int
    ) -> None:
        """Start the call of a parsed REQUEST (`size`: its payload's), or refuse it."""
        streaming = flags & STREAM_FLAGS
        if self._going_away or len(self.calls) >= self.max_calls or len(body) > self._max_message_size:
            self._refuse(stream, streaming)
            return
        # `size` counts the body, and the path and metadata held with it
        if metadata:  # as Python objects, an entry costs far more than its JSON: count that too
            size += _METADATA_ENTRY * len(metadata)
            # Keys are case-insensitive, as HTTP header names: handlers see them in lower case.
            metadata = {k.lower(): v for k, v in metadata.items()}
        if streaming:  # a stream lives as long as its client wants: its own state counts too
            size += _STREAM_ENTRY
        if not self._admit(size):
            self.write(_error_frame(stream, _BUSY, FLAG_REFUSED if streaming else 0))
            return
        if stream > self._last_stream:
            self._last_stream = stream
        if self._idle_timer is not None:
            self._last_active = self._read_at
        timeout = timeout_ms / 1000 if timeout_ms else None
        if streaming:
            task = self._open_stream(streaming, stream, path, body, timeout, metadata)
        else:
            try:
                run_now = self._dispatch_inline(path)
                if run_now is not None and self._run_now(run_now, stream, body, timeout, metadata):
                    self._release(size)  # it never waits: answered already, without a task
                    return
                # Its first step runs now: a handler that does not wait after all is answered within this read.
                task = start_eager(self._loop, self._run(stream, path, body, timeout, metadata))
            except BaseException:  # KeyboardInterrupt or SystemExit from its first step: the loop stops
                self._release(size)
                raise
            if task.done():
                self._release(size)
                return
        self._held[stream] = size
        self.calls[stream] = task
        # Bookkeeping in a done callback: a task cancelled before its first step never runs _run at all.
        task.add_done_callback(partial(self._call_done, stream))
        if timeout is not None:  # from the read, not from the end of the first step (it may have taken long)
            self._deadlines.add_at(stream, self._read_at + timeout)

    def _refuse(self, stream: int, streaming: int) -> None:
        """Answer a REQUEST that _start() cannot start: the server is going away, or the connection has too many
        calls, or the request is too large (in this order)."""
        refused = FLAG_REFUSED if streaming else 0  # a stream learns that it may go elsewhere
        if self._going_away:
            self.write(_error_frame(stream, NotDeliveredError("server shutting down"), refused))
        elif len(self.calls) >= self.max_calls:
            error = RpcError(Status.RESOURCE_EXHAUSTED, "too many concurrent calls on this connection")
            self.write(_error_frame(stream, error, refused))
        else:
            error = RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
            self.write(_error_frame(stream, error))

    def _reused(self, stream: int) -> NoReturn:
        """A REQUEST's stream id must be above every earlier one (docs/protocol.md): a reused id is a protocol error."""
        raise ProtocolError(
            f"stream id {stream} is zero or already used (ids must increase; the last was {self._highest_stream})"
        )

    def _run_now(
        self, run_now: InlineDispatch, stream: int, body: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> bool:
        """Run a call that never waits to its end and answer it, without a task; False if it cannot run so now."""
        try:
            result = self._inline.call(run_now, body, timeout, metadata, self.peer)
            if result is NOT_RUN:
                return False
            if type(result) is Attached:  # the client asked for attachments, and the result has bytes
                self.write_parts(self._attached_parts(stream, result))
                return True
            if len(result) > self._max_message_size:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
            frame = HEADER.pack(len(result), _RESPONSE, 0, stream) + result  # encode_frame(), without its frame
        except RpcError as exc:
            frame = _error_frame(stream, exc)
        except asyncio.CancelledError:  # it cancelled "its task" (the stand-in): as a cancelled task, no answer
            return True
        if len(frame) < _BATCH_BELOW:  # flushed at the read's end with the others
            self.queue(frame)
        else:
            self.write_frame(frame)
        return True

    async def _run(
        self, stream: int, path: str, body: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> None:
        try:
            if self._write_paused:  # the client is not reading its answers: wait before running more for it
                await self._wait_writable()
            try:
                result = await self.dispatch(
                    path, body, timeout=timeout, metadata=metadata, peer=self.peer, deadline_enforced=True
                )
                if type(result) is Attached:  # the client asked for attachments, and the result has bytes
                    await self._answer_attached(stream, result)
                    return
                if len(result) > self._max_message_size:
                    raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
                frame = encode_frame(_RESPONSE, stream, result)
            except RpcError as exc:
                frame = _error_frame(stream, exc)
            if self._write_paused:  # hold the answer until the client reads: memory stays bounded
                await self._wait_writable()
            if self._reading and len(frame) < _BATCH_BELOW:  # run from data_received: flushed at the read's end
                self.queue(frame)
            elif len(self.calls) == 1 and not self._out:  # the only call here: nothing to batch with
                self.write_now(frame)
            else:
                self.write_frame(frame)
        except asyncio.CancelledError:
            if stream in self._expired:  # our deadline timer cancelled it
                self._expired.discard(stream)
                self.write(_deadline_frame(stream))
            # else: cancelled by the client (CANCEL frame) or because the connection is gone: no answer

    async def _answer_attached(self, stream: int, result: Attached, opened: _ServerStream | None = None) -> None:
        """Write a RESPONSE in the attachments format (or the error of one over max_message_size)."""
        parts = self._attached_parts(stream, result)
        if self._write_paused:
            await self._wait_writable()
        if opened is not None:
            opened.answered = True
        self.write_parts(parts)

    def _attached_parts(self, stream: int, result: Attached) -> list[bytes]:
        """A RESPONSE in the attachments format, as encode_message's parts (or the error of one too large)."""
        if result.size > self._max_message_size:
            error = RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
            return [_error_frame(stream, error)]
        return encode_message(_RESPONSE, stream, result)

    def _open_stream(
        self, flags: int, stream: int, path: str, body: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> asyncio.Task[None]:
        """Accept a stream call (a WINDOW_UPDATE granting the client its window) and start its task."""
        kind = KIND_OF_FLAGS[flags]
        spec = self.listener.server.method(path)
        opened = _ServerStream(self, stream, kind)
        self.write(encode_window_update(stream, opened.peer_credit))
        self.streams[stream] = opened
        mismatch = spec is not None and spec.kind is not CallKind.UNARY and spec.kind is not kind
        return self._loop.create_task(self._run_stream(opened, path, body, timeout, metadata, mismatch))

    async def _run_stream(
        self,
        opened: _ServerStream,
        path: str,
        body: bytes,
        timeout: float | None,
        metadata: Mapping[str, str],
        mismatch: bool,
    ) -> None:
        stream = opened.id
        try:
            if self._write_paused:
                await self._wait_writable()
            try:
                if mismatch:
                    spec = self.listener.server.method(path)
                    assert spec is not None
                    theirs, ours = opened.kind.value.replace("_", " "), spec.kind.value.replace("_", " ")
                    raise RpcError(Status.UNIMPLEMENTED, f"{path} is a {ours} call, not a {theirs}: call it as one")
                result = await self.listener.server.dispatch_stream(
                    path,
                    body,
                    messages=opened.inbox,
                    send=opened.send,
                    timeout=timeout,
                    metadata=metadata,
                    peer=self.peer,
                    deadline_enforced=True,
                )
                if type(result) is Attached:  # a client stream's result, with attachments
                    await self._answer_attached(stream, result, opened)
                    return
                if result is not None and len(result) > self.listener.max_message_size:
                    raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
                frame = encode_frame(_RESPONSE, stream, result or b"")
            except RpcError as exc:
                frame = _error_frame(stream, exc)
            if self._write_paused:
                await self._wait_writable()
            opened.answered = True
            self.write(frame)
        except asyncio.CancelledError:
            if stream in self._expired:
                self._expired.discard(stream)
                self.write(_deadline_frame(stream))
            elif opened.error is not None:  # ended by this server (drain, memory budget): say why
                self.write(_error_frame(stream, opened.error))
            opened.answered = True

    def end_streams(self, error: RpcError) -> None:
        """Cancel every running stream call, answering it with `error` (drain_timeout has passed)."""
        for opened in self.streams.values():
            opened.end(error)

    def _call_done(self, stream: int, task: asyncio.Task[None]) -> None:
        if self.calls.get(stream) is task:
            del self.calls[stream]
            self.listener.server.release(self._held.pop(stream))
            if self.streams:
                opened = self.streams.pop(stream, None)
                if opened is not None:
                    opened.closed()
                    if not opened.answered and opened.error is not None and stream not in self._expired:
                        self.write(_error_frame(stream, opened.error))  # cancelled before it even started
        self._deadlines.discard(stream)
        if stream in self._expired:  # the deadline passed before the call's task could even start
            self._expired.discard(stream)
            if task.cancelled():
                self.write(_deadline_frame(stream))
        if self._idle_timer is not None:
            self._last_active = self._loop.time()
        self.listener.call_finished()

    def _deadline_passed(self, stream: int) -> None:
        task = self.calls.get(stream)
        if task is not None and not task.done():
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
            if not self.listener.closing:  # drain() closes what is left when it ends
                self._linger_timer = self._loop.call_later(_LINGER, self._close_when_quiet)

    def _close_when_quiet(self) -> None:
        """After a GOAWAY: close once the calls are answered, if the client has not closed first."""
        if self.calls:
            self._linger_timer = self._loop.call_later(_LINGER, self._close_when_quiet)
        else:
            self._linger_timer = None
            self.close()

    def close(self) -> None:
        """Close after flushing what was written (dropping it if the client is not reading)."""
        self._flush()
        if self.transport is not None:
            if self._write_paused:
                self.transport.abort()
            else:
                self.transport.close()

    def _bad_preface(self, first: bytes) -> None:
        """Not a kubrpc client: an HTTP client (curl, kubrpc's http transport) gets an HTTP 400 that says so."""
        if _HTTP_REQUEST.match(first) is None:
            self._fail("bad preface: not a kubrpc client")
            return
        log.info("closing connection from %s: an HTTP request on a TCP port", self._peer())
        self._going_away = True
        transport = self.transport
        assert transport is not None
        sockname = transport.get_extra_info("sockname")
        address = f"{format_host(sockname[0])}:{sockname[1]}" if isinstance(sockname, tuple) else "HOST:PORT"
        message = f"this is a kubrpc TCP port, not HTTP: use tcp://{address}"
        self.write_now(error_response(400, Status.FAILED_PRECONDITION, message))
        if not transport.can_write_eof():
            self.close()
            return
        # A close with the rest of the request unread (a large body, a long line) would send a reset, and the
        # client could lose the 400 before reading it: say we are done, and read and drop what still comes,
        # for at most _LINGER s and _HTTP_DISCARD bytes, until the client closes.
        transport.write_eof()  # nothing may be written after it: no timer of this connection may fire now
        for timer in (self._preface_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._preface_timer = self._idle_timer = None
        self._discard = _HTTP_DISCARD
        self._linger_timer = self._loop.call_later(_LINGER, transport.abort)

    def _fail(self, reason: str) -> None:
        log.info("closing connection from %s: %s", self._peer(), reason)
        self._going_away = True
        self.write(encode_goaway(self._last_stream, reason))
        self.close()
        for task in self.calls.values():
            task.cancel()

    def _peer(self) -> str:
        return self.peer or "?"


class _ServerStream:
    """The server's end of one stream call: the client's messages (an Inbox), and the credit of each side.

    `credit` is what this side may still send (STREAM_WINDOW at the start, widened by the client's
    WINDOW_UPDATEs); `peer_credit` what the client may still send (granted by this side as the handler
    reads). A message may go while credit is above zero, taking it below (a message larger than the window
    still goes, alone). Unread messages are counted against the server's max_pending_bytes.
    """

    __slots__ = (
        "answered",
        "checked",
        "conn",
        "credit",
        "error",
        "half_closed",
        "id",
        "inbox",
        "kind",
        "peer_credit",
        "progress",
        "unacked",
        "waiter",
    )

    def __init__(self, conn: _ServerConnection, stream: int, kind: CallKind) -> None:
        self.conn = conn
        self.id = stream
        self.kind = kind
        self.credit = STREAM_WINDOW
        takes = kind.streams_requests
        self.peer_credit = STREAM_WINDOW if takes else 0
        self.unacked = 0  # bytes read and not yet granted back to the client
        self.inbox = Inbox(self._read) if takes else None
        self.half_closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.error: RpcError | None = None  # what the client is told if this server cancels the call
        self.answered = False  # its final frame (RESPONSE or ERROR) is written
        self.progress = 0  # what the client did for the handler: DATA, END, credit that let it send again
        self.checked = -1  # `progress` when the idle check last saw the handler waiting on the client

    async def send(self, data: bytes) -> None:
        """The handler's next message: wait for credit (and a connection that is being read), then write it."""
        conn = self.conn
        attached = type(data) is Attached
        size = data.size if attached else len(data)  # type: ignore[attr-defined]
        if size > conn.listener.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
        while self.credit <= 0:
            self.waiter = conn._loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if conn._write_paused:
            await conn._wait_writable()
        self.credit -= size + MESSAGE_OVERHEAD
        if attached:
            conn.write_parts(encode_message(_DATA, self.id, data))  # type: ignore[arg-type]
            return
        conn.write_frame(encode_frame(_DATA, self.id, data))

    def received(self, data: bytes) -> None:
        """A DATA frame from the client; ProtocolError if it was not allowed to send it."""
        if self.half_closed or self.peer_credit <= 0:
            if self.half_closed:
                what = "after END"
            elif self.inbox is None:
                what = "of a call whose client streams no messages (its REQUEST flags are 0x04)"
            else:
                what = "beyond its flow-control window"
            raise ProtocolError(f"DATA on stream {self.id} {what}")
        cost = len(data) + MESSAGE_OVERHEAD
        self.peer_credit -= cost
        self.progress += 1
        inbox = self.inbox
        if inbox is None or inbox.ended:  # the call is ending: nothing reads it any more
            return
        if len(data) > self.conn.listener.max_message_size:
            self.end(RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size"))
            return
        if not self.conn.listener.server.admit(cost):
            self.end(_BUSY)
            return
        inbox.put(data)

    def _read(self, size: int) -> None:
        """The handler read a message: its bytes leave the budget; grant them back once half a window was read."""
        cost = size + MESSAGE_OVERHEAD
        conn = self.conn
        conn.listener.server.release(cost)
        self.unacked += cost
        if self.unacked >= STREAM_WINDOW // 2 and not self.half_closed:
            self.peer_credit += self.unacked
            # At once, not with this loop turn's other frames: the reader decodes the message it took before the
            # turn ends (for 1 MiB, hundreds of µs), and the peer, out of credit, would wait for that too.
            conn._flush()
            conn.write_now(encode_window_update(self.id, self.unacked))
            self.unacked = 0

    def grant(self, increment: int) -> None:
        """A WINDOW_UPDATE from the client."""
        self.credit += increment
        if self.credit > MAX_WINDOW:
            raise ProtocolError(f"WINDOW_UPDATE overflows the window of stream {self.id}")
        if self.waiter is not None and not self.waiter.done() and self.credit > 0:
            self.progress += 1  # only credit that lets the handler send is progress (not a drip of empty updates)
            self.waiter.set_result(None)

    def half_close(self) -> None:
        """END from the client: the handler's iterator of messages ends after those already received."""
        if not self.half_closed:
            self.half_closed = True
            self.progress += 1
            if self.inbox is not None:
                self.inbox.end()

    def end(self, error: RpcError) -> None:
        """Cancel the handler; the client is answered with `error`."""
        if self.error is None:
            self.error = error
        task = self.conn.calls.get(self.id)
        if task is not None:
            task.cancel()

    def closed(self) -> None:
        """The call's task is done: unread messages leave the budget."""
        if self.inbox is not None:
            dropped = self.inbox.abort(RpcError(Status.CANCELLED, "the call has ended"))
            if dropped:
                self.conn.listener.server.release(dropped)
