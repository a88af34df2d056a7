"""A call's trace context and the variable that holds the current one: the leaf shared by tracing and _otel."""

from __future__ import annotations

import os
import random
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ("TraceContext", "new_trace")

_ids = random.Random()  # seeded from the OS; its own, so that no user code seeds it
os.register_at_fork(after_in_child=_ids.seed)  # forked workers must not repeat each other's ids
_random = _ids.getrandbits


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span of a trace: ids as lower-case hex, as they appear in a `traceparent` header."""

    trace_id: str
    """32 hex digits, the same for every span of the trace."""
    span_id: str
    """16 hex digits, this span's own."""
    parent_id: str | None = None
    """The span id of the caller's span (from its traceparent); None for the first span of a trace."""
    sampled: bool = True
    """The `sampled` trace flag: whether the caller records this trace."""
    tracestate: str = ""
    """Vendor-specific trace state (the `tracestate` header), passed on unchanged."""

    @property
    def traceparent(self) -> str:
        """This span as a `traceparent` header value: `00-<trace_id>-<span_id>-<flags>`."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def child(self) -> TraceContext:
        """A new span of the same trace, whose parent is this one."""
        return TraceContext(self.trace_id, _new_span_id(), self.span_id, self.sampled, self.tracestate)


def _new_span_id() -> str:
    return f"{_random(64) or 1:016x}"  # all zeros is invalid


def new_trace(*, sampled: bool = True) -> TraceContext:
    """The first span of a new trace, with random ids."""
    return TraceContext(f"{_random(128) or 1:032x}", _new_span_id(), None, sampled)


_current: ContextVar[TraceContext | None] = ContextVar("kubrpc.current_trace", default=None)
