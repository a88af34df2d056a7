"""kubrpc.tracing's OpenTelemetry side: imported only when opentelemetry-api is installed and used."""

from __future__ import annotations

from opentelemetry import context as otel_context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TracerProvider,
    TraceState,
)

from ._trace_context import TraceContext, _current, new_trace
from ._version import __version__
from .errors import RpcError
from .interceptors import CallInfo, ClientCall, Proceed


class Otel:
    """OpenTelemetry's propagator and context for the tracing interceptors, and (with an SDK) their spans."""

    def __init__(self, tracer_provider: TracerProvider | None) -> None:
        self.tracer = trace.get_tracer("kubrpc", __version__, tracer_provider=tracer_provider)

    async def serve(self, call: CallInfo, proceed: Proceed) -> bytes:
        """Run a server call in the context extracted from its metadata, as a SERVER span."""
        extracted = propagate.extract(call.metadata, context=Context())
        caller = trace.get_current_span(extracted).get_span_context()
        started = self.tracer.start_span(
            call.path, context=extracted, kind=SpanKind.SERVER, attributes=_attributes(call)
        )
        own = started.get_span_context()
        span: Span | None = started
        if _is_new(own, caller):
            ours = _from_otel(own, caller.span_id if caller.is_valid else None)
        else:  # no SDK: the ids are made here
            span = None
            ours = _from_otel(caller, None).child() if caller.is_valid else new_trace()
            own = _to_otel(ours)
        handler_context = trace.set_span_in_context(span or NonRecordingSpan(own), extracted)
        return await self._run(span, handler_context, ours, proceed)

    async def send(self, call: ClientCall, proceed: Proceed) -> bytes:
        """Inject the current context, as a new CLIENT span, into a call's metadata; then send it."""
        current = otel_context.get_current()
        parent = trace.get_current_span(current).get_span_context()
        if not parent.is_valid and (ours := _current.get()) is not None:
            parent = _to_otel(ours)
            current = trace.set_span_in_context(NonRecordingSpan(parent), current)
        started = self.tracer.start_span(call.path, context=current, kind=SpanKind.CLIENT, attributes=_attributes(call))
        own = started.get_span_context()
        span: Span | None = started
        if not _is_new(own, parent):  # no SDK: the ids are made here
            span = None
            own = _to_otel(_from_otel(parent, None).child() if parent.is_valid else new_trace())
        propagate.inject(call.metadata, context=trace.set_span_in_context(NonRecordingSpan(own), current))
        if span is None:
            return await proceed()
        return await self._run(span, None, None, proceed)

    async def _run(
        self, span: Span | None, context: Context | None, ours: TraceContext | None, proceed: Proceed
    ) -> bytes:
        """Run `proceed` in `context` with `ours` current, ending `span` with the call's outcome."""
        otel_token = None if context is None else otel_context.attach(context)
        token = None if ours is None else _current.set(ours)
        try:
            result = await proceed()
        except BaseException as exc:
            if span is not None:
                code = exc.code.name if isinstance(exc, RpcError) else type(exc).__name__
                span.set_attribute("rpc.response.status_code", code)
                span.set_status(StatusCode.ERROR, code)
            raise
        else:
            if span is not None:
                span.set_attribute("rpc.response.status_code", "OK")
            return result
        finally:
            if token is not None:
                _current.reset(token)
            if otel_token is not None:
                otel_context.detach(otel_token)
            if span is not None:
                span.end()


def _is_new(span: SpanContext, parent: SpanContext) -> bool:
    """Did a tracer (an SDK) make a span of its own, rather than hand back its parent or an invalid one?"""
    return span.is_valid and not (parent.is_valid and span.span_id == parent.span_id)


def _to_otel(ours: TraceContext) -> SpanContext:
    return SpanContext(
        int(ours.trace_id, 16),
        int(ours.span_id, 16),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if ours.sampled else TraceFlags.DEFAULT),
        trace_state=TraceState.from_header([ours.tracestate]) if ours.tracestate else None,
    )


def _from_otel(span: SpanContext, parent_id: int | None) -> TraceContext:
    return TraceContext(
        f"{span.trace_id:032x}",
        f"{span.span_id:016x}",
        None if parent_id is None else f"{parent_id:016x}",
        span.trace_flags.sampled,
        span.trace_state.to_header() if span.trace_state else "",
    )


def _attributes(call: CallInfo | ClientCall) -> dict[str, str]:
    return {"rpc.system": "kubrpc", "rpc.service": call.service, "rpc.method": call.method}
