"""FakeKubeAPI, exercised through the real kubernetes-asyncio client over loopback."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, ApiException, Configuration, CoreV1Api, DiscoveryV1Api
from kubernetes_asyncio.watch import Watch

from kubrpc.testing.kube import (
    ENDPOINTSLICES,
    SERVICE_NAME_LABEL,
    FakeKubeAPI,
    endpoint_slice,
    self_signed_certificate,
    server_ssl_context,
    slice_endpoint,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as api:
        yield api


@pytest.fixture
async def client(kube: FakeKubeAPI) -> AsyncIterator[ApiClient]:
    async with ApiClient(Configuration(host=kube.url)) as api_client:
        yield api_client


def pod(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": {"containers": []}}


async def next_events(stream: Watch, count: int) -> list[dict[str, Any]]:
    with anyio.fail_after(5):
        return [await stream.__anext__() for _ in range(count)]


class TestObjects:
    def test_endpoint_slice_builder(self) -> None:
        built = endpoint_slice(
            "arith",
            "prod",
            "arith-x1",
            "10.0.0.1",
            slice_endpoint("10.0.0.2", ready=False, terminating=True, zone="b", pod="arith-2"),
            port=9000,
            port_name="rpc",
            zone="a",
            node_name="node-1",
        )
        assert built["metadata"]["labels"][SERVICE_NAME_LABEL] == "arith"
        assert built["metadata"]["namespace"] == "prod"
        assert built["ports"] == [{"name": "rpc", "port": 9000, "protocol": "TCP"}]
        first, second = built["endpoints"]
        assert first == {
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": True, "serving": True},
            "zone": "a",
            "nodeName": "node-1",
        }
        assert second["conditions"] == {"ready": False, "serving": False, "terminating": True}
        assert second["targetRef"] == {"kind": "Pod", "name": "arith-2", "namespace": "prod"}

    def test_upsert_and_delete_bump_the_resource_version(self) -> None:
        api = FakeKubeAPI(start_rv=50)
        stored = api.upsert_slice(endpoint_slice("a", "default", "a-1", "10.0.0.1"))
        assert stored["metadata"]["resourceVersion"] == "51" == api.resource_version
        assert stored["metadata"]["generation"] == 1
        again = api.upsert_slice(endpoint_slice("a", "default", "a-1", "10.0.0.2"))
        assert again["metadata"]["uid"] == stored["metadata"]["uid"]
        assert again["metadata"]["generation"] == 2
        api.delete_slice("default", "a-1")
        assert api.resource_version == "53"
        assert api.get(ENDPOINTSLICES, "default", "a-1") is None
        with pytest.raises(KeyError):
            api.delete_slice("default", "a-1")
        assert repr(api) == "<FakeKubeAPI stopped rv=53 objects=0 watches=0>"


class TestList:
    async def test_list_and_get_return_models(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
        kube.upsert_slice(endpoint_slice("other", "default", "other-a", "10.0.1.1"))
        kube.upsert_slice(endpoint_slice("arith", "prod", "arith-b", "10.0.2.1"))
        discovery = DiscoveryV1Api(client)
        listed = await discovery.list_namespaced_endpoint_slice("default", label_selector=f"{SERVICE_NAME_LABEL}=arith")
        assert [s.metadata.name for s in listed.items] == ["arith-a"]
        assert listed.metadata.resource_version == kube.resource_version
        assert [e.addresses[0] for e in listed.items[0].endpoints] == ["10.0.0.1", "10.0.0.2"]
        assert listed.items[0].ports[0].name == "rpc"
        everywhere = await discovery.list_endpoint_slice_for_all_namespaces()
        assert [s.metadata.name for s in everywhere.items] == ["arith-a", "other-a", "arith-b"]
        one = await discovery.read_namespaced_endpoint_slice("arith-b", "prod")
        assert one.endpoints[0].conditions.ready is True
        with pytest.raises(ApiException) as caught:
            await discovery.read_namespaced_endpoint_slice("missing", "prod")
        assert caught.value.status == 404

    @pytest.mark.parametrize(
        ("selector", "expected"),
        [
            ("app=web", ["a", "b"]),
            ("app==web,tier=front", ["a"]),
            ("app!=web", ["c", "d"]),
            ("tier in (front, back)", ["a", "b", "c"]),
            ("tier notin (front)", ["b", "c", "d"]),
            ("tier", ["a", "b", "c"]),
            ("!tier", ["d"]),
            ("app=web,!tier", []),
        ],
    )
    async def test_label_selectors(
        self, kube: FakeKubeAPI, client: ApiClient, selector: str, expected: list[str]
    ) -> None:
        kube.upsert("v1/pods", pod("a", app="web", tier="front"))
        kube.upsert("v1/pods", pod("b", app="web", tier="back"))
        kube.upsert("v1/pods", pod("c", app="db", tier="back"))
        kube.upsert("v1/pods", pod("d", app="db"))
        listed = await CoreV1Api(client).list_namespaced_pod("default", label_selector=selector)
        assert [p.metadata.name for p in listed.items] == expected

    async def test_field_selectors_and_bad_selectors(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        kube.upsert("v1/pods", pod("a"))
        kube.upsert("v1/pods", pod("b"))
        core = CoreV1Api(client)
        assert [
            p.metadata.name for p in (await core.list_namespaced_pod("default", field_selector="metadata.name=b")).items
        ] == ["b"]
        listed = await core.list_pod_for_all_namespaces(field_selector="metadata.name!=b")
        assert [p.metadata.name for p in listed.items] == ["a"]
        bad: list[dict[str, Any]] = [{"label_selector": "a in (b"}, {"field_selector": "spec.nodeName=x"}]
        for kwargs in bad:
            with pytest.raises(ApiException) as caught:
                await core.list_namespaced_pod("default", **kwargs)
            assert caught.value.status == 400

    async def test_pages(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        for i in range(5):
            kube.upsert("v1/pods", pod(f"p{i}"))
        core = CoreV1Api(client)
        names: list[str] = []
        token: dict[str, Any] = {}
        while True:
            page = await core.list_namespaced_pod("default", limit=2, **token)
            names += [p.metadata.name for p in page.items]
            if not page.metadata._continue:
                break
            token = {"_continue": page.metadata._continue}
        assert names == ["p0", "p1", "p2", "p3", "p4"]

    async def test_unavailable_and_token(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        discovery = DiscoveryV1Api(client)
        kube.unavailable = 503
        with pytest.raises(ApiException) as caught:
            await discovery.list_namespaced_endpoint_slice("default")
        assert caught.value.status == 503
        kube.unavailable = None
        kube.token = "s3cret"
        with pytest.raises(ApiException) as caught:
            await discovery.list_namespaced_endpoint_slice("default")
        assert caught.value.status == 401

    async def test_token_through_kubeconfig(self, tmp_path: Path) -> None:
        async with FakeKubeAPI(token="s3cret") as kube:
            path = kube.write_kubeconfig(tmp_path / "config", namespace="prod")
            configuration = Configuration()
            await config.load_kube_config(config_file=str(path), client_configuration=configuration)
            async with ApiClient(configuration) as api_client:
                listed = await DiscoveryV1Api(api_client).list_namespaced_endpoint_slice("prod")
            assert listed.items == []
            assert kube.requests[-1].path == "/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices"
            assert not kube.requests[-1].is_watch

    async def test_stop_and_start_on_the_same_port(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        port = kube.port
        await kube.stop()
        assert not kube.running
        with pytest.raises(aiohttp.ClientConnectorError):
            await DiscoveryV1Api(client).list_namespaced_endpoint_slice("default")
        await kube.start()
        assert kube.port == port
        listed = await DiscoveryV1Api(client).list_namespaced_endpoint_slice("default")
        assert [s.metadata.name for s in listed.items] == ["arith-a"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    async with FakeKubeAPI(ssl_context=server_ssl_context(cert, key)) as kube:
        assert kube.url.startswith("https://127.0.0.1:")
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with ApiClient(Configuration(host=kube.url, ssl_ca_cert=str(cert))) as api_client:
            listed = await DiscoveryV1Api(api_client).list_namespaced_endpoint_slice("default")
        assert [s.metadata.name for s in listed.items] == ["arith-a"]


class TestWatch:
    async def test_live_events_and_selector_transitions(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        kube.upsert("v1/pods", pod("a", app="web"))
        async with Watch() as watch:
            stream = watch.stream(
                CoreV1Api(client).list_namespaced_pod, "default", label_selector="app=web", timeout_seconds=10
            )
            assert [(e["type"], e["object"].metadata.name) for e in await next_events(stream, 1)] == [("ADDED", "a")]
            kube.upsert("v1/pods", pod("b", app="web"))
            kube.upsert("v1/pods", pod("a", app="web", tier="x"))
            kube.upsert("v1/pods", pod("b", app="db"))  # stops matching: DELETED
            kube.upsert("v1/pods", pod("c", namespace="other", app="web"))  # other namespace: nothing
            kube.delete("v1/pods", "default", "a")
            events = await next_events(stream, 4)
        assert [(e["type"], e["object"].metadata.name) for e in events] == [
            ("ADDED", "b"),
            ("MODIFIED", "a"),
            ("DELETED", "b"),
            ("DELETED", "a"),
        ]
        assert events[-1]["object"].metadata.resource_version == str(int(kube.resource_version))

    async def test_resume_from_a_resource_version_and_410_after_compaction(
        self, kube: FakeKubeAPI, client: ApiClient
    ) -> None:
        kube.upsert("v1/pods", pod("a"))
        since = kube.resource_version
        kube.upsert("v1/pods", pod("b"))
        kube.delete("v1/pods", "default", "a")
        core = CoreV1Api(client)
        async with Watch() as watch:
            stream = watch.stream(core.list_namespaced_pod, "default", resource_version=since, timeout_seconds=10)
            events = await next_events(stream, 2)
        assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "b"), ("DELETED", "a")]
        kube.upsert("v1/pods", pod("c"))
        kube.compact()
        async with Watch() as watch:
            stream = watch.stream(core.list_namespaced_pod, "default", resource_version=since, timeout_seconds=10)
            with pytest.raises(ApiException) as caught:
                await next_events(stream, 1)
        assert caught.value.status == 410

    async def test_history_limit_compacts(self) -> None:
        async with FakeKubeAPI(history_limit=2) as kube, ApiClient(Configuration(host=kube.url)) as api_client:
            since = kube.resource_version
            for name in "abc":
                kube.upsert("v1/pods", pod(name))
            async with Watch() as watch:
                stream = watch.stream(
                    CoreV1Api(api_client).list_namespaced_pod, "default", resource_version=since, timeout_seconds=5
                )
                with pytest.raises(ApiException) as caught:
                    await next_events(stream, 1)
            assert caught.value.status == 410

    async def test_bookmarks(self) -> None:
        async with FakeKubeAPI(bookmark_interval=0.05) as kube, ApiClient(Configuration(host=kube.url)) as api_client:
            kube.upsert("v1/pods", pod("a"))
            async with Watch() as watch:
                stream = watch.stream(
                    CoreV1Api(api_client).list_namespaced_pod,
                    "default",
                    resource_version=kube.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=10,
                )
                kube.upsert("v1/pods", pod("b"))
                first, periodic = await next_events(stream, 2)
                assert first["type"] == "ADDED"
                assert periodic["type"] == "BOOKMARK"
                kube.bookmark_interval = None
                kube.upsert("v1/pods", pod("c"))
                kube.send_bookmarks()
                added, on_demand = await next_events(stream, 2)
                assert (added["type"], on_demand["type"]) == ("ADDED", "BOOKMARK")
                assert on_demand["raw_object"]["metadata"]["resourceVersion"] == kube.resource_version
                assert watch.resource_version == kube.resource_version

    async def test_initial_events(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        kube.upsert("v1/pods", pod("a"))
        async with Watch() as watch:
            stream = watch.stream(
                CoreV1Api(client).list_namespaced_pod,
                "default",
                send_initial_events=True,
                resource_version_match="NotOlderThan",
                allow_watch_bookmarks=True,
                timeout_seconds=10,
            )
            added, bookmark = await next_events(stream, 2)
        assert added["type"] == "ADDED"
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["raw_object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

    async def test_timeout_and_end_are_clean_abort_is_not(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        core = CoreV1Api(client)
        async with Watch() as watch:
            with anyio.fail_after(5):
                assert [e async for e in watch.stream(core.list_namespaced_pod, "default", timeout_seconds=1)] == []
        async with Watch() as watch:
            kube.upsert("v1/pods", pod("a"))
            stream = watch.stream(core.list_namespaced_pod, "default", timeout_seconds=30)
            assert [e["type"] for e in await next_events(stream, 1)] == ["ADDED"]
            kube.end_watches()
            with anyio.fail_after(5), pytest.raises(StopAsyncIteration):
                await stream.__anext__()
        response: Any = await core.list_namespaced_pod("default", watch=True, _preload_content=False)
        try:
            with anyio.fail_after(5):
                await kube.wait_for_watches()
            kube.abort_watches()
            with anyio.fail_after(5), pytest.raises(aiohttp.ClientPayloadError):
                while await response.content.readline():
                    pass
        finally:
            response.close()
        assert kube.watch_count == 0
        watches = [r for r in kube.requests if r.is_watch]
        assert len(watches) == 3
        assert watches[0].query["timeoutSeconds"] == "1"

    async def test_event_hook(self, kube: FakeKubeAPI, client: ApiClient) -> None:
        sent: list[str] = []
        kube.on_event_sent = lambda event: sent.append(event["type"])
        kube.upsert("v1/pods", pod("a"))
        async with Watch() as watch:
            stream = watch.stream(CoreV1Api(client).list_namespaced_pod, "default", timeout_seconds=10)
            await next_events(stream, 1)
        assert sent == ["ADDED"]
