"""The plugin contracts: resolver -> balancer -> transport, each a small Protocol.

Each box knows only the box after it. A resolver yields complete endpoint snapshots; a balancer
turns the latest snapshot into a pick for each call; a transport carries encoded calls to the
picked endpoint over a connection that the Channel owns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._limits import ServerLimits
from .endpoint import Endpoint
from .interface import CallKind
from .status import Status

if TYPE_CHECKING:
    from .interface import MethodSpec, ServiceSpec
    from .openapi import Info

__all__ = (
    "AsgiTransport",
    "Balancer",
    "CallFeedback",
    "CallKind",
    "ClientStream",
    "Connection",
    "KeyedBalancer",
    "Listener",
    "MetricsExposition",
    "Resolver",
    "ResolverDiagnostics",
    "ServerCore",
    "ServerLimits",
    "StreamRecorder",
    "StreamingConnection",
    "Transport",
)


class Balancer(Protocol):
    """Chooses the endpoint for each call from the latest snapshot.

    `update()` replaces the whole set; it is called from the event loop whenever the resolver
    yields, and must not await. `pick()` is synchronous, never blocks or does I/O, never returns
    an endpoint with `ready=False` or one absent from the last update, and raises
    `RpcError(Status.UNAVAILABLE)` when nothing is eligible.

    Readiness: the eligible endpoints are the ready ones of the last update. Nothing eligible
    (before the first update, after an empty one, or when every endpoint has `ready=False`) means
    UNAVAILABLE, and only then. An address listed twice is one endpoint, eligible if any of its
    entries is ready.

    Weights: a balancer that uses weights gives each eligible endpoint a share in proportion to
    its weight. Weight 0 takes no calls while an eligible endpoint has a weight above 0; when
    every eligible endpoint has weight 0, they all take calls, evenly (all-zero is not "nothing
    eligible"). A balancer may ignore weights by design (`round_robin` rotates over every ready
    endpoint, weight 0 included); wrappers (`zone_aware`, `outlier`) apply the rule to the set
    they narrow the snapshot to. `kubrpc.testing.balancers.assert_contract()` checks these rules.
    """

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set with this snapshot."""
        ...

    def pick(self) -> Endpoint:
        """The endpoint for the next call; RpcError(UNAVAILABLE) if none is eligible."""
        ...


@runtime_checkable
class KeyedBalancer(Protocol):
    """Optional: a balancer that can pick by a per-call key (consistent hashing)."""

    def pick_for(self, key: str, /) -> Endpoint:
        """The endpoint for a call with this key (the same key maps to the same endpoint)."""
        ...


@runtime_checkable
class CallFeedback(Protocol):
    """Optional: a balancer that learns from calls. The channel calls these around every call."""

    def on_start(self, endpoint: Endpoint, /) -> None:
        """A call to `endpoint` is starting."""
        ...

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        """A call to `endpoint` ended with `status` after `latency` seconds."""
        ...


class Resolver(Protocol):
    """Where are the instances? `watch()` yields the full current endpoint list on every change.

    The first snapshot comes as soon as it is known (possibly empty); later ones only on change.
    A resolver retries its source internally and keeps yielding nothing new while the source is
    unreachable, so the last snapshot stays in force. `aclose()` ends every `watch()`.
    """

    def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Yield the current endpoint list, then each new one, until aclose()."""
        ...

    async def aclose(self) -> None:
        """End every watch() of this resolver."""
        ...


@runtime_checkable
class ResolverDiagnostics(Protocol):
    """Optional: a resolver that can say why it offers no usable endpoint.

    A channel whose first calls wait for the first snapshot stops waiting as soon as
    `problem_is_permanent` is True, and a call that finds no endpoint fails with UNAVAILABLE and a
    message that ends with `problem`. Both are read only while a channel has no endpoint.
    """

    @property
    def problem(self) -> str | None:
        """One line: the source's last error while no snapshot was produced, or why the endpoints are empty."""
        ...

    @property
    def problem_is_permanent(self) -> bool:
        """True while `problem` is a misconfiguration that waiting will not fix (no kubeconfig, 403, ...)."""
        ...


class Connection(Protocol):
    """One client connection to one endpoint; many calls may run on it at once.

    `call()` sends an encoded request (a JSON object of named arguments) to `path`
    (`Service/method`) and returns the encoded result. Failures raise `RpcError`: UNAVAILABLE when
    the call was not delivered, DEADLINE_EXCEEDED after `timeout` seconds, or the server's status.
    Cancelling the awaiting task cancels the call on the server.
    """

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """Send one encoded call and return the encoded result, or raise RpcError."""
        ...

    @property
    def usable(self) -> bool:
        """False once the connection is closed or draining (go-away): new calls go elsewhere."""
        ...

    @property
    def in_flight(self) -> int:
        """Calls sent on this connection and not answered yet."""
        ...

    async def wait_idle(self) -> None:
        """Return once no call is in flight (the pool closes a retired connection then)."""
        ...

    async def aclose(self) -> None:
        """Close the connection; calls still on it fail with UNAVAILABLE."""
        ...


class ClientStream(Protocol):
    """The client's end of one open stream call (`StreamingConnection.open_stream`).

    One deadline (open_stream's `timeout`) covers the whole stream: once it passes, the call is cancelled on
    the server and `send()`/`receive()` raise RpcError(DEADLINE_EXCEEDED). Flow control: `send()` waits while
    the server has not read what was sent before (within the window the transport allows), so a slow reader
    slows the writer and memory stays bounded; the transport likewise lets the server send only as far as
    `receive()` keeps up.
    """

    async def send(self, message: bytes, /) -> bool:
        """Send one encoded message, waiting for flow control; False (nothing sent) once the call has ended.

        A call may end before the client has sent everything: the server answered without reading it all. A
        sender stops at False; it learns how the call ended from `receive()`.
        """
        ...

    async def close_send(self) -> None:
        """Half-close: no more messages from the client (the server's request iterator ends)."""
        ...

    async def receive(self) -> bytes | None:
        """The next encoded message from the server; None once the stream ended without error.

        RpcError with the call's status if it ended with one: after the messages sent before the error.
        """
        ...

    def cancel(self) -> None:
        """Cancel the call on the server unless it has ended; free the stream. Idempotent, never blocks."""
        ...


@runtime_checkable
class StreamingConnection(Protocol):
    """Optional: a Connection that carries stream calls (every built-in transport does)."""

    async def open_stream(
        self, path: str, payload: bytes, *, kind: CallKind, timeout: float | None, metadata: Mapping[str, str]
    ) -> ClientStream:
        """Start a stream call of `kind` with the ordinary arguments `payload`; return once the server accepted it.

        NotDeliveredError if the server refused it without running anything (draining, over its limits before
        admission): the channel then opens it elsewhere. Other failures are RpcError, as for `Connection.call`.
        """
        ...


@runtime_checkable
class StreamRecorder(Protocol):
    """Optional: an interceptor (server or client) that counts the messages of stream calls (kubrpc.metrics).

    Called once per stream call when it ends, with its final status and duration in seconds.
    """

    def record_stream(
        self, path: str, /, *, status: Status, seconds: float, received: int, sent: int, client: bool
    ) -> None:
        """A stream call at `path` ended: `received` and `sent` count messages, from this side's point of view."""
        ...


@runtime_checkable
class MetricsExposition(Protocol):
    """Optional: a server interceptor that records metrics and can show them (kubrpc.metrics.ServerMetrics).

    A Server finds it among its interceptors; the HTTP transport serves its metrics at GET /metrics.
    """

    def exposition(self, accept: str | None, /) -> tuple[bytes, str]:
        """The current metrics in the format `accept` asks for: (body, content type)."""
        ...

    def record_unimplemented(self, path: str, services: Mapping[str, ServiceSpec], /) -> None:
        """Count a call to `path` that no registered method serves."""
        ...


InlineDispatch = Callable[[bytes, float | None, Mapping[str, str], str], bytes]
"""ServerCore.dispatch_inline(): `run(payload, timeout, metadata, peer)` runs a call that never waits to its end and
returns its encoded result or raises RpcError (called in a copy of the context, with a task entered as current)."""


class ServerCore(Protocol):
    """What a server transport sees of a Server: its calls, admission, limits and drain state.

    `kubrpc.Server` hands one to `Transport.listen()`; a transport never imports `kubrpc.server`. This is
    the whole contract between them (grpclib's AbstractHandler plays the same part).

    - `dispatch()` runs one call: `path` is `Service/method`, `payload` the JSON object of named arguments,
      `metadata` has lower-case keys, `peer` is the client's `host:port` (empty if unknown). It returns the
      encoded result or raises RpcError. A transport that reads the attachments format (TCP) gives such a
      payload as a `kubrpc.codec.Packed`, and then gets the result as a `kubrpc.codec.Attached` when it has
      bytes values to attach (bytes otherwise); both work the same for `dispatch_stream()`'s payload, messages
      and results. `deadline_enforced=True` says the transport cancels the call
      itself when `timeout` passes; dispatch then only reports the deadline.
    - `admit(size)` asks whether a request of `size` bytes may be held now (`max_pending_bytes`, over all
      connections and transports together); each admitted size is given back with `release(size)`.
    - `draining` turns True when the server starts shutting down (SIGTERM): health checks answer 503
      from then on. It is the server's state, not a listener's: each listener drains its own connections
      when its `listen()` context exits.
    - `runs_inline(path)` is True when dispatch() of a call at `path` never waits (a unary handler whose code
      has no await, no interceptors, no timeout of the method's own): a transport may then drive it to its end
      at once, where its request is read, without a task of its own (transports/_eager.py).
      `dispatch_inline(path)` gives such a call's dispatch() as a plain function (InlineDispatch): cheaper
      than driving the coroutine, for the transport to call where it reads the request.
    - `method(path)` says what a call at `path` is (its `kind`: unary or which stream), None if unknown;
      `dispatch_stream()` runs a stream call: `messages` yields the client's encoded messages (client and
      bidirectional streams; the transport grants the client credit as they are read), `send` writes each
      encoded message of the server's stream and waits for flow control. It returns the encoded result of a
      client stream, None for a stream of results, or raises RpcError (after the messages already sent).
    """

    @property
    def limits(self) -> ServerLimits:
        """The limits to hold peers to."""
        ...

    @property
    def draining(self) -> bool:
        """True once the server is shutting down."""
        ...

    @property
    def services(self) -> Mapping[str, ServiceSpec]:
        """The registered services by wire name (for schemas and reflection)."""
        ...

    @property
    def openapi(self) -> Info | None:
        """Title, version and description of the services' schema; None: made up from their names."""
        ...

    @property
    def metrics(self) -> MetricsExposition | None:
        """The server's metrics recorder, if it has one that can show its metrics."""
        ...

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
        """Run the call at `path` and return its encoded result, or raise RpcError."""
        ...

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
        """Run the stream call at `path`: the result of a client stream, None for a stream of results."""
        ...

    def method(self, path: str, /) -> MethodSpec | None:
        """The method served at `path` (`Service/method`), None if there is none."""
        ...

    def runs_inline(self, path: str, /) -> bool:
        """Can dispatch() of a call at `path` finish without ever waiting (so without a task of its own)?"""
        ...

    def dispatch_inline(self, path: str, /) -> InlineDispatch | None:
        """dispatch() of a call at `path` as a plain function, if it never waits; None otherwise."""
        ...

    def admit(self, size: int, /) -> bool:
        """May a request of `size` bytes be held now? Counts it if so."""
        ...

    def release(self, size: int, /) -> None:
        """A request admitted with admit(size) is no longer held."""
        ...


class Listener(Protocol):
    """A bound server socket; `url` is the real address (port 0 resolved)."""

    @property
    def url(self) -> str:
        """The bound address, e.g. tcp://127.0.0.1:40123."""
        ...


class Transport(Protocol):
    """A wire protocol: the client side (`connect`) and the server side (`listen`)."""

    async def connect(self, endpoint: Endpoint, /) -> Connection:
        """Open a connection to `endpoint`; NotDeliveredError if it cannot be reached."""
        ...

    def listen(self, core: ServerCore, host: str, port: int, /) -> AbstractAsyncContextManager[Listener]:
        """Serve `core` on host:port while the context is open; drain when it exits."""
        ...


@runtime_checkable
class AsgiTransport(Protocol):
    """Optional: a transport that can serve a server as an ASGI app (`Server.asgi()`; the `http` plugin)."""

    def asgi(self, core: ServerCore, /) -> Callable[..., Awaitable[None]]:
        """The ASGI app that serves `core`: run it with any ASGI server (`uvicorn mymodule:app`)."""
        ...
