"""Resolvers: where are the instances? `create(target)` picks one by the target's scheme.

static://HOST:PORT,HOST:PORT;weight=3      a fixed list (weights optional)
tcp://HOST:PORT, http://HOST:PORT          one fixed endpoint (the scheme names the transport)
k8s://SERVICE[.NAMESPACE]:PORT             live EndpointSlices of a Kubernetes Service
k8s://SERVICE[.NAMESPACE]:PORT?weights=pods   the same, weighted by the pods' kubrpc.io/weight annotation
inproc://NAME[,NAME]                       servers in this process (the inproc transport), no sockets

Schemes are plugins: the registry maps a scheme to a factory that takes the whole target string and returns a
`kubrpc.interfaces.Resolver`. Third parties add schemes (`dns://`, `consul://`, ...) through the
`kubrpc.resolvers` entry-point group, or with `registry.register("dns", factory)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._plugins import Registry
from ..endpoint import Endpoint
from ..interfaces import Resolver
from .static import ManualResolver, StaticResolver, parse_static

__all__ = ("ManualResolver", "Resolver", "StaticResolver", "create", "names", "parse_static", "registry")

#: Resolver factories by target scheme; each is called with the whole target string.
registry: Registry[Resolver] = Registry(
    "kubrpc.resolvers",
    {
        "k8s": "kubrpc.resolvers.k8s:KubernetesResolver.from_target",
        "static": "kubrpc.resolvers.static:StaticResolver.from_target",
        "tcp": "kubrpc.resolvers.static:StaticResolver.from_target",
        "http": "kubrpc.resolvers.static:StaticResolver.from_target",
        "https": "kubrpc.resolvers.static:StaticResolver.from_target",
        "inproc": "kubrpc.transports.inproc:resolver",
    },
)
names = registry.names


def create(target: str | Sequence[Endpoint]) -> Resolver:
    """A resolver for `target`: a URL string whose scheme names a registered resolver, or a list of Endpoint."""
    if not isinstance(target, str):
        return StaticResolver(target)
    scheme, sep, _ = target.partition("://")
    if not sep:
        raise ValueError(f"target {target!r} has no scheme; use {_schemes()}")
    try:
        factory = registry.get(scheme)
    except ValueError:
        raise ValueError(f"unknown target scheme {scheme!r} in {target!r}; use {_schemes()}") from None
    resolver: Resolver = factory(target)
    return resolver


def _schemes() -> str:
    return ", ".join(f"{name}://" for name in registry.names())
