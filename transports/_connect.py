"""The Connect protocol (JSON codec) for unary calls on the HTTP transport.

A request that carries `Connect-Protocol-Version` is a Connect call: its body is the `<Method>Request` message of
the schema `kubrpc proto` renders, in proto3 JSON, and its answer is the response message in proto3 JSON
(kubrpc._protojson converts both to and from the native JSON the handlers see). Errors are Connect's error JSON,
which the native wire already is: `{"code", "message", "details"}` with Connect's HTTP statuses. The deadline
(`Connect-Timeout-Ms`), the size limits, admission and cancellation on disconnect are the native path's: the call
goes through the same `_App._rpc`, over a ServerCore whose dispatch() converts the JSON (ConnectCore).

Not served: the binary codec (`application/proto`, 415), compression (`Content-Encoding`, unimplemented), and
Connect GET requests (`?connect=v1&message=...`: 405, as kubrpc's schema marks no method side-effect free, so
generated clients never send them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import orjson
from starlette.types import Receive, Scope, Send

from kubrpc._asgi_server import send_json
from kubrpc._protojson import MethodCodec, method_codec
from kubrpc.errors import RpcError
from kubrpc.status import Status

if TYPE_CHECKING:
    from kubrpc._limits import ServerLimits
    from kubrpc.interface import ServiceSpec
    from kubrpc.interfaces import MetricsExposition, ServerCore
    from kubrpc.openapi import Info

__all__ = ("VERSION_HEADER", "ConnectCore", "is_connect", "serve")

log = logging.getLogger("kubrpc.connect")

VERSION_HEADER = b"connect-protocol-version"
_JSON = b"application/json"
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
    encoding: bytes | None = None
    for name, value in scope["headers"]:
        if name == VERSION_HEADER:
            version = value
        elif name == b"content-type":
            media = value.decode("latin-1").split(";", 1)[0].strip().lower()
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    if version != b"1":
        shown = (version or b"").decode("latin-1")[:40]
        message = f"Connect-Protocol-Version must be 1, not {shown!r}: kubrpc speaks version 1 of the Connect protocol"
        await _error(send, 400, Status.INVALID_ARGUMENT, message)
        return
    if scope["method"] == "POST" and media != "application/json":
        if media is not None and media.startswith("application/connect+"):
            message = f"Content-Type {media}: Connect streaming calls are not served here (unary calls only)"
        else:
            message = (f"Content-Type {media} is not supported: " if media else "no Content-Type: ") + _CODEC_HELP
        await _error(send, 415, Status.UNIMPLEMENTED, message, *_ACCEPT_POST)
        return
    if encoding not in (None, b"identity"):
        shown = encoding.decode("latin-1")[:40]
        message = f"Content-Encoding {shown!r} is not supported: send the request uncompressed"
        await _error(send, 501, Status.UNIMPLEMENTED, message, (b"accept-encoding", b"identity"))
        return
    await rpc(path, scope, receive, send)


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
