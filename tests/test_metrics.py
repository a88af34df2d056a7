"""Prometheus metrics (kubrpc.metrics) of servers, clients and channels, over real loopback sockets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from services import Arith, Control, make_server, wait_until

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.metrics import ClientMetrics, ServerMetrics, serve_metrics
from kubrpc.testing import ManualResolver

Start = Callable[..., Any]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when it does not exist."""
    return registry.get_sample_value(name, labels) or 0.0


def calls(registry: CollectorRegistry, side: str, service: str, method: str, code: str) -> float:
    return value(registry, f"kubrpc_{side}_calls_total", service=service, method=method, code=code)


async def test_server_counts_calls_by_method_and_code(scheme: str, start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server(scheme, metrics=ServerMetrics(registry))
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        control = channel.stub(Control, timeout=5)
        for i in range(3):
            assert await arith.add(i, 1) == i + 1
        with pytest.raises(RpcError):
            await arith.div(1, 0)
        with pytest.raises(RpcError) as crashed:
            await control.crash()
        assert crashed.value.code is Status.INTERNAL
        with pytest.raises(RpcError):
            await control.fail("PERMISSION_DENIED", "no")
    assert calls(registry, "server", "Arith", "add", "OK") == 3
    assert calls(registry, "server", "Arith", "div", "INVALID_ARGUMENT") == 1
    assert calls(registry, "server", "Control", "crash", "INTERNAL") == 1
    assert calls(registry, "server", "Control", "fail", "PERMISSION_DENIED") == 1
    assert value(registry, "kubrpc_server_call_seconds_count", service="Arith", method="add") == 3
    assert value(registry, "kubrpc_server_call_seconds_sum", service="Arith", method="add") > 0
    assert value(registry, "kubrpc_server_in_flight", service="Arith", method="add") == 0


async def test_in_flight_and_deadline_exceeded(scheme: str, start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, control = await start_server(scheme, metrics=ServerMetrics(registry))
    async with kubrpc.connect(url) as channel:
        slow = channel.stub(Control, timeout=0.3)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(slow.sleep, 0.05)
            await wait_until(lambda: control.started == 2)
            assert value(registry, "kubrpc_server_in_flight", service="Control", method="sleep") == 2
        with pytest.raises(RpcError) as late:
            await slow.sleep(10)
        assert late.value.code is Status.DEADLINE_EXCEEDED
        await wait_until(lambda: control.cancelled == 1)
        await wait_until(lambda: calls(registry, "server", "Control", "sleep", "DEADLINE_EXCEEDED") == 1)
    assert calls(registry, "server", "Control", "sleep", "OK") == 2
    assert value(registry, "kubrpc_server_in_flight", service="Control", method="sleep") == 0
    # The late call's latency is its deadline, not the 10 s it asked for.
    assert value(registry, "kubrpc_server_call_seconds_sum", service="Control", method="sleep") < 2


async def test_unknown_services_and_methods_use_a_fixed_label(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("http", metrics=ServerMetrics(registry))
    async with httpx.AsyncClient(base_url=url) as http:
        for i in range(20):
            assert (await http.post(f"/Nope{i}/x{i}", json={})).status_code == 501
            assert (await http.post(f"/Arith/sub{i}", json={})).status_code == 501
        text = (await http.get("/metrics")).text
    assert calls(registry, "server", "unknown", "unknown", "UNIMPLEMENTED") == 20
    assert calls(registry, "server", "Arith", "unknown", "UNIMPLEMENTED") == 20
    assert "Nope" not in text and "sub1" not in text
    assert 'kubrpc_server_calls_total{code="UNIMPLEMENTED",method="unknown",service="unknown"} 20.0' in text


async def test_unknown_method_over_tcp(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("tcp", metrics=ServerMetrics(registry))
    async with kubrpc.connect(url) as channel:
        for path in ("Arith/mul", "Secret/thing"):
            with pytest.raises(RpcError) as missing:
                await channel.call(path, b"{}", timeout=5)
            assert missing.value.code is Status.UNIMPLEMENTED
    assert calls(registry, "server", "Arith", "unknown", "UNIMPLEMENTED") == 1
    assert calls(registry, "server", "unknown", "unknown", "UNIMPLEMENTED") == 1


async def test_metrics_endpoint_on_the_http_transport(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("http", metrics=ServerMetrics(registry))
    async with kubrpc.connect(url) as channel:
        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'kubrpc_server_calls_total{code="OK",method="add",service="Arith"} 1.0' in response.text
        assert 'kubrpc_server_call_seconds_bucket{le="0.0005",method="add",service="Arith"}' in response.text
        assert "# TYPE kubrpc_server_in_flight gauge" in response.text
        open_metrics = await http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.endswith("# EOF\n")
        assert (await http.post("/metrics", json={})).status_code == 405
        assert (await http.get("/healthz")).status_code == 200


async def test_no_metrics_endpoint_without_metrics(start_server: Start) -> None:
    url, server, _ = await start_server("http")
    assert server.metrics is None
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/metrics")).status_code == 404


async def test_server_metrics_listed_as_an_interceptor(start_server: Start) -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    url, server, _ = await start_server("http", interceptors=[metrics])
    assert server.metrics is metrics and server.interceptors == (metrics,)
    async with kubrpc.connect(url) as channel:
        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
    async with httpx.AsyncClient(base_url=url) as http:
        assert 'method="add"' in (await http.get("/metrics")).text


async def test_metrics_true_uses_the_global_registry(start_server: Start) -> None:
    from prometheus_client import REGISTRY

    before = calls(REGISTRY, "server", "Arith", "add", "OK")
    url, server, _ = await start_server("tcp", metrics=True)
    _, other, _ = await start_server("tcp", metrics=True)  # a second server shares the metrics
    assert isinstance(server.metrics, ServerMetrics) and server.metrics.registry is REGISTRY
    assert other.metrics is not None and other.metrics.registry is REGISTRY
    async with kubrpc.connect(url) as channel:
        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
    assert calls(REGISTRY, "server", "Arith", "add", "OK") == before + 1


async def test_rejections_by_later_interceptors_are_counted(start_server: Start) -> None:
    from kubrpc.auth import BearerAuth

    registry = CollectorRegistry()
    url, _, _ = await start_server(
        "tcp", metrics=ServerMetrics(registry), interceptors=[BearerAuth({"t": ["Arith/*"]})]
    )
    async with kubrpc.connect(url) as channel:
        with pytest.raises(RpcError):
            await channel.stub(Arith, timeout=5).add(1, 2)
    assert calls(registry, "server", "Arith", "add", "UNAUTHENTICATED") == 1


async def test_client_counts_calls_by_method_and_code(scheme: str, start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server(scheme)
    async with kubrpc.connect(url, metrics=ClientMetrics(registry)) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 2) == 3
        assert await arith.add(3, 4) == 7
        with pytest.raises(RpcError):
            await arith.div(1, 0)
        with pytest.raises(RpcError) as late:
            await channel.stub(Control, timeout=0.1).sleep(10)
        assert late.value.code is Status.DEADLINE_EXCEEDED
    assert calls(registry, "client", "Arith", "add", "OK") == 2
    assert calls(registry, "client", "Arith", "div", "INVALID_ARGUMENT") == 1
    assert calls(registry, "client", "Control", "sleep", "DEADLINE_EXCEEDED") == 1
    assert value(registry, "kubrpc_client_call_seconds_count", service="Arith", method="add") == 2


async def test_client_counts_unavailable_and_cancelled(start_server: Start) -> None:
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    async with kubrpc.connect("static://127.0.0.1:1", interceptors=[metrics], max_attempts=1) as channel:
        with pytest.raises(RpcError) as refused:
            await channel.stub(Arith, timeout=5).add(1, 2)
        assert refused.value.code is Status.UNAVAILABLE
    assert calls(registry, "client", "Arith", "add", "UNAVAILABLE") == 1
    url, _, control = await start_server("tcp")
    async with kubrpc.connect(url, metrics=metrics) as channel:
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.stub(Control, timeout=5).sleep, 10)
            await wait_until(lambda: control.started == 1)
            tg.cancel_scope.cancel()
    assert calls(registry, "client", "Control", "sleep", "CANCELLED") == 1


async def test_channel_endpoint_gauge_follows_the_resolver(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("tcp")
    port = int(url.rsplit(":", 1)[1])
    resolver = ManualResolver([Endpoint("127.0.0.1", port), Endpoint("127.0.0.1", 1, ready=False)])

    def endpoints(state: str) -> float | None:
        return registry.get_sample_value("kubrpc_client_endpoints", {"target": "<endpoints>", "state": state})

    async with kubrpc.connect(resolver, metrics=ClientMetrics(registry)) as channel:
        await wait_until(lambda: endpoints("ready") == 1)
        assert endpoints("not_ready") == 1
        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
        resolver.set([Endpoint("127.0.0.1", port), Endpoint("127.0.0.2", port), Endpoint("127.0.0.3", port)])
        await wait_until(lambda: endpoints("ready") == 3)
        assert endpoints("not_ready") == 0
        resolver.set([])
        await wait_until(lambda: endpoints("ready") == 0)
    assert endpoints("ready") is None and endpoints("not_ready") is None  # a closed channel's series are gone


async def test_static_target_label(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("tcp")
    target = "static://" + url.removeprefix("tcp://")
    async with kubrpc.connect(target, interceptors=[ClientMetrics(registry)]) as channel:
        await wait_until(lambda: bool(channel.endpoints))
        assert registry.get_sample_value("kubrpc_client_endpoints", {"target": target, "state": "ready"}) == 1


async def test_on_endpoints_hooks_and_a_failing_hook(start_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    url, _, _ = await start_server("tcp")
    seen: list[tuple[bool, int]] = []

    def broken(channel: kubrpc.Channel, endpoints: object) -> None:
        raise ValueError("boom")

    def record(channel: kubrpc.Channel, endpoints: list[Endpoint]) -> None:
        seen.append((channel.closed, len(endpoints)))

    async with kubrpc.connect(url, on_endpoints=[broken, record]) as channel:
        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
    assert seen == [(False, 1), (True, 0)]
    assert "on_endpoints hook" in caplog.text


async def test_serve_metrics_for_a_tcp_only_server(start_server: Start) -> None:
    registry = CollectorRegistry()
    url, _, _ = await start_server("tcp", metrics=ServerMetrics(registry))
    async with serve_metrics("http://127.0.0.1:0", registry=registry) as listener:
        assert listener.url.startswith("http://127.0.0.1:") and not listener.url.endswith(":0")
        async with kubrpc.connect(url) as channel:
            assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
        async with httpx.AsyncClient(base_url=listener.url) as http:
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert 'kubrpc_server_calls_total{code="OK",method="add",service="Arith"} 1.0' in response.text
            assert (await http.get("/")).status_code == 404
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(listener.url + "/metrics")


async def test_serve_metrics_rejects_bad_urls() -> None:
    for url in ("tcp://127.0.0.1:0", "127.0.0.1:9100", "https://127.0.0.1:0"):
        with pytest.raises(ValueError, match="metrics URL"):
            async with serve_metrics(url):
                pass


def test_same_registry_shares_metrics() -> None:
    registry = CollectorRegistry()
    ServerMetrics(registry)
    ServerMetrics(registry)  # no "Duplicated timeseries" error
    ClientMetrics(registry)
    ClientMetrics(registry)
    names = {metric.name for metric in registry.collect()}
    assert {"kubrpc_server_calls", "kubrpc_server_call_seconds", "kubrpc_server_in_flight"} <= names
    assert {"kubrpc_client_calls", "kubrpc_client_call_seconds", "kubrpc_client_endpoints"} <= names


def test_kubrpc_works_without_prometheus_client() -> None:
    """prometheus-client is an optional extra: without it kubrpc imports, serves and calls; metrics say why not."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        import anyio, kubrpc
        sys.path.insert(0, sys.argv[1])
        from services import Arith, make_server

        async def main():
            server, _ = make_server()
            for scheme in ("tcp", "http"):
                async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
                    async with kubrpc.connect(listener.url) as channel:
                        assert await channel.stub(Arith, timeout=5).add(1, 2) == 3

        anyio.run(main)
        for attempt in (lambda: __import__("kubrpc.metrics"), lambda: kubrpc.Server(metrics=True),
                        lambda: kubrpc.connect("tcp://127.0.0.1:1", metrics=True)):
            try:
                attempt()
            except ImportError as exc:
                assert "pip install prometheus-client (the [metrics] extra)" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        assert sys.modules["prometheus_client"] is None
        print("ok")
        """
    )
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, tests], capture_output=True, text=True, timeout=60, cwd=tests
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_metrics_server_and_client_both_sides_over_http(start_server: Start) -> None:
    """One registry for a server and a client in one process: both sides' series on one /metrics."""
    registry = CollectorRegistry()
    server, _ = make_server(metrics=ServerMetrics(registry))
    async with server.serve("http://127.0.0.1:0") as listener:
        async with kubrpc.connect(listener.url, metrics=ClientMetrics(registry)) as channel:
            assert await channel.stub(Arith, timeout=5).add(2, 2) == 4
        async with httpx.AsyncClient(base_url=listener.url) as http:
            text = (await http.get("/metrics")).text
    assert 'kubrpc_server_calls_total{code="OK",method="add",service="Arith"} 1.0' in text
    assert 'kubrpc_client_calls_total{code="OK",method="add",service="Arith"} 1.0' in text
