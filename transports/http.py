"""http: JSON over HTTP/1.1, served by Starlette and uvicorn, callable with curl.

POST /{service}/{method}   Content-Type: application/json   body: {"arg": value, ...}
200 -> the JSON result;  error -> {"code": "<snake_case status>", "message": "..."} with Connect's HTTP status
Streams: Connect's streaming protocol (application/connect+json, enveloped messages), and a WebSocket on the same
path for bidirectional streams (docs/protocol.md, "HTTP streaming"; transports/_connect.py)
GET /healthz, /readyz, /openapi.json, and /metrics when the Server has metrics (kubrpc.metrics)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import types
from collections.abc import AsyncIterator, Coroutine, Generator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kubrpc._asgi_server import NOT_STARTED, send_json, serve_uvicorn, websocket_protocol_class
from kubrpc._idle import IdleSignal
from kubrpc._limits import DEFAULT_MAX_MESSAGE_SIZE
from kubrpc.codec import check_metadata
from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError, RpcError, UnreachableError
from kubrpc.interface import CallKind
from kubrpc.status import Status

from . import _connect
from ._envelope import END_STREAM, Decoder, EnvelopeError, envelope
from ._http1 import ConnectFailed, Disconnected, Http1Pool, ReadTimeout, TooLarge, set_keepalive

if TYPE_CHECKING:
    from kubrpc.interfaces import ClientStream, ServerCore

__all__ = ("NOT_STARTED_HEADER", "HttpConnection", "HttpListener", "HttpTransport", "build_app")

TIMEOUT_HEADER = "connect-timeout-ms"
#: On a 503, this response header (value "1") says the kubrpc server did not start the call (over its connection
#: limit): the client retries it elsewhere. A 503 without it (a proxy's, a sidecar's) may come after the call ran.
NOT_STARTED_HEADER = NOT_STARTED[0].decode()  # on a 503: the call never started, so it may go elsewhere
_DEFAULT_LIMIT = DEFAULT_MAX_MESSAGE_SIZE


def build_app(server: ServerCore) -> ASGIApp:
    """The ASGI app of `server`: the RPC routes, health checks, the OpenAPI document and the /docs page.

    POST /{service}/{method} is served by a thin ASGI layer in front of a Starlette app that serves the rest:
    Starlette's routing, middleware and Request cost more per call than the call itself (see benchmarks/).
    """
    from kubrpc._docs import routes as docs_routes

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *docs_routes(server),  # /openapi.json and the /docs page
    ]
    metrics = server.metrics
    if metrics is not None:  # Server(metrics=...): Prometheus scrapes GET /metrics

        async def metrics_text(request: Request) -> Response:
            body, content_type = metrics.exposition(request.headers.get("accept"))
            return Response(body, headers={"content-type": content_type})

        routes.append(Route("/metrics", metrics_text, methods=["GET"]))
    return _App(server, Starlette(routes=routes))


class _App:
    """Routes /{service}/{method} (any HTTP method, as one Starlette path route would) to the RPC endpoint."""

    __slots__ = ("connect", "rest", "server")

    def __init__(self, server: ServerCore, rest: ASGIApp, *, connect: bool = True) -> None:
        self.server = server
        self.rest = rest
        # Connect calls (Connect-Protocol-Version): the same path, over a core that speaks proto3 JSON.
        self.connect = _App(_connect.ConnectCore(server), rest, connect=False) if connect else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" or (scope["type"] == "websocket" and self.connect is not None):
            # Routed by the raw path, as proxies' path rules see it: /Echo%2Fecho is not Echo/echo.
            raw: bytes | None = scope.get("raw_path")
            path: str = scope["path"] if raw is None else raw.decode("latin-1")
            root: str = scope.get("root_path", "")
            if root and path.startswith(root + "/"):  # mounted under a prefix: as Starlette's routing strips it
                path = path[len(root) :]
            service, _, method = path[1:].partition("/")
            if service and method and path[0] == "/" and "/" not in method:
                if scope["type"] == "websocket":  # a bidirectional stream (kubrpc's client)
                    await _connect.serve_websocket(self.server, path[1:], scope, receive, send)
                    return
                await self._rpc(path[1:], scope, receive, send)
                return
        await self.rest(scope, receive, send)

    async def _rpc(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.connect is not None:
            kind = _connect.route(scope["headers"])
            if kind == 2:  # application/connect+json: a stream (Connect's streaming protocol)
                await _connect.serve_stream(self.server, path, scope, receive, send)
                return
            if kind == 1:  # Connect-Protocol-Version: a Connect unary call
                await _connect.serve(self.connect._rpc, path, scope, receive, send)
                return
        body: bytes | None
        if scope["method"] != "POST":  # an HTTP-level error, as Connect servers answer it: 405 with Allow
            body = orjson.dumps({"code": Status.UNIMPLEMENTED.wire_name, "message": "RPC methods are called with POST"})
            await send_json(send, 405, body, ((b"allow", b"POST"),))
            return
        server = self.server
        held = 0  # request bytes counted by server.admit()
        body = None
        try:
            try:
                timeout, metadata, length = self._head(scope)
                if length is not None:  # admitted before the body is read: bodies still arriving count too
                    if not server.admit(length):
                        raise RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
                    held = length
                client = scope.get("client")
                peer = f"{_format_host(client[0])}:{client[1]}" if client else ""
                try:
                    task = asyncio.current_task()
                except RuntimeError:  # no asyncio loop (trio)
                    task = None
                if task is None:
                    with anyio.move_on_after(math.inf if timeout is None else timeout) as deadline_scope:
                        body = await self._body(receive, length)
                    if body is None:  # the deadline passed first
                        raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
                    if length is None:
                        held = len(body)
                    if timeout is not None:
                        timeout = deadline_scope.deadline - anyio.current_time()
                    result = await self._dispatch_anyio(path, body, timeout, metadata, peer, receive)
                elif timeout is None:
                    body = await self._body(receive, length)
                    if length is None:
                        held = len(body)
                    result = await self._dispatch_asyncio(task, path, body, None, metadata, peer, receive)
                else:
                    # The deadline covers reading the body too; one asyncio.timeout, as dispatch() would make.
                    try:
                        async with asyncio.timeout(timeout) as deadline:
                            body = await self._body(receive, length)
                            if length is None:
                                held = len(body)
                            timeout = cast(float, deadline.when()) - task.get_loop().time()
                            result = await self._dispatch_asyncio(task, path, body, timeout, metadata, peer, receive)
                    except TimeoutError:
                        raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
            finally:
                server.release(held)
            if result is not None and len(result) > server.limits.max_message_size:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
        except RpcError as exc:
            # A deadline that passed while the body was still arriving: the rest of it is not worth waiting for.
            close = body is None and exc.code is Status.DEADLINE_EXCEEDED
            await send_json(send, exc.code.http_status, orjson.dumps(exc.to_json()), _CLOSE if close else ())
            return
        if result is not None:
            await send_json(send, 200, result)

    def _head(self, scope: Scope) -> tuple[float | None, dict[str, str], int | None]:
        """The request's deadline, metadata and Content-Length, from its headers."""
        limit = self.server.limits.max_message_size
        metadata: dict[str, str] = {}
        timeout: float | None = None
        length: int | None = None
        for name, value in scope["headers"]:  # names are lower case (ASGI)
            if name == b"content-type":
                if value != b"application/json":
                    media = value.decode("latin-1").split(";", 1)[0].strip().lower()
                    if media != "application/json" and not media.endswith("+json"):
                        raise RpcError(Status.INVALID_ARGUMENT, f"Content-Type must be application/json, not {media!r}")
            elif name == b"content-length":
                if not value.isdigit():
                    raise RpcError(Status.INVALID_ARGUMENT, "bad Content-Length")
                length = int(value)
                if length > limit:
                    raise RpcError(Status.RESOURCE_EXHAUSTED, f"request body exceeds the limit of {limit} bytes")
            elif name == _TIMEOUT_NAME:
                if not value.isdigit() or len(value) > 10 or value[0] == 48:  # a positive number, no leading 0
                    raise RpcError(Status.INVALID_ARGUMENT, f"bad {TIMEOUT_HEADER} header: {value.decode('latin-1')!r}")
                timeout = int(value) / 1000
            else:
                metadata[name.decode("latin-1")] = value.decode("latin-1")
        return timeout, metadata, length

    async def _body(self, receive: Receive, length: int | None) -> bytes:
        """The request body. Without a Content-Length (chunked) its bytes are admitted as they arrive."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RpcError(Status.CANCELLED, "client disconnected")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if length is not None and not more:
            return body
        server = self.server
        limit = server.limits.max_message_size
        chunks = [body]
        size = len(body)
        admitted = 0
        try:
            while True:
                if length is None:
                    if size > limit:
                        raise RpcError(Status.RESOURCE_EXHAUSTED, f"request body exceeds the limit of {limit} bytes")
                    if not server.admit(size - admitted):
                        raise RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
                    admitted = size
                elif size > length:  # a lenient server's: the body must not outgrow what was admitted
                    raise RpcError(Status.INVALID_ARGUMENT, f"request body longer than its Content-Length ({length})")
                if not more:
                    return b"".join(chunks)
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RpcError(Status.CANCELLED, "client disconnected")
                chunk = message.get("body", b"")
                chunks.append(chunk)
                size += len(chunk)
                more = message.get("more_body", False)
        except BaseException:
            server.release(admitted)  # the caller releases only a body it got
            raise

    async def _dispatch_asyncio(
        self,
        task: asyncio.Task[Any],
        path: str,
        body: bytes,
        timeout: float | None,
        metadata: dict[str, str],
        peer: str,
        receive: Receive,
    ) -> bytes | None:
        # Raw asyncio, because benchmarks/bench_unary.py says so: an anyio task group running the handler beside a
        # disconnect watcher cost ~130 µs of CPU per call, and even an anyio cancel scope with one watcher task cost
        # twice this whole layer. So the handler runs in this task, eagerly: one that finishes without waiting needs
        # no watcher; once it waits, one plain task waits for the disconnect and cancels this one.
        # A timeout here is enforced by the caller's asyncio.timeout, which covers reading the body too.
        call = self.server.dispatch(
            path, body, timeout=timeout, metadata=metadata, peer=peer, deadline_enforced=timeout is not None
        )
        try:
            waiting_on = call.send(None)
        except StopIteration as done:
            return cast("bytes", done.value)
        watcher = task.get_loop().create_task(_cancel_on_disconnect_asyncio(receive, task))
        try:
            result = await _resume(call, waiting_on)
        except asyncio.CancelledError:
            if _fired(watcher) and task.uncancel() == 0:  # the watcher's cancel(), and no one else's
                return None
            raise
        finally:
            watcher.cancel()  # it is done, or gone at the loop's next turn
        if _fired(watcher):  # the handler ignored the cancellation; the client is gone anyway
            task.uncancel()
            return None
        return result

    async def _dispatch_anyio(
        self, path: str, body: bytes, timeout: float | None, metadata: dict[str, str], peer: str, receive: Receive
    ) -> bytes | None:
        outcome: list[bytes | RpcError] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                outcome.append(await self.server.dispatch(path, body, timeout=timeout, metadata=metadata, peer=peer))
            except RpcError as exc:
                outcome.append(exc)
            tg.cancel_scope.cancel()
        if not outcome:
            return None
        if isinstance(outcome[0], RpcError):
            raise outcome[0]
        return outcome[0]


_TIMEOUT_NAME = TIMEOUT_HEADER.encode()
_CLOSE = ((b"connection", b"close"),)
_T = TypeVar("_T")


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@types.coroutine
def _resume(call: Coroutine[Any, Any, _T], waiting_on: Any) -> Generator[Any, Any, _T]:
    """Await `call`, a coroutine that has already run up to its first wait, on `waiting_on`."""
    try:
        yield waiting_on
    except GeneratorExit:
        call.close()
        raise
    except BaseException as exc:  # a cancellation: the coroutine handles it
        try:
            waiting_on = call.throw(exc)
        except StopIteration as done:
            return cast("_T", done.value)
        return (yield from _resume(call, waiting_on))
    return (yield from call.__await__())


async def _cancel_on_disconnect_asyncio(receive: Receive, task: asyncio.Task[Any]) -> bool:
    """Cancel `task` when the client disconnects; True if it did."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server's receive() failed: stop watching rather than leave an unretrieved error
        return False
    task.cancel()
    return True


def _fired(watcher: asyncio.Task[bool]) -> bool:
    return watcher.done() and not watcher.cancelled() and watcher.result()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class HttpListener:
    """A uvicorn server bound to one socket."""

    def __init__(self, url: str, server: uvicorn.Server) -> None:
        self.url = url
        self.uvicorn = server

    def __repr__(self) -> str:
        return f"<HttpListener {self.url}>"


class HttpTransport:
    """The `http` transport: `http://HOST:PORT`, or `https://HOST:PORT` with `ssl=` (a server or client SSLContext).

    `server_hostname` is the name a client checks the server's certificate against (default: the endpoint's host).

    HTTP/1.1 has no ping, so a client bounds silence two ways: TCP keepalive probes (`keepalive_interval` seconds
    idle, then probes for `keepalive_timeout` seconds; None: off) close connections whose peer host is gone, and a
    call without a deadline fails with UNAVAILABLE once it has waited `read_timeout` seconds for its whole answer.

    `sock=` (server side) serves an already bound socket instead of binding host:port, as the workers of
    `Server.run(workers=N)` share their supervisor's; the listener takes it over and closes it when done.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        max_message_size: int | None = None,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        read_timeout: float = 300.0,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if keepalive_interval is not None and not keepalive_interval > 0:
            raise ValueError("keepalive_interval must be > 0 or None")
        if not keepalive_timeout > 0 or not 0 < read_timeout < math.inf:
            raise ValueError("keepalive_timeout and read_timeout must be > 0 (and finite)")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.keepalive = None if keepalive_interval is None else (keepalive_interval, keepalive_timeout)
        self.read_timeout = read_timeout
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.sock = sock

    async def connect(self, endpoint: Endpoint, /) -> HttpConnection:
        """A connection pool to `endpoint` (connections open lazily, on the first call)."""
        return HttpConnection(endpoint, self)

    def asgi(self, core: ServerCore, /) -> ASGIApp:
        """The ASGI app that serves `core` (`Server.asgi()`): RPC routes, health checks, OpenAPI, /docs, /metrics."""
        return build_app(core)

    @asynccontextmanager
    async def listen(self, core: ServerCore, host: str, port: int, /) -> AsyncIterator[HttpListener]:
        """Serve `core` with uvicorn on host:port until the block exits, then drain."""
        limits = core.limits
        async with serve_uvicorn(
            build_app(core),
            host,
            port,
            ssl=self.ssl,
            sock=self.sock,
            limits=limits,
            timeout_graceful_shutdown=math.ceil(limits.drain_timeout) or 1,
            # Requests in progress at once; beyond it a 503 that says the call did not start: clients retry elsewhere.
            limit_concurrency=limits.max_connections,
            # Bidirectional streams: a WebSocket on the RPC path. One envelope per message; uvicorn reads no
            # further until the app has received each message (the flow control of the client's messages).
            ws=websocket_protocol_class(limits, core.admit, core.release),
            ws_max_size=limits.max_message_size + 5,
            ws_per_message_deflate=False,
        ) as (url, userver):
            yield HttpListener(url, userver)


def _keepalive_socket(keepalive: tuple[float, float], addr_info: tuple[Any, ...]) -> socket.socket:
    """A client socket with TCP keepalive: probed after `interval` idle seconds, closed after `timeout` more."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    set_keepalive(sock, keepalive)
    return sock


class HttpConnection:
    """Calls to one endpoint over a pool of keep-alive HTTP/1.1 connections (aiohttp).

    aiohttp rather than httpx on this path: httpx's pool costs O(pool size) per request and
    falls over at high concurrency (see benchmarks/); aiohttp already ships with kubernetes-asyncio.
    """

    def __init__(self, endpoint: Endpoint, transport: HttpTransport) -> None:
        import aiohttp

        self.endpoint = endpoint
        self.max_message_size = transport.max_message_size
        self._base = f"{'http' if transport.ssl is None else 'https'}://{endpoint.address}/"
        self._options: dict[str, Any] = {}
        if transport.ssl is not None and transport.server_hostname is not None:
            self._options["server_hostname"] = transport.server_hostname
        self._closed = False
        self._ws: Any = None  # the session of WebSocket handshakes (bidirectional streams), once one opened
        self.in_flight = 0
        self._streams: set[_HttpStream] = set()  # open stream calls, ended when the connection closes
        self._idle = IdleSignal()
        # False until the endpoint answers, and again after a connection to it failed: a failure then is the
        # endpoint's (accepted, then reset) and the channel backs off from it. (HTTP's stand-in for TCP's ack.)
        self._answered = False
        self._limit = transport.max_message_size or _DEFAULT_LIMIT
        # Connect failures and connect timeouts: the server never saw the call.
        self._errors = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
        self._read_timeout_error = aiohttp.SocketTimeoutError
        self._transport_errors = (aiohttp.ClientError, OSError)
        # Calls without a deadline wait at most read_timeout for each piece of the response.
        self._read_timeout = transport.read_timeout
        self._options_no_deadline = {
            **self._options,
            "timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=transport.connect_timeout, sock_read=transport.read_timeout
            ),
        }
        self._pool = Http1Pool(
            endpoint.host,
            endpoint.port,
            ssl=transport.ssl,
            server_hostname=transport.server_hostname,
            connect_timeout=transport.connect_timeout,
            keepalive=transport.keepalive,
            max_connections=transport.max_connections,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=transport.max_connections,
                limit_per_host=0,
                force_close=False,
                keepalive_timeout=4.0,  # under uvicorn's 5 s: reuse no connection the server is closing
                ssl=True if transport.ssl is None else transport.ssl,
                socket_factory=None if transport.keepalive is None else partial(_keepalive_socket, transport.keepalive),
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=transport.connect_timeout),
            headers={"content-type": "application/json"},
            # No Accept-Encoding, and no decompression: a 400 KB gzip answer inflated to 400 MiB past the size
            # limit, which counts the bytes on the wire. kubrpc servers do not compress.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )

    def _ws_session(self) -> Any:
        """The session of WebSocket handshakes: this pool's connections, but a redirect is refused, not followed."""
        if self._ws is None:
            import aiohttp

            trace = aiohttp.TraceConfig()
            trace.on_request_redirect.append(_refuse_redirect)
            session = self._session
            self._ws = aiohttp.ClientSession(
                connector=session.connector,
                connector_owner=False,
                timeout=session.timeout,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                auto_decompress=False,
                trace_configs=[trace],
            )
        return self._ws

    async def wait_idle(self) -> None:
        """Return once no call is in flight on this connection."""
        await self._idle.wait(lambda: self.in_flight > 0)

    @property
    def usable(self) -> bool:
        """False once closed."""
        return not self._closed

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """POST one call and return the JSON result; errors become RpcError with the server's status."""
        if len(payload) > self._limit:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        headers = None
        if metadata:
            try:  # the rule every transport applies; here it also keeps CR/LF out of the request head
                check_metadata(metadata)
            except ValueError as exc:
                raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None
            headers = dict(metadata)
        if timeout == math.inf:
            timeout = None
        read_timeout = None
        if timeout is not None:
            if headers is None:
                headers = {}
            headers[TIMEOUT_HEADER] = str(min(max(1, math.ceil(timeout * 1000)), 9_999_999_999))
        else:
            read_timeout = self._read_timeout
        self.in_flight += 1
        try:
            if timeout is None:
                response = await self._pool.request(
                    path, payload, headers, limit=self._limit + 1024, read_timeout=read_timeout
                )
            else:
                async with asyncio.timeout(timeout):
                    response = await self._pool.request(
                        path, payload, headers, limit=self._limit + 1024, read_timeout=None
                    )
            self._answered = True
        except ConnectFailed as exc:
            raise NotDeliveredError(f"cannot connect to {self.endpoint.address}: {exc}", unreachable=True) from None
        except ReadTimeout:  # before TimeoutError: only calls without a deadline have one
            self._answered = False
            raise RpcError(
                Status.UNAVAILABLE, f"no answer from {self.endpoint.address} in {self._read_timeout:g} s (read_timeout)"
            ) from None
        except TimeoutError:
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except TooLarge:
            self._answered = True
            raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size") from None
        except Disconnected as exc:
            message = f"connection to {self.endpoint.address} failed: {exc}"
            if not self._answered:  # it has not answered since connecting (or since the last failure)
                raise UnreachableError(message) from None
            self._answered = False
            raise RpcError(Status.UNAVAILABLE, message) from None
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.notify()
        if response.status == 200:
            return response.body
        raise self._http_error(response.status, response.body, response.not_started)

    async def open_stream(
        self, path: str, payload: bytes, *, kind: CallKind, timeout: float | None, metadata: Mapping[str, str]
    ) -> ClientStream:
        """Open a stream call: a Connect streaming POST, or a WebSocket for a bidirectional stream."""
        return await _open_stream(self, path, payload, kind, timeout, metadata)

    def _http_error(self, status: int, content: bytes, not_started: bool) -> RpcError:
        """The error of an answer that is not 200."""
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = None
        if type(body) is not dict or type(body.get("code")) is not str:  # not a kubrpc error body
            if not_started:
                return NotDeliveredError(f"{self.endpoint.address} did not start the call (HTTP 503)")
            # Not from kubrpc: a proxy or sidecar, which may answer 503 after forwarding the call.
            text = content[:200].decode("utf-8", "replace")
            return RpcError(
                Status.from_http_status(status), f"HTTP {status} from {self.endpoint.address} (not kubrpc): {text!r}"
            )
        error = RpcError.from_json(body, fallback=Status.from_http_status(status))
        if not_started:  # a kubrpc server's word that the call never started
            return NotDeliveredError(f"{self.endpoint.address} did not start the call: {error.message}")
        return error

    async def _read(self, response: Any) -> bytes:
        """The response body, refused past the size limit without reading it all."""
        limit = self._limit + 1024  # an error body about an oversized answer is a little larger
        length = response.content_length
        if length is not None and length <= limit:
            return cast(bytes, await response.read())
        if length is not None:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Close every pooled connection; streams still open end with UNAVAILABLE."""
        self._closed = True
        for stream in list(self._streams):
            stream._end(RpcError(Status.UNAVAILABLE, f"the connection to {self.endpoint.address} was closed"))
        await self._pool.aclose()
        await self._session.close()
        if self._ws is not None:
            await self._ws.close()

    def __repr__(self) -> str:
        return f"<HttpConnection {self.endpoint.address}>"


# -- Streams (the client's side) -----------------------------------------------------------------------------


class _HttpStream:
    """The client's end of a stream call: POST with enveloped messages (server and client streams), or a
    WebSocket (bidirectional streams). The deadline is a timer that ends the stream; cancel() closes its
    connection at once."""

    def __init__(self, connection: HttpConnection, kind: CallKind, timeout: float | None) -> None:
        self.connection = connection
        self.kind = kind
        self.limit = connection._limit
        self.response: Any = None  # aiohttp's ClientResponse (POST)
        self.ws: Any = None  # aiohttp's ClientWebSocketResponse (bidirectional)
        self.error: RpcError | None = None  # how the call ended, once it has ended with an error
        self.ended = False
        self.body_done = kind is CallKind.SERVER_STREAM  # the request body is complete
        self._decoder = Decoder(self.limit + 1024)
        self._pending: bytes | None = None  # a message the body generator has not taken yet
        self._closing = False  # close_send() was called
        self._sent: asyncio.Future[bool] | None = None  # send()'s wait for the body generator to write
        self._ready: asyncio.Future[None] | None = None  # the body generator's wait for a message
        loop = asyncio.get_running_loop()
        self._timer = None if timeout is None else loop.call_later(timeout, self._expire)
        connection.in_flight += 1
        connection._streams.add(self)

    async def body(self, first: bytes) -> AsyncIterator[bytes]:
        """The request body of a client stream: the arguments, then each message send() gives."""
        yield first
        while True:
            while self._pending is None and not self._closing and not self.ended:
                self._ready = asyncio.get_running_loop().create_future()
                try:
                    await self._ready
                finally:
                    self._ready = None
            data = self._pending
            if data is None:
                self.body_done = True
                return
            self._pending = None
            yield data  # aiohttp writes it, waiting while the socket's buffer is full (flow control)
            if self._sent is not None and not self._sent.done():
                self._sent.set_result(True)

    async def send(self, message: bytes, /) -> bool:
        """Send one message; False once the call has ended."""
        if self.ended:
            if self.error is not None and self.error.code is Status.DEADLINE_EXCEEDED:
                raise self.error
            return False
        if len(message) > self.limit:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request message exceeds the maximum message size")
        data = envelope(message)
        if self.ws is not None:
            try:
                await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError, *self.connection._transport_errors):
                return False
            return not self.ended
        self._pending = data
        self._sent = sent = asyncio.get_running_loop().create_future()
        _wake(self._ready)
        return cast(bool, await sent)

    async def close_send(self) -> None:
        """No more messages from the client."""
        if self.ended or self._closing:
            return
        self._closing = True
        if self.ws is not None:
            with contextlib.suppress(ConnectionError, RuntimeError, *self.connection._transport_errors):
                await self.ws.send_bytes(envelope(b"{}", END_STREAM))
            return
        _wake(self._ready)

    async def receive(self) -> bytes | None:
        """The next message of the server; None at the end of the stream, or the call's error."""
        if self.ended:
            if self.error is not None:
                raise self.error
            return None
        try:
            if self.ws is not None:
                flags, data = await self._ws_envelope()
            else:
                content = self.response.content
                head = await content.readexactly(5)
                flags, size = head[0], int.from_bytes(head[1:], "big")
                if flags & ~END_STREAM:
                    raise RpcError(Status.INTERNAL, f"malformed response stream: envelope flags 0x{flags:02x}")
                if size > self.limit + 1024:  # (an end-of-stream error about an oversized message is a little larger)
                    raise RpcError(Status.RESOURCE_EXHAUSTED, "response message exceeds the maximum message size")
                data = await content.readexactly(size)
        except RpcError as exc:
            self._end(exc)
            raise
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError, *self.connection._transport_errors) as exc:
            # (aiohttp: RuntimeError "Connection closed." once the response was closed)
            failure = self.error or RpcError(
                Status.UNAVAILABLE, f"stream from {self.connection.endpoint.address} broke off: {exc!r}"
            )
            self._end(failure)
            raise failure from None
        if not flags & END_STREAM:
            return data
        try:
            trailer = orjson.loads(data)
        except orjson.JSONDecodeError:
            trailer = None
        if type(trailer) is not dict:
            error: RpcError | None = RpcError(Status.INTERNAL, "malformed end-of-stream message")
        else:
            error = RpcError.from_json(trailer["error"]) if trailer.get("error") is not None else None
        self._end(error, clean=True)
        if error is not None:
            raise error
        return None

    async def _ws_envelope(self) -> tuple[int, bytes]:
        import aiohttp

        msg = await self.ws.receive()
        if msg.type is not aiohttp.WSMsgType.BINARY:
            if self.error is not None:
                raise self.error
            if msg.type is aiohttp.WSMsgType.TEXT:
                raise RpcError(Status.INTERNAL, "malformed response stream: a text WebSocket message")
            if msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1013:  # "try again later": the server is busy
                raise RpcError(Status.RESOURCE_EXHAUSTED, f"{self.connection.endpoint.address}: {msg.extra}")
            if getattr(msg.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response message exceeds the maximum message size")
            raise RpcError(Status.UNAVAILABLE, f"stream from {self.connection.endpoint.address} closed ({msg.type})")
        try:
            got = self._decoder.feed(msg.data)
        except EnvelopeError as exc:
            if "exceeds" in str(exc):
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response message exceeds the maximum message size") from None
            raise RpcError(Status.INTERNAL, f"malformed response stream: {exc}") from None
        if len(got) != 1 or self._decoder.pending:
            raise RpcError(Status.INTERNAL, "malformed response stream: a WebSocket message must hold one envelope")
        return got[0]

    def cancel(self) -> None:
        """Cancel the call unless it has ended (closes its connection; never blocks)."""
        if not self.ended:
            self._end(RpcError(Status.CANCELLED, "cancelled by the client"))

    def _expire(self) -> None:
        self._timer = None
        if not self.ended:
            self._end(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _end(self, error: RpcError | None, *, clean: bool = False) -> None:
        """The call has ended: free its connection (back to the pool only if it ended cleanly)."""
        if self.ended:
            return
        self.ended = True
        self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sent is not None and not self._sent.done():
            self._sent.set_result(False)
        _wake(self._ready)
        if self.ws is not None:
            # aiohttp has no synchronous close of a WebSocket: close its connection (the server, which has sent
            # its end-stream or is cut off, needs no close handshake from a client that is done)
            self.ws._response.close()
        elif self.response is not None:
            if clean and self.body_done:
                self.response.release()
            else:
                self.response.close()
        conn = self.connection
        conn._streams.discard(self)
        conn.in_flight -= 1
        if not conn.in_flight:
            conn._idle.notify()


class _Redirected(Exception):
    """A WebSocket handshake was answered with a redirect (raised by a trace hook: aiohttp's ws_connect has no
    allow_redirects)."""

    def __init__(self, status: int, location: str | None) -> None:
        super().__init__(status, location)
        self.status, self.location = status, location


async def _refuse_redirect(session: Any, context: Any, params: Any) -> None:
    raise _Redirected(params.response.status, params.response.headers.get("location"))


def _redirect(conn: HttpConnection, status: int, location: str | None) -> RpcError:
    """The error of a redirect, which a client does not follow: the call might run twice, or its metadata go
    elsewhere; a kubrpc server never redirects (a proxy or an ingress in front of it did)."""
    return RpcError(
        Status.from_http_status(status),
        f"HTTP {status} from {conn.endpoint.address}: a redirect to {location!r}, not followed "
        "(point the client at the server's address, not at a proxy that redirects)",
    )


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


async def _open_stream(
    conn: HttpConnection, path: str, payload: bytes, kind: CallKind, timeout: float | None, metadata: Mapping[str, str]
) -> _HttpStream:
    import aiohttp

    if len(payload) > conn._limit:
        raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
    headers = dict(metadata) if metadata else {}
    if metadata and not all(type(k) is str and type(v) is str for k, v in headers.items()):
        raise RpcError(Status.INVALID_ARGUMENT, "metadata keys and values must be strings")
    if timeout == math.inf:
        timeout = None
    headers["content-type"] = _connect.STREAM_MEDIA
    headers["kubrpc-codec"] = "native"
    if timeout is not None:
        headers[TIMEOUT_HEADER] = str(min(max(1, math.ceil(timeout * 1000)), 9_999_999_999))
    stream = _HttpStream(conn, kind, timeout)
    first = envelope(payload)
    try:
        try:
            # Opening waits for the answer's head: within the deadline, or read_timeout without one. Then a
            # stream may be quiet for as long as it likes (TCP keepalive notices a peer host that is gone).
            async with asyncio.timeout(conn._read_timeout if timeout is None else timeout):
                if kind is CallKind.BIDI_STREAM:
                    base = conn._base.replace("http", "ws", 1)
                    stream.ws = await conn._ws_session().ws_connect(
                        base + path,
                        headers=headers,
                        max_msg_size=conn._limit + 1024,
                        timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                        autoclose=False,
                        **conn._options,
                    )
                    conn._answered = True
                    await stream.ws.send_bytes(first)
                    return stream
                body: Any = first if kind is CallKind.SERVER_STREAM else stream.body(first)
                response = await conn._session.post(
                    conn._base + path, data=body, headers=headers, allow_redirects=False, **conn._options
                )
                conn._answered = True
                if response.status == 200:
                    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    if media != _connect.STREAM_MEDIA:  # a proxy's page, or not a kubrpc server
                        response.close()
                        raise RpcError(
                            Status.INTERNAL,
                            f"HTTP 200 from {conn.endpoint.address} is not a stream: Content-Type {media!r}, "
                            f"not {_connect.STREAM_MEDIA} (a proxy answered, or the server is no kubrpc server)",
                        )
                    stream.response = response
                    return stream
                try:
                    if 300 <= response.status < 400:
                        raise _redirect(conn, response.status, response.headers.get("location"))
                    not_started = response.status == 503 and response.headers.get(NOT_STARTED_HEADER) == "1"
                    content = await conn._read(response)
                finally:
                    response.close()
                raise conn._http_error(response.status, content, not_started)
        except _Redirected as redirected:
            raise _redirect(conn, redirected.status, redirected.location) from None
        except aiohttp.WSServerHandshakeError as exc:
            answer: Mapping[str, str] = exc.headers or {}
            if exc.status == 503 and answer.get(NOT_STARTED_HEADER) == "1":
                raise NotDeliveredError(f"{conn.endpoint.address} did not start the call (HTTP 503)") from None
            if 300 <= exc.status < 400:
                raise _redirect(conn, exc.status, answer.get("location")) from None
            raise RpcError(Status.from_http_status(exc.status), f"WebSocket refused: HTTP {exc.status}") from None
        except conn._errors as exc:
            raise NotDeliveredError(f"cannot connect to {conn.endpoint.address}: {exc}", unreachable=True) from None
        except TimeoutError:
            if timeout is None:  # the answer's head, awaited for read_timeout (as a unary call's answer is)
                conn._answered = False
                raise RpcError(
                    Status.UNAVAILABLE,
                    f"no answer from {conn.endpoint.address} in {conn._read_timeout:g} s (read_timeout)",
                ) from None
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except conn._transport_errors as exc:
            message = f"connection to {conn.endpoint.address} failed: {exc!r}"
            if not conn._answered:
                raise UnreachableError(message) from None
            conn._answered = False
            raise RpcError(Status.UNAVAILABLE, message) from None
    except BaseException:
        stream._end(RpcError(Status.CANCELLED, "not opened"))
        raise
