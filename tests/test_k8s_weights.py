"""Endpoint weights from the pod annotation kubrpc.io/weight (opt-in), against FakeKubeAPI."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import follower
import kube_fixtures
import pytest
from kube_fixtures import resolver_factory
from services import Control, wait_until

import kubrpc
from kubrpc import Endpoint
from kubrpc.resolvers import create as create_resolver
from kubrpc.resolvers._k8s_pods import WEIGHT_ANNOTATION, PodWatch, WeightedView, parse_weight
from kubrpc.resolvers._k8s_slices import EndpointView, compact_slice
from kubrpc.resolvers._k8s_watch import WatchOptions, active_watches
from kubrpc.resolvers.k8s import KubernetesResolver, target_options
from kubrpc.testing.kube import FakeKubeAPI, JsonObject, LoggedRequest, endpoint_slice, slice_endpoint

pytestmark = pytest.mark.anyio

PODS = "v1/pods"


def pod(name: str, weight: str | None = None, *, app: str = "arith", phase: str = "Running") -> JsonObject:
    """A Pod of the default namespace, annotated with `weight` unless it is None."""
    metadata: JsonObject = {"name": name, "namespace": "default", "labels": {"app": app}}
    if weight is not None:
        metadata["annotations"] = {WEIGHT_ANNOTATION: weight, "other": "x"}
    return {
        "metadata": metadata,
        "spec": {"containers": [{"name": "server", "image": "kubrpc-example:0.1.0"}]},
        "status": {"phase": phase},
    }


def service_slice(*pods: str, service: str = "arith", name: str = "arith-a", port: int = 9000) -> JsonObject:
    """One EndpointSlice with an endpoint 10.0.0.N for each pod, targetRef set."""
    endpoints = [slice_endpoint(f"10.0.0.{n}", pod=p) for n, p in enumerate(pods, 1)]
    return endpoint_slice(service, "default", name, *endpoints, port=port)


def weights(snapshot: list[Endpoint]) -> dict[str, float]:
    return {e.metadata.get("pod", e.host): e.weight for e in snapshot}


def pod_requests(kube: FakeKubeAPI) -> list[LoggedRequest]:
    return [r for r in kube.requests if "/pods" in r.path]


@pytest.fixture
async def make(kube: FakeKubeAPI, no_service_account: Path) -> AsyncIterator[Callable[..., KubernetesResolver]]:
    """Resolvers for the fake API server (weights from pods unless told otherwise), closed at the end."""
    async with resolver_factory(kube.url, no_service_account, weights_from_pods=True) as factory:
        yield factory


class Follower(follower.Follower):
    """The shared recorder, plus a wait for weights."""

    async def wait_for_weights(self, expected: dict[str, float]) -> list[Endpoint]:
        return await self.wait_for(lambda snapshot: weights(snapshot) == expected)


def following(resolver: KubernetesResolver) -> AbstractAsyncContextManager[Follower]:
    """`async with following(resolver) as follower`: follow it in a task; close it on the way out."""
    return kube_fixtures.following(resolver, Follower)


async def settle(kube: FakeKubeAPI) -> None:
    """Wait until the pod watches have seen every change made so far (a marker pod is their last event)."""
    kube.upsert(PODS, pod("settle-marker"))
    await wait_until(
        lambda: all(w.resource_version == kube.resource_version for w in active_watches() if isinstance(w, PodWatch))
    )


class TestParsing:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("3", 3.0), (" 0.5 ", 0.5), ("0", 0.0), ("-0", 0.0), ("1e3", 1000.0), ("10", 10.0)],
    )
    def test_valid(self, value: str, expected: float) -> None:
        assert parse_weight(value) == expected

    @pytest.mark.parametrize("value", ["", "abc", "-1", "nan", "inf", "-inf", "1,5", "0x10", None, 3])
    def test_malformed(self, value: object) -> None:
        assert parse_weight(value) is None

    def test_target_query(self, tmp_path: Path) -> None:
        assert target_options("k8s://arith.default:rpc") == {}
        assert target_options("k8s://arith:rpc?weights=pods") == {"weights_from_pods": True}
        assert target_options("k8s://arith:rpc?weights=pods&pod_selector=app%3Darith%2Ctier+in+%28a%2Cb%29") == {
            "weights_from_pods": True,
            "pod_selector": "app=arith,tier in (a,b)",
        }
        resolver = create_resolver("k8s://arith.prod:rpc?weights=pods&pod_selector=app=arith")
        assert isinstance(resolver, KubernetesResolver)
        assert (resolver.service, resolver.namespace, resolver.port) == ("arith", "prod", "rpc")
        assert resolver.weights_from_pods and resolver.pod_selector == "app=arith"
        assert resolver.target == "k8s://arith.prod:rpc?weights=pods&pod_selector=app=arith"
        again = KubernetesResolver.from_target(resolver.target)
        assert (again.target, again.pod_selector) == (resolver.target, "app=arith")
        plain = KubernetesResolver.from_target("k8s://arith.prod:9000", service_account_dir=tmp_path)
        assert not plain.weights_from_pods and plain.target == "k8s://arith.prod:9000"
        override = KubernetesResolver.from_target("k8s://arith.prod:rpc?weights=pods", weights_from_pods=False)
        assert not override.weights_from_pods

    @pytest.mark.parametrize(
        ("target", "message"),
        [
            ("k8s://arith:rpc?weights=zone", "the only source is weights=pods"),
            ("k8s://arith:rpc?weight=pods", "unknown option 'weight'"),
            ("k8s://arith:rpc?weights=pods&weights=pods", "given twice"),
            ("k8s://arith:rpc?weights", "malformed query"),
            ("k8s://arith:rpc?pod_selector=app%3Darith", "needs weights_from_pods=True"),
            ("k8s://arith:rpc?weights=pods&pod_selector=", "bad pod_selector"),
        ],
    )
    def test_bad_target_query(self, target: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            KubernetesResolver.from_target(target)


class TestWeightedView:
    """The merge of endpoints and pod weights, fed by hand (no API server)."""

    def make(self) -> tuple[EndpointView, PodWatch, WeightedView]:
        base = EndpointView("rpc")
        pods = PodWatch(None, owns_client=False, namespace="default", label_selector=None, options=WatchOptions())  # type: ignore[arg-type]
        return base, pods, WeightedView(base, pods)

    def test_waits_for_the_pods(self) -> None:
        base, pods, view = self.make()
        base.replace_all({"arith-a": compact_slice(service_slice("arith-a", "arith-b"))})
        assert not view.synced  # the endpoints are known, the weights not yet
        pods._reset({"arith-a": "3", "arith-b": None})
        assert view.synced and weights(view.snapshot()) == {"arith-a": 3.0, "arith-b": 1.0}
        version = view.version
        pods._update("unrelated", "5")
        pods._update("arith-b", None)  # unchanged weight
        assert view.version == version
        pods._update("arith-b", "2")
        assert view.version == version + 1 and weights(view.snapshot()) == {"arith-a": 3.0, "arith-b": 2.0}
        view.close()
        assert base.listeners == 0

    def test_a_failed_pod_list_does_not_hold_the_endpoints(self) -> None:
        base, pods, view = self.make()
        base.replace_all({"arith-a": compact_slice(service_slice("arith-a"))})
        pods.stats.errors = 1
        pods._on_error("HTTP 403 Forbidden")
        assert view.synced and weights(view.snapshot()) == {"arith-a": 1.0}
        version = view.version
        pods._reset({"arith-a": None})  # listed at last, nothing weighted: no new snapshot
        assert view.version == version
        pods._reset({"arith-a": "4"})
        assert view.version == version + 1 and weights(view.snapshot()) == {"arith-a": 4.0}


class TestWeights:
    async def test_weights_from_annotations(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert(PODS, pod("arith-b"))
        kube.upsert(PODS, pod("arith-c", "0.5"))
        kube.upsert(PODS, pod("unrelated", "9"))
        kube.upsert_slice(service_slice("arith-a", "arith-b", "arith-c"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-manual", "10.0.1.1"))  # no targetRef
        resolver = make()
        async with following(resolver) as follower:
            expected = {"arith-a": 3.0, "arith-b": 1.0, "arith-c": 0.5, "10.0.1.1": 1.0}
            await follower.wait_for_weights(expected)
            assert len(follower.snapshots) == 1  # the first snapshot waited for the pods: no unweighted one
            await wait_until(lambda: len(pod_requests(kube)) == 2)  # a list, then a watch, of every pod
            assert [(r.is_watch, r.query.get("labelSelector")) for r in pod_requests(kube)] == [
                (False, None),
                (True, None),
            ]
            assert "weights=pods" in resolver.target
            assert "pod weights rv=" in repr(resolver)
            assert resolver.pod_stats is not None and resolver.pod_stats.lists == 1

    async def test_edited_annotation_gives_a_new_snapshot(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert(PODS, pod("arith-a", "2"))
        kube.upsert(PODS, pod("arith-b", "2"))
        kube.upsert_slice(service_slice("arith-a", "arith-b"))
        async with following(make()) as follower:
            await follower.wait_for_weights({"arith-a": 2.0, "arith-b": 2.0})
            kube.upsert(PODS, pod("arith-a", "5"))
            await follower.wait_for_weights({"arith-a": 5.0, "arith-b": 2.0})
            kube.upsert(PODS, pod("arith-b"))  # annotation removed: 1.0
            await follower.wait_for_weights({"arith-a": 5.0, "arith-b": 1.0})
            count = len(follower.snapshots)
            kube.upsert(PODS, pod("arith-a", "5", phase="Succeeded"))  # a pod change that keeps the weight
            kube.upsert(PODS, pod("unrelated", "7"))  # a weight of a pod outside the service
            await settle(kube)
            assert len(follower.snapshots) == count
            kube.upsert(PODS, pod("arith-b", "0"))
            await follower.wait_for_weights({"arith-a": 5.0, "arith-b": 0.0})
            assert len(follower.snapshots) == count + 1

    async def test_malformed_annotation_is_1_with_one_warning(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="kubrpc.resolvers.k8s")
        for name, value in (("arith-a", "heavy"), ("arith-b", "-2"), ("arith-c", "nan"), ("arith-d", "4")):
            kube.upsert(PODS, pod(name, value))
        kube.upsert_slice(service_slice("arith-a", "arith-b", "arith-c", "arith-d"))
        resolver = make()
        async with following(resolver) as follower:
            await follower.wait_for_weights({"arith-a": 1.0, "arith-b": 1.0, "arith-c": 1.0, "arith-d": 4.0})

            def warned() -> list[str]:
                return sorted(r.getMessage().split()[1] for r in caplog.records if WEIGHT_ANNOTATION in r.getMessage())

            assert warned() == ["default/arith-a:", "default/arith-b:", "default/arith-c:"]
            kube.upsert(PODS, pod("arith-a", "heavy", phase="Pending"))  # same bad value: no second warning
            kube.compact()  # and a relist (410) sees them all again: still no second warning
            kube.abort_watches()
            await wait_until(lambda: resolver.pod_stats is not None and resolver.pod_stats.lists == 2)
            kube.upsert(PODS, pod("arith-d", "oops"))  # a good weight turned bad: 1.0, and a warning
            await follower.wait_for_weights({"arith-a": 1.0, "arith-b": 1.0, "arith-c": 1.0, "arith-d": 1.0})
            assert warned() == ["default/arith-a:", "default/arith-b:", "default/arith-c:", "default/arith-d:"]
            kube.upsert(PODS, pod("arith-a", "6"))  # fixed
            await follower.wait_for_weights({"arith-a": 6.0, "arith-b": 1.0, "arith-c": 1.0, "arith-d": 1.0})

    async def test_pod_deleted_and_recreated(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert(PODS, pod("arith-0", "4"))
        kube.upsert(PODS, pod("arith-1", "2"))
        kube.upsert_slice(service_slice("arith-0", "arith-1"))
        async with following(make()) as follower:
            await follower.wait_for_weights({"arith-0": 4.0, "arith-1": 2.0})
            kube.delete(PODS, "default", "arith-0")  # the slice still lists it (briefly): weight 1.0
            await follower.wait_for_weights({"arith-0": 1.0, "arith-1": 2.0})
            kube.upsert(PODS, pod("arith-0", "8"))  # a StatefulSet pod comes back under the same name
            await follower.wait_for_weights({"arith-0": 8.0, "arith-1": 2.0})
            kube.upsert_slice(service_slice("arith-1", "arith-2"))  # the slice moves on to a new pod
            kube.upsert(PODS, pod("arith-2", "3"))
            await follower.wait_for_weights({"arith-1": 2.0, "arith-2": 3.0})
            assert [(e.host, e.weight) for e in follower.snapshots[-1]] == [("10.0.0.1", 2.0), ("10.0.0.2", 3.0)]

    async def test_without_the_option_no_pod_is_read(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert_slice(service_slice("arith-a"))
        resolver = make(weights_from_pods=False)
        async with following(resolver) as follower:
            await follower.wait_for_weights({"arith-a": 1.0})
            kube.upsert(PODS, pod("arith-a", "5"))
            await wait_until(lambda: kube.watch_count == 1)
            assert resolver.pod_stats is None and len(active_watches()) == 1
        assert pod_requests(kube) == []
        assert kube.requests  # it did talk to the API server, about EndpointSlices only


class TestPodWatch:
    async def test_one_pod_watch_per_namespace(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert(PODS, pod("other-a", "2", app="other"))
        kube.upsert_slice(service_slice("arith-a"))
        kube.upsert_slice(service_slice("other-a", service="other", name="other-a"))
        arith, arith_http, other = make(), make(port=9000), make("other")
        async with following(arith) as a, following(arith_http) as b, following(other) as c:
            await a.wait_for_weights({"arith-a": 3.0})
            await b.wait_for_weights({"arith-a": 3.0})
            await c.wait_for_weights({"other-a": 2.0})
            pod_watches = [w for w in active_watches() if isinstance(w, PodWatch)]
            assert len(pod_watches) == 1 and pod_watches[0].users == 3
            assert len(active_watches()) == 3  # slices of arith, slices of other, pods of default
            await arith.aclose()
            await other.aclose()
            kube.upsert(PODS, pod("arith-a", "9"))
            await b.wait_for_weights({"arith-a": 9.0})
            assert pod_watches[0].users == 1
        assert [r for r in pod_requests(kube) if not r.is_watch] == [pod_requests(kube)[0]]  # listed once

    async def test_a_late_resolver_gets_the_weights_at_once(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert_slice(service_slice("arith-a"))
        async with following(make()) as first:
            await first.wait_for_weights({"arith-a": 3.0})
            async with following(make()) as second:  # both watches are shared and synced already
                await second.wait_for_weights({"arith-a": 3.0})
                assert len(second.snapshots) == 1

    async def test_pod_selector(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert(PODS, pod("arith-b", "2", app="canary"))  # outside the selector: 1.0
        kube.upsert_slice(service_slice("arith-a", "arith-b"))
        async with following(make(pod_selector="app=arith")) as follower:
            await follower.wait_for_weights({"arith-a": 3.0, "arith-b": 1.0})
            kube.upsert(PODS, pod("arith-b", "2"))  # now it matches
            await follower.wait_for_weights({"arith-a": 3.0, "arith-b": 2.0})
            kube.upsert(PODS, pod("arith-a", "3", app="moved"))  # no longer matches: DELETED for the watch
            await follower.wait_for_weights({"arith-a": 1.0, "arith-b": 2.0})
        assert {r.query.get("labelSelector") for r in pod_requests(kube)} == {"app=arith"}

    async def test_watch_semantics(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert_slice(service_slice("arith-a"))
        resolver = make()
        async with following(resolver) as follower:
            await follower.wait_for_weights({"arith-a": 3.0})
            stats = resolver.pod_stats
            assert stats is not None
            kube.upsert(PODS, pod("arith-a", "4"))
            await follower.wait_for_weights({"arith-a": 4.0})

            kube.abort_watches()  # dropped: watch again from the last resourceVersion, no list
            kube.upsert(PODS, pod("arith-a", "5"))
            await follower.wait_for_weights({"arith-a": 5.0})
            assert stats.lists == 1 and stats.dropped >= 1
            rewatch = [r for r in pod_requests(kube) if r.is_watch][-1]
            assert rewatch.query["resourceVersion"] not in ("", "0")
            assert rewatch.query["allowWatchBookmarks"].lower() == "true" and "timeoutSeconds" in rewatch.query

            await kube.stop()  # API server down: the last weights stay, nothing is yielded
            count = len(follower.snapshots)
            await wait_until(lambda: stats.errors >= 2)
            assert len(follower.snapshots) == count and weights(follower.snapshots[-1]) == {"arith-a": 5.0}
            kube.upsert(PODS, pod("arith-a", "6"))
            kube.compact()  # ...and back with the resolver's version gone: 410, relist
            await kube.start()
            await follower.wait_for_weights({"arith-a": 6.0})
            assert stats.lists == 2 and stats.expired == 1

    async def test_failing_pod_watch_does_not_hold_the_endpoints(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        kube.upsert(PODS, pod("arith-a", "3"))
        kube.upsert_slice(service_slice("arith-a"))
        resolver = make(pod_selector="app=(")  # the API server answers 400, as it would 403 without RBAC
        async with following(resolver) as follower:
            await follower.wait_for_weights({"arith-a": 1.0})
            assert resolver.pod_stats is not None and resolver.pod_stats.errors >= 1
            kube.upsert_slice(service_slice("arith-a", "arith-b"))  # the endpoints still follow the slices
            await follower.wait_for_weights({"arith-a": 1.0, "arith-b": 1.0})
        assert "HTTP 400" in caplog.text


class TestEndToEnd:
    async def test_weighted_random_sees_the_weights(
        self,
        kube: FakeKubeAPI,
        start_server: Callable[..., Any],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
        for n, (host, weight) in enumerate(zip(hosts, ("1", "2", "0"), strict=True)):
            url, _, _ = await start_server("tcp", host, name=host)
            port = int(url.rsplit(":", 1)[1])  # each server has its own port: one slice each
            endpoint = slice_endpoint(host, pod=f"arith-{n}")
            kube.upsert_slice(endpoint_slice("arith", "default", f"arith-{n}", endpoint, port=port))
            kube.upsert(PODS, pod(f"arith-{n}", weight))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))

        target = "k8s://arith.default:rpc?weights=pods"
        async with kubrpc.connect(target, transport="tcp", balancer="weighted_random") as channel:
            control = channel.stub(Control, timeout=2.0)

            async def served_by(calls: int = 60) -> set[str]:
                return {await control.whoami() for _ in range(calls)}

            assert await served_by() == {"127.0.0.2", "127.0.0.3"}  # weight 0 takes no calls
            assert {e.host: e.weight for e in channel.endpoints} == {
                "127.0.0.2": 1.0,
                "127.0.0.3": 2.0,
                "127.0.0.4": 0.0,
            }

            kube.upsert(PODS, pod("arith-0", "0"))
            kube.upsert(PODS, pod("arith-2", "5"))
            await wait_until(lambda: {e.host: e.weight for e in channel.endpoints}["127.0.0.4"] == 5.0)
            await wait_until(lambda: {e.host: e.weight for e in channel.endpoints}["127.0.0.2"] == 0.0)
            assert await served_by() == {"127.0.0.3", "127.0.0.4"}
        assert any(r.path == "/api/v1/namespaces/default/pods" for r in kube.requests)
        assert active_watches() == []
