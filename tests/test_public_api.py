"""The public surface: names from DESIGN.md, sorted __all__, plugin discovery, packaging."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest

import kubrpc
from kubrpc import Endpoint, RpcError, Status, balancers, resolvers, transports


def test_all_is_sorted_and_complete() -> None:
    assert kubrpc.__all__ == sorted(kubrpc.__all__)
    public = {n for n in vars(kubrpc) if not n.startswith("_")} - {
        "client",
        "codec",
        "endpoint",
        "errors",
        "auth",
        "interceptors",
        "interface",
        "interfaces",
        "server",
        "status",
        "resolvers",
        "balancers",
        "transports",
        "openapi",
        "proto",
        "testing",
        "cli",
        "metrics",
        "tracing",
        "annotations",
        "reflection",
        "access_log",
    }
    assert public <= set(kubrpc.__all__)
    for name in ("Server", "connect", "Channel", "Endpoint", "RpcError", "Status", "interface", "method"):
        assert name in kubrpc.__all__


def test_status_names_are_grpcs() -> None:
    names = "CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    names += "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    names += "DATA_LOSS UNAUTHENTICATED"
    for number, name in enumerate(names.split(), start=1):
        assert Status[name].value == number
    assert RpcError(Status.NOT_FOUND, "x") == RpcError(Status.NOT_FOUND, "x")
    assert str(RpcError(Status.NOT_FOUND, "gone")) == "NOT_FOUND: gone"


@pytest.mark.parametrize("weight", [-1, math.nan, math.inf, True, "2"])
def test_endpoint_rejects_bad_weights(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        Endpoint("10.0.0.1", 9000, weight=weight)  # type: ignore[arg-type]


def test_endpoint_is_frozen_and_hashable() -> None:
    ep = Endpoint("10.0.0.1", 9000, weight=3, zone="a", metadata={"pod": "p"})
    assert {ep: 1}[Endpoint("10.0.0.1", 9000, weight=3, zone="a")] == 1
    assert repr(ep) == "Endpoint('10.0.0.1', 9000, weight=3, zone='a')"
    with pytest.raises(AttributeError):
        ep.port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="port"):
        Endpoint("h", 0)


def test_plugins_by_name() -> None:
    assert {"round_robin", "weighted_random"} <= set(balancers.names())
    assert {"tcp", "http"} <= set(transports.names())
    with pytest.raises(ValueError, match="available: .*round_robin"):
        balancers.create("nope")
    with pytest.raises(ValueError, match="available: .*tcp"):
        transports.create("nope")


def test_static_targets() -> None:
    assert resolvers.parse_static("10.0.0.1:80;weight=3,[::1]:81;zone=b") == [
        Endpoint("10.0.0.1", 80, weight=3),
        Endpoint("::1", 81, zone="b"),
    ]
    for bad in ("nohost", "h:x", "h:1;weight=abc", "h:1;color=red"):
        with pytest.raises(ValueError):
            resolvers.parse_static(bad)
    with pytest.raises(ValueError, match="unknown target scheme"):
        resolvers.create("dns://x:1")


def test_no_bare_plugin_packages_are_installed() -> None:
    code = "import importlib.util as u; print(u.find_spec('transports'), u.find_spec('balancers'))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["None", "None"]
    assert importlib.util.find_spec("kubrpc.transports.tcp") is not None
