"""W3C trace context propagation: the `traceparent` (and `tracestate`) of every call, on both sides.

    server = kubrpc.Server(interceptors=[ServerTracing()])        # handlers read current_trace()
    kubrpc.connect(target, interceptors=[ClientTracing()])        # sends traceparent with every call

`ClientTracing` sends `traceparent: 00-<trace id>-<span id>-<flags>`: a new span of the current trace when called
from inside a handler (or a `use_trace()` block), else of a new trace. `ServerTracing` reads it; a missing or
malformed one is ignored and a new trace starts (never an error). The handler's `current_trace()` has the caller's
trace id, a span id of its own, and the caller's span id as `parent_id`.

When opentelemetry-api is installed (the `[otel]` extra), both use OpenTelemetry's configured propagator
and context: a handler runs in the extracted context, client calls continue the current OpenTelemetry span, and
with an SDK tracer provider they record SERVER and CLIENT spans. Without an SDK (or with `otel=False`) the ids are
made here, the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._trace_context import TraceContext, _current, new_trace
from .interceptors import CallInfo, ClientCall, Proceed

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._otel import Otel

__all__ = (
    "ClientTracing",
    "ServerTracing",
    "TraceContext",
    "current_trace",
    "new_trace",
    "otel_available",
    "parse_traceparent",
    "use_trace",
)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_HEADER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_TRACESTATE = 512  # W3C: propagate at least 512 characters; longer ones are dropped rather than cut
_TRACESTATE_CHARS = re.compile(r"[\x20-\x7e]*")


def parse_traceparent(value: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The caller's span that a `traceparent` header names (its span id is the header's parent-id); None if invalid.

    Follows the W3C rules: lower-case hex only, version `ff` and all-zero ids are invalid, a version-00 header has
    exactly four fields, a later version may append fields. `tracestate` is kept if it is printable and not too long.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    found = _HEADER.match(value)
    if found is None:
        return None
    version, trace_id, span_id, flags = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    state = ""
    if tracestate is not None:
        tracestate = tracestate.strip(" \t")
        if len(tracestate) <= _MAX_TRACESTATE and _TRACESTATE_CHARS.fullmatch(tracestate):
            state = tracestate
    return TraceContext(trace_id, span_id, None, bool(int(flags, 16) & 1), state)


def current_trace() -> TraceContext | None:
    """The span of the call that the running handler serves (with ServerTracing), or of a `use_trace()` block."""
    return _current.get()


@contextmanager
def use_trace(trace: TraceContext | None = None) -> Iterator[TraceContext]:
    """Make `trace` (default: a new one) current in the block: calls sent in it become its child spans."""
    trace = new_trace() if trace is None else trace
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


def otel_available() -> bool:
    """Whether opentelemetry-api can be imported (then the interceptors use it unless told `otel=False`)."""
    try:
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


class ServerTracing:
    """Server interceptor: reads the caller's `traceparent` and makes the call's span current for its handler.

    `otel`: use OpenTelemetry (default: if installed); `tracer_provider`: the one that records SERVER spans
    (default: OpenTelemetry's global one).
    """

    def __init__(self, *, otel: bool | None = None, tracer_provider: TracerProvider | None = None) -> None:
        self._otel = _otel(otel, tracer_provider)

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes:
        """Run the call as a child span of the caller's (or as the first span of a new trace)."""
        if self._otel is not None:
            return await self._otel.serve(call, proceed)
        caller = parse_traceparent(call.metadata.get(TRACEPARENT), call.metadata.get(TRACESTATE))
        token = _current.set(new_trace() if caller is None else caller.child())
        try:
            return await proceed()
        finally:
            _current.reset(token)


class ClientTracing:
    """Client interceptor: sends `traceparent` (and `tracestate`) with every call, as a new span of the current trace.

    A call that already carries a `traceparent` (set in the stub's metadata) is sent as it is. `otel` and
    `tracer_provider` as for ServerTracing (CLIENT spans).
    """

    def __init__(self, *, otel: bool | None = None, tracer_provider: TracerProvider | None = None) -> None:
        self._otel = _otel(otel, tracer_provider)

    async def __call__(self, call: ClientCall, proceed: Proceed, /) -> bytes:
        """Add the trace headers, then send the call."""
        if TRACEPARENT in call.metadata:
            return await proceed()
        if self._otel is not None:
            return await self._otel.send(call, proceed)
        parent = _current.get()
        span = new_trace() if parent is None else parent.child()
        call.metadata[TRACEPARENT] = span.traceparent
        if span.tracestate:
            call.metadata[TRACESTATE] = span.tracestate
        return await proceed()


def _otel(otel: bool | None, tracer_provider: TracerProvider | None) -> Otel | None:
    if otel is None:
        otel = otel_available()
    if not otel:
        return None
    from ._otel import Otel

    return Otel(tracer_provider)
