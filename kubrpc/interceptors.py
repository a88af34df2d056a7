"""Call context and interceptors: code that wraps every call, on the server and on the client.

Server side, `Server(interceptors=[...])`: each interceptor gets the call's `CallInfo` and a `proceed()`
that runs the rest of the chain (the next interceptor, then decoding, the handler and encoding) and returns
the encoded result. An interceptor may raise `RpcError` (UNAUTHENTICATED, PERMISSION_DENIED, ...) to reject
the call; any other exception reaches the client as INTERNAL, without its text. Handlers read the call they
serve with `current_call()`.

Client side, `connect(..., interceptors=[...])`: each interceptor gets a `ClientCall` whose `metadata` it may
add to (sent as HTTP headers or TCP frame metadata) and a `proceed()` that sends the call, retries included.

A stream is one call to the interceptors (`kind` says which): on the server `proceed()` runs the whole stream and
returns the encoded result of a client stream (b"" for a stream of results); on the client it opens the stream.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .interface import CallKind

if TYPE_CHECKING:
    from .interface import MethodSpec

__all__ = ("CallInfo", "ClientCall", "ClientInterceptor", "Proceed", "ServerInterceptor", "current_call")

#: Runs the rest of an interceptor chain and returns the encoded result (a JSON document).
Proceed = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class CallInfo:
    """The server's view of one call: what is called, by whom, with which metadata, until when."""

    service: str
    """The wire name of the service."""
    method: str
    """The wire name of the method."""
    path: str
    """`service/method`."""
    metadata: Mapping[str, str]
    """Request headers (HTTP) or frame metadata (TCP); keys are lower case."""
    peer: str
    """The client's address, `host:port` (empty when the transport does not know it)."""
    deadline: float | None
    """When the call times out, on the `time.monotonic()` clock; None without a deadline."""
    kind: CallKind = CallKind.UNARY
    """Unary, or which kind of stream: an interceptor runs once per stream, around all of it."""

    def time_remaining(self) -> float | None:
        """Seconds left until the deadline (negative once passed); None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class ClientCall:
    """The client's view of one call, before it is sent; interceptors may add to `metadata`."""

    service: str
    """The wire name of the service."""
    method: str
    """The wire name of the method."""
    path: str
    """`service/method`."""
    metadata: dict[str, str]
    """What is sent with the call: the stub's metadata, plus whatever interceptors add (lower-case keys)."""
    deadline: float | None
    """When the call times out, on the `time.monotonic()` clock; None without a deadline."""
    idempotent: bool
    """Whether the method may be retried."""
    target: str
    """The channel's target."""
    kind: CallKind = CallKind.UNARY
    """Unary, or which kind of stream. For a stream, `proceed()` opens it and returns b"" once the server
    accepted it; the messages flow after the interceptors have returned. A stream is opened once: calling
    `proceed()` again after it succeeded raises RpcError(INTERNAL) (the handler may have run already)."""


class ServerInterceptor(Protocol):
    """Wraps every call a Server runs: return `await proceed()`, or raise RpcError to reject the call."""

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes: ...


class ClientInterceptor(Protocol):
    """Wraps every call a Channel sends (retries included): edit `call.metadata`, then `await proceed()`."""

    async def __call__(self, call: ClientCall, proceed: Proceed, /) -> bytes: ...


# Server.dispatch sets this for every call. Without interceptors it holds a plain tuple, and current_call()
# builds the CallInfo only if a handler asks for it: a tuple is several times cheaper to build than a CallInfo.
_CallState = tuple["MethodSpec", str, Mapping[str, str], str, "float | None"]
_current: ContextVar[CallInfo | _CallState | None] = ContextVar("kubrpc.current_call", default=None)


def current_call() -> CallInfo:
    """The call that the running handler (or server interceptor) serves; LookupError outside of one."""
    state = _current.get()
    if state is None:
        raise LookupError("current_call() is only available while a kubrpc server runs a call")
    if isinstance(state, CallInfo):
        return state
    spec, path, metadata, peer, deadline = state
    return CallInfo(spec.service, spec.name, path, metadata, peer, deadline)
