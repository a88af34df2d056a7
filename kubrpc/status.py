"""Status codes, named and numbered as gRPC's, with their Connect HTTP mapping."""

from __future__ import annotations

import enum

__all__ = ("Status",)


@enum.unique
class Status(enum.IntEnum):
    """The outcome of a call; the names and numbers are gRPC's."""

    #: Not an error; returned on success.
    OK = 0
    #: The operation was cancelled, typically by the caller.
    CANCELLED = 1
    #: Unknown error.
    UNKNOWN = 2
    #: The client specified an invalid argument.
    INVALID_ARGUMENT = 3
    #: The deadline expired before the operation could complete.
    DEADLINE_EXCEEDED = 4
    #: Some requested entity was not found.
    NOT_FOUND = 5
    #: The entity that a client attempted to create already exists.
    ALREADY_EXISTS = 6
    #: The caller does not have permission to execute the operation.
    PERMISSION_DENIED = 7
    #: Some resource has been exhausted, for example a size or rate limit.
    RESOURCE_EXHAUSTED = 8
    #: The system is not in a state required for the operation.
    FAILED_PRECONDITION = 9
    #: The operation was aborted, typically due to a concurrency issue.
    ABORTED = 10
    #: The operation was attempted past the valid range.
    OUT_OF_RANGE = 11
    #: The operation is not implemented, supported or enabled.
    UNIMPLEMENTED = 12
    #: Internal error; details are in the server's log, never on the wire.
    INTERNAL = 13
    #: The service is currently unavailable; retrying may succeed.
    UNAVAILABLE = 14
    #: Unrecoverable data loss or corruption.
    DATA_LOSS = 15
    #: The request does not have valid authentication credentials.
    UNAUTHENTICATED = 16

    @property
    def wire_name(self) -> str:
        """The snake_case name used on the HTTP/JSON wire (Connect spells CANCELLED `canceled`)."""
        return _WIRE_NAMES[self]

    @property
    def http_status(self) -> int:
        """The HTTP status the Connect protocol uses for this code."""
        return _HTTP_STATUS[self]

    @classmethod
    def from_wire_name(cls, name: str) -> Status:
        """The Status for a snake_case wire name; UNKNOWN if the name is not one."""
        return _BY_WIRE_NAME.get(name, cls.UNKNOWN)

    @classmethod
    def from_http_status(cls, status: int) -> Status:
        """The Status Connect infers from an HTTP status when the body carries none."""
        return _FROM_HTTP.get(status, cls.UNKNOWN)


_WIRE_NAMES = {s: ("canceled" if s is Status.CANCELLED else s.name.lower()) for s in Status}
_BY_WIRE_NAME = {name: s for s, name in _WIRE_NAMES.items()} | {"cancelled": Status.CANCELLED}
_HTTP_STATUS = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 400,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 501,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
    Status.UNAUTHENTICATED: 401,
}
# Connect's mapping for responses that carry no error body (a proxy's 502, say).
_FROM_HTTP = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}
