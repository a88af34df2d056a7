"""The Kubernetes resolver at the edges (issue 10), through the real kubernetes-asyncio client and FakeKubeAPI."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from kube_fixtures import following, resolver_factory
from kubernetes_asyncio.client import Configuration

import kubrpc
from kubrpc import Endpoint
from kubrpc._backoff import Backoff
from kubrpc.errors import RpcError
from kubrpc.resolvers import _k8s_watch
from kubrpc.resolvers.k8s import KubernetesResolver
from kubrpc.status import Status
from kubrpc.testing.kube import (
    ENDPOINTSLICES,
    FakeKubeAPI,
    JsonObject,
    endpoint_slice,
    slice_endpoint,
    status_object,
)

pytestmark = pytest.mark.anyio

KUBRPC = [sys.executable, "-m", "kubrpc"]


@pytest.fixture
async def make(kube: FakeKubeAPI, no_service_account: Path) -> AsyncIterator[Callable[..., KubernetesResolver]]:
    """Resolvers for the fake API server, closed at the end of the test."""
    async with resolver_factory(kube.url, no_service_account) as factory:
        yield factory


async def first_call_error(resolver: KubernetesResolver, *, wait: float = 30.0) -> RpcError:
    """The error of the first call on a new channel; its deadline and wait_for_endpoints are long (30 s)."""
    with anyio.fail_after(10):  # a hang guard: permanent problems must not wait out the 30 s
        async with kubrpc.connect(resolver, wait_for_endpoints=wait) as channel:
            with pytest.raises(RpcError) as caught:
                await channel.call("arith.Arith/add", b"{}", timeout=30.0)
    return caught.value


def hosts(snapshot: list[Endpoint]) -> list[str]:
    return sorted(ep.host for ep in snapshot)


class TestResourceVersionTooLarge:
    async def test_the_fake_answers_a_too_new_watch_with_an_in_stream_504(self, kube: FakeKubeAPI) -> None:
        from kubernetes_asyncio.client import ApiClient, DiscoveryV1Api

        kube.rewind(500)
        async with ApiClient(Configuration(host=kube.url)) as client:
            response: Any = await DiscoveryV1Api(client).list_namespaced_endpoint_slice(
                "default", watch=True, resource_version="900", _preload_content=False
            )
            assert response.status == 200
            event = orjson.loads(await response.content.readline())
            response.close()
        assert event["type"] == "ERROR"
        status = event["object"]
        assert (status["code"], status["reason"]) == (504, "Timeout")
        assert status["message"] == "Too large resource version: 900, current: 500"
        assert status["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"

    async def test_an_etcd_restore_makes_the_resolver_relist(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        resolver = make()
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            with anyio.fail_after(5):
                await kube.wait_for_watches(1)
            lists_before = sum(1 for r in kube.requests if not r.is_watch)
            kube.rewind(500)  # the client's resourceVersion (> 1000) is now in the server's future
            kube.abort_watches()
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
        assert resolver.stats is not None and resolver.stats.expired >= 1
        relists = [r for r in kube.requests if not r.is_watch][lists_before:]
        assert relists and all("resourceVersion" not in r.query for r in relists)


class RecordingBackoff(Backoff):
    """A Backoff that records its resets and delays (instead of timing anything)."""

    made: list[RecordingBackoff] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.resets = 0
        self.delays: list[float] = []
        RecordingBackoff.made.append(self)

    def reset(self) -> None:
        self.resets += 1
        super().reset()

    def next_delay(self) -> float:
        delay: float = super().next_delay()
        self.delays.append(delay)
        return delay


class TestBackoff:
    async def test_repeated_410s_back_off_and_only_progress_resets(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        RecordingBackoff.made = []
        monkeypatch.setattr(_k8s_watch, "Backoff", RecordingBackoff)
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        kube.watch_error = status_object(410, "Expired", "too old resource version: 1 (2)")
        resolver = make(min_backoff=0.001, max_backoff=0.004)
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            with anyio.fail_after(10):
                while resolver.stats is None or resolver.stats.lists < 8:
                    await anyio.sleep(0.01)
            [backoff] = RecordingBackoff.made
            assert backoff.resets == 0  # eight successful lists, no reset
            assert len(backoff.delays) >= 6
            assert backoff.delays[-1] > 0.002  # grown towards max_backoff (the first is ~0.001)
            kube.watch_error = None
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")  # listed (the watch may not be open yet)
            with anyio.fail_after(5):
                await kube.wait_for_watches(1)
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-c", "10.0.0.3"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2", "10.0.0.3")
            assert backoff.resets >= 1  # a watch event is progress


class TestErrorsReachTheCaller:
    async def test_403_fails_fast_and_says_who_may_not_do_what(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.user = "system:serviceaccount:shop:checkout"
        kube.deny("list", ENDPOINTSLICES)
        resolver = make()
        error = await first_call_error(resolver)
        assert error.code is Status.UNAVAILABLE
        message = error.message
        assert "HTTP 403" in message
        assert "ServiceAccount shop/checkout may not list endpointslices.discovery.k8s.io" in message
        assert "namespace 'default'" in message
        assert "deploy/rbac.yaml (Role kubrpc-endpointslice-reader)" in message

    async def test_a_403_on_watch_names_the_verb(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.deny("watch", ENDPOINTSLICES)
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        resolver = make()
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")  # the list worked: endpoints are served
            with anyio.fail_after(5):
                while resolver.stats is None or resolver.stats.last_error is None:
                    await anyio.sleep(0.01)
        assert "may not watch endpointslices.discovery.k8s.io" in resolver.stats.last_error
        assert resolver.problem is None and not resolver.problem_is_permanent  # it has endpoints

    async def test_rbac_fixed_later_is_picked_up(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.deny("list", ENDPOINTSLICES)
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        resolver = make()
        async with following(resolver, close=False) as follower:
            with anyio.fail_after(5):
                while not resolver.problem_is_permanent:
                    await anyio.sleep(0.01)
            kube.allow("list", ENDPOINTSLICES)
            await follower.wait_for_hosts("10.0.0.1")
        assert not resolver.problem_is_permanent

    async def test_401_fails_fast(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.token = "the-real-token"
        error = await first_call_error(make())
        assert error.code is Status.UNAVAILABLE and "HTTP 401 Unauthorized" in error.message

    async def test_404_fails_fast(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        resolver = make(configuration=Configuration(host=kube.url + "/not-an-apiserver"))
        error = await first_call_error(resolver)
        assert "HTTP 404 Not Found" in error.message and "does not serve endpointslices" in error.message

    async def test_a_missing_kubeconfig_is_reported_as_missing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_service_account: Path
    ) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope.yaml"))
        resolver = KubernetesResolver("arith", "rpc", "default", service_account_dir=no_service_account)
        error = await first_call_error(resolver)
        assert error.code is Status.UNAVAILABLE
        assert "the kubeconfig is missing" in error.message and "nope.yaml does not exist" in error.message
        assert "current-context" not in error.message

    async def test_an_invalid_kubeconfig_is_permanent(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_service_account: Path
    ) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        path = tmp_path / "config"
        path.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
        monkeypatch.setenv("KUBECONFIG", str(path))
        resolver = KubernetesResolver("arith", "rpc", "default", service_account_dir=no_service_account)
        error = await first_call_error(resolver)
        assert f"the kubeconfig {path} is invalid" in error.message

    async def test_a_transient_error_is_in_the_message_after_the_wait(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        await kube.stop()  # connection refused: not permanent, so the call waits wait_for_endpoints
        resolver = make()
        error = await first_call_error(resolver, wait=3.0)
        assert error.code is Status.UNAVAILABLE
        assert "k8s://arith.default:rpc: cannot list endpointslices" in error.message
        assert not resolver.problem_is_permanent

    async def test_kubrpc_resolve_prints_one_line_per_problem(
        self, kube: FakeKubeAPI, tmp_path: Path, no_service_account: Path
    ) -> None:
        env = {"KUBECONFIG": str(tmp_path / "missing"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        missing = await anyio.run_process([*KUBRPC, "resolve", "k8s://arith.default:rpc"], env=env, check=False)
        assert missing.returncode == 1
        lines = missing.stderr.decode().splitlines()
        assert len(lines) == 1 and "the kubeconfig is missing" in lines[0], lines
        kube.deny("list", ENDPOINTSLICES)
        env["KUBECONFIG"] = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        with anyio.fail_after(30):
            forbidden = await anyio.run_process([*KUBRPC, "resolve", "k8s://arith.default:rpc"], env=env, check=False)
        assert forbidden.returncode == 1
        lines = forbidden.stderr.decode().splitlines()
        assert len(lines) == 1 and "HTTP 403 Forbidden" in lines[0], lines
        assert b"Traceback" not in missing.stderr + forbidden.stderr


class TestEmptyResultsExplainThemselves:
    async def test_no_slice_with_the_service_label(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("other", "default", "other-a", "10.0.0.9"))
        error = await first_call_error(make())
        assert "no EndpointSlice has the label of Service default/arith" in error.message
        assert "kubernetes.io/service-name=arith" in error.message

    async def test_no_port_of_that_name_lists_the_names_there_are(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(
            endpoint_slice("arith", "default", "arith-a", "10.0.0.1", ports=[("http", 8080), ("grpc", 9090)])
        )
        error = await first_call_error(make(port="rpc"))
        assert "has a TCP port named 'rpc' (they have: http (8080), grpc (9090))" in error.message

    async def test_a_service_port_number_is_explained(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", port=9000))
        resolver = make(port=80)  # the Service's port; the slices carry the target port
        async with following(resolver, close=False) as follower:
            await follower.wait_for(lambda s: s == [])
        assert resolver.problem is not None
        assert "has TCP port 80 (they have: rpc (9000))" in resolver.problem
        assert "target port" in resolver.problem and "not the Service port" in resolver.problem

    async def test_none_ready(self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", ready=False))
        resolver = make()
        async with following(resolver, close=False) as follower:
            await follower.wait_for(lambda s: len(s) == 1)
            assert resolver.problem is not None
            assert "none of the 1 endpoints of Service default/arith" in resolver.problem


class TestListTimeouts:
    async def test_a_black_holed_list_times_out_after_read_timeout(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.stall = True
        resolver = make(read_timeout=0.2)  # list_timeout stays at its default
        async with following(resolver, close=False):
            with anyio.fail_after(20):  # before: 61 s, whatever read_timeout said
                while resolver.stats is None or resolver.stats.errors < 1:
                    await anyio.sleep(0.02)
        assert resolver.problem is not None and "cannot list endpointslices: " in resolver.problem
        assert "Timeout" in resolver.problem

    async def test_list_timeout_is_configurable(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.stall = True
        resolver = make(read_timeout=300.0, list_timeout=0.2)
        async with following(resolver, close=False):
            with anyio.fail_after(20):
                while resolver.stats is None or resolver.stats.errors < 1:
                    await anyio.sleep(0.02)

    def test_bad_timeouts_are_refused(self) -> None:
        with pytest.raises(ValueError, match="list_timeout must be > 0"):
            KubernetesResolver("arith", "rpc", "default", list_timeout=0)


class TestTerminatingFallback:
    async def test_serving_terminating_endpoints_take_over_when_none_is_ready(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        old = slice_endpoint("10.0.0.1", ready=False, serving=True, terminating=True, pod="arith-old")
        gone = slice_endpoint("10.0.0.3", ready=False, serving=False, terminating=True)
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", old, gone))
        async with following(make(), close=False) as follower:
            snapshot = await follower.wait_for(lambda s: len(s) == 2)
            by_host = {ep.host: ep for ep in snapshot}
            assert by_host["10.0.0.1"].ready and not by_host["10.0.0.3"].ready
            assert by_host["10.0.0.1"].metadata["serving"] == "true"
            assert by_host["10.0.0.1"].metadata["terminating"] == "true"
            assert by_host["10.0.0.3"].metadata["serving"] == "false"
            new = slice_endpoint("10.0.0.2", ready=True, pod="arith-new")
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", old, gone, new))
            snapshot = await follower.wait_for(lambda s: len(s) == 3)
        assert {ep.host for ep in snapshot if ep.ready} == {"10.0.0.2"}  # a ready one wins again

    async def test_unset_serving_defers_to_ready(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        endpoint: JsonObject = {"addresses": ["10.0.0.1"], "conditions": {"ready": False}}
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", endpoint))
        async with following(make(), close=False) as follower:
            [found] = await follower.wait_for(lambda s: len(s) == 1)
        assert not found.ready and found.metadata["serving"] == "false"


class TestAddressTypes:
    async def test_fqdn_slices_are_ignored_with_one_log_line(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "kubrpc.resolvers.k8s")
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-fqdn", "db.example.com", address_type="FQDN"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        async with following(make(), close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-fqdn", "db2.example.com", address_type="FQDN"))
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")
        ignored = [r for r in caplog.records if "addressType FQDN" in r.getMessage()]
        assert len(ignored) == 1

    async def test_only_fqdn_slices_explain_themselves(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-fqdn", "db.example.com", address_type="FQDN"))
        error = await first_call_error(make())
        assert "are of addressType FQDN, none IPv4 or IPv6" in error.message

    @pytest.mark.parametrize(
        ("family", "expected"),
        [
            ("auto", ["10.0.0.1", "10.0.0.2"]),
            ("IPv4", ["10.0.0.1", "10.0.0.2"]),
            ("IPv6", ["fd00::1", "fd00::2"]),
            ("any", ["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]),
        ],
    )
    async def test_dual_stack_is_one_family_per_service_by_default(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], family: str, expected: list[str]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-v4", "10.0.0.1", "10.0.0.2"))
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-v6", "fd00::1", "fd00::2", address_type="IPv6"))
        async with following(make(address_family=family), close=False) as follower:
            snapshot = await follower.wait_for(lambda s: hosts(s) == expected)
        assert hosts(snapshot) == expected

    async def test_ipv6_only_services_work_with_auto(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-v6", "fd00::1", address_type="IPv6"))
        async with following(make(), close=False) as follower:
            await follower.wait_for_hosts("fd00::1")

    def test_address_family_in_the_target(self) -> None:
        resolver = KubernetesResolver.from_target("k8s://arith.default:rpc?address_family=IPv6")
        assert resolver.address_family == "IPv6"
        assert resolver.target == "k8s://arith.default:rpc?address_family=IPv6"
        with pytest.raises(ValueError, match="bad address_family 'v6'"):
            KubernetesResolver.from_target("k8s://arith.default:rpc?address_family=v6")


class TestTopologyHints:
    async def test_hints_reach_the_endpoints_and_zone_aware_follows_them(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        from kubrpc.balancers.zone_aware import ZoneAware

        kube.upsert_slice(
            endpoint_slice(
                "arith",
                "default",
                "arith-a",
                slice_endpoint("10.0.0.1", zone="zone-a", for_zones=["zone-a"]),
                slice_endpoint("10.0.0.2", zone="zone-a", for_zones=["zone-b"]),  # lent to zone-b
                slice_endpoint("10.0.0.3", zone="zone-b", for_zones=["zone-b"]),
            )
        )
        async with following(make(), close=False) as follower:
            snapshot = await follower.wait_for(lambda s: len(s) == 3)
        assert {ep.host: ep.metadata["for_zones"] for ep in snapshot}["10.0.0.2"] == "zone-b"
        balancer = ZoneAware(zone="zone-b")
        balancer.update(snapshot)
        assert balancer.hinted and balancer.local
        assert {balancer.pick().host for _ in range(20)} == {"10.0.0.2", "10.0.0.3"}
        unhinted = [*snapshot, Endpoint("10.0.0.4", 9000, zone="zone-b")]
        balancer.update(unhinted)  # one endpoint without a hint: hints are ignored, zones are used
        assert not balancer.hinted
        assert {balancer.pick().host for _ in range(20)} == {"10.0.0.3", "10.0.0.4"}


class TestScale:
    async def test_1000_endpoints_over_10_slices_under_churn(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        rng = random.Random(10)
        slices: dict[str, dict[str, bool]] = {
            f"arith-{n:02d}": {f"10.1.{n}.{i}": True for i in range(100)} for n in range(10)
        }

        def publish(name: str) -> None:
            endpoints = [slice_endpoint(address, ready=ready) for address, ready in slices[name].items()]
            kube.upsert_slice(endpoint_slice("arith", "default", name, *endpoints))

        def expected() -> dict[str, bool]:
            merged: dict[str, bool] = {}
            for members in slices.values():
                for address, ready in members.items():
                    merged[address] = merged.get(address, False) or ready
            return merged

        for name in slices:
            publish(name)
        async with following(make(), close=False) as follower:
            await follower.wait_for(lambda s: len(s) == 1000)
            for step in range(60):
                name = rng.choice(sorted(slices))
                action = step % 4
                if action == 0 and slices[name]:  # the controller moves an endpoint to another slice
                    address = rng.choice(sorted(slices[name]))
                    ready = slices[name].pop(address)
                    target = rng.choice([n for n in sorted(slices) if n != name])
                    slices[target][address] = ready
                    publish(target)  # briefly in two slices
                    want = expected()
                    await follower.wait_for(lambda s, w=want: {ep.host: ep.ready for ep in s} == w)  # type: ignore[misc]
                    publish(name)
                elif action == 1 and slices[name]:  # readiness flips
                    address = rng.choice(sorted(slices[name]))
                    slices[name][address] = not slices[name][address]
                    publish(name)
                elif action == 2:  # scale up: a new pod
                    slices[name][f"10.2.{step}.{rng.randrange(256)}"] = True
                    publish(name)
                else:  # a slice is deleted and its endpoints come back in a new one
                    moved = slices.pop(name)
                    kube.delete_slice("default", name)
                    want = expected()
                    await follower.wait_for(lambda s, w=want: {ep.host: ep.ready for ep in s} == w)  # type: ignore[misc]
                    slices[f"{name}-r{step}"] = moved
                    publish(f"{name}-r{step}")
                want = expected()
                snapshot = await follower.wait_for(lambda s, w=want: {ep.host: ep.ready for ep in s} == w)  # type: ignore[misc]
                assert len(snapshot) == len(want)  # no duplicates, nothing missing
        assert len(slices) >= 10


class TestAttack:
    async def test_a_multi_line_status_message_stays_one_line(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        kube.watch_error = status_object(500, "InternalError", "line one\nline two\r\n" + "x" * 5000)
        resolver = make()
        async with following(resolver, close=False):
            with anyio.fail_after(5):
                while resolver.stats is None or resolver.stats.last_error is None:
                    await anyio.sleep(0.01)
        error = resolver.stats.last_error
        assert "\n" not in error and "line one line two" in error and len(error) < 1100

    async def test_garbage_in_the_watch_stream_does_not_stop_the_resolver(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver]
    ) -> None:
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "10.0.0.1"))
        kube.watch_error = {"code": "not a number", "details": {"causes": "nope"}}
        resolver = make()
        async with following(resolver, close=False) as follower:
            await follower.wait_for_hosts("10.0.0.1")
            with anyio.fail_after(5):
                while resolver.stats is None or resolver.stats.errors < 2:
                    await anyio.sleep(0.01)
            kube.watch_error = None
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "10.0.0.2"))
            await follower.wait_for_hosts("10.0.0.1", "10.0.0.2")


class TestSingleReplicaRollout:
    async def test_calls_go_to_the_terminating_pod_until_its_successor_is_ready(
        self, kube: FakeKubeAPI, make: Callable[..., KubernetesResolver], start_server: Callable[..., Any]
    ) -> None:
        from services import Control

        old_url, _, _ = await start_server("tcp", "127.0.0.2", name="old")
        new_url, _, _ = await start_server("tcp", "127.0.0.3", name="new")
        old_port, new_port = int(old_url.rsplit(":", 1)[1]), int(new_url.rsplit(":", 1)[1])
        kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", "127.0.0.2", port=old_port))
        resolver = make(port="rpc")
        async with kubrpc.connect(resolver, transport="tcp") as channel:
            control = channel.stub(Control, timeout=5.0)
            assert await control.whoami() == "old"
            # The rollout: the only pod is terminating (still serving), its successor is not ready yet.
            terminating = slice_endpoint("127.0.0.2", ready=False, serving=True, terminating=True)
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-a", terminating, port=old_port))
            with anyio.fail_after(5):
                while not any(ep.metadata.get("terminating") == "true" for ep in channel.endpoints):
                    await anyio.sleep(0.01)
            assert await control.whoami() == "old"  # before: UNAVAILABLE "no ready endpoint"
            kube.upsert_slice(endpoint_slice("arith", "default", "arith-b", "127.0.0.3", port=new_port))
            with anyio.fail_after(5):
                while len(channel.endpoints) < 2:
                    await anyio.sleep(0.01)
            assert {await control.whoami() for _ in range(6)} == {"new"}
