"""inproc: calls to a Server in the same process and event loop, with no sockets.

`server.serve("inproc://NAME")` makes a server reachable as `kubrpc.connect("inproc://NAME")`. A call goes
through everything a wire call goes through except the bytes on a socket: the arguments are encoded to JSON and
decoded and validated by the server, the result likewise; server and client interceptors run; metadata keys
reach the server in lower case; the deadline cancels the handler and fails the call with DEADLINE_EXCEEDED; a
cancelled call cancels its handler; errors reach the client as code and message only (a fresh RpcError, with no
server-side cause attached, and INTERNAL without the exception's text); the server's admission limits
(`max_message_size`, `max_concurrent_calls` per connection, `max_connections`, `max_pending_bytes`) apply; and
leaving the serve block drains: new calls fail as not delivered, running ones may finish within `drain_timeout`.

Each handler runs in its own task, in a copy of the context that `serve()` ran in, as it would on a server
across the network: it does not see the caller's context variables, nor change them.

NAME is made of letters, digits and `. _ ~ -`, and is case-sensitive; `inproc://a,b` balances over two
in-process servers. One server per NAME at a time: a second `serve()` of a live NAME fails with
EADDRINUSE, and the NAME is free again once the first serve block has exited.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import anyio

from kubrpc._idle import IdleSignal
from kubrpc._limits import DEFAULT_MAX_MESSAGE_SIZE
from kubrpc.endpoint import Endpoint
from kubrpc.errors import NotDeliveredError, RpcError
from kubrpc.resolvers.static import StaticResolver
from kubrpc.status import Status

from ._deadlines import Deadlines
from ._frames import encode_metadata
from ._streams import Inbox

if TYPE_CHECKING:
    from kubrpc.interface import CallKind
    from kubrpc.interfaces import ServerCore

__all__ = (
    "INPROC_PORT",
    "STREAM_WINDOW",
    "InprocConnection",
    "InprocListener",
    "InprocStream",
    "InprocTransport",
    "parse_name",
    "resolver",
)

#: The port of every inproc endpoint (`Endpoint(NAME, INPROC_PORT)`); it means nothing, an Endpoint needs one.
INPROC_PORT = 1

#: Bytes a stream's writer may send ahead of its reader, each way (a message larger than it still goes alone).
STREAM_WINDOW = 64 * 1024

log = logging.getLogger("kubrpc.inproc")

_NAME = re.compile(r"[A-Za-z0-9._~-]+")

# The live listeners by name: a listener is here from the start of its serve block until it starts draining,
# and then in _draining until it has stopped (the name is free for a new server meanwhile).
_listeners: dict[str, InprocListener] = {}
_draining: dict[str, InprocListener] = {}


def parse_name(url: str) -> str:
    """NAME from `inproc://NAME`; ValueError saying what a good URL looks like otherwise."""
    scheme, sep, name = url.partition("://")
    if scheme != "inproc" or not sep or not _NAME.fullmatch(name):
        raise ValueError(f"bad inproc URL {url!r}: expected inproc://NAME, NAME made of letters, digits and . _ ~ -")
    return name


def resolver(target: str) -> StaticResolver:
    """The resolver of `inproc://NAME[,NAME...]`: one endpoint per name (the `inproc` resolver scheme)."""
    scheme, _, names = target.partition("://")
    return StaticResolver(Endpoint(parse_name(f"{scheme}://{name}"), INPROC_PORT) for name in names.split(","))


class InprocTransport:
    """The `inproc` transport: `inproc://NAME`, a Server in this process, reached without sockets.

    `max_message_size` (bytes) caps requests and responses as the tcp transport's option does: on the
    server side it replaces the Server's own limit, on the client side it defaults to 4 MiB.
    """

    def __init__(self, *, max_message_size: int | None = None) -> None:
        if max_message_size is not None and max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.max_message_size = max_message_size

    async def connect(self, endpoint: Endpoint, /) -> InprocConnection:
        """A connection to the server serving `inproc://{endpoint.host}`; NotDeliveredError if there is none."""
        name = endpoint.host
        listener = _listeners.get(name)
        if listener is None:
            if name in _draining:
                raise NotDeliveredError(f"inproc://{name} is shutting down", unreachable=False)
            raise NotDeliveredError(f"no server is serving inproc://{name} in this process", unreachable=False)
        if listener.loop is not asyncio.get_running_loop():
            raise NotDeliveredError(
                f"inproc://{name} is served on another event loop; call it from that one", unreachable=False
            )
        if len(listener.connections) >= listener.server.limits.max_connections:
            log.warning("refusing an inproc connection to %s: over max_connections", listener.url)
            raise NotDeliveredError(f"{listener.url} refused the connection: too many connections", unreachable=False)
        conn = InprocConnection(listener, self.max_message_size or DEFAULT_MAX_MESSAGE_SIZE)
        listener.connections.add(conn)
        return conn

    @asynccontextmanager
    async def listen(self, server: ServerCore, host: str, port: int = 0, /) -> AsyncIterator[InprocListener]:
        """Serve `server` as `inproc://{host}` until the block exits, then drain (`port` is ignored)."""
        name = parse_name(f"inproc://{host}")
        other = _listeners.get(name)
        if other is not None:
            raise OSError(
                errno.EADDRINUSE,
                f"inproc://{name} is already served by {other.server!r} in this process;"
                " leave its serve() block first, or pick another name",
            )
        listener = InprocListener(server, name, self.max_message_size or server.limits.max_message_size)
        _listeners[name] = listener
        try:
            yield listener
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose(server.limits.drain_timeout)


class InprocListener:
    """A server reachable as `inproc://NAME`, its connections and its running calls."""

    def __init__(self, server: ServerCore, name: str, max_message_size: int) -> None:
        self.server = server
        self.name = name
        self.url = f"inproc://{name}"
        self.max_message_size = max_message_size
        self.connections: set[InprocConnection] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self.closing = False  # this listener is draining its connections (the server's state is core.draining)
        self.loop = asyncio.get_running_loop()
        self.context = contextvars.copy_context()  # handlers run in copies of it, as on a server elsewhere
        self._changed: asyncio.Event | None = None

    @property
    def active_calls(self) -> int:
        """Calls running now, over all connections."""
        return len(self.calls)

    async def aclose(self, drain_timeout: float) -> None:
        """Free the name, refuse new calls, let running ones finish (at most `drain_timeout` s), cancel the rest."""
        self.closing = True
        if _listeners.get(self.name) is self:
            del _listeners[self.name]
        _draining[self.name] = self
        try:
            with anyio.move_on_after(drain_timeout):
                while self.calls:
                    self._changed = asyncio.Event()
                    await self._changed.wait()
            tasks = list(self.calls)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        finally:
            if _draining.get(self.name) is self:
                del _draining[self.name]
            self.connections.clear()

    def call_finished(self, task: asyncio.Task[None]) -> None:
        """A call's task has ended: forget it, and wake aclose()."""
        self.calls.discard(task)
        if self._changed is not None:
            self._changed.set()

    def __repr__(self) -> str:
        return f"<InprocListener {self.url} [{len(self.connections)} connections, {len(self.calls)} calls]>"


class InprocConnection:
    """A client's connection to an in-process server: each call runs as a task of the server's.

    The caller waits on a future of its own, so that neither side can hold the other: a cancelled caller
    returns at once (its handler is cancelled), and a deadline fails the call on time even if the handler
    is slow to stop.
    """

    def __init__(self, listener: InprocListener, max_message_size: int) -> None:
        self.listener = listener
        self.max_message_size = max_message_size
        self._dispatch = listener.server.dispatch
        self._loop = listener.loop
        self._calls: dict[int, tuple[asyncio.Task[None], asyncio.Future[bytes]]] = {}
        self._streams: dict[int, InprocStream] = {}
        self._next = 1
        self._waiting = 0  # callers waiting for an answer (a handler may run on a little after its caller left)
        self._idle = IdleSignal()
        self._deadlines = Deadlines(self._loop, self._deadline_passed)
        self._closed = False

    @property
    def usable(self) -> bool:
        """False once closed, or once the server has started draining: new calls must go elsewhere."""
        return not self._closed and not self.listener.closing

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return self._waiting

    async def wait_idle(self) -> None:
        """Return once no call is in flight on this connection."""
        await self._idle.wait(lambda: self._waiting > 0)

    def _admit(self, payload: bytes, metadata: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
        """The checks and admission of a new call (as on the wire), and what the server gets of it."""
        listener = self.listener
        if self._closed or listener.closing:
            raise NotDeliveredError(f"{listener.url} is shutting down" if not self._closed else "connection closed")
        if len(payload) > self.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        if metadata:
            encode_metadata(metadata)  # the checks a wire call makes (strings only, size), so both fail alike
            metadata = {k.lower(): v for k, v in metadata.items()}
        else:
            metadata = {}
        if type(payload) is not bytes:  # the server gets its own copy, as from a socket
            payload = bytes(payload)
        server = listener.server
        if len(payload) > listener.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        if len(self._calls) >= server.limits.max_concurrent_calls:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "too many concurrent calls on this connection")
        if not server.admit(len(payload)):
            raise RpcError(Status.RESOURCE_EXHAUSTED, "server busy")
        return payload, dict(metadata)

    async def call(self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str]) -> bytes:
        """Run one call on the server and return its encoded result; cancelling the wait cancels the handler."""
        listener = self.listener
        payload, metadata = self._admit(payload, metadata)
        if timeout == math.inf:
            timeout = None
        stream = self._next
        self._next = stream + 1
        answer: asyncio.Future[bytes] = self._loop.create_future()
        task = self._loop.create_task(
            self._run(path, payload, timeout, metadata, answer), context=listener.context.copy()
        )
        self._calls[stream] = (task, answer)
        listener.calls.add(task)
        task.add_done_callback(partial(self._call_done, stream, len(payload), answer))
        if timeout is not None:
            self._deadlines.add(stream, timeout)
        self._waiting += 1
        try:
            return await answer
        except asyncio.CancelledError:
            task.cancel()  # the caller gave up: so does the handler, as a CANCEL frame would make it
            raise
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._idle.notify()

    async def _run(
        self,
        path: str,
        payload: bytes,
        timeout: float | None,
        metadata: Mapping[str, str],
        answer: asyncio.Future[bytes],
    ) -> None:
        try:
            result = await self._dispatch(path, payload, timeout=timeout, metadata=metadata, deadline_enforced=True)
            if len(result) > self.listener.max_message_size or len(result) > self.max_message_size:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "response exceeds the maximum message size")
        except RpcError as exc:
            if not answer.done():  # code and message only, as the wire carries them: no server-side cause
                answer.set_exception(RpcError.from_json(exc.to_json()))
            return
        except Exception:
            log.exception("inproc call of %s failed", path)
            if not answer.done():
                answer.set_exception(RpcError(Status.INTERNAL, "internal error"))
            return
        except asyncio.CancelledError:
            raise  # _call_done answers the caller, if it is still waiting
        except BaseException:  # KeyboardInterrupt, SystemExit (dispatch makes any other one INTERNAL): stop
            if not answer.done():
                answer.set_exception(RpcError(Status.INTERNAL, "internal error"))
            raise
        if not answer.done():
            answer.set_result(result)

    async def open_stream(
        self, path: str, payload: bytes, *, kind: CallKind, timeout: float | None, metadata: Mapping[str, str]
    ) -> InprocStream:
        """Start a stream call on the server (kubrpc.interfaces.StreamingConnection)."""
        listener = self.listener
        payload, metadata = self._admit(payload, metadata)
        if timeout == math.inf:
            timeout = None
        stream = InprocStream(self, kind)
        key = self._next
        self._next = key + 1
        answer: asyncio.Future[bytes] = self._loop.create_future()  # only for the bookkeeping of _call_done
        answer.set_result(b"")
        task = self._loop.create_task(
            self._run_stream(path, payload, timeout, metadata, stream), context=listener.context.copy()
        )
        stream.task = task
        self._calls[key] = (task, answer)
        self._streams[key] = stream
        listener.calls.add(task)
        task.add_done_callback(partial(self._call_done, key, len(payload), answer))
        if timeout is not None:
            self._deadlines.add(key, timeout)
        self._waiting += 1
        return stream

    async def _run_stream(
        self, path: str, payload: bytes, timeout: float | None, metadata: Mapping[str, str], stream: InprocStream
    ) -> None:
        requests = stream.requests
        try:
            result = await self.listener.server.dispatch_stream(
                path,
                payload,
                messages=requests,
                send=stream.server_send,
                timeout=timeout,
                metadata=metadata,
                deadline_enforced=True,
            )
            if result is not None:
                stream.server_send_now(result)
            stream.results.end()
        except RpcError as exc:  # code and message only, as the wire carries them
            stream.results.end(RpcError.from_json(exc.to_json()))
        except Exception:
            log.exception("inproc stream %s failed", path)
            stream.results.end(RpcError(Status.INTERNAL, "internal error"))
        except asyncio.CancelledError:
            raise  # _call_done ends the stream, if the client is still reading
        except BaseException:
            stream.results.end(RpcError(Status.INTERNAL, "internal error"))
            raise
        finally:
            requests.abort(RpcError(Status.CANCELLED, "the call has ended"))

    def _call_done(self, stream: int, size: int, answer: asyncio.Future[bytes], task: asyncio.Task[None]) -> None:
        inproc_stream = self._streams.pop(stream, None)
        if inproc_stream is not None:
            reason = "connection closed" if self._closed else f"{self.listener.url} stopped"
            inproc_stream.results.end(RpcError(Status.UNAVAILABLE, f"{reason} before the call finished"))
            inproc_stream.requests.abort(RpcError(Status.CANCELLED, "the call has ended"))
            inproc_stream.finished()
        del self._calls[stream]
        self._deadlines.discard(stream)
        self.listener.server.release(size)
        self.listener.call_finished(task)
        if not answer.done():  # cancelled without an answer: the connection closed, or the server stopped
            reason = "connection closed" if self._closed else f"{self.listener.url} stopped"
            answer.set_exception(RpcError(Status.UNAVAILABLE, f"{reason} before the call finished"))

    def _deadline_passed(self, stream: int) -> None:
        inproc_stream = self._streams.get(stream)
        if inproc_stream is not None:
            inproc_stream.results.abort(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))
        entry = self._calls.get(stream)
        if entry is not None:
            task, answer = entry
            if not answer.done():
                answer.set_exception(RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded"))
            task.cancel()

    async def aclose(self) -> None:
        """Close the connection: calls still running are cancelled and fail with UNAVAILABLE."""
        self._closed = True
        self._deadlines.close()
        self.listener.connections.discard(self)
        for task, _ in list(self._calls.values()):
            task.cancel()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "going away" if self.listener.closing else "open"
        return f"<InprocConnection {self.listener.url} [{state}, {len(self._calls)} in flight]>"


class InprocStream:
    """A stream call in this process: two inboxes, each writer waiting while STREAM_WINDOW bytes are unread."""

    def __init__(self, connection: InprocConnection, kind: CallKind) -> None:
        self.connection = connection
        self.kind = kind
        self.requests = Inbox()
        """The client's messages, read by the handler."""
        self.results = Inbox()
        """The server's messages and how the call ended, read by the client."""
        self.task: asyncio.Task[None] | None = None
        self._counted = True  # in the connection's in-flight count until finished()

    async def server_send(self, data: bytes) -> None:
        """The handler yielded `data`: wait for the client to have read enough, then pass it on."""
        self._check_size(data, "response")
        await self.results.room(STREAM_WINDOW)
        self.results.put(data)

    def server_send_now(self, data: bytes) -> None:
        """The one result of a client stream."""
        self._check_size(data, "response")
        self.results.put(data)

    def _check_size(self, data: bytes, what: str) -> None:
        conn = self.connection
        if len(data) > conn.listener.max_message_size or len(data) > conn.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, f"{what} exceeds the maximum message size")

    async def send(self, message: bytes, /) -> bool:
        """Send one message to the handler, once it has read enough of the earlier ones; False once it ended."""
        if len(message) > self.connection.max_message_size or len(message) > self.connection.listener.max_message_size:
            raise RpcError(Status.RESOURCE_EXHAUSTED, "request exceeds the maximum message size")
        await self.requests.room(STREAM_WINDOW)
        if self.results.ended or self.requests.ended:
            return False
        self.requests.put(message if type(message) is bytes else bytes(message))
        return True

    async def close_send(self) -> None:
        """No more messages: the handler's iterator ends."""
        self.requests.end()

    async def receive(self) -> bytes | None:
        """The handler's next message, None at the end, or the call's error."""
        return await self.results.get()

    def cancel(self) -> None:
        """Cancel the handler unless the call has ended."""
        if not self.results.ended:
            self.results.abort(RpcError(Status.CANCELLED, "cancelled by the client"))
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.finished()

    def finished(self) -> None:
        """The call no longer counts as in flight on its connection."""
        if self._counted:
            self._counted = False
            conn = self.connection
            conn._waiting -= 1
            if not conn._waiting:
                conn._idle.notify()
