"""Server: maps service Protocols to implementations and serves them over any transport."""

from __future__ import annotations

import asyncio
import dis
import inspect
import logging
import os
import signal
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import anyio

from ._limits import DEFAULT_MAX_MESSAGE_SIZE, ServerLimits
from .codec import Attached, Packed
from .errors import RpcError
from .interceptors import CallInfo, Proceed, ServerInterceptor, _current
from .interface import CallKind, MethodSpec, ServiceSpec, check_implementation, service_spec
from .interfaces import AsgiTransport, InlineDispatch, Listener, MetricsExposition, StreamRecorder
from .status import Status

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from .metrics import ServerMetrics
    from .openapi import Info

__all__ = ("DEFAULT_MAX_MESSAGE_SIZE", "Server", "ServerLimits", "event_loop_options")

log = logging.getLogger("kubrpc.server")


@dataclass(frozen=True, slots=True, eq=False)
class _Route:
    spec: MethodSpec
    handler: Callable[..., Any]
    run_now: InlineDispatch | None = None  # for a handler that never waits: runs a call to its end at once (_run_now)
    function: FunctionType | None = None  # for such a handler: its function, and the code that was checked
    code: types.CodeType | None = None


def _route(spec: MethodSpec, handler: Callable[..., Any]) -> _Route:
    """The route of `handler`: run inline (run_now) if it never waits, with the code that was checked for that."""
    function = None if spec.kind is not CallKind.UNARY or spec.options.timeout is not None else _never_waits(handler)
    if function is None:
        return _Route(spec, handler)
    return _Route(spec, handler, _run_now(spec, handler), function, function.__code__)


# The opcodes of `await`, `async with` and `async for`: a coroutine whose code has none cannot suspend.
_WAITS = frozenset(
    {"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT", "END_ASYNC_FOR"}
)


def _never_waits(handler: Callable[..., Any]) -> FunctionType | None:
    """The function of `handler` if it is an `async def` (function or bound method) whose body has no await,
    async with or async for; else None."""
    function = handler.__func__ if type(handler) is MethodType else handler
    # A Python function only: what else has a __code__ (a Cython or Nuitka function, a mock) need not run it.
    if type(function) is not FunctionType or not function.__code__.co_flags & inspect.CO_COROUTINE:
        return None  # a wrapper, a partial, a callable object, compiled code: unknown
    if any(instruction.opname in _WAITS for instruction in dis.get_instructions(function.__code__)):
        return None
    return function


class Server:
    """Serves registered services; one Server can listen on many URLs and transports at once.

    Options: `max_message_size` (bytes, both ways; larger is RESOURCE_EXHAUSTED), `max_concurrent_calls`
    (per TCP connection), `max_connections`, `max_pending_bytes` (request bytes held by running calls,
    all connections together; beyond it new calls are RESOURCE_EXHAUSTED), `idle_timeout` (seconds
    without a call before a TCP connection is sent away; None: never), `drain_timeout` (how long running
    calls may take to finish on shutdown), `shutdown_delay` (seconds `run()` keeps serving after SIGTERM
    with /readyz at 503, before draining: time for Kubernetes to take the pod out of its EndpointSlices),
    `interceptors` (see kubrpc.interceptors), `metrics` (see kubrpc.metrics), `reflection` (serve the
    `kubrpc.Reflection` service that `kubrpc list` and `kubrpc describe` read over TCP; see kubrpc.reflection).
    HTTP only: `header_timeout` (seconds for a request's head to arrive, from the connection's opening or the
    head's first byte; then 408 or a close; over HTTPS, for the TLS handshake too), `body_timeout` (seconds
    for its body to arrive after the head, then 408; and for a peer that reads none of an answer waiting
    unsent, then the connection is aborted), `max_header_size` (bytes of request line and headers; larger is
    431), `openapi` (a kubrpc.openapi.Info: the title, version and description of /openapi.json and the
    /docs page).
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_concurrent_calls: int = 10_000,
        max_connections: int = 10_000,
        max_pending_bytes: int = 256 * 1024 * 1024,
        idle_timeout: float | None = 600.0,
        drain_timeout: float = 30.0,
        shutdown_delay: float = 0.0,
        interceptors: Sequence[ServerInterceptor] = (),
        metrics: bool | ServerMetrics = False,
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_header_size: int = 16 * 1024,
        openapi: Info | None = None,
        reflection: bool = True,
    ) -> None:
        self.limits = ServerLimits(
            max_message_size=max_message_size,
            max_concurrent_calls=max_concurrent_calls,
            max_connections=max_connections,
            max_pending_bytes=max_pending_bytes,
            idle_timeout=idle_timeout,
            drain_timeout=drain_timeout,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_header_size=max_header_size,
        )
        """What the server allows its peers: every transport reads these (kubrpc.interfaces.ServerCore)."""
        self.openapi = openapi
        """The `info` of /openapi.json (kubrpc.openapi.Info); None: made up from the services' names."""
        self._pending_bytes = 0
        self.shutdown_delay = shutdown_delay
        self.interceptors: tuple[ServerInterceptor, ...] = tuple(interceptors)
        if metrics is True:
            from .metrics import ServerMetrics

            metrics = ServerMetrics()
        if metrics is not False:
            self.interceptors = (metrics, *self.interceptors)  # first: rejections by other interceptors count too
        self.metrics: MetricsExposition | None = next(
            (i for i in self.interceptors if isinstance(i, MetricsExposition)), None
        )
        """The interceptor recording this server's calls that can show them (kubrpc.metrics), if any."""
        self._recorders = tuple(i for i in self.interceptors if isinstance(i, StreamRecorder))
        self.services: dict[str, ServiceSpec] = {}
        self._routes: dict[str, _Route] = {}
        self._app: ASGIApp | None = None
        self.draining = False
        self._reflection = reflection  # also: may an unknown call's error name the services there are?
        if reflection:  # routed like any service, but not in self.services (nor in /openapi.json)
            from .reflection import Reflection, ReflectionService

            self._add_routes(service_spec(Reflection), ReflectionService(self))

    @property
    def max_message_size(self) -> int:
        """`limits.max_message_size`."""
        return self.limits.max_message_size

    @property
    def max_concurrent_calls(self) -> int:
        """`limits.max_concurrent_calls`."""
        return self.limits.max_concurrent_calls

    @property
    def max_connections(self) -> int:
        """`limits.max_connections`."""
        return self.limits.max_connections

    @property
    def max_pending_bytes(self) -> int:
        """`limits.max_pending_bytes`."""
        return self.limits.max_pending_bytes

    @property
    def idle_timeout(self) -> float | None:
        """`limits.idle_timeout`."""
        return self.limits.idle_timeout

    @property
    def drain_timeout(self) -> float:
        """`limits.drain_timeout`."""
        return self.limits.drain_timeout

    def register(self, iface: type[Any], impl: object) -> None:
        """Serve `impl` as the service Protocol `iface`; TypeError now if impl does not match it.

        The check runs here, at run time: no signature of this method lets mypy (or pyright) check `impl`
        against `iface`. `register(iface: type[T], impl: T)` binds T to the join of both arguments
        (`object` for a wrong implementation, so nothing is reported), and mypy refuses a Protocol class
        where `type[T]` is expected anyway ("Only concrete class can be given", error code type-abstract),
        so every correct call would be an error. For a static check, annotate the implementation with the
        Protocol, which mypy does check structurally: `impl: Arith = ArithImpl()`, then
        `server.register(Arith, impl)` (tests/typecheck/register.py).
        """
        spec = service_spec(iface)
        if spec.name in self.services:
            raise ValueError(f"service {spec.name!r} is already registered")
        if spec.name == "kubrpc.Reflection":
            raise ValueError("'kubrpc.Reflection' is the built-in reflection service's name")
        self._add_routes(spec, impl)
        self.services[spec.name] = spec
        self._app = None

    def _add_routes(self, spec: ServiceSpec, impl: object) -> None:
        handlers = check_implementation(spec, impl)
        for attr, m in spec.methods.items():
            self._routes[m.path] = _route(m, handlers[attr])

    def admit(self, size: int) -> bool:
        """For transports: may a request of `size` bytes start now? Counts it if so (release() when done).

        Caps the request bytes held by running calls across all connections (`max_pending_bytes`);
        a refused request is answered RESOURCE_EXHAUSTED without running.
        """
        if self._pending_bytes and self._pending_bytes + size > self.max_pending_bytes:
            return False
        self._pending_bytes += size
        return True

    def release(self, size: int) -> None:
        """For transports: a request admitted with admit(size) has finished."""
        self._pending_bytes -= size

    def runs_inline(self, path: str) -> bool:
        """For transports: can dispatch() of a call at `path` finish without waiting, so without a task of its own?

        True for a unary method with no timeout of its own whose handler's code has no await, async with or
        async for, on a server without interceptors: such a call can run to its end where its request is read.
        """
        return self.dispatch_inline(path) is not None

    def dispatch_inline(self, path: str) -> InlineDispatch | None:
        """For transports: dispatch() of a call at `path` as a plain function, if it never waits (runs_inline()).

        `run(payload, timeout, metadata, peer)` runs the call to its end at once and returns the encoded
        result (a codec.Attached for a codec.Packed payload whose result has bytes values) or raises RpcError,
        as dispatch() would; the transport calls it in a copy of the context with a task entered as current
        (transports/_eager.py's InlineRunner). None when the call may wait: dispatch() it in a task.
        """
        route = self._routes.get(path)
        if route is None or route.run_now is None or self.interceptors:
            return None
        if route.function.__code__ is not route.code:  # type: ignore[union-attr]
            # Its code was replaced in place since it was checked (a hot reloader does that): check it again,
            # or a handler that waits now would be run inline, stopped at its first wait and answered INTERNAL.
            route = self._routes[path] = _route(route.spec, route.handler)
        return route.run_now

    def method(self, path: str) -> MethodSpec | None:
        """The registered method at `Service/method`, if any."""
        route = self._routes.get(path)
        return route.spec if route else None

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
        """Run one call: validate, call the handler under its deadline, encode the result or raise RpcError.

        `deadline_enforced=True` says the transport cancels the call itself when `timeout` passes (the
        TCP transport does, with one timer for all its calls); dispatch then only reports the deadline.
        A codec.Packed payload (the TCP attachments format) is answered in that format, a codec.Attached,
        when the result has bytes values to attach.
        """
        route = self._routes.get(path)
        if route is None or route.spec.kind is not CallKind.UNARY:
            raise self._not_served(path, route, unary=True)
        spec = route.spec
        limit = spec.options.timeout
        if limit is not None and (timeout is None or limit < timeout):
            timeout = limit
            deadline_enforced = False  # the method's own, shorter limit is enforced here
        if self.interceptors:
            return await self._intercepted(route, path, payload, timeout, metadata, peer, deadline_enforced)
        at = None if timeout is None else time.monotonic() + timeout
        context = _current.set((spec, path, metadata, peer, at))
        deadline: asyncio.Timeout | None = None
        try:
            kwargs = spec.decode_args(payload)  # inside: a dataclass's __post_init__ is user code
            if timeout is None or deadline_enforced:
                result = await route.handler(**kwargs)
            else:
                # asyncio.timeout rather than anyio.move_on_after: a third of the cost on the hot path.
                async with asyncio.timeout(timeout) as deadline:
                    result = await route.handler(**kwargs)
        except RpcError:
            raise
        except BaseException as exc:
            raise _failure(exc, deadline, path) from None
        finally:
            _current.reset(context)
        try:
            if type(payload) is Packed:  # the client reads attachments too: the result's bytes go as attachments
                return spec.encode_result_attached(result)
            return spec.encode_result(result)
        except Exception:  # TypeError, or whatever a value's own code raised (never out into the transport)
            log.exception("result of %s cannot be encoded", path)
            raise RpcError(Status.INTERNAL, "internal error") from None

    async def _intercepted(
        self,
        route: _Route,
        path: str,
        payload: bytes,
        timeout: float | None,
        metadata: Mapping[str, str],
        peer: str,
        deadline_enforced: bool,
    ) -> bytes:
        """dispatch() through the interceptors, which run under the deadline and before the arguments are decoded."""
        spec = route.spec
        at = None if timeout is None else time.monotonic() + timeout
        call = CallInfo(spec.service, spec.name, path, metadata, peer, at)
        proceed: Proceed = partial(_run_handler, route, payload)
        for interceptor in reversed(self.interceptors):
            proceed = partial(interceptor, call, proceed)
        context = _current.set(call)
        deadline: asyncio.Timeout | None = None
        try:
            if timeout is None or deadline_enforced:
                result = await proceed()
            else:
                async with asyncio.timeout(timeout) as deadline:
                    result = await proceed()
        except RpcError:
            raise
        except BaseException as exc:
            raise _failure(exc, deadline, path) from None
        finally:
            _current.reset(context)
        if type(result) is not bytes and type(result) is not Attached:
            log.error("an interceptor of %s returned %s, not the encoded result", path, type(result).__name__)
            raise RpcError(Status.INTERNAL, "internal error")
        return result

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
        """Run one stream call (kubrpc.interfaces.ServerCore): the result of a client stream, else None.

        The handler's arguments are decoded from `payload`; a client stream's messages come from `messages`,
        each validated as it is read (a bad one is INVALID_ARGUMENT and ends the call); each message the handler
        yields is encoded and given to `send`. The deadline, interceptors and errors work as for dispatch(),
        around the whole stream.
        """
        route = self._routes.get(path)
        if route is None or route.spec.kind is CallKind.UNARY:
            raise self._not_served(path, route, unary=False)
        spec = route.spec
        limit = spec.options.timeout
        if limit is not None and (timeout is None or limit < timeout):
            timeout = limit
            deadline_enforced = False
        start = time.monotonic()
        at = None if timeout is None else start + timeout
        call = CallInfo(spec.service, spec.name, path, metadata, peer, at, spec.kind)
        counts = [0, 0]  # messages received, sent
        proceed: Proceed = partial(_run_stream, route, payload, messages, send, counts)
        for interceptor in reversed(self.interceptors):
            proceed = partial(interceptor, call, proceed)
        context = _current.set(call)
        deadline: asyncio.Timeout | None = None
        status = Status.CANCELLED
        try:
            if timeout is None or deadline_enforced:
                result = await proceed()
            else:
                async with asyncio.timeout(timeout) as deadline:
                    result = await proceed()
            status = Status.OK
        except RpcError as exc:
            status = exc.code
            raise
        except BaseException as exc:
            failure = _failure(exc, deadline, path)
            if isinstance(failure, RpcError):
                status = failure.code
            raise failure from None
        finally:
            _current.reset(context)
            for recorder in self._recorders:
                recorder.record_stream(
                    path,
                    status=status,
                    seconds=time.monotonic() - start,
                    received=counts[0],
                    sent=counts[1],
                    client=False,
                )
        if type(result) is not bytes and type(result) is not Attached:
            log.error("an interceptor of %s returned %s, not the encoded result", path, type(result).__name__)
            raise RpcError(Status.INTERNAL, "internal error")
        return None if spec.kind.streams_results else result

    def _not_served(self, path: str, route: _Route | None, *, unary: bool) -> RpcError:
        """UNIMPLEMENTED for an unknown path, or for a method called as the wrong kind (a stream as unary, ...)."""
        if route is None:
            if self.metrics is not None:
                self.metrics.record_unimplemented(path, self.services)
            return _unimplemented(path, self.services, hints=self._reflection)
        kind = route.spec.kind.value.replace("_", " ")
        if unary:
            return RpcError(
                Status.UNIMPLEMENTED,
                f"{path} is a {kind} call: call it with a streaming client (a kubrpc stub, or a Connect client "
                "over HTTP with Content-Type application/connect+json), not as a unary call",
            )
        return RpcError(Status.UNIMPLEMENTED, f"{path} is a unary call, not a stream: call it as one")

    def asgi(self) -> ASGIApp:
        """The HTTP/JSON transport as an ASGI app: `uvicorn mymodule:app` serves it."""
        if self._app is None:
            from .transports import create

            transport = create("http")  # through the registry: whichever plugin serves http
            if not isinstance(transport, AsgiTransport):
                raise TypeError(f"the registered http transport {transport!r} cannot make an ASGI app")
            self._app = transport.asgi(self)
        return self._app

    @asynccontextmanager
    async def serve(self, url: str, /, **options: Any) -> AsyncIterator[Listener]:
        """Listen on `url` (`tcp://HOST:PORT` or `http://HOST:PORT`, port 0 for any) until the block exits.

        `inproc://NAME` serves callers in this process only (`kubrpc.connect("inproc://NAME")`), with no sockets.

        Options go to the transport; `ssl=` (a server-side ssl.SSLContext) turns on TLS, and `https://` means
        `http://` with TLS.
        """
        from .transports import create

        parts = urlsplit(url)
        if parts.scheme == "inproc":  # a name, not an address: taken as written (case and all)
            async with create("inproc", **options).listen(self, url.partition("://")[2], 0) as listener:
                yield listener
            return
        if not parts.scheme or parts.hostname is None:
            raise ValueError(f"bad listen URL {url!r}: expected SCHEME://HOST:PORT")
        scheme = parts.scheme
        if scheme == "https":
            if options.get("ssl") is None:
                raise ValueError("an https:// listener needs ssl=SSLContext (with the server's certificate)")
            scheme = "http"
        transport = create(scheme, **options)
        async with AsyncExitStack() as stack:
            try:
                listener = await stack.enter_async_context(transport.listen(self, parts.hostname, parts.port or 0))
            except OSError as exc:  # say which URL: "address already in use" alone does not
                raise OSError(exc.errno, f"cannot listen on {url}: {exc.strerror or exc}") from exc
            yield listener

    async def serve_forever(self, *urls: str, ready: Callable[[list[str]], None] | None = None) -> None:
        """Serve on every URL until SIGTERM or SIGINT, then drain and return."""
        await self._serve_forever([(url, {}) for url in urls], ready)

    async def _serve_forever(
        self, listens: Sequence[tuple[str, Mapping[str, Any]]], ready: Callable[[list[str]], None] | None
    ) -> None:
        """serve_forever() on each (URL, serve() options) pair: a pre-fork worker passes `sock=` (kubrpc._workers)."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with AsyncExitStack() as stack:
                listeners = [await stack.enter_async_context(self.serve(url, **options)) for url, options in listens]
                bound = [listener.url for listener in listeners]
                log.info("serving on %s", ", ".join(bound))
                if ready is not None:
                    ready(bound)
                async for signum in signals:
                    self.draining = True  # /readyz answers 503 from now on
                    if self.shutdown_delay > 0:
                        # Keep serving while Kubernetes takes the pod out of the EndpointSlices and clients
                        # stop picking it; a second signal cuts the wait short.
                        log.info(
                            "received %s; serving %g s more, then draining",
                            signal.Signals(signum).name,
                            self.shutdown_delay,
                        )
                        with anyio.move_on_after(self.shutdown_delay):
                            await signals.__anext__()
                    log.info("draining")
                    break

    def run(self, *urls: str, workers: int = 1) -> None:
        """Serve on every URL until SIGTERM/SIGINT, then drain: the blocking entry point of a service.

        `workers=N` (N > 1) serves from N processes forked from this one, which share the listening sockets
        bound here; SIGTERM/SIGINT drains them all, a worker that dies is restarted (see kubrpc._workers).
        Each worker holds its own connections and limits. Raises SystemExit(1) if a worker failed while
        draining, and kubrpc._workers.WorkerStartupError if one failed before it served.
        """
        if not urls:
            raise ValueError("give at least one URL to listen on, e.g. tcp://0.0.0.0:9000")
        if workers != 1:
            from ._workers import supervise

            status = supervise(lambda: self, urls, workers, backend_options=event_loop_options())
            if status:
                raise SystemExit(status)
            return
        anyio.run(self.serve_forever, *urls, backend_options=event_loop_options())

    def __repr__(self) -> str:
        return f"<Server [{', '.join(self.services)}]>"


async def _run_handler(route: _Route, payload: bytes) -> bytes:
    """The innermost step of an interceptor chain: decode the arguments, run the handler, encode its result."""
    result = await route.handler(**route.spec.decode_args(payload))
    if type(payload) is Packed:
        return route.spec.encode_result_attached(result)
    return route.spec.encode_result(result)


async def _run_stream(
    route: _Route,
    payload: bytes,
    messages: AsyncIterator[bytes] | None,
    send: Callable[[bytes], Awaitable[None]],
    counts: list[int],
) -> bytes:
    """The innermost step of a stream call: decode, run the handler, stream or encode what it gives."""
    spec = route.spec
    kwargs = spec.decode_args(payload)
    if spec.stream is not None:
        if messages is None:
            raise RpcError(Status.INTERNAL, "internal error: the transport gave no request stream")
        kwargs[spec.stream.name] = _Requests(spec, messages, counts)
    # A client that sent its arguments as attachments reads them too (docs/protocol.md, "Attachments").
    encode = spec.encode_result_attached if type(payload) is Packed else spec.encode_result
    if not spec.kind.streams_results:
        return encode(await route.handler(**kwargs))
    task = asyncio.current_task()
    async with aclosing(route.handler(**kwargs)) as results:
        async for item in results:
            if task is not None and task.cancelling():
                # The call was cancelled and the handler swallowed it (a bare `except`): stop it at this yield,
                # or it would keep producing messages for a client that has gone.
                raise asyncio.CancelledError
            try:
                data = encode(item)
            except TypeError:
                log.exception("a message of %s cannot be encoded", spec.path)
                raise RpcError(Status.INTERNAL, "internal error") from None
            await send(data)
            counts[1] += 1
    return b""


class _Requests:
    """The client's messages, each decoded and validated as the handler reads it.

    A plain async iterator, not an async generator: a handler may read it from a task of its own and return
    while that task is still waiting for a message (an async generator could not be closed then). Once the call
    has ended, the transport ends `messages` and a late reader gets its error.
    """

    __slots__ = ("_counts", "_messages", "_spec")

    def __init__(self, spec: MethodSpec, messages: AsyncIterator[bytes], counts: list[int]) -> None:
        self._spec = spec
        self._messages = messages
        self._counts = counts

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        data = await self._messages.__anext__()
        counts = self._counts
        item = self._spec.decode_message(data, counts[0])
        counts[0] += 1
        return item


def event_loop_options() -> dict[str, Any]:
    """anyio.run options: uvloop if installed (the `uvloop` extra, or `pip install uvloop`), unless KUBRPC_UVLOOP=0."""
    if os.environ.get("KUBRPC_UVLOOP", "1") == "0":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


_FINISHED = object()


@types.coroutine
def _driver() -> Generator[Any, Any, None]:
    """send(coro) runs a coroutine: (_FINISHED, its result) if it finished without waiting, else what it yielded.

    Cheaper than coro.send(None) for a coroutine that finishes at once: no StopIteration to make and catch.
    A coroutine that raises ends the driver too (then make another).
    """
    step: Any = None
    while True:
        coro = yield step
        step = (_FINISHED, (yield from coro))


def _primed_driver() -> types.GeneratorType[Any, Any, None]:
    driver = cast("types.GeneratorType[Any, Any, None]", _driver())
    driver.send(None)
    return driver


def _run_now(spec: MethodSpec, handler: Callable[..., Any]) -> InlineDispatch:
    """dispatch() of a handler that never waits, as one plain function (Server.dispatch_inline)."""
    path, decode_args, encode_result, encode_attached = (
        spec.path,
        spec.args_decoder(),
        spec.encode_result,
        spec.encode_result_attached,
    )
    driver = _primed_driver()

    def run_now(payload: bytes, timeout: float | None, metadata: Mapping[str, str], peer: str) -> bytes:
        nonlocal driver
        # In a fresh copy of the context (the transport's): _current needs no reset.
        _current.set((spec, path, metadata, peer, None if timeout is None else time.monotonic() + timeout))
        try:
            coro = handler(**decode_args(payload))  # inside: a dataclass's __post_init__ is user code
            if driver.gi_running:  # run from inside another call (not by a transport): the plain way
                driver = _primed_driver()
            step = driver.send(coro)
        except RpcError:
            if driver.gi_frame is None:
                driver = _primed_driver()
            raise
        except BaseException as exc:
            if driver.gi_frame is None:
                driver = _primed_driver()
            raise _failure(exc, None, path) from None
        if type(step) is not tuple or step[0] is not _FINISHED:
            # It waited after all: the handler changed since it was registered (a patched method?)
            stuck, driver = driver, _primed_driver()
            try:
                stuck.close()  # the handler's coroutine too
            except Exception:  # it ignored GeneratorExit: it is abandoned all the same
                log.exception("closing %s's handler failed", path)
            log.error("%s waited for something, but its code has no await: it cannot run inline; stopped", path)
            raise RpcError(Status.INTERNAL, "internal error")
        result = step[1]
        try:
            if type(payload) is Packed:  # the client reads attachments too: the result's bytes go as attachments
                return encode_attached(result)
            return encode_result(result)
        except Exception:  # TypeError, or whatever a value's own code raised (never out into the transport)
            log.exception("result of %s cannot be encoded", path)
            raise RpcError(Status.INTERNAL, "internal error") from None

    return run_now


def _failure(exc: BaseException, deadline: asyncio.Timeout | None, path: str) -> BaseException:
    """What to raise for a call that raised `exc` (not an RpcError); call it inside the `except` block.

    A real cancellation of the call, KeyboardInterrupt and SystemExit go on as they are; a deadline is
    DEADLINE_EXCEEDED; anything else (other BaseExceptions too) is INTERNAL, with the details only in the
    server's log.
    """
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is None or task.cancelling() > 0:  # this call is being cancelled
            return exc
        # else the handler raised CancelledError itself (say, from a future someone else cancelled)
    elif isinstance(exc, (KeyboardInterrupt, SystemExit)):  # the process is being stopped: let it stop
        return exc
    elif isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
        return RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
    log.exception("call of %s failed", path)
    return RpcError(Status.INTERNAL, "internal error")


def _unimplemented(path: str, services: Mapping[str, ServiceSpec], *, hints: bool = True) -> RpcError:
    """UNIMPLEMENTED, naming the nearest service or method this server has ("did you mean lib.Loans?").

    Without `hints` (a server with `reflection=False`, which chose not to describe itself) the error names
    nothing the caller did not send: the suggestions would list the services to anyone.
    """
    from .reflection import quoted, suggest

    service, _, name = path.partition("/")
    spec = services.get(service)
    if spec is None:
        hint = suggest(service, services) if hints else ""
        return RpcError(Status.UNIMPLEMENTED, f"unknown service {quoted(service)}{hint}")
    hint = suggest(name, [m.name for m in spec.methods.values()]) if hints else ""
    return RpcError(Status.UNIMPLEMENTED, f"unknown method {quoted(name)} of service {service!r}{hint}")
