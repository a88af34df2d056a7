"""The client side of the tcp transport: one connection, many calls multiplexed by stream id."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Mapping
from typing import cast

import anyio
import orjson

from kubrpc._idle import IdleSignal
from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError, ProtocolError, RpcError
from kubrpc.status import Status

from ._deadlines import Deadlines
from ._frames import (
    FLAG_ACK,
    FRAME_OVERHEAD,
    MAX_STREAM_ID,
    MAX_TIMEOUT_MS,
    PREFACE,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_metadata,
    encode_request,
    parse_goaway,
)
from ._tcp_base import _BATCH_BELOW, _CANCEL, _ERROR, _GOAWAY, _PING, _RESPONSE, FrameWriter, log

__all__ = ("TcpConnection",)

# How long aclose() lets unsent bytes drain before it drops them.
_CLOSE_GRACE = 1.0

# Sent with the preface: a server of protocol version 1 before acknowledgements existed answers it, and
# that answer acknowledges the connection as SETTINGS does (docs/protocol.md).
_HELLO = PREFACE + encode_frame(_PING, 0, b"kubrpcok")


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
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._idle = IdleSignal()
        self._next_stream = 1
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
        self._lost: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._deadlines = Deadlines(self._loop, self._deadline_passed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
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

    async def wait_idle(self) -> None:
        """Return once no call is in flight on this connection."""
        await self._idle.wait(lambda: bool(self._pending))

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """Send one call and wait for its answer; cancelling the wait cancels the call on the server."""
        if self._write_paused:  # the server is not reading what we send: wait (within the deadline) until it does
            await self._writable_within(timeout)
        if not self.usable or self.transport is None:
            raise NotDeliveredError(f"connection to {self.endpoint.address} is closed or draining")
        if len(payload) > self.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        if timeout is None or timeout == math.inf:
            timeout = None
            timeout_ms = 0
        else:
            timeout_ms = min(max(1, math.ceil(timeout * 1000)), MAX_TIMEOUT_MS)
        stream = self._next_stream
        try:  # everything that can fail before the call is registered
            request = encode_request(stream, path, payload, timeout_ms, encode_metadata(metadata) if metadata else b"")
        except struct.error:
            raise RpcError(Status.INVALID_ARGUMENT, "method path too long") from None
        self._next_stream = stream + 1
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[stream] = fut
        if timeout is not None:
            self._deadlines.add(stream, timeout)
        if len(self._pending) == 1 and not self._out:  # nothing in flight to batch with: send now
            self.write_now(request)
        elif len(request) < _BATCH_BELOW:
            self.write(request)
        else:
            self._flush()
            self.write_now(request)
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
            if not self._pending:
                self._idle.notify()
                if self._goaway is not None:
                    self._close_transport()
        if frame.type == _RESPONSE:
            if len(frame.payload) > self.max_message_size:  # the frame limit leaves room for a request's header
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
            return frame.payload
        try:
            body = orjson.loads(frame.payload)
        except orjson.JSONDecodeError:
            body = None
        error = RpcError.from_json(body)
        if error.code is Status.UNAVAILABLE and self._goaway is not None and stream > self._goaway:
            raise NotDeliveredError(error.message)
        raise error

    async def _writable_within(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(None if timeout is None or timeout == math.inf else timeout):
                await self._wait_writable()
        except TimeoutError:
            raise RpcError(
                Status.DEADLINE_EXCEEDED, f"deadline exceeded: {self.endpoint.address} is not reading what is sent"
            ) from None

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
        if self._ack is not None and len(self._first) < 5:  # before the first frame: keep what _speaks_http reads
            self._first += data[: 5 - len(self._first)]
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            if self._ack is not None and not self._ack.done() and (wrong := _speaks_http(self.endpoint, self._first)):
                self._ack.set_result(wrong)  # before any frame: not a kubrpc TCP server at all
            else:
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
        self._goaway_reason = reason
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
                with anyio.move_on_after(_CLOSE_GRACE):
                    await asyncio.shield(self._lost)
                if not self._lost.done() and self.transport is not None:
                    self.transport.abort()  # unsent bytes the server is not reading: do not wait for it
                await self._lost

    def __repr__(self) -> str:
        state = "closed" if self._closed else "going away" if self._goaway is not None else "open"
        return f"<TcpConnection {self.endpoint.address} [{state}, {len(self._pending)} in flight]>"
