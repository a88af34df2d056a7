"""The connection pool of a Channel: one connection per endpoint, connect backoff, retirement.

Modelled on httpcore's AsyncConnectionPool: the channel asks for a connection to the endpoint its balancer
picked and knows nothing of how connections are opened, shared, backed off or closed.
"""

from __future__ import annotations

import asyncio
import time

import anyio
from anyio.abc import TaskGroup

from ._backoff import Backoff
from .endpoint import Endpoint
from .errors import NotDeliveredError, RpcError
from .interfaces import Connection, Transport
from .status import Status

__all__ = ("RETIRE_GRACE", "ConnectionPool")

#: How long a connection that no new calls go to may keep answering the calls already on it.
RETIRE_GRACE = 30.0

Address = tuple[str, int]


class ConnectionPool:
    """Connections to endpoints, one per endpoint, shared by every call of a channel.

    - `get(endpoint, timeout)` gives a usable connection, opening it if needed (one connect at a time per
      endpoint; calls that waited for a connect that failed share its outcome).
    - An endpoint that cannot be reached is backed off, the same on every transport (gRPC's connect backoff:
      50 ms doubling to 5 s, jittered): calls picked to it meanwhile fail fast as not delivered, and once the
      backoff runs out one call tries it again while the others wait for its outcome (`admit`).
    - `keep(addresses)` retires the connections to endpoints the resolver no longer lists; a connection that
      is no longer `usable` (closed, or its server sent go-away) is retired when next asked for. A retired
      connection takes no new calls and is closed once its calls are answered (`Connection.wait_idle()`), or
      after `RETIRE_GRACE` seconds.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.connections: dict[Address, Connection] = {}
        """The open connections by (host, port); the channel reads it on its hot path."""
        self.down: dict[Address, tuple[float, Backoff, str]] = {}
        """Endpoints in their connect backoff: (retry at, backoff, why), by (host, port)."""
        self._probing: dict[Address, anyio.Event] = {}  # backoff over: one call is trying it again
        self._connecting: dict[Address, anyio.Lock] = {}
        self._retired: set[Connection] = set()
        self._task_group: TaskGroup | None = None
        self._closed = False

    def start(self, task_group: TaskGroup) -> None:
        """Run the closing of retired connections in `task_group` (the channel's)."""
        self._task_group = task_group

    async def get(self, endpoint: Endpoint, timeout: float | None) -> Connection:
        """The pooled connection to `endpoint`, opened if needed, within `timeout` seconds.

        NotDeliveredError if it cannot be reached (then `unreachable` is True unless the transport said it
        has nothing to back off from); DEADLINE_EXCEEDED if `timeout` passes while connecting.
        """
        key = (endpoint.host, endpoint.port)
        conn = self.connections.get(key)
        if conn is not None and conn.usable:
            return conn
        lock = self._connecting.setdefault(key, anyio.Lock())
        try:
            async with asyncio.timeout(timeout), lock:
                if self.down:  # a call it waited for failed to connect: share that outcome rather than try again
                    self.check_down(endpoint)
                conn = self.connections.get(key)
                if conn is not None and conn.usable:
                    return conn
                if conn is not None:
                    del self.connections[key]
                    self.retire(conn)
                try:
                    conn = await self.transport.connect(endpoint)
                except NotDeliveredError as exc:
                    if exc.unreachable is None:  # unless the transport says (inproc: a name lookup, no backoff)
                        exc.unreachable = True  # the caller marks the endpoint down
                    raise
                self.answered(endpoint)
                if (probe := self._probing.get(key)) is not None:  # connected: the calls waiting on it may go
                    self.end_probe(key, probe)
                if self._closed:
                    await conn.aclose()
                    raise RpcError(Status.CANCELLED, "channel closed")
                self.connections[key] = conn
                return conn
        except TimeoutError:
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded while connecting") from None

    def is_down(self, endpoint: Endpoint) -> bool:
        """In its connect backoff, or being tried again by one call: pick another endpoint if there is one."""
        key = (endpoint.host, endpoint.port)
        down = self.down.get(key)
        return down is not None and (down[0] > time.monotonic() or key in self._probing)

    def check_down(self, endpoint: Endpoint) -> None:
        """NotDeliveredError if `endpoint` is in its connect backoff: no connection is attempted until it ends."""
        down = self.down.get((endpoint.host, endpoint.port))
        if down is not None and (wait := down[0] - time.monotonic()) > 0:
            raise NotDeliveredError(f"{endpoint.address} is unreachable, next attempt in {wait:.2f} s: {down[2]}")

    def answered(self, endpoint: Endpoint) -> None:
        """`endpoint` is reachable (a connection opened, or it answered a call): its connect backoff starts over."""
        self.down.pop((endpoint.host, endpoint.port), None)

    def mark_down(self, key: Address, reason: str) -> None:
        """An endpoint could not be reached: avoid it for a jittered, growing while; calls picked to it
        meanwhile fail fast as not delivered (and go elsewhere)."""
        down = self.down.get(key)
        now = time.monotonic()
        if down is not None and down[0] > now:  # already backing off: concurrent failures count once
            return
        backoff = down[1] if down is not None else Backoff(initial=0.05, maximum=5.0, multiplier=2.0)
        self.down[key] = (now + backoff.next_delay(), backoff, reason)

    async def admit(self, endpoint: Endpoint, remaining: float | None) -> anyio.Event | None:
        """Let a call go to a backed-off `endpoint` (None), or make it the one call that tries it again after its
        backoff (the Event to pass to end_probe() when it is over): meanwhile, other calls to it wait for that
        outcome within their deadline, rather than all connecting at once. NotDeliveredError while the backoff
        runs."""
        key = (endpoint.host, endpoint.port)
        deadline = None if remaining is None else time.monotonic() + remaining
        while key in self.down:
            self.check_down(endpoint)
            probing = self._probing.get(key)
            if probing is None:
                probing = self._probing[key] = anyio.Event()
                return probing
            if deadline is None:
                await probing.wait()
            else:
                with anyio.move_on_after(deadline - time.monotonic()):
                    await probing.wait()
                if not probing.is_set():
                    raise RpcError(Status.DEADLINE_EXCEEDED, f"deadline exceeded waiting for {endpoint.address}")
        return None

    def end_probe(self, key: Address, probe: anyio.Event) -> None:
        """The call that tried an endpoint again after its backoff is over (or has connected): wake the others."""
        if self._probing.get(key) is probe:
            del self._probing[key]
        probe.set()

    def keep(self, addresses: set[Address]) -> None:
        """The resolver lists only these endpoints now: forget the others, retiring their connections."""
        for key in [k for k in self._connecting if k not in addresses and not self._connecting[k].locked()]:
            del self._connecting[key]
        for key in [k for k in self.down if k not in addresses]:
            del self.down[key]
        for key in [k for k in self.connections if k not in addresses]:
            self.retire(self.connections.pop(key))

    def retire(self, conn: Connection) -> None:
        """Send no new calls on `conn`; close it once the calls on it are answered (a draining server
        promised to answer them), or after RETIRE_GRACE seconds."""
        self._retired.add(conn)
        if self._task_group is not None:
            self._task_group.start_soon(self._close_when_idle, conn)

    async def _close_when_idle(self, conn: Connection) -> None:
        try:
            with anyio.move_on_after(RETIRE_GRACE):
                await conn.wait_idle()
        finally:
            self._retired.discard(conn)
            with anyio.CancelScope(shield=True):
                await conn.aclose()

    async def aclose(self) -> None:
        """Close every connection, retired ones too; get() opens none after this."""
        self._closed = True
        connections = [*self.connections.values(), *self._retired]
        self.connections.clear()
        self._retired = set()
        for conn in connections:
            await conn.aclose()

    def __repr__(self) -> str:
        return f"<ConnectionPool [{len(self.connections)} open, {len(self._retired)} retiring, {len(self.down)} down]>"
