"""The client side of the tcp transport: one connection, many calls multiplexed by stream id."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

import anyio
import orjson

from kubrpc._idle import IdleSignal
from kubrpc.codec import Attached, Packed
from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError, ProtocolError, RpcError
from kubrpc.interface import CallKind
from kubrpc.status import Status

from ._deadlines import Deadlines
from ._frames import (
    FLAG_ACK,
    FLAG_ATTACHED,
    FLAG_REFUSED,
    FRAME_OVERHEAD,
    HEADER,
    MAX_STREAM_ID,
    MAX_TIMEOUT_MS,
    MAX_WINDOW,
    OVERSIZED,
    PREFACE,
    SETTING_ATTACHMENTS,
    STREAM_WINDOW,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_message,
    encode_metadata,
    encode_request,
    encode_settings,
    encode_window_update,
    parse_goaway,
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
    _GOAWAY,
    _PING,
    _REQUEST,
    _RESPONSE,
    _SETTINGS,
    _WINDOW_UPDATE,
    FLAGS_OF_KIND,
    FrameWriter,
    log,
)

__all__ = ("TcpConnection", "TcpStream")

# The last stream id a connection uses (_request() makes it unusable after that one).
_LAST_STREAM_ID = MAX_STREAM_ID - 1
# How long aclose() lets unsent bytes drain before it drops them.
_CLOSE_GRACE = 1.0

# Sent with the preface: a server of protocol version 1 before acknowledgements existed answers it, and
# that answer acknowledges the connection as SETTINGS does (docs/protocol.md).
_HELLO = PREFACE + encode_frame(_PING, 0, b"kubrpcok")
# Sent before the first call that could carry attachments: a server that reads them answers with its own.
_ASK_ATTACHMENTS = encode_settings((SETTING_ATTACHMENTS, 1))


def _speaks_http(endpoint: Endpoint, first: bytes) -> RpcError | None:
    """The error for a server whose first bytes are an HTTP response ("HTTP" read as a frame length is 1.2 GB)."""
    if not first.startswith(b"HTTP/"):
        return None
    return RpcError(
        Status.FAILED_PRECONDITION,
        f"{endpoint.address} speaks HTTP, not kubrpc's TCP protocol: use http://{endpoint.address} (or https://)",
    )


class TcpConnection(FrameWriter):
    """A client connection: calls multiplexed by stream id, answered in any order."""

    def __init__(self, endpoint: Endpoint, max_message_size: int, keepalive: tuple[float, float] | None = None) -> None:
        self.endpoint = endpoint
        self.max_message_size = max_message_size
        self._keepalive = keepalive
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_received = 0.0
        self._ping_sent = False
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._attached_calls: set[int] = set()  # calls in flight that asked for an answer in attachments
        self._streams: dict[int, TcpStream] = {}
        self._idle = IdleSignal()
        self._next_stream = 1
        # The path and timeout of the last plain REQUEST (no metadata, no flags), and what its frame held after
        # the header, but for the body (_request())
        self._path: str | None = None
        self._timeout: float | None = None
        self._tail = b""
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(max_message_size + FRAME_OVERHEAD)
        self._goaway: int | None = None
        self._goaway_reason = ""
        self._write_paused = False
        self._owed_ack: bytes | None = None  # the last PING received while writes were paused
        # Resolved by the server's first frame (None) or by a failure before it (the error).
        self._ack: asyncio.Future[RpcError | None] | None = None
        self._first = b""  # the server's first bytes until its first frame, for _speaks_http (TCP can split them)
        self._closed = False
        #: May a new call start here? Not before the connection is made, nor once closed, told to go away, or out
        #: of stream ids: new calls must use another connection. (An attribute, not a property: a stub reads it on
        #: every call.)
        self.usable = False
        #: The server reads and writes the attachments format (docs/protocol.md, "Attachments"): it said so in a
        #: SETTINGS frame, in answer to this client's, which the first call that could use it sent (`_asked`).
        self.attachments = False
        self._asked = False
        self._protocol_error: str | None = None  # why this side closed the connection, if the server broke the protocol
        self._lost: asyncio.Future[None] | None = None
        self._loop = loop = asyncio.get_running_loop()
        # The stock loop's create_future(), without its Python frame (another loop's may make its own kind).
        self._new_future: Callable[[], asyncio.Future[Any]] = (
            partial(asyncio.Future, loop=loop)
            if type(loop).create_future is asyncio.BaseEventLoop.create_future
            else loop.create_future
        )
        self._out: list[bytes] = []
        self._deadlines = Deadlines(loop, self._deadline_passed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.usable = not self._closed and self._goaway is None and self._next_stream < MAX_STREAM_ID
        self._lost = self._loop.create_future()
        self._ack = self._loop.create_future()
        self._limit_writes(self.transport)
        self.transport.write(_HELLO)
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

    def pause_writing(self) -> None:
        # Unlike the server, keep reading: answers must get through, or with both ends over their bound
        # each would wait for the other to read. Calls wait to be sent; PINGs get one answer on resume.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._unpause()
        if self._owed_ack is not None:
            self.write(encode_frame(_PING, 0, self._owed_ack, FLAG_ACK))
            self._owed_ack = None

    async def acknowledged(self) -> None:
        """Wait for the server's acknowledgement of the connection; NotDeliveredError if it fails first."""
        ack = self._ack
        if ack is not None:
            error = await ack
            if error is not None:
                raise error
        if self._goaway is not None:  # the first answer was a GOAWAY (too many connections, draining)
            raise NotDeliveredError(f"{self.endpoint.address} sent the connection away: {self._goaway_reason}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.usable = False
        self._unpause()
        if self._ack is not None and not self._ack.done():
            reason = f": {exc}" if exc is not None else ""
            self._ack.set_result(
                NotDeliveredError(
                    f"connection to {self.endpoint.address} lost before the server acknowledged it{reason}"
                )
            )
        self._deadlines.close()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        if self._protocol_error is not None:
            broke = f"the server broke the protocol ({self._protocol_error})"
            reason = f"connection to {self.endpoint.address} closed: {broke}"
        else:
            reason = f"connection to {self.endpoint.address} lost" + (f": {exc}" if exc is not None else "")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RpcError(Status.UNAVAILABLE, reason))
        if self._streams:
            streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.ended(RpcError(Status.UNAVAILABLE, f"{reason} before the stream ended"))
            self._idle.notify()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered (streams not yet ended)."""
        return len(self._pending) + len(self._streams)

    async def wait_idle(self) -> None:
        """Return once no call is in flight on this connection."""
        await self._idle.wait(lambda: bool(self._pending or self._streams))

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """Send one call and wait for its answer; cancelling the wait cancels the call on the server.

        A codec.Attached payload goes in the attachments format if the server reads it (else as its `plain()`
        JSON), and its answer may come back in that format, as a codec.Packed.
        """
        if (
            path is self._path
            and timeout is self._timeout
            and not metadata
            and type(payload) is bytes
            and not self._write_paused
            and self.usable
            and self._next_stream < _LAST_STREAM_ID  # (the last id, and running out, go the general way)
            and len(payload) <= self.max_message_size
        ):
            # A stub's calls: the same path and timeout objects each time, so the same REQUEST but for two fields
            stream = self._next_stream
            tail = self._tail
            request = b"".join((HEADER.pack(len(tail) + len(payload), _REQUEST, 0, stream), tail, payload))
            self._next_stream = stream + 1
            fut: asyncio.Future[bytes] = self._new_future()
            self._pending[stream] = fut
            if timeout is not None:
                self._deadlines.add(stream, timeout)
            if len(self._pending) == 1 and not self._out:  # nothing in flight to batch with: send now
                self.write_now(request)
            elif len(request) < _BATCH_BELOW:  # with this loop turn's others
                self.write(request)
            else:
                self.write_frame(request)
        else:
            stream, fut = await self._send(path, payload, timeout, metadata)
        try:
            # The answer's reader resolves the future and forgets the call (_answered): its result, or its error.
            return await fut
        except RpcError as exc:
            self._forget(stream)
            if exc.code is Status.DEADLINE_EXCEEDED:
                self._cancel(stream)
            raise
        except BaseException:
            self._forget(stream)
            self._cancel(stream)
            raise

    async def _send(
        self, path: str, payload: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> tuple[int, asyncio.Future[bytes]]:
        """call()'s general way to send: any payload, metadata, timeout; it waits while the server is not reading."""
        if self._write_paused:  # the server is not reading what we send: wait (within the deadline) until it does
            timeout = await self._writable_within(timeout)
        if timeout == math.inf:
            timeout = None
        attached = 0
        if type(payload) is Attached:
            payload, attached = self._attached(payload)
        stream, request = self._request(path, payload, timeout, metadata, attached)
        fut: asyncio.Future[bytes] = self._new_future()
        self._pending[stream] = fut
        if attached:
            self._attached_calls.add(stream)
        if timeout is not None:
            self._deadlines.add(stream, timeout)
        if type(request) is list:
            self.write_parts(request)
        elif len(self._pending) == 1 and not self._out:  # nothing in flight to batch with: send now
            self.write_now(request)
        else:
            self.write_frame(request)
        return stream, fut

    def _forget(self, stream: int) -> None:
        """A call that ended without its answer (deadline, cancelled, connection lost) is in flight no more."""
        if self._pending.pop(stream, None) is not None:
            self._deadlines.discard(stream)
            self._attached_calls.discard(stream)
            if not self._pending and not self._streams:
                self._quiet()

    def _quiet(self) -> None:
        """Nothing is in flight any more: wake wait_idle(), and close a connection told to go away."""
        self._idle.notify()
        if self._goaway is not None:
            self._close_transport()

    def _answered(self, frame: Frame, fut: asyncio.Future[bytes]) -> None:
        """Resolve a call's future with the RESPONSE or ERROR `frame` (the call was forgotten already)."""
        stream = frame.stream
        self._deadlines.discard(stream)
        attached = stream in self._attached_calls
        self._attached_calls.discard(stream)
        if fut.done():  # its deadline passed, or the connection was lost, before this answer was read
            return
        if frame.type == _RESPONSE:
            if len(frame.payload) > self.max_message_size:  # the frame limit leaves room for a request's header
                fut.set_exception(RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size"))
            elif type(frame.payload) is Packed and not attached:
                fut.set_exception(_unasked(self.endpoint))
            else:
                fut.set_result(frame.payload)
            return
        error = _error_of(frame.payload)
        if error.code is Status.UNAVAILABLE and self._goaway is not None and stream > self._goaway:
            error = NotDeliveredError(error.message)
        fut.set_exception(error)

    async def open_stream(
        self, path: str, payload: bytes, *, kind: CallKind, timeout: float | None, metadata: Mapping[str, str]
    ) -> TcpStream:
        """Start a stream call (kubrpc.interfaces.StreamingConnection); return once the server accepted it."""
        if self._write_paused:
            timeout = await self._writable_within(timeout)
        if timeout == math.inf:
            timeout = None
        attached = 0
        if type(payload) is Attached:
            payload, attached = self._attached(payload)
        stream_id, request = self._request(path, payload, timeout, metadata, FLAGS_OF_KIND[kind] | attached)
        stream = TcpStream(self, stream_id, kind, None if timeout is None else self._loop.time() + timeout)
        stream.attached = attached != 0
        self._streams[stream_id] = stream
        if timeout is not None:
            self._deadlines.add(stream_id, timeout)
        if type(request) is list:
            self.write_parts(request)
        else:
            self.write_frame(request)
        try:
            await stream.accepted
        except BaseException:
            stream.cancel()
            raise
        return stream

    def _attached(self, payload: Attached) -> tuple[bytes, int]:
        """What to send of a message in the attachments format, and its flag: itself once the server reads it,
        else its JSON.

        The first one asks the server (a SETTINGS frame; servers that predate it ignore it); until a server
        says that it reads attachments (its own SETTINGS), messages go as plain JSON.
        """
        if self.attachments:
            return payload, FLAG_ATTACHED
        if not self._asked and self.transport is not None:
            self._asked = True
            self.write(_ASK_ATTACHMENTS)
        return payload.plain(), 0

    def _request(
        self, path: str, payload: bytes, timeout: float | None, metadata: Mapping[str, str], flags: int
    ) -> tuple[int, Any]:
        """A new call's stream id and REQUEST frame; what can fail before a call is registered fails here.

        A REQUEST in the attachments format (FLAG_ATTACHED, a codec.Attached payload) comes as encode_message's parts.
        """
        stream = self._next_stream
        if not self.usable or stream >= MAX_STREAM_ID:
            raise NotDeliveredError(f"connection to {self.endpoint.address} is closed or draining")
        attached = flags & FLAG_ATTACHED
        if (payload.size if attached else len(payload)) > self.max_message_size:  # type: ignore[attr-defined]
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        if timeout is None:
            timeout_ms = 0
        else:
            timeout_ms = min(max(1, math.ceil(timeout * 1000)), MAX_TIMEOUT_MS)
        meta = encode_metadata(metadata) if metadata else b""
        request: bytes | list[bytes]  # bytes, or encode_message's parts (write_parts)
        try:
            if attached:
                head = encode_request(stream, path, b"", timeout_ms, meta)[HEADER.size :]
                request = encode_message(FrameType.REQUEST, stream, cast(Attached, payload), flags, head)
            else:
                request = encode_request(stream, path, payload, timeout_ms, meta, flags)
                if not meta and not flags:  # what follows the frame's header, but for the body: for the next call
                    self._path, self._timeout = path, timeout
                    self._tail = request[HEADER.size : len(request) - len(payload)]
        except struct.error:
            raise RpcError(Status.INVALID_ARGUMENT, "method path too long") from None
        self._next_stream = stream + 1
        if stream + 1 >= MAX_STREAM_ID:  # that was the last id
            self.usable = False
        return stream, request

    def _stream_closed(self, stream: int) -> None:
        """A stream has ended or was cancelled: it is in flight no more."""
        del self._streams[stream]
        self._deadlines.discard(stream)
        if not self._streams and not self._pending:
            self._quiet()

    def _stream_frame(self, frame: Frame) -> bool:
        """A frame of a stream call (ignored if that call has ended); False if it broke the protocol (closed)."""
        stream = self._streams.get(frame.stream)
        if stream is None:
            return True
        kind = frame.type
        try:
            if kind == _DATA:
                if type(frame.payload) is Packed and not stream.attached:
                    raise ProtocolError(f"DATA in the attachments format on stream {frame.stream}, which did not ask")
                stream.received(frame.payload)
            elif kind == _WINDOW_UPDATE:
                stream.grant(parse_window_update(frame.payload))
        except ProtocolError as exc:
            self._broken(str(exc))
            return False
        if kind == _DATA or kind == _WINDOW_UPDATE:
            return True
        if kind == _RESPONSE:
            if len(frame.payload) > self.max_message_size:
                stream.ended(RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size"))
            elif type(frame.payload) is Packed and not stream.attached:
                stream.ended(_unasked(self.endpoint))
            else:
                stream.ended(None, frame.payload)
        else:  # ERROR
            error = _error_of(frame.payload)
            if not stream.accepted.done() and (
                frame.flags & FLAG_REFUSED
                or (error.code is Status.UNAVAILABLE and self._goaway is not None and frame.stream > self._goaway)
            ):
                error = NotDeliveredError(error.message, unreachable=False)
            stream.ended(error)
        return True

    def _broken(self, reason: str) -> None:
        """The server broke the protocol: close the connection; its calls fail UNAVAILABLE saying why."""
        log.warning("closing connection to %s: %s", self.endpoint.address, reason)
        self._protocol_error = reason
        if self.transport is not None:
            self.transport.abort()

    async def _writable_within(self, timeout: float | None) -> float | None:
        """Wait until the server reads what is sent, within `timeout`; the time left of it (None, inf: no limit)."""
        if timeout is None or timeout == math.inf:
            await self._wait_writable()
            return timeout
        started = self._loop.time()
        try:
            async with asyncio.timeout(timeout):
                await self._wait_writable()
        except TimeoutError:
            left = 0.0
        else:  # the call's deadline counts from its start, not from here: what is left of it goes on
            left = timeout - (self._loop.time() - started)
        if left <= 0:
            raise RpcError(
                Status.DEADLINE_EXCEEDED, f"deadline exceeded: {self.endpoint.address} is not reading what is sent"
            )
        return left

    def _close_transport(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _cancel(self, stream: int) -> None:
        self.write(encode_frame(_CANCEL, stream))

    def _deadline_passed(self, stream: int) -> None:
        fut = self._pending.get(stream)
        if fut is not None:
            if not fut.done():
                fut.set_exception(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))
        elif (open_stream := self._streams.get(stream)) is not None:
            open_stream.expired()

    def _read_answers(self, data: bytes) -> int:
        """Resolve the calls answered by the plain RESPONSE frames at the start of `data`; where the first other
        frame (or a partial one) starts.

        The hot path of a client, as FrameDecoder.feed() and _answered() would do it, without a Frame each.
        """
        pending, forget, unpack_from, limit = (
            self._pending,
            self._deadlines.forget,
            HEADER.unpack_from,
            self.max_message_size,
        )
        at, end = 0, len(data)
        while end - at >= 10:  # HEADER.size
            length, kind, flags, stream = unpack_from(data, at)
            stop = at + 10 + length
            if kind != _RESPONSE or flags or stop > end or length > limit:
                break
            fut = pending.pop(stream, None)
            if fut is None:  # a stream's answer, or one to a call that has ended
                break
            forget(stream, None)
            try:
                fut.set_result(data[at + 10 : stop])
            except asyncio.InvalidStateError:  # its deadline passed, it was cancelled, or the connection lost, before
                pass
            at = stop
        return at

    def data_received(self, data: bytes) -> None:
        if self._keepalive is not None:
            self._last_received = self._loop.time()
            self._ping_sent = False
        decoder = self._decoder
        # The usual case: acknowledged, nothing held over from the last read, no call that asked for attachments
        if self._ack is None and not decoder._buffer and not decoder._skip and not self._attached_calls:
            at = self._read_answers(data)
            if at:
                # Its last call answered: say so now, whatever follows (a PING, the start of a frame, ...)
                if not self._pending and not self._streams:
                    self._quiet()
                if at == len(data):
                    return
                data = data[at:]  # the rest (another kind of frame, or a frame not all here yet) goes the general way
        elif self._ack is not None and len(self._first) < 5:  # before the first frame: keep what _speaks_http reads
            self._first += data[: 5 - len(self._first)]
        try:
            frames = decoder.feed(data)
        except ProtocolError as exc:
            if self._ack is not None and not self._ack.done() and (wrong := _speaks_http(self.endpoint, self._first)):
                self._ack.set_result(wrong)  # before any frame: not a kubrpc TCP server at all
                if self.transport is not None:
                    self.transport.abort()
            else:
                self._broken(str(exc))
            return
        for frame in frames:
            kind = frame.type
            if kind == _RESPONSE or kind == _ERROR:
                fut = self._pending.pop(frame.stream, None)
                if fut is not None:
                    self._answered(frame, fut)
                    if not self._pending and not self._streams:
                        self._quiet()
                elif self._streams and not self._stream_frame(frame):
                    return
            elif kind == _DATA or kind == _WINDOW_UPDATE:
                if not self._stream_frame(frame):
                    return
            elif kind == OVERSIZED:  # a message over the frame limit, skipped unread: end its stream alone
                stream = self._streams.get(frame.stream)
                if stream is not None:
                    self._stream_closed(frame.stream)
                    self._cancel(frame.stream)
                    stream.ended(RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size"))
            elif kind == _GOAWAY:
                self._on_goaway(frame.payload)
            elif kind == _SETTINGS and frame.payload and self._asked:  # the answer to ours
                if parse_settings(frame.payload).get(SETTING_ATTACHMENTS, 0) >= 1:
                    self.attachments = True
            elif kind == _PING and not frame.flags & FLAG_ACK and self.transport is not None:
                if self._write_paused:  # the server is not reading: owe it one answer, not one per PING
                    self._owed_ack = frame.payload[:64]
                else:
                    self.write(encode_frame(_PING, 0, frame.payload[:64], FLAG_ACK))
        ack = self._ack
        if ack is not None and frames:  # the server's first frame: the connection is acknowledged
            self._ack = None
            if not ack.done():
                ack.set_result(None)

    def _on_goaway(self, payload: bytes) -> None:
        try:
            last, reason = parse_goaway(payload)
        except ProtocolError:  # it does not say which calls the server saw: assume it saw every one sent
            last, reason = self._next_stream - 1, "malformed GOAWAY"
        self._goaway = last
        self.usable = False
        self._goaway_reason = reason
        for stream, fut in self._pending.items():
            if stream > last and not fut.done():
                fut.set_exception(NotDeliveredError(f"{self.endpoint.address} is going away: {reason}"))
        for stream_id, opened in list(self._streams.items()):
            if stream_id > last and not opened.accepted.done():  # not seen by the server: it may go elsewhere
                opened.ended(NotDeliveredError(f"{self.endpoint.address} is going away: {reason}", unreachable=False))
        if not self._pending and not self._streams:
            self._close_transport()

    async def aclose(self) -> None:
        """Close the connection and wait until the socket is released."""
        self._closed = True
        self.usable = False
        self._close_transport()
        if self._lost is not None:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(_CLOSE_GRACE):
                    await asyncio.shield(self._lost)
                if not self._lost.done() and self.transport is not None:
                    self.transport.abort()  # unsent bytes the server is not reading: do not wait for it
                await self._lost

    def __repr__(self) -> str:
        state = "closed" if self._closed else "going away" if self._goaway is not None else "open"
        return f"<TcpConnection {self.endpoint.address} [{state}, {self.in_flight} in flight]>"


def _unasked(endpoint: Endpoint) -> RpcError:
    return RpcError(
        Status.INTERNAL, f"{endpoint.address} answered in the attachments format, which the call did not ask for"
    )


def _error_of(payload: bytes) -> RpcError:
    """The RpcError an ERROR frame carries."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        body = None
    return RpcError.from_json(body)


class TcpStream:
    """The client's end of one stream call (kubrpc.interfaces.ClientStream) on a TcpConnection.

    `credit` is what this side may still send (granted by the server: its accepting WINDOW_UPDATE, then more
    as its handler reads); `peer_credit` what the server may still send (STREAM_WINDOW at the start, granted
    back as receive() reads, half a window at a time). A message goes while credit is above zero.
    """

    __slots__ = (
        "_waiter",
        "accepted",
        "attached",
        "conn",
        "credit",
        "deadline",
        "half_closed",
        "id",
        "inbox",
        "kind",
        "peer_credit",
        "unacked",
    )

    def __init__(self, conn: TcpConnection, stream: int, kind: CallKind, deadline: float | None) -> None:
        self.conn = conn
        self.id = stream
        self.kind = kind
        self.deadline = deadline  # loop time
        self.accepted: asyncio.Future[None] = conn._loop.create_future()
        self.credit = 0
        self.peer_credit = STREAM_WINDOW if kind.streams_results else 0
        self.unacked = 0
        self.inbox = Inbox(self._read)
        self.half_closed = False
        self._waiter: asyncio.Future[None] | None = None
        self.attached = False  # opened in the attachments format: the server reads it, and may answer in it

    async def send(self, message: bytes, /) -> bool:
        """Send one message once the server has granted credit; False once the call has ended.

        A codec.Attached message goes in the attachments format if the stream was opened in it, else as JSON.
        """
        conn = self.conn
        attached = type(message) is Attached
        if attached and not self.attached:
            message, attached = cast(Attached, message).plain(), False
        size = cast(Attached, message).size if attached else len(message)
        if size > conn.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        inbox = self.inbox
        while self.credit <= 0 and not inbox.ended:
            self._waiter = conn._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if conn._write_paused and not inbox.ended:
            await conn._writable_within(None if self.deadline is None else self.deadline - conn._loop.time())
        if inbox.ended or self.half_closed:
            return False
        self.credit -= size + MESSAGE_OVERHEAD
        if attached:
            conn.write_parts(encode_message(_DATA, self.id, cast(Attached, message)))
            return True
        conn.write_frame(encode_frame(_DATA, self.id, message))
        return True

    async def close_send(self) -> None:
        """Half-close: an END frame; the server's iterator of messages ends."""
        if not self.half_closed and not self.inbox.ended:
            self.half_closed = True
            self.conn.write(encode_frame(_END, self.id))

    async def receive(self) -> bytes | None:
        """The server's next message, None at the end, or the call's error."""
        return await self.inbox.get()

    def cancel(self) -> None:
        """Cancel the call on the server unless it has ended (a CANCEL frame); idempotent."""
        conn = self.conn
        if conn._streams.get(self.id) is self:
            conn._stream_closed(self.id)
            conn._cancel(self.id)
        self.ended(RpcError(Status.CANCELLED, "cancelled by the client"), abort=True)

    def expired(self) -> None:
        """The stream's deadline passed: cancel it on the server; the reader gets DEADLINE_EXCEEDED."""
        conn = self.conn
        conn._stream_closed(self.id)
        conn._cancel(self.id)
        self.ended(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"), abort=True)

    def received(self, data: bytes) -> None:
        """A DATA frame; ProtocolError if the server was not allowed to send it."""
        if not self.accepted.done():  # it ran: a refusal after this must not send the stream elsewhere
            raise ProtocolError(f"DATA on stream {self.id} before the server accepted it with a WINDOW_UPDATE")
        if self.peer_credit <= 0:
            what = "beyond its flow-control window"
            if not self.kind.streams_results:
                what = "of a call that streams no results"
            raise ProtocolError(f"DATA on stream {self.id} {what}")
        self.peer_credit -= len(data) + MESSAGE_OVERHEAD
        if len(data) > self.conn.max_message_size:
            self.conn._stream_closed(self.id)
            self.conn._cancel(self.id)
            self.ended(RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size"))
            return
        self.inbox.put(data)

    def grant(self, increment: int) -> None:
        """A WINDOW_UPDATE: the server accepted the stream (the first one) or read more of it."""
        if not self.accepted.done():
            self.accepted.set_result(None)
        self.credit += increment
        if self.credit > MAX_WINDOW:
            raise ProtocolError(f"WINDOW_UPDATE overflows the window of stream {self.id}")
        self._wake()

    def _read(self, size: int) -> None:
        self.unacked += size + MESSAGE_OVERHEAD
        if self.unacked >= STREAM_WINDOW // 2:
            conn = self.conn
            if conn._streams.get(self.id) is self:
                self.peer_credit += self.unacked
                # At once, not with this loop turn's other frames: the reader decodes the message it took before the
                # turn ends (for 1 MiB, hundreds of µs), and the peer, out of credit, would wait for that too.
                conn._flush()
                conn.write_now(encode_window_update(self.id, self.unacked))
            self.unacked = 0

    def ended(self, error: RpcError | None, result: bytes = b"", *, abort: bool = False) -> None:
        """The server ended the call (or it failed here): the reader gets `result`, then None or `error`."""
        conn = self.conn
        if conn._streams.get(self.id) is self:
            conn._stream_closed(self.id)
        inbox = self.inbox
        if not inbox.ended:
            if abort:
                inbox.abort(error or RpcError(Status.CANCELLED, "cancelled"))
            else:
                if result:
                    inbox.put(result)
                inbox.end(error)
        if not self.accepted.done():
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)
                self.accepted.exception()  # retrieved: open_stream may no longer be waiting for it
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
