"""The plugin contracts: resolver -> balancer -> transport, each a small Protocol.

Each box knows only the box after it. A resolver yields complete endpoint snapshots; a balancer
turns the latest snapshot into a pick for each call; a transport carries encoded calls to the
picked endpoint over a connection that the Channel owns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from .endpoint import Endpoint
from .status import Status

__all__ = (
    "Balancer",
    "CallFeedback",
    "Connection",
    "Dispatcher",
    "KeyedBalancer",
    "Listener",
    "Resolver",
    "ResolverDiagnostics",
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

    async def aclose(self) -> None:
        """Close the connection; calls still on it fail with UNAVAILABLE."""
        ...


class Dispatcher(Protocol):
    """What a server transport calls: run one call and return the encoded result, or raise RpcError.

    `metadata` has lower-case keys; `peer` is the client's `host:port` (empty if unknown).
    """

    async def dispatch(
        self, path: str, payload: bytes, *, timeout: float | None, metadata: Mapping[str, str], peer: str = ""
    ) -> bytes:
        """Run the call at `path` (`Service/method`) and return its encoded result, or raise RpcError."""
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

    def listen(self, server: object, host: str, port: int, /) -> AbstractAsyncContextManager[Listener]:
        """Serve `server` on host:port while the context is open; drain when it exits."""
        ...
