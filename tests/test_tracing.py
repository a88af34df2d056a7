"""W3C trace context propagation (kubrpc.tracing): header format, two hops, malformed input, OpenTelemetry bridge."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import kubrpc
from kubrpc import current_call
from kubrpc.tracing import (
    ClientTracing,
    ServerTracing,
    TraceContext,
    current_trace,
    new_trace,
    otel_available,
    parse_traceparent,
    use_trace,
)

HEADER = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

Start = Callable[..., Any]


class Traced(Protocol):
    async def whoami(self) -> dict[str, str]: ...

    async def relay(self, url: str) -> list[dict[str, str]]: ...


class TracedImpl:
    """Reports the trace it runs in; `relay` also calls another server's whoami from inside the handler."""

    def __init__(self, client_tracing: ClientTracing | None = None) -> None:
        self.client_tracing = client_tracing or ClientTracing(otel=False)

    async def whoami(self) -> dict[str, str]:
        trace = current_trace()
        metadata = current_call().metadata
        return {
            "traceparent": metadata.get("traceparent", ""),
            "tracestate": metadata.get("tracestate", ""),
            "trace_id": trace.trace_id if trace else "",
            "span_id": trace.span_id if trace else "",
            "parent_id": (trace.parent_id or "") if trace else "",
            "state": trace.tracestate if trace else "",
        }

    async def relay(self, url: str) -> list[dict[str, str]]:
        mine = await self.whoami()
        async with kubrpc.connect(url, interceptors=[self.client_tracing]) as channel:
            return [mine, await channel.stub(Traced, timeout=5).whoami()]


@asynccontextmanager
async def traced_server(
    scheme: str, server_tracing: ServerTracing | None, client_tracing: ClientTracing | None = None
) -> AsyncIterator[str]:
    server = kubrpc.Server(interceptors=[server_tracing] if server_tracing else [])
    server.register(Traced, TracedImpl(client_tracing))
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
        yield listener.url


def fields(header: str) -> tuple[str, str, str, str]:
    version, trace_id, span_id, flags = header.split("-")
    return version, trace_id, span_id, flags


# -- the header ---------------------------------------------------------------------------------------------------


def test_new_trace_header_format() -> None:
    trace = new_trace()
    assert HEADER.fullmatch(trace.traceparent)
    assert trace.traceparent == f"00-{trace.trace_id}-{trace.span_id}-01"
    assert trace.parent_id is None
    assert new_trace(sampled=False).traceparent.endswith("-00")
    assert len({new_trace().trace_id for _ in range(100)}) == 100
    child = trace.child()
    assert (child.trace_id, child.parent_id, child.sampled) == (trace.trace_id, trace.span_id, True)
    assert child.span_id != trace.span_id and HEADER.fullmatch(child.traceparent)


def test_parse_valid_headers() -> None:
    caller = parse_traceparent(f"00-{TRACE}-{SPAN}-01", "congo=t61rcWkgMzE")
    assert caller == TraceContext(TRACE, SPAN, None, True, "congo=t61rcWkgMzE")
    assert parse_traceparent(f"  00-{TRACE}-{SPAN}-00\t") == TraceContext(TRACE, SPAN, None, False)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03") == TraceContext(TRACE, SPAN, None, True)  # unknown flag bits
    # A later version may append fields; it is read as version 00.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-what-the-future-holds") == TraceContext(TRACE, SPAN)
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01") == TraceContext(TRACE, SPAN)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE}-{SPAN}-011",
        f"01-{TRACE}-{SPAN}-01extra",  # later versions separate more fields with a dash
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN[:-1]}-01",
        f"00-{TRACE}0-{SPAN}-01",
        f"0-{TRACE}-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}g-{SPAN}-01",  # not hex
        f"00-{TRACE}-{SPAN}-0x",
        f"00-{TRACE}-{SPAN}",
        "\x00" * 55,
        "0" * 10_000,
    ],
)
def test_parse_malformed_headers(header: str | None) -> None:
    assert parse_traceparent(header) is None


def test_bad_tracestate_is_dropped() -> None:
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01", "a=1\x00") == TraceContext(TRACE, SPAN)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01", "a=" + "x" * 600) == TraceContext(TRACE, SPAN)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01", " a=1,b=2 ").tracestate == "a=1,b=2"  # type: ignore[union-attr]


# -- over real sockets, pure implementation -----------------------------------------------------------------------


async def test_client_sends_traceparent_and_server_continues_it(scheme: str) -> None:
    async with traced_server(scheme, ServerTracing(otel=False)) as url:
        async with kubrpc.connect(url, interceptors=[ClientTracing(otel=False)]) as channel:
            seen = await channel.stub(Traced, timeout=5).whoami()
            again = await channel.stub(Traced, timeout=5).whoami()
    assert HEADER.fullmatch(seen["traceparent"])
    _, trace_id, span_id, flags = fields(seen["traceparent"])
    assert flags == "01"
    assert seen["trace_id"] == trace_id  # the caller's trace
    assert seen["parent_id"] == span_id  # the caller's span is the parent
    assert re.fullmatch("[0-9a-f]{16}", seen["span_id"]) and seen["span_id"] != span_id  # a span of its own
    assert again["trace_id"] != trace_id  # calls outside of any trace each start one


async def test_two_hops_keep_the_trace_id_with_new_span_ids(scheme: str) -> None:
    async with traced_server(scheme, ServerTracing(otel=False)) as url_b:
        async with traced_server(scheme, ServerTracing(otel=False)) as url_a:
            async with kubrpc.connect(url_a, interceptors=[ClientTracing(otel=False)]) as channel:
                a, b = await channel.stub(Traced, timeout=5).relay(url_b)
    _, trace_id, client_span, _ = fields(a["traceparent"])
    _, trace_id_b, a_client_span, _ = fields(b["traceparent"])
    assert a["trace_id"] == b["trace_id"] == trace_id == trace_id_b
    spans = [client_span, a["span_id"], a_client_span, b["span_id"]]
    assert len(set(spans)) == 4, spans
    assert a["parent_id"] == client_span
    assert b["parent_id"] == a_client_span


@pytest.mark.parametrize(
    "header", ["garbage", f"00-{TRACE.upper()}-{SPAN}-01", f"ff-{TRACE}-{SPAN}-01", f"00-{'0' * 32}-{SPAN}-01"]
)
@pytest.mark.parametrize("otel", [False, True])
async def test_malformed_traceparent_starts_a_new_trace(scheme: str, header: str, otel: bool) -> None:
    async with traced_server(scheme, ServerTracing(otel=otel)) as url:
        async with kubrpc.connect(url) as channel:  # no ClientTracing: the header goes as it is
            seen = await channel.stub(Traced, timeout=5, metadata={"traceparent": header}).whoami()
    assert seen["traceparent"] == header
    assert re.fullmatch("[0-9a-f]{32}", seen["trace_id"]) and seen["trace_id"] not in header.lower()
    assert seen["parent_id"] == ""


async def test_malformed_traceparent_over_raw_http() -> None:
    async with traced_server("http", ServerTracing(otel=False)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post(
                "/Traced/whoami", json={}, headers={"traceparent": "00-xyz", "tracestate": "a=1"}
            )
    assert response.status_code == 200
    seen = response.json()
    assert seen["parent_id"] == "" and seen["state"] == "" and len(seen["trace_id"]) == 32


async def test_explicit_traceparent_and_tracestate_travel_unchanged(scheme: str) -> None:
    header = f"00-{TRACE}-{SPAN}-00"
    async with traced_server(scheme, ServerTracing(otel=False)) as url:
        async with kubrpc.connect(url, interceptors=[ClientTracing(otel=False)]) as channel:
            stub = channel.stub(Traced, timeout=5, metadata={"traceparent": header, "tracestate": "v=1"})
            seen = await stub.whoami()
    assert seen["traceparent"] == header
    assert (seen["trace_id"], seen["parent_id"], seen["state"]) == (TRACE, SPAN, "v=1")


async def test_use_trace_groups_calls_into_one_trace(scheme: str) -> None:
    root = TraceContext(TRACE, SPAN, tracestate="vendor=abc")
    async with traced_server(scheme, ServerTracing(otel=False)) as url:
        async with kubrpc.connect(url, interceptors=[ClientTracing(otel=False)]) as channel:
            stub = channel.stub(Traced, timeout=5)
            with use_trace(root) as trace:
                assert trace is root and current_trace() is root
                first, second = await stub.whoami(), await stub.whoami()
            assert current_trace() is None
            with use_trace() as fresh:
                third = await stub.whoami()
    assert first["trace_id"] == second["trace_id"] == TRACE
    assert first["tracestate"] == "vendor=abc" and first["state"] == "vendor=abc"
    assert fields(first["traceparent"])[2] != fields(second["traceparent"])[2]
    assert third["trace_id"] == fresh.trace_id != TRACE


async def test_handlers_without_server_tracing_have_no_trace(scheme: str) -> None:
    async with traced_server(scheme, None) as url:
        async with kubrpc.connect(url, interceptors=[ClientTracing(otel=False)]) as channel:
            seen = await channel.stub(Traced, timeout=5).whoami()
    assert HEADER.fullmatch(seen["traceparent"]) and seen["trace_id"] == ""


# -- OpenTelemetry ------------------------------------------------------------------------------------------------


def test_otel_is_used_when_installed() -> None:
    assert otel_available()
    assert ServerTracing()._otel is not None and ClientTracing()._otel is not None
    assert ServerTracing(otel=False)._otel is None


async def test_two_hops_with_otel_api_only(scheme: str) -> None:
    """With OpenTelemetry's API but no SDK (no-op tracer), the ids are made by kubrpc, in OpenTelemetry's context."""
    async with traced_server(scheme, ServerTracing(otel=True), ClientTracing(otel=True)) as url_b:
        async with traced_server(scheme, ServerTracing(otel=True), ClientTracing(otel=True)) as url_a:
            async with kubrpc.connect(url_a, interceptors=[ClientTracing(otel=True)]) as channel:
                a, b = await channel.stub(Traced, timeout=5).relay(url_b)
    _, trace_id, client_span, _ = fields(a["traceparent"])
    _, _, a_client_span, _ = fields(b["traceparent"])
    assert HEADER.fullmatch(a["traceparent"]) and HEADER.fullmatch(b["traceparent"])
    assert a["trace_id"] == b["trace_id"] == trace_id
    assert len({client_span, a["span_id"], a_client_span, b["span_id"]}) == 4
    assert (a["parent_id"], b["parent_id"]) == (client_span, a_client_span)


async def test_two_hops_with_an_otel_sdk_record_spans(scheme: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server_tracing = ServerTracing(otel=True, tracer_provider=provider)
    client_tracing = ClientTracing(otel=True, tracer_provider=provider)
    async with traced_server(scheme, server_tracing, client_tracing) as url_b:
        async with traced_server(scheme, server_tracing, client_tracing) as url_a:
            async with kubrpc.connect(url_a, interceptors=[client_tracing]) as channel:
                a, b = await channel.stub(Traced, timeout=5).relay(url_b)
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [(s.name, s.kind) for s in spans] == [
        ("Traced/relay", SpanKind.CLIENT),
        ("Traced/relay", SpanKind.SERVER),
        ("Traced/whoami", SpanKind.CLIENT),
        ("Traced/whoami", SpanKind.SERVER),
    ]
    ids = [(f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in spans]  # type: ignore[union-attr]
    assert len({trace for trace, _ in ids}) == 1 and len({span for _, span in ids}) == 4
    for parent, child in zip(spans, spans[1:], strict=False):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id  # type: ignore[union-attr]
    # Flags: sampled, and newer SDKs also set W3C level 2's "random trace id" bit.
    assert a["traceparent"][:-2] == f"00-{ids[0][0]}-{ids[0][1]}-" and a["traceparent"][-2:] in ("01", "03")
    assert (a["trace_id"], a["span_id"], a["parent_id"]) == (ids[0][0], ids[1][1], ids[0][1])
    assert b["traceparent"][:-2] == f"00-{ids[0][0]}-{ids[2][1]}-"
    assert (b["span_id"], b["parent_id"]) == (ids[3][1], ids[2][1])
    assert spans[1].attributes == {
        "rpc.system": "kubrpc",
        "rpc.service": "Traced",
        "rpc.method": "relay",
        "rpc.response.status_code": "OK",
    }


async def test_otel_client_interoperates_with_a_pure_server(scheme: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with traced_server(scheme, ServerTracing(otel=False)) as url:
        async with kubrpc.connect(url, interceptors=[ClientTracing(tracer_provider=provider)]) as channel:
            seen = await channel.stub(Traced, timeout=5).whoami()
            with pytest.raises(kubrpc.RpcError):
                await channel.call("Traced/nothing", b"{}", timeout=5)
    ok, failed = exporter.get_finished_spans()
    assert seen["trace_id"] == f"{ok.context.trace_id:032x}"  # type: ignore[union-attr]
    assert seen["parent_id"] == f"{ok.context.span_id:016x}"  # type: ignore[union-attr]
    assert failed.status.status_code.name == "ERROR"
    assert failed.attributes is not None and failed.attributes["rpc.response.status_code"] == "UNIMPLEMENTED"


def test_pure_implementation_without_opentelemetry() -> None:
    """opentelemetry-api is an optional extra: without it the interceptors use the pure implementation."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if not installed
        from typing import Protocol
        import anyio, kubrpc
        from kubrpc.tracing import ClientTracing, ServerTracing, current_trace, otel_available

        class Who(Protocol):
            async def parent(self) -> list[str]: ...

        class WhoImpl:
            async def parent(self) -> list[str]:
                return [kubrpc.current_call().metadata["traceparent"], current_trace().parent_id]

        async def main():
            assert not otel_available()
            server = kubrpc.Server(interceptors=[ServerTracing()])
            server.register(Who, WhoImpl())
            async with server.serve("tcp://127.0.0.1:0") as listener:
                async with kubrpc.connect(listener.url, interceptors=[ClientTracing()]) as channel:
                    header, parent = await channel.stub(Who, timeout=5).parent()
            assert parent == header.split("-")[2], (header, parent)
            try:
                ServerTracing(otel=True)
            except ImportError:
                print("ok")

        anyio.run(main)
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
