"""Client side of stream calls: the typed stub methods, and what a Channel does around each stream.

A stream is one call: the channel picks one endpoint when it opens, and the stream stays there. The stub of a
stream of results is an async generator: leaving its `async for` (break, an exception, a cancelled task) closes
it, which cancels the call on the server. A client stream's messages are sent by a task of their own (the pump),
which the server's flow control slows down; an error of the caller's iterable cancels the call and is raised to
the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

from .errors import RpcError
from .interfaces import ClientStream, StreamRecorder
from .status import Status

if TYPE_CHECKING:
    from .interface import MethodSpec

__all__ = ("StreamCall", "stream_stub")


class StreamCall:
    """A stream call the channel opened: the transport's stream, plus what happens once at its end.

    `on_end(status)` runs once, when the stream ended (the last receive(), an error, or cancel()): the
    balancer's feedback and the stream recorders (metrics) learn the outcome there.
    """

    __slots__ = ("_failure", "_on_end", "_started", "_stream", "path", "received", "sent", "status")

    def __init__(self, stream: ClientStream, path: str, on_end: Callable[[StreamCall], None] | None) -> None:
        self._stream = stream
        self._on_end = on_end
        self._failure: BaseException | None = None
        self._started = time.monotonic()
        self.path = path
        self.status: Status | None = None
        """The final status, once the call has ended."""
        self.received = 0
        self.sent = 0

    @property
    def seconds(self) -> float:
        """Seconds since the stream was opened."""
        return time.monotonic() - self._started

    async def send(self, message: bytes) -> bool:
        """Send one encoded message (waits for flow control); False once the call has ended."""
        if self.status is not None or not await self._stream.send(message):
            return False
        self.sent += 1
        return True

    async def close_send(self) -> None:
        """No more messages from this side."""
        await self._stream.close_send()

    async def receive(self) -> bytes | None:
        """The next encoded message, None at the end; the call's error, or the pump's failure, as raised."""
        try:
            data = await self._stream.receive()
        except RpcError as exc:
            self._end(exc.code)
            if self._failure is not None:
                raise self._failure from None
            raise
        if data is None:
            self._end(Status.OK)
        else:
            self.received += 1
        return data

    def fail(self, exc: BaseException) -> None:
        """The client's side failed (its iterable raised, a message could not be encoded): cancel the call.

        The balancer learns CANCELLED (the endpoint did nothing wrong); metrics count the call under the code of
        `exc` (an RpcError's, else CANCELLED), as the caller sees it.
        """
        if self._failure is None:
            self._failure = exc
        self.cancel()

    def cancel(self) -> None:
        """Cancel the call unless it has ended (idempotent, never blocks)."""
        self._stream.cancel()
        self._end(Status.CANCELLED)

    def _end(self, status: Status) -> None:
        if self.status is None:
            self.status = status
            if self._on_end is not None:
                self._on_end(self)


def record(recorders: tuple[StreamRecorder, ...], call: StreamCall) -> None:
    """Tell the stream recorders (client metrics) how a stream call ended."""
    assert call.status is not None
    failure = call._failure
    status = failure.code if isinstance(failure, RpcError) else call.status
    for recorder in recorders:
        recorder.record_stream(
            call.path, status=status, seconds=call.seconds, received=call.received, sent=call.sent, client=True
        )


def stream_stub(m: MethodSpec, open_stream: Callable[[bytes], Any], attached: bool = False) -> Callable[..., Any]:
    """The stub method of a stream method: `open_stream(payload)` opens the call on the channel.

    `attached`: the channel's transport carries bytes values as attachments (codec.Attached, codec.Packed).
    """
    if m.kind.streams_results:
        if m.kind.streams_requests:
            return _bidi_stub(m, open_stream, attached)
        return _results_stub(m, open_stream, attached)
    return _client_stub(m, open_stream, attached)


def _results_stub(
    m: MethodSpec, open_stream: Callable[[bytes], Any], attached: bool
) -> Callable[..., AsyncGenerator[Any, None]]:
    decode = m.decode_result_attached if attached else m.decode_result
    encode_call = m.encode_call_attached if attached else m.encode_call

    async def results(payload: bytes) -> AsyncGenerator[Any, None]:
        call: StreamCall = await open_stream(payload)
        try:
            while (data := await call.receive()) is not None:
                yield decode(data)
        finally:
            call.cancel()

    def stub(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        # The arguments are bound and encoded here, so that a wrong call fails where it is made, as in Python;
        # the stream opens when the `async for` starts.
        return results(encode_call(args, kwargs))

    return stub


def _client_stub(m: MethodSpec, open_stream: Callable[[bytes], Any], attached: bool) -> Callable[..., Any]:
    decode = m.decode_result_attached if attached else m.decode_result
    split = m.split_stream_attached if attached else m.split_stream

    async def client_stream(*args: Any, **kwargs: Any) -> Any:
        payload, source = split(args, kwargs)
        call: StreamCall = await open_stream(payload)
        pump = asyncio.ensure_future(_pump(call, source, m, attached))
        try:
            data = await call.receive()
            if data is None:
                raise RpcError(Status.INTERNAL, f"{m.path} ended without a result")
            result = decode(data)
            if await call.receive() is not None:
                raise RpcError(Status.INTERNAL, f"{m.path} sent more than one result")
            return result
        finally:
            call.cancel()
            await _stop(pump)

    return client_stream


def _bidi_stub(
    m: MethodSpec, open_stream: Callable[[bytes], Any], attached: bool
) -> Callable[..., AsyncGenerator[Any, None]]:
    decode = m.decode_result_attached if attached else m.decode_result
    split = m.split_stream_attached if attached else m.split_stream

    async def bidi(payload: bytes, source: AsyncIterable[Any]) -> AsyncGenerator[Any, None]:
        call: StreamCall = await open_stream(payload)
        pump = asyncio.ensure_future(_pump(call, source, m, attached))
        try:
            while (data := await call.receive()) is not None:
                yield decode(data)
        finally:
            call.cancel()
            await _stop(pump)

    def stub(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        return bidi(*split(args, kwargs))  # a wrong call fails here, as in Python

    return stub


async def _pump(call: StreamCall, source: AsyncIterable[Any], m: MethodSpec, attached: bool) -> None:
    """Send the caller's messages, then half-close; a failure of the caller's side cancels the call."""
    encode = m.encode_message_attached if attached else m.encode_message
    name = m.stream.name if m.stream is not None else "messages"
    index = 0
    try:
        async for item in source:
            try:
                data = encode(item)
            except TypeError as exc:
                reason = exc.__cause__ if isinstance(exc.__cause__, TypeError) else exc
                call.fail(
                    RpcError(Status.INVALID_ARGUMENT, f"cannot encode message {name}[{index}] of {m.path}: {reason}")
                )
                return
            try:
                if not await call.send(data):
                    return  # the call has ended: the caller learns how from receive()
            except RpcError as exc:
                if exc.code is Status.RESOURCE_EXHAUSTED:  # too large to send: the caller's message is at fault
                    call.fail(exc)
                return
            index += 1
        try:
            await call.close_send()
        except RpcError:
            return
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the stub stopped the pump: the call is over
            raise
        call.fail(exc)  # the caller's iterable raised CancelledError itself: it ends the call like any error
    except BaseException as exc:  # the caller's iterable raised: the call is cancelled, the caller gets this
        call.fail(exc)


async def _stop(pump: asyncio.Future[None]) -> None:
    """Cancel the pump if it still runs, and wait for it (it never raises but CancelledError)."""
    if not pump.done():
        pump.cancel()
    try:
        await pump
    except asyncio.CancelledError:
        if not pump.cancelled():
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
