"""Errors raised by kubrpc.

RpcError(code: Status, message)   the one error users see, on both sides of a call
 ├── NotDeliveredError             UNAVAILABLE, and the server never ran the call: always safe to retry
 └── UnreachableError              UNAVAILABLE from an endpoint that never answered: backed off, the call maybe ran
ProtocolError                      a peer broke the wire format (internal; closes that connection)
"""

from __future__ import annotations

import base64
import http
from collections.abc import Iterable
from typing import Any

import orjson

from .status import Status

__all__ = ("NotDeliveredError", "ProtocolError", "RpcError", "UnreachableError", "error_response")


class RpcError(Exception):
    """A call failed with a status code and a message that is safe to show the caller.

    OK is not a failure: an RpcError made with it has the code UNKNOWN, on both sides of a call.

    `details` are Connect error details (`{"type", "value", "debug"}` objects): INVALID_ARGUMENT from argument
    validation carries one `google.rpc.BadRequest` (see `bad_request()`) listing every invalid field.
    """

    def __init__(self, code: Status, message: str = "", details: list[dict[str, Any]] | None = None) -> None:
        if code is Status.OK:
            code = Status.UNKNOWN
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details: list[dict[str, Any]] = details or []

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field path, description) of each invalid field named in the details (from argument validation)."""
        out = []
        for detail in self.details:
            debug = detail.get("debug")
            if detail.get("type") == _BAD_REQUEST and isinstance(debug, dict):
                for v in debug.get("fieldViolations") or ():
                    if isinstance(v, dict) and isinstance(v.get("field"), str):
                        description = v.get("description")
                        out.append((v["field"], description if isinstance(description, str) else ""))
        return out

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RpcError) and (self.code, self.message) == (other.code, other.message)

    def __hash__(self) -> int:
        return hash((self.code, self.message))

    def to_json(self) -> dict[str, Any]:
        """The error body of the HTTP/JSON wire and of TCP error frames (`details` only when there are some)."""
        if self.details:
            return {"code": self.code.wire_name, "message": self.message, "details": self.details}
        return {"code": self.code.wire_name, "message": self.message}

    @classmethod
    def from_json(cls, body: object, *, fallback: Status = Status.UNKNOWN) -> RpcError:
        """Rebuild an error from a wire body, trusting nothing in it (both transports' clients use it).

        A code the client does not know, or "ok" (which is no error), becomes UNKNOWN.
        """
        if isinstance(body, dict):
            code, message = body.get("code"), body.get("message")
            if isinstance(code, str):
                details = body.get("details")
                kept = [d for d in details if isinstance(d, dict)] if isinstance(details, list) else None
                return cls(Status.from_wire_name(code), message if isinstance(message, str) else "", kept)
        return cls(fallback, "malformed error body")


class NotDeliveredError(RpcError):
    """UNAVAILABLE before the server saw the call (connect failed, connection draining): safe to retry.

    `unreachable` says the endpoint could not be reached at all (a refused or failed connect): the channel
    then avoids it for a while (its connect backoff). A failed `Transport.connect()` counts as unreachable
    unless the transport says `unreachable=False` (the in-process transport: nothing to back off from).
    """

    def __init__(self, message: str, *, unreachable: bool | None = None) -> None:
        super().__init__(Status.UNAVAILABLE, message)
        self.unreachable = unreachable


class UnreachableError(RpcError):
    """UNAVAILABLE: a connection failed before the endpoint ever answered on it (accepted, then reset).

    The channel backs off from the endpoint as from a refused connect; but the request may have been written
    (and forwarded by a proxy), so only idempotent calls are retried.
    """

    def __init__(self, message: str) -> None:
        super().__init__(Status.UNAVAILABLE, message)


class ProtocolError(Exception):
    """The peer sent bytes that break the wire protocol; the connection is closed."""


_BAD_REQUEST = "google.rpc.BadRequest"


def _proto_bytes(field: int, data: bytes) -> bytes:
    """A protobuf length-delimited field."""
    size, length = len(data), bytearray()
    while True:  # the length, as a varint
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([field << 3 | 2]) + bytes(length) + data


def bad_request(violations: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A Connect error detail `google.rpc.BadRequest` listing (field path, description) pairs.

    `value` is the protobuf message (base64, unpadded, as Connect sends it); `debug` is its JSON form.
    """
    pairs = list(violations)
    message = b"".join(
        _proto_bytes(1, _proto_bytes(1, field.encode()) + _proto_bytes(2, description.encode()))
        for field, description in pairs
    )
    return {
        "type": _BAD_REQUEST,
        "value": base64.b64encode(message).decode().rstrip("="),
        "debug": {"fieldViolations": [{"field": f, "description": d} for f, d in pairs]},
    }


def error_response(status: int, code: Status, message: str, *extra: tuple[bytes, bytes]) -> bytes:
    """A whole HTTP/1.1 error response with a kubrpc JSON body, closing the connection (written on a raw socket)."""
    body = orjson.dumps({"code": code.wire_name, "message": message})
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n".encode()
    head += b"".join(b"%s: %s\r\n" % header for header in extra)
    return b"%scontent-length: %d\r\nconnection: close\r\n\r\n%s" % (head, len(body), body)
