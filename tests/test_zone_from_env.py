"""zone_aware finds the client's zone by itself ($KUBRPC_ZONE, set from the downward API in deploy/), or says how
to give it, instead of a raw TypeError (issue 12 item 4); a call's key= reaches its inner ring_hash."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import Control, make_server

import kubrpc
from kubrpc import Endpoint, balancers
from kubrpc.balancers.zone_aware import FROM_ENV, ZONE_ENV, ZoneAware

pytestmark = pytest.mark.anyio

EPS = [Endpoint("10.0.0.1", 1, zone="a"), Endpoint("10.0.0.2", 1, zone="b"), Endpoint("10.0.0.3", 1, zone="b")]


def test_the_zone_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ZONE_ENV, "b")
    balancer = balancers.create("zone_aware")  # what connect(balancer="zone_aware") builds: no options
    assert isinstance(balancer, ZoneAware) and balancer.zone == "b"
    balancer.update(EPS)
    assert {balancer.pick().host for _ in range(10)} == {"10.0.0.2", "10.0.0.3"}
    assert ZoneAware(zone="a").zone == "a"  # an explicit zone wins
    assert ZoneAware(zone=None).zone is None  # no preference


@pytest.mark.parametrize("value", [None, "", "  "])
async def test_an_unknown_zone_is_a_clear_error_not_a_type_error(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    if value is None:
        monkeypatch.delenv(ZONE_ENV, raising=False)
    else:
        monkeypatch.setenv(ZONE_ENV, value)
    with pytest.raises(ValueError, match=r"KUBRPC_ZONE.*topology\.kubernetes\.io/zone.*zone=None"):
        ZoneAware(zone=FROM_ENV)
    with pytest.raises(ValueError, match="KUBRPC_ZONE"):  # fails fast, at connect()
        async with kubrpc.connect([Endpoint("127.0.0.1", 1)], balancer="zone_aware"):
            pass
    with pytest.raises(ValueError, match="zone must be"):
        ZoneAware(zone="")


async def test_a_key_reaches_the_inner_ring_hash_within_the_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over real servers: zone_aware(ring_hash) sends a key's calls to one server of the client's zone."""
    monkeypatch.setenv(ZONE_ENV, "b")
    servers = [make_server(name) for name in ("a1", "b1", "b2", "b3")]
    async with AsyncExitStack() as stack:
        endpoints = []
        for (server, control), zone in zip(servers, "abbb", strict=True):
            listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0"))
            port = int(listener.url.rsplit(":", 1)[1])
            endpoints.append(Endpoint("127.0.0.1", port, zone=zone))
            _ = control
        channel = await stack.enter_async_context(kubrpc.connect(endpoints, balancer=ZoneAware(inner="ring_hash")))
        seen: dict[str, set[str]] = {}
        for key in ("user-1", "user-2", "user-3", "user-4", "user-5", "user-6"):
            stub = channel.stub(Control, key=key)
            seen[key] = {await stub.whoami() for _ in range(5)}
    assert all(len(names) == 1 for names in seen.values())  # one server per key
    used = set().union(*seen.values())
    assert used <= {"b1", "b2", "b3"} and len(used) > 1  # the zone's servers, spread by key


def test_the_client_manifest_sets_the_zone_from_the_downward_api() -> None:
    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "deploy" / "client.yaml").read_text()))
    [job] = [d for d in docs if d and d["kind"] == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env[ZONE_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ref == "metadata.labels['topology.kubernetes.io/zone']"  # the pod's own label: no RBAC needed
