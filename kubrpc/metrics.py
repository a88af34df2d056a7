"""Prometheus metrics of calls and endpoints, through prometheus-client (the `[metrics]` extra).

    server = kubrpc.Server(metrics=True)                  # records server calls; /metrics on its HTTP listeners
    kubrpc.connect(target, metrics=True)                  # records client calls and the channel's endpoints
    async with serve_metrics("http://0.0.0.0:9100"):      # /metrics for a server that listens on TCP only
        await server.serve_forever("tcp://0.0.0.0:9000")

Server: `kubrpc_server_calls_total{service,method,code}`, `kubrpc_server_call_seconds{service,method}` (histogram),
`kubrpc_server_in_flight{service,method}`. Client: `kubrpc_client_calls_total{service,method,code}`,
`kubrpc_client_call_seconds{service,method}`, `kubrpc_client_endpoints{target,state}` (state `ready` or
`not_ready`, set on every resolver snapshot). `code` is a `kubrpc.Status` name (`OK`, `UNAVAILABLE`, ...). Calls of
unknown services or methods count under `service="unknown"` / `method="unknown"`, never under the path they named.

Both sides record into `registry` (default: prometheus-client's global REGISTRY); every ServerMetrics or
ClientMetrics of one registry shares the same metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import choose_encoder
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kubrpc.metrics needs prometheus-client: pip install prometheus-client (the [metrics] extra)"
    ) from exc

from .endpoint import Endpoint
from .errors import RpcError
from .interceptors import CallInfo, ClientCall, Proceed
from .interface import CallKind
from .status import Status

if TYPE_CHECKING:
    from .client import Channel
    from .interface import ServiceSpec

__all__ = ("DEFAULT_BUCKETS", "UNKNOWN", "ClientMetrics", "MetricsListener", "ServerMetrics", "serve_metrics")

#: The label value of a service or method that the server does not know.
UNKNOWN = "unknown"

#: Latency buckets in seconds: from half a millisecond (an RPC on one host) to 30 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_OK = Status.OK.name
_DEADLINE_SLACK = 0.005  # seconds: a cancellation this close to the deadline is the deadline


@dataclass(frozen=True, slots=True)
class _ServerCollectors:
    calls: Counter
    seconds: Histogram
    in_flight: Gauge
    messages: Counter


@dataclass(frozen=True, slots=True)
class _ClientCollectors:
    calls: Counter
    seconds: Histogram
    endpoints: Gauge
    messages: Counter


def _messages(side: str, registry: CollectorRegistry) -> Counter:
    return Counter(
        f"kubrpc_{side}_stream_messages_total",
        "Messages of stream calls, by direction (received or sent, as this side sees them).",
        ("service", "method", "direction"),
        registry=registry,
    )


# One set of metrics per registry: prometheus-client refuses to register a metric name twice.
_server_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _ServerCollectors] = weakref.WeakKeyDictionary()
_client_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _ClientCollectors] = weakref.WeakKeyDictionary()


def _server_metrics_of(registry: CollectorRegistry, buckets: Sequence[float]) -> _ServerCollectors:
    found = _server_collectors.get(registry)
    if found is None:
        found = _ServerCollectors(
            Counter(
                "kubrpc_server_calls_total",
                "Calls served, by final status code.",
                ("service", "method", "code"),
                registry=registry,
            ),
            Histogram(
                "kubrpc_server_call_seconds",
                "Time from the start of a call's dispatch to its result or error.",
                ("service", "method"),
                buckets=buckets,
                registry=registry,
            ),
            Gauge(
                "kubrpc_server_in_flight",
                "Calls being served right now.",
                ("service", "method"),
                registry=registry,
            ),
            _messages("server", registry),
        )
        _server_collectors[registry] = found
    return found


def _client_metrics_of(registry: CollectorRegistry, buckets: Sequence[float]) -> _ClientCollectors:
    found = _client_collectors.get(registry)
    if found is None:
        found = _ClientCollectors(
            Counter(
                "kubrpc_client_calls_total",
                "Calls made, by final status code (after retries).",
                ("service", "method", "code"),
                registry=registry,
            ),
            Histogram(
                "kubrpc_client_call_seconds",
                "Time from the start of a call to its result or error, retries included.",
                ("service", "method"),
                buckets=buckets,
                registry=registry,
            ),
            Gauge(
                "kubrpc_client_endpoints",
                "Endpoints of a channel's target in the resolver's last snapshot, by readiness.",
                ("target", "state"),
                registry=registry,
            ),
            _messages("client", registry),
        )
        _client_collectors[registry] = found
    return found


def _failure_code(exc: BaseException, deadline: float | None) -> str:
    """The status name that a call that raised `exc` ends with."""
    if isinstance(exc, RpcError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError | TimeoutError):
        # A transport may time a deadline from a moment before dispatch did (TCP does, from the frame's arrival).
        if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK:
            return Status.DEADLINE_EXCEEDED.name
        return Status.CANCELLED.name
    if isinstance(exc, Exception):
        return Status.INTERNAL.name
    return Status.CANCELLED.name


class _PerMethod:
    """The label children of one service/method, looked up once rather than per call."""

    __slots__ = ("calls", "codes", "method", "ok", "seconds", "service")

    def __init__(self, calls: Counter, seconds: Histogram, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.calls = calls
        self.ok = calls.labels(service, method, _OK)
        self.seconds = seconds.labels(service, method)
        self.codes: dict[str, Counter] = {_OK: self.ok}

    def failed(self, code: str) -> None:
        """Count a call that ended with status `code`."""
        counter = self.codes.get(code)
        if counter is None:
            counter = self.codes[code] = self.calls.labels(self.service, self.method, code)
        counter.inc()

    async def record(self, proceed: Proceed, deadline: float | None) -> bytes:
        """Run the call, counting it under its final status and timing it."""
        start = time.perf_counter()
        try:
            result = await proceed()
        except BaseException as exc:
            self.failed(_failure_code(exc, deadline))
            raise
        else:
            self.ok.inc()
            return result
        finally:
            self.seconds.observe(time.perf_counter() - start)


class ServerMetrics:
    """Server interceptor recording calls, latency and in-flight calls per method: `Server(metrics=ServerMetrics())`.

    `Server(metrics=...)` puts it first in the interceptor chain (so rejections by later interceptors count too)
    and serves `/metrics` on the server's HTTP listeners. It also works when listed in `Server(interceptors=...)`.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        collectors = _server_metrics_of(self.registry, buckets)
        self._calls = collectors.calls
        self._seconds = collectors.seconds
        self._in_flight = collectors.in_flight
        self._messages = collectors.messages
        self._methods: dict[str, tuple[_PerMethod, Gauge]] = {}

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes:
        """Run the call, counting it by method and final status and timing it."""
        found = self._methods.get(call.path)
        if found is None:
            found = self._methods[call.path] = (
                _PerMethod(self._calls, self._seconds, call.service, call.method),
                self._in_flight.labels(call.service, call.method),
            )
        per, in_flight = found
        in_flight.inc()
        try:
            return await per.record(proceed, call.deadline)
        finally:
            in_flight.dec()

    def record_stream(
        self, path: str, /, *, status: Status, seconds: float, received: int, sent: int, client: bool
    ) -> None:
        """Count the messages of a stream call that ended (the call itself was counted around it)."""
        _count_messages(self._messages, path, received, sent)

    def record_unimplemented(self, path: str, services: Mapping[str, ServiceSpec]) -> None:
        """Count a call of an unknown service or method (as `unknown`, never under the path it named)."""
        service = path.partition("/")[0]
        if service not in services:
            service = UNKNOWN
        self._calls.labels(service, UNKNOWN, Status.UNIMPLEMENTED.name).inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format that `accept` asks for (Prometheus or OpenMetrics): body, content type."""
        return _exposition(self.registry, accept)

    def __repr__(self) -> str:
        return f"<ServerMetrics {len(self._methods)} methods>"


class ClientMetrics:
    """Client interceptor recording calls and latency per method, and the channel's endpoints: `connect(metrics=...)`.

    `connect(..., metrics=ClientMetrics())` (or `metrics=True`) also follows the channel's resolver snapshots into
    `kubrpc_client_endpoints{target,state}`; the channel's series are removed when it closes.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        collectors = _client_metrics_of(self.registry, buckets)
        self._calls = collectors.calls
        self._seconds = collectors.seconds
        self._endpoints = collectors.endpoints
        self._messages = collectors.messages
        self._methods: dict[str, _PerMethod] = {}

    async def __call__(self, call: ClientCall, proceed: Proceed, /) -> bytes:
        """Send the call, counting it by method and final status (after retries) and timing it."""
        per = self._per_method(call.path)
        if call.kind is not CallKind.UNARY:  # a stream is counted when it ends (record_stream)
            return await proceed()
        return await per.record(proceed, call.deadline)

    def _per_method(self, path: str) -> _PerMethod:
        per = self._methods.get(path)
        if per is None:
            service, _, method = path.partition("/")
            per = self._methods[path] = _PerMethod(self._calls, self._seconds, service, method)
        return per

    def record_stream(
        self, path: str, /, *, status: Status, seconds: float, received: int, sent: int, client: bool
    ) -> None:
        """Count a stream call that ended: the call under its final status, its duration and its messages."""
        per = self._per_method(path)
        if status is Status.OK:
            per.ok.inc()
        else:
            per.failed(status.name)
        per.seconds.observe(seconds)
        _count_messages(self._messages, path, received, sent)

    def observe_endpoints(self, channel: Channel, endpoints: Sequence[Endpoint]) -> None:
        """A Channel's `on_endpoints` hook: set the endpoint gauges of its target (remove them once it is closed)."""
        if channel.closed:
            for state in ("ready", "not_ready"):
                with contextlib.suppress(KeyError):
                    self._endpoints.remove(channel.target, state)
            return
        ready = sum(1 for ep in endpoints if ep.ready)
        self._endpoints.labels(channel.target, "ready").set(ready)
        self._endpoints.labels(channel.target, "not_ready").set(len(endpoints) - ready)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format that `accept` asks for (Prometheus or OpenMetrics): body, content type."""
        return _exposition(self.registry, accept)

    def __repr__(self) -> str:
        return f"<ClientMetrics {len(self._methods)} methods>"


def _count_messages(counter: Counter, path: str, received: int, sent: int) -> None:
    service, _, method = path.partition("/")
    if received:
        counter.labels(service, method, "received").inc(received)
    if sent:
        counter.labels(service, method, "sent").inc(sent)


def _exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsListener:
    """A running `serve_metrics()` endpoint; `url` is its real bound address, e.g. http://127.0.0.1:9100."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"<MetricsListener {self.url}>"


@asynccontextmanager
async def serve_metrics(
    url: str = "http://0.0.0.0:9100", *, registry: CollectorRegistry | None = None
) -> AsyncIterator[MetricsListener]:
    """Serve `GET /metrics` of `registry` (default: the global one) on `url` (port 0 for any) until the block exits.

    For servers that listen on TCP only; a Server with metrics serves /metrics on its HTTP listeners already.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"bad metrics URL {url!r}: expected http://HOST:PORT")
    chosen = REGISTRY if registry is None else registry

    async def metrics(request: Request) -> Response:
        body, content_type = _exposition(chosen, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    from ._asgi_server import serve_uvicorn

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    async with serve_uvicorn(app, parts.hostname, parts.port or 0, timeout_graceful_shutdown=1) as (bound, _):
        yield MetricsListener(bound)
