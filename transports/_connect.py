"""The Connect protocol (JSON codec) on the HTTP transport: unary calls, and stream calls (at the end).

A request that carries `Connect-Protocol-Version` is a Connect call: its body is the `<Method>Request` message of
the schema `kubrpc proto` renders, in proto3 JSON, and its answer is the response message in proto3 JSON
(kubrpc._protojson converts both to and from the native JSON the handlers see). Errors are Connect's error JSON,
which the native wire already is: `{"code", "message", "details"}` with Connect's HTTP statuses. The deadline
(`Connect-Timeout-Ms`), the size limits, admission and cancellation on disconnect are the native path's: the call
goes through the same `_App._rpc`, over a ServerCore whose dispatch() converts the JSON (ConnectCore).

Not served: the binary codec (`application/proto`, 415), compression (`Content-Encoding`, unimplemented), and
Connect GET requests (`?connect=v1&message=...`: 405, as kubrpc's schema marks no method side-effect free, so
generated clients never send them).

Stream calls (`Content-Type: application/connect+json`) are Connect's streaming protocol: enveloped messages
(transports/_envelope.py) and an end-of-stream envelope that carries the error. kubrpc's own client sends
`Kubrpc-Codec: native` (native JSON messages, the arguments first); without it the messages are proto3 JSON.
Bidirectional streams of kubrpc's client use a WebSocket on the same path, with the same envelopes. The wire is
docs/protocol.md, "HTTP streaming".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from kubrpc._asgi_server import NOT_STARTED, send_json
from kubrpc._protojson import MethodCodec, client_stream_codec, method_codec
from kubrpc.errors import RpcError
from kubrpc.interface import CallKind
from kubrpc.status import Status

from ._envelope import END_STREAM, Decoder, EnvelopeError, envelope
from ._streams import Inbox

if TYPE_CHECKING:
    from kubrpc._limits import ServerLimits
    from kubrpc.interface import MethodSpec, ServiceSpec
    from kubrpc.interfaces import InlineDispatch, MetricsExposition, ServerCore
    from kubrpc.openapi import Info

__all__ = ("VERSION_HEADER", "ConnectCore", "is_connect", "route", "serve", "serve_stream", "serve_websocket")

log = logging.getLogger("kubrpc.connect")

VERSION_HEADER = b"connect-protocol-version"
_JSON = b"application/json"
_VERSION_HELP = "kubrpc speaks version 1 of the Connect protocol"
_ACCEPT_POST = ((b"accept-post", b"application/json"),)
_CODEC_HELP = (
    "kubrpc speaks Connect with the JSON codec only: send Content-Type application/json "
    "(connect-es: useBinaryFormat: false; connect-go: connect.WithProtoJSON())"
)


def is_connect(headers: list[tuple[bytes, bytes]]) -> bool:
    """Does the request carry Connect-Protocol-Version (a Connect call, not a native one)?"""
    for name, _ in headers:
        if name == VERSION_HEADER:
            return True
    return False


Rpc = Callable[[str, Scope, Receive, Send], Awaitable[None]]


async def serve(rpc: Rpc, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Check a Connect request's protocol version, codec and encoding, then run it with `rpc` (a ConnectCore's)."""
    version: bytes | None = None
    media: str | None = None
    charset: str | None = None
    encoding: bytes | None = None
    for name, value in scope["headers"]:
        if name == VERSION_HEADER:
            version = value
        elif name == b"content-type":
            media, charset = _media(value)
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    if version != b"1":
        shown = (version or b"").decode("latin-1")[:40]
        message = f"Connect-Protocol-Version must be 1, not {shown!r}: " + _VERSION_HELP
        await _error(send, 400, Status.INVALID_ARGUMENT, message)
        return
    if scope["method"] == "POST" and media != "application/json":  # (application/connect+*: a stream, routed before)
        message = (f"Content-Type {media} is not supported: " if media else "no Content-Type: ") + _CODEC_HELP
        await _error(send, 415, Status.UNIMPLEMENTED, message, *_ACCEPT_POST)
        return
    if charset is not None:
        await _error(send, 415, Status.UNIMPLEMENTED, _charset_message(charset), *_ACCEPT_POST)
        return
    if encoding not in (None, b"identity"):
        shown = encoding.decode("latin-1")[:40]
        message = f"Content-Encoding {shown!r} is not supported: send the request uncompressed"
        await _error(send, 501, Status.UNIMPLEMENTED, message, (b"accept-encoding", b"identity"))
        return
    await rpc(path, scope, receive, send)


def _media(value: bytes) -> tuple[str, str | None]:
    """A Content-Type's media type, and its charset unless it is UTF-8 (JSON is UTF-8, RFC 8259)."""
    media, _, parameters = value.decode("latin-1").partition(";")
    charset = None
    for parameter in parameters.split(";"):
        key, _, given = parameter.partition("=")
        if key.strip().lower() == "charset" and given.strip().strip('"').lower() not in ("utf-8", "utf8"):
            charset = given.strip()[:40]
    return media.strip().lower(), charset


def _charset_message(charset: str) -> str:
    return f"charset {charset!r} is not supported: JSON messages are UTF-8 (send charset=utf-8, or none)"


async def _error(send: Send, status: int, code: Status, message: str, *extra: tuple[bytes, bytes]) -> None:
    await send_json(send, status, orjson.dumps({"code": code.wire_name, "message": message}), extra)


class ConnectCore:
    """A ServerCore whose dispatch() takes and returns proto3 JSON messages (Connect's JSON codec)."""

    __slots__ = ("codecs", "core")

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.codecs: dict[str, MethodCodec | None] = {}

    @property
    def limits(self) -> ServerLimits:
        """The served core's limits."""
        return self.core.limits

    @property
    def draining(self) -> bool:
        """True once the served core is shutting down."""
        return self.core.draining

    @property
    def services(self) -> Mapping[str, ServiceSpec]:
        """The served core's services."""
        return self.core.services

    @property
    def openapi(self) -> Info | None:
        """The served core's schema info."""
        return self.core.openapi

    @property
    def metrics(self) -> MetricsExposition | None:
        """The served core's metrics."""
        return self.core.metrics

    def admit(self, size: int, /) -> bool:
        """Admission, as the served core counts it."""
        return self.core.admit(size)

    def release(self, size: int, /) -> None:
        """Give back what admit() counted."""
        self.core.release(size)

    def method(self, path: str, /) -> MethodSpec | None:
        """The served core's method at `path`."""
        return self.core.method(path)

    def runs_inline(self, path: str, /) -> bool:
        """Whether the served core's call at `path` never waits."""
        return self.core.runs_inline(path)

    def dispatch_inline(self, path: str, /) -> InlineDispatch | None:
        """The served core's dispatch of a call at `path` that never waits, as a plain function."""
        return self.core.dispatch_inline(path)

    async def dispatch_stream(
        self,
        path: str,
        payload: bytes,
        *,
        messages: AsyncIterator[bytes] | None,
        send: Callable[[bytes], Awaitable[None]],
        timeout: float | None,
        metadata: Mapping[str, str],
        peer: str = "",
        deadline_enforced: bool = False,
    ) -> bytes | None:
        """Streams are served by serve_stream(), which converts their messages itself: the served core's."""
        return await self.core.dispatch_stream(
            path,
            payload,
            messages=messages,
            send=send,
            timeout=timeout,
            metadata=metadata,
            peer=peer,
            deadline_enforced=deadline_enforced,
        )

    def codec(self, path: str) -> MethodCodec | None:
        """The proto3 JSON codec of the method at `path`; None if no service has it (dispatch says so)."""
        try:
            return self.codecs[path]
        except KeyError:
            pass
        found = None
        service, _, name = path.partition("/")
        spec = self.core.services.get(service)
        if spec is not None:
            for m in spec.methods.values():
                if m.name == name:
                    try:
                        found = method_codec(m)
                    except TypeError as exc:  # a type with no protobuf form: `kubrpc proto` refuses it too
                        raise RpcError(Status.UNIMPLEMENTED, f"{path} cannot be called with Connect: {exc}") from None
        if len(self.codecs) < 10_000:
            self.codecs[path] = found
        return found

    async def dispatch(
        self,
        path: str,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Mapping[str, str],
        peer: str = "",
        deadline_enforced: bool = False,
    ) -> bytes:
        """Run a Connect call: its request message as native arguments, its result as the response message."""
        codec = self.codec(path)
        if codec is None:  # the core answers unknown paths (UNIMPLEMENTED, with hints)
            return await self.core.dispatch(
                path, payload, timeout=timeout, metadata=metadata, peer=peer, deadline_enforced=deadline_enforced
            )
        native = codec.request_to_native(payload)
        try:
            result = await self.core.dispatch(
                path, native, timeout=timeout, metadata=metadata, peer=peer, deadline_enforced=deadline_enforced
            )
        except RpcError as exc:
            if exc.code is Status.INVALID_ARGUMENT and exc.details:
                raise codec.native_error(exc) from None
            raise
        try:
            return codec.response_to_proto(result)
        except (TypeError, ValueError, RecursionError):
            log.exception("the result of %s cannot be written as its proto3 JSON message", path)
            raise RpcError(Status.INTERNAL, "internal error") from None


# -- Streams: the Connect streaming protocol over POST, and bidirectional streams over a WebSocket ----------------

STREAM_MEDIA = "application/connect+json"
CODEC_HEADER = b"kubrpc-codec"  # "native": kubrpc's own client, whose messages are native JSON
_STREAM_HEAD = [(b"content-type", STREAM_MEDIA.encode())]
#: Bytes of a client's messages a stream holds unread before it stops reading the connection (flow control).
STREAM_WINDOW = 64 * 1024
_YIELD_EVERY = (
    4  # messages written without the loop turning, at most (asyncio warns from the 5th write to a lost socket)
)


def route(headers: list[tuple[bytes, bytes]]) -> int:
    """0: a native call; 1: a Connect unary call (Connect-Protocol-Version); 2: a stream (application/connect+*)."""
    kind = 0
    for name, value in headers:
        if name == b"content-type":
            if value.startswith(b"application/connect+"):
                return 2
        elif name == VERSION_HEADER:
            kind = 1
    return kind


class _Refused(Exception):
    """A stream refused before its response started: answered with an HTTP error."""

    def __init__(self, status: int, code: Status, message: str, *extra: tuple[bytes, bytes]) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _stream_head(scope: Scope, limit: int) -> tuple[float | None, dict[str, str], bool]:
    """A stream request's deadline, metadata and whether it is kubrpc's native codec; _Refused if it is bad."""
    timeout: float | None = None
    metadata: dict[str, str] = {}
    native = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            media, charset = _media(value)
            if charset is not None and scope["type"] == "http":
                raise _Refused(
                    415, Status.UNIMPLEMENTED, _charset_message(charset), (b"accept-post", STREAM_MEDIA.encode())
                )
            if media != STREAM_MEDIA and scope["type"] == "http":
                message = (
                    f"Content-Type {media} is not supported: kubrpc speaks Connect with the JSON codec only, "
                    f"send {STREAM_MEDIA} (connect-es: useBinaryFormat: false; connect-go: connect.WithProtoJSON())"
                )
                raise _Refused(415, Status.UNIMPLEMENTED, message, (b"accept-post", STREAM_MEDIA.encode()))
        elif name == b"connect-timeout-ms":
            if not value.isdigit() or len(value) > 10 or value[0] == 48:
                shown = value.decode("latin-1")[:40]
                raise _Refused(400, Status.INVALID_ARGUMENT, f"bad connect-timeout-ms header: {shown!r}")
            timeout = int(value) / 1000
        elif name == b"connect-content-encoding":
            if value.strip().lower() != b"identity":
                shown = value.decode("latin-1")[:40]
                message = f"Connect-Content-Encoding {shown!r} is not supported: send the messages uncompressed"
                raise _Refused(501, Status.UNIMPLEMENTED, message, (b"connect-accept-encoding", b"identity"))
        elif name == CODEC_HEADER:
            if value != b"native":
                raise _Refused(400, Status.INVALID_ARGUMENT, "Kubrpc-Codec must be 'native' (or absent: proto3 JSON)")
            native = True
        elif name not in (b"content-length", b"transfer-encoding"):
            if name == VERSION_HEADER and value != b"1":  # as for a unary call
                shown = value.decode("latin-1")[:40]
                message = f"Connect-Protocol-Version must be 1, not {shown!r}: " + _VERSION_HELP
                raise _Refused(400, Status.INVALID_ARGUMENT, message)
            metadata[name.decode("latin-1")] = value.decode("latin-1")
    if not native and scope["type"] == "websocket":
        # Only kubrpc's client streams over a WebSocket, and it says so with a header a web page cannot set on a
        # WebSocket handshake: a page on another site could otherwise call the server's streams (and read their
        # messages) from a browser, which sends the user's cookies along and no CORS check holds back.
        message = (
            "a WebSocket stream needs the header Kubrpc-Codec: native (kubrpc's client sends it); "
            f"Connect clients call stream methods with POST and Content-Type {STREAM_MEDIA}"
        )
        raise _Refused(400, Status.INVALID_ARGUMENT, message)
    return timeout, metadata, native


def _end_stream(error: RpcError | None) -> bytes:
    """The end-of-stream envelope: `{}`, or `{"error": {...}}`."""
    return envelope(orjson.dumps({} if error is None else {"error": error.to_json()}), END_STREAM)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return ""
    host = f"[{client[0]}]" if ":" in client[0] else client[0]
    return f"{host}:{client[1]}"


class _Codec:
    """How one stream's messages convert between the wire and the native JSON the core sees."""

    __slots__ = ("first", "later", "result")

    def __init__(self, spec: MethodSpec | None, path: str, native: bool) -> None:
        self.first: Callable[[bytes | None], tuple[bytes, bytes | None]] = _native_first
        self.later: Callable[[bytes], bytes] = _same
        self.result: Callable[[bytes], bytes] = _same
        if native or spec is None:
            return
        if spec.kind is CallKind.BIDI_STREAM:
            raise RpcError(
                Status.UNIMPLEMENTED,
                f"{path} is a bidirectional stream: Connect carries those over HTTP/2 only, which this server does "
                "not serve (uvicorn speaks HTTP/1.1); kubrpc's own client calls it over a WebSocket",
            )
        try:
            if spec.kind is CallKind.CLIENT_STREAM:
                stream = client_stream_codec(spec)
                self.first, self.later = stream.first, stream.later
                self.result = stream.response.to_proto
            else:
                unary = method_codec(spec)
                self.first = partial(_proto_first, unary)
                self.result = unary.response_to_proto
        except TypeError as exc:
            raise RpcError(Status.UNIMPLEMENTED, f"{path} cannot be called with Connect: {exc}") from None


def _same(data: bytes) -> bytes:
    return data


def _native_first(data: bytes | None) -> tuple[bytes, bytes | None]:
    return (b"{}" if data is None else data), None


def _proto_first(codec: MethodCodec, data: bytes | None) -> tuple[bytes, bytes | None]:
    return codec.request_to_native(b"{}" if data is None else data), None


class _ServerStream:
    """One stream call on the server: reads the client's envelopes into an Inbox (a task of its own) while the
    handler runs in the ASGI task; any failure of the reader (a malformed envelope, the client gone) cancels it."""

    def __init__(self, core: ServerCore, spec: MethodSpec | None, codec: _Codec) -> None:
        self.core = core
        self.spec = spec
        self.codec = codec
        self.limit = core.limits.max_message_size
        streams_requests = spec is not None and spec.kind.streams_requests
        self.inbox: Inbox | None = Inbox(self._read) if streams_requests else None
        self.payload: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.held = 0  # bytes of unread messages counted by core.admit()
        self.partial = 0  # bytes of an envelope still arriving, counted by core.admit() (_http_envelopes)
        self.first = True  # the first request envelope (the arguments) has not arrived yet
        self.failure: RpcError | None = None
        self.disconnected = False
        self.task = asyncio.current_task()

    def _read(self, size: int) -> None:
        self.held -= size
        self.core.release(size)

    def release(self) -> None:
        """Give back what the unread messages hold (the stream has ended)."""
        if self.inbox is not None:
            self.inbox.abort(RpcError(Status.CANCELLED, "the call has ended"))
        self.core.release(self.held + self.partial)
        self.held = self.partial = 0

    async def pump(self, envelopes: AsyncIterator[tuple[int, bytes]], watch: Callable[[], Awaitable[None]]) -> None:
        """Read the request messages, then wait for the client to go away (`watch`); a failure cancels the call."""
        inbox = self.inbox
        try:
            async for flags, data in envelopes:
                if flags:
                    raise RpcError(Status.INVALID_ARGUMENT, f"unexpected envelope flags 0x{flags:02x} in a request")
                if self.first:
                    self.first = False
                    payload, item = self.codec.first(data)
                    self.payload.set_result(payload)
                    if item is None:
                        continue
                    data = item
                else:
                    if inbox is None:
                        raise RpcError(Status.INVALID_ARGUMENT, "a server stream takes exactly one request message")
                    data = self.codec.later(data)
                if inbox is None:  # (a proto client stream's first message carries an item)
                    continue
                if not self.core.admit(len(data)):
                    raise RpcError(Status.RESOURCE_EXHAUSTED, "server busy: too many request bytes held")
                self.held += len(data)
                inbox.put(data)
                await inbox.room(STREAM_WINDOW)  # flow control: read no further until the handler catches up
            if self.first:
                self.payload.set_result(self.codec.first(None)[0])
            if inbox is not None:
                inbox.end()
            await watch()
        except RpcError as exc:
            self._fail(exc)
            return
        except _Disconnected:
            pass
        self.disconnected = True
        self._fail(RpcError(Status.CANCELLED, "client disconnected"))

    def _fail(self, exc: RpcError) -> None:
        if self.failure is None and not self.disconnected:
            self.failure = exc
        if not self.payload.done():
            self.payload.set_exception(exc)
        if self.inbox is not None:
            self.inbox.abort(exc)
        if self.task is not None:
            self.task.cancel()

    async def run(
        self, path: str, timeout: float | None, metadata: dict[str, str], peer: str, write: Callable[[bytes], Any]
    ) -> bytes | None:
        """Run the call; the end of the stream to write (the result of a client stream and the end-stream
        envelope), None if the client has gone."""
        core = self.core
        limit = self.limit
        to_wire = self.codec.result

        written = 0

        async def send(data: bytes) -> None:
            nonlocal written
            data = to_wire(data)
            if len(data) > limit:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response message exceeds the maximum message size")
            try:
                await write(envelope(data))
            except OSError:  # the client has gone (uvicorn's ClientDisconnected)
                raise RpcError(Status.CANCELLED, "client disconnected") from None
            written += 1
            if not written % _YIELD_EVERY:
                # A write to a socket with room returns without waiting: a handler that only yields messages
                # would starve the loop, which then never learns that the client has gone.
                await asyncio.sleep(0)
            if self.disconnected:
                raise RpcError(Status.CANCELLED, "client disconnected")

        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    payload = await self.payload
                    at = deadline.when()
                    left = None if at is None else max(0.0, at - loop.time())
                    result = await core.dispatch_stream(
                        path,
                        payload,
                        messages=self.inbox,
                        send=send,
                        timeout=left,
                        metadata=metadata,
                        peer=peer,
                        deadline_enforced=timeout is not None,
                    )
            except TimeoutError:
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
            if result is None:
                return _end_stream(None)
            try:
                data = to_wire(result)
            except (TypeError, ValueError):
                log.exception("the result of %s cannot be written as its proto3 JSON message", path)
                raise RpcError(Status.INTERNAL, "internal error") from None
            if len(data) > limit:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
            return envelope(data) + _end_stream(None)
        except RpcError as raised:
            exc = raised if self.failure is None else self.failure
            if exc.code is Status.INVALID_ARGUMENT and exc.details and self.spec is not None and to_wire is not _same:
                exc = method_codec(self.spec).native_error(exc)
            return None if self.disconnected else _end_stream(exc)
        except asyncio.CancelledError:
            task = self.task
            if self.failure is not None or self.disconnected:  # our reader's cancel()
                if task is not None:
                    task.uncancel()
                return None if self.disconnected else _end_stream(self.failure)
            # The server stopped waiting (uvicorn cancels what still runs after drain_timeout): say so.
            if task is not None:
                task.uncancel()
            return _end_stream(RpcError(Status.UNAVAILABLE, "the server shut down before the stream finished"))


class _Disconnected(Exception):
    """The client went away."""


async def serve_stream(core: ServerCore, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve a Connect streaming call (POST, application/connect+json): a server or client stream."""
    limit = core.limits.max_message_size
    try:
        if scope["method"] != "POST":
            raise _Refused(405, Status.UNIMPLEMENTED, "RPC methods are called with POST", (b"allow", b"POST"))
        timeout, metadata, native = _stream_head(scope, limit)
        if core.draining:
            raise _Refused(503, Status.UNAVAILABLE, "server is shutting down; the call did not start", NOT_STARTED)
    except _Refused as refused:
        await _error(send, refused.status, refused.code, refused.message, *refused.extra)
        return
    spec = core.method(path)
    await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEAD})

    async def write(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    end = await _serve(
        core,
        spec,
        path,
        native,
        timeout,
        metadata,
        _peer(scope),
        write,
        partial(_http_envelopes, receive),
        partial(_http_watch, receive),
    )
    if end is not None:
        await send({"type": "http.response.body", "body": end})


async def _serve(
    core: ServerCore,
    spec: MethodSpec | None,
    path: str,
    native: bool,
    timeout: float | None,
    metadata: dict[str, str],
    peer: str,
    write: Callable[[bytes], Any],
    envelopes: Callable[[_ServerStream], AsyncIterator[tuple[int, bytes]]],
    watch: Callable[[], Awaitable[None]],
) -> bytes | None:
    try:
        codec = _Codec(spec, path, native)
    except RpcError as exc:
        return _end_stream(exc)
    stream = _ServerStream(core, spec, codec)
    reader = asyncio.ensure_future(stream.pump(envelopes(stream), watch))
    try:
        return await stream.run(path, timeout, metadata, peer, write)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        stream.release()


async def _http_envelopes(receive: Receive, stream: _ServerStream) -> AsyncIterator[tuple[int, bytes]]:
    """The envelopes of a request body, as it arrives.

    The bytes of an envelope still arriving count against `max_pending_bytes` (`stream.partial`), and it must
    arrive whole within `body_timeout` of its first byte (the first one, the arguments, of the request's head),
    not counting the time the server holds off reading: a peer may pause between messages, not inside one.
    """
    core = stream.core
    limits = core.limits
    decoder = Decoder(limits.max_message_size)
    loop = asyncio.get_running_loop()
    since: float | None = loop.time()  # when the envelope being read began; None at a boundary
    more = True
    while more:
        if since is None:
            message = await receive()
        else:
            try:
                async with asyncio.timeout_at(since + limits.body_timeout):
                    message = await receive()
            except TimeoutError:
                what = "the request message (the arguments)" if stream.first else "a request message"
                raise RpcError(
                    Status.DEADLINE_EXCEEDED,
                    f"{what} did not arrive whole within {limits.body_timeout:g} s (body_timeout): "
                    "send each message whole, at once",
                ) from None
        if message["type"] == "http.disconnect":
            raise _Disconnected
        more = message.get("more_body", False)
        try:
            envelopes = decoder.feed(message.get("body", b""))
        except EnvelopeError as exc:
            code = Status.RESOURCE_EXHAUSTED if "exceeds" in str(exc) else Status.INVALID_ARGUMENT
            raise RpcError(code, f"malformed request stream: {exc}") from None
        pending = decoder.pending
        if pending > stream.partial:  # admitted as it arrives, as a chunked unary body is
            if not core.admit(pending - stream.partial):
                raise RpcError(Status.RESOURCE_EXHAUSTED, "server busy: too many request bytes held")
        else:
            core.release(stream.partial - pending)
        stream.partial = pending
        if envelopes or since is None:
            since = loop.time() if pending else None
        for item in envelopes:
            held_off = loop.time()
            yield item  # the reader may hold off here (the stream's window is full): that time is not the peer's
            if since is not None:
                since += loop.time() - held_off
    if decoder.pending:
        raise RpcError(
            Status.INVALID_ARGUMENT,
            f"malformed request stream: the body ended inside an envelope ({decoder.pending} bytes of it)",
        )


async def _http_watch(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    raise _Disconnected


async def serve_websocket(core: ServerCore, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve a bidirectional stream (or any stream) of kubrpc's client over a WebSocket: envelopes in binary
    messages, the arguments first; the client half-closes with an end-stream envelope; the server ends with one."""
    if (await receive())["type"] != "websocket.connect":
        return
    limit = core.limits.max_message_size
    try:
        timeout, metadata, native = _stream_head(scope, limit)
        if core.draining:
            raise _Refused(503, Status.UNAVAILABLE, "server is shutting down; the call did not start", NOT_STARTED)
    except _Refused as refused:
        body = orjson.dumps({"code": refused.code.wire_name, "message": refused.message})
        headers = [(b"content-type", b"application/json"), *refused.extra]
        await send({"type": "websocket.http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.accept"})
    closed = False

    async def write(data: bytes) -> None:
        await send({"type": "websocket.send", "bytes": data})

    async def envelopes(stream: _ServerStream) -> AsyncIterator[tuple[int, bytes]]:
        nonlocal closed
        decoder = Decoder(limit)
        body_timeout = core.limits.body_timeout
        while True:
            if stream.first:  # the arguments: within body_timeout of the handshake, as a request's body
                try:
                    async with asyncio.timeout(body_timeout):
                        message = await receive()
                except TimeoutError:
                    raise RpcError(
                        Status.DEADLINE_EXCEEDED,
                        f"the request message (the arguments) did not arrive within {body_timeout:g} s "
                        "(body_timeout): send it as soon as the WebSocket opens",
                    ) from None
            else:
                message = await receive()
            if message["type"] == "websocket.disconnect":
                closed = True
                raise _Disconnected
            data = message.get("bytes")
            if data is None:
                raise RpcError(Status.INVALID_ARGUMENT, "malformed request stream: a text WebSocket message")
            try:
                got = decoder.feed(data)
            except EnvelopeError as exc:
                code = Status.RESOURCE_EXHAUSTED if "exceeds" in str(exc) else Status.INVALID_ARGUMENT
                raise RpcError(code, f"malformed request stream: {exc}") from None
            if len(got) != 1 or decoder.pending:
                raise RpcError(
                    Status.INVALID_ARGUMENT, "malformed request stream: a WebSocket message must hold one envelope"
                )
            flags, body = got[0]
            if flags == END_STREAM:  # half-close
                return
            yield flags, body

    async def watch() -> None:
        nonlocal closed
        while (await receive())["type"] != "websocket.disconnect":
            raise RpcError(Status.INVALID_ARGUMENT, "malformed request stream: a message after the end-stream")
        closed = True
        raise _Disconnected

    end = await _serve(core, core.method(path), path, native, timeout, metadata, _peer(scope), write, envelopes, watch)
    if end is not None and not closed:
        with contextlib.suppress(OSError):
            await send({"type": "websocket.send", "bytes": end})
            await send({"type": "websocket.close", "code": 1000})
