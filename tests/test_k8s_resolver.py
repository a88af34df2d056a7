"""KubernetesResolver against FakeKubeAPI, through the real kubernetes-asyncio client over loopback."""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from kube_fixtures import FAST, following, resolver_factory
from kubernetes_asyncio.client import ApiClient, Configuration
from services import Arith, Control, wait_until

import kubrpc
from kubrpc import Endpoint
from kubrpc._backoff import Backoff
from kubrpc.balancers import create as create_balancer
from kubrpc.resolvers import create as create_resolver
from kubrpc.resolvers._k8s_slices import EndpointView, compact_slice
from kubrpc.resolvers._k8s_watch import active_watches
from kubrpc.resolvers.k8s import KubernetesResolver, ResolverOptions, parse_target
from kubrpc.testing.kube import (
    FakeKubeAPI,
    LoggedRequest,
    endpoint_slice,
    self_signed_certificate,
    server_ssl_context,
    slice_endpoint,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def make(kube: FakeKubeAPI, no_service_account: Path) -> AsyncIterator[Callable[..., KubernetesResolver]]:
    """Resolvers for the fake API server, closed at the end of the test."""
    async with resolver_factory(kube.url, no_service_account) as factory:
        yield factory


def lists(kube: FakeKubeAPI) -> list[LoggedRequest]:
    return [r for r in kube.requests if r.path.endswith("/endpointslices") and not r.is_watch]


def watches(kube: FakeKubeAPI) -> list[LoggedRequest]:
    return [r for r in kube.requests if r.path.endswith("/endpointslices") and r.is_watch]


def hosts(snapshot: list[Endpoint]) -> list[tuple[str, int, bool]]:
    return sorted((e.host, e.port, e.ready) for e in snapshot)


class TestFollowing:
    async def test_added_modified_deleted(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        async with following(make()) as follower:
            assert await follower.wait_for(lambda s: True) == []  # the first snapshot comes even if empty
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            kube.upsert_slice(
                endpoint_slice("arith", "default", "arith-a", "10.0.0.1", slice_endpoint("10.0.0.2", ready=False))
            )
            snapshot = await follower.wait_for(lambda s: not all(e.ready for e in s))
            assert hosts(snapshot) == [("10.0.0.1", 9000, True), ("10.0.0.2", 9000, False)]
            kube.delete_slice("default", "arith-a")
            await follower.wait_for_hosts()
            kube.upsert_slice(endpoint_slice("other", "default", "other-a", "10.0.9.9"))  # another Service
            kube.upsert_slice(endpoint_slice("arith", "prod", "arith-p", "10.0.8.8"))  # another namespace
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.3"))
            await follower.wait_for_hosts("10.0.0.3")
        assert [len(s) for s in follower.snapshots] == [0, 2, 2, 0, 1]
        assert len(lists(kube)) == 1

    async def test_slices_merged_and_addresses_counted_once(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.3"))
        async with following(make()) as follower:
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2", "10.0.0.3")
            # The controller moves 10.0.0.2 to slice b: for a moment both slices list it.
            kube.upsert_slice(
                endpoint_slice("arith", "default", "arith-b", "10.0.0.3", slice_endpoint("10.0.0.2", ready=False))
            )
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.3", "10.0.0.2", "10.0.0.4"))
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
            snapshot = await follower.wait_for(lambda s: len(s) == 4)
        assert hosts(snapshot) == [(f"10.0.0.{i}", 9000, True) for i in (1, 2, 3, 4)]
        assert all(len(s) == len({e.host for e in s}) for s in follower.snapshots)
        assert all(e.ready for s in follower.snapshots for e in s)

    @pytest.mark.parametrize(
        ("port", "expected"),
        [("rpc", 9000), (9000, 9000), ("http", 8080), (8080, 8080), ("grpc", None), (7000, None)],
    )
    async def test_named_and_numeric_ports(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], port: int | str, expected: int | None
    ) -> None:
        ports = [("rpc", 9000), ("http", 8080)]
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", ports=ports))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2", ports=ports))
        async with following(make(port=port)) as follower:
            snapshot = await follower.wait_for(lambda s: True)
        assert sorted({e.port for e in snapshot}) == ([expected] if expected else [])
        assert len(snapshot) == (2 if expected else 0)

    async def test_not_ready_and_terminating_are_not_eligible(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(
            endpoint_slice(
                "arith",
                "default",
                "arith-a",
                slice_endpoint("10.0.0.1", ready=True),
                slice_endpoint("10.0.0.2", ready=False),
                slice_endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                slice_endpoint("10.0.0.4", ready=True, terminating=True),  # never seen in practice; still out
                slice_endpoint("10.0.0.5", ready=None, serving=None),  # unknown means ready
            )
        )
        async with following(make()) as follower:
            snapshot = await follower.wait_for(lambda s: len(s) == 5)
        assert sorted(e.host for e in snapshot if e.ready) == ["10.0.0.1", "10.0.0.5"]
        balancer = create_balancer("round_robin")
        balancer.update(snapshot)
        assert {balancer.pick().host for _ in range(20)} == {"10.0.0.1", "10.0.0.5"}

    async def test_zone_and_metadata(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        endpoint = slice_endpoint("fd00::7", zone="eu-1a", node_name="node-3", pod="arith-7f9-x2")
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-v6", endpoint, address_type="IPv6"))
        async with following(make()) as follower:
            [found] = await follower.wait_for(lambda s: len(s) == 1)
        assert found == Endpoint("fd00::7", 9000, zone="eu-1a")
        assert dict(found.metadata) == {
            "slice": "arith-v6",
            "node": "node-3",
            "pod": "arith-7f9-x2",
            "serving": "true",
            "terminating": "false",
        }
        assert found.address == "[fd00::7]:9000"

    async def test_yields_only_on_change(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(make()) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            for _ in range(3):  # MODIFIED with the same endpoints (e.g. a label change)
                kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", labels={"x": "y"}))
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2", port_name="admin"))
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
        assert [[e.host for e in s] for s in follower.snapshots] == [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"]]


class TestWatchRecovery:
    async def test_dropped_watch_resumes_from_the_last_version(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(resolver := make()) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            seen = kube.resource_version
            kube.abort_watches()
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.3"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2", "10.0.0.3")
            assert resolver.stats is not None and resolver.stats.dropped >= 1
        assert len(lists(kube)) == 1
        assert watches(kube)[1].query["resourceVersion"] == seen

    async def test_clean_end_resumes_from_the_last_version(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(make()) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            for n in range(2, 5):
                with anyio.fail_after(5):
                    await kube.wait_for_watches()
                seen = kube.resource_version
                kube.end_watches()
                kube.upsert_slice(endpoint_slice("arith", "default", f"arith-{n}", f"10.0.0.{n}"))
                await follower.wait_for(lambda s, n=n: len(s) == n)  # type: ignore[misc]
                assert watches(kube)[-1].query["resourceVersion"] == seen
        assert len(lists(kube)) == 1
        for request in watches(kube):
            assert request.query["allowWatchBookmarks"].lower() == "true"
            assert 30 <= int(request.query["timeoutSeconds"]) <= 60

    async def test_410_after_compaction_relists(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
        async with following(resolver := make()) as follower:
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            await kube.stop()
            kube.delete_slice("default", "arith-a")
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-c", "10.0.0.3"))
            kube.compact()
            await kube.start()
            await follower.wait_for_hosts("10.0.0.2", "10.0.0.3")
            assert resolver.stats is not None and resolver.stats.expired == 1
        assert len(lists(kube)) == 2

    async def test_410_as_http_status_relists(self, make: Callable[..., KubernetesResolver]) -> None:
        async with FakeKubeAPI() as kube:
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
            resolver = make(configuration=Configuration(host=kube.url))
            async with following(resolver) as follower:
                await follower.wait_for_hosts("10.0.0.1")
                kube.unavailable = 410  # every request, the watch too, now answers 410 Gone
                kube.abort_watches()
                await wait_until(lambda: len(lists(kube)) >= 2)
                kube.unavailable = None
                kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.5"))
                await follower.wait_for_hosts("10.0.0.5")
                assert resolver.stats is not None and resolver.stats.expired >= 1

    async def test_api_server_503_keeps_the_last_endpoints(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
        async with following(resolver := make()) as follower:
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            kube.unavailable = 503
            kube.abort_watches()
            await wait_until(lambda: resolver.stats is not None and resolver.stats.errors >= 3)
            assert resolver.stats is not None and resolver.stats.last_error is not None
            assert "503" in resolver.stats.last_error
            assert len(follower.snapshots) == 1
            assert repr(resolver).startswith("<KubernetesResolver k8s://arith.default:rpc [2 endpoints, 2 ready")
            kube.unavailable = None
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
            await follower.wait_for_hosts("10.0.0.1")
        assert len(lists(kube)) == 1  # the history was kept: resumed without a relist

    async def test_api_server_down_for_a_while(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(resolver := make()) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            await kube.stop()
            await wait_until(lambda: resolver.stats is not None and resolver.stats.errors >= 3)
            assert len(follower.snapshots) == 1
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
            await kube.start()
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
        assert len(lists(kube)) == 1

    async def test_first_list_waits_for_the_api_server(self, make: Callable[..., KubernetesResolver]) -> None:
        kube = FakeKubeAPI()
        await kube.start()
        await kube.stop()  # a known port, nobody listening
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        resolver = make(configuration=Configuration(host=kube.url))
        async with following(resolver) as follower:
            await wait_until(lambda: resolver.stats is not None and resolver.stats.errors >= 2)
            assert follower.snapshots == []
            assert "listing" in repr(resolver)
            async with kube:
                await follower.wait_for_hosts("10.0.0.1")

    async def test_bookmarks_advance_the_resource_version(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(resolver := make()) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            for i in range(3):  # changes this watch does not see move the server's resourceVersion on
                kube.upsert_slice(endpoint_slice("other", "default", f"other-{i}", f"10.1.0.{i}"))
            with anyio.fail_after(5):
                await kube.wait_for_watches()
            kube.send_bookmarks()
            await wait_until(lambda: resolver.stats is not None and resolver.stats.bookmarks == 1)
            bookmarked = kube.resource_version
            kube.compact()  # an older resourceVersion would now be 410
            kube.abort_watches()
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            assert resolver.stats is not None and resolver.stats.expired == 0
        assert watches(kube)[1].query["resourceVersion"] == bookmarked
        assert len(lists(kube)) == 1

    async def test_read_timeout_rewatches_a_silent_stream(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(resolver := make(read_timeout=0.2)) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            await wait_until(lambda: len(watches(kube)) >= 3)
            assert resolver.stats is not None and resolver.stats.dropped >= 2
        assert len(lists(kube)) == 1


class TestSharing:
    async def test_one_watch_per_service(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert_slice(
            endpoint_slice("arith", "default", "arith-a", "10.0.0.1", ports=[("rpc", 9000), ("http", 80)])
        )
        by_name, by_number, other_port = make(port="rpc"), make(port=9000), make(port="http")
        async with following(by_name) as a, following(by_number) as b, following(other_port) as c:
            for follower, port in ((a, 9000), (b, 9000), (c, 80)):
                assert hosts(await follower.wait_for_hosts("10.0.0.1")) == [("10.0.0.1", port, True)]
            with anyio.fail_after(5):
                await kube.wait_for_watches()
            assert kube.watch_count == 1
            assert len(active_watches()) == 1
            await by_name.aclose()
            kube.upsert_slice(
                endpoint_slice("arith", "default", "arith-a", "10.0.0.2", ports=[("rpc", 9000), ("http", 80)])
            )
            await b.wait_for_hosts("10.0.0.2")
            await c.wait_for_hosts("10.0.0.2")
            assert kube.watch_count == 1
            async with following(make(service="other")) as d:
                await d.wait_for(lambda s: True)
                assert len(active_watches()) == 2
        assert active_watches() == []
        assert len(lists(kube)) == 2  # arith once, other once
        assert [r.query["labelSelector"] for r in watches(kube)].count("kubernetes.io/service-name=arith") == 1
        await wait_until(lambda: kube.watch_count == 0)

    async def test_explicit_api_client_is_used_and_left_open(self, kube: FakeKubeAPI, no_service_account: Path) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with ApiClient(Configuration(host=kube.url)) as api_client:
            resolver = KubernetesResolver("arith", "rpc", api_client=api_client, service_account_dir=no_service_account)
            assert resolver.namespace == "default"
            async with following(resolver) as follower:
                await follower.wait_for_hosts("10.0.0.1")
            assert not api_client.rest_client.pool_manager.closed


class TestEndToEnd:
    async def test_calls_follow_the_endpoint_slices(
        self,
        kube: FakeKubeAPI,
        start_server: Callable[..., Any],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        ports = {}
        for n, host in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4")):
            url, _, _ = await start_server("tcp", host, name=host)
            ports[host] = int(url.rsplit(":", 1)[1])
            kube.upsert_slice(endpoint_slice("arith", "default", f"arith-{n}", host, port=ports[host]))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))

        async with kubrpc.connect("k8s://arith.default:rpc", transport="tcp", balancer="round_robin") as channel:
            arith, control = channel.stub(Arith, timeout=2.0), channel.stub(Control, timeout=2.0)

            async def served_by(calls: int = 12) -> set[str]:
                return {await control.whoami() for _ in range(calls)}

            assert await arith.add(1, 2) == 3
            assert await served_by() == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}

            kube.upsert_slice(
                endpoint_slice("arith", "default", "arith-1", "127.0.0.3", port=ports["127.0.0.3"], ready=False)
            )
            await wait_until(lambda: any(not e.ready for e in channel.endpoints))
            assert await served_by() == {"127.0.0.2", "127.0.0.4"}

            kube.abort_watches()  # dropped watch: calls go on
            assert await served_by() == {"127.0.0.2", "127.0.0.4"}
            await kube.stop()  # API server down: calls go on to the last known endpoints
            assert await served_by() == {"127.0.0.2", "127.0.0.4"}
            kube.delete_slice("default", "arith-0")
            kube.compact()  # ...and when it is back, the resolver's version is gone: 410, relist
            await kube.start()
            await wait_until(lambda: len(channel.endpoints) == 2)
            assert await served_by() == {"127.0.0.4"}
            assert len(lists(kube)) == 2


class TestConfiguration:
    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
    async def test_in_cluster(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cert, key = self_signed_certificate(tmp_path)
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text("pod-token")
        (account / "ca.crt").write_bytes(cert.read_bytes())
        (account / "namespace").write_text("team-a\n")
        async with FakeKubeAPI(token="pod-token", ssl_context=server_ssl_context(cert, key)) as kube:
            kube.upsert_slice(endpoint_slice("arith", "team-a", "arith-a", "10.0.0.1"))
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", kube.host)
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
            monkeypatch.setenv("KUBECONFIG", str(tmp_path / "not-used"))
            options: ResolverOptions = {**FAST, "service_account_dir": account}
            resolver = KubernetesResolver.from_target("k8s://arith:rpc", **options)
            assert resolver.target == "k8s://arith.team-a:rpc"
            async with following(resolver) as follower:
                await follower.wait_for_hosts("10.0.0.1")
            assert {r.path for r in lists(kube)} == {"/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices"}

    async def test_kubeconfig_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_service_account: Path
    ) -> None:
        async with FakeKubeAPI(token="user-token") as kube:
            kube.upsert_slice(endpoint_slice("arith", "prod", "arith-a", "10.0.0.1", port=9100))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
            resolver = create_resolver("k8s://arith.prod:9100")
            assert isinstance(resolver, KubernetesResolver)
            async with following(resolver) as follower:
                assert hosts(await follower.wait_for_hosts("10.0.0.1")) == [("10.0.0.1", 9100, True)]

    async def test_missing_configuration_is_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_service_account: Path
    ) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
        resolver = KubernetesResolver("arith", 9000, service_account_dir=no_service_account)
        missing = r"k8s://arith.default:9000: the kubeconfig is missing: .*missing does not exist"
        with pytest.raises(RuntimeError, match=missing):
            async for _ in resolver.watch():
                pass
        await resolver.aclose()
        assert [s async for s in resolver.watch()] == []

    @pytest.mark.parametrize(
        ("target", "expected"),
        [
            ("k8s://arith.default:9000", ("arith", "default", 9000)),
            ("k8s://arith:rpc", ("arith", None, "rpc")),
            ("k8s:///arith.prod.svc.cluster.local:grpc-web", ("arith", "prod", "grpc-web")),
            ("k8s://arith.prod.svc:80", ("arith", "prod", 80)),
        ],
    )
    def test_parse_target(self, target: str, expected: tuple[str, str | None, int | str]) -> None:
        assert parse_target(target) == expected

    @pytest.mark.parametrize(
        "target",
        [
            "k8s://arith",
            "k8s://arith.default",
            "k8s://arith.default:",
            "k8s://Arith.default:9000",
            "k8s://arith.default:70000",
            "k8s://arith.default:0",
            "k8s://arith.default:Rpc",
            "k8s://arith.de_fault:9000",
            "k8s://arith.default.example.com:9000",
            "k8s://:9000",
            "static://arith:9000",
        ],
    )
    def test_bad_targets(self, target: str) -> None:
        with pytest.raises(ValueError, match="bad target"):
            parse_target(target)

    def test_namespace_from_the_service_account(self, tmp_path: Path, no_service_account: Path) -> None:
        (tmp_path / "namespace").write_text("team-b")
        assert KubernetesResolver("arith", 9000, service_account_dir=tmp_path).namespace == "team-b"
        assert KubernetesResolver("arith", 9000, service_account_dir=no_service_account).namespace == "default"
        assert KubernetesResolver("arith", "9000", "x", service_account_dir=tmp_path).target == "k8s://arith.x:9000"
        with pytest.raises(ValueError, match="not both"):
            KubernetesResolver("arith", 9000, api_client=object(), configuration=object())  # type: ignore[arg-type]

    async def test_repr(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert_slice(
            endpoint_slice("arith", "default", "arith-a", "10.0.0.1", slice_endpoint("10.0.0.2", ready=False))
        )
        resolver = make()
        assert repr(resolver) == "<KubernetesResolver k8s://arith.default:rpc [not started]>"
        async with following(resolver) as follower:
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
            assert repr(resolver) == (
                f"<KubernetesResolver k8s://arith.default:rpc [2 endpoints, 1 ready | rv={kube.resource_version}]>"
            )
        assert repr(resolver) == "<KubernetesResolver k8s://arith.default:rpc [closed]>"


class TestEndpointView:
    def test_incremental_merge(self) -> None:
        view = EndpointView("rpc")
        seen: list[int] = []
        view.subscribe(lambda: seen.append(view.version))
        a = compact_slice(endpoint_slice("s", "ns", "a", "10.0.0.1", slice_endpoint("10.0.0.2", ready=False)))
        b = compact_slice(endpoint_slice("s", "ns", "b", "10.0.0.2", "10.0.0.3"))
        assert view.replace_all({"a": a}) and view.synced
        assert hosts(view.snapshot()) == [("10.0.0.1", 9000, True), ("10.0.0.2", 9000, False)]
        assert view.apply("b", b)
        assert hosts(view.snapshot()) == [(f"10.0.0.{i}", 9000, True) for i in (1, 2, 3)]
        assert view.snapshot()[1].metadata["slice"] == "b"  # the ready copy wins
        assert not view.apply("b", b)
        assert view.apply("a", None)
        assert hosts(view.snapshot()) == [("10.0.0.2", 9000, True), ("10.0.0.3", 9000, True)]
        assert not view.replace_all({"b": b})
        assert view.replace_all({})
        assert view.snapshot() == []
        assert seen == [1, 2, 3, 4]
        assert repr(view) == "<EndpointView port='rpc' [0 endpoints, 0 ready] v4>"

    def test_bad_addresses_are_skipped(self) -> None:
        view = EndpointView(9000)
        raw = compact_slice(endpoint_slice("s", "ns", "a", "10.0.0.1", {"addresses": []}, {"addresses": [""]}))
        view.replace_all({"a": raw})
        assert hosts(view.snapshot()) == [("10.0.0.1", 9000, True)]


class TestBackoff:
    def test_grows_caps_jitters_and_resets(self) -> None:
        backoff = Backoff(initial=1.0, maximum=10.0, multiplier=2.0, jitter=0.2, rng=random.Random(1))
        delays = [backoff.next_delay() for _ in range(8)]
        for delay, base in zip(delays, [1, 2, 4, 8, 10, 10, 10, 10], strict=True):
            assert base * 0.8 <= delay <= base * 1.2
        assert len(set(delays)) == 8
        assert backoff.attempts == 8
        backoff.reset()
        assert 0.8 <= backoff.next_delay() <= 1.2
        assert repr(backoff) == "<Backoff 1s..10s x2 +/-20% attempts=1>"

    @pytest.mark.parametrize(
        "options", [{"initial": 0}, {"initial": 2.0, "maximum": 1.0}, {"multiplier": 0.5}, {"jitter": 1.0}]
    )
    def test_rejects_bad_options(self, options: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="backoff"):
            Backoff(**options)

    async def test_sleep(self) -> None:
        assert 0 < await Backoff(initial=0.001, maximum=0.001).sleep() <= 0.0012
