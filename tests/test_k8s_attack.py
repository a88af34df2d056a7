"""Attacks on the Kubernetes resolver's error paths, through the real kubernetes-asyncio client.

Apiserver behaviours come from `FakeKubeAPI`; streams no apiserver sends (a proxy that drops
`?watch=true`, repeated bookmarks then a close, garbage lines) come from `RawAPI` below.
No test depends on timing: backoff is checked through the delays it chooses, not the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from aiohttp import web
from follower import Follower
from kube_fixtures import following, resolver_factory
from kubernetes_asyncio.client import Configuration
from test_k8s_edges import RecordingBackoff, first_call_error

import kubrpc
from kubrpc.resolvers import _k8s_watch
from kubrpc.resolvers._k8s_watch import MAX_RETRY_AFTER, active_watches
from kubrpc.resolvers.k8s import KubernetesResolver
from kubrpc.status import Status
from kubrpc.testing.kube import (
    FakeKubeAPI,
    JsonObject,
    endpoint_slice,
    self_signed_certificate,
    server_ssl_context,
    status_object,
)

pytestmark = pytest.mark.anyio

FAST: dict[str, Any] = {"min_backoff": 0.001, "max_backoff": 0.004, "read_timeout": 10.0, "watch_timeout": 30.0}


@pytest.fixture
async def make(no_service_account: Path) -> AsyncIterator[Callable[..., KubernetesResolver]]:
    """make(url, **options): resolvers for the API server at `url`, with a quick backoff; closed at the end."""
    async with resolver_factory(None, no_service_account, **FAST) as factory:
        yield lambda url, **options: factory(url=url, **options)


WatchHandler = Callable[[web.StreamResponse], Awaitable[None]]


class RawAPI:
    """An HTTP server that lists one slice and answers every watch with `watch_handler` (no apiserver is this bad)."""

    def __init__(self, watch_handler: WatchHandler) -> None:
        self.watch_handler = watch_handler
        self.lists = 0
        self.watches = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> RawAPI:
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch", "").lower() not in ("true", "1"):
            self.lists += 1
            return web.json_response(LIST)
        self.watches += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await self.watch_handler(response)
        await response.write_eof()
        return response


SLICE = {**endpoint_slice("arith", "default", "arith-a", "10.0.0.1"), "metadata": {"name": "arith-a"}}
SLICE["metadata"]["resourceVersion"] = "1001"
LIST: JsonObject = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": "1001"}, "items": [SLICE]}


def line(event: object) -> bytes:
    return orjson.dumps(event) + b"\n"


def bookmark(rv: str | None) -> bytes:
    return line(
        {"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": rv} if rv else {}}}
    )


class TestNoHotLoop:
    """A watch that ends at once after lines that move no resourceVersion must back off, not spin."""

    @pytest.mark.parametrize(
        "stream",
        [
            pytest.param(bookmark("1001"), id="the-same-bookmark"),
            pytest.param(bookmark(None), id="a-bookmark-without-resourceVersion"),
            pytest.param(line(LIST), id="a-list-body-from-a-proxy-that-dropped-watch"),
            pytest.param(line({"type": "SOMETHING", "object": {"metadata": {}}}), id="an-unknown-event-type"),
        ],
    )
    async def test_lines_that_move_nothing_are_not_progress(
        self, stream: bytes, make: Callable[..., KubernetesResolver], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        RecordingBackoff.made = []
        monkeypatch.setattr(_k8s_watch, "Backoff", RecordingBackoff)

        async def handler(response: web.StreamResponse) -> None:
            await response.write(stream)

        async with RawAPI(handler) as api:
            resolver = make(api.url)
            async with following(resolver, close=False) as follower:
                await follower.wait_for_hosts("10.0.0.1")
                with anyio.fail_after(10):
                    while api.watches < 8:
                        await anyio.sleep(0.01)
                [backoff] = RecordingBackoff.made
                assert backoff.resets == 0
                assert len(backoff.delays) >= 6  # a backoff sleep after (nearly) every watch
                assert api.lists == 1  # and no relist

    async def test_a_bookmark_with_a_new_resource_version_is_progress(
        self, make: Callable[..., KubernetesResolver], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        RecordingBackoff.made = []
        monkeypatch.setattr(_k8s_watch, "Backoff", RecordingBackoff)
        versions = iter(range(2000, 3000))

        async def handler(response: web.StreamResponse) -> None:
            await response.write(bookmark(str(next(versions))))
            await asyncio.sleep(30)  # stays open

        async with RawAPI(handler) as api:
            resolver = make(api.url)
            async with following(resolver, close=False) as follower:
                await follower.wait_for_hosts("10.0.0.1")
                with anyio.fail_after(10):
                    while not RecordingBackoff.made or RecordingBackoff.made[0].resets < 1:
                        await anyio.sleep(0.01)
                assert resolver.stats is not None and resolver.stats.bookmarks == 1


class TestRetryAfter:
    async def _first_delay(self, caplog: pytest.LogCaptureFixture) -> float:
        with anyio.fail_after(10):
            while True:
                for record in caplog.records:
                    if "retrying in" in record.getMessage():
                        assert isinstance(record.args, tuple)
                        return float(record.args[-1])  # type: ignore[arg-type]
                await anyio.sleep(0.01)

    async def test_a_429_from_priority_and_fairness_waits_its_retry_after(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        kube.unavailable, kube.retry_after = 429, 20
        resolver = make(kube.url)
        async with following(resolver, close=False):
            delay = await self._first_delay(caplog)
            assert delay == 20.0  # not max_backoff's 0.004: the server asked for 20 s
            assert len(kube.requests) == 1
            assert resolver.problem is not None and "HTTP 429 TooManyRequests" in resolver.problem
            assert not resolver.problem_is_permanent

    async def test_retry_after_seconds_of_an_in_stream_error(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        status = status_object(500, "InternalError", "etcd leader changed")
        status["details"] = {"retryAfterSeconds": 10_000}
        kube.watch_error = status
        resolver = make(kube.url)
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            assert await self._first_delay(caplog) == MAX_RETRY_AFTER  # capped


class TestChunkedLists:
    async def test_pages_are_one_consistent_snapshot(self, kube: FakeKubeAPI) -> None:
        from kubernetes_asyncio.client import ApiClient, DiscoveryV1Api

        for i in range(4):
            kube.upsert_slice(endpoint_slice("arith", "default", f"arith-{i}", f"10.0.0.{i}"))
        async with ApiClient(Configuration(host=kube.url)) as client:
            api = DiscoveryV1Api(client)
            first = await api.list_namespaced_endpoint_slice("default", limit=2)
            kube.delete_slice("default", "arith-3")  # a change between pages
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-4", "10.0.0.4"))
            second = await api.list_namespaced_endpoint_slice("default", limit=2, _continue=first.metadata._continue)
        names = [s.metadata.name for s in first.items + second.items]
        assert names == ["arith-0", "arith-1", "arith-2", "arith-3"]  # as at the first page's resourceVersion
        assert second.metadata.resource_version == first.metadata.resource_version

    async def test_an_expired_continue_token_restarts_the_list_without_it(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for i in range(5):
            kube.upsert_slice(endpoint_slice("arith", "default", f"arith-{i}", f"10.0.0.{i}"))
        serve_list = kube._list
        compacted = False

        def list_then_compact(selected: Any, query: Any) -> web.Response:
            nonlocal compacted
            response = serve_list(selected, query)
            if not compacted and "continue" not in query:  # between the first and the second page
                compacted = True
                kube.delete_slice("default", "arith-4")
                kube.compact()
            return response

        monkeypatch.setattr(kube, "_list", list_then_compact)
        resolver = make(kube.url)
        resolver._options = dataclasses.replace(resolver._options, page_size=2)
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3")
        lists = [r for r in kube.requests if not r.is_watch]
        assert [("continue" in r.query) for r in lists] == [False, True, False, True]
        assert resolver.stats is not None and resolver.stats.expired == 1
        assert follower.snapshots[0] == follower.snapshots[-1]  # never a half list, never the deleted slice


class TestTLS:
    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
    async def test_a_certificate_the_configured_ca_did_not_sign_fails_fast(
        self, tmp_path: Path, make: Callable[..., KubernetesResolver]
    ) -> None:
        (tmp_path / "server").mkdir()
        (tmp_path / "other").mkdir()
        cert, key = self_signed_certificate(tmp_path / "server")
        other_ca, _ = self_signed_certificate(tmp_path / "other")
        async with FakeKubeAPI(ssl_context=server_ssl_context(cert, key)) as kube:
            resolver = make(kube.url, configuration=Configuration(host=kube.url, ssl_ca_cert=str(other_ca)))
            error = await first_call_error(resolver)  # within its 10 s hang guard, not after the 30 s wait
        assert error.code is Status.UNAVAILABLE
        assert "TLS certificate failed verification" in error.message
        assert "certificate-authority" in error.message


class TestStreamsNoApiserverSends:
    async def test_malformed_json_is_one_warning_line_and_a_rewatch(
        self, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        async def handler(response: web.StreamResponse) -> None:
            await response.write(b'{"type": "MODIFIED", "object": {"metad')  # a partial line, then the end

        async with RawAPI(handler) as api:
            resolver = make(api.url)
            async with following(resolver, close=False) as follower:
                await follower.wait_for_hosts("10.0.0.1")
                with anyio.fail_after(10):
                    while api.watches < 3:
                        await anyio.sleep(0.01)
        assert resolver.stats is not None and "malformed JSON from the API server during watch" in str(
            resolver.stats.last_error
        )
        assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad line"
        assert api.lists == 1  # the last resourceVersion is kept: a re-watch, not a relist


class TestSharedWatch:
    async def test_one_channel_closing_leaves_the_other_served_and_the_last_leaves_no_task(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        first, second = make(kube.url), make(kube.url)
        async with anyio.create_task_group() as tasks:
            follower = Follower(second)
            tasks.start_soon(follower.run)
            await follower.wait_for_hosts("10.0.0.1")
            async with kubrpc.connect(first):
                with anyio.fail_after(5):
                    while active_watches()[0].users < 2:
                        await anyio.sleep(0.01)
                assert len(active_watches()) == 1
            assert active_watches()[0].users == 1  # the channel closed its resolver; the watch stays
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            tasks.cancel_scope.cancel()
        await second.aclose()
        assert active_watches() == []
        await anyio.lowlevel.checkpoint()
        assert not [t for t in asyncio.all_tasks() if "kubrpc k8s watch" in t.get_name()]


EXEC_PLUGIN = """
import json, sys
token = open(sys.argv[1]).read().strip()
if token == "fail":
    sys.exit("the identity provider is down")
status = {"token": token, "expirationTimestamp": "2000-01-01T00:00:00Z"}  # always expired: run me each time
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}))
"""


def exec_kubeconfig(kube: FakeKubeAPI, tmp_path: Path, token: str) -> tuple[Path, Path]:
    """A kubeconfig whose user is an exec plugin that prints the token in `token_file` (or fails on "fail")."""
    plugin, token_file = tmp_path / "plugin.py", tmp_path / "token"
    plugin.write_text(EXEC_PLUGIN)
    token_file.write_text(token)
    document = kube.kubeconfig()
    exec_config: JsonObject = {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable}
    exec_config["args"] = [str(plugin), str(token_file)]
    document["users"] = [{"name": "fake", "user": {"exec": exec_config}}]
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(document))
    return path, token_file


class TestCredentials:
    async def test_an_expired_exec_credential_is_fetched_again(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with FakeKubeAPI(token="first") as kube:
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
            kubeconfig, token_file = exec_kubeconfig(kube, tmp_path, "first")
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
            async with KubernetesResolver("arith", "rpc", "default", service_account_dir=tmp_path, **FAST) as resolver:
                async with following(resolver, close=False) as follower:
                    await follower.wait_for_hosts("10.0.0.1")
                    kube.token = "second"  # the old token is now refused; the plugin hands out the new one
                    token_file.write_text("second")
                    kube.abort_watches()
                    kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
                    await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")

                    token_file.write_text("fail")  # the plugin fails: one line, and the endpoints stay
                    kube.abort_watches()
                    with anyio.fail_after(10):
                        while "no credentials" not in str(resolver.stats and resolver.stats.last_error):
                            await anyio.sleep(0.01)
                    assert resolver.stats is not None and "the identity provider is down" in str(
                        resolver.stats.last_error
                    )
                    assert [ep.host for ep in follower.snapshots[-1]] == ["10.0.0.1", "10.0.0.2"]

    async def test_an_exec_plugin_that_fails_at_start_fails_fast(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with FakeKubeAPI(token="first") as kube:
            kubeconfig, _ = exec_kubeconfig(kube, tmp_path, "fail")
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
            resolver = KubernetesResolver("arith", "rpc", "default", service_account_dir=tmp_path, **FAST)
            error = await first_call_error(resolver)
        assert error.code is Status.UNAVAILABLE
        assert f"the kubeconfig {kubeconfig} is invalid" in error.message
        assert "the identity provider is down" in error.message


class TestWrongServer:
    async def test_a_url_that_is_not_an_api_server_fails_fast(self, make: Callable[..., KubernetesResolver]) -> None:
        async def html(request: web.Request) -> web.Response:
            return web.Response(text="<html>welcome to nginx</html>", content_type="text/html")

        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", html)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            resolver = make(f"http://127.0.0.1:{runner.addresses[0][1]}")
            error = await first_call_error(resolver)  # within its 10 s hang guard, not after the 30 s wait
        finally:
            await runner.cleanup()
        assert "is the server URL an API server's?" in error.message

    async def test_a_watch_trickled_byte_by_byte_is_ended_and_rewatched(
        self, make: Callable[..., KubernetesResolver]
    ) -> None:
        async def trickle(response: web.StreamResponse) -> None:
            for _ in range(10_000):  # never a whole line, never a silence as long as read_timeout
                await response.write(b" ")
                await asyncio.sleep(0.02)

        async with RawAPI(trickle) as api:
            resolver = make(api.url, watch_timeout=1.0, read_timeout=0.5)
            async with following(resolver, close=False) as follower:
                await follower.wait_for_hosts("10.0.0.1")
                with anyio.fail_after(20):
                    while api.watches < 3:
                        await anyio.sleep(0.05)
            assert resolver.stats is not None and resolver.stats.dropped >= 2


class TestWhatHolds:
    """Shapes the API allows, checked once: the endpoints are always exactly what the API says."""

    async def test_events_out_of_the_usual_order(self, make: Callable[..., KubernetesResolver]) -> None:
        def modified(kind: str, rv: str, *hosts: str, name: str = "arith-a") -> bytes:
            obj = endpoint_slice("arith", "default", name, *hosts)
            obj["metadata"]["resourceVersion"] = rv
            return line({"type": kind, "object": obj})

        async def handler(response: web.StreamResponse) -> None:
            await response.write(modified("ADDED", "1002", "10.0.0.2"))  # ADDED for a known slice: a replace
            await response.write(modified("DELETED", "1003", "10.9.9.9", name="ghost"))  # unknown: nothing
            await response.write(modified("MODIFIED", "1001", "10.0.0.3"))  # an older resourceVersion
            await asyncio.sleep(30)

        async with RawAPI(handler) as api:
            resolver = make(api.url)
            async with following(resolver, close=False) as follower:
                await follower.wait_for_hosts("10.0.0.3")
                seen = [[ep.host for ep in s] for s in follower.snapshots]
                assert all(hosts in (["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]) for hosts in seen)  # never the ghost
                # Resource versions are opaque (API concepts: never compare them): the last one is resumed from.
                assert active_watches()[0].resource_version == "1001"

    async def test_null_and_missing_fields(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        odd = endpoint_slice("arith", "default", "arith-a", "10.0.0.1")
        odd["endpoints"] = [
            {"addresses": []},  # no address: skipped
            {"addresses": None, "conditions": {"ready": True}},
            {"addresses": ["10.0.0.5"]},  # no conditions: ready (unset means ready)
            {"addresses": ["10.0.0.6"], "conditions": None, "zone": None, "hints": None, "targetRef": None},
            {"addresses": ["not an address"]},  # skipped, logged at debug (the API server admits only IPs)
        ]
        kube.upsert_slice(odd)
        no_ports = endpoint_slice("arith", "default", "arith-b", "10.0.0.7")
        no_ports["ports"] = None  # no ports: nothing to dial on
        kube.upsert_slice(no_ports)
        unnamed = endpoint_slice("arith", "default", "arith-c", "10.0.0.8", ports=[])
        unnamed["ports"] = [{"name": None, "port": 9000}, {"name": "", "port": 9001}, {"name": "rpc", "port": None}]
        kube.upsert_slice(unnamed)
        resolver = make(kube.url)
        async with following(resolver, close=False) as follower:
            snapshot = await follower.wait_for_hosts("10.0.0.5", "10.0.0.6")
            assert all(ep.ready and ep.port == 9000 for ep in snapshot)
        by_number = KubernetesResolver("arith", 9001, "default", configuration=Configuration(host=kube.url), **FAST)
        async with by_number, following(by_number, close=False) as follower:
            assert [(ep.host, ep.port) for ep in await follower.wait_for_hosts("10.0.0.8")] == [("10.0.0.8", 9001)]

    async def test_a_slice_relabelled_to_another_service_leaves(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
        async with following(make(kube.url), close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            with anyio.fail_after(5):
                await kube.wait_for_watches(1)
            kube.upsert_slice(endpoint_slice("other", "default", "arith-b", "10.0.0.2"))  # the label changes
            await follower.wait_for_hosts("10.0.0.1")
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.3"))  # and comes back
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.3")

    async def test_aclose_during_a_black_holed_list_leaves_nothing_behind(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.stall = True
        resolver = make(kube.url)
        async with following(resolver, close=False):
            with anyio.fail_after(5):
                while not kube.requests:
                    await anyio.sleep(0.01)
        with anyio.fail_after(5):
            await resolver.aclose()
        assert active_watches() == []
        await anyio.lowlevel.checkpoint()
        assert not [t for t in asyncio.all_tasks() if "kubrpc k8s watch" in t.get_name()]
