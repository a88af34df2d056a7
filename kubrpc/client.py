"""Client side: connect() -> Channel (resolver -> balancer -> transport) -> typed stubs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from ssl import SSLContext, create_default_context
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, runtime_checkable

import anyio
from anyio.abc import TaskGroup

from ._pool import ConnectionPool
from ._streaming import StreamCall, record, stream_stub
from .codec import check_metadata
from .endpoint import Endpoint
from .errors import NotDeliveredError, RpcError, UnreachableError
from .interceptors import ClientCall, ClientInterceptor, Proceed
from .interface import CallKind, MethodSpec, service_spec
from .interfaces import (
    Balancer,
    CallFeedback,
    Connection,
    KeyedBalancer,
    Resolver,
    ResolverDiagnostics,
    StreamingConnection,
    StreamRecorder,
    Transport,
)
from .status import Status

if TYPE_CHECKING:
    from .metrics import ClientMetrics

__all__ = ("Channel", "RetryBudget", "connect")

T = TypeVar("T")

log = logging.getLogger("kubrpc.client")

_EMPTY: Mapping[str, str] = {}

# Errors that are no answer from a server: they do not end an endpoint's connect backoff.
_NO_ANSWER = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED})

#: Called with the channel and its endpoints after each resolver snapshot, and once more when the channel closes
#: (then `channel.closed` is True and the endpoints are empty).
EndpointsHook = Callable[["Channel", Sequence[Endpoint]], None]


class Channel:
    """Calls to a set of server instances: resolves them, balances over them, and pools their connections.

    Use it as an async context manager; `stub(Iface)` gives a typed client of a service.

    `metrics` (True or a `kubrpc.metrics.ClientMetrics`) records Prometheus metrics of its calls and endpoints;
    `on_endpoints` hooks are called with the channel and its endpoints after every resolver snapshot, and once more
    with `channel.closed` True (and no endpoints) when it closes.
    """

    def __init__(
        self,
        target: str | Sequence[Endpoint] | Resolver,
        *,
        transport: str | Transport | None = None,
        balancer: str | Balancer = "round_robin",
        timeout: float | None = None,
        max_attempts: int = 3,
        wait_for_endpoints: float = 10.0,
        retry_budget: RetryBudget | None = None,
        interceptors: Sequence[ClientInterceptor] = (),
        ssl: SSLContext | None = None,
        metrics: bool | ClientMetrics = False,
        on_endpoints: Sequence[EndpointsHook] = (),
    ) -> None:
        from . import resolvers
        from .balancers import create as create_balancer
        from .transports import create as create_transport

        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout is not None:
            timeout = _check_timeout(timeout)
        self.target = target if isinstance(target, str) else "<endpoints>"
        if isinstance(target, str | Sequence):
            self._resolver: Resolver = resolvers.create(target)
        else:
            self._resolver = target
        scheme = target.partition("://")[0] if isinstance(target, str) else ""
        if transport is None:
            transport = "http" if scheme in ("http", "https") else "inproc" if scheme == "inproc" else "tcp"
        elif scheme == "inproc" and transport in ("tcp", "http"):
            raise ValueError(f"{target!r} is a server in this process: leave transport= out (or give 'inproc')")
        if ssl is None and scheme == "https" and isinstance(transport, str):
            ssl = create_default_context()  # verify against the system's CAs
        self.transport_name = transport if isinstance(transport, str) else type(transport).__name__
        if isinstance(transport, str):
            self._transport = create_transport(transport) if ssl is None else create_transport(transport, ssl=ssl)
        elif ssl is not None:
            raise ValueError("give ssl= to the transport object rather than to the Channel")
        else:
            self._transport = transport
        self._interceptors = tuple(interceptors)
        self._on_endpoints = tuple(on_endpoints)
        if metrics is True:
            from .metrics import ClientMetrics

            metrics = ClientMetrics()
        if metrics is not False:
            self._interceptors = (metrics, *self._interceptors)
        # An interceptor that watches endpoints too (kubrpc.metrics.ClientMetrics) gets every snapshot.
        self._on_endpoints += tuple(i.observe_endpoints for i in self._interceptors if isinstance(i, EndpointObserver))
        self._recorders = tuple(i for i in self._interceptors if isinstance(i, StreamRecorder))
        self.balancer_name = balancer if isinstance(balancer, str) else type(balancer).__name__
        self.balancer = create_balancer(balancer) if isinstance(balancer, str) else balancer
        self._feedback = self.balancer if isinstance(self.balancer, CallFeedback) else None
        self._pick_for = self.balancer.pick_for if isinstance(self.balancer, KeyedBalancer) else None
        # The transport sends bytes values as raw attachments (tcp): stubs of methods with bytes encode for it.
        self._attachments = getattr(self._transport, "attachments", False) is True
        self._pool = ConnectionPool(self._transport)
        # The pool's own dicts, read on the hot path without a call.
        self._connections = self._pool.connections
        self._down = self._pool.down
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_budget = retry_budget or RetryBudget()
        self.wait_for_endpoints = wait_for_endpoints
        self.endpoints: list[Endpoint] = []
        self._resolved: anyio.Event | None = None
        self._task_group: TaskGroup | None = None
        self._closed = False
        self._serving = False  # entered and not closed: `self._task_group is not None and not self._closed`, in one

    async def __aenter__(self) -> Self:
        self._resolved = anyio.Event()
        self._task_group = anyio.create_task_group()
        self._serving = not self._closed
        await self._task_group.__aenter__()
        self._pool.start(self._task_group)
        self._task_group.start_soon(self._follow_resolver)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop resolving and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        try:
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()
                await self._task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._resolver.aclose()
                await self._pool.aclose()
            self._notify([])

    @property
    def closed(self) -> bool:
        """True once the channel has been closed."""
        return self._closed

    def _notify(self, endpoints: Sequence[Endpoint]) -> None:
        """Call the on_endpoints hooks; a failing hook is logged, never stops the resolver."""
        for hook in self._on_endpoints:
            try:
                hook(self, endpoints)
            except Exception:
                log.exception("on_endpoints hook %r of %s failed", hook, self.target)

    async def _follow_resolver(self) -> None:
        try:
            await self._consume_snapshots()
        except Exception:
            log.exception("resolver of %s failed; keeping the last %d endpoints", self.target, len(self.endpoints))

    async def _consume_snapshots(self) -> None:
        async for endpoints in self._resolver.watch():
            self.endpoints = list(endpoints)
            self.balancer.update(self.endpoints)
            if self._on_endpoints:
                self._notify(self.endpoints)
            if self._resolved is not None:
                self._resolved.set()
            self._pool.keep({(ep.host, ep.port) for ep in self.endpoints})

    def stub(
        self,
        iface: Callable[..., T],
        *,
        timeout: float | None = None,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> T:
        """A client of the service Protocol `iface`, typed as `iface`; each call goes through this channel."""
        spec = service_spec(iface)  # type: ignore[arg-type]
        if timeout is not None:
            timeout = _check_timeout(timeout)
        stub = _Stub(f"<{spec.name} stub {self.target}>", spec.protocol.__name__, list(spec.methods))
        for attr, m in spec.methods.items():
            setattr(
                stub,
                attr,
                self._bind(m, timeout if timeout is not None else self.timeout, key, dict(metadata or _EMPTY)),
            )
        return stub  # type: ignore[return-value]

    def _bind(
        self, m: MethodSpec, timeout: float | None, key: str | None, metadata: Mapping[str, str]
    ) -> Callable[..., Any]:
        if m.options.timeout is not None and (timeout is None or m.options.timeout < timeout):
            timeout = m.options.timeout
        attached = self._attachments and m.attachable  # decided here, once: other methods pay nothing per call
        if m.kind is not CallKind.UNARY:
            stub = stream_stub(
                m, partial(self._open_for_stub, m.path, m.kind, timeout, m.options.idempotent, key, metadata), attached
            )
            stub.__name__ = m.attr
            stub.__qualname__ = f"{m.service}.{m.attr}"
            return stub
        path, idempotent, encode, decode = m.path, m.options.idempotent, m.call_encoder(), m.result_decoder()
        if attached:
            encode, decode = m.encode_call_attached, m.decode_result_attached

        # The hot path, for a stub whose calls need none of call()'s per-call checks: its first attempt is made from
        # here, on an open connection, one coroutine less per call; anything else goes through call().
        # (interceptors and the balancer's feedback are the channel's for good: decided here too)
        direct = (
            key is None
            and (timeout is None or 0 < timeout < _FOREVER)
            and _valid(metadata)
            and not self._interceptors
            and self._feedback is None
        )

        async def call(*args: Any, **kwargs: Any) -> Any:
            payload = encode(args, kwargs)
            if not (direct and self._serving and not self._down and self.endpoints):
                return decode(
                    await self.call(path, payload, timeout=timeout, idempotent=idempotent, key=key, metadata=metadata)
                )
            deadline = None if timeout is None else time.monotonic() + timeout
            self.retry_budget.deposit()
            endpoint = self.balancer.pick()
            conn = self._connections.get((endpoint.host, endpoint.port))
            if conn is None or not conn.usable:
                return decode(
                    await self._attempts(path, payload, deadline, idempotent, None, metadata, 1, None, endpoint)
                )
            try:
                result = await conn.call(path, payload, timeout=timeout, metadata=metadata)
            except RpcError as exc:
                if not self._may_retry(exc, endpoint, 1, idempotent):
                    raise
                result = await self._attempts(path, payload, deadline, idempotent, None, metadata, 2, {endpoint})
            else:
                if self._down:  # it answered: its connect backoff starts over
                    self._pool.answered(endpoint)
            return decode(result)

        call.__name__ = m.attr
        call.__qualname__ = f"{m.service}.{m.attr}"
        return call

    async def call(
        self,
        path: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        key: str | None = None,
        metadata: Mapping[str, str] = _EMPTY,
    ) -> bytes:
        """Send an encoded call to one endpoint and return the encoded result (the untyped API; stubs behave alike)."""
        if self._task_group is None or self._closed:
            raise self._not_open()
        if timeout is not None and not timeout < _FOREVER:  # NaN, or so far off that it is no deadline
            timeout = _check_timeout(timeout)
        if self._interceptors and type(metadata) is not _Intercepted:
            return await self._intercept(path, payload, timeout, idempotent, key, metadata)
        if metadata:  # the same rule on every transport, before anything is sent
            _check_metadata(metadata)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.retry_budget.deposit()
        # A positive timeout is one attempt at least, however small (a stub's first attempt is made the same way).
        first = timeout if timeout is not None and timeout > 0 else None
        return await self._attempts(path, payload, deadline, idempotent, key, metadata, 1, None, first=first)

    async def _attempts(
        self,
        path: str,
        payload: bytes,
        deadline: float | None,
        idempotent: bool,
        key: str | None,
        metadata: Mapping[str, str],
        attempt: int,
        tried: set[Endpoint] | None,
        picked: Endpoint | None = None,
        *,
        first: float | None = None,
    ) -> bytes:
        """call() from attempt number `attempt` on (`picked`: the endpoint the balancer chose for it already).

        `first` is the first attempt's time as given (the call's timeout): it is made even if the clock has moved
        past the deadline since, as when the call's timeout is too small to measure.
        """
        while True:
            remaining = None
            if first is not None:
                remaining, first = first, None
            elif deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
            if picked is not None:
                endpoint, picked = picked, None
            elif self.endpoints:
                endpoint = self._pick(key, tried)
            else:
                endpoint = await self._first_pick(key, remaining)
            probe: anyio.Event | None = None
            try:
                if self._down and (endpoint.host, endpoint.port) in self._down:
                    # In its connect backoff: fail fast rather than connect; after it, one call tries it again.
                    probe = await self._pool.admit(endpoint, remaining)
                if self._feedback is None:
                    conn = self._connections.get((endpoint.host, endpoint.port))
                    if conn is None or not conn.usable:
                        conn = await self._pool.get(endpoint, remaining)
                    result = await conn.call(path, payload, timeout=remaining, metadata=metadata)
                else:
                    result = await self._call_with_feedback(endpoint, path, payload, remaining, metadata)
                if self._down:  # it answered: its connect backoff starts over
                    self._pool.answered(endpoint)
                return result
            except RpcError as exc:
                if not self._may_retry(exc, endpoint, attempt, idempotent):
                    raise
            finally:
                if probe is not None:
                    self._pool.end_probe((endpoint.host, endpoint.port), probe)
            if tried is None:
                tried = set()
            tried.add(endpoint)
            attempt += 1

    def _may_retry(self, exc: RpcError, endpoint: Endpoint, attempt: int, idempotent: bool) -> bool:
        """After attempt number `attempt` failed with `exc` on `endpoint`: may the call be made again?"""
        if isinstance(exc, NotDeliveredError):
            # Never reached a server, so a retry adds no load there: not charged to the budget.
            if exc.unreachable:
                self._pool.mark_down((endpoint.host, endpoint.port), exc.message)
            return attempt < self.max_attempts
        if type(exc) is UnreachableError:  # maybe delivered: back off, but retry only if idempotent
            self._pool.mark_down((endpoint.host, endpoint.port), exc.message)
        elif self._down and exc.code not in _NO_ANSWER:  # the endpoint answered: reachable again
            self._pool.answered(endpoint)
        retryable = idempotent and exc.code is Status.UNAVAILABLE
        return retryable and attempt < self.max_attempts and self.retry_budget.withdraw()

    async def _open_for_stub(
        self,
        path: str,
        kind: CallKind,
        timeout: float | None,
        idempotent: bool,
        key: str | None,
        metadata: Mapping[str, str],
        payload: bytes,
    ) -> StreamCall:
        return await self.open_stream(
            path, payload, kind=kind, timeout=timeout, idempotent=idempotent, key=key, metadata=metadata
        )

    async def open_stream(
        self,
        path: str,
        payload: bytes,
        *,
        kind: CallKind,
        timeout: float | None = None,
        idempotent: bool = False,
        key: str | None = None,
        metadata: Mapping[str, str] = _EMPTY,
    ) -> StreamCall:
        """Open a stream call on one endpoint (the untyped API under streaming stubs).

        The balancer picks the endpoint once; the stream stays there. A stream the server refused without running
        it (draining, unreachable) is opened elsewhere, within `max_attempts`; nothing else is retried, since
        messages may have been read. `timeout` covers the whole stream.
        """
        if self._task_group is None or self._closed:
            raise self._not_open()
        if timeout is not None and not timeout < _FOREVER:
            timeout = _check_timeout(timeout)
        if self._interceptors and type(metadata) is not _Intercepted:
            return await self._intercept_stream(path, payload, kind, timeout, idempotent, key, metadata)
        if metadata:
            _check_metadata(metadata)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        tried: set[Endpoint] | None = None
        while True:
            attempt += 1
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
            endpoint = self._pick(key, tried) if self.endpoints else await self._first_pick(key, remaining)
            probe: anyio.Event | None = None
            feedback = self._feedback
            started = False  # the balancer was told of the start, and not yet of the end
            status = Status.CANCELLED
            try:
                if self._down and (endpoint.host, endpoint.port) in self._down:
                    probe = await self._pool.admit(endpoint, remaining)
                if feedback is not None:
                    feedback.on_start(endpoint)
                    started = True
                conn = self._connections.get((endpoint.host, endpoint.port))
                if conn is None or not conn.usable:
                    conn = await self._pool.get(endpoint, remaining)
                if not isinstance(conn, StreamingConnection):
                    raise RpcError(
                        Status.UNIMPLEMENTED, f"the {self.transport_name} transport does not carry stream calls"
                    )
                stream = await conn.open_stream(path, payload, kind=kind, timeout=remaining, metadata=metadata)
                if self._down:
                    self._pool.answered(endpoint)
                started = False  # the StreamCall reports the outcome to the balancer from here
                return StreamCall(stream, path, partial(self._stream_ended, endpoint))
            except NotDeliveredError as exc:
                status = Status.UNAVAILABLE
                if exc.unreachable:
                    self._pool.mark_down((endpoint.host, endpoint.port), exc.message)
                if attempt >= self.max_attempts:
                    raise
            except RpcError as exc:
                status = exc.code
                if type(exc) is UnreachableError:
                    self._pool.mark_down((endpoint.host, endpoint.port), exc.message)
                raise
            finally:
                if started and feedback is not None:  # not opened: refused, failed or cancelled while opening
                    feedback.on_finish(endpoint, status=status, latency=0.0)
                if probe is not None:
                    self._pool.end_probe((endpoint.host, endpoint.port), probe)
            if tried is None:
                tried = set()
            tried.add(endpoint)

    def _not_open(self) -> RuntimeError:
        """Why a call cannot be made on this channel now (closed, or used outside its `async with` block)."""
        if self._closed:
            return RuntimeError(f"channel is closed ({self.target}): call while its `async with` block runs")
        return RuntimeError("use the Channel as `async with kubrpc.connect(...) as channel:`")

    def _stream_ended(self, endpoint: Endpoint, call: StreamCall) -> None:
        """A stream call ended: tell the balancer (if it learns from calls) and the stream recorders (metrics)."""
        assert call.status is not None
        if self._feedback is not None:
            self._feedback.on_finish(endpoint, status=call.status, latency=call.seconds)
        if self._recorders:
            record(self._recorders, call)

    async def _intercept_stream(
        self,
        path: str,
        payload: bytes,
        kind: CallKind,
        timeout: float | None,
        idempotent: bool,
        key: str | None,
        metadata: Mapping[str, str],
    ) -> StreamCall:
        """open_stream() through the client interceptors: they run once, around the opening of the stream."""
        service, _, method = path.partition("/")
        deadline = None if timeout is None else time.monotonic() + timeout
        outgoing = {k.lower(): v for k, v in metadata.items()}
        call = ClientCall(service, method, path, outgoing, deadline, idempotent, self.target, kind)
        opened: list[StreamCall] = []
        start = time.monotonic()

        async def send() -> bytes:
            if opened:  # a stream is one call: opening it again could run its handler twice
                raise RpcError(
                    Status.INTERNAL,
                    f"a client interceptor of {path} called proceed() twice: a stream call is opened once "
                    "(retry a stream in the code that reads it, not in an interceptor)",
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            opened.append(
                await self.open_stream(
                    path,
                    payload,
                    kind=kind,
                    timeout=remaining,
                    idempotent=idempotent,
                    key=key,
                    metadata=_Intercepted(call.metadata),
                )
            )
            return b""

        proceed: Proceed = send
        for interceptor in reversed(self._interceptors):
            proceed = partial(interceptor, call, proceed)
        try:
            if timeout is None:
                await proceed()
            else:
                try:
                    async with asyncio.timeout(timeout):  # the stream's deadline covers the interceptors too
                        await proceed()
                except TimeoutError:
                    raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
            if not opened:
                raise RpcError(Status.INTERNAL, f"a client interceptor of {path} did not call proceed()")
        except BaseException as exc:
            if opened:
                opened[0].fail(exc)  # counted (metrics) under the error the caller gets
            elif self._recorders:  # never opened: counted here, as a call that failed
                failed = StreamCall(_NOT_OPENED, path, None)
                failed._started = start
                failed.fail(exc)
                record(self._recorders, failed)
            raise
        return opened[0]

    async def _intercept(
        self,
        path: str,
        payload: bytes,
        timeout: float | None,
        idempotent: bool,
        key: str | None,
        metadata: Mapping[str, str],
    ) -> bytes:
        """call() through the client interceptors, outermost first; the deadline covers them too."""
        service, _, method = path.partition("/")
        deadline = None if timeout is None else time.monotonic() + timeout
        outgoing = {k.lower(): v for k, v in metadata.items()}
        call = ClientCall(service, method, path, outgoing, deadline, idempotent, self.target)

        async def send() -> bytes:
            remaining = None if deadline is None else deadline - time.monotonic()
            return await self.call(
                path, payload, timeout=remaining, idempotent=idempotent, key=key, metadata=_Intercepted(call.metadata)
            )

        proceed: Proceed = send
        for interceptor in reversed(self._interceptors):
            proceed = partial(interceptor, call, proceed)
        if timeout is None:
            return await proceed()
        try:
            async with asyncio.timeout(timeout):  # not anyio.fail_after: half the cost, and transports are asyncio's
                return await proceed()
        except TimeoutError:
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None

    async def _first_pick(self, key: str | None, remaining: float | None) -> Endpoint:
        """The first calls wait (within their deadline) for the resolver's first snapshot.

        A resolver with `ResolverDiagnostics` ends the wait early on a permanent problem, and its
        `problem` is added to the UNAVAILABLE error of a call that finds no endpoint.
        """
        resolved = self._resolved
        diagnostics = self._resolver if isinstance(self._resolver, ResolverDiagnostics) else None
        if resolved is not None and not resolved.is_set():
            wait = self.wait_for_endpoints if remaining is None else min(remaining, self.wait_for_endpoints)
            with anyio.move_on_after(wait):
                while diagnostics is not None and not diagnostics.problem_is_permanent and not resolved.is_set():
                    with anyio.move_on_after(0.05):  # the resolver has no event for "failed": look again soon
                        await resolved.wait()
                if not (diagnostics is not None and diagnostics.problem_is_permanent):
                    await resolved.wait()
        try:
            return self._pick(key, None)
        except RpcError as exc:
            problem = diagnostics.problem if diagnostics is not None and not self.endpoints else None
            if exc.code is not Status.UNAVAILABLE or not problem:
                raise
            raise RpcError(Status.UNAVAILABLE, f"{exc.message}: {problem}") from None

    def _pick(self, key: str | None, tried: set[Endpoint] | None) -> Endpoint:
        balancer = self.balancer
        pick_for = self._pick_for
        endpoint = pick_for(key) if key is not None and pick_for is not None else balancer.pick()
        if tried or self._down:
            # Prefer an endpoint this call has not failed on, and one not refusing connections lately.
            for _ in range(4):
                if not (tried and endpoint in tried) and not self._pool.is_down(endpoint):
                    break
                endpoint = balancer.pick()
        return endpoint

    async def _call_with_feedback(
        self, endpoint: Endpoint, path: str, payload: bytes, timeout: float | None, metadata: Mapping[str, str]
    ) -> bytes:
        conn = self._connections.get((endpoint.host, endpoint.port))
        feedback = self._feedback
        assert feedback is not None
        feedback.on_start(endpoint)
        start = time.monotonic()
        status = Status.CANCELLED
        try:
            if conn is None or not conn.usable:
                conn = await self._pool.get(endpoint, timeout)  # a refused connection counts against the endpoint
            result = await conn.call(path, payload, timeout=timeout, metadata=metadata)
            status = Status.OK
            return result
        except RpcError as exc:
            status = exc.code
            raise
        finally:
            feedback.on_finish(endpoint, status=status, latency=time.monotonic() - start)

    @property
    def connections(self) -> dict[str, Connection]:
        """The open transport connections, by endpoint address (a snapshot)."""
        return {f"{host}:{port}": conn for (host, port), conn in self._connections.items()}

    def __repr__(self) -> str:
        ready = sum(1 for ep in self.endpoints if ep.ready)
        return f"<Channel {self.target} [{ready} ready | {self.balancer_name} | {self.transport_name}]>"


connect = Channel
"""`kubrpc.connect(target, **options)`: a Channel to `target` (`k8s://SVC.NS:PORT`, `static://H:P,...`, `tcp://H:P`,
`http://H:P`, `inproc://NAME`, endpoints, or a resolver); use it as `async with kubrpc.connect(...) as channel:`.
The same callable as Channel, so its options are written once."""


@runtime_checkable
class EndpointObserver(Protocol):
    """An interceptor that also wants the channel's endpoints after every snapshot (kubrpc.metrics.ClientMetrics)."""

    def observe_endpoints(self, channel: Channel, endpoints: Sequence[Endpoint], /) -> None:
        """Called like an `on_endpoints` hook."""
        ...


class RetryBudget:
    """Caps retries at a fraction of calls, so that retries cannot multiply the load of an outage.

    Only retries of calls that reached a server are charged; a call that was never delivered
    (connection refused, server going away) is retried on another endpoint regardless.

    Every call deposits `ratio` tokens (up to `max_tokens`); every retry spends one. The budget
    starts with `min_tokens`, so a client that has made few calls can still retry a little.
    """

    def __init__(self, ratio: float = 0.2, *, min_tokens: float = 10.0, max_tokens: float = 100.0) -> None:
        if not 0 <= ratio <= 1 or min_tokens < 0 or max_tokens < min_tokens:
            raise ValueError("need 0 <= ratio <= 1 and 0 <= min_tokens <= max_tokens")
        self._ratio = ratio
        self.max_tokens = max_tokens
        self._tokens = float(min_tokens)
        self._owed = 0  # calls whose deposit is not in _tokens yet (deposit() runs on every call: it only counts)
        self.retries = 0
        self.refused = 0

    @property
    def tokens(self) -> float:
        """The tokens in the budget now."""
        self._settle()
        return self._tokens

    @tokens.setter
    def tokens(self, value: float) -> None:
        self._owed = 0
        self._tokens = value

    @property
    def ratio(self) -> float:
        """The tokens each call deposits."""
        return self._ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        self._settle()  # the calls made so far deposited at the old ratio
        self._ratio = value

    def deposit(self) -> None:
        """A call was made."""
        self._owed += 1

    def _settle(self) -> None:
        """Add the deposits owed, capped at max_tokens as one at a time would be (up to float rounding)."""
        if self._owed:
            tokens = self._tokens + self._ratio * self._owed
            self._owed = 0
            self._tokens = tokens if tokens < self.max_tokens else self.max_tokens

    def withdraw(self) -> bool:
        """May this call be retried? Spends a token if so."""
        self._settle()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.retries += 1
            return True
        self.refused += 1
        return False

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self.ratio:.0%} [{self.tokens:.1f} tokens, {self.retries} retries, {self.refused} refused]>"
        )


# A timeout this long (about 31 years) is no deadline: the wire could not carry it (TCP's is 32 bits of ms).
_FOREVER = 1e9


def _check_metadata(metadata: Mapping[str, str]) -> None:
    """INVALID_ARGUMENT unless the metadata can travel on every transport (kubrpc.codec.check_metadata)."""
    try:
        check_metadata(metadata)
    except ValueError as exc:
        raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None


def _valid(metadata: Mapping[str, str]) -> bool:
    """Would call() let this metadata travel?"""
    try:
        check_metadata(metadata)
    except ValueError:
        return False
    return True


def _check_timeout(timeout: float) -> float | None:
    """A call timeout as the channel uses it: None for none (inf or beyond _FOREVER); ValueError for NaN."""
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds (or None for no deadline), not NaN")
    return None if timeout >= _FOREVER else timeout


class _NeverOpened:
    """The transport stream of a StreamCall that was never opened (the metrics of a stream that failed to open)."""

    def cancel(self) -> None:
        """Nothing to cancel."""

    async def send(self, message: bytes, /) -> bool:
        """Nothing is sent."""
        return False

    async def close_send(self) -> None:
        """Nothing to close."""

    async def receive(self) -> bytes | None:
        """Nothing arrives."""
        return None


_NOT_OPENED = _NeverOpened()


class _Intercepted(dict[str, str]):
    """The metadata of a call that has been through the client interceptors: Channel.call sends it as is."""

    __slots__ = ()


class _Stub:
    """A typed client of one service; methods are attached per Protocol method."""

    def __init__(self, description: str, service: str = "", methods: Sequence[str] = ()) -> None:
        self._description = description
        self._service = service
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        # Only for attributes that are not there: say which service lacks it, and what is nearest.
        if name.startswith("__"):
            raise AttributeError(name)
        from .reflection import suggest

        service, methods = self.__dict__.get("_service", ""), self.__dict__.get("_methods", ())
        raise AttributeError(f"{service} has no method {name!r}{suggest(name, methods)}", name=name, obj=self)

    def __repr__(self) -> str:
        return self._description
