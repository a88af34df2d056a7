"""Resolvers: where are the instances? `create(target)` picks one by the target's scheme.

static://HOST:PORT,HOST:PORT;weight=3      a fixed list (weights optional)
tcp://HOST:PORT, http://HOST:PORT          one fixed endpoint (the scheme names the transport)
k8s://SERVICE[.NAMESPACE]:PORT             live EndpointSlices of a Kubernetes Service
k8s://SERVICE[.NAMESPACE]:PORT?weights=pods   the same, weighted by the pods' kubrpc.io/weight annotation
"""

from __future__ import annotations

from collections.abc import Sequence

from ..endpoint import Endpoint
from ..interfaces import Resolver
from .static import ManualResolver, StaticResolver, parse_static

__all__ = ("ManualResolver", "Resolver", "StaticResolver", "create", "parse_static")


def create(target: str | Sequence[Endpoint]) -> Resolver:
    """A resolver for `target`: a URL string as above, or a list of Endpoint."""
    if not isinstance(target, str):
        return StaticResolver(target)
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise ValueError(f"target {target!r} has no scheme; use static://, k8s://, tcp:// or http://")
    if scheme == "k8s":
        from .k8s import KubernetesResolver

        return KubernetesResolver.from_target(target)
    if scheme in ("static", "tcp", "http", "https"):
        return StaticResolver(parse_static(rest))
    raise ValueError(f"unknown target scheme {scheme!r} in {target!r}; use static://, k8s://, tcp:// or http://")
